//! Starting and stopping the benches' clusters of real daemons: what
//! `flyfs bench storage`, `kv` and `chaos` share, so that each keeps only
//! its own choices (which daemons, their settings, network namespaces).
//!
//! A run lives in a fresh directory of its own ([`run_dir`]): device files
//! formatted by `flyfs format`, a TOML config per daemon, the cluster's CA
//! and credentials under `tls/`, and the daemons' logs. The daemons are
//! this very executable under flyfs-deploy's supervisor; its [`Fleet`]
//! kills every daemon still running when dropped, so an error or a panic
//! leaves no process behind. The directory is removed after a clean run
//! unless `FLYFS_BENCH_KEEP` is set ([`remove_run_dir`]);
//! `FLYFS_DAEMON_LOG` is the daemons' log filter (default `info`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use flyfs_client::mgmt::{Managers, fetch_routing};
use flyfs_deploy::config::ConfigFile;
use flyfs_deploy::supervisor::{self, Daemon, Fleet};
use flyfs_proto::ids::{ChainId, NodeId, RoutingVersion, TargetId};
use flyfs_proto::wire::mgmt::{
    CreateChain, CreateChainReq, CreateTarget, CreateTargetReq, RoutingInfo,
};
use flyfs_rpc::{CallOptions, Client, ClusterCa, Credentials, Tcp};

use crate::storage::mutate;

/// Makes `base/NAME-PID` afresh (a stale one of an earlier run with the
/// same process id is removed first).
pub(crate) fn run_dir(base: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = base.join(format!("{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing a stale {}", dir.display()))?;
    }
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Removes a finished run's directory, unless `FLYFS_BENCH_KEEP` asks to
/// keep it.
pub(crate) fn remove_run_dir(dir: &Path) -> anyhow::Result<()> {
    if std::env::var_os("FLYFS_BENCH_KEEP").is_none() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// A free TCP port on loopback, for a daemon whose address must be known
/// before it starts (the manager, named in every other config).
pub(crate) fn free_port(what: &str) -> anyhow::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .with_context(|| format!("finding a free port for {what}"))
}

/// One run's directory, executable and daemons.
#[derive(Debug)]
pub(crate) struct Launcher {
    pub(crate) dir: PathBuf,
    /// This executable: the daemons, `flyfs format` and `flyfs admin`.
    pub(crate) exe: PathBuf,
    fleet: Fleet,
}

impl Launcher {
    pub(crate) fn new(dir: PathBuf) -> anyhow::Result<Launcher> {
        let exe = std::env::current_exe().context("finding the flyfs executable")?;
        Ok(Launcher {
            dir,
            exe,
            fleet: Fleet::new(),
        })
    }

    pub(crate) fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// The run's CA (made on first use), named `cluster` in its certificate.
    pub(crate) fn ca(&self, cluster: &str) -> anyhow::Result<ClusterCa> {
        Ok(ClusterCa::load_or_init(&self.tls_dir(), cluster)?)
    }

    /// The credentials issued under the name `stem`.
    pub(crate) fn credentials(&self, stem: &str) -> anyhow::Result<Credentials> {
        Ok(Credentials::load_dir(&self.tls_dir(), stem)?)
    }

    /// An admin RPC client with the run's `admin` credentials.
    pub(crate) fn admin_rpc(&self) -> anyhow::Result<Client<Tcp>> {
        Ok(Client::new(
            Tcp,
            flyfs_rpc::ClientConfig::default(),
            self.credentials("admin")?,
        ))
    }

    /// `flyfs format` of a device file of `size_bytes` bytes.
    pub(crate) fn format(
        &self,
        device: &Path,
        size_bytes: u64,
        chunk_size_max: u64,
    ) -> anyhow::Result<()> {
        let out = Command::new(&self.exe)
            .args(["format", "--device"])
            .arg(device)
            .args(["--size", &size_bytes.to_string()])
            .args(["--chunk-size-max", &chunk_size_max.to_string()])
            .output()
            .context("running flyfs format")?;
        ensure!(
            out.status.success(),
            "flyfs format --device {}: {}",
            device.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Writes `NAME.toml` in the run's directory; gives its path.
    pub(crate) fn write_config(
        &self,
        name: &str,
        config: &impl ConfigFile,
    ) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, config.to_toml())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// How daemon `name` runs: `flyfs SUBCOMMAND` on `config`, logging to
    /// the run's directory at `FLYFS_DAEMON_LOG`'s level.
    pub(crate) fn daemon(&self, name: &str, subcommand: &str, config: &Path) -> Daemon {
        let mut daemon = Daemon::flyfs(name, &self.exe, subcommand, config, &self.dir, &self.dir);
        daemon.env.push((
            "FLYFS_LOG".into(),
            std::env::var("FLYFS_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
        ));
        daemon
    }

    pub(crate) fn start(&mut self, daemon: Daemon) -> anyhow::Result<()> {
        Ok(self.fleet.start(daemon)?)
    }

    /// SIGKILL to daemon `name`.
    pub(crate) fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        Ok(self.fleet.kill(name)?)
    }

    /// SIGKILL to every daemon still running.
    pub(crate) fn kill_all(&mut self) {
        self.fleet.kill_all();
    }

    /// Process ids by daemon name.
    pub(crate) fn pids(&self) -> Vec<(String, u32)> {
        self.fleet.pids()
    }

    /// Fails naming the first daemon that is no longer running.
    pub(crate) fn ensure_alive(&self, what: &str) -> anyhow::Result<()> {
        for (name, pid) in self.pids() {
            ensure!(
                supervisor::alive(pid),
                "{name} (pid {pid}) exited while waiting for {what}"
            );
        }
        Ok(())
    }

    /// SIGTERM to every daemon, lowest `rank` first, SIGKILL to any still
    /// running `grace` later. Fails if a daemon did not exit cleanly.
    pub(crate) fn stop(
        &mut self,
        grace: Duration,
        rank: impl Fn(&str) -> u32,
    ) -> anyhow::Result<()> {
        let ended = self.fleet.terminate_all(grace, rank)?;
        let problems: Vec<String> = ended
            .into_iter()
            .filter_map(|(name, status)| match status {
                Some(status) if status.success() => None,
                Some(status) => Some(format!("{name} exited with {status}")),
                None => Some(format!("{name} did not exit on SIGTERM; killed")),
            })
            .collect();
        ensure!(
            problems.is_empty(),
            "stopping the cluster: {}",
            problems.join("; ")
        );
        Ok(())
    }

    /// The last lines of every daemon's log, on stderr.
    pub(crate) fn print_logs(&self) {
        self.fleet.print_logs(20);
    }

    /// Polls the manager at `mgmt` for the routing until `done` holds, for
    /// `limit` at most; fails at once when a daemon died, since what it
    /// should have done then never comes.
    pub(crate) async fn wait_for(
        &self,
        rpc: &Client<Tcp>,
        mgmt: &str,
        what: &str,
        limit: Duration,
        done: impl Fn(&RoutingInfo) -> bool,
    ) -> anyhow::Result<()> {
        self.wait_steady(rpc, mgmt, what, limit, Duration::ZERO, done)
            .await
    }

    /// As `wait_for`, but `done` must hold on every routing fetched for a
    /// whole `steady` in a row (the manager's view lags the faults by up to
    /// its failure timeout).
    pub(crate) async fn wait_steady(
        &self,
        rpc: &Client<Tcp>,
        mgmt: &str,
        what: &str,
        limit: Duration,
        steady: Duration,
        done: impl Fn(&RoutingInfo) -> bool,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        let managers = Managers::new([mgmt.to_owned()]);
        let mut held_since: Option<Instant> = None;
        loop {
            let options = CallOptions::default();
            // None: `done` holds on this routing; otherwise why not.
            let missing = match fetch_routing(rpc, &managers, RoutingVersion(0), &options).await {
                Ok(Some(routing)) if done(&routing) => None,
                Ok(Some(routing)) => Some(describe(&routing)),
                Ok(None) => Some("the manager sent no routing".to_owned()),
                Err(error) => Some(format!("{error}")),
            };
            if missing.is_some() {
                held_since = None;
            } else if held_since.get_or_insert_with(Instant::now).elapsed() >= steady {
                return Ok(());
            }
            let last =
                missing.unwrap_or_else(|| format!("it holds, not yet for {steady:.1?} in a row"));
            self.ensure_alive(what)?;
            if start.elapsed() > limit {
                bail!(
                    "gave up after {:.1?} waiting for {what}: {last}",
                    start.elapsed()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Creates chain `c + 1` for each `chains[c]`, the nodes of its replicas
/// from head to tail, with target `chain * 100 + node` on each node's
/// disk 0.
pub(crate) async fn create_chains(
    rpc: &Client<Tcp>,
    mgmt: &str,
    chains: &[Vec<u32>],
) -> anyhow::Result<()> {
    for (c, nodes) in chains.iter().enumerate() {
        let chain = u32::try_from(c + 1).context("too many chains")?;
        let targets: Vec<TargetId> = nodes
            .iter()
            .map(|&node| TargetId(u64::from(chain) * 100 + u64::from(node)))
            .collect();
        for (&target, &node) in targets.iter().zip(nodes) {
            let req = CreateTargetReq {
                target,
                node: NodeId(node),
                disk: 0,
            };
            mutate::<CreateTarget>(rpc, mgmt, &req).await?;
        }
        let req = CreateChainReq {
            chain: ChainId(chain),
            targets,
        };
        mutate::<CreateChain>(rpc, mgmt, &req).await?;
    }
    Ok(())
}

/// Each chain's targets and states, for a message.
fn describe(routing: &RoutingInfo) -> String {
    let chains: Vec<String> = routing
        .chains
        .iter()
        .map(|c| {
            let targets: Vec<String> = c
                .targets
                .iter()
                .map(|t| format!("{}:{}", t.target.0, t.state))
                .collect();
            format!("chain {} [{}]", c.id.0, targets.join(" "))
        })
        .collect();
    format!(
        "routing version {}: {}",
        routing.version.0,
        chains.join(", ")
    )
}
