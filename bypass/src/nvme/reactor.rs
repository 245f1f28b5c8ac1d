//! The NVMe reactors: one thread per I/O queue pair, owning that pair
//! alone. Each turns its requests into commands, rings its doorbell once per
//! batch, polls its completions, enforces its command timeouts (Abort, then
//! disabling the controller) and watches the controller's health; the last
//! one to stop shuts the controller down. What they share (the controller's
//! slow registers, the admin queue, the IOMMU mappings) sits behind one lock
//! that only those cold paths take.
//!
//! The rule it keeps above all: a buffer goes back to its owner only when
//! the controller can no longer DMA into it: its command completed, or the
//! controller was disabled, or its IOMMU mappings were removed. If none of
//! those can be established the buffer is leaked, never reused.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering, fence};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use flyfs_sys::nvme::{CompletionEntry, DsmRange, SubmissionEntry, admin, io, reg};
use parking_lot::Mutex;

use super::controller::{Controller, DmaMemory, QueuePair, arena_iova};
use super::layout::{self, PAGE_BYTES, PRP_LIST_ENTRIES, Prp2, RangeAllocator};
use super::status::NvmeStatus;
use super::vfio::{Bar, OpenFailure, Vfio};
use super::{Counters, DMA_RUNNING, DMA_STOPPED, DMA_UNKNOWN, Lane, NvmeConfig, Request, Shared};
use crate::{BufferPool, DeviceError, Geometry, IoOp};

/// Entries of the admin queue: start-up commands and Aborts only.
const ADMIN_ENTRIES: u16 = 32;
/// How often the reactor reads CSTS while commands are in flight.
const HEALTH_PERIOD_BUSY: Duration = Duration::from_millis(10);
/// How often a busy reactor looks for commands past their deadline: the
/// scan walks every command slot, too much for every turn of a spinning
/// reactor, and timeouts are seconds long.
const TIMEOUT_CHECK_PERIOD: Duration = Duration::from_millis(1);
/// How long the reactor parks when idle before it looks at CSTS again, so
/// a dead controller is noticed without an I/O.
const HEALTH_PERIOD_IDLE: Duration = Duration::from_millis(100);
/// The nap between completion polls once the spin is over.
const POLL_NAP: Duration = Duration::from_micros(50);

pub(super) struct Started {
    pub(super) shared: Arc<Shared>,
    pub(super) handles: Vec<JoinHandle<()>>,
}

/// What the reactors of one device share besides `Shared`.
struct Common {
    /// The controller and its admin queue: cold paths only.
    control: Mutex<Control>,
    /// The registers, for doorbells (each reactor writes only its own).
    bar: Arc<Bar>,
    /// The buffer pool's mapped arenas, `(address, len, iova)`: fixed after
    /// open, so the hot path looks them up without the lock.
    arenas: Vec<(usize, usize, u64)>,
    /// Reactors still running; the last one out shuts the controller down.
    running: AtomicUsize,
    /// Aborts sent whose completion nobody has consumed yet.
    aborts_outstanding: AtomicUsize,
}

struct Control {
    controller: Controller,
    admin: QueuePair,
    next_admin_id: u16,
}

/// What one reactor's queue pair is made of, allocated at open.
struct PairMemory {
    queue_id: u16,
    io: QueuePair,
    prp_pages: DmaMemory,
    bounce: DmaMemory,
}

/// Opens the controller, brings it up and starts the reactor threads.
pub(super) fn start(
    address: &str,
    name: Arc<str>,
    config: &NvmeConfig,
    pool: Option<&BufferPool>,
) -> Result<Started, OpenFailure> {
    let os = |what: &str| {
        let what = what.to_owned();
        move |error: std::io::Error| OpenFailure {
            reason: what,
            source: Some(error),
        }
    };
    let plain = |reason: String| OpenFailure {
        reason,
        source: None,
    };
    let vfio = Vfio::open(address)?;
    let mut controller = Controller::new(vfio)?;
    if let Some(pool) = pool {
        controller
            .map_pool(pool)
            .map_err(os("cannot map the buffer pool's arena into the IOMMU"))?;
    }
    let mut admin = controller.enable(ADMIN_ENTRIES).map_err(plain)?;
    let identity = controller
        .identify(&mut admin, config.namespace_id)
        .map_err(plain)?;
    let granted = controller
        .set_queue_count(&mut admin, config.queue_pairs)
        .map_err(plain)?;
    if granted < config.queue_pairs {
        tracing::warn!(
            device = %name,
            asked = config.queue_pairs,
            granted,
            "the controller granted fewer I/O queue pairs than configured; running with {granted}"
        );
    }
    let mqes = flyfs_sys::nvme::cap::mqes(controller.cap) + 1;
    let entries = (config.queue_depth + 1).min(mqes).min(4096) as u16;
    let command_slots = usize::from(entries - 1);
    let mut pairs = Vec::with_capacity(usize::from(granted));
    for queue_id in 1..=granted {
        let io = controller
            .create_io_queues(&mut admin, queue_id, entries)
            .map_err(plain)?;
        let prp_pages = controller
            .alloc_dma(command_slots * PAGE_BYTES as usize)
            .map_err(os("cannot allocate the PRP list pages"))?;
        let bounce = controller
            .alloc_dma(config.bounce_bytes)
            .map_err(os("cannot allocate the bounce region"))?;
        pairs.push(PairMemory {
            queue_id,
            io,
            prp_pages,
            bounce,
        });
    }
    let geometry = Geometry {
        sector_size: identity.sector_size,
        capacity_bytes: identity.sectors * u64::from(identity.sector_size),
    };
    let shared = Arc::new(Shared {
        name,
        geometry,
        identity,
        lanes: (0..granted).map(|_| Lane::new()).collect(),
        poll_budget: Duration::from_micros(u64::from(config.poll_budget_us)),
        closed: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        failure: Mutex::new(None),
        failed_dma: AtomicU8::new(DMA_RUNNING),
        counters: Counters::default(),
        stall_doorbells: AtomicBool::new(false),
        reset_requested: AtomicBool::new(false),
        #[cfg(feature = "testing")]
        power: Mutex::new(Default::default()),
        next_task_lane: AtomicUsize::new(0),
    });
    let common = Arc::new(Common {
        bar: controller.shared_bar(),
        arenas: controller.arenas.clone(),
        control: Mutex::new(Control {
            controller,
            admin,
            next_admin_id: 100,
        }),
        running: AtomicUsize::new(pairs.len()),
        aborts_outstanding: AtomicUsize::new(0),
    });
    let transfer_bytes_max = layout::transfer_bytes_max(shared.identity.mdts);
    // A discard names whole sectors in a 32-bit count.
    let discard_bytes_max = u64::from(u32::MAX) * u64::from(geometry.sector_size);
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let device_number = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut handles = Vec::with_capacity(pairs.len());
    for (lane, pair) in pairs.into_iter().enumerate() {
        let bounce_pages = pair.bounce.len() as u64 / PAGE_BYTES;
        let reactor = Reactor {
            shared: Arc::clone(&shared),
            common: Arc::clone(&common),
            lane,
            queue_id: pair.queue_id,
            io: pair.io,
            prp_pages: pair.prp_pages,
            bounce: pair.bounce,
            bounce_pages: RangeAllocator::new(0, bounce_pages),
            commands: (0..command_slots).map(|_| None).collect(),
            free_ids: (0..command_slots as u16).rev().collect(),
            requests: Vec::new(),
            free_requests: Vec::new(),
            unissued: VecDeque::new(),
            in_flight: 0,
            transfer_bytes_max,
            discard_bytes_max,
            timeout: Duration::from_millis(config.command_timeout_ms),
            spin: Duration::from_micros(u64::from(config.poll_spin_us)),
            failed: false,
            last_work: Instant::now(),
            busy_peak: 0,
            last_health: Instant::now(),
            last_timeout_check: Instant::now(),
            prp_list: Box::new([0; PRP_LIST_ENTRIES]),
        };
        *shared.lanes[lane].core.lock() = Some(reactor);
        let thread_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name(format!("flyfs-nvme-{device_number}.{}", pair.queue_id))
            .spawn(move || run(thread_shared, lane));
        let handle = match spawned {
            Ok(handle) => handle,
            Err(error) => {
                // The reactors already running must stop (the last one
                // shuts the controller down); the ones never started count
                // as stopped, before any running one can leave.
                let never_started = shared.lanes.len() - handles.len();
                common.running.fetch_sub(never_started, Ordering::SeqCst);
                // The reactors that have no thread leave the lanes, which
                // would otherwise keep `shared` alive through them.
                for lane in &shared.lanes[handles.len()..] {
                    lane.core.lock().take();
                }
                shared.closed.store(true, Ordering::SeqCst);
                for lane in &shared.lanes[..handles.len()] {
                    lane.unpark();
                }
                for handle in handles {
                    let _ = JoinHandle::join(handle);
                }
                return Err(os("cannot start a reactor thread")(error));
            }
        };
        shared.lanes[lane]
            .reactor
            .set(handle.thread().clone())
            .expect("each reactor thread is recorded once, here");
        handles.push(handle);
    }
    Ok(Started { shared, handles })
}

/// A request the reactor has taken.
struct InFlight {
    request: Request,
    /// Bytes of the request turned into commands so far.
    issued: u64,
    /// Commands of it the controller has not completed.
    outstanding: u32,
    error: Option<DeviceError>,
}

/// One command the controller holds, by command id.
struct Command {
    request: usize,
    /// The piece of the request it moves.
    piece_offset: u64,
    piece_len: u64,
    /// First page of its bounce range, if its buffer was not mapped.
    bounce_page: Option<u64>,
    deadline: Instant,
    abort_sent: bool,
}

/// One queue pair and everything that drives it. It lives in its lane
/// (`Lane::core`) behind a lock that its thread holds for a turn at a time,
/// so that submitters can issue their own commands
/// ([`Reactor::issue_direct`]) and waiting futures reap completions
/// ([`Reactor::reap_for_future`]) without waking the thread.
pub(super) struct Reactor {
    shared: Arc<Shared>,
    common: Arc<Common>,
    /// Index of this reactor's lane in `Shared::lanes`.
    lane: usize,
    /// Its I/O queue pair's id (1-based; 0 is the admin queue).
    queue_id: u16,
    io: QueuePair,
    /// One page per command id: its PRP list, or its Dataset Management range.
    prp_pages: DmaMemory,
    bounce: DmaMemory,
    bounce_pages: RangeAllocator,
    commands: Vec<Option<Command>>,
    free_ids: Vec<u16>,
    requests: Vec<Option<InFlight>>,
    free_requests: Vec<usize>,
    /// Requests with bytes not yet turned into commands, oldest first.
    unissued: VecDeque<usize>,
    in_flight: usize,
    transfer_bytes_max: u64,
    discard_bytes_max: u64,
    timeout: Duration,
    spin: Duration,
    failed: bool,
    /// When a turn last found work, which ends the busy-poll after `spin`.
    last_work: Instant,
    /// The most requests the table held since the queue pair was last
    /// idle (published as `Lane::deep` when it next is).
    busy_peak: usize,
    /// When the controller's health was last read.
    last_health: Instant,
    /// When the commands' deadlines were last checked.
    last_timeout_check: Instant,
    /// Scratch space for a command's PRP list, before it is copied into
    /// the command's list page: kept, not zeroed for every command (4 KiB
    /// of memset per command stood out in a busy reactor's perf profile).
    prp_list: Box<[u64; PRP_LIST_ENTRIES]>,
}

/// Who consumes completions, for `NvmeStats`.
#[derive(Clone, Copy)]
enum Reaper {
    Reactor,
    Future,
}

/// What a reactor thread does after a turn.
enum Next {
    /// Turn again at once: there was work.
    Again,
    /// Commands are in flight: poll again after a spin or a nap.
    Poll(Option<Duration>),
    /// The one request in flight is a lone I/O whose future reaps it
    /// (`Reactor::only_lone_io`): nap this long, or until it stops polling
    /// or another request arrives.
    Defer(Duration),
    /// Nothing in flight: sleep until a submitter wakes the thread.
    Sleep,
    /// Closed and every request answered.
    Exit,
}

/// A reactor thread: turns its lane's reactor under the lane's lock, and
/// spins, naps or sleeps between turns without it.
fn run(shared: Arc<Shared>, lane_index: usize) {
    let lane = &shared.lanes[lane_index];
    shared.enter_reactor(lane_index);
    loop {
        let next = lane
            .core
            .lock()
            .as_mut()
            .expect("only this thread takes its reactor out of the lane")
            .turn();
        if !matches!(next, Next::Exit) && run_tasks(lane) {
            // Tasks ran (the completions of this turn woke them): turn
            // again at once to issue what they submitted.
            continue;
        }
        match next {
            Next::Again => {}
            Next::Poll(None) => std::hint::spin_loop(),
            Next::Poll(Some(nap)) => {
                if lane.tasks.is_empty() {
                    thread::park_timeout(nap);
                }
            }
            Next::Exit => break,
            Next::Defer(nap) => {
                // Futures reap our completions: stay out of their way, but
                // turn at least every `nap` for timeouts and health, and at
                // once when the last of them stops polling (it sees
                // `sleeping` and unparks us, or we see its count gone).
                lane.sleeping.store(true, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                if !lane.submissions.is_empty()
                    || !lane.tasks.is_empty()
                    || lane.pollers.load(Ordering::SeqCst) == 0
                    || shared.closed.load(Ordering::SeqCst)
                {
                    lane.sleeping.store(false, Ordering::Relaxed);
                    continue;
                }
                thread::park_timeout(nap);
                lane.sleeping.store(false, Ordering::Relaxed);
            }
            Next::Sleep => {
                // Idle: park until a submitter wakes us (see
                // `Shared::notify`), or a future that stops polling hands
                // us what is still in flight (the same handshake).
                lane.sleeping.store(true, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                // Commands a submitter issued itself since our turn: its
                // future polls them, or has stopped and we must.
                if lane.outstanding.load(Ordering::SeqCst) > 0 {
                    lane.sleeping.store(false, Ordering::Relaxed);
                    continue;
                }
                if !lane.tasks.is_empty() {
                    lane.sleeping.store(false, Ordering::Relaxed);
                    continue;
                }
                if !lane.submissions.is_empty() || shared.closed.load(Ordering::SeqCst) {
                    lane.sleeping.store(false, Ordering::Relaxed);
                    if shared.closed.load(Ordering::SeqCst) && lane.submissions.is_empty() {
                        // Closing with submitters still counted in: wait for
                        // them to push or back out (each unparks us), or for
                        // the other reactors to answer theirs.
                        thread::park_timeout(POLL_NAP);
                    }
                    continue;
                }
                shared.counters.sleeps.fetch_add(1, Ordering::Relaxed);
                thread::park_timeout(HEALTH_PERIOD_IDLE);
                lane.sleeping.store(false, Ordering::Relaxed);
            }
        }
    }
    // Tasks still waiting are cancelled: their futures are dropped on this
    // thread, as they were polled on it (one scheduled from now on is
    // dropped where it is scheduled).
    lane.tasks_closed.store(true, Ordering::SeqCst);
    lane.cancel_tasks();
    let reactor = lane
        .core
        .lock()
        .take()
        .expect("only this thread takes its reactor out of the lane");
    reactor.close();
}

/// Runs the lane's ready tasks (`NvmeDevice::spawn`), as many as were queued
/// when it began, so that a task waking itself cannot starve the queue
/// pair. Returns whether any ran.
fn run_tasks(lane: &Lane) -> bool {
    let ready = lane.tasks.len();
    for _ in 0..ready {
        match lane.tasks.pop() {
            Some(runnable) => {
                runnable.run();
            }
            None => break,
        }
    }
    ready > 0
}

impl Reactor {
    fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    fn lane(&self) -> &Lane {
        &self.shared.lanes[self.lane]
    }

    /// One turn: takes submissions, issues commands, reaps completions,
    /// enforces timeouts and, now and then, reads the controller's health.
    fn turn(&mut self) -> Next {
        if self.shared.reset_requested.swap(false, Ordering::SeqCst) {
            // Test hook: a reset this reactor did not ask for.
            let config = self.common.bar.read32(reg::CC);
            self.common
                .bar
                .write32(reg::CC, config & !flyfs_sys::nvme::cc::EN);
        }
        if !self.failed && self.shared.failed_dma.load(Ordering::SeqCst) != DMA_RUNNING {
            // Another reactor failed the device: answer our requests.
            self.fail_local();
        }
        let mut worked = self.take_requests();
        worked |= self.issue();
        worked |= self.reap(usize::MAX, Reaper::Reactor) > 0;
        if self.common.aborts_outstanding.load(Ordering::Relaxed) > 0 {
            self.reap_admin();
        }
        let now = Instant::now();
        if self.in_flight > 0 && now.duration_since(self.last_timeout_check) >= TIMEOUT_CHECK_PERIOD
        {
            self.last_timeout_check = now;
            self.check_timeouts(now);
        }
        let period = if self.in_flight > 0 {
            HEALTH_PERIOD_BUSY
        } else {
            HEALTH_PERIOD_IDLE
        };
        if now.duration_since(self.last_health) >= period {
            self.last_health = now;
            let requested = self
                .common
                .control
                .lock()
                .controller
                .vfio
                .device_requested();
            if requested {
                // Someone unbinds the device from vfio-pci, which waits
                // until we close it: fail, refuse new I/O, and let go
                // once every request is answered.
                if !self.failed {
                    self.fail(
                        "the kernel asked for the device back (it is being unbound from vfio-pci)"
                            .into(),
                    );
                }
                self.shared.closed.store(true, Ordering::SeqCst);
                self.shared.unpark();
                return Next::Again;
            }
            let health = self.common.control.lock().controller.health();
            if !self.failed
                && let Err(reason) = health
            {
                self.fail(reason);
                return Next::Again;
            }
        }
        self.publish();
        if worked {
            self.last_work = now;
        }
        if self.in_flight > 0 && self.only_lone_io() {
            // A nap as long as a future's budget: a future past its budget
            // that its executor has not polled again is stalled, and its
            // commands' completions must not wait much longer.
            return Next::Defer(self.shared.poll_budget.clamp(POLL_NAP, HEALTH_PERIOD_BUSY));
        }
        if worked {
            return Next::Again;
        }
        if self.in_flight > 0 {
            return Next::Poll(if now.duration_since(self.last_work) < self.spin {
                None
            } else {
                Some(POLL_NAP)
            });
        }
        // `active` counts the device's requests, not this reactor's: one
        // is never taken by two reactors, so at zero with `closed` set
        // none can arrive anywhere.
        if self.shared.closed.load(Ordering::SeqCst)
            && self.shared.active.load(Ordering::SeqCst) == 0
            && self.lane().submissions.is_empty()
        {
            return Next::Exit;
        }
        Next::Sleep
    }

    /// Whether the device is working, so that threads other than the
    /// reactor's may drive its queue pair; a failing device is the
    /// reactor's alone.
    pub(super) fn is_healthy(&self) -> bool {
        !self.failed && self.shared.failed_dma.load(Ordering::SeqCst) == DMA_RUNNING
    }

    /// Whether the queue pair's only work is one request whose future reaps
    /// it (a lone I/O issued directly; there is at most one, as only a
    /// request finding the pair empty goes direct), so the reactor may nap.
    /// As soon as a second request joins it, the reactor polls as before
    /// and reaps everyone's completions: otherwise that one future, polled
    /// once per pass of its executor, would be the queue's only reaper, and
    /// every request that arrives would pay a wake-up of the napping
    /// reactor thread to be issued (depth 64 lost a fifth of its rate, the
    /// engine's chunk reads half).
    fn only_lone_io(&self) -> bool {
        self.lane().pollers.load(Ordering::SeqCst) > 0
            && self.unissued.is_empty()
            && self.requests.len() - self.free_requests.len() == 1
            && self.lane().submissions.is_empty()
    }

    /// Whether the queue pair holds no work: a request now would be a lone
    /// I/O.
    pub(super) fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.unissued.is_empty()
    }

    /// Issues `request` (with anything queued on the lane before it) on the
    /// submitting thread and rings the doorbell, without waking the
    /// reactor thread: going through it costs two wake-ups between threads
    /// (submitter to reactor, reactor to the waiting task), most of a lone
    /// I/O's latency. The reactor still owns the command's timeout and the
    /// controller's failure; the request's future reaps its completion
    /// ([`Reactor::reap_for_future`]) or leaves it to the reactor.
    pub(super) fn issue_direct(&mut self, request: Request) {
        self.take_requests();
        self.accept(request);
        self.issue();
        self.publish();
    }

    /// A waiting future's share of the reactor's work, on the executor's
    /// thread: reaps up to `max` completions (answering whichever requests
    /// they finish), then issues what waited for the command ids or bounce
    /// space they freed, and anything submitted meanwhile. Timeouts, Aborts
    /// and health stay with the reactor thread; a failing device is left
    /// to it entirely.
    pub(super) fn reap_for_future(&mut self, max: usize) {
        if !self.is_healthy() {
            return;
        }
        self.reap(max, Reaper::Future);
        self.take_requests();
        self.issue();
        self.publish();
    }

    /// Tells the lane how much work the queue pair holds, for the park
    /// checks of the reactor and of futures that stop polling.
    fn publish(&mut self) {
        let lane = &self.shared.lanes[self.lane];
        let outstanding = self.in_flight + self.unissued.len();
        if outstanding == 0 && self.busy_peak > 0 {
            lane.deep.store(self.busy_peak > 1, Ordering::Relaxed);
            self.busy_peak = 0;
        }
        lane.outstanding.store(outstanding, Ordering::SeqCst);
        lane.requests.store(
            self.requests.len() - self.free_requests.len(),
            Ordering::SeqCst,
        );
    }

    /// Moves submitted requests into the request table.
    fn take_requests(&mut self) -> bool {
        let mut took = false;
        while let Some(request) = self.shared.lanes[self.lane].submissions.pop() {
            took = true;
            self.accept(request);
        }
        took
    }

    /// Takes one request into the request table (or answers it at once).
    fn accept(&mut self, request: Request) {
        self.counters().submitted.fetch_add(1, Ordering::Relaxed);
        if self.failed {
            self.finish_now(request, Err(self.shared.closed_error()));
            return;
        }
        let flush_without_cache =
            request.op == IoOp::Flush && !self.shared.identity.volatile_write_cache;
        let discard_unsupported =
            request.op == IoOp::Discard && !self.shared.identity.dataset_management;
        if flush_without_cache || discard_unsupported {
            // Nothing to ask the controller: every completed write is
            // already durable, and discard is advisory.
            self.finish_now(request, Ok(()));
            return;
        }
        let index = match self.free_requests.pop() {
            Some(index) => index,
            None => {
                self.requests.push(None);
                self.requests.len() - 1
            }
        };
        self.requests[index] = Some(InFlight {
            request,
            issued: 0,
            outstanding: 0,
            error: None,
        });
        self.unissued.push_back(index);
        self.busy_peak = self
            .busy_peak
            .max(self.requests.len() - self.free_requests.len());
    }

    fn finish_now(&self, mut request: Request, result: Result<(), DeviceError>) {
        request.reply.finish(request.buf.take(), result);
        self.counters().completed.fetch_add(1, Ordering::Relaxed);
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
    }

    /// Turns unissued request bytes into commands while command ids (and
    /// bounce space) last; rings the doorbell once for the batch.
    fn issue(&mut self) -> bool {
        let mut pushed = 0u32;
        'requests: while let Some(&index) = self.unissued.front() {
            loop {
                let Some(id) = self.free_ids.pop() else {
                    break 'requests;
                };
                match self.build(index, id) {
                    Some(entry) => {
                        let pushed_ok = self.io.push(entry);
                        debug_assert!(pushed_ok, "command ids are fewer than queue entries");
                        pushed += 1;
                    }
                    None => {
                        // No bounce space: wait for completions to free some.
                        self.free_ids.push(id);
                        break 'requests;
                    }
                }
                let in_flight = self.requests[index]
                    .as_ref()
                    .expect("an unissued request is in the table");
                let whole = match in_flight.request.op {
                    IoOp::Flush => 0,
                    _ => in_flight.request.len,
                };
                if in_flight.issued >= whole {
                    self.unissued.pop_front();
                    break;
                }
            }
        }
        if pushed > 0 {
            self.counters()
                .commands
                .fetch_add(u64::from(pushed), Ordering::Relaxed);
            self.lane()
                .commands
                .fetch_add(u64::from(pushed), Ordering::Relaxed);
            self.counters()
                .in_flight_max
                .fetch_max(self.in_flight as u64, Ordering::Relaxed);
            if !self.shared.stall_doorbells.load(Ordering::Relaxed) {
                self.io.ring_submission_doorbell(&self.common.bar);
                self.counters().doorbells.fetch_add(1, Ordering::Relaxed);
            }
        }
        pushed > 0
    }

    /// The next command of request `index` under id `id`, or `None` if it
    /// needs bounce space that is not free now.
    fn build(&mut self, index: usize, id: u16) -> Option<SubmissionEntry> {
        let sector = u64::from(self.shared.geometry.sector_size);
        let namespace_id = self.shared.identity.namespace_id;
        let in_flight = self.requests[index]
            .as_mut()
            .expect("an unissued request is in the table");
        let request = &in_flight.request;
        let piece_offset = in_flight.issued;
        let (opcode, piece_len) = match request.op {
            IoOp::Read => (
                io::READ,
                layout::next_piece(request.len, piece_offset, self.transfer_bytes_max),
            ),
            IoOp::Write => (
                io::WRITE,
                layout::next_piece(request.len, piece_offset, self.transfer_bytes_max),
            ),
            IoOp::Flush => (io::FLUSH, 0),
            IoOp::Discard => (
                io::DATASET_MANAGEMENT,
                layout::next_piece(request.len, piece_offset, self.discard_bytes_max),
            ),
        };
        let mut entry = SubmissionEntry::new(opcode, id);
        entry.nsid = namespace_id;
        let page_offset = usize::from(id) * PAGE_BYTES as usize;
        let page_iova = self.prp_pages.iova + page_offset as u64;
        let mut bounce_page = None;
        match request.op {
            IoOp::Read | IoOp::Write => {
                let addr = request.addr + piece_offset as usize;
                let iova = match arena_iova(&self.common.arenas, addr, piece_len as usize) {
                    Some(iova) => iova,
                    None => {
                        let pages = piece_len.div_ceil(PAGE_BYTES);
                        let first = self.bounce_pages.alloc(pages, 1)?;
                        bounce_page = Some(first);
                        let bounce_offset = (first * PAGE_BYTES) as usize;
                        if request.op == IoOp::Write {
                            // SAFETY: `addr` is inside the request's buffer
                            // window (piece_offset + piece_len <= len), which
                            // this thread owns until it replies.
                            let source = unsafe {
                                std::slice::from_raw_parts(addr as *const u8, piece_len as usize)
                            };
                            self.bounce
                                .bytes_mut(bounce_offset, piece_len as usize)
                                .copy_from_slice(source);
                        }
                        self.shared.counters.bounced.fetch_add(1, Ordering::Relaxed);
                        self.bounce.iova + bounce_offset as u64
                    }
                };
                let list = &mut self.prp_list;
                let (prp1, prp2) = layout::prp(iova, piece_len, list)
                    .expect("pieces are capped to what one PRP list describes");
                entry.prp1 = prp1;
                entry.prp2 = match prp2 {
                    Prp2::None => 0,
                    Prp2::Page(page) => page,
                    Prp2::List { entries } => {
                        for (slot, &value) in list.iter().take(entries).enumerate() {
                            self.prp_pages.write(page_offset + slot * 8, value);
                        }
                        page_iova
                    }
                };
                let lba = (request.offset + piece_offset) / sector;
                entry.cdw10 = lba as u32;
                entry.cdw11 = (lba >> 32) as u32;
                entry.cdw12 = (piece_len / sector - 1) as u32;
            }
            IoOp::Flush => {}
            IoOp::Discard => {
                let range = DsmRange {
                    context_attributes: 0,
                    length_lbas: (piece_len / sector) as u32,
                    starting_lba: (request.offset + piece_offset) / sector,
                };
                self.prp_pages.write(page_offset, range);
                entry.prp1 = page_iova;
                // One range (NR is 0-based), deallocate.
                entry.cdw10 = 0;
                entry.cdw11 = io::DSM_DEALLOCATE;
            }
        }
        in_flight.issued += piece_len;
        in_flight.outstanding += 1;
        self.commands[usize::from(id)] = Some(Command {
            request: index,
            piece_offset,
            piece_len,
            bounce_page,
            deadline: Instant::now() + self.timeout,
            abort_sent: false,
        });
        self.in_flight += 1;
        Some(entry)
    }

    /// Consumes up to `max` posted completions; rings the completion
    /// doorbell once. Returns how many it consumed.
    fn reap(&mut self, max: usize, reaper: Reaper) -> usize {
        let mut reaped = 0;
        while reaped < max
            && let Some(completion) = self.io.next_completion()
        {
            reaped += 1;
            // Counted before the request is answered, so that whoever sees
            // the answer sees who reaped it.
            let counters = self.counters();
            match reaper {
                Reaper::Reactor => &counters.reaped_by_reactors,
                Reaper::Future => &counters.reaped_by_futures,
            }
            .fetch_add(1, Ordering::Relaxed);
            self.complete(completion);
        }
        if reaped > 0 {
            self.io.ring_completion_doorbell(&self.common.bar);
        }
        reaped
    }

    fn complete(&mut self, completion: CompletionEntry) {
        let id = usize::from(completion.command_id);
        let Some(command) = self.commands.get_mut(id).and_then(Option::take) else {
            tracing::error!(
                device = %self.shared.name,
                command_id = id,
                "completion for a command id that is not in flight; ignored"
            );
            return;
        };
        self.in_flight -= 1;
        self.free_ids.push(completion.command_id);
        let in_flight = self.requests[command.request]
            .as_mut()
            .expect("a command's request stays in the table until its last command");
        let request = &in_flight.request;
        let status = NvmeStatus::of(&completion);
        if let Some(first) = command.bounce_page {
            if status.is_none() && request.op == IoOp::Read {
                let addr = request.addr + command.piece_offset as usize;
                let source = self
                    .bounce
                    .bytes((first * PAGE_BYTES) as usize, command.piece_len as usize);
                // SAFETY: `addr` is inside the request's buffer window, which
                // this thread owns until it replies; the read's DMA into the
                // bounce range is complete.
                unsafe {
                    std::ptr::copy_nonoverlapping(source.as_ptr(), addr as *mut u8, source.len());
                }
            }
            self.bounce_pages
                .free(first, command.piece_len.div_ceil(PAGE_BYTES));
        }
        if let Some(status) = status
            && in_flight.error.is_none()
        {
            let (offset, len) = (request.offset + command.piece_offset, command.piece_len);
            in_flight.error = Some(if command.abort_sent {
                DeviceError::TimedOut {
                    device: Arc::clone(&self.shared.name),
                    op: request.op,
                    offset,
                    len,
                    timeout_ms: self.timeout.as_millis() as u64,
                }
            } else {
                DeviceError::Command {
                    device: Arc::clone(&self.shared.name),
                    op: request.op,
                    offset,
                    len,
                    status,
                }
            });
        }
        in_flight.outstanding -= 1;
        let whole = match request.op {
            IoOp::Flush => 0,
            _ => request.len,
        };
        if in_flight.outstanding == 0 && in_flight.issued >= whole {
            self.finish(command.request);
        }
    }

    fn finish(&mut self, index: usize) {
        let in_flight = self.requests[index]
            .take()
            .expect("a finishing request is in the table");
        self.free_requests.push(index);
        let result = match in_flight.error {
            Some(error) => Err(error),
            None => Ok(()),
        };
        self.finish_now(in_flight.request, result);
    }

    /// Consumes the admin queue's completions (Aborts, the only admin
    /// commands sent after open), whichever reactor sent them.
    fn reap_admin(&mut self) {
        let mut control = self.common.control.lock();
        let control = &mut *control;
        let mut reaped = false;
        while let Some(completion) = control.admin.next_completion() {
            reaped = true;
            self.common
                .aborts_outstanding
                .fetch_sub(1, Ordering::Relaxed);
            // Abort's dword 0 bit 0 says whether the command was left alone.
            tracing::warn!(
                device = %self.shared.name,
                admin_command_id = completion.command_id,
                not_aborted = completion.dw0 & 1 == 1,
                status = ?NvmeStatus::of(&completion).map(|status| status.to_string()),
                "abort completed"
            );
        }
        if reaped {
            control
                .admin
                .ring_completion_doorbell(control.controller.bar());
        }
    }

    /// Aborts commands past their deadline; disables the controller (and
    /// fails the device) if an aborted command is still not back after a
    /// second timeout.
    fn check_timeouts(&mut self, now: Instant) {
        let mut expired = None;
        for id in 0..self.commands.len() {
            let Some(command) = self.commands[id].as_mut() else {
                continue;
            };
            if now < command.deadline {
                continue;
            }
            if command.abort_sent {
                expired = Some(id);
                break;
            }
            command.abort_sent = true;
            command.deadline = now + self.timeout;
            self.shared
                .counters
                .timeouts
                .fetch_add(1, Ordering::Relaxed);
            let mut control = self.common.control.lock();
            let control = &mut *control;
            if control.admin.is_full() {
                continue;
            }
            let mut abort = SubmissionEntry::new(admin::ABORT, control.next_admin_id);
            control.next_admin_id = control.next_admin_id.wrapping_add(1).max(100);
            abort.cdw10 = u32::from(self.queue_id) | (id as u32) << 16;
            if control.admin.push(abort) {
                self.common
                    .aborts_outstanding
                    .fetch_add(1, Ordering::Relaxed);
                control
                    .admin
                    .ring_submission_doorbell(control.controller.bar());
                self.shared.counters.aborts.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(id) = expired {
            let command = self.commands[id].as_ref().expect("found above");
            let request = &self.requests[command.request]
                .as_ref()
                .expect("a command's request is in the table")
                .request;
            let reason = format!(
                "command {id} ({} of {} bytes at offset {}) did not complete within twice its \
                 {} ms timeout, even after an Abort",
                request.op,
                command.piece_len,
                request.offset + command.piece_offset,
                self.timeout.as_millis()
            );
            self.fail(reason);
        }
    }

    /// Fails the device for good: stops the controller's DMA (disable; if
    /// that does not take, remove the IOMMU mappings), tells the other
    /// reactors, then fails every request of this one, handing back buffers
    /// only if DMA has provably stopped.
    fn fail(&mut self, reason: String) {
        {
            let mut control = self.common.control.lock();
            // Under the lock, so that one reactor alone stops the controller
            // and records the first reason.
            if self.shared.failed_dma.load(Ordering::SeqCst) == DMA_RUNNING {
                tracing::error!(device = %self.shared.name, "NVMe device failed: {reason}");
                *self.shared.failure.lock() = Some(reason.into());
                let controller = &mut control.controller;
                let mut dma_stopped = match controller.disable() {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::error!(device = %self.shared.name, "cannot disable the controller: {error}");
                        false
                    }
                };
                if !dma_stopped {
                    if let Err(error) = controller.vfio.disable_bus_master() {
                        tracing::error!(device = %self.shared.name, "cannot turn bus mastering off: {error}");
                    }
                    match controller.unmap_all() {
                        Ok(()) => dma_stopped = true,
                        Err(error) => tracing::error!(
                            device = %self.shared.name,
                            "cannot remove the IOMMU mappings: {error}; buffers in flight are leaked"
                        ),
                    }
                }
                let state = if dma_stopped {
                    DMA_STOPPED
                } else {
                    DMA_UNKNOWN
                };
                self.shared.failed_dma.store(state, Ordering::SeqCst);
            }
        }
        self.shared.unpark();
        self.fail_local();
    }

    /// Fails this reactor's requests after the device failed (by this
    /// reactor or another, which recorded whether DMA stopped).
    fn fail_local(&mut self) {
        self.failed = true;
        let dma_stopped = self.shared.failed_dma.load(Ordering::SeqCst) == DMA_STOPPED;
        let reason: Arc<str> = self
            .shared
            .failure
            .lock()
            .clone()
            .unwrap_or_else(|| "the device failed".into());
        for command in &mut self.commands {
            command.take();
        }
        self.in_flight = 0;
        self.unissued.clear();
        let failed = || DeviceError::Failed {
            device: Arc::clone(&self.shared.name),
            reason: Arc::clone(&reason),
        };
        for index in 0..self.requests.len() {
            let Some(mut in_flight) = self.requests[index].take() else {
                continue;
            };
            self.free_requests.push(index);
            if !dma_stopped
                && in_flight.outstanding > 0
                && let Some(buf) = in_flight.request.buf.take()
            {
                // The controller may still write into it: never reuse it.
                std::mem::forget(buf);
                in_flight.request.buf = Some(crate::DmaBuf::alloc_zeroed(0));
            }
            self.finish_now(in_flight.request, Err(failed()));
        }
        self.publish();
    }

    /// Close: every request is answered. The last reactor out shuts the
    /// controller down; the others' queue memory stays pinned by its IOMMU
    /// mapping until then, so an early exit hands the controller nothing.
    fn close(self) {
        if self.common.running.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let mut control = self.common.control.lock();
        if self.shared.failed_dma.load(Ordering::SeqCst) == DMA_RUNNING
            && let Err(error) = control.controller.shutdown()
        {
            tracing::warn!(device = %self.shared.name, "orderly shutdown failed: {error}");
        }
        if let Err(error) = control.controller.unmap_all() {
            tracing::warn!(device = %self.shared.name, "cannot remove IOMMU mappings: {error}");
        }
        tracing::debug!(device = %self.shared.name, "NVMe device closed");
    }
}
