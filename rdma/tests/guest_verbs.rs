//! The verbs layer on a real RDMA device: Soft-RoCE (`rdma_rxe`) in the QEMU
//! guest (`shared/vm/guest --rxe`, docs in shared/vm/README.md). Both ends
//! of every connection live in this process and reach each other through
//! the device's loopback, as separate processes on one rxe device do.
//!
//! A guest-only test: it reads `FLYFS_RXE_DEV` and `FLYFS_RXE_GID_INDEX`,
//! which the guest sets, and fails (does not skip) without them, so a run
//! that silently lost its device cannot pass. scripts/test-guest runs it:
//!
//! ```text
//! CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="shared/vm/guest --rxe --" \
//!     cargo test -p flyfs-rdma --test guest_verbs
//! ```

use std::sync::Arc;
use std::time::Duration;

use flyfs_rdma::{
    Access, Connection, ConnectionConfig, Device, LiveCounts, PendingConnection, RdmaError,
    RemoteBuffer, live_counts, transfer_counts,
};

/// The tests compare process-wide object counts, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this test in the guest (shared/vm/guest --rxe)")
    })
}

fn device() -> Arc<Device> {
    let name = env("FLYFS_RXE_DEV");
    let gid_index: u8 = env("FLYFS_RXE_GID_INDEX")
        .parse()
        .expect("FLYFS_RXE_GID_INDEX is a small integer");
    Device::open(&name, gid_index).expect("opening the guest's rxe device")
}

fn pair(device: &Arc<Device>, config: ConnectionConfig) -> (Connection, Connection) {
    let a = PendingConnection::new(device, config).expect("side a");
    let b = PendingConnection::new(device, config).expect("side b");
    let (a_endpoint, b_endpoint) = (a.local_endpoint(), b.local_endpoint());
    // What travels over the authenticated channel: the encoded parameters.
    let a_seen = flyfs_rdma::Endpoint::decode(&b_endpoint.encode()).expect("b's parameters");
    let b_seen = flyfs_rdma::Endpoint::decode(&a_endpoint.encode()).expect("a's parameters");
    (
        a.connect(&a_seen).expect("connecting a"),
        b.connect(&b_seen).expect("connecting b"),
    )
}

fn config() -> ConnectionConfig {
    ConnectionConfig {
        credits: 4,
        message_bytes_max: 4096,
        one_sided_max: 16,
        completion_timeout: Duration::from_secs(20),
    }
}

/// Waits (on the condition, up to a generous bound for an emulated,
/// loaded machine) until the live verbs objects are back to `baseline`.
async fn counts_return_to(baseline: LiveCounts) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = live_counts();
        if now == baseline {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "verbs objects leaked: {now:?}, baseline {baseline:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_wrong_device_name_lists_the_devices_present() {
    let _serial = SERIAL.lock().await;
    let present = env("FLYFS_RXE_DEV");
    let error = Device::open("no-such-device0", 1).expect_err("no such device");
    let text = error.to_string();
    assert!(matches!(error, RdmaError::NoDevice { .. }), "{text}");
    assert!(
        text.contains("no-such-device0") && text.contains(&present),
        "{text}"
    );
}

#[tokio::test]
async fn messages_arrive_in_order_under_credits() {
    let _serial = SERIAL.lock().await;
    let device = device();
    let (a, b) = pair(&device, config());
    let before = transfer_counts();
    // Many more messages than credits: the sender waits for the consumer.
    let count = 40u32;
    let sender = async {
        for index in 0..count {
            let message = vec![index as u8; 1 + (index as usize * 97) % 4096];
            a.send(&message).await.expect("send");
        }
    };
    let receiver = async {
        for index in 0..count {
            let message = b.recv().await.expect("recv");
            assert_eq!(message.len(), 1 + (index as usize * 97) % 4096);
            assert!(
                message.iter().all(|&byte| byte == index as u8),
                "message {index}"
            );
        }
    };
    tokio::join!(sender, receiver);
    // And back the other way, with credits flowing on data messages.
    b.send(b"pong").await.expect("send back");
    assert_eq!(a.recv().await.expect("recv back"), b"pong");
    let moved = transfer_counts();
    assert!(moved.sent_copied > before.sent_copied);
    assert_eq!(
        moved.received_copied - before.received_copied,
        moved.sent_copied - before.sent_copied
    );
    let error = a.send(&[0; 4097]).await.expect_err("too large");
    assert!(
        matches!(
            error,
            RdmaError::MessageTooLarge {
                len: 4097,
                max: 4096
            }
        ),
        "{error}"
    );
    assert!(a.broken().is_none() && b.broken().is_none());
}

#[tokio::test]
async fn a_sender_without_credits_waits_and_a_consumer_releases_it() {
    let _serial = SERIAL.lock().await;
    let device = device();
    let mut short = config();
    short.completion_timeout = Duration::from_millis(500);
    let (a, b) = pair(&device, short);
    for index in 0..4u8 {
        a.send(&[index]).await.expect("within credits");
    }
    // The peer's ring is full of unconsumed messages: no credit, no send.
    let error = a.send(&[9]).await.expect_err("no credits");
    assert!(
        matches!(error, RdmaError::CompletionTimeout { .. }),
        "{error}"
    );
    assert!(a.broken().is_none(), "waiting for credits is not a failure");
    for index in 0..4u8 {
        assert_eq!(b.recv().await.expect("recv"), [index]);
    }
    a.send(&[4]).await.expect("credits returned");
    assert_eq!(b.recv().await.expect("recv"), [4]);
}

#[tokio::test]
async fn one_sided_reads_and_writes_move_registered_memory() {
    let _serial = SERIAL.lock().await;
    let device = device();
    let (a, b) = pair(&device, config());
    let chunk = 64 << 10;
    let remote = device
        .alloc_region(8 * chunk, Access::Remote)
        .expect("remote region");
    let local = device
        .alloc_region(8 * chunk, Access::Remote)
        .expect("local region");
    let pattern: Vec<u8> = (0..8 * chunk)
        .map(|index| (index * 31 % 251) as u8)
        .collect();
    remote.write(0, &pattern).expect("fill");
    let before = transfer_counts();

    // One READ of the first chunk.
    let whole = RemoteBuffer::of(&remote, 0, chunk as u32).expect("in region");
    a.read(&local, 0, whole).await.expect("RDMA READ");
    let mut got = vec![0; chunk];
    local.read(0, &mut got).expect("copy out");
    assert_eq!(got, pattern[..chunk]);

    // A batch: one work request per chunk, into reversed positions.
    let entries: Vec<_> = (0..8)
        .map(|index| {
            let remote = RemoteBuffer::of(&remote, index * chunk, chunk as u32).expect("in region");
            (local.clone(), (7 - index) * chunk, remote)
        })
        .collect();
    a.read_batch(&entries).await.expect("batched READs");
    for index in 0..8 {
        local.read((7 - index) * chunk, &mut got).expect("copy out");
        assert_eq!(
            got,
            pattern[index * chunk..(index + 1) * chunk],
            "chunk {index}"
        );
    }

    // A WRITE into the peer's region.
    local.write(0, &[0xab; 4096]).expect("fill");
    let target = RemoteBuffer::of(&remote, 3 * chunk, 4096).expect("in region");
    a.write(&local, 0, target).await.expect("RDMA WRITE");
    let mut written = vec![0; 4096];
    remote.read(3 * chunk, &mut written).expect("copy out");
    assert!(written.iter().all(|&byte| byte == 0xab));

    let moved = transfer_counts();
    assert_eq!(
        moved.one_sided_read - before.one_sided_read,
        9 * chunk as u64
    );
    assert_eq!(moved.one_sided_written - before.one_sided_written, 4096);
    assert!(b.broken().is_none());

    // A local range outside its region is refused before anything is posted.
    let error = a
        .read(&local, 8 * chunk - 10, whole)
        .await
        .expect_err("outside");
    assert!(matches!(error, RdmaError::OutOfRegion { .. }), "{error}");
    assert!(a.broken().is_none());
}

#[tokio::test]
async fn an_invalid_remote_key_fails_that_connection_only() {
    let _serial = SERIAL.lock().await;
    let device = device();
    let (a, _b) = pair(&device, config());
    let (c, d) = pair(&device, config());
    let local = device.alloc_region(4096, Access::Remote).expect("region");
    let remote = device.alloc_region(4096, Access::Remote).expect("region");
    let mut bogus = RemoteBuffer::of(&remote, 0, 4096).expect("in region");
    bogus.rkey ^= 0x00ff_ff00;
    let error = a.read(&local, 0, bogus).await.expect_err("invalid rkey");
    assert!(matches!(error, RdmaError::Completion { .. }), "{error}");
    assert!(a.broken().is_some());
    let after = a.send(b"x").await.expect_err("broken");
    assert!(matches!(after, RdmaError::Broken { .. }), "{after}");
    // The other connection on the same device carries on.
    c.send(b"still here").await.expect("other connection");
    assert_eq!(d.recv().await.expect("other connection"), b"still here");

    // A region freed under a peer that still holds its key: the same.
    let (e, _f) = pair(&device, config());
    let doomed = device.alloc_region(4096, Access::Remote).expect("region");
    let stale = RemoteBuffer::of(&doomed, 0, 4096).expect("in region");
    drop(doomed);
    let error = e
        .write(&local, 0, stale)
        .await
        .expect_err("deregistered region");
    assert!(matches!(error, RdmaError::Completion { .. }), "{error}");
}

#[tokio::test]
async fn a_dead_peer_fails_the_calls_in_flight() {
    let _serial = SERIAL.lock().await;
    let device = device();
    let (a, b) = pair(&device, config());
    let local = device.alloc_region(4096, Access::Remote).expect("region");
    let remote = device.alloc_region(4096, Access::Remote).expect("region");
    let target = RemoteBuffer::of(&remote, 0, 4096).expect("in region");
    a.read(&local, 0, target)
        .await
        .expect("while the peer lives");
    // The peer's QP disappears (its process died) while a batch of reads
    // is in flight: each read either completed before or fails; none hangs.
    let queue_pairs = live_counts().queue_pairs;
    let big = device
        .alloc_region(16 * 4096, Access::Remote)
        .expect("region");
    let entries: Vec<_> = (0..16)
        .map(|index| (big.clone(), index * 4096, target))
        .collect();
    let in_flight = a.read_batch(&entries);
    let kill = async move { drop(b) };
    let (outcome, ()) = tokio::join!(in_flight, kill);
    if let Err(error) = outcome {
        assert!(
            matches!(
                error,
                RdmaError::Completion { .. } | RdmaError::Broken { .. }
            ),
            "{error}"
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while live_counts().queue_pairs >= queue_pairs {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the peer's QP was not destroyed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let error = a.read(&local, 0, target).await.expect_err("peer is gone");
    assert!(
        matches!(
            error,
            RdmaError::Completion { .. } | RdmaError::CompletionTimeout { .. }
        ),
        "{error}"
    );
    let error = a.send(b"anyone?").await.expect_err("broken");
    assert!(matches!(error, RdmaError::Broken { .. }), "{error}");
}

/// The kernel's own count of the device's objects, from rdma-core's
/// `rdma resource show` (`0: rxe0: pd 1 cq 2 qp 1 cm_id 0 mr 3 ctx 1 srq 0`):
/// what the driver holds, whatever flyfs's counters say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KernelCounts {
    queue_pairs: u64,
    completion_queues: u64,
    memory_regions: u64,
}

fn kernel_counts() -> KernelCounts {
    let device = env("FLYFS_RXE_DEV");
    let output = std::process::Command::new("rdma")
        .args(["resource", "show"])
        .output()
        .expect("running `rdma resource show` (iproute2)");
    assert!(output.status.success(), "rdma resource show: {output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|line| line.contains(&format!("{device}:")))
        .unwrap_or_else(|| panic!("no line for {device} in `rdma resource show`: {text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let count = |name: &str| -> u64 {
        words
            .windows(2)
            .find(|pair| pair[0] == name)
            .and_then(|pair| pair[1].parse().ok())
            .unwrap_or_else(|| panic!("no {name} count in {line:?}"))
    };
    KernelCounts {
        queue_pairs: count("qp"),
        completion_queues: count("cq"),
        memory_regions: count("mr"),
    }
}

/// Waits until the kernel's counts are back to `baseline`.
async fn kernel_counts_return_to(baseline: KernelCounts) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = kernel_counts();
        if now == baseline {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the kernel holds more than before: {now:?}, baseline {baseline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connect/fail cycles: `FLYFS_RDMA_STORM_CYCLES` of them (1000 by default,
/// raise it for a long run).
fn storm_cycles() -> usize {
    std::env::var("FLYFS_RDMA_STORM_CYCLES")
        .ok()
        .map(|cycles| cycles.parse().expect("FLYFS_RDMA_STORM_CYCLES is a count"))
        .unwrap_or(1000)
}

/// A memory region deregistered while the peer's READ of it is in flight:
/// the READ fails with a clear error (a remote access error), only that
/// connection breaks, and a new connection works at once.
#[tokio::test]
async fn a_region_deregistered_mid_transfer_fails_that_transfer() {
    let _serial = SERIAL.lock().await;
    let device = device();
    let baseline = live_counts();
    let (a, b) = pair(&device, config());
    let local = device
        .alloc_region(16 * 65536, Access::Remote)
        .expect("region");
    let remote = device.alloc_region(65536, Access::Remote).expect("region");
    let target = RemoteBuffer::of(&remote, 0, 65536).expect("in region");
    a.read(&local, 0, target)
        .await
        .expect("while it is registered");
    let entries: Vec<_> = (0..16)
        .map(|index| (local.clone(), index * 65536, target))
        .collect();
    let in_flight = a.read_batch(&entries);
    // The owner deregisters it (its last holder drops it) while the batch
    // is posted: each READ either finished before or fails.
    let deregister = async move { drop(remote) };
    let (outcome, ()) = tokio::join!(in_flight, deregister);
    let error = match outcome {
        Err(error) => error,
        // All 16 finished before the region went: a READ now must fail.
        Ok(()) => a
            .read(&local, 0, target)
            .await
            .expect_err("the region is deregistered"),
    };
    assert!(
        matches!(
            error,
            RdmaError::Completion { .. } | RdmaError::Broken { .. }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("RDMA READ") || error.to_string().contains("broken"),
        "the error names the transfer: {error}"
    );
    assert!(a.broken().is_some(), "the connection is broken");
    drop((a, b));
    // A new connection (the rebuilt one) moves data at once.
    let (a, b) = pair(&device, config());
    let fresh = device.alloc_region(4096, Access::Remote).expect("region");
    a.read(
        &local,
        0,
        RemoteBuffer::of(&fresh, 0, 4096).expect("in region"),
    )
    .await
    .expect("a READ on the new connection");
    drop((a, b, entries, local, fresh));
    counts_return_to(baseline).await;
}

/// A peer that takes messages in but never consumes them never returns a
/// credit: the sender sends what its credits allow, then each further send
/// waits at most the completion timeout and fails without breaking the
/// connection, any number of times; nothing is held beyond the ring, and
/// all of it goes with the connection.
#[tokio::test]
async fn a_peer_that_never_returns_credits_holds_nothing_more() {
    let _serial = SERIAL.lock().await;
    let device = device();
    let baseline = live_counts();
    let kernel_baseline = kernel_counts();
    let mut short = config();
    short.completion_timeout = Duration::from_millis(200);
    let (a, b) = pair(&device, short);
    for index in 0..4u8 {
        a.send(&[index]).await.expect("within credits");
    }
    let during = live_counts();
    for _ in 0..10 {
        let started = tokio::time::Instant::now();
        let error = a.send(&[9]).await.expect_err("no credits");
        assert!(
            matches!(error, RdmaError::CompletionTimeout { .. }),
            "{error}"
        );
        // Bounded: the timeout, plus the emulated machine's slowness.
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(a.broken().is_none(), "waiting for credits is not a failure");
        assert_eq!(live_counts(), during, "a waiting send holds nothing new");
    }
    drop((a, b));
    counts_return_to(baseline).await;
    kernel_counts_return_to(kernel_baseline).await;
}

/// Closing without losing messages (docs/rdma-transport.md, "Closing"):
/// once `drain` returns, every message posted is in the peer's ring, so the
/// sender may tear its queue pair down at once and the peer still takes
/// exactly the count announced, even after its own connection broke; a
/// count larger than what was sent fails the wait, in bounded time, naming
/// both numbers.
#[tokio::test]
async fn drained_messages_survive_the_senders_teardown() {
    let _serial = SERIAL.lock().await;
    let device = device();
    let baseline = live_counts();
    let (a, b) = pair(&device, config());
    // As many messages as the credits allow without a consumer: all posted,
    // none taken yet.
    for index in 0..4u8 {
        a.send_posted(&[index; 100])
            .await
            .expect("posted within credits");
    }
    a.drain().await.expect("every posted message acknowledged");
    let announced = a.data_messages_sent();
    assert_eq!(announced, 4);
    // The sender goes away at once, as a closing side does after its notice.
    a.break_with("closed after draining".into());
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for index in 0..4u8 {
        let message = b
            .recv_announced(announced, deadline)
            .await
            .expect("an announced message")
            .expect("not all taken yet");
        assert_eq!(message, vec![index; 100], "message {index} in order");
    }
    assert_eq!(
        b.recv_announced(announced, deadline)
            .await
            .expect("the end"),
        None,
        "all {announced} taken"
    );
    // A peer announcing more than it sent: a bounded wait, then an error.
    let started = tokio::time::Instant::now();
    let short = tokio::time::Instant::now() + Duration::from_millis(300);
    let error = b
        .recv_announced(announced + 1, short)
        .await
        .expect_err("one more than was sent");
    assert!(
        matches!(
            error,
            RdmaError::Announced {
                announced: 5,
                taken: 4
            }
        ),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(b);
    counts_return_to(baseline).await;
}

#[tokio::test]
async fn connect_and_fail_cycles_leak_nothing() {
    let _serial = SERIAL.lock().await;
    let device = device();
    let remote = device.alloc_region(4096, Access::Remote).expect("region");
    let baseline = live_counts();
    let kernel_baseline = kernel_counts();
    let cycles = storm_cycles();
    for cycle in 0..cycles {
        let (a, b) = pair(&device, config());
        a.send(&[cycle as u8]).await.expect("send");
        assert_eq!(b.recv().await.expect("recv"), [cycle as u8]);
        let local = device.alloc_region(4096, Access::Remote).expect("region");
        let mut bogus = RemoteBuffer::of(&remote, 0, 4096).expect("in region");
        bogus.rkey = bogus.rkey.wrapping_add(0x100);
        a.read(&local, 0, bogus).await.expect_err("invalid rkey");
        // b sees the connection die too (its peer's QP errored), or is
        // dropped first: both paths must free everything.
        if cycle % 2 == 0 {
            drop(b);
            drop(a);
        } else {
            drop(a);
            drop(b);
        }
    }
    counts_return_to(baseline).await;
    kernel_counts_return_to(kernel_baseline).await;
}
