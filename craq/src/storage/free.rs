//! Freeing the chunks of replicas this node no longer hosts.
//!
//! When a replica leaves its chain (`drain-node`, `rebalance`,
//! `replace-target` of a live node) and the manager forgets its target, the
//! node stops serving it at once (`install` drops it), but its chunks are
//! still in the engine. This file removes them, a bounded batch per
//! heartbeat, so that the space comes back without stalling a node that holds
//! millions of them.
//!
//! The engine keys chunks by chain, not by target, so what is freed is a
//! *stray chain* of one engine: a chain that has committed chunks on disk
//! `d`, that the routing knows, and of which the routing places no member on
//! this node's disk `d`. Decided from the node's own routing snapshot only,
//! never from a message naming a target:
//! * the snapshot is the newest the node holds (an older one is never
//!   installed), and the node holds it under a valid lease, which it renews
//!   only once it holds the routing version the manager answered with; a
//!   stale or repeated heartbeat answer cannot make a member look removed;
//! * a member leaves the write path only once its node has seen that it no
//!   longer serves (the `leaving` step), and the node serves only targets its
//!   snapshot lists as members; so by the time its snapshot shows the target
//!   out of the chain, the node answers no request for it under any chain
//!   version, and a client or peer still holding an older routing that lists
//!   it is refused (no such chain, or a stale chain version) whatever the
//!   engine holds;
//! * while any unassigned target of this node sits on disk `d`, nothing of
//!   `d` is freed: it may be the removed replica not yet forgotten, which an
//!   admin could add back (`add-member`); it is freed once forgotten;
//! * a chain the routing does not know is left alone, so a manager that lost
//!   its record (an empty routing) makes a node free nothing;
//! * a target of a chain that is added again to this node's disk `d` while
//!   a batch of that chain runs there starts `Restarting` (it reports itself
//!   offline and answers nothing) and leaves that state only once the batch
//!   has ended; no later batch starts, since the chain is no longer stray.
//!   It then goes through a resync, which compares every chunk and sends
//!   what is missing, as for any target added to a chain, so a target id (or
//!   chain) placed here again never serves the chunks of an earlier replica.
//!
//! Progress is not recorded: a node that crashes midway finds the same
//! stray chains in its first routing after the restart and goes on. Chunks a
//! late write or repair of the removed target put back after a batch are
//! found by a later batch, since every heartbeat looks again.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use flyfs_bypass::BlockDevice;
use flyfs_chunk_engine::ChunkKey;
use flyfs_proto::ids::ChainId;
use flyfs_proto::wire::mgmt::RoutingInfo;
use flyfs_rpc::Network;
use parking_lot::Mutex;

use super::{StorageNode, Target};

/// What the node has freed since it started, for `Space` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeStats {
    /// Batches run (one per heartbeat while there is something to free).
    pub batches: u64,
    /// Heartbeats that looked for stray chains, found or not.
    pub passes: u64,
    pub freed_chunks: u64,
    /// Sum of the freed chunks' lengths.
    pub freed_bytes: u64,
}

/// The node's freeing state.
#[derive(Debug, Default)]
pub(crate) struct Freeing {
    /// The (disk, chain) a batch is removing chunks of right now; written
    /// and read under the node's `targets` lock, so that `install` sees it
    /// when it places a target of that chain on that disk.
    pub active: Mutex<BTreeSet<(u32, ChainId)>>,
    running: AtomicBool,
    batches: AtomicU64,
    passes: AtomicU64,
    freed_chunks: AtomicU64,
    freed_bytes: AtomicU64,
}

/// Whether `chain`'s chunks on `disk` of node `node` belong to nobody:
/// the routing knows the chain, places none of its members on that disk of
/// this node, and holds no unassigned target of this node on that disk (a
/// removed member not yet forgotten).
pub(crate) fn stray(
    routing: &RoutingInfo,
    hosted: &std::collections::BTreeMap<ChainId, Arc<Target>>,
    node: flyfs_proto::ids::NodeId,
    disk: u32,
    chain: ChainId,
) -> bool {
    let Some(info) = routing.chain(chain) else {
        return false;
    };
    if hosted.get(&chain).is_some_and(|t| t.disk == disk) {
        return false;
    }
    let mine = |id| {
        routing
            .target(id)
            .is_some_and(|t| t.node == node && t.disk == disk)
    };
    if info.targets.iter().any(|m| mine(m.target)) {
        return false;
    }
    !routing
        .targets
        .iter()
        .any(|t| t.node == node && t.disk == disk && t.chain.is_none_or(|c| c == chain))
}

impl<D: BlockDevice, N: Network> StorageNode<D, N> {
    /// Starts one freeing batch unless one runs. Called once per heartbeat.
    pub(crate) fn start_free(self: Arc<Self>) {
        if self.freeing.running.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(async move {
            self.free_batch().await;
            self.freeing.running.store(false, Ordering::SeqCst);
        });
    }

    /// The stray chains of every engine, as (disk, chain), judged against
    /// the routing in force; none before the first routing or without a
    /// valid lease.
    pub(crate) fn stray_chains(&self) -> Vec<(u32, ChainId)> {
        if !*self.started.lock() || !self.lease_valid() {
            return Vec::new();
        }
        let routing = self.routing();
        let hosted = self.targets.lock();
        let mut found = Vec::new();
        for (disk, engine) in self.engines.iter().enumerate() {
            let disk = disk as u32;
            for chain in engine.chains() {
                if stray(&routing, &hosted, self.config.node, disk, chain) {
                    found.push((disk, chain));
                }
            }
        }
        found
    }

    /// Removes at most `free_batch_chunks` chunks of the first stray chain.
    async fn free_batch(&self) {
        self.freeing.passes.fetch_add(1, Ordering::Relaxed);
        let Some((disk, chain)) = self.claim_stray() else {
            return;
        };
        let engine = self.engines[disk as usize].clone();
        let batch = engine.chunks(chain, .., self.config.free_batch_chunks.max(1));
        let (mut chunks, mut bytes) = (0u64, 0u64);
        for info in &batch {
            let len = info.committed.as_ref().map_or(0, |m| u64::from(m.len));
            match engine.remove(ChunkKey::new(chain, info.key.chunk)).await {
                Ok(true) => {
                    chunks += 1;
                    bytes += len;
                }
                Ok(false) => {}
                Err(e) => {
                    // A poisoned engine reports its targets offline; its
                    // space comes back when the device is replaced.
                    tracing::warn!(
                        ?chain,
                        disk,
                        "freeing a removed replica's chunks stopped: {e}"
                    );
                    break;
                }
            }
        }
        self.freeing.active.lock().remove(&(disk, chain));
        self.freeing.batches.fetch_add(1, Ordering::Relaxed);
        self.freeing
            .freed_chunks
            .fetch_add(chunks, Ordering::Relaxed);
        self.freeing.freed_bytes.fetch_add(bytes, Ordering::Relaxed);
        tracing::info!(
            ?chain,
            disk,
            chunks,
            bytes,
            left = engine.chain_usage(chain).chunks,
            "freed chunks of a replica this node no longer hosts"
        );
    }

    /// The first stray chain, marked active, judged under the `targets`
    /// lock so that no target of it can be placed on that disk unseen.
    fn claim_stray(&self) -> Option<(u32, ChainId)> {
        if !*self.started.lock() || !self.lease_valid() {
            return None;
        }
        let routing = self.routing();
        let hosted = self.targets.lock();
        for (disk, engine) in self.engines.iter().enumerate() {
            let disk = disk as u32;
            if engine.poisoned().is_some() {
                continue;
            }
            for chain in engine.chains() {
                if stray(&routing, &hosted, self.config.node, disk, chain) {
                    self.freeing.active.lock().insert((disk, chain));
                    return Some((disk, chain));
                }
            }
        }
        None
    }

    /// Whether a batch is removing `chain`'s chunks on `disk` right now.
    pub(crate) fn freeing(&self, disk: u32, chain: ChainId) -> bool {
        self.freeing.active.lock().contains(&(disk, chain))
    }

    /// Whether a freeing batch is running now.
    pub fn free_running(&self) -> bool {
        self.freeing.running.load(Ordering::SeqCst)
    }

    /// What the node has freed since it started.
    pub fn free_stats(&self) -> FreeStats {
        let f = &self.freeing;
        FreeStats {
            batches: f.batches.load(Ordering::Relaxed),
            passes: f.passes.load(Ordering::Relaxed),
            freed_chunks: f.freed_chunks.load(Ordering::Relaxed),
            freed_bytes: f.freed_bytes.load(Ordering::Relaxed),
        }
    }
}
