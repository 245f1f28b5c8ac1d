//! Storage nodes for fs-meta's integration tests: a chunk engine on a memory
//! device behind a real TCP server, heartbeating to the given managers.
//! Shared by the metadata service and manager failover tests.

use std::sync::Arc;
use std::time::Duration;

use flyfs_bypass::mem::MemDevice;
use flyfs_bypass::{BufferPool, HugePages, PoolConfig};
use flyfs_chunk_engine::{Engine, EngineConfig, FormatOptions};
use flyfs_craq::{StorageConfig, StorageNode, StorageService};
use flyfs_rpc::ids::NodeId;
use flyfs_rpc::{Server, ServerConfig, ServerHandle, Tcp};

/// Chunk size of every chain the tests build.
pub const CHUNK: u32 = 64 << 10;

/// A listener on `addr` (port 0 for any) and the address it got.
pub async fn bind(addr: &str) -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    (listener, addr)
}

/// Storage node `i` on a fresh 64 MiB memory device; `interval` is its
/// heartbeat period, and its lease and RPC timeouts are ten of them.
pub async fn storage_node(i: u32, mgmt_addrs: &[String], interval: Duration) -> ServerHandle {
    let dev = MemDevice::new(64 << 20, 4096);
    let format = FormatOptions {
        chunk_size_min: 4 << 10,
        chunk_size_max: u64::from(CHUNK),
        journal_bytes: Some(1 << 20),
        force: false,
    };
    Engine::format(&dev, &format).await.expect("format");
    let pool = BufferPool::new(&PoolConfig {
        classes: vec![(4 << 10, 64), (64 << 10, 64)],
        hugepages: HugePages::Never,
    })
    .expect("pool");
    let engine = Engine::open(dev, pool, EngineConfig::default())
        .await
        .expect("open");
    let (listener, addr) = bind("127.0.0.1:0").await;
    let mut config = StorageConfig::new(NodeId(i), addr, String::new());
    config.mgmt_addrs = mgmt_addrs.to_vec();
    config.heartbeat_interval = interval;
    config.lease_timeout = interval * 10;
    config.rpc_timeout = interval * 10;
    let node = StorageNode::new(config, vec![Arc::new(engine)], Tcp);
    tokio::spawn(node.clone().run());
    Server::new(StorageService::new(node), ServerConfig::default())
        .spawn(listener)
        .expect("serve storage")
}
