//! Messages of the cluster manager (mgmtd): node registration, heartbeats
//! with the targets' local states, routing information (nodes, targets,
//! chains, chain tables) and the admin operations that create them.
//!
//! The routing types live here rather than in the manager because every
//! other service reads them: storage nodes fence themselves from their
//! targets' public states, clients pick replicas from them.
//!
//! Every struct defaults its missing fields (`#[serde(default)]`), so a message
//! can gain fields without breaking older peers (docs/rpc-wire-format.md).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Method;
use crate::auth::Roles;
use crate::ids::{ChainId, ChainTableId, ChainVersion, NodeId, RoutingVersion, TargetId};

/// A target's state as the manager publishes it in the routing information
/// (3FS's public target state). It decides what a replica may do.
///
/// The declaration order is the rank a chain is sorted by (serving first,
/// offline last), so the derived `Ord` is that rank.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum PublicState {
    /// Alive and up to date: serves reads and writes.
    Serving,
    /// Alive, being recovered by its predecessor: receives forwarded writes,
    /// serves no reads.
    Syncing,
    /// Alive, recovery not started.
    Waiting,
    /// Down, and was the last serving replica of its chain: the chain waits
    /// for it to come back.
    LastSrv,
    /// Down, fenced by an admin, or its medium failed.
    #[default]
    Offline,
}

impl PublicState {
    /// Whether a replica in this state may answer reads.
    pub fn readable(self) -> bool {
        matches!(self, PublicState::Serving)
    }

    /// Whether a replica in this state takes part in writes.
    pub fn writable(self) -> bool {
        matches!(self, PublicState::Serving | PublicState::Syncing)
    }

    /// The chain sort rank: serving < syncing < waiting < lastsrv < offline.
    pub fn rank(self) -> u8 {
        match self {
            PublicState::Serving => 0,
            PublicState::Syncing => 1,
            PublicState::Waiting => 2,
            PublicState::LastSrv => 3,
            PublicState::Offline => 4,
        }
    }
}

impl fmt::Display for PublicState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PublicState::Serving => "serving",
            PublicState::Syncing => "syncing",
            PublicState::Waiting => "waiting",
            PublicState::LastSrv => "lastsrv",
            PublicState::Offline => "offline",
        })
    }
}

/// A target's state as its storage node reports it in a heartbeat (3FS's
/// local target state). The manager also uses `Offline` for targets whose
/// node stopped heartbeating or that an admin took offline.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum LocalState {
    /// Holds every committed update of its chain.
    UpToDate,
    /// Alive but possibly behind: needs a sync before serving.
    Online,
    /// Not alive (never sent by a storage node itself).
    #[default]
    Offline,
}

impl fmt::Display for LocalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LocalState::UpToDate => "up-to-date",
            LocalState::Online => "online",
            LocalState::Offline => "offline",
        })
    }
}

/// A storage node as the routing information shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Where its RPC server listens (`host:port`).
    pub addr: String,
    /// Whether its heartbeats arrived within the failure timeout.
    pub alive: bool,
}

/// A storage target: one replica slot on one device of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetInfo {
    pub id: TargetId,
    pub node: NodeId,
    /// Index of the node's device (chunk engine) that holds it.
    pub disk: u32,
    /// The chain it belongs to, once an admin put it into one.
    pub chain: Option<ChainId>,
    /// Its public state in that chain (`Offline` when in no chain).
    pub state: PublicState,
}

/// One member of a chain with its public state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChainTarget {
    pub target: TargetId,
    pub state: PublicState,
}

/// A chain: its members in order, head first and tail last.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChainInfo {
    pub id: ChainId,
    /// Bumped on every change of order or of any member's state.
    pub version: ChainVersion,
    pub targets: Vec<ChainTarget>,
}

impl ChainInfo {
    /// The first member, which takes client writes (when serving).
    pub fn head(&self) -> Option<&ChainTarget> {
        self.targets.first()
    }

    /// The member with `target`'s id, with its position.
    pub fn position(&self, target: TargetId) -> Option<usize> {
        self.targets.iter().position(|t| t.target == target)
    }
}

/// A chain table: the chains a file layout stripes its chunks over.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChainTable {
    pub id: ChainTableId,
    pub version: u32,
    pub chains: Vec<ChainId>,
}

/// Everything a client or storage node needs to route requests. Each list is
/// sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoutingInfo {
    /// Bumped on every change of anything below.
    pub version: RoutingVersion,
    pub nodes: Vec<NodeInfo>,
    pub targets: Vec<TargetInfo>,
    pub chains: Vec<ChainInfo>,
    pub tables: Vec<ChainTable>,
}

impl RoutingInfo {
    pub fn chain(&self, id: ChainId) -> Option<&ChainInfo> {
        self.chains.iter().find(|c| c.id == id)
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn target(&self, id: TargetId) -> Option<&TargetInfo> {
        self.targets.iter().find(|t| t.id == id)
    }

    pub fn table(&self, id: ChainTableId) -> Option<&ChainTable> {
        self.tables.iter().find(|t| t.id == id)
    }
}

/// Why a manager request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MgmtError {
    /// A node, target, chain or table named by the request does not exist.
    #[error("{what} not found")]
    NotFound { what: String },
    /// The request would create something that already exists.
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    /// The request is malformed or breaks a rule (e.g. two targets of a chain
    /// on one node).
    #[error("invalid request: {reason}")]
    Invalid { reason: String },
    /// This manager does not hold the manager lease (it stands by, or its
    /// lease lapsed); ask `primary`, the lease holder's address, if it knows
    /// one, or another manager.
    #[error("this manager is not the primary{}", match primary {
        Some(addr) => format!(" (the primary is at {addr})"),
        None => String::from(" (no primary known to it)"),
    })]
    NotPrimary { primary: Option<String> },
    /// The manager could not persist the change, so it did not make it;
    /// retry later.
    #[error("cluster manager unavailable: {reason}")]
    Unavailable { reason: String },
}

/// What a storage node says about one of its targets in a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetReport {
    pub target: TargetId,
    pub local: LocalState,
    pub used_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RegisterNodeReq {
    pub node: NodeId,
    pub addr: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RegisterNodeRsp {
    pub routing_version: RoutingVersion,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HeartbeatReq {
    pub node: NodeId,
    pub addr: String,
    /// Every target the node holds; a known target left out counts as offline.
    pub targets: Vec<TargetReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HeartbeatRsp {
    /// The current routing version, so the node knows when to refetch.
    pub routing_version: RoutingVersion,
    /// After how long without a heartbeat the manager declares a node dead.
    /// A node's lease must end well before that (0: an older manager that
    /// does not say).
    pub failure_timeout_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GetRoutingReq {
    /// The version the caller already has (0 for none).
    pub known_version: RoutingVersion,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GetRoutingRsp {
    /// `None` when the caller's version is current.
    pub routing: Option<RoutingInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateTargetReq {
    pub target: TargetId,
    pub node: NodeId,
    pub disk: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateChainReq {
    pub chain: ChainId,
    /// Head first; existing, unassigned targets on distinct nodes.
    pub targets: Vec<TargetId>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateChainTableReq {
    pub table: ChainTableId,
    pub chains: Vec<ChainId>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SetTargetOfflineReq {
    pub target: TargetId,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoveNodeReq {
    pub node: NodeId,
}

macro_rules! method {
    ($(#[$doc:meta])* $name:ident = $id:literal, $req:ty => $rsp:ty, roles $roles:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name;

        impl Method for $name {
            const ID: u16 = $id;
            const NAME: &'static str = concat!("mgmt.", stringify!($name));
            type Req = $req;
            type Rsp = $rsp;
            const ROLES: Roles = $roles;
        }
    };
}

method!(
    /// A storage node announces itself (id and address).
    RegisterNode = 300, RegisterNodeReq => Result<RegisterNodeRsp, MgmtError>,
    roles Roles::STORAGE
);
method!(
    /// A storage node's periodic liveness report with its targets' local
    /// states; registers the node if it is unknown.
    Heartbeat = 301, HeartbeatReq => Result<HeartbeatRsp, MgmtError>,
    roles Roles::STORAGE
);
method!(
    /// The routing information, if newer than the caller's.
    GetRouting = 302, GetRoutingReq => GetRoutingRsp,
    roles Roles::ALL
);
method!(
    /// Admin: declare a target on a known node's device.
    CreateTarget = 310, CreateTargetReq => Result<(), MgmtError>,
    roles Roles::ADMIN
);
method!(
    /// Admin: build a chain from unassigned targets; they start serving.
    CreateChain = 311, CreateChainReq => Result<(), MgmtError>,
    roles Roles::ADMIN
);
method!(
    /// Admin: create a chain table over existing chains.
    CreateChainTable = 312, CreateChainTableReq => Result<(), MgmtError>,
    roles Roles::ADMIN
);
method!(
    /// Admin: take a target offline until its node reports it `Online`.
    SetTargetOffline = 313, SetTargetOfflineReq => Result<(), MgmtError>,
    roles Roles::ADMIN
);
method!(
    /// Admin: forget a node that is down and hosts no target (a node taken
    /// out of service, or a registration that should not have happened).
    RemoveNode = 314, RemoveNodeReq => Result<(), MgmtError>,
    roles Roles::ADMIN
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_serving_reads_and_serving_or_syncing_writes() {
        use PublicState::*;
        let readable: Vec<bool> = [Serving, Syncing, Waiting, LastSrv, Offline]
            .iter()
            .map(|s| s.readable())
            .collect();
        assert_eq!(readable, [true, false, false, false, false]);
        let writable: Vec<bool> = [Serving, Syncing, Waiting, LastSrv, Offline]
            .iter()
            .map(|s| s.writable())
            .collect();
        assert_eq!(writable, [true, true, false, false, false]);
    }

    #[test]
    fn rank_matches_derived_order_and_display_is_lowercase() {
        use PublicState::*;
        let all = [Serving, Syncing, Waiting, LastSrv, Offline];
        for pair in all.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(pair[0].rank() < pair[1].rank());
        }
        let names: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            names,
            ["serving", "syncing", "waiting", "lastsrv", "offline"]
        );
    }

    #[test]
    fn routing_round_trips_and_tolerates_missing_fields() {
        let routing = RoutingInfo {
            version: RoutingVersion(7),
            nodes: vec![NodeInfo {
                id: NodeId(1),
                addr: "10.0.0.1:9000".into(),
                alive: true,
            }],
            targets: vec![TargetInfo {
                id: TargetId(11),
                node: NodeId(1),
                disk: 2,
                chain: Some(ChainId(5)),
                state: PublicState::Syncing,
            }],
            chains: vec![ChainInfo {
                id: ChainId(5),
                version: ChainVersion(3),
                targets: vec![ChainTarget {
                    target: TargetId(11),
                    state: PublicState::Syncing,
                }],
            }],
            tables: vec![ChainTable {
                id: ChainTableId(1),
                version: 1,
                chains: vec![ChainId(5)],
            }],
        };
        let bytes = rmp_serde::to_vec_named(&routing).expect("routing serializes");
        let back: RoutingInfo = rmp_serde::from_slice(&bytes).expect("routing decodes");
        assert_eq!(back, routing);
        assert_eq!(
            back.chain(ChainId(5)).map(|c| c.version),
            Some(ChainVersion(3))
        );
        assert_eq!(back.target(TargetId(11)).map(|t| t.disk), Some(2));
        assert!(back.node(NodeId(2)).is_none());

        // An older peer sends a chain without `version`: it defaults.
        #[derive(Serialize)]
        struct OldChain {
            id: ChainId,
        }
        let bytes = rmp_serde::to_vec_named(&OldChain { id: ChainId(9) }).expect("serializes");
        let chain: ChainInfo = rmp_serde::from_slice(&bytes).expect("decodes");
        assert_eq!(chain.id, ChainId(9));
        assert_eq!(chain.version, ChainVersion(0));
        assert!(chain.targets.is_empty());
    }

    #[test]
    fn results_with_errors_round_trip() {
        let rsp: <CreateChain as Method>::Rsp = Err(MgmtError::Invalid {
            reason: "two targets on node 1".into(),
        });
        let bytes = rmp_serde::to_vec_named(&rsp).expect("serializes");
        let back: <CreateChain as Method>::Rsp = rmp_serde::from_slice(&bytes).expect("decodes");
        assert_eq!(back, rsp);
        assert_eq!(
            MgmtError::NotFound {
                what: "target 3".into()
            }
            .to_string(),
            "target 3 not found"
        );
    }
}
