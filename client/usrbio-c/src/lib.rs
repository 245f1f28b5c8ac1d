//! flyfs native I/O for C: the functions `include/flyfs_usrbio.h` declares,
//! over flyfs-usrbio's library. Objects are boxed Rust values behind opaque
//! pointers; errors are `-errno` with the message kept per thread for
//! `flyfs_last_error`.
//!
//! Every `unsafe` block is in `ffi.rs`, the only module allowed it
//! (scripts/check-layout names it): C hands us pointers, and dereferencing
//! them is where the header's contract is trusted.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod ffi;

pub use ffi::*;
