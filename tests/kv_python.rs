//! The Python package's KV cache and framework adapters against a real
//! cluster: `flyfs up --no-mount` with the built binary (a manager, three
//! storage daemons, the metadata service), then the pytest tests of
//! `flyfs.kv`, the SGLang HiCache backend and the LMCache connector
//! (python/tests/test_kv.py, test_adapters.py) with `FLYFS_KV_CONFIG`
//! naming the cluster's mount config. `FLYFS_KV_REQUIRE=1` makes a test
//! that finds no cluster fail, and none may skip.
//!
//! The interpreter is `FLYFS_PYTHON` (scripts/test's virtual environment,
//! where the package is installed). Without it the test prints `SKIPPED`,
//! unless `FLYFS_E2E_REQUIRE=1` (CI), where it fails; a cluster that does
//! not start always fails it.

mod support;

use std::path::Path;
use std::process::Command;

use support::{UpCluster, free_port_base, text};

#[test]
fn python_kv_cache_and_adapters_against_a_cluster() {
    let Some(python) = std::env::var_os("FLYFS_PYTHON") else {
        if std::env::var_os("FLYFS_E2E_REQUIRE").is_some_and(|v| v == "1") {
            panic!(
                "FLYFS_E2E_REQUIRE=1 but FLYFS_PYTHON names no interpreter with the flyfs package"
            );
        }
        eprintln!("SKIPPED: FLYFS_PYTHON names no interpreter with the flyfs package");
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().join("cluster");
    // Another stride than the other tests' searches for free ports.
    let cluster = UpCluster::new("kv_python", data.clone(), None, "meta.log");
    cluster.start(free_port_base(6_007, 389, 11), "2GiB");
    let config = data.join("etc").join("mount.toml");
    assert!(config.exists(), "flyfs up wrote no {}", config.display());

    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tests");
    let out = Command::new(python)
        .args(["-m", "pytest", "-q", "-rs"])
        .arg(tests.join("test_kv.py"))
        .arg(tests.join("test_adapters.py"))
        .env("FLYFS_KV_CONFIG", &config)
        .env("FLYFS_KV_REQUIRE", "1")
        .output()
        .expect("run pytest");
    let report = text(&out);
    assert!(out.status.success(), "pytest against the cluster: {report}");
    assert!(
        !report.contains("skipped"),
        "no test may skip with a cluster: {report}"
    );
}
