//! End-to-end integrity and fail-stop: bytes rotted on the device under a
//! chunk are never served (reads, and writes that copy the chunk, fail with
//! `ChunkCorrupt` naming chunk, version and ranges), the scrubber finds
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
    rotten_bytes_are_not_copied_into_a_new_version,
    the_scrubber_finds_exactly_the_rotten_chunk,
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

fn rotten_bytes_under_a_chunk_fail_every_read_of_it(mode: JournalMode) {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        // Every read checked (`verify_reads`), partial ones included.
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
        rot(&engine, &mem, rotten, 100);

        // A read of a block the rot is not in still fails: the CRC covers
        // the whole chunk, so the engine reads and checks all of it.
        for (offset, len) in [(0, u32::MAX), (0, 10), (16_384, 4096), (20_500, 100)] {
            let err = engine
                .read(rotten, read_range(offset, len))
                .await
                .expect_err("rotten bytes are never served");
            match &err {
                EngineError::ChunkCorrupt {
                    key,
                    version,
                    offset: 0,
                    end: 21_000,
                    read_offset,
                    read_end,
                    expected,
                    computed,
                    ..
                } => {
                    assert_eq!(*key, rotten);
                    assert_eq!(*version, ChunkVersion(2));
                    assert_eq!(*read_offset, offset);
                    assert_eq!(*read_end, offset.saturating_add(len).min(21_000));
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
        // Its neighbour, and the engine, are fine.
        assert_same(&contents(&engine, healthy).await, &bytes(20_000, 3));
        assert!(engine.poisoned().is_none());
        engine.check_consistency().expect("consistent");
    });
}

fn rotten_bytes_are_not_copied_into_a_new_version(mode: JournalMode) {
    let rt = runtime();
    let mem = mem();
    rt.block_on(async {
        let engine = format_and_open(&mem, &small_format(), mode).await;
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
            .write(request(
                k,
                3,
                WriteOp::Replace {
                    data: DmaBuf::copy_from(&good),
                    crc: crc32c::crc32c(&good),
                },
            ))
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
        let engine = format_and_open(&dev, &small_format(), JournalMode::Thread).await;
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
