//! The engine handle ([`Engine`]) and its operations: write (copy-on-write or
//! in-place append, optionally prepared), commit, abort, remove, read, and the
//! metadata queries. Each operation decides under the chunk table's mutex
//! what to do (table.rs), does the device I/O without it (device_io.rs), and
//! where it must be durable, queues a journal record and waits (journal.rs).
//!
//! Locking: a striped table of async mutexes (`ChunkLocks`) serialises
//! operations on one chunk (held across the operation's I/O); the chunk
//! table's mutex guards the maps and the allocator and is never held across
//! an await. Commits and removes queue a journal record and wait until it is
//! durable; the journal writer (journal.rs: the journal thread, or in inline
//! mode a committer holding the writer role) alone applies durable records to
//! the committed map, so the map always equals the state at the journal head.

use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::thread::JoinHandle;

use flyfs_bypass::{BlockDevice, BufferPool};
use flyfs_proto::ids::{ChainId, ChunkId, ChunkVersion, InodeId};
use parking_lot::Mutex;

use crate::config::EngineConfig;
use crate::device_io::{DeviceIo, WriteDone};
use crate::format::{ChunkMeta, PATCH_JOURNAL_SHARE, Record, Superblock};
use crate::journal::{self, Cursor, Journal};
use crate::request::{
    EngineStats, ReadOutcome, ReadRequest, SpaceInfo, WriteOutcome, WriteRequest,
};
use crate::table::{
    ChainUsage, ChunkInfo, ChunkTable, CommitStep, PatchLimits, PendingInfo, SlotPin,
};
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
    /// The commit timestamp of a chunk record: microseconds since the Unix
    /// epoch on the configured clock (0 for a clock before 1970).
    fn now_us(&self) -> u64 {
        (self.config.clock.now_ns().max(0) / 1_000) as u64
    }

    /// When a write may be a patch: on a format that has Patch records, up
    /// to the configured sizes and a share of the journal (a patch's record
    /// must fit a batch, and the prepared ones fit the room a checkpoint
    /// reserves for them).
    fn patch_limits(&self) -> PatchLimits {
        let share = self.device.sb.journal_bytes / PATCH_JOURNAL_SHARE;
        PatchLimits {
            enabled: self.device.sb.has_patches() && self.config.patch_bytes_max > 0,
            bytes_max: (self.config.patch_bytes_max as u64).min(share),
            pending_bytes_max: (self.config.patch_pending_bytes_max as u64).min(share),
        }
    }

    pub fn new(
        dev: D,
        sb: Superblock,
        pool: BufferPool,
        config: EngineConfig,
        table: ChunkTable,
        cursor: Cursor,
    ) -> OpenEngine<D> {
        OpenEngine {
            device: DeviceIo::new(dev, sb, pool, config.block_crc_cache_blocks),
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

    /// Why the engine refuses writes, if it does: a write or flush failed,
    /// or an internal fault (its journal thread panicked, or its device's
    /// reactor did) stopped it, in which case it refuses reads too. Either
    /// way the engine serves nothing new until it is reopened, and the
    /// storage service reports its targets offline.
    pub fn poisoned(&self) -> Option<Arc<str>> {
        self.engine.device.poisoned()
    }

    /// Test hook: the journal thread panics before its next batch, as a bug
    /// in it would. Has no effect in inline mode (there is no thread).
    #[cfg(feature = "testing")]
    pub fn inject_journal_panic(&self) {
        self.engine
            .journal
            .panic_on_next_batch
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Test hook: records submitted to the journal and not yet durable
    /// (those of batches in flight included: a record leaves the queue only
    /// once its batch's flush returned).
    #[cfg(feature = "testing")]
    pub fn journal_queued(&self) -> usize {
        self.engine.journal.queue.lock().records.len()
    }

    /// Test hook: a checkpoint follows the next journal batch.
    #[cfg(feature = "testing")]
    pub fn checkpoint_after_next_batch(&self) {
        self.engine
            .journal
            .checkpoint_after_next_batch
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Test hook: the read epoch, which every checkpoint advances when it
    /// makes its plan (see `ChunkTable::read_epoch`).
    #[cfg(feature = "testing")]
    pub fn read_epoch(&self) -> u64 {
        self.engine.table.lock().read_epoch
    }

    /// Creates pending version `req.version` of a chunk. See [`WriteOp`](crate::WriteOp).
    pub async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, EngineError> {
        let engine = &*self.engine;
        let key = req.key;
        // Validate the payload before taking any lock.
        let (extent, payload_crcs) = req.checked(engine.device.sb.group_bytes())?;
        engine.device.check_writable()?;
        let _chunk_lock = engine.chunk_locks.for_key(key).lock().await;
        // Checked again: the engine may have been poisoned while we waited.
        engine.device.check_writable()?;

        let plan = engine.table.lock().plan_write(
            &req,
            extent,
            engine.device.sb.class_log2_min,
            engine.patch_limits(),
            &engine.device.name,
        )?;
        let result = engine
            .device
            .write_plan(key, &plan, req.op, payload_crcs)
            .await;
        let (pending, record) = {
            let mut table = engine.table.lock();
            let WriteDone { len, crc, layer } = match result {
                Ok(done) => done,
                Err(error) => {
                    table.abandon_write(&plan);
                    return Err(error);
                }
            };
            let (slot, in_place) = plan.target();
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
            if layer.is_some() {
                engine
                    .journal
                    .counters
                    .patches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            table.install_pending(key, &plan, pending, layer);
            let record = req
                .prepare
                .then(|| table.record_for(key, pending.meta(key, engine.now_us()), true));
            (pending, record)
        };
        if let Some(record) = record {
            // Applying the durable record marks the pending version prepared.
            if let Err(error) = journal::submit(engine, record).await {
                // The journal failed, so the engine is poisoned; the record
                // may yet be durable, which recovery allows (the version was
                // never acknowledged). In memory the write changes nothing.
                engine.table.lock().drop_unprepared(key, &pending);
                return Err(error);
            }
        }
        Ok(WriteOutcome {
            version: req.version,
            len: pending.len,
            crc: pending.crc,
            in_place: pending.in_place,
        })
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
        let (meta, record) = {
            let mut table = engine.table.lock();
            match table.commit_step(key, version)? {
                CommitStep::Done(meta) => return Ok(meta),
                CommitStep::Record(pending) => {
                    let meta = pending.meta(key, engine.now_us());
                    (meta, table.record_for(key, meta, false))
                }
            }
        };
        journal::submit(engine, record).await?;
        Ok(meta)
    }

    /// Drops pending version `version`. Succeeds if there is no pending
    /// version. A prepared version is durable, so its abort is too: a `Put`
    /// of the committed state (or a `Remove` when there is none) ends it.
    pub async fn abort(&self, key: ChunkKey, version: ChunkVersion) -> Result<(), EngineError> {
        let engine = &*self.engine;
        let _chunk_lock = engine.chunk_locks.for_key(key).lock().await;
        let restore = engine.table.lock().abort_record(key, version);
        if let Some(record) = restore {
            engine.device.check_writable()?;
            // Applying the durable record drops the prepared version.
            return journal::submit(engine, record).await;
        }
        engine.table.lock().abort_pending(key, version)
    }

    /// Removes a chunk, durably, with any pending version. Returns whether
    /// it existed. A failed remove changes nothing.
    pub async fn remove(&self, key: ChunkKey) -> Result<bool, EngineError> {
        let engine = &*self.engine;
        engine.device.check_writable()?;
        let _chunk_lock = engine.chunk_locks.for_key(key).lock().await;
        engine.device.check_writable()?;
        let presence = engine.table.lock().presence(key);
        if presence.committed || presence.prepared {
            // Applying the durable record drops the pending version too.
            journal::submit(
                engine,
                Record::Remove {
                    chain: key.chain,
                    chunk: key.chunk,
                },
            )
            .await?;
        } else if presence.pending {
            engine.table.lock().remove_pending(key);
        }
        Ok(presence.committed || presence.pending)
    }

    /// Reads a range of a chunk; the range is clamped to the chunk's length.
    /// The bytes are checked (unless the engine is configured not to verify
    /// partial reads and `req` does not ask): against their block CRCs, or
    /// the chunk's CRC when those do not match or the read asks for it. Only
    /// a chunk-CRC mismatch is [`EngineError::ChunkCorrupt`].
    pub async fn read(&self, key: ChunkKey, req: ReadRequest) -> Result<ReadOutcome, EngineError> {
        let engine = &*self.engine;
        engine.device.check_readable()?;
        let target = engine.table.lock().pin_for_read(key, req.version)?;
        let _pin = SlotPin::new(&engine.table, &target);
        engine
            .device
            .read_pinned(key, target, req, engine.config.verify_reads)
            .await
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

    /// The first committed chunk at or after `start`, on any chain: where a
    /// walk over every chunk (the scrubber) goes next.
    pub(crate) fn first_committed_from(&self, start: Bound<ChunkKey>) -> Option<ChunkKey> {
        let table = self.engine.table.lock();
        table
            .committed
            .range((start, Bound::Unbounded))
            .next()
            .map(|(key, _)| *key)
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

    /// Partial reads since the engine opened whose blocks did not all match
    /// their block CRCs, so that the whole version was read and checked
    /// instead: reads racing an append to the block they read, blocks a
    /// crash tore, or rot (in the data or in the block-CRC region).
    pub fn block_crc_mismatches(&self) -> u64 {
        self.engine.device.block_crc_mismatches()
    }

    /// Test hook: the blocks (indices from the chunk's start) of `key`'s
    /// committed version whose bytes on the device do not match their block
    /// CRCs. Empty on a device without block CRCs. Unsynchronised with
    /// writes: call it when none of this chunk runs.
    #[cfg(feature = "testing")]
    pub async fn block_crc_check(&self, key: ChunkKey) -> Result<Vec<u64>, EngineError> {
        let engine = &*self.engine;
        let target = engine
            .table
            .lock()
            .pin_for_read(key, crate::ReadVersion::Committed)?;
        let _pin = SlotPin::new(&engine.table, &target);
        let device = &engine.device;
        let _applying = engine.journal.applying.lock().await;
        let blocks = u64::from(target.len).div_ceil(crate::format::BLOCK);
        if !device.sb.has_block_crcs() || blocks == 0 {
            return Ok(Vec::new());
        }
        let at = device.sb.slot_offset(target.slot);
        let expected = device.block_crcs(at, blocks).await?;
        let data = device
            .read_at(at, (blocks * crate::format::BLOCK) as usize, || {
                format!("{key:?}")
            })
            .await?;
        Ok(crate::block_crc::crcs_of(&data)
            .into_iter()
            .zip(expected)
            .enumerate()
            .filter(|(_, (actual, expected))| actual != expected)
            .map(|(block, _)| block as u64)
            .collect())
    }

    pub fn stats(&self) -> EngineStats {
        self.engine.journal.counters.snapshot()
    }

    /// Bytes the engine asked its device to write since it opened (data,
    /// block CRCs, journal, checkpoints, the open's own checkpoint included,
    /// and writes a cancelled writer issued): with the payload written, the
    /// device write amplification.
    pub fn device_bytes_written(&self) -> u64 {
        self.engine.device.bytes_written()
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
