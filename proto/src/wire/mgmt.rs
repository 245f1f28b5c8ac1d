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
    /// On its way out of the write path (its removal from the chain, or an
    /// admin's offline, is under way): publicly syncing, so it takes writes
    /// and answers no reads, but it is up to date and nobody resyncs it; it
    /// leaves once its node has seen that it no longer serves. Absent
    /// (false) from an older manager, which never marks a member leaving.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
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
    /// The version of the target's chain in the routing the node judged
    /// `local` against (0: a node that does not say). The chain version
    /// goes up whenever a member changes state, so an up-to-date claim made
    /// under an older version than the chain's current one predates the
    /// chain's last change: a heartbeat delayed in the network or resent
    /// from before the manager took the target out of service. The manager
    /// does not let such a claim end a target's resync (docs/chaos.md,
    /// "30-minute soaks").
    pub chain_version: ChainVersion,
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
    /// The routing version the node holds when it sends this (0: none yet,
    /// or an older node that does not say). The manager takes a serving
    /// member out of the write path only once its node holds a version
    /// showing it unreadable (or has been silent past the failure timeout).
    pub routing_version: RoutingVersion,
    /// The resyncs this node runs as the source (absent from an older node,
    /// and when it runs none): how far each has come. The manager keeps the
    /// last report of each node in memory only, for the admin commands
    /// ([`GetSyncProgress`]); at most [`SYNCS_REPORTED_MAX`] are kept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub syncs: Vec<SyncProgress>,
}

/// At most this many resyncs of one node's heartbeat are kept (a node
/// syncs at most one successor per chain it serves in).
pub const SYNCS_REPORTED_MAX: usize = 4096;

/// How far one resync has come, as its source counts it: the chunks that
/// differed at the successor when the resync compared them, and their
/// bytes (the source's committed lengths), with how many of them it has
/// dealt with. `bytes_done` ends at `bytes_total` when the resync has gone
/// through every chunk; writes arriving meanwhile reach the successor
/// directly and are not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncProgress {
    pub chain: ChainId,
    /// The successor being filled.
    pub target: TargetId,
    pub chunks_done: u64,
    pub chunks_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GetSyncProgressReq {}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GetSyncProgressRsp {
    /// The last progress each live node reported, for targets that are
    /// still syncing members of the chain named.
    pub syncs: Vec<SyncProgress>,
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
    /// `None` when the caller's version is current, or when the table is
    /// sent in pages (`first_page`).
    pub routing: Option<RoutingInfo>,
    /// Instead of `routing` when the table's encoding is over
    /// [`ROUTING_INLINE_BYTES_MAX`]: its first page. The caller asks for
    /// the rest with [`GetRoutingPage`] and assembles them with
    /// [`RoutingAssembly`].
    pub first_page: Option<RoutingPage>,
}

/// The largest routing table (its encoding) sent whole in a
/// [`GetRoutingRsp`]: below the 1 MiB body limit with room for the
/// message around it. Every table that fitted one message before pages
/// existed still does, so older callers see no change.
pub const ROUTING_INLINE_BYTES_MAX: usize = 960 << 10;
/// The bytes of one [`RoutingPage`] (as readdir's pages are cut at 512 KiB).
pub const ROUTING_PAGE_BYTES: usize = 512 << 10;
/// The largest table a caller assembles: a manager announcing more is
/// refused rather than believed (at about 100 bytes a chain, this is more
/// than two million chains).
pub const ROUTING_BYTES_MAX: u64 = 256 << 20;
/// How many times an assembly starts over because the table changed
/// between its pages before the caller gives up.
pub const ROUTING_RESTARTS_MAX: u32 = 16;

/// Bytes `offset .. offset + bytes.len()` of the encoding of the routing
/// table of `version` (a [`RoutingInfo`] in this crate's codec), which is
/// `total_bytes` long.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoutingPage {
    pub version: RoutingVersion,
    pub offset: u64,
    pub total_bytes: u64,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl RoutingPage {
    /// The page of `encoded` (the table of `version`) starting at `offset`,
    /// at most `page_bytes` long; `None` if `offset` is past its end.
    pub fn cut(
        encoded: &[u8],
        version: RoutingVersion,
        offset: u64,
        page_bytes: usize,
    ) -> Option<RoutingPage> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|&s| s <= encoded.len())?;
        let end = start.saturating_add(page_bytes.max(1)).min(encoded.len());
        Some(RoutingPage {
            version,
            offset,
            total_bytes: encoded.len() as u64,
            bytes: encoded[start..end].to_vec(),
        })
    }
}

/// Which page of a routing table the caller wants next.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GetRoutingPageReq {
    /// The version being assembled.
    pub version: RoutingVersion,
    /// The first byte wanted: the bytes assembled so far.
    pub offset: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GetRoutingPageRsp {
    /// The page at `offset` of `version`; if the table has changed since,
    /// the first page of the current one instead (the caller starts over).
    pub page: RoutingPage,
}

/// Why pages of a routing table could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum RoutingPageError {
    #[error(
        "routing page of version {version} at offset {got}, expected offset {expected} \
         (the manager sent pages out of order)"
    )]
    OutOfOrder {
        version: u64,
        expected: u64,
        got: u64,
    },
    #[error("routing table of {total_bytes} bytes is over the limit routing_bytes_max = {max}")]
    TooLarge { total_bytes: u64, max: u64 },
    #[error(
        "routing page of version {version} at offset {offset} of {total_bytes} bytes is empty \
         or runs past the table's end"
    )]
    BadPage {
        version: u64,
        offset: u64,
        total_bytes: u64,
    },
    #[error("the routing table changed between pages {restarts} times in a row; giving up")]
    Unsettled { restarts: u32 },
    #[error("assembled routing table of version {version} does not decode")]
    Decode {
        version: u64,
        #[source]
        source: crate::codec::CodecError,
    },
    #[error("assembled routing table says version {found}, its pages said {version}")]
    VersionMismatch { version: u64, found: u64 },
}

/// A routing table being put together from its pages, in order, all of one
/// version: a page of another version at offset 0 means the table changed
/// on the manager, and the assembly starts over with it, so the caller
/// ends up with one consistent table.
#[derive(Debug)]
pub struct RoutingAssembly {
    version: RoutingVersion,
    total_bytes: u64,
    bytes: Vec<u8>,
    restarts: u32,
}

/// What adding a page gave.
#[derive(Debug)]
pub enum Assembled {
    /// The whole table.
    Done(Box<RoutingInfo>),
    /// More pages are needed: ask for this one.
    More(GetRoutingPageReq),
}

impl RoutingAssembly {
    /// Starts with `first` (a page at offset 0).
    pub fn start(first: RoutingPage) -> Result<(RoutingAssembly, Assembled), RoutingPageError> {
        let mut assembly = RoutingAssembly {
            version: first.version,
            total_bytes: 0,
            bytes: Vec::new(),
            restarts: 0,
        };
        let next = assembly.begin(first)?;
        Ok((assembly, next))
    }

    /// Adds the next page.
    pub fn add(&mut self, page: RoutingPage) -> Result<Assembled, RoutingPageError> {
        if page.version != self.version && page.offset == 0 {
            self.restarts += 1;
            if self.restarts > ROUTING_RESTARTS_MAX {
                return Err(RoutingPageError::Unsettled {
                    restarts: self.restarts,
                });
            }
            return self.begin(page);
        }
        if page.version != self.version || page.offset != self.bytes.len() as u64 {
            return Err(RoutingPageError::OutOfOrder {
                version: page.version.0,
                expected: self.bytes.len() as u64,
                got: page.offset,
            });
        }
        if page.total_bytes != self.total_bytes {
            return Err(self.bad(&page));
        }
        self.append(page)
    }

    fn begin(&mut self, first: RoutingPage) -> Result<Assembled, RoutingPageError> {
        if first.offset != 0 {
            return Err(RoutingPageError::OutOfOrder {
                version: first.version.0,
                expected: 0,
                got: first.offset,
            });
        }
        if first.total_bytes > ROUTING_BYTES_MAX {
            return Err(RoutingPageError::TooLarge {
                total_bytes: first.total_bytes,
                max: ROUTING_BYTES_MAX,
            });
        }
        self.version = first.version;
        self.total_bytes = first.total_bytes;
        self.bytes.clear();
        self.append(first)
    }

    fn append(&mut self, page: RoutingPage) -> Result<Assembled, RoutingPageError> {
        let end = self.bytes.len() as u64 + page.bytes.len() as u64;
        if page.bytes.is_empty() || end > self.total_bytes {
            return Err(self.bad(&page));
        }
        self.bytes.extend_from_slice(&page.bytes);
        if end < self.total_bytes {
            return Ok(Assembled::More(GetRoutingPageReq {
                version: self.version,
                offset: end,
            }));
        }
        let routing: RoutingInfo =
            crate::codec::decode(&self.bytes).map_err(|source| RoutingPageError::Decode {
                version: self.version.0,
                source,
            })?;
        if routing.version != self.version {
            return Err(RoutingPageError::VersionMismatch {
                version: self.version.0,
                found: routing.version.0,
            });
        }
        Ok(Assembled::Done(Box::new(routing)))
    }

    fn bad(&self, page: &RoutingPage) -> RoutingPageError {
        RoutingPageError::BadPage {
            version: page.version.0,
            offset: page.offset,
            total_bytes: page.total_bytes,
        }
    }
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

/// A chain and one of its (or its future) members.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChainMemberReq {
    pub chain: ChainId,
    pub target: TargetId,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoveTargetReq {
    pub target: TargetId,
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
    /// The next page of a routing table too large for one `GetRouting`
    /// answer (its `first_page`).
    GetRoutingPage = 303, GetRoutingPageReq => GetRoutingPageRsp,
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
method!(
    /// Admin: add an unassigned target to the end of a chain. It joins
    /// waiting and is filled by a resync from the chain's serving members
    /// while the chain serves (the chain version goes up).
    AddChainMember = 315, ChainMemberReq => Result<(), MgmtError>,
    roles Roles::ADMIN
);
method!(
    /// Admin: take a target out of its chain (the chain version goes up);
    /// refused when no serving member would be left. The target stays
    /// declared, unassigned.
    RemoveChainMember = 316, ChainMemberReq => Result<(), MgmtError>,
    roles Roles::ADMIN
);
method!(
    /// Admin: forget a target that belongs to no chain.
    RemoveTarget = 317, RemoveTargetReq => Result<(), MgmtError>,
    roles Roles::ADMIN
);
method!(
    /// The resyncs under way and how far each has come, from the storage
    /// nodes' last heartbeats (not part of the record: a manager that just
    /// took over knows them after one heartbeat interval).
    GetSyncProgress = 318, GetSyncProgressReq => Result<GetSyncProgressRsp, MgmtError>,
    roles Roles::ALL
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

    /// A routing table of `chains` chains of three targets each, on 100
    /// nodes: about 180 bytes a chain encoded.
    fn large_routing(version: u64, chains: u32) -> RoutingInfo {
        let nodes: Vec<NodeInfo> = (1..=100)
            .map(|n| NodeInfo {
                id: NodeId(n),
                addr: format!("10.0.{}.{}:9000", n / 256, n % 256),
                alive: true,
            })
            .collect();
        let mut targets = Vec::new();
        let mut chain_infos = Vec::new();
        for chain in 1..=chains {
            let members: Vec<ChainTarget> = (0..3)
                .map(|r| {
                    let target = TargetId(u64::from(chain) * 10 + r);
                    targets.push(TargetInfo {
                        id: target,
                        node: NodeId((chain + r as u32) % 100 + 1),
                        disk: r as u32,
                        chain: Some(ChainId(chain)),
                        state: PublicState::Serving,
                        leaving: false,
                    });
                    ChainTarget {
                        target,
                        state: PublicState::Serving,
                    }
                })
                .collect();
            chain_infos.push(ChainInfo {
                id: ChainId(chain),
                version: ChainVersion(1),
                targets: members,
            });
        }
        RoutingInfo {
            version: RoutingVersion(version),
            nodes,
            targets,
            tables: vec![ChainTable {
                id: ChainTableId(1),
                version: 1,
                chains: (1..=chains).map(ChainId).collect(),
            }],
            chains: chain_infos,
        }
    }

    /// Serves pages of `tables` (the current one last changing after
    /// `change_after` pages) to an assembly, as a manager would.
    fn assemble(
        tables: &[RoutingInfo],
        change_after: Option<usize>,
        page_bytes: usize,
    ) -> Result<(RoutingInfo, usize), RoutingPageError> {
        let encoded: Vec<Vec<u8>> = tables
            .iter()
            .map(|t| rmp_serde::to_vec_named(t).expect("encodes"))
            .collect();
        let mut current = 0;
        let first = RoutingPage::cut(&encoded[0], tables[0].version, 0, page_bytes).expect("page");
        let (mut assembly, mut next) = RoutingAssembly::start(first)?;
        let mut pages = 1;
        loop {
            match next {
                Assembled::Done(routing) => return Ok((*routing, pages)),
                Assembled::More(req) => {
                    if change_after == Some(pages) && current + 1 < tables.len() {
                        current += 1;
                    }
                    let version = tables[current].version;
                    let offset = if req.version == version {
                        req.offset
                    } else {
                        0
                    };
                    let page = RoutingPage::cut(&encoded[current], version, offset, page_bytes)
                        .expect("offset within the table");
                    pages += 1;
                    next = assembly.add(page)?;
                }
            }
        }
    }

    #[test]
    fn a_table_over_the_body_limit_is_assembled_from_pages() {
        // 10k chains: several times the 1 MiB body limit.
        let routing = large_routing(4, 10_000);
        let encoded = rmp_serde::to_vec_named(&routing).expect("encodes");
        assert!(
            encoded.len() > 2 * (1 << 20),
            "{} bytes is not over two bodies",
            encoded.len()
        );
        let (back, pages) =
            assemble(std::slice::from_ref(&routing), None, ROUTING_PAGE_BYTES).expect("assembles");
        assert_eq!(back, routing);
        assert_eq!(pages, encoded.len().div_ceil(ROUTING_PAGE_BYTES));
        // Each page fits a message body with room to spare.
        let page =
            RoutingPage::cut(&encoded, routing.version, 0, ROUTING_PAGE_BYTES).expect("page");
        let rsp = crate::codec::encode(&GetRoutingPageRsp { page });
        assert!(
            rsp.len() < ROUTING_INLINE_BYTES_MAX,
            "a page's message is {} bytes",
            rsp.len()
        );
    }

    #[test]
    fn a_table_changing_between_pages_restarts_the_assembly() {
        let old = large_routing(4, 300);
        let new = large_routing(5, 301);
        let (back, pages) = assemble(&[old, new.clone()], Some(3), 4096).expect("assembles");
        // One consistent table: the new one, whole.
        assert_eq!(back, new);
        let new_pages = rmp_serde::to_vec_named(&new)
            .expect("encodes")
            .len()
            .div_ceil(4096);
        assert_eq!(pages, 3 + new_pages);
    }

    #[test]
    fn bad_pages_are_refused_by_name() {
        let routing = large_routing(4, 100);
        let encoded = rmp_serde::to_vec_named(&routing).expect("encodes");
        let page = |offset, bytes: usize| RoutingPage {
            version: routing.version,
            offset,
            total_bytes: encoded.len() as u64,
            bytes: encoded[offset as usize..offset as usize + bytes].to_vec(),
        };
        let (mut assembly, _) = RoutingAssembly::start(page(0, 1000)).expect("first");
        // A page skipping ahead, and one of the same version at offset 0.
        let error = assembly.add(page(2000, 10)).expect_err("out of order");
        assert!(
            error.to_string().contains("expected offset 1000"),
            "{error}"
        );
        let error = assembly
            .add(page(0, 10))
            .expect_err("not a restart: same version");
        assert!(
            matches!(error, RoutingPageError::OutOfOrder { .. }),
            "{error}"
        );
        // An empty page would never finish.
        let error = assembly.add(page(1000, 0)).expect_err("empty");
        assert!(matches!(error, RoutingPageError::BadPage { .. }), "{error}");
        // A first page not at 0, and a table announced over the limit.
        let error = RoutingAssembly::start(page(1000, 10)).expect_err("not first");
        assert!(
            matches!(error, RoutingPageError::OutOfOrder { .. }),
            "{error}"
        );
        let mut huge = page(0, 10);
        huge.total_bytes = ROUTING_BYTES_MAX + 1;
        let error = RoutingAssembly::start(huge).expect_err("too large");
        assert!(error.to_string().contains("routing_bytes_max"), "{error}");
        // Bytes that are no table.
        let junk = RoutingPage {
            version: routing.version,
            offset: 0,
            total_bytes: 3,
            bytes: vec![0xc1; 3],
        };
        let error = RoutingAssembly::start(junk).expect_err("junk");
        assert!(matches!(error, RoutingPageError::Decode { .. }), "{error}");
        // A table changing more than ROUTING_RESTARTS_MAX times in a row.
        let (mut assembly, _) = RoutingAssembly::start(page(0, 10)).expect("first");
        let mut outcome = Ok(());
        for version in 0..=ROUTING_RESTARTS_MAX {
            let mut first = page(0, 10);
            first.version = RoutingVersion(100 + u64::from(version));
            if let Err(error) = assembly.add(first) {
                outcome = Err(error);
                break;
            }
        }
        assert!(
            matches!(outcome, Err(RoutingPageError::Unsettled { .. })),
            "{outcome:?}"
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
                leaving: false,
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
