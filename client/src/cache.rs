//! The block cache: bytes of chunks that random reads fetched, kept with
//! the stamp of the chunk version they are of ([`ChunkStamp`]), and served
//! again only after a replica has confirmed that version is still the
//! committed one.
//!
//! A read whose range the cache holds asks its replica with
//! `if_changed_from` set to the stamp. A replica that still has that
//! version committed (and nothing pending) answers `unchanged` without
//! reading its device or sending bytes, and the cached bytes are the
//! answer; otherwise it sends the range as any read, and the cache takes
//! the new version's bytes in place of the old. The cache therefore never
//! answers with bytes a read without it would not have returned: every hit
//! is checked against the chain in the same round trip, whoever wrote the
//! chunk meanwhile (another client, a truncate). What a hit saves is the
//! replica's device read and the bytes on the wire, not the round trip.
//!
//! Pages are 4 KiB of a chunk, kept only when a read covered them whole
//! (or up to the chunk's end), copied out of the reply (one copy a read)
//! so that a cached page never holds a receive buffer alive. The cache is bounded by
//! bytes and evicts whole chunks, least recently used first.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use flyfs_proto::ids::ChunkId;
use flyfs_proto::wire::storage::ChunkStamp;
use parking_lot::Mutex;

/// The unit of the cache within a chunk.
pub const PAGE: u32 = 4096;

/// What each cached page costs beyond its bytes (map entries), counted
/// against the capacity.
const PAGE_OVERHEAD: u64 = 64;

/// Hits, misses and stale entries since the cache was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCacheStats {
    /// Reads answered from the cache after a replica confirmed the version.
    pub hits: u64,
    /// Reads the cache did not hold.
    pub misses: u64,
    /// Reads the cache held, of a version no longer committed: the replica
    /// sent the bytes, which replaced the cached ones.
    pub stale: u64,
    /// Bytes held now (with the per-page overhead).
    pub bytes: u64,
}

/// See the module's documentation. Shared by every file of one client.
#[derive(Debug)]
pub struct BlockCache {
    capacity: u64,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    chunks: HashMap<ChunkId, Entry>,
    /// Each chunk by the tick of its last use: the first is evicted first.
    by_use: BTreeMap<u64, ChunkId>,
    tick: u64,
    bytes: u64,
}

#[derive(Debug)]
struct Entry {
    stamp: ChunkStamp,
    /// Page index to the page's bytes: `PAGE` of them, fewer only for the
    /// page the chunk ends in.
    pages: BTreeMap<u32, Bytes>,
    used: u64,
    bytes: u64,
}

/// The pages of `stamp`'s chunk that `offset..offset + len` touches, and
/// the end of the bytes a read of it returns (clamped to the chunk).
fn span(stamp: &ChunkStamp, offset: u32, len: u32) -> (std::ops::Range<u32>, u32) {
    let end = offset.saturating_add(len).min(stamp.len);
    if offset >= end {
        return (0..0, offset);
    }
    (offset / PAGE..end.div_ceil(PAGE), end)
}

impl BlockCache {
    /// A cache of at most `capacity` bytes; 0 keeps nothing.
    pub fn new(capacity: u64) -> BlockCache {
        BlockCache {
            capacity,
            inner: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stale: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn stats(&self) -> BlockCacheStats {
        BlockCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
            bytes: self.inner.lock().bytes,
        }
    }

    /// The bytes a read of `offset..offset + len` of `chunk` would return,
    /// if every page of it is held, with the stamp of their version: to be
    /// returned only once a replica confirms that version
    /// ([`confirmed`](Self::confirmed)). A miss is counted here.
    pub fn lookup(&self, chunk: ChunkId, offset: u32, len: u32) -> Option<(ChunkStamp, Bytes)> {
        if !self.enabled() {
            return None;
        }
        let found = self.assemble(chunk, offset, len);
        if found.is_none() {
            self.misses.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("flyfs_client_block_cache_misses_total").increment(1);
        }
        found
    }

    fn assemble(&self, chunk: ChunkId, offset: u32, len: u32) -> Option<(ChunkStamp, Bytes)> {
        let mut inner = self.inner.lock();
        let entry = inner.chunks.get(&chunk)?;
        let stamp = entry.stamp;
        let (pages, end) = span(&stamp, offset, len);
        let data = if pages.is_empty() {
            Bytes::new()
        } else if pages.len() == 1 {
            let page = entry.pages.get(&pages.start)?;
            let at = pages.start * PAGE;
            let to = ((end - at) as usize).min(page.len());
            page.slice(((offset - at) as usize).min(to)..to)
        } else {
            let mut out = BytesMut::with_capacity((end - offset) as usize);
            for index in pages {
                let page = entry.pages.get(&index)?;
                let at = index * PAGE;
                let from = offset.saturating_sub(at) as usize;
                let to = (end - at).min(page.len() as u32) as usize;
                out.extend_from_slice(&page[from..to]);
            }
            out.freeze()
        };
        if data.len() != (end - offset) as usize {
            return None;
        }
        inner.touch(chunk);
        Some((stamp, data))
    }

    /// A replica answered the read [`lookup`](Self::lookup) found as
    /// unchanged: counts the hit.
    pub fn confirmed(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("flyfs_client_block_cache_hits_total").increment(1);
    }

    /// A replica answered the read [`lookup`](Self::lookup) found with
    /// bytes: the version held is no longer the committed one.
    pub fn changed(&self) {
        self.stale.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("flyfs_client_block_cache_stale_total").increment(1);
    }

    /// A read of `offset..` of `chunk` returned `data` of the version
    /// `stamp` names: keeps the pages it covers whole, in place of any of
    /// another version.
    pub fn insert(&self, chunk: ChunkId, offset: u32, data: &[u8], stamp: ChunkStamp) {
        if !self.enabled() {
            return;
        }
        let (_, end) = span(&stamp, offset, data.len() as u32);
        if end - offset != data.len() as u32 {
            // A reply that disagrees with its own stamp: keep nothing.
            return;
        }
        // The pages the read covers whole (the one the chunk ends in, up to
        // its end), copied at once, outside the lock; each page is a slice
        // of the copy, and they leave together (a chunk is evicted whole).
        let first = offset.div_ceil(PAGE);
        let last = if end == stamp.len {
            end.div_ceil(PAGE)
        } else {
            end / PAGE
        };
        if first >= last {
            return;
        }
        let from = first * PAGE;
        let copy = Bytes::copy_from_slice(
            &data[(from - offset) as usize..((last * PAGE).min(end) - offset) as usize],
        );
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        if inner.chunks.get(&chunk).is_some_and(|e| e.stamp != stamp) {
            inner.remove(chunk);
        }
        let tick = inner.next_tick();
        let entry = inner.chunks.entry(chunk).or_insert_with(|| Entry {
            stamp,
            pages: BTreeMap::new(),
            used: tick,
            bytes: 0,
        });
        let mut kept = 0;
        for index in first..last {
            if let std::collections::btree_map::Entry::Vacant(slot) = entry.pages.entry(index) {
                let at = (index * PAGE - from) as usize;
                slot.insert(copy.slice(at..(at + PAGE as usize).min(copy.len())));
                kept += 1;
            }
        }
        // The copy lives as long as any page of it, so it counts whole.
        let added = if kept > 0 {
            copy.len() as u64 + kept * PAGE_OVERHEAD
        } else {
            0
        };
        entry.bytes += added;
        inner.bytes += added;
        if entry.pages.is_empty() {
            inner.remove(chunk);
        } else {
            inner.touch(chunk);
        }
        while inner.bytes > self.capacity {
            let Some((_, victim)) = inner.by_use.pop_first() else {
                break;
            };
            if let Some(entry) = inner.chunks.remove(&victim) {
                inner.bytes -= entry.bytes;
            }
        }
        metrics::gauge!("flyfs_client_block_cache_bytes").set(inner.bytes as f64);
    }
}

impl Inner {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks `chunk` used now.
    fn touch(&mut self, chunk: ChunkId) {
        let tick = self.next_tick();
        if let Some(entry) = self.chunks.get_mut(&chunk) {
            self.by_use.remove(&entry.used);
            entry.used = tick;
            self.by_use.insert(tick, chunk);
        }
    }

    fn remove(&mut self, chunk: ChunkId) {
        if let Some(entry) = self.chunks.remove(&chunk) {
            self.by_use.remove(&entry.used);
            self.bytes -= entry.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use flyfs_proto::ids::ChunkVersion;

    /// Version `v` of chunk `c`: `len` bytes that differ by chunk and
    /// version.
    fn content(c: u32, v: u32, len: u32) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(31) ^ (c << 3) ^ (v << 5)) as u8)
            .collect()
    }

    fn stamp(v: u32, len: u32) -> ChunkStamp {
        ChunkStamp {
            version: ChunkVersion(v),
            len,
            crc: v,
            ..ChunkStamp::default()
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A read of chunk `c` at version `v` (of `len` bytes) returned
        /// `offset..offset + n`.
        Insert {
            c: u32,
            v: u32,
            len: u32,
            offset: u32,
            n: u32,
        },
        Lookup {
            c: u32,
            offset: u32,
            n: u32,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let chunk_len = prop_oneof![Just(4 * PAGE), Just(3 * PAGE + 100), 1..(5 * PAGE)];
        prop_oneof![
            (0..4u32, 1..3u32, chunk_len, 0..(5 * PAGE), 0..(3 * PAGE)).prop_map(
                |(c, v, len, offset, n)| Op::Insert {
                    c,
                    v,
                    len,
                    offset,
                    n
                }
            ),
            (0..4u32, 0..(5 * PAGE), 0..(3 * PAGE)).prop_map(|(c, offset, n)| Op::Lookup {
                c,
                offset,
                n
            }),
        ]
    }

    proptest! {
        /// Whatever was inserted, a lookup answers exactly the bytes of the
        /// version it names, as long as a read would return them, and the
        /// cache stays within its capacity.
        #[test]
        fn lookups_answer_the_bytes_of_the_version_they_name(
            capacity in prop_oneof![Just(0u64), Just(3 * 4160), Just(1 << 20)],
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let cache = BlockCache::new(capacity);
            for op in ops {
                match op {
                    Op::Insert { c, v, len, offset, n } => {
                        let data = content(c, v, len);
                        let from = offset.min(len) as usize;
                        let to = offset.saturating_add(n).min(len) as usize;
                        let chunk = ChunkId::new(1, c);
                        cache.insert(chunk, offset, &data[from..to], stamp(v, len));
                    }
                    Op::Lookup { c, offset, n } => {
                        let chunk = ChunkId::new(1, c);
                        if let Some((s, bytes)) = cache.lookup(chunk, offset, n) {
                            let data = content(c, s.version.0, s.len);
                            let from = offset.min(s.len) as usize;
                            let to = offset.saturating_add(n).min(s.len) as usize;
                            prop_assert!(bytes[..] == data[from..to], "bytes of {c} at {offset}+{n}");
                        }
                    }
                }
                prop_assert!(cache.stats().bytes <= capacity);
            }
        }
    }

    #[test]
    fn a_whole_read_is_found_again_and_the_least_used_chunk_goes_first() {
        let page = u64::from(PAGE) + PAGE_OVERHEAD;
        let cache = BlockCache::new(3 * page);
        let chunk = |c| ChunkId::new(7, c);
        let data = content(0, 1, 2 * PAGE);
        cache.insert(chunk(0), 0, &data, stamp(1, 2 * PAGE));
        assert_eq!(cache.stats().bytes, 2 * page);
        assert_eq!(
            cache.lookup(chunk(0), 100, 5000).expect("held").1[..],
            data[100..5100]
        );
        // A read not covering a page whole keeps nothing of it.
        cache.insert(chunk(1), 1, &content(1, 1, PAGE)[1..], stamp(1, PAGE));
        assert_eq!(cache.stats().bytes, 2 * page);
        // The chunk's last page, shorter than a page, is kept.
        let short = content(2, 1, 100);
        cache.insert(chunk(2), 0, &short, stamp(1, 100));
        assert_eq!(
            cache.lookup(chunk(2), 0, 4096).expect("held").1[..],
            short[..]
        );
        // One more page is over the capacity: chunk 0, the least used, goes.
        cache.insert(chunk(3), 0, &content(3, 1, PAGE), stamp(1, PAGE));
        assert!(cache.lookup(chunk(0), 0, 10).is_none());
        assert!(cache.lookup(chunk(2), 0, 10).is_some());
        assert!(cache.lookup(chunk(3), 0, 10).is_some());
        // Another version replaces the chunk's pages.
        cache.insert(
            chunk(3),
            PAGE,
            &content(3, 2, 2 * PAGE)[PAGE as usize..],
            stamp(2, 2 * PAGE),
        );
        assert!(cache.lookup(chunk(3), 0, 10).is_none());
        assert_eq!(
            cache.lookup(chunk(3), PAGE, 10).expect("held").0,
            stamp(2, 2 * PAGE)
        );
    }
}
