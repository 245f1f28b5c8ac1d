//! The same server and client over turmoil's simulated network (`SimNet`):
//! a round trip with payload, a timeout while partitioned, and recovery when
//! the partition heals; a connection that answers no ping while partitioned
//! closed by `close_unresponsive`, failing the calls that waited on it; all over mutual TLS with the test CA, and a client
//! without a daemon's role refused as a server. Run with `cargo test -p flyfs-rpc --features sim`.
#![cfg(feature = "sim")]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_proto::ids::NodeId;
use flyfs_proto::{Method, Roles, Status};
use flyfs_rpc::testing;
use flyfs_rpc::{
    CallOptions, Client, ClientConfig, Network, Reply, Request, RetryPolicy, RpcError, Server,
    ServerConfig, Service, SimNet,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct Note {
    text: String,
}

struct Echo;
impl Method for Echo {
    // Outside every flyfs service's range, so that refusals name it by id.
    const ID: u16 = 900;
    const NAME: &'static str = "sim.Echo";
    type Req = Note;
    type Rsp = Note;
    const ROLES: Roles = Roles::CLIENT;
}

struct EchoService;
impl Service for EchoService {
    async fn call(&self, request: Request) -> Reply {
        if request.method != Echo::ID {
            return Reply::unknown_method(request.method);
        }
        match request.decode::<Echo>() {
            Ok(note) => {
                let payload = request.payload.into_bytes().unwrap_or_default();
                Reply::ok::<Echo>(&note, payload)
            }
            Err(reply) => reply,
        }
    }

    fn roles(&self, method: u16) -> Option<Roles> {
        (method == Echo::ID).then_some(Echo::ROLES)
    }
}

fn sim() -> turmoil::Sim<'static> {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(60))
        .rng_seed(7)
        .build();
    sim.host("server", || async {
        let listener = SimNet.bind("0.0.0.0:9000").await?;
        Server::new(
            Arc::new(EchoService),
            ServerConfig::default(),
            testing::storage(NodeId(1)),
        )
        .serve(listener)
        .await;
        Ok(())
    });
    sim
}

fn note(text: &str) -> Note {
    Note { text: text.into() }
}

#[test]
fn round_trip_over_the_simulated_network() -> turmoil::Result {
    let mut sim = sim();
    sim.client("client", async {
        let client = Client::new(SimNet, ClientConfig::default(), testing::client());
        for i in 0..10u8 {
            let payload = Bytes::from(vec![i; 1000 * usize::from(i)]);
            let (rsp, got) = client
                .call::<Echo>(
                    "server:9000",
                    &note(&format!("n{i}")),
                    payload.clone(),
                    &CallOptions::default(),
                )
                .await?;
            assert_eq!(rsp.text, format!("n{i}"));
            assert_eq!(got.into_bytes(), Some(payload));
        }
        let error = client
            .call_raw(
                "server:9000",
                999,
                Bytes::new(),
                Bytes::new(),
                Duration::from_secs(1),
            )
            .await
            .expect_err("unknown method");
        assert_eq!(error.status(), Some(Status::UnknownMethod));
        // An admin is authenticated but not allowed this method.
        let admin = Client::new(SimNet, ClientConfig::default(), testing::admin());
        let error = admin
            .call::<Echo>(
                "server:9000",
                &note("no"),
                Bytes::new(),
                &CallOptions::default(),
            )
            .await
            .expect_err("admin may not echo");
        assert_eq!(error.status(), Some(Status::Forbidden), "{error}");
        assert!(
            error
                .to_string()
                .contains("role admin may not call method 900"),
            "{error}"
        );
        Ok(())
    });
    sim.run()
}

#[test]
fn partition_times_out_and_retries_recover() -> turmoil::Result {
    let mut sim = sim();
    sim.client("client", async {
        let client = Client::new(SimNet, ClientConfig::default(), testing::client());
        let options = CallOptions {
            timeout: Duration::from_millis(500),
            ..CallOptions::default()
        };
        client
            .call::<Echo>("server:9000", &note("before"), Bytes::new(), &options)
            .await?;
        // Hold every message between the two: the call times out.
        turmoil::hold("client", "server");
        let error = client
            .call::<Echo>("server:9000", &note("held"), Bytes::new(), &options)
            .await
            .expect_err("held");
        assert!(matches!(error, RpcError::Timeout { .. }), "{error}");
        assert_eq!(client.pending_calls(), 0);
        turmoil::release("client", "server");
        let retrying = CallOptions {
            retry: RetryPolicy {
                attempts: 5,
                ..RetryPolicy::default()
            },
            ..options
        };
        let (rsp, _) = client
            .call::<Echo>("server:9000", &note("after"), Bytes::new(), &retrying)
            .await?;
        assert_eq!(rsp.text, "after");
        Ok(())
    });
    sim.run()
}

#[test]
fn a_peer_that_answers_no_ping_has_its_connections_closed() -> turmoil::Result {
    let mut sim = sim();
    sim.client("client", async {
        // One connection: the call held below waits on the one connected
        // before the partition (a second would still be connecting).
        let config = ClientConfig {
            connections_per_peer: 1,
            ..ClientConfig::default()
        };
        let client = Client::new(SimNet, config, testing::client());
        let long = CallOptions {
            timeout: Duration::from_secs(30),
            ..CallOptions::default()
        };
        client
            .call::<Echo>("server:9000", &note("before"), Bytes::new(), &long)
            .await?;
        // Every message between the two is held: the call waits, and so
        // would every later one on this connection.
        turmoil::hold("client", "server");
        let waiting = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .call::<Echo>("server:9000", &note("held"), Bytes::new(), &long)
                    .await
            }
        });
        while client.pending_calls() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client
            .close_unresponsive("server:9000", Duration::from_millis(500))
            .await;
        let error = waiting
            .await
            .expect("task")
            .expect_err("its connection was closed");
        assert!(matches!(error, RpcError::Disconnected { .. }), "{error}");
        assert_eq!(client.pending_calls(), 0);
        turmoil::release("client", "server");
        let (rsp, _) = client
            .call::<Echo>("server:9000", &note("after"), Bytes::new(), &long)
            .await?;
        assert_eq!(rsp.text, "after");
        Ok(())
    });
    sim.run()
}
