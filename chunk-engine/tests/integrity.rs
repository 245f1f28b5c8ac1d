//! End-to-end integrity and fail-stop: bytes rotted on the device under a
//! chunk are never served (reads, and writes that copy the chunk, fail with
//! `ChunkCorrupt` naming chunk, version and ranges), while rot in a block
//! CRC alone, or a block CRC a racing append has not yet rewritten, is not
//! taken for corruption; a device of format version 2 (no block CRCs) still
//! opens and checks its reads the old way; the scrubber finds
//! exactly the rotten chunks at the rate it is given, and a panic on the
//! journal thread fails every waiting and later caller instead of hanging
//! them, and leaves the engine reporting itself poisoned.

mod common;

use common::*;
use flyfs_bypass::DmaBuf;
use flyfs_bypass::mem::MemDevice;
use flyfs_chunk_engine::{
    ChunkKey, Engine, EngineConfig, EngineError, JournalMode, ReadRequest, ReadVersion, Scrubber,
    WriteOp,
};
use flyfs_proto::ids::ChunkVersion;

both_modes!(
    rotten_bytes_under_a_chunk_fail_every_read_of_it,
    rot_in_a_block_crc_alone_is_not_corruption,
    a_read_racing_an_in_place_append_returns_the_committed_bytes,
    rotten_bytes_are_not_copied_into_a_new_version,
    the_scrubber_finds_exactly_the_rotten_chunk,
    rotten_bytes_stay_detectable_under_patches,
);

fn mem() -> MemDevice {
    MemDevice::new(64 << 20, 512)
}

/// Flips one byte of `key`'s committed version on the device, at `offset`
/// inside the chunk.
fn rot<D: flyfs_bypass::BlockDevice>(
    engine: &Engine<D>,
    mem: &MemDevice,
    key: ChunkKey,
    offset: u64,
) {
    let meta = engine
        .stat(key)
        .and_then(|info| info.committed)
        .expect("a committed chunk");
    let at = engine.superblock().slot_offset(meta.slot) + offset;
    let byte = mem.snapshot()[at as usize];
    mem.poke(at, &[!byte]);
}

fn read_range(offset: u32, len: u32) -> ReadRequest {
    ReadRequest {
        offset,
        len,
        version: ReadVersion::Committed,
        verify: false,
    }
}

/// Asserts that `err` is the `ChunkCorrupt` of version `version` of `key`,
/// `chunk_len` bytes long, for a read of `offset..offset + len`.
#[track_caller]
fn assert_corrupt(
    err: &EngineError,
    key: ChunkKey,
    version: u32,
    chunk_len: u32,
    offset: u32,
    len: u32,
) {
    match err {
        EngineError::ChunkCorrupt {
            key: k,
            version: v,
            offset: 0,
            end,
            read_offset,
            read_end,
            expected,
            computed,
            ..
        } => {
            assert_eq!(*k, key);
            assert_eq!(*v, ChunkVersion(version));
            assert_eq!(*end, chunk_len);
            assert_eq!(*read_offset, offset);
            assert_eq!(*read_end, offset.saturating_add(len).min(chunk_len));
            assert_ne!(expected, computed);
        }
        other => panic!("expected ChunkCorrupt, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("version") && message.contains("is corrupt"),
        "{message}"
    );
    assert!(!err.is_device_failure(), "one chunk, not the device: {err}");
}

fn rotten_bytes_under_a_chunk_fail_every_read_of_it(mode: JournalMode) {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        // Every read checked (`verify_reads`, the default), partial ones
        // included.
        Engine::format(&mem, &small_format()).await.expect("format");
        let engine = Engine::open(
            mem.clone(),
            pool(),
            EngineConfig {
                verify_reads: true,
                ..config(mode)
            },
        )
        .await
        .expect("open");
        let rotten = key(1, 7, 0);
        let healthy = key(1, 7, 1);
        put(&engine, rotten, 1, 0, &bytes(20_000, 1)).await;
        put(&engine, rotten, 2, 20_000, &bytes(1000, 2)).await;
        put(&engine, healthy, 1, 0, &bytes(20_000, 3)).await;
        let whole = [bytes(20_000, 1), bytes(1000, 2)].concat();
        rot(&engine, &mem, rotten, 100);

        // Every read of the rotten block fails: its block CRC does not
        // match, and the whole-chunk CRC it falls back to does not either.
        // So does every read that asks for the whole-chunk check.
        for (offset, len, verify) in [
            (0, u32::MAX, false),
            (0, 10, false),
            (4000, 200, false),
            (16_384, 4096, true),
            (20_500, 100, true),
        ] {
            let err = engine
                .read(
                    rotten,
                    ReadRequest {
                        verify,
                        ..read_range(offset, len)
                    },
                )
                .await
                .expect_err("rotten bytes are never served");
            assert_corrupt(&err, rotten, 2, 21_000, offset, len);
        }
        assert_eq!(
            engine.block_crc_mismatches(),
            2,
            "the two partial reads of the rotten block fell back"
        );
        // Blocks the rot is not in are checked against their own CRCs
        // and served.
        for (offset, len) in [(16_384, 4096), (20_500, 100), (4096, 1)] {
            let read = engine
                .read(rotten, read_range(offset, len))
                .await
                .expect("a block away from the rot");
            let end = (offset + len).min(21_000) as usize;
            assert_same(&read.data, &whole[offset as usize..end]);
        }
        assert_eq!(engine.block_crc_mismatches(), 2);
        assert_eq!(
            engine.block_crc_check(rotten).await.expect("check"),
            vec![0],
            "the rotten block, and only it"
        );
        // Its neighbour, and the engine, are fine.
        assert_same(&contents(&engine, healthy).await, &bytes(20_000, 3));
        assert!(engine.poisoned().is_none());
        engine.check_consistency().expect("consistent");
    });
}

/// Device offset of the block CRC of block `block` of `key`'s committed
/// version.
fn block_crc_at<D: flyfs_bypass::BlockDevice>(
    engine: &Engine<D>,
    key: ChunkKey,
    block: u64,
) -> u64 {
    let sb = engine.superblock();
    let meta = engine
        .stat(key)
        .and_then(|info| info.committed)
        .expect("a committed chunk");
    let data_block = sb.data_block_index(sb.slot_offset(meta.slot)) + block;
    sb.block_crc_offset + 4 * data_block
}

fn rot_in_a_block_crc_alone_is_not_corruption(mode: JournalMode) {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        // Patches off: the rewrite at the end is to rewrite the blocks and
        // their entries at once (a patch leaves that to the next checkpoint;
        // small_overwrites_are_patches checks the entries after it).
        Engine::format(&mem, &small_format()).await.expect("format");
        let engine = Engine::open(mem.clone(), pool(), config_without_patches(mode))
            .await
            .expect("open");
        let k = key(1, 11, 0);
        let data = bytes(30_000, 9);
        put(&engine, k, 1, 0, &data).await;
        assert_eq!(
            engine.block_crc_check(k).await.expect("check"),
            Vec::<u64>::new()
        );
        // Reopened, so that the region is read from the device, not a cache.
        drop(engine);
        let at = block_crc_at(
            &Engine::open(mem.clone(), pool(), config_without_patches(mode))
                .await
                .expect("open"),
            k,
            2,
        );
        let byte = mem.snapshot()[at as usize];
        mem.poke(at, &[!byte]);
        let engine = Engine::open(mem.clone(), pool(), config_without_patches(mode))
            .await
            .expect("reopen");
        assert_eq!(engine.block_crc_check(k).await.expect("check"), vec![2]);
        for (offset, len) in [(8192, 4096), (9000, 10), (4000, 10_000)] {
            let read = engine
                .read(k, read_range(offset, len))
                .await
                .expect("good bytes under a rotten block CRC are served");
            assert_same(&read.data, &data[offset as usize..(offset + len) as usize]);
        }
        assert_eq!(engine.block_crc_mismatches(), 3, "each fell back");
        // A read of other blocks does not touch the rotten entry.
        let read = engine.read(k, read_range(0, 4096)).await.expect("read");
        assert_same(&read.data, &data[..4096]);
        assert_eq!(engine.block_crc_mismatches(), 3);
        // Rewriting the chunk rewrites its entries.
        put(&engine, k, 2, 0, &data).await;
        assert_eq!(
            engine.block_crc_check(k).await.expect("check"),
            Vec::<u64>::new()
        );
        assert!(engine.poisoned().is_none());
    });
}

/// An in-place append rewrites the block holding the committed tail, and
/// that block's CRC, while readers of the committed version may read it: a
/// reader that finds the old bytes and the new CRC (the append's data write
/// is still in flight, its CRC already in the cached region block) falls
/// back to the whole-chunk check and returns the committed bytes.
fn a_read_racing_an_in_place_append_returns_the_committed_bytes(mode: JournalMode) {
    let rt = runtime();
    let dev = SlowDevice::new(mem());
    rt.block_on(async {
        let engine = format_and_open(&dev, &small_format(), mode).await;
        let k = key(1, 12, 0);
        let stream = bytes(40_000, 5);
        put(&engine, k, 1, 0, &stream[..10_000]).await;
        let sb = *engine.superblock();
        let meta = engine
            .stat(k)
            .and_then(|info| info.committed)
            .expect("committed");
        let tail_block = sb.slot_offset(meta.slot) + 8192;
        *dev.held_writes.lock().expect("lock") = tail_block..tail_block + 1;
        dev.write_gate.close();
        let append = {
            let engine = engine.clone();
            let data = stream[10_000..15_000].to_vec();
            tokio::spawn(async move {
                let outcome = engine.write(update(k, 2, 10_000, &data)).await?;
                engine.commit(k, ChunkVersion(2)).await?;
                Ok::<_, EngineError>(outcome)
            })
        };
        while dev
            .write_gate
            .waiting
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            tokio::task::yield_now().await;
        }
        // The tail block (8192..10_000 committed) still holds the committed
        // bytes; its CRC is already the one of the block with the appended
        // bytes past 10_000.
        for (offset, len) in [(8192, 4096), (9_990, 100), (0, 8192)] {
            let read = engine
                .read(k, read_range(offset, len))
                .await
                .expect("the committed version reads");
            assert_eq!(read.version, ChunkVersion(1));
            let end = (offset + len).min(10_000) as usize;
            assert_same(&read.data, &stream[offset as usize..end]);
        }
        assert_eq!(
            engine.block_crc_mismatches(),
            2,
            "the reads of the tail block fell back, the other did not"
        );
        dev.write_gate.open();
        let outcome = append.await.expect("task").expect("append");
        assert!(outcome.in_place, "the append was in place");
        let read = engine.read(k, read_range(8192, 4096)).await.expect("read");
        assert_eq!(read.version, ChunkVersion(2));
        assert_same(&read.data, &stream[8192..12_288]);
        assert_eq!(engine.block_crc_mismatches(), 2);
        assert_eq!(
            engine.block_crc_check(k).await.expect("check"),
            Vec::<u64>::new()
        );
    });
}

/// A device formatted by a build of format version 2 has no block CRCs: it
/// opens, serves, and checks partial reads by reading the whole chunk.
#[test]
fn a_version_2_device_opens_and_checks_reads_whole() {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        let sb = Engine::format_version(&mem, &small_format(), 2)
            .await
            .expect("format version 2");
        assert_eq!(sb.format_version, 2);
        assert!(!sb.has_block_crcs());
        let engine = Engine::open(mem.clone(), pool(), config(JournalMode::Thread))
            .await
            .expect("open");
        assert_eq!(*engine.superblock(), sb);
        let k = key(1, 13, 0);
        put(&engine, k, 1, 0, &bytes(20_000, 4)).await;
        put(&engine, k, 2, 20_000, &bytes(1000, 5)).await;
        let whole = [bytes(20_000, 4), bytes(1000, 5)].concat();
        drop(engine);
        let engine = Engine::open(mem.clone(), pool(), config(JournalMode::Thread))
            .await
            .expect("reopen");
        assert_eq!(engine.superblock().format_version, 2, "still version 2");
        assert_same(&contents(&engine, k).await, &whole);
        let read = engine
            .read(k, read_range(16_384, 4096))
            .await
            .expect("read");
        assert_same(&read.data, &whole[16_384..20_480]);
        assert!(engine.block_crc_check(k).await.expect("check").is_empty());
        // A partial read far from rot fails: it reads the whole chunk.
        rot(&engine, &mem, k, 100);
        for (offset, len) in [(0, 10), (16_384, 4096), (20_500, 100)] {
            let err = engine
                .read(k, read_range(offset, len))
                .await
                .expect_err("rotten bytes are never served");
            assert_corrupt(&err, k, 2, 21_000, offset, len);
        }
        assert_eq!(engine.block_crc_mismatches(), 0);
    });
}

fn rotten_bytes_are_not_copied_into_a_new_version(mode: JournalMode) {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        // Patches off: the overwrite below is to copy the chunk (a patch
        // reads only the blocks it overwrites, and keeps the base's CRC:
        // rotten_bytes_stay_detectable_under_patches covers that).
        Engine::format(&mem, &small_format()).await.expect("format");
        let engine = Engine::open(mem.clone(), pool(), config_without_patches(mode))
            .await
            .expect("open");
        let k = key(1, 8, 0);
        put(&engine, k, 1, 0, &bytes(12_000, 4)).await;
        rot(&engine, &mem, k, 5);
        // An overwrite elsewhere in the chunk copies the rest on write; a
        // shrink keeps a prefix. Both would give rotten bytes a fresh CRC.
        for (version, op) in [
            (
                2,
                WriteOp::Update {
                    offset: 8192,
                    data: DmaBuf::copy_from(&bytes(100, 5)),
                    crc: crc32c::crc32c(&bytes(100, 5)),
                },
            ),
            (2, WriteOp::Truncate { len: 6000 }),
        ] {
            let err = engine
                .write(request(k, version, op))
                .await
                .expect_err("a write over rotten bytes");
            assert!(
                matches!(&err, EngineError::ChunkCorrupt { key, version: ChunkVersion(1), .. } if *key == k),
                "{err}"
            );
        }
        // Nothing was left pending or allocated by the failed writes.
        assert!(engine.stat(k).and_then(|i| i.pending).is_none());
        engine.check_consistency().expect("consistent");
        // A whole-chunk replace does not read the old bytes: it repairs the
        // chunk (what a resync from a healthy replica does).
        let good = bytes(12_000, 6);
        engine
            .write(replace(k, 3, &good))
            .await
            .expect("replace");
        engine.commit(k, ChunkVersion(3)).await.expect("commit");
        assert_same(&contents(&engine, k).await, &good);
    });
}

/// With read verification off, only reads that ask for it or that cover
/// the whole chunk are checked; the rest of the range is served as stored.
#[test]
fn unverified_partial_reads_are_a_configuration_choice() {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        Engine::format(&mem, &small_format()).await.expect("format");
        let engine = Engine::open(
            mem.clone(),
            pool(),
            EngineConfig {
                verify_reads: false,
                ..config(JournalMode::Thread)
            },
        )
        .await
        .expect("open");
        let k = key(1, 9, 0);
        put(&engine, k, 1, 0, &bytes(20_000, 7)).await;
        rot(&engine, &mem, k, 100);
        let far = engine
            .read(k, read_range(16_384, 4096))
            .await
            .expect("a block away from the rot, unverified");
        assert_same(&far.data, &bytes(20_000, 7)[16_384..20_000]);
        for request in [
            read_range(0, u32::MAX),
            ReadRequest {
                verify: true,
                ..read_range(16_384, 4096)
            },
        ] {
            let err = engine.read(k, request).await.expect_err("checked");
            assert!(matches!(err, EngineError::ChunkCorrupt { .. }), "{err}");
        }
    });
}

/// A panic on the journal thread, while a batch is at the device and more
/// commits wait behind it: the batch in flight completes, every other
/// commit fails promptly with an error naming the panic (none hangs), and
/// from then on the engine refuses everything, reads included, and says why.
#[test]
fn a_journal_thread_panic_fails_waiting_and_later_callers() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dev = SlowDevice::new(mem());
    rt.block_on(async {
        Engine::format(&dev, &small_format()).await.expect("format");
        // One batch at a time: with two, the commits queued below would go
        // out at once, beside the first, instead of waiting behind it.
        let one_at_a_time = EngineConfig {
            journal_depth: 1,
            ..config(JournalMode::Thread)
        };
        let engine = Engine::open(dev.clone(), pool(), one_at_a_time)
            .await
            .expect("open");
        let before = key(1, 10, 0);
        put(&engine, before, 1, 0, b"before").await;

        // The first commit's batch waits at the device.
        dev.gate.close();
        let first = key(1, 10, 1);
        engine
            .write(update(first, 1, 0, b"first"))
            .await
            .expect("write");
        let in_flight = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.commit(first, ChunkVersion(1)).await })
        };
        while dev.gate.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // More commits queue behind it.
        let mut waiting = tokio::task::JoinSet::new();
        for i in 2..10u32 {
            let k = key(1, 10, i);
            engine
                .write(update(k, 1, 0, b"queued"))
                .await
                .expect("write");
            let engine = engine.clone();
            waiting.spawn(async move { engine.commit(k, ChunkVersion(1)).await });
        }
        engine.inject_journal_panic();
        dev.gate.open();

        in_flight
            .await
            .expect("task")
            .expect("the batch at the device when the thread panicked is durable");
        let mut failed = 0;
        while let Some(done) = waiting.join_next().await {
            let err = done.expect("task").expect_err("no batch after the panic");
            assert!(matches!(err, EngineError::Poisoned { .. }), "{err}");
            assert!(err.to_string().contains("journal thread panicked"), "{err}");
            failed += 1;
        }
        assert_eq!(failed, 8);

        let reason = engine.poisoned().expect("the engine reports the fault");
        assert!(reason.contains("injected journal panic"), "{reason}");
        let err = engine
            .read(before, ReadRequest::whole_verified())
            .await
            .expect_err("reads refused after an internal fault");
        assert!(matches!(err, EngineError::Poisoned { .. }), "{err}");
        let err = engine
            .write(update(key(1, 10, 20), 1, 0, b"later"))
            .await
            .expect_err("writes refused");
        assert!(err.to_string().contains("journal thread panicked"), "{err}");
        let err = engine.remove(before).await.expect_err("removes refused");
        assert!(matches!(err, EngineError::Poisoned { .. }), "{err}");
        drop(engine);

        // Reopened from the device, the engine has everything acknowledged.
        let engine = Engine::open(dev.clone(), pool(), config(JournalMode::Thread))
            .await
            .expect("reopen");
        assert!(engine.poisoned().is_none());
        assert_same(&contents(&engine, before).await, b"before");
        assert_same(&contents(&engine, first).await, b"first");
        engine.check_consistency().expect("consistent");
    });
}

fn the_scrubber_finds_exactly_the_rotten_chunk(mode: JournalMode) {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        let engine = format_and_open(&mem, &small_format(), mode).await;
        let mut total_bytes = 0u64;
        let mut keys = Vec::new();
        for chain in [1u32, 2] {
            for index in 0..10u32 {
                let k = key(chain, 11, index);
                let len = 1000 + index as usize * 3000;
                put(&engine, k, 1, 0, &bytes(len, index as u8)).await;
                total_bytes += len as u64;
                keys.push(k);
            }
        }
        // A pending version is not the scrubber's business: only committed
        // bytes are checked.
        engine
            .write(update(keys[3], 2, 0, b"pending"))
            .await
            .expect("write");
        let rotten = keys[13];
        rot(&engine, &mem, rotten, 2500);

        let pass = Scrubber::new(engine.clone(), u64::MAX)
            .pass()
            .await
            .expect("a pass");
        assert_eq!(pass.chunks_verified, 20);
        assert_eq!(pass.bytes_verified, total_bytes);
        assert_eq!(pass.corrupt.len(), 1, "{:?}", pass.corrupt);
        assert_eq!(pass.corrupt[0].key, rotten);
        assert_eq!(pass.corrupt[0].version, ChunkVersion(1));
        assert!(pass.corrupt[0].message.contains("is corrupt"));

        // The same walk one chunk per step, resuming where each step ended.
        let mut position = None;
        let mut visited = 0;
        let mut corrupt = Vec::new();
        loop {
            let step = engine.scrub_step(position, 1).await.expect("a step");
            assert_eq!(step.chunks_verified, 1, "at least one chunk per step");
            visited += 1;
            corrupt.extend(step.corrupt.into_iter().map(|c| c.key));
            match step.next {
                Some(next) => position = Some(next),
                None => break,
            }
        }
        assert_eq!(visited, 20);
        assert_eq!(corrupt, vec![rotten]);
        assert!(
            engine.poisoned().is_none(),
            "rot in one chunk is not a device failure"
        );
    });
}

/// The scrubber keeps to its rate: on tokio's paused clock, a pass over
/// 6.25 MiB at 1 MiB/s takes simulated time, and never more than the rate
/// allows (it may run one step of 4 MiB ahead of it).
#[test]
fn the_scrubber_keeps_to_its_rate() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let mem = mem();
    rt.block_on(async {
        let engine = format_and_open(&mem, &small_format(), JournalMode::Inline).await;
        for index in 0..100u32 {
            put(
                &engine,
                key(1, 12, index),
                1,
                0,
                &bytes(65_536, index as u8),
            )
            .await;
        }
        let total_bytes = 100 * 65_536u64;
        let rate = 1u64 << 20;
        let started = tokio::time::Instant::now();
        let pass = Scrubber::new(engine.clone(), rate)
            .pass()
            .await
            .expect("a pass");
        let elapsed = started.elapsed();
        assert_eq!(pass.bytes_verified, total_bytes);
        assert!(pass.corrupt.is_empty());
        let at_rate = std::time::Duration::from_secs_f64(total_bytes as f64 / rate as f64);
        let step_ahead = std::time::Duration::from_secs_f64((4u64 << 20) as f64 / rate as f64);
        assert!(
            elapsed <= at_rate,
            "{elapsed:?} is slower than the rate allows"
        );
        assert!(
            elapsed + step_ahead >= at_rate,
            "{elapsed:?} is faster than the rate allows"
        );
    });
}

/// Writers of neighbouring slots share region blocks of the block-CRC
/// region; concurrent updates of one region block are combined into shared
/// writes. Whatever the interleaving, every block ends up matching its CRC,
/// in memory and on the device (after a reopen, which reads the region
/// afresh).
#[test]
fn concurrent_writers_of_neighbouring_slots_keep_every_block_crc() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let mem = mem();
    rt.block_on(async {
        let engine = format_and_open(&mem, &small_format(), JournalMode::Thread).await;
        const WRITERS: u32 = 16;
        const APPENDS: u32 = 12;
        let mut tasks = tokio::task::JoinSet::new();
        for writer in 0..WRITERS {
            let engine = engine.clone();
            tasks.spawn(async move {
                let k = key(1, 14, writer);
                let stream = bytes(APPENDS as usize * 3000, writer as u8);
                for version in 1..=APPENDS {
                    let at = (version - 1) * 3000;
                    put(
                        &engine,
                        k,
                        version,
                        at,
                        &stream[at as usize..(at + 3000) as usize],
                    )
                    .await;
                }
                stream
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("writer");
        }
        let check = |engine: Engine<MemDevice>, round: &'static str| async move {
            for writer in 0..WRITERS {
                let k = key(1, 14, writer);
                assert_eq!(
                    engine.block_crc_check(k).await.expect("check"),
                    Vec::<u64>::new(),
                    "{k:?} ({round})"
                );
                let want = bytes(APPENDS as usize * 3000, writer as u8);
                let read = engine
                    .read(k, read_range(5000, 20_000))
                    .await
                    .expect("read");
                assert_same(&read.data, &want[5000..25_000]);
            }
            assert_eq!(engine.block_crc_mismatches(), 0);
        };
        check(engine, "as written").await;
        let reopened = Engine::open(mem.clone(), pool(), config(JournalMode::Thread))
            .await
            .expect("reopen");
        check(reopened, "after a reopen").await;
    });
}

/// A patch reads only the blocks it overwrites, checked: one over a rotten
/// block fails without a trace; one elsewhere succeeds, and the new
/// version's CRC, updated from the base's rather than computed over what
/// was read, still exposes the rot, before and after a checkpoint writes
/// the patch into the slot (which must not give the rotten block an entry
/// that matches it).
fn rotten_bytes_stay_detectable_under_patches(mode: JournalMode) {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        let engine = format_and_open(&mem, &small_format(), mode).await;
        let k = key(1, 8, 1);
        let data = bytes(40_000, 4);
        put(&engine, k, 1, 0, &data).await;
        rot(&engine, &mem, k, 8192 + 5);
        let patch = |version: u32, offset: u32, len: usize| {
            request(
                k,
                version,
                WriteOp::Update {
                    offset,
                    data: DmaBuf::copy_from(&bytes(len, 5)),
                    crc: crc32c::crc32c(&bytes(len, 5)),
                },
            )
        };
        let err = engine
            .write(patch(2, 8192 + 100, 100))
            .await
            .expect_err("a patch over a rotten block");
        assert!(
            matches!(&err, EngineError::ChunkCorrupt { key, version: ChunkVersion(1), .. } if *key == k),
            "{err}"
        );
        assert!(engine.stat(k).and_then(|i| i.pending).is_none());
        engine.check_consistency().expect("consistent");
        // Elsewhere: served, and the rot stays visible.
        let outcome = engine.write(patch(2, 100, 100)).await.expect("patch");
        assert!(outcome.in_place);
        engine.commit(k, ChunkVersion(2)).await.expect("commit");
        let err = engine
            .read(k, ReadRequest::whole_verified())
            .await
            .expect_err("rot is never served");
        assert_corrupt(&err, k, 2, 40_000, 0, 40_000);
        // A reopen writes the patch into the slot (its checkpoint); the rot
        // is still caught, by a whole read and by a partial read of it.
        drop(engine);
        let engine = Engine::open(mem.clone(), pool(), config(mode))
            .await
            .expect("reopen");
        let err = engine
            .read(k, ReadRequest::whole_verified())
            .await
            .expect_err("rot is never served");
        assert_corrupt(&err, k, 2, 40_000, 0, 40_000);
        let err = engine
            .read(k, read_range(8192, 4096))
            .await
            .expect_err("rot is never served");
        assert_corrupt(&err, k, 2, 40_000, 8192, 4096);
        let read = engine.read(k, read_range(0, 4096)).await.expect("good block");
        let mut expected = data[..4096].to_vec();
        expected[100..200].copy_from_slice(&bytes(100, 5));
        assert_same(&read.data, &expected);
    });
}
