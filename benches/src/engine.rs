//! `flyfs bench engine`: the chunk engine's side of the engine-vs-fio
//! comparison (benches/engine-vs-fio runs both, interleaved).
//!
//! On a file (created if needed, formatted if not yet a chunk engine; an
//! existing engine is opened and keeps its data), it writes and commits
//! 1 MiB chunks with `depth` in flight, reads them back, then issues 4 KiB
//! random reads inside them at `rand_depth` for a fixed time, then 4 KiB
//! random writes into them (each committed), reporting the device's write
//! amplification: bytes the engine asked the device to write per byte of
//! payload, counted by the engine, the reopen that writes the last patches
//! into their chunks included. The bench chunks live on a chain of their own
//! and are removed afterwards.
//!
//! With `--raw-offset`, it then runs fio's jobs straight on the device, with
//! no engine, in `--raw-size` bytes from that offset (a region the bench
//! chunks do not use): 4 KiB random reads and writes at depth 1 and 64, 1 MiB
//! sequential writes (then a flush) and reads at depth 16, each with the
//! process's CPU time per I/O. benches/nvme-vs-kernel sets those rows beside
//! fio's on the same controller bound to the kernel's driver.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flyfs_bypass::nvme::NvmeConfig;
use flyfs_bypass::uring::{UringConfig, UringDevice};
use flyfs_bypass::{
    AnyDevice, BlockDevice, BufferPool, DeviceConfig, HugePages, PoolConfig, open_device,
};
use flyfs_chunk_engine::{
    ChunkKey, Engine, EngineConfig, EngineError, FormatOptions, ReadRequest, WriteOp, WriteRequest,
};
use flyfs_proto::ids::{ChainId, ChainVersion, ChunkId, ChunkVersion, ClientId, RequestId};
use rand::{Rng, SeedableRng};

/// A chain id no deployment uses, so the bench never touches real chunks.
const BENCH_CHAIN: ChainId = ChainId(u32::MAX);
const BENCH_INODE: u64 = 0xbe4c_0000_0000_0000;
const CHUNK_BYTES: usize = 1 << 20;

#[derive(clap::Args, Debug)]
pub struct EngineArgs {
    /// File (or block device) to run on; created if missing.
    #[arg(long)]
    path: std::path::PathBuf,
    /// Size of the file to create.
    #[arg(long, default_value = "2GiB", value_parser = crate::size::parse)]
    size: u64,
    /// Bytes of 1 MiB chunks to write and read.
    #[arg(long, default_value = "768MiB", value_parser = crate::size::parse)]
    total: u64,
    /// 1 MiB I/Os in flight.
    #[arg(long, default_value_t = 16)]
    depth: usize,
    /// 4 KiB random reads in flight.
    #[arg(long, default_value_t = 64)]
    rand_depth: usize,
    /// Seconds of random reads.
    #[arg(long, default_value_t = 10.0)]
    rand_seconds: f64,
    /// Let a kernel thread poll the submission queue.
    #[arg(long)]
    sqpoll: bool,
    /// Microseconds the device reactor busy-polls before sleeping.
    #[arg(long)]
    poll_spin_us: Option<u32>,
    /// Microseconds a lone I/O's future reaps the NVMe completion queue
    /// itself (yielding between polls) before handing its command to the
    /// reactor thread (`vfio:` devices; the driver's default is 1000; 0
    /// hands every I/O to the reactor).
    #[arg(long)]
    nvme_poll_budget_us: Option<u32>,
    /// Where the workers run: `reactor` (on the device's reactor threads,
    /// run to completion), `caller` (on the calling thread, each I/O handed to
    /// the reactor), or `auto`: 1 MiB phases on the caller, whose CRC work
    /// then overlaps the reactor's I/O, and 4 KiB random reads on the reactor.
    #[arg(long, value_enum, default_value_t = Placement::Auto)]
    workers: Placement,
    /// 4 KiB random writes into the written chunks (at `rand_depth`).
    #[arg(long, default_value_t = 20_000)]
    rand_writes: u32,
    /// Make the random writes copy their chunk, as before patches (the
    /// comparison for the write amplification).
    #[arg(long)]
    no_patches: bool,
    /// Run the raw device jobs (no engine) at this device offset, after the
    /// engine's phases.
    #[arg(long, value_parser = crate::size::parse)]
    raw_offset: Option<u64>,
    /// Bytes of the raw jobs' region.
    #[arg(long, default_value = "256MiB", value_parser = crate::size::parse)]
    raw_size: u64,
    /// Skip the engine's phases (with `--raw-offset`: only the raw jobs).
    #[arg(long)]
    raw_only: bool,
    /// Journal batches in flight at once (the engine's `journal_depth`;
    /// default the engine's).
    #[arg(long)]
    journal_depth: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

impl EngineArgs {
    /// The engine's configuration for this run.
    fn engine_config(&self) -> EngineConfig {
        let mut config = EngineConfig::default();
        if let Some(depth) = self.journal_depth {
            config.journal_depth = depth;
        }
        config
    }
}

/// One raw device job's outcome.
#[derive(serde::Serialize, Clone, Copy, Debug)]
pub struct RawJob {
    /// I/Os per second (4 KiB jobs) or MiB per second (1 MiB jobs).
    pub rate: f64,
    /// The process's CPU time (every thread: callers and reactors) per I/O,
    /// in microseconds.
    pub cpu_us_per_io: f64,
    pub ios: u64,
    /// Where the userspace NVMe driver did this job's work (`vfio:` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvme_paths: Option<NvmePaths>,
}

/// Where the userspace NVMe driver's work was done during one job: requests
/// the submitter issued itself, completions reaped by waiting futures
/// against those reaped by reactor threads, futures that handed over,
/// wake-ups of a parked reactor; and the deepest queue so far.
#[derive(serde::Serialize, Clone, Copy, Debug)]
pub struct NvmePaths {
    pub direct: u64,
    pub reaped_by_futures: u64,
    pub reaped_by_reactors: u64,
    pub handovers: u64,
    pub wakeups: u64,
    /// Since the device was opened, not only during the job.
    pub in_flight_max: u64,
}

/// The NVMe driver's counters (an NVMe device only), for [`paths_since`].
fn nvme_stats(dev: &AnyDevice) -> Option<flyfs_bypass::nvme::NvmeStats> {
    match dev {
        AnyDevice::Nvme(device) => Some(device.stats()),
        AnyDevice::Uring(_) => None,
    }
}

/// The NVMe driver's work since `before` (from [`nvme_stats`]).
fn paths_since(
    dev: &AnyDevice,
    before: Option<flyfs_bypass::nvme::NvmeStats>,
) -> Option<NvmePaths> {
    let (before, now) = (before?, nvme_stats(dev)?);
    Some(NvmePaths {
        direct: now.direct - before.direct,
        reaped_by_futures: now.reaped_by_futures - before.reaped_by_futures,
        reaped_by_reactors: now.reaped_by_reactors - before.reaped_by_reactors,
        handovers: now.handovers - before.handovers,
        wakeups: now.wakeups - before.wakeups,
        in_flight_max: now.in_flight_max,
    })
}

/// The raw device jobs, named like fio's.
#[derive(serde::Serialize, Debug)]
pub struct RawResults {
    pub write_1m_qd16: RawJob,
    pub read_1m_qd16: RawJob,
    pub randread_4k_qd1: RawJob,
    pub randread_4k_qd64: RawJob,
    pub randwrite_4k_qd1: RawJob,
    pub randwrite_4k_qd64: RawJob,
}

fn key(index: u32) -> ChunkKey {
    ChunkKey::new(BENCH_CHAIN, ChunkId::new(BENCH_INODE, index))
}

#[derive(serde::Serialize)]
struct Results {
    seq_write_mib_s: f64,
    seq_read_mib_s: f64,
    rand_read_4k_iops: f64,
    /// The same random reads of the same chunks, issued straight to the
    /// device by the same harness: the block layer's share of the cost.
    rand_read_4k_iops_device: f64,
    /// Where the userspace NVMe driver did the work of those two random
    /// read runs (`vfio:` only).
    rand_read_4k_nvme_paths: Option<NvmePaths>,
    rand_read_4k_device_nvme_paths: Option<NvmePaths>,
    /// Group commit: chunk commits per journal batch (and flush) while writing.
    commits_per_batch: f64,
    /// 4 KiB random writes into existing chunks, each committed.
    rand_write_4k_iops: f64,
    /// Bytes written to the device per byte of payload by those writes
    /// (their later application in place included).
    rand_write_4k_amplification: f64,
    /// Whether those writes were patches (else copies of their chunk).
    rand_write_patches: bool,
    /// Commits per journal batch during those writes.
    rand_write_commits_per_batch: f64,
    /// Checkpoints during those writes (each writes the patches since the
    /// one before into their chunks).
    rand_write_checkpoints: u64,
    workers: Placement,
    chunks: u32,
    depth: usize,
    rand_depth: usize,
    device: String,
    io_uring: String,
    /// The raw device jobs, with `--raw-offset`.
    raw: Option<RawResults>,
    /// I/O queue pairs of an NVMe device.
    nvme_queue_pairs: Option<usize>,
}

pub fn run(args: &EngineArgs) -> anyhow::Result<()> {
    if args.depth == 0 || args.rand_depth == 0 {
        bail!("--depth and --rand-depth must be at least 1");
    }
    let chunks = u32::try_from(args.total / CHUNK_BYTES as u64).context("--total is too large")?;
    if chunks == 0 {
        bail!("--total must be at least 1 MiB");
    }
    let pooled_chunks = 2 * args.depth + 8;
    let pool = BufferPool::new(&PoolConfig {
        classes: vec![
            (4096, 2 * args.rand_depth + 64),
            (CHUNK_BYTES, pooled_chunks),
        ],
        hugepages: HugePages::Auto,
    })?;
    let mut config = UringConfig {
        queue_depth: 256,
        sqpoll: args.sqpoll,
        ..UringConfig::default()
    };
    if let Some(spin) = args.poll_spin_us {
        config.poll_spin_us = spin;
    }
    let is_vfio = args
        .path
        .to_str()
        .and_then(flyfs_bypass::any::vfio_address)
        .is_some();
    let dev = if is_vfio || args.path.exists() {
        let mut nvme = NvmeConfig {
            queue_depth: 256,
            ..NvmeConfig::default()
        };
        if let Some(spin) = args.poll_spin_us {
            nvme.poll_spin_us = spin;
        }
        if let Some(budget) = args.nvme_poll_budget_us {
            nvme.poll_budget_us = budget;
        }
        let devices = DeviceConfig {
            uring: config.clone(),
            nvme,
        };
        open_device(&args.path, &devices, Some(&pool))
    } else {
        UringDevice::create_file(&args.path, args.size, &config, Some(&pool)).map(AnyDevice::Uring)
    }
    .with_context(|| format!("opening {}", args.path.display()))?;
    let features = match &dev {
        AnyDevice::Uring(device) => device.features().to_string(),
        AnyDevice::Nvme(device) => {
            let identity = device.identity();
            format!(
                "userspace NVMe over VFIO: {} ({}), MDTS {}, volatile write cache {}",
                identity.model,
                identity.serial,
                identity.mdts,
                if identity.volatile_write_cache {
                    "on"
                } else {
                    "off"
                }
            )
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let nvme_queue_pairs = match &dev {
        AnyDevice::Nvme(device) => Some(device.queue_pairs()),
        AnyDevice::Uring(_) => None,
    };
    if let Some(offset) = args.raw_offset {
        let geometry = dev.geometry();
        if !offset.is_multiple_of(1 << 20)
            || args.raw_size < (1 << 20)
            || !args.raw_size.is_multiple_of(1 << 20)
        {
            bail!("--raw-offset and --raw-size must be whole MiB (and the size at least 1 MiB)");
        }
        if offset + args.raw_size > geometry.capacity_bytes {
            bail!(
                "the raw region {offset}+{} passes the device's end ({} bytes)",
                args.raw_size,
                geometry.capacity_bytes
            );
        }
    }
    if args.raw_only {
        let Some(offset) = args.raw_offset else {
            bail!("--raw-only needs --raw-offset");
        };
        let raw = runtime.block_on(raw_jobs(
            &dev,
            &pool,
            offset,
            args.raw_size,
            args.rand_seconds,
        ))?;
        // Where the NVMe driver's work was done: requests the submitter
        // issued itself, completions reaped by the waiting futures against
        // those reaped by reactor threads, and futures that handed over.
        let nvme_paths = match &dev {
            AnyDevice::Nvme(device) => {
                let stats = device.stats();
                Some(serde_json::json!({
                    "direct": stats.direct,
                    "reaped_by_futures": stats.reaped_by_futures,
                    "reaped_by_reactors": stats.reaped_by_reactors,
                    "handovers": stats.handovers,
                    "wakeups": stats.wakeups,
                }))
            }
            AnyDevice::Uring(_) => None,
        };
        if args.json {
            println!(
                "{}",
                serde_json::json!({"raw": raw, "device": args.path.display().to_string(),
                                   "io_uring": features, "nvme_queue_pairs": nvme_queue_pairs,
                                   "nvme_paths": nvme_paths})
            );
        } else {
            print_raw(&raw);
        }
        return Ok(());
    }
    let results = runtime.block_on(async {
        let engine = match Engine::open(dev.clone(), pool.clone(), args.engine_config()).await {
            Ok(engine) => engine,
            Err(EngineError::NotFormatted { .. }) => {
                Engine::format(&dev, &FormatOptions::default()).await?;
                Engine::open(dev.clone(), pool.clone(), args.engine_config()).await?
            }
            Err(error) => return Err(anyhow::Error::from(error)),
        };
        let space = engine.space();
        if args.total > space.data_bytes - space.allocated_bytes {
            bail!(
                "--total {} exceeds the free space {}",
                args.total,
                space.data_bytes - space.allocated_bytes
            );
        }
        clean(&engine).await?;
        let on_reactor = || Workers::Reactor(dev.clone());
        let (large, small) = match args.workers {
            Placement::Auto => (Workers::Caller, on_reactor()),
            Placement::Reactor => (on_reactor(), on_reactor()),
            Placement::Caller => (Workers::Caller, Workers::Caller),
        };
        let before = engine.stats();
        let write = seq_write(&large, &engine, chunks, args.depth, pooled_chunks).await?;
        let after = engine.stats();
        let commits_per_batch = (after.records - before.records) as f64
            / (after.batches - before.batches).max(1) as f64;
        let read = seq_read(&large, &engine, chunks, args.depth).await?;
        let run = Duration::from_secs_f64(args.rand_seconds);
        let stats_before = nvme_stats(&dev);
        let iops = rand_read(&small, &engine, chunks, args.rand_depth, run, false).await?;
        let paths = paths_since(&dev, stats_before);
        let stats_before = nvme_stats(&dev);
        let iops_device = rand_read(&small, &engine, chunks, args.rand_depth, run, true).await?;
        let device_paths = paths_since(&dev, stats_before);
        // The random writes run on an engine opened with or without
        // patches; reopening it at the end writes every patch still in the
        // journal into its chunk, which those writes must be charged for.
        drop(engine);
        let mut config = args.engine_config();
        if args.no_patches {
            config.patch_bytes_max = 0;
        }
        let engine = Engine::open(dev.clone(), pool.clone(), config.clone()).await?;
        let before = engine.stats();
        let bytes_before = engine.device_bytes_written();
        let write_time =
            rand_write(&small, &engine, chunks, args.rand_depth, args.rand_writes).await?;
        let during = engine.stats();
        let device_bytes = engine.device_bytes_written() - bytes_before;
        drop(engine);
        let engine = Engine::open(dev.clone(), pool.clone(), config).await?;
        let device_bytes = device_bytes + engine.device_bytes_written();
        let payload = u64::from(args.rand_writes) * 4096;
        clean(&engine).await?;
        drop(engine);
        let raw = match args.raw_offset {
            Some(offset) => {
                Some(raw_jobs(&dev, &pool, offset, args.raw_size, args.rand_seconds).await?)
            }
            None => None,
        };
        let mib = f64::from(chunks);
        Ok(Results {
            seq_write_mib_s: mib / write.as_secs_f64(),
            seq_read_mib_s: mib / read.as_secs_f64(),
            rand_read_4k_iops: iops,
            rand_read_4k_iops_device: iops_device,
            rand_read_4k_nvme_paths: paths,
            rand_read_4k_device_nvme_paths: device_paths,
            commits_per_batch,
            rand_write_4k_iops: f64::from(args.rand_writes) / write_time.as_secs_f64(),
            rand_write_4k_amplification: device_bytes as f64 / payload.max(1) as f64,
            rand_write_patches: !args.no_patches,
            rand_write_commits_per_batch: (during.records - before.records) as f64
                / (during.batches - before.batches).max(1) as f64,
            rand_write_checkpoints: during.checkpoints - before.checkpoints,
            workers: args.workers,
            chunks,
            depth: args.depth,
            rand_depth: args.rand_depth,
            device: args.path.display().to_string(),
            io_uring: features.clone(),
            raw,
            nvme_queue_pairs,
        })
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        println!("device          {} ({})", results.device, results.io_uring);
        println!(
            "1 MiB write     {:>10.1} MiB/s  ({} chunks, depth {}, each committed; {:.1} commits per journal flush)",
            results.seq_write_mib_s, chunks, args.depth, results.commits_per_batch
        );
        println!(
            "1 MiB read      {:>10.1} MiB/s  (depth {})",
            results.seq_read_mib_s, args.depth
        );
        println!(
            "4 KiB rand read {:>10.0} IOPS    (depth {})",
            results.rand_read_4k_iops, args.rand_depth
        );
        println!(
            "  the same reads straight to the device: {:.0} IOPS",
            results.rand_read_4k_iops_device
        );
        // `--rand-writes 0` skips the phase: no rate and no ratio to print.
        if args.rand_writes > 0 {
            println!(
                "4 KiB rand write{:>10.0} IOPS    (depth {}, each committed; {})",
                results.rand_write_4k_iops,
                args.rand_depth,
                if results.rand_write_patches {
                    "patches"
                } else {
                    "copying the chunk"
                }
            );
            println!(
                "  device bytes written per payload byte: {:.2} ({:.1} commits per journal flush, {} checkpoints)",
                results.rand_write_4k_amplification,
                results.rand_write_commits_per_batch,
                results.rand_write_checkpoints
            );
        }
        if let Some(raw) = &results.raw {
            print_raw(raw);
        }
    }
    Ok(())
}

fn print_raw(raw: &RawResults) {
    let rows = [
        ("4 KiB rand read, depth 1", raw.randread_4k_qd1, "IOPS"),
        ("4 KiB rand read, depth 64", raw.randread_4k_qd64, "IOPS"),
        ("4 KiB rand write, depth 1", raw.randwrite_4k_qd1, "IOPS"),
        ("4 KiB rand write, depth 64", raw.randwrite_4k_qd64, "IOPS"),
        ("1 MiB write, depth 16", raw.write_1m_qd16, "MiB/s"),
        ("1 MiB read, depth 16", raw.read_1m_qd16, "MiB/s"),
    ];
    println!("raw device jobs (no engine):");
    for (name, job, unit) in rows {
        println!(
            "  {name:28}{:>10.0} {unit:6} {:8.1} us CPU per I/O",
            job.rate, job.cpu_us_per_io
        );
    }
}

/// The process's CPU time so far (user and system, every thread), from
/// /proc/self/stat, whose clock ticks are USER_HZ (100 on Linux).
fn process_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces) start
            // with the state; utime and stime are the 12th and 13th of those.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// fio's jobs straight on the device, in `[offset, offset + size)`.
async fn raw_jobs(
    dev: &AnyDevice,
    pool: &BufferPool,
    offset: u64,
    size: u64,
    seconds: f64,
) -> anyhow::Result<RawResults> {
    let run = Duration::from_secs_f64(seconds);
    // In the order written (a struct expression evaluates its fields in
    // order): sequential writes first, so the reads find written blocks.
    Ok(RawResults {
        write_1m_qd16: raw_sequential(dev, pool, offset, size, 16, true).await?,
        read_1m_qd16: raw_sequential(dev, pool, offset, size, 16, false).await?,
        randread_4k_qd1: raw_random(dev, pool, offset, size, 1, false, run).await?,
        randread_4k_qd64: raw_random(dev, pool, offset, size, 64, false, run).await?,
        randwrite_4k_qd1: raw_random(dev, pool, offset, size, 1, true, run).await?,
        randwrite_4k_qd64: raw_random(dev, pool, offset, size, 64, true, run).await?,
    })
}

/// 1 MiB I/Os over the region, `depth` in flight; writes end with a flush
/// (fio's `--end_fsync=1`). The rate is MiB/s.
async fn raw_sequential(
    dev: &AnyDevice,
    pool: &BufferPool,
    offset: u64,
    size: u64,
    depth: usize,
    write: bool,
) -> anyhow::Result<RawJob> {
    let count = size / CHUNK_BYTES as u64;
    let next = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let stats_before = nvme_stats(dev);
    let cpu_before = process_cpu();
    let started = Instant::now();
    let local = tokio::task::LocalSet::new();
    let workers: Vec<_> = (0..depth)
        .map(|_| {
            let (dev, pool, next) = (dev.clone(), pool.clone(), next.clone());
            local.spawn_local(async move {
                let mut buf = pool.alloc(CHUNK_BYTES);
                if write {
                    buf.fill(0x5a);
                }
                loop {
                    let index = next.get();
                    if index >= count {
                        return anyhow::Ok(());
                    }
                    next.set(index + 1);
                    let at = offset + index * CHUNK_BYTES as u64;
                    buf = if write {
                        dev.write(at, buf).await.into_result()?
                    } else {
                        dev.read(at, buf).await.into_result()?
                    };
                }
            })
        })
        .collect();
    local.await;
    for worker in workers {
        worker.await??;
    }
    if write {
        dev.flush().await?;
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    Ok(RawJob {
        rate: count as f64 / elapsed.as_secs_f64(),
        cpu_us_per_io: cpu.as_secs_f64() * 1e6 / count as f64,
        ios: count,
        nvme_paths: paths_since(dev, stats_before),
    })
}

/// 4 KiB I/Os at random 4 KiB-aligned offsets of the region for `run`,
/// `depth` in flight. The rate is IOPS.
async fn raw_random(
    dev: &AnyDevice,
    pool: &BufferPool,
    offset: u64,
    size: u64,
    depth: usize,
    write: bool,
    run: Duration,
) -> anyhow::Result<RawJob> {
    let blocks = size / 4096;
    let done = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let stats_before = nvme_stats(dev);
    let cpu_before = process_cpu();
    let started = Instant::now();
    let deadline = started + run;
    let local = tokio::task::LocalSet::new();
    let workers: Vec<_> = (0..depth)
        .map(|worker| {
            let (dev, pool, done) = (dev.clone(), pool.clone(), done.clone());
            local.spawn_local(async move {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(0xde51ce ^ worker as u64);
                let mut buf = pool.alloc(4096);
                if write {
                    buf.fill(0xa5);
                }
                while Instant::now() < deadline {
                    let at = offset + rng.random_range(0..blocks) * 4096;
                    buf = if write {
                        dev.write(at, buf).await.into_result()?
                    } else {
                        dev.read(at, buf).await.into_result()?
                    };
                    done.set(done.get() + 1);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    local.await;
    for worker in workers {
        worker.await??;
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    let ios = done.get();
    Ok(RawJob {
        rate: ios as f64 / elapsed.as_secs_f64(),
        cpu_us_per_io: cpu.as_secs_f64() * 1e6 / ios.max(1) as f64,
        ios,
        nvme_paths: paths_since(dev, stats_before),
    })
}

async fn clean(engine: &Engine<AnyDevice>) -> anyhow::Result<()> {
    for info in engine.chunks(BENCH_CHAIN, .., usize::MAX) {
        engine.remove(info.key).await?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    Auto,
    Reactor,
    Caller,
}

/// Where the bench's workers run.
#[derive(Clone)]
enum Workers {
    /// On the device's reactor threads (run to completion, no hand-off).
    Reactor(AnyDevice),
    /// On the calling thread; each I/O is handed to the reactor thread.
    Caller,
}

/// Runs `depth` workers that each take the next index until `count`.
async fn parallel<F, Fut>(
    workers: &Workers,
    count: u32,
    depth: usize,
    work: F,
) -> anyhow::Result<Duration>
where
    F: Fn(u32) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let worker = move || {
        let next = next.clone();
        let work = work.clone();
        async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= u64::from(count) {
                    return anyhow::Ok(());
                }
                work(index as u32).await?;
            }
        }
    };
    match workers {
        Workers::Reactor(device) => {
            let tasks: Vec<_> = (0..depth).map(|_| device.spawn(worker())).collect();
            for task in tasks {
                task.await?;
            }
        }
        Workers::Caller => {
            let local = tokio::task::LocalSet::new();
            let tasks: Vec<_> = (0..depth).map(|_| local.spawn_local(worker())).collect();
            local.await;
            for task in tasks {
                task.await??;
            }
        }
    }
    Ok(started.elapsed())
}

async fn seq_write(
    workers: &Workers,
    engine: &Engine<AnyDevice>,
    chunks: u32,
    depth: usize,
    pooled: usize,
) -> anyhow::Result<Duration> {
    // In a server, a chunk's payload arrives by DMA (RDMA or the NIC) in a
    // pooled buffer with its CRC computed by the client: neither a copy nor
    // the client's CRC is the engine's work. So every pooled 1 MiB buffer is
    // filled with the payload once, here, and each write takes one as it
    // comes. Should a buffer not hold the payload, the engine's CRC check
    // fails the write: the shortcut cannot skew a result silently.
    let template: Vec<u8> = (0..CHUNK_BYTES).map(|i| (i * 7 + 3) as u8).collect();
    let crc = crc32c::crc32c(&template);
    let filled: Vec<_> = (0..pooled)
        .map(|_| engine.pool().alloc(CHUNK_BYTES))
        .collect();
    for mut buf in filled {
        buf.copy_from_slice(&template);
    }
    let engine = engine.clone();
    parallel(workers, chunks, depth, move |index| {
        let engine = engine.clone();
        async move {
            let data = engine.pool().alloc(CHUNK_BYTES);
            let request = WriteRequest {
                key: key(index),
                version: ChunkVersion(1),
                chain_version: ChainVersion(1),
                op: WriteOp::Replace { data, crc },
                client: ClientId(0),
                request: RequestId(u64::from(index)),
                prepare: false,
            };
            engine.write(request).await?;
            engine.commit(key(index), ChunkVersion(1)).await?;
            Ok(())
        }
    })
    .await
}

async fn seq_read(
    workers: &Workers,
    engine: &Engine<AnyDevice>,
    chunks: u32,
    depth: usize,
) -> anyhow::Result<Duration> {
    let engine = engine.clone();
    parallel(workers, chunks, depth, move |index| {
        let engine = engine.clone();
        async move {
            let read = engine
                .read(key(index), ReadRequest::committed(0, CHUNK_BYTES as u32))
                .await?;
            anyhow::ensure!(
                read.data.len() == CHUNK_BYTES,
                "short read of chunk {index}"
            );
            Ok(())
        }
    })
    .await
}

/// `writes` 4 KiB writes at random block offsets of the chunks, each
/// committed at the chunk's next version. Worker `w` writes only the chunks
/// `i` with `i % depth == w`, so that no two writers race on a version.
async fn rand_write(
    workers: &Workers,
    engine: &Engine<AnyDevice>,
    chunks: u32,
    depth: usize,
    writes: u32,
) -> anyhow::Result<Duration> {
    let depth = depth.min(chunks as usize);
    let per_worker = writes.div_ceil(depth as u32);
    let left = Arc::new(AtomicU64::new(u64::from(writes)));
    let engine = engine.clone();
    parallel(workers, depth as u32, depth, move |worker| {
        let engine = engine.clone();
        let left = left.clone();
        async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed ^ u64::from(worker));
            let mine: Vec<u32> = (worker..chunks).step_by(depth).collect();
            let mut versions = vec![1u32; mine.len()];
            let data: Vec<u8> = (0..4096)
                .map(|i| (i * 13 + worker as usize) as u8)
                .collect();
            let crc = crc32c::crc32c(&data);
            for _ in 0..per_worker {
                if left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_err()
                {
                    break;
                }
                let pick = rng.random_range(0..mine.len());
                versions[pick] += 1;
                let version = ChunkVersion(versions[pick]);
                let offset = rng.random_range(0..(CHUNK_BYTES / 4096) as u32) * 4096;
                let mut buf = engine.pool().alloc(4096);
                buf.copy_from_slice(&data);
                let request = WriteRequest {
                    key: key(mine[pick]),
                    version,
                    chain_version: ChainVersion(1),
                    op: WriteOp::Update {
                        offset,
                        data: buf,
                        crc,
                    },
                    client: ClientId(0),
                    request: RequestId(u64::from(version.0)),
                    prepare: false,
                };
                engine.write(request).await?;
                engine.commit(key(mine[pick]), version).await?;
            }
            Ok(())
        }
    })
    .await
}

async fn rand_read(
    workers: &Workers,
    engine: &Engine<AnyDevice>,
    chunks: u32,
    depth: usize,
    run: Duration,
    device_only: bool,
) -> anyhow::Result<f64> {
    // Where each bench chunk lies on the device, for the device-only run.
    let sb = *engine.superblock();
    let position = |index: u32| {
        let slot = engine
            .stat(key(index))
            .and_then(|info| info.committed)
            .map(|meta| meta.slot);
        slot.map_or(0, |slot| sb.slot_offset(slot))
    };
    let positions: Arc<Vec<u64>> = Arc::new((0..chunks).map(position).collect());
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + run;
    let engine = engine.clone();
    let counter = done.clone();
    let elapsed = parallel(workers, depth as u32, depth, move |worker| {
        let engine = engine.clone();
        let done = counter.clone();
        let positions = positions.clone();
        async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(u64::from(worker));
            let mut n = 0u64;
            while Instant::now() < deadline {
                for _ in 0..64 {
                    let index = rng.random_range(0..chunks);
                    let offset = rng.random_range(0..(CHUNK_BYTES / 4096) as u32) * 4096;
                    if device_only {
                        let buf = engine.pool().alloc(4096);
                        let at = positions[index as usize] + u64::from(offset);
                        engine.device().read(at, buf).await.into_result()?;
                    } else {
                        let read = engine
                            .read(key(index), ReadRequest::committed(offset, 4096))
                            .await?;
                        anyhow::ensure!(read.data.len() == 4096, "short random read");
                    }
                    n += 1;
                }
            }
            done.fetch_add(n, Ordering::Relaxed);
            Ok(())
        }
    })
    .await?;
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64())
}
