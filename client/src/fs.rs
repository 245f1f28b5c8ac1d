//! [`FsClient`]: files and directories on a flyfs cluster.
//!
//! Namespace operations are one call each to the (stateless) metadata
//! service. File data never passes through it: chunk `i` of a file is
//! `ChunkId(ino, i)` on chain `layout.chain_of(i)`, so the client computes
//! placement itself and talks to the storage chains directly, with many
//! chunk I/Os in flight across chains.
//!
//! Consistency is close-to-open, as NFS and 3FS give: what a handle wrote
//! is on storage and the file's length is fixed in the metadata service
//! once `flush` (every `close(2)`), `fsync` or `release` returns; an `open`
//! after that sees it. Between those points the client keeps a bounded
//! write-back buffer per file and reports its growing length as a hint, and
//! every attribute it hands out carries the length as this client knows it
//! (so a `stat` after a buffered write shows the write).
//!
//! From its first write session on, the client keeps one lease for all its
//! sessions ([`RenewLease`], every third of the lease the service answers
//! with), on a task that ends with the client. A client that dies stops
//! renewing, and the metadata service ends its sessions one lease later, so
//! the files it was writing get their exact length and GC can reclaim the
//! ones it had unlinked.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::cache::{BlockCache, BlockCacheStats};
use crate::meta::MetaClient;
use crate::storage::StorageClient;
use bytes::Bytes;
use flyfs_proto::Method;
use flyfs_proto::frame::Status;
use flyfs_proto::ids::{ClientId, InodeId};
use flyfs_proto::wire::meta::{
    Attr, Close, Create, CreateReq, EntryReq, FileType, GetXattr, LengthHint, LengthHintReq, Link,
    LinkReq, ListXattr, Lookup, LookupReq, Mkdir, MkdirReq, Mknod, MknodReq, Open, OpenReq,
    OpenRsp, Readdir, ReaddirReq, ReaddirRsp, Readlink, RemoveAll, RemoveXattr, Rename, RenameReq,
    RenewLease, RenewLeaseReq, Resolve, ResolveReq, Rmdir, SessionReq, SetAttr, SetAttrReq,
    SetTime, SetXattr, Stat, StatReq, Statfs, StatfsReq, StatfsRsp, Symlink, SymlinkReq, Sync,
    SyncNamespace, SyncNamespaceReq, SyncSetAttr, SyncSetAttrReq, SyncSetAttrs, SyncSetAttrsReq,
    Uninline, Unlink, User, WriterLength, XattrMode, XattrReq,
};
use flyfs_rpc::Network;
use parking_lot::Mutex;

use crate::FsError;
use crate::file::{FileState, InlineSync};

/// How a [`FsClient`] buffers and reads ahead.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// Write-back buffer of each open file: sequential writes collect here
    /// and go to storage whole chunks at a time.
    pub write_buffer_bytes: usize,
    /// Buffers of one file being written to storage at once; a writer
    /// waits when all are in flight (backpressure).
    pub write_flushes_in_flight: usize,
    /// The most a sequential reader is read ahead of.
    pub readahead_bytes_max: u64,
    /// How often a file being written reports its length to the metadata
    /// service (so other clients see it grow before it is closed).
    pub length_hint_interval: Duration,
    /// Root's changes of mode, owner and explicit times to a file this
    /// client writes through its only write session wait for the file's
    /// next sync point (a flush, fsync or close, or a write or another
    /// change that must come after them) and go with it, in order, in one
    /// request ([`SyncSetAttrs`]), at the latest `length_hint_interval`
    /// after the first: `tar x` makes three per file. Meanwhile this
    /// client answers with the changes made; other clients see them at
    /// that sync point, as they see the data (close-to-open). Root may
    /// make any such change, so none can be refused later, unless the
    /// metadata service squashes root: then turn this off, or a refused
    /// change fails the close instead of the call.
    pub defer_root_setattrs: bool,
    /// Bytes of the block cache random reads go through (`crate::cache`),
    /// shared by all files; 0 turns it off. It never answers with bytes
    /// a replica would not: each hit is checked against the chunk's
    /// committed version in the read's own round trip.
    pub block_cache_bytes: u64,
}

/// [`FsConfig::block_cache_bytes`] by default.
pub const BLOCK_CACHE_BYTES: u64 = 256 << 20;

impl Default for FsConfig {
    fn default() -> FsConfig {
        FsConfig {
            write_buffer_bytes: 8 << 20,
            write_flushes_in_flight: 4,
            readahead_bytes_max: 32 << 20,
            length_hint_interval: Duration::from_secs(1),
            defer_root_setattrs: true,
            block_cache_bytes: BLOCK_CACHE_BYTES,
        }
    }
}

/// What an open asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenMode {
    pub read: bool,
    pub write: bool,
    /// `O_TRUNC`.
    pub truncate: bool,
}

impl OpenMode {
    /// From `open(2)` flags.
    pub fn from_flags(flags: i32) -> OpenMode {
        let access = flags & libc::O_ACCMODE;
        OpenMode {
            read: access == libc::O_RDONLY || access == libc::O_RDWR,
            write: access == libc::O_WRONLY || access == libc::O_RDWR,
            truncate: flags & libc::O_TRUNC != 0,
        }
    }
}

/// An open file: the unit `read`, `write`, `flush` and `release` act on.
#[derive(Debug)]
pub struct FileHandle {
    pub(crate) state: Arc<FileState>,
    mode: OpenMode,
    user: User,
    /// The write session of a handle opened for writing.
    session: Option<u64>,
    /// Where this handle's last read ended (read-ahead detects sequential
    /// readers from it).
    pub(crate) read_end: AtomicU64,
    pub(crate) readahead: Mutex<crate::file::ReadAhead>,
}

impl FileHandle {
    pub fn ino(&self) -> InodeId {
        self.state.ino
    }

    pub fn mode(&self) -> OpenMode {
        self.mode
    }

    /// Whole chunks this handle's read-ahead has fetched so far.
    pub fn chunks_read_ahead(&self) -> u64 {
        self.readahead.lock().fetched()
    }

    /// A sync or close of this handle's write session.
    fn session_req(&self, session: u64) -> SessionReq {
        SessionReq {
            user: self.user.clone(),
            ino: self.ino(),
            session,
            length_known: false,
            writer_length: None,
            relaxed: false,
            inline: None,
        }
    }
}

/// The file client. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct FsClient<N: Network> {
    meta: Arc<MetaClient<N>>,
    storage: Arc<StorageClient<N>>,
    client: ClientId,
    config: FsConfig,
    cache: BlockCache,
    /// Open files, shared by all their handles in this client, so a write
    /// through one handle is seen by reads and stats through any other.
    files: Mutex<HashMap<InodeId, Weak<FileState>>>,
    /// Write session ids: chosen here so a retried open after a lost reply
    /// gets its own session back (see `CreateReq::session`).
    next_session: AtomicU64,
    /// This client, for its lease task, which must not keep it alive.
    this: Weak<FsClient<N>>,
    /// The metadata service answered `UnknownMethod` to `SyncSetAttr` (an
    /// older build): setattr and the writer's sync go apart.
    sync_setattr_refused: AtomicBool,
    /// The same for `SyncSetAttrs`: setattrs are then not deferred.
    sync_setattrs_refused: AtomicBool,
    /// Whether the lease task has been started (by the first write session:
    /// a client that only reads holds nothing to renew).
    renewing: AtomicBool,
}

/// The shortest wait between lease renewals, whatever the service says.
const RENEW_INTERVAL_MIN: Duration = Duration::from_millis(100);
/// The wait before renewing again after a renewal failed (the metadata
/// client already retried and failed over for its whole deadline).
const RENEW_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Renews the lease of `this`'s sessions until the client is dropped: at
/// once, then every third of the lease the service answers with, counted
/// from when each renewal was sent. Holding only a `Weak`, the task never
/// keeps a dropped client alive, so a client that goes away stops renewing
/// just as a crashed one does.
async fn renew_leases<N: Network>(this: Weak<FsClient<N>>) {
    loop {
        let Some(client) = this.upgrade() else {
            return;
        };
        let sent = tokio::time::Instant::now();
        let req = RenewLeaseReq {
            client: client.client,
        };
        let next = match client.meta.call::<RenewLease, _>(&req).await {
            Ok(rsp) => sent + Duration::from_millis(rsp.lease_ms / 3).max(RENEW_INTERVAL_MIN),
            Err(e) => {
                tracing::warn!(
                    client = ?client.client,
                    "renewing the lease of this client's write sessions failed; the metadata \
                     service ends them if this lasts a whole lease: {e}"
                );
                tokio::time::Instant::now() + RENEW_RETRY_INTERVAL
            }
        };
        drop(client);
        tokio::time::sleep_until(next).await;
    }
}

fn io_error(message: String) -> FsError {
    FsError {
        errno: libc::EIO,
        message,
        retryable: false,
    }
}

impl<N: Network> FsClient<N> {
    pub fn new(
        meta: Arc<MetaClient<N>>,
        storage: Arc<StorageClient<N>>,
        client: ClientId,
        config: FsConfig,
    ) -> Arc<FsClient<N>> {
        // Session ids must differ across restarts of one client id: start
        // from the clock. Only uniqueness matters here, not what time it
        // is (as with a random seed), so this reads the system's clock
        // rather than a flyfs_time::Clock.
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Arc::new_cyclic(|this| FsClient {
            meta,
            storage,
            client,
            cache: BlockCache::new(config.block_cache_bytes),
            config,
            files: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(now_ns),
            this: this.clone(),
            renewing: AtomicBool::new(false),
            sync_setattr_refused: AtomicBool::new(false),
            sync_setattrs_refused: AtomicBool::new(false),
        })
    }

    /// The block cache's counters.
    pub fn block_cache_stats(&self) -> BlockCacheStats {
        self.cache.stats()
    }

    pub fn meta(&self) -> &Arc<MetaClient<N>> {
        &self.meta
    }

    pub fn storage(&self) -> &Arc<StorageClient<N>> {
        &self.storage
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// The file's state if this client has it open.
    fn open_state(&self, ino: InodeId) -> Option<Arc<FileState>> {
        self.files.lock().get(&ino).and_then(Weak::upgrade)
    }

    /// `attr` as this client knows it: buffered and in-flight writes may
    /// have grown the file past what the metadata service has heard, and
    /// setattrs deferred here are not made there yet.
    pub fn local_attr(&self, mut attr: Attr) -> Attr {
        if attr.kind == FileType::File
            && let Some(state) = self.open_state(attr.ino)
        {
            attr.length = state.observe_length(attr.length, attr.truncate_version);
            state.observe_inline(attr.inline, attr.length);
            let mut deferred = state.deferred.lock();
            deferred.known = Some(attr.clone());
            deferred.apply(&mut attr);
        }
        attr
    }

    /// Defers `req` to the file's next sync point when it may be (see
    /// [`FsConfig::defer_root_setattrs`]): root's change, without a size or
    /// a time of "now" (the service's clock sets those), to a file this
    /// client writes through its only write session. Answers the file's
    /// attributes with every deferred change made.
    fn defer_setattr(&self, state: &Arc<FileState>, req: &SetAttrReq) -> Option<Attr> {
        if !self.config.defer_root_setattrs
            || self.sync_setattrs_refused.load(Ordering::Relaxed)
            || !req.user.is_root()
            || req.size.is_some()
            || [req.atime, req.mtime].contains(&Some(SetTime::Now))
        {
            return None;
        }
        let session = state.sole_session()?;
        let mut deferred = state.deferred.lock();
        let first = deferred.sets.is_empty();
        let mut attr = deferred.known.clone()?;
        if (!deferred.sets.is_empty() && deferred.session != session)
            || deferred.sets.len() >= SyncSetAttrsReq::SETS_MAX
        {
            return None;
        }
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        deferred.session = session;
        deferred.sets.push((req.clone(), now_ns));
        deferred.apply(&mut attr);
        attr.length = attr.length.max(state.writer_length().length);
        if first {
            // A writer that keeps the file open long (a log) still makes
            // them within the hint interval, as its length is reported.
            let (this, state) = (self.this.clone(), state.clone());
            let after = self.config.length_hint_interval;
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if let Some(this) = this.upgrade()
                    && let Err(e) = this.flush_deferred(&state).await
                {
                    tracing::debug!(ino = ?state.ino, "deferred setattrs not made yet: {e}");
                }
            });
        }
        Some(attr)
    }

    /// Makes the file's deferred setattrs, after the sync of the writes
    /// made before them, in one request ([`SyncSetAttrs`]); nothing when
    /// none waits. They stay deferred until made: a failure is the
    /// caller's, and the next sync point sends them again (each is
    /// idempotent). Visible when made, not necessarily durable: no caller
    /// but `fsync` needs more ([`flush_deferred_with`](Self::flush_deferred_with)).
    async fn flush_deferred(&self, state: &FileState) -> Result<bool, FsError> {
        self.flush_deferred_with(state, true).await
    }

    /// [`flush_deferred`](Self::flush_deferred), `relaxed` or durable when
    /// made; whether it made them (a metadata commit).
    async fn flush_deferred_with(&self, state: &FileState, relaxed: bool) -> Result<bool, FsError> {
        // The changes stay listed until they are made, so an empty list
        // means nothing is deferred or being made: no wait (every write
        // comes here).
        if state.deferred.lock().sets.is_empty() {
            return Ok(false);
        }
        // Whoever comes while changes are being made waits for them.
        let _making = state.deferred_flush.lock().await;
        let (session, sets) = {
            let deferred = state.deferred.lock();
            if deferred.sets.is_empty() {
                return Ok(false);
            }
            (deferred.session, deferred.sets.clone())
        };
        let sent = sets.len();
        // As in `flush`: the count first, then the length covering it.
        let writes = state.writes();
        let known = state.writer_length();
        let mut req = SyncSetAttrsReq {
            user: User::root(),
            ino: state.ino,
            session,
            writer_length: Some(known),
            sets: sets.into_iter().map(|(set, _)| set).collect(),
            relaxed,
            inline: None,
        };
        if let Some(inline) = state.take_inline().await {
            req.inline = Some(inline.bytes.to_vec());
            if let Some(attr) = self.settle_inline::<SyncSetAttrs>(inline, &req).await? {
                state.synced(writes);
                let mut deferred = state.deferred.lock();
                deferred.sets.drain(..sent);
                deferred.known = Some(attr);
                return Ok(true);
            }
            // Refused: no change was made either.
            req.inline = None;
        }
        self.drain_to_storage(state).await?;
        let unsynced = state.unsynced();
        req.writer_length = unsynced.then_some(known);
        match self.meta.call::<SyncSetAttrs, _>(&req).await {
            Ok(attr) => {
                if unsynced && attr.length >= known.length {
                    state.synced(writes);
                }
                let mut deferred = state.deferred.lock();
                deferred.sets.drain(..sent);
                deferred.known = Some(attr);
                Ok(true)
            }
            Err(e) if e.message.contains(&Status::UnknownMethod.to_string()) => {
                tracing::info!(
                    "the metadata service predates meta.SyncSetAttrs: setattrs are not \
                     deferred from now on ({e})"
                );
                self.sync_setattrs_refused.store(true, Ordering::Relaxed);
                if unsynced {
                    let sync = SessionReq {
                        user: User::root(),
                        ino: state.ino,
                        session,
                        length_known: false,
                        writer_length: Some(known),
                        relaxed,
                        inline: None,
                    };
                    self.meta.call::<Sync, _>(&sync).await?;
                    state.synced(writes);
                }
                for set in req.sets {
                    let set = SetAttrReq {
                        user: User::root(),
                        ino: state.ino,
                        ..set
                    };
                    self.meta.call::<SetAttr, _>(&set).await?;
                }
                state.deferred.lock().sets.drain(..sent);
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    // ---- namespace ----

    pub async fn statfs(&self, user: &User) -> Result<StatfsRsp, FsError> {
        self.meta
            .call::<Statfs, _>(&StatfsReq { user: user.clone() })
            .await
    }

    pub async fn stat(&self, user: &User, ino: InodeId) -> Result<Attr, FsError> {
        let req = StatReq {
            user: user.clone(),
            ino,
        };
        Ok(self.local_attr(self.meta.call::<Stat, _>(&req).await?))
    }

    pub async fn lookup(&self, user: &User, parent: InodeId, name: &[u8]) -> Result<Attr, FsError> {
        let req = LookupReq {
            user: user.clone(),
            parent,
            name: name.to_vec(),
        };
        Ok(self.local_attr(self.meta.call::<Lookup, _>(&req).await?))
    }

    /// A path from the root (absolute), for tools without a mount.
    pub async fn resolve(&self, user: &User, path: &[u8], follow: bool) -> Result<Attr, FsError> {
        let req = ResolveReq {
            user: user.clone(),
            path: path.to_vec(),
            follow,
        };
        Ok(self.local_attr(self.meta.call::<Resolve, _>(&req).await?))
    }

    pub async fn mkdir(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        mode: u32,
    ) -> Result<Attr, FsError> {
        let req = MkdirReq {
            user: user.clone(),
            parent,
            name: name.to_vec(),
            mode,
        };
        self.meta.call::<Mkdir, _>(&req).await
    }

    pub async fn symlink(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        target: &[u8],
    ) -> Result<Attr, FsError> {
        let req = SymlinkReq {
            user: user.clone(),
            parent,
            name: name.to_vec(),
            target: target.to_vec(),
        };
        self.meta.call::<Symlink, _>(&req).await
    }

    /// A FIFO, socket or device node (`kind`); regular files are made by
    /// [`create`](Self::create).
    pub async fn mknod(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        kind: FileType,
        mode: u32,
        rdev: u64,
    ) -> Result<Attr, FsError> {
        let req = MknodReq {
            user: user.clone(),
            parent,
            name: name.to_vec(),
            kind,
            mode,
            rdev,
        };
        self.meta.call::<Mknod, _>(&req).await
    }

    pub async fn readlink(&self, user: &User, ino: InodeId) -> Result<Vec<u8>, FsError> {
        let req = StatReq {
            user: user.clone(),
            ino,
        };
        Ok(self.meta.call::<Readlink, _>(&req).await?.target)
    }

    pub async fn link(
        &self,
        user: &User,
        ino: InodeId,
        new_parent: InodeId,
        new_name: &[u8],
    ) -> Result<Attr, FsError> {
        let req = LinkReq {
            user: user.clone(),
            ino,
            new_parent,
            new_name: new_name.to_vec(),
        };
        Ok(self.local_attr(self.meta.call::<Link, _>(&req).await?))
    }

    fn entry(user: &User, parent: InodeId, name: &[u8]) -> EntryReq {
        EntryReq {
            user: user.clone(),
            parent,
            name: name.to_vec(),
        }
    }

    pub async fn unlink(&self, user: &User, parent: InodeId, name: &[u8]) -> Result<(), FsError> {
        self.meta
            .call::<Unlink, _>(&Self::entry(user, parent, name))
            .await
    }

    pub async fn rmdir(&self, user: &User, parent: InodeId, name: &[u8]) -> Result<(), FsError> {
        self.meta
            .call::<Rmdir, _>(&Self::entry(user, parent, name))
            .await
    }

    /// Removes a whole tree in one transaction; its data is reclaimed in
    /// the background.
    pub async fn remove_all(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
    ) -> Result<(), FsError> {
        self.meta
            .call::<RemoveAll, _>(&Self::entry(user, parent, name))
            .await
    }

    pub async fn rename(
        &self,
        user: &User,
        old_parent: InodeId,
        old_name: &[u8],
        new_parent: InodeId,
        new_name: &[u8],
    ) -> Result<(), FsError> {
        let req = RenameReq {
            user: user.clone(),
            old_parent,
            old_name: old_name.to_vec(),
            new_parent,
            new_name: new_name.to_vec(),
        };
        self.meta.call::<Rename, _>(&req).await
    }

    /// One page of a directory, after the name `after` (empty: from the
    /// start); with `plus`, each entry's attributes.
    pub async fn readdir(
        &self,
        user: &User,
        dir: InodeId,
        after: &[u8],
        limit: u32,
        plus: bool,
    ) -> Result<ReaddirRsp, FsError> {
        let req = ReaddirReq {
            user: user.clone(),
            dir,
            after: after.to_vec(),
            limit,
            plus,
        };
        let mut rsp = self.meta.call::<Readdir, _>(&req).await?;
        for entry in &mut rsp.entries {
            if let Some(attr) = entry.attr.take() {
                entry.attr = Some(self.local_attr(attr));
            }
        }
        Ok(rsp)
    }

    /// `setattr`. A size change first writes out this client's buffered
    /// data of the file (which the truncate must cut too), then truncates
    /// on storage and in the metadata service.
    ///
    /// A change of anything else to a file this client is writing through
    /// one handle, with writes the metadata service has not heard of, takes
    /// the sync that handle's next `close(2)` would make along
    /// ([`SyncSetAttr`]): the data goes to storage first, and the service
    /// fixes the length before it makes the changes. So `tar x` (write,
    /// then `futimens`, `fchown`, `fchmod`, then `close`) keeps its mtime
    /// and its close needs no sync of its own.
    pub async fn setattr(&self, req: SetAttrReq) -> Result<Attr, FsError> {
        let state = self.open_state(req.ino);
        if let Some(state) = &state {
            if let Some(attr) = self.defer_setattr(state, &req) {
                return Ok(attr);
            }
            // What waits comes before this change.
            self.flush_deferred(state).await?;
        }
        if let (Some(state), Some(_)) = (&state, req.size) {
            self.drain_to_storage(state).await?;
        }
        if let Some(state) = &state
            && req.size.is_none()
            && state.unsynced()
            && !self.sync_setattr_refused.load(Ordering::Relaxed)
            && let Some(session) = state.sole_session()
        {
            // As in `flush`: the count first, then the length covering it.
            let writes = state.writes();
            let known = state.writer_length();
            self.drain_to_storage(state).await?;
            let folded = SyncSetAttrReq {
                set: req.clone(),
                session,
                writer_length: known,
            };
            match self.meta.call::<SyncSetAttr, _>(&folded).await {
                Ok(attr) => {
                    // A length short of ours was not fixed from it (the
                    // service asked storage, which may disagree): the
                    // close syncs again.
                    if attr.length >= known.length {
                        state.synced(writes);
                    }
                    return Ok(self.local_attr(attr));
                }
                Err(e) if e.message.contains(&Status::UnknownMethod.to_string()) => {
                    tracing::info!(
                        "the metadata service predates meta.SyncSetAttr: setattr and sync \
                         apart from now on ({e})"
                    );
                    self.sync_setattr_refused.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        let attr = self.meta.call::<SetAttr, _>(&req).await?;
        if let (Some(state), Some(size)) = (&state, req.size) {
            state.truncated(size, attr.truncate_version, attr.inline);
        }
        Ok(self.local_attr(attr))
    }

    /// Drops setuid, and setgid where group execute is set, from a file
    /// that a caller without `CAP_FSETID` writes to. Under
    /// `FUSE_HANDLE_KILLPRIV_V2` the kernel leaves this to the file system
    /// and flags such writes. Chown and truncate need no call of their own:
    /// the metadata service drops the bits itself.
    ///
    /// The writer need not own the file, and chmod is the owner's, so the
    /// change is asked as root: the kernel has already checked that the
    /// writer may write. Like the kernel without that flag (a getattr, then
    /// a setattr of the mode), this is two calls. A chmod by someone else
    /// between them is overwritten.
    pub async fn kill_suid_sgid(&self, ino: InodeId) -> Result<(), FsError> {
        if let Some(state) = self.open_state(ino) {
            // A deferred chmod must not land after this.
            self.flush_deferred(&state).await?;
        }
        let mode = self.stat(&User::root(), ino).await?.mode;
        let killed = flyfs_proto::access::kill_suid_sgid(mode);
        if killed != mode {
            let req = SetAttrReq {
                user: User::root(),
                ino,
                mode: Some(killed),
                ..SetAttrReq::default()
            };
            self.meta.call::<SetAttr, _>(&req).await?;
        }
        Ok(())
    }

    pub async fn getxattr(
        &self,
        user: &User,
        ino: InodeId,
        name: &[u8],
    ) -> Result<Vec<u8>, FsError> {
        let req = XattrReq {
            user: user.clone(),
            ino,
            name: name.to_vec(),
            ..XattrReq::default()
        };
        Ok(self.meta.call::<GetXattr, _>(&req).await?.value)
    }

    pub async fn setxattr(
        &self,
        user: &User,
        ino: InodeId,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Result<(), FsError> {
        let req = XattrReq {
            user: user.clone(),
            ino,
            name: name.to_vec(),
            value: value.to_vec(),
            mode,
        };
        self.meta.call::<SetXattr, _>(&req).await
    }

    pub async fn listxattr(&self, user: &User, ino: InodeId) -> Result<Vec<Vec<u8>>, FsError> {
        let req = StatReq {
            user: user.clone(),
            ino,
        };
        let rsp = self.meta.call::<ListXattr, _>(&req).await?;
        Ok(rsp.names.into_iter().map(|n| n.into_vec()).collect())
    }

    pub async fn removexattr(&self, user: &User, ino: InodeId, name: &[u8]) -> Result<(), FsError> {
        let req = XattrReq {
            user: user.clone(),
            ino,
            name: name.to_vec(),
            ..XattrReq::default()
        };
        self.meta.call::<RemoveXattr, _>(&req).await
    }

    // ---- files ----

    fn session_id(&self, mode: OpenMode) -> u64 {
        if mode.write {
            self.next_session.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        }
    }

    /// `open(O_CREAT)`: creates the file (or, unless `exclusive`, opens the
    /// existing one) and opens it.
    pub async fn create(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        file_mode: u32,
        mode: OpenMode,
        exclusive: bool,
    ) -> Result<(Attr, Arc<FileHandle>), FsError> {
        let (attr, handle, _) = self
            .create_seeing_parent(user, parent, name, file_mode, mode, exclusive)
            .await?;
        Ok((attr, handle))
    }

    /// [`FsClient::create`], also giving the parent directory's attributes
    /// as the create left them (when the service sent them).
    pub async fn create_seeing_parent(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        file_mode: u32,
        mode: OpenMode,
        exclusive: bool,
    ) -> Result<(Attr, Arc<FileHandle>, Option<Attr>), FsError> {
        let req = CreateReq {
            user: user.clone(),
            parent,
            name: name.to_vec(),
            mode: file_mode,
            exclusive,
            truncate: mode.truncate,
            read: mode.read,
            write: mode.write,
            client: self.client,
            session: self.session_id(mode),
            inline_reads: true,
        };
        let rsp = self.meta.call::<Create, _>(&req).await?;
        let parent = rsp.parent.clone();
        let (attr, handle) = self.opened(user, rsp, mode)?;
        Ok((attr, handle, parent))
    }

    /// Opens a file. The handle sees everything written to the file before
    /// the open by any client that has flushed it since (close-to-open).
    pub async fn open(
        &self,
        user: &User,
        ino: InodeId,
        mode: OpenMode,
    ) -> Result<(Attr, Arc<FileHandle>), FsError> {
        let req = OpenReq {
            user: user.clone(),
            ino,
            read: mode.read,
            write: mode.write,
            truncate: mode.truncate,
            client: self.client,
            session: self.session_id(mode),
            inline_reads: true,
        };
        if mode.truncate
            && let Some(state) = self.open_state(ino)
        {
            // Buffered data and deferred changes must not land after the
            // truncate.
            self.flush_deferred(&state).await?;
            self.drain_to_storage(&state).await?;
        }
        let rsp = self.meta.call::<Open, _>(&req).await?;
        self.opened(user, rsp, mode)
    }

    fn opened(
        &self,
        user: &User,
        rsp: OpenRsp,
        mode: OpenMode,
    ) -> Result<(Attr, Arc<FileHandle>), FsError> {
        let OpenRsp {
            attr,
            session,
            inline,
            inline_max,
            ..
        } = rsp;
        if attr.kind != FileType::File {
            return Err(FsError {
                errno: libc::EISDIR,
                message: format!("{:?} is not a regular file", attr.ino),
                retryable: false,
            });
        }
        let Some(layout) = attr.layout.clone() else {
            return Err(io_error(format!("{:?} has no layout", attr.ino)));
        };
        let state = {
            let mut files = self.files.lock();
            files.retain(|_, w| w.strong_count() > 0);
            match files.get(&attr.ino).and_then(Weak::upgrade) {
                Some(state) => state,
                None => {
                    let state = Arc::new(FileState::new(attr.ino, layout, &self.config));
                    files.insert(attr.ino, Arc::downgrade(&state));
                    state
                }
            }
        };
        if session.is_some() && !self.renewing.swap(true, Ordering::Relaxed) {
            // Called from the async opens, so inside the runtime. The
            // service keeps a session one lease past its opening anyway,
            // which covers the moments before the first renewal lands.
            tokio::spawn(renew_leases(self.this.clone()));
        }
        if let Some(session) = session {
            state.session_opened(session);
        }
        // Close-to-open: whatever was read ahead before this open may be
        // stale now.
        state.opened(attr.length, attr.truncate_version, mode.truncate);
        state.opened_inline(inline, session.map(|_| inline_max));
        let attr = self.local_attr(attr);
        let handle = Arc::new(FileHandle {
            state,
            mode,
            user: user.clone(),
            session,
            read_end: AtomicU64::new(u64::MAX),
            readahead: Mutex::default(),
        });
        Ok((attr, handle))
    }

    /// Reads up to `len` bytes at `offset`; fewer only at the end of the
    /// file. Holes read as zeros.
    pub async fn read(&self, fh: &FileHandle, offset: u64, len: u32) -> Result<Bytes, FsError> {
        self.before_read(fh).await?;
        fh.state
            .read(&self.storage, &self.cache, fh, offset, len)
            .await
    }

    /// What a read needs first: this client's buffered writes on storage,
    /// or the bytes the service holds inline if this client's are stale.
    async fn before_read(&self, fh: &FileHandle) -> Result<(), FsError> {
        if fh.state.buffered().await {
            // A file the service holds, or may hold, stays there: its
            // content goes with a sync (relaxed, as a close's), which reads
            // are then served from; else the writes go to storage.
            let writes = fh.state.writes();
            let known = fh.state.writer_length();
            if !self.sync_inline(fh, writes, known, true).await? {
                self.drain_to_storage(&fh.state).await?;
            }
        }
        if fh.state.inline_stale() {
            let req = OpenReq {
                user: fh.user.clone(),
                ino: fh.ino(),
                read: true,
                inline_reads: true,
                ..OpenReq::default()
            };
            let rsp = self.meta.call::<Open, _>(&req).await?;
            fh.state
                .observe_length(rsp.attr.length, rsp.attr.truncate_version);
            fh.state.opened_inline(rsp.inline, None);
        }
        Ok(())
    }

    /// Writes the file's buffered writes to storage, having the service
    /// move the file's data there first when it holds it.
    async fn drain_to_storage(&self, state: &FileState) -> Result<(), FsError> {
        while !state.drain_unless_held(&self.storage).await? {
            self.leave_inline(state).await?;
        }
        Ok(())
    }

    /// Stops syncing the file inline; when the service holds its data,
    /// has it moved to storage first ([`Uninline`]), so that writes to
    /// storage land over it.
    async fn leave_inline(&self, state: &FileState) -> Result<(), FsError> {
        let Some(bytes) = state.leave_inline() else {
            return Ok(());
        };
        let Some(session) = state.any_session() else {
            // Writes wait, yet no write session of this client is open: a
            // handle released with writes it could not send.
            state.still_inline(bytes);
            return Err(FsError {
                errno: libc::EBADF,
                message: format!(
                    "{:?}: writes wait for storage without a write session to move its inline data",
                    state.ino
                ),
                retryable: false,
            });
        };
        let req = SessionReq {
            user: User::root(),
            ino: state.ino,
            session,
            length_known: false,
            writer_length: None,
            relaxed: false,
            inline: None,
        };
        match self.meta.call::<Uninline, _>(&req).await {
            Ok(attr) => {
                self.local_attr(attr);
                Ok(())
            }
            Err(e) => {
                state.still_inline(bytes);
                Err(e)
            }
        }
    }

    /// [`read`](Self::read) into the caller's memory: reads up to `len`
    /// bytes at `offset` and puts the bytes at `at..at + n` of the range
    /// read into `slice(at, n)`, each chunk's straight from the connection
    /// (no copy, flyfs-rpc's landing); holes and chunks shorter than the
    /// file are zeros there. Returns the bytes read (fewer than `len` only
    /// at the end of the file). It reads exactly the range, with no
    /// read-ahead: a caller with a deep queue of its own reads needs none.
    pub async fn read_into<B, F>(
        &self,
        fh: &FileHandle,
        offset: u64,
        len: u32,
        slice: F,
    ) -> Result<u64, FsError>
    where
        B: AsMut<[u8]> + Send + 'static,
        F: FnMut(usize, usize) -> B,
    {
        self.before_read(fh).await?;
        fh.state.read_into(&self.storage, offset, len, slice).await
    }

    /// Writes `data` at `offset`. It may wait in the file's write-back
    /// buffer until the next `flush`, `fsync` or `release`; a failure to
    /// write it out is reported by the next call on the file.
    pub async fn write(&self, fh: &FileHandle, offset: u64, data: &[u8]) -> Result<(), FsError> {
        self.write_cow(fh, offset, Cow::Borrowed(data)).await
    }

    /// [`write`](Self::write) of bytes the caller gives up: a sequential
    /// write that starts a buffered extent keeps them without a copy (the
    /// FUSE mount's writes, copied once out of the kernel's request).
    pub async fn write_owned(
        &self,
        fh: &FileHandle,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), FsError> {
        self.write_cow(fh, offset, Cow::Owned(data)).await
    }

    async fn write_cow(
        &self,
        fh: &FileHandle,
        offset: u64,
        data: Cow<'_, [u8]>,
    ) -> Result<(), FsError> {
        if !fh.mode.write {
            return Err(FsError {
                errno: libc::EBADF,
                message: format!("{:?} is not open for writing", fh.ino()),
                retryable: false,
            });
        }
        // A write after a deferred change is after it: its mtime too.
        self.flush_deferred(&fh.state).await?;
        let end = offset.saturating_add(data.len() as u64);
        if end > u64::from(fh.state.inline_max()) || fh.state.inline_max() == 0 {
            // Past what may be held: to storage, and what is held first.
            self.leave_inline(&fh.state).await?;
        }
        fh.state.write(&self.storage, offset, data).await?;
        self.maybe_hint(fh).await;
        Ok(())
    }

    /// Reports a growing file's length, at most once per interval.
    async fn maybe_hint(&self, fh: &FileHandle) {
        let Some(length) = fh.state.hint_due(self.config.length_hint_interval) else {
            return;
        };
        let req = LengthHintReq {
            user: fh.user.clone(),
            ino: fh.ino(),
            length,
        };
        // A hint is advisory: the exact length is fixed on close.
        if let Err(e) = self.meta.call::<LengthHint, _>(&req).await {
            tracing::debug!(ino = ?fh.ino(), "length hint failed: {e}");
        }
    }

    /// Every byte written to the file through this client reaches storage,
    /// and the metadata service fixes the exact length (`close(2)`).
    pub async fn flush(&self, fh: &FileHandle) -> Result<(), FsError> {
        self.flush_synced(fh, true).await.map(drop)
    }

    /// [`flush`](Self::flush); whether it made a metadata commit (a
    /// `Sync`, or deferred setattrs). `relaxed`: the length need only be
    /// visible when this returns (`close(2)`, close-to-open consistency);
    /// else it is durable, and with it every namespace change before it.
    async fn flush_synced(&self, fh: &FileHandle, relaxed: bool) -> Result<bool, FsError> {
        // Deferred changes and the writes before them, in one request.
        let deferred = self.flush_deferred_with(&fh.state, relaxed).await?;
        // The count first: a write grows the length before it is counted,
        // so the length read after covers every write this sync claims (a
        // later write is left for a later sync).
        let writes = fh.state.writes();
        let known = fh.state.writer_length();
        if self.sync_inline(fh, writes, known, relaxed).await? {
            return Ok(true);
        }
        self.drain_to_storage(&fh.state).await?;
        if let Some(session) = fh.session
            && fh.state.unsynced()
        {
            // Everything this client wrote is on storage: what it knows of
            // the length spares the service asking storage when this is the
            // file's only writer.
            let req = SessionReq {
                writer_length: Some(known),
                relaxed,
                ..fh.session_req(session)
            };
            self.meta.call::<Sync, _>(&req).await?;
            fh.state.synced(writes);
            return Ok(true);
        }
        Ok(deferred)
    }

    /// Syncs the file's buffered writes inline when this client may
    /// ([`FileState::take_inline`]): the whole content goes with the
    /// `Sync`. Whether the service took it; refused, the writes went to
    /// storage and the caller syncs as usual. `writes` and `known`: as in
    /// [`flush_synced`](Self::flush_synced).
    async fn sync_inline(
        &self,
        fh: &FileHandle,
        writes: u64,
        known: WriterLength,
        relaxed: bool,
    ) -> Result<bool, FsError> {
        let Some(session) = fh.session else {
            return Ok(false);
        };
        let Some(inline) = fh.state.take_inline().await else {
            return Ok(false);
        };
        let req = SessionReq {
            writer_length: Some(known),
            relaxed,
            inline: Some(inline.bytes.to_vec()),
            ..fh.session_req(session)
        };
        let Some(attr) = self.settle_inline::<Sync>(inline, &req).await? else {
            return Ok(false);
        };
        fh.state.synced(writes);
        self.local_attr(attr);
        Ok(true)
    }

    /// Sends `req`, a sync carrying `inline`'s content, and settles
    /// `inline` by the answer: the file's attributes when the service took
    /// the content; `None` when it refused, holding nothing of the file
    /// from then on, and the writes went to storage; a failure puts the
    /// writes back in the buffer.
    async fn settle_inline<M>(
        &self,
        inline: InlineSync<'_>,
        req: &M::Req,
    ) -> Result<Option<Attr>, FsError>
    where
        M: Method<Rsp = Result<Attr, FsError>>,
    {
        match self.meta.call::<M, _>(req).await {
            Ok(attr) if attr.inline => {
                inline.stored();
                Ok(Some(attr))
            }
            Ok(_) => inline.refused(&self.storage).await.map(|()| None),
            Err(e) => {
                inline.put_back();
                Err(e)
            }
        }
    }

    /// `fsync`: as [`flush`](Self::flush) (storage acknowledges a write only
    /// once every replica has it durably), and the file's own creation and
    /// every other namespace change answered before made durable: by the
    /// flush's metadata commit when it made one, else by asking
    /// ([`sync_namespace`](Self::sync_namespace)).
    pub async fn fsync(&self, fh: &FileHandle) -> Result<(), FsError> {
        if !self.flush_synced(fh, false).await? {
            self.sync_namespace().await?;
        }
        Ok(())
    }

    /// `fsyncdir`: every namespace change answered before the call is
    /// durable when it returns. The metadata service answers an entry's
    /// change once applied and makes it durable within milliseconds; this
    /// waits for it. A service that predates the request made every change
    /// durable before answering it, so there is nothing to wait for.
    pub async fn sync_namespace(&self) -> Result<(), FsError> {
        match self
            .meta
            .call::<SyncNamespace, _>(&SyncNamespaceReq {})
            .await
        {
            Err(e) if e.message.contains(&Status::UnknownMethod.to_string()) => Ok(()),
            done => Ok(done?),
        }
    }

    /// The last close of a handle: flushes, then ends its write session.
    pub async fn release(&self, fh: &FileHandle) -> Result<(), FsError> {
        // Normally none: the flush of close(2) made them.
        let deferred = self.flush_deferred(&fh.state).await;
        let writes = fh.state.writes();
        let known = fh.state.writer_length();
        let flushed = match self.sync_inline(fh, writes, known, true).await {
            Ok(true) => Ok(()),
            Ok(false) => self.drain_to_storage(&fh.state).await,
            Err(e) => Err(e),
        };
        if let Some(session) = fh.session {
            // Most handles end synced (close(2) flushed them) or never
            // wrote: the service then need not ask storage for the length.
            // A handle with unsynced writes that all reached storage says
            // what it knows of the length; after a failed flush, storage is
            // asked.
            let req = SessionReq {
                length_known: flushed.is_ok() && !fh.state.unsynced(),
                writer_length: flushed.is_ok().then_some(known),
                ..fh.session_req(session)
            };
            // The session ends even when the flush failed: the data that
            // failed is reported, not retried forever.
            fh.state.session_closed(session);
            self.meta.call::<Close, _>(&req).await?;
            fh.state.synced(writes);
        }
        deferred.and(flushed)
    }

    /// Writes out every open file's buffer (before unmounting).
    pub async fn flush_all(&self) -> Result<(), FsError> {
        let states: Vec<Arc<FileState>> = self
            .files
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        let mut first = Ok(());
        for state in states {
            let done = match self.flush_deferred(&state).await {
                Ok(_) => self.drain_to_storage(&state).await,
                Err(e) => Err(e),
            };
            if let Err(e) = done
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}
