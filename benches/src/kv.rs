//! `flyfs bench kv`: the KV cache for inference (docs/kv-cache.md) against a
//! cluster of real processes on this machine.
//!
//! It starts what `flyfs bench storage` starts (a manager and three storage
//! daemons on device files in one directory, through the same [`Cluster`])
//! plus a metadata daemon (`flyfs meta`, on its embedded store), makes chain
//! table 1 of `--chains` chains, and then, for each `--block-sizes` entry,
//! runs three phases, each with `--clients` client processes (this
//! executable again, in a hidden worker mode; `--in-process` runs them as
//! tasks of this process instead):
//!
//! 1. put: every client stores its share of `--working-set` bytes in
//!    batches of `--batch` blocks (`batch_put_bytes`, sent from the blocks' memory), timing each batch;
//! 2. get: every client reads the blocks *another* client stored
//!    (`batch_get_landing`, landing in the worker's buffers: one lookup, the reads of the batch in flight at
//!    once, CRC-checked), timing each batch and checking every block came
//!    back whole;
//! 3. remove: every client removes its keys in batches of 256.
//!
//! The clients of a phase connect, then wait for one start time the parent
//! chose (a barrier on the wall clock); throughput is the bytes of all
//! clients over the time from the first client's first operation to the
//! last client's last (as each process reports it), so process start-up is
//! not counted. It prints one
//! JSON object (`--json`) with a row per block size and, at the top level,
//! the row of the largest block size (`put_gib_s`, `get_gib_s`,
//! `get_p99_ms`, `remove_keys_s`).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_deploy::config::{ManagerAddrs, MetaDaemonConfig, TlsConfig};
use flyfs_kvcache::{Bytes, GetResult, KvCache, KvCacheConfig, PutResult};
use flyfs_proto::auth::Principal;
use flyfs_proto::ids::{ChainId, ChainTableId, ClientId};
use flyfs_proto::wire::mgmt::{CreateChainTable, CreateChainTableReq};
use flyfs_rpc::{Credentials, Tcp};
use flyfs_time::{Clock, WallClock};
use serde::{Deserialize, Serialize};

use crate::launch::{free_port, run_dir};
use crate::storage::{Bench, Cluster, CpuCores, Placement, available_bytes, mutate};

/// Distinct block contents per size: key `i` stores contents `i % CONTENTS`,
/// so a block read back under the wrong key is caught unless the two
/// indices are congruent.
const CONTENTS: usize = 16;
/// Keys per removal request (the service's batch limit).
const REMOVE_BATCH: usize = 256;
/// Room on each device beyond the blocks: the journal and the engine's own.
const DEVICE_SLACK_BYTES: u64 = 512 << 20;

#[derive(clap::Args, Debug)]
pub struct KvArgs {
    /// Block sizes, each run in turn (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "256KiB,1MiB", value_parser = crate::size::parse)]
    block_sizes: Vec<u64>,
    /// Blocks per put and get request.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Client processes (or tasks, with --in-process).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Bytes stored (and read back) per block size, over all clients.
    #[arg(long, default_value = "512MiB", value_parser = crate::size::parse)]
    working_set: u64,
    /// Replicas per chain (1 to 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=3))]
    replicas: u32,
    /// Chains of chain table 1, which the cache's slot files use.
    #[arg(long, default_value_t = 6)]
    chains: u32,
    /// Where the cluster's files go (a directory made for the run inside it
    /// is removed afterwards). Default: the system's temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run the clients as tasks of this process rather than processes.
    #[arg(long)]
    in_process: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Internal: run one client's phase (a JSON `Worker`) and print its
    /// measurements.
    #[arg(long, hide = true)]
    worker: Option<String>,
}

/// One client's part of one phase, as handed to a worker process.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Worker {
    phase: Phase,
    /// This client (0..clients): it writes and removes keys of its own
    /// index and reads those of the next client's.
    index: usize,
    clients: usize,
    mgmt: String,
    meta: String,
    tls_dir: PathBuf,
    classes: Vec<(u32, u32)>,
    block_bytes: u64,
    blocks: usize,
    batch: usize,
    /// Wall clock (ns since the epoch) at which every client of the phase
    /// starts, once connected: a barrier, so that the phase's span does not
    /// count processes starting one after another.
    start_at_ns: i64,
}

/// How far ahead of now a phase's clients are told to start: time for the
/// processes to start and connect.
const START_LEAD: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    Put,
    Get,
    Remove,
}

/// What one worker measured.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Measured {
    /// Wall clock (ns since the epoch) at its first and after its last
    /// operation.
    start_ns: i64,
    end_ns: i64,
    /// One per batch.
    latencies_us: Vec<f64>,
    bytes: u64,
    keys: u64,
    /// Keys whose outcome was not the expected one.
    failures: Vec<String>,
}

/// One block size's results.
#[derive(Debug, Serialize)]
struct Row {
    block_bytes: u64,
    blocks: usize,
    put_gib_s: f64,
    put_p50_ms: f64,
    put_p99_ms: f64,
    get_gib_s: f64,
    get_p50_ms: f64,
    get_p99_ms: f64,
    remove_keys_s: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    put_gib_s: f64,
    get_gib_s: f64,
    get_p50_ms: f64,
    get_p99_ms: f64,
    put_p99_ms: f64,
    remove_keys_s: f64,
    rows: Vec<Row>,
    clients: usize,
    client_processes: bool,
    batch: usize,
    replicas: u32,
    chains: u32,
    working_set_bytes: u64,
    elapsed_s: f64,
    dir: String,
}

pub fn run(args: &KvArgs) -> anyhow::Result<()> {
    if let Some(worker) = &args.worker {
        let worker: Worker = serde_json::from_str(worker).context("decoding --worker")?;
        let runtime = runtime()?;
        let measured = runtime.block_on(run_worker(&worker))?;
        println!("{}", serde_json::to_string(&measured)?);
        return Ok(());
    }
    let started = Instant::now();
    ensure!(args.clients >= 1, "--clients must be at least 1");
    ensure!(
        (1..=flyfs_proto::wire::meta::KV_BATCH_MAX).contains(&args.batch),
        "--batch must be 1 to {}",
        flyfs_proto::wire::meta::KV_BATCH_MAX
    );
    ensure!(!args.block_sizes.is_empty(), "--block-sizes names none");
    let mut classes: Vec<(u32, u32)> = Vec::new();
    for &size in &args.block_sizes {
        ensure!(
            (1..=64 << 20).contains(&size),
            "block size {size} is not 1 byte to 64 MiB"
        );
        let slot_bytes = size.next_power_of_two().max(64 << 10) as u32;
        // Every block of the run fits: the working set plus a batch per
        // client of slack, rounded to whole batches per client.
        let slots = blocks_of(args, size) + args.batch * args.clients;
        let slots = u32::try_from(slots).context("--working-set needs too many slots")?;
        match classes.iter_mut().find(|c| c.0 == slot_bytes) {
            Some(class) => class.1 = class.1.saturating_add(slots),
            None => classes.push((slot_bytes, slots)),
        }
    }
    classes.sort();
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    // Each node holds a replica of (at most) every block: slot-sized chunks.
    let node_bytes: u64 = classes
        .iter()
        .map(|&(slot_bytes, slots)| u64::from(slot_bytes) * u64::from(slots))
        .sum();
    let device_bytes = (node_bytes + node_bytes / 8 + DEVICE_SLACK_BYTES).next_multiple_of(1 << 20);
    let available = available_bytes(&base)?;
    ensure!(
        3 * device_bytes <= available,
        "--working-set {} needs {} bytes of device files in {} but only {available} are free",
        args.working_set,
        3 * device_bytes,
        base.display()
    );
    let chunk_size_max = classes
        .iter()
        .map(|c| u64::from(c.0))
        .max()
        .unwrap_or(1 << 20)
        .max(1 << 20);

    let mut cluster = Cluster::new(run_dir(&base, "flyfs-bench-kv")?)?;
    let placement = Placement::new(args.chains, args.replicas);
    let measured = cluster
        .start(device_bytes, chunk_size_max)
        .and_then(|()| start_meta(&mut cluster))
        .and_then(|meta| {
            let runtime = runtime()?;
            let rows = runtime.block_on(async {
                set_up(&cluster, &placement).await?;
                let mut rows = Vec::new();
                for &size in &args.block_sizes {
                    rows.push(run_size(args, &cluster, &meta, &classes, size).await?);
                }
                anyhow::Ok(rows)
            });
            drop(runtime);
            rows
        });
    let rows = cluster.finish(measured)?;
    let top = rows
        .iter()
        .max_by_key(|r| r.block_bytes)
        .context("no block size ran")?;
    let results = Results {
        put_gib_s: top.put_gib_s,
        get_gib_s: top.get_gib_s,
        get_p50_ms: top.get_p50_ms,
        get_p99_ms: top.get_p99_ms,
        put_p99_ms: top.put_p99_ms,
        remove_keys_s: top.remove_keys_s,
        clients: args.clients,
        client_processes: !args.in_process,
        batch: args.batch,
        replicas: args.replicas,
        chains: args.chains,
        working_set_bytes: args.working_set,
        elapsed_s: started.elapsed().as_secs_f64(),
        dir: base.display().to_string(),
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        println!(
            "{:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12}",
            "block",
            "blocks",
            "put GiB/s",
            "put p50",
            "put p99",
            "get GiB/s",
            "get p50",
            "get p99",
            "removes/s"
        );
        for r in &results.rows {
            println!(
                "{:>10} {:>7} {:>9.3} {:>7.2}ms {:>7.2}ms {:>9.3} {:>7.2}ms {:>7.2}ms {:>12.0}",
                r.block_bytes,
                r.blocks,
                r.put_gib_s,
                r.put_p50_ms,
                r.put_p99_ms,
                r.get_gib_s,
                r.get_p50_ms,
                r.get_p99_ms,
                r.remove_keys_s
            );
        }
        println!(
            "{} client {}, batches of {}, {} replicas over {} chains, {:.1} s",
            results.clients,
            if results.client_processes {
                "processes"
            } else {
                "tasks"
            },
            results.batch,
            results.replicas,
            results.chains,
            results.elapsed_s
        );
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-kv")
        .build()
        .context("starting the tokio runtime")
}

/// Blocks per client for `size`: the working set in whole batches.
fn blocks_per_client(args: &KvArgs, size: u64) -> usize {
    let blocks = (args.working_set / size.max(1)) as usize;
    let per_client = blocks.div_ceil(args.clients);
    per_client.div_ceil(args.batch).max(1) * args.batch
}

fn blocks_of(args: &KvArgs, size: u64) -> usize {
    blocks_per_client(args, size) * args.clients
}

/// Starts the metadata daemon on a free port; gives its address.
fn start_meta(cluster: &mut Cluster) -> anyhow::Result<String> {
    let addr = format!("127.0.0.1:{}", free_port("the metadata service")?);
    let launcher = &mut cluster.launcher;
    let tls_dir = launcher.tls_dir();
    let ca = launcher.ca("bench")?;
    ca.ensure_credentials(Principal::Meta("meta".into()), &tls_dir, "meta")?;
    let mut meta = MetaDaemonConfig::new("meta-data");
    meta.listen = addr.clone();
    meta.mgmt = ManagerAddrs::one(cluster.mgmt_addr.clone());
    meta.chain_table = 1;
    meta.tls = Some(TlsConfig::in_dir(&tls_dir, "meta"));
    let config = launcher.write_config("meta", &meta)?;
    launcher.start(launcher.daemon("meta", "meta", &config))?;
    Ok(addr)
}

/// Chains as `flyfs bench storage` makes them, then chain table 1 of all
/// of them for the cache's slot files.
async fn set_up(cluster: &Cluster, placement: &Placement) -> anyhow::Result<()> {
    let rpc = cluster.launcher.admin_rpc()?;
    let bench = Bench {
        cluster,
        placement,
        chunk_size: 0,
        chunks: 0,
        clients: 0,
        small_writes: 0,
        cpu: CpuCores::default(),
    };
    bench.set_up(&rpc).await?;
    let req = CreateChainTableReq {
        table: ChainTableId(1),
        chains: (1..=placement.chains.len() as u32).map(ChainId).collect(),
    };
    mutate::<CreateChainTable>(&rpc, &cluster.mgmt_addr, &req).await
}

/// The three phases of one block size.
async fn run_size(
    args: &KvArgs,
    cluster: &Cluster,
    meta: &str,
    classes: &[(u32, u32)],
    size: u64,
) -> anyhow::Result<Row> {
    let per_client = blocks_per_client(args, size);
    let worker = |phase, index, start_at_ns| Worker {
        phase,
        index,
        clients: args.clients,
        mgmt: cluster.mgmt_addr.clone(),
        meta: meta.to_owned(),
        tls_dir: cluster.launcher.tls_dir(),
        classes: classes.to_vec(),
        block_bytes: size,
        blocks: per_client,
        batch: args.batch,
        start_at_ns,
    };
    let mut phases = Vec::new();
    for phase in [Phase::Put, Phase::Get, Phase::Remove] {
        let start_at_ns = WallClock
            .now_ns()
            .saturating_add(START_LEAD.as_nanos() as i64);
        let workers: Vec<Worker> = (0..args.clients)
            .map(|i| worker(phase, i, start_at_ns))
            .collect();
        let measured = if args.in_process {
            let tasks = workers
                .into_iter()
                .map(|w| async move { run_worker(&w).await });
            futures_join(tasks).await?
        } else {
            run_processes(workers).await?
        };
        let failures: Vec<&String> = measured.iter().flat_map(|m| &m.failures).collect();
        ensure!(
            failures.is_empty(),
            "{phase:?} of {size}-byte blocks: {} keys failed, the first: {}",
            failures.len(),
            failures[0]
        );
        phases.push(measured);
    }
    let gib = |m: &[Measured]| {
        let bytes: u64 = m.iter().map(|m| m.bytes).sum();
        bytes as f64 / f64::from(1 << 30) / span_s(m)
    };
    let ms = |m: &[Measured], q: f64| {
        let samples: Vec<Duration> = m
            .iter()
            .flat_map(|m| &m.latencies_us)
            .map(|&us| Duration::from_secs_f64(us / 1e6))
            .collect();
        crate::storage::percentile_us(&samples, q) / 1000.0
    };
    let removed: u64 = phases[2].iter().map(|m| m.keys).sum();
    Ok(Row {
        block_bytes: size,
        blocks: per_client * args.clients,
        put_gib_s: gib(&phases[0]),
        put_p50_ms: ms(&phases[0], 0.5),
        put_p99_ms: ms(&phases[0], 0.99),
        get_gib_s: gib(&phases[1]),
        get_p50_ms: ms(&phases[1], 0.5),
        get_p99_ms: ms(&phases[1], 0.99),
        remove_keys_s: removed as f64 / span_s(&phases[2]),
    })
}

/// From the first client's start to the last client's end, in seconds.
fn span_s(measured: &[Measured]) -> f64 {
    let start = measured.iter().map(|m| m.start_ns).min().unwrap_or(0);
    let end = measured.iter().map(|m| m.end_ns).max().unwrap_or(0);
    ((end - start) as f64 / 1e9).max(1e-9)
}

async fn futures_join<F>(tasks: impl Iterator<Item = F>) -> anyhow::Result<Vec<Measured>>
where
    F: std::future::Future<Output = anyhow::Result<Measured>> + Send + 'static,
{
    let handles: Vec<_> = tasks.map(tokio::spawn).collect();
    let mut measured = Vec::with_capacity(handles.len());
    for handle in handles {
        measured.push(handle.await.context("a client task panicked")??);
    }
    Ok(measured)
}

/// One process per worker, all started before any is waited for.
async fn run_processes(workers: Vec<Worker>) -> anyhow::Result<Vec<Measured>> {
    let exe = std::env::current_exe().context("finding the flyfs executable")?;
    let mut children = Vec::new();
    for worker in &workers {
        let child = tokio::process::Command::new(&exe)
            .args(["bench", "kv", "--worker"])
            .arg(serde_json::to_string(worker)?)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a client process")?;
        children.push(child);
    }
    let mut measured = Vec::with_capacity(children.len());
    for (worker, child) in workers.iter().zip(children) {
        let out = child
            .wait_with_output()
            .await
            .context("waiting for a client process")?;
        if !out.status.success() {
            bail!(
                "client {} ({:?}) exited with {}: {}",
                worker.index,
                worker.phase,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        measured.push(serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "client {} printed no measurements: {}",
                worker.index,
                String::from_utf8_lossy(&out.stdout)
            )
        })?);
    }
    Ok(measured)
}

fn key(size: u64, client: usize, block: usize) -> Vec<u8> {
    format!("bench-kv/{size}/{client}/{block:08}").into_bytes()
}

/// The `CONTENTS` distinct blocks of `size` bytes.
fn contents(size: usize) -> Vec<Vec<u8>> {
    (0..CONTENTS)
        .map(|c| {
            let mut block = vec![0u8; size];
            for (i, chunk) in block.chunks_mut(8).enumerate() {
                let word = ((c as u64) << 56 | i as u64).to_le_bytes();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
            block
        })
        .collect()
}

async fn open(worker: &Worker) -> anyhow::Result<KvCache<Tcp>> {
    let credentials = Credentials::load_dir(&worker.tls_dir, "client")?;
    // A storage node keeps each client id's exactly-once channels: every
    // process (a phase's worker is a new one) needs an id of its own.
    let client = ClientId(rand::random::<u64>() | 1);
    let storage = StorageClient::new(
        ClientConfig::new([worker.mgmt.clone()], client),
        Tcp,
        credentials.clone(),
    );
    let meta = MetaClient::new(
        Tcp,
        MetaClientConfig::new(vec![worker.meta.clone()]),
        credentials,
    );
    let config = KvCacheConfig {
        classes: worker.classes.clone(),
        chain_table: ChainTableId(1),
        max_age_ms: 0,
        evict_when_full: true,
    };
    let cache = KvCache::open(meta, storage, &config)
        .await
        .context("opening the KV cache")?;
    // Routing and connections before the clock starts.
    cache
        .batch_exists(&[b"warm-up"])
        .await
        .context("a first lookup")?;
    Ok(cache)
}

async fn run_worker(worker: &Worker) -> anyhow::Result<Measured> {
    let cache = Arc::new(open(worker).await?);
    let size = worker.block_bytes as usize;
    let contents: Vec<Bytes> = contents(size).into_iter().map(Bytes::from).collect();
    let owner = match worker.phase {
        Phase::Get => (worker.index + 1) % worker.clients,
        Phase::Put | Phase::Remove => worker.index,
    };
    let keys: Vec<Vec<u8>> = (0..worker.blocks)
        .map(|b| key(worker.block_bytes, owner, b))
        .collect();
    let clock = WallClock;
    let wait_ns = worker.start_at_ns.saturating_sub(clock.now_ns());
    if wait_ns > 0 {
        tokio::time::sleep(Duration::from_nanos(wait_ns as u64)).await;
    }
    let mut measured = Measured {
        start_ns: clock.now_ns(),
        ..Measured::default()
    };
    let batch = match worker.phase {
        Phase::Remove => REMOVE_BATCH,
        Phase::Put | Phase::Get => worker.batch,
    };
    let mut buffers: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; size]).collect();
    for (n, batch_keys) in keys.chunks(batch).enumerate() {
        let first = n * batch;
        let key_refs: Vec<&[u8]> = batch_keys.iter().map(Vec::as_slice).collect();
        let began = Instant::now();
        match worker.phase {
            Phase::Put => {
                // Views of the blocks, not copies: the put sends from them.
                let blocks: Vec<Bytes> = (0..batch_keys.len())
                    .map(|i| contents[(first + i) % CONTENTS].clone())
                    .collect();
                let results = cache.batch_put_bytes(&key_refs, &blocks).await?;
                for (i, r) in results.iter().enumerate() {
                    if *r != PutResult::Stored {
                        measured.failures.push(format!("put {}: {r:?}", first + i));
                    }
                }
                measured.bytes += (size * batch_keys.len()) as u64;
            }
            Phase::Get => {
                // The buffers are lent to the get (the blocks land in them)
                // and come back with its results.
                let lent: Vec<Vec<u8>> = buffers.drain(..batch_keys.len()).collect();
                let (back, results) = cache.batch_get_landing(&key_refs, lent).await;
                buffers.splice(0..0, back);
                let results = results?;
                for (i, r) in results.iter().enumerate() {
                    let expected = &contents[(first + i) % CONTENTS];
                    if *r != GetResult::Found(size) || buffers[i][..] != expected[..] {
                        measured.failures.push(format!("get {}: {r}", first + i));
                    }
                }
                measured.bytes += (size * batch_keys.len()) as u64;
            }
            Phase::Remove => {
                let removed = cache.batch_remove(&key_refs).await?;
                for (i, r) in removed.iter().enumerate() {
                    if !r {
                        measured
                            .failures
                            .push(format!("remove {}: not found", first + i));
                    }
                }
            }
        }
        measured
            .latencies_us
            .push(began.elapsed().as_secs_f64() * 1e6);
        measured.keys += batch_keys.len() as u64;
    }
    measured.end_ns = clock.now_ns();
    Ok(measured)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_differ_and_fill_odd_sizes() {
        let blocks = contents(1001);
        assert_eq!(blocks.len(), CONTENTS);
        assert!(blocks.iter().all(|b| b.len() == 1001));
        for i in 0..CONTENTS {
            for j in i + 1..CONTENTS {
                assert_ne!(blocks[i], blocks[j]);
            }
        }
    }

    #[test]
    fn span_runs_from_the_first_start_to_the_last_end() {
        let m = |start_ns, end_ns| Measured {
            start_ns,
            end_ns,
            ..Measured::default()
        };
        let span = span_s(&[
            m(1_000_000_000, 3_000_000_000),
            m(2_000_000_000, 4_000_000_000),
        ]);
        assert!((span - 3.0).abs() < 1e-9, "{span}");
    }

    #[test]
    fn workers_round_trip_as_json() {
        let worker = Worker {
            phase: Phase::Get,
            index: 2,
            clients: 4,
            mgmt: "127.0.0.1:1".into(),
            meta: "127.0.0.1:2".into(),
            tls_dir: PathBuf::from("/tmp/tls"),
            classes: vec![(1 << 20, 10)],
            block_bytes: 1 << 20,
            blocks: 64,
            batch: 32,
            start_at_ns: 7,
        };
        let back: Worker =
            serde_json::from_str(&serde_json::to_string(&worker).expect("encode")).expect("decode");
        assert_eq!(back.phase, Phase::Get);
        assert_eq!(back.classes, worker.classes);
    }
}
