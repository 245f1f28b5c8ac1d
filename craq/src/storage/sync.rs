//! Resync of a returning successor.
//!
//! When the manager marks a target syncing, its predecessor (a serving
//! target) brings it up to date while writes keep flowing: new writes already
//! reach the syncing target as whole chunks. The predecessor asks for the
//! successor's chunk metadata (paged), compares it with its own, and for each
//! chunk that differs or is missing sends the whole committed chunk under the
//! chunk lock (so no write of that chunk interleaves); chunks the successor
//! has and the predecessor does not are removed there. Then it sends
//! "sync done", and the successor reports itself up to date; the manager
//! then marks it serving.
//!
//! A sync that fails (a node died, the chain changed) is abandoned; the node
//! starts a new one on a later heartbeat if the successor is still syncing.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use flyfs_bypass::BlockDevice;
use flyfs_chunk_engine::{ChunkKey, ReadRequest};
use flyfs_proto::ids::{ChainId, ChainVersion, ChunkId, TargetId};
use flyfs_proto::wire::mgmt::{PublicState, SyncProgress};
use flyfs_proto::wire::storage::{
    Channel, ChunkMetaInfo, DumpMeta, DumpMetaReq, Forward, ForwardOp, ForwardReq, StorageError,
    SyncDone, SyncDoneReq, WriteRsp,
};
use flyfs_rpc::Network;

use super::read::meta_info;
use super::{Local, Place, StorageNode};

/// What one chunk's comparison did.
enum Transfer {
    Same,
    Sent,
    Removed,
}

/// What a resync did, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub compared: u64,
    pub transferred: u64,
    pub removed: u64,
}

impl<D: BlockDevice, N: Network> StorageNode<D, N> {
    /// Starts a resync task for every syncing successor of a target of ours
    /// that has none running.
    pub(crate) fn start_syncs(self: Arc<Self>) {
        let routing = self.routing();
        let chains: Vec<ChainId> = routing.chains.iter().map(|c| c.id).collect();
        for chain in chains {
            let Some(version) = routing.chain(chain).map(|c| c.version) else {
                continue;
            };
            let Ok(place) = self.place(chain, version) else {
                continue;
            };
            if self.readable(&place).is_err() {
                continue;
            }
            let Some(successor) = place.successor() else {
                continue;
            };
            // A member leaving the chain (or going offline) is syncing only
            // to stay in the write path until its node has seen that it no
            // longer serves: it is up to date, and goes anyway.
            if successor.state != PublicState::Syncing
                || place
                    .routing
                    .target(successor.target)
                    .is_some_and(|t| t.leaving)
            {
                continue;
            }
            {
                let mut syncs = self.syncs.lock();
                if syncs.contains_key(&chain) {
                    continue;
                }
                syncs.insert(chain, successor.target);
            }
            let node = self.clone();
            tokio::spawn(async move {
                let result = node.sync(&place, successor.target).await;
                match result {
                    Ok(report) => tracing::info!(
                        ?chain, successor = ?successor.target, ?report, "resync done"
                    ),
                    Err(e) => tracing::warn!(
                        ?chain, successor = ?successor.target, "resync abandoned: {e}"
                    ),
                }
                node.syncs.lock().remove(&chain);
            });
        }
    }

    async fn sync(&self, place: &Place, successor: TargetId) -> Result<SyncReport, StorageError> {
        let chain = place.chain.id;
        let failed = |reason: String| StorageError::ForwardFailed {
            chain,
            chunk: ChunkId::default(),
            reason,
        };
        let addr = place
            .addr_of(successor)
            .ok_or_else(|| failed(format!("no address for {successor:?}")))?;
        // Wait out every write that chose its successor before the chain
        // said "syncing": such a write may have skipped the successor, and
        // may commit after the listing below.
        drop(place.target.inflight.write().await);
        let remote = self.dump_remote(place, &addr).await?;
        let engine = self.engine(&place.target);
        let mine: Vec<ChunkMetaInfo> = engine
            .chunks(chain, .., usize::MAX)
            .iter()
            .filter_map(meta_info)
            .collect();
        // What differs now is what the progress counts: each chunk's bytes
        // are done once the loop below has dealt with it, sent or not (a
        // write may have brought the successor up to date meanwhile).
        let planned: BTreeMap<ChunkId, u64> = mine
            .iter()
            .filter(|m| {
                remote
                    .get(&m.chunk)
                    .is_none_or(|t| (t.version, t.crc, t.len) != (m.version, m.crc, m.len))
            })
            .map(|m| (m.chunk, u64::from(m.len)))
            .collect();
        // A resync of the same successor that ran before (abandoned, or
        // finished while the manager had not yet marked it serving) counts
        // on from what it did, so the progress never goes back.
        let mut progress = {
            let mut all = self.sync_progress.lock();
            let before = all
                .get(&chain)
                .filter(|p| p.target == successor)
                .copied()
                .unwrap_or_default();
            let progress = SyncProgress {
                chain,
                target: successor,
                chunks_done: before.chunks_done,
                chunks_total: before.chunks_done + planned.len() as u64,
                bytes_done: before.bytes_done,
                bytes_total: before.bytes_done + planned.values().sum::<u64>(),
            };
            all.insert(chain, progress);
            progress
        };
        let mut todo: Vec<ChunkId> = mine.iter().map(|m| m.chunk).collect();
        let mut report = SyncReport {
            compared: todo.len() as u64,
            ..SyncReport::default()
        };
        todo.extend(remote.keys());
        todo.sort();
        todo.dedup();
        for chunk in todo {
            // Routing may have moved on: stop if we are no longer the one to
            // sync this successor.
            let now = self.place(chain, self.routing_version_of(chain))?;
            if now.successor().map(|s| (s.target, s.state))
                != Some((successor, PublicState::Syncing))
            {
                return Err(failed("the chain changed during the resync".into()));
            }
            match self
                .transfer(&now, &addr, chunk, remote.get(&chunk))
                .await?
            {
                Transfer::Same => {}
                Transfer::Sent => report.transferred += 1,
                Transfer::Removed => report.removed += 1,
            }
            if let Some(bytes) = planned.get(&chunk) {
                progress.chunks_done += 1;
                progress.bytes_done += bytes;
                self.sync_progress.lock().insert(chain, progress);
            }
        }
        // The exactly-once memory goes in pages, the last one ending the
        // resync (an empty table is one empty last page).
        let now = self.place(chain, self.routing_version_of(chain))?;
        let finished = now.target.channels.finished();
        for req in sync_done_pages(chain, now.version(), &finished) {
            let (rsp, _) = self
                .rpc
                .call::<SyncDone>(&addr, &req, Bytes::new(), &self.call_options())
                .await
                .map_err(|e| failed(e.to_string()))?;
            rsp?;
        }
        Ok(report)
    }

    pub(super) fn routing_version_of(&self, chain: ChainId) -> flyfs_proto::ids::ChainVersion {
        self.routing()
            .chain(chain)
            .map(|c| c.version)
            .unwrap_or_default()
    }

    async fn dump_remote(
        &self,
        place: &Place,
        addr: &str,
    ) -> Result<BTreeMap<ChunkId, ChunkMetaInfo>, StorageError> {
        let mut remote = BTreeMap::new();
        let mut after = None;
        loop {
            let req = DumpMetaReq {
                chain: place.chain.id,
                chain_version: place.version(),
                after,
                limit: self.config.sync_page,
            };
            let (rsp, _) = self
                .rpc
                .call::<DumpMeta>(addr, &req, Bytes::new(), &self.call_options())
                .await
                .map_err(|e| StorageError::ForwardFailed {
                    chain: place.chain.id,
                    chunk: ChunkId::default(),
                    reason: format!("dumping the successor's metadata: {e}"),
                })?;
            let rsp = rsp?;
            after = rsp.chunks.last().map(|m| m.chunk);
            remote.extend(rsp.chunks.into_iter().map(|m| (m.chunk, m)));
            if !rsp.more || after.is_none() {
                return Ok(remote);
            }
        }
    }

    /// Brings one chunk of the successor in line with ours, under the chunk
    /// lock, comparing with what the successor reported: sends our committed
    /// version whole, removes theirs, or does nothing when they match.
    async fn transfer(
        &self,
        place: &Place,
        addr: &str,
        chunk: ChunkId,
        theirs: Option<&ChunkMetaInfo>,
    ) -> Result<Transfer, StorageError> {
        let _lock = place.target.locks.lock(chunk).await;
        let engine = self.engine(&place.target);
        let key = ChunkKey::new(place.chain.id, chunk);
        let mine = engine.stat(key).as_ref().and_then(meta_info);
        let same = match (mine, theirs) {
            (Some(m), Some(t)) => m.version == t.version && m.crc == t.crc && m.len == t.len,
            (None, None) => true,
            _ => false,
        };
        if same {
            return Ok(Transfer::Same);
        }
        let (version, op, payload) = match mine {
            Some(_) => {
                let out = engine
                    .read(key, ReadRequest::whole_verified())
                    .await
                    .map_err(|e| self.engine_failed(place, e))?;
                let op = ForwardOp::Replace { crc: out.chunk_crc };
                (out.version, op, Bytes::from_owner(out.data))
            }
            None => (Default::default(), ForwardOp::Remove, Bytes::new()),
        };
        let sent = if op == ForwardOp::Remove {
            Transfer::Removed
        } else {
            Transfer::Sent
        };
        let req = ForwardReq {
            chain: place.chain.id,
            chain_version: place.version(),
            chunk,
            version,
            op,
            chunk_size: self.engine(&place.target).chunk_size_max(),
            channel: Channel::default(),
            sync: true,
        };
        let (rsp, _) = self
            .rpc
            .call::<Forward>(addr, &req, payload, &self.call_options())
            .await
            .map_err(|e| StorageError::ForwardFailed {
                chain: place.chain.id,
                chunk,
                reason: e.to_string(),
            })?;
        rsp?;
        Ok(sent)
    }

    /// At the successor: the predecessor has sent everything.
    pub(crate) async fn sync_done(&self, req: SyncDoneReq) -> Result<(), StorageError> {
        let place = self.place_fresh(req.chain, req.chain_version).await?;
        self.writable(&place)?;
        for (channel, result) in &req.channels {
            place.target.channels.finish(*channel, *result);
        }
        if req.more {
            return Ok(());
        }
        let mut local = place.target.local.lock();
        if *local == Local::NeedsSync {
            tracing::info!(target = ?place.target.id, chain = ?req.chain, "resynced: up to date");
            *local = Local::UpToDate;
        }
        Ok(())
    }
}

/// The `SyncDone` requests that hand `finished` on: pages of at most
/// [`SyncDoneReq::CHANNELS_PER_PAGE`] entries, every one but the last saying
/// `more` (an empty table is one empty last page).
fn sync_done_pages(
    chain: ChainId,
    chain_version: ChainVersion,
    finished: &[(Channel, WriteRsp)],
) -> Vec<SyncDoneReq> {
    let mut pages: Vec<SyncDoneReq> = finished
        .chunks(SyncDoneReq::CHANNELS_PER_PAGE)
        .map(|page| SyncDoneReq {
            chain,
            chain_version,
            channels: page.to_vec(),
            more: true,
        })
        .collect();
    match pages.last_mut() {
        Some(last) => last.more = false,
        None => pages.push(SyncDoneReq {
            chain,
            chain_version,
            channels: Vec::new(),
            more: false,
        }),
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use flyfs_proto::ids::ClientId;

    #[test]
    fn the_channel_table_travels_in_pages_ending_with_the_last() {
        let per_page = SyncDoneReq::CHANNELS_PER_PAGE;
        for entries in [0, 1, per_page, per_page + 1, 3 * per_page + 5] {
            let finished: Vec<(Channel, WriteRsp)> = (0..entries as u64)
                .map(|i| {
                    let channel = Channel {
                        client: ClientId(i),
                        id: 1,
                        seq: i,
                    };
                    (channel, WriteRsp::default())
                })
                .collect();
            let pages = sync_done_pages(ChainId(3), ChainVersion(4), &finished);
            assert_eq!(pages.len(), entries.div_ceil(per_page).max(1), "{entries}");
            let (last, rest) = pages.split_last().expect("at least one page");
            assert!(!last.more && rest.iter().all(|page| page.more), "{entries}");
            assert!(pages.iter().all(|page| page.channels.len() <= per_page));
            assert!(
                pages
                    .iter()
                    .all(|page| (page.chain, page.chain_version) == (ChainId(3), ChainVersion(4)))
            );
            let sent: Vec<_> = pages
                .iter()
                .flat_map(|page| page.channels.clone())
                .collect();
            assert_eq!(sent, finished);
        }
    }
}
