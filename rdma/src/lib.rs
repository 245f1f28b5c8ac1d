//! flyfs-rdma: RDMA verbs made safe for flyfs's transport.
//!
//! The raw bindings live in flyfs-sys (`verbs`, libibverbs loaded at run
//! time); this crate owns the objects they create and the rules for using
//! them, so that the rpc layer sees only safe types:
//!
//! * [`verbs`]: devices, protection domains, completion queues with their
//!   channels, RC queue pairs and their state transitions, memory regions;
//!   live-object counts for leak tests.
//! * [`handshake`]: the connection parameters two peers exchange over their
//!   already-authenticated channel, encoded and checked.
//! * [`credits`]: credit-based flow control, as pure bookkeeping.
//! * [`conn`]: a connection: SEND/RECV messages under credits, one-sided
//!   RDMA READ/WRITE, the completion driver, failure handling.
//!
//! Unsafe code is allowed here (like sys/ and bypass/): it is where verbs
//! pointers are dereferenced. Each `unsafe` block says why it is sound.

pub mod conn;
pub mod credits;
pub mod error;
pub mod handshake;
pub mod verbs;

pub use conn::{
    Arena, ArenaRegistration, Connection, ConnectionConfig, Device, PendingConnection,
    RemoteBuffer, TransferCounts, transfer_counts,
};
pub use error::{RdmaError, Result};
pub use handshake::Endpoint;
pub use verbs::{Access, LiveCounts, MemoryRegion, check_library, device_names, live_counts};
