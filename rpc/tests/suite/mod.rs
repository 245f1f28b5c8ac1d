//! The rpc test suite that does not depend on the transport: each case is
//! a function of a [`Fixture`] (how servers and clients are made), and
//! [`suite_tests!`] makes one `#[tokio::test]` per case. rpc.rs runs it over
//! TCP on the host; guest_rdma.rs runs the same cases over the RDMA
//! transport in the guest (Soft-RoCE). Cases that need a raw socket (a
//! peer writing bad frames itself) stay in rpc.rs. The fixture, the test
//! methods and their service are those of both binaries' other tests too.

// Each test binary that includes this module uses all of it through
// `suite_tests!`, but the compiler checks the module before the macro's
// expansion is known to reach every item.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flyfs_bypass::buf::BufferPool;
use flyfs_proto::frame::FrameLimits;
use flyfs_proto::ids::NodeId;
use flyfs_proto::{Method, Ping, PingReq, Roles, Status};
use flyfs_rpc::testing;
use flyfs_rpc::{
    CallOptions, Client, ClientConfig, Credentials, Listener, Network, RdmaTransport, Reply,
    Request, RetryPolicy, RpcError, Server, ServerConfig, ServerHandle, Service, Tcp,
};
use flyfs_time::Backoff;
use serde::{Deserialize, Serialize};

/// How a case makes its servers and clients: over TCP, or over RDMA on a
/// device (every connection authenticated over TLS first, either way). The
/// one place tests of either transport start a server or make a client.
#[derive(Debug, Clone)]
pub struct Fixture {
    rdma: Option<RdmaTransport>,
    /// The registered pool `EchoRegistered` pulls payloads into (as a
    /// storage node's engine buffers are).
    server_pool: Option<BufferPool>,
}

impl Fixture {
    pub fn tcp() -> Fixture {
        Fixture {
            rdma: None,
            server_pool: None,
        }
    }

    pub fn rdma(transport: RdmaTransport) -> Fixture {
        Fixture {
            rdma: Some(transport),
            server_pool: None,
        }
    }

    /// Servers started from now on pull `EchoRegistered`'s payloads into
    /// buffers of `pool`.
    pub fn with_server_pool(mut self, pool: BufferPool) -> Fixture {
        self.server_pool = Some(pool);
        self
    }

    pub async fn start_server(&self, config: ServerConfig) -> (ServerHandle, Arc<TestService>) {
        self.start_server_at("127.0.0.1:0", config).await
    }

    pub async fn start_server_at(
        &self,
        addr: &str,
        config: ServerConfig,
    ) -> (ServerHandle, Arc<TestService>) {
        let listener = Tcp.bind(addr).await.expect("bind");
        let service = Arc::new(TestService {
            calls: AtomicUsize::new(0),
            pool: self.server_pool.clone(),
        });
        let mut server = Server::new(service.clone(), config, testing::storage(NodeId(1)));
        if let Some(rdma) = &self.rdma {
            server = server.with_rdma(rdma.clone());
        }
        let handle = server.spawn(listener).expect("spawn server");
        (handle, service)
    }

    pub fn client(&self) -> Client<Tcp> {
        self.client_with(ClientConfig::default())
    }

    pub fn client_with(&self, config: ClientConfig) -> Client<Tcp> {
        self.client_as(config, testing::client())
    }

    /// A client with `credentials` (another role than a mount's).
    pub fn client_as(&self, config: ClientConfig, credentials: Credentials) -> Client<Tcp> {
        Client::with_transport(Tcp, config, credentials, self.rdma.clone())
    }
}

/// Declares a test method: `Name: id, "wire name", Req => Rsp, roles`.
macro_rules! test_method {
    ($(#[$doc:meta])* $name:ident: $id:literal, $wire:literal, $req:ty => $rsp:ty, $roles:expr) => {
        $(#[$doc])*
        pub struct $name;
        impl Method for $name {
            const ID: u16 = $id;
            const NAME: &'static str = $wire;
            type Req = $req;
            type Rsp = $rsp;
            const ROLES: Roles = $roles;
        }
    };
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EchoReq {
    pub text: String,
    pub sleep_ms: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EchoRsp {
    pub text: String,
    pub payload_len: u64,
}

test_method!(
    /// Echoes text and payload back, after sleeping `sleep_ms`.
    Echo: 300, "test.Echo", EchoReq => EchoRsp, Roles::ALL
);

test_method!(
    /// Panics in the handler.
    Explode: 301, "test.Explode", EchoReq => EchoRsp, Roles::ALL
);

/// Version 1 and version 2 of one method, to test compatibility on the wire:
/// the server knows v1, the client sends v2.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatV1 {
    pub name: String,
}
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatV2 {
    pub name: String,
    pub follow_links: bool,
}
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatRspV1 {
    pub size: u64,
}
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatRspV2 {
    pub size: u64,
    pub blocks: Option<u64>,
}
test_method!(StatV1Method: 302, "test.Stat", StatV1 => StatRspV1, Roles::ALL);
test_method!(StatV2Method: 302, "test.Stat", StatV2 => StatRspV2, Roles::ALL);

test_method!(
    /// Only storage nodes may call it; echoes like `Echo`.
    NodesOnly: 303, "test.NodesOnly", EchoReq => EchoRsp, Roles::STORAGE
);

test_method!(
    /// Echoes the payload after pulling it into a buffer of the fixture's
    /// registered pool (as a storage node's engine buffer is).
    EchoRegistered: 304, "test.EchoRegistered", EchoReq => EchoRsp, Roles::ALL
);

test_method!(
    /// Replies with as many parts as the request's text says, each of the
    /// length its payload has, each part the payload with its index added to
    /// every byte (a batched read's items).
    Parts: 305, "test.Parts", EchoReq => EchoRsp, Roles::ALL
);

test_method!(
    /// Pulls the payload into a buffer of the length the request's text names
    /// (as a storage write sizes its buffer from the request): a remote
    /// payload naming more or fewer bytes is refused.
    EchoSized: 306, "test.EchoSized", EchoReq => EchoRsp, Roles::ALL
);

pub struct TestService {
    pub calls: AtomicUsize,
    pool: Option<BufferPool>,
}

impl Service for TestService {
    async fn call(&self, request: Request) -> Reply {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match request.method {
            Echo::ID => {
                let echo = match request.decode::<Echo>() {
                    Ok(echo) => echo,
                    Err(reply) => return reply,
                };
                tokio::time::sleep(Duration::from_millis(echo.sleep_ms)).await;
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
            NodesOnly::ID => {
                let echo = match request.decode::<NodesOnly>() {
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
                Reply::ok::<NodesOnly>(&rsp, Bytes::from(copy))
            }
            EchoRegistered::ID => {
                let echo = match request.decode::<EchoRegistered>() {
                    Ok(echo) => echo,
                    Err(reply) => return reply,
                };
                let Some(pool) = &self.pool else {
                    return Reply::error(Status::Internal, "the fixture has no server pool");
                };
                let mut buf = pool.alloc(request.payload.len());
                if let Err(error) = request.payload.fetch_into(&mut buf).await {
                    return Reply::error(Status::Internal, error);
                }
                let rsp = EchoRsp {
                    text: echo.text,
                    payload_len: buf.len() as u64,
                };
                Reply::ok::<EchoRegistered>(&rsp, Bytes::from_owner(buf))
            }
            Parts::ID => {
                let echo = match request.decode::<Parts>() {
                    Ok(echo) => echo,
                    Err(reply) => return reply,
                };
                let Ok(count) = echo.text.parse::<u8>() else {
                    return Reply::error(Status::BadRequest, "the text is the count of parts");
                };
                let mut copy = vec![0u8; request.payload.len()];
                if let Err(error) = request.payload.fetch_into(&mut copy).await {
                    return Reply::error(Status::Internal, error);
                }
                let parts = (0..count)
                    .map(|index| {
                        Bytes::from(
                            copy.iter()
                                .map(|byte| byte.wrapping_add(index))
                                .collect::<Vec<_>>(),
                        )
                    })
                    .collect::<Vec<_>>();
                let rsp = EchoRsp {
                    text: echo.text,
                    payload_len: (copy.len() * usize::from(count)) as u64,
                };
                Reply::ok_parts::<Parts>(&rsp, parts)
            }
            EchoSized::ID => {
                let echo = match request.decode::<EchoSized>() {
                    Ok(echo) => echo,
                    Err(reply) => return reply,
                };
                let Ok(len) = echo.text.parse::<usize>() else {
                    return Reply::error(Status::BadRequest, "the text is the payload's length");
                };
                let mut copy = vec![0u8; len];
                if let Err(error) = request.payload.fetch_into(&mut copy).await {
                    return Reply::error(Status::BadRequest, error);
                }
                let rsp = EchoRsp {
                    text: echo.text,
                    payload_len: len as u64,
                };
                Reply::ok::<EchoSized>(&rsp, Bytes::from(copy))
            }
            Explode::ID => panic!("handler exploded on purpose"),
            StatV1Method::ID => match request.decode::<StatV1Method>() {
                Ok(stat) => Reply::ok::<StatV1Method>(
                    &StatRspV1 {
                        size: stat.name.len() as u64,
                    },
                    Bytes::new(),
                ),
                Err(reply) => reply,
            },
            other => Reply::unknown_method(other),
        }
    }

    fn roles(&self, method: u16) -> Option<Roles> {
        match method {
            NodesOnly::ID => Some(NodesOnly::ROLES),
            Echo::ID
            | Explode::ID
            | StatV1Method::ID
            | EchoRegistered::ID
            | Parts::ID
            | EchoSized::ID => Some(Roles::ALL),
            _ => None,
        }
    }
}

pub fn echo(text: &str, sleep_ms: u64) -> EchoReq {
    EchoReq {
        text: text.into(),
        sleep_ms,
    }
}

pub fn opts(timeout_ms: u64) -> CallOptions {
    CallOptions {
        timeout: Duration::from_millis(timeout_ms),
        ..CallOptions::default()
    }
}

pub async fn wait_for_pending(client: &Client<Tcp>, calls: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.pending_calls() != calls {
        assert!(
            Instant::now() < deadline,
            "never reached {calls} pending calls"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An echo the server answers `sleep_ms` later (the call's own timeout is
/// 30 s), in a task of its own.
pub fn spawn_slow_echo(
    client: &Client<Tcp>,
    addr: &str,
    sleep_ms: u64,
) -> tokio::task::JoinHandle<Result<(EchoRsp, flyfs_rpc::Payload), RpcError>> {
    let client = client.clone();
    let addr = addr.to_owned();
    tokio::spawn(async move {
        client
            .call::<Echo>(&addr, &echo("slow", sleep_ms), Bytes::new(), &opts(30_000))
            .await
    })
}

pub async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for future in futures {
        set.push(Box::pin(future));
    }
    let mut out = Vec::new();
    // Poll all together by spawning nothing: a simple join over boxed futures.
    let mut slots: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (future, slot) in set.iter_mut().zip(slots.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    for slot in slots {
        out.push(slot.expect("joined"));
    }
    out
}

pub async fn echo_round_trip_with_payload(fx: &Fixture) {
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    let data = Bytes::from((0..100_000u32).map(|i| i as u8).collect::<Vec<_>>());
    let (rsp, payload) = client
        .call::<Echo>(
            server.local_addr(),
            &echo("hi", 0),
            data.clone(),
            &CallOptions::default(),
        )
        .await
        .expect("echo");
    assert_eq!(rsp.text, "hi");
    assert_eq!(rsp.payload_len, 100_000);
    assert_eq!(payload.into_bytes(), Some(data));

    // Without payload, the reply payload is Empty.
    let (_, payload) = client
        .call::<Echo>(
            server.local_addr(),
            &echo("", 0),
            Bytes::new(),
            &CallOptions::default(),
        )
        .await
        .expect("echo");
    assert!(payload.is_empty());
    server.shutdown().await;
}

pub async fn built_in_ping_is_answered_without_the_service(fx: &Fixture) {
    let (server, service) = fx.start_server(ServerConfig::default()).await;
    let (rsp, _) = fx
        .client()
        .call::<Ping>(
            server.local_addr(),
            &PingReq { nonce: 77 },
            Bytes::new(),
            &CallOptions::default(),
        )
        .await
        .expect("ping");
    assert_eq!(rsp.nonce, 77);
    assert_eq!(service.calls.load(Ordering::Relaxed), 0);
    server.shutdown().await;
}

pub async fn many_concurrent_calls_are_answered_out_of_order(fx: &Fixture) {
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    // One connection, so every call shares it.
    let client = fx.client_with(ClientConfig {
        connections_per_peer: 1,
        ..ClientConfig::default()
    });
    let finished = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let client = client.clone();
        let addr = server.local_addr().to_owned();
        let finished = finished.clone();
        tasks.push(tokio::spawn(async move {
            // Earlier calls sleep longer, so they finish later.
            let request = echo(&format!("call {i}"), 10 + (64 - i) * 5);
            let payload = Bytes::from(vec![i as u8; i as usize * 100]);
            let (rsp, got) = client
                .call::<Echo>(&addr, &request, payload.clone(), &opts(10_000))
                .await
                .expect("echo");
            assert_eq!(rsp.text, format!("call {i}"));
            assert_eq!(got.into_bytes(), Some(payload));
            finished.lock().expect("lock").push(i);
        }));
        // Let the call go out before the next one.
        tokio::task::yield_now().await;
    }
    for task in tasks {
        task.await.expect("call task");
    }
    let order = finished.lock().expect("lock").clone();
    assert_eq!(order.len(), 64);
    assert!(
        order.first() > order.last(),
        "later calls finished first: {order:?}"
    );
    assert_eq!(client.pending_calls(), 0);
    server.shutdown().await;
}

pub async fn unknown_methods_are_rejected(fx: &Fixture) {
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    for method in [999u16, 7] {
        let error = client
            .call_raw(
                server.local_addr(),
                method,
                Bytes::new(),
                Bytes::new(),
                Duration::from_secs(5),
            )
            .await
            .expect_err("no such method");
        assert_eq!(error.status(), Some(Status::UnknownMethod), "{error}");
        assert!(
            error.to_string().contains(&format!("method {method}")),
            "{error}"
        );
    }
    server.shutdown().await;
}

pub async fn bad_request_body_names_the_method(fx: &Fixture) {
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let error = fx
        .client()
        .call_raw(
            server.local_addr(),
            Echo::ID,
            Bytes::from_static(&[0xc1, 0xc1]),
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await
        .expect_err("undecodable body");
    assert_eq!(error.status(), Some(Status::BadRequest));
    assert!(error.to_string().contains("test.Echo"), "{error}");
    server.shutdown().await;
}

pub async fn oversized_body_or_payload_gets_too_large(fx: &Fixture) {
    let limits = FrameLimits {
        body_bytes_max: 1024,
        payload_bytes_max: 64 << 10,
    };
    let (server, service) = fx
        .start_server(ServerConfig {
            limits,
            ..ServerConfig::default()
        })
        .await;
    let client = fx.client();
    let big_text = "x".repeat(4096);
    let error = client
        .call::<Echo>(
            server.local_addr(),
            &echo(&big_text, 0),
            Bytes::new(),
            &opts(5000),
        )
        .await
        .expect_err("body over the limit");
    assert_eq!(error.status(), Some(Status::TooLarge), "{error}");

    // A payload far over the limit: the client is still writing it when the
    // server answers and closes.
    let error = client
        .call::<Echo>(
            server.local_addr(),
            &echo("", 0),
            Bytes::from(vec![0u8; 8 << 20]),
            &opts(5000),
        )
        .await
        .expect_err("payload over the limit");
    assert_eq!(error.status(), Some(Status::TooLarge), "{error}");
    assert_eq!(service.calls.load(Ordering::Relaxed), 0);

    // The client reconnects and carries on.
    for _ in 0..4 {
        client
            .call::<Echo>(
                server.local_addr(),
                &echo("fine", 0),
                Bytes::new(),
                &opts(5000),
            )
            .await
            .expect("small call");
    }
    server.shutdown().await;
}

pub async fn shutdown_disconnects_and_the_client_reconnects_to_a_new_server(fx: &Fixture) {
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let addr = server.local_addr().to_owned();
    let client = fx.client();
    client
        .call::<Echo>(&addr, &echo("first", 0), Bytes::new(), &opts(5000))
        .await
        .expect("first");

    let slow = tokio::spawn({
        let client = client.clone();
        let addr = addr.clone();
        async move {
            client
                .call::<Echo>(&addr, &echo("slow", 60_000), Bytes::new(), &opts(30_000))
                .await
        }
    });
    wait_for_pending(&client, 1).await;
    server.shutdown().await;
    let error = slow.await.expect("task").expect_err("server went away");
    assert!(matches!(error, RpcError::Disconnected { .. }), "{error}");
    assert!(error.is_retryable());

    // Nobody listens: the connect fails.
    let error = client
        .call::<Echo>(&addr, &echo("none", 0), Bytes::new(), &opts(5000))
        .await
        .expect_err("no server");
    assert!(matches!(error, RpcError::Connect { .. }), "{error}");

    let (server, _) = fx.start_server_at(&addr, ServerConfig::default()).await;
    let (rsp, _) = client
        .call::<Echo>(&addr, &echo("again", 0), Bytes::new(), &opts(5000))
        .await
        .expect("new server");
    assert_eq!(rsp.text, "again");
    server.shutdown().await;
}

pub async fn calls_time_out_and_leave_nothing_pending(fx: &Fixture) {
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    let started = Instant::now();
    let error = client
        .call::<Echo>(
            server.local_addr(),
            &echo("slow", 5_000),
            Bytes::new(),
            &opts(100),
        )
        .await
        .expect_err("too slow");
    assert!(started.elapsed() < Duration::from_secs(2));
    match &error {
        RpcError::Timeout { after, method, .. } => {
            assert_eq!(*after, Duration::from_millis(100));
            assert_eq!(method.id, Echo::ID);
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(error.to_string().contains("test.Echo"), "{error}");
    assert_eq!(client.pending_calls(), 0);
    server.shutdown().await;
}

pub async fn dropping_a_call_cancels_it(fx: &Fixture) {
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    let addr = server.local_addr().to_owned();
    {
        let (request, options) = (echo("slow", 5_000), opts(10_000));
        let call = client.call::<Echo>(&addr, &request, Bytes::new(), &options);
        tokio::pin!(call);
        tokio::select! {
            biased;
            _ = &mut call => panic!("the call cannot finish this early"),
            () = wait_for_pending(&client, 1) => {}
        }
        assert_eq!(client.pending_calls(), 1);
    }
    assert_eq!(
        client.pending_calls(),
        0,
        "the dropped call's entry is gone"
    );
    // The connection is still good.
    client
        .call::<Echo>(&addr, &echo("next", 0), Bytes::new(), &opts(5000))
        .await
        .expect("after cancel");
    server.shutdown().await;
}

pub async fn retries_with_backoff_succeed_once_the_server_is_up(fx: &Fixture) {
    // Find a free port, then leave it unbound for a while.
    let addr = {
        let listener = Tcp.bind("127.0.0.1:0").await.expect("bind");
        Listener::local_addr(&listener).expect("addr")
    };
    let client = fx.client();
    let no_retry = client
        .call::<Echo>(&addr, &echo("x", 0), Bytes::new(), &opts(1000))
        .await
        .expect_err("nobody listens");
    assert!(no_retry.is_retryable(), "{no_retry}");

    let server = tokio::spawn({
        let addr = addr.clone();
        let fx = fx.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            fx.start_server_at(&addr, ServerConfig::default()).await
        }
    });
    let options = CallOptions {
        timeout: Duration::from_secs(1),
        retry: RetryPolicy {
            attempts: 30,
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(100)),
        },
    };
    let started = Instant::now();
    let (rsp, _) = client
        .call::<Echo>(&addr, &echo("eventually", 0), Bytes::new(), &options)
        .await
        .expect("a retry reaches the server");
    assert_eq!(rsp.text, "eventually");
    assert!(started.elapsed() >= Duration::from_millis(250));
    let (server, _) = server.await.expect("server task");
    server.shutdown().await;

    // Errors that a retry cannot fix are not retried.
    let (server, service) = fx.start_server(ServerConfig::default()).await;
    let error = client
        .call::<Explode>(server.local_addr(), &echo("", 0), Bytes::new(), &options)
        .await
        .expect_err("always panics");
    assert_eq!(error.status(), Some(Status::Internal));
    assert_eq!(service.calls.load(Ordering::Relaxed), 1, "not retried");
    server.shutdown().await;
}

pub async fn a_panicking_handler_becomes_internal(fx: &Fixture) {
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    // Generous: the first panic of a process with RUST_BACKTRACE set
    // symbolises its backtrace before the reply goes out, which takes
    // seconds in the emulated guest.
    let error = client
        .call::<Explode>(
            server.local_addr(),
            &echo("", 0),
            Bytes::new(),
            &opts(60_000),
        )
        .await
        .expect_err("handler panics");
    assert_eq!(error.status(), Some(Status::Internal), "{error}");
    assert!(error.to_string().contains("exploded on purpose"), "{error}");
    client
        .call::<Echo>(
            server.local_addr(),
            &echo("alive", 0),
            Bytes::new(),
            &opts(5000),
        )
        .await
        .expect("server survives");
    server.shutdown().await;
}

pub async fn messages_stay_compatible_across_versions_on_the_wire(fx: &Fixture) {
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    // A v2 client talking to a v1 server: the extra request field is ignored,
    // the missing response field takes its default.
    let (rsp, _) = fx
        .client()
        .call::<StatV2Method>(
            server.local_addr(),
            &StatV2 {
                name: "abcd".into(),
                follow_links: true,
            },
            Bytes::new(),
            &CallOptions::default(),
        )
        .await
        .expect("v2 against v1");
    assert_eq!(
        rsp,
        StatRspV2 {
            size: 4,
            blocks: None
        }
    );
    server.shutdown().await;
}

pub async fn in_flight_limit_holds_requests_back(fx: &Fixture) {
    let (server, _) = fx
        .start_server(ServerConfig {
            requests_in_flight_max_per_connection: 2,
            ..ServerConfig::default()
        })
        .await;
    let client = fx.client_with(ClientConfig {
        connections_per_peer: 1,
        ..ClientConfig::default()
    });
    let started = Instant::now();
    let (request, options) = (echo("", 100), opts(10_000));
    let calls =
        (0..6).map(|_| client.call::<Echo>(server.local_addr(), &request, Bytes::new(), &options));
    for result in join_all(calls).await {
        result.expect("call");
    }
    // Six 100 ms calls, two at a time: at least three rounds.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    server.shutdown().await;
}

pub async fn disconnect_fails_pending_calls(fx: &Fixture) {
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    let addr = server.local_addr().to_owned();
    let slow = spawn_slow_echo(&client, &addr, 60_000);
    wait_for_pending(&client, 1).await;
    client.disconnect(&addr).await;
    let error = slow.await.expect("task").expect_err("disconnected");
    assert!(matches!(error, RpcError::Disconnected { .. }), "{error}");
    assert_eq!(client.pending_calls(), 0);
    client
        .call::<Echo>(&addr, &echo("again", 0), Bytes::new(), &opts(5000))
        .await
        .expect("reconnects");
    server.shutdown().await;
}

pub async fn roles_are_checked(fx: &Fixture) {
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let error = fx
        .client()
        .call::<NodesOnly>(
            server.local_addr(),
            &echo("", 0),
            Bytes::new(),
            &opts(60_000),
        )
        .await
        .expect_err("a client may not call a storage-only method");
    assert_eq!(error.status(), Some(Status::Forbidden), "{error}");
    fx.client_as(ClientConfig::default(), testing::storage(NodeId(2)))
        .call::<NodesOnly>(
            server.local_addr(),
            &echo("", 0),
            Bytes::new(),
            &opts(60_000),
        )
        .await
        .expect("a storage node may");
    server.shutdown().await;
}

/// One `#[tokio::test]` per case of the suite, each on the fixture `$fixture`
/// makes (an expression, evaluated in each test).
macro_rules! suite_tests {
    ($fixture:expr) => {
        #[tokio::test]
        async fn oversized_body_or_payload_gets_too_large() {
            suite::oversized_body_or_payload_gets_too_large(&$fixture).await;
        }
        #[tokio::test]
        async fn roles_are_checked() {
            suite::roles_are_checked(&$fixture).await;
        }
        #[tokio::test]
        async fn echo_round_trip_with_payload() {
            suite::echo_round_trip_with_payload(&$fixture).await;
        }
        #[tokio::test]
        async fn built_in_ping_is_answered_without_the_service() {
            suite::built_in_ping_is_answered_without_the_service(&$fixture).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn many_concurrent_calls_are_answered_out_of_order() {
            suite::many_concurrent_calls_are_answered_out_of_order(&$fixture).await;
        }
        #[tokio::test]
        async fn unknown_methods_are_rejected() {
            suite::unknown_methods_are_rejected(&$fixture).await;
        }
        #[tokio::test]
        async fn bad_request_body_names_the_method() {
            suite::bad_request_body_names_the_method(&$fixture).await;
        }
        #[tokio::test]
        async fn shutdown_disconnects_and_the_client_reconnects_to_a_new_server() {
            suite::shutdown_disconnects_and_the_client_reconnects_to_a_new_server(&$fixture).await;
        }
        #[tokio::test]
        async fn calls_time_out_and_leave_nothing_pending() {
            suite::calls_time_out_and_leave_nothing_pending(&$fixture).await;
        }
        #[tokio::test]
        async fn dropping_a_call_cancels_it() {
            suite::dropping_a_call_cancels_it(&$fixture).await;
        }
        #[tokio::test]
        async fn retries_with_backoff_succeed_once_the_server_is_up() {
            suite::retries_with_backoff_succeed_once_the_server_is_up(&$fixture).await;
        }
        #[tokio::test]
        async fn a_panicking_handler_becomes_internal() {
            suite::a_panicking_handler_becomes_internal(&$fixture).await;
        }
        #[tokio::test]
        async fn messages_stay_compatible_across_versions_on_the_wire() {
            suite::messages_stay_compatible_across_versions_on_the_wire(&$fixture).await;
        }
        #[tokio::test]
        async fn in_flight_limit_holds_requests_back() {
            suite::in_flight_limit_holds_requests_back(&$fixture).await;
        }
        #[tokio::test]
        async fn disconnect_fails_pending_calls() {
            suite::disconnect_fails_pending_calls(&$fixture).await;
        }
    };
}
