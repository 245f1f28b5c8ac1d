//! The transactional, ordered key-value interface the namespace is built on,
//! modelled on FoundationDB so that the FoundationDB backend is a thin
//! adapter and the embedded backend keeps FoundationDB's guarantees.
//!
//! Semantics every backend provides (the conformance suite in
//! [`conformance`] checks them against each one):
//! * Keys are ordered bytewise; the empty key is a key. A transaction reads
//!   a consistent snapshot and sees its own writes (read-your-writes),
//!   including in range reads and after `clear_range`. A read answered from
//!   the transaction's own writes records no conflict.
//! * Serializable reads (the default) record read conflicts: the commit fails
//!   with [`KvError::Conflict`] if another transaction committed a write to a
//!   key or into a range this one read, after this one's snapshot. Snapshot
//!   reads record nothing; [`Transaction::add_read_conflict_range`] adds a
//!   conflict range by hand, as in FoundationDB.
//! * A range read with `limit` returns at most that many pairs and says
//!   exactly whether more remain; `reverse` walks from the end. Conflicts
//!   cover only the part of the range actually read: when the limit cut it
//!   short, from the start (the end, in reverse) through the first key not
//!   returned, which `more` depends on (FoundationDB's rule, plus that one
//!   key).
//! * Commit is atomic and durable when it returns `Ok`. A commit that may or
//!   may not have happened returns [`KvError::CommitUnknown`].
//! * Limits ([`Limits`]): key size, value size, bytes written per
//!   transaction and transaction age, FoundationDB's by default. A write
//!   over a size limit fails at once or (FoundationDB) at commit; either
//!   way the transaction can no longer commit.
//! * A read-only transaction refuses writes; its commit only ends it. After
//!   commit every operation fails with [`KvError::Finished`].
//! * Transactions are handles: cloning one shares the same transaction, so
//!   a retry closure can take it by value (see [`run`]).
//!
//! Backends: [`mem::MemKv`] (in memory, for tests and simulation),
//! [`fjall::FjallKv`] (embedded and durable, the default) and, with the
//! `fdb` feature, `fdb::FdbKv` (FoundationDB). docs/metadata-kv.md
//! describes each, how it detects conflicts, and the on-disk format.
// One exception, in `fdb.rs`: starting FoundationDB's network thread is an
// unsafe call of the foundationdb crate (allowed there, with its SAFETY line).
#![deny(unsafe_code)]

#[cfg(feature = "testing")]
pub mod conformance;
#[cfg(feature = "fdb")]
pub mod fdb;
pub mod fjall;
pub mod mem;
mod overlay;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use flyfs_time::{Attempt, Backoff, Retry};

/// FoundationDB's limits: 10,000-byte keys, 100,000-byte values, 10 MB of
/// mutations per transaction, 5 seconds from the first read to commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    pub transaction_bytes_max: usize,
    pub transaction_age_max: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            key_bytes_max: 10_000,
            value_bytes_max: 100_000,
            transaction_bytes_max: 10_000_000,
            transaction_age_max: Duration::from_secs(5),
        }
    }
}

/// Why a KV operation failed. [`KvError::is_retryable`] says which ones the
/// retry helper reruns.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// Another transaction wrote something this one read. Retryable.
    #[error("transaction conflict: another transaction changed what this one read")]
    Conflict,
    /// The transaction outlived [`Limits::transaction_age_max`]. Retryable.
    #[error("transaction is too old ({age_ms} ms; the limit is {max_ms} ms)")]
    TooOld { age_ms: u64, max_ms: u64 },
    /// The commit may or may not have been applied (e.g. a connection was
    /// lost during commit). Retryable, so transactions must be idempotent,
    /// as with FoundationDB.
    #[error("commit result unknown: the transaction may or may not have been applied")]
    CommitUnknown,
    #[error("key of {len} bytes exceeds the limit of {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value of {len} bytes exceeds the limit of {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("transaction writes {bytes} bytes, over the limit of {max}")]
    TransactionTooLarge { bytes: usize, max: usize },
    #[error("write in a read-only transaction")]
    ReadOnly,
    /// The transaction was committed or cancelled already.
    #[error("transaction already {state}")]
    Finished { state: &'static str },
    #[error("invalid range: begin {begin:?} is after end {end:?}")]
    InvalidRange { begin: Bytes, end: Bytes },
    /// The backend failed (I/O, corruption, a FoundationDB error that is not
    /// one of the above). `retryable` carries the backend's own judgement.
    #[error("{backend}: {message}")]
    Backend {
        backend: &'static str,
        message: String,
        retryable: bool,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl KvError {
    /// Whether rerunning the whole transaction may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            KvError::Conflict | KvError::TooOld { .. } | KvError::CommitUnknown => true,
            KvError::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// A key and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Bytes,
    pub value: Bytes,
}

/// A range read: keys in `begin..end`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeOptions {
    pub begin: Bytes,
    pub end: Bytes,
    /// At most this many pairs; 0 means no limit.
    pub limit: usize,
    /// From the end of the range backwards.
    pub reverse: bool,
    /// A snapshot read: records no read conflict.
    pub snapshot: bool,
}

impl RangeOptions {
    /// Every key in `begin..end`, forward, serializable.
    pub fn new(begin: impl Into<Bytes>, end: impl Into<Bytes>) -> RangeOptions {
        RangeOptions {
            begin: begin.into(),
            end: end.into(),
            ..RangeOptions::default()
        }
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: &[u8]) -> RangeOptions {
        RangeOptions::new(Bytes::copy_from_slice(prefix), prefix_end(prefix))
    }

    pub fn limit(mut self, limit: usize) -> RangeOptions {
        self.limit = limit;
        self
    }

    pub fn reverse(mut self, reverse: bool) -> RangeOptions {
        self.reverse = reverse;
        self
    }

    pub fn snapshot(mut self, snapshot: bool) -> RangeOptions {
        self.snapshot = snapshot;
        self
    }
}

/// What a range read returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeResult {
    /// In key order (descending for a reverse read).
    pub kvs: Vec<KeyValue>,
    /// The limit stopped the read before the end of the range.
    pub more: bool,
}

/// The first key after every key that starts with `prefix`: `prefix` with
/// trailing 0xff bytes removed and the last byte incremented. An all-0xff or
/// empty prefix has no such key; the end of the key space (`[0xff; 1]` plus
/// one more byte) stands in for it.
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last == 0xff {
            end.pop();
        } else {
            *end.last_mut().expect("checked non-empty") += 1;
            return Bytes::from(end);
        }
    }
    Bytes::from_static(&[0xff, 0xff])
}

/// The smallest key after `key`: `key` followed by a zero byte.
pub fn key_after(key: &[u8]) -> Bytes {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    Bytes::from(next)
}

/// A transactional, ordered key-value store.
pub trait Kv: Clone + Send + Sync + 'static {
    type Tx: Transaction;

    /// Starts a read-write transaction.
    fn begin(&self) -> Result<Self::Tx, KvError>;
    /// Starts a read-only transaction: writes fail with [`KvError::ReadOnly`],
    /// and commit only ends it (never conflicts).
    fn begin_read_only(&self) -> Result<Self::Tx, KvError>;
    /// The limits this store enforces.
    fn limits(&self) -> Limits;
    /// Returns once every commit applied before the call is durable, relaxed
    /// ones ([`Transaction::relax_durability`]) included: for a caller about
    /// to act on them (an `fsync`, the GC deleting the data a relaxed remove
    /// released). Stores whose every commit is durable on its own
    /// (FoundationDB) or never (in memory) have nothing to wait for.
    fn sync(&self) -> impl Future<Output = Result<(), KvError>> + Send {
        async { Ok(()) }
    }
}

/// One transaction. A handle: clones share it. Writes are buffered and take
/// effect atomically at [`Transaction::commit`].
pub trait Transaction: Clone + Send + Sync + 'static {
    /// How many transactions the store (this handle and its clones) had
    /// begun before this one. Concurrent transactions differ in it, and a
    /// deterministic simulation replays it: [`run`] seeds its backoff jitter
    /// with it, so transactions that conflicted together retry apart.
    fn serial(&self) -> u64;
    /// The value of `key`; a snapshot read when `snapshot`.
    fn get(
        &self,
        key: &[u8],
        snapshot: bool,
    ) -> impl Future<Output = Result<Option<Bytes>, KvError>> + Send;
    /// Pairs in a range; see [`RangeOptions`].
    fn get_range(
        &self,
        options: &RangeOptions,
    ) -> impl Future<Output = Result<RangeResult, KvError>> + Send;
    fn set(&self, key: &[u8], value: &[u8]) -> Result<(), KvError>;
    fn clear(&self, key: &[u8]) -> Result<(), KvError>;
    /// Clears every key in `begin..end`.
    fn clear_range(&self, begin: &[u8], end: &[u8]) -> Result<(), KvError>;
    /// Makes the commit fail if another transaction writes into
    /// `begin..end` after this one's snapshot.
    fn add_read_conflict_range(&self, begin: &[u8], end: &[u8]) -> Result<(), KvError>;
    /// Commits. Afterwards every operation fails with [`KvError::Finished`].
    fn commit(&self) -> impl Future<Output = Result<(), KvError>> + Send;

    /// Lets [`commit`](Self::commit) return once the commit is applied and
    /// visible, before it is durable: for a change whose loss in a power
    /// cut the caller can bear (and repairs). The store makes it durable
    /// soon after, and never makes a later commit durable without it, so a
    /// crash keeps a prefix of the commits. Stores whose every commit is
    /// durable on its own (FoundationDB) or never (in memory) ignore it.
    fn relax_durability(&self) {}

    /// [`Transaction::add_read_conflict_range`] for one key.
    fn add_read_conflict_key(&self, key: &[u8]) -> Result<(), KvError> {
        self.add_read_conflict_range(key, &key_after(key))
    }
}

/// How [`run`] retries.
#[derive(Clone, Debug)]
pub struct RetryOptions {
    /// Attempts in all, the first included.
    pub attempts_max: u32,
    /// The wait before each rerun, jittered with a seed from the first
    /// transaction's [`serial`](Transaction::serial).
    pub backoff: Backoff,
}

impl Default for RetryOptions {
    fn default() -> Self {
        RetryOptions {
            attempts_max: 100,
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(200)),
        }
    }
}

/// An error a transaction body returns: either the KV layer's own or the
/// caller's (an errno, say). The retry helper reruns the body only for
/// retryable KV errors.
pub trait TxError: From<KvError> {
    /// The KV error inside, if this is one.
    fn kv_error(&self) -> Option<&KvError>;
}

impl TxError for KvError {
    fn kv_error(&self) -> Option<&KvError> {
        Some(self)
    }
}

/// Runs `body` in a read-write transaction and commits, rerunning both on
/// retryable errors with jittered exponential backoff, like FoundationDB's
/// `run`. The body must be idempotent across attempts: it may run several
/// times, and a `CommitUnknown` attempt may have been applied.
pub async fn run<K, F, Fut, R, E>(kv: &K, options: &RetryOptions, mut body: F) -> Result<R, E>
where
    K: Kv,
    F: FnMut(K::Tx) -> Fut,
    Fut: Future<Output = Result<R, E>>,
    E: TxError,
{
    // The first transaction begins before the retry loop, so that its
    // serial number can seed the jitter of every wait after it.
    let mut first = Some(kv.begin()?);
    let seed = first.as_ref().map_or(0, Transaction::serial);
    let answer = Retry::attempts(options.attempts_max, options.backoff)
        .run(seed, |attempt| {
            let begun = first
                .take()
                .map_or_else(|| kv.begin(), Ok)
                .map(|tx| (tx.clone(), body(tx)));
            async move {
                let (tx, body) = match begun {
                    Ok(begun) => begun,
                    Err(e) => return Attempt::Done(Err(E::from(e))),
                };
                let result = match body.await {
                    Ok(value) => tx.commit().await.map(|()| value).map_err(E::from),
                    Err(e) => Err(e),
                };
                retry_if_retryable(attempt, result)
            }
        })
        .await;
    answer.unwrap_or_else(|gave_up| Err(gave_up.last))
}

/// Runs `body` in a read-only transaction, rerunning it on retryable errors
/// (a read-only transaction can still grow too old).
pub async fn run_read_only<K, F, Fut, R, E>(
    kv: &K,
    options: &RetryOptions,
    mut body: F,
) -> Result<R, E>
where
    K: Kv,
    F: FnMut(K::Tx) -> Fut,
    Fut: Future<Output = Result<R, E>>,
    E: TxError,
{
    let mut first = Some(kv.begin_read_only()?);
    let seed = first.as_ref().map_or(0, Transaction::serial);
    let answer = Retry::attempts(options.attempts_max, options.backoff)
        .run(seed, |attempt| {
            let body = first
                .take()
                .map_or_else(|| kv.begin_read_only(), Ok)
                .map(&mut body);
            async move {
                let result = match body {
                    Ok(body) => body.await,
                    Err(e) => return Attempt::Done(Err(E::from(e))),
                };
                retry_if_retryable(attempt, result)
            }
        })
        .await;
    answer.unwrap_or_else(|gave_up| Err(gave_up.last))
}

/// Another attempt for a retryable KV error; the answer for anything else
/// (a caller's own error, an errno say, is never retried).
fn retry_if_retryable<R, E: TxError>(
    attempt: u32,
    result: Result<R, E>,
) -> Attempt<Result<R, E>, E> {
    match result {
        Err(e) if e.kv_error().is_some_and(KvError::is_retryable) => {
            if let Some(error) = e.kv_error() {
                tracing::debug!(attempt, %error, "transaction attempt failed");
            }
            Attempt::Retry(e)
        }
        other => Attempt::Done(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(&prefix_end(b"DENT")[..], b"DENU");
        assert_eq!(&prefix_end(&[1, 0xff, 0xff])[..], &[2]);
        assert_eq!(&prefix_end(&[0xff])[..], &[0xff, 0xff]);
        assert_eq!(&prefix_end(b"")[..], &[0xff, 0xff]);
        assert_eq!(&key_after(b"a")[..], b"a\0");
    }

    #[test]
    fn retryable_errors() {
        assert!(KvError::Conflict.is_retryable());
        assert!(KvError::CommitUnknown.is_retryable());
        assert!(
            KvError::TooOld {
                age_ms: 6000,
                max_ms: 5000
            }
            .is_retryable()
        );
        assert!(!KvError::ReadOnly.is_retryable());
        assert!(!KvError::KeyTooLarge { len: 1, max: 0 }.is_retryable());
    }

    /// `run`'s waits are the backoff seeded with its first transaction's
    /// serial number, on tokio's clock; out of attempts, the caller gets the
    /// last error itself.
    #[tokio::test(start_paused = true)]
    async fn run_waits_are_seeded_by_the_first_transactions_serial() {
        let kv = mem::MemKv::new();
        // Two transactions before it: the run's first has serial 2.
        for _ in 0..2 {
            kv.begin().expect("begin").commit().await.expect("commit");
        }
        let options = RetryOptions {
            attempts_max: 4,
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(80)),
        };
        let started = tokio::time::Instant::now();
        let mut serials = Vec::new();
        let result: Result<(), KvError> = run(&kv, &options, |tx| {
            serials.push(tx.serial());
            async { Err(KvError::Conflict) }
        })
        .await;
        assert!(matches!(result, Err(KvError::Conflict)), "{result:?}");
        assert_eq!(serials, [2, 3, 4, 5]);
        let waits: Duration = (1..=3).map(|retry| options.backoff.wait(retry, 2)).sum();
        // Tokio's timer rounds each wait up to its next millisecond.
        let waited = started.elapsed();
        assert!(
            waited >= waits && waited <= waits + Duration::from_millis(3),
            "{waited:?} vs {waits:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_callers_own_error_is_not_retried() {
        let kv = mem::MemKv::new();
        let mut calls = 0;
        let result: Result<(), KvError> = run_read_only(&kv, &RetryOptions::default(), |_tx| {
            calls += 1;
            async { Err(KvError::ReadOnly) }
        })
        .await;
        assert!(matches!(result, Err(KvError::ReadOnly)), "{result:?}");
        assert_eq!(calls, 1);
    }
}
