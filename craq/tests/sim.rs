//! The deterministic cluster simulation, over many seeds.
//!
//! `cargo nextest run -p flyfs-craq --all-features --test sim` runs the CI
//! share of seeds. More: `FLYFS_SIM_SEEDS=5000 FLYFS_SIM_FIRST=1000 cargo
//! test --release -p flyfs-craq --all-features --test sim -- --ignored many`.
//! A failing seed prints its fault log; replay it with
//! `FLYFS_SIM_SEED=<n> cargo test -p flyfs-craq --all-features --test sim -- --ignored one`,
//! then pin it in `PINNED` below.

mod sim_support;

use sim_support::{FAULT_KINDS, SimConfig, run_seed};

/// Seeds that once failed; each stays a regression test. 2, 21, 22, 23,
/// 60, 79, 82, 85, 86, 87: fences that never resolved and dead connections
/// left by partitions; 8, 16: a retried write applied twice by a head that
/// had lost its exactly-once memory; 56: setup racing a manager restart;
/// 534: a write that skipped a successor just before its resync began;
/// 4502: replicas compared while a head still retried a forward; 4650: a
/// partition overlapping a crash (two failures at once); 12272: a new tail
/// answered with the version before one its failed predecessor as tail had
/// committed and served.
/// 170: a node lost for good while its chain was already down to it (the
/// harness now loses only a node that failed alone); 397: a write retried
/// after its first attempt had been recovered as committed by a restarted
/// head, applied a second time over later writes (a restarted target now
/// seeds its exactly-once memory from its chunks' records).
/// 704, 916: a node lost for good just before the workload ended, still shown
/// serving when the run was checked (the checker now waits for its replicas
/// to move).
const PINNED: &[u64] = &[
    2, 8, 16, 21, 22, 23, 56, 60, 79, 82, 85, 86, 87, 170, 397, 534, 704, 916, 4502, 4650, 12272,
];

/// Runs every seed of `range`, prints how many faults of each kind fired,
/// and fails on any failing seed, or when a kind of fault never fired in
/// the whole range (a simulation that stopped drawing it tests nothing).
fn run_range(range: std::ops::Range<u64>) {
    let mut failures = Vec::new();
    let mut fired = std::collections::BTreeMap::<&str, usize>::new();
    let seeds = range.end - range.start;
    for seed in range.clone() {
        match run_seed(SimConfig::new(seed)) {
            Ok(report) => {
                for (kind, n) in report.fired {
                    *fired.entry(kind).or_default() += n;
                }
            }
            Err(e) => {
                eprintln!("{e}");
                failures.push(seed);
            }
        }
    }
    eprintln!("seeds {range:?}: faults fired {fired:?}");
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
    if seeds >= 100 {
        for kind in FAULT_KINDS {
            assert!(
                fired.get(kind).is_some_and(|n| *n > 0),
                "no {kind} in seeds {range:?}: {fired:?}"
            );
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn pinned_seeds() {
    for &seed in PINNED {
        if let Err(e) = run_seed(SimConfig::new(seed)) {
            panic!("{e}");
        }
    }
}

#[test]
fn seeds_a() {
    run_range(0..150);
}

#[test]
fn seeds_b() {
    run_range(150..300);
}

#[test]
fn a_seed_replays_exactly() {
    let a = run_seed(SimConfig::new(7)).expect("seed 7");
    let b = run_seed(SimConfig::new(7)).expect("seed 7 again");
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

#[test]
#[ignore = "long: run explicitly (see the file's header)"]
fn many() {
    let first = env_u64("FLYFS_SIM_FIRST", 0);
    run_range(first..first + env_u64("FLYFS_SIM_SEEDS", 1000));
}

/// `many` with the storage nodes forwarding before their Prepare is
/// durable (`overlap_prepare_and_forward`), the mode that reopens the
/// window in which a whole-chain failure loses a write readers saw.
#[test]
#[ignore = "long: run explicitly; expected to find the window"]
fn many_overlapping_prepare() {
    let first = env_u64("FLYFS_SIM_FIRST", 0);
    let seeds = first..first + env_u64("FLYFS_SIM_SEEDS", 1000);
    let failing: Vec<u64> = seeds
        .filter(|&seed| {
            let config = SimConfig {
                overlap_prepare: true,
                ..SimConfig::new(seed)
            };
            run_seed(config)
                .map_err(|e| eprintln!("seed {seed}: {e}"))
                .is_err()
        })
        .collect();
    eprintln!("failing seeds with the window open: {failing:?}");
}

#[test]
#[ignore = "replays FLYFS_SIM_SEED"]
fn one() {
    // FLYFS_SIM_LOG=debug (or any tracing filter) traces the replay.
    if let Ok(filter) = std::env::var("FLYFS_SIM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .init();
    }
    let seed = env_u64("FLYFS_SIM_SEED", 0);
    match run_seed(SimConfig::new(seed)) {
        Ok(report) => eprintln!("seed {seed}: {report:?}"),
        Err(e) => panic!("{e}"),
    }
}
