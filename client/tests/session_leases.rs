//! Write sessions as leases, end to end: file clients against a whole
//! cluster in one process whose metadata service runs on a manual clock. A
//! client that crashes mid-write stops renewing its lease; one lease later
//! the service's reaper ends its session, fixing the file's length from what
//! reached storage, and GC then reclaims the file another client unlinked.
//! A client that keeps renewing keeps its session however far the clock
//! moves past the lease.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_client::{FsClient, FsConfig, OpenMode};
use flyfs_fs_meta::reaper::{ReaperConfig, ReaperStats, SessionReaper};
use flyfs_fs_meta::testing::{ClusterOptions, MetaOptions, TestCluster};
use flyfs_proto::ids::{ClientId, InodeId};
use flyfs_proto::wire::meta::User;
use flyfs_rpc::Tcp;
use flyfs_time::{Clock, ManualClock};

const ROOT: InodeId = InodeId(1);
const CHUNK: u32 = 64 << 10;
const START_NS: i64 = 1_700_000_000_000_000_000;
/// Short, because clients renew every third of it in real time; the manual
/// clock decides when it runs out.
const LEASE_MS: i64 = 600;

const RW: OpenMode = OpenMode {
    read: true,
    write: true,
    truncate: false,
};

/// A file client of `cluster` that never reports lengths on its own (so
/// the metadata service learns a crashed writer's length only from
/// storage).
async fn client(cluster: &TestCluster, id: u64) -> Arc<FsClient<Tcp>> {
    let mut storage = ClientConfig::new([cluster.mgmt_addr.clone()], ClientId(id));
    storage.rpc_timeout = Duration::from_secs(1);
    storage.op_deadline = Duration::from_secs(30);
    let storage = StorageClient::new(storage, Tcp, flyfs_rpc::testing::client());
    storage.refresh_routing().await.expect("routing");
    let config = FsConfig {
        length_hint_interval: Duration::from_secs(3600),
        ..FsConfig::default()
    };
    FsClient::new(cluster.meta[0].clone(), storage, ClientId(id), config)
}

/// Waits until `condition` holds, polling; fails after a minute, which no
/// loaded machine needs.
async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !condition().await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "still waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_clients_session_is_reaped_and_a_live_ones_never() {
    let clock = Arc::new(ManualClock::new(START_NS));
    let cluster = TestCluster::start_with(
        ClusterOptions {
            chains: 3,
            chunk_size: CHUNK,
            stripe: 3,
            ..ClusterOptions::default()
        },
        MetaOptions {
            clock: clock.clone(),
            client_lease_ms: LEASE_MS as u64,
            reaper_interval: Duration::from_millis(20),
            ..MetaOptions::default()
        },
    )
    .await;
    let root = User::root();
    let ns = cluster.ns.clone();

    let live = client(&cluster, 101).await;
    let (live_attr, live_fh) = live
        .create(&root, ROOT, b"live", 0o644, RW, true)
        .await
        .expect("create");
    live.write(&live_fh, 0, b"still writing")
        .await
        .expect("write");
    live.flush(&live_fh).await.expect("flush");

    let crashing = client(&cluster, 102).await;
    let (attr, fh) = crashing
        .create(&root, ROOT, b"crashed", 0o644, RW, true)
        .await
        .expect("create");
    let data: Vec<u8> = (0..(3 * CHUNK as usize + 1234))
        .map(|i| (i % 251) as u8)
        .collect();
    crashing.write(&fh, 0, &data).await.expect("write");
    // On storage, but never synced or closed: the service has not heard
    // the length.
    crashing.flush_all().await.expect("flush");
    assert_eq!(ns.stat(attr.ino).await.expect("stat").size(), 0);
    // The crash: no release, no more renewals.
    drop(fh);
    drop(crashing);
    live.unlink(&root, ROOT, b"crashed").await.expect("unlink");
    assert_eq!(ns.sessions(attr.ino).await.expect("sessions").len(), 1);

    // Two and a half leases, the live client renewing in between (each
    // step waits for its renewal at the new time, and is half a lease, so
    // its lease never runs out). A reap pass of our own after each step
    // must leave the live session alone, whatever the background reapers
    // do meanwhile.
    let own_stats = Arc::new(ReaperStats::default());
    let reaper = SessionReaper::new(
        ns.clone(),
        cluster.storage.clone(),
        ReaperConfig::default(),
        own_stats.clone(),
    );
    for _ in 0..5 {
        clock.advance_ms(LEASE_MS / 2);
        let renewed_by_ms = clock.now_ms() + LEASE_MS as u64;
        wait_until("the live client's renewal", || async {
            ns.lease(101)
                .await
                .expect("lease")
                .is_some_and(|l| l.expires_ms >= renewed_by_ms)
        })
        .await;
        reaper.reap_once().await.expect("reap");
        assert_eq!(
            ns.sessions(live_attr.ino).await.expect("sessions").len(),
            1,
            "the live client's session was reaped"
        );
    }
    // The crashed client's session is gone, ended by a reaper that fixed
    // the length from storage.
    wait_until("the crashed client's session reaped", || async {
        ns.sessions(attr.ino).await.expect("sessions").is_empty()
    })
    .await;
    let reaped: u64 = cluster
        .reaper_stats
        .iter()
        .chain([&own_stats])
        .map(|s| s.sessions_reaped())
        .sum();
    assert_eq!(reaped, 1, "exactly the crashed client's session was reaped");
    assert_eq!(
        ns.stat(attr.ino).await.expect("stat").size(),
        data.len() as u64
    );

    // GC postponed the file while the session pinned it (30 s on the
    // service's clock); the live client closes, the clock passes that,
    // and the file's data and inode go.
    live.release(&live_fh).await.expect("release");
    clock.advance_ms(31_000);
    wait_until("GC of the crashed client's file", || async {
        ns.stat(attr.ino).await.is_err()
    })
    .await;
    assert_eq!(
        ns.stat(attr.ino).await.map_err(|e| e.errno()).err(),
        Some(libc::ENOENT)
    );
    let removed: u64 = cluster.gc_stats.iter().map(|s| s.chunks_removed()).sum();
    assert!(removed >= 4, "{removed} chunks removed");
    // The live file is whole.
    assert_eq!(
        ns.stat(live_attr.ino).await.expect("stat").size(),
        b"still writing".len() as u64
    );
    let report = ns.check().await.expect("check");
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.sessions, 0, "{report}");
    cluster.shutdown().await;
}
