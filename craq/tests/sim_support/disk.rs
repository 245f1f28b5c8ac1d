//! The simulated storage nodes' disk: an in-memory device (power cuts lose
//! unflushed writes) behind flyfs-bypass's `FaultyDevice` (I/O errors the
//! chaos arms) and a stall the chaos can switch on (slow I/O).
//!
//! The stall sleeps on tokio's clock, which turmoil drives, so a slow disk
//! stays deterministic; that holds because the simulated engines run the
//! inline journal mode, where every device I/O is awaited inside a host's
//! task (the journal thread's I/O runs outside any runtime).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flyfs_bypass::fault::FaultyDevice;
use flyfs_bypass::mem::MemDevice;
use flyfs_bypass::{BlockDevice, DeviceError, DmaBuf, Geometry, IoCompletion};

/// A node's disk as its engine sees it. Clones share the faults and the
/// stall, so the chaos keeps one to steer the engine's.
#[derive(Clone, Debug)]
pub struct SimDisk {
    faulty: FaultyDevice<MemDevice>,
    /// Microseconds every I/O waits before it reaches the device; 0 when the
    /// disk is not slow.
    stall_us: Arc<AtomicU64>,
}

impl SimDisk {
    pub fn new(mem: MemDevice, seed: u64, stall_us: Arc<AtomicU64>) -> SimDisk {
        SimDisk {
            faulty: FaultyDevice::new(mem, seed),
            stall_us,
        }
    }

    pub fn faults(&self) -> &FaultyDevice<MemDevice> {
        &self.faulty
    }

    async fn stall(&self) {
        let us = self.stall_us.load(Ordering::SeqCst);
        if us > 0 {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
    }
}

impl BlockDevice for SimDisk {
    fn geometry(&self) -> Geometry {
        self.faulty.geometry()
    }

    fn name(&self) -> &str {
        self.faulty.name()
    }

    fn failure(&self) -> Option<Arc<str>> {
        self.faulty.failure()
    }

    async fn read(&self, offset: u64, buf: DmaBuf) -> IoCompletion {
        self.stall().await;
        self.faulty.read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: DmaBuf) -> IoCompletion {
        self.stall().await;
        self.faulty.write(offset, buf).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.stall().await;
        self.faulty.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.stall().await;
        self.faulty.discard(offset, len).await
    }
}
