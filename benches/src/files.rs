//! Deterministic file content and the checked file operations the workloads
//! share.
//!
//! A file's content is a stream named by a 64-bit key: the 8-byte word at
//! index `w` (bytes `8w..8w+8`, little endian) is the `w`-th output of
//! SplitMix64 seeded with the key. Any byte range can be produced or checked
//! on its own, without the bytes before it, at a few gigabytes per second, so
//! a reader verifies every byte it reads without slowing the workload down
//! much and without a copy of the expected data.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The size of the reads and writes of the data workloads, and the largest
/// buffer a worker needs for them.
pub const MIB: usize = 1 << 20;

/// SplitMix64's increment (2^64 divided by the golden ratio).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijection on `u64` that mixes well.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The content word at word index `index` of the stream `key`.
fn word(key: u64, index: u64) -> u64 {
    mix(key.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// The key of the content of a file named by two numbers, such as a seed and
/// a file index.
pub fn key(a: u64, b: u64) -> u64 {
    mix(mix(a).wrapping_add(GOLDEN) ^ b)
}

/// The key of the content of a file named by its name (FNV-1a of the name,
/// mixed).
pub fn key_of_name(name: &str) -> u64 {
    let hash = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    });
    mix(hash)
}

/// Fills `buf` with the bytes of stream `key` that start at byte `offset` of
/// the file.
pub fn fill(buf: &mut [u8], key: u64, offset: u64) {
    let len = buf.len();
    let head = head_len(offset, len);
    let (first, rest) = buf.split_at_mut(head);
    for (i, byte) in first.iter_mut().enumerate() {
        *byte = byte_at(key, offset + i as u64);
    }
    let start = (offset + head as u64) / 8;
    let (words, tail) = rest.as_chunks_mut::<8>();
    for (i, chunk) in words.iter_mut().enumerate() {
        *chunk = word(key, start + i as u64).to_le_bytes();
    }
    let tail_offset = offset + (len - tail.len()) as u64;
    for (i, byte) in tail.iter_mut().enumerate() {
        *byte = byte_at(key, tail_offset + i as u64);
    }
}

/// Where `buf`, read from byte `offset` of a file, first differs from stream
/// `key`: the file offset of the first wrong byte, if any.
pub fn first_mismatch(buf: &[u8], key: u64, offset: u64) -> Option<u64> {
    let head = head_len(offset, buf.len());
    let (first, rest) = buf.split_at(head);
    if let Some(at) = mismatch_bytewise(first, key, offset) {
        return Some(at);
    }
    let body_offset = offset + head as u64;
    let start = body_offset / 8;
    let (words, tail) = rest.as_chunks::<8>();
    for (i, chunk) in words.iter().enumerate() {
        if u64::from_le_bytes(*chunk) != word(key, start + i as u64) {
            return mismatch_bytewise(chunk, key, body_offset + 8 * i as u64);
        }
    }
    mismatch_bytewise(tail, key, offset + (buf.len() - tail.len()) as u64)
}

/// The granularity of [`stamp_pages`].
pub const PAGE: usize = 4096;

/// Marks `buf`, about to be written at byte `offset` of a file, as that part
/// of the file: the first 8 bytes of every 4 KiB page of the file in `buf`
/// become a word of stream `key`, a different word for every page. Stamps
/// are clipped to the buffer, so stamping the pieces of a file one by one
/// gives the same bytes as stamping it whole.
///
/// A writer that fills a buffer once and stamps it before each write sends
/// distinct, deterministic, incompressible data for the price of one word per
/// page, where filling the whole buffer would cost a word per 8 bytes.
pub fn stamp_pages(buf: &mut [u8], key: u64, offset: u64) {
    let end = offset + buf.len() as u64;
    let mut page = offset / PAGE as u64;
    while page * (PAGE as u64) < end {
        // The stamp's bytes [start, start + 8) of the file, clipped to buf.
        let start = page * PAGE as u64;
        let (from, to) = (start.max(offset), (start + 8).min(end));
        if from < to {
            let stamp = word(key, page).to_le_bytes();
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&stamp[(from - start) as usize..(to - start) as usize]);
        }
        page += 1;
    }
}

/// How many bytes of a buffer of `len` bytes at file offset `offset` come
/// before the first 8-byte boundary of the file.
fn head_len(offset: u64, len: usize) -> usize {
    (((8 - offset % 8) % 8) as usize).min(len)
}

fn byte_at(key: u64, offset: u64) -> u8 {
    (word(key, offset / 8) >> (8 * (offset % 8))) as u8
}

fn mismatch_bytewise(buf: &[u8], key: u64, offset: u64) -> Option<u64> {
    (0..buf.len() as u64)
        .find(|&i| buf[i as usize] != byte_at(key, offset + i))
        .map(|i| offset + i)
}

/// Writes the first `size` bytes of stream `key` to `file` at its current
/// position, in writes of at most `buf.len()` bytes generated into `buf`.
pub fn write_content(file: &mut File, key: u64, size: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(buf.len() as u64) as usize;
        fill(&mut buf[..n], key, offset);
        file.write_all(&buf[..n])?;
        offset += n as u64;
    }
    Ok(())
}

/// Reads `file` from its current position to its end in reads of
/// `buf.len()` bytes and checks that it holds exactly the first `size` bytes
/// of stream `key`. Returns the number of bytes read.
///
/// The errors say what was wrong (short, long, which byte differs) but not
/// which file: the caller adds that.
pub fn read_verify(file: &mut File, key: u64, size: u64, buf: &mut [u8]) -> Result<u64> {
    // A read of zero bytes says nothing about the end of the file.
    debug_assert!(!buf.is_empty(), "read_verify needs a buffer");
    let mut offset = 0u64;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => bail!("read at byte {offset} failed: {e}"),
        };
        if offset + n as u64 > size {
            bail!(
                "the file is longer than the expected {size} bytes (read {} bytes)",
                offset + n as u64
            );
        }
        if let Some(at) = first_mismatch(&buf[..n], key, offset) {
            bail!("wrong content: byte {at} differs from what was written");
        }
        offset += n as u64;
    }
    if offset < size {
        bail!("short file: it ended after {offset} bytes, expected {size}");
    }
    Ok(offset)
}

/// Creates the directory `name` inside `dir`, where a workload keeps its
/// files. `dir` must be an existing directory; `dir/name` must not exist: a
/// directory left by an earlier run is refused, not reused or emptied.
pub fn create_work_dir(dir: &Path, name: &str) -> Result<PathBuf> {
    let meta = fs::metadata(dir).with_context(|| format!("cannot use {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let root = dir.join(name);
    match fs::create_dir(&root) {
        Ok(()) => Ok(root),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => bail!(
            "{} already exists, probably left by an earlier run; remove it and start again",
            root.display()
        ),
        Err(e) => Err(e).with_context(|| format!("creating {}", root.display())),
    }
}

/// Closes `file` and reports the error of close(2), which `File`'s drop
/// ignores: network and FUSE file systems report failed writes there.
pub fn close(file: File) -> io::Result<()> {
    match nix::unistd::close(file) {
        Ok(()) => Ok(()),
        // On Linux the descriptor is released even when close is interrupted.
        Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(errno) => Err(io::Error::from(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_range_matches_the_whole_stream() {
        let key = key(1, 2);
        let mut whole = vec![0u8; 100];
        fill(&mut whole, key, 0);
        for start in 0..40 {
            for len in 0..40 {
                let mut part = vec![0u8; len];
                fill(&mut part, key, start as u64);
                assert_eq!(part, whole[start..start + len], "{start}+{len}");
                assert_eq!(first_mismatch(&part, key, start as u64), None);
            }
        }
    }

    #[test]
    fn finds_the_first_wrong_byte() {
        let key = key_of_name("f17");
        let mut buf = vec![0u8; 77];
        fill(&mut buf, key, 5);
        for wrong in [0, 2, 3, 10, 40, 76] {
            let mut bad = buf.clone();
            bad[wrong] ^= 0x10;
            assert_eq!(first_mismatch(&bad, key, 5), Some(5 + wrong as u64));
        }
        assert_eq!(first_mismatch(&buf, key_of_name("f18"), 5), Some(5));
    }

    #[test]
    fn streams_of_different_keys_differ() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        fill(&mut a, key(1, 0), 0);
        fill(&mut b, key(1, 1), 0);
        assert_ne!(a, b);
        fill(&mut b, key(2, 0), 0);
        assert_ne!(a, b);
    }

    #[test]
    fn stamps_mark_every_page_of_the_file() {
        let key = key(3, 4);
        let mut whole = vec![0u8; 5 * PAGE];
        stamp_pages(&mut whole, key, 0);
        let stamped: Vec<usize> = (0..whole.len()).filter(|&i| whole[i] != 0).collect();
        assert!(stamped.iter().all(|i| i % PAGE < 8), "{stamped:?}");
        // Stamping in pieces at odd offsets gives the same bytes.
        let mut pieces = vec![0u8; 5 * PAGE];
        for (start, end) in [(0, 5), (5, 4100), (4100, 8195), (8195, 5 * PAGE)] {
            stamp_pages(&mut pieces[start..end], key, start as u64);
        }
        assert_eq!(pieces, whole);
        assert_ne!(whole[..8], whole[PAGE..PAGE + 8]);
    }

    #[test]
    fn verified_read_catches_short_long_and_wrong_files() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let key = key(7, 7);
        let mut buf = vec![0u8; 1000];
        let mut file = File::create(&path)?;
        write_content(&mut file, key, 2500, &mut buf)?;
        close(file)?;
        assert_eq!(
            read_verify(&mut File::open(&path)?, key, 2500, &mut buf)?,
            2500
        );
        let short = read_verify(&mut File::open(&path)?, key, 2600, &mut buf);
        assert!(format!("{:#}", short.expect_err("short")).contains("short file"));
        let long = read_verify(&mut File::open(&path)?, key, 2400, &mut buf);
        assert!(format!("{:#}", long.expect_err("long")).contains("longer"));
        let wrong = read_verify(&mut File::open(&path)?, key + 1, 2500, &mut buf);
        assert!(format!("{:#}", wrong.expect_err("wrong")).contains("byte 0"));
        Ok(())
    }
}
