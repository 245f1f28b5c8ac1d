//! The KV cache without `async`: what a language binding (the Python
//! package) calls. It owns a small tokio runtime and the clients, connects
//! with the credentials it is given (the storage client over RDMA when it
//! is given a device, the metadata client over TCP, as a mount does), and
//! blocks the calling thread for each batch. A binding lends its
//! `memoryview`s or numpy arrays as owned views (`batch_put_bytes`,
//! `batch_get_landing`), so their bytes move between the caller's memory
//! and the connection with no copy; on RDMA, views inside memory it
//! registered ([`BlockingKvCache::register_arena`]) move one-sided, by the
//! storage nodes' RDMA READs and WRITEs. The slice calls copy each block
//! once.

use std::sync::Arc;
use std::time::Duration;

use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_proto::ids::ClientId;
use flyfs_proto::wire::meta::{KvEvictRsp, KvOpenRsp};
use flyfs_rpc::rdma::{Arena, ArenaRegistration, RdmaError};
use flyfs_rpc::{Credentials, RdmaTransport, Tcp};

use crate::{GetResult, KvCache, KvCacheConfig, KvError, PutResult};

/// Where the cluster is and who this client is.
#[derive(Clone, Debug)]
pub struct Connect {
    /// The cluster managers (`host:port`), primary and standbys.
    pub mgmt: Vec<String>,
    /// Metadata service instances.
    pub meta: Vec<String>,
    /// This client's credentials (a `client` identity of the cluster).
    pub credentials: Credentials,
    /// Distinct for every client process of the cluster.
    pub client: ClientId,
    /// How long one operation keeps retrying through failovers.
    pub op_deadline: Duration,
    /// The RDMA device the storage client reaches the storage nodes by;
    /// `None`: TCP.
    pub rdma: Option<RdmaTransport>,
}

/// A [`KvCache`] whose calls block.
#[derive(Debug)]
pub struct BlockingKvCache {
    runtime: tokio::runtime::Runtime,
    cache: KvCache<Tcp>,
}

impl BlockingKvCache {
    /// Connects and opens the cache (creating it with `config`'s layout if
    /// the cluster has none).
    pub fn open(connect: Connect, config: &KvCacheConfig) -> Result<BlockingKvCache, KvError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("flyfs-kvcache")
            .enable_all()
            .build()
            .map_err(KvError::Runtime)?;
        let cache = runtime.block_on(async {
            let mut storage_config = ClientConfig::new(connect.mgmt.clone(), connect.client);
            storage_config.op_deadline = connect.op_deadline;
            let storage = StorageClient::with_transport(
                storage_config,
                Tcp,
                connect.credentials.clone(),
                connect.rdma.clone(),
            );
            let mut meta_config = MetaClientConfig::new(connect.meta.clone());
            meta_config.op_deadline = connect.op_deadline;
            let meta: Arc<MetaClient<Tcp>> =
                MetaClient::new(Tcp, meta_config, connect.credentials.clone());
            KvCache::open(meta, storage, config).await
        })?;
        Ok(BlockingKvCache { runtime, cache })
    }

    /// Registers `owner`'s memory with the RDMA device until the returned
    /// guard drops (`None` on TCP, where there is nothing to register):
    /// blocks put from views inside it are pulled by the chains' heads,
    /// blocks got into views inside it written there by the replicas.
    pub fn register_arena(
        &self,
        owner: Arc<dyn Arena>,
    ) -> Option<Result<ArenaRegistration, RdmaError>> {
        self.cache.storage().register_arena(owner)
    }

    /// Whether the storage client is on the RDMA transport.
    pub fn rdma(&self) -> bool {
        self.cache.storage().rpc().rdma().is_some()
    }

    pub fn layout(&self) -> &KvOpenRsp {
        self.cache.layout()
    }

    pub fn block_bytes_max(&self) -> u32 {
        self.cache.block_bytes_max()
    }

    pub fn batch_put_from(
        &self,
        keys: &[&[u8]],
        buffers: &[&[u8]],
    ) -> Result<Vec<PutResult>, KvError> {
        self.runtime
            .block_on(self.cache.batch_put_from(keys, buffers))
    }

    pub fn batch_get_into(
        &self,
        keys: &[&[u8]],
        buffers: &mut [&mut [u8]],
    ) -> Result<Vec<GetResult>, KvError> {
        self.runtime
            .block_on(self.cache.batch_get_into(keys, buffers))
    }

    /// [`KvCache::batch_put_bytes`]: blocks sent from the memory their
    /// `Bytes` view, with no copy.
    pub fn batch_put_bytes(
        &self,
        keys: &[&[u8]],
        buffers: &[bytes::Bytes],
    ) -> Result<Vec<PutResult>, KvError> {
        self.runtime
            .block_on(self.cache.batch_put_bytes(keys, buffers))
    }

    /// [`KvCache::batch_get_landing`]: blocks read from the connection
    /// straight into the buffers, which come back with the results.
    pub fn batch_get_landing<B>(
        &self,
        keys: &[&[u8]],
        buffers: Vec<B>,
    ) -> (Vec<B>, Result<Vec<GetResult>, KvError>)
    where
        B: AsMut<[u8]> + Send + 'static,
    {
        self.runtime
            .block_on(self.cache.batch_get_landing(keys, buffers))
    }

    pub fn batch_exists(&self, keys: &[&[u8]]) -> Result<Vec<bool>, KvError> {
        self.runtime.block_on(self.cache.batch_exists(keys))
    }

    pub fn batch_remove(&self, keys: &[&[u8]]) -> Result<Vec<bool>, KvError> {
        self.runtime.block_on(self.cache.batch_remove(keys))
    }

    pub fn evict_aged(&self) -> Result<KvEvictRsp, KvError> {
        self.runtime.block_on(self.cache.evict_aged())
    }
}
