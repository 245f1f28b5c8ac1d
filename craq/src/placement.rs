//! Chain tables generated from a cluster's shape: N nodes with D disks each,
//! chains of R replicas.
//!
//! A chain table decides two things an operator cannot see by eye at scale:
//! how evenly the disks fill, and where the data of a failed node comes back
//! from. When a node fails, each of its chains is refilled from the chain's
//! surviving replicas; if its chains share few peers, those few peers serve
//! the whole recovery while the rest of the cluster idles. 3FS writes this as
//! an integer program over balanced incomplete block designs; [`plan`] is a
//! heuristic with a stated bound instead:
//!
//! * Every node holds `floor(C R / N)` or one more target, every disk of a
//!   node `floor(t / D)` or one more of the node's `t` (exact, by
//!   construction: each chain takes its replicas from the least-loaded
//!   nodes).
//! * Pair counts, the chains two nodes share, are evened out by a greedy
//!   choice and then a local search that exchanges members between chains
//!   (which keeps every load) while it lowers the sum of their squares.
//!   No two nodes can share fewer than `ceil(t (R-1) / (N-1))` chains for
//!   the busiest node's `t` targets ([`Balance::pair_bound`]); the tests
//!   check the plan stays within one of that bound over a grid of shapes.
//! * Heads (where writes enter a chain) are spread over the nodes, each
//!   chain's head being its member that heads the fewest chains so far.
//!
//! The result is deterministic for a given spec and seed. Target ids read as
//! node, disk and sequence: `node * 1_000_000 + disk * 10_000 + n` (see
//! [`target_id`]).

use flyfs_proto::ids::{ChainId, NodeId, TargetId};
use flyfs_proto::wire::mgmt::{PublicState, RoutingInfo};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Disks per node a plan can number (`disk * 10_000` stays below a node's
/// million).
pub const DISKS_MAX: u32 = 100;
/// Targets on one disk a plan can number.
pub const TARGETS_PER_DISK_MAX: u32 = 9_999;

/// What to place.
#[derive(Clone, Debug)]
pub struct PlacementSpec {
    /// The storage nodes, each once.
    pub nodes: Vec<NodeId>,
    /// Disks (devices) per node; targets land on disks `0..disks_per_node`.
    pub disks_per_node: u32,
    /// Replicas per chain (at most as many as nodes).
    pub replicas: u32,
    /// Chains to create.
    pub chains: u32,
    /// Id of the first chain; the others follow in order.
    pub first_chain: u32,
    /// Seed of the local search (and its ties): same spec and seed, same plan.
    pub seed: u64,
}

/// One replica of a planned chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PlannedTarget {
    pub target: TargetId,
    pub node: NodeId,
    pub disk: u32,
}

/// A planned chain, head first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlannedChain {
    pub chain: ChainId,
    pub targets: Vec<PlannedTarget>,
}

/// How even a plan is: what an operator checks before applying it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Balance {
    pub targets_per_node_min: u32,
    pub targets_per_node_max: u32,
    pub targets_per_disk_min: u32,
    pub targets_per_disk_max: u32,
    pub heads_per_node_min: u32,
    pub heads_per_node_max: u32,
    /// Most chains any two nodes share.
    pub pair_max: u32,
    /// No plan of this shape can do better than this `pair_max`: the
    /// busiest node's `t` targets have `t (R-1)` peer replicas to spread over
    /// `N-1` other nodes.
    pub pair_bound: u32,
    /// Fewest distinct nodes any node shares a chain with: the peers that
    /// its recovery reads from.
    pub recovery_peers_min: u32,
    /// No plan gives every node more: `min(N-1, t )` for the least
    /// loaded node's `t` (small plans may not reach it: not every node can
    /// meet every other in a few chains).
    pub recovery_peers_bound: u32,
    /// The largest share of a failed node's recovery reads that one peer
    /// serves (its pair count over the node's `t (R-1)` peer replicas; 0
    /// with one replica, when nothing is recovered from peers).
    pub recovery_share_max: f64,
    /// The share with recovery spread perfectly evenly: `1 / (N-1)`.
    pub recovery_share_ideal: f64,
}

/// A chain table and how balanced it is.
#[derive(Clone, Debug, Serialize)]
pub struct Placement {
    pub chains: Vec<PlannedChain>,
    pub balance: Balance,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("a chain of {replicas} replicas needs {replicas} distinct nodes; {nodes} given")]
    TooFewNodes { nodes: usize, replicas: u32 },
    #[error("replicas must be at least 1")]
    NoReplicas,
    #[error("chains must be at least 1")]
    NoChains,
    #[error("disks per node must be 1 to {DISKS_MAX}; {0} given")]
    Disks(u32),
    #[error("{0} is listed twice")]
    DuplicateNode(NodeId),
    #[error(
        "{chains} chains of {replicas} replicas put up to {per_disk} targets on a disk; \
         target ids number at most {TARGETS_PER_DISK_MAX} per disk"
    )]
    TooManyTargets {
        chains: u32,
        replicas: u32,
        per_disk: u64,
    },
    #[error("chain ids from {first} for {chains} chains overflow a 32-bit id")]
    ChainIds { first: u32, chains: u32 },
}

/// The id of the `seq`-th target (from 1) on disk `disk` of `node`.
pub fn target_id(node: NodeId, disk: u32, seq: u32) -> TargetId {
    TargetId(u64::from(node.0) * 1_000_000 + u64::from(disk) * 10_000 + u64::from(seq))
}

/// Plans a chain table; see the module comment for what it guarantees.
pub fn plan(spec: &PlacementSpec) -> Result<Placement, PlacementError> {
    check(spec)?;
    let nodes = spec.nodes.len();
    let replicas = spec.replicas as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut members = Members::new(nodes);
    let mut chains: Vec<Vec<usize>> = Vec::with_capacity(spec.chains as usize);
    for _ in 0..spec.chains {
        let chain = members.pick(replicas, &mut rng);
        members.add(&chain);
        chains.push(chain);
    }
    if replicas > 1 && nodes > replicas {
        members.improve(&mut chains, &mut rng);
    }
    let ordered = order_heads(&chains, nodes);
    let planned = assign_disks(spec, &ordered);
    let balance = balance(spec, &planned, &members);
    Ok(Placement {
        chains: planned,
        balance,
    })
}

fn check(spec: &PlacementSpec) -> Result<(), PlacementError> {
    if spec.replicas == 0 {
        return Err(PlacementError::NoReplicas);
    }
    if spec.chains == 0 {
        return Err(PlacementError::NoChains);
    }
    if spec.disks_per_node == 0 || spec.disks_per_node > DISKS_MAX {
        return Err(PlacementError::Disks(spec.disks_per_node));
    }
    if spec.nodes.len() < spec.replicas as usize {
        return Err(PlacementError::TooFewNodes {
            nodes: spec.nodes.len(),
            replicas: spec.replicas,
        });
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(node) = spec.nodes.iter().find(|node| !seen.insert(**node)) {
        return Err(PlacementError::DuplicateNode(*node));
    }
    let targets = u64::from(spec.chains) * u64::from(spec.replicas);
    let per_node = targets.div_ceil(spec.nodes.len() as u64);
    let per_disk = per_node.div_ceil(u64::from(spec.disks_per_node));
    if per_disk > u64::from(TARGETS_PER_DISK_MAX) {
        return Err(PlacementError::TooManyTargets {
            chains: spec.chains,
            replicas: spec.replicas,
            per_disk,
        });
    }
    if spec.first_chain.checked_add(spec.chains - 1).is_none() {
        return Err(PlacementError::ChainIds {
            first: spec.first_chain,
            chains: spec.chains,
        });
    }
    Ok(())
}

/// Targets per node and chains per pair of nodes (by index into the spec's
/// node list), as the plan grows.
struct Members {
    load: Vec<u32>,
    /// `pairs[a * nodes + b]`, kept symmetric.
    pairs: Vec<u32>,
    nodes: usize,
}

impl Members {
    fn new(nodes: usize) -> Members {
        Members {
            load: vec![0; nodes],
            pairs: vec![0; nodes * nodes],
            nodes,
        }
    }

    fn pair(&self, a: usize, b: usize) -> u32 {
        self.pairs[a * self.nodes + b]
    }

    fn bump(&mut self, a: usize, b: usize, up: bool) {
        for index in [a * self.nodes + b, b * self.nodes + a] {
            if up {
                self.pairs[index] += 1;
            } else {
                self.pairs[index] -= 1;
            }
        }
    }

    fn add(&mut self, chain: &[usize]) {
        for (i, &a) in chain.iter().enumerate() {
            self.load[a] += 1;
            for &b in &chain[i + 1..] {
                self.bump(a, b, true);
            }
        }
    }

    /// `replicas` distinct nodes for the next chain. Each pick comes from the
    /// least-loaded nodes not yet picked, which keeps every node within one
    /// target of every other; among those it takes the node sharing the
    /// fewest chains with the ones already picked (random among equals).
    fn pick(&self, replicas: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let mut chain = Vec::with_capacity(replicas);
        let mut order: Vec<usize> = (0..self.nodes).collect();
        order.shuffle(rng);
        for _ in 0..replicas {
            let best = order
                .iter()
                .copied()
                .filter(|node| !chain.contains(node))
                .min_by_key(|&node| {
                    let shared: u32 = chain.iter().map(|&other| self.pair(node, other)).sum();
                    let most = chain
                        .iter()
                        .map(|&other| self.pair(node, other))
                        .max()
                        .unwrap_or(0);
                    (self.load[node], most, shared)
                })
                .expect("replicas <= nodes, checked by plan");
            chain.push(best);
        }
        chain
    }

    /// Local search: exchanges one member of a chain with one member of
    /// another (a node absent from the other chain each way), which leaves
    /// every node's load as it is, whenever that lowers the sum of squared
    /// pair counts; exchanges that change nothing are taken too, so the
    /// search walks across plateaus. Stops after a budget of tries or when
    /// the sum reaches its floor (every pair count within one of the mean).
    fn improve(&mut self, chains: &mut [Vec<usize>], rng: &mut ChaCha8Rng) {
        if chains.len() < 2 {
            return;
        }
        let replicas = chains[0].len();
        let floor = self.squares_floor(chains.len(), replicas);
        let mut squares = self.squares();
        let tries = (chains.len() * replicas * 200).clamp(20_000, 3_000_000);
        for _ in 0..tries {
            if squares <= floor {
                break;
            }
            let x = rng.random_range(0..chains.len());
            let y = rng.random_range(0..chains.len());
            if x == y {
                continue;
            }
            let (i, j) = (rng.random_range(0..replicas), rng.random_range(0..replicas));
            let (a, b) = (chains[x][i], chains[y][j]);
            if a == b || chains[x].contains(&b) || chains[y].contains(&a) {
                continue;
            }
            let delta = self.exchange(&chains[x], i, b) + self.exchange(&chains[y], j, a);
            if delta <= 0 {
                chains[x][i] = b;
                chains[y][j] = a;
                squares = squares.saturating_add_signed(delta);
            } else {
                // Undo, in the reverse order.
                let mut undone_y = chains[y].clone();
                undone_y[j] = a;
                self.exchange(&undone_y, j, b);
                let mut undone_x = chains[x].clone();
                undone_x[i] = b;
                self.exchange(&undone_x, i, a);
            }
        }
    }

    /// Replaces `chain[position]` by `new` in the pair counts (not in the
    /// chain); the change of the sum of squared pair counts.
    fn exchange(&mut self, chain: &[usize], position: usize, new: usize) -> i64 {
        let old = chain[position];
        let mut delta = 0i64;
        for (k, &other) in chain.iter().enumerate() {
            if k == position {
                continue;
            }
            let before = i64::from(self.pair(old, other));
            delta += (before - 1) * (before - 1) - before * before;
            self.bump(old, other, false);
            let before = i64::from(self.pair(new, other));
            delta += (before + 1) * (before + 1) - before * before;
            self.bump(new, other, true);
        }
        delta
    }

    fn squares(&self) -> u64 {
        let mut sum = 0u64;
        for a in 0..self.nodes {
            for b in a + 1..self.nodes {
                sum += u64::from(self.pair(a, b)).pow(2);
            }
        }
        sum
    }

    /// The least the sum of squares can be: the chains' pairs spread as
    /// evenly as possible over every pair of nodes.
    fn squares_floor(&self, chains: usize, replicas: usize) -> u64 {
        let pairs_total = (chains * replicas * (replicas - 1) / 2) as u64;
        let slots = (self.nodes * (self.nodes - 1) / 2) as u64;
        let (base, extra) = (pairs_total / slots, pairs_total % slots);
        (slots - extra) * base * base + extra * (base + 1) * (base + 1)
    }
}

/// Each chain's members reordered so that its head is the member heading
/// the fewest chains so far, then evened out: while a node heads two chains
/// more than another that it can reach through a path of chains (each
/// handing its head to the member of it that heads the next), the heads
/// move along that path. Each move lowers the sum of squared head counts,
/// so this ends; it ends when no such path is left. The rest of each chain
/// keeps its order.
fn order_heads(chains: &[Vec<usize>], nodes: usize) -> Vec<Vec<usize>> {
    let mut heads = vec![0u32; nodes];
    let mut head_of: Vec<usize> = chains
        .iter()
        .map(|chain| {
            let position = (0..chain.len())
                .min_by_key(|&k| (heads[chain[k]], k))
                .expect("a chain has at least one member");
            heads[chain[position]] += 1;
            chain[position]
        })
        .collect();
    while let Some((from, path)) = head_path(chains, &head_of, &heads) {
        heads[from] -= 1;
        for &(chain, node) in &path {
            head_of[chain] = node;
        }
        let (_, to) = path[0];
        heads[to] += 1;
    }
    chains
        .iter()
        .zip(head_of)
        .map(|(chain, head)| {
            let mut ordered = chain.clone();
            let position = ordered
                .iter()
                .position(|&node| node == head)
                .expect("a chain's head is one of its members");
            let head = ordered.remove(position);
            ordered.insert(0, head);
            ordered
        })
        .collect()
}

/// A node heading the most chains that can hand one on, and the path:
/// (chain, its new head) pairs, the last node reached first. Breadth-first
/// from each node with the most heads, over the chains it heads to their
/// other members, until one heads at least two fewer.
fn head_path(
    chains: &[Vec<usize>],
    head_of: &[usize],
    heads: &[u32],
) -> Option<(usize, Vec<(usize, usize)>)> {
    let nodes = heads.len();
    let mut headed = vec![Vec::new(); nodes];
    for (chain, &head) in head_of.iter().enumerate() {
        headed[head].push(chain);
    }
    let mut order: Vec<usize> = (0..nodes).collect();
    order.sort_by_key(|&node| std::cmp::Reverse(heads[node]));
    for &start in &order {
        let most = heads[start];
        if most < 2 {
            break;
        }
        let mut reached_by: Vec<Option<usize>> = vec![None; nodes];
        let mut seen = vec![false; nodes];
        seen[start] = true;
        let mut queue = std::collections::VecDeque::from([start]);
        while let Some(node) = queue.pop_front() {
            for &chain in &headed[node] {
                for &member in &chains[chain] {
                    if seen[member] {
                        continue;
                    }
                    seen[member] = true;
                    reached_by[member] = Some(chain);
                    if heads[member] + 2 <= most {
                        let mut path = Vec::new();
                        let mut at = member;
                        while at != start {
                            let chain = reached_by[at].expect("every reached node has its chain");
                            path.push((chain, at));
                            at = head_of[chain];
                        }
                        return Some((start, path));
                    }
                    queue.push_back(member);
                }
            }
        }
    }
    None
}

/// Disks and target ids: each node's targets go round-robin over its disks
/// in chain order, so a disk's chains are spread like its node's.
fn assign_disks(spec: &PlacementSpec, chains: &[Vec<usize>]) -> Vec<PlannedChain> {
    let mut next_disk = vec![0u32; spec.nodes.len()];
    let mut on_disk = vec![vec![0u32; spec.disks_per_node as usize]; spec.nodes.len()];
    chains
        .iter()
        .enumerate()
        .map(|(k, chain)| PlannedChain {
            chain: ChainId(spec.first_chain + k as u32),
            targets: chain
                .iter()
                .map(|&node| {
                    let disk = next_disk[node];
                    next_disk[node] = (disk + 1) % spec.disks_per_node;
                    on_disk[node][disk as usize] += 1;
                    let id = spec.nodes[node];
                    PlannedTarget {
                        target: target_id(id, disk, on_disk[node][disk as usize]),
                        node: id,
                        disk,
                    }
                })
                .collect(),
        })
        .collect()
}

fn balance(spec: &PlacementSpec, chains: &[PlannedChain], members: &Members) -> Balance {
    let nodes = spec.nodes.len();
    let index = |node: NodeId| {
        spec.nodes
            .iter()
            .position(|n| *n == node)
            .expect("planned nodes come from the spec")
    };
    let mut per_disk = vec![0u32; nodes * spec.disks_per_node as usize];
    let mut heads = vec![0u32; nodes];
    for chain in chains {
        heads[index(chain.targets[0].node)] += 1;
        for target in &chain.targets {
            per_disk[index(target.node) * spec.disks_per_node as usize + target.disk as usize] += 1;
        }
    }
    let replicas = spec.replicas;
    let mut pair_max = 0;
    let mut pair_bound = 0;
    let mut peers_min = u32::MAX;
    let mut peers_bound = u32::MAX;
    let mut share_max = 0f64;
    for a in 0..nodes {
        let load = members.load[a];
        let peer_replicas = load * (replicas - 1);
        let mut peers = 0;
        let mut most = 0;
        for b in (0..nodes).filter(|&b| b != a) {
            let shared = members.pair(a, b);
            most = most.max(shared);
            peers += u32::from(shared > 0);
        }
        pair_max = pair_max.max(most);
        if nodes > 1 {
            pair_bound = pair_bound.max(peer_replicas.div_ceil(nodes as u32 - 1));
        }
        peers_min = peers_min.min(peers);
        peers_bound = peers_bound.min(peer_replicas.min(nodes as u32 - 1));
        if peer_replicas > 0 {
            share_max = share_max.max(f64::from(most) / f64::from(peer_replicas));
        }
    }
    let min_max = |values: &[u32]| {
        (
            values.iter().copied().min().unwrap_or(0),
            values.iter().copied().max().unwrap_or(0),
        )
    };
    let (node_min, node_max) = min_max(&members.load);
    let (disk_min, disk_max) = min_max(&per_disk);
    let (heads_min, heads_max) = min_max(&heads);
    Balance {
        targets_per_node_min: node_min,
        targets_per_node_max: node_max,
        targets_per_disk_min: disk_min,
        targets_per_disk_max: disk_max,
        heads_per_node_min: heads_min,
        heads_per_node_max: heads_max,
        pair_max,
        pair_bound,
        recovery_peers_min: peers_min,
        recovery_peers_bound: peers_bound,
        recovery_share_max: share_max,
        recovery_share_ideal: if nodes > 1 && replicas > 1 {
            1.0 / (nodes as f64 - 1.0)
        } else {
            0.0
        },
    }
}

/// Where a replica of `chain` leaving node `from` goes: a live node
/// holding no member of the chain, the one with the fewest targets (lowest
/// id among equals), on its disk with the fewest targets among the disks it
/// has targets on (disk 0 for a node without any). `None` when no live node
/// is outside the chain.
pub fn replacement_for(
    routing: &RoutingInfo,
    chain: ChainId,
    from: NodeId,
) -> Option<(NodeId, u32)> {
    let info = routing.chain(chain)?;
    let in_chain: Vec<NodeId> = info
        .targets
        .iter()
        .filter_map(|member| routing.target(member.target).map(|t| t.node))
        .collect();
    let hosted = |node: NodeId| routing.targets.iter().filter(|t| t.node == node).count();
    let node = routing
        .nodes
        .iter()
        .filter(|n| n.alive && n.id != from && !in_chain.contains(&n.id))
        .min_by_key(|n| (hosted(n.id), n.id))?
        .id;
    let on_disk = |disk: u32| {
        routing
            .targets
            .iter()
            .filter(|t| t.node == node && t.disk == disk)
            .count()
    };
    let disks = routing
        .targets
        .iter()
        .filter(|t| t.node == node)
        .map(|t| t.disk + 1)
        .max()
        .unwrap_or(1);
    let disk = (0..disks).min_by_key(|&disk| (on_disk(disk), disk))?;
    Some((node, disk))
}

/// One move of a [`rebalance`] plan: chain member `old`, on node `from`,
/// goes to `to`/`disk` (as a new target that joins the chain, is filled by
/// a resync, and then takes `old`'s place).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RebalanceMove {
    pub chain: ChainId,
    pub old: TargetId,
    pub from: NodeId,
    pub to: NodeId,
    pub disk: u32,
}

/// The moves that even out chain members over the live nodes, at most
/// `max_moves` of them: after the plan, the busiest live node holds at most
/// one member more than the least busy (unless a chain's members already
/// cover every node a member could go to). Each move takes a member of the
/// busiest node whose chain has no member on some node holding at least two
/// fewer, and gives it to the least busy such node; among equals, the node
/// sharing the fewest chains with the chain's other members (so a later
/// failure's recovery still spreads), then the lowest id. On the new node
/// the member goes to the disk with the fewest members among `disks` (or,
/// when `disks` is `None`, among as many disks as the most of any node).
///
/// Only live nodes give or take members, and only chains whose members all
/// serve are touched (a move waits for its new member to serve; a degraded
/// chain is `drain-node`'s or the resync's to mend first). Unassigned
/// targets hold no data and are not counted.
pub fn rebalance(
    routing: &RoutingInfo,
    disks: Option<u32>,
    max_moves: usize,
) -> Vec<RebalanceMove> {
    let disks = disks
        .unwrap_or_else(|| {
            routing
                .targets
                .iter()
                .map(|t| t.disk + 1)
                .max()
                .unwrap_or(1)
        })
        .max(1);
    let live: Vec<NodeId> = routing
        .nodes
        .iter()
        .filter(|n| n.alive)
        .map(|n| n.id)
        .collect();
    // The model: each chain's members, updated as moves are planned.
    let mut chains: Vec<ModelChain> = routing
        .chains
        .iter()
        .map(|chain| ModelChain {
            id: chain.id,
            healthy: chain
                .targets
                .iter()
                .all(|m| m.state == PublicState::Serving),
            members: chain
                .targets
                .iter()
                .filter_map(|m| routing.target(m.target))
                .map(|t| ModelMember {
                    target: t.id,
                    node: t.node,
                    disk: t.disk,
                })
                .collect(),
        })
        .collect();
    let members_on = |chains: &[ModelChain], node: NodeId, disk: Option<u32>| {
        chains
            .iter()
            .flat_map(|c| &c.members)
            .filter(|m| m.node == node && disk.is_none_or(|d| m.disk == d))
            .count()
    };
    let mut moves: Vec<RebalanceMove> = Vec::new();
    while moves.len() < max_moves {
        let counts: Vec<(NodeId, usize)> = live
            .iter()
            .map(|&n| (n, members_on(&chains, n, None)))
            .collect();
        let mut sources = counts.clone();
        sources.sort_by_key(|&(node, held)| (std::cmp::Reverse(held), node));
        let mut best = None;
        'search: for &(from, held) in &sources {
            for (chain_index, chain) in chains.iter().enumerate() {
                if !chain.healthy {
                    continue;
                }
                // A member is moved once: its old target is gone after.
                let Some(slot) = chain
                    .members
                    .iter()
                    .position(|m| m.node == from && !moves.iter().any(|done| done.old == m.target))
                else {
                    continue;
                };
                let in_chain = |node: NodeId| chain.members.iter().any(|m| m.node == node);
                // Chains `node` shares with the members staying in this one.
                let shared = |node: NodeId| {
                    chains
                        .iter()
                        .filter(|other| other.members.iter().any(|m| m.node == node))
                        .map(|other| {
                            other
                                .members
                                .iter()
                                .filter(|m| m.node != from && in_chain(m.node))
                                .count()
                        })
                        .sum::<usize>()
                };
                let to = counts
                    .iter()
                    .filter(|&&(node, n)| n + 2 <= held && !in_chain(node))
                    .min_by_key(|&&(node, n)| (n, shared(node), node));
                if let Some(&(to, _)) = to {
                    best = Some((chain_index, slot, from, to));
                    break 'search;
                }
            }
        }
        let Some((chain_index, slot, from, to)) = best else {
            break;
        };
        let disk = (0..disks)
            .min_by_key(|&d| (members_on(&chains, to, Some(d)), d))
            .unwrap_or(0);
        let chain = &mut chains[chain_index];
        let old = chain.members[slot].target;
        chain.members[slot] = ModelMember {
            target: old,
            node: to,
            disk,
        };
        moves.push(RebalanceMove {
            chain: chain.id,
            old,
            from,
            to,
            disk,
        });
    }
    moves
}

/// A chain as [`rebalance`] plans over it.
struct ModelChain {
    id: ChainId,
    /// Every member serving: only such chains are touched.
    healthy: bool,
    members: Vec<ModelMember>,
}

/// A chain member where the plan has it so far (`target` stays the old
/// id: the new one is chosen when the move is made).
struct ModelMember {
    target: TargetId,
    node: NodeId,
    disk: u32,
}

/// The next free id of this module's scheme on `node`/`disk` (one past the
/// highest in use); `None` when the disk's ids are used up.
pub fn next_target_id(routing: &RoutingInfo, node: NodeId, disk: u32) -> Option<TargetId> {
    let first = target_id(node, disk, 1);
    let last = target_id(node, disk, TARGETS_PER_DISK_MAX);
    let next = routing
        .targets
        .iter()
        .map(|t| t.id)
        .filter(|id| (first..=last).contains(id))
        .max()
        .map_or(first, |id| TargetId(id.0 + 1));
    (next <= last).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nodes: u32, disks: u32, replicas: u32, chains: u32) -> PlacementSpec {
        PlacementSpec {
            nodes: (1..=nodes).map(NodeId).collect(),
            disks_per_node: disks,
            replicas,
            chains,
            first_chain: 1,
            seed: 7,
        }
    }

    /// Everything a plan promises whatever its shape: distinct nodes per
    /// chain, unique target ids that name their node and disk, loads within
    /// one per node and per disk of a node, and the balance it reports
    /// recomputed from the chains.
    fn check_plan(spec: &PlacementSpec, placement: &Placement) {
        assert_eq!(placement.chains.len(), spec.chains as usize);
        let mut ids = std::collections::HashSet::new();
        let mut per_node = std::collections::HashMap::<NodeId, Vec<u32>>::new();
        for (k, chain) in placement.chains.iter().enumerate() {
            assert_eq!(chain.chain, ChainId(spec.first_chain + k as u32));
            assert_eq!(chain.targets.len(), spec.replicas as usize);
            let nodes: std::collections::HashSet<_> =
                chain.targets.iter().map(|t| t.node).collect();
            assert_eq!(nodes.len(), chain.targets.len(), "{chain:?} repeats a node");
            for target in &chain.targets {
                assert!(ids.insert(target.target), "{:?} twice", target.target);
                assert_eq!(target.target.0 / 1_000_000, u64::from(target.node.0));
                assert_eq!(target.target.0 / 10_000 % 100, u64::from(target.disk));
                per_node
                    .entry(target.node)
                    .or_insert_with(|| vec![0; spec.disks_per_node as usize])
                    [target.disk as usize] += 1;
            }
        }
        let balance = &placement.balance;
        assert!(
            balance.targets_per_node_max - balance.targets_per_node_min <= 1,
            "{balance:?}"
        );
        for disks in per_node.values() {
            let (min, max) = (
                disks.iter().min().unwrap_or(&0),
                disks.iter().max().unwrap_or(&0),
            );
            assert!(max - min <= 1, "disks of one node {disks:?}");
        }
        let total: u32 = per_node.values().flatten().sum();
        assert_eq!(total, spec.chains * spec.replicas);
    }

    /// Over a grid of shapes the plan's busiest pair is within one chain of
    /// what any plan could do, and when the chains give every node enough
    /// peer replicas, every node shares a chain with every other.
    #[test]
    fn plans_stay_within_one_of_the_pair_bound() {
        for nodes in [3u32, 4, 5, 6, 7, 9, 12, 16, 25] {
            for replicas in 1..=3.min(nodes) {
                for disks in [1, 2, 4] {
                    for chains_per_disk in [1, 3, 8] {
                        let chains = (nodes * disks * chains_per_disk).div_ceil(replicas);
                        let spec = spec(nodes, disks, replicas, chains);
                        let placement = plan(&spec).expect("plan");
                        check_plan(&spec, &placement);
                        let balance = &placement.balance;
                        assert!(
                            balance.pair_max <= balance.pair_bound + 1,
                            "{nodes} nodes x {disks} disks, {replicas} replicas, {chains} chains: {balance:?}"
                        );
                        // With room to spare (every node's peer replicas at
                        // least twice the other nodes), every node meets
                        // every other.
                        if replicas > 1
                            && balance.targets_per_node_min * (replicas - 1) >= 2 * (nodes - 1)
                        {
                            assert_eq!(
                                balance.recovery_peers_min,
                                nodes - 1,
                                "{nodes} nodes, {replicas} replicas, {chains} chains: {balance:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Seven nodes, chains of three, seven chains: the Fano plane, where
    /// every two nodes share exactly one chain, exists, and the search
    /// finds a plan that good.
    #[test]
    fn finds_the_fano_plane() {
        let placement = plan(&spec(7, 1, 3, 7)).expect("plan");
        assert_eq!(placement.balance.pair_max, 1, "{:?}", placement.balance);
        assert_eq!(placement.balance.recovery_peers_min, 6);
    }

    /// A cluster the size the deployment guide shows: 12 nodes of 4 disks,
    /// 3 replicas, 16 chains per disk; and heads spread within one.
    #[test]
    fn a_large_plan_is_even() {
        let spec = spec(12, 4, 3, 12 * 4 * 16 / 3);
        let placement = plan(&spec).expect("plan");
        check_plan(&spec, &placement);
        let balance = &placement.balance;
        assert_eq!(
            (balance.targets_per_disk_min, balance.targets_per_disk_max),
            (16, 16)
        );
        assert!(
            balance.heads_per_node_max - balance.heads_per_node_min <= 1,
            "{balance:?}"
        );
        assert!(balance.pair_max <= balance.pair_bound + 1, "{balance:?}");
        assert!(
            balance.recovery_share_max <= 2.0 * balance.recovery_share_ideal,
            "{balance:?}"
        );
    }

    /// A replica leaving node 3 goes to the live node outside its chain with
    /// the fewest targets, on its least-used disk, under the next free id.
    #[test]
    fn replacements_go_to_the_least_loaded_live_node_outside_the_chain() {
        use flyfs_proto::ids::ChainVersion;
        use flyfs_proto::wire::mgmt::{ChainInfo, ChainTarget, NodeInfo, PublicState, TargetInfo};
        let node = |id: u32, alive: bool| NodeInfo {
            id: NodeId(id),
            addr: String::new(),
            alive,
        };
        let target = |id: u64, node: u32, disk: u32, chain: Option<u32>| TargetInfo {
            id: TargetId(id),
            node: NodeId(node),
            disk,
            chain: chain.map(ChainId),
            state: PublicState::Serving,
            leaving: false,
        };
        let mut routing = RoutingInfo {
            nodes: vec![
                node(1, true),
                node(2, true),
                node(3, false),
                node(4, true),
                node(5, false),
            ],
            targets: vec![
                target(1_000_001, 1, 0, Some(1)),
                target(2_000_001, 2, 0, Some(1)),
                target(3_000_001, 3, 0, Some(1)),
                target(4_000_001, 4, 0, Some(2)),
                target(4_010_001, 4, 1, Some(3)),
                target(4_010_002, 4, 1, Some(4)),
            ],
            chains: vec![ChainInfo {
                id: ChainId(1),
                version: ChainVersion(1),
                targets: [1_000_001, 2_000_001, 3_000_001]
                    .map(|t| ChainTarget {
                        target: TargetId(t),
                        state: PublicState::Serving,
                    })
                    .to_vec(),
            }],
            ..RoutingInfo::default()
        };
        // Node 4 is the only live node outside chain 1; disk 0 holds fewer.
        assert_eq!(
            replacement_for(&routing, ChainId(1), NodeId(3)),
            Some((NodeId(4), 0))
        );
        assert_eq!(
            next_target_id(&routing, NodeId(4), 0),
            Some(TargetId(4_000_002))
        );
        assert_eq!(
            next_target_id(&routing, NodeId(4), 1),
            Some(TargetId(4_010_003))
        );
        assert_eq!(
            next_target_id(&routing, NodeId(6), 0),
            Some(TargetId(6_000_001))
        );
        // With node 4 down nothing qualifies: the dead node 5 never does.
        routing.nodes[3].alive = false;
        assert_eq!(replacement_for(&routing, ChainId(1), NodeId(3)), None);
        assert_eq!(replacement_for(&routing, ChainId(9), NodeId(3)), None);
        routing.targets.push(target(4_009_999, 4, 0, None));
        assert_eq!(next_target_id(&routing, NodeId(4), 0), None);
    }

    #[test]
    fn same_seed_same_plan() {
        let a = plan(&spec(9, 2, 3, 24)).expect("plan");
        let b = plan(&spec(9, 2, 3, 24)).expect("plan");
        assert_eq!(a.chains, b.chains);
    }

    #[test]
    fn bad_shapes_are_refused_with_the_reason() {
        assert_eq!(
            plan(&spec(2, 1, 3, 4)).map(|_| ()),
            Err(PlacementError::TooFewNodes {
                nodes: 2,
                replicas: 3
            })
        );
        assert_eq!(
            plan(&spec(3, 1, 0, 4)).map(|_| ()),
            Err(PlacementError::NoReplicas)
        );
        assert_eq!(
            plan(&spec(3, 1, 3, 0)).map(|_| ()),
            Err(PlacementError::NoChains)
        );
        assert_eq!(
            plan(&spec(3, 0, 3, 4)).map(|_| ()),
            Err(PlacementError::Disks(0))
        );
        let mut twice = spec(3, 1, 2, 4);
        twice.nodes[2] = NodeId(1);
        assert_eq!(
            plan(&twice).map(|_| ()),
            Err(PlacementError::DuplicateNode(NodeId(1)))
        );
        let crowded = spec(3, 1, 3, 10_000);
        assert!(matches!(
            plan(&crowded),
            Err(PlacementError::TooManyTargets { .. })
        ));
        let mut late = spec(3, 1, 3, 4);
        late.first_chain = u32::MAX - 1;
        assert!(matches!(plan(&late), Err(PlacementError::ChainIds { .. })));
    }

    /// The routing a cluster built from `placement` shows, with `extra`
    /// more live nodes that hold nothing yet.
    fn routing_of(placement: &Placement, nodes: u32, extra: u32) -> RoutingInfo {
        use flyfs_proto::ids::ChainVersion;
        use flyfs_proto::wire::mgmt::{ChainInfo, ChainTarget, NodeInfo, TargetInfo};
        RoutingInfo {
            nodes: (1..=nodes + extra)
                .map(|id| NodeInfo {
                    id: NodeId(id),
                    addr: String::new(),
                    alive: true,
                })
                .collect(),
            targets: placement
                .chains
                .iter()
                .flat_map(|chain| {
                    chain.targets.iter().map(|t| TargetInfo {
                        id: t.target,
                        node: t.node,
                        disk: t.disk,
                        chain: Some(chain.chain),
                        state: PublicState::Serving,
                        leaving: false,
                    })
                })
                .collect(),
            chains: placement
                .chains
                .iter()
                .map(|chain| ChainInfo {
                    id: chain.chain,
                    version: ChainVersion(1),
                    targets: chain
                        .targets
                        .iter()
                        .map(|t| ChainTarget {
                            target: t.target,
                            state: PublicState::Serving,
                        })
                        .collect(),
                })
                .collect(),
            ..RoutingInfo::default()
        }
    }

    /// Carries out `moves` on `routing` the way `flyfs admin rebalance`
    /// does (a new target in the old one's place), checking each is valid
    /// when it is made.
    fn apply(routing: &mut RoutingInfo, moves: &[RebalanceMove]) {
        for m in moves {
            let new = next_target_id(routing, m.to, m.disk).expect("a free id");
            let old = routing
                .target(m.old)
                .cloned()
                .expect("the old target exists");
            assert_eq!((old.node, old.chain), (m.from, Some(m.chain)), "{m:?}");
            let chain = routing
                .chains
                .iter_mut()
                .find(|c| c.id == m.chain)
                .expect("chain");
            let member = chain
                .targets
                .iter_mut()
                .find(|t| t.target == m.old)
                .expect("member");
            member.target = new;
            routing.targets.retain(|t| t.id != m.old);
            routing.targets.push(flyfs_proto::wire::mgmt::TargetInfo {
                id: new,
                node: m.to,
                disk: m.disk,
                chain: Some(m.chain),
                state: PublicState::Serving,
                leaving: false,
            });
            let nodes: std::collections::HashSet<NodeId> = routing
                .chain(m.chain)
                .expect("chain")
                .targets
                .iter()
                .map(|t| routing.target(t.target).expect("member target").node)
                .collect();
            assert_eq!(
                nodes.len(),
                3,
                "{m:?} put two members of a chain on one node"
            );
        }
    }

    fn members_per_node(routing: &RoutingInfo) -> Vec<usize> {
        routing
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| {
                routing
                    .targets
                    .iter()
                    .filter(|t| t.node == n.id && t.chain.is_some())
                    .count()
            })
            .collect()
    }

    /// Nodes added to a planned cluster take their share: after the moves
    /// every live node holds within one member of every other, each new
    /// node's members spread over its disks, no chain has two members on a
    /// node, no member moves twice; a balanced cluster plans no move, and
    /// a plan cut short by `max_moves` is the start of the full one.
    #[test]
    fn rebalance_evens_members_over_added_nodes() {
        for (nodes, extra, chains) in [(6, 3, 16), (3, 1, 2), (5, 1, 10), (12, 4, 40)] {
            let placement = plan(&spec(nodes, 2, 3, chains)).expect("plan");
            let mut routing = routing_of(&placement, nodes, extra);
            let before = members_per_node(&routing);
            let moves = rebalance(&routing, None, usize::MAX);
            assert!(!moves.is_empty(), "{nodes}+{extra}: nothing planned");
            let mut old: Vec<TargetId> = moves.iter().map(|m| m.old).collect();
            old.sort();
            old.dedup();
            assert_eq!(old.len(), moves.len(), "a member moved twice: {moves:?}");
            assert!(moves.iter().all(|m| m.to.0 > nodes), "{moves:?}");
            let shorter = rebalance(&routing, None, 2);
            assert_eq!(shorter[..], moves[..moves.len().min(2)]);
            apply(&mut routing, &moves);
            let after = members_per_node(&routing);
            let lo = after.iter().min().expect("live nodes");
            let hi = after.iter().max().expect("live nodes");
            assert!(hi - lo <= 1, "{nodes}+{extra}: {before:?} became {after:?}");
            for new in nodes + 1..=nodes + extra {
                let disks: Vec<usize> = (0..2)
                    .map(|d| {
                        routing
                            .targets
                            .iter()
                            .filter(|t| t.node == NodeId(new) && t.disk == d)
                            .count()
                    })
                    .collect();
                assert!(
                    disks[0].abs_diff(disks[1]) <= 1,
                    "node {new}: disks {disks:?}"
                );
            }
            assert_eq!(rebalance(&routing, None, usize::MAX), vec![]);
        }
    }

    /// Dead nodes neither give nor take members, and a chain with a member
    /// not serving is left alone.
    #[test]
    fn rebalance_leaves_dead_nodes_and_degraded_chains_alone() {
        let placement = plan(&spec(3, 1, 3, 6)).expect("plan");
        let mut routing = routing_of(&placement, 3, 2);
        routing.nodes[4].alive = false;
        let moves = rebalance(&routing, None, usize::MAX);
        assert!(!moves.is_empty());
        assert!(moves.iter().all(|m| m.to == NodeId(4)), "{moves:?}");
        for chain in &mut routing.chains {
            chain.targets[1].state = PublicState::Syncing;
        }
        assert_eq!(rebalance(&routing, None, usize::MAX), vec![]);
    }
}
