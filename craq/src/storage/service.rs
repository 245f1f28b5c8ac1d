//! The storage service's RPC dispatch: decodes each request, runs the
//! handler, encodes the reply. Handlers never see the transport: write data
//! comes as a [`Payload`](flyfs_rpc::Payload) they fetch from, read data
//! leaves as a shared buffer.

use std::sync::Arc;

use bytes::Bytes;
use flyfs_bypass::BlockDevice;
use flyfs_proto::Method;
use flyfs_proto::auth::Role;
use flyfs_proto::frame::Status;
use flyfs_proto::ids::{ChainId, ChainVersion};
use flyfs_proto::wire::storage::{
    BatchRead, BatchReadReq, DumpMeta, FetchChunk, Forward, LastChunk, QueryVersion, Space,
    SyncDone, Write,
};
use flyfs_rpc::server::{Reply, Request, Service};
use flyfs_rpc::{Network, refusals};

use super::StorageNode;

/// The RPC face of a [`StorageNode`].
#[derive(Debug)]
pub struct StorageService<D: BlockDevice, N: Network> {
    node: Arc<StorageNode<D, N>>,
}

impl<D: BlockDevice, N: Network> StorageService<D, N> {
    pub fn new(node: Arc<StorageNode<D, N>>) -> Arc<Self> {
        Arc::new(StorageService { node })
    }

    /// Refuses (`Forbidden`) a chain-internal request (`Forward`,
    /// `SyncDone`, `DumpMeta`) from a storage node that does not hold the
    /// receiving target's predecessor in the chain: only that replica
    /// forwards updates to it and resyncs it, so any other storage node
    /// sending them is forging (a `Forward{Replace}` would overwrite a
    /// replica, a `SyncDone` mark a stale one up to date). The role check
    /// already kept out every other role but an admin's `DumpMeta` (an
    /// operator reading a replica's chunk list), which passes.
    ///
    /// A request this node cannot place (unknown chain, another chain
    /// version) passes to its handler, which refuses it with the chain's
    /// error without touching anything: predecessors are only defined
    /// within one chain version, and the sender's and ours are then equal.
    #[allow(clippy::result_large_err)] // The error is the reply to send.
    async fn check_from_predecessor(
        &self,
        req: &Request,
        method: &'static str,
        chain: ChainId,
        version: ChainVersion,
    ) -> Result<(), Reply> {
        if req.peer.identity.role() == Role::Admin {
            return Ok(());
        }
        let Ok(place) = self.node.place_fresh(chain, version).await else {
            return Ok(());
        };
        let predecessor = place
            .index
            .checked_sub(1)
            .and_then(|before| place.chain.targets.get(before))
            .and_then(|target| place.routing.target(target.target))
            .map(|target| target.node);
        let caller = req.peer.identity.storage_node();
        if caller.is_some() && caller == predecessor {
            return Ok(());
        }
        let message = match predecessor {
            Some(node) => format!(
                "{method}: {:?} of {chain:?} (version {}) takes it only from node {}, \
                 which holds its predecessor; the caller is {}",
                place.target.id, version.0, node.0, req.peer.identity
            ),
            None => format!(
                "{method}: {:?} is the head of {chain:?} (version {}) and has no predecessor; \
                 the caller is {}",
                place.target.id, version.0, req.peer.identity
            ),
        };
        refusals::global().log("not the predecessor", &req.peer, &message);
        Err(Reply::error(Status::Forbidden, message))
    }

    /// Refuses (`Forbidden`) a `FetchChunk` from a node that holds no other
    /// target of the chain: a replica repairing a rotten chunk fetches it
    /// from its chain's other members, and nobody else may read a chain's
    /// data whole through the storage role. Unplaceable requests pass to the
    /// handler, as in [`Self::check_from_predecessor`].
    #[allow(clippy::result_large_err)] // The error is the reply to send.
    async fn check_from_chain_member(
        &self,
        req: &Request,
        method: &'static str,
        chain: ChainId,
        version: ChainVersion,
    ) -> Result<(), Reply> {
        let Ok(place) = self.node.place_fresh(chain, version).await else {
            return Ok(());
        };
        let caller = req.peer.identity.storage_node();
        let member = place.chain.targets.iter().enumerate().any(|(at, target)| {
            at != place.index
                && place
                    .routing
                    .target(target.target)
                    .is_some_and(|t| Some(t.node) == caller)
        });
        if member {
            return Ok(());
        }
        let message = format!(
            "{method}: {chain:?} (version {}) has no other target on the caller's node; \
             the caller is {}",
            version.0, req.peer.identity
        );
        refusals::global().log("not a chain member", &req.peer, &message);
        Err(Reply::error(Status::Forbidden, message))
    }
}

macro_rules! decode {
    ($req:expr, $m:ty) => {
        match $req.decode::<$m>() {
            Ok(r) => r,
            Err(reply) => return reply,
        }
    };
}

impl<D: BlockDevice, N: Network> Service for StorageService<D, N> {
    /// Reads return bulk bytes: a batch reserves what it asks for (up to its
    /// byte limit; a batch over it is refused without reading), a whole-chunk
    /// fetch the largest chunk a batch may carry, so replies a peer does not
    /// read stop its connection rather than pile up in memory.
    fn reply_bytes_max(&self, method: u16, body: &[u8]) -> u64 {
        match method {
            // A batch over its limits is refused without reading: nothing
            // to reserve (and nothing to wait for).
            BatchRead::ID => flyfs_proto::codec::decode::<<BatchRead as Method>::Req>(body)
                .ok()
                .filter(|batch| batch.check_limits().is_ok())
                .map_or(0, |batch| batch.bytes_requested()),
            FetchChunk::ID => BatchReadReq::BYTES_MAX,
            _ => 0,
        }
    }

    async fn call(&self, req: Request) -> Reply {
        let node = &self.node;
        match req.method {
            Write::ID => {
                let body = decode!(req, Write);
                let rsp = node.client_write(body, req.payload).await;
                Reply::ok::<Write>(&rsp, Bytes::new())
            }
            Forward::ID => {
                let body = decode!(req, Forward);
                if let Err(reply) = self
                    .check_from_predecessor(&req, Forward::NAME, body.chain, body.chain_version)
                    .await
                {
                    return reply;
                }
                let rsp = node.forwarded(body, req.payload).await;
                Reply::ok::<Forward>(&rsp, Bytes::new())
            }
            BatchRead::ID => {
                let body = decode!(req, BatchRead);
                if let Err(reason) = body.check_limits() {
                    let message = format!("storage.BatchRead: {reason}");
                    refusals::global().log("BatchRead limits", &req.peer, &message);
                    return Reply::error(Status::TooLarge, message);
                }
                let (rsp, parts) = node.batch_read(body).await;
                Reply::ok_parts::<BatchRead>(&rsp, parts)
            }
            QueryVersion::ID => {
                let body = decode!(req, QueryVersion);
                Reply::ok::<QueryVersion>(&node.query_version(body).await, Bytes::new())
            }
            LastChunk::ID => {
                let body = decode!(req, LastChunk);
                Reply::ok::<LastChunk>(&node.last_chunk(body).await, Bytes::new())
            }
            DumpMeta::ID => {
                let body = decode!(req, DumpMeta);
                if let Err(reply) = self
                    .check_from_predecessor(&req, DumpMeta::NAME, body.chain, body.chain_version)
                    .await
                {
                    return reply;
                }
                Reply::ok::<DumpMeta>(&node.dump_meta(body).await, Bytes::new())
            }
            SyncDone::ID => {
                let body = decode!(req, SyncDone);
                if let Err(reply) = self
                    .check_from_predecessor(&req, SyncDone::NAME, body.chain, body.chain_version)
                    .await
                {
                    return reply;
                }
                Reply::ok::<SyncDone>(&node.sync_done(body).await, Bytes::new())
            }
            FetchChunk::ID => {
                let body = decode!(req, FetchChunk);
                if let Err(reply) = self
                    .check_from_chain_member(&req, FetchChunk::NAME, body.chain, body.chain_version)
                    .await
                {
                    return reply;
                }
                let (rsp, payload) = node.fetch_chunk(body).await;
                Reply::ok::<FetchChunk>(&rsp, payload)
            }
            Space::ID => {
                let _ = decode!(req, Space);
                Reply::ok::<Space>(&node.space(), Bytes::new())
            }
            other => Reply::unknown_method(other),
        }
    }
}
