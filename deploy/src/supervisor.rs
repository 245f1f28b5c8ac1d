//! The one supervisor of flyfs daemon processes on this machine.
//!
//! A [`Daemon`] is a command (`flyfs SUBCOMMAND --config F` in practice)
//! with a log file its output is appended to. It is run one of two ways:
//! * detached ([`Daemon::spawn_detached`]), as `flyfs up` starts a cluster
//!   that outlives the command: a process group of its own (a shell's
//!   hang-up or Ctrl-C does not reach it) and a pid file, by which
//!   `flyfs down` (another process, later) finds it and stops it;
//! * owned by a [`Fleet`], as the storage benchmark and the multi-process
//!   tests run a cluster for as long as they need it: every daemon still
//!   running is killed when the fleet is dropped, also on a panic.
//!
//! A pid file holds the pid *and the process's start time* (field 22 of
//! `/proc/PID/stat`, fixed at fork). A process is ours only if both match:
//! a stale pid file, or a pid reused by another program, counts as not
//! running. The start time does not change at `exec`, so the daemon is
//! recognised from the moment it is spawned; an earlier design compared
//! the command line, which is still the parent's until the child has
//! exec'd and so lost a race on a loaded machine. Pid files of that
//! earlier design (a pid alone) are still read, by their command line.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How often a wait for a process to exit looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long a process gets to die after SIGKILL before that is an error.
const KILL_PATIENCE: Duration = Duration::from_secs(10);

/// Why supervising a daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("starting {name} ({command})")]
    Spawn {
        name: String,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} {}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sending {signal} to {name} (pid {pid})")]
    Signal {
        name: String,
        pid: u32,
        signal: Signal,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("waiting for {name} (pid {pid})")]
    Wait {
        name: String,
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("{name} (pid {pid}) survived SIGKILL for {KILL_PATIENCE:?}")]
    Unkillable { name: String, pid: u32 },
    #[error("{name} is not running under this supervisor")]
    NotRunning { name: String },
}

/// One daemon: how it is started, where it logs and (detached) keeps its
/// pid.
#[derive(Clone, Debug)]
pub struct Daemon {
    /// Its name in messages and file names ("mgmtd", "storage1", ...).
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Extra environment (`FLYFS_LOG`, say).
    pub env: Vec<(String, String)>,
    /// Where its standard output and error are appended.
    pub log: PathBuf,
    /// Where a detached daemon's pid and start time are kept.
    pub pid_file: PathBuf,
    /// A string its command line contains (its config's path): how a pid
    /// file of the earlier design, which holds no start time, is matched.
    pub marker: String,
}

/// How a daemon ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    Exited { pid: u32, after: Duration },
    Killed { pid: u32 },
}

impl Daemon {
    /// `program SUBCOMMAND --config CONFIG`, logging to `LOG_DIR/NAME.log`
    /// and keeping its pid in `RUN_DIR/NAME.pid`.
    pub fn flyfs(
        name: &str,
        program: &Path,
        subcommand: &str,
        config: &Path,
        log_dir: &Path,
        run_dir: &Path,
    ) -> Daemon {
        Daemon {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: vec![
                subcommand.to_string(),
                "--config".to_string(),
                config.display().to_string(),
            ],
            env: Vec::new(),
            log: log_dir.join(format!("{name}.log")),
            pid_file: run_dir.join(format!("{name}.pid")),
            marker: config.display().to_string(),
        }
    }

    /// Its pid, if its pid file names a live process that is this daemon.
    pub fn running(&self) -> Option<u32> {
        match read_pid_file(&self.pid_file)? {
            (pid, Some(_)) => live_pid(&self.pid_file).filter(|live| *live == pid),
            (pid, None) => (alive(pid) && cmdline(pid).is_some_and(|c| c.contains(&self.marker)))
                .then_some(pid),
        }
    }

    /// Starts it detached; the pid file is written before this returns.
    /// The caller keeps the child only to notice an early exit (and to
    /// reap it); dropping it leaves the daemon running.
    pub fn spawn_detached(&self) -> Result<Child, SupervisorError> {
        let mut command = self.command()?;
        // A process group of its own: no signal for the shell's job
        // reaches it.
        command.process_group(0);
        let child = self.spawn(command)?;
        let pid = child.id();
        // The start time is read while the child is certainly alive: it
        // cannot be reaped before this process waits for it.
        let start = start_time(pid).map_or_else(String::new, |start| format!(" {start}"));
        write_atomically(&self.pid_file, format!("{pid}{start}\n").as_bytes())?;
        Ok(child)
    }

    /// SIGTERMs it if it runs and waits up to `grace` for it to exit, then
    /// SIGKILLs it (saying so). Removes the pid file. Returns what happened,
    /// `None` if it was not running.
    pub fn stop(&self, grace: Duration) -> Result<Option<Stopped>, SupervisorError> {
        let Some(pid) = self.running() else {
            let _ = std::fs::remove_file(&self.pid_file);
            return Ok(None);
        };
        let started = Instant::now();
        self.signal(pid, Signal::SIGTERM)?;
        let stopped = if wait_exit(pid, grace) {
            Stopped::Exited {
                pid,
                after: started.elapsed(),
            }
        } else {
            eprintln!(
                "{} (pid {pid}) did not exit within {grace:?} of SIGTERM: sending SIGKILL (see {})",
                self.name,
                self.log.display()
            );
            self.signal(pid, Signal::SIGKILL)?;
            if !wait_exit(pid, KILL_PATIENCE) {
                return Err(SupervisorError::Unkillable {
                    name: self.name.clone(),
                    pid,
                });
            }
            Stopped::Killed { pid }
        };
        let _ = std::fs::remove_file(&self.pid_file);
        Ok(Some(stopped))
    }

    /// The last `lines` lines of its log (fewer if it is shorter; none if
    /// it cannot be read).
    pub fn log_tail(&self, lines: usize) -> Vec<String> {
        let Ok(text) = std::fs::read_to_string(&self.log) else {
            return Vec::new();
        };
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|line| line.to_string())
            .collect()
    }

    /// What to show of its log after it died: the last error it printed
    /// (see [`failure_lines`]), else its last `lines` lines.
    pub fn log_failure(&self, lines: usize) -> Vec<String> {
        match std::fs::read_to_string(&self.log) {
            Ok(text) => failure_lines(&text, lines),
            Err(_) => Vec::new(),
        }
    }

    fn command(&self) -> Result<Command, SupervisorError> {
        let log = || {
            File::options()
                .create(true)
                .append(true)
                .open(&self.log)
                .map_err(|source| SupervisorError::File {
                    what: "opening the log",
                    path: self.log.clone(),
                    source,
                })
        };
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log()?)
            .stderr(log()?);
        Ok(command)
    }

    fn spawn(&self, mut command: Command) -> Result<Child, SupervisorError> {
        command.spawn().map_err(|source| SupervisorError::Spawn {
            name: self.name.clone(),
            command: format!("{} {}", self.program.display(), self.args.join(" ")),
            source,
        })
    }

    fn signal(&self, pid: u32, signal: Signal) -> Result<(), SupervisorError> {
        match kill(Pid::from_raw(pid as i32), signal) {
            // Gone in the meantime: what we wanted.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(source) => Err(SupervisorError::Signal {
                name: self.name.clone(),
                pid,
                signal,
                source,
            }),
        }
    }
}

/// Daemons this process started and owns, by name. Dropping the fleet
/// kills every one still running (also on a panic, when it first prints
/// the end of every started daemon's log, to explain the failure).
#[derive(Debug, Default)]
pub struct Fleet {
    running: BTreeMap<String, (Daemon, Child)>,
    /// Every daemon ever started, for the logs printed on a panic.
    started: BTreeMap<String, Daemon>,
}

impl Fleet {
    pub fn new() -> Fleet {
        Fleet::default()
    }

    /// Starts `daemon` (in this process's group: it dies with a Ctrl-C of
    /// the test or benchmark). A daemon of the same name must not run.
    pub fn start(&mut self, daemon: Daemon) -> Result<(), SupervisorError> {
        assert!(
            !self.running.contains_key(&daemon.name),
            "{} is running already",
            daemon.name
        );
        let child = daemon.spawn(daemon.command()?)?;
        self.started.insert(daemon.name.clone(), daemon.clone());
        self.running.insert(daemon.name.clone(), (daemon, child));
        Ok(())
    }

    pub fn is_running(&self, name: &str) -> bool {
        self.running.contains_key(name)
    }

    /// Process ids by daemon name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.running
            .iter()
            .map(|(name, (_, child))| (name.clone(), child.id()))
            .collect()
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self, name: &str) -> Result<(), SupervisorError> {
        let (daemon, mut child) = self.take(name)?;
        // Already exited is fine: it is dead either way.
        let _ = child.kill();
        child.wait().map_err(|source| SupervisorError::Wait {
            name: daemon.name.clone(),
            pid: child.id(),
            source,
        })?;
        Ok(())
    }

    /// SIGTERMs daemon `name` and waits up to `within` for it to exit;
    /// then SIGKILLs it. Returns its exit status, `None` if it had to be
    /// killed.
    pub fn terminate(
        &mut self,
        name: &str,
        within: Duration,
    ) -> Result<Option<ExitStatus>, SupervisorError> {
        let (daemon, mut child) = self.take(name)?;
        let pid = child.id();
        let wait_error = |source| SupervisorError::Wait {
            name: daemon.name.clone(),
            pid,
            source,
        };
        daemon.signal(pid, Signal::SIGTERM)?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().map_err(wait_error)? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let _ = child.kill();
        child.wait().map_err(wait_error)?;
        Ok(None)
    }

    /// Terminates every running daemon, in ascending `rank` order (ties by
    /// name), each given `within`; returns each one's name and exit status
    /// (`None`: killed after `within`).
    pub fn terminate_all(
        &mut self,
        within: Duration,
        rank: impl Fn(&str) -> u32,
    ) -> Result<Vec<(String, Option<ExitStatus>)>, SupervisorError> {
        let mut names: Vec<String> = self.running.keys().cloned().collect();
        names.sort_by_key(|name| rank(name));
        let mut ended = Vec::new();
        for name in names {
            let status = self.terminate(&name, within)?;
            ended.push((name, status));
        }
        Ok(ended)
    }

    /// Kills every running daemon at once.
    pub fn kill_all(&mut self) {
        for (_, child) in self.running.values_mut() {
            // Already gone is fine: this is the last resort.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.running.clear();
    }

    /// The end of every started daemon's log, each under a heading, on
    /// standard error.
    pub fn print_logs(&self, lines: usize) {
        for (name, daemon) in &self.started {
            eprintln!("---- last lines of {name} ({}) ----", daemon.log.display());
            for line in daemon.log_tail(lines) {
                eprintln!("{line}");
            }
        }
    }

    fn take(&mut self, name: &str) -> Result<(Daemon, Child), SupervisorError> {
        self.running
            .remove(name)
            .ok_or_else(|| SupervisorError::NotRunning {
                name: name.to_string(),
            })
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs(40);
        }
        self.kill_all();
    }
}

/// The live process a pid file names: its pid, if a process with that pid
/// runs and started when the file says (a pid file of the earlier design,
/// without a start time, names none).
pub fn live_pid(pid_file: &Path) -> Option<u32> {
    let (pid, start) = read_pid_file(pid_file)?;
    (start? == start_time(pid)? && alive(pid)).then_some(pid)
}

/// A pid file's pid and, when it has one, start time.
fn read_pid_file(pid_file: &Path) -> Option<(u32, Option<u64>)> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let mut fields = text.split_whitespace();
    let pid = fields.next()?.parse().ok()?;
    let start = match fields.next() {
        Some(start) => Some(start.parse().ok()?),
        None => None,
    };
    Some((pid, start))
}

/// Whether `pid` is a live process (a zombie is not: it has exited and
/// only waits for its parent).
pub fn alive(pid: u32) -> bool {
    stat_fields(pid)
        .and_then(|fields| fields.first().map(|state| state != "Z" && state != "X"))
        .unwrap_or(false)
}

/// Polls until `pid` is gone or `limit` passes; whether it is gone.
pub fn wait_exit(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Writes `path` through a temporary file and a rename, so a reader never
/// sees half of it.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), SupervisorError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(|source| SupervisorError::File {
        what: "writing",
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| SupervisorError::File {
        what: "writing",
        path: path.to_path_buf(),
        source,
    })
}

/// The fields of `/proc/PID/stat` after the command name, from the state
/// (field 3) on. The name is in parentheses and may hold spaces and
/// parentheses itself, so the split is at the last ')'.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// When `pid` started, in clock ticks after boot (field 22 of
/// `/proc/PID/stat`): with the pid, it names one process for as long as
/// the machine runs.
fn start_time(pid: u32) -> Option<u64> {
    // Field 22, counted from field 3 (the state).
    stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

/// User plus system CPU time of `pid` in seconds (fields 14 and 15 of
/// `/proc/PID/stat`); `None` when it cannot be read (the process is gone).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    let ticks = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    // Linux reports these in USER_HZ, 100 on every mainstream build.
    Some((ticks(14)? + ticks(15)?) as f64 / 100.0)
}

/// `pid`'s command line, arguments joined by spaces.
fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The lines of a dead daemon's log that say why it died, at most `lines`:
/// from the last error a Rust program prints as it dies (`Error: ...` from
/// a `main` that returned an error, `... panicked at ...` from a panic) up
/// to the backtrace that may follow it, which would otherwise fill the
/// tail and hide the error; the last `lines` lines when there is none.
pub fn failure_lines(log: &str, lines: usize) -> Vec<String> {
    let all: Vec<&str> = log.lines().collect();
    let is_error = |line: &&str| line.starts_with("Error: ") || line.contains(" panicked at ");
    let is_backtrace = |line: &&str| line.eq_ignore_ascii_case("stack backtrace:");
    let shown = match all.iter().rposition(is_error) {
        Some(start) => {
            let end = all[start..]
                .iter()
                .position(is_backtrace)
                .map_or(all.len(), |at| start + at);
            &all[start..end.min(start + lines)]
        }
        None => &all[all.len().saturating_sub(lines)..],
    };
    shown.iter().map(|line| line.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(dir: &Path, name: &str) -> Daemon {
        let marker = dir.join(format!("{name}.marker")).display().to_string();
        Daemon {
            name: name.into(),
            program: "sh".into(),
            // The marker is the shell's $0, so it is in its command line.
            args: vec!["-c".into(), "sleep 30; true".into(), marker.clone()],
            env: Vec::new(),
            log: dir.join(format!("{name}.log")),
            pid_file: dir.join(format!("{name}.pid")),
            marker,
        }
    }

    #[test]
    fn a_dead_daemons_error_is_shown_above_its_backtrace() {
        let backtrace: String = (0..40)
            .map(|i| format!("  {i}: flyfs::frame_{i}\n             at src/x.rs:{i}\n"))
            .collect();
        let returned = format!(
            "INFO starting\nError: binding 127.0.0.1:7600\n\nCaused by:\n    \
             Address in use (os error 98)\n\nStack backtrace:\n{backtrace}"
        );
        assert_eq!(
            failure_lines(&returned, 8),
            [
                "Error: binding 127.0.0.1:7600",
                "",
                "Caused by:",
                "    Address in use (os error 98)",
                "",
            ]
        );
        let panicked = format!(
            "INFO up\nthread 'main' panicked at src/main.rs:3:5:\nno device\n\
             stack backtrace:\n{backtrace}"
        );
        assert_eq!(
            failure_lines(&panicked, 8),
            ["thread 'main' panicked at src/main.rs:3:5:", "no device"]
        );
        // A long error is cut at `lines`; a log without one shows its tail.
        assert_eq!(failure_lines(&returned, 2).len(), 2);
        let quiet: String = (0..20).map(|i| format!("line {i}\n")).collect();
        assert_eq!(failure_lines(&quiet, 3), ["line 17", "line 18", "line 19"]);
        assert!(failure_lines("", 3).is_empty());
    }

    #[test]
    fn a_detached_daemon_is_found_from_its_spawn_on_and_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let daemon = sleeper(dir.path(), "sleeper");
        assert_eq!(daemon.running(), None);
        let mut child = daemon.spawn_detached().expect("spawn");
        // At once, whether or not the shell has exec'd yet: the start time
        // identifies it from its fork on.
        assert_eq!(daemon.running(), Some(child.id()));
        // A pid file naming the same pid with another start time (a pid
        // reused by another program) is not ours.
        let recorded = std::fs::read_to_string(&daemon.pid_file).expect("pid file");
        let (pid, start) = recorded.trim().split_once(' ').expect("pid and start time");
        let other = Daemon {
            pid_file: dir.path().join("other.pid"),
            ..daemon.clone()
        };
        let start: u64 = start.parse().expect("a number");
        std::fs::write(&other.pid_file, format!("{pid} {}\n", start + 1)).expect("write");
        assert_eq!(other.running(), None);
        // A pid file of the earlier design (the pid alone) is matched by
        // the command line, once the child has exec'd (right after the
        // spawn it may still show the parent's: the race of that design).
        std::fs::write(&other.pid_file, format!("{pid}\n")).expect("write");
        let deadline = Instant::now() + Duration::from_secs(30);
        while other.running().is_none() {
            assert!(Instant::now() < deadline, "the shell never exec'd");
            std::thread::sleep(POLL_INTERVAL);
        }
        assert_eq!(other.running(), Some(child.id()));
        let stranger = Daemon {
            marker: "something else".into(),
            ..other.clone()
        };
        assert_eq!(stranger.running(), None);
        // Reap it from here (a test is its parent) as `stop` waits.
        let reaper = std::thread::spawn(move || child.wait());
        let stopped = daemon.stop(Duration::from_secs(5)).expect("stop");
        assert!(
            matches!(stopped, Some(Stopped::Exited { .. })),
            "{stopped:?}"
        );
        assert!(!daemon.pid_file.exists());
        assert_eq!(daemon.stop(Duration::from_secs(1)).expect("again"), None);
        reaper.join().expect("reaper").expect("wait");
        // A stale pid file is not a running daemon.
        std::fs::write(&daemon.pid_file, "999999999 1\n").expect("write");
        assert_eq!(daemon.running(), None);
    }

    /// Spawning and looking up at once, many times over, with the other
    /// core kept busy: the race the command-line check lost.
    #[test]
    fn spawned_daemons_are_recognised_under_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hog = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
        };
        for round in 0..50 {
            let daemon = sleeper(dir.path(), &format!("s{round}"));
            let mut child = daemon.spawn_detached().expect("spawn");
            let seen = daemon.running();
            let _ = child.kill();
            let _ = child.wait();
            assert_eq!(seen, Some(child.id()), "round {round}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        hog.join().expect("hog");
    }

    #[test]
    fn a_fleet_terminates_in_rank_order_and_kills_the_rest_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fleet = Fleet::new();
        for name in ["a", "b", "c"] {
            fleet.start(sleeper(dir.path(), name)).expect("start");
        }
        assert_eq!(fleet.pids().len(), 3);
        fleet.kill("c").expect("kill");
        assert!(!fleet.is_running("c"));
        assert!(matches!(
            fleet.kill("c"),
            Err(SupervisorError::NotRunning { .. })
        ));
        // `sh` ends on SIGTERM with the signal's status.
        let ended = fleet
            .terminate_all(Duration::from_secs(5), |name| u32::from(name == "a"))
            .expect("terminate");
        let names: Vec<&str> = ended.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        assert!(
            ended.iter().all(|(_, status)| status.is_some()),
            "{ended:?}"
        );

        fleet.start(sleeper(dir.path(), "d")).expect("start");
        let pid = fleet.pids()[0].1;
        drop(fleet);
        assert!(!alive(pid), "the fleet's drop killed d");
    }
}
