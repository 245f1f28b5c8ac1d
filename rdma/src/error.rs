//! The one error type of flyfs-rdma. Every variant names what failed (the
//! library, the device, the verb, the work request) so that a misconfigured
//! or missing RDMA set-up is reported at start, in words, not as a hang.

use std::sync::Arc;

/// Why an RDMA operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RdmaError {
    /// libibverbs could not be loaded (rdma-core is not installed), or lacks
    /// a function flyfs calls.
    #[error(
        "RDMA transport needs rdma-core's {soname} (Debian: libibverbs1 and ibverbs-providers), \
         which could not be loaded"
    )]
    Library {
        soname: &'static str,
        #[source]
        source: Arc<libloading::Error>,
    },
    /// The configured device does not exist.
    #[error("RDMA device {name:?} not found; devices present: {}", present_list(.present))]
    NoDevice { name: String, present: Vec<String> },
    /// A verb failed; `source` carries the errno it returned.
    #[error("{verb} failed")]
    Verb {
        verb: &'static str,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The port of the device is not usable.
    #[error("RDMA device {device:?} port {port} is not active (state {state})")]
    PortDown {
        device: String,
        port: u8,
        state: u32,
    },
    /// A work request completed with an error status.
    #[error("RDMA {operation} completed with status {status} ({status_text})")]
    Completion {
        operation: &'static str,
        status: u32,
        status_text: String,
    },
    /// A work request did not complete within the completion timeout.
    #[error("RDMA {operation} did not complete within {timeout_ms} ms")]
    CompletionTimeout {
        operation: &'static str,
        timeout_ms: u64,
    },
    /// The connection failed earlier (a completion error, a timeout, the
    /// peer's death) and carries no more work: it must be rebuilt.
    #[error("RDMA connection is broken: {reason}")]
    Broken { reason: String },
    /// The peer announced, on closing, more data messages than arrived
    /// before the deadline (a peer that broke the protocol).
    #[error("the peer announced {announced} messages before closing, {taken} arrived in time")]
    Announced { announced: u64, taken: u64 },
    /// The peer's connection parameters are malformed or incompatible.
    #[error("RDMA handshake: {0}")]
    Handshake(String),
    /// A message larger than the peer's receive slots.
    #[error("RDMA message of {len} bytes exceeds the peer's limit of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    /// A local buffer range outside its registered region.
    #[error("range {offset}+{len} outside a registered region of {region_len} bytes")]
    OutOfRegion {
        offset: usize,
        len: usize,
        region_len: usize,
    },
}

fn present_list(present: &[String]) -> String {
    if present.is_empty() {
        "none (is an RDMA NIC or rdma_rxe configured, and ib_uverbs loaded?)".to_string()
    } else {
        present.join(", ")
    }
}

impl RdmaError {
    pub(crate) fn verb(verb: &'static str, source: std::io::Error) -> RdmaError {
        RdmaError::Verb {
            verb,
            source: Arc::new(source),
        }
    }

    /// A verb that reports failure by returning an errno value (not -1 with
    /// `errno` set): `ibv_modify_qp`, `ibv_post_send` and most others.
    pub(crate) fn verb_rc(verb: &'static str, rc: i32) -> RdmaError {
        RdmaError::verb(verb, std::io::Error::from_raw_os_error(rc.abs()))
    }

    /// A verb that returned NULL and set `errno`.
    pub(crate) fn verb_errno(verb: &'static str) -> RdmaError {
        RdmaError::verb(verb, std::io::Error::last_os_error())
    }
}

pub type Result<T, E = RdmaError> = std::result::Result<T, E>;
