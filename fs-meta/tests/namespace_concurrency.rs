//! Concurrency: 16 tasks on a multi-threaded runtime, spread over two
//! namespace instances sharing one store (two metadata servers), issue
//! conflicting creates, mkdirs, links, unlinks, renames (directories into
//! each other's subtrees included), recursive removes and write sessions
//! over a handful of names, while a GC worker runs beside them. Afterwards
//! `check()` must find no cycle, no orphan, right link counts and no
//! dangling entry, before and after collecting everything.
//!
//! Runs on `MemKv` (behind `Yielding`, so that transactions interleave at
//! every read) and on `FjallKv` (in a temporary directory).

mod ns_common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flyfs_fs_meta::ns::{CreateFlags, Namespace, NsError, OpenFlags};
use flyfs_kv::Kv;
use flyfs_kv::fjall::{FjallKv, FjallOptions};
use flyfs_kv::mem::MemKv;
use flyfs_proto::ids::InodeId;
use flyfs_proto::wire::meta::User;
use flyfs_time::{Clock, ManualClock};
use ns_common::Yielding;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TASKS: usize = 16;
const NAMES: &[&[u8]] = &[b"a", b"b", b"c", b"d"];

/// How long the tasks run; `NS_STRESS_SECS` makes it longer for a soak.
fn duration() -> Duration {
    let secs = std::env::var("NS_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// A random path of up to three names: the directory most operations work
/// in, so that directories get renamed into each other's subtrees.
fn random_path(rng: &mut StdRng) -> Vec<u8> {
    let mut path = b"/".to_vec();
    for _ in 0..rng.random_range(0..3) {
        path.extend_from_slice(NAMES[rng.random_range(0..NAMES.len())]);
        path.push(b'/');
    }
    path
}

fn random_name(rng: &mut StdRng) -> &'static [u8] {
    NAMES[rng.random_range(0..NAMES.len())]
}

/// A directory to work in: a random path resolved now (it may be renamed
/// or removed by the time it is used, which is the point).
async fn random_dir<K: Kv>(ns: &Namespace<K>, rng: &mut StdRng) -> Result<InodeId, NsError> {
    let path = random_path(rng);
    Ok(ns.resolve(&User::root(), &path, true).await?.ino)
}

/// One random operation. Only internal errors (a KV failure that outlasted
/// the retries, corruption) are returned as failures; POSIX errors are the
/// expected outcome of racing over few names and only counted.
async fn one_op<K: Kv>(
    ns: &Namespace<K>,
    rng: &mut StdRng,
    sessions: &mut Vec<(InodeId, flyfs_fs_meta::ns::SessionId)>,
) -> Result<&'static str, NsError> {
    let user = User::root();
    let result: Result<(), NsError> = async {
        match rng.random_range(0..100) {
            0..15 => {
                let dir = random_dir(ns, rng).await?;
                ns.mkdir(&user, dir, random_name(rng), 0o755)
                    .await
                    .map(drop)
            }
            15..30 => {
                let dir = random_dir(ns, rng).await?;
                let write = rng.random_bool(0.3);
                let flags = CreateFlags {
                    write_session: write.then_some(9),
                    ..CreateFlags::default()
                };
                let created = ns
                    .create(&user, dir, random_name(rng), 0o644, flags)
                    .await?;
                if let Some(session) = created.session {
                    sessions.push((created.inode.ino, session));
                }
                Ok(())
            }
            30..40 => {
                let dir = random_dir(ns, rng).await?;
                let file = ns.lookup(&user, dir, random_name(rng)).await?;
                let to = random_dir(ns, rng).await?;
                ns.link(&user, file.ino, to, random_name(rng))
                    .await
                    .map(drop)
            }
            40..52 => {
                let dir = random_dir(ns, rng).await?;
                ns.unlink(&user, dir, random_name(rng)).await.map(drop)
            }
            52..60 => {
                let dir = random_dir(ns, rng).await?;
                ns.rmdir(&user, dir, random_name(rng)).await
            }
            60..85 => {
                let from = random_dir(ns, rng).await?;
                let to = random_dir(ns, rng).await?;
                ns.rename(&user, from, random_name(rng), to, random_name(rng))
                    .await
            }
            85..88 => {
                let dir = random_dir(ns, rng).await?;
                ns.remove_all(&user, dir, random_name(rng)).await.map(drop)
            }
            88..91 => {
                let dir = random_dir(ns, rng).await?;
                ns.symlink(&user, dir, random_name(rng), b"../a")
                    .await
                    .map(drop)
            }
            91..95 => {
                let dir = random_dir(ns, rng).await?;
                let file = ns.lookup(&user, dir, random_name(rng)).await?;
                let flags = OpenFlags {
                    read: true,
                    write_session: Some(10),
                    ..OpenFlags::default()
                };
                let opened = ns.open_file(&user, file.ino, flags).await?;
                if let Some(session) = opened.session {
                    sessions.push((file.ino, session));
                }
                Ok(())
            }
            _ => {
                if sessions.is_empty() {
                    return Ok(());
                }
                let (ino, session) = sessions.swap_remove(rng.random_range(0..sessions.len()));
                ns.close(ino, session, Some(rng.random_range(0..4096)))
                    .await
                    .map(drop)
            }
        }
    }
    .await;
    match result {
        Ok(()) => Ok("ok"),
        Err(e @ (NsError::Kv(_) | NsError::Corrupt { .. } | NsError::Encode { .. })) => Err(e),
        Err(NsError::NotFound(_)) => Ok("ENOENT"),
        Err(NsError::Exists(_)) => Ok("EEXIST"),
        Err(NsError::NotEmpty(_)) => Ok("ENOTEMPTY"),
        Err(NsError::NotDir(_)) => Ok("ENOTDIR"),
        Err(NsError::IsDir(_)) => Ok("EISDIR"),
        Err(NsError::Invalid(_)) => Ok("EINVAL"),
        Err(NsError::NotPermitted(_)) => Ok("EPERM"),
        Err(NsError::Loop(_)) => Ok("ELOOP"),
        Err(other) => Ok(match other.errno() {
            libc::EACCES => "EACCES",
            _ => "other",
        }),
    }
}

async fn stress<K: Kv>(kv: K) {
    let clock = Arc::new(ManualClock::new(ns_common::START_NS));
    // Two instances opening the same empty store at once: one creates the
    // root, the other must find it.
    let (a, b) = tokio::join!(
        Namespace::open(kv.clone(), ns_common::config(clock.clone())),
        Namespace::open(kv.clone(), ns_common::config(clock.clone()))
    );
    let instances = [a.expect("open a"), b.expect("open b")];
    let root = User::root();
    for name in NAMES {
        instances[0]
            .mkdir(&root, InodeId(1), name, 0o755)
            .await
            .expect("mkdir");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let ns = instances[task % 2].clone();
        let (stop, total) = (stop.clone(), total.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(task as u64);
            let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
            let mut sessions = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let outcome = one_op(&ns, &mut rng, &mut sessions)
                    .await
                    .unwrap_or_else(|e| panic!("task {task}: internal error: {e}"));
                *outcomes.entry(outcome).or_default() += 1;
                total.fetch_add(1, Ordering::Relaxed);
            }
            // Close what is left open, so that GC can collect everything.
            for (ino, session) in sessions {
                ns.close(ino, session, None).await.expect("close");
            }
            outcomes
        }));
    }
    // The GC worker, concurrently with everything else.
    let gc = {
        let (ns, stop, clock) = (instances[1].clone(), stop.clone(), clock.clone());
        tokio::spawn(async move {
            let mut deleted = 0;
            while !stop.load(Ordering::Relaxed) {
                clock.advance_ms(ns_common::GC_DELAY_MS as i64 + 1);
                let now_ms = clock.now_ms();
                deleted += ns_common::run_gc(&ns, now_ms).await.expect("GC");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            deleted
        })
    };

    let started = Instant::now();
    tokio::time::sleep(duration()).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    for task in tasks {
        for (outcome, count) in task.await.expect("task") {
            *outcomes.entry(outcome).or_default() += count;
        }
    }
    let deleted_concurrently = gc.await.expect("GC task");
    let ops = total.load(Ordering::Relaxed);
    println!(
        "{ops} operations in {:.1} s: {outcomes:?}; GC deleted {deleted_concurrently} files meanwhile",
        started.elapsed().as_secs_f64()
    );
    assert!(
        outcomes.get("ok").copied().unwrap_or(0) > 100,
        "too little succeeded: {outcomes:?}"
    );
    assert!(
        outcomes.len() > 3,
        "the races never produced errors: {outcomes:?}"
    );

    let report = ns_common::assert_clean(&instances[0]).await;
    println!("after the run: {report}");

    // Collect everything removed; the namespace must stay consistent, and
    // everything left must be reachable from the root.
    clock.advance_ms(ns_common::GC_DELAY_MS as i64 + 1);
    let now_ms = clock.now_ms();
    ns_common::run_gc(&instances[0], now_ms)
        .await
        .expect("final GC");
    let report = ns_common::assert_clean(&instances[0]).await;
    assert_eq!(report.queued, 0, "everything due was collected: {report}");
    assert_eq!(report.sessions, 0);
    println!("after GC: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_operations_keep_the_tree_consistent_on_memkv() {
    stress(Yielding(MemKv::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_operations_keep_the_tree_consistent_on_fjall() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Durability is not under test here; fsyncs would only slow it down.
    let options = FjallOptions {
        sync_on_commit: false,
        ..FjallOptions::default()
    };
    let kv = FjallKv::open(dir.path(), options).expect("open fjall");
    stress(kv).await;
}

/// Two namespace instances creating files in one directory at once never
/// hand out the same inode id, and every create lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_get_distinct_ids() {
    let kv = MemKv::new();
    let clock = Arc::new(ManualClock::new(ns_common::START_NS));
    let mut tasks = Vec::new();
    for instance in 0..4 {
        let ns = Namespace::open(kv.clone(), ns_common::config(clock.clone()))
            .await
            .expect("open");
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..300 {
                let name = format!("f{instance}-{i}");
                let created = ns
                    .create(
                        &User::root(),
                        InodeId(1),
                        name.as_bytes(),
                        0o644,
                        CreateFlags::default(),
                    )
                    .await
                    .expect("create");
                ids.push(created.inode.ino);
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    let distinct: std::collections::BTreeSet<_> = all.iter().collect();
    assert_eq!(distinct.len(), 1200);
    let ns = Namespace::open(kv, ns_common::config(clock))
        .await
        .expect("open");
    let report = ns_common::assert_clean(&ns).await;
    assert_eq!(report.files, 1200);
}

/// The classic cycle race, hammered: four directories with fixed names and
/// ids, 16 tasks each moving a random one of them under a random other
/// (`mv a b/` racing `mv b a/`). Without serializable reads along the
/// ancestor walk two such renames both commit and cut a loop off the tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_directory_moves_never_make_a_cycle() {
    let (ns, _clock) = ns_common::open(Yielding(MemKv::new())).await;
    let root = User::root();
    let mut ids = vec![InodeId(1)];
    for name in NAMES {
        ids.push(
            ns.mkdir(&root, InodeId(1), name, 0o755)
                .await
                .expect("mkdir")
                .ino,
        );
    }
    let ids = Arc::new(ids);
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (ns, ids, stop, moved) = (ns.clone(), ids.clone(), stop.clone(), moved.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(1000 + task as u64);
            while !stop.load(Ordering::Relaxed) {
                let which = rng.random_range(0..NAMES.len());
                let from = ids[rng.random_range(0..ids.len())];
                let to = ids[rng.random_range(0..ids.len())];
                match ns
                    .rename(&User::root(), from, NAMES[which], to, NAMES[which])
                    .await
                {
                    Ok(()) => {
                        moved.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(NsError::NotFound(_) | NsError::Invalid(_)) => {}
                    Err(e) => panic!("rename: {e}"),
                }
            }
        }));
    }
    tokio::time::sleep(duration() / 2).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("task");
    }
    let moved = moved.load(Ordering::Relaxed);
    assert!(moved > 100, "only {moved} moves succeeded");
    let report = ns_common::assert_clean(&ns).await;
    assert_eq!(report.directories, 5);
    println!("{moved} directory moves; {report}");
}
