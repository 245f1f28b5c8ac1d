//! Directory operations: lookup, path resolution, mkdir (and `mkdir -p`),
//! rmdir, readdir, symlinks, default layouts and recursive remove.
//!
//! A directory is its inode plus a contiguous range of `DENT` keys, so a
//! listing is one range read and "is it empty" reads one key. Nothing here
//! writes the parent directory's inode when an entry is added or removed:
//! that keeps creates in one directory free of conflicts with each other.

use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::User;

use super::{
    NameKind, Namespace, check_can_add, check_can_remove, check_name, searchable_dir, show,
};
use crate::ns::perm;
use crate::ns::txn::MetaTx;
use crate::ns::{LayoutSpec, NsError};
use crate::schema::{
    Dentry, DirData, GcKind, Inode, InodeData, InodeKind, MODE_MASK, NAME_BYTES_MAX,
    PATH_BYTES_MAX, ROOT, SYMLINK_TARGET_BYTES_MAX, SpecialData, SymlinkData,
};
use flyfs_kv::{Kv, Transaction};

/// Symlinks followed by one resolution before ELOOP (Linux's MAXSYMLINKS).
pub const SYMLINKS_MAX: u32 = 40;
/// Path components one resolution walks (after symlink expansion) before
/// ELOOP: bounds the work, and the transaction's age, of a hostile path.
pub const RESOLVE_STEPS_MAX: usize = 8192;
/// Largest page `readdir` returns.
pub const READDIR_LIMIT_MAX: usize = 4096;
/// Entries a non-root `remove_all` checks in its one transaction: each is a
/// serializable read (and a sticky directory's each an inode read too), so
/// this keeps the transaction well inside the store's size and age limits.
pub const REMOVE_ALL_CHECKED_ENTRIES_MAX: usize = 10_000;

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: InodeId,
    pub kind: InodeKind,
}

/// A page of `readdir`: entries by name; `more` when the page was cut short
/// (continue from the last name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirPage {
    pub entries: Vec<DirEntry>,
    pub more: bool,
}

/// A page of `readdirplus`: entries with their inodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirPlusPage {
    pub entries: Vec<(DirEntry, Inode)>,
    pub more: bool,
}

/// A new inode created by `user` in `parent` (ownership per
/// [`perm::new_owner`]), all times `now_ns`.
pub(crate) fn new_inode(
    ino: InodeId,
    user: &User,
    parent: &Inode,
    mode: u32,
    data: InodeData,
    now_ns: i64,
) -> Inode {
    let is_dir = matches!(data, InodeData::Directory(_));
    let (uid, gid, mode) = perm::new_owner(parent, user, mode, is_dir);
    Inode {
        ino,
        uid,
        gid,
        mode,
        // A directory: its entry and its own `.`.
        nlink: if is_dir { 2 } else { 1 },
        atime_ns: now_ns,
        mtime_ns: now_ns,
        ctime_ns: now_ns,
        gc_due_ms: None,
        data,
    }
}

/// `dir`'s parent directory (`..`); the root is its own parent. A detached
/// directory has none: ENOENT.
async fn parent_of<T: Transaction>(tx: &MetaTx<T>, dir: &Inode) -> Result<Inode, NsError> {
    let parent = dir.dir().map_or(InodeId(0), |d| d.parent);
    if parent.0 == 0 {
        return Err(NsError::NotFound(format!("{:?} has been removed", dir.ino)));
    }
    tx.directory(parent).await
}

/// Pushes `path`'s components onto `stack` (popped from the end, so in
/// reverse). A trailing slash becomes a final `.`, which makes the last
/// real component be followed and required to be a directory, as POSIX
/// says of `name/`.
fn push_components(stack: &mut Vec<(Vec<u8>, bool)>, path: &[u8], from_link: bool) {
    let mut components: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    if path.ends_with(b"/") && !components.is_empty() {
        components.push(b".");
    }
    stack.extend(
        components
            .into_iter()
            .rev()
            .map(|c| (c.to_vec(), from_link)),
    );
}

fn check_path(path: &[u8]) -> Result<(), NsError> {
    if path.len() > PATH_BYTES_MAX {
        return Err(NsError::NameTooLong(format!(
            "a path of {} bytes (at most {PATH_BYTES_MAX})",
            path.len()
        )));
    }
    if path.is_empty() {
        return Err(NsError::NotFound("an empty path".into()));
    }
    if path.contains(&0) {
        return Err(NsError::Invalid("a path containing NUL".into()));
    }
    Ok(())
}

impl<K: Kv> Namespace<K> {
    /// The entry `name` of directory `parent` (`.` and `..` included).
    /// Needs search permission on `parent`.
    pub async fn lookup(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
    ) -> Result<Inode, NsError> {
        let kind = check_name(name)?;
        self.read(|tx| async move {
            let dir = searchable_dir(&tx, user, parent).await?;
            match kind {
                NameKind::Dot => Ok(dir),
                NameKind::DotDot => parent_of(&tx, &dir).await,
                NameKind::Normal => {
                    let dentry = tx
                        .dentry(parent, name)
                        .await?
                        .ok_or_else(|| NsError::NotFound(show(name)))?;
                    tx.target(parent, name, dentry).await
                }
            }
        })
        .await
    }

    /// Resolves `path` from the root (a leading `/` is optional), following
    /// symlinks in every component but the last, and the last too when
    /// `follow_last`. Needs search permission on every directory walked.
    /// ENAMETOOLONG for a path over 4096 bytes or a component over 255;
    /// ELOOP after 40 symlinks or [`RESOLVE_STEPS_MAX`] components.
    pub async fn resolve(
        &self,
        user: &User,
        path: &[u8],
        follow_last: bool,
    ) -> Result<Inode, NsError> {
        check_path(path)?;
        self.read(|tx| async move { self.walk(&tx, user, path, follow_last, None).await })
            .await
    }

    /// `mkdir -p`: resolves `path`, creating each missing directory, in one
    /// transaction. The last one gets `mode`; those on the way get `mode`
    /// plus owner write and search (as coreutils does), so that the walk can
    /// continue into them. Symlinks on the way are followed (their targets
    /// must exist). An existing directory at the end is fine; an existing
    /// non-directory is EEXIST.
    pub async fn mkdir_all(&self, user: &User, path: &[u8], mode: u32) -> Result<Inode, NsError> {
        check_path(path)?;
        self.change(|tx| async move {
            let inode = self.walk(&tx, user, path, true, Some(mode)).await?;
            if !inode.is_dir() {
                return Err(NsError::Exists(format!(
                    "{:?} is not a directory",
                    inode.ino
                )));
            }
            Ok(inode)
        })
        .await
    }

    /// Walks `path` in `tx`; with `create_mode`, missing directories named
    /// by the path itself (not by a symlink's target) are created.
    async fn walk(
        &self,
        tx: &MetaTx<K::Tx>,
        user: &User,
        path: &[u8],
        follow_last: bool,
        create_mode: Option<u32>,
    ) -> Result<Inode, NsError> {
        let mut stack = Vec::new();
        push_components(&mut stack, path, false);
        let mut current = tx.directory(ROOT).await?;
        let mut symlinks = 0;
        let mut steps = 0;
        while let Some((component, from_link)) = stack.pop() {
            steps += 1;
            if steps > RESOLVE_STEPS_MAX {
                return Err(NsError::Loop(format!(
                    "more than {RESOLVE_STEPS_MAX} path components"
                )));
            }
            if component.len() > NAME_BYTES_MAX {
                return Err(NsError::NameTooLong(format!(
                    "a component of {} bytes",
                    component.len()
                )));
            }
            if !current.is_dir() {
                return Err(NsError::NotDir(format!("{:?}", current.ino)));
            }
            perm::check(&current, user, perm::MAY_EXEC, "search")?;
            match component.as_slice() {
                b"." => continue,
                b".." => {
                    current = parent_of(tx, &current).await?;
                    continue;
                }
                _ => {}
            }
            let last = stack.is_empty();
            let child = match tx.dentry(current.ino, &component).await? {
                Some(dentry) => tx.target(current.ino, &component, dentry).await?,
                None => match create_mode {
                    Some(mode) if !from_link => {
                        check_can_add(&current, user)?;
                        // As `mkdir -p` does, directories on the way get
                        // owner write and search whatever the mode, or the
                        // walk could not go on into them.
                        let final_component = stack.iter().all(|(c, _)| c == b".");
                        let mode = if final_component { mode } else { mode | 0o300 };
                        let child = self.new_dir(tx, user, &current, mode).await?;
                        tx.put_dentry(
                            current.ino,
                            &component,
                            Dentry {
                                ino: child.ino,
                                kind: InodeKind::Directory,
                            },
                        )?;
                        tx.count_subdir(current.ino, 1).await?;
                        child
                    }
                    _ => return Err(NsError::NotFound(show(&component))),
                },
            };
            if let InodeData::Symlink(link) = &child.data
                && (!last || follow_last)
            {
                symlinks += 1;
                if symlinks > SYMLINKS_MAX {
                    return Err(NsError::Loop(format!("more than {SYMLINKS_MAX} symlinks")));
                }
                if link.target.starts_with(b"/") {
                    current = tx.directory(ROOT).await?;
                }
                push_components(&mut stack, &link.target, true);
                continue;
            }
            current = child;
        }
        Ok(current)
    }

    /// Writes a new directory inode (no entry yet) under `parent`.
    async fn new_dir(
        &self,
        tx: &MetaTx<K::Tx>,
        user: &User,
        parent: &Inode,
        mode: u32,
    ) -> Result<Inode, NsError> {
        let ino = self.allocate().await?;
        let default_layout = parent.dir().and_then(|d| d.default_layout);
        let inode = new_inode(
            ino,
            user,
            parent,
            mode,
            InodeData::Directory(DirData {
                parent: parent.ino,
                default_layout,
            }),
            tx.now_ns,
        );
        tx.put_inode(&inode)?;
        Ok(inode)
    }

    /// Creates directory `name` in `parent`, inheriting its default layout.
    pub async fn mkdir(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        mode: u32,
    ) -> Result<Inode, NsError> {
        if check_name(name)? != NameKind::Normal {
            return Err(NsError::Exists(show(name)));
        }
        self.change(|tx| async move {
            let dir = searchable_dir(&tx, user, parent).await?;
            if tx.dentry(parent, name).await?.is_some() {
                return Err(NsError::Exists(show(name)));
            }
            check_can_add(&dir, user)?;
            let inode = self.new_dir(&tx, user, &dir, mode).await?;
            tx.put_dentry(
                parent,
                name,
                Dentry {
                    ino: inode.ino,
                    kind: InodeKind::Directory,
                },
            )?;
            tx.count_subdir(parent, 1).await?;
            Ok(inode)
        })
        .await
    }

    /// Removes the empty directory `name` from `parent`.
    pub async fn rmdir(&self, user: &User, parent: InodeId, name: &[u8]) -> Result<(), NsError> {
        match check_name(name)? {
            NameKind::Normal => {}
            NameKind::Dot => return Err(NsError::Invalid("rmdir of \".\"".into())),
            NameKind::DotDot => return Err(NsError::NotEmpty("rmdir of \"..\"".into())),
        }
        self.change(|tx| async move {
            let dir = searchable_dir(&tx, user, parent).await?;
            let dentry = tx
                .dentry(parent, name)
                .await?
                .ok_or_else(|| NsError::NotFound(show(name)))?;
            let victim = tx.target(parent, name, dentry).await?;
            check_can_remove(&dir, &victim, user)?;
            if !victim.is_dir() {
                return Err(NsError::NotDir(show(name)));
            }
            if !tx.is_empty_dir(victim.ino).await? {
                return Err(NsError::NotEmpty(show(name)));
            }
            tx.clear_dentry(parent, name)?;
            tx.count_subdir(parent, -1).await?;
            tx.delete_inode(victim.ino)?;
            Ok(())
        })
        .await
    }

    /// Up to `limit` entries of `dir` (clamped to 1..=[`READDIR_LIMIT_MAX`])
    /// whose names sort after `after`, by name. Needs read permission on
    /// `dir`. `.` and `..` are not listed (the client adds them). Passing
    /// the last name returned continues the listing; entries created or
    /// removed meanwhile appear or not, but none is listed twice.
    pub async fn readdir(
        &self,
        user: &User,
        dir: InodeId,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<DirPage, NsError> {
        let limit = limit.clamp(1, READDIR_LIMIT_MAX);
        self.read(|tx| async move {
            let inode = tx.directory(dir).await?;
            perm::check(&inode, user, perm::MAY_READ, "list")?;
            let (entries, more) = tx.entries(dir, after, limit, true).await?;
            Ok(DirPage {
                entries: entries
                    .into_iter()
                    .map(|(name, d)| DirEntry {
                        name,
                        ino: d.ino,
                        kind: d.kind,
                    })
                    .collect(),
                more,
            })
        })
        .await
    }

    /// [`Namespace::readdir`] with every entry's inode, read in the same
    /// transaction (FUSE's readdirplus).
    pub async fn readdirplus(
        &self,
        user: &User,
        dir: InodeId,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<DirPlusPage, NsError> {
        let limit = limit.clamp(1, READDIR_LIMIT_MAX);
        self.read(|tx| async move {
            let inode = tx.directory(dir).await?;
            perm::check(&inode, user, perm::MAY_READ, "list")?;
            let (entries, more) = tx.entries(dir, after, limit, true).await?;
            let mut page = DirPlusPage {
                entries: Vec::with_capacity(entries.len()),
                more,
            };
            for (name, dentry) in entries {
                let inode = tx.target(dir, &name, dentry).await?;
                page.entries.push((
                    DirEntry {
                        name,
                        ino: dentry.ino,
                        kind: dentry.kind,
                    },
                    inode,
                ));
            }
            Ok(page)
        })
        .await
    }

    /// Creates symlink `name` in `parent` pointing at `target` (ENOENT when
    /// empty, ENAMETOOLONG over 4095 bytes, EINVAL with a NUL).
    pub async fn symlink(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        target: &[u8],
    ) -> Result<Inode, NsError> {
        if target.is_empty() {
            return Err(NsError::NotFound("an empty symlink target".into()));
        }
        if target.len() > SYMLINK_TARGET_BYTES_MAX {
            return Err(NsError::NameTooLong(format!(
                "a symlink target of {} bytes",
                target.len()
            )));
        }
        if target.contains(&0) {
            return Err(NsError::Invalid("a symlink target containing NUL".into()));
        }
        let data = InodeData::Symlink(SymlinkData {
            target: target.to_vec(),
        });
        self.add_leaf(user, parent, name, 0o777, data).await
    }

    /// Creates special file `name` (a FIFO, socket or device) in `parent`.
    /// Only root makes devices (EPERM, as without CAP_MKNOD).
    pub async fn mknod(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        kind: InodeKind,
        mode: u32,
        rdev: u64,
    ) -> Result<Inode, NsError> {
        if !kind.is_special() {
            return Err(NsError::Invalid(format!(
                "mknod of a {kind:?}: only FIFOs, sockets and devices"
            )));
        }
        if matches!(kind, InodeKind::CharDevice | InodeKind::BlockDevice) && user.uid != 0 {
            return Err(NsError::NotPermitted(format!(
                "only root makes devices: {}",
                show(name)
            )));
        }
        let rdev = match kind {
            InodeKind::CharDevice | InodeKind::BlockDevice => rdev,
            _ => 0,
        };
        let data = InodeData::Special(SpecialData { kind, rdev });
        self.add_leaf(user, parent, name, mode & MODE_MASK, data)
            .await
    }

    /// Adds `name` to `parent` for a new symlink or special file (`data`):
    /// what the two share. Regular files (sessions, layouts) and
    /// directories (the parent's link count) have their own.
    async fn add_leaf(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        mode: u32,
        data: InodeData,
    ) -> Result<Inode, NsError> {
        if check_name(name)? != NameKind::Normal {
            return Err(NsError::Exists(show(name)));
        }
        let data = &data;
        self.change(|tx| async move {
            let dir = searchable_dir(&tx, user, parent).await?;
            if tx.dentry(parent, name).await?.is_some() {
                return Err(NsError::Exists(show(name)));
            }
            check_can_add(&dir, user)?;
            let ino = self.allocate().await?;
            let inode = new_inode(ino, user, &dir, mode, data.clone(), tx.now_ns);
            let kind = inode.kind();
            tx.put_inode(&inode)?;
            tx.put_dentry(parent, name, Dentry { ino, kind })?;
            Ok(inode)
        })
        .await
    }

    /// A symlink's target; EINVAL for anything else.
    pub async fn readlink(&self, ino: InodeId) -> Result<Vec<u8>, NsError> {
        self.read(|tx| async move {
            match tx.existing(ino).await?.data {
                InodeData::Symlink(link) => Ok(link.target),
                _ => Err(NsError::Invalid(format!("{ino:?} is not a symlink"))),
            }
        })
        .await
    }

    /// Sets the default layout of directory `dir`, which new files and
    /// subdirectories in it inherit (existing ones keep theirs). Only the
    /// owner or root may (EPERM); the table must exist and have at least
    /// `stripe` chains (EINVAL).
    pub async fn set_layout(
        &self,
        user: &User,
        dir: InodeId,
        spec: LayoutSpec,
    ) -> Result<Inode, NsError> {
        // Choosing a layout checks everything a create would.
        self.inner
            .placement
            .choose(spec, self.inner.config.chain_tables.as_ref())?;
        self.write(|tx| async move {
            let mut inode = tx.directory(dir).await?;
            if !perm::owns_or_root(user, &inode) {
                return Err(NsError::NotPermitted(format!(
                    "set the layout of {dir:?}: uid {} is not the owner",
                    user.uid
                )));
            }
            if let InodeData::Directory(d) = &mut inode.data {
                d.default_layout = Some(spec);
            }
            inode.ctime_ns = tx.now_ns;
            tx.put_inode(&inode)?;
            Ok(inode)
        })
        .await
    }

    /// `rm -r`, in one transaction: detaches entry `name` of `parent` and,
    /// for a directory, puts the whole subtree on the GC queue as one item
    /// (the GC worker walks it later with [`Namespace::gc_expand`]). A file
    /// or symlink is simply unlinked.
    ///
    /// Needs what unlink needs on `parent`, and for a directory what `rm -r`
    /// would need to empty it entry by entry: write and search on every
    /// directory of the subtree (EACCES) and the sticky rule for every entry
    /// of a sticky one (EPERM); see [`Namespace::check_tree_removable`].
    /// Nothing is removed unless every check passes. Root passes them all,
    /// so its removal stays one small transaction whatever the tree's size.
    /// Returns the detached inode.
    pub async fn remove_all(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
    ) -> Result<Inode, NsError> {
        if check_name(name)? != NameKind::Normal {
            return Err(NsError::Invalid(format!("remove_all of {}", show(name))));
        }
        let delay_ms = self.inner.config.gc_delay_ms;
        self.change(|tx| async move {
            let dir = searchable_dir(&tx, user, parent).await?;
            let dentry = tx
                .dentry(parent, name)
                .await?
                .ok_or_else(|| NsError::NotFound(show(name)))?;
            let mut victim = tx.target(parent, name, dentry).await?;
            check_can_remove(&dir, &victim, user)?;
            if !victim.is_dir() {
                return self.unlink_entry(&tx, parent, name, victim);
            }
            if !user.is_root() {
                check_tree_removable(&tx, user, &victim).await?;
            }
            tx.clear_dentry(parent, name)?;
            tx.count_subdir(parent, -1).await?;
            victim.nlink = 0;
            victim.ctime_ns = tx.now_ns;
            if let InodeData::Directory(d) = &mut victim.data {
                d.parent = InodeId(0);
            }
            let due = tx.now_ms().saturating_add(delay_ms);
            tx.enqueue_gc(&mut victim, due, GcKind::Directory)?;
            Ok(victim)
        })
        .await
    }
}

/// Checks that `user` may remove every entry of the tree under directory
/// `top`, as `rm -r` would have to, one entry at a time: every directory of
/// the tree must be writable and searchable (EACCES), and in a sticky one the
/// user must own the directory or the entry (EPERM). Directories are visited
/// breadth first, each one's entries in name order, and the first failure is
/// the answer, so the errno is deterministic (the model test relies on it).
///
/// The reads are serializable: a chmod or a new entry anywhere in the tree
/// that commits meanwhile makes the removal retry and check again. A tree of
/// more than [`REMOVE_ALL_CHECKED_ENTRIES_MAX`] entries is refused with
/// ENOTEMPTY rather than read into one transaction that would outgrow the
/// store's limits; a non-root user removes such a tree in parts.
async fn check_tree_removable<T: Transaction>(
    tx: &MetaTx<T>,
    user: &User,
    top: &Inode,
) -> Result<(), NsError> {
    let mut pending = std::collections::VecDeque::from([top.clone()]);
    let mut checked = 0usize;
    while let Some(dir) = pending.pop_front() {
        perm::check(
            &dir,
            user,
            perm::MAY_WRITE | perm::MAY_EXEC,
            "remove_all: remove an entry",
        )?;
        let sticky = dir.mode & perm::S_ISVTX != 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (entries, more) = tx
                .entries(dir.ino, after.as_deref(), READDIR_LIMIT_MAX, false)
                .await?;
            for (name, dentry) in &entries {
                checked += 1;
                if checked > REMOVE_ALL_CHECKED_ENTRIES_MAX {
                    return Err(NsError::NotEmpty(format!(
                        "remove_all by uid {} of a tree of more than \
                         {REMOVE_ALL_CHECKED_ENTRIES_MAX} entries, each of which must be \
                         checked in one transaction: remove its subdirectories first",
                        user.uid
                    )));
                }
                let is_dir = dentry.kind == InodeKind::Directory;
                if !is_dir && !sticky {
                    continue;
                }
                let child = tx.target(dir.ino, name, *dentry).await?;
                perm::check_sticky(&dir, &child, user)?;
                if is_dir {
                    pending.push_back(child);
                }
            }
            match entries.last() {
                Some((name, _)) if more => after = Some(name.clone()),
                _ => break,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ns::tests::namespace;
    use crate::ns::{CreateFlags, SetAttr};

    /// Special files: a device needs root, a FIFO does not; they keep
    /// their kind and device number, cannot be opened here, and unlinking
    /// the last name deletes them at once (they have no data).
    #[tokio::test]
    async fn special_files_are_made_listed_and_removed() {
        let ns = namespace().await;
        let root = User::root();
        let user = User::new(1000, 1000, vec![]);
        let tmp = ns.mkdir(&root, ROOT, b"tmp", 0o1777).await.expect("mkdir");
        let e = ns
            .mknod(&user, tmp.ino, b"dev", InodeKind::CharDevice, 0o600, 0x0103)
            .await
            .expect_err("a device by a non-root user");
        assert_eq!(e.errno(), libc::EPERM);
        let dev = ns
            .mknod(
                &root,
                tmp.ino,
                b"dev",
                InodeKind::BlockDevice,
                0o600,
                0x0801,
            )
            .await
            .expect("device");
        assert_eq!((dev.kind(), dev.rdev()), (InodeKind::BlockDevice, 0x0801));
        assert_eq!(dev.st_mode(), libc::S_IFBLK | 0o600);
        let fifo = ns
            .mknod(&user, tmp.ino, b"fifo", InodeKind::Fifo, 0o644, 99)
            .await
            .expect("fifo");
        assert_eq!((fifo.uid, fifo.rdev()), (1000, 0), "a FIFO has no device");
        let e = ns
            .mknod(&user, tmp.ino, b"fifo", InodeKind::Socket, 0o644, 0)
            .await
            .expect_err("existing name");
        assert_eq!(e.errno(), libc::EEXIST);
        let e = ns
            .mknod(&root, tmp.ino, b"f", InodeKind::File, 0o644, 0)
            .await
            .expect_err("a regular file through mknod");
        assert_eq!(e.errno(), libc::EINVAL);
        let e = ns
            .open_file(&root, fifo.ino, crate::ns::OpenFlags::default())
            .await
            .expect_err("open");
        assert_eq!(e.errno(), libc::ENXIO);
        let page = ns.readdir(&root, tmp.ino, None, 10).await.expect("readdir");
        let kinds: Vec<_> = page.entries.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![InodeKind::BlockDevice, InodeKind::Fifo]);
        ns.unlink(&user, tmp.ino, b"fifo").await.expect("unlink");
        ns.unlink(&root, tmp.ino, b"dev").await.expect("unlink");
        assert_eq!(
            ns.stat(fifo.ino).await.expect_err("gone").errno(),
            libc::ENOENT
        );
        let report = ns.check().await.expect("check");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }

    /// Paging with the last name as cursor, while entries are added and
    /// removed between pages: names come in order, none twice, and every
    /// name present throughout is listed.
    #[tokio::test]
    async fn readdir_pages_are_stable_under_concurrent_changes() {
        let ns = namespace().await;
        let root = User::root();
        for i in (0..20).step_by(2) {
            let name = format!("n{i:02}");
            ns.create(&root, ROOT, name.as_bytes(), 0o644, CreateFlags::default())
                .await
                .expect("create");
        }
        let mut listed: Vec<Vec<u8>> = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        let mut page_number = 0;
        loop {
            let page = ns
                .readdir(&root, ROOT, after.as_deref(), 3)
                .await
                .expect("readdir");
            assert!(page.entries.len() <= 3);
            listed.extend(page.entries.iter().map(|e| e.name.clone()));
            // Between pages: add odd names on both sides of the cursor and
            // remove one entry ahead.
            let odd = format!("n{:02}", page_number * 4 + 1);
            let _ = ns
                .create(&root, ROOT, odd.as_bytes(), 0o644, CreateFlags::default())
                .await;
            if page_number == 1 {
                ns.unlink(&root, ROOT, b"n18").await.expect("unlink");
            }
            page_number += 1;
            match page.entries.last() {
                Some(last) if page.more => after = Some(last.name.clone()),
                _ => break,
            }
        }
        let mut sorted = listed.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(listed, sorted, "in order, none twice");
        for i in (0..18).step_by(2) {
            let name = format!("n{i:02}").into_bytes();
            assert!(
                listed.contains(&name),
                "{:?} missing",
                String::from_utf8_lossy(&name)
            );
        }
        assert!(!listed.contains(&b"n18".to_vec()));
        // Read permission is needed, and only on directories.
        let alice = User::new(1000, 1000, vec![]);
        let private = ns
            .mkdir(&root, ROOT, b"private", 0o711)
            .await
            .expect("mkdir");
        let denied = ns.readdir(&alice, private.ino, None, 10).await;
        assert_eq!(denied.map_err(|e| e.errno()), Err(libc::EACCES));
        let file = ns.lookup(&root, ROOT, b"n00").await.expect("lookup");
        let not_dir = ns.readdir(&root, file.ino, None, 10).await;
        assert_eq!(not_dir.map_err(|e| e.errno()), Err(libc::ENOTDIR));
        // readdirplus carries the same entries with their inodes.
        let plus = ns.readdirplus(&root, ROOT, None, 100).await.expect("plus");
        for (entry, inode) in &plus.entries {
            assert_eq!((entry.ino, entry.kind), (inode.ino, inode.kind()));
        }
    }

    /// `remove_all` checks every directory it empties, as `rm -r` would:
    /// a user cannot remove a tree holding another user's directory it may
    /// not write, nor another user's entry in a sticky directory, and such a
    /// refusal removes nothing; where POSIX allows every removal, a user
    /// may remove a tree holding others' entries; root removes anything.
    #[tokio::test]
    async fn remove_all_checks_every_directory_it_empties() {
        let ns = namespace().await;
        let root = User::root();
        let alice = User::new(1000, 1000, vec![]);
        let bob = User::new(1001, 1001, vec![]);
        let home = ns.mkdir(&root, ROOT, b"home", 0o777).await.expect("mkdir");
        let top = ns
            .mkdir(&alice, home.ino, b"top", 0o755)
            .await
            .expect("top");
        ns.mkdir(&alice, top.ino, b"mine", 0o755)
            .await
            .expect("mine");
        // Alice lets bob in, and bob makes a directory she may not write.
        ns.setattr(
            &alice,
            top.ino,
            SetAttr {
                mode: Some(0o777),
                ..SetAttr::default()
            },
        )
        .await
        .expect("chmod");
        let theirs = ns
            .mkdir(&bob, top.ino, b"theirs", 0o755)
            .await
            .expect("theirs");
        ns.create(&bob, theirs.ino, b"f", 0o644, CreateFlags::default())
            .await
            .expect("bob's file");
        let before = ns.check().await.expect("check");
        assert!(before.is_clean(), "{before}");

        let e = ns
            .remove_all(&alice, home.ino, b"top")
            .await
            .expect_err("bob's protected directory inside");
        assert_eq!(e.errno(), libc::EACCES, "{e}");
        assert!(e.to_string().contains(&format!("{:?}", theirs.ino)), "{e}");
        // Nothing was removed.
        assert_eq!(ns.check().await.expect("check"), before);
        ns.lookup(&alice, theirs.ino, b"f")
            .await
            .expect("still there");

        // A sticky directory: only the owner of the entry or the directory.
        let sticky = ns
            .mkdir(&alice, home.ino, b"sticky", 0o1777)
            .await
            .expect("sticky");
        let shared = ns
            .mkdir(&root, sticky.ino, b"shared", 0o1777)
            .await
            .expect("shared");
        ns.create(&bob, shared.ino, b"g", 0o666, CreateFlags::default())
            .await
            .expect("bob's file");
        // Alice owns `sticky` (so may remove `shared` from it) but neither
        // `shared` nor bob's file in it.
        let e = ns
            .remove_all(&alice, home.ino, b"sticky")
            .await
            .expect_err("bob's entry in a sticky directory");
        assert_eq!(e.errno(), libc::EPERM, "{e}");
        ns.lookup(&alice, shared.ino, b"g")
            .await
            .expect("still there");

        // Where every removal is allowed, another user's entries go too.
        let open = ns
            .mkdir(&alice, home.ino, b"open", 0o777)
            .await
            .expect("open");
        let bobs = ns
            .mkdir(&bob, open.ino, b"bobs", 0o777)
            .await
            .expect("bobs");
        ns.create(&bob, bobs.ino, b"h", 0o600, CreateFlags::default())
            .await
            .expect("bob's file");
        ns.remove_all(&alice, home.ino, b"open")
            .await
            .expect("every directory is writable");

        // Root removes what alice could not.
        ns.remove_all(&root, home.ino, b"top").await.expect("root");
        ns.remove_all(&root, home.ino, b"sticky")
            .await
            .expect("root");
        for name in [&b"top"[..], b"sticky", b"open"] {
            assert_eq!(
                ns.lookup(&root, home.ino, name)
                    .await
                    .map_err(|e| e.errno())
                    .err(),
                Some(libc::ENOENT)
            );
        }
        let after = ns.check().await.expect("check");
        assert!(after.is_clean(), "{after}");
        assert_eq!(after.queued, 3, "{after}");
    }
}
