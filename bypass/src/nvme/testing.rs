//! Helpers for the tests that run on a real (emulated) NVMe controller
//! inside the QEMU guest of shared/vm (behind the `testing` feature): the
//! one place that hands the guest's controller to vfio-pci, so every guest
//! test binary (this crate's, the chunk engine's) binds it the same way.

use std::sync::OnceLock;

/// The PCI address of the guest's NVMe controller (`$FLYFS_NVME_PCI`),
/// bound to vfio-pci once per process (the first call runs `vfio-bind`).
///
/// Panics, so that a guest test fails rather than passes by skipping, if
/// the variable is missing (not inside the guest) or the binding fails.
pub fn guest_controller() -> &'static str {
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
