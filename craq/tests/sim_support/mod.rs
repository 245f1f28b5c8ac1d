//! A deterministic simulation of a whole flyfs storage cluster in one
//! process: a cluster manager, storage nodes on in-memory devices, and
//! clients, over turmoil's simulated network and clock. A seed fixes
//! everything: the faults drawn, message latencies, and every scheduling
//! decision, so a failing seed replays exactly.
//!
//! Faults: node crashes with restarts (unflushed device writes are lost, as
//! in a power cut), partitions between any two hosts (messages in flight are
//! lost), message delay and reordering across connections, connection
//! resets (requests and replies in flight dropped, retries deliver a request
//! twice; `net`), manager restarts, fail points that freeze a node at an
//! exact step of the write path, I/O errors on a node's disk (a failed write
//! or flush poisons its engine and takes its targets offline) and slow disks
//! (`disk`). An operator's membership changes, through the manager's admin
//! RPCs as `flyfs admin` makes them (`operator`): a chain member replaced
//! by a new target on another node (the chain gains it, a resync fills it
//! while the chain serves, the old one leaves), a node drained, stopped and
//! removed, the node lost for good removed once its replicas moved, a fresh
//! node (blank disk, registering anew) added where one was removed; one at a
//! time, over crashes, partitions and the workload.
//!
//! Clocks: every host reads its own (`SkewedClock`), off the simulation's by
//! up to `CLOCK_OFFSET_MS_MAX` (250 ms) either way and running up to
//! `CLOCK_DRIFT_PPM_MAX` (2 %) fast or slow, drawn per seed. The bound, and
//! why the lease rules hold within it: a node's lease is at most half the
//! manager's failure timeout, each measured on its own host's clock, which
//! holds while their rates are within a factor of two; the managers' lease
//! holder stops serving a quarter of the ttl early, which covers two clocks
//! apart by 2 x 250 ms + 2 x 2 % of the 3 s ttl = 620 ms < 750 ms (the
//! simulation runs one manager, whose restarts come back on a clock of the
//! same skew). Beyond it two managers serve at once: `flyfs-craq`'s
//! `a_skew_beyond_a_quarter_of_the_ttl_gives_two_primaries`.
//!
//! Workload: partial writes at any offset, truncates and removes over four
//! chunks a chain, and reads of whole chunks (`Workload::Files`); or the
//! whole-chunk writes the pinned seeds were found with (`Registers`).
//!
//! Checkers: while the run goes on, a node whose engine a disk error
//! poisoned reports every target offline. After the faults heal: every
//! chunk's history of reads, writes, truncates and removes is linearizable
//! (stateright's linearizability tester against the byte model of `model`;
//! the final reads after healing make this cover "no acknowledged write is
//! lost"); all replicas of each chain hold the same committed chunks, at the
//! same versions, byte for byte; every target returns to serving; every
//! engine's allocator and metadata agree. Every kind of fault must fire in a
//! range of seeds (`FAULT_KINDS`).

#![allow(dead_code)]

pub mod disk;
pub mod model;
pub mod net;
pub mod operator;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flyfs_bypass::fault::Fault;
use flyfs_bypass::mem::MemDevice;
use flyfs_bypass::{BufferPool, HugePages, PoolConfig, block_on};
use flyfs_chunk_engine::{ChunkKey, Engine, EngineConfig, FormatOptions, JournalMode, ReadRequest};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_craq::mgmt::service::LeaseOptions;
use flyfs_craq::mgmt::service::{MgmtConfig, MgmtService};
use flyfs_craq::mgmt::store::MemStore;
use flyfs_craq::storage::FailPoint;
use flyfs_craq::{StorageConfig, StorageNode, StorageService};
use flyfs_proto::ids::{ChainId, ChunkId, ClientId, NodeId, TargetId};
use flyfs_proto::wire::mgmt::{
    CreateChain, CreateChainReq, CreateTarget, CreateTargetReq, LocalState, PublicState,
    RoutingInfo,
};
use flyfs_rpc::{CallOptions, Network, ServerConfig};
use flyfs_time::{Backoff, Clock, SkewedClock, TokioClock};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use stateright::semantics::{ConsistencyTester, LinearizabilityTester};

use disk::SimDisk;
use model::{ChunkModel, ChunkOp, ChunkRet};
use net::{Connections, ResetNet};
use operator::AdminOp;

pub type Node = StorageNode<SimDisk, ResetNet>;

pub const MGMT: &str = "mgmt";
pub const MGMT_PORT: u16 = 9000;
pub const NODE_PORT: u16 = 9100;
/// Bytes each simulated write writes: the whole chunk, so a chunk behaves
/// as a register and its history can be checked as one.
pub const VALUE_BYTES: usize = 1024;
/// How far into a chunk the file workload writes and truncates: a few
/// blocks of the engine, so writes cross block boundaries.
pub const FILE_EXTENT_BYTES: u32 = 12 << 10;
pub const CHUNK_SIZE: u32 = 64 << 10;

pub fn node_name(i: usize) -> String {
    format!("node{i}")
}

/// What the clients do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Whole-chunk writes of `VALUE_BYTES` at offset 0 and reads: each chunk
    /// a register (the workload the pinned seeds were found with).
    Registers,
    /// Partial writes at any offset, truncates that cut and extend,
    /// removes, and reads of the whole chunk (`file_op`).
    Files,
}

impl Workload {
    /// How many bytes a read asks for: the whole chunk as the workload
    /// writes it.
    fn read_len(self) -> u32 {
        match self {
            Workload::Registers => VALUE_BYTES as u32,
            Workload::Files => FILE_EXTENT_BYTES,
        }
    }
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
    /// Draw connection resets, disk errors and slow disks too (from a
    /// random stream of their own, see `io_chaos_step`).
    pub io_faults: bool,
    pub workload: Workload,
    /// The engines' journal mode. Only `Inline` is deterministic: the
    /// journal thread completes commits on an OS thread, at a moment of
    /// real time turmoil does not control (see `many_journal_thread`).
    pub journal: JournalMode,
    /// Draw an operator's membership changes too (replace a target, drain
    /// a node and remove it, remove a dead node, add a fresh node; from a
    /// random stream of their own, see `admin_chaos_step`).
    pub admin: bool,
    /// Give every host a clock of its own, off by an offset and drifting,
    /// within `CLOCK_OFFSET_MS_MAX` and `CLOCK_DRIFT_PPM_MAX`.
    pub skew: bool,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            nodes: 4,
            chains: 2,
            replicas: 3,
            chunks_per_chain: 4,
            clients: 3,
            ops_per_client: 25,
            faults: true,
            overlap_prepare: false,
            io_faults: true,
            workload: Workload::Files,
            journal: JournalMode::Inline,
            admin: true,
            skew: true,
        }
    }

    /// The run as it was before the transport and disk faults and the file
    /// workload: what the pinned seeds found their bugs with.
    pub fn classic(seed: u64) -> Self {
        SimConfig {
            chunks_per_chain: 2,
            io_faults: false,
            workload: Workload::Registers,
            admin: false,
            skew: false,
            ..SimConfig::new(seed)
        }
    }
}

/// One operation of the recorded history.
#[derive(Clone, Debug)]
pub enum Event {
    Invoke {
        thread: u64,
        chunk: (ChainId, ChunkId),
        op: ChunkOp,
    },
    Return {
        thread: u64,
        chunk: (ChainId, ChunkId),
        ret: ChunkRet,
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
    /// Each running node's disk, to arm I/O errors on.
    pub disks: BTreeMap<usize, SimDisk>,
    /// What the harness saw go wrong while the run went on (checked at its
    /// end, with the other checkers).
    pub violations: Vec<String>,
    /// Targets the operator created (not the manager's automatic
    /// replacements).
    pub admin_targets: std::collections::BTreeSet<TargetId>,
    /// A node the operator drained, whose daemon the simulation is to stop.
    pub drained: Option<usize>,
    /// A node the manager forgot (`remove-node`), free to come back fresh.
    pub removed: Option<usize>,
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
    "connection reset",
    "disk error armed",
    "disk error hit",
    "target offline after disk error",
    "slow disk",
    "admin replace target",
    "admin drain node",
    "admin remove node",
    "admin add node",
    "admin change under failure",
];

/// The most a host's clock is off the simulation's, either way. Only the
/// managers' lease compares readings of different clocks (a holder serves
/// three quarters of the 3 s ttl on its clock, another takes over after the
/// whole ttl on its own), so offsets must differ by less than that quarter,
/// less what drift adds over a ttl: 2 x 250 ms + 2 x 2 % x 3 s = 620 ms <
/// 750 ms.
pub const CLOCK_OFFSET_MS_MAX: i64 = 250;
/// The most a host's clock runs fast or slow, in parts per million (2 %,
/// a hundred times what a crystal drifts). Durations that decide safety are
/// measured on one clock each: a storage node stops serving at its lease
/// (at most half the manager's failure timeout) on its clock, the manager
/// declares it failed after the failure timeout on its own; that holds
/// while the rates differ by less than a factor of two, which 2 % keeps far
/// from.
pub const CLOCK_DRIFT_PPM_MAX: i64 = 20_000;

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
async fn admin<M>(client: &StorageClient<ResetNet>, req: &M::Req) -> Result<(), String>
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

/// The bytes a file workload's write of `value` puts at `offset`
/// onwards: unique per write, and different at every position, so a read
/// that returns bytes from the wrong place or the wrong write shows.
fn fill(value: u64, offset: u32, len: u32) -> Bytes {
    let mixed = value.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (offset..offset + len)
        .map(|pos| (mixed.rotate_left(pos % 64) as u8) ^ (pos as u8) ^ (pos >> 8) as u8)
        .collect()
}

/// One operation of the file workload: a partial write at any offset (at
/// times past the end, leaving a hole), a read of the whole chunk, a
/// truncate that cuts or extends, or a remove.
fn file_op(rng: &mut ChaCha8Rng, value: u64) -> ChunkOp {
    match rng.random_range(0..20) {
        0..=7 => {
            let offset = rng.random_range(0..FILE_EXTENT_BYTES - 1);
            let len = rng.random_range(1..=(FILE_EXTENT_BYTES - offset).min(1536));
            ChunkOp::Write {
                offset,
                data: fill(value, offset, len),
                value,
            }
        }
        8..=14 => ChunkOp::Read,
        15..=17 => ChunkOp::Truncate {
            len: rng.random_range(0..=FILE_EXTENT_BYTES),
        },
        _ => ChunkOp::Remove,
    }
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
    /// Every connection in the simulation, for resets.
    pub connections: Connections,
    /// Each node's disk stall in microseconds per I/O (0: not slow).
    stalls: Vec<Arc<AtomicU64>>,
    /// Draws the transport and disk faults, apart from `rng` for the same
    /// reason as `lost_rng`.
    io_rng: ChaCha8Rng,
    /// A disk error armed and not hit yet, with when (a node failure on its
    /// way, like an armed fail point).
    disk_armed: Option<(usize, Duration)>,
    /// When a disk error hit each node: the node is looked at a second
    /// later (see `reap_disk_errors`).
    disk_hit: BTreeMap<usize, Duration>,
    /// The node whose disk is slow, until when.
    slow: Option<(usize, Duration)>,
    /// Each host's clock skew: offset in nanoseconds and drift in parts per
    /// million, the manager's first, then each node's.
    skews: Vec<(i64, i64)>,
    /// Draws the operator's membership changes, apart from `rng` for the
    /// same reason as `lost_rng`.
    admin_rng: ChaCha8Rng,
    /// The operator's host running now, and whether a failure overlapped
    /// its change.
    operation: Option<(String, bool)>,
    operators: usize,
    /// A node the operator drained and stopped: it stays down until the
    /// manager has forgotten it and it comes back as a fresh node.
    pub retired: Option<usize>,
}

impl<'a> Sim<'a> {
    pub fn new(config: SimConfig) -> Sim<'a> {
        let config_seed = config.seed;
        let config_nodes = config.nodes;
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
            connections: Connections::default(),
            stalls: (0..config_nodes)
                .map(|_| Arc::new(AtomicU64::new(0)))
                .collect(),
            io_rng: ChaCha8Rng::seed_from_u64(config_seed ^ 0x10_fa17),
            disk_armed: None,
            disk_hit: BTreeMap::new(),
            slow: None,
            skews: Vec::new(),
            admin_rng: ChaCha8Rng::seed_from_u64(config_seed ^ 0xad_0915),
            operation: None,
            operators: 0,
            retired: None,
        };
        // Clock skew per host, from a stream of its own too.
        let mut skew_rng = ChaCha8Rng::seed_from_u64(config_seed ^ 0xc10c);
        me.skews = (0..=config_nodes)
            .map(|_| {
                if !me.config.skew {
                    return (0, 0);
                }
                let offset = CLOCK_OFFSET_MS_MAX * 1_000_000;
                (
                    skew_rng.random_range(-offset..=offset),
                    skew_rng.random_range(-CLOCK_DRIFT_PPM_MAX..=CLOCK_DRIFT_PPM_MAX),
                )
            })
            .collect();
        me.add_mgmt();
        for i in 0..me.config.nodes {
            me.add_node(i);
        }
        me.add_admin();
        me
    }

    fn add_mgmt(&mut self) {
        let store = MemStore::new();
        let net = ResetNet::new(MGMT, &self.connections);
        let (offset_ns, drift_ppm) = self.skews[0];
        self.sim.host(MGMT, move || {
            let store = store.clone();
            let net = net.clone();
            async move {
                let (config, _) = timing();
                // The manager's one clock, skewed: its lease and its
                // failure timeouts both read it.
                let clock: Arc<dyn Clock> =
                    Arc::new(SkewedClock::new(TokioClock::new(), offset_ns, drift_ppm));
                let lease = LeaseOptions {
                    clock: clock.clone(),
                    monotonic: clock,
                    ..LeaseOptions::single()
                };
                let service = MgmtService::open_with(Box::new(store), config, lease).await?;
                tokio::spawn(service.clone().run());
                let listener = net.bind(&format!("0.0.0.0:{MGMT_PORT}")).await?;
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
        let journal = self.config.journal;
        let net = ResetNet::new(&node_name(i), &self.connections);
        let stall_us = self.stalls[i].clone();
        let disk_seed = self.config.seed ^ ((i as u64 + 1) << 48);
        let (offset_ns, drift_ppm) = self.skews[i + 1];
        self.sim.host(node_name(i), move || {
            // A new process finds the disk's transient faults gone (an
            // operator replaced the cable, or the error was a one-off); a
            // stall belongs to the disk and outlives the process.
            let dev = SimDisk::new(devices.borrow()[i].clone(), disk_seed, stall_us.clone());
            world.borrow_mut().disks.insert(i, dev.clone());
            let world = world.clone();
            let net = net.clone();
            let mut storage_config = storage_config(i);
            storage_config.overlap_prepare_and_forward = overlap_prepare;
            async move {
                // The node's clock, skewed: its lease with the manager and
                // its engine's commit timestamps read it.
                let clock: Arc<dyn Clock> =
                    Arc::new(SkewedClock::new(TokioClock::new(), offset_ns, drift_ppm));
                storage_config.clock = clock.clone();
                let config = EngineConfig {
                    journal,
                    // Commit timestamps from simulated time: a seed replays
                    // the same records.
                    clock,
                    ..EngineConfig::default()
                };
                let engine = Engine::open(dev, small_pool(), config).await?;
                // Every connection in the simulation is mutual TLS too, with
                // the node's identity from the process's test CA.
                let credentials = flyfs_rpc::testing::storage(NodeId(i as u32));
                let node = StorageNode::new(
                    storage_config.clone(),
                    vec![Arc::new(engine)],
                    net.clone(),
                    credentials.clone(),
                );
                world.borrow_mut().nodes.insert(i, node.clone());
                tokio::spawn(node.clone().run());
                let listener = net.bind(&format!("0.0.0.0:{NODE_PORT}")).await?;
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
        let net = ResetNet::new("admin", &self.connections);
        self.sim.client("admin", async move {
            let client = StorageClient::new(client_config(1_000), net, flyfs_rpc::testing::admin());
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
            let net = ResetNet::new(&format!("client{k}"), &self.connections);
            self.sim.client(format!("client{k}"), async move {
                while !world.borrow().ready {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let client = StorageClient::new(
                    client_config(k as u64 + 1),
                    net,
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
                    let value = value_of(k as u64 + 1, n + 1);
                    let op = match config.workload {
                        Workload::Registers if rng.random_bool(0.5) => ChunkOp::Write {
                            offset: 0,
                            data: encode_value(value),
                            value,
                        },
                        Workload::Registers => ChunkOp::Read,
                        Workload::Files => file_op(&mut rng, value),
                    };
                    world.borrow_mut().history.push(Event::Invoke {
                        thread,
                        chunk: key,
                        op: op.clone(),
                    });
                    let result = match op {
                        ChunkOp::Write { offset, data, .. } => client
                            .write(chain, chunk, offset, data, CHUNK_SIZE)
                            .await
                            .map(|_| ChunkRet::Done),
                        ChunkOp::Truncate { len } => client
                            .truncate(chain, chunk, len, CHUNK_SIZE)
                            .await
                            .map(|_| ChunkRet::Done),
                        ChunkOp::Remove => client
                            .remove(chain, chunk, CHUNK_SIZE)
                            .await
                            .map(|_| ChunkRet::Done),
                        ChunkOp::Read => client
                            .read(chain, chunk, 0, config.workload.read_len())
                            .await
                            .map(|read| ChunkRet::ReadOk(read.data)),
                    };
                    match result {
                        Ok(ret) => world.borrow_mut().history.push(Event::Return {
                            thread,
                            chunk: key,
                            ret,
                        }),
                        Err(e) => {
                            world
                                .borrow_mut()
                                .log
                                .push(format!("client{k} {chunk:?}: {e}"));
                            thread += 1;
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
        if self.crashed[i] && self.lost != Some(i) && self.retired != Some(i) {
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
        for stall in &self.stalls {
            stall.store(0, Ordering::SeqCst);
        }
        self.slow = None;
        if let Some((i, _)) = self.disk_armed.take()
            && let Some(disk) = self.world.borrow().disks.get(&i)
        {
            disk.faults().clear();
        }
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
        let healthy = self.healthy();
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
                    // Nor while the operator changes membership or a node
                    // it drained is away: the cluster would have too few
                    // nodes left for its chains.
                    if healthy
                        && self.lost.is_none()
                        && self.retired.is_none()
                        && self.operation.is_none()
                        && self.lost_rng.random_bool(0.2)
                    {
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

    /// No node failure is under way: nothing crashed but the node lost for
    /// good, no partition, no fail point or disk error armed, no engine
    /// poisoned, and every replica serving and up to date.
    fn healthy(&self) -> bool {
        self.crashed
            .iter()
            .enumerate()
            .all(|(i, crashed)| !crashed || self.lost == Some(i) || self.retired == Some(i))
            && self.partitions.is_empty()
            && self.armed.is_none()
            && self.disk_armed.is_none()
            && self.disk_hit.is_empty()
            && self.all_serving()
            && self.world.borrow().nodes.values().all(|n| {
                n.targets()
                    .iter()
                    .all(|(_, _, local)| *local == flyfs_proto::wire::mgmt::LocalState::UpToDate)
            })
    }

    /// Draws a transport or disk fault now and then while the workload
    /// runs, from `io_rng`: a connection reset (any time, on any open
    /// connection: the manager's, a chain's forwarding, a client's), an I/O
    /// error a few I/Os ahead on one node's disk (a node failure on its way
    /// when it hits a write or flush, so only on a healthy cluster), or a
    /// disk that turns slow for a while (every I/O stalls).
    pub fn io_chaos_step(&mut self) {
        if !self.config.io_faults || !self.world.borrow().ready {
            return;
        }
        let now = self.sim.elapsed();
        if let Some((i, until)) = self.slow
            && now > until
        {
            self.stalls[i].store(0, Ordering::SeqCst);
            self.slow = None;
            self.note(format!("node{i}'s disk is fast again"));
        }
        if !self.io_rng.random_bool(0.002) {
            return;
        }
        match self.io_rng.random_range(0..10) {
            0..=5 => {
                let pick = self.io_rng.random_range(0..usize::MAX);
                if let Some(host) = self.connections.reset(pick) {
                    self.note(format!("reset a connection of {host}"));
                    self.fired("connection reset");
                }
            }
            6 | 7 if self.healthy() => {
                let i = self.io_rng.random_range(0..self.config.nodes);
                // The I/O that fails is whichever comes: a read (the call
                // fails), a write or a flush (the engine is poisoned).
                let ahead = self.io_rng.random_range(0..20);
                let Some(disk) = self.world.borrow().disks.get(&i).cloned() else {
                    return;
                };
                if self.crashed[i] {
                    return;
                }
                let n = disk.faults().io_count() + ahead;
                disk.faults().inject(Fault::FailNth { n, op: None });
                self.disk_armed = Some((i, now));
                self.note(format!("arm an error at I/O {n} on node{i}'s disk"));
                self.fired("disk error armed");
            }
            // The stall sleeps on tokio's clock, which the journal thread
            // (outside any runtime) cannot.
            8 | 9 if self.slow.is_none() && self.config.journal == JournalMode::Inline => {
                let i = self.io_rng.random_range(0..self.config.nodes);
                let stall = Duration::from_micros(self.io_rng.random_range(500..20_000));
                let until = now + Duration::from_millis(self.io_rng.random_range(200..3000));
                self.stalls[i].store(stall.as_micros() as u64, Ordering::SeqCst);
                self.slow = Some((i, until));
                self.note(format!(
                    "node{i}'s disk stalls {stall:?} per I/O until {until:?}"
                ));
                self.fired("slow disk");
            }
            _ => {}
        }
    }

    /// Draws the operator's membership changes now and then while the
    /// workload runs, from `admin_rng`, one at a time, over whatever other
    /// faults are under way: replace a chain member with a new target on the
    /// node outside its chain; drain a node (then its daemon is stopped and
    /// the node removed); remove the node lost for good once the manager has
    /// moved its replicas; add a fresh node (a blank disk, registering
    /// anew) where a node was removed.
    pub fn admin_chaos_step(&mut self) {
        if !self.config.admin || !self.world.borrow().ready {
            return;
        }
        self.follow_operation(false);
        if !self.admin_rng.random_bool(0.001) {
            return;
        }
        let removed = self.world.borrow().removed;
        match self.admin_rng.random_range(0..6) {
            0..=2 if self.operation.is_none() => {
                let Some(routing) = self.routing() else {
                    return;
                };
                let chain = &routing.chains[self.admin_rng.random_range(0..routing.chains.len())];
                let old = chain.targets[self.admin_rng.random_range(0..chain.targets.len())];
                self.operate(AdminOp::Replace {
                    chain: chain.id,
                    old: old.target,
                });
            }
            3 if self.operation.is_none()
                && self.lost.is_none()
                && self.retired.is_none()
                && removed.is_none() =>
            {
                let i = self.admin_rng.random_range(0..self.config.nodes);
                self.operate(AdminOp::Drain { node: i });
            }
            4 if self.operation.is_none() && removed.is_none() => {
                if let Some(i) = self.lost {
                    self.operate(AdminOp::RemoveDead { node: i });
                }
            }
            _ => {
                if let Some(i) = removed {
                    self.add_fresh_node(i);
                }
            }
        }
    }

    /// Starts the operator's host for `op`.
    fn operate(&mut self, op: AdminOp) {
        self.operators += 1;
        let name = format!("operator{}", self.operators);
        self.note(format!("{name}: {op:?}"));
        let world = self.world.clone();
        let net = ResetNet::new(&name, &self.connections);
        self.sim.client(name.clone(), async move {
            let client = StorageClient::new(client_config(2_000), net, flyfs_rpc::testing::admin());
            operator::run(op, client, world).await;
            Ok(())
        });
        let overlapped = !self.failure_free();
        self.operation = Some((name, overlapped));
    }

    /// No failure of a node or the network under way (what a membership
    /// change overlapping one is counted against).
    fn failure_free(&self) -> bool {
        self.crashed
            .iter()
            .enumerate()
            .all(|(i, crashed)| !crashed || self.retired == Some(i))
            && self.partitions.is_empty()
            && self.armed.is_none()
            && self.disk_armed.is_none()
    }

    /// Follows the operator: stops the daemon of a node it drained, notes
    /// when its change is over, and when `healing`, brings a removed node
    /// back fresh at once.
    pub fn follow_operation(&mut self, healing: bool) {
        let drained = self.world.borrow_mut().drained.take();
        if let Some(i) = drained {
            // The daemon stops (as a crash: what it had not flushed no
            // longer matters, it holds nothing) and stays down.
            self.crash(i);
            self.retired = Some(i);
            self.note(format!("node{i} is drained and stopped"));
        }
        if let Some((name, overlapped)) = self.operation.take() {
            let overlapped = overlapped || (!healing && !self.failure_free());
            if self.sim.is_host_running(name.as_str()) {
                self.operation = Some((name, overlapped));
            } else {
                if overlapped {
                    self.fired("admin change under failure");
                }
                self.note(format!("{name} is done"));
            }
        }
        let removed = self.world.borrow().removed;
        if healing && let Some(i) = removed {
            self.add_fresh_node(i);
        }
    }

    /// A node the manager forgot comes back as a fresh one: a blank disk,
    /// the daemon started, registering anew.
    fn add_fresh_node(&mut self, i: usize) {
        if self.world.borrow().removed != Some(i) {
            return;
        }
        self.world.borrow_mut().removed = None;
        if !self.crashed[i] {
            // The manager forgets only a node it has not heard from for its
            // failure timeout: a running one here would be a harness bug.
            self.world
                .borrow_mut()
                .violations
                .push(format!("node{i} was removed while it ran"));
            return;
        }
        if self.lost == Some(i) {
            self.lost = None;
        }
        if self.retired == Some(i) {
            self.retired = None;
        }
        self.lose_disk(i);
        self.restart(i);
        self.note(format!("node{i} comes back as a fresh node"));
        self.fired("admin add node");
    }

    /// Follows the disk errors. One that hit is counted, and a second of
    /// simulated time later its node is looked at: if the error took a
    /// target out (a failed write or flush poisons the engine; any device
    /// error takes the target offline), every target of the node must
    /// report itself offline, and the node is restarted as an operator
    /// would, which reopens the engine. An error no I/O reached within two
    /// seconds is taken back.
    fn reap_disk_errors(&mut self) {
        let now = self.sim.elapsed();
        if let Some((i, at)) = self.disk_armed {
            let disk = self.world.borrow().disks.get(&i).cloned();
            let hit = disk.as_ref().is_some_and(|d| d.faults().injected() > 0);
            if hit && !self.crashed[i] {
                self.fired("disk error hit");
                self.note(format!("node{i}'s disk error hit"));
                self.disk_hit.insert(i, now);
                self.disk_armed = None;
            } else if self.crashed[i] || now > at + Duration::from_secs(2) {
                if let Some(disk) = disk {
                    disk.faults().clear();
                }
                self.disk_armed = None;
            }
        }
        for (i, since) in self.disk_hit.clone() {
            if self.crashed[i] {
                self.disk_hit.remove(&i);
                continue;
            }
            if now <= since + Duration::from_secs(1) {
                continue;
            }
            self.disk_hit.remove(&i);
            let Some(node) = self.world.borrow().nodes.get(&i).cloned() else {
                continue;
            };
            let poisoned = node.engines()[0].poisoned().is_some();
            let targets = node.targets();
            let offline = targets
                .iter()
                .filter(|(_, _, local)| *local == LocalState::Offline);
            if poisoned && offline.clone().count() != targets.len() {
                let e = format!("node{i}'s engine is poisoned but it reports {targets:?}");
                self.note(e.clone());
                self.world.borrow_mut().violations.push(e);
            }
            if poisoned || offline.count() > 0 {
                self.note(format!(
                    "node{i} is restarted after its disk error (poisoned: {poisoned})"
                ));
                self.fired("target offline after disk error");
                self.crash(i);
            }
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

    /// Crashes nodes frozen at a fail point (the process "died" there), and
    /// follows the disk errors.
    pub fn reap_frozen(&mut self) {
        self.reap_disk_errors();
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
        // Only members count: a node keeps the chunks of a target taken out
        // of its chain (a replaced one), pending versions included, and
        // serves them no more.
        let settled = self.world.borrow().nodes.iter().all(|(i, n)| {
            routing
                .chains
                .iter()
                .filter(|c| {
                    c.targets.iter().any(|t| {
                        routing
                            .target(t.target)
                            .is_some_and(|info| info.node.0 as usize == *i)
                    })
                })
                .all(|c| {
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
                == self.config.nodes
                    - usize::from(self.lost.is_some())
                    - usize::from(self.retired.is_some())
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
        let net = ResetNet::new("checker", &self.connections);
        self.sim.client("checker", async move {
            let client = StorageClient::new(client_config(999), net, flyfs_rpc::testing::client());
            let mut thread = 1u64 << 48;
            for c in 1..=config.chains {
                for index in 0..config.chunks_per_chain {
                    let (chain, chunk) = (ChainId(c), ChunkId::new(7, index));
                    world.borrow_mut().history.push(Event::Invoke {
                        thread,
                        chunk: (chain, chunk),
                        op: ChunkOp::Read,
                    });
                    let read = client
                        .read(chain, chunk, 0, config.workload.read_len())
                        .await
                        .map_err(|e| format!("final read of {chunk:?} on {chain}: {e}"))?;
                    world.borrow_mut().history.push(Event::Return {
                        thread,
                        chunk: (chain, chunk),
                        ret: ChunkRet::ReadOk(read.data),
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
        let mut testers: BTreeMap<(ChainId, ChunkId), LinearizabilityTester<u64, ChunkModel>> =
            BTreeMap::new();
        for event in &world.history {
            match event {
                Event::Invoke { thread, chunk, op } => {
                    testers
                        .entry(*chunk)
                        .or_insert_with(|| LinearizabilityTester::new(ChunkModel::default()))
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
        s.io_chaos_step();
        s.admin_chaos_step();
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
            s.follow_operation(true);
            s.operation.is_none() && s.all_serving()
        })
        .map_err(|e| {
            format!(
                "the cluster did not return to all serving: {e}\n{}",
                sim.describe()
            )
        })?;
        sim.add_final_reads();
        sim.run_until(Duration::from_secs(60), |s| !s.sim_has_client("checker"))?;
        if let Some(e) = sim.world.borrow().violations.first() {
            return Err(e.clone());
        }
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
            .filter(|t| {
                t.chain.is_some()
                    && !initial(t.id)
                    && !sim.world.borrow().admin_targets.contains(&t.id)
            })
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
