//! The POSIX access rule: whether a user may read, write or search/execute
//! a file, from the file's owner, group and permission bits.
//!
//! One rule for every place that decides it: the metadata service checks it
//! on every namespace operation (fs-meta's `ns::perm` builds the sticky-bit,
//! chmod and chown rules on it), and the FUSE daemon answers `access(2)`
//! with it on mounts without `default_permissions`. It lives here, below
//! both, because the FUSE daemon must not link server code and the rule is
//! a pure function of what the wire carries anyway ([`User`], [`Attr`]).
//!
//! The rule is Linux's `generic_permission` without ACLs or capabilities:
//! the class is chosen first (owner, else group, else other) and only its
//! bits count, so an owner with mode `0o077` is refused what everyone else
//! is granted. Root passes every read and write check and every search of a
//! directory, but executing a file needs at least one `x` bit.

use crate::wire::meta::{Attr, FileType, User};

/// Read permission: the `r` bit of a class, `R_OK` in `access(2)`.
pub const MAY_READ: u32 = 4;
/// Write permission: the `w` bit, `W_OK`.
pub const MAY_WRITE: u32 = 2;
/// Search (directories) or execute (files): the `x` bit, `X_OK`.
pub const MAY_EXEC: u32 = 1;

/// What the rule looks at of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permissions {
    /// The owner.
    pub uid: u32,
    /// The owning group.
    pub gid: u32,
    /// Permission bits; setuid, setgid and sticky may be present and do not
    /// count.
    pub mode: u32,
    /// Root may search any directory, but execute only a file that someone
    /// may execute.
    pub is_dir: bool,
}

impl From<&Attr> for Permissions {
    fn from(attr: &Attr) -> Permissions {
        Permissions {
            uid: attr.uid,
            gid: attr.gid,
            mode: attr.mode,
            is_dir: attr.kind == FileType::Directory,
        }
    }
}

/// Whether `user` has every permission in `mask` (a combination of
/// [`MAY_READ`], [`MAY_WRITE`] and [`MAY_EXEC`]; an empty mask asks nothing
/// and is granted) on a file with these permissions.
pub fn allowed(file: Permissions, user: &User, mask: u32) -> bool {
    if user.is_root() {
        return mask & MAY_EXEC == 0 || file.is_dir || file.mode & 0o111 != 0;
    }
    let bits = if user.uid == file.uid {
        file.mode >> 6
    } else if user.in_group(file.gid) {
        file.mode >> 3
    } else {
        file.mode
    } & 0o7;
    bits & mask == mask
}

/// The mode a file keeps when it is written or truncated by a caller
/// without `CAP_FSETID`, or given away by chown (Linux's rule): setuid goes,
/// and setgid too when group execute is set (setgid without it marks
/// mandatory locking and stays).
pub fn kill_suid_sgid(mode: u32) -> u32 {
    let mut mode = mode & !S_ISUID;
    if mode & S_IXGRP != 0 {
        mode &= !S_ISGID;
    }
    mode
}

/// Set user ID on execution.
pub const S_ISUID: u32 = 0o4000;
/// Set group ID on execution (with group execute).
pub const S_ISGID: u32 = 0o2000;
/// Group execute.
pub const S_IXGRP: u32 = 0o010;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setuid_goes_and_setgid_only_with_group_execute() {
        assert_eq!(kill_suid_sgid(0o6755), 0o0755);
        assert_eq!(kill_suid_sgid(0o4755), 0o0755);
        assert_eq!(
            kill_suid_sgid(0o2745),
            0o2745,
            "setgid without g+x marks locking"
        );
        assert_eq!(kill_suid_sgid(0o1777), 0o1777, "sticky stays");
        assert_eq!(kill_suid_sgid(0o0644), 0o0644);
    }

    #[test]
    fn access_by_owner_group_and_others() {
        let attr = Attr {
            uid: 10,
            gid: 20,
            mode: 0o640,
            ..Attr::default()
        };
        let file = Permissions::from(&attr);
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
        assert!(allowed(file, &owner, MAY_READ | MAY_WRITE));
        assert!(!allowed(file, &owner, MAY_EXEC));
        assert!(allowed(file, &member, MAY_READ));
        assert!(!allowed(file, &member, MAY_WRITE));
        assert!(!allowed(file, &other, MAY_READ));
        // An empty mask (access(2)'s F_OK) asks only whether the file is
        // there.
        assert!(allowed(file, &other, 0));
        assert!(allowed(file, &User::root(), MAY_READ | MAY_WRITE));
        assert!(!allowed(file, &User::root(), MAY_EXEC));
    }

    #[test]
    fn root_searches_every_directory() {
        let dir = Permissions {
            uid: 5,
            gid: 5,
            mode: 0,
            is_dir: true,
        };
        assert!(allowed(dir, &User::root(), MAY_READ | MAY_WRITE | MAY_EXEC));
        assert!(!allowed(dir, &User::new(6, 6, vec![5]), MAY_EXEC));
    }
}
