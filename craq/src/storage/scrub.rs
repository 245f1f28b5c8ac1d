//! The scrubber and the repair of rotten chunks.
//!
//! The chunk engine finds rot ([`Engine::scrub_step`], and every whole-chunk
//! read, which fails with `ChunkCorrupt`); it knows nothing of replicas. This
//! file is the storage service's side: a walk over each engine's committed
//! chunks at the configured rate, and a repair for every rotten chunk that the
//! walk or a client's read finds.
//!
//! A repair takes the chunk's lock (so no write of the chunk interleaves),
//! checks under it that the chunk is still rotten, fetches the chunk whole
//! from another serving replica of its chain (`storage.FetchChunk`, a
//! storage-only method), checks the bytes against the length and CRC that
//! replica reports and the version against ours (the same or newer), and
//! installs them as a resync does: the rotten version is removed and the
//! fetched one written whole (`WriteOp::Replace`) and committed at its version.
//! Without a replica that passes those checks nothing is written: the chunk
//! keeps refusing reads, and the next pass reports it again.
//!
//! Between the removal and the commit the chunk is absent from the engine;
//! reads and version queries of it meanwhile answer "not serving" (the
//! target's repair window, below), never "no such chunk". A crash inside
//! the window leaves the chunk absent, which is safe: a restarted target
//! always goes through a resync, which sends it again. A failed write inside
//! the window fences the target off for the same resync.
//!
//! The walk's position is kept in memory only: a restarted node starts a new
//! pass from the first chunk.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flyfs_bypass::{BlockDevice, DmaBuf};
use flyfs_chunk_engine::{
    ChunkKey, ChunkMeta, EngineError, ReadRequest, WriteOp as EngineOp, WriteRequest,
};
use flyfs_proto::ids::{ChainVersion, ChunkId, ChunkVersion, InodeId, TargetId};
use flyfs_proto::wire::mgmt::PublicState;
use flyfs_proto::wire::storage::{FetchChunk, FetchChunkReq, FetchChunkRsp, StorageError};
use flyfs_rpc::Network;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::{Place, StorageNode, Target};

/// How a node scrubs its engines and repairs what it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrubConfig {
    /// Bytes per second the node's scrubbers read, shared evenly by its
    /// engines; 0 turns scrubbing off (chunks that client reads find rotten
    /// are still repaired).
    pub bytes_per_s: u64,
    /// Each pass over an engine starts at least this long after the
    /// previous one started (at once, when a pass took longer).
    pub pass_interval: Duration,
    /// Repairs running at once on the node, at most (at least 1).
    pub repairs_max: usize,
}

impl Default for ScrubConfig {
    /// 64 MiB/s: a 4 TB device is read in under a day, using a few percent
    /// of an NVMe device's bandwidth. A pass a day at most.
    fn default() -> ScrubConfig {
        ScrubConfig {
            bytes_per_s: 64 << 20,
            pass_interval: Duration::from_secs(24 * 3600),
            repairs_max: 4,
        }
    }
}

/// How much one scrub step reads before the walk paces itself: small enough
/// that the pacing is smooth, large enough that a step is not dominated by
/// its own overhead (the engine's own scrubber uses the same).
const STEP_BYTES: u64 = 4 << 20;

/// Rotten chunks waiting for a repair, at most: beyond that, reports are
/// dropped (and counted); the scrubber finds the chunks again on its next
/// pass.
const REPAIRS_QUEUED_MAX: usize = 1024;

/// Log lines about corruption and repairs: at most this many per window,
/// each kind; the count held back is said by the next line let through.
const LOG_LINES_PER_WINDOW: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// What the scrubbers and repairs of one node have done since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubStats {
    pub chunks_scrubbed: u64,
    pub bytes_scrubbed: u64,
    /// Rotten chunks found by the scrubber, or reported by a read while no
    /// repair of them was queued.
    pub corrupt_found: u64,
    pub repaired: u64,
    /// Repairs that ended without installing a good copy (no healthy
    /// replica, the target not serving, an error), and reports dropped
    /// because the repair queue was full.
    pub repair_failures: u64,
    /// Whole passes over an engine.
    pub passes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct ScrubCounters {
    chunks_scrubbed: AtomicU64,
    bytes_scrubbed: AtomicU64,
    corrupt_found: AtomicU64,
    repaired: AtomicU64,
    repair_failures: AtomicU64,
    passes: AtomicU64,
}

impl ScrubCounters {
    fn snapshot(&self) -> ScrubStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ScrubStats {
            chunks_scrubbed: load(&self.chunks_scrubbed),
            bytes_scrubbed: load(&self.bytes_scrubbed),
            corrupt_found: load(&self.corrupt_found),
            repaired: load(&self.repaired),
            repair_failures: load(&self.repair_failures),
            passes: load(&self.passes),
        }
    }
}

/// One rotten chunk to repair, on the engine of disk `disk`.
#[derive(Clone, Copy, Debug)]
struct RepairJob {
    key: ChunkKey,
    disk: u32,
}

/// The node's queue of repairs: jobs waiting, and every chunk queued or
/// being repaired (so a chunk read again and again is repaired once).
#[derive(Debug, Default)]
pub(crate) struct RepairQueue {
    waiting: VecDeque<RepairJob>,
    known: BTreeSet<ChunkKey>,
}

/// The chunks of one target whose repair is between removing the rotten
/// version and committing the good one, and how many such windows have
/// closed. A read that finds a chunk absent consults it (see
/// [`Target::absence`]).
#[derive(Debug, Default)]
pub(crate) struct RepairWindows {
    open: BTreeSet<ChunkId>,
    closed: u64,
}

/// Why a chunk looked absent to a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Absence {
    /// It does not exist.
    Real,
    /// A repair has removed the rotten version and not yet committed the
    /// good one.
    Repairing,
    /// A repair window closed since the read looked: look again.
    Changed,
}

impl Target {
    /// Taken before a read looks at the engine, for [`absence`](Self::absence).
    pub(crate) fn repairs_closed(&self) -> u64 {
        self.repair_windows.lock().closed
    }

    /// Why `chunk` looked absent to a read that took
    /// [`repairs_closed`](Self::repairs_closed) before it looked. A repair
    /// opens its window before it removes the rotten version and closes it
    /// after the commit, so a read that saw the removed state finds the
    /// window still open, or the closed count moved on.
    pub(crate) fn absence(&self, chunk: ChunkId, closed_before: u64) -> Absence {
        let windows = self.repair_windows.lock();
        if windows.open.contains(&chunk) {
            Absence::Repairing
        } else if windows.closed != closed_before {
            Absence::Changed
        } else {
            Absence::Real
        }
    }

    /// Whether a chunk of `inode` may have been absent, for a read of the
    /// file's last chunk that took `closed_before` before it looked.
    pub(crate) fn inode_repaired(&self, inode: InodeId, closed_before: u64) -> bool {
        let windows = self.repair_windows.lock();
        windows.closed != closed_before || windows.open.iter().any(|c| c.inode == inode)
    }

    fn open_window(self: &Arc<Self>, chunk: ChunkId) -> WindowGuard {
        self.repair_windows.lock().open.insert(chunk);
        WindowGuard {
            target: self.clone(),
            chunk,
        }
    }
}

/// Closes a repair window when dropped (whether the repair finished or
/// failed: a failed one has fenced the target off).
struct WindowGuard {
    target: Arc<Target>,
    chunk: ChunkId,
}

impl Drop for WindowGuard {
    fn drop(&mut self) {
        let mut windows = self.target.repair_windows.lock();
        windows.open.remove(&self.chunk);
        windows.closed += 1;
    }
}

/// Lets through at most [`LOG_LINES_PER_WINDOW`] lines per [`LOG_WINDOW`].
#[derive(Debug)]
pub(crate) struct LogLimit {
    state: Mutex<LogLimitState>,
}

#[derive(Debug)]
struct LogLimitState {
    window_from: Option<Instant>,
    lines: u32,
    held_back: u64,
}

impl Default for LogLimit {
    fn default() -> LogLimit {
        LogLimit {
            state: Mutex::new(LogLimitState {
                window_from: None,
                lines: 0,
                held_back: 0,
            }),
        }
    }
}

impl LogLimit {
    /// `Some(lines held back since the last one let through)` when this
    /// line may be logged.
    fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock();
        let now = Instant::now();
        if state
            .window_from
            .is_none_or(|from| now.duration_since(from) >= LOG_WINDOW)
        {
            state.window_from = Some(now);
            state.lines = 0;
        }
        if state.lines >= LOG_LINES_PER_WINDOW {
            state.held_back += 1;
            return None;
        }
        state.lines += 1;
        Some(std::mem::take(&mut state.held_back))
    }
}

/// The node's scrub and repair state.
#[derive(Debug, Default)]
pub(crate) struct Scrub {
    pub counters: ScrubCounters,
    queue: Mutex<RepairQueue>,
    wake: tokio::sync::Notify,
    corruption_log: LogLimit,
    repair_log: LogLimit,
}

/// How a repair ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repaired {
    /// A good copy from `from` was installed at `version`.
    From {
        from: TargetId,
        version: ChunkVersion,
    },
    /// Under the lock the chunk read back whole and intact: a write
    /// replaced it since it was found rotten.
    Healthy,
    /// The chunk was removed since it was found rotten.
    Gone,
}

/// Why a repair installed nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RepairError {
    #[error("this node hosts no target of {key:?}'s chain on disk {disk}")]
    NotHosted { key: ChunkKey, disk: u32 },
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error(
        "no healthy replica of {key:?} version {version:?}: {}",
        if refusals.is_empty() { "the chain has no other serving target".to_string() } else { refusals.join("; ") }
    )]
    NoHealthyReplica {
        key: ChunkKey,
        version: ChunkVersion,
        /// What each replica asked answered, by target.
        refusals: Vec<String>,
    },
}

/// A good copy of a chunk from another replica, checked.
struct Fetched {
    from: TargetId,
    rsp: FetchChunkRsp,
    data: Bytes,
}

impl<D: BlockDevice, N: Network> StorageNode<D, N> {
    /// What the scrubbers and repairs have done since the node started.
    pub fn scrub_stats(&self) -> ScrubStats {
        self.scrub.counters.snapshot()
    }

    /// Scrubs every engine at the configured rate and repairs the rotten
    /// chunks found (by the scrubbers and by reads), forever. The
    /// composition root spawns it beside [`run`](Self::run).
    pub async fn scrub(self: Arc<Self>) {
        let config = self.config.scrub;
        let repairs = self.clone().run_repairs(config.repairs_max.max(1));
        if config.bytes_per_s == 0 || self.engines.is_empty() {
            tracing::info!(node = ?self.config.node, "scrubbing is off (scrub.bytes_per_s = 0); rotten chunks that reads find are still repaired");
            repairs.await;
            return;
        }
        let per_engine = (config.bytes_per_s / self.engines.len() as u64).max(1);
        let walks = futures::future::join_all(
            (0..self.engines.len()).map(|disk| self.scrub_engine(disk, per_engine)),
        );
        futures::join!(repairs, walks);
    }

    /// Passes over engine `disk`, one after another, forever.
    async fn scrub_engine(&self, disk: usize, bytes_per_s: u64) {
        let engine = self.engines[disk].clone();
        let disk_label = disk.to_string();
        let chunks_metric =
            metrics::counter!("flyfs_storage_scrub_chunks_total", "disk" => disk_label.clone());
        let bytes_metric =
            metrics::counter!("flyfs_storage_scrub_bytes_total", "disk" => disk_label.clone());
        let corrupt_metric =
            metrics::counter!("flyfs_storage_scrub_corrupt_total", "disk" => disk_label);
        let counters = &self.scrub.counters;
        loop {
            let started = Instant::now();
            let mut position = None;
            let mut pass_bytes = 0u64;
            let mut pass_chunks = 0u64;
            let mut pass_corrupt = 0u64;
            let finished = loop {
                let step = match engine.scrub_step(position, STEP_BYTES).await {
                    Ok(step) => step,
                    Err(error) => break Err(error),
                };
                pass_bytes += step.bytes_verified;
                pass_chunks += step.chunks_verified;
                counters
                    .chunks_scrubbed
                    .fetch_add(step.chunks_verified, Ordering::Relaxed);
                counters
                    .bytes_scrubbed
                    .fetch_add(step.bytes_verified, Ordering::Relaxed);
                chunks_metric.increment(step.chunks_verified);
                bytes_metric.increment(step.bytes_verified);
                for corruption in step.corrupt {
                    pass_corrupt += 1;
                    corrupt_metric.increment(1);
                    counters.corrupt_found.fetch_add(1, Ordering::Relaxed);
                    if let Some(held_back) = self.scrub.corruption_log.admit() {
                        tracing::error!(disk, chunk = ?corruption.key, version = ?corruption.version, held_back, "scrub found a rotten chunk; repairing it from another replica: {}", corruption.message);
                    }
                    self.queue_repair(corruption.key, disk as u32);
                }
                // Paced on the whole pass: by time t after the start at most
                // `bytes_per_s * t` bytes (and one step) are read.
                let due_ns = u128::from(pass_bytes) * 1_000_000_000 / u128::from(bytes_per_s);
                let due = started + Duration::from_nanos(u64::try_from(due_ns).unwrap_or(u64::MAX));
                tokio::time::sleep_until(due).await;
                match step.next {
                    Some(next) => position = Some(next),
                    None => break Ok(()),
                }
            };
            match finished {
                Ok(()) => {
                    counters.passes.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(disk, chunks = pass_chunks, bytes = pass_bytes, corrupt = pass_corrupt, elapsed = ?started.elapsed(), "scrub pass done");
                }
                // The engine cannot read at all (a device failure, or it is
                // poisoned): the target is offline already; try again at the
                // next pass.
                Err(error) => {
                    if let Some(held_back) = self.scrub.corruption_log.admit() {
                        tracing::warn!(disk, held_back, "scrub pass abandoned: {error}");
                    }
                }
            }
            tokio::time::sleep_until(started + self.config.scrub.pass_interval).await;
        }
    }

    /// Asks for a repair of `chunk` of the chain of `place` (a read found it
    /// rotten).
    pub(crate) fn repair_after_read(&self, place: &Place, chunk: ChunkId) {
        let key = ChunkKey::new(place.chain.id, chunk);
        if self.queue_repair(key, place.target.disk) {
            self.scrub
                .counters
                .corrupt_found
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!("flyfs_storage_scrub_corrupt_total", "disk" => place.target.disk.to_string()).increment(1);
        }
    }

    /// Queues a repair unless one of the chunk is queued or running already;
    /// whether it queued one. A full queue drops the report (counted as a
    /// failure): the next scrub pass finds the chunk again.
    fn queue_repair(&self, key: ChunkKey, disk: u32) -> bool {
        let mut queue = self.scrub.queue.lock();
        if queue.known.contains(&key) {
            return false;
        }
        if queue.known.len() >= REPAIRS_QUEUED_MAX {
            drop(queue);
            self.repair_failed();
            if let Some(held_back) = self.scrub.repair_log.admit() {
                tracing::warn!(chunk = ?key, held_back, "{REPAIRS_QUEUED_MAX} repairs are queued already; this one waits for the next scrub pass");
            }
            return false;
        }
        queue.known.insert(key);
        queue.waiting.push_back(RepairJob { key, disk });
        drop(queue);
        self.scrub.wake.notify_one();
        true
    }

    fn repair_failed(&self) {
        self.scrub
            .counters
            .repair_failures
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("flyfs_storage_scrub_repair_failures_total").increment(1);
    }

    /// Runs queued repairs, at most `repairs_max` at once, forever.
    async fn run_repairs(self: Arc<Self>, repairs_max: usize) {
        let permits = Arc::new(tokio::sync::Semaphore::new(repairs_max));
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return; // Never closed: the semaphore is ours.
            };
            let job = loop {
                // A notification sent before we wait is kept (notify_one
                // stores one), so a job queued after this check still wakes
                // us.
                if let Some(job) = self.scrub.queue.lock().waiting.pop_front() {
                    break job;
                }
                self.scrub.wake.notified().await;
            };
            let node = self.clone();
            tokio::spawn(async move {
                node.repair_and_report(job).await;
                drop(permit);
            });
        }
    }

    async fn repair_and_report(&self, job: RepairJob) {
        let result = self.repair(job).await;
        self.scrub.queue.lock().known.remove(&job.key);
        match result {
            Ok(Repaired::From { from, version }) => {
                self.scrub.counters.repaired.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("flyfs_storage_scrub_repaired_total").increment(1);
                if let Some(held_back) = self.scrub.repair_log.admit() {
                    tracing::info!(chunk = ?job.key, ?version, ?from, held_back, "repaired a rotten chunk from a healthy replica");
                }
            }
            Ok(outcome) => {
                tracing::debug!(chunk = ?job.key, ?outcome, "nothing to repair");
            }
            Err(error) => {
                self.repair_failed();
                if let Some(held_back) = self.scrub.repair_log.admit() {
                    tracing::error!(chunk = ?job.key, held_back, "cannot repair a rotten chunk; it keeps refusing reads: {error}");
                }
            }
        }
    }

    /// Repairs one rotten chunk (see the module docs).
    async fn repair(&self, job: RepairJob) -> Result<Repaired, RepairError> {
        let key = job.key;
        let chain = key.chain;
        let target = self
            .targets
            .lock()
            .get(&chain)
            .filter(|t| t.disk == job.disk)
            .cloned()
            .ok_or(RepairError::NotHosted {
                key,
                disk: job.disk,
            })?;
        let _lock = target.locks.lock(key.chunk).await;
        // Routing as it is now that no write of the chunk is in flight here.
        let place = self.place(chain, self.routing_version_of(chain))?;
        if place.target.id != target.id {
            return Err(RepairError::NotHosted {
                key,
                disk: job.disk,
            });
        }
        self.readable(&place)?;
        let engine = self.engine(&target).clone();
        let Some(ours) = engine.stat(key).and_then(|info| info.committed) else {
            return Ok(Repaired::Gone);
        };
        match engine.read(key, ReadRequest::whole_verified()).await {
            Ok(_) => return Ok(Repaired::Healthy),
            Err(EngineError::ChunkCorrupt { .. } | EngineError::Checksum { .. }) => {}
            Err(EngineError::NotFound { .. } | EngineError::VersionConflict { .. }) => {
                return Ok(Repaired::Gone);
            }
            Err(error) => return Err(self.engine_failed(&place, error).into()),
        }
        let fetched = self.fetch_good_copy(&place, &ours).await?;
        self.install_good_copy(&place, &target, &ours, &fetched)
            .await?;
        Ok(Repaired::From {
            from: fetched.from,
            version: fetched.rsp.version,
        })
    }

    /// The chunk whole from the first other serving replica whose copy
    /// passes the checks.
    async fn fetch_good_copy(
        &self,
        place: &Place,
        ours: &ChunkMeta,
    ) -> Result<Fetched, RepairError> {
        let key = ChunkKey::new(ours.chain, ours.chunk);
        let mut refusals = Vec::new();
        let peers = place
            .chain
            .targets
            .iter()
            .filter(|t| t.target != place.target.id && t.state == PublicState::Serving);
        for peer in peers {
            match self.fetch_from(place, peer.target, ours).await {
                Ok(fetched) => return Ok(fetched),
                Err(reason) => refusals.push(format!("{:?}: {reason}", peer.target)),
            }
        }
        Err(RepairError::NoHealthyReplica {
            key,
            version: ours.version,
            refusals,
        })
    }

    /// The chunk from `peer`, or why its answer is no good.
    async fn fetch_from(
        &self,
        place: &Place,
        peer: TargetId,
        ours: &ChunkMeta,
    ) -> Result<Fetched, String> {
        let addr = place
            .addr_of(peer)
            .ok_or_else(|| "no address in the routing".to_string())?;
        let req = FetchChunkReq {
            chain: place.chain.id,
            chain_version: place.version(),
            chunk: ours.chunk,
        };
        let (rsp, data) = self
            .rpc
            .call::<FetchChunk>(&addr, &req, Bytes::new(), &self.call_options())
            .await
            .map_err(|e| e.to_string())?;
        let rsp = rsp.map_err(|e| e.to_string())?;
        let data = data
            .into_bytes()
            .ok_or_else(|| "its payload is not in local memory".to_string())?;
        if rsp.version == ChunkVersion(0) {
            return Err("it has no such chunk".into());
        }
        if rsp.version < ours.version {
            return Err(format!(
                "its version {:?} is older than ours ({:?})",
                rsp.version, ours.version
            ));
        }
        if data.len() != rsp.len as usize {
            return Err(format!(
                "it sent {} bytes for a chunk of {}",
                data.len(),
                rsp.len
            ));
        }
        let computed = crc32c::crc32c(&data);
        if computed != rsp.crc {
            return Err(format!(
                "its bytes fail the CRC it reported: expected {:#010x}, computed {computed:#010x}",
                rsp.crc
            ));
        }
        Ok(Fetched {
            from: peer,
            rsp,
            data,
        })
    }

    /// Replaces our rotten version with the fetched one, under the chunk
    /// lock the caller holds.
    async fn install_good_copy(
        &self,
        place: &Place,
        target: &Arc<Target>,
        ours: &ChunkMeta,
        fetched: &Fetched,
    ) -> Result<(), RepairError> {
        let engine = self.engine(target);
        let key = ChunkKey::new(ours.chain, ours.chunk);
        let version = fetched.rsp.version;
        // The same version keeps who wrote it (the head recognises a
        // client's retry by it); a newer one is the peer's.
        let (chain_version, client, request) = if version == ours.version {
            (ours.chain_version, ours.client, ours.request)
        } else {
            (
                fetched.rsp.chain_version.max(ChainVersion(1)),
                Default::default(),
                Default::default(),
            )
        };
        let data = DmaBuf::from_bytes(fetched.data.clone())
            .unwrap_or_else(|bytes| DmaBuf::copy_from(&bytes));
        let _window = target.open_window(ours.chunk);
        let installed = async {
            engine.remove(key).await?;
            engine
                .write(WriteRequest {
                    key,
                    version,
                    chain_version,
                    op: EngineOp::Replace {
                        data,
                        crc: fetched.rsp.crc,
                    },
                    client,
                    request,
                    prepare: false,
                })
                .await?;
            engine.commit(key, version).await
        }
        .await;
        if let Err(error) = installed {
            // The chunk may be gone from this replica while the chain has
            // it: only a resync makes this target whole again.
            self.fence(place, &format!("repairing {key:?} failed: {error}"));
            return Err(self.engine_failed(place, error).into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_limited_per_window_and_the_held_back_are_counted() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let limit = LogLimit::default();
            for _ in 0..LOG_LINES_PER_WINDOW {
                assert_eq!(limit.admit(), Some(0));
            }
            assert_eq!(limit.admit(), None);
            assert_eq!(limit.admit(), None);
            tokio::time::advance(LOG_WINDOW).await;
            assert_eq!(limit.admit(), Some(2));
            assert_eq!(limit.admit(), Some(0));
        });
    }

    #[test]
    fn a_read_that_saw_a_repair_window_never_concludes_absence() {
        let target = Arc::new(Target {
            id: TargetId(1),
            chain: flyfs_proto::ids::ChainId(1),
            disk: 0,
            local: Mutex::new(super::super::Local::UpToDate),
            locks: Default::default(),
            channels: super::super::Channels::new(Default::default()),
            forwards: Default::default(),
            removing: Default::default(),
            inflight: tokio::sync::RwLock::new(()),
            repair_windows: Default::default(),
        });
        let chunk = ChunkId::new(7, 0);
        let other = ChunkId::new(8, 0);
        let before = target.repairs_closed();
        assert_eq!(target.absence(chunk, before), Absence::Real);
        let window = target.open_window(chunk);
        assert_eq!(target.absence(chunk, before), Absence::Repairing);
        assert!(target.inode_repaired(InodeId(7), before));
        assert!(!target.inode_repaired(InodeId(8), before));
        assert_eq!(target.absence(other, before), Absence::Real);
        drop(window);
        // The window closed between the read's look and its check.
        assert_eq!(target.absence(chunk, before), Absence::Changed);
        assert!(target.inode_repaired(InodeId(8), before));
        let after = target.repairs_closed();
        assert_eq!(target.absence(chunk, after), Absence::Real);
    }
}
