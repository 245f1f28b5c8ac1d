"""The framework adapters driven as SGLang and LMCache drive a storage
backend (their documented interfaces; the frameworks themselves are not
installed: they pull GPU stacks), against a real cluster."""

import ctypes
import importlib
import logging
import random
import select
from dataclasses import dataclass
from typing import Optional

import pytest

from conftest import HostPool, kv_config

try:
    import numpy
except ImportError:
    numpy = None


@dataclass
class StorageConfig:
    """SGLang's HiCacheStorageConfig, the fields a backend is given."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    attn_cp_rank: int
    attn_cp_size: int
    is_mla_model: bool
    enable_storage_metrics: bool
    is_page_first_layout: bool
    model_name: Optional[str]
    extra_config: Optional[dict] = None


def load_dynamic_backend(storage_config: StorageConfig):
    """What SGLang's StorageBackendFactory does for `--hicache-storage-backend
    dynamic`: import `module_path`, take `class_name`, call it with the
    storage config and the remaining keyword arguments as a dict."""
    extra = storage_config.extra_config
    for field in ("backend_name", "module_path", "class_name"):
        assert field in extra, field
    backend_class = getattr(importlib.import_module(extra["module_path"]), extra["class_name"])
    return backend_class(storage_config, {})


def sglang_backend(tp_rank: int = 0, model: str = "org/model-7b", mla: bool = False,
                   v1: bool = False):
    """The backend as SGLang loads it; ``v1`` sets ``interface_v1``, which
    makes SGLang call the zero-copy batch_get_v1 and batch_set_v1."""
    return load_dynamic_backend(StorageConfig(
        tp_rank=tp_rank, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=True,
        model_name=model,
        extra_config={
            "backend_name": "flyfs", "module_path": "flyfs.sglang",
            "class_name": "FlyfsHiCacheStorage", "flyfs_config": kv_config(),
            "interface_v1": int(v1),
        },
    ))


def page(seed: int, size: int):
    data = random.Random(seed).randbytes(size)
    if numpy is not None:  # SGLang hands tensors; numpy stands in for CPU ones.
        return numpy.frombuffer(data, dtype=numpy.float16).copy()
    return bytearray(data)


def empty_like(value):
    if numpy is not None:
        return numpy.zeros_like(value)
    return bytearray(len(value))


def as_bytes(value) -> bytes:
    return bytes(memoryview(value).cast("B"))


def test_sglang_loads_the_backend_and_round_trips_pages(run_id):
    backend = sglang_backend()
    keys = [f"{run_id}-{i:04x}" for i in range(8)]
    pages = [page(i, 128 << 10) for i in range(8)]
    assert backend.batch_exists(keys) == 0
    assert backend.set(keys[0], pages[0]) is True
    assert backend.exists(keys[0]) and not backend.exists(keys[1])
    assert backend.batch_set(keys[1:6], pages[1:6]) is True
    assert backend.batch_set(keys[:2], pages[:2]) is True, "a page stored already is a success"
    # The prefix SGLang can load: keys 0 to 5, then a gap.
    assert backend.batch_exists(keys) == 6
    assert backend.batch_exists(keys[6:]) == 0

    targets = [empty_like(p) for p in pages]
    got = backend.batch_get(keys, targets)
    for i in range(6):
        assert got[i] is targets[i], "a hit returns its target, filled in place"
        assert as_bytes(targets[i]) == as_bytes(pages[i])
    assert got[6] is None and got[7] is None, "misses are None, not errors"
    one = empty_like(pages[3])
    assert backend.get(keys[3], one) is one and as_bytes(one) == as_bytes(pages[3])
    assert backend.get(f"{run_id}-absent", empty_like(pages[0])) is None


def test_sglang_ranks_and_models_do_not_share_pages(run_id):
    rank0, rank1 = sglang_backend(0), sglang_backend(1)
    other_model = sglang_backend(0, model="org/other")
    key = f"{run_id}-ranked"
    assert rank0.set(key, page(1, 64 << 10))
    assert rank0.exists(key)
    assert not rank1.exists(key) and not other_model.exists(key)
    # MLA's KV is the same on every rank: ranks share it.
    mla0, mla1 = sglang_backend(0, mla=True), sglang_backend(1, mla=True)
    assert mla0.set(key, page(2, 64 << 10))
    assert mla1.exists(key)


def test_sglang_a_page_of_another_size_is_a_miss(run_id):
    backend = sglang_backend()
    key = f"{run_id}-sized"
    assert backend.set(key, page(3, 64 << 10))
    assert backend.get(key, bytearray(128 << 10)) is None
    assert backend.get(key, bytearray(32 << 10)) is None


def test_sglang_pages_of_a_registered_host_pool_round_trip(run_id):
    backend = sglang_backend()
    pool = HostPool(8, 64 << 10)
    backend.register_mem_pool_host(pool)
    assert backend.mem_pool_host is pool
    # On RDMA the pool is registered with the device; on TCP nothing is.
    assert len(backend._registrations) == (1 if backend.cache.rdma else 0)
    keys = [f"{run_id}-pool-{i}" for i in range(4)]
    for i in range(4):
        pool.half(i)[:] = random.Random(50 + i).randbytes(64 << 10)
    assert backend.batch_set(keys, [pool.half(i) for i in range(4)])
    got = backend.batch_get(keys, [pool.half(4 + i) for i in range(4)])
    assert all(g is not None for g in got), got
    assert pool.kv_buffer[4 * (64 << 10):] == pool.kv_buffer[:4 * (64 << 10)]


def fill_pages(pool: HostPool, pages, seed: int) -> None:
    for page in pages:
        for half in range(pool.halves):
            pool.half(page, half)[:] = random.Random(seed * 1000 + page * 2 + half).randbytes(pool.page_bytes)


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_sglang_zero_copy_calls_move_pages_between_the_pool_and_the_cache(run_id, mla):
    # SGLang's cache controller with interface_v1: batch_set_v1 backs pages
    # of the host pool up by their host indices, batch_exists finds the
    # prefix, batch_get_v1 prefetches it into other slots of the pool.
    backend = sglang_backend(mla=mla, v1=True)
    pool = HostPool(8, 32 << 10, mla=mla)
    backend.register_mem_pool_host(pool)
    keys = [f"{run_id}-v1-{i}" for i in range(4)]
    fill_pages(pool, range(4), seed=1)
    assert backend.batch_exists(keys) == 0
    assert backend.batch_set_v1(keys, pool.indices(range(4))) == [True] * 4
    assert backend.batch_exists(keys) == 4
    assert backend.batch_set_v1(keys[:2], pool.indices([0, 1])) == [True] * 2, \
        "a page stored already is a success"
    assert backend.batch_get_v1(keys, pool.indices(range(4, 8))) == [True] * 4
    for page in range(4):
        for half in range(pool.halves):
            assert pool.half(4 + page, half) == pool.half(page, half), (page, half)
    assert backend.batch_get_v1([], []) == [] and backend.batch_set_v1([], []) == []

    if mla:
        # An MLA page is one block, the one the copying calls store.
        copied = bytearray(32 << 10)
        assert sglang_backend(mla=True).get(keys[2], copied) is copied
        assert copied == pool.half(2)
        return
    # An MHA page is its K and V halves: a page missing one is not found,
    # and its get fails while the pages around it land.
    assert backend.cache.batch_remove([backend._key(keys[1]) + "/v"]) == [True]
    assert backend.batch_exists(keys) == 1
    assert backend.batch_get_v1(keys, pool.indices(range(4, 8))) == [True, False, True, True]
    # The copying interface stores whole pages under the bare key: apart.
    assert sglang_backend().batch_exists(keys) == 0


def test_sglang_zero_copy_calls_refuse_what_is_not_the_pool(run_id, caplog):
    backend = sglang_backend(v1=True)
    with pytest.raises(RuntimeError, match="register_mem_pool_host"):
        backend.batch_get_v1(["k"], list(range(4)))
    pool = HostPool(4, 16 << 10, mla=False)
    backend.register_mem_pool_host(pool)
    keys = [f"{run_id}-bad-{i}" for i in range(3)]
    with pytest.raises(ValueError, match="2 pages of 4 tokens need 8 host indices, got 4"):
        backend.batch_set_v1(keys[:2], pool.indices([0]))

    # A pool naming memory outside its kv_buffer (a stale or foreign
    # address): that page fails, said in the log, and nothing there is read
    # or written; the other pages move.
    fill_pages(pool, range(3), seed=2)
    elsewhere = bytearray(16 << 10)
    anchor = ctypes.c_char.from_buffer(elsewhere)
    stray = ctypes.addressof(anchor)
    del anchor
    honest = pool.get_page_buffer_meta

    def meta(indices):
        addresses, sizes = honest(indices)
        for n, first in enumerate(list(indices)[::pool.page_size]):
            if first // pool.page_size == 1:
                addresses[2 * n + 1] = stray  # page 1's V half
        return addresses, sizes

    pool.get_page_buffer_meta = meta
    with caplog.at_level(logging.ERROR, logger="flyfs.sglang"):
        assert backend.batch_set_v1(keys, pool.indices(range(3))) == [True, False, True]
        assert backend.batch_get_v1([keys[2], keys[0]], pool.indices([3, 0])) == [True, True]
        assert backend.batch_get_v1(keys[:1], pool.indices([1])) == [False]
    assert "outside its kv_buffer" in caplog.text
    assert elsewhere == bytes(16 << 10)
    assert backend.batch_exists(keys) == 1

    # Another layout's buffers (one per layer) are refused, naming it.
    pool.layout = "layer_first"
    pool.get_page_buffer_meta = lambda indices: ([pool.address] * 6, [1024] * 6)
    with pytest.raises(ValueError, match="layer_first.*6 buffers.*take 2 per page"):
        backend.batch_get_v1(keys[:1], pool.indices([0]))

    # Pages stored from a pool of another page size are not loaded.
    bigger = HostPool(4, 32 << 10, mla=False)
    backend.register_mem_pool_host(bigger)
    assert backend.batch_get_v1(keys[:1], bigger.indices([0])) == [False]


def test_sglang_without_a_config_says_what_is_missing(monkeypatch):
    monkeypatch.delenv("FLYFS_CONFIG", raising=False)
    config = StorageConfig(0, 1, 0, 1, 0, 1, False, False, True, "m", {
        "backend_name": "flyfs", "module_path": "flyfs.sglang",
        "class_name": "FlyfsHiCacheStorage"})
    with pytest.raises(ValueError, match="flyfs_config"):
        load_dynamic_backend(config)


def wait_completions(connector, want: set, timeout_s: float = 120.0) -> dict:
    """LMCache's loop: poll the eventfd, drain, match future ids."""
    done = {}
    poller = select.poll()
    poller.register(connector.event_fd(), select.POLLIN)
    while not want.issubset(done):
        events = poller.poll(timeout_s * 1000)
        assert events, f"no completion within {timeout_s} s; waiting for {want - set(done)}"
        for future_id, ok, error, per_key in connector.drain_completions():
            done[future_id] = (ok, error, per_key)
    return done


def test_lmcache_connector_protocol(run_id):
    from flyfs.lmcache import FlyfsConnector

    connector = FlyfsConnector(kv_config(), num_workers=4)
    try:
        size = 256 << 10
        keys = [f"lmcache@{run_id}@{i:08x}" for i in range(32)]
        blocks = [random.Random(i).randbytes(size) for i in range(32)]
        # Two sets in flight at once, then everything drained together.
        first = connector.submit_batch_set(keys[:16], [memoryview(b) for b in blocks[:16]])
        second = connector.submit_batch_set(keys[16:], [memoryview(b) for b in blocks[16:]])
        assert first != second
        done = wait_completions(connector, {first, second})
        assert done[first] == (True, "", None) and done[second] == (True, "", None)

        probe = keys[:4] + [f"lmcache@{run_id}@absent"]
        exists = connector.submit_batch_exists(probe)
        buffers = [memoryview(bytearray(size)) for _ in range(3)]
        get = connector.submit_batch_get([keys[0], keys[31], f"lmcache@{run_id}@absent"], buffers)
        done = wait_completions(connector, {exists, get})
        assert done[exists] == (True, "", [True, True, True, True, False])
        ok, error, per_key = done[get]
        assert (ok, per_key) == (False, [True, True, False])
        assert "absent: missing" in error
        assert bytes(buffers[0]) == blocks[0] and bytes(buffers[1]) == blocks[31]

        # Nothing pending: the descriptor is not readable, draining is empty.
        assert select.select([connector.event_fd()], [], [], 0)[0] == []
        assert connector.drain_completions() == []

        delete = connector.submit_batch_delete([keys[0], f"lmcache@{run_id}@absent"])
        assert wait_completions(connector, {delete})[delete] == (True, "", [True, False])
        with pytest.raises(ValueError, match="keys list is empty"):
            connector.submit_batch_exists([])
        # A batch that fails as a whole completes with why, it does not raise.
        bad = connector.submit_batch_get(["k" * 600], [memoryview(bytearray(10))])
        ok, error, per_key = wait_completions(connector, {bad})[bad]
        assert not ok and per_key is None and "600 bytes" in error
    finally:
        connector.close()
    with pytest.raises(ValueError, match="closed"):
        connector.submit_batch_exists(["x"])
