//! End-to-end runs of `fsbench` on a temporary directory, with small numbers.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// Runs `fsbench` with `args`.
fn fsbench(args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_fsbench"))
        .args(args)
        .output()
        .context("running fsbench")
}

/// Runs `fsbench` with `args`, expects success and returns its JSON, after
/// checking that stdout holds exactly one JSON object with exactly `keys`.
fn run_json(args: &[&str], keys: &[&str]) -> Result<Value> {
    let out = fsbench(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "fsbench {args:?} failed: {stderr}");
    let stdout = String::from_utf8(out.stdout)?;
    ensure!(stdout.lines().count() == 1, "not one line: {stdout}");
    let json: Value = serde_json::from_str(&stdout)?;
    let Some(object) = json.as_object() else {
        bail!("not an object: {stdout}");
    };
    let mut found: Vec<&str> = object.keys().map(String::as_str).collect();
    let mut expected = keys.to_vec();
    found.sort_unstable();
    expected.sort_unstable();
    ensure!(found == expected, "keys {found:?}, expected {expected:?}");
    Ok(json)
}

/// The number at `key` of `json`, which must be finite and positive.
fn positive(json: &Value, key: &str) -> Result<f64> {
    let x = json[key]
        .as_f64()
        .with_context(|| format!("{key} in {json}"))?;
    ensure!(x.is_finite() && x > 0.0, "{key} is {x} in {json}");
    Ok(x)
}

fn path(dir: &Path) -> Result<&str> {
    dir.to_str()
        .context("the temporary directory's path is not UTF-8")
}

const MD_KEYS: &[&str] = &[
    "tool",
    "layout",
    "files",
    "procs",
    "size",
    "dropped_caches",
    "rates",
    "seconds",
];
const PHASES: &[&str] = &["create", "stat", "read", "list", "remove"];

fn md(layout: &str, size: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let json = run_json(
        &[
            "md",
            "--dir",
            path(dir.path())?,
            "--files",
            "200",
            "--procs",
            "2",
            "--layout",
            layout,
            "--no-drop-caches",
        ],
        MD_KEYS,
    )?;
    ensure!(json["tool"] == "md" && json["layout"] == layout, "{json}");
    ensure!(json["files"] == 200 && json["procs"] == 2, "{json}");
    ensure!(
        json["size"] == size && json["dropped_caches"] == false,
        "{json}"
    );
    for phase in PHASES {
        positive(&json["rates"], phase)?;
        positive(&json["seconds"], phase)?;
    }
    // 200 entries listed per process in the shared directory, 100 each in
    // the own ones: the rate is entries per second of all processes.
    let listed = json["rates"]["list"].as_f64().unwrap_or(0.0)
        * json["seconds"]["list"].as_f64().unwrap_or(0.0);
    let expect = if layout == "hard" { 400.0 } else { 200.0 };
    ensure!((listed - expect).abs() < 1e-6 * expect, "listed {listed}");
    ensure!(
        fs::read_dir(dir.path())?.next().is_none(),
        "md left files behind"
    );
    Ok(())
}

#[test]
fn md_easy() -> Result<()> {
    md("easy", 0)
}

#[test]
fn md_hard() -> Result<()> {
    md("hard", 3901)
}

#[test]
fn md_with_data_in_easy_layout_and_uneven_shares() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let args = [
        "md",
        "--dir",
        path(dir.path())?,
        "--files",
        "101",
        "--procs",
        "3",
        "--layout",
        "easy",
        "--size",
        "10KiB",
        "--no-drop-caches",
    ];
    let json = run_json(&args, MD_KEYS)?;
    ensure!(json["size"] == 10240 && json["files"] == 101, "{json}");
    Ok(())
}

#[test]
fn md_refuses_a_directory_left_by_an_earlier_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    fs::create_dir_all(dir.path().join("md-hard/p0.f0"))?;
    let args = [
        "md",
        "--dir",
        path(dir.path())?,
        "--files",
        "10",
        "--procs",
        "1",
        "--layout",
        "hard",
        "--no-drop-caches",
    ];
    let out = fsbench(&args)?;
    ensure!(!out.status.success(), "md ran over an earlier run's files");
    ensure!(out.stdout.is_empty(), "printed a result");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("md-hard already exists"), "{stderr}");
    ensure!(
        dir.path().join("md-hard/p0.f0").is_dir(),
        "removed the old files"
    );
    Ok(())
}

const PREPARE_KEYS: &[&str] = &["tool", "files", "bytes", "seconds", "mib_s"];
const RUN_KEYS: &[&str] = &[
    "tool",
    "readers",
    "files_read",
    "bytes",
    "seconds",
    "mib_s",
    "files_s",
    "file_latency_us",
    "dropped_caches",
];

/// Prepares a data set of 30 files of 1 to 64 KiB in `dir`; returns its
/// total size.
fn prepare(dir: &Path) -> Result<u64> {
    let args = [
        "loader",
        "prepare",
        "--dir",
        path(dir)?,
        "--files",
        "30",
        "--min",
        "1KiB",
        "--max",
        "64KiB",
        "--procs",
        "3",
    ];
    let json = run_json(&args, PREPARE_KEYS)?;
    ensure!(
        json["tool"] == "loader-prepare" && json["files"] == 30,
        "{json}"
    );
    positive(&json, "seconds")?;
    positive(&json, "mib_s")?;
    let bytes = json["bytes"].as_u64().context("bytes")?;
    ensure!((30 * 1024..=30 * 65536).contains(&bytes), "{json}");
    Ok(bytes)
}

fn loader_run(dir: &Path, more: &[&str]) -> Result<Output> {
    let mut args = vec!["loader", "run", "--dir", path(dir)?, "--no-drop-caches"];
    args.extend_from_slice(more);
    fsbench(&args)
}

#[test]
fn loader_prepare_and_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bytes = prepare(dir.path())?;
    let manifest: Value =
        serde_json::from_slice(&fs::read(dir.path().join("loader/manifest.json"))?)?;
    let files = manifest["files"].as_array().context("files")?;
    ensure!(files.len() == 30, "{manifest}");
    let mut listed = 0;
    for entry in files {
        let file = dir
            .path()
            .join("loader")
            .join(entry["path"].as_str().context("path")?);
        let size = entry["size"].as_u64().context("size")?;
        ensure!(fs::metadata(&file)?.len() == size, "{}", file.display());
        listed += size;
    }
    ensure!(
        listed == bytes,
        "the manifest lists {listed} bytes, prepare wrote {bytes}"
    );

    let args = [
        "loader",
        "run",
        "--dir",
        path(dir.path())?,
        "--readers",
        "4",
        "--epochs",
        "2",
        "--no-drop-caches",
    ];
    let json = run_json(&args, RUN_KEYS)?;
    ensure!(
        json["tool"] == "loader-run" && json["readers"] == 4,
        "{json}"
    );
    ensure!(
        json["files_read"] == 60 && json["bytes"] == 2 * bytes,
        "{json}"
    );
    ensure!(json["dropped_caches"] == false, "{json}");
    for key in ["seconds", "mib_s", "files_s"] {
        positive(&json, key)?;
    }
    let p50 = positive(&json["file_latency_us"], "p50")?;
    let p99 = positive(&json["file_latency_us"], "p99")?;
    ensure!(p50 <= p99, "{json}");

    // The default is one epoch; more readers than files is fine.
    let out = loader_run(dir.path(), &["--readers", "40"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(json["files_read"] == 30 && json["bytes"] == bytes, "{json}");
    Ok(())
}

#[test]
fn loader_run_for_a_time() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bytes = prepare(dir.path())?;
    let out = loader_run(dir.path(), &["--readers", "2", "--seconds", "0.3"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout)?;
    // Epoch after epoch until the time is up.
    let files = json["files_read"].as_u64().context("files_read")?;
    ensure!(files > 30, "{json}");
    ensure!(json["bytes"].as_u64() > Some(bytes), "{json}");
    let seconds = positive(&json, "seconds")?;
    ensure!((0.3..5.0).contains(&seconds), "{json}");
    Ok(())
}

/// The path of the `n`-th file of the manifest in `dir`.
fn data_file(dir: &Path, n: usize) -> Result<std::path::PathBuf> {
    let manifest: Value = serde_json::from_slice(&fs::read(dir.join("loader/manifest.json"))?)?;
    let relative = manifest["files"][n]["path"].as_str().context("path")?;
    Ok(dir.join("loader").join(relative))
}

#[test]
fn loader_run_fails_on_a_corrupted_file_and_names_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    prepare(dir.path())?;
    let victim = data_file(dir.path(), 17)?;
    let mut data = fs::read(&victim)?;
    data[1000] ^= 0x01;
    fs::write(&victim, &data)?;

    let out = loader_run(dir.path(), &["--readers", "3"])?;
    ensure!(!out.status.success(), "a corrupted file went unnoticed");
    ensure!(out.stdout.is_empty(), "printed a result");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains(&*victim.to_string_lossy()), "{stderr}");
    ensure!(stderr.contains("byte 1000"), "{stderr}");
    ensure!(stderr.contains("failed in phase 'run'"), "{stderr}");
    Ok(())
}

#[test]
fn loader_run_fails_on_a_truncated_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    prepare(dir.path())?;
    let victim = data_file(dir.path(), 3)?;
    fs::OpenOptions::new()
        .write(true)
        .open(&victim)?
        .set_len(100)?;

    let out = loader_run(dir.path(), &[])?;
    ensure!(!out.status.success(), "a short file went unnoticed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains(&*victim.to_string_lossy()), "{stderr}");
    ensure!(stderr.contains("short file"), "{stderr}");
    Ok(())
}

#[test]
fn loader_run_needs_a_prepared_data_set() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = loader_run(dir.path(), &[])?;
    ensure!(!out.status.success(), "ran without a data set");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("loader prepare"), "{stderr}");
    Ok(())
}

#[test]
fn checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let args = [
        "checkpoint",
        "--dir",
        path(dir.path())?,
        "--files",
        "2",
        "--size",
        "8MiB",
        "--block",
        "1MiB",
    ];
    let keys = [
        "tool",
        "files",
        "size",
        "block",
        "seconds",
        "mib_s",
        "fsync_seconds_max",
    ];
    let json = run_json(&args, &keys)?;
    ensure!(json["tool"] == "checkpoint" && json["files"] == 2, "{json}");
    ensure!(
        json["size"] == 8 << 20 && json["block"] == 1 << 20,
        "{json}"
    );
    let seconds = positive(&json, "seconds")?;
    let mib_s = positive(&json, "mib_s")?;
    ensure!((mib_s * seconds - 16.0).abs() < 1e-6, "{json}");
    let fsync = json["fsync_seconds_max"].as_f64().context("fsync")?;
    ensure!(fsync >= 0.0 && fsync <= seconds, "{json}");
    ensure!(
        fs::read_dir(dir.path())?.next().is_none(),
        "checkpoint left files behind"
    );
    Ok(())
}

#[test]
fn bad_sizes_are_refused() -> Result<()> {
    let out = fsbench(&["checkpoint", "--dir", "/nonexistent", "--size", "1.5G"])?;
    ensure!(!out.status.success(), "accepted 1.5G");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("1.5G"), "{stderr}");
    Ok(())
}
