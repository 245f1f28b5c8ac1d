"""flyfs from Python.

``flyfs.native``: native (zero-copy) I/O through the mount daemon's shared
memory, the USRBIO shape (docs/native-io.md). ``flyfs.kv``: the KV cache for
inference engines (docs/kv-cache.md), with adapters for SGLang
(``flyfs.sglang``) and LMCache (``flyfs.lmcache``). Both share the native
module ``flyfs._native``; ``import flyfs.kv`` to use the cache.
"""

from flyfs.native import Client, Completion, File, Iov, Ior

__all__ = ["Client", "Completion", "File", "Iov", "Ior"]
