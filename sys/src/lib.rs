//! Raw FFI for flyfs: bindings to kernel and device interfaces that no crate on
//! crates.io already wraps (RDMA verbs, VFIO), with no logic of its own.
//!
//! It is empty today: io_uring is reached through the `io-uring` crate, and the
//! verbs and VFIO bindings arrive with the RDMA transport and an NVMe driver.
#![no_std]
