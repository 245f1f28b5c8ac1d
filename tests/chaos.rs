//! The chaos soak (`flyfs bench chaos`, docs/chaos.md) for 45 s of faults
//! (the first round of every kind runs whole even past them; some 80 s in
//! all on a loaded 2-core machine): a cluster of real daemons (in network
//! namespaces when this runs as root) under a verifying workload while storage nodes, the metadata service
//! and the manager are killed, restarted and partitioned, and a storage
//! node is killed for good and replaced with `flyfs admin drain-node`.
//! A second run of 2 minutes with one task replays the seed that showed
//! acknowledged writes lost (some 150 s in all).
//!
//! What must hold: every kind of fault fired, at least one replacement
//! finished, the workload had writes acknowledged and read them back, no
//! byte was wrong (every acknowledged write reads back at the end) and the
//! cluster came back to all-serving. The seed comes from the clock unless
//! FLYFS_CHAOS_SEED names one; a failure prints it (in the summary) to run
//! the same schedule again.
//!
//! Bad command lines get clear errors before anything starts.
//!
//! Skips (with a message) on a machine without io_uring.

mod support;

use support::{flyfs, probe_io_uring, text};

const KINDS: [&str; 7] = [
    "kill_storage",
    "kill_meta",
    "kill_mgmtd",
    "partition_storage",
    "partition_meta",
    "partition_mgmtd",
    "replace_storage",
];

#[test]
fn chaos_loses_no_acknowledged_write() {
    let seed = std::env::var("FLYFS_CHAOS_SEED").ok();
    soak_and_check("0.75", seed.as_deref(), &[]);
}

/// The schedule and workload that showed acknowledged files reading back
/// wrong (docs/chaos.md, "30-minute soaks"): with one task, a 2-minute run
/// lost whole chunks within 90 s, because a late up-to-date heartbeat made
/// a syncing target serve without a resync. Fixed in the manager; the
/// timing is not seeded, so a pass says this run did not lose a write, not
/// that no run can.
#[test]
fn acknowledged_bytes_survive_the_first_minutes() {
    soak_and_check("2", Some("20261205"), &["--tasks", "1"]);
}

/// Runs the soak for `minutes` and checks what must hold of its summary.
fn soak_and_check(minutes: &str, seed: Option<&str>, extra: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    if let Err(e) = probe_io_uring(dir.path()) {
        eprintln!("skipping: io_uring is not available here ({e})");
        return;
    }
    let mut command = flyfs();
    command
        .args(["bench", "chaos", "--minutes", minutes, "--json", "--dir"])
        .arg(dir.path())
        .args(extra);
    if let Some(seed) = seed {
        command.args(["--seed", seed]);
    }
    let out = command.output().expect("run flyfs bench chaos");
    assert!(out.status.success(), "the soak failed: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", text(&out)));
    let field = |name: &str| {
        summary[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no `{name}` in {summary}"))
    };
    for kind in KINDS {
        assert!(
            summary["faults"][kind].as_u64().unwrap_or(0) > 0,
            "no {kind} fault fired: {summary}"
        );
    }
    assert!(field("faults_injected") >= KINDS.len() as u64, "{summary}");
    assert!(field("replacements") >= 1, "{summary}");
    assert!(field("acknowledged_writes") > 0, "{summary}");
    assert!(field("verified_reads") > 0, "{summary}");
    assert!(field("final_files_checked") > 0, "{summary}");
    assert_eq!(field("verify_errors"), 0, "{summary}");
    assert_eq!(summary["all_serving"], true, "{summary}");
    assert!(summary["seed"].is_u64(), "{summary}");
    let wanted: f64 = minutes.parse().expect("minutes");
    assert_eq!(summary["minutes"], wanted, "{summary}");
}

#[test]
fn bad_minutes_are_refused_clearly() {
    for (minutes, says) in [
        ("0", "more than 0 minutes"),
        ("-3", "more than 0 minutes"),
        ("soon", "not a number of minutes"),
    ] {
        // `--minutes=-3`: a negative number as the flag's value, not a flag.
        let out = flyfs()
            .args(["bench", "chaos", &format!("--minutes={minutes}")])
            .output()
            .expect("run flyfs bench chaos");
        assert!(!out.status.success(), "--minutes {minutes}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "--minutes {minutes} should say `{says}`: {}",
            text(&out)
        );
    }
    let out = flyfs()
        .args(["bench", "chaos", "--minutes", "1", "--network", "ethernet"])
        .output()
        .expect("run flyfs bench chaos");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--network"),
        "{}",
        text(&out)
    );
}
