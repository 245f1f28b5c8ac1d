//! Functional tests of the chunk engine on the in-memory device: every
//! operation, its errors, durability across reopen, and bad devices. Each
//! runs in both journal modes (`name::thread`, `name::inline`).

mod common;

use common::*;
use flyfs_bypass::fault::{Fault, FaultyDevice};
use flyfs_bypass::mem::MemDevice;
use flyfs_bypass::{BlockDevice, IoOp};
use flyfs_chunk_engine::format::SUPERBLOCK_OFFSETS;
use flyfs_chunk_engine::{
    Engine, EngineError, FormatOptions, JournalMode, ReadRequest, ReadVersion, WriteOp,
};
use flyfs_proto::ids::{ChainId, ChunkVersion, InodeId};

const MIB: u64 = 1 << 20;

both_modes!(
    write_commit_read_and_reopen,
    pending_versions_are_invisible_until_committed,
    appends_go_in_place_and_overwrites_copy_on_write,
    truncate_remove_and_queries,
    replace_and_bad_requests,
    failed_write_poisons_until_reopen,
    failed_flush_fails_the_commit_and_poisons,
    corrupt_reads_are_detected_when_verifying,
    concurrent_commits_share_journal_batches,
    journal_wraps_and_checkpoints_many_times,
    bad_devices_give_clear_errors,
    damaged_checkpoint_falls_back_or_refuses,
    a_damaged_restart_checkpoint_falls_back_and_replays_past_it,
    readers_never_see_torn_chunks_while_writers_commit,
    prepared_versions_are_durable_and_commit_without_io,
    small_overwrites_are_patches,
    whole_block_patches_read_nothing_and_keep_the_crc_exact,
    a_patch_whose_record_fails_poisons_and_leaves_the_committed_version,
    superblock_repair_survives_power_cuts,
    a_checkpoint_never_writes_patches_into_a_slot_its_chunk_left,
);

fn mem() -> MemDevice {
    MemDevice::new(32 * MIB, 4096)
}

fn write_commit_read_and_reopen(mode: JournalMode) {
    let rt = runtime();
    let dev = mem();
    rt.block_on(async {
        let engine = format_and_open(&dev, &small_format(), mode).await;
        let k = key(1, 7, 0);
        let data = bytes(10_000, 1);
        let outcome = put(&engine, k, 1, 0, &data).await;
        assert_eq!(outcome.len, 10_000);
        assert_eq!(outcome.crc, crc32c::crc32c(&data));
        assert_same(&contents(&engine, k).await, &data);
        // A sub-range read that is not sector aligned.
        let part = engine
            .read(k, ReadRequest::committed(4000, 300))
            .await
            .expect("read");
        assert_eq!(&part.data[..], &data[4000..4300]);
        // Reads past the end are clamped.
        let tail = engine
            .read(k, ReadRequest::committed(9_990, 100))
            .await
            .expect("read");
        assert_eq!(tail.data.len(), 10);
        assert!(
            engine
                .read(k, ReadRequest::committed(20_000, 10))
                .await
                .expect("read")
                .data
                .is_empty()
        );
        drop(engine);
        let engine = Engine::open(dev.clone(), pool(), config(mode))
            .await
            .expect("reopen");
        assert_same(&contents(&engine, k).await, &data);
        let info = engine.stat(k).expect("stat");
        assert_eq!(info.committed.map(|m| m.version), Some(ChunkVersion(1)));
        engine.check_consistency().expect("consistent");
    });
}

fn pending_versions_are_invisible_until_committed(mode: JournalMode) {
    let rt = runtime();
    rt.block_on(async {
        let engine = format_and_open(&mem(), &small_format(), mode).await;
        let k = key(1, 1, 0);
        put(&engine, k, 1, 0, &bytes(8192, 1)).await;
        engine
            .write(update(k, 2, 100, b"new bytes"))
            .await
            .expect("write");
        let committed = contents(&engine, k).await;
        assert_eq!(committed, bytes(8192, 1));
        let pending = engine
            .read(
                k,
                ReadRequest {
                    offset: 100,
                    len: 9,
                    version: ReadVersion::Pending,
                    verify: true,
                },
            )
            .await
            .expect("pending read");
        assert_eq!(&pending.data[..], b"new bytes");
        let exact = engine
            .read(
                k,
                ReadRequest {
                    offset: 0,
                    len: 4,
                    version: ReadVersion::Exact(ChunkVersion(1)),
                    verify: false,
                },
            )
            .await;
        assert_eq!(exact.expect("v1").version, ChunkVersion(1));
        // Abort: the pending version goes away, its slot is freed.
        engine.abort(k, ChunkVersion(2)).await.expect("abort");
        assert!(engine.stat(k).expect("stat").pending.is_none());
        engine.check_consistency().expect("consistent");
        // A version at or below the committed one is refused.
        let err = engine
            .write(update(k, 1, 0, b"x"))
            .await
            .expect_err("stale version");
        assert!(matches!(err, EngineError::VersionConflict { .. }), "{err}");
        // Committing a version that does not exist is refused; committing the
        // committed version again succeeds (retry).
        assert!(engine.commit(k, ChunkVersion(5)).await.is_err());
        assert_eq!(
            engine
                .commit(k, ChunkVersion(1))
                .await
                .expect("retry")
                .version,
            ChunkVersion(1)
        );
    });
}

fn appends_go_in_place_and_overwrites_copy_on_write(mode: JournalMode) {
    let rt = runtime();
    rt.block_on(async {
        // The copying path: with patches on, the overwrite below would be one
        // (small_overwrites_are_patches covers that).
        let mem = mem();
        Engine::format(&mem, &small_format()).await.expect("format");
        let engine = Engine::open(mem.clone(), pool(), config_without_patches(mode))
            .await
            .expect("open");
        let k = key(2, 9, 3);
        let mut model = bytes(4096, 1);
        let first = put(&engine, k, 1, 0, &model).await;
        assert!(!first.in_place);
        let slot = engine
            .stat(k)
            .expect("stat")
            .committed
            .expect("committed")
            .slot;
        assert_eq!(slot.bytes(), 4096);
        // A block-aligned append that outgrows the 4 KiB slot must move.
        let grow = put(&engine, k, 2, 4096, &bytes(1000, 2)).await;
        model.extend(bytes(1000, 2));
        assert!(!grow.in_place);
        let slot = engine
            .stat(k)
            .expect("stat")
            .committed
            .expect("committed")
            .slot;
        assert_eq!(slot.bytes(), 8192);
        // An unaligned append that fits goes in place and combines the CRC.
        let append = put(&engine, k, 3, 5096, &bytes(3000, 3)).await;
        model.extend(bytes(3000, 3));
        assert!(append.in_place);
        assert_eq!(append.crc, crc32c::crc32c(&model));
        assert_eq!(
            engine.stat(k).expect("stat").committed.expect("c").slot,
            slot
        );
        // An overwrite copies on write.
        let overwrite = put(&engine, k, 4, 10, b"hello").await;
        model[10..15].copy_from_slice(b"hello");
        assert!(!overwrite.in_place);
        assert_ne!(
            engine.stat(k).expect("stat").committed.expect("c").slot,
            slot
        );
        assert_same(&contents(&engine, k).await, &model);
        // A write past the end leaves a zero gap.
        put(&engine, k, 5, 9000, b"far").await;
        model.resize(9000, 0);
        model.extend(b"far");
        assert_same(&contents(&engine, k).await, &model);
        engine.check_consistency().expect("consistent");
    });
}

fn truncate_remove_and_queries(mode: JournalMode) {
    let rt = runtime();
    rt.block_on(async {
        let engine = format_and_open(&mem(), &small_format(), mode).await;
        for index in [0, 1, 5, 2] {
            put(&engine, key(3, 100, index), 1, 0, &bytes(5000, index as u8)).await;
        }
        put(&engine, key(3, 101, 0), 1, 0, b"other file").await;
        put(&engine, key(4, 100, 9), 1, 0, b"other chain").await;
        let last = engine.last_chunk(ChainId(3), InodeId(100)).expect("last");
        assert_eq!(last.key, key(3, 100, 5));
        assert!(engine.last_chunk(ChainId(3), InodeId(99)).is_none());
        let all = engine.chunks(ChainId(3), .., usize::MAX);
        assert_eq!(all.len(), 5);
        assert!(all.windows(2).all(|w| w[0].key < w[1].key));
        let usage = engine.chain_usage(ChainId(3));
        assert_eq!(usage.chunks, 5);
        assert_eq!(usage.used_bytes, 4 * 5000 + 10);
        assert_eq!(usage.allocated_bytes, 4 * 8192 + 4096);

        // Shrink, then extend with zeros.
        let k = key(3, 100, 5);
        engine
            .write(request(k, 2, WriteOp::Truncate { len: 100 }))
            .await
            .expect("truncate");
        engine.commit(k, ChunkVersion(2)).await.expect("commit");
        assert_same(&contents(&engine, k).await, &bytes(5000, 5)[..100]);
        engine
            .write(request(k, 3, WriteOp::Truncate { len: 300 }))
            .await
            .expect("extend");
        engine.commit(k, ChunkVersion(3)).await.expect("commit");
        let mut want = bytes(5000, 5)[..100].to_vec();
        want.resize(300, 0);
        assert_same(&contents(&engine, k).await, &want);

        assert!(engine.remove(k).await.expect("remove"));
        assert!(!engine.remove(k).await.expect("remove again"));
        assert!(matches!(
            engine.read(k, ReadRequest::committed(0, 1)).await,
            Err(EngineError::NotFound { .. })
        ));
        assert_eq!(
            engine
                .last_chunk(ChainId(3), InodeId(100))
                .expect("last")
                .key,
            key(3, 100, 2)
        );
        assert_eq!(engine.chain_usage(ChainId(3)).chunks, 4);
        engine.check_consistency().expect("consistent");
    });
}

fn replace_and_bad_requests(mode: JournalMode) {
    let rt = runtime();
    rt.block_on(async {
        let engine = format_and_open(&mem(), &small_format(), mode).await;
        let k = key(1, 1, 1);
        put(&engine, k, 1, 0, &bytes(20_000, 1)).await;
        let data = bytes(3000, 9);
        engine.write(replace(k, 7, &data)).await.expect("replace");
        engine.commit(k, ChunkVersion(7)).await.expect("commit");
        assert_same(&contents(&engine, k).await, &data);

        let mut bad = update(k, 8, 0, b"payload");
        if let WriteOp::Update { crc, .. } = &mut bad.op {
            *crc ^= 1;
        }
        let err = engine.write(bad).await.expect_err("bad crc");
        assert!(
            matches!(
                err,
                EngineError::Checksum {
                    what: "write payload",
                    ..
                }
            ),
            "{err}"
        );
        let err = engine
            .write(update(k, 8, 65_000, &[0u8; 1000]))
            .await
            .expect_err("too far");
        assert!(
            err.to_string().contains("past the largest chunk size"),
            "{err}"
        );
        assert!(
            engine.poisoned().is_none(),
            "bad requests must not poison the engine"
        );
    });
}

fn failed_write_poisons_until_reopen(mode: JournalMode) {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        Engine::format(&mem, &small_format()).await.expect("format");
        let dev = FaultyDevice::new(mem.clone(), 1);
        // Patches off, so that the failing write is one that writes (a
        // patch writes nothing before its record: see
        // a_patch_whose_record_fails_poisons_and_leaves_the_committed_version).
        let engine = Engine::open(dev.clone(), pool(), config_without_patches(mode))
            .await
            .expect("open");
        let k = key(1, 2, 3);
        put(&engine, k, 1, 0, b"durable").await;
        dev.inject(Fault::EioRange {
            range: 0..u64::MAX,
            op: Some(IoOp::Write),
        });
        let err = engine
            .write(update(k, 2, 0, b"lost"))
            .await
            .expect_err("injected EIO");
        assert!(err.is_device_failure(), "{err}");
        let err = engine
            .write(update(k, 2, 0, b"again"))
            .await
            .expect_err("poisoned");
        assert!(matches!(err, EngineError::Poisoned { .. }), "{err}");
        assert_same(&contents(&engine, k).await, b"durable");
        drop(engine);
        dev.clear();
        let engine = Engine::open(dev.clone(), pool(), config(mode))
            .await
            .expect("reopen");
        assert!(engine.poisoned().is_none());
        put(&engine, k, 2, 0, b"works").await;
    });
}

fn failed_flush_fails_the_commit_and_poisons(mode: JournalMode) {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        let engine =
            format_and_open(&FaultyDevice::new(mem.clone(), 0), &small_format(), mode).await;
        let dev = engine.device().clone();
        let k = key(1, 2, 3);
        engine.write(update(k, 1, 0, b"data")).await.expect("write");
        dev.inject(Fault::EioRange {
            range: 0..u64::MAX,
            op: Some(IoOp::Flush),
        });
        assert!(engine.commit(k, ChunkVersion(1)).await.is_err());
        assert!(engine.poisoned().is_some());
    });
}

fn corrupt_reads_are_detected_when_verifying(mode: JournalMode) {
    let rt = runtime();
    rt.block_on(async {
        let engine = format_and_open(&FaultyDevice::new(mem(), 5), &small_format(), mode).await;
        let k = key(1, 1, 0);
        put(&engine, k, 1, 0, &bytes(8192, 4)).await;
        engine
            .device()
            .inject(Fault::CorruptReads { range: 0..u64::MAX });
        let err = engine
            .read(
                k,
                ReadRequest {
                    offset: 0,
                    len: 10,
                    version: ReadVersion::Committed,
                    verify: true,
                },
            )
            .await
            .expect_err("corruption");
        assert!(
            matches!(
                err,
                EngineError::ChunkCorrupt {
                    version: ChunkVersion(1),
                    offset: 0,
                    end: 8192,
                    read_offset: 0,
                    read_end: 10,
                    ..
                }
            ),
            "{err}"
        );
    });
}

fn concurrent_commits_share_journal_batches(mode: JournalMode) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime");
    // Flushes that wait at a gate, as a real device's take time: commits
    // that queue while a batch is at the device go out together. The gate
    // stays closed until all 200 records are queued, so that the test does
    // not depend on how the tasks happen to be scheduled (on a loaded
    // machine they could otherwise each commit alone).
    let dev = SlowDevice::new(mem());
    rt.block_on(async {
        let engine = format_and_open(&dev, &small_format(), mode).await;
        for i in 0..200u32 {
            engine
                .write(update(key(1, u64::from(i), 0), 1, 0, &bytes(4096, i as u8)))
                .await
                .expect("write");
        }
        let flushes_before = dev.mem().stats().flushes;
        dev.gate.close();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let engine = engine.clone();
            tasks.spawn(async move {
                engine
                    .commit(key(1, u64::from(i), 0), ChunkVersion(1))
                    .await
                    .expect("commit")
            });
        }
        until("every commit queued behind the held flush", || {
            engine.journal_queued() == 200
        })
        .await;
        dev.gate.open();
        while let Some(done) = tasks.join_next().await {
            done.expect("task");
        }
        let flushes = dev.mem().stats().flushes - flushes_before;
        assert!(
            flushes < 200,
            "group commit should batch: {flushes} flushes for 200 commits"
        );
        for i in 0..200u32 {
            assert_eq!(
                contents(&engine, key(1, u64::from(i), 0)).await,
                bytes(4096, i as u8)
            );
        }
        engine.check_consistency().expect("consistent");
    });
}

fn journal_wraps_and_checkpoints_many_times(mode: JournalMode) {
    let rt = runtime();
    let dev = mem();
    let options = FormatOptions {
        journal_bytes: Some(64 << 10),
        ..small_format()
    };
    rt.block_on(async {
        let engine = format_and_open(&dev, &options, mode).await;
        for round in 0..300u32 {
            let k = key(1, u64::from(round % 37), 0);
            let version = engine
                .stat(k)
                .and_then(|i| i.committed)
                .map_or(1, |m| m.version.0 + 1);
            put(
                &engine,
                k,
                version,
                0,
                &bytes(100 + round as usize, round as u8),
            )
            .await;
            if round % 50 == 0 {
                engine
                    .remove(key(1, u64::from((round + 1) % 37), 0))
                    .await
                    .expect("remove");
            }
        }
        let before: Vec<_> = engine.chunks(ChainId(1), .., usize::MAX);
        drop(engine);
        let engine = Engine::open(dev.clone(), pool(), config(mode))
            .await
            .expect("reopen");
        assert_eq!(engine.chunks(ChainId(1), .., usize::MAX), before);
        engine.check_consistency().expect("consistent");
    });
}

fn bad_devices_give_clear_errors(mode: JournalMode) {
    let rt = runtime();
    rt.block_on(async {
        // Unformatted.
        let blank = mem();
        let err = Engine::open(blank.clone(), pool(), config(mode))
            .await
            .expect_err("blank");
        assert!(matches!(err, EngineError::NotFormatted { .. }), "{err}");
        assert!(err.to_string().contains("format it first"), "{err}");
        // Too small.
        let tiny = MemDevice::new(2 * MIB, 4096);
        let err = Engine::format(&tiny, &FormatOptions::default())
            .await
            .expect_err("tiny");
        assert!(matches!(err, EngineError::TooSmall { .. }), "{err}");
        // Formatted once: a second format needs force.
        let dev = mem();
        Engine::format(&dev, &small_format()).await.expect("format");
        let err = Engine::format(&dev, &small_format())
            .await
            .expect_err("no force");
        assert!(err.to_string().contains("--force"), "{err}");
        Engine::format(
            &dev,
            &FormatOptions {
                force: true,
                ..small_format()
            },
        )
        .await
        .expect("forced");
        // One damaged superblock copy is repaired from the other.
        dev.poke(SUPERBLOCK_OFFSETS[0] + 100, &[0xff; 8]);
        let opened = Engine::open(dev.clone(), pool(), config(mode)).await;
        drop(opened.expect("repairs"));
        assert_eq!(
            dev.snapshot()[..4096],
            dev.snapshot()[SUPERBLOCK_OFFSETS[1] as usize..][..4096]
        );
        // Both damaged: a corruption error, and format still needs force.
        dev.poke(SUPERBLOCK_OFFSETS[0] + 100, &[0xff; 8]);
        dev.poke(SUPERBLOCK_OFFSETS[1] + 100, &[0xff; 8]);
        let err = Engine::open(dev.clone(), pool(), config(mode))
            .await
            .expect_err("corrupt");
        assert!(matches!(err, EngineError::Corrupt { .. }), "{err}");
        let err = Engine::format(&dev, &small_format())
            .await
            .expect_err("damaged still needs force");
        assert!(err.to_string().contains("damaged"), "{err}");
        // Another format version.
        let dev = mem();
        Engine::format(&dev, &small_format()).await.expect("format");
        for offset in SUPERBLOCK_OFFSETS {
            dev.poke(offset + 8, &7u32.to_le_bytes());
        }
        let err = Engine::open(dev.clone(), pool(), config(mode))
            .await
            .expect_err("version");
        assert!(
            err.to_string()
                .contains("format version 7 is not supported"),
            "{err}"
        );
        // A device that shrank.
        let dev = mem();
        Engine::format(&dev, &small_format()).await.expect("format");
        let image = dev.snapshot();
        let smaller = MemDevice::new(16 * MIB, 4096);
        smaller.poke(0, &image[..16 * MIB as usize]);
        let err = Engine::open(smaller, pool(), config(mode))
            .await
            .expect_err("shrunk");
        assert!(matches!(err, EngineError::TooSmall { .. }), "{err}");
    });
}

/// Damages the payload of the checkpoint slot holding the higher sequence
/// number, leaving its header valid.
fn damage_newest_checkpoint(dev: &MemDevice, sb: &flyfs_chunk_engine::format::Superblock) {
    let image = dev.snapshot();
    let seq = |slot: u64| {
        let at = (sb.checkpoint_offset + slot * sb.checkpoint_slot_bytes) as usize;
        u64::from_le_bytes(image[at + 8..at + 16].try_into().expect("8 bytes"))
    };
    let newest = if seq(0) > seq(1) { 0 } else { 1 };
    dev.poke(
        sb.checkpoint_offset + newest * sb.checkpoint_slot_bytes + 4096,
        &[0xAA; 16],
    );
}

fn damaged_checkpoint_falls_back_or_refuses(mode: JournalMode) {
    let rt = runtime();
    let dev = mem();
    rt.block_on(async {
        let engine = format_and_open(&dev, &small_format(), mode).await;
        put(&engine, key(1, 1, 1), 1, 0, b"kept").await;
        let sb = *engine.superblock();
        drop(engine);
        // The open checkpointed into one slot; find the newest and damage its payload.
        let engine = Engine::open(dev.clone(), pool(), config(mode))
            .await
            .expect("open");
        drop(engine);
        damage_newest_checkpoint(&dev, &sb);
        // The older checkpoint plus the journal may or may not reach the
        // newer one's position; either way the engine must not lose "kept"
        // silently: it recovers it, or it refuses to open.
        match Engine::open(dev.clone(), pool(), config(mode)).await {
            Ok(engine) => assert_eq!(contents(&engine, key(1, 1, 1)).await, b"kept"),
            Err(err) => assert!(matches!(err, EngineError::Corrupt { .. }), "{err}"),
        }
    });
}

/// An open restarts the log one lap past the end of its replay and writes a
/// checkpoint there. If that checkpoint's payload is later found damaged,
/// recovery falls back to the older one, replays the journal from it to
/// where the open restarted the log, and goes on from the restart: nothing
/// written before or after the damaged checkpoint is lost, and the engine
/// opens.
fn a_damaged_restart_checkpoint_falls_back_and_replays_past_it(mode: JournalMode) {
    let rt = runtime();
    let dev = mem();
    rt.block_on(async {
        let engine = format_and_open(&dev, &small_format(), mode).await;
        put(&engine, key(1, 1, 1), 1, 0, b"before").await;
        let sb = *engine.superblock();
        drop(engine);
        // This open restarts the log and checkpoints; the next write goes
        // after the restart.
        let engine = Engine::open(dev.clone(), pool(), config(mode))
            .await
            .expect("open");
        put(&engine, key(1, 2, 1), 1, 0, b"after").await;
        drop(engine);
        damage_newest_checkpoint(&dev, &sb);
        let engine = Engine::open(dev.clone(), pool(), config(mode))
            .await
            .expect("the older checkpoint and the journal hold everything");
        assert_eq!(contents(&engine, key(1, 1, 1)).await, b"before");
        assert_eq!(contents(&engine, key(1, 2, 1)).await, b"after");
    });
}

#[test]
fn geometry_of_a_formatted_device() {
    let rt = runtime();
    let dev = mem();
    rt.block_on(async {
        let sb = Engine::format(&dev, &small_format()).await.expect("format");
        assert_eq!(sb.group_bytes(), 65536);
        assert!(
            sb.data_offset + u64::from(sb.group_count) * sb.group_bytes()
                <= dev.geometry().capacity_bytes
        );
    });
}

fn readers_never_see_torn_chunks_while_writers_commit(mode: JournalMode) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let dev = mem();
    rt.block_on(async {
        let engine = format_and_open(&dev, &small_format(), mode).await;
        let keys: Vec<_> = (0..4).map(|i| key(9, i, 0)).collect();
        for k in &keys {
            put(&engine, *k, 1, 0, &bytes(6000, 0)).await;
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reads_total = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut readers = tokio::task::JoinSet::new();
        for r in 0..4 {
            let (engine, keys, stop) = (engine.clone(), keys.clone(), stop.clone());
            let reads_total = reads_total.clone();
            readers.spawn(async move {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let k = keys[(reads as usize + r) % keys.len()];
                    // A verified read checks the bytes against the CRC of the
                    // version it saw: a torn read cannot pass.
                    let read = engine
                        .read(k, ReadRequest::whole_verified())
                        .await
                        .expect("verified read");
                    assert_eq!(read.data.len() as u32, read.chunk_len);
                    reads += 1;
                    reads_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
                reads
            });
        }
        // Overwrites (copy-on-write), appends (in place) and truncates,
        // each committed, while the readers run.
        for version in 2..150u32 {
            // Pace the writer by the readers: an inline-mode commit on an
            // instant device never waits, so without this the writes could
            // all finish before a reader runs.
            while reads_total.load(std::sync::atomic::Ordering::Relaxed) < u64::from(version) {
                tokio::task::yield_now().await;
            }
            let k = keys[version as usize % keys.len()];
            let len = engine
                .stat(k)
                .and_then(|i| i.committed)
                .map_or(0, |m| m.len);
            match version % 3 {
                0 => drop(put(&engine, k, version, 0, &bytes(5000, version as u8)).await),
                1 => drop(put(&engine, k, version, len, &bytes(700, version as u8)).await),
                _ => {
                    let cut = 1000 + version * 7 % 3000;
                    engine
                        .write(request(k, version, WriteOp::Truncate { len: cut }))
                        .await
                        .expect("truncate");
                    engine
                        .commit(k, ChunkVersion(version))
                        .await
                        .expect("commit");
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = 0;
        while let Some(reads) = readers.join_next().await {
            total += reads.expect("reader");
        }
        assert!(total > 100, "readers barely ran: {total}");
        engine
            .check_consistency()
            .expect("no slot leaked or doubly used after the readers let go");
    });
}

/// A prepared write is durable before it returns: its commit does no I/O, a
/// reopen without the commit finds it committed, its abort is durable too,
/// and no other write may replace it.
fn prepared_versions_are_durable_and_commit_without_io(mode: JournalMode) {
    let rt = runtime();
    let dev = mem();
    rt.block_on(async {
        let engine = format_and_open(&dev, &small_format(), mode).await;
        let (a, b, c) = (key(1, 7, 0), key(1, 7, 1), key(1, 8, 0));
        let v1 = bytes(8_000, 1);
        put(&engine, a, 1, 0, &v1).await;
        let prepared = |mut request: flyfs_chunk_engine::WriteRequest| {
            request.prepare = true;
            request
        };

        // The commit of a prepared version journals nothing.
        let v2 = bytes(3_000, 2);
        engine
            .write(prepared(update(a, 2, 100, &v2)))
            .await
            .expect("prepared write");
        assert!(
            engine
                .stat(a)
                .and_then(|i| i.pending)
                .and_then(|p| p.prepared)
                .is_some()
        );
        let refused = engine.write(update(a, 2, 0, &v1)).await;
        assert!(
            matches!(refused, Err(EngineError::VersionConflict { .. })),
            "a write replaced a prepared version: {refused:?}"
        );
        let records = engine.stats().records;
        engine.commit(a, ChunkVersion(2)).await.expect("commit");
        assert_eq!(
            engine.stats().records,
            records,
            "the commit journaled a record"
        );
        let mut want_a = v1.clone();
        want_a[100..3_100].copy_from_slice(&v2);
        assert_same(&contents(&engine, a).await, &want_a);

        // Prepared and never committed: committed after a reopen.
        let only = bytes(5_000, 3);
        engine
            .write(prepared(update(b, 1, 0, &only)))
            .await
            .expect("prepared write");
        // Prepared, then aborted: back to nothing.
        engine
            .write(prepared(update(c, 1, 0, &only)))
            .await
            .expect("prepared write");
        engine.abort(c, ChunkVersion(1)).await.expect("abort");
        assert!(engine.stat(c).is_none());
        // Prepared over a committed version, then aborted: the old version.
        engine
            .write(prepared(update(a, 3, 0, &only)))
            .await
            .expect("prepared write");
        engine.abort(a, ChunkVersion(3)).await.expect("abort");
        engine.check_consistency().expect("consistent");

        drop(engine);
        let engine = Engine::open(dev.clone(), pool(), config(mode))
            .await
            .expect("reopen");
        assert_same(&contents(&engine, a).await, &want_a);
        assert_eq!(
            engine.stat(a).and_then(|i| i.committed).map(|m| m.version),
            Some(ChunkVersion(2))
        );
        assert_same(&contents(&engine, b).await, &only);
        assert!(engine.stat(b).is_some_and(|i| i.pending.is_none()));
        assert!(
            engine.stat(c).is_none(),
            "an aborted prepared version came back"
        );
        engine.check_consistency().expect("consistent");
    });
}

/// A small update inside a chunk (one extent or several) is a patch: the
/// version stays in its slot, nothing is copied, the committed version reads
/// as before until the commit, both versions read right (whole and partial,
/// checked), and the bytes survive checkpoints (which write them into the
/// slot) and reopens (which redo them).
fn small_overwrites_are_patches(mode: JournalMode) {
    let rt = runtime();
    rt.block_on(async {
        let mem = mem();
        // A small journal, so that the writes below wrap it and checkpoint.
        let options = FormatOptions {
            journal_bytes: Some(256 << 10),
            ..small_format()
        };
        let engine = format_and_open(&mem, &options, mode).await;
        let k = key(3, 4, 5);
        let mut model = bytes(60_000, 7);
        put(&engine, k, 1, 0, &model).await;
        let slot = engine.stat(k).expect("stat").committed.expect("c").slot;
        let before = engine.stats();

        let outcome = engine
            .write(update(k, 2, 10, b"hello"))
            .await
            .expect("write");
        assert!(outcome.in_place, "a patch stays in its slot");
        assert_eq!(engine.stats().patches, before.patches + 1);
        let mut pending = model.clone();
        pending[10..15].copy_from_slice(b"hello");
        assert_eq!(outcome.crc, crc32c::crc32c(&pending));
        assert_same(&contents(&engine, k).await, &model);
        let read = engine
            .read(
                k,
                ReadRequest {
                    offset: 0,
                    len: 4096,
                    version: ReadVersion::Pending,
                    verify: false,
                },
            )
            .await
            .expect("pending read");
        assert_same(&read.data, &pending[..4096]);
        engine.commit(k, ChunkVersion(2)).await.expect("commit");
        model = pending;
        assert_same(&contents(&engine, k).await, &model);
        assert_eq!(
            engine.stat(k).expect("stat").committed.expect("c").slot,
            slot
        );

        // Several extents in one update, overlapping blocks and each other.
        let extents = [
            (4000u32, bytes(200, 1)),
            (4096, bytes(4096, 2)),
            (59_990, bytes(10, 3)),
        ];
        let outcome = engine
            .write(request(k, 3, common::extents(&extents)))
            .await
            .expect("write");
        for (offset, data) in &extents {
            model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        assert!(outcome.in_place);
        assert_eq!(outcome.crc, crc32c::crc32c(&model));
        engine.commit(k, ChunkVersion(3)).await.expect("commit");

        // Many 4 KiB overwrites: checkpoints write them into the slot.
        for version in 4..200u32 {
            let offset = (version * 4096 * 7) % (60_000 - 4096);
            let data = bytes(4096, version as u8);
            put(&engine, k, version, offset, &data).await;
            model[offset as usize..offset as usize + 4096].copy_from_slice(&data);
            if version % 50 == 0 {
                let partial = engine
                    .read(k, ReadRequest::committed(offset, 4096))
                    .await
                    .expect("partial read");
                assert_same(&partial.data, &data);
            }
        }
        let stats = engine.stats();
        assert!(stats.checkpoints > before.checkpoints, "{stats:?}");
        assert!(stats.patch_layers_applied > 0, "{stats:?}");
        assert_same(&contents(&engine, k).await, &model);
        assert_eq!(
            engine.stat(k).expect("stat").committed.expect("c").slot,
            slot
        );
        assert_eq!(
            engine.block_crc_check(k).await.expect("check"),
            Vec::<u64>::new()
        );
        engine.check_consistency().expect("consistent");
        drop(engine);
        let engine = Engine::open(mem.clone(), pool(), config(mode))
            .await
            .expect("reopen");
        assert_same(&contents(&engine, k).await, &model);
        assert_eq!(
            engine.block_crc_check(k).await.expect("check"),
            Vec::<u64>::new()
        );
        engine.check_consistency().expect("consistent");
    });
}

/// A patch of whole blocks that no layer touches takes the CRC of the bytes
/// it replaces from their block CRCs and reads nothing; a patch of a block
/// that a layer (or an earlier extent of the same write) touches, or of part
/// of a block, reads as before. Every version's CRC stays that of its bytes,
/// through checkpoints and a reopen.
fn whole_block_patches_read_nothing_and_keep_the_crc_exact(mode: JournalMode) {
    let rt = runtime();
    rt.block_on(async {
        let mem = mem();
        let options = FormatOptions {
            journal_bytes: Some(256 << 10),
            ..small_format()
        };
        let engine = format_and_open(&mem, &options, mode).await;
        let k = key(3, 4, 6);
        // Not a whole number of blocks: the tail block holds data and zeros.
        let mut model = bytes(61_000, 9);
        put(&engine, k, 1, 0, &model).await;
        let mut version = 1;
        let mut write = async |extents: &[(u32, Vec<u8>)], model: &mut Vec<u8>| {
            version += 1;
            let reads = mem.stats().reads;
            let outcome = engine
                .write(request(k, version, common::extents(extents)))
                .await
                .expect("write");
            let read = mem.stats().reads - reads;
            for (offset, data) in extents {
                model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            assert!(outcome.in_place, "a patch");
            assert_eq!(outcome.crc, crc32c::crc32c(model), "version {version}");
            engine
                .commit(k, ChunkVersion(version))
                .await
                .expect("commit");
            read
        };
        // Whole blocks, untouched by any layer: no read.
        assert_eq!(write(&[(8192, bytes(4096, 1))], &mut model).await, 0);
        assert_eq!(write(&[(16_384, bytes(12_288, 2))], &mut model).await, 0);
        // Two extents of one write on distinct blocks: no read either.
        assert_eq!(
            write(&[(0, bytes(4096, 3)), (40_960, bytes(4096, 4))], &mut model).await,
            0
        );
        // The same block again: a layer covers it, so it is read.
        assert!(write(&[(8192, bytes(4096, 5))], &mut model).await > 0);
        // Part of a block, and the block holding the chunk's end: read.
        assert!(write(&[(24_576, bytes(100, 6))], &mut model).await > 0);
        assert!(write(&[(57_344, bytes(3656, 7))], &mut model).await > 0);
        // A later extent over a block an earlier one of the same write
        // touched: read (the earlier one's bytes count as the old ones).
        assert!(
            write(
                &[(45_056, bytes(10, 8)), (45_056, bytes(4096, 9))],
                &mut model
            )
            .await
                > 0
        );
        assert_same(&contents(&engine, k).await, &model);

        // Many whole-block overwrites: checkpoints write them into the slot,
        // after which those blocks are read from the slot again.
        for round in 0..150u32 {
            let offset = ((round * 7) % 14) * 4096;
            write(&[(offset, bytes(4096, round as u8))], &mut model).await;
        }
        assert!(engine.stats().checkpoints > 0);
        assert_same(&contents(&engine, k).await, &model);
        assert_eq!(
            engine.block_crc_check(k).await.expect("check"),
            Vec::<u64>::new()
        );
        engine.check_consistency().expect("consistent");
        drop(engine);
        let engine = Engine::open(mem.clone(), pool(), config(mode))
            .await
            .expect("reopen");
        assert_same(&contents(&engine, k).await, &model);
        assert_eq!(
            engine.stat(k).expect("stat").committed.expect("c").crc,
            crc32c::crc32c(&model)
        );
        engine.check_consistency().expect("consistent");
    });
}

/// A patch writes nothing before its record; when the journal write of that
/// record fails, the commit fails, the engine is poisoned, and the committed
/// version is what it was, then and after a reopen.
fn a_patch_whose_record_fails_poisons_and_leaves_the_committed_version(mode: JournalMode) {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        Engine::format(&mem, &small_format()).await.expect("format");
        let dev = FaultyDevice::new(mem.clone(), 1);
        let engine = Engine::open(dev.clone(), pool(), config(mode))
            .await
            .expect("open");
        let k = key(1, 2, 3);
        put(&engine, k, 1, 0, b"durable").await;
        let outcome = engine
            .write(update(k, 2, 0, b"lost"))
            .await
            .expect("a patch writes nothing yet");
        assert!(outcome.in_place);
        dev.inject(Fault::EioRange {
            range: 0..u64::MAX,
            op: Some(IoOp::Write),
        });
        let err = engine
            .commit(k, ChunkVersion(2))
            .await
            .expect_err("injected EIO");
        assert!(
            matches!(err, EngineError::Poisoned { .. }) || err.is_device_failure(),
            "{err}"
        );
        assert!(engine.poisoned().is_some());
        assert_same(&contents(&engine, k).await, b"durable");
        drop(engine);
        dev.clear();
        let engine = Engine::open(dev.clone(), pool(), config(mode))
            .await
            .expect("reopen");
        assert_same(&contents(&engine, k).await, b"durable");
        put(&engine, k, 2, 0, b"works").await;
        assert_same(&contents(&engine, k).await, b"worksle");
    });
}

/// Recovery repairs a damaged superblock copy, then writes a checkpoint: a
/// power cut at each of its first writes (on 512-byte sectors, tearing them)
/// leaves a device that the next recovery opens, with every committed chunk
/// intact and both superblock copies whole again.
fn superblock_repair_survives_power_cuts(mode: JournalMode) {
    let rt = runtime();
    let mut cuts_landed = 0;
    for sector_size in [512, 4096] {
        for cut_at in 0..4 {
            for seed in 0..4 {
                let dev = MemDevice::new(32 * MIB, sector_size);
                let k = key(1, 9, 0);
                let data = bytes(20_000, seed as u8);
                rt.block_on(async {
                    let engine = format_and_open(&dev, &small_format(), mode).await;
                    put(&engine, k, 1, 0, &data).await;
                });
                dev.poke(SUPERBLOCK_OFFSETS[0] + 100, &[0xff; 8]);
                let faulty = FaultyDevice::new(dev.clone(), seed);
                faulty.inject(Fault::PowerCutAtWrite { n: cut_at });
                let opened = rt.block_on(Engine::open(faulty.clone(), pool(), config(mode)));
                let landed = faulty.injected() > 0;
                cuts_landed += u32::from(landed);
                assert!(
                    landed || opened.is_ok(),
                    "recovery failed without a cut: {:?}",
                    opened.err()
                );
                drop(opened);
                dev.crash(seed);
                rt.block_on(async {
                    let engine = Engine::open(dev.clone(), pool(), config(mode))
                        .await
                        .unwrap_or_else(|e| {
                            panic!("{sector_size}-byte sectors, cut at write {cut_at}: {e}")
                        });
                    assert_same(&contents(&engine, k).await, &data);
                });
                let image = dev.snapshot();
                assert_eq!(
                    image[..4096],
                    image[SUPERBLOCK_OFFSETS[1] as usize..][..4096],
                    "superblock copies differ after recovery"
                );
            }
        }
    }
    assert!(cuts_landed > 0, "no cut reached a recovery's writes");
}

/// Waits (polling, as the journal thread runs apart) until `ready` holds.
async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 60 s for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// A checkpoint plans to write chunk A's Patch layers into A's slot, then
/// waits for older readers. Meanwhile A's prepared copy-on-write version is
/// committed in memory (no record, so nothing waits for the journal), which
/// frees A's old slot, and a new chunk B is written whole into that very
/// slot. The checkpoint must not then lay A's old patch over B's bytes: the
/// slots in its plan stay A's until it is done.
fn a_checkpoint_never_writes_patches_into_a_slot_its_chunk_left(mode: JournalMode) {
    let rt = runtime();
    let dev = SlowDevice::new(mem());
    rt.block_on(async {
        let engine = format_and_open(&dev, &small_format(), mode).await;
        let (a, b, c, d) = (key(1, 1, 0), key(1, 2, 0), key(1, 3, 0), key(1, 4, 0));
        let whole = |version, seed| replace(a, version, &bytes(65536, seed));
        engine.write(whole(1, 1)).await.expect("A v1");
        engine
            .commit(a, ChunkVersion(1))
            .await
            .expect("commit A v1");
        put(&engine, a, 2, 4096, &bytes(4096, 2)).await;
        assert!(
            engine.stats().patches > 0,
            "A v2 is not a patch: the test proves nothing"
        );
        let a_slot = engine
            .stat(a)
            .and_then(|i| i.committed)
            .expect("A committed")
            .slot;
        engine
            .write(flyfs_chunk_engine::WriteRequest {
                prepare: true,
                ..whole(3, 3)
            })
            .await
            .expect("A v3, prepared");
        put(&engine, c, 1, 0, &bytes(4096, 4)).await;
        engine
            .write(update(d, 1, 0, &bytes(4096, 5)))
            .await
            .expect("D v1");

        // A reader of C holds the checkpoint back after it has planned.
        dev.read_gate.close();
        let reader = tokio::spawn({
            let engine = engine.clone();
            async move { contents(&engine, c).await }
        });
        until("the reader at the gate", || dev.read_gate.has_waiters()).await;
        let epoch = engine.read_epoch();
        engine.checkpoint_after_next_batch();
        let commit_d = tokio::spawn({
            let engine = engine.clone();
            async move { engine.commit(d, ChunkVersion(1)).await }
        });
        until("the checkpoint's plan", || engine.read_epoch() > epoch).await;

        engine
            .commit(a, ChunkVersion(3))
            .await
            .expect("A v3 committed in memory");
        let b_data = bytes(65536, 6);
        engine.write(replace(b, 1, &b_data)).await.expect("B v1");
        let commit_b = tokio::spawn({
            let engine = engine.clone();
            async move { engine.commit(b, ChunkVersion(1)).await }
        });
        dev.read_gate.open();
        assert_same(&reader.await.expect("reader"), &bytes(4096, 4));
        commit_d.await.expect("task").expect("commit D");
        commit_b.await.expect("task").expect("commit B");
        let b_slot = engine
            .stat(b)
            .and_then(|i| i.committed)
            .expect("B committed")
            .slot;
        eprintln!("A left {a_slot:?}, B went to {b_slot:?}");
        assert_same(&contents(&engine, b).await, &b_data);
        assert!(engine.block_crc_check(b).await.expect("check").is_empty());
        engine.check_consistency().expect("consistent");
    });
}

/// Thread mode on a version 5 device writes a checkpoint beside the journal:
/// while one is held writing chunk A's Patch layer into A's slot, commits go
/// on (a new chunk, another patch of A on top of the layer being written, a
/// chunk removed). Power cuts then, on copies of the device, lose none of
/// them (recovery replays them from the older checkpoint), and once the
/// checkpoint is done everything reads back, block CRCs and all, before and
/// after a reopen.
#[test]
fn commits_go_on_while_a_checkpoint_is_written() {
    let rt = runtime();
    let dev = SlowDevice::new(mem());
    rt.block_on(async {
        let (engine, mut expect) = beside_setup(&dev).await;
        // The checkpoint's write of A's layer into A's slot waits at the gate.
        let a_slot = engine
            .stat(expect.a.0)
            .and_then(|info| info.committed)
            .expect("A committed")
            .slot;
        let a_at = engine.superblock().slot_offset(a_slot);
        *dev.held_writes.lock().expect("lock") = a_at..a_at + 65536;
        let checkpoints = beside_checkpoint_held(&dev, &engine, &expect).await;
        commit_beside(&engine, &mut expect, checkpoints).await;

        // A power cut now: the new checkpoint was never written.
        let cut_before = dev.mem().fork();
        cut_before.crash(1);

        dev.write_gate.open();
        until("the checkpoint", || {
            engine.stats().checkpoints > checkpoints
        })
        .await;
        // And one once it is.
        let cut_after = dev.mem().fork();
        cut_after.crash(2);

        expect.check(&engine, "running").await;
        drop(engine);
        for (image, when) in [
            (dev.mem().clone(), "reopened"),
            (cut_before, "cut while the checkpoint waited"),
            (cut_after, "cut after the checkpoint"),
        ] {
            let engine = Engine::open(image, pool(), config(JournalMode::Thread))
                .await
                .unwrap_or_else(|e| panic!("{when}: open: {e}"));
            expect.check(&engine, when).await;
        }
    });
}

/// The same with the checkpoint held at its own write, after its layers
/// are durable, while the commits go on; then its write lands and power is
/// cut, on copies, before its flush returns: each cut keeps any subset of
/// its blocks, so recovery finds no new checkpoint, a whole one, or a valid
/// header over a damaged payload, and falls back to the older checkpoint
/// with a replay that must reach the newer one's lsn. Every seed keeps
/// every acknowledged commit, and some cut shows each of the three.
#[test]
fn power_cuts_mid_checkpoint_beside_batches_lose_nothing() {
    let rt = runtime();
    let dev = SlowDevice::new(mem());
    rt.block_on(async {
        let (engine, mut expect) = beside_setup(&dev).await;
        let sb = *engine.superblock();
        *dev.held_writes.lock().expect("lock") =
            sb.checkpoint_offset..sb.checkpoint_offset + 2 * sb.checkpoint_slot_bytes;
        let checkpoints = beside_checkpoint_held(&dev, &engine, &expect).await;
        commit_beside(&engine, &mut expect, checkpoints).await;

        // The checkpoint's write lands; its flush waits.
        let before = dev.mem().snapshot();
        dev.gate.close();
        dev.write_gate.open();
        until("the checkpoint's flush", || dev.gate.has_waiters()).await;
        let after = dev.mem().snapshot();
        let block = |image: &[u8], at: u64| image[at as usize..(at + 4096) as usize].to_vec();
        // The checkpoint slot the write went to: its header and first
        // payload block.
        let at = (0..2)
            .map(|slot| sb.checkpoint_offset + slot * sb.checkpoint_slot_bytes)
            .find(|&at| block(&before, at) != block(&after, at))
            .expect("the checkpoint was written");
        let (mut none, mut whole, mut torn) = (0, 0, 0);
        for seed in 0..48 {
            let image = dev.mem().fork();
            image.crash(seed);
            let cut = image.snapshot();
            let header = block(&cut, at) == block(&after, at);
            let payload = block(&cut, at + 4096) == block(&after, at + 4096);
            match (header, payload) {
                (true, true) => whole += 1,
                (true, false) => torn += 1,
                _ => none += 1,
            }
            let when = format!("cut {seed} before the checkpoint's flush");
            let engine = Engine::open(image, pool(), config(JournalMode::Thread))
                .await
                .unwrap_or_else(|e| panic!("{when}: open: {e}"));
            expect.check(&engine, &when).await;
        }
        eprintln!("cuts: {none} without the new checkpoint, {torn} torn, {whole} whole");
        assert!(
            none > 0 && torn > 0 && whole > 0,
            "some case never happened: the test proves less than it says"
        );
        dev.gate.open();
        until("the checkpoint", || {
            engine.stats().checkpoints > checkpoints
        })
        .await;
        expect.check(&engine, "running").await;
    });
}

/// Chunk A with a Patch layer a checkpoint will write into A's slot, C, and
/// a chunk the commits beside the checkpoint remove.
async fn beside_setup(dev: &SlowDevice) -> (Engine<SlowDevice>, Expected) {
    let engine = format_and_open(dev, &small_format(), JournalMode::Thread).await;
    assert!(
        engine.superblock().journal_depth_max() > 1,
        "not a pipelined journal"
    );
    let mut expect = Expected {
        a: (key(1, 1, 0), bytes(65536, 1)),
        d: (key(1, 4, 0), bytes(4096, 5)),
        e: (key(1, 5, 0), bytes(20000, 7)),
        c: key(1, 3, 0),
        gone: key(1, 6, 0),
    };
    let a = expect.a.0;
    put(&engine, a, 1, 0, &expect.a.1).await;
    put(&engine, a, 2, 4096, &bytes(4096, 2)).await;
    expect.a.1[4096..8192].copy_from_slice(&bytes(4096, 2));
    assert!(engine.stats().patches > 0, "A v2 is not a patch");
    put(&engine, expect.c, 1, 0, &bytes(4096, 4)).await;
    put(&engine, expect.gone, 1, 0, &bytes(8192, 6)).await;
    (engine, expect)
}

/// Closes the write gate over `dev.held_writes`, has a checkpoint follow
/// D's commit and waits until one of its writes waits at the gate. Returns
/// the checkpoints written before it.
async fn beside_checkpoint_held(
    dev: &SlowDevice,
    engine: &Engine<SlowDevice>,
    expect: &Expected,
) -> u64 {
    dev.write_gate.close();
    let checkpoints = engine.stats().checkpoints;
    engine.checkpoint_after_next_batch();
    put(engine, expect.d.0, 1, 0, &expect.d.1).await;
    until("the checkpoint at the gate", || {
        dev.write_gate.has_waiters()
    })
    .await;
    checkpoints
}

/// While the checkpoint is held: E written whole, A patched again over the
/// layer the checkpoint writes, the last chunk removed. Each waits for its
/// batch; before checkpoints went beside the batches, every one hung here.
async fn commit_beside(engine: &Engine<SlowDevice>, expect: &mut Expected, checkpoints: u64) {
    let beside = engine.stats().batches_beside_checkpoints;
    let commits = tokio::spawn({
        let engine = engine.clone();
        let (a, e, gone) = (expect.a.0, expect.e.clone(), expect.gone);
        async move {
            put(&engine, e.0, 1, 0, &e.1).await;
            put(&engine, a, 3, 6000, &bytes(3000, 8)).await;
            assert!(engine.remove(gone).await.expect("remove"), "it was there");
        }
    });
    until("commits while the checkpoint is held", || {
        commits.is_finished()
    })
    .await;
    commits.await.expect("commits");
    expect.a.1[6000..9000].copy_from_slice(&bytes(3000, 8));
    let stats = engine.stats();
    assert_eq!(
        stats.checkpoints, checkpoints,
        "the checkpoint finished early"
    );
    assert!(stats.batches_beside_checkpoints >= beside + 3, "{stats:?}");
}

/// What the checkpoint-beside-batches tests find after them.
struct Expected {
    a: (flyfs_chunk_engine::ChunkKey, Vec<u8>),
    d: (flyfs_chunk_engine::ChunkKey, Vec<u8>),
    e: (flyfs_chunk_engine::ChunkKey, Vec<u8>),
    c: flyfs_chunk_engine::ChunkKey,
    gone: flyfs_chunk_engine::ChunkKey,
}

impl Expected {
    async fn check<D: BlockDevice>(&self, engine: &Engine<D>, when: &str) {
        for (k, data) in [&self.a, &self.d, &self.e] {
            assert_same(&contents(engine, *k).await, data);
        }
        assert!(
            engine.stat(self.gone).is_none(),
            "{when}: the removed chunk is back"
        );
        for k in [self.a.0, self.c, self.d.0, self.e.0] {
            assert!(
                engine.block_crc_check(k).await.expect("check").is_empty(),
                "{when}: {k:?}'s blocks do not match their CRCs"
            );
        }
        engine
            .check_consistency()
            .unwrap_or_else(|e| panic!("{when}: {e}"));
    }
}

/// Whether `image` holds a journal batch naming `inode` (its metadata
/// record's inode field; a batch of one record fills one 4 KiB sector, so
/// after a crash it is either wholly there or not at all).
fn journal_names(image: &[u8], sb: &flyfs_chunk_engine::format::Superblock, inode: u64) -> bool {
    let journal =
        &image[sb.journal_offset as usize..(sb.journal_offset + sb.journal_bytes) as usize];
    journal
        .windows(8)
        .any(|window| window == inode.to_le_bytes())
}

/// Thread mode keeps two journal batches in flight on a version 5 device: a
/// commit queued while the batch before it waits for its flush goes out at
/// once, without waiting for that flush. A power cut may then keep the newer
/// batch and lose the older one, or keep both and lose the older one's data.
/// Over many seeded cuts, recovery keeps a prefix of the log whose data is
/// all there (never the newer batch without the older, never a batch whose
/// chunk does not read back), and a log restarted after the cut never
/// replays the stale newer batch later, even when the next batch written is
/// exactly as long as the lost one.
#[test]
fn pipelined_batches_recover_as_a_prefix() {
    let rt = runtime();
    let (ka, kx, ky, kz) = (
        key(1, 0x5eed_000a_cafe_f00d, 0),
        key(1, 0x5eed_0001_cafe_f00d, 0),
        key(1, 0x5eed_0002_cafe_f00d, 0),
        key(1, 0x5eed_0003_cafe_f00d, 0),
    );
    let (a, x, y, z) = (
        bytes(4096, 3),
        bytes(4096, 5),
        bytes(4096, 7),
        bytes(4096, 9),
    );
    // How often the cut left the newer batch without the older one, and the
    // older batch without its data: the cases a serial journal never meets.
    let (mut newer_without_older, mut batch_without_data) = (0, 0);
    for seed in 0..64 {
        let mem = MemDevice::new(32 << 20, 4096);
        let dev = SlowDevice::new(mem.clone());
        let (image, sb) = rt.block_on(async {
            let engine = format_and_open(&dev, &small_format(), JournalMode::Thread).await;
            assert_eq!(
                engine.superblock().journal_depth_max(),
                flyfs_chunk_engine::format::JOURNAL_DEPTH_MAX
            );
            put(&engine, ka, 1, 0, &a).await;
            for (k, data) in [(kx, &x), (ky, &y)] {
                engine.write(update(k, 1, 0, data)).await.expect("write");
            }
            let overlapped = engine.stats().overlapped_batches;
            dev.gate.close();
            let mut commits = Vec::new();
            for (k, waiting) in [(kx, 1), (ky, 2)] {
                let committer = engine.clone();
                commits.push(tokio::spawn(async move {
                    committer.commit(k, ChunkVersion(1)).await
                }));
                while dev.gate.waiting.load(std::sync::atomic::Ordering::SeqCst) < waiting {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            // Both batches wait for their flushes: the second went out while
            // the first's flush had not returned.
            assert_eq!(engine.stats().overlapped_batches, overlapped + 1);
            let image = mem.fork();
            image.crash(seed);
            dev.gate.open();
            for commit in commits {
                commit.await.expect("task").expect("commit");
            }
            (image, *engine.superblock())
        });
        let snapshot = image.snapshot();
        let (x_batch, y_batch) = (
            journal_names(&snapshot, &sb, kx.chunk.inode.0),
            journal_names(&snapshot, &sb, ky.chunk.inode.0),
        );
        let x_data = snapshot.chunks(4096).any(|block| block == &x[..]);
        newer_without_older += u32::from(y_batch && !x_batch);
        batch_without_data += u32::from(x_batch && !x_data);
        let context = format!("seed {seed}: batches x {x_batch} y {y_batch}, x's data {x_data}");
        let mut kept = None;
        for round in 0..2 {
            rt.block_on(async {
                let engine = Engine::open(image.clone(), pool(), config(JournalMode::Thread))
                    .await
                    .unwrap_or_else(|e| panic!("{context}: reopen {round}: {e}"));
                assert_same(&contents(&engine, ka).await, &a);
                let present = |k| engine.stat(k).is_some_and(|info| info.committed.is_some());
                let (has_x, has_y) = (present(kx), present(ky));
                assert!(!has_y || has_x, "{context}: y kept without x");
                if has_x {
                    assert_same(&contents(&engine, kx).await, &x);
                }
                if has_y {
                    assert_same(&contents(&engine, ky).await, &y);
                }
                match kept {
                    None => {
                        kept = Some((has_x, has_y));
                        // A batch as long as the lost one: the stale batch
                        // behind it would be the next in a log restarted at
                        // the end of the replay.
                        put(&engine, kz, 1, 0, &z).await;
                    }
                    Some(before) => {
                        assert_eq!(
                            (has_x, has_y),
                            before,
                            "{context}: the second reopen differs"
                        );
                        assert_same(&contents(&engine, kz).await, &z);
                    }
                }
            });
        }
    }
    assert!(
        newer_without_older > 0 && batch_without_data > 0,
        "the cuts never left the newer batch without the older ({newer_without_older}) \
         or a batch without its data ({batch_without_data}): the test proves nothing"
    );
}
