//! The `flyfs` binary as a user runs it: format refuses to overwrite without
//! --force, bad sizes are named, and the engine benchmark prints its JSON.

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
