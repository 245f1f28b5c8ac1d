//! The rpc server and client over the RDMA transport, on Soft-RoCE in the
//! QEMU guest (`shared/vm/guest --rxe`): calls with payloads of every size,
//! many at once, one-sided payloads and replies, authentication exactly as
//! over TCP, an RDMA client of a TCP server refused with a clear error (not
//! a hang), a TCP client of an RDMA server served, reconnection after a
//! server restarts, the bytes written just before a close, and no verbs
//! object left behind.
//!
//! The transport-independent rpc suite (suite/mod.rs, run over TCP by
//! rpc.rs) runs here over RDMA as well; the tests below use its fixture,
//! test methods and service.
//!
//! A guest-only test: it reads `FLYFS_RXE_DEV` and `FLYFS_RXE_GID_INDEX`
//! and fails (does not skip) without them. scripts/test-guest runs it:
//!
//! ```text
//! CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="shared/vm/guest --rxe --" \
//!     cargo test -p flyfs-rpc --test guest_rdma -- --test-threads=1
//! ```

#[macro_use]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_bypass::buf::{BufferPool, PoolConfig};
use flyfs_proto::{Method, Status};
use flyfs_rdma::{ConnectionConfig, live_counts};
use flyfs_rpc::testing;
use flyfs_rpc::{RdmaTransport, RpcError, ServerConfig};
use suite::{Echo, EchoRegistered, EchoReq, EchoSized, Fixture, NodesOnly, Parts, echo, opts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The tests compare process-wide object counts, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A call's timeout here: generous, the guest is emulated.
const TIMEOUT_MS: u64 = 60_000;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this test in the guest (shared/vm/guest --rxe)")
    })
}

/// The guest's device, with connections of `config`'s shape.
fn transport_with(config: ConnectionConfig) -> RdmaTransport {
    let gid_index: u8 = env("FLYFS_RXE_GID_INDEX")
        .parse()
        .expect("FLYFS_RXE_GID_INDEX is a small integer");
    RdmaTransport::open(&env("FLYFS_RXE_DEV"), gid_index, config).expect("the guest's rxe device")
}

fn transport() -> RdmaTransport {
    transport_with(ConnectionConfig {
        credits: 8,
        message_bytes_max: 64 << 10,
        ..ConnectionConfig::default()
    })
}

// Every case of the suite, each on a transport of its own over the
// guest's device.
suite_tests!(Fixture::rdma(transport()));

/// A buffer pool registered on `rdma`'s device once, as a daemon's is.
fn registered_pool(rdma: &RdmaTransport, classes: Vec<(usize, usize)>) -> BufferPool {
    let pool = BufferPool::new(&PoolConfig {
        classes,
        ..PoolConfig::default()
    })
    .expect("a buffer pool");
    rdma.register_arenas(Arc::new(pool.clone()))
        .expect("registering the pool once");
    pool
}

/// Waits until no queue pair, completion queue or memory region is left
/// (the connections gone; and the arenas' registrations, once the
/// transports that hold them are dropped).
async fn nothing_left_behind() {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let counts = live_counts();
        if counts.queue_pairs == 0 && counts.completion_queues == 0 && counts.memory_regions == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "verbs objects left behind: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A request whose text is `text`.
fn text(text: impl Into<String>) -> EchoReq {
    echo(&text.into(), 0)
}

#[tokio::test]
async fn calls_with_payloads_of_every_size() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let fx = Fixture::rdma(rdma.clone());
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    // Empty, smaller than a message, several messages, and 4 MiB.
    for len in [0usize, 100, 200_000, 4 << 20] {
        let data = Bytes::from((0..len).map(|i| (i * 7 % 253) as u8).collect::<Vec<_>>());
        let (rsp, payload) = client
            .call::<Echo>(
                server.local_addr(),
                &text(format!("len {len}")),
                data.clone(),
                &opts(TIMEOUT_MS),
            )
            .await
            .expect("echo over RDMA");
        assert_eq!(rsp.text, format!("len {len}"));
        assert_eq!(rsp.payload_len, len as u64);
        assert_eq!(payload.into_bytes(), Some(data), "payload of {len} bytes");
    }
    drop(client);
    server.shutdown().await;
    nothing_left_behind().await;
}

/// A payload in a registered arena moves one-sided: the request carries
/// its descriptor and the server pulls the bytes by RDMA READ, into a
/// registered buffer directly or through a bounce region; a payload
/// outside the arenas still travels inline. The counts say which way each
/// went, and nothing is left behind once the transport is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_payloads_move_one_sided() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let pool = registered_pool(&rdma, vec![(64 << 10, 16), (4 << 20, 8)]);
    let fx = Fixture::rdma(rdma.clone()).with_server_pool(pool.clone());
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    for len in [1usize, 5000, 64 << 10, 3 << 20] {
        for registered_destination in [false, true] {
            let data = registered_bytes(&pool, len, 0);
            let before = (flyfs_rdma::transfer_counts(), moved_totals());
            let request = text(format!("{len} {registered_destination}"));
            let (rsp, payload) = if registered_destination {
                client
                    .call::<EchoRegistered>(
                        server.local_addr(),
                        &request,
                        data.clone(),
                        &opts(TIMEOUT_MS),
                    )
                    .await
            } else {
                client
                    .call::<Echo>(
                        server.local_addr(),
                        &request,
                        data.clone(),
                        &opts(TIMEOUT_MS),
                    )
                    .await
            }
            .expect("echo of a registered payload");
            assert_eq!(rsp.text, request.text);
            assert_eq!(payload.into_bytes(), Some(data.clone()), "{len} bytes");
            let after = (flyfs_rdma::transfer_counts(), moved_totals());
            assert_eq!(
                after.0.one_sided_read - before.0.one_sided_read,
                len as u64,
                "the server pulled the {len} bytes by RDMA READ"
            );
            // Lent by the client, pulled by the server: counted once each.
            assert_eq!(after.1.0 - before.1.0, 2 * len as u64);
            // This client lends no reply buffers, so the echo's reply comes
            // inline: counted as copied (by the client), and nothing else.
            assert_eq!(after.1.1 - before.1.1, len as u64, "only the reply copied");
        }
    }
    // A payload outside the arenas travels inline, counted as copied.
    let before = moved_totals();
    let data = Bytes::from(vec![7u8; 100_000]);
    let (_, payload) = client
        .call::<Echo>(
            server.local_addr(),
            &EchoReq::default(),
            data.clone(),
            &opts(TIMEOUT_MS),
        )
        .await
        .expect("echo of an unregistered payload");
    assert_eq!(payload.into_bytes(), Some(data));
    let after = moved_totals();
    // The request and its echoed reply, both inline.
    assert_eq!(after.1 - before.1, 200_000);
    assert_eq!(after.0, before.0);
    drop(client);
    server.shutdown().await;
    drop((fx, rdma));
    // The pool's registrations go with the last holder of the device (the
    // transport, its connections and their requests).
    nothing_left_behind().await;
}

#[tokio::test]
async fn many_calls_at_once_share_the_connections() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let fx = Fixture::rdma(rdma.clone());
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    let addr = server.local_addr().to_string();
    let calls = (0..64u32).map(|index| {
        let client = client.clone();
        let addr = addr.clone();
        tokio::spawn(async move {
            let data = Bytes::from(vec![index as u8; 1000 + index as usize * 3000]);
            let (rsp, payload) = client
                .call::<Echo>(
                    &addr,
                    &text(index.to_string()),
                    data.clone(),
                    &opts(TIMEOUT_MS),
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
    nothing_left_behind().await;
}

#[tokio::test]
async fn transports_meet_as_documented() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let fx = Fixture::rdma(rdma.clone());
    let options = opts(20_000);

    // An RDMA client calling a TCP server.
    let (tcp_server, _) = Fixture::tcp().start_server(ServerConfig::default()).await;
    let rdma_client = fx.client();
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
    let (rdma_server, _) = fx.start_server(ServerConfig::default()).await;
    let tcp_client = Fixture::tcp().client();
    let (rsp, payload) = tcp_client
        .call::<Echo>(
            rdma_server.local_addr(),
            &text("tcp"),
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
    nothing_left_behind().await;
}

#[tokio::test]
async fn a_restarted_server_is_reconnected() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let fx = Fixture::rdma(rdma.clone());
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let addr = server.local_addr().to_string();
    let client = fx.client();
    client
        .call::<Echo>(
            &addr,
            &EchoReq::default(),
            Bytes::from_static(b"one"),
            &opts(TIMEOUT_MS),
        )
        .await
        .expect("first server");
    server.shutdown().await;
    let server = fx.start_server_at(&addr, ServerConfig::default()).await.0;
    // The first call may find its pooled connection dead; a retry policy
    // (as the storage client has) reconnects.
    let mut retrying = opts(TIMEOUT_MS);
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
    nothing_left_behind().await;
}

/// One credit and 4 KiB messages: every frame of a 200 KB payload waits for
/// the peer to hand back its one credit, on both sides, with 32 calls at
/// once. All complete, each with its own bytes (credits run out constantly
/// and never deadlock), and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_complete_when_credits_run_out_all_the_time() {
    let _serial = SERIAL.lock().await;
    let rdma = transport_with(ConnectionConfig {
        credits: 1,
        message_bytes_max: 4096,
        ..ConnectionConfig::default()
    });
    let fx = Fixture::rdma(rdma.clone());
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..32u8 {
        let client = client.clone();
        let addr = server.local_addr().to_string();
        calls.spawn(async move {
            let data = Bytes::from(vec![n; 200_000]);
            let (rsp, payload) = client
                .call::<Echo>(&addr, &text(n.to_string()), data.clone(), &opts(TIMEOUT_MS))
                .await
                .expect("echo with one credit");
            assert_eq!(rsp.text, n.to_string());
            assert_eq!(payload.into_bytes(), Some(data));
        });
    }
    while let Some(done) = calls.join_next().await {
        done.expect("a call task");
    }
    drop(client);
    server.shutdown().await;
    nothing_left_behind().await;
}

/// Connections made and torn down over and over (a reconnect storm: each
/// cycle a new client, an authenticated RDMA set-up, a one-sided call, and
/// the teardown), with a server restart halfway: the queue pairs, completion
/// queues and memory regions return to what the device itself holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storms_leave_nothing_behind() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let pool = registered_pool(&rdma, vec![(64 << 10, 8)]);
    let baseline = live_counts();
    let fx = Fixture::rdma(rdma.clone());
    let (mut server, _) = fx.start_server(ServerConfig::default()).await;
    let addr = server.local_addr().to_string();
    // 200 by default (each cycle a TLS handshake too; flyfs-rdma's
    // guest_verbs runs 1000 bare ones); FLYFS_RDMA_RPC_STORM_CYCLES for a
    // long run.
    let cycles: usize = std::env::var("FLYFS_RDMA_RPC_STORM_CYCLES")
        .ok()
        .map(|cycles| {
            cycles
                .parse()
                .expect("FLYFS_RDMA_RPC_STORM_CYCLES is a count")
        })
        .unwrap_or(200);
    for cycle in 0..cycles {
        if cycle == cycles / 2 {
            server.shutdown().await;
            server = fx.start_server_at(&addr, ServerConfig::default()).await.0;
        }
        let client = fx.client();
        let mut buf = pool.alloc(50_000);
        buf.fill(cycle as u8);
        let data = Bytes::from_owner(buf);
        let (_, payload) = client
            .call::<Echo>(&addr, &EchoReq::default(), data.clone(), &opts(TIMEOUT_MS))
            .await
            .expect("a call on a fresh connection");
        assert_eq!(payload.into_bytes(), Some(data), "cycle {cycle}");
    }
    server.shutdown().await;
    // Every connection's queue pair, completion queue, rings and send
    // slots are gone; what stays is the device's (its arenas and the bounce
    // regions it keeps for reuse, at most a few).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let counts = live_counts();
        if counts.queue_pairs == baseline.queue_pairs
            && counts.completion_queues == baseline.completion_queues
            && counts.memory_regions <= baseline.memory_regions + 4
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "verbs objects left behind after {cycles} connections: {counts:?}, baseline {baseline:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Payload bytes moved (one-sided, copied), summed over every method: the
/// test methods' ids may be those of real methods in the counts' table.
fn moved_totals() -> (u64, u64) {
    flyfs_rpc::metrics::payload_moved_totals().into_iter().fold(
        (0, 0),
        |(one_sided, copied), moved| {
            (
                one_sided + moved.one_sided_bytes,
                copied + moved.copied_bytes,
            )
        },
    )
}

/// A registered pool, and a transport whose clients lend reply buffers
/// from a second registered pool.
fn transport_lending_replies() -> (RdmaTransport, BufferPool, BufferPool) {
    let rdma = transport();
    let pool = registered_pool(&rdma, vec![(64 << 10, 16), (4 << 20, 8)]);
    let replies = registered_pool(&rdma, vec![(64 << 10, 16), (4 << 20, 8)]);
    let lending = {
        let replies = replies.clone();
        rdma.lend_replies_from(move |len| Box::new(replies.alloc(len)))
    };
    (lending, pool, replies)
}

fn registered_bytes(pool: &BufferPool, len: usize, seed: usize) -> Bytes {
    let mut buf = pool.alloc(len);
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = ((i + seed) * 13 % 251) as u8;
    }
    Bytes::from_owner(buf)
}

/// A client that lends a buffer for the reply gets the reply's payload
/// written into it by RDMA WRITE (the frame carries only the count), a
/// batched reply's parts one work request each, back to back; a reply
/// larger than the buffer lent, or a client that lends none, gets the
/// bytes inline, counted as copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_written_into_the_buffer_the_call_lends() {
    let _serial = SERIAL.lock().await;
    let (rdma, pool, _replies) = transport_lending_replies();
    let fx = Fixture::rdma(rdma.clone()).with_server_pool(pool.clone());
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let client = fx.client();
    for len in [1usize, 5000, 64 << 10, 3 << 20] {
        // From a registered buffer of the server (EchoRegistered) and from
        // its heap (Echo: through a bounce region).
        for registered_source in [false, true] {
            let data = registered_bytes(&pool, len, len);
            let request = text(format!("{len} {registered_source}"));
            let before = (flyfs_rdma::transfer_counts(), moved_totals());
            let (rsp, payload) = if registered_source {
                client
                    .call_reading::<EchoRegistered>(
                        server.local_addr(),
                        &request,
                        data.clone(),
                        len,
                        &opts(TIMEOUT_MS),
                    )
                    .await
            } else {
                client
                    .call_reading::<Echo>(
                        server.local_addr(),
                        &request,
                        data.clone(),
                        len,
                        &opts(TIMEOUT_MS),
                    )
                    .await
            }
            .expect("an echo written back");
            assert_eq!(rsp.text, request.text);
            assert_eq!(payload.into_bytes(), Some(data), "{len} bytes");
            let after = (flyfs_rdma::transfer_counts(), moved_totals());
            assert_eq!(
                after.0.one_sided_written - before.0.one_sided_written,
                len as u64,
                "the server wrote the {len} bytes by RDMA WRITE"
            );
            // Pulled and written, each counted by both sides.
            assert_eq!(after.1.0 - before.1.0, 4 * len as u64);
            assert_eq!(after.1.1, before.1.1, "nothing copied");
        }
    }
    // A batched reply: its parts land back to back in one buffer.
    let part = 40_000usize;
    let data = registered_bytes(&pool, part, 7);
    let before = flyfs_rdma::transfer_counts();
    let (rsp, payload) = client
        .call_reading::<Parts>(
            server.local_addr(),
            &text("5"),
            data.clone(),
            5 * part,
            &opts(TIMEOUT_MS),
        )
        .await
        .expect("a reply of five parts");
    assert_eq!(rsp.payload_len, 5 * part as u64);
    let got = payload.into_bytes().expect("the parts' bytes");
    assert_eq!(got.len(), 5 * part);
    for (index, chunk) in got.chunks(part).enumerate() {
        let expected: Vec<u8> = data
            .iter()
            .map(|byte| byte.wrapping_add(index as u8))
            .collect();
        assert!(
            chunk == expected.as_slice(),
            "part {index} landed in its place"
        );
    }
    let after = flyfs_rdma::transfer_counts();
    assert_eq!(
        after.one_sided_written - before.one_sided_written,
        5 * part as u64
    );
    // A reply larger than the buffer lent: inline, and nothing written.
    let before = (flyfs_rdma::transfer_counts(), moved_totals());
    let (_, payload) = client
        .call_reading::<Parts>(
            server.local_addr(),
            &text("3"),
            data.clone(),
            2 * part,
            &opts(TIMEOUT_MS),
        )
        .await
        .expect("a reply larger than the buffer lent");
    assert_eq!(payload.len(), 3 * part);
    let after = (flyfs_rdma::transfer_counts(), moved_totals());
    assert_eq!(after.0.one_sided_written, before.0.one_sided_written);
    // Counted as copied by the server (did not fit) and by the client.
    assert_eq!(after.1.1 - before.1.1, 2 * 3 * part as u64);
    // A client that lends no buffers: inline, counted as copied.
    // (a transport of its own on the same device, without reply buffers)
    let plain = Fixture::rdma(transport()).client();
    let before = (flyfs_rdma::transfer_counts(), moved_totals());
    let (_, payload) = plain
        .call_reading::<Echo>(
            server.local_addr(),
            &EchoReq::default(),
            data.clone(),
            part,
            &opts(TIMEOUT_MS),
        )
        .await
        .expect("a reply to a client lending nothing");
    assert_eq!(payload.into_bytes(), Some(data));
    let after = (flyfs_rdma::transfer_counts(), moved_totals());
    assert_eq!(after.0.one_sided_written, before.0.one_sided_written);
    // That transport registered no arena either: the request's payload
    // went inline too, and both are counted as copied.
    assert_eq!(
        after.1.1 - before.1.1,
        2 * part as u64,
        "request and reply, copied"
    );
    drop((client, plain));
    server.shutdown().await;
    drop((fx, rdma));
    nothing_left_behind().await;
}

/// A landing of one buffer per part of a `Parts` reply, each `part` bytes.
struct PartsLanding {
    buffers: Vec<flyfs_bypass::buf::DmaBuf>,
    part: usize,
}

impl flyfs_rpc::Landing for PartsLanding {
    fn segments(&mut self, body: &[u8], payload_len: usize) -> Option<Vec<&mut [u8]>> {
        let rsp = flyfs_proto::codec::decode::<suite::EchoRsp>(body).ok()?;
        let parts = rsp.payload_len as usize / self.part;
        if rsp.payload_len as usize != payload_len || parts > self.buffers.len() {
            return None;
        }
        Some(
            self.buffers[..parts]
                .iter_mut()
                .map(|buffer| &mut buffer[..self.part])
                .collect(),
        )
    }

    fn part_buffers(&mut self) -> Option<Vec<&mut [u8]>> {
        Some(
            self.buffers
                .iter_mut()
                .map(|buffer| &mut buffer[..self.part])
                .collect(),
        )
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// A call whose landing's buffers all lie in a registered arena lends them
/// (`FLAG_REPLY_SCATTER`): the server RDMA WRITEs part `i` into buffer `i`,
/// nothing is copied, and the call finds the bytes in place. A reply with
/// more parts than buffers comes inline; buffers outside the arenas are not
/// lent; an arena registered until its guard drops is lent no more after.
/// Malformed buffer lists are refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_written_into_the_callers_own_buffers() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    let pool = BufferPool::new(&PoolConfig {
        classes: vec![(64 << 10, 16)],
        ..PoolConfig::default()
    })
    .expect("a buffer pool");
    let registration = rdma
        .register_arena(Arc::new(pool.clone()))
        .expect("registering the pool until the guard drops");
    let fx = Fixture::rdma(rdma.clone());
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let addr = server.local_addr().to_string();
    let client = fx.client();
    let part = 40_000usize;
    // The request's own payload is registered too (sent as a descriptor):
    // a request with inline payload bytes lends nothing for its reply.
    let data = registered_bytes(&pool, part, 11);
    let expected = |index: usize| -> Vec<u8> {
        data.iter()
            .map(|byte| byte.wrapping_add(index as u8))
            .collect()
    };
    let landing = |count: usize| PartsLanding {
        buffers: (0..count)
            .map(|_| {
                let mut buffer = pool.alloc(part);
                buffer.fill(0xee);
                buffer
            })
            .collect(),
        part,
    };
    let (on, to, sent) = (&client, &addr, &data);
    let call = |parts: usize, landing: PartsLanding| async move {
        on.call_landing::<Parts, _>(
            to,
            &text(parts.to_string()),
            sent.clone(),
            landing,
            parts * part,
            &opts(TIMEOUT_MS),
        )
        .await
    };

    // Five parts, five registered buffers: each written in place.
    let before = (flyfs_rdma::transfer_counts(), moved_totals());
    let (landing5, reply) = call(5, landing(5)).await;
    let (rsp, landed) = reply.expect("a reply of five parts");
    assert_eq!(rsp.payload_len, 5 * part as u64);
    assert!(
        matches!(landed, flyfs_rpc::Landed::InPlace(n) if n == 5 * part),
        "{landed:?}"
    );
    for (index, buffer) in landing5.buffers.iter().enumerate() {
        assert!(
            buffer[..part] == expected(index)[..],
            "part {index} written into buffer {index}"
        );
    }
    let after = (flyfs_rdma::transfer_counts(), moved_totals());
    assert_eq!(
        after.0.one_sided_written - before.0.one_sided_written,
        5 * part as u64,
        "the server wrote every part by RDMA WRITE"
    );
    // Nothing copied: the request's payload pulled, the reply's parts
    // written, each counted one-sided at both ends.
    assert_eq!(after.1.1, before.1.1, "nothing copied");
    assert_eq!(after.1.0 - before.1.0, 2 * 6 * part as u64);

    // Three buffers for five parts: the server writes nothing and the reply
    // comes inline; the landing cannot place it, so the caller gets it.
    let (landing3, reply) = call(5, landing(3)).await;
    let (_, landed) = reply.expect("a reply with more parts than buffers");
    let flyfs_rpc::Landed::Payload(payload) = landed else {
        panic!("five parts do not land in three buffers: {landed:?}");
    };
    assert_eq!(payload.len(), 5 * part);
    assert!(
        landing3
            .buffers
            .iter()
            .all(|b| b.iter().all(|byte| *byte == 0xee)),
        "nothing written into buffers the reply did not fit"
    );

    // Heap buffers are not lent: the reply is read into them.
    struct Heap(Vec<Vec<u8>>, usize);
    impl flyfs_rpc::Landing for Heap {
        fn segments(&mut self, _body: &[u8], len: usize) -> Option<Vec<&mut [u8]>> {
            (len == self.0.len() * self.1).then(|| self.0.iter_mut().map(|b| &mut b[..]).collect())
        }
        fn part_buffers(&mut self) -> Option<Vec<&mut [u8]>> {
            Some(self.0.iter_mut().map(|b| &mut b[..]).collect())
        }
        fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
            self
        }
    }
    let before = flyfs_rdma::transfer_counts();
    let (heap, reply) = client
        .call_landing::<Parts, _>(
            &addr,
            &text("2"),
            data.clone(),
            Heap(vec![vec![0; part]; 2], part),
            2 * part,
            &opts(TIMEOUT_MS),
        )
        .await;
    let (_, landed) = reply.expect("a reply read into heap buffers");
    assert!(
        matches!(landed, flyfs_rpc::Landed::InPlace(_)),
        "{landed:?}"
    );
    assert_eq!(heap.0[1], expected(1));
    assert_eq!(
        flyfs_rdma::transfer_counts().one_sided_written,
        before.one_sided_written,
        "nothing written one-sided into memory that is not registered"
    );

    // Once the registration's guard drops, the pool is lent no more (nor
    // is the request's payload, which goes inline).
    let regions = rdma.device().arena_count();
    drop(registration);
    assert_eq!(rdma.device().arena_count(), regions - 1);
    let before = flyfs_rdma::transfer_counts();
    let (landing2, reply) = call(2, landing(2)).await;
    let (_, landed) = reply.expect("a reply after the arena was deregistered");
    assert!(
        matches!(landed, flyfs_rpc::Landed::InPlace(_)),
        "{landed:?}"
    );
    assert!(landing2.buffers[1][..part] == expected(1)[..]);
    assert_eq!(
        flyfs_rdma::transfer_counts().one_sided_written,
        before.one_sided_written
    );

    // Malformed lists of buffers, from a hostile client.
    let scatter = flyfs_proto::frame::FLAG_REPLY_SINK | flyfs_proto::frame::FLAG_REPLY_SCATTER;
    let body = flyfs_proto::codec::try_encode(&text("1")).expect("encodes");
    let timeout = Duration::from_secs(60);
    for (payload, reason) in [
        (Bytes::from_static(b"\x01"), "4-byte count"),
        (
            Bytes::from(0u32.to_le_bytes().to_vec()),
            "names 0 reply buffers",
        ),
        (
            Bytes::from(5000u32.to_le_bytes().to_vec()),
            "names 5000 reply buffers",
        ),
        (
            Bytes::from(2u32.to_le_bytes().to_vec()),
            "and their count, 36 bytes",
        ),
        (
            {
                let mut zero = descriptor(4096, 1, 0).to_vec();
                zero.extend_from_slice(&1u32.to_le_bytes());
                Bytes::from(zero)
            },
            "a reply buffer of 0 bytes",
        ),
    ] {
        let error = client
            .call_with_flags(&addr, Parts::ID, scatter, (body.clone(), payload), timeout)
            .await
            .expect_err("a malformed list of reply buffers");
        assert_eq!(error.status(), Some(Status::BadRequest), "{error}");
        assert!(error.to_string().contains(reason), "{reason}: {error}");
    }
    drop((landing5, landing3, landing2, client));
    server.shutdown().await;
    drop((fx, rdma, pool));
    nothing_left_behind().await;
}

/// The 16 bytes of a buffer descriptor (docs/rdma-transport.md).
fn descriptor(addr: u64, rkey: u32, len: u32) -> Bytes {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&addr.to_le_bytes());
    out.extend_from_slice(&rkey.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    Bytes::from(out)
}

/// What a hostile (or broken) client can name is bounded per call: a
/// descriptor of more bytes than the call takes, or more than any payload
/// may have, is refused before anything is read; one naming memory it
/// never registered fails only that call (the device refuses the READ),
/// with a clear error, and the next call reconnects; a reply buffer too
/// small for the reply is not written at all (the reply comes inline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_outside_the_call_are_refused() {
    let _serial = SERIAL.lock().await;
    let (rdma, pool, _replies) = transport_lending_replies();
    let fx = Fixture::rdma(rdma.clone());
    let (server, _) = fx.start_server(ServerConfig::default()).await;
    let addr = server.local_addr().to_string();
    let client = fx.client();
    let timeout = Duration::from_secs(60);
    let body = |words: &str| flyfs_proto::codec::try_encode(&text(words)).expect("encodes");
    let data = registered_bytes(&pool, 10_000, 3);
    let (region, offset) = rdma
        .device()
        .find_arena(data.as_ptr(), data.len())
        .expect("the data lies in a registered arena");
    let at = region.addr() + offset as u64;
    let remote = flyfs_proto::frame::FLAG_PAYLOAD_REMOTE;
    let sink_flag = flyfs_proto::frame::FLAG_REPLY_SINK;

    // The call takes 5000 bytes; the descriptor names 10 000.
    let error = client
        .call_with_flags(
            &addr,
            EchoSized::ID,
            remote,
            (body("5000"), descriptor(at, region.rkey(), 10_000)),
            timeout,
        )
        .await
        .expect_err("a descriptor naming more than the call takes");
    assert_eq!(error.status(), Some(Status::BadRequest), "{error}");
    assert!(
        error
            .to_string()
            .contains("payload is 10000 bytes, expected 5000"),
        "{error}"
    );
    // More than any payload may have: refused before anything is held.
    let error = client
        .call_with_flags(
            &addr,
            Echo::ID,
            remote,
            (body(""), descriptor(at, region.rkey(), u32::MAX)),
            timeout,
        )
        .await
        .expect_err("a descriptor of 4 GiB");
    assert_eq!(error.status(), Some(Status::BadRequest), "{error}");
    assert!(
        error
            .to_string()
            .contains("a remote payload of 4294967295 bytes"),
        "{error}"
    );
    // A reply buffer with no room for its descriptor.
    let error = client
        .call_with_flags(
            &addr,
            Echo::ID,
            sink_flag,
            (body(""), Bytes::from_static(b"short")),
            timeout,
        )
        .await
        .expect_err("a reply buffer descriptor cut short");
    assert_eq!(error.status(), Some(Status::BadRequest), "{error}");
    assert!(error.to_string().contains("16-byte descriptor"), "{error}");

    // Memory this client never registered: the device refuses the READ;
    // that call fails, naming the transfer, and the connection is rebuilt.
    let error = client
        .call_with_flags(
            &addr,
            Echo::ID,
            remote,
            (
                body(""),
                descriptor(region.addr() + region.len() as u64, region.rkey(), 4096),
            ),
            timeout,
        )
        .await
        .expect_err("a descriptor outside the registered region");
    assert!(
        matches!(&error, RpcError::Disconnected { .. })
            || error
                .to_string()
                .contains("one-sided payload transfer failed"),
        "{error}"
    );
    let mut retrying = opts(TIMEOUT_MS);
    retrying.retry.attempts = 3;
    let (_, payload) = client
        .call::<Echo>(&addr, &EchoReq::default(), data.clone(), &retrying)
        .await
        .expect("the next call, on a new connection");
    assert_eq!(payload.into_bytes(), Some(data.clone()));

    // A reply buffer smaller than the reply: nothing is written into it,
    // not even its first bytes; the reply comes inline.
    let mut lent = pool.alloc(4096);
    lent.fill(0xee);
    let (lent_region, lent_offset) = rdma
        .device()
        .find_arena(lent.as_ptr(), lent.len())
        .expect("the buffer lies in a registered arena");
    let sink = descriptor(
        lent_region.addr() + lent_offset as u64,
        lent_region.rkey(),
        4096,
    );
    let mut payload = descriptor(at, region.rkey(), 10_000).to_vec();
    payload.extend_from_slice(&sink);
    let reply = client
        .call_with_flags(
            &addr,
            Echo::ID,
            remote | sink_flag,
            (body(""), Bytes::from(payload)),
            timeout,
        )
        .await
        .expect("a reply too large for the buffer named comes inline");
    assert_eq!(reply.payload.into_bytes(), Some(data.clone()));
    assert!(
        lent.iter().all(|byte| *byte == 0xee),
        "the server wrote into a buffer too small"
    );
    drop((lent, lent_region, region));
    drop(client);
    server.shutdown().await;
    drop((fx, rdma));
    nothing_left_behind().await;
}

/// Bytes written just before one end closes all arrive at the other, and
/// then the end of the stream, whichever end closes (the side that
/// connected or the one that accepted): the closing pump waits until the
/// peer's device acknowledged every message, and the peer hands on every
/// message announced before it lets go. A small write (as an error frame
/// before a server closes), and one of many messages, more than the
/// credits, closed while most of it is still in the pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_written_just_before_a_close_arrive() {
    let _serial = SERIAL.lock().await;
    let rdma = transport();
    for closing_side in ["connecting", "accepting"] {
        for len in [100usize, 1 << 20] {
            let (connecting, accepting) = testing::rdma_stream_pair(&rdma)
                .await
                .expect("an RDMA connection on the guest's device");
            let (mut closing, mut reading) = match closing_side {
                "connecting" => (connecting, accepting),
                _ => (accepting, connecting),
            };
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let writer = tokio::spawn({
                let data = data.clone();
                async move {
                    closing
                        .write_all(&data)
                        .await
                        .expect("writing into the pipe");
                    // Dropped at once, both directions, as a client drops a
                    // connection: the pump sees the end with bytes still in
                    // the pipe and messages still posted.
                    drop(closing);
                }
            });
            let mut got = Vec::with_capacity(len);
            tokio::time::timeout(
                Duration::from_millis(TIMEOUT_MS),
                reading.read_to_end(&mut got),
            )
            .await
            .unwrap_or_else(|_| {
                panic!("{closing_side} side closing after {len} bytes: no end of stream")
            })
            .expect("reading to the end");
            writer.await.expect("the writer");
            assert_eq!(
                got.len(),
                len,
                "{closing_side} side closing: bytes received before the end of stream"
            );
            assert!(got == data, "{closing_side} side closing: the bytes differ");
        }
    }
    drop(rdma);
    nothing_left_behind().await;
}
