//! What the embedded backends ([`MemKv`](crate::mem::MemKv) and
//! [`FjallKv`](crate::fjall::FjallKv)) share: a transaction's buffered writes
//! laid over the snapshot it reads (read-your-writes, including in range
//! reads and after `clear_range`), sets of key ranges (read sets, cleared
//! ranges), and the limit checks. Both backends read a snapshot that knows
//! nothing of the transaction's own writes; keeping the merge in one place
//! keeps their range semantics, `more` flag and conflict extents identical.
//! FoundationDB does all of this itself, so the FDB backend uses none of it.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use tokio::time::Instant;

use crate::{KeyValue, KvError, Limits, RangeOptions, RangeResult, key_after};

/// A set of half-open key ranges `[begin, end)`, kept disjoint, with
/// overlapping and touching ranges merged.
#[derive(Clone, Debug, Default)]
pub(crate) struct RangeSet {
    /// begin -> end; for consecutive entries, `end` < next `begin`.
    ranges: BTreeMap<Bytes, Bytes>,
}

impl RangeSet {
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Adds `[begin, end)`; an empty range adds nothing.
    pub(crate) fn insert(&mut self, mut begin: Bytes, mut end: Bytes) {
        if begin >= end {
            return;
        }
        // A range that starts at or before `begin` and reaches it absorbs
        // the new one's start.
        if let Some((before_begin, before_end)) = self
            .ranges
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(&begin[..])))
            .next_back()
            && *before_end >= begin
        {
            begin = before_begin.clone();
            end = end.max(before_end.clone());
        }
        // Every range starting inside `[begin, end]` is merged in.
        let absorbed: Vec<Bytes> = self
            .ranges
            .range::<[u8], _>((Bound::Included(&begin[..]), Bound::Included(&end[..])))
            .map(|(range_begin, _)| range_begin.clone())
            .collect();
        for range_begin in absorbed {
            if let Some(range_end) = self.ranges.remove(&range_begin) {
                end = end.max(range_end);
            }
        }
        self.ranges.insert(begin, end);
    }

    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.ranges
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .is_some_and(|(_, end)| key < &end[..])
    }

    /// Whether any range intersects `[begin, end)`.
    pub(crate) fn overlaps(&self, begin: &[u8], end: &[u8]) -> bool {
        // The ranges are disjoint and sorted, so if the last one starting
        // before `end` ends at or before `begin`, every earlier one does too.
        begin < end
            && self
                .ranges
                .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(end)))
                .next_back()
                .is_some_and(|(_, range_end)| begin < &range_end[..])
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Bytes, &Bytes)> {
        self.ranges.iter()
    }
}

/// What a transaction's own writes say about a key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The transaction set it to this value.
    Set(Bytes),
    /// The transaction cleared it (by key or by range).
    Cleared,
    /// The transaction did not write it: read the snapshot.
    Untouched,
}

/// A transaction's buffered writes: the newest state of each key written
/// one at a time, and the ranges cleared. A `set` after a `clear_range`
/// lands in `points` and wins over the cleared range; a `clear_range`
/// drops the point writes it covers.
#[derive(Debug, Default)]
pub(crate) struct WriteSet {
    points: BTreeMap<Bytes, Option<Bytes>>,
    cleared: RangeSet,
    /// Mutation bytes so far, counted as FoundationDB roughly does: key and
    /// value for a set, the key for a clear, both ends for a range clear.
    bytes: usize,
}

impl WriteSet {
    pub(crate) fn is_empty(&self) -> bool {
        self.points.is_empty() && self.cleared.is_empty()
    }

    pub(crate) fn points(&self) -> &BTreeMap<Bytes, Option<Bytes>> {
        &self.points
    }

    pub(crate) fn cleared(&self) -> &RangeSet {
        &self.cleared
    }

    /// Counts `bytes` more against the transaction size limit.
    fn charge(&mut self, bytes: usize, limits: &Limits) -> Result<(), KvError> {
        let total = self.bytes.saturating_add(bytes);
        if total > limits.transaction_bytes_max {
            return Err(KvError::TransactionTooLarge {
                bytes: total,
                max: limits.transaction_bytes_max,
            });
        }
        self.bytes = total;
        Ok(())
    }

    pub(crate) fn set(&mut self, key: &[u8], value: &[u8], limits: &Limits) -> Result<(), KvError> {
        check_key(key, limits)?;
        if value.len() > limits.value_bytes_max {
            return Err(KvError::ValueTooLarge {
                len: value.len(),
                max: limits.value_bytes_max,
            });
        }
        self.charge(key.len() + value.len(), limits)?;
        self.points.insert(
            Bytes::copy_from_slice(key),
            Some(Bytes::copy_from_slice(value)),
        );
        Ok(())
    }

    pub(crate) fn clear(&mut self, key: &[u8], limits: &Limits) -> Result<(), KvError> {
        check_key(key, limits)?;
        self.charge(key.len(), limits)?;
        self.points.insert(Bytes::copy_from_slice(key), None);
        Ok(())
    }

    pub(crate) fn clear_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limits: &Limits,
    ) -> Result<(), KvError> {
        check_range(begin, end)?;
        self.charge(begin.len() + end.len(), limits)?;
        let begin = Bytes::copy_from_slice(begin);
        let end = Bytes::copy_from_slice(end);
        let covered: Vec<Bytes> = self
            .points
            .range(begin.clone()..end.clone())
            .map(|(key, _)| key.clone())
            .collect();
        for key in covered {
            self.points.remove(&key);
        }
        self.cleared.insert(begin, end);
        Ok(())
    }

    pub(crate) fn lookup(&self, key: &[u8]) -> Lookup {
        match self.points.get(key) {
            Some(Some(value)) => Lookup::Set(value.clone()),
            Some(None) => Lookup::Cleared,
            None if self.cleared.contains(key) => Lookup::Cleared,
            None => Lookup::Untouched,
        }
    }

    /// Whether the transaction's own writes decide `key`, hiding the
    /// snapshot's value.
    fn shadows(&self, key: &[u8]) -> bool {
        self.points.contains_key(key) || self.cleared.contains(key)
    }
}

/// A range read merged from the snapshot and the transaction's writes.
#[derive(Debug)]
pub(crate) struct MergedRange {
    pub(crate) result: RangeResult,
    /// The part of the key space the result depends on, `[begin, end)`:
    /// the whole requested range unless the limit cut the read short. Then
    /// it runs (in the read's direction) through the first key *not*
    /// returned, because `more` depends on that key existing.
    pub(crate) read_begin: Bytes,
    pub(crate) read_end: Bytes,
}

/// Merges `base` (the snapshot's pairs in `options`' range, already in the
/// read's direction) with `writes`, honouring limit and reverse. `base` is
/// pulled lazily, so a limited read touches only what it returns plus one.
pub(crate) fn merge_range<I>(
    writes: &WriteSet,
    options: &RangeOptions,
    base: I,
) -> Result<MergedRange, KvError>
where
    I: Iterator<Item = Result<(Bytes, Bytes), KvError>>,
{
    let range = options.begin.clone()..options.end.clone();
    let own: Box<dyn Iterator<Item = (&Bytes, &Option<Bytes>)>> = if options.reverse {
        Box::new(writes.points.range(range).rev())
    } else {
        Box::new(writes.points.range(range))
    };
    let merged = Merge {
        base: base
            .filter(|item| match item {
                Ok((key, _)) => !writes.shadows(key),
                Err(_) => true,
            })
            .peekable(),
        own: own
            .filter_map(|(key, value)| value.as_ref().map(|value| (key.clone(), value.clone())))
            .peekable(),
        reverse: options.reverse,
    };

    let limit = if options.limit == 0 {
        usize::MAX
    } else {
        options.limit
    };
    let mut kvs = Vec::new();
    let mut first_not_returned = None;
    for item in merged {
        let (key, value) = item?;
        if kvs.len() == limit {
            first_not_returned = Some(key);
            break;
        }
        kvs.push(KeyValue { key, value });
    }

    let (read_begin, read_end) = match &first_not_returned {
        None => (options.begin.clone(), options.end.clone()),
        Some(key) if options.reverse => (key.clone(), options.end.clone()),
        Some(key) => (options.begin.clone(), key_after(key)),
    };
    Ok(MergedRange {
        result: RangeResult {
            kvs,
            more: first_not_returned.is_some(),
        },
        read_begin,
        read_end,
    })
}

/// Two sorted streams with disjoint keys (the base is filtered of every
/// key the transaction wrote), merged in the read's direction.
struct Merge<B: Iterator, O: Iterator> {
    base: std::iter::Peekable<B>,
    own: std::iter::Peekable<O>,
    reverse: bool,
}

impl<B, O> Iterator for Merge<B, O>
where
    B: Iterator<Item = Result<(Bytes, Bytes), KvError>>,
    O: Iterator<Item = (Bytes, Bytes)>,
{
    type Item = Result<(Bytes, Bytes), KvError>;

    fn next(&mut self) -> Option<Self::Item> {
        let base_first = match (self.base.peek(), self.own.peek()) {
            (None, None) => return None,
            (Some(Err(_)), _) | (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(Ok((base_key, _))), Some((own_key, _))) => (base_key < own_key) != self.reverse,
        };
        if base_first {
            self.base.next()
        } else {
            self.own.next().map(Ok)
        }
    }
}

pub(crate) fn check_key(key: &[u8], limits: &Limits) -> Result<(), KvError> {
    if key.len() > limits.key_bytes_max {
        return Err(KvError::KeyTooLarge {
            len: key.len(),
            max: limits.key_bytes_max,
        });
    }
    Ok(())
}

pub(crate) fn check_range(begin: &[u8], end: &[u8]) -> Result<(), KvError> {
    if begin > end {
        return Err(KvError::InvalidRange {
            begin: Bytes::copy_from_slice(begin),
            end: Bytes::copy_from_slice(end),
        });
    }
    Ok(())
}

/// [`KvError::TooOld`] once the transaction has lived longer than the limit.
/// Tokio's clock, so that a simulation with paused time ages transactions
/// by simulated time.
pub(crate) fn check_age(started: Instant, limits: &Limits) -> Result<(), KvError> {
    let age = started.elapsed();
    if age > limits.transaction_age_max {
        return Err(KvError::TooOld {
            age_ms: age.as_millis() as u64,
            max_ms: limits.transaction_age_max.as_millis() as u64,
        });
    }
    Ok(())
}

/// The part of a transaction's state both embedded backends keep alike:
/// buffered writes, the read set to check at commit, whether it ended, and
/// a size error commit must report again.
#[derive(Debug, Default)]
pub(crate) struct Buffered {
    pub(crate) writes: WriteSet,
    pub(crate) reads: RangeSet,
    /// Set once commit ran: "committed" or "aborted".
    pub(crate) finished: Option<&'static str>,
    pub(crate) sticky: Option<KvError>,
}

impl Buffered {
    /// `Finished` once the transaction has ended.
    pub(crate) fn check_open(&self) -> Result<(), KvError> {
        match self.finished {
            Some(state) => Err(KvError::Finished { state }),
            None => Ok(()),
        }
    }

    /// Runs a buffered write, remembering a size error for commit.
    pub(crate) fn write(
        &mut self,
        read_only: bool,
        limits: &Limits,
        apply: impl FnOnce(&mut WriteSet, &Limits) -> Result<(), KvError>,
    ) -> Result<(), KvError> {
        self.check_open()?;
        if read_only {
            return Err(KvError::ReadOnly);
        }
        let result = apply(&mut self.writes, limits);
        if let Err(error) = &result
            && self.sticky.is_none()
        {
            self.sticky = sticky_copy(error);
        }
        result
    }

    /// Adds `begin..end` to the read set.
    pub(crate) fn add_read_conflict_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
    ) -> Result<(), KvError> {
        check_range(begin, end)?;
        self.check_open()?;
        self.reads
            .insert(Bytes::copy_from_slice(begin), Bytes::copy_from_slice(end));
        Ok(())
    }
}

/// The size errors a transaction remembers: after one, commit fails with it
/// too (as FoundationDB reports them at commit), so a caller that ignored
/// the error cannot commit a transaction missing a write.
pub(crate) fn sticky_copy(error: &KvError) -> Option<KvError> {
    match *error {
        KvError::KeyTooLarge { len, max } => Some(KvError::KeyTooLarge { len, max }),
        KvError::ValueTooLarge { len, max } => Some(KvError::ValueTooLarge { len, max }),
        KvError::TransactionTooLarge { bytes, max } => {
            Some(KvError::TransactionTooLarge { bytes, max })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn range_set_merges_and_answers() {
        let mut set = RangeSet::default();
        set.insert(b("c"), b("e"));
        set.insert(b("a"), b("b"));
        set.insert(b("x"), b("x")); // empty: ignored
        assert!(set.contains(b"a") && set.contains(b"d") && !set.contains(b"b"));
        assert!(!set.contains(b"e") && !set.contains(b"x"));
        set.insert(b("b"), b("c")); // touches both: one range a..e
        assert_eq!(set.iter().count(), 1);
        assert!(set.contains(b"b"));
        set.insert(b("d"), b("g"));
        assert_eq!(
            set.iter()
                .map(|(x, y)| (x.clone(), y.clone()))
                .collect::<Vec<_>>(),
            vec![(b("a"), b("g"))]
        );
        assert!(set.overlaps(b"f", b"z") && !set.overlaps(b"g", b"z"));
        assert!(!set.overlaps(b"0", b"a") && set.overlaps(b"0", b"a\0"));
        assert!(!set.overlaps(b"c", b"c"));
    }

    #[test]
    fn merge_hides_cleared_and_respects_limit_and_direction() {
        let limits = Limits::default();
        let mut writes = WriteSet::default();
        writes.clear_range(b"b", b"d", &limits).expect("small");
        writes.set(b"c", b"own-c", &limits).expect("small");
        writes.set(b"e", b"own-e", &limits).expect("small");
        writes.clear(b"f", &limits).expect("small");
        let base = || {
            ["a", "b", "bb", "d", "f", "g"]
                .into_iter()
                .map(|k| Ok((b(k), b("base"))))
        };
        let keys = |merged: &MergedRange| {
            merged
                .result
                .kvs
                .iter()
                .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
                .collect::<Vec<_>>()
        };
        let all = merge_range(&writes, &RangeOptions::new("a", "z"), base()).expect("no error");
        assert_eq!(keys(&all), ["a", "c", "d", "e", "g"]);
        assert!(!all.result.more);
        assert_eq!((all.read_begin, all.read_end), (b("a"), b("z")));

        let two =
            merge_range(&writes, &RangeOptions::new("a", "z").limit(2), base()).expect("no error");
        assert_eq!(keys(&two), ["a", "c"]);
        assert!(two.result.more);
        assert_eq!((two.read_begin, two.read_end), (b("a"), b("d\0")));

        let reverse_base = base().rev();
        let back = merge_range(
            &writes,
            &RangeOptions::new("a", "z").limit(2).reverse(true),
            reverse_base,
        )
        .expect("no error");
        assert_eq!(keys(&back), ["g", "e"]);
        assert_eq!((back.read_begin, back.read_end), (b("d"), b("z")));
    }
}
