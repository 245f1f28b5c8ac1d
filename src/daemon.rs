//! The long-running daemons: `flyfs mgmtd` (the cluster manager) and
//! `flyfs storage` (a storage node). This is where their implementations
//! are chosen: the manager keeps its record and lease in a [`FileStore`] or
//! on the transactional KV layer ([`KvClusterStore`] on the embedded
//! [`FjallKv`], or on FoundationDB in a build with the `fdb` feature), as
//! its config's `[store]` says; storage nodes run chunk engines on io_uring
//! devices; and everything talks real TCP.
//!
//! Each daemon is a handle ([`Mgmtd`], [`StorageDaemon`]) that starts
//! inside the caller's tokio runtime and shuts down on request, so that the
//! subcommands, the multi-process test and a one-command local cluster all
//! start them the same way; [`run_mgmtd`] and [`run_storage`] add what a
//! process needs around them (waiting for SIGTERM or SIGINT).

use std::sync::Arc;

use anyhow::Context;
use flyfs_bypass::{AnyDevice, DeviceConfig, open_device};
use flyfs_bypass::{BufferPool, PoolConfig};
use flyfs_chunk_engine::{Engine, EngineConfig, EngineError};
use flyfs_craq::mgmt::KvClusterStore;
use flyfs_craq::mgmt::{ClusterStore, FileStore, LeaseOptions, MgmtService};
use flyfs_craq::{StorageNode, StorageService};
use flyfs_kv::fjall::{FjallKv, FjallOptions};
use flyfs_rpc::{Listener, Network, Server, ServerConfig, ServerHandle, Tcp};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use flyfs_deploy::config::{MgmtdConfig, StorageDaemonConfig, StoreConfig};

/// A running cluster manager: its RPC server and its lease-and-tick loop.
#[derive(Debug)]
pub struct Mgmtd {
    addr: String,
    service: Arc<MgmtService>,
    server: ServerHandle,
    runner: JoinHandle<()>,
}

/// Opens the store `[store]` names.
async fn open_store(config: &MgmtdConfig) -> anyhow::Result<Box<dyn ClusterStore>> {
    let dir = config.store.dir(&config.data_dir);
    match (&config.store, dir) {
        (StoreConfig::File { .. }, Some(dir)) => {
            let store = FileStore::open(&dir)
                .with_context(|| format!("opening the cluster record in {}", dir.display()))?;
            Ok(Box::new(store))
        }
        (StoreConfig::Fjall { .. }, Some(dir)) => {
            let kv = open_fjall(dir, FjallOptions::default()).await?;
            Ok(Box::new(KvClusterStore::new(kv)))
        }
        #[cfg(feature = "fdb")]
        (StoreConfig::Fdb { cluster_file }, _) => {
            let kv = open_fdb(cluster_file)?;
            Ok(Box::new(KvClusterStore::new(kv)))
        }
        #[cfg(not(feature = "fdb"))]
        (StoreConfig::Fdb { .. }, _) => Err(no_fdb()),
        (store, None) => anyhow::bail!("cluster store {store:?} has no directory"),
    }
}

/// Opens the embedded KV store in `dir`; fjall replays its journal on
/// open, so off the async threads.
pub(crate) async fn open_fjall(
    dir: std::path::PathBuf,
    options: FjallOptions,
) -> anyhow::Result<FjallKv> {
    let path = dir.clone();
    tokio::task::spawn_blocking(move || FjallKv::open(&path, options))
        .await
        .context("opening the embedded KV store")?
        .with_context(|| format!("opening the embedded KV store in {}", dir.display()))
}

/// Connects to the FoundationDB cluster of `cluster_file`.
#[cfg(feature = "fdb")]
pub(crate) fn open_fdb(cluster_file: &std::path::Path) -> anyhow::Result<flyfs_kv::fdb::FdbKv> {
    flyfs_kv::fdb::FdbKv::open(Some(cluster_file)).with_context(|| {
        format!(
            "connecting to FoundationDB with the cluster file {}",
            cluster_file.display()
        )
    })
}

/// Stops what store clients need stopped before the process exits: the
/// FoundationDB network thread, which must not be running at exit (and
/// once stopped cannot start again). Nothing in a build without the `fdb`
/// feature.
pub(crate) fn stop_store_clients() {
    #[cfg(feature = "fdb")]
    flyfs_kv::fdb::stop_network();
}

/// This build has no FoundationDB client. The config check refuses
/// `kind = "fdb"` before anything starts, so no daemon gets here.
#[cfg(not(feature = "fdb"))]
pub(crate) fn no_fdb() -> anyhow::Error {
    anyhow::anyhow!("key `store.kind`: \"fdb\" needs a flyfs built with `--features fdb`")
}

impl Mgmtd {
    /// Binds the listener, opens the store, takes the lease if no other
    /// manager holds it (loading the record, or creating an empty one),
    /// then serves; a manager that finds the lease held stands by and
    /// answers `NotPrimary` until it takes over.
    pub async fn start(config: &MgmtdConfig) -> anyhow::Result<Mgmtd> {
        // Credentials first: without them nothing else is worth starting.
        let credentials = crate::certs::from_config(config.tls.as_ref(), "the manager")?;
        let rdma = config
            .rdma
            .open(config.transport)
            .context("transport = \"rdma\": opening the [rdma] device")?;
        // Bound first: the lease names the address callers are sent to.
        let listener = Tcp
            .bind(&config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let bound = Listener::local_addr(&listener).context("reading the listener's address")?;
        let address = config.advertise.clone().unwrap_or_else(|| bound.clone());
        let store = open_store(config).await?;
        // The holder is named after the address: a restarted manager takes
        // its own lease back at once, and two live managers cannot share an
        // address (the second could not bind it).
        let lease = LeaseOptions::shared(format!("mgmtd@{address}"), &address, config.lease_ttl());
        let service = MgmtService::open_with(store, config.mgmt_config(), lease)
            .await
            .context("loading the cluster record")?;
        let mut server = Server::new(
            service.clone(),
            ServerConfig::without_payload(),
            credentials,
        );
        if let Some(rdma) = rdma {
            server = server.with_rdma(rdma);
        }
        let server = server.spawn(listener).context("starting the RPC server")?;
        let runner = tokio::spawn(service.clone().run());
        tracing::info!(
            data_dir = %config.data_dir.display(),
            store = ?config.store,
            advertise = %address,
            role = if service.is_primary() { "primary" } else { "standby" },
            "mgmtd listening on {bound}"
        );
        Ok(Mgmtd {
            addr: bound,
            service,
            server,
            runner,
        })
    }

    /// The address the server is bound to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops serving (dropping every connection) and the lease loop, then
    /// gives the lease up so that a standby takes over at once.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        self.runner.abort();
        // A cancelled loop is the expected outcome; nothing to report.
        let _ = self.runner.await;
        if let Err(error) = self.service.release().await {
            tracing::warn!(%error, "cannot release the manager lease; a standby waits for it to expire");
        }
    }
}

/// A running storage node: its engines, heartbeat loop, scrubbers and RPC
/// server.
#[derive(Debug)]
pub struct StorageDaemon {
    addr: String,
    server: ServerHandle,
    heartbeat: JoinHandle<()>,
    usage: JoinHandle<()>,
    /// The scrubbers and the repairs of rotten chunks (`[scrub]`).
    scrub: JoinHandle<()>,
}

impl StorageDaemon {
    /// Opens every device (recovering its engine), binds the listener, then
    /// starts heartbeating (which registers the node with the manager) and
    /// serving.
    pub async fn start(config: &StorageDaemonConfig) -> anyhow::Result<StorageDaemon> {
        // Credentials first: without them nothing else is worth starting.
        let credentials = crate::certs::from_config(config.tls.as_ref(), "the storage node")?;
        let rdma = config
            .rdma
            .open(config.transport)
            .context("transport = \"rdma\": opening the [rdma] device")?;
        // One pool for every device of the node: its arena is registered with
        // each device's ring, and each engine allocates from it.
        // Every chunk write in flight holds a buffer of its size until it is
        // committed, on each replica, so a storage node needs far more large
        // buffers than the engine's default pool; beyond the pool, buffers
        // come from the heap (page faults on the hot path).
        let pool = BufferPool::new(&PoolConfig {
            classes: vec![
                (4 << 10, 1024),
                (64 << 10, 256),
                (1 << 20, 256),
                (4 << 20, 16),
            ],
            ..PoolConfig::default()
        })
        .context("allocating I/O buffers")?;
        // Registered with the RDMA device once, here: a chunk a client
        // writes lands in it by RDMA READ, and a forward down the chain
        // lends it to the successor, which pulls it the same way.
        if let Some(rdma) = &rdma {
            rdma.register_arenas(Arc::new(pool.clone()))
                .context("registering the I/O buffer pool with the RDMA device")?;
        }
        let mut engines = Vec::with_capacity(config.devices.len());
        for (disk, path) in config.devices.iter().enumerate() {
            let device = open_device(path, &DeviceConfig::default(), Some(&pool))
                .with_context(|| format!("opening disk {disk} ({})", path.display()))?;
            let engine = match Engine::open(device, pool.clone(), EngineConfig::default()).await {
                Ok(engine) => engine,
                Err(error @ EngineError::NotFormatted { .. }) => {
                    return Err(anyhow::Error::from(error)).with_context(|| {
                        format!(
                            "disk {disk} ({}) holds no chunk engine; run `flyfs format --device {}` first",
                            path.display(),
                            path.display()
                        )
                    });
                }
                Err(error) => {
                    return Err(anyhow::Error::from(error)).with_context(|| {
                        format!("opening the engine on disk {disk} ({})", path.display())
                    });
                }
            };
            engines.push(Arc::new(engine));
        }
        let listener = Tcp
            .bind(&config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        // The trait's `local_addr` (a `String`), not tokio's inherent one.
        let bound = Listener::local_addr(&listener).context("reading the listener's address")?;
        let node = StorageNode::with_transport(
            config.storage_config(&bound),
            engines,
            Tcp,
            credentials.clone(),
            rdma.clone(),
        );
        let heartbeat = tokio::spawn(node.clone().run());
        let usage = tokio::spawn(export_usage(node.engines().to_vec()));
        let scrub = tokio::spawn(node.clone().scrub());
        let mut server = Server::new(
            StorageService::new(node.clone()),
            config.rpc.server_config(),
            credentials,
        );
        if let Some(rdma) = rdma {
            server = server.with_rdma(rdma);
        }
        let server = server.spawn(listener).context("starting the RPC server")?;
        tracing::info!(
            node = config.node_id,
            advertise = %node.config().addr,
            mgmt = %config.mgmt.0.join(","),
            disks = config.devices.len(),
            "storage listening on {bound}"
        );
        Ok(StorageDaemon {
            addr: bound,
            server,
            heartbeat,
            usage,
            scrub,
        })
    }

    /// The address the server is bound to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops serving and heartbeating. The engines close when the last
    /// reference to the node goes; every acknowledged write is already
    /// durable, so nothing needs flushing here.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        self.heartbeat.abort();
        self.usage.abort();
        // Repairs it spawned finish on their own: each holds the chunk
        // lock and ends within its RPC timeout.
        self.scrub.abort();
        // A cancelled loop is the expected outcome.
        let _ = self.heartbeat.await;
        let _ = self.usage.await;
        let _ = self.scrub.await;
    }
}

/// Every 5 s, each disk's usage as gauges (`flyfs_storage_disk_bytes{disk,
/// kind}` with kind `capacity`, `data` or `allocated`,
/// `flyfs_storage_disk_chunks{disk}`, `flyfs_storage_disk_poisoned{disk}`);
/// free when the process exports no metrics.
async fn export_usage(engines: Vec<Arc<Engine<AnyDevice>>>) {
    let disks: Vec<String> = (0..engines.len()).map(|d| d.to_string()).collect();
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        ticks.tick().await;
        for (engine, disk) in engines.iter().zip(&disks) {
            let space = engine.space();
            let capacity = engine.superblock().capacity_bytes;
            let bytes = |kind: &'static str| metrics::gauge!("flyfs_storage_disk_bytes", "disk" => disk.clone(), "kind" => kind);
            bytes("capacity").set(capacity as f64);
            bytes("data").set(space.data_bytes as f64);
            bytes("allocated").set(space.allocated_bytes as f64);
            metrics::gauge!("flyfs_storage_disk_chunks", "disk" => disk.clone())
                .set(space.committed_chunks as f64);
            let poisoned = if engine.poisoned().is_some() {
                1.0
            } else {
                0.0
            };
            metrics::gauge!("flyfs_storage_disk_poisoned", "disk" => disk.clone()).set(poisoned);
        }
    }
}

/// `flyfs mgmtd`: runs the manager until SIGTERM or SIGINT.
pub async fn run_mgmtd(config: &MgmtdConfig) -> anyhow::Result<()> {
    // Handlers first: a signal during startup then ends the daemon through
    // the same orderly path.
    let stop = Stop::install()?;
    if let Some(listen) = &config.metrics_listen {
        crate::metrics::serve(listen)?;
    }
    let daemon = Mgmtd::start(config).await?;
    let why = stop.wait().await;
    tracing::info!("mgmtd at {}: {why}, stopping", daemon.addr());
    daemon.shutdown().await;
    Ok(())
}

/// `flyfs storage`: runs a storage node until SIGTERM or SIGINT.
pub async fn run_storage(config: &StorageDaemonConfig) -> anyhow::Result<()> {
    let stop = Stop::install()?;
    if let Some(listen) = &config.metrics_listen {
        crate::metrics::serve(listen)?;
    }
    let daemon = StorageDaemon::start(config).await?;
    let why = stop.wait().await;
    tracing::info!(
        node = config.node_id,
        "storage at {}: {why}, stopping",
        daemon.addr()
    );
    daemon.shutdown().await;
    Ok(())
}

/// The signals that stop a daemon.
pub(crate) struct Stop {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Stop {
    pub(crate) fn install() -> anyhow::Result<Stop> {
        Ok(Stop {
            terminate: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
        })
    }

    /// Waits for the first signal and names it.
    pub(crate) async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
