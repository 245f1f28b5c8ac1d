//! The scrubber and repair in running storage nodes: a manager and storage
//! nodes over TCP in one process, each with a real chunk engine on a real
//! file (io_uring, `O_DIRECT`). Bytes of one chunk are rotted on one
//! replica's file; that replica's scrubber (or a client's read) finds it and
//! repairs it from a healthy replica, leaving the other replicas untouched. A
//! chain of one replica has nobody to repair from: the rot is reported and
//! the chunk keeps refusing reads.
//!
//! Without io_uring (an old kernel, a seccomp policy) the tests say so and
//! skip.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_bypass::uring::{UringConfig, UringDevice};
use flyfs_bypass::{BufferPool, HugePages, PoolConfig};
use flyfs_chunk_engine::{
    ChunkKey, ChunkMeta, Engine, EngineConfig, EngineError, FormatOptions, ReadRequest,
};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_craq::mgmt::{MemStore, MgmtConfig, MgmtService};
use flyfs_craq::{ScrubConfig, ScrubStats, StorageConfig, StorageNode, StorageService};
use flyfs_proto::ids::{ChainId, ChunkId, ClientId, NodeId, TargetId};
use flyfs_proto::wire::mgmt::{
    CreateChain, CreateChainReq, CreateTarget, CreateTargetReq, LocalState, PublicState,
};
use flyfs_proto::wire::storage::{BatchRead, BatchReadReq, ReadItem, StorageError};
use flyfs_rpc::{CallOptions, Client, Server, ServerConfig, ServerHandle, Tcp, testing};
use tokio::time::Instant;

const CHUNK: u32 = 64 << 10;
const DEVICE_BYTES: u64 = 32 << 20;
const CHAIN: ChainId = ChainId(1);

/// How long a condition may take before the test fails: generous, for a
/// loaded machine; the tests wait for conditions, never for a time.
const PATIENCE: Duration = Duration::from_secs(60);

type Node = Arc<StorageNode<UringDevice, Tcp>>;

struct Cluster {
    _dir: tempfile::TempDir,
    paths: Vec<PathBuf>,
    nodes: Vec<Node>,
    servers: Vec<ServerHandle>,
    client: Arc<StorageClient<Tcp>>,
    /// Raw calls as a mount makes them (client role).
    rpc: Client<Tcp>,
}

async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    (listener, addr)
}

/// Whether io_uring works here; says why not otherwise.
fn io_uring_available(dir: &Path) -> bool {
    let path = dir.join("probe.img");
    let probe = UringDevice::create_file(&path, 1 << 20, &UringConfig::default(), None);
    let _ = std::fs::remove_file(&path);
    match probe {
        Ok(_) => true,
        Err(error) => {
            eprintln!("skipped: io_uring is not available here ({error})");
            false
        }
    }
}

/// Polls `condition` until it holds; fails the test naming `what` after
/// [`PATIENCE`].
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Cluster {
    /// `nodes` storage nodes, one file-backed engine each, and chain 1 with
    /// one target on each node (target id = node index), head on node 0.
    /// The scrubbers are not running yet (see [`scrub`](Self::scrub)).
    async fn start(nodes: u32, scrub: ScrubConfig) -> Option<Cluster> {
        let dir = tempfile::tempdir().expect("tempdir");
        if !io_uring_available(dir.path()) {
            return None;
        }
        let service = MgmtService::open(
            Box::new(MemStore::new()),
            MgmtConfig {
                heartbeat_interval: Duration::from_millis(50),
                failure_timeout: Duration::from_secs(10),
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

        let mut paths = Vec::new();
        let mut storage = Vec::new();
        for i in 0..nodes {
            let path = dir.path().join(format!("node{i}.img"));
            let pool = BufferPool::new(&PoolConfig {
                classes: vec![(4 << 10, 64), (64 << 10, 64)],
                hugepages: HugePages::Never,
            })
            .expect("pool");
            let device =
                UringDevice::create_file(&path, DEVICE_BYTES, &UringConfig::default(), Some(&pool))
                    .expect("device file");
            let format = FormatOptions {
                chunk_size_min: 4 << 10,
                chunk_size_max: u64::from(CHUNK),
                journal_bytes: Some(1 << 20),
                force: false,
            };
            Engine::format(&device, &format).await.expect("format");
            let engine = Engine::open(device, pool, EngineConfig::default())
                .await
                .expect("open");
            let (listener, addr) = bind().await;
            let mut config = StorageConfig::new(NodeId(i), addr, mgmt.clone());
            config.heartbeat_interval = Duration::from_millis(50);
            config.lease_timeout = Duration::from_secs(4);
            config.rpc_timeout = Duration::from_secs(4);
            config.scrub = scrub;
            let credentials = testing::storage(NodeId(i));
            let node = StorageNode::new(config, vec![Arc::new(engine)], Tcp, credentials.clone());
            tokio::spawn(node.clone().run());
            servers.push(
                Server::new(
                    StorageService::new(node.clone()),
                    ServerConfig::default(),
                    credentials,
                )
                .spawn(listener)
                .expect("serve storage"),
            );
            paths.push(path);
            storage.push(node);
        }
        let admin = Client::new(Tcp, Default::default(), testing::admin());
        while service.routing().nodes.len() < nodes as usize {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for i in 0..nodes {
            let req = CreateTargetReq {
                target: TargetId(u64::from(i)),
                node: NodeId(i),
                disk: 0,
            };
            let (rsp, _) = admin
                .call::<CreateTarget>(&mgmt, &req, Bytes::new(), &CallOptions::default())
                .await
                .expect("create target");
            rsp.expect("target");
        }
        let req = CreateChainReq {
            chain: CHAIN,
            targets: (0..nodes).map(|i| TargetId(u64::from(i))).collect(),
        };
        let (rsp, _) = admin
            .call::<CreateChain>(&mgmt, &req, Bytes::new(), &CallOptions::default())
            .await
            .expect("create chain");
        rsp.expect("chain");
        let mut config = ClientConfig::new([mgmt], ClientId(77));
        config.rpc_timeout = Duration::from_secs(4);
        config.op_deadline = Duration::from_secs(20);
        let cluster = Cluster {
            _dir: dir,
            paths,
            nodes: storage,
            servers,
            client: StorageClient::new(config, Tcp, testing::client()),
            rpc: Client::new(Tcp, Default::default(), testing::client()),
        };
        let serving = || {
            cluster.nodes.iter().all(|n| {
                n.routing()
                    .chain(CHAIN)
                    .is_some_and(|c| c.targets.iter().all(|t| t.state == PublicState::Serving))
                    && n.targets()
                        .iter()
                        .all(|(_, _, l)| *l == LocalState::UpToDate)
            })
        };
        wait_for("the chain to serve on every node", serving).await;
        cluster.client.refresh_routing().await.expect("routing");
        Some(cluster)
    }

    /// Starts every node's scrubber and repairs.
    fn scrub(&self) {
        for node in &self.nodes {
            tokio::spawn(node.clone().scrub());
        }
    }

    fn engine(&self, node: usize) -> &Engine<UringDevice> {
        &self.nodes[node].engines()[0]
    }

    fn meta(&self, node: usize, chunk: ChunkId) -> ChunkMeta {
        self.engine(node)
            .stat(ChunkKey::new(CHAIN, chunk))
            .and_then(|info| info.committed)
            .expect("a committed chunk")
    }

    /// The whole committed chunk as `node`'s engine reads and checks it.
    async fn engine_read(&self, node: usize, chunk: ChunkId) -> Result<Vec<u8>, EngineError> {
        let out = self
            .engine(node)
            .read(ChunkKey::new(CHAIN, chunk), ReadRequest::whole_verified())
            .await?;
        Ok(out.data.to_vec())
    }

    /// Flips one byte of `chunk`'s committed bytes in `node`'s device file,
    /// as rot on the medium would.
    fn rot(&self, node: usize, chunk: ChunkId, offset: u64) {
        let meta = self.meta(node, chunk);
        let at = self.engine(node).superblock().slot_offset(meta.slot) + offset;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.paths[node])
            .expect("open the device file");
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).expect("read the byte");
        file.write_all_at(&[!byte[0]], at).expect("rot the byte");
        file.sync_data().expect("sync the device file");
    }

    /// Reads a chunk from one replica, over the wire, as a client does.
    async fn read_at(&self, node: usize, chunk: ChunkId) -> Result<Bytes, StorageError> {
        let version = self.client.routing().chain(CHAIN).expect("chain").version;
        let req = BatchReadReq {
            items: vec![ReadItem {
                chain: CHAIN,
                chain_version: version,
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
                &self.nodes[node].config().addr,
                &req,
                Bytes::new(),
                &CallOptions::default(),
            )
            .await
            .expect("batch read");
        rsp.results.into_iter().next().expect("one result")?;
        Ok(payload.into_bytes().unwrap_or_default())
    }

    fn stats(&self, node: usize) -> ScrubStats {
        self.nodes[node].scrub_stats()
    }

    async fn stop(self) {
        for server in self.servers {
            server.shutdown().await;
        }
    }
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Writes chunks 0..4 of inode 5, of different lengths; returns their bytes.
async fn write_chunks(c: &Cluster) -> Vec<(ChunkId, Vec<u8>)> {
    let mut written = Vec::new();
    for i in 0..4u32 {
        let chunk = ChunkId::new(5, i);
        let bytes = data(i as u8 + 1, 20_000 + 7_000 * i as usize);
        c.client
            .write(CHAIN, chunk, 0, Bytes::from(bytes.clone()), CHUNK)
            .await
            .expect("write");
        written.push((chunk, bytes));
    }
    written
}

/// Fast enough that a pass over a few chunks is quick, and passes follow
/// one another closely.
fn fast_scrub() -> ScrubConfig {
    ScrubConfig {
        bytes_per_s: 256 << 20,
        pass_interval: Duration::from_millis(20),
        repairs_max: 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrubber_repairs_a_rotten_chunk_from_a_healthy_replica() {
    let Some(c) = Cluster::start(3, fast_scrub()).await else {
        return;
    };
    let written = write_chunks(&c).await;
    let (rotten, expected) = written[2].clone();
    // The middle replica rots; the others stay as they are.
    let rotten_node = 1;
    let before: Vec<Vec<ChunkMeta>> = (0..3)
        .map(|n| written.iter().map(|(chunk, _)| c.meta(n, *chunk)).collect())
        .collect();
    c.rot(rotten_node, rotten, 1000);
    // Only the engine looks: a read through the service would ask for a
    // repair itself (the next test), and this one is the scrubber's.
    match c.engine_read(rotten_node, rotten).await {
        Err(EngineError::ChunkCorrupt { .. }) => {}
        other => panic!("the rot did not reach the engine: {other:?}"),
    }

    c.scrub();
    wait_for("the rotten chunk to be repaired", || {
        c.stats(rotten_node).repaired >= 1
    })
    .await;

    // The repaired replica serves the chunk, from its engine and over the
    // wire, at the same version.
    let repaired = c
        .engine_read(rotten_node, rotten)
        .await
        .expect("the repaired chunk reads back");
    assert!(repaired == expected, "the repaired chunk's bytes differ");
    let got = c.read_at(rotten_node, rotten).await.expect("read");
    assert!(got[..] == expected[..], "the repaired chunk reads wrong");
    let after = c.meta(rotten_node, rotten);
    let old = before[rotten_node][2];
    assert_eq!(
        (after.version, after.len, after.crc),
        (old.version, old.len, old.crc)
    );
    assert_eq!(
        (after.client, after.request),
        (old.client, old.request),
        "the repair keeps who wrote the version"
    );

    // Every other replica passed over all its chunks, found nothing and was
    // not written: same slots, same commit times.
    wait_for("a whole pass on every node", || {
        (0..3).all(|n| c.stats(n).passes >= 2)
    })
    .await;
    for (node, metas) in before.iter().enumerate() {
        let stats = c.stats(node);
        if node == rotten_node {
            assert_eq!(stats.repaired, 1, "{stats:?}");
            assert!(stats.corrupt_found >= 1, "{stats:?}");
            assert_eq!(stats.repair_failures, 0, "{stats:?}");
        } else {
            assert_eq!(
                (stats.corrupt_found, stats.repaired, stats.repair_failures),
                (0, 0, 0),
                "node {node}: {stats:?}"
            );
            assert!(stats.chunks_scrubbed >= 4, "node {node}: {stats:?}");
        }
        for (i, (chunk, bytes)) in written.iter().enumerate() {
            if node == rotten_node && *chunk == rotten {
                continue;
            }
            assert_eq!(
                c.meta(node, *chunk),
                metas[i],
                "node {node} {chunk:?} was rewritten"
            );
            let read = c.engine_read(node, *chunk).await.expect("read");
            assert!(read == *bytes, "node {node} {chunk:?} reads wrong");
        }
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_hits_rot_starts_a_repair_with_the_scrubber_off() {
    let off = ScrubConfig {
        bytes_per_s: 0,
        ..fast_scrub()
    };
    let Some(c) = Cluster::start(3, off).await else {
        return;
    };
    let written = write_chunks(&c).await;
    let (rotten, expected) = written[0].clone();
    let rotten_node = 2;
    c.rot(rotten_node, rotten, 5);
    c.scrub();
    match c.read_at(rotten_node, rotten).await {
        Err(StorageError::NotServing { reason, .. }) => {
            assert!(reason.contains("corrupt"), "{reason}");
        }
        other => panic!("a rotten replica served: {other:?}"),
    }
    wait_for("the read's repair", || c.stats(rotten_node).repaired >= 1).await;
    let got = c.read_at(rotten_node, rotten).await.expect("read");
    assert!(got[..] == expected[..], "the repaired chunk reads wrong");
    let stats = c.stats(rotten_node);
    assert_eq!(stats.chunks_scrubbed, 0, "the scrubber is off: {stats:?}");
    assert_eq!(stats.corrupt_found, 1, "{stats:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_replica_reports_rot_and_keeps_refusing_reads() {
    let Some(c) = Cluster::start(1, fast_scrub()).await else {
        return;
    };
    let written = write_chunks(&c).await;
    let (rotten, _) = written[1].clone();
    let before = c.meta(0, rotten);
    c.rot(0, rotten, 12_345);
    c.scrub();
    wait_for("the failed repair", || c.stats(0).repair_failures >= 1).await;
    let stats = c.stats(0);
    assert!(stats.corrupt_found >= 1, "{stats:?}");
    assert_eq!(stats.repaired, 0, "{stats:?}");
    // Nothing was written over the rotten chunk: it still fails its CRC
    // and refuses reads.
    assert_eq!(c.meta(0, rotten), before);
    match c.engine_read(0, rotten).await {
        Err(EngineError::ChunkCorrupt { .. }) => {}
        other => panic!("the rotten chunk changed: {other:?}"),
    }
    assert!(matches!(
        c.read_at(0, rotten).await,
        Err(StorageError::NotServing { .. })
    ));
    // The healthy chunks still read.
    for (chunk, bytes) in written.iter().filter(|(chunk, _)| *chunk != rotten) {
        let got = c.read_at(0, *chunk).await.expect("read");
        assert!(got[..] == bytes[..], "{chunk:?} reads wrong");
    }
    c.stop().await;
}
