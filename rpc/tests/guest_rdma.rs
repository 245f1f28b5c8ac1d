//! The rpc server and client over the RDMA transport, on Soft-RoCE in the
//! QEMU guest (`shared/vm/guest --rxe`): calls with payloads of every size,
//! many at once, authentication exactly as over TCP, an RDMA client of a
//! TCP server refused with a clear error (not a hang), a TCP client of an
//! RDMA server served, reconnection after a server restarts, and no verbs
//! object left behind.
//!
//! A guest-only test: it reads `FLYFS_RXE_DEV` and `FLYFS_RXE_GID_INDEX`
//! and fails (does not skip) without them. scripts/test-guest runs it:
//!
//! ```text
//! CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="shared/vm/guest --rxe --" \
//!     cargo test -p flyfs-rpc --test guest_rdma -- --test-threads=1
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_proto::ids::NodeId;
use flyfs_proto::{Method, Roles, Status};
use flyfs_rdma::{ConnectionConfig, live_counts};
use flyfs_rpc::testing;
use flyfs_rpc::{
    CallOptions, Client, ClientConfig, Network, RdmaTransport, Reply, Request, RpcError, Server,
    ServerConfig, ServerHandle, Service, Tcp,
};
use serde::{Deserialize, Serialize};

/// The tests compare process-wide object counts, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct EchoReq {
    text: String,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct EchoRsp {
    text: String,
    payload_len: u64,
}

/// Echoes text and payload back.
struct Echo;
impl Method for Echo {
    const ID: u16 = 300;
    const NAME: &'static str = "test.Echo";
    type Req = EchoReq;
    type Rsp = EchoRsp;
    const ROLES: Roles = Roles::ALL;
}

/// Only storage nodes may call it.
struct NodesOnly;
impl Method for NodesOnly {
    const ID: u16 = 301;
    const NAME: &'static str = "test.NodesOnly";
    type Req = EchoReq;
    type Rsp = EchoRsp;
    const ROLES: Roles = Roles::STORAGE;
}

struct TestService;

impl Service for TestService {
    async fn call(&self, request: Request) -> Reply {
        match request.method {
            Echo::ID | NodesOnly::ID => {
                let decoded = match request.method {
                    Echo::ID => request.decode::<Echo>(),
                    _ => request.decode::<NodesOnly>(),
                };
                let echo = match decoded {
                    Ok(echo) => echo,
                    Err(reply) => return reply,
                };
                let mut copy = vec![0u8; request.payload.len()];
                if let Err(error) = request.payload.fetch_into(&mut copy).await {
                    return Reply::error(Status::Internal, error);
                }
                let rsp = EchoRsp {
                    text: echo.text,
                    payload_len: copy.len() as u64,
                };
                Reply::ok::<Echo>(&rsp, Bytes::from(copy))
            }
            other => Reply::unknown_method(other),
        }
    }

    fn roles(&self, method: u16) -> Option<Roles> {
        match method {
            Echo::ID => Some(Echo::ROLES),
            NodesOnly::ID => Some(NodesOnly::ROLES),
            _ => None,
        }
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this test in the guest (shared/vm/guest --rxe)")
    })
}

fn transport() -> RdmaTransport {
    let gid_index: u8 = env("FLYFS_RXE_GID_INDEX")
        .parse()
        .expect("FLYFS_RXE_GID_INDEX is a small integer");
    let config = ConnectionConfig {
        credits: 8,
        message_bytes_max: 64 << 10,
        ..ConnectionConfig::default()
    };
    RdmaTransport::open(&env("FLYFS_RXE_DEV"), gid_index, config).expect("the guest's rxe device")
}

async fn start_server(rdma: Option<RdmaTransport>) -> ServerHandle {
    start_server_at("127.0.0.1:0", rdma).await
}

async fn start_server_at(addr: &str, rdma: Option<RdmaTransport>) -> ServerHandle {
    let listener = Tcp.bind(addr).await.expect("bind");
    let mut server = Server::new(
        Arc::new(TestService),
        ServerConfig::default(),
        testing::storage(NodeId(1)),
    );
    if let Some(rdma) = rdma {
        server = server.with_rdma(rdma);
    }
    server.spawn(listener).expect("spawn server")
}

fn client(rdma: Option<RdmaTransport>, credentials: flyfs_rpc::Credentials) -> Client<Tcp> {
    Client::with_transport(Tcp, ClientConfig::default(), credentials, rdma)
}

fn options() -> CallOptions {
    CallOptions {
        timeout: Duration::from_secs(60),
        ..CallOptions::default()
    }
}

/// Waits until no verbs object is left but those of `transport`'s device.
async fn only_the_device_remains(transport: &RdmaTransport) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let counts = live_counts();
        if counts.queue_pairs == 0 && counts.completion_queues == 0 && counts.memory_regions == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "verbs objects left behind on {}: {counts:?}",
            transport.device().name()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn calls_with_payloads_of_every_size() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let server = start_server(Some(rdma.clone())).await;
    let client = client(Some(rdma.clone()), testing::client());
    // Empty, smaller than a message, several messages, and 4 MiB.
    for len in [0usize, 100, 200_000, 4 << 20] {
        let data = Bytes::from((0..len).map(|i| (i * 7 % 253) as u8).collect::<Vec<_>>());
        let (rsp, payload) = client
            .call::<Echo>(
                server.local_addr(),
                &EchoReq {
                    text: format!("len {len}"),
                },
                data.clone(),
                &options(),
            )
            .await
            .expect("echo over RDMA");
        assert_eq!(rsp.text, format!("len {len}"));
        assert_eq!(rsp.payload_len, len as u64);
        assert_eq!(payload.into_bytes(), Some(data), "payload of {len} bytes");
    }
    drop(client);
    server.shutdown().await;
    only_the_device_remains(&rdma).await;
}

#[tokio::test]
async fn many_calls_at_once_share_the_connections() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let server = start_server(Some(rdma.clone())).await;
    let client = client(Some(rdma.clone()), testing::client());
    let addr = server.local_addr().to_string();
    let calls = (0..64u32).map(|index| {
        let client = client.clone();
        let addr = addr.clone();
        tokio::spawn(async move {
            let data = Bytes::from(vec![index as u8; 1000 + index as usize * 3000]);
            let (rsp, payload) = client
                .call::<Echo>(
                    &addr,
                    &EchoReq {
                        text: index.to_string(),
                    },
                    data.clone(),
                    &options(),
                )
                .await
                .expect("concurrent echo");
            assert_eq!(rsp.text, index.to_string());
            assert_eq!(payload.into_bytes(), Some(data));
        })
    });
    for call in calls.collect::<Vec<_>>() {
        call.await.expect("call task");
    }
    drop(client);
    server.shutdown().await;
    only_the_device_remains(&rdma).await;
}

#[tokio::test]
async fn roles_are_checked_as_over_tcp() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let server = start_server(Some(rdma.clone())).await;
    let mount = client(Some(rdma.clone()), testing::client());
    let error = mount
        .call::<NodesOnly>(
            server.local_addr(),
            &EchoReq::default(),
            Bytes::new(),
            &options(),
        )
        .await
        .expect_err("a client may not call a storage-only method");
    assert_eq!(error.status(), Some(Status::Forbidden), "{error}");
    let node = client(Some(rdma.clone()), testing::storage(NodeId(2)));
    node.call::<NodesOnly>(
        server.local_addr(),
        &EchoReq::default(),
        Bytes::new(),
        &options(),
    )
    .await
    .expect("a storage node may");
    drop((mount, node));
    server.shutdown().await;
    only_the_device_remains(&rdma).await;
}

#[tokio::test]
async fn transports_meet_as_documented() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let options = CallOptions {
        timeout: Duration::from_secs(20),
        ..CallOptions::default()
    };

    // An RDMA client calling a TCP server.
    let tcp_server = start_server(None).await;
    let rdma_client = client(Some(rdma.clone()), testing::client());
    let error = rdma_client
        .call::<Echo>(
            tcp_server.local_addr(),
            &EchoReq::default(),
            Bytes::new(),
            &options,
        )
        .await
        .expect_err("transport mismatch");
    assert!(
        matches!(error, RpcError::Rdma { .. }) && error.to_string().contains("TCP transport"),
        "{error}"
    );
    assert!(!error.is_retryable());

    // A TCP client (the admin tool) calling a server with an RDMA device:
    // served over TCP, authenticated the same way.
    let rdma_server = start_server(Some(rdma.clone())).await;
    let tcp_client = client(None, testing::client());
    let (rsp, payload) = tcp_client
        .call::<Echo>(
            rdma_server.local_addr(),
            &EchoReq { text: "tcp".into() },
            Bytes::from_static(b"over tcp"),
            &options,
        )
        .await
        .expect("a TCP client of an RDMA server");
    assert_eq!(rsp.text, "tcp");
    assert_eq!(payload.into_bytes().as_deref(), Some(&b"over tcp"[..]));
    let error = tcp_client
        .call::<NodesOnly>(
            rdma_server.local_addr(),
            &EchoReq::default(),
            Bytes::new(),
            &options,
        )
        .await
        .expect_err("roles hold on TCP too");
    assert_eq!(error.status(), Some(Status::Forbidden), "{error}");

    drop((rdma_client, tcp_client));
    tcp_server.shutdown().await;
    rdma_server.shutdown().await;
    only_the_device_remains(&rdma).await;
}

#[tokio::test]
async fn a_restarted_server_is_reconnected() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let server = start_server(Some(rdma.clone())).await;
    let addr = server.local_addr().to_string();
    let client = client(Some(rdma.clone()), testing::client());
    client
        .call::<Echo>(
            &addr,
            &EchoReq::default(),
            Bytes::from_static(b"one"),
            &options(),
        )
        .await
        .expect("first server");
    server.shutdown().await;
    let server = start_server_at(&addr, Some(rdma.clone())).await;
    // The first call may find its pooled connection dead; a retry policy
    // (as the storage client has) reconnects.
    let mut retrying = options();
    retrying.retry.attempts = 3;
    for _ in 0..4 {
        client
            .call::<Echo>(
                &addr,
                &EchoReq::default(),
                Bytes::from_static(b"two"),
                &retrying,
            )
            .await
            .expect("the restarted server");
    }
    drop(client);
    server.shutdown().await;
    only_the_device_remains(&rdma).await;
}
