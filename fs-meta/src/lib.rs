//! The metadata service: the POSIX namespace on the transactional KV store
//! (flyfs-kv), write sessions and garbage collection, and its RPC face.
#![deny(unsafe_code)]

pub mod data;
pub mod gc;
pub mod ns;
pub mod schema;
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;
