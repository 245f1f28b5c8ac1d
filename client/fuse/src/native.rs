//! The mount daemon's side of native I/O (docs/native-io.md): the Unix
//! socket applications register shared buffers, rings and files on, one
//! task per connection, one task per ring, and each request a task of its
//! own, moving bytes between the application's shared buffer and the same
//! [`FsClient`] the FUSE requests use (so a file's write-back buffer,
//! length and write sessions are shared with FUSE opens of it).
//!
//! Everything the application controls is checked before use: descriptors
//! at registration (sealed memfds only, eventfds, files of this mount),
//! every ring index and entry after copying it out of shared memory, and
//! every buffer slice against the size mapped. A bad entry fails that
//! request; garbage indices fail that ring; nothing the application writes
//! can fault the daemon. When the connection closes (the application's
//! process died, or it closed the socket) every ring stops taking entries,
//! the requests in flight finish, every file is flushed and its write
//! session closed, and every mapping is unmapped.
//!
//! The data path is the iov slice ↔ [`FsClient`], with no copy in the
//! daemon: a read lends the slice (a `SharedSlice`, one per chunk) to the
//! storage client, whose connections read each chunk's bytes from the
//! socket straight into it (flyfs-rpc's landing; a read that fails over
//! to another replica is copied once, counted); a write hands the slice to
//! the file's write-back buffer, the one copy buffered writes make. On the
//! RDMA transport the iov is registered with the device when the
//! application registers it (deregistered when the last request using it
//! is done), and a read's slices are lent to the replicas, which RDMA WRITE
//! each chunk's bytes into them: no byte passes through the daemon.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use flyfs_client::fs::{FileHandle, FsClient, OpenMode};
use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::User;
use flyfs_rpc::Network;
use flyfs_usrbio::memory::check_sealed;
use flyfs_usrbio::os::{SharedMemory, SharedSlice, accept_nonblocking, is_eventfd, recv_with_fds};
use flyfs_usrbio::ring::{Cqe, Ring, Sqe, SqeOp};
use flyfs_usrbio::wire::{
    CONNECTIONS_MAX, FILES_MAX, IN_FLIGHT_BYTES_MAX, IO_BYTES_MAX, IOV_BYTES_MAX, IOVS_MAX, Op,
    REQUEST_BYTES, RINGS_MAX, Reply, Request,
};
use futures::FutureExt;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr, bind, listen,
    sockopt::PeerCredentials,
};
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::runtime::Handle;
use tokio::sync::{RwLock, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::credentials::user_of;
use crate::session::Invalidator;

/// The native I/O server of one mount. [`NativeServer::shutdown`] ends
/// every connection as if its application had closed it.
#[derive(Debug)]
pub struct NativeServer {
    path: PathBuf,
    accept: JoinHandle<()>,
    stop: watch::Sender<bool>,
    connections: Arc<Mutex<JoinSet<()>>>,
}

impl NativeServer {
    /// Stops accepting, ends every connection (flushing and closing its
    /// files), and removes the socket file.
    pub async fn shutdown(self) {
        self.accept.abort();
        let _ = self.stop.send(true);
        let mut connections = std::mem::take(&mut *self.connections.lock());
        while connections.join_next().await.is_some() {}
        let _ = std::fs::remove_file(&self.path);
    }

    /// Connections being served.
    pub fn connections(&self) -> usize {
        self.connections.lock().len()
    }
}

/// Serves native I/O for the mount at `mount_point` on a Unix socket at
/// `socket_path` (mode 0666: the descriptors applications pass decide what
/// they may do). A stale socket file left by a dead daemon is replaced; a
/// live one is an error.
pub fn serve_native<N: Network>(
    client: Arc<FsClient<N>>,
    runtime: &Handle,
    socket_path: &Path,
    mount_point: &Path,
    invalidator: Invalidator,
) -> io::Result<NativeServer> {
    let mount_dev = std::fs::metadata(mount_point)?.dev();
    remove_stale_socket(socket_path)?;
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(socket_path)?)?;
    std::fs::set_permissions(socket_path, PermissionsExt::from_mode(0o666))?;
    listen(&fd, Backlog::new(128).map_err(io::Error::from)?)?;
    let _guard = runtime.enter();
    let listener = watch_fd(fd)?;
    let (stop, stopped) = watch::channel(false);
    let connections = Arc::new(Mutex::new(JoinSet::new()));
    let shared = Arc::new(Shared {
        client,
        mount_dev,
        stopped,
        invalidator,
    });
    let accept = runtime.spawn(accept_loop(listener, shared, connections.clone()));
    tracing::info!("native I/O on {}", socket_path.display());
    Ok(NativeServer {
        path: socket_path.to_path_buf(),
        accept,
        stop,
        connections,
    })
}

/// A descriptor on the runtime's reactor. `AsyncFd::new` is deprecated
/// because a raw descriptor it watches could be closed and reused under it;
/// an `OwnedFd` moved into it cannot be, which is exactly what the unsafe
/// `AsyncFd::register` asks its caller to promise (this crate's only
/// unsafe code is the trait implementation in `iov_arena.rs`).
#[allow(deprecated)]
fn watch_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::new(fd)
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(meta) => meta,
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    let probe = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match nix::sys::socket::connect(probe.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another daemon serves native I/O there", path.display()),
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

/// What every connection shares.
struct Shared<N: Network> {
    client: Arc<FsClient<N>>,
    /// `st_dev` of the mount: registered files must have it.
    mount_dev: u64,
    stopped: watch::Receiver<bool>,
    /// Drops the kernel's cached attributes and pages of a file native I/O
    /// flushed, so FUSE opens see its length and bytes.
    invalidator: Invalidator,
}

impl<N: Network> Shared<N> {
    /// After a flush or a close of a file written natively: the kernel's
    /// view of it is stale (it saw none of the writes).
    async fn invalidate(&self, ino: InodeId) {
        let invalidator = self.invalidator.clone();
        // A write to /dev/fuse, which may wait on the kernel's inode lock:
        // not on a runtime worker.
        let done = tokio::task::spawn_blocking(move || invalidator.invalidate(ino.0)).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                ?ino,
                "native I/O: cannot invalidate the kernel's cache: {e}"
            ),
            Err(e) => tracing::warn!(
                ?ino,
                "native I/O: invalidating the kernel's cache failed: {e}"
            ),
        }
    }
}

async fn accept_loop<N: Network>(
    listener: AsyncFd<OwnedFd>,
    shared: Arc<Shared<N>>,
    connections: Arc<Mutex<JoinSet<()>>>,
) {
    loop {
        let accepted = match listener.readable().await {
            Ok(mut ready) => ready.try_io(|inner| accept_nonblocking(inner.get_ref().as_fd())),
            Err(e) => {
                tracing::error!(
                    "native I/O: the listening socket failed: {e}; no more connections"
                );
                return;
            }
        };
        let socket = match accepted {
            Err(_would_block) => continue,
            Ok(Err(e)) => {
                tracing::warn!("native I/O: accept failed: {e}");
                continue;
            }
            Ok(Ok(socket)) => socket,
        };
        let mut set = connections.lock();
        while set.try_join_next().is_some() {}
        if set.len() >= CONNECTIONS_MAX {
            tracing::warn!("native I/O: {CONNECTIONS_MAX} connections already; closing a new one");
            continue;
        }
        let credentials = match nix::sys::socket::getsockopt(&socket, PeerCredentials) {
            Ok(credentials) => credentials,
            Err(e) => {
                tracing::warn!("native I/O: no peer credentials on a new connection: {e}");
                continue;
            }
        };
        let peer = Peer {
            pid: credentials.pid(),
            user: user_of(
                credentials.uid(),
                credentials.gid(),
                credentials.pid().max(0) as u32,
            ),
        };
        let shared = shared.clone();
        set.spawn(async move {
            match watch_fd(socket) {
                Ok(socket) => Connection::new(shared, peer).serve(socket).await,
                Err(e) => tracing::warn!("native I/O: cannot watch a connection: {e}"),
            }
        });
    }
}

/// Who is on the other end.
#[derive(Clone, Debug)]
struct Peer {
    pid: i32,
    user: User,
}

/// A registered file: the daemon's own handle on the inode, and a gate:
/// requests hold it shared, deregistration exclusively, so a file is closed
/// only after the requests on it have finished.
struct NativeFile {
    handle: Arc<FileHandle>,
    readable: bool,
    writable: bool,
    gate: RwLock<bool>,
}

/// What the rings of one connection look things up in.
#[derive(Default)]
struct Registry {
    iovs: Mutex<HashMap<u32, Arc<Iov>>>,
    files: Mutex<HashMap<u32, Arc<NativeFile>>>,
}

/// A registered iov: its mapping and, on the RDMA transport, its memory
/// registration. Requests in flight, and calls whose replies may still be
/// written into it, hold it (through [`IovSlice`]), so the registration
/// and then the mapping go only after the last of them.
struct Iov {
    /// Dropped first: nothing is written into the memory after it goes.
    _rdma: Option<flyfs_rpc::rdma::ArenaRegistration>,
    memory: Arc<SharedMemory>,
}

/// A slice of an iov a read lands in, keeping the iov registered.
struct IovSlice {
    slice: SharedSlice,
    _iov: Arc<Iov>,
}

impl AsMut<[u8]> for IovSlice {
    fn as_mut(&mut self) -> &mut [u8] {
        self.slice.as_mut()
    }
}

struct RingTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Connection<N: Network> {
    shared: Arc<Shared<N>>,
    peer: Peer,
    registry: Arc<Registry>,
    rings: HashMap<u32, RingTask>,
    iov_bytes: u64,
    next_id: u32,
    in_flight: Arc<Semaphore>,
}

impl<N: Network> Connection<N> {
    fn new(shared: Arc<Shared<N>>, peer: Peer) -> Connection<N> {
        Connection {
            shared,
            peer,
            registry: Arc::default(),
            rings: HashMap::new(),
            iov_bytes: 0,
            next_id: 1,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_BYTES_MAX as usize)),
        }
    }

    async fn serve(mut self, socket: AsyncFd<OwnedFd>) {
        tracing::debug!(
            pid = self.peer.pid,
            uid = self.peer.user.uid,
            "native I/O: connected"
        );
        let mut stopped = self.shared.stopped.clone();
        let mut buf = vec![0u8; REQUEST_BYTES + 1];
        loop {
            let received = tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => break,
                ready = socket.readable() => match ready {
                    Ok(mut ready) => ready.try_io(|inner| {
                        recv_with_fds(inner.get_ref().as_fd(), &mut buf, libc::MSG_DONTWAIT)
                    }),
                    Err(e) => {
                        tracing::warn!(pid = self.peer.pid, "native I/O: connection failed: {e}");
                        break;
                    }
                },
            };
            let (len, fds, truncated) = match received {
                Err(_would_block) => continue,
                Ok(Err(e)) => {
                    tracing::debug!(pid = self.peer.pid, "native I/O: receive failed: {e}");
                    break;
                }
                Ok(Ok(received)) => received,
            };
            if len == 0 {
                break;
            }
            let reply = if truncated {
                Reply::error(
                    libc::EPROTO,
                    format!(
                        "a request is {REQUEST_BYTES} bytes with at most 3 descriptors; this one \
                         was longer or carried more"
                    ),
                )
            } else {
                match Request::decode(&buf[..len]) {
                    Err(e) => Reply::error(libc::EPROTO, e.to_string()),
                    Ok(request) if fds.len() != request.op.fds() => Reply::error(
                        libc::EINVAL,
                        format!(
                            "{} carries {} descriptors, this request carried {}",
                            request.op.name(),
                            request.op.fds(),
                            fds.len()
                        ),
                    ),
                    Ok(request) => self.handle(request, fds).await,
                }
            };
            if reply.status != 0 {
                tracing::debug!(
                    pid = self.peer.pid,
                    "native I/O: refused: {}",
                    reply.message
                );
            }
            match send_unless_stopped(&socket, &reply, &mut stopped).await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::debug!(pid = self.peer.pid, "native I/O: cannot reply: {e}");
                    break;
                }
                // Shutting down: an application that does not read its
                // replies must not hold the daemon's shutdown.
                None => break,
            }
        }
        let pid = self.peer.pid;
        self.close().await;
        tracing::debug!(pid, "native I/O: disconnected, registrations dropped");
    }

    fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    async fn handle(&mut self, request: Request, mut fds: Vec<OwnedFd>) -> Reply {
        match request.op {
            Op::RegisterIov => self.register_iov(fds.remove(0)),
            Op::RegisterRing => {
                let complete = fds.remove(2);
                let submit = fds.remove(1);
                self.register_ring(fds.remove(0), submit, complete)
            }
            Op::RegisterFile => self.register_file(fds.remove(0)).await,
            Op::DeregisterIov => match self.registry.iovs.lock().remove(&request.id) {
                // Requests in flight keep their own reference; the mapping
                // goes when the last of them ends.
                Some(iov) => {
                    self.iov_bytes -= iov.memory.len() as u64;
                    Reply::ok(request.id, 0)
                }
                None => Reply::error(libc::ENOENT, format!("no iov {}", request.id)),
            },
            Op::DeregisterRing => match self.rings.remove(&request.id) {
                Some(ring) => {
                    stop_ring(ring).await;
                    Reply::ok(request.id, 0)
                }
                None => Reply::error(libc::ENOENT, format!("no ring {}", request.id)),
            },
            Op::DeregisterFile => {
                let file = self.registry.files.lock().remove(&request.id);
                match file {
                    Some(file) => match self.release(&file).await {
                        Ok(()) => Reply::ok(request.id, 0),
                        Err(e) => Reply::error(e.errno, e.message),
                    },
                    None => Reply::error(libc::ENOENT, format!("no file {}", request.id)),
                }
            }
        }
    }

    fn register_iov(&mut self, fd: OwnedFd) -> Reply {
        let size = match check_sealed(fd.as_fd(), "the iov") {
            Ok(size) => size,
            Err(message) => return Reply::error(libc::EINVAL, message),
        };
        if self.registry.iovs.lock().len() >= IOVS_MAX {
            return Reply::error(
                libc::ENOSPC,
                format!("{IOVS_MAX} iovs are registered already"),
            );
        }
        if self.iov_bytes + size > IOV_BYTES_MAX {
            return Reply::error(
                libc::ENOSPC,
                format!(
                    "{size} bytes more would map {} bytes of iovs; a connection may map {IOV_BYTES_MAX}",
                    self.iov_bytes + size
                ),
            );
        }
        let memory = match SharedMemory::map(fd.as_fd(), size as usize) {
            Ok(memory) => Arc::new(memory),
            Err(e) => return Reply::error(libc::EINVAL, format!("cannot map the iov: {e}")),
        };
        let arena = Arc::new(crate::iov_arena::IovArena(memory.clone()));
        let rdma = match self.shared.client.storage().register_arena(arena) {
            None => None,
            Some(Ok(registration)) => Some(registration),
            Some(Err(e)) => {
                return Reply::error(
                    libc::ENOMEM,
                    format!("cannot register the iov's {size} bytes with the RDMA device: {e}"),
                );
            }
        };
        let id = self.next_id();
        self.iov_bytes += size;
        self.registry.iovs.lock().insert(
            id,
            Arc::new(Iov {
                _rdma: rdma,
                memory,
            }),
        );
        Reply::ok(id, size)
    }

    fn register_ring(&mut self, fd: OwnedFd, submit: OwnedFd, complete: OwnedFd) -> Reply {
        if self.rings.len() >= RINGS_MAX {
            return Reply::error(
                libc::ENOSPC,
                format!("{RINGS_MAX} rings are registered already"),
            );
        }
        let size = match check_sealed(fd.as_fd(), "the ring") {
            Ok(size) => size,
            Err(message) => return Reply::error(libc::EINVAL, message),
        };
        // Only the part a ring can use is mapped: a huge memfd passed as a
        // ring costs no address space.
        let size = size.min(flyfs_usrbio::ring::region_bytes(
            flyfs_usrbio::ring::ENTRIES_MAX,
        ));
        let mem = match SharedMemory::map(fd.as_fd(), size as usize) {
            Ok(mem) => mem,
            Err(e) => return Reply::error(libc::EINVAL, format!("cannot map the ring: {e}")),
        };
        let ring = match Ring::open(mem) {
            Ok(ring) => ring,
            Err(e) => return Reply::error(libc::EINVAL, format!("the ring: {e}")),
        };
        for (fd, what) in [
            (&submit, "the submit eventfd"),
            (&complete, "the complete eventfd"),
        ] {
            if !is_eventfd(fd.as_fd()) {
                return Reply::error(libc::EINVAL, format!("{what} is not an eventfd"));
            }
            let nonblocking = fcntl(fd, FcntlArg::F_GETFL)
                .is_ok_and(|flags| OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK));
            if !nonblocking {
                return Reply::error(
                    libc::EINVAL,
                    format!(
                        "{what} must be opened with EFD_NONBLOCK (the daemon never changes the \
                         flags of a descriptor it shares with the application)"
                    ),
                );
            }
        }
        let submit = match watch_fd(submit) {
            Ok(submit) => submit,
            Err(e) => {
                return Reply::error(
                    libc::EINVAL,
                    format!("cannot watch the submit eventfd: {e}"),
                );
            }
        };
        let entries = ring.entries();
        let id = self.next_id();
        let (stop, stopped) = watch::channel(false);
        let worker = RingWorker {
            id,
            ring: Arc::new(ring),
            complete: Arc::new(complete),
            completions: Mutex::new(0),
            in_flight: AtomicU32::new(0),
            failed: AtomicUsize::new(0),
        };
        let task = tokio::spawn(run_ring(
            Arc::new(worker),
            submit,
            stopped,
            self.registry.clone(),
            self.shared.clone(),
            self.in_flight.clone(),
        ));
        self.rings.insert(id, RingTask { stop, task });
        Reply::ok(id, entries as u64)
    }

    async fn register_file(&mut self, fd: OwnedFd) -> Reply {
        if self.registry.files.lock().len() >= FILES_MAX {
            return Reply::error(
                libc::ENOSPC,
                format!("{FILES_MAX} files are registered already"),
            );
        }
        let stat = match nix::sys::stat::fstat(fd.as_fd()) {
            Ok(stat) => stat,
            Err(e) => return Reply::error(libc::EBADF, format!("fstat of the file: {e}")),
        };
        if stat.st_dev != self.shared.mount_dev {
            return Reply::error(
                libc::EXDEV,
                format!(
                    "the file is not on this mount (its st_dev {}, the mount's {}): open it \
                     through the mount point",
                    stat.st_dev, self.shared.mount_dev
                ),
            );
        }
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Reply::error(libc::EINVAL, "not a regular file".to_string());
        }
        let flags = match fcntl(&fd, FcntlArg::F_GETFL) {
            Ok(flags) => flags,
            Err(e) => return Reply::error(libc::EBADF, format!("fcntl(F_GETFL) of the file: {e}")),
        };
        if flags & libc::O_PATH != 0 {
            return Reply::error(
                libc::EBADF,
                "an O_PATH descriptor grants no I/O".to_string(),
            );
        }
        let mode = OpenMode::from_flags(flags & libc::O_ACCMODE);
        // Closed on this runtime worker: the kernel's flush of it comes
        // back to this daemon, which answers its own flushes at once
        // (`flush` in ops), never through a worker.
        drop(fd);
        let opened = self
            .shared
            .client
            .open(&self.peer.user, InodeId(stat.st_ino), mode)
            .await;
        let (attr, handle) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                return Reply::error(
                    e.errno,
                    format!("opening inode {}: {}", stat.st_ino, e.message),
                );
            }
        };
        let id = self.next_id();
        self.registry.files.lock().insert(
            id,
            Arc::new(NativeFile {
                handle,
                readable: mode.read,
                writable: mode.write,
                gate: RwLock::new(true),
            }),
        );
        Reply::ok(id, attr.length)
    }

    /// Waits for the requests on the file, then closes it as `release` does:
    /// flushed, length fixed, write session ended.
    async fn release(&self, file: &NativeFile) -> Result<(), flyfs_client::FsError> {
        let mut open = file.gate.write().await;
        *open = false;
        let released = self.shared.client.release(&file.handle).await;
        if file.writable {
            self.shared.invalidate(file.handle.ino()).await;
        }
        released
    }

    /// The connection is gone: stop the rings (their requests finish),
    /// close every file, drop every mapping.
    async fn close(mut self) {
        for (_, ring) in self.rings.drain() {
            stop_ring(ring).await;
        }
        let files: Vec<Arc<NativeFile>> =
            self.registry.files.lock().drain().map(|(_, f)| f).collect();
        for file in files {
            if let Err(e) = self.release(&file).await {
                tracing::warn!(
                    pid = self.peer.pid,
                    ino = ?file.handle.ino(),
                    "native I/O: closing a file of a closed connection failed: {e}"
                );
            }
        }
        self.registry.iovs.lock().clear();
    }
}

async fn stop_ring(ring: RingTask) {
    let _ = ring.stop.send(true);
    if let Err(e) = ring.task.await {
        tracing::error!("native I/O: a ring task failed: {e}");
    }
}

/// [`send_reply`], given up (`None`) once `stopped` turns true: a peer that
/// does not read keeps its socket from ever becoming writable.
async fn send_unless_stopped(
    socket: &AsyncFd<OwnedFd>,
    reply: &Reply,
    stopped: &mut watch::Receiver<bool>,
) -> Option<io::Result<()>> {
    tokio::select! {
        _ = stopped.wait_for(|stop| *stop) => None,
        sent = send_reply(socket, reply) => Some(sent),
    }
}

async fn send_reply(socket: &AsyncFd<OwnedFd>, reply: &Reply) -> io::Result<()> {
    let bytes = reply.encode();
    loop {
        let mut ready = socket.writable().await?;
        match ready.try_io(|inner| {
            nix::sys::socket::send(
                inner.as_raw_fd(),
                &bytes,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            )
            .map_err(io::Error::from)
        }) {
            Ok(sent) => return sent.map(|_| ()),
            Err(_would_block) => continue,
        }
    }
}

/// One ring's state in the daemon.
struct RingWorker {
    id: u32,
    ring: Arc<Ring>,
    complete: Arc<OwnedFd>,
    /// `cq_tail` as the daemon knows it (never read back from shared
    /// memory), under the lock that orders completions.
    completions: Mutex<u32>,
    /// Requests taken and not completed.
    in_flight: AtomicU32,
    /// Set once the ring failed.
    failed: AtomicUsize,
}

impl RingWorker {
    fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire) != 0
    }

    fn fail(&self, text: &str) {
        tracing::warn!(ring = self.id, "native I/O: ring failed: {text}");
        self.failed.store(1, Ordering::Release);
        self.ring.fail(text);
        self.wake();
    }

    /// Fails the ring as it stops (not an error of the application's:
    /// logged quietly), unless it failed already and says why.
    fn end(&self, text: &str) {
        if self.failed.swap(1, Ordering::AcqRel) == 0 {
            tracing::debug!(ring = self.id, "native I/O: ring stopped");
            self.ring.fail(text);
        }
        self.wake();
    }

    fn wake(&self) {
        // A full counter means wakeups are pending already.
        let _ = nix::unistd::write(self.complete.as_fd(), &1u64.to_ne_bytes());
    }

    /// Publishes one completion and wakes the application.
    fn complete(&self, user_data: u64, result: i64) {
        if self.is_failed() {
            return;
        }
        {
            let mut tail = self.completions.lock();
            self.ring.write_cqe(*tail, &Cqe { user_data, result });
            *tail = tail.wrapping_add(1);
            self.ring.cq_tail().store(*tail, Ordering::Release);
        }
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.wake();
    }

    /// Completions published and not yet reaped, or the garbage `cq_head`
    /// and the `cq_tail` it was checked against.
    ///
    /// `cq_head` is read under the lock that orders completions, so no
    /// completion is published between the two reads: with `cq_tail` read
    /// first and the lock let go, a request finishing and the application
    /// reaping it in between put `cq_head` past the `cq_tail` read, and an
    /// honest ring failed as garbage.
    fn unreaped(&self) -> Result<u32, (u32, u32)> {
        let tail = self.completions.lock();
        let head = self.ring.cq_head().load(Ordering::Acquire);
        let unreaped = tail.wrapping_sub(head);
        if unreaped <= self.ring.entries() {
            Ok(unreaped)
        } else {
            Err((head, *tail))
        }
    }
}

async fn run_ring<N: Network>(
    worker: Arc<RingWorker>,
    submit: AsyncFd<OwnedFd>,
    mut stopped: watch::Receiver<bool>,
    registry: Arc<Registry>,
    shared: Arc<Shared<N>>,
    in_flight_bytes: Arc<Semaphore>,
) {
    let entries = worker.ring.entries();
    let mut head = worker.ring.sq_head().load(Ordering::Acquire);
    let mut requests = JoinSet::new();
    loop {
        if !worker.is_failed() {
            let tail = worker.ring.sq_tail().load(Ordering::Acquire);
            let available = tail.wrapping_sub(head);
            if available > entries {
                worker.fail(&format!(
                    "sq_tail {tail} is {available} entries past sq_head {head}, and the ring has \
                     {entries}: the submission indices are garbage"
                ));
            } else {
                let mut taken = 0;
                while taken < available {
                    let unreaped = match worker.unreaped() {
                        Ok(unreaped) => unreaped,
                        Err((cq_head, cq_tail)) => {
                            worker.fail(&format!(
                                "cq_head {cq_head} is not within {entries} entries of cq_tail \
                                 {cq_tail}: the completion indices are garbage"
                            ));
                            break;
                        }
                    };
                    // Room for this request's completion: the completion
                    // queue can never overflow.
                    if worker.in_flight.load(Ordering::Acquire) + unreaped >= entries {
                        break;
                    }
                    let sqe = worker.ring.read_sqe(head);
                    head = head.wrapping_add(1);
                    taken += 1;
                    worker.in_flight.fetch_add(1, Ordering::AcqRel);
                    requests.spawn(serve_request(
                        worker.clone(),
                        sqe,
                        registry.clone(),
                        shared.clone(),
                        in_flight_bytes.clone(),
                    ));
                }
                worker.ring.sq_head().store(head, Ordering::Release);
            }
        }
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
            ready = submit.readable() => match ready {
                Ok(mut ready) => {
                    let mut counter = [0u8; 8];
                    let _ = ready.try_io(|inner| {
                        nix::unistd::read(inner.get_ref(), &mut counter).map_err(io::Error::from)
                    });
                }
                Err(e) => {
                    worker.fail(&format!("the submit eventfd failed: {e}"));
                    break;
                }
            },
            Some(finished) = requests.join_next(), if !requests.is_empty() => {
                if let Err(e) = finished {
                    tracing::error!(ring = worker.id, "native I/O: a request task failed: {e}");
                }
            }
        }
    }
    // Requests taken finish (their files stay open until they do).
    while let Some(finished) = requests.join_next().await {
        if let Err(e) = finished {
            tracing::error!(ring = worker.id, "native I/O: a request task failed: {e}");
        }
    }
    // Nothing more completes here: an application still waiting on the
    // ring (the daemon is stopping) learns it now, not never.
    worker.end(
        "the mount daemon stopped serving this ring (it is shutting down, or the ring's \
         connection closed)",
    );
}

/// One request: checked, served, completed. A bug that panics in it is EIO
/// for this request alone, as for a FUSE request.
async fn serve_request<N: Network>(
    worker: Arc<RingWorker>,
    sqe: Sqe,
    registry: Arc<Registry>,
    shared: Arc<Shared<N>>,
    in_flight_bytes: Arc<Semaphore>,
) {
    // Boxed: the request's future (the whole read or write path below it)
    // is large, and this task's future is moved whole into its cell on
    // spawn and overwritten whole when it ends.
    let request = AssertUnwindSafe(Box::pin(run_request(
        &sqe,
        &registry,
        &shared,
        &in_flight_bytes,
    )));
    let outcome = request.catch_unwind().await.unwrap_or_else(|_| {
        Err((
            libc::EIO,
            "the daemon failed serving it (a bug, logged)".to_string(),
        ))
    });
    let result = match outcome {
        Ok(bytes) => bytes as i64,
        Err((errno, message)) => {
            tracing::debug!(
                ring = worker.id,
                "native I/O: request {}: {message}",
                sqe.user_data
            );
            worker
                .ring
                .set_error(&format!("request {}: {message}", sqe.user_data));
            -(errno as i64)
        }
    };
    worker.complete(sqe.user_data, result);
}

type RequestError = (i32, String);

async fn run_request<N: Network>(
    sqe: &Sqe,
    registry: &Registry,
    shared: &Shared<N>,
    in_flight_bytes: &Semaphore,
) -> Result<u64, RequestError> {
    let client = &shared.client;
    if sqe.flags != 0 || sqe.reserved_nonzero {
        return Err((libc::EINVAL, "flags and reserved bytes must be 0".into()));
    }
    let op =
        SqeOp::from_u8(sqe.op).ok_or_else(|| (libc::EINVAL, format!("unknown op {}", sqe.op)))?;
    let file = registry
        .files
        .lock()
        .get(&sqe.file)
        .cloned()
        .ok_or_else(|| (libc::EBADF, format!("no registered file {}", sqe.file)))?;
    let open = file.gate.read().await;
    if !*open {
        return Err((libc::EBADF, format!("file {} was deregistered", sqe.file)));
    }
    let fs_error = |e: flyfs_client::FsError| (e.errno, e.message);
    let write = match op {
        SqeOp::Flush => {
            client.flush(&file.handle).await.map_err(fs_error)?;
            if file.writable {
                shared.invalidate(file.handle.ino()).await;
            }
            return Ok(0);
        }
        SqeOp::Read => false,
        SqeOp::Write => true,
    };
    if sqe.len > IO_BYTES_MAX {
        return Err((
            libc::EINVAL,
            format!(
                "length {} is above the limit of {IO_BYTES_MAX} bytes",
                sqe.len
            ),
        ));
    }
    if sqe
        .file_offset
        .checked_add(sqe.len as u64)
        .is_none_or(|end| end > i64::MAX as u64)
    {
        return Err((
            libc::EINVAL,
            format!(
                "file offset {} + length {} overflows",
                sqe.file_offset, sqe.len
            ),
        ));
    }
    let iov = registry
        .iovs
        .lock()
        .get(&sqe.iov)
        .cloned()
        .ok_or_else(|| (libc::EBADF, format!("no registered iov {}", sqe.iov)))?;
    if !iov.memory.contains(sqe.iov_offset, sqe.len as u64) {
        return Err((
            libc::EFAULT,
            format!(
                "iov slice {}..{}+{} is outside iov {} of {} bytes",
                sqe.iov_offset,
                sqe.iov_offset,
                sqe.len,
                sqe.iov,
                iov.memory.len()
            ),
        ));
    }
    let _permits = in_flight_bytes
        .acquire_many(sqe.len.max(1))
        .await
        .map_err(|_| (libc::EIO, "the connection is closing".to_string()))?;
    if !write {
        if !file.readable {
            return Err((
                libc::EBADF,
                format!("file {} is not registered for reading", sqe.file),
            ));
        }
        // Each chunk's bytes are read from the storage node's connection
        // straight into the application's buffer (over RDMA, written there
        // by the replica).
        let base = sqe.iov_offset;
        client
            .read_into(&file.handle, sqe.file_offset, sqe.len, |at, len| IovSlice {
                slice: SharedSlice::new(iov.memory.clone(), base + at as u64, len)
                    .expect("inside the iov slice checked above"),
                _iov: iov.clone(),
            })
            .await
            .map_err(fs_error)
    } else {
        if !file.writable {
            return Err((
                libc::EBADF,
                format!("file {} is not registered for writing", sqe.file),
            ));
        }
        // Straight from the application's buffer into the file's
        // write-back buffer (the one copy a buffered write makes).
        let data = SharedSlice::new(iov.memory.clone(), sqe.iov_offset, sqe.len as usize)
            .ok_or_else(|| (libc::EFAULT, "the iov slice left its iov".to_string()))?;
        client
            .write(&file.handle, sqe.file_offset, data.as_ref())
            .await
            .map_err(fs_error)?;
        Ok(sqe.len as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use flyfs_usrbio::ring::{Cqe, Ring, region_bytes};
    use nix::sys::eventfd::{EfdFlags, EventFd};

    use nix::sys::socket::{SockFlag, SockType, socketpair};

    use super::*;

    /// An application that sends requests but never reads its replies
    /// fills its socket; the reply the daemon then waits to send must not
    /// hold the daemon's shutdown.
    #[tokio::test]
    async fn a_reply_nobody_reads_gives_way_to_shutdown() {
        let (daemon, application) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .expect("socketpair");
        let reply = Reply::error(libc::EPROTO, "a reply nobody reads");
        let bytes = reply.encode();
        // Replies until the application's side takes no more.
        let mut queued = 0u32;
        loop {
            match nix::sys::socket::send(
                daemon.as_raw_fd(),
                &bytes,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(_) => queued += 1,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("send: {e}"),
            }
            assert!(queued < 1_000_000, "the socket never filled");
        }
        assert!(queued > 0, "not even one reply fitted");
        let daemon = watch_fd(daemon).expect("watch the daemon's side");
        let (stop, mut stopped) = watch::channel(false);
        let sending =
            tokio::spawn(async move { send_unless_stopped(&daemon, &reply, &mut stopped).await });
        stop.send(true).expect("the sender still waits");
        // A bound for a broken build only: with the fix this ends at once.
        let outcome = tokio::time::timeout(Duration::from_secs(60), sending)
            .await
            .expect("the send gave way to the shutdown")
            .expect("the send task");
        assert!(outcome.is_none(), "a send to a full socket succeeded");
        // The application's side still holds every queued reply, unread.
        drop(application);
    }

    /// A ring the daemon stops serving is failed with that reason and its
    /// application woken (a wait on it then ends); a ring that failed
    /// before keeps the reason it failed for.
    #[test]
    fn a_stopped_ring_is_failed_with_its_reason() {
        let worker = |id| {
            let len = region_bytes(8);
            let fd = flyfs_usrbio::memory::create_sealed(c"flyfs-test-ring", len).expect("memfd");
            let mem = SharedMemory::map(fd.as_fd(), len as usize).expect("map");
            let complete = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd");
            RingWorker {
                id,
                ring: Arc::new(Ring::create(mem, 8).expect("ring")),
                complete: Arc::new(OwnedFd::from(complete)),
                completions: Mutex::new(0),
                in_flight: AtomicU32::new(0),
                failed: AtomicUsize::new(0),
            }
        };
        let woken = |w: &RingWorker| {
            let mut counter = [0u8; 8];
            nix::unistd::read(w.complete.as_fd(), &mut counter).is_ok()
        };
        let stopped = worker(1);
        stopped.end("stopping");
        assert!(stopped.is_failed());
        assert_eq!(
            stopped.ring.state().load(Ordering::Acquire),
            flyfs_usrbio::ring::STATE_FAILED
        );
        assert_eq!(stopped.ring.error(), "stopping");
        assert!(woken(&stopped), "the application was not woken");

        let garbage = worker(2);
        garbage.fail("garbage indices");
        assert!(woken(&garbage));
        garbage.end("stopping");
        assert_eq!(garbage.ring.error(), "garbage indices");
        assert!(woken(&garbage), "the application was not woken");
    }

    /// The taker checks `cq_head` while requests complete on other threads
    /// and the application reaps them: an honest ring is never taken for
    /// garbage. (Before the fix, `cq_tail` was read before `cq_head` with
    /// the lock let go between, and this failed within thousands of checks:
    /// benches/native-vs-fuse's depth-64 rows saw it.)
    #[test]
    fn an_honest_completion_queue_is_never_garbage() {
        const ENTRIES: u32 = 64;
        const COMPLETIONS: u64 = 1_000_000;
        let len = region_bytes(ENTRIES);
        let fd = flyfs_usrbio::memory::create_sealed(c"flyfs-test-ring", len).expect("memfd");
        let mem = SharedMemory::map(fd.as_fd(), len as usize).expect("map");
        let ring = Arc::new(Ring::create(mem, ENTRIES).expect("ring"));
        let complete = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd");
        let worker = Arc::new(RingWorker {
            id: 0,
            ring: ring.clone(),
            complete: Arc::new(OwnedFd::from(complete)),
            completions: Mutex::new(0),
            in_flight: AtomicU32::new(u32::MAX),
            failed: AtomicUsize::new(0),
        });
        let done = Arc::new(AtomicBool::new(false));
        // Requests finishing: each completes only with room for it, as the
        // taker guarantees.
        let completer = {
            let (worker, ring) = (worker.clone(), ring.clone());
            std::thread::spawn(move || {
                for user_data in 0..COMPLETIONS {
                    while ring
                        .cq_tail()
                        .load(Ordering::Acquire)
                        .wrapping_sub(ring.cq_head().load(Ordering::Acquire))
                        >= ENTRIES
                    {
                        std::hint::spin_loop();
                    }
                    worker.complete(user_data, 0);
                }
            })
        };
        // The application reaps everything published, in order.
        let application = {
            let (ring, done) = (ring.clone(), done.clone());
            std::thread::spawn(move || {
                let mut head = 0u32;
                let mut expected = 0u64;
                while expected < COMPLETIONS {
                    let tail = ring.cq_tail().load(Ordering::Acquire);
                    while head != tail {
                        let cqe: Cqe = ring.read_cqe(head);
                        assert_eq!(cqe.user_data, expected, "completions out of order");
                        expected += 1;
                        head = head.wrapping_add(1);
                    }
                    ring.cq_head().store(head, Ordering::Release);
                }
                done.store(true, Ordering::Release);
            })
        };
        let mut checks = 0u64;
        while !done.load(Ordering::Acquire) {
            if let Err((cq_head, cq_tail)) = worker.unreaped() {
                panic!("cq_head {cq_head} taken for garbage against cq_tail {cq_tail}");
            }
            checks += 1;
        }
        completer.join().expect("completer");
        application.join().expect("application");
        assert!(checks > 0, "the taker never looked");
    }
}
