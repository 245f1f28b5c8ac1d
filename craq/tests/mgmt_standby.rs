//! Manager failover over real TCP, in one process: two cluster managers
//! share one `KvClusterStore` (on `MemKv`, and on `FjallKv`, which one
//! process may open only once, so both managers live here), three storage
//! nodes and a storage client know both addresses. The first manager is the
//! primary; the test builds a chain, writes through it, then crashes the
//! primary (its server and lease loop stop, as in a crash). Checked: the
//! standby takes over once the crashed primary's lease has expired and
//! within about a ttl; it serves the same chains and targets; the nodes'
//! heartbeats reach it (the nodes stay alive past its grace period and keep
//! serving writes); an admin op sent to the dead primary's address first
//! succeeds on it; and the old primary, brought back with its stale memory,
//! refuses to serve, names the new primary, and cannot overwrite the record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flyfs_client::mgmt::Managers;
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_craq::mgmt::KvClusterStore;
use flyfs_craq::mgmt::{
    ClusterStore, LeaseFence, LeaseOptions, MgmtConfig, MgmtService, StoreError,
};
use flyfs_kv::Kv;
use flyfs_kv::fjall::{FjallKv, FjallOptions};
use flyfs_kv::mem::MemKv;
use flyfs_proto::Status;
use flyfs_proto::ids::{
    ChainId, ChainTableId, ChunkId, ClientId, NodeId, RoutingVersion, TargetId,
};
use flyfs_proto::wire::mgmt::{
    CreateChain, CreateChainReq, CreateChainTable, CreateChainTableReq, CreateTarget,
    CreateTargetReq, GetRouting, GetRoutingReq, Heartbeat, HeartbeatReq, MgmtError, PublicState,
    RoutingInfo,
};
use flyfs_rpc::{CallOptions, Client, Server, ServerConfig, ServerHandle, Tcp, testing};
use flyfs_time::{Clock, WallClock};
use tokio::task::JoinHandle;

use flyfs_craq::testing::{NodeOptions, TestStorageNode, bind};

/// Chunk size of the test's writes (the nodes' largest chunk).
const CHUNK: u32 = 64 << 10;
const TTL: Duration = Duration::from_secs(2);

fn mgmt_config() -> MgmtConfig {
    MgmtConfig {
        heartbeat_interval: Duration::from_millis(100),
        failure_timeout: Duration::from_secs(2),
        tick_interval: Duration::from_millis(100),
        auto_replace_after: None,
    }
}

fn options() -> CallOptions {
    CallOptions {
        timeout: Duration::from_secs(2),
        ..CallOptions::default()
    }
}

/// A manager serving on its own port with its lease loop.
struct Manager {
    addr: String,
    service: Arc<MgmtService>,
    server: ServerHandle,
    runner: JoinHandle<()>,
}

impl Manager {
    async fn start<K: Kv>(store: KvClusterStore<K>, holder: &str) -> Manager {
        let (listener, addr) = bind("127.0.0.1:0").await;
        let lease = LeaseOptions::shared(holder, addr.clone(), TTL);
        let service = MgmtService::open_with(Box::new(store), mgmt_config(), lease)
            .await
            .expect("open the manager");
        Manager::serve(service, listener, addr)
    }

    fn serve(service: Arc<MgmtService>, listener: tokio::net::TcpListener, addr: String) -> Self {
        let server = Server::new(service.clone(), ServerConfig::default(), testing::mgmt())
            .spawn(listener)
            .expect("serve");
        let runner = tokio::spawn(service.clone().run());
        Manager {
            addr,
            service,
            server,
            runner,
        }
    }

    /// Stops the lease loop and the server at once, as a crash (or a long
    /// pause) would; the service keeps its memory, to be brought back.
    async fn crash(self) -> (Arc<MgmtService>, String) {
        self.runner.abort();
        let _ = self.runner.await;
        self.server.shutdown().await;
        (self.service, self.addr)
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {limit:?}");
}

fn all_serving(routing: &RoutingInfo, chain: ChainId) -> bool {
    routing
        .chain(chain)
        .is_some_and(|c| c.targets.iter().all(|t| t.state == PublicState::Serving))
}

fn payload(seed: u8) -> Bytes {
    Bytes::from(vec![seed; 8192])
}

async fn failover<K: Kv>(kv: K) {
    let store = KvClusterStore::new(kv);
    let first = Manager::start(store.clone(), "m1").await;
    let second = Manager::start(store.clone(), "m2").await;
    assert!(
        first.service.is_primary(),
        "the first manager takes the lease"
    );
    assert!(!second.service.is_primary(), "the second stands by");
    let addrs = vec![first.addr.clone(), second.addr.clone()];

    // A standby refuses, naming the primary. Heartbeats come from a
    // storage node; the admin tool does the rest.
    let node_rpc = Client::new(Tcp, Default::default(), testing::storage(NodeId(0)));
    let rpc = Client::new(Tcp, Default::default(), testing::admin());
    let (rsp, _) = node_rpc
        .call::<Heartbeat>(
            &second.addr,
            &HeartbeatReq::default(),
            Bytes::new(),
            &options(),
        )
        .await
        .expect("rpc");
    assert_eq!(
        rsp.expect_err("standby"),
        MgmtError::NotPrimary {
            primary: Some(first.addr.clone())
        }
    );

    let mut nodes = Vec::new();
    for i in 0..3u32 {
        let options = NodeOptions {
            interval: Duration::from_millis(100),
            ..NodeOptions::default()
        };
        let mut node = TestStorageNode::format(i, &addrs, options).await;
        node.start().await;
        nodes.push(node);
    }
    // The admin tool's view: both managers, the standby listed first so
    // every call starts with a redirect.
    let admin = Managers::new([second.addr.clone(), first.addr.clone()]);
    wait_until(
        "three nodes registered",
        Duration::from_secs(10),
        async || first.service.routing().nodes.len() == 3,
    )
    .await;
    for i in 0..3u32 {
        let req = CreateTargetReq {
            target: TargetId(u64::from(i)),
            node: NodeId(i),
            disk: 0,
        };
        let rsp = admin
            .call::<CreateTarget, _>(&rpc, &req, &options())
            .await
            .expect("rpc");
        rsp.expect("create target");
    }
    assert_eq!(admin.primary(), Some(first.addr.clone()), "redirected");
    let req = CreateChainReq {
        chain: ChainId(1),
        targets: vec![TargetId(0), TargetId(1), TargetId(2)],
    };
    admin
        .call::<CreateChain, _>(&rpc, &req, &options())
        .await
        .expect("rpc")
        .expect("create chain");

    let mut config = ClientConfig::new(addrs.clone(), ClientId(7));
    config.rpc_timeout = Duration::from_secs(1);
    config.op_deadline = Duration::from_secs(20);
    let client = StorageClient::new(config, Tcp, testing::client());
    wait_until("chain 1 serving", Duration::from_secs(10), async || {
        client
            .refresh_routing()
            .await
            .is_ok_and(|r| all_serving(&r, ChainId(1)))
    })
    .await;
    let chunk = ChunkId::new(42, 0);
    client
        .write(ChainId(1), chunk, 0, payload(1), CHUNK)
        .await
        .expect("write before failover");
    let before = first.service.routing();

    // Crash the primary. Its lease, as stored, says when a standby may take
    // over.
    let crashed_at = Instant::now();
    let (old, old_addr) = first.crash().await;
    let lease = store.lease().await.expect("lease").expect("held");
    assert_eq!((lease.holder.as_str(), lease.epoch), ("m1", 1));

    wait_until(
        "the standby takes over",
        TTL + TTL / 3 + Duration::from_secs(2),
        async || second.service.is_primary(),
    )
    .await;
    let took_over_ms = WallClock.now_ms();
    assert!(
        took_over_ms >= lease.expires_at_ms,
        "took a live lease: at {took_over_ms} ms, the lease ran to {} ms",
        lease.expires_at_ms
    );
    let takeover = crashed_at.elapsed();
    assert!(
        takeover <= TTL + TTL / 3 + Duration::from_secs(1),
        "takeover took {takeover:?}"
    );
    let lease = store.lease().await.expect("lease").expect("held");
    assert_eq!((lease.holder.as_str(), lease.epoch), ("m2", 2));

    // Same chains and targets, a newer routing version.
    let after = second.service.routing();
    assert_eq!(after.chains, before.chains, "chains, members and versions");
    assert_eq!(after.targets, before.targets);
    assert_eq!(after.nodes.len(), 3);
    assert!(after.version > before.version);

    // Heartbeats reach the new primary: past its grace period (one failure
    // timeout from the takeover) every node is still alive and the chain
    // still serving, which only heartbeats answered by it can do; and a
    // write after the nodes' own leases (1 s) would have lapsed succeeds.
    tokio::time::sleep(mgmt_config().failure_timeout + Duration::from_millis(500)).await;
    let routing = second.service.routing();
    assert!(routing.nodes.iter().all(|n| n.alive), "{routing:?}");
    assert!(all_serving(&routing, ChainId(1)), "{routing:?}");
    assert_eq!(
        routing.chain(ChainId(1)),
        before.chain(ChainId(1)),
        "no chain change"
    );
    client
        .write(ChainId(1), chunk, 8192, payload(2), CHUNK)
        .await
        .expect("write after failover");
    let read = client
        .read(ChainId(1), chunk, 0, 16384)
        .await
        .expect("read after failover");
    assert_eq!(&read.data[..8192], &payload(1)[..]);
    assert_eq!(&read.data[8192..], &payload(2)[..]);

    // An admin op: the admin still points at the dead primary first.
    let req = CreateChainTableReq {
        table: ChainTableId(1),
        chains: vec![ChainId(1)],
    };
    admin
        .call::<CreateChainTable, _>(&rpc, &req, &options())
        .await
        .expect("rpc")
        .expect("create table on the new primary");
    assert_eq!(admin.primary(), Some(second.addr.clone()));
    let saved = store.load().await.expect("load").expect("record");
    assert!(saved.tables.contains_key(&ChainTableId(1)));
    assert_eq!(saved.routing_version, second.service.routing().version);

    // The old primary comes back, with its stale memory, on its address.
    assert!(!old.is_primary(), "serves on an expired lease");
    let (listener, _) = bind(&old_addr).await;
    let back = Manager::serve(old, listener, old_addr);
    wait_until(
        "the old primary learns the new one",
        Duration::from_secs(5),
        async || back.service.primary() == Some(second.addr.clone()),
    )
    .await;
    assert!(!back.service.is_primary());
    let (rsp, _) = node_rpc
        .call::<Heartbeat>(
            &back.addr,
            &HeartbeatReq::default(),
            Bytes::new(),
            &options(),
        )
        .await
        .expect("rpc");
    assert_eq!(
        rsp.expect_err("not the primary"),
        MgmtError::NotPrimary {
            primary: Some(second.addr.clone())
        }
    );
    let err = rpc
        .call::<GetRouting>(
            &back.addr,
            &GetRoutingReq {
                known_version: RoutingVersion(0),
            },
            Bytes::new(),
            &options(),
        )
        .await
        .expect_err("a standby serves no routing");
    assert_eq!(err.status(), Some(Status::Unavailable), "{err}");
    // Its stale record cannot overwrite the new primary's.
    let fence = LeaseFence {
        holder: "m1".into(),
        epoch: 1,
    };
    let err = store
        .save(&before_record(&before), &fence, WallClock.now_ms())
        .await
        .expect_err("a deposed primary's save");
    assert!(matches!(err, StoreError::NotLeaseHolder { .. }), "{err}");
    assert_eq!(store.load().await.expect("load"), Some(saved));

    back.crash().await;
    second.crash().await;
    for node in &mut nodes {
        node.stop().await;
    }
}

/// A record as the old primary would save it: only its routing version is
/// used, to make it differ from the stored one.
fn before_record(before: &RoutingInfo) -> flyfs_craq::mgmt::ClusterRecord {
    flyfs_craq::mgmt::ClusterRecord {
        routing_version: before.version,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_on_mem_kv() {
    failover(MemKv::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_on_fjall() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kv = FjallKv::open(dir.path().join("kv"), FjallOptions::default()).expect("open fjall");
    failover(kv).await;
}
