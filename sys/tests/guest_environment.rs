//! The guest tier's premises (scripts/test-guest): the guest that runs the
//! NVMe and RDMA tests has an NVMe controller the kernel sees and that VFIO
//! can take, and a Soft-RoCE device. When one of these fails, the set-up of
//! the guest is broken, not the driver or transport under test, and this
//! says so before their own tests fail for it.
//!
//! Runs only in the guest: it fails on the host, where none of this exists.

use std::path::Path;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this test runs in the guest (scripts/test-guest), which sets it")
    })
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("cannot read {path}: {error}"))
        .trim()
        .to_owned()
}

#[test]
fn the_nvme_controller_is_a_pci_nvme_device_with_its_own_iommu_group() {
    let pci = env("FLYFS_NVME_PCI");
    let device = format!("/sys/bus/pci/devices/{pci}");
    // PCI class 01 (mass storage), subclass 08 (non-volatile memory),
    // interface 02 (NVM Express).
    assert_eq!(
        read(&format!("{device}/class")),
        "0x010802",
        "{pci} is not an NVMe controller"
    );
    let members = std::fs::read_dir(format!("{device}/iommu_group/devices"))
        .unwrap_or_else(|error| panic!("{pci} has no IOMMU group (is the IOMMU on?): {error}"))
        .count();
    assert_eq!(
        members, 1,
        "{pci} shares its IOMMU group, so VFIO could not take it alone"
    );
    assert!(
        Path::new("/dev/vfio/vfio").exists(),
        "no /dev/vfio/vfio: vfio is not loaded"
    );
}

#[test]
fn the_soft_roce_device_is_up() {
    let device = env("FLYFS_RXE_DEV");
    let port = format!("/sys/class/infiniband/{device}/ports/1");
    assert!(
        read(&format!("{port}/state")).ends_with("ACTIVE"),
        "{device} port 1 is not active"
    );
    let gid_index = env("FLYFS_RXE_GID_INDEX");
    let gid = read(&format!("{port}/gids/{gid_index}"));
    assert_ne!(
        gid, "0000:0000:0000:0000:0000:0000:0000:0000",
        "{device} has no GID at index {gid_index}"
    );
    assert!(
        Path::new("/dev/infiniband/uverbs0").exists(),
        "no /dev/infiniband/uverbs0: ib_uverbs is not loaded"
    );
}
