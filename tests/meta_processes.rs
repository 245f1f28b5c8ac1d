//! A crash test of the metadata service, all in real processes on loopback:
//! `flyfs mgmtd`, three `flyfs storage` daemons on io_uring device files
//! (three 3-replica chains in chain table 1) and one `flyfs meta` on its
//! embedded store. Tasks of this process run a namespace workload through
//! the metadata client (create, write chunks to storage, close, rename
//! across directories and onto existing files, unlink, remove whole
//! trees), while the metadata daemon is SIGKILLed once and restarted on
//! the same store. Before that, the daemon is started and SIGKILLed again
//! 30 times in quick succession, and must serve a create each time the
//! moment it listens.
//!
//! What must hold, after the workload stops and the GC queue drains:
//! - the workload saw no error but the answers a retried call gets when an
//!   attempt whose reply was lost had been applied (explained at
//!   [`Task::lost_reply`]);
//! - every chunk on storage belongs to a file linked in the namespace, on
//!   the chain its layout names, and is one the workload wrote (none
//!   orphaned); no removed file has a chunk left; every replica of a chain
//!   holds the same chunks;
//! - every file the workload left linked is there with its chunks and the
//!   length its close fixed (GC took nothing live);
//! - the daemon exits 0 on SIGTERM, and an fsck of its store (`check`) is
//!   clean: no cycles, no orphans, link counts right, every entry names a
//!   live inode, nothing queued; the namespace holds exactly the files the
//!   workload expects.
//!
//! Skips (with a message) on a machine without io_uring.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_fs_meta::ns::{InodeKind, LayoutSpec, Namespace, NsConfig, StaticChainTables};
use flyfs_fs_meta::schema::ROOT;
use flyfs_kv::fjall::{FjallKv, FjallOptions};
use flyfs_proto::Method;
use flyfs_proto::ids::{ChainId, ChainTableId, ChunkId, ClientId, InodeId, TargetId};
use flyfs_proto::wire::meta::{self as wire, MetaError, User};
use flyfs_proto::wire::storage::{DumpMeta, DumpMetaReq};
use flyfs_rpc::{CallOptions, Client, Tcp};
use flyfs_time::Backoff;
use support::{
    Cluster, all_serving, format_devices, free_ports, probe_io_uring, routing, wait_for,
    write_configs, write_meta_config,
};

const NODES: u32 = 3;
const CHAINS: [u32; 3] = [1, 2, 3];
const CHUNK_BYTES: u32 = 64 << 10;
/// Chains per file: a file of two chunks or more spans two chains.
const STRIPE: u32 = 2;
const META: &str = "meta";
const GC_DELAY_MS: u64 = 300;
const TASKS: u32 = 4;
/// How long the workload runs in all, when in it the metadata daemon is
/// killed, and how long it stays down.
const WORKLOAD: Duration = Duration::from_secs(5);
const KILL_AT: Duration = Duration::from_secs(2);
const DOWN_FOR: Duration = Duration::from_millis(700);
/// Quick restarts before the workload (see [`restarts`]).
const RESTARTS: u32 = 30;
/// Linked files a task keeps before it prefers removing one to creating.
const LIVE_MAX: usize = 24;
/// Bytes written to one chunk at most: small, to spare the shared CPUs.
const CHUNK_DATA_MAX: u64 = 16 << 10;
/// A task's pace: at most one step (one operation) per interval, so that
/// a fast machine does not create more files than below. A step creates
/// 0.7 files on average (a tree 1 to 4), so some 300 in the workload.
const STEP_INTERVAL: Duration = Duration::from_micros(11_500);
/// Files a task creates at most. Every device holds a replica of every
/// chunk, and without GC (a broken one) 4 tasks x 300 files x at most 3
/// chunks of 64 KiB stay below the ~4000 chunks a 256 MiB device holds, so
/// that a broken GC shows as orphans, not as a full device.
const CREATES_MAX: u64 = 300;
const DEVICE_SIZE: &str = "256MiB";

/// Whether the metadata service answered the errno of `kind`.
fn is(e: &MetaError, kind: ErrorKind) -> bool {
    std::io::Error::from_raw_os_error(e.errno).kind() == kind
}

/// A file the workload created, wrote and closed.
#[derive(Clone, Debug)]
struct Written {
    /// Where it was last linked, for messages.
    path: String,
    /// The chunk indices written (each at offset 0).
    chunks: Vec<u32>,
    /// The length its close fixed: the end of the last chunk's data.
    length: u64,
    layout: wire::Layout,
}

/// A file in one of a task's two directories, which it may rename or unlink.
#[derive(Clone, Debug)]
struct Linked {
    dir: usize,
    name: String,
    ino: InodeId,
    written: Written,
}

/// What one task leaves behind.
#[derive(Debug, Default)]
struct Outcome {
    /// Files that must be linked at the end.
    live: BTreeMap<InodeId, Written>,
    /// Files removed (unlinked, renamed over, or in a removed tree).
    removed: BTreeMap<InodeId, Written>,
    creates: u64,
    renames: u64,
    unlinks: u64,
    trees: u64,
}

/// What the tasks share with the test.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    errors: Mutex<Vec<String>>,
    /// Answers that showed an earlier attempt of the call had been applied.
    lost_replies: Mutex<Vec<String>>,
    /// Calls that took longer than half the downtime: they waited out the
    /// restart inside the client's retries.
    slow_calls: AtomicU64,
    calls: AtomicU64,
}

impl Shared {
    fn fail(&self, error: String) {
        eprintln!("workload error: {error}");
        self.errors.lock().expect("errors lock").push(error);
    }
}

/// One workload task: its own directory `/t{id}` with subdirectories `a`
/// and `b`, so that its model of them is exact.
struct Task {
    id: u32,
    meta: Arc<MetaClient<Tcp>>,
    storage: Arc<StorageClient<Tcp>>,
    shared: Arc<Shared>,
    rng: u64,
    names: u64,
    /// When the workload started.
    started: Instant,
    home: InodeId,
    dirs: [InodeId; 2],
    linked: Vec<Linked>,
    outcome: Outcome,
}

const DIR_NAMES: [&str; 2] = ["a", "b"];

impl Task {
    fn rand(&mut self, below: u64) -> u64 {
        // xorshift64: cheap and seeded per task.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % below
    }

    /// A name this task has never used.
    fn fresh(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}{}", self.names)
    }

    fn client(&self) -> ClientId {
        ClientId(0x100 + u64::from(self.id))
    }

    fn dir_path(&self, dir: usize) -> String {
        format!("/t{}/{}", self.id, DIR_NAMES[dir])
    }

    async fn call<M, T>(&self, req: &M::Req) -> Result<T, MetaError>
    where
        M: Method<Rsp = Result<T, MetaError>>,
    {
        let start = Instant::now();
        let result = self.meta.call::<M, T>(req).await;
        self.shared.calls.fetch_add(1, Ordering::Relaxed);
        if start.elapsed() > DOWN_FOR / 2 {
            self.shared.slow_calls.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Notes an answer that only a lost reply explains. The client retries
    /// a call whose attempt failed without an answer (the daemon was killed,
    /// the connection dropped), but the killed daemon may have committed
    /// that attempt before it died: the retry then meets the call's own
    /// effect, as NFS clients do. So ENOENT for an unlink, rename or remove
    /// of an entry this task made and has not removed means "already done",
    /// and the caller checks that the namespace agrees. Nothing else in
    /// these directories can cause it: no other task touches them. (Creates
    /// need no such excuse: they name their session, and a retry finds it.)
    fn lost_reply(&self, what: String) {
        eprintln!("task {}: {what}: applied by an earlier attempt", self.id);
        self.shared
            .lost_replies
            .lock()
            .expect("lost replies lock")
            .push(what);
    }

    async fn lookup(&self, parent: InodeId, name: &str) -> Result<wire::Attr, MetaError> {
        self.call::<wire::Lookup, _>(&wire::LookupReq {
            user: User::root(),
            parent,
            name: name.as_bytes().to_vec(),
        })
        .await
    }

    async fn mkdir_all(&self, path: &str) -> Result<InodeId, String> {
        // Idempotent: a retry after a lost reply answers the same.
        let attr = self
            .call::<wire::MkdirAll, _>(&wire::MkdirAllReq {
                user: User::root(),
                path: path.as_bytes().to_vec(),
                mode: 0o755,
            })
            .await
            .map_err(|e| format!("mkdir -p {path}: {e}"))?;
        Ok(attr.ino)
    }

    async fn run(mut self) -> Outcome {
        if let Err(e) = self.setup().await {
            self.shared.fail(format!("task {}: {e}", self.id));
            return self.outcome;
        }
        let mut steps = 0;
        while !self.shared.stop.load(Ordering::SeqCst) {
            steps += 1;
            tokio::time::sleep_until((self.started + STEP_INTERVAL * steps).into()).await;
            if let Err(e) = self.step().await {
                // The model of this task's directories is unknown from here.
                self.shared.fail(format!("task {}: {e}", self.id));
                return self.outcome;
            }
        }
        for file in std::mem::take(&mut self.linked) {
            self.outcome.live.insert(file.ino, file.written);
        }
        self.outcome
    }

    async fn setup(&mut self) -> Result<(), String> {
        self.home = self.mkdir_all(&format!("/t{}", self.id)).await?;
        for dir in 0..2 {
            self.dirs[dir] = self.mkdir_all(&self.dir_path(dir)).await?;
        }
        Ok(())
    }

    async fn step(&mut self) -> Result<(), String> {
        let roll = self.rand(100);
        // Rolls below 45 create a file, 92 and above a tree.
        let creates = self.linked.is_empty() || !(45..92).contains(&roll);
        // A tree creates up to 4 files. Past the budget (reached only if
        // the pacing failed), wait rather than empty the directories.
        if creates && self.outcome.creates + 4 > CREATES_MAX {
            tokio::time::sleep(Duration::from_millis(5)).await;
        } else if self.linked.is_empty() || (roll < 45 && self.linked.len() < LIVE_MAX) {
            let dir = self.rand(2) as usize;
            let parent = self.dirs[dir];
            let path = self.dir_path(dir);
            let name = self.fresh("f");
            let (ino, written) = self.create_file(parent, &path, &name).await?;
            self.linked.push(Linked {
                dir,
                name,
                ino,
                written,
            });
        } else if roll < 65 {
            self.rename().await?;
        } else if roll < 92 {
            self.unlink().await?;
        } else {
            self.tree().await?;
        }
        Ok(())
    }

    /// Creates `name` in `parent` for writing, writes 1 to 3 chunks to
    /// storage and closes it.
    async fn create_file(
        &mut self,
        parent: InodeId,
        dir_path: &str,
        name: &str,
    ) -> Result<(InodeId, Written), String> {
        let path = format!("{dir_path}/{name}");
        // The session id is ours, so a retry after a lost reply finds its
        // own session (and the file it created) instead of EEXIST.
        let session_id = (self.rand(u64::MAX) << 1) | 1;
        let req = wire::CreateReq {
            user: User::root(),
            parent,
            name: name.as_bytes().to_vec(),
            mode: 0o644,
            exclusive: true,
            read: true,
            write: true,
            client: self.client(),
            session: session_id,
            ..Default::default()
        };
        self.outcome.creates += 1;
        let opened = self
            .call::<wire::Create, _>(&req)
            .await
            .map_err(|e| format!("create {path}: {e}"))?;
        if opened.session != Some(session_id) {
            return Err(format!(
                "create {path}: session {:?}, not ours",
                opened.session
            ));
        }
        if !opened.created {
            return Err(format!("create {path}: an exclusive create opened a file"));
        }
        let attr = opened.attr;
        let session = session_id;
        let layout = attr.layout.clone().ok_or(format!("{path}: no layout"))?;
        let count = 1 + self.rand(3) as u32;
        let mut chunks = Vec::new();
        let mut last_len = 0;
        for index in 0..count {
            let len = 1 + self.rand(CHUNK_DATA_MAX) as usize;
            let chain = layout
                .chain_of(index)
                .ok_or(format!("{path}: layout without chains"))?;
            let chunk = ChunkId {
                inode: attr.ino,
                index,
            };
            let data = Bytes::from(vec![(attr.ino.0 as u8) ^ (index as u8); len]);
            self.storage
                .write(chain, chunk, 0, data, CHUNK_BYTES)
                .await
                .map_err(|e| format!("write {path} {chunk}: {e}"))?;
            chunks.push(index);
            last_len = len as u64;
        }
        let length = u64::from(count - 1) * u64::from(CHUNK_BYTES) + last_len;
        // Idempotent: a retried close of a session already gone changes
        // nothing and answers the attributes.
        let closed = self
            .call::<wire::Close, _>(&wire::SessionReq {
                user: User::root(),
                ino: attr.ino,
                session,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("close {path}: {e}"))?;
        if closed.length != length {
            return Err(format!(
                "close {path}: length {} where storage holds {length} bytes",
                closed.length
            ));
        }
        let written = Written {
            path,
            chunks,
            length,
            layout,
        };
        Ok((attr.ino, written))
    }

    /// Moves a file to the other directory, under a new name or over
    /// another file there (which is removed).
    async fn rename(&mut self) -> Result<(), String> {
        let moved = self.rand(self.linked.len() as u64) as usize;
        let to_dir = 1 - self.linked[moved].dir;
        let in_target: Vec<usize> = (0..self.linked.len())
            .filter(|&i| self.linked[i].dir == to_dir)
            .collect();
        let over = if !in_target.is_empty() && self.rand(3) == 0 {
            Some(in_target[self.rand(in_target.len() as u64) as usize])
        } else {
            None
        };
        let new_name = match over {
            Some(i) => self.linked[i].name.clone(),
            None => self.fresh("r"),
        };
        let file = self.linked[moved].clone();
        let from = format!("{}/{}", self.dir_path(file.dir), file.name);
        let to = format!("{}/{new_name}", self.dir_path(to_dir));
        self.outcome.renames += 1;
        let req = wire::RenameReq {
            user: User::root(),
            old_parent: self.dirs[file.dir],
            old_name: file.name.as_bytes().to_vec(),
            new_parent: self.dirs[to_dir],
            new_name: new_name.as_bytes().to_vec(),
        };
        match self.call::<wire::Rename, _>(&req).await {
            Ok(()) => {}
            Err(e) if is(&e, ErrorKind::NotFound) => {
                let found = self.lookup(self.dirs[to_dir], &new_name).await;
                if found.as_ref().map(|a| a.ino).ok() != Some(file.ino) {
                    return Err(format!(
                        "rename {from} -> {to}: ENOENT, and {to} is {found:?}, not {:?}",
                        file.ino
                    ));
                }
                self.lost_reply(format!("rename {from} -> {to}"));
            }
            Err(e) => return Err(format!("rename {from} -> {to}: {e}")),
        }
        if let Some(i) = over {
            let gone = self.linked.remove(i);
            self.outcome.removed.insert(gone.ino, gone.written);
        }
        let at = self
            .linked
            .iter()
            .position(|l| l.ino == file.ino)
            .expect("the moved file is linked");
        let linked = &mut self.linked[at];
        linked.dir = to_dir;
        linked.name = new_name;
        linked.written.path = to;
        Ok(())
    }

    async fn unlink(&mut self) -> Result<(), String> {
        let at = self.rand(self.linked.len() as u64) as usize;
        let file = self.linked.remove(at);
        let path = format!("{}/{}", self.dir_path(file.dir), file.name);
        self.outcome.unlinks += 1;
        let req = wire::EntryReq {
            user: User::root(),
            parent: self.dirs[file.dir],
            name: file.name.as_bytes().to_vec(),
        };
        match self.call::<wire::Unlink, _>(&req).await {
            Ok(()) => {}
            Err(e) if is(&e, ErrorKind::NotFound) => {
                self.expect_gone(self.dirs[file.dir], &file.name, &path)
                    .await?;
                self.lost_reply(format!("unlink {path}"));
            }
            Err(e) => return Err(format!("unlink {path}: {e}")),
        }
        self.outcome.removed.insert(file.ino, file.written);
        Ok(())
    }

    /// Makes `/t{id}/tree{k}/x/y` with files in `x` and `y`, then removes
    /// the tree in one call.
    async fn tree(&mut self) -> Result<(), String> {
        let name = self.fresh("tree");
        let top = format!("/t{}/{name}", self.id);
        let mut files = Vec::new();
        for sub in ["x", "x/y"] {
            let dir_path = format!("{top}/{sub}");
            let dir = self.mkdir_all(&dir_path).await?;
            for _ in 0..1 + self.rand(2) {
                let file = self.fresh("f");
                files.push(self.create_file(dir, &dir_path, &file).await?);
            }
        }
        self.outcome.trees += 1;
        let req = wire::EntryReq {
            user: User::root(),
            parent: self.home,
            name: name.as_bytes().to_vec(),
        };
        match self.call::<wire::RemoveAll, _>(&req).await {
            Ok(()) => {}
            Err(e) if is(&e, ErrorKind::NotFound) => {
                self.expect_gone(self.home, &name, &top).await?;
                self.lost_reply(format!("remove-all {top}"));
            }
            Err(e) => return Err(format!("remove-all {top}: {e}")),
        }
        self.outcome.removed.extend(files);
        Ok(())
    }

    async fn expect_gone(&self, parent: InodeId, name: &str, path: &str) -> Result<(), String> {
        match self.lookup(parent, name).await {
            Err(e) if is(&e, ErrorKind::NotFound) => Ok(()),
            other => Err(format!(
                "{path}: ENOENT on removal, yet lookup says {other:?}"
            )),
        }
    }
}

/// Every chunk of every chain, as each replica lists it (`DumpMeta`):
/// chunk -> chain. Asserts the replicas of a chain list the same chunks and
/// that no update is pending.
async fn all_chunks(rpc: &Client<Tcp>, mgmt: &str) -> BTreeMap<ChunkId, ChainId> {
    let routing = routing(rpc, mgmt).await.expect("routing");
    assert!(all_serving(&routing), "{routing:?}");
    let mut found = BTreeMap::new();
    for chain in CHAINS.map(ChainId) {
        let info = routing.chain(chain).expect("chain");
        let mut replicas: Vec<(TargetId, BTreeSet<ChunkId>)> = Vec::new();
        for member in &info.targets {
            let addr = routing
                .target(member.target)
                .and_then(|t| routing.node(t.node))
                .map(|n| n.addr.clone())
                .expect("the target's node has an address");
            let mut chunks = BTreeSet::new();
            let mut after = None;
            loop {
                let req = DumpMetaReq {
                    chain,
                    chain_version: info.version,
                    after,
                    limit: 1024,
                };
                let rsp = match rpc
                    .call::<DumpMeta>(&addr, &req, Bytes::new(), &CallOptions::default())
                    .await
                {
                    Ok((Ok(rsp), _)) => rsp,
                    Ok((Err(e), _)) => panic!("dump of {chain} on {}: {e}", member.target),
                    Err(e) => panic!("dump of {chain} on {}: {e}", member.target),
                };
                for meta in &rsp.chunks {
                    assert_eq!(
                        meta.pending, None,
                        "{chain} on {}: {} has an update pending after the workload",
                        member.target, meta.chunk
                    );
                    chunks.insert(meta.chunk);
                }
                after = rsp.chunks.last().map(|m| m.chunk);
                if !rsp.more || after.is_none() {
                    break;
                }
            }
            replicas.push((member.target, chunks));
        }
        let (first, chunks) = &replicas[0];
        for (target, theirs) in &replicas[1..] {
            assert_eq!(
                chunks.symmetric_difference(theirs).collect::<Vec<_>>(),
                Vec::<&ChunkId>::new(),
                "{chain}: replicas {first} and {target} hold different chunks"
            );
        }
        for chunk in chunks {
            assert!(found.insert(*chunk, chain).is_none());
        }
    }
    found
}

/// A file linked in the namespace: its path, length and layout.
struct Found {
    path: String,
    length: u64,
    chains: Vec<ChainId>,
}

/// Every file linked under the root, walked with `readdir` and `stat`.
async fn linked_files(ns: &Namespace<FjallKv>) -> BTreeMap<InodeId, Found> {
    let root = flyfs_proto::wire::meta::User::root();
    let mut files = BTreeMap::new();
    let mut dirs = vec![(ROOT, String::new())];
    while let Some((dir, path)) = dirs.pop() {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = ns
                .readdir(&root, dir, after.as_deref(), 1024)
                .await
                .expect("readdir");
            for entry in &page.entries {
                let name = format!("{path}/{}", String::from_utf8_lossy(&entry.name));
                match entry.kind {
                    InodeKind::Directory => dirs.push((entry.ino, name)),
                    InodeKind::File => {
                        let inode = ns.stat(entry.ino).await.expect("stat");
                        let data = inode.file().expect("a file's inode");
                        let found = Found {
                            path: name,
                            length: data.length,
                            chains: data.layout.chains().to_vec(),
                        };
                        let again = files.insert(entry.ino, found);
                        assert!(again.is_none(), "{:?} is linked twice", entry.ino);
                    }
                    kind => panic!("{name}: the workload made no {kind:?}"),
                }
            }
            match page.entries.last() {
                Some(last) if page.more => after = Some(last.name.clone()),
                _ => break,
            }
        }
    }
    files
}

/// A metadata client with the admin's credentials: it runs the workload
/// and asks for the GC's status (an admin method).
fn meta_client(dir: &Path, addr: &str, op_deadline: Duration) -> Arc<MetaClient<Tcp>> {
    let mut config = MetaClientConfig::new(vec![addr.to_string()]);
    config.rpc_timeout = Duration::from_secs(5);
    config.op_deadline = op_deadline;
    config.backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
    MetaClient::new(Tcp, config, support::credentials(dir, "admin"))
}

async fn gc_status(meta: &MetaClient<Tcp>) -> Result<wire::GcStatusRsp, MetaError> {
    meta.call::<wire::GcStatus, _>(&wire::GcStatusReq {}).await
}

/// Starts the metadata daemon and SIGKILLs it again [`RESTARTS`] times;
/// each time a create reaches it the moment it accepts connections (as the
/// retries of clients waiting out a restart do), and the file is unlinked.
/// Both must succeed: a daemon serves creates as soon as it listens (it
/// once answered EINVAL "table 1 is unknown" to about one in ten, its chain
/// tables not yet loaded), and its store survives being killed right after
/// it opened.
fn restarts(cluster: &mut Cluster, runtime: &tokio::runtime::Runtime, addr: &str) -> Duration {
    let start = Instant::now();
    let mut config = MetaClientConfig::new(vec![addr.to_string()]);
    config.op_deadline = Duration::from_secs(20);
    config.backoff = Backoff::new(Duration::from_micros(200), Duration::from_micros(200));
    let meta = MetaClient::new(Tcp, config, support::credentials(&cluster.dir, "client"));
    for round in 0..RESTARTS {
        cluster.start_meta(META);
        let name = format!("restart{round}").into_bytes();
        let created = runtime.block_on(meta.call::<wire::Create, _>(&wire::CreateReq {
            user: User::root(),
            parent: ROOT,
            name: name.clone(),
            mode: 0o644,
            exclusive: true,
            ..Default::default()
        }));
        if let Err(e) = created {
            panic!("restart {round}: the first create: {e}");
        }
        let unlinked = runtime.block_on(meta.call::<wire::Unlink, _>(&wire::EntryReq {
            user: User::root(),
            parent: ROOT,
            name,
        }));
        if let Err(e) = unlinked {
            panic!("restart {round}: unlink: {e}");
        }
        cluster.kill(META);
    }
    start.elapsed()
}

#[test]
fn metadata_daemon_killed_mid_workload_loses_nothing_and_gc_reclaims_everything() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    if let Err(why) = probe_io_uring(dir.path()) {
        eprintln!("SKIPPED: io_uring is not usable on this machine ({why})");
        return;
    }
    let log = |what: String| eprintln!("[{:>6.2?}] {what}", started.elapsed());

    format_devices(dir.path(), NODES, DEVICE_SIZE);
    let ports = free_ports(2 + NODES as usize);
    write_configs(dir.path(), ports[0], &ports[2..]);
    let mut cluster = Cluster::new(
        dir.path(),
        format!("127.0.0.1:{}", ports[0]),
        ports[2..]
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect(),
    );
    let meta_addr = format!("127.0.0.1:{}", ports[1]);
    write_meta_config(dir.path(), META, ports[1], &cluster.mgmt_addr, |meta| {
        meta.chain_table = 1;
        meta.chunk_size = CHUNK_BYTES;
        meta.stripe = STRIPE;
        meta.gc_delay_ms = GC_DELAY_MS;
        meta.gc_interval_ms = 100;
        meta.sync_on_commit = true;
    });
    cluster.start_mgmtd();
    for node in 1..=NODES {
        cluster.start_storage(node);
    }
    let took = cluster.wait_nodes_alive(NODES as usize, Duration::from_secs(20));
    log(format!("storage cluster up ({took:.2?} after start)"));
    cluster.create_chains(&CHAINS, NODES);
    cluster.admin_ok(&["create-table", "--table", "1", "--chains", "1,2,3"]);
    let took = cluster.wait_all_serving(Duration::from_secs(20));
    log(format!("chains and table serving ({took:.2?})"));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let took = restarts(&mut cluster, &runtime, &meta_addr);
    log(format!(
        "{RESTARTS} restarts of the metadata daemon, each serving a create at once \
         ({took:.2?})"
    ));
    cluster.start_meta(META);
    let probe = meta_client(&cluster.dir, &meta_addr, Duration::from_millis(500));
    let took = wait_for("the metadata service", Duration::from_secs(20), || {
        runtime.block_on(gc_status(&probe)).is_ok()
    });
    log(format!("metadata service answering ({took:.2?})"));

    let mut storage_config = ClientConfig::new([cluster.mgmt_addr.clone()], ClientId(0x7e57));
    storage_config.rpc_timeout = Duration::from_millis(500);
    storage_config.op_deadline = Duration::from_secs(30);
    storage_config.backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    let storage = StorageClient::new(
        storage_config,
        Tcp,
        support::credentials(&cluster.dir, "client"),
    );
    // Long enough to wait out the restart many times over.
    let meta = meta_client(&cluster.dir, &meta_addr, Duration::from_secs(30));
    let shared = Arc::new(Shared::default());
    let workload_started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|id| {
            let task = Task {
                id,
                meta: meta.clone(),
                storage: storage.clone(),
                shared: shared.clone(),
                rng: 0x9e37_79b9_7f4a_7c15 ^ ((u64::from(id) + 1) * 0x2545_f491_4f6c_dd1d),
                names: 0,
                started: workload_started,
                home: InodeId(0),
                dirs: [InodeId(0); 2],
                linked: Vec::new(),
                outcome: Outcome::default(),
            };
            runtime.spawn(task.run())
        })
        .collect();

    std::thread::sleep(KILL_AT);
    let calls = shared.calls.load(Ordering::Relaxed);
    assert!(calls > 0, "no metadata call finished in {KILL_AT:?}");
    cluster.kill(META);
    log(format!("SIGKILLed the metadata daemon after {calls} calls"));
    std::thread::sleep(DOWN_FOR);
    cluster.start_meta(META);
    let restarted = Instant::now();
    wait_for(
        "the restarted metadata service",
        Duration::from_secs(20),
        || runtime.block_on(gc_status(&probe)).is_ok(),
    );
    log(format!(
        "restarted it; answering after {:.2?}",
        restarted.elapsed()
    ));
    std::thread::sleep(WORKLOAD.saturating_sub(KILL_AT + DOWN_FOR + restarted.elapsed()));
    shared.stop.store(true, Ordering::SeqCst);
    let outcomes: Vec<Outcome> = tasks
        .into_iter()
        .map(|task| runtime.block_on(task).expect("workload task"))
        .collect();
    let errors = shared.errors.lock().expect("errors lock").clone();
    assert!(errors.is_empty(), "the workload saw errors: {errors:#?}");
    let lost = shared
        .lost_replies
        .lock()
        .expect("lost replies lock")
        .clone();
    let slow = shared.slow_calls.load(Ordering::Relaxed);
    let mut live: BTreeMap<InodeId, Written> = BTreeMap::new();
    let mut removed: BTreeMap<InodeId, Written> = BTreeMap::new();
    let (mut creates, mut renames, mut unlinks, mut trees) = (0, 0, 0, 0);
    for outcome in outcomes {
        live.extend(outcome.live);
        removed.extend(outcome.removed);
        creates += outcome.creates;
        renames += outcome.renames;
        unlinks += outcome.unlinks;
        trees += outcome.trees;
    }
    log(format!(
        "workload done: {} calls ({slow} waited out the restart), {creates} creates, \
         {renames} renames, {unlinks} unlinks, {trees} trees removed; {} files live, \
         {} removed; {} answers explained by lost replies: {lost:?}",
        shared.calls.load(Ordering::Relaxed),
        live.len(),
        removed.len(),
        lost.len()
    ));
    assert!(
        slow > 0,
        "no call waited out the restart: the kill missed the workload"
    );
    assert!(
        creates > 50 && unlinks > 10 && renames > 10 && trees > 0,
        "too little workload to mean anything"
    );

    // The GC queue drains: every removed file's chunks are deleted, then
    // its inode.
    let mut last = None;
    let took = wait_for("the GC queue to drain", Duration::from_secs(60), || {
        let status = runtime.block_on(gc_status(&meta)).expect("gc status");
        last = Some(status);
        status.queued == 0
    });
    log(format!("GC queue empty after {took:.2?}: {last:?}"));

    // DumpMeta is resync's method, open to operators too: the checker reads
    // every replica's chunk list as an admin (a storage node may ask only
    // the replica after its own).
    let rpc = Client::new(
        Tcp,
        flyfs_rpc::ClientConfig::default(),
        support::credentials(&cluster.dir, "admin"),
    );
    let chunks = runtime.block_on(all_chunks(&rpc, &cluster.mgmt_addr));
    log(format!(
        "{} chunks on storage, the same on every replica",
        chunks.len()
    ));

    cluster.terminate(META, Duration::from_secs(10));
    log("the metadata daemon exited 0 on SIGTERM".to_string());
    let (report, files) = runtime.block_on(async {
        let kv = FjallKv::open(
            dir.path().join(format!("{META}-data")),
            FjallOptions::default(),
        )
        .expect("open the metadata store");
        let spec = LayoutSpec {
            chain_table: ChainTableId(1),
            chunk_size: CHUNK_BYTES,
            stripe: STRIPE,
        };
        let tables = StaticChainTables::single(ChainTableId(1), CHAINS.len() as u32);
        let ns = Namespace::open(kv, NsConfig::new(spec, Arc::new(tables)))
            .await
            .expect("open the namespace");
        let report = ns.check().await.expect("check");
        (report, linked_files(&ns).await)
    });
    log(format!("check: {report}"));
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.queued, 0, "{report}");
    assert_eq!(
        report.files,
        files.len(),
        "files exist that no entry names: {report}"
    );
    assert_eq!(report.sessions, 0, "write sessions left behind: {report}");

    // The namespace holds exactly the files the workload left.
    let expected: BTreeSet<InodeId> = live.keys().copied().collect();
    let linked: BTreeSet<InodeId> = files.keys().copied().collect();
    let missing: Vec<_> = expected.difference(&linked).map(|i| &live[i]).collect();
    assert!(missing.is_empty(), "files lost: {missing:#?}");
    let extra: Vec<_> = linked
        .difference(&expected)
        .map(|i| (&files[i].path, removed.get(i).map(|w| &w.path)))
        .collect();
    assert!(extra.is_empty(), "files that should not exist: {extra:#?}");

    // Storage holds exactly the chunks of the live files.
    let mut orphans = Vec::new();
    for (chunk, chain) in &chunks {
        let Some(found) = files.get(&chunk.inode) else {
            let why = match removed.get(&chunk.inode) {
                Some(w) => format!("of {}, removed", w.path),
                None => "of no file the workload made".to_string(),
            };
            orphans.push(format!("{chunk} on {chain}: {why}"));
            continue;
        };
        let written = &live[&chunk.inode];
        let expected_chain = found.chains[chunk.index as usize % found.chains.len()];
        if *chain != expected_chain || !written.chunks.contains(&chunk.index) {
            orphans.push(format!(
                "{chunk} on {chain}: not written by the workload to {} ({expected_chain})",
                found.path
            ));
        }
    }
    assert!(
        orphans.is_empty(),
        "{} chunks on storage belong to no live file, the first: {:#?}",
        orphans.len(),
        &orphans[..orphans.len().min(20)]
    );
    for (ino, found) in &files {
        let written = &live[ino];
        assert_eq!(
            found.length, written.length,
            "{}: length in the namespace",
            found.path
        );
        assert_eq!(found.chains, written.layout.chains, "{}", found.path);
        for &index in &written.chunks {
            let chunk = ChunkId { inode: *ino, index };
            assert!(
                chunks.contains_key(&chunk),
                "{}: {chunk} is gone from storage",
                found.path
            );
        }
    }
    log(format!(
        "{} live files hold all {} chunks; none of the {} removed files has one",
        files.len(),
        chunks.len(),
        removed.len()
    ));

    cluster.terminate_all(Duration::from_secs(10));
    log("all daemons exited 0 on SIGTERM".to_string());
}
