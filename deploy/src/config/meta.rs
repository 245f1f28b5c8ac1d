//! `flyfs meta --config F`: a metadata service's config (deploy/meta.toml).

use std::path::{Path, PathBuf};

use flyfs_fs_meta::ns::{INLINE_BYTES_LIMIT, LayoutSpec};
use flyfs_proto::ids::ChainTableId;
use serde::{Deserialize, Serialize};

use super::{
    ConfigError, ConfigFile, ManagerAddrs, RdmaConfig, TlsConfig, TransportKind, beside, check,
    check_address, check_metrics_listen, check_runtime_threads,
};

/// `flyfs meta`: one metadata service instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaDaemonConfig {
    /// Where the metadata RPC server listens (`host:port`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The cluster managers (`host:port`, the primary and its standbys; one
    /// may be written as a plain string).
    #[serde(default = "ManagerAddrs::local")]
    pub mgmt: ManagerAddrs,
    /// The embedded store's directory (`store.kind = "fjall"`, the
    /// default); not needed with FoundationDB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
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
    /// How long a client's write sessions outlive its last lease renewal
    /// before the reaper ends them (clients renew every third of it).
    #[serde(default = "default_client_lease_ms")]
    pub client_lease_ms: u64,
    /// How often the session reaper looks for sessions whose lease expired.
    #[serde(default = "default_reaper_interval_ms")]
    pub reaper_interval_ms: u64,
    /// The embedded store fsyncs every commit before it is answered, but
    /// namespace changes (see `durable_namespace_changes`) and a close that
    /// records no length, which it fsyncs within 10 ms (docs/metadata-schema.md);
    /// off loses the last commits on a power cut, not on a process crash.
    #[serde(default = "default_sync_on_commit")]
    pub sync_on_commit: bool,
    /// Every entry added, removed or renamed, and the length the flush of
    /// `close(2)` fixes, is durable before it is answered. Off (the
    /// default), it is answered once applied and visible
    /// to every client, and durable within 10 ms, at the next `fsync` or
    /// `fsyncdir`, or with the next durable commit (docs/metadata-schema.md,
    /// "Durability").
    #[serde(default)]
    pub durable_namespace_changes: bool,
    /// Files up to this many bytes, written from empty by one writer, are
    /// held by the metadata service with their inode instead of on storage
    /// (0: never; at most 65536 and the chunk size; docs/metadata-schema.md,
    /// "Inline data").
    #[serde(default = "default_inline_file_bytes_max")]
    pub inline_file_bytes_max: u32,
    /// Requests of client identities (mounts) naming uid 0 run as
    /// `squash_uid`/`squash_gid` (NFS's root_squash). Admin credentials are
    /// not squashed: they act as the uid their certificate names.
    #[serde(default)]
    pub root_squash: bool,
    #[serde(default = "default_squash_id")]
    pub squash_uid: u32,
    #[serde(default = "default_squash_id")]
    pub squash_gid: u32,
    /// Worker threads of the daemon's async runtime (RPC connections and
    /// handlers); 0, the default, is one per core. `flyfs up`, whose
    /// daemons share one machine's cores, gives each a share of them.
    #[serde(default)]
    pub runtime_threads: usize,
    /// Where the Prometheus metrics endpoint listens (`host:port`); none by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// This daemon's credentials (`[tls]`: `ca`, `cert`, `key`); required to
    /// start, since every connection is authenticated (docs/security.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Where the namespace lives (`[store]`).
    #[serde(default)]
    pub store: MetaStoreConfig,
    /// `transport = "tcp" | "rdma"`: how this service's storage client
    /// (garbage collection's chunk removals) reaches the storage nodes and
    /// the manager; with "rdma" its server also takes RDMA connections (and
    /// still TCP ones). TCP by default.
    #[serde(default)]
    pub transport: TransportKind,
    /// `[rdma]`: the RDMA device and connection shape, for
    /// `transport = "rdma"`.
    #[serde(default)]
    pub rdma: RdmaConfig,
}

/// `[store]` of `flyfs meta`: the transactional KV store of the namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum MetaStoreConfig {
    /// The embedded store (fjall) in `data_dir`: one process opens it, so
    /// one metadata service per store. The default.
    #[default]
    Fjall,
    /// FoundationDB: every metadata service of the cluster shares it (any
    /// instance serves any request). Needs a build with FoundationDB
    /// support.
    Fdb { cluster_file: PathBuf },
}

fn default_listen() -> String {
    "127.0.0.1:7001".into()
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
fn default_client_lease_ms() -> u64 {
    flyfs_fs_meta::ns::CLIENT_LEASE_MS_DEFAULT
}
fn default_reaper_interval_ms() -> u64 {
    10_000
}
/// The shortest lease: clients renew every third of it, and renewals and
/// reaping compare the clocks of different metadata instances.
const CLIENT_LEASE_MS_MIN: u64 = 3_000;

fn default_inline_file_bytes_max() -> u32 {
    flyfs_fs_meta::ns::INLINE_BYTES_DEFAULT
}
fn default_sync_on_commit() -> bool {
    true
}
/// `nobody` and `nogroup` on Debian.
fn default_squash_id() -> u32 {
    65534
}

impl MetaDaemonConfig {
    /// A metadata service on the embedded store in `data_dir`, every other
    /// key at its default.
    pub fn new(data_dir: impl Into<PathBuf>) -> MetaDaemonConfig {
        MetaDaemonConfig {
            listen: default_listen(),
            mgmt: ManagerAddrs::local(),
            data_dir: Some(data_dir.into()),
            chain_table: default_chain_table(),
            chunk_size: default_chunk_size(),
            stripe: default_stripe(),
            gc_delay_ms: default_gc_delay_ms(),
            gc_interval_ms: default_gc_interval_ms(),
            client_lease_ms: default_client_lease_ms(),
            reaper_interval_ms: default_reaper_interval_ms(),
            sync_on_commit: default_sync_on_commit(),
            durable_namespace_changes: false,
            inline_file_bytes_max: default_inline_file_bytes_max(),
            root_squash: false,
            squash_uid: default_squash_id(),
            squash_gid: default_squash_id(),
            runtime_threads: 0,
            metrics_listen: None,
            tls: None,
            store: MetaStoreConfig::Fjall,
            transport: TransportKind::Tcp,
            rdma: RdmaConfig::default(),
        }
    }

    /// The root directory's default layout.
    pub fn layout(&self) -> LayoutSpec {
        LayoutSpec {
            chain_table: ChainTableId(self.chain_table),
            chunk_size: self.chunk_size,
            stripe: self.stripe,
        }
    }
}

impl ConfigFile for MetaDaemonConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_address(&self.listen, "listen")?;
        self.mgmt.validate("mgmt")?;
        match &self.store {
            MetaStoreConfig::Fjall => check(
                self.data_dir
                    .as_ref()
                    .is_some_and(|d| !d.as_os_str().is_empty()),
                "data_dir",
                || {
                    "is missing or empty: the embedded store (store.kind = \"fjall\") needs it"
                        .into()
                },
            )?,
            MetaStoreConfig::Fdb { cluster_file } => {
                check_fdb(cluster_file, "kind = \"fjall\" (embedded)")?
            }
        }
        check_runtime_threads(self.runtime_threads)?;
        check_metrics_listen(self.metrics_listen.as_deref())?;
        self.rdma.validate(self.transport)?;
        check(self.gc_interval_ms > 0, "gc_interval_ms", || {
            "must be at least 1".into()
        })?;
        check(
            self.client_lease_ms >= CLIENT_LEASE_MS_MIN,
            "client_lease_ms",
            || {
                format!(
                    "is {} ms, below the minimum of {CLIENT_LEASE_MS_MIN} ms: clients renew every \
                     third of it, and it must stay far above the clock skew between metadata \
                     services",
                    self.client_lease_ms
                )
            },
        )?;
        check(self.reaper_interval_ms > 0, "reaper_interval_ms", || {
            "must be at least 1".into()
        })?;
        self.layout().validate().map_err(|e| ConfigError::Key {
            key: "chunk_size`/`stripe".into(),
            problem: e.to_string(),
        })?;
        check(
            self.inline_file_bytes_max <= INLINE_BYTES_LIMIT
                && self.inline_file_bytes_max <= self.chunk_size,
            "inline_file_bytes_max",
            || {
                format!(
                    "is {}: at most {INLINE_BYTES_LIMIT} and the chunk size ({})",
                    self.inline_file_bytes_max, self.chunk_size
                )
            },
        )
    }

    fn resolve_beside(&mut self, dir: &Path) {
        if let Some(tls) = &mut self.tls {
            tls.resolve_beside(dir);
        }
        if let Some(data_dir) = &mut self.data_dir {
            *data_dir = beside(dir, data_dir);
        }
        if let MetaStoreConfig::Fdb { cluster_file } = &mut self.store {
            *cluster_file = beside(dir, cluster_file);
        }
    }
}

/// `store.kind = "fdb"`: refused before anything starts when this build
/// has no FoundationDB support (it needs libfdb_c to link), rather than at
/// the first transaction; `instead` says what to use.
pub(crate) fn check_fdb(cluster_file: &Path, instead: &str) -> Result<(), ConfigError> {
    if !cfg!(feature = "fdb") {
        return Err(ConfigError::Unsupported {
            key: "store.kind".into(),
            problem: format!(
                "\"fdb\" needs FoundationDB support, which this build of flyfs lacks (build \
                 with `--features fdb`, which needs libfdb_c 7.3); use {instead}"
            ),
        });
    }
    check(
        !cluster_file.as_os_str().is_empty(),
        "store.cluster_file",
        || "is empty".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::message;

    #[test]
    fn defaults_and_errors_name_their_key() {
        let config = MetaDaemonConfig::parse("data_dir = \"m\"").expect("defaults");
        assert_eq!(config, MetaDaemonConfig::new("m"));
        assert_eq!(config.listen, "127.0.0.1:7001");
        assert_eq!(config.mgmt.0, ["127.0.0.1:7000"]);
        assert_eq!(config.chunk_size, 1 << 20);
        assert!(config.sync_on_commit);
        assert!(!config.durable_namespace_changes);
        assert_eq!(config.inline_file_bytes_max, 16 << 10);
        let e = MetaDaemonConfig::parse("data_dir = \"m\"\ninline_file_bytes_max = 65537")
            .expect_err("too large");
        assert!(message(&e).contains("inline_file_bytes_max"), "{e:#}");
        let e = MetaDaemonConfig::parse("data_dir = \"m\"\nchunk_size = 1000").expect_err("bad");
        assert!(message(&e).contains("chunk_size"), "{e:#}");
        let e = MetaDaemonConfig::parse("data_dir = \"m\"\nstripes = 2").expect_err("unknown");
        assert!(message(&e).contains("stripes"), "{e:#}");
        let e = MetaDaemonConfig::parse("listen = \"x\"").expect_err("missing");
        assert!(message(&e).contains("data_dir"), "{e:#}");
        let e = MetaDaemonConfig::parse("data_dir = \"m\"\nmgmt = []").expect_err("no manager");
        assert!(message(&e).contains("mgmt"), "{e:#}");
        assert_eq!(config.client_lease_ms, 60_000);
        let e = MetaDaemonConfig::parse("data_dir = \"m\"\nclient_lease_ms = 100")
            .expect_err("too short a lease");
        let text = message(&e);
        assert!(
            text.contains("client_lease_ms") && text.contains("100 ms") && text.contains("3000"),
            "{text}"
        );
        let e = MetaDaemonConfig::parse("data_dir = \"m\"\nreaper_interval_ms = 0")
            .expect_err("no interval");
        assert!(message(&e).contains("reaper_interval_ms"), "{e:#}");
    }

    #[test]
    fn takes_one_manager_or_several() {
        let config =
            MetaDaemonConfig::parse("data_dir = \"m\"\nmgmt = [\"a:1\", \"b:1\"]").expect("two");
        assert_eq!(config.mgmt.0, ["a:1", "b:1"]);
        let config = MetaDaemonConfig::parse("data_dir = \"m\"\nmgmt = \"a:1\"").expect("one");
        assert_eq!(config.mgmt.0, ["a:1"]);
    }

    #[test]
    fn store_kinds() {
        let config = MetaDaemonConfig::parse("data_dir = \"m\"\n[store]\nkind = \"fjall\"")
            .expect("embedded");
        assert_eq!(config.store, MetaStoreConfig::Fjall);
        let fdb =
            MetaDaemonConfig::parse("[store]\nkind = \"fdb\"\ncluster_file = \"fdb.cluster\"");
        if cfg!(feature = "fdb") {
            assert_eq!(
                fdb.expect("FoundationDB needs no data_dir").store,
                MetaStoreConfig::Fdb {
                    cluster_file: "fdb.cluster".into()
                }
            );
        } else {
            let text = message(&fdb.expect_err("no FoundationDB in this build"));
            assert!(
                text.contains("store.kind") && text.contains("fdb"),
                "{text}"
            );
        }
        let e = MetaDaemonConfig::parse("data_dir = \"m\"\n[store]\nkind = \"redis\"")
            .expect_err("unknown kind");
        let text = message(&e);
        assert!(text.contains("redis") && text.contains("fjall"), "{text}");
    }

    #[test]
    fn written_configs_read_back_identically() {
        let mut config = MetaDaemonConfig::new("/var/lib/flyfs/meta");
        config.mgmt = ManagerAddrs(vec!["10.0.0.1:7000".into(), "10.0.0.2:7000".into()]);
        config.stripe = 6;
        config.metrics_listen = Some("127.0.0.1:9101".into());
        assert_eq!(
            MetaDaemonConfig::parse(&config.to_toml()).expect("reads back"),
            config
        );
    }

    #[test]
    fn load_resolves_data_dir_beside_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.toml");
        std::fs::write(&path, "data_dir = \"meta\"").expect("write");
        let config = MetaDaemonConfig::load(&path).expect("valid");
        assert_eq!(config.data_dir, Some(dir.path().join("meta")));
    }
}
