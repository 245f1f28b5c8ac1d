//! Open directories: `opendir` starts a [`Listing`], `readdir` and
//! `readdirplus` answer from it at the kernel's offsets (fetching pages as
//! they are reached), `releasedir` drops it.
//!
//! A listing is fetched with the opener's credentials: permission to list
//! is checked once, at open, as on a local file system.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use flyfs_client::FsError;
use flyfs_proto::ids::InodeId;
use flyfs_rpc::Network;
use fuser::{
    Errno, FopenFlags, Generation, INodeNo, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyOpen, Request,
};

use crate::attr::{file_attr, kind_of};
use crate::credentials::Caller;
use crate::fs::FuseFs;
use crate::listing::{DirHandle, Listing};

pub(crate) fn opendir<N: Network>(fs: &FuseFs<N>, req: &Request, ino: INodeNo, reply: ReplyOpen) {
    let caller = Caller::of(req);
    let shared = fs.shared.clone();
    fs.spawn(
        "opendir",
        reply,
        async move {
            let dir = Arc::new(DirHandle {
                ino: InodeId(ino.0),
                user: caller.user(),
                listing: tokio::sync::Mutex::new(Listing::default()),
            });
            Ok(shared.handles.add_dir(dir))
        },
        |reply, fh| reply.opened(fuser::FileHandle(fh), FopenFlags::empty()),
    );
}

pub(crate) fn readdir<N: Network>(
    fs: &FuseFs<N>,
    fh: fuser::FileHandle,
    offset: u64,
    mut reply: ReplyDirectory,
) {
    let dir = match fs.shared.handles.dir(fh) {
        Ok(dir) => dir,
        Err(e) => return fs.refuse("readdir", reply, &e),
    };
    let client = fs.shared.client.clone();
    fs.spawn(
        "readdir",
        (),
        async move {
            let mut listing = dir.listing.lock().await;
            let result: Result<(), FsError> = async {
                if offset == 0 || !listing.started {
                    listing.start(&client, &dir, false).await?;
                }
                let mut index = offset as usize;
                while listing.reach(&client, &dir, index, false).await? {
                    let item = &listing.entries[index];
                    let full = reply.add(
                        INodeNo(item.ino.0),
                        index as u64 + 1,
                        kind_of(item.kind),
                        OsStr::from_bytes(&item.name),
                    );
                    if full {
                        break;
                    }
                    index += 1;
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => reply.ok(),
                Err(e) => {
                    let errno = e.errno;
                    reply.error(Errno::from_i32(errno));
                    return Err(e);
                }
            }
            Ok(())
        },
        |(), ()| {},
    );
}

pub(crate) fn readdirplus<N: Network>(
    fs: &FuseFs<N>,
    fh: fuser::FileHandle,
    offset: u64,
    mut reply: ReplyDirectoryPlus,
) {
    let dir = match fs.shared.handles.dir(fh) {
        Ok(dir) => dir,
        Err(e) => return fs.refuse("readdirplus", reply, &e),
    };
    let client = fs.shared.client.clone();
    let ttl = fs.shared.options.entry_ttl;
    fs.spawn(
        "readdirplus",
        (),
        async move {
            let mut listing = dir.listing.lock().await;
            let result: Result<(), FsError> = async {
                if offset == 0 || !listing.started {
                    listing.start(&client, &dir, true).await?;
                }
                let mut index = offset as usize;
                while listing.reach(&client, &dir, index, true).await? {
                    if listing.entries[index].attr.is_none() && !listing.entries[index].gone {
                        listing.fill_attrs(&client, &dir.user, index).await;
                    }
                    let item = &listing.entries[index];
                    if let (Some(attr), false) = (&item.attr, item.gone) {
                        let full = reply.add(
                            INodeNo(item.ino.0),
                            index as u64 + 1,
                            OsStr::from_bytes(&item.name),
                            &ttl,
                            &file_attr(attr),
                            Generation(0),
                        );
                        if full {
                            break;
                        }
                    }
                    index += 1;
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => reply.ok(),
                Err(e) => {
                    reply.error(Errno::from_i32(e.errno));
                    return Err(e);
                }
            }
            Ok(())
        },
        |(), ()| {},
    );
}

pub(crate) fn releasedir<N: Network>(fs: &FuseFs<N>, fh: fuser::FileHandle, reply: ReplyEmpty) {
    fs.shared.handles.remove_dir(fh);
    reply.ok();
}

/// Directory changes are answered once applied and durable soon after:
/// this waits until every change answered so far is.
pub(crate) fn fsyncdir<N: Network>(fs: &FuseFs<N>, reply: ReplyEmpty) {
    let client = fs.shared.client.clone();
    fs.spawn(
        "fsyncdir",
        reply,
        async move { client.sync_namespace().await },
        |reply, ()| reply.ok(),
    );
}
