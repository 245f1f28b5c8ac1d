//! The file client library, the FUSE daemon, the zero-copy API and the KV cache
//! API. Arrives with the client issue.
#![deny(unsafe_code)]
