//! The engine's device and the I/O on it: reads and writes at device
//! offsets (errors name what was read or written), flushes, and poisoning.
//! A failed write or flush may have lost data that looked written, so it
//! poisons the engine: writes are refused until it is reopened, while reads
//! go on.
//!
//! Also the I/O half of the chunk operations, which the chunk table
//! (table.rs) decided on: writing a new version as its [`WritePlan`] lays it
//! out (in-place append or copy-on-write, with the chunk's CRC combined or
//! recomputed, and the block CRCs of every block written), and reading a
//! pinned version, checked against its block CRCs or its chunk CRC.

use std::sync::Arc;

use flyfs_bypass::{BlockDevice, BufferPool, DmaBuf};
use parking_lot::Mutex;

use crate::block_crc::{BlockCrcs, crcs_of};
use crate::format::{BLOCK, ChunkMeta, SlotId, Superblock};
use crate::request::{ReadOutcome, ReadRequest, WriteOp};
use crate::table::{ReadTarget, WritePlan};
use crate::{ChunkKey, EngineError};

/// The device an engine owns, with what every I/O on it needs: the layout
/// (superblock), the buffer pool, and the poison flag.
pub(crate) struct DeviceIo<D> {
    pub dev: D,
    /// The device's name, for errors and logs.
    pub name: Arc<str>,
    pub sb: Superblock,
    pub pool: BufferPool,
    /// The block-CRC region's locks and cache (block_crc.rs); unused on a
    /// device formatted before version 3.
    pub(crate) block_crcs: BlockCrcs,
    /// Why the engine refuses writes, once a write or flush failed.
    poison: Mutex<Option<Arc<str>>>,
    /// Why the engine refuses reads too, after an internal fault (its
    /// journal thread panicked): its in-memory state may be half-updated.
    fault: Mutex<Option<Arc<str>>>,
}

impl<D: BlockDevice> DeviceIo<D> {
    pub fn new(
        dev: D,
        sb: Superblock,
        pool: BufferPool,
        block_crc_cache_blocks: usize,
    ) -> DeviceIo<D> {
        DeviceIo {
            name: Arc::from(dev.name()),
            dev,
            sb,
            pool,
            block_crcs: BlockCrcs::new(block_crc_cache_blocks),
            poison: Mutex::new(None),
            fault: Mutex::new(None),
        }
    }

    fn slot_offset(&self, slot: SlotId) -> u64 {
        self.sb.slot_offset(slot)
    }

    pub fn poison(&self, reason: &str) {
        let mut poison = self.poison.lock();
        if poison.is_none() {
            tracing::error!(device = %self.name, %reason, "chunk engine poisoned: refusing writes");
            *poison = Some(Arc::from(reason));
        }
    }

    /// Fail-stop after an internal fault: the engine refuses every
    /// operation, reads included, until it is reopened (which rebuilds its
    /// state from the device).
    pub fn fault(&self, reason: &str) {
        {
            let mut fault = self.fault.lock();
            if fault.is_none() {
                tracing::error!(device = %self.name, %reason, "chunk engine faulted: refusing every operation");
                *fault = Some(Arc::from(reason));
            }
        }
        self.poison(reason);
    }

    /// Why the engine refuses writes, if it does: a failed write or flush,
    /// an internal fault, or a device that failed for good.
    pub fn poisoned(&self) -> Option<Arc<str>> {
        self.poison.lock().clone().or_else(|| self.device_failure())
    }

    /// Why the engine refuses reads, if it does.
    fn faulted(&self) -> Option<Arc<str>> {
        self.fault.lock().clone().or_else(|| self.device_failure())
    }

    fn device_failure(&self) -> Option<Arc<str>> {
        self.dev
            .failure()
            .map(|reason| Arc::from(format!("device {} failed: {reason}", self.name)))
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

    pub fn check_readable(&self) -> Result<(), EngineError> {
        match self.faulted() {
            Some(reason) => Err(EngineError::Poisoned {
                device: self.name.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }

    fn device_error(
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

    /// Writes whole data blocks at device `offset` and records their block
    /// CRCs, computed from the very bytes written. The two writes run
    /// concurrently: neither is durable before the flush that follows them
    /// both, and a reader that meets one without the other sees a mismatch
    /// and checks the whole chunk, whichever came first.
    async fn write_blocks(
        &self,
        offset: u64,
        buf: DmaBuf,
        what: impl Fn() -> String,
    ) -> Result<(), EngineError> {
        let crcs = if self.sb.has_block_crcs() {
            crcs_of(&buf)
        } else {
            Vec::new()
        };
        let (data, crcs) = tokio::join!(
            self.write_at(offset, buf, what),
            self.store_block_crcs(offset, &crcs)
        );
        data.and(crcs)
    }

    /// Does the I/O of a write as `plan` lays it out; returns the new length
    /// and CRC of the whole chunk.
    pub async fn write_plan(
        &self,
        key: ChunkKey,
        plan: &WritePlan,
        op: WriteOp,
    ) -> Result<(u32, u32), EngineError> {
        let what = || format!("{key:?}");
        // The new bytes, as (offset, data, crc of data); a truncate that
        // extends is an update with zeros.
        let (offset, data, data_crc) = match op {
            WriteOp::Update { offset, data, crc } => (offset, data, crc),
            WriteOp::Replace { data, crc } => (0, data, crc),
            WriteOp::Truncate { len } => {
                let base_len = match plan {
                    WritePlan::Shrink { base } => {
                        // The whole base is read and checked: a CRC computed
                        // afresh over rotten bytes would make them look good.
                        let buf = self
                            .read_at(
                                self.slot_offset(base.slot),
                                round_up(u64::from(base.len)) as usize,
                                what,
                            )
                            .await?;
                        self.check_base(key, base, &buf, (0, len))?;
                        return Ok((len, crc32c::crc32c(&buf[..len as usize])));
                    }
                    WritePlan::InPlace { base, .. } => base.len,
                    WritePlan::Cow { base, .. } => base.map_or(0, |b| b.len),
                };
                let zeros = DmaBuf::alloc_zeroed((len - base_len) as usize);
                let crc = crc32c::crc32c(&zeros);
                (base_len, zeros, crc)
            }
        };
        let data_len = data.len() as u32;
        match *plan {
            WritePlan::Shrink { .. } => unreachable!("only a truncate shrinks"),
            WritePlan::InPlace { slot, base } => {
                let aligned = base.len & !(BLOCK as u32 - 1);
                let new_len = offset + data_len;
                // Fast path: block-aligned append straight from the caller's buffer.
                let data = if aligned == base.len && offset == base.len {
                    match padded_in_place(data) {
                        Ok(buf) => {
                            self.write_blocks(
                                self.slot_offset(slot) + u64::from(aligned),
                                buf,
                                what,
                            )
                            .await?;
                            let crc = crc32c::crc32c_combine(base.crc, data_crc, data_len as usize);
                            return Ok((new_len, crc));
                        }
                        Err(data) => data,
                    }
                } else {
                    data
                };
                let io_len = round_up(u64::from(new_len - aligned)) as usize;
                let mut buf = self.pool.alloc(io_len);
                if aligned < base.len {
                    // The block holding the committed tail is rewritten with
                    // the same committed bytes: sector writes are atomic, so
                    // a torn write leaves them intact either way.
                    self.read_tail_block(key, &base, (offset, new_len), &mut buf[..BLOCK as usize])
                        .await?;
                }
                let tail_start = (base.len - aligned) as usize;
                let data_start = (offset - aligned) as usize;
                buf[tail_start..data_start].fill(0);
                buf[data_start..data_start + data.len()].copy_from_slice(&data);
                buf[data_start + data.len()..].fill(0);
                let appended = crc32c::crc32c(&buf[tail_start..(new_len - aligned) as usize]);
                let crc = crc32c::crc32c_combine(base.crc, appended, (new_len - base.len) as usize);
                self.write_blocks(self.slot_offset(slot) + u64::from(aligned), buf, what)
                    .await?;
                Ok((new_len, crc))
            }
            WritePlan::Cow { slot, base } => {
                let base_len = base.map_or(0, |b| b.len);
                let new_len = base_len.max(offset + data_len);
                let covers_base = offset == 0 && data_len >= base_len;
                let data = if covers_base {
                    match padded_in_place(data) {
                        Ok(buf) => {
                            self.write_blocks(self.slot_offset(slot), buf, what).await?;
                            return Ok((new_len, data_crc));
                        }
                        Err(data) => data,
                    }
                } else {
                    data
                };
                let io_len = round_up(u64::from(new_len)) as usize;
                let mut buf = self.pool.alloc(io_len);
                let mut filled = 0usize;
                if let Some(base) = base
                    && !covers_base
                    && base.len > 0
                {
                    let base_io = round_up(u64::from(base.len)) as usize;
                    buf.set_len(base_io);
                    let done = self.dev.read(self.slot_offset(base.slot), buf).await;
                    buf = done.buf;
                    done.result.map_err(|e| {
                        self.device_error(format!("reading {} for copy-on-write", what()), e)
                    })?;
                    // Checked before its bytes go into the new version, whose
                    // CRC is computed afresh and would hide the rot.
                    self.check_base(key, &base, &buf, (offset, offset + data_len))?;
                    buf.set_len(io_len);
                    filled = base.len as usize;
                }
                buf[filled..].fill(0);
                buf[offset as usize..(offset + data_len) as usize].copy_from_slice(&data);
                let crc = crc32c::crc32c(&buf[..new_len as usize]);
                self.write_blocks(self.slot_offset(slot), buf, what).await?;
                Ok((new_len, crc))
            }
        }
    }

    /// Checks the bytes of the version a write builds on against its CRC;
    /// `write` is the range the write was going to change.
    fn check_base(
        &self,
        key: ChunkKey,
        base: &ChunkMeta,
        data: &[u8],
        write: (u32, u32),
    ) -> Result<(), EngineError> {
        let computed = crc32c::crc32c(&data[..base.len as usize]);
        if computed == base.crc {
            return Ok(());
        }
        Err(EngineError::ChunkCorrupt {
            device: self.name.clone(),
            key,
            version: base.version,
            offset: 0,
            end: base.len,
            read_offset: write.0,
            read_end: write.1,
            expected: base.crc,
            computed,
        })
    }

    /// Reads the block holding `base`'s tail into `out`, for an in-place
    /// append that rewrites it, checked: the new block CRC is computed from
    /// these bytes and would otherwise bless rot in them. Against its block
    /// CRC, or when that does not match (or the device has none) and the
    /// base is checked anyway, against the base's chunk CRC by reading it
    /// whole. Without block CRCs the old bytes are copied unchecked, as the
    /// base's CRC is combined into the new version's and still covers them.
    async fn read_tail_block(
        &self,
        key: ChunkKey,
        base: &ChunkMeta,
        write: (u32, u32),
        out: &mut [u8],
    ) -> Result<(), EngineError> {
        let what = || format!("{key:?}");
        let aligned = u64::from(base.len) & !(BLOCK - 1);
        let at = self.slot_offset(base.slot) + aligned;
        let head = self.read_at(at, BLOCK as usize, what).await?;
        if !self.sb.has_block_crcs() || self.block_crcs(at, 1).await?[0] == crc32c::crc32c(&head) {
            out.copy_from_slice(&head);
            return Ok(());
        }
        self.note_block_mismatch(|| format!("{key:?} tail block before an append"));
        let whole = self
            .read_at(
                self.slot_offset(base.slot),
                round_up(u64::from(base.len)) as usize,
                what,
            )
            .await?;
        self.check_base(key, base, &whole, write)?;
        out.copy_from_slice(&whole[aligned as usize..(aligned + BLOCK) as usize]);
        Ok(())
    }

    /// Reads the range `req` asks for of a version a read has pinned,
    /// clamped to the version's length, and checks it unless told not to:
    ///
    /// * a read of the whole version, or one that asks (`req.verify`), reads
    ///   the whole version and checks the chunk's CRC;
    /// * with `verify_reads`, a partial read checks each block it read
    ///   against its block CRC, and on any mismatch falls back to the whole
    ///   check (on a device without block CRCs it does that at once);
    /// * without `verify_reads`, a partial read is not checked.
    ///
    /// Only a failed chunk-CRC check is [`EngineError::ChunkCorrupt`]; bytes
    /// that failed it are never returned, and bytes that failed a block check
    /// are never returned either (the whole check's bytes are).
    pub async fn read_pinned(
        &self,
        key: ChunkKey,
        target: ReadTarget,
        req: ReadRequest,
        verify_reads: bool,
    ) -> Result<ReadOutcome, EngineError> {
        let ReadTarget { len, .. } = target;
        let start = req.offset.min(len);
        let end = start.saturating_add(req.len).min(len);
        // A read of the whole chunk is checked in any case: it costs no
        // extra I/O, only the CRC.
        if req.verify || (start == 0 && end == len) {
            return self.read_whole_checked(key, target, start, end).await;
        }
        if start == end {
            return Ok(self.outcome(target, self.pool.alloc(0), 0, 0, 0));
        }
        if verify_reads && !self.sb.has_block_crcs() {
            return self.read_whole_checked(key, target, start, end).await;
        }
        let io_start = u64::from(start) & !(BLOCK - 1);
        let io_end = round_up(u64::from(end));
        let at = self.slot_offset(target.slot) + io_start;
        let expected = if verify_reads {
            Some(self.block_crcs(at, (io_end - io_start) / BLOCK).await?)
        } else {
            None
        };
        let data = self
            .read_at(at, (io_end - io_start) as usize, || format!("{key:?}"))
            .await?;
        if let Some(expected) = expected
            && !data
                .chunks(BLOCK as usize)
                .map(crc32c::crc32c)
                .eq(expected.iter().copied())
        {
            // A write racing this read, a write a crash tore, rot in the
            // block or in its CRC: the chunk's CRC decides which.
            self.note_block_mismatch(|| {
                format!("{key:?} v{} bytes {start}..{end}", target.version.0)
            });
            return self.read_whole_checked(key, target, start, end).await;
        }
        Ok(self.outcome(target, data, io_start, start, end))
    }

    /// Reads the whole version and checks it against the chunk's CRC before
    /// returning bytes `start..end` of it.
    async fn read_whole_checked(
        &self,
        key: ChunkKey,
        target: ReadTarget,
        start: u32,
        end: u32,
    ) -> Result<ReadOutcome, EngineError> {
        let ReadTarget {
            slot,
            len,
            crc,
            version,
        } = target;
        let io_len = round_up(u64::from(len)) as usize;
        if io_len == 0 {
            return Ok(self.outcome(target, self.pool.alloc(0), 0, 0, 0));
        }
        let data = self
            .read_at(self.slot_offset(slot), io_len, || format!("{key:?}"))
            .await?;
        let computed = crc32c::crc32c(&data[..len as usize]);
        if computed != crc {
            return Err(EngineError::ChunkCorrupt {
                device: self.name.clone(),
                key,
                version,
                offset: 0,
                end: len,
                read_offset: start,
                read_end: end,
                expected: crc,
                computed,
            });
        }
        Ok(self.outcome(target, data, 0, start, end))
    }

    /// The outcome of a read of bytes `start..end` of a version, from `data`
    /// read from slot offset `io_start`.
    fn outcome(
        &self,
        target: ReadTarget,
        mut data: DmaBuf,
        io_start: u64,
        start: u32,
        end: u32,
    ) -> ReadOutcome {
        data.set_window(
            (u64::from(start) - io_start) as usize,
            (end - start) as usize,
        );
        ReadOutcome {
            data,
            version: target.version,
            chunk_len: target.len,
            chunk_crc: target.crc,
        }
    }
}

fn round_up(len: u64) -> u64 {
    len.next_multiple_of(BLOCK)
}

/// Returns `data` ready to write from its window start, padded with zeros to
/// a block multiple, if its memory allows that without copying.
fn padded_in_place(mut data: DmaBuf) -> Result<DmaBuf, DmaBuf> {
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
