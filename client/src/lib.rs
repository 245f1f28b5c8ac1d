//! The file client: what a trainer touches.
//!
//! * [`fs`]: [`FsClient`], the file client library. Namespace operations go
//!   to the metadata service; file data goes straight to the storage chains
//!   named by the file's layout, many chunk I/Os in flight, with a bounded
//!   write-back buffer and read-ahead per file (`file.rs`).
//! * [`fuse`]: the FUSE daemon, which turns kernel requests into
//!   [`FsClient`] calls.
//!
//! Errors are [`FsError`] (the metadata service's errno with a message):
//! the FUSE daemon hands the errno to the kernel as it is and logs the
//! message.
#![deny(unsafe_code)]

mod file;
pub mod fs;
pub mod fuse;

pub use flyfs_rpc::wire::meta::MetaError as FsError;
pub use fs::{FileHandle, FsClient, FsConfig, OpenMode};
