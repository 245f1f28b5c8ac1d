//! The storage service's RPC dispatch: decodes each request, runs the
//! handler, encodes the reply. Handlers never see the transport: write data
//! comes as a [`Payload`](flyfs_rpc::Payload) they fetch from, read data
//! leaves as a shared buffer.

use std::sync::Arc;

use bytes::Bytes;
use flyfs_bypass::BlockDevice;
use flyfs_proto::Method;
use flyfs_proto::frame::Status;
use flyfs_proto::wire::storage::{
    BatchRead, DumpMeta, FetchChunk, Forward, LastChunk, QueryVersion, Space, SyncDone, Write,
};
use flyfs_rpc::Network;
use flyfs_rpc::server::{Reply, Request, Service};

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
                let rsp = node.forwarded(body, req.payload).await;
                Reply::ok::<Forward>(&rsp, Bytes::new())
            }
            BatchRead::ID => {
                let body = decode!(req, BatchRead);
                if let Err(reason) = body.check_limits() {
                    tracing::warn!(peer = %req.peer, "refused storage.BatchRead: {reason}");
                    return Reply::error(Status::TooLarge, format!("storage.BatchRead: {reason}"));
                }
                let (rsp, payload) = node.batch_read(body).await;
                Reply::ok::<BatchRead>(&rsp, payload)
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
                Reply::ok::<DumpMeta>(&node.dump_meta(body).await, Bytes::new())
            }
            SyncDone::ID => {
                let body = decode!(req, SyncDone);
                Reply::ok::<SyncDone>(&node.sync_done(body).await, Bytes::new())
            }
            FetchChunk::ID => {
                let body = decode!(req, FetchChunk);
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
