//! The FUSE daemon's file system: kernel requests in, [`FsClient`] calls
//! out.
//!
//! Every callback of [`FuseFs`] returns at once: it spawns a task on the
//! tokio runtime that awaits the client call and answers the kernel, so a
//! few FUSE threads keep many requests in flight (reads and writes of many
//! files, lookups of a whole `find`). A task that panics answers EIO for its
//! one request and is logged; the mount stays up.
//!
//! Inodes are the metadata service's inode numbers as they are (the root
//! is 1 in both), and nothing is remembered per inode: `forget` is a no-op,
//! so the daemon holds no state the kernel could leak. What it does hold:
//! open files (a [`FileHandle`] per `open`, released by `release`) and open
//! directories (the entries listed so far, so that the offsets the kernel
//! hands back stay valid while the directory changes).
//!
//! Consistency is the client's close-to-open: no kernel write-back cache
//! and no `keep_cache`, so every open drops the kernel's cached pages and
//! reads what other clients flushed before it.
//!
//! Credentials: every metadata request carries the caller's uid, gid and
//! supplementary groups (from `/proc/<pid>/status`); the metadata service
//! checks permissions itself. Reads and writes on an open handle use the
//! handle's credentials and never look at `/proc`; a truncate or fallocate
//! through a handle open for writing is asked for as root, because, as on a
//! local file system, the open already granted it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::{Attr, FileType, SetAttrReq, SetTime, User, XattrMode};
use flyfs_rpc::Network;
use fuser::{
    AccessFlags, Config, Errno, FileAttr, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, Session, SessionACL, SessionUnmounter, TimeOrNow,
    WriteFlags,
};
use futures::FutureExt;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::{Notify, oneshot};

use flyfs_client::FsError;
use flyfs_client::fs::{FileHandle, FsClient, OpenMode};

/// Longest name a directory entry may have (what `statfs` reports).
const NAME_MAX: usize = 255;
/// Directory entries fetched per metadata call.
const READDIR_PAGE: u32 = 512;
/// Entries whose attributes a `readdirplus` fetches at once when the
/// listing was fetched without them.
const READDIRPLUS_STAT_BATCH: usize = 32;
/// File capabilities are not supported: the kernel asks for this attribute
/// before every write to a file (to drop it), and answering locally saves
/// a metadata round trip per write.
const XATTR_CAPS: &[u8] = b"security.capability";

/// How the file system is mounted and how long the kernel may cache.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// How long the kernel may cache attributes.
    pub attr_ttl: Duration,
    /// How long the kernel may cache a name's inode.
    pub entry_ttl: Duration,
    /// The kernel checks permissions against the cached attributes (the
    /// metadata service checks again); off, `access(2)` comes here.
    pub default_permissions: bool,
    /// Users other than the one who mounted may use the mount.
    pub allow_other: bool,
    /// Threads reading requests from `/dev/fuse` (each with its own fd).
    pub threads: usize,
    /// The largest read-ahead request the kernel may send (it may offer
    /// less; the client reads further ahead on its own).
    pub max_readahead: u32,
}

impl Default for FuseOptions {
    fn default() -> FuseOptions {
        FuseOptions {
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            default_permissions: true,
            allow_other: true,
            threads: 4,
            max_readahead: 1 << 20,
        }
    }
}

/// What the kernel may send in one write (and one read-ahead): big
/// requests keep the per-request overhead small against the data.
const MAX_WRITE: u32 = 1 << 20;

/// The FUSE file system over one [`FsClient`].
#[derive(Debug)]
pub struct FuseFs<N: Network> {
    shared: Arc<Shared<N>>,
    runtime: Handle,
}

/// What every request task needs.
#[derive(Debug)]
struct Shared<N: Network> {
    client: Arc<FsClient<N>>,
    options: FuseOptions,
    files: Mutex<HashMap<u64, Arc<FileHandle>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    /// File and directory handle numbers (never 0, never reused).
    next_fh: AtomicU64,
    in_flight: InFlight,
}

/// Counts the request tasks running, so a shutdown can wait for them.
#[derive(Debug, Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    fn begin(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    fn end(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// An open directory: the entries listed so far. Entry `i` has offset
/// `i + 1` (the offset of the entry after it), so an offset the kernel
/// hands back always means the same place, whatever changed meanwhile.
#[derive(Debug)]
struct DirHandle {
    ino: InodeId,
    /// Later pages are fetched with the opener's credentials (permission
    /// to list is checked at open, as on a local file system).
    user: User,
    listing: tokio::sync::Mutex<Listing>,
}

#[derive(Debug, Default)]
struct Listing {
    /// `.` and `..` first, then the service's entries in name order.
    entries: Vec<Item>,
    /// Whether the service has entries after the last one fetched.
    more: bool,
    /// Whether anything was fetched (an offset of 0 afterwards is a
    /// `rewinddir`, which must see the directory as it is now).
    started: bool,
}

#[derive(Debug)]
struct Item {
    name: Vec<u8>,
    ino: InodeId,
    kind: FileType,
    attr: Option<Attr>,
    /// Gone when its attributes were fetched (readdirplus skips it).
    gone: bool,
}

/// An errno with a message, for errors found here rather than by the
/// metadata service.
fn fail(errno: i32, message: impl Into<String>) -> FsError {
    FsError {
        errno,
        message: message.into(),
        retryable: false,
    }
}

fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.len() > NAME_MAX {
        return Err(fail(
            libc::ENAMETOOLONG,
            format!("name of {} bytes (at most {NAME_MAX})", name.len()),
        ));
    }
    Ok(())
}

/// The caller's credentials. Supplementary groups come from
/// `/proc/<pid>/status`, read anew for every request (group membership
/// changes with `newgrp` and `setgroups`); a caller whose process cannot
/// be seen (pid 0: a kernel-internal request) has none.
fn user_of(uid: u32, gid: u32, pid: u32) -> User {
    User {
        uid,
        gid,
        groups: groups_of(pid),
    }
}

fn groups_of(pid: u32) -> Vec<u32> {
    if pid == 0 {
        return Vec::new();
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Credentials of a request, taken in the callback (the request is gone by
/// the time the task runs) but resolved in the task.
#[derive(Clone, Copy, Debug)]
struct Caller {
    uid: u32,
    gid: u32,
    pid: u32,
}

impl Caller {
    fn of(req: &Request) -> Caller {
        Caller {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        }
    }

    fn user(self) -> User {
        user_of(self.uid, self.gid, self.pid)
    }
}

fn system_time(ns: i64) -> SystemTime {
    let magnitude = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    }
}

fn nanos(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

fn set_time(time: TimeOrNow) -> SetTime {
    match time {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(kernel_time_ns(t)),
    }
}

/// A time fuser 0.18 decoded from the kernel, in nanoseconds. Its decoder
/// gets times before the epoch with a fraction wrong: the kernel's
/// (seconds -2, nanoseconds 0.5e9), which is -1.5 s, becomes the epoch minus
/// 2.5 s. Whole seconds and the fraction are recovered from what it made.
fn kernel_time_ns(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(_) => nanos(time),
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            secs.saturating_mul(-1_000_000_000)
                .saturating_add(i64::from(d.subsec_nanos()))
        }
    }
}

fn kind_of(kind: FileType) -> fuser::FileType {
    match kind {
        FileType::File => fuser::FileType::RegularFile,
        FileType::Directory => fuser::FileType::Directory,
        FileType::Symlink => fuser::FileType::Symlink,
        FileType::Fifo => fuser::FileType::NamedPipe,
        FileType::Socket => fuser::FileType::Socket,
        FileType::CharDevice => fuser::FileType::CharDevice,
        FileType::BlockDevice => fuser::FileType::BlockDevice,
    }
}

/// `stat` as the kernel wants it.
fn file_attr(attr: &Attr) -> FileAttr {
    // The block size tells `cp` and friends how much to move per call: a
    // chunk (up to what one FUSE write carries) for files.
    let blksize = match &attr.layout {
        Some(layout) if layout.chunk_size >= 4096 => layout.chunk_size.min(MAX_WRITE),
        _ => 4096,
    };
    let ctime = system_time(attr.ctime_ns);
    FileAttr {
        ino: INodeNo(attr.ino.0),
        size: attr.length,
        blocks: attr.length.div_ceil(512),
        atime: system_time(attr.atime_ns),
        mtime: system_time(attr.mtime_ns),
        ctime,
        crtime: ctime,
        kind: kind_of(attr.kind),
        perm: (attr.mode & 0o7777) as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        // The kernel's own encoding, as mknod sent it.
        rdev: attr.rdev as u32,
        blksize,
        flags: 0,
    }
}

/// The largest size a file of this layout can have (the client refuses
/// I/O beyond it with EFBIG).
fn max_file_size(attr: &Attr) -> u64 {
    attr.layout
        .as_ref()
        .map_or(u64::MAX, |layout| u64::from(layout.chunk_size) << 32)
}

/// `access(2)` against mode bits, for mounts without
/// `default_permissions`.
fn may_access(attr: &Attr, user: &User, mask: i32) -> bool {
    let mask = (mask & (libc::R_OK | libc::W_OK | libc::X_OK)) as u32;
    if mask == 0 {
        return true;
    }
    if user.uid == 0 {
        // Root may read and write anything, and execute what anyone may.
        return mask & libc::X_OK as u32 == 0
            || attr.kind == FileType::Directory
            || attr.mode & 0o111 != 0;
    }
    let bits = if attr.uid == user.uid {
        attr.mode >> 6
    } else if attr.gid == user.gid || user.groups.contains(&attr.gid) {
        attr.mode >> 3
    } else {
        attr.mode
    } & 7;
    bits & mask == mask
}

/// The errno of a failed request, logged: quietly for what callers get
/// every day (ENOENT, EEXIST, EACCES...), loudly for what means trouble.
fn log_failure(op: &'static str, error: &FsError) {
    match error.errno {
        libc::EIO | libc::ETIMEDOUT | libc::ENOTCONN | libc::ECONNREFUSED | libc::ENOSPC => {
            tracing::warn!(
                op,
                errno = error.errno,
                "FUSE request failed: {}",
                error.message
            );
        }
        _ => tracing::debug!(
            op,
            errno = error.errno,
            "FUSE request failed: {}",
            error.message
        ),
    }
}

/// A reply that can carry an error (every fuser reply type).
trait ErrorReply: Send + 'static {
    fn fail(self, errno: Errno);
}

macro_rules! error_reply {
    ($($t:ty),* $(,)?) => {
        $(impl ErrorReply for $t {
            fn fail(self, errno: Errno) {
                self.error(errno);
            }
        })*
    };
}

error_reply!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyLseek,
    ReplyOpen,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr,
);

/// The answer to an xattr request: the whole value, or its size when the
/// caller only asked how big a buffer to bring.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        match u32::try_from(value.len()) {
            Ok(len) => reply.size(len),
            Err(_) => reply.error(Errno::from_i32(libc::E2BIG)),
        }
    } else if value.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(value);
    }
}

impl<N: Network> FuseFs<N> {
    pub fn new(client: Arc<FsClient<N>>, runtime: Handle, options: FuseOptions) -> FuseFs<N> {
        FuseFs {
            shared: Arc::new(Shared {
                client,
                options,
                files: Mutex::new(HashMap::new()),
                dirs: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                in_flight: InFlight::default(),
            }),
            runtime,
        }
    }

    /// Runs `work` as a task and answers the kernel with its outcome:
    /// `done` turns a success into the reply, an error becomes its errno,
    /// a panic EIO. Counts and times the request.
    fn spawn<R, T, F, D>(&self, op: &'static str, reply: R, work: F, done: D)
    where
        R: ErrorReply,
        T: Send + 'static,
        F: Future<Output = Result<T, FsError>> + Send + 'static,
        D: FnOnce(R, T) + Send + 'static,
    {
        metrics::counter!("flyfs_fuse_requests_total", "op" => op).increment(1);
        let shared = self.shared.clone();
        shared.in_flight.begin();
        let start = Instant::now();
        self.runtime.spawn(async move {
            match AssertUnwindSafe(work).catch_unwind().await {
                Ok(Ok(value)) => {
                    // A panic while answering drops the reply, which
                    // answers EIO itself.
                    if std::panic::catch_unwind(AssertUnwindSafe(|| done(reply, value))).is_err() {
                        metrics::counter!("flyfs_fuse_errors_total", "op" => op).increment(1);
                        tracing::error!(op, "FUSE request panicked while replying; answered EIO");
                    }
                }
                Ok(Err(error)) => {
                    metrics::counter!("flyfs_fuse_errors_total", "op" => op).increment(1);
                    log_failure(op, &error);
                    reply.fail(Errno::from_i32(error.errno));
                }
                Err(panic) => {
                    metrics::counter!("flyfs_fuse_errors_total", "op" => op).increment(1);
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(op, "FUSE request panicked: {what}; answered EIO");
                    reply.fail(Errno::EIO);
                }
            }
            metrics::histogram!("flyfs_fuse_request_seconds", "op" => op)
                .record(start.elapsed().as_secs_f64());
            shared.in_flight.end();
        });
    }

    fn file(&self, fh: fuser::FileHandle) -> Result<Arc<FileHandle>, FsError> {
        self.shared
            .files
            .lock()
            .get(&fh.0)
            .cloned()
            .ok_or_else(|| fail(libc::EBADF, format!("no open file {}", fh.0)))
    }

    fn dir(&self, fh: fuser::FileHandle) -> Result<Arc<DirHandle>, FsError> {
        self.shared
            .dirs
            .lock()
            .get(&fh.0)
            .cloned()
            .ok_or_else(|| fail(libc::EBADF, format!("no open directory {}", fh.0)))
    }

    /// Answers a request that failed before any task was needed.
    fn refuse<R: ErrorReply>(&self, op: &'static str, reply: R, error: &FsError) {
        metrics::counter!("flyfs_fuse_requests_total", "op" => op).increment(1);
        metrics::counter!("flyfs_fuse_errors_total", "op" => op).increment(1);
        log_failure(op, error);
        reply.fail(Errno::from_i32(error.errno));
    }

    fn reply_entry(shared: &Shared<N>, reply: ReplyEntry, attr: &Attr) {
        reply.entry_with_ttls(
            &shared.options.attr_ttl,
            &shared.options.entry_ttl,
            &file_attr(attr),
            Generation(0),
        );
    }
}

impl<N: Network> Shared<N> {
    fn register_file(&self, handle: Arc<FileHandle>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().insert(fh, handle);
        fh
    }
}

impl Listing {
    /// Fetches the next page from the service.
    async fn fetch<N: Network>(
        &mut self,
        client: &FsClient<N>,
        dir: &DirHandle,
        plus: bool,
    ) -> Result<(), FsError> {
        let after = match self.entries.len() {
            0..=2 => Vec::new(),
            n => self.entries[n - 1].name.clone(),
        };
        let rsp = client
            .readdir(&dir.user, dir.ino, &after, READDIR_PAGE, plus)
            .await?;
        self.more = rsp.more;
        self.entries.extend(rsp.entries.into_iter().map(|e| Item {
            name: e.name,
            ino: e.ino,
            kind: e.kind,
            attr: e.attr,
            gone: false,
        }));
        Ok(())
    }

    /// Starts (or, after a rewind, restarts) the listing with `.` and `..`
    /// and the first page.
    async fn start<N: Network>(
        &mut self,
        client: &FsClient<N>,
        dir: &DirHandle,
        plus: bool,
    ) -> Result<(), FsError> {
        // `..` is looked up alongside the first page: its inode number is
        // what readdir shows for it.
        let (this, parent) = tokio::join!(
            client.stat(&dir.user, dir.ino),
            client.lookup(&dir.user, dir.ino, b".."),
        );
        let this = this?;
        let parent = parent.unwrap_or_else(|_| this.clone());
        self.entries.clear();
        for (name, attr) in [(&b"."[..], this), (&b".."[..], parent)] {
            self.entries.push(Item {
                name: name.to_vec(),
                ino: attr.ino,
                kind: FileType::Directory,
                attr: Some(attr),
                gone: false,
            });
        }
        self.more = true;
        self.started = true;
        self.fetch(client, dir, plus).await
    }

    /// Makes entry `index` available if the directory has it.
    async fn reach<N: Network>(
        &mut self,
        client: &FsClient<N>,
        dir: &DirHandle,
        index: usize,
        plus: bool,
    ) -> Result<bool, FsError> {
        while index >= self.entries.len() && self.more {
            self.fetch(client, dir, plus).await?;
        }
        Ok(index < self.entries.len())
    }

    /// Fetches the attributes of the entries from `index` on that were
    /// listed without them (a readdirplus after a plain readdir).
    async fn fill_attrs<N: Network>(&mut self, client: &FsClient<N>, user: &User, index: usize) {
        let end = (index + READDIRPLUS_STAT_BATCH).min(self.entries.len());
        let missing: Vec<usize> = (index..end)
            .filter(|&i| self.entries[i].attr.is_none() && !self.entries[i].gone)
            .collect();
        let stats = futures::future::join_all(
            missing
                .iter()
                .map(|&i| client.stat(user, self.entries[i].ino)),
        )
        .await;
        for (i, stat) in missing.into_iter().zip(stats) {
            match stat {
                Ok(attr) => self.entries[i].attr = Some(attr),
                // Removed since it was listed: listed without it.
                Err(_) => self.entries[i].gone = true,
            }
        }
    }
}

/// Session handles of a mounted file system.
pub struct FuseMount {
    unmounter: SessionUnmounter,
    ended: Option<oneshot::Receiver<io::Result<()>>>,
    in_flight: Arc<dyn IdleWait>,
}

/// The part of [`Shared`] a [`FuseMount`] needs, without its network type.
trait IdleWait: Send + Sync {
    fn wait_idle(&self) -> futures::future::BoxFuture<'_, ()>;
}

impl<N: Network> IdleWait for Shared<N> {
    fn wait_idle(&self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(self.in_flight.wait_idle())
    }
}

/// Mounts `client` at `mount_point` and serves it on `options.threads`
/// threads. Blocks until the kernel has answered the mount (call it off
/// the runtime's threads).
pub fn mount<N: Network>(
    client: Arc<FsClient<N>>,
    runtime: Handle,
    mount_point: &Path,
    options: &FuseOptions,
) -> io::Result<FuseMount> {
    let mut mount_options = vec![
        MountOption::FSName("flyfs".into()),
        MountOption::Subtype("flyfs".into()),
        // The kernel never updates atime on FUSE files and the metadata
        // service does not on reads: say so.
        MountOption::NoAtime,
        // Device nodes cannot be created here.
        MountOption::NoDev,
    ];
    if options.default_permissions {
        mount_options.push(MountOption::DefaultPermissions);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let threads = options.threads.max(1);
    config.n_threads = Some(threads);
    config.clone_fd = threads > 1;
    let fs = FuseFs::new(client, runtime, options.clone());
    let shared: Arc<dyn IdleWait> = fs.shared.clone();
    let mut session = Session::new(fs, mount_point, &config)?;
    let unmounter = session.unmount_callable();
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("flyfs-fuse".into())
        .spawn(move || {
            // Nobody listening means the daemon is exiting anyway.
            let _ = tx.send(session.run());
        })?;
    Ok(FuseMount {
        unmounter,
        ended: Some(rx),
        in_flight: shared,
    })
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("ended", &self.ended.is_none())
            .finish_non_exhaustive()
    }
}

impl FuseMount {
    /// Unmounts (plain `umount(2)`: EBUSY while files are open).
    pub fn unmount(&mut self) -> io::Result<()> {
        self.unmounter.unmount()
    }

    /// Resolves when the session ends (unmounted, here or by `umount`),
    /// with its error if it failed.
    pub async fn ended(&mut self) -> io::Result<()> {
        match self.ended.as_mut() {
            Some(rx) => {
                let result = rx
                    .await
                    .unwrap_or_else(|_| Err(io::Error::other("the FUSE session thread died")));
                self.ended = None;
                result
            }
            None => std::future::pending().await,
        }
    }

    /// Waits until no request is being served.
    pub async fn wait_idle(&self) {
        self.in_flight.wait_idle().await;
    }
}

#[allow(clippy::too_many_arguments)]
impl<N: Network> Filesystem for FuseFs<N> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(self.shared.options.max_readahead) {
            // The kernel offers less than asked: take what it offers.
            let _ = config.set_max_readahead(max);
        }
        // Read-ahead and async reads of many files in flight at once.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // O_TRUNC in open (one call instead of setattr + open); parallel
        // lookups in one directory (the service is stateless); listings
        // with attributes when the kernel sees they would be looked up;
        // symlink targets cached (they never change); pages dropped when
        // another client changed a file; async direct I/O.
        let wanted = InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_AUTO_INVAL_DATA
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_MAX_PAGES;
        let granted = wanted & config.capabilities();
        if let Err(missing) = config.add_capabilities(granted) {
            tracing::debug!("kernel refused FUSE capabilities {missing:?}");
        }
        tracing::debug!(
            "FUSE init: kernel ABI {:?}, capabilities {:?}",
            config.kernel_abi(),
            granted
        );
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        if let Err(e) = check_name(&name) {
            return self.refuse("lookup", reply, &e);
        }
        let caller = Caller::of(req);
        let shared = self.shared.clone();
        let client = self.shared.client.clone();
        self.spawn(
            "lookup",
            reply,
            async move {
                client
                    .lookup(&caller.user(), InodeId(parent.0), &name)
                    .await
            },
            move |reply, attr| Self::reply_entry(&shared, reply, &attr),
        );
    }

    fn getattr(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: ReplyAttr,
    ) {
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        let ttl = self.shared.options.attr_ttl;
        self.spawn(
            "getattr",
            reply,
            async move { client.stat(&caller.user(), InodeId(ino.0)).await },
            move |reply, attr| reply.attr(&ttl, &file_attr(&attr)),
        );
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<fuser::FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The client finds a file's buffered data by inode: a truncate
        // through a handle (ftruncate) needs the handle only for its
        // permission (below).
        let through_writer = uid.is_none()
            && gid.is_none()
            && size.is_some()
            && fh.is_some_and(|fh| self.file(fh).is_ok_and(|h| h.mode().write));
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        let ttl = self.shared.options.attr_ttl;
        self.spawn(
            "setattr",
            reply,
            async move {
                client
                    .setattr(SetAttrReq {
                        user: if through_writer {
                            // ftruncate(2) on a descriptor open for writing
                            // needs no write permission now (the open
                            // checked it): the metadata service, which
                            // checks the caller's, hears it from root. The
                            // kernel sends a handle only for that, and any
                            // mode with it only drops setuid/setgid bits.
                            User::root()
                        } else {
                            caller.user()
                        },
                        ino: InodeId(ino.0),
                        // The kernel sends the type bits too.
                        mode: mode.map(|m| m & 0o7777),
                        uid,
                        gid,
                        size,
                        atime: atime.map(set_time),
                        mtime: mtime.map(set_time),
                    })
                    .await
            },
            move |reply, attr| reply.attr(&ttl, &file_attr(&attr)),
        );
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "readlink",
            reply,
            async move { client.readlink(&caller.user(), InodeId(ino.0)).await },
            |reply, target| reply.data(&target),
        );
    }

    /// Regular files are created (and closed) like `creat(2)`; FIFOs,
    /// sockets and device nodes are inodes of the metadata service (the
    /// kernel serves their I/O itself; the mount is `nodev`).
    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let name = name.as_bytes().to_vec();
        if let Err(e) = check_name(&name) {
            return self.refuse("mknod", reply, &e);
        }
        let special = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => None,
            libc::S_IFIFO => Some(FileType::Fifo),
            libc::S_IFSOCK => Some(FileType::Socket),
            libc::S_IFCHR => Some(FileType::CharDevice),
            libc::S_IFBLK => Some(FileType::BlockDevice),
            kind => {
                let e = fail(libc::EINVAL, format!("mknod of type {kind:#o}"));
                return self.refuse("mknod", reply, &e);
            }
        };
        let caller = Caller::of(req);
        let shared = self.shared.clone();
        let client = self.shared.client.clone();
        self.spawn(
            "mknod",
            reply,
            async move {
                let user = caller.user();
                if let Some(kind) = special {
                    // The kernel's device encoding (new_encode_dev), kept
                    // as is and handed back in `stat`.
                    let rdev = u64::from(rdev);
                    return client
                        .mknod(&user, InodeId(parent.0), &name, kind, mode & 0o7777, rdev)
                        .await;
                }
                let (attr, handle) = client
                    .create(
                        &user,
                        InodeId(parent.0),
                        &name,
                        mode & 0o7777,
                        OpenMode::default(),
                        true,
                    )
                    .await?;
                client.release(&handle).await?;
                Ok(attr)
            },
            move |reply, attr| Self::reply_entry(&shared, reply, &attr),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let name = name.as_bytes().to_vec();
        if let Err(e) = check_name(&name) {
            return self.refuse("mkdir", reply, &e);
        }
        let caller = Caller::of(req);
        let shared = self.shared.clone();
        let client = self.shared.client.clone();
        self.spawn(
            "mkdir",
            reply,
            async move {
                client
                    .mkdir(&caller.user(), InodeId(parent.0), &name, mode & 0o7777)
                    .await
            },
            move |reply, attr| Self::reply_entry(&shared, reply, &attr),
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        if let Err(e) = check_name(&name) {
            return self.refuse("unlink", reply, &e);
        }
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "unlink",
            reply,
            async move {
                client
                    .unlink(&caller.user(), InodeId(parent.0), &name)
                    .await
            },
            |reply, ()| reply.ok(),
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        if let Err(e) = check_name(&name) {
            return self.refuse("rmdir", reply, &e);
        }
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "rmdir",
            reply,
            async move { client.rmdir(&caller.user(), InodeId(parent.0), &name).await },
            |reply, ()| reply.ok(),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let name = link_name.as_bytes().to_vec();
        if let Err(e) = check_name(&name) {
            return self.refuse("symlink", reply, &e);
        }
        let target = target.as_os_str().as_bytes().to_vec();
        let caller = Caller::of(req);
        let shared = self.shared.clone();
        let client = self.shared.client.clone();
        self.spawn(
            "symlink",
            reply,
            async move {
                client
                    .symlink(&caller.user(), InodeId(parent.0), &name, &target)
                    .await
            },
            move |reply, attr| Self::reply_entry(&shared, reply, &attr),
        );
    }

    /// Plain renames only: RENAME_NOREPLACE would need the check and the
    /// rename in one metadata transaction (a lookup first races with other
    /// clients), and RENAME_EXCHANGE is not supported either; both are
    /// EINVAL, after which `mv` falls back to a plain rename.
    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let name = name.as_bytes().to_vec();
        let newname = newname.as_bytes().to_vec();
        if let Err(e) = check_name(&name).and_then(|()| check_name(&newname)) {
            return self.refuse("rename", reply, &e);
        }
        if !flags.is_empty() {
            let e = fail(
                libc::EINVAL,
                format!("rename flags {flags:?} not supported"),
            );
            return self.refuse("rename", reply, &e);
        }
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "rename",
            reply,
            async move {
                client
                    .rename(
                        &caller.user(),
                        InodeId(parent.0),
                        &name,
                        InodeId(newparent.0),
                        &newname,
                    )
                    .await
            },
            |reply, ()| reply.ok(),
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let name = newname.as_bytes().to_vec();
        if let Err(e) = check_name(&name) {
            return self.refuse("link", reply, &e);
        }
        let caller = Caller::of(req);
        let shared = self.shared.clone();
        let client = self.shared.client.clone();
        self.spawn(
            "link",
            reply,
            async move {
                client
                    .link(&caller.user(), InodeId(ino.0), InodeId(newparent.0), &name)
                    .await
            },
            move |reply, attr| Self::reply_entry(&shared, reply, &attr),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let caller = Caller::of(req);
        let shared = self.shared.clone();
        let client = self.shared.client.clone();
        self.spawn(
            "open",
            reply,
            async move {
                let (_, handle) = client
                    .open(
                        &caller.user(),
                        InodeId(ino.0),
                        OpenMode::from_flags(flags.0),
                    )
                    .await?;
                Ok(shared.register_file(handle))
            },
            // No keep_cache: close-to-open needs the kernel to drop what
            // it cached before this open.
            |reply, fh| reply.opened(fuser::FileHandle(fh), FopenFlags::empty()),
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let handle = match self.file(fh) {
            Ok(handle) => handle,
            Err(e) => return self.refuse("read", reply, &e),
        };
        let client = self.shared.client.clone();
        self.spawn(
            "read",
            reply,
            async move { client.read(&handle, offset, size).await },
            |reply, data| {
                metrics::counter!("flyfs_fuse_read_bytes_total").increment(data.len() as u64);
                reply.data(&data);
            },
        );
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let handle = match self.file(fh) {
            Ok(handle) => handle,
            Err(e) => return self.refuse("write", reply, &e),
        };
        if !handle.mode().write {
            let e = fail(
                libc::EBADF,
                format!("{:?} is not open for writing", handle.ino()),
            );
            return self.refuse("write", reply, &e);
        }
        let Ok(len) = u32::try_from(data.len()) else {
            return self.refuse("write", reply, &fail(libc::EINVAL, "write over 4 GiB"));
        };
        // The request buffer is reused once this returns: the task needs
        // its own copy.
        let data = data.to_vec();
        let client = self.shared.client.clone();
        self.spawn(
            "write",
            reply,
            async move { client.write(&handle, offset, &data).await },
            move |reply, ()| {
                metrics::counter!("flyfs_fuse_write_bytes_total").increment(u64::from(len));
                reply.written(len);
            },
        );
    }

    /// Every `close(2)`: the data reaches storage and the length the
    /// metadata service, so a close that returns 0 means it is all there.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let handle = match self.file(fh) {
            Ok(handle) => handle,
            Err(e) => return self.refuse("flush", reply, &e),
        };
        let client = self.shared.client.clone();
        self.spawn(
            "flush",
            reply,
            async move { client.flush(&handle).await },
            |reply, ()| reply.ok(),
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let Some(handle) = self.shared.files.lock().remove(&fh.0) else {
            let e = fail(libc::EBADF, format!("no open file {}", fh.0));
            return self.refuse("release", reply, &e);
        };
        let client = self.shared.client.clone();
        self.spawn(
            "release",
            reply,
            async move { client.release(&handle).await },
            |reply, ()| reply.ok(),
        );
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let handle = match self.file(fh) {
            Ok(handle) => handle,
            Err(e) => return self.refuse("fsync", reply, &e),
        };
        let client = self.shared.client.clone();
        self.spawn(
            "fsync",
            reply,
            async move { client.fsync(&handle).await },
            |reply, ()| reply.ok(),
        );
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let caller = Caller::of(req);
        let shared = self.shared.clone();
        self.spawn(
            "opendir",
            reply,
            async move {
                let dir = Arc::new(DirHandle {
                    ino: InodeId(ino.0),
                    user: caller.user(),
                    listing: tokio::sync::Mutex::new(Listing::default()),
                });
                let fh = shared.next_fh.fetch_add(1, Ordering::Relaxed);
                shared.dirs.lock().insert(fh, dir);
                Ok(fh)
            },
            |reply, fh| reply.opened(fuser::FileHandle(fh), FopenFlags::empty()),
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match self.dir(fh) {
            Ok(dir) => dir,
            Err(e) => return self.refuse("readdir", reply, &e),
        };
        let client = self.shared.client.clone();
        self.spawn(
            "readdir",
            (),
            async move {
                let mut listing = dir.listing.lock().await;
                let result: Result<(), FsError> = async {
                    if offset == 0 || !listing.started {
                        listing.start(&client, &dir, false).await?;
                    }
                    let mut index = offset as usize;
                    while listing.reach(&client, &dir, index, false).await? {
                        let item = &listing.entries[index];
                        let full = reply.add(
                            INodeNo(item.ino.0),
                            index as u64 + 1,
                            kind_of(item.kind),
                            OsStr::from_bytes(&item.name),
                        );
                        if full {
                            break;
                        }
                        index += 1;
                    }
                    Ok(())
                }
                .await;
                match result {
                    Ok(()) => reply.ok(),
                    Err(e) => {
                        let errno = e.errno;
                        reply.error(Errno::from_i32(errno));
                        return Err(e);
                    }
                }
                Ok(())
            },
            |(), ()| {},
        );
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dir = match self.dir(fh) {
            Ok(dir) => dir,
            Err(e) => return self.refuse("readdirplus", reply, &e),
        };
        let client = self.shared.client.clone();
        let ttl = self.shared.options.entry_ttl;
        self.spawn(
            "readdirplus",
            (),
            async move {
                let mut listing = dir.listing.lock().await;
                let result: Result<(), FsError> = async {
                    if offset == 0 || !listing.started {
                        listing.start(&client, &dir, true).await?;
                    }
                    let mut index = offset as usize;
                    while listing.reach(&client, &dir, index, true).await? {
                        if listing.entries[index].attr.is_none() && !listing.entries[index].gone {
                            listing.fill_attrs(&client, &dir.user, index).await;
                        }
                        let item = &listing.entries[index];
                        if let (Some(attr), false) = (&item.attr, item.gone) {
                            let full = reply.add(
                                INodeNo(item.ino.0),
                                index as u64 + 1,
                                OsStr::from_bytes(&item.name),
                                &ttl,
                                &file_attr(attr),
                                Generation(0),
                            );
                            if full {
                                break;
                            }
                        }
                        index += 1;
                    }
                    Ok(())
                }
                .await;
                match result {
                    Ok(()) => reply.ok(),
                    Err(e) => {
                        reply.error(Errno::from_i32(e.errno));
                        return Err(e);
                    }
                }
                Ok(())
            },
            |(), ()| {},
        );
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.shared.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    /// Directory changes are durable when the metadata service answers.
    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: fuser::FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "statfs",
            reply,
            async move { client.statfs(&caller.user()).await },
            |reply, rsp| {
                const BSIZE: u64 = 4096;
                // Inodes are not a limited resource here.
                const FILES: u64 = 1 << 40;
                let free = rsp.bytes_free / BSIZE;
                reply.statfs(
                    rsp.bytes_total / BSIZE,
                    free,
                    free,
                    FILES,
                    FILES,
                    BSIZE as u32,
                    NAME_MAX as u32,
                    BSIZE as u32,
                );
            },
        );
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let name = name.as_bytes().to_vec();
        if name == XATTR_CAPS {
            let e = fail(libc::EOPNOTSUPP, "file capabilities are not supported");
            return self.refuse("setxattr", reply, &e);
        }
        let mode = match flags & (libc::XATTR_CREATE | libc::XATTR_REPLACE) {
            0 => XattrMode::Any,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => {
                let e = fail(libc::EINVAL, "XATTR_CREATE and XATTR_REPLACE together");
                return self.refuse("setxattr", reply, &e);
            }
        };
        let value = value.to_vec();
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "setxattr",
            reply,
            async move {
                client
                    .setxattr(&caller.user(), InodeId(ino.0), &name, &value, mode)
                    .await
            },
            |reply, ()| reply.ok(),
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes().to_vec();
        if name == XATTR_CAPS {
            return reply.error(Errno::from_i32(libc::ENODATA));
        }
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "getxattr",
            reply,
            async move { client.getxattr(&caller.user(), InodeId(ino.0), &name).await },
            move |reply, value| reply_xattr(reply, size, &value),
        );
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "listxattr",
            reply,
            async move { client.listxattr(&caller.user(), InodeId(ino.0)).await },
            move |reply, names| {
                let mut list = Vec::new();
                for name in names {
                    list.extend_from_slice(&name);
                    list.push(0);
                }
                reply_xattr(reply, size, &list);
            },
        );
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "removexattr",
            reply,
            async move {
                client
                    .removexattr(&caller.user(), InodeId(ino.0), &name)
                    .await
            },
            |reply, ()| reply.ok(),
        );
    }

    /// Only called without `default_permissions` (the kernel checks
    /// otherwise).
    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "access",
            reply,
            async move {
                let user = caller.user();
                let attr = client.stat(&user, InodeId(ino.0)).await?;
                if may_access(&attr, &user, mask.bits()) {
                    Ok(())
                } else {
                    Err(fail(
                        libc::EACCES,
                        format!("access {mask:?} to {:?}", attr.ino),
                    ))
                }
            },
            |reply, ()| reply.ok(),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name.as_bytes().to_vec();
        if let Err(e) = check_name(&name) {
            return self.refuse("create", reply, &e);
        }
        let caller = Caller::of(req);
        let shared = self.shared.clone();
        let client = self.shared.client.clone();
        self.spawn(
            "create",
            reply,
            async move {
                let (attr, handle) = client
                    .create(
                        &caller.user(),
                        InodeId(parent.0),
                        &name,
                        mode & 0o7777,
                        OpenMode::from_flags(flags),
                        flags & libc::O_EXCL != 0,
                    )
                    .await?;
                let fh = shared.register_file(handle);
                Ok((attr, fh, shared))
            },
            |reply, (attr, fh, shared)| {
                reply.created(
                    &shared.options.entry_ttl,
                    &file_attr(&attr),
                    Generation(0),
                    fuser::FileHandle(fh),
                    FopenFlags::empty(),
                );
            },
        );
    }

    /// Mode 0 extends the file (there is nothing to reserve: storage
    /// allocates chunks as they are written, and holes read as zeros);
    /// `FALLOC_FL_KEEP_SIZE` has nothing to do; other modes (punching
    /// holes, zeroing or collapsing ranges) are not supported.
    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 && mode != libc::FALLOC_FL_KEEP_SIZE {
            let e = fail(libc::EOPNOTSUPP, format!("fallocate mode {mode:#x}"));
            return self.refuse("fallocate", reply, &e);
        }
        // Only through a descriptor open for writing (the kernel checks
        // too), and then, like ftruncate, no write permission is needed
        // now: the extension is asked for as root.
        if !self.file(fh).is_ok_and(|h| h.mode().write) {
            let e = fail(libc::EBADF, "fallocate needs a file open for writing");
            return self.refuse("fallocate", reply, &e);
        }
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "fallocate",
            reply,
            async move {
                let user = caller.user();
                let attr = client.stat(&user, InodeId(ino.0)).await?;
                let end = offset
                    .checked_add(length)
                    .filter(|&end| end <= max_file_size(&attr))
                    .ok_or_else(|| fail(libc::EFBIG, "fallocate beyond the largest file size"))?;
                if mode == 0 && end > attr.length {
                    client
                        .setattr(SetAttrReq {
                            user: User::root(),
                            ino: attr.ino,
                            mode: None,
                            uid: None,
                            gid: None,
                            size: Some(end),
                            atime: None,
                            mtime: None,
                        })
                        .await?;
                }
                Ok(())
            },
            |reply, ()| reply.ok(),
        );
    }

    /// No ioctls (isatty() probes land here): ENOTTY, as for any file
    /// that is not a terminal.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: fuser::FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    /// The kernel handles SEEK_SET, SEEK_CUR and SEEK_END itself; here are
    /// SEEK_DATA and SEEK_HOLE, for files that are data throughout (holes
    /// are not tracked).
    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: fuser::FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let caller = Caller::of(req);
        let client = self.shared.client.clone();
        self.spawn(
            "lseek",
            reply,
            async move {
                let size = client.stat(&caller.user(), InodeId(ino.0)).await?.length;
                let size = i64::try_from(size).unwrap_or(i64::MAX);
                match whence {
                    libc::SEEK_SET => Ok(offset),
                    libc::SEEK_END => Ok(size.saturating_add(offset)),
                    libc::SEEK_DATA | libc::SEEK_HOLE if offset < 0 || offset >= size => Err(fail(
                        libc::ENXIO,
                        format!("seek to {offset} of {size} bytes"),
                    )),
                    libc::SEEK_DATA => Ok(offset),
                    libc::SEEK_HOLE => Ok(size),
                    _ => Err(fail(libc::EINVAL, format!("lseek whence {whence}"))),
                }
            },
            |reply, offset| reply.offset(offset),
        );
    }
}

impl ErrorReply for () {
    /// For requests that answer the kernel themselves.
    fn fail(self, _errno: Errno) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_both_sides_of_the_epoch() {
        for ns in [0, 1, 1_700_000_000_123_456_789, -1, -1_500_000_000] {
            assert_eq!(nanos(system_time(ns)), ns);
        }
    }

    #[test]
    fn kernel_times_before_the_epoch_keep_their_fraction() {
        // What fuser 0.18 makes of the kernel's (-2 s, 0.5e9 ns) = -1.5 s.
        let decoded = UNIX_EPOCH - Duration::new(2, 500_000_000);
        assert_eq!(kernel_time_ns(decoded), -1_500_000_000);
        assert_eq!(
            kernel_time_ns(UNIX_EPOCH - Duration::from_secs(3)),
            -3_000_000_000
        );
        let after = UNIX_EPOCH + Duration::new(5, 7);
        assert_eq!(kernel_time_ns(after), 5_000_000_007);
    }

    #[test]
    fn access_by_owner_group_and_others() {
        let attr = Attr {
            uid: 10,
            gid: 20,
            mode: 0o640,
            ..Attr::default()
        };
        let owner = User {
            uid: 10,
            gid: 99,
            groups: vec![],
        };
        let member = User {
            uid: 11,
            gid: 99,
            groups: vec![20],
        };
        let other = User {
            uid: 12,
            gid: 99,
            groups: vec![],
        };
        assert!(may_access(&attr, &owner, libc::R_OK | libc::W_OK));
        assert!(!may_access(&attr, &owner, libc::X_OK));
        assert!(may_access(&attr, &member, libc::R_OK));
        assert!(!may_access(&attr, &member, libc::W_OK));
        assert!(!may_access(&attr, &other, libc::R_OK));
        assert!(may_access(&attr, &other, libc::F_OK));
        assert!(may_access(&attr, &User::root(), libc::R_OK | libc::W_OK));
        assert!(!may_access(&attr, &User::root(), libc::X_OK));
    }

    #[test]
    fn groups_of_this_process() {
        let pid = std::process::id();
        // Whatever they are, they parse (and a missing pid has none).
        let _ = groups_of(pid);
        assert!(groups_of(0).is_empty());
        assert!(groups_of(u32::MAX).is_empty());
    }

    #[test]
    fn names_over_255_bytes_are_refused() {
        assert!(check_name(&[b'a'; 255]).is_ok());
        assert_eq!(
            check_name(&[b'a'; 256]).expect_err("too long").errno,
            libc::ENAMETOOLONG
        );
    }
}
