//! `fsreport` on a hand-written results file (tests/data/peers-sample.json: 7 systems,
//! 20 workloads in 4 groups, one failed run, one run missing): the tables, ratios
//! computed by hand, the charts' PNG headers, and clear failures on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/peers-sample.json")
}

fn fsreport(results: &Path, out_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fsreport"))
        .arg("--results")
        .arg(results)
        .arg("--out-dir")
        .arg(out_dir)
        .args(["--image-prefix", "docs/bench/"])
        .output()
        .expect("fsreport runs")
}

/// Width and height from a PNG's signature and IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        bytes.len() > 24,
        "{} is too short for a PNG",
        path.display()
    );
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{}: not a PNG signature",
        path.display()
    );
    assert_eq!(
        &bytes[12..16],
        b"IHDR",
        "{}: first chunk is not IHDR",
        path.display()
    );
    let be =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    (be(16), be(20))
}

fn assert_line(report: &str, line: &str) {
    assert!(
        report.lines().any(|l| l == line),
        "report.md has no line\n{line}\n--- report.md ---\n{report}"
    );
}

#[test]
fn sample_report_and_charts() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = dir.path().join("report");
    let run = fsreport(&sample(), &out);
    assert!(
        run.status.success(),
        "fsreport failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = std::fs::read_to_string(out.join("report.md")).expect("report.md written");

    // The driver puts the section under its own heading.
    assert!(
        report.starts_with("Run of 2026-11-24T13:00:00Z, quick mode, flyfs 856e6c3, on 2 cores")
    );
    assert!(!report.lines().any(|l| l.starts_with('#')));
    assert!(report.contains("Command: `benches/peers --quick`."));

    // Systems; the long settings go below the table, markdown kept.
    assert_line(
        &report,
        "| GlusterFS | peer | 3 | replica 3 (AFR) | glusterfs 10.3 | O\\_DIRECT rejected: fio \
         runs buffered, end\\_fsync=1 |",
    );
    assert_line(
        &report,
        "  - `flyfs up --replicas 3`: manager, metadata service, 3 storage daemons on one disk",
    );

    // Ratios by hand. flyfs-3 512.3 MiB/s against the best 3-copy peer, SeaweedFS 455.0:
    // 1.126; flyfs-1 890.2 against JuiceFS (Redis) 640.4: 1.390.
    assert_line(
        &report,
        "| 1 MiB sequential write, 4 jobs | MiB/s | 1,480 <sup>1</sup> | 512 | 890 | 402 | 612 \
         | 640 | 455 | **1.13** <sub>SeaweedFS</sub> | **1.39** <sub>JuiceFS (Redis)</sub> |",
    );
    // Lower is better: the best 3-copy peer is GlusterFS at 11.8 ms, flyfs-3 takes 14.2:
    // 11.8 / 14.2 = 0.831, behind, not bold; JuiceFS (Redis) 10.5 against flyfs-1 8.4: 1.25.
    assert_line(
        &report,
        "| data loader, p99 file latency | ms (lower is better) | 1.90 | 14.2 | 8.40 | 11.8 | \
         12.6 | 10.5 | 21.7 | 0.83 <sub>GlusterFS</sub> | **1.25** <sub>JuiceFS (Redis)</sub> |",
    );
    // GlusterFS failed: flyfs-3 is compared with SeaweedFS, 3310 / 1210 = 2.736.
    assert_line(
        &report,
        "| mdtest-hard read | ops/s | 48,210 | 3,310 | 3,580 | error <sup>1</sup> | 2,140 | \
         3,980 | 1,210 | **2.74** <sub>SeaweedFS</sub> | 0.90 <sub>JuiceFS (Redis)</sub> |",
    );
    let footnote = report
        .lines()
        .find(|l| l.starts_with("- <sup>1</sup> GlusterFS on mdtest-hard read: error: "))
        .expect("footnote of the failed run");
    assert!(footnote.contains("fsbench exited 1: md-hard read: open"));
    assert!(footnote.ends_with('…'), "long message not cut: {footnote}");
    assert!(!footnote.contains("brick disconnect"));
    // SeaweedFS did not run 1 MiB files.
    assert_line(
        &report,
        "| 1 MiB files, no fsync | files/s | 1,290 | 398 | 611 | 255 | 540 | 566 | — | \
         **1.56** <sub>GlusterFS</sub> | **1.08** <sub>JuiceFS (Redis)</sub> |",
    );
    assert_line(
        &report,
        "![fio: one chart per workload](docs/bench/peers-fio.png)",
    );

    // The summary says plainly where flyfs is behind.
    assert_line(
        &report,
        "- **flyfs, 3 replicas** against GlusterFS and SeaweedFS (3 copies): ahead of or level \
         with every peer on 16 of 20 rows compared; **behind on 4**:",
    );
    assert_line(
        &report,
        "  - training, data loader, p99 file latency: 0.83 (flyfs 14.2 ms, GlusterFS 11.8 ms; \
         lower is better)",
    );
    assert_line(
        &report,
        "- **flyfs, 1 replica** against JuiceFS (SQLite) and JuiceFS (Redis) (1 copy): ahead of \
         or level with every peer on 14 of 20 rows compared; **behind on 6**:",
    );
    assert_line(
        &report,
        "![flyfs ÷ the best peer of equal copies, per workload](docs/bench/peers-ratio.png)",
    );

    // Chart sizes (see charts.rs): 1600 wide; a group chart has a 64 px title, a legend
    // row of 32 px per 4 systems (2 here), a 16 px gap, 400 px per row of up to 3 panels
    // (2 panels a row for 4 workloads) and a 20 px margin.
    for (group, workloads) in [("fio", 5), ("metadata", 6), ("fs_mark", 4), ("training", 5)] {
        let rows = if workloads == 4 {
            2
        } else {
            u32::div_ceil(workloads, 3)
        };
        let expected = (1600, 64 + 2 * 32 + 16 + rows * 400 + 20);
        assert_eq!(
            png_size(&out.join(format!("peers-{group}.png"))),
            expected,
            "{group}"
        );
    }
    // The ratio chart: a 64 px title, then per flyfs system 48 px of caption, 30 px per
    // group, 28 px per workload, 44 px of axis and a 28 px gap.
    let panel = 48 + 4 * 30 + 20 * 28 + 44 + 28;
    assert_eq!(
        png_size(&out.join("peers-ratio.png")),
        (1600, 64 + 2 * panel)
    );
}

/// Runs fsreport on the sample changed by `edit`; returns its stderr after checking that
/// it failed.
fn failure(edit: impl FnOnce(String) -> String) -> String {
    let dir = tempfile::tempdir().expect("temporary directory");
    let results = dir.path().join("results.json");
    let text = std::fs::read_to_string(sample()).expect("sample readable");
    std::fs::write(&results, edit(text)).expect("results written");
    let run = fsreport(&results, &dir.path().join("report"));
    assert!(
        !run.status.success(),
        "fsreport accepted a bad results file"
    );
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(
        stderr.contains(&results.display().to_string()),
        "message does not name the file: {stderr}"
    );
    assert!(!dir.path().join("report/report.md").exists());
    stderr
}

#[test]
fn truncated_json_is_a_clear_error() {
    let stderr = failure(|text| text[..text.len() / 2].to_string());
    assert!(stderr.contains("EOF while parsing"), "{stderr}");
}

#[test]
fn missing_field_is_named() {
    let stderr = failure(|text| text.replacen("\"unit\": \"MiB/s\", ", "", 1));
    assert!(stderr.contains("missing field `unit`"), "{stderr}");
}

#[test]
fn unknown_system_is_named() {
    let stderr = failure(|text| {
        text.replacen(
            "{\"system\": \"seaweedfs\", \"workload\": \"fio-seq-write-4j\"",
            "{\"system\": \"cephfs\", \"workload\": \"fio-seq-write-4j\"",
            1,
        )
    });
    assert!(
        stderr.contains("system `cephfs`, workload `fio-seq-write-4j`): no such system"),
        "{stderr}"
    );
}

#[test]
fn value_and_error_together_are_refused() {
    let stderr = failure(|text| {
        text.replacen(
            "\"value\": 512.3}",
            "\"value\": 512.3, \"error\": \"timeout\"}",
            1,
        )
    });
    assert!(stderr.contains("has both `value` and `error`"), "{stderr}");
}
