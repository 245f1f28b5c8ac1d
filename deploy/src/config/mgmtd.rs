//! `flyfs mgmtd --config F`: the cluster manager's config
//! (deploy/mgmtd.toml).

use std::path::{Path, PathBuf};
use std::time::Duration;

use flyfs_craq::mgmt::{LeaseOptions, MgmtConfig};
use serde::{Deserialize, Serialize};

use super::{
    ConfigError, ConfigFile, RdmaConfig, TlsConfig, TransportKind, beside, check, check_address,
    check_metrics_listen, check_runtime_threads, positive,
};

/// The shortest manager lease: a renewal every third of it must survive a
/// slow store transaction.
pub const LEASE_TTL_MS_MIN: u64 = 100;

/// `flyfs mgmtd`: the cluster manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MgmtdConfig {
    /// Where the manager's RPC server listens (`host:port`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The address storage nodes and clients reach this manager at, which
    /// standby managers name to them; defaults to the bound address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The manager's directory: the file store's `cluster.rec`, and the
    /// embedded KV store unless `store.path` says otherwise.
    pub data_dir: PathBuf,
    /// How often storage nodes are expected to heartbeat.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A node silent for this long is declared dead and its targets offline.
    #[serde(default = "default_failure_timeout_ms")]
    pub failure_timeout_ms: u64,
    /// How often liveness and chains are re-evaluated.
    #[serde(default = "default_tick_interval_ms")]
    pub tick_interval_ms: u64,
    /// How long the primary manager's lease lasts without renewal; it is
    /// renewed every third of that, and a standby takes over within about
    /// this long after the primary dies.
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// Replace a chain member offline for this many seconds with a new
    /// target on the least-loaded live node outside its chain; 0 (the
    /// default) leaves replacing to an operator.
    #[serde(default)]
    pub auto_replace_after_s: u64,
    /// Worker threads of the daemon's async runtime (RPC connections and
    /// handlers); 0, the default, is one per core. `flyfs up`, whose
    /// daemons share one machine's cores, gives each a share of them.
    #[serde(default)]
    pub runtime_threads: usize,
    /// Where the Prometheus metrics endpoint listens (`host:port`, serving
    /// `GET /metrics`); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// `transport = "tcp" | "rdma"`: whether the manager's server also
    /// takes RDMA connections (storage nodes and clients on RDMA heartbeat
    /// and ask for routing over them); it always takes TCP ones. TCP by default.
    #[serde(default)]
    pub transport: TransportKind,
    /// This daemon's credentials (`[tls]`: `ca`, `cert`, `key`); required to
    /// start, since every connection is authenticated (docs/security.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// `[rdma]`: the RDMA device and connection shape, for
    /// `transport = "rdma"`.
    #[serde(default)]
    pub rdma: RdmaConfig,
    /// Where the cluster record and the lease live (`[store]`). Last, so
    /// that a written config's table follows the plain keys.
    #[serde(default)]
    pub store: StoreConfig,
}

/// `[store]` of `flyfs mgmtd`: where the durable cluster state lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// `cluster.rec` in `path` (default `data_dir`). One manager only: its
    /// lease is trivially held. The default.
    File {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
    },
    /// The embedded transactional KV store (fjall) in `path` (default
    /// `data_dir/kv`), with the real lease. One process can open it, so
    /// still one manager per store. `kind = "kv"` is the older name.
    #[serde(alias = "kv")]
    Fjall {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
    },
    /// FoundationDB, shared by every manager of the cluster (standbys take
    /// over from the primary). Needs a build with FoundationDB support.
    Fdb { cluster_file: PathBuf },
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::File { path: None }
    }
}

impl StoreConfig {
    /// The directory of a file or embedded store, from `data_dir` by
    /// default.
    pub fn dir(&self, data_dir: &Path) -> Option<PathBuf> {
        match self {
            StoreConfig::File { path } => Some(path.clone().unwrap_or_else(|| data_dir.into())),
            StoreConfig::Fjall { path } => {
                Some(path.clone().unwrap_or_else(|| data_dir.join("kv")))
            }
            StoreConfig::Fdb { .. } => None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:7000".to_string()
}

pub(crate) fn default_heartbeat_interval_ms() -> u64 {
    1_000
}

fn default_failure_timeout_ms() -> u64 {
    10_000
}

fn default_tick_interval_ms() -> u64 {
    500
}

fn default_lease_ttl_ms() -> u64 {
    LeaseOptions::TTL_DEFAULT.as_millis() as u64
}

impl MgmtdConfig {
    /// A manager keeping its state in `data_dir`, every other key at its
    /// default.
    pub fn new(data_dir: impl Into<PathBuf>) -> MgmtdConfig {
        MgmtdConfig {
            listen: default_listen(),
            advertise: None,
            data_dir: data_dir.into(),
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            failure_timeout_ms: default_failure_timeout_ms(),
            tick_interval_ms: default_tick_interval_ms(),
            lease_ttl_ms: default_lease_ttl_ms(),
            auto_replace_after_s: 0,
            runtime_threads: 0,
            metrics_listen: None,
            transport: TransportKind::Tcp,
            tls: None,
            rdma: RdmaConfig::default(),
            store: StoreConfig::default(),
        }
    }

    pub fn mgmt_config(&self) -> MgmtConfig {
        MgmtConfig {
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            failure_timeout: Duration::from_millis(self.failure_timeout_ms),
            tick_interval: Duration::from_millis(self.tick_interval_ms),
            auto_replace_after: (self.auto_replace_after_s > 0)
                .then(|| Duration::from_secs(self.auto_replace_after_s)),
        }
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}

impl ConfigFile for MgmtdConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_address(&self.listen, "listen")?;
        check(
            self.advertise.as_ref().is_none_or(|a| !a.is_empty()),
            "advertise",
            || "is empty (leave it out to advertise the listening address)".into(),
        )?;
        check(!self.data_dir.as_os_str().is_empty(), "data_dir", || {
            "is empty".into()
        })?;
        self.rdma.validate(self.transport)?;
        check_runtime_threads(self.runtime_threads)?;
        check_metrics_listen(self.metrics_listen.as_deref())?;
        check(
            self.lease_ttl_ms >= LEASE_TTL_MS_MIN,
            "lease_ttl_ms",
            || {
                format!(
                    "{} is below {LEASE_TTL_MS_MIN}: one slow store transaction would cost \
                     the primary its lease",
                    self.lease_ttl_ms
                )
            },
        )?;
        match &self.store {
            StoreConfig::File { path } | StoreConfig::Fjall { path } => check(
                path.as_ref().is_none_or(|p| !p.as_os_str().is_empty()),
                "store.path",
                || "is empty (leave it out for the default under data_dir)".into(),
            )?,
            StoreConfig::Fdb { cluster_file } => {
                super::meta::check_fdb(cluster_file, "kind = \"fjall\" (embedded) or \"file\"")?
            }
        }
        positive(self.heartbeat_interval_ms, "heartbeat_interval_ms")?;
        positive(self.tick_interval_ms, "tick_interval_ms")?;
        // One late heartbeat must not kill a node.
        check(
            self.failure_timeout_ms >= 2 * self.heartbeat_interval_ms,
            "failure_timeout_ms",
            || {
                format!(
                    "{} is less than two heartbeat intervals ({} ms)",
                    self.failure_timeout_ms,
                    2 * self.heartbeat_interval_ms
                )
            },
        )?;
        // Failures are only noticed on a tick.
        check(
            self.tick_interval_ms < self.failure_timeout_ms,
            "tick_interval_ms",
            || {
                format!(
                    "{} is not below failure_timeout_ms ({})",
                    self.tick_interval_ms, self.failure_timeout_ms
                )
            },
        )
    }

    fn resolve_beside(&mut self, dir: &Path) {
        if let Some(tls) = &mut self.tls {
            tls.resolve_beside(dir);
        }
        self.data_dir = beside(dir, &self.data_dir);
        match &mut self.store {
            StoreConfig::File { path } | StoreConfig::Fjall { path } => {
                if let Some(path) = path {
                    *path = beside(dir, path);
                }
            }
            StoreConfig::Fdb { cluster_file } => *cluster_file = beside(dir, cluster_file),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::message;

    #[test]
    fn defaults_fill_everything_but_data_dir() {
        let config = MgmtdConfig::parse("data_dir = \"/var/lib/flyfs/mgmtd\"").expect("valid");
        assert_eq!(config, MgmtdConfig::new("/var/lib/flyfs/mgmtd"));
        assert_eq!(config.listen, "127.0.0.1:7000");
        assert_eq!(
            (
                config.heartbeat_interval_ms,
                config.failure_timeout_ms,
                config.tick_interval_ms,
                config.lease_ttl_ms
            ),
            (1_000, 10_000, 500, 3_000)
        );
        assert_eq!(config.store, StoreConfig::File { path: None });
        assert_eq!(config.mgmt_config(), MgmtConfig::default());
        assert_eq!(config.lease_ttl(), LeaseOptions::TTL_DEFAULT);
        assert_eq!(
            config.store.dir(&config.data_dir),
            Some(PathBuf::from("/var/lib/flyfs/mgmtd"))
        );
    }

    #[test]
    fn store_kinds() {
        for kind in ["fjall", "kv"] {
            let config =
                MgmtdConfig::parse(&format!("data_dir = \"d\"\n[store]\nkind = \"{kind}\""))
                    .expect("embedded store");
            assert_eq!(config.store, StoreConfig::Fjall { path: None });
            assert_eq!(
                config.store.dir(&config.data_dir),
                Some(PathBuf::from("d/kv"))
            );
        }
        let config = MgmtdConfig::parse(
            "data_dir = \"d\"\nlease_ttl_ms = 2000\n[store]\nkind = \"fjall\"\npath = \"/fast/mgmt\"",
        )
        .expect("fjall with a path");
        assert_eq!(
            config.store.dir(&config.data_dir),
            Some(PathBuf::from("/fast/mgmt"))
        );
        assert_eq!(config.lease_ttl(), Duration::from_secs(2));

        // FoundationDB parses; without FoundationDB support in the build it
        // is refused naming the key.
        let fdb = MgmtdConfig::parse(
            "data_dir = \"d\"\n[store]\nkind = \"fdb\"\ncluster_file = \"/etc/foundationdb/fdb.cluster\"",
        );
        if cfg!(feature = "fdb") {
            assert_eq!(
                fdb.expect("FoundationDB in this build").store,
                StoreConfig::Fdb {
                    cluster_file: "/etc/foundationdb/fdb.cluster".into()
                }
            );
        } else {
            let text = message(&fdb.expect_err("no FoundationDB in this build"));
            assert!(
                text.contains("store.kind") && text.contains("fdb"),
                "{text}"
            );
        }

        // An unknown kind, a key of another kind and a short lease name
        // what is wrong.
        let error = MgmtdConfig::parse("data_dir = \"d\"\n[store]\nkind = \"etcd\"")
            .expect_err("unknown kind");
        let text = message(&error);
        assert!(text.contains("etcd") && text.contains("fjall"), "{text}");
        let error =
            MgmtdConfig::parse("data_dir = \"d\"\n[store]\nkind = \"file\"\ncluster_file = \"x\"")
                .expect_err("cluster_file on a file store");
        assert!(message(&error).contains("cluster_file"), "{error:#}");
        let error =
            MgmtdConfig::parse("data_dir = \"d\"\nlease_ttl_ms = 10").expect_err("short lease");
        assert!(message(&error).contains("lease_ttl_ms"), "{error:#}");
    }

    #[test]
    fn semantic_checks_name_their_key() {
        let error =
            MgmtdConfig::parse("data_dir = \"d\"\nmetrics_listen = \"9100\"").expect_err("no host");
        assert!(message(&error).contains("metrics_listen"), "{error:#}");
        let error = MgmtdConfig::parse("data_dir = \"d\"\nfailure_timeout_ms = 1000")
            .expect_err("shorter than two heartbeats");
        assert!(message(&error).contains("failure_timeout_ms"), "{error:#}");
        let error =
            MgmtdConfig::parse("data_dir = \"d\"\nfailure_timout_ms = 5").expect_err("typo");
        assert!(message(&error).contains("failure_timout_ms"), "{error:#}");
        let error = MgmtdConfig::parse("listen = \"127.0.0.1:1\"").expect_err("no data_dir");
        assert!(message(&error).contains("data_dir"), "{error:#}");
    }

    #[test]
    fn written_configs_read_back_identically() {
        let mut config = MgmtdConfig::new("/var/lib/flyfs/mgmtd");
        config.metrics_listen = Some("127.0.0.1:9100".into());
        config.store = StoreConfig::Fjall {
            path: Some("/fast/kv".into()),
        };
        assert_eq!(
            MgmtdConfig::parse(&config.to_toml()).expect("reads back"),
            config
        );
    }

    #[test]
    fn load_names_the_file_and_resolves_paths_beside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mgmtd.toml");
        std::fs::write(
            &path,
            "data_dir = \"m\"\n[store]\nkind = \"fjall\"\npath = \"kv\"",
        )
        .expect("write");
        let config = MgmtdConfig::load(&path).expect("valid");
        assert_eq!(config.data_dir, dir.path().join("m"));
        assert_eq!(
            config.store.dir(&config.data_dir),
            Some(dir.path().join("kv"))
        );
        std::fs::write(
            &path,
            "data_dir = \"m\"\n[store]\nkind = \"file\"\npath = \"\"",
        )
        .expect("write");
        let text = message(&MgmtdConfig::load(&path).expect_err("empty store path"));
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("store.path"), "{text}");

        let missing = dir.path().join("missing.toml");
        let error = MgmtdConfig::load(&missing).expect_err("no file");
        assert!(
            message(&error).contains(&missing.display().to_string()),
            "{error:#}"
        );
    }
}
