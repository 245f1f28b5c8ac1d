//! The cluster manager over real TCP: a client registers nodes, builds
//! targets, a chain and a chain table, storage nodes heartbeat; a node that
//! stops heartbeating goes offline and moves to the chain's tail with a
//! version bump; a restarted manager on the same `FileStore` serves the same
//! chains.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flyfs_craq::mgmt::{FileStore, MgmtConfig, MgmtService};
use flyfs_proto::Method;
use flyfs_proto::Status;
use flyfs_proto::ids::{ChainId, ChainTableId, ChainVersion, NodeId, RoutingVersion, TargetId};
use flyfs_proto::wire::mgmt::{
    CreateChain, CreateChainReq, CreateChainTable, CreateChainTableReq, CreateTarget,
    CreateTargetReq, GetRouting, GetRoutingReq, Heartbeat, HeartbeatReq, LocalState, MgmtError,
    PublicState, RegisterNode, RegisterNodeReq, RoutingInfo, TargetReport,
};
use flyfs_rpc::{
    CallOptions, Client, ClientConfig, RpcError, Server, ServerConfig, ServerHandle, Tcp, testing,
};

/// A client speaking as storage node `n`: only storage nodes register and
/// heartbeat.
fn node_client(n: u32) -> Client<Tcp> {
    Client::new(Tcp, ClientConfig::default(), testing::storage(NodeId(n)))
}

fn config() -> MgmtConfig {
    MgmtConfig {
        heartbeat_interval: Duration::from_millis(100),
        failure_timeout: Duration::from_secs(1),
        tick_interval: Duration::from_millis(200),
        auto_replace_after: None,
    }
}

/// A manager serving on an ephemeral port, with its ticker.
struct Manager {
    addr: String,
    server: ServerHandle,
    ticker: tokio::task::JoinHandle<()>,
}

impl Manager {
    async fn start(dir: &std::path::Path) -> Manager {
        let store = FileStore::open(dir).expect("open the store");
        let service = MgmtService::open(Box::new(store), config())
            .await
            .expect("open the manager");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let server = Server::new(
            service.clone(),
            ServerConfig::without_payload(),
            testing::mgmt(),
        )
        .spawn(listener)
        .expect("serve");
        let ticker = tokio::spawn(service.run());
        Manager {
            addr: server.local_addr().to_string(),
            server,
            ticker,
        }
    }

    async fn stop(self) {
        self.ticker.abort();
        let _ = self.ticker.await;
        self.server.shutdown().await;
    }
}

async fn call<M: Method>(client: &Client<Tcp>, addr: &str, req: &M::Req) -> M::Rsp {
    match client
        .call::<M>(addr, req, Bytes::new(), &CallOptions::default())
        .await
    {
        Ok((rsp, _payload)) => rsp,
        Err(e) => panic!("calling {}: {e}", M::NAME),
    }
}

async fn routing(client: &Client<Tcp>, addr: &str) -> RoutingInfo {
    let rsp = call::<GetRouting>(
        client,
        addr,
        &GetRoutingReq {
            known_version: RoutingVersion(0),
        },
    )
    .await;
    rsp.routing.expect("routing is always newer than version 0")
}

fn members(routing: &RoutingInfo) -> Vec<(TargetId, PublicState)> {
    routing
        .chain(ChainId(1))
        .map(|c| c.targets.iter().map(|m| (m.target, m.state)).collect())
        .unwrap_or_default()
}

/// Heartbeats for node `n` (holding target `n`) every 100 ms while `beating`.
fn heartbeater(addr: String, n: u32, beating: Arc<AtomicBool>) {
    let client = node_client(n);
    tokio::spawn(async move {
        loop {
            if beating.load(Ordering::SeqCst) {
                let req = HeartbeatReq {
                    node: NodeId(n),
                    addr: format!("127.0.0.1:{}", 7000 + n),
                    targets: vec![TargetReport {
                        target: TargetId(n.into()),
                        local: LocalState::UpToDate,
                        used_bytes: 0,
                        ..TargetReport::default()
                    }],
                    ..HeartbeatReq::default()
                };
                // A missed heartbeat is what this test provokes; ignore errors.
                let _ = client
                    .call::<Heartbeat>(&addr, &req, Bytes::new(), &CallOptions::default())
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[tokio::test]
async fn manager_over_tcp_detects_failures_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = Manager::start(dir.path()).await;
    // The operator's tool creates targets and chains.
    let client = Client::new(Tcp, ClientConfig::default(), testing::admin());
    let addr = manager.addr.clone();

    for n in 1..=3u32 {
        let rsp = call::<RegisterNode>(
            &node_client(n),
            &addr,
            &RegisterNodeReq {
                node: NodeId(n),
                addr: format!("127.0.0.1:{}", 7000 + n),
            },
        )
        .await;
        assert!(rsp.is_ok(), "register {n}: {rsp:?}");
        let rsp = call::<CreateTarget>(
            &client,
            &addr,
            &CreateTargetReq {
                target: TargetId(n.into()),
                node: NodeId(n),
                disk: 0,
            },
        )
        .await;
        assert_eq!(rsp, Ok(()));
    }
    // A node's certificate speaks for that node only: node 1 can neither
    // re-point node 2's address nor heartbeat for it, and a payload is
    // refused by a manager that takes none. The record does not change.
    let before = routing(&client, &addr).await;
    let heartbeat = HeartbeatReq {
        node: NodeId(2),
        ..HeartbeatReq::default()
    };
    let register = RegisterNodeReq {
        node: NodeId(2),
        addr: "10.9.9.9:1".into(),
    };
    let impostor = node_client(1);
    let refusals = [
        impostor
            .call::<RegisterNode>(&addr, &register, Bytes::new(), &CallOptions::default())
            .await
            .map(|_| ()),
        impostor
            .call::<Heartbeat>(&addr, &heartbeat, Bytes::new(), &CallOptions::default())
            .await
            .map(|_| ()),
    ];
    for refused in refusals {
        assert!(
            matches!(&refused, Err(RpcError::Remote { status: Status::Forbidden, message, .. }) if message.contains("storage/1")),
            "{refused:?}"
        );
    }
    let with_payload = impostor
        .call_raw(
            &addr,
            GetRouting::ID,
            Bytes::new(),
            Bytes::from_static(b"unused bytes"),
            Duration::from_secs(5),
        )
        .await;
    assert!(
        matches!(
            &with_payload,
            Err(RpcError::Remote {
                status: Status::TooLarge,
                ..
            })
        ),
        "{with_payload:?}"
    );
    assert_eq!(routing(&client, &addr).await, before);

    // Validation errors travel back as MgmtError.
    let rsp = call::<CreateTarget>(
        &client,
        &addr,
        &CreateTargetReq {
            target: TargetId(9),
            node: NodeId(9),
            disk: 0,
        },
    )
    .await;
    assert_eq!(
        rsp,
        Err(MgmtError::NotFound {
            what: "node 9".into()
        })
    );
    let rsp = call::<CreateChain>(
        &client,
        &addr,
        &CreateChainReq {
            chain: ChainId(1),
            targets: vec![TargetId(1), TargetId(2), TargetId(3)],
        },
    )
    .await;
    assert_eq!(rsp, Ok(()));
    let rsp = call::<CreateChainTable>(
        &client,
        &addr,
        &CreateChainTableReq {
            table: ChainTableId(1),
            chains: vec![ChainId(1)],
        },
    )
    .await;
    assert_eq!(rsp, Ok(()));

    let beating: Vec<Arc<AtomicBool>> = (1..=3u32)
        .map(|n| {
            let flag = Arc::new(AtomicBool::new(true));
            heartbeater(addr.clone(), n, flag.clone());
            flag
        })
        .collect();

    // Healthy for longer than the failure timeout: nothing changes.
    let start = routing(&client, &addr).await;
    assert_eq!(
        members(&start),
        [
            (TargetId(1), PublicState::Serving),
            (TargetId(2), PublicState::Serving),
            (TargetId(3), PublicState::Serving)
        ]
    );
    assert_eq!(
        start.chain(ChainId(1)).map(|c| c.version),
        Some(ChainVersion(1))
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let unchanged = call::<GetRouting>(
        &client,
        &addr,
        &GetRoutingReq {
            known_version: start.version,
        },
    )
    .await;
    assert_eq!(
        unchanged.routing, None,
        "a healthy cluster keeps its routing version"
    );

    // Node 1 (the head) stops heartbeating.
    beating[0].store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let failed = loop {
        let now = routing(&client, &addr).await;
        if members(&now).last() == Some(&(TargetId(1), PublicState::Offline)) {
            break now;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("target 1 never went offline: {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        members(&failed),
        [
            (TargetId(2), PublicState::Serving),
            (TargetId(3), PublicState::Serving),
            (TargetId(1), PublicState::Offline)
        ]
    );
    assert_eq!(
        failed.chain(ChainId(1)).map(|c| c.version),
        Some(ChainVersion(2))
    );
    assert!(failed.version > start.version);
    assert_eq!(failed.node(NodeId(1)).map(|n| n.alive), Some(false));
    assert_eq!(
        failed.target(TargetId(1)).map(|t| t.state),
        Some(PublicState::Offline)
    );

    // Restart the manager on the same directory.
    manager.stop().await;
    assert!(dir.path().join("cluster.rec").exists());
    let manager = Manager::start(dir.path()).await;
    let restarted = routing(&client, &manager.addr).await;
    assert_eq!(
        restarted.chains, failed.chains,
        "chains and states are back"
    );
    assert_eq!(restarted.tables, failed.tables);
    assert!(
        restarted.version > failed.version,
        "a restart bumps the routing version"
    );
    manager.stop().await;
}
