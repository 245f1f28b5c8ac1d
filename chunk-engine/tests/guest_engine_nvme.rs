//! The chunk engine on the userspace NVMe driver, inside the QEMU guest of
//! shared/vm: the model test (seeded random operations against the
//! reference model, with clean reopens) and the crash-consistency test (power
//! cuts injected above the device at random I/Os, then recovery; the
//! controller keeps every write it completed), on a real NVMe controller
//! reached through VFIO instead of the memory device.
//!
//! Guest only (scripts/test-guest runs every `guest_*` binary in one guest
//! with `--nvme 1G`): binds `$FLYFS_NVME_PCI` to vfio-pci itself and FAILS if
//! the variable is missing or binding fails. By hand:
//! `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="/work/shared/vm/guest --nvme 1G --" \
//!  cargo test -p flyfs-chunk-engine --test guest_engine_nvme -- --test-threads=1`.
//! `FLYFS_GUEST_SEEDS` (default 12) scales the number of seeds per test.

use std::sync::OnceLock;

use flyfs_bypass::BlockDevice;
use flyfs_bypass::nvme::{NvmeConfig, NvmeDevice};
use flyfs_chunk_engine::JournalMode;
use flyfs_chunk_engine::testing::run_seed_on;

/// Binds the controller to vfio-pci once per process; its PCI address.
fn controller() -> &'static str {
    static ADDRESS: OnceLock<String> = OnceLock::new();
    ADDRESS.get_or_init(|| {
        let address = std::env::var("FLYFS_NVME_PCI").expect(
            "FLYFS_NVME_PCI is not set: this test runs inside the flyfs-vm guest (shared/vm/guest --nvme 1G)",
        );
        let output = std::process::Command::new("vfio-bind")
            .arg(&address)
            .output()
            .expect("cannot run vfio-bind (it is on PATH inside the guest)");
        assert!(
            output.status.success(),
            "vfio-bind {address} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        address
    })
}

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
    NvmeDevice::open(controller(), &NvmeConfig::default(), None).expect("open the NVMe controller")
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
    println!("{crashes} crash points recovered on NVMe");
    assert!(
        crashes > 0,
        "no crash happened: the test would prove nothing"
    );
    assert!(
        device.failure().is_none(),
        "power cuts are above the device, not in it"
    );
}
