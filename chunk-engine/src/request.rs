//! What callers hand the engine and what its operations and queries give
//! back: write and read requests, their outcomes, and the reports of space and
//! journal work. Plain data; the operations that take them are in engine.rs.

use flyfs_bypass::DmaBuf;
use flyfs_proto::ids::{ChainVersion, ChunkVersion, ClientId, RequestId};

use crate::format::BLOCK;
use crate::{ChunkKey, EngineError};

/// What a write does to a chunk.
#[derive(Debug)]
pub enum WriteOp {
    /// Write `data` at `offset`, keeping the rest of the chunk; a gap between
    /// the chunk's end and `offset` reads as zeros. `crc` is the CRC32C of
    /// `data` as the sender computed it.
    Update { offset: u32, data: DmaBuf, crc: u32 },
    /// Write each extent at its offset, in order (a later one wins where
    /// two overlap), keeping the rest of the chunk: one new version for
    /// several ranges of one chunk. A gap between the chunk's end and an
    /// extent reads as zeros. At most [`EXTENTS_MAX`] extents.
    Extents(Vec<UpdateExtent>),
    /// Replace the whole chunk with `data` (resync sends chunks this way).
    Replace { data: DmaBuf, crc: u32 },
    /// Cut the chunk to `len` bytes or extend it with zeros.
    Truncate { len: u32 },
}

/// One range of a multi-extent update: `data` at `offset`, `crc` the CRC32C
/// of `data` as the sender computed it.
#[derive(Debug)]
pub struct UpdateExtent {
    pub offset: u32,
    pub data: DmaBuf,
    pub crc: u32,
}

/// Most extents of one [`WriteOp::Extents`].
pub const EXTENTS_MAX: usize = 1024;

/// A write creating pending version `version` of chunk `key`.
#[derive(Debug)]
pub struct WriteRequest {
    pub key: ChunkKey,
    /// Must be above the committed version. Replaces any pending version:
    /// CRAQ serialises updates of one chunk above the engine.
    pub version: ChunkVersion,
    pub chain_version: ChainVersion,
    pub op: WriteOp,
    pub client: ClientId,
    pub request: RequestId,
    /// Make the pending version durable before returning (a journal
    /// `Prepare` record): [`Engine::commit`](crate::Engine::commit) then needs no I/O, and after a
    /// crash the engine recovers the version as committed. A CRAQ replica
    /// that is not the tail prepares, so that it can answer its predecessor
    /// as soon as its successor has committed; the tail does not (its commit
    /// is the durable record). A prepared write must run to completion: one
    /// dropped while its record waits for the journal leaves the record to
    /// become durable later, whatever happened to the chunk meanwhile (the
    /// storage service never drops a write; rpc does not cancel requests).
    pub prepare: bool,
}

/// Where a write's new bytes go, from a request that passed its checks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WriteExtent {
    /// Offset of the new bytes (of the new length, for a truncate).
    pub offset: u32,
    /// Length of the new bytes; 0 for a truncate.
    pub data_len: u64,
    /// Where the new bytes end (the new length, for a truncate).
    pub end: u64,
}

impl WriteRequest {
    /// [`checked`](Self::checked)'s extent alone.
    #[cfg(test)]
    pub(crate) fn extent(&self, chunk_size_max: u64) -> Result<WriteExtent, EngineError> {
        self.checked(chunk_size_max).map(|(extent, _)| extent)
    }

    /// Checks what needs no chunk state: the payload against its CRC, the
    /// end against the largest chunk size, and the version against the
    /// reserved 0. Besides the extent, returns the block CRCs of a single
    /// payload that starts on a block boundary of the chunk (a whole-chunk
    /// write, an aligned update), padded with zeros to whole blocks: the
    /// check's pass over the bytes gives them, so a write that lays the
    /// payload out from there (a whole version, an aligned append) records
    /// them instead of reading the bytes again.
    pub(crate) fn checked(
        &self,
        chunk_size_max: u64,
    ) -> Result<(WriteExtent, Option<Vec<u32>>), EngineError> {
        let key = self.key;
        let mut blocks = None;
        let (offset, data_len, new_end) = match &self.op {
            WriteOp::Update { data, crc, .. } | WriteOp::Replace { data, crc } => {
                let offset = if let WriteOp::Update { offset, .. } = self.op {
                    offset
                } else {
                    0
                };
                let computed = if u64::from(offset).is_multiple_of(BLOCK) {
                    let (crcs, whole) = crate::crc::blocks_and_whole(data);
                    blocks = Some(crcs);
                    whole
                } else {
                    crc32c::crc32c(data)
                };
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
            WriteOp::Extents(extents) => {
                if extents.is_empty() || extents.len() > EXTENTS_MAX {
                    return Err(invalid(
                        key,
                        format!(
                            "{} extents; an update carries 1 to {EXTENTS_MAX}",
                            extents.len()
                        ),
                    ));
                }
                let mut start = u64::MAX;
                let mut end = 0u64;
                let mut total = 0u64;
                for extent in extents {
                    let computed = crc32c::crc32c(&extent.data);
                    if computed != extent.crc {
                        return Err(EngineError::Checksum {
                            key,
                            what: "write payload",
                            expected: extent.crc,
                            computed,
                        });
                    }
                    start = start.min(u64::from(extent.offset));
                    end = end.max(u64::from(extent.offset) + extent.data.len() as u64);
                    total += extent.data.len() as u64;
                }
                (start.min(u64::from(u32::MAX)) as u32, total, end)
            }
            WriteOp::Truncate { len } => (*len, 0, u64::from(*len)),
        };
        if new_end > chunk_size_max {
            return Err(invalid(
                key,
                format!("ends at byte {new_end}, past the largest chunk size {chunk_size_max}"),
            ));
        }
        if self.version.0 == 0 {
            return Err(invalid(
                key,
                "version 0 is reserved for a chunk that does not exist",
            ));
        }
        let extent = WriteExtent {
            offset,
            data_len,
            end: new_end,
        };
        Ok((extent, blocks))
    }
}

fn invalid(key: ChunkKey, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidRequest {
        key,
        reason: reason.into(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    pub version: ChunkVersion,
    /// Length and CRC32C of the whole pending chunk.
    pub len: u32,
    pub crc: u32,
    /// Whether the write appended in place rather than copying on write.
    pub in_place: bool,
}

/// Which version a read sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadVersion {
    Committed,
    Pending,
    /// Whichever of the committed or pending version has this number (CRAQ's
    /// apportioned query: the tail names the committed version).
    Exact(ChunkVersion),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    pub offset: u32,
    pub len: u32,
    pub version: ReadVersion,
    /// Read the whole chunk and check the whole-chunk CRC32C before
    /// returning the range, rather than only the range's blocks against
    /// their block CRCs, and even when the engine does not verify every
    /// read (`EngineConfig::verify_reads`). The scrubber asks, as may a
    /// client (the storage protocol's read carries the flag).
    pub verify: bool,
}

impl ReadRequest {
    /// The whole committed chunk, checked against its CRC.
    pub fn whole_verified() -> ReadRequest {
        ReadRequest {
            offset: 0,
            len: u32::MAX,
            version: ReadVersion::Committed,
            verify: true,
        }
    }

    pub fn committed(offset: u32, len: u32) -> ReadRequest {
        ReadRequest {
            offset,
            len,
            version: ReadVersion::Committed,
            verify: false,
        }
    }
}

#[derive(Debug)]
pub struct ReadOutcome {
    /// The bytes read, clamped to the chunk's length: the window of the buffer.
    pub data: DmaBuf,
    pub version: ChunkVersion,
    pub chunk_len: u32,
    pub chunk_crc: u32,
}

/// Space of the whole device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpaceInfo {
    pub data_bytes: u64,
    /// Bytes of slots in use, committed and pending.
    pub allocated_bytes: u64,
    pub committed_chunks: u64,
}

/// Counters of the journal's work since the engine opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Records made durable (commits, prepares, aborts of prepared versions
    /// and removes).
    pub records: u64,
    /// Journal batches written, each with one flush: `records / batches` is
    /// how well group commit batches.
    pub batches: u64,
    pub checkpoints: u64,
    /// Writes made as patches (their bytes in the journal, not copied with
    /// the chunk).
    pub patches: u64,
    /// Patch layers a checkpoint wrote into their slots.
    pub patch_layers_applied: u64,
    /// Batches written while an older one's flush had not returned
    /// (`EngineConfig::journal_depth`).
    pub overlapped_batches: u64,
    /// Batches written while a checkpoint was being written (thread mode on
    /// a version 5 device): commits that did not wait for it.
    pub batches_beside_checkpoints: u64,
}
