//! `flyfs meta --config F`: the metadata service daemon, and its config.
//!
//! Here its implementations are chosen: the namespace lives in the embedded
//! store (fjall) under `data_dir`, chain tables come from the cluster
//! manager's routing information, and the GC worker deletes removed files'
//! chunks through a storage client. The service itself is stateless, so
//! several daemons may serve one namespace when they share a store
//! (FoundationDB across machines; the embedded store belongs to one
//! process).
//!
//! Config keys (deploy/meta.toml lists them with their defaults):
//! `listen`, `mgmt`, `data_dir` (required), `chain_table`, `chunk_size`,
//! `stripe` (the root directory's default layout, used when the namespace is
//! first created), `gc_delay_ms`, `gc_interval_ms`, `sync_on_commit`,
//! `metrics_listen`.
//! Unknown keys are refused; errors name the file, the key and the problem.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_fs_meta::gc::{GcConfig, GcStats, GcWorker};
use flyfs_fs_meta::ns::{LayoutSpec, Namespace, NsConfig};
use flyfs_fs_meta::service::{MetaService, RoutingChainTables};
use flyfs_kv::fjall::{FjallKv, FjallOptions};
use flyfs_proto::ids::{ChainTableId, ClientId};
use flyfs_rpc::{Network, Server, ServerConfig, ServerHandle, Tcp};
use serde::Deserialize;
use tokio::task::JoinHandle;

/// `flyfs meta`: one metadata service instance.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaDaemonConfig {
    /// Where the metadata RPC server listens (`host:port`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The cluster manager (`host:port`).
    #[serde(default = "default_mgmt")]
    pub mgmt: String,
    /// The embedded store's directory.
    pub data_dir: PathBuf,
    /// The root directory's default layout: chain table, chunk size (bytes,
    /// a power of two from 64 KiB to 64 MiB) and chains per file.
    #[serde(default = "default_chain_table")]
    pub chain_table: u32,
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
    #[serde(default = "default_stripe")]
    pub stripe: u32,
    /// How long a removed file's data is kept before GC deletes it.
    #[serde(default = "default_gc_delay_ms")]
    pub gc_delay_ms: u64,
    /// How often the GC worker scans its queue.
    #[serde(default = "default_gc_interval_ms")]
    pub gc_interval_ms: u64,
    /// fsync every commit (off loses the last commits on a power cut, not
    /// on a process crash).
    #[serde(default = "default_sync_on_commit")]
    pub sync_on_commit: bool,
    /// Where the Prometheus metrics endpoint listens (`host:port`); none by
    /// default.
    #[serde(default)]
    pub metrics_listen: Option<String>,
}

fn default_listen() -> String {
    "127.0.0.1:8200".into()
}
fn default_mgmt() -> String {
    "127.0.0.1:8000".into()
}
fn default_chain_table() -> u32 {
    1
}
fn default_chunk_size() -> u32 {
    1 << 20
}
fn default_stripe() -> u32 {
    1
}
fn default_gc_delay_ms() -> u64 {
    5 * 60 * 1000
}
fn default_gc_interval_ms() -> u64 {
    1000
}
fn default_sync_on_commit() -> bool {
    true
}

impl MetaDaemonConfig {
    /// Reads and checks `path`; a relative `data_dir` is taken from the
    /// config file's directory.
    pub fn load(path: &Path) -> anyhow::Result<MetaDaemonConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut config = Self::parse(&text)
            .with_context(|| format!("config file {} is invalid", path.display()))?;
        if config.data_dir.is_relative()
            && let Some(dir) = path.parent()
        {
            config.data_dir = dir.join(&config.data_dir);
        }
        Ok(config)
    }

    pub fn parse(text: &str) -> anyhow::Result<MetaDaemonConfig> {
        let config: MetaDaemonConfig = toml::from_str(text)?;
        if config.listen.is_empty() {
            bail!("key `listen`: is empty");
        }
        if config.mgmt.is_empty() {
            bail!("key `mgmt`: is empty");
        }
        if config.data_dir.as_os_str().is_empty() {
            bail!("key `data_dir`: is empty");
        }
        crate::config::check_metrics_listen(config.metrics_listen.as_deref())?;
        if config.gc_interval_ms == 0 {
            bail!("key `gc_interval_ms`: must be at least 1");
        }
        config
            .layout()
            .validate()
            .map_err(|e| anyhow::anyhow!("keys `chunk_size`/`stripe`: {e}"))?;
        Ok(config)
    }

    fn layout(&self) -> LayoutSpec {
        LayoutSpec {
            chain_table: ChainTableId(self.chain_table),
            chunk_size: self.chunk_size,
            stripe: self.stripe,
        }
    }
}

/// A running metadata service: RPC server, GC worker, routing refresher.
#[derive(Debug)]
pub struct MetaDaemon {
    addr: String,
    server: ServerHandle,
    tasks: Vec<JoinHandle<()>>,
}

impl MetaDaemon {
    pub async fn start(config: &MetaDaemonConfig) -> anyhow::Result<MetaDaemon> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let kv = FjallKv::open(
            &config.data_dir,
            FjallOptions {
                sync_on_commit: config.sync_on_commit,
                ..FjallOptions::default()
            },
        )
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
        let client = ClientId(rand::random::<u64>() | 1);
        let storage = StorageClient::new(ClientConfig::new(config.mgmt.clone(), client), Tcp);
        let mut ns_config = NsConfig::new(
            config.layout(),
            Arc::new(RoutingChainTables(storage.clone())),
        );
        ns_config.gc_delay_ms = config.gc_delay_ms;
        let ns = Namespace::open(kv, ns_config)
            .await
            .context("opening the namespace")?;
        // Routing first, so that the first creates find their chain table
        // (the service also refreshes on an unknown table); a manager that
        // is not up yet is no reason to refuse starting.
        if let Err(e) = storage.refresh_routing().await {
            tracing::warn!("no routing from the manager yet: {e}");
        }
        let stats = Arc::new(GcStats::default());
        let listener = Tcp
            .bind(&config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let server = Server::new(
            MetaService::new(ns.clone(), storage.clone(), stats.clone()),
            ServerConfig::default(),
        )
        .spawn(listener)
        .context("starting the RPC server")?;
        let gc = GcWorker::new(
            ns,
            storage.clone(),
            GcConfig {
                interval: Duration::from_millis(config.gc_interval_ms),
                ..GcConfig::default()
            },
            stats,
        );
        // Chain tables for new files come from the routing cache: keep it
        // fresh, so a table created after startup is usable within seconds.
        let refresher = tokio::spawn(async move {
            loop {
                if let Err(e) = storage.refresh_routing().await {
                    tracing::debug!("routing refresh failed: {e}");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        let addr = server.local_addr().to_string();
        tracing::info!(data_dir = %config.data_dir.display(), "meta listening on {addr}");
        Ok(MetaDaemon {
            addr,
            server,
            tasks: vec![tokio::spawn(gc.run()), refresher],
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await;
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

/// `flyfs meta`: runs a metadata service until SIGTERM or SIGINT.
pub async fn run_meta(config: &MetaDaemonConfig) -> anyhow::Result<()> {
    let stop = crate::daemon::Stop::install()?;
    if let Some(listen) = &config.metrics_listen {
        crate::metrics::serve(listen)?;
    }
    let daemon = MetaDaemon::start(config).await?;
    let why = stop.wait().await;
    tracing::info!("meta at {}: {why}, stopping", daemon.addr());
    daemon.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_their_key() {
        let config = MetaDaemonConfig::parse("data_dir = \"m\"").expect("defaults");
        assert_eq!(config.listen, "127.0.0.1:8200");
        assert_eq!(config.chunk_size, 1 << 20);
        assert!(config.sync_on_commit);
        let e = MetaDaemonConfig::parse("data_dir = \"m\"\nchunk_size = 1000").expect_err("bad");
        assert!(format!("{e:#}").contains("chunk_size"), "{e:#}");
        let e = MetaDaemonConfig::parse("data_dir = \"m\"\nstripes = 2").expect_err("unknown");
        assert!(format!("{e:#}").contains("stripes"), "{e:#}");
        let example =
            MetaDaemonConfig::parse(include_str!("../deploy/meta.toml")).expect("the example");
        assert_eq!(
            example,
            MetaDaemonConfig::parse("data_dir = \"meta\"").expect("defaults")
        );
        let e = MetaDaemonConfig::parse("listen = \"x\"").expect_err("missing");
        assert!(format!("{e:#}").contains("data_dir"), "{e:#}");
    }
}
