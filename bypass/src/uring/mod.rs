//! The io_uring backend: [`UringDevice`] serves the [`BlockDevice`] contract
//! from a raw block device or a regular file opened with `O_DIRECT`.
//!
//! This module owns the device's open and geometry discovery, its io_uring
//! rings and their start-up probe, and the reactor thread that drives them.
//!
//! # Design
//!
//! Each device has one reactor thread (`flyfs-uring-<n>`), the shape of an
//! SPDK poll-mode reactor. Submitters, on any thread and under any executor
//! (the futures use only [`Waker`](std::task::Waker)s, no runtime), take one
//! of `queue_depth` pre-allocated slots, park their request in it and push the
//! slot's index onto a lock-free queue. The reactor drains that queue into
//! SQEs, submits the whole batch with one syscall, reaps CQEs and wakes the
//! futures. At most `queue_depth` I/Os are in flight; further submitters wait
//! asynchronously for a slot. When idle, the reactor busy-polls for
//! `poll_spin_us` and then sleeps in the kernel until a completion arrives or
//! a submitter wakes it through an eventfd (see `reactor.rs`), so an idle
//! device costs no CPU.
//!
//! Where the kernel allows it the reactor uses the device file registered
//! with the ring, the [`BufferPool`]'s arena registered as fixed buffers
//! (so pooled buffers skip page pinning on every I/O), deferred task running,
//! SQPOLL when asked for, and IOPOLL when a test read proves the device
//! supports it. [`UringDevice::features`] reports what is in use.

mod file;
mod reactor;
mod ring;
mod shared;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use self::shared::Shared;
use crate::{BlockDevice, BufferPool, DeviceError, DmaBuf, Geometry, IoCompletion, IoOp};

pub use crate::Task;

/// The kernel's limit on io_uring entries.
const QUEUE_DEPTH_MAX: u32 = 32768;

/// Whether reads and writes use a polled (`IORING_SETUP_IOPOLL`) ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoPoll {
    /// Use IOPOLL if a test read at open shows the device supports it.
    #[default]
    Auto,
    /// Never use IOPOLL.
    Off,
    /// Fail to open if IOPOLL does not work.
    On,
}

/// How to drive a [`UringDevice`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UringConfig {
    /// Most I/Os in flight at once; further submitters wait. 1 to 32768.
    pub queue_depth: u32,
    /// Let a kernel thread poll the submission queue, saving the submit
    /// syscall (at the cost of a kernel thread spinning while busy). Falls
    /// back to normal submission, with a warning, if the kernel refuses.
    pub sqpoll: bool,
    /// How long the SQPOLL kernel thread spins idle before sleeping.
    pub sqpoll_idle_ms: u32,
    pub iopoll: IoPoll,
    /// How long the reactor busy-polls after its last piece of work before
    /// it sleeps in the kernel; 0 sleeps at once.
    ///
    /// The default is 0 because spinning lost on the 2-vCPU virtual machine
    /// this was tuned on (4 KiB random reads on a virtio disk): at depth 1
    /// the mean latency was 79-97 us without spinning and 94-102 us with 50
    /// us of spin (10-20 us was worse still, as the reactor gave up just
    /// before the next submission arrived); at depth 64 it was ~92k IOPS
    /// against ~85k, for half the CPU. A spinning vCPU competes with the
    /// hypervisor's I/O emulation and with the application for few cores. On
    /// bare metal with NVMe, where completions arrive within microseconds,
    /// a spin of 20-50 us saves the sleep and wake-up per burst and is
    /// worth trying.
    pub poll_spin_us: u32,
    /// Register the buffer pool's arena with the ring, when a pool is given.
    pub register_buffers: bool,
    /// Register the device file with the ring.
    pub register_files: bool,
}

impl Default for UringConfig {
    fn default() -> Self {
        UringConfig {
            queue_depth: 128,
            sqpoll: false,
            sqpoll_idle_ms: 100,
            iopoll: IoPoll::Auto,
            poll_spin_us: 0,
            register_buffers: true,
            register_files: true,
        }
    }
}

/// What a [`UringDevice`] actually uses, as found by the probe at open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringFeatures {
    pub queue_depth: u32,
    /// A kernel thread polls the submission queue.
    pub sqpoll: bool,
    /// Reads and writes complete by polling (`IORING_SETUP_IOPOLL`).
    pub iopoll: bool,
    /// The buffer pool's arena is registered: pooled buffers use
    /// `READ_FIXED`/`WRITE_FIXED`.
    pub registered_buffers: bool,
    /// The device file is registered with the ring.
    pub registered_files: bool,
    /// Completions run only when the reactor asks (`DEFER_TASKRUN`).
    pub defer_taskrun: bool,
    /// Completions do not interrupt the reactor (`COOP_TASKRUN`).
    pub coop_taskrun: bool,
    /// The medium is a block device (otherwise a regular file).
    pub block_device: bool,
}

impl fmt::Display for UringFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |flag: bool| if flag { "on" } else { "off" };
        let completions = if self.defer_taskrun {
            "deferred"
        } else if self.coop_taskrun {
            "cooperative"
        } else {
            "signalled"
        };
        write!(
            f,
            "queue depth {}, sqpoll {}, iopoll {}, registered buffers {}, registered files {}, completions {}, {}",
            self.queue_depth,
            on(self.sqpoll),
            on(self.iopoll),
            on(self.registered_buffers),
            on(self.registered_files),
            completions,
            if self.block_device {
                "block device"
            } else {
                "regular file"
            },
        )
    }
}

/// Counters of the reactor's work, for tuning and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringStats {
    /// I/Os the reactor took from the submission queue.
    pub submitted: u64,
    /// I/Os finished (successfully or not).
    pub completed: u64,
    /// `io_uring_enter` calls by the reactor (submission under SQPOLL is not
    /// counted: it usually needs none).
    pub enters: u64,
    /// Times the reactor slept in the kernel after spinning idle.
    pub sleeps: u64,
    /// Eventfd writes by submitters that found the reactor asleep.
    pub wakeups: u64,
    /// SQEs resubmitted for short transfers or `EAGAIN`.
    pub resubmits: u64,
}

/// How [`BlockDevice::discard`] reaches the medium.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DiscardPath {
    /// `IORING_OP_FALLOCATE` punching a hole in a regular file.
    Ring,
    /// Synchronous `fallocate` on a kernel without the opcode.
    PunchHole,
    /// Synchronous `BLKDISCARD` ioctl on a block device.
    BlockIoctl,
}

/// An io_uring block device. Cloning is cheap and shares the device; the
/// reactor stops when the last clone is dropped (or at [`shutdown`]).
///
/// [`shutdown`]: UringDevice::shutdown
#[derive(Clone)]
pub struct UringDevice {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    features: UringFeatures,
    discard: DiscardPath,
    reactor: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringDevice")
            .field("name", &self.inner.shared.name)
            .field("geometry", &self.inner.shared.geometry)
            .field("features", &self.inner.features)
            .finish()
    }
}

impl UringDevice {
    /// Opens a block device or regular file for `O_DIRECT` I/O and starts its
    /// reactor. If `pool` is given, its arena is registered with the ring and
    /// buffers from it take the fixed-buffer path.
    ///
    /// Fails with [`DeviceError::Open`] naming the problem: a missing path,
    /// something that is neither a regular file nor a block device, an empty
    /// or too small file, a file system without `O_DIRECT`, a kernel without
    /// the io_uring features needed, or `IoPoll::On` on a device that cannot
    /// poll.
    pub fn open(
        path: impl AsRef<Path>,
        config: &UringConfig,
        pool: Option<&BufferPool>,
    ) -> Result<UringDevice, DeviceError> {
        let path = path.as_ref();
        if !(1..=QUEUE_DEPTH_MAX).contains(&config.queue_depth) {
            return Err(DeviceError::Open {
                path: path.display().to_string(),
                reason: format!(
                    "queue depth {} is not between 1 and {QUEUE_DEPTH_MAX}",
                    config.queue_depth
                ),
                source: None,
            });
        }
        let opened = file::open_direct(path)?;
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(DeviceError::Open {
                path: path.display().to_string(),
                reason: "cannot create the reactor's eventfd".into(),
                source: Some(std::io::Error::last_os_error()),
            });
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let name: Arc<str> = path.display().to_string().into();
        let shared = Arc::new(Shared::new(
            name,
            opened.geometry,
            opened.file,
            config.queue_depth,
            eventfd,
        ));
        let started = reactor::start(
            Arc::clone(&shared),
            config,
            pool.cloned(),
            opened.block_device,
        )?;
        let features = started.features;
        tracing::info!(
            device = %shared.name,
            sector_size = shared.geometry.sector_size,
            capacity_bytes = shared.geometry.capacity_bytes,
            "io_uring device open: {features}"
        );
        let discard = if opened.block_device {
            DiscardPath::BlockIoctl
        } else if started.fallocate {
            DiscardPath::Ring
        } else {
            DiscardPath::PunchHole
        };
        Ok(UringDevice {
            inner: Arc::new(Inner {
                shared,
                features,
                discard,
                reactor: Mutex::new(Some(started.handle)),
            }),
        })
    }

    /// Creates the regular file at `path` if needed, makes it exactly
    /// `size_bytes` long (allocating the space up front where the file
    /// system can) and opens it. `size_bytes` must be a positive multiple of
    /// 4096. Handy for benchmarks and tests.
    pub fn create_file(
        path: impl AsRef<Path>,
        size_bytes: u64,
        config: &UringConfig,
        pool: Option<&BufferPool>,
    ) -> Result<UringDevice, DeviceError> {
        let path = path.as_ref();
        file::create_sized(path, size_bytes)?;
        UringDevice::open(path, config, pool)
    }

    /// What the start-up probe chose.
    pub fn features(&self) -> UringFeatures {
        self.inner.features
    }

    /// The reactor's counters so far.
    pub fn stats(&self) -> UringStats {
        let counters = &self.inner.shared.counters;
        UringStats {
            submitted: counters.submitted.load(Ordering::Relaxed),
            completed: counters.completed.load(Ordering::Relaxed),
            enters: counters.enters.load(Ordering::Relaxed),
            sleeps: counters.sleeps.load(Ordering::Relaxed),
            wakeups: counters.wakeups.load(Ordering::Relaxed),
            resubmits: counters.resubmits.load(Ordering::Relaxed),
        }
    }

    /// Stops the device for every clone: I/Os not yet admitted fail with
    /// [`DeviceError::Closed`], I/Os in flight complete normally, and this
    /// call returns once the reactor has finished them and exited. Later
    /// operations fail with [`DeviceError::Closed`]. Dropping the last clone
    /// does the same.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Runs `future` on this device's reactor thread, SPDK's run-to-completion
    /// model: I/O the task issues goes straight into the ring and its
    /// completion wakes the task on the same thread, with no hand-off between
    /// threads. Use it for request handlers that mostly wait on this device;
    /// a task that computes for long delays every other I/O of the device.
    ///
    /// The returned [`Task`] is a future of the output, awaitable from any
    /// thread or runtime; dropping it cancels the task (`detach` keeps it
    /// running). A panic in the task is raised where the `Task` is awaited,
    /// never on the reactor. Tasks ready to run when the device shuts down,
    /// or when its reactor dies, are cancelled, and so is any task woken or
    /// spawned after; a task waiting on something that never wakes it stays
    /// pending until its `Task` is dropped.
    pub fn spawn<F>(&self, future: F) -> Task<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let shared = Arc::clone(&self.inner.shared);
        let schedule = move |runnable: async_task::Runnable| {
            if shared.tasks_closed.load(Ordering::SeqCst) {
                // No reactor will ever run it: cancel the task (its `Task`
                // resolves as cancelled) rather than leave it queued forever.
                drop(runnable);
                return;
            }
            shared.local.push(runnable);
            if shared.tasks_closed.load(Ordering::SeqCst) {
                // The reactor stopped between the check and the push, and
                // may have drained the queue before it.
                while let Some(runnable) = shared.local.pop() {
                    drop(runnable);
                }
                return;
            }
            shared.notify();
        };
        crate::spawn_task(future, schedule)
    }

    /// Test hook: the reactor panics when it next takes an I/O from its
    /// queue, as a bug in it would. That I/O, every other one queued or in
    /// flight, and every later one then fail with [`DeviceError::Failed`].
    #[cfg(feature = "testing")]
    pub fn inject_reactor_panic(&self) {
        self.inner
            .shared
            .panic_on_next_io
            .store(true, Ordering::SeqCst);
    }

    fn is_closed(&self) -> bool {
        self.inner.shared.closed.load(Ordering::Relaxed)
    }

    async fn read_write(&self, op: IoOp, offset: u64, buf: DmaBuf) -> IoCompletion {
        let shared = &*self.inner.shared;
        if self.is_closed() {
            return IoCompletion {
                buf,
                result: Err(shared.closed_error()),
            };
        }
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
        if len == 0 {
            return IoCompletion {
                buf,
                result: Ok(()),
            };
        }
        let (buf, result) = shared.submit(op, offset, len, Some(buf)).await;
        IoCompletion {
            buf: buf.expect("a read or write slot gives its buffer back"),
            result,
        }
    }
}

impl Inner {
    fn shutdown(&self) {
        let shared = &self.shared;
        // `closed` before the reactor looks at `active`: see `Shared::submit`.
        shared.closed.store(true, Ordering::SeqCst);
        shared.permits.close();
        shared.wake_reactor();
        let Some(handle) = self.reactor.lock().take() else {
            return;
        };
        if handle.thread().id() == std::thread::current().id() {
            // The last handle was dropped by a waker the reactor itself
            // invoked; it notices `closed` and exits on its own.
            return;
        }
        if handle.join().is_err() {
            tracing::error!(device = %shared.name, "the io_uring reactor thread panicked");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl BlockDevice for UringDevice {
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
        if self.is_closed() {
            return Err(shared.closed_error());
        }
        shared.submit(IoOp::Flush, 0, 0, None).await.1
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let shared = &*self.inner.shared;
        if self.is_closed() {
            return Err(shared.closed_error());
        }
        shared.geometry.check(IoOp::Discard, offset, len, 0)?;
        if len == 0 {
            return Ok(());
        }
        let sync_result = match self.inner.discard {
            DiscardPath::Ring => return shared.submit(IoOp::Discard, offset, len, None).await.1,
            DiscardPath::BlockIoctl => file::block_discard(&shared.file, offset, len),
            DiscardPath::PunchHole => file::punch_hole(&shared.file, offset, len),
        };
        match sync_result {
            Ok(()) => Ok(()),
            // Discard is advisory: a device that cannot do it has done all
            // that was asked.
            Err(error) if error.raw_os_error().is_some_and(file::discard_unsupported) => Ok(()),
            Err(source) => Err(DeviceError::Io {
                device: Arc::clone(&shared.name),
                op: IoOp::Discard,
                offset,
                len,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_matches_the_documented_defaults() {
        let config = UringConfig::default();
        assert_eq!(config.queue_depth, 128);
        assert!(!config.sqpoll);
        assert_eq!(config.iopoll, IoPoll::Auto);
        assert_eq!(config.poll_spin_us, 0);
    }

    #[test]
    fn features_display_names_every_choice() {
        let features = UringFeatures {
            queue_depth: 64,
            sqpoll: false,
            iopoll: false,
            registered_buffers: true,
            registered_files: true,
            defer_taskrun: true,
            coop_taskrun: false,
            block_device: false,
        };
        assert_eq!(
            features.to_string(),
            "queue depth 64, sqpoll off, iopoll off, registered buffers on, registered files on, \
             completions deferred, regular file"
        );
    }

    #[test]
    fn zero_queue_depth_is_refused() {
        let config = UringConfig {
            queue_depth: 0,
            ..UringConfig::default()
        };
        let error = UringDevice::open("/nonexistent", &config, None).expect_err("depth 0");
        assert!(error.to_string().contains("queue depth 0"), "{error}");
    }
}
