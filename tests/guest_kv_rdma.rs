//! The Python KV cache over RDMA, end to end, in the QEMU guest
//! (Soft-RoCE): `flyfs up --no-mount --transport rdma` (a manager, three
//! storage daemons and the metadata service on the guest's rxe device),
//! then python/tests/test_kv_rdma.py with `FLYFS_KV_CONFIG` naming the
//! cluster's mount config (`transport = "rdma"`, its `[rdma]` table) and
//! `FLYFS_KV_RDMA=1`:
//!
//! * a buffer registered through `KvCache.register_buffer` is registered
//!   with the device; blocks put from views inside it are pulled by the
//!   chains' heads (RDMA READ) and blocks got into views inside it are
//!   written there by the replicas (RDMA WRITE): the process's counters
//!   show every byte moved one-sided and none copied once the queue pairs
//!   are up;
//! * views outside any registered buffer come through the message
//!   slots, and a closed registration is no longer lent;
//! * the SGLang backend registers the host KV pool SGLang hands it, and
//!   pages set from and got into views of the pool move one-sided.
//!
//! A guest-only test: it reads `FLYFS_RXE_DEV`, `FLYFS_RXE_GID_INDEX`,
//! `FLYFS_TEST_DIR` and `FLYFS_PYTHON` (scripts/test's virtual environment,
//! on the host's root, which the guest sees; the guest passes `FLYFS_*`
//! through) and fails (does not skip) without them. scripts/test-guest
//! runs it.

mod support;

use std::path::Path;
use std::process::Command;

use support::{UpCluster, free_port_base, guest_dir, text};

#[test]
fn registered_python_buffers_move_one_sided_over_rdma() {
    let python = std::env::var("FLYFS_PYTHON").expect(
        "FLYFS_PYTHON names an interpreter with the flyfs package (scripts/test exports its own)",
    );
    let base = guest_dir("gkr-");
    let data = base.path().join("d");
    let cluster = UpCluster::new("guest_kv_rdma", data.clone(), None, "meta.log");
    cluster.start_on_rdma(free_port_base(7_211, 89, 3), "128MiB");
    let config = data.join("etc").join("mount.toml");
    let written = std::fs::read_to_string(&config).expect("flyfs up writes the mount config");
    assert!(
        written.contains("transport = \"rdma\""),
        "the mount config names the RDMA transport: {written}"
    );

    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tests");
    let out = Command::new(python)
        .args(["-m", "pytest", "-q", "-rs", "-s", "-p", "no:cacheprovider"])
        .arg(tests.join("test_kv_rdma.py"))
        .env("FLYFS_KV_CONFIG", &config)
        .env("FLYFS_KV_REQUIRE", "1")
        .env("FLYFS_KV_RDMA", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run pytest");
    let report = text(&out);
    eprintln!("{report}");
    assert!(out.status.success(), "pytest over RDMA: {report}");
    assert!(
        !report.contains("skipped"),
        "no test may skip in the guest: {report}"
    );
    drop(cluster);
}
