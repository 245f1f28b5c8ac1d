//! The storage service: one per storage node, hosting many targets on one or
//! more chunk engines (one engine per device), replicating every update along
//! its chain with CRAQ.
//!
//! * `mod.rs` (this file): the node: its engines, the targets it hosts (learnt
//!   from the manager's routing information), the local state it reports for
//!   each, the heartbeat and routing loop, and the lease that fences it off
//!   when it loses the manager.
//! * `write.rs`: the write path: client writes at the head, forwarding down
//!   the chain, commits flowing back.
//! * `read.rs`: reads from any serving replica, with CRAQ's apportioned query
//!   to the tail when a chunk has a pending version; metadata queries.
//! * `sync.rs`: resync of a returning successor.
//! * `scrub.rs`: the scrubber walking each engine, and the repair of rotten
//!   chunks from a healthy replica.
//! * `free.rs`: freeing the chunks of replicas the node no longer hosts.
//! * `service.rs`: the RPC dispatch.
//!
//! The node decides everything from one immutable snapshot of the routing
//! information at a time; a request that carries a different chain version
//! than the node's is refused with `StaleChainVersion`, so every replica that
//! touches a request agrees on the chain's membership.

mod channels;
mod free;
mod locks;
mod read;
mod scrub;
pub mod service;
pub mod sync;
mod write;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flyfs_bypass::BlockDevice;
use flyfs_chunk_engine::Engine;
use flyfs_proto::ids::{
    ChainId, ChainVersion, ChunkId, ChunkVersion, NodeId, RoutingVersion, TargetId,
};
use flyfs_proto::wire::mgmt::{
    ChainInfo, ChainTarget, Heartbeat, HeartbeatReq, LocalState, PublicState, RoutingInfo,
    SyncProgress, TargetReport,
};
use flyfs_proto::wire::storage::{StorageError, WriteRsp};
use flyfs_rpc::{CallOptions, Client, Credentials, Network};
use flyfs_time::{Clock, TokioClock};
use parking_lot::Mutex;

pub use channels::ChannelLimits;
use channels::Channels;
pub use free::FreeStats;
use locks::ChunkLocks;
pub use scrub::{ScrubConfig, ScrubStats};

/// How a storage node behaves; the defaults suit a real deployment, tests
/// shorten the intervals.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    pub node: NodeId,
    /// The address other nodes and clients reach this node at.
    pub addr: String,
    /// The cluster managers (the primary and its standbys), in the order
    /// they are tried; the one that answers as primary is kept.
    pub mgmt_addrs: Vec<String>,
    pub heartbeat_interval: Duration,
    /// The node stops serving when its last successful heartbeat is older
    /// than this. It must be below the manager's failure timeout (half of it,
    /// as 3FS does), so that a node cut off from the manager has stopped
    /// serving before the manager hands its role to another target.
    pub lease_timeout: Duration,
    /// One attempt of an RPC to another storage node.
    pub rpc_timeout: Duration,
    /// How long a replica keeps trying to forward an update down the chain
    /// (waiting for the manager to replace a dead successor) before the write
    /// fails.
    pub forward_deadline: Duration,
    /// Forward an update while the local Prepare is still being made durable
    /// (off by default). It saves a journal commit per replica on a write's
    /// path, but reopens the window in which the tail commits and serves a
    /// write that an earlier replica has not made durable, so a failure of
    /// every replica at once can lose a write readers saw (ARCHITECTURE.md).
    pub overlap_prepare_and_forward: bool,
    /// Chunk metadata entries per page of a resync's dump.
    pub sync_page: u32,
    /// Chunks of replicas this node no longer hosts (moved or drained away)
    /// removed per heartbeat, at most (free.rs).
    pub free_batch_chunks: usize,
    /// Bounds of each target's exactly-once memory.
    pub channel_limits: ChannelLimits,
    /// The scrubber's rate and the repairs it may run at once.
    pub scrub: ScrubConfig,
    /// The clock the lease is measured on: a monotonic one (a
    /// [`TokioClock`], the default), never the wall clock, which can step.
    /// Only differences of its readings count, so its offset from other
    /// machines' clocks does not matter; its rate does: the lease stays
    /// safe while this node's clock and the manager's run at rates within a
    /// factor of two of each other (the lease is at most half the manager's
    /// failure timeout). The simulation gives each node a drifting one.
    pub clock: Arc<dyn Clock>,
}

impl StorageConfig {
    /// A node of the cluster whose one manager is at `mgmt_addr`; set
    /// [`mgmt_addrs`](Self::mgmt_addrs) to add standbys.
    pub fn new(node: NodeId, addr: impl Into<String>, mgmt_addr: impl Into<String>) -> Self {
        StorageConfig {
            node,
            addr: addr.into(),
            mgmt_addrs: vec![mgmt_addr.into()],
            heartbeat_interval: Duration::from_secs(1),
            lease_timeout: Duration::from_secs(5),
            rpc_timeout: Duration::from_secs(5),
            forward_deadline: Duration::from_secs(30),
            overlap_prepare_and_forward: false,
            sync_page: 4096,
            free_batch_chunks: 4096,
            channel_limits: ChannelLimits::default(),
            scrub: ScrubConfig::default(),
            clock: Arc::new(TokioClock::new()),
        }
    }
}

/// Why a target reports what it reports. `LocalState` is what the manager
/// sees; this keeps the reason, for logs and for the transitions below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Local {
    /// Up to date: may serve once its public state says so.
    UpToDate,
    /// Alive but needs a resync (it restarted, or fenced itself off).
    NeedsSync,
    /// Just started: reports offline until the manager has marked it offline
    /// too, so that it certainly goes through a resync (3FS does the same).
    Restarting,
    /// Its engine is poisoned (a failed write or flush): offline for good,
    /// until the device is replaced and the node restarted.
    Failed,
}

impl Local {
    fn report(self) -> LocalState {
        match self {
            Local::UpToDate => LocalState::UpToDate,
            Local::NeedsSync => LocalState::Online,
            Local::Restarting | Local::Failed => LocalState::Offline,
        }
    }
}

/// Points of the write path where a test can freeze a node, as if its
/// process stopped there, to kill it at an exact moment (head killed
/// mid-write, tail killed before commit, crash between commit and reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPoint {
    /// The update is stored as pending (forwarding may be under way).
    AfterPending,
    /// About to send the update to the successor.
    BeforeForward,
    /// The successor has answered; the local commit has not happened.
    BeforeCommit,
    /// Committed locally; the reply has not been sent.
    AfterCommit,
}

/// The armed fail point of a node (at most one) and whether it was hit.
#[derive(Debug, Default)]
pub struct FailPoints {
    armed: Mutex<Option<FailPoint>>,
    hit: std::sync::atomic::AtomicBool,
}

impl FailPoints {
    /// Freezes the next write that reaches `point`.
    pub fn arm(&self, point: FailPoint) {
        *self.armed.lock() = Some(point);
    }

    /// Disarms the fail point if no write has reached it yet.
    pub fn disarm(&self) {
        *self.armed.lock() = None;
    }

    /// Whether a write froze at the armed point.
    pub fn hit(&self) -> bool {
        self.hit.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) async fn check(&self, point: FailPoint) {
        let frozen = {
            let mut armed = self.armed.lock();
            if *armed == Some(point) {
                *armed = None;
                true
            } else {
                false
            }
        };
        if frozen {
            tracing::warn!(?point, "fail point hit: freezing this write");
            self.hit.store(true, std::sync::atomic::Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
    }
}

/// One target hosted here: a chain's replica on one of the node's engines.
#[derive(Debug)]
pub(crate) struct Target {
    pub id: TargetId,
    pub chain: ChainId,
    pub disk: u32,
    pub local: Mutex<Local>,
    pub locks: ChunkLocks,
    pub channels: Channels,
    /// Forwarded updates being applied, by chunk and version: a predecessor
    /// that timed out resends the same update, and the copy is answered "in
    /// progress" instead of queueing behind the first on the chunk lock.
    pub forwards: Arc<Mutex<std::collections::BTreeSet<(ChunkId, ChunkVersion)>>>,
    /// Held shared by every write while it applies and forwards; a resync
    /// takes it exclusively once before it lists chunks, so every write that
    /// chose its successor before the resync began has finished (later ones
    /// see the syncing successor and forward to it).
    pub inflight: tokio::sync::RwLock<()>,
    /// Chunks a repair has removed and not yet rewritten (scrub.rs).
    pub repair_windows: Mutex<scrub::RepairWindows>,
    /// Chunks with a remove on its way through this replica, with how many:
    /// a remove is forwarded before it applies here (removes are not
    /// prepared), so the tail may have removed a chunk this replica still
    /// holds as committed. Reads here treat such a chunk as pending and ask
    /// the tail, as CRAQ does for a pending version.
    pub removing: Arc<Mutex<BTreeMap<ChunkId, usize>>>,
}

/// A storage node: engines, hosted targets, routing, and the RPC client it
/// uses to reach the manager and the other replicas.
pub struct StorageNode<D: BlockDevice, N: Network> {
    pub(crate) config: StorageConfig,
    pub(crate) engines: Vec<Arc<Engine<D>>>,
    pub(crate) rpc: Client<N>,
    /// The managers and which one is the primary.
    managers: flyfs_client::mgmt::Managers,
    routing: Mutex<Arc<RoutingInfo>>,
    targets: Mutex<BTreeMap<ChainId, Arc<Target>>>,
    /// When the last heartbeat that the manager answered was sent, on
    /// `config.clock`, in nanoseconds.
    lease_from: Mutex<Option<i64>>,
    /// The lease in force: the configured one, cut to half the manager's
    /// failure timeout when the manager says that is shorter.
    lease: Mutex<Duration>,
    /// Whether a routing snapshot has been installed since start: targets in
    /// the first one existed before this process and must resync.
    started: Mutex<bool>,
    /// Resyncs running, by chain (this node syncs its successor).
    pub(crate) syncs: Mutex<BTreeMap<ChainId, TargetId>>,
    /// How far each resync this node runs (or ran, while its successor is
    /// still syncing) has come, by chain: reported in every heartbeat.
    pub(crate) sync_progress: Mutex<BTreeMap<ChainId, SyncProgress>>,
    pub(crate) failpoints: FailPoints,
    /// The scrubbers' counters and the queue of repairs.
    pub(crate) scrub: scrub::Scrub,
    /// Freeing the chunks of replicas no longer hosted here.
    pub(crate) freeing: free::Freeing,
}

impl<D: BlockDevice, N: Network> std::fmt::Debug for StorageNode<D, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageNode")
            .field("node", &self.config.node)
            .field("addr", &self.config.addr)
            .field("engines", &self.engines.len())
            .finish_non_exhaustive()
    }
}

/// Where a target stands in its chain, from one routing snapshot.
#[derive(Clone, Debug)]
pub(crate) struct Place {
    pub target: Arc<Target>,
    pub chain: ChainInfo,
    pub index: usize,
    pub routing: Arc<RoutingInfo>,
}

impl Place {
    pub fn state(&self) -> PublicState {
        self.chain.targets[self.index].state
    }

    pub fn version(&self) -> ChainVersion {
        self.chain.version
    }

    pub fn is_head(&self) -> bool {
        self.index == 0
    }

    /// The next target that receives writes, if any: the targets after this
    /// one in rank order, of which only serving and syncing ones are written.
    pub fn successor(&self) -> Option<ChainTarget> {
        self.chain
            .targets
            .get(self.index + 1)
            .copied()
            .filter(|t| t.state.writable())
    }

    /// The last serving target: the one whose committed version is the
    /// chain's (commits reach it before any replica before it).
    pub fn tail(&self) -> Option<ChainTarget> {
        self.chain
            .targets
            .iter()
            .rev()
            .find(|t| t.state == PublicState::Serving)
            .copied()
    }

    /// The members before this one that take writes, head first.
    pub fn predecessors(&self) -> Vec<TargetId> {
        self.chain.targets[..self.index]
            .iter()
            .filter(|t| t.state.writable())
            .map(|t| t.target)
            .collect()
    }

    pub fn is_tail(&self) -> bool {
        self.tail().is_some_and(|t| t.target == self.target.id)
    }

    /// The address of the node hosting `target`.
    pub fn addr_of(&self, target: TargetId) -> Option<String> {
        let node = self.routing.target(target)?.node;
        self.routing.node(node).map(|n| n.addr.clone())
    }
}

impl<D: BlockDevice, N: Network> StorageNode<D, N> {
    /// A node over `engines` (index = disk number in the manager's target
    /// records). Call [`StorageNode::run`] to heartbeat and serve.
    /// `credentials` are the node's own (a storage identity): it presents
    /// them to the manager and to its chain neighbours; the composition root
    /// serves with the same ones.
    pub fn new(
        config: StorageConfig,
        engines: Vec<Arc<Engine<D>>>,
        net: N,
        credentials: Credentials,
    ) -> Arc<Self> {
        StorageNode::with_transport(config, engines, net, credentials, None)
    }

    /// As [`StorageNode::new`], reaching the manager and the chain
    /// neighbours over RDMA when `rdma` is set (flyfs-rpc's rdma module).
    pub fn with_transport(
        config: StorageConfig,
        engines: Vec<Arc<Engine<D>>>,
        net: N,
        credentials: Credentials,
        rdma: Option<flyfs_rpc::RdmaTransport>,
    ) -> Arc<Self> {
        let lease = config.lease_timeout;
        Arc::new(StorageNode {
            managers: flyfs_client::mgmt::Managers::new(config.mgmt_addrs.iter().cloned()),
            config,
            engines,
            rpc: Client::with_transport(net, Default::default(), credentials, rdma),
            routing: Mutex::new(Arc::new(RoutingInfo::default())),
            targets: Mutex::new(BTreeMap::new()),
            lease_from: Mutex::new(None),
            lease: Mutex::new(lease),
            started: Mutex::new(false),
            syncs: Mutex::new(BTreeMap::new()),
            sync_progress: Mutex::new(BTreeMap::new()),
            failpoints: FailPoints::default(),
            scrub: scrub::Scrub::default(),
            freeing: free::Freeing::default(),
        })
    }

    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    pub fn engines(&self) -> &[Arc<Engine<D>>] {
        &self.engines
    }

    /// Test hooks into the write path.
    pub fn failpoints(&self) -> &FailPoints {
        &self.failpoints
    }

    pub fn routing(&self) -> Arc<RoutingInfo> {
        self.routing.lock().clone()
    }

    pub(crate) fn call_options(&self) -> CallOptions {
        CallOptions {
            timeout: self.config.rpc_timeout,
            ..CallOptions::default()
        }
    }

    /// Heartbeats and keeps the routing fresh, forever. The node serves only
    /// while this runs and the manager answers.
    pub async fn run(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.config.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            // A failed heartbeat has moved on to the next manager (and
            // dropped a connection that timed out): the next one retries.
            if let Err(e) = self.heartbeat_once().await {
                tracing::debug!(node = ?self.config.node, "heartbeat failed: {e}");
            }
            self.clone().start_syncs();
            self.clone().start_free();
        }
    }

    /// One heartbeat, and a routing pull when the manager's version moved.
    ///
    /// The lease is renewed only once the routing is as new as the one the
    /// manager answered with: a node that was cut off may hold a routing in
    /// which it still serves while the manager has since taken it out of
    /// the write path, and must not answer reads from it under a fresh
    /// lease. The heartbeat says which routing version the node holds, so
    /// the manager knows when a member it made unreadable has seen that.
    pub async fn heartbeat_once(&self) -> Result<(), String> {
        let sent = self.config.clock.now_ns();
        let reports = self.reports();
        let routing_version = if *self.started.lock() {
            self.routing().version
        } else {
            RoutingVersion(0)
        };
        let req = HeartbeatReq {
            node: self.config.node,
            addr: self.config.addr.clone(),
            targets: reports,
            routing_version,
            syncs: self.sync_reports(),
        };
        let rsp = self
            .managers
            .call::<Heartbeat, N>(&self.rpc, &req, &self.call_options())
            .await
            .map_err(|e| e.to_string())?;
        let rsp = rsp.map_err(|e| e.to_string())?;
        self.fit_lease(rsp.failure_timeout_ms);
        if rsp.routing_version > self.routing().version || !*self.started.lock() {
            self.refresh_routing().await?;
        }
        *self.lease_from.lock() = Some(sent);
        Ok(())
    }

    /// Pulls the routing information from the manager now.
    pub async fn refresh_routing(&self) -> Result<(), String> {
        let known = if *self.started.lock() {
            self.routing().version
        } else {
            RoutingVersion(0)
        };
        let routing = flyfs_client::mgmt::fetch_routing(
            &self.rpc,
            &self.managers,
            known,
            &self.call_options(),
        )
        .await
        .map_err(|e| e.to_string())?;
        if let Some(routing) = routing {
            self.install(routing);
        }
        Ok(())
    }

    /// The progress of this node's resyncs whose successor the routing
    /// still shows syncing; the others are dropped.
    fn sync_reports(&self) -> Vec<SyncProgress> {
        let routing = self.routing();
        let mut progress = self.sync_progress.lock();
        progress.retain(|chain, p| {
            routing.chain(*chain).is_some_and(|c| {
                c.targets
                    .iter()
                    .any(|m| m.target == p.target && m.state == PublicState::Syncing)
            })
        });
        progress.values().copied().collect()
    }

    /// How far this node's resyncs have come (see [`SyncProgress`]).
    pub fn sync_progress(&self) -> Vec<SyncProgress> {
        self.sync_progress.lock().values().copied().collect()
    }

    /// What each hosted target reports to the manager.
    fn reports(&self) -> Vec<TargetReport> {
        // Each report says which chain version its local state was judged
        // against: the snapshot the reconcile just used.
        let routing = self.reconcile();
        let targets: Vec<Arc<Target>> = self.targets.lock().values().cloned().collect();
        targets
            .iter()
            .map(|t| {
                let mut local = t.local.lock();
                if let Some(engine) = self.engines.get(t.disk as usize)
                    && engine.poisoned().is_some()
                    && *local != Local::Failed
                {
                    tracing::error!(target = ?t.id, "engine poisoned; reporting the target offline");
                    *local = Local::Failed;
                }
                let used_bytes = self
                    .engines
                    .get(t.disk as usize)
                    .map_or(0, |e| e.chain_usage(t.chain).used_bytes);
                TargetReport {
                    target: t.id,
                    local: local.report(),
                    used_bytes,
                    chain_version: routing
                        .chain(t.chain)
                        .map(|c| c.version)
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Installs a newer routing snapshot: learns new targets, and applies the
    /// self-fencing rules to the local states.
    pub(crate) fn install(&self, routing: RoutingInfo) {
        {
            let mut current = self.routing.lock();
            let mut started = self.started.lock();
            if *started && routing.version <= current.version {
                return;
            }
            let first = !*started;
            *started = true;
            let mut targets = self.targets.lock();
            // A target taken out of its chain (or forgotten) is served no
            // more: requests find no target for the chain, as on a node
            // that never held one. Its chunks are freed later (free.rs).
            targets.retain(|chain, target| {
                let member = routing.target(target.id).is_some_and(|t| t.chain == Some(*chain));
                if !member {
                    tracing::info!(target = ?target.id, ?chain, "no longer a member: not serving it");
                }
                member
            });
            for info in routing
                .targets
                .iter()
                .filter(|t| t.node == self.config.node)
            {
                let Some(chain) = info.chain else { continue };
                targets.entry(chain).or_insert_with(|| {
                    let local = if (info.disk as usize) >= self.engines.len() {
                        // Never served: `engine()` relies on the index.
                        tracing::error!(target = ?info.id, disk = info.disk, disks = self.engines.len(), "target on a disk this node does not have");
                        Local::Failed
                    } else if self.engines[info.disk as usize].poisoned().is_some() {
                        // Offline from the start, as the heartbeat's
                        // reports would make it: a target added on a
                        // poisoned engine never serves.
                        tracing::error!(target = ?info.id, disk = info.disk, "target on a poisoned engine: offline");
                        Local::Failed
                    } else if first {
                        Local::Restarting
                    } else if self.freeing.active.lock().contains(&(info.disk, chain)) {
                        // A batch is removing this chain's chunks from
                        // this disk (an earlier replica's): answer nothing
                        // until it ends, then return through a resync.
                        tracing::info!(target = ?info.id, ?chain, "placed where an earlier replica is being freed: restarting");
                        Local::Restarting
                    } else {
                        Local::UpToDate
                    };
                    tracing::info!(target = ?info.id, ?chain, ?local, "hosting target");
                    let channels = Channels::new(self.config.channel_limits);
                    if local == Local::Restarting {
                        self.remember_recovered_writes(&channels, chain, info.disk);
                    }
                    Arc::new(Target {
                        id: info.id,
                        chain,
                        disk: info.disk,
                        local: Mutex::new(local),
                        locks: ChunkLocks::default(),
                        channels,
                        forwards: Arc::default(),
                        removing: Arc::default(),
                        inflight: tokio::sync::RwLock::new(()),
                        repair_windows: Mutex::default(),
                    })
                });
            }
            *current = Arc::new(routing);
        }
        self.reconcile();
    }

    /// Seeds a restarted target's exactly-once memory from the writes its
    /// chunks' committed versions record. The memory lived in RAM and died
    /// with the process, but a prepared write the engine recovered as
    /// committed took effect, and may already have been read: its client,
    /// retrying it (perhaps after later writes by others), must be answered
    /// from memory, not have it applied a second time over those writes.
    /// Only each channel's newest sequence is kept, as a live table would.
    fn remember_recovered_writes(&self, channels: &Channels, chain: ChainId, disk: u32) {
        let Some(engine) = self.engines.get(disk as usize) else {
            return;
        };
        for info in engine.chunks(chain, .., usize::MAX) {
            let Some(meta) = info.committed else { continue };
            if meta.client.0 == 0 {
                continue; // Written by a resync or the scrubber, not a client.
            }
            let channel = write::channel_of(meta.client, meta.request);
            channels.finish(
                channel,
                WriteRsp {
                    version: meta.version,
                    chunk_len: meta.len,
                    chunk_crc: meta.crc,
                },
            );
        }
    }

    /// Moves each target's local state along with its public state. Runs on
    /// every new routing snapshot and before every heartbeat, because a local
    /// change (a fence) may happen after the public state it waits for.
    /// Returns the routing snapshot it judged against.
    fn reconcile(&self) -> Arc<RoutingInfo> {
        let routing = self.routing();
        let targets: Vec<Arc<Target>> = self.targets.lock().values().cloned().collect();
        for target in targets {
            let Some(info) = routing.target(target.id) else {
                continue;
            };
            let state = info.state;
            let mut local = target.local.lock();
            let next = match (*local, state) {
                // The manager has seen us go: from now on we are a returning
                // target, to be synced (or, as the last server, revived).
                // Not while a batch frees an earlier replica's chunks of the
                // chain on this disk (free.rs): the resync must list what
                // stays.
                (Local::Restarting, PublicState::Offline | PublicState::LastSrv)
                    if !self.freeing(target.disk, target.chain) =>
                {
                    Local::NeedsSync
                }
                // Self-fencing: the manager no longer counts this target as
                // serving (it timed out, or an admin took it offline) while we
                // thought it served. Stop; come back through resync. An
                // up-to-date report would leave it waiting forever (the
                // table keeps up-to-date + waiting in waiting).
                (
                    Local::UpToDate,
                    PublicState::Offline | PublicState::LastSrv | PublicState::Waiting,
                ) => {
                    tracing::warn!(target = ?target.id, %state, "fenced off by the manager");
                    Local::NeedsSync
                }
                // The manager revived us as the last server of the chain
                // (lastsrv returning): our data is the chain's.
                (Local::NeedsSync, PublicState::Serving) => {
                    tracing::info!(target = ?target.id, "serving again as the chain's last server");
                    Local::UpToDate
                }
                (same, _) => same,
            };
            *local = next;
        }
        routing
    }

    /// Keeps the lease at most half the manager's failure timeout: a node
    /// cut off from the manager must stop serving before the manager gives
    /// its role to another replica, whatever its config says.
    fn fit_lease(&self, failure_timeout_ms: u64) {
        if failure_timeout_ms == 0 {
            return;
        }
        let bound = Duration::from_millis(failure_timeout_ms) / 2;
        let lease = self.config.lease_timeout.min(bound);
        let mut current = self.lease.lock();
        if *current != lease {
            if lease < self.config.lease_timeout {
                tracing::warn!(
                    configured = ?self.config.lease_timeout,
                    manager_failure_timeout = ?Duration::from_millis(failure_timeout_ms),
                    "lease_timeout is not below half the manager's failure timeout; using {lease:?}"
                );
            }
            *current = lease;
        }
    }

    /// The lease in force (see [`StorageConfig::lease_timeout`]).
    pub fn lease(&self) -> Duration {
        *self.lease.lock()
    }

    /// Whether the node's lease with the manager holds.
    pub(crate) fn lease_valid(&self) -> bool {
        let lease = *self.lease.lock();
        let now = self.config.clock.now_ns();
        let lease_ns = i64::try_from(lease.as_nanos()).unwrap_or(i64::MAX);
        self.lease_from
            .lock()
            .is_some_and(|from| now.saturating_sub(from) < lease_ns)
    }

    /// The hosted target of `chain` and where it stands, if the request's
    /// chain version matches ours.
    pub(crate) fn place(
        &self,
        chain: ChainId,
        version: ChainVersion,
    ) -> Result<Place, StorageError> {
        let routing = self.routing();
        let target = self
            .targets
            .lock()
            .get(&chain)
            .cloned()
            .ok_or(StorageError::NoSuchChain { chain })?;
        let info = routing
            .chain(chain)
            .cloned()
            .ok_or(StorageError::NoSuchChain { chain })?;
        if info.version != version {
            return Err(StorageError::StaleChainVersion {
                chain,
                request: version,
                current: info.version,
            });
        }
        let index = info
            .targets
            .iter()
            .position(|t| t.target == target.id)
            .ok_or(StorageError::NoSuchChain { chain })?;
        Ok(Place {
            target,
            chain: info,
            index,
            routing,
        })
    }

    /// Like [`place`](Self::place), refreshing the routing once when the
    /// request is newer than what this node knows.
    pub(crate) async fn place_fresh(
        &self,
        chain: ChainId,
        version: ChainVersion,
    ) -> Result<Place, StorageError> {
        match self.place(chain, version) {
            Err(StorageError::StaleChainVersion {
                request, current, ..
            }) if request > current => {
                let _ = self.refresh_routing().await;
                self.place(chain, version)
            }
            other => other,
        }
    }

    /// A place that may take reads: publicly serving, locally up to date,
    /// and within the lease.
    pub(crate) fn readable(&self, place: &Place) -> Result<(), StorageError> {
        self.check(place, PublicState::readable)
    }

    /// A place that may take forwarded writes: serving or syncing.
    pub(crate) fn writable(&self, place: &Place) -> Result<(), StorageError> {
        self.check(place, PublicState::writable)
    }

    fn check(&self, place: &Place, allowed: fn(PublicState) -> bool) -> Result<(), StorageError> {
        let local = *place.target.local.lock();
        let state = place.state();
        let reason = if !allowed(state) {
            format!("its public state is {state}")
        } else if matches!(local, Local::Failed | Local::Restarting)
            || (local == Local::NeedsSync && state == PublicState::Serving)
        {
            format!("it is {local:?} locally")
        } else if !self.lease_valid() {
            "its lease with the cluster manager lapsed".to_string()
        } else {
            return Ok(());
        };
        Err(StorageError::NotServing {
            chain: place.chain.id,
            target: place.target.id,
            reason,
        })
    }

    /// Stops serving a target until it has been resynced: it reports itself
    /// offline until the manager agrees, then returns as a syncing target.
    pub(crate) fn fence(&self, place: &Place, why: &str) {
        let mut local = place.target.local.lock();
        if matches!(*local, Local::UpToDate | Local::NeedsSync) {
            tracing::warn!(target = ?place.target.id, chain = ?place.chain.id, "fencing off: {why}");
            *local = Local::Restarting;
        }
    }

    pub(crate) fn engine(&self, target: &Target) -> &Arc<Engine<D>> {
        &self.engines[target.disk as usize]
    }

    /// Hosted targets (for tests and the admin surface).
    pub fn targets(&self) -> Vec<(TargetId, ChainId, LocalState)> {
        self.targets
            .lock()
            .values()
            .map(|t| (t.id, t.chain, t.local.lock().report()))
            .collect()
    }
}
