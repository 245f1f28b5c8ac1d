//! Extended attributes: set, get, list and remove, through the metadata
//! service, with the kernel's size-probe convention (a request of size 0
//! asks how big the answer is).
//!
//! `security.capability` is answered here: the kernel asks for it before
//! every write to drop it, and file capabilities are not supported.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::XattrMode;
use flyfs_rpc::Network;
use fuser::{Errno, INodeNo, ReplyEmpty, ReplyXattr, Request};

use crate::credentials::Caller;
use crate::fs::FuseFs;
use crate::request::fail;

/// File capabilities are not supported: the kernel asks for this attribute
/// before every write to a file (to drop it), and answering locally saves
/// a metadata round trip per write.
const XATTR_CAPS: &[u8] = b"security.capability";

/// The answer to an xattr request: the whole value, or its size when the
/// caller only asked how big a buffer to bring.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        match u32::try_from(value.len()) {
            Ok(len) => reply.size(len),
            Err(_) => reply.error(Errno::from_i32(libc::E2BIG)),
        }
    } else if value.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(value);
    }
}

pub(crate) fn setxattr<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    ino: INodeNo,
    name: &OsStr,
    value: &[u8],
    flags: i32,
    reply: ReplyEmpty,
) {
    let name = name.as_bytes().to_vec();
    if name == XATTR_CAPS {
        let e = fail(libc::EOPNOTSUPP, "file capabilities are not supported");
        return fs.refuse("setxattr", reply, &e);
    }
    let mode = match flags & (libc::XATTR_CREATE | libc::XATTR_REPLACE) {
        0 => XattrMode::Any,
        libc::XATTR_CREATE => XattrMode::Create,
        libc::XATTR_REPLACE => XattrMode::Replace,
        _ => {
            let e = fail(libc::EINVAL, "XATTR_CREATE and XATTR_REPLACE together");
            return fs.refuse("setxattr", reply, &e);
        }
    };
    let value = value.to_vec();
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    let change = fs.shared.dir_attrs.change_of(ino.0);
    fs.spawn(
        "setxattr",
        reply,
        async move {
            let _change = change;
            client
                .setxattr(&caller.user(), InodeId(ino.0), &name, &value, mode)
                .await
        },
        |reply, ()| reply.ok(),
    );
}

pub(crate) fn getxattr<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    ino: INodeNo,
    name: &OsStr,
    size: u32,
    reply: ReplyXattr,
) {
    let name = name.as_bytes().to_vec();
    if name == XATTR_CAPS {
        return reply.error(Errno::from_i32(libc::ENODATA));
    }
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    fs.spawn(
        "getxattr",
        reply,
        async move { client.getxattr(&caller.user(), InodeId(ino.0), &name).await },
        move |reply, value| reply_xattr(reply, size, &value),
    );
}

pub(crate) fn listxattr<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    ino: INodeNo,
    size: u32,
    reply: ReplyXattr,
) {
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    fs.spawn(
        "listxattr",
        reply,
        async move { client.listxattr(&caller.user(), InodeId(ino.0)).await },
        move |reply, names| {
            let mut list = Vec::new();
            for name in names {
                list.extend_from_slice(&name);
                list.push(0);
            }
            reply_xattr(reply, size, &list);
        },
    );
}

pub(crate) fn removexattr<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    ino: INodeNo,
    name: &OsStr,
    reply: ReplyEmpty,
) {
    let name = name.as_bytes().to_vec();
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    let change = fs.shared.dir_attrs.change_of(ino.0);
    fs.spawn(
        "removexattr",
        reply,
        async move {
            let _change = change;
            client
                .removexattr(&caller.user(), InodeId(ino.0), &name)
                .await
        },
        |reply, ()| reply.ok(),
    );
}
