//! More chunk updates at once than a storage target lets one client hold
//! exactly-once channels: the client waits for a channel rather than
//! opening one the targets refuse. A mount once failed every write with EIO
//! after a burst of 4 KiB random writes (fio, four jobs, three replicas)
//! had opened more than the targets' 4096 channels per client, and stayed
//! failed, since the targets remember a client's channels for an hour.

use bytes::Bytes;
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_fs_meta::testing::{ClusterOptions, NodeOptions, TestCluster};
use flyfs_proto::ids::{ChainId, ChunkId, ClientId};
use flyfs_rpc::Tcp;

const CHUNK: u32 = 64 << 10;
const INODE: u64 = 0x6368;
/// Channels a target lets one client hold, and the client's updates in
/// flight.
const LIMIT: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_updates_stays_within_the_targets_channel_limit() {
    let cluster = TestCluster::start(ClusterOptions {
        node: NodeOptions {
            channels_per_client_max: LIMIT,
            ..NodeOptions::default()
        },
        ..ClusterOptions::default()
    })
    .await;
    let mut config = ClientConfig::new([cluster.mgmt_addr.clone()], ClientId(INODE));
    config.updates_in_flight_max = LIMIT;
    let client = StorageClient::new(config, Tcp, flyfs_rpc::testing::client());
    client.refresh_routing().await.expect("routing");
    // Two bursts: the second reuses the first one's channels.
    for burst in 0..2u32 {
        let writes: Vec<_> = (0..100u32)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let data = Bytes::from(vec![(burst + i) as u8; 4096]);
                    let chunk = ChunkId::new(INODE, i);
                    client
                        .write(ChainId(1 + i % 2), chunk, 0, data, CHUNK)
                        .await
                })
            })
            .collect();
        for (i, write) in writes.into_iter().enumerate() {
            if let Err(error) = write.await.expect("the write's task") {
                panic!("burst {burst}, write {i}: {error}");
            }
        }
    }
    cluster.shutdown().await;
}
