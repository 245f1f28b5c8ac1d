//! An application's iov as an arena registered for one-sided RDMA, so that
//! replicas write native reads straight into the application's memory: the
//! one `unsafe impl` of this crate (ARCHITECTURE.md, "Where unsafe lives").

#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::Arc;

use flyfs_usrbio::os::SharedMemory;

/// The whole mapping of one iov.
#[derive(Debug)]
pub(crate) struct IovArena(pub(crate) Arc<SharedMemory>);

// SAFETY: `SharedMemory` maps its memfd once, at one address and length,
// and unmaps it only when dropped; this value holds it, so the range stays
// mapped for as long as the value lives (the registration keeps the value
// until the memory is deregistered). The memfd is sealed against shrinking
// (checked when the iov is registered), so every page stays backed. What a
// peer writes into it is what one native read named: each read lends the
// slice its request gave, as the TCP path reads into it; two requests in
// flight naming overlapping slices is the application's choice and touches
// only its own memory, which the daemon never decides anything from.
unsafe impl flyfs_rpc::rdma::Arena for IovArena {
    fn arenas(&self) -> Vec<(NonNull<u8>, usize)> {
        NonNull::new(self.0.as_ptr())
            .map(|ptr| vec![(ptr, self.0.len())])
            .unwrap_or_default()
    }
}
