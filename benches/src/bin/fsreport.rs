//! `fsreport`: tables and PNG charts from the peer benchmarks' results.
//!
//! `benches/peers` runs the same workloads on flyfs and on peer file systems and writes
//! one results file; this tool turns it into `report.md`, a markdown section for
//! BENCHMARKS.md, and the charts it links: `peers-<group>.png` per group of workloads
//! and `peers-ratio.png`, flyfs against the best peer keeping as many copies.

// A binary's root is looked up beside it, so the modules in fsreport/ need paths.
#[path = "fsreport/charts.rs"]
mod charts;
#[path = "fsreport/compare.rs"]
mod compare;
#[path = "fsreport/format.rs"]
mod format;
#[path = "fsreport/markdown.rs"]
mod markdown;
#[path = "fsreport/model.rs"]
mod model;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;

use crate::compare::Comparison;
use crate::model::Dataset;

/// Writes the report of the peer benchmarks: report.md and PNG charts.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The results file written by benches/peers.
    #[arg(long, value_name = "FILE.json")]
    results: PathBuf,
    /// Directory for report.md and the charts (created if missing).
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    /// Put before each chart's file name in report.md's image links, e.g. `docs/bench/`.
    #[arg(long, value_name = "PREFIX", default_value = "")]
    image_prefix: String,
    /// TrueType or OpenType font for the charts (default: Debian's fonts-dejavu-core
    /// DejaVuSans.ttf).
    #[arg(long, value_name = "PATH")]
    font: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("fsreport: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let data = Dataset::load(&args.results)?;
    charts::register_font(args.font.as_deref())?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let (comparisons, alone) = Comparison::all(&data);

    for group in &data.groups {
        let path = args.out_dir.join(charts::group_file_name(&group.name));
        charts::group_chart(&data, group, &path)
            .with_context(|| format!("drawing {}", path.display()))?;
        written(&path);
    }
    if !comparisons.is_empty() {
        let path = args.out_dir.join(charts::RATIO_FILE);
        charts::ratio_chart(&data, &comparisons, &path)
            .with_context(|| format!("drawing {}", path.display()))?;
        written(&path);
    }
    let report = markdown::render(&data, &comparisons, &alone, &args.image_prefix);
    let path = args.out_dir.join("report.md");
    std::fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
    written(&path);
    Ok(())
}

fn written(path: &Path) {
    println!("wrote {}", path.display());
}
