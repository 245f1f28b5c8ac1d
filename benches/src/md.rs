//! `fsbench md`: metadata operations in the style of mdtest.
//!
//! Worker processes create, stat, read, list and remove small files, each
//! operation a separately timed phase, as mdtest does in IO500:
//!
//! - `easy` (mdtest-easy): every process works in a directory of its own,
//!   `D/md-easy/p<i>`, with empty files by default. It measures how fast the
//!   file system's metadata scales when clients do not share directories.
//! - `hard` (mdtest-hard): all processes work in one shared directory,
//!   `D/md-hard`, with files of 3901 bytes by default, so every create and
//!   remove contends for the same directory and every file has data.
//!
//! Each process handles its share of the files, under names only it uses.
//! Every operation is checked: stat compares the size, read compares every
//! byte with what create wrote, list compares the number of entries.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::files::{self, MIB};
use crate::worker::{Barrier, CacheArgs, Pool, Report};
use flyfs_benches::size;

/// The phases in the order they run, and whether each reads (and so starts
/// with dropped caches).
const PHASES: [(&str, bool); 5] = [
    (CREATE, false),
    (STAT, true),
    (READ, true),
    (LIST, true),
    (REMOVE, false),
];
const CREATE: &str = "create";
const STAT: &str = "stat";
const READ: &str = "read";
const LIST: &str = "list";
const REMOVE: &str = "remove";

/// The file size of mdtest-hard in IO500.
const HARD_SIZE: u64 = 3901;

/// The options of `fsbench md`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// An existing directory on the file system under test.
    #[arg(long)]
    dir: PathBuf,
    /// Files in total, shared evenly among the processes.
    #[arg(long)]
    files: u64,
    /// Worker processes.
    #[arg(long)]
    procs: usize,
    /// easy: a directory per process; hard: one directory shared by all.
    #[arg(long, value_enum)]
    layout: Layout,
    /// Bytes written to and read from each file (default: 0 for easy, 3901
    /// for hard). Accepts units: 4096, 100KiB, 4MiB.
    #[arg(long, value_parser = size::parse)]
    size: Option<u64>,
    #[command(flatten)]
    cache: CacheArgs,
}

/// Where the processes keep their files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// A directory per process (mdtest-easy).
    Easy,
    /// One directory shared by every process (mdtest-hard).
    Hard,
}

/// What one worker does: its files are `dir/<prefix>f<j>` for `j` below
/// `files`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Task {
    dir: PathBuf,
    prefix: String,
    files: u64,
    size: u64,
    /// Entries the worker's listing of `dir` must find.
    list_expect: u64,
}

/// The result of `fsbench md`, printed as JSON.
#[derive(Debug, Serialize)]
pub struct Output {
    tool: &'static str,
    layout: Layout,
    files: u64,
    procs: usize,
    size: u64,
    dropped_caches: bool,
    /// Operations per second of each phase (entries per second for list).
    rates: Phases,
    /// Elapsed seconds of each phase.
    seconds: Phases,
}

/// A number per phase.
#[derive(Debug, Serialize)]
struct Phases {
    create: f64,
    stat: f64,
    read: f64,
    list: f64,
    remove: f64,
}

impl Phases {
    /// The values of the phases in the order of [`PHASES`].
    fn new([create, stat, read, list, remove]: [f64; 5]) -> Self {
        Phases {
            create,
            stat,
            read,
            list,
            remove,
        }
    }
}

/// Runs the workload and removes the directories it created.
pub fn run(args: &Args) -> Result<Output> {
    if args.procs == 0 {
        bail!("--procs must be at least 1");
    }
    if args.files == 0 {
        bail!("--files must be at least 1");
    }
    let size = args.size.unwrap_or(match args.layout {
        Layout::Easy => 0,
        Layout::Hard => HARD_SIZE,
    });
    let drop_caches = args.cache.enabled();
    let root = files::create_work_dir(&args.dir, layout_dir(args.layout))?;
    let procs = args.procs as u64;
    let mut tasks = Vec::with_capacity(args.procs);
    for i in 0..procs {
        let files = args.files / procs + u64::from(i < args.files % procs);
        let task = match args.layout {
            Layout::Easy => {
                let dir = root.join(format!("p{i}"));
                fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
                Task {
                    dir,
                    prefix: String::new(),
                    files,
                    size,
                    list_expect: files,
                }
            }
            Layout::Hard => Task {
                dir: root.clone(),
                prefix: format!("p{i}."),
                files,
                size,
                list_expect: args.files,
            },
        };
        tasks.push(crate::Task::Md(task));
    }

    let mut pool = Pool::spawn(&tasks)?;
    let mut rates = [0.0; PHASES.len()];
    let mut seconds = [0.0; PHASES.len()];
    for (i, (name, reads)) in PHASES.into_iter().enumerate() {
        let phase = pool.phase(name, reads && drop_caches)?;
        eprintln!(
            "md {}: {name}: {} in {:.3} s, {:.0}/s",
            layout_dir(args.layout),
            phase.count(),
            phase.seconds,
            phase.rate()
        );
        rates[i] = phase.rate();
        seconds[i] = phase.seconds;
    }
    pool.finish()?;

    if args.layout == Layout::Easy {
        for i in 0..args.procs {
            let dir = root.join(format!("p{i}"));
            fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    fs::remove_dir(&root).with_context(|| format!("removing {}", root.display()))?;

    Ok(Output {
        tool: "md",
        layout: args.layout,
        files: args.files,
        procs: args.procs,
        size,
        dropped_caches: drop_caches,
        rates: Phases::new(rates),
        seconds: Phases::new(seconds),
    })
}

fn layout_dir(layout: Layout) -> &'static str {
    match layout {
        Layout::Easy => "md-easy",
        Layout::Hard => "md-hard",
    }
}

/// The worker: the five phases over its files.
pub fn work(task: &Task, barrier: &mut Barrier) -> Result<()> {
    let mut names = Names {
        path: task.dir.clone(),
        name: String::new(),
        prefix: &task.prefix,
        files: task.files,
    };
    // At least a page, so that reading an empty file still asks for bytes
    // and sees its end.
    let mut buf = vec![0u8; task.size.clamp(4096, MIB as u64) as usize];
    let size = task.size;

    barrier.phase(CREATE, || {
        names.each(|path, name| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            files::write_content(&mut file, files::key_of_name(name), size, &mut buf)
                .with_context(|| format!("writing {}", path.display()))?;
            files::close(file).with_context(|| format!("closing {}", path.display()))
        })?;
        Ok(Report::count(task.files))
    })?;

    barrier.phase(STAT, || {
        names.each(|path, _| {
            let meta = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
            if meta.len() != size {
                bail!(
                    "stat {}: the size is {} bytes, expected {size}",
                    path.display(),
                    meta.len()
                );
            }
            Ok(())
        })?;
        Ok(Report::count(task.files))
    })?;

    barrier.phase(READ, || {
        names.each(|path, name| {
            let mut file =
                fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            files::read_verify(&mut file, files::key_of_name(name), size, &mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            files::close(file).with_context(|| format!("closing {}", path.display()))
        })?;
        Ok(Report::count(task.files))
    })?;

    barrier.phase(LIST, || {
        let found = count_entries(&task.dir)?;
        if found != task.list_expect {
            bail!(
                "listing {} found {found} entries, expected {}",
                task.dir.display(),
                task.list_expect
            );
        }
        Ok(Report::count(found))
    })?;

    barrier.phase(REMOVE, || {
        names.each(|path, _| {
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
        })?;
        Ok(Report::count(task.files))
    })
}

/// A worker's file names and paths, built in reused buffers.
struct Names<'a> {
    path: PathBuf,
    name: String,
    prefix: &'a str,
    files: u64,
}

impl Names<'_> {
    /// Calls `op` with the path and name of each file, in order, stopping at
    /// the first error.
    fn each(&mut self, mut op: impl FnMut(&Path, &str) -> Result<()>) -> Result<()> {
        for j in 0..self.files {
            self.name.clear();
            // Writing to a String cannot fail.
            let _ = write!(self.name, "{}f{j}", self.prefix);
            self.path.push(&self.name);
            let result = op(&self.path, &self.name);
            self.path.pop();
            result?;
        }
        Ok(())
    }
}

/// The entries of `dir`, without `.` and `..` (which read_dir skips).
fn count_entries(dir: &Path) -> Result<u64> {
    let mut found = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        entry.with_context(|| format!("listing {}", dir.display()))?;
        found += 1;
    }
    Ok(found)
}
