//! Storage nodes for integration tests (feature `testing`): a node on a
//! memory device, over real TCP on loopback, that can be stopped (as a
//! crash would) and restarted with its device intact. The in-process
//! cluster of fs-meta's tests and the manager tests build on it.

use std::sync::Arc;
use std::time::Duration;

use flyfs_bypass::mem::MemDevice;
use flyfs_bypass::{BufferPool, HugePages, PoolConfig};
use flyfs_chunk_engine::{Engine, EngineConfig, FormatOptions};
use flyfs_proto::ids::NodeId;
use flyfs_rpc::{Server, ServerConfig, ServerHandle, Service, Tcp};
use tokio::task::JoinHandle;

use crate::{StorageConfig, StorageNode, StorageService};

/// A listener on `addr` (port 0 for any) and the address it got.
pub async fn bind(addr: &str) -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    (listener, addr)
}

/// What a storage node is made of.
#[derive(Clone, Copy, Debug)]
pub struct NodeOptions {
    pub device_bytes: u64,
    /// The largest chunk the engine holds.
    pub chunk_bytes_max: u64,
    /// Heartbeat period; the lease and RPC timeouts are ten of them.
    pub interval: Duration,
    /// Each target's bound on one client's exactly-once channels.
    pub channels_per_client_max: usize,
}

impl Default for NodeOptions {
    fn default() -> NodeOptions {
        NodeOptions {
            device_bytes: 64 << 20,
            chunk_bytes_max: 64 << 10,
            interval: Duration::from_millis(50),
            channels_per_client_max: crate::storage::ChannelLimits::default()
                .channels_per_client_max,
        }
    }
}

/// A storage node: its engine's device outlives [`stop`](Self::stop), so a
/// [`start`](Self::start) afterwards is a restart with the data intact.
#[derive(Debug)]
pub struct TestStorageNode {
    pub id: NodeId,
    pub addr: String,
    device: MemDevice,
    mgmt_addrs: Vec<String>,
    options: NodeOptions,
    running: Option<(ServerHandle, JoinHandle<()>)>,
}

impl TestStorageNode {
    /// Node `id` on a freshly formatted memory device, not yet running.
    pub async fn format(id: u32, mgmt_addrs: &[String], options: NodeOptions) -> TestStorageNode {
        let device = MemDevice::new(options.device_bytes, 4096);
        let format = FormatOptions {
            chunk_size_min: 4 << 10,
            chunk_size_max: options.chunk_bytes_max,
            journal_bytes: Some(1 << 20),
            force: false,
        };
        Engine::format(&device, &format).await.expect("format");
        TestStorageNode {
            id: NodeId(id),
            addr: String::new(),
            device,
            mgmt_addrs: mgmt_addrs.to_vec(),
            options,
            running: None,
        }
    }

    /// Opens the engine and serves; keeps the address it had before.
    pub async fn start(&mut self) {
        self.start_wrapped(|service| service).await;
    }

    /// As [`start`](Self::start), serving the node's real service through
    /// `wrap`: a test's fault injection around it (a request held back, a
    /// reply delayed), as a fault-injecting device wraps a real one.
    pub async fn start_wrapped<S: Service>(
        &mut self,
        wrap: impl FnOnce(Arc<StorageService<MemDevice, Tcp>>) -> Arc<S>,
    ) {
        assert!(self.running.is_none(), "{:?} is already running", self.id);
        let pool = BufferPool::new(&PoolConfig {
            classes: vec![(4 << 10, 64), (self.options.chunk_bytes_max as usize, 64)],
            hugepages: HugePages::Never,
        })
        .expect("pool");
        let engine = Engine::open(self.device.clone(), pool, EngineConfig::default())
            .await
            .expect("open engine");
        let bind_to = if self.addr.is_empty() {
            "127.0.0.1:0"
        } else {
            &self.addr
        };
        let (listener, addr) = bind(bind_to).await;
        let interval = self.options.interval;
        let mut config = StorageConfig::new(self.id, addr.clone(), String::new());
        config.mgmt_addrs = self.mgmt_addrs.clone();
        config.heartbeat_interval = interval;
        config.lease_timeout = interval * 10;
        config.rpc_timeout = interval * 10;
        config.channel_limits.channels_per_client_max = self.options.channels_per_client_max;
        // The node's own identity, from the process's test CA: the same one
        // after a restart.
        let credentials = flyfs_rpc::testing::storage(self.id);
        let node = StorageNode::new(config, vec![Arc::new(engine)], Tcp, credentials.clone());
        let task = tokio::spawn(node.clone().run());
        let server = Server::new(
            wrap(StorageService::new(node)),
            ServerConfig::default(),
            credentials,
        )
        .spawn(listener)
        .expect("serve storage");
        self.addr = addr;
        self.running = Some((server, task));
    }

    /// Stops serving and heartbeating at once, as a crash would (the
    /// memory device keeps what was flushed and what was not).
    pub async fn stop(&mut self) {
        if let Some((server, task)) = self.running.take() {
            task.abort();
            let _ = task.await;
            server.shutdown().await;
        }
    }
}
