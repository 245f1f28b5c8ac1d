//! A storage call that times out fails alone: the calls beside it on the
//! same node's connections go on. The cluster is the in-process one (real
//! storage nodes over TCP); the head of chain 1 serves through a wrapper
//! around its real service that holds back chosen writes, as a slow request
//! on a live node would be held.
//!
//! Before, the client closed every connection to a node when one call to it
//! timed out, so every call in flight there failed and was sent again: a
//! storm of retries from one slow request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_fs_meta::testing::{ClusterOptions, TestCluster};
use flyfs_proto::Method;
use flyfs_proto::ids::{ChainId, ChunkId, ClientId};
use flyfs_proto::wire::storage::{Write, WriteReq};
use flyfs_rpc::{Reply, Request, Service, Tcp};
use tokio::sync::Notify;

const CHUNK: u32 = 64 << 10;
const INODE: u64 = 0x7173;
/// The client's RPC timeout: the victim's first attempt outlives it.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a held write waits at most, so a broken test ends.
const HOLD_MAX: Duration = Duration::from_secs(60);

/// What the wrapper saw and when it lets held writes go.
#[derive(Default)]
struct Faults {
    victim: AtomicU32,
    slow: AtomicU32,
    arrived: Notify,
    victim_retried: Notify,
}

/// The node's real service, with the first write of the victim chunk held
/// until the test ends and the first write of the slow chunk held until the
/// victim's retry arrives (so it is in flight when the victim times out).
struct Holding<S> {
    inner: Arc<S>,
    faults: Arc<Faults>,
}

impl<S: Service> Service for Holding<S> {
    async fn call(&self, request: Request) -> Reply {
        if request.method == Write::ID
            && let Ok(req) = flyfs_proto::codec::decode::<WriteReq>(&request.body)
        {
            let faults = &self.faults;
            if req.chunk == victim() {
                let seen = faults.victim.fetch_add(1, Ordering::SeqCst);
                faults.arrived.notify_waiters();
                if seen == 0 {
                    tokio::time::sleep(HOLD_MAX).await;
                } else {
                    faults.victim_retried.notify_one();
                }
            } else if req.chunk == slow() {
                let seen = faults.slow.fetch_add(1, Ordering::SeqCst);
                faults.arrived.notify_waiters();
                if seen == 0 {
                    let _ = tokio::time::timeout(HOLD_MAX, faults.victim_retried.notified()).await;
                }
            }
        }
        self.inner.call(request).await
    }

    fn roles(&self, method: u16) -> Option<flyfs_proto::Roles> {
        self.inner.roles(method)
    }

    fn reply_bytes_max(&self, method: u16, body: &[u8]) -> u64 {
        self.inner.reply_bytes_max(method, body)
    }
}

fn victim() -> ChunkId {
    ChunkId::new(INODE, 0)
}

fn slow() -> ChunkId {
    ChunkId::new(INODE, 1)
}

/// Waits until `seen` holds of what the wrapper counted.
async fn wait_seen(faults: &Faults, what: &str, seen: impl Fn(&Faults) -> bool) {
    let waited = tokio::time::timeout(HOLD_MAX, async {
        loop {
            let arrived = faults.arrived.notified();
            if seen(faults) {
                return;
            }
            arrived.await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the head never saw {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "not yet working (deadline): in its first run the victim's write succeeded within \
            2.6 s after one arrival at node 0, so the held write was not the one the client \
            waited on (chain 1's head after node 0's restart is probably no longer node 0); \
            the fault placement needs fixing before this test can judge the fix"]
async fn a_timed_out_write_leaves_the_writes_beside_it_running() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    // Chain 1's replicas are nodes 0, 1, 2 in that order: node 0 is the head
    // every write of chain 1 goes to first.
    let faults = Arc::new(Faults::default());
    let head = &mut cluster.nodes[0];
    head.stop().await;
    let wrapper_faults = faults.clone();
    head.start_wrapped(move |inner| {
        Arc::new(Holding {
            inner,
            faults: wrapper_faults,
        })
    })
    .await;
    cluster.wait_all_serving(Duration::from_secs(60)).await;

    let mut config = ClientConfig::new([cluster.mgmt_addr.clone()], ClientId(0x7173));
    config.rpc_timeout = RPC_TIMEOUT;
    config.op_deadline = Duration::from_secs(60);
    let client = StorageClient::new(config, Tcp, flyfs_rpc::testing::client());
    client.refresh_routing().await.expect("routing");
    let write = |chunk: ChunkId, byte: u8| {
        let client = client.clone();
        tokio::spawn(async move {
            let data = Bytes::from(vec![byte; 4096]);
            client.write(ChainId(1), chunk, 0, data, CHUNK).await
        })
    };

    let victim_write = write(victim(), 0x11);
    wait_seen(&faults, "the victim's write", |f| {
        f.victim.load(Ordering::SeqCst) >= 1
    })
    .await;
    let slow_write = write(slow(), 0x22);
    wait_seen(&faults, "the slow write", |f| {
        f.slow.load(Ordering::SeqCst) >= 1
    })
    .await;

    // The victim's first attempt times out; its retry lets the slow write
    // go, which has been in flight on the head's connections all along.
    let victim_done = victim_write.await.expect("victim task");
    victim_done.expect("the victim's write succeeds on its retry");
    let slow_done = slow_write.await.expect("slow task");
    slow_done.expect("the slow write succeeds");
    assert!(
        faults.victim.load(Ordering::SeqCst) >= 2,
        "the victim's write was not retried after its timeout"
    );
    assert_eq!(
        faults.slow.load(Ordering::SeqCst),
        1,
        "the slow write was sent again: the victim's timeout tore down the \
         connection it was waiting on"
    );
    let read = client
        .read(ChainId(1), slow(), 0, 4096)
        .await
        .expect("read back");
    assert_eq!(read.data, Bytes::from(vec![0x22; 4096]));
}
