//! The transactional KV layer (embedded and FoundationDB), the POSIX namespace
//! on top of it, write sessions and garbage collection. Arrives with the
//! metadata issue.
#![deny(unsafe_code)]
