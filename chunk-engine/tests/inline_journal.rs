//! The inline journal (`JournalMode::Inline`), where committers write the
//! journal themselves: group commit on a single-threaded runtime, the same
//! schedule giving the same batches, committer futures dropped in the middle
//! of a batch, and the `Send`/`Sync` bounds the storage service needs.

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Wake, Waker};

use common::*;
use flyfs_bypass::mem::MemDevice;
use flyfs_chunk_engine::{Engine, EngineStats, JournalMode, ReadRequest};
use flyfs_proto::ids::ChunkVersion;

/// A waker that records whether it was woken.
#[derive(Default)]
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Flag {
    fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

/// `commits` concurrent write-and-commit tasks on a current-thread runtime;
/// returns the engine's counters for that work.
fn concurrent_commits(commits: u32) -> EngineStats {
    let rt = runtime();
    let dev = SlowDevice::new(MemDevice::new(32 << 20, 4096));
    rt.block_on(async {
        let engine = format_and_open(&dev, &small_format(), JournalMode::Inline).await;
        let before = engine.stats();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..commits {
            let engine = engine.clone();
            // `spawn` needs the commit futures to be Send.
            tasks.spawn(async move {
                put(
                    &engine,
                    key(1, u64::from(i), 0),
                    1,
                    0,
                    &bytes(4096, i as u8),
                )
                .await
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("task");
        }
        let after = engine.stats();
        for i in 0..commits {
            assert_same(
                &contents(&engine, key(1, u64::from(i), 0)).await,
                &bytes(4096, i as u8),
            );
        }
        drop(engine);
        // Every acknowledged commit is durable.
        let engine = Engine::open(dev.clone(), pool(), config(JournalMode::Inline))
            .await
            .expect("reopen");
        assert_eq!(
            engine
                .chunks(flyfs_proto::ids::ChainId(1), .., usize::MAX)
                .len(),
            commits as usize
        );
        engine.check_consistency().expect("consistent");
        EngineStats {
            records: after.records - before.records,
            batches: after.batches - before.batches,
            checkpoints: after.checkpoints - before.checkpoints,
            ..EngineStats::default()
        }
    })
}

#[test]
fn inline_group_commits_on_a_current_thread_runtime() {
    let commits = 200;
    let stats = concurrent_commits(commits);
    assert_eq!(stats.records, u64::from(commits));
    // While one committer's batch is at the device, the others queue
    // behind it and go out together.
    assert!(
        stats.batches < stats.records / 10,
        "group commit should batch: {} batches for {commits} commits",
        stats.batches
    );
    // No thread completes work on its own, so the same schedule gives the
    // same batches: what a deterministic simulator needs.
    assert_eq!(concurrent_commits(commits), stats);
}

#[test]
fn inline_engine_and_its_futures_are_send_and_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let rt = runtime();
    let dev = MemDevice::new(32 << 20, 4096);
    let engine = rt.block_on(format_and_open(&dev, &small_format(), JournalMode::Inline));
    send_sync(&engine);
    let k = key(1, 1, 0);
    let write = engine.write(update(k, 1, 0, b"sent"));
    send(&write);
    rt.block_on(write).expect("write");
    let commit = engine.commit(k, ChunkVersion(1));
    send(&commit);
    rt.block_on(commit).expect("commit");
    let remove = engine.remove(k);
    send(&remove);
    assert!(rt.block_on(remove).expect("remove"));
}

/// A committer dropped while its batch waits for the flush, with a second
/// committer queued behind it: the drop wakes the second, which repeats the
/// abandoned batch and then writes its own; both commits are durable.
#[test]
fn dropped_committer_mid_batch_is_finished_by_the_next() {
    let rt = runtime();
    let mem = MemDevice::new(32 << 20, 4096);
    let dev = SlowDevice::new(mem.clone());
    let engine = rt.block_on(format_and_open(&dev, &small_format(), JournalMode::Inline));
    let (k1, k2) = (key(1, 1, 0), key(1, 2, 0));
    rt.block_on(async {
        engine
            .write(update(k1, 1, 0, b"first"))
            .await
            .expect("write");
        engine
            .write(update(k2, 1, 0, b"second"))
            .await
            .expect("write");
    });
    let before = engine.stats();
    dev.gate.close();

    let flag_a = Arc::new(Flag::default());
    let waker_a = Waker::from(flag_a.clone());
    let flag_b = Arc::new(Flag::default());
    let waker_b = Waker::from(flag_b.clone());
    let mut commit_b = Box::pin(engine.commit(k2, ChunkVersion(1)));
    {
        let mut commit_a = pin!(engine.commit(k1, ChunkVersion(1)));
        // A takes the writer role, writes its batch and reaches the flush.
        for _ in 0..4 {
            assert!(
                commit_a
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker_a))
                    .is_pending()
            );
            if dev.gate.waiting.load(Ordering::SeqCst) == 1 {
                break;
            }
        }
        assert_eq!(
            dev.gate.waiting.load(Ordering::SeqCst),
            1,
            "A waits in its batch's flush"
        );
        // B queues its record and waits for A.
        assert!(
            commit_b
                .as_mut()
                .poll(&mut Context::from_waker(&waker_b))
                .is_pending()
        );
        flag_b.take();
        assert!(engine.stat(k1).expect("k1").committed.is_none());
    }
    // A is dropped here, mid-batch: its record is not durable, not applied.
    assert!(
        flag_b.take(),
        "dropping the writer wakes the waiting committer"
    );
    assert!(engine.stat(k1).expect("k1").committed.is_none());
    assert_eq!(engine.stats(), before);

    dev.gate.open();
    let meta = rt.block_on(commit_b).expect("B commits");
    assert_eq!(meta.version, ChunkVersion(1));
    // B repeated A's batch (one record, k1) before its own.
    let after = engine.stats();
    assert_eq!(after.records - before.records, 2);
    assert_eq!(after.batches - before.batches, 2);
    let committed = engine
        .stat(k1)
        .expect("k1")
        .committed
        .expect("k1 committed");
    assert_eq!(committed.version, ChunkVersion(1));
    assert_eq!(
        rt.block_on(contents(&engine, k1)),
        b"first",
        "A's record was completed by B"
    );
    engine.check_consistency().expect("consistent");
    drop(engine);

    // Both are durable: after losing everything unflushed, both survive.
    mem.crash(7);
    let engine = rt
        .block_on(Engine::open(
            dev.clone(),
            pool(),
            config(JournalMode::Inline),
        ))
        .expect("recover");
    for (k, want) in [(k1, &b"first"[..]), (k2, &b"second"[..])] {
        let read = rt
            .block_on(engine.read(k, ReadRequest::whole_verified()))
            .expect("read after crash");
        assert_eq!(&read.data[..], want);
    }
    engine.check_consistency().expect("consistent after crash");
}

/// A committer dropped mid-batch with no one after it: its record is never
/// acknowledged, so a crash may keep it or lose it, but recovery must open a
/// consistent engine either way; and without a crash the next commit writes
/// it.
#[test]
fn dropped_committer_mid_batch_then_crash_or_next_commit() {
    for seed in 0..8u64 {
        let rt = runtime();
        let mem = MemDevice::new(32 << 20, 4096);
        let dev = SlowDevice::new(mem.clone());
        let engine = rt.block_on(format_and_open(&dev, &small_format(), JournalMode::Inline));
        let (k1, k2) = (key(1, 1, 0), key(1, 2, 0));
        rt.block_on(engine.write(update(k1, 1, 0, b"orphan")))
            .expect("write");
        dev.gate.close();
        let waker = Waker::from(Arc::new(Flag::default()));
        {
            let mut commit = pin!(engine.commit(k1, ChunkVersion(1)));
            while dev.gate.waiting.load(Ordering::SeqCst) == 0 {
                assert!(
                    commit
                        .as_mut()
                        .poll(&mut Context::from_waker(&waker))
                        .is_pending()
                );
            }
        }
        dev.gate.open();
        if seed % 2 == 0 {
            drop(engine);
            mem.crash(seed);
            let engine = rt
                .block_on(Engine::open(
                    dev.clone(),
                    pool(),
                    config(JournalMode::Inline),
                ))
                .expect("recover");
            engine.check_consistency().expect("consistent");
            if let Some(meta) = engine.stat(k1).and_then(|i| i.committed) {
                assert_eq!(meta.version, ChunkVersion(1));
                assert_eq!(rt.block_on(contents(&engine, k1)), b"orphan");
            }
        } else {
            rt.block_on(put(&engine, k2, 1, 0, b"next"));
            assert_eq!(
                engine.stat(k1).and_then(|i| i.committed).map(|m| m.version),
                Some(ChunkVersion(1)),
                "the next committer wrote the orphaned record"
            );
            assert_eq!(rt.block_on(contents(&engine, k1)), b"orphan");
            engine.check_consistency().expect("consistent");
        }
    }
}
