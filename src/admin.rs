//! `flyfs admin`: the operator's view of a cluster and the manager's admin
//! operations (create targets, chains and chain tables, take a target
//! offline), plus a storage node's space. Each command is one RPC; a refusal
//! from the manager (`MgmtError`) becomes an error naming the command, so
//! the process exits with status 1 and says why.

use std::sync::Arc;
use std::time::Duration;

use crate::membership;
use anyhow::{Context, bail};
use bytes::Bytes;
use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_client::mgmt::Managers;
use flyfs_craq::placement::{self, Placement, PlacementSpec};
use flyfs_proto::Method;
use flyfs_proto::auth::Principal;
use flyfs_proto::ids::{ChainId, ChainTableId, NodeId, RoutingVersion, TargetId};
use flyfs_proto::wire::meta::{
    Attr, FileType, GcStatus, GcStatusReq, GcStatusRsp, MetaError, Readdir, ReaddirReq, ReaddirRsp,
    Readlink, ReadlinkRsp, Resolve, ResolveReq, Stat, StatReq, User,
};
use flyfs_proto::wire::mgmt::{
    AddChainMember, ChainMemberReq, CreateChain, CreateChainReq, CreateChainTable,
    CreateChainTableReq, CreateTarget, CreateTargetReq, GetSyncProgress, GetSyncProgressReq,
    MgmtError, RemoveChainMember, RemoveNode, RemoveNodeReq, RemoveTarget, RemoveTargetReq,
    RoutingInfo, SetTargetOffline, SetTargetOfflineReq, SyncProgress,
};
use flyfs_proto::wire::storage::{Space, SpaceReq, SpaceRsp};
use flyfs_rpc::{CallOptions, Client, ClientConfig, Credentials, Tcp};

#[derive(clap::Args, Debug)]
pub(crate) struct AdminArgs {
    /// The cluster managers' addresses, comma-separated (the primary is
    /// found among them).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7000")]
    mgmt: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// The metadata service's addresses, comma-separated (for `gc`, `ls`
    /// and `stat`).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7001")]
    meta: Vec<String>,
    /// Deadline of the RPC, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
    /// A `flyfs up` data directory: use its admin credentials
    /// (DIR/tls/admin.pem, admin.key).
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// A directory with ca.pem, admin.pem and admin.key (as `flyfs certs
    /// issue --role admin` writes); takes precedence over --data.
    #[arg(long)]
    credentials: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(clap::Subcommand, Debug)]
enum AdminCommand {
    /// Nodes (alive or not), chains with their version and each target's
    /// state, chain tables, and each live node's disk usage.
    Status,
    /// The metadata service's garbage collector: queued and due removals,
    /// chunks and inodes it finished.
    Gc,
    /// List a directory of the namespace like `ls -l`, without a mount.
    Ls {
        /// Absolute path in flyfs (e.g. `/` or `/data/run1`).
        path: String,
    },
    /// Show one file's or directory's attributes and layout like `stat`,
    /// without a mount.
    Stat {
        /// Absolute path in flyfs.
        path: String,
    },
    /// Declare a target on a device of a registered node.
    CreateTarget {
        #[arg(long)]
        target: u64,
        #[arg(long)]
        node: u32,
        /// The device's index in the node's `devices` list.
        #[arg(long)]
        disk: u32,
    },
    /// Build a chain from unassigned targets on distinct nodes, head first.
    CreateChain {
        #[arg(long)]
        chain: u32,
        /// Comma-separated target ids, head first (e.g. 1,2,3).
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<u64>,
    },
    /// Create a chain table over existing chains.
    CreateTable {
        #[arg(long)]
        table: u32,
        /// Comma-separated chain ids (e.g. 1,2).
        #[arg(long, value_delimiter = ',', required = true)]
        chains: Vec<u32>,
    },
    /// Take a target offline; it returns through a resync once its node
    /// reports it again.
    Offline {
        #[arg(long)]
        target: u64,
    },
    /// Forget a storage node that is down and hosts no target (stop its
    /// daemon first).
    RemoveNode {
        #[arg(long)]
        node: u32,
    },
    /// Plan a balanced chain table for nodes x disks x replicas: prints the
    /// chains and how even they are (no manager needed); with --apply,
    /// creates the targets, chains and chain table through the manager.
    Placement(PlacementArgs),
    /// Add an unassigned target to the end of a chain; a resync fills it
    /// while the chain serves.
    AddMember {
        #[arg(long)]
        chain: u32,
        #[arg(long)]
        target: u64,
    },
    /// Take a target out of its chain (refused if no serving member would
    /// be left); it stays declared, unassigned.
    RemoveMember {
        #[arg(long)]
        chain: u32,
        #[arg(long)]
        target: u64,
    },
    /// Forget a target that belongs to no chain.
    RemoveTarget {
        #[arg(long)]
        target: u64,
    },
    /// Replace a chain's member (a failed node's replica, say) by a new
    /// target on another node: it joins, syncs while the chain serves, and
    /// the old one leaves once the new one serves.
    ReplaceTarget {
        #[arg(long)]
        chain: u32,
        /// The member to replace.
        #[arg(long)]
        old: u64,
        /// The node of the new target.
        #[arg(long)]
        node: u32,
        /// The device index of the new target on that node.
        #[arg(long, default_value_t = 0)]
        disk: u32,
        /// Id of the new target (default: the next free id of the placement
        /// scheme, node * 1000000 + disk * 10000 + n).
        #[arg(long)]
        new_target: Option<u64>,
        /// How long to wait for the new target to serve.
        #[arg(long, default_value_t = 3600)]
        timeout_s: u64,
    },
    /// Move every replica off a node (dead or alive) onto the live nodes
    /// with the fewest targets, one chain at a time, then forget its
    /// targets; `remove-node` forgets the node once its daemon is stopped.
    DrainNode {
        #[arg(long)]
        node: u32,
        /// How long to wait for each new replica to serve.
        #[arg(long, default_value_t = 3600)]
        timeout_s: u64,
    },
    /// Even out replicas over the live storage nodes (after adding nodes):
    /// a replica of the busiest node moves to the least busy one outside
    /// its chain, one chain at a time, each new replica filled by a resync
    /// while the chain serves, until every live node holds within one
    /// replica of every other. Chains with a member not serving are left
    /// alone.
    Rebalance {
        /// Print the plan and move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Stop after this many moves (default: as many as it takes).
        #[arg(long)]
        max_moves: Option<usize>,
        /// Disks per node to spread the new replicas over (default: as many
        /// as the node with the most has targets on).
        #[arg(long)]
        disks: Option<u32>,
        /// How long to wait for each new replica to serve.
        #[arg(long, default_value_t = 3600)]
        timeout_s: u64,
    },
    /// Space of every device of one storage node (asks the node itself).
    Space {
        /// The storage node's address.
        #[arg(long)]
        node_addr: String,
    },
}

#[derive(clap::Args, Debug)]
struct PlacementArgs {
    /// Storage node ids: ids and ranges, comma-separated (e.g. 1-12,20).
    #[arg(long, value_delimiter = ',', required = true, value_parser = parse_node_range)]
    nodes: Vec<Vec<u32>>,
    /// Disks per node: targets go to disks 0 to D-1, the indexes into each
    /// node's `devices`.
    #[arg(long, default_value_t = 1)]
    disks: u32,
    /// Replicas per chain.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Targets per disk: the plan has nodes x disks x this / replicas
    /// chains, rounded up.
    #[arg(long, default_value_t = 8, conflicts_with = "chains")]
    targets_per_disk: u32,
    /// How many chains to plan, instead of --targets-per-disk.
    #[arg(long)]
    chains: Option<u32>,
    /// Id of the first chain.
    #[arg(long, default_value_t = 1)]
    first_chain: u32,
    /// The chain table --apply creates over the planned chains.
    #[arg(long, default_value_t = 1)]
    table: u32,
    /// Seed of the planner's search: same shape and seed, same plan.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Create the plan through the manager: every target, chain and the
    /// table. Refused, before creating anything, if one of them exists.
    #[arg(long)]
    apply: bool,
}

/// `7` or `1-12`, for --nodes.
fn parse_node_range(text: &str) -> Result<Vec<u32>, String> {
    let parse = |id: &str| {
        id.trim()
            .parse::<u32>()
            .map_err(|_| format!("{id:?} is not a node id"))
    };
    match text.split_once('-') {
        Some((first, last)) => {
            let (first, last) = (parse(first)?, parse(last)?);
            if first > last {
                return Err(format!("the range {text} is empty"));
            }
            Ok((first..=last).collect())
        }
        None => Ok(vec![parse(text)?]),
    }
}

fn plan_placement(args: &PlacementArgs) -> anyhow::Result<Placement> {
    let nodes: Vec<NodeId> = args.nodes.iter().flatten().copied().map(NodeId).collect();
    let chains = match args.chains {
        Some(chains) => chains,
        None => {
            let targets = u64::try_from(nodes.len())?
                * u64::from(args.disks)
                * u64::from(args.targets_per_disk);
            u32::try_from(targets.div_ceil(u64::from(args.replicas.max(1))))
                .context("too many chains for 32-bit chain ids")?
        }
    };
    let spec = PlacementSpec {
        nodes,
        disks_per_node: args.disks,
        replicas: args.replicas,
        chains,
        first_chain: args.first_chain,
        seed: args.seed,
    };
    Ok(placement::plan(&spec)?)
}

fn placement_text(plan: &Placement) -> String {
    let b = &plan.balance;
    let (first, last) = (&plan.chains[0], &plan.chains[plan.chains.len() - 1]);
    let mut text = format!(
        "{} chains of {} replicas (chains {} to {})\n\
         targets per node {}..{}, per disk {}..{}; chains headed per node {}..{}\n\
         most chains two nodes share: {} (no plan of this shape has fewer than {})\n\
         a failed node recovers from at least {} peers (at most {} possible); \
         the busiest peer serves {:.1}% of it (evenly spread: {:.1}%)\n",
        plan.chains.len(),
        first.targets.len(),
        first.chain.0,
        last.chain.0,
        b.targets_per_node_min,
        b.targets_per_node_max,
        b.targets_per_disk_min,
        b.targets_per_disk_max,
        b.heads_per_node_min,
        b.heads_per_node_max,
        b.pair_max,
        b.pair_bound,
        b.recovery_peers_min,
        b.recovery_peers_bound,
        100.0 * b.recovery_share_max,
        100.0 * b.recovery_share_ideal,
    );
    text.push_str("chain   targets, head first (target@node/disk)\n");
    for chain in &plan.chains {
        let targets: Vec<String> = chain
            .targets
            .iter()
            .map(|t| format!("{}@{}/{}", t.target.0, t.node.0, t.disk))
            .collect();
        text.push_str(&format!("{:<7} {}\n", chain.chain.0, targets.join(" ")));
    }
    text
}

/// Creates every target and chain of `plan` and a table over the chains,
/// after checking that none of them exists yet.
async fn apply_placement(admin: &Admin, plan: &Placement, table: u32) -> anyhow::Result<()> {
    let routing = admin.routing().await?;
    for chain in &plan.chains {
        if routing.chains.iter().any(|c| c.id == chain.chain) {
            anyhow::bail!(
                "chain {} exists already: plan past the existing chains (--first-chain)",
                chain.chain.0
            );
        }
        if let Some(target) = chain
            .targets
            .iter()
            .find(|t| routing.target(t.target).is_some())
        {
            anyhow::bail!("target {} exists already", target.target.0);
        }
    }
    if routing.tables.iter().any(|t| t.id == ChainTableId(table)) {
        anyhow::bail!("chain table {table} exists already (--table)");
    }
    for chain in &plan.chains {
        for target in &chain.targets {
            let req = CreateTargetReq {
                target: target.target,
                node: target.node,
                disk: target.disk,
            };
            admin.mutate::<CreateTarget>("create-target", &req).await?;
        }
        let req = CreateChainReq {
            chain: chain.chain,
            targets: chain.targets.iter().map(|t| t.target).collect(),
        };
        admin.mutate::<CreateChain>("create-chain", &req).await?;
    }
    let req = CreateChainTableReq {
        table: ChainTableId(table),
        chains: plan.chains.iter().map(|c| c.chain).collect(),
    };
    admin.mutate::<CreateChainTable>("create-table", &req).await
}

pub(crate) async fn run(args: &AdminArgs) -> anyhow::Result<()> {
    // Planning needs no manager (and no credentials): only applying does.
    if let AdminCommand::Placement(placement) = &args.command {
        let plan = plan_placement(placement)?;
        if placement.apply {
            let credentials =
                crate::certs::admin(args.credentials.as_deref(), args.data.as_deref())?;
            let admin = Admin::new(
                &args.mgmt,
                Duration::from_millis(args.timeout_ms),
                credentials,
            );
            apply_placement(&admin, &plan, placement.table).await?;
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            print!("{}", placement_text(&plan));
        }
        return Ok(());
    }
    let credentials = crate::certs::admin(args.credentials.as_deref(), args.data.as_deref())?;
    let admin = Admin::new(
        &args.mgmt,
        Duration::from_millis(args.timeout_ms),
        credentials.clone(),
    );
    match &args.command {
        AdminCommand::Status => {
            let routing = admin.routing().await?;
            let usage = admin.usage(&routing).await;
            let syncs = admin.sync_progress().await;
            if args.json {
                let status = Status {
                    routing,
                    usage,
                    syncs,
                };
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status_table(&routing));
                print!("{}", usage_table(&routing, &usage));
                print!("{}", syncs_table(&syncs));
            }
            return Ok(());
        }
        AdminCommand::Gc | AdminCommand::Ls { .. } | AdminCommand::Stat { .. } => {
            let timeout = Duration::from_millis(args.timeout_ms);
            let ns = Namespace::new(&args.meta, timeout, credentials)?;
            return match &args.command {
                AdminCommand::Gc => ns.gc(args.json).await,
                AdminCommand::Ls { path } => ns.ls(path, args.json).await,
                AdminCommand::Stat { path } => ns.stat(path, args.json).await,
                _ => Ok(()),
            };
        }
        AdminCommand::Space { node_addr } => {
            let (space, _) = admin
                .client
                .call::<Space>(node_addr, &SpaceReq {}, Bytes::new(), &admin.options)
                .await
                .with_context(|| format!("asking storage node {node_addr} for its space"))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&space)?);
            } else {
                print!("{}", space_table(&space));
            }
            return Ok(());
        }
        AdminCommand::CreateTarget { target, node, disk } => {
            let req = CreateTargetReq {
                target: TargetId(*target),
                node: NodeId(*node),
                disk: *disk,
            };
            admin.mutate::<CreateTarget>("create-target", &req).await?;
        }
        AdminCommand::CreateChain { chain, targets } => {
            let req = CreateChainReq {
                chain: ChainId(*chain),
                targets: targets.iter().copied().map(TargetId).collect(),
            };
            admin.mutate::<CreateChain>("create-chain", &req).await?;
        }
        AdminCommand::CreateTable { table, chains } => {
            let req = CreateChainTableReq {
                table: ChainTableId(*table),
                chains: chains.iter().copied().map(ChainId).collect(),
            };
            admin
                .mutate::<CreateChainTable>("create-table", &req)
                .await?;
        }
        AdminCommand::Offline { target } => {
            let req = SetTargetOfflineReq {
                target: TargetId(*target),
            };
            admin.mutate::<SetTargetOffline>("offline", &req).await?;
        }
        AdminCommand::Placement(_) => unreachable!("handled before connecting"),
        AdminCommand::AddMember { chain, target } => {
            let req = ChainMemberReq {
                chain: ChainId(*chain),
                target: TargetId(*target),
            };
            admin.mutate::<AddChainMember>("add-member", &req).await?;
        }
        AdminCommand::RemoveMember { chain, target } => {
            let req = ChainMemberReq {
                chain: ChainId(*chain),
                target: TargetId(*target),
            };
            admin
                .mutate::<RemoveChainMember>("remove-member", &req)
                .await?;
        }
        AdminCommand::RemoveTarget { target } => {
            let req = RemoveTargetReq {
                target: TargetId(*target),
            };
            admin.mutate::<RemoveTarget>("remove-target", &req).await?;
        }
        AdminCommand::ReplaceTarget {
            chain,
            old,
            node,
            disk,
            new_target,
            timeout_s,
        } => {
            let planned = membership::Move {
                chain: ChainId(*chain),
                old: TargetId(*old),
                node: NodeId(*node),
                disk: *disk,
                new: new_target.map(TargetId),
            };
            let timeout = Duration::from_secs(*timeout_s);
            let done = membership::replace_target(&admin, &planned, timeout, false).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            }
            return Ok(());
        }
        AdminCommand::DrainNode { node, timeout_s } => {
            let timeout = Duration::from_secs(*timeout_s);
            let done = membership::drain_node(&admin, NodeId(*node), timeout, false).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                println!(
                    "node {node}: {} replicas moved; stop its daemon, then `flyfs admin remove-node --node {node}`",
                    done.len()
                );
            }
            return Ok(());
        }
        AdminCommand::Rebalance {
            dry_run,
            max_moves,
            disks,
            timeout_s,
        } => {
            let timeout = Duration::from_secs(*timeout_s);
            let max_moves = max_moves.unwrap_or(usize::MAX);
            let done =
                membership::rebalance(&admin, *disks, max_moves, *dry_run, timeout, false).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else if *dry_run {
                for m in &done.planned {
                    println!(
                        "chain {}: target {} from node {} to node {} disk {}",
                        m.chain.0, m.old.0, m.from.0, m.to.0, m.disk
                    );
                }
                println!("{} moves planned", done.planned.len());
            } else {
                println!("{} replicas moved", done.moved.len());
            }
            return Ok(());
        }
        AdminCommand::RemoveNode { node } => {
            let req = RemoveNodeReq {
                node: NodeId(*node),
            };
            admin.mutate::<RemoveNode>("remove-node", &req).await?;
        }
    }
    if args.json {
        println!("{{\"ok\":true}}");
    } else {
        println!("ok");
    }
    Ok(())
}

/// The managers and how to call them (also what `flyfs up` builds its
/// cluster with).
pub(crate) struct Admin {
    client: Client<Tcp>,
    options: CallOptions,
    managers: Managers,
    /// The addresses as given, for messages.
    mgmt: String,
}

impl Admin {
    /// The resyncs under way (`GetSyncProgress`); none from a manager that
    /// cannot say (an older one), since progress is only shown.
    pub(crate) async fn sync_progress(&self) -> Vec<SyncProgress> {
        match self
            .managers
            .call::<GetSyncProgress, _>(&self.client, &GetSyncProgressReq {}, &self.options)
            .await
        {
            Ok(Ok(rsp)) => rsp.syncs,
            Ok(Err(error)) => {
                tracing::debug!("no resync progress from the manager: {error}");
                Vec::new()
            }
            Err(error) => {
                tracing::debug!("no resync progress from the manager: {error}");
                Vec::new()
            }
        }
    }

    /// Calls to the managers at `mgmt`, each with deadline `timeout`.
    pub(crate) fn new(mgmt: &[String], timeout: Duration, credentials: Credentials) -> Admin {
        Admin {
            client: Client::new(Tcp, ClientConfig::default(), credentials),
            options: CallOptions {
                timeout,
                ..CallOptions::default()
            },
            managers: Managers::new(mgmt.iter().cloned()),
            mgmt: mgmt.join(","),
        }
    }

    /// The RPC client and per-call options, for calls to storage nodes.
    pub(crate) fn rpc(&self) -> (&Client<Tcp>, &CallOptions) {
        (&self.client, &self.options)
    }

    pub(crate) async fn routing(&self) -> anyhow::Result<RoutingInfo> {
        // Through the client library's fetch, which assembles a table too
        // large for one message from its pages.
        let routing = flyfs_client::mgmt::fetch_routing(
            &self.client,
            &self.managers,
            RoutingVersion(0),
            &self.options,
        )
        .await
        .with_context(|| format!("asking the cluster manager at {}", self.mgmt))?;
        // The manager answers `None` to a caller that already has its
        // version: for version 0 that is a new cluster, empty (no node has
        // registered yet).
        Ok(routing.unwrap_or_default())
    }

    pub(crate) async fn mutate<M>(&self, command: &str, req: &M::Req) -> anyhow::Result<()>
    where
        M: Method<Rsp = Result<(), MgmtError>>,
    {
        let rsp = self
            .managers
            .call::<M, _>(&self.client, req, &self.options)
            .await
            .with_context(|| {
                format!(
                    "{command}: cannot reach the cluster manager at {}",
                    self.mgmt
                )
            })?;
        if let Err(error) = rsp {
            // The manager that answered last is the one that refused.
            let at = self.managers.primary().unwrap_or_else(|| self.mgmt.clone());
            bail!("{command}: the cluster manager at {at} refused: {error}");
        }
        Ok(())
    }
}

/// `admin --json status`: the routing information with each node's usage.
#[derive(serde::Serialize)]
struct Status {
    #[serde(flatten)]
    routing: RoutingInfo,
    usage: Vec<NodeUsage>,
    /// The resyncs under way, as their sources last reported them.
    syncs: Vec<SyncProgress>,
}

/// One storage node's answer to `Space`, or why there is none.
#[derive(Clone, Debug, serde::Serialize)]
struct NodeUsage {
    node: u32,
    addr: String,
    disks: Vec<flyfs_proto::wire::storage::DiskSpace>,
    /// Set when the node did not answer (or is not alive).
    error: Option<String>,
}

impl Admin {
    /// Every node's space, asked of the live ones concurrently.
    async fn usage(&self, routing: &RoutingInfo) -> Vec<NodeUsage> {
        let mut asks = tokio::task::JoinSet::new();
        for (index, node) in routing.nodes.iter().enumerate() {
            let (client, options, node) = (self.client.clone(), self.options, node.clone());
            asks.spawn(async move {
                let (disks, error) = if !node.alive {
                    (Vec::new(), Some("not alive".to_string()))
                } else {
                    match client
                        .call::<Space>(&node.addr, &SpaceReq {}, Bytes::new(), &options)
                        .await
                    {
                        Ok((space, _)) => (space.disks, None),
                        Err(error) => (Vec::new(), Some(error.to_string())),
                    }
                };
                let usage = NodeUsage {
                    node: node.id.0,
                    addr: node.addr,
                    disks,
                    error,
                };
                (index, usage)
            });
        }
        let mut usage: Vec<(usize, NodeUsage)> = asks.join_all().await;
        usage.sort_by_key(|(index, _)| *index);
        usage.into_iter().map(|(_, u)| u).collect()
    }
}

/// Disk usage per node, with the targets each disk holds.
fn usage_table(routing: &RoutingInfo, usage: &[NodeUsage]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "\nusage");
    let _ = writeln!(
        out,
        "  {:>6}  {:>4}  {:>10}  {:>10}  {:>5}  {:>8}  {:<8}  targets",
        "node", "disk", "capacity", "used", "use%", "chunks", "state"
    );
    for node in usage {
        if let Some(error) = &node.error {
            let _ = writeln!(out, "  {:>6}  {:>4}  {error}", node.node, "-");
            continue;
        }
        for disk in &node.disks {
            let targets: Vec<String> = routing
                .targets
                .iter()
                .filter(|t| t.node.0 == node.node && t.disk == disk.disk)
                .map(|t| t.id.0.to_string())
                .collect();
            let percent = if disk.data_bytes == 0 {
                0.0
            } else {
                100.0 * disk.allocated_bytes as f64 / disk.data_bytes as f64
            };
            let state = if disk.poisoned { "POISONED" } else { "ok" };
            let _ = writeln!(
                out,
                "  {:>6}  {:>4}  {:>10}  {:>10}  {:>4.1}%  {:>8}  {:<8}  {}",
                node.node,
                disk.disk,
                human_bytes(disk.data_bytes),
                human_bytes(disk.allocated_bytes),
                percent,
                disk.committed_chunks,
                state,
                targets.join(",")
            );
            if disk.freeing_chunks > 0 {
                let _ = writeln!(
                    out,
                    "  {:>6}  {:>4}  freeing {} in {} chunks of replicas moved away",
                    "",
                    "",
                    human_bytes(disk.freeing_bytes),
                    disk.freeing_chunks
                );
            }
        }
    }
    out
}

/// The resyncs under way, one line each (nothing when there are none).
fn syncs_table(syncs: &[SyncProgress]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if syncs.is_empty() {
        return out;
    }
    let _ = writeln!(out, "\nresyncs");
    for p in syncs {
        let _ = writeln!(
            out,
            "  chain {} target {}: {}",
            p.chain.0,
            p.target.0,
            progress_text(p)
        );
    }
    out
}

/// `1.2 MiB / 4.0 MiB (30 %), 12 / 40 chunks`.
pub(crate) fn progress_text(p: &SyncProgress) -> String {
    let percent = if p.bytes_total == 0 {
        100.0
    } else {
        100.0 * p.bytes_done as f64 / p.bytes_total as f64
    };
    format!(
        "{} / {} ({percent:.0} %), {} / {} chunks",
        human_bytes(p.bytes_done),
        human_bytes(p.bytes_total),
        p.chunks_done,
        p.chunks_total
    )
}

/// Bytes in binary units, one decimal (`1.5 GiB`).
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The metadata service, for `gc`, `ls` and `stat`.
/// Whom an admin credential's namespace requests name: the uid and gid its
/// certificate names, the only caller the metadata service lets it act as.
pub(crate) fn acting_user(credentials: &Credentials) -> anyhow::Result<User> {
    let Principal::Admin { uid, gid, .. } = credentials.identity().principal else {
        bail!(
            "{} is not an admin credential: the namespace commands act as the uid and gid \
             an admin certificate names",
            credentials.identity()
        );
    };
    Ok(User::new(uid, gid, Vec::new()))
}

struct Namespace {
    client: Arc<MetaClient<Tcp>>,
    /// The addresses as given, for messages.
    meta: String,
    /// Whom the requests name: the uid and gid of the admin credential,
    /// the only caller the metadata service lets it act as.
    user: User,
}

/// One `ls` line. Names and symlink targets are bytes chosen by whoever
/// made the file, so they are kept escaped ([`escape_name`]) from the moment
/// they arrive: printed raw, a name could write terminal escapes onto the
/// operator's screen (retitle it, recolour it, hide the lines above).
#[derive(serde::Serialize)]
struct ListEntry {
    name: String,
    attr: Attr,
    /// Symlinks: where they point.
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

impl Namespace {
    fn new(
        meta: &[String],
        timeout: Duration,
        credentials: Credentials,
    ) -> anyhow::Result<Namespace> {
        let user = acting_user(&credentials)?;
        let mut config = MetaClientConfig::new(meta.to_vec());
        config.rpc_timeout = timeout;
        // An admin command fails soon rather than waiting out an outage.
        config.op_deadline = timeout;
        Ok(Namespace {
            client: MetaClient::new(Tcp, config, credentials),
            meta: meta.join(","),
            user,
        })
    }

    async fn call<M, T>(&self, what: &str, req: &M::Req) -> anyhow::Result<T>
    where
        M: Method<Rsp = Result<T, MetaError>>,
    {
        self.client.call::<M, T>(req).await.map_err(|e| {
            anyhow::anyhow!(
                "{what}: {}: {} (metadata service at {})",
                errno_text(e.errno),
                e.message,
                self.meta
            )
        })
    }

    async fn resolve(&self, path: &str, follow: bool) -> anyhow::Result<Attr> {
        if !path.starts_with('/') {
            bail!("{path:?} is not an absolute path in flyfs (paths start with /)");
        }
        let req = ResolveReq {
            user: self.user.clone(),
            path: path.as_bytes().to_vec(),
            follow,
        };
        self.call::<Resolve, _>(path, &req).await
    }

    async fn readlink(&self, path: &str, attr: &Attr) -> anyhow::Result<String> {
        let req = StatReq {
            user: self.user.clone(),
            ino: attr.ino,
        };
        let rsp: ReadlinkRsp = self.call::<Readlink, _>(path, &req).await?;
        Ok(escape_name(&rsp.target))
    }

    async fn gc(&self, json: bool) -> anyhow::Result<()> {
        let status: GcStatusRsp = self
            .call::<GcStatus, _>("gc status", &GcStatusReq {})
            .await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&status)?);
        } else {
            println!("metadata service {}", self.meta);
            println!("  queued           {}", status.queued);
            println!("  due now          {}", status.due);
            println!("  chunks removed   {}", status.chunks_removed);
            println!("  inodes finished  {}", status.inodes_finished);
        }
        Ok(())
    }

    async fn ls(&self, path: &str, json: bool) -> anyhow::Result<()> {
        let attr = self.resolve(path, true).await?;
        let mut entries = Vec::new();
        if attr.kind == FileType::Directory {
            let mut after = Vec::new();
            loop {
                let req = ReaddirReq {
                    user: self.user.clone(),
                    dir: attr.ino,
                    after: after.clone(),
                    limit: 1024,
                    plus: true,
                };
                let page: ReaddirRsp = self.call::<Readdir, _>(path, &req).await?;
                if let Some(last) = page.entries.last() {
                    after = last.name.clone();
                }
                for entry in page.entries {
                    let name = escape_name(&entry.name);
                    let attr = match entry.attr {
                        Some(attr) => attr,
                        None => {
                            let req = StatReq {
                                user: self.user.clone(),
                                ino: entry.ino,
                            };
                            self.call::<Stat, _>(&name, &req).await?
                        }
                    };
                    let target = if attr.kind == FileType::Symlink {
                        Some(self.readlink(&name, &attr).await?)
                    } else {
                        None
                    };
                    entries.push(ListEntry { name, attr, target });
                }
                if !page.more || after.is_empty() {
                    break;
                }
            }
        } else {
            let target = if attr.kind == FileType::Symlink {
                Some(self.readlink(path, &attr).await?)
            } else {
                None
            };
            entries.push(ListEntry {
                name: escape_name(path.as_bytes()),
                attr,
                target,
            });
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&entries)?);
        } else {
            print!("{}", ls_lines(&entries));
        }
        Ok(())
    }

    async fn stat(&self, path: &str, json: bool) -> anyhow::Result<()> {
        let attr = self.resolve(path, false).await?;
        let target = if attr.kind == FileType::Symlink {
            Some(self.readlink(path, &attr).await?)
        } else {
            None
        };
        let entry = ListEntry {
            name: escape_name(path.as_bytes()),
            attr,
            target,
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&entry)?);
        } else {
            print!("{}", stat_text(&entry));
        }
        Ok(())
    }
}

/// A file name (or symlink target) as `flyfs admin` shows it, in text and
/// in JSON alike: what a terminal would act on is written out visibly, the
/// way `ls -b` does, so the operator sees the name instead of obeying it.
/// Printable characters, in any script, stay as they are. A backslash is
/// doubled, so the escaping is reversible and a name cannot pass itself off
/// as another name's escape. The usual C escapes (`\t`, `\n`, `\r`, `\a`,
/// `\b`, `\f`, `\v`) stand for themselves; any other control byte and every
/// byte that is not part of valid UTF-8 is `\xHH`; other control characters
/// (the C1 range, which some terminals take as escape sequences) and the
/// bidirectional formatting characters (which can show a name's end before
/// its start) are `\u{HHHH}`.
fn escape_name(name: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\u{7}' => out.push_str("\\a"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                '\u{b}' => out.push_str("\\v"),
                c if c.is_ascii_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if c.is_control() || is_bidi_control(c) => {
                    let _ = write!(out, "\\u{{{:04x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// The characters that reorder how text around them is displayed (Unicode's
/// explicit directional marks, embeddings, overrides and isolates).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// An errno as words (`No such file or directory (ENOENT)` style, without
/// the "os error" suffix).
fn errno_text(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rsplit_once(" (os error") {
        Some((words, _)) => format!("{words} (errno {errno})"),
        None => text,
    }
}

/// `ls -l` lines: mode, links, owner, group, size, mtime, name.
fn ls_lines(entries: &[ListEntry]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let size_width = entries
        .iter()
        .map(|e| e.attr.length.to_string().len())
        .max()
        .unwrap_or(1);
    for entry in entries {
        let a = &entry.attr;
        let _ = write!(
            out,
            "{} {:>3} {:>5} {:>5} {:>size_width$} {} {}",
            mode_string(a.kind, a.mode),
            a.nlink,
            a.uid,
            a.gid,
            a.length,
            utc_time(a.mtime_ns, false),
            entry.name
        );
        if let Some(target) = &entry.target {
            let _ = write!(out, " -> {target}");
        }
        out.push('\n');
    }
    out
}

/// `stat`'s view, with the layout of a file.
fn stat_text(entry: &ListEntry) -> String {
    use std::fmt::Write;
    let a = &entry.attr;
    let mut out = String::new();
    let kind = match a.kind {
        FileType::File => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharDevice => "character special file",
        FileType::BlockDevice => "block special file",
    };
    let _ = write!(out, "  File: {}", entry.name);
    if let Some(target) = &entry.target {
        let _ = write!(out, " -> {target}");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "  Size: {:<12} Type: {kind}", a.length);
    let _ = writeln!(out, " Inode: {:<#12x} Links: {}", a.ino.0, a.nlink);
    let _ = writeln!(
        out,
        "Access: ({:04o}/{})  Uid: {}  Gid: {}",
        a.mode & 0o7777,
        mode_string(a.kind, a.mode),
        a.uid,
        a.gid
    );
    let _ = writeln!(out, "Access: {}", utc_time(a.atime_ns, true));
    let _ = writeln!(out, "Modify: {}", utc_time(a.mtime_ns, true));
    let _ = writeln!(out, "Change: {}", utc_time(a.ctime_ns, true));
    if let Some(layout) = &a.layout {
        let chains: Vec<String> = layout.chains.iter().map(|c| c.0.to_string()).collect();
        let _ = writeln!(
            out,
            "Layout: chain table {}, chunks of {} bytes, striped over chains {}",
            layout.chain_table.0,
            layout.chunk_size,
            chains.join(",")
        );
        let _ = writeln!(out, "Truncate version: {}", a.truncate_version);
    }
    out
}

/// `drwxr-xr-x`, with setuid, setgid and sticky bits.
fn mode_string(kind: FileType, mode: u32) -> String {
    let mut out = String::with_capacity(10);
    out.push(match kind {
        FileType::File => '-',
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::Fifo => 'p',
        FileType::Socket => 's',
        FileType::CharDevice => 'c',
        FileType::BlockDevice => 'b',
    });
    let specials = [(0o4000, 's', 'S'), (0o2000, 's', 'S'), (0o1000, 't', 'T')];
    for (who, (special, set, unset)) in specials.into_iter().enumerate() {
        let bits = (mode >> (6 - 3 * who)) & 0o7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        let exec = bits & 1 != 0;
        out.push(match (mode & special != 0, exec) {
            (true, true) => set,
            (true, false) => unset,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    out
}

/// A timestamp in UTC: `2025-01-31 12:34` (or with seconds and
/// nanoseconds when `full`).
fn utc_time(ns: i64, full: bool) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let (h, m, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
    if full {
        format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}.{nanos:09} UTC")
    } else {
        format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}")
    }
}

/// Days since 1970-01-01 to a (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The routing information as text: nodes, chains (each member with its
/// node and state), tables.
fn status_table(routing: &RoutingInfo) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "routing version {}", routing.version.0);
    let _ = writeln!(out, "\nnodes ({})", routing.nodes.len());
    let _ = writeln!(out, "  {:>6}  {:<24}  alive", "node", "address");
    for node in &routing.nodes {
        let alive = if node.alive { "yes" } else { "NO" };
        let _ = writeln!(out, "  {:>6}  {:<24}  {alive}", node.id.0, node.addr);
    }
    let _ = writeln!(out, "\nchains ({})", routing.chains.len());
    let _ = writeln!(
        out,
        "  {:>6}  {:>7}  targets, head first: target@node state",
        "chain", "version"
    );
    for chain in &routing.chains {
        let members: Vec<String> = chain
            .targets
            .iter()
            .map(|member| {
                let node = routing
                    .target(member.target)
                    .map_or_else(|| "?".to_string(), |t| t.node.0.to_string());
                format!("{}@{node} {}", member.target.0, member.state)
            })
            .collect();
        let _ = writeln!(
            out,
            "  {:>6}  {:>7}  {}",
            chain.id.0,
            chain.version.0,
            members.join(", ")
        );
    }
    let unassigned: Vec<String> = routing
        .targets
        .iter()
        .filter(|t| t.chain.is_none())
        .map(|t| format!("{}@{} disk {}", t.id.0, t.node.0, t.disk))
        .collect();
    if !unassigned.is_empty() {
        let _ = writeln!(out, "\ntargets in no chain: {}", unassigned.join(", "));
    }
    let _ = writeln!(out, "\ntables ({})", routing.tables.len());
    for table in &routing.tables {
        let chains: Vec<String> = table.chains.iter().map(|c| c.0.to_string()).collect();
        let _ = writeln!(
            out,
            "  {:>6}  version {}  chains {}",
            table.id.0,
            table.version,
            chains.join(",")
        );
    }
    out
}

fn space_table(space: &SpaceRsp) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>4}  {:>14}  {:>14}  {:>8}  {:>14}  state",
        "disk", "data bytes", "allocated", "chunks", "freeing bytes"
    );
    for disk in &space.disks {
        let state = if disk.poisoned { "POISONED" } else { "ok" };
        let _ = writeln!(
            out,
            "{:>4}  {:>14}  {:>14}  {:>8}  {:>14}  {state}",
            disk.disk,
            disk.data_bytes,
            disk.allocated_bytes,
            disk.committed_chunks,
            disk.freeing_bytes
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use flyfs_proto::ids::ChainVersion;
    use flyfs_proto::wire::mgmt::{
        ChainInfo, ChainTable, ChainTarget, NodeInfo, PublicState, TargetInfo,
    };

    use super::*;

    #[test]
    fn status_table_shows_every_member_with_node_and_state() {
        let routing = RoutingInfo {
            version: RoutingVersion(9),
            nodes: vec![
                NodeInfo {
                    id: NodeId(1),
                    addr: "127.0.0.1:7101".into(),
                    alive: true,
                },
                NodeInfo {
                    id: NodeId(2),
                    addr: "127.0.0.1:7102".into(),
                    alive: false,
                },
            ],
            targets: vec![
                TargetInfo {
                    id: TargetId(11),
                    node: NodeId(1),
                    disk: 0,
                    chain: Some(ChainId(1)),
                    state: PublicState::Serving,
                    leaving: false,
                },
                TargetInfo {
                    id: TargetId(12),
                    node: NodeId(2),
                    disk: 0,
                    chain: Some(ChainId(1)),
                    state: PublicState::Offline,
                    leaving: false,
                },
                TargetInfo {
                    id: TargetId(13),
                    node: NodeId(2),
                    disk: 1,
                    chain: None,
                    state: PublicState::Offline,
                    leaving: false,
                },
            ],
            chains: vec![ChainInfo {
                id: ChainId(1),
                version: ChainVersion(4),
                targets: vec![
                    ChainTarget {
                        target: TargetId(11),
                        state: PublicState::Serving,
                    },
                    ChainTarget {
                        target: TargetId(12),
                        state: PublicState::Offline,
                    },
                ],
            }],
            tables: vec![ChainTable {
                id: ChainTableId(1),
                version: 1,
                chains: vec![ChainId(1)],
            }],
        };
        let text = status_table(&routing);
        assert!(text.contains("routing version 9"), "{text}");
        assert!(text.contains("127.0.0.1:7102            NO"), "{text}");
        assert!(text.contains("11@1 serving, 12@2 offline"), "{text}");
        assert!(text.contains("targets in no chain: 13@2 disk 1"), "{text}");
        assert!(text.contains("chains 1"), "{text}");
    }

    #[test]
    fn names_are_escaped_visibly() {
        assert_eq!(escape_name(b"plain name.txt"), "plain name.txt");
        assert_eq!(
            escape_name("caf\u{e9} \u{6587}".as_bytes()),
            "caf\u{e9} \u{6587}"
        );
        // A title change and a screen clear, shown rather than done.
        assert_eq!(
            escape_name(b"\x1b]0;owned\x07\x1b[2Jx"),
            "\\x1b]0;owned\\a\\x1b[2Jx"
        );
        assert_eq!(escape_name(b"a\tb\nc\rd\x7f"), "a\\tb\\nc\\rd\\x7f");
        // Bytes that are not UTF-8 keep their value instead of becoming
        // U+FFFD (two such names would otherwise print the same).
        assert_eq!(escape_name(b"\xff\xfeok\xc3"), "\\xff\\xfeok\\xc3");
        // C1 controls (0x9b is a one-byte CSI to some terminals) and
        // right-to-left overrides.
        assert_eq!(escape_name("\u{9b}31m".as_bytes()), "\\u{009b}31m");
        assert_eq!(
            escape_name("evil\u{202e}txt.exe".as_bytes()),
            "evil\\u{202e}txt.exe"
        );
        // A backslash is doubled: no name can pass for another's escape.
        assert_eq!(escape_name(b"\\x1b"), "\\\\x1b");
        assert_ne!(escape_name(b"\\x1b"), escape_name(b"\x1b"));
        // Every line of `ls` and `stat` goes through it.
        let entry = ListEntry {
            name: escape_name(b"\x1b[31mred"),
            attr: Attr {
                kind: FileType::Symlink,
                ..Attr::default()
            },
            target: Some(escape_name(b"\x1b[0m")),
        };
        for text in [ls_lines(std::slice::from_ref(&entry)), stat_text(&entry)] {
            assert!(!text.contains('\x1b'), "{text:?}");
            assert!(text.contains("\\x1b[31mred -> \\x1b[0m"), "{text:?}");
        }
    }

    #[test]
    fn ls_and_stat_look_like_coreutils() {
        assert_eq!(mode_string(FileType::Directory, 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(FileType::File, 0o4644), "-rwSr--r--");
        assert_eq!(mode_string(FileType::Directory, 0o1777), "drwxrwxrwt");
        assert_eq!(utc_time(0, false), "1970-01-01 00:00");
        assert_eq!(
            utc_time(1_709_210_096_500_000_000, true),
            "2024-02-29 12:34:56.500000000 UTC"
        );
        let entry = ListEntry {
            name: "link".into(),
            attr: Attr {
                kind: FileType::Symlink,
                mode: 0o777,
                nlink: 1,
                length: 3,
                ..Attr::default()
            },
            target: Some("abc".into()),
        };
        let line = ls_lines(std::slice::from_ref(&entry));
        assert!(
            line.starts_with("lrwxrwxrwx   1     0     0 3 1970-01-01 00:00 link -> abc"),
            "{line}"
        );
        let text = stat_text(&entry);
        assert!(text.contains("File: link -> abc"), "{text}");
        assert!(text.contains("Type: symbolic link"), "{text}");
        assert!(errno_text(2).starts_with("No such file or directory (errno 2)"));
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(12), "12 B");
    }
}
