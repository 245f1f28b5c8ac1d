//! The metadata service: the POSIX namespace on the transactional KV store
//! (flyfs-kv), write sessions with their client leases, garbage collection
//! and the session reaper, and its RPC face.
#![deny(unsafe_code)]

pub mod data;
pub mod gc;
pub mod ns;
pub mod reaper;
pub mod schema;
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;
