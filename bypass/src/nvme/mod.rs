//! The userspace NVMe backend: [`NvmeDevice`] serves the [`BlockDevice`]
//! contract from an NVMe controller handed to userspace through VFIO,
//! SPDK's method without SPDK: the controller's registers mapped into the
//! process, queue pairs in our own memory, DMA through the IOMMU, and
//! completions found by polling instead of interrupts.
//!
//! This module owns the device's public face (open, configuration, stats,
//! the `BlockDevice` futures); `vfio.rs` the kernel interface,
//! `controller.rs` the registers and the initialisation sequence,
//! `reactor.rs` the threads that own the I/O queue pairs, `layout.rs` the
//! pure arithmetic (PRPs, splitting, ring indices, IOVA allocation) and
//! `status.rs` the completion statuses. docs/nvme-vfio.md is the design.
//!
//! # Threads
//!
//! A device runs `NvmeConfig::queue_pairs` reactor threads
//! (`flyfs-nvme-<n>.<q>`), each owning one I/O submission and completion
//! queue pair, as SPDK gives each reactor core its own queue pair: the hot
//! path shares no ring and takes only its own lane's uncontended lock.
//! Submitters, on any thread and under any executor, push a request onto
//! the lock-free queue of the reactor their thread is assigned to (threads
//! are dealt out round-robin, so a thread keeps to one queue pair) and wake
//! it if it sleeps; the
//! reactor splits each request into commands (at the controller's maximum
//! transfer size), writes them into its submission queue, rings the
//! doorbell once per batch, polls its completion queue by the phase tag,
//! and hands buffers back. It spins briefly while commands are in flight
//! and parks when none are, so an idle device costs no CPU.
//!
//! The reactor's state sits behind its lane's lock, held by one thread at a
//! time, so that, with `NvmeConfig::poll_budget_us` set (1 ms by default),
//! a lone I/O needs no other thread: a submitter that finds
//! its queue pair empty, after a busy period that never held more than one
//! request (`Lane::deep`), and gets the lock (`try_lock`) writes its own
//! commands and rings the doorbell, and its future, each time the executor
//! polls it, reaps the completion queue itself and yields, for up to
//! `NvmeConfig::poll_budget_us`; only then does it leave the command to the
//! reactor thread. Requests that find a queue building go to the reactor,
//! whose thread then issues and reaps beside the executor's. While the lone
//! request is the pair's only work and its future polls, the reactor naps
//! instead of spinning, waking only for timeouts and health checks
//! (`Lane::pollers`); once a second request joins, it polls as before. The
//! admin
//! queue and the controller's registers beyond the doorbells sit behind one
//! lock that only the cold paths take (aborts, health checks, failure,
//! shutdown).
//!
//! [`NvmeDevice::spawn`] runs a task on a reactor thread itself, SPDK's
//! run-to-completion model: the reactor runs its ready tasks between turns,
//! without its lane's lock; a task's I/O goes onto its own lane's queue with
//! no wake-up, the reactor's next turn issues it, and the completion wakes
//! the task onto the same thread's run queue. Many requests from one
//! executor (a depth-64 reader) then cost no thread crossing at all.

mod controller;
mod layout;
mod reactor;
mod status;
#[cfg(feature = "testing")]
pub mod testing;
mod vfio;

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Mutex as StdMutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use async_task::Runnable;
use crossbeam_queue::SegQueue;
use parking_lot::Mutex;

pub use self::controller::NvmeIdentity;
pub use self::status::NvmeStatus;
use crate::Task;
use crate::{BlockDevice, BufferPool, DeviceError, DmaBuf, Geometry, IoCompletion, IoOp};

/// The prefix of a device name that selects this backend: `vfio:0000:00:04.0`.
pub const NAME_PREFIX: &str = "vfio:";

/// How to drive an [`NvmeDevice`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeConfig {
    /// The namespace to serve (1 is the first).
    pub namespace_id: u32,
    /// Most commands in flight at once per queue pair (each I/O submission
    /// queue holds one more entry); capped by the controller's CAP.MQES.
    /// 1 to 4095.
    pub queue_depth: u32,
    /// I/O queue pairs, each with its own reactor thread; submitting threads
    /// are spread over them. The controller may grant fewer (Set Features,
    /// Number of Queues): then the device runs with what it granted and
    /// logs a warning, and [`NvmeDevice::queue_pairs`] says how many. 1 to 64.
    pub queue_pairs: u16,
    /// How long a command may take before the driver asks the controller to
    /// abort it; if it is still not complete after as long again, the
    /// controller is disabled and the device fails for good. Generous by
    /// default because an emulated controller under load is slow.
    pub command_timeout_ms: u64,
    /// How long the reactor busy-polls the completion queue after its last
    /// piece of work while commands are in flight, before it naps between
    /// polls.
    pub poll_spin_us: u32,
    /// How long a lone I/O's future (one submitted while its queue pair
    /// held nothing), each time its executor polls it, may reap the
    /// completion queue itself (yielding between polls, so the executor's
    /// other tasks keep adding to the queue) before it leaves its command to
    /// the reactor thread and waits to be woken; its submitter also writes
    /// the command and rings the doorbell itself. A lone I/O then costs no
    /// hand-off between threads (two wake-ups, most
    /// of a depth-1 I/O's latency); the price is that the executor's thread
    /// spins for up to this long per I/O when it has nothing else to run.
    /// 1000 by default: in the emulated guest (BENCHMARKS.md, the NVMe
    /// section, the run at 56e9c77) it raised depth-1 4 KiB reads and
    /// writes 7.5x over zero, with the other rows between 0.90x (the
    /// engine's committed 4 KiB writes) and 1.13x. Zero hands every request
    /// to the reactor thread (the path before version 4 of
    /// docs/nvme-vfio.md).
    pub poll_budget_us: u32,
    /// Size of each queue pair's bounce region, through which buffers that
    /// are not in the buffer pool's mapped arena move (at least 2 MiB, the
    /// largest single command).
    pub bounce_bytes: usize,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        NvmeConfig {
            namespace_id: 1,
            queue_depth: 128,
            queue_pairs: 2,
            command_timeout_ms: 30_000,
            poll_spin_us: 50,
            poll_budget_us: 1000,
            bounce_bytes: 4 << 20,
        }
    }
}

/// Counters of the reactor's work, for tuning and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeStats {
    /// Requests (reads, writes, flushes, discards) the reactor took.
    pub submitted: u64,
    /// Requests finished, successfully or not.
    pub completed: u64,
    /// NVMe commands submitted (a request is split at the maximum transfer).
    pub commands: u64,
    /// Submission doorbell writes (one per batch of commands).
    pub doorbells: u64,
    /// Commands whose data went through the bounce region because their
    /// buffer was not in a mapped arena.
    pub bounced: u64,
    /// Commands that passed their timeout.
    pub timeouts: u64,
    /// Abort commands sent.
    pub aborts: u64,
    /// Times the reactor parked with nothing in flight.
    pub sleeps: u64,
    /// Submitters (or futures handing over) that woke a parked reactor.
    pub wakeups: u64,
    /// Requests whose submitter wrote the commands and rang the doorbell
    /// itself, without the reactor thread.
    pub direct: u64,
    /// Completions that a waiting future reaped on its executor's thread.
    pub reaped_by_futures: u64,
    /// Completions that a reactor thread reaped.
    pub reaped_by_reactors: u64,
    /// Futures that left their commands to the reactor thread before their
    /// outcome came: their polling budget ended, or a second request
    /// joined theirs on the queue pair.
    pub handovers: u64,
    /// Most commands one queue pair held in flight at once: how deep the
    /// submitters' queue got.
    pub in_flight_max: u64,
    /// Writes an injected power cut tore (kept some but not all of their
    /// sectors); test builds only.
    pub torn_writes: u64,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    completed: AtomicU64,
    commands: AtomicU64,
    doorbells: AtomicU64,
    bounced: AtomicU64,
    timeouts: AtomicU64,
    aborts: AtomicU64,
    sleeps: AtomicU64,
    wakeups: AtomicU64,
    direct: AtomicU64,
    reaped_by_futures: AtomicU64,
    reaped_by_reactors: AtomicU64,
    handovers: AtomicU64,
    in_flight_max: AtomicU64,
    torn_writes: AtomicU64,
}

/// One read, write, flush or discard on its way to the reactor.
struct Request {
    op: IoOp,
    offset: u64,
    len: u64,
    /// Address of the buffer's window, taken by the submitter (where a read
    /// into a read-only buffer panics, on the caller's thread).
    addr: usize,
    buf: Option<DmaBuf>,
    reply: Arc<Reply>,
}

/// Where the reactor leaves a request's outcome for its future.
#[derive(Default)]
struct Reply(StdMutex<ReplyState>);

#[derive(Default)]
struct ReplyState {
    outcome: Option<(Option<DmaBuf>, Result<(), DeviceError>)>,
    waker: Option<Waker>,
}

impl Reply {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReplyState> {
        // A panic while holding this lock cannot leave the state torn (it
        // holds two options), so a poisoned lock is used as it is.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the outcome and wakes the future, if it still waits. If the
    /// future was dropped, the buffer is dropped with the last reference.
    fn finish(&self, buf: Option<DmaBuf>, result: Result<(), DeviceError>) {
        let waker = {
            let mut state = self.lock();
            state.outcome = Some((buf, result));
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The most completions a waiting future consumes in one poll, so that
/// one poll's work stays bounded (the reactor reaps all it finds).
const FUTURE_REAP_BATCH: usize = 32;

/// A request's future. While `polling`, it holds one of its lane's
/// `pollers` counts and reaps completions itself each time it is polled;
/// after its budget (or when dropped) it gives the count back and, if
/// commands are still in flight, makes sure the reactor thread is awake to
/// own them. A dropped future never frees a buffer: the buffer stays in the
/// reactor's request table until its command completes (or the controller
/// is provably stopped), and is dropped with the reply after that.
struct ReplyFuture<'a> {
    reply: Arc<Reply>,
    shared: &'a Shared,
    lane: &'a Lane,
    polling: bool,
    /// When the budget for reaping on the executor's thread ends.
    deadline: Instant,
}

impl ReplyFuture<'_> {
    /// Gives back this future's `pollers` count; if that leaves commands
    /// with nobody polling, wakes the reactor should it be parked.
    fn stop_polling(&mut self) {
        if !self.polling {
            return;
        }
        self.polling = false;
        // Pairs with the reactor's park checks (`reactor::run`): either it
        // sees the count drop, or we see it parked and wake it.
        self.lane.pollers.fetch_sub(1, Ordering::SeqCst);
        if self.lane.outstanding.load(Ordering::SeqCst) > 0 {
            self.shared.notify(self.lane);
        }
    }
}

impl Future for ReplyFuture<'_> {
    type Output = (Option<DmaBuf>, Result<(), DeviceError>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.polling {
            // (The reply's lock is never held while the lane's is taken:
            // reaping finishes replies, this one's included.)
            let outcome = this.reply.lock().outcome.take();
            if let Some(outcome) = outcome {
                this.stop_polling();
                return Poll::Ready(outcome);
            }
            // A second request joined the lone one: the reactor polls
            // for the queue now (`Reactor::only_lone_io`), and this future
            // reaping beside it would only fight it for the lane's lock.
            let joined =
                this.lane.requests.load(Ordering::SeqCst) > 1 || !this.lane.submissions.is_empty();
            if !joined && Instant::now() < this.deadline {
                // Reap on this thread if nobody else holds the queue pair
                // (its reactor mid-turn, another thread reaping).
                if let Some(mut core) = this.lane.core.try_lock()
                    && let Some(reactor) = core.as_mut()
                {
                    reactor.reap_for_future(FUTURE_REAP_BATCH);
                }
                let outcome = this.reply.lock().outcome.take();
                if let Some(outcome) = outcome {
                    this.stop_polling();
                    return Poll::Ready(outcome);
                }
                // Yield, so that the executor's other tasks run (and add
                // their I/Os to the queue) before we look again.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            this.shared
                .counters
                .handovers
                .fetch_add(1, Ordering::Relaxed);
            this.stop_polling();
        }
        let mut state = this.reply.lock();
        if let Some(outcome) = state.outcome.take() {
            return Poll::Ready(outcome);
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            waker => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for ReplyFuture<'_> {
    fn drop(&mut self) {
        // Cancelled mid-poll: its commands (and buffer) stay with the
        // queue pair, and the reactor must be awake to see them through.
        self.stop_polling();
    }
}

/// One reactor's inbox: where submitters leave requests for its queue pair.
struct Lane {
    /// The queue pair's reactor, locked by its thread for a turn at a time,
    /// by a submitter issuing its own commands and by a waiting future
    /// reaping completions (each only with `try_lock`); `None` once the
    /// reactor has stopped.
    core: Mutex<Option<reactor::Reactor>>,
    submissions: SegQueue<Request>,
    /// The reactor is (about to be) parked and needs an unpark to notice
    /// new submissions.
    sleeping: AtomicBool,
    reactor: OnceLock<Thread>,
    /// NVMe commands this lane's queue pair carried.
    commands: AtomicU64,
    /// Futures of this lane's requests that still reap completions
    /// themselves (within their budget). While one is and its request is
    /// the queue pair's only work, the reactor naps between turns instead
    /// of polling (`Reactor::only_lone_io`).
    pollers: AtomicUsize,
    /// Commands in flight plus requests not yet turned into commands, as
    /// the last holder of `core` left them.
    outstanding: AtomicUsize,
    /// Requests in the queue pair's table (issued or not), as the last
    /// holder of `core` left them: more than one, and a polling future is
    /// no longer a lone I/O's.
    requests: AtomicUsize,
    /// The queue pair's last busy period (from leaving idle to idle again)
    /// held more than one request at once: its submitters keep a queue,
    /// and the next request to find the pair empty is most likely the
    /// first of a burst (an executor resubmitting after a batch of
    /// completions), not a lone I/O, so it goes to the reactor.
    deep: AtomicBool,
    /// Tasks ready to run on the reactor thread (`NvmeDevice::spawn`).
    tasks: SegQueue<Runnable>,
    /// The reactor thread has exited: a task scheduled now is cancelled.
    tasks_closed: AtomicBool,
}

impl Lane {
    fn new() -> Lane {
        Lane {
            core: Mutex::new(None),
            submissions: SegQueue::new(),
            sleeping: AtomicBool::new(false),
            reactor: OnceLock::new(),
            commands: AtomicU64::new(0),
            pollers: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            deep: AtomicBool::new(false),
            tasks: SegQueue::new(),
            tasks_closed: AtomicBool::new(false),
        }
    }

    /// Cancels the tasks waiting to run (their futures are dropped here).
    fn cancel_tasks(&self) {
        while let Some(runnable) = self.tasks.pop() {
            drop(runnable);
        }
    }

    fn unpark(&self) {
        if let Some(thread) = self.reactor.get() {
            thread.unpark();
        }
    }
}

/// How far a failure of the device got in stopping the controller's DMA,
/// which decides whether buffers of commands in flight may be handed back.
const DMA_RUNNING: u8 = 0;
const DMA_STOPPED: u8 = 1;
const DMA_UNKNOWN: u8 = 2;

/// What submitters and the reactors share.
struct Shared {
    name: Arc<str>,
    geometry: Geometry,
    identity: NvmeIdentity,
    /// One per reactor (queue pair).
    lanes: Box<[Lane]>,
    /// How long a request's future reaps completions itself before it
    /// leaves the rest to the reactor (`NvmeConfig::poll_budget_us`); zero
    /// hands every request over.
    poll_budget: Duration,
    /// No new request is accepted; the reactors exit once `active` is zero.
    closed: AtomicBool,
    /// Requests a submitter has committed to queue whose outcome no
    /// reactor has delivered yet.
    active: AtomicUsize,
    failure: Mutex<Option<Arc<str>>>,
    /// Set (to `DMA_STOPPED` or `DMA_UNKNOWN`) by the reactor that failed
    /// the device, after it tried to stop the controller's DMA; the other
    /// reactors then fail their own requests accordingly.
    failed_dma: AtomicU8,
    counters: Counters,
    /// Test hook: the reactor writes commands but does not ring the
    /// doorbell, so they time out.
    stall_doorbells: AtomicBool,
    /// Test hook: the reactor clears CC.EN at its next turn, as a reset by
    /// someone else would.
    reset_requested: AtomicBool,
    /// Test hook: the power cut the device injects itself.
    #[cfg(feature = "testing")]
    power: Mutex<PowerCut>,
    /// The lane the next spawned task goes to (round-robin).
    next_task_lane: AtomicUsize,
}

thread_local! {
    /// On a reactor thread: its device's `Shared` (by address) and its lane.
    static REACTOR_THREAD: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
}

/// An injected power cut: from the `at`-th I/O on, every I/O fails, and
/// each write first keeps a random prefix of its sectors (none, some or
/// all), which the emulated controller, which never tears, cannot do.
#[cfg(feature = "testing")]
#[derive(Default)]
struct PowerCut {
    ios: u64,
    at: Option<u64>,
    rng: Option<rand_chacha::ChaCha8Rng>,
}

impl Shared {
    fn closed_error(&self) -> DeviceError {
        match self.failure.lock().clone() {
            Some(reason) => DeviceError::Failed {
                device: Arc::clone(&self.name),
                reason,
            },
            None => DeviceError::Closed {
                device: Arc::clone(&self.name),
            },
        }
    }

    fn notify(&self, lane: &Lane) {
        // Pairs with the fence in the reactor's park path: either it sees
        // our push after raising `sleeping`, or we see `sleeping` here.
        fence(Ordering::SeqCst);
        if lane.sleeping.load(Ordering::Relaxed) && lane.sleeping.swap(false, Ordering::Relaxed) {
            self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
            lane.unpark();
        }
    }

    /// Wakes every reactor (close, failure, test hooks).
    fn unpark(&self) {
        for lane in &self.lanes {
            lane.unpark();
        }
    }

    /// Marks the calling thread as the reactor of lane `index`.
    fn enter_reactor(&self, index: usize) {
        REACTOR_THREAD.with(|slot| slot.set(Some((self as *const Shared as usize, index))));
    }

    /// The lane whose reactor the calling thread is, if it is one of this
    /// device's.
    fn own_lane(&self) -> Option<usize> {
        let (shared, index) = REACTOR_THREAD.with(Cell::get)?;
        (shared == self as *const Shared as usize).then_some(index)
    }

    /// Queues a task's `runnable` on lane `index`, waking its reactor if it
    /// sleeps; cancels it if that reactor has exited.
    fn schedule(&self, index: usize, runnable: Runnable) {
        let lane = &self.lanes[index];
        if lane.tasks_closed.load(Ordering::SeqCst) {
            drop(runnable);
            return;
        }
        lane.tasks.push(runnable);
        if lane.tasks_closed.load(Ordering::SeqCst) {
            // The reactor exited between the check and the push, and may
            // have drained the queue before it: cancel what is left.
            lane.cancel_tasks();
            return;
        }
        if self.own_lane() != Some(index) {
            self.notify(lane);
        }
    }

    /// The lane of the calling thread (`own`: [`own_lane`](Self::own_lane)'s
    /// answer): its own on a reactor thread; other
    /// threads are dealt out round-robin at their first I/O, so a thread
    /// keeps to one queue pair (its requests stay in one ring, and two
    /// threads rarely share one).
    fn lane(&self, own: Option<usize>) -> &Lane {
        if let Some(index) = own {
            return &self.lanes[index];
        }
        static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static THREAD_SLOT: usize = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
        }
        let slot = THREAD_SLOT.with(|slot| *slot);
        &self.lanes[slot % self.lanes.len()]
    }

    async fn submit(
        &self,
        op: IoOp,
        offset: u64,
        len: u64,
        addr: usize,
        buf: Option<DmaBuf>,
    ) -> (Option<DmaBuf>, Result<(), DeviceError>) {
        // Handshake with the reactor's exit check, as in the uring backend:
        // announce first, then look at `closed`.
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.active.fetch_sub(1, Ordering::SeqCst);
            self.unpark();
            return (buf, Err(self.closed_error()));
        }
        let reply = Arc::new(Reply::default());
        let own = self.own_lane();
        let lane = self.lane(own);
        let request = Request {
            op,
            offset,
            len,
            addr,
            buf,
            reply: Arc::clone(&reply),
        };
        let polling = if own.is_some() {
            // A task on the lane's reactor thread: the reactor's next turn,
            // right after this task yields, issues it; no wake-up needed.
            lane.submissions.push(request);
            false
        } else {
            match self.issue_direct(lane, request) {
                Ok(()) => true,
                Err(request) => {
                    lane.submissions.push(request);
                    self.notify(lane);
                    false
                }
            }
        };
        ReplyFuture {
            reply,
            shared: self,
            lane,
            polling,
            deadline: Instant::now() + self.poll_budget,
        }
        .await
    }

    /// Writes `request`'s commands into its queue pair and rings the
    /// doorbell on this thread, if it is a lone I/O (the pair holds nothing
    /// and nothing waits for it), no other thread holds the pair and the
    /// device is healthy; the request's future then counts as one of the
    /// lane's pollers. Hands the request back otherwise, for the reactor:
    /// with a queue already building, the reactor thread issuing and
    /// reaping beside the executor's thread is worth more than the wake-ups
    /// it costs (docs/nvme-vfio.md, "Lone I/Os without a thread hand-off").
    fn issue_direct(&self, lane: &Lane, request: Request) -> Result<(), Request> {
        // Not a lone I/O (commands in flight, requests waiting): checked
        // before the lock too, so that a building queue's submitters leave
        // the lock to the reactor thread polling it.
        if self.poll_budget.is_zero()
            || lane.deep.load(Ordering::Relaxed)
            || !lane.submissions.is_empty()
            || lane.outstanding.load(Ordering::SeqCst) > 0
        {
            return Err(request);
        }
        let Some(mut core) = lane.core.try_lock() else {
            return Err(request);
        };
        let Some(reactor) = core
            .as_mut()
            .filter(|reactor| reactor.is_healthy() && reactor.is_idle())
        else {
            return Err(request);
        };
        // Counted before its commands are, so that nobody sees them in
        // flight with no poller and no reactor awake.
        lane.pollers.fetch_add(1, Ordering::SeqCst);
        self.counters.direct.fetch_add(1, Ordering::Relaxed);
        reactor.issue_direct(request);
        Ok(())
    }
}

/// An NVMe namespace driven from userspace. Cloning is cheap and shares the
/// device; the reactor stops, and the controller is shut down, when the last
/// clone is dropped (or at [`shutdown`](NvmeDevice::shutdown)).
#[derive(Clone)]
pub struct NvmeDevice {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    reactors: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for NvmeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NvmeDevice")
            .field("name", &self.inner.shared.name)
            .field("geometry", &self.inner.shared.geometry)
            .field("identity", &self.inner.shared.identity)
            .finish()
    }
}

impl NvmeDevice {
    /// Opens the NVMe controller at PCI address `address` (bound to
    /// vfio-pci), resets and enables it, identifies the namespace and
    /// starts the reactor. If `pool` is given, its arena is mapped into the
    /// IOMMU once and buffers from it move without copying; other buffers go
    /// through a bounce region.
    ///
    /// Fails with [`DeviceError::Open`] naming the problem: a malformed
    /// address, no such PCI device, not an NVMe controller, not bound to
    /// vfio-pci, an IOMMU group that is not viable, missing `/dev/vfio`, a
    /// controller that does not come ready, an unusable namespace.
    pub fn open(
        address: &str,
        config: &NvmeConfig,
        pool: Option<&BufferPool>,
    ) -> Result<NvmeDevice, DeviceError> {
        let name = format!("{NAME_PREFIX}{address}");
        let open_error = |reason: String, source: Option<std::io::Error>| DeviceError::Open {
            path: name.clone(),
            reason,
            source,
        };
        if !(1..=64).contains(&config.queue_pairs) {
            return Err(open_error(
                format!(
                    "{} queue pairs asked for; between 1 and 64 are supported",
                    config.queue_pairs
                ),
                None,
            ));
        }
        if !(1..=4095).contains(&config.queue_depth) {
            return Err(open_error(
                format!(
                    "queue depth {} is not between 1 and 4095",
                    config.queue_depth
                ),
                None,
            ));
        }
        if config.bounce_bytes < layout::transfer_bytes_max(0) as usize {
            return Err(open_error(
                format!(
                    "bounce region of {} bytes is smaller than one command's maximum transfer ({} bytes)",
                    config.bounce_bytes,
                    layout::transfer_bytes_max(0)
                ),
                None,
            ));
        }
        if config.command_timeout_ms == 0 {
            return Err(open_error("command timeout must be positive".into(), None));
        }
        let address = vfio::normalize_pci_address(address)
            .map_err(|failure| open_error(failure.reason, failure.source))?;
        let name: Arc<str> = format!("{NAME_PREFIX}{address}").into();
        let started = reactor::start(&address, Arc::clone(&name), config, pool)
            .map_err(|failure| open_error(failure.reason, failure.source))?;
        let shared = started.shared;
        tracing::info!(
            device = %shared.name,
            model = %shared.identity.model,
            serial = %shared.identity.serial,
            sector_size = shared.geometry.sector_size,
            capacity_bytes = shared.geometry.capacity_bytes,
            volatile_write_cache = shared.identity.volatile_write_cache,
            mdts = shared.identity.mdts,
            queue_pairs = shared.lanes.len(),
            "NVMe device open"
        );
        Ok(NvmeDevice {
            inner: Arc::new(Inner {
                shared,
                reactors: Mutex::new(started.handles),
            }),
        })
    }

    /// The I/O queue pairs (and reactor threads) the device runs: what the
    /// configuration asked for, or fewer if the controller granted fewer.
    pub fn queue_pairs(&self) -> usize {
        self.inner.shared.lanes.len()
    }

    /// What Identify reported.
    pub fn identity(&self) -> &NvmeIdentity {
        &self.inner.shared.identity
    }

    /// NVMe commands each I/O queue pair carried so far, by queue id - 1.
    pub fn commands_per_queue_pair(&self) -> Vec<u64> {
        self.inner
            .shared
            .lanes
            .iter()
            .map(|lane| lane.commands.load(Ordering::Relaxed))
            .collect()
    }

    /// The reactors' counters so far.
    pub fn stats(&self) -> NvmeStats {
        let counters = &self.inner.shared.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        NvmeStats {
            submitted: load(&counters.submitted),
            completed: load(&counters.completed),
            commands: load(&counters.commands),
            doorbells: load(&counters.doorbells),
            bounced: load(&counters.bounced),
            timeouts: load(&counters.timeouts),
            aborts: load(&counters.aborts),
            sleeps: load(&counters.sleeps),
            wakeups: load(&counters.wakeups),
            direct: load(&counters.direct),
            reaped_by_futures: load(&counters.reaped_by_futures),
            reaped_by_reactors: load(&counters.reaped_by_reactors),
            handovers: load(&counters.handovers),
            in_flight_max: load(&counters.in_flight_max),
            torn_writes: load(&counters.torn_writes),
        }
    }

    /// Stops the device for every clone: requests in flight complete, the
    /// controller is shut down (CC.SHN) and disabled, the IOMMU mappings are
    /// removed, and later operations fail with [`DeviceError::Closed`].
    /// Dropping the last clone does the same.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Runs `future` on one of the device's reactor threads (round-robin
    /// over the queue pairs), SPDK's run-to-completion model: the I/O the
    /// task issues joins its queue pair without waking any thread, and its
    /// completion wakes the task on the same thread. Use it for work that
    /// mostly waits on this device (a deep queue of small reads); a task
    /// that computes for long delays every other I/O of its queue pair.
    ///
    /// The returned [`Task`] is a future of the output, awaitable from any
    /// thread or runtime; dropping it cancels the task (`detach` keeps it
    /// running). A panic in the task is raised where the `Task` is awaited,
    /// never on the reactor. Once the device has shut down, tasks ready to
    /// run are cancelled, and so is any task woken or spawned after (its
    /// `Task` resolves as cancelled); a task waiting on something that never
    /// wakes it stays pending until its `Task` is dropped.
    pub fn spawn<F>(&self, future: F) -> Task<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let shared = Arc::clone(&self.inner.shared);
        let index = shared.next_task_lane.fetch_add(1, Ordering::Relaxed) % shared.lanes.len();
        crate::spawn_task(future, move |runnable| shared.schedule(index, runnable))
    }

    /// Test hook: commands are written into the submission queue but the
    /// doorbell is not rung, so they time out, get aborted, and finally the
    /// controller is disabled and the device fails.
    #[cfg(feature = "testing")]
    pub fn inject_doorbell_stall(&self) {
        self.inner
            .shared
            .stall_doorbells
            .store(true, Ordering::SeqCst);
        self.inner.shared.unpark();
    }

    /// Test hook: a power cut `after_ios` I/Os from now. From then on every
    /// read, write, flush and discard fails with an I/O error (EIO), as it
    /// would if the power were gone, and each write first persists a prefix
    /// of its sectors chosen by `seed` (none, some, or all of them): a torn
    /// write, which the emulated controller never produces by itself. The
    /// writes it tears count in [`NvmeStats::torn_writes`].
    /// [`restore_power`](NvmeDevice::restore_power) ends it.
    #[cfg(feature = "testing")]
    pub fn inject_power_cut(&self, after_ios: u64, seed: u64) {
        use rand::SeedableRng;
        let mut power = self.inner.shared.power.lock();
        power.at = Some(power.ios + after_ios);
        power.rng = Some(rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    }

    /// Test hook: ends an injected power cut; I/O works again.
    #[cfg(feature = "testing")]
    pub fn restore_power(&self) {
        let mut power = self.inner.shared.power.lock();
        power.at = None;
        power.rng = None;
    }

    /// Under an injected power cut: the bytes of this I/O to persist before
    /// it fails (a prefix of a write's sectors; 0 for anything else).
    /// `None`: the power is on.
    #[cfg(feature = "testing")]
    fn power_cut(&self, op: IoOp, len: u64) -> Option<u64> {
        use rand::Rng;
        let shared = &*self.inner.shared;
        let mut power = shared.power.lock();
        let number = power.ios;
        power.ios += 1;
        let at = power.at?;
        if number < at {
            return None;
        }
        if op != IoOp::Write {
            return Some(0);
        }
        let sector = u64::from(shared.geometry.sector_size);
        let sectors = len / sector;
        let rng = power.rng.as_mut().expect("an armed power cut has its rng");
        let kept = rng.random_range(0..=sectors);
        if kept > 0 && kept < sectors {
            shared.counters.torn_writes.fetch_add(1, Ordering::Relaxed);
        }
        Some(kept * sector)
    }

    #[cfg(feature = "testing")]
    fn power_cut_error(&self, op: IoOp, offset: u64, len: u64) -> DeviceError {
        DeviceError::Io {
            device: Arc::clone(&self.inner.shared.name),
            op,
            offset,
            len,
            source: std::io::Error::from_raw_os_error(libc::EIO),
        }
    }

    /// Test hook: the controller is reset (CC.EN cleared) under the
    /// reactor's feet, as by another agent; commands in flight are lost and
    /// the reactor must notice and fail the device.
    #[cfg(feature = "testing")]
    pub fn inject_controller_reset(&self) {
        self.inner
            .shared
            .reset_requested
            .store(true, Ordering::SeqCst);
        self.inner.shared.unpark();
    }

    async fn read_write(&self, op: IoOp, offset: u64, mut buf: DmaBuf) -> IoCompletion {
        let shared = &*self.inner.shared;
        let len = buf.len() as u64;
        if let Err(error) = shared
            .geometry
            .check(op, offset, len, buf.window_ptr() as usize)
        {
            return IoCompletion {
                buf,
                result: Err(error),
            };
        }
        if shared.closed.load(Ordering::Relaxed) {
            return IoCompletion {
                buf,
                result: Err(shared.closed_error()),
            };
        }
        if len == 0 {
            return IoCompletion {
                buf,
                result: Ok(()),
            };
        }
        let addr = match op {
            IoOp::Read => buf.window_mut_ptr() as usize,
            _ => buf.window_ptr() as usize,
        };
        #[cfg(feature = "testing")]
        if let Some(kept) = self.power_cut(op, len) {
            let buf = if kept > 0 {
                // The torn part reaches the medium; whether it did is not
                // the caller's business, the power is gone either way.
                let (buf, _) = shared.submit(op, offset, kept, addr, Some(buf)).await;
                buf.expect("the reactor hands every write buffer back")
            } else {
                buf
            };
            return IoCompletion {
                buf,
                result: Err(self.power_cut_error(op, offset, len)),
            };
        }
        let (buf, result) = shared.submit(op, offset, len, addr, Some(buf)).await;
        IoCompletion {
            buf: buf.expect("the reactor hands every read and write buffer back"),
            result,
        }
    }
}

impl Inner {
    fn shutdown(&self) {
        let shared = &self.shared;
        shared.closed.store(true, Ordering::SeqCst);
        shared.unpark();
        let handles = std::mem::take(&mut *self.reactors.lock());
        let current = std::thread::current().id();
        if handles.iter().any(|handle| handle.thread().id() == current) {
            // Dropped on a reactor thread (by a task, or a waker it ran):
            // joining the others could wait on this reactor's own requests.
            // Every reactor sees `closed`, and the last one out shuts the
            // controller down.
            return;
        }
        for handle in handles {
            if handle.join().is_err() {
                tracing::error!(device = %shared.name, "an NVMe reactor thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl BlockDevice for NvmeDevice {
    fn geometry(&self) -> Geometry {
        self.inner.shared.geometry
    }

    fn name(&self) -> &str {
        &self.inner.shared.name
    }

    fn failure(&self) -> Option<Arc<str>> {
        self.inner.shared.failure.lock().clone()
    }

    async fn read(&self, offset: u64, buf: DmaBuf) -> IoCompletion {
        self.read_write(IoOp::Read, offset, buf).await
    }

    async fn write(&self, offset: u64, buf: DmaBuf) -> IoCompletion {
        self.read_write(IoOp::Write, offset, buf).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        let shared = &*self.inner.shared;
        if shared.closed.load(Ordering::Relaxed) {
            return Err(shared.closed_error());
        }
        #[cfg(feature = "testing")]
        if self.power_cut(IoOp::Flush, 0).is_some() {
            return Err(self.power_cut_error(IoOp::Flush, 0, 0));
        }
        // Without a volatile write cache every completed write is already
        // durable, so the barrier holds with no command; the reactor still
        // answers, so that a failed device says so.
        shared.submit(IoOp::Flush, 0, 0, 0, None).await.1
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let shared = &*self.inner.shared;
        shared.geometry.check(IoOp::Discard, offset, len, 0)?;
        if shared.closed.load(Ordering::Relaxed) {
            return Err(shared.closed_error());
        }
        if len == 0 {
            return Ok(());
        }
        #[cfg(feature = "testing")]
        if self.power_cut(IoOp::Discard, len).is_some() {
            return Err(self.power_cut_error(IoOp::Discard, offset, len));
        }
        shared.submit(IoOp::Discard, offset, len, 0, None).await.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_sane() {
        let config = NvmeConfig::default();
        assert_eq!(config.namespace_id, 1);
        assert!((1..=64).contains(&config.queue_pairs));
        assert!(config.bounce_bytes as u64 >= layout::transfer_bytes_max(0));
    }

    #[test]
    fn bad_configs_and_addresses_are_refused_before_touching_hardware() {
        let zero_depth = NvmeConfig {
            queue_depth: 0,
            ..NvmeConfig::default()
        };
        let error = NvmeDevice::open("0000:00:04.0", &zero_depth, None).expect_err("depth 0");
        assert!(error.to_string().contains("queue depth 0"), "{error}");
        let small_bounce = NvmeConfig {
            bounce_bytes: 4096,
            ..NvmeConfig::default()
        };
        let error = NvmeDevice::open("0000:00:04.0", &small_bounce, None).expect_err("bounce");
        assert!(error.to_string().contains("bounce region"), "{error}");
        let error =
            NvmeDevice::open("not-an-address", &NvmeConfig::default(), None).expect_err("address");
        assert!(
            error.to_string().contains("is not a PCI address"),
            "{error}"
        );
        let error =
            NvmeDevice::open("ffff:ff:1f.7", &NvmeConfig::default(), None).expect_err("no device");
        assert!(error.to_string().contains("vfio:ffff:ff:1f.7"), "{error}");
        assert!(error.to_string().contains("no PCI device"), "{error}");
    }
}
