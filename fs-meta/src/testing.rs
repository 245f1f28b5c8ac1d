//! A whole cluster in one process, over real TCP on loopback, for
//! integration tests (feature `testing`): a cluster manager, storage nodes
//! on memory devices with three-replica chains in one chain table, and
//! metadata service instances sharing one embedded store (fjall), each
//! with its GC worker and session reaper.
//!
//! Shared by fs-meta's own tests and the file client's, so the tests above
//! the storage layer build their cluster one way. Storage nodes can be
//! stopped and restarted (their device survives) to test failover.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_craq::mgmt::{MemStore, MgmtConfig, MgmtService};
pub use flyfs_craq::testing::{NodeOptions, TestStorageNode, bind};
use flyfs_proto::Method;
use flyfs_proto::ids::{ChainId, ChainTableId, ClientId, NodeId, TargetId};
use flyfs_proto::wire::mgmt::{
    CreateChain, CreateChainReq, CreateChainTable, CreateChainTableReq, CreateTarget,
    CreateTargetReq, PublicState,
};
use flyfs_rpc::{CallOptions, Client, Server, ServerConfig, ServerHandle, Tcp, testing};

use crate::gc::{GcConfig, GcStats, GcWorker};
use crate::ns::{CLIENT_LEASE_MS_DEFAULT, LayoutSpec, Namespace, NsConfig};
use crate::reaper::{ReaperConfig, ReaperStats, SessionReaper};
use crate::service::{CallerPolicy, MetaService, RoutingChainTables, ServiceStats};
use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_kv::fjall::{FjallKv, FjallOptions};
use flyfs_time::{Clock, WallClock};

/// The shape of a [`TestCluster`].
#[derive(Clone, Copy, Debug)]
pub struct ClusterOptions {
    /// Storage nodes; every chain has one replica on each of three of them.
    pub nodes: u32,
    /// Three-replica chains in chain table 1.
    pub chains: u32,
    /// Metadata service instances on the one store.
    pub meta_instances: usize,
    /// The root directory's layout: chunk size and chains per file.
    pub chunk_size: u32,
    pub stripe: u32,
    pub node: NodeOptions,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            nodes: 3,
            chains: 2,
            meta_instances: 1,
            chunk_size: 64 << 10,
            stripe: 2,
            node: NodeOptions::default(),
        }
    }
}

/// How the metadata instances of a [`TestCluster`] keep time and leases
/// (beside [`ClusterOptions`], which is `Copy`; a clock is not).
#[derive(Clone, Debug)]
pub struct MetaOptions {
    /// Every instance's clock: a `ManualClock` steps leases and GC delays
    /// without waiting for them.
    pub clock: Arc<dyn Clock>,
    pub client_lease_ms: u64,
    /// Between passes of each instance's session reaper.
    pub reaper_interval: Duration,
    pub callers: CallerPolicy,
    /// How soon the embedded store makes a relaxed commit durable on its
    /// own (`FjallOptions::relaxed_within`).
    pub relaxed_within: Duration,
}

impl Default for MetaOptions {
    fn default() -> MetaOptions {
        MetaOptions {
            clock: Arc::new(WallClock),
            client_lease_ms: CLIENT_LEASE_MS_DEFAULT,
            reaper_interval: Duration::from_millis(50),
            callers: CallerPolicy::default(),
            relaxed_within: FjallOptions::default().relaxed_within,
        }
    }
}

/// A running cluster; everything stops when it is dropped.
#[derive(Debug)]
pub struct TestCluster {
    pub mgmt: Arc<MgmtService>,
    pub mgmt_addr: String,
    pub nodes: Vec<TestStorageNode>,
    /// A storage client (client id 9) with the routing of a fully serving
    /// cluster.
    pub storage: Arc<StorageClient<Tcp>>,
    /// The metadata instances' storage client: the metadata service's
    /// identity, client id 10.
    pub meta_storage: Arc<StorageClient<Tcp>>,
    pub meta_addrs: Vec<String>,
    /// One client per metadata instance.
    pub meta: Vec<Arc<MetaClient<Tcp>>>,
    /// The namespace (any instance's view of the one store).
    pub ns: Namespace<FjallKv>,
    pub gc_stats: Vec<Arc<GcStats>>,
    pub reaper_stats: Vec<Arc<ReaperStats>>,
    /// Each metadata instance's service counters (requests per method,
    /// chains asked for lengths).
    pub service_stats: Vec<Arc<ServiceStats>>,
    servers: Vec<ServerHandle>,
    _dir: tempfile::TempDir,
}

/// Calls a manager admin method, panicking on any failure.
pub async fn admin<M: Method>(rpc: &Client<Tcp>, addr: &str, req: &M::Req) -> M::Rsp {
    match rpc
        .call::<M>(addr, req, Bytes::new(), &CallOptions::default())
        .await
    {
        Ok((rsp, _)) => rsp,
        Err(e) => panic!("{}: {e}", M::NAME),
    }
}

impl TestCluster {
    pub async fn start(options: ClusterOptions) -> TestCluster {
        TestCluster::start_with(options, MetaOptions::default()).await
    }

    /// A cluster whose metadata instances run on `meta`'s clock and lease.
    pub async fn start_with(options: ClusterOptions, meta_options: MetaOptions) -> TestCluster {
        assert!(options.nodes >= 3, "three-replica chains need three nodes");
        let interval = options.node.interval;
        let service = MgmtService::open(
            Box::new(MemStore::new()),
            MgmtConfig {
                heartbeat_interval: interval,
                failure_timeout: interval * 40,
                tick_interval: interval,
                auto_replace_after: None,
            },
        )
        .await
        .expect("manager");
        let (listener, mgmt_addr) = bind("127.0.0.1:0").await;
        let mut servers = vec![
            Server::new(service.clone(), ServerConfig::default(), testing::mgmt())
                .spawn(listener)
                .expect("serve manager"),
        ];
        tokio::spawn(service.clone().run());
        let mut nodes = Vec::new();
        for i in 0..options.nodes {
            let mut node =
                TestStorageNode::format(i, std::slice::from_ref(&mgmt_addr), options.node).await;
            node.start().await;
            nodes.push(node);
        }
        while service.routing().nodes.len() < options.nodes as usize {
            tokio::time::sleep(interval).await;
        }
        // Targets, chains and tables are the operator's to create.
        let rpc = Client::new(Tcp, Default::default(), testing::admin());
        let mut chains = Vec::new();
        for c in 0..options.chains {
            let chain = ChainId(c + 1);
            let mut targets = Vec::new();
            for r in 0..3 {
                let node = (c + r) % options.nodes;
                let target = TargetId(u64::from(chain.0) * 100 + u64::from(node));
                let req = CreateTargetReq {
                    target,
                    node: NodeId(node),
                    disk: 0,
                };
                admin::<CreateTarget>(&rpc, &mgmt_addr, &req)
                    .await
                    .expect("target");
                targets.push(target);
            }
            let req = CreateChainReq { chain, targets };
            admin::<CreateChain>(&rpc, &mgmt_addr, &req)
                .await
                .expect("chain");
            chains.push(chain);
        }
        let req = CreateChainTableReq {
            table: ChainTableId(1),
            chains,
        };
        admin::<CreateChainTable>(&rpc, &mgmt_addr, &req)
            .await
            .expect("table");
        let mut config = ClientConfig::new([mgmt_addr.clone()], ClientId(9));
        config.rpc_timeout = Duration::from_secs(2);
        config.op_deadline = Duration::from_secs(20);
        // The tests' storage client is a mount's; the metadata service has
        // its own, with its own identity (its GC removes chunks, it asks for
        // lengths and space), as in a deployment.
        // A client id of its own too, so that its exactly-once channels are
        // its own.
        let storage = StorageClient::new(config.clone(), Tcp, testing::client());
        config.client = ClientId(10);
        let meta_storage = StorageClient::new(config, Tcp, testing::meta());
        let cluster_serving = async || {
            let routing = storage.refresh_routing().await.expect("routing");
            !routing.tables.is_empty()
                && routing
                    .chains
                    .iter()
                    .all(|c| c.targets.iter().all(|t| t.state == PublicState::Serving))
        };
        while !cluster_serving().await {
            tokio::time::sleep(interval).await;
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let store = FjallOptions {
            relaxed_within: meta_options.relaxed_within,
            ..FjallOptions::default()
        };
        let kv = FjallKv::open(dir.path().join("meta"), store).expect("fjall");
        let spec = LayoutSpec {
            chain_table: ChainTableId(1),
            chunk_size: options.chunk_size,
            stripe: options.stripe,
        };
        let mut meta = Vec::new();
        let mut meta_addrs = Vec::new();
        let mut gc_stats = Vec::new();
        let mut reaper_stats = Vec::new();
        let mut service_stats = Vec::new();
        let mut first_ns = None;
        for _ in 0..options.meta_instances.max(1) {
            let mut ns_config =
                NsConfig::new(spec, Arc::new(RoutingChainTables(meta_storage.clone())));
            ns_config.gc_delay_ms = 0;
            ns_config.clock = meta_options.clock.clone();
            ns_config.client_lease_ms = meta_options.client_lease_ms;
            let ns = Namespace::open(kv.clone(), ns_config)
                .await
                .expect("namespace");
            let stats = Arc::new(GcStats::default());
            let gc = GcWorker::new(
                ns.clone(),
                meta_storage.clone(),
                GcConfig {
                    interval: Duration::from_millis(50),
                    ..GcConfig::default()
                },
                stats.clone(),
            );
            tokio::spawn(gc.run());
            let reaped = Arc::new(ReaperStats::default());
            let reaper = SessionReaper::new(
                ns.clone(),
                storage.clone(),
                ReaperConfig {
                    interval: meta_options.reaper_interval,
                    ..ReaperConfig::default()
                },
                reaped.clone(),
            );
            tokio::spawn(reaper.run());
            reaper_stats.push(reaped);
            let (listener, addr) = bind("127.0.0.1:0").await;
            let service = MetaService::new(
                ns.clone(),
                meta_storage.clone(),
                stats.clone(),
                meta_options.callers,
            );
            service_stats.push(service.stats().clone());
            servers.push(
                Server::new(service, ServerConfig::default(), testing::meta())
                    .spawn(listener)
                    .expect("serve meta"),
            );
            meta.push(MetaClient::new(
                Tcp,
                MetaClientConfig::new(vec![addr.clone()]),
                testing::client(),
            ));
            meta_addrs.push(addr);
            gc_stats.push(stats);
            first_ns.get_or_insert(ns);
        }
        TestCluster {
            mgmt: service,
            mgmt_addr,
            nodes,
            storage,
            meta_storage,
            meta_addrs,
            meta,
            ns: first_ns.expect("at least one instance"),
            gc_stats,
            reaper_stats,
            service_stats,
            servers,
            _dir: dir,
        }
    }

    /// Waits until every target of every chain serves again.
    pub async fn wait_all_serving(&self, timeout: Duration) {
        let start = tokio::time::Instant::now();
        loop {
            let routing = self.mgmt.routing();
            if routing
                .chains
                .iter()
                .all(|c| c.targets.iter().all(|t| t.state == PublicState::Serving))
            {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "not every target serves after {timeout:?}: {:?}",
                routing.chains
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the metadata servers and storage nodes.
    pub async fn shutdown(mut self) {
        for server in self.servers.drain(..) {
            server.shutdown().await;
        }
        for node in &mut self.nodes {
            node.stop().await;
        }
    }
}
