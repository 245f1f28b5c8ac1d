//! The operating-system calls of native I/O that need `unsafe`, each behind
//! a safe type: a mapping of shared memory ([`SharedMemory`]) that can only
//! be read and written through bounds-checked copies and aligned atomics,
//! and receiving descriptors passed with `SCM_RIGHTS` ([`recv_with_fds`]),
//! each owned the moment it arrives so none can leak.
//!
//! This is the only module of the crate allowed `unsafe` code
//! (scripts/check-layout names it; ARCHITECTURE.md, "Where unsafe lives").
//! Everything else, the daemon side included, goes through these types.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

/// A `MAP_SHARED` read-write mapping of a whole descriptor, unmapped on drop.
///
/// The memory is shared with another process, which may write it at any
/// time: nothing here hands out a Rust reference to bytes, only copies (and
/// references to atomics, which are made for exactly that). The size is
/// fixed at mapping time; the caller must make sure the file cannot shrink
/// below it (a sealed memfd), or an access could fault (SIGBUS).
#[derive(Debug)]
pub struct SharedMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; every access
// goes through atomics or copies that tolerate concurrent writers (another
// process writes it anyway), so sharing it between threads adds nothing.
unsafe impl Send for SharedMemory {}
// SAFETY: as above.
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// Maps `len` bytes of `fd` from offset 0, readable and writable, shared.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<SharedMemory> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot map 0 bytes",
            ));
        }
        // SAFETY: a fresh mapping chosen by the kernel (no address given), of
        // a descriptor that stays valid for the call; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(SharedMemory { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte, for callers that hand the memory to the kernel or a
    /// device (a registered RDMA region) or to a language binding.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Whether `offset..offset + len` lies inside the mapping.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.len as u64)
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<usize> {
        if self.contains(offset, len as u64) {
            Ok(offset as usize)
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bytes {offset}..{offset}+{len} are outside the {} bytes mapped",
                    self.len
                ),
            ))
        }
    }

    /// Copies `into.len()` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: u64, into: &mut [u8]) -> io::Result<()> {
        let start = self.check(offset, into.len())?;
        // SAFETY: the range is inside the mapping (checked), which lives as
        // long as `self`; `into` is ordinary memory of this process and cannot
        // overlap a mapping it does not know. Bytes another process writes
        // meanwhile arrive torn at worst, which callers treat as data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(start),
                into.as_mut_ptr(),
                into.len(),
            );
        }
        Ok(())
    }

    /// Copies `from` into the mapping at `offset`.
    pub fn write(&self, offset: u64, from: &[u8]) -> io::Result<()> {
        let start = self.check(offset, from.len())?;
        // SAFETY: as in `read`, in the other direction.
        unsafe {
            std::ptr::copy_nonoverlapping(from.as_ptr(), self.ptr.as_ptr().add(start), from.len());
        }
        Ok(())
    }

    /// The `u32` at `offset` as an atomic, if it is inside the mapping and
    /// aligned.
    pub fn atomic_u32(&self, offset: u64) -> Option<&AtomicU32> {
        if !self.contains(offset, 4) || !offset.is_multiple_of(4) {
            return None;
        }
        // SAFETY: inside the mapping and 4-aligned (the mapping is page
        // aligned); the reference lives no longer than `self`, so the mapping
        // outlives it. An `AtomicU32` has the size and alignment of a `u32`
        // and is meant for memory other threads (here processes) write.
        Some(unsafe { &*self.ptr.as_ptr().add(offset as usize).cast::<AtomicU32>() })
    }
}

/// A range of a shared mapping lent to a transfer as memory of its own: a
/// send reads the range, a reply's payload is read from the connection into
/// it (flyfs-rpc's landing), with no copy through memory of the daemon's.
/// It holds the mapping, so the range stays mapped while any transfer
/// holds it, whatever the application does with its registration.
///
/// This is the one place the daemon makes Rust references to bytes another
/// process shares: `AsRef`/`AsMut` hand them only to byte movers (the
/// socket's `read`, TLS's encryption and decryption, CRC32C), which take
/// whatever bytes are there as data; nothing decides anything from them.
/// The application writing the range meanwhile gets torn bytes (a CRC
/// mismatch that fails the request), never the daemon's memory; two
/// requests whose ranges overlap each move their bytes into the same
/// memory, as two DMA transfers into one buffer would.
#[derive(Debug)]
pub struct SharedSlice {
    memory: std::sync::Arc<SharedMemory>,
    start: usize,
    len: usize,
}

impl SharedSlice {
    /// `len` bytes of `memory` at `offset`, or `None` when they are not
    /// all inside it.
    pub fn new(
        memory: std::sync::Arc<SharedMemory>,
        offset: u64,
        len: usize,
    ) -> Option<SharedSlice> {
        let start = memory.check(offset, len).ok()?;
        Some(SharedSlice { memory, start, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AsRef<[u8]> for SharedSlice {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the range is inside the mapping (checked by `new`), which
        // the `Arc` keeps mapped for as long as `self`, and so the slice,
        // lives. Another process may write the bytes meanwhile: see the
        // type's comment for why byte movers may read them so.
        unsafe { std::slice::from_raw_parts(self.memory.ptr.as_ptr().add(self.start), self.len) }
    }
}

impl AsMut<[u8]> for SharedSlice {
    fn as_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_ref`; the mapping is writable (`map` maps it
        // read-write), and bytes written here are what the application
        // asked to be given (see the type's comment on overlaps).
        unsafe {
            std::slice::from_raw_parts_mut(self.memory.ptr.as_ptr().add(self.start), self.len)
        }
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map` with this length and nothing
        // refers to it any more (references from `atomic_u32` borrow `self`).
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap of our own mapping");
    }
}

/// The most descriptors one message may carry; more are refused (and
/// closed by the kernel or here).
pub const FDS_MAX: usize = 4;

/// One datagram received from `socket` into `buf`, with the descriptors that
/// came with it, each owned (closed on drop) and close-on-exec. Returns the
/// datagram's length (0: the peer closed) and whether the datagram or its
/// descriptors were cut short (too long for `buf`, more than [`FDS_MAX`]
/// descriptors); the caller refuses such a message.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    // Room for FDS_MAX descriptors, aligned as a cmsghdr wants.
    let mut control = [0u64; 8];
    const _: () = assert!(std::mem::size_of::<libc::cmsghdr>() + FDS_MAX * 4 <= 64);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` points at live buffers of the lengths
    // given, which outlive the call.
    let received =
        unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by the kernel; CMSG_FIRSTHDR/NXTHDR stay
    // inside `msg_controllen`, and each SCM_RIGHTS payload holds
    // `(cmsg_len - CMSG_LEN(0)) / 4` descriptors that are now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let truncated = msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0;
    Ok((received as usize, fds, truncated))
}

/// Accepts a connection on a non-blocking listening socket: the new socket,
/// non-blocking and close-on-exec, or the error (`WouldBlock` when none is
/// waiting).
pub fn accept_nonblocking(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: no address is asked for (null pointers are allowed); the
    // descriptor returned is new and owned by nobody else.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above, `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec duplicate of descriptor number `fd`, owned: for
/// bindings that are handed plain numbers (Python's `fileno()`). Any number
/// is safe to try: one that is not open is `EBADF`.
pub fn duplicate(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC reads no memory; it fails on a number that is
    // not an open descriptor, and otherwise returns a new descriptor that
    // only we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above, `new` is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Whether `fd` is an eventfd (the kernel names its anonymous inode so).
pub fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_atomics_stay_inside_the_mapping() {
        let file = tempfile_fd(8192);
        let mem = SharedMemory::map(file.as_fd(), 8192).expect("map");
        mem.write(8000, &[7; 192]).expect("inside");
        let mut back = [0u8; 192];
        mem.read(8000, &mut back).expect("inside");
        assert_eq!(back, [7; 192]);
        assert!(mem.write(8001, &[0; 192]).is_err());
        assert!(mem.read(u64::MAX - 2, &mut [0; 4]).is_err());
        assert!(mem.atomic_u32(8188).is_some());
        assert!(mem.atomic_u32(8190).is_none(), "unaligned");
        assert!(mem.atomic_u32(8192).is_none(), "outside");
    }

    #[test]
    fn a_slice_is_the_mapping_s_bytes_and_stays_inside_it() {
        let file = tempfile_fd(8192);
        let mem = std::sync::Arc::new(SharedMemory::map(file.as_fd(), 8192).expect("map"));
        assert!(
            SharedSlice::new(mem.clone(), 8000, 193).is_none(),
            "past the end"
        );
        assert!(
            SharedSlice::new(mem.clone(), u64::MAX, 1).is_none(),
            "overflow"
        );
        let mut slice = SharedSlice::new(mem.clone(), 4096, 100).expect("inside");
        slice.as_mut().fill(9);
        let mut back = [0u8; 102];
        mem.read(4095, &mut back).expect("inside");
        assert_eq!(back[0], 0);
        assert!(back[1..101].iter().all(|b| *b == 9));
        assert_eq!(back[101], 0);
        mem.write(4096, &[1, 2, 3]).expect("inside");
        assert_eq!(&slice.as_ref()[..3], &[1, 2, 3]);
        // The slice keeps the mapping alive past its other owners.
        drop(mem);
        assert_eq!(slice.as_ref().len(), 100);
        assert_eq!(slice.as_ref()[3], 9);
    }

    fn tempfile_fd(len: i64) -> OwnedFd {
        let fd = nix::sys::memfd::memfd_create(c"os-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        nix::unistd::ftruncate(&fd, len).expect("ftruncate");
        fd
    }
}
