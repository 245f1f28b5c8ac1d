//! A deterministic simulation of a whole flyfs storage cluster in one
//! process: a cluster manager, storage nodes on in-memory devices, and
//! clients, over turmoil's simulated network and clock. A seed fixes
//! everything: the faults drawn, message latencies, and every scheduling
//! decision, so a failing seed replays exactly.
//!
//! Faults: node crashes with restarts (unflushed device writes are lost, as
//! in a power cut), partitions between any two hosts (messages in flight are
//! lost), message delay and reordering across connections, manager restarts,
//! and fail points that freeze a node at an exact step of the write path.
//!
//! Checkers, after the faults heal: every chunk's history of reads and writes
//! is linearizable (stateright's linearizability tester against a register;
//! the final reads after healing make this cover "no acknowledged write is
//! lost"); all replicas of each chain hold byte-identical committed chunks;
//! every target returns to serving; every engine's allocator and metadata
//! agree.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_bypass::mem::MemDevice;
use flyfs_bypass::{BufferPool, HugePages, PoolConfig, block_on};
use flyfs_chunk_engine::{ChunkKey, Engine, EngineConfig, FormatOptions, JournalMode, ReadRequest};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_craq::mgmt::service::{MgmtConfig, MgmtService};
use flyfs_craq::mgmt::store::MemStore;
use flyfs_craq::storage::FailPoint;
use flyfs_craq::{StorageConfig, StorageNode, StorageService};
use flyfs_proto::ids::{ChainId, ChunkId, ClientId, NodeId, TargetId};
use flyfs_proto::wire::mgmt::{
    CreateChain, CreateChainReq, CreateTarget, CreateTargetReq, PublicState, RoutingInfo,
};
use flyfs_rpc::{CallOptions, Network, ServerConfig, SimNet};
use flyfs_time::Backoff;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use stateright::semantics::register::{Register, RegisterOp, RegisterRet};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester};

pub type Node = StorageNode<MemDevice, SimNet>;

pub const MGMT: &str = "mgmt";
pub const MGMT_PORT: u16 = 9000;
pub const NODE_PORT: u16 = 9100;
/// Bytes each simulated write writes: the whole chunk, so a chunk behaves
/// as a register and its history can be checked as one.
pub const VALUE_BYTES: usize = 1024;
pub const CHUNK_SIZE: u32 = 64 << 10;

pub fn node_name(i: usize) -> String {
    format!("node{i}")
}

/// The shape of one simulated run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    pub chains: u32,
    pub replicas: usize,
    pub chunks_per_chain: u32,
    pub clients: usize,
    pub ops_per_client: usize,
    /// Draw random faults while the workload runs.
    pub faults: bool,
    /// Run the storage nodes with `overlap_prepare_and_forward`, which
    /// reopens the window the default write path closes (a test shows the
    /// checker still finds it).
    pub overlap_prepare: bool,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            nodes: 4,
            chains: 2,
            replicas: 3,
            chunks_per_chain: 2,
            clients: 3,
            ops_per_client: 25,
            faults: true,
            overlap_prepare: false,
        }
    }
}

/// One operation of the recorded history.
#[derive(Clone, Debug)]
pub enum Event {
    Invoke {
        thread: u64,
        chunk: (ChainId, ChunkId),
        op: RegisterOp<u64>,
    },
    Return {
        thread: u64,
        chunk: (ChainId, ChunkId),
        ret: RegisterRet<u64>,
    },
}

/// State shared between the hosts and the test driver. turmoil runs every
/// host on this one thread, so plain interior mutability is enough.
#[derive(Default)]
pub struct World {
    pub nodes: BTreeMap<usize, Arc<Node>>,
    pub history: Vec<Event>,
    pub ready: bool,
    pub clients_done: usize,
    pub log: Vec<String>,
    /// Faults the chaos drew, by kind (see [`FAULT_KINDS`]).
    pub fired: BTreeMap<&'static str, usize>,
}

/// Every kind of fault the chaos draws: a range of seeds must fire each at
/// least once, or the simulation has stopped testing it.
pub const FAULT_KINDS: &[&str] = &[
    "node crash",
    "overlapping crash",
    "whole chain down",
    "node restart",
    "partition",
    "partition repair",
    "manager restart",
    "fail point armed",
    "fail point hit",
    "node lost for good",
    "replacement",
];

pub type Shared = Rc<RefCell<World>>;

/// One replica's committed chunks: version and bytes.
type ReplicaChunks = BTreeMap<ChunkId, (u32, Vec<u8>)>;

fn timing() -> (MgmtConfig, Duration) {
    let mgmt = MgmtConfig {
        heartbeat_interval: Duration::from_millis(100),
        failure_timeout: Duration::from_millis(1000),
        tick_interval: Duration::from_millis(100),
        // A node down this long has its replicas moved to the node outside
        // their chain, under the same chaos: membership changes meet
        // crashes, partitions and manager restarts.
        auto_replace_after: Some(Duration::from_secs(3)),
    };
    (mgmt, Duration::from_millis(100))
}

fn storage_config(i: usize) -> StorageConfig {
    let mut config = StorageConfig::new(
        NodeId(i as u32),
        format!("{}:{NODE_PORT}", node_name(i)),
        format!("{MGMT}:{MGMT_PORT}"),
    );
    config.heartbeat_interval = Duration::from_millis(100);
    config.lease_timeout = Duration::from_millis(500);
    config.rpc_timeout = Duration::from_millis(300);
    config.forward_deadline = Duration::from_secs(5);
    config.sync_page = 3;
    config
}

pub fn client_config(id: u64) -> ClientConfig {
    let mut config = ClientConfig::new([format!("{MGMT}:{MGMT_PORT}")], ClientId(id));
    config.rpc_timeout = Duration::from_millis(300);
    config.op_deadline = Duration::from_secs(4);
    config.backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
    config
}

fn small_pool() -> BufferPool {
    BufferPool::new(&PoolConfig {
        classes: vec![(4 << 10, 64), (64 << 10, 32)],
        hugepages: HugePages::Never,
    })
    .expect("small pool")
}

fn format_device() -> MemDevice {
    let dev = MemDevice::new(16 << 20, 4096);
    block_on(Engine::format(
        &dev,
        &FormatOptions {
            chunk_size_min: 4 << 10,
            chunk_size_max: u64::from(CHUNK_SIZE),
            journal_bytes: Some(1 << 20),
            force: false,
        },
    ))
    .expect("format mem device");
    dev
}

/// An admin call, retried until the manager answers (faults do not start
/// before setup ends, but the network is still lossy).
async fn admin<M>(client: &StorageClient<SimNet>, req: &M::Req) -> Result<(), String>
where
    M: flyfs_proto::Method<Rsp = Result<(), flyfs_proto::wire::mgmt::MgmtError>>,
{
    let mgmt = format!("{MGMT}:{MGMT_PORT}");
    for _ in 0..50 {
        match client
            .rpc()
            .call::<M>(&mgmt, req, Bytes::new(), &CallOptions::default())
            .await
        {
            Ok((Ok(()), _))
            | Ok((Err(flyfs_proto::wire::mgmt::MgmtError::AlreadyExists { .. }), _)) => {
                return Ok(());
            }
            Ok((Err(e), _)) => return Err(format!("{}: {e}", M::NAME)),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Err(format!("{}: the manager never answered", M::NAME))
}

/// The value a write of `(client, n)` stores: unique per write.
fn value_of(client: u64, n: u64) -> u64 {
    (client << 32) | n
}

fn encode_value(v: u64) -> Bytes {
    let mut data = vec![0u8; VALUE_BYTES];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (v.rotate_left((i % 64) as u32) as u8) ^ (i as u8);
    }
    data[..8].copy_from_slice(&v.to_le_bytes());
    Bytes::from(data)
}

fn decode_value(data: &[u8]) -> Result<u64, String> {
    if data.is_empty() {
        return Ok(0);
    }
    if data.len() != VALUE_BYTES {
        return Err(format!(
            "read {} bytes, every write writes {VALUE_BYTES}",
            data.len()
        ));
    }
    let v = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    if encode_value(v) != data {
        return Err(format!(
            "chunk bytes are not any write's (header says {v:#x})"
        ));
    }
    Ok(v)
}

/// The simulation: its hosts, devices and the fault plan.
pub struct Sim<'a> {
    pub config: SimConfig,
    pub sim: turmoil::Sim<'a>,
    pub world: Shared,
    /// Each node's device; a host reads its slot at every (re)start, so a
    /// test can swap in a blank device (a lost disk).
    pub devices: Rc<RefCell<Vec<MemDevice>>>,
    pub crashed: Vec<bool>,
    pub partitions: Vec<(String, String)>,
    /// A fail point armed by the chaos and not hit yet, with when: it is a
    /// node failure on its way, so no other may start meanwhile.
    armed: Option<(usize, Duration)>,
    rng: ChaCha8Rng,
    /// A node that crashed and never comes back (at most one per run): the
    /// manager's automatic replacement moves its replicas to the node
    /// outside their chain.
    pub lost: Option<usize>,
    /// Draws whether a crash is for good, apart from `rng`, so that the
    /// fault plans of earlier seeds (pinned ones among them) stay as they
    /// were up to the first node lost.
    lost_rng: ChaCha8Rng,
}

impl<'a> Sim<'a> {
    pub fn new(config: SimConfig) -> Sim<'a> {
        let config_seed = config.seed;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let max_latency = Duration::from_micros(rng.random_range(200..5000));
        let sim = turmoil::Builder::new()
            .rng_seed(config.seed)
            .simulation_duration(Duration::from_secs(600))
            .tick_duration(Duration::from_millis(1))
            .min_message_latency(Duration::from_micros(100))
            .max_message_latency(max_latency)
            .build();
        let world: Shared = Rc::default();
        let devices = Rc::new(RefCell::new(
            (0..config.nodes).map(|_| format_device()).collect(),
        ));
        let mut me = Sim {
            crashed: vec![false; config.nodes],
            config,
            sim,
            world,
            devices,
            partitions: Vec::new(),
            armed: None,
            rng,
            lost: None,
            lost_rng: ChaCha8Rng::seed_from_u64(config_seed ^ 0x1057_0de5),
        };
        me.add_mgmt();
        for i in 0..me.config.nodes {
            me.add_node(i);
        }
        me.add_admin();
        me
    }

    fn add_mgmt(&mut self) {
        let store = MemStore::new();
        self.sim.host(MGMT, move || {
            let store = store.clone();
            async move {
                let (config, _) = timing();
                let service = MgmtService::open(Box::new(store), config).await?;
                tokio::spawn(service.clone().run());
                let listener = SimNet.bind(&format!("0.0.0.0:{MGMT_PORT}")).await?;
                flyfs_rpc::serve(
                    listener,
                    service,
                    ServerConfig::default(),
                    flyfs_rpc::testing::mgmt(),
                )
                .await;
                Ok(())
            }
        });
    }

    fn add_node(&mut self, i: usize) {
        let devices = self.devices.clone();
        let world = self.world.clone();
        let overlap_prepare = self.config.overlap_prepare;
        self.sim.host(node_name(i), move || {
            let dev = devices.borrow()[i].clone();
            let world = world.clone();
            let mut storage_config = storage_config(i);
            storage_config.overlap_prepare_and_forward = overlap_prepare;
            async move {
                let config = EngineConfig {
                    journal: JournalMode::Inline,
                    // Commit timestamps from simulated time: a seed replays
                    // the same records.
                    clock: Arc::new(flyfs_time::TokioClock::new()),
                    ..EngineConfig::default()
                };
                let engine = Engine::open(dev, small_pool(), config).await?;
                // Every connection in the simulation is mutual TLS too, with
                // the node's identity from the process's test CA.
                let credentials = flyfs_rpc::testing::storage(NodeId(i as u32));
                let node = StorageNode::new(
                    storage_config.clone(),
                    vec![Arc::new(engine)],
                    SimNet,
                    credentials.clone(),
                );
                world.borrow_mut().nodes.insert(i, node.clone());
                tokio::spawn(node.clone().run());
                let listener = SimNet.bind(&format!("0.0.0.0:{NODE_PORT}")).await?;
                flyfs_rpc::serve(
                    listener,
                    StorageService::new(node),
                    ServerConfig::default(),
                    credentials,
                )
                .await;
                Ok(())
            }
        });
    }

    /// Creates the targets and chains once every node has registered:
    /// chain `c` has replicas on nodes `c, c+1, ...` (mod the node count).
    fn add_admin(&mut self) {
        let world = self.world.clone();
        let config = self.config.clone();
        self.sim.client("admin", async move {
            let client =
                StorageClient::new(client_config(1_000), SimNet, flyfs_rpc::testing::admin());
            loop {
                let routing = client.refresh_routing().await;
                if routing.is_ok_and(|r| r.nodes.len() == config.nodes) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for c in 0..config.chains {
                let mut targets = Vec::new();
                for r in 0..config.replicas {
                    let node = (c as usize + r) % config.nodes;
                    let target = TargetId(u64::from(c) * 100 + node as u64);
                    let req = CreateTargetReq {
                        target,
                        node: NodeId(node as u32),
                        disk: 0,
                    };
                    admin::<CreateTarget>(&client, &req).await?;
                    targets.push(target);
                }
                let req = CreateChainReq {
                    chain: ChainId(c + 1),
                    targets,
                };
                admin::<CreateChain>(&client, &req).await?;
            }
            // Let every node learn its targets before the workload starts.
            tokio::time::sleep(Duration::from_millis(500)).await;
            world.borrow_mut().ready = true;
            Ok(())
        });
    }

    /// Adds the workload clients: random whole-chunk writes and reads of a
    /// few chunks, each recorded as invoke/return events.
    pub fn add_workload(&mut self) {
        for k in 0..self.config.clients {
            let world = self.world.clone();
            let config = self.config.clone();
            let seed = self.config.seed ^ ((k as u64 + 1) << 40);
            self.sim.client(format!("client{k}"), async move {
                while !world.borrow().ready {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let client = StorageClient::new(
                    client_config(k as u64 + 1),
                    SimNet,
                    flyfs_rpc::testing::client(),
                );
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                // A thread id per operation stream; a new one after an
                // operation whose outcome is unknown (it stays in flight).
                let mut thread = (k as u64) << 32;
                for n in 0..config.ops_per_client as u64 {
                    let chain = ChainId(rng.random_range(1..=config.chains));
                    let chunk = ChunkId::new(7, rng.random_range(0..config.chunks_per_chain));
                    let key = (chain, chunk);
                    if rng.random_bool(0.5) {
                        let value = value_of(k as u64 + 1, n + 1);
                        world.borrow_mut().history.push(Event::Invoke {
                            thread,
                            chunk: key,
                            op: RegisterOp::Write(value),
                        });
                        match client
                            .write(chain, chunk, 0, encode_value(value), CHUNK_SIZE)
                            .await
                        {
                            Ok(_) => world.borrow_mut().history.push(Event::Return {
                                thread,
                                chunk: key,
                                ret: RegisterRet::WriteOk,
                            }),
                            Err(e) => {
                                world.borrow_mut().log.push(format!("client{k} write: {e}"));
                                thread += 1;
                            }
                        }
                    } else {
                        world.borrow_mut().history.push(Event::Invoke {
                            thread,
                            chunk: key,
                            op: RegisterOp::Read,
                        });
                        match client.read(chain, chunk, 0, VALUE_BYTES as u32).await {
                            Ok(read) => {
                                let value = decode_value(&read.data)
                                    .map_err(|e| format!("client{k} read {chunk:?}: {e}"))?;
                                world.borrow_mut().history.push(Event::Return {
                                    thread,
                                    chunk: key,
                                    ret: RegisterRet::ReadOk(value),
                                });
                            }
                            Err(e) => {
                                world.borrow_mut().log.push(format!("client{k} read: {e}"));
                                thread += 1;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
                }
                world.borrow_mut().clients_done += 1;
                Ok(())
            });
        }
    }

    pub fn crash(&mut self, i: usize) {
        if self.crashed[i] {
            return;
        }
        self.sim.crash(node_name(i));
        self.world.borrow_mut().nodes.remove(&i);
        // The power cut: unflushed writes are lost (or half kept, per sector).
        let seed = self.rng.random();
        self.devices.borrow()[i].crash(seed);
        self.crashed[i] = true;
        self.note(format!("crash node{i}"));
    }

    /// Replaces a crashed node's device with a blank, formatted one.
    pub fn lose_disk(&mut self, i: usize) {
        assert!(self.crashed[i], "lose the disk of a crashed node only");
        self.devices.borrow_mut()[i] = format_device();
        self.note(format!("node{i} lost its disk"));
    }

    /// The node hosting position `index` (0 = head) of `chain`.
    pub fn node_at(&self, chain: ChainId, index: usize) -> Option<usize> {
        let routing = self.routing()?;
        let target = routing.chain(chain)?.targets.get(index)?.target;
        Some(routing.target(target)?.node.0 as usize)
    }

    /// Arms a fail point on node `i`.
    pub fn arm(&mut self, i: usize, point: FailPoint) {
        if let Some(node) = self.world.borrow().nodes.get(&i) {
            node.failpoints().arm(point);
        }
        self.note(format!("arm {point:?} on node{i}"));
    }

    pub fn ready(&self) -> bool {
        self.world.borrow().ready
    }

    pub fn clients_done(&self) -> bool {
        self.world.borrow().clients_done == self.config.clients
    }

    pub fn restart(&mut self, i: usize) {
        if self.crashed[i] && self.lost != Some(i) {
            self.sim.bounce(node_name(i));
            self.crashed[i] = false;
            self.note(format!("restart node{i}"));
        }
    }

    pub fn partition(&mut self, a: String, b: String) {
        self.sim.partition(a.as_str(), b.as_str());
        self.note(format!("partition {a} | {b}"));
        self.partitions.push((a, b));
    }

    pub fn heal(&mut self) {
        for (a, b) in std::mem::take(&mut self.partitions) {
            self.sim.repair(a.as_str(), b.as_str());
        }
        for i in 0..self.config.nodes {
            self.restart(i);
        }
        self.note("heal".into());
    }

    fn fired(&self, kind: &'static str) {
        *self.world.borrow_mut().fired.entry(kind).or_default() += 1;
    }

    fn note(&self, what: String) {
        let at = self.sim.elapsed();
        self.world.borrow_mut().log.push(format!("{at:?}: {what}"));
    }

    /// Runs one simulated step; errors from hosts and clients end the run.
    pub fn step(&mut self) -> Result<bool, String> {
        self.sim.step().map_err(|e| e.to_string())
    }

    /// Runs until `done` holds or `limit` of simulated time passes.
    pub fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<(), String> {
        let until = self.sim.elapsed() + limit;
        while self.sim.elapsed() < until {
            if done(self) {
                return Ok(());
            }
            self.step()?;
        }
        Err(format!("not done after {limit:?} of simulated time"))
    }

    /// Draws a fault now and then while the workload runs.
    pub fn chaos_step(&mut self) {
        if !self.config.faults || !self.world.borrow().ready || !self.rng.random_bool(0.004) {
            return;
        }
        let hosts: Vec<String> = std::iter::once(MGMT.to_string())
            .chain((0..self.config.nodes).map(node_name))
            .chain((0..self.config.clients).map(|k| format!("client{k}")))
            .collect();
        // Crashes come at any time: on a healthy cluster, and (less often)
        // on top of other failures, during resyncs and replacements, up to
        // every replica of a chain. That is safe because a replica forwards
        // only once its Prepare is durable (craq's write path), so the tail
        // never serves a write an earlier replica could lose. Fail points
        // and partitions that cut a storage node off still wait for a
        // healthy cluster, one at a time; an armed fail point counts as a
        // failure from the moment it is armed. Manager restarts and
        // partitions of clients come at any time.
        // An armed fail point that no write reached within two seconds is
        // taken back.
        if let Some((i, at)) = self.armed
            && self.sim.elapsed() > at + Duration::from_secs(2)
        {
            if let Some(node) = self.world.borrow().nodes.get(&i) {
                node.failpoints().disarm();
            }
            self.armed = None;
        }
        let healthy = self
            .crashed
            .iter()
            .enumerate()
            .all(|(i, crashed)| !crashed || self.lost == Some(i))
            && self.partitions.is_empty()
            && self.armed.is_none()
            && self.all_serving()
            && self.world.borrow().nodes.values().all(|n| {
                n.targets()
                    .iter()
                    .all(|(_, _, local)| *local == flyfs_proto::wire::mgmt::LocalState::UpToDate)
            });
        match self.rng.random_range(0..10) {
            roll @ 0..=2 if healthy || roll == 0 => {
                let i = self.rng.random_range(0..self.config.nodes);
                if self.lost != Some(i) && !self.crashed[i] {
                    self.crash(i);
                    self.fired("node crash");
                    if !healthy {
                        self.fired("overlapping crash");
                    }
                    if self.whole_chain_down() {
                        self.fired("whole chain down");
                    }
                    // Only a node that failed alone may be lost for good:
                    // if its chains were already down to it, its disk holds
                    // the only copy of their newest writes, and no system
                    // gets those back.
                    if healthy && self.lost.is_none() && self.lost_rng.random_bool(0.2) {
                        self.lost = Some(i);
                        self.note(format!("node{i} is lost for good"));
                        self.fired("node lost for good");
                    }
                }
            }
            0..=3 => {
                let i = self.rng.random_range(0..self.config.nodes);
                if self.crashed[i] {
                    self.fired("node restart");
                }
                self.restart(i);
            }
            4 | 5 if self.partitions.is_empty() => {
                let a = hosts[self.rng.random_range(0..1 + self.config.nodes)].clone();
                let b = hosts[self.rng.random_range(0..hosts.len())].clone();
                // A partition that cuts a storage node off from the manager
                // or another node takes that node out (lease, forwarding):
                // it is a node failure, so it waits for a healthy cluster
                // like a crash does. Partitions from clients come any time.
                let fails_a_node = a.starts_with("node") || !b.starts_with("client");
                if a != b && (healthy || !fails_a_node) {
                    self.partition(a, b);
                    self.fired("partition");
                }
            }
            4..=6 => {
                for (a, b) in std::mem::take(&mut self.partitions) {
                    self.sim.repair(a.as_str(), b.as_str());
                    self.note(format!("repair {a} | {b}"));
                    self.fired("partition repair");
                }
            }
            7 => {
                self.sim.bounce(MGMT);
                self.note("restart manager".into());
                self.fired("manager restart");
            }
            8 | 9 if healthy => {
                let i = self.rng.random_range(0..self.config.nodes);
                let point = match self.rng.random_range(0..4) {
                    0 => FailPoint::AfterPending,
                    1 => FailPoint::BeforeForward,
                    2 => FailPoint::BeforeCommit,
                    _ => FailPoint::AfterCommit,
                };
                if let Some(node) = self.world.borrow().nodes.get(&i) {
                    node.failpoints().arm(point);
                }
                self.armed = Some((i, self.sim.elapsed()));
                self.note(format!("arm {point:?} on node{i}"));
                self.fired("fail point armed");
            }
            _ => {}
        }
    }

    /// Whether every replica of some chain is on a crashed node, as the
    /// newest routing has the chains.
    fn whole_chain_down(&self) -> bool {
        let Some(routing) = self.routing() else {
            return false;
        };
        routing.chains.iter().any(|chain| {
            chain.targets.iter().all(|t| {
                routing
                    .target(t.target)
                    .is_some_and(|info| self.crashed.get(info.node.0 as usize) == Some(&true))
            })
        })
    }

    /// Crashes nodes frozen at a fail point (the process "died" there).
    pub fn reap_frozen(&mut self) {
        let frozen: Vec<usize> = self
            .world
            .borrow()
            .nodes
            .iter()
            .filter(|(_, n)| n.failpoints().hit())
            .map(|(i, _)| *i)
            .collect();
        for i in frozen {
            self.crash(i);
            self.fired("fail point hit");
            if self.armed.is_some_and(|(armed, _)| armed == i) {
                self.armed = None;
            }
        }
    }

    pub fn routing(&self) -> Option<RoutingInfo> {
        let world = self.world.borrow();
        world
            .nodes
            .values()
            .map(|n| n.routing())
            .max_by_key(|r| r.version)
            .map(|r| (*r).clone())
    }

    /// The node of `chain`'s last serving target (lastsrv), in the newest
    /// routing a live node holds.
    pub fn lastsrv(&self, chain: ChainId) -> Option<usize> {
        let routing = self.routing()?;
        let chain = routing.chain(chain)?;
        let target = chain
            .targets
            .iter()
            .find(|t| t.state == PublicState::LastSrv)?;
        Some(routing.target(target.target)?.node.0 as usize)
    }

    pub fn all_serving(&self) -> bool {
        let Some(routing) = self.routing() else {
            return false;
        };
        // Quiescent too: writes still in flight (a head retrying its
        // forward after its client gave up) finish before replicas are
        // compared.
        let settled = self.world.borrow().nodes.values().all(|n| {
            routing.chains.iter().all(|c| {
                n.engines()[0]
                    .chunks(c.id, .., usize::MAX)
                    .iter()
                    .all(|info| info.pending.is_none())
            })
        });
        // Every member on a running node: a node lost for good shows as
        // serving until the manager notices, and its replicas must have
        // moved before the run is over.
        let running = |target| {
            routing
                .target(target)
                .is_some_and(|t| self.world.borrow().nodes.contains_key(&(t.node.0 as usize)))
        };
        settled
            && routing.chains.len() == self.config.chains as usize
            && routing.chains.iter().all(|c| {
                c.targets.len() == self.config.replicas
                    && c.targets
                        .iter()
                        .all(|t| t.state == PublicState::Serving && running(t.target))
            })
            && self.world.borrow().nodes.len()
                == self.config.nodes - usize::from(self.lost.is_some())
            && self
                .world
                .borrow()
                .nodes
                .values()
                .all(|n| n.routing().version == routing.version)
    }

    /// Reads every chunk once more after healing, as a client of its own
    /// (recorded in the history, so lost acknowledged writes show up as a
    /// linearizability violation).
    pub fn add_final_reads(&mut self) {
        let world = self.world.clone();
        let config = self.config.clone();
        self.sim.client("checker", async move {
            let client =
                StorageClient::new(client_config(999), SimNet, flyfs_rpc::testing::client());
            let mut thread = 1u64 << 48;
            for c in 1..=config.chains {
                for index in 0..config.chunks_per_chain {
                    let (chain, chunk) = (ChainId(c), ChunkId::new(7, index));
                    world.borrow_mut().history.push(Event::Invoke {
                        thread,
                        chunk: (chain, chunk),
                        op: RegisterOp::Read,
                    });
                    let read = client
                        .read(chain, chunk, 0, VALUE_BYTES as u32)
                        .await
                        .map_err(|e| format!("final read of {chunk:?} on {chain}: {e}"))?;
                    let value = decode_value(&read.data)?;
                    world.borrow_mut().history.push(Event::Return {
                        thread,
                        chunk: (chain, chunk),
                        ret: RegisterRet::ReadOk(value),
                    });
                    thread += 1;
                }
            }
            Ok(())
        });
    }

    /// Every chunk's history is linearizable.
    pub fn check_linearizable(&self) -> Result<usize, String> {
        let world = self.world.borrow();
        let mut testers: BTreeMap<(ChainId, ChunkId), LinearizabilityTester<u64, Register<u64>>> =
            BTreeMap::new();
        for event in &world.history {
            match event {
                Event::Invoke { thread, chunk, op } => {
                    testers
                        .entry(*chunk)
                        .or_insert_with(|| LinearizabilityTester::new(Register(0)))
                        .on_invoke(*thread, op.clone())?;
                }
                Event::Return { thread, chunk, ret } => {
                    testers
                        .get_mut(chunk)
                        .ok_or("a return without an invocation")?
                        .on_return(*thread, ret.clone())?;
                }
            }
        }
        for (chunk, tester) in &testers {
            if tester.serialized_history().is_none() {
                let events: Vec<String> = world
                    .history
                    .iter()
                    .filter(|e| match e {
                        Event::Invoke { chunk: c, .. } | Event::Return { chunk: c, .. } => {
                            c == chunk
                        }
                    })
                    .map(|e| format!("{e:?}"))
                    .collect();
                return Err(format!(
                    "history of {:?} on {} is not linearizable:\n{}",
                    chunk.1,
                    chunk.0,
                    events.join("\n")
                ));
            }
        }
        Ok(world.history.len())
    }

    /// All replicas of each chain hold the same committed chunks, byte for
    /// byte, and every engine is internally consistent.
    pub fn check_replicas(&self) -> Result<(), String> {
        let routing = self.routing().ok_or("no routing")?;
        let world = self.world.borrow();
        for chain in &routing.chains {
            let mut reference: Option<(TargetId, ReplicaChunks)> = None;
            for t in &chain.targets {
                let node = routing
                    .target(t.target)
                    .ok_or("target without a node")?
                    .node;
                let n = world
                    .nodes
                    .get(&(node.0 as usize))
                    .ok_or_else(|| format!("node {node:?} not running"))?;
                let engine = &n.engines()[0];
                engine
                    .check_consistency()
                    .map_err(|e| format!("{node:?}: {e}"))?;
                let mut chunks = BTreeMap::new();
                for info in engine.chunks(chain.id, .., usize::MAX) {
                    let Some(meta) = info.committed else { continue };
                    let data = block_on(engine.read(
                        ChunkKey::new(chain.id, meta.chunk),
                        ReadRequest::whole_verified(),
                    ))
                    .map_err(|e| format!("{node:?} {:?}: {e}", meta.chunk))?;
                    chunks.insert(meta.chunk, (meta.version.0, data.data.to_vec()));
                }
                match &reference {
                    None => reference = Some((t.target, chunks)),
                    Some((first, want)) => {
                        if want.keys().ne(chunks.keys()) {
                            return Err(format!(
                                "{}: {first:?} has chunks {:?}, {:?} has {:?}",
                                chain.id,
                                want.keys().collect::<Vec<_>>(),
                                t.target,
                                chunks.keys().collect::<Vec<_>>()
                            ));
                        }
                        for (chunk, (version, data)) in want {
                            let (v2, d2) = &chunks[chunk];
                            if version != v2 {
                                return Err(format!(
                                    "{}: {chunk:?} is at v{version} on {first:?} but v{v2} on {:?}",
                                    chain.id, t.target
                                ));
                            }
                            if data != d2 {
                                return Err(format!(
                                    "{}: {chunk:?} differs between {first:?} (v{version}) and {:?} (v{v2})",
                                    chain.id, t.target
                                ));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        self.world.borrow().log.join("\n")
    }
}

/// What a finished run saw.
#[derive(Debug)]
pub struct RunReport {
    /// A hash of the whole recorded history and fault log: two runs of one
    /// seed must agree on it exactly.
    pub digest: u64,
    pub events: usize,
    pub faults: usize,
    /// Faults the chaos drew, by kind.
    pub fired: BTreeMap<&'static str, usize>,
    pub simulated: Duration,
}

/// One whole simulated run: workload with random faults, then [`finish`].
pub fn run_seed(config: SimConfig) -> Result<RunReport, String> {
    let mut sim = Sim::new(config);
    sim.add_workload();
    let result = sim.run_until(Duration::from_secs(120), |s| {
        s.reap_frozen();
        s.chaos_step();
        s.clients_done()
    });
    finish(sim, result)
}

/// Heals every fault, waits for the cluster to return to all serving, reads
/// every chunk once more, and runs the checkers.
pub fn finish(mut sim: Sim<'_>, workload: Result<(), String>) -> Result<RunReport, String> {
    let result = (|| -> Result<usize, String> {
        workload?;
        sim.heal();
        sim.run_until(Duration::from_secs(60), |s| {
            s.reap_frozen();
            s.heal_frozen();
            s.all_serving()
        })
        .map_err(|e| {
            format!(
                "the cluster did not return to all serving: {e}\n{}",
                sim.describe()
            )
        })?;
        sim.add_final_reads();
        sim.run_until(Duration::from_secs(60), |s| !s.sim_has_client("checker"))?;
        let events = sim.check_linearizable()?;
        sim.check_replicas()?;
        Ok(events)
    })();
    // Replacements are the manager's (automatic, for a node down long
    // enough): count the chain members that `add_admin` did not create.
    let replaced = sim.routing().map_or(0, |routing| {
        let config = &sim.config;
        let initial = |target: TargetId| {
            (0..config.chains).any(|c| {
                (0..config.replicas).any(|r| {
                    target
                        == TargetId(u64::from(c) * 100 + ((c as usize + r) % config.nodes) as u64)
                })
            })
        };
        routing
            .targets
            .iter()
            .filter(|t| t.chain.is_some() && !initial(t.id))
            .count()
    });
    if replaced > 0 {
        sim.world.borrow_mut().fired.insert("replacement", replaced);
    }
    match result {
        Ok(events) => Ok(RunReport {
            digest: {
                use std::hash::{Hash, Hasher};
                let world = sim.world.borrow();
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                format!("{:?}", world.history).hash(&mut hasher);
                world.log.hash(&mut hasher);
                hasher.finish()
            },
            events,
            faults: sim.world.borrow().log.len(),
            fired: sim.world.borrow().fired.clone(),
            simulated: sim.sim.elapsed(),
        }),
        Err(e) => Err(format!(
            "seed {}: {e}\n--- log ---\n{}",
            sim.config.seed,
            sim.log()
        )),
    }
}

impl Sim<'_> {
    /// After healing, a node frozen at a fail point is crashed and restarted.
    fn heal_frozen(&mut self) {
        for i in 0..self.config.nodes {
            self.restart(i);
        }
    }

    /// Where every node stands, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        if let Some(r) = self.routing() {
            for c in &r.chains {
                out += &format!(
                    "{} {:?}: {:?}\n",
                    c.id,
                    c.version,
                    c.targets
                        .iter()
                        .map(|t| (t.target.0, t.state))
                        .collect::<Vec<_>>()
                );
            }
            out += &format!(
                "alive: {:?}\n",
                r.nodes
                    .iter()
                    .map(|n| (n.id.0, n.alive))
                    .collect::<Vec<_>>()
            );
        }
        for (i, n) in &self.world.borrow().nodes {
            out += &format!(
                "node{i}: routing {:?}, targets {:?}\n",
                n.routing().version,
                n.targets()
            );
        }
        out
    }

    fn sim_has_client(&mut self, name: &str) -> bool {
        self.sim.is_host_running(name)
    }
}
