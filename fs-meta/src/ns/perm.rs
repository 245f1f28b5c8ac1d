//! The POSIX permission rules the namespace enforces: mode bits by owner /
//! group / other and root's bypass (the rule itself is
//! [`flyfs_proto::access`], shared with the FUSE daemon's `access(2)`),
//! and on top of it the sticky bit and who may change modes and owners.
//!
//! The rules follow Linux (fs/namei.c `generic_permission`, `may_delete`,
//! fs/attr.c `setattr_prepare`) so that a FUSE mount behaves like a local
//! file system to the programs on it. Every check is a pure function of the
//! inodes involved, so the model test can reuse nothing and still agree.

use flyfs_proto::access::{self, Permissions, S_IXGRP, kill_suid_sgid};
pub use flyfs_proto::access::{MAY_EXEC, MAY_READ, MAY_WRITE};
use flyfs_proto::wire::meta::User;

use crate::ns::NsError;
use crate::schema::{Inode, InodeKind};

pub use flyfs_proto::access::{S_ISGID, S_ISUID};
pub const S_ISVTX: u32 = 0o1000;

/// Whether `user` owns `inode`.
pub fn owns(user: &User, inode: &Inode) -> bool {
    user.uid == inode.uid
}

/// Owner or root: who may chmod, set times explicitly, and so on.
pub fn owns_or_root(user: &User, inode: &Inode) -> bool {
    user.is_root() || owns(user, inode)
}

/// What the access rule looks at of an inode.
fn permissions(inode: &Inode) -> Permissions {
    Permissions {
        uid: inode.uid,
        gid: inode.gid,
        mode: inode.mode,
        is_dir: inode.is_dir(),
    }
}

/// Whether `user` has every permission in `mask` on `inode`: the shared
/// rule ([`access::allowed`]) on the inode's owner, group and mode.
pub fn allowed(inode: &Inode, user: &User, mask: u32) -> bool {
    access::allowed(permissions(inode), user, mask)
}

/// [`allowed`], as an EACCES error.
pub fn check(inode: &Inode, user: &User, mask: u32, what: &str) -> Result<(), NsError> {
    if allowed(inode, user, mask) {
        Ok(())
    } else {
        Err(NsError::Access(format!(
            "{what}: uid {} needs {} on {:?} (mode {:#o}, {}:{})",
            user.uid,
            mask_name(mask),
            inode.ino,
            inode.mode,
            inode.uid,
            inode.gid
        )))
    }
}

fn mask_name(mask: u32) -> String {
    let mut s = String::new();
    for (bit, c) in [(MAY_READ, 'r'), (MAY_WRITE, 'w'), (MAY_EXEC, 'x')] {
        if mask & bit != 0 {
            s.push(c);
        }
    }
    s
}

/// The sticky-bit rule: in a sticky directory only root, the directory's
/// owner or the victim's owner may remove or rename the victim. EPERM.
pub fn check_sticky(dir: &Inode, victim: &Inode, user: &User) -> Result<(), NsError> {
    if dir.mode & S_ISVTX == 0 || user.is_root() || owns(user, dir) || owns(user, victim) {
        Ok(())
    } else {
        Err(NsError::NotPermitted(format!(
            "{:?} is sticky and uid {} owns neither it nor {:?}",
            dir.ino, user.uid, victim.ino
        )))
    }
}

/// The mode a chmod by `user` stores: only the owner or root may chmod
/// (EPERM); a non-root caller outside the file's group silently loses the
/// setgid bit, so nobody can make a file setgid to a group they lack.
pub fn chmod(inode: &Inode, user: &User, mode: u32) -> Result<u32, NsError> {
    if !owns_or_root(user, inode) {
        return Err(NsError::NotPermitted(format!(
            "chmod of {:?}: uid {} is not the owner {}",
            inode.ino, user.uid, inode.uid
        )));
    }
    if inode.kind() == InodeKind::Symlink {
        // Linux has no lchmod: a symlink's mode is always 0777.
        return Err(NsError::NotSupported(format!(
            "chmod of symlink {:?}",
            inode.ino
        )));
    }
    let mut mode = mode & crate::schema::MODE_MASK;
    if !user.is_root() && !user.in_group(inode.gid) {
        mode &= !S_ISGID;
    }
    Ok(mode)
}

/// Checks a chown/chgrp by `user`: only root gives a file away; the owner
/// may set the uid to itself and the gid to any group it is in (or to the
/// current gid). EPERM otherwise.
pub fn check_chown(
    inode: &Inode,
    user: &User,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), NsError> {
    if user.is_root() {
        return Ok(());
    }
    if let Some(uid) = uid
        && !(owns(user, inode) && uid == inode.uid)
    {
        return Err(NsError::NotPermitted(format!(
            "chown of {:?} to uid {uid} by uid {}",
            inode.ino, user.uid
        )));
    }
    if let Some(gid) = gid
        && !(owns(user, inode) && (user.in_group(gid) || gid == inode.gid))
    {
        return Err(NsError::NotPermitted(format!(
            "chgrp of {:?} to gid {gid} by uid {}",
            inode.ino, user.uid
        )));
    }
    Ok(())
}

/// The mode left after a chown of a non-directory: Linux drops setuid, and
/// setgid when group execute is set, on every chown (root's included since
/// 2.2.13), so that a file given away does not keep running as its old
/// owner.
pub fn mode_after_chown(inode: &Inode) -> u32 {
    if inode.is_dir() {
        return inode.mode;
    }
    kill_suid_sgid(inode.mode)
}

/// The mode left after a non-root caller truncates a file: as for a write,
/// setuid and (group-executable) setgid are dropped.
pub fn mode_after_truncate(inode: &Inode, user: &User) -> u32 {
    if user.is_root() {
        inode.mode
    } else {
        kill_suid_sgid(inode.mode)
    }
}

/// The owner and mode of a new inode created by `user` in `parent`
/// (Linux's `inode_init_owner`): the caller's uid, and its gid unless the
/// parent is setgid, in which case the parent's gid, and a new directory is
/// setgid too. A setgid, group-executable file created in a setgid directory
/// whose group the (non-root) caller is not in loses setgid.
pub fn new_owner(parent: &Inode, user: &User, mode: u32, is_dir: bool) -> (u32, u32, u32) {
    let mut mode = mode & crate::schema::MODE_MASK;
    let gid = if parent.mode & S_ISGID != 0 {
        if is_dir {
            mode |= S_ISGID;
        } else if mode & (S_ISGID | S_IXGRP) == S_ISGID | S_IXGRP
            && !user.is_root()
            && !user.in_group(parent.gid)
        {
            mode &= !S_ISGID;
        }
        parent.gid
    } else {
        user.gid
    };
    (user.uid, gid, mode)
}

#[cfg(test)]
mod tests {
    use flyfs_proto::ids::InodeId;

    use super::*;
    use crate::schema::{DirData, InodeData, ROOT};

    fn inode(mode: u32, uid: u32, gid: u32) -> Inode {
        Inode {
            ino: InodeId(4096),
            uid,
            gid,
            mode,
            nlink: 1,
            atime_ns: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            gc_due_ms: None,
            data: InodeData::Directory(DirData {
                parent: ROOT,
                default_layout: None,
            }),
        }
    }

    #[test]
    fn the_owner_class_wins_even_when_it_grants_less() {
        let alice = User::new(1000, 1000, vec![2000]);
        let dir = inode(0o077, 1000, 1000);
        assert!(!allowed(&dir, &alice, MAY_READ));
        let bob = User::new(1001, 1001, vec![]);
        assert!(allowed(&dir, &bob, MAY_READ | MAY_WRITE | MAY_EXEC));
        // Supplementary groups count.
        let shared = inode(0o070, 0, 2000);
        assert!(allowed(&shared, &alice, MAY_WRITE));
        assert!(!allowed(&shared, &bob, MAY_WRITE));
    }

    #[test]
    fn root_bypasses_all_but_execute_of_files() {
        let root = User::root();
        assert!(allowed(
            &inode(0, 5, 5),
            &root,
            MAY_READ | MAY_WRITE | MAY_EXEC
        ));
        let mut file = inode(0o600, 5, 5);
        file.data = InodeData::Symlink(crate::schema::SymlinkData {
            target: b"x".to_vec(),
        });
        assert!(!allowed(&file, &root, MAY_EXEC));
        file.mode = 0o601;
        assert!(allowed(&file, &root, MAY_EXEC));
    }

    #[test]
    fn sticky_directories_protect_other_users_entries() {
        let tmp = inode(0o1777, 0, 0);
        let alice = User::new(1000, 1000, vec![]);
        let bob = User::new(1001, 1001, vec![]);
        let alices = inode(0o644, 1000, 1000);
        assert!(check_sticky(&tmp, &alices, &alice).is_ok());
        assert_eq!(
            check_sticky(&tmp, &alices, &bob).map_err(|e| e.errno()),
            Err(libc::EPERM)
        );
        assert!(check_sticky(&tmp, &alices, &User::root()).is_ok());
    }

    #[test]
    fn chmod_and_chown_rules() {
        let alice = User::new(1000, 1000, vec![2000]);
        let bob = User::new(1001, 1001, vec![]);
        let mut file = inode(0o644, 1000, 1000);
        file.data = InodeData::File(crate::schema::FileData {
            length: 0,
            truncate_version: 0,
            layout: crate::ns::layout::StoredLayout::new(
                crate::ns::layout::LayoutSpec {
                    chain_table: flyfs_proto::ids::ChainTableId(1),
                    chunk_size: 1 << 20,
                    stripe: 1,
                },
                vec![flyfs_proto::ids::ChainId(1)],
            )
            .expect("valid"),
            inline: None,
        });
        assert_eq!(chmod(&file, &alice, 0o2755).ok(), Some(0o2755));
        assert_eq!(
            chmod(&file, &bob, 0o777).map_err(|e| e.errno()),
            Err(libc::EPERM)
        );
        file.gid = 3000; // a group alice is not in: setgid is dropped
        assert_eq!(chmod(&file, &alice, 0o2755).ok(), Some(0o755));
        assert!(check_chown(&file, &alice, Some(1000), Some(2000)).is_ok());
        assert!(check_chown(&file, &alice, None, Some(3000)).is_ok()); // unchanged gid
        assert!(check_chown(&file, &alice, Some(1001), None).is_err());
        assert!(check_chown(&file, &alice, None, Some(4000)).is_err());
        assert!(check_chown(&file, &bob, Some(1000), None).is_err());
        assert!(check_chown(&file, &User::root(), Some(7), Some(7)).is_ok());
        file.mode = 0o6755;
        assert_eq!(mode_after_chown(&file), 0o755);
        file.mode = 0o6745; // setgid without group execute stays
        assert_eq!(mode_after_chown(&file), 0o2745);
    }
}
