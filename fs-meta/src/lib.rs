//! The transactional KV layer (embedded and FoundationDB), the POSIX namespace
//! on top of it, write sessions and garbage collection.
#![deny(unsafe_code)]

pub mod kv;
