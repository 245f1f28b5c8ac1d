//! The long-running daemons: `flyfs mgmtd` (the cluster manager) and
//! `flyfs storage` (a storage node). This is where their implementations
//! are chosen: the manager keeps its record in a [`FileStore`], storage
//! nodes run chunk engines on io_uring devices, and everything talks real
//! TCP.
//!
//! Each daemon is a handle ([`Mgmtd`], [`StorageDaemon`]) that starts
//! inside the caller's tokio runtime and shuts down on request, so that the
//! subcommands, the multi-process test and a one-command local cluster all
//! start them the same way; [`run_mgmtd`] and [`run_storage`] add what a
//! process needs around them (waiting for SIGTERM or SIGINT).

use std::sync::Arc;

use anyhow::Context;
use flyfs_bypass::uring::{UringConfig, UringDevice};
use flyfs_bypass::{BufferPool, PoolConfig};
use flyfs_chunk_engine::{Engine, EngineConfig, EngineError};
use flyfs_craq::mgmt::{FileStore, MgmtService};
use flyfs_craq::{StorageNode, StorageService};
use flyfs_rpc::{Listener, Network, Server, ServerConfig, ServerHandle, Tcp};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use crate::config::{MgmtdConfig, StorageDaemonConfig};

/// A running cluster manager: its RPC server and its ticker.
#[derive(Debug)]
pub struct Mgmtd {
    addr: String,
    server: ServerHandle,
    ticker: JoinHandle<()>,
}

impl Mgmtd {
    /// Loads (or creates) the cluster record in `data_dir`, then serves.
    pub async fn start(config: &MgmtdConfig) -> anyhow::Result<Mgmtd> {
        let store = FileStore::open(&config.data_dir).with_context(|| {
            format!(
                "opening the cluster record in {}",
                config.data_dir.display()
            )
        })?;
        let service = MgmtService::open(Box::new(store), config.mgmt_config())
            .context("loading the cluster record")?;
        let listener = Tcp
            .bind(&config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let server = Server::new(service.clone(), ServerConfig::default())
            .spawn(listener)
            .context("starting the RPC server")?;
        let ticker = tokio::spawn(service.run_ticker());
        let addr = server.local_addr().to_string();
        tracing::info!(
            data_dir = %config.data_dir.display(),
            "mgmtd listening on {addr}"
        );
        Ok(Mgmtd {
            addr,
            server,
            ticker,
        })
    }

    /// The address the server is bound to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops serving (dropping every connection) and stops the ticker.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        self.ticker.abort();
        // A cancelled ticker is the expected outcome; nothing to report.
        let _ = self.ticker.await;
    }
}

/// A running storage node: its engines, heartbeat loop and RPC server.
#[derive(Debug)]
pub struct StorageDaemon {
    addr: String,
    server: ServerHandle,
    heartbeat: JoinHandle<()>,
}

impl StorageDaemon {
    /// Opens every device (recovering its engine), binds the listener, then
    /// starts heartbeating (which registers the node with the manager) and
    /// serving.
    pub async fn start(config: &StorageDaemonConfig) -> anyhow::Result<StorageDaemon> {
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
        let mut engines = Vec::with_capacity(config.devices.len());
        for (disk, path) in config.devices.iter().enumerate() {
            let device = UringDevice::open(path, &UringConfig::default(), Some(&pool))
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
        let node = StorageNode::new(config.storage_config(&bound), engines, Tcp);
        let heartbeat = tokio::spawn(node.clone().run());
        let server = Server::new(StorageService::new(node.clone()), ServerConfig::default())
            .spawn(listener)
            .context("starting the RPC server")?;
        tracing::info!(
            node = config.node_id,
            advertise = %node.config().addr,
            mgmt = %config.mgmt,
            disks = config.devices.len(),
            "storage listening on {bound}"
        );
        Ok(StorageDaemon {
            addr: bound,
            server,
            heartbeat,
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
        // A cancelled heartbeat loop is the expected outcome.
        let _ = self.heartbeat.await;
    }
}

/// `flyfs mgmtd`: runs the manager until SIGTERM or SIGINT.
pub async fn run_mgmtd(config: &MgmtdConfig) -> anyhow::Result<()> {
    // Handlers first: a signal during startup then ends the daemon through
    // the same orderly path.
    let stop = Stop::install()?;
    let daemon = Mgmtd::start(config).await?;
    let why = stop.wait().await;
    tracing::info!("mgmtd at {}: {why}, stopping", daemon.addr());
    daemon.shutdown().await;
    Ok(())
}

/// `flyfs storage`: runs a storage node until SIGTERM or SIGINT.
pub async fn run_storage(config: &StorageDaemonConfig) -> anyhow::Result<()> {
    let stop = Stop::install()?;
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
struct Stop {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Stop {
    fn install() -> anyhow::Result<Stop> {
        Ok(Stop {
            terminate: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
        })
    }

    /// Waits for the first signal and names it.
    async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
