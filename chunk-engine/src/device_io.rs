//! The engine's device and the I/O on it: reads and writes at device
//! offsets (errors name what was read or written), flushes, and poisoning.
//! A failed write or flush may have lost data that looked written, so it
//! poisons the engine: writes are refused until it is reopened, while reads
//! go on.

use std::sync::Arc;

use flyfs_bypass::{BlockDevice, BufferPool, DmaBuf};
use parking_lot::Mutex;

use crate::EngineError;
use crate::format::{BLOCK, SlotId, Superblock};

/// The device an engine owns, with what every I/O on it needs: the layout
/// (superblock), the buffer pool, and the poison flag.
pub(crate) struct DeviceIo<D> {
    pub dev: D,
    /// The device's name, for errors and logs.
    pub name: Arc<str>,
    pub sb: Superblock,
    pub pool: BufferPool,
    /// Why the engine refuses writes, once a write or flush failed.
    poison: Mutex<Option<Arc<str>>>,
}

impl<D: BlockDevice> DeviceIo<D> {
    pub fn new(dev: D, sb: Superblock, pool: BufferPool) -> DeviceIo<D> {
        DeviceIo {
            name: Arc::from(dev.name()),
            dev,
            sb,
            pool,
            poison: Mutex::new(None),
        }
    }

    pub fn slot_offset(&self, slot: SlotId) -> u64 {
        self.sb.slot_offset(slot)
    }

    pub fn poison(&self, reason: &str) {
        let mut poison = self.poison.lock();
        if poison.is_none() {
            tracing::error!(device = %self.name, %reason, "chunk engine poisoned: refusing writes");
            *poison = Some(Arc::from(reason));
        }
    }

    pub fn poisoned(&self) -> Option<Arc<str>> {
        self.poison.lock().clone()
    }

    pub fn check_writable(&self) -> Result<(), EngineError> {
        match self.poisoned() {
            Some(reason) => Err(EngineError::Poisoned {
                device: self.name.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }

    pub fn device_error(
        &self,
        context: impl Into<String>,
        source: flyfs_bypass::DeviceError,
    ) -> EngineError {
        EngineError::Device {
            device: self.name.clone(),
            context: context.into(),
            source,
        }
    }

    /// Reads `len` bytes (block multiples) at device `offset` into a pool
    /// buffer. `what` names the data for an error, and runs only on error.
    pub async fn read_at(
        &self,
        offset: u64,
        len: usize,
        what: impl Fn() -> String,
    ) -> Result<DmaBuf, EngineError> {
        let buf = self.pool.alloc(len);
        self.dev
            .read(offset, buf)
            .await
            .into_result()
            .map_err(|e| self.device_error(format!("reading {}", what()), e))
    }

    /// A failed write or flush may have lost acknowledged-looking data: poison.
    pub async fn write_at(
        &self,
        offset: u64,
        buf: DmaBuf,
        what: impl Fn() -> String,
    ) -> Result<(), EngineError> {
        let result = self.dev.write(offset, buf).await.result;
        result.map_err(|e| {
            let error = self.device_error(format!("writing {}", what()), e);
            self.poison(&error.to_string());
            error
        })
    }

    pub async fn flush(&self, what: &str) -> Result<(), EngineError> {
        self.dev.flush().await.map_err(|e| {
            let error = self.device_error(format!("flushing {what}"), e);
            self.poison(&error.to_string());
            error
        })
    }
}

pub(crate) fn round_up(len: u64) -> u64 {
    len.next_multiple_of(BLOCK)
}

/// Returns `data` ready to write from its window start, padded with zeros to
/// a block multiple, if its memory allows that without copying.
pub(crate) fn padded_in_place(mut data: DmaBuf) -> Result<DmaBuf, DmaBuf> {
    let start = data.window_start();
    let len = data.len();
    let padded = round_up(len as u64) as usize;
    if !start.is_multiple_of(BLOCK as usize) || data.capacity() - start < padded {
        return Err(data);
    }
    if padded == len {
        // Nothing to pad; `data` may be a read-only view of a received payload.
        return Ok(data);
    }
    if data.is_read_only() {
        return Err(data);
    }
    data.full_mut()[start + len..start + padded].fill(0);
    data.set_window(start, padded);
    Ok(data)
}
