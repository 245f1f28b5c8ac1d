"""LMCache's native connector protocol over the flyfs KV cache.

LMCache drives a native storage connector through six methods (its
``csrc/storage_backends`` connectors bound by pybind, and the
``NativeConnectorL2Adapter`` bridge in multiprocess mode):

* ``event_fd()``: a descriptor that becomes readable when completions wait;
* ``submit_batch_get(keys, memoryviews)``, ``submit_batch_set(keys,
  memoryviews)``, ``submit_batch_exists(keys)``: start a batch, return its
  future id at once (also ``submit_batch_delete(keys)``);
* ``drain_completions()``: every finished batch as ``(future_id, ok, error,
  per_key)`` tuples, clearing the descriptor;
* ``close()``.

``per_key`` is a list of booleans for gets (found, with exactly the
buffer's size), exists and deletes, and None for sets (``ok`` is whether
every block is stored; ``error`` names the ones that are not). A batch's
buffers are filled or sent in place (no copy on this side) by worker threads
that run without the GIL; they belong to flyfs until the batch's completion
is drained. So LMCache uses it as ``NativeConnectorL2Adapter(FlyfsConnector(
"/var/tmp/flyfs/etc/mount.toml"))``, or from its non-multiprocess client.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from flyfs.kv import KvCache, byte_view

__all__ = ["FlyfsConnector"]

Completion = Tuple[int, bool, str, Optional[List[bool]]]


class _Notifier:
    """An eventfd: readable while completions wait, cleared by draining."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def notify(self) -> None:
        os.eventfd_write(self._fd, 1)

    def clear(self) -> None:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass  # Nothing was signalled since the last drain.

    def close(self) -> None:
        os.close(self._fd)


class FlyfsConnector:
    """The flyfs KV cache as an LMCache native connector.

    ``cache`` is a ``flyfs.kv.KvCache`` or a mount config path to open one
    from (with ``kv_options`` for ``KvCache``); ``num_workers`` batches run
    at once.
    """

    def __init__(self, cache: Union[KvCache, str, os.PathLike], num_workers: int = 4, **kv_options: Any):
        if num_workers < 1:
            raise ValueError(f"num_workers {num_workers}: at least one worker is needed")
        self._cache = cache if isinstance(cache, KvCache) else KvCache(cache, **kv_options)
        self._notifier = _Notifier()
        self._workers = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="flyfs-lmcache")
        self._lock = threading.Lock()
        self._next_id = 1
        self._completions: List[Completion] = []
        self._closed = False

    def event_fd(self) -> int:
        return self._notifier.fileno()

    def _submit(self, keys: Sequence[str], work: Callable[[], Tuple[bool, str, Optional[List[bool]]]]) -> int:
        if not keys:
            raise ValueError("keys list is empty")
        with self._lock:
            if self._closed:
                raise ValueError("the connector was closed")
            future_id = self._next_id
            self._next_id += 1

        def run() -> None:
            try:
                ok, error, per_key = work()
            except Exception as e:  # The batch failed as a whole: say why.
                ok, error, per_key = False, f"{type(e).__name__}: {e}", None
            with self._lock:
                self._completions.append((future_id, ok, error, per_key))
            self._notifier.notify()

        self._workers.submit(run)
        return future_id

    def submit_batch_get(self, keys: Sequence[str], memoryviews: Sequence[Any]) -> int:
        if len(keys) != len(memoryviews):
            raise ValueError(f"{len(keys)} keys but {len(memoryviews)} buffers")
        keys, views = list(keys), list(memoryviews)

        def work():
            results = self._cache.batch_get_into(keys, views)
            per_key = [
                r.status == "found" and r.length == byte_view(v, i).nbytes
                for i, (r, v) in enumerate(zip(results, views))
            ]
            return all(per_key), _why(keys, results, per_key), per_key

        return self._submit(keys, work)

    def submit_batch_set(self, keys: Sequence[str], memoryviews: Sequence[Any]) -> int:
        if len(keys) != len(memoryviews):
            raise ValueError(f"{len(keys)} keys but {len(memoryviews)} buffers")
        keys, views = list(keys), list(memoryviews)

        def work():
            results = self._cache.batch_put_from(keys, views)
            stored = [r.ok for r in results]
            return all(stored), _why(keys, results, stored), None

        return self._submit(keys, work)

    def submit_batch_exists(self, keys: Sequence[str]) -> int:
        keys = list(keys)
        return self._submit(keys, lambda: (True, "", self._cache.batch_exists(keys)))

    def submit_batch_delete(self, keys: Sequence[str]) -> int:
        keys = list(keys)
        return self._submit(keys, lambda: (True, "", self._cache.batch_remove(keys)))

    def drain_completions(self) -> List[Completion]:
        self._notifier.clear()
        with self._lock:
            done, self._completions = self._completions, []
        return done

    def close(self) -> None:
        """Waits for the batches in flight, then drops the cache and the
        descriptor."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._workers.shutdown(wait=True)
        self._notifier.close()
        self._cache.close()


def _why(keys: Sequence[str], results: Sequence[Any], ok: Sequence[bool]) -> str:
    """The first few keys that failed, and why (empty when none did)."""
    failed = [
        f"{key}: {r.status}{' (' + r.error + ')' if r.error else ''}"
        for key, r, good in zip(keys, results, ok)
        if not good
    ]
    if len(failed) > 4:
        failed = failed[:4] + [f"and {len(failed) - 4} more"]
    return "; ".join(failed)
