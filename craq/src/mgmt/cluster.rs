//! The cluster manager's state machine: membership, targets, chains and
//! chain tables, liveness from heartbeats, and the periodic re-evaluation of
//! every chain with the transition table.
//!
//! Pure: no I/O, no clock. Time comes in as `now`, a monotonic duration
//! since the driver started, so the same code runs under tokio and inside
//! the deterministic simulation. The service (`service.rs`) persists the
//! durable part ([`ClusterRecord`]) before it publishes any change.
//!
//! Durable: nodes (id, address), targets (id, node, disk, chain), chains with
//! their public states, chain tables, routing version. Volatile (rebuilt from
//! heartbeats after a restart): heartbeat times, reported local states, admin
//! offline overrides, the published liveness of nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flyfs_proto::ids::{ChainId, ChainTableId, ChainVersion, NodeId, RoutingVersion, TargetId};
use flyfs_proto::wire::mgmt::{
    ChainInfo, ChainTable, ChainTarget, HeartbeatReq, LocalState, MgmtError, NodeInfo, PublicState,
    RoutingInfo, TargetInfo, TargetReport,
};
use serde::{Deserialize, Serialize};

use super::transition::update_chain_holding;
use crate::placement;

/// A registered storage node, as persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeRecord {
    pub addr: String,
}

/// A storage target, as persisted. Its public state lives in its chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetRecord {
    pub node: NodeId,
    pub disk: u32,
    pub chain: Option<ChainId>,
    /// Set on a target the manager added to replace a member that stayed
    /// offline too long (automatic replacement): that member leaves the
    /// chain once this one serves. Absent in records written before
    /// automatic replacement existed, which read as `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces: Option<TargetId>,
    /// Set while the target leaves its chain: an admin asked to remove it
    /// while it served, so the manager first made it syncing (in the write
    /// path, not readable) in this routing version. It leaves the chain once
    /// its node has heartbeated holding this version or a later one, or has
    /// been silent past the failure timeout (so its lease has lapsed): until
    /// then the node may still answer reads as a serving member under the
    /// older chain version, and must therefore still see every write.
    /// Absent otherwise, and in records from before it existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaving: Option<RoutingVersion>,
}

/// The durable part of the manager's state: what a restarted (or standby)
/// manager loads from its [`ClusterStore`](super::store::ClusterStore).
/// Every change to it bumps `routing_version`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterRecord {
    pub routing_version: RoutingVersion,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub targets: BTreeMap<TargetId, TargetRecord>,
    pub chains: BTreeMap<ChainId, ChainInfo>,
    pub tables: BTreeMap<ChainTableId, ChainTable>,
}

impl ClusterRecord {
    /// Checks that the record agrees with itself (ids match their keys,
    /// references resolve, every chain member points back at its chain).
    /// A record from disk passed its checksum, but may come from a buggy or
    /// foreign writer; the manager refuses to run on one that fails this.
    pub fn check(&self) -> Result<(), String> {
        for (id, target) in &self.targets {
            if !self.nodes.contains_key(&target.node) {
                return Err(format!("{id:?} is on unknown {:?}", target.node));
            }
            if let Some(chain) = target.chain {
                let member = self
                    .chains
                    .get(&chain)
                    .is_some_and(|c| c.position(*id).is_some());
                if !member {
                    return Err(format!("{id:?} claims {chain:?}, which does not list it"));
                }
            } else if target.leaving.is_some() {
                return Err(format!("{id:?} is leaving a chain but belongs to none"));
            }
        }
        for (id, chain) in &self.chains {
            if chain.id != *id {
                return Err(format!("{id:?} is stored with id {:?}", chain.id));
            }
            if chain.targets.is_empty() {
                return Err(format!("{id:?} has no targets"));
            }
            let mut seen = BTreeSet::new();
            for member in &chain.targets {
                if !seen.insert(member.target) {
                    return Err(format!("{id:?} lists {:?} twice", member.target));
                }
                match self.targets.get(&member.target) {
                    Some(t) if t.chain == Some(*id) => {}
                    _ => {
                        return Err(format!(
                            "{id:?} lists {:?}, which is unknown or in another chain",
                            member.target
                        ));
                    }
                }
            }
        }
        for (id, table) in &self.tables {
            if table.id != *id {
                return Err(format!("{id:?} is stored with id {:?}", table.id));
            }
            if let Some(missing) = table.chains.iter().find(|c| !self.chains.contains_key(c)) {
                return Err(format!("{id:?} lists unknown {missing:?}"));
            }
        }
        Ok(())
    }
}

/// What the manager knows of a node's liveness (volatile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Liveness {
    /// When it last heartbeated (or registered, or the manager started).
    last_heartbeat: Duration,
    /// Whether a heartbeat arrived since the manager started: only then does
    /// a target missing from its reports count as offline.
    heard: bool,
    /// The routing version the node held when it sent its latest heartbeat
    /// (0 until one says).
    routing_version: RoutingVersion,
}

/// Where a removal from a chain stands (see [`Cluster::remove_chain_member`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leave {
    /// The target is out of the chain.
    Done,
    /// The target is syncing on its way out; it leaves once its node has
    /// seen that it no longer serves (or its lease has surely lapsed).
    Pending,
    /// The target is still a member and no longer leaving: the removal was
    /// given up because no other member served any more.
    Abandoned,
}

/// The manager's state machine. `Clone` so the service can apply a change to
/// a copy, persist it, and only then make it current.
#[derive(Clone, Debug)]
pub struct Cluster {
    record: ClusterRecord,
    failure_timeout: Duration,
    liveness: BTreeMap<NodeId, Liveness>,
    /// Each target's local state from its node's latest heartbeat.
    reported: BTreeMap<TargetId, LocalState>,
    /// Targets an admin took offline, until their node reports them online.
    forced_offline: BTreeSet<TargetId>,
    /// Nodes shown alive in the routing information; changes only together
    /// with a routing version bump, so one version always means one content.
    alive: BTreeSet<NodeId>,
    /// Replace a member offline for this long (off when `None`).
    auto_replace: Option<Duration>,
    /// Since when each chain member has been publicly offline, as ticks saw
    /// it (in memory: a manager restart starts the clocks again).
    offline_since: BTreeMap<TargetId, Duration>,
    /// Serving targets an admin took offline, made syncing first in the
    /// given routing version; they go offline once their node has seen that
    /// (as [`TargetRecord::leaving`], in memory only: after a restart such a
    /// target, up to date and never out of the write path, serves again, as
    /// an admin's offline ends with a restart anyway).
    demoting: BTreeMap<TargetId, RoutingVersion>,
}

fn not_found(what: impl std::fmt::Debug) -> MgmtError {
    MgmtError::NotFound {
        what: format!("{what:?}"),
    }
}

fn invalid(reason: String) -> MgmtError {
    MgmtError::Invalid { reason }
}

impl Cluster {
    /// An empty cluster. A node is declared dead once its last heartbeat is
    /// older than `failure_timeout`.
    pub fn new(failure_timeout: Duration) -> Cluster {
        Cluster {
            record: ClusterRecord::default(),
            failure_timeout,
            liveness: BTreeMap::new(),
            reported: BTreeMap::new(),
            forced_offline: BTreeSet::new(),
            alive: BTreeSet::new(),
            auto_replace: None,
            offline_since: BTreeMap::new(),
            demoting: BTreeMap::new(),
        }
    }

    /// The manager after a restart, from its saved record. Every known node
    /// gets a grace period (it counts as having heartbeated at `now`), so a
    /// manager restart does not take the cluster offline; targets are
    /// re-evaluated once their nodes have reported, or as offline once the
    /// grace period ran out without a heartbeat.
    ///
    /// The routing version is bumped: node liveness is not persisted, so the
    /// previous manager may have published the same version with different
    /// `alive` flags. The caller saves the record before serving.
    pub fn from_record(record: ClusterRecord, failure_timeout: Duration, now: Duration) -> Cluster {
        let liveness = record
            .nodes
            .keys()
            .map(|&node| {
                let grace = Liveness {
                    last_heartbeat: now,
                    heard: false,
                    routing_version: RoutingVersion(0),
                };
                (node, grace)
            })
            .collect();
        let alive = record.nodes.keys().copied().collect();
        let mut cluster = Cluster {
            record,
            failure_timeout,
            liveness,
            reported: BTreeMap::new(),
            forced_offline: BTreeSet::new(),
            alive,
            auto_replace: None,
            offline_since: BTreeMap::new(),
            demoting: BTreeMap::new(),
        };
        cluster.bump();
        cluster
    }

    /// Automatic replacement: a chain member publicly offline for `after`
    /// is replaced by a new target on the least-loaded live node outside
    /// its chain (see [`Cluster::tick`]). Off (`None`) by default: replacing
    /// a replica copies a whole target's data, which an operator may rather
    /// not start for a node that is only rebooting.
    pub fn set_auto_replace(&mut self, after: Option<Duration>) {
        self.auto_replace = after;
    }

    pub fn record(&self) -> &ClusterRecord {
        &self.record
    }

    pub fn routing_version(&self) -> RoutingVersion {
        self.record.routing_version
    }

    pub fn failure_timeout(&self) -> Duration {
        self.failure_timeout
    }

    fn bump(&mut self) {
        self.record.routing_version = RoutingVersion(self.record.routing_version.0 + 1);
    }

    /// Registers a node, or updates its address. Counts as a heartbeat for
    /// liveness, but reports no targets.
    pub fn register(
        &mut self,
        node: NodeId,
        addr: &str,
        now: Duration,
    ) -> Result<RoutingVersion, MgmtError> {
        // The address is persisted and sent to every client in each routing
        // reply: a bad one must not get in.
        if let Err(error) = flyfs_proto::addr::parse_address(addr) {
            return Err(invalid(format!(
                "{node:?} registers with a bad address: {error}"
            )));
        }
        match self.record.nodes.get_mut(&node) {
            Some(known) if known.addr == addr => {}
            Some(known) => {
                known.addr = addr.to_string();
                self.bump();
            }
            None => {
                self.record.nodes.insert(
                    node,
                    NodeRecord {
                        addr: addr.to_string(),
                    },
                );
                // A new node is published alive together with its addition.
                self.alive.insert(node);
                self.bump();
            }
        }
        let known = self.liveness.get(&node);
        let heard = known.is_some_and(|l| l.heard);
        let routing_version = known.map_or(RoutingVersion(0), |l| l.routing_version);
        self.liveness.insert(
            node,
            Liveness {
                last_heartbeat: now,
                heard,
                routing_version,
            },
        );
        Ok(self.record.routing_version)
    }

    /// A node's heartbeat: liveness and its targets' local states. Registers
    /// an unknown node (it must then carry an address). Targets the manager
    /// does not know, or that belong to another node, are ignored: an admin
    /// creates targets. Known targets of the node missing from the report
    /// count as offline. Chains are re-evaluated by the next [`tick`].
    ///
    /// [`tick`]: Cluster::tick
    pub fn heartbeat(
        &mut self,
        req: &HeartbeatReq,
        now: Duration,
    ) -> Result<RoutingVersion, MgmtError> {
        let addr = match self.record.nodes.get(&req.node) {
            // An empty address in a heartbeat means "unchanged".
            Some(known) if req.addr.is_empty() => known.addr.clone(),
            _ => req.addr.clone(),
        };
        self.register(req.node, &addr, now)?;
        self.liveness.insert(
            req.node,
            Liveness {
                last_heartbeat: now,
                heard: true,
                // The latest report, not the highest: a restarted node holds
                // nothing yet.
                routing_version: req.routing_version,
            },
        );
        let own: Vec<TargetId> = self
            .record
            .targets
            .iter()
            .filter(|(_, t)| t.node == req.node)
            .map(|(id, _)| *id)
            .collect();
        for target in &own {
            self.reported.remove(target);
        }
        for report in &req.targets {
            let owned = self
                .record
                .targets
                .get(&report.target)
                .is_some_and(|t| t.node == req.node);
            if !owned {
                tracing::debug!(node = ?req.node, target = ?report.target, "heartbeat reports a target the manager does not assign to this node; ignored");
                continue;
            }
            let local = self.trusted_local(report);
            self.reported.insert(report.target, local);
            // A fenced storage node reports its target online (it knows it
            // needs a sync); that ends the admin's offline override. It keeps
            // reporting up-to-date until it has seen the fence, so that
            // cannot be the signal.
            if report.local == LocalState::Online {
                self.forced_offline.remove(&report.target);
            }
        }
        Ok(self.record.routing_version)
    }

    /// The local state to act on for `report`. An up-to-date claim made
    /// under an older version of the target's chain than the current one,
    /// for a target the chain does not count as serving, is taken as
    /// online: the claim predates the change that took the target out (a
    /// heartbeat sent before it, resent, or delayed in the network and
    /// delivered after newer ones), so it says nothing of a resync since.
    /// Believed, it made a syncing target serve without any resync, and a
    /// resync from it then removed the chain's acknowledged writes from
    /// the others (docs/chaos.md, "30-minute soaks"). A fresh claim carries
    /// the current version once the node has the current routing, which the
    /// heartbeat's answer makes it fetch. A report without a version (0, an
    /// older node) is believed as before.
    fn trusted_local(&self, report: &TargetReport) -> LocalState {
        if report.local != LocalState::UpToDate || report.chain_version.0 == 0 {
            return report.local;
        }
        let chain = self
            .record
            .targets
            .get(&report.target)
            .and_then(|t| t.chain)
            .and_then(|c| self.record.chains.get(&c));
        let Some(chain) = chain else {
            return report.local;
        };
        let out_of_service = chain
            .targets
            .iter()
            .find(|m| m.target == report.target)
            .is_some_and(|m| {
                matches!(
                    m.state,
                    PublicState::Syncing | PublicState::Waiting | PublicState::Offline
                )
            });
        if out_of_service && report.chain_version < chain.version {
            tracing::info!(
                target = ?report.target,
                reported = ?report.chain_version,
                current = ?chain.version,
                "an up-to-date report older than the chain's current version; taken as online"
            );
            return LocalState::Online;
        }
        report.local
    }

    /// Admin: declares a target on device `disk` of a known node.
    pub fn create_target(
        &mut self,
        target: TargetId,
        node: NodeId,
        disk: u32,
    ) -> Result<(), MgmtError> {
        if self.record.targets.contains_key(&target) {
            return Err(MgmtError::AlreadyExists {
                what: format!("{target:?}"),
            });
        }
        if !self.record.nodes.contains_key(&node) {
            return Err(not_found(node));
        }
        self.record.targets.insert(
            target,
            TargetRecord {
                node,
                disk,
                chain: None,
                replaces: None,
                leaving: None,
            },
        );
        self.bump();
        Ok(())
    }

    /// Admin: builds a chain (head first) from existing, unassigned targets
    /// on distinct nodes. Its targets start serving at version 1, as in 3FS:
    /// a new chain holds no data, so every member is trivially up to date.
    pub fn create_chain(&mut self, chain: ChainId, targets: &[TargetId]) -> Result<(), MgmtError> {
        if self.record.chains.contains_key(&chain) {
            return Err(MgmtError::AlreadyExists {
                what: format!("{chain:?}"),
            });
        }
        if targets.is_empty() {
            return Err(invalid(format!("{chain:?} needs at least one target")));
        }
        let mut nodes = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for target in targets {
            if !seen.insert(*target) {
                return Err(invalid(format!("{target:?} appears twice in {chain:?}")));
            }
            let record = self
                .record
                .targets
                .get(target)
                .ok_or_else(|| not_found(target))?;
            if let Some(other) = record.chain {
                return Err(invalid(format!("{target:?} already belongs to {other:?}")));
            }
            if !nodes.insert(record.node) {
                return Err(invalid(format!(
                    "two targets of {chain:?} on {:?}: a node failure would take both",
                    record.node
                )));
            }
        }
        for target in targets {
            if let Some(record) = self.record.targets.get_mut(target) {
                record.chain = Some(chain);
            }
        }
        let members = targets
            .iter()
            .map(|&target| ChainTarget {
                target,
                state: PublicState::Serving,
            })
            .collect();
        self.record.chains.insert(
            chain,
            ChainInfo {
                id: chain,
                version: ChainVersion(1),
                targets: members,
            },
        );
        self.bump();
        Ok(())
    }

    /// Admin: a chain table over existing chains (each at most once).
    pub fn create_chain_table(
        &mut self,
        table: ChainTableId,
        chains: &[ChainId],
    ) -> Result<(), MgmtError> {
        if self.record.tables.contains_key(&table) {
            return Err(MgmtError::AlreadyExists {
                what: format!("{table:?}"),
            });
        }
        if chains.is_empty() {
            return Err(invalid(format!("{table:?} needs at least one chain")));
        }
        let mut seen = BTreeSet::new();
        for chain in chains {
            if !seen.insert(*chain) {
                return Err(invalid(format!("{chain:?} appears twice in {table:?}")));
            }
            if !self.record.chains.contains_key(chain) {
                return Err(not_found(chain));
            }
        }
        self.record.tables.insert(
            table,
            ChainTable {
                id: table,
                version: 1,
                chains: chains.to_vec(),
            },
        );
        self.bump();
        Ok(())
    }

    /// Admin: adds an unassigned target to the end of `chain`. It joins
    /// `Waiting`: once its node reports it (a node learning a target of a
    /// chain that exists already sees itself fenced and asks for a sync), the
    /// transition table makes it syncing behind the chain's last serving
    /// member, which fills it, and then serving. Its node must not hold
    /// another member of the chain.
    pub fn add_chain_member(&mut self, chain: ChainId, target: TargetId) -> Result<(), MgmtError> {
        let record = self
            .record
            .targets
            .get(&target)
            .ok_or_else(|| not_found(target))?;
        if let Some(other) = record.chain {
            return Err(invalid(format!("{target:?} already belongs to {other:?}")));
        }
        let node = record.node;
        let info = self
            .record
            .chains
            .get(&chain)
            .ok_or_else(|| not_found(chain))?;
        if let Some(clash) = info
            .targets
            .iter()
            .find(|member| self.record.targets.get(&member.target).map(|t| t.node) == Some(node))
        {
            return Err(invalid(format!(
                "{node:?} already holds {:?} of {chain:?}: a node failure would take both",
                clash.target
            )));
        }
        let mut next = info.clone();
        next.version = ChainVersion(next.version.0.wrapping_add(1));
        next.targets.push(ChainTarget {
            target,
            state: PublicState::Waiting,
        });
        // Waiting ranks before lastsrv and offline members: keep the order
        // the transition table keeps.
        next.targets.sort_by_key(|member| member.state.rank());
        self.record.chains.insert(chain, next);
        if let Some(record) = self.record.targets.get_mut(&target) {
            record.chain = Some(chain);
        }
        self.bump();
        Ok(())
    }

    /// Admin: takes `target` out of `chain`, which keeps serving from the
    /// rest. Refused when no serving member would be left (the chain's data
    /// would go with it): add and sync a replacement first. The target stays
    /// declared and unassigned; its node stops serving it when it sees the
    /// new routing.
    ///
    /// A member that serves while its node is alive is not cut out of the
    /// write path at once: its node, until it sees the change, would go on
    /// answering reads under the older chain version, with the versions
    /// committed before the next write, which the chain would then commit
    /// without it (a stale read). So it first becomes syncing, still
    /// written, no longer readable ([`Leave::Pending`], the chain version
    /// and routing version bumped), and [`tick`](Cluster::tick) takes it out
    /// once its node holds that routing or has been silent past the failure
    /// timeout (its lease, at most half of that, has then lapsed). Asking
    /// again while it leaves changes nothing. Any other member (syncing,
    /// waiting, offline, or on a node declared dead) leaves at once: it
    /// answers no reads.
    pub fn remove_chain_member(
        &mut self,
        chain: ChainId,
        target: TargetId,
        now: Duration,
    ) -> Result<Leave, MgmtError> {
        let info = self
            .record
            .chains
            .get(&chain)
            .ok_or_else(|| not_found(chain))?;
        let Some(member) = info.targets.iter().find(|m| m.target == target).copied() else {
            return Err(invalid(format!("{target:?} is not a member of {chain:?}")));
        };
        if !info
            .targets
            .iter()
            .any(|m| m.target != target && m.state == PublicState::Serving)
        {
            return Err(invalid(format!(
                "{chain:?} would have no serving member left without {target:?}: \
                 add a replacement and wait until it serves"
            )));
        }
        if self.leaving_since(target).is_some() {
            // Already on its way out (an admin's offline under way becomes
            // a removal, from the routing version that made it syncing).
            if let Some(since) = self.demoting.remove(&target)
                && let Some(record) = self.record.targets.get_mut(&target)
            {
                record.leaving = Some(since);
                self.bump();
            }
            return Ok(Leave::Pending);
        }
        if member.state == PublicState::Serving && self.may_answer_reads(target, now) {
            let since = self.demote(chain, target);
            if let Some(record) = self.record.targets.get_mut(&target) {
                record.leaving = Some(since);
            }
            tracing::info!(
                ?chain,
                ?target,
                routing_version = since.0,
                "leaving: syncing until its node has seen it"
            );
            return Ok(Leave::Pending);
        }
        self.cut(chain, target);
        Ok(Leave::Done)
    }

    /// Where the removal of `target` from `chain` stands.
    pub fn leave_status(&self, chain: ChainId, target: TargetId) -> Leave {
        match self.record.targets.get(&target) {
            Some(record) if record.chain == Some(chain) => {
                if record.leaving.is_some() {
                    Leave::Pending
                } else {
                    Leave::Abandoned
                }
            }
            _ => Leave::Done,
        }
    }

    /// Whether an admin's offline of `target` is still waiting for its node
    /// to see it syncing.
    pub fn offline_pending(&self, target: TargetId) -> bool {
        self.demoting.contains_key(&target)
    }

    /// The routing version since which `target` has been syncing on its way
    /// out of the write path (a removal, or an admin's offline), if it is.
    fn leaving_since(&self, target: TargetId) -> Option<RoutingVersion> {
        self.record
            .targets
            .get(&target)
            .and_then(|t| t.leaving)
            .or_else(|| self.demoting.get(&target).copied())
    }

    /// Whether `target`'s node may still answer reads as a serving member
    /// of an older chain version: it is alive (heard from within the
    /// failure timeout), so its lease may hold.
    fn may_answer_reads(&self, target: TargetId, now: Duration) -> bool {
        self.record
            .targets
            .get(&target)
            .is_some_and(|t| self.node_alive(t.node, now))
    }

    /// Whether `target`'s node can no longer serve reads under a chain
    /// version older than routing version `since`: it said it holds `since`
    /// or later, or it has been silent past the failure timeout.
    fn has_seen(&self, target: TargetId, since: RoutingVersion, now: Duration) -> bool {
        let Some(node) = self.record.targets.get(&target).map(|t| t.node) else {
            return true;
        };
        !self.node_alive(node, now)
            || self
                .liveness
                .get(&node)
                .is_some_and(|l| l.routing_version >= since)
    }

    /// Makes serving member `target` of `chain` syncing: it stays in the
    /// write path and answers no reads. It goes after the other writable
    /// members (syncing ranks after serving), so a resync under way keeps
    /// its serving predecessor. Returns the routing version that first
    /// shows it so.
    fn demote(&mut self, chain: ChainId, target: TargetId) -> RoutingVersion {
        if let Some(info) = self.record.chains.get_mut(&chain)
            && let Some(at) = info.position(target)
        {
            let mut member = info.targets.remove(at);
            member.state = PublicState::Syncing;
            let end = info
                .targets
                .iter()
                .position(|m| !m.state.writable())
                .unwrap_or(info.targets.len());
            info.targets.insert(end, member);
            info.version = ChainVersion(info.version.0.wrapping_add(1));
            tracing::info!(?chain, version = ?info.version, targets = ?info.targets, "chain updated");
        }
        self.bump();
        self.record.routing_version
    }

    /// Takes `target` out of `chain` (the checks done).
    fn cut(&mut self, chain: ChainId, target: TargetId) {
        if let Some(info) = self.record.chains.get_mut(&chain) {
            info.targets.retain(|member| member.target != target);
            info.version = ChainVersion(info.version.0.wrapping_add(1));
        }
        if let Some(record) = self.record.targets.get_mut(&target) {
            record.chain = None;
            record.leaving = None;
        }
        self.forced_offline.remove(&target);
        self.demoting.remove(&target);
        self.reported.remove(&target);
        self.bump();
    }

    /// Finishes what [`remove_chain_member`](Self::remove_chain_member) and
    /// [`set_target_offline`](Self::set_target_offline) started: a leaving
    /// member whose node has seen it syncing leaves the write path. If no
    /// other member serves any more, the removal is given up instead (the
    /// member, up to date and always written, may be the chain's only
    /// copy: it serves again), and an offline is applied as asked.
    fn finish_leaving(&mut self, now: Duration) {
        let leaving: Vec<(TargetId, ChainId, RoutingVersion)> = self
            .record
            .targets
            .iter()
            .filter_map(|(id, t)| Some((*id, t.chain?, t.leaving?)))
            .collect();
        for (target, chain, since) in leaving {
            let others_serve = self.record.chains.get(&chain).is_some_and(|info| {
                info.targets
                    .iter()
                    .any(|m| m.target != target && m.state == PublicState::Serving)
            });
            if !others_serve {
                tracing::warn!(?chain, ?target, "removal given up: no other member serves");
                if let Some(record) = self.record.targets.get_mut(&target) {
                    record.leaving = None;
                }
                self.bump();
            } else if self.has_seen(target, since, now) {
                tracing::info!(?chain, ?target, "member removed");
                self.cut(chain, target);
            }
        }
        let demoting: Vec<(TargetId, RoutingVersion)> =
            self.demoting.iter().map(|(t, v)| (*t, *v)).collect();
        for (target, since) in demoting {
            if self.has_seen(target, since, now) {
                self.demoting.remove(&target);
                self.forced_offline.insert(target);
                // Shown no longer leaving, so nothing a node sees changes
                // without a new routing version.
                self.bump();
            }
        }
    }

    /// Admin: forgets a target that belongs to no chain (the last step of
    /// moving a replica off a node, before the node itself can be removed).
    pub fn remove_target(&mut self, target: TargetId) -> Result<(), MgmtError> {
        let record = self
            .record
            .targets
            .get(&target)
            .ok_or_else(|| not_found(target))?;
        if let Some(chain) = record.chain {
            return Err(invalid(format!(
                "{target:?} belongs to {chain:?}: take it out of the chain first"
            )));
        }
        self.record.targets.remove(&target);
        self.forced_offline.remove(&target);
        self.reported.remove(&target);
        self.bump();
        Ok(())
    }

    /// Admin: forces a target's local state offline until its node reports
    /// it `Online` (which a storage node does once it saw itself fenced),
    /// and re-evaluates the chains at once, so that when this returns
    /// `true` the change is in the record. A serving member on a live node
    /// goes through syncing first, as a removal does (see
    /// [`remove_chain_member`](Self::remove_chain_member)), unless it is its
    /// chain's only serving member (then no write can commit without it):
    /// `false`, and [`offline_pending`](Self::offline_pending) says when
    /// it is done.
    pub fn set_target_offline(
        &mut self,
        target: TargetId,
        now: Duration,
    ) -> Result<bool, MgmtError> {
        let record = self
            .record
            .targets
            .get(&target)
            .ok_or_else(|| not_found(target))?;
        if let Some(chain) = record.chain
            && record.leaving.is_some()
        {
            return Err(invalid(format!(
                "{target:?} is being removed from {chain:?}"
            )));
        }
        if self.demoting.contains_key(&target) {
            return Ok(false);
        }
        let serving_among_others = record.chain.and_then(|chain| {
            let info = self.record.chains.get(&chain)?;
            let serving = info
                .targets
                .iter()
                .any(|m| m.target == target && m.state == PublicState::Serving);
            let others = info
                .targets
                .iter()
                .any(|m| m.target != target && m.state == PublicState::Serving);
            (serving && others).then_some(chain)
        });
        if let Some(chain) = serving_among_others
            && self.may_answer_reads(target, now)
        {
            let since = self.demote(chain, target);
            self.demoting.insert(target, since);
            tracing::info!(
                ?chain,
                ?target,
                routing_version = since.0,
                "going offline: syncing until its node has seen it"
            );
            return Ok(false);
        }
        self.forced_offline.insert(target);
        self.tick(now);
        Ok(true)
    }

    /// Forgets a node. Refused while it heartbeats (stop its daemon first,
    /// or it would register again at once) and while any target is on it
    /// (the record would point at a node that does not exist).
    pub fn remove_node(&mut self, node: NodeId, now: Duration) -> Result<(), MgmtError> {
        if !self.record.nodes.contains_key(&node) {
            return Err(not_found(node));
        }
        if self.node_alive(node, now) {
            return Err(invalid(format!(
                "{node:?} is alive (heard from within the failure timeout of {:?}): stop its daemon first",
                self.failure_timeout
            )));
        }
        let hosted: Vec<TargetId> = self
            .record
            .targets
            .iter()
            .filter(|(_, target)| target.node == node)
            .map(|(id, _)| *id)
            .collect();
        if !hosted.is_empty() {
            return Err(invalid(format!("{node:?} still hosts {hosted:?}")));
        }
        self.record.nodes.remove(&node);
        self.alive.remove(&node);
        self.liveness.remove(&node);
        self.bump();
        Ok(())
    }

    fn node_alive(&self, node: NodeId, now: Duration) -> bool {
        self.liveness
            .get(&node)
            .is_some_and(|l| now.saturating_sub(l.last_heartbeat) <= self.failure_timeout)
    }

    /// The local state the transition table sees for `target`, or `None`
    /// while it is unknown (its node has not reported since the manager
    /// started, and the grace period has not run out).
    pub fn local_state(&self, target: TargetId, now: Duration) -> Option<LocalState> {
        if self.forced_offline.contains(&target) {
            return Some(LocalState::Offline);
        }
        let record = self.record.targets.get(&target)?;
        if !self.node_alive(record.node, now) {
            return Some(LocalState::Offline);
        }
        if let Some(local) = self.reported.get(&target) {
            return Some(*local);
        }
        // A live node that has not reported this target yet has not learnt
        // of it (nodes learn their targets from the routing): its state is
        // unknown, so the chain waits rather than sending a brand-new
        // target through offline and a resync. A node that lost a target's
        // device reports it offline explicitly.
        None
    }

    /// Periodic re-evaluation: updates node liveness and every chain whose
    /// members' local states are all known. Returns whether the record
    /// changed (the caller must persist it before publishing).
    pub fn tick(&mut self, now: Duration) -> bool {
        let before = self.record.routing_version;
        let alive: BTreeSet<NodeId> = self
            .record
            .nodes
            .keys()
            .copied()
            .filter(|&node| self.node_alive(node, now))
            .collect();
        if alive != self.alive {
            self.alive = alive;
            self.bump();
        }
        self.finish_leaving(now);

        let mut updates = Vec::new();
        for chain in self.record.chains.values() {
            let mut locals = BTreeMap::new();
            let mut known = true;
            for member in &chain.targets {
                match self.local_state(member.target, now) {
                    Some(local) => {
                        locals.insert(member.target, local);
                    }
                    None => known = false,
                }
            }
            if !known {
                // A member's node has not reported since the manager
                // started: wait for it rather than guess.
                continue;
            }
            let local = |t: TargetId| locals.get(&t).copied().unwrap_or(LocalState::Offline);
            // A member on its way out is never made serving again.
            let leaving = |t: TargetId| self.leaving_since(t).is_some();
            if let Some(next) = update_chain_holding(chain, local, leaving) {
                updates.push(next);
            }
        }
        for next in updates {
            tracing::info!(chain = ?next.id, version = ?next.version, targets = ?next.targets, "chain updated");
            self.record.chains.insert(next.id, next);
            self.bump();
        }
        if let Some(after) = self.auto_replace {
            self.auto_replace_round(now, after);
        }
        self.record.routing_version != before
    }

    /// One round of automatic replacement. First, a replacement whose new
    /// member serves ends: the member it replaces leaves the chain and is
    /// forgotten. Then, in each chain without a replacement under way, the
    /// first member publicly offline for at least `after` gets one: a new
    /// target where [`placement::replacement_for`] says, added to the chain
    /// (it joins waiting and a resync fills it). One replacement per chain
    /// at a time, so a chain never copies its data to two new members at
    /// once; a chain whose replacement cannot be placed (no live node
    /// outside it) is tried again every round.
    fn auto_replace_round(&mut self, now: Duration, after: Duration) {
        let offline: BTreeSet<TargetId> = self
            .record
            .chains
            .values()
            .flat_map(|chain| chain.targets.iter())
            .filter(|member| member.state == PublicState::Offline)
            .map(|member| member.target)
            .collect();
        self.offline_since
            .retain(|target, _| offline.contains(target));
        for target in &offline {
            self.offline_since.entry(*target).or_insert(now);
        }

        // A replacement whose new member has itself been offline that long
        // (its node died or was drained away before the resync filled it)
        // is given up: the new member leaves and is forgotten, so that the
        // chain is not left waiting for it forever and may get another
        // replacement (sim seed 4852). Only while another member serves:
        // otherwise the chain keeps everything it has.
        let stalled: Vec<(TargetId, ChainId)> = self
            .record
            .targets
            .iter()
            .filter_map(|(id, record)| Some((*id, record.chain?, record.replaces?)))
            .filter(|(id, _, _)| {
                self.offline_since
                    .get(id)
                    .is_some_and(|since| now.saturating_sub(*since) >= after)
            })
            .map(|(id, chain, _)| (id, chain))
            .collect();
        for (new, chain) in stalled {
            if !matches!(self.remove_chain_member(chain, new, now), Ok(Leave::Done)) {
                continue;
            }
            let _ = self.remove_target(new);
            self.bump();
            tracing::warn!(?chain, ?new, offline_for = ?after, "automatic replacement given up: the new member is offline too");
        }

        let finished: Vec<(TargetId, ChainId, TargetId)> = self
            .record
            .targets
            .iter()
            .filter_map(|(id, record)| Some((*id, record.chain?, record.replaces?)))
            .filter(|(id, chain, _)| {
                self.record.chains.get(chain).is_some_and(|info| {
                    info.targets
                        .iter()
                        .any(|m| m.target == *id && m.state == PublicState::Serving)
                })
            })
            .collect();
        for (new, chain, old) in finished {
            let still_member = self
                .record
                .chains
                .get(&chain)
                .is_some_and(|info| info.targets.iter().any(|m| m.target == old));
            if still_member {
                match self.remove_chain_member(chain, old, now) {
                    Ok(Leave::Done) => {}
                    // It served again (its node came back): it leaves once
                    // its node has seen it syncing, in a later round.
                    Ok(Leave::Pending | Leave::Abandoned) => continue,
                    Err(error) => {
                        tracing::warn!(?chain, ?old, %error, "automatic replacement: cannot remove the replaced member yet");
                        continue;
                    }
                }
            }
            if self
                .record
                .targets
                .get(&old)
                .is_some_and(|t| t.chain.is_none())
            {
                let _ = self.remove_target(old);
            }
            if let Some(record) = self.record.targets.get_mut(&new) {
                record.replaces = None;
            }
            self.bump();
            tracing::warn!(?chain, ?old, ?new, "automatic replacement done");
        }

        let replacing: BTreeSet<ChainId> = self
            .record
            .targets
            .values()
            .filter(|record| record.replaces.is_some())
            .filter_map(|record| record.chain)
            .collect();
        let due: Vec<(ChainId, TargetId)> = self
            .record
            .chains
            .values()
            .filter(|chain| !replacing.contains(&chain.id))
            .filter_map(|chain| {
                chain
                    .targets
                    .iter()
                    .find(|m| {
                        self.offline_since
                            .get(&m.target)
                            .is_some_and(|since| now.saturating_sub(*since) >= after)
                    })
                    .map(|m| (chain.id, m.target))
            })
            .collect();
        for (chain, old) in due {
            let Some(from) = self.record.targets.get(&old).map(|t| t.node) else {
                continue;
            };
            let routing = self.routing();
            let Some((node, disk)) = placement::replacement_for(&routing, chain, from) else {
                continue;
            };
            let Some(new) = placement::next_target_id(&routing, node, disk) else {
                continue;
            };
            if self.create_target(new, node, disk).is_err()
                || self.add_chain_member(chain, new).is_err()
            {
                continue;
            }
            if let Some(record) = self.record.targets.get_mut(&new) {
                record.replaces = Some(old);
            }
            tracing::warn!(?chain, ?old, ?new, ?node, disk, offline_for = ?after, "automatic replacement started");
        }
    }

    /// The routing information as of the last change.
    pub fn routing(&self) -> RoutingInfo {
        let nodes = self
            .record
            .nodes
            .iter()
            .map(|(&id, node)| NodeInfo {
                id,
                addr: node.addr.clone(),
                alive: self.alive.contains(&id),
            })
            .collect();
        let targets = self
            .record
            .targets
            .iter()
            .map(|(&id, target)| {
                let state = target
                    .chain
                    .and_then(|c| self.record.chains.get(&c))
                    .and_then(|c| c.targets.iter().find(|m| m.target == id))
                    .map_or(PublicState::Offline, |m| m.state);
                TargetInfo {
                    id,
                    node: target.node,
                    disk: target.disk,
                    chain: target.chain,
                    state,
                    leaving: self.leaving_since(id).is_some(),
                }
            })
            .collect();
        RoutingInfo {
            version: self.record.routing_version,
            nodes,
            targets,
            chains: self.record.chains.values().cloned().collect(),
            tables: self.record.tables.values().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LocalState as L;
    use PublicState as P;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn hb(node: u32, targets: &[(u64, LocalState)]) -> HeartbeatReq {
        hb_holding(node, targets, RoutingVersion(0))
    }

    /// A heartbeat from a node holding routing version `routing_version`.
    fn hb_holding(
        node: u32,
        targets: &[(u64, LocalState)],
        routing_version: RoutingVersion,
    ) -> HeartbeatReq {
        HeartbeatReq {
            routing_version,
            node: NodeId(node),
            addr: format!("10.0.0.{node}:9000"),
            targets: targets
                .iter()
                .map(|&(t, local)| TargetReport {
                    target: TargetId(t),
                    local,
                    used_bytes: 0,
                    chain_version: ChainVersion(0),
                })
                .collect(),
            syncs: Vec::new(),
        }
    }

    /// Three nodes, target `n` on node `n`, chain 1 = [1, 2, 3], table 1.
    fn three_node_cluster() -> Cluster {
        let mut c = Cluster::new(TIMEOUT);
        for n in 1..=3 {
            c.register(NodeId(n), &format!("10.0.0.{n}:9000"), secs(0))
                .expect("register");
            c.create_target(TargetId(n.into()), NodeId(n), 0)
                .expect("create target");
        }
        c.create_chain(ChainId(1), &[TargetId(1), TargetId(2), TargetId(3)])
            .expect("create chain");
        c.create_chain_table(ChainTableId(1), &[ChainId(1)])
            .expect("create table");
        c
    }

    fn heartbeat_all(c: &mut Cluster, now: Duration, states: [LocalState; 3]) {
        for (i, local) in states.into_iter().enumerate() {
            let n = i as u32 + 1;
            c.heartbeat(&hb(n, &[(n.into(), local)]), now)
                .expect("heartbeat");
        }
    }

    fn members(c: &Cluster) -> Vec<(u64, PublicState)> {
        c.routing()
            .chain(ChainId(1))
            .expect("chain 1")
            .targets
            .iter()
            .map(|m| (m.target.0, m.state))
            .collect()
    }

    /// The chain version of chain 1.
    fn version(c: &Cluster) -> ChainVersion {
        c.routing().chain(ChainId(1)).expect("chain 1").version
    }

    /// A heartbeat of node `n` for its target `n`, judged against
    /// `chain_version`.
    fn report(n: u32, local: LocalState, chain_version: ChainVersion) -> HeartbeatReq {
        HeartbeatReq {
            targets: vec![TargetReport {
                target: TargetId(n.into()),
                local,
                used_bytes: 0,
                chain_version,
            }],
            ..hb(n, &[])
        }
    }

    /// The chaos soak's lost writes (docs/chaos.md, "30-minute soaks"): a
    /// heartbeat a node sent while its target served, delivered late (it
    /// sat in a connection cut by a partition, and TCP sent it again after
    /// newer heartbeats had arrived), claimed up to date while the target
    /// was syncing after the manager had taken it out; the target served
    /// without a resync, missing the writes its chain took meanwhile, and
    /// its resync of the next member removed them there too. Such a claim
    /// predates the chain's current version and must not end the resync; a
    /// claim made under the current version (after a resync) does.
    #[test]
    fn a_late_up_to_date_heartbeat_does_not_end_a_resync() {
        let mut c = three_node_cluster();
        heartbeat_all(&mut c, secs(1), [L::UpToDate; 3]);
        c.tick(secs(1));
        assert_eq!(
            members(&c),
            [(1, P::Serving), (2, P::Serving), (3, P::Serving)]
        );
        // Sent while target 2 served; it will arrive late.
        let late = report(2, L::UpToDate, version(&c));

        // Node 2 falls silent past the failure timeout: taken out.
        for t in [5, 10, 12] {
            for n in [1, 3] {
                c.heartbeat(&report(n, L::UpToDate, version(&c)), secs(t))
                    .expect("heartbeat");
            }
            c.tick(secs(t));
        }
        assert_eq!(
            members(&c),
            [(1, P::Serving), (3, P::Serving), (2, P::Offline)]
        );
        // It sees the fence and comes back asking for a resync.
        for t in [13, 14] {
            c.heartbeat(&report(2, L::Online, version(&c)), secs(t))
                .expect("heartbeat");
            for n in [1, 3] {
                c.heartbeat(&report(n, L::UpToDate, version(&c)), secs(t))
                    .expect("heartbeat");
            }
            c.tick(secs(t));
        }
        assert_eq!(
            members(&c),
            [(1, P::Serving), (3, P::Serving), (2, P::Syncing)]
        );
        let syncing = version(&c);

        // The old heartbeat arrives now: the resync goes on.
        c.heartbeat(&late, secs(15)).expect("heartbeat");
        c.tick(secs(15));
        assert_eq!(
            members(&c),
            [(1, P::Serving), (3, P::Serving), (2, P::Syncing)]
        );
        assert_eq!(version(&c), syncing);

        // The resync done, node 2 says so under the current version.
        c.heartbeat(&report(2, L::UpToDate, syncing), secs(16))
            .expect("heartbeat");
        c.tick(secs(16));
        assert_eq!(
            members(&c),
            [(1, P::Serving), (3, P::Serving), (2, P::Serving)]
        );
    }

    /// Replacing the replica of a node that died: a fourth node's target
    /// joins waiting, syncs behind the serving members once its node
    /// reports it, serves, and then the dead member leaves; every step
    /// raises the chain version, and the dead node can then be forgotten.
    #[test]
    fn a_dead_member_is_replaced_through_a_resync() {
        let mut c = three_node_cluster();
        let up = LocalState::UpToDate;
        heartbeat_all(&mut c, secs(1), [up; 3]);
        c.tick(secs(1));
        c.register(NodeId(4), "10.0.0.4:9000", secs(1))
            .expect("register");
        c.heartbeat(&hb(4, &[]), secs(1)).expect("heartbeat");
        // Node 3 dies.
        let later = secs(2) + TIMEOUT;
        for n in 1..=2 {
            c.heartbeat(&hb(n, &[(n.into(), up)]), later)
                .expect("heartbeat");
        }
        c.heartbeat(&hb(4, &[]), later).expect("heartbeat");
        c.tick(later);
        assert_eq!(
            members(&c),
            [
                (1, PublicState::Serving),
                (2, PublicState::Serving),
                (3, PublicState::Offline)
            ]
        );
        let version = c.routing().chain(ChainId(1)).expect("chain").version;

        c.create_target(TargetId(4), NodeId(4), 0).expect("target");
        let clash = c.add_chain_member(ChainId(1), TargetId(3));
        assert!(
            matches!(&clash, Err(MgmtError::Invalid { reason }) if reason.contains("already belongs")),
            "{clash:?}"
        );
        c.add_chain_member(ChainId(1), TargetId(4)).expect("add");
        assert_eq!(
            members(&c),
            [
                (1, PublicState::Serving),
                (2, PublicState::Serving),
                (4, PublicState::Waiting),
                (3, PublicState::Offline)
            ]
        );
        let added = c.routing().chain(ChainId(1)).expect("chain").version;
        assert!(added > version);
        // Node 4 learns its target, fences itself and asks for a sync.
        c.heartbeat(&hb(4, &[(4, LocalState::Online)]), later)
            .expect("heartbeat");
        c.tick(later);
        assert_eq!(members(&c)[2], (4, PublicState::Syncing));
        c.heartbeat(&hb(4, &[(4, up)]), later).expect("heartbeat");
        c.tick(later);
        assert_eq!(members(&c)[2], (4, PublicState::Serving));

        assert_eq!(
            c.remove_chain_member(ChainId(1), TargetId(3), later),
            Ok(Leave::Done),
            "an offline member leaves at once"
        );
        assert_eq!(
            members(&c),
            [
                (1, PublicState::Serving),
                (2, PublicState::Serving),
                (4, PublicState::Serving)
            ]
        );
        assert!(c.routing().chain(ChainId(1)).expect("chain").version > added);
        let refused = c.remove_node(NodeId(3), later);
        assert!(
            matches!(&refused, Err(MgmtError::Invalid { reason }) if reason.contains("still hosts")),
            "{refused:?}"
        );
        c.remove_target(TargetId(3)).expect("forget the target");
        c.remove_node(NodeId(3), later).expect("forget the node");
        c.record().check().expect("the record stays consistent");
    }

    /// Issue 20 (sim seeds 1416, 1462, 1886): a serving member taken out
    /// of its chain by an admin while its node is alive. Its node, until it
    /// sees the change, answers reads under the chain version before as a
    /// serving member; had the chain dropped it at once, the next write
    /// would commit without it and such a read return the version before (a
    /// stale read). So it stays in the write path, syncing (writable, not
    /// readable), until its node heartbeats holding that routing; asking
    /// again meanwhile changes nothing.
    #[test]
    fn a_serving_member_leaves_only_once_its_node_has_seen_it_unreadable() {
        let mut c = three_node_cluster();
        heartbeat_all(&mut c, secs(1), [L::UpToDate; 3]);
        c.tick(secs(1));
        let before = c.routing().chain(ChainId(1)).cloned().expect("chain 1");

        assert_eq!(
            c.remove_chain_member(ChainId(1), TargetId(1), secs(1)),
            Ok(Leave::Pending)
        );
        let since = c.routing_version();
        let chain = c.routing().chain(ChainId(1)).cloned().expect("chain 1");
        assert!(chain.version > before.version);
        // Still written (and last: the serving members keep their order),
        // no longer read.
        assert_eq!(
            members(&c),
            [(2, P::Serving), (3, P::Serving), (1, P::Syncing)]
        );
        let routing = c.routing();
        let target = routing.target(TargetId(1)).expect("target 1");
        assert_eq!(
            (target.chain, target.state, target.leaving),
            (Some(ChainId(1)), P::Syncing, true)
        );
        assert_eq!(c.leave_status(ChainId(1), TargetId(1)), Leave::Pending);
        c.record().check().expect("the record stays consistent");

        // Node 1 keeps heartbeating, up to date, from the routing before:
        // it stays in the write path and is never made serving again.
        for t in 2..=5 {
            for n in 1..=3u32 {
                let holds = if n == 1 {
                    RoutingVersion(since.0 - 1)
                } else {
                    since
                };
                c.heartbeat(&hb_holding(n, &[(n.into(), L::UpToDate)], holds), secs(t))
                    .expect("hb");
            }
            assert!(!c.tick(secs(t)), "nothing moves before node 1 has seen it");
            assert_eq!(
                c.remove_chain_member(ChainId(1), TargetId(1), secs(t)),
                Ok(Leave::Pending),
                "asking again changes nothing"
            );
            assert_eq!(c.routing_version(), since);
        }

        // It has seen it: out.
        c.heartbeat(&hb_holding(1, &[(1, L::UpToDate)], since), secs(6))
            .expect("hb");
        assert!(c.tick(secs(6)));
        assert_eq!(members(&c), [(2, P::Serving), (3, P::Serving)]);
        assert_eq!(c.leave_status(ChainId(1), TargetId(1)), Leave::Done);
        let routing = c.routing();
        let target = routing.target(TargetId(1)).expect("target 1");
        assert_eq!((target.chain, target.leaving), (None, false));
        c.remove_target(TargetId(1)).expect("then forgotten");
        c.record().check().expect("the record stays consistent");
    }

    /// A leaving member whose node falls silent leaves once the failure
    /// timeout has passed (its lease, at most half of that, has lapsed);
    /// one on a node already declared dead leaves at once.
    #[test]
    fn a_leaving_member_of_a_silent_node_leaves_after_the_failure_timeout() {
        let mut c = three_node_cluster();
        heartbeat_all(&mut c, secs(1), [L::UpToDate; 3]);
        c.tick(secs(1));
        assert_eq!(
            c.remove_chain_member(ChainId(1), TargetId(2), secs(1)),
            Ok(Leave::Pending)
        );
        let since = c.routing_version();
        // Node 2 is never heard from again.
        let beat = |c: &mut Cluster, t: Duration| {
            for n in [1u32, 3] {
                c.heartbeat(&hb_holding(n, &[(n.into(), L::UpToDate)], since), t)
                    .expect("hb");
            }
            c.tick(t)
        };
        beat(&mut c, secs(1) + TIMEOUT);
        assert_eq!(c.leave_status(ChainId(1), TargetId(2)), Leave::Pending);
        beat(&mut c, secs(2) + TIMEOUT);
        assert_eq!(c.leave_status(ChainId(1), TargetId(2)), Leave::Done);
        assert_eq!(members(&c), [(1, P::Serving), (3, P::Serving)]);

        // Dead already: no waiting.
        let mut c = three_node_cluster();
        heartbeat_all(&mut c, secs(1), [L::UpToDate; 3]);
        for n in [1u32, 3] {
            c.heartbeat(&hb(n, &[(n.into(), L::UpToDate)]), secs(2) + TIMEOUT)
                .expect("hb");
        }
        assert_eq!(
            c.remove_chain_member(ChainId(1), TargetId(2), secs(2) + TIMEOUT),
            Ok(Leave::Done)
        );
    }

    /// A removal under way is in the record: a manager that restarts (or
    /// a standby that takes over) keeps the member leaving, syncing, until
    /// its node shows it has seen that.
    #[test]
    fn a_removal_under_way_survives_a_manager_restart() {
        let mut c = three_node_cluster();
        heartbeat_all(&mut c, secs(1), [L::UpToDate; 3]);
        c.tick(secs(1));
        assert_eq!(
            c.remove_chain_member(ChainId(1), TargetId(3), secs(1)),
            Ok(Leave::Pending)
        );
        let since = c.routing_version();
        let saved = c.record().clone();
        assert_eq!(saved.targets[&TargetId(3)].leaving, Some(since));
        let bytes = rmp_serde::to_vec_named(&saved).expect("encode");
        let loaded: ClusterRecord = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(loaded, saved);

        let mut r = Cluster::from_record(loaded, TIMEOUT, secs(0));
        assert_eq!(r.leave_status(ChainId(1), TargetId(3)), Leave::Pending);
        assert!(r.routing().target(TargetId(3)).expect("target 3").leaving);
        // Up to date, but leaving: not made serving again.
        heartbeat_all(&mut r, secs(1), [L::UpToDate; 3]);
        r.tick(secs(1));
        assert_eq!(
            members(&r),
            [(1, P::Serving), (2, P::Serving), (3, P::Syncing)]
        );
        let holds = r.routing_version();
        r.heartbeat(&hb_holding(3, &[(3, L::UpToDate)], holds), secs(2))
            .expect("hb");
        assert!(r.tick(secs(2)));
        assert_eq!(r.leave_status(ChainId(1), TargetId(3)), Leave::Done);
        assert_eq!(members(&r), [(1, P::Serving), (2, P::Serving)]);
    }

    /// A removal is given up when the other members stop serving before
    /// it is done: the leaving member, up to date and always written, may
    /// hold the chain's only copy, and serves again.
    #[test]
    fn a_removal_is_given_up_when_no_other_member_serves() {
        let mut c = three_node_cluster();
        heartbeat_all(&mut c, secs(1), [L::UpToDate; 3]);
        c.tick(secs(1));
        assert_eq!(
            c.remove_chain_member(ChainId(1), TargetId(1), secs(1)),
            Ok(Leave::Pending)
        );
        // Nodes 2 and 3 die; node 1 never shows it has seen the change.
        for t in [secs(2) + TIMEOUT, secs(3) + TIMEOUT] {
            c.heartbeat(&hb(1, &[(1, L::UpToDate)]), t).expect("hb");
            c.tick(t);
        }
        assert_eq!(c.leave_status(ChainId(1), TargetId(1)), Leave::Abandoned);
        assert_eq!(members(&c)[0], (1, P::Serving));
        assert!(!c.routing().target(TargetId(1)).expect("target 1").leaving);
        c.record().check().expect("the record stays consistent");
    }

    /// With automatic replacement on, a member offline for the configured
    /// time gets a new target on the live node outside its chain, which a
    /// resync fills; once it serves the offline member leaves and is
    /// forgotten. Off (the default), nothing happens however long a member
    /// stays offline.
    #[test]
    fn a_member_offline_too_long_is_replaced_automatically_when_asked() {
        let after = secs(30);
        let up = LocalState::UpToDate;
        for auto in [None, Some(after)] {
            let mut c = three_node_cluster();
            c.set_auto_replace(auto);
            c.register(NodeId(4), "10.0.0.4:9000", secs(0))
                .expect("register");
            heartbeat_all(&mut c, secs(0), [up; 3]);
            c.heartbeat(&hb(4, &[]), secs(0)).expect("heartbeat");
            c.tick(secs(0));
            // Node 3 dies; the others keep heartbeating.
            let beat = |c: &mut Cluster, at: Duration, four: &[(u64, LocalState)]| {
                for n in 1..=2 {
                    c.heartbeat(&hb(n, &[(n.into(), up)]), at)
                        .expect("heartbeat");
                }
                c.heartbeat(&hb(4, four), at).expect("heartbeat");
                c.tick(at)
            };
            let dead = TIMEOUT + secs(1);
            beat(&mut c, dead, &[]);
            assert_eq!(members(&c)[2], (3, PublicState::Offline));
            beat(&mut c, dead + after - secs(1), &[]);
            assert_eq!(members(&c).len(), 3, "replaced before its time");
            beat(&mut c, dead + after, &[]);
            if auto.is_none() {
                beat(&mut c, dead + after * 100, &[]);
                assert_eq!(members(&c).len(), 3, "replaced although off");
                continue;
            }
            let new = 4_000_001;
            assert_eq!(members(&c)[2], (new, PublicState::Waiting));
            assert_eq!(members(&c)[3], (3, PublicState::Offline));
            let later = dead + after + secs(1);
            beat(&mut c, later, &[(new, LocalState::Online)]);
            assert_eq!(members(&c)[2], (new, PublicState::Syncing));
            // Only one replacement at a time: nothing more is added.
            assert_eq!(members(&c).len(), 4);
            beat(&mut c, later + secs(1), &[(new, up)]);
            beat(&mut c, later + secs(2), &[(new, up)]);
            assert_eq!(
                members(&c),
                [
                    (1, PublicState::Serving),
                    (2, PublicState::Serving),
                    (new, PublicState::Serving)
                ]
            );
            assert!(
                !c.record().targets.contains_key(&TargetId(3)),
                "the replaced target is forgotten"
            );
            assert_eq!(c.record().targets[&TargetId(new)].replaces, None);
            c.record().check().expect("the record stays consistent");
        }
    }

    #[test]
    fn membership_changes_refuse_what_would_lose_data_or_break_chains() {
        let mut c = three_node_cluster();
        c.register(NodeId(4), "10.0.0.4:9000", secs(0))
            .expect("register");
        c.create_target(TargetId(41), NodeId(1), 1).expect("target");
        c.create_target(TargetId(4), NodeId(4), 0).expect("target");
        let same_node = c.add_chain_member(ChainId(1), TargetId(41));
        assert!(
            matches!(&same_node, Err(MgmtError::Invalid { reason }) if reason.contains("a node failure would take both")),
            "{same_node:?}"
        );
        assert!(matches!(
            c.add_chain_member(ChainId(9), TargetId(4)),
            Err(MgmtError::NotFound { .. })
        ));
        assert!(matches!(
            c.add_chain_member(ChainId(1), TargetId(99)),
            Err(MgmtError::NotFound { .. })
        ));
        // The nodes never heartbeat: past the failure timeout they are dead,
        // and their members leave at once.
        let dead = TIMEOUT * 2;
        let stranger = c.remove_chain_member(ChainId(1), TargetId(4), dead);
        assert!(
            matches!(&stranger, Err(MgmtError::Invalid { reason }) if reason.contains("not a member")),
            "{stranger:?}"
        );
        let in_chain = c.remove_target(TargetId(1));
        assert!(
            matches!(&in_chain, Err(MgmtError::Invalid { reason }) if reason.contains("take it out of the chain first")),
            "{in_chain:?}"
        );
        // Two of three members may go; the last serving one may not.
        assert_eq!(
            c.remove_chain_member(ChainId(1), TargetId(1), dead),
            Ok(Leave::Done)
        );
        assert_eq!(
            c.remove_chain_member(ChainId(1), TargetId(2), dead),
            Ok(Leave::Done)
        );
        let last = c.remove_chain_member(ChainId(1), TargetId(3), dead);
        assert!(
            matches!(&last, Err(MgmtError::Invalid { reason }) if reason.contains("no serving member left")),
            "{last:?}"
        );
        // A waiting member is no copy of the data either.
        c.add_chain_member(ChainId(1), TargetId(4)).expect("add");
        let last = c.remove_chain_member(ChainId(1), TargetId(3), dead);
        assert!(matches!(&last, Err(MgmtError::Invalid { .. })), "{last:?}");
        c.record().check().expect("the record stays consistent");
    }

    #[test]
    fn a_node_is_removed_only_when_down_and_hosting_nothing() {
        let mut c = Cluster::new(TIMEOUT);
        c.register(NodeId(1), "a:1", secs(0)).expect("register");
        c.register(NodeId(2), "b:1", secs(0)).expect("register");
        c.create_target(TargetId(20), NodeId(2), 0).expect("target");
        let refused = c.remove_node(NodeId(1), secs(1));
        assert!(
            matches!(&refused, Err(MgmtError::Invalid { reason }) if reason.contains("alive")),
            "{refused:?}"
        );
        let later = secs(1) + TIMEOUT * 2;
        let refused = c.remove_node(NodeId(2), later);
        assert!(
            matches!(&refused, Err(MgmtError::Invalid { reason }) if reason.contains("still hosts")),
            "{refused:?}"
        );
        let before = c.routing().version;
        c.remove_node(NodeId(1), later)
            .expect("remove a dead node without targets");
        let routing = c.routing();
        assert!(routing.node(NodeId(1)).is_none());
        assert!(routing.version > before);
        assert!(matches!(
            c.remove_node(NodeId(1), later),
            Err(MgmtError::NotFound { .. })
        ));
        c.record()
            .check()
            .expect("the record still agrees with itself");
        // The node may come back later, as a new registration.
        c.register(NodeId(1), "a:2", later).expect("register again");
    }

    #[test]
    fn register_adds_then_updates_the_address_bumping_only_on_change() {
        let mut c = Cluster::new(TIMEOUT);
        let v1 = c.register(NodeId(1), "a:1", secs(0)).expect("register");
        assert_eq!(v1, RoutingVersion(1));
        assert_eq!(
            c.register(NodeId(1), "a:1", secs(1)),
            Ok(v1),
            "same address: no bump"
        );
        let v2 = c.register(NodeId(1), "a:2", secs(1)).expect("re-register");
        assert_eq!(v2, RoutingVersion(2));
        let routing = c.routing();
        let node = routing.node(NodeId(1)).expect("node");
        assert_eq!((node.addr.as_str(), node.alive), ("a:2", true));
        // Bad addresses are refused and change nothing: not the record, not
        // the routing version, not a known node's address.
        let huge = format!("{}:1", "a".repeat(1 << 20));
        for bad in ["", "a", "a:0", "a b:1", "\u{1b}[2J:1", huge.as_str()] {
            for node in [NodeId(1), NodeId(2)] {
                let refused = c.register(node, bad, secs(2));
                assert!(
                    matches!(&refused, Err(MgmtError::Invalid { reason }) if reason.contains("bad address")),
                    "{refused:?}"
                );
            }
        }
        let after = c.routing();
        assert_eq!(after.version, v2);
        assert_eq!(after.node(NodeId(1)).expect("node").addr, "a:2");
        assert!(after.node(NodeId(2)).is_none());
    }

    #[test]
    fn admin_ops_validate_their_input() {
        let mut c = three_node_cluster();
        let v = c.routing_version();
        assert_eq!(
            c.create_target(TargetId(1), NodeId(1), 0),
            Err(MgmtError::AlreadyExists {
                what: "target 1".into()
            })
        );
        assert_eq!(
            c.create_target(TargetId(9), NodeId(9), 0),
            Err(MgmtError::NotFound {
                what: "node 9".into()
            })
        );
        c.create_target(TargetId(4), NodeId(1), 1)
            .expect("second target on node 1");
        c.create_target(TargetId(5), NodeId(2), 1)
            .expect("second target on node 2");
        c.create_target(TargetId(6), NodeId(1), 2)
            .expect("third target on node 1");
        let after_targets = c.routing_version();
        assert_eq!(after_targets.0, v.0 + 3, "one bump per created target");

        let bad: [(&[u64], &str); 5] = [
            (&[], "empty"),
            (&[4, 4], "duplicate"),
            (&[4, 99], "unknown target"),
            (&[4, 1], "target already in a chain"),
            (&[4, 6], "two targets on one node"),
        ];
        for (targets, why) in bad {
            let ids: Vec<TargetId> = targets.iter().map(|&t| TargetId(t)).collect();
            assert!(
                c.create_chain(ChainId(2), &ids).is_err(),
                "{why} must be refused"
            );
        }
        assert!(matches!(
            c.create_chain(ChainId(1), &[TargetId(4)]),
            Err(MgmtError::AlreadyExists { .. })
        ));
        assert_eq!(
            c.routing_version(),
            after_targets,
            "refused requests change nothing"
        );
        assert!(!c.record().chains.contains_key(&ChainId(2)));
        assert_eq!(c.record().targets[&TargetId(4)].chain, None);

        c.create_chain(ChainId(2), &[TargetId(4), TargetId(5)])
            .expect("valid chain");
        let chain = c.routing().chain(ChainId(2)).cloned().expect("chain 2");
        assert_eq!(chain.version, ChainVersion(1));
        assert!(chain.targets.iter().all(|m| m.state == P::Serving));
        assert_eq!(
            c.routing().target(TargetId(5)).map(|t| t.chain),
            Some(Some(ChainId(2)))
        );

        assert!(matches!(
            c.create_chain_table(ChainTableId(2), &[ChainId(7)]),
            Err(MgmtError::NotFound { .. })
        ));
        assert!(matches!(
            c.create_chain_table(ChainTableId(2), &[]),
            Err(MgmtError::Invalid { .. })
        ));
        assert!(matches!(
            c.create_chain_table(ChainTableId(2), &[ChainId(2), ChainId(2)]),
            Err(MgmtError::Invalid { .. })
        ));
        assert!(matches!(
            c.create_chain_table(ChainTableId(1), &[ChainId(2)]),
            Err(MgmtError::AlreadyExists { .. })
        ));
        c.create_chain_table(ChainTableId(2), &[ChainId(2), ChainId(1)])
            .expect("valid table");
        let routing = c.routing();
        let table = routing.table(ChainTableId(2)).expect("table");
        assert_eq!(
            (table.version, table.chains.clone()),
            (1, vec![ChainId(2), ChainId(1)])
        );
        assert_eq!(c.record().check(), Ok(()));
    }

    #[test]
    fn healthy_heartbeats_change_nothing() {
        let mut c = three_node_cluster();
        let v = c.routing_version();
        for t in 1..=20 {
            heartbeat_all(&mut c, secs(t), [L::UpToDate; 3]);
            assert!(!c.tick(secs(t)));
        }
        assert_eq!(c.routing_version(), v);
        assert_eq!(
            members(&c),
            [(1, P::Serving), (2, P::Serving), (3, P::Serving)]
        );
    }

    #[test]
    fn a_silent_node_goes_offline_after_the_timeout_and_comes_back_via_sync() {
        let mut c = three_node_cluster();
        heartbeat_all(&mut c, secs(0), [L::UpToDate; 3]);
        // Node 1 (the head) stops; the others keep heartbeating.
        for t in 1..=10 {
            c.heartbeat(&hb(2, &[(2, L::UpToDate)]), secs(t))
                .expect("hb");
            c.heartbeat(&hb(3, &[(3, L::UpToDate)]), secs(t))
                .expect("hb");
            assert!(!c.tick(secs(t)), "not dead before the timeout (t={t})");
        }
        let v = c.routing_version();
        c.heartbeat(&hb(2, &[(2, L::UpToDate)]), secs(11))
            .expect("hb");
        c.heartbeat(&hb(3, &[(3, L::UpToDate)]), secs(11))
            .expect("hb");
        assert!(c.tick(secs(11)), "dead after the timeout");
        assert_eq!(
            members(&c),
            [(2, P::Serving), (3, P::Serving), (1, P::Offline)]
        );
        let routing = c.routing();
        assert!(!routing.node(NodeId(1)).expect("node 1").alive);
        assert_eq!(
            routing.target(TargetId(1)).map(|t| t.state),
            Some(P::Offline)
        );
        assert_eq!(
            routing.chain(ChainId(1)).map(|c| c.version),
            Some(ChainVersion(2))
        );
        assert_eq!(
            c.routing_version().0,
            v.0 + 2,
            "one bump for liveness, one for the chain"
        );
        assert!(!c.tick(secs(11)), "a second tick changes nothing");

        // Node 1 returns, knowing it is behind.
        heartbeat_all(&mut c, secs(12), [L::Online, L::UpToDate, L::UpToDate]);
        assert!(c.tick(secs(12)));
        assert_eq!(
            members(&c),
            [(2, P::Serving), (3, P::Serving), (1, P::Waiting)]
        );
        assert!(c.routing().node(NodeId(1)).expect("node 1").alive);
        assert!(c.tick(secs(12)));
        assert_eq!(
            members(&c),
            [(2, P::Serving), (3, P::Serving), (1, P::Syncing)]
        );
        heartbeat_all(&mut c, secs(13), [L::UpToDate; 3]);
        assert!(c.tick(secs(13)));
        assert_eq!(
            members(&c),
            [(2, P::Serving), (3, P::Serving), (1, P::Serving)]
        );
    }

    #[test]
    fn a_target_left_out_of_a_heartbeat_is_unknown_and_unknown_targets_are_ignored() {
        let mut c = three_node_cluster();
        heartbeat_all(&mut c, secs(0), [L::UpToDate; 3]);
        // Node 3 reports target 99 (unknown) and target 1 (node 1's), not 3:
        // as a node that has not learnt of target 3 yet would.
        c.heartbeat(&hb(3, &[(99, L::UpToDate), (1, L::Offline)]), secs(1))
            .expect("hb");
        assert_eq!(c.local_state(TargetId(3), secs(1)), None);
        assert_eq!(c.local_state(TargetId(1), secs(1)), Some(L::UpToDate));
        assert!(!c.record().targets.contains_key(&TargetId(99)));
        // The chain waits for target 3's state instead of taking it offline.
        assert!(!c.tick(secs(1)));
        assert_eq!(
            members(&c),
            [(1, P::Serving), (2, P::Serving), (3, P::Serving)]
        );
        // Once reported offline, it is.
        c.heartbeat(&hb(3, &[(3, L::Offline)]), secs(2))
            .expect("hb");
        assert!(c.tick(secs(2)));
        assert_eq!(
            members(&c),
            [(1, P::Serving), (2, P::Serving), (3, P::Offline)]
        );
    }

    #[test]
    fn all_nodes_down_leaves_a_lastsrv() {
        let mut c = three_node_cluster();
        heartbeat_all(&mut c, secs(0), [L::UpToDate; 3]);
        assert!(c.tick(secs(11)));
        assert_eq!(
            members(&c),
            [(1, P::LastSrv), (2, P::Offline), (3, P::Offline)]
        );
        // The lastsrv returns up to date and serves again.
        c.heartbeat(&hb(1, &[(1, L::UpToDate)]), secs(12))
            .expect("hb");
        assert!(c.tick(secs(12)));
        assert_eq!(
            members(&c),
            [(1, P::Serving), (2, P::Offline), (3, P::Offline)]
        );
    }

    #[test]
    fn set_target_offline_holds_until_the_node_reports_online() {
        let mut c = three_node_cluster();
        heartbeat_all(&mut c, secs(0), [L::UpToDate; 3]);
        assert_eq!(
            c.set_target_offline(TargetId(9), secs(0)),
            Err(MgmtError::NotFound {
                what: "target 9".into()
            })
        );
        let v = c.routing_version();
        // A serving member on a live node stops being readable first, and
        // stays in the write path until its node has seen that.
        assert_eq!(c.set_target_offline(TargetId(2), secs(1)), Ok(false));
        let since = c.routing_version();
        assert!(since > v, "made syncing at once");
        assert_eq!(
            members(&c),
            [(1, P::Serving), (3, P::Serving), (2, P::Syncing)]
        );
        assert!(c.routing().target(TargetId(2)).expect("target").leaving);
        assert!(c.offline_pending(TargetId(2)));
        assert_eq!(c.set_target_offline(TargetId(2), secs(1)), Ok(false));
        // Its node still holds the routing before: nothing moves, and the
        // up-to-date member is not made serving again.
        heartbeat_all(&mut c, secs(1), [L::UpToDate; 3]);
        assert!(!c.tick(secs(1)));
        assert!(c.offline_pending(TargetId(2)));
        // It has seen it: offline now.
        c.heartbeat(&hb_holding(2, &[(2, L::UpToDate)], since), secs(1))
            .expect("hb");
        assert!(c.tick(secs(1)));
        assert!(!c.offline_pending(TargetId(2)));
        assert!(!c.routing().target(TargetId(2)).expect("target").leaving);
        assert_eq!(
            members(&c),
            [(1, P::Serving), (3, P::Serving), (2, P::Offline)]
        );
        // The node has not seen the fence yet and keeps saying up-to-date.
        heartbeat_all(&mut c, secs(2), [L::UpToDate; 3]);
        assert!(!c.tick(secs(2)));
        assert_eq!(
            members(&c),
            [(1, P::Serving), (3, P::Serving), (2, P::Offline)]
        );
        // Fenced, it reports online: the override ends and it resyncs.
        heartbeat_all(&mut c, secs(3), [L::UpToDate, L::Online, L::UpToDate]);
        assert!(c.tick(secs(3)));
        assert_eq!(
            members(&c),
            [(1, P::Serving), (3, P::Serving), (2, P::Waiting)]
        );
        assert!(c.tick(secs(3)));
        assert_eq!(
            members(&c),
            [(1, P::Serving), (3, P::Serving), (2, P::Syncing)]
        );
    }

    #[test]
    fn restart_gives_nodes_a_grace_period() {
        let mut c = three_node_cluster();
        heartbeat_all(&mut c, secs(0), [L::UpToDate; 3]);
        assert_eq!(c.set_target_offline(TargetId(3), secs(0)), Ok(false));
        let seen = hb_holding(3, &[(3, L::UpToDate)], c.routing_version());
        c.heartbeat(&seen, secs(0)).expect("hb");
        c.tick(secs(0));
        let saved = c.record().clone();
        assert_eq!(saved.check(), Ok(()));

        // The new manager's clock starts again near zero.
        let mut r = Cluster::from_record(saved.clone(), TIMEOUT, secs(0));
        assert_eq!(r.routing_version().0, saved.routing_version.0 + 1);
        assert_eq!(r.record().chains, saved.chains, "state is back");
        assert!(
            r.routing().nodes.iter().all(|n| n.alive),
            "all alive during grace"
        );
        // Nobody reported yet: nothing moves, even though nothing is known.
        assert!(!r.tick(secs(5)));
        assert_eq!(
            members(&r),
            [(1, P::Serving), (2, P::Serving), (3, P::Offline)]
        );

        // Nodes 1 and 3 report (3 online: it knows it is behind); node 2
        // stays silent through the grace period.
        for t in 6..=11 {
            r.heartbeat(&hb(1, &[(1, L::UpToDate)]), secs(t))
                .expect("hb");
            r.heartbeat(&hb(3, &[(3, L::Online)]), secs(t)).expect("hb");
            r.tick(secs(t));
            let expected = if t <= 10 { None } else { Some(L::Offline) };
            assert_eq!(
                r.local_state(TargetId(2), secs(t)),
                expected,
                "unknown during grace, offline after (t={t})"
            );
            if t <= 10 {
                assert_eq!(
                    members(&r),
                    [(1, P::Serving), (2, P::Serving), (3, P::Offline)]
                );
            }
        }
        // The grace ran out at t=11: 2 is offline, 3 (online) waits; then syncs.
        assert_eq!(
            members(&r),
            [(1, P::Serving), (3, P::Waiting), (2, P::Offline)]
        );
        assert!(r.tick(secs(11)));
        assert_eq!(
            members(&r),
            [(1, P::Serving), (3, P::Syncing), (2, P::Offline)]
        );
        assert!(!r.routing().node(NodeId(2)).expect("node 2").alive);
    }

    #[test]
    fn record_check_finds_inconsistencies() {
        let c = three_node_cluster();
        let mut record = c.record().clone();
        record.targets.remove(&TargetId(2));
        assert!(record.check().is_err(), "chain lists a missing target");

        let mut record = c.record().clone();
        record
            .tables
            .get_mut(&ChainTableId(1))
            .expect("table")
            .chains = vec![ChainId(5)];
        assert!(record.check().is_err(), "table lists a missing chain");

        let mut record = c.record().clone();
        record.targets.get_mut(&TargetId(1)).expect("target").chain = None;
        assert!(record.check().is_err(), "member does not point back");
    }
}
