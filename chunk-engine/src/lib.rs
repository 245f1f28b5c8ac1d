//! The chunk engine: fixed-size chunks stored on a whole [`BlockDevice`], with
//! no file system underneath.
//!
//! A chunk is addressed by a [`ChunkKey`] (chain id, chunk id) and holds up to
//! `chunk_size_max` bytes. Each chunk has a *committed* version that readers
//! see and at most one *pending* version that a CRAQ write has created but not
//! yet committed. Updates are copy-on-write into a fresh slot, except a pure
//! append that fits the current slot, which is written in place past the
//! committed length.
//!
//! Durability: committed metadata lives in a checksummed journal (group
//! commit, one flush per batch) bounded by periodic checkpoints; see
//! docs/chunk-engine-format.md for the layout and the recovery argument.
//! A pending version lives only in memory unless the write *prepares* it
//! (CRAQ replicas before the tail do): then a journal record makes it durable
//! before the write returns, its commit needs no I/O, and recovery reads it
//! as committed. After a crash a replica returns with its committed and
//! prepared state, and CRAQ resynchronises whatever it missed or cuts back
//! what its chain never committed.
//!
//! The engine knows nothing of the network or of chain membership: a chain id
//! is only a key prefix, and a chain version only a number it stores.
//!
//! Where things are: engine.rs has the [`Engine`] handle and its operations,
//! which decide in the in-memory chunk table (table.rs), do their device I/O
//! through device_io.rs and make records durable through the journal
//! (journal.rs); recovery.rs formats and opens a device; format.rs holds
//! every on-device byte and alloc.rs the slot allocator; config.rs and
//! request.rs are the settings and the request and outcome types; scrub.rs
//! walks every chunk checking it against its CRC; block_crc.rs keeps the
//! per-block CRCs that let a partial read check only the blocks it reads,
//! and crc.rs the CRC arithmetic done without the bytes.
#![deny(unsafe_code)]

pub mod alloc;
mod block_crc;
mod config;
mod crc;
mod device_io;
mod engine;
mod error;
pub mod format;
mod journal;
mod recovery;
mod request;
mod scrub;
mod table;
#[cfg(feature = "testing")]
pub mod testing;

use std::fmt;

pub use config::{EngineConfig, FormatOptions, JournalMode};
pub use engine::Engine;
pub use error::EngineError;
pub use flyfs_bypass::BlockDevice;
use flyfs_proto::ids::{ChainId, ChunkId};
pub use format::{ChunkMeta, SlotId, Superblock};
pub use request::{
    EXTENTS_MAX, EngineStats, ReadOutcome, ReadRequest, ReadVersion, SpaceInfo, UpdateExtent,
    WriteOp, WriteOutcome, WriteRequest,
};
pub use scrub::{Corruption, ScrubPass, ScrubStep, Scrubber};
pub use table::{ChainUsage, ChunkInfo, PendingInfo};

/// Where a chunk lives in the engine: its chain and its id. Ordered by chain,
/// then inode, then chunk index, so a chain's chunks and a file's chunks are
/// contiguous ranges.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkKey {
    pub chain: ChainId,
    pub chunk: ChunkId,
}

impl ChunkKey {
    pub const fn new(chain: ChainId, chunk: ChunkId) -> ChunkKey {
        ChunkKey { chain, chunk }
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{:?}", self.chain, self.chunk)
    }
}
