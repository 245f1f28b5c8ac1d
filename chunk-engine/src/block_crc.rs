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
//! neighbouring slots and chunks, so an update is a read-modify-write of a
//! cached copy. Writes of one region block are serialised by a striped async
//! lock held across the write, so that two writes of it cannot reach the
//! device in the other order; and they are combined: a writer applies its
//! entries to the cached copy first, then takes the lock, and finds its
//! update already written by the holder before it, or writes the copy with
//! every update made so far. So many small writes to neighbouring slots
//! cost one region write per lock hand-over, not one each in a queue. The
//! cache of region blocks is bounded; a copy with updates not yet written is
//! not evicted (at most one per writer in flight).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use flyfs_bypass::BlockDevice;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
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

/// The cached copy of one region block.
struct Cached {
    entries: Entries,
    /// Sequence number of the last update applied to `entries`, and of the
    /// last one the device holds (numbers from `Cache::sequence`).
    updated: u64,
    written: u64,
}

/// Region blocks by index, evicted oldest-inserted first when more than
/// `capacity` are held, skipping copies with updates not yet written.
struct Cache {
    blocks: FxHashMap<u64, Cached>,
    order: VecDeque<u64>,
    capacity: usize,
    /// Numbers updates, over all region blocks: a copy read afresh from the
    /// device starts at the current number, so an update is never taken for
    /// written because a later copy's count passed it.
    sequence: u64,
}

impl Cache {
    /// Caches entries just read from the device (the caller holds the
    /// block's lock, so no update of it is in flight).
    fn insert_clean(&mut self, index: u64, entries: Entries) {
        let cached = Cached {
            entries,
            updated: self.sequence,
            written: self.sequence,
        };
        if self.blocks.insert(index, cached).is_none() {
            self.order.push_back(index);
            self.evict();
        }
    }

    fn evict(&mut self) {
        let mut skipped = 0;
        while self.blocks.len() > self.capacity && skipped < self.order.len() {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            match self.blocks.get(&oldest) {
                Some(cached) if cached.updated != cached.written => {
                    // Not written yet: keep it, look further.
                    self.order.push_back(oldest);
                    skipped += 1;
                }
                _ => {
                    self.blocks.remove(&oldest);
                }
            }
        }
    }

    /// Caches entries just read from the device with `crcs` applied at entry
    /// `entry` (the caller holds the block's lock); returns the update's
    /// sequence number. The copy is not evicted until written.
    fn insert_updated(
        &mut self,
        index: u64,
        mut entries: Entries,
        entry: usize,
        crcs: &[u32],
    ) -> u64 {
        self.sequence += 1;
        entries[entry..entry + crcs.len()].copy_from_slice(crcs);
        let cached = Cached {
            entries,
            updated: self.sequence,
            written: self.sequence - 1,
        };
        if self.blocks.insert(index, cached).is_none() {
            self.order.push_back(index);
        }
        self.evict();
        self.sequence
    }

    /// Applies `crcs` at entry `entry` of a cached block; returns the
    /// update's sequence number, or `None` if the block is not cached.
    fn apply(&mut self, index: u64, entry: usize, crcs: &[u32]) -> Option<u64> {
        self.sequence += 1;
        let sequence = self.sequence;
        let cached = self.blocks.get_mut(&index)?;
        cached.entries[entry..entry + crcs.len()].copy_from_slice(crcs);
        cached.updated = sequence;
        Some(sequence)
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
                sequence: 0,
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

    /// Makes sure region block `region` is cached, reading it from the
    /// device if not; the caller holds the block's lock, so no update of it
    /// is in flight and what it reads is what the device holds.
    async fn cache_region_locked(&self, region: u64) -> Result<(), EngineError> {
        if self.block_crcs.cache.lock().blocks.contains_key(&region) {
            return Ok(());
        }
        let buf = self
            .read_at(
                self.sb.block_crc_block_offset(region),
                BLOCK as usize,
                || format!("block CRCs {region}"),
            )
            .await?;
        self.block_crcs
            .cache
            .lock()
            .insert_clean(region, decode(&buf));
        Ok(())
    }

    /// Copies entries `entry..entry + out.len()` of region block `region`
    /// into `out`, if it is cached.
    fn copy_cached(&self, region: u64, entry: usize, out: &mut [u32]) -> bool {
        let cache = self.block_crcs.cache.lock();
        let Some(cached) = cache.blocks.get(&region) else {
            return false;
        };
        out.copy_from_slice(&cached.entries[entry..entry + out.len()]);
        true
    }

    /// The recorded CRCs of the `count` data blocks from device offset
    /// `offset` (block aligned, in the data region). Only for a device with
    /// block CRCs.
    pub async fn block_crcs(&self, offset: u64, count: u64) -> Result<Vec<u32>, EngineError> {
        debug_assert!(self.sb.has_block_crcs());
        let first = self.sb.data_block_index(offset);
        let mut crcs = vec![0u32; count as usize];
        for (region, from, to, entry) in Self::region_spans(first, count) {
            if !self.copy_cached(region, entry, &mut crcs[from..to]) {
                // Read under the lock: a read racing a write could otherwise
                // cache what the write just replaced.
                let _guard = self.block_crcs.lock(region).lock().await;
                self.cache_region_locked(region).await?;
                if !self.copy_cached(region, entry, &mut crcs[from..to]) {
                    // Evicted at once (every other copy held updates not yet
                    // written): read it again, uncached.
                    let buf = self
                        .read_at(
                            self.sb.block_crc_block_offset(region),
                            BLOCK as usize,
                            || format!("block CRCs {region}"),
                        )
                        .await?;
                    crcs[from..to].copy_from_slice(&decode(&buf)[entry..entry + (to - from)]);
                }
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
            let applied = self
                .block_crcs
                .cache
                .lock()
                .apply(region, entry, &crcs[from..to]);
            let guard = self.block_crcs.lock(region).lock().await;
            // The engine may have been poisoned by a failed write of this
            // block, which dropped the cached copy with this update in it.
            self.check_writable()?;
            let sequence = match applied {
                Some(sequence) => sequence,
                None => {
                    // Maybe cached since, by a lock holder before us.
                    let again = self
                        .block_crcs
                        .cache
                        .lock()
                        .apply(region, entry, &crcs[from..to]);
                    match again {
                        Some(sequence) => sequence,
                        None => {
                            // Not cached, and only lock holders cache it.
                            let buf = self
                                .read_at(
                                    self.sb.block_crc_block_offset(region),
                                    BLOCK as usize,
                                    || format!("block CRCs {region}"),
                                )
                                .await?;
                            self.block_crcs.cache.lock().insert_updated(
                                region,
                                decode(&buf),
                                entry,
                                &crcs[from..to],
                            )
                        }
                    }
                }
            };
            // A copy holding an update not yet written is neither evicted
            // nor dropped (but on a failed write, which poisons the engine:
            // checked above). So a missing copy was written, and evicted.
            let snapshot = self
                .block_crcs
                .cache
                .lock()
                .blocks
                .get(&region)
                .filter(|cached| cached.written < sequence)
                .map(|cached| (cached.entries.clone(), cached.updated));
            // Written already by the holder of the lock before us?
            let Some((entries, updated)) = snapshot else {
                continue;
            };
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
            let mut cache = self.block_crcs.cache.lock();
            if let Err(error) = written {
                // What the device holds is unknown now; the engine is
                // poisoned (refusing writes), and its readers go on without
                // this copy.
                cache.remove(region);
                return Err(error);
            }
            if let Some(cached) = cache.blocks.get_mut(&region) {
                cached.written = cached.written.max(updated);
            }
            cache.evict();
            drop(guard);
        }
        Ok(())
    }

    /// Records the CRCs of many runs of data blocks just written, `(device
    /// offset, CRCs)` each, as [`Self::store_block_crcs`] does for one, but
    /// writing each region block they touch about once: the updates of a
    /// region block go into its cached copy first, and the last one writes
    /// the copy with all of them. A checkpoint writing Patch layers into
    /// scattered blocks uses it, so that a region block's updates since the
    /// last checkpoint cost one write of it. Up to `depth` region blocks are
    /// written at once (each region's updates stay in order).
    pub async fn store_block_crc_runs(
        &self,
        runs: &[(u64, Vec<u32>)],
        depth: usize,
    ) -> Result<(), EngineError> {
        if !self.sb.has_block_crcs() {
            return Ok(());
        }
        let mut by_region: std::collections::BTreeMap<u64, Vec<(u64, &[u32])>> =
            std::collections::BTreeMap::new();
        for (offset, crcs) in runs {
            let first = self.sb.data_block_index(*offset);
            for (region, from, to, _) in Self::region_spans(first, crcs.len() as u64) {
                let at = *offset + from as u64 * BLOCK;
                by_region
                    .entry(region)
                    .or_default()
                    .push((at, &crcs[from..to]));
            }
        }
        // A loop, not a stream combinator, for the reason the checkpoint
        // gives.
        let mut storing = FuturesUnordered::new();
        for (region, updates) in by_region {
            if storing.len() >= depth.max(1)
                && let Some(done) = storing.next().await
            {
                done?;
            }
            storing.push(self.store_region_crcs(region, updates));
        }
        while let Some(done) = storing.next().await {
            done?;
        }
        Ok(())
    }

    /// The updates of one region block for [`Self::store_block_crc_runs`],
    /// in order: all but the last go into the cached copy, the last writes it.
    async fn store_region_crcs(
        &self,
        region: u64,
        updates: Vec<(u64, &[u32])>,
    ) -> Result<(), EngineError> {
        let Some(((last_at, last), earlier)) = updates.split_last() else {
            return Ok(());
        };
        for (at, crcs) in earlier {
            let entry = (self.sb.data_block_index(*at) % BLOCK_CRCS_PER_BLOCK) as usize;
            let applied = self.block_crcs.cache.lock().apply(region, entry, crcs);
            if applied.is_none() {
                // Not cached: stored (and written) the ordinary way, which
                // caches the copy for the ones after it.
                self.store_block_crcs(*at, crcs).await?;
            }
        }
        // Writes the copy with every update above in it (a copy with updates
        // not yet written is never evicted).
        self.store_block_crcs(*last_at, last).await
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
            cache.insert_clean(i, Box::new([i as u32; BLOCK_CRCS_PER_BLOCK as usize]));
        }
        assert_eq!(cache.blocks.len(), 2);
        assert!(cache.blocks.contains_key(&3) && cache.blocks.contains_key(&4));
        // A copy with an update not yet written is kept over the bound.
        let sequence = cache.apply(3, 7, &[9]).expect("cached");
        cache.insert_clean(5, Box::new([5; BLOCK_CRCS_PER_BLOCK as usize]));
        assert!(cache.blocks.contains_key(&3), "dirty copies stay");
        assert_eq!(cache.blocks.len(), 2);
        assert!(cache.blocks.contains_key(&5));
        cache.blocks.get_mut(&3).expect("cached").written = sequence;
        cache.remove(3);
        assert_eq!(cache.order, VecDeque::from([5]));
        assert!(cache.apply(3, 0, &[1]).is_none(), "not cached");
    }
}
