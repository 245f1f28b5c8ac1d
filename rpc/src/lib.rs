//! Wire types of every flyfs service, their codec and framing, and the
//! transports (TCP now, RDMA later).
//!
//! It sits below all other flyfs crates, so it depends on none of them. The
//! layers, bottom up:
//! * [`ids`]: newtype identifiers every layer shares.
//! * [`codec`]: MessagePack bodies and the forward-compatibility rule.
//! * [`frame`]: the 36-byte header, limits, status codes, frame I/O.
//! * [`payload`]: bulk bytes beside the message, the seam an RDMA transport
//!   plugs into.
//! * [`net`]: the network seam ([`Tcp`], and `SimNet` for turmoil).
//! * [`server`] and [`client`]: multiplexed request/response over one
//!   connection, many calls in flight, replies in any order.
//! * [`wire`]: the message types of each service, declared as [`Method`]s.
//! * [`metrics`]: per-method request counters and latency histograms of
//!   both sides, off until a process enables them.
//!
//! The byte layout and its version log are in docs/rpc-wire-format.md.
#![deny(unsafe_code)]

pub mod client;
pub mod codec;
pub mod error;
pub mod frame;
pub mod ids;
pub mod metrics;
pub mod net;
pub mod payload;
pub mod recv_pool;
pub mod server;
pub mod wire;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use client::{CallOptions, Client, ClientConfig, RawReply, RetryPolicy};
pub use codec::CodecError;
pub use error::{MethodRef, RpcError};
pub use frame::{FrameError, FrameLimits, Status};
#[cfg(feature = "sim")]
pub use net::SimNet;
pub use net::{Listener, Network, Tcp};
pub use payload::Payload;
pub use server::{Reply, Request, Server, ServerConfig, ServerHandle, Service, serve};

/// One RPC method: its id on the wire, a name for logs and errors, and its
/// request and response messages. Service crates declare a unit struct per
/// method. Ids `0..=255` belong to the rpc layer itself ([`Ping`]); services
/// use [`METHOD_ID_SERVICE_MIN`] and up, each service in its own range.
pub trait Method {
    const ID: u16;
    const NAME: &'static str;
    type Req: Serialize + DeserializeOwned + Send + 'static;
    type Rsp: Serialize + DeserializeOwned + Send + 'static;
    /// Whether the request's payload carries its own end-to-end checksum that
    /// the service verifies where the bytes come to rest (a chunk write's
    /// CRC32C, checked by the chunk engine). The frame's CRC then covers the
    /// body only ([`frame::FLAG_PAYLOAD_UNCHECKED`]), so a hop does not read
    /// every payload byte twice more just to checksum it again.
    const PAYLOAD_CHECKED_BY_SERVICE: bool = false;
}

/// The first method id a service may use; lower ids are the rpc layer's.
pub const METHOD_ID_SERVICE_MIN: u16 = 256;

/// Built in: answered by every server itself, without reaching the service.
/// A liveness probe that also checks the whole path (framing, codec, CRC).
#[derive(Debug)]
pub struct Ping;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PingReq {
    /// Echoed back, so a caller can match replies if it wants to.
    pub nonce: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PingRsp {
    pub nonce: u64,
}

impl Method for Ping {
    const ID: u16 = 1;
    const NAME: &'static str = "rpc.Ping";
    type Req = PingReq;
    type Rsp = PingRsp;
}

const _: () = assert!(Ping::ID < METHOD_ID_SERVICE_MIN);
