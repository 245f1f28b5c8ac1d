//! The conformance suite: one set of checks of the contract in [`super`]
//! (FoundationDB's semantics) that every backend must pass. It is library
//! code, not a test module, so that each backend's integration test (and a
//! FoundationDB run against a real cluster) calls the very same checks:
//! `kv/tests/conformance.rs` runs it against `MemKv`, `FjallKv` and,
//! when a cluster is configured, `FdbKv`.
//!
//! Each check takes a fresh, empty store and returns `Err` only for a KV
//! error it did not expect; a semantic violation panics with what was
//! expected. [`run_all`] runs every check and names each as it goes.
//!
//! Checks read limits from [`Kv::limits`], not from the limits they asked
//! `make` for, because a backend may not be able to change them
//! (FoundationDB's age limit is the cluster's five seconds).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flyfs_time::Backoff;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Kv, KvError, Limits, RangeOptions, RangeResult, RetryOptions, Transaction, run};

/// Runs every check, each on a store from `make(limits)`, printing a line
/// per check. Panics (naming the check) at the first failure.
pub async fn run_all<K: Kv>(make: impl Fn(Limits) -> K) {
    let limits = Limits::default();
    let started = Instant::now();
    check("get_set_clear", get_set_clear(make(limits))).await;
    check("read_your_writes", read_your_writes(make(limits))).await;
    check(
        "range_limit_reverse_more",
        range_limit_reverse_more(make(limits)),
    )
    .await;
    check("prefix_ranges", prefix_ranges(make(limits))).await;
    check(
        "snapshot_reads_do_not_conflict",
        snapshot_reads_do_not_conflict(make(limits)),
    )
    .await;
    check("lost_update_conflicts", lost_update_conflicts(make(limits))).await;
    check("write_skew_conflicts", write_skew_conflicts(make(limits))).await;
    check(
        "range_phantom_conflicts",
        range_phantom_conflicts(make(limits)),
    )
    .await;
    check(
        "explicit_read_conflict_ranges",
        explicit_read_conflict_ranges(make(limits)),
    )
    .await;
    check(
        "clear_range_covers_concurrent_inserts",
        clear_range_covers_concurrent_inserts(make(limits)),
    )
    .await;
    check(
        "limited_range_conflicts_cover_only_what_was_read",
        limited_range_conflicts_cover_only_what_was_read(make(limits)),
    )
    .await;
    check(
        "read_only_rejects_writes",
        read_only_rejects_writes(make(limits)),
    )
    .await;
    check(
        "finished_transaction_rejects_use",
        finished_transaction_rejects_use(make(limits)),
    )
    .await;
    check("size_limits", size_limits(make(limits))).await;
    check(
        "age_limit",
        age_limit(make(Limits {
            transaction_age_max: Duration::from_millis(200),
            ..limits
        })),
    )
    .await;
    check(
        "retry_helper_reruns_on_conflict",
        retry_helper_reruns_on_conflict(make(limits)),
    )
    .await;
    check(
        "concurrent_transactions_overlap",
        concurrent_transactions_overlap(make(limits)),
    )
    .await;
    check(
        "concurrent_transfers_conserve_money",
        concurrent_transfers_conserve_money(make(limits)),
    )
    .await;
    check(
        "concurrent_range_phantom_stress",
        concurrent_range_phantom_stress(make(limits)),
    )
    .await;
    println!(
        "kv conformance: all checks passed in {} ms",
        started.elapsed().as_millis()
    );
}

async fn check(name: &str, case: impl Future<Output = Result<(), KvError>>) {
    // Printed first so that an assertion failing inside names its check.
    println!("kv conformance: {name} ...");
    let started = Instant::now();
    match case.await {
        Ok(()) => println!(
            "kv conformance: {name} ... ok ({} ms)",
            started.elapsed().as_millis()
        ),
        Err(error) => panic!("kv conformance: {name} failed with an unexpected error: {error}"),
    }
}

// ---- helpers ----

/// Commits `pairs` in one transaction.
async fn put<K: Kv>(kv: &K, pairs: &[(&[u8], &[u8])]) -> Result<(), KvError> {
    let tx = kv.begin()?;
    for (key, value) in pairs {
        tx.set(key, value)?;
    }
    tx.commit().await
}

/// `key`'s committed value, read in a fresh transaction.
async fn read<K: Kv>(kv: &K, key: &[u8]) -> Result<Option<Bytes>, KvError> {
    kv.begin_read_only()?.get(key, false).await
}

fn keys(result: &RangeResult) -> Vec<String> {
    result
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

fn is_conflict<T: std::fmt::Debug>(result: &Result<T, KvError>) -> bool {
    matches!(result, Err(KvError::Conflict))
}

fn u64_value(value: Option<Bytes>) -> u64 {
    let value = value.expect("the key was written by the check");
    u64::from_be_bytes(
        value[..]
            .try_into()
            .expect("the check writes 8-byte numbers"),
    )
}

/// A size error may come from the write itself (the embedded backends
/// check at once) or only from the commit (FoundationDB checks there); the
/// commit must fail with it either way.
async fn expect_rejected<T: Transaction>(
    tx: &T,
    write: Result<(), KvError>,
    expected: fn(&KvError) -> bool,
    what: &str,
) {
    if let Err(error) = &write {
        assert!(expected(error), "{what}: the write failed with {error:?}");
    }
    let commit = tx.commit().await;
    assert!(
        commit.as_ref().is_err_and(expected),
        "{what}: commit returned {commit:?}"
    );
}

// ---- single-transaction semantics ----

/// Set, overwrite, get and clear, within a transaction and across commits.
pub async fn get_set_clear<K: Kv>(kv: K) -> Result<(), KvError> {
    let tx = kv.begin()?;
    assert_eq!(tx.get(b"a", false).await?, None, "empty store");
    tx.set(b"a", b"1")?;
    tx.set(b"b", b"2")?;
    tx.set(b"a", b"3")?;
    assert_eq!(tx.get(b"a", false).await?.as_deref(), Some(&b"3"[..]));
    tx.commit().await?;
    assert_eq!(read(&kv, b"a").await?.as_deref(), Some(&b"3"[..]));
    assert_eq!(read(&kv, b"b").await?.as_deref(), Some(&b"2"[..]));

    let tx = kv.begin()?;
    tx.clear(b"a")?;
    tx.clear(b"never-existed")?;
    assert_eq!(tx.get(b"a", false).await?, None, "a clear is read back");
    tx.commit().await?;
    assert_eq!(read(&kv, b"a").await?, None);
    assert_eq!(read(&kv, b"b").await?.as_deref(), Some(&b"2"[..]));

    // Empty values and the empty key are ordinary.
    put(&kv, &[(b"", b"empty key"), (b"e", b"")]).await?;
    assert_eq!(read(&kv, b"").await?.as_deref(), Some(&b"empty key"[..]));
    assert_eq!(read(&kv, b"e").await?.as_deref(), Some(&b""[..]));

    // An uncommitted transaction leaves nothing behind.
    let tx = kv.begin()?;
    tx.set(b"dropped", b"x")?;
    drop(tx);
    assert_eq!(read(&kv, b"dropped").await?, None);
    Ok(())
}

/// A transaction sees its own sets, clears and range clears, in point and
/// range reads, forward and reverse, layered over committed data.
pub async fn read_your_writes<K: Kv>(kv: K) -> Result<(), KvError> {
    put(
        &kv,
        &[
            (b"a", b"0"),
            (b"b", b"0"),
            (b"c", b"0"),
            (b"d", b"0"),
            (b"e", b"0"),
            (b"f", b"0"),
        ],
    )
    .await?;
    let tx = kv.begin()?;
    tx.set(b"bb", b"1")?;
    tx.clear(b"c")?;
    tx.set(b"a", b"1")?;
    tx.clear_range(b"d", b"f")?;
    tx.set(b"e", b"1")?; // set again inside the cleared range
    tx.set(b"dd", b"1")?;
    tx.clear(b"dd")?; // set then cleared
    assert_eq!(tx.get(b"a", false).await?.as_deref(), Some(&b"1"[..]));
    assert_eq!(tx.get(b"c", false).await?, None);
    assert_eq!(tx.get(b"d", false).await?, None);
    assert_eq!(tx.get(b"e", false).await?.as_deref(), Some(&b"1"[..]));
    assert_eq!(
        tx.get(b"dd", true).await?,
        None,
        "snapshot reads see own writes too"
    );

    let all = tx.get_range(&RangeOptions::new("a", "z")).await?;
    assert_eq!(keys(&all), ["a", "b", "bb", "e", "f"]);
    assert_eq!(&all.kvs[0].value[..], b"1", "the overwritten value");
    assert!(!all.more);
    let back = tx
        .get_range(&RangeOptions::new("a", "z").reverse(true))
        .await?;
    assert_eq!(keys(&back), ["f", "e", "bb", "b", "a"]);
    let limited = tx
        .get_range(&RangeOptions::new("b", "z").limit(2).snapshot(true))
        .await?;
    assert_eq!(keys(&limited), ["b", "bb"]);
    assert!(limited.more);

    // A range clear over keys this transaction set hides them as well.
    tx.clear_range(b"a", b"bc")?;
    let rest = tx.get_range(&RangeOptions::new("", "z")).await?;
    assert_eq!(keys(&rest), ["e", "f"]);
    tx.commit().await?;

    let after = kv
        .begin_read_only()?
        .get_range(&RangeOptions::new("", "z"))
        .await?;
    assert_eq!(
        keys(&after),
        ["e", "f"],
        "committed state matches what the tx read"
    );
    Ok(())
}

/// Range reads: bounds, limit, reverse, the `more` flag, invalid ranges.
pub async fn range_limit_reverse_more<K: Kv>(kv: K) -> Result<(), KvError> {
    let tx = kv.begin()?;
    for i in 0..10 {
        tx.set(format!("k{i}").as_bytes(), format!("v{i}").as_bytes())?;
    }
    tx.commit().await?;
    let tx = kv.begin()?;
    let all = RangeOptions::new("k", "l");
    let names = |range: &[i32]| range.iter().map(|i| format!("k{i}")).collect::<Vec<_>>();

    let result = tx.get_range(&all.clone().limit(3)).await?;
    assert_eq!(keys(&result), names(&[0, 1, 2]));
    assert!(result.more, "limit 3 of 10 leaves more");
    assert_eq!(&result.kvs[1].value[..], b"v1");

    for limit in [0, 10, 11] {
        let result = tx.get_range(&all.clone().limit(limit)).await?;
        assert_eq!(result.kvs.len(), 10, "limit {limit}");
        assert!(!result.more, "limit {limit} reads to the end");
    }

    let result = tx.get_range(&all.clone().limit(3).reverse(true)).await?;
    assert_eq!(keys(&result), names(&[9, 8, 7]));
    assert!(result.more);
    let result = tx.get_range(&all.clone().reverse(true)).await?;
    assert_eq!(keys(&result), names(&[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]));

    let result = tx.get_range(&RangeOptions::new("k3", "k6")).await?;
    assert_eq!(keys(&result), names(&[3, 4, 5]), "end is exclusive");
    let result = tx
        .get_range(&RangeOptions::new("k3", "k6").reverse(true).limit(2))
        .await?;
    assert_eq!(keys(&result), names(&[5, 4]));
    assert!(result.more);
    let result = tx.get_range(&RangeOptions::new("k3", "k3")).await?;
    assert!(result.kvs.is_empty() && !result.more, "an empty range");
    let result = tx.get_range(&RangeOptions::new("x", "z")).await?;
    assert!(
        result.kvs.is_empty() && !result.more,
        "a range with no keys"
    );

    let inverted = tx.get_range(&RangeOptions::new("k6", "k3")).await;
    assert!(
        matches!(inverted, Err(KvError::InvalidRange { .. })),
        "begin after end: {inverted:?}"
    );
    Ok(())
}

/// `RangeOptions::prefix` covers exactly the keys starting with the prefix,
/// including ones with 0xff bytes after it.
pub async fn prefix_ranges<K: Kv>(kv: K) -> Result<(), KvError> {
    let keys_in: [&[u8]; 7] = [
        b"aa\xff",
        b"ab",
        b"ab\x00",
        b"ab/x",
        b"ab\xff",
        b"ab\xff\xff",
        b"ac",
    ];
    let tx = kv.begin()?;
    for key in keys_in {
        tx.set(key, b"v")?;
    }
    tx.commit().await?;
    let tx = kv.begin()?;
    let raw = |result: RangeResult| result.kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
    let found = raw(tx.get_range(&RangeOptions::prefix(b"ab")).await?);
    assert_eq!(found, keys_in[1..6].to_vec(), "prefix ab");
    let found = raw(tx.get_range(&RangeOptions::prefix(b"ab\xff")).await?);
    assert_eq!(found, keys_in[4..6].to_vec(), "prefix ab\\xff");
    let found = raw(tx
        .get_range(&RangeOptions::prefix(b"ab").reverse(true).limit(1))
        .await?);
    assert_eq!(
        found,
        vec![Bytes::from_static(b"ab\xff\xff")],
        "last key under ab"
    );
    Ok(())
}

// ---- conflicts ----

/// Snapshot reads record no conflict: a concurrent write to what was read
/// that way does not fail the commit.
pub async fn snapshot_reads_do_not_conflict<K: Kv>(kv: K) -> Result<(), KvError> {
    put(&kv, &[(b"x", b"1"), (b"r/1", b"1")]).await?;
    let reader = kv.begin()?;
    assert_eq!(reader.get(b"x", true).await?.as_deref(), Some(&b"1"[..]));
    let range = reader
        .get_range(&RangeOptions::prefix(b"r/").snapshot(true))
        .await?;
    assert_eq!(range.kvs.len(), 1);

    put(&kv, &[(b"x", b"2"), (b"r/2", b"2")]).await?;
    // The reader still sees its snapshot...
    assert_eq!(reader.get(b"x", true).await?.as_deref(), Some(&b"1"[..]));
    reader.set(b"y", b"derived from a snapshot read")?;
    // ...and commits: nothing it read serializably was written.
    reader.commit().await?;
    Ok(())
}

/// Lost update: two transactions read the same counter and both write it
/// back incremented; the second commit must conflict.
pub async fn lost_update_conflicts<K: Kv>(kv: K) -> Result<(), KvError> {
    put(&kv, &[(b"counter", &100u64.to_be_bytes())]).await?;
    let first = kv.begin()?;
    let second = kv.begin()?;
    let seen_first = u64_value(first.get(b"counter", false).await?);
    let seen_second = u64_value(second.get(b"counter", false).await?);
    first.set(b"counter", &(seen_first + 1).to_be_bytes())?;
    second.set(b"counter", &(seen_second + 1).to_be_bytes())?;
    first.commit().await?;
    let result = second.commit().await;
    assert!(is_conflict(&result), "lost update not detected: {result:?}");
    assert_eq!(u64_value(read(&kv, b"counter").await?), 101);

    // A transaction that only writes (reads nothing) does not conflict.
    let blind = kv.begin()?;
    let writer = kv.begin()?;
    blind.set(b"counter", &7u64.to_be_bytes())?;
    writer.set(b"counter", &8u64.to_be_bytes())?;
    writer.commit().await?;
    blind.commit().await?;
    assert_eq!(
        u64_value(read(&kv, b"counter").await?),
        7,
        "last writer wins"
    );
    Ok(())
}

/// Write skew: two on-call doctors each see the other on call and go off
/// call. Each writes only its own key, so only read conflicts catch it.
pub async fn write_skew_conflicts<K: Kv>(kv: K) -> Result<(), KvError> {
    put(&kv, &[(b"oncall/alice", b"1"), (b"oncall/bob", b"1")]).await?;
    let alice = kv.begin()?;
    let bob = kv.begin()?;
    for tx in [&alice, &bob] {
        let on_call = tx.get(b"oncall/alice", false).await?.as_deref() == Some(b"1")
            && tx.get(b"oncall/bob", false).await?.as_deref() == Some(b"1");
        assert!(on_call);
    }
    alice.set(b"oncall/alice", b"0")?;
    bob.set(b"oncall/bob", b"0")?;
    alice.commit().await?;
    let result = bob.commit().await;
    assert!(is_conflict(&result), "write skew not detected: {result:?}");
    assert_eq!(read(&kv, b"oncall/bob").await?.as_deref(), Some(&b"1"[..]));
    Ok(())
}

/// Phantom: a key inserted into a range another transaction read (where no
/// key existed before) must conflict that transaction; an insert outside
/// the range must not.
pub async fn range_phantom_conflicts<K: Kv>(kv: K) -> Result<(), KvError> {
    put(&kv, &[(b"dir/a", b"")]).await?;
    let counter = kv.begin()?;
    let listed = counter.get_range(&RangeOptions::prefix(b"dir/")).await?;
    assert_eq!(listed.kvs.len(), 1);
    put(&kv, &[(b"dir/b", b"")]).await?;
    counter.set(b"count", &(listed.kvs.len() as u64).to_be_bytes())?;
    let result = counter.commit().await;
    assert!(
        is_conflict(&result),
        "phantom insert not detected: {result:?}"
    );

    let counter = kv.begin()?;
    let listed = counter.get_range(&RangeOptions::prefix(b"dir/")).await?;
    put(&kv, &[(b"dis", b""), (b"dir0", b"")]).await?;
    counter.set(b"count", &(listed.kvs.len() as u64).to_be_bytes())?;
    counter.commit().await?;

    // A delete inside a read range conflicts too.
    let counter = kv.begin()?;
    counter.get_range(&RangeOptions::prefix(b"dir/")).await?;
    let deleter = kv.begin()?;
    deleter.clear_range(b"dir/", b"dir0")?;
    deleter.commit().await?;
    counter.set(b"count", b"stale")?;
    let result = counter.commit().await;
    assert!(
        is_conflict(&result),
        "range delete not detected: {result:?}"
    );
    Ok(())
}

/// Explicit read-conflict ranges conflict like reads, without reading.
pub async fn explicit_read_conflict_ranges<K: Kv>(kv: K) -> Result<(), KvError> {
    let guarded = kv.begin()?;
    guarded.add_read_conflict_range(b"lock/a", b"lock/m")?;
    guarded.set(b"result", b"1")?;
    put(&kv, &[(b"lock/c", b"")]).await?;
    let result = guarded.commit().await;
    assert!(is_conflict(&result), "conflict range ignored: {result:?}");

    let guarded = kv.begin()?;
    guarded.add_read_conflict_range(b"lock/a", b"lock/m")?;
    guarded.set(b"result", b"2")?;
    put(&kv, &[(b"lock/m", b""), (b"lock/", b"")]).await?;
    guarded.commit().await?; // both writes fall outside [lock/a, lock/m)

    let guarded = kv.begin()?;
    guarded.add_read_conflict_key(b"single")?;
    guarded.set(b"result", b"3")?;
    put(&kv, &[(b"single\0", b"")]).await?; // the next key, not this one
    guarded.commit().await?;
    let guarded = kv.begin()?;
    guarded.add_read_conflict_key(b"single")?;
    guarded.set(b"result", b"4")?;
    put(&kv, &[(b"single", b"")]).await?;
    let result = guarded.commit().await;
    assert!(is_conflict(&result), "conflict key ignored: {result:?}");

    let tx = kv.begin()?;
    let inverted = tx.add_read_conflict_range(b"b", b"a");
    assert!(
        matches!(inverted, Err(KvError::InvalidRange { .. })),
        "{inverted:?}"
    );
    Ok(())
}

/// A range clear whose transaction commits after another transaction
/// inserted into the range must leave the range empty: it is ordered after
/// the insert. (FoundationDB clears blindly at commit; a backend that can
/// only delete the keys its snapshot saw must conflict and retry instead.)
pub async fn clear_range_covers_concurrent_inserts<K: Kv>(kv: K) -> Result<(), KvError> {
    put(&kv, &[(b"t/old", b"")]).await?;
    let attempts = AtomicU32::new(0);
    run(&kv, &RetryOptions::default(), |tx| {
        let first = attempts.fetch_add(1, Ordering::SeqCst) == 0;
        let kv = kv.clone();
        async move {
            tx.clear_range(b"t/", b"t0")?;
            if first {
                // Inserted after this transaction's snapshot, before its commit.
                put(&kv, &[(b"t/new", b"")]).await?;
            }
            Ok::<_, KvError>(())
        }
    })
    .await?;
    let left = kv
        .begin_read_only()?
        .get_range(&RangeOptions::prefix(b"t/"))
        .await?;
    assert_eq!(
        keys(&left),
        Vec::<String>::new(),
        "a key survived the range clear"
    );
    Ok(())
}

/// A range read cut short by its limit conflicts only over the part it
/// read (through the first key it did not return, which `more` depends
/// on), forward and reverse.
pub async fn limited_range_conflicts_cover_only_what_was_read<K: Kv>(kv: K) -> Result<(), KvError> {
    let tx = kv.begin()?;
    for i in 0..10 {
        tx.set(format!("l/{i}").as_bytes(), b"")?;
    }
    tx.commit().await?;
    let all = RangeOptions::prefix(b"l/");

    // Forward: reads l/0..l/2 (and looks at l/3 for `more`).
    let reader = kv.begin()?;
    assert_eq!(
        keys(&reader.get_range(&all.clone().limit(3)).await?),
        ["l/0", "l/1", "l/2"]
    );
    put(&kv, &[(b"l/8", b"changed"), (b"l/85", b"new")]).await?;
    reader.set(b"out", b"")?;
    reader.commit().await?;

    let reader = kv.begin()?;
    reader.get_range(&all.clone().limit(3)).await?;
    put(&kv, &[(b"l/1", b"changed")]).await?;
    reader.set(b"out", b"")?;
    let result = reader.commit().await;
    assert!(is_conflict(&result), "write into the part read: {result:?}");

    // Reverse: reads l/9, l/85, l/8 (and looks at l/7).
    let reader = kv.begin()?;
    let back = reader
        .get_range(&all.clone().limit(3).reverse(true))
        .await?;
    assert_eq!(keys(&back), ["l/9", "l/85", "l/8"]);
    put(&kv, &[(b"l/1", b"again"), (b"l/05", b"new")]).await?;
    reader.set(b"out", b"")?;
    reader.commit().await?;

    let reader = kv.begin()?;
    reader
        .get_range(&all.clone().limit(3).reverse(true))
        .await?;
    put(&kv, &[(b"l/99", b"new")]).await?;
    reader.set(b"out", b"")?;
    let result = reader.commit().await;
    assert!(
        is_conflict(&result),
        "insert into the part read in reverse: {result:?}"
    );
    Ok(())
}

/// A read-only transaction reads but refuses every write.
pub async fn read_only_rejects_writes<K: Kv>(kv: K) -> Result<(), KvError> {
    put(&kv, &[(b"a", b"1")]).await?;
    let tx = kv.begin_read_only()?;
    assert_eq!(tx.get(b"a", false).await?.as_deref(), Some(&b"1"[..]));
    assert!(matches!(tx.set(b"a", b"2"), Err(KvError::ReadOnly)));
    assert!(matches!(tx.clear(b"a"), Err(KvError::ReadOnly)));
    assert!(matches!(tx.clear_range(b"a", b"b"), Err(KvError::ReadOnly)));
    put(&kv, &[(b"a", b"3")]).await?;
    // It never conflicts: commit only ends it.
    tx.commit().await?;
    assert_eq!(read(&kv, b"a").await?.as_deref(), Some(&b"3"[..]));
    Ok(())
}

/// After commit every operation fails with `Finished`.
pub async fn finished_transaction_rejects_use<K: Kv>(kv: K) -> Result<(), KvError> {
    let tx = kv.begin()?;
    tx.set(b"a", b"1")?;
    tx.commit().await?;
    let finished = |result: &Result<(), KvError>| matches!(result, Err(KvError::Finished { .. }));
    assert!(finished(&tx.set(b"b", b"1")));
    assert!(finished(&tx.get(b"a", false).await.map(|_| ())));
    assert!(finished(&tx.commit().await));
    assert_eq!(read(&kv, b"b").await?, None);
    Ok(())
}

/// Key, value and transaction sizes over the limits are refused, and what
/// fits exactly is accepted.
pub async fn size_limits<K: Kv>(kv: K) -> Result<(), KvError> {
    let limits = kv.limits();
    let largest_key = vec![b'k'; limits.key_bytes_max];
    let largest_value = vec![b'v'; limits.value_bytes_max];
    put(&kv, &[(&largest_key, &largest_value)]).await?;
    assert_eq!(
        read(&kv, &largest_key).await?.map(|v| v.len()),
        Some(limits.value_bytes_max)
    );

    let tx = kv.begin()?;
    let write = tx.set(&vec![b'k'; limits.key_bytes_max + 1], b"v");
    expect_rejected(
        &tx,
        write,
        |e| matches!(e, KvError::KeyTooLarge { .. }),
        "large key",
    )
    .await;

    let tx = kv.begin()?;
    let write = tx.set(b"small", &vec![b'v'; limits.value_bytes_max + 1]);
    let is_value_error = |e: &KvError| matches!(e, KvError::ValueTooLarge { .. });
    expect_rejected(&tx, write, is_value_error, "large value").await;

    // Enough largest-value writes to pass the transaction limit.
    let tx = kv.begin()?;
    let mut write = Ok(());
    let writes_needed = limits.transaction_bytes_max / limits.value_bytes_max + 1;
    for i in 0..writes_needed {
        write = tx.set(format!("big/{i:06}").as_bytes(), &largest_value);
        if write.is_err() {
            break;
        }
    }
    let is_size_error = |e: &KvError| matches!(e, KvError::TransactionTooLarge { .. });
    expect_rejected(&tx, write, is_size_error, "large transaction").await;
    let leaked = kv
        .begin_read_only()?
        .get_range(&RangeOptions::prefix(b"big/").limit(1))
        .await?;
    assert!(leaked.kvs.is_empty(), "a refused transaction wrote nothing");
    Ok(())
}

/// A transaction older than the age limit fails with `TooOld`, and the
/// retry helper still gets a fresh one through.
pub async fn age_limit<K: Kv>(kv: K) -> Result<(), KvError> {
    let age_max = kv.limits().transaction_age_max;
    put(&kv, &[(b"a", b"1")]).await?;
    let tx = kv.begin()?;
    tx.get(b"a", false).await?;
    tokio::time::sleep(age_max + Duration::from_millis(100)).await;
    let late_read = tx.get(b"a", false).await;
    if !matches!(late_read, Err(KvError::TooOld { .. })) {
        tx.set(b"a", b"2")?;
        let late_commit = tx.commit().await;
        assert!(
            matches!(late_commit, Err(KvError::TooOld { .. })),
            "an old transaction read {late_read:?} and committed {late_commit:?}"
        );
    }
    assert!(
        KvError::TooOld {
            age_ms: 0,
            max_ms: 0
        }
        .is_retryable()
    );
    let value = run(&kv, &RetryOptions::default(), |tx| async move {
        tx.get(b"a", false).await
    })
    .await?;
    assert_eq!(value.as_deref(), Some(&b"1"[..]));
    Ok(())
}

/// `kv::run` reruns a body whose commit conflicted, and does not rerun a
/// body that failed with a non-retryable error.
pub async fn retry_helper_reruns_on_conflict<K: Kv>(kv: K) -> Result<(), KvError> {
    put(&kv, &[(b"n", &0u64.to_be_bytes())]).await?;
    let attempts = Arc::new(AtomicU32::new(0));
    let options = RetryOptions {
        backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(10)),
        ..RetryOptions::default()
    };
    let final_value = run(&kv, &options, |tx| {
        let kv = kv.clone();
        let attempts = attempts.clone();
        async move {
            let n = u64_value(tx.get(b"n", false).await?);
            if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                // Someone else bumps n between our read and our commit.
                put(&kv, &[(b"n", &(n + 10).to_be_bytes())]).await?;
            }
            tx.set(b"n", &(n + 1).to_be_bytes())?;
            Ok::<_, KvError>(n + 1)
        }
    })
    .await?;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2,
        "one conflict, one rerun"
    );
    assert_eq!(final_value, 11);
    assert_eq!(u64_value(read(&kv, b"n").await?), 11);

    let attempts = AtomicU32::new(0);
    let result = run(&kv, &options, |_tx| {
        attempts.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(KvError::ReadOnly) }
    })
    .await;
    assert!(matches!(result, Err(KvError::ReadOnly)));
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "not retryable, not rerun"
    );
    Ok(())
}

// ---- concurrency ----

/// Several transactions open at once, each reading and writing its own
/// keys, all commit: transactions are not serialized behind one another.
pub async fn concurrent_transactions_overlap<K: Kv>(kv: K) -> Result<(), KvError> {
    let txs = (0..8).map(|_| kv.begin()).collect::<Result<Vec<_>, _>>()?;
    for (i, tx) in txs.iter().enumerate() {
        assert_eq!(tx.get(format!("own/{i}").as_bytes(), false).await?, None);
        tx.set(format!("own/{i}").as_bytes(), b"done")?;
    }
    let commits = txs
        .into_iter()
        .map(|tx| tokio::spawn(async move { tx.commit().await }));
    for commit in commits {
        commit.await.expect("commit task panicked")?;
    }
    let all = kv
        .begin_read_only()?
        .get_range(&RangeOptions::prefix(b"own/"))
        .await?;
    assert_eq!(all.kvs.len(), 8);
    Ok(())
}

const ACCOUNTS: usize = 8;
const ACCOUNT_START: u64 = 100;

fn account(i: usize) -> Vec<u8> {
    format!("acct/{i}").into_bytes()
}

/// Many tasks move money between accounts concurrently through `kv::run`
/// (read two balances, write both). Serializability means no money is
/// created or lost and no balance goes negative, however the transactions
/// interleave and retry.
pub async fn concurrent_transfers_conserve_money<K: Kv>(kv: K) -> Result<(), KvError> {
    const TASKS: u64 = 8;
    const TRANSFERS_PER_TASK: usize = 25;
    let tx = kv.begin()?;
    for i in 0..ACCOUNTS {
        tx.set(&account(i), &ACCOUNT_START.to_be_bytes())?;
    }
    tx.commit().await?;

    let attempts = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for seed in 0..TASKS {
        let kv = kv.clone();
        let attempts = attempts.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let options = RetryOptions {
                backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(20)),
                ..RetryOptions::default()
            };
            let mut moved = 0;
            for _ in 0..TRANSFERS_PER_TASK {
                let from = rng.random_range(0..ACCOUNTS);
                let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
                let amount = rng.random_range(1..=60u64);
                let done = run(&kv, &options, |tx| {
                    let attempts = attempts.clone();
                    async move {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let from_balance = u64_value(tx.get(&account(from), false).await?);
                        // Hold the transaction open a moment so that the
                        // other tasks' transactions overlap it (a yield is
                        // not enough: tokio keeps polling a yielding task
                        // from its worker's local queue).
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let to_balance = u64_value(tx.get(&account(to), false).await?);
                        if from_balance < amount {
                            return Ok(false);
                        }
                        tx.set(&account(from), &(from_balance - amount).to_be_bytes())?;
                        tx.set(&account(to), &(to_balance + amount).to_be_bytes())?;
                        Ok::<_, KvError>(true)
                    }
                })
                .await?;
                moved += usize::from(done);
            }
            Ok::<_, KvError>(moved)
        }));
    }
    let mut moved = 0;
    for task in tasks {
        moved += task.await.expect("transfer task panicked")?;
    }

    let balances = kv
        .begin_read_only()?
        .get_range(&RangeOptions::prefix(b"acct/"))
        .await?;
    assert_eq!(balances.kvs.len(), ACCOUNTS);
    let total: u64 = balances
        .kvs
        .iter()
        .map(|kv| u64_value(Some(kv.value.clone())))
        .sum();
    // u64 balances cannot go negative; an underflow would have panicked in
    // debug builds or shown up here as a huge total in release builds.
    assert_eq!(
        total,
        ACCOUNT_START * ACCOUNTS as u64,
        "money was created or lost"
    );
    let total_transfers = TASKS as usize * TRANSFERS_PER_TASK;
    let attempts = attempts.load(Ordering::Relaxed);
    assert!(
        moved > total_transfers / 2,
        "only {moved} transfers went through"
    );
    assert!(
        attempts > total_transfers,
        "no transfer ever conflicted: the transactions did not overlap, so this checked nothing"
    );
    println!(
        "kv conformance:   {moved} of {total_transfers} transfers moved money; {attempts} \
         attempts, so {} conflicts were retried",
        attempts - total_transfers
    );
    Ok(())
}

/// Many tasks each insert into a set only while a range read shows fewer
/// than `CAPACITY` members. Only phantom detection keeps concurrent
/// inserters from overfilling it.
pub async fn concurrent_range_phantom_stress<K: Kv>(kv: K) -> Result<(), KvError> {
    const CAPACITY: usize = 5;
    const TASKS: usize = 8;
    const TRIES_PER_TASK: usize = 3;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            let options = RetryOptions {
                backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(20)),
                ..RetryOptions::default()
            };
            let mut inserted = 0;
            for attempt in 0..TRIES_PER_TASK {
                let member = format!("set/{task}-{attempt}");
                let added = run(&kv, &options, |tx| {
                    let member = member.clone();
                    async move {
                        let members = tx.get_range(&RangeOptions::prefix(b"set/")).await?;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        if members.kvs.len() >= CAPACITY {
                            return Ok(false);
                        }
                        tx.set(member.as_bytes(), b"")?;
                        Ok::<_, KvError>(true)
                    }
                })
                .await?;
                inserted += usize::from(added);
            }
            Ok::<_, KvError>(inserted)
        }));
    }
    let mut inserted = 0;
    for task in tasks {
        inserted += task.await.expect("inserter task panicked")?;
    }
    let members = kv
        .begin_read_only()?
        .get_range(&RangeOptions::prefix(b"set/"))
        .await?;
    assert_eq!(
        inserted,
        members.kvs.len(),
        "every successful insert is there"
    );
    assert_eq!(
        members.kvs.len(),
        CAPACITY,
        "the set was over- or under-filled: phantoms were missed"
    );
    Ok(())
}
