//! The operator: membership changes an admin makes while the cluster runs,
//! through the manager's RPCs the admin CLI uses (`flyfs admin
//! replace-target`, `drain-node`, `remove-node`, in `src/membership.rs` and
//! `src/admin.rs`): create a target, add it to a chain, wait until a resync
//! has filled it and it serves, take the old member out, forget it; move
//! every member off a node; forget a node that is gone.
//!
//! The CLI's steps are one call each and fail the command on any error; the
//! operator here is the same sequence made robust the way an operator
//! rerunning the command is: each round reads the routing and takes the
//! next step that is not done yet, so a reply lost to a fault, a manager
//! restart or a refusal (no serving member left without the old one) is
//! followed by another round, never a step applied twice. A new member that
//! does not serve within `SERVE_WAIT` is taken out again, as the CLI's
//! timeout tells its user to do.
//!
//! What the operator needs the simulation to do (stop a drained node's
//! daemon) and what it finished go through `World`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_client::storage::StorageClient;
use flyfs_craq::placement;
use flyfs_proto::ids::{ChainId, NodeId, TargetId};
use flyfs_proto::wire::mgmt::{
    AddChainMember, ChainMemberReq, CreateTarget, CreateTargetReq, MgmtError, PublicState,
    RemoveChainMember, RemoveNode, RemoveNodeReq, RemoveTarget, RemoveTargetReq, RoutingInfo,
};
use flyfs_rpc::CallOptions;

use super::net::ResetNet;
use super::{MGMT, MGMT_PORT, Shared};

/// How long a new member may take to serve before the replacement is given
/// up (the CLI's `--timeout-s`, scaled to the simulation's timings).
const SERVE_WAIT: Duration = Duration::from_secs(20);
/// Between two rounds of reading the routing.
const POLL: Duration = Duration::from_millis(100);

/// One membership change.
#[derive(Clone, Copy, Debug)]
pub enum AdminOp {
    /// `replace-target`: `old` of `chain` moves to a node outside the chain.
    Replace { chain: ChainId, old: TargetId },
    /// `drain-node`, then the daemon stopped, then `remove-node`.
    Drain { node: usize },
    /// `remove-node` of a node lost for good, once the manager's automatic
    /// replacement has moved its replicas away.
    RemoveDead { node: usize },
}

/// How a replacement ended.
#[derive(Debug, PartialEq, Eq)]
enum Replaced {
    Done,
    /// Not carried out (the old member left the chain first, the manager
    /// refused the new member, or it did not serve in time); the chain is
    /// as it was.
    Abandoned(String),
}

struct Operator {
    client: Arc<StorageClient<ResetNet>>,
    world: Shared,
}

/// Runs `op` to its end; never fails the simulation (a step that cannot be
/// taken now is retried, one that cannot be taken at all is given up and
/// logged).
pub async fn run(op: AdminOp, client: Arc<StorageClient<ResetNet>>, world: Shared) {
    let operator = Operator { client, world };
    operator.note(format!("operator: {op:?}"));
    match op {
        AdminOp::Replace { chain, old } => {
            let routing = operator.routing().await;
            let Some(from) = routing.target(old).map(|t| t.node) else {
                operator.note(format!("operator: {old:?} is gone already"));
                return;
            };
            let Some((node, disk)) = placement::replacement_for(&routing, chain, from) else {
                operator.note(format!(
                    "operator: no live node outside {chain} to move {old:?} to"
                ));
                return;
            };
            match operator.replace(chain, old, node, disk).await {
                Replaced::Done => operator.fired("admin replace target"),
                Replaced::Abandoned(why) => operator.note(format!("operator: {why}")),
            }
        }
        AdminOp::Drain { node } => operator.drain(node).await,
        AdminOp::RemoveDead { node } => {
            // The manager's automatic replacement moves the dead node's
            // replicas and forgets its old targets; the node goes after.
            loop {
                let routing = operator.routing().await;
                if !routing.targets.iter().any(|t| t.node.0 as usize == node) {
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
            operator.remove_node(node).await;
        }
    }
}

impl Operator {
    fn note(&self, what: String) {
        self.world.borrow_mut().log.push(what);
    }

    fn fired(&self, kind: &'static str) {
        *self.world.borrow_mut().fired.entry(kind).or_default() += 1;
    }

    /// The manager's routing, asked until it answers.
    async fn routing(&self) -> RoutingInfo {
        loop {
            if let Ok(routing) = self.client.refresh_routing().await {
                return (*routing).clone();
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// One call of a membership step: the manager's answer, or `None` when
    /// the call got no answer (the step may or may not have been made; the
    /// next round's routing tells).
    async fn mutate<M>(&self, req: &M::Req) -> Option<Result<(), MgmtError>>
    where
        M: flyfs_proto::Method<Rsp = Result<(), MgmtError>>,
    {
        let mgmt = format!("{MGMT}:{MGMT_PORT}");
        match self
            .client
            .rpc()
            .call::<M>(&mgmt, req, Bytes::new(), &CallOptions::default())
            .await
        {
            Ok((rsp, _)) => Some(rsp),
            Err(_) => None,
        }
    }

    /// `replace-target`: a new target on `node`/`disk` joins `chain`, a
    /// resync fills it while the chain serves, and once it serves `old`
    /// leaves the chain and is forgotten.
    async fn replace(&self, chain: ChainId, old: TargetId, node: NodeId, disk: u32) -> Replaced {
        let routing = self.routing().await;
        let Some(new) = placement::next_target_id(&routing, node, disk) else {
            return Replaced::Abandoned(format!("no free target id on {node:?}"));
        };
        self.world.borrow_mut().admin_targets.insert(new);
        let mut added_at = None;
        let mut giving_up = false;
        loop {
            let routing = self.routing().await;
            let Some(info) = routing.chain(chain) else {
                return Replaced::Abandoned(format!("{chain} is gone"));
            };
            let old_member = info.targets.iter().any(|m| m.target == old);
            let new_state = info
                .targets
                .iter()
                .find(|m| m.target == new)
                .map(|m| m.state);
            let new_known = routing.target(new).is_some();
            if giving_up {
                if new_state.is_some() {
                    let req = ChainMemberReq { chain, target: new };
                    self.mutate::<RemoveChainMember>(&req).await;
                    tokio::time::sleep(POLL).await;
                } else if new_known {
                    self.mutate::<RemoveTarget>(&RemoveTargetReq { target: new })
                        .await;
                } else {
                    return Replaced::Abandoned(format!(
                        "{new:?} did not serve in {chain} within {SERVE_WAIT:?}"
                    ));
                }
                continue;
            }
            match new_state {
                None if !old_member => {
                    if new_known {
                        self.mutate::<RemoveTarget>(&RemoveTargetReq { target: new })
                            .await;
                        continue;
                    }
                    return Replaced::Abandoned(format!(
                        "{old:?} left {chain} before {new:?} joined it"
                    ));
                }
                None if !new_known => {
                    let req = CreateTargetReq {
                        target: new,
                        node,
                        disk,
                    };
                    self.mutate::<CreateTarget>(&req).await;
                }
                None => {
                    let req = ChainMemberReq { chain, target: new };
                    if let Some(Err(MgmtError::Invalid { reason })) =
                        self.mutate::<AddChainMember>(&req).await
                    {
                        self.mutate::<RemoveTarget>(&RemoveTargetReq { target: new })
                            .await;
                        return Replaced::Abandoned(format!(
                            "{new:?} refused in {chain}: {reason}"
                        ));
                    }
                }
                Some(state) if state != PublicState::Serving => {
                    let since = *added_at.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > SERVE_WAIT {
                        // As the CLI's timeout says: take it out again.
                        giving_up = true;
                        continue;
                    }
                    tokio::time::sleep(POLL).await;
                }
                Some(_) if old_member => {
                    let req = ChainMemberReq { chain, target: old };
                    if self.mutate::<RemoveChainMember>(&req).await != Some(Ok(())) {
                        tokio::time::sleep(POLL).await;
                    }
                }
                Some(_) => {
                    if routing.target(old).is_none_or(|t| t.chain.is_some()) {
                        return Replaced::Done;
                    }
                    self.mutate::<RemoveTarget>(&RemoveTargetReq { target: old })
                        .await;
                }
            }
        }
    }

    /// `drain-node`: every member of `node` moves to a node outside its
    /// chain, one after another; its unassigned targets are forgotten; then
    /// its daemon is stopped (by the simulation, told through `World`) and
    /// the node removed.
    async fn drain(&self, node: usize) {
        let id = NodeId(node as u32);
        loop {
            let routing = self.routing().await;
            let member = routing
                .targets
                .iter()
                .find(|t| t.node == id && t.chain.is_some());
            if let Some(member) = member {
                let chain = member.chain.expect("filtered on a chain");
                match placement::replacement_for(&routing, chain, id) {
                    Some((to, disk)) => {
                        if let Replaced::Abandoned(why) =
                            self.replace(chain, member.id, to, disk).await
                        {
                            self.note(format!("operator: drain of node{node}: {why}"));
                        }
                    }
                    // No live node outside the chain now (one is down):
                    // wait for it to come back.
                    None => tokio::time::sleep(POLL).await,
                }
                continue;
            }
            let unassigned: Vec<TargetId> = routing
                .targets
                .iter()
                .filter(|t| t.node == id)
                .map(|t| t.id)
                .collect();
            if unassigned.is_empty() {
                break;
            }
            for target in unassigned {
                self.mutate::<RemoveTarget>(&RemoveTargetReq { target })
                    .await;
            }
        }
        self.fired("admin drain node");
        self.world.borrow_mut().drained = Some(node);
        while self.world.borrow().drained.is_some() {
            tokio::time::sleep(POLL).await;
        }
        self.remove_node(node).await;
    }

    /// `remove-node`, until the manager takes it (it refuses while the node
    /// still heartbeats, within its failure timeout of the last one).
    async fn remove_node(&self, node: usize) {
        let req = RemoveNodeReq {
            node: NodeId(node as u32),
        };
        loop {
            match self.mutate::<RemoveNode>(&req).await {
                Some(Ok(())) | Some(Err(MgmtError::NotFound { .. })) => break,
                _ => tokio::time::sleep(POLL).await,
            }
        }
        self.fired("admin remove node");
        self.world.borrow_mut().removed = Some(node);
    }
}
