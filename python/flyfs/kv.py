"""The KV cache for inference engines (docs/kv-cache.md), from Python.

Blocks of 64 KiB to a few MiB, keyed by a hash of a token prefix, live in
slots of large slot files on the cluster and are indexed in its metadata
store: every process of every machine sees every block, and a restart finds
them. The API is Mooncake Store's batched shape with a result per key::

    import flyfs.kv
    cache = flyfs.kv.KvCache("/var/tmp/flyfs/etc/mount.toml")
    results = cache.batch_put_from([b"prefix-1", "prefix-2"], [block1, block2])
    results = cache.batch_get_into(keys, buffers)   # Result(status, length, error)
    cache.batch_exists(keys)                        # [True, False, ...]
    cache.batch_remove(keys)                        # [True, False, ...]

The cache reaches the cluster itself (no mount needed): it reads the
managers, the metadata services and the client credentials from a mount
config (deploy/mount.toml; ``flyfs up`` writes one at ``DATA/etc/mount.toml``)
and connects with mutual TLS: to the storage nodes over RDMA when the config
says ``transport = "rdma"`` (its ``[rdma]`` table names the device), else
over TCP.

On RDMA, register one large buffer (a pinned numpy array, an ``mmap``) and
take the blocks' buffers from inside it: its batches then move one-sided,
the chains' heads pulling each put's block and the replicas writing each
get's block into its buffer, no byte through this process's CPU::

    arena = numpy.empty(1 << 30, dtype=numpy.uint8)
    with cache.register_buffer(arena):
        cache.batch_get_into(keys, [arena[i << 20:(i + 1) << 20] for i in range(32)])

Views outside a registered buffer still work, copied through the
connection's message slots. ``payload_moved()`` counts both.

Buffers are anything exporting the buffer protocol (``bytes``,
``bytearray``, ``memoryview``, numpy arrays) or CPU torch tensors; they are
read and written in place, never copied on the Python side, and the GIL is
released while a batch moves. A batch's buffers are flyfs's until the call
returns: do not write them from another thread meanwhile.

Keys are ``str`` (UTF-8) or bytes, 1 to 512 bytes. An unknown key is a
per-key ``missing``, never an exception; a buffer too small for its block is
a per-key ``too_small`` whose ``error`` names both sizes. Exceptions are for
the whole batch: ``ValueError`` for bad arguments (lengths differ, a bad key
or buffer, named by index), ``OSError`` when the cluster cannot answer.
"""

import os
import random
import tomllib
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

from flyfs import _native

__all__ = [
    "KvCache",
    "Result",
    "DEFAULT_CLASSES",
    "byte_view",
    "payload_moved",
    "read_mount_config",
]

#: Size classes a new cache is created with: (slot bytes, slots); 64 KiB to
#: 4 MiB slots, 4096 of each (about 21 GiB). The first opener's layout wins.
DEFAULT_CLASSES: Tuple[Tuple[int, int], ...] = (
    (64 << 10, 4096),
    (256 << 10, 4096),
    (1 << 20, 4096),
    (4 << 20, 4096),
)

Key = Union[str, bytes, bytearray, memoryview]


class Result(NamedTuple):
    """One key's outcome.

    ``status`` is ``stored`` or ``exists`` (puts: the first writer's block
    stays), ``found`` or ``missing`` (gets), or a failure: ``full`` (its
    size class is full and the cache does not evict), ``too_large``,
    ``too_small`` (the buffer), ``failed``; ``error`` says why. ``length``
    is the bytes the call moved: stored, or found at the start of the
    buffer (0 for ``exists``: the block there may be another size).
    """

    status: str
    length: int
    error: str

    @property
    def ok(self) -> bool:
        return self.status in ("stored", "exists", "found")


def _key_bytes(key: Key, index: int) -> bytes:
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"key {index} is a {type(key).__name__}: keys are str or bytes")


def byte_view(buffer: Any, index: int = 0) -> memoryview:
    """The buffer's bytes as a flat ``memoryview`` of format ``B`` over the
    same memory (no copy): what the native module takes."""
    module = type(buffer).__module__.split(".")[0]
    if module == "torch":
        import torch

        if buffer.device.type != "cpu":
            raise ValueError(f"buffer {index} is on {buffer.device}: the cache moves host memory")
        if not buffer.is_contiguous():
            raise ValueError(f"buffer {index} is not contiguous: the cache moves whole blocks")
        # A CPU tensor's numpy view shares its memory.
        buffer = buffer.reshape(-1).view(torch.uint8).numpy()
    try:
        view = memoryview(buffer)
    except TypeError:
        raise ValueError(
            f"buffer {index} is a {type(buffer).__name__}, which exports no buffer"
        ) from None
    if not view.c_contiguous:
        raise ValueError(f"buffer {index} is not contiguous: the cache moves whole blocks")
    if view.format == "B" and view.ndim == 1:
        return view
    try:
        return view.cast("B")
    except TypeError as e:
        raise ValueError(f"buffer {index} cannot be viewed as flat bytes: {e}") from None


def _toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise OSError(e.errno, f"cannot read the mount config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"the mount config {path} is not valid TOML: {e}") from None


def read_mount_config(path: Union[str, os.PathLike]) -> dict:
    """What the cache needs from a mount config: ``mgmt`` and ``meta``
    (lists of ``host:port``), ``client_id``, the ``tls`` paths (``ca``,
    ``cert``, ``key``) resolved beside the file, as the mount does, and
    ``rdma``: the ``[rdma]`` table when ``transport = "rdma"``, else None."""
    path = os.fspath(path)
    config = _toml(path)
    here = os.path.dirname(os.path.abspath(path))

    def addresses(key: str, default: List[str]) -> List[str]:
        value = config.get(key, default)
        if isinstance(value, str):
            value = [value]
        if not (isinstance(value, list) and value and all(isinstance(a, str) and a for a in value)):
            raise ValueError(f"{path}: key `{key}` must be a non-empty list of \"host:port\"")
        return value

    tls = config.get("tls")
    if not isinstance(tls, dict) or not all(isinstance(tls.get(k), str) for k in ("ca", "cert", "key")):
        raise ValueError(
            f"{path}: no [tls] table with ca, cert and key: every connection is authenticated"
        )
    client_id = config.get("client_id", 0)
    if not isinstance(client_id, int) or client_id < 0:
        raise ValueError(f"{path}: key `client_id` must be a non-negative integer")
    transport = config.get("transport", "tcp")
    if transport not in ("tcp", "rdma"):
        raise ValueError(f'{path}: key `transport` must be "tcp" or "rdma", not {transport!r}')
    rdma = config.get("rdma", {})
    if not isinstance(rdma, dict):
        raise ValueError(f"{path}: `rdma` must be a table")
    return {
        "rdma": dict(rdma) if transport == "rdma" else None,
        "mgmt": addresses("mgmt", ["127.0.0.1:7000"]),
        "meta": addresses("meta", ["127.0.0.1:7001"]),
        "client_id": client_id,
        "tls": {k: os.path.join(here, tls[k]) for k in ("ca", "cert", "key")},
    }


class KvCache:
    """The cluster's KV cache, opened from a mount config.

    ``client_id`` names this process in write sessions; every process of a
    cluster needs its own, so by default it is random (the config's
    ``client_id`` belongs to its mount). ``classes``, ``max_age_ms`` (evict
    blocks not read for this long; 0: never) and ``chain_table`` are the
    layout a new cache is created with; an existing cache keeps its own
    (see ``classes`` and ``max_age_ms`` here). ``evict_when_full``: a full
    size class evicts its least recently used blocks rather than answering
    ``full``.
    """

    def __init__(
        self,
        config: Union[str, os.PathLike],
        *,
        client_id: Optional[int] = None,
        op_deadline: float = 30.0,
        classes: Sequence[Tuple[int, int]] = DEFAULT_CLASSES,
        chain_table: int = 1,
        max_age_ms: int = 0,
        evict_when_full: bool = True,
    ):
        mount = read_mount_config(config)
        if client_id is None:
            client_id = random.SystemRandom().randrange(1, 1 << 63)
        tls = mount["tls"]
        self._native = _native.KvCache(
            mount["mgmt"],
            mount["meta"],
            tls["ca"],
            tls["cert"],
            tls["key"],
            client_id,
            float(op_deadline),
            [(int(b), int(n)) for b, n in classes],
            int(chain_table),
            int(max_age_ms),
            bool(evict_when_full),
            mount["rdma"],
        )

    def _cache(self) -> "_native.KvCache":
        if self._native is None:
            raise ValueError("the KV cache was closed")
        return self._native

    @property
    def block_bytes_max(self) -> int:
        """The largest block the cache takes."""
        return self._cache().block_bytes_max

    @property
    def classes(self) -> List[Tuple[int, int]]:
        """The cache's size classes as stored: (slot bytes, slots)."""
        return self._cache().classes

    @property
    def max_age_ms(self) -> int:
        return self._cache().max_age_ms

    @property
    def rdma(self) -> bool:
        """Whether blocks move to and from the storage nodes over RDMA."""
        return self._cache().rdma

    def register_buffer(self, buffer: Any) -> "_native.Registration":
        """Pins ``buffer`` (writable, contiguous, not empty) until the
        returned registration is closed (``close()``, or a ``with`` block)
        and, on RDMA, registers it with the device: batches whose buffers
        are views inside it then move one-sided (``one_sided`` says so).
        Close it when no batch over it is in flight: a storage node's
        transfer into or out of a deregistered buffer fails (the batch is
        retried or fails), and nothing writes the buffer after that."""
        return self._cache().register_buffer(byte_view(buffer))

    def batch_put_from(self, keys: Sequence[Key], buffers: Sequence[Any]) -> List[Result]:
        """Stores ``buffers[i]`` under ``keys[i]``: ``stored``, or ``exists``
        when the key was cached already (the first writer wins)."""
        native = self._cache()
        keys = [_key_bytes(k, i) for i, k in enumerate(keys)]
        views = [byte_view(b, i) for i, b in enumerate(buffers)]
        return [Result(*r) for r in native.batch_put_from(keys, views)]

    def batch_get_into(self, keys: Sequence[Key], buffers: Sequence[Any]) -> List[Result]:
        """Reads each key's block into the start of its buffer: ``found``
        (``length`` bytes), ``missing``, or ``too_small``."""
        native = self._cache()
        keys = [_key_bytes(k, i) for i, k in enumerate(keys)]
        views = [byte_view(b, i) for i, b in enumerate(buffers)]
        return [Result(*r) for r in native.batch_get_into(keys, views)]

    def batch_exists(self, keys: Sequence[Key]) -> List[bool]:
        native = self._cache()
        return native.batch_exists([_key_bytes(k, i) for i, k in enumerate(keys)])

    def batch_remove(self, keys: Sequence[Key]) -> List[bool]:
        """Removes each key; whether it was cached."""
        native = self._cache()
        return native.batch_remove([_key_bytes(k, i) for i, k in enumerate(keys)])

    def evict_aged(self) -> Tuple[int, int]:
        """Evicts blocks past the age limit now, and takes back slots of
        writers that never committed: (evicted, reclaimed). The metadata
        service does this on its own schedule too."""
        return self._cache().evict_aged()

    def close(self) -> None:
        """Drops the connections (also when the object is collected)."""
        self._native = None

    def __enter__(self) -> "KvCache":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def payload_moved() -> dict:
    """Payload bytes this process moved, by RPC method:
    ``{method: (one_sided, copied, in_place)}``. A KV put is
    ``storage.Write``, a get ``storage.BatchRead``."""
    return _native.payload_moved()
