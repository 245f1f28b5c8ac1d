//! The engine on the real io_uring backend over a temporary file: the
//! operations, concurrency, and durability across close and reopen.

mod common;

use common::*;
use flyfs_bypass::uring::{UringConfig, UringDevice};
use flyfs_chunk_engine::{Engine, EngineConfig, EngineError, FormatOptions};
use flyfs_proto::ids::{ChainId, InodeId};

fn device(path: &std::path::Path, size: u64) -> UringDevice {
    UringDevice::create_file(path, size, &UringConfig::default(), None)
        .expect("io_uring device on a temp file")
}

#[test]
fn engine_on_io_uring_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("engine.img");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pool = pool();
        let dev = UringDevice::create_file(&path, 256 << 20, &UringConfig::default(), Some(&pool))
            .expect("device");
        let options = FormatOptions {
            chunk_size_min: 64 << 10,
            chunk_size_max: 4 << 20,
            ..FormatOptions::default()
        };
        Engine::format(&dev, &options).await.expect("format");
        let engine = Engine::open(dev, pool, EngineConfig::default())
            .await
            .expect("open");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64u32 {
            let engine = engine.clone();
            tasks.spawn(async move {
                let k = key(1, 42, i);
                put(
                    &engine,
                    k,
                    1,
                    0,
                    &bytes(300_000 + i as usize * 1000, i as u8),
                )
                .await;
                // An unaligned append in place, then an overwrite by copy-on-write.
                put(&engine, k, 2, 300_000 + i * 1000, &bytes(5000, 7)).await;
                put(&engine, k, 3, 17, b"overwrite").await;
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("task");
        }
        engine.check_consistency().expect("consistent");
        assert_eq!(
            engine
                .last_chunk(ChainId(1), InodeId(42))
                .expect("last")
                .key,
            key(1, 42, 63)
        );
    });
    let rt = runtime();
    rt.block_on(async {
        let engine = Engine::open(device(&path, 256 << 20), pool(), EngineConfig::default())
            .await
            .expect("reopen");
        for i in 0..64u32 {
            let mut want = bytes(300_000 + i as usize * 1000, i as u8);
            want.extend(bytes(5000, 7));
            want[17..26].copy_from_slice(b"overwrite");
            assert_same(&contents(&engine, key(1, 42, i)).await, &want);
        }
        engine.check_consistency().expect("consistent");
    });
}

#[test]
fn unformatted_and_reformatted_files_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("blank.img");
    let rt = runtime();
    rt.block_on(async {
        let err = Engine::open(device(&path, 64 << 20), pool(), EngineConfig::default())
            .await
            .expect_err("blank");
        assert!(matches!(err, EngineError::NotFormatted { .. }), "{err}");
        assert!(
            err.to_string().contains("blank.img"),
            "error names the device: {err}"
        );
        let dev = device(&path, 64 << 20);
        Engine::format(&dev, &small_format()).await.expect("format");
        let err = Engine::format(&dev, &small_format())
            .await
            .expect_err("second format");
        assert!(matches!(err, EngineError::AlreadyFormatted { .. }), "{err}");
    });
}

/// A panic on the device's reactor thread (the test hook): reads waiting on
/// the device and every later operation fail promptly with errors naming
/// the failure, none hangs, and the engine reports itself poisoned, which
/// the storage service turns into an offline target.
#[test]
fn a_reactor_panic_fails_the_engine_instead_of_hanging_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pool = pool();
        let dev = UringDevice::create_file(
            dir.path().join("engine.img"),
            64 << 20,
            &UringConfig::default(),
            Some(&pool),
        )
        .expect("device");
        let options = FormatOptions {
            chunk_size_min: 64 << 10,
            chunk_size_max: 1 << 20,
            ..FormatOptions::default()
        };
        Engine::format(&dev, &options).await.expect("format");
        let engine = Engine::open(dev.clone(), pool, EngineConfig::default())
            .await
            .expect("open");
        for i in 0..16u32 {
            put(&engine, key(1, 5, i), 1, 0, &bytes(200_000, i as u8)).await;
        }
        dev.inject_reactor_panic();
        let mut readers = tokio::task::JoinSet::new();
        for i in 0..16u32 {
            let engine = engine.clone();
            readers.spawn(async move {
                engine
                    .read(
                        key(1, 5, i),
                        flyfs_chunk_engine::ReadRequest::whole_verified(),
                    )
                    .await
            });
        }
        let mut failed = 0;
        while let Some(done) = readers.join_next().await {
            // The reads the reactor took before it panicked completed; the
            // one it panicked on and all after it fail.
            if let Err(err) = done.expect("task") {
                assert!(err.is_device_failure(), "{err}");
                assert!(err.to_string().contains("reactor thread panicked"), "{err}");
                failed += 1;
            }
        }
        assert!(failed >= 1, "the read the reactor panicked on fails");
        let reason = engine.poisoned().expect("the engine reports the failure");
        assert!(reason.contains("injected reactor panic"), "{reason}");
        let err = engine
            .write(update(key(1, 5, 99), 1, 0, b"later"))
            .await
            .expect_err("writes refused");
        assert!(matches!(err, EngineError::Poisoned { .. }), "{err}");
        let err = engine
            .read(
                key(1, 5, 0),
                flyfs_chunk_engine::ReadRequest::whole_verified(),
            )
            .await
            .expect_err("reads refused");
        assert!(matches!(err, EngineError::Poisoned { .. }), "{err}");
    });
}
