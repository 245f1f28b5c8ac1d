//! A real cluster of processes on loopback: `flyfs mgmtd` and three
//! `flyfs storage` daemons on io_uring device files (the manager keeps its
//! record and lease in the embedded transactional KV store), set up with
//! `flyfs admin`, then a storage client writes and verifies chunks on two
//! chains while one storage daemon is SIGKILLed and later restarted.
//!
//! What must hold: the client sees no error through the failure (it fails
//! over within its deadline); the killed node's targets come back through a
//! resync; afterwards every acknowledged chunk reads back with its bytes
//! from the client and from every replica of its chain, including the
//! chunks written while the restarted node was down (which only a resync
//! can have given it); and the daemons exit 0 on SIGTERM.
//!
//! Skips (with a message) on a machine without io_uring.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_proto::ids::{ChainId, ChunkId, ClientId, TargetId};
use flyfs_proto::wire::mgmt::PublicState;
use flyfs_proto::wire::storage::{BatchRead, BatchReadReq, ReadItem};
use flyfs_rpc::{CallOptions, Client, Tcp};
use flyfs_time::Backoff;
use support::{Cluster, all_serving, probe_io_uring, routing, target_id, text, wait_for};

const NODES: u32 = 3;
/// The node killed and restarted: head of chain 1, tail of chain 2.
const VICTIM: u32 = 1;
const CHAINS: [u32; 2] = [1, 2];
const CHUNK_BYTES: usize = 64 << 10;
/// Every chunk of both chains has a replica on every device: keep below
/// the ~2000 chunks of 64 KiB that a 128 MiB device holds.
const CHUNKS_MAX: u32 = 1500;
const WRITERS: u32 = 4;
/// Each writer waits this long after each write, so the writers together
/// write at most 4 / 15 ms = 267 chunks/s: at most 1200 before the restart
/// (4.5 s in), which leaves chunks to write while the victim resyncs.
const WRITE_PAUSE: Duration = Duration::from_millis(15);
const INODE: u64 = 0x7e57;

/// The bytes of chunk `index` of `chain`: distinct for every chunk.
fn content(chain: u32, index: u32) -> Bytes {
    let mut state = (u64::from(chain) << 32 | u64::from(index)) ^ 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(CHUNK_BYTES);
    while data.len() < CHUNK_BYTES {
        // xorshift64: cheap, and no two chunks start the same.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    Bytes::from(data)
}

/// A chunk the client got an acknowledgement for.
#[derive(Clone, Copy, Debug)]
struct Acked {
    chain: u32,
    index: u32,
    /// Acknowledged while the victim was down (killed and not yet restarted).
    while_down: bool,
    /// Sent after the victim was restarted.
    after_restart: bool,
}

/// What the workload shares between its tasks.
#[derive(Default)]
struct Shared {
    acked: Mutex<Vec<Acked>>,
    errors: Mutex<Vec<String>>,
    reads: std::sync::atomic::AtomicU64,
    stop: AtomicBool,
    victim_down: AtomicBool,
    victim_restarted: AtomicBool,
}

impl Shared {
    fn fail(&self, error: String) {
        eprintln!("workload error: {error}");
        self.errors.lock().expect("errors lock").push(error);
    }

    fn acked(&self) -> Vec<Acked> {
        self.acked.lock().expect("acked lock").clone()
    }
}

/// Writes chunks `first, first + WRITERS, ...` of `chain` until told to stop.
async fn writer(client: Arc<StorageClient<Tcp>>, shared: Arc<Shared>, chain: u32, first: u32) {
    let mut index = first;
    while !shared.stop.load(Ordering::SeqCst) && index < CHUNKS_MAX / 2 {
        let down = shared.victim_down.load(Ordering::SeqCst);
        let after_restart = shared.victim_restarted.load(Ordering::SeqCst);
        let chunk = ChunkId::new(INODE, index);
        match client
            .write(
                ChainId(chain),
                chunk,
                0,
                content(chain, index),
                CHUNK_BYTES as u32,
            )
            .await
        {
            Ok(_) => shared.acked.lock().expect("acked lock").push(Acked {
                chain,
                index,
                // Down both when sent and when acknowledged: the victim
                // cannot have seen it.
                while_down: down && shared.victim_down.load(Ordering::SeqCst),
                after_restart,
            }),
            Err(e) => shared.fail(format!("write of chain {chain} {chunk}: {e}")),
        }
        index += WRITERS / 2;
        // Pace the writers so the devices do not fill before the end.
        tokio::time::sleep(WRITE_PAUSE).await;
    }
}

/// Reads back acknowledged chunks, one after another, until told to stop.
async fn verifier(client: Arc<StorageClient<Tcp>>, shared: Arc<Shared>) {
    let mut pick: u64 = 0x2545_f491_4f6c_dd1d;
    while !shared.stop.load(Ordering::SeqCst) {
        let acked = shared.acked();
        if acked.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        pick ^= pick << 13;
        pick ^= pick >> 7;
        pick ^= pick << 17;
        let chunk = acked[(pick % acked.len() as u64) as usize];
        if let Err(e) = check_via_client(&client, chunk).await {
            shared.fail(e);
        }
        shared.reads.fetch_add(1, Ordering::Relaxed);
    }
}

async fn check_via_client(client: &StorageClient<Tcp>, chunk: Acked) -> Result<(), String> {
    let id = ChunkId::new(INODE, chunk.index);
    let read = client
        .read(ChainId(chunk.chain), id, 0, CHUNK_BYTES as u32)
        .await
        .map_err(|e| format!("read of chain {} {id}: {e}", chunk.chain))?;
    if read.data != content(chunk.chain, chunk.index) {
        return Err(format!(
            "chain {} {id}: read {} bytes that are not what was written",
            chunk.chain,
            read.data.len()
        ));
    }
    Ok(())
}

/// Every state change of every target the manager publishes, with when.
type Transitions = Arc<Mutex<Vec<(Duration, TargetId, PublicState)>>>;

/// Polls the manager's routing every 10 ms and records state changes.
async fn observer(
    rpc: Client<Tcp>,
    mgmt: String,
    start: Instant,
    log: Transitions,
    stop: Arc<AtomicBool>,
) {
    let mut last: BTreeMap<TargetId, PublicState> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        if let Ok(routing) = routing(&rpc, &mgmt).await {
            for target in &routing.targets {
                if last.insert(target.id, target.state) != Some(target.state) {
                    log.lock().expect("transitions lock").push((
                        start.elapsed(),
                        target.id,
                        target.state,
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads `chunks` of `chain` from the replica at `addr` directly (no
/// failover), checking every byte. Retries a few times while the replica's
/// routing catches up with the manager's.
async fn check_replica(
    rpc: &Client<Tcp>,
    mgmt: &str,
    chain: u32,
    target: TargetId,
    chunks: &[u32],
) -> Result<(), String> {
    for batch in chunks.chunks(16) {
        let mut last = String::new();
        let mut ok = false;
        for _ in 0..50 {
            let routing = routing(rpc, mgmt).await?;
            let info = routing.chain(ChainId(chain)).ok_or("chain gone")?;
            let addr = routing
                .target(target)
                .and_then(|t| routing.node(t.node))
                .map(|n| n.addr.clone())
                .ok_or("no address")?;
            let req = BatchReadReq {
                items: batch
                    .iter()
                    .map(|&index| ReadItem {
                        chain: ChainId(chain),
                        chain_version: info.version,
                        chunk: ChunkId::new(INODE, index),
                        offset: 0,
                        len: CHUNK_BYTES as u32,
                        verify: true,
                        if_changed_from: None,
                    })
                    .collect(),
            };
            match rpc
                .call::<BatchRead>(&addr, &req, Bytes::new(), &CallOptions::default())
                .await
            {
                Err(e) => last = e.to_string(),
                Ok((rsp, payload)) => {
                    if let Some(Err(e)) = rsp.results.iter().find(|r| r.is_err()) {
                        last = e.to_string();
                    } else {
                        let data = payload.into_bytes().unwrap_or_default();
                        let mut at = 0usize;
                        for (result, &index) in rsp.results.iter().zip(batch) {
                            let len = result.as_ref().map_or(0, |r| r.len as usize);
                            let got = data.get(at..at + len).unwrap_or_default();
                            if got != content(chain, index).as_ref() {
                                return Err(format!(
                                    "{target} (chain {chain}) at {addr}: chunk #{index} has {len} \
                                     bytes that are not what was written"
                                ));
                            }
                            at += len;
                        }
                        ok = true;
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !ok {
            return Err(format!("{target} (chain {chain}): {last}"));
        }
    }
    Ok(())
}

/// The runtime the workload and the checks run on.
fn workload_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Spawns the WRITERS writers, half on each chain.
fn spawn_writers(
    runtime: &tokio::runtime::Runtime,
    client: &Arc<StorageClient<Tcp>>,
    shared: &Arc<Shared>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let chain = CHAINS[(w % 2) as usize];
            runtime.spawn(writer(client.clone(), shared.clone(), chain, w / 2))
        })
        .collect()
}

/// Stops the workload, waits for its tasks, fails on any error the client
/// saw, and returns the acknowledged chunks.
fn stop_workload(
    runtime: &tokio::runtime::Runtime,
    shared: &Shared,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> Vec<Acked> {
    shared.stop.store(true, Ordering::SeqCst);
    for task in tasks {
        runtime.block_on(task).expect("workload task");
    }
    let errors = shared.errors.lock().expect("errors lock").clone();
    assert!(errors.is_empty(), "the client saw errors: {errors:#?}");
    shared.acked()
}

/// Starts storage node `node` and waits until the manager has it alive.
fn start_node(
    cluster: &mut Cluster,
    runtime: &tokio::runtime::Runtime,
    rpc: &Client<Tcp>,
    node: u32,
) {
    cluster.start_storage(node);
    wait_for("the new node alive", Duration::from_secs(20), || {
        runtime
            .block_on(routing(rpc, &cluster.mgmt_addr))
            .is_ok_and(|r| r.nodes.iter().any(|n| n.id.0 == node && n.alive))
    });
}

/// Checks every acknowledged chunk on every member of its chain in the
/// manager's current routing, each member holding every byte.
async fn check_every_replica(rpc: &Client<Tcp>, mgmt: &str, acked: &[Acked]) {
    let routing = routing(rpc, mgmt).await.expect("routing");
    for chain in CHAINS {
        let chunks: Vec<u32> = acked
            .iter()
            .filter(|a| a.chain == chain)
            .map(|a| a.index)
            .collect();
        let info = routing.chain(ChainId(chain)).expect("chain");
        for member in &info.targets {
            if let Err(e) = check_replica(rpc, mgmt, chain, member.target, &chunks).await {
                panic!("replica check: {e}");
            }
        }
    }
}

/// Formats devices and writes configs for `nodes` storage nodes, starts the
/// manager and storage nodes 1..=NODES (more nodes stay spare), and waits
/// until those are alive; returns the cluster and how long that wait took.
fn start_cluster(dir: &Path, nodes: u32) -> (Cluster, Duration) {
    let mut cluster = Cluster::configure(dir, nodes, "128MiB");
    let took = cluster.start_manager_and_storage(NODES, Duration::from_secs(20));
    (cluster, took)
}

/// The workload's storage client (short timeouts, so failover is quick),
/// and a raw rpc client for reads of single replicas, as a mount makes them.
fn clients(cluster: &Cluster, id: ClientId) -> (Arc<StorageClient<Tcp>>, Client<Tcp>) {
    let mut client_config = ClientConfig::new([cluster.mgmt_addr.clone()], id);
    client_config.rpc_timeout = Duration::from_millis(500);
    client_config.op_deadline = Duration::from_secs(30);
    client_config.backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    let credentials = support::credentials(&cluster.dir, "client");
    let client = StorageClient::new(client_config, Tcp, credentials.clone());
    let rpc = Client::new(Tcp, flyfs_rpc::ClientConfig::default(), credentials);
    (client, rpc)
}

#[test]
fn cluster_survives_a_storage_daemon_killed_mid_workload() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    if let Err(why) = probe_io_uring(dir.path()) {
        eprintln!("SKIPPED: io_uring is not usable on this machine ({why})");
        return;
    }

    let (mut cluster, took) = start_cluster(dir.path(), NODES);
    eprintln!(
        "[{:>6.2?}] cluster up ({took:.2?} after start)",
        started.elapsed()
    );

    // Targets: one per chain per node. Chain 1 is headed by node 1, chain 2
    // by node 2 (its order is 2, 3, 1), so the victim heads one and tails the
    // other.
    cluster.create_chains(&CHAINS, NODES);
    cluster.admin_ok(&["create-table", "--table", "1", "--chains", "1,2"]);
    // A planned table beside it (idle: the workload writes chains 1 and 2),
    // created by `admin placement --apply`; applying it again is refused
    // before anything is created, naming what exists.
    let placement = [
        "placement",
        "--nodes",
        "1-3",
        "--replicas",
        "3",
        "--chains",
        "3",
        "--first-chain",
        "10",
        "--table",
        "2",
        "--apply",
    ];
    let planned = cluster.admin_ok(&placement);
    assert!(planned.contains("3 chains of 3 replicas"), "{planned}");
    let again = cluster.admin(&placement);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("chain 10 exists already"),
        "{}",
        text(&again)
    );
    // A refusal is reported, with exit status 1: target 101 is in chain 1.
    let refused = cluster.admin(&["create-chain", "--chain", "9", "--targets", "101,202"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused"),
        "{}",
        text(&refused)
    );
    // A live node cannot be removed: its daemon must be stopped first.
    let refused = cluster.admin(&["remove-node", "--node", "1"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop its daemon first"),
        "{}",
        text(&refused)
    );
    // Targets the nodes have not reported yet count as offline, so a new
    // chain degrades at once and recovers through resyncs of empty targets
    // once the nodes learn about them.
    let took = cluster.wait_all_serving(Duration::from_secs(20));
    eprintln!("[{:>6.2?}] chains serving ({took:.2?})", started.elapsed());
    let status = cluster.admin_ok(&["status"]);
    assert!(
        status.contains("101@1 serving, 102@2 serving, 103@3 serving"),
        "{status}"
    );
    assert!(
        status.contains("202@2 serving, 203@3 serving, 201@1 serving"),
        "{status}"
    );
    let space = cluster.admin_ok(&["space", "--node-addr", &cluster.node_addrs[&VICTIM]]);
    assert!(
        space.lines().count() == 2 && space.contains(" ok"),
        "{space}"
    );
    eprintln!(
        "[{:>6.2?}] targets, chains and table created",
        started.elapsed()
    );

    let runtime = workload_runtime();
    let shared = Arc::new(Shared::default());
    let transitions: Transitions = Arc::default();
    let observing = Arc::new(AtomicBool::new(false));
    let (client, rpc) = clients(&cluster, ClientId(0x7e57));

    let mut tasks = Vec::new();
    let observed_from = Instant::now();
    tasks.push(runtime.spawn(observer(
        rpc.clone(),
        cluster.mgmt_addr.clone(),
        observed_from,
        transitions.clone(),
        observing.clone(),
    )));
    let mut workload = spawn_writers(&runtime, &client, &shared);
    workload.push(runtime.spawn(verifier(client.clone(), shared.clone())));

    std::thread::sleep(Duration::from_secs(2));
    let before_kill = shared.acked().len();
    assert!(before_kill > 0, "no write was acknowledged in 2 s");
    shared.victim_down.store(true, Ordering::SeqCst);
    cluster.kill_storage(VICTIM);
    eprintln!(
        "[{:>6.2?}] SIGKILLed storage{VICTIM} after {before_kill} acknowledged writes",
        started.elapsed()
    );

    // Long enough for the manager to declare it dead (1 s) and for the
    // client to fail over and write on without it.
    std::thread::sleep(Duration::from_millis(2500));
    cluster.start_storage(VICTIM);
    shared.victim_down.store(false, Ordering::SeqCst);
    shared.victim_restarted.store(true, Ordering::SeqCst);
    let restarted_at = observed_from.elapsed();
    let while_down = shared.acked().iter().filter(|a| a.while_down).count();
    eprintln!(
        "[{:>6.2?}] restarted storage{VICTIM}; {while_down} writes acknowledged while it was down",
        started.elapsed()
    );

    let took = wait_for(
        "every target serving again",
        Duration::from_secs(60),
        || {
            runtime
                .block_on(routing(&rpc, &cluster.mgmt_addr))
                .is_ok_and(|r| all_serving(&r))
        },
    );
    eprintln!(
        "[{:>6.2?}] every target serving {took:.2?} after the restart",
        started.elapsed()
    );
    // Some more of the workload on the healed cluster.
    std::thread::sleep(Duration::from_millis(500));
    let acked = stop_workload(&runtime, &shared, workload);
    // An admin takes a healthy target offline: it comes back through a
    // resync too (checked below with the victim's).
    let fenced = TargetId(target_id(2, 3));
    let fenced_at = observed_from.elapsed();
    cluster.admin_ok(&["offline", "--target", &fenced.0.to_string()]);
    let took = wait_for(
        "the fenced target to serve again",
        Duration::from_secs(30),
        || {
            runtime
                .block_on(routing(&rpc, &cluster.mgmt_addr))
                .is_ok_and(|r| all_serving(&r))
                && transitions
                    .lock()
                    .expect("transitions lock")
                    .iter()
                    .any(|(at, t, s)| {
                        *at >= fenced_at && *t == fenced && *s != PublicState::Serving
                    })
        },
    );
    eprintln!(
        "[{:>6.2?}] {fenced} taken offline by admin, serving again after {took:.2?}",
        started.elapsed()
    );
    observing.store(true, Ordering::SeqCst);
    for task in tasks {
        runtime.block_on(task).expect("observer task");
    }

    let reads = shared.reads.load(Ordering::Relaxed);
    eprintln!(
        "[{:>6.2?}] workload done: {} writes acknowledged, {reads} verified reads",
        started.elapsed(),
        acked.len()
    );
    for chain in CHAINS {
        let down = acked
            .iter()
            .filter(|a| a.chain == chain && a.while_down)
            .count();
        assert!(
            down > 0,
            "chain {chain}: no write acknowledged while storage{VICTIM} was down"
        );
        let after = acked
            .iter()
            .filter(|a| a.chain == chain && a.after_restart)
            .count();
        assert!(
            after > 0,
            "chain {chain}: no write after storage{VICTIM} restarted"
        );
    }

    // The victim's targets went through a resync: after the restart the
    // manager published them as waiting or syncing (states only a live,
    // returning target reaches), then serving.
    let transitions = transitions.lock().expect("transitions lock").clone();
    for chain in CHAINS {
        let target = TargetId(target_id(chain, VICTIM));
        let states: Vec<(Duration, PublicState)> = transitions
            .iter()
            .filter(|(at, t, _)| *t == target && *at >= restarted_at)
            .map(|&(at, _, state)| (at, state))
            .collect();
        eprintln!("{target} after the restart: {states:?}");
        let not_serving = states
            .iter()
            .position(|(_, s)| matches!(s, PublicState::Waiting | PublicState::Syncing));
        let serving_after = not_serving
            .is_some_and(|i| states[i..].iter().any(|(_, s)| *s == PublicState::Serving));
        assert!(
            serving_after,
            "{target} did not go from waiting or syncing to serving after the restart: {states:?}"
        );
        let before: Vec<_> = transitions
            .iter()
            .filter(|(at, t, _)| *t == target && *at < restarted_at)
            .collect();
        assert!(
            before.iter().any(|(_, _, s)| *s != PublicState::Serving),
            "{target} was never published as down while storage{VICTIM} was dead: {before:?}"
        );
    }

    // Every acknowledged chunk, through the client and from every replica.
    runtime.block_on(async {
        for &chunk in &acked {
            if let Err(e) = check_via_client(&client, chunk).await {
                panic!("final read: {e}");
            }
        }
        let routing = routing(&rpc, &cluster.mgmt_addr).await.expect("routing");
        assert!(all_serving(&routing), "{routing:?}");
        check_every_replica(&rpc, &cluster.mgmt_addr, &acked).await;
    });
    eprintln!(
        "[{:>6.2?}] every acknowledged chunk verified on all 3 replicas of its chain",
        started.elapsed()
    );

    cluster.terminate_all(Duration::from_secs(10));
    eprintln!(
        "[{:>6.2?}] all daemons exited 0 on SIGTERM",
        started.elapsed()
    );
}

/// A node dies for good and a new one takes its place: `drain-node` moves
/// each of the dead node's replicas onto the new node (a new target joins
/// its chain, a resync fills it while writers keep writing, the dead one
/// leaves), and then the dead node can be forgotten. Every acknowledged
/// chunk, before and during the move, is then on every replica, the new
/// ones included.
#[test]
fn a_dead_nodes_replicas_move_to_a_new_node_while_the_chains_serve() {
    const DEAD: u32 = 3;
    const NEW: u32 = 4;
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    if let Err(why) = probe_io_uring(dir.path()) {
        eprintln!("SKIPPED: io_uring is not usable on this machine ({why})");
        return;
    }
    // Devices and configs for the spare node too; it starts later.
    let (mut cluster, _) = start_cluster(dir.path(), NEW);
    cluster.create_chains(&CHAINS, NODES);
    cluster.admin_ok(&["create-table", "--table", "1", "--chains", "1,2"]);
    cluster.wait_all_serving(Duration::from_secs(20));

    let runtime = workload_runtime();
    let (client, rpc) = clients(&cluster, ClientId(0x7e58));
    let shared = Arc::new(Shared::default());
    let workload = spawn_writers(&runtime, &client, &shared);
    wait_for("writes acknowledged", Duration::from_secs(20), || {
        shared.acked().len() >= 20
    });

    cluster.kill_storage(DEAD);
    start_node(&mut cluster, &runtime, &rpc, NEW);
    eprintln!(
        "[{:>6.2?}] storage{DEAD} killed for good, storage{NEW} started",
        started.elapsed()
    );
    let drained = cluster.admin_ok(&["--json", "drain-node", "--node", &DEAD.to_string()]);
    let moves: serde_json::Value = serde_json::from_str(&drained).expect("drain-node --json");
    let moves = moves.as_array().expect("a list of moves");
    assert_eq!(moves.len(), CHAINS.len(), "{drained}");
    for moved in moves {
        assert_eq!(moved["node"], NEW, "{drained}");
        assert_eq!(
            moved["old"],
            target_id(moved["chain"].as_u64().expect("chain") as u32, DEAD),
            "{drained}"
        );
    }
    eprintln!(
        "[{:>6.2?}] drained storage{DEAD}: {drained}",
        started.elapsed()
    );
    // The chains went on taking writes through the move.
    let during = shared.acked().len();
    wait_for("writes after the move", Duration::from_secs(20), || {
        shared.acked().len() >= during + 10
    });
    let acked = stop_workload(&runtime, &shared, workload);
    runtime.block_on(async {
        let routing = routing(&rpc, &cluster.mgmt_addr).await.expect("routing");
        // Every member serves (the dead node is still registered, down).
        assert!(
            routing
                .chains
                .iter()
                .all(|c| c.targets.iter().all(|t| t.state == PublicState::Serving)),
            "{routing:?}"
        );
        assert!(
            !routing.targets.iter().any(|t| t.node.0 == DEAD),
            "storage{DEAD} still hosts targets: {routing:?}"
        );
        for chain in CHAINS {
            let info = routing.chain(ChainId(chain)).expect("chain");
            assert_eq!(info.targets.len(), NODES as usize, "{info:?}");
            assert!(
                info.targets
                    .iter()
                    .any(|m| routing.target(m.target).is_some_and(|t| t.node.0 == NEW)),
                "chain {chain} has no replica on storage{NEW}: {info:?}"
            );
        }
        check_every_replica(&rpc, &cluster.mgmt_addr, &acked).await;
    });
    eprintln!(
        "[{:>6.2?}] {} acknowledged chunks on every replica, storage{NEW}'s included",
        started.elapsed(),
        acked.len()
    );
    // The dead node hosts nothing now: it can be forgotten.
    cluster.admin_ok(&["remove-node", "--node", &DEAD.to_string()]);
    let status = cluster.admin_ok(&["status"]);
    assert!(!status.contains(&format!("@{DEAD} ")), "{status}");
    cluster.terminate_all(Duration::from_secs(10));
}

/// A node added to a running cluster takes its share: `rebalance` moves a
/// replica of the busiest nodes onto it (a new target joins the chain, a
/// resync fills it while writers keep writing, the old one leaves) until
/// every live node holds within one replica of every other, and then plans
/// nothing more. Every acknowledged chunk is on every replica after.
#[test]
fn an_added_node_takes_its_share_through_rebalance() {
    const NEW: u32 = 4;
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    if let Err(why) = probe_io_uring(dir.path()) {
        eprintln!("SKIPPED: io_uring is not usable on this machine ({why})");
        return;
    }
    let (mut cluster, _) = start_cluster(dir.path(), NEW);
    cluster.create_chains(&CHAINS, NODES);
    cluster.admin_ok(&["create-table", "--table", "1", "--chains", "1,2"]);
    cluster.wait_all_serving(Duration::from_secs(20));
    // Balanced already: nothing to do.
    let idle = cluster.admin_ok(&["--json", "rebalance", "--dry-run"]);
    let idle: serde_json::Value = serde_json::from_str(&idle).expect("rebalance --json");
    assert_eq!(idle["planned"], serde_json::json!([]), "{idle}");

    let runtime = workload_runtime();
    let (client, rpc) = clients(&cluster, ClientId(0x7e59));
    let shared = Arc::new(Shared::default());
    let workload = spawn_writers(&runtime, &client, &shared);
    wait_for("writes acknowledged", Duration::from_secs(20), || {
        shared.acked().len() >= 20
    });
    start_node(&mut cluster, &runtime, &rpc, NEW);
    let moved = cluster.admin_ok(&["--json", "rebalance"]);
    eprintln!("[{:>6.2?}] rebalanced: {moved}", started.elapsed());
    let moved: serde_json::Value = serde_json::from_str(&moved).expect("rebalance --json");
    let moves = moved["moved"].as_array().expect("a list of moves");
    assert!(!moves.is_empty(), "{moved}");
    assert!(moves.iter().all(|m| m["node"] == NEW), "{moved}");
    let during = shared.acked().len();
    wait_for("writes after the move", Duration::from_secs(20), || {
        shared.acked().len() >= during + 10
    });
    let acked = stop_workload(&runtime, &shared, workload);
    runtime.block_on(async {
        let routing = routing(&rpc, &cluster.mgmt_addr).await.expect("routing");
        let held: Vec<usize> = (1..=NEW)
            .map(|node| {
                routing
                    .targets
                    .iter()
                    .filter(|t| t.node.0 == node && t.chain.is_some())
                    .count()
            })
            .collect();
        let lo = held.iter().min().expect("nodes");
        let hi = held.iter().max().expect("nodes");
        assert!(hi - lo <= 1, "replicas per node {held:?}: {routing:?}");
        for chain in CHAINS {
            let info = routing.chain(ChainId(chain)).expect("chain");
            assert_eq!(info.targets.len(), NODES as usize, "{info:?}");
            assert!(
                info.targets.iter().all(|m| m.state == PublicState::Serving),
                "{info:?}"
            );
        }
        check_every_replica(&rpc, &cluster.mgmt_addr, &acked).await;
    });
    // The moved replicas' chunks are freed on the nodes they left: once no
    // disk has anything left to free, a node holding both chains holds as
    // many chunks as the two nodes holding one chain each together (every
    // replica of a chain holds the same chunks). Without the freeing each
    // of those two would still hold both chains' chunks.
    let hosted = |status: &serde_json::Value, node: u64| {
        status["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .filter(|t| t["node"] == node && !t["chain"].is_null())
            .count()
    };
    let mut status = serde_json::Value::Null;
    wait_for("moved replicas freed", Duration::from_secs(30), || {
        let out = cluster.admin_ok(&["--json", "status"]);
        status = serde_json::from_str(&out).expect("status --json");
        status["usage"]
            .as_array()
            .expect("usage")
            .iter()
            .all(|node| {
                node["disks"].as_array().is_some_and(|disks| {
                    !disks.is_empty() && disks.iter().all(|d| d["freeing_chunks"] == 0)
                })
            })
    });
    let chunks = |node: &serde_json::Value| -> u64 {
        node["disks"]
            .as_array()
            .expect("disks")
            .iter()
            .map(|d| d["committed_chunks"].as_u64().expect("chunks"))
            .sum()
    };
    let usage = status["usage"].as_array().expect("usage");
    let (both, one): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) = usage
        .iter()
        .partition(|node| hosted(&status, node["node"].as_u64().expect("node")) == 2);
    assert_eq!((both.len(), one.len()), (2, 2), "{status}");
    let whole = chunks(both[0]);
    assert!(whole > 0, "{status}");
    assert_eq!(chunks(both[1]), whole, "{status}");
    assert_eq!(chunks(one[0]) + chunks(one[1]), whole, "{status}");
    let again = cluster.admin_ok(&["--json", "rebalance", "--dry-run"]);
    let again: serde_json::Value = serde_json::from_str(&again).expect("rebalance --json");
    assert_eq!(again["planned"], serde_json::json!([]), "{again}");
    eprintln!(
        "[{:>6.2?}] {} acknowledged chunks on every replica, storage{NEW}'s included",
        started.elapsed(),
        acked.len()
    );
    cluster.terminate_all(Duration::from_secs(10));
}
