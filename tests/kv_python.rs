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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use support::{flyfs, text};

/// A base port with the 16 ports the cluster uses all free (another stride
/// than the other tests' searches).
fn free_base() -> u16 {
    for attempt in 0..200u32 {
        let base = 20_000 + ((std::process::id() * 6_007 + attempt * 389 + 11) % 2_500) as u16 * 16;
        if (0..16).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no free range of 16 ports");
}

/// `flyfs down` when the test ends, passed or not.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let out = flyfs()
            .args(["down", "--timeout", "10", "--data"])
            .arg(&self.0)
            .output();
        if std::thread::panicking() {
            if let Ok(out) = &out {
                eprintln!("kv_python: flyfs down: {}", text(out));
            }
            let log =
                std::fs::read_to_string(self.0.join("log").join("meta.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "---- last lines of meta.log ----\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

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
    let _down = Down(data.clone());
    let started = Instant::now();
    let out = flyfs()
        .args(["up", "--no-mount", "--data"])
        .arg(&data)
        .args([
            "--port",
            &free_base().to_string(),
            "--device-size",
            "2GiB",
            "--timeout",
            "120",
        ])
        .output()
        .expect("run flyfs up");
    assert!(out.status.success(), "flyfs up: {}", text(&out));
    eprintln!(
        "kv_python: flyfs up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
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
