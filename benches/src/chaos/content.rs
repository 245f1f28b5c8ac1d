//! Self-describing file contents for the chaos workload: when a file reads
//! back wrong, its bytes say whose they are.
//!
//! Every 16-byte record at a file offset that is a multiple of 16 holds the
//! file's id, the generation (the workload's count of writes) of the write
//! that put it there, the offset divided by 16, and a check word over those
//! three. A write of `len` bytes at `offset` writes the bytes its range
//! covers of the records at their places, so a record cut by a write's edge
//! mixes two writes and fails its check. Reading back, each whole record is
//! one of: a record of (file, generation) at its own place, one found at
//! another place (the bytes moved), zeros (a hole, or a chunk storage does
//! not have), or anything else. Runs of the same kind are what a
//! verification error prints, for the bytes read and the bytes expected.

use std::fmt::Write as _;

/// Bytes per record.
const RECORD: u64 = 16;
/// Mixed into the check word, so that other self-describing data (or a
/// record's bytes shifted) rarely passes it.
const CHECK_SALT: u32 = 0x5eed_c4a0;

/// What a file's record names: which file and which write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Origin {
    /// The workload's file id (task in the high byte, creation number below).
    pub file: u32,
    /// The workload's write count when the write was made.
    pub generation: u32,
}

fn record(origin: Origin, at: u64) -> [u8; RECORD as usize] {
    let mut bytes = [0u8; RECORD as usize];
    bytes[0..4].copy_from_slice(&origin.file.to_le_bytes());
    bytes[4..8].copy_from_slice(&origin.generation.to_le_bytes());
    // Files stay far below 64 GiB, so the place fits 32 bits.
    bytes[8..12].copy_from_slice(&((at / RECORD) as u32).to_le_bytes());
    let check = crc32c::crc32c(&bytes[0..12]) ^ CHECK_SALT;
    bytes[12..16].copy_from_slice(&check.to_le_bytes());
    bytes
}

/// The bytes of a write of `len` bytes at `offset` by `origin`.
pub(crate) fn fill(origin: Origin, offset: u64, len: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(len);
    let end = offset + len as u64;
    let mut at = offset / RECORD * RECORD;
    while at < end {
        let bytes = record(origin, at);
        let from = offset.saturating_sub(at) as usize;
        let to = ((end - at) as usize).min(RECORD as usize);
        data.extend_from_slice(&bytes[from..to]);
        at += RECORD;
    }
    data
}

/// What one whole record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A record of this origin at its own place.
    Placed(Origin),
    /// A record of this origin made for the place this many bytes away.
    Moved(Origin, i64),
    Zeros,
    /// A write's edge, or bytes of no record.
    Other,
}

fn classify(bytes: &[u8], at: u64) -> Kind {
    if bytes.iter().all(|&b| b == 0) {
        return Kind::Zeros;
    }
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    if crc32c::crc32c(&bytes[0..12]) ^ CHECK_SALT != word(12) {
        return Kind::Other;
    }
    let origin = Origin {
        file: word(0),
        generation: word(4),
    };
    let place = u64::from(word(8)) * RECORD;
    if place == at {
        Kind::Placed(origin)
    } else {
        Kind::Moved(origin, place as i64 - at as i64)
    }
}

/// The runs of record kinds in `bytes`, which start at file offset
/// `offset`, as text: `[0, 1472) f0:274 g12; [1472, 65536) zeros`. Only
/// whole records count; at most `runs_max` runs are listed.
pub(crate) fn describe(bytes: &[u8], offset: u64, runs_max: usize) -> String {
    let mut runs: Vec<(u64, u64, Kind)> = Vec::new();
    let end = offset + bytes.len() as u64;
    let mut at = offset.div_ceil(RECORD) * RECORD;
    while at + RECORD <= end {
        let from = (at - offset) as usize;
        let kind = classify(&bytes[from..from + RECORD as usize], at);
        // Moved records continue a run when they moved by the same amount.
        match runs.last_mut() {
            Some(last) if last.1 == at && last.2 == kind => last.1 = at + RECORD,
            _ => runs.push((at, at + RECORD, kind)),
        }
        at += RECORD;
    }
    let mut text = String::new();
    for (i, (from, to, kind)) in runs.iter().enumerate() {
        if i == runs_max {
            let _ = write!(text, "; ... {} more runs", runs.len() - runs_max);
            break;
        }
        if i > 0 {
            text.push_str("; ");
        }
        let _ = write!(text, "[{from}, {to}) ");
        let _ = match kind {
            Kind::Placed(o) => write!(text, "{}", name(*o)),
            Kind::Moved(o, delta) => write!(
                text,
                "{} made for offset {}",
                name(*o),
                *from as i64 + delta
            ),
            Kind::Zeros => write!(text, "zeros"),
            Kind::Other => write!(text, "other"),
        };
    }
    if runs.is_empty() {
        text.push_str("no whole record");
    }
    text
}

/// `t0:f274 g12`: task, file number, generation.
fn name(origin: Origin) -> String {
    format!(
        "t{}:f{} g{}",
        origin.file >> 24,
        origin.file & 0x00ff_ffff,
        origin.generation
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_describe_themselves_and_what_lies_between() {
        let a = Origin {
            file: 7,
            generation: 1,
        };
        let b = Origin {
            file: (1 << 24) | 9,
            generation: 5,
        };
        let mut file = fill(a, 0, 256);
        // A write at an offset inside a record: the record it cuts is mixed.
        let over = fill(b, 100, 60);
        file[100..160].copy_from_slice(&over);
        file.extend(std::iter::repeat_n(0, 64));
        assert_eq!(
            describe(&file, 0, 10),
            "[0, 96) t0:f7 g1; [96, 112) other; [112, 160) t1:f9 g5; \
             [160, 256) t0:f7 g1; [256, 320) zeros"
        );
        // Bytes that start at file offset 64, and the same bytes placed at
        // offset 0 (as a chunk holding another chunk's bytes would).
        let at_64 = fill(a, 64, 64);
        assert_eq!(describe(&at_64, 64, 10), "[64, 128) t0:f7 g1");
        assert_eq!(
            describe(&at_64, 0, 10),
            "[0, 64) t0:f7 g1 made for offset 64"
        );
        assert_eq!(describe(&at_64[1..], 65, 10), "[80, 128) t0:f7 g1");
        assert_eq!(
            describe(&file, 0, 2),
            "[0, 96) t0:f7 g1; [96, 112) other; ... 3 more runs"
        );
        assert_eq!(describe(&[1, 2, 3], 0, 10), "no whole record");
    }

    #[test]
    fn a_fill_is_the_slice_of_a_longer_one() {
        let origin = Origin {
            file: 3,
            generation: 2,
        };
        let whole = fill(origin, 0, 1000);
        for (offset, len) in [(0, 1), (5, 11), (15, 2), (16, 16), (333, 400)] {
            assert_eq!(
                fill(origin, offset, len),
                whole[offset as usize..offset as usize + len]
            );
        }
    }
}
