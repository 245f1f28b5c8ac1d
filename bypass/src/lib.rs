//! The block layer of a flyfs storage node: what SPDK gives 3FS-class systems,
//! built on what Linux gives us.
//!
//! Everything above this crate reaches a storage medium only through the
//! [`BlockDevice`] trait. The implementations living here:
//!
//! * [`uring::UringDevice`]: io_uring over a raw block device or a regular file
//!   opened with `O_DIRECT`, driven by a dedicated polling reactor thread per
//!   device (the shape of SPDK's poll-mode driver).
//! * [`nvme::NvmeDevice`]: a userspace polled-mode NVMe driver over VFIO
//!   (SPDK's method): controller registers mapped, queue pairs in our memory,
//!   the buffer pool's arena mapped into the IOMMU, completions polled.
//!   Selected by the device name `vfio:<PCI address>` through
//!   [`open_device`], which returns an [`AnyDevice`].
//! * [`mem::MemDevice`]: a RAM device that models a volatile write cache, so a
//!   simulated power cut loses or tears every write not yet flushed.
//! * [`fault::FaultyDevice`]: wraps any device and injects seeded,
//!   deterministic faults (failed I/Os, EIO ranges, corrupted reads, power cuts).
//!
//! # The `BlockDevice` contract
//!
//! * **Geometry.** A device has a logical sector size (a power of two, 512 to
//!   4096 bytes) and a capacity that is a multiple of it.
//! * **Alignment.** Every read and write names a device offset, and its length
//!   is the buffer's window ([`DmaBuf::len`]). Offset, length and the window's
//!   memory address must all be multiples of the sector size, and the range
//!   must lie inside the capacity; otherwise the I/O fails with
//!   [`DeviceError::Misaligned`] or [`DeviceError::OutOfRange`] before it
//!   reaches the medium.
//! * **Buffers.** Data moves only between the device and [`DmaBuf`]s: aligned,
//!   pinned-for-the-duration memory that a DMA engine may address. An I/O takes
//!   its buffer by value and hands it back in the [`IoCompletion`], so the
//!   buffer cannot be touched while the device may be writing into it. If the
//!   future of an I/O is dropped, the I/O still runs to completion and the
//!   device drops the buffer afterwards.
//! * **Concurrency.** Many I/Os may be in flight at once, from any number of
//!   tasks or threads. The device does not order them: two overlapping writes
//!   in flight together land in an unspecified order, and a read that overlaps
//!   a write in flight sees, per sector, either the old or the new contents.
//!   Callers that need an order wait for the first completion.
//! * **Durability.** A completed write is visible to later reads but may sit in
//!   a volatile cache. [`BlockDevice::flush`] is a barrier: when it completes,
//!   every write that completed before the flush was *issued* is durable. A
//!   power cut may lose any write not covered by a completed flush, and may
//!   persist any subset of the sectors of such a write (a torn write). A single
//!   sector is written atomically: after a power cut it holds either its old
//!   or its new contents, never a mixture.
//! * **Discard.** [`BlockDevice::discard`] tells the device a range's contents
//!   are no longer needed; afterwards reads of the range may return zeros or
//!   the old data. It is advisory and never required for correctness.
//! * **Errors.** A failed I/O reports [`DeviceError::Io`] with the operation,
//!   range and the OS error. After a failed write or flush the caller must
//!   assume that any write since the last successful flush may or may not be
//!   durable (the lesson of "fsyncgate"); the chunk engine poisons itself.
//!
//! # The NVMe backend
//!
//! docs/nvme-vfio.md is its design: the initialisation sequence, queues, DMA
//! mapping, timeouts and failure, and what SPDK would add. Its errors add
//! [`DeviceError::Command`] (a completion status, named) and
//! [`DeviceError::TimedOut`] (a command aborted after its timeout).

pub mod any;
pub mod buf;
pub mod fault;
pub mod mem;
pub mod nvme;
pub mod uring;

use std::fmt;
use std::future::Future;
use std::sync::Arc;

pub use any::{AnyDevice, DeviceConfig, open_device};
/// A task running on a device's reactor thread: see
/// [`uring::UringDevice::spawn`] and [`nvme::NvmeDevice::spawn`].
pub use async_task::Task;
pub use buf::{BufferPool, DmaBuf, HugePages, PoolConfig, PoolError, PoolStats};

/// Largest logical sector size any backend may report; on-device formats
/// above this layer align their structures to it.
pub const SECTOR_SIZE_MAX: usize = 4096;
/// Smallest logical sector size any backend may report.
pub const SECTOR_SIZE_MIN: usize = 512;

/// Size and alignment of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Logical sector size in bytes: the unit of alignment for every I/O.
    pub sector_size: u32,
    /// Capacity in bytes, a multiple of `sector_size`.
    pub capacity_bytes: u64,
}

impl Geometry {
    /// Checks that an I/O of `len` bytes at `offset` from memory at `addr` is
    /// aligned and inside the device.
    pub fn check(&self, op: IoOp, offset: u64, len: u64, addr: usize) -> Result<(), DeviceError> {
        let sector = u64::from(self.sector_size);
        if !offset.is_multiple_of(sector)
            || !len.is_multiple_of(sector)
            || !(addr as u64).is_multiple_of(sector)
        {
            return Err(DeviceError::Misaligned {
                op,
                offset,
                len,
                addr,
                sector_size: self.sector_size,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity_bytes => Ok(()),
            _ => Err(DeviceError::OutOfRange {
                op,
                offset,
                len,
                capacity_bytes: self.capacity_bytes,
            }),
        }
    }
}

/// The kind of a device operation, for errors, statistics and fault rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoOp {
    Read,
    Write,
    Flush,
    Discard,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Discard => "discard",
        })
    }
}

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{op} of {len} bytes at offset {offset} on {device} failed: {source}")]
    Io {
        device: Arc<str>,
        op: IoOp,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "misaligned {op}: offset {offset}, length {len} and buffer address {addr:#x} must all be \
         multiples of the sector size {sector_size}"
    )]
    Misaligned {
        op: IoOp,
        offset: u64,
        len: u64,
        addr: usize,
        sector_size: u32,
    },
    #[error(
        "{op} of {len} bytes at offset {offset} lies beyond the device capacity of {capacity_bytes} bytes"
    )]
    OutOfRange {
        op: IoOp,
        offset: u64,
        len: u64,
        capacity_bytes: u64,
    },
    #[error("cannot open {path}: {reason}")]
    Open {
        path: String,
        reason: String,
        #[source]
        source: Option<std::io::Error>,
    },
    /// An NVMe command completed with an error status.
    #[error("{op} of {len} bytes at offset {offset} on {device} failed: NVMe status {status}")]
    Command {
        device: Arc<str>,
        op: IoOp,
        offset: u64,
        len: u64,
        status: nvme::NvmeStatus,
    },
    /// A command passed its timeout and was aborted on the driver's request.
    #[error(
        "{op} of {len} bytes at offset {offset} on {device} timed out after {timeout_ms} ms and was aborted"
    )]
    TimedOut {
        device: Arc<str>,
        op: IoOp,
        offset: u64,
        len: u64,
        timeout_ms: u64,
    },
    #[error("device {device} is shut down")]
    Closed { device: Arc<str> },
    /// The device's driver failed for good (its io_uring reactor thread
    /// panicked): no I/O will ever complete on it again.
    #[error("device {device} failed and serves no more I/O: {reason}")]
    Failed { device: Arc<str>, reason: Arc<str> },
}

impl DeviceError {
    /// The OS error number behind this error, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            DeviceError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// The end of a read or write: the buffer comes back whatever the outcome.
#[derive(Debug)]
pub struct IoCompletion {
    pub buf: DmaBuf,
    pub result: Result<(), DeviceError>,
}

impl IoCompletion {
    /// The buffer on success, the error otherwise (dropping the buffer).
    pub fn into_result(self) -> Result<DmaBuf, DeviceError> {
        self.result.map(|()| self.buf)
    }
}

/// A block device: see the crate documentation for the full contract.
///
/// The trait is used generically on the data path (`Engine<D: BlockDevice>`),
/// so its futures are concrete types and cost no allocation.
pub trait BlockDevice: Send + Sync + 'static {
    /// Sector size and capacity; constant for the life of the device.
    fn geometry(&self) -> Geometry;

    /// A name for logs and errors (a path, or `mem:...`).
    fn name(&self) -> &str;

    /// Reads `buf.len()` bytes at `offset` into `buf`'s window.
    fn read(&self, offset: u64, buf: DmaBuf) -> impl Future<Output = IoCompletion> + Send;

    /// Writes `buf`'s window to `offset`.
    fn write(&self, offset: u64, buf: DmaBuf) -> impl Future<Output = IoCompletion> + Send;

    /// Makes every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Advises the device that `len` bytes at `offset` are unused.
    fn discard(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Why the device failed for good, if it did: every I/O fails with
    /// [`DeviceError::Failed`] from then on. Lets the user of a device (the
    /// chunk engine) report itself out of service without waiting for an I/O
    /// to fail.
    fn failure(&self) -> Option<Arc<str>> {
        None
    }
}

/// Runs a future to completion on the current thread, parking it while the
/// future waits. Device futures need nothing but a `Waker`, so this is all a
/// plain thread (the chunk engine's journal, a tool, a test) needs to drive
/// them without an async runtime.
pub fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}

/// The message a panic was raised with, if it was a string: what a thread
/// that catches a panic of its worker (a reactor here, the chunk engine's
/// journal thread) reports when it fails the device or engine.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = payload.downcast_ref::<&'static str>() {
        message
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message
    } else {
        "(a panic without a message)"
    }
}

/// Starts `future` as a task that `schedule` queues on a reactor. A panic in
/// it is caught where it runs and raised where its [`Task`] is awaited, so a
/// task's bug never takes its reactor (and the device) down.
pub(crate) fn spawn_task<F, S>(future: F, schedule: S) -> Task<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
    S: Fn(async_task::Runnable) + Send + Sync + 'static,
{
    let (runnable, task) = async_task::Builder::new()
        .propagate_panic(true)
        .spawn(move |_| future, schedule);
    runnable.schedule();
    task
}
