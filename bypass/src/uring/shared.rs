//! State shared between the submitting threads and the reactor: the
//! pre-allocated per-I/O slots, the lock-free submission queue, the
//! queue-depth semaphore, the sleep/wake handshake and the counters.
//!
//! # Life of an I/O
//!
//! 1. A submitter takes a queue-depth permit (waiting asynchronously when
//!    `queue_depth` I/Os are already in flight) and forgets it: the permit now
//!    belongs to a slot, and comes back with [`Shared::release`].
//! 2. It pops a free slot index (a permit guarantees one is free), fills the
//!    slot, pushes the index onto the submission queue and wakes the reactor
//!    if it sleeps. The future then waits on the slot ([`Pending`]).
//! 3. The reactor turns queued slots into SQEs, reaps their CQEs, writes the
//!    outcome into the slot and wakes the future, which takes the buffer and
//!    the outcome and releases the slot.
//! 4. If the future is dropped first, the slot is marked abandoned and keeps
//!    the buffer; the reactor releases the slot (dropping the buffer) when the
//!    kernel is done with it.

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::task::{Context, Poll, Waker};

use crossbeam_queue::ArrayQueue;
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use crate::{DeviceError, DmaBuf, Geometry, IoOp};

/// One in-flight I/O. Padded to two cache lines so that the reactor
/// completing one slot does not bounce the line a submitter is filling in the
/// next.
#[repr(align(128))]
pub(super) struct Slot(Mutex<SlotState>);

impl Slot {
    pub(super) fn lock(&self) -> parking_lot::MutexGuard<'_, SlotState> {
        self.0.lock()
    }
}

/// What a slot holds while its I/O is queued or in the kernel.
pub(super) struct SlotState {
    pub(super) op: IoOp,
    /// Device offset of the whole I/O.
    pub(super) offset: u64,
    /// Length of the whole I/O in bytes.
    pub(super) len: u64,
    /// Bytes already transferred: a short read or write resubmits the rest.
    pub(super) done: u64,
    /// How many times the kernel asked us to retry (`EAGAIN`, `EINTR`).
    pub(super) retries: u32,
    /// The buffer of a read or write. It stays here, alive, until the kernel
    /// has finished with it, even if the future waiting for it is dropped.
    pub(super) buf: Option<DmaBuf>,
    /// Set by the reactor when the I/O is finished.
    pub(super) outcome: Option<Result<(), DeviceError>>,
    pub(super) waker: Option<Waker>,
    /// The future was dropped: whoever finishes the I/O releases the slot.
    pub(super) abandoned: bool,
    /// A submitter filled the slot and its outcome is not yet recorded.
    pub(super) in_use: bool,
    /// An SQE for the slot went to a ring: the kernel may be using the
    /// buffer until the CQE is reaped.
    pub(super) in_kernel: bool,
}

impl SlotState {
    pub(super) fn empty() -> SlotState {
        SlotState {
            op: IoOp::Flush,
            offset: 0,
            len: 0,
            done: 0,
            retries: 0,
            buf: None,
            outcome: None,
            waker: None,
            abandoned: false,
            in_use: false,
            in_kernel: false,
        }
    }

    /// Clears the slot for its next use, handing back what must be dropped
    /// outside the lock (a buffer's drop touches the pool's free lists, a
    /// waker's drop may run arbitrary executor code).
    pub(super) fn reset(&mut self) -> (Option<DmaBuf>, Option<Waker>) {
        let buf = self.buf.take();
        let waker = self.waker.take();
        *self = SlotState::empty();
        (buf, waker)
    }
}

/// Counters kept with relaxed atomics: each is written by one side only
/// (mostly the reactor), so they cost no contention on the hot path.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) submitted: AtomicU64,
    pub(super) completed: AtomicU64,
    pub(super) enters: AtomicU64,
    pub(super) sleeps: AtomicU64,
    pub(super) wakeups: AtomicU64,
    pub(super) resubmits: AtomicU64,
}

/// Everything the submitters and the reactor share.
pub(super) struct Shared {
    pub(super) name: Arc<str>,
    pub(super) geometry: Geometry,
    /// The device. Owned here (not by the reactor) because block-device
    /// discards run on the caller's thread.
    pub(super) file: File,
    pub(super) slots: Box<[Slot]>,
    /// Indices of unused slots. A queue-depth permit guarantees a pop succeeds.
    pub(super) free: ArrayQueue<u32>,
    /// Indices of filled slots the reactor has not turned into SQEs yet.
    pub(super) queue: ArrayQueue<u32>,
    /// Tasks to run on the reactor thread (see `UringDevice::spawn`).
    pub(super) local: crossbeam_queue::SegQueue<async_task::Runnable>,
    /// The reactor no longer runs tasks (it exited, or the device failed):
    /// a task scheduled now is cancelled.
    pub(super) tasks_closed: AtomicBool,
    /// One permit per free slot: bounds the I/Os in flight to the queue depth
    /// and queues excess submitters fairly, without needing a tokio runtime.
    pub(super) permits: Semaphore,
    /// The reactor is (about to be) blocked in the kernel and needs an
    /// eventfd write to notice new submissions.
    pub(super) sleeping: AtomicBool,
    /// No new I/O is accepted; the reactor exits once `active` reaches zero.
    pub(super) closed: AtomicBool,
    /// I/Os that a submitter has committed to queue and whose final outcome
    /// the reactor has not yet recorded. The reactor may exit only when this
    /// is zero after `closed` is set.
    pub(super) active: AtomicUsize,
    /// Written to wake the reactor; the reactor keeps a read on it armed in
    /// its ring while it sleeps.
    pub(super) eventfd: OwnedFd,
    pub(super) counters: Counters,
    /// Why the reactor died (it panicked), once it has: every I/O fails with
    /// this reason from then on.
    pub(super) failure: Mutex<Option<Arc<str>>>,
    /// `failure` is set: checked without a lock where tasks are scheduled.
    pub(super) failed: AtomicBool,
    /// Test hook: the reactor panics when it next takes an I/O from the
    /// queue, so tests can show that a reactor panic fails I/O, not hangs it.
    #[cfg(any(test, feature = "testing"))]
    pub(super) panic_on_next_io: AtomicBool,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("name", &self.name)
            .field("geometry", &self.geometry)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(super) fn new(
        name: Arc<str>,
        geometry: Geometry,
        file: File,
        queue_depth: u32,
        eventfd: OwnedFd,
    ) -> Shared {
        let depth = queue_depth as usize;
        let slots: Box<[Slot]> = (0..depth)
            .map(|_| Slot(Mutex::new(SlotState::empty())))
            .collect();
        let free = ArrayQueue::new(depth);
        for index in 0..queue_depth {
            free.push(index)
                .expect("the free list is sized for every slot");
        }
        Shared {
            name,
            geometry,
            file,
            slots,
            free,
            queue: ArrayQueue::new(depth),
            local: crossbeam_queue::SegQueue::new(),
            tasks_closed: AtomicBool::new(false),
            permits: Semaphore::new(depth),
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            eventfd,
            counters: Counters::default(),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            #[cfg(any(test, feature = "testing"))]
            panic_on_next_io: AtomicBool::new(false),
        }
    }

    pub(super) fn slot(&self, index: u32) -> &Slot {
        &self.slots[index as usize]
    }

    /// The error of an I/O the device refuses: it was shut down, or its
    /// reactor died.
    pub(super) fn closed_error(&self) -> DeviceError {
        match self.failure.lock().clone() {
            Some(reason) => self.failed_error(reason),
            None => DeviceError::Closed {
                device: Arc::clone(&self.name),
            },
        }
    }

    fn failed_error(&self, reason: Arc<str>) -> DeviceError {
        DeviceError::Failed {
            device: Arc::clone(&self.name),
            reason,
        }
    }

    /// Called on the reactor thread after the reactor panicked (its rings
    /// are leaked, not closed: see `reactor::start`). Fails every I/O,
    /// queued or in the kernel, and every later one, with `reason`, then
    /// returns once no submitter can still be on its way into a slot.
    ///
    /// A buffer the kernel may still be using (its SQE was pushed) is leaked
    /// rather than handed back, since the leaked ring may yet complete into
    /// it; its future gets an empty buffer with the error. A device whose
    /// reactor died is dead until the process reopens it.
    pub(super) fn fail_all(&self, reason: Arc<str>) {
        *self.failure.lock() = Some(reason.clone());
        // Before the first drain of `local` below: a task woken from now on
        // is cancelled where it is scheduled, one woken before is drained.
        self.failed.store(true, Ordering::SeqCst);
        self.tasks_closed.store(true, Ordering::SeqCst);
        // `closed` before looking at `active`: see `submit`.
        self.closed.store(true, Ordering::SeqCst);
        self.permits.close();
        let mut passes = 0u32;
        loop {
            while self.queue.pop().is_some() {}
            while let Some(runnable) = self.local.pop() {
                drop(runnable);
            }
            for index in 0..self.slots.len() as u32 {
                let mut state = self.slot(index).lock();
                if !state.in_use || state.outcome.is_some() {
                    continue;
                }
                if state.in_kernel
                    && let Some(buf) = state.buf.take()
                {
                    std::mem::forget(buf);
                    state.buf = Some(DmaBuf::alloc_zeroed(0));
                }
                if state.abandoned {
                    let (buf, waker) = state.reset();
                    drop(state);
                    drop((buf, waker));
                } else {
                    state.outcome = Some(Err(self.failed_error(reason.clone())));
                    let waker = state.waker.take();
                    drop(state);
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                }
                self.active.fetch_sub(1, Ordering::SeqCst);
            }
            if self.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            // A submitter that counted itself in before `closed` was set is
            // filling its slot right now; it is failed on the next pass. If
            // the panic struck between recording an outcome and counting it
            // (in `complete`), `active` never reaches zero: the thread then
            // keeps looking, slowly, for as long as the process lives.
            passes += 1;
            if passes < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }

    /// Queues an I/O and returns the future of its outcome. `Err` gives the
    /// buffer back when the device is shut down.
    pub(super) async fn submit(
        &self,
        op: IoOp,
        offset: u64,
        len: u64,
        buf: Option<DmaBuf>,
    ) -> (Option<DmaBuf>, Result<(), DeviceError>) {
        match self.permits.acquire().await {
            // The permit now belongs to the slot we are about to take; it is
            // given back by `release` when the slot is freed.
            Ok(permit) => permit.forget(),
            Err(_closed) => return (buf, Err(self.closed_error())),
        }
        // Dekker-style handshake with the reactor's exit check: we announce
        // the I/O before looking at `closed`, the shutdown path sets `closed`
        // before the reactor looks at `active`, all SeqCst, so either we see
        // `closed` or the reactor sees our I/O and stays to serve it.
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.active.fetch_sub(1, Ordering::SeqCst);
            self.permits.add_permits(1);
            // The reactor may be asleep waiting for `active` to drain.
            self.wake_reactor();
            return (buf, Err(self.closed_error()));
        }
        let index = self
            .free
            .pop()
            .expect("a queue-depth permit guarantees a free slot");
        {
            let mut state = self.slot(index).lock();
            state.op = op;
            state.offset = offset;
            state.len = len;
            state.buf = buf;
            state.in_use = true;
        }
        self.queue
            .push(index)
            .expect("the submission queue holds every slot");
        self.notify();
        Pending {
            shared: self,
            index,
            finished: false,
        }
        .await
    }

    /// Wakes the reactor if it sleeps, after a submission or a task wake-up.
    pub(super) fn notify(&self) {
        // Pairs with the fence in the reactor's sleep path: either the
        // reactor sees our queue push when it re-checks the queue after
        // raising `sleeping`, or we see `sleeping` here. Without the fences
        // both could miss each other and the I/O would wait for an unrelated
        // wake-up.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::Relaxed) {
            // Only the submitter that flips the flag pays for the syscall.
            self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
            self.wake_reactor();
        }
    }

    /// Completes the reactor's armed eventfd read, ending its sleep.
    pub(super) fn wake_reactor(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an eventfd we own. The
        // only possible failure (EAGAIN when the counter would overflow)
        // means a wake-up is already pending, so the result is ignored.
        unsafe { libc::write(self.eventfd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Returns a finished slot to the free list and its permit to the
    /// semaphore, waking one waiting submitter.
    pub(super) fn release(&self, index: u32) {
        self.free
            .push(index)
            .expect("the free list holds every slot");
        self.permits.add_permits(1);
    }
}

/// Waits for a queued I/O's outcome. Dropping it before the outcome is known
/// abandons the I/O to the reactor, which finishes it and drops its buffer.
pub(super) struct Pending<'a> {
    shared: &'a Shared,
    index: u32,
    finished: bool,
}

impl Future for Pending<'_> {
    type Output = (Option<DmaBuf>, Result<(), DeviceError>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut state = this.shared.slot(this.index).lock();
        if let Some(outcome) = state.outcome.take() {
            let (buf, waker) = state.reset();
            drop(state);
            drop(waker);
            this.finished = true;
            this.shared.release(this.index);
            return Poll::Ready((buf, outcome));
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            waker => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut state = self.shared.slot(self.index).lock();
        if state.outcome.is_some() {
            // Finished but never polled again: release it ourselves.
            let (buf, waker) = state.reset();
            drop(state);
            drop((buf, waker));
            self.shared.release(self.index);
        } else {
            // Still queued or in the kernel: the buffer must outlive the
            // kernel's use of it, so the reactor releases the slot.
            state.abandoned = true;
            let waker = state.waker.take();
            drop(state);
            drop(waker);
        }
    }
}
