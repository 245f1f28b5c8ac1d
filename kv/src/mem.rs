//! `MemKv`: an in-memory, really serializable backend for tests and the
//! simulator. It keeps FoundationDB's model in miniature so that code tested
//! on it behaves the same on the real backends:
//! * MVCC: a commit version counter; every committed write is kept with the
//!   version that wrote it, and a transaction reads at the version current
//!   when it began (its read version).
//! * Optimistic concurrency: a transaction records what it read (keys and
//!   ranges, and explicit read-conflict ranges; snapshot reads record
//!   nothing). Commit fails with [`KvError::Conflict`] if a transaction that
//!   committed after its read version wrote into any of it; otherwise the
//!   writes apply atomically under a new version.
//! * Concurrency: one mutex guards the store, held only for one lookup, one
//!   batch of a range scan, or one commit's check-and-apply, never across an
//!   `.await` or for a whole transaction, so transactions really interleave.
//! * Pruning: a key's old versions and the write sets of old commits are
//!   dropped once no live transaction's read version needs them.
//!
//! Nothing here is durable; a `MemKv` lives as long as its last clone.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::time::Instant;

use crate::overlay::{self, Lookup, RangeSet, WriteSet};
use crate::{Kv, KvError, Limits, RangeOptions, RangeResult, Transaction, key_after};

/// How many visible pairs one scan batch takes under the store lock. Small
/// enough to keep the lock short, large enough that a full scan is cheap.
const SCAN_BATCH: usize = 128;

/// An in-memory transactional store. Clones share the store.
#[derive(Clone, Debug)]
pub struct MemKv {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limits: Limits,
    store: Mutex<Store>,
    /// Transactions begun: the next one's serial number.
    begun: AtomicU64,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // Only a panic inside a store method poisons the lock, and those
        // methods do not panic; if one did, the store may be half-updated,
        // so failing every later use is the honest answer.
        self.store
            .lock()
            .expect("MemKv store lock poisoned by a panic")
    }
}

/// One committed write of a key: the version that wrote it and the value
/// (`None` for a clear).
type Versioned = (u64, Option<Bytes>);

#[derive(Debug, Default)]
struct Store {
    /// The newest committed version.
    version: u64,
    /// Each key's versions, oldest first.
    data: BTreeMap<Bytes, Vec<Versioned>>,
    /// Recent commits' write sets, oldest first, for conflict checks.
    commits: VecDeque<(u64, WriteSet)>,
    /// Read versions of live transactions, with counts.
    live: BTreeMap<u64, usize>,
}

impl Store {
    fn begin(&mut self) -> u64 {
        *self.live.entry(self.version).or_insert(0) += 1;
        self.version
    }

    fn end(&mut self, read_version: u64) {
        if let Some(count) = self.live.get_mut(&read_version) {
            *count -= 1;
            if *count == 0 {
                self.live.remove(&read_version);
            }
        }
        self.prune_commits();
    }

    /// The oldest version a live transaction may still read; every version
    /// at or before it but the newest per key is dead.
    fn oldest_needed(&self) -> u64 {
        self.live.keys().next().copied().unwrap_or(self.version)
    }

    fn prune_commits(&mut self) {
        // A commit at or before every live read version can conflict with
        // none of them, nor with any transaction that begins later.
        let oldest = self.oldest_needed();
        while self
            .commits
            .front()
            .is_some_and(|(version, _)| *version <= oldest)
        {
            self.commits.pop_front();
        }
    }

    fn get(&self, key: &[u8], read_version: u64) -> Option<Bytes> {
        self.data
            .get(key)
            .and_then(|versions| value_at(versions, read_version))
    }

    /// Up to `count` visible pairs within `(lower, upper)` at `read_version`,
    /// in the given direction.
    fn scan(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
        read_version: u64,
        count: usize,
    ) -> Vec<(Bytes, Bytes)> {
        let range = self.data.range::<[u8], _>((lower, upper));
        let visible = |(key, versions): (&Bytes, &Vec<Versioned>)| {
            value_at(versions, read_version).map(|value| (key.clone(), value))
        };
        if reverse {
            range.rev().filter_map(visible).take(count).collect()
        } else {
            range.filter_map(visible).take(count).collect()
        }
    }

    /// Checks `reads` against every commit after `read_version`, then
    /// applies `writes` at a new version. The caller's read version is
    /// released either way.
    fn commit(
        &mut self,
        read_version: u64,
        reads: &RangeSet,
        writes: WriteSet,
    ) -> Result<(), KvError> {
        let conflict = self
            .commits
            .iter()
            .filter(|(version, _)| *version > read_version)
            .any(|(_, written)| {
                reads.iter().any(|(begin, end)| {
                    written
                        .points()
                        .range(begin.clone()..end.clone())
                        .next()
                        .is_some()
                        || written.cleared().overlaps(begin, end)
                })
            });
        if conflict {
            self.end(read_version);
            return Err(KvError::Conflict);
        }

        let version = self.version + 1;
        let mut touched = Vec::new();
        for (begin, end) in writes.cleared().iter() {
            for (key, versions) in self.data.range_mut(begin.clone()..end.clone()) {
                // A key set again after the range clear is written below.
                let live = versions.last().is_some_and(|(_, value)| value.is_some());
                if live && !writes.points().contains_key(key) {
                    versions.push((version, None));
                    touched.push(key.clone());
                }
            }
        }
        for (key, value) in writes.points() {
            let versions = self.data.entry(key.clone()).or_default();
            let absent = versions.last().is_none_or(|(_, old)| old.is_none());
            if value.is_none() && absent {
                // Clearing a key that does not exist changes nothing.
                if versions.is_empty() {
                    self.data.remove(key);
                }
                continue;
            }
            versions.push((version, value.clone()));
            touched.push(key.clone());
        }
        self.version = version;
        self.commits.push_back((version, writes));
        self.end(read_version);

        let oldest = self.oldest_needed();
        for key in touched {
            let dead = self.data.get_mut(&key).is_some_and(|versions| {
                prune_versions(versions, oldest);
                matches!(versions[..], [(at, None)] if at <= oldest)
            });
            if dead {
                self.data.remove(&key);
            }
        }
        Ok(())
    }
}

/// The value a reader at `read_version` sees.
fn value_at(versions: &[Versioned], read_version: u64) -> Option<Bytes> {
    versions
        .iter()
        .rev()
        .find(|(version, _)| *version <= read_version)
        .and_then(|(_, value)| value.clone())
}

/// Drops every version older than the newest one at or before `oldest`:
/// no live reader can see them.
fn prune_versions(versions: &mut Vec<Versioned>, oldest: u64) {
    let visible_to_oldest = versions
        .iter()
        .rposition(|(version, _)| *version <= oldest)
        .unwrap_or(0);
    versions.drain(..visible_to_oldest);
}

impl MemKv {
    /// An empty store with FoundationDB's limits.
    pub fn new() -> MemKv {
        MemKv::with_limits(Limits::default())
    }

    /// An empty store with the given limits (tests shorten the age limit).
    pub fn with_limits(limits: Limits) -> MemKv {
        MemKv {
            shared: Arc::new(Shared {
                limits,
                store: Mutex::new(Store::default()),
                begun: AtomicU64::new(0),
            }),
        }
    }

    fn begin_tx(&self, read_only: bool) -> MemTx {
        let read_version = self.shared.store().begin();
        MemTx {
            inner: Arc::new(TxInner {
                serial: self.shared.begun.fetch_add(1, Ordering::Relaxed),
                shared: self.shared.clone(),
                read_version,
                read_only,
                started: Instant::now(),
                state: Mutex::new(TxState::default()),
            }),
        }
    }

    /// How many versions the store holds in all (every key's history):
    /// lets tests check that pruning keeps memory bounded.
    pub fn versions_held(&self) -> usize {
        self.shared.store().data.values().map(Vec::len).sum()
    }
}

impl Default for MemKv {
    fn default() -> Self {
        MemKv::new()
    }
}

impl Kv for MemKv {
    type Tx = MemTx;

    fn begin(&self) -> Result<MemTx, KvError> {
        Ok(self.begin_tx(false))
    }

    fn begin_read_only(&self) -> Result<MemTx, KvError> {
        Ok(self.begin_tx(true))
    }

    fn limits(&self) -> Limits {
        self.shared.limits
    }
}

/// A [`MemKv`] transaction handle; clones share the transaction.
#[derive(Clone, Debug)]
pub struct MemTx {
    inner: Arc<TxInner>,
}

#[derive(Debug)]
struct TxInner {
    shared: Arc<Shared>,
    serial: u64,
    read_version: u64,
    read_only: bool,
    started: Instant,
    /// Locked briefly by each operation; the store lock may be taken while
    /// holding it, never the other way round.
    state: Mutex<TxState>,
}

#[derive(Debug, Default)]
struct TxState {
    /// Writes, read conflicts to register at commit, and whether it ended.
    buf: overlay::Buffered,
    /// The read version was handed back to the store.
    released: bool,
}

impl Drop for TxInner {
    fn drop(&mut self) {
        let released = self.state.get_mut().map_or(true, |state| state.released);
        if !released {
            self.shared.store().end(self.read_version);
        }
    }
}

impl MemTx {
    fn state(&self) -> MutexGuard<'_, TxState> {
        // Transaction methods do not panic while holding this lock; a
        // poisoned lock means a bug already reported by that panic.
        self.inner
            .state
            .lock()
            .expect("MemTx state lock poisoned by a panic")
    }

    /// The state, if the transaction may still read.
    fn readable(&self) -> Result<MutexGuard<'_, TxState>, KvError> {
        let state = self.state();
        state.buf.check_open()?;
        overlay::check_age(self.inner.started, &self.inner.shared.limits)?;
        Ok(state)
    }

    /// Runs a buffered write, remembering a size error for commit.
    fn write(
        &self,
        apply: impl FnOnce(&mut WriteSet, &Limits) -> Result<(), KvError>,
    ) -> Result<(), KvError> {
        let read_only = self.inner.read_only;
        self.state()
            .buf
            .write(read_only, &self.inner.shared.limits, apply)
    }
}

/// Snapshot pairs of a range, fetched from the store in batches so the
/// store lock is held per batch, not per range read.
struct MemScan<'a> {
    shared: &'a Shared,
    read_version: u64,
    lower: Bound<Bytes>,
    upper: Bound<Bytes>,
    reverse: bool,
    batch: std::vec::IntoIter<(Bytes, Bytes)>,
    exhausted: bool,
}

impl Iterator for MemScan<'_> {
    type Item = Result<(Bytes, Bytes), KvError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(pair) = self.batch.next() {
                return Some(Ok(pair));
            }
            if self.exhausted {
                return None;
            }
            let batch = self.shared.store().scan(
                as_slice_bound(&self.lower),
                as_slice_bound(&self.upper),
                self.reverse,
                self.read_version,
                SCAN_BATCH,
            );
            self.exhausted = batch.len() < SCAN_BATCH;
            if let Some((last, _)) = batch.last() {
                if self.reverse {
                    self.upper = Bound::Excluded(last.clone());
                } else {
                    self.lower = Bound::Excluded(last.clone());
                }
            }
            self.batch = batch.into_iter();
        }
    }
}

fn as_slice_bound(bound: &Bound<Bytes>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key),
        Bound::Excluded(key) => Bound::Excluded(key),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl Transaction for MemTx {
    fn serial(&self) -> u64 {
        self.inner.serial
    }

    async fn get(&self, key: &[u8], snapshot: bool) -> Result<Option<Bytes>, KvError> {
        let mut state = self.readable()?;
        match state.buf.writes.lookup(key) {
            // Answered by this transaction's own writes: the result does
            // not depend on the store, so it records no conflict.
            Lookup::Set(value) => Ok(Some(value)),
            Lookup::Cleared => Ok(None),
            Lookup::Untouched => {
                let value = self.inner.shared.store().get(key, self.inner.read_version);
                if !snapshot {
                    state
                        .buf
                        .reads
                        .insert(Bytes::copy_from_slice(key), key_after(key));
                }
                Ok(value)
            }
        }
    }

    async fn get_range(&self, options: &RangeOptions) -> Result<RangeResult, KvError> {
        overlay::check_range(&options.begin, &options.end)?;
        let mut state = self.readable()?;
        let scan = MemScan {
            shared: &self.inner.shared,
            read_version: self.inner.read_version,
            lower: Bound::Included(options.begin.clone()),
            upper: Bound::Excluded(options.end.clone()),
            reverse: options.reverse,
            batch: Vec::new().into_iter(),
            exhausted: false,
        };
        let merged = overlay::merge_range(&state.buf.writes, options, scan)?;
        if !options.snapshot {
            state.buf.reads.insert(merged.read_begin, merged.read_end);
        }
        Ok(merged.result)
    }

    fn set(&self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.write(|writes, limits| writes.set(key, value, limits))
    }

    fn clear(&self, key: &[u8]) -> Result<(), KvError> {
        self.write(|writes, limits| writes.clear(key, limits))
    }

    fn clear_range(&self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.write(|writes, limits| writes.clear_range(begin, end, limits))
    }

    fn add_read_conflict_range(&self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.state().buf.add_read_conflict_range(begin, end)
    }

    async fn commit(&self) -> Result<(), KvError> {
        let mut state = self.state();
        state.buf.check_open()?;
        state.buf.finished = Some("aborted");
        state.released = true;
        let writes = std::mem::take(&mut state.buf.writes);
        let reads = std::mem::take(&mut state.buf.reads);
        let sticky = state.buf.sticky.take();
        let to_apply = match sticky {
            Some(error) => Err(error),
            // Nothing to apply, so nothing can conflict (as in FoundationDB).
            None if self.inner.read_only || writes.is_empty() => Ok(None),
            None => overlay::check_age(self.inner.started, &self.inner.shared.limits)
                .map(|()| Some(writes)),
        };
        let mut store = self.inner.shared.store();
        let outcome = match to_apply {
            // Checks conflicts, applies, and releases the read version.
            Ok(Some(writes)) => store.commit(self.inner.read_version, &reads, writes),
            other => {
                store.end(self.inner.read_version);
                other.map(|_| ())
            }
        };
        if outcome.is_ok() {
            state.buf.finished = Some("committed");
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn old_versions_are_pruned_once_no_reader_needs_them() {
        let kv = MemKv::new();
        let reader = kv.begin().expect("begin");
        for round in 0..10u8 {
            let tx = kv.begin().expect("begin");
            tx.set(b"k", &[round]).expect("set");
            tx.commit().await.expect("commit");
        }
        // The old reader pins the version it read, so history piles up.
        assert_eq!(reader.get(b"k", false).await.expect("get"), None);
        assert!(kv.versions_held() >= 10);
        drop(reader);
        let tx = kv.begin().expect("begin");
        tx.set(b"k", b"last").expect("set");
        tx.commit().await.expect("commit");
        assert_eq!(kv.versions_held(), 1);
        assert!(kv.shared.store().commits.is_empty());

        let tx = kv.begin().expect("begin");
        tx.clear(b"k").expect("clear");
        tx.commit().await.expect("commit");
        assert_eq!(
            kv.versions_held(),
            0,
            "a cleared key nobody can see is gone"
        );
    }
}
