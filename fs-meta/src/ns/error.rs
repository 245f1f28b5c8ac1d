//! `NsError`: why a namespace operation failed, and the errno a FUSE reply
//! or RPC status carries for it.
//!
//! Each POSIX failure has its own variant carrying a short description of
//! what was involved (for logs); callers branch on [`NsError::errno`]. KV
//! failures keep the [`KvError`] so that [`flyfs_kv::run`] can retry the
//! retryable ones ([`TxError`]).
//!
//! It is the namespace's own error, not the wire's
//! [`flyfs_proto::wire::meta::MetaError`]: the service turns one into the
//! other (errno, message, whether a retry may help) at the RPC boundary.

use flyfs_proto::codec::CodecError;
use flyfs_proto::ids::InodeId;

use crate::ns::layout::LayoutError;
use crate::schema::DecodeError;
use flyfs_kv::{KvError, TxError};

/// A namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
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
    /// A change the file's data held inline cannot take (a truncate past
    /// what may be held): the service moves the data to storage, then
    /// retries (EAGAIN should it ever reach a client).
    #[error("the data of {0:?} is held inline: it must move to storage first")]
    Inline(InodeId),
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

impl NsError {
    /// The errno for this error (a positive libc constant).
    pub fn errno(&self) -> i32 {
        match self {
            NsError::NotFound(_) => libc::ENOENT,
            NsError::Exists(_) => libc::EEXIST,
            NsError::NotDir(_) => libc::ENOTDIR,
            NsError::IsDir(_) => libc::EISDIR,
            NsError::NotEmpty(_) => libc::ENOTEMPTY,
            NsError::Invalid(_) | NsError::Layout(_) => libc::EINVAL,
            NsError::NameTooLong(_) => libc::ENAMETOOLONG,
            NsError::Access(_) => libc::EACCES,
            NsError::NotPermitted(_) => libc::EPERM,
            NsError::Loop(_) => libc::ELOOP,
            NsError::NoData(_) => libc::ENODATA,
            NsError::Range(_) => libc::ERANGE,
            NsError::TooBig(_) => libc::E2BIG,
            NsError::FileTooBig(_) => libc::EFBIG,
            NsError::Busy(_) => libc::EBUSY,
            NsError::TooManyLinks(_) => libc::EMLINK,
            NsError::NoSpace(_) => libc::ENOSPC,
            NsError::NotSupported(_) => libc::EOPNOTSUPP,
            NsError::NoDevice(_) => libc::ENXIO,
            NsError::Inline(_) => libc::EAGAIN,
            // Conflicts that outlasted every retry, a store that failed, and
            // corrupt bytes are all I/O errors to the application.
            NsError::Kv(_) | NsError::Corrupt { .. } | NsError::Encode { .. } => libc::EIO,
        }
    }
}

impl From<DecodeError> for NsError {
    fn from(e: DecodeError) -> NsError {
        NsError::Corrupt {
            key: e.key,
            reason: e.reason,
        }
    }
}

impl TxError for NsError {
    fn kv_error(&self) -> Option<&KvError> {
        match self {
            NsError::Kv(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_and_retry_classification() {
        assert_eq!(NsError::NotFound("x".into()).errno(), libc::ENOENT);
        assert_eq!(NsError::NoData("x".into()).errno(), libc::ENODATA);
        let conflict = NsError::from(KvError::Conflict);
        assert_eq!(conflict.errno(), libc::EIO);
        assert!(conflict.kv_error().is_some_and(KvError::is_retryable));
        assert!(NsError::Exists("x".into()).kv_error().is_none());
    }
}
