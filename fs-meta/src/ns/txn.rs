//! `MetaTx`: one KV transaction seen through the schema, with typed reads and
//! writes of inodes, entries, sessions and queue entries.
//!
//! Every namespace operation body runs against one `MetaTx`, so the
//! operations read as POSIX logic rather than byte juggling, and every read
//! is serializable (recording a read conflict) unless it says otherwise:
//! correctness under concurrent instances comes from the KV store's conflict
//! detection, so a read the decision depends on must never be a snapshot
//! read.

use bytes::Bytes;
use flyfs_proto::ids::InodeId;

use crate::ns::NsError;
use crate::schema::{
    self, Dentry, GcKind, Inode, InodeData, SessionId, SessionValue, decode_dentry,
    decode_dir_times, decode_inode, dentry_key, dentry_prefix, dir_times_key, encode_dentry,
    encode_dir_times, encode_gc, encode_inode, gc_key, inode_key, session_key, session_prefix,
    xattr_prefix,
};
use flyfs_kv::{KeyValue, RangeOptions, Transaction, key_after, prefix_end};

/// A transaction plus the time the operation started (one timestamp for
/// every inode it touches, as a local file system does).
#[derive(Clone, Debug)]
pub(crate) struct MetaTx<T> {
    pub(crate) tx: T,
    pub(crate) now_ns: i64,
}

impl<T: Transaction> MetaTx<T> {
    pub(crate) fn new(tx: T, now_ns: i64) -> MetaTx<T> {
        MetaTx { tx, now_ns }
    }

    /// The operation's time in ms since the epoch (0 before the epoch).
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.now_ns / 1_000_000).unwrap_or(0)
    }

    /// The inode; a directory's with its modification and change times
    /// raised to when its entries last changed (`DTIM`, read as a snapshot:
    /// no decision depends on a directory's times, so entry changes racing
    /// with this read need not conflict with it).
    pub(crate) async fn inode(&self, ino: InodeId) -> Result<Option<Inode>, NsError> {
        let Some(value) = self.tx.get(&inode_key(ino), false).await? else {
            return Ok(None);
        };
        let mut inode = decode_inode(ino, &value)?;
        if inode.is_dir() {
            let key = dir_times_key(ino);
            if let Some(value) = self.tx.get(&key, true).await? {
                let changed_ns = decode_dir_times(&key, &value)?;
                inode.mtime_ns = inode.mtime_ns.max(changed_ns);
                inode.ctime_ns = inode.ctime_ns.max(changed_ns);
            }
        }
        Ok(Some(inode))
    }

    /// Records that an entry of `dir` changed now: a blind write, so
    /// concurrent creates in one directory do not conflict over it.
    fn touch_dir(&self, dir: InodeId) -> Result<(), NsError> {
        self.tx
            .set(&dir_times_key(dir), &encode_dir_times(self.now_ns)?)?;
        Ok(())
    }

    /// Drops `dir`'s entry-change time, so the times in its inode are the
    /// whole truth (setattr may set them into the past).
    pub(crate) fn clear_dir_times(&self, dir: InodeId) -> Result<(), NsError> {
        self.tx.clear(&dir_times_key(dir))?;
        Ok(())
    }

    /// The inode, or ENOENT.
    pub(crate) async fn existing(&self, ino: InodeId) -> Result<Inode, NsError> {
        self.inode(ino)
            .await?
            .ok_or_else(|| NsError::NotFound(format!("{ino:?}")))
    }

    /// The directory `ino`: ENOENT if it does not exist, ENOTDIR if it is
    /// something else.
    pub(crate) async fn directory(&self, ino: InodeId) -> Result<Inode, NsError> {
        let inode = self.existing(ino).await?;
        if !inode.is_dir() {
            return Err(NsError::NotDir(format!("{ino:?}")));
        }
        Ok(inode)
    }

    /// The inode an entry names, which must exist: a dangling entry is
    /// corruption, not ENOENT.
    pub(crate) async fn target(
        &self,
        parent: InodeId,
        name: &[u8],
        dentry: Dentry,
    ) -> Result<Inode, NsError> {
        let inode = self
            .inode(dentry.ino)
            .await?
            .ok_or_else(|| NsError::Corrupt {
                key: schema::describe_key(&dentry_key(parent, name)),
                reason: format!("names {:?}, which does not exist", dentry.ino),
            })?;
        if inode.kind() != dentry.kind {
            return Err(NsError::Corrupt {
                key: schema::describe_key(&dentry_key(parent, name)),
                reason: format!(
                    "says {:?} but {:?} is a {:?}",
                    dentry.kind,
                    inode.ino,
                    inode.kind()
                ),
            });
        }
        Ok(inode)
    }

    pub(crate) fn put_inode(&self, inode: &Inode) -> Result<(), NsError> {
        debug_assert!(
            !matches!(&inode.data, InodeData::Directory(d) if d.parent.0 == 0)
                || inode.gc_due_ms.is_some(),
            "a linked directory must have a parent"
        );
        self.tx.set(&inode_key(inode.ino), &encode_inode(inode)?)?;
        Ok(())
    }

    /// Deletes an inode with its extended attributes and write sessions.
    /// (Queue entries are the caller's business: only GC removes them.)
    pub(crate) fn delete_inode(&self, ino: InodeId) -> Result<(), NsError> {
        self.tx.clear(&inode_key(ino))?;
        self.clear_dir_times(ino)?;
        let xattrs = xattr_prefix(ino);
        self.tx.clear_range(&xattrs, &prefix_end(&xattrs))?;
        let sessions = session_prefix(ino);
        self.tx.clear_range(&sessions, &prefix_end(&sessions))?;
        Ok(())
    }

    /// A subdirectory entry was added to (`1`) or removed from (`-1`)
    /// directory `dir`: its link count counts them (their `..`), as Linux
    /// file systems report. Reads the directory again, so earlier writes
    /// of it in this transaction are kept.
    pub(crate) async fn count_subdir(&self, dir: InodeId, delta: i32) -> Result<(), NsError> {
        let mut inode = self.directory(dir).await?;
        if inode.gc_due_ms.is_some() {
            // A detached directory (its tree waits for GC) counts nothing.
            return Ok(());
        }
        inode.nlink = inode
            .nlink
            .checked_add_signed(delta)
            .filter(|&n| n >= 2)
            .ok_or_else(|| NsError::Corrupt {
                key: schema::describe_key(&inode_key(dir)),
                reason: format!("link count {} cannot change by {delta}", inode.nlink),
            })?;
        self.put_inode(&inode)
    }

    pub(crate) async fn dentry(
        &self,
        parent: InodeId,
        name: &[u8],
    ) -> Result<Option<Dentry>, NsError> {
        let key = dentry_key(parent, name);
        match self.tx.get(&key, false).await? {
            Some(value) => Ok(Some(decode_dentry(&key, &value)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn put_dentry(
        &self,
        parent: InodeId,
        name: &[u8],
        dentry: Dentry,
    ) -> Result<(), NsError> {
        self.tx
            .set(&dentry_key(parent, name), &encode_dentry(&dentry)?)?;
        self.touch_dir(parent)
    }

    pub(crate) fn clear_dentry(&self, parent: InodeId, name: &[u8]) -> Result<(), NsError> {
        self.tx.clear(&dentry_key(parent, name))?;
        self.touch_dir(parent)
    }

    /// Up to `limit` entries of `dir` after `after` (exclusive), by name.
    /// `snapshot` reads record no conflict: for listings, which may race
    /// with creates without being wrong.
    pub(crate) async fn entries(
        &self,
        dir: InodeId,
        after: Option<&[u8]>,
        limit: usize,
        snapshot: bool,
    ) -> Result<(Vec<(Vec<u8>, Dentry)>, bool), NsError> {
        let prefix = dentry_prefix(dir);
        let begin = match after {
            Some(name) => key_after(&dentry_key(dir, name)),
            None => Bytes::from(prefix.clone()),
        };
        let options = RangeOptions::new(begin, prefix_end(&prefix))
            .limit(limit)
            .snapshot(snapshot);
        let result = self.tx.get_range(&options).await?;
        let mut entries = Vec::with_capacity(result.kvs.len());
        for KeyValue { key, value } in &result.kvs {
            let name = key.get(prefix.len()..).unwrap_or_default().to_vec();
            entries.push((name, decode_dentry(key, value)?));
        }
        Ok((entries, result.more))
    }

    /// Whether `dir` has no entries. A serializable read: a create racing
    /// with an rmdir makes one of them retry.
    pub(crate) async fn is_empty_dir(&self, dir: InodeId) -> Result<bool, NsError> {
        let (entries, _) = self.entries(dir, None, 1, false).await?;
        Ok(entries.is_empty())
    }

    pub(crate) fn put_session(
        &self,
        ino: InodeId,
        session: SessionId,
        value: &SessionValue,
    ) -> Result<(), NsError> {
        self.tx
            .set(&session_key(ino, session), &schema::encode_session(value)?)?;
        Ok(())
    }

    pub(crate) async fn has_session(
        &self,
        ino: InodeId,
        session: SessionId,
    ) -> Result<bool, NsError> {
        Ok(self
            .tx
            .get(&session_key(ino, session), false)
            .await?
            .is_some())
    }

    /// Whether `ino` has any write session.
    pub(crate) async fn has_sessions(&self, ino: InodeId) -> Result<bool, NsError> {
        let prefix = session_prefix(ino);
        let result = self
            .tx
            .get_range(&RangeOptions::prefix(&prefix).limit(1))
            .await?;
        Ok(!result.kvs.is_empty())
    }

    /// Puts `inode` on the GC queue, due at `due_ms`, and writes it.
    pub(crate) fn enqueue_gc(
        &self,
        inode: &mut Inode,
        due_ms: u64,
        kind: GcKind,
    ) -> Result<(), NsError> {
        debug_assert!(inode.gc_due_ms.is_none(), "{:?} queued twice", inode.ino);
        inode.gc_due_ms = Some(due_ms);
        self.tx.set(&gc_key(due_ms, inode.ino), &encode_gc(kind)?)?;
        self.put_inode(inode)
    }
}
