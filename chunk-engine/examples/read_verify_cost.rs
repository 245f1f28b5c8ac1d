//! What checking reads against the whole-chunk CRC costs, measured side by
//! side in one run: 4 KiB random reads and 1 MiB whole-chunk reads of 1 MiB
//! chunks on the io_uring backend, with and without verification, in
//! interleaved rounds so that a change in machine load hits both alike.
//!
//! A chunk's CRC covers the whole chunk, so a verified 4 KiB read reads the
//! whole 1 MiB chunk; a 1 MiB read costs only the CRC computation. The
//! "unverified 1 MiB" row reads the chunk less its last 4 KiB block, which is
//! the nearest unverified equivalent (whole-chunk reads are always checked).
//!
//! Run: `cargo run --release -p flyfs-chunk-engine --example read_verify_cost
//! -- PATH [CHUNKS] [ROUNDS] [SECONDS]` (PATH on a file system with O_DIRECT;
//! the file is created, formatted, and left behind).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flyfs_bypass::uring::{UringConfig, UringDevice};
use flyfs_bypass::{BufferPool, HugePages, PoolConfig};
use flyfs_chunk_engine::{
    ChunkKey, Engine, EngineConfig, FormatOptions, ReadRequest, ReadVersion, WriteOp, WriteRequest,
};
use flyfs_proto::ids::{ChainId, ChainVersion, ChunkId, ChunkVersion, ClientId, RequestId};
use rand::{Rng, SeedableRng};

const CHUNK_BYTES: u32 = 1 << 20;
const RAND_DEPTH: usize = 32;
const SEQ_DEPTH: usize = 8;

fn key(index: u32) -> ChunkKey {
    ChunkKey::new(ChainId(1), ChunkId::new(1, index))
}

/// Runs `depth` workers issuing `request` reads of random chunks for
/// `seconds`; returns reads per second.
async fn phase(
    engine: &Engine<UringDevice>,
    chunks: u32,
    seconds: f64,
    request: impl Fn(&mut rand::rngs::StdRng) -> ReadRequest + Send + Sync + Copy + 'static,
    depth: usize,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..depth {
        let engine = engine.clone();
        let done = done.clone();
        tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(worker as u64);
            while tokio::time::Instant::now() < deadline {
                let index = rng.random_range(0..chunks);
                let req = request(&mut rng);
                let out = engine.read(key(index), req).await.expect("read");
                assert!(!out.data.is_empty());
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("worker");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn rand_4k(verify: bool) -> impl Fn(&mut rand::rngs::StdRng) -> ReadRequest + Copy {
    move |rng| ReadRequest {
        offset: rng.random_range(0..CHUNK_BYTES / 4096) * 4096,
        len: 4096,
        version: ReadVersion::Committed,
        verify,
    }
}

fn seq_1m(verify: bool) -> impl Fn(&mut rand::rngs::StdRng) -> ReadRequest + Copy {
    move |_| ReadRequest {
        offset: 0,
        len: if verify {
            CHUNK_BYTES
        } else {
            CHUNK_BYTES - 4096
        },
        version: ReadVersion::Committed,
        verify,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: read_verify_cost PATH [CHUNKS] [ROUNDS] [SECONDS]");
    let arg = |i: usize, default: f64| {
        args.get(i)
            .map_or(default, |a| a.parse().expect("a number"))
    };
    let chunks = arg(2, 256.0) as u32;
    let rounds = arg(3, 3.0) as u32;
    let seconds = arg(4, 3.0);
    let pool = BufferPool::new(&PoolConfig {
        classes: vec![
            (4096, 2 * RAND_DEPTH + 64),
            (CHUNK_BYTES as usize, 2 * RAND_DEPTH + 16),
        ],
        hugepages: HugePages::Auto,
    })
    .expect("pool");
    let size = (u64::from(chunks) + 64) * u64::from(CHUNK_BYTES) + (64 << 20);
    let dev =
        UringDevice::create_file(path, size, &UringConfig::default(), Some(&pool)).expect("device");
    println!("{}", dev.features());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let options = FormatOptions {
            chunk_size_max: 4 << 20,
            force: true,
            ..FormatOptions::default()
        };
        Engine::format(&dev, &options).await.expect("format");
        // Unverified unless a request asks: both variants in one engine.
        let config = EngineConfig {
            verify_reads: false,
            ..EngineConfig::default()
        };
        let engine = Engine::open(dev.clone(), pool.clone(), config)
            .await
            .expect("open");
        let data: Vec<u8> = (0..CHUNK_BYTES).map(|i| (i * 7 + 3) as u8).collect();
        let crc = crc32c::crc32c(&data);
        for index in 0..chunks {
            let mut buf = pool.alloc(CHUNK_BYTES as usize);
            buf.copy_from_slice(&data);
            engine
                .write(WriteRequest {
                    key: key(index),
                    version: ChunkVersion(1),
                    chain_version: ChainVersion(1),
                    op: WriteOp::Replace { data: buf, crc },
                    client: ClientId(1),
                    request: RequestId(u64::from(index)),
                    prepare: false,
                })
                .await
                .expect("write");
            engine
                .commit(key(index), ChunkVersion(1))
                .await
                .expect("commit");
        }
        let crc_started = Instant::now();
        let mut sink = 0u32;
        for _ in 0..256 {
            sink ^= crc32c::crc32c(std::hint::black_box(&data));
        }
        let crc_mib_s = 256.0 / crc_started.elapsed().as_secs_f64();
        println!("crc32c alone: {crc_mib_s:.0} MiB/s ({sink:08x})");
        println!("round  4k-unverified/s  4k-verified/s  1m-unverified(-4k)/s  1m-verified/s");
        for round in 0..rounds {
            let r4 = phase(&engine, chunks, seconds, rand_4k(false), RAND_DEPTH).await;
            let v4 = phase(&engine, chunks, seconds, rand_4k(true), RAND_DEPTH).await;
            let r1 = phase(&engine, chunks, seconds, seq_1m(false), SEQ_DEPTH).await;
            let v1 = phase(&engine, chunks, seconds, seq_1m(true), SEQ_DEPTH).await;
            println!("{round:5}  {r4:16.0}  {v4:13.0}  {r1:20.0}  {v1:13.0}");
        }
    });
}
