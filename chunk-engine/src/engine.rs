//! The engine's in-memory state and its operations: write (copy-on-write or
//! in-place append), commit, abort, remove, read, and the metadata queries.
//!
//! Locking: a striped table of async mutexes serialises operations on one
//! chunk (held across the operation's I/O); the `State` mutex guards the maps
//! and the allocator and is never held across an await. Commits and removes
//! queue a journal record and wait until it is durable; the journal writer
//! (journal.rs: the journal thread, or in inline mode a committer holding the
//! writer role) alone applies durable records to the committed map, so the
//! map always equals the state at the journal head.

use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use flyfs_bypass::{BlockDevice, BufferPool, DmaBuf};
use flyfs_proto::ids::{ChainId, ChunkId, ChunkVersion, InodeId};
use parking_lot::Mutex;

use crate::config::EngineConfig;
use crate::device_io::{DeviceIo, padded_in_place, round_up};
use crate::format::{BLOCK, ChunkMeta, Record, SlotId, Superblock};
use crate::journal::{self, Cursor, Journal};
use crate::request::{
    EngineStats, ReadOutcome, ReadRequest, ReadVersion, SpaceInfo, WriteOp, WriteOutcome,
    WriteRequest,
};
use crate::table::{ChainUsage, ChunkInfo, ChunkTable, PendingInfo};
use crate::{ChunkKey, EngineError};

/// One open engine: what its handles ([`Engine`]), its journal thread and
/// its readers' pins share.
pub(crate) struct OpenEngine<D> {
    pub device: DeviceIo<D>,
    pub config: EngineConfig,
    pub table: Mutex<ChunkTable>,
    pub journal: Journal,
    chunk_locks: ChunkLocks,
}

impl<D: BlockDevice> OpenEngine<D> {
    pub fn new(
        dev: D,
        sb: Superblock,
        pool: BufferPool,
        config: EngineConfig,
        table: ChunkTable,
        cursor: Cursor,
    ) -> OpenEngine<D> {
        OpenEngine {
            device: DeviceIo::new(dev, sb, pool),
            config,
            table: Mutex::new(table),
            journal: Journal::new(cursor),
            chunk_locks: ChunkLocks::new(),
        }
    }
}

const LOCK_STRIPES: usize = 1024;

/// Serialise operations on one chunk, held across the operation's I/O. A
/// fixed table of stripes, so that no lock is created or removed per chunk.
struct ChunkLocks {
    stripes: Box<[tokio::sync::Mutex<()>]>,
}

impl ChunkLocks {
    fn new() -> ChunkLocks {
        ChunkLocks {
            stripes: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    fn for_key(&self, key: ChunkKey) -> &tokio::sync::Mutex<()> {
        // A cheap mix of the key's fields; stripes only need to spread chunks.
        let hash = (u64::from(key.chain.0).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            ^ key.chunk.inode.0.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
            ^ u64::from(key.chunk.index).wrapping_mul(0x1656_67b1_9e37_79f9);
        &self.stripes[(hash >> 32) as usize % LOCK_STRIPES]
    }
}

/// Unpins a slot when a read ends, however it ends.
struct PinGuard<'a, D> {
    engine: &'a OpenEngine<D>,
    slot: SlotId,
}

impl<D> Drop for PinGuard<'_, D> {
    fn drop(&mut self) {
        self.engine.table.lock().unpin(self.slot);
    }
}

/// How a write will lay out its new pending version.
enum Plan {
    /// Append past the committed length into the same slot.
    InPlace { slot: SlotId, base: ChunkMeta },
    /// Build the new contents in a fresh slot.
    Cow {
        slot: SlotId,
        base: Option<ChunkMeta>,
    },
    /// Shrink: same slot, shorter length.
    Shrink { base: ChunkMeta },
}

/// A chunk engine on device `D`. Clones share the engine; the journal thread
/// (if any) stops when the last clone is dropped.
pub struct Engine<D: BlockDevice> {
    engine: Arc<OpenEngine<D>>,
    _journal_thread: Arc<JournalThread<D>>,
}

impl<D: BlockDevice> Clone for Engine<D> {
    fn clone(&self) -> Self {
        Engine {
            engine: self.engine.clone(),
            _journal_thread: self._journal_thread.clone(),
        }
    }
}

impl<D: BlockDevice> std::fmt::Debug for Engine<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.engine.device.name)
            .finish_non_exhaustive()
    }
}

/// The journal thread (thread mode; `None` in inline mode), stopped and
/// joined when the last [`Engine`] handle is dropped. The thread itself holds
/// the open engine too, so the engine's own reference count cannot say when
/// the last handle is gone.
struct JournalThread<D> {
    engine: Arc<OpenEngine<D>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<D> Drop for JournalThread<D> {
    // In inline mode there is no thread to stop: no committer future can
    // outlive the last handle (each borrows one), so no one writes any more.
    // Records of dropped committers still queued were never acknowledged.
    fn drop(&mut self) {
        self.engine.journal.queue.lock().shutdown = true;
        self.engine.journal.queue_cv.notify_all();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl<D: BlockDevice> Engine<D> {
    /// The first handle of an engine that recovery has opened.
    pub(crate) fn new(engine: Arc<OpenEngine<D>>, thread: Option<JoinHandle<()>>) -> Engine<D> {
        let journal_thread = Arc::new(JournalThread {
            engine: engine.clone(),
            thread: Mutex::new(thread),
        });
        Engine {
            engine,
            _journal_thread: journal_thread,
        }
    }

    pub fn superblock(&self) -> &Superblock {
        &self.engine.device.sb
    }

    pub fn pool(&self) -> &BufferPool {
        &self.engine.device.pool
    }

    pub fn device(&self) -> &D {
        &self.engine.device.dev
    }

    /// Largest chunk length.
    pub fn chunk_size_max(&self) -> u32 {
        self.engine.device.sb.group_bytes() as u32
    }

    /// Why the engine refuses writes, if it does.
    pub fn poisoned(&self) -> Option<Arc<str>> {
        self.engine.device.poisoned()
    }

    fn class_for(&self, len: u64) -> u8 {
        let sb = &self.engine.device.sb;
        (len.max(1).next_power_of_two().trailing_zeros() as u8).max(sb.class_log2_min)
    }

    fn invalid(key: ChunkKey, reason: impl Into<String>) -> EngineError {
        EngineError::InvalidRequest {
            key,
            reason: reason.into(),
        }
    }

    /// Creates pending version `req.version` of a chunk. See [`WriteOp`].
    pub async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, EngineError> {
        let engine = &*self.engine;
        let key = req.key;
        let max = engine.device.sb.group_bytes();
        // Validate the payload before taking any lock.
        let (offset, data_len, new_end) = match &req.op {
            WriteOp::Update { data, crc, .. } | WriteOp::Replace { data, crc } => {
                let offset = if let WriteOp::Update { offset, .. } = req.op {
                    offset
                } else {
                    0
                };
                let computed = crc32c::crc32c(data);
                if computed != *crc {
                    return Err(EngineError::Checksum {
                        key,
                        what: "write payload",
                        expected: *crc,
                        computed,
                    });
                }
                (
                    offset,
                    data.len() as u64,
                    u64::from(offset) + data.len() as u64,
                )
            }
            WriteOp::Truncate { len } => (*len, 0, u64::from(*len)),
        };
        if new_end > max {
            return Err(Self::invalid(
                key,
                format!("ends at byte {new_end}, past the largest chunk size {max}"),
            ));
        }
        if req.version.0 == 0 {
            return Err(Self::invalid(
                key,
                "version 0 is reserved for a chunk that does not exist",
            ));
        }
        engine.device.check_writable()?;
        let _chunk_lock = engine.chunk_locks.for_key(key).lock().await;
        // Checked again: the engine may have been poisoned while we waited.
        engine.device.check_writable()?;

        let plan = {
            let mut table = engine.table.lock();
            let base = table.committed.get(&key).copied();
            // A prepared version is durable: only its commit or abort may
            // end it, never a write that would silently replace it.
            if let Some(p) = table.pending.get(&key)
                && p.prepared.is_some()
            {
                return Err(EngineError::VersionConflict {
                    key,
                    requested: req.version,
                    committed: base.map(|b| b.meta.version),
                    pending: Some(p.version),
                });
            }
            if let Some(base) = base
                && req.version <= base.meta.version
            {
                return Err(EngineError::VersionConflict {
                    key,
                    requested: req.version,
                    committed: Some(base.meta.version),
                    pending: table.pending.get(&key).map(|p| p.version),
                });
            }
            let base_len = base.map_or(0, |b| u64::from(b.meta.len));
            let (new_len, appends) = match &req.op {
                WriteOp::Update { .. } => (base_len.max(new_end), u64::from(offset) >= base_len),
                WriteOp::Replace { .. } => (data_len, false),
                WriteOp::Truncate { len } => (u64::from(*len), u64::from(*len) >= base_len),
            };
            match base {
                Some(b) if matches!(req.op, WriteOp::Truncate { .. }) && new_len <= base_len => {
                    Plan::Shrink { base: b.meta }
                }
                Some(b)
                    if appends
                        && base_len >= u64::from(b.slot_written)
                        && new_len <= b.meta.slot.bytes() =>
                {
                    Plan::InPlace {
                        slot: b.meta.slot,
                        base: b.meta,
                    }
                }
                _ => {
                    let class = self.class_for(new_len);
                    let slot = table
                        .alloc
                        .allocate(class)
                        .ok_or_else(|| EngineError::NoSpace {
                            device: engine.device.name.clone(),
                            slot_bytes: 1 << class,
                        })?;
                    // A replace keeps nothing of the old contents.
                    let base = if matches!(req.op, WriteOp::Replace { .. }) {
                        None
                    } else {
                        base.map(|b| b.meta)
                    };
                    Plan::Cow { slot, base }
                }
            }
        };

        let prepare = req.prepare;
        let result = self.write_plan(key, &plan, req.op).await;
        let (slot, in_place, len, crc) = {
            let mut table = engine.table.lock();
            let (len, crc) = match result {
                Ok(done) => done,
                Err(error) => {
                    if let Plan::Cow { slot, .. } = plan {
                        table.release(slot);
                    }
                    return Err(error);
                }
            };
            let (slot, in_place) = match plan {
                Plan::InPlace { slot, .. } => (slot, true),
                Plan::Shrink { base } => (base.slot, true),
                Plan::Cow { slot, .. } => (slot, false),
            };
            if let Plan::InPlace { .. } = plan
                && let Some(committed) = table.committed.get_mut(&key)
            {
                committed.slot_written = committed.slot_written.max(len);
            }
            let pending = PendingInfo {
                version: req.version,
                chain_version: req.chain_version,
                slot,
                len,
                crc,
                in_place,
                client: req.client,
                request: req.request,
                prepared: None,
            };
            // The replaced pending version (if any) goes only now, so that a
            // failed write changes nothing.
            let replaced = table.pending.insert(key, pending);
            if let Some(old) = replaced
                && !old.in_place
            {
                table.release(old.slot);
            }
            (slot, in_place, len, crc)
        };
        if prepare {
            let meta = ChunkMeta {
                chain: key.chain,
                chunk: key.chunk,
                slot,
                len,
                version: req.version,
                chain_version: req.chain_version,
                crc,
                timestamp_us: now_us(),
                client: req.client,
                request: req.request,
            };
            // Applying the durable record marks the pending version prepared.
            if let Err(error) = journal::submit(engine, Record::Prepare(meta)).await {
                // The journal failed, so the engine is poisoned; the record
                // may yet be durable, which recovery allows (the version was
                // never acknowledged). In memory the write changes nothing.
                let mut table = engine.table.lock();
                if table
                    .pending
                    .get(&key)
                    .is_some_and(|p| p.version == req.version && p.slot == slot)
                {
                    table.pending.remove(&key);
                    if !in_place {
                        table.release(slot);
                    }
                }
                return Err(error);
            }
        }
        Ok(WriteOutcome {
            version: req.version,
            len,
            crc,
            in_place,
        })
    }

    /// Does the I/O of a write; returns the new length and CRC.
    async fn write_plan(
        &self,
        key: ChunkKey,
        plan: &Plan,
        op: WriteOp,
    ) -> Result<(u32, u32), EngineError> {
        let engine = &*self.engine;
        let what = || format!("{key:?}");
        // The new bytes, as (offset, data, crc of data); a truncate that
        // extends is an update with zeros.
        let (offset, data, data_crc) = match op {
            WriteOp::Update { offset, data, crc } => (offset, data, crc),
            WriteOp::Replace { data, crc } => (0, data, crc),
            WriteOp::Truncate { len } => {
                let base_len = match plan {
                    Plan::Shrink { base } => {
                        let buf = engine
                            .device
                            .read_at(
                                engine.device.slot_offset(base.slot),
                                round_up(u64::from(len)) as usize,
                                what,
                            )
                            .await?;
                        return Ok((len, crc32c::crc32c(&buf[..len as usize])));
                    }
                    Plan::InPlace { base, .. } => base.len,
                    Plan::Cow { base, .. } => base.map_or(0, |b| b.len),
                };
                let zeros = DmaBuf::alloc_zeroed((len - base_len) as usize);
                let crc = crc32c::crc32c(&zeros);
                (base_len, zeros, crc)
            }
        };
        let data_len = data.len() as u32;
        match *plan {
            Plan::Shrink { .. } => unreachable!("only a truncate shrinks"),
            Plan::InPlace { slot, base } => {
                let aligned = base.len & !(BLOCK as u32 - 1);
                let new_len = offset + data_len;
                // Fast path: block-aligned append straight from the caller's buffer.
                let data = if aligned == base.len && offset == base.len {
                    match padded_in_place(data) {
                        Ok(buf) => {
                            engine
                                .device
                                .write_at(
                                    engine.device.slot_offset(slot) + u64::from(aligned),
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
                let mut buf = engine.device.pool.alloc(io_len);
                if aligned < base.len {
                    // The block holding the committed tail is rewritten with
                    // the same committed bytes: sector writes are atomic, so
                    // a torn write leaves them intact either way.
                    let head = engine
                        .device
                        .read_at(
                            engine.device.slot_offset(slot) + u64::from(aligned),
                            BLOCK as usize,
                            what,
                        )
                        .await?;
                    buf[..BLOCK as usize].copy_from_slice(&head);
                }
                let tail_start = (base.len - aligned) as usize;
                let data_start = (offset - aligned) as usize;
                buf[tail_start..data_start].fill(0);
                buf[data_start..data_start + data.len()].copy_from_slice(&data);
                buf[data_start + data.len()..].fill(0);
                let appended = crc32c::crc32c(&buf[tail_start..(new_len - aligned) as usize]);
                let crc = crc32c::crc32c_combine(base.crc, appended, (new_len - base.len) as usize);
                engine
                    .device
                    .write_at(
                        engine.device.slot_offset(slot) + u64::from(aligned),
                        buf,
                        what,
                    )
                    .await?;
                Ok((new_len, crc))
            }
            Plan::Cow { slot, base } => {
                let base_len = base.map_or(0, |b| b.len);
                let new_len = base_len.max(offset + data_len);
                let covers_base = offset == 0 && data_len >= base_len;
                let data = if covers_base {
                    match padded_in_place(data) {
                        Ok(buf) => {
                            engine
                                .device
                                .write_at(engine.device.slot_offset(slot), buf, what)
                                .await?;
                            return Ok((new_len, data_crc));
                        }
                        Err(data) => data,
                    }
                } else {
                    data
                };
                let io_len = round_up(u64::from(new_len)) as usize;
                let mut buf = engine.device.pool.alloc(io_len);
                let mut filled = 0usize;
                if let Some(base) = base
                    && !covers_base
                    && base.len > 0
                {
                    let base_io = round_up(u64::from(base.len)) as usize;
                    buf.set_len(base_io);
                    let done = engine
                        .device
                        .dev
                        .read(engine.device.slot_offset(base.slot), buf)
                        .await;
                    buf = done.buf;
                    done.result.map_err(|e| {
                        engine
                            .device
                            .device_error(format!("reading {} for copy-on-write", what()), e)
                    })?;
                    buf.set_len(io_len);
                    filled = base.len as usize;
                }
                buf[filled..].fill(0);
                buf[offset as usize..(offset + data_len) as usize].copy_from_slice(&data);
                let crc = crc32c::crc32c(&buf[..new_len as usize]);
                engine
                    .device
                    .write_at(engine.device.slot_offset(slot), buf, what)
                    .await?;
                Ok((new_len, crc))
            }
        }
    }

    /// Makes pending version `version` the committed one, durably. Committing
    /// the version that is already committed succeeds again (retries). A
    /// prepared version is already durable: its commit changes only memory.
    pub async fn commit(
        &self,
        key: ChunkKey,
        version: ChunkVersion,
    ) -> Result<ChunkMeta, EngineError> {
        let engine = &*self.engine;
        engine.device.check_writable()?;
        let _chunk_lock = engine.chunk_locks.for_key(key).lock().await;
        let meta = {
            let mut table = engine.table.lock();
            let committed = table.committed.get(&key).map(|c| c.meta);
            match table.pending.get(&key) {
                Some(&PendingInfo {
                    version: v,
                    prepared: Some(meta),
                    ..
                }) if v == version => {
                    // Exactly what recovery makes of the Prepare record.
                    table.apply(&Record::Put(meta), true);
                    return Ok(meta);
                }
                Some(p) if p.version == version => ChunkMeta {
                    chain: key.chain,
                    chunk: key.chunk,
                    slot: p.slot,
                    len: p.len,
                    version,
                    chain_version: p.chain_version,
                    crc: p.crc,
                    timestamp_us: now_us(),
                    client: p.client,
                    request: p.request,
                },
                pending => match committed {
                    Some(meta) if meta.version == version => return Ok(meta),
                    None if pending.is_none() => return Err(EngineError::NotFound { key }),
                    _ => {
                        return Err(EngineError::VersionConflict {
                            key,
                            requested: version,
                            committed: committed.map(|m| m.version),
                            pending: pending.map(|p| p.version),
                        });
                    }
                },
            }
        };
        journal::submit(engine, Record::Put(meta)).await?;
        Ok(meta)
    }

    /// Drops pending version `version`. Succeeds if there is no pending
    /// version. A prepared version is durable, so its abort is too: a `Put`
    /// of the committed table (or a `Remove` when there is none) ends it.
    pub async fn abort(&self, key: ChunkKey, version: ChunkVersion) -> Result<(), EngineError> {
        let engine = &*self.engine;
        let _chunk_lock = engine.chunk_locks.for_key(key).lock().await;
        let restore = {
            let table = engine.table.lock();
            match table.pending.get(&key) {
                Some(p) if p.version == version && p.prepared.is_some() => {
                    Some(table.committed.get(&key).map_or(
                        Record::Remove {
                            chain: key.chain,
                            chunk: key.chunk,
                        },
                        |c| Record::Put(c.meta),
                    ))
                }
                _ => None,
            }
        };
        if let Some(record) = restore {
            engine.device.check_writable()?;
            // Applying the durable record drops the prepared version.
            return journal::submit(engine, record).await;
        }
        let mut table = engine.table.lock();
        match table.pending.get(&key).copied() {
            None => Ok(()),
            Some(p) if p.version == version => {
                table.pending.remove(&key);
                if !p.in_place {
                    table.release(p.slot);
                }
                Ok(())
            }
            Some(p) => Err(EngineError::VersionConflict {
                key,
                requested: version,
                committed: table.committed.get(&key).map(|c| c.meta.version),
                pending: Some(p.version),
            }),
        }
    }

    /// Removes a chunk, durably, with any pending version. Returns whether
    /// it existed. A failed remove changes nothing.
    pub async fn remove(&self, key: ChunkKey) -> Result<bool, EngineError> {
        let engine = &*self.engine;
        engine.device.check_writable()?;
        let _chunk_lock = engine.chunk_locks.for_key(key).lock().await;
        engine.device.check_writable()?;
        let (pending, prepared, committed) = {
            let table = engine.table.lock();
            let pending = table.pending.get(&key);
            (
                pending.is_some(),
                pending.is_some_and(|p| p.prepared.is_some()),
                table.committed.contains_key(&key),
            )
        };
        if committed || prepared {
            // Applying the durable record drops the pending version too.
            journal::submit(
                engine,
                Record::Remove {
                    chain: key.chain,
                    chunk: key.chunk,
                },
            )
            .await?;
        } else if pending {
            let mut table = engine.table.lock();
            let p = table
                .pending
                .remove(&key)
                .expect("pending version checked under the chunk lock");
            table.release(p.slot);
        }
        Ok(committed || pending)
    }

    /// Reads a range of a chunk; the range is clamped to the chunk's length.
    pub async fn read(&self, key: ChunkKey, req: ReadRequest) -> Result<ReadOutcome, EngineError> {
        let engine = &*self.engine;
        let (slot, len, crc, version) = {
            let mut table = engine.table.lock();
            let committed = table.committed.get(&key).map(|c| c.meta);
            let pending = table.pending.get(&key).copied();
            let from_committed = |m: ChunkMeta| (m.slot, m.len, m.crc, m.version);
            let from_pending = |p: PendingInfo| (p.slot, p.len, p.crc, p.version);
            let found = match req.version {
                ReadVersion::Committed => committed.map(from_committed),
                ReadVersion::Pending => pending.map(from_pending),
                ReadVersion::Exact(v) => pending
                    .filter(|p| p.version == v)
                    .map(from_pending)
                    .or(committed.filter(|m| m.version == v).map(from_committed)),
            };
            let Some(found) = found else {
                return Err(match req.version {
                    _ if committed.is_none() && pending.is_none() => EngineError::NotFound { key },
                    ReadVersion::Committed => EngineError::NotFound { key },
                    ReadVersion::Pending | ReadVersion::Exact(_) => EngineError::VersionConflict {
                        key,
                        requested: match req.version {
                            ReadVersion::Exact(v) => v,
                            _ => ChunkVersion(0),
                        },
                        committed: committed.map(|m| m.version),
                        pending: pending.map(|p| p.version),
                    },
                });
            };
            table.pin(found.0);
            found
        };
        let _pin = PinGuard { engine, slot };
        let start = req.offset.min(len);
        let end = start.saturating_add(req.len).min(len);
        let (io_start, io_end) = if req.verify {
            (0, round_up(u64::from(len)))
        } else {
            (u64::from(start) & !(BLOCK - 1), round_up(u64::from(end)))
        };
        if io_end == io_start {
            return Ok(ReadOutcome {
                data: engine.device.pool.alloc(0),
                version,
                chunk_len: len,
                chunk_crc: crc,
            });
        }
        let mut data = engine
            .device
            .read_at(
                engine.device.slot_offset(slot) + io_start,
                (io_end - io_start) as usize,
                || format!("{key:?}"),
            )
            .await?;
        if req.verify {
            let computed = crc32c::crc32c(&data[..len as usize]);
            if computed != crc {
                return Err(EngineError::Checksum {
                    key,
                    what: "chunk data",
                    expected: crc,
                    computed,
                });
            }
        }
        data.set_window(
            (u64::from(start) - io_start) as usize,
            (end - start) as usize,
        );
        Ok(ReadOutcome {
            data,
            version,
            chunk_len: len,
            chunk_crc: crc,
        })
    }

    /// What the engine knows of one chunk.
    pub fn stat(&self, key: ChunkKey) -> Option<ChunkInfo> {
        self.engine.table.lock().info(key)
    }

    /// The committed chunk of `inode` on `chain` with the highest index: where
    /// a file ends on this chain. One ordered-map lookup.
    pub fn last_chunk(&self, chain: ChainId, inode: InodeId) -> Option<ChunkInfo> {
        let table = self.engine.table.lock();
        let from = ChunkKey::new(chain, ChunkId { inode, index: 0 });
        let to = ChunkKey::new(
            chain,
            ChunkId {
                inode,
                index: u32::MAX,
            },
        );
        let (key, _) = table.committed.range(from..=to).next_back()?;
        table.info(*key)
    }

    /// Committed chunks of `chain` whose ids lie in `range`, in order, at most
    /// `limit`. A whole chain (`..`) is what a resync compares.
    pub fn chunks(
        &self,
        chain: ChainId,
        range: impl RangeBounds<ChunkId>,
        limit: usize,
    ) -> Vec<ChunkInfo> {
        let bound = |b: Bound<&ChunkId>| b.map(|id| ChunkKey::new(chain, *id));
        let start = match range.start_bound() {
            Bound::Unbounded => Bound::Included(ChunkKey::new(chain, ChunkId::default())),
            b => bound(b),
        };
        let end = match range.end_bound() {
            Bound::Unbounded => {
                Bound::Included(ChunkKey::new(chain, ChunkId::new(u64::MAX, u32::MAX)))
            }
            b => bound(b),
        };
        let table = self.engine.table.lock();
        table
            .committed
            .range((start, end))
            .take(limit)
            .filter_map(|(key, _)| table.info(*key))
            .collect()
    }

    /// Space used by `chain`'s committed chunks.
    pub fn chain_usage(&self, chain: ChainId) -> ChainUsage {
        self.engine
            .table
            .lock()
            .usage
            .get(&chain)
            .copied()
            .unwrap_or_default()
    }

    /// Chains with committed chunks on this engine.
    pub fn chains(&self) -> Vec<ChainId> {
        let mut chains: Vec<ChainId> = self.engine.table.lock().usage.keys().copied().collect();
        chains.sort();
        chains
    }

    pub fn stats(&self) -> EngineStats {
        self.engine.journal.counters.snapshot()
    }

    pub fn space(&self) -> SpaceInfo {
        let table = self.engine.table.lock();
        SpaceInfo {
            data_bytes: u64::from(self.engine.device.sb.group_count)
                * self.engine.device.sb.group_bytes(),
            allocated_bytes: table.alloc.used_bytes(),
            committed_chunks: table.committed.len() as u64,
        }
    }

    /// Checks that the allocator and the metadata agree: every slot in use
    /// belongs to exactly one committed or pending version, or to a reader
    /// holding a released slot. For tests and `flyfs admin`.
    pub fn check_consistency(&self) -> Result<(), String> {
        self.engine.table.lock().check_consistency()
    }
}
