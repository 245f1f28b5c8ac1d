//! Crash consistency: seeded random operations on the in-memory device with
//! power cuts at random I/Os and crashes that drop or tear unflushed writes;
//! after each recovery every acknowledged commit is intact, no chunk holds
//! content it never had, and allocation agrees with the metadata.
//!
//! `FLYFS_CRASH_SEEDS` (default 1000 seeds of 60 steps, several thousand crash
//! points) and `FLYFS_CRASH_STEPS` scale it up; `FLYFS_CRASH_SEED` replays one.
//! Even seeds run the journal thread, odd seeds the inline journal: both
//! modes are covered for the price of one.

use flyfs_chunk_engine::JournalMode;
use flyfs_chunk_engine::testing::{Harness, Op, run_seed, run_seed_hard, run_seed_overwrites};

fn mode(seed: u64) -> JournalMode {
    if seed.is_multiple_of(2) {
        JournalMode::Thread
    } else {
        JournalMode::Inline
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_crashes_lose_nothing_acknowledged() {
    let steps = env("FLYFS_CRASH_STEPS", 60) as usize;
    let seeds: Vec<u64> = match std::env::var("FLYFS_CRASH_SEED") {
        Ok(seed) => vec![seed.parse().expect("FLYFS_CRASH_SEED is a number")],
        Err(_) => (0..env("FLYFS_CRASH_SEEDS", 1000)).collect(),
    };
    let mut crashes = 0;
    for seed in seeds {
        let harness = run_seed(seed, steps, true, mode(seed))
            .unwrap_or_else(|e| panic!("{e} ({:?})\nreplay: FLYFS_CRASH_SEED={seed}", mode(seed)));
        crashes += harness.crashes;
    }
    println!("{crashes} crash points recovered");
    assert!(
        crashes > 0,
        "no crash happened: the test would prove nothing"
    );
}

/// Seeds that once failed, pinned forever: 31 (a failed commit kept its
/// pending version), 232 (a poisoned engine hid an invalid request), 1098 (a
/// failed remove dropped the pending version). Pinned in both modes.
#[test]
fn regression_seeds() {
    for seed in [31, 232, 1098] {
        for journal in [JournalMode::Thread, JournalMode::Inline] {
            run_seed(seed, 60, true, journal).unwrap_or_else(|e| panic!("{e} ({journal:?})"));
        }
    }
}

/// The simulation's seed 420 (issue 20), as the head of a chain made it:
/// every write prepared, each prepared version committed in memory (no
/// record), so recovery reads the Prepare records as Puts. Patches lay
/// layers over slot A; a shrink keeps the chunk in A; an extension moves it
/// to a smaller slot B (replay stashes A's layers, in case the prepared
/// version is aborted back to A); the next extension moves it, whole, into
/// A again, which the move to B had freed. Replay used to restore the
/// stashed layers because the slot matched, and laid the old patches over
/// the new version: after the power cut the last version failed its CRC.
#[test]
fn prepared_version_back_in_the_slot_it_left_survives_a_crash() {
    let write = |offset, len, seed| Op::Write {
        key: 0,
        offset,
        len,
        seed,
        append: false,
        prepare: true,
    };
    let truncate = |len| Op::Truncate {
        key: 0,
        len,
        prepare: true,
    };
    let commit = Op::Commit { key: 0 };
    let ops = [
        write(9478, 1062, 1),
        commit.clone(),
        write(7594, 136, 2),
        commit.clone(),
        write(466, 1164, 3),
        commit.clone(),
        truncate(820),
        commit.clone(),
        truncate(6404),
        commit.clone(),
        write(11466, 559, 6),
        commit.clone(),
        write(7089, 882, 7),
        commit.clone(),
        Op::Crash { seed: 420 },
        Op::Read {
            key: 0,
            offset: 0,
            len: 20_000,
            pending: false,
        },
    ];
    for journal in [JournalMode::Thread, JournalMode::Inline] {
        let mut harness = Harness::new(420, journal);
        for op in &ops {
            harness
                .step(op)
                .unwrap_or_else(|e| panic!("{e} ({journal:?})"));
        }
        harness
            .finish()
            .unwrap_or_else(|e| panic!("{e} ({journal:?})"));
        assert!(
            harness.patches >= 3,
            "the writes inside the chunk were not patches ({journal:?}): the test proves nothing"
        );
        assert_eq!(harness.crashes, 1, "the crash did not happen ({journal:?})");
    }
}

/// The same with operations that stress small updates (`run_seed_overwrites`):
/// overwrites inside chunks and multi-extent updates, which the engine makes
/// as patches (their bytes in the journal, written into the chunk's slot by
/// a later checkpoint, redone by recovery), so that power cuts land in every
/// part of that path. `FLYFS_CRASH_SEED` replays one seed here too.
#[test]
fn random_crashes_in_small_updates_lose_nothing_acknowledged() {
    let steps = env("FLYFS_CRASH_STEPS", 60) as usize;
    let seeds: Vec<u64> = match std::env::var("FLYFS_CRASH_SEED") {
        Ok(seed) => vec![seed.parse().expect("FLYFS_CRASH_SEED is a number")],
        Err(_) => (0..env("FLYFS_CRASH_SEEDS", 1000)).collect(),
    };
    let (mut crashes, mut patches, mut applied) = (0, 0, 0);
    for seed in seeds {
        let harness = run_seed_overwrites(seed, steps, true, mode(seed))
            .unwrap_or_else(|e| panic!("{e} ({:?})\nreplay: FLYFS_CRASH_SEED={seed}", mode(seed)));
        crashes += harness.crashes;
        patches += harness.patches;
        applied += harness.patch_layers_applied;
    }
    println!("{crashes} crash points recovered, {patches} patches, {applied} layers applied");
    assert!(
        crashes > 0,
        "no crash happened: the test would prove nothing"
    );
    assert!(
        patches > 0,
        "no write was a patch: the test would prove nothing"
    );
    assert!(
        applied > 0,
        "no checkpoint wrote a patch into its slot: the test would prove nothing"
    );
}

/// The hardest runs (`run_seed_hard`): bursts of concurrent writes in flight
/// at the cut, recoveries themselves cut short at their first writes, and
/// half the seeds on a device of 512-byte sectors, whose crashes tear the
/// engine's 4 KiB blocks (journal blocks, checkpoints, superblocks, data).
/// Every kind of hard case must have happened, or the test proves nothing.
/// `FLYFS_CRASH_SEED` replays one seed, `FLYFS_HARD_SEEDS` scales it.
#[test]
fn hard_crashes_lose_nothing_acknowledged() {
    let steps = env("FLYFS_CRASH_STEPS", 60) as usize;
    let seeds: Vec<u64> = match std::env::var("FLYFS_CRASH_SEED") {
        Ok(seed) => vec![seed.parse().expect("FLYFS_CRASH_SEED is a number")],
        Err(_) => (0..env("FLYFS_HARD_SEEDS", 400)).collect(),
    };
    let (mut crashes, mut recovery_cuts, mut torn_pages, mut overlapped, mut beside) =
        (0, 0, 0, 0, 0);
    for seed in seeds {
        // Seed bits: journal mode, sector size, operation mix.
        let sector_size = if seed & 2 == 0 { 512 } else { 4096 };
        let overwrites = seed & 4 != 0;
        let harness = run_seed_hard(seed, steps, mode(seed), sector_size, overwrites)
            .unwrap_or_else(|e| {
                panic!(
                    "{e} ({:?}, {sector_size}-byte sectors, overwrites {overwrites})\n\
                     replay: FLYFS_CRASH_SEED={seed}",
                    mode(seed)
                )
            });
        crashes += harness.crashes;
        recovery_cuts += harness.recovery_cuts;
        torn_pages += harness.medium().stats().torn_pages;
        overlapped += harness.overlapped_batches;
        beside += harness.batches_beside_checkpoints;
    }
    println!(
        "{crashes} crashes, {recovery_cuts} recoveries cut short, {torn_pages} pages torn, \
         {overlapped} journal batches written beside an older one in flight, \
         {beside} beside a checkpoint"
    );
    if std::env::var("FLYFS_CRASH_SEED").is_err() {
        assert!(crashes > 0, "no crash happened");
        assert!(recovery_cuts > 0, "no recovery was cut short");
        assert!(torn_pages > 0, "no 4 KiB page was torn across sectors");
        assert!(
            overlapped > 0,
            "no journal batch was written while another was in flight"
        );
    }
}
