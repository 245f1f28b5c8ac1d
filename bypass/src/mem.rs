//! A RAM block device that models a volatile write cache.
//!
//! Reads see every completed write at once, but a write becomes durable only
//! when a later [`BlockDevice::flush`] completes. [`MemDevice::crash`] plays a
//! power cut: for every sector written since the last flush it keeps, chosen by
//! a seeded RNG, either the durable contents or one of the unflushed versions
//! (so a multi-sector write may be torn, and an older unflushed version may win
//! over a newer one, as a drive's cache may write them back in any order).
//! Sectors themselves are never torn, matching the atomic-sector assumption in
//! the `BlockDevice` contract.
//!
//! Every operation completes synchronously (the returned futures are ready), so
//! a simulation that uses this device stays deterministic.

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{BlockDevice, DeviceError, DmaBuf, Geometry, IoCompletion, IoOp};

/// An in-memory device. Clones share the same medium, so a test can keep a
/// handle to crash the device while an engine owns another.
#[derive(Clone, Debug)]
pub struct MemDevice {
    inner: Arc<MemInner>,
}

#[derive(Debug)]
struct MemInner {
    name: Arc<str>,
    geometry: Geometry,
    state: Mutex<MemState>,
}

#[derive(Debug)]
struct MemState {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a power cut.
    durable: Vec<u8>,
    /// Writes since the last flush, oldest first, as (offset, data).
    unflushed: Vec<(u64, Arc<[u8]>)>,
    stats: MemStats,
}

/// Operation counts, for tests that assert on I/O patterns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub bytes_written: u64,
    /// 4 KiB pages that crashes left holding sectors of different versions
    /// (only possible with sectors smaller than 4 KiB): the tears a format
    /// of 4 KiB blocks on a 512-byte-sector device must survive.
    pub torn_pages: u64,
}

/// The page size torn pages are counted in.
const PAGE: usize = 4096;

impl MemDevice {
    /// A zero-filled device of `capacity_bytes` (rounded down to a sector).
    pub fn new(capacity_bytes: u64, sector_size: u32) -> MemDevice {
        assert!(
            sector_size.is_power_of_two()
                && (crate::SECTOR_SIZE_MIN..=crate::SECTOR_SIZE_MAX)
                    .contains(&(sector_size as usize)),
            "sector size {sector_size} is not a power of two in 512..=4096"
        );
        let capacity_bytes = capacity_bytes - capacity_bytes % u64::from(sector_size);
        let bytes =
            usize::try_from(capacity_bytes).expect("mem device larger than the address space");
        MemDevice {
            inner: Arc::new(MemInner {
                name: format!("mem:{capacity_bytes}").into(),
                geometry: Geometry {
                    sector_size,
                    capacity_bytes,
                },
                state: Mutex::new(MemState {
                    current: vec![0; bytes],
                    durable: vec![0; bytes],
                    unflushed: Vec::new(),
                    stats: MemStats::default(),
                }),
            }),
        }
    }

    /// An independent device holding what this one holds now, durable and
    /// unflushed alike: a test can play a power cut on the copy (`crash`)
    /// while an engine goes on running on the original, for instance with
    /// I/O still held in flight.
    pub fn fork(&self) -> MemDevice {
        let state = self.inner.state.lock();
        MemDevice {
            inner: Arc::new(MemInner {
                name: self.inner.name.clone(),
                geometry: self.inner.geometry,
                state: Mutex::new(MemState {
                    current: state.current.clone(),
                    durable: state.durable.clone(),
                    unflushed: state.unflushed.clone(),
                    stats: MemStats::default(),
                }),
            }),
        }
    }

    /// Plays a power cut: each unflushed sector keeps, at random (seeded), its
    /// durable contents or one of its unflushed versions; everything not
    /// durable is then forgotten. Returns how many sectors were unflushed.
    pub fn crash(&self, seed: u64) -> usize {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let sector = self.inner.geometry.sector_size as usize;
        let mut state = self.inner.state.lock();
        // For each sector: the unflushed versions, oldest first.
        let mut versions: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
        for (write_index, (offset, data)) in state.unflushed.iter().enumerate() {
            for sector_in_write in 0..data.len() / sector {
                versions
                    .entry(*offset as usize / sector + sector_in_write)
                    .or_default()
                    .push((write_index, sector_in_write * sector));
            }
        }
        let mut sectors: Vec<_> = versions.into_iter().collect();
        sectors.sort_unstable_by_key(|(index, _)| *index); // HashMap order is not deterministic.
        let unflushed_sectors = sectors.len();
        let MemState {
            durable,
            unflushed,
            current,
            ..
        } = &mut *state;
        // Per 4 KiB page: the first version picked for one of its sectors, and
        // whether another sector of it picked differently.
        let mut pages: HashMap<usize, (Option<usize>, bool)> = HashMap::new();
        for (sector_index, candidates) in sectors {
            // 0 keeps the durable contents; k > 0 persists the k-th version.
            let pick = rng.random_range(0..=candidates.len());
            let version = pick.checked_sub(1).map(|k| candidates[k].0);
            let page = pages
                .entry(sector_index * sector / PAGE)
                .or_insert((version, false));
            page.1 |= page.0 != version;
            if pick > 0 {
                let (write_index, at) = candidates[pick - 1];
                let start = sector_index * sector;
                durable[start..start + sector]
                    .copy_from_slice(&unflushed[write_index].1[at..at + sector]);
            }
        }
        unflushed.clear();
        current.copy_from_slice(durable);
        state.stats.torn_pages += pages.values().filter(|(_, torn)| *torn).count() as u64;
        unflushed_sectors
    }

    /// A copy of what reads currently see, for assertions.
    pub fn snapshot(&self) -> Vec<u8> {
        self.inner.state.lock().current.clone()
    }

    /// Overwrites bytes directly, durably, bypassing the I/O path: for tests
    /// that corrupt the medium.
    pub fn poke(&self, offset: u64, data: &[u8]) {
        let mut state = self.inner.state.lock();
        let range = offset as usize..offset as usize + data.len();
        state.current[range.clone()].copy_from_slice(data);
        state.durable[range].copy_from_slice(data);
    }

    pub fn stats(&self) -> MemStats {
        self.inner.state.lock().stats
    }

    fn check(&self, op: IoOp, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        self.inner
            .geometry
            .check(op, offset, buf.len() as u64, buf.window_ptr() as usize)
    }
}

// The futures are `Ready` on purpose: callers that know the concrete type (a
// simulation) may rely on every operation completing at once.
#[allow(refining_impl_trait)]
impl BlockDevice for MemDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry
    }

    fn name(&self) -> &str {
        &self.inner.name
    }

    fn read(&self, offset: u64, mut buf: DmaBuf) -> Ready<IoCompletion> {
        let result = self.check(IoOp::Read, offset, &buf).map(|()| {
            let mut state = self.inner.state.lock();
            state.stats.reads += 1;
            let range = offset as usize..offset as usize + buf.len();
            buf.copy_from_slice(&state.current[range]);
        });
        ready(IoCompletion { buf, result })
    }

    fn write(&self, offset: u64, buf: DmaBuf) -> Ready<IoCompletion> {
        let result = self.check(IoOp::Write, offset, &buf).map(|()| {
            let mut state = self.inner.state.lock();
            state.stats.writes += 1;
            state.stats.bytes_written += buf.len() as u64;
            let start = offset as usize;
            state.current[start..start + buf.len()].copy_from_slice(&buf);
            state.unflushed.push((offset, Arc::from(&buf[..])));
        });
        ready(IoCompletion { buf, result })
    }

    fn flush(&self) -> Ready<Result<(), DeviceError>> {
        let mut state = self.inner.state.lock();
        state.stats.flushes += 1;
        let MemState {
            durable, unflushed, ..
        } = &mut *state;
        for (offset, data) in unflushed.drain(..) {
            durable[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        ready(Ok(()))
    }

    fn discard(&self, offset: u64, len: u64) -> Ready<Result<(), DeviceError>> {
        let geometry = self.inner.geometry;
        let result = geometry.check(IoOp::Discard, offset, len, 0).map(|()| {
            // Discarded data reads as zeros at once; like a write, that is
            // durable only after a flush.
            let zeros: Arc<[u8]> = vec![0u8; len as usize].into();
            let mut state = self.inner.state.lock();
            state.stats.discards += 1;
            state.current[offset as usize..(offset + len) as usize].fill(0);
            state.unflushed.push((offset, zeros));
        });
        ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_on;

    #[test]
    fn writes_are_visible_at_once_and_durable_after_flush() {
        let dev = MemDevice::new(1 << 20, 4096);
        block_on(async {
            dev.write(4096, DmaBuf::copy_from(&[7u8; 4096]))
                .await
                .into_result()
                .expect("write");
            let buf = dev
                .read(4096, DmaBuf::alloc_zeroed(4096))
                .await
                .into_result()
                .expect("read");
            assert!(buf.iter().all(|&b| b == 7));
            dev.flush().await.expect("flush");
            dev.write(8192, DmaBuf::copy_from(&[9u8; 4096]))
                .await
                .into_result()
                .expect("write");
        });
        assert_eq!(dev.crash(1), 1);
        let image = dev.snapshot();
        assert!(
            image[4096..8192].iter().all(|&b| b == 7),
            "flushed write lost"
        );
        let survived = image[8192..12288].iter().all(|&b| b == 9);
        let dropped = image[8192..12288].iter().all(|&b| b == 0);
        assert!(survived || dropped, "a sector was torn");
    }

    #[test]
    fn crashes_tear_multi_sector_writes_deterministically() {
        let run = |seed| {
            let dev = MemDevice::new(1 << 20, 512);
            block_on(dev.write(0, DmaBuf::copy_from(&[1u8; 64 * 512])))
                .into_result()
                .expect("write");
            dev.crash(seed);
            dev.snapshot()[..64 * 512]
                .chunks(512)
                .map(|s| s[0])
                .collect::<Vec<u8>>()
        };
        assert_eq!(run(42), run(42), "same seed, different image");
        let image = run(42);
        assert!(
            image.contains(&0) && image.contains(&1),
            "64 sectors should tear: {image:?}"
        );
    }

    #[test]
    fn torn_pages_are_counted() {
        let torn = |sector_size| {
            let dev = MemDevice::new(1 << 20, sector_size);
            for seed in 0..8 {
                block_on(dev.write(0, DmaBuf::copy_from(&[seed as u8 + 1; 16 * 4096])))
                    .into_result()
                    .expect("write");
                dev.crash(seed);
            }
            dev.stats().torn_pages
        };
        assert_eq!(torn(4096), 0, "whole-page sectors cannot tear a page");
        assert!(torn(512) > 0, "128 crashed pages of 8 sectors never tore");
    }

    #[test]
    fn misaligned_and_out_of_range_io_is_refused() {
        let dev = MemDevice::new(1 << 20, 4096);
        let done = block_on(dev.write(100, DmaBuf::alloc_zeroed(4096)));
        assert!(matches!(done.result, Err(DeviceError::Misaligned { .. })));
        let done = block_on(dev.read(1 << 20, DmaBuf::alloc_zeroed(4096)));
        assert!(matches!(done.result, Err(DeviceError::OutOfRange { .. })));
    }
}
