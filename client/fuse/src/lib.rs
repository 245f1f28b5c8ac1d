//! The FUSE daemon's file system: kernel requests in, [`FsClient`] calls
//! out.
//!
//! Every callback of [`FuseFs`] returns at once: it spawns a task on the
//! tokio runtime that awaits the client call and answers the kernel, so a
//! few FUSE threads keep many requests in flight (reads and writes of many
//! files, lookups of a whole `find`). A task that panics answers EIO for its
//! one request and is logged; the mount stays up.
//!
//! Inodes are the metadata service's inode numbers as they are (the root
//! is 1 in both), and nothing is remembered per inode: `forget` is a no-op,
//! so the daemon holds no state the kernel could leak. What it does hold:
//! open files (a [`FileHandle`] per `open`, released by `release`) and open
//! directories (the entries listed so far, so that the offsets the kernel
//! hands back stay valid while the directory changes).
//!
//! Consistency is the client's close-to-open: no kernel write-back cache
//! and no `keep_cache`, so every open drops the kernel's cached pages and
//! reads what other clients flushed before it.
//!
//! Credentials: every metadata request carries the caller's uid, gid and
//! supplementary groups (from `/proc/<pid>/status`); the metadata service
//! checks permissions itself. Reads and writes on an open handle use the
//! handle's credentials and never look at `/proc`; a truncate or fallocate
//! through a handle open for writing is asked for as root, because, as on a
//! local file system, the open already granted it.
//!
//! # Code map
//! * `fs`: [`FuseFs`], [`FuseOptions`] and the state every request shares.
//! * `ops`: the kernel's operations ([`fuser::Filesystem`]), by concern:
//!   names and attributes (`ops::namespace`), open files' data
//!   (`ops::file`), directory listings (`ops::dir`), extended attributes
//!   (`ops::xattr`).
//! * `request`: how one request is served: a task, its reply, its errno,
//!   a panic turned into EIO, its metrics, the count of those in flight.
//! * `credentials`: who is asking, from the request and `/proc`.
//! * `attr`: the service's attributes and times as the kernel wants them.
//! * `handles`: the numbers the kernel holds for open files and directories.
//! * `listing`: an open directory's entries, fetched page by page.
//! * `session`: mounting, serving and unmounting ([`mount`], [`FuseMount`]).
//! * [`mountpoint`]: what is mounted at a path, and detaching it.
//!
//! [`FileHandle`]: flyfs_client::fs::FileHandle
//! [`FsClient`]: flyfs_client::fs::FsClient
#![deny(unsafe_code)]

mod attr;
mod credentials;
mod dir_attrs;
mod fs;
mod handles;
mod iov_arena;
mod listing;
pub mod mountpoint;
pub mod native;
mod ops;
mod request;
mod session;

pub use fs::{FuseFs, FuseOptions};
pub use session::{FuseMount, Invalidator, mount};
