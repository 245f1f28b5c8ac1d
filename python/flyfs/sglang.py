"""SGLang's hierarchical cache (HiCache) storage backend over the flyfs KV cache.

SGLang loads a storage backend it does not ship through its ``dynamic``
backend option: ``--hicache-storage-backend dynamic`` with
``--hicache-storage-backend-extra-config`` a JSON object naming the class::

    {"backend_name": "flyfs", "module_path": "flyfs.sglang",
     "class_name": "FlyfsHiCacheStorage",
     "flyfs_config": "/var/tmp/flyfs/etc/mount.toml"}

SGLang imports ``module_path``, takes ``class_name`` and calls
``FlyfsHiCacheStorage(storage_config, kwargs)``; the rest of the extra
config is ours: ``flyfs_config`` (a mount config; else the environment's
``FLYFS_CONFIG``), and optionally ``op_deadline`` (seconds),
``max_age_ms`` and ``evict_when_full`` for a cache this process creates.

The methods are HiCacheStorage's: ``get``, ``batch_get``, ``set``,
``batch_set``, ``exists``, ``batch_exists``, ``register_mem_pool_host``. Values and targets are CPU
tensors (or anything exporting the buffer protocol): a get reads into its
target in place, a set sends its value without copying it on this side.
Keys are namespaced by model and, unless the model is MLA (whose KV is the
same on every rank), by tensor- and pipeline-parallel rank, as SGLang's own
file backend does, so ranks never read each other's pages.

SGLang hands a backend its host KV pool once (``register_mem_pool_host``).
When the cache is on RDMA, the pool's ``kv_buffer`` is registered with the
device then: pages whose values and targets are views of the pool (the
page-first layouts) move one-sided, pulled by the storage nodes and written
by them straight into the pool.
"""

import logging
import os
from typing import Any, List, Optional

from flyfs.kv import KvCache, byte_view

try:  # Subclass SGLang's interface when it is installed (its loader checks).
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage as _Base
except ImportError:  # The tests drive the adapter without SGLang.
    _Base = object

__all__ = ["FlyfsHiCacheStorage"]

logger = logging.getLogger(__name__)


def _extra(storage_config: Any) -> dict:
    extra = getattr(storage_config, "extra_config", None)
    return dict(extra) if extra else {}


class FlyfsHiCacheStorage(_Base):
    """HiCacheStorage on the flyfs KV cache."""

    def __init__(self, storage_config: Any, kwargs: Optional[dict] = None, cache: Optional[KvCache] = None):
        extra = _extra(storage_config)
        if cache is None:
            config = extra.get("flyfs_config") or os.environ.get("FLYFS_CONFIG")
            if not config:
                raise ValueError(
                    "the flyfs HiCache backend needs a mount config: `flyfs_config` in the "
                    "extra config, or FLYFS_CONFIG"
                )
            cache = KvCache(
                config,
                op_deadline=float(extra.get("op_deadline", 30.0)),
                max_age_ms=int(extra.get("max_age_ms", 0)),
                evict_when_full=bool(extra.get("evict_when_full", True)),
            )
        self.cache = cache
        self.mem_pool_host = None
        self._registrations: List[Any] = []
        model = (getattr(storage_config, "model_name", None) or "").replace("/", "-")
        prefix = f"sglang/{model}/"
        if not getattr(storage_config, "is_mla_model", False):
            prefix += f"tp{storage_config.tp_rank}of{storage_config.tp_size}/"
        if getattr(storage_config, "pp_size", 1) > 1:
            prefix += f"pp{storage_config.pp_rank}of{storage_config.pp_size}/"
        self._prefix = prefix

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Keeps the host KV pool, as SGLang's base class does, and on RDMA
        registers its ``kv_buffer`` (a tensor, or one per layer) with the
        device. A buffer that cannot be registered is logged and left
        unregistered: its pages are then copied through the connection."""
        self.mem_pool_host = mem_pool_host
        for registration in self._registrations:
            registration.close()
        self._registrations = []
        buffers = getattr(mem_pool_host, "kv_buffer", None)
        if buffers is None or not self.cache.rdma:
            return
        if not isinstance(buffers, (list, tuple)):
            buffers = [buffers]
        for i, buffer in enumerate(buffers):
            try:
                self._registrations.append(self.cache.register_buffer(buffer))
            except (ValueError, OSError) as e:
                logger.warning(
                    "flyfs HiCache: kv_buffer %d of the host pool is not registered, its pages "
                    "are copied: %s", i, e,
                )

    def _key(self, key: str) -> str:
        return self._prefix + key

    @staticmethod
    def _target_view(target: Any, size: Optional[int], index: int) -> memoryview:
        view = byte_view(target, index)
        if isinstance(size, int) and 0 <= size < len(view):
            view = view[:size]
        return view

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None) -> Any:
        """``target_location`` filled with the key's page, or None when the
        key is not stored (or its page has another size: another layout)."""
        return self.batch_get([key], [target_location], [target_sizes])[0]

    def batch_get(
        self,
        keys: List[str],
        target_locations: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> List[Any]:
        if not keys:
            return []
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        sizes = list(target_sizes) if target_sizes is not None else [None] * len(keys)
        # Without a target the page lands in a buffer of the largest block.
        targets = [
            bytearray(self.cache.block_bytes_max) if t is None else t for t in targets
        ]
        views = [self._target_view(t, s, i) for i, (t, s) in enumerate(zip(targets, sizes))]
        owned = [t is None for t in (target_locations or [None] * len(keys))]
        results = self.cache.batch_get_into([self._key(k) for k in keys], views)
        out: List[Any] = []
        for key, target, view, mine, result in zip(keys, targets, views, owned, results):
            if result.status == "found" and (mine or result.length == len(view)):
                out.append(memoryview(target)[: result.length] if mine else target)
                continue
            if result.status == "found":
                logger.warning(
                    "flyfs HiCache: page %s has %d bytes, its target %d: not used",
                    key, result.length, len(view),
                )
            elif result.status != "missing":
                logger.warning("flyfs HiCache: page %s: %s (%s)", key, result.status, result.error)
            out.append(None)
        return out

    def set(
        self,
        key: str,
        value: Optional[Any] = None,
        target_location: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> bool:
        """Stores the page; True when it is stored (or was already)."""
        return self.batch_set([key], [value], [target_location], [target_sizes])

    def batch_set(
        self,
        keys: List[str],
        values: Optional[Any] = None,
        target_locations: Optional[Any] = None,
        target_sizes: Optional[Any] = None,
    ) -> bool:
        """Stores every page; True when all are stored (or were already)."""
        if not keys:
            return True
        values = list(values) if values is not None else [None] * len(keys)
        locations = list(target_locations) if target_locations is not None else [None] * len(keys)
        sizes = list(target_sizes) if target_sizes is not None else [None] * len(keys)
        views = []
        for i, (value, location, size) in enumerate(zip(values, locations, sizes)):
            source = value if value is not None else location
            if source is None:
                raise ValueError(f"page {i} ({keys[i]}) has neither a value nor a location")
            views.append(self._target_view(source, size, i))
        results = self.cache.batch_put_from([self._key(k) for k in keys], views)
        for key, result in zip(keys, results):
            if not result.ok:
                logger.warning("flyfs HiCache: storing page %s: %s (%s)", key, result.status, result.error)
        return all(r.ok for r in results)

    def exists(self, key: str) -> bool:
        return self.cache.batch_exists([self._key(key)])[0]

    def batch_exists(self, keys: List[str], extra_info: Optional[Any] = None) -> int:
        """How many keys from the first are stored, without a gap (the
        prefix SGLang can load)."""
        if not keys:
            return 0
        found = self.cache.batch_exists([self._key(k) for k in keys])
        return next((i for i, hit in enumerate(found) if not hit), len(keys))

    def clear(self) -> None:
        """Left to eviction: the cache is shared by every process of the
        cluster, and removing another instance's pages would be wrong."""

    def get_stats(self):
        return None
