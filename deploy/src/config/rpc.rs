//! `[rpc]` of a daemon's config: what its RPC server lets peers make it
//! hold (connections, deadlines, request bytes and tasks in flight, frame
//! sizes). The defaults are flyfs-rpc's `ServerConfig::default()`; the
//! table exists so that an operator can size a daemon's resident memory
//! (docs/security.md, "Resident memory under attack") and so that the
//! hostile-peer test can run a daemon with small budgets.

use std::time::Duration;

use flyfs_proto::frame::FrameLimits;
use flyfs_rpc::ServerConfig;
use serde::{Deserialize, Serialize};

use super::{ConfigError, check};

/// `[rpc]`: the RPC server's limits (docs/rpc-wire-format.md, "What a
/// server lets a peer make it hold", explains each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpcServerLimits {
    /// Connections open at once; more are closed as they are accepted.
    pub connections_max: usize,
    /// How long a new connection has to complete its TLS handshake.
    pub handshake_timeout_ms: u64,
    /// A connection that starts no request for this long is closed.
    pub idle_timeout_ms: u64,
    /// A frame header must arrive whole within this of its first byte.
    pub header_timeout_ms: u64,
    /// A body and payload of `n` bytes must arrive within
    /// `body_timeout_base_ms + n / body_bytes_per_s_min` of their header.
    pub body_timeout_base_ms: u64,
    pub body_bytes_per_s_min: u64,
    /// The largest request body; larger ones are refused at the header.
    pub body_bytes_max: u32,
    /// The largest request payload (a chunk write): at least the largest
    /// chunk size of the cluster.
    pub payload_bytes_max: u32,
    /// Bytes of requests in flight on one connection, for one peer identity
    /// over all its connections, and in all; each at least
    /// `body_bytes_max + payload_bytes_max`.
    pub request_bytes_in_flight_max_per_connection: u64,
    pub request_bytes_in_flight_max_per_identity: u64,
    pub request_bytes_in_flight_max: u64,
    /// Request tasks in all, and requests in flight on one connection.
    pub requests_in_flight_max: usize,
    pub requests_in_flight_max_per_connection: usize,
}

impl Default for RpcServerLimits {
    fn default() -> Self {
        RpcServerLimits::from_server_config(&ServerConfig::default())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl RpcServerLimits {
    /// The limits `config` has, as this table spells them.
    pub fn from_server_config(config: &ServerConfig) -> RpcServerLimits {
        RpcServerLimits {
            connections_max: config.connections_max,
            handshake_timeout_ms: millis(config.handshake_timeout),
            idle_timeout_ms: millis(config.idle_timeout),
            header_timeout_ms: millis(config.header_timeout),
            body_timeout_base_ms: millis(config.body_timeout_base),
            body_bytes_per_s_min: config.body_bytes_per_s_min,
            body_bytes_max: config.limits.body_bytes_max,
            payload_bytes_max: config.limits.payload_bytes_max,
            request_bytes_in_flight_max_per_connection: config
                .request_bytes_in_flight_max_per_connection,
            request_bytes_in_flight_max_per_identity: config
                .request_bytes_in_flight_max_per_identity,
            request_bytes_in_flight_max: config.request_bytes_in_flight_max,
            requests_in_flight_max: config.requests_in_flight_max,
            requests_in_flight_max_per_connection: config.requests_in_flight_max_per_connection,
        }
    }

    /// The server's settings.
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            limits: FrameLimits {
                body_bytes_max: self.body_bytes_max,
                payload_bytes_max: self.payload_bytes_max,
            },
            requests_in_flight_max_per_connection: self.requests_in_flight_max_per_connection,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            connections_max: self.connections_max,
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            body_timeout_base: Duration::from_millis(self.body_timeout_base_ms),
            body_bytes_per_s_min: self.body_bytes_per_s_min,
            request_bytes_in_flight_max_per_connection: self
                .request_bytes_in_flight_max_per_connection,
            request_bytes_in_flight_max_per_identity: self.request_bytes_in_flight_max_per_identity,
            request_bytes_in_flight_max: self.request_bytes_in_flight_max,
            requests_in_flight_max: self.requests_in_flight_max,
        }
    }

    /// Every limit must let something through, and the largest frame must
    /// fit every byte budget (or it would wait forever).
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("rpc.connections_max", self.connections_max as u64),
            ("rpc.handshake_timeout_ms", self.handshake_timeout_ms),
            ("rpc.idle_timeout_ms", self.idle_timeout_ms),
            ("rpc.header_timeout_ms", self.header_timeout_ms),
            ("rpc.body_timeout_base_ms", self.body_timeout_base_ms),
            ("rpc.body_bytes_per_s_min", self.body_bytes_per_s_min),
            ("rpc.body_bytes_max", u64::from(self.body_bytes_max)),
            (
                "rpc.requests_in_flight_max",
                self.requests_in_flight_max as u64,
            ),
            (
                "rpc.requests_in_flight_max_per_connection",
                self.requests_in_flight_max_per_connection as u64,
            ),
        ] {
            check(value > 0, key, || "must be at least 1".into())?;
        }
        self.server_config()
            .check()
            .map_err(|problem| ConfigError::Key {
                key: "rpc".into(),
                problem,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_servers_and_round_trip() {
        let limits = RpcServerLimits::default();
        let back = RpcServerLimits::from_server_config(&limits.server_config());
        assert_eq!(back, limits);
        limits.validate().expect("the defaults are valid");
    }

    #[test]
    fn a_budget_below_the_largest_frame_is_refused_by_name() {
        let limits = RpcServerLimits {
            request_bytes_in_flight_max_per_identity: 1 << 20,
            ..RpcServerLimits::default()
        };
        let error = limits.validate().expect_err("below the largest frame");
        assert!(
            error
                .to_string()
                .contains("request_bytes_in_flight_max_per_identity"),
            "{error}"
        );
        let limits = RpcServerLimits {
            connections_max: 0,
            ..RpcServerLimits::default()
        };
        let error = limits.validate().expect_err("no connection");
        assert!(error.to_string().contains("rpc.connections_max"), "{error}");
    }
}
