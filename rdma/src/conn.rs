//! A reliable RDMA connection: one RC queue pair with its own completion
//! queue, a ring of registered receive slots, registered send slots,
//! credit-based SEND/RECV messaging (credits.rs), one-sided RDMA READ and
//! WRITE between registered regions, and a driver task that polls the
//! completion queue while work completes and sleeps on the completion
//! channel when idle.
//!
//! Failure model: the first failed work request (an error status, a peer
//! that stops acknowledging, an invalid remote key, a completion timeout)
//! fails the call that posted it with a clear error and breaks the
//! connection: the QP moves to the error state, which flushes every other
//! posted request, so each waiting call fails with [`RdmaError::Broken`]
//! naming the first cause. A broken connection is dropped and rebuilt by its
//! owner; it holds nothing after drop (verbs.rs counts every object).
//!
//! Memory a work request touches stays alive until the request completes or
//! the QP is destroyed: receive and send slots belong to the connection
//! (destroyed after its QP), and a one-sided request keeps an `Arc` of its
//! local region in the pending table, so a caller that gives up waiting
//! cannot free memory the device is still writing.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};

use crate::credits::{CONTROL_SLOTS, Credits};
use crate::error::{RdmaError, Result};
use crate::handshake::{CREDITS_MAX, Endpoint, MESSAGE_BYTES_MAX};
use crate::verbs::{
    Access, CompletionQueue, Context, MemoryRegion, PortInfo, ProtectionDomain, QpAddress, QpCaps,
    QueuePair, SendOp, Sge, WorkCompletion,
};

/// Bytes before each message's payload in its slot: payload length, credits
/// returned, kind (0 data, 1 credit-only), reserved (zero).
pub const HEADER_BYTES: usize = 16;
const KIND_DATA: u32 = 0;
const KIND_CREDITS: u32 = 1;
/// `wr_id` bit marking a receive work request (the low bits: its slot).
const RECV_BIT: u64 = 1 << 63;
/// Status of the requests the QP flushes after it entered the error state.
const WC_WR_FLUSH_ERR: u32 = 5;
/// Empty polls, each after a yield, before the driver arms the CQ and
/// sleeps on its channel: long enough to ride out the gap between a
/// request's completion and the next request, short enough not to burn a
/// core on an idle connection.
const IDLE_POLLS_BEFORE_SLEEP: u32 = 16;

/// An open device with the protection domain every flyfs connection and
/// registered region on it shares (one-sided requests need both in one PD).
#[derive(Debug)]
pub struct Device {
    context: Arc<Context>,
    pd: Arc<ProtectionDomain>,
    gid_index: u8,
    port: PortInfo,
    /// The arenas registered ([`Device::register_arenas`] at start,
    /// [`Device::register_arena`] for as long as its guard lives): what
    /// one-sided payloads may name.
    arenas: parking_lot::RwLock<Vec<Registered>>,
    next_registration: AtomicU64,
}

/// Memory that can be registered once for one-sided transfers: a buffer
/// pool's arenas.
///
/// # Safety
/// Every range `arenas` returns must stay allocated, at that address, for
/// as long as the implementing value lives; and the owner hands each buffer
/// inside to one user at a time, so a peer's RDMA WRITE into a buffer a
/// call names reaches only that call's buffer.
pub unsafe trait Arena: Send + Sync + std::fmt::Debug + 'static {
    fn arenas(&self) -> Vec<(std::ptr::NonNull<u8>, usize)>;
}

/// The registrations of one arena owner (each region keeps the owner, so
/// its memory, alive until it is deregistered).
#[derive(Debug)]
struct Registered {
    id: u64,
    regions: Vec<Arc<MemoryRegion>>,
}

/// An arena registered until this guard drops ([`Device::register_arena`]):
/// then nothing new names it, and each of its regions is deregistered once
/// the last work request using it locally is done (a peer still writing
/// into it after that fails its request and breaks its connection; the
/// memory is never written after deregistration). Dropping the guard before
/// every call that named the arena ended is the caller's choice to make:
/// keep the guard beside the buffers lent.
#[derive(Debug)]
pub struct ArenaRegistration {
    device: std::sync::Weak<Device>,
    id: u64,
}

impl Drop for ArenaRegistration {
    fn drop(&mut self) {
        if let Some(device) = self.device.upgrade() {
            device
                .arenas
                .write()
                .retain(|registered| registered.id != self.id);
        }
    }
}

impl Device {
    /// Opens `name` and reads its port; `gid_index` selects the GID peers
    /// reach us by (RoCE v2: the one mapping the interface's IP address).
    pub fn open(name: &str, gid_index: u8) -> Result<Arc<Device>> {
        let context = Context::open(name)?;
        let port = context.port_info(gid_index)?;
        let pd = ProtectionDomain::new(&context)?;
        Ok(Arc::new(Device {
            context,
            pd,
            gid_index,
            port,
            arenas: parking_lot::RwLock::new(Vec::new()),
            next_registration: AtomicU64::new(1),
        }))
    }

    pub fn name(&self) -> &str {
        self.context.name()
    }

    pub fn port(&self) -> PortInfo {
        self.port
    }

    /// A registered region of `len` bytes owned by the returned value.
    pub fn alloc_region(&self, len: usize, access: Access) -> Result<Arc<MemoryRegion>> {
        MemoryRegion::alloc(&self.pd, len, access).map(Arc::new)
    }

    /// Registers memory owned elsewhere (the buffer pool's arenas), once.
    ///
    /// # Safety
    /// As [`MemoryRegion::register_external`].
    pub unsafe fn register_external(
        &self,
        addr: std::ptr::NonNull<u8>,
        len: usize,
        access: Access,
    ) -> Result<Arc<MemoryRegion>> {
        // SAFETY: the caller's promise is the one this function requires.
        unsafe { MemoryRegion::register_external(&self.pd, addr, len, access) }.map(Arc::new)
    }

    /// Registers every arena of `owner` for one-sided transfers, once, at
    /// start: payloads that lie inside a registered arena move by RDMA READ
    /// and WRITE; any other buffer travels inside messages (copied). Never
    /// called per I/O: registration pins pages and costs a system call. The
    /// device keeps `owner` (and so its memory) alive as long as the
    /// registrations.
    pub fn register_arenas(&self, owner: Arc<dyn Arena>) -> Result<()> {
        self.register(owner).map(drop)
    }

    /// Registers every arena of `owner` (an application's shared buffer,
    /// registered when the application registers it) until the returned
    /// guard drops. Registration pins the pages and costs a system call:
    /// once per buffer's life, never per I/O.
    pub fn register_arena(self: &Arc<Self>, owner: Arc<dyn Arena>) -> Result<ArenaRegistration> {
        let id = self.register(owner)?;
        Ok(ArenaRegistration {
            device: Arc::downgrade(self),
            id,
        })
    }

    fn register(&self, owner: Arc<dyn Arena>) -> Result<u64> {
        let mut regions = Vec::new();
        for (addr, len) in owner.arenas() {
            let region = MemoryRegion::register_arena_range(
                &self.pd,
                addr,
                len,
                Access::Remote,
                owner.clone(),
            )?;
            regions.push(Arc::new(region));
        }
        let id = self.next_registration.fetch_add(1, Ordering::Relaxed);
        self.arenas.write().push(Registered { id, regions });
        Ok(id)
    }

    /// The registered arena holding all of `ptr..ptr + len`, with the
    /// offset of `ptr` in it; `None` when the range is not (wholly) inside
    /// one, so the caller sends it inline.
    pub fn find_arena(&self, ptr: *const u8, len: usize) -> Option<(Arc<MemoryRegion>, usize)> {
        let start = ptr as u64;
        let end = start.checked_add(len as u64)?;
        self.arenas
            .read()
            .iter()
            .flat_map(|registered| &registered.regions)
            .find_map(|region| {
                let region_end = region.addr() + region.len() as u64;
                (start >= region.addr() && end <= region_end)
                    .then(|| (region.clone(), (start - region.addr()) as usize))
            })
    }

    /// How many arena regions are registered (for the leak tests).
    pub fn arena_count(&self) -> usize {
        self.arenas
            .read()
            .iter()
            .map(|registered| registered.regions.len())
            .sum()
    }
}

/// The shape of one connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionConfig {
    /// Data messages the peer may send before we return credits: our
    /// receive ring holds this many slots plus [`CONTROL_SLOTS`].
    pub credits: u32,
    /// The largest message payload we accept (each receive slot's size,
    /// less [`HEADER_BYTES`]).
    pub message_bytes_max: u32,
    /// One-sided requests in flight at once on this connection.
    pub one_sided_max: u32,
    /// How long any posted work request may take to complete.
    pub completion_timeout: Duration,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            credits: 32,
            message_bytes_max: 64 << 10,
            one_sided_max: 64,
            completion_timeout: Duration::from_secs(10),
        }
    }
}

impl ConnectionConfig {
    /// The first field outside what a connection can have, by the name a
    /// config's `[rdma]` table gives it, with the range it must lie in.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        use crate::handshake::{CREDITS_MAX, MESSAGE_BYTES_MAX};
        if !(1..=CREDITS_MAX).contains(&self.credits) {
            return Err(("credits", format!("must be 1 to {CREDITS_MAX}")));
        }
        if !(4096..=MESSAGE_BYTES_MAX).contains(&self.message_bytes_max) {
            return Err((
                "message_bytes_max",
                format!("must be 4096 to {MESSAGE_BYTES_MAX}"),
            ));
        }
        if self.one_sided_max == 0 {
            return Err(("one_sided_max", "must be at least 1".into()));
        }
        if self.completion_timeout.is_zero() {
            return Err(("completion_timeout_ms", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Where a peer's registered buffer lies: what a one-sided request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuffer {
    pub addr: u64,
    pub rkey: u32,
    pub len: u32,
}

impl RemoteBuffer {
    /// The remote buffer covering `offset..offset + len` of `region`.
    pub fn of(region: &MemoryRegion, offset: usize, len: u32) -> Result<RemoteBuffer> {
        region.check(offset, len as usize)?;
        Ok(RemoteBuffer {
            addr: region.addr() + offset as u64,
            rkey: region.rkey(),
            len,
        })
    }
}

/// Bytes this process moved, by how (process-wide, for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferCounts {
    /// Payload bytes sent by SEND (copied into a send slot).
    pub sent_copied: u64,
    /// Payload bytes received by RECV (copied out of a receive slot).
    pub received_copied: u64,
    /// Bytes pulled from peers by RDMA READ.
    pub one_sided_read: u64,
    /// Bytes pushed to peers by RDMA WRITE.
    pub one_sided_written: u64,
}

static SENT_COPIED: AtomicU64 = AtomicU64::new(0);
static RECEIVED_COPIED: AtomicU64 = AtomicU64::new(0);
static ONE_SIDED_READ: AtomicU64 = AtomicU64::new(0);
static ONE_SIDED_WRITTEN: AtomicU64 = AtomicU64::new(0);

pub fn transfer_counts() -> TransferCounts {
    TransferCounts {
        sent_copied: SENT_COPIED.load(Ordering::Relaxed),
        received_copied: RECEIVED_COPIED.load(Ordering::Relaxed),
        one_sided_read: ONE_SIDED_READ.load(Ordering::Relaxed),
        one_sided_written: ONE_SIDED_WRITTEN.load(Ordering::Relaxed),
    }
}

/// A send-queue request not yet completed.
enum Pending {
    Data {
        slot: u32,
        done: oneshot::Sender<Result<()>>,
    },
    Credits,
    OneSided {
        operation: &'static str,
        done: oneshot::Sender<Result<()>>,
        _region: Arc<MemoryRegion>,
        _permit: OwnedSemaphorePermit,
    },
}

struct State {
    credits: Credits,
    free_send_slots: Vec<u32>,
    pending: HashMap<u64, Pending>,
    next_wr_id: u64,
    broken: Option<String>,
    received: VecDeque<Vec<u8>>,
    /// Data messages posted since the connection was made: what a closing
    /// side announces it sent ([`Connection::data_messages_sent`]).
    data_sent: u64,
    /// Data messages taken by [`Connection::recv`] (and
    /// [`Connection::recv_announced`]) since the connection was made.
    data_taken: u64,
}

impl State {
    /// The oldest received message, if one has arrived, counted as taken,
    /// with the credits its slot frees for the peer (none once broken:
    /// nothing can be posted then).
    fn take_received(&mut self) -> Option<(Vec<u8>, Option<u32>)> {
        let message = self.received.pop_front()?;
        self.data_taken += 1;
        let due = self.credits.on_consumed();
        Some((message, due.filter(|_| self.broken.is_none())))
    }
}

/// Everything the connection and its driver share. Fields drop in order:
/// the QP first, so the device touches none of the rings or regions below
/// after they are freed.
struct Shared {
    qp: QueuePair,
    cq: Arc<CompletionQueue>,
    recv_ring: MemoryRegion,
    send_slots: MemoryRegion,
    slot_bytes: usize,
    device: Arc<Device>,
    config: ConnectionConfig,
    peer: Endpoint,
    one_sided: Arc<Semaphore>,
    /// Woken when credits, send slots or the broken state change.
    changed: Notify,
    /// Woken when a message arrives or the connection breaks.
    arrived: Notify,
    state: Mutex<State>,
}

/// A connection whose QP exists and whose receive ring is posted, waiting
/// for the peer's parameters.
pub struct PendingConnection {
    device: Arc<Device>,
    config: ConnectionConfig,
    cq: Arc<CompletionQueue>,
    qp: QueuePair,
    recv_ring: MemoryRegion,
    send_slots: MemoryRegion,
    local: Endpoint,
}

impl std::fmt::Debug for PendingConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingConnection")
            .field("device", &self.device.name())
            .field("local", &self.local)
            .finish()
    }
}

fn random_psn() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(std::process::id().into());
    (hasher.finish() as u32) & 0x00ff_ffff
}

impl PendingConnection {
    /// Creates the QP (moved to INIT), its CQ and rings, and posts every
    /// receive slot.
    pub fn new(device: &Arc<Device>, config: ConnectionConfig) -> Result<PendingConnection> {
        if !(1..=CREDITS_MAX).contains(&config.credits)
            || !(1..=MESSAGE_BYTES_MAX).contains(&config.message_bytes_max)
            || config.one_sided_max == 0
        {
            return Err(RdmaError::Handshake(format!(
                "invalid local configuration: credits {} (1..={CREDITS_MAX}), message bytes max {} \
                 (1..={MESSAGE_BYTES_MAX}), one-sided max {} (at least 1)",
                config.credits, config.message_bytes_max, config.one_sided_max
            )));
        }
        let slot_bytes = (HEADER_BYTES + config.message_bytes_max as usize).next_multiple_of(64);
        let recv_slots = config.credits + CONTROL_SLOTS;
        // Our data send slots: as many as our own credits (the peer's ring
        // may be larger, but what we hold is ours to bound), plus one for
        // credit-only messages.
        let send_slot_count = config.credits + 1;
        let send_wr_max = send_slot_count + config.one_sided_max;
        let cq = CompletionQueue::new(&device.context, send_wr_max + recv_slots)?;
        let qp = QueuePair::new(
            &device.pd,
            &cq,
            QpCaps {
                send_wr_max,
                recv_wr_max: recv_slots,
            },
        )?;
        qp.to_init()?;
        let recv_ring =
            MemoryRegion::alloc(&device.pd, slot_bytes * recv_slots as usize, Access::Local)?;
        let send_slots = MemoryRegion::alloc(
            &device.pd,
            slot_bytes * send_slot_count as usize,
            Access::Local,
        )?;
        for slot in 0..recv_slots {
            // SAFETY: the slot lies inside the ring, which outlives the QP
            // (Shared's field order) and is touched by nobody until the
            // receive completes.
            unsafe { post_recv_slot(&qp, &recv_ring, slot_bytes, slot) }?;
        }
        let local = Endpoint {
            address: QpAddress {
                qp_num: qp.qp_num(),
                psn: random_psn(),
                gid: device.port.gid,
                lid: device.port.lid,
                mtu: device.port.active_mtu,
            },
            credits: config.credits,
            message_bytes_max: config.message_bytes_max,
        };
        Ok(PendingConnection {
            device: device.clone(),
            config,
            cq,
            qp,
            recv_ring,
            send_slots,
            local,
        })
    }

    /// What the peer needs to connect to us.
    pub fn local_endpoint(&self) -> Endpoint {
        self.local
    }

    /// Connects the QP to the peer's and starts the driver (on the current
    /// tokio runtime).
    pub fn connect(self, peer: &Endpoint) -> Result<Connection> {
        let mut address = peer.address;
        // Both sides must use one path MTU: the smaller of the two.
        address.mtu = address.mtu.min(self.local.address.mtu);
        self.qp
            .connect(self.local.address.psn, &address, self.device.gid_index)?;
        // SAFETY: the ChannelFd holds the CQ that owns the descriptor, so it
        // stays open, and the same, for as long as the AsyncFd lives.
        let fd = unsafe {
            AsyncFd::register_with_interest(ChannelFd(self.cq.clone()), Interest::READABLE)
        }
        .map_err(|error| {
            RdmaError::verb(
                "registering the completion channel with tokio",
                error.into_parts().1,
            )
        })?;
        let send_slot_count = self.config.credits + 1;
        let shared = Arc::new(Shared {
            qp: self.qp,
            cq: self.cq,
            recv_ring: self.recv_ring,
            send_slots: self.send_slots,
            slot_bytes: (HEADER_BYTES + self.config.message_bytes_max as usize)
                .next_multiple_of(64),
            device: self.device,
            config: self.config,
            peer: *peer,
            one_sided: Arc::new(Semaphore::new(self.config.one_sided_max as usize)),
            changed: Notify::new(),
            arrived: Notify::new(),
            state: Mutex::new(State {
                credits: Credits::new(self.config.credits, peer.credits),
                // The last slot is the credit-only message's.
                free_send_slots: (0..send_slot_count - 1).collect(),
                pending: HashMap::new(),
                next_wr_id: 0,
                broken: None,
                received: VecDeque::new(),
                data_sent: 0,
                data_taken: 0,
            }),
        });
        let driver = tokio::spawn(drive(Driver {
            fd,
            shared: shared.clone(),
        }));
        Ok(Connection { shared, driver })
    }
}

/// # Safety
/// The slot's memory must stay registered and untouched until the receive
/// completes or the QP is destroyed.
unsafe fn post_recv_slot(
    qp: &QueuePair,
    ring: &MemoryRegion,
    slot_bytes: usize,
    slot: u32,
) -> Result<()> {
    let sge = Sge {
        addr: ring.addr() + (slot as usize * slot_bytes) as u64,
        length: slot_bytes as u32,
        lkey: ring.lkey(),
    };
    // SAFETY: forwarded from the caller.
    unsafe { qp.post_recv(RECV_BIT | u64::from(slot), sge) }
}

/// The completion channel's descriptor, kept open by holding its CQ.
struct ChannelFd(Arc<CompletionQueue>);

impl AsRawFd for ChannelFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.channel_fd()
    }
}

/// A connected RDMA connection (module doc).
pub struct Connection {
    shared: Arc<Shared>,
    driver: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("qp_num", &self.shared.qp.qp_num())
            .field("peer_qp_num", &self.shared.peer.address.qp_num)
            .field("broken", &self.shared.state.lock().broken)
            .finish()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The driver holds the last other reference to the shared state;
        // once it stops, the QP, CQ and rings are destroyed in that order.
        // Callers' futures borrow the connection, so none waits any more.
        self.driver.abort();
    }
}

impl Connection {
    /// Why the connection broke, if it did.
    pub fn broken(&self) -> Option<String> {
        self.shared.state.lock().broken.clone()
    }

    /// How long any posted work request may take to complete.
    pub fn completion_timeout(&self) -> Duration {
        self.shared.config.completion_timeout
    }

    /// The largest payload the peer accepts in one message.
    pub fn peer_message_bytes_max(&self) -> usize {
        self.shared.peer.message_bytes_max as usize
    }

    /// Breaks the connection on purpose (a caller that found it unusable):
    /// everything posted fails with `reason`.
    pub fn break_with(&self, reason: String) {
        self.shared.break_with(reason);
    }

    /// Takes the connection down because its owner is done with it: as
    /// [`break_with`](Self::break_with), but nothing went wrong, so it is
    /// logged at debug level rather than as a warning.
    pub fn close(&self, reason: String) {
        self.shared.go_down(reason, false);
    }

    /// Sends one message, waiting for a credit and a send slot when all are
    /// in use, and for its completion (the peer's receive of it).
    pub async fn send(&self, payload: &[u8]) -> Result<()> {
        let result = self.post_message(payload).await?;
        self.shared.wait(result, "send").await
    }

    /// Sends one message without waiting for its completion: returns once
    /// it is posted (the payload is copied into a send slot, so the caller's
    /// buffer is free at once), so that several messages are in flight, up
    /// to the credits. A failure completion breaks the connection, which
    /// every later call reports; the queue pair's retry limit bounds how
    /// long an unacknowledged message can stay posted.
    pub async fn send_posted(&self, payload: &[u8]) -> Result<()> {
        self.post_message(payload).await.map(drop)
    }

    /// Waits for a credit and a send slot, copies `payload` into the slot
    /// and posts it; the receiver learns the completion.
    async fn post_message(&self, payload: &[u8]) -> Result<oneshot::Receiver<Result<()>>> {
        let shared = &self.shared;
        let max = shared.peer.message_bytes_max as usize;
        if payload.len() > max {
            return Err(RdmaError::MessageTooLarge {
                len: payload.len(),
                max,
            });
        }
        let timeout = shared.config.completion_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let (slot, piggyback) = loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = shared.state.lock();
                if let Some(reason) = &state.broken {
                    return Err(RdmaError::Broken {
                        reason: reason.clone(),
                    });
                }
                if !state.free_send_slots.is_empty()
                    && let Some(piggyback) = state.credits.take_for_send()
                {
                    let slot = state
                        .free_send_slots
                        .pop()
                        .expect("checked non-empty above");
                    break (slot, piggyback);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(RdmaError::CompletionTimeout {
                    operation: "send (waiting for the peer's credits)",
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
        };
        let offset = slot as usize * shared.slot_bytes;
        shared
            .send_slots
            .write(offset, &header(payload.len(), piggyback, KIND_DATA))?;
        shared.send_slots.write(offset + HEADER_BYTES, payload)?;
        let (done, result) = oneshot::channel();
        let sge = Sge {
            addr: shared.send_slots.addr() + offset as u64,
            length: (HEADER_BYTES + payload.len()) as u32,
            lkey: shared.send_slots.lkey(),
        };
        shared.post(SendOp::Send, sge, Pending::Data { slot, done })?;
        shared.state.lock().data_sent += 1;
        SENT_COPIED.fetch_add(payload.len() as u64, Ordering::Relaxed);
        Ok(result)
    }

    /// Takes the next message, waiting for one; earns the peer a credit.
    /// Messages that arrived before the connection broke are still
    /// delivered, then the breakage is reported.
    pub async fn recv(&self) -> Result<Vec<u8>> {
        let shared = &self.shared;
        loop {
            let notified = shared.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = {
                let mut state = shared.state.lock();
                let taken = state.take_received();
                if taken.is_none()
                    && let Some(reason) = &state.broken
                {
                    return Err(RdmaError::Broken {
                        reason: reason.clone(),
                    });
                }
                taken
            };
            if let Some(taken) = taken {
                return Ok(shared.hand_on(taken));
            }
            notified.await;
        }
    }

    /// Data messages posted on this connection so far: what a side that
    /// closes announces to its peer, after [`Connection::drain`], so that
    /// the peer hands on exactly that many before it lets go.
    pub fn data_messages_sent(&self) -> u64 {
        self.shared.state.lock().data_sent
    }

    /// Waits until every data message posted so far has completed, that
    /// is, the peer's device acknowledged it, so it lies in one of the
    /// peer's receive slots and its completion in the peer's completion
    /// queue, where moving either queue pair to the error state no longer
    /// loses it. Bounded by the completion timeout (which then breaks the
    /// connection); fails if the connection broke, since a message
    /// flushed by the break never arrived.
    pub async fn drain(&self) -> Result<()> {
        let shared = &self.shared;
        let timeout = shared.config.completion_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = shared.state.lock();
                if let Some(reason) = &state.broken {
                    return Err(RdmaError::Broken {
                        reason: reason.clone(),
                    });
                }
                // Every data slot back in the free list: no data message
                // is posted and not yet completed.
                if state.free_send_slots.len() == shared.config.credits as usize {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let error = RdmaError::CompletionTimeout {
                    operation: "drain (the last messages sent before closing)",
                    timeout_ms: timeout.as_millis() as u64,
                };
                shared.break_with(error.to_string());
                return Err(error);
            }
        }
    }

    /// Takes the next of the `total` data messages the peer announced it
    /// sent before closing (after its [`Connection::drain`]); `None` once
    /// all `total` were taken. Unlike [`Connection::recv`], a broken
    /// connection does not end the wait: the peer may have torn its queue
    /// pair down already, but each announced message was acknowledged by
    /// our device before the announcement, so it is in our completion
    /// queue and the driver still hands it on. Waits until `deadline` at
    /// most (a peer that announced more than it sent).
    pub async fn recv_announced(
        &self,
        total: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Vec<u8>>> {
        let shared = &self.shared;
        loop {
            let notified = shared.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = {
                let mut state = shared.state.lock();
                if state.data_taken >= total {
                    return Ok(None);
                }
                state.take_received()
            };
            if let Some(taken) = taken {
                return Ok(Some(shared.hand_on(taken)));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let taken = shared.state.lock().data_taken;
                return Err(RdmaError::Announced {
                    announced: total,
                    taken,
                });
            }
        }
    }

    /// Reads `len` bytes of the peer's `remote` buffer into `local` at
    /// `offset` (RDMA READ).
    pub async fn read(
        &self,
        local: &Arc<MemoryRegion>,
        offset: usize,
        remote: RemoteBuffer,
    ) -> Result<()> {
        self.one_sided(&[(local.clone(), offset, remote)], OneSided::Read)
            .await
    }

    /// Writes `local[offset..offset + remote.len]` into the peer's `remote`
    /// buffer (RDMA WRITE).
    pub async fn write(
        &self,
        local: &Arc<MemoryRegion>,
        offset: usize,
        remote: RemoteBuffer,
    ) -> Result<()> {
        self.one_sided(&[(local.clone(), offset, remote)], OneSided::Write)
            .await
    }

    /// Several RDMA READs posted as one chain, one work request per entry
    /// (a batched chunk read); fails with the first failure.
    pub async fn read_batch(
        &self,
        entries: &[(Arc<MemoryRegion>, usize, RemoteBuffer)],
    ) -> Result<()> {
        self.one_sided(entries, OneSided::Read).await
    }

    /// Several RDMA WRITEs posted as one chain.
    pub async fn write_batch(
        &self,
        entries: &[(Arc<MemoryRegion>, usize, RemoteBuffer)],
    ) -> Result<()> {
        self.one_sided(entries, OneSided::Write).await
    }

    async fn one_sided(
        &self,
        entries: &[(Arc<MemoryRegion>, usize, RemoteBuffer)],
        direction: OneSided,
    ) -> Result<()> {
        let shared = &self.shared;
        let operation = match direction {
            OneSided::Read => "RDMA READ",
            OneSided::Write => "RDMA WRITE",
        };
        for (region, offset, remote) in entries {
            region.check(*offset, remote.len as usize)?;
            if !Arc::ptr_eq(region.pd(), &shared.device.pd) {
                return Err(RdmaError::Handshake(format!(
                    "{operation}: the local region is registered on another device or domain"
                )));
            }
        }
        if entries.len() > shared.config.one_sided_max as usize {
            return Err(RdmaError::Handshake(format!(
                "{operation}: a batch of {} exceeds the {} requests a connection keeps in flight",
                entries.len(),
                shared.config.one_sided_max
            )));
        }
        let timeout = shared.config.completion_timeout;
        let permits = tokio::time::timeout(
            timeout,
            shared
                .one_sided
                .clone()
                .acquire_many_owned(entries.len() as u32),
        )
        .await
        .map_err(|_| RdmaError::CompletionTimeout {
            operation: "one-sided request (waiting for a send-queue slot)",
            timeout_ms: timeout.as_millis() as u64,
        })?
        .expect("the semaphore is never closed");
        let mut permits = Some(permits);
        let mut requests = Vec::with_capacity(entries.len());
        let mut waits = Vec::with_capacity(entries.len());
        {
            let mut state = shared.state.lock();
            if let Some(reason) = &state.broken {
                return Err(RdmaError::Broken {
                    reason: reason.clone(),
                });
            }
            for (index, (region, offset, remote)) in entries.iter().enumerate() {
                let wr_id = state.next_wr_id;
                state.next_wr_id += 1;
                let op = match direction {
                    OneSided::Read => SendOp::RdmaRead {
                        remote_addr: remote.addr,
                        rkey: remote.rkey,
                    },
                    OneSided::Write => SendOp::RdmaWrite {
                        remote_addr: remote.addr,
                        rkey: remote.rkey,
                    },
                };
                let sge = Sge {
                    addr: region.addr() + *offset as u64,
                    length: remote.len,
                    lkey: region.lkey(),
                };
                let permit = if index + 1 == entries.len() {
                    permits.take().expect("taken once, for the last entry")
                } else {
                    permits
                        .as_mut()
                        .expect("split before the last entry")
                        .split(1)
                        .expect("one permit per entry")
                };
                let (done, result) = oneshot::channel();
                state.pending.insert(
                    wr_id,
                    Pending::OneSided {
                        operation,
                        done,
                        _region: region.clone(),
                        _permit: permit,
                    },
                );
                requests.push((wr_id, op, sge));
                waits.push(result);
            }
        }
        // SAFETY: every local range was checked to lie in its region, and
        // each region stays alive in the pending table until its request
        // completes or the QP (destroyed before the table) flushes it.
        if let Err(error) = unsafe { shared.qp.post_send(&requests) } {
            let mut state = shared.state.lock();
            for (wr_id, _, _) in &requests {
                state.pending.remove(wr_id);
            }
            drop(state);
            shared.break_with(format!("posting {operation}: {error}"));
            return Err(error);
        }
        let bytes: u64 = entries
            .iter()
            .map(|(_, _, remote)| u64::from(remote.len))
            .sum();
        let mut first_error = None;
        for result in waits {
            if let Err(error) = shared.wait(result, operation).await {
                first_error.get_or_insert(error);
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => {
                match direction {
                    OneSided::Read => ONE_SIDED_READ.fetch_add(bytes, Ordering::Relaxed),
                    OneSided::Write => ONE_SIDED_WRITTEN.fetch_add(bytes, Ordering::Relaxed),
                };
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum OneSided {
    Read,
    Write,
}

fn header(len: usize, credits: u32, kind: u32) -> [u8; HEADER_BYTES] {
    let mut out = [0; HEADER_BYTES];
    out[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    out[4..8].copy_from_slice(&credits.to_le_bytes());
    out[8..12].copy_from_slice(&kind.to_le_bytes());
    out
}

impl Shared {
    fn break_with(&self, reason: String) {
        self.go_down(reason, true);
    }

    /// Moves the queue pair to the error state once, waking every waiter;
    /// `broken` says whether that is news worth a warning.
    fn go_down(&self, reason: String, broken: bool) {
        let first = {
            let mut state = self.state.lock();
            if state.broken.is_none() {
                state.broken = Some(reason.clone());
                true
            } else {
                false
            }
        };
        if first {
            if broken {
                tracing::warn!(qp_num = self.qp.qp_num(), %reason, "RDMA connection broken");
            } else {
                tracing::debug!(qp_num = self.qp.qp_num(), %reason, "RDMA connection closed");
            }
            // Flushes every posted request, so each waiter learns of it.
            if let Err(error) = self.qp.to_error() {
                tracing::warn!(%error, "moving a broken QP to the error state");
            }
            self.changed.notify_waiters();
            self.arrived.notify_waiters();
        }
    }

    /// Posts one send-queue request with its pending entry.
    fn post(&self, op: SendOp, sge: Sge, pending: Pending) -> Result<()> {
        let wr_id = {
            let mut state = self.state.lock();
            let wr_id = state.next_wr_id;
            state.next_wr_id += 1;
            state.pending.insert(wr_id, pending);
            wr_id
        };
        // SAFETY: `sge` names a send slot of this connection, which outlives
        // the QP and is not reused before this request's completion returns
        // it to the free list.
        if let Err(error) = unsafe { self.qp.post_send(&[(wr_id, op, sge)]) } {
            self.state.lock().pending.remove(&wr_id);
            self.break_with(format!("ibv_post_send: {error}"));
            return Err(error);
        }
        Ok(())
    }

    /// Sends a credit-only message returning `credits` to the peer.
    /// Hands on a message [`State::take_received`] took, first posting the
    /// credits its slot freed, if any are due.
    fn hand_on(&self, (message, due): (Vec<u8>, Option<u32>)) -> Vec<u8> {
        if let Some(credits) = due {
            self.post_credits(credits);
        }
        message
    }

    fn post_credits(&self, credits: u32) {
        let slot = self.config.credits;
        let offset = slot as usize * self.slot_bytes;
        if self
            .send_slots
            .write(offset, &header(0, credits, KIND_CREDITS))
            .is_err()
        {
            // The slot count is fixed at construction; cannot be outside.
            return;
        }
        let sge = Sge {
            addr: self.send_slots.addr() + offset as u64,
            length: HEADER_BYTES as u32,
            lkey: self.send_slots.lkey(),
        };
        // A failure breaks the connection, which reports it to every caller.
        let _ = self.post(SendOp::Send, sge, Pending::Credits);
    }

    /// Waits for a posted request's completion, breaking the connection if
    /// it takes longer than the completion timeout.
    async fn wait(
        &self,
        result: oneshot::Receiver<Result<()>>,
        operation: &'static str,
    ) -> Result<()> {
        let timeout = self.config.completion_timeout;
        match tokio::time::timeout(timeout, result).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(RdmaError::Broken {
                reason: "the connection was torn down".into(),
            }),
            Err(_) => {
                let error = RdmaError::CompletionTimeout {
                    operation,
                    timeout_ms: timeout.as_millis() as u64,
                };
                self.break_with(error.to_string());
                Err(error)
            }
        }
    }

    fn completion_error(&self, operation: &'static str, wc: &WorkCompletion) -> RdmaError {
        if wc.status == WC_WR_FLUSH_ERR
            && let Some(reason) = self.state.lock().broken.clone()
        {
            return RdmaError::Broken { reason };
        }
        RdmaError::Completion {
            operation,
            status: wc.status,
            status_text: crate::verbs::status_text(wc.status),
        }
    }

    fn on_completion(&self, wc: &WorkCompletion) {
        if wc.wr_id & RECV_BIT != 0 {
            self.on_receive(wc);
            return;
        }
        let Some(pending) = self.state.lock().pending.remove(&wc.wr_id) else {
            return;
        };
        let outcome = |operation| {
            if wc.is_success() {
                Ok(())
            } else {
                let error = self.completion_error(operation, wc);
                self.break_with(error.to_string());
                Err(error)
            }
        };
        match pending {
            Pending::Data { slot, done } => {
                let result = outcome("send");
                self.state.lock().free_send_slots.push(slot);
                self.changed.notify_waiters();
                let _ = done.send(result);
            }
            Pending::Credits => {
                let ok = outcome("credit return").is_ok();
                let due = self.state.lock().credits.on_control_completed();
                if ok && let Some(credits) = due {
                    self.post_credits(credits);
                }
            }
            Pending::OneSided {
                operation, done, ..
            } => {
                let _ = done.send(outcome(operation));
            }
        }
    }

    fn on_receive(&self, wc: &WorkCompletion) {
        let slot = (wc.wr_id & !RECV_BIT) as u32;
        if !wc.is_success() {
            if wc.status != WC_WR_FLUSH_ERR {
                let error = self.completion_error("receive", wc);
                self.break_with(error.to_string());
            }
            return;
        }
        match self.parse_message(slot, wc.byte_len as usize) {
            Ok((returned, message)) => {
                let violation = {
                    let mut state = self.state.lock();
                    let ok = state.credits.on_returned(returned);
                    if let Some(message) = message {
                        state.received.push_back(message);
                    }
                    !ok
                };
                if violation {
                    self.break_with(format!(
                        "the peer returned {returned} credits, more than it was given"
                    ));
                    return;
                }
                self.changed.notify_waiters();
                self.arrived.notify_waiters();
                // SAFETY: the slot's message was copied out above; it lies in
                // the ring, which outlives the QP.
                let reposted =
                    unsafe { post_recv_slot(&self.qp, &self.recv_ring, self.slot_bytes, slot) };
                if let Err(error) = reposted {
                    self.break_with(format!("reposting a receive: {error}"));
                }
            }
            Err(reason) => self.break_with(reason),
        }
    }

    /// Reads the message in a receive slot: the credits it returns and its
    /// payload (none for a credit-only message).
    fn parse_message(&self, slot: u32, byte_len: usize) -> Result<(u32, Option<Vec<u8>>), String> {
        if byte_len < HEADER_BYTES {
            return Err(format!(
                "the peer sent a {byte_len}-byte message, shorter than a header"
            ));
        }
        let offset = slot as usize * self.slot_bytes;
        let mut header = [0u8; HEADER_BYTES];
        self.recv_ring
            .read(offset, &mut header)
            .map_err(|error| error.to_string())?;
        let field = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let (len, returned, kind) = (field(0) as usize, field(4), field(8));
        if len != byte_len - HEADER_BYTES {
            return Err(format!(
                "the peer's message header says {len} payload bytes, {} arrived",
                byte_len - HEADER_BYTES
            ));
        }
        match kind {
            KIND_DATA => {
                let mut payload = vec![0; len];
                self.recv_ring
                    .read(offset + HEADER_BYTES, &mut payload)
                    .map_err(|error| error.to_string())?;
                RECEIVED_COPIED.fetch_add(len as u64, Ordering::Relaxed);
                Ok((returned, Some(payload)))
            }
            KIND_CREDITS if len == 0 => Ok((returned, None)),
            _ => Err(format!(
                "the peer sent a message of unknown kind {kind} ({len} bytes)"
            )),
        }
    }
}

/// What the driver task owns.
struct Driver {
    fd: AsyncFd<ChannelFd>,
    shared: Arc<Shared>,
}

/// The completion poller: polls while completions keep coming, then arms
/// the CQ and sleeps on its channel until the next one.
async fn drive(driver: Driver) {
    let Driver { ref fd, ref shared } = driver;
    let mut batch = Vec::with_capacity(16);
    let mut idle_polls = 0;
    loop {
        batch.clear();
        match shared.cq.poll(&mut batch, 16) {
            Ok(0) => {}
            Ok(_) => {
                idle_polls = 0;
                for wc in &batch {
                    shared.on_completion(wc);
                }
                continue;
            }
            Err(error) => {
                shared.break_with(format!("polling the completion queue: {error}"));
                return;
            }
        }
        if idle_polls < IDLE_POLLS_BEFORE_SLEEP {
            idle_polls += 1;
            tokio::task::yield_now().await;
            continue;
        }
        idle_polls = 0;
        if let Err(error) = shared.cq.arm() {
            shared.break_with(format!("arming the completion queue: {error}"));
            return;
        }
        // A completion that arrived between the last poll and arming raised
        // no event: poll once more before sleeping.
        batch.clear();
        match shared.cq.poll(&mut batch, 16) {
            Ok(0) => {}
            Ok(_) => {
                for wc in &batch {
                    shared.on_completion(wc);
                }
                continue;
            }
            Err(error) => {
                shared.break_with(format!("polling the completion queue: {error}"));
                return;
            }
        }
        match fd.readable().await {
            Ok(mut guard) => {
                if let Err(error) = shared.cq.take_events() {
                    shared.break_with(format!("reading the completion channel: {error}"));
                    return;
                }
                guard.clear_ready();
            }
            Err(error) => {
                shared.break_with(format!("waiting on the completion channel: {error}"));
                return;
            }
        }
    }
}
