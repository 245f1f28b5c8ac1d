//! End-to-end tests of the rpc layer over real TCP on 127.0.0.1: the
//! transport-independent suite (suite/mod.rs, which guest_rdma.rs runs over
//! RDMA too), and raw sockets playing a misbehaving peer (inside an
//! authenticated TLS session, as any peer must be; what happens without one
//! is in auth.rs).

#[macro_use]
mod suite;

use std::time::Duration;

use bytes::Bytes;
use flyfs_proto::frame::{self, FrameLimits, Kind, OutFrame};
use flyfs_proto::ids::NodeId;
use flyfs_proto::{Method, Ping, PingReq, Status, codec};
use flyfs_rpc::frame_io::{read_frame, write_frame};
use flyfs_rpc::testing;
use flyfs_rpc::{Listener, Network, RpcError, ServerConfig, Tcp};
use suite::{Echo, EchoRsp, Fixture, echo, opts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

suite_tests!(Fixture::tcp());

/// A raw TLS session with a client's credentials: a peer that passed
/// authentication and then misbehaves.
async fn raw_tls(addr: &str) -> RawStream {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio_rustls::TlsConnector::from(testing::client().client_config())
        .connect(flyfs_rpc::Credentials::server_name(), tcp)
        .await
        .expect("TLS handshake")
}

type RawStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Reads one frame from a raw socket, with a deadline.
async fn read_one(stream: &mut RawStream) -> Option<frame::Frame> {
    tokio::time::timeout(
        Duration::from_secs(5),
        read_frame(stream, &FrameLimits::default()),
    )
    .await
    .expect("server answers in time")
    .expect("readable frame")
}

fn ping_frame(request_id: u64) -> OutFrame {
    OutFrame::new(
        Kind::Request,
        Ping::ID,
        Status::Ok,
        request_id,
        codec::encode(&PingReq { nonce: 1 }),
        Bytes::new(),
    )
    .expect("small frame")
}

#[tokio::test]
async fn garbage_header_closes_only_that_connection() {
    let (server, _) = Fixture::tcp().start_server(ServerConfig::default()).await;
    let client = Fixture::tcp().client();
    let (ok, options) = (echo("ok", 0), opts(5000));
    let call = || client.call::<Echo>(server.local_addr(), &ok, Bytes::new(), &options);
    call().await.expect("before");

    let mut raw = raw_tls(server.local_addr()).await;
    raw.write_all(&[0xab; frame::HEADER_LEN])
        .await
        .expect("write");
    raw.flush().await.expect("flush");
    let reply = read_one(&mut raw).await.expect("an error frame");
    assert_eq!(reply.header.kind, Kind::Response);
    assert_eq!(reply.header.request_id, 0);
    assert_eq!(reply.header.status, Status::BadRequest);
    let message = String::from_utf8_lossy(&reply.body).into_owned();
    assert!(message.contains("magic"), "{message}");
    // Then the server closes this connection.
    assert!(read_one(&mut raw).await.is_none());

    // A corrupted header CRC gets the same treatment.
    let mut raw = raw_tls(server.local_addr()).await;
    let mut frame = ping_frame(5);
    frame.header[8] ^= 0xff;
    write_frame(&mut raw, frame).await.expect("write");
    let reply = read_one(&mut raw).await.expect("an error frame");
    assert_eq!(reply.header.status, Status::ChecksumMismatch);
    assert_eq!(reply.header.request_id, 0);
    assert!(read_one(&mut raw).await.is_none());

    // The other client's connection never noticed.
    call().await.expect("after");
    server.shutdown().await;
}

#[tokio::test]
async fn body_checksum_mismatch_fails_one_request_and_keeps_the_connection() {
    let (server, _) = Fixture::tcp().start_server(ServerConfig::default()).await;
    let mut raw = raw_tls(server.local_addr()).await;
    let mut frame = ping_frame(41);
    let mut body = frame.body.to_vec();
    body[0] ^= 0x01;
    frame.body = Bytes::from(body);
    write_frame(&mut raw, frame).await.expect("write");
    let reply = read_one(&mut raw).await.expect("a reply");
    assert_eq!(reply.header.request_id, 41);
    assert_eq!(reply.header.status, Status::ChecksumMismatch);

    write_frame(&mut raw, ping_frame(42)).await.expect("write");
    let reply = read_one(&mut raw).await.expect("a reply");
    assert_eq!(reply.header.request_id, 42);
    assert_eq!(reply.header.status, Status::Ok);
    reply.check_body().expect("reply crc");
    server.shutdown().await;
}

/// On a TLS connection a payload's bytes are authenticated by the session
/// (AES-GCM), so the server's replies leave them out of the frame CRC
/// (`FLAG_PAYLOAD_UNCHECKED`; the body stays checked), while a request whose
/// sender did not flag its payload still has it checked: a payload that
/// does not match its CRC fails that request, and the connection goes on.
#[tokio::test]
async fn tls_replies_leave_the_payload_out_of_the_frame_crc() {
    let (server, _) = Fixture::tcp().start_server(ServerConfig::default()).await;
    let mut raw = raw_tls(server.local_addr()).await;
    let payload = Bytes::from((0..64 * 1024).map(|i| i as u8).collect::<Vec<u8>>());
    let request = |id: u64, payload: Bytes| {
        OutFrame::new(
            Kind::Request,
            Echo::ID,
            Status::Ok,
            id,
            codec::encode(&echo("crc", 0)),
            payload,
        )
        .expect("small frame")
    };
    write_frame(&mut raw, request(11, payload.clone()))
        .await
        .expect("write");
    let reply = read_one(&mut raw).await.expect("a reply");
    assert_eq!(reply.header.request_id, 11);
    assert_eq!(reply.header.status, Status::Ok);
    assert_ne!(
        reply.header.flags & frame::FLAG_PAYLOAD_UNCHECKED,
        0,
        "a reply over TLS still covers its payload in the frame CRC"
    );
    reply.check_body().expect("the body is checked");
    assert!(reply.payload == payload, "the echoed payload differs");

    let mut corrupt = request(12, payload.clone());
    let mut bytes = corrupt.payload.to_vec();
    bytes[1000] ^= 0x01;
    corrupt.payload = Bytes::from(bytes);
    write_frame(&mut raw, corrupt).await.expect("write");
    let reply = read_one(&mut raw).await.expect("a reply");
    assert_eq!(reply.header.request_id, 12);
    assert_eq!(reply.header.status, Status::ChecksumMismatch);

    write_frame(&mut raw, ping_frame(13)).await.expect("write");
    let reply = read_one(&mut raw).await.expect("a reply");
    assert_eq!(reply.header.status, Status::Ok);
    server.shutdown().await;
}

/// A remote payload descriptor names memory to pull by RDMA READ; on a TCP
/// connection there is nothing to pull it with, so the request is refused
/// by name, and the connection goes on.
#[tokio::test]
async fn a_remote_payload_on_tcp_is_refused() {
    let (server, _) = Fixture::tcp().start_server(ServerConfig::default()).await;
    let mut raw = raw_tls(server.local_addr()).await;
    let mut descriptor = vec![0u8; frame::REMOTE_DESCRIPTOR_BYTES];
    descriptor[12] = 16;
    let request = OutFrame::with_flags(
        Kind::Request,
        Echo::ID,
        Status::Ok,
        7,
        frame::FLAG_PAYLOAD_REMOTE,
        codec::encode(&echo("remote", 0)),
        Bytes::from(descriptor),
    )
    .expect("small frame");
    write_frame(&mut raw, request).await.expect("write");
    let reply = read_one(&mut raw).await.expect("a reply");
    assert_eq!(reply.header.request_id, 7);
    assert_eq!(reply.header.status, Status::BadRequest);
    let message = String::from_utf8_lossy(&reply.body).into_owned();
    assert!(message.contains("not on the RDMA transport"), "{message}");

    write_frame(&mut raw, ping_frame(8)).await.expect("write");
    let reply = read_one(&mut raw).await.expect("a reply");
    assert_eq!(reply.header.request_id, 8);
    assert_eq!(reply.header.status, Status::Ok);
    server.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_reply_body_fails_that_call() {
    // A fake server that answers with a corrupted body: the client fails that
    // call with a frame error rather than decoding garbage.
    let listener = Tcp.bind("127.0.0.1:0").await.expect("bind");
    let addr = Listener::local_addr(&listener).expect("addr");
    let fake = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        // An authenticated daemon gone wrong, not a stranger.
        let mut stream =
            tokio_rustls::TlsAcceptor::from(testing::storage(NodeId(1)).server_config())
                .accept(stream)
                .await
                .expect("TLS handshake");
        let request = read_frame(&mut stream, &FrameLimits::default())
            .await
            .expect("read")
            .expect("a request");
        let mut reply = OutFrame::new(
            Kind::Response,
            request.header.method,
            Status::Ok,
            request.header.request_id,
            codec::encode(&EchoRsp::default()),
            Bytes::new(),
        )
        .expect("frame");
        let mut body = reply.body.to_vec();
        body[0] ^= 0x80;
        reply.body = Bytes::from(body);
        write_frame(&mut stream, reply).await.expect("write");
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    });
    let error = Fixture::tcp()
        .client()
        .call::<Echo>(&addr, &echo("", 0), Bytes::new(), &opts(5000))
        .await
        .expect_err("corrupt reply");
    assert!(
        matches!(
            error,
            RpcError::Frame(frame::FrameError::BodyChecksum { .. })
        ),
        "{error}"
    );
    fake.abort();
}

/// A check of the connections to a live server (what a caller does after
/// one of its calls there timed out) leaves the calls in flight on them
/// running: the server answers the pings while the slow call runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checking_a_live_peer_leaves_its_calls_running() {
    let fx = Fixture::tcp();
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    let addr = server.local_addr().to_owned();
    let slow = suite::spawn_slow_echo(&client, &addr, 1_500);
    suite::wait_for_pending(&client, 1).await;
    client
        .close_unresponsive(&addr, Duration::from_secs(10))
        .await;
    assert_eq!(client.pending_calls(), 1, "the slow call was torn down");
    let (rsp, _) = slow
        .await
        .expect("task")
        .expect("the slow call is answered");
    assert_eq!(rsp.text, "slow");
    server.shutdown().await;
}

/// Caller memory in two pieces that a reply's payload lands in, when it
/// takes it (`accept`) and the payload fills both exactly.
struct Split {
    head: Vec<u8>,
    tail: Vec<u8>,
    accept: bool,
}

impl Split {
    fn new(head: usize, tail: usize, accept: bool) -> Split {
        Split {
            head: vec![0; head],
            tail: vec![0; tail],
            accept,
        }
    }

    fn joined(&self) -> Vec<u8> {
        [&self.head[..], &self.tail[..]].concat()
    }
}

impl flyfs_rpc::Landing for Split {
    fn segments(&mut self, _body: &[u8], payload_len: usize) -> Option<Vec<&mut [u8]>> {
        (self.accept && payload_len == self.head.len() + self.tail.len())
            .then(|| vec![&mut self.head[..], &mut self.tail[..]])
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// Payload bytes of `method` read in place into caller memory, and copied,
/// in this process so far.
fn in_place_and_copied(method: u16) -> (u64, u64) {
    let name = flyfs_proto::wire::METHODS
        .iter()
        .find(|(id, _)| *id == method)
        .map_or("unknown", |(_, name)| *name);
    flyfs_rpc::metrics::payload_moved_totals()
        .into_iter()
        .find(|moved| moved.method == name)
        .map_or((0, 0), |moved| (moved.in_place_bytes, moved.copied_bytes))
}

/// A reply's payload is read from the connection straight into the
/// caller's two buffers (counted in place, nothing copied); a landing that
/// declines, or that the payload does not fill, gets the payload the usual
/// way and stays untouched; a call that times out gives its landing back
/// untouched and leaves nothing pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_lands_in_the_callers_memory() {
    let fx = Fixture::tcp();
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    let addr = server.local_addr().to_owned();
    let data = Bytes::from((0..100_000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>());
    let (in_place_before, copied_before) = in_place_and_copied(Echo::ID);

    let (landing, result) = client
        .call_landing::<Echo, _>(
            &addr,
            &echo("in place", 0),
            data.clone(),
            Split::new(30_000, 70_000, true),
            0,
            &opts(5000),
        )
        .await;
    let (rsp, landed) = result.expect("landed call");
    assert_eq!(rsp.text, "in place");
    assert!(
        matches!(landed, flyfs_rpc::Landed::InPlace(100_000)),
        "{landed:?}"
    );
    assert_eq!(landing.joined(), data[..]);
    let (in_place, copied) = in_place_and_copied(Echo::ID);
    assert_eq!(in_place - in_place_before, 100_000);
    assert_eq!(copied, copied_before, "nothing copied on the way");

    for landing in [
        Split::new(30_000, 70_000, false),
        Split::new(30_000, 60_000, true),
    ] {
        let (landing, result) = client
            .call_landing::<Echo, _>(
                &addr,
                &echo("declined", 0),
                data.clone(),
                landing,
                0,
                &opts(5000),
            )
            .await;
        let (_, landed) = result.expect("call");
        let flyfs_rpc::Landed::Payload(payload) = landed else {
            panic!("a declined landing got the payload: {landed:?}");
        };
        assert_eq!(payload.into_bytes(), Some(data.clone()));
        assert!(landing.joined().iter().all(|b| *b == 0), "landing written");
    }

    let (landing, result) = client
        .call_landing::<Echo, _>(
            &addr,
            &echo("slow", 3_000),
            data.clone(),
            Split::new(30_000, 70_000, true),
            0,
            &opts(200),
        )
        .await;
    assert!(
        matches!(result, Err(RpcError::Timeout { .. })),
        "{result:?}"
    );
    assert!(landing.joined().iter().all(|b| *b == 0), "landing written");
    assert_eq!(client.pending_calls(), 0);
    server.shutdown().await;
}
