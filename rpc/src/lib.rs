//! Wire types of every flyfs service, their codec and framing, and the
//! transports (TCP now, RDMA later).
//!
//! Today it holds the identifiers every layer shares ([`ids`]); the codec,
//! framing and transports arrive with the replication issue. It sits below all
//! other flyfs crates, so it depends on none of them.
#![deny(unsafe_code)]

pub mod ids;
