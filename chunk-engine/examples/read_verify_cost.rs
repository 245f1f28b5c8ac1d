//! What checking reads costs, measured side by side in one run, on the
//! io_uring backend with 1 MiB chunks: 4 KiB random reads and 1 MiB reads,
//! each unchecked, checked against block CRCs (format version 3, the
//! default), and checked against the whole-chunk CRC (what a version 2
//! device must do); and what keeping block CRCs costs writes (1 MiB chunk
//! writes and 4 KiB in-place appends on a version 3 device against a version
//! 2 one); and, on an in-memory device, the CPU time a block check adds to a
//! 4 KiB read. Variants alternate within each round, so that a change in
//! machine load hits them alike.
//!
//! A whole-chunk check of a 4 KiB read reads the whole 1 MiB chunk; a block
//! check reads the block and its CRC (cached in memory). A read of the whole
//! chunk is always checked against the chunk's CRC, so the 1 MiB "unchecked"
//! and "block-checked" reads read the chunk less its last 4 KiB block, the
//! nearest partial read.
//!
//! Run: `cargo run --profile test -p flyfs-chunk-engine --example
//! read_verify_cost -- PATH [CHUNKS] [ROUNDS] [SECONDS]` (PATH on a file
//! system with O_DIRECT; the file is created, formatted, and left behind).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flyfs_bypass::uring::{UringConfig, UringDevice};
use flyfs_bypass::{BufferPool, DmaBuf, HugePages, PoolConfig};
use flyfs_chunk_engine::{
    BlockDevice, ChunkKey, Engine, EngineConfig, FormatOptions, ReadRequest, ReadVersion, WriteOp,
    WriteRequest,
};
use flyfs_proto::ids::{ChainId, ChainVersion, ChunkId, ChunkVersion, ClientId, RequestId};
use rand::{Rng, SeedableRng};

const CHUNK_BYTES: u32 = 1 << 20;
const RAND_DEPTH: usize = 32;
const SEQ_DEPTH: usize = 8;
const APPEND_BYTES: u32 = 4096;

fn key(inode: u64, index: u32) -> ChunkKey {
    ChunkKey::new(ChainId(1), ChunkId::new(inode, index))
}

/// Runs `depth` workers issuing `request` reads of random chunks for
/// `seconds`; returns reads per second.
async fn read_phase(
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
                let out = engine.read(key(1, index), req).await.expect("read");
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

fn data() -> Vec<u8> {
    (0..CHUNK_BYTES).map(|i| (i * 7 + 3) as u8).collect()
}

async fn write_commit<D: BlockDevice>(
    engine: &Engine<D>,
    key: ChunkKey,
    version: u32,
    op: WriteOp,
) {
    engine
        .write(WriteRequest {
            key,
            version: ChunkVersion(version),
            chain_version: ChainVersion(1),
            op,
            client: ClientId(1),
            request: RequestId(u64::from(version)),
            prepare: false,
        })
        .await
        .expect("write");
    engine
        .commit(key, ChunkVersion(version))
        .await
        .expect("commit");
}

/// Writes chunks `0..chunks` of inode 1 whole, once.
async fn fill<D: BlockDevice>(engine: &Engine<D>, pool: &BufferPool, chunks: u32) {
    let data = data();
    let crc = crc32c::crc32c(&data);
    for index in 0..chunks {
        let mut buf = pool.alloc(CHUNK_BYTES as usize);
        buf.copy_from_slice(&data);
        write_commit(
            engine,
            key(1, index),
            1,
            WriteOp::Replace { data: buf, crc },
        )
        .await;
    }
}

/// For `seconds`, `depth` workers each write 1 MiB chunks of their own
/// (`appends` false: whole-chunk replaces) or append 4 KiB to chunks of
/// their own (in place, up to 1 MiB, then the next chunk). Returns writes
/// per second (each write committed before the next).
async fn write_phase(
    engine: &Engine<UringDevice>,
    pool: &BufferPool,
    seconds: f64,
    appends: bool,
    depth: usize,
    inode: u64,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let data = Arc::new(data());
    for worker in 0..depth as u32 {
        let (engine, done, data, pool) = (engine.clone(), done.clone(), data.clone(), pool.clone());
        tasks.spawn(async move {
            // Each worker's chunks: index worker, worker + depth, ...
            let mut index = worker;
            let mut version = 0u32;
            while tokio::time::Instant::now() < deadline {
                version += 1;
                let op = if appends {
                    let offset = (version - 1) * APPEND_BYTES;
                    let bytes = &data[offset as usize..(offset + APPEND_BYTES) as usize];
                    WriteOp::Update {
                        offset,
                        data: DmaBuf::copy_from(bytes),
                        crc: crc32c::crc32c(bytes),
                    }
                } else {
                    let mut buf = pool.alloc(CHUNK_BYTES as usize);
                    buf.copy_from_slice(&data);
                    WriteOp::Replace {
                        data: buf,
                        crc: crc32c::crc32c(&data),
                    }
                };
                write_commit(&engine, key(inode, index), version, op).await;
                done.fetch_add(1, Ordering::Relaxed);
                if appends && version * APPEND_BYTES == CHUNK_BYTES {
                    engine.remove(key(inode, index)).await.expect("remove");
                    index += depth as u32;
                    version = 0;
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("worker");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// CPU time per 4 KiB read on an in-memory device (no I/O wait, no
/// concurrency): what each check adds to a read, in nanoseconds, measured
/// over `reads` reads per variant, variants alternating in `rounds` rounds.
fn cpu_cost(rounds: u32, reads: u32) {
    use flyfs_bypass::mem::MemDevice;
    const CHUNKS: u32 = 64;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let pool = BufferPool::new(&PoolConfig {
        classes: vec![(4096, 64), (CHUNK_BYTES as usize, 8)],
        hugepages: HugePages::Never,
    })
    .expect("pool");
    let dev = MemDevice::new(u64::from(CHUNKS + 32) * u64::from(CHUNK_BYTES), 4096);
    rt.block_on(async {
        let options = FormatOptions {
            chunk_size_max: 4 << 20,
            ..FormatOptions::default()
        };
        Engine::format(&dev, &options).await.expect("format");
        let open = |verify_reads| {
            Engine::open(
                dev.clone(),
                pool.clone(),
                EngineConfig {
                    verify_reads,
                    ..EngineConfig::default()
                },
            )
        };
        fill(&open(true).await.expect("open"), &pool, CHUNKS).await;
        println!("ns per 4 KiB read, in memory: round | unchecked | block-checked");
        for round in 0..rounds {
            let mut ns = [0.0f64; 2];
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for variant in order {
                // One engine per device at a time; opened outside the timing.
                let engine = open(variant == 1).await.expect("open");
                let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(round));
                let started = Instant::now();
                for _ in 0..reads {
                    let index = rng.random_range(0..CHUNKS);
                    let out = engine
                        .read(key(1, index), rand_4k(false)(&mut rng))
                        .await
                        .expect("read");
                    assert_eq!(out.data.len(), 4096);
                }
                ns[variant] = started.elapsed().as_nanos() as f64 / f64::from(reads);
            }
            println!("{round:5} | {:6.0} | {:6.0}", ns[0], ns[1]);
        }
    });
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
    cpu_cost(rounds, 200_000);
    let pool = BufferPool::new(&PoolConfig {
        classes: vec![
            (4096, 2 * RAND_DEPTH + 64),
            (CHUNK_BYTES as usize, 2 * RAND_DEPTH + 16),
        ],
        hugepages: HugePages::Auto,
    })
    .expect("pool");
    // Room for the read set, the write phases' chunks, and the regions.
    let size = (u64::from(chunks) + 256) * u64::from(CHUNK_BYTES) + (64 << 20);
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
        let open = |verify_reads: bool| {
            let (dev, pool) = (dev.clone(), pool.clone());
            async move {
                let config = EngineConfig {
                    verify_reads,
                    ..EngineConfig::default()
                };
                Engine::open(dev, pool, config).await.expect("open")
            }
        };
        let data = data();
        let crc_started = Instant::now();
        let mut sink = 0u32;
        for _ in 0..256 {
            sink ^= crc32c::crc32c(std::hint::black_box(&data));
        }
        let crc_mib_s = 256.0 / crc_started.elapsed().as_secs_f64();
        println!("crc32c alone: {crc_mib_s:.0} MiB/s ({sink:08x})");

        Engine::format(&dev, &options).await.expect("format");
        fill(&open(true).await, &pool, chunks).await;
        println!(
            "reads/s: round | 4k unchecked | 4k block-checked | 4k whole-checked | \
             1m-4k unchecked | 1m-4k block-checked | 1m whole-checked | block mismatches"
        );
        for round in 0..rounds {
            // The check is a setting of the engine: reopen between variants
            // (outside the timed phases). Which setting goes first swaps
            // every round, so that neither always runs on a fresh engine.
            let (mut r4, mut r1) = (0.0, 0.0);
            let (mut b4, mut w4, mut b1, mut w1, mut mismatches) = (0.0, 0.0, 0.0, 0.0, 0);
            for checked_setting in [round % 2 == 1, round % 2 == 0] {
                let engine = open(checked_setting).await;
                if checked_setting {
                    b4 = read_phase(&engine, chunks, seconds, rand_4k(false), RAND_DEPTH).await;
                    w4 = read_phase(&engine, chunks, seconds, rand_4k(true), RAND_DEPTH).await;
                    b1 = read_phase(&engine, chunks, seconds, seq_1m(false), SEQ_DEPTH).await;
                    w1 = read_phase(&engine, chunks, seconds, seq_1m(true), SEQ_DEPTH).await;
                    mismatches = engine.block_crc_mismatches();
                } else {
                    r4 = read_phase(&engine, chunks, seconds, rand_4k(false), RAND_DEPTH).await;
                    r1 = read_phase(&engine, chunks, seconds, seq_1m(false), SEQ_DEPTH).await;
                }
            }
            println!(
                "{round:5} | {r4:7.0} | {b4:7.0} | {w4:7.0} | {r1:6.0} | {b1:6.0} | {w1:6.0} | {mismatches}"
            );
        }

        println!("writes/s: round | format | 1 MiB chunk writes | 4 KiB appends (mostly in place)");
        for round in 0..rounds {
            // Which format goes first swaps every round, likewise.
            let order = if round % 2 == 0 { [2, 3] } else { [3, 2] };
            for version in order {
                Engine::format_version(&dev, &options, version)
                    .await
                    .expect("format");
                let engine = open(true).await;
                let whole = write_phase(&engine, &pool, seconds, false, SEQ_DEPTH, 2).await;
                let appends = write_phase(&engine, &pool, seconds, true, RAND_DEPTH, 3).await;
                println!("{round:5} | v{version} | {whole:6.0} | {appends:7.0}");
            }
        }
    });
}
