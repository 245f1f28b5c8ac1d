//! The flyfs protocol: what two flyfs processes say to each other, as data.
//!
//! Every crate that stores or sends a flyfs identifier depends on this one,
//! and it depends on no runtime: serde, MessagePack, CRC32C and `bytes`
//! only, so the chunk engine and the client libraries can use the ids and
//! messages without linking networking. The layers, bottom up:
//! * [`ids`]: newtype identifiers every layer shares.
//! * [`addr`]: `host:port` addresses, checked where they enter.
//! * [`codec`]: MessagePack bodies and the forward-compatibility rule.
//! * [`frame`]: the 36-byte header, limits, status codes, and the frame as
//!   bytes (reading and writing frames on a stream is flyfs-rpc's).
//! * [`wire`]: the message types of each service, declared as [`Method`]s.
//! * [`access`]: the POSIX access rule over the wire's credentials, shared
//!   by the metadata service and the FUSE daemon.
//! * [`auth`]: principals, the identity URI of a certificate, and the
//!   [`Roles`](auth::Roles) every method allows.
//!
//! The byte layout and its version log are in docs/rpc-wire-format.md.
#![deny(unsafe_code)]

pub mod access;
pub mod addr;
pub mod auth;
pub mod codec;
pub mod frame;
pub mod ids;
pub mod wire;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use auth::{Identity, Principal, Role, Roles};
pub use codec::CodecError;
pub use frame::{FrameError, FrameLimits, Status};

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
    /// The roles allowed to call the method; the rpc server refuses anyone
    /// else with `Forbidden` before the service sees the request. No
    /// default: every method says who calls it (least privilege, from the
    /// real callers; the table is in docs/security.md).
    const ROLES: Roles;
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
    const ROLES: Roles = Roles::ALL;
    type Req = PingReq;
    type Rsp = PingRsp;
}

const _: () = assert!(Ping::ID < METHOD_ID_SERVICE_MIN);
