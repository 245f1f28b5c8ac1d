"""The flyfs package's native I/O against a real mount.

The tests that need a mount run when FLYFS_NATIVE_SOCKET and FLYFS_MOUNT name
one (tests/native_e2e.rs runs this file so against its cluster); without them
they are skipped, saying so. The rest need nothing.
"""

import errno
import mmap
import os
import random

import pytest

import flyfs

SOCKET = os.environ.get("FLYFS_NATIVE_SOCKET")
MOUNT = os.environ.get("FLYFS_MOUNT")
needs_mount = pytest.mark.skipif(
    not (SOCKET and MOUNT), reason="FLYFS_NATIVE_SOCKET and FLYFS_MOUNT name no mount"
)


def test_a_missing_socket_is_an_error_naming_it(tmp_path):
    path = tmp_path / "no-such.sock"
    with pytest.raises(OSError) as raised:
        flyfs.Client(path)
    assert raised.value.errno == errno.ENOENT
    assert str(path) in str(raised.value)


def test_completion_check():
    assert flyfs.Completion(1, 4096).check() == 4096
    with pytest.raises(OSError) as raised:
        flyfs.Completion(2, -errno.EFAULT).check()
    assert raised.value.errno == errno.EFAULT


@needs_mount
def test_reads_land_in_the_memoryview_without_a_copy():
    contents = random.Random(7).randbytes(3 << 20)
    path = os.path.join(MOUNT, "python-read")
    with open(path, "wb") as f:
        f.write(contents)
    client = flyfs.Client(SOCKET)
    iov = client.iov(8 << 20)
    ior = client.ior(64)
    with open(path, "rb") as f:
        file = client.register(f)
    assert file.length == len(contents)
    offsets = [i * 40960 for i in range(64)]
    for i, offset in enumerate(offsets):
        ior.prepare_read(file, iov, i * 4096, 4096, offset, user_data=i)
    assert ior.submit() == 64
    done = []
    while len(done) < 64:
        done += ior.wait(1, timeout=60)
    view = iov.buffer
    for c in done:
        assert c.check() == 4096
        o = offsets[c.user_data]
        assert view[c.user_data * 4096:(c.user_data + 1) * 4096] == contents[o:o + 4096]
    # The same memory through a second mapping of the memfd: shared, not copied.
    other = mmap.mmap(iov._native.fileno(), iov.size)
    assert other[0:4096] == contents[0:4096]
    try:
        import numpy
    except ImportError:
        numpy = None
    if numpy is not None:
        array = iov.numpy()
        assert bytes(array[0:16]) == contents[0:16]
    file.close()


@needs_mount
def test_writes_are_seen_through_fuse_after_a_flush():
    path = os.path.join(MOUNT, "python-write")
    data = random.Random(8).randbytes((1 << 20) + 17)
    client = flyfs.Client(SOCKET)
    iov = client.iov(4 << 20)
    ior = client.ior(8)
    with open(path, "wb+") as f:
        file = client.register(f)
    iov.buffer[0:len(data)] = data
    ior.prepare_write(file, iov, 0, len(data), 0, user_data=1)
    ior.prepare_flush(file, user_data=2)
    ior.submit()
    results = {}
    while len(results) < 2:
        for c in ior.wait(1, timeout=60):
            results[c.user_data] = c.result
    # A flush is not ordered after the write it was submitted with; the
    # close below is, and waits for both.
    assert results[1] == len(data)
    file.close()
    with open(path, "rb") as f:
        assert f.read() == data


@needs_mount
def test_bad_requests_fail_alone():
    path = os.path.join(MOUNT, "python-bad")
    with open(path, "wb") as f:
        f.write(b"x" * 8192)
    client = flyfs.Client(SOCKET)
    iov = client.iov(1 << 20)
    ior = client.ior(4)
    with open(path, "rb") as f:
        file = client.register(f)
    ior.prepare_read(file, iov, (1 << 20) - 10, 4096, 0, user_data=1)
    ior.submit()
    (c,) = ior.wait(1, timeout=60)
    assert c.result == -errno.EFAULT
    assert "outside iov" in ior.last_error()
    ior.prepare_write(file, iov, 0, 10, 0, user_data=2)
    ior.submit()
    (c,) = ior.wait(1, timeout=60)
    assert c.result == -errno.EBADF
    with pytest.raises(OSError) as raised:
        ior.wait(1, timeout=1)
    assert raised.value.errno == errno.EINVAL, "waiting for more than was submitted"
    with open("/proc/self/status", "rb") as outside:
        with pytest.raises(OSError) as raised:
            client.register(outside)
    assert raised.value.errno == errno.EXDEV
    file.close()
