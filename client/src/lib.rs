//! The flyfs client library: everything a process needs to use a flyfs
//! cluster, and nothing of the servers (no chunk engine, no namespace, no
//! embedded store, no io_uring), so a FUSE mount, a tool or a language
//! binding links only this, flyfs-proto and flyfs-rpc.
//!
//! * [`mgmt`]: the callers' side of the cluster managers: several
//!   addresses, calls that find the primary, routing.
//! * [`storage`]: [`StorageClient`](storage::StorageClient): chunk reads
//!   and writes on chains, with routing, failover and exactly-once writes.
//! * [`meta`]: [`MetaClient`](meta::MetaClient): typed calls to the
//!   metadata service with failover across its instances.
//! * [`fs`]: [`FsClient`], the file client library. Namespace operations go
//!   to the metadata service; file data goes straight to the storage chains
//!   named by the file's layout, many chunk I/Os in flight, with a bounded
//!   write-back buffer and read-ahead per file (`file.rs`).
//! * [`cache`]: the block cache random reads go through, every hit checked
//!   against the chunk's committed version in the read's round trip.
//!
//! Storage nodes and the metadata service use [`mgmt`] and [`storage`] too:
//! they are clients of the manager and of each other.
//!
//! Errors of the file client are [`FsError`] (the metadata service's errno
//! with a message): the FUSE daemon (flyfs-fuse) hands the errno to the
//! kernel as it is and logs the message.
#![deny(unsafe_code)]

pub mod cache;
mod file;
pub mod fs;
pub mod meta;
pub mod mgmt;
pub mod storage;

pub use flyfs_proto::wire::meta::MetaError as FsError;
pub use fs::{FileHandle, FsClient, FsConfig, OpenMode};
