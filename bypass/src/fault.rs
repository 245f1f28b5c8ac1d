//! Seeded, deterministic fault injection around any [`BlockDevice`].
//!
//! Faults are rules added at run time. I/Os are numbered from 0 in the order
//! they are issued through this wrapper (flushes and discards included), so a
//! test that issues the same operations sees the same faults.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{BlockDevice, DeviceError, DmaBuf, Geometry, IoCompletion, IoOp};

/// One fault rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The I/O numbered `n` fails with EIO (optionally only if it is `op`).
    FailNth { n: u64, op: Option<IoOp> },
    /// Every I/O from number `n` on fails and never reaches the device: a
    /// power cut (pair it with `MemDevice::crash`).
    PowerCutAt { n: u64 },
    /// The power is cut at the write numbered `n` (writes are numbered apart
    /// from other I/Os, see [`FaultyDevice::write_count`]): it and every later
    /// I/O fail. Aims a cut at a phase's writes when its reads vary in number
    /// (recovery: superblock repair, checkpoints, journal reset).
    PowerCutAtWrite { n: u64 },
    /// Every `op` (any, if `None`) touching `range` of the device fails with EIO.
    EioRange { range: Range<u64>, op: Option<IoOp> },
    /// Every read touching `range` has one random bit flipped in the bytes it
    /// returns from that range (the medium is not changed).
    CorruptReads { range: Range<u64> },
}

/// A device wrapper that injects [`Fault`]s.
#[derive(Clone, Debug)]
pub struct FaultyDevice<D> {
    inner: D,
    shared: Arc<FaultShared>,
}

#[derive(Debug)]
struct FaultShared {
    next_io: AtomicU64,
    next_write: AtomicU64,
    rules: Mutex<Vec<Fault>>,
    rng: Mutex<ChaCha8Rng>,
    injected: AtomicU64,
    flush_yields: std::sync::atomic::AtomicBool,
}

enum Verdict {
    Pass,
    Fail,
    Corrupt(Range<u64>),
}

impl<D: BlockDevice> FaultyDevice<D> {
    pub fn new(inner: D, seed: u64) -> FaultyDevice<D> {
        FaultyDevice {
            inner,
            shared: Arc::new(FaultShared {
                next_io: AtomicU64::new(0),
                next_write: AtomicU64::new(0),
                rules: Mutex::new(Vec::new()),
                rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
                injected: AtomicU64::new(0),
                flush_yields: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    pub fn inject(&self, fault: Fault) {
        self.shared.rules.lock().push(fault);
    }

    pub fn clear(&self) {
        self.shared.rules.lock().clear();
    }

    /// How many I/Os have been issued through the wrapper.
    pub fn io_count(&self) -> u64 {
        self.shared.next_io.load(Ordering::SeqCst)
    }

    /// How many writes have been issued through the wrapper.
    pub fn write_count(&self) -> u64 {
        self.shared.next_write.load(Ordering::SeqCst)
    }

    /// How many I/Os a rule has failed or corrupted.
    pub fn injected(&self) -> u64 {
        self.shared.injected.load(Ordering::SeqCst)
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Makes every flush first yield once to its executor, before the rules
    /// judge it: a flush of an in-memory device otherwise completes on its
    /// first poll, and a flush that takes time, as a real device's does, is
    /// what lets a journal write its next batch while this one's flush is
    /// outstanding, so that a power cut finds both unflushed.
    pub fn set_flush_yields(&self, on: bool) {
        self.shared.flush_yields.store(on, Ordering::SeqCst);
    }

    fn judge(&self, op: IoOp, range: Range<u64>) -> Verdict {
        let n = self.shared.next_io.fetch_add(1, Ordering::SeqCst);
        let write =
            (op == IoOp::Write).then(|| self.shared.next_write.fetch_add(1, Ordering::SeqCst));
        let overlaps = |r: &Range<u64>| r.start < range.end && range.start < r.end;
        let op_matches = |want: &Option<IoOp>| want.is_none_or(|want| want == op);
        let mut rules = self.shared.rules.lock();
        // A cut aimed at a write becomes a plain cut once that write comes.
        for rule in rules.iter_mut() {
            if let Fault::PowerCutAtWrite { n: at } = *rule
                && write.is_some_and(|w| w >= at)
            {
                *rule = Fault::PowerCutAt { n };
            }
        }
        let verdict = rules.iter().find_map(|rule| match rule {
            Fault::FailNth { n: at, op: want } if *at == n && op_matches(want) => {
                Some(Verdict::Fail)
            }
            Fault::PowerCutAt { n: at } if n >= *at => Some(Verdict::Fail),
            Fault::EioRange { range: r, op: want } if overlaps(r) && op_matches(want) => {
                Some(Verdict::Fail)
            }
            Fault::CorruptReads { range: r } if op == IoOp::Read && overlaps(r) => Some(
                Verdict::Corrupt(r.start.max(range.start)..r.end.min(range.end)),
            ),
            _ => None,
        });
        drop(rules);
        match verdict {
            Some(verdict) => {
                self.shared.injected.fetch_add(1, Ordering::SeqCst);
                verdict
            }
            None => Verdict::Pass,
        }
    }

    fn error(&self, op: IoOp, offset: u64, len: u64) -> DeviceError {
        DeviceError::Io {
            device: Arc::from(self.inner.name()),
            op,
            offset,
            len,
            source: std::io::Error::from_raw_os_error(libc::EIO),
        }
    }
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn failure(&self) -> Option<Arc<str>> {
        self.inner.failure()
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn read(&self, offset: u64, buf: DmaBuf) -> IoCompletion {
        let len = buf.len() as u64;
        match self.judge(IoOp::Read, offset..offset + len) {
            Verdict::Fail => IoCompletion {
                buf,
                result: Err(self.error(IoOp::Read, offset, len)),
            },
            Verdict::Pass => self.inner.read(offset, buf).await,
            Verdict::Corrupt(bad) => {
                let mut done = self.inner.read(offset, buf).await;
                if done.result.is_ok() {
                    let bit = self
                        .shared
                        .rng
                        .lock()
                        .random_range(0..(bad.end - bad.start) * 8);
                    let byte = (bad.start - offset + bit / 8) as usize;
                    done.buf[byte] ^= 1 << (bit % 8);
                }
                done
            }
        }
    }

    async fn write(&self, offset: u64, buf: DmaBuf) -> IoCompletion {
        let len = buf.len() as u64;
        match self.judge(IoOp::Write, offset..offset + len) {
            Verdict::Pass | Verdict::Corrupt(_) => self.inner.write(offset, buf).await,
            Verdict::Fail => IoCompletion {
                buf,
                result: Err(self.error(IoOp::Write, offset, len)),
            },
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        if self.shared.flush_yields.load(Ordering::SeqCst) {
            let mut yielded = false;
            std::future::poll_fn(|cx| {
                if yielded {
                    return std::task::Poll::Ready(());
                }
                yielded = true;
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            })
            .await;
        }
        match self.judge(IoOp::Flush, 0..u64::MAX) {
            Verdict::Pass | Verdict::Corrupt(_) => self.inner.flush().await,
            Verdict::Fail => Err(self.error(IoOp::Flush, 0, 0)),
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match self.judge(IoOp::Discard, offset..offset + len) {
            Verdict::Pass | Verdict::Corrupt(_) => self.inner.discard(offset, len).await,
            Verdict::Fail => Err(self.error(IoOp::Discard, offset, len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_on;
    use crate::mem::MemDevice;

    #[test]
    fn rules_fire_where_and_when_asked() {
        let dev = FaultyDevice::new(MemDevice::new(1 << 20, 4096), 7);
        dev.inject(Fault::FailNth { n: 1, op: None });
        dev.inject(Fault::EioRange {
            range: 65536..69632,
            op: Some(IoOp::Write),
        });
        block_on(async {
            assert!(
                dev.write(0, DmaBuf::alloc_zeroed(4096))
                    .await
                    .result
                    .is_ok()
            );
            assert!(
                dev.write(0, DmaBuf::alloc_zeroed(4096))
                    .await
                    .result
                    .is_err(),
                "I/O 1 must fail"
            );
            assert!(
                dev.write(0, DmaBuf::alloc_zeroed(4096))
                    .await
                    .result
                    .is_ok()
            );
            let err = dev
                .write(65536, DmaBuf::alloc_zeroed(8192))
                .await
                .result
                .expect_err("EIO range");
            assert_eq!(err.raw_os_error(), Some(libc::EIO));
            assert!(
                dev.read(65536, DmaBuf::alloc_zeroed(4096))
                    .await
                    .result
                    .is_ok(),
                "reads unaffected"
            );
        });
        assert_eq!(dev.injected(), 2);
    }

    #[test]
    fn corrupted_reads_differ_by_one_bit_inside_the_range() {
        let dev = FaultyDevice::new(MemDevice::new(1 << 20, 4096), 3);
        dev.inject(Fault::CorruptReads { range: 8192..12288 });
        let buf = block_on(dev.read(0, DmaBuf::alloc_zeroed(16384)))
            .into_result()
            .expect("read");
        let flipped: Vec<usize> = buf
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != 0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(flipped.len(), 1);
        assert!((8192..12288).contains(&flipped[0]));
        assert_eq!(buf[flipped[0]].count_ones(), 1);
    }

    #[test]
    fn power_cut_stops_every_later_io() {
        let mem = MemDevice::new(1 << 20, 4096);
        let dev = FaultyDevice::new(mem.clone(), 0);
        dev.inject(Fault::PowerCutAt { n: 1 });
        block_on(async {
            dev.write(0, DmaBuf::copy_from(&[5u8; 4096]))
                .await
                .into_result()
                .expect("before the cut");
            assert!(dev.flush().await.is_err());
            assert!(
                dev.write(4096, DmaBuf::copy_from(&[6u8; 4096]))
                    .await
                    .result
                    .is_err()
            );
        });
        mem.crash(0);
        assert!(
            mem.snapshot()[4096..8192].iter().all(|&b| b == 0),
            "write after the cut landed"
        );
    }

    #[test]
    fn a_cut_aimed_at_a_write_passes_reads_before_it() {
        let dev = FaultyDevice::new(MemDevice::new(1 << 20, 4096), 0);
        dev.inject(Fault::PowerCutAtWrite { n: 1 });
        block_on(async {
            let write = |at| dev.write(at, DmaBuf::copy_from(&[5u8; 4096]));
            let read = || dev.read(0, DmaBuf::alloc_zeroed(4096));
            write(0)
                .await
                .into_result()
                .expect("write 0 is before the cut");
            for _ in 0..3 {
                read()
                    .await
                    .into_result()
                    .expect("reads do not move the cut");
            }
            assert!(write(4096).await.result.is_err(), "write 1 is cut");
            assert!(
                read().await.result.is_err(),
                "everything after the cut fails"
            );
        });
        assert_eq!(dev.write_count(), 2);
        assert_eq!(dev.injected(), 2);
    }
}
