//! `flyfs bench chaos`: a soak of a cluster of real daemons under a
//! verifying workload while faults are injected on a seeded schedule
//! (docs/chaos.md).
//!
//! The cluster is a manager, a metadata service and four storage nodes
//! (four 3-replica chains in chain table 1), each daemon in a network
//! namespace of its own joined by a bridge, as separate hosts would be;
//! without the privileges for namespaces it runs on loopback instead and
//! says so. Tasks of this process run a workload through the file client
//! (`FsClient`): they create files, overwrite parts of them, truncate,
//! rename and remove them, and read them back, checking every byte against
//! what the workload last wrote and the cluster acknowledged (a close that
//! returned success). The bytes name their file, write and offset
//! ([`content`]), so a wrong read says whose bytes it found, and the
//! workload then asks every replica what it holds. Meanwhile, one fault at a
//! time, in rounds of every kind in a seeded order, it:
//! - kills (SIGKILL) a storage node, the metadata service or the manager
//!   and restarts it after a while;
//! - partitions one of them (its namespace's link down; on loopback, where
//!   no link can be cut, the process is stopped with SIGSTOP instead) and
//!   heals the partition after a while;
//! - kills a storage node for good, starts a new node and moves the dead
//!   node's replicas onto the live nodes with `flyfs admin drain-node`
//!   (the new targets resync while their chains serve), then forgets it
//!   with `flyfs admin remove-node`.
//!
//! When the time is up it waits (bounded) until every chain's targets
//! serve, stops the workload, and reads back every file the workload holds
//! acknowledged; a removed file must stay removed. It prints one JSON
//! summary and fails if a byte was wrong, a replacement failed or the
//! cluster did not come back to all-serving.
//!
//! An operation that fails (rather than returning wrong data) is not a
//! verification error: it may or may not have taken effect, so the file it
//! touched is no longer checked ("uncertain") and never reused.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use flyfs_client::fs::{FileHandle, FsClient, FsConfig, OpenMode};
use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_deploy::config::{
    ConfigFile, ManagerAddrs, MetaDaemonConfig, MgmtdConfig, StorageDaemonConfig, TlsConfig,
};
use flyfs_deploy::supervisor::Daemon;
use flyfs_proto::auth::Principal;
use flyfs_proto::ids::{ChainId, ChainTableId, ChunkId, ClientId, InodeId, NodeId};
use flyfs_proto::wire::meta::{FileType, Layout, SetAttrReq, User};
use flyfs_proto::wire::mgmt::{CreateChainTable, CreateChainTableReq, PublicState, RoutingInfo};
use flyfs_proto::wire::storage::{BatchRead, BatchReadReq, DumpMeta, DumpMetaReq, ReadItem};
use flyfs_rpc::{Client, ClusterCa, Tcp};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::launch::{Launcher, create_chains, free_port, remove_run_dir, run_dir};
use crate::storage::mutate;

mod content;
use content::Origin;

/// Storage nodes at any time: one more than a chain's replicas, so that a
/// dead node's replicas always have a live node outside their chain to go to.
const STORAGE_NODES: u32 = 4;
const REPLICAS: u32 = 3;
/// One chain per 3-subset of the four nodes, heads rotating.
const CHAINS: u32 = 4;
const DEVICE_BYTES: u64 = 256 << 20;
/// Small chunks and a stripe of two: a file of a few hundred KiB spans
/// several chunks on two chains.
const CHUNK_BYTES: u32 = 64 << 10;
const STRIPE: u32 = 2;
/// A written range: at most this long, so files stay a few chunks.
const WRITE_BYTES_MAX: usize = 192 << 10;
/// Files a task keeps linked before it prefers removing one.
const LIVE_FILES_MAX: usize = 12;
/// Detection of a dead storage node: short, so that faults longer than it
/// take targets offline and make them resync when they return.
const FAILURE_TIMEOUT_MS: u64 = 4_000;
/// How long one workload operation may take before it counts as failed:
/// longer than any fault lasts and than the clients' own retries.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a fault lasts and the pause after it, drawn from these ranges.
const HOLD_MS: (u64, u64) = (1_000, 6_000);
const GAP_MS: (u64, u64) = (300, 2_000);
/// The most verification errors the summary lists one by one.
const ERRORS_SHOWN_MAX: usize = 50;

#[derive(clap::Args, Debug)]
pub struct ChaosArgs {
    /// How long faults are injected, in minutes (fractions allowed: 0.5).
    /// The first round of faults always runs whole, so that a short run
    /// injects every kind.
    #[arg(long, value_parser = parse_minutes)]
    minutes: f64,
    /// Seed of the fault schedule and the workload's choices (default: from
    /// the clock; the summary names it, to run the same schedule again).
    #[arg(long)]
    seed: Option<u64>,
    /// `netns`: every daemon in a network namespace of its own (needs root
    /// and iproute2); `loopback`: all on 127.0.0.1 (partitions become
    /// SIGSTOP); `auto`: namespaces where possible.
    #[arg(long, value_enum, default_value_t = NetworkMode::Auto)]
    network: NetworkMode,
    /// Workload tasks, each on its own directory.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    tasks: u32,
    /// How long the cluster may take to serve again once faults stop.
    #[arg(long, default_value_t = 120)]
    heal_timeout_s: u64,
    /// The metadata service's delay before a removed file's chunks are
    /// freed. The daemon's default (5 minutes) lets the workload's removes
    /// fill the 256 MiB devices within minutes, which turns the soak into
    /// one of full devices (see docs/chaos.md, "Results": acknowledged data
    /// read back wrong there); pass 300000 to run it that way.
    #[arg(long, default_value_t = 10_000)]
    gc_delay_ms: u64,
    /// Where the cluster's files go (a directory made for the run inside it
    /// is removed afterwards unless FLYFS_BENCH_KEEP is set or the run
    /// failed). Default: the system's temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print only the JSON summary on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum NetworkMode {
    Auto,
    Netns,
    Loopback,
}

fn parse_minutes(text: &str) -> Result<f64, String> {
    let minutes: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of minutes (say 1, 0.5 or 30)"))?;
    if !minutes.is_finite() || minutes <= 0.0 {
        return Err(format!("`{text}`: the run must last more than 0 minutes"));
    }
    if minutes > 7.0 * 24.0 * 60.0 {
        return Err(format!(
            "`{text}`: more than a week; run several soaks instead"
        ));
    }
    Ok(minutes)
}

/// The kinds of fault, each injected once per round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    KillStorage,
    KillMeta,
    KillMgmtd,
    PartitionStorage,
    PartitionMeta,
    PartitionMgmtd,
    ReplaceStorage,
}

const FAULTS: [Fault; 7] = [
    Fault::KillStorage,
    Fault::KillMeta,
    Fault::KillMgmtd,
    Fault::PartitionStorage,
    Fault::PartitionMeta,
    Fault::PartitionMgmtd,
    Fault::ReplaceStorage,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillStorage => "kill_storage",
            Fault::KillMeta => "kill_meta",
            Fault::KillMgmtd => "kill_mgmtd",
            Fault::PartitionStorage => "partition_storage",
            Fault::PartitionMeta => "partition_meta",
            Fault::PartitionMgmtd => "partition_mgmtd",
            Fault::ReplaceStorage => "replace_storage",
        }
    }
}

/// What the run printed at the end (the JSON summary).
#[derive(Debug, Default, Serialize)]
struct Summary {
    minutes: f64,
    seed: u64,
    /// `netns` or `loopback`.
    network: &'static str,
    /// How partitions were made: `link_down` (the namespace's link) or
    /// `sigstop` (on loopback).
    partition_method: &'static str,
    /// The metadata service's delay before removed files' chunks are freed.
    gc_delay_ms: u64,
    faults_injected: u64,
    faults: BTreeMap<&'static str, u64>,
    replacements: u64,
    replacement_errors: Vec<String>,
    acknowledged_writes: u64,
    verified_reads: u64,
    verify_errors: u64,
    verify_error_details: Vec<String>,
    operations: Operations,
    /// Files an operation failed on (timed out or errored): not checked.
    uncertain_files: u64,
    /// Files checked at the end: linked ones read back, removed ones absent.
    final_files_checked: u64,
    all_serving: bool,
    /// From the last fault's end to every chain's targets serving.
    heal_s: f64,
    storage_nodes_started: u32,
    chains: u32,
    elapsed_s: f64,
    dir: String,
}

/// Workload operations by kind: one task's, and all tasks' in the summary.
#[derive(Debug, Default, Serialize)]
struct Operations {
    creates: u64,
    overwrites: u64,
    reads: u64,
    renames: u64,
    truncates: u64,
    removes: u64,
    failed: u64,
    timed_out: u64,
}

impl Operations {
    fn add(&mut self, other: &Operations) {
        self.creates += other.creates;
        self.overwrites += other.overwrites;
        self.reads += other.reads;
        self.renames += other.renames;
        self.truncates += other.truncates;
        self.removes += other.removes;
        self.failed += other.failed;
        self.timed_out += other.timed_out;
    }
}

pub fn run(args: &ChaosArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // A clock-drawn seed is kept to 32 bits: short enough to type back in.
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % (1 << 32))
    });
    // First, so that a missing privilege is reported before anything is
    // made on disk.
    let net = Net::choose(args.network)?;
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let available = crate::storage::available_bytes(&base)?;
    // The nodes started over the run (each replacement adds one) keep a
    // device each only while they live: five at once at most.
    let needed = u64::from(STORAGE_NODES + 1) * DEVICE_BYTES;
    ensure!(
        needed <= available,
        "the device files need {needed} bytes in {} but only {available} are free; pass --dir \
         on a larger disk",
        base.display()
    );
    let dir = run_dir(&base, "flyfs-chaos")?;
    let mut cluster = ChaosCluster::new(dir.clone(), net, args.gc_delay_ms)?;
    let mut summary = Summary {
        minutes: args.minutes,
        seed,
        network: cluster.net.name(),
        partition_method: cluster.net.partition_method(),
        gc_delay_ms: args.gc_delay_ms,
        chains: CHAINS,
        dir: dir.display().to_string(),
        ..Summary::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .thread_name("bench-chaos")
        .build()
        .context("starting the tokio runtime")?;
    let outcome = runtime.block_on(soak(args, &mut cluster, &mut summary));
    drop(runtime);
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.storage_nodes_started = cluster.next_node - 1;
    let stopped = cluster.stop();
    let failed = outcome.is_err()
        || summary.verify_errors > 0
        || !summary.all_serving
        || !summary.replacement_errors.is_empty();
    if let Err(error) = &outcome {
        eprintln!("chaos: {error:#}");
    }
    if let Err(error) = &stopped {
        eprintln!("chaos: {error:#}");
    }
    let json = serde_json::to_string(&summary)?;
    if args.json {
        println!("{json}");
    } else {
        print_summary(&summary);
        println!("{json}");
    }
    if failed {
        cluster.launcher.print_logs();
        bail!(
            "the chaos soak failed (seed {seed}): {} verification errors, all serving: {}, \
             replacement errors: {}{}; logs in {}",
            summary.verify_errors,
            summary.all_serving,
            summary.replacement_errors.len(),
            outcome
                .err()
                .map_or(String::new(), |e| format!(", error: {e:#}")),
            dir.display()
        );
    }
    drop(cluster);
    remove_run_dir(&dir)
}

fn print_summary(s: &Summary) {
    eprintln!(
        "chaos: {:.1} min, seed {}, network {} (partitions by {})",
        s.minutes, s.seed, s.network, s.partition_method
    );
    for (kind, count) in &s.faults {
        eprintln!("  {kind:<20} {count}");
    }
    eprintln!(
        "  {} faults, {} replacements, {} acknowledged writes, {} verified reads, {} verify errors, \
         all serving {} ({:.1} s after the last fault)",
        s.faults_injected,
        s.replacements,
        s.acknowledged_writes,
        s.verified_reads,
        s.verify_errors,
        s.all_serving,
        s.heal_s
    );
}

/// The run inside the runtime: set up, faults beside the workload, heal,
/// verify.
async fn soak(
    args: &ChaosArgs,
    cluster: &mut ChaosCluster,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    cluster.start_manager_and_storage()?;
    let admin = cluster.launcher.admin_rpc()?;
    cluster
        .wait_for(
            &admin,
            "the storage nodes to register",
            Duration::from_secs(60),
            |r| r.nodes.iter().filter(|n| n.alive).count() == STORAGE_NODES as usize,
        )
        .await?;
    // One chain per 3-subset of the nodes, heads rotating.
    let chains: Vec<Vec<u32>> = (0..CHAINS)
        .map(|c| (0..REPLICAS).map(|r| (c + r) % STORAGE_NODES + 1).collect())
        .collect();
    create_chains(&admin, &cluster.mgmt_addr, &chains).await?;
    let req = CreateChainTableReq {
        table: ChainTableId(1),
        chains: (1..=CHAINS).map(ChainId).collect(),
    };
    mutate::<CreateChainTable>(&admin, &cluster.mgmt_addr, &req).await?;
    cluster
        .wait_for(
            &admin,
            "every replica to serve",
            Duration::from_secs(60),
            all_serving,
        )
        .await?;
    cluster.start_meta()?;

    let fs = cluster.file_client()?;
    let shared = Arc::new(Shared::default());
    let mut tasks = Vec::new();
    for task in 0..args.tasks {
        let fs = fs.clone();
        let shared = shared.clone();
        let rng = ChaCha8Rng::seed_from_u64(summary.seed ^ ((u64::from(task) + 1) << 32));
        let admin = cluster.launcher.admin_rpc()?;
        let mut workload = Workload::new(task, fs, shared, rng, admin).await?;
        tasks.push(tokio::spawn(async move {
            workload.run().await;
            workload
        }));
    }
    eprintln!(
        "chaos: cluster up in {} ({}); faults for {} min, seed {}",
        cluster.launcher.dir.display(),
        cluster.net.name(),
        args.minutes,
        summary.seed
    );

    let mut rng = ChaCha8Rng::seed_from_u64(summary.seed);
    let fault_time = Duration::from_secs_f64(args.minutes * 60.0);
    let faults_started = Instant::now();
    let mut round = 0u64;
    'rounds: loop {
        let mut order = FAULTS.to_vec();
        order.shuffle(&mut rng);
        for fault in order {
            // The first round runs whole: every kind fires in a short run.
            if round > 0 && faults_started.elapsed() >= fault_time {
                break 'rounds;
            }
            let hold = Duration::from_millis(rng.random_range(HOLD_MS.0..=HOLD_MS.1));
            inject(cluster, &admin, fault, hold, &mut rng, summary).await?;
            *summary.faults.entry(fault.name()).or_default() += 1;
            summary.faults_injected += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(GAP_MS.0..=GAP_MS.1))).await;
        }
        round += 1;
        if faults_started.elapsed() >= fault_time {
            break;
        }
    }

    eprintln!("chaos: faults stopped; waiting for every chain to serve");
    let healing = Instant::now();
    let healed = cluster
        .wait_for(
            &admin,
            "every chain's targets to serve",
            Duration::from_secs(args.heal_timeout_s),
            all_serving,
        )
        .await;
    summary.heal_s = healing.elapsed().as_secs_f64();
    summary.all_serving = healed.is_ok();
    if let Err(error) = healed {
        eprintln!("chaos: {error:#}");
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut workloads = Vec::new();
    for task in tasks {
        workloads.push(task.await.context("a workload task panicked")?);
    }
    if summary.all_serving {
        for workload in &mut workloads {
            workload.verify_all().await;
        }
    }
    for w in &workloads {
        summary.operations.add(&w.ops);
        summary.uncertain_files += w.uncertain;
        summary.final_files_checked += w.final_checked;
    }
    summary.acknowledged_writes = shared.acknowledged_writes.load(Ordering::Relaxed);
    summary.verified_reads = shared.verified_reads.load(Ordering::Relaxed);
    let errors = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    summary.verify_errors = errors.len() as u64;
    summary.verify_error_details = errors.into_iter().take(ERRORS_SHOWN_MAX).collect();
    Ok(())
}

/// Injects one fault and heals it `hold` later (a replacement is healed
/// when it is done).
async fn inject(
    cluster: &mut ChaosCluster,
    admin: &Client<Tcp>,
    fault: Fault,
    hold: Duration,
    rng: &mut ChaCha8Rng,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let storage = |rng: &mut ChaCha8Rng, nodes: &[u32]| nodes[rng.random_range(0..nodes.len())];
    let victim = match fault {
        Fault::KillStorage | Fault::PartitionStorage => {
            storage_name(storage(rng, &cluster.storage_nodes))
        }
        Fault::KillMeta | Fault::PartitionMeta => "meta".to_owned(),
        Fault::KillMgmtd | Fault::PartitionMgmtd => "mgmtd".to_owned(),
        Fault::ReplaceStorage => {
            let node = storage(rng, &cluster.storage_nodes);
            match replace(cluster, admin, node).await {
                Ok(()) => summary.replacements += 1,
                Err(error) => {
                    eprintln!("chaos: replacing node {node}: {error:#}");
                    summary
                        .replacement_errors
                        .push(format!("node {node}: {error:#}"));
                }
            }
            return Ok(());
        }
    };
    eprintln!(
        "chaos: [{}] {} {victim} for {:.1} s",
        clock(),
        fault.name(),
        hold.as_secs_f64()
    );
    match fault {
        Fault::KillStorage | Fault::KillMeta | Fault::KillMgmtd => {
            cluster.kill(&victim)?;
            tokio::time::sleep(hold).await;
            cluster.restart(&victim)?;
        }
        _ => {
            cluster.partition(&victim)?;
            tokio::time::sleep(hold).await;
            cluster.heal(&victim)?;
        }
    }
    Ok(())
}

/// Kills storage node `node` for good and replaces it: a new node joins,
/// `flyfs admin drain-node` moves the dead node's replicas (the new targets
/// resync while their chains serve) and `remove-node` forgets it.
async fn replace(cluster: &mut ChaosCluster, admin: &Client<Tcp>, node: u32) -> anyhow::Result<()> {
    // A chain that is still recovering from the last fault might have its
    // only up-to-date replica on the victim: start from a healed cluster.
    // The routing lags the faults: a node whose heartbeats the last fault
    // held up (a partition of the manager or of the node, in TCP's
    // retransmission backoff after it) is taken offline only when the
    // failure timeout runs out, so a routing showing every replica serving
    // just after a fault may be about to lose one. The victim dies only
    // once every replica has served for a whole failure timeout: losing a
    // node for good while the manager holds another replica of its chains
    // offline is two failures, which three replicas are not claimed to
    // survive without losing acknowledged writes.
    cluster
        .wait_for_steady(
            admin,
            "every replica to serve, steadily, before a replacement",
            Duration::from_secs(120),
            Duration::from_millis(FAILURE_TIMEOUT_MS + 1_000),
            all_serving,
        )
        .await?;
    eprintln!(
        "chaos: [{}] replace_storage: node {node} dies for good",
        clock()
    );
    cluster.kill(&storage_name(node))?;
    cluster.storage_nodes.retain(|&n| n != node);
    cluster.retire(&storage_name(node));
    let new = cluster.next_node;
    cluster.add_storage(new)?;
    cluster
        .wait_for(
            admin,
            "the new storage node to register",
            Duration::from_secs(60),
            |r| r.node(NodeId(new)).is_some_and(|n| n.alive),
        )
        .await?;
    let replaced = Instant::now();
    // drain-node is idempotent: a step the manager refused (it may be busy
    // with a node's failure) is taken again by the next attempt.
    let node_arg = node.to_string();
    let drain = ["drain-node", "--node", &node_arg, "--timeout-s", "300"];
    cluster
        .admin_retrying(&drain, 3, Duration::from_secs(2))
        .await?;
    // The manager forgets only a node it holds dead: that takes its
    // failure timeout after the kill (60 s at most, tried every 500 ms).
    let remove = ["remove-node", "--node", &node_arg];
    cluster
        .admin_retrying(&remove, 120, Duration::from_millis(500))
        .await?;
    eprintln!(
        "chaos: [{}] node {node} replaced by node {new} in {:.1} s",
        clock(),
        replaced.elapsed().as_secs_f64()
    );
    Ok(())
}

fn all_serving(routing: &RoutingInfo) -> bool {
    routing.chains.len() == CHAINS as usize
        && routing.chains.iter().all(|chain| {
            chain.targets.len() == REPLICAS as usize
                && chain
                    .targets
                    .iter()
                    .all(|t| t.state == PublicState::Serving)
        })
}

fn storage_name(node: u32) -> String {
    format!("storage{node}")
}

/// Seconds since the epoch, for the progress lines (matched against the
/// daemons' logs).
fn clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", now.as_secs(), now.subsec_millis())
}

// ---- the network: namespaces joined by a bridge, or loopback ----

/// Where the daemons run.
#[derive(Debug)]
enum Net {
    Netns(Netns),
    Loopback,
}

impl Net {
    fn choose(mode: NetworkMode) -> anyhow::Result<Net> {
        if mode == NetworkMode::Loopback {
            return Ok(Net::Loopback);
        }
        match Netns::create() {
            Ok(netns) => Ok(Net::Netns(netns)),
            Err(error) if mode == NetworkMode::Auto => {
                eprintln!(
                    "chaos: network namespaces are not available ({error:#}); every daemon runs \
                     on loopback and a partition is a SIGSTOP of the process instead of a link \
                     going down (--network netns makes this an error)"
                );
                Ok(Net::Loopback)
            }
            Err(error) => Err(error.context("--network netns")),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Net::Netns(_) => "netns",
            Net::Loopback => "loopback",
        }
    }

    fn partition_method(&self) -> &'static str {
        match self {
            Net::Netns(_) => "link_down",
            Net::Loopback => "sigstop",
        }
    }

    /// The address a daemon on host `index` listens at.
    fn ip(&self, index: u8) -> String {
        match self {
            Net::Netns(netns) => netns.ip(index),
            Net::Loopback => "127.0.0.1".to_owned(),
        }
    }
}

/// Network namespaces `flyfs-chaos-PID-NAME`, each with a veth whose other
/// end is on the bridge `fcbPID` in this process's namespace, one /24 of
/// 198.18.0.0/15 for all (the bridge, where this process's clients are, is `.1`). Dropping it
/// deletes the namespaces (their veths go with them) and the bridge.
#[derive(Debug)]
struct Netns {
    /// Short per-run tag in interface names (at most 15 bytes).
    tag: String,
    bridge: String,
    /// The first three octets of the subnet.
    prefix: String,
    /// Namespaces made, by host name, with their host index.
    hosts: BTreeMap<String, u8>,
}

impl Netns {
    fn create() -> anyhow::Result<Netns> {
        let uid = nix::unistd::geteuid();
        ensure!(
            uid.is_root(),
            "network namespaces need root (CAP_NET_ADMIN); this runs as uid {uid}"
        );
        let pid = std::process::id();
        let tag = format!("{:05}", pid % 100_000);
        let prefix = free_subnet(pid)?;
        let bridge = format!("fcb{tag}");
        let mut netns = Netns {
            tag,
            bridge: bridge.clone(),
            prefix,
            hosts: BTreeMap::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"])
            .context("making a bridge (is iproute2 installed?)")?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", netns.ip(1)),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        // Probe one namespace now, so that a kernel without them falls back
        // before anything is started.
        netns.add_host("probe", 254)?;
        netns.remove_host("probe");
        Ok(netns)
    }

    fn ip(&self, index: u8) -> String {
        format!("{}.{index}", self.prefix)
    }

    fn namespace(&self, host: &str) -> String {
        format!("flyfs-chaos-{}-{host}", self.tag)
    }

    /// Makes host `host` a namespace with its veth on the bridge at
    /// address `index`.
    fn add_host(&mut self, host: &str, index: u8) -> anyhow::Result<()> {
        let ns = self.namespace(host);
        let outside = format!("fc{}h{index}", self.tag);
        let inside = format!("fc{}n{index}", self.tag);
        ip(&["netns", "add", &ns]).context("making a network namespace")?;
        self.hosts.insert(host.to_owned(), index);
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside,
        ])?;
        ip(&["link", "set", &inside, "netns", &ns])?;
        ip(&["link", "set", &outside, "master", &self.bridge])?;
        ip(&["link", "set", &outside, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", self.ip(index)),
            "dev",
            &inside,
        ])?;
        ip(&["-n", &ns, "link", "set", &inside, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn remove_host(&mut self, host: &str) {
        if self.hosts.remove(host).is_some() {
            let _ = ip(&["netns", "del", &self.namespace(host)]);
        }
    }

    /// Cuts (or restores) host `host`'s link: its packets go nowhere, as
    /// when a switch port fails. Setting a link to the state it is in is
    /// harmless, so this is idempotent.
    fn set_link(&self, host: &str, up: bool) -> anyhow::Result<()> {
        let index = self
            .hosts
            .get(host)
            .with_context(|| format!("{host} has no namespace"))?;
        let inside = format!("fc{}n{index}", self.tag);
        ip(&[
            "-n",
            &self.namespace(host),
            "link",
            "set",
            &inside,
            if up { "up" } else { "down" },
        ])
    }

    /// `daemon`, run inside host `host`'s namespace.
    fn wrap(&self, host: &str, daemon: &mut Daemon) {
        let mut args = vec![
            "netns".to_owned(),
            "exec".to_owned(),
            self.namespace(host),
            daemon.program.display().to_string(),
        ];
        args.append(&mut daemon.args);
        daemon.args = args;
        daemon.program = PathBuf::from("ip");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let hosts: Vec<String> = self.hosts.keys().cloned().collect();
        for host in hosts {
            self.remove_host(&host);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// The first three octets of a /24 of 198.18.0.0/15 that no interface on
/// this machine has an address in, trying from one drawn from `pid` (so
/// that two runs at once take different ones). The range is set aside for
/// network benchmarks (RFC 2544): no real network a route on the bridge
/// could shadow uses it.
fn free_subnet(pid: u32) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .context("running ip -o -4 addr show (is iproute2 installed?)")?;
    ensure!(
        out.status.success(),
        "ip -o -4 addr show: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let taken = String::from_utf8_lossy(&out.stdout);
    (0..512)
        .map(|k| {
            let n = (pid + k) % 512;
            format!("198.{}.{}", 18 + n / 256, n % 256)
        })
        .find(|prefix| !taken.contains(&format!(" {prefix}.")))
        .context("every /24 of 198.18.0.0/15 is in use on this machine")
}

/// Runs `ip ARGS`; its complaint on failure.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

// ---- the cluster ----

/// Host indexes on the bridge: this process is 1.
const MGMTD_HOST: u8 = 2;
const META_HOST: u8 = 3;

fn storage_host(node: u32) -> anyhow::Result<u8> {
    u8::try_from(10 + node)
        .ok()
        .filter(|&index| index < 254)
        .with_context(|| format!("storage node {node}: out of host addresses for a run this long"))
}

/// The daemons, owned by a [`Launcher`] (dropping it kills what still runs).
#[derive(Debug)]
struct ChaosCluster {
    // The daemons are dropped (killed) before the namespaces they run in.
    launcher: Launcher,
    net: Net,
    ca: ClusterCa,
    /// How each daemon is started, by name, for restarts.
    daemons: BTreeMap<String, Daemon>,
    mgmt_addr: String,
    meta_addr: String,
    /// The storage nodes in service (not killed for good).
    storage_nodes: Vec<u32>,
    next_node: u32,
    /// Daemons stopped with SIGSTOP (partitions on loopback).
    frozen: HashMap<String, u32>,
    /// The metadata service's `gc_delay_ms`.
    gc_delay_ms: u64,
}

impl ChaosCluster {
    fn new(dir: PathBuf, net: Net, gc_delay_ms: u64) -> anyhow::Result<ChaosCluster> {
        let launcher = Launcher::new(dir)?;
        let ca = launcher.ca("chaos")?;
        let port = |what: &str| -> anyhow::Result<u16> {
            match &net {
                // A namespace of its own: any fixed port is free.
                Net::Netns(_) => Ok(if what == "mgmtd" { 7000 } else { 7001 }),
                Net::Loopback => free_port(what),
            }
        };
        let mgmt_addr = format!("{}:{}", net.ip(MGMTD_HOST), port("mgmtd")?);
        let meta_addr = format!("{}:{}", net.ip(META_HOST), port("meta")?);
        Ok(ChaosCluster {
            launcher,
            net,
            ca,
            daemons: BTreeMap::new(),
            mgmt_addr,
            meta_addr,
            storage_nodes: Vec::new(),
            next_node: 1,
            frozen: HashMap::new(),
            gc_delay_ms,
        })
    }

    fn tls_dir(&self) -> PathBuf {
        self.launcher.tls_dir()
    }

    fn write_config(&self, name: &str, config: &impl ConfigFile) -> anyhow::Result<PathBuf> {
        self.launcher.write_config(name, config)
    }

    /// Registers daemon `name` (on host `host` at `index`) and starts it.
    fn launch(
        &mut self,
        name: &str,
        subcommand: &str,
        config: &Path,
        index: u8,
    ) -> anyhow::Result<()> {
        let mut daemon = self.launcher.daemon(name, subcommand, config);
        if let Net::Netns(netns) = &mut self.net {
            netns.add_host(name, index)?;
            netns.wrap(name, &mut daemon);
        }
        self.launcher.start(daemon.clone())?;
        self.daemons.insert(name.to_owned(), daemon);
        Ok(())
    }

    fn start_manager_and_storage(&mut self) -> anyhow::Result<()> {
        self.ca
            .ensure_credentials(Principal::Mgmt("mgmtd".into()), &self.tls_dir(), "mgmtd")?;
        let admin = Principal::Admin {
            name: "chaos".into(),
            uid: 0,
            gid: 0,
        };
        self.ca
            .ensure_credentials(admin, &self.tls_dir(), "admin")?;
        self.ca
            .ensure_credentials(Principal::Client("chaos".into()), &self.tls_dir(), "client")?;
        let mut mgmtd = MgmtdConfig::new("mgmtd-data");
        mgmtd.listen = self.mgmt_addr.clone();
        mgmtd.heartbeat_interval_ms = 200;
        mgmtd.tick_interval_ms = 100;
        mgmtd.failure_timeout_ms = FAILURE_TIMEOUT_MS;
        mgmtd.tls = Some(TlsConfig::in_dir(&self.tls_dir(), "mgmtd"));
        let config = self.write_config("mgmtd", &mgmtd)?;
        self.launch("mgmtd", "mgmtd", &config, MGMTD_HOST)?;
        for _ in 0..STORAGE_NODES {
            self.add_storage(self.next_node)?;
        }
        Ok(())
    }

    /// Formats a device for node `node`, and starts it.
    fn add_storage(&mut self, node: u32) -> anyhow::Result<()> {
        let name = storage_name(node);
        let index = storage_host(node)?;
        let device = self.launcher.dir.join(format!("disk{node}.img"));
        self.launcher.format(&device, DEVICE_BYTES, 1 << 20)?;
        self.ca
            .ensure_credentials(Principal::Storage(NodeId(node)), &self.tls_dir(), &name)?;
        let mut storage = StorageDaemonConfig::new(node, vec![device]);
        storage.listen = format!("{}:0", self.net.ip(index));
        storage.mgmt = ManagerAddrs::one(self.mgmt_addr.clone());
        storage.heartbeat_interval_ms = 200;
        storage.tls = Some(TlsConfig::in_dir(&self.tls_dir(), &name));
        let config = self.write_config(&name, &storage)?;
        self.launch(&name, "storage", &config, index)?;
        self.storage_nodes.push(node);
        self.next_node = self.next_node.max(node + 1);
        Ok(())
    }

    fn start_meta(&mut self) -> anyhow::Result<()> {
        self.ca
            .ensure_credentials(Principal::Meta("meta".into()), &self.tls_dir(), "meta")?;
        let mut meta = MetaDaemonConfig::new("meta-data");
        meta.listen = self.meta_addr.clone();
        meta.mgmt = ManagerAddrs::one(self.mgmt_addr.clone());
        meta.chain_table = 1;
        meta.chunk_size = CHUNK_BYTES;
        meta.stripe = STRIPE;
        meta.gc_delay_ms = self.gc_delay_ms;
        meta.tls = Some(TlsConfig::in_dir(&self.tls_dir(), "meta"));
        let config = self.write_config("meta", &meta)?;
        self.launch("meta", "meta", &config, META_HOST)
    }

    /// The workload's file client, keeping its routing fresh as a mount
    /// does.
    fn file_client(&self) -> anyhow::Result<Arc<FsClient<Tcp>>> {
        let credentials = self.launcher.credentials("client")?;
        let storage = StorageClient::new(
            ClientConfig::new([self.mgmt_addr.clone()], ClientId(0xc4a05)),
            Tcp,
            credentials.clone(),
        );
        let meta = MetaClient::new(
            Tcp,
            MetaClientConfig::new(vec![self.meta_addr.clone()]),
            credentials,
        );
        let refreshed = storage.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = refreshed.refresh_routing().await {
                    tracing::debug!("routing refresh failed: {e}");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(FsClient::new(
            meta,
            storage,
            ClientId(0xc4a05),
            FsConfig::default(),
        ))
    }

    /// Runs `flyfs admin ARGS` against the manager as an operator would.
    async fn admin_command(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new(&self.launcher.exe)
            .arg("admin")
            .args(["--mgmt", &self.mgmt_addr, "--credentials"])
            .arg(self.tls_dir())
            .arg("--json")
            .args(args)
            .output()
            .await
            .context("running flyfs admin")?;
        ensure!(
            out.status.success(),
            "flyfs admin {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `flyfs admin ARGS` until it succeeds, `attempts_max` times at most,
    /// `pause` apart; the error names the command and its last failure.
    async fn admin_retrying(
        &self,
        args: &[&str],
        attempts_max: u32,
        pause: Duration,
    ) -> anyhow::Result<String> {
        let mut attempt = 1;
        loop {
            match self.admin_command(args).await {
                Ok(out) => return Ok(out),
                Err(error) if attempt < attempts_max => {
                    eprintln!("chaos: {} (attempt {attempt}): {error:#}", args.join(" "));
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(error) => {
                    return Err(error.context(format!("after {attempt} attempts")));
                }
            }
        }
    }

    fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        self.launcher.kill(name)
    }

    fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let daemon = self
            .daemons
            .get(name)
            .with_context(|| format!("no daemon {name}"))?
            .clone();
        self.launcher.start(daemon)
    }

    /// Forgets a daemon killed for good: its namespace and device go.
    fn retire(&mut self, name: &str) {
        self.daemons.remove(name);
        if let Net::Netns(netns) = &mut self.net {
            netns.remove_host(name);
        }
        if let Some(node) = name.strip_prefix("storage") {
            let _ = std::fs::remove_file(self.launcher.dir.join(format!("disk{node}.img")));
        }
    }

    fn pid(&self, name: &str) -> anyhow::Result<u32> {
        self.launcher
            .pids()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, pid)| pid)
            .with_context(|| format!("{name} is not running"))
    }

    fn partition(&mut self, name: &str) -> anyhow::Result<()> {
        match &self.net {
            Net::Netns(netns) => netns.set_link(name, false),
            Net::Loopback => {
                let pid = self.pid(name)?;
                kill(Pid::from_raw(pid as i32), Signal::SIGSTOP)
                    .with_context(|| format!("stopping {name} (pid {pid})"))?;
                self.frozen.insert(name.to_owned(), pid);
                Ok(())
            }
        }
    }

    fn heal(&mut self, name: &str) -> anyhow::Result<()> {
        match &self.net {
            Net::Netns(netns) => netns.set_link(name, true),
            Net::Loopback => {
                if let Some(pid) = self.frozen.remove(name) {
                    kill(Pid::from_raw(pid as i32), Signal::SIGCONT)
                        .with_context(|| format!("continuing {name} (pid {pid})"))?;
                }
                Ok(())
            }
        }
    }

    /// Polls the manager's routing until `done` holds, for `limit` at
    /// most; fails early when a daemon died on its own.
    async fn wait_for(
        &self,
        rpc: &Client<Tcp>,
        what: &str,
        limit: Duration,
        done: impl Fn(&RoutingInfo) -> bool,
    ) -> anyhow::Result<()> {
        (self.launcher)
            .wait_for(rpc, &self.mgmt_addr, what, limit, done)
            .await
    }

    /// Waits until `done` has held on every routing fetched for a whole
    /// `steady` in a row, for `limit` at most.
    async fn wait_for_steady(
        &self,
        rpc: &Client<Tcp>,
        what: &str,
        limit: Duration,
        steady: Duration,
        done: impl Fn(&RoutingInfo) -> bool,
    ) -> anyhow::Result<()> {
        (self.launcher)
            .wait_steady(rpc, &self.mgmt_addr, what, limit, steady, done)
            .await
    }

    /// SIGTERM to every daemon, storage first and the manager last.
    fn stop(&mut self) -> anyhow::Result<()> {
        let frozen: Vec<String> = self.frozen.keys().cloned().collect();
        for name in frozen {
            self.heal(&name)?;
        }
        let rank = |name: &str| match name {
            "mgmtd" => 2,
            "meta" => 1,
            _ => 0,
        };
        self.launcher.stop(Duration::from_secs(20), rank)
    }
}

// ---- the workload ----

/// What the workload tasks share with the driver.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    acknowledged_writes: AtomicU64,
    verified_reads: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, error: String) {
        eprintln!("chaos: VERIFY ERROR: {error}");
        if let Ok(mut errors) = self.errors.lock() {
            errors.push(error);
        }
    }
}

/// A file the workload knows the exact contents of.
#[derive(Debug)]
struct Known {
    ino: InodeId,
    /// What its bytes name it (see [`content`]): the task in the high byte,
    /// the number of its first name below.
    id: u32,
    data: Vec<u8>,
    /// Its acknowledged steps, oldest first (the last [`HISTORY_MAX`]),
    /// printed with a verification error.
    history: Vec<String>,
}

/// Steps of a file's history kept for a verification error.
const HISTORY_MAX: usize = 24;

impl Known {
    fn log(&mut self, step: String) {
        if self.history.len() == HISTORY_MAX {
            self.history.remove(0);
        }
        self.history.push(step);
    }
}

/// One task's files in its directory `/chaos-tN`.
struct Workload {
    task: u32,
    fs: Arc<FsClient<Tcp>>,
    shared: Arc<Shared>,
    rng: ChaCha8Rng,
    dir: InodeId,
    /// Linked files by name, with their acknowledged contents.
    files: BTreeMap<String, Known>,
    /// Names removed for good (an acknowledged unlink or rename away).
    removed: Vec<String>,
    next_name: u64,
    /// Writes made so far: each write's bytes carry its generation.
    generation: u32,
    /// An admin client, to ask each replica what it holds when a file
    /// reads back wrong.
    admin: Client<Tcp>,
    ops: Operations,
    uncertain: u64,
    final_checked: u64,
}

enum Op {
    Create,
    Overwrite,
    Read,
    Rename,
    Truncate,
    Remove,
}

fn user() -> User {
    User::root()
}

impl Workload {
    async fn new(
        task: u32,
        fs: Arc<FsClient<Tcp>>,
        shared: Arc<Shared>,
        rng: ChaCha8Rng,
        admin: Client<Tcp>,
    ) -> anyhow::Result<Workload> {
        let root = fs
            .resolve(&user(), b"/", true)
            .await
            .context("resolving / on the metadata service")?;
        let name = format!("chaos-t{task}");
        let dir = fs
            .mkdir(&user(), root.ino, name.as_bytes(), 0o755)
            .await
            .with_context(|| format!("making /{name}"))?;
        Ok(Workload {
            task,
            fs,
            shared,
            rng,
            dir: dir.ino,
            files: BTreeMap::new(),
            removed: Vec::new(),
            next_name: 0,
            generation: 0,
            admin,
            ops: Operations::default(),
            uncertain: 0,
            final_checked: 0,
        })
    }

    async fn run(&mut self) {
        while !self.shared.stop.load(Ordering::Relaxed) {
            let op = self.choose();
            let done = tokio::time::timeout(OPERATION_TIMEOUT, self.step(op)).await;
            if done.is_err() {
                self.ops.timed_out += 1;
                self.uncertain += 1;
            }
        }
    }

    fn choose(&mut self) -> Op {
        if self.files.is_empty() {
            return Op::Create;
        }
        if self.files.len() >= LIVE_FILES_MAX && self.rng.random_bool(0.5) {
            return Op::Remove;
        }
        match self.rng.random_range(0..100) {
            0..25 => Op::Create,
            25..40 => Op::Overwrite,
            40..70 => Op::Read,
            70..80 => Op::Rename,
            80..90 => Op::Truncate,
            _ => Op::Remove,
        }
    }

    fn fresh_name(&mut self) -> String {
        self.next_name += 1;
        format!("f{}", self.next_name)
    }

    /// Takes a random known file out of `files` (see [`Workload::forget`]).
    fn take(&mut self) -> Option<(String, Known)> {
        let k = self.rng.random_range(0..self.files.len().max(1));
        let name = self.files.keys().nth(k).cloned()?;
        self.files.remove_entry(&name)
    }

    /// The bytes of a new write of a random length at `offset` of file
    /// `file`, naming the file, the write and their place ([`content`]);
    /// with the write's generation.
    fn write_bytes(&mut self, file: u32, offset: u64) -> (Vec<u8>, u32) {
        let len = self.rng.random_range(1..=WRITE_BYTES_MAX);
        self.generation += 1;
        let origin = Origin {
            file,
            generation: self.generation,
        };
        (content::fill(origin, offset, len), self.generation)
    }

    /// A step on a file failed: the file may hold anything now, so it is
    /// checked no more (each step takes its file out of `files` first and
    /// puts it back only when the step was acknowledged, so a step
    /// cancelled by its timeout leaves it out too).
    fn forget(&mut self) {
        self.uncertain += 1;
        self.ops.failed += 1;
    }

    async fn step(&mut self, op: Op) {
        match op {
            Op::Create => self.create().await,
            Op::Overwrite => self.overwrite().await,
            Op::Read => {
                if let Some((name, known)) = self.take() {
                    self.read(name, known, false).await;
                }
            }
            Op::Rename => self.rename().await,
            Op::Truncate => self.truncate().await,
            Op::Remove => self.remove().await,
        }
    }

    async fn create(&mut self) {
        let name = self.fresh_name();
        let id = (self.task << 24) | (self.next_name as u32 & 0x00ff_ffff);
        let (data, generation) = self.write_bytes(id, 0);
        self.ops.creates += 1;
        let mode = OpenMode {
            read: false,
            write: true,
            truncate: false,
        };
        let created = self
            .fs
            .create(&user(), self.dir, name.as_bytes(), 0o644, mode, true)
            .await;
        let Ok((attr, fh)) = created else {
            // It may exist; its name is never used again.
            self.forget();
            return;
        };
        if self.write_and_close(&fh, 0, &data).await {
            let mut known = Known {
                ino: attr.ino,
                id,
                data,
                history: Vec::new(),
            };
            known.log(format!(
                "g{generation} create {name} as {:?}, write [0, {})",
                attr.ino,
                known.data.len()
            ));
            self.files.insert(name, known);
            self.shared
                .acknowledged_writes
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.forget();
        }
    }

    /// Writes and closes; whether both were acknowledged.
    async fn write_and_close(&self, fh: &Arc<FileHandle>, offset: u64, data: &[u8]) -> bool {
        let written = self.fs.write(fh, offset, data).await;
        let closed = self.fs.release(fh).await;
        written.is_ok() && closed.is_ok()
    }

    async fn overwrite(&mut self) {
        let Some((name, known)) = self.take() else {
            return;
        };
        let offset = self.rng.random_range(0..=known.data.len() + (64 << 10)) as u64;
        let (data, generation) = self.write_bytes(known.id, offset);
        self.ops.overwrites += 1;
        let mode = OpenMode {
            read: false,
            write: true,
            truncate: false,
        };
        let ok = match self.fs.open(&user(), known.ino, mode).await {
            Ok((_, fh)) => self.write_and_close(&fh, offset, &data).await,
            Err(_) => false,
        };
        if ok {
            let mut contents = known.data;
            let end = offset as usize + data.len();
            if contents.len() < end {
                contents.resize(end, 0);
            }
            contents[offset as usize..end].copy_from_slice(&data);
            let mut known = Known {
                data: contents,
                ..known
            };
            known.log(format!("g{generation} write [{offset}, {end})"));
            self.files.insert(name, known);
            self.shared
                .acknowledged_writes
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.forget();
        }
    }

    /// Reads file `name` whole and compares it with `known`, then puts it
    /// back among the known files. A failed read is no error unless `must`
    /// (the final check, on a healed cluster).
    async fn read(&mut self, name: String, known: Known, must: bool) {
        self.ops.reads += 1;
        let path = format!("/chaos-t{}/{name}", self.task);
        let got = self.read_whole(&name, known.ino, known.data.len()).await;
        match got {
            Ok((length, bytes, layout)) => {
                self.shared.verified_reads.fetch_add(1, Ordering::Relaxed);
                if length != known.data.len() as u64 {
                    self.shared.error(format!(
                        "{path}: length {length}, acknowledged {}",
                        known.data.len()
                    ));
                } else if bytes != known.data {
                    let at = bytes
                        .iter()
                        .zip(&known.data)
                        .position(|(a, b)| a != b)
                        .unwrap_or(bytes.len().min(known.data.len()));
                    let chunks = differing_chunks(&bytes, &known.data, layout.as_ref());
                    self.shared.error(format!(
                        "{path} ({:?}): {} bytes read (crc32c {:08x}), {} acknowledged (crc32c {:08x}); \
                         first difference at byte {at}; {}",
                        known.ino,
                        bytes.len(),
                        crc32c::crc32c(&bytes),
                        known.data.len(),
                        crc32c::crc32c(&known.data),
                        chunks
                            .iter()
                            .map(|c| c.describe())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ));
                    self.evidence(&path, &known, &chunks).await;
                }
            }
            Err(error) if must => {
                self.shared
                    .error(format!("{path}: unreadable on a healed cluster: {error}"));
            }
            Err(_) => self.ops.failed += 1,
        }
        self.files.insert(name, known);
    }

    /// The file's length as the service says and all its bytes.
    async fn read_whole(
        &self,
        name: &str,
        ino: InodeId,
        expected_len: usize,
    ) -> Result<(u64, Vec<u8>, Option<Layout>), String> {
        let attr = self
            .fs
            .lookup(&user(), self.dir, name.as_bytes())
            .await
            .map_err(|e| format!("lookup: {e}"))?;
        if attr.ino != ino || attr.kind != FileType::File {
            return Err(format!(
                "names inode {:?} of kind {:?}, not {ino:?}",
                attr.ino, attr.kind
            ));
        }
        let mode = OpenMode {
            read: true,
            write: false,
            truncate: false,
        };
        let (attr, fh) = self
            .fs
            .open(&user(), ino, mode)
            .await
            .map_err(|e| format!("open: {e}"))?;
        let mut bytes = Vec::with_capacity(expected_len);
        // One past the expected end: a file longer than it should be shows.
        let want = attr.length.max(expected_len as u64) + 1;
        let mut result = Ok(());
        while (bytes.len() as u64) < want {
            let len = (want - bytes.len() as u64).min(1 << 20) as u32;
            match self.fs.read(&fh, bytes.len() as u64, len).await {
                Ok(chunk) if chunk.is_empty() => break,
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(e) => {
                    result = Err(format!("read at {}: {e}", bytes.len()));
                    break;
                }
            }
        }
        let _ = self.fs.release(&fh).await;
        result.map(|()| (attr.length, bytes, attr.layout))
    }

    /// Prints what may tell why `path` read back wrong: its history, and
    /// for each chunk that differs what every replica of its chain holds
    /// (its chunk metadata, and its bytes read from it alone).
    async fn evidence(&self, path: &str, known: &Known, chunks: &[Differing]) {
        let mut text = format!(
            "chaos: EVIDENCE {path} ({:?}, file t{}:f{}), {} bytes; history: {}",
            known.ino,
            known.id >> 24,
            known.id & 0x00ff_ffff,
            known.data.len(),
            known.history.join(" | ")
        );
        let routing = self.fs.storage().routing();
        let options = flyfs_rpc::CallOptions {
            timeout: Duration::from_secs(5),
            ..flyfs_rpc::CallOptions::default()
        };
        for chunk in chunks {
            let Some(chain) = chunk.chain.and_then(|c| routing.chain(c)) else {
                text.push_str(&format!(
                    "\n  chunk {}: chain not in the routing",
                    chunk.index
                ));
                continue;
            };
            let id = ChunkId::new(known.ino.0, chunk.index);
            text.push_str(&format!(
                "\n  chunk {} on {} (version {:?}, routing {:?}):",
                chunk.index, chain.id, chain.version, routing.version
            ));
            for member in &chain.targets {
                let addr = routing
                    .target(member.target)
                    .and_then(|t| routing.node(t.node))
                    .map(|n| n.addr.clone());
                text.push_str(&format!("\n    {:?} {:?}", member.target, member.state));
                let Some(addr) = addr else {
                    text.push_str(" no address");
                    continue;
                };
                text.push_str(&format!(" at {addr}:"));
                // The chunk's metadata on this replica: the entries after
                // the one before it, so the chunk's own comes first.
                let after = match chunk.index.checked_sub(1) {
                    Some(before) => ChunkId::new(known.ino.0, before),
                    None => ChunkId::new(known.ino.0.wrapping_sub(1), u32::MAX),
                };
                let req = DumpMetaReq {
                    chain: chain.id,
                    chain_version: chain.version,
                    after: Some(after),
                    limit: 1,
                };
                match self
                    .admin
                    .call::<DumpMeta>(&addr, &req, bytes::Bytes::new(), &options)
                    .await
                {
                    Ok((Ok(rsp), _)) => match rsp.chunks.first().filter(|m| m.chunk == id) {
                        Some(m) => text.push_str(&format!(
                            " meta version {:?} len {} crc {:08x} pending {:?} chain version {:?};",
                            m.version, m.len, m.crc, m.pending, m.chain_version
                        )),
                        None => text.push_str(" meta: no such chunk;"),
                    },
                    Ok((Err(e), _)) => text.push_str(&format!(" meta refused: {e};")),
                    Err(e) => text.push_str(&format!(" meta failed: {e};")),
                }
                let req = BatchReadReq {
                    items: vec![ReadItem {
                        chain: chain.id,
                        chain_version: chain.version,
                        chunk: id,
                        offset: 0,
                        len: CHUNK_BYTES,
                        verify: true,
                        if_changed_from: None,
                    }],
                };
                let read = self
                    .fs
                    .storage()
                    .rpc()
                    .call::<BatchRead>(&addr, &req, bytes::Bytes::new(), &options)
                    .await;
                match read {
                    Ok((rsp, payload)) => match rsp.results.into_iter().next() {
                        Some(Ok(result)) => {
                            let data = payload.into_bytes().unwrap_or_default();
                            text.push_str(&format!(
                                " read version {:?} chunk_len {} crc {:08x}: {}",
                                result.version,
                                result.chunk_len,
                                crc32c::crc32c(&data),
                                content::describe(
                                    &data,
                                    u64::from(chunk.index) * u64::from(CHUNK_BYTES),
                                    6
                                )
                            ));
                        }
                        Some(Err(e)) => text.push_str(&format!(" read refused: {e}")),
                        None => text.push_str(" read: empty reply"),
                    },
                    Err(e) => text.push_str(&format!(" read failed: {e}")),
                }
            }
        }
        eprintln!("{text}");
    }

    async fn rename(&mut self) {
        let Some((name, known)) = self.take() else {
            return;
        };
        let to = self.fresh_name();
        self.ops.renames += 1;
        let renamed = self
            .fs
            .rename(&user(), self.dir, name.as_bytes(), self.dir, to.as_bytes())
            .await;
        match renamed {
            Ok(()) => {
                let mut known = known;
                known.log(format!("rename {name} to {to}"));
                self.files.insert(to, known);
                self.removed.push(name);
            }
            Err(_) => self.forget(),
        }
    }

    async fn truncate(&mut self) {
        let Some((name, mut known)) = self.take() else {
            return;
        };
        let size = self.rng.random_range(0..=known.data.len() * 3 / 2) as u64;
        self.ops.truncates += 1;
        let req = SetAttrReq {
            user: user(),
            ino: known.ino,
            mode: None,
            uid: None,
            gid: None,
            size: Some(size),
            atime: None,
            mtime: None,
        };
        match self.fs.setattr(req).await {
            Ok(_) => {
                known.log(format!(
                    "after g{} truncate {} to {size}",
                    self.generation,
                    known.data.len()
                ));
                known.data.resize(size as usize, 0);
                self.files.insert(name, known);
                self.shared
                    .acknowledged_writes
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.forget(),
        }
    }

    async fn remove(&mut self) {
        let Some((name, _known)) = self.take() else {
            return;
        };
        self.ops.removes += 1;
        match self.fs.unlink(&user(), self.dir, name.as_bytes()).await {
            Ok(()) => self.removed.push(name),
            Err(_) => self.forget(),
        }
    }

    /// The final check on a healed cluster: every known file reads back
    /// exactly, every removed name is gone.
    async fn verify_all(&mut self) {
        for (name, known) in std::mem::take(&mut self.files) {
            self.read(name, known, true).await;
            self.final_checked += 1;
        }
        for name in self.removed.clone() {
            self.final_checked += 1;
            match self.fs.lookup(&user(), self.dir, name.as_bytes()).await {
                Err(e) if e.errno == libc::ENOENT => {}
                Err(e) => self.shared.error(format!(
                    "/chaos-t{}/{name} (removed): lookup failed on a healed cluster: {e}",
                    self.task
                )),
                Ok(attr) => self.shared.error(format!(
                    "/chaos-t{}/{name} was removed (acknowledged) but names inode {:?}",
                    self.task, attr.ino
                )),
            }
        }
    }
}

/// A chunk of a file whose bytes read back differ from the acknowledged
/// ones, with both sides described ([`content::describe`]).
struct Differing {
    index: u32,
    chain: Option<ChainId>,
    read: String,
    expected: String,
}

impl Differing {
    fn describe(&self) -> String {
        let chain = self
            .chain
            .map_or_else(|| "no chain".to_string(), |c| c.to_string());
        format!(
            "chunk {} on {chain} reads {{{}}}, expected {{{}}}",
            self.index, self.read, self.expected
        )
    }
}

/// The chunks (of `CHUNK_BYTES`) where `read` and `expected` differ.
fn differing_chunks(read: &[u8], expected: &[u8], layout: Option<&Layout>) -> Vec<Differing> {
    let chunk = CHUNK_BYTES as usize;
    let chunks = read.len().max(expected.len()).div_ceil(chunk);
    (0..chunks)
        .filter_map(|index| {
            let range = |bytes: &[u8]| {
                let from = (index * chunk).min(bytes.len());
                let to = ((index + 1) * chunk).min(bytes.len());
                bytes[from..to].to_vec()
            };
            let (r, e) = (range(read), range(expected));
            if r == e {
                return None;
            }
            let offset = (index * chunk) as u64;
            Some(Differing {
                index: index as u32,
                chain: layout.and_then(|l| l.chain_of(index as u32)),
                read: content::describe(&r, offset, 6),
                expected: content::describe(&e, offset, 6),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_must_be_a_positive_number() {
        assert_eq!(parse_minutes("1"), Ok(1.0));
        assert_eq!(parse_minutes("0.5"), Ok(0.5));
        for bad in ["0", "-1", "abc", "", "NaN", "inf", "100000"] {
            assert!(parse_minutes(bad).is_err(), "{bad} was accepted");
        }
        assert!(
            parse_minutes("abc")
                .expect_err("abc is refused")
                .contains("not a number")
        );
        assert!(
            parse_minutes("0")
                .expect_err("0 is refused")
                .contains("more than 0")
        );
    }

    #[test]
    fn every_chain_has_its_replicas_on_distinct_nodes() {
        for c in 0..CHAINS {
            let mut nodes: Vec<u32> = (0..REPLICAS).map(|r| (c + r) % STORAGE_NODES + 1).collect();
            nodes.sort();
            nodes.dedup();
            assert_eq!(nodes.len(), REPLICAS as usize);
        }
    }
}
