//! Detached daemon processes, as `flyfs up` starts them and `flyfs down`
//! stops them: spawned in a process group of their own (so a shell's
//! hang-up or Ctrl-C does not reach them), output appended to a log file,
//! pid in a pid file; found again later by pid file plus a check that the
//! process still runs the same command line (a stale pid file, or a pid
//! reused by another program, counts as not running).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One daemon: how it is started, where it logs and keeps its pid.
#[derive(Clone, Debug)]
pub(crate) struct Daemon {
    /// Its name in messages and file names ("mgmtd", "storage1", ...).
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    /// A string its command line contains (its config's path): tells our
    /// daemon from an unrelated process that got the same pid.
    pub marker: String,
}

impl Daemon {
    /// Its pid, if its pid file names a live process running its command.
    pub(crate) fn running(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (alive(pid) && cmdline(pid).is_some_and(|c| c.contains(&self.marker))).then_some(pid)
    }

    /// Starts it detached; the pid file is written before this returns.
    /// The caller keeps the child only to notice an early exit (and to
    /// reap it); dropping it leaves the daemon running.
    pub(crate) fn spawn(&self) -> anyhow::Result<Child> {
        let log = || {
            File::options()
                .create(true)
                .append(true)
                .open(&self.log)
                .with_context(|| format!("opening the log {}", self.log.display()))
        };
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log()?)
            .stderr(log()?)
            // A process group of its own: no signal for the shell's job
            // reaches it.
            .process_group(0)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} ({} {})",
                    self.name,
                    self.program.display(),
                    self.args.join(" ")
                )
            })?;
        write_atomically(&self.pid_file, format!("{}\n", child.id()).as_bytes())?;
        Ok(child)
    }

    /// SIGTERMs it if it runs and waits up to `grace` for it to exit, then
    /// SIGKILLs it (saying so). Removes the pid file. Returns what happened,
    /// `None` if it was not running.
    pub(crate) fn stop(&self, grace: Duration) -> anyhow::Result<Option<Stopped>> {
        let Some(pid) = self.running() else {
            let _ = std::fs::remove_file(&self.pid_file);
            return Ok(None);
        };
        let started = Instant::now();
        signal(pid, Signal::SIGTERM)?;
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
            signal(pid, Signal::SIGKILL)?;
            if !wait_exit(pid, Duration::from_secs(10)) {
                anyhow::bail!("{} (pid {pid}) survived SIGKILL", self.name);
            }
            Stopped::Killed { pid }
        };
        let _ = std::fs::remove_file(&self.pid_file);
        Ok(Some(stopped))
    }
}

/// How a daemon ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stopped {
    Exited { pid: u32, after: Duration },
    Killed { pid: u32 },
}

fn signal(pid: u32, signal: Signal) -> anyhow::Result<()> {
    match kill(Pid::from_raw(pid as i32), signal) {
        // Gone in the meantime: what we wanted.
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(error) => Err(error).with_context(|| format!("sending {signal} to pid {pid}")),
    }
}

/// Whether `pid` is a live process (a zombie is not: it has exited and
/// only waits for its parent).
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
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

/// Polls until `pid` is gone or `limit` passes; whether it is gone.
pub(crate) fn wait_exit(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `path` through a temporary file and a rename, so a reader never
/// sees half of it.
pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_finds_and_stops_a_detached_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("marker").display().to_string();
        let daemon = Daemon {
            name: "sleeper".into(),
            program: "sh".into(),
            // The marker is the shell's $0, so it stays in its command line.
            args: vec!["-c".into(), "sleep 30; true".into(), marker.clone()],
            log: dir.path().join("sleeper.log"),
            pid_file: dir.path().join("sleeper.pid"),
            marker: marker.clone(),
        };
        assert_eq!(daemon.running(), None);
        let mut child = daemon.spawn().expect("spawn");
        assert_eq!(daemon.running(), Some(child.id()));
        // Another command with the same pid is not ours.
        let other = Daemon {
            marker: "something else".into(),
            ..daemon.clone()
        };
        assert_eq!(other.running(), None);
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
        std::fs::write(&daemon.pid_file, "999999999\n").expect("write");
        assert_eq!(daemon.running(), None);
    }
}
