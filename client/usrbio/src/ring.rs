//! The shared submission/completion ring (an *ior*) of docs/native-io.md,
//! "The ring": its header fields, the 64-byte submission and 16-byte
//! completion entries, and [`Ring`], the view both sides use over a mapped
//! region.
//!
//! The application's library writes submissions and `sq_tail`/`cq_head`;
//! the daemon writes completions, `sq_head`/`cq_tail` and the failure
//! state. Everything read from the region is a copy, checked by the reader:
//! the other process may write anything at any time.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::os::SharedMemory;

/// `FLYFSIOR`: the first eight bytes of a ring.
pub const RING_MAGIC: [u8; 8] = *b"FLYFSIOR";
pub const RING_VERSION: u32 = 1;
pub const HEADER_BYTES: u64 = 1024;
pub const SQE_BYTES: u64 = 64;
pub const CQE_BYTES: u64 = 16;
/// The most entries a ring may have (a power of two).
pub const ENTRIES_MAX: u32 = 4096;

const MAGIC_AT: u64 = 0;
const VERSION_AT: u64 = 8;
const ENTRIES_AT: u64 = 12;
const SQE_BYTES_AT: u64 = 16;
const CQE_BYTES_AT: u64 = 20;
const SQ_TAIL_AT: u64 = 64;
const SQ_HEAD_AT: u64 = 128;
const CQ_TAIL_AT: u64 = 192;
const CQ_HEAD_AT: u64 = 256;
const STATE_AT: u64 = 320;
const ERROR_LEN_AT: u64 = 324;
const ERROR_COUNT_AT: u64 = 328;
const ERROR_TEXT_AT: u64 = 512;
/// The most bytes of error text a ring holds.
pub const ERROR_TEXT_BYTES: u64 = 512;
const _: () = assert!(ERROR_TEXT_AT + ERROR_TEXT_BYTES == HEADER_BYTES);

/// `state`: the daemon serves the ring.
pub const STATE_OPEN: u32 = 0;
/// `state`: the daemon failed the ring (final); the error text says why.
pub const STATE_FAILED: u32 = 1;

/// The bytes a ring of `entries` entries needs.
pub fn region_bytes(entries: u32) -> u64 {
    HEADER_BYTES + (SQE_BYTES + CQE_BYTES) * entries as u64
}

/// What a submission asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SqeOp {
    Read = 1,
    Write = 2,
    Flush = 3,
}

impl SqeOp {
    pub fn from_u8(value: u8) -> Option<SqeOp> {
        Some(match value {
            1 => SqeOp::Read,
            2 => SqeOp::Write,
            3 => SqeOp::Flush,
            _ => return None,
        })
    }
}

/// A submission entry as bytes say it, unchecked: the op is the raw byte,
/// and `reserved_nonzero` says whether any byte that must be 0 was not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sqe {
    pub op: u8,
    pub flags: u8,
    pub file: u32,
    pub iov: u32,
    pub len: u32,
    pub iov_offset: u64,
    pub file_offset: u64,
    pub user_data: u64,
    pub reserved_nonzero: bool,
}

impl Sqe {
    pub fn encode(&self) -> [u8; SQE_BYTES as usize] {
        let mut out = [0u8; SQE_BYTES as usize];
        out[0] = self.op;
        out[1] = self.flags;
        out[4..8].copy_from_slice(&self.file.to_le_bytes());
        out[8..12].copy_from_slice(&self.iov.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..24].copy_from_slice(&self.iov_offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.file_offset.to_le_bytes());
        out[32..40].copy_from_slice(&self.user_data.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; SQE_BYTES as usize]) -> Sqe {
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Sqe {
            op: bytes[0],
            flags: bytes[1],
            file: u32_at(4),
            iov: u32_at(8),
            len: u32_at(12),
            iov_offset: u64_at(16),
            file_offset: u64_at(24),
            user_data: u64_at(32),
            reserved_nonzero: bytes[2..4].iter().chain(&bytes[40..]).any(|&b| b != 0),
        }
    }
}

/// A completion entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    pub user_data: u64,
    /// Bytes moved, or `-errno`.
    pub result: i64,
}

impl Cqe {
    pub fn encode(&self) -> [u8; CQE_BYTES as usize] {
        let mut out = [0u8; CQE_BYTES as usize];
        out[0..8].copy_from_slice(&self.user_data.to_le_bytes());
        out[8..16].copy_from_slice(&self.result.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; CQE_BYTES as usize]) -> Cqe {
        Cqe {
            user_data: u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes")),
            result: i64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
        }
    }
}

/// Why a region is not a ring this side can use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("the ring's magic is {0:02x?}, not FLYFSIOR")]
    Magic([u8; 8]),
    #[error("ring layout version {0}; this side knows version {RING_VERSION}")]
    Version(u32),
    #[error("{0} entries: a ring has a power of two entries, 1 to {ENTRIES_MAX}")]
    Entries(u32),
    #[error("entry sizes {sqe} and {cqe} bytes; version 1 has {SQE_BYTES} and {CQE_BYTES}")]
    EntrySizes { sqe: u32, cqe: u32 },
    #[error("a ring of {entries} entries needs {needed} bytes, the region has {got}")]
    TooSmall { entries: u32, needed: u64, got: u64 },
}

/// A ring over a mapped region; the same view for both sides.
#[derive(Debug)]
pub struct Ring {
    mem: SharedMemory,
    entries: u32,
}

impl Ring {
    /// Writes a fresh header for `entries` entries (the application's side,
    /// on memory nobody else has yet) and returns the ring.
    pub fn create(mem: SharedMemory, entries: u32) -> Result<Ring, RingError> {
        check_entries(entries)?;
        check_size(&mem, entries)?;
        let zero = vec![0u8; HEADER_BYTES as usize];
        let write =
            |at: u64, bytes: &[u8]| mem.write(at, bytes).expect("inside the checked header");
        write(0, &zero);
        write(MAGIC_AT, &RING_MAGIC);
        write(VERSION_AT, &RING_VERSION.to_le_bytes());
        write(ENTRIES_AT, &entries.to_le_bytes());
        write(SQE_BYTES_AT, &(SQE_BYTES as u32).to_le_bytes());
        write(CQE_BYTES_AT, &(CQE_BYTES as u32).to_le_bytes());
        Ok(Ring { mem, entries })
    }

    /// Checks the header another process wrote (the daemon's side) and
    /// returns the ring. The entry count is read once, here, and never
    /// again: the other side cannot change it later.
    pub fn open(mem: SharedMemory) -> Result<Ring, RingError> {
        let mut header = [0u8; 24];
        if mem.read(0, &mut header).is_err() {
            return Err(RingError::TooSmall {
                entries: 0,
                needed: HEADER_BYTES,
                got: mem.len() as u64,
            });
        }
        let magic: [u8; 8] = header[0..8].try_into().expect("8 bytes");
        if magic != RING_MAGIC {
            return Err(RingError::Magic(magic));
        }
        let u32_at =
            |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let version = u32_at(VERSION_AT as usize);
        if version != RING_VERSION {
            return Err(RingError::Version(version));
        }
        let entries = u32_at(ENTRIES_AT as usize);
        check_entries(entries)?;
        let (sqe, cqe) = (u32_at(SQE_BYTES_AT as usize), u32_at(CQE_BYTES_AT as usize));
        if sqe as u64 != SQE_BYTES || cqe as u64 != CQE_BYTES {
            return Err(RingError::EntrySizes { sqe, cqe });
        }
        check_size(&mem, entries)?;
        Ok(Ring { mem, entries })
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    pub fn memory(&self) -> &SharedMemory {
        &self.mem
    }

    fn word(&self, at: u64) -> &AtomicU32 {
        self.mem
            .atomic_u32(at)
            .expect("header words are aligned and inside the checked region")
    }

    pub fn sq_tail(&self) -> &AtomicU32 {
        self.word(SQ_TAIL_AT)
    }
    pub fn sq_head(&self) -> &AtomicU32 {
        self.word(SQ_HEAD_AT)
    }
    pub fn cq_tail(&self) -> &AtomicU32 {
        self.word(CQ_TAIL_AT)
    }
    pub fn cq_head(&self) -> &AtomicU32 {
        self.word(CQ_HEAD_AT)
    }
    pub fn state(&self) -> &AtomicU32 {
        self.word(STATE_AT)
    }
    pub fn error_count(&self) -> &AtomicU32 {
        self.word(ERROR_COUNT_AT)
    }

    fn slot(&self, index: u32) -> u64 {
        (index & (self.entries - 1)) as u64
    }

    fn sqe_at(&self, index: u32) -> u64 {
        HEADER_BYTES + self.slot(index) * SQE_BYTES
    }

    fn cqe_at(&self, index: u32) -> u64 {
        HEADER_BYTES + self.entries as u64 * SQE_BYTES + self.slot(index) * CQE_BYTES
    }

    pub fn write_sqe(&self, index: u32, sqe: &Sqe) {
        self.mem
            .write(self.sqe_at(index), &sqe.encode())
            .expect("slots are inside the checked region");
    }

    pub fn read_sqe(&self, index: u32) -> Sqe {
        let mut bytes = [0u8; SQE_BYTES as usize];
        self.mem
            .read(self.sqe_at(index), &mut bytes)
            .expect("slots are inside the checked region");
        Sqe::decode(&bytes)
    }

    pub fn write_cqe(&self, index: u32, cqe: &Cqe) {
        self.mem
            .write(self.cqe_at(index), &cqe.encode())
            .expect("slots are inside the checked region");
    }

    pub fn read_cqe(&self, index: u32) -> Cqe {
        let mut bytes = [0u8; CQE_BYTES as usize];
        self.mem
            .read(self.cqe_at(index), &mut bytes)
            .expect("slots are inside the checked region");
        Cqe::decode(&bytes)
    }

    /// Records why a request or the ring failed (the daemon's side), cut at
    /// a character boundary to fit.
    pub fn set_error(&self, text: &str) {
        let mut end = text.len().min(ERROR_TEXT_BYTES as usize);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let bytes = &text.as_bytes()[..end];
        self.mem
            .write(ERROR_TEXT_AT, bytes)
            .expect("the error text is inside the header");
        self.word(ERROR_LEN_AT).store(end as u32, Ordering::Release);
        self.error_count().fetch_add(1, Ordering::Release);
    }

    /// The last error text (diagnostic: read while the daemon may rewrite it).
    pub fn error(&self) -> String {
        let len = (self.word(ERROR_LEN_AT).load(Ordering::Acquire) as u64).min(ERROR_TEXT_BYTES);
        let mut bytes = vec![0u8; len as usize];
        self.mem
            .read(ERROR_TEXT_AT, &mut bytes)
            .expect("the error text is inside the header");
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Fails the ring for good (the daemon's side): the text first, then the
    /// state, so a reader that sees the state sees the text.
    pub fn fail(&self, text: &str) {
        self.set_error(text);
        self.state().store(STATE_FAILED, Ordering::Release);
    }
}

fn check_entries(entries: u32) -> Result<(), RingError> {
    if entries == 0 || entries > ENTRIES_MAX || !entries.is_power_of_two() {
        return Err(RingError::Entries(entries));
    }
    Ok(())
}

fn check_size(mem: &SharedMemory, entries: u32) -> Result<(), RingError> {
    let needed = region_bytes(entries);
    if (mem.len() as u64) < needed {
        return Err(RingError::TooSmall {
            entries,
            needed,
            got: mem.len() as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn region(len: i64) -> SharedMemory {
        let fd =
            nix::sys::memfd::memfd_create(c"ring-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .expect("memfd");
        nix::unistd::ftruncate(&fd, len).expect("ftruncate");
        SharedMemory::map(fd.as_fd(), len as usize).expect("map")
    }

    #[test]
    fn entries_round_trip_through_the_region() {
        let ring = Ring::create(region(region_bytes(8) as i64), 8).expect("create");
        let sqe = Sqe {
            op: 2,
            flags: 0,
            file: 3,
            iov: 4,
            len: 4096,
            iov_offset: 1 << 33,
            file_offset: 1 << 40,
            user_data: u64::MAX,
            reserved_nonzero: false,
        };
        ring.write_sqe(13, &sqe);
        assert_eq!(ring.read_sqe(5), sqe, "slot 13 & 7");
        ring.write_cqe(
            9,
            &Cqe {
                user_data: 1,
                result: -5,
            },
        );
        assert_eq!(
            ring.read_cqe(1),
            Cqe {
                user_data: 1,
                result: -5
            }
        );
        ring.fail(&"x".repeat(600));
        assert_eq!(ring.state().load(Ordering::Acquire), STATE_FAILED);
        assert_eq!(ring.error().len(), ERROR_TEXT_BYTES as usize);
    }

    #[test]
    fn a_bad_header_is_an_error_naming_it() {
        let ring = Ring::create(region(8192), 64).expect("create");
        let mem = ring.mem;
        assert_eq!(
            Ring::open(region(8192)).err(),
            Some(RingError::Magic([0; 8]))
        );
        mem.write(ENTRIES_AT, &3u32.to_le_bytes()).expect("write");
        let mem2 = region(8192);
        let mut header = [0u8; 1024];
        mem.read(0, &mut header).expect("read");
        mem2.write(0, &header).expect("write");
        assert_eq!(Ring::open(mem2).err(), Some(RingError::Entries(3)));
        mem.write(ENTRIES_AT, &4096u32.to_le_bytes())
            .expect("write");
        assert!(matches!(
            Ring::open(mem),
            Err(RingError::TooSmall { entries: 4096, .. })
        ));
        assert_eq!(
            Ring::create(region(4096), 64).err(),
            Some(RingError::TooSmall {
                entries: 64,
                needed: region_bytes(64),
                got: 4096
            })
        );
    }
}
