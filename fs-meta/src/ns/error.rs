//! `MetaError`: why a namespace operation failed, and the errno a FUSE reply
//! or RPC status carries for it.
//!
//! Each POSIX failure has its own variant carrying a short description of
//! what was involved (for logs); callers branch on [`MetaError::errno`]. KV
//! failures keep the [`KvError`] so that [`flyfs_kv::run`] can retry the
//! retryable ones ([`TxError`]).

use flyfs_proto::codec::CodecError;

use crate::ns::layout::LayoutError;
use crate::schema::DecodeError;
use flyfs_kv::{KvError, TxError};

/// A namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no such file or directory: {0}")]
    NotFound(String),
    #[error("file exists: {0}")]
    Exists(String),
    #[error("not a directory: {0}")]
    NotDir(String),
    #[error("is a directory: {0}")]
    IsDir(String),
    #[error("directory not empty: {0}")]
    NotEmpty(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("name too long: {0}")]
    NameTooLong(String),
    /// A mode-bit check failed (EACCES).
    #[error("permission denied: {0}")]
    Access(String),
    /// An ownership rule refused the operation (EPERM): chmod by a
    /// non-owner, the sticky bit, hard links to directories.
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    #[error("too many levels of symbolic links: {0}")]
    Loop(String),
    /// An extended attribute does not exist (ENODATA).
    #[error("no such attribute: {0}")]
    NoData(String),
    /// An extended attribute name is empty or too long (ERANGE, as Linux).
    #[error("attribute name out of range: {0}")]
    Range(String),
    /// An extended attribute value is too large (E2BIG, as Linux).
    #[error("attribute value too large: {0}")]
    TooBig(String),
    /// A length beyond what the layout can address (EFBIG).
    #[error("file too large: {0}")]
    FileTooBig(String),
    #[error("resource busy: {0}")]
    Busy(String),
    #[error("too many links: {0}")]
    TooManyLinks(String),
    /// The inode id space is exhausted (ENOSPC).
    #[error("no space: {0}")]
    NoSpace(String),
    #[error("operation not supported: {0}")]
    NotSupported(String),
    /// Opening a special file here (ENXIO): the kernel of the machine that
    /// opens it provides the pipe, socket or device.
    #[error("no such device: {0}")]
    NoDevice(String),
    #[error("invalid layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("metadata store: {0}")]
    Kv(#[from] KvError),
    /// Stored bytes did not decode, or broke an invariant the namespace
    /// relies on (a cycle, a dangling entry).
    #[error("corrupt metadata at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// A value could not be encoded. Derived encoders over plain data do not
    /// fail; this keeps the path panic-free anyway.
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: CodecError,
    },
}

impl MetaError {
    /// The errno for this error (a positive libc constant).
    pub fn errno(&self) -> i32 {
        match self {
            MetaError::NotFound(_) => libc::ENOENT,
            MetaError::Exists(_) => libc::EEXIST,
            MetaError::NotDir(_) => libc::ENOTDIR,
            MetaError::IsDir(_) => libc::EISDIR,
            MetaError::NotEmpty(_) => libc::ENOTEMPTY,
            MetaError::Invalid(_) | MetaError::Layout(_) => libc::EINVAL,
            MetaError::NameTooLong(_) => libc::ENAMETOOLONG,
            MetaError::Access(_) => libc::EACCES,
            MetaError::NotPermitted(_) => libc::EPERM,
            MetaError::Loop(_) => libc::ELOOP,
            MetaError::NoData(_) => libc::ENODATA,
            MetaError::Range(_) => libc::ERANGE,
            MetaError::TooBig(_) => libc::E2BIG,
            MetaError::FileTooBig(_) => libc::EFBIG,
            MetaError::Busy(_) => libc::EBUSY,
            MetaError::TooManyLinks(_) => libc::EMLINK,
            MetaError::NoSpace(_) => libc::ENOSPC,
            MetaError::NotSupported(_) => libc::EOPNOTSUPP,
            MetaError::NoDevice(_) => libc::ENXIO,
            // Conflicts that outlasted every retry, a store that failed, and
            // corrupt bytes are all I/O errors to the application.
            MetaError::Kv(_) | MetaError::Corrupt { .. } | MetaError::Encode { .. } => libc::EIO,
        }
    }
}

impl From<DecodeError> for MetaError {
    fn from(e: DecodeError) -> MetaError {
        MetaError::Corrupt {
            key: e.key,
            reason: e.reason,
        }
    }
}

impl TxError for MetaError {
    fn kv_error(&self) -> Option<&KvError> {
        match self {
            MetaError::Kv(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_and_retry_classification() {
        assert_eq!(MetaError::NotFound("x".into()).errno(), libc::ENOENT);
        assert_eq!(MetaError::NoData("x".into()).errno(), libc::ENODATA);
        let conflict = MetaError::from(KvError::Conflict);
        assert_eq!(conflict.errno(), libc::EIO);
        assert!(conflict.kv_error().is_some_and(KvError::is_retryable));
        assert!(MetaError::Exists("x".into()).kv_error().is_none());
    }
}
