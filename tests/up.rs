//! `flyfs up` and `flyfs down` with the built binary: a whole cluster (no
//! FUSE mount) in a temporary data directory on a free port range; status
//! through `flyfs admin`; a metrics endpoint scraped; down, up again with
//! the same chains and the devices not formatted again; down twice.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::{flyfs, probe_io_uring, scrape, text};

/// A base port with the 16 ports the cluster uses all free; tests running
/// side by side get different ones.
fn free_base() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    for _ in 0..200 {
        let attempt = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Spread over 20000..32768, below Linux's ephemeral ports (32768 on),
        // which other tests' outgoing connections take at any moment.
        let base = 20_000 + ((std::process::id() * 7919 + attempt * 613) % 798) as u16 * 16;
        let all_free =
            (0..16).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no free range of 16 ports");
}

fn run(args: &[&str]) -> Output {
    flyfs().args(args).output().expect("run flyfs")
}

fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "flyfs {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Each device's first 4 KiB: its superblock, with the random format id.
fn superblocks(data: &Path) -> Vec<Vec<u8>> {
    (1..=3)
        .map(|n| {
            let mut head = vec![0u8; 4096];
            std::fs::File::open(data.join(format!("devices/storage{n}.img")))
                .and_then(|mut f| f.read_exact(&mut head))
                .expect("read a device's superblock");
            head
        })
        .collect()
}

/// Scrapes `addr` until the answer contains `needle` (gauges follow the
/// manager's tick); the last answer.
fn scrape_until(addr: &str, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = scrape(addr);
        if answer.contains(needle) || std::time::Instant::now() > deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills what a failed test left running.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = flyfs()
            .args(["down", "--timeout", "5", "--data"])
            .arg(self.0)
            .output();
        if std::thread::panicking() {
            for name in ["mgmtd", "storage1", "storage2", "storage3", "meta"] {
                let log = std::fs::read_to_string(self.0.join(format!("log/{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!("---- last lines of {name}.log ----");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A temporary directory for a cluster's data and that data directory
/// (as a path and an argument); None, having said why, where io_uring is
/// missing.
fn cluster_dir() -> Option<(tempfile::TempDir, PathBuf, String)> {
    let dir = tempfile::tempdir().expect("tempdir");
    if let Err(why) = probe_io_uring(dir.path()) {
        eprintln!("skipped: io_uring is not available here ({why})");
        return None;
    }
    let data = dir.path().join("cluster");
    let data_arg = data.display().to_string();
    Some((dir, data, data_arg))
}

#[test]
fn up_down_up_keeps_the_cluster() {
    let Some((_dir, data, data_arg)) = cluster_dir() else {
        return;
    };
    let base = free_base();
    let port = base.to_string();
    let mgmt = format!("127.0.0.1:{base}");
    let meta = format!("127.0.0.1:{}", base + 1);
    let _down = Down(&data);

    let up = [
        "up",
        "--no-mount",
        "--data",
        &data_arg,
        "--port",
        &port,
        "--device-size",
        "256MiB",
        "--timeout",
        "30",
    ];
    let first = run_ok(&up);
    assert!(first.contains("created 6 chains"), "{first}");
    assert!(
        first.contains(&format!("flyfs down --data {data_arg}")),
        "{first}"
    );

    let status: serde_json::Value = serde_json::from_str(&run_ok(&[
        "admin", "--data", &data_arg, "--mgmt", &mgmt, "--json", "status",
    ]))
    .expect("status is JSON");
    let chains = status["chains"].clone();
    assert_eq!(chains.as_array().map(Vec::len), Some(6), "{status}");
    assert_eq!(
        status["nodes"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
    let usage = status["usage"].as_array().expect("usage");
    assert_eq!(usage.len(), 3, "{status}");
    assert!(
        usage
            .iter()
            .all(|u| u["error"].is_null() && u["disks"][0]["data_bytes"].as_u64() > Some(0)),
        "{status}"
    );
    let devices = superblocks(&data);

    // The manager's metrics endpoint (base + 10) counts the RPCs it served.
    let metrics = scrape_until(&format!("127.0.0.1:{}", base + 10), "flyfs_mgmt_chains 6");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("flyfs_rpc_server_requests_total{method=\"mgmt.GetRouting\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flyfs_rpc_server_request_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("flyfs_mgmt_chains 6"), "{metrics}");
    // A storage node's: heartbeats on the client side, its disk.
    let metrics = scrape_until(
        &format!("127.0.0.1:{}", base + 12),
        "flyfs_storage_disk_bytes",
    );
    assert!(
        metrics.contains("flyfs_rpc_client_requests_total{method=\"mgmt.Heartbeat\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flyfs_storage_disk_bytes{disk=\"0\",kind=\"capacity\"} 268435456"),
        "{metrics}"
    );

    // The metadata service's: how its journal was made durable (the root
    // directory's creation at least was a durable commit).
    let metrics = scrape_until(
        &format!("127.0.0.1:{}", base + 11),
        "flyfs_meta_journal_fsyncs_total",
    );
    let count = |name: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|line| line.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"));
        line[name.len() + 1..].trim().parse().expect("a count")
    };
    assert!(count("flyfs_meta_journal_fsyncs_total") >= 1, "{metrics}");
    assert!(
        count("flyfs_meta_journal_commits_total") >= count("flyfs_meta_journal_fsyncs_total"),
        "{metrics}"
    );

    // The namespace, without a mount.
    let ls = run_ok(&["admin", "--data", &data_arg, "--meta", &meta, "ls", "/"]);
    assert!(ls.is_empty(), "a new file system is empty: {ls}");
    let stat = run_ok(&["admin", "--data", &data_arg, "--meta", &meta, "stat", "/"]);
    assert!(stat.contains("Type: directory"), "{stat}");
    let missing = run(&[
        "admin", "--data", &data_arg, "--meta", &meta, "stat", "/nope",
    ]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/nope"),
        "{}",
        text(&missing)
    );
    let gc: serde_json::Value = serde_json::from_str(&run_ok(&[
        "admin", "--data", &data_arg, "--meta", &meta, "--json", "gc",
    ]))
    .expect("gc JSON");
    assert_eq!(gc["queued"], 0, "{gc}");

    // Up again while it runs: nothing to do.
    let again = run_ok(&up);
    assert!(!again.contains("created"), "{again}");
    assert!(!again.contains("started"), "{again}");

    let down = run_ok(&["down", "--data", &data_arg]);
    for name in ["mgmtd", "meta", "storage1", "storage2", "storage3"] {
        assert!(down.contains(&format!("stopped {name}")), "{down}");
    }
    assert!(
        run(&[
            "admin",
            "--data",
            &data_arg,
            "--mgmt",
            &mgmt,
            "--timeout-ms",
            "500",
            "status"
        ])
        .status
        .code()
            == Some(1)
    );

    // The replication of existing chains cannot change.
    let other = run(&["up", "--no-mount", "--data", &data_arg, "--replicas", "1"]);
    assert!(!other.status.success(), "{}", text(&other));
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("created with 3 replicas per chain"),
        "{}",
        text(&other)
    );

    // Back up without --port: the stored one; same chains, same devices.
    let second = run_ok(&["up", "--no-mount", "--data", &data_arg, "--timeout", "30"]);
    assert!(!second.contains("created"), "{second}");
    let status: serde_json::Value = serde_json::from_str(&run_ok(&[
        "admin", "--data", &data_arg, "--mgmt", &mgmt, "--json", "status",
    ]))
    .expect("status is JSON");
    // Same chains holding the same targets. Their order is not kept: a target
    // that comes back rejoins at the tail and resyncs, so the order depends on
    // which storage daemon registered first after the restart.
    let ids = |chains: &serde_json::Value| -> Vec<(u64, Vec<u64>)> {
        chains
            .as_array()
            .expect("chains")
            .iter()
            .map(|c| {
                let mut targets: Vec<u64> = c["targets"]
                    .as_array()
                    .expect("targets")
                    .iter()
                    .map(|t| t["target"].as_u64().expect("id"))
                    .collect();
                targets.sort_unstable();
                (c["id"].as_u64().expect("chain id"), targets)
            })
            .collect()
    };
    assert_eq!(ids(&status["chains"]), ids(&chains));
    assert_eq!(superblocks(&data), devices, "a device was formatted again");

    run_ok(&["down", "--data", &data_arg]);
    let idle = run_ok(&["down", "--data", &data_arg]);
    assert!(idle.contains("nothing was running"), "{idle}");
}

#[test]
fn one_replica_chains_spread_over_the_nodes() {
    let Some((_dir, data, data_arg)) = cluster_dir() else {
        return;
    };
    let base = free_base();
    let _down = Down(&data);
    let first = run_ok(&[
        "up",
        "--no-mount",
        "--data",
        &data_arg,
        "--port",
        &base.to_string(),
        "--device-size",
        "256MiB",
        "--replicas",
        "1",
    ]);
    assert!(first.contains("created 6 chains of 1 replicas"), "{first}");
    let mgmt = format!("127.0.0.1:{base}");
    let status: serde_json::Value = serde_json::from_str(&run_ok(&[
        "admin", "--data", &data_arg, "--mgmt", &mgmt, "--json", "status",
    ]))
    .expect("status is JSON");
    let mut nodes: Vec<u64> = status["chains"]
        .as_array()
        .expect("chains")
        .iter()
        .map(|c| {
            let targets = c["targets"].as_array().expect("targets");
            assert_eq!(targets.len(), 1, "{c}");
            // The node the manager says the target is on.
            let target = &targets[0]["target"];
            status["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .find(|t| t["id"] == *target)
                .and_then(|t| t["node"].as_u64())
                .expect("every chain member is a known target")
        })
        .collect();
    nodes.sort_unstable();
    assert_eq!(nodes, [1, 1, 2, 2, 3, 3], "{status}");
    run_ok(&["down", "--data", &data_arg]);
}

#[test]
fn a_port_in_use_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base();
    let _holder = std::net::TcpListener::bind(("127.0.0.1", base + 2)).expect("hold a port");
    let data = dir.path().join("cluster");
    let out = flyfs()
        .args(["up", "--no-mount", "--port", &base.to_string(), "--data"])
        .arg(&data)
        .output()
        .expect("run");
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("port {}", base + 2)), "{stderr}");
    assert!(stderr.contains("storage1"), "{stderr}");
    // Nothing was started.
    let down = run_ok(&["down", "--data", &data.display().to_string()]);
    assert!(down.contains("nothing"), "{down}");
}
