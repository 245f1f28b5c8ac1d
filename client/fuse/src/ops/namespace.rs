//! Names and attributes: looking names up, `stat` and `setattr`, creating
//! and removing names (mknod, mkdir, unlink, rmdir, symlink, link),
//! `rename`, `readlink`, `statfs`, and `access(2)` for mounts without
//! `default_permissions`.
//!
//! Each asks the metadata service with the caller's credentials; the
//! service checks permissions. Names longer than `NAME_MAX` are refused
//! here, before any request goes out.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use flyfs_client::fs::OpenMode;
use flyfs_proto::access::{self, MAY_EXEC, MAY_READ, MAY_WRITE, Permissions, kill_suid_sgid};
use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::{Attr, FileType, SetAttrReq, User};
use flyfs_rpc::Network;
use fuser::{
    AccessFlags, Generation, INodeNo, RenameFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyStatfs, Request, TimeOrNow,
};

use super::{NAME_MAX, check_name};
use crate::attr::{file_attr, no_entry, set_time};
use crate::credentials::Caller;
use crate::fs::{FuseFs, Shared};
use crate::request::fail;

/// Answers a request that names an inode (lookup and the creations), with
/// how long the kernel may cache its attributes and its name.
fn reply_entry<N: Network>(shared: &Shared<N>, reply: ReplyEntry, attr: &Attr) {
    reply.entry_with_ttls(
        &shared.options.attr_ttl,
        &shared.options.entry_ttl,
        &file_attr(attr),
        Generation(0),
    );
}

/// An `access(2)` mask in the shared rule's terms: the bits are the same
/// (checked below), and anything else the kernel might set is not a
/// permission.
fn access_mask(mask: AccessFlags) -> u32 {
    (mask & (AccessFlags::R_OK | AccessFlags::W_OK | AccessFlags::X_OK)).bits() as u32
}

const _: () = assert!(
    libc::R_OK as u32 == MAY_READ
        && libc::W_OK as u32 == MAY_WRITE
        && libc::X_OK as u32 == MAY_EXEC
);

pub(crate) fn lookup<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    parent: INodeNo,
    name: &OsStr,
    reply: ReplyEntry,
) {
    let name = name.as_bytes().to_vec();
    if let Err(e) = check_name(&name) {
        return fs.refuse("lookup", reply, &e);
    }
    let caller = Caller::of(req);
    let shared = fs.shared.clone();
    let client = fs.shared.client.clone();
    let negative_ttl = fs.shared.options.negative_ttl;
    fs.spawn(
        "lookup",
        reply,
        async move {
            match client
                .lookup(&caller.user(), InodeId(parent.0), &name)
                .await
            {
                // A name that does not exist, which the kernel may
                // remember for the negative TTL: tools `lstat` every path
                // before they write it (git checks out a tree so), and a
                // create here replaces the negative entry at once.
                Err(e) if e.errno == libc::ENOENT && !negative_ttl.is_zero() => Ok(None),
                found => found.map(Some),
            }
        },
        move |reply, attr| match attr {
            Some(attr) => reply_entry(&shared, reply, &attr),
            None => {
                reply.entry_with_ttls(&Duration::ZERO, &negative_ttl, &no_entry(), Generation(0))
            }
        },
    );
}

pub(crate) fn getattr<N: Network>(fs: &FuseFs<N>, req: &Request, ino: INodeNo, reply: ReplyAttr) {
    let ttl = fs.shared.options.attr_ttl;
    // The kernel's stat of the directory the last create went into, which
    // it makes before the next name it looks up there (`dir_attrs`).
    if let Some((attr, left)) = fs.shared.dir_attrs.get(ino.0, ttl) {
        metrics::counter!("flyfs_fuse_requests_total", "op" => "getattr").increment(1);
        metrics::counter!("flyfs_fuse_dir_attrs_kept_total").increment(1);
        return reply.attr(&left, &file_attr(&attr));
    }
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    fs.spawn(
        "getattr",
        reply,
        async move { client.stat(&caller.user(), InodeId(ino.0)).await },
        move |reply, attr| reply.attr(&ttl, &file_attr(&attr)),
    );
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn setattr<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    ino: INodeNo,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    fh: Option<fuser::FileHandle>,
    reply: ReplyAttr,
) {
    // The client finds a file's buffered data by inode: a truncate
    // through a handle (ftruncate) needs the handle only for its
    // permission (below).
    let through_writer = uid.is_none()
        && gid.is_none()
        && size.is_some()
        && fh.is_some_and(|fh| fs.shared.handles.file(fh).is_ok_and(|h| h.mode().write));
    let caller = Caller::of(req);
    let by_root = req.uid() == 0;
    let client = fs.shared.client.clone();
    let ttl = fs.shared.options.attr_ttl;
    let change = fs.shared.dir_attrs.change_of(ino.0);
    fs.spawn(
        "setattr",
        reply,
        async move {
            let _change = change;
            let attr = client
                .setattr(SetAttrReq {
                    user: if through_writer {
                        // ftruncate(2) on a descriptor open for writing
                        // needs no write permission now (the open
                        // checked it): the metadata service, which
                        // checks the caller's, hears it from root. The
                        // kernel sends a handle only for that, and any
                        // mode with it only drops setuid/setgid bits.
                        User::root()
                    } else {
                        caller.user()
                    },
                    ino: InodeId(ino.0),
                    // The kernel sends the type bits too.
                    mode: mode.map(|m| m & 0o7777),
                    uid,
                    gid,
                    size,
                    atime: atime.map(set_time),
                    mtime: mtime.map(set_time),
                })
                .await?;
            // A truncate by a caller that is not root drops setuid and
            // setgid (under `HANDLE_KILLPRIV_V2` the kernel leaves that to
            // us), which the service, hearing root, did not do.
            let killed = kill_suid_sgid(attr.mode);
            if through_writer && !by_root && killed != attr.mode {
                return client
                    .setattr(SetAttrReq {
                        user: User::root(),
                        ino: InodeId(ino.0),
                        mode: Some(killed),
                        ..SetAttrReq::default()
                    })
                    .await;
            }
            Ok(attr)
        },
        move |reply, attr| reply.attr(&ttl, &file_attr(&attr)),
    );
}

pub(crate) fn readlink<N: Network>(fs: &FuseFs<N>, req: &Request, ino: INodeNo, reply: ReplyData) {
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    fs.spawn(
        "readlink",
        reply,
        async move { client.readlink(&caller.user(), InodeId(ino.0)).await },
        |reply, target| reply.data(&target),
    );
}

/// Regular files are created (and closed) like `creat(2)`; FIFOs,
/// sockets and device nodes are inodes of the metadata service (the
/// kernel serves their I/O itself; the mount is `nodev`).
pub(crate) fn mknod<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    parent: INodeNo,
    name: &OsStr,
    mode: u32,
    rdev: u32,
    reply: ReplyEntry,
) {
    let name = name.as_bytes().to_vec();
    if let Err(e) = check_name(&name) {
        return fs.refuse("mknod", reply, &e);
    }
    let special = match mode & libc::S_IFMT {
        0 | libc::S_IFREG => None,
        libc::S_IFIFO => Some(FileType::Fifo),
        libc::S_IFSOCK => Some(FileType::Socket),
        libc::S_IFCHR => Some(FileType::CharDevice),
        libc::S_IFBLK => Some(FileType::BlockDevice),
        kind => {
            let e = fail(libc::EINVAL, format!("mknod of type {kind:#o}"));
            return fs.refuse("mknod", reply, &e);
        }
    };
    let caller = Caller::of(req);
    let shared = fs.shared.clone();
    let client = fs.shared.client.clone();
    let change = fs.shared.dir_attrs.change_of(parent.0);
    fs.spawn(
        "mknod",
        reply,
        async move {
            let _change = change;
            let user = caller.user();
            if let Some(kind) = special {
                // The kernel's device encoding (new_encode_dev), kept
                // as is and handed back in `stat`.
                let rdev = u64::from(rdev);
                return client
                    .mknod(&user, InodeId(parent.0), &name, kind, mode & 0o7777, rdev)
                    .await;
            }
            let (attr, handle) = client
                .create(
                    &user,
                    InodeId(parent.0),
                    &name,
                    mode & 0o7777,
                    OpenMode::default(),
                    true,
                )
                .await?;
            client.release(&handle).await?;
            Ok(attr)
        },
        move |reply, attr| reply_entry(&shared, reply, &attr),
    );
}

pub(crate) fn mkdir<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    parent: INodeNo,
    name: &OsStr,
    mode: u32,
    reply: ReplyEntry,
) {
    let name = name.as_bytes().to_vec();
    if let Err(e) = check_name(&name) {
        return fs.refuse("mkdir", reply, &e);
    }
    let caller = Caller::of(req);
    let shared = fs.shared.clone();
    let client = fs.shared.client.clone();
    let change = fs.shared.dir_attrs.change_of(parent.0);
    fs.spawn(
        "mkdir",
        reply,
        async move {
            let _change = change;
            client
                .mkdir(&caller.user(), InodeId(parent.0), &name, mode & 0o7777)
                .await
        },
        move |reply, attr| reply_entry(&shared, reply, &attr),
    );
}

pub(crate) fn unlink<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    parent: INodeNo,
    name: &OsStr,
    reply: ReplyEmpty,
) {
    let name = name.as_bytes().to_vec();
    if let Err(e) = check_name(&name) {
        return fs.refuse("unlink", reply, &e);
    }
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    let change = fs.shared.dir_attrs.change_of(parent.0);
    fs.spawn(
        "unlink",
        reply,
        async move {
            let _change = change;
            client
                .unlink(&caller.user(), InodeId(parent.0), &name)
                .await
        },
        |reply, ()| reply.ok(),
    );
}

pub(crate) fn rmdir<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    parent: INodeNo,
    name: &OsStr,
    reply: ReplyEmpty,
) {
    let name = name.as_bytes().to_vec();
    if let Err(e) = check_name(&name) {
        return fs.refuse("rmdir", reply, &e);
    }
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    let change = fs.shared.dir_attrs.change_everywhere();
    fs.spawn(
        "rmdir",
        reply,
        async move {
            let _change = change;
            client.rmdir(&caller.user(), InodeId(parent.0), &name).await
        },
        |reply, ()| reply.ok(),
    );
}

pub(crate) fn symlink<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    parent: INodeNo,
    link_name: &OsStr,
    target: &Path,
    reply: ReplyEntry,
) {
    let name = link_name.as_bytes().to_vec();
    if let Err(e) = check_name(&name) {
        return fs.refuse("symlink", reply, &e);
    }
    let target = target.as_os_str().as_bytes().to_vec();
    let caller = Caller::of(req);
    let shared = fs.shared.clone();
    let client = fs.shared.client.clone();
    let change = fs.shared.dir_attrs.change_of(parent.0);
    fs.spawn(
        "symlink",
        reply,
        async move {
            let _change = change;
            client
                .symlink(&caller.user(), InodeId(parent.0), &name, &target)
                .await
        },
        move |reply, attr| reply_entry(&shared, reply, &attr),
    );
}

/// Plain renames only: RENAME_NOREPLACE would need the check and the
/// rename in one metadata transaction (a lookup first races with other
/// clients), and RENAME_EXCHANGE is not supported either; both are
/// EINVAL, after which `mv` falls back to a plain rename.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rename<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    parent: INodeNo,
    name: &OsStr,
    newparent: INodeNo,
    newname: &OsStr,
    flags: RenameFlags,
    reply: ReplyEmpty,
) {
    let name = name.as_bytes().to_vec();
    let newname = newname.as_bytes().to_vec();
    if let Err(e) = check_name(&name).and_then(|()| check_name(&newname)) {
        return fs.refuse("rename", reply, &e);
    }
    if !flags.is_empty() {
        let e = fail(
            libc::EINVAL,
            format!("rename flags {flags:?} not supported"),
        );
        return fs.refuse("rename", reply, &e);
    }
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    let change = fs.shared.dir_attrs.change_everywhere();
    fs.spawn(
        "rename",
        reply,
        async move {
            let _change = change;
            client
                .rename(
                    &caller.user(),
                    InodeId(parent.0),
                    &name,
                    InodeId(newparent.0),
                    &newname,
                )
                .await
        },
        |reply, ()| reply.ok(),
    );
}

pub(crate) fn link<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    ino: INodeNo,
    newparent: INodeNo,
    newname: &OsStr,
    reply: ReplyEntry,
) {
    let name = newname.as_bytes().to_vec();
    if let Err(e) = check_name(&name) {
        return fs.refuse("link", reply, &e);
    }
    let caller = Caller::of(req);
    let shared = fs.shared.clone();
    let client = fs.shared.client.clone();
    let change = fs.shared.dir_attrs.change_of(newparent.0);
    fs.spawn(
        "link",
        reply,
        async move {
            let _change = change;
            client
                .link(&caller.user(), InodeId(ino.0), InodeId(newparent.0), &name)
                .await
        },
        move |reply, attr| reply_entry(&shared, reply, &attr),
    );
}

pub(crate) fn statfs<N: Network>(fs: &FuseFs<N>, req: &Request, reply: ReplyStatfs) {
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    fs.spawn(
        "statfs",
        reply,
        async move { client.statfs(&caller.user()).await },
        |reply, rsp| {
            const BSIZE: u64 = 4096;
            // Inodes are not a limited resource here.
            const FILES: u64 = 1 << 40;
            let free = rsp.bytes_free / BSIZE;
            reply.statfs(
                rsp.bytes_total / BSIZE,
                free,
                free,
                FILES,
                FILES,
                BSIZE as u32,
                NAME_MAX as u32,
                BSIZE as u32,
            );
        },
    );
}

/// Only called without `default_permissions` (the kernel checks
/// otherwise).
pub(crate) fn access<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    ino: INodeNo,
    mask: AccessFlags,
    reply: ReplyEmpty,
) {
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    fs.spawn(
        "access",
        reply,
        async move {
            let user = caller.user();
            let attr = client.stat(&user, InodeId(ino.0)).await?;
            if access::allowed(Permissions::from(&attr), &user, access_mask(mask)) {
                Ok(())
            } else {
                Err(fail(
                    libc::EACCES,
                    format!("access {mask:?} to {:?}", attr.ino),
                ))
            }
        },
        |reply, ()| reply.ok(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_masks_keep_only_permission_bits() {
        assert_eq!(access_mask(AccessFlags::F_OK), 0);
        assert_eq!(
            access_mask(AccessFlags::R_OK | AccessFlags::X_OK),
            MAY_READ | MAY_EXEC
        );
        assert_eq!(access_mask(AccessFlags::W_OK), MAY_WRITE);
        assert_eq!(
            access_mask(AccessFlags::from_bits_retain(0o10 | libc::W_OK)),
            MAY_WRITE
        );
    }
}
