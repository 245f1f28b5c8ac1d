//! `flyfs meta --config F`: the metadata service daemon.
//!
//! Here its implementations are chosen: the namespace lives in the store
//! its config's `[store]` names (the embedded fjall store under `data_dir`,
//! or FoundationDB in a build with the `fdb` feature), chain tables come
//! from the cluster manager's routing information, the GC worker deletes
//! removed files' chunks through a storage client, and the session reaper
//! ends the write sessions of clients whose lease expired. The service
//! itself is stateless, so several daemons serve one namespace when they
//! share a store (FoundationDB across machines; the embedded store belongs
//! to one process). The config (`flyfs_deploy::config::MetaDaemonConfig`,
//! deploy/meta.toml) is read and checked before anything starts.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_deploy::config::{MetaDaemonConfig, MetaStoreConfig};
use flyfs_fs_meta::gc::{GcConfig, GcStats, GcWorker, KvEvictor};
use flyfs_fs_meta::ns::{Namespace, NsConfig};
use flyfs_fs_meta::reaper::{ReaperConfig, ReaperStats, SessionReaper};
use flyfs_fs_meta::service::{CallerPolicy, MetaService, RoutingChainTables};
use flyfs_kv::Kv;
use flyfs_kv::fjall::{FjallKv, FjallOptions};
use flyfs_proto::ids::ClientId;
use flyfs_rpc::{Credentials, Network, Server, ServerConfig, ServerHandle, Tcp};
use tokio::task::JoinHandle;

/// A running metadata service: RPC server, GC worker, session reaper,
/// routing refresher.
#[derive(Debug)]
pub struct MetaDaemon {
    addr: String,
    server: ServerHandle,
    tasks: Vec<JoinHandle<()>>,
}

impl MetaDaemon {
    pub async fn start(config: &MetaDaemonConfig) -> anyhow::Result<MetaDaemon> {
        // Credentials first: without them nothing else is worth starting.
        let credentials = crate::certs::from_config(config.tls.as_ref(), "the metadata service")?;
        match &config.store {
            MetaStoreConfig::Fjall => {
                let dir = config
                    .data_dir
                    .clone()
                    .context("key `data_dir`: the embedded store needs it")?;
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let options = FjallOptions {
                    sync_on_commit: config.sync_on_commit,
                    ..FjallOptions::default()
                };
                let kv = crate::daemon::open_fjall(dir, options).await?;
                let mut daemon = Self::start_on(kv.clone(), config, credentials).await?;
                daemon.tasks.push(tokio::spawn(export_journal(kv)));
                Ok(daemon)
            }
            #[cfg(feature = "fdb")]
            MetaStoreConfig::Fdb { cluster_file } => {
                let kv = crate::daemon::open_fdb(cluster_file)?;
                Self::start_on(kv, config, credentials).await
            }
            #[cfg(not(feature = "fdb"))]
            MetaStoreConfig::Fdb { .. } => Err(crate::daemon::no_fdb()),
        }
    }

    /// The service on the store `kv`.
    async fn start_on<K: Kv>(
        kv: K,
        config: &MetaDaemonConfig,
        credentials: Credentials,
    ) -> anyhow::Result<MetaDaemon> {
        let client = ClientId(rand::random::<u64>() | 1);
        let rdma = config
            .rdma
            .open(config.transport)
            .context("transport = \"rdma\": opening the [rdma] device")?;
        let storage = StorageClient::with_transport(
            ClientConfig::new(config.mgmt.0.clone(), client),
            Tcp,
            credentials.clone(),
            rdma.clone(),
        );
        let mut ns_config = NsConfig::new(
            config.layout(),
            Arc::new(RoutingChainTables(storage.clone())),
        );
        ns_config.gc_delay_ms = config.gc_delay_ms;
        ns_config.client_lease_ms = config.client_lease_ms;
        ns_config.durable_namespace_changes = config.durable_namespace_changes;
        ns_config.inline_bytes_max = config.inline_file_bytes_max;
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
        let mut server = Server::new(
            MetaService::new(
                ns.clone(),
                storage.clone(),
                stats.clone(),
                CallerPolicy {
                    root_squash: config.root_squash,
                    squash_uid: config.squash_uid,
                    squash_gid: config.squash_gid,
                },
            ),
            ServerConfig::without_payload(),
            credentials,
        );
        if let Some(rdma) = rdma {
            server = server.with_rdma(rdma);
        }
        let server = server.spawn(listener).context("starting the RPC server")?;
        let reaper = SessionReaper::new(
            ns.clone(),
            storage.clone(),
            ReaperConfig {
                interval: Duration::from_millis(config.reaper_interval_ms),
                ..ReaperConfig::default()
            },
            Arc::new(ReaperStats::default()),
        );
        // The KV cache ages out on the GC's schedule (docs/kv-cache.md).
        let kv_evictor = KvEvictor::new(ns.clone(), Duration::from_millis(config.gc_interval_ms));
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
        tracing::info!(store = ?config.store, data_dir = ?config.data_dir, "meta listening on {addr}");
        Ok(MetaDaemon {
            addr,
            server,
            tasks: vec![
                tokio::spawn(gc.run()),
                tokio::spawn(kv_evictor.run()),
                tokio::spawn(reaper.run()),
                refresher,
            ],
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

/// Every 5 s, how the embedded store's journal is made durable:
/// `flyfs_meta_journal_commits_total`, `..._relaxed_commits_total`,
/// `..._fsyncs_total` and `flyfs_meta_journal_fsync_seconds_total` (the
/// fsyncs' time in all). Commits per fsync and seconds per fsync follow from
/// their rates; free when the process exports no metrics.
async fn export_journal(kv: FjallKv) {
    let mut ticks = tokio::time::interval(Duration::from_secs(5));
    loop {
        ticks.tick().await;
        let stats = kv.journal_stats();
        metrics::counter!("flyfs_meta_journal_commits_total").absolute(stats.commits);
        metrics::counter!("flyfs_meta_journal_relaxed_commits_total")
            .absolute(stats.relaxed_commits);
        metrics::counter!("flyfs_meta_journal_fsyncs_total").absolute(stats.syncs);
        metrics::gauge!("flyfs_meta_journal_fsync_seconds_total")
            .set(stats.sync_time.as_secs_f64());
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
