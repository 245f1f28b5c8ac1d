//! `fsbench loader`: the reading pattern of a training job's data loader.
//!
//! A data set of many files of a few hundred KiB to a few MiB (images, audio
//! clips, shards of tokenized text) is read whole, file after file, in a
//! fresh random order every epoch, by several reader processes at once, as
//! PyTorch's DataLoader workers do. What matters is files per second and
//! the latency of each file, which small-file opens and the first read of a
//! cold file dominate.
//!
//! `prepare` writes the data set once: file sizes are drawn log-uniformly
//! between `--min` and `--max` from a seeded RNG, the files go into
//! subdirectories of at most 1000 files, and a manifest
//! (`D/loader/manifest.json`) lists their paths and sizes. The content of the
//! file at position `i` of the manifest is stream `files::key(seed, i)`, so
//! `run` verifies every byte it reads.
//!
//! `run` reads the data set: every reader makes the same seeded random
//! permutation of the files for each epoch and reader `i` of `R` takes the
//! files at positions `i, i + R, i + 2R, ...` of it, the static split that
//! PyTorch's DistributedSampler gives its ranks. The readers do not
//! coordinate while reading.

use std::fs::{self, File, OpenOptions};
use std::io::BufWriter;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::files::{self, MIB};
use crate::worker::{Barrier, CacheArgs, Pool, Report};
use flyfs_benches::size;

/// The data set's directory inside `--dir`.
const LOADER_DIR: &str = "loader";
/// The manifest's name in the data set's directory.
const MANIFEST: &str = "manifest.json";
/// The manifest's name until every file is written.
const PARTIAL_MANIFEST: &str = "manifest.json.partial";
/// The most files in one subdirectory of the data set.
const DIR_FILES: usize = 1000;
/// The phase of `prepare`.
const WRITE: &str = "write";
/// The phase of `run`.
const RUN: &str = "run";

/// The subcommands of `fsbench loader`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Write the data set: files of random sizes and a manifest.
    Prepare(PrepareArgs),
    /// Read the data set in random order, as a training job's loader does.
    Run(RunArgs),
}

/// The options of `fsbench loader prepare`.
#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// An existing directory on the file system under test; the data set
    /// goes into DIR/loader.
    #[arg(long)]
    dir: PathBuf,
    /// Files in the data set.
    #[arg(long)]
    files: usize,
    /// The smallest file size.
    #[arg(long, default_value = "100KiB", value_parser = size::parse)]
    min: u64,
    /// The largest file size.
    #[arg(long, default_value = "4MiB", value_parser = size::parse)]
    max: u64,
    /// The seed of the file sizes and content.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Writer processes.
    #[arg(long, default_value_t = 4)]
    procs: usize,
}

/// The options of `fsbench loader run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The directory given to `fsbench loader prepare`.
    #[arg(long)]
    dir: PathBuf,
    /// Reader processes.
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// The seed of the order of the files.
    #[arg(long, default_value_t = 2)]
    seed: u64,
    /// Read for this many seconds (each reader finishes the file it is
    /// reading), starting a new epoch whenever one ends.
    #[arg(long, conflicts_with = "epochs")]
    seconds: Option<f64>,
    /// Read the data set this many times (default 1).
    #[arg(long)]
    epochs: Option<u64>,
    #[command(flatten)]
    cache: CacheArgs,
}

/// The data set: its files in order, and how they were made.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// The seed of the sizes and content.
    seed: u64,
    /// The smallest size asked for.
    min: u64,
    /// The largest size asked for.
    max: u64,
    /// The files; the content of the file at position `i` is stream
    /// `files::key(seed, i)`.
    files: Vec<Entry>,
}

/// A file of the data set.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    /// The path relative to the data set's directory.
    path: String,
    /// The size in bytes.
    size: u64,
}

impl Manifest {
    fn load(path: &Path) -> Result<Manifest> {
        let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a manifest of fsbench", path.display()))?;
        if manifest.files.is_empty() {
            bail!("{} lists no files", path.display());
        }
        for entry in &manifest.files {
            let relative = Path::new(&entry.path)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
            if !relative {
                bail!(
                    "{} lists '{}', which is not a path inside the data set",
                    path.display(),
                    entry.path
                );
            }
        }
        Ok(manifest)
    }

    fn save(&self, path: &Path) -> Result<()> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::new(file);
        serde_json::to_writer(&mut out, self)
            .with_context(|| format!("writing {}", path.display()))?;
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", path.display()))?;
        files::close(file).with_context(|| format!("closing {}", path.display()))
    }

    /// The key of the content of the file at `index`.
    fn key(&self, index: usize) -> u64 {
        files::key(self.seed, index as u64)
    }
}

/// What a writer of `prepare` does: the files at positions `worker`,
/// `worker + workers`, ... of the manifest.
#[derive(Debug, Serialize, Deserialize)]
pub struct WriteTask {
    root: PathBuf,
    manifest: PathBuf,
    worker: usize,
    workers: usize,
}

/// What a reader of `run` does.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReadTask {
    root: PathBuf,
    manifest: PathBuf,
    reader: usize,
    readers: usize,
    seed: u64,
    stop: Stop,
}

/// When the readers stop.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum Stop {
    /// After reading the data set this many times.
    Epochs(u64),
    /// After this many seconds, finishing the current file.
    Seconds(f64),
}

/// The result of `fsbench loader prepare`, printed as JSON.
#[derive(Debug, Serialize)]
pub struct PrepareOutput {
    tool: &'static str,
    files: usize,
    bytes: u64,
    seconds: f64,
    mib_s: f64,
}

/// The result of `fsbench loader run`, printed as JSON.
#[derive(Debug, Serialize)]
pub struct RunOutput {
    tool: &'static str,
    readers: usize,
    files_read: u64,
    bytes: u64,
    seconds: f64,
    mib_s: f64,
    files_s: f64,
    /// From open to close, verification included.
    file_latency_us: Latency,
    dropped_caches: bool,
}

/// Percentiles of the time to read a file, in microseconds (null when no
/// file was read).
#[derive(Debug, Serialize)]
struct Latency {
    p50: Option<f64>,
    p99: Option<f64>,
}

/// Writes the data set and its manifest.
pub fn prepare(args: &PrepareArgs) -> Result<PrepareOutput> {
    if args.files == 0 {
        bail!("--files must be at least 1");
    }
    if args.procs == 0 {
        bail!("--procs must be at least 1");
    }
    if args.min == 0 {
        bail!("--min must be at least 1 byte");
    }
    if args.min > args.max {
        bail!(
            "--min ({} bytes) is larger than --max ({} bytes)",
            args.min,
            args.max
        );
    }
    let root = files::create_work_dir(&args.dir, LOADER_DIR)?;
    let manifest = Manifest {
        seed: args.seed,
        min: args.min,
        max: args.max,
        files: sizes(args.seed, args.files, args.min, args.max)
            .into_iter()
            .enumerate()
            .map(|(i, size)| Entry {
                path: format!("d{}/f{i}", i / DIR_FILES),
                size,
            })
            .collect(),
    };
    let total: u64 = manifest.files.iter().map(|e| e.size).sum();
    for d in 0..args.files.div_ceil(DIR_FILES) {
        let dir = root.join(format!("d{d}"));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let partial = root.join(PARTIAL_MANIFEST);
    manifest.save(&partial)?;

    let tasks: Vec<_> = (0..args.procs)
        .map(|worker| {
            crate::Task::LoaderWrite(WriteTask {
                root: root.clone(),
                manifest: partial.clone(),
                worker,
                workers: args.procs,
            })
        })
        .collect();
    let mut pool = Pool::spawn(&tasks)?;
    let phase = pool.phase(WRITE, false)?;
    pool.finish()?;
    let written: u64 = phase.reports.iter().filter_map(|r| r.extra.first()).sum();
    if phase.count() != args.files as u64 || written != total {
        bail!(
            "the writers report {} files of {written} bytes, but the data set has {} files of \
             {total} bytes",
            phase.count(),
            args.files
        );
    }
    let final_manifest = root.join(MANIFEST);
    fs::rename(&partial, &final_manifest)
        .with_context(|| format!("renaming {} to {MANIFEST}", partial.display()))?;
    let mib_s = total as f64 / MIB as f64 / phase.seconds;
    eprintln!(
        "loader prepare: {} files, {total} bytes in {:.3} s, {mib_s:.1} MiB/s",
        args.files, phase.seconds
    );
    Ok(PrepareOutput {
        tool: "loader-prepare",
        files: args.files,
        bytes: total,
        seconds: phase.seconds,
        mib_s,
    })
}

/// `count` sizes drawn log-uniformly from `min..=max` by a ChaCha8 RNG
/// seeded with `seed`.
fn sizes(seed: u64, count: usize, min: u64, max: u64) -> Vec<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (low, high) = ((min as f64).ln(), (max as f64).ln());
    (0..count)
        .map(|_| {
            let size = (low + rng.random::<f64>() * (high - low)).exp().round() as u64;
            size.clamp(min, max)
        })
        .collect()
}

/// A writer of `prepare`: creates its files, writes them in 1 MiB writes and
/// fsyncs each before closing it.
pub fn write(task: &WriteTask, barrier: &mut Barrier) -> Result<()> {
    let manifest = Manifest::load(&task.manifest)?;
    let mut buf = vec![0u8; MIB];
    barrier.phase(WRITE, || {
        let (mut count, mut bytes) = (0, 0);
        let mine = manifest.files.iter().enumerate();
        for (index, entry) in mine.skip(task.worker).step_by(task.workers) {
            let path = task.root.join(&entry.path);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            files::write_content(&mut file, manifest.key(index), entry.size, &mut buf)
                .with_context(|| format!("writing {}", path.display()))?;
            file.sync_all()
                .with_context(|| format!("fsync {}", path.display()))?;
            files::close(file).with_context(|| format!("closing {}", path.display()))?;
            count += 1;
            bytes += entry.size;
        }
        Ok(Report {
            count,
            extra: vec![bytes],
        })
    })
}

/// Reads the data set.
pub fn run(args: &RunArgs) -> Result<RunOutput> {
    if args.readers == 0 {
        bail!("--readers must be at least 1");
    }
    let stop = match (args.seconds, args.epochs) {
        (Some(seconds), _) => {
            if !(seconds > 0.0 && Duration::try_from_secs_f64(seconds).is_ok()) {
                bail!("--seconds must be a positive number of seconds, not {seconds}");
            }
            Stop::Seconds(seconds)
        }
        (None, Some(0)) => bail!("--epochs must be at least 1"),
        (None, epochs) => Stop::Epochs(epochs.unwrap_or(1)),
    };
    let root = args.dir.join(LOADER_DIR);
    let manifest = root.join(MANIFEST);
    if !manifest.exists() {
        bail!(
            "{} does not exist: write the data set with `fsbench loader prepare` first",
            manifest.display()
        );
    }
    // Checked here once rather than failing in every reader.
    Manifest::load(&manifest)?;
    let drop_caches = args.cache.enabled();

    let tasks: Vec<_> = (0..args.readers)
        .map(|reader| {
            crate::Task::LoaderRead(ReadTask {
                root: root.clone(),
                manifest: manifest.clone(),
                reader,
                readers: args.readers,
                seed: args.seed,
                stop,
            })
        })
        .collect();
    let mut pool = Pool::spawn(&tasks)?;
    let phase = pool.phase(RUN, drop_caches)?;
    pool.finish()?;

    let mut bytes = 0;
    let mut latencies = Vec::with_capacity(phase.count() as usize);
    for (reader, report) in phase.reports.iter().enumerate() {
        let Some((&read, times)) = report.extra.split_first() else {
            bail!("reader {reader} reported no byte count");
        };
        if times.len() as u64 != report.count {
            bail!(
                "reader {reader} reported {} files but {} times",
                report.count,
                times.len()
            );
        }
        bytes += read;
        latencies.extend_from_slice(times);
    }
    latencies.sort_unstable();
    let files_read = phase.count();
    let mib_s = bytes as f64 / MIB as f64 / phase.seconds;
    let files_s = files_read as f64 / phase.seconds;
    let file_latency_us = Latency {
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
    };
    eprintln!(
        "loader run: {files_read} files, {bytes} bytes in {:.3} s, {mib_s:.1} MiB/s, \
         {files_s:.0} files/s, p50 {:.0} us, p99 {:.0} us",
        phase.seconds,
        file_latency_us.p50.unwrap_or(0.0),
        file_latency_us.p99.unwrap_or(0.0)
    );
    Ok(RunOutput {
        tool: "loader-run",
        readers: args.readers,
        files_read,
        bytes,
        seconds: phase.seconds,
        mib_s,
        files_s,
        file_latency_us,
        dropped_caches: drop_caches,
    })
}

/// The nearest-rank percentile `p` (0 to 1) of sorted nanoseconds, in
/// microseconds.
fn percentile(sorted_ns: &[u64], p: f64) -> Option<f64> {
    let rank = (p * sorted_ns.len() as f64).ceil() as usize;
    let ns = sorted_ns.get(rank.clamp(1, sorted_ns.len().max(1)) - 1)?;
    Some(*ns as f64 / 1000.0)
}

/// A reader of `run`: reads its share of each epoch's permutation, every
/// file opened, read whole in 1 MiB reads, verified and closed, and reports
/// the files, the bytes and the time each file took, in nanoseconds.
pub fn read(task: &ReadTask, barrier: &mut Barrier) -> Result<()> {
    let manifest = Manifest::load(&task.manifest)?;
    let mut order: Vec<usize> = (0..manifest.files.len()).collect();
    let share = order
        .len()
        .saturating_sub(task.reader)
        .div_ceil(task.readers);
    let mut rng = ChaCha8Rng::seed_from_u64(task.seed);
    let mut buf = vec![0u8; MIB];
    let (epochs, seconds) = match task.stop {
        Stop::Epochs(epochs) => (epochs, None),
        Stop::Seconds(seconds) => (u64::MAX, Some(seconds)),
    };
    let limit = seconds
        .map(Duration::try_from_secs_f64)
        .transpose()
        .context("the time limit is not a duration")?;
    let mut latencies = Vec::with_capacity(share.saturating_mul(epochs.min(16) as usize));
    barrier.phase(RUN, || {
        let start = Instant::now();
        // A limit too far away to represent is no limit.
        let deadline = limit.and_then(|limit| start.checked_add(limit));
        let mut bytes = 0;
        let mut epoch = 0;
        // A reader without a share has nothing to do in any epoch.
        while share > 0 && epoch < epochs {
            order.shuffle(&mut rng);
            for &index in order.iter().skip(task.reader).step_by(task.readers) {
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    epoch = epochs;
                    break;
                }
                let began = Instant::now();
                let entry = &manifest.files[index];
                let path = task.root.join(&entry.path);
                let mut file =
                    File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                bytes += files::read_verify(&mut file, manifest.key(index), entry.size, &mut buf)
                    .with_context(|| format!("reading {}", path.display()))?;
                files::close(file).with_context(|| format!("closing {}", path.display()))?;
                latencies.push(began.elapsed().as_nanos() as u64);
            }
            epoch = epoch.saturating_add(1);
        }
        let mut extra = Vec::with_capacity(latencies.len() + 1);
        extra.push(bytes);
        extra.extend_from_slice(&latencies);
        Ok(Report {
            count: latencies.len() as u64,
            extra,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_seeded_and_in_range() {
        let a = sizes(1, 1000, 100 << 10, 4 << 20);
        assert_eq!(a, sizes(1, 1000, 100 << 10, 4 << 20));
        assert_ne!(a, sizes(2, 1000, 100 << 10, 4 << 20));
        assert!(a.iter().all(|&s| (100 << 10..=4 << 20).contains(&s)));
        // Log-uniform: about as many below the geometric mean as above.
        let mean = ((100u64 << 10) as f64 * (4u64 << 20) as f64).sqrt() as u64;
        let below = a.iter().filter(|&&s| s < mean).count();
        assert!((400..600).contains(&below), "{below}");
        assert_eq!(sizes(3, 5, 7, 7), vec![7; 5]);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let ns: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile(&ns, 0.5), Some(50.0));
        assert_eq!(percentile(&ns, 0.99), Some(99.0));
        assert_eq!(percentile(&[7000], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
