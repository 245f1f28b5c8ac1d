//! The client side: pooled, multiplexed connections per peer; typed calls
//! with per-attempt deadlines and opt-in retries.
//!
//! Every connection is mutual TLS with the client's [`Credentials`]: the
//! handshake runs within `connect_timeout`, and the server must present a
//! certificate of our cluster's CA naming a daemon (a client's or an
//! admin's certificate cannot serve). A server that refuses our certificate
//! (TLS 1.3 tells the client only after its side of the handshake is done)
//! fails the calls on that connection with [`RpcError::Refused`], which is
//! not retried.
//!
//! Per address the client keeps `connections_per_peer` connection slots,
//! connected lazily and used round robin. Each connection carries many calls
//! at once: a writer task writes request frames from a channel, a reader task
//! hands each reply to the call waiting for its request id. When a connection
//! breaks, every call pending on it fails with `Disconnected` and the slot
//! reconnects on its next use.
//!
//! A call that times out fails alone: its silence says nothing of the other
//! calls on its connection (one slow request, a busy replica). A caller that
//! suspects the peer ([`Client::close_unresponsive`]) pings each connection
//! to it on that very connection and closes only those that do not answer,
//! as a messenger's keepalive would, so a dead peer's connections stop
//! taking calls while a live one's calls go on.
//!
//! Cancellation: dropping a call's future cancels the call. Its pending entry
//! is removed at once (a guard's `Drop`), so a reply that arrives later is
//! discarded. The request may still run on the server; whether that is safe
//! is the caller's business, as it is for retries.
//!
//! Determinism: request ids come from a per-client counter, retries are
//! flyfs-time's [`Retry`] with its jitter seeded by the call's first request
//! id, pending calls are kept in a `BTreeMap` (they are failed in id order),
//! and every wait is a tokio timer, so a turmoil simulation replays exactly.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use flyfs_time::{Attempt, Backoff, Retry};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::error::{MethodRef, RpcError};
use flyfs_proto::codec;
use flyfs_proto::frame::{self, Frame, FrameError, FrameLimits, Kind, OutFrame, Status};
use flyfs_proto::{Method, Ping, PingReq};

use crate::frame_io::{self, ReadError};
use crate::landing::{Landed, Landing, Lease, LentAs};
use crate::net::Network;
use crate::payload::Payload;
use crate::rdma::RdmaTransport;
use crate::tls::{self, Credentials};

/// Per-client settings.
#[derive(Clone, Copy, Debug)]
pub struct ClientConfig {
    /// Connections kept to each address; calls spread over them round robin.
    pub connections_per_peer: usize,
    /// Deadline of a new connection, TLS handshake included.
    pub connect_timeout: Duration,
    /// Limits on reply frames.
    pub limits: FrameLimits,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connections_per_peer: 2,
            connect_timeout: Duration::from_secs(3),
            limits: FrameLimits::default(),
        }
    }
}

/// When and how often to try a call again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all; 1 means no retry.
    pub attempts: u32,
    /// The wait before each retry; its jitter is seeded with the call's
    /// first request id.
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 1,
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_secs(1)),
        }
    }
}

/// Per-call options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallOptions {
    /// Deadline of each attempt (connecting included).
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }
}

/// A successful reply before decoding.
#[derive(Clone, Debug)]
pub struct RawReply {
    pub body: Bytes,
    pub payload: Payload,
}

/// An RPC client. Cheap to clone: clones share connections.
#[derive(Debug)]
pub struct Client<N: Network> {
    inner: Arc<Inner<N>>,
}

impl<N: Network> Clone for Client<N> {
    fn clone(&self) -> Self {
        Client {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner<N> {
    net: N,
    config: ClientConfig,
    credentials: Credentials,
    /// Set: every connection moves to RDMA once authenticated.
    rdma: Option<RdmaTransport>,
    peers: Mutex<BTreeMap<String, Arc<Peer>>>,
    /// Request ids start at 1: 0 means "the connection" in server frames.
    request_id_next: AtomicU64,
}

/// The connection slots of one address.
#[derive(Debug)]
struct Peer {
    /// An async mutex per slot: calls that find a slot empty wait for the one
    /// call that is connecting it, instead of each opening a connection.
    slots: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
    slot_next: AtomicUsize,
    /// Set while [`Client::close_unresponsive`] checks these connections:
    /// many calls timing out together start one check, not one each.
    checking: AtomicBool,
}

/// Clears a flag when dropped (a check that ends or is cancelled).
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl<N: Network> Client<N> {
    /// A client that proves itself with `credentials` on every connection.
    /// There is no client without credentials.
    pub fn new(net: N, config: ClientConfig, credentials: Credentials) -> Client<N> {
        Client::with_transport(net, config, credentials, None)
    }

    /// A client on the RDMA transport when `rdma` is set: each connection is
    /// made and authenticated as over TCP, then moves its frames to an RDMA
    /// connection (crate::rdma).
    pub fn with_transport(
        net: N,
        config: ClientConfig,
        credentials: Credentials,
        rdma: Option<RdmaTransport>,
    ) -> Client<N> {
        Client {
            inner: Arc::new(Inner {
                net,
                config,
                credentials,
                rdma,
                peers: Mutex::new(BTreeMap::new()),
                request_id_next: AtomicU64::new(1),
            }),
        }
    }

    /// A typed call: encodes `request`, sends it with `payload`, retries as
    /// `options.retry` allows, decodes the response. Dropping the future
    /// cancels the call.
    pub async fn call<M: Method>(
        &self,
        addr: &str,
        request: &M::Req,
        payload: Bytes,
        options: &CallOptions,
    ) -> Result<(M::Rsp, Payload), RpcError> {
        self.call_reading::<M>(addr, request, payload, 0, options)
            .await
    }

    /// The RDMA transport this client's connections move to, if any.
    pub fn rdma(&self) -> Option<&RdmaTransport> {
        self.inner.rdma.as_ref()
    }

    /// [`Client::call`] for a reply that carries up to
    /// `reply_payload_bytes` of bulk bytes (a chunk read): over RDMA, with
    /// reply buffers to lend (`RdmaTransport::lend_replies_from`), the
    /// client lends one of that size and the server RDMA WRITEs the reply's
    /// payload into it; the caller gets those bytes as the payload, not a
    /// copy. Otherwise the reply's payload travels inline.
    pub async fn call_reading<M: Method>(
        &self,
        addr: &str,
        request: &M::Req,
        payload: Bytes,
        reply_payload_bytes: usize,
        options: &CallOptions,
    ) -> Result<(M::Rsp, Payload), RpcError> {
        let body = codec::try_encode(request)?;
        let method = MethodRef::of::<M>();
        let reply = self
            .call_with_retry(addr, method, body, payload, reply_payload_bytes, options)
            .await?;
        let response = codec::decode::<M::Rsp>(&reply.body)?;
        Ok((response, reply.payload))
    }

    /// One attempt (no retry) of a call whose reply's payload is read from
    /// the connection straight into `landing`, the caller's memory
    /// (crate::landing), when the landing takes it. `reply_payload_bytes`
    /// is as for [`Client::call_reading`]: over RDMA with reply buffers to
    /// lend, the server writes the payload into one of those instead, and
    /// it comes as [`Landed::Payload`].
    ///
    /// The landing comes back with the result, and by then nothing writes
    /// into it any more: a reply still arriving at the deadline is given
    /// one more deadline before its connection is closed. Dropping the
    /// future cancels the call and leaves the landing to the connection
    /// until the reply is in.
    pub async fn call_landing<M: Method, L: Landing>(
        &self,
        addr: &str,
        request: &M::Req,
        payload: Bytes,
        landing: L,
        reply_payload_bytes: usize,
        options: &CallOptions,
    ) -> (L, Result<(M::Rsp, Landed), RpcError>) {
        let (lease, mut returned) = Lease::new(Box::new(landing));
        let state = lease.state.clone();
        let method = MethodRef::of::<M>();
        let reply = match codec::try_encode(request) {
            Ok(body) => {
                let mut outgoing = Outgoing::new(body, payload, reply_payload_bytes);
                outgoing.landing = Some(lease);
                let request_id = self.request_id();
                self.attempt(addr, method, request_id, outgoing, options.timeout)
                    .await
            }
            Err(error) => {
                drop(lease);
                Err(error.into())
            }
        };
        let back = match tokio::time::timeout(options.timeout, &mut returned).await {
            Ok(back) => back,
            Err(_elapsed) => {
                state.close_holder();
                (&mut returned).await
            }
        };
        let (landing, landed) = back.expect("a lease sends its landing back when dropped");
        let landing = *landing
            .into_any()
            .downcast::<L>()
            .expect("a call's landing comes back as the type it went as");
        let result = reply.and_then(|reply| {
            let response = codec::decode::<M::Rsp>(&reply.body)?;
            let landed = match landed {
                Some(bytes) => {
                    // Bytes the server wrote in were counted as one-sided
                    // when their reply came.
                    if !state.written.load(Ordering::Relaxed) {
                        crate::metrics::payload_moved(method.id).in_place(bytes);
                    }
                    Landed::InPlace(bytes)
                }
                None => Landed::Payload(reply.payload),
            };
            Ok((response, landed))
        });
        (landing, result)
    }

    /// One attempt of a call with an already encoded body, with no retry.
    /// Dropping the future cancels the call.
    pub async fn call_raw(
        &self,
        addr: &str,
        method: u16,
        body: Bytes,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<RawReply, RpcError> {
        let request_id = self.request_id();
        self.attempt(
            addr,
            MethodRef::id(method),
            request_id,
            Outgoing::new(body, payload, 0),
            timeout,
        )
        .await
    }

    /// One attempt whose frame carries exactly `flags` and `payload` as
    /// given, with no descriptor or reply buffer of the transport's own:
    /// what a broken or hostile client would send (tests only). A reply
    /// written into a buffer is taken as the protocol violation it is here.
    #[cfg(any(test, feature = "testing"))]
    pub async fn call_with_flags(
        &self,
        addr: &str,
        method: u16,
        flags: u16,
        (body, payload): (Bytes, Bytes),
        timeout: Duration,
    ) -> Result<RawReply, RpcError> {
        let request_id = self.request_id();
        let mut outgoing = Outgoing::new(body, payload, 0);
        outgoing.raw_flags = Some(flags);
        self.attempt(addr, MethodRef::id(method), request_id, outgoing, timeout)
            .await
    }

    /// Drops every pooled connection to `addr`; calls pending on them fail
    /// with `Disconnected`. The next call connects anew.
    pub async fn disconnect(&self, addr: &str) {
        let peer = lock(&self.inner.peers).remove(addr);
        if let Some(peer) = peer {
            for slot in &peer.slots {
                if let Some(conn) = slot.lock().await.take() {
                    conn.shared.close();
                }
            }
        }
    }

    /// Pings every pooled connection to `addr` on that very connection (the
    /// server answers a ping from its reader, not behind its service's
    /// work) and closes those that give no answer within `timeout`; calls
    /// pending on a connection that answers go on. For a caller whose call
    /// to `addr` timed out: that call alone failing says nothing of the
    /// others, but a connection whose peer died or stopped reading must not
    /// keep taking calls. A slot still connecting is skipped (no call waits
    /// on it yet), and so is a check asked for while one of `addr` runs.
    pub async fn close_unresponsive(&self, addr: &str, timeout: Duration) {
        let Some(peer) = lock(&self.inner.peers).get(addr).cloned() else {
            return;
        };
        if peer.checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let _checked = ClearOnDrop(&peer.checking);
        let conns: Vec<Arc<Conn>> = peer
            .slots
            .iter()
            .filter_map(|slot| slot.try_lock().ok().and_then(|slot| slot.clone()))
            .filter(|conn| conn.shared.is_open())
            .collect();
        let mut probes = tokio::task::JoinSet::new();
        for conn in conns {
            let client = self.clone();
            let addr = addr.to_owned();
            probes.spawn(async move {
                let request_id = client.request_id();
                let body = match codec::try_encode(&PingReq { nonce: request_id }) {
                    Ok(body) => body,
                    Err(error) => {
                        tracing::warn!(%addr, %error, "cannot encode a ping");
                        return;
                    }
                };
                let ping = Outgoing::new(body, Bytes::new(), 0);
                let answered = tokio::time::timeout(
                    timeout,
                    client.attempt_on(&conn, &addr, MethodRef::of::<Ping>(), request_id, ping),
                )
                .await;
                if !matches!(answered, Ok(Ok(_))) {
                    tracing::debug!(%addr, "connection gave no answer to a ping; closing it");
                    conn.shared.close();
                }
            });
        }
        while probes.join_next().await.is_some() {}
    }

    /// Calls waiting for a reply, over all connections (for tests and
    /// metrics). A slot that is busy connecting is skipped; it has no calls
    /// waiting for replies yet.
    pub fn pending_calls(&self) -> usize {
        let peers: Vec<Arc<Peer>> = lock(&self.inner.peers).values().cloned().collect();
        peers
            .iter()
            .flat_map(|peer| peer.slots.iter())
            .filter_map(|slot| slot.try_lock().ok())
            .filter_map(|slot| {
                slot.as_ref()
                    .map(|conn| lock(&conn.shared.state).pending.len())
            })
            .sum()
    }

    /// The credentials this client presents.
    pub fn credentials(&self) -> &Credentials {
        &self.inner.credentials
    }

    fn request_id(&self) -> u64 {
        self.inner.request_id_next.fetch_add(1, Ordering::Relaxed)
    }

    async fn call_with_retry(
        &self,
        addr: &str,
        method: MethodRef,
        body: Bytes,
        payload: Bytes,
        reply_payload_bytes: usize,
        options: &CallOptions,
    ) -> Result<RawReply, RpcError> {
        // The first request id seeds the backoff's jitter: unique per call
        // and replayed by a simulation.
        let first_request_id = self.request_id();
        let retry = Retry::attempts(options.retry.attempts, options.retry.backoff);
        let answer = retry
            .run(first_request_id, |attempt| {
                let request_id = match attempt {
                    1 => first_request_id,
                    _ => self.request_id(),
                };
                let (body, payload) = (body.clone(), payload.clone());
                async move {
                    let result = self
                        .attempt(
                            addr,
                            method,
                            request_id,
                            Outgoing::new(body, payload, reply_payload_bytes),
                            options.timeout,
                        )
                        .await;
                    match result {
                        Err(error) if error.is_retryable() => {
                            tracing::debug!(%addr, %method, attempt, %error, "call attempt failed");
                            Attempt::Retry(error)
                        }
                        result => Attempt::Done(result),
                    }
                }
            })
            .await;
        // Out of attempts: the caller hears the last error as it was.
        answer.unwrap_or_else(|gave_up| Err(gave_up.last))
    }

    async fn attempt(
        &self,
        addr: &str,
        method: MethodRef,
        request_id: u64,
        call: Outgoing,
        timeout: Duration,
    ) -> Result<RawReply, RpcError> {
        let metrics = crate::metrics::client(method.id);
        let started = crate::metrics::start(metrics);
        let request_bytes = call.body.len() + call.payload.len();
        let attempt = self.attempt_untimed(addr, method, request_id, call);
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_elapsed) => Err(RpcError::Timeout {
                addr: addr.to_owned(),
                method,
                after: timeout,
            }),
        };
        if let (Some(metrics), Some(started)) = (metrics, started) {
            let response_bytes = result
                .as_ref()
                .map_or(0, |reply| reply.body.len() + reply.payload.len());
            metrics.record(
                started.elapsed(),
                request_bytes,
                response_bytes,
                result.is_err(),
            );
        }
        result
    }

    async fn attempt_untimed(
        &self,
        addr: &str,
        method: MethodRef,
        request_id: u64,
        call: Outgoing,
    ) -> Result<RawReply, RpcError> {
        let conn = self.connection(addr).await?;
        self.attempt_on(&conn, addr, method, request_id, call).await
    }

    /// One attempt on connection `conn` (to `addr`), with no deadline.
    async fn attempt_on(
        &self,
        conn: &Arc<Conn>,
        addr: &str,
        method: MethodRef,
        request_id: u64,
        call: Outgoing,
    ) -> Result<RawReply, RpcError> {
        let Outgoing {
            body,
            payload,
            reply_payload_bytes,
            raw_flags,
            landing,
        } = call;
        let disconnected = || RpcError::Disconnected {
            addr: addr.to_owned(),
            method,
        };
        // A payload's frame CRC is left out when the service checks it
        // end to end, and on a TLS connection (no RDMA link: the session's
        // AEAD authenticates every byte in transit; docs/rpc-wire-format.md,
        // "Flag bit 0"). Frames on an RDMA link are not under TLS.
        let mut flags = if method.payload_checked || conn.shared.link.is_none() {
            frame::FLAG_PAYLOAD_UNCHECKED
        } else {
            0
        };
        // Over RDMA, a payload in a registered arena goes as its descriptor
        // and the server pulls it; it stays lent (alive, unchanged) until
        // the reply comes or the connection is gone.
        let method_metrics = crate::metrics::payload_moved(method.id);
        let mut lent = None;
        let link = match raw_flags {
            Some(raw) => {
                flags = raw;
                None
            }
            None => conn.shared.link.as_ref(),
        };
        let payload = match link.map(|link| link.describe(&payload)) {
            Some(Some(descriptor)) => {
                flags |= frame::FLAG_PAYLOAD_REMOTE;
                method_metrics.one_sided(payload.len());
                lent = Some(payload);
                descriptor
            }
            Some(None) => {
                method_metrics.copied(payload.len());
                payload
            }
            None => payload,
        };
        // A buffer lent for the reply's payload rides after the request's
        // own payload when that is a descriptor or nothing (never copying
        // an inline payload to append it); it stays lent until the reply
        // comes or the connection is gone, like a lent payload.
        let mut sink = None;
        let mut landing = landing;
        let payload = match link {
            Some(link)
                if reply_payload_bytes > 0
                    && (payload.is_empty() || flags & frame::FLAG_PAYLOAD_REMOTE != 0) =>
            {
                // The caller's own buffers, one per part, when all of them
                // are registered: the server writes each part in place.
                // Else a buffer of the transport's reply pool.
                let named = match landing.as_mut().and_then(|lease| scatter_sink(link, lease)) {
                    Some(descriptors) => {
                        flags |= frame::FLAG_REPLY_SINK | frame::FLAG_REPLY_SCATTER;
                        Some(descriptors)
                    }
                    None => link
                        .reply_sink(reply_payload_bytes)
                        .map(|(buffer, descriptor)| {
                            flags |= frame::FLAG_REPLY_SINK;
                            sink = Some(Sink(buffer));
                            Bytes::copy_from_slice(&descriptor)
                        }),
                };
                match named {
                    Some(named) => {
                        let mut joined = Vec::with_capacity(payload.len() + named.len());
                        joined.extend_from_slice(&payload);
                        joined.extend_from_slice(&named);
                        Bytes::from(joined)
                    }
                    None => payload,
                }
            }
            _ => payload,
        };
        let frame = OutFrame::with_flags(
            Kind::Request,
            method.id,
            Status::Ok,
            request_id,
            flags,
            body,
            payload,
        )?;
        let (reply_tx, reply_rx) = oneshot::channel();
        // From here until the guard drops, the call is pending: a drop of
        // this future (cancel, timeout) removes the entry.
        let _pending = conn
            .shared
            .register(request_id, reply_tx, lent, sink, landing)
            .ok_or_else(disconnected)?;
        conn.writer.send(frame).await.map_err(|_| disconnected())?;
        let Arrived { frame, written } = match reply_rx.await {
            Ok(Ok(arrived)) => arrived,
            Ok(Err(Failure::Frame(error))) => return Err(RpcError::Frame(error)),
            Ok(Err(Failure::BadReply(reason))) => {
                return Err(RpcError::BadReply {
                    addr: addr.to_owned(),
                    method,
                    reason,
                });
            }
            Ok(Err(Failure::Refused(reason))) => {
                return Err(RpcError::Refused {
                    addr: addr.to_owned(),
                    method,
                    reason,
                });
            }
            Ok(Err(Failure::Disconnected)) | Err(_) => return Err(disconnected()),
        };
        match frame.header.status {
            Status::Ok => {
                let payload = match written {
                    Some(bytes) => {
                        method_metrics.one_sided(bytes.len());
                        bytes
                    }
                    None => {
                        if conn.shared.link.is_some() {
                            method_metrics.copied(frame.payload.len());
                        }
                        frame.payload
                    }
                };
                Ok(RawReply {
                    body: frame.body,
                    payload: Payload::from_bytes(payload),
                })
            }
            status => Err(RpcError::Remote {
                addr: addr.to_owned(),
                method,
                status,
                message: String::from_utf8_lossy(&frame.body).into_owned(),
            }),
        }
    }

    /// A live connection to `addr`: the next slot round robin, connected if
    /// it is empty or its connection died.
    async fn connection(&self, addr: &str) -> Result<Arc<Conn>, RpcError> {
        let slots_len = self.inner.config.connections_per_peer.max(1);
        let peer = lock(&self.inner.peers)
            .entry(addr.to_owned())
            .or_insert_with(|| {
                Arc::new(Peer {
                    slots: (0..slots_len)
                        .map(|_| tokio::sync::Mutex::new(None))
                        .collect(),
                    slot_next: AtomicUsize::new(0),
                    checking: AtomicBool::new(false),
                })
            })
            .clone();
        let index = peer.slot_next.fetch_add(1, Ordering::Relaxed) % peer.slots.len();
        let mut slot = peer.slots[index].lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.shared.is_open()
        {
            return Ok(conn.clone());
        }
        *slot = None;
        let connect_error = |source| RpcError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let connect = async {
            let stream = self.inner.net.connect(addr).await.map_err(connect_error)?;
            tokio_rustls::TlsConnector::from(self.inner.credentials.client_config())
                .connect(Credentials::server_name(), stream)
                .await
                .map_err(|source| RpcError::Handshake {
                    addr: addr.to_owned(),
                    source,
                })
        };
        let stream = tokio::time::timeout(self.inner.config.connect_timeout, connect)
            .await
            .map_err(|_elapsed| {
                connect_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no connection and TLS handshake within {:?}",
                        self.inner.config.connect_timeout
                    ),
                ))
            })??;
        // rustls verified the chain to our CA; which peer it is, is ours to
        // check: a daemon of our cluster.
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or(tls::PeerIdentityError::Missing)
            .and_then(|certificate| tls::peer_identity(certificate))
            .map_err(|error| RpcError::PeerIdentity {
                addr: addr.to_owned(),
                reason: error.to_string(),
            })?;
        self.inner
            .credentials
            .check_server(&identity)
            .map_err(|reason| RpcError::PeerIdentity {
                addr: addr.to_owned(),
                reason,
            })?;
        tracing::debug!(%addr, slot = index, server = %identity, "connected");
        let conn = match &self.inner.rdma {
            None => Arc::new(Conn::start(addr, stream, self.inner.config.limits, None)),
            // Authenticated above: only now are RDMA parameters exchanged.
            Some(rdma) => {
                let upgrade = rdma.upgrade(stream, crate::rdma::Side::Client);
                let stream = tokio::time::timeout(self.inner.config.connect_timeout, upgrade)
                    .await
                    .map_err(|_elapsed| {
                        connect_error(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "no RDMA connection set-up within {:?}",
                                self.inner.config.connect_timeout
                            ),
                        ))
                    })?
                    .map_err(|source| RpcError::Rdma {
                        addr: addr.to_owned(),
                        source,
                    })?;
                let (stream, link) = stream;
                Arc::new(Conn::start(
                    addr,
                    stream,
                    self.inner.config.limits,
                    Some(link),
                ))
            }
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code panics while holding these locks; if one did, the map itself
    // is still consistent (every operation on it is a single insert/remove).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a pending call ended without a reply frame.
#[derive(Debug)]
enum Failure {
    Disconnected,
    /// The TLS session failed: the server refused our certificate (an
    /// alert), or the stream was not valid TLS.
    Refused(String),
    /// The reply's body CRC did not match.
    Frame(FrameError),
    /// The reply broke the protocol (a written count that does not fit
    /// the buffer lent); the connection closes.
    BadReply(String),
}

/// What one attempt sends.
struct Outgoing {
    body: Bytes,
    payload: Bytes,
    /// The bytes the reply's payload may have (0: no buffer lent for it).
    reply_payload_bytes: usize,
    /// Header flags to send exactly, with the payload as given (a test's
    /// hostile frame, `Client::call_with_flags`).
    raw_flags: Option<u16>,
    /// Caller memory the reply's payload lands in (crate::landing).
    landing: Option<Lease>,
}

impl Outgoing {
    fn new(body: Bytes, payload: Bytes, reply_payload_bytes: usize) -> Outgoing {
        Outgoing {
            body,
            payload,
            reply_payload_bytes,
            raw_flags: None,
            landing: None,
        }
    }
}

/// A reply as the read loop hands it to its call.
#[derive(Debug)]
struct Arrived {
    frame: Frame,
    /// The reply's payload when the server wrote it into the buffer the
    /// call lent (`FLAG_PAYLOAD_WRITTEN`).
    written: Option<Bytes>,
}

type ReplySender = oneshot::Sender<Result<Arrived, Failure>>;

/// The descriptors of the landing's part buffers (`FLAG_REPLY_SCATTER`),
/// when it has them and they are all registered; the lease is then lent
/// for the server to write into.
fn scatter_sink(link: &crate::rdma::Link, lease: &mut Lease) -> Option<Bytes> {
    let buffers: Vec<(*const u8, usize)> = lease
        .landing_mut()
        .part_buffers()?
        .into_iter()
        .map(|buffer| (buffer.as_ptr(), buffer.len()))
        .collect();
    let descriptors = link.scatter_sink(&buffers)?;
    lease.lent_as = LentAs::Written;
    Some(descriptors)
}

/// A buffer lent for a reply's payload (crate::rdma::ReplyBuffer).
struct Sink(Box<dyn crate::rdma::ReplyBuffer>);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sink({} bytes)", self.0.len())
    }
}

/// One multiplexed connection. Dropping the last reference closes it.
#[derive(Debug)]
struct Conn {
    shared: Arc<Shared>,
    writer: mpsc::Sender<OutFrame>,
}

/// What a connection's tasks and its callers share.
#[derive(Debug)]
pub(crate) struct Shared {
    addr: String,
    /// The RDMA connection under the frames, on the RDMA transport.
    link: Option<Arc<crate::rdma::Link>>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// False once the connection broke: no call registers any more.
    open: bool,
    pending: BTreeMap<u64, ReplySender>,
    /// Payloads the server may still pull by RDMA READ, by request id:
    /// kept until the request's reply arrives (the server finishes its
    /// READ before replying) or the queue pair is in the error state, even
    /// when the call itself was cancelled, so the pool never hands the
    /// buffer to a new owner while the peer can still read it.
    lent: BTreeMap<u64, Bytes>,
    /// Buffers lent for replies the server may still RDMA WRITE, by
    /// request id: kept on the same terms as `lent`.
    sinks: BTreeMap<u64, Sink>,
    /// Caller memory replies land in (crate::landing), by request id,
    /// until the reader takes one for its reply or the call ends.
    landings: BTreeMap<u64, Lease>,
    tasks: Vec<AbortHandle>,
}

impl Shared {
    fn is_open(&self) -> bool {
        lock(&self.state).open
    }

    /// Registers a pending call; `None` if the connection already broke.
    fn register(
        self: &Arc<Self>,
        request_id: u64,
        reply: ReplySender,
        lent: Option<Bytes>,
        sink: Option<Sink>,
        landing: Option<Lease>,
    ) -> Option<PendingGuard> {
        let mut state = lock(&self.state);
        if !state.open {
            return None;
        }
        state.pending.insert(request_id, reply);
        if let Some(landing) = landing {
            // A landing the server may write into stays with this
            // connection after its call ends: a call past its deadline
            // closes the connection to get it back.
            if landing.lent_as == LentAs::Written {
                landing.held_by(self);
            }
            state.landings.insert(request_id, landing);
        }
        if let Some(lent) = lent {
            state.lent.insert(request_id, lent);
        }
        if let Some(sink) = sink {
            state.sinks.insert(request_id, sink);
        }
        Some(PendingGuard {
            shared: self.clone(),
            request_id,
        })
    }

    /// The pending call of a reply that arrived, and the buffer or landing
    /// it lent for the reply; the payload it lent is the server's no
    /// longer. They come back even when the call is gone, so they are
    /// freed (the landing given back) when the caller drops them.
    fn take(&self, request_id: u64) -> (Option<ReplySender>, Option<Sink>, Option<Lease>) {
        let mut state = lock(&self.state);
        state.lent.remove(&request_id);
        let sink = state.sinks.remove(&request_id);
        let landing = state.landings.remove(&request_id);
        (state.pending.remove(&request_id), sink, landing)
    }

    /// The landing of a call whose reply's payload is about to be read,
    /// held by this connection's reader from now on.
    fn take_landing(self: &Arc<Self>, request_id: u64) -> Option<Lease> {
        // Marked held under the lock the call's guard takes to remove it:
        // a call that finds its landing gone finds its holder set.
        let state = &mut *lock(&self.state);
        let lease = state.landings.remove(&request_id)?;
        lease.held_by(self);
        Some(lease)
    }

    /// A call's deadline passed one more time while this connection's
    /// reader was still receiving its reply into the caller's memory: the
    /// connection closes, which stops the reader and gives the memory back.
    pub(crate) fn close_landing_stalled(&self) {
        tracing::debug!(addr = %self.addr, "a reply landing in caller memory stalled; closing");
        self.close();
    }

    /// Marks the connection broken, fails every pending call (in request id
    /// order) and stops both tasks, which closes the socket.
    fn close(&self) {
        self.close_because(None);
    }

    /// As [`Shared::close`]; with `refused`, the pending calls fail with
    /// that reason instead of `Disconnected`.
    fn close_because(&self, refused: Option<String>) {
        // The queue pair goes to the error state first (no READ of a lent
        // payload is served after it), then the lent payloads are freed.
        if let Some(link) = &self.link {
            link.close("the rpc connection closed".to_string());
        }
        let (pending, tasks, lent, sinks, landings) = {
            let mut state = lock(&self.state);
            state.open = false;
            (
                std::mem::take(&mut state.pending),
                std::mem::take(&mut state.tasks),
                std::mem::take(&mut state.lent),
                std::mem::take(&mut state.sinks),
                std::mem::take(&mut state.landings),
            )
        };
        drop((lent, sinks, landings));
        if !pending.is_empty() {
            tracing::debug!(addr = %self.addr, calls = pending.len(), "connection lost");
        }
        for (_, reply) in pending {
            let failure = match &refused {
                Some(reason) => Failure::Refused(reason.clone()),
                None => Failure::Disconnected,
            };
            let _ = reply.send(Err(failure));
        }
        for task in tasks {
            task.abort();
        }
    }
}

/// Removes a call's pending entry when the call ends, however it ends.
#[derive(Debug)]
struct PendingGuard {
    shared: Arc<Shared>,
    request_id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let landing = {
            let mut state = lock(&self.shared.state);
            state.pending.remove(&self.request_id);
            // Not taken by the reader: back to the call at once, unless the
            // server may still write into it.
            match state.landings.entry(self.request_id) {
                std::collections::btree_map::Entry::Occupied(entry)
                    if entry.get().lent_as == LentAs::Read =>
                {
                    Some(entry.remove())
                }
                _ => None,
            }
        };
        drop(landing);
    }
}

impl Conn {
    fn start<T>(
        addr: &str,
        stream: T,
        limits: FrameLimits,
        link: Option<Arc<crate::rdma::Link>>,
    ) -> Conn
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            addr: addr.to_owned(),
            link,
            state: Mutex::new(State {
                open: true,
                pending: BTreeMap::new(),
                lent: BTreeMap::new(),
                sinks: BTreeMap::new(),
                landings: BTreeMap::new(),
                tasks: Vec::new(),
            }),
        });
        let (reader, writer) = tokio::io::split(stream);
        // Bounded, so a peer that stops reading pushes back on callers.
        let (writer_tx, writer_rx) = mpsc::channel(256);
        let write_task = tokio::spawn(write_loop(writer, writer_rx, shared.clone()));
        let read_task = tokio::spawn(read_loop(reader, limits, shared.clone()));
        {
            let mut state = lock(&shared.state);
            state.tasks = vec![read_task.abort_handle(), write_task.abort_handle()];
            // Either task may have finished already (a connection refused
            // after accept): then close must still stop the other.
            if !state.open {
                drop(state);
                shared.close();
            }
        }
        Conn {
            shared,
            writer: writer_tx,
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.close();
    }
}

async fn write_loop<T: AsyncWrite>(
    mut writer: WriteHalf<T>,
    mut frames: mpsc::Receiver<OutFrame>,
    shared: Arc<Shared>,
) {
    while let Some(frame) = frames.recv().await {
        if let Err(error) = frame_io::write_frame(&mut writer, frame).await {
            tracing::debug!(addr = %shared.addr, %error, "connection write failed");
            break;
        }
    }
    let _ = writer.shutdown().await;
    shared.close();
}

/// A reply frame as read, and, when its payload landed in the caller's
/// memory, the frame's CRC check over it (done as it landed).
type ReadReply = (Frame, Option<Result<(), FrameError>>);

/// Checks a `FLAG_PAYLOAD_WRITTEN` reply to a call that lent its landing's
/// buffers (`FLAG_REPLY_SCATTER`) and hands the landing back with the count
/// written: the count must be well formed and the landing must find the
/// reply's body consistent with it (each part within its buffer, the parts
/// adding up to the count), else the server broke the protocol.
fn written_in_place(mut lease: Lease, method: u16, frame: &Frame) -> Result<(), String> {
    let count: [u8; frame::WRITTEN_COUNT_BYTES] =
        frame.payload.as_ref().try_into().map_err(|_| {
            format!(
                "a written reply carries a {}-byte count, this one {} bytes",
                frame::WRITTEN_COUNT_BYTES,
                frame.payload.len()
            )
        })?;
    let count = u32::from_le_bytes(count) as usize;
    if lease.landing_mut().segments(&frame.body, count).is_none() {
        return Err(format!(
            "the server says it wrote {count} bytes into the call's buffers, which its reply's \
             body does not account for"
        ));
    }
    crate::metrics::payload_moved(method).one_sided(count);
    lease.state.written.store(true, Ordering::Relaxed);
    lease.landed = Some(count);
    Ok(())
}

/// Reads one reply frame; its payload lands in the caller's memory when
/// its call lent some (crate::landing), which `landing` then holds (with
/// the bytes landed) until the caller drops it. `Ok(None)` at a clean end
/// of the stream.
async fn read_reply<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: &FrameLimits,
    shared: &Arc<Shared>,
    landing: &mut Option<Lease>,
) -> Result<Option<ReadReply>, ReadError> {
    let mut header_bytes = [0u8; frame::HEADER_LEN];
    if tokio::io::AsyncReadExt::read(reader, &mut header_bytes[..1]).await? == 0 {
        return Ok(None);
    }
    let header = frame_io::read_header_rest(reader, header_bytes, 1, limits).await?;
    let lands = header.kind == Kind::Response
        && header.request_id != 0
        && header.status == Status::Ok
        && header.payload_len > 0
        && header.flags & frame::FLAG_PAYLOAD_WRITTEN == 0;
    *landing = if lands {
        shared.take_landing(header.request_id)
    } else {
        None
    };
    match landing {
        None => Ok(Some((frame_io::read_body(reader, header).await?, None))),
        Some(lease) => {
            let (frame, landed) =
                frame_io::read_body_landing(reader, header, lease.landing_mut()).await?;
            let checked = landed.map(|landed| {
                let landed = landed?;
                lease.landed = Some(landed);
                Ok(())
            });
            Ok(Some((frame, checked)))
        }
    }
}

async fn read_loop<T: AsyncRead>(
    mut reader: ReadHalf<T>,
    limits: FrameLimits,
    shared: Arc<Shared>,
) {
    loop {
        let mut landing = None;
        let (frame, checked) = match read_reply(&mut reader, &limits, &shared, &mut landing).await {
            Ok(Some(read)) => read,
            Ok(None) => break,
            Err(ReadError::Io(error)) if error.kind() == std::io::ErrorKind::InvalidData => {
                // rustls reports a TLS alert or a broken record as
                // InvalidData: the server refused us (our certificate is
                // not of its CA, or not of its cluster), which no retry
                // fixes.
                tracing::warn!(addr = %shared.addr, %error, "TLS session failed");
                shared.close_because(Some(format!("TLS session failed: {error}")));
                return;
            }
            Err(ReadError::Io(error)) => {
                tracing::debug!(addr = %shared.addr, %error, "connection read failed");
                break;
            }
            Err(ReadError::Frame(error)) => {
                tracing::warn!(addr = %shared.addr, %error, "bad reply frame, closing");
                break;
            }
        };
        // Landed (or not): the caller's memory goes back to its call before
        // the reply does, so the call finds it there. A landed frame's CRC
        // was checked as it landed.
        drop(landing);
        let header = frame.header;
        if header.kind != Kind::Response {
            tracing::warn!(addr = %shared.addr, "request frame from a server, closing");
            break;
        }
        if header.request_id == 0 {
            // The server rejected the connection itself and is closing it.
            tracing::warn!(
                addr = %shared.addr,
                status = %header.status,
                message = %String::from_utf8_lossy(&frame.body),
                "server closed the connection"
            );
            continue;
        }
        let (reply, sink, landing) = shared.take(header.request_id);
        let written = header.flags & frame::FLAG_PAYLOAD_WRITTEN != 0;
        let checked = checked.unwrap_or_else(|| frame.check_body());
        let result = match (checked, written, sink, landing) {
            (Err(error), ..) => Err(Failure::Frame(error)),
            (Ok(()), false, ..) => Ok(Arrived {
                frame,
                written: None,
            }),
            (Ok(()), true, Some(Sink(buffer)), _) => {
                match crate::rdma::Link::written(buffer, &frame.payload) {
                    Ok(bytes) => Ok(Arrived {
                        frame,
                        written: Some(bytes),
                    }),
                    Err(reason) => Err(Failure::BadReply(reason)),
                }
            }
            (Ok(()), true, None, Some(lease)) if lease.lent_as == LentAs::Written => {
                // The parts are in the landing's buffers: it goes back to
                // its call (before the reply) with the count written.
                match written_in_place(lease, header.method, &frame) {
                    Ok(()) => Ok(Arrived {
                        frame,
                        written: Some(Bytes::new()),
                    }),
                    Err(reason) => Err(Failure::BadReply(reason)),
                }
            }
            (Ok(()), true, None, _) => Err(Failure::BadReply(
                "the server says it wrote the reply into a buffer this call did not lend".into(),
            )),
        };
        let broken = match &result {
            Err(Failure::BadReply(reason)) => Some(reason.clone()),
            _ => None,
        };
        // A call that timed out or was cancelled has no entry: its reply is
        // discarded (and the buffer it lent is free again).
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
        if let Some(reason) = broken {
            tracing::warn!(addr = %shared.addr, %reason, "reply broke the protocol, closing");
            break;
        }
    }
    shared.close();
}
