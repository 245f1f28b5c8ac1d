//! Building and probing the rings, on the reactor thread (a ring set up with
//! `SINGLE_ISSUER` belongs to the thread that creates it).
//!
//! The probe decides, and [`UringFeatures`] reports, what is actually used:
//! which task-run mode the kernel accepted, whether SQPOLL was granted,
//! whether IOPOLL works on this device (tested with a real read, never
//! assumed), and whether the file and the buffer pool could be registered.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, Probe, opcode, squeue, types};

use super::shared::Shared;
use super::{IoPoll, UringConfig, UringFeatures};
use crate::{BufferPool, DeviceError, DmaBuf};

/// How the kernel delivers completions to the reactor thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TaskRun {
    /// `SINGLE_ISSUER | DEFER_TASKRUN`: completions are queued until the
    /// reactor enters the kernel asking for events, so a busy reactor is
    /// never interrupted and handles them in batches.
    Deferred,
    /// `COOP_TASKRUN`: like the default but without interrupting the reactor
    /// with an IPI; it runs pending work when the `TASKRUN` flag asks it to.
    Cooperative,
    /// The default: the kernel interrupts the reactor to post completions.
    Signal,
}

/// A ring and how SQEs name the device in it.
pub(super) struct Ring {
    pub(super) ring: IoUring,
    /// The device as SQEs name it: index 0 of the registered file table
    /// (with `FIXED_FILE` in `fd_flags`), or the raw file descriptor.
    pub(super) fd: RawFd,
    pub(super) fd_flags: squeue::Flags,
    pub(super) iopoll: bool,
    /// SQEs pushed whose CQE has not been reaped (the eventfd read aside).
    pub(super) in_flight: u32,
    /// The id of the buffer pool whose arena is registered with this ring,
    /// if any. Registration belongs to one ring, not to the device: only
    /// SQEs for this ring may name a fixed buffer, so `build_entry` asks the
    /// ring it builds for, never a device-wide flag (after IOPOLL demotion,
    /// reads and writes move to a ring that may have no registered buffers).
    pub(super) fixed_pool: Option<u64>,
}

impl Drop for Ring {
    /// Drops the ring's references to the device file and the buffer pool
    /// now. Closing a ring tears it down asynchronously in the kernel, so
    /// without this the device could stay open (and a block device stay
    /// exclusively claimed) for a while after the ring is gone, making an
    /// immediate re-open fail with `EBUSY`. Rings are created and dropped
    /// on the reactor thread, as `SINGLE_ISSUER` requires for these calls.
    fn drop(&mut self) {
        let submitter = self.ring.submitter();
        if self.fixed_pool.is_some()
            && let Err(error) = submitter.unregister_buffers()
        {
            tracing::debug!(%error, "unregistering the buffer pool failed");
        }
        if self.registered_file()
            && let Err(error) = submitter.unregister_files()
        {
            tracing::debug!(%error, "unregistering the device file failed");
        }
    }
}

impl Ring {
    pub(super) fn new(ring: IoUring, raw_fd: RawFd, iopoll: bool) -> Ring {
        Ring {
            ring,
            fd: raw_fd,
            fd_flags: squeue::Flags::empty(),
            iopoll,
            in_flight: 0,
            fixed_pool: None,
        }
    }

    /// Registers `pool`'s arena as this ring's fixed buffers.
    pub(super) fn register_pool(&mut self, pool: &BufferPool) -> io::Result<()> {
        let iovecs: Vec<libc::iovec> = pool
            .regions()
            .into_iter()
            .map(|(base, len)| libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            })
            .collect();
        // SAFETY: the regions are the pool's arena, which stays mapped while
        // the reactor holds its clone of the pool, and the reactor drops the
        // rings (ending the registration) before that clone.
        unsafe { self.ring.submitter().register_buffers(&iovecs) }?;
        self.fixed_pool = Some(pool.id());
        Ok(())
    }

    /// Registers the device file so SQEs skip the per-I/O file lookup and
    /// reference counting.
    fn register_file(&mut self, raw_fd: RawFd) -> io::Result<()> {
        self.ring.submitter().register_files(&[raw_fd])?;
        self.fd = 0;
        self.fd_flags = squeue::Flags::FIXED_FILE;
        Ok(())
    }

    pub(super) fn registered_file(&self) -> bool {
        self.fd_flags.contains(squeue::Flags::FIXED_FILE)
    }

    pub(super) fn sqpoll(&self) -> bool {
        self.ring.params().is_setup_sqpoll()
    }
}

/// The outcome of start-up.
pub(super) struct Setup {
    /// Reads and writes go here; it is the IOPOLL ring when IOPOLL works.
    pub(super) data: Ring,
    /// Flushes, discards and the eventfd read, when `data` is an IOPOLL ring
    /// (which only accepts pollable reads and writes).
    pub(super) ctl: Option<Ring>,
    pub(super) features: UringFeatures,
    /// The ring can punch holes (`IORING_OP_FALLOCATE`).
    pub(super) fallocate: bool,
}

fn setup_error(
    shared: &Shared,
    reason: impl Into<String>,
    source: Option<io::Error>,
) -> DeviceError {
    DeviceError::Open {
        path: shared.name.to_string(),
        reason: reason.into(),
        source,
    }
}

/// Builds a normal (interrupt-driven) ring, trying the cheapest completion
/// mode first and falling back on kernels that refuse it.
fn build_normal(entries: u32, sqpoll_idle_ms: Option<u32>) -> io::Result<(IoUring, TaskRun)> {
    // DEFER_TASKRUN cannot be combined with SQPOLL: the kernel thread, not
    // ours, runs the completions there.
    let modes: &[TaskRun] = if sqpoll_idle_ms.is_some() {
        &[TaskRun::Signal]
    } else {
        &[TaskRun::Deferred, TaskRun::Cooperative, TaskRun::Signal]
    };
    let mut last_error = None;
    for &mode in modes {
        let mut builder = IoUring::builder();
        // The ring's memory must not be shared with a forked child (tests
        // and tools fork helpers), and `clamp` caps a large depth at the
        // kernel's maximum instead of failing.
        builder.dontfork().setup_clamp();
        if let Some(idle) = sqpoll_idle_ms {
            builder.setup_sqpoll(idle);
        }
        match mode {
            TaskRun::Deferred => {
                builder
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag();
            }
            TaskRun::Cooperative => {
                builder.setup_coop_taskrun().setup_taskrun_flag();
            }
            TaskRun::Signal => {}
        }
        match builder.build(entries) {
            Ok(ring) => return Ok((ring, mode)),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.expect("at least one completion mode is tried"))
}

fn build_iopoll(entries: u32, sqpoll_idle_ms: Option<u32>) -> io::Result<IoUring> {
    let mut builder = IoUring::builder();
    builder.dontfork().setup_clamp().setup_iopoll();
    if let Some(idle) = sqpoll_idle_ms {
        builder.setup_sqpoll(idle);
    }
    builder.build(entries)
}

/// Reads one sector through an IOPOLL ring: the only reliable test, since
/// a kernel accepts IOPOLL rings on any device and fails the I/O later
/// (`EOPNOTSUPP` when the driver has no poll queues). `offset` must hold
/// written data, or the file system answers without asking the device.
fn iopoll_read_works(ring: &mut Ring, offset: u64, sector_size: u32) -> io::Result<()> {
    let mut buf = DmaBuf::alloc_zeroed(sector_size as usize);
    let entry = opcode::Read::new(types::Fd(ring.fd), buf.window_mut_ptr(), sector_size)
        .offset(offset)
        .build()
        .flags(ring.fd_flags)
        .user_data(0);
    // SAFETY: `buf` stays alive until the CQE is reaped below, or is leaked
    // if we cannot tell whether the kernel is done with it.
    unsafe { ring.ring.submission().push(&entry) }
        .map_err(|_| io::Error::other("a fresh ring's SQ is full"))?;
    loop {
        match ring.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                std::mem::forget(buf);
                return Err(error);
            }
        }
        if let Some(cqe) = ring.ring.completion().next() {
            drop(buf);
            let res = cqe.result();
            return match res {
                res if res < 0 => Err(io::Error::from_raw_os_error(-res)),
                res if res as u32 == sector_size => Ok(()),
                res => Err(io::Error::other(format!(
                    "polled read returned {res} of {sector_size} bytes"
                ))),
            };
        }
    }
}

/// Whether the block layer polls the queue under `file` (a block device, or
/// the device of the file system a file lives on): its `queue/io_poll` in
/// sysfs. A kernel takes IOPOLL rings and even polled reads on a queue that
/// cannot poll (an NVMe drive without `nvme.poll_queues`, the default), and
/// completes them by interrupt behind the ring's back: the probe read passed
/// on such a drive while the reactor's reads then never completed (Linux
/// 6.1, emulated NVMe). So IOPOLL is used only where the queue says it polls.
fn queue_polls(file: &std::fs::File, block_device: bool) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    let dev = if block_device {
        meta.rdev()
    } else {
        meta.dev()
    };
    // The kernel's encoding of dev_t (glibc's `major` and `minor`).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let node = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    // A partition's queue is its disk's, one directory up.
    let queue = if node.join("partition").exists() {
        node.join("../queue/io_poll")
    } else {
        node.join("queue/io_poll")
    };
    let value = std::fs::read_to_string(&queue).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!(
                "cannot read {} ({error}): no block queue to poll",
                queue.display()
            ),
        )
    })?;
    match value.trim() {
        "1" => Ok(()),
        other => Err(io::Error::other(format!(
            "the block layer does not poll this device's queue ({} is {other}; \
             NVMe needs the nvme module's poll_queues above 0)",
            queue.display()
        ))),
    }
}

/// Where the IOPOLL probe can read a sector that the device must serve.
fn iopoll_probe_offset(shared: &Shared, block_device: bool) -> io::Result<u64> {
    if block_device {
        return Ok(0);
    }
    match super::file::first_data_offset(&shared.file, shared.geometry.sector_size)? {
        Some(offset) if offset < shared.geometry.capacity_bytes => Ok(offset),
        _ => Err(io::Error::other(
            "the file holds no written data, so a polled read cannot be verified to reach the device",
        )),
    }
}

/// Sets up the rings for `shared`'s device as `config` asks, degrading
/// gracefully where the kernel or the device refuses an optional feature.
pub(super) fn setup(
    shared: &Shared,
    config: &UringConfig,
    pool: Option<&BufferPool>,
    block_device: bool,
) -> Result<Setup, DeviceError> {
    let raw_fd = shared.file.as_raw_fd();
    // One entry per slot plus the eventfd read, so the SQ and CQ (twice the
    // SQ) can never overflow.
    let entries = config.queue_depth + 1;
    let mut sqpoll_idle = config.sqpoll.then_some(config.sqpoll_idle_ms);
    let (normal, task_run) = match build_normal(entries, sqpoll_idle) {
        Ok(built) => built,
        Err(error) if sqpoll_idle.is_some() => {
            tracing::warn!(device = %shared.name, %error, "the kernel refused an SQPOLL ring; submitting with syscalls");
            sqpoll_idle = None;
            build_normal(entries, None)
                .map_err(|error| setup_error(shared, "io_uring_setup failed", Some(error)))?
        }
        Err(error) => return Err(setup_error(shared, "io_uring_setup failed", Some(error))),
    };
    let mut normal = Ring::new(normal, raw_fd, false);

    let mut probe = Probe::new();
    normal
        .ring
        .submitter()
        .register_probe(&mut probe)
        .map_err(|error| {
            setup_error(
                shared,
                "cannot probe io_uring opcodes (Linux 5.6 or later is needed)",
                Some(error),
            )
        })?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
    ] {
        if !probe.is_supported(code) {
            return Err(setup_error(
                shared,
                format!("the kernel's io_uring lacks the {name} opcode"),
                None,
            ));
        }
    }
    let fixed_ops =
        probe.is_supported(opcode::ReadFixed::CODE) && probe.is_supported(opcode::WriteFixed::CODE);
    let fallocate = probe.is_supported(opcode::Fallocate::CODE);

    if config.register_files
        && let Err(error) = normal.register_file(raw_fd)
    {
        tracing::info!(device = %shared.name, %error, "cannot register the device file; using its descriptor");
    }

    // IOPOLL: only on a queue the block layer polls, and proven with a real
    // read, never assumed.
    let mut polled = None;
    if config.iopoll != IoPoll::Off {
        let attempt = queue_polls(&shared.file, block_device)
            .and_then(|()| iopoll_probe_offset(shared, block_device))
            .and_then(|offset| {
                let mut ring = Ring::new(build_iopoll(entries, sqpoll_idle)?, raw_fd, true);
                if config.register_files {
                    // A failure here only costs the fixed-file optimisation.
                    let _ = ring.register_file(raw_fd);
                }
                iopoll_read_works(&mut ring, offset, shared.geometry.sector_size).map(|()| ring)
            });
        match attempt {
            Ok(ring) => polled = Some(ring),
            Err(error) if config.iopoll == IoPoll::On => {
                return Err(setup_error(
                    shared,
                    "IOPOLL was required but does not work on this device",
                    Some(error),
                ));
            }
            Err(error) => {
                tracing::debug!(device = %shared.name, %error, "IOPOLL does not work on this device; using interrupts");
            }
        }
    }
    let (mut data, ctl) = match polled {
        Some(polled) => (polled, Some(normal)),
        None => (normal, None),
    };

    if let Some(pool) = pool.filter(|_| config.register_buffers) {
        if fixed_ops {
            // Only the ring that carries reads and writes gets the buffers:
            // the normal ring beside an IOPOLL ring carries flushes and
            // discards, until a demotion sends reads and writes there too,
            // without fixed buffers (each ring says whether it has them).
            if let Err(error) = data.register_pool(pool) {
                tracing::warn!(
                    device = %shared.name,
                    %error,
                    bytes = pool.stats().arena_bytes,
                    "cannot register the buffer pool (RLIMIT_MEMLOCK too low?); using unregistered buffers"
                );
            }
        } else {
            tracing::info!(device = %shared.name, "the kernel lacks READ_FIXED/WRITE_FIXED; using unregistered buffers");
        }
    }

    let features = UringFeatures {
        queue_depth: config.queue_depth,
        sqpoll: data.sqpoll(),
        iopoll: data.iopoll,
        registered_buffers: data.fixed_pool.is_some(),
        registered_files: data.registered_file(),
        defer_taskrun: task_run == TaskRun::Deferred,
        coop_taskrun: task_run == TaskRun::Cooperative,
        block_device,
    };
    Ok(Setup {
        data,
        ctl,
        features,
        fallocate,
    })
}
