//! The chunk engine on the userspace NVMe driver, inside the QEMU guest of
//! shared/vm: the model test (seeded random operations against the
//! reference model, with clean reopens), the proptest model test of
//! tests/model.rs with its strategies (shrinking a failure to a minimal
//! sequence, on the controller), and the crash-consistency test (power cuts
//! injected by the driver itself at random I/Os, tearing the writes they
//! catch, then recovery; the controller keeps every write it completed), on
//! a real NVMe controller reached through VFIO instead of the memory device.
//!
//! Guest only (scripts/test-guest runs every `guest_*` binary in one guest
//! with `--nvme 1G`): binds `$FLYFS_NVME_PCI` to vfio-pci itself and FAILS if
//! the variable is missing or binding fails. By hand:
//! `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="/work/shared/vm/guest --nvme 1G --" \
//!  cargo test -p flyfs-chunk-engine --test guest_engine_nvme -- --test-threads=1`.
//! `FLYFS_GUEST_SEEDS` (default 12) scales the number of seeds per test,
//! `FLYFS_GUEST_CASES` (default 6) the proptest cases per strategy.

use flyfs_bypass::BlockDevice;
use flyfs_bypass::nvme::testing::guest_controller;
use flyfs_bypass::nvme::{NvmeConfig, NvmeDevice};
use flyfs_chunk_engine::JournalMode;
use flyfs_chunk_engine::testing::strategies::{op, small_update_op};
use flyfs_chunk_engine::testing::{Harness, run_seed_on};
use proptest::prelude::*;

fn seeds() -> u64 {
    std::env::var("FLYFS_GUEST_SEEDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(12)
}

fn mode(seed: u64) -> JournalMode {
    if seed.is_multiple_of(2) {
        JournalMode::Thread
    } else {
        JournalMode::Inline
    }
}

fn device() -> NvmeDevice {
    NvmeDevice::open(guest_controller(), &NvmeConfig::default(), None)
        .expect("open the NVMe controller")
}

#[test]
fn engine_on_nvme_matches_the_model() {
    let device = device();
    for seed in 0..seeds() {
        run_seed_on(device.clone(), seed, 120, false, mode(seed))
            .unwrap_or_else(|error| panic!("{error} ({:?})", mode(seed)));
    }
    assert!(device.stats().commands > 0);
}

#[test]
fn engine_on_nvme_loses_nothing_acknowledged_at_power_cuts() {
    let device = device();
    let mut crashes = 0;
    for seed in 0..seeds() {
        let harness = run_seed_on(device.clone(), 1000 + seed, 60, true, mode(seed))
            .unwrap_or_else(|error| panic!("{error} ({:?})", mode(seed)));
        crashes += harness.crashes;
    }
    let torn = device.stats().torn_writes;
    println!("{crashes} crash points recovered on NVMe, {torn} writes torn");
    assert!(
        crashes > 0,
        "no crash happened: the test would prove nothing"
    );
    assert!(
        torn > 0,
        "no power cut tore a write: the tearing would be untested"
    );
    assert!(
        device.failure().is_none(),
        "an injected power cut is not a device failure"
    );
}

fn cases() -> u32 {
    std::env::var("FLYFS_GUEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(6)
}

/// One proptest case of tests/model.rs on the controller (formatted afresh).
fn model_case(
    device: &NvmeDevice,
    inline: bool,
    ops: &[flyfs_chunk_engine::testing::Op],
) -> Result<(), TestCaseError> {
    let journal = if inline {
        JournalMode::Inline
    } else {
        JournalMode::Thread
    };
    let mut harness = Harness::on(device.clone(), 0, journal);
    for op in ops {
        harness.step(op).map_err(TestCaseError::fail)?;
    }
    harness.finish().map_err(TestCaseError::fail)
}

fn model_config() -> ProptestConfig {
    // Few cases, each shorter than on the host: the guest is emulated and
    // its tier must stay within minutes. A failure still shrinks.
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs the model test's `strategy` on the controller (one device for all
/// cases, each formatting it afresh); a failure panics with the shrunk
/// operation sequence.
fn run_model<S>(strategy: S)
where
    S: Strategy<Value = (bool, Vec<flyfs_chunk_engine::testing::Op>)>,
{
    let device = device();
    let mut runner = proptest::test_runner::TestRunner::new(model_config());
    if let Err(error) = runner.run(&strategy, |(inline, ops)| model_case(&device, inline, &ops)) {
        panic!("the engine on NVMe disagrees with the model: {error}");
    }
    assert!(device.stats().commands > 0);
}

#[test]
fn engine_on_nvme_matches_the_model_proptest() {
    run_model((any::<bool>(), prop::collection::vec(op(), 1..60)));
}

#[test]
fn engine_on_nvme_matches_the_model_under_small_updates_proptest() {
    run_model((
        any::<bool>(),
        prop::collection::vec(small_update_op(), 1..60),
    ));
}
