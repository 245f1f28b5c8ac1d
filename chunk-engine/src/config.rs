//! How to format a device and how to run an opened engine: the settings a
//! caller chooses once, before the first chunk operation.

use std::sync::Arc;

use flyfs_time::{Clock, WallClock};

/// How to format a device.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// Smallest chunk slot (power of two, at least 4 KiB). Default 64 KiB.
    pub chunk_size_min: u64,
    /// Largest chunk slot, and the size of an allocation group (power of two,
    /// at most 64 MiB). Default 64 MiB.
    pub chunk_size_max: u64,
    /// Journal size; default 1% of the device, clamped to 1..256 MiB.
    pub journal_bytes: Option<u64>,
    /// Format even over an existing flyfs superblock.
    pub force: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            chunk_size_min: 64 << 10,
            chunk_size_max: 64 << 20,
            journal_bytes: None,
            force: false,
        }
    }
}

/// Run-time settings of an opened engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Largest journal batch written by one group commit.
    pub batch_bytes_max: usize,
    /// Write a checkpoint when the live journal exceeds this percentage of
    /// the journal region.
    pub checkpoint_percent: u8,
    /// Who writes journal batches and checkpoints.
    pub journal: JournalMode,
    /// Most journal batches on their way to the device at once (thread mode,
    /// format version 5): a batch is written and flushed as soon as the one
    /// before it is in flight, so commits arriving during a flush wait for
    /// one flush, not for the rest of the current one and then their own.
    /// Capped at `JOURNAL_DEPTH_MAX` (4); 1 writes batches strictly one
    /// after another, as inline mode and older devices always do. Default 2.
    pub journal_depth: usize,
    /// Where commit timestamps come from: the wall clock in production,
    /// tokio's simulated time in the deterministic simulation.
    pub clock: Arc<dyn Clock>,
    /// Check every read. A read of the whole chunk is always checked
    /// against the chunk's CRC32C. With this on (the default), a partial
    /// read checks the blocks it read against their block CRCs (format
    /// version 3), falling back to reading and checking the whole version
    /// when one does not match; on a device formatted before version 3,
    /// which has no block CRCs, a partial read always reads and checks the
    /// whole version, which costs a 4 KiB read of a 1 MiB chunk about 35
    /// times its time (docs/chunk-engine-format.md, "Read verification").
    /// Off, partial reads are served unchecked unless they ask
    /// (`ReadRequest::verify`), and rot under them is found by the scrubber.
    pub verify_reads: bool,
    /// Blocks of the block-CRC region kept in memory (4 KiB each, holding the
    /// CRCs of 4 MiB of data), so that most reads and writes find the CRCs
    /// they need without a device read. Default 1024: 4 MiB of memory for
    /// 4 GiB of data.
    pub block_crc_cache_blocks: usize,
    /// Largest update (payload bytes) written as a patch rather than by
    /// copying the chunk (format version 4): its bytes go into the journal,
    /// and a checkpoint writes them into the chunk's slot later
    /// (docs/chunk-engine-format.md, "Patches"). Capped at an eighth of the
    /// journal. 0 turns patches off. Default 64 KiB.
    pub patch_bytes_max: usize,
    /// Most journal bytes the records of all pending patches may take
    /// together (memory the engine holds for them; a prepared one is carried
    /// by every checkpoint until it ends); past it, updates copy the chunk.
    /// Capped at an eighth of the journal. Default 16 MiB.
    pub patch_pending_bytes_max: usize,
}

/// Who writes journal batches and checkpoints (journal.rs). Both modes write
/// the same batches and give the same guarantees; they differ in where the
/// work runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JournalMode {
    /// A dedicated OS thread per engine: commits complete concurrently with
    /// the caller's runtime, under any runtime. The production choice.
    #[default]
    Thread,
    /// No thread: a committer that finds no batch in progress writes the
    /// batch itself (and any checkpoint), for every record queued. Everything
    /// happens inside the caller's futures, so a single-threaded runtime with
    /// simulated time (a deterministic simulator) decides when commits
    /// complete. Committer futures may be dropped at any point.
    Inline,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch_bytes_max: 1 << 20,
            checkpoint_percent: 50,
            journal: JournalMode::default(),
            journal_depth: 2,
            clock: Arc::new(WallClock),
            verify_reads: true,
            block_crc_cache_blocks: 1024,
            patch_bytes_max: 64 << 10,
            patch_pending_bytes_max: 16 << 20,
        }
    }
}
