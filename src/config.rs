//! The daemons' configuration files (TOML): what `flyfs mgmtd --config` and
//! `flyfs storage --config` read, their defaults, and the checks that run
//! before a daemon starts.
//!
//! Every key but the ones without a sensible default (`data_dir`,
//! `node_id`, `devices`) has a default, and unknown keys are refused, so a
//! misspelt key fails loudly instead of silently keeping a default. Errors
//! name the file, the key and the problem: toml's own error (which quotes
//! the offending line) is wrapped with the path, and the semantic checks
//! here name their key. deploy/mgmtd.toml and deploy/storage.toml list every
//! key with its default.
//!
//! Relative paths in a file (`data_dir`, `devices`, `store.path`,
//! `store.cluster_file`) are taken relative to the directory holding the
//! file, so a config and its data can move together and a daemon's working
//! directory does not matter.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use flyfs_craq::StorageConfig;
use flyfs_craq::mgmt::MgmtConfig;
use flyfs_proto::ids::NodeId;
use serde::Deserialize;

/// The longest lease a storage node may hold. A lease must end before the
/// manager gives up on the node (its `failure_timeout_ms`), which a storage
/// daemon cannot see; 60 s is 3FS's failure timeout, the longest any sane
/// manager waits, so a lease above it is certainly a mistake.
pub const LEASE_TIMEOUT_MS_MAX: u64 = 60_000;

/// The shortest manager lease: a renewal every third of it must survive a
/// slow store transaction.
pub const LEASE_TTL_MS_MIN: u64 = 100;

/// `flyfs mgmtd`: the cluster manager.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MgmtdConfig {
    /// Where the manager's RPC server listens (`host:port`).
    #[serde(default = "default_mgmt_addr")]
    pub listen: String,
    /// The address storage nodes and clients reach this manager at, which
    /// standby managers name to them; defaults to the bound address.
    #[serde(default)]
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
    /// Where the cluster record and the lease live (`[store]`).
    #[serde(default)]
    pub store: StoreConfig,
    /// Where the Prometheus metrics endpoint listens (`host:port`, serving
    /// `GET /metrics`); none by default.
    #[serde(default)]
    pub metrics_listen: Option<String>,
}

/// `[store]` of `flyfs mgmtd`: where the durable cluster state lives.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// `cluster.rec` in `path` (default `data_dir`). One manager only: its
    /// lease is trivially held. The default.
    File {
        #[serde(default)]
        path: Option<PathBuf>,
    },
    /// The embedded transactional KV store (fjall) in `path` (default
    /// `data_dir/kv`), with the real lease. One process can open it, so
    /// still one manager per store.
    Kv {
        #[serde(default)]
        path: Option<PathBuf>,
    },
    /// FoundationDB, shared by every manager of the cluster (standbys take
    /// over from the primary). Needs FoundationDB support in the build.
    Fdb { cluster_file: PathBuf },
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::File { path: None }
    }
}

impl StoreConfig {
    /// The directory of a file or KV store, from `data_dir` by default.
    pub fn dir(&self, data_dir: &Path) -> Option<PathBuf> {
        match self {
            StoreConfig::File { path } => Some(path.clone().unwrap_or_else(|| data_dir.into())),
            StoreConfig::Kv { path } => Some(path.clone().unwrap_or_else(|| data_dir.join("kv"))),
            StoreConfig::Fdb { .. } => None,
        }
    }

    fn resolve_beside(&mut self, config: &Path) {
        match self {
            StoreConfig::File { path } | StoreConfig::Kv { path } => {
                if let Some(path) = path {
                    *path = beside(config, path);
                }
            }
            StoreConfig::Fdb { cluster_file } => *cluster_file = beside(config, cluster_file),
        }
    }
}

/// `flyfs storage`: one storage node.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageDaemonConfig {
    /// This node's id in the cluster; unique per node, stable across restarts.
    pub node_id: u32,
    /// Where the storage RPC server listens (`host:port`).
    #[serde(default = "default_storage_listen")]
    pub listen: String,
    /// The address others reach this node at; defaults to the address the
    /// listener is bound to.
    #[serde(default)]
    pub advertise: Option<String>,
    /// The cluster manager's address, when there is one manager; after
    /// parsing it has moved into `mgmt_addrs`.
    #[serde(default)]
    pub mgmt: Option<String>,
    /// The cluster managers' addresses (the primary and its standbys).
    #[serde(default)]
    pub mgmt_addrs: Vec<String>,
    /// Devices (or files) formatted by `flyfs format`; a target's disk index
    /// is the position of its device in this list.
    pub devices: Vec<PathBuf>,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// The node stops serving when the manager has not answered a heartbeat
    /// for this long. Must be below the manager's `failure_timeout_ms`.
    #[serde(default = "default_lease_timeout_ms")]
    pub lease_timeout_ms: u64,
    /// One attempt of an RPC to another storage node or the manager.
    #[serde(default = "default_rpc_timeout_ms")]
    pub rpc_timeout_ms: u64,
    /// How long an update keeps trying to reach the next replica.
    #[serde(default = "default_forward_deadline_ms")]
    pub forward_deadline_ms: u64,
    /// Where the Prometheus metrics endpoint listens (`host:port`); none by
    /// default.
    #[serde(default)]
    pub metrics_listen: Option<String>,
}

fn default_mgmt_addr() -> String {
    "127.0.0.1:7000".to_string()
}

fn default_storage_listen() -> String {
    "127.0.0.1:7100".to_string()
}

fn default_heartbeat_interval_ms() -> u64 {
    1_000
}

fn default_failure_timeout_ms() -> u64 {
    10_000
}

fn default_tick_interval_ms() -> u64 {
    500
}

fn default_lease_ttl_ms() -> u64 {
    flyfs_craq::mgmt::LeaseOptions::TTL_DEFAULT.as_millis() as u64
}

fn default_lease_timeout_ms() -> u64 {
    5_000
}

fn default_rpc_timeout_ms() -> u64 {
    5_000
}

fn default_forward_deadline_ms() -> u64 {
    30_000
}

/// A semantic check failed: which key, and why.
fn check(ok: bool, key: &str, problem: impl FnOnce() -> String) -> anyhow::Result<()> {
    if !ok {
        bail!("key `{key}`: {}", problem());
    }
    Ok(())
}

/// `metrics_listen`, if given, is a `host:port`.
pub fn check_metrics_listen(listen: Option<&str>) -> anyhow::Result<()> {
    match listen {
        None => Ok(()),
        Some(listen) => check(
            listen
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()),
            "metrics_listen",
            || format!("{listen:?} is not host:port (leave the key out for no metrics)"),
        ),
    }
}

fn positive(value: u64, key: &str) -> anyhow::Result<()> {
    check(value > 0, key, || "must be at least 1".into())
}

impl MgmtdConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> anyhow::Result<MgmtdConfig> {
        let mut config = Self::parse(&read(path)?).with_context(|| invalid(path))?;
        config.data_dir = beside(path, &config.data_dir);
        config.store.resolve_beside(path);
        Ok(config)
    }

    /// Parses and checks a config's text (relative paths are left as written).
    pub fn parse(text: &str) -> anyhow::Result<MgmtdConfig> {
        let config: MgmtdConfig = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn mgmt_config(&self) -> MgmtConfig {
        MgmtConfig {
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            failure_timeout: Duration::from_millis(self.failure_timeout_ms),
            tick_interval: Duration::from_millis(self.tick_interval_ms),
        }
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}

impl Validate for MgmtdConfig {
    fn validate(&self) -> anyhow::Result<()> {
        check(!self.listen.is_empty(), "listen", || "is empty".into())?;
        check(
            self.advertise.as_ref().is_none_or(|a| !a.is_empty()),
            "advertise",
            || "is empty (leave it out to advertise the listening address)".into(),
        )?;
        check(!self.data_dir.as_os_str().is_empty(), "data_dir", || {
            "is empty".into()
        })?;
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
            StoreConfig::File { path } | StoreConfig::Kv { path } => check(
                path.as_ref().is_none_or(|p| !p.as_os_str().is_empty()),
                "store.path",
                || "is empty (leave it out for the default under data_dir)".into(),
            )?,
            // FoundationDB support needs libfdb_c to link, so the binary is
            // built without it (see the README); refuse here, before
            // anything starts, rather than at the first transaction.
            StoreConfig::Fdb { .. } => bail!(
                "key `store.kind`: \"fdb\" needs FoundationDB support, which this build of \
                 flyfs lacks (it needs libfdb_c); use kind = \"kv\" (embedded) or \"file\""
            ),
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
}

impl StorageDaemonConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> anyhow::Result<StorageDaemonConfig> {
        let mut config = Self::parse(&read(path)?).with_context(|| invalid(path))?;
        for device in &mut config.devices {
            *device = beside(path, device);
        }
        Ok(config)
    }

    /// Parses and checks a config's text (relative paths are left as written).
    /// `mgmt`, if given, becomes the one entry of `mgmt_addrs`.
    pub fn parse(text: &str) -> anyhow::Result<StorageDaemonConfig> {
        let mut config: StorageDaemonConfig = toml::from_str(text)?;
        config.validate()?;
        if config.mgmt_addrs.is_empty() {
            let mgmt = config.mgmt.take().unwrap_or_else(default_mgmt_addr);
            config.mgmt_addrs = vec![mgmt];
        }
        config.mgmt = None;
        Ok(config)
    }

    /// The node's settings; `bound` is the address the listener got, which
    /// is advertised unless `advertise` says otherwise (it resolves port 0).
    pub fn storage_config(&self, bound: &str) -> StorageConfig {
        let addr = self.advertise.clone().unwrap_or_else(|| bound.to_string());
        let mut config = StorageConfig::new(NodeId(self.node_id), addr, String::new());
        config.mgmt_addrs = self.mgmt_addrs.clone();
        config.heartbeat_interval = Duration::from_millis(self.heartbeat_interval_ms);
        config.lease_timeout = Duration::from_millis(self.lease_timeout_ms);
        config.rpc_timeout = Duration::from_millis(self.rpc_timeout_ms);
        config.forward_deadline = Duration::from_millis(self.forward_deadline_ms);
        config
    }
}

impl Validate for StorageDaemonConfig {
    fn validate(&self) -> anyhow::Result<()> {
        check(!self.listen.is_empty(), "listen", || "is empty".into())?;
        check(
            self.mgmt.as_ref().is_none_or(|m| !m.is_empty()),
            "mgmt",
            || "is empty".into(),
        )?;
        check(
            self.mgmt.is_none() || self.mgmt_addrs.is_empty(),
            "mgmt_addrs",
            || "is given together with `mgmt`: list every manager in `mgmt_addrs` only".into(),
        )?;
        check(
            self.mgmt_addrs.iter().all(|a| !a.is_empty()),
            "mgmt_addrs",
            || "holds an empty address".into(),
        )?;
        check(
            self.advertise.as_ref().is_none_or(|a| !a.is_empty()),
            "advertise",
            || "is empty (leave it out to advertise the listening address)".into(),
        )?;
        check(!self.devices.is_empty(), "devices", || {
            "lists no device".into()
        })?;
        check_metrics_listen(self.metrics_listen.as_deref())?;
        positive(self.heartbeat_interval_ms, "heartbeat_interval_ms")?;
        positive(self.rpc_timeout_ms, "rpc_timeout_ms")?;
        // One late heartbeat reply must not fence the node off.
        check(
            self.lease_timeout_ms >= 2 * self.heartbeat_interval_ms,
            "lease_timeout_ms",
            || {
                format!(
                    "{} is less than two heartbeat intervals ({} ms)",
                    self.lease_timeout_ms,
                    2 * self.heartbeat_interval_ms
                )
            },
        )?;
        check(
            self.lease_timeout_ms < LEASE_TIMEOUT_MS_MAX,
            "lease_timeout_ms",
            || {
                format!(
                    "{} is not below {LEASE_TIMEOUT_MS_MAX}; it must be below the manager's \
                     failure_timeout_ms (half of it is the rule)",
                    self.lease_timeout_ms
                )
            },
        )?;
        check(
            self.forward_deadline_ms >= self.rpc_timeout_ms,
            "forward_deadline_ms",
            || {
                format!(
                    "{} is shorter than one RPC attempt (rpc_timeout_ms = {})",
                    self.forward_deadline_ms, self.rpc_timeout_ms
                )
            },
        )
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))
}

/// What every parse error is wrapped in: the file's name.
fn invalid(path: &Path) -> String {
    format!("config file {} is invalid", path.display())
}

/// The checks beyond what the types express.
trait Validate {
    fn validate(&self) -> anyhow::Result<()>;
}

/// `relative` taken from the directory of the config file `config`.
fn beside(config: &Path, relative: &Path) -> PathBuf {
    match config.parent() {
        Some(dir) if relative.is_relative() => dir.join(relative),
        _ => relative.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole chain of messages, as `main` prints it.
    fn message(error: &anyhow::Error) -> String {
        format!("{error:#}")
    }

    #[test]
    fn mgmtd_defaults_fill_everything_but_data_dir() {
        let config = MgmtdConfig::parse("data_dir = \"/var/lib/flyfs/mgmtd\"").expect("valid");
        assert_eq!(
            config,
            MgmtdConfig {
                listen: "127.0.0.1:7000".into(),
                advertise: None,
                data_dir: "/var/lib/flyfs/mgmtd".into(),
                heartbeat_interval_ms: 1_000,
                failure_timeout_ms: 10_000,
                tick_interval_ms: 500,
                lease_ttl_ms: 3_000,
                store: StoreConfig::File { path: None },
                metrics_listen: None,
            }
        );
        assert_eq!(config.mgmt_config(), MgmtConfig::default());
        assert_eq!(
            config.lease_ttl(),
            flyfs_craq::mgmt::LeaseOptions::TTL_DEFAULT
        );
        assert_eq!(
            config.store.dir(&config.data_dir),
            Some(PathBuf::from("/var/lib/flyfs/mgmtd"))
        );
    }

    #[test]
    fn mgmtd_store_kinds() {
        let config = MgmtdConfig::parse("data_dir = \"d\"\n[store]\nkind = \"kv\"").expect("kv");
        assert_eq!(config.store, StoreConfig::Kv { path: None });
        assert_eq!(
            config.store.dir(&config.data_dir),
            Some(PathBuf::from("d/kv"))
        );
        let config = MgmtdConfig::parse(
            "data_dir = \"d\"\nlease_ttl_ms = 2000\n[store]\nkind = \"kv\"\npath = \"/fast/mgmt\"",
        )
        .expect("kv with a path");
        assert_eq!(
            config.store.dir(&config.data_dir),
            Some(PathBuf::from("/fast/mgmt"))
        );
        assert_eq!(config.lease_ttl(), Duration::from_secs(2));

        // FoundationDB parses, and is refused naming the key.
        let error = MgmtdConfig::parse(
            "data_dir = \"d\"\n[store]\nkind = \"fdb\"\ncluster_file = \"/etc/foundationdb/fdb.cluster\"",
        )
        .expect_err("no FoundationDB in this build");
        let text = message(&error);
        assert!(
            text.contains("store.kind") && text.contains("fdb"),
            "{text}"
        );

        // An unknown kind, a key of another kind and a short lease name
        // what is wrong.
        let error = MgmtdConfig::parse("data_dir = \"d\"\n[store]\nkind = \"etcd\"")
            .expect_err("unknown kind");
        let text = message(&error);
        assert!(text.contains("etcd") && text.contains("kv"), "{text}");
        let error =
            MgmtdConfig::parse("data_dir = \"d\"\n[store]\nkind = \"file\"\ncluster_file = \"x\"")
                .expect_err("cluster_file on a file store");
        assert!(message(&error).contains("cluster_file"), "{error:#}");
        let error =
            MgmtdConfig::parse("data_dir = \"d\"\nlease_ttl_ms = 10").expect_err("short lease");
        assert!(message(&error).contains("lease_ttl_ms"), "{error:#}");
    }

    #[test]
    fn storage_takes_one_manager_or_several() {
        let config = StorageDaemonConfig::parse(
            "node_id = 1\ndevices = [\"a\"]\nmgmt_addrs = [\"10.0.0.1:7000\", \"10.0.0.2:7000\"]",
        )
        .expect("two managers");
        assert_eq!(config.mgmt_addrs, ["10.0.0.1:7000", "10.0.0.2:7000"]);
        assert_eq!(
            config.storage_config("127.0.0.1:7100").mgmt_addrs,
            ["10.0.0.1:7000", "10.0.0.2:7000"]
        );
        let config =
            StorageDaemonConfig::parse("node_id = 1\ndevices = [\"a\"]\nmgmt = \"10.0.0.1:7000\"")
                .expect("one manager, the old key");
        assert_eq!(config.mgmt_addrs, ["10.0.0.1:7000"]);
        assert_eq!(config.mgmt, None);
        let error = StorageDaemonConfig::parse(
            "node_id = 1\ndevices = [\"a\"]\nmgmt = \"a:1\"\nmgmt_addrs = [\"b:1\"]",
        )
        .expect_err("both keys");
        assert!(message(&error).contains("mgmt_addrs"), "{error:#}");
        let error =
            StorageDaemonConfig::parse("node_id = 1\ndevices = [\"a\"]\nmgmt_addrs = [\"\"]")
                .expect_err("empty address");
        assert!(message(&error).contains("mgmt_addrs"), "{error:#}");
    }

    #[test]
    fn storage_defaults_and_advertise() {
        let config =
            StorageDaemonConfig::parse("node_id = 3\ndevices = [\"/dev/nvme0n1\"]").expect("valid");
        assert_eq!(config.listen, "127.0.0.1:7100");
        assert_eq!(config.mgmt_addrs, ["127.0.0.1:7000"]);
        assert_eq!(config.advertise, None);
        assert_eq!(
            (
                config.heartbeat_interval_ms,
                config.lease_timeout_ms,
                config.rpc_timeout_ms,
                config.forward_deadline_ms
            ),
            (1_000, 5_000, 5_000, 30_000)
        );
        let node = config.storage_config("127.0.0.1:7100");
        assert_eq!(node.node, NodeId(3));
        assert_eq!(node.addr, "127.0.0.1:7100");
        assert_eq!(node.lease_timeout, Duration::from_secs(5));

        let config = StorageDaemonConfig::parse(
            "node_id = 3\ndevices = [\"a\"]\nlisten = \"0.0.0.0:7100\"\nadvertise = \"10.0.0.3:7100\"",
        )
        .expect("valid");
        assert_eq!(config.storage_config("0.0.0.0:7100").addr, "10.0.0.3:7100");
    }

    /// The example configs document every key with its default: they must
    /// parse, and hold the defaults except where a key has none.
    #[test]
    fn deploy_examples_parse_and_show_the_defaults() {
        let mgmtd = MgmtdConfig::parse(include_str!("../deploy/mgmtd.toml")).expect("mgmtd.toml");
        let defaults = MgmtdConfig::parse("data_dir = \"data/mgmtd\"").expect("defaults");
        assert_eq!(mgmtd, defaults);
        let storage = StorageDaemonConfig::parse(include_str!("../deploy/storage.toml"))
            .expect("storage.toml");
        let defaults =
            StorageDaemonConfig::parse("node_id = 1\ndevices = [\"data/storage1-disk0.img\"]")
                .expect("defaults");
        assert_eq!(storage, defaults);
    }

    #[test]
    fn unknown_key_is_named() {
        let error =
            MgmtdConfig::parse("data_dir = \"d\"\nfailure_timout_ms = 5").expect_err("typo");
        assert!(message(&error).contains("failure_timout_ms"), "{error:#}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let error = StorageDaemonConfig::parse("devices = [\"a\"]").expect_err("no node_id");
        assert!(message(&error).contains("node_id"), "{error:#}");
        let error = MgmtdConfig::parse("listen = \"127.0.0.1:1\"").expect_err("no data_dir");
        assert!(message(&error).contains("data_dir"), "{error:#}");
    }

    #[test]
    fn wrong_type_is_named() {
        let error = StorageDaemonConfig::parse("node_id = \"one\"\ndevices = [\"a\"]")
            .expect_err("string id");
        let text = message(&error);
        assert!(text.contains("node_id"), "{text}");
        assert!(text.contains("invalid type"), "{text}");
    }

    #[test]
    fn semantic_checks_name_their_key() {
        let cases = [
            "node_id = 1\ndevices = []",
            "node_id = 1\ndevices = [\"a\"]\nlease_timeout_ms = 1500",
            "node_id = 1\ndevices = [\"a\"]\nlease_timeout_ms = 60000",
            "node_id = 1\ndevices = [\"a\"]\nforward_deadline_ms = 100",
            "node_id = 1\ndevices = [\"a\"]\nheartbeat_interval_ms = 0",
        ];
        let keys = [
            "devices",
            "lease_timeout_ms",
            "lease_timeout_ms",
            "forward_deadline_ms",
            "heartbeat_interval_ms",
        ];
        for (text, key) in cases.iter().zip(keys) {
            let error = StorageDaemonConfig::parse(text).expect_err(text);
            assert!(message(&error).contains(key), "{text}: {error:#}");
        }
        let error =
            MgmtdConfig::parse("data_dir = \"d\"\nmetrics_listen = \"9100\"").expect_err("no host");
        assert!(message(&error).contains("metrics_listen"), "{error:#}");
        let error = MgmtdConfig::parse("data_dir = \"d\"\nfailure_timeout_ms = 1000")
            .expect_err("shorter than two heartbeats");
        assert!(message(&error).contains("failure_timeout_ms"), "{error:#}");
    }

    #[test]
    fn load_names_the_file_and_resolves_paths_beside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("storage.toml");
        std::fs::write(
            &path,
            "node_id = 1\ndevices = [\"dev0.img\", \"/abs/dev1\"]",
        )
        .expect("write");
        let config = StorageDaemonConfig::load(&path).expect("valid");
        assert_eq!(
            config.devices,
            [dir.path().join("dev0.img"), PathBuf::from("/abs/dev1")]
        );

        std::fs::write(&path, "node_id = 1\ndevices = [\"a\"]\nbogus = 2").expect("write");
        let error = StorageDaemonConfig::load(&path).expect_err("unknown key");
        let text = message(&error);
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("bogus"), "{text}");

        // A store path is resolved beside the file too, and a bad store
        // names the file and the key.
        let mgmtd = dir.path().join("mgmtd.toml");
        std::fs::write(
            &mgmtd,
            "data_dir = \"m\"\n[store]\nkind = \"kv\"\npath = \"kv\"",
        )
        .expect("write");
        let config = MgmtdConfig::load(&mgmtd).expect("valid");
        assert_eq!(
            config.store.dir(&config.data_dir),
            Some(dir.path().join("kv"))
        );
        std::fs::write(
            &mgmtd,
            "data_dir = \"m\"\n[store]\nkind = \"fdb\"\ncluster_file = \"f\"",
        )
        .expect("write");
        let text = message(&MgmtdConfig::load(&mgmtd).expect_err("fdb"));
        assert!(text.contains(&mgmtd.display().to_string()), "{text}");
        assert!(text.contains("store.kind"), "{text}");

        let missing = dir.path().join("missing.toml");
        let error = MgmtdConfig::load(&missing).expect_err("no file");
        assert!(
            message(&error).contains(&missing.display().to_string()),
            "{error:#}"
        );
    }
}
