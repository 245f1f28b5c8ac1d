"""flyfs.kv: the KV cache from Python, against a real cluster (conftest.py
says where it comes from), plus the argument checks that need none."""

import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import flyfs.kv
from flyfs.kv import byte_view, read_mount_config

try:
    import numpy
except ImportError:  # scripts/test's environment has it; a bare one may not.
    numpy = None


def block(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# ---- without a cluster ---------------------------------------------------


def test_byte_views_share_memory_and_refuse_what_is_not_flat():
    data = bytearray(b"abcdef")
    view = byte_view(data)
    view[0:1] = b"z"
    assert data[0:1] == b"z", "a view, not a copy"
    with pytest.raises(ValueError, match="buffer 3 is a int"):
        byte_view(7, 3)
    if numpy is not None:
        halves = numpy.zeros(8, dtype=numpy.float16)
        assert byte_view(halves).nbytes == 16
        byte_view(halves)[0:2] = b"\x00\x3c"
        assert halves[0] == 1.0
        with pytest.raises(ValueError, match="buffer 5 is not contiguous"):
            byte_view(numpy.zeros((4, 4), dtype=numpy.uint8)[:, 1], 5)


def test_mount_configs_are_read_with_paths_beside_them(tmp_path):
    config = tmp_path / "mount.toml"
    config.write_text(textwrap.dedent("""\
        mount_point = "/mnt/x"
        mgmt = "10.0.0.1:7000"
        meta = ["10.0.0.2:7001", "10.0.0.3:7001"]
        [tls]
        ca = "tls/ca.pem"
        cert = "/abs/mount.pem"
        key = "tls/mount.key"
        """))
    read = read_mount_config(config)
    assert read["mgmt"] == ["10.0.0.1:7000"]
    assert read["meta"] == ["10.0.0.2:7001", "10.0.0.3:7001"]
    assert read["tls"]["ca"] == str(tmp_path / "tls" / "ca.pem")
    assert read["tls"]["cert"] == "/abs/mount.pem"
    config.write_text('mount_point = "/mnt/x"\n')
    with pytest.raises(ValueError, match=r"no \[tls\] table"):
        read_mount_config(config)
    with pytest.raises(OSError) as raised:
        read_mount_config(tmp_path / "missing.toml")
    assert "missing.toml" in str(raised.value)


def test_missing_credentials_are_an_error_naming_the_file(tmp_path):
    config = tmp_path / "mount.toml"
    config.write_text('mount_point = "/m"\n[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "c.key"\n')
    with pytest.raises(OSError) as raised:
        flyfs.kv.KvCache(config)
    assert "ca.pem" in str(raised.value)


def test_rdma_configs_are_checked_naming_the_key(tmp_path):
    config = tmp_path / "mount.toml"
    base = 'mount_point = "/m"\n[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "c.key"\n'
    config.write_text('transport = "infiniband"\n' + base)
    with pytest.raises(ValueError, match='key `transport` must be "tcp" or "rdma"'):
        read_mount_config(config)
    config.write_text(base)
    assert read_mount_config(config)["rdma"] is None, "tcp by default"
    # Checked before the credentials are read (none exist here).
    cases = [
        ("", ValueError, "rdma.device is empty"),
        ('device = "rxe0"\ncredits = 0\n', ValueError, "rdma.credits must be 1 to"),
        ('device = "rxe0"\nmessage_bytes_max = 100\n', ValueError, "rdma.message_bytes_max must be 4096 to"),
        ('device = "rxe0"\ngid_index = 300\n', ValueError, "rdma.gid_index must be an integer 0 to 255"),
        ('device = "rxe0"\nqueue_depth = 8\n', ValueError, "rdma.queue_depth is not a key of"),
        ('device = "nosuch9"\n', OSError, "opening the RDMA device nosuch9"),
    ]
    for table, kind, message in cases:
        config.write_text('transport = "rdma"\n' + base + "[rdma]\n" + table)
        with pytest.raises(kind, match=message):
            flyfs.kv.KvCache(config)


def test_results_say_whether_they_are_ok():
    assert flyfs.kv.Result("found", 3, "").ok
    assert flyfs.kv.Result("exists", 0, "").ok
    assert not flyfs.kv.Result("missing", 0, "").ok
    assert not flyfs.kv.Result("too_small", 0, "why").ok


# ---- against a cluster ---------------------------------------------------


def test_blocks_round_trip_with_a_result_per_key(kv_cache, run_id):
    sizes = [256 << 10, 1 << 20, 100, 64 << 10]
    keys = [f"{run_id}/rt/{i}" for i in range(len(sizes))]
    blocks = [block(i, n) for i, n in enumerate(sizes)]
    # Every kind of buffer the cache takes: bytes, bytearray, memoryview, numpy.
    sources = [blocks[0], bytearray(blocks[1]), memoryview(blocks[2]), blocks[3]]
    if numpy is not None:
        sources[3] = numpy.frombuffer(blocks[3], dtype=numpy.float16).copy()
    put = kv_cache.batch_put_from(keys, sources)
    assert [r.status for r in put] == ["stored"] * 4, put
    again = kv_cache.batch_put_from(keys[:2], [b"other" * 10, b"other"])
    assert [(r.status, r.length) for r in again] == [("exists", 0)] * 2, "the first writer wins"

    targets = [bytearray(n) for n in sizes]
    if numpy is not None:
        targets[3] = numpy.zeros(sizes[3] // 2, dtype=numpy.float16)
    got = kv_cache.batch_get_into(keys, targets)
    assert [(r.status, r.length) for r in got] == [("found", n) for n in sizes], got
    for i, target in enumerate(targets):
        assert bytes(byte_view(target)) == blocks[i], f"block {i}"


def test_unknown_keys_are_missing_per_key_and_small_buffers_name_both_sizes(kv_cache, run_id):
    key = f"{run_id}/small"
    assert kv_cache.batch_put_from([key], [block(9, 300_000)])[0].status == "stored"
    buffers = [bytearray(1000), bytearray(300_000), bytearray(10)]
    got = kv_cache.batch_get_into([f"{run_id}/nope", key, f"{run_id}/nope2"], buffers)
    assert got[0].status == "missing" and got[2].status == "missing"
    assert got[1].status == "found" and bytes(buffers[1]) == block(9, 300_000)
    small = kv_cache.batch_get_into([key], [bytearray(4096)])[0]
    assert small.status == "too_small"
    assert "300000" in small.error and "4096" in small.error, small.error


def test_gets_land_in_the_callers_memory_without_a_copy(kv_cache, run_id):
    keys = [f"{run_id}/view/{i}" for i in range(4)]
    blocks = [block(20 + i, 64 << 10) for i in range(4)]
    assert all(r.ok for r in kv_cache.batch_put_from(keys, blocks))
    arena = bytearray(4 * (64 << 10) + 17)
    whole = memoryview(arena)
    views = [whole[17 + i * (64 << 10): 17 + (i + 1) * (64 << 10)] for i in range(4)]
    assert all(r.status == "found" for r in kv_cache.batch_get_into(keys, views))
    assert bytes(arena[17:]) == b"".join(blocks), "the blocks are in the arena itself"


def test_registered_buffers_are_pinned_until_closed(kv_cache, run_id):
    keys = [f"{run_id}/reg/{i}" for i in range(3)]
    arena = bytearray(6 * (64 << 10))
    whole = memoryview(arena)
    with pytest.raises(ValueError, match="read-only"):
        kv_cache.register_buffer(bytes(16))
    with pytest.raises(ValueError, match="empty"):
        kv_cache.register_buffer(bytearray())
    registration = kv_cache.register_buffer(arena)
    # On TCP there is no device to register with: the buffer is only pinned.
    assert registration.one_sided == kv_cache.rdma
    assert registration.nbytes == len(arena) and not registration.closed
    with pytest.raises(BufferError):
        arena.extend(b"x")
    blocks = [block(40 + i, 64 << 10) for i in range(3)]
    for i, data in enumerate(blocks):
        whole[i * (64 << 10):(i + 1) * (64 << 10)] = data
    sources = [whole[i * (64 << 10):(i + 1) * (64 << 10)] for i in range(3)]
    targets = [whole[(3 + i) * (64 << 10):(4 + i) * (64 << 10)] for i in range(3)]
    before = flyfs.kv.payload_moved()
    assert all(r.status == "stored" for r in kv_cache.batch_put_from(keys, sources))
    assert all(r.status == "found" for r in kv_cache.batch_get_into(keys, targets))
    after = flyfs.kv.payload_moved()
    assert bytes(arena[3 * (64 << 10):]) == b"".join(blocks)
    if not kv_cache.rdma:
        # Over TCP a get's blocks are read from the connection into the
        # buffers themselves.
        landed = after["storage.BatchRead"][2] - before.get("storage.BatchRead", (0, 0, 0))[2]
        assert landed == 3 * (64 << 10), (before, after)
    with registration:
        pass
    assert registration.closed
    registration.close()
    del sources, targets, whole
    arena.extend(b"x")  # released with its registration


def test_exists_and_remove_answer_per_key(kv_cache, run_id):
    keys = [f"{run_id}/ex/{i}" for i in range(3)]
    kv_cache.batch_put_from(keys[:2], [b"a" * 5000, b"b" * 5000])
    assert kv_cache.batch_exists(keys) == [True, True, False]
    assert kv_cache.batch_remove([keys[0], keys[2]]) == [True, False]
    assert kv_cache.batch_exists(keys) == [False, True, False]
    assert kv_cache.batch_get_into([keys[0]], [bytearray(5000)])[0].status == "missing"


def test_bad_batches_are_refused_naming_what_was_wrong(kv_cache, run_id):
    with pytest.raises(ValueError, match="2 keys but 1 buffers"):
        kv_cache.batch_put_from(["a", "b"], [b"x"])
    with pytest.raises(ValueError, match="key 1 has 0 bytes"):
        kv_cache.batch_exists(["a", ""])
    with pytest.raises(ValueError, match="key 0 has 513 bytes"):
        kv_cache.batch_get_into(["k" * 513], [bytearray(1)])
    with pytest.raises(ValueError, match="buffer 0 is read-only"):
        kv_cache.batch_get_into(["a"], [b"immutable"])
    arena = memoryview(bytearray(100))
    with pytest.raises(ValueError, match="buffers 0 and 1 overlap"):
        kv_cache.batch_get_into(["a", "b"], [arena[0:60], arena[50:100]])
    with pytest.raises(TypeError, match="key 0 is a int"):
        kv_cache.batch_exists([5])
    too_big = kv_cache.block_bytes_max + 1
    result = kv_cache.batch_put_from([f"{run_id}/big"], [bytearray(too_big)])[0]
    assert result.status == "too_large"
    assert str(too_big) in result.error and str(kv_cache.block_bytes_max) in result.error


def test_another_process_sees_the_blocks(kv_cache, run_id):
    key = f"{run_id}/shared"
    data = block(77, 200_000)
    script = textwrap.dedent(f"""\
        import random, flyfs.kv
        cache = flyfs.kv.KvCache({kv_config_path()!r})
        data = random.Random(77).randbytes(200_000)
        print(cache.batch_put_from([{key!r}], [data])[0].status)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "stored"
    target = bytearray(len(data))
    assert kv_cache.batch_get_into([key], [target])[0].status == "found"
    assert bytes(target) == data


def test_batches_release_the_gil(kv_cache, run_id):
    keys = [f"{run_id}/gil/{i}" for i in range(32)]
    assert all(r.ok for r in kv_cache.batch_put_from(keys, [block(i, 256 << 10) for i in range(32)]))
    buffers = [bytearray(256 << 10) for _ in keys]
    ticks = [0]
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.0001)  # Gives the GIL back each time.

    # The interpreter never takes the GIL from a thread on its own now: the
    # ticker runs only while this thread gives it up, which, between the
    # two reads of `ticks`, only the batch can do.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(100)
    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        before = ticks[0]
        results = kv_cache.batch_get_into(keys, buffers)
        during = ticks[0] - before
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        ticker.join()
    assert all(r.status == "found" for r in results)
    assert during > 0, "another thread ran while the batch moved its blocks"


def test_age_eviction_can_be_run_now(kv_cache):
    evicted, reclaimed = kv_cache.evict_aged()
    assert evicted >= 0 and reclaimed >= 0
    assert kv_cache.max_age_ms >= 0


def kv_config_path() -> str:
    return os.environ["FLYFS_KV_CONFIG"]
