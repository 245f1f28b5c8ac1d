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
use std::sync::atomic::{AtomicU64, Ordering};

use flyfs_bypass::{BlockDevice, BufferPool, DmaBuf};
use parking_lot::Mutex;

use crate::block_crc::{BlockCrcs, crcs_of};
use crate::format::{BLOCK, ChunkMeta, PatchExtent, SlotId, Superblock};
use crate::request::{ReadOutcome, ReadRequest, WriteOp};
use crate::table::{Layer, Overlay, ReadTarget, WritePlan, overlay_onto};
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
    /// Bytes of every write issued since the engine opened.
    bytes_written: AtomicU64,
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
            bytes_written: AtomicU64::new(0),
        }
    }

    fn slot_offset(&self, slot: SlotId) -> u64 {
        self.sb.slot_offset(slot)
    }

    /// Bytes of every write issued since the engine opened.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
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
        self.bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
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
    /// CRCs: `crcs` when the caller has them from its own pass over these
    /// very bytes, else computed here. The two writes run concurrently:
    /// neither is durable before the flush that follows them both, and a
    /// reader that meets one without the other sees a mismatch and checks
    /// the whole chunk, whichever came first.
    async fn write_blocks(
        &self,
        offset: u64,
        buf: DmaBuf,
        crcs: Option<Vec<u32>>,
        what: impl Fn() -> String,
    ) -> Result<(), EngineError> {
        let crcs = if self.sb.has_block_crcs() {
            crcs.unwrap_or_else(|| crcs_of(&buf))
        } else {
            Vec::new()
        };
        debug_assert!(crcs.is_empty() || crcs.len() as u64 * BLOCK == buf.len() as u64);
        let (data, crcs) = tokio::join!(
            self.write_at(offset, buf, what),
            self.store_block_crcs(offset, &crcs)
        );
        data.and(crcs)
    }

    /// Does the I/O of a write as `plan` lays it out; returns the new length
    /// and CRC of the whole chunk, and a patch's extents. `payload_crcs`
    /// are the block CRCs of an update's single payload padded to whole
    /// blocks, when it starts on a block boundary
    /// ([`WriteRequest::checked`](crate::request::WriteRequest::checked)).
    pub async fn write_plan(
        &self,
        key: ChunkKey,
        plan: &WritePlan,
        op: WriteOp,
        payload_crcs: Option<Vec<u32>>,
    ) -> Result<WriteDone, EngineError> {
        let what = || format!("{key:?}");
        // The new bytes, as (offset, data, crc of data); a truncate that
        // extends is an update with zeros.
        let mut extents: Vec<(u32, DmaBuf, u32)> = match op {
            WriteOp::Update { offset, data, crc } => vec![(offset, data, crc)],
            WriteOp::Extents(list) => list
                .into_iter()
                .map(|e| (e.offset, e.data, e.crc))
                .collect(),
            WriteOp::Replace { data, crc } => vec![(0, data, crc)],
            WriteOp::Truncate { len } => {
                let base_len = match plan {
                    WritePlan::Shrink { base, overlay } => {
                        // The whole base is read and checked: a CRC computed
                        // afresh over rotten bytes would make them look good.
                        let mut buf = self
                            .read_at(
                                self.slot_offset(base.slot),
                                round_up(u64::from(base.len)) as usize,
                                what,
                            )
                            .await?;
                        overlay_opt(overlay, 0, &mut buf[..base.len as usize]);
                        self.check_base(key, base, &buf, (0, len))?;
                        return Ok(WriteDone::new(len, crc32c::crc32c(&buf[..len as usize])));
                    }
                    WritePlan::InPlace { base, .. } => base.len,
                    WritePlan::Cow { base, .. } => base.map_or(0, |b| b.len),
                    WritePlan::Patch { .. } => unreachable!("a truncate is never a patch"),
                };
                let zeros = DmaBuf::alloc_zeroed((len - base_len) as usize);
                let crc = crc32c::crc32c(&zeros);
                vec![(base_len, zeros, crc)]
            }
        };
        match plan {
            WritePlan::Shrink { .. } => unreachable!("only a truncate shrinks"),
            WritePlan::Patch { base, overlay } => {
                self.write_patch(key, base, overlay.as_deref().map(Vec::as_slice), extents)
                    .await
            }
            WritePlan::InPlace {
                slot,
                base,
                overlay,
            } => {
                let (offset, data, data_crc) = extents.pop().expect("an append has one extent");
                debug_assert!(extents.is_empty(), "an append has one extent");
                let (slot, base) = (*slot, *base);
                let data_len = data.len() as u32;
                let aligned = base.len & !(BLOCK as u32 - 1);
                let new_len = offset + data_len;
                // Fast path: block-aligned append straight from the caller's buffer.
                let data = if aligned == base.len && offset == base.len {
                    match padded_in_place(data) {
                        Ok(buf) => {
                            self.write_blocks(
                                self.slot_offset(slot) + u64::from(aligned),
                                buf,
                                payload_crcs,
                                what,
                            )
                            .await?;
                            let crc = crate::crc::combine(base.crc, data_crc, data_len as usize);
                            return Ok(WriteDone::new(new_len, crc));
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
                    // a torn write leaves them intact either way. (No layer
                    // not yet in the slot touches it: the plan checked.)
                    self.read_tail_block(
                        key,
                        &base,
                        overlay.as_deref().map(Vec::as_slice),
                        (offset, new_len),
                        &mut buf[..BLOCK as usize],
                    )
                    .await?;
                }
                let tail_start = (base.len - aligned) as usize;
                let data_start = (offset - aligned) as usize;
                buf[tail_start..data_start].fill(0);
                buf[data_start..data_start + data.len()].copy_from_slice(&data);
                buf[data_start + data.len()..].fill(0);
                let appended = crc32c::crc32c(&buf[tail_start..(new_len - aligned) as usize]);
                let crc = crate::crc::combine(base.crc, appended, (new_len - base.len) as usize);
                self.write_blocks(self.slot_offset(slot) + u64::from(aligned), buf, None, what)
                    .await?;
                Ok(WriteDone::new(new_len, crc))
            }
            WritePlan::Cow {
                slot,
                base,
                overlay,
            } => {
                let (slot, base) = (*slot, *base);
                let base_len = base.map_or(0, |b| b.len);
                let new_len = extents
                    .iter()
                    .map(|(offset, data, _)| offset + data.len() as u32)
                    .fold(base_len, u32::max);
                let covers_base = extents.len() == 1
                    && extents[0].0 == 0
                    && extents[0].1.len() as u32 >= base_len;
                if covers_base {
                    let (_, data, data_crc) = extents.pop().expect("one extent");
                    match padded_in_place(data) {
                        Ok(buf) => {
                            self.write_blocks(self.slot_offset(slot), buf, payload_crcs, what)
                                .await?;
                            return Ok(WriteDone::new(new_len, data_crc));
                        }
                        Err(data) => extents.push((0, data, data_crc)),
                    }
                }
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
                    overlay_opt(overlay, 0, &mut buf[..base.len as usize]);
                    // Checked before its bytes go into the new version, whose
                    // CRC is computed afresh and would hide the rot.
                    let first = extents.first().map_or(0, |e| e.0);
                    self.check_base(key, &base, &buf, (first, new_len))?;
                    buf.set_len(io_len);
                    filled = base.len as usize;
                }
                buf[filled..].fill(0);
                for (offset, data, _) in &extents {
                    buf[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                }
                // One pass for the new version's CRC and its block CRCs.
                let (crcs, crc) = crate::crc::blocks_and_whole(&buf[..new_len as usize]);
                self.write_blocks(self.slot_offset(slot), buf, Some(crcs), what)
                    .await?;
                Ok(WriteDone::new(new_len, crc))
            }
        }
    }

    /// A patch (see `WritePlan::Patch`): nothing is written here. The new
    /// version's CRC is the base's updated for each extent in turn from the
    /// bytes it replaces (CRC32C is linear, see [`crc_after_overwrite`]), so
    /// only the blocks the extents touch are read, checked against their
    /// block CRCs (or, on a mismatch, the whole base against its CRC), and
    /// not even those where an extent replaces whole blocks that hold only
    /// the slot's bytes: their block CRCs give the old bytes' CRC. The
    /// extents are copied out of the caller's buffers: they live in memory
    /// until a checkpoint writes them into the slot.
    async fn write_patch(
        &self,
        key: ChunkKey,
        base: &ChunkMeta,
        overlay: Option<&[Layer]>,
        extents: Vec<(u32, DmaBuf, u32)>,
    ) -> Result<WriteDone, EngineError> {
        let mut layer: Vec<PatchExtent> = Vec::with_capacity(extents.len());
        let mut crc = base.crc;
        let mut whole: Option<DmaBuf> = None;
        for (offset, data, _) in extents {
            // An empty extent changes nothing, and a Patch record holds none.
            if data.is_empty() {
                continue;
            }
            let end = offset + data.len() as u32;
            let io_start = u64::from(offset) & !(BLOCK - 1);
            let io_end = round_up(u64::from(end));
            // Whole blocks that hold only the slot's bytes (no layer of the
            // base, no earlier extent of this write) need not be read: the
            // CRC of the bytes they replace is their block CRCs' combined,
            // entries that describe the medium. Rot in them cannot matter,
            // as every byte is replaced, and the new chunk CRC is the one of
            // the version the chain committed.
            if whole.is_none()
                && self.sb.has_block_crcs()
                && u64::from(offset) == io_start
                && u64::from(end) == io_end
                && end <= base.len
                && !overlay.is_some_and(|o| layers_touch(o, io_start, io_end))
                && !extents_touch(&layer, io_start, io_end)
            {
                let at = self.slot_offset(base.slot) + io_start;
                let old_crc = self
                    .block_crcs(at, (io_end - io_start) / BLOCK)
                    .await?
                    .into_iter()
                    .reduce(|acc, block| crate::crc::combine(acc, block, BLOCK as usize))
                    .unwrap_or(0);
                crc = crc_after_replacing(
                    crc,
                    base.len,
                    offset,
                    data.len(),
                    old_crc,
                    crc32c::crc32c(&data),
                );
                layer.push(PatchExtent {
                    offset,
                    data: data.to_vec(),
                });
                continue;
            }
            // The bytes this extent replaces, as the version built so far
            // has them: the slot's, the base's layers, this write's earlier
            // extents.
            let old: Vec<u8> = match &whole {
                Some(whole) => whole[offset as usize..end as usize].to_vec(),
                None => {
                    let at = self.slot_offset(base.slot) + io_start;
                    let expected = self.block_crcs(at, (io_end - io_start) / BLOCK).await?;
                    let mut blocks = self
                        .read_at(at, (io_end - io_start) as usize, || format!("{key:?}"))
                        .await?;
                    if crcs_of(&blocks) == expected {
                        overlay_opt_slice(overlay, io_start, &mut blocks);
                        overlay_onto_extents(&layer, io_start, &mut blocks);
                        let from = (u64::from(offset) - io_start) as usize;
                        blocks[from..from + data.len()].to_vec()
                    } else {
                        self.note_block_mismatch(|| format!("{key:?} blocks under a patch"));
                        let mut buf = self
                            .read_at(
                                self.slot_offset(base.slot),
                                round_up(u64::from(base.len)) as usize,
                                || format!("{key:?}"),
                            )
                            .await?;
                        overlay_opt_slice(overlay, 0, &mut buf[..base.len as usize]);
                        self.check_base(key, base, &buf, (offset, end))?;
                        overlay_onto_extents(&layer, 0, &mut buf[..base.len as usize]);
                        let old = buf[offset as usize..end as usize].to_vec();
                        whole = Some(buf);
                        old
                    }
                }
            };
            crc = crc_after_overwrite(crc, base.len, offset, &old, &data);
            if let Some(whole) = &mut whole {
                whole[offset as usize..end as usize].copy_from_slice(&data);
            }
            layer.push(PatchExtent {
                offset,
                data: data.to_vec(),
            });
        }
        Ok(WriteDone {
            len: base.len,
            crc,
            layer: Some(Arc::new(layer)),
        })
    }

    /// Writes `overlay`, the Patch layers of committed version `meta`, into
    /// its slot, and returns the block CRCs of every block written, by device
    /// offset, for the caller to store (a checkpoint stores those of all its
    /// chunks at once, so that the updates of one region block share one
    /// write of it) before the flush that makes the blocks durable. A
    /// checkpoint does this before it lets the journal reuse their records,
    /// and recovery redoes it. The caller makes sure no reader of a version
    /// without these layers reads the slot.
    ///
    /// A block the extents cover only in part is read, and checked against
    /// its block CRC before its other bytes are written back (a new CRC must
    /// never be computed over unchecked bytes). On a mismatch (rot, or a
    /// crash that tore an earlier application of the same layers) the whole
    /// version is read with the layers over it and checked against the chunk
    /// CRC: the layers cover every byte such a tear could have changed, so a
    /// match proves the block's bytes inside the chunk. If even that fails,
    /// the chunk is corrupt: the bytes are written all the same (the layers
    /// are durable only in records about to be reused), but the block gets
    /// an entry that cannot match, so that every read of it checks the chunk
    /// CRC and reports the corruption rather than returning rotten bytes.
    pub async fn apply_overlay(
        &self,
        key: ChunkKey,
        meta: &ChunkMeta,
        overlay: &[Layer],
    ) -> Result<Vec<(u64, Vec<u32>)>, EngineError> {
        let what = || format!("{key:?} patch");
        let mut stored = Vec::new();
        let mut blocks: Vec<u64> = overlay
            .iter()
            .flat_map(|l| l.extents.iter())
            .flat_map(|e| u64::from(e.offset) / BLOCK..round_up(u64::from(e.end())) / BLOCK)
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut whole_checked: Option<bool> = None;
        let mut at = 0;
        while at < blocks.len() {
            // A run of consecutive blocks, written with one I/O.
            let mut end = at + 1;
            while end < blocks.len() && blocks[end] == blocks[end - 1] + 1 {
                end += 1;
            }
            let (first, count) = (blocks[at], (end - at) as u64);
            at = end;
            let start = first * BLOCK;
            let device_at = self.slot_offset(meta.slot) + start;
            let mut buf = self.pool.alloc((count * BLOCK) as usize);
            let covered: Vec<bool> = (0..count)
                .map(|i| block_covered(overlay, start + i * BLOCK))
                .collect();
            let mut suspect = vec![false; count as usize];
            if covered.iter().all(|c| *c) {
                buf.fill(0);
            } else {
                buf = self.read_at(device_at, buf.len(), what).await?;
                let expected = if self.sb.has_block_crcs() {
                    self.block_crcs(device_at, count).await?
                } else {
                    Vec::new()
                };
                for (i, block) in buf.chunks(BLOCK as usize).enumerate() {
                    let matches = expected
                        .get(i)
                        .is_none_or(|expected| crc32c::crc32c(block) == *expected);
                    if covered[i] || matches {
                        continue;
                    }
                    let whole_ok = match whole_checked {
                        Some(ok) => ok,
                        None => {
                            let ok = self.version_matches(meta, overlay).await?;
                            if !ok {
                                tracing::error!(device = %self.name, ?key, version = meta.version.0,
                                    "chunk corrupt while writing its patches into its slot");
                            }
                            whole_checked = Some(ok);
                            ok
                        }
                    };
                    suspect[i] = !whole_ok;
                }
            }
            overlay_onto(overlay, start, &mut buf);
            let mut crcs = crcs_of(&buf);
            for (crc, suspect) in crcs.iter_mut().zip(&suspect) {
                if *suspect {
                    *crc = !*crc;
                }
            }
            self.write_at(device_at, buf, what).await?;
            if self.sb.has_block_crcs() {
                stored.push((device_at, crcs));
            }
        }
        Ok(stored)
    }

    /// Whether version `meta`, its slot's bytes with `overlay` over them,
    /// matches its chunk CRC.
    async fn version_matches(
        &self,
        meta: &ChunkMeta,
        overlay: &[Layer],
    ) -> Result<bool, EngineError> {
        if meta.len == 0 {
            return Ok(true);
        }
        let mut buf = self
            .read_at(
                self.slot_offset(meta.slot),
                round_up(u64::from(meta.len)) as usize,
                || format!("{:?} {:?}", meta.chain, meta.chunk),
            )
            .await?;
        overlay_onto(overlay, 0, &mut buf[..meta.len as usize]);
        Ok(crc32c::crc32c(&buf[..meta.len as usize]) == meta.crc)
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
        overlay: Option<&[Layer]>,
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
        let mut whole = self
            .read_at(
                self.slot_offset(base.slot),
                round_up(u64::from(base.len)) as usize,
                what,
            )
            .await?;
        overlay_opt_slice(overlay, 0, &mut whole[..base.len as usize]);
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
        let len = target.len;
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
        let mut data = self
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
        // The block CRCs describe the slot; the version's layers not yet in
        // it come from memory.
        overlay_opt(&target.overlay, io_start, &mut data);
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
            ..
        } = target;
        let io_len = round_up(u64::from(len)) as usize;
        if io_len == 0 {
            return Ok(self.outcome(target, self.pool.alloc(0), 0, 0, 0));
        }
        let mut data = self
            .read_at(self.slot_offset(slot), io_len, || format!("{key:?}"))
            .await?;
        overlay_opt(&target.overlay, 0, &mut data[..len as usize]);
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

/// What a write's I/O produced: the new version's length and CRC, and a
/// patch's extents (which the pending version keeps in memory).
#[derive(Debug)]
pub(crate) struct WriteDone {
    pub len: u32,
    pub crc: u32,
    pub layer: Option<Arc<Vec<PatchExtent>>>,
}

impl WriteDone {
    fn new(len: u32, crc: u32) -> WriteDone {
        WriteDone {
            len,
            crc,
            layer: None,
        }
    }
}

fn overlay_opt(overlay: &Option<Overlay>, start: u64, buf: &mut [u8]) {
    overlay_opt_slice(overlay.as_deref().map(|o| o.as_slice()), start, buf);
}

fn overlay_opt_slice(overlay: Option<&[Layer]>, start: u64, buf: &mut [u8]) {
    if let Some(overlay) = overlay {
        overlay_onto(overlay, start, buf);
    }
}

/// Writes a patch's extents so far over `buf` (chunk bytes from `start`).
fn overlay_onto_extents(extents: &[PatchExtent], start: u64, buf: &mut [u8]) {
    let end = start + buf.len() as u64;
    for extent in extents {
        let (from, to) = (u64::from(extent.offset), u64::from(extent.end()));
        let (lo, hi) = (from.max(start), to.min(end));
        if lo < hi {
            buf[(lo - start) as usize..(hi - start) as usize]
                .copy_from_slice(&extent.data[(lo - from) as usize..(hi - from) as usize]);
        }
    }
}

/// Whether one extent of `overlay` covers the whole block at chunk offset
/// `start`, so that none of the slot's bytes in it survive. (Several
/// extents covering it together count as not covering it: the block is then
/// read and checked, which is correct, only slower.)
fn block_covered(overlay: &[Layer], start: u64) -> bool {
    overlay
        .iter()
        .flat_map(|l| l.extents.iter())
        .any(|e| u64::from(e.offset) <= start && u64::from(e.end()) >= start + BLOCK)
}

/// The CRC32C of a `len`-byte message after bytes `offset..offset +
/// old.len()`, which were `old`, became `new` (the same length), from the
/// message's CRC before: without reading the rest of the message.
///
/// CRC32C is affine over GF(2): for two messages of one length, crc(A) ^
/// crc(B) is the pure (zero-initialised, not inverted) CRC of A ^ B. A ^ B
/// is zero outside the range, leading zeros do not change a pure CRC, and
/// trailing zeros multiply it by x^(8 * count) modulo the polynomial, which
/// is what [`crate::crc::shift`] computes. And over the range, the
/// pure CRC of old ^ new is crc(old) ^ crc(new), again by linearity.
pub(crate) fn crc_after_overwrite(crc: u32, len: u32, offset: u32, old: &[u8], new: &[u8]) -> u32 {
    debug_assert_eq!(old.len(), new.len());
    crc_after_replacing(
        crc,
        len,
        offset,
        old.len(),
        crc32c::crc32c(old),
        crc32c::crc32c(new),
    )
}

/// As [`crc_after_overwrite`], from the CRCs of the `range_len` bytes
/// replaced (`old_crc`) and of those replacing them (`new_crc`).
pub(crate) fn crc_after_replacing(
    crc: u32,
    len: u32,
    offset: u32,
    range_len: usize,
    old_crc: u32,
    new_crc: u32,
) -> u32 {
    debug_assert!(offset as usize + range_len <= len as usize);
    let trailing = len as usize - offset as usize - range_len;
    crc ^ crate::crc::shift(old_crc ^ new_crc, trailing)
}

/// Whether an extent of `overlay` touches chunk bytes `start..end`.
fn layers_touch(overlay: &[Layer], start: u64, end: u64) -> bool {
    overlay
        .iter()
        .any(|l| extents_touch(&l.extents, start, end))
}

/// Whether one of `extents` touches chunk bytes `start..end`.
fn extents_touch(extents: &[PatchExtent], start: u64, end: u64) -> bool {
    extents
        .iter()
        .any(|e| u64::from(e.offset) < end && u64::from(e.end()) > start)
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

#[cfg(test)]
mod tests {
    //! The CRC arithmetic of a patch, against recomputing the CRC of the
    //! whole message.

    use super::crc_after_overwrite;

    fn message(len: usize, seed: u32) -> Vec<u8> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as u8)
            .collect()
    }

    #[test]
    fn the_crc_after_an_overwrite_equals_a_recomputation() {
        for len in [1usize, 2, 7, 64, 4095, 4096, 4097, 65_536, 1 << 20] {
            let mut bytes = message(len, len as u32);
            let mut crc = crc32c::crc32c(&bytes);
            // Ranges at the start, the end, the whole message, one byte, and
            // across block boundaries, overwritten in turn.
            let ranges = [
                (0, len),
                (0, 1.min(len)),
                (len - 1, len),
                (len / 3, len / 3 + (len / 2).max(1).min(len - len / 3)),
                (len / 2, len),
            ];
            for (n, (start, end)) in ranges.into_iter().enumerate() {
                let new = message(end - start, 0x5a5a + n as u32);
                let old = bytes[start..end].to_vec();
                crc = crc_after_overwrite(crc, len as u32, start as u32, &old, &new);
                bytes[start..end].copy_from_slice(&new);
                assert_eq!(
                    crc,
                    crc32c::crc32c(&bytes),
                    "{len}-byte message, bytes {start}..{end} overwritten"
                );
            }
        }
    }

    #[test]
    fn an_overwrite_with_the_same_bytes_or_nothing_keeps_the_crc() {
        let bytes = message(10_000, 3);
        let crc = crc32c::crc32c(&bytes);
        assert_eq!(
            crc_after_overwrite(crc, 10_000, 100, &bytes[100..5000], &bytes[100..5000]),
            crc
        );
        assert_eq!(crc_after_overwrite(crc, 10_000, 10_000, &[], &[]), crc);
        assert_eq!(crc_after_overwrite(crc, 10_000, 0, &[], &[]), crc);
    }
}
