//! `flyfs admin replace-target`, `drain-node` and `rebalance`: moving replicas between
//! nodes while their chains serve, built from the manager's three membership
//! steps (add a member, which a resync fills; remove a member; forget a
//! target). The steps are the manager's; the order, the waiting and the
//! progress report are here.
//!
//! A replacement never leaves a chain with fewer serving members than it
//! had: the new target joins first and the old one leaves only once the
//! new one serves. So replacing a dead node's replicas restores each chain's
//! redundancy, and draining a live node never lowers it.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flyfs_craq::placement;
use flyfs_proto::ids::{ChainId, NodeId, TargetId};
use flyfs_proto::wire::mgmt::{
    AddChainMember, ChainMemberReq, CreateTarget, CreateTargetReq, PublicState, RemoveChainMember,
    RemoveTarget, RemoveTargetReq,
};
use serde::Serialize;

use crate::admin::Admin;

/// How often the routing is polled while a new member syncs.
const POLL: Duration = Duration::from_millis(500);

/// One finished replacement, as `--json` prints it.
#[derive(Debug, Serialize)]
pub(crate) struct Replaced {
    pub chain: ChainId,
    pub old: TargetId,
    pub new: TargetId,
    pub node: NodeId,
    pub disk: u32,
    pub seconds: f64,
    /// The bytes the resync that filled the new target had to send, as
    /// its source last reported them (0 when no progress was seen: the
    /// resync ended between two polls, or the manager cannot say).
    pub synced_bytes: u64,
}

/// A replica to move: `old` in `chain` goes to `node`/`disk`, as target
/// `new` (or the next free id of the placement scheme).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Move {
    pub chain: ChainId,
    pub old: TargetId,
    pub node: NodeId,
    pub disk: u32,
    pub new: Option<TargetId>,
}

/// Carries out a [`Move`]: creates the new target, adds it to the chain,
/// waits until it serves (printing each state it passes through unless
/// `quiet`), then removes the old one from the chain and forgets it.
pub(crate) async fn replace_target(
    admin: &Admin,
    planned: &Move,
    timeout: Duration,
    quiet: bool,
) -> anyhow::Result<Replaced> {
    let Move {
        chain,
        old,
        node,
        disk,
        new,
    } = *planned;
    let started = Instant::now();
    let routing = admin.routing().await?;
    let info = routing
        .chain(chain)
        .with_context(|| format!("chain {} does not exist", chain.0))?;
    if !info.targets.iter().any(|member| member.target == old) {
        bail!("target {} is not a member of chain {}", old.0, chain.0);
    }
    let new = match new {
        Some(new) => new,
        None => placement::next_target_id(&routing, node, disk).with_context(|| {
            format!(
                "node {} disk {disk} has no free target id left; name one with --new-target",
                node.0
            )
        })?,
    };
    let req = CreateTargetReq {
        target: new,
        node,
        disk,
    };
    admin.mutate::<CreateTarget>("create-target", &req).await?;
    let member = ChainMemberReq { chain, target: new };
    admin
        .mutate::<AddChainMember>("add-member", &member)
        .await?;
    if !quiet {
        eprintln!(
            "chain {}: target {} on node {} disk {disk} added; waiting for it to sync",
            chain.0, new.0, node.0
        );
    }
    let mut last = None;
    // The first progress seen and the last, for the rate and the record.
    let mut first_progress: Option<(Instant, u64)> = None;
    let mut last_progress: Option<flyfs_proto::wire::mgmt::SyncProgress> = None;
    loop {
        let routing = admin.routing().await?;
        let state = routing.target(new).map(|t| t.state);
        if state == Some(PublicState::Syncing) {
            let progress = admin
                .sync_progress()
                .await
                .into_iter()
                .find(|p| p.target == new && p.chain == chain);
            if let Some(p) = progress
                && Some(p) != last_progress
            {
                let now = Instant::now();
                let (since, from) = *first_progress.get_or_insert((now, p.bytes_done));
                let seconds = now.duration_since(since).as_secs_f64();
                let rate = if seconds > 0.0 {
                    format!(
                        ", {}/s",
                        crate::admin::human_bytes(
                            (p.bytes_done.saturating_sub(from) as f64 / seconds) as u64
                        )
                    )
                } else {
                    String::new()
                };
                if !quiet {
                    eprintln!(
                        "[{:>7.1} s] target {}: syncing {}{rate}",
                        started.elapsed().as_secs_f64(),
                        new.0,
                        crate::admin::progress_text(&p)
                    );
                }
                last_progress = Some(p);
            }
        }
        if state != last {
            if !quiet {
                let shown = state.map_or("unknown".to_owned(), |s| s.to_string());
                eprintln!(
                    "[{:>7.1} s] target {}: {shown}",
                    started.elapsed().as_secs_f64(),
                    new.0
                );
            }
            last = state;
        }
        if state == Some(PublicState::Serving) {
            break;
        }
        if started.elapsed() > timeout {
            bail!(
                "target {} did not reach serving within {timeout:?} (last {}); it stays in chain {} \
                 beside {}: run again with a longer --timeout-s, or take it out with remove-member",
                new.0,
                last.map_or("unknown".to_owned(), |s| s.to_string()),
                chain.0,
                old.0
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let member = ChainMemberReq { chain, target: old };
    if let Err(error) = admin
        .mutate::<RemoveChainMember>("remove-member", &member)
        .await
    {
        wait_until_left(admin, chain, old, (started, timeout), error).await?;
    }
    admin
        .mutate::<RemoveTarget>("remove-target", &RemoveTargetReq { target: old })
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    if !quiet {
        eprintln!(
            "chain {}: target {} replaced by {} in {seconds:.1} s",
            chain.0, old.0, new.0
        );
    }
    Ok(Replaced {
        chain,
        old,
        new,
        node,
        disk,
        seconds,
        synced_bytes: last_progress.map_or(0, |p| p.bytes_total),
    })
}

/// After a `remove-member` that failed: a serving member leaves its chain
/// only once its node has seen that it no longer serves, which the manager
/// waits for a few seconds and then finishes by itself (a node silent for
/// the failure timeout). While the routing shows `old` leaving `chain`,
/// wait (within the command's deadline); otherwise the failure stands.
async fn wait_until_left(
    admin: &Admin,
    chain: ChainId,
    old: TargetId,
    (started, timeout): (Instant, Duration),
    error: anyhow::Error,
) -> anyhow::Result<()> {
    loop {
        let routing = admin.routing().await?;
        let Some(target) = routing.target(old) else {
            return Ok(());
        };
        if target.chain != Some(chain) {
            return Ok(());
        }
        if !target.leaving {
            return Err(error);
        }
        if started.elapsed() > timeout {
            bail!(
                "target {} is still leaving chain {} after {timeout:?} (its node has not shown \
                 it stopped serving; the manager takes it out by itself once the node is silent \
                 past its failure timeout): {error:#}",
                old.0,
                chain.0
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Moves every chain member off `node`: each to the live node outside its
/// chain holding the fewest targets (on its disk holding the fewest), one
/// after another; then forgets the node's unassigned targets. The node
/// itself is left for `remove-node` once its daemon is stopped.
pub(crate) async fn drain_node(
    admin: &Admin,
    node: NodeId,
    timeout: Duration,
    quiet: bool,
) -> anyhow::Result<Vec<Replaced>> {
    let routing = admin.routing().await?;
    if !routing.nodes.iter().any(|n| n.id == node) {
        bail!("node {} is not registered", node.0);
    }
    let members: Vec<(ChainId, TargetId)> = routing
        .targets
        .iter()
        .filter(|t| t.node == node)
        .filter_map(|t| t.chain.map(|chain| (chain, t.id)))
        .collect();
    let mut done = Vec::new();
    for (k, (chain, old)) in members.iter().enumerate() {
        let routing = admin.routing().await?;
        let (to, disk) = placement::replacement_for(&routing, *chain, node).with_context(|| {
            format!(
                "no live node outside chain {} to move its replica to: add a storage node first",
                chain.0
            )
        })?;
        if !quiet {
            eprintln!(
                "({}/{}) chain {}: moving target {} from node {} to node {} disk {disk}",
                k + 1,
                members.len(),
                chain.0,
                old.0,
                node.0,
                to.0
            );
        }
        let planned = Move {
            chain: *chain,
            old: *old,
            node: to,
            disk,
            new: None,
        };
        done.push(replace_target(admin, &planned, timeout, quiet).await?);
    }
    let routing = admin.routing().await?;
    for target in routing
        .targets
        .iter()
        .filter(|t| t.node == node && t.chain.is_none())
    {
        admin
            .mutate::<RemoveTarget>("remove-target", &RemoveTargetReq { target: target.id })
            .await?;
    }
    Ok(done)
}

/// Evens out chain members over the live nodes (`flyfs admin rebalance`):
/// plans with [`placement::rebalance`], then carries out one move at a time,
/// planning again from the routing after each, so a failure or another
/// admin's change between moves is taken into account, until the plan is
/// empty or `max_moves` are done. With `dry_run` it only returns the plan.
pub(crate) async fn rebalance(
    admin: &Admin,
    disks: Option<u32>,
    max_moves: usize,
    dry_run: bool,
    timeout: Duration,
    quiet: bool,
) -> anyhow::Result<Rebalanced> {
    let plan = placement::rebalance(&admin.routing().await?, disks, max_moves);
    if dry_run {
        return Ok(Rebalanced {
            planned: plan,
            moved: Vec::new(),
        });
    }
    let mut moved = Vec::new();
    while moved.len() < max_moves {
        let routing = admin.routing().await?;
        let Some(next) = placement::rebalance(&routing, disks, 1).pop() else {
            break;
        };
        if !quiet {
            eprintln!(
                "({}/{}) chain {}: moving target {} from node {} to node {} disk {}",
                moved.len() + 1,
                plan.len().max(moved.len() + 1),
                next.chain.0,
                next.old.0,
                next.from.0,
                next.to.0,
                next.disk
            );
        }
        let planned = Move {
            chain: next.chain,
            old: next.old,
            node: next.to,
            disk: next.disk,
            new: None,
        };
        moved.push(replace_target(admin, &planned, timeout, quiet).await?);
    }
    Ok(Rebalanced {
        planned: plan,
        moved,
    })
}

/// What `rebalance` planned at its start and what it moved.
#[derive(Debug, Serialize)]
pub(crate) struct Rebalanced {
    pub planned: Vec<placement::RebalanceMove>,
    pub moved: Vec<Replaced>,
}
