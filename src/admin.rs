//! `flyfs admin`: the operator's view of a cluster and the manager's admin
//! operations (create targets, chains and chain tables, take a target
//! offline), plus a storage node's space. Each command is one RPC; a refusal
//! from the manager (`MgmtError`) becomes an error naming the command, so
//! the process exits with status 1 and says why.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use flyfs_craq::mgmt::Managers;
use flyfs_rpc::ids::{ChainId, ChainTableId, NodeId, RoutingVersion, TargetId};
use flyfs_rpc::wire::mgmt::{
    CreateChain, CreateChainReq, CreateChainTable, CreateChainTableReq, CreateTarget,
    CreateTargetReq, GetRouting, GetRoutingReq, MgmtError, RoutingInfo, SetTargetOffline,
    SetTargetOfflineReq,
};
use flyfs_rpc::wire::storage::{Space, SpaceReq, SpaceRsp};
use flyfs_rpc::{CallOptions, Client, ClientConfig, Method, Tcp};

#[derive(clap::Args, Debug)]
pub(crate) struct AdminArgs {
    /// The cluster managers' addresses, comma-separated (the primary is
    /// found among them).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7000")]
    mgmt: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Deadline of the RPC, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(clap::Subcommand, Debug)]
enum AdminCommand {
    /// Nodes (alive or not), chains with their version and each target's
    /// state, chain tables.
    Status,
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
    /// Space of every device of one storage node (asks the node itself).
    Space {
        /// The storage node's address.
        #[arg(long)]
        node_addr: String,
    },
}

pub(crate) async fn run(args: &AdminArgs) -> anyhow::Result<()> {
    let client = Client::new(Tcp, ClientConfig::default());
    let options = CallOptions {
        timeout: Duration::from_millis(args.timeout_ms),
        ..CallOptions::default()
    };
    let admin = Admin {
        client,
        options,
        managers: Managers::new(args.mgmt.iter().cloned()),
        mgmt: args.mgmt.join(","),
    };
    match &args.command {
        AdminCommand::Status => {
            let routing = admin.routing().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&routing)?);
            } else {
                print!("{}", status_table(&routing));
            }
            return Ok(());
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
    }
    if args.json {
        println!("{{\"ok\":true}}");
    } else {
        println!("ok");
    }
    Ok(())
}

/// The managers and how to call them.
struct Admin {
    client: Client<Tcp>,
    options: CallOptions,
    managers: Managers,
    /// The addresses as given, for messages.
    mgmt: String,
}

impl Admin {
    async fn routing(&self) -> anyhow::Result<RoutingInfo> {
        let req = GetRoutingReq {
            known_version: RoutingVersion(0),
        };
        let rsp = self
            .managers
            .call::<GetRouting, _>(&self.client, &req, &self.options)
            .await
            .with_context(|| format!("asking the cluster manager at {}", self.mgmt))?;
        // The manager answers `None` only to a caller that already has its
        // version; version 0 is never current, so this would be a bug there.
        rsp.routing.with_context(|| {
            format!(
                "the cluster manager at {} sent no routing information",
                self.mgmt
            )
        })
    }

    async fn mutate<M>(&self, command: &str, req: &M::Req) -> anyhow::Result<()>
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
        "{:>4}  {:>14}  {:>14}  {:>8}  state",
        "disk", "data bytes", "allocated", "chunks"
    );
    for disk in &space.disks {
        let state = if disk.poisoned { "POISONED" } else { "ok" };
        let _ = writeln!(
            out,
            "{:>4}  {:>14}  {:>14}  {:>8}  {state}",
            disk.disk, disk.data_bytes, disk.allocated_bytes, disk.committed_chunks
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use flyfs_rpc::ids::ChainVersion;
    use flyfs_rpc::wire::mgmt::{
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
                },
                TargetInfo {
                    id: TargetId(12),
                    node: NodeId(2),
                    disk: 0,
                    chain: Some(ChainId(1)),
                    state: PublicState::Offline,
                },
                TargetInfo {
                    id: TargetId(13),
                    node: NodeId(2),
                    disk: 1,
                    chain: None,
                    state: PublicState::Offline,
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
}
