//! The scrubber: walks every committed chunk of an engine, reads it whole
//! and checks it against its CRC, at a configured rate, and reports the
//! chunks whose bytes have rotted.
//!
//! It exists because reads check only what clients happen to read: a chunk
//! nobody reads can rot on every replica, one after another, until no good
//! copy is left. A scrubber that visits every chunk regularly finds the rot
//! while another replica still holds the chunk intact.
//!
//! The engine only finds and reports; it knows nothing of replicas. Repair is
//! the storage service's job: for each [`Corruption`] it fetches the chunk
//! from a healthy replica of the chain and writes it back whole
//! (`WriteOp::Replace`, which reads none of the rotten bytes), as a resync
//! does.
//!
//! The walk is in key order and resumable: [`Engine::scrub_step`] verifies a
//! bounded amount and says where to go on, so a caller can spread a pass
//! over time, persist the position, or stop at any point; [`Scrubber`] drives
//! whole passes at a rate in bytes per second. A chunk written or removed
//! while the walk passes it is checked as it is at that moment, or skipped.

use std::ops::Bound;
use std::time::Duration;

use flyfs_bypass::BlockDevice;
use flyfs_proto::ids::ChunkVersion;

use crate::{ChunkKey, Engine, EngineError, ReadRequest, ReadVersion};

/// One chunk whose committed bytes fail their CRC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    pub key: ChunkKey,
    pub version: ChunkVersion,
    /// The engine's error, naming the device, the ranges and both CRCs.
    pub message: String,
}

/// What one [`Engine::scrub_step`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubStep {
    /// Where the next step starts (after this key), or `None` once the
    /// walk has passed the last committed chunk.
    pub next: Option<ChunkKey>,
    pub chunks_verified: u64,
    /// Bytes read and checked.
    pub bytes_verified: u64,
    pub corrupt: Vec<Corruption>,
}

/// The totals of one whole pass over an engine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubPass {
    pub chunks_verified: u64,
    pub bytes_verified: u64,
    pub corrupt: Vec<Corruption>,
}

impl<D: BlockDevice> Engine<D> {
    /// Verifies committed chunks in key order, starting after `after` (from
    /// the first chunk when `None`), until at least `bytes_max` bytes were
    /// read or none are left (always at least one chunk, if any is left).
    ///
    /// Rotten chunks are reported in the result, and logged; the walk goes
    /// on past them. Fails only when the engine cannot read at all (a device
    /// error, or the engine is poisoned): then the position is unchanged.
    pub async fn scrub_step(
        &self,
        after: Option<ChunkKey>,
        bytes_max: u64,
    ) -> Result<ScrubStep, EngineError> {
        let mut step = ScrubStep::default();
        let mut position = after;
        loop {
            let Some(key) = self.next_committed(position) else {
                step.next = None;
                return Ok(step);
            };
            position = Some(key);
            match self.read(key, scrub_read()).await {
                Ok(out) => {
                    step.chunks_verified += 1;
                    step.bytes_verified += u64::from(out.chunk_len);
                }
                Err(
                    error @ EngineError::ChunkCorrupt {
                        key, version, end, ..
                    },
                ) => {
                    tracing::error!(chunk = ?key, ?version, "scrub: {error}");
                    step.chunks_verified += 1;
                    step.bytes_verified += u64::from(end);
                    step.corrupt.push(Corruption {
                        key,
                        version,
                        message: error.to_string(),
                    });
                }
                // Removed (or replaced) since we found it: nothing to check.
                Err(EngineError::NotFound { .. } | EngineError::VersionConflict { .. }) => {}
                Err(error) => return Err(error),
            }
            if step.bytes_verified >= bytes_max {
                // `None` as soon as nothing is left, so that a caller never
                // needs an empty step to learn the pass is over.
                step.next = self.next_committed(position).and(position);
                return Ok(step);
            }
        }
    }

    /// The first committed chunk after `after`, on any chain.
    fn next_committed(&self, after: Option<ChunkKey>) -> Option<ChunkKey> {
        let start = match after {
            Some(key) => Bound::Excluded(key),
            None => Bound::Unbounded,
        };
        self.first_committed_from(start)
    }
}

/// The whole committed version, checked (whatever the engine's
/// `verify_reads` says).
fn scrub_read() -> ReadRequest {
    ReadRequest {
        offset: 0,
        len: u32::MAX,
        version: ReadVersion::Committed,
        verify: true,
    }
}

/// Drives whole scrub passes over one engine at a steady rate.
#[derive(Debug)]
pub struct Scrubber<D: BlockDevice> {
    engine: Engine<D>,
    bytes_per_s: u64,
}

/// How much one step verifies before the scrubber paces itself: small
/// enough that the pacing is smooth, large enough that a step is not
/// dominated by its own overhead.
const STEP_BYTES: u64 = 4 << 20;

impl<D: BlockDevice> Scrubber<D> {
    /// A scrubber reading at most `bytes_per_s` bytes per second on average
    /// (at least 1).
    pub fn new(engine: Engine<D>, bytes_per_s: u64) -> Scrubber<D> {
        Scrubber {
            engine,
            bytes_per_s: bytes_per_s.max(1),
        }
    }

    /// One pass over every committed chunk, paced so that the bytes read by
    /// time `t` after the start never exceed `bytes_per_s * t` by more than
    /// one step. Sleeps on tokio's clock (simulated time in tests and the
    /// simulation). Fails as [`Engine::scrub_step`] does.
    pub async fn pass(&self) -> Result<ScrubPass, EngineError> {
        let started = tokio::time::Instant::now();
        let mut pass = ScrubPass::default();
        let mut position = None;
        loop {
            let step = self.engine.scrub_step(position, STEP_BYTES).await?;
            pass.chunks_verified += step.chunks_verified;
            pass.bytes_verified += step.bytes_verified;
            pass.corrupt.extend(step.corrupt);
            let Some(next) = step.next else {
                return Ok(pass);
            };
            position = Some(next);
            let due_ns =
                u128::from(pass.bytes_verified) * 1_000_000_000 / u128::from(self.bytes_per_s);
            let due = started + Duration::from_nanos(u64::try_from(due_ns).unwrap_or(u64::MAX));
            tokio::time::sleep_until(due).await;
        }
    }
}
