//! The cluster manager's RPC service: decodes requests, applies them to the
//! [`Cluster`] state machine, persists every change before replying,
//! re-evaluates the cluster on a timer, and keeps the lease that makes it
//! the one primary among the managers sharing its store.
//!
//! Persistence rule: a change to the durable record is saved before anyone
//! can see it. Each mutation runs on a clone of the cluster; the clone is
//! saved and only then becomes current. If the save fails the caller gets
//! `MgmtError::Unavailable` and the manager keeps serving the old state, so
//! no routing version is ever published that a restarted manager would not
//! know.
//!
//! Lease rule: only the lease holder serves. [`MgmtService::run`] renews the
//! lease every third of its ttl. A manager that gains it (at start, or when
//! the previous primary's lease expired) first loads the latest record from
//! the store, gives every node the post-restart grace period, saves the
//! bumped routing version, and only then serves. A manager whose lease was
//! not renewed in time stops serving at once, without waiting for the
//! store, and answers `MgmtError::NotPrimary` naming the primary it knows
//! (`GetRouting`, which has no error in its response, gets an `Unavailable`
//! status instead). Its saves are refused by the store anyway (the store
//! checks the lease holder and epoch in the same transaction as the write),
//! so a deposed primary can never overwrite its successor's record.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_proto::Method;
use flyfs_proto::Status;
use flyfs_proto::ids::RoutingVersion;
use flyfs_proto::wire::mgmt::{
    AddChainMember, ChainMemberReq, CreateChain, CreateChainReq, CreateChainTable,
    CreateChainTableReq, CreateTarget, CreateTargetReq, GetRouting, GetRoutingPage,
    GetRoutingPageReq, GetRoutingPageRsp, GetRoutingReq, GetRoutingRsp, Heartbeat, HeartbeatReq,
    HeartbeatRsp, MgmtError, ROUTING_INLINE_BYTES_MAX, ROUTING_PAGE_BYTES, RegisterNode,
    RegisterNodeReq, RegisterNodeRsp, RemoveChainMember, RemoveNode, RemoveNodeReq, RemoveTarget,
    RemoveTargetReq, RoutingInfo, RoutingPage, SYNCS_REPORTED_MAX, SetTargetOffline,
    SetTargetOfflineReq, SyncProgress,
};
use flyfs_rpc::server::{Reply, Request, Service};
use flyfs_time::{Clock, TokioClock, WallClock};
use parking_lot::Mutex;

use super::cluster::{Cluster, ClusterRecord, Leave};
use super::store::{ClusterStore, LeaseFence, LeaseState, StoreError};

/// Timing of the manager and of the storage nodes' heartbeats.
///
/// flyfs defaults to 1 s / 10 s / 500 ms so that tests and small clusters
/// react quickly; 3FS uses 10 s heartbeats, declares failure after 60 s and
/// re-evaluates chains every 1 s, trading detection time for tolerance of
/// long pauses on big clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MgmtConfig {
    /// How often a storage node should heartbeat (advertised to nodes; the
    /// manager itself only uses `failure_timeout`).
    pub heartbeat_interval: Duration,
    /// A node whose last heartbeat is older than this is dead. Also the grace
    /// period nodes get after a manager restart or takeover.
    pub failure_timeout: Duration,
    /// How often liveness and chains are re-evaluated.
    pub tick_interval: Duration,
    /// Replace a member offline for this long (`Cluster::set_auto_replace`);
    /// off when `None`, the default.
    pub auto_replace_after: Option<Duration>,
}

impl Default for MgmtConfig {
    fn default() -> MgmtConfig {
        MgmtConfig {
            heartbeat_interval: Duration::from_secs(1),
            failure_timeout: Duration::from_secs(10),
            tick_interval: Duration::from_millis(500),
            auto_replace_after: None,
        }
    }
}

/// An empty cluster with the manager's settings.
fn cluster(config: MgmtConfig) -> Cluster {
    let mut cluster = Cluster::new(config.failure_timeout);
    cluster.set_auto_replace(config.auto_replace_after);
    cluster
}

/// Who this manager is to the lease, and how long a lease lasts.
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    /// Unique among live managers (two services with one holder would both
    /// believe they hold the lease).
    pub holder: String,
    /// Where this manager serves (`host:port`): what standbys tell callers.
    pub address: String,
    /// How long a lease lasts without renewal. A crashed primary is replaced
    /// after at most this plus a third of it.
    pub ttl: Duration,
    /// The clock lease times are read from, in milliseconds. Lease safety
    /// assumes the clocks of all managers sharing a store differ by less
    /// than the margin a holder keeps (a quarter of the ttl: it stops
    /// serving at three quarters of its lease), plus the fencing of saves,
    /// which holds whatever the clocks say.
    pub clock: Arc<dyn Clock>,
    /// The clock this manager measures durations on: how long a node has
    /// not heartbeated (its failure timeout), how long a member has been
    /// offline (automatic replacement). Monotonic ([`TokioClock`]), never
    /// the wall clock, which can step; only its rate matters, and a storage
    /// node's lease stays within this manager's failure timeout while the
    /// two clocks' rates are within a factor of two (see
    /// `StorageConfig::clock`).
    pub monotonic: Arc<dyn Clock>,
}

impl LeaseOptions {
    /// 3 s: a standby takes over within 4 s of a crash, before a storage
    /// node's default 5 s lease on its heartbeats lapses, while a primary
    /// still has two renewals' worth of slack for a slow store.
    pub const TTL_DEFAULT: Duration = Duration::from_secs(3);

    /// A manager alone on its store (a `FileStore`, a test, the simulation):
    /// a fixed holder, so a restarted manager takes its lease back at once,
    /// and tokio's clock, so the simulation never reads the wall clock.
    pub fn single() -> LeaseOptions {
        LeaseOptions {
            holder: "mgmtd".into(),
            address: String::new(),
            ttl: LeaseOptions::TTL_DEFAULT,
            clock: Arc::new(TokioClock::new()),
            monotonic: Arc::new(TokioClock::new()),
        }
    }

    /// One of several managers sharing a store, on the wall clock.
    pub fn shared(holder: impl Into<String>, address: impl Into<String>, ttl: Duration) -> Self {
        LeaseOptions {
            holder: holder.into(),
            address: address.into(),
            ttl,
            clock: Arc::new(WallClock),
            monotonic: Arc::new(TokioClock::new()),
        }
    }

    fn renew_interval(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(1))
    }

    /// How long after it asked for the lease a holder serves: the ttl less
    /// a quarter, the margin for clock skew between managers (see
    /// [`LeaseOptions::clock`]).
    fn serve_ms(&self) -> u64 {
        (self.ttl - self.ttl / 4).as_millis() as u64
    }
}

/// Whether this manager serves.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Role {
    /// Not the lease holder (or not yet loaded): answers `NotPrimary`.
    Standby { primary: Option<String> },
    /// Holds the lease in `epoch`; serves until `serve_until_ms` unless a
    /// renewal moves it.
    Primary { epoch: u64, serve_until_ms: u64 },
}

/// The cluster manager service.
pub struct MgmtService {
    // Held only for synchronous work (never across an await).
    cluster: Mutex<Cluster>,
    // Serialises every change of `cluster` (heartbeats' in-place updates
    // included) across the store's save, so saves happen in the order of
    // the changes and nothing applied during a save is lost when the saved
    // copy becomes current. Also held by a takeover while it reloads.
    changes: tokio::sync::Mutex<()>,
    role: Mutex<Role>,
    store: Box<dyn ClusterStore>,
    config: MgmtConfig,
    lease: LeaseOptions,
    /// When the service started, on `lease.monotonic`, in nanoseconds.
    start_ns: i64,
    /// When routing is sent in pages, and the last table encoded for that,
    /// by version: a large table is encoded once per version, not once per
    /// page or per caller.
    routing_pages: Mutex<RoutingPages>,
    /// The routing version of the state last made current: admin calls
    /// that wait for the cluster to move (a member leaving) wake on it.
    published: tokio::sync::watch::Sender<RoutingVersion>,
    /// Each node's last reported resyncs (volatile, for the admin's
    /// progress): at most one entry per registered node, each bounded.
    syncs: Mutex<std::collections::BTreeMap<flyfs_proto::ids::NodeId, Vec<SyncProgress>>>,
}

/// How long an admin call waits for a serving member's node to see it stop
/// serving before it leaves the write path (a removal, an offline): below
/// the callers' default RPC deadline of 5 s, so they hear why rather than
/// time out. A live node shows it within two heartbeats; a silent one after
/// the failure timeout, which may be longer, and the manager then finishes
/// the change by itself.
const LEAVE_WAIT: Duration = Duration::from_secs(4);

/// How `GetRouting` answers with a table too large for one message.
#[derive(Debug)]
struct RoutingPages {
    sizes: PageSizes,
    encoded: Option<(RoutingVersion, Bytes)>,
}

#[derive(Clone, Copy, Debug)]
struct PageSizes {
    /// A table whose encoding is longer goes in pages.
    inline_bytes_max: usize,
    page_bytes: usize,
}

impl fmt::Debug for MgmtService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MgmtService")
            .field("config", &self.config)
            .field("holder", &self.lease.holder)
            // `try_lock`: printing must never wait for (or deadlock with) a
            // mutation in progress.
            .field("role", &self.role.try_lock().map(|r| r.clone()))
            .field(
                "routing_version",
                &self.cluster.try_lock().map(|c| c.routing_version()),
            )
            .finish_non_exhaustive()
    }
}

/// The answer of a manager that does not serve.
fn not_primary(primary: Option<String>) -> MgmtError {
    MgmtError::NotPrimary { primary }
}

impl MgmtService {
    /// A manager alone on `store` ([`LeaseOptions::single`]): takes the
    /// lease, loads the record (or starts empty) and serves. After a restart
    /// every known node gets a grace period, and the bumped routing version
    /// is saved before the service answers anything.
    pub async fn open(
        store: Box<dyn ClusterStore>,
        config: MgmtConfig,
    ) -> Result<Arc<Self>, StoreError> {
        MgmtService::open_with(store, config, LeaseOptions::single()).await
    }

    /// A manager that may share `store` with others: tries the lease once,
    /// and if it got it, loads the record and serves as above; otherwise it
    /// starts as a standby. [`run`](Self::run) keeps trying. A store failure
    /// (or a corrupt record, when this manager got the lease) is an error.
    pub async fn open_with(
        store: Box<dyn ClusterStore>,
        config: MgmtConfig,
        lease: LeaseOptions,
    ) -> Result<Arc<Self>, StoreError> {
        let service = Arc::new(MgmtService {
            cluster: Mutex::new(cluster(config)),
            changes: tokio::sync::Mutex::new(()),
            role: Mutex::new(Role::Standby { primary: None }),
            store,
            config,
            start_ns: lease.monotonic.now_ns(),
            lease,
            routing_pages: Mutex::new(RoutingPages {
                sizes: PageSizes {
                    inline_bytes_max: ROUTING_INLINE_BYTES_MAX,
                    page_bytes: ROUTING_PAGE_BYTES,
                },
                encoded: None,
            }),
            published: tokio::sync::watch::Sender::new(RoutingVersion(0)),
            syncs: Mutex::default(),
        });
        service.lease_round().await?;
        Ok(service)
    }

    pub fn config(&self) -> &MgmtConfig {
        &self.config
    }

    pub fn lease_options(&self) -> &LeaseOptions {
        &self.lease
    }

    /// Time since the service started, on its monotonic clock (tokio's in
    /// the daemons, so simulated time under turmoil; a drifting one per host
    /// in the simulation).
    fn now(&self) -> Duration {
        let elapsed = self.lease.monotonic.now_ns().saturating_sub(self.start_ns);
        Duration::from_nanos(u64::try_from(elapsed).unwrap_or(0))
    }

    /// The routing information this manager holds (served only while it is
    /// the primary; a standby's may be stale).
    pub fn routing(&self) -> RoutingInfo {
        self.cluster.lock().routing()
    }

    /// Whether this manager serves now.
    pub fn is_primary(&self) -> bool {
        self.serving().is_ok()
    }

    /// The primary's address as this manager knows it: its own while it
    /// serves.
    pub fn primary(&self) -> Option<String> {
        match self.serving() {
            Ok(_) => Some(self.lease.address.clone()).filter(|a| !a.is_empty()),
            Err(MgmtError::NotPrimary { primary }) => primary,
            Err(_) => None,
        }
    }

    /// The lease epoch to fence saves with, if this manager serves now. A
    /// lease that ran out without renewal ends here, at the first request
    /// after it, whatever the store says.
    fn serving(&self) -> Result<u64, MgmtError> {
        let now_ms = self.lease.clock.now_ms();
        let mut role = self.role.lock();
        match &*role {
            Role::Primary {
                epoch,
                serve_until_ms,
            } if now_ms < *serve_until_ms => Ok(*epoch),
            Role::Primary { epoch, .. } => {
                tracing::warn!(
                    holder = %self.lease.holder,
                    epoch,
                    "the manager lease was not renewed in time; standing by"
                );
                *role = Role::Standby { primary: None };
                Err(not_primary(None))
            }
            Role::Standby { primary } => Err(not_primary(primary.clone())),
        }
    }

    fn fence(&self, epoch: u64) -> LeaseFence {
        LeaseFence {
            holder: self.lease.holder.clone(),
            epoch,
        }
    }

    /// Saves `record` under the lease of `epoch`. A refusal for want of the
    /// lease makes this manager a standby.
    async fn persist(&self, record: &ClusterRecord, epoch: u64) -> Result<(), MgmtError> {
        let now_ms = self.lease.clock.now_ms();
        match self.store.save(record, &self.fence(epoch), now_ms).await {
            Ok(()) => Ok(()),
            Err(e @ StoreError::NotLeaseHolder { .. }) => {
                tracing::error!(error = %e, "lost the manager lease; change dropped, standing by");
                let mut role = self.role.lock();
                if matches!(*role, Role::Primary { epoch: held, .. } if held == epoch) {
                    *role = Role::Standby { primary: None };
                }
                Err(not_primary(None))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot persist the cluster record; change dropped");
                Err(MgmtError::Unavailable {
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Applies `op` to a copy of the cluster, saves the copy's record if it
    /// changed, and only then makes the copy current.
    async fn mutate<T>(
        &self,
        op: impl FnOnce(&mut Cluster, Duration) -> Result<T, MgmtError>,
    ) -> Result<T, MgmtError> {
        let _changes = self.changes.lock().await;
        let epoch = self.serving()?;
        let (next, out, changed) = {
            let current = self.cluster.lock();
            let mut next = current.clone();
            let out = op(&mut next, self.now())?;
            // Every change of the record bumps the routing version.
            let changed = next.routing_version() != current.routing_version();
            (next, out, changed)
        };
        if changed {
            self.persist(next.record(), epoch).await?;
        }
        let version = next.routing_version();
        *self.cluster.lock() = next;
        if changed {
            self.published.send_replace(version);
        }
        Ok(out)
    }

    pub async fn register_node(&self, req: RegisterNodeReq) -> Result<RegisterNodeRsp, MgmtError> {
        let routing_version = self
            .mutate(|c, now| c.register(req.node, &req.addr, now))
            .await?;
        Ok(RegisterNodeRsp { routing_version })
    }

    pub async fn heartbeat(&self, req: HeartbeatReq) -> Result<HeartbeatRsp, MgmtError> {
        let rsp = self.apply_heartbeat(&req).await?;
        // Only once the node is registered (the heartbeat applied), so the
        // map holds an entry per registered node at most.
        let mut syncs = req.syncs;
        syncs.truncate(SYNCS_REPORTED_MAX);
        self.syncs.lock().insert(req.node, syncs);
        Ok(rsp)
    }

    /// The resyncs under way, with the progress their sources last
    /// reported: only for members the routing still shows syncing in that
    /// chain, so a finished or abandoned one drops out.
    pub fn sync_progress(&self) -> Result<Vec<SyncProgress>, MgmtError> {
        self.serving()?;
        let routing = self.routing();
        let syncing = |p: &SyncProgress| {
            routing.chain(p.chain).is_some_and(|c| {
                c.targets.iter().any(|m| {
                    m.target == p.target && m.state == flyfs_proto::wire::mgmt::PublicState::Syncing
                })
            }) && routing.target(p.target).is_some_and(|t| !t.leaving)
        };
        let known = |node: &flyfs_proto::ids::NodeId| routing.node(*node).is_some();
        Ok(self
            .syncs
            .lock()
            .iter()
            .filter(|(node, _)| known(node))
            .flat_map(|(_, syncs)| syncs.iter().copied())
            .filter(syncing)
            .collect())
    }

    async fn apply_heartbeat(&self, req: &HeartbeatReq) -> Result<HeartbeatRsp, MgmtError> {
        {
            let _changes = self.changes.lock().await;
            self.serving()?;
            // The common case changes only volatile state: apply it in place
            // rather than copying the cluster once per heartbeat.
            let mut current = self.cluster.lock();
            let registered = current
                .record()
                .nodes
                .get(&req.node)
                .is_some_and(|n| req.addr.is_empty() || n.addr == req.addr);
            if registered {
                let now = self.now();
                let before = current.routing_version();
                let routing_version = current.heartbeat(req, now)?;
                debug_assert_eq!(
                    before, routing_version,
                    "a known node's heartbeat changed the record"
                );
                return Ok(self.heartbeat_rsp(routing_version));
            }
        }
        let routing_version = self.mutate(|c, now| c.heartbeat(req, now)).await?;
        Ok(self.heartbeat_rsp(routing_version))
    }

    fn heartbeat_rsp(&self, routing_version: flyfs_proto::ids::RoutingVersion) -> HeartbeatRsp {
        HeartbeatRsp {
            routing_version,
            failure_timeout_ms: self.config.failure_timeout.as_millis() as u64,
        }
    }

    /// The routing information if newer than the caller's; `NotPrimary` from
    /// a standby (the RPC answers it with an `Unavailable` status).
    ///
    /// A table whose encoding is over `ROUTING_INLINE_BYTES_MAX` comes as
    /// its first page instead (`first_page`), the rest through
    /// [`get_routing_page`](Self::get_routing_page).
    pub fn get_routing(&self, req: GetRoutingReq) -> Result<GetRoutingRsp, MgmtError> {
        self.serving()?;
        let (version, routing) = {
            let cluster = self.cluster.lock();
            if cluster.routing_version() == req.known_version {
                return Ok(GetRoutingRsp::default());
            }
            (cluster.routing_version(), cluster.routing())
        };
        let (encoded, sizes) = self.encoded_routing(version, || Some(routing.clone()))?;
        if encoded.len() <= sizes.inline_bytes_max {
            // The common case, as before pages: the whole table, one trip.
            return Ok(GetRoutingRsp {
                routing: Some(routing),
                first_page: None,
            });
        }
        Ok(GetRoutingRsp {
            routing: None,
            first_page: RoutingPage::cut(&encoded, version, 0, sizes.page_bytes),
        })
    }

    /// The page at `req.offset` of the routing table of `req.version`, or,
    /// if the table has changed since, the first page of the current one
    /// (the caller starts over, so it never mixes two versions).
    pub fn get_routing_page(&self, req: GetRoutingPageReq) -> Result<GetRoutingPageRsp, MgmtError> {
        self.serving()?;
        let version = self.cluster.lock().routing_version();
        // The table is built only if the cache lacks this version; if it
        // changed meanwhile, the page is of whatever version was built.
        let mut built = version;
        let (encoded, sizes) = self.encoded_routing(version, || {
            let cluster = self.cluster.lock();
            built = cluster.routing_version();
            (built == version).then(|| cluster.routing())
        })?;
        let offset = if req.version == built { req.offset } else { 0 };
        let page =
            RoutingPage::cut(&encoded, built, offset, sizes.page_bytes).ok_or_else(|| {
                MgmtError::Invalid {
                    reason: format!(
                        "routing page offset {offset} is past the end of the {} bytes of routing \
                     version {}",
                        encoded.len(),
                        built.0
                    ),
                }
            })?;
        Ok(GetRoutingPageRsp { page })
    }

    /// The encoding of the routing table of `version`: from the cache if it
    /// holds that version, else of what `build` returns (`None`: the table
    /// moved past `version` meanwhile, which the caller's next request
    /// sees). With the sizes pages are cut at.
    fn encoded_routing(
        &self,
        version: RoutingVersion,
        build: impl FnOnce() -> Option<RoutingInfo>,
    ) -> Result<(Bytes, PageSizes), MgmtError> {
        {
            let pages = self.routing_pages.lock();
            if let Some((cached, encoded)) = &pages.encoded
                && *cached == version
            {
                return Ok((encoded.clone(), pages.sizes));
            }
        }
        let routing = build().ok_or_else(|| MgmtError::Unavailable {
            reason: format!(
                "the routing table moved past version {} while it was read",
                version.0
            ),
        })?;
        // Encoded outside every lock: a large table takes milliseconds.
        let encoded =
            flyfs_proto::codec::try_encode(&routing).map_err(|error| MgmtError::Invalid {
                reason: format!(
                    "cannot encode routing version {}: {error}",
                    routing.version.0
                ),
            })?;
        let mut pages = self.routing_pages.lock();
        // Keep the newest version encoded.
        if pages
            .encoded
            .as_ref()
            .is_none_or(|(cached, _)| cached.0 < routing.version.0)
        {
            pages.encoded = Some((routing.version, encoded.clone()));
        }
        Ok((encoded, pages.sizes))
    }

    /// Sends routing tables whose encoding is over `inline_bytes_max` in
    /// pages of `page_bytes`: tests reach pages with a few hundred chains
    /// instead of tens of thousands.
    #[cfg(any(test, feature = "testing"))]
    pub fn page_routing_at(&self, inline_bytes_max: usize, page_bytes: usize) {
        self.routing_pages.lock().sizes = PageSizes {
            inline_bytes_max,
            page_bytes: page_bytes.max(1),
        };
    }

    pub async fn create_target(&self, req: CreateTargetReq) -> Result<(), MgmtError> {
        self.mutate(|c, _| c.create_target(req.target, req.node, req.disk))
            .await
    }

    pub async fn create_chain(&self, req: CreateChainReq) -> Result<(), MgmtError> {
        self.mutate(|c, _| c.create_chain(req.chain, &req.targets))
            .await
    }

    pub async fn create_chain_table(&self, req: CreateChainTableReq) -> Result<(), MgmtError> {
        self.mutate(|c, _| c.create_chain_table(req.table, &req.chains))
            .await
    }

    /// Takes a target offline; a serving one first becomes syncing, and
    /// this waits (at most `LEAVE_WAIT`) until its node has seen that and
    /// it is offline (see `Cluster::set_target_offline`).
    pub async fn set_target_offline(&self, req: SetTargetOfflineReq) -> Result<(), MgmtError> {
        let target = req.target;
        if self
            .mutate(|c, now| c.set_target_offline(target, now))
            .await?
        {
            return Ok(());
        }
        self.wait_for(|c| (!c.offline_pending(target)).then_some(Ok(())))
            .await
            .unwrap_or_else(|| {
                Err(MgmtError::Unavailable {
                    reason: format!(
                        "{target:?} is syncing on its way offline until its node shows it has \
                         seen that (or has been silent for {:?}); the manager finishes this by \
                         itself",
                        self.config.failure_timeout
                    ),
                })
            })
    }

    pub async fn add_chain_member(&self, req: ChainMemberReq) -> Result<(), MgmtError> {
        self.mutate(|c, _| c.add_chain_member(req.chain, req.target))
            .await?;
        tracing::info!(chain = ?req.chain, target = ?req.target, "member added");
        Ok(())
    }

    /// Takes a member out of its chain. A serving one first becomes
    /// syncing, and this waits (at most `LEAVE_WAIT`) until its node has
    /// seen that and it is out (see `Cluster::remove_chain_member`).
    pub async fn remove_chain_member(&self, req: ChainMemberReq) -> Result<(), MgmtError> {
        let ChainMemberReq { chain, target } = req;
        let leave = self
            .mutate(|c, now| c.remove_chain_member(chain, target, now))
            .await?;
        let waited = match leave {
            Leave::Done => Some(Ok(())),
            Leave::Pending | Leave::Abandoned => {
                self.wait_for(|c| match c.leave_status(chain, target) {
                    Leave::Done => Some(Ok(())),
                    Leave::Pending => None,
                    Leave::Abandoned => Some(Err(MgmtError::Invalid {
                        reason: format!(
                            "the removal of {target:?} from {chain:?} was given up: no other \
                             member serves any more"
                        ),
                    })),
                })
                .await
            }
        };
        let result = waited.unwrap_or_else(|| {
            Err(MgmtError::Unavailable {
                reason: format!(
                    "{target:?} is leaving {chain:?}: it takes writes and no reads until its \
                     node shows it has seen that (or has been silent for {:?}); the manager \
                     then takes it out by itself",
                    self.config.failure_timeout
                ),
            })
        });
        if result.is_ok() {
            tracing::info!(?chain, ?target, "member removed");
        }
        result
    }

    /// Waits until `done` answers for the current cluster, re-asking after
    /// each change made current; `None` after `LEAVE_WAIT`.
    async fn wait_for<T>(
        &self,
        done: impl Fn(&Cluster) -> Option<Result<T, MgmtError>>,
    ) -> Option<Result<T, MgmtError>> {
        let deadline = tokio::time::Instant::now() + LEAVE_WAIT;
        let mut published = self.published.subscribe();
        loop {
            // Marked seen before the check, so a change made after it wakes
            // the wait below.
            published.borrow_and_update();
            if let Some(answer) = done(&self.cluster.lock()) {
                return Some(answer);
            }
            match tokio::time::timeout_at(deadline, published.changed()).await {
                Ok(Ok(())) => {}
                // Timed out (or the service is going away).
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    pub async fn remove_target(&self, req: RemoveTargetReq) -> Result<(), MgmtError> {
        self.mutate(|c, _| c.remove_target(req.target)).await
    }

    pub async fn remove_node(&self, req: RemoveNodeReq) -> Result<(), MgmtError> {
        self.mutate(|c, now| c.remove_node(req.node, now)).await?;
        self.syncs.lock().remove(&req.node);
        tracing::info!(node = ?req.node, "node removed");
        Ok(())
    }

    /// One re-evaluation of liveness and chains, persisted before it is
    /// published. Returns whether the record changed; on a store failure the
    /// change is dropped and the next tick tries again.
    pub async fn tick(&self) -> Result<bool, MgmtError> {
        self.mutate(|c, now| Ok(c.tick(now))).await
    }

    /// One attempt to take or renew the lease. Gaining it (or finding it
    /// taken again in a new epoch) reloads the record before serving;
    /// finding another holder makes this manager a standby that names it.
    /// On a store error the role is left alone: a primary's lease then runs
    /// out by itself.
    pub async fn lease_round(&self) -> Result<(), StoreError> {
        let now_ms = self.lease.clock.now_ms();
        let state = self
            .store
            .acquire_or_renew(
                &self.lease.holder,
                &self.lease.address,
                self.lease.ttl,
                now_ms,
            )
            .await?;
        let serve_until_ms = now_ms.saturating_add(self.lease.serve_ms());
        match state {
            LeaseState::Held { epoch, .. } => {
                {
                    let mut role = self.role.lock();
                    if let Role::Primary {
                        epoch: held,
                        serve_until_ms: until,
                    } = &mut *role
                        && *held == epoch
                    {
                        // Same epoch: nobody held the lease in between, so
                        // what this manager has in memory is still the truth.
                        *until = (*until).max(serve_until_ms);
                        return Ok(());
                    }
                }
                self.take_over(epoch, serve_until_ms).await
            }
            LeaseState::HeldBy {
                holder, address, ..
            } => {
                let mut role = self.role.lock();
                if matches!(*role, Role::Primary { .. }) {
                    tracing::warn!(%holder, %address, "another manager holds the lease; standing by");
                }
                *role = Role::Standby {
                    primary: Some(address).filter(|a| !a.is_empty()),
                };
                Ok(())
            }
        }
    }

    /// Becomes the primary of lease `epoch`: loads what the previous primary
    /// saved, grants every node the post-restart grace period, saves the
    /// bumped routing version, then serves.
    async fn take_over(&self, epoch: u64, serve_until_ms: u64) -> Result<(), StoreError> {
        let _changes = self.changes.lock().await;
        // Whatever this manager had in memory may be older than the store.
        *self.role.lock() = Role::Standby { primary: None };
        let cluster = match self.store.load().await? {
            Some(record) => {
                record
                    .check()
                    .map_err(|problem| StoreError::Inconsistent { problem })?;
                let mut cluster =
                    Cluster::from_record(record, self.config.failure_timeout, self.now());
                cluster.set_auto_replace(self.config.auto_replace_after);
                let now_ms = self.lease.clock.now_ms();
                self.store
                    .save(cluster.record(), &self.fence(epoch), now_ms)
                    .await?;
                cluster
            }
            None => cluster(self.config),
        };
        let routing_version = cluster.routing_version();
        *self.cluster.lock() = cluster;
        self.published.send_replace(routing_version);
        *self.role.lock() = Role::Primary {
            epoch,
            serve_until_ms,
        };
        tracing::info!(
            holder = %self.lease.holder,
            address = %self.lease.address,
            epoch,
            routing_version = routing_version.0,
            "serving as the primary cluster manager"
        );
        Ok(())
    }

    /// Gives the lease up so that a standby takes over at once (graceful
    /// shutdown). Call it after stopping [`run`](Self::run), which would
    /// otherwise take the lease again.
    pub async fn release(&self) -> Result<(), StoreError> {
        let _changes = self.changes.lock().await;
        let role = std::mem::replace(&mut *self.role.lock(), Role::Standby { primary: None });
        match role {
            Role::Primary { epoch, .. } => self.store.release(&self.fence(epoch)).await,
            Role::Standby { .. } => Ok(()),
        }
    }

    /// The manager's background work, forever: the lease every third of its
    /// ttl, and while primary a [`tick`](Self::tick) every `tick_interval`.
    /// Spawn it beside the RPC server.
    pub async fn run(self: Arc<Self>) {
        let mut lease = tokio::time::interval(self.lease.renew_interval());
        let mut ticks = tokio::time::interval(self.config.tick_interval);
        // After a stall, one catch-up round is enough: both are idempotent.
        lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // `biased`: no random branch choice, so the simulation replays;
            // the lease first, since serving depends on it.
            tokio::select! {
                biased;
                _ = lease.tick() => {
                    if let Err(e) = self.lease_round().await {
                        tracing::warn!(error = %e, "cannot take or renew the manager lease");
                    }
                }
                _ = ticks.tick() => {
                    let primary = self.is_primary();
                    if primary
                        && let Err(e) = self.tick().await
                    {
                        tracing::warn!(error = %e, "cluster tick not applied");
                    }
                    self.export_gauges(primary);
                }
            }
        }
    }

    /// The cluster's shape as gauges (through the `metrics` facade: free
    /// when the process exports none): `flyfs_mgmt_primary`,
    /// `flyfs_mgmt_routing_version`, `flyfs_mgmt_nodes{alive}`,
    /// `flyfs_mgmt_targets{state}`, `flyfs_mgmt_chains`,
    /// `flyfs_mgmt_chains_degraded` (chains with a member not serving) and
    /// `flyfs_mgmt_chain_tables`. A standby's view may be stale.
    fn export_gauges(&self, primary: bool) {
        use flyfs_proto::wire::mgmt::PublicState;
        let routing = self.routing();
        metrics::gauge!("flyfs_mgmt_primary").set(if primary { 1.0 } else { 0.0 });
        metrics::gauge!("flyfs_mgmt_routing_version").set(routing.version.0 as f64);
        let alive = routing.nodes.iter().filter(|n| n.alive).count();
        metrics::gauge!("flyfs_mgmt_nodes", "alive" => "true").set(alive as f64);
        metrics::gauge!("flyfs_mgmt_nodes", "alive" => "false")
            .set((routing.nodes.len() - alive) as f64);
        let count =
            |state: PublicState| routing.targets.iter().filter(|t| t.state == state).count() as f64;
        metrics::gauge!("flyfs_mgmt_targets", "state" => "serving")
            .set(count(PublicState::Serving));
        metrics::gauge!("flyfs_mgmt_targets", "state" => "syncing")
            .set(count(PublicState::Syncing));
        metrics::gauge!("flyfs_mgmt_targets", "state" => "waiting")
            .set(count(PublicState::Waiting));
        metrics::gauge!("flyfs_mgmt_targets", "state" => "lastsrv")
            .set(count(PublicState::LastSrv));
        metrics::gauge!("flyfs_mgmt_targets", "state" => "offline")
            .set(count(PublicState::Offline));
        metrics::gauge!("flyfs_mgmt_chains").set(routing.chains.len() as f64);
        let degraded = routing
            .chains
            .iter()
            .filter(|c| c.targets.iter().any(|t| t.state != PublicState::Serving))
            .count();
        metrics::gauge!("flyfs_mgmt_chains_degraded").set(degraded as f64);
        metrics::gauge!("flyfs_mgmt_chain_tables").set(routing.tables.len() as f64);
    }

    async fn dispatch(&self, req: Request) -> Reply {
        /// Decodes a request of method `$m`, awaits `$handle(body)`, encodes
        /// the response.
        macro_rules! serve {
            ($m:ty, $handle:expr) => {
                match req.decode::<$m>() {
                    Ok(body) => Reply::ok::<$m>(&$handle(body).await, Bytes::new()),
                    Err(reply) => reply,
                }
            };
        }
        /// A storage node speaks only for the node id its certificate
        /// names: anything else is refused before the record is touched.
        macro_rules! as_own_node {
            ($m:ty, $handle:expr) => {
                match req.decode::<$m>() {
                    Ok(body) if req.peer.identity.storage_node() == Some(body.node) => {
                        Reply::ok::<$m>(&$handle(body).await, Bytes::new())
                    }
                    Ok(body) => {
                        let message = format!(
                            "{} for {:?} refused: the caller's certificate names {}",
                            <$m>::NAME,
                            body.node,
                            req.peer.identity
                        );
                        flyfs_rpc::refusals::global().log("another node's id", &req.peer, &message);
                        Reply::error(Status::Forbidden, message)
                    }
                    Err(reply) => reply,
                }
            };
        }
        match req.method {
            RegisterNode::ID => as_own_node!(RegisterNode, |b| self.register_node(b)),
            Heartbeat::ID => as_own_node!(Heartbeat, |b| self.heartbeat(b)),
            GetRouting::ID => match req.decode::<GetRouting>() {
                Ok(body) => match self.get_routing(body) {
                    Ok(rsp) => Reply::ok::<GetRouting>(&rsp, Bytes::new()),
                    // The response has no error; callers move on to another
                    // manager on `Unavailable`.
                    Err(e) => Reply::error(Status::Unavailable, e),
                },
                Err(reply) => reply,
            },
            GetRoutingPage::ID => match req.decode::<GetRoutingPage>() {
                Ok(body) => match self.get_routing_page(body) {
                    Ok(rsp) => Reply::ok::<GetRoutingPage>(&rsp, Bytes::new()),
                    // As `GetRouting`: a standby's answer is `Unavailable`,
                    // and so is a table that moved while it was read (the
                    // caller asks again).
                    Err(e @ (MgmtError::NotPrimary { .. } | MgmtError::Unavailable { .. })) => {
                        Reply::error(Status::Unavailable, e)
                    }
                    Err(e) => Reply::error(Status::BadRequest, e),
                },
                Err(reply) => reply,
            },
            CreateTarget::ID => serve!(CreateTarget, |b| self.create_target(b)),
            CreateChain::ID => serve!(CreateChain, |b| self.create_chain(b)),
            CreateChainTable::ID => serve!(CreateChainTable, |b| self.create_chain_table(b)),
            SetTargetOffline::ID => serve!(SetTargetOffline, |b| self.set_target_offline(b)),
            RemoveNode::ID => serve!(RemoveNode, |b| self.remove_node(b)),
            AddChainMember::ID => serve!(AddChainMember, |b| self.add_chain_member(b)),
            RemoveChainMember::ID => serve!(RemoveChainMember, |b| self.remove_chain_member(b)),
            RemoveTarget::ID => serve!(RemoveTarget, |b| self.remove_target(b)),
            flyfs_proto::wire::mgmt::GetSyncProgress::ID => {
                match req.decode::<flyfs_proto::wire::mgmt::GetSyncProgress>() {
                    Ok(_) => Reply::ok::<flyfs_proto::wire::mgmt::GetSyncProgress>(
                        &self
                            .sync_progress()
                            .map(|syncs| flyfs_proto::wire::mgmt::GetSyncProgressRsp { syncs }),
                        Bytes::new(),
                    ),
                    Err(reply) => reply,
                }
            }
            other => Reply::unknown_method(other),
        }
    }
}

impl Service for MgmtService {
    fn call(&self, req: Request) -> impl Future<Output = Reply> + Send {
        self.dispatch(req)
    }
}

#[cfg(test)]
mod tests {
    use flyfs_proto::ids::{ChainId, ChainTableId, NodeId, RoutingVersion, TargetId};
    use flyfs_proto::wire::mgmt::{LocalState, PublicState, TargetReport};

    use super::*;
    use crate::mgmt::store::MemStore;

    fn config() -> MgmtConfig {
        MgmtConfig {
            heartbeat_interval: Duration::from_millis(100),
            failure_timeout: Duration::from_secs(1),
            tick_interval: Duration::from_millis(100),
            auto_replace_after: None,
        }
    }

    async fn build(service: &MgmtService) {
        for n in 1..=2u32 {
            service
                .register_node(RegisterNodeReq {
                    node: NodeId(n),
                    addr: format!("127.0.0.1:{}", 7000 + n),
                })
                .await
                .expect("register");
            service
                .create_target(CreateTargetReq {
                    target: TargetId(n.into()),
                    node: NodeId(n),
                    disk: 0,
                })
                .await
                .expect("target");
        }
        service
            .create_chain(CreateChainReq {
                chain: ChainId(1),
                targets: vec![TargetId(1), TargetId(2)],
            })
            .await
            .expect("chain");
        service
            .create_chain_table(CreateChainTableReq {
                table: ChainTableId(1),
                chains: vec![ChainId(1)],
            })
            .await
            .expect("table");
    }

    async fn heartbeat(service: &MgmtService, n: u32) -> Result<HeartbeatRsp, MgmtError> {
        service
            .heartbeat(HeartbeatReq {
                node: NodeId(n),
                addr: String::new(),
                targets: vec![TargetReport {
                    target: TargetId(n.into()),
                    local: LocalState::UpToDate,
                    used_bytes: 0,
                    ..TargetReport::default()
                }],
                routing_version: RoutingVersion(0),
                syncs: Vec::new(),
            })
            .await
    }

    /// The resync progress a node reports is handed on while its
    /// successor syncs, and only then; a report for a member that is not
    /// syncing, or from a node that sends nothing any more, is not.
    #[tokio::test(start_paused = true)]
    async fn resync_progress_is_handed_on_while_the_member_syncs() {
        let service = MgmtService::open(Box::new(MemStore::new()), config())
            .await
            .expect("open");
        build(&service).await;
        service
            .register_node(RegisterNodeReq {
                node: NodeId(3),
                addr: "127.0.0.1:7003".into(),
            })
            .await
            .expect("register");
        service
            .create_target(CreateTargetReq {
                target: TargetId(3),
                node: NodeId(3),
                disk: 0,
            })
            .await
            .expect("target");
        service
            .add_chain_member(ChainMemberReq {
                chain: ChainId(1),
                target: TargetId(3),
            })
            .await
            .expect("add");
        let report = |n: u32, local, syncs| HeartbeatReq {
            node: NodeId(n),
            targets: vec![TargetReport {
                target: TargetId(n.into()),
                local,
                ..TargetReport::default()
            }],
            syncs,
            ..HeartbeatReq::default()
        };
        let progress = |target: u64, bytes_done| SyncProgress {
            chain: ChainId(1),
            target: TargetId(target),
            chunks_done: bytes_done / 10,
            chunks_total: 10,
            bytes_done,
            bytes_total: 100,
        };
        heartbeat(&service, 1).await.expect("heartbeat 1");
        heartbeat(&service, 2).await.expect("heartbeat 2");
        service
            .heartbeat(report(3, LocalState::Online, Vec::new()))
            .await
            .expect("heartbeat 3");
        service.tick().await.expect("tick");
        let state = |service: &MgmtService| service.routing().target(TargetId(3)).map(|t| t.state);
        assert_eq!(state(&service), Some(PublicState::Syncing));
        // Node 2 (the tail before) syncs target 3; node 1 claims a resync
        // of target 2, which serves.
        for done in [0, 40, 100] {
            service
                .heartbeat(report(2, LocalState::UpToDate, vec![progress(3, done)]))
                .await
                .expect("heartbeat 2");
            service
                .heartbeat(report(1, LocalState::UpToDate, vec![progress(2, 50)]))
                .await
                .expect("heartbeat 1");
            assert_eq!(service.sync_progress(), Ok(vec![progress(3, done)]));
        }
        service
            .heartbeat(report(3, LocalState::UpToDate, Vec::new()))
            .await
            .expect("heartbeat 3");
        service.tick().await.expect("tick");
        assert_eq!(state(&service), Some(PublicState::Serving));
        assert_eq!(service.sync_progress(), Ok(Vec::new()));
        // A node that stops reporting a resync drops it.
        for n in [1, 2] {
            service
                .heartbeat(report(n, LocalState::UpToDate, Vec::new()))
                .await
                .expect("heartbeat");
        }
        assert!(service.syncs.lock().values().all(Vec::is_empty));
    }

    #[tokio::test(start_paused = true)]
    async fn changes_are_saved_before_they_are_published() {
        let store = MemStore::new();
        let service = MgmtService::open(Box::new(store.clone()), config())
            .await
            .expect("open");
        build(&service).await;
        let saved = store.snapshot().expect("saved");
        assert_eq!(saved.routing_version, service.routing().version);
        assert_eq!(saved.chains.len(), 1);

        // With the store failing, a change is refused and not published.
        store.set_fail_saves(true);
        let before = service.routing();
        let err = service
            .create_target(CreateTargetReq {
                target: TargetId(3),
                node: NodeId(1),
                disk: 1,
            })
            .await
            .expect_err("cannot persist");
        assert!(matches!(err, MgmtError::Unavailable { .. }), "{err}");
        assert_eq!(service.routing(), before);

        // A failure detected while saves fail is not published either...
        // (the lease is renewed by hand here: nothing runs `run`).
        tokio::time::advance(Duration::from_secs(2)).await;
        service.lease_round().await.expect("renew");
        assert!(service.tick().await.is_err());
        assert_eq!(service.routing(), before);
        // ...until the store recovers.
        store.set_fail_saves(false);
        assert_eq!(service.tick().await, Ok(true));
        let after = service.routing();
        assert!(after.version > before.version);
        assert_eq!(
            store.snapshot().map(|r| r.routing_version),
            Some(after.version)
        );
        let chain = after.chain(ChainId(1)).expect("chain");
        assert_eq!(chain.targets[0].state, PublicState::LastSrv);
    }

    #[tokio::test(start_paused = true)]
    async fn get_routing_answers_none_when_current() {
        let service = MgmtService::open(Box::new(MemStore::new()), config())
            .await
            .expect("open");
        build(&service).await;
        let routing = service
            .get_routing(GetRoutingReq {
                known_version: RoutingVersion(0),
            })
            .expect("primary")
            .routing
            .expect("newer than 0");
        let again = service
            .get_routing(GetRoutingReq {
                known_version: routing.version,
            })
            .expect("primary");
        assert_eq!(again.routing, None);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_nodes_alive_and_restart_reloads_the_record() {
        let store = MemStore::new();
        let service = MgmtService::open(Box::new(store.clone()), config())
            .await
            .expect("open");
        build(&service).await;
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(100)).await;
            service.lease_round().await.expect("renew");
            for n in 1..=2u32 {
                heartbeat(&service, n).await.expect("heartbeat");
            }
            assert_eq!(
                service.tick().await,
                Ok(false),
                "healthy cluster: nothing changes"
            );
        }
        let before = service.routing();

        // A heartbeat from an unknown node registers it.
        service
            .heartbeat(HeartbeatReq {
                node: NodeId(9),
                addr: "127.0.0.1:7009".into(),
                targets: Vec::new(),
                routing_version: RoutingVersion(0),
                syncs: Vec::new(),
            })
            .await
            .expect("heartbeat registers");
        assert!(service.routing().node(NodeId(9)).is_some());

        let restarted = MgmtService::open(Box::new(store.clone()), config())
            .await
            .expect("reopen");
        let routing = restarted.routing();
        assert_eq!(routing.chains, before.chains);
        assert!(routing.node(NodeId(9)).is_some());
        assert!(
            routing.version > service.routing().version,
            "a restart bumps the version"
        );
    }

    /// Managers "m1" (which opens first, so holds the lease) and "m2" on one
    /// store and one paused clock, with a 3 s lease.
    async fn two_managers() -> (
        MemStore,
        Arc<TokioClock>,
        Arc<MgmtService>,
        Arc<MgmtService>,
    ) {
        let store = MemStore::new();
        let clock = Arc::new(TokioClock::new());
        let lease = |name: &str| LeaseOptions {
            holder: name.into(),
            address: format!("{name}:7000"),
            ttl: Duration::from_secs(3),
            clock: clock.clone(),
            monotonic: clock.clone(),
        };
        let first = MgmtService::open_with(Box::new(store.clone()), config(), lease("m1"))
            .await
            .expect("open m1");
        let second = MgmtService::open_with(Box::new(store.clone()), config(), lease("m2"))
            .await
            .expect("open m2");
        (store, clock, first, second)
    }

    /// Two managers on one store and one clock: the second stands by, names
    /// the primary, takes over once the primary stops renewing, and the old
    /// primary stops serving by itself and cannot save.
    #[tokio::test(start_paused = true)]
    async fn a_standby_takes_over_when_the_lease_expires() {
        let (store, clock, first, second) = two_managers().await;
        assert!(first.is_primary());
        assert!(!second.is_primary());
        build(&first).await;
        let err = heartbeat(&second, 1).await.expect_err("standby");
        assert_eq!(
            err,
            MgmtError::NotPrimary {
                primary: Some("m1:7000".into())
            }
        );
        assert!(second.get_routing(GetRoutingReq::default()).is_err());

        // The primary stops renewing (it hangs). Within its ttl the standby
        // keeps standing by; the primary stops serving at 3/4 of the ttl.
        tokio::time::advance(Duration::from_millis(2000)).await;
        second.lease_round().await.expect("round");
        assert!(!second.is_primary());
        tokio::time::advance(Duration::from_millis(300)).await;
        assert!(!first.is_primary(), "serves past 3/4 of an unrenewed lease");
        let err = heartbeat(&first, 1).await.expect_err("lapsed");
        assert_eq!(err, MgmtError::NotPrimary { primary: None });

        tokio::time::advance(Duration::from_millis(800)).await;
        second.lease_round().await.expect("round");
        assert!(second.is_primary(), "the standby took over");
        let before = first.routing();
        let after = second.routing();
        assert_eq!(after.chains, before.chains);
        assert_eq!(after.targets, before.targets);
        assert!(after.version > before.version);
        heartbeat(&second, 1).await.expect("the new primary serves");

        // The old primary wakes up: it cannot serve or save until it has
        // the lease again, and the record stays the new primary's.
        first.lease_round().await.expect("round");
        assert!(!first.is_primary());
        assert_eq!(first.primary(), Some("m2:7000".into()));
        let saved = store.snapshot().expect("saved");
        let err = first
            .store
            .save(&before_record(&first), &first.fence(1), clock.now_ms())
            .await
            .expect_err("a deposed primary's save");
        assert!(matches!(err, StoreError::NotLeaseHolder { .. }), "{err}");
        assert_eq!(store.snapshot(), Some(saved));
    }

    fn before_record(service: &MgmtService) -> ClusterRecord {
        service.cluster.lock().record().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_is_taken_at_once() {
        let (_, _, first, second) = two_managers().await;
        build(&first).await;
        first.release().await.expect("release");
        assert!(!first.is_primary());
        second.lease_round().await.expect("round");
        assert!(second.is_primary());
        assert_eq!(
            second.routing().chain(ChainId(1)).map(|c| c.targets.len()),
            Some(2)
        );
    }

    /// The rule behind the simulation's clock-skew bound: a primary that
    /// stops renewing serves until three quarters of its lease on its own
    /// clock, and a standby takes over at the whole lease on its clock. With
    /// the standby's clock ahead by more than the quarter the primary keeps,
    /// both serve at once (saves stay fenced: only reads and answers from a
    /// stale record escape); within it they never do.
    #[tokio::test(start_paused = true)]
    async fn a_skew_beyond_a_quarter_of_the_ttl_gives_two_primaries() {
        for (ahead_ms, both) in [(600, false), (1000, true)] {
            let store = MemStore::new();
            let base = TokioClock::new();
            let lease = |name: &str, offset_ms: i64| {
                let clock: Arc<dyn Clock> =
                    Arc::new(flyfs_time::SkewedClock::new(base, offset_ms * 1_000_000, 0));
                LeaseOptions {
                    holder: name.into(),
                    address: format!("{name}:7000"),
                    ttl: Duration::from_secs(3),
                    clock: clock.clone(),
                    monotonic: clock,
                }
            };
            let first = MgmtService::open_with(Box::new(store.clone()), config(), lease("m1", 0))
                .await
                .expect("open m1");
            let second =
                MgmtService::open_with(Box::new(store.clone()), config(), lease("m2", ahead_ms))
                    .await
                    .expect("open m2");
            assert!(first.is_primary());
            // The primary stops renewing; the standby tries every 10 ms
            // until the primary's three quarters are over.
            let mut overlap = false;
            for _ in 0..230 {
                tokio::time::advance(Duration::from_millis(10)).await;
                second.lease_round().await.expect("round");
                overlap |= first.is_primary() && second.is_primary();
            }
            assert!(!first.is_primary(), "serves past 3/4 of its lease");
            assert_eq!(overlap, both, "standby {ahead_ms} ms ahead");
        }
    }
}
