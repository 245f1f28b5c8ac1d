//! Messages of the metadata service: the POSIX namespace over RPC.
//!
//! Every request names the caller's credentials ([`User`]); the service is
//! stateless, so any instance answers any request. Names and paths are
//! bytes, not strings: POSIX names need not be UTF-8. Failures are an errno
//! with a message ([`MetaError`]), because the FUSE daemon hands the errno
//! straight to the kernel and a human reads the message in a log.
//!
//! Every struct defaults its missing fields (`#[serde(default)]`), so a message
//! can gain fields without breaking older peers (docs/rpc-wire-format.md).

use serde::{Deserialize, Serialize};

use crate::Method;
use crate::auth::Roles;
use crate::ids::{ChainId, ChainTableId, ClientId, InodeId};

/// Who asks: checked against modes and owners (the rule is
/// [`crate::access::allowed`]).
///
/// A request that leaves out `user` (or its `uid` or `gid`) decodes to
/// [`User::UNSET`], which the metadata service refuses: with zeros as the
/// default, as every other field has, a forgotten field would run the
/// request as root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Default for User {
    fn default() -> User {
        User {
            uid: User::UNSET,
            gid: User::UNSET,
            groups: Vec::new(),
        }
    }
}

impl User {
    /// The uid and gid of a request that named none: POSIX reserves
    /// `(uid_t)-1` (chown reads it as "leave unchanged"), so no account has
    /// it and it cannot be mistaken for a real caller.
    pub const UNSET: u32 = u32::MAX;

    pub fn new(uid: u32, gid: u32, groups: Vec<u32>) -> User {
        User { uid, gid, groups }
    }

    /// The superuser.
    pub fn root() -> User {
        User::new(0, 0, Vec::new())
    }

    /// Whether the request named a uid and a gid.
    pub fn is_set(&self) -> bool {
        self.uid != User::UNSET && self.gid != User::UNSET
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether `gid` is the caller's primary or a supplementary group.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// A failed metadata operation: the errno the caller should see and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(default)]
#[error("{message} (errno {errno})")]
pub struct MetaError {
    pub errno: i32,
    pub message: String,
    /// Rerunning the same request may succeed (the store was briefly
    /// unavailable or overloaded); never set for a POSIX error.
    pub retryable: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileType {
    #[default]
    File,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// Where a file's chunks live: chunk `i` on `chains[i % stripe]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Layout {
    pub chain_table: ChainTableId,
    pub chunk_size: u32,
    pub stripe: u32,
    pub chains: Vec<ChainId>,
}

impl Layout {
    /// The chain holding chunk `index`.
    pub fn chain_of(&self, index: u32) -> Option<ChainId> {
        if self.chains.is_empty() {
            return None;
        }
        Some(self.chains[index as usize % self.chains.len()])
    }
}

/// A directory's default layout for new files: which table, how big the
/// chunks, over how many chains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LayoutSpec {
    pub chain_table: ChainTableId,
    pub chunk_size: u32,
    pub stripe: u32,
}

/// An inode's attributes, as `stat` shows them (plus what a client needs to
/// do I/O: the layout and the truncate version).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Attr {
    pub ino: InodeId,
    pub kind: FileType,
    /// Permission bits with setuid, setgid and sticky (no type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Files: the length; symlinks: the target's length; directories: 0.
    pub length: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// Files: bumped by every truncate.
    pub truncate_version: u64,
    /// Files only.
    pub layout: Option<Layout>,
    /// Directories only: the default layout their new files get, if set.
    pub default_layout: Option<LayoutSpec>,
    /// Devices: the device number.
    pub rdev: u64,
    /// Files: the data is held by the metadata service with the inode, not
    /// on storage (docs/metadata-schema.md, "Inline data").
    pub inline: bool,
}

/// A time to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    Now,
    /// Nanoseconds since the epoch.
    At(i64),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatfsReq {
    pub user: User,
}

/// `meta.SyncNamespace`: nothing to say, the call is the request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncNamespaceReq {}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatfsRsp {
    pub bytes_total: u64,
    pub bytes_free: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatReq {
    pub user: User,
    pub ino: InodeId,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LookupReq {
    pub user: User,
    pub parent: InodeId,
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResolveReq {
    pub user: User,
    /// Absolute, from the root.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    /// Follow a symlink in the last component.
    pub follow: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateReq {
    pub user: User,
    pub parent: InodeId,
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// After the caller's umask.
    pub mode: u32,
    pub exclusive: bool,
    pub truncate: bool,
    pub read: bool,
    /// Open for writing: the file gets a write session of `client`.
    pub write: bool,
    pub client: ClientId,
    /// The write session's id (0: the service picks one). A client that
    /// picks it and resends it on retries gets its own session back after a
    /// lost reply, instead of EEXIST or a second session.
    pub session: u64,
    /// The caller reads a file the service holds from [`OpenRsp::inline`]
    /// (clients since inline data say so). Absent (older clients, which
    /// read every byte from storage): an existing file's data the service
    /// holds is moved to storage before the answer.
    pub inline_reads: bool,
}

/// The file, and the write session when it was opened for writing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenRsp {
    pub attr: Attr,
    pub session: Option<u64>,
    /// `create` only: false when an existing file was opened.
    pub created: bool,
    /// `create` only: the parent directory's attributes as the create left
    /// them, committed with it (a client may answer the stat the kernel
    /// makes of the directory after a create with them).
    pub parent: Option<Attr>,
    /// The file's data when the metadata service holds it ([`Attr::inline`]).
    #[serde(with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    pub inline: Option<Vec<u8>>,
    /// Non-zero when this open's write session may keep the file's data with
    /// the metadata service, up to this many bytes: the session is the
    /// file's only one and the file is empty or inline already. Its syncs
    /// may then carry the whole content ([`SessionReq::inline`]).
    pub inline_max: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MkdirReq {
    pub user: User,
    pub parent: InodeId,
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub mode: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MkdirAllReq {
    pub user: User,
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    pub mode: u32,
}

/// A FIFO, socket or device node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MknodReq {
    pub user: User,
    pub parent: InodeId,
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// One of the special kinds.
    pub kind: FileType,
    /// Permission bits, after the caller's umask.
    pub mode: u32,
    pub rdev: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SymlinkReq {
    pub user: User,
    pub parent: InodeId,
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub target: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReadlinkRsp {
    #[serde(with = "serde_bytes")]
    pub target: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkReq {
    pub user: User,
    pub ino: InodeId,
    pub new_parent: InodeId,
    #[serde(with = "serde_bytes")]
    pub new_name: Vec<u8>,
}

/// `unlink`, `rmdir` and recursive remove name an entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EntryReq {
    pub user: User,
    pub parent: InodeId,
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RenameReq {
    pub user: User,
    pub old_parent: InodeId,
    #[serde(with = "serde_bytes")]
    pub old_name: Vec<u8>,
    pub new_parent: InodeId,
    #[serde(with = "serde_bytes")]
    pub new_name: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReaddirReq {
    pub user: User,
    pub dir: InodeId,
    /// Continue after this name (the last one of the previous page).
    #[serde(with = "serde_bytes")]
    pub after: Vec<u8>,
    pub limit: u32,
    /// With each entry's attributes (readdirplus).
    pub plus: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DirEntry {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub ino: InodeId,
    pub kind: FileType,
    /// With `plus`.
    pub attr: Option<Attr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReaddirRsp {
    pub entries: Vec<DirEntry>,
    /// The page was cut short: continue after the last name.
    pub more: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenReq {
    pub user: User,
    pub ino: InodeId,
    pub read: bool,
    pub write: bool,
    pub truncate: bool,
    pub client: ClientId,
    /// As [`CreateReq::session`].
    pub session: u64,
    /// As [`CreateReq::inline_reads`].
    pub inline_reads: bool,
}

/// `close` ends a write session; `sync` keeps it. Both fix the exact length
/// from storage, but a `close` with `length_known` does not ask storage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionReq {
    pub user: User,
    pub ino: InodeId,
    pub session: u64,
    /// The caller has made no write whose length the service has not fixed
    /// already (it wrote nothing, or synced since): a close then only ends
    /// the session. Absent (older clients): false, the length is fixed.
    pub length_known: bool,
    /// What the caller knows of the length when it wrote: the service
    /// takes it without asking storage when the caller's session is the
    /// file's only write session, and otherwise asks only the chains that
    /// may hold chunks past it (docs/metadata-schema.md, "Open for write /
    /// close"). Absent (older clients, or a caller that cannot say): every
    /// chain is asked. With `length_known`, a floor: what an earlier sync
    /// fixed, restored if a crash of the service lost that sync.
    pub writer_length: Option<WriterLength>,
    /// The caller needs the length fixed and visible, not durable (the
    /// flush of `close(2)`; an `fsync` leaves it false): a length the
    /// service takes from the writer is committed without waiting for the
    /// journal's fsync (docs/metadata-schema.md, "Durability"). Absent
    /// (older clients): false.
    pub relaxed: bool,
    /// A sync only (never a close): the file's whole new content, for the
    /// metadata service to hold in place of storage, sent by a session its
    /// open allowed to ([`OpenRsp::inline_max`]). Taken when the session is
    /// still the file's only one, the content fits and the truncate version
    /// is `writer_length`'s; the answer's [`Attr::inline`] says so. Refused,
    /// nothing changes but that the service moves a file it holds to
    /// storage, and the caller writes its data there and syncs again.
    #[serde(with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    pub inline: Option<Vec<u8>>,
}

/// Every byte the writer wrote lies before `length`, and `truncate_version`
/// is the file's truncate version the writer last learned (from its open,
/// or a truncate it made).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WriterLength {
    pub length: u64,
    pub truncate_version: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LengthHintReq {
    pub user: User,
    pub ino: InodeId,
    /// The file is at least this long (hints only grow it).
    pub length: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SetAttrReq {
    pub user: User,
    pub ino: InodeId,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// `setattr` by a writer with unsynced writes, all on storage by now: the
/// sync its next `close(2)` would make, folded in. The service fixes the
/// length as a `Sync` of `session` with `writer_length` would, then makes
/// the changes of `set` (so an explicit mtime lands after the writes'). A
/// method of its own rather than fields of [`SetAttrReq`], so that a client
/// talking to an older service hears a refusal (and syncs at close as
/// before) instead of its length being silently ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncSetAttrReq {
    pub set: SetAttrReq,
    pub session: u64,
    pub writer_length: WriterLength,
}

/// The `setattr`s a writer deferred to its next sync point (a flush, an
/// fsync, a close, or a write or setattr that must come after them): root's
/// changes of mode, owner and explicit times to a file of which this client
/// holds the only write session (`tar x` makes three per file). The service
/// fixes the length as a `Sync` of `session` with `writer_length` would
/// (when given: the writes came before the changes, so an explicit mtime
/// lands after theirs), then makes each change of `sets` in order, each
/// under `setattr`'s rules and as `user` (the caller the connection is
/// checked against; each set's own `user` and `ino` are ignored). At most
/// [`SETS_MAX`](Self::SETS_MAX) changes. A method of its own, so that an
/// older service refuses it instead of dropping the changes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncSetAttrsReq {
    pub user: User,
    pub ino: InodeId,
    pub session: u64,
    pub writer_length: Option<WriterLength>,
    pub sets: Vec<SetAttrReq>,
    /// As [`SessionReq::relaxed`], for the sync and the changes together.
    pub relaxed: bool,
    /// As [`SessionReq::inline`]; refused, the changes are not made either.
    #[serde(with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    pub inline: Option<Vec<u8>>,
}

impl SyncSetAttrsReq {
    /// Changes one request may carry (a client sends what it deferred
    /// before it defers more).
    pub const SETS_MAX: usize = 64;
}

/// How `setxattr` treats an existing or missing attribute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum XattrMode {
    /// Create or replace.
    #[default]
    Any,
    /// `XATTR_CREATE`: EEXIST if it exists.
    Create,
    /// `XATTR_REPLACE`: ENODATA if it does not.
    Replace,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct XattrReq {
    pub user: User,
    pub ino: InodeId,
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// `setxattr` only.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub mode: XattrMode,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct XattrRsp {
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct XattrListRsp {
    pub names: Vec<serde_bytes::ByteBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SetLayoutReq {
    pub user: User,
    pub dir: InodeId,
    pub layout: LayoutSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GcStatusReq {}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GcStatusRsp {
    /// Entries on the queue.
    pub queued: u64,
    /// Of those, the ones due now.
    pub due: u64,
    /// Chunks this instance's GC worker removed since it started.
    pub chunks_removed: u64,
    /// Files and directories it finished.
    pub inodes_finished: u64,
}

/// Renews the lease that keeps all of a client's write sessions: a client
/// holding sessions sends one every third of the lease it was told, and a
/// client whose lease runs out (it crashed, or lost every metadata instance
/// for that long) has its sessions ended by the service's reaper, so that
/// GC can reclaim its unlinked files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RenewLeaseReq {
    /// The client whose sessions are kept: the `client` of its opens.
    pub client: ClientId,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RenewLeaseRsp {
    /// How long from now the sessions are kept without another renewal.
    pub lease_ms: u64,
}

// The KV cache (docs/kv-cache.md): a key index in the metadata store over
// slots of large slot files. These requests name no file system user: the
// cache has no owners or modes, only the `client` (and `admin`) role.

/// The most keys (or slots) one KV cache request carries.
pub const KV_BATCH_MAX: usize = 256;
/// The longest KV cache key.
pub const KV_KEY_BYTES_MAX: usize = 512;

/// One size class a new cache asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvClassSpec {
    /// A power of two from 64 KiB to 64 MiB.
    pub slot_bytes: u32,
    pub slots: u32,
}

/// Opens the cluster's KV cache, creating it with this spec if it does not
/// exist yet (the first opener's spec wins).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvOpenReq {
    pub classes: Vec<KvClassSpec>,
    pub chain_table: ChainTableId,
    /// 0: no age limit.
    pub max_age_ms: u64,
    /// 0: the default (10 s).
    pub access_bucket_ms: u64,
    /// 0: the default (10 minutes).
    pub reservation_ms: u64,
}

/// One size class as stored: slot `s` is chunk `(ino, s)` on
/// `chains[s % chains.len()]`, with chunk size `slot_bytes`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvClass {
    pub slot_bytes: u32,
    pub slots: u32,
    pub ino: InodeId,
    pub chain_table: ChainTableId,
    pub chains: Vec<ChainId>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvOpenRsp {
    /// Smallest slot first; a class is named by its index here.
    pub classes: Vec<KvClass>,
    pub max_age_ms: u64,
    pub access_bucket_ms: u64,
    pub reservation_ms: u64,
    /// Whether this request created the cache (else the spec was ignored).
    pub created: bool,
}

/// Keys, for lookup and remove.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvKeysReq {
    pub keys: Vec<serde_bytes::ByteBuf>,
}

/// Where a block is and how to check it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvEntry {
    pub class: u8,
    pub slot: u32,
    pub generation: u64,
    pub length: u32,
    /// CRC32C of the block's bytes.
    pub crc: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvLookupRsp {
    /// One per key, in order; `None`: not in the cache.
    pub entries: Vec<Option<KvEntry>>,
}

/// Reserves up to `count` slots of `class` for blocks about to be written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvReserveReq {
    pub class: u8,
    pub count: u32,
    /// Evict the least recently used entries when the class is full; if
    /// not, fewer slots than asked (maybe none) are granted.
    pub evict: bool,
}

/// A reserved slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvSlotGrant {
    pub slot: u32,
    pub generation: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvReserveRsp {
    pub slots: Vec<KvSlotGrant>,
    /// Entries evicted to make room.
    pub evicted: u32,
}

/// A written block to index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvCommitItem {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub entry: KvEntry,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvCommitReq {
    pub items: Vec<KvCommitItem>,
}

/// What a commit did with one block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommitted {
    /// Indexed: readers find it now.
    #[default]
    Stored,
    /// Another writer's block of this key was indexed first; this one's
    /// slot is free again.
    Exists,
    /// The reservation had expired and was taken back: nothing stored.
    Lost,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvCommitRsp {
    pub results: Vec<KvCommitted>,
}

/// Gives back reserved slots whose blocks were not written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvReleaseReq {
    pub class: u8,
    pub slots: Vec<KvSlotGrant>,
}

/// Removes keys; with `expect` (one per key), only the entries that still
/// name that block (a reader dropping a block that failed its CRC).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvRemoveReq {
    pub keys: Vec<serde_bytes::ByteBuf>,
    pub expect: Vec<KvEntry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvRemoveRsp {
    /// One per key: whether an entry was removed.
    pub removed: Vec<bool>,
}

/// Evicts entries past the cache's age limit and takes back expired
/// reservations, at most `limit` of each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvEvictReq {
    pub limit: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvEvictRsp {
    pub evicted: u32,
    pub reclaimed: u32,
    /// More were due than `limit`: call again.
    pub more: bool,
}

/// A request that names its caller in `user`. The metadata service checks
/// the caller of every such request against the connection's identity
/// before running it (and may map it: root squash).
pub trait NamesCaller {
    fn user_mut(&mut self) -> &mut User;
}

impl NamesCaller for SyncSetAttrReq {
    fn user_mut(&mut self) -> &mut User {
        &mut self.set.user
    }
}

macro_rules! names_caller {
    ($($req:ty),* $(,)?) => {
        $(impl NamesCaller for $req {
            fn user_mut(&mut self) -> &mut User {
                &mut self.user
            }
        })*
    };
}

names_caller!(
    StatfsReq,
    StatReq,
    LookupReq,
    ResolveReq,
    CreateReq,
    MkdirReq,
    MkdirAllReq,
    MknodReq,
    SymlinkReq,
    LinkReq,
    EntryReq,
    RenameReq,
    ReaddirReq,
    OpenReq,
    SessionReq,
    LengthHintReq,
    SetAttrReq,
    XattrReq,
    SetLayoutReq,
    SyncSetAttrsReq,
);

/// Who calls the namespace: mounts and programs using the client library,
/// and operators' tools (acting as their certificate's uid).
const CLIENT_OR_ADMIN: Roles = Roles::CLIENT.or(Roles::ADMIN);

macro_rules! method {
    ($(#[$doc:meta])* $name:ident = $id:literal, $req:ty => $rsp:ty, roles $roles:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name;

        impl Method for $name {
            const ID: u16 = $id;
            const NAME: &'static str = concat!("meta.", stringify!($name));
            type Req = $req;
            type Rsp = Result<$rsp, MetaError>;
            const ROLES: Roles = $roles;
        }
    };
}

method!(
    /// Space of the whole cluster.
    Statfs = 500, StatfsReq => StatfsRsp,
    roles CLIENT_OR_ADMIN
);
method!(
    /// `getattr`.
    Stat = 501, StatReq => Attr,
    roles CLIENT_OR_ADMIN
);
method!(Lookup = 502, LookupReq => Attr, roles CLIENT_OR_ADMIN);
method!(
    /// A path from the root, for tools without a mount.
    Resolve = 503, ResolveReq => Attr,
    roles CLIENT_OR_ADMIN
);
method!(
    /// `open(O_CREAT)`.
    Create = 504, CreateReq => OpenRsp,
    roles CLIENT_OR_ADMIN
);
method!(Mkdir = 505, MkdirReq => Attr, roles CLIENT_OR_ADMIN);
method!(
    /// `mkdir -p`.
    MkdirAll = 506, MkdirAllReq => Attr,
    roles CLIENT_OR_ADMIN
);
method!(Symlink = 507, SymlinkReq => Attr, roles CLIENT_OR_ADMIN);
method!(Readlink = 508, StatReq => ReadlinkRsp, roles CLIENT_OR_ADMIN);
method!(
    /// A hard link; answers the file's attributes.
    Link = 509, LinkReq => Attr,
    roles CLIENT_OR_ADMIN
);
method!(Unlink = 510, EntryReq => (), roles CLIENT_OR_ADMIN);
method!(Rmdir = 511, EntryReq => (), roles CLIENT_OR_ADMIN);
method!(Rename = 512, RenameReq => (), roles CLIENT_OR_ADMIN);
method!(Readdir = 513, ReaddirReq => ReaddirRsp, roles CLIENT_OR_ADMIN);
method!(Open = 514, OpenReq => OpenRsp, roles CLIENT_OR_ADMIN);
method!(
    /// Ends a write session and fixes the exact length from storage.
    Close = 515, SessionReq => Attr,
    roles CLIENT_OR_ADMIN
);
method!(
    /// `fsync`: fixes the exact length from storage, keeps the session.
    Sync = 516, SessionReq => Attr,
    roles CLIENT_OR_ADMIN
);
method!(LengthHint = 517, LengthHintReq => Attr, roles CLIENT_OR_ADMIN);
method!(
    /// `setattr`; a size change truncates the data on storage too.
    SetAttr = 518, SetAttrReq => Attr,
    roles CLIENT_OR_ADMIN
);
method!(GetXattr = 519, XattrReq => XattrRsp, roles CLIENT_OR_ADMIN);
method!(SetXattr = 520, XattrReq => (), roles CLIENT_OR_ADMIN);
method!(ListXattr = 521, StatReq => XattrListRsp, roles CLIENT_OR_ADMIN);
method!(RemoveXattr = 522, XattrReq => (), roles CLIENT_OR_ADMIN);
method!(
    /// Recursive remove in one transaction; the tree's data is reclaimed
    /// in the background.
    RemoveAll = 523, EntryReq => (),
    roles CLIENT_OR_ADMIN
);
method!(
    /// A directory's default layout for new files.
    SetLayout = 524, SetLayoutReq => Attr,
    roles CLIENT_OR_ADMIN
);
method!(GcStatus = 525, GcStatusReq => GcStatusRsp, roles Roles::ADMIN);
method!(
    /// A FIFO, socket or device node.
    Mknod = 526, MknodReq => Attr,
    roles CLIENT_OR_ADMIN
);
method!(
    /// Keeps a client's write sessions for another lease.
    RenewLease = 527, RenewLeaseReq => RenewLeaseRsp,
    roles CLIENT_OR_ADMIN
);

method!(
    /// Opens (creating if need be) the KV cache.
    KvOpen = 528, KvOpenReq => KvOpenRsp,
    roles CLIENT_OR_ADMIN
);
method!(KvLookup = 529, KvKeysReq => KvLookupRsp, roles CLIENT_OR_ADMIN);
method!(KvReserve = 530, KvReserveReq => KvReserveRsp, roles CLIENT_OR_ADMIN);
method!(KvCommit = 531, KvCommitReq => KvCommitRsp, roles CLIENT_OR_ADMIN);
method!(KvRelease = 532, KvReleaseReq => (), roles CLIENT_OR_ADMIN);
method!(KvRemove = 533, KvRemoveReq => KvRemoveRsp, roles CLIENT_OR_ADMIN);
method!(KvEvict = 534, KvEvictReq => KvEvictRsp, roles CLIENT_OR_ADMIN);
method!(
    /// `setattr` with the writer's pending sync folded in ([`SyncSetAttrReq`]).
    SyncSetAttr = 535, SyncSetAttrReq => Attr,
    roles CLIENT_OR_ADMIN
);
method!(
    /// A writer's deferred `setattr`s, with its pending sync ([`SyncSetAttrsReq`]).
    SyncSetAttrs = 536, SyncSetAttrsReq => Attr,
    roles CLIENT_OR_ADMIN
);
method!(
    /// `fsync` and `fsyncdir`: answers once every namespace change answered
    /// before it is durable (entries are answered once applied; see
    /// `NsConfig::durable_namespace_changes` in flyfs-fs-meta).
    SyncNamespace = 537, SyncNamespaceReq => (),
    roles CLIENT_OR_ADMIN
);
method!(
    /// Moves a file whose data the metadata service holds ([`Attr::inline`])
    /// to storage, for a writer about to write past what may be held: the
    /// request's session must be a write session of the file.
    Uninline = 538, SessionReq => Attr,
    roles CLIENT_OR_ADMIN
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn names_travel_as_bytes_and_round_trip() {
        let req = LookupReq {
            user: User {
                uid: 1000,
                gid: 100,
                groups: vec![4, 27],
            },
            parent: InodeId(1),
            name: b"caf\xe9".to_vec(),
        };
        let bytes = encode(&req);
        // A byte string, not an array of integers.
        assert!(bytes.windows(4).any(|w| w == b"caf\xe9"));
        assert_eq!(decode::<LookupReq>(&bytes).expect("decode"), req);
    }

    #[test]
    fn a_request_without_its_caller_does_not_decode_to_root() {
        #[derive(Serialize)]
        struct Forgetful {
            ino: InodeId,
        }
        #[derive(Serialize)]
        struct HalfUser {
            user: HalfUserFields,
            ino: InodeId,
        }
        #[derive(Serialize)]
        struct HalfUserFields {
            gid: u32,
        }
        let missing = decode::<StatReq>(&encode(&Forgetful { ino: InodeId(7) })).expect("decode");
        assert_eq!(missing.ino, InodeId(7));
        assert!(!missing.user.is_set());
        assert!(!missing.user.is_root());
        let half = HalfUser {
            user: HalfUserFields { gid: 0 },
            ino: InodeId(7),
        };
        let half = decode::<StatReq>(&encode(&half)).expect("decode");
        assert_eq!(half.user.uid, User::UNSET);
        assert!(!half.user.is_set());
        assert!(User::root().is_set() && User::root().is_root());
    }

    #[test]
    fn layout_maps_chunks_round_robin() {
        let layout = Layout {
            chain_table: ChainTableId(1),
            chunk_size: 1 << 20,
            stripe: 3,
            chains: vec![ChainId(5), ChainId(6), ChainId(7)],
        };
        assert_eq!(layout.chain_of(0), Some(ChainId(5)));
        assert_eq!(layout.chain_of(4), Some(ChainId(6)));
        assert_eq!(Layout::default().chain_of(0), None);
    }
}
