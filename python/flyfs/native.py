"""Native (zero-copy) I/O: shared buffers, rings and registered files.

A ``Client`` connects to the mount daemon's socket (the mount config's
``native_socket``; ``flyfs up`` puts it at ``DATA/run/native.sock``)::

    import flyfs
    client = flyfs.Client("/path/to/native.sock")
    iov = client.iov(64 << 20)            # shared buffer: iov.buffer is a memoryview
    ior = client.ior(64)                  # one ring per thread
    with open("/mnt/flyfs/data", "rb") as f:
        file = client.register(f)         # files opened through the mount
    ior.prepare_read(file, iov, 0, 1 << 20, 0, user_data=1)
    ior.submit()
    for c in ior.wait(1):                 # Completion(user_data, result)
        data = iov.buffer[: c.result]     # no copy
    file.close()                          # flush, length fixed, session ended

``iov.buffer`` is a ``memoryview`` of the daemon's shared memory (this
process maps the same memfd), and ``iov.numpy()`` a numpy array over it when
numpy is installed; neither copies. Bytes under a request in flight belong
to the daemon until its completion is returned by ``wait``.

Every failure is an ``OSError`` with an errno and flyfs's message; a failed
request is a completion with a negative ``result`` (``-errno``), and
``ior.last_error()`` says why.
"""

import mmap
import os
from typing import List, NamedTuple, Optional, Union

from flyfs import _native

__all__ = ["Client", "Completion", "File", "Iov", "Ior"]


class Completion(NamedTuple):
    """A finished request: bytes moved, or ``-errno``."""

    user_data: int
    result: int

    def ok(self) -> bool:
        return self.result >= 0

    def check(self) -> int:
        """The bytes moved; raises ``OSError`` for a failed request."""
        if self.result < 0:
            raise OSError(-self.result, os.strerror(-self.result))
        return self.result


class Iov:
    """A registered shared buffer."""

    def __init__(self, native: "_native.Iov"):
        self._native = native
        # Python maps the same memfd: the memoryview is the shared memory.
        self._map = mmap.mmap(native.fileno(), native.size)
        self.buffer = memoryview(self._map)

    @property
    def id(self) -> int:
        return self._native.id

    @property
    def size(self) -> int:
        return self._native.size

    def numpy(self, dtype="uint8"):
        """A numpy array over the buffer (no copy); needs numpy."""
        import numpy

        return numpy.frombuffer(self._map, dtype=dtype)

    def close(self) -> None:
        """Deregisters the buffer once nothing here refers to it."""
        self.buffer.release()
        self._map.close()
        self._native = None


class File:
    """A file registered by descriptor."""

    def __init__(self, native: "_native.File"):
        self._native = native

    @property
    def id(self) -> int:
        return self._native.id

    @property
    def length(self) -> int:
        """The file's length when it was registered."""
        return self._native.length

    def close(self) -> None:
        """Flushes to every replica, fixes the length, ends the session."""
        self._native.close()

    def __enter__(self) -> "File":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


class Ior:
    """A submission/completion ring; use one per thread."""

    def __init__(self, native: "_native.Ior"):
        self._native = native

    @property
    def entries(self) -> int:
        return self._native.entries

    def prepare_read(self, file: File, iov: Iov, iov_offset: int, length: int,
                     file_offset: int, user_data: int = 0) -> None:
        self._native.prepare_read(file._native, iov._native, iov_offset, length,
                                  file_offset, user_data)

    def prepare_write(self, file: File, iov: Iov, iov_offset: int, length: int,
                      file_offset: int, user_data: int = 0) -> None:
        self._native.prepare_write(file._native, iov._native, iov_offset, length,
                                   file_offset, user_data)

    def prepare_flush(self, file: File, user_data: int = 0) -> None:
        self._native.prepare_flush(file._native, user_data)

    def submit(self) -> int:
        return self._native.submit()

    def wait(self, min: int = 1, timeout: Optional[float] = None) -> List[Completion]:
        """At least ``min`` completions (all that are ready), or ``OSError``
        (``ETIMEDOUT``) after ``timeout`` seconds."""
        return [Completion(u, r) for u, r in self._native.wait(min, timeout)]

    def last_error(self) -> str:
        return self._native.last_error()


class Client:
    """A connection to the mount daemon's native I/O socket."""

    def __init__(self, socket_path: Union[str, os.PathLike]):
        self._native = _native.Client(os.fspath(socket_path))

    def iov(self, size: int) -> Iov:
        return Iov(self._native.iov(size))

    def ior(self, entries: int = 64) -> Ior:
        return Ior(self._native.ior(entries))

    def register(self, file) -> File:
        """Registers a file opened through the mount: a file object or a
        descriptor number. The file may be closed afterwards."""
        fd = file if isinstance(file, int) else file.fileno()
        return File(self._native.register(fd))
