//! The storage service over real TCP in one process: a manager and three
//! storage nodes on memory devices, a storage client, and raw RPCs for what a
//! well-behaved client never sends. Covers every storage operation, the
//! apportioned read (a replica holding a pending version serves the version
//! the tail committed) and the errors bad requests get.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_bypass::fault::{Fault, FaultyDevice};
use flyfs_bypass::mem::MemDevice;
use flyfs_bypass::{BlockDevice, IoOp};
use flyfs_bypass::{BufferPool, HugePages, PoolConfig};
use flyfs_chunk_engine::{Engine, EngineConfig, FormatOptions};
use flyfs_client::storage::{ClientConfig, ReadSpec, StorageClient};
use flyfs_craq::mgmt::{MemStore, MgmtConfig, MgmtService};
use flyfs_craq::storage::FailPoint;
use flyfs_craq::{StorageConfig, StorageNode, StorageService};
use flyfs_proto::ids::{ChainId, ChainVersion, ChunkId, ClientId, InodeId, NodeId, TargetId};
use flyfs_proto::wire::mgmt::{
    CreateChain, CreateChainReq, CreateTarget, CreateTargetReq, PublicState,
};
use flyfs_proto::wire::storage::{
    BatchRead, BatchReadReq, Channel, ReadItem, StorageError, Write, WriteOp, WriteReq,
};
use flyfs_proto::{Method, Status};
use flyfs_rpc::{CallOptions, Client, RpcError, Server, ServerConfig, ServerHandle, Tcp, testing};

const CHUNK: u32 = 64 << 10;

struct Cluster {
    nodes: Vec<Arc<StorageNode<FaultyDevice<MemDevice>, Tcp>>>,
    servers: Vec<ServerHandle>,
    client: Arc<StorageClient<Tcp>>,
    /// The operator's view (space of a node is not a mount's business).
    admin_storage: Arc<StorageClient<Tcp>>,
    /// Raw calls as a mount would make them (client role).
    rpc: Client<Tcp>,
    /// The manager, and calls to it as an admin.
    mgmt: String,
    admin: Client<Tcp>,
    /// Each node's heartbeat loop (`StorageNode::run`).
    beats: Vec<tokio::task::JoinHandle<()>>,
}

async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    (listener, addr)
}

async fn call<M: Method>(rpc: &Client<Tcp>, addr: &str, req: &M::Req, payload: Bytes) -> M::Rsp {
    match rpc
        .call::<M>(addr, req, payload, &CallOptions::default())
        .await
    {
        Ok((rsp, _)) => rsp,
        Err(e) => panic!("{}: {e}", M::NAME),
    }
}

impl Cluster {
    /// One chain (1) of three replicas, head on node 0.
    async fn start() -> Cluster {
        let service = MgmtService::open(
            Box::new(MemStore::new()),
            MgmtConfig {
                heartbeat_interval: Duration::from_millis(50),
                failure_timeout: Duration::from_secs(2),
                tick_interval: Duration::from_millis(50),
                auto_replace_after: None,
            },
        )
        .await
        .expect("manager");
        let (listener, mgmt) = bind().await;
        let mut servers = vec![
            Server::new(service.clone(), ServerConfig::default(), testing::mgmt())
                .spawn(listener)
                .expect("serve manager"),
        ];
        tokio::spawn(service.clone().run());

        let mut nodes = Vec::new();
        let mut beats = Vec::new();
        for i in 0..3u32 {
            // Two devices per node: chain 1 lives on disk 0, chain 2 on disk 1.
            let mut engines = Vec::new();
            for disk in 0..2u64 {
                let dev = MemDevice::new(32 << 20, 4096);
                let format = FormatOptions {
                    chunk_size_min: 4 << 10,
                    chunk_size_max: u64::from(CHUNK),
                    journal_bytes: Some(1 << 20),
                    force: false,
                };
                Engine::format(&dev, &format).await.expect("format");
                let pool = BufferPool::new(&PoolConfig {
                    classes: vec![(4 << 10, 64), (64 << 10, 64)],
                    hugepages: HugePages::Never,
                })
                .expect("pool");
                let dev = FaultyDevice::new(dev, u64::from(i) * 2 + disk);
                let engine = Engine::open(dev, pool, EngineConfig::default())
                    .await
                    .expect("open");
                engines.push(Arc::new(engine));
            }
            let (listener, addr) = bind().await;
            let mut config = StorageConfig::new(NodeId(i), addr, mgmt.clone());
            config.heartbeat_interval = Duration::from_millis(50);
            // Too long for the manager's 2 s failure timeout: the node cuts
            // it to half of that once the manager has said so.
            config.lease_timeout = Duration::from_secs(5);
            config.rpc_timeout = Duration::from_secs(2);
            // Small batches, so that freeing a moved replica takes many.
            config.free_batch_chunks = 4;
            let credentials = testing::storage(NodeId(i));
            let node = StorageNode::new(config, engines, Tcp, credentials.clone());
            beats.push(tokio::spawn(node.clone().run()));
            servers.push(
                Server::new(
                    StorageService::new(node.clone()),
                    ServerConfig::default(),
                    credentials,
                )
                .spawn(listener)
                .expect("serve storage"),
            );
            nodes.push(node);
        }
        let rpc = Client::new(Tcp, Default::default(), testing::client());
        // Targets and chains are the operator's to create.
        let admin = Client::new(Tcp, Default::default(), testing::admin());
        while service.routing().nodes.len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for disk in 0..2u32 {
            for i in 0..3u32 {
                let req = CreateTargetReq {
                    target: TargetId(u64::from(disk * 10 + i)),
                    node: NodeId(i),
                    disk,
                };
                call::<CreateTarget>(&admin, &mgmt, &req, Bytes::new())
                    .await
                    .expect("target");
            }
        }
        // Chain 1 on disk 0 with its head on node 0; chain 2 on disk 1 with
        // its head on node 1.
        for (chain, targets) in [(1, [0, 1, 2]), (2, [11, 12, 10])] {
            let req = CreateChainReq {
                chain: ChainId(chain),
                targets: targets.into_iter().map(TargetId).collect(),
            };
            call::<CreateChain>(&admin, &mgmt, &req, Bytes::new())
                .await
                .expect("chain");
        }
        let mut config = ClientConfig::new([mgmt.clone()], ClientId(77));
        config.rpc_timeout = Duration::from_secs(2);
        config.op_deadline = Duration::from_secs(10);
        let client = StorageClient::new(config.clone(), Tcp, testing::client());
        config.client = ClientId(78);
        let admin_storage = StorageClient::new(config, Tcp, testing::admin());
        let cluster = Cluster {
            nodes,
            servers,
            client,
            admin_storage,
            rpc,
            mgmt,
            admin,
            beats,
        };
        cluster.wait_all_serving().await;
        cluster
    }

    async fn wait_all_serving(&self) {
        for _ in 0..500 {
            let serving = self.nodes.iter().all(|n| {
                n.routing()
                    .chain(ChainId(1))
                    .is_some_and(|c| c.targets.iter().all(|t| t.state == PublicState::Serving))
            }) && self.nodes.iter().all(|n| {
                n.targets()
                    .iter()
                    .all(|(_, _, l)| *l == flyfs_proto::wire::mgmt::LocalState::UpToDate)
            });
            if serving {
                self.client.refresh_routing().await.expect("routing");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "chain 1 never became all serving: {:?}",
            self.nodes[0].routing()
        );
    }

    fn addr(&self, node: usize) -> String {
        self.nodes[node].config().addr.clone()
    }

    fn version(&self) -> ChainVersion {
        self.client
            .routing()
            .chain(ChainId(1))
            .expect("chain 1")
            .version
    }

    /// Reads a chunk from one particular replica.
    async fn read_at(&self, node: usize, chunk: ChunkId) -> Result<Bytes, StorageError> {
        self.read_at_version(node, ChainId(1), self.version(), chunk)
            .await
    }

    /// Reads a chunk from one particular replica, as a client whose routing
    /// shows `chain` at `chain_version`.
    async fn read_at_version(
        &self,
        node: usize,
        chain: ChainId,
        chain_version: ChainVersion,
        chunk: ChunkId,
    ) -> Result<Bytes, StorageError> {
        let req = BatchReadReq {
            items: vec![ReadItem {
                chain,
                chain_version,
                chunk,
                offset: 0,
                len: CHUNK,
                verify: true,
                if_changed_from: None,
            }],
        };
        let (rsp, payload) = self
            .rpc
            .call::<BatchRead>(
                &self.addr(node),
                &req,
                Bytes::new(),
                &CallOptions::default(),
            )
            .await
            .expect("batch read");
        rsp.results.into_iter().next().expect("one result")?;
        Ok(payload.into_bytes().unwrap_or_default())
    }

    async fn stop(self) {
        for server in self.servers {
            server.shutdown().await;
        }
    }
}

fn data(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect::<Vec<u8>>(),
    )
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a == b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_over_tcp() {
    let c = Cluster::start().await;
    let chain = ChainId(1);
    let chunk = ChunkId::new(9, 0);

    // A chunk nobody wrote reads as empty.
    let empty = c.client.read(chain, chunk, 0, CHUNK).await.expect("read");
    assert_eq!(empty.data.len(), 0);

    let first = data(1, 10_000);
    let rsp = c
        .client
        .write(chain, chunk, 0, first.clone(), CHUNK)
        .await
        .expect("write");
    assert_eq!(rsp.chunk_len, 10_000);
    let second = data(2, 5_000);
    c.client
        .write(chain, chunk, 20_000, second.clone(), CHUNK)
        .await
        .expect("write");
    // Every replica holds the same bytes: the hole reads as zeros.
    for node in 0..3 {
        let got = c.read_at(node, chunk).await.expect("read a replica");
        assert_eq!(got.len(), 25_000, "node {node}");
        assert!(same(&got[..10_000], &first), "node {node}");
        assert!(got[10_000..20_000].iter().all(|b| *b == 0), "node {node}");
        assert!(same(&got[20_000..], &second), "node {node}");
    }

    let truncated = c
        .client
        .truncate(chain, chunk, 4_096, CHUNK)
        .await
        .expect("truncate");
    assert_eq!(truncated.chunk_len, 4_096);
    let got = c.client.read(chain, chunk, 0, CHUNK).await.expect("read");
    assert!(same(&got.data, &first[..4_096]));

    // The last chunk of a file on the chain.
    c.client
        .write(chain, ChunkId::new(9, 3), 0, data(3, 100), CHUNK)
        .await
        .expect("write");
    let last = c
        .client
        .last_chunk(chain, InodeId(9))
        .await
        .expect("last")
        .expect("some");
    assert_eq!(last.chunk, ChunkId::new(9, 3));
    assert_eq!(last.len, 100);

    c.client
        .remove(chain, ChunkId::new(9, 3), CHUNK)
        .await
        .expect("remove");
    for node in 0..3 {
        let got = c.read_at(node, ChunkId::new(9, 3)).await.expect("read");
        assert!(got.is_empty(), "node {node} still has a removed chunk");
    }

    // Many chunks in one batched read per replica.
    let mut specs = Vec::new();
    for i in 0..8u32 {
        let chunk = ChunkId::new(20, i);
        c.client
            .write(chain, chunk, 0, data(i as u8, 3000 + i as usize), CHUNK)
            .await
            .expect("write");
        specs.push(ReadSpec {
            chain,
            chunk,
            offset: 100,
            len: 1000,
            if_changed_from: None,
        });
    }
    specs.push(ReadSpec {
        chain,
        chunk: ChunkId::new(20, 99),
        offset: 0,
        len: 10,
        if_changed_from: None,
    });
    let reads = c.client.read_batch(&specs).await;
    for (i, read) in reads.iter().enumerate().take(8) {
        let read = read.as_ref().expect("batched read");
        assert!(
            same(&read.data, &data(i as u8, 3000 + i)[100..1100]),
            "chunk {i}"
        );
    }
    assert!(reads[8].as_ref().expect("absent chunk").data.is_empty());

    for node in &c.nodes {
        assert_eq!(
            node.lease(),
            Duration::from_secs(1),
            "lease not cut to half the failure timeout"
        );
    }

    let space = c.admin_storage.space(&c.addr(1)).await.expect("space");
    assert_eq!(space.disks.len(), 2);
    assert_eq!(space.disks[0].committed_chunks, 9);
    assert_eq!(space.disks[1].committed_chunks, 0);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let c = Cluster::start().await;
    let chunk = ChunkId::new(5, 0);
    let payload = data(7, 4096);
    let write = |version: ChainVersion, crc: u32, seq: u64| WriteReq {
        chain: ChainId(1),
        chain_version: version,
        chunk,
        op: WriteOp::Write { offset: 0, crc },
        chunk_size: CHUNK,
        channel: Channel {
            client: ClientId(5),
            id: 1,
            seq,
        },
    };
    let crc = crc32c::crc32c(&payload);
    let current = c.version();

    let stale = call::<Write>(
        &c.rpc,
        &c.addr(0),
        &write(ChainVersion(current.0 - 1), crc, 1),
        payload.clone(),
    )
    .await;
    assert!(
        matches!(stale, Err(StorageError::StaleChainVersion { current: v, .. }) if v == current),
        "{stale:?}"
    );
    let bad_crc = call::<Write>(
        &c.rpc,
        &c.addr(0),
        &write(current, crc ^ 1, 2),
        payload.clone(),
    )
    .await;
    assert!(
        matches!(bad_crc, Err(StorageError::PayloadChecksum { .. })),
        "{bad_crc:?}"
    );
    let not_head =
        call::<Write>(&c.rpc, &c.addr(1), &write(current, crc, 3), payload.clone()).await;
    assert!(
        matches!(not_head, Err(StorageError::NotHead { .. })),
        "{not_head:?}"
    );
    let mut too_far = write(current, crc, 4);
    too_far.op = WriteOp::Write {
        offset: CHUNK - 100,
        crc,
    };
    let too_far = call::<Write>(&c.rpc, &c.addr(0), &too_far, payload.clone()).await;
    assert!(
        matches!(too_far, Err(StorageError::Invalid { .. })),
        "{too_far:?}"
    );
    let mut other_chain = write(current, crc, 5);
    other_chain.chain = ChainId(42);
    let other_chain = call::<Write>(&c.rpc, &c.addr(0), &other_chain, payload.clone()).await;
    assert!(
        matches!(other_chain, Err(StorageError::NoSuchChain { .. })),
        "{other_chain:?}"
    );

    // None of those wrote anything; a good write then succeeds, and its retry
    // (same channel and sequence) is answered without applying it again.
    let ok = call::<Write>(&c.rpc, &c.addr(0), &write(current, crc, 6), payload.clone())
        .await
        .expect("write");
    let again = call::<Write>(&c.rpc, &c.addr(0), &write(current, crc, 6), payload.clone())
        .await
        .expect("retry");
    assert_eq!(ok, again);
    let older = call::<Write>(&c.rpc, &c.addr(0), &write(current, crc, 5), payload.clone()).await;
    assert!(
        matches!(older, Err(StorageError::StaleSequence { .. })),
        "{older:?}"
    );

    // Batched reads over the item or byte limit are refused whole, naming
    // the limit.
    let read = |len: u32| ReadItem {
        chain: ChainId(1),
        chain_version: current,
        chunk,
        offset: 0,
        len,
        verify: false,
        if_changed_from: None,
    };
    for (items, limit) in [
        (
            vec![read(1); BatchReadReq::ITEMS_MAX + 1],
            "batch_read_items_max = 4096",
        ),
        (vec![read(1 << 20); 65], "batch_read_bytes_max = 67108864"),
    ] {
        let refused = c
            .rpc
            .call::<BatchRead>(
                &c.addr(1),
                &BatchReadReq { items },
                Bytes::new(),
                &CallOptions::default(),
            )
            .await;
        assert!(
            matches!(&refused, Err(RpcError::Remote { status: Status::TooLarge, message, .. }) if message.contains(limit)),
            "{refused:?}"
        );
    }

    // An unknown method on the storage port.
    let unknown = c
        .rpc
        .call_raw(
            &c.addr(0),
            499,
            Bytes::new(),
            Bytes::new(),
            Duration::from_secs(2),
        )
        .await;
    assert!(
        matches!(
            unknown,
            Err(RpcError::Remote {
                status: Status::UnknownMethod,
                ..
            })
        ),
        "{unknown:?}"
    );
    c.stop().await;
}

/// A replica whose chunk has a pending version asks the tail which version
/// is committed and serves exactly that one (3FS would answer "not
/// committed" and make the client retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apportioned_reads_serve_the_tails_committed_version() {
    let c = Cluster::start().await;
    let chain = ChainId(1);
    let chunk = ChunkId::new(11, 0);
    let old = data(1, 8192);
    c.client
        .write(chain, chunk, 0, old.clone(), CHUNK)
        .await
        .expect("write");

    // The middle freezes before forwarding the next write: head and middle
    // hold it pending, the tail has only the old version.
    c.nodes[1].failpoints().arm(FailPoint::BeforeForward);
    let new = data(2, 8192);
    let writer = {
        let client = c.client.clone();
        let new = new.clone();
        tokio::spawn(async move { client.write(chain, chunk, 0, new, CHUNK).await })
    };
    while !c.nodes[1].failpoints().hit() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for node in 0..2 {
        let got = c.read_at(node, chunk).await.expect("read while pending");
        assert!(
            same(&got, &old),
            "node {node} served an uncommitted version"
        );
    }
    writer.abort();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apportioned_reads_serve_a_pending_version_the_tail_committed() {
    let c = Cluster::start().await;
    let chain = ChainId(1);
    let chunk = ChunkId::new(12, 0);
    c.client
        .write(chain, chunk, 0, data(1, 8192), CHUNK)
        .await
        .expect("write");

    // The middle freezes after committing: the tail committed the new
    // version, the head still holds it pending.
    c.nodes[1].failpoints().arm(FailPoint::AfterCommit);
    let new = data(2, 8192);
    let writer = {
        let client = c.client.clone();
        let new = new.clone();
        tokio::spawn(async move { client.write(chain, chunk, 0, new, CHUNK).await })
    };
    while !c.nodes[1].failpoints().hit() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = c.read_at(0, chunk).await.expect("read at the head");
    assert!(
        same(&got, &new),
        "the head served the old version after the tail committed"
    );
    writer.abort();
    c.stop().await;
}

/// A target whose engine is poisoned (a failed device write) reports itself
/// offline; the chain goes on without it and writes keep succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_engine_takes_its_target_offline() {
    let c = Cluster::start().await;
    let chain = ChainId(1);
    let chunk = ChunkId::new(13, 0);
    c.client
        .write(chain, chunk, 0, data(1, 4096), CHUNK)
        .await
        .expect("write");
    let tail = &c.nodes[2];
    let device = tail.engines()[0].device();
    device.inject(Fault::EioRange {
        range: 0..device.inner().geometry().capacity_bytes,
        op: Some(IoOp::Write),
    });
    // The write that hits the failing device fails at the tail and poisons
    // its engine; the client retries until the chain has dropped the tail.
    let second = data(2, 4096);
    c.client
        .write(chain, chunk, 0, second.clone(), CHUNK)
        .await
        .expect("write after the fault");
    assert!(
        tail.engines()[0].poisoned().is_some(),
        "the engine was not poisoned"
    );
    let routing = c.client.refresh_routing().await.expect("routing");
    let states: Vec<_> = routing
        .chain(chain)
        .expect("chain")
        .targets
        .iter()
        .map(|t| (t.target, t.state))
        .collect();
    assert_eq!(
        states.last(),
        Some(&(TargetId(2), PublicState::Offline)),
        "{states:?}"
    );
    assert!(
        c.admin_storage
            .space(&c.addr(2))
            .await
            .expect("space")
            .disks[0]
            .poisoned
    );
    for node in 0..2 {
        assert!(
            same(&c.read_at(node, chunk).await.expect("read"), &second),
            "node {node}"
        );
    }
    c.stop().await;
}

/// A node hosts targets on several devices, one engine each: chain 2 lives on
/// every node's second disk and never touches the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_on_a_second_disk_use_their_own_engine() {
    let c = Cluster::start().await;
    let chain = ChainId(2);
    let chunk = ChunkId::new(30, 0);
    let bytes = data(9, 12_345);
    c.client
        .write(chain, chunk, 0, bytes.clone(), CHUNK)
        .await
        .expect("write");
    let read = c.client.read(chain, chunk, 0, CHUNK).await.expect("read");
    assert!(same(&read.data, &bytes));
    for node in &c.nodes {
        let engines = node.engines();
        assert_eq!(
            engines[1].chain_usage(chain).chunks,
            1,
            "{node:?}: chain 2 not on disk 1"
        );
        assert_eq!(
            engines[0].chain_usage(chain).chunks,
            0,
            "{node:?}: chain 2 on disk 0"
        );
    }
    c.stop().await;
}

/// Issue 20: an admin removes a serving member while its node is alive.
/// A client whose routing predates the removal still reads that member;
/// once the removal has returned and a write committed without the member,
/// such a read must not answer the version before (a stale read). The
/// manager keeps the member in the write path, syncing, until its node has
/// seen that it no longer serves, or has been silent so long that its lease
/// has lapsed; both cases are run: node 0 heartbeats on, node 1's
/// heartbeats stop just before its removal (without the fix, node 1 still
/// answers under the routing it held, within its lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_while_serving_serves_no_stale_read() {
    use flyfs_proto::wire::mgmt::{ChainMemberReq, MgmtError, RemoveChainMember};
    let c = Cluster::start().await;
    // Chain 2 is targets 11, 12, 10 on nodes 1, 2, 0; chain 1 is 0, 1, 2.
    for (chain, target, node, silent) in [
        (ChainId(2), TargetId(10), 0usize, false),
        (ChainId(1), TargetId(1), 1usize, true),
    ] {
        let chunk = ChunkId::new(20 + u64::from(chain.0), 0);
        let old = data(5, 4096);
        c.client
            .write(chain, chunk, 0, old.clone(), CHUNK)
            .await
            .expect("write before");
        let stale = c.client.routing().chain(chain).expect("chain").version;
        assert!(same(
            &c.read_at_version(node, chain, stale, chunk)
                .await
                .expect("the member serves before its removal"),
            &old
        ));
        if silent {
            c.beats[node].abort();
        }
        let req = ChainMemberReq { chain, target };
        loop {
            // The manager waits a few seconds for the member to stop
            // serving; past that it says so and finishes by itself.
            match call::<RemoveChainMember>(&c.admin, &c.mgmt, &req, Bytes::new()).await {
                Ok(()) => break,
                Err(MgmtError::Unavailable { reason }) => {
                    assert!(reason.contains("leaving"), "{reason}");
                }
                Err(e) => panic!("remove {target:?}: {e}"),
            }
        }
        c.client.refresh_routing().await.expect("routing");
        let members = c.client.routing().chain(chain).expect("chain").clone();
        assert!(
            members.targets.iter().all(|m| m.target != target),
            "{members:?}"
        );
        let new = data(6, 4096);
        c.client
            .write(chain, chunk, 0, new.clone(), CHUNK)
            .await
            .expect("write after");
        match c.read_at_version(node, chain, stale, chunk).await {
            Err(e) => eprintln!("{target:?} refuses the stale routing's read: {e}"),
            Ok(got) => panic!(
                "{target:?} (silent: {silent}) answered a read after its removal and a later \
                 commit, with {}",
                if same(&got, &old) {
                    "the version before it (a stale read)"
                } else {
                    "some version"
                }
            ),
        }
    }
    c.stop().await;
}

/// Chain-internal requests (`Forward`, `SyncDone`, `DumpMeta`) are taken
/// only from the node holding the receiver's predecessor: another storage
/// node's forged `Forward{Replace}` is refused `Forbidden` and the replica
/// keeps its chunk; a head takes none of them; the true predecessor is let
/// through to the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_requests_come_only_from_the_predecessor() {
    use flyfs_proto::wire::storage::{
        DumpMeta, DumpMetaReq, Forward, ForwardOp, ForwardReq, SyncDone, SyncDoneReq,
    };
    let c = Cluster::start().await;
    let chunk = ChunkId {
        inode: InodeId(9),
        index: 0,
    };
    let good = data(3, 4096);
    c.client
        .write(ChainId(1), chunk, 0, good.clone(), CHUNK)
        .await
        .expect("write");
    let version = c.version();
    // Chain 1 is targets 0, 1, 2 on nodes 0, 1, 2: node 0 is the middle
    // replica's predecessor, node 2 is not, and node 0's target is the head.
    let as_node = |node: u32| Client::new(Tcp, Default::default(), testing::storage(NodeId(node)));
    let forged = data(4, 4096);
    let forward = ForwardReq {
        chain: ChainId(1),
        chain_version: version,
        chunk,
        op: ForwardOp::Replace {
            crc: crc32c::crc32c(&forged),
        },
        version: flyfs_proto::ids::ChunkVersion(99),
        chunk_size: CHUNK,
        ..ForwardReq::default()
    };
    let sync_done = SyncDoneReq {
        chain: ChainId(1),
        chain_version: version,
        channels: Vec::new(),
        more: true,
    };
    let dump = DumpMetaReq {
        chain: ChainId(1),
        chain_version: version,
        after: None,
        limit: 10,
    };
    let forbidden = |what: &str, answer: Result<(), RpcError>, wants: &str| match answer {
        Err(RpcError::Remote {
            status: Status::Forbidden,
            message,
            ..
        }) => assert!(message.contains(wants), "{what}: {message}"),
        other => panic!("{what}: {other:?}"),
    };
    for (from, to, wants) in [
        (2, 1, "only from node 0"),
        (1, 0, "has no predecessor"),
        (2, 0, "has no predecessor"),
    ] {
        let rpc = as_node(from);
        let options = CallOptions::default();
        let addr = c.addr(to);
        let answer = rpc
            .call::<Forward>(&addr, &forward, forged.clone(), &options)
            .await
            .map(drop);
        forbidden(&format!("Forward {from} -> {to}"), answer, wants);
        let answer = rpc
            .call::<SyncDone>(&addr, &sync_done, Bytes::new(), &options)
            .await
            .map(drop);
        forbidden(&format!("SyncDone {from} -> {to}"), answer, wants);
        let answer = rpc
            .call::<DumpMeta>(&addr, &dump, Bytes::new(), &options)
            .await
            .map(drop);
        forbidden(&format!("DumpMeta {from} -> {to}"), answer, wants);
    }
    for node in 0..3 {
        let read = c.read_at(node, chunk).await.expect("read");
        assert!(same(&read, &good), "node {node} kept its chunk");
    }
    // A chunk is fetched whole (repair) only by another member of its chain.
    let fetch = flyfs_proto::wire::storage::FetchChunkReq {
        chain: ChainId(1),
        chain_version: version,
        chunk,
    };
    let stranger = as_node(9);
    let answer = stranger
        .call::<flyfs_proto::wire::storage::FetchChunk>(
            &c.addr(1),
            &fetch,
            Bytes::new(),
            &CallOptions::default(),
        )
        .await
        .map(drop);
    forbidden(
        "FetchChunk 9 -> 1",
        answer,
        "no other target on the caller's node",
    );
    let (fetched, payload) = as_node(2)
        .call::<flyfs_proto::wire::storage::FetchChunk>(
            &c.addr(1),
            &fetch,
            Bytes::new(),
            &CallOptions::default(),
        )
        .await
        .expect("fetch by a member");
    fetched.expect("the chunk");
    assert!(same(&payload.into_bytes().unwrap_or_default(), &good));
    // The predecessor reaches the handlers.
    let predecessor = as_node(0);
    let (dumped, _) = predecessor
        .call::<DumpMeta>(&c.addr(1), &dump, Bytes::new(), &CallOptions::default())
        .await
        .expect("dump from the predecessor");
    let dumped = dumped.expect("the middle replica's metadata");
    assert_eq!(dumped.chunks.len(), 1, "{dumped:?}");
    assert_eq!(dumped.chunks[0].chunk, chunk);
    let (done, _) = predecessor
        .call::<SyncDone>(
            &c.addr(1),
            &sync_done,
            Bytes::new(),
            &CallOptions::default(),
        )
        .await
        .expect("sync done from the predecessor");
    done.expect("a page of nothing");
    c.stop().await;
}

/// What node `node` answers to `storage.Space`.
async fn space_of(c: &Cluster, node: usize) -> flyfs_proto::wire::storage::SpaceRsp {
    use flyfs_proto::wire::storage::{Space, SpaceReq};
    let (space, _) = c
        .admin
        .call::<Space>(
            &c.addr(node),
            &SpaceReq {},
            Bytes::new(),
            &CallOptions::default(),
        )
        .await
        .expect("space");
    space
}

/// Waits until `done` holds, polling; panics with `what` after 20 s.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A replica taken out of its chain gets its space back, but only once the
/// manager has forgotten its target: node 1's replica of chain 1 (target 1,
/// alone on its disk 0) keeps every chunk while it is an unassigned target,
/// over several heartbeats; once forgotten, the node removes the chunks in
/// batches (4 per heartbeat here), restarting midway (a new node process
/// over the same engines, which finds the rest from its routing alone), and
/// reports the space `freeing` meanwhile. Nothing of a member is touched:
/// node 1's replica of chain 2 on its other disk, and the other replicas of
/// chain 1. A target of chain 1 placed on that disk again is filled by a
/// resync and serves the chain's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_replicas_chunks_are_freed_once_its_target_is_forgotten() {
    use flyfs_proto::wire::mgmt::{
        AddChainMember, ChainMemberReq, GetSyncProgress, GetSyncProgressReq, MgmtError,
        RemoveChainMember, RemoveTarget, RemoveTargetReq,
    };
    const CHUNKS: u64 = 120;
    // Whole 64 KiB chunks, so that the resync below takes several
    // heartbeats and its progress is seen between its ends.
    const LEN: usize = CHUNK as usize;
    let mut c = Cluster::start().await;
    for i in 0..CHUNKS {
        c.client
            .write(
                ChainId(1),
                ChunkId::new(40, i as u32),
                0,
                data(i as u8, LEN),
                CHUNK,
            )
            .await
            .expect("write chain 1");
    }
    for i in 0..10u32 {
        c.client
            .write(
                ChainId(2),
                ChunkId::new(41, i),
                0,
                data(i as u8, LEN),
                CHUNK,
            )
            .await
            .expect("write chain 2");
    }
    let usage = |c: &Cluster, node: usize, disk: usize, chain: u32| {
        c.nodes[node].engines()[disk].chain_usage(ChainId(chain))
    };
    for node in 0..3 {
        assert_eq!(usage(&c, node, 0, 1).chunks, CHUNKS, "node {node}");
        assert_eq!(usage(&c, node, 1, 2).chunks, 10, "node {node}");
    }
    let req = ChainMemberReq {
        chain: ChainId(1),
        target: TargetId(1),
    };
    loop {
        match call::<RemoveChainMember>(&c.admin, &c.mgmt, &req, Bytes::new()).await {
            Ok(()) => break,
            Err(MgmtError::Unavailable { reason }) => assert!(reason.contains("leaving")),
            Err(e) => panic!("remove target 1: {e}"),
        }
    }
    // Out of the chain, not forgotten: node 1 holds a routing without it
    // as a member, looks for stray chunks on several heartbeats, and frees
    // nothing (an admin may still add it back).
    wait_until("node 1 sees target 1 out of chain 1", || {
        c.nodes[1]
            .routing()
            .target(TargetId(1))
            .is_some_and(|t| t.chain.is_none())
    })
    .await;
    let passes = c.nodes[1].free_stats().passes;
    wait_until("three more freeing passes on node 1", || {
        c.nodes[1].free_stats().passes >= passes + 3
    })
    .await;
    assert_eq!(usage(&c, 1, 0, 1).chunks, CHUNKS);
    assert_eq!(c.nodes[1].free_stats().freed_chunks, 0);

    call::<RemoveTarget>(
        &c.admin,
        &c.mgmt,
        &RemoveTargetReq {
            target: TargetId(1),
        },
        Bytes::new(),
    )
    .await
    .expect("forget target 1");
    // Freeing, in batches: catch it midway and restart the node.
    wait_until("node 1 freeing midway", || {
        c.nodes[1].free_stats().freed_chunks >= 4
    })
    .await;
    let space = space_of(&c, 1).await;
    let left = usage(&c, 1, 0, 1).chunks;
    assert!(
        left > 0 && left < CHUNKS,
        "{left} chunks left: caught too late"
    );
    assert!(space.disks[0].freeing_chunks > 0, "{space:?}");
    assert_eq!(space.disks[1].freeing_chunks, 0, "{space:?}");
    c.beats[1].abort();
    wait_until("node 1's last batch to end", || !c.nodes[1].free_running()).await;
    let freed_before = c.nodes[1].free_stats().freed_chunks;
    let mut config = c.nodes[1].config().clone();
    let (listener, addr) = bind().await;
    config.addr = addr;
    let engines = c.nodes[1].engines().to_vec();
    let credentials = testing::storage(NodeId(1));
    let node = StorageNode::new(config, engines, Tcp, credentials.clone());
    let server = Server::new(
        StorageService::new(node.clone()),
        ServerConfig::default(),
        credentials,
    )
    .spawn(listener)
    .expect("serve storage");
    std::mem::replace(&mut c.servers[2], server)
        .shutdown()
        .await;
    c.beats[1] = tokio::spawn(node.clone().run());
    c.nodes[1] = node;
    wait_until("the restarted node 1 to free the rest", || {
        usage(&c, 1, 0, 1).chunks == 0
    })
    .await;
    let stats = c.nodes[1].free_stats();
    assert_eq!(freed_before + stats.freed_chunks, CHUNKS, "{stats:?}");
    assert_eq!(
        stats.freed_bytes,
        stats.freed_chunks * LEN as u64,
        "{stats:?}"
    );
    assert!(stats.batches >= stats.freed_chunks / 4, "{stats:?}");
    assert_eq!(c.nodes[1].engines()[0].space().allocated_bytes, 0);
    let space = space_of(&c, 1).await;
    assert_eq!(
        (
            space.disks[0].freeing_chunks,
            space.disks[0].allocated_bytes
        ),
        (0, 0),
        "{space:?}"
    );
    // Members untouched.
    assert_eq!(usage(&c, 1, 1, 2).chunks, 10);
    assert_eq!(usage(&c, 0, 0, 1).chunks, CHUNKS);
    assert_eq!(usage(&c, 2, 0, 1).chunks, CHUNKS);

    // Chain 1 placed on node 1's disk 0 again, as a new target: a resync
    // fills it, and it serves the chain's data.
    call::<CreateTarget>(
        &c.admin,
        &c.mgmt,
        &CreateTargetReq {
            target: TargetId(21),
            node: NodeId(1),
            disk: 0,
        },
        Bytes::new(),
    )
    .await
    .expect("create target 21");
    let req = ChainMemberReq {
        chain: ChainId(1),
        target: TargetId(21),
    };
    call::<AddChainMember>(&c.admin, &c.mgmt, &req, Bytes::new())
        .await
        .expect("add target 21");
    // The resync's progress in bytes, as its source counts it and as the
    // manager hands it on, until target 21 serves.
    let (mut at_node, mut at_manager) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let serving = c.nodes[1].routing().chain(ChainId(1)).is_some_and(|chain| {
            chain.targets.len() == 3
                && chain
                    .targets
                    .iter()
                    .all(|t| t.state == PublicState::Serving)
        });
        if serving {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "target 21 never served"
        );
        at_node.extend(
            c.nodes
                .iter()
                .flat_map(|n| n.sync_progress())
                .filter(|p| p.target == TargetId(21)),
        );
        let reported =
            call::<GetSyncProgress>(&c.admin, &c.mgmt, &GetSyncProgressReq {}, Bytes::new())
                .await
                .expect("sync progress");
        at_manager.extend(
            reported
                .syncs
                .into_iter()
                .filter(|p| p.target == TargetId(21)),
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let total = CHUNKS * LEN as u64;
    at_node.dedup();
    at_manager.dedup();
    assert!(
        !at_node.is_empty() && !at_manager.is_empty(),
        "{at_node:?} {at_manager:?}"
    );
    for p in at_node.iter().chain(&at_manager) {
        assert_eq!(
            (p.chain, p.bytes_total, p.chunks_total),
            (ChainId(1), total, CHUNKS),
            "{p:?}"
        );
        assert!(p.bytes_done <= p.bytes_total, "{p:?}");
    }
    assert!(
        at_node
            .windows(2)
            .all(|w| w[0].bytes_done <= w[1].bytes_done),
        "progress went back: {at_node:?}"
    );
    assert!(
        at_node
            .iter()
            .any(|p| p.bytes_done > 0 && p.bytes_done < total),
        "no progress seen between 0 and {total}: {at_node:?}"
    );
    assert_eq!(
        at_node.last().map(|p| p.bytes_done),
        Some(total),
        "{at_node:?}"
    );
    c.wait_all_serving().await;
    assert_eq!(usage(&c, 1, 0, 1).chunks, CHUNKS);
    for i in [0, CHUNKS / 2, CHUNKS - 1] {
        let got = c
            .read_at(1, ChunkId::new(40, i as u32))
            .await
            .expect("read at the new replica");
        assert!(same(&got, &data(i as u8, LEN)), "chunk {i}");
    }
    c.stop().await;
}

/// Sim seed 2624: a client's retry must not apply its write a second time
/// at a replica that became head while the write's first attempt, forwarded
/// to it by the head before, still held the chunk lock there, with another
/// write queued between the two. The first attempt finishes there (and
/// fills the channel table) while the retry waits for the lock; then the
/// other write commits on top, so the chunk's version no longer names the
/// retried request, and only the channel table, asked again under the lock,
/// says it was applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_at_a_new_head_is_not_applied_again_after_its_forward() {
    use flyfs_proto::ids::ChunkVersion;
    use flyfs_proto::wire::mgmt::{ChainMemberReq, MgmtError, RemoveChainMember};
    use flyfs_proto::wire::storage::{Forward, ForwardOp, ForwardReq};
    let mut c = Cluster::start().await;
    let chain = ChainId(1);
    let chunk = ChunkId::new(30, 0);
    c.client
        .write(chain, chunk, 0, data(1, 4096), CHUNK)
        .await
        .expect("first version");
    let before = c.version();
    // Node 0's head forwards the first attempt of a write to node 1 (the
    // test speaks as node 0); the tail, node 2, freezes on it, so node 1
    // holds the chunk's lock.
    c.nodes[2].failpoints().arm(FailPoint::AfterPending);
    let as_node0 = Arc::new(Client::new(
        Tcp,
        Default::default(),
        testing::storage(NodeId(0)),
    ));
    let written = data(2, 4096);
    let channel = Channel {
        client: ClientId(5),
        id: 1,
        seq: 1,
    };
    let forward = |req: ForwardReq, payload: Bytes| {
        let rpc = as_node0.clone();
        let addr = c.addr(1);
        tokio::spawn(async move {
            let options = CallOptions {
                timeout: Duration::from_secs(60),
                ..CallOptions::default()
            };
            rpc.call::<Forward>(&addr, &req, payload, &options)
                .await
                .map(|(rsp, _)| rsp)
        })
    };
    let first = forward(
        ForwardReq {
            chain,
            chain_version: before,
            chunk,
            version: ChunkVersion(2),
            op: ForwardOp::Write {
                offset: 0,
                crc: crc32c::crc32c(&written),
            },
            chunk_size: CHUNK,
            channel,
            sync: false,
        },
        written.clone(),
    );
    while !c.nodes[2].failpoints().hit() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Another client's truncate comes the same way and queues for the lock
    // at node 1: sent twice, one copy is answered "in progress" once the
    // other is past the check of in-flight forwards, right before the lock.
    let truncate = ForwardReq {
        chain,
        chain_version: before,
        chunk,
        version: ChunkVersion(3),
        op: ForwardOp::Truncate { len: 100 },
        chunk_size: CHUNK,
        channel: Channel {
            client: ClientId(6),
            id: 1,
            seq: 1,
        },
        sync: false,
    };
    let mut copies = vec![
        forward(truncate.clone(), Bytes::new()),
        forward(truncate, Bytes::new()),
    ];
    let queued = loop {
        if let Some(at) = copies.iter().position(|copy| copy.is_finished()) {
            let answer = copies.swap_remove(at).await.expect("join");
            assert!(
                matches!(answer, Ok(Err(StorageError::InProgress { .. }))),
                "{answer:?}"
            );
            break copies.pop().expect("the other copy");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Node 0's target leaves the chain (its node has seen it stop serving):
    // node 1 is the head.
    let req = ChainMemberReq {
        chain,
        target: TargetId(0),
    };
    loop {
        match call::<RemoveChainMember>(&c.admin, &c.mgmt, &req, Bytes::new()).await {
            Ok(()) => break,
            Err(MgmtError::Unavailable { .. }) => {}
            Err(e) => panic!("remove target 0: {e}"),
        }
    }
    let head = loop {
        let routing = c.nodes[1].routing();
        let info = routing.chain(chain).expect("chain 1");
        if info.targets.iter().all(|m| m.target != TargetId(0)) {
            break info.version;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // The client, whose first attempt failed at the old head, retries at
    // the new one: the first attempt has not finished there, so the retry
    // waits for the lock, behind the truncate.
    let retry = {
        let rpc = Client::new(Tcp, Default::default(), testing::client());
        let addr = c.addr(1);
        let req = WriteReq {
            chain,
            chain_version: head,
            chunk,
            op: WriteOp::Write {
                offset: 0,
                crc: crc32c::crc32c(&written),
            },
            chunk_size: CHUNK,
            channel,
        };
        let written = written.clone();
        tokio::spawn(async move {
            let options = CallOptions {
                timeout: Duration::from_secs(60),
                ..CallOptions::default()
            };
            rpc.call::<Write>(&addr, &req, written, &options)
                .await
                .map(|(rsp, _)| rsp)
        })
    };
    // Node 2 dies with the frozen write; once the manager takes its target
    // out of the write path, node 1 is the tail and everything commits in
    // the lock's order: the first attempt, the truncate, the retry.
    c.beats[2].abort();
    c.servers.remove(3).shutdown().await;
    let first = first.await.expect("join").expect("rpc");
    first.expect("the first attempt commits at node 1");
    let truncated = queued.await.expect("join").expect("rpc");
    truncated.expect("the truncate commits on top");
    let retried = retry.await.expect("join").expect("rpc").expect("retry");
    assert_eq!(
        retried.version,
        ChunkVersion(2),
        "the retry was applied again (on top of the truncate) instead of answered as the \
         first attempt: {retried:?}"
    );
    c.client.refresh_routing().await.expect("routing");
    let now = c.version();
    let read = c
        .read_at_version(1, chain, now, chunk)
        .await
        .expect("read at the new head");
    assert!(
        same(&read, &written[..100]),
        "the chunk is not the truncate's: {} bytes",
        read.len()
    );
    c.stop().await;
}
