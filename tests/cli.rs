//! The `flyfs` binary as a user runs it: format refuses to overwrite without
//! --force, bad sizes are named, the engine benchmark prints its JSON, a
//! daemon or admin without credentials says how to get them, and `certs`
//! makes credentials that load.

use std::process::Command;

fn flyfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flyfs"))
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn format_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dev.img");
    let run = |extra: &[&str]| {
        flyfs()
            .args(["format", "--device"])
            .arg(&path)
            .args(["--size", "64MiB", "--chunk-size-max", "1MiB"])
            .args(extra)
            .output()
            .expect("run flyfs")
    };
    let first = run(&[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let second = run(&[]);
    assert!(!second.status.success());
    assert!(stderr(&second).contains("--force"), "{}", stderr(&second));
    let forced = run(&["--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
}

#[test]
fn bad_arguments_are_named() {
    let out = flyfs()
        .args([
            "format",
            "--device",
            "/nonexistent/x",
            "--size",
            "12 parsecs",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("12 parsecs"), "{}", stderr(&out));
    let out = flyfs()
        .args(["format", "--device", "/nonexistent/dir/x"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/dir/x"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn engine_bench_prints_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.img");
    let out = flyfs()
        .args(["bench", "engine", "--path"])
        .arg(&path)
        .args([
            "--size",
            "256MiB",
            "--total",
            "32MiB",
            "--rand-seconds",
            "0.3",
            "--json",
        ])
        .output()
        .expect("run flyfs");
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for field in ["seq_write_mib_s", "seq_read_mib_s", "rand_read_4k_iops"] {
        assert!(
            json[field].as_f64().is_some_and(|v| v > 0.0),
            "{field} in {json}"
        );
    }
    // Later runs reuse the formatted file and its engine, with the workers
    // forced onto the reactor thread, then onto the calling thread.
    for workers in ["reactor", "caller"] {
        let again = flyfs()
            .args(["bench", "engine", "--path"])
            .arg(&path)
            .args([
                "--total",
                "8MiB",
                "--rand-seconds",
                "0.1",
                "--workers",
                workers,
            ])
            .output()
            .expect("run flyfs");
        assert!(again.status.success(), "{}", stderr(&again));
    }
}

#[test]
fn a_daemon_without_credentials_refuses_to_start_and_says_how_to_get_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mgmtd.toml");
    std::fs::write(&config, "data_dir = \"data\"\nlisten = \"127.0.0.1:0\"\n").expect("write");
    let out = flyfs()
        .args(["mgmtd", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("no [tls] table"), "{err}");
    assert!(err.contains("flyfs certs issue"), "{err}");
    assert!(err.contains("flyfs up"), "{err}");
}

#[test]
fn admin_without_credentials_fails_with_a_clear_error() {
    let out = flyfs()
        .args(["admin", "--mgmt", "127.0.0.1:9", "status"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--data DIR") && err.contains("--credentials DIR"),
        "{err}"
    );
}

#[test]
fn certs_init_and_issue_write_loadable_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let out = flyfs()
        .args(["certs", "init", "--cluster", "c9", "--dir"])
        .arg(&ca)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    // A second init would orphan every credential the first CA issued.
    let again = flyfs()
        .args(["certs", "init", "--dir"])
        .arg(&ca)
        .output()
        .expect("run");
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("refusing to replace"),
        "{}",
        stderr(&again)
    );
    let out_dir = dir.path().join("alice");
    let out = flyfs()
        .args(["certs", "issue", "--role", "admin", "--name", "alice"])
        .args(["--uid", "1000", "--gid", "100", "--ca"])
        .arg(&ca)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("[tls]"));
    let credentials =
        flyfs_rpc::Credentials::load_dir(&out_dir, "admin").expect("issued credentials load");
    assert_eq!(
        credentials.identity().to_uri(),
        "flyfs://c9/admin/alice?uid=1000&gid=100"
    );
    let bad = flyfs()
        .args(["certs", "issue", "--role", "storage", "--name", "x", "--ca"])
        .arg(&ca)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("a storage node is named by its id"),
        "{}",
        stderr(&bad)
    );
}
