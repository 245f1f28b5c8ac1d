//! The error every RPC call can return, and which of them a retry may fix.
//!
//! Frame and codec errors have their own enums beside their decoders
//! (`frame.rs`, `codec.rs`); this one wraps them with where and what: every
//! message names the peer address and the method.

use std::fmt;
use std::io;
use std::time::Duration;

use flyfs_proto::codec::CodecError;
use flyfs_proto::frame::{FrameError, Status};

/// A method as error messages name it: its name when the caller knew it
/// (typed calls), and always its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodRef {
    pub id: u16,
    pub name: &'static str,
    /// The method's payload carries its own end-to-end checksum
    /// ([`Method::PAYLOAD_CHECKED_BY_SERVICE`](flyfs_proto::Method)).
    pub payload_checked: bool,
}

impl MethodRef {
    pub const fn of<M: flyfs_proto::Method>() -> MethodRef {
        MethodRef {
            id: M::ID,
            name: M::NAME,
            payload_checked: M::PAYLOAD_CHECKED_BY_SERVICE,
        }
    }

    /// A method known only by id (raw calls).
    pub const fn id(id: u16) -> MethodRef {
        MethodRef {
            id,
            name: "",
            payload_checked: false,
        }
    }
}

impl fmt::Display for MethodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "method {}", self.id)
        } else {
            write!(f, "{} (method {})", self.name, self.id)
        }
    }
}

/// An RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No connection could be made (refused, unreachable, connect timeout).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed: the server's certificate is not of our
    /// cluster's CA, or the stream broke during the handshake.
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The RDMA connection could not be set up after authentication: the
    /// server is on the TCP transport, the parameters were malformed, or
    /// the device failed.
    #[error("RDMA connection to {addr} failed: {source}")]
    Rdma {
        addr: String,
        #[source]
        source: flyfs_rdma::RdmaError,
    },
    /// A one-sided transfer of a payload failed (an RDMA READ of the
    /// peer's buffer: an invalid remote key, a broken connection, a
    /// destination outside the registered arenas).
    #[error("one-sided payload transfer failed: {source}")]
    OneSided {
        #[source]
        source: flyfs_rdma::RdmaError,
    },
    /// The server's certificate is valid but names no daemon of our
    /// cluster.
    #[error("{addr} is not a flyfs daemon of our cluster: {reason}")]
    PeerIdentity { addr: String, reason: String },
    /// The server refused our credentials after the handshake (TLS 1.3
    /// verifies the client's certificate last), or the session broke.
    #[error("{addr} refused the connection before answering {method}: {reason}")]
    Refused {
        addr: String,
        method: MethodRef,
        reason: String,
    },
    /// The connection broke (or was dropped) before the reply arrived. The
    /// request may or may not have run.
    /// The server's reply broke the protocol (a reply written into a
    /// buffer the call did not lend, or more bytes than it lent).
    #[error("{method} to {addr}: bad reply: {reason}")]
    BadReply {
        addr: String,
        method: MethodRef,
        reason: String,
    },
    #[error("connection to {addr} lost before {method} was answered")]
    Disconnected { addr: String, method: MethodRef },
    /// No reply within the attempt's timeout. The request may or may not have
    /// run.
    #[error("{method} to {addr} timed out after {after:?}")]
    Timeout {
        addr: String,
        method: MethodRef,
        after: Duration,
    },
    /// The server answered with a non-`Ok` status.
    #[error("{method} to {addr} failed: {status}: {message}")]
    Remote {
        addr: String,
        method: MethodRef,
        status: Status,
        message: String,
    },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A payload was not the length the receiver expected.
    #[error("payload is {got} bytes, expected {expected}")]
    PayloadLength { expected: usize, got: usize },
}

impl RpcError {
    /// Whether trying again could succeed: the peer was unreachable, the
    /// connection broke, the attempt timed out, or the server said it was
    /// unavailable. Whether a retry is *safe* (the first attempt may have run)
    /// is the caller's decision, made per method.
    pub fn is_retryable(&self) -> bool {
        match self {
            RpcError::Connect { .. } | RpcError::Disconnected { .. } | RpcError::Timeout { .. } => {
                true
            }
            RpcError::Remote { status, .. } => *status == Status::Unavailable,
            // A handshake cut short by the network may succeed next time;
            // one that rustls refused (InvalidData: a certificate or
            // protocol error) will not.
            RpcError::Handshake { source, .. } => source.kind() != io::ErrorKind::InvalidData,
            // A queue pair that failed may connect next time; a peer on
            // the other transport, or a device that is not there, will not.
            RpcError::Rdma { source, .. } => matches!(
                source,
                flyfs_rdma::RdmaError::Verb { .. }
                    | flyfs_rdma::RdmaError::Completion { .. }
                    | flyfs_rdma::RdmaError::CompletionTimeout { .. }
                    | flyfs_rdma::RdmaError::Broken { .. }
            ),
            _ => false,
        }
    }

    /// The status of a remote error, if this is one.
    pub fn status(&self) -> Option<Status> {
        match self {
            RpcError::Remote { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_errors() {
        let method = MethodRef::id(300);
        let addr = String::from("a:1");
        assert!(
            RpcError::Disconnected {
                addr: addr.clone(),
                method
            }
            .is_retryable()
        );
        assert!(
            RpcError::Connect {
                addr: addr.clone(),
                source: io::ErrorKind::ConnectionRefused.into()
            }
            .is_retryable()
        );
        let remote = |status| RpcError::Remote {
            addr: addr.clone(),
            method,
            status,
            message: String::new(),
        };
        assert!(remote(Status::Unavailable).is_retryable());
        assert!(!remote(Status::Unauthenticated).is_retryable());
        assert!(!remote(Status::Forbidden).is_retryable());
        assert!(
            !RpcError::Handshake {
                addr: addr.clone(),
                source: io::ErrorKind::InvalidData.into()
            }
            .is_retryable()
        );
        assert!(
            !RpcError::Refused {
                addr: addr.clone(),
                method,
                reason: String::new()
            }
            .is_retryable()
        );
        assert!(!remote(Status::BadRequest).is_retryable());
        assert!(
            !RpcError::PayloadLength {
                expected: 1,
                got: 2
            }
            .is_retryable()
        );
    }

    #[test]
    fn messages_name_address_and_method() {
        let error = RpcError::Timeout {
            addr: "storage-1:9000".into(),
            method: MethodRef {
                id: 513,
                name: "storage.Write",
                payload_checked: true,
            },
            after: Duration::from_secs(5),
        };
        let message = error.to_string();
        assert!(message.contains("storage-1:9000"), "{message}");
        assert!(message.contains("storage.Write (method 513)"), "{message}");
    }
}
