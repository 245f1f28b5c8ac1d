//! Reads and metadata queries.
//!
//! Any serving replica answers a read. A replica whose chunk has no pending
//! version returns its committed version: in CRAQ an update reaches the tail,
//! and so becomes visible, only after every replica before it holds it as
//! pending. A replica that holds a pending version cannot tell whether the
//! tail has committed it, so it asks the tail for the committed version
//! (CRAQ's apportioned query) and serves exactly that version, which it holds
//! either as its committed or its pending one. 3FS answers "not committed"
//! here instead and makes the client retry.

use bytes::Bytes;
use flyfs_bypass::BlockDevice;
use flyfs_chunk_engine::{ChunkKey, EngineError, ReadRequest, ReadVersion};
use flyfs_proto::ids::{ChunkId, ChunkVersion};
use flyfs_proto::wire::storage::{
    BatchReadReq, BatchReadRsp, ChunkMetaInfo, ChunkStamp, DiskSpace, DumpMetaReq, DumpMetaRsp,
    FetchChunkReq, FetchChunkRsp, LastChunkReq, LastChunkRsp, QueryVersion, QueryVersionReq,
    QueryVersionRsp, ReadItem, ReadResult, SpaceRsp, StorageError,
};
use flyfs_rpc::Network;

use super::scrub::Absence;
use super::{Place, StorageNode};

/// How often a read retries when versions move under it (each retry means a
/// newer version was committed meanwhile, so this bounds only a storm).
const READ_ATTEMPTS: usize = 8;

/// Reads of one batch a replica runs at once.
const BATCH_READS_IN_FLIGHT: usize = 16;

/// The answer for a chunk a repair has removed and not yet rewritten.
fn repairing(place: &Place, chunk: ChunkId) -> StorageError {
    StorageError::NotServing {
        chain: place.chain.id,
        target: place.target.id,
        reason: format!("{chunk:?} is being repaired"),
    }
}

/// The stamp of a committed version (`ReadItem::if_changed_from`).
fn stamp_of(meta: flyfs_chunk_engine::ChunkMeta) -> ChunkStamp {
    ChunkStamp {
        version: meta.version,
        len: meta.len,
        crc: meta.crc,
        client: meta.client,
        request: meta.request,
    }
}

pub(crate) fn meta_info(info: &flyfs_chunk_engine::ChunkInfo) -> Option<ChunkMetaInfo> {
    let meta = info.committed?;
    Some(ChunkMetaInfo {
        chunk: meta.chunk,
        version: meta.version,
        chain_version: meta.chain_version,
        len: meta.len,
        crc: meta.crc,
        pending: info.pending.map(|p| p.version),
    })
}

impl<D: BlockDevice, N: Network> StorageNode<D, N> {
    /// Serves a batch of reads; the reply's payload is the read bytes, item
    /// after item, as one part per item (empty for an item that failed):
    /// none is copied to join them, and over RDMA each part is its own RDMA
    /// WRITE into the client's buffer (into the item's own buffer when the
    /// client lent one per item).
    pub(crate) async fn batch_read(&self, req: BatchReadReq) -> (BatchReadRsp, Vec<Bytes>) {
        // BATCH_READS_IN_FLIGHT of the items' reads at a time run together:
        // one after another, a batch of chunks waited for each device read
        // before asking for the next. The bytes a batch holds are bounded
        // by `BatchReadReq::BYTES_MAX` either way.
        let mut reads = Vec::with_capacity(req.items.len());
        for group in req.items.chunks(BATCH_READS_IN_FLIGHT) {
            // Boxed, so that join_all moves pointers, not whole read futures.
            reads.extend(
                futures::future::join_all(group.iter().map(|item| Box::pin(self.read_one(item))))
                    .await,
            );
        }
        let mut results = Vec::with_capacity(req.items.len());
        let mut parts = Vec::with_capacity(req.items.len());
        for read in reads {
            match read {
                Ok((result, data)) => {
                    results.push(Ok(result));
                    parts.push(data);
                }
                Err(e) => {
                    results.push(Err(e));
                    parts.push(Bytes::new());
                }
            }
        }
        (BatchReadRsp { results }, parts)
    }

    async fn read_one(&self, item: &ReadItem) -> Result<(ReadResult, Bytes), StorageError> {
        let place = self.place_fresh(item.chain, item.chain_version).await?;
        self.readable(&place)?;
        let engine = self.engine(&place.target);
        let key = ChunkKey::new(item.chain, item.chunk);
        for _ in 0..READ_ATTEMPTS {
            // Before looking: a repair's window may hide the chunk.
            let repairs_closed = place.target.repairs_closed();
            let mut info = engine.stat(key);
            // A remove on its way through this replica counts as pending:
            // the tail may have removed the chunk already.
            let removing = place.target.removing.lock().contains_key(&item.chunk);
            let pending = info.and_then(|i| i.pending).is_some() || removing;
            // At the tail a pending version is an update in flight through
            // this replica; it may already be committed by a tail that
            // failed after committing it (this replica has just become the
            // tail). Its write commits it here once it learns so: wait for
            // it rather than serve the version before.
            let _settled = if pending && place.is_tail() {
                let guard = self.settle_at_tail(&place, item.chunk).await?;
                info = engine.stat(key);
                Some(guard)
            } else {
                None
            };
            let version = if pending && !place.is_tail() {
                match self.committed_at_tail(&place, item.chunk).await? {
                    ChunkVersion(0) => return Ok((ReadResult::default(), Bytes::new())),
                    v => ReadVersion::Exact(v),
                }
            } else if info.and_then(|i| i.committed).is_none() {
                match place.target.absence(item.chunk, repairs_closed) {
                    Absence::Real => return Ok((ReadResult::default(), Bytes::new())),
                    Absence::Repairing => return Err(repairing(&place, item.chunk)),
                    Absence::Changed => continue,
                }
            } else {
                ReadVersion::Committed
            };
            // Served as committed, `info` (taken after any settling) is the
            // committed version: a newer one would be pending here first.
            let stamp = match version {
                ReadVersion::Committed => info.and_then(|i| i.committed).map(stamp_of),
                ReadVersion::Exact(_) | ReadVersion::Pending => None,
            };
            if let Some(stamp) = stamp
                && item.if_changed_from == Some(stamp)
            {
                let result = ReadResult {
                    version: stamp.version,
                    chunk_len: stamp.len,
                    stamp: Some(stamp),
                    unchanged: true,
                    ..ReadResult::default()
                };
                return Ok((result, Bytes::new()));
            }
            let request = ReadRequest {
                offset: item.offset,
                len: item.len,
                version,
                verify: item.verify,
            };
            match engine.read(key, request).await {
                Ok(out) => {
                    tracing::debug!(target_id = ?place.target.id, chunk = ?item.chunk, ?version, got = ?out.version, tail = place.is_tail(), "read");
                    let result = ReadResult {
                        len: out.data.len() as u32,
                        version: out.version,
                        chunk_len: out.chunk_len,
                        // The engine may have committed a newer version
                        // since `info`: then the read names none.
                        stamp: stamp.filter(|s| {
                            (s.version, s.len, s.crc) == (out.version, out.chunk_len, out.chunk_crc)
                        }),
                        unchanged: false,
                    };
                    return Ok((result, Bytes::from_owner(out.data)));
                }
                // The version we chose was replaced meanwhile: choose again.
                Err(EngineError::NotFound { .. } | EngineError::VersionConflict { .. }) => continue,
                // A replica whose copy fails its checksum cannot serve it:
                // the client reads another replica, and a repair fetches a
                // good copy from one (scrub.rs).
                Err(e @ (EngineError::Checksum { .. } | EngineError::ChunkCorrupt { .. })) => {
                    tracing::error!(target = ?place.target.id, "{e}");
                    self.repair_after_read(&place, item.chunk);
                    return Err(StorageError::NotServing {
                        chain: item.chain,
                        target: place.target.id,
                        reason: e.to_string(),
                    });
                }
                Err(e) => return Err(self.engine_failed(&place, e)),
            }
        }
        Err(StorageError::NotServing {
            chain: item.chain,
            target: place.target.id,
            reason: format!("{:?} kept changing under the read", item.chunk),
        })
    }

    /// CRAQ's apportioned query: the committed version, as the tail says.
    async fn committed_at_tail(
        &self,
        place: &Place,
        chunk: ChunkId,
    ) -> Result<ChunkVersion, StorageError> {
        let unavailable = |reason: String| StorageError::NotServing {
            chain: place.chain.id,
            target: place.target.id,
            reason,
        };
        let tail = place
            .tail()
            .ok_or_else(|| unavailable("the chain has no serving tail".into()))?;
        let addr = place
            .addr_of(tail.target)
            .ok_or_else(|| unavailable(format!("no address for the tail {:?}", tail.target)))?;
        let req = QueryVersionReq {
            chain: place.chain.id,
            chain_version: place.version(),
            chunk,
        };
        match self
            .rpc
            .call::<QueryVersion>(&addr, &req, Bytes::new(), &self.call_options())
            .await
        {
            Ok((rsp, _)) => Ok(rsp?.committed),
            Err(e) => Err(unavailable(format!("asking the tail: {e}"))),
        }
    }

    /// At the tail: the committed version of a chunk.
    pub(crate) async fn query_version(
        &self,
        req: QueryVersionReq,
    ) -> Result<QueryVersionRsp, StorageError> {
        let place = self.place_fresh(req.chain, req.chain_version).await?;
        self.readable(&place)?;
        if !place.is_tail() {
            return Err(StorageError::NotServing {
                chain: req.chain,
                target: place.target.id,
                reason: "it is not the chain's tail".into(),
            });
        }
        let key = ChunkKey::new(req.chain, req.chunk);
        let engine = self.engine(&place.target);
        let repairs_closed = place.target.repairs_closed();
        // A pending version here may be committed by a failed former tail:
        // answer only once the update in flight has finished (see read_one).
        let _settled = if engine.stat(key).and_then(|i| i.pending).is_some() {
            Some(self.settle_at_tail(&place, req.chunk).await?)
        } else {
            None
        };
        let committed = engine
            .stat(key)
            .and_then(|i| i.committed)
            .map_or(ChunkVersion(0), |m| m.version);
        // Absent only for a repair's moment: "none" would be a lie.
        if committed == ChunkVersion(0)
            && place.target.absence(req.chunk, repairs_closed) != Absence::Real
        {
            return Err(repairing(&place, req.chunk));
        }
        Ok(QueryVersionRsp { committed })
    }

    /// Waits until no update of `chunk` is in flight at this tail (takes the
    /// chunk lock), then checks that this target still serves as the tail.
    async fn settle_at_tail(
        &self,
        place: &Place,
        chunk: ChunkId,
    ) -> Result<super::locks::ChunkGuard, StorageError> {
        let guard = place.target.locks.lock(chunk).await;
        let now = self.place(place.chain.id, place.version())?;
        self.readable(&now)?;
        if !now.is_tail() {
            return Err(StorageError::NotServing {
                chain: now.chain.id,
                target: now.target.id,
                reason: "it is no longer the chain's tail".into(),
            });
        }
        Ok(guard)
    }

    pub(crate) async fn last_chunk(&self, req: LastChunkReq) -> Result<LastChunkRsp, StorageError> {
        let place = self.place_fresh(req.chain, req.chain_version).await?;
        self.readable(&place)?;
        let repairs_closed = place.target.repairs_closed();
        let last = self
            .engine(&place.target)
            .last_chunk(req.chain, req.inode)
            .as_ref()
            .and_then(meta_info);
        // A chunk of the file under repair may be missing from the answer.
        if place.target.inode_repaired(req.inode, repairs_closed) {
            return Err(StorageError::NotServing {
                chain: req.chain,
                target: place.target.id,
                reason: format!("a chunk of {:?} is being repaired", req.inode),
            });
        }
        Ok(LastChunkRsp { last })
    }

    /// A whole committed chunk for a replica repairing its rotten copy.
    /// Read without the chunk lock: the asking replica holds its own, and
    /// a write of the chunk in flight here cannot commit before it passes
    /// that replica, so the committed version cannot change meanwhile.
    pub(crate) async fn fetch_chunk(
        &self,
        req: FetchChunkReq,
    ) -> (Result<FetchChunkRsp, StorageError>, Bytes) {
        let place = match self.place_fresh(req.chain, req.chain_version).await {
            Ok(place) => place,
            Err(e) => return (Err(e), Bytes::new()),
        };
        if let Err(e) = self.readable(&place) {
            return (Err(e), Bytes::new());
        }
        let engine = self.engine(&place.target);
        let key = ChunkKey::new(req.chain, req.chunk);
        match engine.read(key, ReadRequest::whole_verified()).await {
            Ok(out) => {
                let chain_version = engine
                    .stat(key)
                    .and_then(|i| i.committed)
                    .filter(|m| m.version == out.version)
                    .map(|m| m.chain_version)
                    .unwrap_or_default();
                let rsp = FetchChunkRsp {
                    version: out.version,
                    chain_version,
                    len: out.chunk_len,
                    crc: out.chunk_crc,
                };
                (Ok(rsp), Bytes::from_owner(out.data))
            }
            Err(EngineError::NotFound { .. }) => (Ok(FetchChunkRsp::default()), Bytes::new()),
            Err(e @ (EngineError::Checksum { .. } | EngineError::ChunkCorrupt { .. })) => {
                tracing::error!(target = ?place.target.id, "{e}");
                self.repair_after_read(&place, req.chunk);
                let rsp = Err(StorageError::NotServing {
                    chain: req.chain,
                    target: place.target.id,
                    reason: e.to_string(),
                });
                (rsp, Bytes::new())
            }
            Err(e) => (Err(self.engine_failed(&place, e)), Bytes::new()),
        }
    }

    /// A page of this target's chunk metadata, for the predecessor's resync.
    pub(crate) async fn dump_meta(&self, req: DumpMetaReq) -> Result<DumpMetaRsp, StorageError> {
        let place = self.place_fresh(req.chain, req.chain_version).await?;
        self.writable(&place)?;
        let limit = req.limit.clamp(1, 65536) as usize;
        let engine = self.engine(&place.target);
        let range = match req.after {
            Some(after) => (std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded),
            None => (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded),
        };
        let mut chunks: Vec<ChunkMetaInfo> = engine
            .chunks(req.chain, range, limit + 1)
            .iter()
            .filter_map(meta_info)
            .collect();
        let more = chunks.len() > limit;
        chunks.truncate(limit);
        Ok(DumpMetaRsp { chunks, more })
    }

    pub(crate) fn space(&self) -> SpaceRsp {
        let stray = self.stray_chains();
        let disks = self
            .engines
            .iter()
            .enumerate()
            .map(|(disk, engine)| {
                let space = engine.space();
                let freeing = stray
                    .iter()
                    .filter(|(on, _)| *on as usize == disk)
                    .map(|(_, chain)| engine.chain_usage(*chain))
                    .fold((0, 0), |(chunks, bytes), usage| {
                        (chunks + usage.chunks, bytes + usage.used_bytes)
                    });
                DiskSpace {
                    disk: disk as u32,
                    data_bytes: space.data_bytes,
                    allocated_bytes: space.allocated_bytes,
                    committed_chunks: space.committed_chunks,
                    poisoned: engine.poisoned().is_some(),
                    freeing_chunks: freeing.0,
                    freeing_bytes: freeing.1,
                }
            })
            .collect();
        SpaceRsp { disks }
    }
}
