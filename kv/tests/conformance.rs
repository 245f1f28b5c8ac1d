//! Runs the KV conformance suite (`flyfs_kv::conformance`) against
//! every backend: `MemKv`, `FjallKv` in temporary directories, and `FdbKv`
//! when built with the `fdb` feature and `FLYFS_FDB_CLUSTER_FILE` names a
//! cluster file (otherwise that test says it skipped and why).

use std::sync::Mutex;

use flyfs_kv::conformance;
use flyfs_kv::fjall::{FjallKv, FjallOptions};
use flyfs_kv::mem::MemKv;

// Two worker threads, so that the concurrency checks really run tasks in
// parallel (CI has two cores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_kv_conforms() {
    conformance::run_all(MemKv::with_limits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fjall_kv_conforms() {
    // Each store gets its own directory, kept until the test ends.
    let dirs = Mutex::new(Vec::new());
    conformance::run_all(|limits| {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let options = FjallOptions {
            limits,
            ..FjallOptions::default()
        };
        let kv = FjallKv::open(dir.path(), options).expect("open fjall store");
        dirs.lock().expect("no panic while held").push(dir);
        kv
    })
    .await;
}

#[cfg(feature = "fdb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fdb_kv_conforms() {
    use flyfs_kv::fdb::{self, FdbKv};
    use flyfs_kv::{Kv, Transaction};

    /// Clears every key of `kv` (everything under its prefix).
    async fn clear_all(kv: &FdbKv) {
        let tx = kv.begin().expect("begin");
        tx.clear_range(b"", &[0xff, 0xff]).expect("clear");
        tx.commit().await.expect("commit the clear");
    }

    const VARIABLE: &str = "FLYFS_FDB_CLUSTER_FILE";
    let Some(cluster_file) = std::env::var_os(VARIABLE) else {
        println!(
            "SKIPPED fdb_kv_conforms: FoundationDB is absent, nothing was checked; set \
             {VARIABLE} to a cluster file to run the conformance suite against it"
        );
        return;
    };
    let cluster_file = std::path::PathBuf::from(cluster_file);
    let kv = FdbKv::open(Some(&cluster_file)).expect("connect to FoundationDB");
    // Every store of the run lives under its own prefix in one test
    // subspace, cleared before and after.
    let run = kv.with_prefix(format!("flyfs-conformance/{}/", std::process::id()).as_bytes());
    clear_all(&run).await;
    let stores = std::sync::atomic::AtomicU32::new(0);
    conformance::run_all(|_limits| {
        let n = stores.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        run.with_prefix(format!("{n:04}/").as_bytes())
    })
    .await;
    clear_all(&run).await;
    fdb::stop_network();
}

/// Measurement, not a check (run with `--ignored --nocapture`): commit
/// throughput of non-conflicting read-modify-write transactions with one
/// task and with eight, on `FjallKv` with and without an fsync per commit,
/// and on `MemKv`. With eight tasks transactions overlap (the peak number
/// open at once is printed and must exceed one), and with fsync on, the
/// group commit lets one fsync cover several commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn commit_throughput_with_concurrent_transactions() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use flyfs_kv::{Kv, Transaction};

    /// Commits per second with `tasks` tasks for about `duration`, and the
    /// most transactions seen open at once.
    async fn measure<K: Kv>(kv: K, tasks: usize, duration: Duration) -> (f64, usize) {
        let open = Arc::new(AtomicUsize::new(0));
        let open_max = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut handles = Vec::new();
        for task in 0..tasks {
            let (kv, open, open_max) = (kv.clone(), open.clone(), open_max.clone());
            handles.push(tokio::spawn(async move {
                let key = format!("bench/{task}").into_bytes();
                let mut commits = 0u64;
                while started.elapsed() < duration {
                    let tx = kv.begin().expect("begin");
                    let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                    open_max.fetch_max(now_open, Ordering::SeqCst);
                    let count = tx
                        .get(&key, false)
                        .await
                        .expect("get")
                        .map_or(0, |v| v.len());
                    tx.set(&key, &vec![b'x'; (count + 1) % 100]).expect("set");
                    tx.commit().await.expect("non-conflicting commit");
                    open.fetch_sub(1, Ordering::SeqCst);
                    commits += 1;
                }
                commits
            }));
        }
        let mut commits = 0;
        for handle in handles {
            commits += handle.await.expect("task");
        }
        let rate = commits as f64 / started.elapsed().as_secs_f64();
        (rate, open_max.load(Ordering::SeqCst))
    }

    let duration = Duration::from_secs(2);
    for sync_on_commit in [true, false] {
        let mut rates = Vec::new();
        for tasks in [1, 8] {
            let dir = tempfile::tempdir().expect("temp dir");
            let options = FjallOptions {
                sync_on_commit,
                ..FjallOptions::default()
            };
            let kv = FjallKv::open(dir.path(), options).expect("open");
            let (rate, open_max) = measure(kv, tasks, duration).await;
            println!(
                "fjall sync_on_commit={sync_on_commit}: {tasks} task(s): {rate:.0} commits/s, \
                 at most {open_max} transactions open at once"
            );
            if tasks > 1 {
                assert!(open_max > 1, "transactions never overlapped");
            }
            rates.push(rate);
        }
        println!(
            "fjall sync_on_commit={sync_on_commit}: 8 tasks / 1 task = {:.2}",
            rates[1] / rates[0]
        );
    }
    for tasks in [1, 8] {
        let (rate, open_max) = measure(MemKv::new(), tasks, duration).await;
        println!("mem: {tasks} task(s): {rate:.0} commits/s, at most {open_max} open at once");
    }
}
