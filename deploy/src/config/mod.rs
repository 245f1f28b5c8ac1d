//! The daemons' configuration files (TOML): what `flyfs mgmtd`, `storage`,
//! `meta` and `mount` read with `--config`, their defaults, the checks that
//! run before a daemon starts, and how tools write them.
//!
//! Every key but the ones without a sensible default (`data_dir`,
//! `node_id`, `devices`, `mount_point`) has a default, and unknown keys are
//! refused, so a misspelt key fails loudly instead of silently keeping a
//! default. Errors name the file, the key and the problem: toml's own error
//! (which quotes the offending line) is wrapped with the path, and the
//! semantic checks name their key. The examples beside this crate
//! (`deploy/*.toml`) list every key with its default.
//!
//! Every config has a `[tls]` table naming the process's credentials (CA
//! certificate, certificate, key); a daemon without one refuses to start.
//!
//! Relative paths in a file (`data_dir`, `devices`, `store.path`,
//! `store.cluster_file`, `mount_point`, `tls.*`) are taken relative to the directory
//! holding the file, so a config and its data can move together and a
//! daemon's working directory does not matter.
//!
//! Every config is also [`Serialize`]: a tool that writes one builds the
//! struct (starting from `new`, which fills in the defaults) and calls
//! [`ConfigFile::to_toml`], so what it writes is what the daemon reads.

mod meta;
mod mgmtd;
mod mount;
mod rpc;
mod storage;
mod transport;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

pub use meta::{MetaDaemonConfig, MetaStoreConfig};
pub use mgmtd::{LEASE_TTL_MS_MIN, MgmtdConfig, StoreConfig};
pub use mount::MountConfig;
pub use rpc::RpcServerLimits;
pub use storage::{LEASE_TIMEOUT_MS_MAX, StorageDaemonConfig};
pub use transport::{RdmaConfig, TransportKind};

/// `[tls]` of every config: where this process's credentials are
/// (docs/security.md). `flyfs up` writes them under `DATA/tls/`;
/// `flyfs certs issue` makes them for other machines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA's certificate: the only certificate authority trusted.
    pub ca: PathBuf,
    /// This process's certificate (PEM), naming its flyfs identity.
    pub cert: PathBuf,
    /// Its private key (PEM); refused if group or others can read it.
    pub key: PathBuf,
}

impl TlsConfig {
    /// `dir/ca.pem`, `dir/<stem>.pem`, `dir/<stem>.key`: the layout of a
    /// credentials directory.
    pub fn in_dir(dir: &Path, stem: &str) -> TlsConfig {
        TlsConfig {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }

    fn resolve_beside(&mut self, dir: &Path) {
        self.ca = beside(dir, &self.ca);
        self.cert = beside(dir, &self.cert);
        self.key = beside(dir, &self.key);
    }
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Anything wrong inside the file, with the file's name.
    #[error("config file {} is invalid", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    /// Not TOML, or not of the config's shape (an unknown or missing key, a
    /// wrong type): toml's message names the key and quotes the line.
    #[error(transparent)]
    Syntax(#[from] toml::de::Error),
    /// A key's value is not acceptable.
    #[error("key `{key}`: {problem}")]
    Key { key: String, problem: String },
    /// A key asks for something this build of flyfs cannot do.
    #[error("key `{key}`: {problem}")]
    Unsupported { key: String, problem: String },
}

/// What every daemon config can do: parse and check its text, load a file
/// (paths resolved beside it), and be written back as TOML.
pub trait ConfigFile: Serialize + DeserializeOwned {
    /// The checks beyond what the types express.
    fn validate(&self) -> Result<(), ConfigError>;

    /// Makes relative paths relative to `dir`, the config file's directory.
    fn resolve_beside(&mut self, dir: &Path);

    /// Parses and checks a config's text (relative paths are left as
    /// written).
    fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and checks `path`.
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|source| ConfigError::Invalid {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        if let Some(dir) = path.parent() {
            config.resolve_beside(dir);
        }
        Ok(config)
    }

    /// The config as a TOML document, as [`ConfigFile::load`] reads it.
    fn to_toml(&self) -> String {
        toml::to_string(self).expect("configs hold only strings, numbers, booleans and tables")
    }
}

/// A semantic check failed: which key, and why.
pub(crate) fn check(
    ok: bool,
    key: &str,
    problem: impl FnOnce() -> String,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Key {
            key: key.to_string(),
            problem: problem(),
        })
    }
}

pub(crate) fn positive(value: u64, key: &str) -> Result<(), ConfigError> {
    check(value > 0, key, || "must be at least 1".into())
}

/// A `host:port` key that must not be empty.
pub(crate) fn check_address(address: &str, key: &str) -> Result<(), ConfigError> {
    check(!address.is_empty(), key, || "is empty".into())
}

/// The most runtime worker threads a daemon may be given.
pub const RUNTIME_THREADS_MAX: usize = 1024;

/// `runtime_threads`: 0 (one per core) up to [`RUNTIME_THREADS_MAX`].
pub(crate) fn check_runtime_threads(threads: usize) -> Result<(), ConfigError> {
    check(threads <= RUNTIME_THREADS_MAX, "runtime_threads", || {
        format!("{threads} is more than {RUNTIME_THREADS_MAX} (0 means one per core)")
    })
}

/// `metrics_listen`, if given, is a `host:port`.
pub(crate) fn check_metrics_listen(listen: Option<&str>) -> Result<(), ConfigError> {
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

/// `relative` taken from `dir`; absolute paths stay as they are.
pub(crate) fn beside(dir: &Path, relative: &Path) -> PathBuf {
    if relative.is_relative() {
        dir.join(relative)
    } else {
        relative.to_path_buf()
    }
}

/// The cluster managers every daemon and client talks to (the primary and
/// its standbys), in the `mgmt` key of every config. One address may be
/// written as a plain string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ManagerAddrs(pub Vec<String>);

impl ManagerAddrs {
    /// The manager of a default single-machine cluster.
    pub fn local() -> ManagerAddrs {
        ManagerAddrs(vec!["127.0.0.1:7000".to_string()])
    }

    pub fn one(addr: impl Into<String>) -> ManagerAddrs {
        ManagerAddrs(vec![addr.into()])
    }

    pub(crate) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        check(!self.0.is_empty(), key, || "lists no address".into())?;
        check(self.0.iter().all(|a| !a.is_empty()), key, || {
            "holds an empty address".into()
        })
    }
}

impl<'de> Deserialize<'de> for ManagerAddrs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "an address \"host:port\" or a list of them")]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(match OneOrMany::deserialize(deserializer)? {
            OneOrMany::One(addr) => ManagerAddrs(vec![addr]),
            OneOrMany::Many(addrs) => ManagerAddrs(addrs),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::error::Error;

    use super::*;

    /// The examples beside this crate document every key with its default:
    /// they must parse, and hold the defaults except where a key has none.
    #[test]
    fn deploy_examples_parse_and_show_the_defaults() {
        // `[tls]` has no default (like `data_dir`): the examples name the
        // files `flyfs certs` writes.
        let tls = |stem| Some(TlsConfig::in_dir(Path::new("tls"), stem));
        let mgmtd = MgmtdConfig::parse(include_str!("../../mgmtd.toml")).expect("mgmtd.toml");
        let mut expected = MgmtdConfig::new("data/mgmtd");
        expected.tls = tls("mgmtd");
        assert_eq!(mgmtd, expected);
        let storage =
            StorageDaemonConfig::parse(include_str!("../../storage.toml")).expect("storage.toml");
        let mut expected = StorageDaemonConfig::new(1, vec!["data/storage1-disk0.img".into()]);
        expected.tls = tls("storage1");
        assert_eq!(storage, expected);
        let meta = MetaDaemonConfig::parse(include_str!("../../meta.toml")).expect("meta.toml");
        let mut expected = MetaDaemonConfig::new("meta");
        expected.tls = tls("meta");
        assert_eq!(meta, expected);
        let mount = MountConfig::parse(include_str!("../../mount.toml")).expect("mount.toml");
        let mut expected = MountConfig::new("/mnt/flyfs");
        expected.tls = tls("mount");
        assert_eq!(mount, expected);
    }

    /// Every server daemon takes a worker count, and refuses one it could
    /// never start, naming the key.
    #[test]
    fn runtime_threads_is_bounded() {
        let storage = |threads: usize| {
            StorageDaemonConfig::parse(&format!(
                "node_id = 1\ndevices = [\"d.img\"]\nruntime_threads = {threads}"
            ))
        };
        assert_eq!(storage(2).expect("2 workers").runtime_threads, 2);
        let error = storage(RUNTIME_THREADS_MAX + 1).expect_err("too many");
        assert!(message(&error).contains("runtime_threads"), "{error:#}");
        let meta = MetaDaemonConfig::parse("data_dir = \"m\"\nruntime_threads = 1").expect("meta");
        assert_eq!(meta.runtime_threads, 1);
        let error =
            MgmtdConfig::parse("data_dir = \"d\"\nruntime_threads = 5000").expect_err("too many");
        assert!(
            message(&error).contains("5000 is more than 1024"),
            "{error:#}"
        );
    }

    /// The whole chain of messages, as the binary prints an error.
    pub(crate) fn message(error: &(dyn Error + 'static)) -> String {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}
