//! The `BlockDevice` contract checks of tests/common/contract.rs against
//! the host's devices: the memory device and the io_uring device on an
//! `O_DIRECT` file. tests/guest_nvme.rs runs the same functions against the
//! userspace NVMe driver inside the QEMU guest.

mod common;

use flyfs_bypass::mem::MemDevice;
use flyfs_bypass::uring::{UringConfig, UringDevice};
use flyfs_bypass::{BufferPool, HugePages, PoolConfig};

use common::contract;

fn pool() -> BufferPool {
    BufferPool::new(&PoolConfig {
        classes: vec![(4096, 256), (65536, 16), (4 << 20, 4)],
        hugepages: HugePages::Never,
    })
    .expect("buffer pool")
}

fn run<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(future)
}

#[test]
fn memory_device_keeps_the_contract() {
    let device = MemDevice::new(32 * contract::MIB, 512);
    run(contract::all(&device, &pool()));
}

#[test]
fn uring_device_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = pool();
    let device = UringDevice::create_file(
        dir.path().join("device"),
        32 * contract::MIB,
        &UringConfig::default(),
        Some(&pool),
    )
    .expect("open");
    run(contract::all(&device, &pool));
}
