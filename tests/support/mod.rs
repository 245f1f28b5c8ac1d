//! The harness of the multi-process tests: runs real `flyfs` daemons
//! (`mgmtd`, `storage`, `meta`) on loopback, each with its config file and
//! log in one temporary directory, drives them with `flyfs admin`, and
//! kills every one still running when the test ends (printing their logs
//! when it failed). Every process authenticates: the test directory has a
//! CA of its own and credentials per principal under `tls/`.
//!
//! Each test binary that says `mod support;` compiles its own copy and uses
//! only part of it, hence the `dead_code` allowance below.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flyfs_deploy::config::{
    ConfigFile, ManagerAddrs, MetaDaemonConfig, MgmtdConfig, StorageDaemonConfig, StoreConfig,
    TlsConfig,
};
use flyfs_deploy::supervisor::{Daemon, Fleet};
use flyfs_proto::auth::Principal;
use flyfs_proto::ids::NodeId;
use flyfs_proto::ids::RoutingVersion;
use flyfs_proto::wire::mgmt::{GetRouting, GetRoutingReq, PublicState, RoutingInfo};
use flyfs_rpc::{CallOptions, Client, Tcp};
use flyfs_rpc::{ClusterCa, Credentials};

/// The `flyfs` binary this test package built.
pub fn flyfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flyfs"))
}

/// A finished command's status and output, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Distinct loopback ports, found by binding port 0 and letting go. All are
/// held until every one is chosen, so they differ from each other.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Ranges of 16 ports from 20000 up to 32768, where Linux's ephemeral ports
/// begin: a range there can be taken between the check below and the
/// daemon's bind by any other test's outgoing connection.
const PORT_SLOTS: u32 = 798;

/// A base port with the 16 ports after it all free, for `flyfs up --port`.
/// Each test binary passes its own `multiplier`, `step` and `offset`, so
/// that binaries running at once search different places.
pub fn free_port_base(multiplier: u32, step: u32, offset: u32) -> u16 {
    for attempt in 0..200u32 {
        let slot = std::process::id()
            .wrapping_mul(multiplier)
            .wrapping_add(attempt * step + offset)
            % PORT_SLOTS;
        let base = 20_000 + slot as u16 * 16;
        if (0..16).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no free range of 16 ports");
}

/// A cluster that `flyfs up` starts in `data` (with the mount at `mount`,
/// or none): dropping it runs `flyfs down` and detaches the mount if it is
/// still there, whether the test passed or not. On panic it prints what
/// `flyfs down` said and the last lines of the log `log` (e.g. `meta.log`).
pub struct UpCluster {
    pub data: PathBuf,
    pub mount: Option<PathBuf>,
    test: &'static str,
    log: &'static str,
}

impl UpCluster {
    /// Nothing runs yet: made before `flyfs up` so that a start that fails
    /// halfway is stopped too.
    pub fn new(
        test: &'static str,
        data: PathBuf,
        mount: Option<PathBuf>,
        log: &'static str,
    ) -> Self {
        UpCluster {
            data,
            mount,
            test,
            log,
        }
    }

    /// `flyfs up` on ports from `port` with devices of `device_size`
    /// (two minutes at most), asserting it succeeded.
    pub fn start(&self, port: u16, device_size: &str) {
        self.start_with(port, device_size, &[]);
    }

    /// [`start`](Self::start) with more arguments to `flyfs up`.
    pub fn start_with(&self, port: u16, device_size: &str, more: &[&str]) {
        let started = Instant::now();
        let mut up = flyfs();
        up.args(["up", "--data"]).arg(&self.data);
        match &self.mount {
            Some(mount) => up.arg("--mount").arg(mount),
            None => up.arg("--no-mount"),
        };
        let out = up
            .args(["--port", &port.to_string()])
            .args(["--device-size", device_size, "--timeout", "120"])
            .args(more)
            .output()
            .expect("run flyfs up");
        assert!(out.status.success(), "flyfs up: {}", text(&out));
        eprintln!(
            "{}: flyfs up in {:.1} s",
            self.test,
            started.elapsed().as_secs_f64()
        );
    }
}

impl UpCluster {
    /// [`start_with`](Self::start_with) on the guest's Soft-RoCE device:
    /// every daemon and the mount on `--transport rdma`.
    pub fn start_on_rdma(&self, port: u16, device_size: &str) {
        let device = guest_env("FLYFS_RXE_DEV");
        let gid_index = guest_env("FLYFS_RXE_GID_INDEX");
        self.start_with(
            port,
            device_size,
            &[
                "--transport",
                "rdma",
                "--rdma-device",
                &device,
                "--rdma-gid-index",
                &gid_index,
            ],
        );
    }
}

impl Drop for UpCluster {
    fn drop(&mut self) {
        let down = flyfs()
            .args(["down", "--timeout", "10", "--data"])
            .arg(&self.data)
            .output();
        if std::thread::panicking() {
            if let Ok(out) = &down {
                eprintln!("{}: flyfs down: {}", self.test, text(out));
            }
            let log =
                std::fs::read_to_string(self.data.join("log").join(self.log)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "---- last lines of {} ----\n{}",
                self.log,
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        if let Some(mount) = &self.mount {
            use flyfs_fuse::mountpoint::{lazy_unmount, mounted_at};
            if mounted_at(mount).ok().flatten().is_some() {
                let _ = lazy_unmount(mount);
            }
        }
    }
}

/// `len` bytes of a xorshift sequence seeded by `seed`: content no two
/// offsets of a file share by accident.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// `count` completions of native I/O ring `ior`, waiting at most two
/// minutes for each batch of them.
pub fn wait_all(ior: &mut flyfs_usrbio::Ior, count: usize) -> Vec<flyfs_usrbio::Completion> {
    let mut out = Vec::new();
    while out.len() < count {
        let want = count - out.len();
        ior.wait(&mut out, want, Some(Duration::from_secs(120)))
            .expect("completions");
    }
    out
}

/// A variable the QEMU guest sets (scripts/test-guest, scripts/guest-run):
/// a guest test fails, never skips, without it.
pub fn guest_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this test in the guest (scripts/test-guest)")
    })
}

/// A directory for a guest test's cluster in `FLYFS_TEST_DIR` (ext4: the
/// daemons open their device files with O_DIRECT, which the guest's tmpfs
/// refuses), readable by everyone, as `flyfs up`'s mount needs.
pub fn guest_dir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(guest_env("FLYFS_TEST_DIR"))
        .expect("a directory on the guest's ext4");
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).expect("chmod");
    dir
}

/// `GET /metrics` on `addr`.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    answer
}

/// Whether this machine can run the io_uring backend; `Err` says why not.
pub fn probe_io_uring(dir: &Path) -> Result<(), String> {
    use flyfs_bypass::uring::{UringConfig, UringDevice};
    let path = dir.join("probe.img");
    let result = UringDevice::create_file(&path, 1 << 20, &UringConfig::default(), None)
        .map(drop)
        .map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&path);
    result
}

/// Formats `disk{node}.img` in `dir` for each of `nodes` storage nodes.
pub fn format_devices(dir: &Path, nodes: u32, size: &str) {
    for node in 1..=nodes {
        let out = flyfs()
            .args(["format", "--device"])
            .arg(dir.join(format!("disk{node}.img")))
            .args(["--size", size, "--chunk-size-max", "1MiB"])
            .output()
            .expect("run flyfs format");
        assert!(out.status.success(), "format: {}", text(&out));
    }
}

/// The credentials `dir/tls/{stem}.*` (issued on first use from the test
/// directory's CA): `mgmtd`, `storage{n}`, `admin` (root), `client`, and
/// any other stem is a metadata service's.
pub fn tls(dir: &Path, stem: &str) -> Option<TlsConfig> {
    let tls_dir = dir.join("tls");
    let ca = ClusterCa::load_or_init(&tls_dir, "test").expect("the test CA");
    let principal = match stem {
        "mgmtd" => Principal::Mgmt(stem.into()),
        "admin" => Principal::Admin {
            name: stem.into(),
            uid: 0,
            gid: 0,
        },
        "client" => Principal::Client(stem.into()),
        _ => match stem.strip_prefix("storage").and_then(|n| n.parse().ok()) {
            Some(node) => Principal::Storage(NodeId(node)),
            None => Principal::Meta(stem.into()),
        },
    };
    ca.ensure_credentials(principal, &tls_dir, stem)
        .expect("issue test credentials");
    Some(TlsConfig::in_dir(&tls_dir, stem))
}

/// The loaded credentials `dir/tls/{stem}.*` (see [`tls`]).
pub fn credentials(dir: &Path, stem: &str) -> Credentials {
    tls(dir, stem);
    Credentials::load_dir(&dir.join("tls"), stem).expect("load test credentials")
}

/// `mgmtd.toml` and `storage{n}.toml` (n from 1) in `dir`, with fast
/// heartbeats and failure detection.
pub fn write_configs(dir: &Path, mgmt_port: u16, node_ports: &[u16]) {
    let mgmt_addr = format!("127.0.0.1:{mgmt_port}");
    let mut mgmtd = MgmtdConfig::new("mgmtd-data");
    mgmtd.listen = mgmt_addr.clone();
    mgmtd.heartbeat_interval_ms = 100;
    mgmtd.failure_timeout_ms = 1000;
    mgmtd.tick_interval_ms = 100;
    mgmtd.store = StoreConfig::Fjall { path: None };
    mgmtd.tls = tls(dir, "mgmtd");
    std::fs::write(dir.join("mgmtd.toml"), mgmtd.to_toml()).expect("write mgmtd.toml");
    for (node, port) in (1..).zip(node_ports) {
        let mut storage =
            StorageDaemonConfig::new(node, vec![PathBuf::from(format!("disk{node}.img"))]);
        storage.listen = format!("127.0.0.1:{port}");
        storage.mgmt = ManagerAddrs::one(mgmt_addr.clone());
        storage.heartbeat_interval_ms = 100;
        storage.lease_timeout_ms = 500;
        storage.rpc_timeout_ms = 500;
        storage.forward_deadline_ms = 10000;
        storage.tls = tls(dir, &format!("storage{node}"));
        std::fs::write(dir.join(format!("storage{node}.toml")), storage.to_toml())
            .expect("write storage.toml");
    }
}

/// `{name}.toml` for a metadata service listening on `port`, its store in
/// `{name}-data`; `adjust` sets more keys (layout, GC pacing).
pub fn write_meta_config(
    dir: &Path,
    name: &str,
    port: u16,
    mgmt_addr: &str,
    adjust: impl FnOnce(&mut MetaDaemonConfig),
) {
    let mut meta = MetaDaemonConfig::new(format!("{name}-data"));
    meta.listen = format!("127.0.0.1:{port}");
    meta.mgmt = ManagerAddrs::one(mgmt_addr);
    meta.tls = tls(dir, name);
    adjust(&mut meta);
    std::fs::write(dir.join(format!("{name}.toml")), meta.to_toml()).expect("write meta.toml");
}

/// Polls `done` every 50 ms until it holds or `limit` passes.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Whether every node is alive and every member of every chain serves.
pub fn all_serving(routing: &RoutingInfo) -> bool {
    !routing.chains.is_empty()
        && routing.nodes.iter().all(|n| n.alive)
        && routing
            .chains
            .iter()
            .all(|c| c.targets.iter().all(|t| t.state == PublicState::Serving))
}

/// The manager's routing information, over RPC.
pub async fn routing(rpc: &Client<Tcp>, mgmt: &str) -> Result<RoutingInfo, String> {
    let req = GetRoutingReq {
        known_version: RoutingVersion(0),
    };
    let (rsp, _) = rpc
        .call::<GetRouting>(mgmt, &req, Bytes::new(), &CallOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    rsp.routing.ok_or_else(|| "no routing".to_string())
}

/// The id of chain `chain`'s target on storage node `node`.
pub fn target_id(chain: u32, node: u32) -> u64 {
    u64::from(chain) * 100 + u64::from(node)
}

/// The daemons of one test cluster, by name ("mgmtd", "storage1", "meta"):
/// daemon `name` reads `{name}.toml` and logs to `{name}.log` in `dir`.
/// They run under flyfs-deploy's supervisor: every one still running is
/// killed when this is dropped (also on panic), and on panic the logs of
/// every daemon ever started are printed.
pub struct Cluster {
    pub dir: PathBuf,
    pub mgmt_addr: String,
    pub node_addrs: BTreeMap<u32, String>,
    fleet: Fleet,
}

impl Cluster {
    /// A cluster with no daemon running yet; storage node `n` listens on
    /// `node_addrs[n - 1]`.
    pub fn new(dir: &Path, mgmt_addr: String, node_addrs: Vec<String>) -> Cluster {
        Cluster {
            dir: dir.to_path_buf(),
            mgmt_addr,
            node_addrs: (1..).zip(node_addrs).collect(),
            fleet: Fleet::new(),
        }
    }

    /// Formats devices of `device_size` and writes the configs of a manager
    /// and `nodes` storage nodes ([`write_configs`]) on free loopback
    /// ports; starts nothing, so a test may still change a config.
    pub fn configure(dir: &Path, nodes: u32, device_size: &str) -> Cluster {
        format_devices(dir, nodes, device_size);
        let ports = free_ports(1 + nodes as usize);
        write_configs(dir, ports[0], &ports[1..]);
        let loopback = |port: &u16| format!("127.0.0.1:{port}");
        Cluster::new(
            dir,
            loopback(&ports[0]),
            ports[1..].iter().map(loopback).collect(),
        )
    }

    /// Starts the manager and storage nodes `1..=nodes` and waits (for
    /// `limit` at most) until the manager holds them all alive; returns how
    /// long that wait took.
    pub fn start_manager_and_storage(&mut self, nodes: u32, limit: Duration) -> Duration {
        self.start_mgmtd();
        for node in 1..=nodes {
            self.start_storage(node);
        }
        self.wait_nodes_alive(nodes as usize, limit)
    }

    /// Starts `flyfs SUBCOMMAND --config {name}.toml` as daemon `name`.
    pub fn start(&mut self, name: &str, subcommand: &str) {
        let program = PathBuf::from(env!("CARGO_BIN_EXE_flyfs"));
        let config = self.dir.join(format!("{name}.toml"));
        let mut daemon = Daemon::flyfs(name, &program, subcommand, &config, &self.dir, &self.dir);
        daemon.env.push(("FLYFS_LOG".into(), "info".into()));
        self.fleet.start(daemon).expect("spawn a daemon");
    }

    pub fn start_mgmtd(&mut self) {
        self.start("mgmtd", "mgmtd");
    }

    pub fn start_storage(&mut self, node: u32) {
        self.start(&format!("storage{node}"), "storage");
    }

    /// A metadata service, configured by [`write_meta_config`].
    pub fn start_meta(&mut self, name: &str) {
        self.start(name, "meta");
    }

    /// The pid of daemon `name`, if it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.fleet
            .pids()
            .into_iter()
            .find_map(|(running, pid)| (running == name).then_some(pid))
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self, name: &str) {
        self.fleet.kill(name).expect("SIGKILL a running daemon");
    }

    pub fn kill_storage(&mut self, node: u32) {
        self.kill(&format!("storage{node}"));
    }

    /// SIGTERMs daemon `name` and asserts it exits 0 within `within`.
    pub fn terminate(&mut self, name: &str, within: Duration) {
        let exit = self.fleet.terminate(name, within).expect("terminate");
        let exit =
            exit.unwrap_or_else(|| panic!("{name} did not exit within {within:?} of SIGTERM"));
        assert!(exit.success(), "{name} exited with {exit} after SIGTERM");
    }

    /// SIGTERMs every daemon and asserts each exits 0 within `within`:
    /// metadata services first, then storage nodes, and the manager last,
    /// so that no daemon loses the manager before it stops.
    pub fn terminate_all(&mut self, within: Duration) {
        let rank = |name: &str| match name {
            "mgmtd" => 2,
            n if n.starts_with("storage") => 1,
            _ => 0,
        };
        for (name, exit) in self.fleet.terminate_all(within, rank).expect("terminate") {
            let exit =
                exit.unwrap_or_else(|| panic!("{name} did not exit within {within:?} of SIGTERM"));
            assert!(exit.success(), "{name} exited with {exit} after SIGTERM");
        }
    }

    /// Runs `flyfs admin --mgmt ADDR --credentials DIR/tls ARGS`.
    pub fn admin(&self, args: &[&str]) -> Output {
        tls(&self.dir, "admin");
        flyfs()
            .args(["admin", "--mgmt", &self.mgmt_addr, "--credentials"])
            .arg(self.dir.join("tls"))
            .args(args)
            .output()
            .expect("run flyfs admin")
    }

    pub fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        assert!(out.status.success(), "admin {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self.admin(&["--json", "status"]);
        if !out.status.success() {
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("status is JSON"))
    }

    /// Waits until the manager reports `nodes` storage nodes, all alive.
    pub fn wait_nodes_alive(&self, nodes: usize, limit: Duration) -> Duration {
        wait_for(&format!("{nodes} live storage nodes"), limit, || {
            self.status().is_some_and(|s| {
                s["nodes"]
                    .as_array()
                    .is_some_and(|n| n.len() == nodes && n.iter().all(|n| n["alive"] == true))
            })
        })
    }

    /// Creates a target on each of `nodes` storage nodes for each of
    /// `chains`, and the chains: chain `c` is headed by node `c` (wrapping),
    /// its order `c, c + 1, ...`, so that the heads differ.
    pub fn create_chains(&self, chains: &[u32], nodes: u32) {
        for &chain in chains {
            let order: Vec<u32> = (0..nodes).map(|r| (chain - 1 + r) % nodes + 1).collect();
            for &node in &order {
                self.admin_ok(&[
                    "create-target",
                    "--target",
                    &target_id(chain, node).to_string(),
                    "--node",
                    &node.to_string(),
                    "--disk",
                    "0",
                ]);
            }
            let targets: Vec<String> = order
                .iter()
                .map(|&n| target_id(chain, n).to_string())
                .collect();
            self.admin_ok(&[
                "create-chain",
                "--chain",
                &chain.to_string(),
                "--targets",
                &targets.join(","),
            ]);
        }
    }

    /// Waits until every member of every chain serves, as `flyfs admin
    /// status` reports it.
    pub fn wait_all_serving(&self, limit: Duration) -> Duration {
        wait_for("the chains to serve", limit, || {
            self.status()
                .and_then(|s| serde_json::from_value::<RoutingInfo>(s).ok())
                .is_some_and(|r| all_serving(&r))
        })
    }
}
