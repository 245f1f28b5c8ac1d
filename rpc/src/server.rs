//! The server side: accept connections, authenticate them, read requests,
//! check the caller's role, run them through a [`Service`] concurrently,
//! write replies in whatever order they finish.
//!
//! Every connection is mutual TLS ([`crate::tls`]): the accept loop only
//! spawns, and the connection's own task runs the handshake under
//! [`ServerConfig::handshake_timeout`], so a slow or silent peer holds one
//! task for a bounded time and never the accept loop. A peer that speaks a
//! flyfs frame in plaintext gets one plaintext `Unauthenticated` frame saying
//! why; a failed handshake or a certificate without a flyfs identity of our
//! cluster closes the connection. Each refusal is one log line, at most one
//! per second per cause (with the count of lines held back), so a flood of
//! bad connections cannot flood the log. Before a request reaches the
//! service, the caller's role must be in the method's roles
//! ([`Service::roles`]), else it is answered `Forbidden`.
//!
//! After the handshake, each connection runs three loops side by side:
//! * the *reader* reads frames (exactly one frame at a time, so a hostile
//!   header costs at most the frame limits in memory) and hands them on;
//! * the *dispatcher* answers what the rpc layer owns (ping, unknown
//!   methods, checksum errors) and spawns one task per service request into a
//!   `JoinSet`, at most `requests_in_flight_max_per_connection` at a time
//!   (beyond that the reader stops reading, and TCP pushes back on the
//!   client); a finished task's reply goes to the writer, and a panicked
//!   task's `JoinError` becomes an `Internal` reply;
//! * the *writer* writes reply frames from a channel, one vectored write each.
//!
//! What bad input costs: a body CRC mismatch or an unknown method fails that
//! request only. A header that fails magic, version or CRC, or one over the
//! limits, leaves the stream position unknown (or not worth reading past), so
//! the server sends one error frame (request id 0 for a header it cannot
//! trust; the request's own id for one over the limits) and closes that
//! connection only. Before closing it drains what the client is still sending
//! for a moment, so the error frame is not destroyed by a TCP reset.
//!
//! A connection that closes (the peer went away, or sent garbage) does not
//! cancel the requests it started: they run to the end and their replies
//! are dropped, because a service request cancelled halfway (a replicated
//! write between its local and its remote step) may leave state no later
//! request can clean up. [`ServerHandle::shutdown`] is different: it stops
//! accepting and drops every connection with its requests, as a crash
//! would; a storage daemon "restart" in the simulation relies on that.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::task::{JoinError, JoinHandle, JoinSet};

use flyfs_proto::auth::{Identity, Roles};
use flyfs_proto::codec;
use flyfs_proto::frame::{self, Frame, FrameLimits, Kind, OutFrame, Status};
use flyfs_proto::{METHOD_ID_SERVICE_MIN, Method, Ping, PingRsp};

use crate::budget::{ConnectionBudgets, Held, ServerBudgets};
use crate::frame_io::{self, ReadError};
use crate::net::Listener;
use crate::payload::Payload;
use crate::rdma::RdmaTransport;
use crate::refusals::RefusalLog;
use crate::tls::{self, Credentials};

/// How long a closing connection keeps reading (and discarding) what the
/// client still sends after the error frame, and how much of it.
const DRAIN_TIME_MAX: Duration = Duration::from_secs(2);
const DRAIN_BYTES_MAX: u64 = 128 << 20;

/// A request as a service sees it.
#[derive(Debug)]
pub struct Request {
    pub method: u16,
    pub request_id: u64,
    /// The encoded request message; see [`Request::decode`].
    pub body: Bytes,
    pub payload: Payload,
    /// Who sent it: authenticated by the connection's TLS handshake.
    pub peer: Peer,
}

/// An authenticated peer: its address (for logs) and the identity its
/// certificate names. Services bind identities through it (a storage node
/// may only speak for its own node id; an admin acts as its certificate's
/// uid).
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: String,
    pub identity: Arc<Identity>,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.addr, self.identity)
    }
}

impl Request {
    /// Decodes the body as `M`'s request, or gives the reply to send instead:
    /// `BadRequest` naming the method and what was wrong.
    #[allow(clippy::result_large_err)] // The error is the reply to send; it is not propagated far.
    pub fn decode<M: Method>(&self) -> Result<M::Req, Reply> {
        if self.method != M::ID {
            return Err(Reply::error(
                Status::Internal,
                format!(
                    "request for method {} was dispatched to the handler of {} (method {})",
                    self.method,
                    M::NAME,
                    M::ID
                ),
            ));
        }
        codec::decode::<M::Req>(&self.body).map_err(|error| {
            Reply::error(
                Status::BadRequest,
                format!("{} (method {}): {error}", M::NAME, M::ID),
            )
        })
    }
}

/// A service's answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: Status,
    /// The encoded response message when `status` is `Ok`, else a UTF-8
    /// message saying what went wrong.
    pub body: Bytes,
    /// Bulk bytes, built zero-copy by the service (`Bytes::from_owner`).
    pub payload: Bytes,
    /// More bulk bytes, after `payload`, in order: the items of a batched
    /// reply. Over RDMA each moves into the client's buffer by its own
    /// RDMA WRITE; over TCP they are joined into one payload.
    pub parts: Vec<Bytes>,
}

impl Reply {
    /// A successful reply. If the response cannot be encoded (only a
    /// hand-written `Serialize` can fail) the reply is `Internal` instead.
    pub fn ok<M: Method>(response: &M::Rsp, payload: Bytes) -> Reply {
        match codec::try_encode(response) {
            Ok(body) => Reply {
                status: Status::Ok,
                body,
                payload,
                parts: Vec::new(),
            },
            Err(error) => Reply::error(
                Status::Internal,
                format!("{} (method {}): {error}", M::NAME, M::ID),
            ),
        }
    }

    /// A failure with a message for the caller.
    pub fn error(status: Status, message: impl fmt::Display) -> Reply {
        Reply {
            status,
            body: Bytes::from(message.to_string()),
            payload: Bytes::new(),
            parts: Vec::new(),
        }
    }

    /// A successful reply whose payload is `parts`, one after another (a
    /// batched read's items): each part moves on its own over RDMA, so no
    /// part is copied to join them. Empty parts are kept (an item without
    /// bytes): a request that lent one buffer per part gets part `i` in
    /// buffer `i`.
    pub fn ok_parts<M: Method>(response: &M::Rsp, parts: Vec<Bytes>) -> Reply {
        let mut reply = Reply::ok::<M>(response, Bytes::new());
        if reply.status == Status::Ok {
            reply.parts = parts;
        }
        reply
    }

    /// Bytes of the payload and its parts.
    pub fn payload_len(&self) -> usize {
        self.payload.len() + self.parts.iter().map(Bytes::len).sum::<usize>()
    }

    pub fn unknown_method(method: u16) -> Reply {
        Reply::error(
            Status::UnknownMethod,
            format!("no handler for method {method}"),
        )
    }
}

/// What a server runs requests through. `call` runs in a task of its own,
/// many at a time; a panic in it becomes an `Internal` reply.
pub trait Service: Send + Sync + 'static {
    fn call(&self, request: Request) -> impl Future<Output = Reply> + Send;

    /// The roles allowed to call `method`, or `None` if the service has no
    /// such method (answered `UnknownMethod`). The default is every flyfs
    /// method's declared roles ([`flyfs_proto::wire::roles_of`]); only a
    /// service with methods of its own (a test's) answers otherwise, and
    /// should use ids no flyfs service uses, since refusals name a method
    /// after flyfs's table.
    fn roles(&self, method: u16) -> Option<Roles> {
        flyfs_proto::wire::roles_of(method)
    }

    /// The most reply bytes a request of `method` with this `body` may
    /// produce. The server takes them from the connection's, the identity's
    /// and the server's budgets before the request runs (the connection's
    /// reader waits until they fit), and gives them back once the reply is
    /// written: so a peer that asks for large replies and never reads them
    /// stops being read instead of making the server hold the replies. The
    /// default, 0, suits methods whose replies are small; a method that
    /// returns bulk bytes (a storage read) says how many.
    fn reply_bytes_max(&self, method: u16, body: &[u8]) -> u64 {
        let _ = (method, body);
        0
    }
}

/// Per-server settings.
#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    /// Largest request body and payload; a service that takes no payload
    /// (the manager, the metadata service) sets `payload_bytes_max` to 0.
    pub limits: FrameLimits,
    pub requests_in_flight_max_per_connection: usize,
    /// How long a new connection has to complete its TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections open at once; more are closed as they are accepted.
    pub connections_max: usize,
    /// A connection that starts no request for this long is closed.
    pub idle_timeout: Duration,
    /// A header's 36 bytes must all arrive within this of its first one.
    pub header_timeout: Duration,
    /// A body and payload of `n` bytes must arrive within
    /// `body_timeout_base + n / body_bytes_per_s_min` of their header.
    pub body_timeout_base: Duration,
    pub body_bytes_per_s_min: u64,
    /// Bytes of requests (body and payload) in flight: on one connection,
    /// for one peer identity over all its connections, and in all. A
    /// request waits (its connection stops reading) until it fits all three.
    pub request_bytes_in_flight_max_per_connection: u64,
    pub request_bytes_in_flight_max_per_identity: u64,
    pub request_bytes_in_flight_max: u64,
    /// Request tasks in all, those of closed connections included.
    pub requests_in_flight_max: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: FrameLimits::default(),
            requests_in_flight_max_per_connection: 256,
            handshake_timeout: Duration::from_secs(10),
            connections_max: 4096,
            idle_timeout: Duration::from_secs(3600),
            header_timeout: Duration::from_secs(10),
            body_timeout_base: Duration::from_secs(10),
            body_bytes_per_s_min: 1 << 20,
            request_bytes_in_flight_max_per_connection: 256 << 20,
            request_bytes_in_flight_max_per_identity: 512 << 20,
            request_bytes_in_flight_max: 1 << 30,
            requests_in_flight_max: 8192,
        }
    }
}

impl ServerConfig {
    /// The settings of a service that takes no payload (the cluster manager,
    /// the metadata service): a request announcing one is refused at its
    /// header, before anything is read or allocated for it.
    pub fn without_payload() -> ServerConfig {
        ServerConfig {
            limits: FrameLimits {
                payload_bytes_max: 0,
                ..FrameLimits::default()
            },
            ..ServerConfig::default()
        }
    }

    /// Checks that the settings can work together: the largest frame the
    /// limits let in must fit every byte budget, or it would wait forever.
    pub fn check(&self) -> Result<(), String> {
        let frame_max =
            u64::from(self.limits.body_bytes_max) + u64::from(self.limits.payload_bytes_max);
        for (name, budget) in [
            (
                "request_bytes_in_flight_max_per_connection",
                self.request_bytes_in_flight_max_per_connection,
            ),
            (
                "request_bytes_in_flight_max_per_identity",
                self.request_bytes_in_flight_max_per_identity,
            ),
            (
                "request_bytes_in_flight_max",
                self.request_bytes_in_flight_max,
            ),
        ] {
            if budget < frame_max {
                return Err(format!(
                    "{name} = {budget} is below the largest request the frame limits allow \
                     ({frame_max} bytes: body_bytes_max + payload_bytes_max)"
                ));
            }
        }
        if self.body_bytes_per_s_min == 0 {
            return Err("body_bytes_per_s_min must be above 0".into());
        }
        Ok(())
    }

    /// The deadline of a body and payload of `bytes` after their header.
    fn body_timeout(&self, bytes: u64) -> Duration {
        self.body_timeout_base
            + Duration::from_secs_f64(bytes as f64 / self.body_bytes_per_s_min.max(1) as f64)
    }
}

/// A service with its settings and credentials, ready to serve a listener.
/// There is no server without credentials: every connection is
/// authenticated.
#[derive(Debug)]
pub struct Server<S> {
    service: Arc<S>,
    config: ServerConfig,
    credentials: Credentials,
    rdma: Option<RdmaTransport>,
}

impl<S: Service> Server<S> {
    pub fn new(service: Arc<S>, config: ServerConfig, credentials: Credentials) -> Server<S> {
        Server {
            service,
            config,
            credentials,
            rdma: None,
        }
    }

    /// Serves over RDMA: every connection, once authenticated, moves its
    /// frames to an RDMA connection on `transport`'s device
    /// (crate::rdma); clients on the TCP transport are refused with an error
    /// frame naming the transport.
    pub fn with_rdma(mut self, transport: RdmaTransport) -> Server<S> {
        self.rdma = Some(transport);
        self
    }

    /// Serves `listener` until the returned future is dropped (which drops
    /// every connection).
    pub async fn serve<L>(self, listener: L)
    where
        L: Listener,
        L::Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if let Err(reason) = self.config.check() {
            tracing::error!("server settings refused, not serving: {reason}");
            return;
        }
        serve_until(
            listener,
            self.service,
            self.config,
            (self.credentials, self.rdma),
            std::future::pending(),
        )
        .await;
    }

    /// Serves `listener` from a task of its own until the handle is shut
    /// down or dropped.
    pub fn spawn<L>(self, listener: L) -> io::Result<ServerHandle>
    where
        L: Listener,
        L::Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.config
            .check()
            .map_err(|reason| io::Error::new(io::ErrorKind::InvalidInput, reason))?;
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_until(
            listener,
            self.service,
            self.config,
            (self.credentials, self.rdma),
            async move {
                // A dropped handle stops the server too: `Err` is fine.
                let _ = stopped.await;
            },
        ));
        Ok(ServerHandle {
            local_addr,
            stop: Some(stop),
            task: Some(task),
        })
    }
}

/// Serves `listener` with `service` until the future is dropped. Generic over
/// the listener (rather than the [`Network`](crate::Network)) so that the
/// network type is inferred from the listener.
pub async fn serve<L, S>(
    listener: L,
    service: Arc<S>,
    config: ServerConfig,
    credentials: Credentials,
) where
    L: Listener,
    L::Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service,
{
    Server::new(service, config, credentials)
        .serve(listener)
        .await;
}

/// A running server. Dropping it stops the server as [`shutdown`] does, but
/// without waiting.
///
/// [`shutdown`]: ServerHandle::shutdown
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the listener is bound to (`ip:port`).
    pub fn local_addr(&self) -> &str {
        &self.local_addr
    }

    /// Stops accepting, closes the listener and drops every connection
    /// (aborting requests in flight); returns once all of that is done, so
    /// the port can be bound again.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
            && error.is_panic()
        {
            tracing::error!(addr = %self.local_addr, %error, "server task panicked");
        }
    }
}

/// The accept loop. Returns when `shutdown` resolves, after dropping the
/// listener and every connection.
async fn serve_until<L, S>(
    mut listener: L,
    service: Arc<S>,
    config: ServerConfig,
    (credentials, rdma): (Credentials, Option<RdmaTransport>),
    shutdown: impl Future<Output = ()>,
) where
    L: Listener,
    L::Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service,
{
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let refusals = Arc::new(RefusalLog::default());
    let budgets = ServerBudgets::new(&config);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = budgets.admit() else {
                        Refusal::ConnectionsMax(config.connections_max).log(&refusals, &peer);
                        drop(stream);
                        continue;
                    };
                    tracing::debug!(%peer, "connection accepted");
                    connections.spawn(run_connection(
                        stream,
                        peer,
                        service.clone(),
                        config,
                        (credentials.clone(), rdma.clone()),
                        refusals.clone(),
                        (budgets.clone(), slot),
                    ));
                }
                Err(error) => {
                    // Usually transient (out of file descriptors): back off a
                    // little instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// What the reader hands the dispatcher.
enum Event {
    /// A request, with the budgets it holds until its task ends, and its
    /// payload when that is still in the client's memory (RDMA).
    Request(
        Frame,
        Held,
        Option<crate::payload::RemotePayload>,
        Option<ReplySink>,
    ),
    /// A reply the rpc layer writes on its own (checksum mismatch).
    Reply(OutFrame),
    /// Write this error frame, then close the connection.
    Fatal(OutFrame),
}

async fn run_connection<T, S>(
    stream: T,
    addr: String,
    service: Arc<S>,
    config: ServerConfig,
    (credentials, rdma): (Credentials, Option<RdmaTransport>),
    refusals: Arc<RefusalLog>,
    (budgets, slot): (Arc<ServerBudgets>, OwnedSemaphorePermit),
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service,
{
    let accepted =
        tokio::time::timeout(config.handshake_timeout, accept(stream, &credentials)).await;
    let (stream, identity) = match accepted {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(refusal)) => {
            refusal.log(&refusals, &addr);
            return;
        }
        Err(_elapsed) => {
            Refusal::HandshakeTimeout(config.handshake_timeout).log(&refusals, &addr);
            return;
        }
    };
    let peer = Peer {
        addr,
        identity: Arc::new(identity),
    };
    tracing::debug!(%peer, "connection authenticated");
    let budgets = budgets.connection(peer.identity.to_string(), slot);
    // Only an authenticated peer gets to exchange RDMA parameters. A server
    // with an RDMA device serves clients of both transports: the first
    // bytes inside the session say which one the client chose (RDMA
    // parameters, or a frame header), and are put back for the reader.
    let Some(rdma) = rdma else {
        serve_frames(stream, peer, service, &config, &refusals, &budgets, None).await;
        return;
    };
    let mut stream = stream;
    let mut first = [0u8; 4];
    match tokio::time::timeout(config.header_timeout, stream.read_exact(&mut first)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "connection closed before its first frame");
            return;
        }
        Err(_elapsed) => {
            Refusal::HeaderTimeout(config.header_timeout).log(&refusals, &peer.addr);
            return;
        }
    }
    let stream = Prefixed::new(first, stream);
    if first[..] != flyfs_rdma::handshake::MAGIC[..4] {
        serve_frames(stream, peer, service, &config, &refusals, &budgets, None).await;
        return;
    }
    {
        {
            let upgrade = rdma.upgrade(stream, crate::rdma::Side::Server);
            match tokio::time::timeout(config.handshake_timeout, upgrade).await {
                Ok(Ok((stream, link))) => {
                    serve_frames(
                        stream,
                        peer,
                        service,
                        &config,
                        &refusals,
                        &budgets,
                        Some(link),
                    )
                    .await;
                }
                Ok(Err(error)) => Refusal::Rdma(error).log(&refusals, &peer.addr),
                Err(_elapsed) => {
                    Refusal::HandshakeTimeout(config.handshake_timeout).log(&refusals, &peer.addr);
                }
            }
        }
    }
}

/// Serves the frames of one authenticated connection until it closes.
async fn serve_frames<T, S>(
    stream: T,
    peer: Peer,
    service: Arc<S>,
    config: &ServerConfig,
    refusals: &Arc<RefusalLog>,
    budgets: &ConnectionBudgets,
    link: Option<Arc<crate::rdma::Link>>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service,
{
    let (reader, writer) = tokio::io::split(stream);
    // Capacity 1: the reader stays at most one frame ahead of the dispatcher,
    // so the in-flight limit holds back reading from the socket.
    let (events_tx, events_rx) = mpsc::channel(1);
    let in_flight_max = config.requests_in_flight_max_per_connection.max(1);
    let (replies_tx, replies_rx) = mpsc::channel(in_flight_max);
    let reply_service = service.clone();
    let reply_bytes_max =
        move |method: u16, body: &[u8]| reply_service.reply_bytes_max(method, body);
    // Without an RDMA link the connection is the TLS session itself, whose
    // AEAD already authenticates every byte in transit: replies leave their
    // payload out of the frame CRC, a pass over every byte of a chunk read
    // saved on each side (docs/rpc-wire-format.md, "Flag bit 0"). Frames on
    // an RDMA link are not under TLS and keep it.
    let reply_flags = if link.is_none() {
        flyfs_proto::frame::FLAG_PAYLOAD_UNCHECKED
    } else {
        0
    };
    // The three end on their own: the reader at end of stream or a fatal
    // frame, the dispatcher when the reader is done and nothing is in flight
    // (or the writer is gone), the writer when the dispatcher is done (or a
    // write fails).
    tokio::join!(
        read_loop(
            reader,
            events_tx,
            config,
            budgets,
            (&peer.addr, refusals),
            &reply_bytes_max,
            link.as_ref(),
        ),
        dispatch_loop(
            events_rx,
            replies_tx,
            service,
            in_flight_max,
            &peer,
            reply_flags,
        ),
        write_loop(writer, replies_rx, &peer.addr),
    );
    tracing::debug!(%peer, "connection closed");
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    events: mpsc::Sender<Event>,
    config: &ServerConfig,
    budgets: &ConnectionBudgets,
    (peer, refusals): (&str, &RefusalLog),
    reply_bytes_max: &(dyn Fn(u16, &[u8]) -> u64 + Sync),
    link: Option<&Arc<crate::rdma::Link>>,
) {
    let fatal = loop {
        let read = tokio::select! {
            biased;
            // The dispatcher is gone (the writer failed): stop reading.
            () = events.closed() => return,
            read = read_request(&mut reader, config, budgets) => read,
        };
        let event = match read {
            Ok(None) => return,
            Ok(Some((mut frame, mut held))) => {
                if frame.header.kind != Kind::Request {
                    break OutFrame::error(
                        frame.header.method,
                        0,
                        Status::BadRequest,
                        &format!(
                            "expected a request frame, got a {:?} frame (request {})",
                            frame.header.kind, frame.header.request_id
                        ),
                    );
                }
                // A buffer named for the reply comes last in the payload;
                // the request's own payload is what precedes it.
                let (sink, own_payload) =
                    if frame.header.flags & flyfs_proto::frame::FLAG_REPLY_SINK != 0 {
                        match reply_sink(&frame, link) {
                            Ok((sink, own_payload)) => (Some(sink), own_payload),
                            Err(message) => {
                                if !reply_bad_request(&events, &frame, &message).await {
                                    return;
                                }
                                continue;
                            }
                        }
                    } else {
                        (None, frame.payload.clone())
                    };
                let remote = if frame.header.flags & flyfs_proto::frame::FLAG_PAYLOAD_REMOTE != 0 {
                    match remote_payload(
                        &frame,
                        &own_payload,
                        link,
                        config.limits.payload_bytes_max,
                    ) {
                        Ok(remote) => {
                            // The bytes the READ will land in count against
                            // the budgets as if they had come inline.
                            let payload_held = tokio::select! {
                                biased;
                                () = events.closed() => return,
                                taken = budgets.take(remote.remote.len.into()) => taken,
                            };
                            held.merge(payload_held);
                            Some(remote)
                        }
                        Err(message) => {
                            if !reply_bad_request(&events, &frame, &message).await {
                                return;
                            }
                            continue;
                        }
                    }
                } else {
                    None
                };
                match frame.check_body() {
                    Ok(()) => {
                        // Room for the reply too, before the request runs:
                        // until it fits, this connection is not read.
                        let reply_bytes = reply_bytes_max(frame.header.method, &frame.body);
                        if reply_bytes > 0 {
                            let reply = tokio::select! {
                                biased;
                                () = events.closed() => return,
                                reply = budgets.take_reply(reply_bytes, (frame.body.len() + frame.payload.len()) as u64) => reply,
                            };
                            held.merge(reply);
                        }
                        // The frame's CRC covered the whole payload; the
                        // service sees only the request's own.
                        frame.payload = own_payload;
                        Event::Request(frame, held, remote, sink)
                    }
                    Err(error) => Event::Reply(OutFrame::error(
                        frame.header.method,
                        frame.header.request_id,
                        Status::ChecksumMismatch,
                        &error.to_string(),
                    )),
                }
            }
            Err(RequestReadError::Read(ReadError::Frame(error))) => {
                // Over the limits: the header was trusted, so the error goes
                // to that request. Otherwise to request 0: the connection.
                let request_id = error.request_id().unwrap_or(0);
                break OutFrame::error(0, request_id, error.status(), &error.to_string());
            }
            Err(RequestReadError::Read(ReadError::Io(error))) => {
                tracing::debug!(%peer, %error, "connection read failed");
                return;
            }
            Err(RequestReadError::Idle) => {
                tracing::debug!(%peer, after = ?config.idle_timeout, "closing an idle connection");
                return;
            }
            Err(RequestReadError::Late(refusal)) => {
                // Too slow to trust the stream's position: close without a
                // frame (the peer is not reading either, most likely).
                refusal.log(refusals, peer);
                return;
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    };
    tracing::warn!(%peer, "closing connection after a bad frame");
    if events.send(Event::Fatal(fatal)).await.is_err() {
        return;
    }
    drop(events);
    drain(&mut reader).await;
}

/// Why the next request could not be read.
enum RequestReadError {
    Read(ReadError),
    /// No request started within the idle timeout.
    Idle,
    /// A header or body did not arrive by its deadline.
    Late(Refusal),
}

/// Reads the next request under the connection's deadlines, taking its
/// bytes from the budgets between its header and its body (so nothing is
/// allocated for a body that does not fit yet). `Ok(None)` at a clean end of
/// stream.
/// Answers `frame` `BadRequest` with `message` (a descriptor it carried was
/// refused) without running it; the connection reads on. False when the
/// dispatcher is gone, so the reader should stop.
async fn reply_bad_request(events: &mpsc::Sender<Event>, frame: &Frame, message: &str) -> bool {
    let reply = OutFrame::error(
        frame.header.method,
        frame.header.request_id,
        Status::BadRequest,
        message,
    );
    events.send(Event::Reply(reply)).await.is_ok()
}

async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    config: &ServerConfig,
    budgets: &ConnectionBudgets,
) -> Result<Option<(Frame, Held)>, RequestReadError> {
    let mut header = [0u8; frame::HEADER_LEN];
    let first = tokio::time::timeout(config.idle_timeout, reader.read(&mut header[..1]))
        .await
        .map_err(|_| RequestReadError::Idle)?
        .map_err(|error| RequestReadError::Read(error.into()))?;
    if first == 0 {
        return Ok(None);
    }
    let header = tokio::time::timeout(
        config.header_timeout,
        frame_io::read_header_rest(reader, header, 1, &config.limits),
    )
    .await
    .map_err(|_| RequestReadError::Late(Refusal::HeaderTimeout(config.header_timeout)))?
    .map_err(RequestReadError::Read)?;
    let bytes = u64::from(header.body_len) + u64::from(header.payload_len);
    let held = budgets.take(bytes).await;
    let deadline = config.body_timeout(bytes);
    let frame = tokio::time::timeout(deadline, frame_io::read_body(reader, header))
        .await
        .map_err(|_| RequestReadError::Late(Refusal::BodyTimeout { bytes, deadline }))?
        .map_err(RequestReadError::Read)?;
    Ok(Some((frame, held)))
}

/// Reads and discards for a bounded time and size, so a client still sending
/// the rest of a bad frame does not turn our close into a TCP reset that
/// could destroy the error frame before the client reads it.
async fn drain<R: AsyncRead + Unpin>(reader: &mut R) {
    let mut sink = tokio::io::sink();
    let mut limited = reader.take(DRAIN_BYTES_MAX);
    let _ = tokio::time::timeout(DRAIN_TIME_MAX, tokio::io::copy(&mut limited, &mut sink)).await;
}

async fn dispatch_loop<S: Service>(
    mut events: mpsc::Receiver<Event>,
    replies: mpsc::Sender<(OutFrame, Held)>,
    service: Arc<S>,
    in_flight_max: usize,
    peer: &Peer,
    reply_flags: u16,
) {
    let mut in_flight: JoinSet<(OutFrame, Held)> = JoinSet::new();
    // Which request each task serves, to answer for a task that panicked.
    let mut requests: HashMap<tokio::task::Id, (u16, u64)> = HashMap::new();
    let mut reading = true;
    loop {
        if !reading && in_flight.is_empty() {
            return;
        }
        let reply = tokio::select! {
            biased;
            () = replies.closed() => {
                // The peer is gone, but what it asked for runs to the end:
                // a storage write cancelled between its local pending
                // version and its commit would leave that version without
                // an owner, and the chunk stuck behind it.
                in_flight.detach_all();
                return;
            }
            Some(done) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                match done {
                    Ok((id, answered)) => {
                        requests.remove(&id);
                        answered
                    }
                    Err(error) => {
                        let (method, request_id) =
                            requests.remove(&error.id()).unwrap_or((0, 0));
                        (panic_reply(method, request_id, error, &peer.addr), Held::default())
                    }
                }
            }
            event = events.recv(), if reading && in_flight.len() < in_flight_max => {
                match event {
                    None => {
                        reading = false;
                        continue;
                    }
                    Some(Event::Reply(frame)) => (frame, Held::default()),
                    Some(Event::Fatal(frame)) => {
                        // Requests in flight finish unanswered (as above);
                        // their clients see the connection close.
                        in_flight.detach_all();
                        let _ = replies.send((frame, Held::default())).await;
                        return;
                    }
                    Some(Event::Request(frame, held, remote, sink)) => match dispatch(frame, held, remote, sink, &service, peer, reply_flags) {
                        Dispatch::Now(reply, held) => (reply, held),
                        Dispatch::Spawn(method, request_id, task) => {
                            let handle = in_flight.spawn(task);
                            requests.insert(handle.id(), (method, request_id));
                            continue;
                        }
                    },
                }
            }
        };
        if replies.send(reply).await.is_err() {
            return;
        }
    }
}

enum Dispatch<F> {
    Now(OutFrame, Held),
    Spawn(u16, u64, F),
}

fn dispatch<S: Service>(
    frame: Frame,
    held: Held,
    remote: Option<crate::payload::RemotePayload>,
    sink: Option<ReplySink>,
    service: &Arc<S>,
    peer: &Peer,
    reply_flags: u16,
) -> Dispatch<impl Future<Output = (OutFrame, Held)> + Send + 'static> {
    let Frame {
        header,
        body,
        payload,
    } = frame;
    let (method, request_id) = (header.method, header.request_id);
    let metrics = crate::metrics::server(method);
    let started = crate::metrics::start(metrics);
    let payload = match remote {
        Some(remote) => Payload::Remote(remote),
        None => Payload::from_bytes(payload),
    };
    let request_bytes = body.len() + payload.len();
    if method < METHOD_ID_SERVICE_MIN {
        let reply = if method == Ping::ID {
            match codec::decode::<<Ping as Method>::Req>(&body) {
                Ok(ping) => Reply::ok::<Ping>(&PingRsp { nonce: ping.nonce }, Bytes::new()),
                Err(error) => Reply::error(Status::BadRequest, error),
            }
        } else {
            Reply::unknown_method(method)
        };
        record(metrics, started, request_bytes, &reply);
        return Dispatch::Now(reply_frame(method, request_id, reply, reply_flags), held);
    }
    let refused = match service.roles(method) {
        None => Some(Reply::unknown_method(method)),
        Some(roles) if !roles.contains(peer.identity.role()) => {
            let message = forbidden_message(peer, method);
            crate::refusals::global().log("role", peer, &message);
            let reply = Reply::error(Status::Forbidden, message);
            Some(reply)
        }
        Some(_) => None,
    };
    if let Some(reply) = refused {
        record(metrics, started, request_bytes, &reply);
        return Dispatch::Now(reply_frame(method, request_id, reply, reply_flags), held);
    }
    let request = Request {
        method,
        request_id,
        body,
        payload,
        peer: peer.clone(),
    };
    let service = service.clone();
    Dispatch::Spawn(method, request_id, async move {
        // The request's budgets go with its reply to the writer, which
        // gives them back once the reply is written; if the connection is
        // gone, when this task ends, however long after.
        // Boxed: a service's future (a storage read's whole path) is large,
        // and this task's future is moved whole into its cell on spawn and
        // overwritten whole when it ends.
        let reply = Box::pin(service.call(request)).await;
        // The reply's CRC is computed here, in the request's task, not on
        // the connection's.
        record(metrics, started, request_bytes, &reply);
        let frame = match sink {
            Some(sink) => reply_written(method, request_id, reply, sink).await,
            None => reply_frame(method, request_id, reply, reply_flags),
        };
        (frame, held)
    })
}

/// The client's buffers a `FLAG_REPLY_SINK` request names for its reply's
/// payload, on the connection it arrived on: one for the whole payload, or
/// (`FLAG_REPLY_SCATTER`) one per part of it.
#[derive(Debug)]
struct ReplySink {
    link: Arc<crate::rdma::Link>,
    remotes: Vec<flyfs_rdma::RemoteBuffer>,
    scatter: bool,
}

/// Splits a `FLAG_REPLY_SINK` request's payload into the buffers it names
/// (its last 16 bytes; under `FLAG_REPLY_SCATTER`, a count in its last 4
/// bytes and that many descriptors before it) and the request's own
/// payload, checked: only on an RDMA connection, well-formed descriptors of
/// at least one byte each, at most `REPLY_BUFFERS_MAX` of them. The
/// descriptors make this server do nothing but, at most, one RDMA WRITE per
/// part of its own reply into those ranges, over this client's queue pair,
/// and only when the reply fits them (`reply_written`).
fn reply_sink(
    frame: &Frame,
    link: Option<&Arc<crate::rdma::Link>>,
) -> Result<(ReplySink, Bytes), String> {
    use flyfs_proto::frame::{
        REMOTE_DESCRIPTOR_BYTES, REPLY_BUFFER_COUNT_BYTES, REPLY_BUFFERS_MAX,
    };
    let Some(link) = link else {
        return Err(
            "a reply buffer (one-sided reply) on a connection that is not on the RDMA transport"
                .to_string(),
        );
    };
    let payload = &frame.payload;
    let scatter = frame.header.flags & flyfs_proto::frame::FLAG_REPLY_SCATTER != 0;
    let (count, tail) = if scatter {
        let Some(count_at) = payload.len().checked_sub(REPLY_BUFFER_COUNT_BYTES) else {
            return Err(format!(
                "a request naming reply buffers per part ends its payload with their \
                 {REPLY_BUFFER_COUNT_BYTES}-byte count; this payload has {} bytes",
                payload.len()
            ));
        };
        let mut count = [0u8; REPLY_BUFFER_COUNT_BYTES];
        count.copy_from_slice(&payload[count_at..]);
        let count = u32::from_le_bytes(count) as usize;
        if count == 0 || count > REPLY_BUFFERS_MAX {
            return Err(format!(
                "a request names {count} reply buffers; 1 to {REPLY_BUFFERS_MAX} are allowed"
            ));
        }
        (count, REPLY_BUFFER_COUNT_BYTES)
    } else {
        (1, 0)
    };
    let named = count * REMOTE_DESCRIPTOR_BYTES + tail;
    let Some(own_len) = payload.len().checked_sub(named) else {
        return Err(format!(
            "a request naming {count} reply buffers ends its payload with their \
             {REMOTE_DESCRIPTOR_BYTES}-byte descriptors{}, {named} bytes; this payload has {} bytes",
            if scatter { " and their count" } else { "" },
            payload.len()
        ));
    };
    let remotes = payload[own_len..payload.len() - tail]
        .chunks_exact(REMOTE_DESCRIPTOR_BYTES)
        .map(|descriptor| {
            let remote = crate::rdma::decode_descriptor(descriptor)?;
            if remote.len == 0 {
                return Err("a reply buffer of 0 bytes".to_string());
            }
            Ok(remote)
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((
        ReplySink {
            link: link.clone(),
            remotes,
            scatter,
        },
        payload.slice(..own_len),
    ))
}

/// The reply frame of a request that named buffers for the reply's
/// payload: the payload is RDMA WRITten into them first (one work request
/// per part: back to back into one buffer, or each part into its own), and
/// the frame carries only the count. A payload that does not fit what the
/// call named (larger than its one buffer; not one part per buffer, each
/// within it) travels inline, never written outside what the call named, as
/// does an error's message.
async fn reply_written(method: u16, request_id: u64, reply: Reply, sink: ReplySink) -> OutFrame {
    let total = reply.payload_len();
    if reply.status != Status::Ok || total == 0 {
        return reply_frame(method, request_id, reply, 0);
    }
    let moved = crate::metrics::payload_moved(method);
    let fits = if sink.scatter {
        reply.payload.is_empty()
            && reply.parts.len() == sink.remotes.len()
            && reply
                .parts
                .iter()
                .zip(&sink.remotes)
                .all(|(part, remote)| part.len() <= remote.len as usize)
    } else {
        total <= sink.remotes[0].len as usize
    };
    if !fits {
        moved.copied(total);
        return reply_frame(method, request_id, reply, 0);
    }
    let Reply {
        body,
        payload,
        mut parts,
        ..
    } = reply;
    if !payload.is_empty() {
        parts.insert(0, payload);
    }
    let written = if sink.scatter {
        sink.link.write_scattered(&parts, &sink.remotes).await
    } else {
        sink.link.write_parts(&parts, sink.remotes[0]).await
    };
    if let Err(error) = written {
        // The connection is broken by now (a failed work request breaks
        // it): the client sees it close, or this error if it still can.
        return OutFrame::error(
            method,
            request_id,
            Status::Internal,
            &format!("writing the reply's {total} bytes into the client's buffer: {error}"),
        );
    }
    moved.one_sided(total);
    // The bytes were written before this frame is sent, and RC delivers in
    // order: the client finds them in place when the frame arrives.
    let count = Bytes::copy_from_slice(&(total as u32).to_le_bytes());
    OutFrame::with_flags(
        Kind::Response,
        method,
        Status::Ok,
        request_id,
        flyfs_proto::frame::FLAG_PAYLOAD_WRITTEN,
        body,
        count,
    )
    .unwrap_or_else(|error| {
        OutFrame::error(method, request_id, Status::Internal, &error.to_string())
    })
}

/// The remote payload a `FLAG_PAYLOAD_REMOTE` request names, checked: only
/// on an RDMA connection, a well-formed descriptor, no longer than the
/// payloads this server takes inline. What the descriptor can make this
/// server do is bounded there: one RDMA READ of at most that many bytes,
/// over this client's own queue pair (so it reaches only memory that client
/// registered; a bad key breaks only its connection), into a buffer the
/// service sized and the budgets paid for.
fn remote_payload(
    frame: &Frame,
    descriptor: &[u8],
    link: Option<&Arc<crate::rdma::Link>>,
    payload_bytes_max: u32,
) -> Result<crate::payload::RemotePayload, String> {
    let Some(link) = link else {
        return Err(
            "a remote (one-sided) payload on a connection that is not on the RDMA transport"
                .to_string(),
        );
    };
    let remote = crate::rdma::decode_descriptor(descriptor)?;
    if remote.len == 0 || remote.len > payload_bytes_max {
        return Err(format!(
            "a remote payload of {} bytes (1 to {payload_bytes_max} allowed)",
            remote.len
        ));
    }
    Ok(crate::payload::RemotePayload {
        link: link.clone(),
        remote,
        method: frame.header.method,
    })
}

/// Counts one answered request, if metrics are on.
fn record(
    metrics: Option<&crate::metrics::MethodMetrics>,
    started: Option<tokio::time::Instant>,
    request_bytes: usize,
    reply: &Reply,
) {
    if let (Some(metrics), Some(started)) = (metrics, started) {
        metrics.record(
            started.elapsed(),
            request_bytes,
            reply.body.len() + reply.payload_len(),
            reply.status != Status::Ok,
        );
    }
}

/// The frame of `reply`, with header `flags` (`FLAG_PAYLOAD_UNCHECKED` on a
/// TLS connection: see `serve_frames`).
fn reply_frame(method: u16, request_id: u64, reply: Reply, flags: u16) -> OutFrame {
    // Inline, the parts follow the payload as they are, each written from
    // its own buffer (a batched read's chunks are never joined).
    let more = reply
        .parts
        .into_iter()
        .filter(|part| !part.is_empty())
        .collect();
    OutFrame::with_parts(
        Kind::Response,
        method,
        reply.status,
        request_id,
        flags,
        reply.body,
        reply.payload,
        more,
    )
    .unwrap_or_else(|error| {
        OutFrame::error(method, request_id, Status::Internal, &error.to_string())
    })
}

/// The message a panic was raised with, if it was a string: what a task
/// that catches a handler's panic reports (here, and the FUSE daemon's
/// request tasks).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = payload.downcast_ref::<&'static str>() {
        message
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message
    } else {
        "(a panic without a message)"
    }
}

fn panic_reply(method: u16, request_id: u64, error: JoinError, peer: &str) -> OutFrame {
    let reason = if error.is_panic() {
        let panic = error.into_panic();
        format!(
            "handler of method {method} panicked: {}",
            panic_message(&*panic)
        )
    } else {
        format!("handler of method {method} was cancelled")
    };
    tracing::error!(%peer, request_id, "{reason}");
    OutFrame::error(method, request_id, Status::Internal, &reason)
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut replies: mpsc::Receiver<(OutFrame, Held)>,
    peer: &str,
) {
    while let Some((frame, held)) = replies.recv().await {
        if let Err(error) = frame_io::write_frame(&mut writer, frame).await {
            tracing::debug!(%peer, %error, "connection write failed");
            return;
        }
        drop(held);
    }
    // Everything is written: send FIN so the client reads the last reply and
    // then end of stream.
    let _ = writer.shutdown().await;
}

/// "role client may not call storage.Forward (method 401)".
fn forbidden_message(peer: &Peer, method: u16) -> String {
    let name = flyfs_proto::wire::METHODS
        .iter()
        .find(|(id, _)| *id == method)
        .map(|(_, name)| *name);
    let role = peer.identity.role();
    match name {
        Some(name) => format!("role {role} may not call {name} (method {method})"),
        None => format!("role {role} may not call method {method}"),
    }
}

/// Why a connection was refused before any request was read.
#[derive(Debug)]
enum Refusal {
    /// The peer sent a flyfs frame header in plaintext.
    Plaintext,
    /// The connection failed before the handshake completed.
    Io(io::Error),
    /// rustls refused the handshake (no client certificate, a certificate
    /// from another CA, a protocol error).
    Handshake(io::Error),
    HandshakeTimeout(Duration),
    /// The certificate chains to our CA but names no valid flyfs identity.
    Identity(tls::PeerIdentityError),
    /// The RDMA set-up after authentication failed (a peer on the TCP
    /// transport, malformed parameters, a device error).
    Rdma(flyfs_rdma::RdmaError),
    /// The identity is of another cluster.
    Cluster(String),
    /// The server already has `connections_max` connections.
    ConnectionsMax(usize),
    /// A header's bytes did not all arrive within `header_timeout`.
    HeaderTimeout(Duration),
    /// A body and payload did not arrive by their deadline.
    BodyTimeout {
        bytes: u64,
        deadline: Duration,
    },
}

impl Refusal {
    fn log(&self, refusals: &RefusalLog, peer: &str) {
        refusals.log(
            self.cause(),
            &peer,
            &format_args!("connection refused: {self}"),
        );
    }

    /// The cause, as rate limiting groups refusals.
    fn cause(&self) -> &'static str {
        match self {
            Refusal::Plaintext => "plaintext",
            Refusal::Io(_) => "io",
            Refusal::Handshake(_) => "handshake",
            Refusal::HandshakeTimeout(_) => "handshake timeout",
            Refusal::Identity(_) => "identity",
            Refusal::Rdma(_) => "rdma",
            Refusal::Cluster(_) => "cluster",
            Refusal::ConnectionsMax(_) => "connections_max",
            Refusal::HeaderTimeout(_) => "header_timeout",
            Refusal::BodyTimeout { .. } => "body_timeout",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Plaintext => {
                f.write_str("a plaintext flyfs client (answered Unauthenticated)")
            }
            Refusal::Io(error) => write!(f, "connection failed before the TLS handshake: {error}"),
            Refusal::Handshake(error) => write!(f, "TLS handshake failed: {error}"),
            Refusal::HandshakeTimeout(after) => {
                write!(f, "no TLS handshake within {after:?}")
            }
            Refusal::Identity(error) => write!(f, "client certificate refused: {error}"),
            Refusal::Rdma(error) => write!(f, "RDMA connection set-up failed: {error}"),
            Refusal::Cluster(reason) => write!(f, "client certificate refused: {reason}"),
            Refusal::ConnectionsMax(max) => {
                write!(f, "closed at once: over the limit connections_max = {max}")
            }
            Refusal::HeaderTimeout(after) => write!(
                f,
                "closed: a frame header did not arrive whole within header_timeout = {after:?}"
            ),
            Refusal::BodyTimeout { bytes, deadline } => write!(
                f,
                "closed: {bytes} bytes of body and payload did not arrive within {deadline:?} \
                 (body_timeout_base + bytes / body_bytes_per_s_min)"
            ),
        }
    }
}

/// The body of the plaintext `Unauthenticated` frame.
pub const PLAINTEXT_REFUSAL: &str = "this flyfs server accepts only TLS connections \
    authenticated by a certificate of the cluster CA; configure the client's [tls] \
    credentials (ca, cert, key)";

/// Reads the first bytes of a connection: a flyfs frame header in plaintext
/// gets the `Unauthenticated` frame; anything else is handed to rustls (with
/// those bytes put back in front) as a TLS handshake.
async fn accept<T>(
    mut stream: T,
    credentials: &Credentials,
) -> Result<(tokio_rustls::server::TlsStream<Prefixed<T>>, Identity), Refusal>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut first = [0u8; 4];
    stream.read_exact(&mut first).await.map_err(Refusal::Io)?;
    if first == frame::MAGIC.to_le_bytes() {
        let reply = OutFrame::error(0, 0, Status::Unauthenticated, PLAINTEXT_REFUSAL);
        if frame_io::write_frame(&mut stream, reply).await.is_ok() {
            let _ = stream.flush().await;
            let _ = stream.shutdown().await;
            drain(&mut stream).await;
        }
        return Err(Refusal::Plaintext);
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(credentials.server_config());
    let stream = acceptor
        .accept(Prefixed::new(first, stream))
        .await
        .map_err(Refusal::Handshake)?;
    // rustls verified the chain; the identity is ours to check.
    let certificate = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(Refusal::Identity(tls::PeerIdentityError::Missing))?;
    let identity = tls::peer_identity(certificate).map_err(Refusal::Identity)?;
    credentials
        .check_client(&identity)
        .map_err(Refusal::Cluster)?;
    Ok((stream, identity))
}

/// A stream with a few bytes already read from it put back in front.
#[derive(Debug)]
struct Prefixed<T> {
    prefix: [u8; 4],
    /// How many bytes of `prefix` have been read again.
    consumed: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    fn new(prefix: [u8; 4], inner: T) -> Prefixed<T> {
        Prefixed {
            prefix,
            consumed: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.consumed < this.prefix.len() {
            let rest = &this.prefix[this.consumed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.consumed += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
