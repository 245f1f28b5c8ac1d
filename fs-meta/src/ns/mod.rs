//! The POSIX namespace of the metadata service: directories, files,
//! symlinks, hard links, rename, permissions, write sessions and their
//! client leases, extended attributes and the GC queue, on the
//! transactional KV interface.
//!
//! [`Namespace`] holds no namespace state of its own (only an inode id pool
//! and a placement cursor, both safe to lose), so any number of metadata
//! service instances can share one store. Every public operation is one KV
//! transaction run with [`flyfs_kv::run`]: it reads what it decides on
//! serializably, so when two instances race the store aborts one and the
//! retry sees the other's result; a failed operation leaves nothing behind.
//!
//! The code is split by area: `dir.rs` (lookup, path resolution, mkdir,
//! rmdir, readdir, symlinks, layouts, recursive remove), `file.rs` (create,
//! open/close, lengths, setattr, link, unlink), `rename.rs`, `xattr.rs`,
//! `gc.rs` (the queue API for the GC worker), `lease.rs` (client leases and
//! the session reaper's API), `check.rs` (fsck), `kvcache.rs` (the KV
//! cache's index, a keyspace beside the namespace), with
//! `perm.rs`, `alloc.rs`, `layout.rs` and `txn.rs` underneath. The key and
//! value formats are in [`crate::schema`]; docs/metadata-schema.md explains
//! the invariants every operation keeps.
//!
//! # errno choices where POSIX leaves room
//! * Names: empty, or containing `/` or NUL: EINVAL; over 255 bytes:
//!   ENAMETOOLONG. `.` and `..`: `lookup` and `resolve` follow them; create
//!   gives EISDIR (as `open(O_CREAT)` does on Linux); mkdir, symlink and link
//!   EEXIST; unlink EISDIR; rmdir `.` EINVAL and `..` ENOTEMPTY; rename and
//!   remove_all EINVAL.
//! * Checks run in Linux's order: the parent must exist (ENOENT), be a
//!   directory (ENOTDIR) and be searchable (EACCES); then the entry is looked
//!   up (ENOENT / EEXIST); then write permission on the parent (EACCES), the
//!   sticky bit (EPERM), and the entry's type (EISDIR / ENOTDIR), and last
//!   emptiness (ENOTEMPTY).
//! * `create` over an existing symlink: ELOOP (the caller resolves symlinks
//!   before creating, so meeting one here is `O_NOFOLLOW`'s case).
//! * Directory times are not updated when entries change, and a directory's
//!   nlink is 1 (see [`Inode::nlink`]): both would make every create write
//!   its parent's inode and conflict with every other create in the
//!   directory, as 3FS also avoids.

mod alloc;
mod check;
mod dir;
mod error;
mod file;
mod gc;
mod kvcache;
pub mod layout;
mod lease;
pub mod perm;
mod rename;
mod txn;
mod xattr;

use std::future::Future;
use std::sync::Arc;

use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::User;

use self::alloc::InodeAllocator;
pub use self::alloc::{ALLOC_BATCH, ALLOC_SHARDS, batch_of};
pub use self::check::{CheckReport, Problem};
pub use self::dir::{
    DirEntry, DirPage, DirPlusPage, READDIR_LIMIT_MAX, REMOVE_ALL_CHECKED_ENTRIES_MAX,
    RESOLVE_STEPS_MAX, SYMLINKS_MAX,
};
pub use self::error::NsError;
pub use self::file::{
    Closed, CreateFlags, Created, OpenFlags, Opened, SetAttr, SetAttrResult, SetTime, StoreInline,
    Truncate, WriterLength, WriterLengthFixed,
};
pub use self::gc::{GcExpand, GcFinish, GcItem};
pub use self::kvcache::{
    KV_ACCESS_BUCKET_MS_DEFAULT, KV_EVICT_AHEAD_MAX, KV_RESERVATION_MS_DEFAULT, KV_SLOT_BYTES_MAX,
    KV_SLOT_BYTES_MIN, check_kv_key,
};
use self::layout::Placement;
pub use self::layout::{ChainTables, LayoutError, LayoutSpec, StaticChainTables, StoredLayout};
pub use self::lease::{ExpiredPage, ExpiredSession, Reaped};
pub use self::rename::DEPTH_MAX;
use self::txn::MetaTx;
pub use self::xattr::XattrMode;
pub use crate::schema::{
    DirData, FileData, GcKind, Inode, InodeData, InodeKind, LeaseValue, SessionId, SessionValue,
    SymlinkData,
};
use crate::schema::{
    FORMAT_VERSION, FormatValue, NAME_BYTES_MAX, ROOT, decode_format, encode_format, format_key,
};
use flyfs_kv::{Kv, RetryOptions, Transaction};
use flyfs_time::{Clock, WallClock};

/// The default client lease: a minute, far longer than the clock skew
/// between metadata instances and than a client's renewal takes through a
/// metadata failover, and short enough that a crashed client's unlinked
/// files are not kept much past the GC delay.
pub const CLIENT_LEASE_MS_DEFAULT: u64 = 60_000;

/// How a namespace instance behaves.
#[derive(Clone)]
pub struct NsConfig {
    /// The root directory's default layout, written when the namespace is
    /// first created, and the layout of files in a directory without one.
    pub root_layout: LayoutSpec,
    /// Resolves chain tables when files are created.
    pub chain_tables: Arc<dyn ChainTables>,
    /// How long an unlinked file or removed tree waits in the GC queue
    /// before its data is deleted (3FS: 5 minutes).
    pub gc_delay_ms: u64,
    /// Entries `gc_expand` moves per transaction: small enough to stay far
    /// from the store's size and age limits.
    pub gc_batch: usize,
    /// How long a client's write sessions outlive its last lease renewal
    /// (`renew_lease`) before the session reaper may end them. Clients
    /// renew every third of it (the renewal's answer tells them the length).
    pub client_lease_ms: u64,
    /// Where file times and GC due times come from: the wall clock in
    /// production, a [`ManualClock`](flyfs_time::ManualClock) in tests (the
    /// GC delay must be testable without waiting five minutes).
    pub clock: Arc<dyn Clock>,
    pub retry: RetryOptions,
    /// Whether an entry added, removed or renamed, and a length the flush
    /// of `close(2)` fixes, is durable before it is answered (3FS's
    /// behaviour on FoundationDB). Off, the default, it is answered once
    /// applied and visible to every client, and durable at
    /// the next `fsync` or `fsyncdir`, the next durable commit, or within
    /// the store's relaxed window (10 ms for the embedded store), as a
    /// local file system's directory changes are (docs/metadata-schema.md,
    /// "Durability").
    pub durable_namespace_changes: bool,
    /// The largest file whose data the namespace holds itself, with its
    /// inode, instead of storage (0: none). A file is held so only while
    /// one write session writes it from empty (docs/metadata-schema.md,
    /// "Inline data"). At most [`INLINE_BYTES_LIMIT`].
    pub inline_bytes_max: u32,
}

/// The most [`NsConfig::inline_bytes_max`] may be: far inside every store's
/// value limit (FoundationDB's is 100 kB), and a file held inline is sent
/// whole with each sync and open.
pub const INLINE_BYTES_LIMIT: u32 = 64 << 10;

/// [`NsConfig::inline_bytes_max`]'s default: 16 KiB holds 85% of the files
/// of the source tree `benches/peers` unpacks (60% at 4 KiB).
pub const INLINE_BYTES_DEFAULT: u32 = 16 << 10;

impl NsConfig {
    /// The defaults: a 5-minute GC delay, 256 entries per GC transaction,
    /// a one-minute client lease, the wall clock, the KV layer's default
    /// retries.
    pub fn new(root_layout: LayoutSpec, chain_tables: Arc<dyn ChainTables>) -> NsConfig {
        NsConfig {
            root_layout,
            chain_tables,
            gc_delay_ms: 5 * 60 * 1000,
            gc_batch: 256,
            client_lease_ms: CLIENT_LEASE_MS_DEFAULT,
            clock: Arc::new(WallClock),
            retry: RetryOptions::default(),
            durable_namespace_changes: false,
            inline_bytes_max: INLINE_BYTES_DEFAULT,
        }
    }
}

impl std::fmt::Debug for NsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NsConfig")
            .field("root_layout", &self.root_layout)
            .field("gc_delay_ms", &self.gc_delay_ms)
            .field("gc_batch", &self.gc_batch)
            .field("client_lease_ms", &self.client_lease_ms)
            .field("clock", &self.clock)
            .field("retry", &self.retry)
            .field("durable_namespace_changes", &self.durable_namespace_changes)
            .field("inline_bytes_max", &self.inline_bytes_max)
            .finish_non_exhaustive()
    }
}

/// The namespace on a KV store. Cheap to clone (clones share the inode id
/// pool); see the module documentation.
pub struct Namespace<K: Kv> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    kv: K,
    config: NsConfig,
    alloc: InodeAllocator,
    placement: Placement,
}

impl<K: Kv> Clone for Namespace<K> {
    fn clone(&self) -> Self {
        Namespace {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: Kv> std::fmt::Debug for Namespace<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespace")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl<K: Kv> Namespace<K> {
    /// Opens the namespace in `kv`, creating the root directory (inode 1,
    /// mode 0755, owned by root, with `config.root_layout`) and the format
    /// record if the store is empty. Safe to run from several instances at
    /// once: the creating transaction reads the format key, so only one
    /// commits and the others see its root on retry.
    pub async fn open(kv: K, config: NsConfig) -> Result<Self, NsError> {
        config.root_layout.validate()?;
        let ns = Namespace {
            inner: Arc::new(Inner {
                kv,
                config,
                alloc: InodeAllocator::new(rand::random()),
                placement: Placement::new(rand::random()),
            }),
        };
        let root_layout = ns.inner.config.root_layout;
        ns.write(|tx| async move {
            let key = format_key();
            match tx.tx.get(&key, false).await? {
                Some(value) => {
                    decode_format(&key, &value)?;
                    match tx.inode(ROOT).await? {
                        Some(root) if root.is_dir() => Ok(()),
                        _ => Err(NsError::Corrupt {
                            key: "INOD ino 0x1".into(),
                            reason: "formatted namespace without a root directory".into(),
                        }),
                    }
                }
                None => {
                    if tx.inode(ROOT).await?.is_some() {
                        return Err(NsError::Corrupt {
                            key: "META format".into(),
                            reason: "missing, but a root directory exists".into(),
                        });
                    }
                    tx.put_inode(&Inode {
                        ino: ROOT,
                        uid: 0,
                        gid: 0,
                        mode: 0o755,
                        nlink: 2,
                        atime_ns: tx.now_ns,
                        mtime_ns: tx.now_ns,
                        ctime_ns: tx.now_ns,
                        gc_due_ms: None,
                        data: InodeData::Directory(DirData {
                            parent: ROOT,
                            default_layout: Some(root_layout),
                        }),
                    })?;
                    let format = FormatValue {
                        version: FORMAT_VERSION,
                        created_ns: tx.now_ns,
                    };
                    tx.tx.set(&key, &encode_format(&format)?)?;
                    Ok(())
                }
            }
        })
        .await?;
        Ok(ns)
    }

    /// The store underneath.
    pub fn kv(&self) -> &K {
        &self.inner.kv
    }

    pub fn config(&self) -> &NsConfig {
        &self.inner.config
    }

    fn now_ns(&self) -> i64 {
        self.inner.config.clock.now_ns()
    }

    /// Runs `body` as one read-write transaction, retried on conflicts.
    async fn write<R, F, Fut>(&self, mut body: F) -> Result<R, NsError>
    where
        F: FnMut(MetaTx<K::Tx>) -> Fut,
        Fut: Future<Output = Result<R, NsError>>,
    {
        let now_ns = self.now_ns();
        flyfs_kv::run(&self.inner.kv, &self.inner.config.retry, |tx| {
            body(MetaTx::new(tx, now_ns))
        })
        .await
    }

    /// Runs `body` as [`write`](Self::write) does, for a namespace change
    /// (an entry added, removed or renamed) that is answered once applied
    /// and made durable soon after ([`relax`](Self::relax)).
    async fn change<R, F, Fut>(&self, mut body: F) -> Result<R, NsError>
    where
        F: FnMut(MetaTx<K::Tx>) -> Fut,
        Fut: Future<Output = Result<R, NsError>>,
    {
        self.write(|tx| {
            self.relax(&tx);
            body(tx)
        })
        .await
    }

    /// Lets `tx`'s commit (a namespace change, or a length fixed for the
    /// flush of `close(2)`) be answered before it is durable, unless it
    /// must be durable when answered
    /// ([`NsConfig::durable_namespace_changes`]). As on a local file
    /// system, a change is durable after an `fsync` of a file or directory
    /// ([`sync`](Self::sync)); the store also makes it durable within
    /// milliseconds on its own, and a crash keeps a prefix of the commits,
    /// so nothing that saw a change survives without it
    /// (docs/metadata-schema.md, "Durability").
    fn relax(&self, tx: &MetaTx<K::Tx>) {
        if !self.inner.config.durable_namespace_changes {
            tx.tx.relax_durability();
        }
    }

    /// Returns once every change answered before the call is durable: what
    /// a client's `fsync` and `fsyncdir` wait for, and what the GC waits
    /// for before it deletes the data a remove released.
    pub async fn sync(&self) -> Result<(), NsError> {
        Ok(self.inner.kv.sync().await?)
    }

    /// Runs `body` as one read-only transaction.
    async fn read<R, F, Fut>(&self, mut body: F) -> Result<R, NsError>
    where
        F: FnMut(MetaTx<K::Tx>) -> Fut,
        Fut: Future<Output = Result<R, NsError>>,
    {
        let now_ns = self.now_ns();
        flyfs_kv::run_read_only(&self.inner.kv, &self.inner.config.retry, |tx| {
            body(MetaTx::new(tx, now_ns))
        })
        .await
    }

    /// A fresh inode id. Called inside transaction bodies: taking a batch is
    /// its own small transaction, and an id taken by an attempt that then
    /// retries is simply not used.
    async fn allocate(&self) -> Result<InodeId, NsError> {
        self.inner
            .alloc
            .allocate(&self.inner.kv, &self.inner.config.retry)
            .await
    }

    /// The attributes of `ino`. No permission is needed (as for `fstat`);
    /// the path to it was checked when it was looked up.
    pub async fn stat(&self, ino: InodeId) -> Result<Inode, NsError> {
        self.read(|tx| async move { tx.existing(ino).await }).await
    }
}

/// What a name is, once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NameKind {
    Normal,
    Dot,
    DotDot,
}

/// Checks an entry name: ENAMETOOLONG over 255 bytes, EINVAL when empty or
/// containing `/` or NUL. `.` and `..` pass; each operation decides.
pub(crate) fn check_name(name: &[u8]) -> Result<NameKind, NsError> {
    if name.len() > NAME_BYTES_MAX {
        return Err(NsError::NameTooLong(format!(
            "a name of {} bytes (at most {NAME_BYTES_MAX})",
            name.len()
        )));
    }
    if name.is_empty() {
        return Err(NsError::Invalid("an empty name".into()));
    }
    if name.iter().any(|&b| b == b'/' || b == 0) {
        return Err(NsError::Invalid(format!(
            "name {:?} contains '/' or NUL",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(match name {
        b"." => NameKind::Dot,
        b".." => NameKind::DotDot,
        _ => NameKind::Normal,
    })
}

/// A name for messages.
pub(crate) fn show(name: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(name))
}

/// The parent side of an entry operation: `parent` must exist (ENOENT), be a
/// directory (ENOTDIR) and be searchable by `user` (EACCES).
pub(crate) async fn searchable_dir<T: Transaction>(
    tx: &MetaTx<T>,
    user: &User,
    parent: InodeId,
) -> Result<Inode, NsError> {
    let dir = tx.directory(parent).await?;
    perm::check(&dir, user, perm::MAY_EXEC, "search")?;
    Ok(dir)
}

/// Before adding an entry to `dir`: it must still be linked (ENOENT, as for
/// a removed directory on Linux) and writable and searchable (EACCES).
pub(crate) fn check_can_add(dir: &Inode, user: &User) -> Result<(), NsError> {
    if dir.gc_due_ms.is_some() {
        return Err(NsError::NotFound(format!("{:?} has been removed", dir.ino)));
    }
    perm::check(dir, user, perm::MAY_WRITE | perm::MAY_EXEC, "add an entry")
}

/// Before removing an entry from `dir`: write and search on `dir` (EACCES),
/// then the sticky rule (EPERM).
pub(crate) fn check_can_remove(dir: &Inode, victim: &Inode, user: &User) -> Result<(), NsError> {
    perm::check(
        dir,
        user,
        perm::MAY_WRITE | perm::MAY_EXEC,
        "remove an entry",
    )?;
    perm::check_sticky(dir, victim, user)
}

#[cfg(test)]
pub(crate) mod tests {
    use flyfs_proto::ids::{ChainId, ChainTableId};

    use super::*;
    use crate::schema::{InodeData, MODE_MASK};
    use flyfs_kv::mem::MemKv;

    /// A namespace on a fresh `MemKv`: table 1 has chains 1..=8, the root
    /// layout stripes over 2 of them, table 2 has chains 101..=104.
    pub(crate) async fn namespace() -> Namespace<MemKv> {
        let mut tables = StaticChainTables::single(ChainTableId(1), 8);
        tables
            .0
            .insert(ChainTableId(2), (101..=104).map(ChainId).collect());
        let config = NsConfig::new(
            LayoutSpec {
                chain_table: ChainTableId(1),
                chunk_size: 1 << 20,
                stripe: 2,
            },
            Arc::new(tables),
        );
        Namespace::open(MemKv::new(), config).await.expect("open")
    }

    /// A namespace on a fresh `MemKv` and a `ManualClock` at `start_ns`, for
    /// the tests of timed behaviour (GC delays, leases): one table of 4
    /// chains, files on 1; `configure` sets what the test times.
    pub(crate) async fn namespace_on_clock(
        start_ns: i64,
        configure: impl FnOnce(&mut NsConfig),
    ) -> (Namespace<MemKv>, Arc<flyfs_time::ManualClock>) {
        let clock = Arc::new(flyfs_time::ManualClock::new(start_ns));
        let mut config = NsConfig::new(
            LayoutSpec {
                chain_table: ChainTableId(1),
                chunk_size: 1 << 20,
                stripe: 1,
            },
            Arc::new(StaticChainTables::single(ChainTableId(1), 4)),
        );
        config.clock = clock.clone();
        configure(&mut config);
        (
            Namespace::open(MemKv::new(), config).await.expect("open"),
            clock,
        )
    }

    #[tokio::test]
    async fn open_is_idempotent_and_checks_the_format() {
        let ns = namespace().await;
        let root = ns.stat(ROOT).await.expect("root");
        assert_eq!(
            (root.uid, root.gid, root.mode, root.nlink),
            (0, 0, 0o755, 2)
        );
        assert_eq!(root.mode & !MODE_MASK, 0);
        assert!(
            matches!(&root.data, InodeData::Directory(d) if d.parent == ROOT && d.default_layout.is_some())
        );
        // A second instance finds the same root.
        let again = Namespace::open(ns.kv().clone(), ns.config().clone())
            .await
            .expect("reopen");
        assert_eq!(again.stat(ROOT).await.expect("root"), root);
        // A store written by a future format is refused, not misread.
        let future = FormatValue {
            version: FORMAT_VERSION + 1,
            created_ns: 0,
        };
        flyfs_kv::run(ns.kv(), &RetryOptions::default(), |tx| {
            let value = encode_format(&future);
            async move {
                tx.set(&format_key(), &value?)?;
                Ok::<(), NsError>(())
            }
        })
        .await
        .expect("write a future format");
        let error = Namespace::open(ns.kv().clone(), ns.config().clone())
            .await
            .expect_err("future format");
        assert_eq!(error.errno(), libc::EIO);
        assert!(error.to_string().contains("format 2"), "{error}");
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(check_name(b"a").ok(), Some(NameKind::Normal));
        assert_eq!(check_name(b".").ok(), Some(NameKind::Dot));
        assert_eq!(check_name(b"..").ok(), Some(NameKind::DotDot));
        assert_eq!(check_name(b"...").ok(), Some(NameKind::Normal));
        assert_eq!(check_name(&[b'x'; 255]).ok(), Some(NameKind::Normal));
        let errno = |name: &[u8]| check_name(name).err().map(|e| e.errno());
        assert_eq!(errno(&[b'x'; 256]), Some(libc::ENAMETOOLONG));
        assert_eq!(errno(b""), Some(libc::EINVAL));
        assert_eq!(errno(b"a/b"), Some(libc::EINVAL));
        assert_eq!(errno(b"a\0b"), Some(libc::EINVAL));
    }
}
