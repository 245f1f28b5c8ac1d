//! Hostile peers against a real server over TCP and TLS: authenticated peers
//! that announce the largest frames and stall, slow headers, idle
//! connections, and more connections than the server takes. The server's
//! memory stays within its budgets, honest peers keep being served within
//! their deadlines, and every stalled connection is closed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_proto::Status;
use flyfs_proto::auth::{Principal, Roles};
use flyfs_proto::frame::FrameLimits;
use flyfs_proto::frame::{FLAG_PAYLOAD_UNCHECKED, Kind, OutFrame};
use flyfs_rpc::frame_io::{read_frame, write_frame};
use flyfs_rpc::{
    Client, ClientConfig, Credentials, Network, Reply, Request, Server, ServerConfig, ServerHandle,
    Service, Tcp, testing,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

/// A method of the test service: any id from 256 up is answered `Ok` with
/// the request's payload length, by any authenticated peer.
const SINK: u16 = 300;

struct Sink;

impl Service for Sink {
    async fn call(&self, request: Request) -> Reply {
        let len = request.payload.len() as u64;
        Reply {
            status: Status::Ok,
            body: Bytes::from(len.to_le_bytes().to_vec()),
            payload: Bytes::new(),
            parts: Vec::new(),
        }
    }

    fn roles(&self, _method: u16) -> Option<Roles> {
        Some(Roles::ALL)
    }
}

async fn start(config: ServerConfig) -> ServerHandle {
    let listener = Tcp.bind("127.0.0.1:0").await.expect("bind");
    Server::new(Arc::new(Sink), config, testing::meta())
        .spawn(listener)
        .expect("spawn")
}

fn client_named(name: &str) -> Credentials {
    testing::credentials(Principal::Client(name.to_string()))
}

/// A TLS connection authenticated as `credentials`, with nothing sent yet.
async fn connect(
    addr: &str,
    credentials: &Credentials,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let tcp = Tcp.connect(addr).await?;
    tokio_rustls::TlsConnector::from(credentials.client_config())
        .connect(Credentials::server_name(), tcp)
        .await
}

fn sink_frame(request_id: u64, payload: Bytes) -> OutFrame {
    // The payload is not checksummed, so a huge one costs nothing to frame.
    OutFrame::with_flags(
        Kind::Request,
        SINK,
        Status::Ok,
        request_id,
        FLAG_PAYLOAD_UNCHECKED,
        Bytes::new(),
        payload,
    )
    .expect("a frame within the u32 lengths")
}

/// Resident memory of this process (server and test together).
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib << 10
}

/// Waits until the server closes `stream` (end of stream or an error),
/// failing the test after `within`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, within: Duration) {
    let mut sink = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server did not close the connection within {within:?}"
    );
}

const MIB: u64 = 1 << 20;

/// Twenty connections of one identity each announce a 64 MiB payload, send
/// 16 MiB of it and stall. Unbounded, the server would hold 320 MiB of their
/// bytes; with the identity's budget it reads two frames at a time, the other
/// connections wait unread (TCP pushes back), and a peer of another
/// identity keeps getting answers. Each stalled frame's connection is closed
/// at its body deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_large_frames_hold_only_their_identitys_budget() {
    let config = ServerConfig {
        request_bytes_in_flight_max_per_connection: 70 * MIB,
        request_bytes_in_flight_max_per_identity: 140 * MIB,
        request_bytes_in_flight_max: 220 * MIB,
        body_timeout_base: Duration::from_secs(1),
        body_bytes_per_s_min: 64 * MIB,
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let addr = server.local_addr().to_string();
    let honest = Client::new(Tcp, ClientConfig::default(), client_named("honest"));
    let one_mib = Bytes::from(vec![7u8; MIB as usize]);
    // Warm up (connections, buffer pools) before the baseline.
    honest
        .call_raw(
            &addr,
            SINK,
            Bytes::new(),
            one_mib.clone(),
            Duration::from_secs(5),
        )
        .await
        .expect("warm-up call");
    let huge = Bytes::from(vec![1u8; (64 * MIB) as usize]);
    let frame = sink_frame(1, huge.clone());
    let baseline = resident_bytes();

    let hostile = client_named("hostile");
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut stream = connect(&addr, &hostile).await.expect("hostile handshake");
        let frame = frame.clone();
        stalled.push(tokio::spawn(async move {
            // Header and the first 16 MiB, then nothing: the write blocks
            // once the server stops reading this connection.
            let _ = stream.write_all(&frame.header).await;
            let _ = stream
                .write_all(&frame.payload[..(16 * MIB) as usize])
                .await;
            let _ = stream.flush().await;
            closed_within(&mut stream, Duration::from_secs(180)).await;
        }));
    }
    // The honest peer is served throughout, each call within its deadline.
    for _ in 0..20 {
        let reply = honest
            .call_raw(
                &addr,
                SINK,
                Bytes::new(),
                one_mib.clone(),
                Duration::from_secs(5),
            )
            .await
            .expect("an honest call while hostile frames stall");
        assert_eq!(reply.body.as_ref(), MIB.to_le_bytes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = resident_bytes().saturating_sub(baseline);
    assert!(
        grown < 160 * MIB,
        "resident memory grew by {} MiB with 20 stalled 64 MiB frames",
        grown / MIB
    );
    // Every stalled connection is closed in turn at its body deadline (2 s
    // each, two at a time through the identity's budget).
    for task in stalled {
        task.await.expect("hostile task");
    }
    drop(huge);
    server.shutdown().await;
}

/// A header that stops halfway, and a connection that never starts a
/// request, are closed at their deadlines; the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_closed() {
    let config = ServerConfig {
        header_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let addr = server.local_addr().to_string();
    let peer = client_named("slow");

    let mut half = connect(&addr, &peer).await.expect("handshake");
    let frame = sink_frame(1, Bytes::new());
    half.write_all(&frame.header[..10])
        .await
        .expect("half a header");
    half.flush().await.expect("flush");
    closed_within(&mut half, Duration::from_secs(30)).await;

    let mut idle = connect(&addr, &peer).await.expect("handshake");
    closed_within(&mut idle, Duration::from_secs(30)).await;

    // A connection that keeps sending requests is not idle.
    let mut busy = connect(&addr, &peer).await.expect("handshake");
    for request_id in 1..=4 {
        write_frame(&mut busy, sink_frame(request_id, Bytes::from_static(b"x")))
            .await
            .expect("request");
        let reply = read_frame(&mut busy, &FrameLimits::default())
            .await
            .expect("reply")
            .expect("a frame");
        assert_eq!(reply.header.status, Status::Ok);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    server.shutdown().await;
}

/// Past `connections_max` a new connection is closed at once; once one of
/// the others goes, a new one is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed() {
    let config = ServerConfig {
        connections_max: 3,
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let addr = server.local_addr().to_string();
    let peer = client_named("many");
    let mut open = Vec::new();
    for request_id in 1..=3 {
        let mut stream = connect(&addr, &peer).await.expect("handshake");
        write_frame(&mut stream, sink_frame(request_id, Bytes::new()))
            .await
            .expect("request");
        let reply = read_frame(&mut stream, &FrameLimits::default())
            .await
            .expect("reply")
            .expect("a frame");
        assert_eq!(reply.header.status, Status::Ok);
        open.push(stream);
    }
    // The fourth: the server closes the TCP connection before any TLS, so
    // the handshake fails (or the first read ends).
    match connect(&addr, &peer).await {
        Err(_) => {}
        Ok(mut stream) => closed_within(&mut stream, Duration::from_secs(10)).await,
    }
    // One goes away; a new connection is served once the server has
    // noticed (polled: the slot is freed when its task ends).
    drop(open.pop());
    let served = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(mut stream) = connect(&addr, &peer).await
                && write_frame(&mut stream, sink_frame(9, Bytes::new()))
                    .await
                    .is_ok()
                && let Ok(Some(reply)) = read_frame(&mut stream, &FrameLimits::default()).await
            {
                return reply.header.status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a connection is served again once one closed");
    assert_eq!(served, Status::Ok);
    server.shutdown().await;
}

/// Settings under which the largest frame could never fit a budget are
/// refused when the server starts, naming the setting.
#[tokio::test]
async fn budgets_below_the_largest_frame_are_refused() {
    let listener = Tcp.bind("127.0.0.1:0").await.expect("bind");
    let config = ServerConfig {
        request_bytes_in_flight_max_per_identity: MIB,
        ..ServerConfig::default()
    };
    let error = Server::new(Arc::new(Sink), config, testing::meta())
        .spawn(listener)
        .expect_err("refused");
    assert!(
        error
            .to_string()
            .contains("request_bytes_in_flight_max_per_identity"),
        "{error}"
    );
}
