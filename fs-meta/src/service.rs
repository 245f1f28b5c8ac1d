//! The metadata service's RPC face: decodes each request, runs it on the
//! [`Namespace`], and does the storage half of the operations that have one
//! (length on close and fsync, truncate, statfs).
//!
//! The service keeps no state of its own between requests: everything lives
//! in the KV store, so any number of instances may serve one namespace (the
//! inode id batches each holds are the only thing not shared, and losing one
//! only leaves a gap in the ids). The GC worker ([`crate::gc`]) and the
//! session reaper ([`crate::reaper`]) run beside it in the same daemon.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use flyfs_client::storage::StorageClient;
use flyfs_proto::Method;
use flyfs_proto::auth::Principal;
use flyfs_proto::frame::Status;
use flyfs_proto::ids::{ChainId, ChainTableId, InodeId};
use flyfs_proto::wire::meta as wire;
use flyfs_proto::wire::meta::{
    Close, Create, GcStatus, GetXattr, KvCommit, KvEvict, KvLookup, KvOpen, KvRelease, KvRemove,
    KvReserve, LengthHint, Link, ListXattr, Lookup, Mkdir, MkdirAll, Mknod, Open, Readdir,
    Readlink, RemoveAll, RemoveXattr, Rename, RenewLease, Resolve, Rmdir, SetAttr, SetLayout,
    SetXattr, Stat, Statfs, Symlink, Sync, SyncNamespace, SyncSetAttr, SyncSetAttrs, Uninline,
    Unlink,
};
use flyfs_proto::wire::meta::{NamesCaller, User};
use flyfs_rpc::server::{Peer, Reply, Request, Service};
use flyfs_rpc::{Network, refusals};

use crate::data::FileChunks;
use crate::gc::GcStats;
use crate::ns::{
    self, ChainTables, CreateFlags, Inode, InodeKind, LayoutError, Namespace, NsError, OpenFlags,
    Truncate,
};
use crate::schema::{InodeData, SessionId};
use flyfs_kv::Kv;

/// Chain tables as the cluster manager publishes them, from the storage
/// client's routing cache (the daemon keeps it fresh).
#[derive(Debug)]
pub struct RoutingChainTables<N: Network>(pub Arc<StorageClient<N>>);

impl<N: Network> ChainTables for RoutingChainTables<N> {
    fn chains(&self, table: ChainTableId) -> Option<Vec<ChainId>> {
        let routing = self.0.routing();
        routing
            .tables
            .iter()
            .find(|t| t.id == table)
            .map(|t| t.chains.clone())
    }
}

/// Whom the service believes a request's `user` to be.
///
/// A mount is trusted to pass the uid, gid and groups its kernel gave it for
/// the calling process (as NFS `sec=sys` trusts a client host, but only
/// hosts holding a client credential of this cluster), so a client identity
/// may name any caller, except that with `root_squash` uid 0 runs as
/// `squash_uid`/`squash_gid`. An admin credential names one uid and gid and
/// acts only as that. A request that names no caller is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerPolicy {
    /// Run client requests naming uid 0 as `squash_uid`/`squash_gid`
    /// without supplementary groups.
    pub root_squash: bool,
    pub squash_uid: u32,
    pub squash_gid: u32,
}

impl Default for CallerPolicy {
    /// No squashing; `nobody`/`nogroup` (65534) when it is turned on.
    fn default() -> CallerPolicy {
        CallerPolicy {
            root_squash: false,
            squash_uid: 65534,
            squash_gid: 65534,
        }
    }
}

impl CallerPolicy {
    /// Checks the caller `user` a request of `method` names against the
    /// connection's identity, and maps it (root squash). The error is the
    /// reply to send: `BadRequest` if the request names no caller,
    /// `Forbidden` if the identity may not act as it.
    #[allow(clippy::result_large_err)] // The error is the reply to send.
    pub fn admit(
        &self,
        peer: &Peer,
        method: &'static str,
        user: &mut User,
    ) -> std::result::Result<(), Reply> {
        if !user.is_set() {
            let message = format!(
                "{method}: the request names no caller (`user` needs a uid and a gid); \
                 it is refused rather than run as root"
            );
            refusals::global().log("no caller", peer, &message);
            return Err(Reply::error(Status::BadRequest, message));
        }
        match &peer.identity.principal {
            Principal::Client(_) => {
                if self.root_squash && user.uid == 0 {
                    *user = User::new(self.squash_uid, self.squash_gid, Vec::new());
                }
                Ok(())
            }
            Principal::Admin { uid, gid, .. } => {
                if user.uid == *uid && user.gid == *gid && user.groups.is_empty() {
                    return Ok(());
                }
                let message = format!(
                    "{method}: {} acts as uid {uid} gid {gid} without supplementary groups; \
                     the request names uid {} gid {} groups {:?}",
                    peer.identity, user.uid, user.gid, user.groups
                );
                refusals::global().log("caller", peer, &message);
                Err(Reply::error(Status::Forbidden, message))
            }
            // The roles of every namespace method already keep daemons out;
            // this keeps a future method that forgets from running as
            // whatever a daemon's request says.
            other => {
                let message = format!(
                    "{method}: a {} identity does not act as a file system user",
                    other.role()
                );
                refusals::global().log("caller", peer, &message);
                Err(Reply::error(Status::Forbidden, message))
            }
        }
    }
}

/// The RPC face of a namespace.
pub struct MetaService<K: Kv, N: Network> {
    ns: Namespace<K>,
    storage: Arc<StorageClient<N>>,
    gc: Arc<GcStats>,
    callers: CallerPolicy,
    stats: Arc<ServiceStats>,
}

/// What one service instance has done, for tests and operators: requests
/// per method, and how it fixed file lengths.
#[derive(Debug, Default)]
pub struct ServiceStats {
    requests: std::sync::Mutex<BTreeMap<&'static str, u64>>,
    /// Chains asked for a file's last chunk to fix a length (sync, close).
    length_chains_asked: AtomicU64,
    /// Lengths fixed from what the writer knew, without asking storage.
    lengths_trusted: AtomicU64,
    /// Syncs whose content the namespace took to hold inline.
    inline_syncs: AtomicU64,
    /// Files whose inline data moved to storage.
    uninlined: AtomicU64,
}

/// How often a move of inline data to storage starts over when the data
/// changed meanwhile (a truncate), and a truncate waits for such moves.
const UNINLINE_TRIES: u32 = 8;

impl ServiceStats {
    /// Requests answered so far, by method name (`meta.Create`, ...).
    pub fn requests(&self) -> BTreeMap<&'static str, u64> {
        self.requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn length_chains_asked(&self) -> u64 {
        self.length_chains_asked.load(Ordering::Relaxed)
    }

    pub fn lengths_trusted(&self) -> u64 {
        self.lengths_trusted.load(Ordering::Relaxed)
    }

    pub fn inline_syncs(&self) -> u64 {
        self.inline_syncs.load(Ordering::Relaxed)
    }

    pub fn uninlined(&self) -> u64 {
        self.uninlined.load(Ordering::Relaxed)
    }

    fn count(&self, method: &'static str) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(method)
            .or_default() += 1;
    }
}

impl<K: Kv, N: Network> std::fmt::Debug for MetaService<K, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaService")
            .field("ns", &self.ns)
            .finish_non_exhaustive()
    }
}

/// A handler's failure: a namespace error or a storage one, both an errno.
type Result<T> = std::result::Result<T, wire::MetaError>;

/// The changes a `SetAttrReq` asks for.
fn changes_of(r: &wire::SetAttrReq) -> ns::SetAttr {
    ns::SetAttr {
        mode: r.mode,
        uid: r.uid,
        gid: r.gid,
        size: r.size,
        atime: r.atime.map(set_time),
        mtime: r.mtime.map(set_time),
    }
}

fn meta_error(e: NsError) -> wire::MetaError {
    wire::MetaError {
        errno: e.errno(),
        retryable: matches!(&e, NsError::Kv(kv) if kv.is_retryable()),
        message: e.to_string(),
    }
}

fn data_error(e: crate::data::DataError) -> wire::MetaError {
    wire::MetaError {
        errno: libc::EIO,
        retryable: true,
        message: e.to_string(),
    }
}

/// An inode's attributes on the wire.
pub fn attr(inode: &Inode) -> wire::Attr {
    let (kind, length, truncate_version, layout, default_layout) = match &inode.data {
        InodeData::File(f) => (
            wire::FileType::File,
            f.length,
            f.truncate_version,
            Some(wire::Layout {
                chain_table: f.layout.chain_table(),
                chunk_size: f.layout.chunk_size(),
                stripe: f.layout.stripe(),
                chains: f.layout.chains().to_vec(),
            }),
            None,
        ),
        InodeData::Directory(d) => (
            wire::FileType::Directory,
            0,
            0,
            None,
            d.default_layout.map(|s| wire::LayoutSpec {
                chain_table: s.chain_table,
                chunk_size: s.chunk_size,
                stripe: s.stripe,
            }),
        ),
        InodeData::Symlink(s) => (
            wire::FileType::Symlink,
            s.target.len() as u64,
            0,
            None,
            None,
        ),
        InodeData::Special(s) => (file_type(s.kind), 0, 0, None, None),
    };
    wire::Attr {
        ino: inode.ino,
        kind,
        mode: inode.mode,
        uid: inode.uid,
        gid: inode.gid,
        nlink: inode.nlink,
        length,
        atime_ns: inode.atime_ns,
        mtime_ns: inode.mtime_ns,
        ctime_ns: inode.ctime_ns,
        truncate_version,
        layout,
        default_layout,
        rdev: inode.rdev(),
        inline: inode.file().is_some_and(|f| f.is_inline()),
    }
}

/// An open's answer: the inode's attributes and, when the namespace holds
/// the file's data, the data.
fn open_rsp(
    inode: &Inode,
    session: Option<SessionId>,
    created: bool,
    parent: Option<wire::Attr>,
    inline_max: u32,
) -> wire::OpenRsp {
    wire::OpenRsp {
        attr: attr(inode),
        session: session.map(|s| s.0),
        created,
        parent,
        inline: inode.file().and_then(|f| f.inline.clone()),
        inline_max,
    }
}

/// A namespace answer about one inode, as the wire carries it.
fn attr_of(inode: std::result::Result<Inode, NsError>) -> Result<wire::Attr> {
    inode.map(|i| attr(&i)).map_err(meta_error)
}

fn file_type(kind: InodeKind) -> wire::FileType {
    match kind {
        InodeKind::File => wire::FileType::File,
        InodeKind::Directory => wire::FileType::Directory,
        InodeKind::Symlink => wire::FileType::Symlink,
        InodeKind::Fifo => wire::FileType::Fifo,
        InodeKind::Socket => wire::FileType::Socket,
        InodeKind::CharDevice => wire::FileType::CharDevice,
        InodeKind::BlockDevice => wire::FileType::BlockDevice,
    }
}

fn inode_kind(kind: wire::FileType) -> InodeKind {
    match kind {
        wire::FileType::File => InodeKind::File,
        wire::FileType::Directory => InodeKind::Directory,
        wire::FileType::Symlink => InodeKind::Symlink,
        wire::FileType::Fifo => InodeKind::Fifo,
        wire::FileType::Socket => InodeKind::Socket,
        wire::FileType::CharDevice => InodeKind::CharDevice,
        wire::FileType::BlockDevice => InodeKind::BlockDevice,
    }
}

fn set_time(t: wire::SetTime) -> ns::SetTime {
    match t {
        wire::SetTime::Now => ns::SetTime::Now,
        wire::SetTime::At(ns) => ns::SetTime::At(ns),
    }
}

impl<K: Kv, N: Network> MetaService<K, N> {
    pub fn new(
        ns: Namespace<K>,
        storage: Arc<StorageClient<N>>,
        gc: Arc<GcStats>,
        callers: CallerPolicy,
    ) -> Arc<Self> {
        Arc::new(MetaService {
            ns,
            storage,
            gc,
            callers,
            stats: Arc::default(),
        })
    }

    /// This instance's counters.
    pub fn stats(&self) -> &Arc<ServiceStats> {
        &self.stats
    }

    /// Decodes a request of `M` and admits the caller it names
    /// ([`CallerPolicy::admit`]), or gives the reply to send instead.
    #[allow(clippy::result_large_err)] // The error is the reply to send.
    fn decode<M: Method>(&self, req: &Request) -> std::result::Result<M::Req, Reply>
    where
        M::Req: NamesCaller,
    {
        let mut decoded = req.decode::<M>()?;
        self.callers.admit(&req.peer, M::NAME, decoded.user_mut())?;
        Ok(decoded)
    }

    pub fn namespace(&self) -> &Namespace<K> {
        &self.ns
    }

    fn chunks<'a>(&'a self, ino: InodeId, layout: &'a ns::StoredLayout) -> FileChunks<'a, N> {
        FileChunks {
            storage: &self.storage,
            ino,
            layout,
            queries: Some(&self.stats.length_chains_asked),
        }
    }

    /// Runs `op`, and once more after refreshing the routing cache if it
    /// failed on a chain table the cache does not know. The cache is empty
    /// until the daemon's first refresh and refreshed every few seconds
    /// after, so without this a create that reaches a daemon just started
    /// (as clients retrying through its restart do) or names a table made
    /// moments ago gets EINVAL for a table that exists. The failed attempt
    /// wrote nothing: the layout is chosen before anything is written.
    async fn with_fresh_tables<T, F, Fut>(&self, mut op: F) -> std::result::Result<T, NsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, NsError>>,
    {
        match op().await {
            Err(NsError::Layout(LayoutError::UnknownTable(table))) => {
                if let Err(e) = self.storage.refresh_routing().await {
                    tracing::debug!(?table, "refreshing routing for an unknown table: {e}");
                }
                op().await
            }
            other => other,
        }
    }

    /// After an open: a file held inline moves to storage when the opener
    /// reads only from storage (`inline_reads` false: a client older than
    /// inline data), or when it opened a write session that may not have
    /// held the data ([`ns::Opened::inline_max`] 0: another session writes
    /// it too), since writers write to storage. Answers the inode and the
    /// `inline_max` to give the opener (0 for a client that cannot use it).
    async fn opened_inline(
        &self,
        inode: Inode,
        session: Option<SessionId>,
        inline_max: u32,
        inline_reads: bool,
    ) -> Result<(Inode, u32)> {
        let inline_max = if inline_reads { inline_max } else { 0 };
        let held = inode.file().is_some_and(|f| f.is_inline());
        let writer_may_hold = session.is_none() || inline_max > 0;
        if !held || (inline_reads && writer_may_hold) {
            return Ok((inode, inline_max));
        }
        self.uninline(inode.ino).await?;
        let inode = self.ns.stat(inode.ino).await.map_err(meta_error)?;
        Ok((inode, inline_max))
    }

    /// Carries out on storage a truncate the namespace has recorded. The
    /// namespace goes first so that permission checks and the new length
    /// commit together; a crash before storage follows leaves bytes past
    /// the new length that reads never return (they stop at the length).
    async fn truncate_data(&self, truncate: Option<Truncate>) -> Result<()> {
        if let Some(t) = truncate {
            self.chunks(t.ino, &t.layout)
                .truncate(t.length)
                .await
                .map_err(data_error)?;
        }
        Ok(())
    }

    /// The file's exact length from storage, folded into its recorded one:
    /// storage knows where written data ends; the namespace knows about
    /// extensions by truncate that wrote nothing. The larger is the length.
    async fn sync_length(&self, ino: InodeId) -> Result<Inode> {
        self.sync_length_of(ino, None).await
    }

    /// As [`sync_length`](Self::sync_length), asking only the chains that
    /// hold chunk indices in `chunks` (every chain when `None`).
    async fn sync_length_of(&self, ino: InodeId, chunks: Option<(u64, u64)>) -> Result<Inode> {
        let inode = self.ns.stat(ino).await.map_err(meta_error)?;
        let Some(file) = inode.file() else {
            return Ok(inode);
        };
        let length = self
            .chunks(ino, &file.layout)
            .length_of(chunks)
            .await
            .map_err(data_error)?;
        self.ns
            .set_length(ino, length, false)
            .await
            .map_err(meta_error)
    }

    /// Fixes the length of a sync or close that wrote (`end_session`: a
    /// close, which also ends the session when the length is fixed here).
    /// With what the writer knows of its length, the namespace decides
    /// whether storage need be asked at all, and which chains
    /// ([`Namespace::fix_writer_length`]); without it (an older client),
    /// every chain is asked. Returns the inode when the length was fixed
    /// and, for a close, the session ended; `None` when the length was
    /// fixed from storage and a close must still end the session.
    async fn writer_length(
        &self,
        r: &wire::SessionReq,
        end_session: bool,
    ) -> Result<Option<Inode>> {
        let Some(known) = r.writer_length else {
            self.sync_length(r.ino).await?;
            return Ok(None);
        };
        let known = ns::WriterLength {
            length: known.length,
            truncate_version: known.truncate_version,
        };
        let decided = self
            .ns
            .fix_writer_length(r.ino, SessionId(r.session), known, end_session, r.relaxed)
            .await
            .map_err(meta_error)?;
        match decided {
            ns::WriterLengthFixed::Fixed(inode) => {
                self.stats.lengths_trusted.fetch_add(1, Ordering::Relaxed);
                Ok(Some(inode))
            }
            ns::WriterLengthFixed::AskStorage { chunks } => {
                self.sync_length_of(r.ino, chunks).await?;
                Ok(None)
            }
            ns::WriterLengthFixed::SessionGone => {
                self.sync_length(r.ino).await?;
                Ok(None)
            }
        }
    }

    /// `setattr`, and the storage half of a truncate. A truncate past what
    /// may be held inline moves held data to storage first.
    async fn setattr(&self, r: wire::SetAttrReq) -> Result<wire::Attr> {
        let mut tries = 0;
        let done = loop {
            match self.ns.setattr(&r.user, r.ino, changes_of(&r)).await {
                Err(NsError::Inline(ino)) if tries < UNINLINE_TRIES => {
                    tries += 1;
                    self.uninline(ino).await?;
                }
                done => break done.map_err(meta_error)?,
            }
        };
        self.truncate_data(done.truncate).await?;
        Ok(attr(&done.inode))
    }

    /// Moves the data the namespace holds for `ino`, if any, to storage:
    /// writes it to the file's first chunk, then ends it being held, if
    /// it is still the same (else starts over). Nothing is lost to a crash
    /// between the two: the data stays held until storage has it.
    async fn uninline(&self, ino: InodeId) -> Result<()> {
        for _ in 0..UNINLINE_TRIES {
            let inode = self.ns.stat(ino).await.map_err(meta_error)?;
            let Some(file) = inode.file() else {
                return Ok(());
            };
            let Some(bytes) = &file.inline else {
                return Ok(());
            };
            self.chunks(ino, &file.layout)
                .write_whole(bytes::Bytes::copy_from_slice(bytes))
                .await
                .map_err(data_error)?;
            if self
                .ns
                .finish_uninline(ino, file.truncate_version, bytes)
                .await
                .map_err(meta_error)?
            {
                self.stats.uninlined.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        Err(meta_error(NsError::Busy(format!(
            "{ino:?}: its inline data kept changing while it moved to storage"
        ))))
    }

    /// A sync carrying the whole content inline ([`wire::SessionReq::inline`]),
    /// with the writer's deferred `changes`; `None` for one without. The
    /// file's attributes afterwards: `inline` when the namespace took the
    /// content; otherwise nothing changed but that any data the file held
    /// is on storage now, where the writer sends its writes.
    async fn sync_inline(
        &self,
        r: &wire::SessionReq,
        changes: &[ns::SetAttr],
    ) -> Result<Option<wire::Attr>> {
        let Some(bytes) = &r.inline else {
            return Ok(None);
        };
        // Without a truncate version to check, nothing is taken.
        let stored = match r.writer_length {
            Some(known) => self
                .ns
                .store_inline(&ns::StoreInline {
                    user: &r.user,
                    ino: r.ino,
                    session: SessionId(r.session),
                    truncate_version: known.truncate_version,
                    bytes,
                    changes,
                    relaxed: r.relaxed,
                })
                .await
                .map_err(meta_error)?,
            None => None,
        };
        let inode = match stored {
            Some(inode) => {
                self.stats.inline_syncs.fetch_add(1, Ordering::Relaxed);
                inode
            }
            None => {
                self.uninline(r.ino).await?;
                self.ns.stat(r.ino).await.map_err(meta_error)?
            }
        };
        Ok(Some(attr(&inode)))
    }

    /// A writer's deferred setattrs ([`SyncSetAttrs`]): checked whole
    /// before anything changes, then its sync, then every change in order
    /// in one transaction, as the checked caller.
    async fn sync_setattrs(&self, r: wire::SyncSetAttrsReq) -> Result<wire::Attr> {
        if r.sets.len() > wire::SyncSetAttrsReq::SETS_MAX {
            return Err(meta_error(NsError::Invalid(format!(
                "{} deferred setattrs of {:?}: at most {} in one request",
                r.sets.len(),
                r.ino,
                wire::SyncSetAttrsReq::SETS_MAX
            ))));
        }
        if r.sets.iter().any(|set| set.size.is_some()) {
            return Err(meta_error(NsError::Invalid(format!(
                "a deferred setattr of {:?} changes the size: truncates are not deferred",
                r.ino
            ))));
        }
        let changes: Vec<ns::SetAttr> = r.sets.iter().map(changes_of).collect();
        let sync = wire::SessionReq {
            user: r.user.clone(),
            ino: r.ino,
            session: r.session,
            length_known: false,
            writer_length: r.writer_length,
            relaxed: r.relaxed,
            inline: r.inline,
        };
        // Refused, the changes are not made either: the writer sends its
        // data to storage, then the request again.
        if let Some(attr) = self.sync_inline(&sync, &changes).await? {
            return Ok(attr);
        }
        // The sole writer's length is trusted: the sync and the changes in
        // one transaction.
        if let Some(known) = r.writer_length
            && !changes.is_empty()
        {
            let known = ns::WriterLength {
                length: known.length,
                truncate_version: known.truncate_version,
            };
            let (decided, done) = self
                .ns
                .fix_writer_length_and_setattrs(
                    r.ino,
                    SessionId(r.session),
                    known,
                    &r.user,
                    &changes,
                    r.relaxed,
                )
                .await
                .map_err(meta_error)?;
            if let Some(done) = done {
                self.stats.lengths_trusted.fetch_add(1, Ordering::Relaxed);
                return Ok(attr(&done.inode));
            }
            tracing::debug!(ino = ?r.ino, ?decided, "deferred setattrs: the length is not the writer's alone");
        }
        if r.writer_length.is_some() {
            // The writes came before the changes: their length (and mtime)
            // first, so that an explicit mtime below lands after theirs.
            self.writer_length(&sync, false).await?;
        }
        // One transaction for all of them (no size among them: nothing
        // for storage to truncate).
        let inode = if changes.is_empty() {
            self.ns.stat(r.ino).await
        } else {
            self.ns
                .setattrs(&r.user, r.ino, &changes)
                .await
                .map(|done| done.inode)
        }
        .map_err(meta_error)?;
        // Without changes, the sync above may have committed nothing (from
        // storage, with no change): an fsync still needs what came before
        // durable. The changes' own commit is durable.
        if !r.relaxed && changes.is_empty() {
            self.ns.sync().await.map_err(meta_error)?;
        }
        Ok(attr(&inode))
    }

    async fn statfs(&self) -> Result<wire::StatfsRsp> {
        let routing = self.storage.routing();
        let replicas = routing
            .chains
            .iter()
            .map(|c| c.targets.len() as u64)
            .max()
            .unwrap_or(1)
            .max(1);
        let mut total = 0u64;
        let mut used = 0u64;
        for node in &routing.nodes {
            // A node that does not answer counts as no space: statfs must
            // not fail because one daemon is down.
            if let Ok(space) = self.storage.space(&node.addr).await {
                for disk in space.disks {
                    total += disk.data_bytes;
                    used += disk.allocated_bytes;
                }
            }
        }
        Ok(wire::StatfsRsp {
            bytes_total: total / replicas,
            bytes_free: total.saturating_sub(used) / replicas,
        })
    }

    async fn gc_status(&self) -> Result<wire::GcStatusRsp> {
        let now_ms = self.ns.config().clock.now_ms();
        let queued = self
            .ns
            .gc_due(u64::MAX, 1 << 20)
            .await
            .map_err(meta_error)?;
        let due = queued.iter().filter(|item| item.due_ms <= now_ms).count();
        Ok(wire::GcStatusRsp {
            queued: queued.len() as u64,
            due: due as u64,
            chunks_removed: self.gc.chunks_removed(),
            inodes_finished: self.gc.inodes_finished(),
        })
    }

    async fn handle(&self, req: &Request) -> std::result::Result<Reply, Reply> {
        let ns = &self.ns;
        if let Some(name) = flyfs_proto::wire::METHODS
            .iter()
            .find(|m| m.0 == req.method)
            .map(|m| m.1)
        {
            self.stats.count(name);
        }
        let reply = match req.method {
            Statfs::ID => {
                self.decode::<Statfs>(req)?;
                ok::<Statfs>(self.statfs().await)
            }
            SyncNamespace::ID => {
                req.decode::<SyncNamespace>()?;
                ok::<SyncNamespace>(ns.sync().await.map_err(meta_error))
            }
            Stat::ID => {
                let r = self.decode::<Stat>(req)?;
                ok::<Stat>(attr_of(ns.stat(r.ino).await))
            }
            Lookup::ID => {
                let r = self.decode::<Lookup>(req)?;
                let found = ns.lookup(&r.user, r.parent, &r.name).await;
                ok::<Lookup>(attr_of(found))
            }
            Resolve::ID => {
                let r = self.decode::<Resolve>(req)?;
                let found = ns.resolve(&r.user, &r.path, r.follow).await;
                ok::<Resolve>(attr_of(found))
            }
            Create::ID => {
                let r = self.decode::<Create>(req)?;
                let flags = CreateFlags {
                    exclusive: r.exclusive,
                    truncate: r.truncate,
                    read: r.read,
                    write_session: r.write.then_some(r.client.0),
                    session: (r.session != 0).then_some(SessionId(r.session)),
                };
                let who = r.user;
                let result = async {
                    let created = self
                        .with_fresh_tables(|| ns.create(&who, r.parent, &r.name, r.mode, flags))
                        .await
                        .map_err(meta_error)?;
                    self.truncate_data(created.truncate).await?;
                    let (inode, inline_max) = self
                        .opened_inline(
                            created.inode,
                            created.session,
                            created.inline_max,
                            r.inline_reads,
                        )
                        .await?;
                    Ok(open_rsp(
                        &inode,
                        created.session,
                        created.created,
                        Some(attr(&created.parent)),
                        inline_max,
                    ))
                }
                .await;
                ok::<Create>(result)
            }
            Open::ID => {
                let r = self.decode::<Open>(req)?;
                let flags = OpenFlags {
                    read: r.read,
                    truncate: r.truncate,
                    write_session: r.write.then_some(r.client.0),
                    session: (r.session != 0).then_some(SessionId(r.session)),
                };
                let result = async {
                    let opened = ns
                        .open_file(&r.user, r.ino, flags)
                        .await
                        .map_err(meta_error)?;
                    self.truncate_data(opened.truncate).await?;
                    let (inode, inline_max) = self
                        .opened_inline(
                            opened.inode,
                            opened.session,
                            opened.inline_max,
                            r.inline_reads,
                        )
                        .await?;
                    Ok(open_rsp(&inode, opened.session, false, None, inline_max))
                }
                .await;
                ok::<Open>(result)
            }
            Mkdir::ID => {
                let r = self.decode::<Mkdir>(req)?;
                let made = ns.mkdir(&r.user, r.parent, &r.name, r.mode).await;
                ok::<Mkdir>(attr_of(made))
            }
            MkdirAll::ID => {
                let r = self.decode::<MkdirAll>(req)?;
                let made = ns.mkdir_all(&r.user, &r.path, r.mode).await;
                ok::<MkdirAll>(attr_of(made))
            }
            Symlink::ID => {
                let r = self.decode::<Symlink>(req)?;
                let made = ns.symlink(&r.user, r.parent, &r.name, &r.target).await;
                ok::<Symlink>(attr_of(made))
            }
            Mknod::ID => {
                let r = self.decode::<Mknod>(req)?;
                let made = ns
                    .mknod(
                        &r.user,
                        r.parent,
                        &r.name,
                        inode_kind(r.kind),
                        r.mode,
                        r.rdev,
                    )
                    .await;
                ok::<Mknod>(attr_of(made))
            }
            Readlink::ID => {
                let r = self.decode::<Readlink>(req)?;
                let target = ns.readlink(r.ino).await;
                ok::<Readlink>(
                    target
                        .map(|target| wire::ReadlinkRsp { target })
                        .map_err(meta_error),
                )
            }
            Link::ID => {
                let r = self.decode::<Link>(req)?;
                let linked = ns.link(&r.user, r.ino, r.new_parent, &r.new_name).await;
                ok::<Link>(attr_of(linked))
            }
            Unlink::ID => {
                let r = self.decode::<Unlink>(req)?;
                let done = ns.unlink(&r.user, r.parent, &r.name).await;
                ok::<Unlink>(done.map(drop).map_err(meta_error))
            }
            Rmdir::ID => {
                let r = self.decode::<Rmdir>(req)?;
                ok::<Rmdir>(
                    ns.rmdir(&r.user, r.parent, &r.name)
                        .await
                        .map_err(meta_error),
                )
            }
            RemoveAll::ID => {
                let r = self.decode::<RemoveAll>(req)?;
                let done = ns.remove_all(&r.user, r.parent, &r.name).await;
                ok::<RemoveAll>(done.map(drop).map_err(meta_error))
            }
            Rename::ID => {
                let r = self.decode::<Rename>(req)?;
                let done = ns
                    .rename(
                        &r.user,
                        r.old_parent,
                        &r.old_name,
                        r.new_parent,
                        &r.new_name,
                    )
                    .await;
                ok::<Rename>(done.map_err(meta_error))
            }
            Readdir::ID => {
                let r = self.decode::<Readdir>(req)?;
                ok::<Readdir>(self.readdir(r).await)
            }
            Close::ID => {
                let r = self.decode::<Close>(req)?;
                let result = async {
                    if !r.length_known
                        && let Some(inode) = self.writer_length(&r, true).await?
                    {
                        return Ok(attr(&inode));
                    }
                    let session = SessionId(r.session);
                    let closed = match r.writer_length {
                        // A floor: what the sync that fixed the length said.
                        Some(known) if r.length_known => {
                            let known = ns::WriterLength {
                                length: known.length,
                                truncate_version: known.truncate_version,
                            };
                            ns.close_known(r.ino, session, known).await
                        }
                        _ => ns.close(r.ino, session, None).await,
                    }
                    .map_err(meta_error)?;
                    match closed.inode {
                        Some(inode) => Ok(attr(&inode)),
                        None => Err(meta_error(NsError::NotFound(format!("{:?}", r.ino)))),
                    }
                }
                .await;
                ok::<Close>(result)
            }
            Sync::ID => {
                let r = self.decode::<Sync>(req)?;
                let result = async {
                    if let Some(attr) = self.sync_inline(&r, &[]).await? {
                        return Ok(attr);
                    }
                    let inode = match self.writer_length(&r, false).await? {
                        // Fixed in a commit of its own, durable unless
                        // relaxed.
                        Some(inode) => inode,
                        None => {
                            // From storage, which commits only a change:
                            // an fsync still needs what came before durable.
                            if !r.relaxed {
                                self.ns.sync().await.map_err(meta_error)?;
                            }
                            self.ns.stat(r.ino).await.map_err(meta_error)?
                        }
                    };
                    Ok(attr(&inode))
                }
                .await;
                ok::<Sync>(result)
            }
            LengthHint::ID => {
                let r = self.decode::<LengthHint>(req)?;
                let done = ns.set_length(r.ino, r.length, false).await;
                ok::<LengthHint>(attr_of(done))
            }
            SetAttr::ID => {
                let r = self.decode::<SetAttr>(req)?;
                ok::<SetAttr>(self.setattr(r).await)
            }
            SyncSetAttr::ID => {
                let r = self.decode::<SyncSetAttr>(req)?;
                let sync = wire::SessionReq {
                    user: r.set.user.clone(),
                    ino: r.set.ino,
                    session: r.session,
                    length_known: false,
                    writer_length: Some(r.writer_length),
                    relaxed: false,
                    inline: None,
                };
                // The writer's sync first, so that times set below land
                // after the writes'.
                let synced = self.writer_length(&sync, false).await.map(drop);
                ok::<SyncSetAttr>(match synced {
                    Ok(()) => self.setattr(r.set).await,
                    Err(e) => Err(e),
                })
            }
            SyncSetAttrs::ID => {
                let r = self.decode::<SyncSetAttrs>(req)?;
                ok::<SyncSetAttrs>(self.sync_setattrs(r).await)
            }
            Uninline::ID => {
                let r = self.decode::<Uninline>(req)?;
                let result = async {
                    let session = SessionId(r.session);
                    let sessions = ns.sessions(r.ino).await.map_err(meta_error)?;
                    if !sessions.iter().any(|(s, _)| *s == session) {
                        return Err(meta_error(NsError::NotPermitted(format!(
                            "move the inline data of {:?}: session {session:?} does not write it",
                            r.ino
                        ))));
                    }
                    self.uninline(r.ino).await?;
                    ns.stat(r.ino).await.map_err(meta_error)
                }
                .await;
                ok::<Uninline>(result.map(|i| attr(&i)))
            }
            GetXattr::ID => {
                let r = self.decode::<GetXattr>(req)?;
                let value = ns.get_xattr(&r.user, r.ino, &r.name).await;
                ok::<GetXattr>(
                    value
                        .map(|value| wire::XattrRsp { value })
                        .map_err(meta_error),
                )
            }
            SetXattr::ID => {
                let r = self.decode::<SetXattr>(req)?;
                let mode = match r.mode {
                    wire::XattrMode::Any => ns::XattrMode::Upsert,
                    wire::XattrMode::Create => ns::XattrMode::Create,
                    wire::XattrMode::Replace => ns::XattrMode::Replace,
                };
                let done = ns.set_xattr(&r.user, r.ino, &r.name, &r.value, mode).await;
                ok::<SetXattr>(done.map_err(meta_error))
            }
            ListXattr::ID => {
                let r = self.decode::<ListXattr>(req)?;
                let names = ns.list_xattr(r.ino).await;
                ok::<ListXattr>(
                    names
                        .map(|names| wire::XattrListRsp {
                            names: names.into_iter().map(serde_bytes::ByteBuf::from).collect(),
                        })
                        .map_err(meta_error),
                )
            }
            RemoveXattr::ID => {
                let r = self.decode::<RemoveXattr>(req)?;
                let done = ns.remove_xattr(&r.user, r.ino, &r.name).await;
                ok::<RemoveXattr>(done.map_err(meta_error))
            }
            SetLayout::ID => {
                let r = self.decode::<SetLayout>(req)?;
                let spec = ns::LayoutSpec {
                    chain_table: r.layout.chain_table,
                    chunk_size: r.layout.chunk_size,
                    stripe: r.layout.stripe,
                };
                let who = r.user;
                let done = self
                    .with_fresh_tables(|| ns.set_layout(&who, r.dir, spec))
                    .await;
                ok::<SetLayout>(attr_of(done))
            }
            RenewLease::ID => {
                let r = req.decode::<RenewLease>()?;
                let renewed = ns
                    .renew_lease(r.client.0, &req.peer.identity.to_uri())
                    .await
                    .map(|_| wire::RenewLeaseRsp {
                        lease_ms: ns.config().client_lease_ms,
                    });
                ok::<RenewLease>(renewed.map_err(meta_error))
            }
            GcStatus::ID => {
                req.decode::<GcStatus>()?;
                ok::<GcStatus>(self.gc_status().await)
            }
            // The KV cache's index (docs/kv-cache.md): no file system user
            // is named; the role check admitted clients and admins.
            KvOpen::ID => {
                let r = req.decode::<KvOpen>()?;
                let opened = self.with_fresh_tables(|| ns.kv_open(&r)).await;
                ok::<KvOpen>(opened.map_err(meta_error))
            }
            KvLookup::ID => {
                let r = req.decode::<KvLookup>()?;
                let keys: Vec<Vec<u8>> = r.keys.into_iter().map(|k| k.into_vec()).collect();
                let found = ns
                    .kv_lookup(&keys)
                    .await
                    .map(|entries| wire::KvLookupRsp { entries });
                ok::<KvLookup>(found.map_err(meta_error))
            }
            KvReserve::ID => {
                let r = req.decode::<KvReserve>()?;
                let reserved = ns.kv_reserve(r.class, r.count, r.evict).await;
                ok::<KvReserve>(reserved.map_err(meta_error))
            }
            KvCommit::ID => {
                let r = req.decode::<KvCommit>()?;
                let committed = ns
                    .kv_commit(&r.items)
                    .await
                    .map(|results| wire::KvCommitRsp { results });
                ok::<KvCommit>(committed.map_err(meta_error))
            }
            KvRelease::ID => {
                let r = req.decode::<KvRelease>()?;
                let released = ns.kv_release(r.class, &r.slots).await;
                ok::<KvRelease>(released.map_err(meta_error))
            }
            KvRemove::ID => {
                let r = req.decode::<KvRemove>()?;
                let keys: Vec<Vec<u8>> = r.keys.into_iter().map(|k| k.into_vec()).collect();
                let removed = ns
                    .kv_remove(&keys, &r.expect)
                    .await
                    .map(|removed| wire::KvRemoveRsp { removed });
                ok::<KvRemove>(removed.map_err(meta_error))
            }
            KvEvict::ID => {
                let r = req.decode::<KvEvict>()?;
                ok::<KvEvict>(ns.kv_evict(r.limit).await.map_err(meta_error))
            }
            other => Reply::unknown_method(other),
        };
        Ok(reply)
    }

    async fn readdir(&self, r: wire::ReaddirReq) -> Result<wire::ReaddirRsp> {
        let who = r.user;
        let after = (!r.after.is_empty()).then_some(&r.after[..]);
        let limit = r.limit as usize;
        if r.plus {
            let page = self
                .ns
                .readdirplus(&who, r.dir, after, limit)
                .await
                .map_err(meta_error)?;
            Ok(cut_to_reply_bytes(
                page.entries
                    .into_iter()
                    .map(|(entry, inode)| wire::DirEntry {
                        name: entry.name,
                        ino: entry.ino,
                        kind: file_type(entry.kind),
                        attr: Some(attr(&inode)),
                    })
                    .collect(),
                page.more,
            ))
        } else {
            let page = self
                .ns
                .readdir(&who, r.dir, after, limit)
                .await
                .map_err(meta_error)?;
            Ok(cut_to_reply_bytes(
                page.entries
                    .into_iter()
                    .map(|entry| wire::DirEntry {
                        name: entry.name,
                        ino: entry.ino,
                        kind: file_type(entry.kind),
                        attr: None,
                    })
                    .collect(),
                page.more,
            ))
        }
    }
}

/// The most a readdir reply's entries may take encoded: half the default
/// body limit, so a page of long names, or of attributes with large layouts
/// (up to 4096 chains each), still fits a frame with room to spare.
pub const READDIR_REPLY_BYTES_MAX: usize = 512 << 10;

/// A readdir reply of `entries`, cut where they pass
/// [`READDIR_REPLY_BYTES_MAX`] (then `more`: the caller continues after the
/// last name it got, so the entries cut are listed by the next page). At
/// least one entry is kept, so a listing always advances; one entry is far
/// below the limit.
fn cut_to_reply_bytes(mut entries: Vec<wire::DirEntry>, more: bool) -> wire::ReaddirRsp {
    let mut bytes = 0;
    let keep = entries
        .iter()
        .position(|entry| {
            bytes += flyfs_proto::codec::encode(entry).len();
            bytes > READDIR_REPLY_BYTES_MAX
        })
        .map_or(entries.len(), |over| over.max(1));
    let cut = keep < entries.len();
    entries.truncate(keep);
    wire::ReaddirRsp {
        entries,
        more: more || cut,
    }
}

fn ok<M>(rsp: M::Rsp) -> Reply
where
    M: Method,
{
    Reply::ok::<M>(&rsp, Bytes::new())
}

impl<K: Kv, N: Network> Service for MetaService<K, N> {
    async fn call(&self, req: Request) -> Reply {
        match self.handle(&req).await {
            Ok(reply) | Err(reply) => reply,
        }
    }
}
