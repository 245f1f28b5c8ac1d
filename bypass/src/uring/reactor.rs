//! The reactor: one thread per device that owns the rings, in the shape of
//! SPDK's poll-mode reactor.
//!
//! Each turn of the loop drains the submission queue into SQEs, submits them
//! all with one `io_uring_enter`, reaps every CQE and wakes the futures. When
//! a turn finds nothing to do the reactor busy-polls for `poll_spin_us` (a
//! completion or a submission arriving within that window costs no syscall
//! and no context switch), then sleeps in `io_uring_enter(GETEVENTS)` with a
//! read of the shared eventfd armed in the ring, so that either a completion
//! or a submitter's eventfd write ends the sleep. A reactor that never slept
//! would take a whole core from the application even when the device is idle.

use std::cell::UnsafeCell;
use std::hint::spin_loop;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};

use super::UringConfig;
use super::UringFeatures;
use super::ring::{self, Ring};
use super::shared::{Shared, SlotState};
use crate::{BufferPool, DeviceError, IoOp};

/// `user_data` of the eventfd read; slot indices are below `u32::MAX`.
const EVENTFD_TOKEN: u64 = u64::MAX;
/// Largest transfer one SQE asks for: SQE lengths are 32-bit and the kernel
/// caps a single read or write just under 2 GiB anyway; a longer I/O simply
/// continues as if it had come back short.
const MAX_SQE_BYTES: u64 = 1 << 30;
/// How often one I/O may come back with `EAGAIN` or `EINTR` before it fails.
const MAX_RETRIES: u32 = 64;

static NEXT_REACTOR: AtomicU64 = AtomicU64::new(0);

/// What the reactor thread reports once its rings are ready.
pub(super) struct Started {
    pub(super) features: UringFeatures,
    pub(super) fallocate: bool,
    pub(super) handle: JoinHandle<()>,
}

/// Spawns the reactor thread and waits for it to set up its rings.
pub(super) fn start(
    shared: Arc<Shared>,
    config: &UringConfig,
    pool: Option<BufferPool>,
    block_device: bool,
) -> Result<Started, DeviceError> {
    let open_error = |reason: &str, source| DeviceError::Open {
        path: shared.name.to_string(),
        reason: reason.into(),
        source,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread_shared = Arc::clone(&shared);
    let config = config.clone();
    let handle = thread::Builder::new()
        .name(format!(
            "flyfs-uring-{}",
            NEXT_REACTOR.fetch_add(1, Ordering::Relaxed)
        ))
        .spawn(
            move || match Reactor::new(thread_shared, &config, pool, block_device) {
                Ok((reactor, features, fallocate)) => {
                    // The opener is blocked on this channel, so the send cannot
                    // fail; if it somehow did, running would serve nobody.
                    if tx.send(Ok((features, fallocate))).is_ok() {
                        run_or_fail(reactor);
                    } else {
                        reactor.finish();
                    }
                }
                Err(error) => {
                    let _ = tx.send(Err(error));
                }
            },
        )
        .map_err(|error| open_error("cannot spawn the reactor thread", Some(error)))?;
    match rx.recv() {
        Ok(Ok((features, fallocate))) => Ok(Started {
            features,
            fallocate,
            handle,
        }),
        Ok(Err(error)) => {
            let _ = handle.join();
            Err(error)
        }
        Err(_) => {
            let _ = handle.join();
            Err(open_error(
                "the reactor thread died while setting up its rings",
                None,
            ))
        }
    }
}

/// Runs the reactor until the device shuts down. If it panics, the device
/// fails for good instead of stranding its I/O: every queued, in-flight and
/// later I/O gets [`DeviceError::Failed`] naming the panic.
///
/// After a panic the reactor's state cannot be trusted, and the kernel may
/// still be writing into buffers of I/O in flight, so the rings are leaked,
/// not torn down (as are those buffers, see `Shared::fail_all`): the leaked
/// memory and descriptors are the price of never handing a buffer back while
/// the kernel may write into it. A block device stays claimed until the
/// process exits, which a daemon whose device failed should do anyway.
fn run_or_fail(mut reactor: Reactor) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reactor.run()));
    match outcome {
        Ok(()) => reactor.finish(),
        Err(payload) => {
            let shared = Arc::clone(&reactor.shared);
            std::mem::forget(reactor);
            let reason: Arc<str> = format!(
                "its io_uring reactor thread panicked: {}",
                crate::panic_message(&*payload)
            )
            .into();
            tracing::error!(device = %shared.name, %reason, "device failed");
            shared.fail_all(reason);
        }
    }
}

struct Reactor {
    shared: Arc<Shared>,
    data: Ring,
    ctl: Option<Ring>,
    /// Reads and writes go to the normal ring after the polled ring refused
    /// one (see `complete`).
    iopoll_demoted: bool,
    spin: Duration,
    /// Slots whose I/O came back short (or with `EAGAIN`) and must be
    /// resubmitted; kept to reuse its allocation.
    retry: Vec<u32>,
    eventfd_armed: bool,
    /// Where the kernel writes the eventfd counter. Behind an `UnsafeCell`
    /// because the kernel writes it while we hold the box.
    eventfd_buf: Box<UnsafeCell<u64>>,
    /// Keeps the registered arena mapped; declared after the rings so that
    /// it is dropped after them.
    _pool: Option<BufferPool>,
}

impl Reactor {
    fn new(
        shared: Arc<Shared>,
        config: &UringConfig,
        pool: Option<BufferPool>,
        block_device: bool,
    ) -> Result<(Reactor, UringFeatures, bool), DeviceError> {
        let setup = ring::setup(&shared, config, pool.as_ref(), block_device)?;
        let reactor = Reactor {
            data: setup.data,
            ctl: setup.ctl,
            iopoll_demoted: false,
            spin: Duration::from_micros(u64::from(config.poll_spin_us)),
            retry: Vec::with_capacity(config.queue_depth as usize),
            eventfd_armed: false,
            eventfd_buf: Box::new(UnsafeCell::new(0)),
            _pool: pool,
            shared,
        };
        Ok((reactor, setup.features, setup.fallocate))
    }

    fn run(&mut self) {
        let mut idle_since: Option<Instant> = None;
        loop {
            let ran = self.run_local();
            let queued = self.drain_queue();
            self.enter();
            let reaped = self.reap();
            if ran || queued || reaped {
                idle_since = None;
                continue;
            }
            // `closed` before `active`: see `Shared::submit`.
            if self.shared.closed.load(Ordering::SeqCst)
                && self.shared.active.load(Ordering::SeqCst) == 0
            {
                break;
            }
            if self.data.iopoll && self.data.in_flight > 0 {
                // Polled I/O completes only when someone polls for it: never
                // sleep while any is in flight.
                spin_loop();
                continue;
            }
            let now = Instant::now();
            if now.duration_since(*idle_since.get_or_insert(now)) < self.spin {
                spin_loop();
                continue;
            }
            self.sleep();
            idle_since = None;
        }
    }

    /// Ends a reactor that stopped normally: the armed eventfd read is
    /// completed, then the tasks still waiting are cancelled.
    fn finish(mut self) {
        self.disarm_eventfd();
        // Tasks still waiting here are cancelled: their futures are dropped
        // on this thread, as they were polled on it (one scheduled from now
        // on is dropped where it is scheduled).
        self.shared.tasks_closed.store(true, Ordering::SeqCst);
        while let Some(runnable) = self.shared.local.pop() {
            drop(runnable);
        }
    }

    /// Runs the tasks that are ready, as many as were queued when the turn
    /// began, so that a task waking itself cannot starve the rings.
    fn run_local(&mut self) -> bool {
        let ready = self.shared.local.len();
        for _ in 0..ready {
            match self.shared.local.pop() {
                Some(runnable) => {
                    runnable.run();
                }
                None => break,
            }
        }
        ready > 0
    }

    /// Turns every queued slot into an SQE. Returns whether there were any.
    fn drain_queue(&mut self) -> bool {
        let mut any = false;
        while let Some(index) = self.shared.queue.pop() {
            #[cfg(any(test, feature = "testing"))]
            if self.shared.panic_on_next_io.swap(false, Ordering::SeqCst) {
                panic!("injected reactor panic (test hook)");
            }
            any = true;
            self.shared
                .counters
                .submitted
                .fetch_add(1, Ordering::Relaxed);
            self.push_slot(index);
        }
        any
    }

    fn push_slot(&mut self, index: u32) {
        let mut state = self.shared.slot(index).lock();
        let ring = match (state.op, self.ctl.as_mut()) {
            (IoOp::Read | IoOp::Write, Some(normal)) if self.iopoll_demoted => normal,
            (IoOp::Read | IoOp::Write, _) => &mut self.data,
            (IoOp::Flush | IoOp::Discard, normal) => normal.unwrap_or(&mut self.data),
        };
        let entry = build_entry(ring, index, &mut state);
        state.in_kernel = true;
        drop(state);
        push_entry(ring, &entry);
        ring.in_flight += 1;
    }

    /// Submits what is in the SQs (one syscall per ring for the whole
    /// batch), and enters a ring that has completions waiting on the reactor:
    /// polled I/O, or task work the kernel flagged with `IORING_SQ_TASKRUN`.
    fn enter(&mut self) {
        let counters = &self.shared.counters;
        for ring in std::iter::once(&mut self.data).chain(self.ctl.as_mut()) {
            let (pending, taskrun) = {
                let sq = ring.ring.submission();
                (sq.len(), sq.taskrun())
            };
            if pending == 0 && !taskrun && !(ring.iopoll && ring.in_flight > 0) {
                continue;
            }
            if !ring.sqpoll() {
                counters.enters.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(error) = ring.ring.submit() {
                enter_failed(&self.shared, &error);
            }
        }
    }

    /// Reaps every CQE: records outcomes, wakes futures, and resubmits the
    /// rest of short transfers. Returns whether there were any.
    fn reap(&mut self) -> bool {
        let shared = &*self.shared;
        let mut any = false;
        let mut demote = false;
        for ring in std::iter::once(&mut self.data).chain(self.ctl.as_mut()) {
            let mut completed = 0;
            let polled = ring.iopoll;
            for cqe in ring.ring.completion() {
                any = true;
                if cqe.user_data() == EVENTFD_TOKEN {
                    self.eventfd_armed = false;
                    if cqe.result() < 0 {
                        tracing::debug!(error = %io::Error::from_raw_os_error(-cqe.result()), "eventfd read failed");
                    }
                    continue;
                }
                completed += 1;
                let index = cqe.user_data() as u32;
                demote |= complete(shared, index, cqe.result(), polled, &mut self.retry);
            }
            ring.in_flight -= completed;
        }
        if demote && !self.iopoll_demoted {
            self.iopoll_demoted = true;
            tracing::warn!(
                device = %shared.name,
                "the device refused a polled I/O although the IOPOLL probe passed; \
                 using interrupts from now on"
            );
        }
        if !self.retry.is_empty() {
            let mut retry = std::mem::take(&mut self.retry);
            for index in retry.drain(..) {
                self.shared
                    .counters
                    .resubmits
                    .fetch_add(1, Ordering::Relaxed);
                self.push_slot(index);
            }
            self.retry = retry;
        }
        any
    }

    /// The ring the reactor sleeps on: the one that carries the eventfd read.
    fn sleep_ring(&mut self) -> &mut Ring {
        self.ctl.as_mut().unwrap_or(&mut self.data)
    }

    fn arm_eventfd(&mut self) {
        if self.eventfd_armed {
            return;
        }
        let entry = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            self.eventfd_buf.get().cast(),
            8,
        )
        .build()
        .user_data(EVENTFD_TOKEN);
        push_entry(self.sleep_ring(), &entry);
        self.eventfd_armed = true;
    }

    /// Blocks until a CQE arrives: an I/O completion, or the eventfd read
    /// completing because a submitter (or shutdown) wrote the eventfd.
    fn sleep(&mut self) {
        let shared = Arc::clone(&self.shared);
        shared.sleeping.store(true, Ordering::Relaxed);
        // Pairs with the fence in `Shared::notify`: either a submitter sees
        // `sleeping` and writes the eventfd, or we see its queued I/O here.
        fence(Ordering::SeqCst);
        if !shared.queue.is_empty() || !shared.local.is_empty() {
            shared.sleeping.store(false, Ordering::Relaxed);
            return;
        }
        self.arm_eventfd();
        shared.counters.sleeps.fetch_add(1, Ordering::Relaxed);
        shared.counters.enters.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self.sleep_ring().ring.submit_and_wait(1) {
            enter_failed(&shared, &error);
        }
        shared.sleeping.store(false, Ordering::Relaxed);
    }

    /// Completes the armed eventfd read before the rings are torn down, so
    /// the kernel can never write into `eventfd_buf` after it is freed.
    fn disarm_eventfd(&mut self) {
        debug_assert_eq!(
            self.data.in_flight, 0,
            "the reactor exits with I/O in flight"
        );
        if !self.eventfd_armed {
            return;
        }
        self.shared.wake_reactor();
        while self.eventfd_armed {
            if let Err(error) = self.sleep_ring().ring.submit_and_wait(1) {
                enter_failed(&self.shared, &error);
            }
            self.reap();
        }
    }
}

fn enter_failed(shared: &Shared, error: &io::Error) {
    match error.raw_os_error() {
        // A signal, or the kernel asking us to reap before it takes more:
        // the next turn of the loop retries.
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
        _ => {
            // Not expected from a well-formed ring; back off so a persistent
            // failure does not turn into a hot loop of log lines.
            tracing::error!(device = %shared.name, %error, "io_uring_enter failed");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Pushes one SQE, making room by submitting if the SQ is full (which the
/// sizing of the rings should make impossible).
fn push_entry(ring: &mut Ring, entry: &squeue::Entry) {
    loop {
        // SAFETY: every buffer an entry names stays alive until its CQE is
        // reaped: I/O buffers are held in their slot (even when the future is
        // dropped), and the eventfd buffer is owned by the reactor, which
        // completes the eventfd read before it drops that buffer.
        if unsafe { ring.ring.submission().push(entry) }.is_ok() {
            return;
        }
        if let Err(error) = ring.ring.submit() {
            tracing::warn!(%error, "submitting to make room in a full SQ failed");
        }
        if ring.sqpoll() {
            let _ = ring.ring.submitter().squeue_wait();
        }
    }
}

/// Builds the SQE for the untransferred rest of a slot's I/O, for `ring`: a
/// fixed-buffer opcode only when the buffer lies in the pool registered with
/// that very ring.
fn build_entry(ring: &Ring, index: u32, state: &mut SlotState) -> squeue::Entry {
    let fd = types::Fd(ring.fd);
    let offset = state.offset + state.done;
    let len = (state.len - state.done).min(MAX_SQE_BYTES) as u32;
    let entry = match state.op {
        IoOp::Read | IoOp::Write => {
            let done = state.done as usize;
            let buf = state
                .buf
                .as_mut()
                .expect("a read or write slot holds its buffer");
            let fixed = match (ring.fixed_pool, buf.registration()) {
                (Some(registered), Some((pool, region))) if pool == registered => Some(region),
                _ => None,
            };
            // Writes only read the buffer, which may be a read-only view of
            // a received payload; reads need it writable.
            match state.op {
                IoOp::Read => {
                    // SAFETY: `done < len == buf.len()`, so the pointer stays
                    // inside the window.
                    let ptr = unsafe { buf.window_mut_ptr().add(done) };
                    match fixed {
                        Some(region) => opcode::ReadFixed::new(fd, ptr, len, region)
                            .offset(offset)
                            .build(),
                        None => opcode::Read::new(fd, ptr, len).offset(offset).build(),
                    }
                }
                _ => {
                    // SAFETY: as for reads.
                    let ptr = unsafe { buf.window_ptr().add(done) };
                    match fixed {
                        Some(region) => opcode::WriteFixed::new(fd, ptr, len, region)
                            .offset(offset)
                            .build(),
                        None => opcode::Write::new(fd, ptr, len).offset(offset).build(),
                    }
                }
            }
        }
        IoOp::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        IoOp::Discard => opcode::Fallocate::new(fd, state.len)
            .offset(state.offset)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build(),
    };
    // `ring.fd` is the registered-file index when `fd_flags` has FIXED_FILE:
    // the same SQE `types::Fixed` would build.
    entry.flags(ring.fd_flags).user_data(u64::from(index))
}

/// Handles the CQE of slot `index`: decides whether the I/O is finished
/// (queueing the rest of a short transfer in `retry` if not), and if so
/// records the outcome and wakes the future, or releases an abandoned slot.
///
/// Returns true when a polled ring refused the I/O with `EOPNOTSUPP`: the
/// IOPOLL probe can be fooled (a stacked device may poll for some ranges
/// only), so instead of failing, the I/O is retried and the caller moves
/// reads and writes to the normal ring.
fn complete(shared: &Shared, index: u32, res: i32, polled: bool, retry: &mut Vec<u32>) -> bool {
    let mut state = shared.slot(index).lock();
    if polled && res == -libc::EOPNOTSUPP {
        retry.push(index);
        return true;
    }
    let op = state.op;
    let io_error = |source: io::Error, state: &SlotState| DeviceError::Io {
        device: Arc::clone(&shared.name),
        op,
        offset: state.offset,
        len: state.len,
        source,
    };
    let outcome = if res < 0 {
        let errno = -res;
        if matches!(errno, libc::EAGAIN | libc::EINTR) && state.retries < MAX_RETRIES {
            state.retries += 1;
            None
        } else if op == IoOp::Discard && super::file::discard_unsupported(errno) {
            // Discard is advisory: a file system that cannot punch holes has
            // done all that was asked.
            Some(Ok(()))
        } else {
            Some(Err(io_error(io::Error::from_raw_os_error(errno), &state)))
        }
    } else {
        match op {
            IoOp::Read | IoOp::Write if res == 0 => {
                let what = if op == IoOp::Read {
                    "the file ends"
                } else {
                    "the device accepted no more data"
                };
                let message = format!(
                    "transfer stopped after {} of {} bytes: {what}",
                    state.done, state.len
                );
                let kind = if op == IoOp::Read {
                    io::ErrorKind::UnexpectedEof
                } else {
                    io::ErrorKind::WriteZero
                };
                Some(Err(io_error(io::Error::new(kind, message), &state)))
            }
            IoOp::Read | IoOp::Write => {
                state.done += res as u64;
                if state.done < state.len {
                    None
                } else {
                    Some(Ok(()))
                }
            }
            IoOp::Flush | IoOp::Discard => Some(Ok(())),
        }
    };
    let Some(outcome) = outcome else {
        retry.push(index);
        return false;
    };
    // Counted before the future can see its outcome, so a caller reading
    // the stats after its I/O completed sees that I/O counted.
    shared.counters.completed.fetch_add(1, Ordering::Relaxed);
    if state.abandoned {
        let (buf, waker) = state.reset();
        drop(state);
        if let Err(error) = &outcome {
            tracing::warn!(%error, "an I/O whose caller stopped waiting failed");
        }
        drop((buf, waker));
        shared.release(index);
    } else {
        state.outcome = Some(outcome);
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
    shared.active.fetch_sub(1, Ordering::SeqCst);
    false
}

#[cfg(test)]
mod tests {
    use io_uring::IoUring;

    use super::*;
    use crate::{HugePages, PoolConfig};

    fn pool() -> BufferPool {
        BufferPool::new(&PoolConfig {
            classes: vec![(4096, 4)],
            hugepages: HugePages::Never,
        })
        .expect("buffer pool")
    }

    /// A slot holding a read or write of one pooled 4 KiB buffer.
    fn slot(op: IoOp, pool: &BufferPool) -> SlotState {
        let mut state = SlotState::empty();
        state.op = op;
        state.len = 4096;
        state.buf = Some(pool.alloc(4096));
        state
    }

    /// The case IOPOLL demotion creates: the polled ring has the pool
    /// registered, the normal ring that takes over reads and writes has not.
    /// Each ring decides for itself, so the normal ring never gets a
    /// fixed-buffer opcode, while the registered ring still does.
    #[test]
    fn fixed_buffers_are_used_only_on_the_ring_that_registered_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = std::fs::File::create(dir.path().join("dev")).expect("create a file");
        let fd = file.as_raw_fd();
        let pool = pool();
        let mut registered = Ring::new(IoUring::new(4).expect("io_uring"), fd, false);
        match registered.register_pool(&pool) {
            Ok(()) => {}
            Err(error) => {
                // Registration needs locked memory; the unregistered half
                // below still runs.
                println!("skipping the registered half: cannot register buffers: {error}");
            }
        }
        let unregistered = Ring::new(IoUring::new(4).expect("io_uring"), fd, false);
        assert_eq!(unregistered.fixed_pool, None);

        for (op, plain, fixed) in [
            (IoOp::Read, opcode::Read::CODE, opcode::ReadFixed::CODE),
            (IoOp::Write, opcode::Write::CODE, opcode::WriteFixed::CODE),
        ] {
            let entry = build_entry(&unregistered, 7, &mut slot(op, &pool));
            assert_eq!(
                entry.get_opcode(),
                u32::from(plain),
                "{op} on a ring without registered buffers must not use a fixed buffer"
            );
            assert_eq!(entry.get_user_data(), 7);
            if registered.fixed_pool.is_some() {
                let entry = build_entry(&registered, 7, &mut slot(op, &pool));
                assert_eq!(
                    entry.get_opcode(),
                    u32::from(fixed),
                    "{op} on the registered ring"
                );
                // A buffer from another pool is not registered anywhere.
                let other = self::pool();
                let entry = build_entry(&registered, 7, &mut slot(op, &other));
                assert_eq!(
                    entry.get_opcode(),
                    u32::from(plain),
                    "{op} of a foreign buffer"
                );
            }
        }
    }
}
