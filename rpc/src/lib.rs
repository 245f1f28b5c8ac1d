//! Transports and the request/response machinery of flyfs, over the
//! messages and frames of flyfs-proto (TCP and RDMA).
//!
//! It depends on flyfs-proto and flyfs-rdma only among flyfs crates. The layers, bottom
//! up:
//! * [`frame_io`]: one frame read from or written to a byte stream.
//! * [`payload`]: bulk bytes beside the message, the seam an RDMA transport
//!   plugs into; [`landing`]: a reply's payload read straight into the
//!   caller's memory.
//! * [`net`]: the network seam ([`Tcp`], and `SimNet` for turmoil).
//! * [`rdma`]: the RDMA transport: an authenticated connection moves its
//!   frames to an RDMA connection (flyfs-rdma).
//! * [`server`] and [`client`]: multiplexed request/response over one
//!   connection, many calls in flight, replies in any order.
//! * [`tls`]: mutual TLS: credentials, the cluster CA, the identity of a
//!   peer's certificate (docs/security.md).
//! * [`metrics`]: per-method request counters and latency histograms of
//!   both sides, off until a process enables them.
//!
//! The byte layout and its version log are in docs/rpc-wire-format.md.
#![deny(unsafe_code)]

mod budget;
pub mod client;
pub mod error;
pub mod frame_io;
pub mod landing;
pub mod metrics;
pub mod net;
pub mod payload;
pub mod rdma;
pub mod recv_pool;
pub mod refusals;
pub mod server;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;

pub use client::{CallOptions, Client, ClientConfig, RawReply, RetryPolicy};
pub use error::{MethodRef, RpcError};
pub use landing::{Landed, Landing};
#[cfg(feature = "sim")]
pub use net::SimNet;
pub use net::{Listener, Network, Tcp};
pub use payload::Payload;
pub use rdma::RdmaTransport;
pub use server::{Peer, Reply, Request, Server, ServerConfig, ServerHandle, Service, serve};
pub use tls::{ClusterCa, CredentialPaths, Credentials, CredentialsError};
