//! The storage client: what the file client (and benchmarks, and tests) use
//! to write and read chunks.
//!
//! It resolves a chain to its targets from the manager's routing information,
//! sends writes to the head and reads to a serving replica chosen to spread
//! load, and on a stale chain version, an unreachable node or a replica that
//! cannot serve, refreshes the routing and retries (reads fail over to
//! another replica first). Writes go through exactly-once channels: a retry
//! carries the same channel sequence number, so the head applies it at most
//! once. Many chunk operations may be in flight at once; each borrows its own
//! channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flyfs_proto::ids::{ChainId, ChunkId, ClientId, InodeId, NodeId, RoutingVersion};
use flyfs_proto::wire::mgmt::{ChainInfo, PublicState, RoutingInfo};
use flyfs_proto::wire::storage::{
    BatchRead, BatchReadReq, BatchReadRsp, Channel, ChunkMetaInfo, ChunkStamp, LastChunk,
    LastChunkReq, ReadItem, ReadResult, Space, SpaceReq, SpaceRsp, StorageError, Write, WriteOp,
    WriteReq, WriteRsp,
};
use flyfs_rpc::{CallOptions, Client, Credentials, Network, RpcError};
use flyfs_time::{Attempt, Backoff, Retry};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a storage client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The storage service refused, for a reason retrying cannot fix.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Retries ran out; the last failure is given.
    #[error("{what} gave up after {attempts} attempts in {elapsed:?}: {last}")]
    GaveUp {
        what: String,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error("{chain} is not in the routing information")]
    UnknownChain { chain: ChainId },
    /// No cluster manager answered as primary.
    #[error(transparent)]
    Manager(#[from] crate::mgmt::ManagerError),
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The cluster managers (the primary and its standbys), in the order
    /// they are tried; the one that answers as primary is kept.
    pub mgmt_addrs: Vec<String>,
    pub client: ClientId,
    /// One attempt of one RPC.
    pub rpc_timeout: Duration,
    /// How long an operation keeps retrying (failover, routing refresh)
    /// before it fails.
    pub op_deadline: Duration,
    pub backoff: Backoff,
    /// Chunk updates (writes, truncates, removes) in flight at once; more
    /// wait for one to finish. Each holds an exactly-once channel at every
    /// replica of its chain until the client goes idle for an hour, and a
    /// storage target refuses a client more than its
    /// `channels_per_client_max` (4096) channels, so this stays below that.
    pub updates_in_flight_max: usize,
}

/// [`ClientConfig::updates_in_flight_max`] by default.
pub const UPDATES_IN_FLIGHT_MAX: usize = 1024;

impl ClientConfig {
    /// A client of the managers at `mgmt_addrs` (the primary and its
    /// standbys, in the order they are tried).
    pub fn new<A: Into<String>>(mgmt_addrs: impl IntoIterator<Item = A>, client: ClientId) -> Self {
        ClientConfig {
            mgmt_addrs: mgmt_addrs.into_iter().map(Into::into).collect(),
            client,
            rpc_timeout: Duration::from_secs(5),
            op_deadline: Duration::from_secs(60),
            backoff: Backoff::new(Duration::from_millis(20), Duration::from_secs(1)),
            updates_in_flight_max: UPDATES_IN_FLIGHT_MAX,
        }
    }
}

/// One range of one chunk to read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadSpec {
    pub chain: ChainId,
    pub chunk: ChunkId,
    pub offset: u32,
    pub len: u32,
    /// The caller holds the range's bytes of this version: a replica that
    /// still has it committed answers `unchanged` with no bytes.
    pub if_changed_from: Option<ChunkStamp>,
}

/// Data of one chunk as read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkData {
    pub data: Bytes,
    pub result: ReadResult,
}

/// How one range of [`StorageClient::read_batch_into`] was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadInto {
    /// Its `len` bytes are at the start of its buffer: they were read from
    /// the connection straight into it.
    Landed(ReadResult),
    /// It came another way (a retry, a reply written into a lent RDMA
    /// buffer): the caller copies it if it wants it in its buffer.
    Data(ChunkData),
}

/// The buffers of one batched read's ranges, in its items' order, as the
/// reply's payload lands in them: each range's bytes at the start of its
/// buffer, as long as the reply says it is (a chunk shorter than asked for
/// gives fewer bytes).
struct BatchLanding<B> {
    buffers: Vec<(usize, B)>,
    /// The bytes each item asks for, in the same order.
    lens: Vec<usize>,
    /// Unset: the payload is received the usual way (`read_batch`).
    land: bool,
}

impl<B: AsMut<[u8]> + Send + 'static> flyfs_rpc::Landing for BatchLanding<B> {
    fn segments(&mut self, body: &[u8], payload_len: usize) -> Option<Vec<&mut [u8]>> {
        if !self.land {
            return None;
        }
        let rsp = flyfs_proto::codec::decode::<BatchReadRsp>(body).ok()?;
        if rsp.results.len() != self.buffers.len() {
            return None;
        }
        let mut segments = Vec::with_capacity(self.buffers.len());
        let mut total = 0usize;
        for ((_, buffer), result) in self.buffers.iter_mut().zip(&rsp.results) {
            let Ok(result) = result else { continue };
            let buffer = buffer.as_mut();
            let len = result.len as usize;
            if len > buffer.len() {
                return None;
            }
            total += len;
            segments.push(&mut buffer[..len]);
        }
        (total == payload_len).then_some(segments)
    }

    /// Each item's buffer, as long as the item asks: over RDMA, when the
    /// buffers are registered (an application's iov), the replica writes
    /// each item's bytes straight into its buffer.
    fn part_buffers(&mut self) -> Option<Vec<&mut [u8]>> {
        if !self.land {
            return None;
        }
        self.buffers
            .iter_mut()
            .zip(&self.lens)
            .map(|((_, buffer), &len)| buffer.as_mut().get_mut(..len))
            .collect()
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// A storage client. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct StorageClient<N: Network> {
    config: ClientConfig,
    rpc: Client<N>,
    managers: crate::mgmt::Managers,
    routing: Mutex<Arc<RoutingInfo>>,
    /// Free channels as (id, next sequence number).
    channels: Mutex<Vec<(u32, u64)>>,
    channels_made: AtomicU64,
    /// One per channel lent out: at most `updates_in_flight_max`, so no
    /// more channels are ever made.
    channel_permits: Arc<Semaphore>,
    /// Spreads reads over replicas.
    next_replica: AtomicU64,
    /// Operations begun: with the client id, seeds each one's backoff.
    operations: AtomicU64,
}

/// A borrowed channel; returned to the pool with its next sequence number.
struct ChannelLease<'a, N: Network> {
    client: &'a StorageClient<N>,
    id: u32,
    seq: u64,
    /// Given back after the channel (fields drop after `drop`).
    _permit: OwnedSemaphorePermit,
}

impl<N: Network> Drop for ChannelLease<'_, N> {
    fn drop(&mut self) {
        self.client.channels.lock().push((self.id, self.seq + 1));
    }
}

impl<N: Network> StorageClient<N> {
    /// A client that authenticates with `credentials` (a mount's, the
    /// metadata service's, an admin's).
    pub fn new(config: ClientConfig, net: N, credentials: Credentials) -> Arc<Self> {
        StorageClient::with_transport(config, net, credentials, None)
    }

    /// As [`StorageClient::new`], over RDMA when `rdma` is set (flyfs-rpc's
    /// rdma module): every connection, to the manager and to the storage
    /// nodes, is authenticated over TLS and then moves to a queue pair.
    pub fn with_transport(
        config: ClientConfig,
        net: N,
        credentials: Credentials,
        rdma: Option<flyfs_rpc::RdmaTransport>,
    ) -> Arc<Self> {
        let channel_permits = Arc::new(Semaphore::new(config.updates_in_flight_max.max(1)));
        Arc::new(StorageClient {
            managers: crate::mgmt::Managers::new(config.mgmt_addrs.iter().cloned()),
            config,
            rpc: Client::with_transport(net, Default::default(), credentials, rdma),
            routing: Mutex::new(Arc::new(RoutingInfo::default())),
            channels: Mutex::new(Vec::new()),
            channels_made: AtomicU64::new(0),
            channel_permits,
            next_replica: AtomicU64::new(0),
            operations: AtomicU64::new(0),
        })
    }

    pub fn routing(&self) -> Arc<RoutingInfo> {
        self.routing.lock().clone()
    }

    pub fn rpc(&self) -> &Client<N> {
        &self.rpc
    }

    /// Registers `owner`'s memory for one-sided transfers until the
    /// returned guard drops, when this client is on the RDMA transport
    /// (`None` on TCP): reads into buffers inside it are then written there
    /// by the replicas ([`read_batch_into`](Self::read_batch_into)), writes
    /// from it pulled by the head.
    pub fn register_arena(
        &self,
        owner: Arc<dyn flyfs_rpc::rdma::Arena>,
    ) -> Option<Result<flyfs_rpc::rdma::ArenaRegistration, flyfs_rpc::rdma::RdmaError>> {
        self.rpc.rdma().map(|rdma| rdma.register_arena(owner))
    }

    fn options(&self) -> CallOptions {
        CallOptions {
            timeout: self.config.rpc_timeout,
            ..CallOptions::default()
        }
    }

    /// Pulls the routing information from the manager.
    pub async fn refresh_routing(&self) -> Result<Arc<RoutingInfo>, ClientError> {
        let current = self.routing();
        // Nothing learnt yet: ask for the routing whatever its version.
        let known = if current.chains.is_empty() {
            RoutingVersion(0)
        } else {
            current.version
        };
        let routing =
            crate::mgmt::fetch_routing(&self.rpc, &self.managers, known, &self.options()).await?;
        if let Some(routing) = routing {
            let mut current = self.routing.lock();
            if routing.version >= current.version {
                *current = Arc::new(routing);
            }
        }
        Ok(self.routing())
    }

    fn chain(&self, chain: ChainId) -> Option<(ChainInfo, Arc<RoutingInfo>)> {
        let routing = self.routing();
        routing.chain(chain).cloned().map(|c| (c, routing))
    }

    fn addr(routing: &RoutingInfo, target: flyfs_proto::ids::TargetId) -> Option<String> {
        let node: NodeId = routing.target(target)?.node;
        routing.node(node).map(|n| n.addr.clone())
    }

    /// A free channel, or a new one while fewer than
    /// `updates_in_flight_max` exist; else waits for one.
    async fn lease_channel(&self) -> ChannelLease<'_, N> {
        let permit = self
            .channel_permits
            .clone()
            .acquire_owned()
            .await
            .expect("the channel semaphore is never closed");
        let (id, seq) = self.channels.lock().pop().unwrap_or_else(|| {
            let id = self.channels_made.fetch_add(1, Ordering::Relaxed) as u32 + 1;
            (id, 1)
        });
        ChannelLease {
            client: self,
            id,
            seq,
            _permit: permit,
        }
    }

    /// Writes `data` at `offset` of a chunk; returns the committed version.
    pub async fn write(
        &self,
        chain: ChainId,
        chunk: ChunkId,
        offset: u32,
        data: Bytes,
        chunk_size: u32,
    ) -> Result<WriteRsp, ClientError> {
        let crc = crc32c::crc32c(&data);
        self.update(
            chain,
            chunk,
            WriteOp::Write { offset, crc },
            data,
            chunk_size,
        )
        .await
    }

    pub async fn truncate(
        &self,
        chain: ChainId,
        chunk: ChunkId,
        len: u32,
        chunk_size: u32,
    ) -> Result<WriteRsp, ClientError> {
        self.update(
            chain,
            chunk,
            WriteOp::Truncate { len },
            Bytes::new(),
            chunk_size,
        )
        .await
    }

    pub async fn remove(
        &self,
        chain: ChainId,
        chunk: ChunkId,
        chunk_size: u32,
    ) -> Result<WriteRsp, ClientError> {
        self.update(chain, chunk, WriteOp::Remove, Bytes::new(), chunk_size)
            .await
    }

    async fn update(
        &self,
        chain: ChainId,
        chunk: ChunkId,
        op: WriteOp,
        data: Bytes,
        chunk_size: u32,
    ) -> Result<WriteRsp, ClientError> {
        let lease = self.lease_channel().await;
        let channel = Channel {
            client: self.config.client,
            id: lease.id,
            seq: lease.seq,
        };
        let what = format!("write of {chunk:?} on {chain}");
        let result = self
            .retrying(&what, chain, |info, routing, _attempt| {
                let data = data.clone();
                async move {
                    let head = info
                        .targets
                        .first()
                        .filter(|t| t.state == PublicState::Serving);
                    let Some(addr) = head.and_then(|h| Self::addr(&routing, h.target)) else {
                        return Err(Failure::Retry(format!("{chain} has no serving head")));
                    };
                    let req = WriteReq {
                        chain,
                        chain_version: info.version,
                        chunk,
                        op,
                        chunk_size,
                        channel,
                    };
                    classify(
                        self.rpc
                            .call::<Write>(&addr, &req, data, &self.options())
                            .await,
                    )
                }
            })
            .await;
        // A write that gave up may still be applied later by the head; its
        // channel must not reuse that sequence number for different data.
        drop(lease);
        result
    }

    /// Reads `len` bytes at `offset` of a chunk from a serving replica.
    pub async fn read(
        &self,
        chain: ChainId,
        chunk: ChunkId,
        offset: u32,
        len: u32,
    ) -> Result<ChunkData, ClientError> {
        self.read_spec(ReadSpec {
            chain,
            chunk,
            offset,
            len,
            if_changed_from: None,
        })
        .await
    }

    /// [`read`](Self::read) of one [`ReadSpec`], failing over from replica
    /// to replica.
    pub async fn read_spec(&self, spec: ReadSpec) -> Result<ChunkData, ClientError> {
        let ReadSpec {
            chain,
            chunk,
            offset,
            len,
            if_changed_from,
        } = spec;
        let what = format!("read of {chunk:?} on {chain}");
        self.retrying(&what, chain, |info, routing, attempt| async move {
            let serving: Vec<_> = info
                .targets
                .iter()
                .filter(|t| t.state == PublicState::Serving)
                .collect();
            if serving.is_empty() {
                return Err(Failure::Retry(format!("{chain} has no serving replica")));
            }
            // Spread reads; each retry moves to the next replica (failover).
            let pick = (self.next_replica.fetch_add(1, Ordering::Relaxed) as usize
                + attempt as usize)
                % serving.len();
            let Some(addr) = Self::addr(&routing, serving[pick].target) else {
                return Err(Failure::Retry(format!(
                    "no address for {:?}",
                    serving[pick].target
                )));
            };
            let req = BatchReadReq {
                items: vec![ReadItem {
                    chain,
                    chain_version: info.version,
                    chunk,
                    offset,
                    len,
                    verify: false,
                    if_changed_from,
                }],
            };
            // Over RDMA the replica writes the bytes straight into a
            // buffer lent for them (when the transport lends any).
            let (rsp, payload) = self
                .rpc
                .call_reading::<BatchRead>(&addr, &req, Bytes::new(), len as usize, &self.options())
                .await
                .map_err(Failure::rpc)?;
            let result = rsp
                .results
                .into_iter()
                .next()
                .ok_or_else(|| Failure::Retry("empty batch read reply".into()))?
                .map_err(Failure::from)?;
            let data = payload.into_bytes().unwrap_or_default();
            if data.len() != result.len as usize {
                return Err(Failure::Retry(format!(
                    "reply carries {} bytes, says {}",
                    data.len(),
                    result.len
                )));
            }
            Ok(ChunkData { data, result })
        })
        .await
    }

    /// Reads many chunk ranges at once: the ranges are spread over serving
    /// replicas and each replica gets one batched RPC, all in flight
    /// together. A range whose replica fails is retried alone through
    /// [`read`](Self::read), with its failover. Results come in input order.
    pub async fn read_batch(&self, items: &[ReadSpec]) -> Vec<Result<ChunkData, ClientError>> {
        // The same loop as `read_batch_into`, with buffers that take no
        // bytes: every payload arrives in the transport's own buffers.
        let unlanded = items.iter().map(|_| Vec::new()).collect();
        let (_, results) = self.read_batch_landing(items, unlanded, false).await;
        results
            .into_iter()
            .map(|result| {
                result.map(|read| match read {
                    ReadInto::Data(chunk) => chunk,
                    // Not with `land` unset: the landing declines every
                    // payload.
                    ReadInto::Landed(result) => ChunkData {
                        data: Bytes::new(),
                        result,
                    },
                })
            })
            .collect()
    }

    /// [`read_batch`](Self::read_batch) into the caller's memory: range
    /// `i`'s bytes are read from the connection straight into the start of
    /// `buffers[i]` (which must hold `items[i].len` bytes), with no copy
    /// ([`ReadInto::Landed`]); a range that fails over, or whose reply came
    /// another way, comes as [`ReadInto::Data`]. The buffers come back in
    /// their order, and nothing writes into them once this returns.
    pub async fn read_batch_into<B>(
        &self,
        items: &[ReadSpec],
        buffers: Vec<B>,
    ) -> (Vec<B>, Vec<Result<ReadInto, ClientError>>)
    where
        B: AsMut<[u8]> + Send + 'static,
    {
        self.read_batch_landing(items, buffers, true).await
    }

    /// The loop of both batched reads: group the ranges by replica, send
    /// each group as batched RPCs all in flight together, landing the
    /// payload in `buffers` when `land` is set, and retry every range left
    /// without a result alone, with its failover.
    async fn read_batch_landing<B>(
        &self,
        items: &[ReadSpec],
        buffers: Vec<B>,
        land: bool,
    ) -> (Vec<B>, Vec<Result<ReadInto, ClientError>>)
    where
        B: AsMut<[u8]> + Send + 'static,
    {
        assert_eq!(items.len(), buffers.len(), "one buffer per range");
        let mut buffers: Vec<Option<B>> = buffers.into_iter().map(Some).collect();
        let mut results: Vec<Option<Result<ReadInto, ClientError>>> =
            items.iter().map(|_| None).collect();
        let routing = if items
            .iter()
            .any(|i| self.routing().chain(i.chain).is_none())
        {
            self.refresh_routing()
                .await
                .unwrap_or_else(|_| self.routing())
        } else {
            self.routing()
        };
        // Replica address -> the reads it serves, with their item indices.
        let mut by_replica: std::collections::BTreeMap<String, Vec<(usize, ReadItem)>> =
            std::collections::BTreeMap::new();
        for (index, item) in items.iter().enumerate() {
            if let Some((addr, read)) = self.pick_replica(&routing, item) {
                by_replica.entry(addr).or_default().push((index, read));
            }
        }
        // One RPC per batch, each within the limits a replica accepts.
        let calls: Vec<_> = by_replica
            .into_iter()
            .flat_map(|(addr, reads)| {
                BatchReadReq::pack(reads)
                    .into_iter()
                    .map(move |batch| (addr.clone(), batch))
            })
            .map(|(addr, (indices, req))| {
                let landing = BatchLanding {
                    buffers: indices
                        .iter()
                        .map(|&i| (i, buffers[i].take().expect("each range is in one batch")))
                        .collect(),
                    lens: req.items.iter().map(|item| item.len as usize).collect(),
                    land,
                };
                (addr, indices, req, landing)
            })
            .collect();
        let calls = calls
            .into_iter()
            .map(|(addr, indices, req, landing)| async move {
                let reply_bytes = usize::try_from(req.bytes_requested()).unwrap_or(usize::MAX);
                let (landing, reply) = self
                    .rpc
                    .call_landing::<BatchRead, _>(
                        &addr,
                        &req,
                        Bytes::new(),
                        landing,
                        reply_bytes,
                        &self.options(),
                    )
                    .await;
                (indices, landing, reply)
            });
        for (indices, landing, reply) in futures::future::join_all(calls).await {
            for (index, buffer) in landing.buffers {
                buffers[index] = Some(buffer);
            }
            let Ok((rsp, landed)) = reply else { continue };
            match landed {
                flyfs_rpc::Landed::InPlace(_) => {
                    for (index, result) in indices.into_iter().zip(rsp.results) {
                        if let Ok(result) = result {
                            results[index] = Some(Ok(ReadInto::Landed(result)));
                        }
                    }
                }
                flyfs_rpc::Landed::Payload(payload) => {
                    let data = payload.into_bytes().unwrap_or_default();
                    let mut at = 0usize;
                    for (index, result) in indices.into_iter().zip(rsp.results) {
                        let Ok(result) = result else { continue };
                        let end = at + result.len as usize;
                        if end > data.len() {
                            break;
                        }
                        results[index] = Some(Ok(ReadInto::Data(ChunkData {
                            data: data.slice(at..end),
                            result,
                        })));
                        at = end;
                    }
                }
            }
        }
        let retries = results
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_none())
            .map(|(i, _)| {
                let item = items[i];
                async move {
                    let read = self.read_spec(item).await;
                    (i, read.map(ReadInto::Data))
                }
            });
        for (i, result) in futures::future::join_all(retries.collect::<Vec<_>>()).await {
            results[i] = Some(result);
        }
        let buffers = buffers
            .into_iter()
            .map(|b| b.expect("every buffer came back"))
            .collect();
        let results = results
            .into_iter()
            .map(|r| r.expect("every item was read or retried"))
            .collect();
        (buffers, results)
    }

    /// The replica that serves `item` (spreading reads over the serving
    /// ones) and the item as it asks that replica; `None` when the routing
    /// knows no serving replica (the read then goes through its retries).
    fn pick_replica(&self, routing: &RoutingInfo, item: &ReadSpec) -> Option<(String, ReadItem)> {
        let chain = routing.chain(item.chain)?;
        let serving: Vec<_> = chain
            .targets
            .iter()
            .filter(|t| t.state == PublicState::Serving)
            .collect();
        if serving.is_empty() {
            return None;
        }
        let pick = self.next_replica.fetch_add(1, Ordering::Relaxed) as usize % serving.len();
        let addr = Self::addr(routing, serving[pick].target)?;
        Some((
            addr,
            ReadItem {
                chain: item.chain,
                chain_version: chain.version,
                chunk: item.chunk,
                offset: item.offset,
                len: item.len,
                verify: false,
                if_changed_from: item.if_changed_from,
            },
        ))
    }

    /// Where a file ends on one chain (its highest chunk there).
    pub async fn last_chunk(
        &self,
        chain: ChainId,
        inode: InodeId,
    ) -> Result<Option<ChunkMetaInfo>, ClientError> {
        let what = format!("last chunk of {inode:?} on {chain}");
        self.retrying(&what, chain, |info, routing, _| async move {
            // The tail's view is the committed one.
            let tail = info
                .targets
                .iter()
                .rev()
                .find(|t| t.state == PublicState::Serving);
            let Some(addr) = tail.and_then(|t| Self::addr(&routing, t.target)) else {
                return Err(Failure::Retry(format!("{chain} has no serving tail")));
            };
            let req = LastChunkReq {
                chain,
                chain_version: info.version,
                inode,
            };
            classify(
                self.rpc
                    .call::<LastChunk>(&addr, &req, Bytes::new(), &self.options())
                    .await,
            )
            .map(|r| r.last)
        })
        .await
    }

    /// Space of every device of a node.
    pub async fn space(&self, addr: &str) -> Result<SpaceRsp, ClientError> {
        let (rsp, _) = self
            .rpc
            .call::<Space>(addr, &SpaceReq {}, Bytes::new(), &self.options())
            .await
            .map_err(|e| ClientError::GaveUp {
                what: format!("space of {addr}"),
                attempts: 1,
                elapsed: Duration::ZERO,
                last: e.to_string(),
            })?;
        Ok(rsp)
    }

    /// After a call to `addr` timed out: the call failed alone, and the
    /// calls beside it on the same connections go on (one slow request says
    /// nothing of them: tearing them down would only make them retry too).
    /// The connections are pinged in the background and only those that do
    /// not answer within the RPC timeout are closed, so a dead node's stop
    /// taking calls without holding up this operation's failover.
    fn check_connections(&self, addr: String) {
        let rpc = self.rpc.clone();
        let timeout = self.config.rpc_timeout;
        tokio::spawn(async move { rpc.close_unresponsive(&addr, timeout).await });
    }

    /// Runs `attempt` until it succeeds, fails for good, or the deadline
    /// passes, refreshing the routing between attempts. `attempt` gets the
    /// chain as the routing has it and how many attempts failed before it
    /// (reads use that to fail over to another replica).
    async fn retrying<T, F, Fut>(
        &self,
        what: &str,
        chain: ChainId,
        attempt: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(ChainInfo, Arc<RoutingInfo>, u32) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        // Per client and operation: clients that failed together retry
        // apart, and a simulation replays the waits.
        let operation = self.operations.fetch_add(1, Ordering::Relaxed);
        let seed = self.config.client.0.rotate_left(32) ^ operation;
        let attempt = &attempt;
        // Fail over to another replica at once; back off after that.
        let answer = Retry::deadline(self.config.op_deadline, self.config.backoff)
            .immediate_retries(1)
            .run(seed, |number| async move {
                if number > 1 {
                    let _ = self.refresh_routing().await;
                }
                if self.chain(chain).is_none() {
                    let _ = self.refresh_routing().await;
                }
                let last = match self.chain(chain) {
                    None => format!("{chain} is not in the routing information"),
                    Some((info, routing)) => match attempt(info, routing, number - 1).await {
                        Ok(v) => return Attempt::Done(Ok(v)),
                        Err(Failure::Fatal(e)) => {
                            return Attempt::Done(Err(ClientError::Storage(e)));
                        }
                        Err(Failure::Retry(reason)) => reason,
                        Err(Failure::Timeout { addr, error }) => {
                            self.check_connections(addr);
                            error
                        }
                    },
                };
                tracing::debug!("{what}: attempt {number} failed: {last}");
                Attempt::Retry(last)
            })
            .await;
        answer.unwrap_or_else(|gave_up| {
            Err(ClientError::GaveUp {
                what: what.to_string(),
                attempts: gave_up.attempts,
                elapsed: gave_up.elapsed,
                last: gave_up.last,
            })
        })
    }
}

/// How one attempt failed.
enum Failure {
    Retry(String),
    /// The RPC to `addr` timed out: its connection may be dead, or the
    /// request merely slow.
    Timeout {
        addr: String,
        error: String,
    },
    Fatal(StorageError),
}

impl Failure {
    fn rpc(e: RpcError) -> Failure {
        match e {
            RpcError::Timeout { ref addr, .. } => Failure::Timeout {
                addr: addr.clone(),
                error: e.to_string(),
            },
            e => Failure::Retry(e.to_string()),
        }
    }
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        if e.is_retryable() {
            Failure::Retry(e.to_string())
        } else {
            Failure::Fatal(e)
        }
    }
}

fn classify<T>(
    result: Result<(Result<T, StorageError>, flyfs_rpc::Payload), RpcError>,
) -> Result<T, Failure> {
    match result {
        Ok((Ok(v), _)) => Ok(v),
        Ok((Err(e), _)) => Err(e.into()),
        Err(e) => Err(Failure::rpc(e)),
    }
}
