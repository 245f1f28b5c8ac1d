"""Fixtures shared by the package's tests.

The KV cache's tests need a cluster: ``FLYFS_KV_CONFIG`` names a mount config
of one (tests/kv_python.rs starts a cluster with ``flyfs up --no-mount`` and
runs these tests with it, and ``FLYFS_KV_REQUIRE=1`` so that a missing
cluster fails them rather than skipping them). Without it they are skipped,
saying so.
"""

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
