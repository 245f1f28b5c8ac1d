//! `flyfs bench storage`: the replicated storage path end to end, the flyfs
//! side of benches/storage-vs-fio.
//!
//! It starts a real cluster on this machine: `flyfs mgmtd` and three
//! `flyfs storage` daemons (this very executable), each storage daemon on one
//! device file formatted by `flyfs format`, all in one directory and so on one
//! disk. It creates `--chains` chains of `--replicas` targets (each chain's
//! replicas on distinct nodes, heads rotated over the nodes), then drives
//! them from this process with a [`StorageClient`] over loopback TCP:
//!
//! 1. writes `--size` bytes as whole-chunk writes spread over the chains,
//!    `--clients` in flight;
//! 2. reads every chunk back in a random order, `--clients` in flight, and
//!    checks each one's CRC32C against the one computed before writing it.
//!    The engines open their devices with O_DIRECT, so no read is served
//!    from the page cache;
//! 3. issues `--small-writes` 4 KiB writes one after another at random
//!    offsets of the chunks, timing each, then reads each written range
//!    back (timed too) and compares the bytes.
//!
//! The daemons are stopped with SIGTERM (SIGKILL when they linger) and the
//! run's directory is removed afterwards, unless `FLYFS_BENCH_KEEP` is set
//! (to read the daemons' logs; `FLYFS_DAEMON_LOG` is their log filter,
//! e.g. `flyfs_craq=debug`, default `info`). The daemons run under
//! flyfs-deploy's supervisor, whose `Fleet` kills every daemon still running
//! when it is dropped, so an error or a panic leaves no process behind
//! (the start-up and stop the benches share live in [`crate::launch`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_deploy::config::{
    ManagerAddrs, MgmtdConfig, RdmaConfig, StorageDaemonConfig, TlsConfig, TransportKind,
};
use flyfs_deploy::supervisor;
use flyfs_proto::Method;
use flyfs_proto::auth::Principal;
use flyfs_proto::ids::{ChainId, ChunkId, ClientId, NodeId};
use flyfs_proto::wire::mgmt::{MgmtError, PublicState, RoutingInfo};
use flyfs_rpc::{CallOptions, Client, Credentials, Tcp};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::launch::{Launcher, create_chains, free_port, remove_run_dir, run_dir};

/// Storage daemons: every chain has at most one replica on each.
const NODES: u32 = 3;
/// The inode the bench's chunks belong to.
const BENCH_INODE: u64 = 0xbe4c_5707_0000_0000;
const SMALL_WRITE_BYTES: usize = 4096;
/// Distinct 1 MiB contents the chunks cycle through: every chunk of one
/// residue shares its bytes, so a read that returns another chunk's data is
/// caught unless the two indices are congruent modulo this.
const CONTENTS: usize = 32;
/// The default `--size`, shrunk on a disk with less room.
const SIZE_DEFAULT: u64 = 2 << 30;
/// Room on each device beyond its chunks: the journal (1% of the device, at
/// most 256 MiB), partly used allocation groups and the slots that
/// copy-on-write updates take while their old version still stands.
const DEVICE_SLACK_BYTES: u64 = 512 << 20;

#[derive(clap::Args, Debug)]
pub struct StorageArgs {
    /// Replicas per chain (1 to 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=3))]
    replicas: u32,
    /// Where the cluster's files go (a directory made for the run inside it
    /// is removed afterwards). Default: the system's temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Bytes written (and read back) in the throughput phases. Default
    /// 2 GiB, less when the disk has not room for three devices that size.
    #[arg(long, value_parser = crate::size::parse)]
    size: Option<u64>,
    /// Chains the chunks are spread over.
    #[arg(long, default_value_t = 6)]
    chains: u32,
    /// Chunk operations in flight in the throughput phases.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Bytes of each chunk (and of each write and read in the throughput
    /// phases): a power of two from 64 KiB to 64 MiB.
    #[arg(long, default_value = "1MiB", value_parser = crate::size::parse)]
    chunk_size: u64,
    /// 4 KiB writes (one in flight) in the latency phase.
    #[arg(long, default_value_t = 2000)]
    small_writes: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// How the client and the daemons reach each other: `tcp` or `rdma`
    /// (every daemon and the client on the RDMA device; the admin steps
    /// stay on TCP, which the daemons serve too).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "rdma"])]
    transport: String,
    /// The RDMA device, with `--transport rdma` (`ibv_devices` lists them).
    #[arg(long)]
    rdma_device: Option<String>,
    /// The GID index of the RDMA device's port (RoCE v2: the one holding
    /// the interface's IPv4 address).
    #[arg(long, default_value_t = 0)]
    rdma_gid_index: u8,
    /// Run the daemons with `overlap_prepare_and_forward` (a replica
    /// forwards before its Prepare is durable), to measure what waiting for
    /// it costs the write path.
    #[arg(long)]
    overlap_prepare: bool,
}

/// What one run measured.
#[derive(Debug, serde::Serialize)]
struct Results {
    write_mib_s: f64,
    read_mib_s: f64,
    write_4k_p50_us: f64,
    write_4k_p99_us: f64,
    write_4k_p999_us: f64,
    write_4k_max_us: f64,
    /// The reads that verify the 4 KiB writes, one in flight.
    read_4k_p50_us: f64,
    read_4k_p99_us: f64,
    replicas: u32,
    chains: u32,
    clients: usize,
    size_bytes: u64,
    chunk_size_bytes: u64,
    chunks: u32,
    small_writes: usize,
    write_s: f64,
    read_s: f64,
    elapsed_s: f64,
    /// Cores each process kept busy in each phase (CPU seconds over wall
    /// seconds): what shows whether the two cores or the disk ran out.
    cpu_cores: CpuCores,
    /// CPU seconds each process spent per GiB of chunk data written (all
    /// replicas' work counted, per GiB the client wrote) and read, plus
    /// `storage`, the storage daemons' sum: what a transport's copies cost,
    /// whatever the emulated NIC's throughput.
    cpu_s_per_gib: CpuPerGib,
    dir: String,
    transport: String,
    /// Whether replicas forwarded before their Prepare was durable.
    overlap_prepare: bool,
    /// Bytes this (client) process moved through RDMA SEND/RECV slots
    /// (copied: frames, and payloads outside the registered buffers) and
    /// by one-sided READ/WRITE that it issued itself.
    rdma_client_bytes: RdmaBytes,
    /// Payload bytes per method that moved one-sided, versus inline
    /// (copied), as this client counted them: a write's payload it lent
    /// for the storage nodes to pull (storage.Write), and a read's bytes
    /// the nodes wrote into a buffer it lent (storage.BatchRead).
    rdma_client_payload_moved: Vec<flyfs_rpc::metrics::PayloadMoved>,
}

#[derive(Debug, Default, serde::Serialize)]
struct RdmaBytes {
    sent_copied: u64,
    received_copied: u64,
    one_sided_read: u64,
    one_sided_written: u64,
}

#[derive(Debug, Default, serde::Serialize)]
struct CpuPerGib {
    write: HashMap<String, f64>,
    read: HashMap<String, f64>,
}

impl CpuPerGib {
    fn new(cores: &CpuCores, write_s: f64, read_s: f64, bytes: u64) -> CpuPerGib {
        let gib = bytes as f64 / f64::from(1u32 << 30);
        let per_gib = |cores: &HashMap<String, f64>, seconds: f64| {
            let mut out: HashMap<String, f64> = cores
                .iter()
                .map(|(name, busy)| (name.clone(), busy * seconds / gib))
                .collect();
            let storage = cores
                .iter()
                .filter(|(name, _)| name.starts_with("storage"))
                .map(|(_, busy)| busy * seconds / gib)
                .sum();
            out.insert("storage".to_string(), storage);
            out
        };
        CpuPerGib {
            write: per_gib(&cores.write, write_s),
            read: per_gib(&cores.read, read_s),
        }
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct CpuCores {
    write: HashMap<String, f64>,
    read: HashMap<String, f64>,
    write_4k: HashMap<String, f64>,
}

pub fn run(args: &StorageArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure!(args.chains >= 1, "--chains must be at least 1");
    ensure!(args.clients >= 1, "--clients must be at least 1");
    ensure!(
        args.chunk_size.is_power_of_two() && (64 << 10..=64 << 20).contains(&args.chunk_size),
        "--chunk-size {} is not a power of two from 64 KiB to 64 MiB",
        args.chunk_size
    );
    let base = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let placement = Placement::new(args.chains, args.replicas);
    let available = available_bytes(&base)?;
    let size = match args.size {
        Some(size) => {
            let needed = placement.disk_bytes(size, args.chunk_size);
            ensure!(
                needed <= available,
                "--size {size} needs {needed} bytes of device files in {} but only {available} are free",
                base.display()
            );
            size
        }
        None => default_size(&placement, args.chunk_size, available)?,
    };
    let chunks = u32::try_from(size / args.chunk_size).context("--size is too large")?;
    ensure!(chunks >= 1, "--size must hold at least one chunk");

    let mut cluster = Cluster::new(run_dir(&base, "flyfs-bench-storage")?)?;
    cluster.overlap_prepare = args.overlap_prepare;
    if args.transport == "rdma" {
        let Some(device) = &args.rdma_device else {
            bail!("--transport rdma needs --rdma-device (ibv_devices lists the devices)");
        };
        cluster.transport = TransportKind::Rdma;
        cluster.rdma = RdmaConfig {
            device: device.clone(),
            gid_index: args.rdma_gid_index,
            ..RdmaConfig::default()
        };
    }
    let device_bytes = placement.device_bytes(size, args.chunk_size);
    let chunk_size_max = args.chunk_size.max(1 << 20);
    let results = cluster.start(device_bytes, chunk_size_max).and_then(|()| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("bench-client")
            .build()
            .context("starting the tokio runtime")?;
        let mut bench = Bench {
            cluster: &cluster,
            placement: &placement,
            chunk_size: args.chunk_size,
            chunks,
            clients: args.clients,
            small_writes: args.small_writes,
            cpu: CpuCores::default(),
        };
        let measured = runtime.block_on(bench.run());
        // Close the client's connections before the daemons go.
        drop(runtime);
        let (write, read, small) = measured?;
        let mib = (u64::from(chunks) * args.chunk_size) as f64 / f64::from(1 << 20);
        Ok(Results {
            write_mib_s: mib / write.as_secs_f64(),
            read_mib_s: mib / read.as_secs_f64(),
            write_4k_p50_us: percentile_us(&small.writes, 0.50),
            write_4k_p99_us: percentile_us(&small.writes, 0.99),
            write_4k_p999_us: percentile_us(&small.writes, 0.999),
            write_4k_max_us: percentile_us(&small.writes, 1.0),
            read_4k_p50_us: percentile_us(&small.reads, 0.50),
            read_4k_p99_us: percentile_us(&small.reads, 0.99),
            replicas: args.replicas,
            chains: args.chains,
            clients: args.clients,
            size_bytes: u64::from(chunks) * args.chunk_size,
            chunk_size_bytes: args.chunk_size,
            chunks,
            small_writes: args.small_writes,
            write_s: write.as_secs_f64(),
            read_s: read.as_secs_f64(),
            elapsed_s: 0.0,
            cpu_s_per_gib: CpuPerGib::new(
                &bench.cpu,
                write.as_secs_f64(),
                read.as_secs_f64(),
                u64::from(chunks) * args.chunk_size,
            ),
            cpu_cores: std::mem::take(&mut bench.cpu),
            dir: base.display().to_string(),
            transport: args.transport.clone(),
            overlap_prepare: args.overlap_prepare,
            rdma_client_bytes: {
                let moved = flyfs_rdma::transfer_counts();
                RdmaBytes {
                    sent_copied: moved.sent_copied,
                    received_copied: moved.received_copied,
                    one_sided_read: moved.one_sided_read,
                    one_sided_written: moved.one_sided_written,
                }
            },
            rdma_client_payload_moved: flyfs_rpc::metrics::payload_moved_totals(),
        })
    });
    let mut results = cluster.finish(results)?;
    results.elapsed_s = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    } else {
        print_table(&results);
    }
    Ok(())
}

fn print_table(r: &Results) {
    println!(
        "cluster      mgmtd + {NODES} storage daemons on {}, {} chains x {} replicas, {} chunks of {} KiB",
        r.dir,
        r.chains,
        r.replicas,
        r.chunks,
        r.chunk_size_bytes >> 10
    );
    println!(
        "write        {:>8.1} MiB/s   ({} in flight, {:.1} s)",
        r.write_mib_s, r.clients, r.write_s
    );
    println!(
        "read         {:>8.1} MiB/s   ({} in flight, random order, CRC checked, O_DIRECT: no page cache; {:.1} s)",
        r.read_mib_s, r.clients, r.read_s
    );
    println!(
        "4 KiB write  p50 {:>7.0} us  p99 {:>7.0} us  p99.9 {:>7.0} us  max {:>7.0} us  ({} writes, one in flight)",
        r.write_4k_p50_us, r.write_4k_p99_us, r.write_4k_p999_us, r.write_4k_max_us, r.small_writes
    );
    println!(
        "4 KiB read   p50 {:>7.0} us  p99 {:>7.0} us  (reading the 4 KiB writes back, one in flight)",
        r.read_4k_p50_us, r.read_4k_p99_us
    );
    for (phase, cores) in [
        ("write", &r.cpu_cores.write),
        ("read", &r.cpu_cores.read),
        ("4 KiB write", &r.cpu_cores.write_4k),
    ] {
        let mut names: Vec<&String> = cores.keys().collect();
        names.sort();
        let busy: Vec<String> = names
            .iter()
            .map(|name| format!("{name} {:.2}", cores[*name]))
            .collect();
        println!("cores busy   {phase:<12} {}", busy.join(", "));
    }
}

/// Which nodes hold each chain's replicas, head first.
#[derive(Debug)]
pub(crate) struct Placement {
    pub(crate) chains: Vec<Vec<u32>>,
}

impl Placement {
    /// Chain `c` (from 0) has its head on node `c % 3 + 1` and its further
    /// replicas on the nodes after it, so heads (which take every write
    /// first) rotate over the nodes and no chain has two replicas on a node.
    pub(crate) fn new(chains: u32, replicas: u32) -> Placement {
        Placement {
            chains: (0..chains)
                .map(|c| (0..replicas).map(|r| (c + r) % NODES + 1).collect())
                .collect(),
        }
    }

    /// The chain of chunk `index` (chunks go round robin over the chains).
    fn chain_of(&self, index: u32) -> ChainId {
        ChainId(index % self.chains.len() as u32 + 1)
    }

    /// The most chunk bytes any node holds when `size` bytes are written.
    fn node_bytes_max(&self, size: u64, chunk_size: u64) -> u64 {
        let chunks = size / chunk_size;
        let chains = self.chains.len() as u64;
        let mut per_node = [0u64; NODES as usize];
        for (c, nodes) in self.chains.iter().enumerate() {
            // Chunk i goes to chain i % chains.
            let on_chain = chunks / chains + u64::from((c as u64) < chunks % chains);
            for &node in nodes {
                per_node[node as usize - 1] += on_chain;
            }
        }
        per_node.iter().max().copied().unwrap_or(0) * chunk_size
    }

    /// One device file: its node's chunks with an eighth to spare, plus
    /// room for the journal and the engine's own.
    fn device_bytes(&self, size: u64, chunk_size: u64) -> u64 {
        let chunks = self.node_bytes_max(size, chunk_size);
        (chunks + chunks / 8 + DEVICE_SLACK_BYTES).next_multiple_of(1 << 20)
    }

    /// All three device files.
    fn disk_bytes(&self, size: u64, chunk_size: u64) -> u64 {
        u64::from(NODES) * self.device_bytes(size, chunk_size)
    }
}

/// 2 GiB, or the largest power-of-two share of it whose device files fill
/// at most half of the free space (the other half is for whatever the disk
/// is compared with, and for everyone else).
fn default_size(placement: &Placement, chunk_size: u64, available: u64) -> anyhow::Result<u64> {
    let mut size = SIZE_DEFAULT.max(chunk_size);
    while placement.disk_bytes(size, chunk_size) > available / 2 {
        if size / 2 < (64 * chunk_size).max(64 << 20) {
            bail!(
                "only {available} bytes are free: too little for the device files of even a \
                 {size}-byte run; pass --dir on a larger disk"
            );
        }
        size /= 2;
    }
    Ok(size)
}

/// Free bytes for an unprivileged user on the file system of `dir`, as
/// `df` reports them (the binary forbids the unsafe a `statvfs` call needs).
pub(crate) fn available_bytes(dir: &Path) -> anyhow::Result<u64> {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .context("running df to find the free space")?;
    ensure!(
        out.status.success(),
        "df {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|line| line.trim().parse().ok())
        .with_context(|| format!("cannot read df's answer `{text}`"))
}

/// The cluster's daemons, owned by a [`Launcher`]: dropping it kills every
/// one still running (also on panic), so no process outlives the bench.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub(crate) launcher: Launcher,
    pub(crate) mgmt_addr: String,
    transport: TransportKind,
    rdma: RdmaConfig,
    overlap_prepare: bool,
}

impl Cluster {
    pub(crate) fn new(dir: PathBuf) -> anyhow::Result<Cluster> {
        Ok(Cluster {
            launcher: Launcher::new(dir)?,
            mgmt_addr: String::new(),
            transport: TransportKind::Tcp,
            rdma: RdmaConfig::default(),
            overlap_prepare: false,
        })
    }

    /// Formats the devices, writes the configs and starts the daemons.
    pub(crate) fn start(&mut self, device_bytes: u64, chunk_size_max: u64) -> anyhow::Result<()> {
        let launcher = &mut self.launcher;
        for node in 1..=NODES {
            let device = launcher.dir.join(format!("disk{node}.img"));
            launcher.format(&device, device_bytes, chunk_size_max)?;
        }
        // The manager's port must be known before the storage configs name
        // it; the storage daemons bind port 0 and advertise what they got.
        self.mgmt_addr = format!("127.0.0.1:{}", free_port("the manager")?);
        // The bench cluster authenticates like any other: a CA of its own
        // and credentials for each daemon, the admin steps and the client.
        let tls_dir = launcher.tls_dir();
        let ca = launcher.ca("bench")?;
        ca.ensure_credentials(Principal::Mgmt("mgmtd".into()), &tls_dir, "mgmtd")?;
        for node in 1..=NODES {
            let stem = format!("storage{node}");
            ca.ensure_credentials(Principal::Storage(NodeId(node)), &tls_dir, &stem)?;
        }
        let admin = Principal::Admin {
            name: "bench".into(),
            uid: 0,
            gid: 0,
        };
        ca.ensure_credentials(admin, &tls_dir, "admin")?;
        ca.ensure_credentials(Principal::Client("bench".into()), &tls_dir, "client")?;
        // Fast heartbeats and ticks bring new chains to serving within a
        // second or two; the failure timeout and lease stay at their
        // defaults, so a loaded machine does not fence anyone off.
        let mut mgmtd = MgmtdConfig::new("mgmtd-data");
        mgmtd.listen = self.mgmt_addr.clone();
        mgmtd.heartbeat_interval_ms = 100;
        mgmtd.tick_interval_ms = 100;
        mgmtd.tls = Some(TlsConfig::in_dir(&tls_dir, "mgmtd"));
        mgmtd.transport = self.transport;
        mgmtd.rdma = self.rdma.clone();
        let mgmtd_config = launcher.write_config("mgmtd", &mgmtd)?;
        let mut storage_configs = Vec::new();
        for node in 1..=NODES {
            let mut storage =
                StorageDaemonConfig::new(node, vec![PathBuf::from(format!("disk{node}.img"))]);
            storage.listen = "127.0.0.1:0".into();
            storage.mgmt = ManagerAddrs::one(self.mgmt_addr.clone());
            storage.heartbeat_interval_ms = 100;
            storage.transport = self.transport;
            storage.rdma = self.rdma.clone();
            storage.overlap_prepare_and_forward = self.overlap_prepare;
            storage.tls = Some(TlsConfig::in_dir(&tls_dir, &format!("storage{node}")));
            storage_configs.push(launcher.write_config(&format!("storage{node}"), &storage)?);
        }
        launcher.start(launcher.daemon("mgmtd", "mgmtd", &mgmtd_config))?;
        for (node, config) in (1..=NODES).zip(storage_configs) {
            launcher.start(launcher.daemon(&format!("storage{node}"), "storage", &config))?;
        }
        Ok(())
    }

    /// The credentials `start` issued under the name `stem`.
    pub(crate) fn credentials(&self, stem: &str) -> anyhow::Result<Credentials> {
        self.launcher.credentials(stem)
    }

    /// SIGTERM to every daemon (storage first, the manager last, so no
    /// storage node loses its manager first), SIGKILL to any still running
    /// 10 s later. Fails if a daemon did not exit cleanly.
    pub(crate) fn stop(&mut self) -> anyhow::Result<()> {
        self.launcher
            .stop(Duration::from_secs(10), |name| u32::from(name == "mgmtd"))
    }

    /// Kills the daemons and removes the device files (gigabytes), keeping
    /// configs and logs.
    pub(crate) fn keep_logs_only(&mut self) {
        self.launcher.kill_all();
        for node in 1..=NODES {
            let _ = std::fs::remove_file(self.launcher.dir.join(format!("disk{node}.img")));
        }
    }

    /// After the cluster stopped: the run's directory goes unless kept;
    /// after a failure: the daemons' logs stay, with the error saying where.
    pub(crate) fn finish<T>(mut self, outcome: anyhow::Result<T>) -> anyhow::Result<T> {
        let dir = self.launcher.dir.clone();
        match outcome {
            Ok(value) => {
                self.stop()?;
                drop(self);
                remove_run_dir(&dir)?;
                Ok(value)
            }
            Err(error) => {
                self.launcher.print_logs();
                // Drop kills the daemons; the logs stay for a look.
                self.keep_logs_only();
                Err(error.context(format!("daemon logs are in {}", dir.display())))
            }
        }
    }
}

/// Per-operation latencies of the 4 KiB phase.
#[derive(Debug, Default)]
struct Latencies {
    writes: Vec<Duration>,
    reads: Vec<Duration>,
}

/// One benchmark run against a started cluster.
pub(crate) struct Bench<'a> {
    pub(crate) cluster: &'a Cluster,
    pub(crate) placement: &'a Placement,
    pub(crate) chunk_size: u64,
    pub(crate) chunks: u32,
    pub(crate) clients: usize,
    pub(crate) small_writes: usize,
    pub(crate) cpu: CpuCores,
}

impl Bench<'_> {
    async fn run(&mut self) -> anyhow::Result<(Duration, Duration, Latencies)> {
        let rpc = Client::new(
            Tcp,
            flyfs_rpc::ClientConfig::default(),
            self.cluster.credentials("admin")?,
        );
        self.set_up(&rpc).await?;
        let rdma = self
            .cluster
            .rdma
            .open(self.cluster.transport)
            .context("--transport rdma: opening the RDMA device")?;
        // Over RDMA the chunks' bytes live in a buffer pool registered with
        // the device once, here, as a client's I/O buffers would: the
        // storage nodes pull each write's payload by RDMA READ.
        // Reads land the same way the other way round: the client lends a
        // registered buffer per read and the storage node RDMA WRITEs the
        // chunk into it.
        let (rdma, registered) = match rdma {
            Some(rdma) => {
                let pool = flyfs_bypass::buf::BufferPool::new(&flyfs_bypass::buf::PoolConfig {
                    classes: vec![(self.chunk_size as usize, CONTENTS)],
                    ..Default::default()
                })
                .context("allocating the chunks' buffers")?;
                rdma.register_arenas(Arc::new(pool.clone()))
                    .context("registering the chunks' buffers with the RDMA device")?;
                let replies = flyfs_bypass::buf::BufferPool::new(&flyfs_bypass::buf::PoolConfig {
                    classes: vec![(self.chunk_size as usize, 2 * self.clients + 4)],
                    ..Default::default()
                })
                .context("allocating the read buffers")?;
                rdma.register_arenas(Arc::new(replies.clone()))
                    .context("registering the read buffers with the RDMA device")?;
                let rdma = rdma.lend_replies_from(move |len| Box::new(replies.alloc(len)));
                (Some(rdma), Some(pool))
            }
            None => (None, None),
        };
        let client = StorageClient::with_transport(
            ClientConfig::new([self.cluster.mgmt_addr.clone()], ClientId(0xbe4c)),
            Tcp,
            self.cluster.credentials("client")?,
            rdma,
        );
        client
            .refresh_routing()
            .await
            .context("fetching the routing")?;
        let contents = Contents::new(self.chunk_size as usize, registered.as_ref());
        let meter = CpuMeter::start(self.cluster);
        let write = self.write_all(&client, &contents).await?;
        self.cpu.write = meter.cores();
        let meter = CpuMeter::start(self.cluster);
        let read = self.read_all(&client, &contents).await?;
        self.cpu.read = meter.cores();
        let meter = CpuMeter::start(self.cluster);
        let small = self.small_writes(&client).await?;
        self.cpu.write_4k = meter.cores();
        Ok((write, read, small))
    }

    /// Waits for the storage nodes, creates the targets and chains, waits
    /// until every replica serves.
    pub(crate) async fn set_up(&self, rpc: &Client<Tcp>) -> anyhow::Result<()> {
        let mgmt = &self.cluster.mgmt_addr;
        self.wait_for(
            "the storage nodes to register",
            |routing| {
                routing.nodes.len() == NODES as usize && routing.nodes.iter().all(|n| n.alive)
            },
            rpc,
        )
        .await?;
        create_chains(rpc, mgmt, &self.placement.chains).await?;
        let chains = self.placement.chains.len();
        self.wait_for(
            "every replica to serve",
            |routing| {
                routing.chains.len() == chains
                    && routing.nodes.iter().all(|n| n.alive)
                    && routing
                        .chains
                        .iter()
                        .all(|c| c.targets.iter().all(|t| t.state == PublicState::Serving))
            },
            rpc,
        )
        .await
    }

    /// Polls the manager's routing until `done` holds (60 s at most), and
    /// fails early when a daemon dies.
    pub(crate) async fn wait_for(
        &self,
        what: &str,
        done: impl Fn(&RoutingInfo) -> bool,
        rpc: &Client<Tcp>,
    ) -> anyhow::Result<()> {
        let cluster = self.cluster;
        let limit = Duration::from_secs(60);
        (cluster.launcher)
            .wait_for(rpc, &cluster.mgmt_addr, what, limit, done)
            .await
    }

    /// Runs `work(i)` for every `i` in `order`, `self.clients` at a time.
    async fn parallel<F, Fut>(&self, order: Arc<Vec<u32>>, work: F) -> anyhow::Result<Duration>
    where
        F: Fn(u32) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let workers: Vec<_> = (0..self.clients)
            .map(|_| {
                let next = next.clone();
                let order = order.clone();
                let work = work.clone();
                tokio::spawn(async move {
                    loop {
                        let at = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&index) = order.get(at) else {
                            return anyhow::Ok(());
                        };
                        work(index).await?;
                    }
                })
            })
            .collect();
        let mut first_error = None;
        for worker in workers {
            let result = worker.await.context("a bench worker panicked")?;
            if let Err(error) = result {
                // Stop the others soon: no index is handed out any more.
                next.store(order.len(), Ordering::Relaxed);
                first_error.get_or_insert(error);
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(started.elapsed()),
        }
    }

    /// Writes every chunk whole, in index order.
    async fn write_all(
        &self,
        client: &Arc<StorageClient<Tcp>>,
        contents: &Arc<Contents>,
    ) -> anyhow::Result<Duration> {
        let order: Arc<Vec<u32>> = Arc::new((0..self.chunks).collect());
        let chains = self.placement.chains.len() as u32;
        let chunk_size = self.chunk_size as u32;
        let client = client.clone();
        let contents = contents.clone();
        self.parallel(order, move |index| {
            let client = client.clone();
            let contents = contents.clone();
            async move {
                let chain = ChainId(index % chains + 1);
                let (data, crc) = contents.of(index);
                let rsp = client
                    .write(chain, chunk(index), 0, data, chunk_size)
                    .await
                    .with_context(|| format!("writing chunk {index} on {chain}"))?;
                // The chunk's CRC as the replicas computed it: the chain
                // stored what was sent.
                ensure!(
                    rsp.chunk_len == chunk_size && rsp.chunk_crc == crc,
                    "chunk {index} on {chain}: stored {} bytes with CRC {:#010x}, sent {chunk_size} \
                     with CRC {crc:#010x}",
                    rsp.chunk_len,
                    rsp.chunk_crc
                );
                Ok(())
            }
        })
        .await
    }

    /// Reads every chunk back in a random order and checks its CRC.
    async fn read_all(
        &self,
        client: &Arc<StorageClient<Tcp>>,
        contents: &Arc<Contents>,
    ) -> anyhow::Result<Duration> {
        let mut order: Vec<u32> = (0..self.chunks).collect();
        order.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(0x5eed));
        let chunk_size = self.chunk_size as u32;
        let client = client.clone();
        let contents = contents.clone();
        let placement_chains = self.placement.chains.len() as u32;
        self.parallel(Arc::new(order), move |index| {
            let client = client.clone();
            let contents = contents.clone();
            async move {
                let chain = ChainId(index % placement_chains + 1);
                let read = client
                    .read(chain, chunk(index), 0, chunk_size)
                    .await
                    .with_context(|| format!("reading chunk {index} on {chain}"))?;
                let (_, crc) = contents.of(index);
                let actual = crc32c::crc32c(&read.data);
                ensure!(
                    read.data.len() == chunk_size as usize && actual == crc,
                    "chunk {index} on {chain}: read {} bytes with CRC {actual:#010x}, wrote \
                     {chunk_size} with CRC {crc:#010x}",
                    read.data.len()
                );
                Ok(())
            }
        })
        .await
    }

    /// 4 KiB writes at random 4 KiB-aligned offsets of random chunks, one
    /// at a time and each timed; then every written range read back.
    async fn small_writes(&self, client: &Arc<StorageClient<Tcp>>) -> anyhow::Result<Latencies> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x4b1b);
        // Fresh bytes for every write: slices of one random buffer.
        let mut source = vec![0u8; SMALL_WRITE_BYTES * self.small_writes.max(1)];
        rng.fill(&mut source[..]);
        let source = Bytes::from(source);
        let blocks = (self.chunk_size as usize / SMALL_WRITE_BYTES) as u32;
        let chunk_size = self.chunk_size as u32;
        let mut latencies = Latencies::default();
        // The latest bytes of each written (chunk, offset).
        let mut written: HashMap<(u32, u32), Bytes> = HashMap::new();
        for n in 0..self.small_writes {
            let index = rng.random_range(0..self.chunks);
            let offset = rng.random_range(0..blocks) * SMALL_WRITE_BYTES as u32;
            let data = source.slice(n * SMALL_WRITE_BYTES..(n + 1) * SMALL_WRITE_BYTES);
            let chain = self.placement.chain_of(index);
            let start = Instant::now();
            let rsp = client
                .write(chain, chunk(index), offset, data.clone(), chunk_size)
                .await
                .with_context(|| format!("4 KiB write at {offset} of chunk {index} on {chain}"))?;
            latencies.writes.push(start.elapsed());
            ensure!(
                rsp.chunk_len == chunk_size,
                "chunk {index}: {} bytes long after a 4 KiB write inside it",
                rsp.chunk_len
            );
            written.insert((index, offset), data);
        }
        let mut ranges: Vec<_> = written.into_iter().collect();
        ranges.sort_by_key(|&(key, _)| key);
        for ((index, offset), data) in ranges {
            let chain = self.placement.chain_of(index);
            let start = Instant::now();
            let read = client
                .read(chain, chunk(index), offset, SMALL_WRITE_BYTES as u32)
                .await
                .with_context(|| format!("4 KiB read at {offset} of chunk {index} on {chain}"))?;
            latencies.reads.push(start.elapsed());
            ensure!(
                read.data == data,
                "chunk {index} at {offset}: read back {} bytes that are not what was written",
                read.data.len()
            );
        }
        Ok(latencies)
    }
}

fn chunk(index: u32) -> ChunkId {
    ChunkId::new(BENCH_INODE, index)
}

/// The chunks' bytes: [`CONTENTS`] distinct buffers that chunks take in
/// turn, each with its CRC32C, computed once so that neither generating data
/// nor hashing it counts against the write phase.
#[derive(Debug)]
struct Contents {
    chunks: Vec<(Bytes, u32)>,
}

impl Contents {
    /// In `pool`'s buffers when one is given (registered for RDMA).
    fn new(chunk_bytes: usize, pool: Option<&flyfs_bypass::buf::BufferPool>) -> Arc<Contents> {
        let chunks = (0..CONTENTS)
            .map(|n| {
                let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (n as u64 + 1);
                let mut data = Vec::with_capacity(chunk_bytes);
                while data.len() < chunk_bytes {
                    // xorshift64: cheap, and no two buffers start the same.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    data.extend_from_slice(&state.to_le_bytes());
                }
                data.truncate(chunk_bytes);
                let crc = crc32c::crc32c(&data);
                let bytes = match pool {
                    Some(pool) => {
                        let mut buf = pool.alloc(chunk_bytes);
                        buf.copy_from_slice(&data);
                        Bytes::from_owner(buf)
                    }
                    None => Bytes::from(data),
                };
                (bytes, crc)
            })
            .collect();
        Arc::new(Contents { chunks })
    }

    fn of(&self, index: u32) -> (Bytes, u32) {
        let (data, crc) = &self.chunks[index as usize % self.chunks.len()];
        (data.clone(), *crc)
    }
}

/// One admin operation on the manager; a refusal is an error.
pub(crate) async fn mutate<M>(rpc: &Client<Tcp>, mgmt: &str, req: &M::Req) -> anyhow::Result<()>
where
    M: Method<Rsp = Result<(), MgmtError>>,
    M::Req: std::fmt::Debug,
{
    let (rsp, _) = rpc
        .call::<M>(mgmt, req, Bytes::new(), &CallOptions::default())
        .await
        .with_context(|| format!("{req:?}: cannot reach the manager at {mgmt}"))?;
    rsp.with_context(|| format!("{req:?}: the manager refused"))
}

/// Nearest-rank percentile in microseconds (`q` = 1.0 is the maximum).
pub(crate) fn percentile_us(samples: &[Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

/// CPU time of this process and of each daemon since a phase began.
struct CpuMeter {
    started: Instant,
    /// (name, pid or None for this process, CPU seconds at the start)
    before: Vec<(String, Option<u32>, f64)>,
}

impl CpuMeter {
    fn start(cluster: &Cluster) -> CpuMeter {
        let mut before = vec![("client".to_string(), None, cpu_seconds(None))];
        for (name, pid) in cluster.launcher.pids() {
            before.push((name, Some(pid), cpu_seconds(Some(pid))));
        }
        CpuMeter {
            started: Instant::now(),
            before,
        }
    }

    /// Cores busy per process: CPU seconds over wall seconds since `start`.
    fn cores(&self) -> HashMap<String, f64> {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        self.before
            .iter()
            .map(|(name, pid, before)| (name.clone(), (cpu_seconds(*pid) - before) / wall))
            .collect()
    }
}

/// User plus system CPU seconds of a process (this one for `None`); 0
/// when it cannot be read (the process is gone).
fn cpu_seconds(pid: Option<u32>) -> f64 {
    supervisor::cpu_seconds(pid.unwrap_or_else(std::process::id)).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_put_replicas_on_distinct_nodes_and_rotate_heads() {
        let placement = Placement::new(6, 3);
        for nodes in &placement.chains {
            let mut distinct = nodes.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 3, "{nodes:?}");
        }
        let heads: Vec<u32> = placement.chains.iter().map(|nodes| nodes[0]).collect();
        assert_eq!(heads, [1, 2, 3, 1, 2, 3]);
        assert_eq!(placement.chain_of(0), ChainId(1));
        assert_eq!(placement.chain_of(7), ChainId(2));
    }

    #[test]
    fn devices_hold_their_nodes_share() {
        let mib = 1u64 << 20;
        // Three replicas: every node holds every chunk.
        assert_eq!(
            Placement::new(6, 3).node_bytes_max(600 * mib, mib),
            600 * mib
        );
        // One replica over six chains: a third each.
        assert_eq!(
            Placement::new(6, 1).node_bytes_max(600 * mib, mib),
            200 * mib
        );
        // Uneven: chunks 0..7 over 2 one-replica chains on nodes 1 and 2.
        assert_eq!(Placement::new(2, 1).node_bytes_max(7 * mib, mib), 4 * mib);
        let device = Placement::new(6, 3).device_bytes(1024 * mib, mib);
        assert!(device >= 1024 * mib + DEVICE_SLACK_BYTES);
        assert_eq!(device % mib, 0);
    }

    #[test]
    fn default_size_shrinks_to_the_free_space() {
        let mib = 1u64 << 20;
        let placement = Placement::new(6, 3);
        assert_eq!(
            default_size(&placement, mib, 1 << 40).expect("plenty"),
            SIZE_DEFAULT
        );
        let small = default_size(&placement, mib, 8 << 30).expect("8 GiB free");
        assert!(small < SIZE_DEFAULT);
        assert!(placement.disk_bytes(small, mib) <= 4 << 30);
        assert!(default_size(&placement, mib, 1 << 30).is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile_us(&samples, 0.50), 50.0);
        assert_eq!(percentile_us(&samples, 0.99), 99.0);
        assert_eq!(percentile_us(&samples, 1.0), 100.0);
        assert_eq!(percentile_us(&[], 0.5), 0.0);
    }

    #[test]
    fn cpu_seconds_of_this_process_is_readable() {
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_seconds(None) > 0.0);
    }
}
