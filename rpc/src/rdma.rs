//! The RDMA transport: the rpc server and client run unchanged over an RDMA
//! connection set up on top of their authenticated TLS connection.
//!
//! Set-up (docs/rdma-transport.md): the TCP connection is made and mutual
//! TLS completes, and the peer's identity is checked, exactly as for the TCP
//! transport. Only then do the two sides exchange their RDMA parameters
//! (flyfs-rdma's [`Endpoint`]: QP number, PSN, GID, receive ring shape)
//! inside the TLS session: the client sends first, the server answers after
//! checking the client's. Both connect their queue pairs, and from then on
//! frames travel as SEND/RECV messages under credits; the TLS session stays
//! open, silent, as the connection's lifeline: when either side closes it,
//! the other tears its RDMA connection down too.
//!
//! A server with an RDMA device serves clients of both transports: the
//! first 4 bytes inside the session are either the RDMA parameters' magic
//! or a frame header, and the client's choice is followed (so the admin
//! tool, on TCP, still reaches every daemon). A server without one answers
//! an RDMA client's parameters as a bad frame header, with an error frame,
//! which the client recognises after 8 bytes and reports as "the server is
//! on the TCP transport", not as a hang.
//!
//! Frames ride the messages as a byte stream, cut at the peer's message
//! size, through an in-memory pipe: the server's and client's frame
//! machinery (deadlines, budgets, multiplexing) works on it as on a socket.
//!
//! Bulk payloads move one-sided when they can ([`Link`]): a sender whose
//! payload lies in a buffer pool arena registered on the device at start
//! sends a 16-byte descriptor of it instead of the bytes
//! (`FLAG_PAYLOAD_REMOTE`), and the receiver's `Payload::fetch_into` pulls
//! the bytes with an RDMA READ straight into its own registered buffer.
//! Other payloads travel inline, copied through the message slots.
//!
//! Reply payloads move the other way round: a client that expects bulk
//! bytes back (a chunk read) lends a registered buffer from its reply pool
//! ([`RdmaTransport::lend_replies_from`]) and names it in the request
//! (`FLAG_REPLY_SINK`); the server RDMA WRITEs the reply's payload into it,
//! one work request per part (per chunk of a batched read), and only then
//! sends the reply, which says how many bytes it wrote
//! (`FLAG_PAYLOAD_WRITTEN`). A reply that does not fit the buffer named
//! travels inline instead: the server never writes outside it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use flyfs_proto::frame::{self, OutFrame, REMOTE_DESCRIPTOR_BYTES, Status, WRITTEN_COUNT_BYTES};
use flyfs_rdma::handshake::{ENCODED_BYTES, MAGIC};
pub use flyfs_rdma::{Arena, ArenaRegistration, ConnectionConfig, RdmaError};
use flyfs_rdma::{Connection, Device, Endpoint, PendingConnection, RemoteBuffer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::Notify;

use crate::frame_io;

/// Which end of the connection we are: the client speaks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

/// What a process needs to open RDMA connections: the device (with its
/// protection domain) and the shape of each connection. Cheap to clone.
#[derive(Clone)]
pub struct RdmaTransport {
    device: Arc<Device>,
    config: ConnectionConfig,
    bounce: Arc<Bounce>,
    reply_buffers: Option<ReplyBuffers>,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("device", &self.device.name())
            .field("config", &self.config)
            .field("lends_reply_buffers", &self.reply_buffers.is_some())
            .finish()
    }
}

/// A buffer a client lends the server for a reply's payload: memory inside
/// an arena registered with [`RdmaTransport::register_arenas`] (a buffer
/// pool's `DmaBuf`), handed to one call at a time.
pub trait ReplyBuffer: std::ops::DerefMut<Target = [u8]> + Send + Sync + 'static {}

impl<T: std::ops::DerefMut<Target = [u8]> + Send + Sync + 'static> ReplyBuffer for T {}

/// Where a client takes its reply buffers from: a buffer of at least the
/// bytes asked for (a pool that ran dry may hand out heap memory, which is
/// then not lent, and the reply travels inline).
pub type ReplyBuffers = Arc<dyn Fn(usize) -> Box<dyn ReplyBuffer> + Send + Sync>;

/// A lent reply buffer as the owner of the `Bytes` the caller gets.
struct Lent(Box<dyn ReplyBuffer>);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Registered regions for one-sided payloads whose local buffer is outside
/// the registered arenas: registered on first need, then reused, a bounded
/// number kept per power-of-two size (so steady traffic registers nothing).
#[derive(Debug, Default)]
struct Bounce {
    free: parking_lot::Mutex<std::collections::BTreeMap<usize, Vec<Arc<flyfs_rdma::MemoryRegion>>>>,
}

/// Idle bounce regions kept per size.
const BOUNCE_KEPT_PER_SIZE: usize = 4;

impl Bounce {
    fn take(
        &self,
        device: &Device,
        len: usize,
    ) -> Result<Arc<flyfs_rdma::MemoryRegion>, RdmaError> {
        let size = len.next_power_of_two().max(4096);
        if let Some(region) = self.free.lock().get_mut(&size).and_then(Vec::pop) {
            return Ok(region);
        }
        device.alloc_region(size, flyfs_rdma::Access::Local)
    }

    fn give_back(&self, region: Arc<flyfs_rdma::MemoryRegion>) {
        let mut free = self.free.lock();
        let kept = free.entry(region.len()).or_default();
        if kept.len() < BOUNCE_KEPT_PER_SIZE {
            kept.push(region);
        }
    }
}

impl RdmaTransport {
    /// Opens `device_name`; fails at once, with the reason, when rdma-core
    /// is missing, the device does not exist (the error lists those that
    /// do) or its port is down.
    pub fn open(
        device_name: &str,
        gid_index: u8,
        config: ConnectionConfig,
    ) -> Result<RdmaTransport, RdmaError> {
        Ok(RdmaTransport {
            device: Device::open(device_name, gid_index)?,
            config,
            bounce: Arc::default(),
            reply_buffers: None,
        })
    }

    /// Makes this transport's clients lend reply buffers from `alloc`
    /// (a registered buffer pool: register its arenas first), so that
    /// servers RDMA WRITE read data straight into them. Without it, reply
    /// payloads travel inline, copied through the message slots.
    pub fn lend_replies_from(
        mut self,
        alloc: impl Fn(usize) -> Box<dyn ReplyBuffer> + Send + Sync + 'static,
    ) -> RdmaTransport {
        self.reply_buffers = Some(Arc::new(alloc));
        self
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Registers an owner's buffer pool arenas for one-sided payloads,
    /// once, at start (flyfs-rdma's `Device::register_arenas`).
    pub fn register_arenas(&self, owner: Arc<dyn flyfs_rdma::Arena>) -> Result<(), RdmaError> {
        self.device.register_arenas(owner)
    }

    /// Registers `owner`'s arenas until the returned guard drops (an
    /// application's shared buffer, for its life): a landing whose buffers
    /// all lie in registered arenas is lent to the server for its reply's
    /// parts (`Landing::part_buffers`), which it RDMA WRITEs straight in.
    pub fn register_arena(
        &self,
        owner: Arc<dyn flyfs_rdma::Arena>,
    ) -> Result<flyfs_rdma::ArenaRegistration, RdmaError> {
        self.device.register_arena(owner)
    }

    /// Sets up the RDMA connection over an authenticated stream and returns
    /// the byte stream the frame machinery runs on. The authenticated stream
    /// moves into the connection's task, as its lifeline.
    pub(crate) async fn upgrade<T>(
        &self,
        mut stream: T,
        side: Side,
    ) -> Result<(DuplexStream, Arc<Link>), RdmaError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let pending = PendingConnection::new(&self.device, self.config)?;
        let local = pending.local_endpoint().encode();
        let io_error = |what: &str, error: std::io::Error| {
            RdmaError::Handshake(format!("{what} the RDMA parameters: {error}"))
        };
        let peer = match side {
            Side::Client => {
                stream
                    .write_all(&local)
                    .await
                    .map_err(|error| io_error("sending", error))?;
                stream
                    .flush()
                    .await
                    .map_err(|error| io_error("sending", error))?;
                let peer = read_parameters(&mut stream, side).await?;
                Endpoint::decode(&peer)?
            }
            Side::Server => {
                let peer = read_parameters(&mut stream, side)
                    .await
                    .and_then(|peer| Endpoint::decode(&peer));
                let peer = match peer {
                    Ok(peer) => peer,
                    Err(error) => {
                        // Tell the client why, then close.
                        let refusal = OutFrame::error(0, 0, Status::BadRequest, &error.to_string());
                        let _ = frame_io::write_frame(&mut stream, refusal).await;
                        let _ = stream.shutdown().await;
                        return Err(error);
                    }
                };
                stream
                    .write_all(&local)
                    .await
                    .map_err(|error| io_error("sending", error))?;
                stream
                    .flush()
                    .await
                    .map_err(|error| io_error("sending", error))?;
                peer
            }
        };
        let connection = Arc::new(pending.connect(&peer)?);
        // Room for a few messages each way: backpressure reaches the
        // peer's credits when the frame machinery stops reading.
        let pipe_bytes =
            4 * (connection.peer_message_bytes_max()).max(self.config.message_bytes_max as usize);
        let (ours, theirs) = tokio::io::duplex(pipe_bytes);
        tokio::spawn(pump(connection.clone(), theirs, stream));
        let link = Arc::new(Link {
            connection,
            device: self.device.clone(),
            bounce: self.bounce.clone(),
            reply_buffers: self.reply_buffers.clone(),
            one_sided_max: self.config.one_sided_max.max(1) as usize,
        });
        Ok((ours, link))
    }
}

/// One authenticated RDMA connection as the frame machinery sees it: what
/// it needs to describe local payloads to the peer and to pull the peer's
/// payloads. Held by the connection's requests; the queue pair lives until
/// the last of them is done.
pub struct Link {
    connection: Arc<Connection>,
    device: Arc<Device>,
    bounce: Arc<Bounce>,
    reply_buffers: Option<ReplyBuffers>,
    /// Work requests one batch of RDMA WRITEs may post at once.
    one_sided_max: usize,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("connection", &self.connection)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Takes the RDMA connection down as the rpc connection over it closes:
    /// its queue pair moves to the error state at once, so the peer's
    /// one-sided requests are no longer served. Logged at debug level (the
    /// rpc connection logs why it closed).
    pub(crate) fn close(&self, reason: String) {
        self.connection.close(reason);
    }

    /// The descriptor of `payload` if it lies in a registered arena (the
    /// caller keeps `payload` alive until the peer's reply); `None` when it
    /// must travel inline.
    pub(crate) fn describe(&self, payload: &Bytes) -> Option<Bytes> {
        if payload.is_empty() {
            return None;
        }
        let len = u32::try_from(payload.len()).ok()?;
        let (region, offset) = self.device.find_arena(payload.as_ptr(), payload.len())?;
        let remote = RemoteBuffer::of(&region, offset, len).ok()?;
        Some(Bytes::copy_from_slice(&encode_descriptor(remote)))
    }

    /// A registered buffer of `len` bytes for a reply's payload, with the
    /// descriptor the request names it by; `None` when this client lends
    /// none (no reply pool, or the pool handed out memory outside its
    /// arenas), and the reply comes inline.
    pub(crate) fn reply_sink(
        &self,
        len: usize,
    ) -> Option<(Box<dyn ReplyBuffer>, [u8; REMOTE_DESCRIPTOR_BYTES])> {
        let alloc = self.reply_buffers.as_ref()?;
        let len_wire = u32::try_from(len).ok().filter(|len| *len > 0)?;
        let buffer = alloc(len);
        if buffer.len() < len {
            return None;
        }
        let (region, offset) = self.device.find_arena(buffer.as_ptr(), len)?;
        let remote = RemoteBuffer::of(&region, offset, len_wire).ok()?;
        Some((buffer, encode_descriptor(remote)))
    }

    /// The descriptors of `buffers` followed by their count, as a
    /// `FLAG_REPLY_SCATTER` request's payload ends; `None` when one of them
    /// is empty or outside the registered arenas, or there are none or too
    /// many (the reply then comes another way).
    pub(crate) fn scatter_sink(&self, buffers: &[(*const u8, usize)]) -> Option<Bytes> {
        if buffers.is_empty() || buffers.len() > frame::REPLY_BUFFERS_MAX {
            return None;
        }
        let mut out = Vec::with_capacity(
            buffers.len() * REMOTE_DESCRIPTOR_BYTES + frame::REPLY_BUFFER_COUNT_BYTES,
        );
        for &(ptr, len) in buffers {
            let len_wire = u32::try_from(len).ok().filter(|len| *len > 0)?;
            let (region, offset) = self.device.find_arena(ptr, len)?;
            let remote = RemoteBuffer::of(&region, offset, len_wire).ok()?;
            out.extend_from_slice(&encode_descriptor(remote));
        }
        out.extend_from_slice(&(buffers.len() as u32).to_le_bytes());
        Some(Bytes::from(out))
    }

    /// The bytes a `FLAG_PAYLOAD_WRITTEN` reply says the server wrote into
    /// `sink`, as the caller's payload; an error when the count is
    /// malformed or larger than the buffer lent (a server that broke the
    /// protocol).
    pub(crate) fn written(sink: Box<dyn ReplyBuffer>, count: &[u8]) -> Result<Bytes, String> {
        let count: [u8; WRITTEN_COUNT_BYTES] = count.try_into().map_err(|_| {
            format!(
                "a written reply carries a {WRITTEN_COUNT_BYTES}-byte count, this one {} bytes",
                count.len()
            )
        })?;
        let count = u32::from_le_bytes(count) as usize;
        if count > sink.len() {
            return Err(format!(
                "the server says it wrote {count} bytes into a buffer of {}",
                sink.len()
            ));
        }
        Ok(Bytes::from_owner(Lent(sink)).slice(..count))
    }

    /// Writes `parts` one after another into the client's `sink`, from its
    /// first byte, by RDMA WRITE: one work request per part (a batched
    /// read's chunks), at most `one_sided_max` posted at once. The caller
    /// has checked that they fit; this checks again, so nothing is ever
    /// written outside what the call named.
    pub(crate) async fn write_parts(
        &self,
        parts: &[Bytes],
        sink: RemoteBuffer,
    ) -> Result<(), RdmaError> {
        let total: u64 = parts.iter().map(|part| part.len() as u64).sum();
        if total > u64::from(sink.len) {
            return Err(RdmaError::OutOfRegion {
                offset: 0,
                len: total as usize,
                region_len: sink.len as usize,
            });
        }
        let mut at = 0u64;
        let placed = parts.iter().map(|part| {
            let remote = RemoteBuffer {
                addr: sink.addr + at,
                rkey: sink.rkey,
                len: part.len() as u32,
            };
            at += part.len() as u64;
            (part, remote)
        });
        self.write_placed(placed).await
    }

    /// Writes part `i` into the start of the client's buffer `i`, by RDMA
    /// WRITE, one work request per non-empty part. The caller has checked
    /// that there is one buffer per part and each part fits its buffer;
    /// this checks again, so nothing is ever written outside what the call
    /// named.
    pub(crate) async fn write_scattered(
        &self,
        parts: &[Bytes],
        sinks: &[RemoteBuffer],
    ) -> Result<(), RdmaError> {
        if parts.len() != sinks.len() {
            return Err(RdmaError::OutOfRegion {
                offset: 0,
                len: parts.len(),
                region_len: sinks.len(),
            });
        }
        if let Some((part, sink)) = parts
            .iter()
            .zip(sinks)
            .find(|(part, sink)| part.len() > sink.len as usize)
        {
            return Err(RdmaError::OutOfRegion {
                offset: 0,
                len: part.len(),
                region_len: sink.len as usize,
            });
        }
        let placed = parts.iter().zip(sinks).map(|(part, sink)| {
            (
                part,
                RemoteBuffer {
                    len: part.len() as u32,
                    ..*sink
                },
            )
        });
        self.write_placed(placed).await
    }

    /// Posts one RDMA WRITE per non-empty part to the remote range beside
    /// it, at most `one_sided_max` at once. A part outside the registered
    /// arenas goes through a bounce region (copied once, here).
    async fn write_placed<'a>(
        &self,
        placed: impl Iterator<Item = (&'a Bytes, RemoteBuffer)>,
    ) -> Result<(), RdmaError> {
        let mut entries = Vec::with_capacity(self.one_sided_max);
        let mut bounced = Vec::new();
        for (part, remote) in placed.filter(|(part, _)| !part.is_empty()) {
            match self.device.find_arena(part.as_ptr(), part.len()) {
                Some((region, offset)) => entries.push((region, offset, remote)),
                None => {
                    let region = self.bounce.take(&self.device, part.len())?;
                    region.write(0, part)?;
                    bounced.push(region.clone());
                    entries.push((region, 0, remote));
                }
            }
            if entries.len() == self.one_sided_max {
                self.connection.write_batch(&entries).await?;
                entries.clear();
            }
        }
        if !entries.is_empty() {
            self.connection.write_batch(&entries).await?;
        }
        // Reused only after every WRITE from them completed (a failure
        // returned above, and the regions go with the broken connection).
        drop(entries);
        for region in bounced {
            self.bounce.give_back(region);
        }
        Ok(())
    }

    /// Pulls the peer's `remote` bytes into `dst` with one RDMA READ. `dst`
    /// must lie in a registered arena: a one-sided transfer lands only in
    /// registered memory, and registering per transfer is what the arenas
    /// exist to avoid.
    pub(crate) async fn read_into(
        &self,
        remote: RemoteBuffer,
        dst: &mut [u8],
    ) -> Result<(), RdmaError> {
        if let Some((region, offset)) = self.device.find_arena(dst.as_ptr(), dst.len()) {
            return self.connection.read(&region, offset, remote).await;
        }
        // A destination outside the arenas (a pool that ran dry and fell
        // back to the heap): through a bounce region, then copied.
        let region = self.bounce.take(&self.device, dst.len())?;
        let result = self.connection.read(&region, 0, remote).await;
        if result.is_ok() {
            region.read(0, dst)?;
        }
        // A region a failed READ may still be written by is not reused: the
        // connection is broken, and the region goes when its last request
        // (holding it) is flushed.
        if result.is_ok() {
            self.bounce.give_back(region);
        }
        result
    }
}

/// The 16 bytes that stand for a payload in a `FLAG_PAYLOAD_REMOTE` frame.
pub(crate) fn encode_descriptor(remote: RemoteBuffer) -> [u8; REMOTE_DESCRIPTOR_BYTES] {
    let mut out = [0u8; REMOTE_DESCRIPTOR_BYTES];
    out[0..8].copy_from_slice(&remote.addr.to_le_bytes());
    out[8..12].copy_from_slice(&remote.rkey.to_le_bytes());
    out[12..16].copy_from_slice(&remote.len.to_le_bytes());
    out
}

/// Reads a descriptor; a payload of any other size is the peer's error.
pub(crate) fn decode_descriptor(bytes: &[u8]) -> Result<RemoteBuffer, String> {
    let bytes: &[u8; REMOTE_DESCRIPTOR_BYTES] = bytes.try_into().map_err(|_| {
        format!(
            "a remote payload is a {REMOTE_DESCRIPTOR_BYTES}-byte descriptor, this one has {} bytes",
            bytes.len()
        )
    })?;
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&bytes[0..8]);
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    Ok(RemoteBuffer {
        addr: u64::from_le_bytes(addr),
        rkey: word(8),
        len: word(12),
    })
}

/// Reads the peer's parameters, checking the magic first so that a peer on
/// the TCP transport (a frame header) is recognised after 8 bytes.
async fn read_parameters<T: AsyncRead + Unpin>(
    stream: &mut T,
    side: Side,
) -> Result<[u8; ENCODED_BYTES], RdmaError> {
    let mut bytes = [0u8; ENCODED_BYTES];
    let read_error = |error: std::io::Error| {
        RdmaError::Handshake(format!("reading the peer's RDMA parameters: {error}"))
    };
    stream
        .read_exact(&mut bytes[..MAGIC.len()])
        .await
        .map_err(read_error)?;
    if bytes[..MAGIC.len()] != MAGIC {
        let tcp_frame = bytes[..4] == frame::MAGIC.to_le_bytes();
        return Err(RdmaError::Handshake(match (side, tcp_frame) {
            (Side::Server, true) => {
                "the client is on the TCP transport (it sent a frame, not RDMA parameters)".into()
            }
            (Side::Client, true) => {
                "the server is on the TCP transport (it answered with a frame, not RDMA \
                 parameters); set this client's transport to \"tcp\""
                    .into()
            }
            _ => "the peer sent neither RDMA parameters nor a flyfs frame".into(),
        }));
    }
    stream
        .read_exact(&mut bytes[MAGIC.len()..])
        .await
        .map_err(read_error)?;
    Ok(bytes)
}

/// The first byte of the notice a side sends on the lifeline when it
/// closes: followed by the count of data messages it sent on the RDMA
/// connection (8 bytes, little-endian), all of which its peer's device has
/// acknowledged by then.
const DRAINED: u8 = b'D';
const NOTICE_BYTES: usize = 9;
/// `announced` before the peer's notice arrives.
const NOT_ANNOUNCED: u64 = u64::MAX;

/// Moves bytes between the frame machinery's pipe and the RDMA connection
/// until the connection closes, then breaks it and closes the lifeline.
///
/// Closing keeps every byte written before it (docs/rdma-transport.md,
/// "Closing"): when the frame machinery closes its side of the pipe, the
/// pump posts what is left in it, waits (bounded) until the peer's device
/// acknowledged every message ([`Connection::drain`]), and only then sends
/// the drained notice on the lifeline and breaks the queue pair. A pump
/// that reads its peer's notice hands on exactly the messages announced
/// ([`Connection::recv_announced`], bounded), ends the frames' stream and
/// closes too. A lifeline closed without a notice, anything else on it, or
/// a broken connection ends the pump at once, as a reset would a socket.
async fn pump<T>(connection: Arc<Connection>, pipe: DuplexStream, lifeline: T)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut from_frames, mut to_frames) = tokio::io::split(pipe);
    let (mut lifeline_in, mut lifeline_out) = tokio::io::split(lifeline);
    let message_bytes_max = connection.peer_message_bytes_max();
    let completion_timeout = connection.completion_timeout();
    // The peer's notice: how many data messages it sent in all.
    let announced = AtomicU64::new(NOT_ANNOUNCED);
    let notice_arrived = Notify::new();
    let send_and_drain = async {
        let mut buffer = vec![0u8; message_bytes_max];
        loop {
            let filled = match from_frames.read(&mut buffer).await {
                Ok(0) => break,
                Ok(filled) => filled,
                Err(error) => return Err(format!("reading frames to send: {error}")),
            };
            loop {
                // Posted, not waited for: messages stream up to the credits.
                match connection.send_posted(&buffer[..filled]).await {
                    Ok(()) => break,
                    // Waiting for credits past the completion timeout: the
                    // peer's reader is held back by its budgets, which is
                    // backpressure, not failure. Nothing was posted; wait on.
                    Err(RdmaError::CompletionTimeout { .. }) if connection.broken().is_none() => {}
                    Err(error) => return Err(error.to_string()),
                }
            }
        }
        // The local side closed: everything it wrote is posted. Announce it
        // once the peer's device holds all of it.
        connection
            .drain()
            .await
            .map_err(|error| format!("closing: {error}"))?;
        let mut notice = [0u8; NOTICE_BYTES];
        notice[0] = DRAINED;
        notice[1..].copy_from_slice(&connection.data_messages_sent().to_le_bytes());
        lifeline_out
            .write_all(&notice)
            .await
            .map_err(|error| format!("sending the drained notice: {error}"))?;
        lifeline_out
            .flush()
            .await
            .map_err(|error| format!("sending the drained notice: {error}"))?;
        Ok::<_, String>("this side closed, everything it sent was received".to_string())
    };
    let outbound = async {
        let result = send_and_drain.await;
        if result.is_err() && announced.load(Ordering::Acquire) != NOT_ANNOUNCED {
            // The peer closed and announced what it sent: handing that on
            // decides the end, not our failing to send into a connection
            // the peer is tearing down.
            std::future::pending::<()>().await;
        }
        result
    };
    let inbound = async {
        // False once the frame machinery stopped reading for good: what
        // still arrives is taken (so the peer's credits return) and dropped,
        // as a closed socket drops what reaches it.
        let mut frames_open = true;
        let mut deadline = None;
        loop {
            let waiting = notice_arrived.notified();
            tokio::pin!(waiting);
            waiting.as_mut().enable();
            let total = announced.load(Ordering::Acquire);
            let message = if total == NOT_ANNOUNCED {
                let message = tokio::select! {
                    // Cancel-safe: a message is taken only when it returns.
                    message = connection.recv() => message.map(Some),
                    () = &mut waiting => continue,
                };
                match message {
                    // The peer's tearing down after its notice can break
                    // the connection before we read the notice: deliver
                    // what it announced all the same.
                    Err(_) if announced.load(Ordering::Acquire) != NOT_ANNOUNCED => continue,
                    message => message,
                }
            } else {
                let deadline = *deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + completion_timeout);
                connection.recv_announced(total, deadline).await
            };
            match message {
                Ok(Some(message)) => {
                    if frames_open && to_frames.write_all(&message).await.is_err() {
                        frames_open = false;
                    }
                }
                Ok(None) => {
                    // Everything the peer sent is handed on: end the
                    // frames' stream after it, as a FIN would.
                    let _ = to_frames.shutdown().await;
                    return Ok("the peer closed, everything it sent was handed on".to_string());
                }
                Err(error) => return Err(error.to_string()),
            }
        }
    };
    let watch = async {
        let mut notice = [0u8; NOTICE_BYTES];
        let read = match lifeline_in.read(&mut notice[..1]).await {
            Ok(0) => Err("the peer closed the connection".to_string()),
            Ok(_) if notice[0] == DRAINED => lifeline_in
                .read_exact(&mut notice[1..])
                .await
                .map_err(|error| format!("reading the peer's drained notice: {error}")),
            Ok(_) => {
                Err("the peer sent bytes on the TLS session after the RDMA set-up".to_string())
            }
            Err(error) => Err(format!("the TLS session failed: {error}")),
        };
        if let Err(reason) = read {
            return reason;
        }
        let mut total = [0u8; 8];
        total.copy_from_slice(&notice[1..]);
        announced.store(u64::from_le_bytes(total), Ordering::Release);
        notice_arrived.notify_one();
        // From here the inbound side decides when the pump ends: the peer
        // may close the lifeline at once, and whatever the lifeline does
        // next changes nothing.
        std::future::pending().await
    };
    let reason = tokio::select! {
        reason = outbound => reason.unwrap_or_else(|reason| reason),
        reason = inbound => reason.unwrap_or_else(|reason| reason),
        reason = watch => reason,
    };
    tracing::debug!(%reason, "RDMA connection closing");
    connection.break_with(reason);
    let _ = lifeline_out.shutdown().await;
}
