//! `fsbench checkpoint`: the write pattern of a training job's checkpoint.
//!
//! Every rank of a training job writes its shard of the model and optimizer
//! state at the same moment, as one large file written front to back in
//! large writes, makes it durable and closes it; the job goes on when the
//! slowest rank is done. Here `--files` processes each write one file
//! `D/checkpoint/ckpt-<i>` of `--size` bytes in `--block`-sized writes, then
//! fsync and close it, and the time runs from their release to the last
//! close. The files are removed afterwards, outside the timing.
//!
//! The data is deterministic and distinct in every 4 KiB page (a block
//! filled once, stamped per page before each write: see
//! [`files::stamp_pages`]), so neither compression nor deduplication can
//! make the writes cheaper than a real checkpoint's, and generating it costs
//! the writers almost nothing, as a real checkpoint's data is already in
//! memory.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::files::{self, MIB};
use crate::worker::{Barrier, Pool, Report};
use flyfs_benches::size;

/// The one phase.
const WRITE: &str = "write";
/// The largest block: a worker holds one block in memory.
const MAX_BLOCK: u64 = 1 << 30;

/// The options of `fsbench checkpoint`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// An existing directory on the file system under test; the files go
    /// into DIR/checkpoint.
    #[arg(long)]
    dir: PathBuf,
    /// Files, each written by a process of its own.
    #[arg(long, default_value_t = 4)]
    files: usize,
    /// The size of each file.
    #[arg(long, default_value = "1GiB", value_parser = size::parse)]
    size: u64,
    /// The size of each write.
    #[arg(long, default_value = "4MiB", value_parser = size::parse)]
    block: u64,
}

/// What one writer does.
#[derive(Debug, Serialize, Deserialize)]
pub struct Task {
    path: PathBuf,
    /// Names the content of the file.
    index: u64,
    size: u64,
    block: u64,
}

/// The result of `fsbench checkpoint`, printed as JSON.
#[derive(Debug, Serialize)]
pub struct Output {
    tool: &'static str,
    files: usize,
    size: u64,
    block: u64,
    seconds: f64,
    mib_s: f64,
    fsync_seconds_max: f64,
}

/// Writes the checkpoint, then removes it.
pub fn run(args: &Args) -> Result<Output> {
    if args.files == 0 {
        bail!("--files must be at least 1");
    }
    if args.size == 0 {
        bail!("--size must be at least 1 byte");
    }
    if args.block == 0 || args.block > MAX_BLOCK {
        bail!("--block must be between 1 byte and 1 GiB");
    }
    let root = files::create_work_dir(&args.dir, "checkpoint")?;
    let tasks: Vec<_> = (0..args.files)
        .map(|i| {
            crate::Task::Checkpoint(Task {
                path: root.join(format!("ckpt-{i}")),
                index: i as u64,
                size: args.size,
                block: args.block,
            })
        })
        .collect();
    let mut pool = Pool::spawn(&tasks)?;
    let phase = pool.phase(WRITE, false)?;
    pool.finish()?;

    let mut bytes = 0;
    let mut fsync_ns_max = 0;
    for (writer, report) in phase.reports.iter().enumerate() {
        let &[written, fsync_ns] = report.extra.as_slice() else {
            bail!("writer {writer} did not report its bytes and fsync time");
        };
        bytes += written;
        fsync_ns_max = fsync_ns_max.max(fsync_ns);
    }
    for i in 0..args.files {
        let path = root.join(format!("ckpt-{i}"));
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    fs::remove_dir(&root).with_context(|| format!("removing {}", root.display()))?;

    let mib_s = bytes as f64 / MIB as f64 / phase.seconds;
    let fsync_seconds_max = fsync_ns_max as f64 / 1e9;
    eprintln!(
        "checkpoint: {} files, {bytes} bytes in {:.3} s, {mib_s:.1} MiB/s, \
         longest fsync {fsync_seconds_max:.3} s",
        args.files, phase.seconds
    );
    Ok(Output {
        tool: "checkpoint",
        files: args.files,
        size: args.size,
        block: args.block,
        seconds: phase.seconds,
        mib_s,
        fsync_seconds_max,
    })
}

/// A writer: creates its file, writes it in blocks, fsyncs and closes it,
/// and reports the bytes written and the fsync's nanoseconds.
pub fn work(task: &Task, barrier: &mut Barrier) -> Result<()> {
    let key = files::key(u64::from_le_bytes(*b"ckpoint!"), task.index);
    let mut block = vec![0u8; task.block.min(task.size) as usize];
    files::fill(&mut block, key, 0);
    let path = &task.path;
    barrier.phase(WRITE, || {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut offset = 0;
        while offset < task.size {
            let n = (task.size - offset).min(block.len() as u64) as usize;
            files::stamp_pages(&mut block[..n], key, offset);
            file.write_all(&block[..n])
                .with_context(|| format!("writing {} at byte {offset}", path.display()))?;
            offset += n as u64;
        }
        let fsync_started = Instant::now();
        file.sync_all()
            .with_context(|| format!("fsync {}", path.display()))?;
        let fsync_ns = fsync_started.elapsed().as_nanos() as u64;
        files::close(file).with_context(|| format!("closing {}", path.display()))?;
        Ok(Report {
            count: 1,
            extra: vec![offset, fsync_ns],
        })
    })
}
