//! `flyfs up` and `flyfs down`: a whole single-machine cluster in one
//! command. `up` lays out a data directory, formats three file-backed
//! devices (fresh ones only), writes every daemon's config, starts the
//! cluster manager, three storage nodes, the metadata service and the FUSE
//! mount as detached processes of this executable, builds six three-replica
//! chains on the first start, and waits until each daemon is ready. Running
//! it again starts whatever is not running and changes nothing else; `down`
//! stops everything in the reverse order (the mount first, so that it
//! flushes while the cluster still serves).
//!
//! The data directory (default `/var/tmp/flyfs`):
//!
//! ```text
//! etc/cluster.toml    the chosen base port and mount point (reused by later runs)
//! etc/NAME.toml       each daemon's config, rewritten on every `up`
//! log/NAME.log        each daemon's output (appended)
//! run/NAME.pid        each running daemon's pid
//! devices/storageN.img  the storage nodes' devices (sparse files)
//! mgmtd/              the manager's cluster record
//! meta/               the metadata service's embedded store
//! tls/                the cluster CA (ca.pem, ca.key) and the credentials of
//!                     every daemon, the mount and the local admin
//!                     (NAME.pem, NAME.key; admin.pem, admin.key)
//! ```
//!
//! Every connection is mutual TLS (docs/security.md): `up` makes the CA and
//! every credential on the first run and reuses them afterwards. The local
//! admin acts as the owner of the data directory (`flyfs admin --data`).
//!
//! Ports, from the base port B (default 7000): the manager B, the metadata
//! service B+1, storage nodes B+2..=B+4; Prometheus metrics endpoints
//! B+10 (manager), B+11 (metadata), B+12..=B+14 (storage), B+15 (mount).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use flyfs_chunk_engine::{EngineError, FormatOptions};
use flyfs_craq::placement::{self, PlacementSpec, PlannedChain};
use flyfs_fuse::mountpoint::{lazy_unmount, mounted_at};
use flyfs_proto::ids::{ChainId, ChainTableId, InodeId, NodeId};
use flyfs_proto::wire::meta::{Statfs, StatfsReq};
use flyfs_proto::wire::mgmt::{
    CreateChain, CreateChainReq, CreateChainTable, CreateChainTableReq, CreateTarget,
    CreateTargetReq, PublicState, RoutingInfo,
};
use flyfs_proto::wire::storage::{LastChunk, LastChunkReq};
use serde::{Deserialize, Serialize};

use crate::admin::Admin;
use flyfs_deploy::config::{
    ConfigFile, ManagerAddrs, MetaDaemonConfig, MgmtdConfig, MountConfig, RdmaConfig,
    StorageDaemonConfig, TlsConfig, TransportKind,
};
use flyfs_deploy::supervisor::{self, Daemon, Stopped};
use flyfs_proto::auth::Principal;
use flyfs_rpc::ClusterCa;

/// The cluster name in the identities of a `flyfs up` cluster.
const CLUSTER_NAME: &str = "flyfs";
const DEFAULT_DATA: &str = "/var/tmp/flyfs";
const DEFAULT_MOUNT: &str = "/mnt/flyfs";
const DEFAULT_PORT: u16 = 7000;
/// Storage nodes (and so at most as many replicas per chain).
const NODES: u32 = 3;
/// Replicas per chain unless `--replicas` says otherwise.
const DEFAULT_REPLICAS: u32 = NODES;
/// Chains, all in chain table 1, placed by craq's planner (heads spread
/// evenly over the nodes).
const CHAINS: u32 = 6;
const CHAIN_TABLE: u32 = 1;
/// The root's default layout: 1 MiB chunks (the devices hold chunks up to
/// 4 MiB), each file striped over every chain.
const CHUNK_SIZE: u32 = 1 << 20;
const STRIPE: u32 = CHAINS;
const CHUNK_SIZE_MAX: u64 = 4 << 20;

#[derive(clap::Args, Debug)]
pub(crate) struct UpArgs {
    /// Directory for configs, devices, data, logs and pid files.
    #[arg(long, default_value = DEFAULT_DATA)]
    data: PathBuf,
    /// Where to mount flyfs; created if missing [default: /mnt/flyfs, or
    /// what this data directory used before].
    #[arg(long)]
    mount: Option<PathBuf>,
    /// First port: manager PORT, metadata PORT+1, storage PORT+2..=PORT+4,
    /// metrics endpoints PORT+10..=PORT+15 [default: 7000, or what this data
    /// directory used before].
    #[arg(long)]
    port: Option<u16>,
    /// Size of each of the three file-backed devices (sparse); only used
    /// when a device is created.
    #[arg(long, default_value = "4GiB", value_parser = flyfs_benches::size::parse)]
    device_size: u64,
    /// Replicas per chain, 1 to 3, fixed when the chains are created
    /// [default: 3, or what this data directory used before].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(NODES)))]
    replicas: Option<u32>,
    /// Start no FUSE mount (a server without FUSE): storage and metadata only.
    #[arg(long)]
    no_mount: bool,
    /// How long to wait for each daemon to become ready, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// How the daemons and the mount reach the manager and the storage
    /// nodes: `tcp` or `rdma` (on `--rdma-device`). Their servers then take
    /// RDMA and TCP connections; the mount reaches the metadata service,
    /// and the admin tool every daemon, over TCP.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "rdma"])]
    transport: String,
    /// The RDMA device, with `--transport rdma` (`ibv_devices` lists them).
    #[arg(long)]
    rdma_device: Option<String>,
    /// The GID index of the RDMA device's port (RoCE v2: the one holding
    /// the interface's IPv4 address).
    #[arg(long, default_value_t = 0)]
    rdma_gid_index: u8,
}

#[derive(clap::Args, Debug)]
pub(crate) struct DownArgs {
    /// The data directory `flyfs up` used.
    #[arg(long, default_value = DEFAULT_DATA)]
    data: PathBuf,
    /// How long each daemon gets to exit after SIGTERM before SIGKILL, in
    /// seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

/// `etc/cluster.toml`: what later runs on the same data directory reuse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    port: u16,
    mount_point: PathBuf,
    /// Absent in files written before `--replicas` existed: three.
    #[serde(default = "default_replicas")]
    replicas: u32,
}

fn default_replicas() -> u32 {
    DEFAULT_REPLICAS
}

/// Where a `flyfs up` cluster lives on this machine: how its data directory
/// is laid out, its ports and its mount point.
#[derive(Clone, Debug)]
struct ClusterLayout {
    data: PathBuf,
    port: u16,
    mount_point: PathBuf,
    replicas: u32,
    /// The manager's and storage nodes' transport and RDMA device.
    transport: TransportKind,
    rdma: RdmaConfig,
}

/// What one daemon is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Mgmtd,
    Meta,
    Storage(u32),
    Mount,
}

impl Kind {
    /// In start order.
    fn all() -> Vec<Kind> {
        let mut kinds = vec![Kind::Mgmtd];
        kinds.extend((1..=NODES).map(Kind::Storage));
        kinds.extend([Kind::Meta, Kind::Mount]);
        kinds
    }

    fn name(self) -> String {
        match self {
            Kind::Mgmtd => "mgmtd".into(),
            Kind::Meta => "meta".into(),
            Kind::Storage(n) => format!("storage{n}"),
            Kind::Mount => "mount".into(),
        }
    }

    fn subcommand(self) -> &'static str {
        match self {
            Kind::Mgmtd => "mgmtd",
            Kind::Meta => "meta",
            Kind::Storage(_) => "storage",
            Kind::Mount => "mount",
        }
    }
}

impl ClusterLayout {
    fn etc(&self) -> PathBuf {
        self.data.join("etc")
    }

    fn config(&self, kind: Kind) -> PathBuf {
        self.etc().join(format!("{}.toml", kind.name()))
    }

    fn device(&self, node: u32) -> PathBuf {
        self.data.join("devices").join(format!("storage{node}.img"))
    }

    /// The RPC port, if the daemon serves RPCs.
    fn rpc_port(&self, kind: Kind) -> Option<u16> {
        match kind {
            Kind::Mgmtd => Some(self.port),
            Kind::Meta => Some(self.port + 1),
            Kind::Storage(n) => Some(self.port + 1 + n as u16),
            Kind::Mount => None,
        }
    }

    fn metrics_port(&self, kind: Kind) -> u16 {
        self.port
            + match kind {
                Kind::Mgmtd => 10,
                Kind::Meta => 11,
                Kind::Storage(n) => 11 + n as u16,
                Kind::Mount => 15,
            }
    }

    fn addr(port: u16) -> String {
        format!("127.0.0.1:{port}")
    }

    /// Runtime workers for each server daemon: they share this machine's
    /// cores, so each gets its share of them (at least one). With a worker
    /// per core in every daemon, each request woke idle workers of several
    /// runtimes competing for the same cores; on 2 cores, one worker each
    /// made small-file and 4 KiB requests through the mount faster without
    /// slowing 1 MiB ones (the commit that made it has the measurement).
    /// The mount keeps one per core: it carries the client's whole load.
    fn runtime_threads() -> usize {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let servers = Kind::all()
            .iter()
            .filter(|kind| **kind != Kind::Mount)
            .count();
        (cores / servers).max(1)
    }

    fn mgmt(&self) -> String {
        Self::addr(self.port)
    }

    fn meta(&self) -> String {
        Self::addr(self.port + 1)
    }

    fn daemon(&self, kind: Kind) -> anyhow::Result<Daemon> {
        let program = std::env::current_exe().context("finding this executable")?;
        Ok(Daemon::flyfs(
            &kind.name(),
            &program,
            kind.subcommand(),
            &self.config(kind),
            &self.data.join("log"),
            &self.data.join("run"),
        ))
    }

    fn tls_dir(&self) -> PathBuf {
        self.data.join("tls")
    }

    /// `[tls]` of a daemon's config: `tls/NAME.pem` and `.key`.
    fn tls(&self, kind: Kind) -> Option<TlsConfig> {
        Some(TlsConfig::in_dir(&self.tls_dir(), &kind.name()))
    }

    /// The CA and the credentials of every daemon, the mount and the local
    /// admin under `tls/`: made once, reused by later runs.
    fn ensure_credentials(&self) -> anyhow::Result<()> {
        let dir = self.tls_dir();
        let ca = ClusterCa::load_or_init(&dir, CLUSTER_NAME)
            .with_context(|| format!("making the cluster CA in {}", dir.display()))?;
        for kind in Kind::all() {
            let principal = match kind {
                Kind::Mgmtd => Principal::Mgmt(kind.name()),
                Kind::Storage(node) => Principal::Storage(NodeId(node)),
                Kind::Meta => Principal::Meta(kind.name()),
                Kind::Mount => Principal::Client(kind.name()),
            };
            ca.ensure_credentials(principal, &dir, &kind.name())?;
        }
        // The local admin acts as whoever owns the data directory: the
        // user who ran `flyfs up` the first time.
        let owner = std::fs::metadata(&self.data)
            .with_context(|| format!("reading the owner of {}", self.data.display()))?;
        let admin = Principal::Admin {
            name: String::from("admin"),
            uid: owner.uid(),
            gid: owner.gid(),
        };
        ca.ensure_credentials(admin, &dir, "admin")?;
        Ok(())
    }

    /// Every daemon's config, as its daemon reads it.
    fn config_text(&self, kind: Kind) -> String {
        let metrics_listen = Some(Self::addr(self.metrics_port(kind)));
        let body = match kind {
            Kind::Mgmtd => {
                let mut config = MgmtdConfig::new(self.data.join("mgmtd"));
                config.runtime_threads = Self::runtime_threads();
                config.listen = self.mgmt();
                config.metrics_listen = metrics_listen;
                config.tls = self.tls(kind);
                config.transport = self.transport;
                config.rdma = self.rdma.clone();
                config.to_toml()
            }
            Kind::Storage(node) => {
                let mut config = StorageDaemonConfig::new(node, vec![self.device(node)]);
                config.runtime_threads = Self::runtime_threads();
                config.listen = Self::addr(self.rpc_port(kind).unwrap_or_default());
                config.mgmt = ManagerAddrs::one(self.mgmt());
                config.metrics_listen = metrics_listen;
                config.tls = self.tls(kind);
                config.transport = self.transport;
                config.rdma = self.rdma.clone();
                config.to_toml()
            }
            Kind::Meta => {
                let mut config = MetaDaemonConfig::new(self.data.join("meta"));
                config.runtime_threads = Self::runtime_threads();
                config.listen = self.meta();
                config.mgmt = ManagerAddrs::one(self.mgmt());
                config.chain_table = CHAIN_TABLE;
                config.chunk_size = CHUNK_SIZE;
                config.stripe = STRIPE;
                config.metrics_listen = metrics_listen;
                config.tls = self.tls(kind);
                config.transport = self.transport;
                config.rdma = self.rdma.clone();
                config.to_toml()
            }
            Kind::Mount => {
                let mut config = MountConfig::new(&self.mount_point);
                // sun_path holds 107 bytes: a deeper data directory gets a
                // mount without native I/O rather than no mount.
                let socket = self.data.join("run").join("native.sock");
                if socket.as_os_str().len() < 108 {
                    config.native_socket = Some(socket);
                }
                config.mgmt = ManagerAddrs::one(self.mgmt());
                config.meta = vec![self.meta()];
                config.metrics_listen = metrics_listen;
                config.tls = self.tls(kind);
                config.transport = self.transport;
                config.rdma = self.rdma.clone();
                config.to_toml()
            }
        };
        format!(
            "# Written by `flyfs up` (rewritten on every run: edit the flags, not this file).\n{body}"
        )
    }
}

/// The data directory, absolute (the daemons run from anywhere).
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

pub(crate) fn up(args: &UpArgs) -> anyhow::Result<()> {
    let data = absolute(&args.data)?;
    for sub in ["etc", "log", "run", "devices", "mgmtd", "meta"] {
        let dir = data.join(sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let cluster_file = data.join("etc").join("cluster.toml");
    let before = read_cluster_file(&cluster_file)?;
    let port = args
        .port
        .or(before.as_ref().map(|c| c.port))
        .unwrap_or(DEFAULT_PORT);
    if port.checked_add(15).is_none() || port == 0 {
        bail!("--port {port}: the cluster needs ports {port} to {port}+15");
    }
    let mount_point = match &args.mount {
        Some(mount) => absolute(mount)?,
        None => before
            .as_ref()
            .map_or_else(|| PathBuf::from(DEFAULT_MOUNT), |c| c.mount_point.clone()),
    };
    let replicas = args
        .replicas
        .or(before.as_ref().map(|c| c.replicas))
        .unwrap_or(DEFAULT_REPLICAS);
    if let Some(before) = &before
        && before.replicas != replicas
    {
        bail!(
            "the cluster in {} was created with {} replicas per chain; \
             --replicas {replicas} needs a new --data directory",
            data.display(),
            before.replicas
        );
    }
    let (transport, rdma) = match (args.transport.as_str(), &args.rdma_device) {
        ("rdma", None) => {
            bail!("--transport rdma needs --rdma-device (ibv_devices lists the devices)")
        }
        ("rdma", Some(device)) => (
            TransportKind::Rdma,
            RdmaConfig {
                device: device.clone(),
                gid_index: args.rdma_gid_index,
                ..RdmaConfig::default()
            },
        ),
        _ => (TransportKind::Tcp, RdmaConfig::default()),
    };
    let layout = ClusterLayout {
        data: data.clone(),
        port,
        mount_point,
        replicas,
        transport,
        rdma,
    };
    let mut daemons = BTreeMap::new();
    for kind in Kind::all() {
        daemons.insert(kind.name(), layout.daemon(kind)?);
    }
    let running = |kind: Kind| daemons[&kind.name()].running();
    // A running cluster keeps its ports and mount point until it is down.
    if let Some(before) = &before
        && (before.port != layout.port || before.mount_point != layout.mount_point)
        && let Some(kind) = Kind::all().into_iter().find(|k| running(*k).is_some())
    {
        bail!(
            "the cluster in {} runs on port {} with mount point {} ({} is running); \
             stop it first (`flyfs down --data {}`) to change them",
            data.display(),
            before.port,
            before.mount_point.display(),
            kind.name(),
            data.display()
        );
    }
    let wanted: Vec<Kind> = Kind::all()
        .into_iter()
        .filter(|k| !(args.no_mount && *k == Kind::Mount))
        .collect();
    // Ports of the daemons to start must be free (those of our running
    // daemons are theirs).
    for kind in &wanted {
        if running(*kind).is_some() {
            continue;
        }
        let ports = layout
            .rpc_port(*kind)
            .into_iter()
            .chain([layout.metrics_port(*kind)]);
        for port in ports {
            if let Err(error) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                bail!(
                    "port {port} (for {}) is in use by another program ({error}); \
                     choose another range with --port (the cluster uses --port to --port+15)",
                    kind.name()
                );
            }
        }
    }
    supervisor::write_atomically(
        &cluster_file,
        toml::to_string(&ClusterFile {
            port: layout.port,
            mount_point: layout.mount_point.clone(),
            replicas: layout.replicas,
        })?
        .as_bytes(),
    )?;
    // A running node's device is its own: left alone.
    for node in 1..=NODES {
        if running(Kind::Storage(node)).is_none() {
            ensure_device(&layout.device(node), args.device_size)?;
        }
    }
    layout.ensure_credentials()?;
    for kind in Kind::all() {
        supervisor::write_atomically(&layout.config(kind), layout.config_text(kind).as_bytes())?;
    }
    let timeout = Duration::from_secs(args.timeout);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut starter = Starter {
        daemons: &daemons,
        children: BTreeMap::new(),
        started: Vec::new(),
        timeout,
    };
    let admin_credentials = crate::certs::admin(None, Some(&layout.data))?;
    let caller = crate::admin::acting_user(&admin_credentials)?;
    let admin = Admin::new(&[layout.mgmt()], Duration::from_secs(2), admin_credentials);

    starter.start(Kind::Mgmtd)?;
    runtime.block_on(
        starter.wait(Kind::Mgmtd, "the cluster manager to answer", || async {
            admin.routing().await.map(drop)
        }),
    )?;
    for node in 1..=NODES {
        starter.start(Kind::Storage(node))?;
    }
    let nodes: Vec<Kind> = (1..=NODES).map(Kind::Storage).collect();
    runtime.block_on(
        starter.wait_all(&nodes, "the storage nodes to register", || async {
            let routing = admin.routing().await?;
            let alive = routing.nodes.iter().filter(|n| n.alive).count();
            if alive < NODES as usize {
                bail!("{alive} of {NODES} storage nodes registered and alive");
            }
            Ok(())
        }),
    )?;
    let created = runtime.block_on(ensure_chains(&admin, layout.replicas))?;
    runtime.block_on(starter.wait_all(&nodes, "every target to serve", || async {
        let routing = admin.routing().await?;
        let not_serving: Vec<String> = routing
            .targets
            .iter()
            .filter(|t| t.chain.is_some() && t.state != PublicState::Serving)
            .map(|t| format!("{} {}", t.id.0, t.state))
            .collect();
        if !not_serving.is_empty() {
            bail!("targets not serving yet: {}", not_serving.join(", "));
        }
        // The manager's word is not enough: a node learns of a new target
        // with its next heartbeat, and until then answers "no target of
        // this chain" to every request.
        let (rpc, options) = admin.rpc();
        for chain in &routing.chains {
            let Some(tail) = chain.targets.last() else {
                continue;
            };
            let node = routing
                .target(tail.target)
                .and_then(|t| routing.node(t.node))
                .with_context(|| format!("the node of target {}", tail.target.0))?;
            let req = LastChunkReq {
                chain: chain.id,
                chain_version: chain.version,
                inode: InodeId(0),
            };
            let (rsp, _) = rpc
                .call::<LastChunk>(&node.addr, &req, Bytes::new(), options)
                .await?;
            rsp.map_err(|e| anyhow::anyhow!("{} at {}: {e}", chain.id, node.addr))?;
        }
        Ok(())
    }))?;
    starter.start(Kind::Meta)?;
    let (rpc, options) = admin.rpc();
    let meta = layout.meta();
    // As the admin credential's uid, the only caller it may name.
    let statfs = StatfsReq { user: caller };
    runtime.block_on(
        starter.wait(Kind::Meta, "the metadata service to answer", || async {
            let (rsp, _) = rpc
                .call::<Statfs>(&meta, &statfs, Bytes::new(), options)
                .await?;
            rsp.map(drop).map_err(|e| anyhow::anyhow!("statfs: {e}"))
        }),
    )?;
    if !args.no_mount {
        prepare_mount_point(&layout.mount_point, daemons["mount"].running().is_some())?;
        starter.start(Kind::Mount)?;
        let point = layout.mount_point.clone();
        runtime.block_on(
            starter.wait(Kind::Mount, "the FUSE mount to appear", || async {
                if mounted_at(&point)?.is_some_and(|fs| fs.is_flyfs()) {
                    Ok(())
                } else {
                    bail!("{} is not a flyfs FUSE mount yet", point.display())
                }
            }),
        )?;
    }
    let started = std::mem::take(&mut starter.started);
    drop(starter);
    print_summary(&layout, &daemons, &wanted, &started, created, args.no_mount);
    Ok(())
}

/// Starts daemons and waits for them, noticing one that exits early.
struct Starter<'a> {
    daemons: &'a BTreeMap<String, Daemon>,
    /// The daemons this run started, to notice an early exit.
    children: BTreeMap<String, Child>,
    /// Their names, in start order.
    started: Vec<String>,
    timeout: Duration,
}

impl Starter<'_> {
    /// Starts `kind` unless it runs already.
    fn start(&mut self, kind: Kind) -> anyhow::Result<()> {
        let daemon = &self.daemons[&kind.name()];
        if daemon.running().is_some() {
            return Ok(());
        }
        let child = daemon.spawn_detached()?;
        self.children.insert(daemon.name.clone(), child);
        self.started.push(daemon.name.clone());
        Ok(())
    }

    /// Polls `ready` until it succeeds, `kind` exits or the timeout passes;
    /// the error names the daemon and its log.
    async fn wait<F, Fut>(&mut self, kind: Kind, what: &str, ready: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        self.wait_all(&[kind], what, ready).await
    }

    async fn wait_all<F, Fut>(
        &mut self,
        kinds: &[Kind],
        what: &str,
        mut ready: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        // Tokio's clock, like every deadline in async code (flyfs-time).
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let last = match ready().await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            for kind in kinds {
                let daemon = &self.daemons[&kind.name()];
                if let Some(child) = self.children.get_mut(&daemon.name)
                    && let Some(status) = child.try_wait().context("waiting for a daemon")?
                {
                    bail!(
                        "{} exited ({status}) while waiting for {what}; see its log {}{}",
                        daemon.name,
                        daemon.log.display(),
                        log_tail(daemon)
                    );
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let names: Vec<String> = kinds.iter().map(|k| k.name()).collect();
                let logs: Vec<String> = kinds
                    .iter()
                    .map(|k| self.daemons[&k.name()].log.display().to_string())
                    .collect();
                let tail = match kinds {
                    [kind] => log_tail(&self.daemons[&kind.name()]),
                    _ => String::new(),
                };
                bail!(
                    "{} not ready after {:?}: timed out waiting for {what} (last: {last:#}); \
                     see {}{tail}",
                    names.join(", "),
                    self.timeout,
                    logs.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What a dead or stuck daemon's log says, indented, for an error
/// message: its last error above any backtrace, else its last lines.
fn log_tail(daemon: &Daemon) -> String {
    let tail = daemon.log_failure(8);
    if tail.is_empty() {
        return String::new();
    }
    format!("; its log says:\n    {}", tail.join("\n    "))
}

fn read_cluster_file(path: &Path) -> anyhow::Result<Option<ClusterFile>> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is invalid", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Creates and formats a new device; leaves a formatted one alone (the
/// engine refuses to format over itself, which is how one is recognised).
fn ensure_device(path: &Path, size: u64) -> anyhow::Result<()> {
    let options = FormatOptions {
        chunk_size_max: CHUNK_SIZE_MAX,
        ..FormatOptions::default()
    };
    let size = if path.exists() {
        None
    } else {
        if !size.is_multiple_of(4096) {
            bail!("--device-size {size} is not a multiple of 4096");
        }
        Some(size)
    };
    match crate::format(path.to_path_buf(), size, &options) {
        Ok(()) => Ok(()),
        Err(error)
            if matches!(
                error.downcast_ref::<EngineError>(),
                Some(EngineError::AlreadyFormatted { damaged: false, .. })
            ) =>
        {
            Ok(())
        }
        Err(error) => Err(error).with_context(|| format!("preparing device {}", path.display())),
    }
}

/// The chain table of a `flyfs up` cluster, as `flyfs admin placement`
/// plans one: its nodes with one disk each, heads spread evenly.
fn plan_chains(replicas: u32) -> anyhow::Result<Vec<PlannedChain>> {
    let spec = PlacementSpec {
        nodes: (1..=NODES).map(NodeId).collect(),
        disks_per_node: 1,
        replicas,
        chains: CHAINS,
        first_chain: 1,
        seed: 0,
    };
    Ok(placement::plan(&spec)?.chains)
}

/// Creates whatever of the targets, chains and chain table is missing
/// (all of it on the first start, nothing afterwards); whether it created
/// anything.
async fn ensure_chains(admin: &Admin, replicas: u32) -> anyhow::Result<bool> {
    let routing: RoutingInfo = admin.routing().await?;
    let mut created = false;
    for chain in plan_chains(replicas)? {
        if routing.chains.iter().any(|c| c.id == chain.chain) {
            continue;
        }
        for planned in &chain.targets {
            if routing.target(planned.target).is_none() {
                let req = CreateTargetReq {
                    target: planned.target,
                    node: planned.node,
                    disk: planned.disk,
                };
                admin.mutate::<CreateTarget>("create-target", &req).await?;
            }
        }
        let req = CreateChainReq {
            chain: chain.chain,
            targets: chain.targets.iter().map(|t| t.target).collect(),
        };
        admin.mutate::<CreateChain>("create-chain", &req).await?;
        created = true;
    }
    if !routing
        .tables
        .iter()
        .any(|t| t.id == ChainTableId(CHAIN_TABLE))
    {
        let req = CreateChainTableReq {
            table: ChainTableId(CHAIN_TABLE),
            chains: (1..=CHAINS).map(ChainId).collect(),
        };
        admin
            .mutate::<CreateChainTable>("create-table", &req)
            .await?;
        created = true;
    }
    Ok(created)
}

/// Makes sure `point` exists and is free for the mount daemon: a flyfs
/// mount left behind by a mount daemon that died is unmounted (lazily).
fn prepare_mount_point(point: &Path, daemon_running: bool) -> anyhow::Result<()> {
    if daemon_running {
        return Ok(());
    }
    if let Some(fs) = mounted_at(point)? {
        if !fs.is_flyfs() {
            bail!(
                "{} already has a {} file system mounted on it; choose another --mount",
                point.display(),
                fs.fstype
            );
        }
        println!(
            "{}: unmounting a flyfs mount whose daemon is gone",
            point.display()
        );
        lazy_unmount(point)?;
    }
    std::fs::create_dir_all(point).with_context(|| format!("creating {}", point.display()))
}

fn print_summary(
    layout: &ClusterLayout,
    daemons: &BTreeMap<String, Daemon>,
    wanted: &[Kind],
    started: &[String],
    created: bool,
    no_mount: bool,
) {
    println!("flyfs is up: data in {}", layout.data.display());
    if no_mount {
        println!("not mounted (--no-mount)");
    } else {
        println!("mounted at {}", layout.mount_point.display());
    }
    if created {
        println!(
            "created {CHAINS} chains of {} replicas in chain table {CHAIN_TABLE} \
             (chunks {} KiB, files striped over {STRIPE} chains)",
            layout.replicas,
            CHUNK_SIZE >> 10
        );
    }
    println!();
    println!(
        "  {:<9} {:<16} {:>8}  {:<8} {:<37} log",
        "daemon", "address", "pid", "", "metrics"
    );
    for kind in wanted {
        let daemon = &daemons[&kind.name()];
        let address = match kind {
            Kind::Mount => layout.mount_point.display().to_string(),
            _ => ClusterLayout::addr(layout.rpc_port(*kind).unwrap_or_default()),
        };
        let pid = daemon
            .running()
            .map_or_else(|| "-".to_string(), |p| p.to_string());
        let how = if started.contains(&daemon.name) {
            "started"
        } else {
            "running"
        };
        println!(
            "  {:<9} {:<16} {:>8}  {:<8} {:<37} {}",
            daemon.name,
            address,
            pid,
            how,
            format!(
                "http://{}/metrics",
                ClusterLayout::addr(layout.metrics_port(*kind))
            ),
            daemon.log.display()
        );
    }
    println!();
    println!(
        "status:  flyfs admin --mgmt {} status",
        ClusterLayout::addr(layout.port)
    );
    println!(
        "files:   flyfs admin --meta {} ls /",
        ClusterLayout::addr(layout.port + 1)
    );
    println!("stop:    flyfs down --data {}", layout.data.display());
}

pub(crate) fn down(args: &DownArgs) -> anyhow::Result<()> {
    let data = absolute(&args.data)?;
    let Some(cluster) = read_cluster_file(&data.join("etc").join("cluster.toml"))? else {
        println!(
            "nothing to stop: {} holds no cluster of `flyfs up`",
            data.display()
        );
        return Ok(());
    };
    let layout = ClusterLayout {
        data: data.clone(),
        port: cluster.port,
        mount_point: cluster.mount_point,
        replicas: cluster.replicas,
        // Stopping reads no transport.
        transport: TransportKind::Tcp,
        rdma: RdmaConfig::default(),
    };
    let grace = Duration::from_secs(args.timeout);
    // The mount first: it flushes what it buffered while the cluster still
    // serves; then its clients' services, the manager last.
    let mut order = vec![Kind::Mount, Kind::Meta];
    order.extend((1..=NODES).map(Kind::Storage));
    order.push(Kind::Mgmtd);
    let mut stopped_any = false;
    for kind in order {
        let daemon = layout.daemon(kind)?;
        // The mount daemon unmounts and flushes on SIGTERM: it gets longer.
        let grace = if kind == Kind::Mount {
            grace * 2
        } else {
            grace
        };
        match daemon.stop(grace)? {
            Some(Stopped::Exited { pid, after }) => {
                stopped_any = true;
                println!(
                    "stopped {} (pid {pid}) in {:.1} s",
                    daemon.name,
                    after.as_secs_f64()
                );
            }
            Some(Stopped::Killed { pid }) => {
                stopped_any = true;
                println!("killed {} (pid {pid})", daemon.name);
            }
            None => {}
        }
        if kind == Kind::Mount
            && let Some(fs) = mounted_at(&layout.mount_point)?
            && fs.is_flyfs()
        {
            lazy_unmount(&layout.mount_point)?;
            println!(
                "{} was still mounted: unmounted it (lazily)",
                layout.mount_point.display()
            );
        }
    }
    if !stopped_any {
        println!("nothing was running");
    }
    println!(
        "flyfs is down (data kept in {}; `flyfs up --data {}` brings it back)",
        data.display(),
        data.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_spread_their_heads_over_distinct_nodes() {
        for replicas in 1..=NODES {
            let chains = plan_chains(replicas).expect("plan");
            assert_eq!(chains.len(), CHAINS as usize);
            let mut heads = [0; NODES as usize];
            for chain in &chains {
                let mut nodes: Vec<u32> = chain.targets.iter().map(|t| t.node.0).collect();
                heads[nodes[0] as usize - 1] += 1;
                nodes.sort_unstable();
                nodes.dedup();
                assert_eq!(nodes.len(), replicas as usize, "{chain:?}");
            }
            assert_eq!(
                heads,
                [CHAINS / NODES; NODES as usize],
                "{replicas} replicas"
            );
        }
    }

    #[test]
    fn configs_parse_as_their_daemons_read_them() {
        let layout = ClusterLayout {
            data: PathBuf::from("/data dir"),
            port: 7100,
            mount_point: PathBuf::from("/mnt/x"),
            replicas: 3,
            transport: TransportKind::Tcp,
            rdma: RdmaConfig::default(),
        };
        let mgmtd = MgmtdConfig::parse(&layout.config_text(Kind::Mgmtd)).expect("mgmtd config");
        assert_eq!(mgmtd.listen, "127.0.0.1:7100");
        assert_eq!(mgmtd.metrics_listen.as_deref(), Some("127.0.0.1:7110"));
        let storage = StorageDaemonConfig::parse(&layout.config_text(Kind::Storage(3)))
            .expect("storage config");
        assert_eq!(storage.listen, "127.0.0.1:7104");
        assert_eq!(storage.metrics_listen.as_deref(), Some("127.0.0.1:7114"));
        assert_eq!(
            storage.devices,
            [PathBuf::from("/data dir/devices/storage3.img")]
        );
        assert_eq!(storage.mgmt.0, ["127.0.0.1:7100"]);
        let meta = MetaDaemonConfig::parse(&layout.config_text(Kind::Meta)).expect("meta config");
        assert_eq!(meta.listen, "127.0.0.1:7101");
        assert_eq!(meta.mgmt.0, ["127.0.0.1:7100"]);
        assert_eq!(meta.stripe, STRIPE);
        let mount = MountConfig::parse(&layout.config_text(Kind::Mount)).expect("mount config");
        assert_eq!(mount.mount_point, PathBuf::from("/mnt/x"));
        assert_eq!(mount.meta, ["127.0.0.1:7101"]);
        assert_eq!(mount.metrics_listen.as_deref(), Some("127.0.0.1:7115"));
        // The five server daemons share the cores; the mount has them all.
        let share = (std::thread::available_parallelism().map_or(1, usize::from) / 5).max(1);
        for threads in [
            mgmtd.runtime_threads,
            storage.runtime_threads,
            meta.runtime_threads,
        ] {
            assert_eq!(threads, share);
        }
    }
}
