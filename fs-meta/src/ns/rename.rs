//! `rename`: atomically moves an entry, replacing what the new name held.
//!
//! The hard part is moving a directory: it must never land inside its own
//! subtree, or the tree gets a cycle cut off from the root. The check walks
//! parent ids up from the destination directory to the root, reading every
//! ancestor's inode serializably. Two renames that could together form a
//! cycle (`mv a b/` and `mv b a/` at once) each read the inode the other
//! writes, so the store lets only one of them commit; the retry of the
//! other then sees the first and fails with EINVAL.

use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::User;

use super::{
    NameKind, Namespace, check_can_add, check_can_remove, check_name, searchable_dir, show,
};
use crate::ns::NsError;
use crate::ns::perm;
use crate::ns::txn::MetaTx;
use crate::schema::{Dentry, Inode, InodeData, ROOT, describe_key, inode_key};
use flyfs_kv::{Kv, Transaction};

/// Ancestors walked before a loop check gives up and calls the tree
/// corrupt: far deeper than any real tree, small enough to stay inside one
/// transaction's time limit.
pub const DEPTH_MAX: usize = 65_536;

/// Whether `dir` is `ancestor` or lies below it, walking parent ids up.
async fn is_within<T: Transaction>(
    tx: &MetaTx<T>,
    mut dir: InodeId,
    ancestor: InodeId,
) -> Result<bool, NsError> {
    for _ in 0..DEPTH_MAX {
        if dir == ancestor {
            return Ok(true);
        }
        if dir == ROOT || dir.0 == 0 {
            // The root, or a subtree detached by remove_all.
            return Ok(false);
        }
        dir = match tx.inode(dir).await? {
            Some(Inode {
                data: InodeData::Directory(d),
                ..
            }) => d.parent,
            _ => {
                return Err(NsError::Corrupt {
                    key: describe_key(&inode_key(dir)),
                    reason: "a directory's parent chain reaches a non-directory".into(),
                });
            }
        };
    }
    Err(NsError::Corrupt {
        key: describe_key(&inode_key(dir)),
        reason: format!("no root within {DEPTH_MAX} parents: a cycle"),
    })
}

impl<K: Kv> Namespace<K> {
    /// Renames entry `old_name` of `old_parent` to `new_name` of
    /// `new_parent`, replacing an existing file there (or an empty directory,
    /// when moving a directory). Checked, in this order: names (`.` and `..`:
    /// EINVAL); both parents (ENOENT / ENOTDIR / EACCES to search); the
    /// source exists (ENOENT); a directory is not moved into itself or its
    /// subtree (EINVAL); renaming onto the same inode does nothing; write
    /// permission on the old parent and its sticky bit (EACCES / EPERM);
    /// the new parent is live and writable (ENOENT / EACCES), its sticky bit
    /// for a replaced entry (EPERM), file over directory (EISDIR), directory
    /// over file (ENOTDIR); a directory moving to another parent needs write
    /// permission on itself, for its `..` (EACCES); a replaced directory must
    /// be empty (ENOTEMPTY). A replaced file whose last link this was goes
    /// to the GC queue.
    pub async fn rename(
        &self,
        user: &User,
        old_parent: InodeId,
        old_name: &[u8],
        new_parent: InodeId,
        new_name: &[u8],
    ) -> Result<(), NsError> {
        for name in [old_name, new_name] {
            if check_name(name)? != NameKind::Normal {
                return Err(NsError::Invalid(format!("rename of {}", show(name))));
            }
        }
        self.change(|tx| async move {
            let old_dir = searchable_dir(&tx, user, old_parent).await?;
            let new_dir = searchable_dir(&tx, user, new_parent).await?;
            let source_entry = tx
                .dentry(old_parent, old_name)
                .await?
                .ok_or_else(|| NsError::NotFound(show(old_name)))?;
            let mut source = tx.target(old_parent, old_name, source_entry).await?;
            let target_entry = tx.dentry(new_parent, new_name).await?;
            if source.is_dir() && is_within(&tx, new_parent, source.ino).await? {
                return Err(NsError::Invalid(format!(
                    "rename of {} into its own subtree",
                    show(old_name)
                )));
            }
            if target_entry.is_some_and(|t| t.ino == source.ino) {
                // POSIX: two links to the same file; nothing happens.
                return Ok(());
            }
            check_can_remove(&old_dir, &source, user)?;
            let target = match target_entry {
                None => {
                    check_can_add(&new_dir, user)?;
                    None
                }
                Some(entry) => {
                    let target = tx.target(new_parent, new_name, entry).await?;
                    check_can_remove(&new_dir, &target, user)?;
                    match (source.is_dir(), target.is_dir()) {
                        (true, false) => return Err(NsError::NotDir(show(new_name))),
                        (false, true) => return Err(NsError::IsDir(show(new_name))),
                        _ => {}
                    }
                    Some(target)
                }
            };
            let moves_dir = source.is_dir() && old_parent != new_parent;
            if moves_dir {
                perm::check(&source, user, perm::MAY_WRITE, "move a directory")?;
            }
            if let Some(target) = &target
                && target.is_dir()
                && !tx.is_empty_dir(target.ino).await?
            {
                return Err(NsError::NotEmpty(show(new_name)));
            }

            tx.clear_dentry(old_parent, old_name)?;
            tx.put_dentry(
                new_parent,
                new_name,
                Dentry {
                    ino: source.ino,
                    kind: source.kind(),
                },
            )?;
            if let Some(target) = target {
                if target.is_dir() {
                    tx.delete_inode(target.ino)?;
                    tx.count_subdir(new_parent, -1).await?;
                } else {
                    self.drop_link(&tx, target)?;
                }
            }
            if moves_dir {
                tx.count_subdir(old_parent, -1).await?;
                tx.count_subdir(new_parent, 1).await?;
            }
            if moves_dir && let InodeData::Directory(d) = &mut source.data {
                d.parent = new_parent;
            }
            source.ctime_ns = tx.now_ns;
            tx.put_inode(&source)?;
            Ok(())
        })
        .await
    }
}
