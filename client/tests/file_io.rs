//! The file client against a whole cluster in one process (real TCP):
//! striped data through the write-back buffer and read-ahead, checked
//! against a plain byte vector; close-to-open between two clients; errno
//! for bad requests; reads and writes that go on while a storage node is
//! down, and the node's resync afterwards.

use std::sync::Arc;
use std::time::Duration;

use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_client::{FileHandle, FsClient, FsConfig, OpenMode};
use flyfs_fs_meta::reaper::{ReaperConfig, SessionReaper};
use flyfs_fs_meta::testing::{ClusterOptions, MetaOptions, TestCluster};
use flyfs_proto::ids::{ClientId, InodeId};
use flyfs_proto::wire::meta::{Create, CreateReq, Open, OpenReq, SetAttrReq, User};
use flyfs_rpc::Tcp;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rand::{Rng, SeedableRng};

const ROOT: InodeId = InodeId(1);
const CHUNK: u32 = 64 << 10;

const RW: OpenMode = OpenMode {
    read: true,
    write: true,
    truncate: false,
};
const RO: OpenMode = OpenMode {
    read: true,
    write: false,
    truncate: false,
};

/// Small buffers and windows, so a few hundred KiB exercise background
/// flushes, backpressure and read-ahead across chunks and chains.
fn small_config() -> FsConfig {
    FsConfig {
        write_buffer_bytes: 96 << 10,
        write_flushes_in_flight: 2,
        readahead_bytes_max: 256 << 10,
        length_hint_interval: Duration::from_millis(10),
        ..FsConfig::default()
    }
}

/// A client whose deferred setattrs wait for the file's sync points alone
/// (and which reports no length in between): what these tests count.
fn patient() -> FsConfig {
    FsConfig {
        length_hint_interval: Duration::from_secs(3600),
        ..FsConfig::default()
    }
}

async fn cluster() -> TestCluster {
    TestCluster::start(ClusterOptions {
        chains: 3,
        chunk_size: CHUNK,
        stripe: 3,
        ..ClusterOptions::default()
    })
    .await
}

/// A file client of `cluster` with its own storage client.
async fn client(cluster: &TestCluster, id: u64, config: FsConfig) -> Arc<FsClient<Tcp>> {
    let mut storage = ClientConfig::new([cluster.mgmt_addr.clone()], ClientId(id));
    storage.rpc_timeout = Duration::from_secs(1);
    storage.op_deadline = Duration::from_secs(30);
    let storage = StorageClient::new(storage, Tcp, flyfs_rpc::testing::client());
    storage.refresh_routing().await.expect("routing");
    FsClient::new(cluster.meta[0].clone(), storage, ClientId(id), config)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

async fn read_all(fs: &FsClient<Tcp>, fh: &FileHandle, len: u64, piece: u32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let data = fs.read(fh, out.len() as u64, piece).await.expect("read");
        if data.is_empty() {
            break;
        }
        out.extend_from_slice(&data);
        assert!(out.len() as u64 <= len, "read past the end");
    }
    out
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        offset: u32,
        len: u32,
        seed: u64,
    },
    Read {
        offset: u32,
        len: u32,
    },
    Flush,
    Truncate {
        size: u32,
    },
    /// Close and reopen (close-to-open through another client).
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets up to ~5 chunks, so files span every chain and get holes.
    let span = 5 * CHUNK;
    prop_oneof![
        6 => (0..span, 1..(2 * CHUNK), any::<u64>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        // Sequential-looking appends, which the buffer collects.
        3 => (1..(CHUNK / 2), any::<u64>()).prop_map(|(len, seed)| Op::Write { offset: u32::MAX, len, seed }),
        4 => (0..span, 1..(3 * CHUNK)).prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => Just(Op::Flush),
        1 => (0..span).prop_map(|size| Op::Truncate { size }),
        1 => Just(Op::Reopen),
    ]
}

/// Runs `ops` on a new file through `a` and checks every read against a
/// byte vector; on `Reopen` the file is closed and opened through `b`
/// (which must see everything: close-to-open), and back.
async fn run_case(
    a: &Arc<FsClient<Tcp>>,
    b: &Arc<FsClient<Tcp>>,
    name: &str,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let root = User::root();
    let (_, mut fh) = a
        .create(&root, ROOT, name.as_bytes(), 0o644, RW, true)
        .await
        .expect("create");
    let mut fs = a;
    let mut model: Vec<u8> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { offset, len, seed } => {
                let offset = if offset == u32::MAX {
                    model.len()
                } else {
                    offset as usize
                };
                let data = pattern(seed, len as usize);
                fs.write(&fh, offset as u64, &data).await.expect("write");
                if model.len() < offset + data.len() {
                    model.resize(offset + data.len(), 0);
                }
                model[offset..offset + data.len()].copy_from_slice(&data);
            }
            Op::Read { offset, len } => {
                let got = fs.read(&fh, u64::from(offset), len).await.expect("read");
                let from = (offset as usize).min(model.len());
                let to = (offset as usize + len as usize).min(model.len());
                prop_assert_eq!(got.len(), to - from, "step {}: read length", step);
                prop_assert!(got[..] == model[from..to], "step {}: read bytes", step);
            }
            Op::Flush => fs.flush(&fh).await.expect("flush"),
            Op::Truncate { size } => {
                let req = SetAttrReq {
                    user: root.clone(),
                    ino: fh.ino(),
                    size: Some(u64::from(size)),
                    ..SetAttrReq::default()
                };
                let attr = fs.setattr(req).await.expect("truncate");
                prop_assert_eq!(attr.length, u64::from(size));
                model.resize(size as usize, 0);
            }
            Op::Reopen => {
                fs.release(&fh).await.expect("release");
                fs = if Arc::ptr_eq(fs, a) { b } else { a };
                let (attr, reopened) = fs.open(&root, fh.ino(), RW).await.expect("open");
                prop_assert_eq!(attr.length, model.len() as u64, "step {}: length", step);
                fh = reopened;
            }
        }
        let attr = fs.stat(&root, fh.ino()).await.expect("stat");
        prop_assert_eq!(
            attr.length,
            model.len() as u64,
            "step {}: stat length",
            step
        );
    }
    fs.release(&fh).await.expect("release");
    // Everything is on storage and the length fixed: a fresh read-only
    // open through the other client reads the model back, sequentially
    // (read-ahead) and in pieces that straddle chunks.
    let other = if Arc::ptr_eq(fs, a) { b } else { a };
    let (attr, fh) = other.open(&root, fh.ino(), RO).await.expect("open");
    prop_assert_eq!(attr.length, model.len() as u64);
    let all = read_all(other, &fh, attr.length, 40_000).await;
    prop_assert!(all == model, "final contents differ");
    other.release(&fh).await.expect("release");
    // GC reclaims the chunks, so hundreds of cases fit the devices.
    other
        .unlink(&root, ROOT, name.as_bytes())
        .await
        .expect("unlink");
    Ok(())
}

#[test]
fn random_reads_and_writes_match_a_byte_vector() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (cluster, a, b) = rt.block_on(async {
        let cluster = cluster().await;
        let a = client(&cluster, 1, small_config()).await;
        let b = client(&cluster, 2, small_config()).await;
        (cluster, a, b)
    });
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let case = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        let name = format!(
            "case-{}",
            case.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        rt.block_on(run_case(&a, &b, &name, &ops))
    });
    rt.block_on(cluster.shutdown());
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_sequential_file_round_trips_with_read_ahead() {
    let cluster = cluster().await;
    let fs = client(&cluster, 1, small_config()).await;
    let root = User::root();
    let data = pattern(7, 3 << 20);
    let (_, fh) = fs
        .create(&root, ROOT, b"big", 0o644, RW, true)
        .await
        .expect("create");
    for (i, piece) in data.chunks(128 << 10).enumerate() {
        let offset = i as u64 * (128 << 10);
        fs.write(&fh, offset, piece).await.expect("write");
    }
    // Before close: the length as this client knows it.
    assert_eq!(
        fs.stat(&root, fh.ino()).await.expect("stat").length,
        data.len() as u64
    );
    fs.release(&fh).await.expect("release");
    // The metadata service fixed the exact length from storage.
    let other = client(&cluster, 2, FsConfig::default()).await;
    let attr = other.stat(&root, fh.ino()).await.expect("stat");
    assert_eq!(attr.length, data.len() as u64);
    let (_, fh) = other.open(&root, attr.ino, RO).await.expect("open");
    assert!(read_all(&other, &fh, attr.length, 128 << 10).await == data);
    // A read at the end and past it.
    assert!(
        other
            .read(&fh, attr.length, 10)
            .await
            .expect("read")
            .is_empty()
    );
    assert!(
        other
            .read(&fh, attr.length + 12345, 10)
            .await
            .expect("read")
            .is_empty()
    );
    other.release(&fh).await.expect("release");
    cluster.shutdown().await;
}

/// Two handles of one file read it sequentially at different places, in
/// turns (a data loader's workers): each is a stream of its own, so neither
/// throws away the chunks the other read ahead, and every chunk is fetched
/// about once. (With one cache per file, each read of the handle further on
/// dropped the other's chunks, and 4 such readers ran at a tenth of one
/// reader's speed in benches/native-vs-fuse.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_at_two_places_keep_their_own_read_ahead() {
    const CHUNKS: u64 = 24;
    const PIECE: u32 = 16 << 10;
    let cluster = cluster().await;
    let config = small_config();
    let fs = client(&cluster, 1, config.clone()).await;
    let root = User::root();
    let data = pattern(11, (CHUNKS * u64::from(CHUNK)) as usize);
    let (_, fh) = fs
        .create(&root, ROOT, b"shared", 0o644, RW, true)
        .await
        .expect("create");
    fs.write(&fh, 0, &data).await.expect("write");
    fs.release(&fh).await.expect("release");
    let (_, first) = fs.open(&root, fh.ino(), RO).await.expect("open");
    let (_, second) = fs.open(&root, fh.ino(), RO).await.expect("open");
    let half = CHUNKS / 2 * u64::from(CHUNK);
    let mut at = [0u64, half];
    while at[0] < half {
        for (handle, at) in [&first, &second].into_iter().zip(at.iter_mut()) {
            let read = fs.read(handle, *at, PIECE).await.expect("read");
            assert!(
                read[..] == data[*at as usize..*at as usize + PIECE as usize],
                "bytes at {at} differ"
            );
            *at += u64::from(PIECE);
        }
    }
    // Each handle's stretch once, and at most a window past its end.
    let window_chunks = config.readahead_bytes_max / u64::from(CHUNK);
    let fetched = first.chunks_read_ahead() + second.chunks_read_ahead();
    assert!(
        fetched <= CHUNKS + 2 * window_chunks,
        "{fetched} chunks fetched ahead for {CHUNKS} chunks read"
    );
    fs.release(&first).await.expect("release");
    fs.release(&second).await.expect("release");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errno() {
    let cluster = cluster().await;
    let fs = client(&cluster, 1, small_config()).await;
    let root = User::root();
    let (_, fh) = fs
        .create(&root, ROOT, b"f", 0o644, RW, true)
        .await
        .expect("create");
    fs.release(&fh).await.expect("release");
    let (_, ro) = fs.open(&root, fh.ino(), RO).await.expect("open");
    let e = fs
        .write(&ro, 0, b"x")
        .await
        .expect_err("write to read-only");
    assert_eq!(e.errno, libc::EBADF);
    fs.release(&ro).await.expect("release");

    let (_, rw) = fs.open(&root, fh.ino(), RW).await.expect("open");
    let max = u64::from(CHUNK) << 32;
    let e = fs
        .write(&rw, max, b"x")
        .await
        .expect_err("past the largest file");
    assert_eq!(e.errno, libc::EFBIG);
    let e = fs
        .write(&rw, u64::MAX - 1, b"xyz")
        .await
        .expect_err("offset overflow");
    assert_eq!(e.errno, libc::EFBIG);
    // The handle still works.
    fs.write(&rw, 0, b"ok").await.expect("write");
    assert_eq!(&fs.read(&rw, 0, 10).await.expect("read")[..], b"ok");
    fs.release(&rw).await.expect("release");

    let e = fs
        .create(&root, ROOT, b"f", 0o644, RW, true)
        .await
        .expect_err("exclusive create of an existing file");
    assert_eq!(e.errno, libc::EEXIST);
    let dir = fs.mkdir(&root, ROOT, b"d", 0o755).await.expect("mkdir");
    let e = fs
        .open(&root, dir.ino, RO)
        .await
        .expect_err("open a directory");
    assert_eq!(e.errno, libc::EISDIR);
    let e = fs
        .lookup(&root, ROOT, &[b'n'; 256])
        .await
        .expect_err("long name");
    assert_eq!(e.errno, libc::ENAMETOOLONG);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_go_on_while_a_storage_node_is_down() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("FLYFS_TEST_LOG"))
        .with_test_writer()
        .try_init();
    let mut cluster = cluster().await;
    let fs = client(&cluster, 1, small_config()).await;
    let root = User::root();
    let first = pattern(1, 1 << 20);
    let (_, fh) = fs
        .create(&root, ROOT, b"f", 0o644, RW, true)
        .await
        .expect("create");
    fs.write(&fh, 0, &first).await.expect("write");
    fs.flush(&fh).await.expect("flush");

    // One node down: it holds a replica of every chain, and the head of
    // one. Reads fail over to the other replicas at once; writes wait
    // until the manager takes its targets out of the chains.
    cluster.nodes[0].stop().await;
    assert!(read_all(&fs, &fh, first.len() as u64, 100_000).await == first);
    let second = pattern(2, 1 << 20);
    fs.write(&fh, first.len() as u64, &second)
        .await
        .expect("write");
    fs.flush(&fh).await.expect("flush with a node down");
    fs.release(&fh).await.expect("release");

    cluster.nodes[0].start().await;
    cluster.wait_all_serving(Duration::from_secs(30)).await;
    // The restarted replicas were resynced: any replica serves the data.
    let other = client(&cluster, 2, FsConfig::default()).await;
    let (attr, fh) = other.open(&root, fh.ino(), RO).await.expect("open");
    let all = read_all(&other, &fh, attr.length, 1 << 20).await;
    assert_eq!(all.len(), 2 << 20);
    assert!(all[..1 << 20] == first[..] && all[1 << 20..] == second[..]);
    other.release(&fh).await.expect("release");
    cluster.shutdown().await;
}

/// The kernel releases a handle in the background: a later handle's writes
/// may come before the earlier handle's release, which must not make the
/// client forget them (its stat and reads would go back to the metadata
/// service's older length).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_release_keeps_another_handles_writes() {
    let cluster = cluster().await;
    let fs = client(&cluster, 1, small_config()).await;
    let root = User::root();
    let (_, mut current) = fs
        .create(&root, ROOT, b"f", 0o644, RW, true)
        .await
        .expect("create");
    let mut length = 0u64;
    for round in 0..20u8 {
        fs.write(&current, length, &[round; 1000])
            .await
            .expect("write");
        length += 1000;
        fs.flush(&current).await.expect("flush");
        let (_, next) = fs.open(&root, current.ino(), RW).await.expect("open");
        fs.write(&next, length, &[!round; 1000])
            .await
            .expect("write");
        length += 1000;
        fs.release(&current).await.expect("late release");
        let attr = fs.stat(&root, next.ino()).await.expect("stat");
        assert_eq!(
            attr.length, length,
            "round {round}: stat after a late release"
        );
        let tail = fs.read(&next, length - 1000, 1000).await.expect("read");
        assert!(
            tail[..] == [!round; 1000],
            "round {round}: read after a late release"
        );
        current = next;
    }
    fs.release(&current).await.expect("release");
    let attr = fs.stat(&root, current.ino()).await.expect("stat");
    assert_eq!(attr.length, length, "the length the service fixed");
    cluster.shutdown().await;
}

/// What a small file costs the metadata service: `create; write 4 KiB;
/// close(2)` (a flush, then the release) is three requests and asks storage
/// for no length, since the client holds the only write session and knows
/// the length. A second client writing the same file makes the service ask
/// every chain again, and its data counts. Fails if either grows back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_file_costs_three_meta_requests_and_no_length_query() {
    let cluster = cluster().await;
    let a = client(&cluster, 21, FsConfig::default()).await;
    let b = client(&cluster, 22, FsConfig::default()).await;
    let stats = &cluster.service_stats[0];
    let root = User::root();
    let data = pattern(1, 4096);
    const FILES: u64 = 20;
    let requests_before = stats.requests();
    let asked_before = stats.length_chains_asked();
    for i in 0..FILES {
        let name = format!("small{i}");
        let (_, fh) = a
            .create(&root, ROOT, name.as_bytes(), 0o644, RW, true)
            .await
            .expect("create");
        a.write(&fh, 0, &data).await.expect("write");
        a.flush(&fh).await.expect("flush");
        a.release(&fh).await.expect("release");
    }
    assert_eq!(
        stats.length_chains_asked(),
        asked_before,
        "storage was asked for a length"
    );
    let requests_after = stats.requests();
    let made = |method: &str| {
        requests_after.get(method).copied().unwrap_or(0)
            - requests_before.get(method).copied().unwrap_or(0)
    };
    let total: u64 = requests_after.values().sum::<u64>() - requests_before.values().sum::<u64>();
    assert_eq!(
        (made("meta.Create"), made("meta.Sync"), made("meta.Close")),
        (FILES, FILES, FILES),
        "{requests_after:?}"
    );
    // Lease renewals (one per third of a lease) are the only others.
    assert_eq!(
        total - made("meta.RenewLease"),
        3 * FILES,
        "{requests_after:?}"
    );
    for i in 0..FILES {
        let attr = b
            .lookup(&root, ROOT, format!("small{i}").as_bytes())
            .await
            .expect("lookup");
        assert_eq!(attr.length, 4096);
    }

    // An older client's sync (no length of its own) asks every chain.
    let (attr, fh) = a
        .create(&root, ROOT, b"old", 0o644, RW, true)
        .await
        .expect("create");
    a.write(&fh, 0, &data).await.expect("write");
    a.release(&fh).await.expect("release");
    let asked = stats.length_chains_asked();
    let (_, fh) = a.open(&root, attr.ino, RW).await.expect("open");
    a.write(&fh, 0, &data).await.expect("write");
    a.fsync(&fh).await.expect("fsync");
    assert_eq!(stats.length_chains_asked(), asked, "a sole writer again");
    cluster.meta[0]
        .call::<flyfs_proto::wire::meta::Sync, _>(&flyfs_proto::wire::meta::SessionReq {
            user: root.clone(),
            ino: attr.ino,
            ..Default::default()
        })
        .await
        .expect("sync without a writer length");
    assert_eq!(stats.length_chains_asked(), asked + 3, "every chain");
    a.release(&fh).await.expect("release");

    // Two writers of one file: a's flush cannot trust its 4 KiB, as b's
    // session is open (b wrote 3 chunks, on every chain).
    let (attr, fa) = a
        .create(&root, ROOT, b"shared", 0o644, RW, true)
        .await
        .expect("create");
    let (_, fb) = b.open(&root, attr.ino, RW).await.expect("open");
    let long = pattern(2, 3 * CHUNK as usize);
    b.write(&fb, 0, &long).await.expect("write");
    b.fsync(&fb).await.expect("fsync");
    a.write(&fa, 0, &data).await.expect("write");
    let asked = stats.length_chains_asked();
    a.flush(&fa).await.expect("flush");
    assert_eq!(stats.length_chains_asked(), asked + 3, "every chain");
    a.release(&fa).await.expect("release");
    b.release(&fb).await.expect("release");
    let seen = a
        .lookup(&root, ROOT, b"shared")
        .await
        .expect("lookup")
        .length;
    assert_eq!(seen, long.len() as u64);
}

/// What `tar x` does to each file (GNU tar as root: create, write,
/// `futimens`, `fchown`, `fchmod`, close) costs three metadata requests:
/// the create, the flush of `close(2)` carrying the sync and the three
/// changes, in order (so the mtime tar sets sticks), and the release's
/// close. Until that flush, this client sees the changes and another does
/// not (close-to-open, as for the data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_x_of_a_small_file_defers_its_setattrs_to_the_flush() {
    use flyfs_proto::wire::meta::SetTime;
    let cluster = cluster().await;
    let a = client(&cluster, 23, patient()).await;
    let b = client(&cluster, 24, FsConfig::default()).await;
    let stats = &cluster.service_stats[0];
    let root = User::root();
    let data = pattern(3, 3000);
    const FILES: u64 = 20;
    const MTIME_NS: i64 = 1_153_704_088_000_000_000;
    let requests_before = stats.requests();
    let asked_before = stats.length_chains_asked();
    for i in 0..FILES {
        let (attr, fh) = a
            .create(&root, ROOT, format!("tar{i}").as_bytes(), 0o600, RW, true)
            .await
            .expect("create");
        a.write(&fh, 0, &data).await.expect("write");
        let set = |req: SetAttrReq| SetAttrReq {
            user: root.clone(),
            ino: attr.ino,
            ..req
        };
        let stamped = a
            .setattr(set(SetAttrReq {
                mtime: Some(SetTime::At(MTIME_NS)),
                ..SetAttrReq::default()
            }))
            .await
            .expect("futimens");
        assert_eq!(stamped.length, data.len() as u64);
        a.setattr(set(SetAttrReq {
            uid: Some(0),
            gid: Some(0),
            ..SetAttrReq::default()
        }))
        .await
        .expect("fchown");
        let answered = a
            .setattr(set(SetAttrReq {
                mode: Some(0o644),
                ..SetAttrReq::default()
            }))
            .await
            .expect("fchmod");
        assert_eq!(
            (answered.mode, answered.mtime_ns, answered.length),
            (0o644, MTIME_NS, data.len() as u64)
        );
        if i == 0 {
            let here = a.stat(&root, attr.ino).await.expect("stat");
            assert_eq!(
                (here.mode, here.mtime_ns),
                (0o644, MTIME_NS),
                "this client sees them"
            );
            let there = b.stat(&root, attr.ino).await.expect("stat");
            assert_eq!(there.mode, 0o600, "another client sees them at the flush");
            assert_ne!(there.mtime_ns, MTIME_NS);
        }
        a.flush(&fh).await.expect("flush");
        a.release(&fh).await.expect("release");
    }
    let requests_after = stats.requests();
    let made = |method: &str| {
        requests_after.get(method).copied().unwrap_or(0)
            - requests_before.get(method).copied().unwrap_or(0)
    };
    let total: u64 = requests_after.values().sum::<u64>() - requests_before.values().sum::<u64>();
    assert_eq!(
        (
            made("meta.Create"),
            made("meta.SyncSetAttrs"),
            made("meta.SetAttr"),
            made("meta.SyncSetAttr"),
            made("meta.Sync"),
            made("meta.Close"),
        ),
        (FILES, FILES, 0, 0, 0, FILES),
        "{requests_after:?}"
    );
    // The two stats of the first file are the rest.
    assert_eq!(
        total - made("meta.RenewLease"),
        3 * FILES + 2,
        "{requests_after:?}"
    );
    assert_eq!(stats.length_chains_asked(), asked_before);
    // Another client sees the data, the length, the mode and tar's mtime.
    for i in 0..FILES {
        let attr = b
            .lookup(&root, ROOT, format!("tar{i}").as_bytes())
            .await
            .expect("lookup");
        assert_eq!(attr.length, data.len() as u64);
        assert_eq!(attr.mode & 0o7777, 0o644);
        assert_eq!(attr.mtime_ns, MTIME_NS, "tar's mtime was kept");
        let (_, fh) = b.open(&root, attr.ino, RO).await.expect("open");
        assert_eq!(read_all(&b, &fh, attr.length, 1 << 16).await, data);
        b.release(&fh).await.expect("release");
    }
}

/// Deferred setattrs keep POSIX's order with what comes after them on this
/// client: a write after an explicit mtime sets the mtime again, a truncate
/// after them lands after them, a chown drops setuid and setgid (an
/// explicit mode after it wins), and a caller other than root, or a client
/// configured not to, is not deferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_setattrs_keep_their_order_with_later_writes_and_changes() {
    use flyfs_proto::wire::meta::SetTime;
    let cluster = cluster().await;
    let a = client(&cluster, 25, patient()).await;
    let b = client(&cluster, 26, FsConfig::default()).await;
    let stats = &cluster.service_stats[0];
    let root = User::root();
    const MTIME_NS: i64 = 1_153_704_088_000_000_000;
    let data = pattern(4, 5000);
    let set = |ino: InodeId, req: SetAttrReq| SetAttrReq {
        user: root.clone(),
        ino,
        ..req
    };

    // A write after the deferred mtime: the file's mtime is the write's.
    let (attr, fh) = a
        .create(&root, ROOT, b"later-write", 0o644, RW, true)
        .await
        .expect("create");
    a.write(&fh, 0, &data).await.expect("write");
    a.setattr(set(
        attr.ino,
        SetAttrReq {
            mtime: Some(SetTime::At(MTIME_NS)),
            ..SetAttrReq::default()
        },
    ))
    .await
    .expect("futimens");
    a.write(&fh, data.len() as u64, &data)
        .await
        .expect("write after");
    a.flush(&fh).await.expect("flush");
    a.release(&fh).await.expect("release");
    let seen = b.stat(&root, attr.ino).await.expect("stat");
    assert_eq!(seen.length, 2 * data.len() as u64);
    assert!(
        seen.mtime_ns > MTIME_NS,
        "the later write set the mtime again"
    );

    // A truncate after them lands after them; chown drops setuid and
    // setgid, and an explicit mode after it wins.
    let (attr, fh) = a
        .create(&root, ROOT, b"later-truncate", 0o6755, RW, true)
        .await
        .expect("create");
    a.write(&fh, 0, &data).await.expect("write");
    let chowned = a
        .setattr(set(
            attr.ino,
            SetAttrReq {
                uid: Some(1000),
                gid: Some(1000),
                ..SetAttrReq::default()
            },
        ))
        .await
        .expect("fchown");
    assert_eq!(
        (chowned.uid, chowned.mode),
        (1000, 0o755),
        "chown drops setuid and setgid"
    );
    let moded = a
        .setattr(set(
            attr.ino,
            SetAttrReq {
                mode: Some(0o4750),
                mtime: Some(SetTime::At(MTIME_NS)),
                ..SetAttrReq::default()
            },
        ))
        .await
        .expect("fchmod");
    assert_eq!(moded.mode, 0o4750, "a mode after the chown wins");
    let truncated = a
        .setattr(set(
            attr.ino,
            SetAttrReq {
                size: Some(100),
                ..SetAttrReq::default()
            },
        ))
        .await
        .expect("ftruncate");
    assert_eq!(
        (truncated.length, truncated.uid, truncated.mode),
        (100, 1000, 0o4750)
    );
    assert!(
        truncated.mtime_ns > MTIME_NS,
        "the truncate came after the deferred mtime"
    );
    a.release(&fh).await.expect("release");
    let seen = b.stat(&root, attr.ino).await.expect("stat");
    assert_eq!(
        (seen.length, seen.uid, seen.gid, seen.mode),
        (100, 1000, 1000, 0o4750)
    );
    assert_eq!(seen.mtime_ns, truncated.mtime_ns);

    // A client that does not defer, and a caller other than root: each
    // change is a request of its own, at once.
    let c = client(
        &cluster,
        27,
        FsConfig {
            defer_root_setattrs: false,
            ..FsConfig::default()
        },
    )
    .await;
    let set_attrs_made = || stats.requests().get("meta.SetAttr").copied().unwrap_or(0);
    let (attr, fh) = c
        .create(&root, ROOT, b"not-deferred", 0o644, RW, true)
        .await
        .expect("create");
    let before = set_attrs_made();
    c.setattr(set(
        attr.ino,
        SetAttrReq {
            mode: Some(0o600),
            uid: Some(1000),
            gid: Some(1000),
            ..SetAttrReq::default()
        },
    ))
    .await
    .expect("chmod and chown");
    assert_eq!(set_attrs_made() - before, 1);
    assert_eq!(b.stat(&root, attr.ino).await.expect("stat").mode, 0o600);
    c.release(&fh).await.expect("release");
    let owner = User::new(1000, 1000, Vec::new());
    let (_, fh) = a.open(&owner, attr.ino, RW).await.expect("open");
    let before = set_attrs_made();
    a.setattr(SetAttrReq {
        user: owner.clone(),
        ino: attr.ino,
        mode: Some(0o640),
        ..SetAttrReq::default()
    })
    .await
    .expect("the owner's chmod");
    assert_eq!(set_attrs_made() - before, 1);
    assert_eq!(b.stat(&root, attr.ino).await.expect("stat").mode, 0o640);
    a.release(&fh).await.expect("release");
}

/// A writer that keeps its file open still makes its deferred setattrs
/// within the hint interval: another client sees root's chmod without a
/// flush or close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_setattrs_are_made_within_the_hint_interval() {
    let cluster = cluster().await;
    let a = client(&cluster, 28, small_config()).await;
    let b = client(&cluster, 29, FsConfig::default()).await;
    let root = User::root();
    let (attr, fh) = a
        .create(&root, ROOT, b"kept-open", 0o644, RW, true)
        .await
        .expect("create");
    a.write(&fh, 0, &pattern(5, 1000)).await.expect("write");
    let answered = a
        .setattr(SetAttrReq {
            user: root.clone(),
            ino: attr.ino,
            mode: Some(0o600),
            ..SetAttrReq::default()
        })
        .await
        .expect("chmod");
    assert_eq!(answered.mode, 0o600);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let seen = b.stat(&root, attr.ino).await.expect("stat");
        if seen.mode == 0o600 {
            assert_eq!(seen.length, 1000, "the writes before it were synced first");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the chmod never reached the service"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.release(&fh).await.expect("release");
}

/// A cluster whose metadata store's syncer waits an hour: only what is
/// asked for makes a relaxed change durable.
async fn lazy_cluster() -> TestCluster {
    TestCluster::start_with(
        ClusterOptions {
            chains: 3,
            chunk_size: CHUNK,
            stripe: 3,
            ..ClusterOptions::default()
        },
        MetaOptions {
            relaxed_within: Duration::from_secs(3600),
            ..MetaOptions::default()
        },
    )
    .await
}

/// Entries and the length a flush fixes are answered before they are
/// durable; `fsync` of a file and `fsyncdir` (`sync_namespace`) return only
/// once they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_and_fsyncdir_make_the_changes_before_them_durable() {
    let cluster = lazy_cluster().await;
    let a = client(&cluster, 31, patient()).await;
    let root = User::root();
    let pending = || cluster.ns.kv().journal_stats().relaxed_pending;
    let create = |name: &'static str| {
        let a = a.clone();
        let root = root.clone();
        async move {
            a.create(&root, ROOT, name.as_bytes(), 0o644, RW, true)
                .await
                .expect("create")
                .1
        }
    };

    let fh = create("dir-synced").await;
    assert!(pending(), "a create is answered before it is durable");
    a.sync_namespace().await.expect("fsyncdir");
    assert!(
        !pending(),
        "fsyncdir returned before the create was durable"
    );
    a.release(&fh).await.expect("release");

    // An fsync with nothing to write asks the service.
    let fh = create("fsynced-empty").await;
    assert!(pending());
    a.fsync(&fh).await.expect("fsync");
    assert!(!pending(), "fsync returned before the create was durable");
    a.release(&fh).await.expect("release");

    // One that writes: the length's durable commit covers the create.
    let fh = create("fsynced-written").await;
    assert!(pending());
    a.write(&fh, 0, &pattern(3, 4096)).await.expect("write");
    a.fsync(&fh).await.expect("fsync");
    assert!(!pending(), "fsync returned before the create was durable");
    a.release(&fh).await.expect("release");

    // close(2)'s flush fixes the length visibly, not durably; an fsync
    // after it (nothing left to sync) makes it durable.
    let fh = create("flushed").await;
    a.sync_namespace().await.expect("fsyncdir");
    a.write(&fh, 0, &pattern(4, 4096)).await.expect("write");
    a.flush(&fh).await.expect("flush");
    assert!(pending(), "the flush's length waited for an fsync");
    let attr = cluster.ns.stat(attr_ino(&a, "flushed").await).await;
    assert_eq!(attr.expect("stat").file().expect("a file").length, 4096);
    a.fsync(&fh).await.expect("fsync");
    assert!(
        !pending(),
        "fsync returned before the flush's length was durable"
    );
    a.release(&fh).await.expect("release");
}

async fn attr_ino(client: &FsClient<Tcp>, name: &str) -> InodeId {
    client
        .lookup(&User::root(), ROOT, name.as_bytes())
        .await
        .expect("lookup")
        .ino
}

/// A length fixed by a relaxed sync and then lost (a crash of the metadata
/// service that the writer outlived: simulated by setting the recorded
/// length back) is restored by the writer's close, or by the reaper's
/// startup pass when the writer does not close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_relaxed_sync_is_restored_by_the_close_or_the_startup_pass() {
    let cluster = lazy_cluster().await;
    let a = client(&cluster, 32, patient()).await;
    let root = User::root();
    let data = pattern(5, 3 * CHUNK as usize + 100);
    let length = data.len() as u64;
    let lose_sync = |ino: InodeId| {
        let ns = cluster.ns.clone();
        async move {
            ns.set_length(ino, 0, true)
                .await
                .expect("set the length back");
        }
    };
    let recorded = |ino: InodeId| {
        let ns = cluster.ns.clone();
        async move {
            ns.stat(ino)
                .await
                .expect("stat")
                .file()
                .expect("a file")
                .length
        }
    };

    // The writer closes: its close carries the length its sync fixed.
    let (attr, fh) = a
        .create(&root, ROOT, b"closed", 0o644, RW, true)
        .await
        .expect("create");
    a.write(&fh, 0, &data).await.expect("write");
    a.flush(&fh).await.expect("flush");
    lose_sync(attr.ino).await;
    assert_eq!(recorded(attr.ino).await, 0);
    a.release(&fh).await.expect("release");
    assert_eq!(recorded(attr.ino).await, length, "the close restored it");

    // The writer keeps the file open: the startup pass asks storage.
    let (attr, fh) = a
        .create(&root, ROOT, b"open", 0o644, RW, true)
        .await
        .expect("create");
    a.write(&fh, 0, &data).await.expect("write");
    a.flush(&fh).await.expect("flush");
    lose_sync(attr.ino).await;
    let reaper = SessionReaper::new(
        cluster.ns.clone(),
        cluster.meta_storage.clone(),
        ReaperConfig::default(),
        Arc::default(),
    );
    assert!(reaper.fix_written_lengths().await.expect("startup pass") >= 1);
    assert_eq!(
        recorded(attr.ino).await,
        length,
        "the startup pass restored it"
    );
    a.release(&fh).await.expect("release");
    assert_eq!(recorded(attr.ino).await, length);
}

/// Small files written from empty by one writer are held by the metadata
/// service (docs/metadata-schema.md, "Inline data"); every way out of that
/// (growing past the limit, a second writer, a truncate past it) moves the
/// bytes to storage first, and readers see the same bytes throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_are_held_inline_until_they_grow_or_gain_a_writer() {
    let cluster = cluster().await;
    let a = client(&cluster, 41, patient()).await;
    let b = client(&cluster, 42, patient()).await;
    let stats = &cluster.service_stats[0];
    let root = User::root();
    let inline_of = |attr: &flyfs_proto::wire::meta::Attr| attr.inline;

    // Written and closed: held, and read back by another client.
    let small = pattern(11, 3000);
    let (attr, fa) = a
        .create(&root, ROOT, b"held", 0o644, RW, true)
        .await
        .expect("create");
    let ino = attr.ino;
    // A reader that opened before the writer's flush.
    let (_, early) = b.open(&root, ino, RO).await.expect("open");
    a.write(&fa, 0, &small).await.expect("write");
    let syncs = stats.inline_syncs();
    a.flush(&fa).await.expect("flush");
    assert_eq!(
        stats.inline_syncs(),
        syncs + 1,
        "the flush carried the bytes"
    );
    a.release(&fa).await.expect("release");
    let seen = b.stat(&root, ino).await.expect("stat");
    assert!(inline_of(&seen), "{seen:?}");
    assert_eq!(seen.length, small.len() as u64);
    assert_eq!(
        read_all(&b, &early, 1 << 20, 1000).await,
        small,
        "the early reader"
    );
    b.release(&early).await.expect("release");
    let (_, fb) = b.open(&root, ino, RO).await.expect("open");
    assert_eq!(read_all(&b, &fb, 1 << 20, 4096).await, small);
    b.release(&fb).await.expect("release");

    // Rewritten in place and extended within the limit by a new sole writer.
    let mut model = small.clone();
    let (_, fa) = a.open(&root, ino, RW).await.expect("open");
    let patch = pattern(12, 5000);
    a.write(&fa, 2000, &patch).await.expect("write");
    model.resize(7000, 0);
    model[2000..7000].copy_from_slice(&patch);
    a.fsync(&fa).await.expect("fsync");
    assert!(inline_of(&b.stat(&root, ino).await.expect("stat")));
    assert_eq!(
        read_all(&a, &fa, 1 << 20, 4096).await,
        model,
        "the writer reads"
    );
    // Read back before any flush: the writes are synced inline for the
    // read, not moved to storage.
    let (uninlined, syncs) = (stats.uninlined(), stats.inline_syncs());
    let again = pattern(16, 1000);
    a.write(&fa, 500, &again).await.expect("write");
    model[500..1500].copy_from_slice(&again);
    assert_eq!(
        read_all(&a, &fa, 1 << 20, 4096).await,
        model,
        "the writer reads its buffered writes"
    );
    assert_eq!(
        (stats.uninlined(), stats.inline_syncs()),
        (uninlined, syncs + 1),
        "a read after buffered writes moved the file to storage"
    );
    assert!(inline_of(&b.stat(&root, ino).await.expect("stat")));
    // Past the limit: moved to storage first, then written there.
    let uninlined = stats.uninlined();
    let big = pattern(13, 3 * CHUNK as usize);
    a.write(&fa, 7000, &big).await.expect("write");
    model.extend_from_slice(&big);
    assert_eq!(stats.uninlined(), uninlined + 1);
    a.release(&fa).await.expect("release");
    let seen = b.stat(&root, ino).await.expect("stat");
    assert!(!inline_of(&seen));
    let (_, fb) = b.open(&root, ino, RO).await.expect("open");
    assert_eq!(read_all(&b, &fb, 1 << 20, 10_000).await, model);
    b.release(&fb).await.expect("release");

    // A second writer: the file moves to storage at its open, and the
    // first writer's buffered writes follow it there.
    let (attr, fa) = a
        .create(&root, ROOT, b"two", 0o644, RW, true)
        .await
        .expect("create");
    let first = pattern(14, 1000);
    a.write(&fa, 0, &first).await.expect("write");
    a.flush(&fa).await.expect("flush");
    assert!(inline_of(&b.stat(&root, attr.ino).await.expect("stat")));
    let (_, fb) = b.open(&root, attr.ino, RW).await.expect("open");
    assert!(!inline_of(&b.stat(&root, attr.ino).await.expect("stat")));
    let second = pattern(15, 500);
    b.write(&fb, 1000, &second).await.expect("write");
    b.flush(&fb).await.expect("flush");
    let more = pattern(16, 200);
    a.write(&fa, 100, &more).await.expect("write");
    a.flush(&fa).await.expect("flush");
    let mut model = first.clone();
    model.extend_from_slice(&second);
    model[100..300].copy_from_slice(&more);
    a.release(&fa).await.expect("release");
    b.release(&fb).await.expect("release");
    let (_, fb) = b.open(&root, attr.ino, RO).await.expect("open");
    assert_eq!(read_all(&b, &fb, 1 << 20, 4096).await, model);
    b.release(&fb).await.expect("release");

    // Truncates: within the limit the held bytes are cut or zero-extended;
    // past it they move to storage.
    let (attr, fa) = a
        .create(&root, ROOT, b"cut", 0o644, RW, true)
        .await
        .expect("create");
    let data = pattern(17, 4000);
    a.write(&fa, 0, &data).await.expect("write");
    a.release(&fa).await.expect("release");
    let truncate = |size| SetAttrReq {
        user: root.clone(),
        ino: attr.ino,
        size: Some(size),
        ..SetAttrReq::default()
    };
    let cut = b.setattr(truncate(1500)).await.expect("truncate");
    assert!(cut.inline && cut.length == 1500, "{cut:?}");
    let grown = b.setattr(truncate(6000)).await.expect("truncate");
    assert!(grown.inline && grown.length == 6000, "{grown:?}");
    let mut model = data[..1500].to_vec();
    model.resize(6000, 0);
    let (_, fb) = b.open(&root, attr.ino, RO).await.expect("open");
    assert_eq!(read_all(&b, &fb, 1 << 20, 4096).await, model);
    b.release(&fb).await.expect("release");
    let past = b
        .setattr(truncate(2 * u64::from(CHUNK)))
        .await
        .expect("truncate");
    assert!(
        !past.inline && past.length == 2 * u64::from(CHUNK),
        "{past:?}"
    );
    model.resize(2 * CHUNK as usize, 0);
    let (_, fb) = b.open(&root, attr.ino, RO).await.expect("open");
    assert_eq!(read_all(&b, &fb, 1 << 20, 10_000).await, model);
    b.release(&fb).await.expect("release");
    let empty = b.setattr(truncate(0)).await.expect("truncate");
    assert!(!empty.inline && empty.length == 0);

    // A reader's bytes go stale when the writer stores others: its next
    // stat says so, and its next read fetches them.
    let (attr, fa) = a
        .create(&root, ROOT, b"stale", 0o644, RW, true)
        .await
        .expect("create");
    a.write(&fa, 0, b"first").await.expect("write");
    a.flush(&fa).await.expect("flush");
    let (_, fb) = b.open(&root, attr.ino, RO).await.expect("open");
    assert_eq!(read_all(&b, &fb, 100, 100).await, b"first");
    a.write(&fa, 0, b"second!").await.expect("write");
    a.flush(&fa).await.expect("flush");
    assert_eq!(b.stat(&root, attr.ino).await.expect("stat").length, 7);
    assert_eq!(read_all(&b, &fb, 100, 100).await, b"second!");
    b.release(&fb).await.expect("release");
    a.release(&fa).await.expect("release");

    // A client older than inline data reads only from storage: its open
    // (which does not say it reads held data) and its create of an existing
    // file have the data moved there before they are answered.
    for (name, seed) in [
        (&b"for-an-old-open"[..], 17),
        (&b"for-an-old-create"[..], 18),
    ] {
        let (attr, fa) = a
            .create(&root, ROOT, name, 0o644, RW, true)
            .await
            .expect("create");
        let bytes = pattern(seed, 2500);
        a.write(&fa, 0, &bytes).await.expect("write");
        a.release(&fa).await.expect("release");
        assert!(inline_of(&b.stat(&root, attr.ino).await.expect("stat")));
        let uninlined = stats.uninlined();
        let old = if seed == 17 {
            let req = OpenReq {
                user: root.clone(),
                ino: attr.ino,
                read: true,
                ..OpenReq::default()
            };
            a.meta().call::<Open, _>(&req).await
        } else {
            let req = CreateReq {
                user: root.clone(),
                parent: ROOT,
                name: name.to_vec(),
                mode: 0o644,
                read: true,
                ..CreateReq::default()
            };
            a.meta().call::<Create, _>(&req).await
        }
        .expect("an older client's open");
        assert_eq!(stats.uninlined(), uninlined + 1);
        assert!(!old.attr.inline && old.inline.is_none() && old.inline_max == 0);
        assert_eq!(old.attr.length, bytes.len() as u64);
        let (_, fb) = b.open(&root, attr.ino, RO).await.expect("open");
        assert_eq!(
            read_all(&b, &fb, 1 << 20, 4096).await,
            bytes,
            "from storage"
        );
        b.release(&fb).await.expect("release");
    }
}

/// Reads `len` bytes at `offset` through a handle of its own, whose first
/// read is a random one (no read-ahead): the block cache's path.
async fn read_fresh(fs: &FsClient<Tcp>, ino: InodeId, offset: u64, len: u32) -> Vec<u8> {
    let (_, fh) = fs.open(&User::root(), ino, RO).await.expect("open");
    let data = fs.read(&fh, offset, len).await.expect("read");
    fs.release(&fh).await.expect("release");
    data.to_vec()
}

/// Writes `data` at `offset` through a handle of its own and closes it.
async fn write_closed(fs: &FsClient<Tcp>, ino: InodeId, offset: u64, data: &[u8]) {
    let (_, fh) = fs.open(&User::root(), ino, RW).await.expect("open");
    fs.write(&fh, offset, data).await.expect("write");
    fs.release(&fh).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_block_cache_answers_only_with_the_committed_version() {
    let cluster = cluster().await;
    let a = client(&cluster, 31, FsConfig::default()).await;
    let b = client(&cluster, 32, FsConfig::default()).await;
    let root = User::root();
    let (attr, fh) = a
        .create(&root, ROOT, b"cached", 0o644, RW, true)
        .await
        .expect("create");
    let ino = attr.ino;
    let mut model = pattern(1, 2 * CHUNK as usize);
    a.write(&fh, 0, &model).await.expect("write");
    a.release(&fh).await.expect("release");
    let page = 4096usize;
    let range = |m: &[u8]| m[page..3 * page].to_vec();

    // A miss, then a hit the replica confirmed, with the same bytes.
    assert!(
        read_fresh(&b, ino, page as u64, 2 * page as u32).await == range(&model),
        "bytes differ"
    );
    let stats = b.block_cache_stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.stale),
        (0, 1, 0),
        "{stats:?}"
    );
    assert!(
        read_fresh(&b, ino, page as u64, 2 * page as u32).await == range(&model),
        "bytes differ"
    );
    assert_eq!(b.block_cache_stats().hits, 1);
    // Part of a cached range is a hit too; a range reaching past it is not.
    assert!(
        read_fresh(&b, ino, 2 * page as u64, 100).await == model[2 * page..2 * page + 100],
        "bytes differ"
    );
    assert_eq!(b.block_cache_stats().hits, 2);
    assert!(
        read_fresh(&b, ino, 2 * page as u64, 2 * page as u32).await == model[2 * page..4 * page],
        "bytes differ"
    );
    assert_eq!(b.block_cache_stats().misses, 2);

    // Another client's write: the replica sends the new bytes, which
    // replace the cached ones.
    let new = pattern(2, page);
    write_closed(&a, ino, 2 * page as u64, &new).await;
    model[2 * page..3 * page].copy_from_slice(&new);
    assert!(
        read_fresh(&b, ino, page as u64, 2 * page as u32).await == range(&model),
        "bytes differ"
    );
    assert_eq!(b.block_cache_stats().stale, 1);
    assert!(
        read_fresh(&b, ino, page as u64, 2 * page as u32).await == range(&model),
        "bytes differ"
    );
    assert_eq!(b.block_cache_stats().hits, 3);

    // The file shrunk to nothing and written again the same way: its
    // chunks come back with the same version numbers and lengths, made by
    // other writes, and the cache must not take them for the old ones.
    let truncate = |size| SetAttrReq {
        user: root.clone(),
        ino,
        size: Some(size),
        ..SetAttrReq::default()
    };
    a.setattr(truncate(0)).await.expect("truncate");
    let mut again = pattern(3, 2 * CHUNK as usize);
    write_closed(&a, ino, 0, &again).await;
    let new = pattern(4, page);
    write_closed(&a, ino, 2 * page as u64, &new).await;
    again[2 * page..3 * page].copy_from_slice(&new);
    assert!(
        read_fresh(&b, ino, page as u64, 2 * page as u32).await == range(&again),
        "bytes differ"
    );
    let stats = b.block_cache_stats();
    assert_eq!((stats.hits, stats.stale), (3, 2), "{stats:?}");

    // Turned off, nothing is kept.
    let c = client(
        &cluster,
        33,
        FsConfig {
            block_cache_bytes: 0,
            ..FsConfig::default()
        },
    )
    .await;
    for _ in 0..2 {
        assert!(
            read_fresh(&c, ino, page as u64, 2 * page as u32).await == range(&again),
            "bytes differ"
        );
    }
    assert_eq!(c.block_cache_stats(), Default::default());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_read_near_the_last_one_fetches_no_chunks_ahead() {
    let cluster = cluster().await;
    let fs = client(&cluster, 34, FsConfig::default()).await;
    let root = User::root();
    let (attr, fh) = fs
        .create(&root, ROOT, b"random", 0o644, RW, true)
        .await
        .expect("create");
    let model = pattern(5, 8 * CHUNK as usize);
    fs.write(&fh, 0, &model).await.expect("write");
    fs.release(&fh).await.expect("release");
    let (_, fh) = fs.open(&root, attr.ino, RO).await.expect("open");
    let page = 4096u64;
    let read = async |fh: &FileHandle, offset: u64| {
        let got = fs.read(fh, offset, page as u32).await.expect("read");
        assert!(got[..] == model[offset as usize..(offset + page) as usize]);
    };
    // A random reader: a far read, then one that happens to start within
    // a chunk of where it ended.
    let far = 5 * u64::from(CHUNK);
    read(&fh, 0).await;
    read(&fh, far).await;
    read(&fh, far + 3 * page).await;
    assert_eq!(fh.chunks_read_ahead(), 0, "one near read is no stream");
    // Two near reads in a row are.
    read(&fh, far + 6 * page).await;
    assert!(fh.chunks_read_ahead() > 0);
    fs.release(&fh).await.expect("release");
    // So is a read that starts where the last one ended.
    let (_, fh) = fs.open(&root, attr.ino, RO).await.expect("open");
    read(&fh, 0).await;
    read(&fh, page).await;
    assert!(fh.chunks_read_ahead() > 0);
    fs.release(&fh).await.expect("release");
    cluster.shutdown().await;
}
