"""flyfs from Python.

``flyfs.native``: native (zero-copy) I/O through the mount daemon's shared
memory, the USRBIO shape (docs/native-io.md). The KV cache's bindings are to
come beside it as ``flyfs.kv``; both share the native module ``flyfs._native``.
"""

from flyfs.native import Client, Completion, File, Iov, Ior

__all__ = ["Client", "Completion", "File", "Iov", "Ior"]
