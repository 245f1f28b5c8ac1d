//! Worker processes and the barrier that times their phases.
//!
//! The workloads run in processes, not threads, as mdtest and IOR run MPI
//! ranks: each has its own file descriptor table and its own FUSE requests,
//! and no lock of ours sits between it and the file system. The parent
//! ([`Pool`]) starts its own program again once per worker with the hidden
//! subcommand [`SUBCOMMAND`] and the worker's task as JSON, and talks to each
//! over the worker's stdin and stdout, one line at a time:
//!
//! ```text
//! worker: ready <phase>                 (set up, waiting)
//! parent: go                            (sent to all workers at once)
//! worker: done <phase> <count> <extra>... (finished; numbers in decimal)
//! ```
//!
//! A phase lasts from the moment the parent has seen every worker ready and
//! releases them to the moment the last `done` line arrives, so set-up work
//! (allocating buffers, reading a manifest) is never timed. After the last
//! phase the parent closes the workers' stdin and each exits. A worker that
//! fails prints its error to stderr and exits; the parent then kills the
//! others and reports which worker failed, in which phase, and its stderr.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, StdinLock, StdoutLock, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

/// The hidden subcommand that runs one worker.
pub const SUBCOMMAND: &str = "__worker";

/// How long the parent waits for a worker that closed its output to exit on
/// its own (and finish writing its error) before killing it.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// What a worker reports at the end of a phase: the operations (or files,
/// or entries) it completed and numbers particular to the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Operations completed.
    pub count: u64,
    /// Further numbers, meaning what the workload says they mean.
    pub extra: Vec<u64>,
}

impl Report {
    /// A report with no extra numbers.
    pub fn count(count: u64) -> Self {
        Report {
            count,
            extra: Vec::new(),
        }
    }
}

/// A timed phase: its duration and every worker's report, in worker order.
#[derive(Debug)]
pub struct Phase {
    /// From the release of the workers to the last worker's `done`.
    pub seconds: f64,
    /// The report of each worker.
    pub reports: Vec<Report>,
}

impl Phase {
    /// The sum of the workers' counts.
    pub fn count(&self) -> u64 {
        self.reports.iter().map(|r| r.count).sum()
    }

    /// The sum of the workers' counts per second.
    pub fn rate(&self) -> f64 {
        self.count() as f64 / self.seconds
    }
}

enum Event {
    Line {
        worker: usize,
        text: String,
        at: Instant,
    },
    Closed {
        worker: usize,
    },
}

#[derive(Debug)]
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

/// The parent's side: the running workers of one workload.
///
/// Dropping a pool kills the workers still running.
#[derive(Debug)]
pub struct Pool {
    workers: Vec<Worker>,
    events: mpsc::Receiver<Event>,
    /// Lines a worker sent ahead of the one the parent waits for.
    stash: Vec<VecDeque<(String, Instant)>>,
}

impl Pool {
    /// Starts one worker process per task; worker `i` gets `tasks[i]`.
    pub fn spawn<T: Serialize>(tasks: &[T]) -> Result<Pool> {
        let exe = std::env::current_exe()
            .context("finding this program's own path to start the workers")?;
        let (sender, events) = mpsc::channel();
        let mut pool = Pool {
            workers: Vec::with_capacity(tasks.len()),
            events,
            stash: vec![VecDeque::new(); tasks.len()],
        };
        for (index, task) in tasks.iter().enumerate() {
            let task = serde_json::to_string(task).context("encoding a worker's task")?;
            let mut child = Command::new(&exe)
                .arg(SUBCOMMAND)
                .arg("--task")
                .arg(task)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting worker {index} ({})", exe.display()))?;
            let (stdin, stdout, stderr) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take());
            // From here on, dropping the pool kills this worker too.
            pool.workers.push(Worker {
                child,
                stdin,
                stderr: None,
            });
            let (Some(stdout), Some(mut stderr)) = (stdout, stderr) else {
                bail!("worker {index} was started without its pipes");
            };
            let lines = sender.clone();
            thread::Builder::new()
                .name(format!("worker-{index}-out"))
                .spawn(move || {
                    let mut stdout = BufReader::new(stdout);
                    let mut text = String::new();
                    loop {
                        text.clear();
                        match stdout.read_line(&mut text) {
                            Ok(n) if n > 0 && text.ends_with('\n') => {
                                let at = Instant::now();
                                let line = text.trim_end().to_owned();
                                if lines
                                    .send(Event::Line {
                                        worker: index,
                                        text: line,
                                        at,
                                    })
                                    .is_err()
                                {
                                    return;
                                }
                            }
                            // End of output, a last line cut short, or an
                            // error: the worker is gone or going.
                            _ => {
                                let _ = lines.send(Event::Closed { worker: index });
                                return;
                            }
                        }
                    }
                })
                .context("starting a thread to read a worker's output")?;
            let stderr = thread::Builder::new()
                .name(format!("worker-{index}-err"))
                .spawn(move || {
                    let mut text = Vec::new();
                    // A failed read ends the text; what came before it stays.
                    let _ = stderr.read_to_end(&mut text);
                    text
                })
                .context("starting a thread to read a worker's errors")?;
            pool.workers[index].stderr = Some(stderr);
        }
        Ok(pool)
    }

    /// Runs the next phase: waits until every worker is ready for `name`,
    /// drops the kernel's caches if `drop_caches`, releases the workers and
    /// waits for all of them to be done.
    pub fn phase(&mut self, name: &str, drop_caches: bool) -> Result<Phase> {
        let ready = format!("ready {name}");
        for worker in 0..self.workers.len() {
            let (line, _) = self.next_line(worker, name)?;
            if line != ready {
                let what = format!("it said '{line}' where '{ready}' was expected");
                return Err(self.failure(worker, name, &what));
            }
        }
        if drop_caches {
            self::drop_caches()?;
        }
        let start = Instant::now();
        for worker in 0..self.workers.len() {
            let sent = match self.workers[worker].stdin.as_mut() {
                Some(stdin) => stdin.write_all(b"go\n").and_then(|()| stdin.flush()),
                None => Err(io::Error::other("its input is closed")),
            };
            if let Err(e) = sent {
                return Err(self.failure(worker, name, &format!("it could not be released: {e}")));
            }
        }
        let mut end = start;
        let mut reports = Vec::with_capacity(self.workers.len());
        for worker in 0..self.workers.len() {
            let (line, at) = self.next_line(worker, name)?;
            match parse_done(&line, name) {
                Some(report) => reports.push(report),
                None => {
                    let what =
                        format!("it said '{line}' where 'done {name} <count> ...' was expected");
                    return Err(self.failure(worker, name, &what));
                }
            }
            end = end.max(at);
        }
        Ok(Phase {
            seconds: end.duration_since(start).as_secs_f64(),
            reports,
        })
    }

    /// Ends the workers after their last phase: closes their input, waits
    /// for them to exit and checks that each exited successfully. Whatever a
    /// worker wrote to stderr is passed on to ours.
    pub fn finish(mut self) -> Result<()> {
        for worker in &mut self.workers {
            worker.stdin = None;
        }
        for index in 0..self.workers.len() {
            let status = self.workers[index]
                .child
                .wait()
                .with_context(|| format!("waiting for worker {index} to exit"))?;
            if !status.success() {
                return Err(self.failure(index, "the end", "it did not exit successfully"));
            }
        }
        for (index, worker) in self.workers.iter_mut().enumerate() {
            let text = take_stderr(worker);
            if !text.is_empty() {
                eprintln!("worker {index}: {}", text.trim_end());
            }
        }
        Ok(())
    }

    /// The next line of `worker`, with the time it arrived. Lines of other
    /// workers that arrive meanwhile are kept for later; a worker that closes
    /// its output is a failure (workers only exit after [`Pool::finish`]).
    fn next_line(&mut self, worker: usize, phase: &str) -> Result<(String, Instant)> {
        if let Some(line) = self.stash[worker].pop_front() {
            return Ok(line);
        }
        loop {
            match self.events.recv() {
                Ok(Event::Line {
                    worker: from,
                    text,
                    at,
                }) => {
                    if from == worker {
                        return Ok((text, at));
                    }
                    self.stash[from].push_back((text, at));
                }
                Ok(Event::Closed { worker: from }) => {
                    return Err(self.failure(from, phase, "it exited before the phase ended"));
                }
                Err(mpsc::RecvError) => bail!("lost the output of every worker in phase '{phase}'"),
            }
        }
    }

    /// Stops every worker after `worker` failed and describes the failure:
    /// the phase, `what` went wrong, how the worker exited and its stderr.
    fn failure(&mut self, worker: usize, phase: &str, what: &str) -> anyhow::Error {
        // The others first, so that they stop loading the file system.
        for (index, other) in self.workers.iter_mut().enumerate() {
            if index != worker {
                let _ = other.child.kill();
            }
        }
        let status = exit_within(&mut self.workers[worker].child, EXIT_GRACE);
        for other in &mut self.workers {
            let _ = other.child.wait();
        }
        let status = match status {
            Ok(status) => format!("it ended with {status}"),
            Err(e) => format!("waiting for it to end failed: {e}"),
        };
        let stderr = take_stderr(&mut self.workers[worker]);
        let stderr = if stderr.trim().is_empty() {
            "its stderr was empty".to_owned()
        } else {
            format!("its stderr:\n{}", stderr.trim_end())
        };
        anyhow!(
            "worker {worker} of {} failed in phase '{phase}': {what}; {status}; {stderr}",
            self.workers.len()
        )
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            // Both are no-ops for a worker already waited for.
            let _ = worker.child.kill();
            let _ = worker.child.wait();
        }
    }
}

/// Waits up to `grace` for `child` to exit, then kills it.
fn exit_within(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(10));
    }
    child.kill()?;
    child.wait()
}

/// The text a worker wrote to stderr; only complete once it has exited.
fn take_stderr(worker: &mut Worker) -> String {
    match worker.stderr.take().map(JoinHandle::join) {
        Some(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        Some(Err(_)) => "(the thread reading its stderr failed)".to_owned(),
        None => String::new(),
    }
}

/// Parses `done <phase> <count> <extra>...`.
fn parse_done(line: &str, phase: &str) -> Option<Report> {
    let mut fields = line.split(' ');
    if fields.next() != Some("done") || fields.next() != Some(phase) {
        return None;
    }
    let count = fields.next()?.parse().ok()?;
    let extra = fields
        .map(|f| f.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    Some(Report { count, extra })
}

/// The worker's side of the barrier, over its stdin and stdout.
#[derive(Debug)]
pub struct Barrier {
    input: StdinLock<'static>,
    output: StdoutLock<'static>,
    line: String,
}

impl Barrier {
    /// The barrier of this worker process. Nothing else in the worker may
    /// use stdin or stdout.
    pub fn new() -> Self {
        Barrier {
            input: io::stdin().lock(),
            output: io::stdout().lock(),
            line: String::new(),
        }
    }

    /// Says the worker is ready for phase `name`, waits to be released, runs
    /// `work` and reports its result.
    pub fn phase(&mut self, name: &str, work: impl FnOnce() -> Result<Report>) -> Result<()> {
        self.send(&format!("ready {name}\n"))?;
        self.line.clear();
        let n = self
            .input
            .read_line(&mut self.line)
            .context("reading the parent's go")?;
        if n == 0 {
            bail!("the parent went away before phase '{name}'");
        }
        if self.line.trim_end() != "go" {
            bail!(
                "the parent said '{}' where 'go' was expected",
                self.line.trim_end()
            );
        }
        let report = work()?;
        let mut done = format!("done {name} {}", report.count);
        for x in &report.extra {
            // Writing to a String cannot fail.
            let _ = write!(done, " {x}");
        }
        done.push('\n');
        self.send(&done)
    }

    /// Waits for the parent to close our input after the last phase.
    pub fn finish(mut self) -> Result<()> {
        self.line.clear();
        let n = self
            .input
            .read_line(&mut self.line)
            .context("waiting for the parent to end the run")?;
        if n != 0 {
            bail!(
                "the parent said '{}' after the last phase",
                self.line.trim_end()
            );
        }
        Ok(())
    }

    fn send(&mut self, text: &str) -> Result<()> {
        self.output
            .write_all(text.as_bytes())
            .and_then(|()| self.output.flush())
            .context("writing to the parent")
    }
}

/// Whether this process runs as root (and may drop the kernel's caches).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Writes dirty data back (sync) and drops the kernel's page cache, dentries
/// and inodes, so that the next reads go to the file system. For a FUSE mount
/// this empties the kernel's side; caches inside the file system's own
/// daemon (JuiceFS's block cache, say) are theirs to configure.
pub fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context(
        "dropping the kernel's caches (writing 3 to /proc/sys/vm/drop_caches) failed; \
         it needs root: run as root or pass --no-drop-caches",
    )
}

/// The options `--drop-caches` and `--no-drop-caches` of the workloads that
/// read.
#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    /// Before each phase that reads, run sync and drop the kernel's caches
    /// (/proc/sys/vm/drop_caches), so that reads reach the file system. The
    /// default when running as root.
    #[arg(long, overrides_with = "no_drop_caches")]
    drop_caches: bool,
    /// Keep the kernel's caches (the default when not root).
    #[arg(long, overrides_with = "drop_caches")]
    no_drop_caches: bool,
}

impl CacheArgs {
    /// Whether to drop the caches before the phases that read.
    pub fn enabled(&self) -> bool {
        if self.no_drop_caches {
            false
        } else {
            self.drop_caches || is_root()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_lines() {
        assert_eq!(parse_done("done read 12", "read"), Some(Report::count(12)));
        assert_eq!(
            parse_done("done run 3 100 7 9", "run"),
            Some(Report {
                count: 3,
                extra: vec![100, 7, 9]
            })
        );
        assert_eq!(parse_done("done stat 12", "read"), None);
        assert_eq!(parse_done("done read", "read"), None);
        assert_eq!(parse_done("done read x", "read"), None);
        assert_eq!(parse_done("done read 1 -2", "read"), None);
        assert_eq!(parse_done("ready read", "read"), None);
    }
}
