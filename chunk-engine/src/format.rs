//! Every byte the chunk engine puts on its device: the superblock and the
//! region layout it describes, the 64-byte chunk metadata record, journal
//! batches and checkpoints. docs/chunk-engine-format.md draws them.
//!
//! This module is pure: it turns structs into bytes and bytes into structs or
//! a [`FormatError`] that says what was wrong and where. It never panics on
//! input bytes (fuzzed in fuzz/ and by `tests/decode.rs`), and it does no I/O.

use std::sync::Arc;

use flyfs_proto::ids::{ChainId, ChainVersion, ChunkId, ChunkVersion, ClientId, RequestId};

/// Unit of alignment of every on-device structure: the largest sector size a
/// device may report, so the format is valid on 512- and 4096-byte devices.
pub const BLOCK: u64 = 4096;
/// Bytes at the start of the device reserved for the two superblock copies.
pub const HEADER_BYTES: u64 = 1 << 20;
/// Offsets of the two superblock copies: far enough apart that one bad
/// region of the medium does not take both.
pub const SUPERBLOCK_OFFSETS: [u64; 2] = [0, HEADER_BYTES / 2];
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"FLYFSCE\0";
/// Version 2 added the journal's Prepare record; version 3 the block-CRC
/// region; version 4 the journal's Patch records (small updates whose bytes
/// live in the journal until a checkpoint applies them in place); version 5
/// lets several journal batches be in flight at once (see
/// [`JOURNAL_DEPTH_MAX`]), which changes what recovery must check but not the
/// layout. Older devices are read as they are: their journals hold what a
/// version 5 journal may, the engine writes no Patch record to a device before
/// version 4, and writes batches one at a time to one before version 5.
pub const FORMAT_VERSION: u32 = 5;
/// The first format version with a block-CRC region.
pub const FORMAT_VERSION_BLOCK_CRCS: u32 = 3;
/// The first format version whose journal may hold Patch records.
pub const FORMAT_VERSION_PATCHES: u32 = 4;
/// The first format version whose journal batches may be in flight together.
pub const FORMAT_VERSION_PIPELINED: u32 = 5;
/// Most journal batches in flight at once on a version 5 device. Any of them
/// may have reached the medium while an older one did not, or while the data
/// its records point at did not, so recovery checks the data of this many
/// batches at the end of the log (docs/chunk-engine-format.md, "Pipelined
/// batches"). At most 4: the batches in flight then span at most one lap
/// of the journal (a batch is at most a quarter of it).
pub const JOURNAL_DEPTH_MAX: usize = 4;
/// The oldest format version this build still reads.
pub const FORMAT_VERSION_MIN: u32 = 1;
pub const JOURNAL_MAGIC: u32 = u32::from_le_bytes(*b"FJNL");
pub const CHECKPOINT_MAGIC: u32 = u32::from_le_bytes(*b"FCKP");
/// Size of one encoded chunk metadata record.
pub const META_BYTES: usize = 64;
/// Size of a journal batch header.
pub const BATCH_HEADER_BYTES: usize = 32;
/// Smallest and largest chunk size classes the format can describe.
pub const CLASS_LOG2_MIN: u8 = 12;
pub const CLASS_LOG2_MAX: u8 = 26;
/// Bytes of the checkpoint header block.
pub const CHECKPOINT_HEADER_BYTES: u64 = BLOCK;
/// Bytes of one entry of the block-CRC region: the CRC32C of one data block.
pub const BLOCK_CRC_ENTRY_BYTES: u64 = 4;
/// Bytes of the length of the records a version 4 checkpoint carries.
pub const CHECKPOINT_CARRIED_PREFIX_BYTES: usize = 4;
/// The share of the journal (1 / this) that the pending patches' records
/// may take together: what a version 4 checkpoint slot reserves for the
/// prepared ones it carries, and the most one patch may write.
pub const PATCH_JOURNAL_SHARE: u64 = 8;

/// Data blocks whose CRCs one block of the region holds.
pub const BLOCK_CRCS_PER_BLOCK: u64 = BLOCK / BLOCK_CRC_ENTRY_BYTES;

const _: () =
    assert!(HEADER_BYTES.is_multiple_of(BLOCK) && SUPERBLOCK_OFFSETS[1].is_multiple_of(BLOCK));
const _: () = assert!(
    (1u64 << CLASS_LOG2_MIN).is_multiple_of(BLOCK),
    "a chunk slot must be block aligned"
);
const _: () = assert!((BLOCK as usize).is_multiple_of(META_BYTES));
const _: () = assert!(BLOCK.is_multiple_of(BLOCK_CRC_ENTRY_BYTES));

/// Why bytes failed to decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{what}: no flyfs magic (not a flyfs chunk engine device, or never formatted)")]
    NoMagic { what: &'static str },
    #[error(
        "{what}: format version {found} is not supported (this build reads version {supported})"
    )]
    Version {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("{what}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{what}: {field} = {value} is invalid: {reason}")]
    Field {
        what: &'static str,
        field: &'static str,
        value: u64,
        reason: String,
    },
    #[error("{what}: {len} bytes is too short, need {need}")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
}

fn field(
    what: &'static str,
    field: &'static str,
    value: u64,
    reason: impl Into<String>,
) -> FormatError {
    FormatError::Field {
        what,
        field,
        value,
        reason: reason.into(),
    }
}

/// Little-endian reader over a byte slice that reports short input as an error.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, at: 0, what }
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let end = self.at + N;
        let slice = self.bytes.get(self.at..end).ok_or(FormatError::Short {
            what: self.what,
            len: self.bytes.len(),
            need: end,
        })?;
        self.at = end;
        Ok(slice.try_into().expect("slice has length N"))
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

/// Little-endian writer into a preallocated slice.
struct Writer<'a> {
    bytes: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    fn new(bytes: &'a mut [u8]) -> Self {
        Writer { bytes, at: 0 }
    }
    fn put(&mut self, data: &[u8]) {
        self.bytes[self.at..self.at + data.len()].copy_from_slice(data);
        self.at += data.len();
    }
    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
}

/// The immutable geometry of a formatted device, stored in the superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// The format version the device was formatted with: it decides the
    /// layout (only version 3 and later have a block-CRC region).
    pub format_version: u32,
    /// Random at format time; stamped into every journal batch and checkpoint
    /// so that structures left by an earlier format are never replayed.
    pub format_id: u64,
    pub sector_size: u32,
    pub capacity_bytes: u64,
    pub class_log2_min: u8,
    pub class_log2_max: u8,
    /// Two checkpoint slots of `checkpoint_slot_bytes` each, from here.
    pub checkpoint_offset: u64,
    pub checkpoint_slot_bytes: u64,
    pub journal_offset: u64,
    pub journal_bytes: u64,
    /// The block-CRC region: one CRC32C per data block, the entry of the
    /// block at `data_offset + i * BLOCK` at `block_crc_offset + 4 * i`.
    /// Both zero before format version 3.
    pub block_crc_offset: u64,
    pub block_crc_bytes: u64,
    pub data_offset: u64,
    /// Every group spans `1 << class_log2_max` bytes.
    pub group_count: u32,
    pub created_unix_secs: u64,
}

const SUPERBLOCK_CRC_AT: usize = BLOCK as usize - 4;

impl Superblock {
    /// Lays out a device of `capacity_bytes` in the current format version:
    /// header, two checkpoint slots sized for the most chunks the data region
    /// can hold, the journal, the block-CRC region, and as many whole groups
    /// as fit.
    pub fn plan(
        capacity_bytes: u64,
        sector_size: u32,
        class_log2_min: u8,
        class_log2_max: u8,
        journal_bytes: u64,
        format_id: u64,
        created_unix_secs: u64,
    ) -> Result<Superblock, String> {
        Superblock {
            format_version: FORMAT_VERSION,
            format_id,
            sector_size,
            capacity_bytes,
            class_log2_min,
            class_log2_max,
            checkpoint_offset: 0,
            checkpoint_slot_bytes: 0,
            journal_offset: 0,
            journal_bytes,
            block_crc_offset: 0,
            block_crc_bytes: 0,
            data_offset: 0,
            group_count: 0,
            created_unix_secs,
        }
        .laid_out()
    }

    /// The same device laid out as format version `format_version` lays it
    /// out (to format a device an older build can read, in tests).
    pub fn for_format_version(self, format_version: u32) -> Result<Superblock, String> {
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&format_version) {
            return Err(format!(
                "format version {format_version} is not one this build writes ({FORMAT_VERSION_MIN}..={FORMAT_VERSION})"
            ));
        }
        Superblock {
            format_version,
            ..self
        }
        .laid_out()
    }

    /// Computes every region from the parameters (format version, capacity,
    /// sector size, chunk classes, journal size, format id, creation time),
    /// ignoring the region fields of `self`.
    fn laid_out(self) -> Result<Superblock, String> {
        let Superblock {
            format_version,
            capacity_bytes,
            class_log2_min,
            class_log2_max,
            journal_bytes,
            ..
        } = self;
        if !(CLASS_LOG2_MIN..=CLASS_LOG2_MAX).contains(&class_log2_min)
            || !(class_log2_min..=CLASS_LOG2_MAX).contains(&class_log2_max)
        {
            return Err(format!(
                "chunk sizes {}..{} must be powers of two with {} <= min <= max <= {}",
                1u64 << class_log2_min.min(63),
                1u64 << class_log2_max.min(63),
                1u64 << CLASS_LOG2_MIN,
                1u64 << CLASS_LOG2_MAX
            ));
        }
        if journal_bytes < 16 * BLOCK || !journal_bytes.is_multiple_of(BLOCK) {
            return Err(format!(
                "journal size {journal_bytes} must be a multiple of {BLOCK} and at least {}",
                16 * BLOCK
            ));
        }
        // Capacities near 2^64 come only from damaged superblocks; refuse them
        // rather than let the arithmetic below wrap.
        const CAPACITY_MAX: u64 = 1 << 60;
        if capacity_bytes > CAPACITY_MAX || journal_bytes > CAPACITY_MAX {
            return Err(format!(
                "capacity {capacity_bytes} or journal size {journal_bytes} exceeds 2^60 bytes"
            ));
        }
        let group_bytes = 1u64 << class_log2_max;
        // The data region decides the checkpoint and block-CRC sizes, and
        // they shrink the data region: size both for the whole device, which
        // over-reserves by at most their own share.
        let budget = capacity_bytes.saturating_sub(HEADER_BYTES + journal_bytes);
        let max_chunks = budget >> class_log2_min;
        // Version 4 reserves room for the prepared patches a checkpoint
        // carries (their records, bounded to a share of the journal).
        let carried_bytes = if format_version >= FORMAT_VERSION_PATCHES {
            CHECKPOINT_CARRIED_PREFIX_BYTES as u64 + journal_bytes / PATCH_JOURNAL_SHARE
        } else {
            0
        };
        let checkpoint_slot_bytes =
            (CHECKPOINT_HEADER_BYTES + max_chunks * META_BYTES as u64 + carried_bytes)
                .next_multiple_of(BLOCK);
        let checkpoint_offset = HEADER_BYTES;
        let journal_offset = checkpoint_offset + 2 * checkpoint_slot_bytes;
        let (block_crc_offset, block_crc_bytes) = if format_version >= FORMAT_VERSION_BLOCK_CRCS {
            (
                journal_offset + journal_bytes,
                (budget / BLOCK * BLOCK_CRC_ENTRY_BYTES).next_multiple_of(BLOCK),
            )
        } else {
            (0, 0)
        };
        let data_offset =
            (journal_offset + journal_bytes + block_crc_bytes).next_multiple_of(HEADER_BYTES);
        let group_count = capacity_bytes.saturating_sub(data_offset) / group_bytes;
        if group_count == 0 {
            return Err(format!(
                "needs at least {} bytes (header, checkpoints, a {journal_bytes}-byte journal, \
                 block CRCs and one {group_bytes}-byte chunk group)",
                data_offset + group_bytes
            ));
        }
        let sb = Superblock {
            checkpoint_offset,
            checkpoint_slot_bytes,
            journal_offset,
            block_crc_offset,
            block_crc_bytes,
            data_offset,
            group_count: u32::try_from(group_count)
                .map_err(|_| "device has more than 2^32 groups".to_string())?,
            ..self
        };
        debug_assert!(
            !sb.has_block_crcs() || sb.data_blocks() * BLOCK_CRC_ENTRY_BYTES <= sb.block_crc_bytes,
            "the block-CRC region covers the data region"
        );
        Ok(sb)
    }

    /// Whether the device has a block-CRC region (format version 3 on).
    pub fn has_block_crcs(&self) -> bool {
        self.format_version >= FORMAT_VERSION_BLOCK_CRCS
    }

    /// Whether the journal may hold Patch records (format version 4 on): a
    /// build that predates them refuses the device by its version rather
    /// than meeting a record it cannot read.
    pub fn has_patches(&self) -> bool {
        self.format_version >= FORMAT_VERSION_PATCHES
    }

    /// How many journal batches may be in flight at once: up to
    /// [`JOURNAL_DEPTH_MAX`] from format version 5, else one (an older build's
    /// recovery checks only the last batch's data, so it must never meet a
    /// device whose last few batches are in question; it refuses a version 5
    /// device by its version).
    pub fn journal_depth_max(&self) -> usize {
        if self.format_version >= FORMAT_VERSION_PIPELINED {
            JOURNAL_DEPTH_MAX
        } else {
            1
        }
    }

    /// Blocks of the data region.
    pub fn data_blocks(&self) -> u64 {
        u64::from(self.group_count) * self.group_bytes() / BLOCK
    }

    /// Index of the data block at device offset `offset` (a data-region
    /// offset), counted from the start of the data region.
    pub fn data_block_index(&self, offset: u64) -> u64 {
        debug_assert!(offset >= self.data_offset && offset.is_multiple_of(BLOCK));
        (offset - self.data_offset) / BLOCK
    }

    /// Device offset of block `crc_block` of the block-CRC region, which
    /// holds the CRCs of data blocks `crc_block * BLOCK_CRCS_PER_BLOCK` on.
    pub fn block_crc_block_offset(&self, crc_block: u64) -> u64 {
        debug_assert!((crc_block + 1) * BLOCK <= self.block_crc_bytes);
        self.block_crc_offset + crc_block * BLOCK
    }

    pub fn group_bytes(&self) -> u64 {
        1 << self.class_log2_max
    }

    /// Byte offset on the device of a chunk slot.
    pub fn slot_offset(&self, slot: SlotId) -> u64 {
        self.data_offset
            + u64::from(slot.group) * self.group_bytes()
            + (u64::from(slot.index) << slot.class_log2)
    }

    /// Most chunks the data region can hold (all of the smallest class).
    pub fn max_chunks(&self) -> u64 {
        u64::from(self.group_count) << (self.class_log2_max - self.class_log2_min)
    }

    pub fn encode(&self) -> [u8; BLOCK as usize] {
        let mut block = [0u8; BLOCK as usize];
        let mut w = Writer::new(&mut block);
        w.put(&SUPERBLOCK_MAGIC);
        w.u32(self.format_version);
        w.u32(0); // flags
        w.u64(self.format_id);
        w.u32(self.sector_size);
        w.u32(BLOCK as u32);
        w.u64(self.capacity_bytes);
        w.u8(self.class_log2_min);
        w.u8(self.class_log2_max);
        w.u16(0);
        w.u32(self.group_count);
        w.u64(self.checkpoint_offset);
        w.u64(self.checkpoint_slot_bytes);
        w.u64(self.journal_offset);
        w.u64(self.journal_bytes);
        w.u64(self.data_offset);
        w.u64(self.created_unix_secs);
        w.u64(self.block_crc_offset);
        w.u64(self.block_crc_bytes);
        let crc = crc32c::crc32c(&block[..SUPERBLOCK_CRC_AT]);
        block[SUPERBLOCK_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        block
    }

    /// Decodes and validates one superblock copy.
    pub fn decode(bytes: &[u8]) -> Result<Superblock, FormatError> {
        const WHAT: &str = "superblock";
        if bytes.len() < BLOCK as usize {
            return Err(FormatError::Short {
                what: WHAT,
                len: bytes.len(),
                need: BLOCK as usize,
            });
        }
        if bytes[..8] != SUPERBLOCK_MAGIC {
            return Err(FormatError::NoMagic { what: WHAT });
        }
        let stored = u32::from_le_bytes(
            bytes[SUPERBLOCK_CRC_AT..BLOCK as usize]
                .try_into()
                .expect("4 bytes"),
        );
        let computed = crc32c::crc32c(&bytes[..SUPERBLOCK_CRC_AT]);
        let mut r = Reader::new(bytes, WHAT);
        r.take::<8>()?;
        let version = r.u32()?;
        // The version is checked before the checksum: a future format may
        // checksum differently, and "unsupported version" is the useful error.
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::Version {
                what: WHAT,
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if stored != computed {
            return Err(FormatError::Checksum {
                what: WHAT,
                stored,
                computed,
            });
        }
        let flags = r.u32()?;
        if flags != 0 {
            // A later format may add features behind flags; a reader that
            // ignored them would misread the device.
            return Err(field(WHAT, "flags", flags.into(), "unknown feature flags"));
        }
        let format_id = r.u64()?;
        let sector_size = r.u32()?;
        let block = r.u32()?;
        let sb = Superblock {
            format_version: version,
            format_id,
            sector_size,
            capacity_bytes: r.u64()?,
            class_log2_min: r.u8()?,
            class_log2_max: r.u8()?,
            group_count: {
                let reserved = r.u16()?;
                if reserved != 0 {
                    return Err(field(WHAT, "reserved", reserved.into(), "must be zero"));
                }
                r.u32()?
            },
            checkpoint_offset: r.u64()?,
            checkpoint_slot_bytes: r.u64()?,
            journal_offset: r.u64()?,
            journal_bytes: r.u64()?,
            data_offset: r.u64()?,
            created_unix_secs: r.u64()?,
            // Zero before version 3, whose layout has no such region.
            block_crc_offset: r.u64()?,
            block_crc_bytes: r.u64()?,
        };
        if let Some(at) = bytes[r.at..SUPERBLOCK_CRC_AT].iter().position(|&b| b != 0) {
            return Err(field(
                WHAT,
                "reserved bytes",
                (r.at + at) as u64,
                "must be zero",
            ));
        }
        if u64::from(block) != BLOCK {
            return Err(field(
                WHAT,
                "block_size",
                block.into(),
                format!("must be {BLOCK}"),
            ));
        }
        if !sector_size.is_power_of_two() || !(512..=BLOCK as u32).contains(&sector_size) {
            return Err(field(
                WHAT,
                "sector_size",
                sector_size.into(),
                "must be a power of two in 512..=4096",
            ));
        }
        // Re-plan from the stored parameters: a consistent superblock is
        // exactly what `plan` produces, which rules out every overlapping or
        // out-of-range region without checking them one by one.
        let expect = sb
            .laid_out()
            .map_err(|reason| field(WHAT, "geometry", sb.capacity_bytes, reason))?;
        if expect != sb {
            return Err(field(
                WHAT,
                "geometry",
                sb.capacity_bytes,
                format!("regions inconsistent: stored {sb:?}, expected {expect:?}"),
            ));
        }
        Ok(sb)
    }
}

/// Where a chunk's bytes live: slot `index` of group `group`, in a group of
/// chunk size `1 << class_log2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId {
    pub group: u32,
    pub index: u32,
    pub class_log2: u8,
}

impl SlotId {
    pub fn bytes(&self) -> u64 {
        1 << self.class_log2
    }
}

/// The durable state of one committed chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub chain: ChainId,
    pub chunk: ChunkId,
    pub slot: SlotId,
    pub len: u32,
    pub version: ChunkVersion,
    pub chain_version: ChainVersion,
    /// CRC32C of bytes `0..len`.
    pub crc: u32,
    pub timestamp_us: u64,
    pub client: ClientId,
    pub request: RequestId,
}

impl ChunkMeta {
    pub fn encode(&self, out: &mut [u8]) {
        let mut w = Writer::new(&mut out[..META_BYTES]);
        w.u32(self.chain.0);
        w.u64(self.chunk.inode.0);
        w.u32(self.chunk.index);
        w.u32(self.slot.group);
        w.u16(
            u16::try_from(self.slot.index)
                .expect("slot index fits: groups hold at most 2^14 slots"),
        );
        w.u8(self.slot.class_log2);
        w.u8(0);
        w.u32(self.len);
        w.u32(self.version.0);
        w.u32(self.chain_version.0);
        w.u32(self.crc);
        w.u64(self.timestamp_us);
        w.u64(self.client.0);
        w.u64(self.request.0);
    }

    /// Decodes a record and checks it against the device's geometry.
    pub fn decode(
        bytes: &[u8],
        sb: &Superblock,
        what: &'static str,
    ) -> Result<ChunkMeta, FormatError> {
        let mut r = Reader::new(bytes, what);
        let chain = ChainId(r.u32()?);
        let chunk = ChunkId::new(r.u64()?, r.u32()?);
        let group = r.u32()?;
        let index = u32::from(r.u16()?);
        let class_log2 = r.u8()?;
        let _flags = r.u8()?;
        let meta = ChunkMeta {
            chain,
            chunk,
            slot: SlotId {
                group,
                index,
                class_log2,
            },
            len: r.u32()?,
            version: ChunkVersion(r.u32()?),
            chain_version: ChainVersion(r.u32()?),
            crc: r.u32()?,
            timestamp_us: r.u64()?,
            client: ClientId(r.u64()?),
            request: RequestId(r.u64()?),
        };
        if !(sb.class_log2_min..=sb.class_log2_max).contains(&class_log2) {
            return Err(field(
                what,
                "slot class",
                class_log2.into(),
                format!("outside {}..={}", sb.class_log2_min, sb.class_log2_max),
            ));
        }
        if group >= sb.group_count {
            return Err(field(
                what,
                "slot group",
                group.into(),
                format!("device has {} groups", sb.group_count),
            ));
        }
        if u64::from(index) >= sb.group_bytes() >> class_log2 {
            return Err(field(what, "slot index", index.into(), "beyond the group"));
        }
        if u64::from(meta.len) > meta.slot.bytes() {
            return Err(field(
                what,
                "length",
                meta.len.into(),
                format!("exceeds slot size {}", meta.slot.bytes()),
            ));
        }
        Ok(meta)
    }
}

/// One metadata change in the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// The chunk's committed state is now this.
    Put(ChunkMeta),
    /// A pending version, durable before its chain has committed it. While
    /// the engine runs it stays pending until committed (in memory: this
    /// record is already its durable form) or aborted (a `Put` of the
    /// previous state, or a `Remove`); recovery reads it as a `Put`, so a
    /// version a CRAQ replica had prepared survives any crash.
    Prepare(ChunkMeta),
    /// The chunk no longer exists.
    Remove { chain: ChainId, chunk: ChunkId },
    /// (Format version 4.) A version made by writing `extents` over the
    /// chunk's current version in the same slot, `meta.slot`: its bytes are
    /// those of the slot as the records before this one leave it, with the
    /// extents (in order) written over them. The extents' bytes are in this
    /// record only; a checkpoint writes them into the slot before it lets the
    /// journal reuse the record, and recovery writes them again (redo). With
    /// `prepare` it is a prepared version (a `Prepare`), else a commit (a
    /// `Put`).
    Patch {
        meta: ChunkMeta,
        prepare: bool,
        extents: Arc<Vec<PatchExtent>>,
    },
}

/// Bytes a Patch record writes over its chunk, at `offset` from the chunk's
/// start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchExtent {
    pub offset: u32,
    pub data: Vec<u8>,
}

impl PatchExtent {
    pub fn end(&self) -> u32 {
        self.offset + self.data.len() as u32
    }
}

const TAG_PUT: u8 = 1;
const TAG_REMOVE: u8 = 2;
const TAG_PREPARE: u8 = 3;
const TAG_PATCH_PUT: u8 = 4;
const TAG_PATCH_PREPARE: u8 = 5;
const REMOVE_BYTES: usize = 16;
/// A Patch record's fixed part after its tag: the metadata and the extent count.
const PATCH_FIXED_BYTES: usize = META_BYTES + 2;
/// Each extent's header: offset and length.
const PATCH_EXTENT_HEADER_BYTES: usize = 8;
/// Most extents one Patch record carries (its count is a u16).
pub const PATCH_EXTENTS_MAX: usize = u16::MAX as usize;

impl Record {
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Record::Put(_) | Record::Prepare(_) => META_BYTES,
            Record::Remove { .. } => REMOVE_BYTES,
            Record::Patch { extents, .. } => {
                PATCH_FIXED_BYTES
                    + extents
                        .iter()
                        .map(|e| PATCH_EXTENT_HEADER_BYTES + e.data.len())
                        .sum::<usize>()
            }
        }
    }

    /// The chunk metadata the record sets, unless it is a `Remove`.
    pub fn meta(&self) -> Option<&ChunkMeta> {
        match self {
            Record::Put(meta) | Record::Prepare(meta) | Record::Patch { meta, .. } => Some(meta),
            Record::Remove { .. } => None,
        }
    }
}

/// Encodes a journal batch starting at log position `lsn` into `out`, which
/// must hold [`batch_bytes`] bytes. Returns the batch's length on disk.
/// `in_flight` is how many older batches were still waiting for their flush
/// when this one was written (format version 5; always 0 before).
pub fn encode_batch(
    format_id: u64,
    lsn: u64,
    in_flight: u16,
    records: &[Record],
    out: &mut [u8],
) -> usize {
    let payload_len: usize = records.iter().map(Record::encoded_len).sum();
    let total = batch_bytes(payload_len);
    let (header, rest) = out[..total].split_at_mut(BATCH_HEADER_BYTES);
    let written = encode_records(records, rest);
    debug_assert_eq!(written, payload_len);
    rest[payload_len..].fill(0);
    let mut h = Writer::new(header);
    h.u32(JOURNAL_MAGIC);
    h.u16(1);
    h.u16(in_flight);
    h.u64(lsn);
    h.u32(payload_len as u32);
    h.u32(records.len() as u32);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&format_id.to_le_bytes()), &out[..24]);
    let crc = crc32c::crc32c_append(
        crc,
        &out[BATCH_HEADER_BYTES..BATCH_HEADER_BYTES + payload_len],
    );
    out[24..28].copy_from_slice(&crc.to_le_bytes());
    out[28..32].fill(0);
    total
}

/// Encodes `records` one after the other into `out` (which must hold their
/// `encoded_len`s); returns the bytes written. Journal batches and the
/// carried records of a checkpoint use the same encoding.
pub fn encode_records(records: &[Record], out: &mut [u8]) -> usize {
    let mut w = Writer::new(out);
    for record in records {
        match record {
            Record::Put(meta) | Record::Prepare(meta) => {
                w.u8(if matches!(record, Record::Put(_)) {
                    TAG_PUT
                } else {
                    TAG_PREPARE
                });
                meta.encode(&mut w.bytes[w.at..]);
                w.at += META_BYTES;
            }
            Record::Remove { chain, chunk } => {
                w.u8(TAG_REMOVE);
                w.u32(chain.0);
                w.u64(chunk.inode.0);
                w.u32(chunk.index);
            }
            Record::Patch {
                meta,
                prepare,
                extents,
            } => {
                w.u8(if *prepare {
                    TAG_PATCH_PREPARE
                } else {
                    TAG_PATCH_PUT
                });
                meta.encode(&mut w.bytes[w.at..]);
                w.at += META_BYTES;
                w.u16(extents.len() as u16);
                for extent in extents.iter() {
                    w.u32(extent.offset);
                    w.u32(extent.data.len() as u32);
                    w.put(&extent.data);
                }
            }
        }
    }
    w.at
}

/// Bytes on disk of a batch with `payload_len` bytes of records.
pub fn batch_bytes(payload_len: usize) -> usize {
    (BATCH_HEADER_BYTES + payload_len).next_multiple_of(BLOCK as usize)
}

/// What a batch header says, before its payload is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub lsn: u64,
    pub payload_len: u32,
    pub record_count: u32,
    /// Older batches still waiting for their flush when this one was written
    /// (the header's flags field, format version 5).
    pub in_flight: u16,
}

impl BatchHeader {
    pub fn total_bytes(&self) -> usize {
        batch_bytes(self.payload_len as usize)
    }
}

/// Reads a batch header; `None` if the bytes are not a batch at `lsn` (stale
/// data from before the log wrapped, or never written): the end of the log.
pub fn decode_batch_header(bytes: &[u8], lsn: u64, max_batch_bytes: usize) -> Option<BatchHeader> {
    let mut r = Reader::new(bytes, "journal batch header");
    if r.u32().ok()? != JOURNAL_MAGIC || r.u16().ok()? != 1 {
        return None;
    }
    let in_flight = r.u16().ok()?;
    let header = BatchHeader {
        lsn: r.u64().ok()?,
        payload_len: r.u32().ok()?,
        record_count: r.u32().ok()?,
        in_flight,
    };
    (header.lsn == lsn && header.total_bytes() <= max_batch_bytes).then_some(header)
}

/// Decodes a whole batch whose header [`decode_batch_header`] accepted.
/// `Ok(None)` means the batch is torn (checksum mismatch): the end of the log.
/// An error means the checksum matched but the records are invalid: real
/// corruption, or a bug, that recovery must not paper over.
pub fn decode_batch(
    bytes: &[u8],
    header: &BatchHeader,
    sb: &Superblock,
) -> Result<Option<Vec<Record>>, FormatError> {
    let payload_end = BATCH_HEADER_BYTES + header.payload_len as usize;
    if bytes.len() < payload_end {
        return Err(FormatError::Short {
            what: "journal batch",
            len: bytes.len(),
            need: payload_end,
        });
    }
    let stored = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
    let crc = crc32c::crc32c_append(crc32c::crc32c(&sb.format_id.to_le_bytes()), &bytes[..24]);
    if crc32c::crc32c_append(crc, &bytes[BATCH_HEADER_BYTES..payload_end]) != stored {
        return Ok(None);
    }
    let records = decode_records(
        &bytes[BATCH_HEADER_BYTES..payload_end],
        sb,
        header.record_count,
    )?;
    if records.len() != header.record_count as usize {
        return Err(field(
            "journal batch",
            "record_count",
            header.record_count.into(),
            format!("payload holds {} records", records.len()),
        ));
    }
    Ok(Some(records))
}

/// Decodes records that [`encode_records`] wrote, checking each against the
/// geometry; `expected` sizes the first allocation only.
fn decode_records(
    bytes: &[u8],
    sb: &Superblock,
    expected: u32,
) -> Result<Vec<Record>, FormatError> {
    const WHAT: &str = "journal record";
    let mut records = Vec::with_capacity(expected.min(1 << 16) as usize);
    let mut r = Reader::new(bytes, WHAT);
    while r.at < r.bytes.len() {
        match r.u8()? {
            tag @ (TAG_PUT | TAG_PREPARE) => {
                let meta = ChunkMeta::decode(&r.bytes[r.at..], sb, WHAT)?;
                r.at += META_BYTES;
                records.push(if tag == TAG_PUT {
                    Record::Put(meta)
                } else {
                    Record::Prepare(meta)
                });
            }
            TAG_REMOVE => {
                let chain = ChainId(r.u32()?);
                let chunk = ChunkId::new(r.u64()?, r.u32()?);
                records.push(Record::Remove { chain, chunk });
            }
            tag @ (TAG_PATCH_PUT | TAG_PATCH_PREPARE) if sb.has_patches() => {
                let meta = ChunkMeta::decode(&r.bytes[r.at..], sb, WHAT)?;
                r.at += META_BYTES;
                let count = r.u16()?;
                if count == 0 {
                    return Err(field(WHAT, "extent count", 0, "a patch writes something"));
                }
                let mut extents = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    let offset = r.u32()?;
                    let len = r.u32()?;
                    let end = u64::from(offset) + u64::from(len);
                    if len == 0 || end > u64::from(meta.len) {
                        return Err(field(
                            WHAT,
                            "extent",
                            end,
                            format!(
                                "extent {offset}+{len} is empty or ends past the chunk's length {}",
                                meta.len
                            ),
                        ));
                    }
                    let data_end = r.at + len as usize;
                    let data = r
                        .bytes
                        .get(r.at..data_end)
                        .ok_or(FormatError::Short {
                            what: WHAT,
                            len: r.bytes.len(),
                            need: data_end,
                        })?
                        .to_vec();
                    r.at = data_end;
                    extents.push(PatchExtent { offset, data });
                }
                records.push(Record::Patch {
                    meta,
                    prepare: tag == TAG_PATCH_PREPARE,
                    extents: Arc::new(extents),
                });
            }
            tag => return Err(field(WHAT, "tag", tag.into(), "unknown record type")),
        }
    }
    Ok(records)
}

/// Header of a checkpoint: a full image of committed chunk metadata, from
/// which recovery replays the journal starting at `journal_lsn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointHeader {
    pub sequence: u64,
    pub journal_lsn: u64,
    pub entry_count: u64,
    pub payload_crc: u32,
}

impl CheckpointHeader {
    pub fn encode(&self, format_id: u64, out: &mut [u8]) {
        out[..CHECKPOINT_HEADER_BYTES as usize].fill(0);
        let mut w = Writer::new(out);
        w.u32(CHECKPOINT_MAGIC);
        w.u16(1);
        w.u16(0);
        w.u64(self.sequence);
        w.u64(self.journal_lsn);
        w.u64(self.entry_count);
        w.u32(self.payload_crc);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&format_id.to_le_bytes()), &out[..36]);
        out[36..40].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a header; the payload is checked separately with `payload_crc`.
    pub fn decode(bytes: &[u8], sb: &Superblock) -> Result<CheckpointHeader, FormatError> {
        const WHAT: &str = "checkpoint header";
        let mut r = Reader::new(bytes, WHAT);
        if r.u32()? != CHECKPOINT_MAGIC {
            return Err(FormatError::NoMagic { what: WHAT });
        }
        let version = r.u16()?;
        if version != 1 {
            return Err(FormatError::Version {
                what: WHAT,
                found: version.into(),
                supported: 1,
            });
        }
        r.u16()?;
        let header = CheckpointHeader {
            sequence: r.u64()?,
            journal_lsn: r.u64()?,
            entry_count: r.u64()?,
            payload_crc: r.u32()?,
        };
        let stored = r.u32()?;
        let computed =
            crc32c::crc32c_append(crc32c::crc32c(&sb.format_id.to_le_bytes()), &bytes[..36]);
        if stored != computed {
            return Err(FormatError::Checksum {
                what: WHAT,
                stored,
                computed,
            });
        }
        if header.entry_count > sb.max_chunks() {
            return Err(field(
                WHAT,
                "entry_count",
                header.entry_count,
                format!("device holds at most {} chunks", sb.max_chunks()),
            ));
        }
        if !header.journal_lsn.is_multiple_of(BLOCK) {
            return Err(field(
                WHAT,
                "journal_lsn",
                header.journal_lsn,
                "not block aligned",
            ));
        }
        Ok(header)
    }
}

/// Decodes a checkpoint payload of `header.entry_count` records.
/// Bytes of a checkpoint's payload (after its header block) before the
/// records it carries (format version 4): the entries, then the length of
/// the carried records (u32). What a reader reads first.
pub fn checkpoint_payload_head_bytes(header: &CheckpointHeader, sb: &Superblock) -> usize {
    header.entry_count as usize * META_BYTES
        + if sb.has_patches() {
            CHECKPOINT_CARRIED_PREFIX_BYTES
        } else {
            0
        }
}

/// The carried records' length, from the payload's first
/// [`checkpoint_payload_head_bytes`] bytes (0 before format version 4).
/// Refused if the payload would not fit the checkpoint slot.
pub fn checkpoint_carried_bytes(
    head: &[u8],
    header: &CheckpointHeader,
    sb: &Superblock,
) -> Result<usize, FormatError> {
    if !sb.has_patches() {
        return Ok(0);
    }
    let at = header.entry_count as usize * META_BYTES;
    let prefix = head
        .get(at..at + CHECKPOINT_CARRIED_PREFIX_BYTES)
        .ok_or(FormatError::Short {
            what: "checkpoint payload",
            len: head.len(),
            need: at + CHECKPOINT_CARRIED_PREFIX_BYTES,
        })?;
    let carried = u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize;
    let room = sb.checkpoint_slot_bytes - CHECKPOINT_HEADER_BYTES;
    if (at + CHECKPOINT_CARRIED_PREFIX_BYTES + carried) as u64 > room {
        return Err(field(
            "checkpoint payload",
            "carried record bytes",
            carried as u64,
            format!("the payload would exceed the checkpoint slot's {room} bytes"),
        ));
    }
    Ok(carried)
}

/// Encodes a checkpoint's payload: `view` as entries, then (format version
/// 4) the length of `carried` and `carried`. `out` must hold
/// [`checkpoint_payload_head_bytes`] plus the records' encoded length.
/// Returns the payload's length.
pub fn encode_checkpoint_payload(
    view: &[ChunkMeta],
    carried: &[Record],
    sb: &Superblock,
    out: &mut [u8],
) -> usize {
    for (i, meta) in view.iter().enumerate() {
        meta.encode(&mut out[i * META_BYTES..]);
    }
    let mut at = view.len() * META_BYTES;
    if sb.has_patches() {
        let carried_len: usize = carried.iter().map(Record::encoded_len).sum();
        out[at..at + CHECKPOINT_CARRIED_PREFIX_BYTES]
            .copy_from_slice(&(carried_len as u32).to_le_bytes());
        at += CHECKPOINT_CARRIED_PREFIX_BYTES;
        at += encode_records(carried, &mut out[at..]);
    } else {
        debug_assert!(
            carried.is_empty(),
            "only a version 4 checkpoint carries records"
        );
    }
    at
}

/// Decodes a checkpoint's payload: its entries, and the prepared Patch
/// records it carries (format version 4), after checking its CRC.
pub fn decode_checkpoint(
    bytes: &[u8],
    header: &CheckpointHeader,
    sb: &Superblock,
) -> Result<(Vec<ChunkMeta>, Vec<Record>), FormatError> {
    let entries_len = header.entry_count as usize * META_BYTES;
    let carried = if sb.has_patches() {
        checkpoint_carried_bytes(bytes, header, sb)?
    } else {
        0
    };
    let len = checkpoint_payload_head_bytes(header, sb) + carried;
    let payload = bytes.get(..len).ok_or(FormatError::Short {
        what: "checkpoint payload",
        len: bytes.len(),
        need: len,
    })?;
    let computed = crc32c::crc32c(payload);
    if computed != header.payload_crc {
        return Err(FormatError::Checksum {
            what: "checkpoint payload",
            stored: header.payload_crc,
            computed,
        });
    }
    let entries = payload[..entries_len]
        .chunks_exact(META_BYTES)
        .map(|record| ChunkMeta::decode(record, sb, "checkpoint entry"))
        .collect::<Result<Vec<_>, _>>()?;
    let records = decode_records(&payload[len - carried..], sb, 0)?;
    if records
        .iter()
        .any(|r| !matches!(r, Record::Patch { prepare: true, .. }))
    {
        return Err(field(
            "checkpoint payload",
            "carried record",
            0,
            "a checkpoint carries only prepared patches",
        ));
    }
    Ok((entries, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock::plan(256 << 20, 4096, 12, 20, 1 << 20, 0xfeed, 1).expect("plan")
    }

    fn meta(i: u32) -> ChunkMeta {
        ChunkMeta {
            chain: ChainId(3),
            chunk: ChunkId::new(0x1234, i),
            slot: SlotId {
                group: 1,
                index: i,
                class_log2: 16,
            },
            len: 65536,
            version: ChunkVersion(9),
            chain_version: ChainVersion(2),
            crc: 0xdead_beef,
            timestamp_us: 77,
            client: ClientId(5),
            request: RequestId(6),
        }
    }

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = sb();
        let bytes = sb.encode();
        assert_eq!(Superblock::decode(&bytes), Ok(sb));
        let mut bad = bytes;
        bad[40] ^= 1;
        assert!(matches!(
            Superblock::decode(&bad),
            Err(FormatError::Checksum { .. })
        ));
        let mut other = bytes;
        other[8] = 9;
        assert!(matches!(
            Superblock::decode(&other),
            Err(FormatError::Version { found: 9, .. })
        ));
        assert!(matches!(
            Superblock::decode(&[0u8; 4096]),
            Err(FormatError::NoMagic { .. })
        ));
    }

    #[test]
    fn plan_refuses_tiny_devices_and_bad_classes() {
        assert!(Superblock::plan(4 << 20, 4096, 16, 26, 1 << 20, 0, 0).is_err());
        assert!(Superblock::plan(1 << 30, 4096, 11, 20, 1 << 20, 0, 0).is_err());
        assert!(Superblock::plan(1 << 30, 4096, 20, 16, 1 << 20, 0, 0).is_err());
        let sb = Superblock::plan(1 << 30, 4096, 16, 26, 16 << 20, 0, 0).expect("1 GiB fits");
        assert!(sb.data_offset + u64::from(sb.group_count) * sb.group_bytes() <= 1 << 30);
        assert!(
            sb.checkpoint_slot_bytes
                >= CHECKPOINT_HEADER_BYTES + sb.max_chunks() * META_BYTES as u64
        );
    }

    #[test]
    fn version_3_adds_a_block_crc_region_and_version_2_layouts_still_decode() {
        let v3 = sb();
        assert_eq!(v3.format_version, FORMAT_VERSION);
        assert!(v3.has_block_crcs());
        // Between the journal and the data, covering every data block.
        assert_eq!(v3.block_crc_offset, v3.journal_offset + v3.journal_bytes);
        assert!(v3.block_crc_offset + v3.block_crc_bytes <= v3.data_offset);
        assert!(v3.data_blocks() * BLOCK_CRC_ENTRY_BYTES <= v3.block_crc_bytes);
        let last = v3.data_blocks() - 1;
        assert!(
            v3.block_crc_block_offset(last / BLOCK_CRCS_PER_BLOCK) + BLOCK
                <= v3.block_crc_offset + v3.block_crc_bytes
        );
        for version in [1, 2] {
            let old = v3.for_format_version(version).expect("older layout");
            assert_eq!(old.format_version, version);
            assert!(!old.has_block_crcs());
            assert_eq!((old.block_crc_offset, old.block_crc_bytes), (0, 0));
            assert_eq!(
                old.data_offset,
                (old.journal_offset + old.journal_bytes).next_multiple_of(HEADER_BYTES),
                "the version 2 layout, unchanged"
            );
            let bytes = old.encode();
            assert_eq!(
                u32::from_le_bytes(bytes[8..12].try_into().expect("4")),
                version
            );
            assert!(bytes[96..SUPERBLOCK_CRC_AT].iter().all(|&b| b == 0));
            assert_eq!(Superblock::decode(&bytes), Ok(old));
        }
        assert!(v3.for_format_version(FORMAT_VERSION + 1).is_err());
        // A version 2 superblock claiming a region is inconsistent.
        let mut claims = v3.for_format_version(2).expect("v2");
        claims.block_crc_offset = v3.block_crc_offset;
        claims.block_crc_bytes = v3.block_crc_bytes;
        let err = Superblock::decode(&claims.encode()).expect_err("inconsistent");
        assert!(err.to_string().contains("geometry"), "{err}");
    }

    #[test]
    fn version_4_reserves_checkpoint_room_for_patches_and_version_3_keeps_its_layout() {
        let v4 = sb();
        assert!(v4.has_patches() && v4.has_block_crcs());
        let v3 = v4.for_format_version(3).expect("v3 layout");
        assert!(!v3.has_patches() && v3.has_block_crcs());
        assert!(
            v4.checkpoint_slot_bytes
                >= v3.checkpoint_slot_bytes + v4.journal_bytes / PATCH_JOURNAL_SHARE,
            "room for the carried patches"
        );
        assert!(
            v3.checkpoint_slot_bytes
                >= CHECKPOINT_HEADER_BYTES + v3.max_chunks() * META_BYTES as u64
        );
        assert_eq!(Superblock::decode(&v3.encode()), Ok(v3));
        // A version 3 journal cannot hold a Patch record.
        let patch = Record::Patch {
            meta: meta(1),
            prepare: false,
            extents: Arc::new(vec![PatchExtent {
                offset: 10,
                data: vec![7; 100],
            }]),
        };
        let mut buf = vec![0u8; 4096];
        encode_batch(v3.format_id, 0, 0, std::slice::from_ref(&patch), &mut buf);
        let header = decode_batch_header(&buf, 0, 1 << 20).expect("header");
        let err = decode_batch(&buf, &header, &v3).expect_err("no patches before v4");
        assert!(err.to_string().contains("unknown record type"), "{err}");
        assert_eq!(decode_batch(&buf, &header, &v4), Ok(Some(vec![patch])));
    }

    #[test]
    fn checkpoints_carry_prepared_patches_and_refuse_anything_else() {
        let sb = sb();
        let view = vec![meta(1), meta(2)];
        let patch = Record::Patch {
            meta: meta(2),
            prepare: true,
            extents: Arc::new(vec![
                PatchExtent {
                    offset: 0,
                    data: vec![1; 10],
                },
                PatchExtent {
                    offset: 50,
                    data: vec![2; 20],
                },
            ]),
        };
        let encode = |carried: &[Record]| {
            let mut out = vec![0u8; 8192];
            let len = encode_checkpoint_payload(&view, carried, &sb, &mut out);
            let header = CheckpointHeader {
                sequence: 2,
                journal_lsn: 0,
                entry_count: view.len() as u64,
                payload_crc: crc32c::crc32c(&out[..len]),
            };
            (out, header)
        };
        let (out, header) = encode(std::slice::from_ref(&patch));
        assert_eq!(
            checkpoint_carried_bytes(&out, &header, &sb),
            Ok(patch.encoded_len())
        );
        assert_eq!(
            decode_checkpoint(&out, &header, &sb),
            Ok((view.clone(), vec![patch]))
        );
        let (out, header) = encode(&[Record::Put(meta(3))]);
        let err = decode_checkpoint(&out, &header, &sb).expect_err("only prepared patches");
        assert!(err.to_string().contains("prepared patches"), "{err}");
        // A carried length past the slot is refused before anything is read.
        let (mut out, header) = encode(&[]);
        let at = view.len() * META_BYTES;
        out[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(checkpoint_carried_bytes(&out, &header, &sb).is_err());
    }

    #[test]
    fn batches_round_trip_and_stop_at_damage() {
        let sb = sb();
        let records = vec![
            Record::Put(meta(1)),
            Record::Remove {
                chain: ChainId(3),
                chunk: ChunkId::new(1, 2),
            },
            Record::Put(meta(2)),
            Record::Prepare(meta(3)),
        ];
        let mut buf = vec![0u8; 8192];
        let n = encode_batch(sb.format_id, 8192, 3, &records, &mut buf);
        assert_eq!(n, 4096);
        let header = decode_batch_header(&buf, 8192, 1 << 20).expect("header");
        assert_eq!(header.in_flight, 3, "the batches in flight before it");
        assert_eq!(decode_batch(&buf, &header, &sb), Ok(Some(records)));
        // The count is covered by the header's checksum.
        let mut changed = buf.clone();
        changed[6] = 2;
        assert_eq!(decode_batch(&changed, &header, &sb), Ok(None));
        assert!(
            decode_batch_header(&buf, 0, 1 << 20).is_none(),
            "lsn must match"
        );
        buf[100] ^= 4;
        assert_eq!(
            decode_batch(&buf, &header, &sb),
            Ok(None),
            "torn batch ends the log"
        );
    }

    #[test]
    fn meta_records_are_checked_against_geometry() {
        let sb = sb();
        let mut bytes = [0u8; META_BYTES];
        let mut bad = meta(1);
        bad.slot.group = sb.group_count;
        bad.encode(&mut bytes);
        let err = ChunkMeta::decode(&bytes, &sb, "test").expect_err("group out of range");
        assert!(err.to_string().contains("slot group"), "{err}");
        meta(1).encode(&mut bytes);
        assert_eq!(ChunkMeta::decode(&bytes, &sb, "test"), Ok(meta(1)));
    }
}
