//! The block-CRC region (format version 3): one CRC32C per 4096-byte block of
//! the data region, so that a partial read checks only the blocks it reads
//! instead of reading the whole version to check the chunk's CRC.
//!
//! An entry describes the *medium*, not a version: it is the CRC of the whole
//! block as the engine last wrote it (bytes past a version's end included,
//! which every write fills with zeros). So a shrink, an abort or a commit
//! changes no entry, and an entry is stale only while a write of its block is
//! in flight, or after a crash tore one. That is why a mismatch is never
//! itself corruption: the chunk's CRC stays the authority (device_io.rs falls
//! back to it), and a block entry is only a fast way to say "these bytes are
//! the ones written".
//!
//! One region block holds the entries of 1024 data blocks (4 MiB), shared by
//! neighbouring slots and chunks, so an update is a read-modify-write. Updates
//! of one region block are serialised by a striped async lock held across the
//! write, so that two writes of the same region block cannot reach the device
//! in the other order, and a bounded cache of region blocks (always equal to
//! the device, since only lock holders change either) spares most updates and
//! reads the extra device read.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use flyfs_bypass::BlockDevice;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use crate::EngineError;
use crate::device_io::DeviceIo;
use crate::format::{BLOCK, BLOCK_CRC_ENTRY_BYTES, BLOCK_CRCS_PER_BLOCK};

/// Stripes of the region-block locks: enough that writers of different
/// 4 MiB stretches of the device rarely wait on each other.
const LOCK_STRIPES: usize = 256;

/// The decoded entries of one region block.
type Entries = Box<[u32; BLOCK_CRCS_PER_BLOCK as usize]>;

/// The region's locks, cache and counters.
pub(crate) struct BlockCrcs {
    locks: Box<[tokio::sync::Mutex<()>]>,
    cache: Mutex<Cache>,
    /// Partial reads whose blocks did not all match their entries (each
    /// then checked the whole version against the chunk's CRC instead).
    mismatches: AtomicU64,
    /// Whether a mismatch was logged: the first is, the rest are counted.
    logged: AtomicBool,
}

/// Region blocks by index, evicted oldest-inserted first when more than
/// `capacity` are held.
struct Cache {
    blocks: FxHashMap<u64, Entries>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl Cache {
    fn insert(&mut self, index: u64, entries: Entries) {
        if self.blocks.insert(index, entries).is_none() {
            self.order.push_back(index);
            while self.blocks.len() > self.capacity {
                let Some(oldest) = self.order.pop_front() else {
                    break;
                };
                self.blocks.remove(&oldest);
            }
        }
    }

    fn remove(&mut self, index: u64) {
        if self.blocks.remove(&index).is_some() {
            self.order.retain(|&i| i != index);
        }
    }
}

impl BlockCrcs {
    /// `cache_blocks` region blocks are cached (4 KiB each, covering 4 MiB
    /// of data each); at least one.
    pub fn new(cache_blocks: usize) -> BlockCrcs {
        BlockCrcs {
            locks: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            cache: Mutex::new(Cache {
                blocks: FxHashMap::default(),
                order: VecDeque::new(),
                capacity: cache_blocks.max(1),
            }),
            mismatches: AtomicU64::new(0),
            logged: AtomicBool::new(false),
        }
    }

    fn lock(&self, region_block: u64) -> &tokio::sync::Mutex<()> {
        &self.locks[(region_block % LOCK_STRIPES as u64) as usize]
    }

    pub fn mismatches(&self) -> u64 {
        self.mismatches.load(Ordering::Relaxed)
    }

    /// Counts a partial read whose blocks did not match; logs the first.
    pub fn note_mismatch(&self, what: impl FnOnce() -> String) {
        self.mismatches.fetch_add(1, Ordering::Relaxed);
        if !self.logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                read = %what(),
                "block CRC mismatch: checked the whole version instead (a write racing the \
                 read, a write torn by a crash, or rot; further mismatches are only counted)"
            );
        }
    }
}

/// The CRCs of each `BLOCK` bytes of `data` (a block multiple).
pub(crate) fn crcs_of(data: &[u8]) -> Vec<u32> {
    debug_assert!(data.len().is_multiple_of(BLOCK as usize));
    data.chunks(BLOCK as usize).map(crc32c::crc32c).collect()
}

fn decode(bytes: &[u8]) -> Entries {
    let mut entries: Entries = Box::new([0; BLOCK_CRCS_PER_BLOCK as usize]);
    for (entry, raw) in entries
        .iter_mut()
        .zip(bytes.chunks_exact(BLOCK_CRC_ENTRY_BYTES as usize))
    {
        *entry = u32::from_le_bytes(raw.try_into().expect("chunks of 4 bytes"));
    }
    entries
}

impl<D: BlockDevice> DeviceIo<D> {
    /// The region blocks covering data blocks `first..first + count`, each
    /// with the range of data blocks (relative to `first`) it holds and the
    /// index of its first entry for them.
    fn region_spans(first: u64, count: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
        let end = first + count;
        (first / BLOCK_CRCS_PER_BLOCK..end.div_ceil(BLOCK_CRCS_PER_BLOCK)).map(move |region| {
            let start = first.max(region * BLOCK_CRCS_PER_BLOCK);
            let stop = end.min((region + 1) * BLOCK_CRCS_PER_BLOCK);
            (
                region,
                (start - first) as usize,
                (stop - first) as usize,
                (start - region * BLOCK_CRCS_PER_BLOCK) as usize,
            )
        })
    }

    /// The entries of region block `region`, from the cache or the device;
    /// the caller holds the region block's lock, so what it reads is what
    /// the device holds and may be cached.
    async fn region_entries_locked(&self, region: u64) -> Result<Entries, EngineError> {
        if let Some(entries) = self.block_crcs.cache.lock().blocks.get(&region) {
            return Ok(entries.clone());
        }
        let buf = self
            .read_at(
                self.sb.block_crc_block_offset(region),
                BLOCK as usize,
                || format!("block CRCs {region}"),
            )
            .await?;
        let entries = decode(&buf);
        self.block_crcs.cache.lock().insert(region, entries.clone());
        Ok(entries)
    }

    /// The recorded CRCs of the `count` data blocks from device offset
    /// `offset` (block aligned, in the data region). Only for a device with
    /// block CRCs.
    pub async fn block_crcs(&self, offset: u64, count: u64) -> Result<Vec<u32>, EngineError> {
        debug_assert!(self.sb.has_block_crcs());
        let first = self.sb.data_block_index(offset);
        let mut crcs = vec![0u32; count as usize];
        for (region, from, to, entry) in Self::region_spans(first, count) {
            let cached = self
                .block_crcs
                .cache
                .lock()
                .blocks
                .get(&region)
                .map(|entries| {
                    crcs[from..to].copy_from_slice(&entries[entry..entry + (to - from)]);
                })
                .is_some();
            if !cached {
                // Read under the lock: a read racing an update could
                // otherwise cache what the update just replaced.
                let _guard = self.block_crcs.lock(region).lock().await;
                let entries = self.region_entries_locked(region).await?;
                crcs[from..to].copy_from_slice(&entries[entry..entry + (to - from)]);
            }
        }
        Ok(crcs)
    }

    /// Records `crcs`, the CRCs of the data blocks just written from device
    /// offset `offset`. Must complete before the version they belong to is
    /// made durable, so that its journal record's flush covers them too.
    /// A failed write poisons the engine, like any failed write.
    pub async fn store_block_crcs(&self, offset: u64, crcs: &[u32]) -> Result<(), EngineError> {
        if !self.sb.has_block_crcs() || crcs.is_empty() {
            return Ok(());
        }
        let first = self.sb.data_block_index(offset);
        for (region, from, to, entry) in Self::region_spans(first, crcs.len() as u64) {
            let _guard = self.block_crcs.lock(region).lock().await;
            let mut entries = self.region_entries_locked(region).await?;
            entries[entry..entry + (to - from)].copy_from_slice(&crcs[from..to]);
            let mut buf = self.pool.alloc(BLOCK as usize);
            for (raw, crc) in buf
                .chunks_exact_mut(BLOCK_CRC_ENTRY_BYTES as usize)
                .zip(entries.iter())
            {
                raw.copy_from_slice(&crc.to_le_bytes());
            }
            let written = self
                .write_at(self.sb.block_crc_block_offset(region), buf, || {
                    format!("block CRCs {region}")
                })
                .await;
            if let Err(error) = written {
                // What the device holds is unknown now; the engine is
                // poisoned, but its readers may still use the cache.
                self.block_crcs.cache.lock().remove(region);
                return Err(error);
            }
            self.block_crcs.cache.lock().insert(region, entries);
        }
        Ok(())
    }

    /// Counts and logs a partial read whose blocks did not match.
    pub fn note_block_mismatch(&self, what: impl FnOnce() -> String) {
        self.block_crcs.note_mismatch(what);
    }

    pub fn block_crc_mismatches(&self) -> u64 {
        self.block_crcs.mismatches()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_split_at_region_blocks() {
        let spans: Vec<_> =
            DeviceIo::<flyfs_bypass::mem::MemDevice>::region_spans(1020, 10).collect();
        assert_eq!(spans, vec![(0, 0, 4, 1020), (1, 4, 10, 0)]);
        let one: Vec<_> = DeviceIo::<flyfs_bypass::mem::MemDevice>::region_spans(5, 1).collect();
        assert_eq!(one, vec![(0, 0, 1, 5)]);
    }

    #[test]
    fn the_cache_is_bounded() {
        let crcs = BlockCrcs::new(2);
        let mut cache = crcs.cache.lock();
        for i in 0..5 {
            cache.insert(i, Box::new([i as u32; BLOCK_CRCS_PER_BLOCK as usize]));
        }
        assert_eq!(cache.blocks.len(), 2);
        assert!(cache.blocks.contains_key(&3) && cache.blocks.contains_key(&4));
        cache.remove(3);
        assert_eq!(cache.order, VecDeque::from([4]));
    }
}
