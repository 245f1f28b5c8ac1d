//! The GC queue API, for the garbage-collection worker of the metadata
//! service.
//!
//! The queue is the `GCQ` keys, ordered by due time. An entry is written in
//! the same transaction that takes an inode out of the namespace (the last
//! unlink of a file, `remove_all` of a directory) and carries `gc_due_ms` in
//! the inode too, so the inode says it is queued and `check` can match
//! the two. The worker's loop:
//!
//! 1. [`Namespace::gc_due`] lists entries due by now.
//! 2. A directory: [`Namespace::gc_expand`] moves its entries onto the queue
//!    (files losing their last link, subdirectories as subtrees of their
//!    own, due at once), a bounded batch per transaction, and deletes the
//!    directory inode with its queue entry in the transaction that finds it
//!    empty. Every batch is committed on its own, so a crash leaves a
//!    consistent state and the next run carries on from what is left.
//! 3. A file: while [`Namespace::gc_file_ready`] is false a writer still
//!    holds a session; [`Namespace::gc_postpone`] moves the entry later.
//!    Otherwise the worker deletes the file's chunks on storage (every
//!    chain of [`GcItem::layout`], all chunks of the inode) and then calls
//!    [`Namespace::gc_finish`], which deletes the inode, its attributes and
//!    its queue entry, and re-checks for sessions in the same transaction.
//!    Deleting chunks twice is harmless, so a crash between the two steps
//!    only repeats the first.
//!
//! Nothing puts a queued inode back into the namespace: `link` and `open`
//! refuse files with no links, and a detached directory cannot gain
//! entries, so once a file is ready it stays ready.

use flyfs_proto::ids::InodeId;

use super::Namespace;
use crate::ns::NsError;
use crate::ns::layout::StoredLayout;
use crate::ns::txn::MetaTx;
use crate::schema::{
    self, GcKind, Inode, InodeData, Key, decode_gc, describe_key, gc_key, parse_key, tag,
};
use flyfs_kv::{Kv, RangeOptions, Transaction, prefix_end};

/// One entry of the GC queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcItem {
    pub ino: InodeId,
    pub kind: GcKind,
    pub due_ms: u64,
    /// A file's layout, where its chunks are (`None` for a directory, or if
    /// the inode is already gone).
    pub layout: Option<StoredLayout>,
    /// A file's recorded length. Only a hint of where chunks end: delete all
    /// of the inode's chunks on every chain of the layout.
    pub length: u64,
}

/// What one `gc_expand` call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcExpand {
    /// Entries moved onto the queue (or dropped, for symlinks and for files
    /// that still have other links).
    pub entries: usize,
    /// The directory is gone and its queue entry with it.
    pub finished: bool,
}

/// What `gc_finish` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcFinish {
    /// The inode, its attributes and its queue entry are deleted.
    Deleted,
    /// Nothing was left to delete (a repeated call).
    AlreadyGone,
    /// A write session appeared or remained: nothing was deleted.
    Busy,
}

impl<K: Kv> Namespace<K> {
    /// Up to `limit` queue entries due at or before `now_ms`, earliest first.
    pub async fn gc_due(&self, now_ms: u64, limit: usize) -> Result<Vec<GcItem>, NsError> {
        self.gc_due_from(0, now_ms, limit).await
    }

    /// Up to `limit` queue entries due from `from_ms` to `now_ms`, earliest
    /// first. The range starts at `from_ms` rather than at the queue's head:
    /// the entries a worker has finished stay in the store as deletions
    /// (tombstones) until compaction drops them, all of them ahead of every
    /// live entry, and a scan from the head walks every one of them.
    pub async fn gc_due_from(
        &self,
        from_ms: u64,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<GcItem>, NsError> {
        self.read(|tx| async move {
            // Inode bytes all zero: the first key a due time can have.
            let begin = gc_key(from_ms, InodeId(0));
            let end = match now_ms.checked_add(1) {
                Some(after) => gc_key(after, InodeId(0)),
                None => prefix_end(tag::GC).to_vec(),
            };
            let range = RangeOptions::new(begin, end)
                .limit(limit.max(1))
                .snapshot(true);
            let result = tx.tx.get_range(&range).await?;
            let mut items = Vec::with_capacity(result.kvs.len());
            for kv in &result.kvs {
                let Key::Gc { due_ms, ino } = parse_key(&kv.key)? else {
                    return Err(NsError::Corrupt {
                        key: describe_key(&kv.key),
                        reason: "not a GC key under the GC prefix".into(),
                    });
                };
                let kind = decode_gc(&kv.key, &kv.value)?;
                let inode = tx.inode(ino).await?;
                let file = inode.as_ref().and_then(Inode::file);
                items.push(GcItem {
                    ino,
                    kind,
                    due_ms,
                    layout: file.map(|f| f.layout.clone()),
                    length: file.map_or(0, |f| f.length),
                });
            }
            Ok(items)
        })
        .await
    }

    /// Expands a queued directory subtree: moves its entries onto the queue
    /// in transactions of at most `gc_batch` entries, then deletes the
    /// directory. Idempotent; after a crash, call it again. EINVAL if the
    /// inode is not a queued directory.
    pub async fn gc_expand(&self, item: &GcItem) -> Result<GcExpand, NsError> {
        let mut done = GcExpand::default();
        loop {
            let step = self.gc_expand_batch(item).await?;
            done.entries += step.entries;
            if step.finished {
                done.finished = true;
                return Ok(done);
            }
        }
    }

    /// One transaction of [`Namespace::gc_expand`]: at most `gc_batch`
    /// entries, or the final deletion. A worker that wants to interleave
    /// other work (or a test simulating a crash between batches) calls this
    /// until `finished`.
    pub async fn gc_expand_batch(&self, item: &GcItem) -> Result<GcExpand, NsError> {
        let batch = self.inner.config.gc_batch.max(1);
        let (entries, finished) = self
            .write(|tx| async move { self.expand_batch(&tx, item, batch).await })
            .await?;
        Ok(GcExpand { entries, finished })
    }

    async fn expand_batch(
        &self,
        tx: &MetaTx<K::Tx>,
        item: &GcItem,
        batch: usize,
    ) -> Result<(usize, bool), NsError> {
        let Some(dir) = tx.inode(item.ino).await? else {
            // Finished by an earlier call: the entry went with the inode.
            tx.tx.clear(&gc_key(item.due_ms, item.ino))?;
            return Ok((0, true));
        };
        let Some(due_ms) = dir.gc_due_ms.filter(|_| dir.is_dir()) else {
            return Err(NsError::Invalid(format!(
                "gc_expand of {:?}, which is not a queued directory",
                item.ino
            )));
        };
        let (entries, _) = tx.entries(dir.ino, None, batch, false).await?;
        if entries.is_empty() {
            tx.delete_inode(dir.ino)?;
            tx.tx.clear(&gc_key(due_ms, dir.ino))?;
            return Ok((0, true));
        }
        let now_ms = tx.now_ms();
        for (name, dentry) in &entries {
            tx.clear_dentry(dir.ino, name)?;
            let Some(mut child) = tx.inode(dentry.ino).await? else {
                // A dangling entry (corruption elsewhere) must not stop the
                // collection: dropping it is all there is to do.
                tracing::warn!(
                    entry = %describe_key(&schema::dentry_key(dir.ino, name)),
                    "GC dropped an entry naming a missing inode"
                );
                continue;
            };
            match &mut child.data {
                InodeData::Directory(d) => {
                    d.parent = InodeId(0);
                    child.nlink = 0;
                    child.ctime_ns = tx.now_ns;
                    tx.enqueue_gc(&mut child, now_ms, GcKind::Directory)?;
                }
                InodeData::File(_) | InodeData::Symlink(_) | InodeData::Special(_) => {
                    // Due at once: the subtree already waited out the delay.
                    let mut child = child;
                    child.nlink = child.nlink.checked_sub(1).ok_or_else(|| NsError::Corrupt {
                        key: describe_key(&schema::inode_key(dentry.ino)),
                        reason: "an entry names an inode with no links".into(),
                    })?;
                    child.ctime_ns = tx.now_ns;
                    if child.nlink > 0 {
                        tx.put_inode(&child)?;
                    } else if child.kind() == schema::InodeKind::File {
                        tx.enqueue_gc(&mut child, now_ms, GcKind::File)?;
                    } else {
                        tx.delete_inode(child.ino)?;
                    }
                }
            }
        }
        Ok((entries.len(), false))
    }

    /// Whether queued file `ino` may be collected: it has no write session
    /// left. True for an inode that no longer exists.
    pub async fn gc_file_ready(&self, ino: InodeId) -> Result<bool, NsError> {
        self.read(|tx| async move { Ok(!tx.has_sessions(ino).await?) })
            .await
    }

    /// Deletes queued file `ino` (inode, attributes, queue entry) once its
    /// chunks are gone. Re-checks for write sessions in the same transaction
    /// (Busy). EINVAL for an inode that is not a queued file: a live file
    /// must never be deleted by mistake.
    pub async fn gc_finish(&self, ino: InodeId) -> Result<GcFinish, NsError> {
        self.write(|tx| async move {
            let Some(inode) = tx.inode(ino).await? else {
                return Ok(GcFinish::AlreadyGone);
            };
            let Some(due_ms) = inode.gc_due_ms.filter(|_| inode.file().is_some()) else {
                return Err(NsError::Invalid(format!(
                    "gc_finish of {ino:?}, which is not a queued file"
                )));
            };
            if tx.has_sessions(ino).await? {
                return Ok(GcFinish::Busy);
            }
            tx.delete_inode(ino)?;
            tx.tx.clear(&gc_key(due_ms, ino))?;
            Ok(GcFinish::Deleted)
        })
        .await
    }

    /// Moves the queue entry of queued inode `ino` to `due_ms` (a file that
    /// still has writers, say). EINVAL if it is not queued.
    pub async fn gc_postpone(&self, ino: InodeId, due_ms: u64) -> Result<(), NsError> {
        self.write(|tx| async move {
            let mut inode = tx.existing(ino).await?;
            let Some(old_due) = inode.gc_due_ms else {
                return Err(NsError::Invalid(format!("{ino:?} is not queued")));
            };
            let kind = if inode.is_dir() {
                GcKind::Directory
            } else {
                GcKind::File
            };
            tx.tx.clear(&gc_key(old_due, ino))?;
            inode.gc_due_ms = None;
            tx.enqueue_gc(&mut inode, due_ms, kind)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ns::CreateFlags;
    use crate::schema::ROOT;
    use flyfs_kv::mem::MemKv;
    use flyfs_proto::wire::meta::User;
    use flyfs_time::ManualClock;

    const START_NS: i64 = 1_700_000_000_000_000_000;
    const START_MS: u64 = 1_700_000_000_000;

    async fn namespace() -> (Namespace<MemKv>, Arc<ManualClock>) {
        crate::ns::tests::namespace_on_clock(START_NS, |config| {
            config.gc_delay_ms = 1000;
            config.gc_batch = 2;
        })
        .await
    }

    async fn clean(ns: &Namespace<MemKv>) -> crate::ns::CheckReport {
        let report = ns.check().await.expect("check");
        assert!(report.is_clean(), "{report}");
        report
    }

    /// A removed tree holding a file also linked outside it, a file still
    /// open for writing and a nested directory: collected batch by batch
    /// (the store is consistent between any two batches, so a crash there
    /// loses nothing), the outside link survives, the open file waits for
    /// its writer.
    #[tokio::test]
    async fn a_removed_tree_is_collected_in_consistent_steps() {
        let (ns, clock) = namespace().await;
        let root = User::root();
        let top = ns.mkdir(&root, ROOT, b"top", 0o755).await.expect("mkdir");
        let sub = ns
            .mkdir(&root, top.ino, b"sub", 0o755)
            .await
            .expect("mkdir");
        let mut files = Vec::new();
        for name in [&b"f1"[..], b"f2", b"f3", b"f4"] {
            let created = ns
                .create(&root, sub.ino, name, 0o644, CreateFlags::default())
                .await
                .expect("create");
            files.push(created.inode.ino);
        }
        let shared = files[0];
        ns.link(&root, shared, ROOT, b"kept").await.expect("link");
        let writing = ns
            .create(
                &root,
                top.ino,
                b"open",
                0o644,
                CreateFlags {
                    write_session: Some(1),
                    ..CreateFlags::default()
                },
            )
            .await
            .expect("create");
        ns.symlink(&root, top.ino, b"link", b"sub")
            .await
            .expect("symlink");
        ns.remove_all(&root, ROOT, b"top")
            .await
            .expect("remove_all");
        assert_eq!(clean(&ns).await.queued, 1);
        // Not due before the delay.
        assert!(ns.gc_due(START_MS + 999, 10).await.expect("due").is_empty());

        clock.advance_ms(1001);
        let now_ms = START_MS + 1001;
        let mut rounds = 0;
        loop {
            let due = ns.gc_due(now_ms, 100).await.expect("due");
            let mut progress = false;
            for item in due {
                match item.kind {
                    GcKind::Directory => {
                        let step = ns.gc_expand_batch(&item).await.expect("expand");
                        assert!(step.entries <= 2);
                        progress = true;
                    }
                    GcKind::File => {
                        assert!(item.layout.is_some());
                        if ns.gc_file_ready(item.ino).await.expect("ready") {
                            assert_eq!(
                                ns.gc_finish(item.ino).await.expect("finish"),
                                GcFinish::Deleted
                            );
                            assert_eq!(
                                ns.gc_finish(item.ino).await.expect("again"),
                                GcFinish::AlreadyGone
                            );
                            progress = true;
                        } else {
                            assert_eq!(item.ino, writing.inode.ino);
                        }
                    }
                }
                // Between any two steps the namespace is consistent.
                clean(&ns).await;
            }
            rounds += 1;
            if !progress {
                break;
            }
        }
        assert!(rounds > 3, "several batches and levels: {rounds} rounds");
        let report = clean(&ns).await;
        // Left: the root, the file linked outside, the open file (queued).
        assert_eq!(
            (report.directories, report.files, report.symlinks),
            (1, 2, 0),
            "{report}"
        );
        assert_eq!(report.queued, 1);
        assert_eq!(ns.stat(shared).await.expect("kept").nlink, 1);
        for gone in &files[1..] {
            assert_eq!(
                ns.stat(*gone).await.map_err(|e| e.errno()),
                Err(libc::ENOENT)
            );
        }
        // The writer closes: now it goes.
        let session = writing.session.expect("session");
        ns.close(writing.inode.ino, session, Some(10))
            .await
            .expect("close");
        assert!(ns.gc_file_ready(writing.inode.ino).await.expect("ready"));
        assert_eq!(
            ns.gc_finish(writing.inode.ino).await.expect("finish"),
            GcFinish::Deleted
        );
        let report = clean(&ns).await;
        assert_eq!((report.files, report.queued, report.sessions), (1, 0, 0));
    }

    #[tokio::test]
    async fn the_queue_api_refuses_live_inodes() {
        let (ns, _clock) = namespace().await;
        let root = User::root();
        let dir = ns.mkdir(&root, ROOT, b"d", 0o755).await.expect("mkdir");
        let file = ns
            .create(&root, ROOT, b"f", 0o644, CreateFlags::default())
            .await
            .expect("create")
            .inode;
        let errno = |r: Result<GcFinish, NsError>| r.map_err(|e| e.errno());
        assert_eq!(errno(ns.gc_finish(file.ino).await), Err(libc::EINVAL));
        assert_eq!(errno(ns.gc_finish(dir.ino).await), Err(libc::EINVAL));
        let item = GcItem {
            ino: dir.ino,
            kind: GcKind::Directory,
            due_ms: 0,
            layout: None,
            length: 0,
        };
        assert_eq!(
            ns.gc_expand(&item).await.map_err(|e| e.errno()),
            Err(libc::EINVAL)
        );
        assert_eq!(
            ns.gc_postpone(file.ino, 5).await.map_err(|e| e.errno()),
            Err(libc::EINVAL)
        );
        clean(&ns).await;
    }

    #[tokio::test]
    async fn postponed_entries_move_in_the_queue() {
        let (ns, _clock) = namespace().await;
        let root = User::root();
        let file = ns
            .create(&root, ROOT, b"f", 0o644, CreateFlags::default())
            .await
            .expect("create")
            .inode;
        ns.unlink(&root, ROOT, b"f").await.expect("unlink");
        let due = ns.gc_due(u64::MAX, 10).await.expect("due");
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].due_ms, START_MS + 1000);
        ns.gc_postpone(file.ino, START_MS + 5000)
            .await
            .expect("postpone");
        assert!(
            ns.gc_due(START_MS + 4999, 10)
                .await
                .expect("due")
                .is_empty()
        );
        assert_eq!(
            ns.gc_due(START_MS + 5000, 10).await.expect("due")[0].ino,
            file.ino
        );
        assert_eq!(
            ns.stat(file.ino).await.expect("stat").gc_due_ms,
            Some(START_MS + 5000)
        );
        clean(&ns).await;
    }
}
