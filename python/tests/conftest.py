"""Fixtures shared by the package's tests.

The KV cache's tests need a cluster: ``FLYFS_KV_CONFIG`` names a mount config
of one (tests/kv_python.rs starts a cluster with ``flyfs up --no-mount`` and
runs these tests with it, and ``FLYFS_KV_REQUIRE=1`` so that a missing
cluster fails them rather than skipping them). Without it they are skipped,
saying so.
"""

import ctypes
import os
import uuid

import pytest

KV_CONFIG = os.environ.get("FLYFS_KV_CONFIG")
KV_REQUIRED = os.environ.get("FLYFS_KV_REQUIRE") == "1"


def kv_config() -> str:
    if not KV_CONFIG:
        if KV_REQUIRED:
            pytest.fail("FLYFS_KV_REQUIRE=1 but FLYFS_KV_CONFIG names no cluster")
        pytest.skip("FLYFS_KV_CONFIG names no cluster's mount config")
    return KV_CONFIG


@pytest.fixture(scope="session")
def kv_cache():
    import flyfs.kv

    cache = flyfs.kv.KvCache(kv_config())
    yield cache
    cache.close()


@pytest.fixture
def run_id() -> str:
    """A prefix that makes this test's keys its own, run after run."""
    return uuid.uuid4().hex[:12]


class HostPool:
    """What a backend uses of SGLang's host KV pool (HostKVCache), laid out
    page-first. ``kv_buffer`` (pinned CPU memory there; a bytearray stands in
    for the tensor) holds ``pages`` pages of ``page_size`` tokens: an MLA
    page is one buffer of ``page_bytes``; an MHA page a K half in the
    buffer's first half and a V half in its second (the pool's leading
    dimension of 2). ``get_page_buffer_meta(indices)`` gives each page's
    halves, K then V, as (addresses, sizes), as SGLang's pools do for the
    zero-copy calls; host indices name tokens, ``page_size`` per page."""

    def __init__(self, pages: int, page_bytes: int, mla: bool = True, page_size: int = 4):
        self.layout = "page_first"
        self.page_size = page_size
        self.pages = pages
        self.page_bytes = page_bytes
        self.halves = 1 if mla else 2
        self.kv_buffer = bytearray(self.halves * pages * page_bytes)
        anchor = ctypes.c_char.from_buffer(self.kv_buffer)
        self.address = ctypes.addressof(anchor)
        del anchor

    def half(self, page: int, half: int = 0) -> memoryview:
        start = (half * self.pages + page) * self.page_bytes
        return memoryview(self.kv_buffer)[start:start + self.page_bytes]

    def indices(self, pages) -> list:
        """The host indices of these pages (their tokens), as SGLang passes them."""
        return [p * self.page_size + t for p in pages for t in range(self.page_size)]

    def get_page_buffer_meta(self, indices):
        indices = list(indices)
        assert len(indices) % self.page_size == 0
        addresses, sizes = [], []
        for first in indices[::self.page_size]:
            for half in range(self.halves):
                page = half * self.pages + first // self.page_size
                addresses.append(self.address + page * self.page_bytes)
                sizes.append(self.page_bytes)
        return addresses, sizes
