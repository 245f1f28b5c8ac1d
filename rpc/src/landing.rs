//! Replies received straight into the caller's memory.
//!
//! A call made with [`Client::call_landing`](crate::Client::call_landing)
//! hands the client a [`Landing`]: memory of the caller's (a KV cache
//! block's buffer, a native I/O application's shared memory) that the
//! reply's payload is read into from the connection, with no buffer of the
//! transport's in between and no copy afterwards. The connection's reader
//! reads the reply's header and body first, asks the landing where the
//! payload goes (it may decode the body: a batched read places each chunk
//! by the length its result says), reads the payload into those slices, and
//! checks the frame's CRC over the body and the slices before the call sees
//! anything. A landing that declines (`None`), a reply that is an error or
//! that the server wrote into a lent RDMA buffer, arrives the usual way.
//!
//! Ownership: the landing is moved into the call and comes back with its
//! result, however the call ends. While the connection's reader receives
//! into it the reader holds it (a [`Lease`]); the call returns only once
//! the lease is back, so nothing writes into the caller's memory after the
//! call returned. A call past its deadline whose reply is still arriving
//! waits one more deadline for it, then closes the connection (which drops
//! the reader and the lease with it). A call whose future is dropped
//! instead leaves the landing to the reader until the reply is in: the
//! landing owns its memory, so that stays sound.

use std::any::Any;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::payload::Payload;

/// Caller memory a reply's payload lands in.
pub trait Landing: Send + 'static {
    /// Where the `payload_len` bytes of a reply with this `body` go: slices
    /// in order whose lengths add up to exactly `payload_len`, or `None`
    /// for the usual receive into a buffer of the transport's. The body's
    /// CRC may also cover the payload and is only checked once it landed:
    /// a landing checks what it decodes (lengths within its buffers).
    fn segments(&mut self, body: &[u8], payload_len: usize) -> Option<Vec<&mut [u8]>>;

    /// The buffer each part of the reply may be written into, in order, at
    /// its full size (a batched read: each item's buffer, as long as the
    /// item asks): over RDMA, when every one lies in a registered arena
    /// (`RdmaTransport::register_arena`), the server RDMA WRITEs part `i`
    /// into the start of buffer `i`, and the reply's body then says how
    /// much of each it wrote, as for [`segments`](Self::segments), which
    /// checks it. `None` (the default): the payload comes as usual.
    fn part_buffers(&mut self) -> Option<Vec<&mut [u8]>> {
        None
    }

    /// The landing as `Any`, so the caller gets back its own type.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// Where a landed call's reply payload went.
#[derive(Debug)]
pub enum Landed {
    /// This many bytes, read into the landing's segments.
    InPlace(usize),
    /// The landing declined, or the reply came another way (an RDMA
    /// WRITE into a lent buffer): the payload as any call gets it.
    Payload(Payload),
}

/// What goes back to the call: its landing, and how many bytes landed in
/// it (`None`: the payload went elsewhere, or the reply broke off).
pub(crate) type Returned = (Box<dyn Landing>, Option<usize>);

/// How a lease's landing takes the reply's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LentAs {
    /// The connection's reader reads the payload into it.
    Read,
    /// The server may RDMA WRITE the parts into its buffers
    /// (`FLAG_REPLY_SCATTER`): the lease stays with the connection until
    /// the reply arrives or the queue pair is down, even after the call
    /// ended, as a lent reply buffer does.
    Written,
}

/// What a call and the lease on its landing share: the connection whose
/// reader holds the lease, so a call past its deadline can close it.
#[derive(Debug, Default)]
pub(crate) struct LeaseState {
    holder: Mutex<Option<Weak<crate::client::Shared>>>,
    /// The server wrote the payload into the landing by RDMA WRITE (so it
    /// is counted as moved one-sided, not landed by the reader).
    pub(crate) written: std::sync::atomic::AtomicBool,
}

impl LeaseState {
    /// Closes the connection whose reader holds the landing, if any.
    pub(crate) fn close_holder(&self) {
        let holder = self.holder.lock().take().and_then(|weak| weak.upgrade());
        if let Some(shared) = holder {
            shared.close_landing_stalled();
        }
    }
}

/// A landing lent to a connection for one call; it goes back to the call
/// when dropped, wherever that is (the call's own future, the connection's
/// map of pending landings, its reader).
pub(crate) struct Lease {
    landing: Option<Box<dyn Landing>>,
    pub(crate) landed: Option<usize>,
    pub(crate) lent_as: LentAs,
    back: Option<oneshot::Sender<Returned>>,
    pub(crate) state: Arc<LeaseState>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease(landed {:?})", self.landed)
    }
}

impl Lease {
    pub(crate) fn new(landing: Box<dyn Landing>) -> (Lease, oneshot::Receiver<Returned>) {
        let (back, returned) = oneshot::channel();
        (
            Lease {
                landing: Some(landing),
                landed: None,
                lent_as: LentAs::Read,
                back: Some(back),
                state: Arc::default(),
            },
            returned,
        )
    }

    /// The connection `shared`'s reader now receives into it.
    pub(crate) fn held_by(&self, shared: &Arc<crate::client::Shared>) {
        *self.state.holder.lock() = Some(Arc::downgrade(shared));
    }

    pub(crate) fn landing_mut(&mut self) -> &mut dyn Landing {
        self.landing
            .as_deref_mut()
            .expect("a lease holds its landing until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        *self.state.holder.lock() = None;
        if let (Some(landing), Some(back)) = (self.landing.take(), self.back.take()) {
            // A call that was dropped no longer listens: the landing is
            // freed here.
            let _ = back.send((landing, self.landed));
        }
    }
}
