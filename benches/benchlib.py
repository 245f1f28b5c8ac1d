"""Helpers the benchmark scripts share (imported with `benches/` on sys.path)."""
import os
import re
import sys


def size_bytes(text, what=None):
    """`2GiB`, `512MiB`, `1G`, `4096`: as flyfs parses sizes. Anything else
    ends the script, naming `what` (an option) when given."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        sys.exit(f"{what + ' ' if what else ''}{text!r} is not a size (e.g. 2GiB, 512MiB)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def is_mounted(point):
    """Whether something is mounted at `point`."""
    point = os.path.abspath(point)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == point for line in f)


def cpu_jiffies():
    """The machine's CPU time so far from /proc/stat: (steal, total) jiffies.
    Steal is time the hypervisor gave this VM's vCPUs to someone else."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return fields[7], sum(fields)


def steal_share(before, after):
    """The share of the CPU time between two `cpu_jiffies()` readings that
    the hypervisor stole: a run under much of it ran on a loaded machine,
    however idle the VM looked."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0
