//! The CRAQ write path.
//!
//! A client write reaches the chain's head. The head checks the chain version
//! and the client channel (exactly-once), takes the chunk lock, and stores the
//! update as pending version `committed + 1` while it forwards the client's
//! bytes to its successor, which does the same. The tail commits first; each replica
//! commits when its successor answered, and compares the successor's
//! whole-chunk checksum with its own, so diverged replicas are caught at the
//! write that diverged them. A syncing successor gets the whole chunk instead
//! of the update, as does a successor that answers `NeedWholeChunk`.
//!
//! Durability: every replica but the tail *prepares* its pending version (the
//! engine makes it durable, and recovers it as committed after a crash)
//! before it forwards the update, so its commit on the way back is a change
//! in memory and it answers its predecessor at once; the tail commits
//! durably. When the tail commits, and so makes the version visible to
//! readers, every replica before it therefore holds the version durably:
//! whichever replica the manager revives after the whole chain failed has
//! every write a reader saw. A replica that recovers a version its chain
//! never committed is cut back by the resync every restarted target goes
//! through; a last serving replica (lastsrv) keeps it, which is allowed:
//! a write that was never acknowledged may or may not take effect.
//! `StorageConfig::overlap_prepare_and_forward` forwards while the Prepare
//! is under way instead: a journal commit less per replica on the path, and
//! the window above open again.
//!
//! When forwarding fails (the successor died), the replica keeps retrying
//! with fresh routing until the manager has replaced the successor or the
//! forward deadline passes; the chunk stays locked meanwhile, so writes to
//! other chunks are unaffected. A replica that gives up on an update it has
//! stored fences itself off (see `mod.rs`); a failed device takes its target
//! offline and answers "not serving", so the predecessor waits for the
//! manager to drop it instead of failing the write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flyfs_bypass::{BlockDevice, DmaBuf};
use flyfs_chunk_engine::{
    ChunkKey, EngineError, ReadRequest, ReadVersion, WriteOp as EngineOp, WriteRequest,
};
use flyfs_proto::ids::{ChunkId, ChunkVersion, ClientId, RequestId};
use flyfs_proto::wire::storage::{
    Channel, Forward, ForwardOp, ForwardReq, ForwardRsp, StorageError, WriteOp, WriteReq, WriteRsp,
};
use flyfs_rpc::Network;
use flyfs_rpc::Payload;
use flyfs_time::{Attempt, Backoff, Retry};

use super::channels::{self, Begin};
use super::{FailPoint, Place, StorageNode};

/// An update as it is applied at one replica.
#[derive(Debug)]
pub(crate) struct Update {
    pub chunk: ChunkId,
    pub version: ChunkVersion,
    pub op: ForwardOp,
    pub chunk_size: u32,
    pub channel: Channel,
    /// The bytes of a write or replace, in a device buffer for the engine.
    pub data: Option<DmaBuf>,
    /// The same bytes as received, forwarded to the successor without a copy.
    pub bytes: Bytes,
}

/// Engine errors as the service reports them.
pub(crate) fn engine_error(e: EngineError) -> StorageError {
    match e {
        EngineError::NoSpace { .. } => StorageError::NoSpace,
        EngineError::Checksum {
            what: "write payload",
            expected,
            computed,
            ..
        } => StorageError::PayloadChecksum {
            expected,
            actual: computed,
        },
        other => StorageError::Engine {
            message: other.to_string(),
        },
    }
}

impl<D: BlockDevice, N: Network> StorageNode<D, N> {
    /// An engine error on this target's path. A device failure (or a
    /// poisoned engine) takes the target out for good: it reports itself
    /// offline, and the sender gets a retryable "not serving", so a
    /// predecessor keeps forwarding until the manager has dropped this target
    /// from the chain, instead of failing the client's write.
    pub(crate) fn engine_failed(&self, place: &Place, e: EngineError) -> StorageError {
        let device = matches!(e, EngineError::Device { .. } | EngineError::Poisoned { .. })
            || self.engine(&place.target).poisoned().is_some();
        if !device {
            return engine_error(e);
        }
        let mut local = place.target.local.lock();
        if *local != super::Local::Failed {
            tracing::error!(target = ?place.target.id, "device failed, taking the target offline: {e}");
            *local = super::Local::Failed;
        }
        StorageError::NotServing {
            chain: place.chain.id,
            target: place.target.id,
            reason: format!("its device failed: {e}"),
        }
    }
}

type RemovingMap = std::sync::Arc<parking_lot::Mutex<std::collections::BTreeMap<ChunkId, usize>>>;

/// A remove on its way through a replica, marked in `Target::removing` for
/// as long as this lives (dropped when the remove returns, fails or is
/// cancelled).
struct Removing {
    removing: RemovingMap,
    chunk: ChunkId,
}

impl Removing {
    fn enter(removing: &RemovingMap, chunk: ChunkId) -> Removing {
        *removing.lock().entry(chunk).or_default() += 1;
        Removing {
            removing: removing.clone(),
            chunk,
        }
    }
}

impl Drop for Removing {
    fn drop(&mut self) {
        let mut removing = self.removing.lock();
        if let Some(n) = removing.get_mut(&self.chunk) {
            *n -= 1;
            if *n == 0 {
                removing.remove(&self.chunk);
            }
        }
    }
}

/// The engine's request id for a channel's request: the channel number in
/// the top 16 bits, the sequence below. Stored with each chunk version, it
/// tells which request produced it.
fn request_id(channel: Channel) -> RequestId {
    RequestId((u64::from(channel.id) << 48) | (channel.seq & ((1 << 48) - 1)))
}

/// The channel whose write the engine recorded as `request` (the inverse of
/// `request_id`, for sequences below 2^48).
pub(crate) fn channel_of(client: ClientId, request: RequestId) -> Channel {
    Channel {
        client,
        id: (request.0 >> 48) as u32,
        seq: request.0 & ((1 << 48) - 1),
    }
}

/// How a forward retries after failing: from 20 ms, doubling up to 500 ms,
/// until the forward deadline.
const FORWARD_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(20), Duration::from_millis(500));

/// How one send of an update to the successor ended.
enum Forwarded {
    /// The forward is over: the successor's answer, no successor (we are
    /// the tail), or a failure another send cannot fix.
    Done(Result<Option<ForwardRsp>, StorageError>),
    /// The successor wants the whole chunk instead of the update.
    NeedWholeChunk,
    /// Worth another send after the backoff, with fresh routing.
    Failed(String),
}

impl<D: BlockDevice, N: Network> StorageNode<D, N> {
    /// A client's write, at the head.
    pub(crate) async fn client_write(
        &self,
        req: WriteReq,
        payload: Payload,
    ) -> Result<WriteRsp, StorageError> {
        let place = self.place_fresh(req.chain, req.chain_version).await?;
        self.readable(&place)?;
        if !place.is_head() {
            return Err(StorageError::NotHead {
                chain: req.chain,
                target: place.target.id,
            });
        }
        let chunk_size = self.check_chunk_size(req.chunk_size)?;
        let (op, data) = match req.op {
            WriteOp::Write { offset, crc } => {
                let len = payload.len();
                if u64::from(offset) + len as u64 > u64::from(chunk_size) || len == 0 {
                    return Err(StorageError::Invalid {
                        reason: format!(
                            "write of {len} bytes at {offset} does not fit a chunk of {chunk_size}"
                        ),
                    });
                }
                let (data, bytes) = self.fetch(&place, &payload).await?;
                (ForwardOp::Write { offset, crc }, Some((data, bytes)))
            }
            WriteOp::Truncate { len } if len <= chunk_size => (ForwardOp::Truncate { len }, None),
            WriteOp::Truncate { len } => {
                return Err(StorageError::Invalid {
                    reason: format!("truncate to {len} past the chunk size {chunk_size}"),
                });
            }
            WriteOp::Remove => (ForwardOp::Remove, None),
        };

        let target = place.target.clone();
        match channels::begin(&target.channels, req.channel).await {
            Begin::Run => {}
            Begin::Done(rsp) => {
                tracing::debug!(chunk = ?req.chunk, channel = %req.channel, ?rsp, "retry answered from memory");
                return Ok(rsp);
            }
            Begin::Refuse(e) => return Err(e),
            Begin::Wait(_) => unreachable!("channels::begin waits itself"),
        }
        let _lock = target.locks.lock(req.chunk).await;
        // This very write may have been applied here while we waited for the
        // lock: its first attempt, forwarded by the head before us, reached
        // this replica before it became head (the old head left the chain
        // during the write) and finished here. The chunk's version below is
        // no proof of that once another write has come in between (sim seed
        // 2624): the channel table, which that forward filled, is.
        if let Some(rsp) = target.channels.answer(req.channel) {
            tracing::debug!(chunk = ?req.chunk, channel = %req.channel, ?rsp, "applied meanwhile by a forward: answered from memory");
            return Ok(rsp);
        }
        let engine = self.engine(&target);
        let key = ChunkKey::new(req.chain, req.chunk);
        let meta = engine.stat(key).and_then(|info| info.committed);
        // The chunk's current version came from this very request: a retry
        // whose reply was lost (the engine remembers it durably, so this
        // holds even when the channel table was lost with a restart).
        if let Some(m) = meta
            && m.client == req.channel.client
            && m.request == request_id(req.channel)
            && req.op != WriteOp::Remove
        {
            let rsp = WriteRsp {
                version: m.version,
                chunk_len: m.len,
                chunk_crc: m.crc,
            };
            target.channels.finish(req.channel, rsp);
            return Ok(rsp);
        }
        let committed = meta.map_or(ChunkVersion(0), |m| m.version);
        tracing::debug!(target_id = ?target.id, chunk = ?req.chunk, channel = %req.channel, ?committed, op = ?op, "head write");
        let (data, bytes) = data.map_or((None, Bytes::new()), |(data, bytes)| (Some(data), bytes));
        let update = Update {
            chunk: req.chunk,
            version: ChunkVersion(committed.0 + 1),
            op,
            chunk_size,
            channel: req.channel,
            data,
            bytes,
        };
        let result = self.apply_and_forward(&place, update).await;
        match &result {
            Ok(rsp) => target.channels.finish(req.channel, *rsp),
            Err(_) => target.channels.fail(req.channel),
        }
        result
    }

    /// An update forwarded by the predecessor.
    pub(crate) async fn forwarded(
        &self,
        req: ForwardReq,
        payload: Payload,
    ) -> Result<ForwardRsp, StorageError> {
        let place = self.place_fresh(req.chain, req.chain_version).await?;
        self.writable(&place)?;
        let chunk_size = self.check_chunk_size(req.chunk_size)?;
        let _forward = ForwardGuard::enter(&place.target, req.chunk, req.version, req.channel)?;
        let (data, bytes) = match req.op {
            ForwardOp::Write { .. } | ForwardOp::Replace { .. } => {
                let (data, bytes) = self.fetch(&place, &payload).await?;
                (Some(data), bytes)
            }
            ForwardOp::Truncate { .. } | ForwardOp::Remove => (None, Bytes::new()),
        };
        let target = place.target.clone();
        let _lock = target.locks.lock(req.chunk).await;
        let engine = self.engine(&target);
        let key = ChunkKey::new(req.chain, req.chunk);
        let committed = engine.stat(key).and_then(|info| info.committed);
        let have = committed.map_or(ChunkVersion(0), |m| m.version);
        // A forward this replica already applied (a retry after a lost
        // reply) is recognised by the request that produced the version;
        // the same version number produced by another request means the
        // replicas diverged, and only the whole chunk repairs that.
        let same_request = committed.is_some_and(|m| {
            m.version == req.version
                && m.client == req.channel.client
                && m.request == request_id(req.channel)
        });
        match req.op {
            ForwardOp::Remove => {}
            ForwardOp::Write { .. } | ForwardOp::Truncate { .. } if same_request && !req.sync => {
                let meta = committed.expect("same_request implies a committed version");
                return Ok(ForwardRsp {
                    chunk_len: meta.len,
                    chunk_crc: meta.crc,
                });
            }
            ForwardOp::Write { .. } | ForwardOp::Truncate { .. } => {
                if have.0 + 1 != req.version.0 {
                    return Err(StorageError::NeedWholeChunk {
                        chunk: req.chunk,
                        have,
                        want: req.version,
                    });
                }
            }
            ForwardOp::Replace { crc } => {
                if let Some(meta) = committed
                    && meta.version == req.version
                    && meta.crc == crc
                    && (req.sync || same_request)
                {
                    return Ok(ForwardRsp {
                        chunk_len: meta.len,
                        chunk_crc: meta.crc,
                    });
                }
                // The predecessor is authoritative: a replica that is ahead of
                // it (it kept an update the chain later lost) is cut back.
                if have >= req.version {
                    engine
                        .remove(key)
                        .await
                        .map_err(|e| self.engine_failed(&place, e))?;
                }
            }
        }
        // A resync that removes or replaces this replica's version undoes
        // the write that made it: the exactly-once memory of that write
        // goes too, or its client's retry would be answered as done with
        // nothing of it left (sim seed 3929: a head's prepared write,
        // recovered after a crash and remembered from its record, removed
        // by the resync that followed, then its retry answered from memory).
        // The predecessor's memory comes after the chunks (`sync_done`).
        if req.sync
            && matches!(req.op, ForwardOp::Remove | ForwardOp::Replace { .. })
            && let Some(meta) = committed
            && meta.client.0 != 0
        {
            target
                .channels
                .forget_finished(channel_of(meta.client, meta.request));
        }
        tracing::debug!(target_id = ?target.id, chunk = ?req.chunk, channel = %req.channel, version = ?req.version, ?have, op = ?req.op, sync = req.sync, "forwarded write");
        let update = Update {
            chunk: req.chunk,
            version: req.version,
            op: req.op,
            chunk_size,
            channel: req.channel,
            data,
            bytes,
        };
        let rsp = if req.sync {
            self.apply_locally(&place, update).await?
        } else {
            self.apply_and_forward(&place, update).await?
        };
        if !req.sync && req.channel.client.0 != 0 {
            place.target.channels.finish(req.channel, rsp);
        }
        Ok(ForwardRsp {
            chunk_len: rsp.chunk_len,
            chunk_crc: rsp.chunk_crc,
        })
    }

    fn check_chunk_size(&self, chunk_size: u32) -> Result<u32, StorageError> {
        let max = self.engines.first().map_or(0, |e| e.chunk_size_max());
        if chunk_size == 0 || chunk_size > max {
            return Err(StorageError::Invalid {
                reason: format!("chunk size {chunk_size} is not in 1..={max}"),
            });
        }
        Ok(chunk_size)
    }

    /// Pulls the request's payload into a device buffer, and gives it also
    /// as shared bytes for the forward to the successor. Its CRC is checked
    /// by the engine's write, once (a mismatch comes back as
    /// `PayloadChecksum`, before anything is stored).
    ///
    /// A payload that arrived in aligned memory (rpc's receive pool) is
    /// written to the device from where it lies, through a read-only view
    /// shared with the forward to the successor: no copy, which was a tenth of
    /// the CPU of a replicated write. A payload still on the sender (RDMA)
    /// is pulled into a pool buffer, which the device write and the forward
    /// then share the same way (over RDMA the successor pulls it from there).
    async fn fetch(
        &self,
        place: &Place,
        payload: &Payload,
    ) -> Result<(DmaBuf, Bytes), StorageError> {
        if let Payload::Inline(bytes) = payload
            && let Ok(view) = DmaBuf::from_bytes(bytes.clone())
        {
            return Ok((view, bytes.clone()));
        }
        let engine = self.engine(&place.target);
        let mut buf = engine.pool().alloc(payload.len());
        payload
            .fetch_into(&mut buf)
            .await
            .map_err(|e| StorageError::Invalid {
                reason: format!("payload: {e}"),
            })?;
        let bytes = Bytes::from_owner(buf);
        match DmaBuf::from_bytes(bytes.clone()) {
            Ok(view) => Ok((view, bytes)),
            // A pool that ran dry gives heap memory, which need not be
            // aligned for the device: the device write gets its own copy.
            Err(bytes) => Ok((DmaBuf::copy_from(&bytes), bytes)),
        }
    }

    /// Stores the update as a pending version, forwards it down the chain,
    /// and commits when the successor has (or at once, at the tail).
    async fn apply_and_forward(
        &self,
        place: &Place,
        mut update: Update,
    ) -> Result<WriteRsp, StorageError> {
        let _inflight = place.target.inflight.read().await;
        let engine = self.engine(&place.target);
        let key = ChunkKey::new(place.chain.id, update.chunk);
        if update.op == ForwardOp::Remove {
            let _removing = Removing::enter(&place.target.removing, update.chunk);
            if let Err(failure) = self.forward(place, &update, None).await {
                // Replicas after us may have removed the chunk already.
                self.fence(place, &failure.to_string());
                return Err(failure);
            }
            engine
                .remove(key)
                .await
                .map_err(|e| self.engine_failed(place, e))?;
            return Ok(WriteRsp::default());
        }
        // The local write runs beside the forward, which waits for it (see
        // `forward_once`: nothing is visible at the tail before every replica
        // holds it durably) and then sends the client's bytes as they came,
        // or the whole pending version to a syncing successor.
        let data = update.data.take();
        let (local_done, local_seen) = tokio::sync::watch::channel(None);
        let prepare = place.successor().is_some();
        let local = async {
            let outcome = self.write_pending(place, &update, data, prepare).await;
            if let Ok(outcome) = &outcome {
                let _ = local_done.send(Some(outcome.crc));
            }
            drop(local_done);
            self.failpoints.check(FailPoint::AfterPending).await;
            outcome
        };
        let (outcome, forwarded) =
            futures::join!(local, self.forward(place, &update, Some(local_seen)));
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(local) => {
                // The successor may have applied what we could not: only a
                // fresh copy through resync makes us trustworthy again.
                if !matches!(forwarded, Err(_) | Ok(None)) {
                    self.fence(place, &local.to_string());
                }
                return Err(local);
            }
        };
        let failure = match forwarded {
            Ok(Some(successor))
                if successor.chunk_crc != outcome.crc || successor.chunk_len != outcome.len =>
            {
                StorageError::ReplicaMismatch {
                    chunk: update.chunk,
                    version: outcome.version,
                    local: outcome.crc,
                    successor: successor.chunk_crc,
                }
            }
            Ok(_) => return self.commit(place, &update, outcome).await,
            Err(e) => e,
        };
        // The successor refused before applying anything: dropping our
        // pending version restores the state before the write.
        let clean_refusal = matches!(
            failure,
            StorageError::PayloadChecksum { .. } | StorageError::Invalid { .. }
        );
        if !clean_refusal {
            // Otherwise some replica after us may hold or even have committed
            // this version while we cannot finish it. Serving on would let
            // readers see two histories; instead this target fences itself
            // off and comes back through a resync from its predecessor.
            self.fence(place, &failure.to_string());
        }
        let _ = engine.abort(key, outcome.version).await;
        Err(failure)
    }

    async fn commit(
        &self,
        place: &Place,
        update: &Update,
        outcome: flyfs_chunk_engine::WriteOutcome,
    ) -> Result<WriteRsp, StorageError> {
        let engine = self.engine(&place.target);
        let key = ChunkKey::new(place.chain.id, update.chunk);
        self.failpoints.check(FailPoint::BeforeCommit).await;
        engine
            .commit(key, outcome.version)
            .await
            .map_err(|e| self.engine_failed(place, e))?;
        self.failpoints.check(FailPoint::AfterCommit).await;
        tracing::debug!(target_id = ?place.target.id, chunk = ?update.chunk, version = ?outcome.version, crc = outcome.crc, "committed");
        Ok(WriteRsp {
            version: outcome.version,
            chunk_len: outcome.len,
            chunk_crc: outcome.crc,
        })
    }

    /// Stores and commits an update without forwarding it (resync transfers,
    /// whose receiver is the end of the resync).
    async fn apply_locally(
        &self,
        place: &Place,
        mut update: Update,
    ) -> Result<WriteRsp, StorageError> {
        let engine = self.engine(&place.target);
        let key = ChunkKey::new(place.chain.id, update.chunk);
        if update.op == ForwardOp::Remove {
            engine
                .remove(key)
                .await
                .map_err(|e| self.engine_failed(place, e))?;
            return Ok(WriteRsp::default());
        }
        let data = update.data.take();
        let outcome = self.write_pending(place, &update, data, false).await?;
        self.commit(place, &update, outcome).await
    }

    /// Stores the update as a pending version; `prepare` makes it durable
    /// (see the module docs).
    async fn write_pending(
        &self,
        place: &Place,
        update: &Update,
        data: Option<DmaBuf>,
        prepare: bool,
    ) -> Result<flyfs_chunk_engine::WriteOutcome, StorageError> {
        let engine = self.engine(&place.target);
        let mut data = data;
        let op = match update.op {
            ForwardOp::Write { offset, crc } => EngineOp::Update {
                offset,
                data: data.take().ok_or_else(|| missing_data(update))?,
                crc,
            },
            ForwardOp::Replace { crc } => EngineOp::Replace {
                data: data.take().ok_or_else(|| missing_data(update))?,
                crc,
            },
            ForwardOp::Truncate { len } => EngineOp::Truncate { len },
            ForwardOp::Remove => unreachable!("removes are not versioned writes"),
        };
        let outcome = engine
            .write(WriteRequest {
                key: ChunkKey::new(place.chain.id, update.chunk),
                version: update.version,
                chain_version: place.version(),
                op,
                client: update.channel.client,
                request: request_id(update.channel),
                prepare,
            })
            .await
            .map_err(|e| self.engine_failed(place, e))?;
        if outcome.len > update.chunk_size {
            let _ = engine
                .abort(ChunkKey::new(place.chain.id, update.chunk), outcome.version)
                .await;
            return Err(StorageError::Invalid {
                reason: format!(
                    "the update makes the chunk {} bytes, over the chunk size {}",
                    outcome.len, update.chunk_size
                ),
            });
        }
        Ok(outcome)
    }

    /// Sends the update to the successor, retrying with fresh routing until
    /// it is taken, the chain has no successor for us any more, or the
    /// deadline passes. `Ok(None)`: there is no successor (we are the tail).
    async fn forward(
        &self,
        place: &Place,
        update: &Update,
        local: Option<tokio::sync::watch::Receiver<Option<u32>>>,
    ) -> Result<Option<ForwardRsp>, StorageError> {
        // Once a successor asked for the whole chunk, every later attempt
        // sends it whole. Kept outside the attempts' futures, which may not
        // borrow the retry closure's state.
        let whole = AtomicBool::new(false);
        let (whole, local) = (&whole, &local);
        // Per update: forwards of different writes retry apart, and a
        // simulation replays the waits.
        let seed = update.channel.client.0.rotate_left(32) ^ request_id(update.channel).0;
        let answer = Retry::deadline(self.config.forward_deadline, FORWARD_BACKOFF)
            .run(seed, |attempt| async move {
                // A dead successor is replaced only when the manager
                // notices; meanwhile keep our routing fresh.
                if attempt > 1 {
                    let _ = self.refresh_routing().await;
                }
                loop {
                    match self.forward_once(place, update, local, whole).await {
                        Forwarded::Done(answer) => return Attempt::Done(answer),
                        Forwarded::Failed(reason) => return Attempt::Retry(reason),
                        // Not a failure: send again at once, whole.
                        Forwarded::NeedWholeChunk => whole.store(true, Ordering::Relaxed),
                    }
                }
            })
            .await;
        answer.unwrap_or_else(|gave_up| {
            Err(StorageError::ForwardFailed {
                chain: place.chain.id,
                chunk: update.chunk,
                reason: gave_up.last,
            })
        })
    }

    /// One send of the update to the successor as the routing has it now.
    async fn forward_once(
        &self,
        place: &Place,
        update: &Update,
        local: &Option<tokio::sync::watch::Receiver<Option<u32>>>,
        whole: &AtomicBool,
    ) -> Forwarded {
        // Re-resolve our place each time: the chain may have changed.
        let now = match self.place(place.chain.id, self.routing_chain_version(place)) {
            Ok(now) => now,
            Err(e) => return Forwarded::Done(Err(e)),
        };
        // Our own state may have changed (fenced, lease lapsed, taken
        // offline): then this replica cannot finish the write.
        if let Err(e) = self.writable(&now) {
            return Forwarded::Done(Err(e));
        }
        // Members that precede us now and did not when the update came (we
        // were made syncing on our way out, and moved behind the serving
        // members) never saw it: the update cannot go on from here. Members
        // that left before us are fine: that is a predecessor's failure.
        let before = place.predecessors();
        if let Some(new) = now.predecessors().into_iter().find(|t| !before.contains(t)) {
            return Forwarded::Done(Err(StorageError::NotServing {
                chain: now.chain.id,
                target: now.target.id,
                reason: format!("{new:?} moved ahead of it in the chain during the write"),
            }));
        }
        let Some(successor) = now.successor() else {
            return Forwarded::Done(Ok(None));
        };
        let Some(addr) = now.addr_of(successor.target) else {
            return Forwarded::Failed(format!("no address for {:?}", successor.target));
        };
        // Nothing goes down the chain before our Prepare is durable (unless
        // overlapping is asked for): the tail's commit makes the version
        // visible, and it must not be visible before every replica holds it.
        if let Some(local) = local
            && !self.config.overlap_prepare_and_forward
            && local.clone().wait_for(Option::is_some).await.is_err()
        {
            return Forwarded::Done(Err(StorageError::Engine {
                message: "the local write failed".into(),
            }));
        }
        let whole = whole.load(Ordering::Relaxed);
        // A syncing successor gets whole chunks, unless it is leaving: it
        // was serving, so it holds the version the update applies to (and
        // says `NeedWholeChunk` otherwise).
        let leaving = now
            .routing
            .target(successor.target)
            .is_some_and(|t| t.leaving);
        let send_whole = whole
            || (successor.state != flyfs_proto::wire::mgmt::PublicState::Serving
                && !leaving
                && update.op != ForwardOp::Remove);
        let (op, payload) = if send_whole {
            // The whole chunk is our pending version: wait until the
            // local write has stored it (and gave its CRC).
            let mut crc = None;
            if let Some(local) = local {
                let mut local = local.clone();
                match local.wait_for(Option::is_some).await {
                    Ok(done) => crc = *done,
                    Err(_) => {
                        return Forwarded::Done(Err(StorageError::Engine {
                            message: "the local write failed".into(),
                        }));
                    }
                }
            }
            let data = match self.whole_pending(&now, update).await {
                Ok(data) => data,
                Err(e) => return Forwarded::Done(Err(e)),
            };
            let crc = crc.unwrap_or_else(|| crc32c::crc32c(&data));
            (ForwardOp::Replace { crc }, Bytes::from_owner(data))
        } else {
            (update.op, update.bytes.clone())
        };
        let req = ForwardReq {
            chain: now.chain.id,
            chain_version: now.version(),
            chunk: update.chunk,
            version: update.version,
            op,
            chunk_size: update.chunk_size,
            channel: update.channel,
            sync: false,
        };
        self.failpoints.check(FailPoint::BeforeForward).await;
        let failure = match self
            .rpc
            .call::<Forward>(&addr, &req, payload, &self.call_options())
            .await
        {
            Ok((Ok(rsp), _)) => return Forwarded::Done(Ok(Some(rsp))),
            Ok((Err(StorageError::NeedWholeChunk { .. }), _)) if !whole => {
                return Forwarded::NeedWholeChunk;
            }
            Ok((Err(e), _)) if !e.is_retryable() => return Forwarded::Done(Err(e)),
            Ok((Err(e), _)) => {
                if let StorageError::StaleChainVersion {
                    request, current, ..
                } = e
                    && current > request
                {
                    let _ = self.refresh_routing().await;
                }
                e.to_string()
            }
            Err(e) => {
                // A timed-out connection may be dead without knowing it, or
                // only this forward slow: the other forwards on it go on,
                // and it is closed only if it does not answer a ping.
                if matches!(e, flyfs_rpc::RpcError::Timeout { .. }) {
                    let rpc = self.rpc.clone();
                    let timeout = self.config.rpc_timeout;
                    tokio::spawn(async move { rpc.close_unresponsive(&addr, timeout).await });
                }
                e.to_string()
            }
        };
        tracing::debug!(target_id = ?now.target.id, chunk = ?update.chunk, successor = ?successor.target, "forward failed: {failure}");
        Forwarded::Failed(failure)
    }

    fn routing_chain_version(&self, place: &Place) -> flyfs_proto::ids::ChainVersion {
        self.routing()
            .chain(place.chain.id)
            .map_or(place.version(), |c| c.version)
    }

    /// The whole pending version of the update's chunk (what a syncing
    /// successor receives instead of the update).
    async fn whole_pending(&self, place: &Place, update: &Update) -> Result<DmaBuf, StorageError> {
        let engine = self.engine(&place.target);
        let out = engine
            .read(
                ChunkKey::new(place.chain.id, update.chunk),
                ReadRequest {
                    offset: 0,
                    len: u32::MAX,
                    version: ReadVersion::Exact(update.version),
                    verify: false,
                },
            )
            .await
            .map_err(|e| self.engine_failed(place, e))?;
        Ok(out.data)
    }
}

/// Marks a forwarded update as being applied; a second copy of it (a resend
/// after the predecessor's RPC timed out) is refused with `InProgress`, a
/// retryable answer, until the first finishes or is dropped.
struct ForwardGuard {
    forwards:
        std::sync::Arc<parking_lot::Mutex<std::collections::BTreeSet<(ChunkId, ChunkVersion)>>>,
    key: (ChunkId, ChunkVersion),
}

impl ForwardGuard {
    fn enter(
        target: &super::Target,
        chunk: ChunkId,
        version: ChunkVersion,
        channel: Channel,
    ) -> Result<ForwardGuard, StorageError> {
        let key = (chunk, version);
        if !target.forwards.lock().insert(key) {
            return Err(StorageError::InProgress {
                channel: channel.id,
                seq: channel.seq,
            });
        }
        Ok(ForwardGuard {
            forwards: target.forwards.clone(),
            key,
        })
    }
}

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        self.forwards.lock().remove(&self.key);
    }
}

fn missing_data(update: &Update) -> StorageError {
    StorageError::Invalid {
        reason: format!("{:?} of {:?} carries no data", update.op, update.chunk),
    }
}
