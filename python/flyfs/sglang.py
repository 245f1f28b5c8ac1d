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
``batch_set``, ``exists``, ``batch_exists``, ``register_mem_pool_host``,
and the zero-copy ``batch_get_v1`` and ``batch_set_v1``. Values and targets are CPU
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

With ``"interface_v1": 1`` in the extra config SGLang calls
``batch_get_v1(keys, host_indices)`` and ``batch_set_v1(keys, host_indices)``
instead: no tensors, only the pool's token indices of each page. The backend
asks the pool where each page lies (``get_page_buffer_meta``, as SGLang's
Mooncake backend does) and moves the page straight between the storage
nodes and the pool, one-sided on RDMA. An address is used only inside the
pool's ``kv_buffer``: a page whose buffer lies anywhere else fails, logged,
and nothing outside the pool is read or written. An MLA page is one block
(the same block the copying calls store, so either interface finds it); an
MHA page is two, its K and V halves (``<key>/k``, ``<key>/v``), and
``batch_exists`` then asks for both. The zero-copy calls need the
page-first layouts, whose page is one buffer per half.
"""

import ctypes
import logging
import os
from typing import Any, List, Optional, Tuple

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


def _log_unused(key: str, result: Any, room: int) -> None:
    """Says why a page was not used, unless it was simply not stored."""
    if result.status == "found":
        logger.warning(
            "flyfs HiCache: page %s has %d bytes, its place %d: not used", key, result.length, room,
        )
    elif result.status != "missing":
        logger.warning("flyfs HiCache: page %s: %s (%s)", key, result.status, result.error)


def _address(view: memoryview) -> int:
    """Where a writable byte view's first byte is."""
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


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
        # The pool's buffers as (address, view): where the v1 calls' pages may lie.
        self._pool: List[Tuple[int, memoryview]] = []
        self._v1 = bool(extra.get("interface_v1", 0))
        # The blocks of one page in the v1 calls: MLA's page is one buffer,
        # MHA's its K and V halves.
        mla = bool(getattr(storage_config, "is_mla_model", False))
        self._halves = [""] if mla else ["/k", "/v"]
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
        unregistered: its pages are then copied through the connection.
        The buffers are held (exported) from here on, so the addresses the
        pool gives the v1 calls stay inside them."""
        self.mem_pool_host = mem_pool_host
        for registration in self._registrations:
            registration.close()
        self._registrations = []
        self._pool = []
        buffers = getattr(mem_pool_host, "kv_buffer", None)
        if buffers is None:
            return
        if not isinstance(buffers, (list, tuple)):
            buffers = [buffers]
        for i, buffer in enumerate(buffers):
            try:
                view = byte_view(buffer, i)
                self._pool.append((_address(view), view))
            except (ValueError, TypeError) as e:
                logger.warning(
                    "flyfs HiCache: kv_buffer %d of the host pool is not writable host memory, "
                    "the zero-copy calls cannot use it: %s", i, e,
                )
        if not self.cache.rdma:
            return
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
            _log_unused(key, result, len(view))
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

    def _pool_view(self, address: int, size: int) -> Optional[memoryview]:
        for base, view in self._pool:
            offset = address - base
            if size > 0 and 0 <= offset and offset + size <= len(view):
                return view[offset:offset + size]
        return None

    def _page_blocks(self, keys: List[str], host_indices: Any) -> List[Tuple[int, str, Optional[memoryview]]]:
        """Each page's blocks as (page, block key, view of the pool or None
        when the pool named memory outside its buffers)."""
        pool = self.mem_pool_host
        if pool is None or not hasattr(pool, "get_page_buffer_meta"):
            raise RuntimeError(
                "batch_get_v1 and batch_set_v1 need the host KV pool (register_mem_pool_host) "
                "and its get_page_buffer_meta"
            )
        page_size = int(getattr(pool, "page_size", 1) or 1)
        if len(host_indices) != len(keys) * page_size:
            raise ValueError(
                f"{len(keys)} pages of {page_size} tokens need {len(keys) * page_size} host "
                f"indices, got {len(host_indices)}"
            )
        addresses, sizes = pool.get_page_buffer_meta(host_indices)
        halves = self._halves
        if len(addresses) != len(keys) * len(halves) or len(sizes) != len(addresses):
            raise ValueError(
                f"the host pool (layout {getattr(pool, 'layout', None)!r}) gives "
                f"{len(addresses)} buffers and {len(sizes)} sizes for {len(keys)} pages; the "
                f"zero-copy calls take {len(halves)} per page, as the page_first layouts give: "
                "use one, or leave interface_v1 off to copy pages"
            )
        blocks = []
        for i, key in enumerate(keys):
            for j, half in enumerate(halves):
                n = i * len(halves) + j
                address, size = int(addresses[n]), int(sizes[n])
                view = self._pool_view(address, size)
                if view is None:
                    logger.error(
                        "flyfs HiCache: page %s%s: the pool names %d bytes at %#x, outside its "
                        "kv_buffer: not moved", key, half, size, address,
                    )
                blocks.append((i, self._key(key) + half, view))
        return blocks

    def _batch_v1(self, keys: List[str], host_indices: Any, put: bool) -> List[bool]:
        blocks = self._page_blocks(keys, host_indices)
        ok = [True] * len(keys)
        for page, _, view in blocks:
            if view is None:
                ok[page] = False
        usable = [(page, key, view) for page, key, view in blocks if ok[page]]
        if not usable:
            return ok
        block_keys = [key for _, key, _ in usable]
        views = [view for _, _, view in usable]
        if put:
            results = self.cache.batch_put_from(block_keys, views)
        else:
            results = self.cache.batch_get_into(block_keys, views)
        for (page, key, view), result in zip(usable, results):
            done = result.ok if put else result.status == "found" and result.length == len(view)
            if not done:
                ok[page] = False
                _log_unused(key, result, len(view))
        return ok

    def batch_get_v1(self, keys: List[str], host_indices: Any, extra_info: Optional[Any] = None) -> List[bool]:
        """Reads each page into the pool at its host indices; per page, True
        when every block of it was found and filled its place."""
        return self._batch_v1(keys, host_indices, put=False) if keys else []

    def batch_set_v1(self, keys: List[str], host_indices: Any, extra_info: Optional[Any] = None) -> List[bool]:
        """Stores each page from the pool at its host indices; per page, True
        when every block of it is stored (or was already)."""
        return self._batch_v1(keys, host_indices, put=True) if keys else []

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: List[str], extra_info: Optional[Any] = None) -> int:
        """How many keys from the first are stored, without a gap (the
        prefix SGLang can load). With interface_v1, every block of a page."""
        if not keys:
            return 0
        halves = self._halves if self._v1 else [""]
        found = self.cache.batch_exists([self._key(k) + h for k in keys for h in halves])
        pages = [all(found[i * len(halves):(i + 1) * len(halves)]) for i in range(len(keys))]
        return next((i for i, hit in enumerate(pages) if not hit), len(keys))

    def clear(self) -> None:
        """Left to eviction: the cache is shared by every process of the
        cluster, and removing another instance's pages would be wrong."""

    def get_stats(self):
        return None
