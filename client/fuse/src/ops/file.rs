//! Open files and their data: open and create (which hand the kernel a
//! handle number), read, write, flush on every `close(2)`, release, fsync,
//! fallocate, `SEEK_DATA`/`SEEK_HOLE`, and the ioctl refusal.
//!
//! Reads and writes go through the client's [`FileHandle`] of the open,
//! with the credentials it was opened with; nothing here looks at `/proc`
//! once a file is open.
//!
//! [`FileHandle`]: flyfs_client::fs::FileHandle

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use flyfs_client::fs::OpenMode;
use flyfs_proto::access::kill_suid_sgid;
use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::{SetAttrReq, User};
use flyfs_rpc::Network;
use fuser::{
    Errno, FopenFlags, Generation, INodeNo, OpenFlags, ReplyCreate, ReplyData, ReplyEmpty,
    ReplyLseek, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

use super::check_name;
use crate::attr::{file_attr, max_file_size};
use crate::credentials::Caller;
use crate::fs::FuseFs;
use crate::request::fail;

pub(crate) fn open<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    ino: INodeNo,
    flags: OpenFlags,
    reply: ReplyOpen,
) {
    let caller = Caller::of(req);
    let shared = fs.shared.clone();
    let client = fs.shared.client.clone();
    fs.spawn(
        "open",
        reply,
        async move {
            let (_, handle) = client
                .open(
                    &caller.user(),
                    InodeId(ino.0),
                    OpenMode::from_flags(flags.0),
                )
                .await?;
            Ok(shared.handles.add_file(handle))
        },
        // No keep_cache: close-to-open needs the kernel to drop what
        // it cached before this open.
        |reply, fh| reply.opened(fuser::FileHandle(fh), FopenFlags::empty()),
    );
}

pub(crate) fn read<N: Network>(
    fs: &FuseFs<N>,
    fh: fuser::FileHandle,
    offset: u64,
    size: u32,
    reply: ReplyData,
) {
    let handle = match fs.shared.handles.file(fh) {
        Ok(handle) => handle,
        Err(e) => return fs.refuse("read", reply, &e),
    };
    let client = fs.shared.client.clone();
    fs.spawn(
        "read",
        reply,
        async move { client.read(&handle, offset, size).await },
        |reply, data| {
            metrics::counter!("flyfs_fuse_read_bytes_total").increment(data.len() as u64);
            reply.data(&data);
        },
    );
}

pub(crate) fn write<N: Network>(
    fs: &FuseFs<N>,
    fh: fuser::FileHandle,
    offset: u64,
    data: &[u8],
    write_flags: WriteFlags,
    reply: ReplyWrite,
) {
    let handle = match fs.shared.handles.file(fh) {
        Ok(handle) => handle,
        Err(e) => return fs.refuse("write", reply, &e),
    };
    if !handle.mode().write {
        let e = fail(
            libc::EBADF,
            format!("{:?} is not open for writing", handle.ino()),
        );
        return fs.refuse("write", reply, &e);
    }
    let Ok(len) = u32::try_from(data.len()) else {
        return fs.refuse("write", reply, &fail(libc::EINVAL, "write over 4 GiB"));
    };
    // The request buffer is reused once this returns: the task needs
    // its own copy.
    let data = data.to_vec();
    let client = fs.shared.client.clone();
    // The writer lacks CAP_FSETID and the file is setuid or setgid: the
    // kernel leaves dropping those bits to us (`FUSE_HANDLE_KILLPRIV_V2`).
    let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
    fs.spawn(
        "write",
        reply,
        async move {
            if kill {
                client.kill_suid_sgid(handle.ino()).await?;
            }
            client.write_owned(&handle, offset, data).await
        },
        move |reply, ()| {
            metrics::counter!("flyfs_fuse_write_bytes_total").increment(u64::from(len));
            reply.written(len);
        },
    );
}

/// Every `close(2)`: the data reaches storage and the length the
/// metadata service, so a close that returns 0 means it is all there.
pub(crate) fn flush<N: Network>(fs: &FuseFs<N>, fh: fuser::FileHandle, reply: ReplyEmpty) {
    let handle = match fs.shared.handles.file(fh) {
        Ok(handle) => handle,
        Err(e) => return fs.refuse("flush", reply, &e),
    };
    let client = fs.shared.client.clone();
    fs.spawn(
        "flush",
        reply,
        async move { client.flush(&handle).await },
        |reply, ()| reply.ok(),
    );
}

pub(crate) fn release<N: Network>(fs: &FuseFs<N>, fh: fuser::FileHandle, reply: ReplyEmpty) {
    let handle = match fs.shared.handles.remove_file(fh) {
        Ok(handle) => handle,
        Err(e) => return fs.refuse("release", reply, &e),
    };
    let client = fs.shared.client.clone();
    fs.spawn(
        "release",
        reply,
        async move { client.release(&handle).await },
        |reply, ()| reply.ok(),
    );
}

pub(crate) fn fsync<N: Network>(fs: &FuseFs<N>, fh: fuser::FileHandle, reply: ReplyEmpty) {
    let handle = match fs.shared.handles.file(fh) {
        Ok(handle) => handle,
        Err(e) => return fs.refuse("fsync", reply, &e),
    };
    let client = fs.shared.client.clone();
    fs.spawn(
        "fsync",
        reply,
        async move { client.fsync(&handle).await },
        |reply, ()| reply.ok(),
    );
}

pub(crate) fn create<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    parent: INodeNo,
    name: &OsStr,
    mode: u32,
    flags: i32,
    reply: ReplyCreate,
) {
    let name = name.as_bytes().to_vec();
    if let Err(e) = check_name(&name) {
        return fs.refuse("create", reply, &e);
    }
    let caller = Caller::of(req);
    let shared = fs.shared.clone();
    let client = fs.shared.client.clone();
    let change = fs.shared.dir_attrs.change_of(parent.0);
    fs.spawn(
        "create",
        reply,
        async move {
            let (attr, handle, parent) = client
                .create_seeing_parent(
                    &caller.user(),
                    InodeId(parent.0),
                    &name,
                    mode & 0o7777,
                    OpenMode::from_flags(flags),
                    flags & libc::O_EXCL != 0,
                )
                .await?;
            change.end_keeping(parent);
            let fh = shared.handles.add_file(handle);
            Ok((attr, fh, shared))
        },
        |reply, (attr, fh, shared)| {
            reply.created(
                &shared.options.entry_ttl,
                &file_attr(&attr),
                Generation(0),
                fuser::FileHandle(fh),
                FopenFlags::empty(),
            );
        },
    );
}

/// Mode 0 extends the file (there is nothing to reserve: storage
/// allocates chunks as they are written, and holes read as zeros);
/// `FALLOC_FL_KEEP_SIZE` has nothing to do; other modes (punching
/// holes, zeroing or collapsing ranges) are not supported.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fallocate<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    ino: INodeNo,
    fh: fuser::FileHandle,
    offset: u64,
    length: u64,
    mode: i32,
    reply: ReplyEmpty,
) {
    if mode != 0 && mode != libc::FALLOC_FL_KEEP_SIZE {
        let e = fail(libc::EOPNOTSUPP, format!("fallocate mode {mode:#x}"));
        return fs.refuse("fallocate", reply, &e);
    }
    // Only through a descriptor open for writing (the kernel checks
    // too), and then, like ftruncate, no write permission is needed
    // now: the extension is asked for as root.
    if !fs.shared.handles.file(fh).is_ok_and(|h| h.mode().write) {
        let e = fail(libc::EBADF, "fallocate needs a file open for writing");
        return fs.refuse("fallocate", reply, &e);
    }
    let caller = Caller::of(req);
    let by_root = req.uid() == 0;
    let client = fs.shared.client.clone();
    fs.spawn(
        "fallocate",
        reply,
        async move {
            let user = caller.user();
            let attr = client.stat(&user, InodeId(ino.0)).await?;
            let end = offset
                .checked_add(length)
                .filter(|&end| end <= max_file_size(&attr))
                .ok_or_else(|| fail(libc::EFBIG, "fallocate beyond the largest file size"))?;
            // Like a write, an fallocate by a caller that is not root
            // drops setuid and setgid (left to us by `HANDLE_KILLPRIV_V2`).
            let killed = kill_suid_sgid(attr.mode);
            let kill = !by_root && killed != attr.mode;
            let grow = mode == 0 && end > attr.length;
            if kill || grow {
                client
                    .setattr(SetAttrReq {
                        user: User::root(),
                        ino: attr.ino,
                        mode: kill.then_some(killed),
                        size: grow.then_some(end),
                        ..SetAttrReq::default()
                    })
                    .await?;
            }
            Ok(())
        },
        |reply, ()| reply.ok(),
    );
}

/// No ioctls (isatty() probes land here): ENOTTY, as for any file
/// that is not a terminal.
pub(crate) fn ioctl(reply: fuser::ReplyIoctl) {
    reply.error(Errno::from_i32(libc::ENOTTY));
}

/// The kernel handles SEEK_SET, SEEK_CUR and SEEK_END itself; here are
/// SEEK_DATA and SEEK_HOLE, for files that are data throughout (holes
/// are not tracked).
pub(crate) fn lseek<N: Network>(
    fs: &FuseFs<N>,
    req: &Request,
    ino: INodeNo,
    offset: i64,
    whence: i32,
    reply: ReplyLseek,
) {
    let caller = Caller::of(req);
    let client = fs.shared.client.clone();
    fs.spawn(
        "lseek",
        reply,
        async move {
            let size = client.stat(&caller.user(), InodeId(ino.0)).await?.length;
            let size = i64::try_from(size).unwrap_or(i64::MAX);
            match whence {
                libc::SEEK_SET => Ok(offset),
                libc::SEEK_END => Ok(size.saturating_add(offset)),
                libc::SEEK_DATA | libc::SEEK_HOLE if offset < 0 || offset >= size => Err(fail(
                    libc::ENXIO,
                    format!("seek to {offset} of {size} bytes"),
                )),
                libc::SEEK_DATA => Ok(offset),
                libc::SEEK_HOLE => Ok(size),
                _ => Err(fail(libc::EINVAL, format!("lseek whence {whence}"))),
            }
        },
        |reply, offset| reply.offset(offset),
    );
}
