//! `transport` and `[rdma]` of a daemon's config: whether its RPC client
//! reaches its peers over TCP (the default) or RDMA, and, for RDMA, which
//! device to use and how each connection is shaped. A daemon with an RDMA
//! device also serves clients of both transports (flyfs-rpc's rdma module),
//! so the admin tool, on TCP, reaches every daemon.

use std::time::Duration;

use flyfs_rdma::ConnectionConfig;
use flyfs_rpc::RdmaTransport;
use serde::{Deserialize, Serialize};

use super::{ConfigError, check};

/// `transport = "tcp" | "rdma"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    #[default]
    Tcp,
    Rdma,
}

/// `[rdma]`: the device and each connection's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RdmaConfig {
    /// The RDMA device (`ibv_devices` lists them), such as `mlx5_0` or
    /// `rxe0`. Required with `transport = "rdma"`.
    pub device: String,
    /// The GID peers reach this node by: for RoCE v2 over IPv4, the index of
    /// the GID that maps the interface's address (`show_gids`); 0 on
    /// InfiniBand.
    pub gid_index: u8,
    /// Messages a peer may send before we return credits; with
    /// `message_bytes_max`, what a peer can make us hold per connection.
    pub credits: u32,
    /// The largest message (a piece of a frame) one receive slot takes.
    pub message_bytes_max: u32,
    /// One-sided requests in flight per connection.
    pub one_sided_max: u32,
    /// How long a posted work request may take before the connection is
    /// declared broken (ms).
    pub completion_timeout_ms: u64,
}

impl Default for RdmaConfig {
    fn default() -> RdmaConfig {
        let connection = ConnectionConfig::default();
        RdmaConfig {
            device: String::new(),
            gid_index: 0,
            credits: connection.credits,
            message_bytes_max: connection.message_bytes_max,
            one_sided_max: connection.one_sided_max,
            completion_timeout_ms: connection.completion_timeout.as_millis() as u64,
        }
    }
}

impl RdmaConfig {
    /// The checks beyond what the types express, for a daemon whose
    /// `transport` is `kind`.
    pub(crate) fn validate(&self, kind: TransportKind) -> Result<(), ConfigError> {
        if kind == TransportKind::Rdma {
            check(!self.device.is_empty(), "rdma.device", || {
                "is empty; transport = \"rdma\" needs the RDMA device to use (ibv_devices lists them)"
                    .into()
            })?;
        }
        self.connection_config()
            .check()
            .map_err(|(field, problem)| ConfigError::Key {
                key: format!("rdma.{field}"),
                problem,
            })
    }

    pub fn connection_config(&self) -> ConnectionConfig {
        ConnectionConfig {
            credits: self.credits,
            message_bytes_max: self.message_bytes_max,
            one_sided_max: self.one_sided_max,
            completion_timeout: Duration::from_millis(self.completion_timeout_ms),
        }
    }

    /// Opens the device when `kind` is RDMA: the error names a missing
    /// rdma-core, a device that is not there (listing those that are) or a
    /// port that is down.
    pub fn open(
        &self,
        kind: TransportKind,
    ) -> Result<Option<RdmaTransport>, flyfs_rdma::RdmaError> {
        match kind {
            TransportKind::Tcp => Ok(None),
            TransportKind::Rdma => {
                RdmaTransport::open(&self.device, self.gid_index, self.connection_config())
                    .map(Some)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_needs_a_device_and_sane_shapes() {
        let config = RdmaConfig::default();
        config
            .validate(TransportKind::Tcp)
            .expect("tcp needs no device");
        let error = config.validate(TransportKind::Rdma).expect_err("no device");
        assert!(error.to_string().contains("rdma.device"), "{error}");
        let bad = RdmaConfig {
            device: "rxe0".into(),
            message_bytes_max: 100,
            ..RdmaConfig::default()
        };
        let error = bad
            .validate(TransportKind::Rdma)
            .expect_err("tiny messages");
        assert!(
            error.to_string().contains("rdma.message_bytes_max"),
            "{error}"
        );
    }

    #[test]
    fn transport_parses_lowercase() {
        #[derive(Deserialize)]
        struct Doc {
            transport: TransportKind,
        }
        let doc: Doc = toml::from_str("transport = \"rdma\"").expect("rdma");
        assert_eq!(doc.transport, TransportKind::Rdma);
        let error = toml::from_str::<Doc>("transport = \"infiniband\"")
            .err()
            .expect("unknown transport");
        assert!(
            error.to_string().contains("tcp") && error.to_string().contains("rdma"),
            "{error}"
        );
    }
}
