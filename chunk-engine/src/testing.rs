//! A test harness: the real engine on a fault-injecting in-memory device,
//! beside a trivially correct model (a map of byte vectors), driven by the
//! same operation sequence and compared after every step.
//!
//! Power cuts and crashes are operations too. After a cut every I/O fails, so
//! the engine poisons itself and operations fail; a commit, prepared write,
//! abort or remove that failed may or may not have become durable, so the
//! model records both outcomes as allowed. At the crash the device drops or
//! tears every unflushed write, the engine reopens, and the recovered state
//! must be, per chunk, the last acknowledged durable state (a prepared version
//! counts as committed) or one of the allowed unacknowledged ones, with a
//! valid checksum; the allocator must agree with the metadata.
//!
//! The medium is the memory device by default; [`Harness::on`] takes any
//! [`Medium`] (the NVMe driver in the guest tests, which cuts the power
//! itself and tears the writes caught by the cut, since its controller
//! keeps every write it completes and never tears one).
//!
//! Used by `tests/model.rs` (proptest), `tests/crash.rs` (seeded, thousands
//! of crash points), `tests/guest_engine_nvme.rs` and the cargo-fuzz targets
//! in fuzz/. Enabled by the
//! `testing` feature; never part of a production build.

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use flyfs_bypass::fault::{Fault, FaultyDevice};
use flyfs_bypass::mem::MemDevice;
use flyfs_bypass::{BlockDevice, BufferPool, DmaBuf, HugePages, PoolConfig};
use flyfs_proto::ids::{ChainId, ChainVersion, ChunkId, ChunkVersion, ClientId, RequestId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    ChunkKey, Engine, EngineConfig, EngineError, FormatOptions, JournalMode, ReadRequest,
    ReadVersion, UpdateExtent, WriteOp, WriteRequest,
};

/// Largest chunk in the harness's format: small, so sizes cross classes.
pub const CHUNK_MAX: u32 = 64 << 10;
const KEYS: u8 = 8;

/// One step of a test.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write `len` bytes at `offset` (or at the end of the chunk if `append`).
    /// `prepare` (in every write) makes the pending version durable.
    Write {
        key: u8,
        offset: u16,
        len: u16,
        seed: u8,
        append: bool,
        prepare: bool,
    },
    /// Write several extents, (offset, length, seed) each, as one update.
    WriteExtents {
        key: u8,
        extents: Vec<(u16, u16, u8)>,
        prepare: bool,
    },
    Replace {
        key: u8,
        len: u16,
        seed: u8,
        prepare: bool,
    },
    Truncate {
        key: u8,
        len: u16,
        prepare: bool,
    },
    Commit {
        key: u8,
    },
    /// Commit every pending chunk at once, so the journal can batch them.
    CommitAll,
    Abort {
        key: u8,
    },
    Remove {
        key: u8,
    },
    Read {
        key: u8,
        offset: u16,
        len: u16,
        pending: bool,
    },
    /// Close cleanly and reopen.
    Reopen,
    /// Cut the power `after` I/Os from now: every later I/O fails.
    PowerCut {
        after: u8,
    },
    /// Lose or tear all unflushed writes (seeded) and reopen.
    Crash {
        seed: u64,
    },
    /// Writes to distinct chunks, (key, offset, length, seed, prepare) each,
    /// issued at once so that several are in flight when a power cut lands
    /// (a repeated key is skipped: the order of two writes to one chunk is
    /// not the model's to know).
    WriteMany {
        writes: Vec<(u8, u16, u16, u8, bool)>,
    },
}

type Contents = (Vec<u8>, u32);

#[derive(Clone, Debug, Default)]
struct ModelChunk {
    committed: Option<Contents>,
    pending: Option<Contents>,
    /// The pending version is durable (a prepared write).
    prepared: bool,
    /// Committed states a crash may also leave (unacknowledged commits and removes).
    maybe: Vec<Option<Contents>>,
}

impl ModelChunk {
    /// What recovery must find unless an unacknowledged change landed.
    fn durable(&self) -> &Option<Contents> {
        if self.prepared {
            &self.pending
        } else {
            &self.committed
        }
    }
}

/// A device the harness can run the engine on, and what a crash does to it
/// beyond the power cut that the harness injects above it.
pub trait Medium: BlockDevice + Clone {
    /// Loses what a power failure would lose, chosen by `seed`.
    fn crash(&self, seed: u64);

    /// Cuts the power in the medium itself `after_ios` I/Os from now, if it
    /// can (`true`); otherwise the harness cuts it above the medium, in its
    /// fault-injecting device. `crash` restores it.
    fn cut_power(&self, _after_ios: u64, _seed: u64) -> bool {
        false
    }
}

impl Medium for MemDevice {
    /// Drops or tears every unflushed write.
    fn crash(&self, seed: u64) {
        MemDevice::crash(self, seed);
    }
}

impl Medium for flyfs_bypass::nvme::NvmeDevice {
    /// Restores the power: the controller keeps every write it completed
    /// (the emulated one reports a volatile cache but its flush is a no-op,
    /// so there is nothing it could lose), and the driver's own power cut
    /// already failed every I/O after the cut point, tearing the writes.
    fn crash(&self, _seed: u64) {
        self.restore_power();
    }

    /// The driver's own power cut, which tears writes (see
    /// `NvmeDevice::inject_power_cut`).
    fn cut_power(&self, after_ios: u64, seed: u64) -> bool {
        self.inject_power_cut(after_ios, seed);
        true
    }
}

/// The engine under test beside its model.
#[allow(missing_debug_implementations)]
pub struct Harness<D: Medium = MemDevice> {
    rt: tokio::runtime::Runtime,
    mem: D,
    dev: FaultyDevice<D>,
    engine: Option<Engine<FaultyDevice<D>>>,
    config: EngineConfig,
    model: BTreeMap<u8, ModelChunk>,
    cut_armed: bool,
    /// Whether recoveries are themselves cut short (see [`Harness::crash`]).
    cut_recoveries: bool,
    pub steps: u64,
    pub crashes: u64,
    /// Recoveries a power cut interrupted (each then recovered again).
    pub recovery_cuts: u64,
    /// Writes the engine made as patches, and Patch layers its checkpoints
    /// wrote into their slots, over every engine the run opened: a test of
    /// the patch path checks that it ran.
    pub patches: u64,
    pub patch_layers_applied: u64,
    /// Journal batches written while an older one's flush was outstanding
    /// (thread mode), over every engine the run opened.
    pub overlapped_batches: u64,
    /// Journal batches written while a checkpoint was (thread mode).
    pub batches_beside_checkpoints: u64,
}

fn key(k: u8) -> ChunkKey {
    let k = k % KEYS;
    ChunkKey::new(
        ChainId(1 + u32::from(k & 1)),
        ChunkId::new(1 + u64::from((k >> 1) & 1), u32::from(k >> 2)),
    )
}

fn fill(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(167).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn pool() -> BufferPool {
    BufferPool::new(&PoolConfig {
        classes: vec![(4096, 32), (65536, 8)],
        hugepages: HugePages::Never,
    })
    .expect("test pool")
}

impl Harness {
    /// A freshly formatted 16 MiB device with a tiny journal (64 KiB), so
    /// that a few dozen operations wrap it and write checkpoints. The engine
    /// runs with journal mode `journal` (on a current-thread runtime, as a
    /// simulator would run an inline engine).
    pub fn new(seed: u64, journal: JournalMode) -> Harness {
        Harness::on(MemDevice::new(16 << 20, 4096), seed, journal)
    }
}

impl<D: Medium> Harness<D> {
    /// The harness on `mem`, formatted afresh (whatever it held is lost).
    pub fn on(mem: D, seed: u64, journal: JournalMode) -> Harness<D> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let dev = FaultyDevice::new(mem.clone(), seed);
        // Flushes that take a turn of the executor: the journal thread then
        // writes the next batch while one's flush is outstanding (format
        // version 5), and power cuts find several batches unflushed.
        dev.set_flush_yields(true);
        let options = FormatOptions {
            chunk_size_min: 4096,
            chunk_size_max: u64::from(CHUNK_MAX),
            journal_bytes: Some(64 << 10),
            // The medium may hold a previous case's engine (a real device).
            force: true,
        };
        let config = EngineConfig {
            journal,
            ..EngineConfig::default()
        };
        let engine = rt.block_on(async {
            Engine::format(&dev, &options).await.expect("format");
            Engine::open(dev.clone(), pool(), config.clone())
                .await
                .expect("open")
        });
        Harness {
            rt,
            mem,
            dev,
            engine: Some(engine),
            config,
            model: BTreeMap::new(),
            cut_armed: false,
            cut_recoveries: false,
            steps: 0,
            crashes: 0,
            recovery_cuts: 0,
            patches: 0,
            patch_layers_applied: 0,
            overlapped_batches: 0,
            batches_beside_checkpoints: 0,
        }
    }

    /// Cut the power during recoveries too: after a crash, a third of the
    /// reopenings are cut at one of their first writes (superblock repair,
    /// checkpoint writes, the journal's reset), the medium loses or tears
    /// what was unflushed, and recovery starts over, up to three times in a
    /// row. Off by default, so that pinned seeds replay as they were found.
    pub fn cutting_recoveries(mut self) -> Harness<D> {
        self.cut_recoveries = true;
        self
    }

    /// The medium under the engine (for its statistics).
    pub fn medium(&self) -> &D {
        &self.mem
    }

    fn engine(&self) -> &Engine<FaultyDevice<D>> {
        self.engine.as_ref().expect("engine is open between steps")
    }

    /// The engine's and the model's view of chunk `k`, for debugging a seed.
    pub fn describe(&self, k: u8) -> String {
        let chunk = self.model.get(&(k % KEYS)).cloned().unwrap_or_default();
        let brief = |c: &Option<Contents>| c.as_ref().map(|(b, v)| (b.len(), *v));
        format!(
            "engine {:?}; model committed {:?} pending {:?} maybe {:?}",
            self.engine().stat(key(k)),
            brief(&chunk.committed),
            brief(&chunk.pending),
            chunk.maybe.iter().map(brief).collect::<Vec<_>>()
        )
    }

    /// Runs one operation and checks the engine against the model.
    pub fn step(&mut self, op: &Op) -> Result<(), String> {
        self.steps += 1;
        let result = self.apply(op);
        result.map_err(|e| format!("step {} {op:?}: {e}", self.steps))?;
        if !self.cut_armed {
            self.compare()
                .map_err(|e| format!("after step {} {op:?}: {e}", self.steps))?;
        }
        Ok(())
    }

    /// An error is expected only once the power is cut.
    fn failed(&self, what: &str, error: &EngineError) -> Result<(), String> {
        if self.cut_armed {
            Ok(())
        } else {
            Err(format!("{what} failed without a fault: {error}"))
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::Write {
                key: k,
                offset,
                len,
                seed,
                append,
                prepare,
            } => {
                let chunk = self.model.entry(k % KEYS).or_default().clone();
                let base = chunk.committed.clone().map(|c| c.0).unwrap_or_default();
                let offset = if append {
                    base.len() as u32
                } else {
                    u32::from(offset)
                };
                let data = fill(usize::from(len) % 20_000, seed);
                let version = chunk.committed.as_ref().map_or(0, |c| c.1) + 1;
                let op = WriteOp::Update {
                    offset,
                    data: DmaBuf::copy_from(&data),
                    crc: crc32c::crc32c(&data),
                };
                let result = self.write(k, version, op, prepare);
                let end = offset as usize + data.len();
                if end > CHUNK_MAX as usize {
                    return match result {
                        Err(EngineError::InvalidRequest { .. }) => Ok(()),
                        other => Err(format!("write past the chunk size gave {other:?}")),
                    };
                }
                let mut new = base;
                if new.len() < end {
                    new.resize(end, 0);
                }
                new[offset as usize..end].copy_from_slice(&data);
                self.wrote(k, result, new, version, prepare)
            }
            Op::WriteExtents {
                key: k,
                ref extents,
                prepare,
            } => {
                let chunk = self.model.entry(k % KEYS).or_default().clone();
                let mut new = chunk.committed.clone().map(|c| c.0).unwrap_or_default();
                let version = chunk.committed.as_ref().map_or(0, |c| c.1) + 1;
                let mut list = Vec::new();
                let mut end_max = 0;
                for &(offset, len, seed) in extents {
                    let data = fill(usize::from(len) % 9_000, seed);
                    let end = usize::from(offset) + data.len();
                    end_max = end_max.max(end);
                    if end <= CHUNK_MAX as usize {
                        if new.len() < end {
                            new.resize(end, 0);
                        }
                        new[usize::from(offset)..end].copy_from_slice(&data);
                    }
                    list.push(UpdateExtent {
                        offset: u32::from(offset),
                        crc: crc32c::crc32c(&data),
                        data: DmaBuf::copy_from(&data),
                    });
                }
                let count = list.len();
                let result = self.write(k, version, WriteOp::Extents(list), prepare);
                if count == 0 || count > crate::EXTENTS_MAX || end_max > CHUNK_MAX as usize {
                    return match result {
                        Err(EngineError::InvalidRequest { .. }) => Ok(()),
                        other => Err(format!("an invalid multi-extent write gave {other:?}")),
                    };
                }
                self.wrote(k, result, new, version, prepare)
            }
            Op::Replace {
                key: k,
                len,
                seed,
                prepare,
            } => {
                let data = fill(usize::from(len) % (CHUNK_MAX as usize + 1), seed);
                let version = self
                    .model
                    .get(&(k % KEYS))
                    .and_then(|c| c.committed.as_ref())
                    .map_or(0, |c| c.1)
                    + 1;
                let op = WriteOp::Replace {
                    data: DmaBuf::copy_from(&data),
                    crc: crc32c::crc32c(&data),
                };
                let result = self.write(k, version, op, prepare);
                self.wrote(k, result, data, version, prepare)
            }
            Op::Truncate {
                key: k,
                len,
                prepare,
            } => {
                let len = u32::from(len) % (CHUNK_MAX + 1);
                let mut new = self
                    .model
                    .get(&(k % KEYS))
                    .and_then(|c| c.committed.clone())
                    .map(|c| c.0)
                    .unwrap_or_default();
                new.resize(len as usize, 0);
                let version = self
                    .model
                    .get(&(k % KEYS))
                    .and_then(|c| c.committed.as_ref())
                    .map_or(0, |c| c.1)
                    + 1;
                let result = self.write(k, version, WriteOp::Truncate { len }, prepare);
                self.wrote(k, result, new, version, prepare)
            }
            Op::Commit { key: k } => self.commit(&[k % KEYS]),
            Op::CommitAll => {
                let keys: Vec<u8> = self
                    .model
                    .iter()
                    .filter(|(_, c)| c.pending.is_some())
                    .map(|(k, _)| *k)
                    .collect();
                self.commit(&keys)
            }
            Op::Abort { key: k } => {
                let Some(version) = self
                    .model
                    .get(&(k % KEYS))
                    .and_then(|c| c.pending.as_ref())
                    .map(|p| p.1)
                else {
                    return Ok(());
                };
                let engine = self.engine().clone();
                let result = self
                    .rt
                    .block_on(engine.abort(key(k), ChunkVersion(version)));
                let chunk = self.model.entry(k % KEYS).or_default();
                match result {
                    Ok(()) => {
                        chunk.pending = None;
                        chunk.prepared = false;
                        Ok(())
                    }
                    Err(error) => {
                        // A prepared version stays; its abort may or may
                        // not have become durable.
                        if chunk.prepared {
                            chunk.maybe.push(chunk.committed.clone());
                        }
                        self.failed("abort", &error)
                    }
                }
            }
            Op::Remove { key: k } => {
                let engine = self.engine().clone();
                let result = self.rt.block_on(engine.remove(key(k)));
                let chunk = self.model.entry(k % KEYS).or_default();
                let existed = chunk.committed.is_some() || chunk.pending.is_some();
                match result {
                    Ok(found) if found == existed => {
                        *chunk = ModelChunk {
                            maybe: std::mem::take(&mut chunk.maybe),
                            ..Default::default()
                        };
                        Ok(())
                    }
                    Ok(found) => Err(format!("remove said existed={found}, model says {existed}")),
                    // A failed remove changes nothing in memory, and may or
                    // may not be durable.
                    Err(error) => {
                        chunk.maybe.push(None);
                        self.failed("remove", &error)
                    }
                }
            }
            Op::Read {
                key: k,
                offset,
                len,
                pending,
            } => {
                let engine = self.engine().clone();
                let version = if pending {
                    ReadVersion::Pending
                } else {
                    ReadVersion::Committed
                };
                // Most partial reads take the block-CRC path (`verify_reads`
                // is on); a third ask for the whole-chunk check.
                let request = ReadRequest {
                    offset: u32::from(offset),
                    len: u32::from(len),
                    version,
                    verify: len % 3 == 0,
                };
                let result = self.rt.block_on(engine.read(key(k), request));
                let chunk = self.model.get(&(k % KEYS)).cloned().unwrap_or_default();
                let want = if pending {
                    chunk.pending
                } else {
                    chunk.committed
                };
                match (result, want) {
                    (Ok(read), Some((bytes, version))) => {
                        let start = usize::from(offset).min(bytes.len());
                        let end = (start + usize::from(len)).min(bytes.len());
                        if read.data[..] != bytes[start..end] || read.version.0 != version {
                            return Err(format!(
                                "read {start}..{end} of v{version} returned other bytes or {:?}",
                                read.version
                            ));
                        }
                        Ok(())
                    }
                    (
                        Err(EngineError::NotFound { .. } | EngineError::VersionConflict { .. }),
                        None,
                    ) => Ok(()),
                    (Err(error), Some(_)) => self.failed("read", &error),
                    (Ok(read), None) => Err(format!(
                        "read of a missing version returned {:?}",
                        read.version
                    )),
                    (Err(error), None) => {
                        Err(format!("read of a missing chunk: unexpected {error}"))
                    }
                }
            }
            Op::Reopen => {
                if self.cut_armed {
                    return self.crash(0);
                }
                self.note_stats();
                self.engine = None;
                let engine =
                    self.rt
                        .block_on(Engine::open(self.dev.clone(), pool(), self.config.clone()));
                self.engine = Some(engine.map_err(|e| format!("reopen: {e}"))?);
                for chunk in self.model.values_mut() {
                    if chunk.prepared {
                        chunk.committed = chunk.pending.take();
                    }
                    chunk.pending = None;
                    chunk.prepared = false;
                }
                self.engine().check_consistency()
            }
            Op::PowerCut { after } => {
                if !self.cut_armed {
                    let after = u64::from(after % 24);
                    // The tearing is seeded by where the run is, so a run
                    // replays exactly.
                    let seed = self.steps << 16 | self.crashes;
                    if !self.mem.cut_power(after, seed) {
                        self.dev.inject(Fault::PowerCutAt {
                            n: self.dev.io_count() + after,
                        });
                    }
                    self.cut_armed = true;
                }
                Ok(())
            }
            Op::Crash { seed } => self.crash(seed),
            Op::WriteMany { ref writes } => {
                let mut planned: Vec<(u8, Vec<u8>, u32, bool)> = Vec::new();
                let mut requests = Vec::new();
                for &(k, offset, len, seed, prepare) in writes {
                    let k = k % KEYS;
                    if planned.iter().any(|(planned_k, ..)| *planned_k == k) {
                        continue;
                    }
                    let chunk = self.model.entry(k).or_default();
                    let mut new = chunk.committed.clone().map(|c| c.0).unwrap_or_default();
                    let version = chunk.committed.as_ref().map_or(0, |c| c.1) + 1;
                    let data = fill(usize::from(len) % 20_000, seed);
                    let (offset, end) = (usize::from(offset), usize::from(offset) + data.len());
                    if end > CHUNK_MAX as usize {
                        continue; // Refusals are the single write's to test.
                    }
                    if new.len() < end {
                        new.resize(end, 0);
                    }
                    new[offset..end].copy_from_slice(&data);
                    let op = WriteOp::Update {
                        offset: offset as u32,
                        crc: crc32c::crc32c(&data),
                        data: DmaBuf::copy_from(&data),
                    };
                    requests.push(self.request(k, version, op, prepare));
                    planned.push((k, new, version, prepare));
                }
                let engine = self.engine().clone();
                let mut results = self.rt.block_on(async {
                    let mut tasks = tokio::task::JoinSet::new();
                    for (index, request) in requests.into_iter().enumerate() {
                        let engine = engine.clone();
                        tasks.spawn(async move { (index, engine.write(request).await) });
                    }
                    tasks.join_all().await
                });
                results.sort_by_key(|(index, _)| *index);
                for ((k, new, version, prepare), (_, result)) in planned.into_iter().zip(results) {
                    self.wrote(k, result, new, version, prepare)?;
                }
                Ok(())
            }
        }
    }

    fn request(&self, k: u8, version: u32, op: WriteOp, prepare: bool) -> WriteRequest {
        WriteRequest {
            key: key(k),
            version: ChunkVersion(version),
            chain_version: ChainVersion(1),
            op,
            client: ClientId(1),
            request: RequestId(self.steps),
            prepare,
        }
    }

    fn write(
        &mut self,
        k: u8,
        version: u32,
        op: WriteOp,
        prepare: bool,
    ) -> Result<crate::WriteOutcome, EngineError> {
        let engine = self.engine().clone();
        let request = self.request(k, version, op, prepare);
        self.rt.block_on(engine.write(request))
    }

    fn wrote(
        &mut self,
        k: u8,
        result: Result<crate::WriteOutcome, EngineError>,
        new: Vec<u8>,
        version: u32,
        prepare: bool,
    ) -> Result<(), String> {
        let chunk = self.model.entry(k % KEYS).or_default();
        if chunk.prepared {
            // Only a commit or an abort may end a prepared version.
            return match result {
                Err(EngineError::VersionConflict { .. }) => Ok(()),
                Err(error) => self.failed("write", &error),
                Ok(outcome) => Err(format!("a write replaced a prepared version: {outcome:?}")),
            };
        }
        match result {
            Ok(outcome) => {
                if outcome.len as usize != new.len() || outcome.crc != crc32c::crc32c(&new) {
                    return Err(format!(
                        "write outcome {outcome:?} but model has {} bytes",
                        new.len()
                    ));
                }
                chunk.pending = Some((new, version));
                chunk.prepared = prepare;
                Ok(())
            }
            // A failed write changes nothing in memory; a prepared one may
            // have become durable.
            Err(error) => {
                if prepare {
                    chunk.maybe.push(Some((new, version)));
                }
                self.failed("write", &error)
            }
        }
    }

    fn commit(&mut self, keys: &[u8]) -> Result<(), String> {
        let engine = self.engine().clone();
        let work: Vec<(u8, u32)> = keys
            .iter()
            .filter_map(|k| {
                self.model
                    .get(k)
                    .and_then(|c| c.pending.as_ref())
                    .map(|p| (*k, p.1))
            })
            .collect();
        let results = self.rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for (k, version) in &work {
                let engine = engine.clone();
                let (k, version) = (*k, *version);
                tasks.spawn(async move { (k, engine.commit(key(k), ChunkVersion(version)).await) });
            }
            tasks.join_all().await
        });
        for (k, result) in results {
            let chunk = self
                .model
                .get_mut(&k)
                .expect("committed key is in the model");
            let pending = chunk.pending.take();
            match result {
                Ok(meta) => {
                    if Some(meta.version.0) != pending.as_ref().map(|p| p.1) {
                        return Err(format!("commit returned {:?}", meta.version));
                    }
                    chunk.committed = pending;
                    chunk.prepared = false;
                }
                Err(error) => {
                    // The pending version stays in the engine, and may or
                    // may not be durable (a prepared one already is).
                    if !chunk.prepared {
                        chunk.maybe.push(pending.clone());
                    }
                    chunk.pending = pending;
                    self.failed("commit", &error)?;
                }
            }
        }
        Ok(())
    }

    /// Adds the open engine's patch and journal counters to the run's.
    fn note_stats(&mut self) {
        if let Some(engine) = &self.engine {
            let stats = engine.stats();
            self.patches += stats.patches;
            self.patch_layers_applied += stats.patch_layers_applied;
            self.overlapped_batches += stats.overlapped_batches;
            self.batches_beside_checkpoints += stats.batches_beside_checkpoints;
        }
    }

    fn crash(&mut self, seed: u64) -> Result<(), String> {
        self.crashes += 1;
        self.note_stats();
        self.engine = None;
        self.mem.crash(seed);
        self.dev.clear();
        self.cut_armed = false;
        let engine = self.recover(seed)?;
        engine.check_consistency()?;
        for k in 0..KEYS {
            let chunk = self.model.entry(k).or_default();
            let actual = match engine.stat(key(k)).and_then(|i| i.committed) {
                None => None,
                Some(meta) => {
                    let read = self
                        .rt
                        .block_on(engine.read(key(k), ReadRequest::whole_verified()));
                    let read =
                        read.map_err(|e| format!("{:?} unreadable after crash: {e}", key(k)))?;
                    Some((read.data.to_vec(), meta.version.0))
                }
            };
            let allowed = actual == *chunk.durable() || chunk.maybe.contains(&actual);
            if !allowed {
                return Err(format!(
                    "{:?} recovered as {:?} but the last acknowledged state is {:?} (also allowed: {:?})",
                    key(k),
                    actual.as_ref().map(|(b, v)| (b.len(), v)),
                    chunk.durable().as_ref().map(|(b, v)| (b.len(), v)),
                    chunk
                        .maybe
                        .iter()
                        .map(|m| m.as_ref().map(|(b, v)| (b.len(), *v)))
                        .collect::<Vec<_>>()
                ));
            }
            *chunk = ModelChunk {
                committed: actual,
                ..Default::default()
            };
        }
        self.engine = Some(engine);
        Ok(())
    }

    /// Opens the engine after a crash. With [`Harness::cutting_recoveries`],
    /// the power may be cut again at one of recovery's first writes; a
    /// recovery the cut reached is abandoned (its unflushed writes lost or
    /// torn) and started over. Any other failure to open is an error.
    fn recover(&mut self, seed: u64) -> Result<Engine<FaultyDevice<D>>, String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0005_eed0_f7ec_04e7);
        let mut cuts_in_a_row = 0;
        loop {
            if self.cut_recoveries && cuts_in_a_row < 3 && rng.random_ratio(1, 3) {
                self.dev.inject(Fault::PowerCutAtWrite {
                    n: self.dev.write_count() + rng.random_range(0..6),
                });
            }
            let injected = self.dev.injected();
            let opened =
                self.rt
                    .block_on(Engine::open(self.dev.clone(), pool(), self.config.clone()));
            // Cleared before looking, so that no I/O of the opened engine (its
            // journal thread runs on) can meet the cut unseen.
            self.dev.clear();
            if self.dev.injected() == injected {
                return opened.map_err(|e| format!("recovery after crash {}: {e}", self.crashes));
            }
            // The cut reached this recovery: whatever it did is abandoned.
            // An engine that opened anyway is dropped with the power cut
            // again, so nothing it does on the way out lands.
            self.dev.inject(Fault::PowerCutAt { n: 0 });
            drop(opened);
            self.recovery_cuts += 1;
            cuts_in_a_row += 1;
            self.mem.crash(rng.random());
            self.dev.clear();
        }
    }

    /// Every chunk's committed and pending state equals the model's.
    fn compare(&self) -> Result<(), String> {
        let engine = self.engine();
        let summary =
            |c: &Option<Contents>| c.as_ref().map(|(b, v)| (b.len(), *v, crc32c::crc32c(b)));
        for k in 0..KEYS {
            let chunk = self.model.get(&k).cloned().unwrap_or_default();
            let info = engine.stat(key(k));
            let committed = info
                .and_then(|i| i.committed)
                .map(|m| (m.len as usize, m.version.0, m.crc));
            let prepared = info.and_then(|i| i.pending).and_then(|p| p.prepared);
            if prepared.is_some() != chunk.prepared {
                return Err(format!(
                    "{:?} prepared {prepared:?}, model {}",
                    key(k),
                    chunk.prepared
                ));
            }
            let pending = info
                .and_then(|i| i.pending)
                .map(|p| (p.len as usize, p.version.0, p.crc));
            for (what, actual, want) in [
                ("committed", committed, summary(&chunk.committed)),
                ("pending", pending, summary(&chunk.pending)),
            ] {
                if actual != want {
                    return Err(format!(
                        "{:?} {what} (len, version, crc) {actual:?}, model {want:?}",
                        key(k)
                    ));
                }
            }
        }
        self.check_block_crcs()?;
        engine.check_consistency()
    }

    /// Every committed chunk's blocks match their block CRCs, except that
    /// after a crash the block holding a committed tail may not: an in-place
    /// append in flight at the crash may have left its new bytes past the
    /// tail, or the tail block's new CRC, but not both. Whatever the entries
    /// say, reads are still right (the model comparison checks that).
    fn check_block_crcs(&self) -> Result<(), String> {
        let engine = self.engine();
        for k in 0..KEYS {
            let Some(meta) = engine.stat(key(k)).and_then(|i| i.committed) else {
                continue;
            };
            let mismatched = self
                .rt
                .block_on(engine.block_crc_check(key(k)))
                .map_err(|e| format!("block CRC check of {:?}: {e}", key(k)))?;
            let last = u64::from(meta.len)
                .div_ceil(crate::format::BLOCK)
                .saturating_sub(1);
            let allowed = self.crashes > 0 && mismatched.iter().all(|&block| block == last);
            if !mismatched.is_empty() && !allowed {
                return Err(format!(
                    "{:?} v{} ({} bytes): blocks {mismatched:?} do not match their block CRCs \
                     ({} crashes so far)",
                    key(k),
                    meta.version.0,
                    meta.len,
                    self.crashes
                ));
            }
        }
        Ok(())
    }

    /// Ends a run: crash at once if a cut is pending, then compare contents.
    pub fn finish(&mut self) -> Result<(), String> {
        if self.cut_armed {
            self.crash(self.steps)?;
        }
        // Counted now and not again: the engine stays open.
        self.note_stats();
        if let Some(engine) = &self.engine {
            let stats = engine.stats();
            self.patches -= stats.patches;
            self.patch_layers_applied -= stats.patch_layers_applied;
        }
        self.compare()?;
        for k in 0..KEYS {
            let Some((bytes, _)) = self.model.get(&k).and_then(|c| c.committed.clone()) else {
                continue;
            };
            let engine = self.engine().clone();
            let read = self
                .rt
                .block_on(engine.read(key(k), ReadRequest::whole_verified()));
            let read = read.map_err(|e| format!("final read of {:?}: {e}", key(k)))?;
            if read.data[..] != bytes[..] {
                return Err(format!(
                    "final contents of {:?} differ from the model",
                    key(k)
                ));
            }
        }
        Ok(())
    }
}

/// Draws a random operation; `crashes` admits power cuts and crashes.
pub fn random_op(rng: &mut ChaCha8Rng, crashes: bool) -> Op {
    let k = rng.random_range(0..KEYS);
    let roll = rng.random_range(0..100);
    let small = |rng: &mut ChaCha8Rng| -> u16 {
        match rng.random_range(0..4) {
            0 => rng.random_range(0..64),
            1 => 4096 * rng.random_range(0..4),
            2 => rng.random_range(0..8192),
            _ => rng.random(),
        }
    };
    match roll {
        0..25 => Op::Write {
            key: k,
            offset: small(rng),
            len: small(rng),
            seed: rng.random(),
            append: rng.random_bool(0.4),
            prepare: rng.random_bool(0.4),
        },
        25..30 => Op::Replace {
            key: k,
            len: small(rng),
            seed: rng.random(),
            prepare: rng.random_bool(0.4),
        },
        30..35 => Op::Truncate {
            key: k,
            len: small(rng),
            prepare: rng.random_bool(0.4),
        },
        35..55 => Op::Commit { key: k },
        55..62 => Op::CommitAll,
        62..66 => Op::Abort { key: k },
        66..71 => Op::Remove { key: k },
        71..88 => Op::Read {
            key: k,
            offset: small(rng),
            len: small(rng),
            pending: rng.random_bool(0.3),
        },
        88..91 => Op::Reopen,
        91..96 if crashes => Op::PowerCut {
            after: rng.random(),
        },
        96..100 if crashes => Op::Crash { seed: rng.random() },
        _ => Op::Commit { key: k },
    }
}

/// Draws a random operation for a run that stresses small updates: mostly
/// overwrites inside chunks and multi-extent updates (made as patches), over
/// chunks that replaces make large, with commits, aborts, prepared versions,
/// reads, reopens, and (with `crashes`) power cuts and crashes at every
/// point of the patch path: journal batches, checkpoints writing patches
/// into their slots, and recovery redoing them.
pub fn random_op_overwrites(rng: &mut ChaCha8Rng, crashes: bool) -> Op {
    let k = rng.random_range(0..KEYS);
    let roll = rng.random_range(0..100);
    let offset = |rng: &mut ChaCha8Rng| -> u16 {
        match rng.random_range(0..3) {
            0 => 4096 * rng.random_range(0..16),
            _ => rng.random_range(0..u16::MAX),
        }
    };
    let len = |rng: &mut ChaCha8Rng| -> u16 {
        match rng.random_range(0..4) {
            0 => rng.random_range(1..64),
            1 => 4096,
            2 => rng.random_range(1..8192),
            _ => rng.random_range(1..4096),
        }
    };
    match roll {
        0..22 => Op::Write {
            key: k,
            offset: offset(rng),
            len: len(rng),
            seed: rng.random(),
            append: rng.random_bool(0.1),
            prepare: rng.random_bool(0.4),
        },
        22..38 => Op::WriteExtents {
            key: k,
            extents: (0..rng.random_range(1..5))
                .map(|_| (offset(rng), len(rng) / 2, rng.random()))
                .collect(),
            prepare: rng.random_bool(0.4),
        },
        38..43 => Op::Replace {
            key: k,
            len: rng.random_range(16_384..u16::MAX),
            seed: rng.random(),
            prepare: rng.random_bool(0.3),
        },
        43..45 => Op::Truncate {
            key: k,
            len: rng.random_range(0..u16::MAX),
            prepare: rng.random_bool(0.3),
        },
        45..65 => Op::Commit { key: k },
        65..71 => Op::CommitAll,
        71..75 => Op::Abort { key: k },
        75..77 => Op::Remove { key: k },
        77..88 => Op::Read {
            key: k,
            offset: offset(rng),
            len: len(rng),
            pending: rng.random_bool(0.3),
        },
        88..91 => Op::Reopen,
        91..96 if crashes => Op::PowerCut {
            after: rng.random(),
        },
        96..100 if crashes => Op::Crash { seed: rng.random() },
        _ => Op::Commit { key: k },
    }
}

/// Draws a random operation for the hardest crash runs: one in six is a
/// burst of concurrent writes to distinct chunks (so a power cut finds
/// several in flight), the rest are drawn by [`random_op`] or
/// [`random_op_overwrites`] (`overwrites`).
pub fn random_op_concurrent(rng: &mut ChaCha8Rng, overwrites: bool) -> Op {
    if rng.random_ratio(1, 6) {
        return Op::WriteMany {
            writes: (0..rng.random_range(2..=KEYS))
                .map(|_| {
                    let offset = match rng.random_range(0..3) {
                        0 => 4096 * rng.random_range(0..8),
                        _ => rng.random_range(0..40_000),
                    };
                    let len = match rng.random_range(0..3) {
                        0 => 4096,
                        _ => rng.random_range(1..12_000),
                    };
                    (
                        rng.random(),
                        offset,
                        len,
                        rng.random(),
                        rng.random_bool(0.4),
                    )
                })
                .collect(),
        };
    }
    if overwrites {
        random_op_overwrites(rng, true)
    } else {
        random_op(rng, true)
    }
}

/// One seeded run of the hardest crash test: operations from
/// [`random_op_concurrent`] (concurrent writes at the cut), recoveries cut
/// short ([`Harness::cutting_recoveries`]), on a device with `sector_size`
/// sectors (512 tears the engine's 4 KiB blocks at a crash).
pub fn run_seed_hard(
    seed: u64,
    steps: usize,
    journal: JournalMode,
    sector_size: u32,
    overwrites: bool,
) -> Result<Harness, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mem = MemDevice::new(16 << 20, sector_size);
    let mut harness = Harness::on(mem, seed, journal).cutting_recoveries();
    for _ in 0..steps {
        let op = random_op_concurrent(&mut rng, overwrites);
        harness.step(&op).map_err(|e| format!("seed {seed}: {e}"))?;
    }
    harness.finish().map_err(|e| format!("seed {seed}: {e}"))?;
    Ok(harness)
}

/// One seeded run of `steps` operations drawn by `random_op_overwrites`.
pub fn run_seed_overwrites(
    seed: u64,
    steps: usize,
    crashes: bool,
    journal: JournalMode,
) -> Result<Harness, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut harness = Harness::new(seed, journal);
    for _ in 0..steps {
        let op = random_op_overwrites(&mut rng, crashes);
        harness.step(&op).map_err(|e| format!("seed {seed}: {e}"))?;
    }
    harness.finish().map_err(|e| format!("seed {seed}: {e}"))?;
    Ok(harness)
}

/// One seeded run of `steps` random operations; the error names the seed.
pub fn run_seed(
    seed: u64,
    steps: usize,
    crashes: bool,
    journal: JournalMode,
) -> Result<Harness, String> {
    run_seed_on(
        MemDevice::new(16 << 20, 4096),
        seed,
        steps,
        crashes,
        journal,
    )
}

/// [`run_seed`] on the medium `mem` (formatted afresh).
pub fn run_seed_on<D: Medium>(
    mem: D,
    seed: u64,
    steps: usize,
    crashes: bool,
    journal: JournalMode,
) -> Result<Harness<D>, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut harness = Harness::on(mem, seed, journal);
    for _ in 0..steps {
        let op = random_op(&mut rng, crashes);
        harness.step(&op).map_err(|e| format!("seed {seed}: {e}"))?;
    }
    harness.finish().map_err(|e| format!("seed {seed}: {e}"))?;
    Ok(harness)
}

/// Fuzz entry point: arbitrary bytes decoded as every on-device structure.
/// Decoding must never panic, and whatever decodes must re-encode to the same
/// bytes. The first byte picks a mode: raw bytes, or a valid structure with
/// the rest of the input XORed in and its checksum fixed up, which reaches
/// the field checks behind the CRC.
pub fn fuzz_decode(data: &[u8]) {
    use crate::format::*;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let sb = Superblock::plan(256 << 20, 4096, 12, 20, 1 << 20, 0xf1f5, 1).expect("valid plan");
    let xor_into = |target: &mut [u8]| {
        for (t, d) in target.iter_mut().zip(rest) {
            *t ^= d;
        }
    };
    match mode % 4 {
        0 => {
            if let Ok(decoded) = Superblock::decode(rest) {
                assert_eq!(
                    decoded.encode()[..],
                    rest[..BLOCK as usize],
                    "superblock re-encodes differently"
                );
            }
            if let Some(header) = decode_batch_header(
                rest,
                u64::from_le_bytes(
                    rest.get(8..16)
                        .and_then(|b| b.try_into().ok())
                        .unwrap_or_default(),
                ),
                1 << 20,
            ) {
                let _ = decode_batch(rest, &header, &sb);
            }
            if let Ok(header) = CheckpointHeader::decode(rest, &sb) {
                let _ =
                    decode_checkpoint(rest.get(BLOCK as usize..).unwrap_or_default(), &header, &sb);
            }
            let _ = ChunkMeta::decode(rest, &sb, "fuzz");
        }
        1 => {
            let mut block = sb.encode();
            xor_into(&mut block);
            let crc = crc32c::crc32c(&block[..BLOCK as usize - 4]);
            block[BLOCK as usize - 4..].copy_from_slice(&crc.to_le_bytes());
            if let Ok(decoded) = Superblock::decode(&block) {
                same(&decoded.encode(), &block, "superblock");
            }
        }
        2 => {
            let meta = ChunkMeta {
                chain: flyfs_proto::ids::ChainId(1),
                chunk: ChunkId::new(2, 3),
                slot: SlotId {
                    group: 1,
                    index: 2,
                    class_log2: 14,
                },
                len: 100,
                version: ChunkVersion(1),
                chain_version: ChainVersion(1),
                crc: 0,
                timestamp_us: 0,
                client: ClientId(0),
                request: RequestId(0),
            };
            let records = [
                Record::Put(meta),
                Record::Prepare(meta),
                Record::Remove {
                    chain: ChainId(1),
                    chunk: ChunkId::new(2, 4),
                },
            ];
            let mut buf = vec![0u8; 8192];
            let len = encode_batch(sb.format_id, 4096, 0, &records, &mut buf);
            let payload_len = records.iter().map(Record::encoded_len).sum::<usize>();
            xor_into(&mut buf[BATCH_HEADER_BYTES..BATCH_HEADER_BYTES + payload_len]);
            // Re-stamp the checksum over the mutated payload.
            let crc =
                crc32c::crc32c_append(crc32c::crc32c(&sb.format_id.to_le_bytes()), &buf[..24]);
            let crc = crc32c::crc32c_append(
                crc,
                &buf[BATCH_HEADER_BYTES..BATCH_HEADER_BYTES + payload_len],
            );
            buf[24..28].copy_from_slice(&crc.to_le_bytes());
            if let Some(header) = decode_batch_header(&buf, 4096, 1 << 20) {
                assert_eq!(header.total_bytes(), len);
                let _ = decode_batch(&buf, &header, &sb);
            }
        }
        _ => {
            // Entries, then (format version 4) the length of the carried
            // records, none here: zero.
            let prefix = if sb.has_patches() { 4 } else { 0 };
            let mut buf = vec![0u8; BLOCK as usize + 2 * META_BYTES + prefix];
            let entries = rest.get(..2 * META_BYTES).unwrap_or(&[]);
            buf[BLOCK as usize..BLOCK as usize + entries.len()].copy_from_slice(entries);
            let count = (entries.len() / META_BYTES) as u64;
            let payload =
                buf[BLOCK as usize..BLOCK as usize + count as usize * META_BYTES + prefix].to_vec();
            let header = CheckpointHeader {
                sequence: 1,
                journal_lsn: 0,
                entry_count: count,
                payload_crc: crc32c::crc32c(&payload),
            };
            header.encode(sb.format_id, &mut buf);
            let decoded = CheckpointHeader::decode(&buf, &sb).expect("valid header");
            if let Ok((metas, _)) = decode_checkpoint(&buf[BLOCK as usize..], &decoded, &sb) {
                for (meta, raw) in metas.iter().zip(payload.chunks_exact(META_BYTES)) {
                    let mut again = [0u8; META_BYTES];
                    meta.encode(&mut again);
                    // Reserved bytes are not kept; everything else must be.
                    again[23] = raw[23];
                    same(&again, raw, "chunk record");
                }
            }
        }
    }
}

/// Asserts that a structure re-encoded to the bytes it was decoded from,
/// naming the first differing byte rather than dumping kilobytes.
fn same(encoded: &[u8], original: &[u8], what: &str) {
    if let Some(at) = encoded.iter().zip(original).position(|(a, b)| a != b) {
        panic!(
            "{what} re-encodes differently at byte {at}: {} instead of {}",
            encoded[at], original[at]
        );
    }
}

/// Fuzz entry point: an operation sequence with power cuts and crashes. The
/// journal mode follows the sequence's length, so both modes get fuzzed
/// without changing the targets' input format.
pub fn fuzz_ops(ops: &[Op]) {
    let journal = if ops.len().is_multiple_of(2) {
        JournalMode::Thread
    } else {
        JournalMode::Inline
    };
    let mut harness = Harness::new(ops.len() as u64, journal);
    for op in ops.iter().take(200) {
        if let Err(error) = harness.step(op) {
            panic!("{error}");
        }
    }
    if let Err(error) = harness.finish() {
        panic!("{error}");
    }
}

/// The model test's operation strategies (proptest), shared by
/// `tests/model.rs` and the guest's run of it on NVMe
/// (`tests/guest_engine_nvme.rs`). Feature `model-strategies`.
#[cfg(feature = "model-strategies")]
pub mod strategies {
    use proptest::prelude::*;

    use super::Op;

    /// Random operations of every kind: writes, appends, replaces,
    /// truncates, commits, aborts, removes, reads and clean reopens, with
    /// sizes around the chunk classes' and the pages' boundaries.
    pub fn op() -> impl Strategy<Value = Op> {
        let k = 0u8..8;
        let size = prop_oneof![
            0u16..64,
            (0u16..4).prop_map(|b| b * 4096),
            0u16..8192,
            any::<u16>()
        ];
        prop_oneof![
            5 => (k.clone(), size.clone(), size.clone(), any::<u8>(), any::<bool>(), any::<bool>())
                .prop_map(|(key, offset, len, seed, append, prepare)| Op::Write { key, offset, len, seed, append, prepare }),
            1 => (k.clone(), size.clone(), any::<u8>(), any::<bool>())
                .prop_map(|(key, len, seed, prepare)| Op::Replace { key, len, seed, prepare }),
            1 => (k.clone(), size.clone(), any::<bool>()).prop_map(|(key, len, prepare)| Op::Truncate { key, len, prepare }),
            4 => k.clone().prop_map(|key| Op::Commit { key }),
            1 => Just(Op::CommitAll),
            1 => k.clone().prop_map(|key| Op::Abort { key }),
            1 => k.clone().prop_map(|key| Op::Remove { key }),
            3 => (k, size.clone(), size, any::<bool>()).prop_map(|(key, offset, len, pending)| Op::Read { key, offset, len, pending }),
            1 => Just(Op::Reopen),
        ]
    }

    /// Operations that stress small updates: overwrites inside chunks made
    /// large by replaces, and multi-extent updates, which the engine makes as
    /// patches; plus everything that interacts with them (prepared versions,
    /// aborts, appends and truncates over patched chunks, reads of both
    /// versions, reopens, which redo the patches).
    pub fn small_update_op() -> impl Strategy<Value = Op> {
        let k = 0u8..8;
        let offset = prop_oneof![(0u16..16).prop_map(|b| b * 4096), 0u16..65_535];
        let len = prop_oneof![1u16..64, Just(4096u16), 1u16..8192];
        prop_oneof![
            5 => (k.clone(), offset.clone(), len.clone(), any::<u8>(), any::<bool>())
                .prop_map(|(key, offset, len, seed, prepare)| Op::Write { key, offset, len, seed, append: false, prepare }),
            4 => (k.clone(), prop::collection::vec((offset.clone(), len.clone(), any::<u8>()), 1..5), any::<bool>())
                .prop_map(|(key, extents, prepare)| Op::WriteExtents { key, extents, prepare }),
            1 => (k.clone(), len.clone(), any::<u8>(), any::<bool>())
                .prop_map(|(key, len, seed, prepare)| Op::Write { key, offset: 0, len, seed, append: true, prepare }),
            1 => (k.clone(), 16_384u16..65_535, any::<u8>(), any::<bool>())
                .prop_map(|(key, len, seed, prepare)| Op::Replace { key, len, seed, prepare }),
            1 => (k.clone(), 0u16..65_535, any::<bool>()).prop_map(|(key, len, prepare)| Op::Truncate { key, len, prepare }),
            5 => k.clone().prop_map(|key| Op::Commit { key }),
            1 => Just(Op::CommitAll),
            1 => k.clone().prop_map(|key| Op::Abort { key }),
            1 => k.clone().prop_map(|key| Op::Remove { key }),
            3 => (k, offset, len, any::<bool>()).prop_map(|(key, offset, len, pending)| Op::Read { key, offset, len, pending }),
            1 => Just(Op::Reopen),
        ]
    }
}
