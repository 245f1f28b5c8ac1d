"""flyfs.kv over RDMA: blocks put from and got into a registered buffer move
one-sided, by the storage nodes' RDMA READs and WRITEs.

Only tests/guest_kv_rdma.rs runs these, in the QEMU guest (Soft-RoCE), with
``FLYFS_KV_CONFIG`` naming a cluster started with ``--transport rdma`` and
``FLYFS_KV_RDMA=1``; elsewhere they are skipped, saying so.
"""

import os
import random
from types import SimpleNamespace

import pytest

import flyfs.sglang
from conftest import HostPool
from flyfs.kv import payload_moved

RDMA_REQUIRED = os.environ.get("FLYFS_KV_RDMA") == "1"

BLOCK = 256 << 10
BATCH = 32


@pytest.fixture
def rdma_cache(kv_cache):
    if not RDMA_REQUIRED:
        pytest.skip("FLYFS_KV_RDMA=1 is not set: these run in the guest (tests/guest_kv_rdma.rs)")
    assert kv_cache.rdma, "the mount config says transport = \"rdma\": the cache must be on it"
    return kv_cache


def moved(before: dict, after: dict, method: str) -> tuple:
    """(one_sided, copied, in_place) bytes `method` moved between two
    readings of payload_moved()."""
    zero = (0, 0, 0)
    return tuple(a - b for a, b in zip(after.get(method, zero), before.get(method, zero)))


def fill(view: memoryview, seed: int) -> bytes:
    data = random.Random(seed).randbytes(len(view))
    view[:] = data
    return data


def test_registered_blocks_move_one_sided_both_ways(rdma_cache, run_id):
    arena = bytearray(2 * BATCH * BLOCK)
    whole = memoryview(arena)
    sources = [whole[i * BLOCK:(i + 1) * BLOCK] for i in range(BATCH)]
    targets = [whole[(BATCH + i) * BLOCK:(BATCH + i + 1) * BLOCK] for i in range(BATCH)]
    registration = rdma_cache.register_buffer(arena)
    assert registration.one_sided and registration.nbytes == len(arena)
    with registration:
        # The first round also sets up the queue pairs to every node; a
        # call that outlasts the client's RPC deadline then is retried
        # through a copy. The second round must move every byte one-sided.
        for round in range(2):
            keys = [f"{run_id}/r{round}/{i}" for i in range(BATCH)]
            blocks = [fill(view, round * BATCH + i) for i, view in enumerate(sources)]
            for view in targets:
                view[:] = b"\xee" * BLOCK
            start = payload_moved()
            put = rdma_cache.batch_put_from(keys, sources)
            assert [r.status for r in put] == ["stored"] * BATCH, put
            middle = payload_moved()
            got = rdma_cache.batch_get_into(keys, targets)
            assert [(r.status, r.length) for r in got] == [("found", BLOCK)] * BATCH, got
            end = payload_moved()
            for i, view in enumerate(targets):
                assert view == blocks[i], f"round {round}: block {i} differs"
            put_moved = moved(start, middle, "storage.Write")
            get_moved = moved(middle, end, "storage.BatchRead")
            data = BATCH * BLOCK
            print(f"round {round}: {data} bytes each way; puts {put_moved}, gets {get_moved}"
                  " (one-sided, copied, in place)")
            if round == 0:
                assert put_moved[0] >= data // 2 and get_moved[0] >= data // 2, (put_moved, get_moved)
            else:
                # Pulled by the heads: every byte, none sent inline.
                assert put_moved[0] >= data and put_moved[1] == 0, put_moved
                # Written by the replicas into the targets: nothing copied,
                # nothing read from a message.
                assert get_moved == (data, 0, 0), get_moved
    assert registration.closed


def test_blocks_outside_a_registered_buffer_are_copied(rdma_cache, run_id):
    keys = [f"{run_id}/plain/{i}" for i in range(4)]
    blocks = [random.Random(100 + i).randbytes(BLOCK) for i in range(4)]
    assert all(r.ok for r in rdma_cache.batch_put_from(keys, blocks))
    arena = bytearray(4 * BLOCK)
    views = [memoryview(arena)[i * BLOCK:(i + 1) * BLOCK] for i in range(4)]
    # Warm: every replica's queue pair is up, so no call is retried.
    rdma_cache.batch_get_into(keys, views)
    before = payload_moved()
    got = rdma_cache.batch_get_into(keys, views)
    assert all(r.status == "found" for r in got), got
    # Through the message slots, then read from them by the client.
    one_sided, copied, in_place = moved(before, payload_moved(), "storage.BatchRead")
    assert one_sided == 0 and copied + in_place == 4 * BLOCK, (one_sided, copied, in_place)
    assert bytes(arena) == b"".join(blocks)

    # Registered, the same views move one-sided; closed, they are copied
    # again: the device no longer names the buffer.
    with rdma_cache.register_buffer(arena):
        before = payload_moved()
        assert all(r.status == "found" for r in rdma_cache.batch_get_into(keys, views))
        assert moved(before, payload_moved(), "storage.BatchRead") == (4 * BLOCK, 0, 0)
    before = payload_moved()
    assert all(r.status == "found" for r in rdma_cache.batch_get_into(keys, views))
    assert moved(before, payload_moved(), "storage.BatchRead")[0] == 0
    assert bytes(arena) == b"".join(blocks)


def test_sglang_pages_of_the_host_pool_move_one_sided(rdma_cache, run_id):
    # What SGLang gives a backend: its storage config, then its host KV pool.
    config = SimpleNamespace(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, is_mla_model=True,
                             model_name=f"org/{run_id}", extra_config={})
    backend = flyfs.sglang.FlyfsHiCacheStorage(config, {}, cache=rdma_cache)
    pages = 8
    pool = HostPool(2 * pages, BLOCK)
    backend.register_mem_pool_host(pool)
    assert len(backend._registrations) == 1 and backend._registrations[0].one_sided
    values = [pool.half(i) for i in range(pages)]
    targets = [pool.half(pages + i) for i in range(pages)]
    blocks = [fill(view, 200 + i) for i, view in enumerate(values)]
    keys = [f"page-{i}" for i in range(pages)]
    before = payload_moved()
    assert backend.batch_set(keys, values)
    middle = payload_moved()
    got = backend.batch_get(keys, targets)
    end = payload_moved()
    assert all(g is not None for g in got), got
    assert all(targets[i] == blocks[i] for i in range(pages))
    assert moved(before, middle, "storage.Write")[:2] == (pages * BLOCK, 0)
    assert moved(middle, end, "storage.BatchRead") == (pages * BLOCK, 0, 0)


def test_sglang_zero_copy_calls_move_pages_one_sided(rdma_cache, run_id):
    # SGLang with interface_v1 names pages by their host indices; the K and
    # V halves move between the storage nodes and the pool by RDMA.
    config = SimpleNamespace(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, is_mla_model=False,
                             model_name=f"org/{run_id}", extra_config={"interface_v1": 1})
    backend = flyfs.sglang.FlyfsHiCacheStorage(config, {}, cache=rdma_cache)
    pages = 8
    pool = HostPool(2 * pages, BLOCK, mla=False)
    backend.register_mem_pool_host(pool)
    assert len(backend._registrations) == 1 and backend._registrations[0].one_sided
    halves = {(p, h): fill(pool.half(p, h), 300 + 2 * p + h) for p in range(pages) for h in (0, 1)}
    keys = [f"v1-page-{i}" for i in range(pages)]
    before = payload_moved()
    assert backend.batch_set_v1(keys, pool.indices(range(pages))) == [True] * pages
    middle = payload_moved()
    assert backend.batch_exists(keys) == pages
    assert backend.batch_get_v1(keys, pool.indices(range(pages, 2 * pages))) == [True] * pages
    end = payload_moved()
    for (page, half), data in halves.items():
        assert pool.half(pages + page, half) == data, (page, half)
    assert moved(before, middle, "storage.Write")[:2] == (2 * pages * BLOCK, 0)
    assert moved(middle, end, "storage.BatchRead") == (2 * pages * BLOCK, 0, 0)
