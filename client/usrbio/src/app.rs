//! The application's side of native I/O: connect to the mount daemon's
//! socket ([`Client`]), register a shared buffer ([`Iov`]), create rings
//! ([`Ior`], one per thread) and register files opened through the mount
//! ([`RegisteredFile`]); then prepare reads and writes, submit, and wait for
//! completions. docs/native-io.md has the protocol.
//!
//! Registrations end when their value is dropped (or the [`Client`]'s
//! connection closes, which the kernel does when the process dies). A
//! [`RegisteredFile`] is best closed with [`RegisteredFile::close`], which
//! reports whether its writes reached storage; a drop cannot.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, connect, sendmsg, socket,
};
use parking_lot::Mutex;

use crate::NativeError;
use crate::memory::create_sealed;
use crate::os::{SharedMemory, recv_with_fds};
use crate::ring::{Cqe, Ring, STATE_FAILED, Sqe, SqeOp, region_bytes};
use crate::wire::{MESSAGE_BYTES_MAX, Op, REPLY_HEADER_BYTES, Reply, Request};

/// One connection to the mount daemon's native I/O socket; cheap to clone,
/// shared by every registration made through it.
#[derive(Clone, Debug)]
pub struct Client {
    connection: Arc<Connection>,
}

#[derive(Debug)]
struct Connection {
    /// Requests and replies go in pairs under this lock.
    socket: Mutex<OwnedFd>,
    /// The same socket, polled without the lock by waiters for its hangup:
    /// a daemon that died cannot say so in the ring.
    hangup: OwnedFd,
}

impl Connection {
    fn call(&self, op: Op, id: u32, fds: &[BorrowedFd<'_>]) -> Result<Reply, NativeError> {
        debug_assert_eq!(
            fds.len(),
            op.fds(),
            "{} carries {} fds",
            op.name(),
            op.fds()
        );
        let request = Request { op, id }.encode();
        let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let control = [ControlMessage::ScmRights(&raw)];
        let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &control };
        let socket = self.socket.lock();
        sendmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &[IoSlice::new(&request)],
            control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| NativeError::os("sending a request to the mount daemon", e))?;
        let mut buf = vec![0u8; REPLY_HEADER_BYTES + MESSAGE_BYTES_MAX + 1];
        let (len, _fds, truncated) = loop {
            match recv_with_fds(socket.as_fd(), &mut buf, 0) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        }
        .map_err(|source| NativeError::Io {
            what: "receiving the mount daemon's reply",
            source,
        })?;
        if len == 0 {
            return Err(NativeError::Disconnected);
        }
        if truncated {
            return Err(NativeError::Protocol(format!(
                "the daemon's reply to {} is longer than {} bytes",
                op.name(),
                buf.len() - 1
            )));
        }
        let reply = Reply::decode(&buf[..len]).map_err(|e| {
            NativeError::Protocol(format!("the daemon's reply to {}: {e}", op.name()))
        })?;
        if reply.status != 0 {
            return Err(NativeError::Refused {
                op: op.name(),
                errno: reply.status as i32,
                message: reply.message,
            });
        }
        Ok(reply)
    }

    /// Deregistration when a value is dropped: errors have nobody to go to
    /// (the daemon also drops everything when the connection closes).
    fn forget(&self, op: Op, id: u32) {
        let _ = self.call(op, id, &[]);
    }
}

impl Client {
    /// Connects to the daemon's socket (the mount config's `native_socket`).
    pub fn connect(socket_path: impl AsRef<Path>) -> Result<Client, NativeError> {
        let path = socket_path.as_ref();
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| NativeError::os("creating a Unix socket", e))?;
        let address = UnixAddr::new(path)
            .map_err(|e| NativeError::Argument(format!("socket path {}: {e}", path.display())))?;
        connect(fd.as_raw_fd(), &address).map_err(|e| NativeError::Connect {
            path: path.to_path_buf(),
            source: std::io::Error::from(e),
        })?;
        let hangup = fd.try_clone().map_err(|e| NativeError::Io {
            what: "duplicating the socket",
            source: e,
        })?;
        Ok(Client {
            connection: Arc::new(Connection {
                socket: Mutex::new(fd),
                hangup,
            }),
        })
    }

    /// A shared buffer of `len` bytes (a sealed memfd), registered.
    pub fn register_iov(&self, len: u64) -> Result<Iov, NativeError> {
        let fd = create_sealed(c"flyfs-iov", len)?;
        let mem =
            SharedMemory::map(fd.as_fd(), len as usize).map_err(|source| NativeError::Io {
                what: "mapping the iov",
                source,
            })?;
        let reply = self.connection.call(Op::RegisterIov, 0, &[fd.as_fd()])?;
        Ok(Iov {
            connection: self.connection.clone(),
            id: reply.id,
            mem,
            fd,
        })
    }

    /// Registers shared memory the application made itself (a hugetlb
    /// memfd, say). The daemon accepts only a memfd sealed against shrinking
    /// (`F_SEAL_SHRINK`); anything else is refused with the reason.
    pub fn register_iov_fd(&self, fd: OwnedFd) -> Result<Iov, NativeError> {
        let stat = nix::sys::stat::fstat(fd.as_fd())
            .map_err(|e| NativeError::os("fstat of the iov", e))?;
        let len = stat.st_size.max(0) as usize;
        let mem = SharedMemory::map(fd.as_fd(), len).map_err(|source| NativeError::Io {
            what: "mapping the iov",
            source,
        })?;
        let reply = self.connection.call(Op::RegisterIov, 0, &[fd.as_fd()])?;
        Ok(Iov {
            connection: self.connection.clone(),
            id: reply.id,
            mem,
            fd,
        })
    }

    /// A ring of `entries` entries (a power of two, at most 4096), registered.
    pub fn create_ior(&self, entries: u32) -> Result<Ior, NativeError> {
        // Whole pages, and never below the daemon's minimum region.
        let len = region_bytes(entries.clamp(1, crate::ring::ENTRIES_MAX))
            .max(crate::wire::REGION_BYTES_MIN)
            .next_multiple_of(4096);
        let fd = create_sealed(c"flyfs-ior", len)?;
        let mem =
            SharedMemory::map(fd.as_fd(), len as usize).map_err(|source| NativeError::Io {
                what: "mapping the ring",
                source,
            })?;
        let ring = Ring::create(mem, entries).map_err(|e| NativeError::Argument(e.to_string()))?;
        let flags = EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK;
        let submit = EventFd::from_flags(flags).map_err(|e| NativeError::os("eventfd", e))?;
        let complete = EventFd::from_flags(flags).map_err(|e| NativeError::os("eventfd", e))?;
        let reply = self.connection.call(
            Op::RegisterRing,
            0,
            &[fd.as_fd(), submit.as_fd(), complete.as_fd()],
        )?;
        Ok(Ior {
            connection: self.connection.clone(),
            id: reply.id,
            ring,
            submit: submit.into(),
            complete: complete.into(),
            sq_tail: 0,
            sq_published: 0,
            cq_head: 0,
            outstanding: 0,
        })
    }

    /// Registers a file opened through the mount (its access mode decides
    /// what the registration may do). The descriptor may be closed after.
    pub fn register_file(&self, file: BorrowedFd<'_>) -> Result<RegisteredFile, NativeError> {
        let reply = self.connection.call(Op::RegisterFile, 0, &[file])?;
        Ok(RegisteredFile {
            connection: self.connection.clone(),
            id: reply.id,
            length: reply.value,
            open: true,
        })
    }
}

/// A registered shared buffer. Reads land in it and writes come from it.
#[derive(Debug)]
pub struct Iov {
    connection: Arc<Connection>,
    id: u32,
    mem: SharedMemory,
    fd: OwnedFd,
}

impl Iov {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn len(&self) -> u64 {
        self.mem.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// The memfd, for a binding that maps the same memory itself (Python's
    /// `mmap`, so its `memoryview` and numpy arrays see it without a copy).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The first byte of this process's mapping. Bytes under a request in
    /// flight belong to the daemon until its completion is reaped.
    pub fn as_ptr(&self) -> *mut u8 {
        self.mem.as_ptr()
    }

    /// Copies bytes out of the buffer.
    pub fn read_at(&self, offset: u64, into: &mut [u8]) -> Result<(), NativeError> {
        self.mem
            .read(offset, into)
            .map_err(|e| NativeError::Argument(e.to_string()))
    }

    /// Copies bytes into the buffer.
    pub fn write_at(&self, offset: u64, from: &[u8]) -> Result<(), NativeError> {
        self.mem
            .write(offset, from)
            .map_err(|e| NativeError::Argument(e.to_string()))
    }
}

impl Drop for Iov {
    fn drop(&mut self) {
        self.connection.forget(Op::DeregisterIov, self.id);
    }
}

/// A file registered by descriptor.
#[derive(Debug)]
pub struct RegisteredFile {
    connection: Arc<Connection>,
    id: u32,
    length: u64,
    open: bool,
}

impl RegisteredFile {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The file's length when it was registered.
    pub fn length_at_open(&self) -> u64 {
        self.length
    }

    /// Deregisters: the daemon flushes what was written through this
    /// registration to every replica, fixes the length, and ends its write
    /// session (close-to-open: a later open anywhere sees the writes).
    pub fn close(mut self) -> Result<(), NativeError> {
        self.open = false;
        self.connection
            .call(Op::DeregisterFile, self.id, &[])
            .map(|_| ())
    }
}

impl Drop for RegisteredFile {
    fn drop(&mut self) {
        if self.open {
            self.connection.forget(Op::DeregisterFile, self.id);
        }
    }
}

/// One finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub user_data: u64,
    /// Bytes moved, or `-errno`.
    pub result: i64,
}

impl Completion {
    /// The bytes moved, or the request's error.
    pub fn bytes(&self) -> std::io::Result<u64> {
        if self.result >= 0 {
            Ok(self.result as u64)
        } else {
            Err(std::io::Error::from_raw_os_error((-self.result) as i32))
        }
    }
}

impl From<Cqe> for Completion {
    fn from(cqe: Cqe) -> Completion {
        Completion {
            user_data: cqe.user_data,
            result: cqe.result,
        }
    }
}

/// A submission/completion ring, for one thread at a time (`&mut self`).
///
/// Depth is concurrency: every submitted request starts at once in the
/// daemon and completes on its own, and [`Ior::wait`] returns as soon as
/// the number asked for have completed.
#[derive(Debug)]
pub struct Ior {
    connection: Arc<Connection>,
    id: u32,
    ring: Ring,
    submit: OwnedFd,
    complete: OwnedFd,
    /// The next submission slot (prepared entries included).
    sq_tail: u32,
    /// What the daemon was told `sq_tail` is.
    sq_published: u32,
    cq_head: u32,
    /// Submitted and not reaped.
    outstanding: u32,
}

impl Ior {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn entries(&self) -> u32 {
        self.ring.entries()
    }

    /// Prepared but not submitted, plus submitted but not reaped: what the
    /// ring holds; at most [`Ior::entries`].
    pub fn pending(&self) -> u32 {
        self.sq_tail.wrapping_sub(self.sq_published) + self.outstanding
    }

    fn prepare(&mut self, sqe: Sqe) -> Result<(), NativeError> {
        if self.pending() >= self.entries() {
            return Err(NativeError::RingFull {
                entries: self.entries(),
            });
        }
        self.ring.write_sqe(self.sq_tail, &sqe);
        self.sq_tail = self.sq_tail.wrapping_add(1);
        Ok(())
    }

    /// Prepares a read of `len` bytes at `file_offset` into `iov` at
    /// `iov_offset`. The daemon checks every field; a bad one fails this
    /// request alone, in its completion.
    pub fn prepare_read(
        &mut self,
        file: &RegisteredFile,
        iov: &Iov,
        iov_offset: u64,
        len: u32,
        file_offset: u64,
        user_data: u64,
    ) -> Result<(), NativeError> {
        self.prepare(io_sqe(
            SqeOp::Read,
            file.id,
            iov.id,
            iov_offset,
            len,
            file_offset,
            user_data,
        ))
    }

    /// Prepares a write of `len` bytes of `iov` at `iov_offset` to the file
    /// at `file_offset`.
    pub fn prepare_write(
        &mut self,
        file: &RegisteredFile,
        iov: &Iov,
        iov_offset: u64,
        len: u32,
        file_offset: u64,
        user_data: u64,
    ) -> Result<(), NativeError> {
        self.prepare(io_sqe(
            SqeOp::Write,
            file.id,
            iov.id,
            iov_offset,
            len,
            file_offset,
            user_data,
        ))
    }

    /// Prepares a flush of the file (what `close(2)` through the mount does).
    pub fn prepare_flush(
        &mut self,
        file: &RegisteredFile,
        user_data: u64,
    ) -> Result<(), NativeError> {
        self.prepare(io_sqe(SqeOp::Flush, file.id, 0, 0, 0, 0, user_data))
    }

    /// Prepares an entry exactly as given, unchecked: for tests of the
    /// daemon's checks and for bindings that build entries themselves.
    pub fn prepare_raw(&mut self, sqe: Sqe) -> Result<(), NativeError> {
        self.prepare(sqe)
    }

    /// Hands every prepared entry to the daemon; returns how many.
    pub fn submit(&mut self) -> Result<u32, NativeError> {
        let count = self.sq_tail.wrapping_sub(self.sq_published);
        if count == 0 {
            return Ok(0);
        }
        self.ring.sq_tail().store(self.sq_tail, Ordering::Release);
        self.sq_published = self.sq_tail;
        self.outstanding += count;
        match nix::unistd::write(&self.submit, &1u64.to_ne_bytes()) {
            // A full counter (2^64 - 2 unread wakeups) means the daemon has
            // plenty of wakeups pending already.
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => Ok(count),
            Err(e) => Err(NativeError::os("waking the daemon (submit eventfd)", e)),
        }
    }

    /// Wakes the daemon's side of the ring without submitting: it looks at
    /// the indices again (after completions were reaped from a full ring).
    pub fn wake_daemon(&self) -> Result<(), NativeError> {
        match nix::unistd::write(&self.submit, &1u64.to_ne_bytes()) {
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => Ok(()),
            Err(e) => Err(NativeError::os("waking the daemon (submit eventfd)", e)),
        }
    }

    /// Moves every completion available now into `out`; never blocks.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize, NativeError> {
        self.reap_up_to(out, usize::MAX)
    }

    /// Moves at most `max` of the completions available now into `out`.
    pub fn reap_up_to(
        &mut self,
        out: &mut Vec<Completion>,
        max: usize,
    ) -> Result<usize, NativeError> {
        let tail = self.ring.cq_tail().load(Ordering::Acquire);
        let published = tail.wrapping_sub(self.cq_head);
        if published > self.outstanding {
            return Err(NativeError::Protocol(format!(
                "the daemon published {published} completions with {} requests outstanding",
                self.outstanding
            )));
        }
        let ready = published.min(max.min(u32::MAX as usize) as u32);
        for _ in 0..ready {
            out.push(self.ring.read_cqe(self.cq_head).into());
            self.cq_head = self.cq_head.wrapping_add(1);
        }
        if ready > 0 {
            self.ring.cq_head().store(self.cq_head, Ordering::Release);
            self.outstanding -= ready;
        }
        if published == 0 && self.ring.state().load(Ordering::Acquire) == STATE_FAILED {
            return Err(NativeError::RingFailed(self.ring.error()));
        }
        Ok(ready as usize)
    }

    /// Waits until at least `min` completions have been moved into `out`
    /// (or `timeout` passes: [`NativeError::Timeout`]). Asking for more
    /// than are outstanding is an error at once, never a hang.
    pub fn wait(
        &mut self,
        out: &mut Vec<Completion>,
        min: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, NativeError> {
        self.wait_up_to(out, min, usize::MAX, timeout)
    }

    /// As [`Ior::wait`], moving at most `max` completions (`max >= min`).
    pub fn wait_up_to(
        &mut self,
        out: &mut Vec<Completion>,
        min: usize,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, NativeError> {
        if max < min {
            return Err(NativeError::Argument(format!(
                "at most {max} completions cannot be at least {min}"
            )));
        }
        if min > self.outstanding as usize {
            return Err(NativeError::Argument(format!(
                "waiting for {min} completions with only {} requests submitted and not reaped",
                self.outstanding
            )));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut got = 0;
        loop {
            got += self.reap_up_to(out, max - got)?;
            if got >= min {
                return Ok(got);
            }
            let wait_ms = match deadline {
                None => -1,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(NativeError::Timeout { got, wanted: min });
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            // The socket too: a daemon that is gone (killed, or stopped
            // before it could fail the ring) completes nothing more.
            let mut fds = [
                PollFd::new(self.complete.as_fd(), PollFlags::POLLIN),
                // POLLHUP is always reported: the daemon's end closed.
                PollFd::new(self.connection.hangup.as_fd(), PollFlags::empty()),
            ];
            let timeout = PollTimeout::try_from(wait_ms).unwrap_or(PollTimeout::NONE);
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(NativeError::os("poll on the complete eventfd", e)),
            }
            let gone = PollFlags::POLLHUP | PollFlags::POLLERR;
            if fds[1].revents().is_some_and(|r| r.intersects(gone)) {
                // What it completed before it went is still the caller's.
                got += self.reap_up_to(out, max - got)?;
                if got >= min {
                    return Ok(got);
                }
                return Err(NativeError::Disconnected);
            }
            let mut counter = [0u8; 8];
            match nix::unistd::read(&self.complete, &mut counter) {
                Ok(_) | Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(NativeError::os("reading the complete eventfd", e)),
            }
        }
    }

    /// The daemon's last error text on this ring (why a request failed).
    pub fn last_error(&self) -> String {
        self.ring.error()
    }

    /// Requests the daemon failed so far (each with `-errno` in its
    /// completion, the last one's reason in [`Ior::last_error`]).
    pub fn error_count(&self) -> u32 {
        self.ring.error_count().load(Ordering::Acquire)
    }

    /// The ring's shared memory (tests write garbage indices through it).
    pub fn ring(&self) -> &Ring {
        &self.ring
    }
}

impl Drop for Ior {
    fn drop(&mut self) {
        self.connection.forget(Op::DeregisterRing, self.id);
    }
}

fn io_sqe(
    op: SqeOp,
    file: u32,
    iov: u32,
    iov_offset: u64,
    len: u32,
    file_offset: u64,
    user_data: u64,
) -> Sqe {
    Sqe {
        op: op as u8,
        flags: 0,
        file,
        iov,
        len,
        iov_offset,
        file_offset,
        user_data,
        reserved_nonzero: false,
    }
}
