//! `flyfs storage --config F`: a storage node's config
//! (deploy/storage.toml).

use std::path::{Path, PathBuf};
use std::time::Duration;

use flyfs_craq::{ScrubConfig, StorageConfig};
use flyfs_proto::ids::NodeId;
use serde::{Deserialize, Serialize};

use super::mgmtd::default_heartbeat_interval_ms;
use super::{
    ConfigError, ConfigFile, ManagerAddrs, RdmaConfig, RpcServerLimits, TlsConfig, TransportKind,
    beside, check, check_address, check_metrics_listen, check_runtime_threads, positive,
};

/// The longest lease a storage node may hold. A lease must end before the
/// manager gives up on the node (its `failure_timeout_ms`), which a storage
/// daemon cannot see; 60 s is 3FS's failure timeout, the longest any sane
/// manager waits, so a lease above it is certainly a mistake.
pub const LEASE_TIMEOUT_MS_MAX: u64 = 60_000;

/// `flyfs storage`: one storage node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageDaemonConfig {
    /// This node's id in the cluster; unique per node, stable across restarts.
    pub node_id: u32,
    /// Where the storage RPC server listens (`host:port`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The address others reach this node at; defaults to the address the
    /// listener is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The cluster managers' addresses (the primary and its standbys); one
    /// may be written as a plain string. `mgmt_addrs` is the older name.
    #[serde(default = "ManagerAddrs::local", alias = "mgmt_addrs")]
    pub mgmt: ManagerAddrs,
    /// Devices (or files) formatted by `flyfs format`; a target's disk index
    /// is the position of its device in this list. `vfio:<PCI address>`
    /// names an NVMe controller driven from userspace (flyfs-bypass's NVMe
    /// driver) and is not a path.
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
    /// Forward an update down the chain while this replica's Prepare is
    /// still being made durable: a journal commit less per replica on a
    /// write's path, but a write readers saw can be lost if every replica
    /// of its chain fails at once (ARCHITECTURE.md, craq). Off by default.
    #[serde(default)]
    pub overlap_prepare_and_forward: bool,
    /// Worker threads of the daemon's async runtime (RPC connections and
    /// handlers); 0, the default, is one per core. `flyfs up`, whose
    /// daemons share one machine's cores, gives each a share of them.
    #[serde(default)]
    pub runtime_threads: usize,
    /// Where the Prometheus metrics endpoint listens (`host:port`); none by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// `transport = "tcp" | "rdma"`: how this daemon's RPC client reaches
    /// its peers; with "rdma" its server also takes RDMA connections (and
    /// still TCP ones). TCP by default.
    #[serde(default)]
    pub transport: TransportKind,
    /// `[scrub]`: how fast the node re-reads its chunks to find rot, and how
    /// many repairs from healthy replicas it runs at once.
    #[serde(default)]
    pub scrub: ScrubDaemonConfig,
    /// This daemon's credentials (`[tls]`: `ca`, `cert`, `key`); required to
    /// start, since every connection is authenticated (docs/security.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// `[rpc]`: what the RPC server lets peers make it hold, which sizes the
    /// daemon's resident memory (docs/security.md).
    #[serde(default)]
    pub rpc: RpcServerLimits,
    /// `[rdma]`: the RDMA device and connection shape, for
    /// `transport = "rdma"`.
    #[serde(default)]
    pub rdma: RdmaConfig,
}

/// `[scrub]` of the storage config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrubDaemonConfig {
    /// Bytes per second the node reads to verify its chunks, shared evenly
    /// by its devices; 0 turns the scrubber off.
    pub bytes_per_s: u64,
    /// A pass over a device starts at least this long after the previous
    /// one started.
    pub pass_interval_s: u64,
    /// Repairs from a healthy replica running at once, at most.
    pub repairs_max: u32,
}

impl Default for ScrubDaemonConfig {
    fn default() -> ScrubDaemonConfig {
        let node = ScrubConfig::default();
        ScrubDaemonConfig {
            bytes_per_s: node.bytes_per_s,
            pass_interval_s: node.pass_interval.as_secs(),
            repairs_max: u32::try_from(node.repairs_max).unwrap_or(u32::MAX),
        }
    }
}

impl ScrubDaemonConfig {
    fn scrub_config(&self) -> ScrubConfig {
        ScrubConfig {
            bytes_per_s: self.bytes_per_s,
            pass_interval: Duration::from_secs(self.pass_interval_s),
            repairs_max: self.repairs_max as usize,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:7100".to_string()
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

impl StorageDaemonConfig {
    /// Node `node_id` on `devices`, every other key at its default.
    pub fn new(node_id: u32, devices: Vec<PathBuf>) -> StorageDaemonConfig {
        StorageDaemonConfig {
            node_id,
            listen: default_listen(),
            advertise: None,
            mgmt: ManagerAddrs::local(),
            devices,
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            lease_timeout_ms: default_lease_timeout_ms(),
            rpc_timeout_ms: default_rpc_timeout_ms(),
            forward_deadline_ms: default_forward_deadline_ms(),
            overlap_prepare_and_forward: false,
            runtime_threads: 0,
            metrics_listen: None,
            transport: TransportKind::Tcp,
            scrub: ScrubDaemonConfig::default(),
            tls: None,
            rpc: RpcServerLimits::default(),
            rdma: RdmaConfig::default(),
        }
    }

    /// The node's settings; `bound` is the address the listener got, which
    /// is advertised unless `advertise` says otherwise (it resolves port 0).
    pub fn storage_config(&self, bound: &str) -> StorageConfig {
        let addr = self.advertise.clone().unwrap_or_else(|| bound.to_string());
        let mut config = StorageConfig::new(NodeId(self.node_id), addr, String::new());
        config.mgmt_addrs = self.mgmt.0.clone();
        config.heartbeat_interval = Duration::from_millis(self.heartbeat_interval_ms);
        config.lease_timeout = Duration::from_millis(self.lease_timeout_ms);
        config.rpc_timeout = Duration::from_millis(self.rpc_timeout_ms);
        config.forward_deadline = Duration::from_millis(self.forward_deadline_ms);
        config.overlap_prepare_and_forward = self.overlap_prepare_and_forward;
        config.scrub = self.scrub.scrub_config();
        config
    }
}

impl ConfigFile for StorageDaemonConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_address(&self.listen, "listen")?;
        self.mgmt.validate("mgmt")?;
        check(
            self.advertise.as_ref().is_none_or(|a| !a.is_empty()),
            "advertise",
            || "is empty (leave it out to advertise the listening address)".into(),
        )?;
        check(!self.devices.is_empty(), "devices", || {
            "lists no device".into()
        })?;
        check_runtime_threads(self.runtime_threads)?;
        check_metrics_listen(self.metrics_listen.as_deref())?;
        self.rpc.validate()?;
        self.rdma.validate(self.transport)?;
        positive(self.heartbeat_interval_ms, "heartbeat_interval_ms")?;
        positive(u64::from(self.scrub.repairs_max), "scrub.repairs_max")?;
        // A pass every second or more often is a hot loop over an empty or
        // small device, not a schedule.
        positive(self.scrub.pass_interval_s, "scrub.pass_interval_s")?;
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

    fn resolve_beside(&mut self, dir: &Path) {
        if let Some(tls) = &mut self.tls {
            tls.resolve_beside(dir);
        }
        for device in &mut self.devices {
            // `vfio:0000:00:04.0` names a PCI function, not a file beside
            // the config (the prefix is flyfs-bypass's `nvme::NAME_PREFIX`).
            if !device
                .to_str()
                .is_some_and(|name| name.starts_with("vfio:"))
            {
                *device = beside(dir, device);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::message;

    #[test]
    fn vfio_device_names_are_not_paths() {
        let mut config = StorageDaemonConfig::new(
            1,
            vec![
                PathBuf::from("disk0.img"),
                PathBuf::from("vfio:0000:00:04.0"),
            ],
        );
        config.resolve_beside(Path::new("/etc/flyfs"));
        assert_eq!(
            config.devices,
            [
                PathBuf::from("/etc/flyfs/disk0.img"),
                PathBuf::from("vfio:0000:00:04.0")
            ]
        );
    }

    #[test]
    fn takes_one_manager_or_several() {
        let config = StorageDaemonConfig::parse(
            "node_id = 1\ndevices = [\"a\"]\nmgmt = [\"10.0.0.1:7000\", \"10.0.0.2:7000\"]",
        )
        .expect("two managers");
        assert_eq!(config.mgmt.0, ["10.0.0.1:7000", "10.0.0.2:7000"]);
        assert_eq!(
            config.storage_config("127.0.0.1:7100").mgmt_addrs,
            ["10.0.0.1:7000", "10.0.0.2:7000"]
        );
        let config =
            StorageDaemonConfig::parse("node_id = 1\ndevices = [\"a\"]\nmgmt = \"10.0.0.1:7000\"")
                .expect("one manager as a string");
        assert_eq!(config.mgmt.0, ["10.0.0.1:7000"]);
        let config = StorageDaemonConfig::parse(
            "node_id = 1\ndevices = [\"a\"]\nmgmt_addrs = [\"10.0.0.1:7000\"]",
        )
        .expect("the older key");
        assert_eq!(config.mgmt.0, ["10.0.0.1:7000"]);
        let error = StorageDaemonConfig::parse(
            "node_id = 1\ndevices = [\"a\"]\nmgmt = \"a:1\"\nmgmt_addrs = [\"b:1\"]",
        )
        .expect_err("both keys");
        assert!(message(&error).contains("mgmt"), "{error:#}");
        for bad in ["[\"\"]", "[]"] {
            let error = StorageDaemonConfig::parse(&format!(
                "node_id = 1\ndevices = [\"a\"]\nmgmt = {bad}"
            ))
            .expect_err("no usable address");
            assert!(message(&error).contains("mgmt"), "{error:#}");
        }
    }

    #[test]
    fn defaults_and_advertise() {
        let config =
            StorageDaemonConfig::parse("node_id = 3\ndevices = [\"/dev/nvme0n1\"]").expect("valid");
        assert_eq!(
            config,
            StorageDaemonConfig::new(3, vec!["/dev/nvme0n1".into()])
        );
        assert_eq!(config.listen, "127.0.0.1:7100");
        assert_eq!(config.mgmt.0, ["127.0.0.1:7000"]);
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
        assert_eq!(
            (
                config.scrub.bytes_per_s,
                config.scrub.pass_interval_s,
                config.scrub.repairs_max
            ),
            (64 << 20, 86_400, 4)
        );
        let node = config.storage_config("127.0.0.1:7100");
        assert_eq!(node.scrub, ScrubConfig::default());
        assert_eq!(node.node, NodeId(3));
        assert_eq!(node.addr, "127.0.0.1:7100");
        assert_eq!(node.lease_timeout, Duration::from_secs(5));

        let config = StorageDaemonConfig::parse(
            "node_id = 3\ndevices = [\"a\"]\nlisten = \"0.0.0.0:7100\"\nadvertise = \"10.0.0.3:7100\"",
        )
        .expect("valid");
        assert_eq!(config.storage_config("0.0.0.0:7100").addr, "10.0.0.3:7100");
    }

    #[test]
    fn the_scrub_table_reaches_the_node() {
        let config = StorageDaemonConfig::parse(
            "node_id = 1\ndevices = [\"a\"]\n[scrub]\nbytes_per_s = 0\npass_interval_s = 60\nrepairs_max = 2",
        )
        .expect("valid");
        let node = config.storage_config("127.0.0.1:7100").scrub;
        assert_eq!(
            node,
            ScrubConfig {
                bytes_per_s: 0,
                pass_interval: Duration::from_secs(60),
                repairs_max: 2,
            }
        );
    }

    #[test]
    fn missing_and_mistyped_keys_are_named() {
        let error = StorageDaemonConfig::parse("devices = [\"a\"]").expect_err("no node_id");
        assert!(message(&error).contains("node_id"), "{error:#}");
        let error = StorageDaemonConfig::parse("node_id = \"one\"\ndevices = [\"a\"]")
            .expect_err("string id");
        let text = message(&error);
        assert!(text.contains("node_id"), "{text}");
        assert!(text.contains("invalid type"), "{text}");
    }

    #[test]
    fn semantic_checks_name_their_key() {
        let cases = [
            ("node_id = 1\ndevices = []", "devices"),
            (
                "node_id = 1\ndevices = [\"a\"]\nlease_timeout_ms = 1500",
                "lease_timeout_ms",
            ),
            (
                "node_id = 1\ndevices = [\"a\"]\nlease_timeout_ms = 60000",
                "lease_timeout_ms",
            ),
            (
                "node_id = 1\ndevices = [\"a\"]\nforward_deadline_ms = 100",
                "forward_deadline_ms",
            ),
            (
                "node_id = 1\ndevices = [\"a\"]\nheartbeat_interval_ms = 0",
                "heartbeat_interval_ms",
            ),
            (
                "node_id = 1\ndevices = [\"a\"]\n[scrub]\nrepairs_max = 0",
                "scrub.repairs_max",
            ),
            (
                "node_id = 1\ndevices = [\"a\"]\n[scrub]\npass_interval_s = 0",
                "scrub.pass_interval_s",
            ),
            (
                "node_id = 1\ndevices = [\"a\"]\n[scrub]\nbytes_per_second = 1",
                "bytes_per_second",
            ),
        ];
        for (text, key) in cases {
            let error = StorageDaemonConfig::parse(text).expect_err(text);
            assert!(message(&error).contains(key), "{text}: {error:#}");
        }
    }

    #[test]
    fn written_configs_read_back_identically() {
        let mut config = StorageDaemonConfig::new(2, vec!["/srv/d0.img".into(), "d1".into()]);
        config.mgmt = ManagerAddrs(vec!["10.0.0.1:7000".into(), "10.0.0.2:7000".into()]);
        config.advertise = Some("10.0.0.5:7100".into());
        config.scrub = ScrubDaemonConfig {
            bytes_per_s: 0,
            pass_interval_s: 3600,
            repairs_max: 1,
        };
        assert_eq!(
            StorageDaemonConfig::parse(&config.to_toml()).expect("reads back"),
            config
        );
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
    }
}
