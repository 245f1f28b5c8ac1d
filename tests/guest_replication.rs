//! Replication across real processes over the RDMA transport, in the QEMU
//! guest (Soft-RoCE): a manager and three storage daemons, each a `flyfs`
//! process with `transport = "rdma"` on the guest's rxe device, one chain
//! of three replicas. A client writes chunks from a registered buffer pool
//! (the head pulls each by RDMA READ, each forward down the chain is pulled
//! the same way) and reads them back into registered buffers (the serving
//! replica RDMA WRITEs them), every chunk checked by CRC. Then a storage
//! daemon is SIGKILLed while writes and reads are in flight, the chain goes
//! on with two replicas, the daemon is restarted, the chain recovers (the
//! returning replica is resynced), and every chunk still verifies, from each
//! replica in turn.
//!
//! A guest-only test: it reads `FLYFS_RXE_DEV` and `FLYFS_RXE_GID_INDEX`,
//! and `FLYFS_TEST_DIR`, a directory on a filesystem that takes O_DIRECT
//! (the daemons' devices are files opened with it, which the guest's tmpfs
//! /tmp refuses), and fails (does not skip) without them. scripts/test-guest
//! runs it: its guest has a second NVMe controller, on which
//! scripts/guest-run makes and mounts ext4 for `FLYFS_TEST_DIR` (the first
//! belongs to the NVMe tests). By hand:
//!
//! ```text
//! shared/vm/guest --nvme 1G --rxe --mem 3G -- sh -c 'mkfs.ext4 -q $FLYFS_NVME_DEV &&
//!     mkdir -p /tmp/d && mount $FLYFS_NVME_DEV /tmp/d &&
//!     FLYFS_TEST_DIR=/tmp/d target/debug/deps/guest_replication-* --nocapture'
//! ```

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flyfs_bypass::buf::{BufferPool, PoolConfig};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_deploy::config::{
    ConfigFile, MgmtdConfig, RdmaConfig, StorageDaemonConfig, TransportKind,
};
use flyfs_proto::ids::{ChainId, ChunkId, ClientId};
use flyfs_rpc::{RdmaTransport, Tcp};
use flyfs_time::Backoff;
use support::{Cluster, format_devices, free_ports, write_configs};

const NODES: u32 = 3;
const CHAIN: u32 = 1;
const VICTIM: u32 = 2;
const CHUNK_BYTES: usize = 256 << 10;
/// Chunks written before the kill, and as many again while it happens.
const CHUNKS: u32 = 24;
const INODE: u64 = 0x4d4a;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this test in the guest (shared/vm/guest --rxe)")
    })
}

fn rdma_config() -> RdmaConfig {
    RdmaConfig {
        device: env("FLYFS_RXE_DEV"),
        gid_index: env("FLYFS_RXE_GID_INDEX")
            .parse()
            .expect("FLYFS_RXE_GID_INDEX is a small integer"),
        ..RdmaConfig::default()
    }
}

/// The configs `write_configs` writes, moved to the RDMA transport.
fn move_to_rdma(dir: &Path) {
    let path = dir.join("mgmtd.toml");
    let mut mgmtd: MgmtdConfig =
        toml::from_str(&std::fs::read_to_string(&path).expect("read mgmtd.toml"))
            .expect("parse mgmtd.toml");
    mgmtd.transport = TransportKind::Rdma;
    mgmtd.rdma = rdma_config();
    std::fs::write(&path, mgmtd.to_toml()).expect("write mgmtd.toml");
    for node in 1..=NODES {
        let path = dir.join(format!("storage{node}.toml"));
        let mut storage: StorageDaemonConfig =
            toml::from_str(&std::fs::read_to_string(&path).expect("read storage.toml"))
                .expect("parse storage.toml");
        storage.transport = TransportKind::Rdma;
        storage.rdma = rdma_config();
        // The emulated machine is slow: leases and forwards get room.
        storage.rpc_timeout_ms = 5000;
        std::fs::write(&path, storage.to_toml()).expect("write storage.toml");
    }
}

fn content(index: u32) -> Vec<u8> {
    let mut state = u64::from(index) ^ 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(CHUNK_BYTES);
    while data.len() < CHUNK_BYTES {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(CHUNK_BYTES);
    data
}

fn chunk(index: u32) -> ChunkId {
    ChunkId::new(INODE, index)
}

/// The client's RDMA transport: chunks are written from one registered
/// pool, and read into buffers lent from another.
fn client_transport(pool: &BufferPool, replies: &BufferPool) -> RdmaTransport {
    let rdma = rdma_config()
        .open(TransportKind::Rdma)
        .expect("the guest's rxe device")
        .expect("an RDMA transport");
    rdma.register_arenas(Arc::new(pool.clone()))
        .expect("registering the write buffers");
    rdma.register_arenas(Arc::new(replies.clone()))
        .expect("registering the read buffers");
    let replies = replies.clone();
    rdma.lend_replies_from(move |len| Box::new(replies.alloc(len)))
}

async fn write(client: &StorageClient<Tcp>, pool: &BufferPool, index: u32) -> Result<(), String> {
    let data = content(index);
    let mut buf = pool.alloc(CHUNK_BYTES);
    buf.copy_from_slice(&data);
    client
        .write(
            ChainId(CHAIN),
            chunk(index),
            0,
            Bytes::from_owner(buf),
            CHUNK_BYTES as u32,
        )
        .await
        .map(drop)
        .map_err(|error| format!("write of chunk {index}: {error}"))
}

async fn verify(client: &StorageClient<Tcp>, index: u32) -> Result<(), String> {
    let read = client
        .read(ChainId(CHAIN), chunk(index), 0, CHUNK_BYTES as u32)
        .await
        .map_err(|error| format!("read of chunk {index}: {error}"))?;
    let expected = crc32c::crc32c(&content(index));
    let actual = crc32c::crc32c(&read.data);
    if read.data.len() == CHUNK_BYTES && actual == expected {
        Ok(())
    } else {
        Err(format!(
            "chunk {index}: read {} bytes with CRC {actual:#010x}, wrote {expected:#010x}",
            read.data.len()
        ))
    }
}

#[test]
fn a_chain_over_rdma_survives_a_storage_process_killed_mid_transfer() {
    let started = Instant::now();
    // The devices are opened with O_DIRECT, which the guest's tmpfs /tmp
    // refuses: FLYFS_TEST_DIR names a directory on a real filesystem (ext4
    // on the guest's second NVMe controller).
    let base = std::env::var("FLYFS_TEST_DIR").unwrap_or_else(|_| {
        panic!(
            "FLYFS_TEST_DIR is not set: this test runs in the guest, on a filesystem that takes \
             O_DIRECT (scripts/test-guest mounts one; see this file's doc)"
        )
    });
    let dir = tempfile::tempdir_in(&base)
        .unwrap_or_else(|error| panic!("a temporary directory in FLYFS_TEST_DIR={base}: {error}"));
    let dir = dir.path();
    format_devices(dir, NODES, "64MiB");
    let ports = free_ports(1 + NODES as usize);
    write_configs(dir, ports[0], &ports[1..]);
    move_to_rdma(dir);
    let mut cluster = Cluster::new(
        dir,
        format!("127.0.0.1:{}", ports[0]),
        ports[1..]
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect(),
    );
    cluster.start_mgmtd();
    for node in 1..=NODES {
        cluster.start_storage(node);
    }
    cluster.wait_nodes_alive(NODES as usize, Duration::from_secs(120));
    cluster.create_chains(&[CHAIN], NODES);
    cluster.wait_all_serving(Duration::from_secs(120));
    eprintln!(
        "[{:>6.2?}] three storage processes on RDMA serve chain {CHAIN}",
        started.elapsed()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pool = BufferPool::new(&PoolConfig {
        classes: vec![(CHUNK_BYTES, 16)],
        ..PoolConfig::default()
    })
    .expect("write buffers");
    let replies = BufferPool::new(&PoolConfig {
        classes: vec![(CHUNK_BYTES, 16)],
        ..PoolConfig::default()
    })
    .expect("read buffers");
    let mut config = ClientConfig::new([cluster.mgmt_addr.clone()], ClientId(0x4d4a));
    config.rpc_timeout = Duration::from_secs(10);
    config.op_deadline = Duration::from_secs(120);
    config.backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    let credentials = support::credentials(dir, "client");
    let client = Arc::new(StorageClient::with_transport(
        config,
        Tcp,
        credentials,
        Some(client_transport(&pool, &replies)),
    ));

    let before = flyfs_rpc::metrics::payload_moved_totals();
    runtime.block_on(async {
        for index in 0..CHUNKS {
            write(&client, &pool, index)
                .await
                .expect("a write before the kill");
        }
        for index in 0..CHUNKS {
            verify(&client, index)
                .await
                .expect("a read before the kill");
        }
    });
    // The client's bytes moved one-sided both ways: the writes' payloads
    // were pulled, the reads' written into its buffers.
    let moved = |totals: Vec<flyfs_rpc::metrics::PayloadMoved>, method: &str| {
        totals
            .into_iter()
            .filter(|moved| moved.method == method)
            .map(|moved| (moved.one_sided_bytes, moved.copied_bytes))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let after = flyfs_rpc::metrics::payload_moved_totals();
    let bytes = u64::from(CHUNKS) * CHUNK_BYTES as u64;
    for method in ["storage.Write", "storage.BatchRead"] {
        let (one_sided_before, copied_before) = moved(before.clone(), method);
        let (one_sided, copied) = moved(after.clone(), method);
        assert!(
            one_sided - one_sided_before >= bytes,
            "{method}: {} bytes one-sided, {bytes} expected",
            one_sided - one_sided_before
        );
        assert_eq!(copied, copied_before, "{method}: nothing copied");
    }
    eprintln!(
        "[{:>6.2?}] {CHUNKS} chunks written and read one-sided",
        started.elapsed()
    );

    // Writes and reads in flight while the victim dies.
    let workload = {
        let client = client.clone();
        let pool = pool.clone();
        runtime.spawn(async move {
            for index in CHUNKS..2 * CHUNKS {
                write(&client, &pool, index).await?;
                verify(&client, index - CHUNKS).await?;
            }
            Ok::<(), String>(())
        })
    };
    support::wait_for(
        "the workload to be under way",
        Duration::from_secs(60),
        || {
            flyfs_rpc::metrics::payload_moved_totals()
                .iter()
                .filter(|moved| moved.method == "storage.Write")
                .map(|moved| moved.one_sided_bytes)
                .sum::<u64>()
                > moved(after.clone(), "storage.Write").0
        },
    );
    cluster.kill_storage(VICTIM);
    eprintln!(
        "[{:>6.2?}] SIGKILLed storage{VICTIM} mid-transfer",
        started.elapsed()
    );
    runtime
        .block_on(workload)
        .expect("workload task")
        .expect("writes and reads go on with two replicas");
    eprintln!(
        "[{:>6.2?}] workload done on two replicas",
        started.elapsed()
    );

    cluster.start_storage(VICTIM);
    let took = cluster.wait_all_serving(Duration::from_secs(180));
    eprintln!(
        "[{:>6.2?}] storage{VICTIM} back, chain serving ({took:.2?})",
        started.elapsed()
    );
    // Every chunk verifies, read over and over so that each replica
    // (reads spread over the serving ones) serves each chunk.
    runtime.block_on(async {
        for _ in 0..NODES {
            for index in 0..2 * CHUNKS {
                verify(&client, index)
                    .await
                    .expect("a chunk after recovery");
            }
        }
    });
    eprintln!(
        "[{:>6.2?}] all {} chunks verify",
        started.elapsed(),
        2 * CHUNKS
    );
    drop(client);
    cluster.terminate_all(Duration::from_secs(60));
}
