//! The cluster manager's RPC service: decodes requests, applies them to the
//! [`Cluster`] state machine, persists every change before replying, and
//! re-evaluates the cluster on a timer.
//!
//! Persistence rule: a change to the durable record is saved before anyone
//! can see it. Each mutation runs on a clone of the cluster; the clone is
//! saved and only then becomes current. If the save fails the caller gets
//! `MgmtError::Unavailable` and the manager keeps serving the old state, so
//! no routing version is ever published that a restarted manager would not
//! know.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_rpc::Method;
use flyfs_rpc::server::{Reply, Request, Service};
use flyfs_rpc::wire::mgmt::{
    CreateChain, CreateChainReq, CreateChainTable, CreateChainTableReq, CreateTarget,
    CreateTargetReq, GetRouting, GetRoutingReq, GetRoutingRsp, Heartbeat, HeartbeatReq,
    HeartbeatRsp, MgmtError, RegisterNode, RegisterNodeReq, RegisterNodeRsp, RoutingInfo,
    SetTargetOffline, SetTargetOfflineReq,
};
use parking_lot::Mutex;
use tokio::time::Instant;

use super::cluster::Cluster;
use super::store::{ClusterStore, StoreError};

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
    /// period nodes get after a manager restart.
    pub failure_timeout: Duration,
    /// How often liveness and chains are re-evaluated.
    pub tick_interval: Duration,
}

impl Default for MgmtConfig {
    fn default() -> MgmtConfig {
        MgmtConfig {
            heartbeat_interval: Duration::from_secs(1),
            failure_timeout: Duration::from_secs(10),
            tick_interval: Duration::from_millis(500),
        }
    }
}

/// The cluster manager service.
pub struct MgmtService {
    // Held only for synchronous work (never across an await). The store's
    // save runs under it so that saves happen in the order of the changes;
    // the control plane is small and rare enough that a short blocking save
    // here is the simplest correct choice.
    cluster: Mutex<Cluster>,
    store: Box<dyn ClusterStore>,
    config: MgmtConfig,
    start: Instant,
}

impl std::fmt::Debug for MgmtService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MgmtService")
            .field("config", &self.config)
            // `try_lock`: printing must never wait for (or deadlock with) a
            // mutation in progress.
            .field(
                "routing_version",
                &self.cluster.try_lock().map(|c| c.routing_version()),
            )
            .finish_non_exhaustive()
    }
}

impl MgmtService {
    /// Loads the record from `store` (or starts empty) and builds the
    /// service. After a restart every known node gets a grace period, and the
    /// bumped routing version is saved before the service answers anything.
    pub fn open(store: Box<dyn ClusterStore>, config: MgmtConfig) -> Result<Arc<Self>, StoreError> {
        let cluster = match store.load()? {
            Some(record) => {
                record
                    .check()
                    .map_err(|problem| StoreError::Inconsistent { problem })?;
                let cluster = Cluster::from_record(record, config.failure_timeout, Duration::ZERO);
                store.save(cluster.record())?;
                cluster
            }
            None => Cluster::new(config.failure_timeout),
        };
        Ok(Arc::new(MgmtService {
            cluster: Mutex::new(cluster),
            store,
            config,
            start: Instant::now(),
        }))
    }

    pub fn config(&self) -> &MgmtConfig {
        &self.config
    }

    /// Time since the service started (tokio's clock, so simulated time
    /// under turmoil).
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The routing information currently published.
    pub fn routing(&self) -> RoutingInfo {
        self.cluster.lock().routing()
    }

    /// Applies `op` to a copy of the cluster, saves the copy's record if it
    /// changed, and only then makes the copy current.
    fn mutate<T>(
        &self,
        op: impl FnOnce(&mut Cluster, Duration) -> Result<T, MgmtError>,
    ) -> Result<T, MgmtError> {
        let mut current = self.cluster.lock();
        let now = self.now();
        let mut next = current.clone();
        let out = op(&mut next, now)?;
        // Every change of the record bumps the routing version.
        if next.routing_version() != current.routing_version() {
            self.store.save(next.record()).map_err(|e| {
                tracing::error!(error = %e, "cannot persist the cluster record; change dropped");
                MgmtError::Unavailable {
                    reason: e.to_string(),
                }
            })?;
        }
        *current = next;
        Ok(out)
    }

    pub fn register_node(&self, req: RegisterNodeReq) -> Result<RegisterNodeRsp, MgmtError> {
        let routing_version = self.mutate(|c, now| c.register(req.node, &req.addr, now))?;
        Ok(RegisterNodeRsp { routing_version })
    }

    pub fn heartbeat(&self, req: HeartbeatReq) -> Result<HeartbeatRsp, MgmtError> {
        {
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
                let routing_version = current.heartbeat(&req, now)?;
                debug_assert_eq!(
                    before, routing_version,
                    "a known node's heartbeat changed the record"
                );
                return Ok(self.heartbeat_rsp(routing_version));
            }
        }
        let routing_version = self.mutate(|c, now| c.heartbeat(&req, now))?;
        Ok(self.heartbeat_rsp(routing_version))
    }

    fn heartbeat_rsp(&self, routing_version: flyfs_rpc::ids::RoutingVersion) -> HeartbeatRsp {
        HeartbeatRsp {
            routing_version,
            failure_timeout_ms: self.config.failure_timeout.as_millis() as u64,
        }
    }

    pub fn get_routing(&self, req: GetRoutingReq) -> GetRoutingRsp {
        let cluster = self.cluster.lock();
        let routing = (cluster.routing_version() != req.known_version).then(|| cluster.routing());
        GetRoutingRsp { routing }
    }

    pub fn create_target(&self, req: CreateTargetReq) -> Result<(), MgmtError> {
        self.mutate(|c, _| c.create_target(req.target, req.node, req.disk))
    }

    pub fn create_chain(&self, req: CreateChainReq) -> Result<(), MgmtError> {
        self.mutate(|c, _| c.create_chain(req.chain, &req.targets))
    }

    pub fn create_chain_table(&self, req: CreateChainTableReq) -> Result<(), MgmtError> {
        self.mutate(|c, _| c.create_chain_table(req.table, &req.chains))
    }

    pub fn set_target_offline(&self, req: SetTargetOfflineReq) -> Result<(), MgmtError> {
        self.mutate(|c, now| c.set_target_offline(req.target, now))
    }

    /// One re-evaluation of liveness and chains, persisted before it is
    /// published. Returns whether the record changed; on a store failure the
    /// change is dropped and the next tick tries again.
    pub fn tick(&self) -> Result<bool, MgmtError> {
        self.mutate(|c, now| Ok(c.tick(now)))
    }

    /// Calls [`tick`](Self::tick) every `tick_interval`, forever; spawn it
    /// beside the RPC server.
    pub async fn run_ticker(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.config.tick_interval);
        // After a stall, one catch-up tick is enough: ticks are idempotent.
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Err(e) = self.tick() {
                tracing::warn!(error = %e, "cluster tick not applied");
            }
        }
    }

    /// Decodes a request of method `M`, runs `handle`, encodes the response.
    fn serve<M: Method>(
        &self,
        req: &Request,
        handle: impl FnOnce(&Self, M::Req) -> M::Rsp,
    ) -> Reply {
        match req.decode::<M>() {
            Ok(body) => Reply::ok::<M>(&handle(self, body), Bytes::new()),
            Err(reply) => reply,
        }
    }

    fn dispatch(&self, req: Request) -> Reply {
        match req.method {
            RegisterNode::ID => self.serve::<RegisterNode>(&req, Self::register_node),
            Heartbeat::ID => self.serve::<Heartbeat>(&req, Self::heartbeat),
            GetRouting::ID => self.serve::<GetRouting>(&req, Self::get_routing),
            CreateTarget::ID => self.serve::<CreateTarget>(&req, Self::create_target),
            CreateChain::ID => self.serve::<CreateChain>(&req, Self::create_chain),
            CreateChainTable::ID => self.serve::<CreateChainTable>(&req, Self::create_chain_table),
            SetTargetOffline::ID => self.serve::<SetTargetOffline>(&req, Self::set_target_offline),
            other => Reply::unknown_method(other),
        }
    }
}

impl Service for MgmtService {
    fn call(&self, req: Request) -> impl Future<Output = Reply> + Send {
        // Every handler is synchronous (the state machine is in memory and
        // the save is a short blocking write), so the reply is ready at once.
        std::future::ready(self.dispatch(req))
    }
}

#[cfg(test)]
mod tests {
    use flyfs_rpc::ids::{ChainId, ChainTableId, NodeId, RoutingVersion, TargetId};
    use flyfs_rpc::wire::mgmt::{LocalState, PublicState, TargetReport};

    use super::*;
    use crate::mgmt::store::MemStore;

    fn config() -> MgmtConfig {
        MgmtConfig {
            heartbeat_interval: Duration::from_millis(100),
            failure_timeout: Duration::from_secs(1),
            tick_interval: Duration::from_millis(100),
        }
    }

    fn build(service: &MgmtService) {
        for n in 1..=2u32 {
            service
                .register_node(RegisterNodeReq {
                    node: NodeId(n),
                    addr: format!("127.0.0.1:{}", 7000 + n),
                })
                .expect("register");
            service
                .create_target(CreateTargetReq {
                    target: TargetId(n.into()),
                    node: NodeId(n),
                    disk: 0,
                })
                .expect("target");
        }
        service
            .create_chain(CreateChainReq {
                chain: ChainId(1),
                targets: vec![TargetId(1), TargetId(2)],
            })
            .expect("chain");
        service
            .create_chain_table(CreateChainTableReq {
                table: ChainTableId(1),
                chains: vec![ChainId(1)],
            })
            .expect("table");
    }

    #[tokio::test(start_paused = true)]
    async fn changes_are_saved_before_they_are_published() {
        let store = MemStore::new();
        let service = MgmtService::open(Box::new(store.clone()), config()).expect("open");
        build(&service);
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
            .expect_err("cannot persist");
        assert!(matches!(err, MgmtError::Unavailable { .. }), "{err}");
        assert_eq!(service.routing(), before);

        // A failure detected while saves fail is not published either...
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(service.tick().is_err());
        assert_eq!(service.routing(), before);
        // ...until the store recovers.
        store.set_fail_saves(false);
        assert_eq!(service.tick(), Ok(true));
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
        let service = MgmtService::open(Box::new(MemStore::new()), config()).expect("open");
        build(&service);
        let routing = service
            .get_routing(GetRoutingReq {
                known_version: RoutingVersion(0),
            })
            .routing
            .expect("newer than 0");
        let again = service.get_routing(GetRoutingReq {
            known_version: routing.version,
        });
        assert_eq!(again.routing, None);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_nodes_alive_and_restart_reloads_the_record() {
        let store = MemStore::new();
        let service = MgmtService::open(Box::new(store.clone()), config()).expect("open");
        build(&service);
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(100)).await;
            for n in 1..=2u32 {
                service
                    .heartbeat(HeartbeatReq {
                        node: NodeId(n),
                        addr: String::new(),
                        targets: vec![TargetReport {
                            target: TargetId(n.into()),
                            local: LocalState::UpToDate,
                            used_bytes: 0,
                        }],
                    })
                    .expect("heartbeat");
            }
            assert_eq!(
                service.tick(),
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
            })
            .expect("heartbeat registers");
        assert!(service.routing().node(NodeId(9)).is_some());

        let restarted = MgmtService::open(Box::new(store.clone()), config()).expect("reopen");
        let routing = restarted.routing();
        assert_eq!(routing.chains, before.chains);
        assert!(routing.node(NodeId(9)).is_some());
        assert!(
            routing.version > service.routing().version,
            "a restart bumps the version"
        );
    }
}
