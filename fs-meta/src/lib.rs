//! The transactional KV layer (embedded and FoundationDB), the POSIX namespace
//! on top of it, write sessions and garbage collection.
#![deny(unsafe_code)]

pub mod client;
pub mod cluster_store;
pub mod data;
pub mod gc;
pub mod kv;
pub mod ns;
pub mod schema;
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;
