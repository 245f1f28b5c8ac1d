//! flyfs native I/O: the zero-copy client API in 3FS's USRBIO shape.
//!
//! An application registers a large shared buffer (an [`Iov`]) and one
//! ring per thread (an [`Ior`]) with the local mount daemon over its Unix
//! socket, registers files it opened through the mount by descriptor, and
//! then moves data with reads and writes on the rings, without FUSE
//! requests. docs/native-io.md is the protocol; this crate is both its
//! definition (`wire`, `ring`, `memory`) and the application's library
//! (`app`). The daemon's side lives in flyfs-fuse (`native.rs`) and uses the
//! same types.
//!
//! The crate links no server code and no async runtime, so the C header
//! and the Python package build on it alone.
//!
//! # Code map
//! * `wire`: the socket's requests and replies, and the per-connection limits.
//! * `ring`: the ring's layout, its entries, and [`ring::Ring`], the view
//!   both sides use.
//! * `memory`: sealed memfds: created by the application, checked by the
//!   daemon.
//! * `os`: the only `unsafe` code: the shared mapping and receiving
//!   descriptors.
//! * `app`: [`Client`], [`Iov`], [`Ior`], [`RegisteredFile`], [`Completion`].
#![deny(unsafe_code)]

mod app;
pub mod memory;
#[allow(unsafe_code)]
pub mod os;
pub mod ring;
pub mod wire;

use std::path::PathBuf;

pub use app::{Client, Completion, Ior, Iov, RegisteredFile};

/// What went wrong in native I/O, on the application's side.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("cannot connect to the mount daemon's native I/O socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the mount daemon refused {op}: {message} ({})", std::io::Error::from_raw_os_error(*errno))]
    Refused {
        op: &'static str,
        errno: i32,
        message: String,
    },
    #[error("the mount daemon closed the native I/O connection")]
    Disconnected,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Argument(String),
    #[error("the ring is full ({entries} entries submitted or prepared and not reaped)")]
    RingFull { entries: u32 },
    #[error("the mount daemon failed this ring: {0}")]
    RingFailed(String),
    #[error("timed out with {got} of {wanted} completions")]
    Timeout { got: usize, wanted: usize },
}

impl NativeError {
    pub(crate) fn os(what: &'static str, errno: nix::errno::Errno) -> NativeError {
        NativeError::Io {
            what,
            source: std::io::Error::from(errno),
        }
    }

    /// The errno behind the error, where there is one (for bindings).
    pub fn errno(&self) -> Option<i32> {
        match self {
            NativeError::Connect { source, .. } | NativeError::Io { source, .. } => {
                source.raw_os_error()
            }
            NativeError::Refused { errno, .. } => Some(*errno),
            NativeError::Disconnected => Some(libc::ENOTCONN),
            NativeError::Protocol(_) => Some(libc::EPROTO),
            NativeError::Argument(_) => Some(libc::EINVAL),
            NativeError::RingFull { .. } => Some(libc::EBUSY),
            NativeError::RingFailed(_) => Some(libc::EIO),
            NativeError::Timeout { .. } => Some(libc::ETIMEDOUT),
        }
    }
}
