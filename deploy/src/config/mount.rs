//! `flyfs mount --config F`: a FUSE mount's config (deploy/mount.toml).

use std::path::{Path, PathBuf};
use std::time::Duration;

use flyfs_client::FsConfig;
use flyfs_fuse::FuseOptions;
use serde::{Deserialize, Serialize};

use super::{
    ConfigError, ConfigFile, ManagerAddrs, RdmaConfig, TlsConfig, TransportKind, check,
    check_metrics_listen, positive,
};

/// `flyfs mount`: one FUSE mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountConfig {
    /// Where to mount (an existing directory).
    pub mount_point: PathBuf,
    /// The cluster managers (`host:port`), for the storage routing.
    #[serde(default = "ManagerAddrs::local")]
    pub mgmt: ManagerAddrs,
    /// Metadata service instances (`host:port`), tried in turn.
    #[serde(default = "default_meta")]
    pub meta: Vec<String>,
    /// This client's id in write sessions; 0 picks a random one.
    #[serde(default)]
    pub client_id: u64,
    /// Threads reading FUSE requests (the work runs on the tokio runtime).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// How long the kernel may cache attributes and names.
    #[serde(default = "default_timeout_ms")]
    pub attr_timeout_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub entry_timeout_ms: u64,
    /// How long the kernel may remember that a name does not exist; 0:
    /// it asks every time.
    #[serde(default = "default_timeout_ms")]
    pub negative_timeout_ms: u64,
    /// The kernel checks permissions (the metadata service always does).
    #[serde(default = "default_true")]
    pub default_permissions: bool,
    /// Users other than root may use the mount.
    #[serde(default = "default_true")]
    pub allow_other: bool,
    /// The client's write-back buffer per open file, buffers in flight
    /// per file, and the most it reads ahead (see `FsConfig`).
    #[serde(default = "default_write_buffer_bytes")]
    pub write_buffer_bytes: usize,
    #[serde(default = "default_write_flushes_in_flight")]
    pub write_flushes_in_flight: usize,
    #[serde(default = "default_readahead_bytes_max")]
    pub readahead_bytes_max: u64,
    /// Root's chmod, chown and explicit-time changes to a file this client
    /// alone is writing wait for the file's next flush, fsync or close and
    /// go with it (see `FsConfig::defer_root_setattrs`). Turn off when the
    /// metadata service squashes root, so that a refused change fails at
    /// once instead of at close.
    #[serde(default = "default_true")]
    pub defer_root_setattrs: bool,
    /// Bytes of the block cache random reads go through; 0 turns it off.
    /// Each hit is checked against the chunk's committed version in the
    /// read's round trip (see `FsConfig::block_cache_bytes`).
    #[serde(default = "default_block_cache_bytes")]
    pub block_cache_bytes: u64,
    /// The kernel's read-ahead on the mount (its `read_ahead_kb`); 0
    /// leaves the kernel's default.
    #[serde(default = "default_kernel_readahead_bytes")]
    pub kernel_readahead_bytes: u64,
    /// Where to serve Prometheus metrics (`host:port`); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// The Unix socket applications reach native (zero-copy) I/O on
    /// (docs/native-io.md); no native I/O when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_socket: Option<PathBuf>,
    /// This daemon's credentials (`[tls]`: `ca`, `cert`, `key`); required to
    /// start, since every connection is authenticated (docs/security.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// `transport = "tcp" | "rdma"`: how the mount's storage client reaches
    /// the storage nodes and the manager (the metadata service is reached
    /// over TCP: its messages are small). TCP by default.
    #[serde(default)]
    pub transport: TransportKind,
    /// `[rdma]`: the RDMA device and connection shape, for
    /// `transport = "rdma"`.
    #[serde(default)]
    pub rdma: RdmaConfig,
}

fn default_meta() -> Vec<String> {
    vec!["127.0.0.1:7001".into()]
}
fn default_threads() -> usize {
    4
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_true() -> bool {
    true
}
fn default_write_buffer_bytes() -> usize {
    FsConfig::default().write_buffer_bytes
}
fn default_write_flushes_in_flight() -> usize {
    FsConfig::default().write_flushes_in_flight
}
fn default_readahead_bytes_max() -> u64 {
    FsConfig::default().readahead_bytes_max
}
fn default_block_cache_bytes() -> u64 {
    FsConfig::default().block_cache_bytes
}
fn default_kernel_readahead_bytes() -> u64 {
    1 << 20
}

impl MountConfig {
    /// A mount at `mount_point`, every other key at its default.
    pub fn new(mount_point: impl Into<PathBuf>) -> MountConfig {
        MountConfig {
            mount_point: mount_point.into(),
            mgmt: ManagerAddrs::local(),
            meta: default_meta(),
            client_id: 0,
            threads: default_threads(),
            attr_timeout_ms: default_timeout_ms(),
            entry_timeout_ms: default_timeout_ms(),
            negative_timeout_ms: default_timeout_ms(),
            default_permissions: true,
            allow_other: true,
            write_buffer_bytes: default_write_buffer_bytes(),
            write_flushes_in_flight: default_write_flushes_in_flight(),
            readahead_bytes_max: default_readahead_bytes_max(),
            defer_root_setattrs: true,
            block_cache_bytes: default_block_cache_bytes(),
            kernel_readahead_bytes: default_kernel_readahead_bytes(),
            metrics_listen: None,
            native_socket: None,
            tls: None,
            transport: TransportKind::Tcp,
            rdma: RdmaConfig::default(),
        }
    }

    pub fn fs_config(&self) -> FsConfig {
        FsConfig {
            write_buffer_bytes: self.write_buffer_bytes,
            write_flushes_in_flight: self.write_flushes_in_flight,
            readahead_bytes_max: self.readahead_bytes_max,
            defer_root_setattrs: self.defer_root_setattrs,
            block_cache_bytes: self.block_cache_bytes,
            ..FsConfig::default()
        }
    }

    pub fn fuse_options(&self) -> FuseOptions {
        FuseOptions {
            attr_ttl: Duration::from_millis(self.attr_timeout_ms),
            entry_ttl: Duration::from_millis(self.entry_timeout_ms),
            negative_ttl: Duration::from_millis(self.negative_timeout_ms),
            default_permissions: self.default_permissions,
            allow_other: self.allow_other,
            threads: self.threads,
            ..FuseOptions::default()
        }
    }
}

impl ConfigFile for MountConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check(
            !self.mount_point.as_os_str().is_empty(),
            "mount_point",
            || "is empty".into(),
        )?;
        self.mgmt.validate("mgmt")?;
        check(!self.meta.is_empty(), "meta", || "lists no address".into())?;
        check(self.meta.iter().all(|a| !a.is_empty()), "meta", || {
            "has an empty address".into()
        })?;
        positive(self.threads as u64, "threads")?;
        positive(self.write_buffer_bytes as u64, "write_buffer_bytes")?;
        positive(
            self.write_flushes_in_flight as u64,
            "write_flushes_in_flight",
        )?;
        check(
            self.kernel_readahead_bytes.is_multiple_of(1024),
            "kernel_readahead_bytes",
            || "must be a multiple of 1024".into(),
        )?;
        if let Some(socket) = &self.native_socket {
            // sun_path holds 108 bytes with its terminating NUL.
            let len = socket.as_os_str().len();
            check(len > 0 && len < 108, "native_socket", || {
                format!("must be a path of 1 to 107 bytes, not {len}")
            })?;
        }
        check_metrics_listen(self.metrics_listen.as_deref())?;
        self.rdma.validate(self.transport)
    }

    fn resolve_beside(&mut self, dir: &Path) {
        if let Some(tls) = &mut self.tls {
            tls.resolve_beside(dir);
        }
        if let Some(socket) = &mut self.native_socket
            && socket.is_relative()
        {
            *socket = dir.join(&*socket);
        }
        if self.mount_point.is_relative() {
            // Absolute, so that logs and `mount` show the same path.
            let joined = dir.join(&self.mount_point);
            self.mount_point = std::path::absolute(&joined).unwrap_or(joined);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::message;

    #[test]
    fn defaults_and_errors_name_their_key() {
        let config = MountConfig::parse("mount_point = \"/mnt/flyfs\"").expect("defaults");
        assert_eq!(config, MountConfig::new("/mnt/flyfs"));
        assert_eq!(config.mgmt.0, ["127.0.0.1:7000"]);
        assert_eq!(config.meta, ["127.0.0.1:7001"]);
        assert_eq!(config.threads, 4);
        assert_eq!(config.attr_timeout_ms, 1000);
        assert!(config.default_permissions && config.allow_other);
        assert_eq!(
            config.write_buffer_bytes,
            FsConfig::default().write_buffer_bytes
        );
        assert_eq!(config.metrics_listen, None);
        let e = MountConfig::parse("mount_point = \"m\"\nthreads = 0").expect_err("bad");
        assert!(message(&e).contains("threads"), "{e:#}");
        let e = MountConfig::parse("mount_point = \"m\"\nthread = 2").expect_err("unknown");
        assert!(message(&e).contains("thread"), "{e:#}");
        let e = MountConfig::parse("mgmt = []").expect_err("missing");
        assert!(message(&e).contains("mount_point"), "{e:#}");
        let e = MountConfig::parse("mount_point = \"m\"\nmeta = []").expect_err("empty");
        assert!(message(&e).contains("meta"), "{e:#}");
        let e =
            MountConfig::parse("mount_point = \"m\"\nmetrics_listen = \"\"").expect_err("empty");
        assert!(message(&e).contains("metrics_listen"), "{e:#}");
        assert_eq!(config.native_socket, None);
        let e = MountConfig::parse(&format!(
            "mount_point = \"m\"\nnative_socket = \"/{}\"",
            "s".repeat(120)
        ))
        .expect_err("too long");
        assert!(message(&e).contains("native_socket"), "{e:#}");
    }

    #[test]
    fn written_configs_read_back_identically() {
        let mut config = MountConfig::new("/mnt/flyfs");
        config.mgmt = ManagerAddrs(vec!["10.0.0.1:7000".into(), "10.0.0.2:7000".into()]);
        config.meta = vec!["10.0.0.1:7001".into()];
        config.metrics_listen = Some("127.0.0.1:9105".into());
        assert_eq!(
            MountConfig::parse(&config.to_toml()).expect("reads back"),
            config
        );
    }

    #[test]
    fn relative_mount_points_are_taken_from_the_config_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mount.toml");
        std::fs::write(&path, "mount_point = \"mnt\"").expect("write");
        let config = MountConfig::load(&path).expect("load");
        assert_eq!(config.mount_point, dir.path().join("mnt"));
        let e = MountConfig::load(&dir.path().join("none.toml")).expect_err("missing");
        assert!(message(&e).contains("none.toml"), "{e:#}");
    }
}
