//! The KV cache's data path copies no payload byte: a put sends each block
//! from the caller's memory (`batch_put_bytes`), a get reads each block from
//! the connection into the caller's buffer (`batch_get_landing`), against a
//! real cluster in this process (fs-meta's `TestCluster`, loopback TCP with
//! mutual TLS). flyfs-rpc's payload counters are per process, so this test
//! has a binary of its own: nothing else here moves payloads.

use std::time::Duration;

use bytes::Bytes;
use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_fs_meta::testing::{ClusterOptions, NodeOptions, TestCluster};
use flyfs_kvcache::{GetResult, KvCache, KvCacheConfig, PutResult};
use flyfs_proto::Method;
use flyfs_proto::ids::{ChainTableId, ClientId};
use flyfs_proto::wire::storage::{BatchRead, Write};
use flyfs_rpc::{Tcp, testing};

/// (in place, copied) payload bytes of method `M` in this process so far.
fn moved<M: Method>() -> (u64, u64) {
    flyfs_rpc::metrics::payload_moved_totals()
        .into_iter()
        .find(|moved| moved.method == M::NAME)
        .map_or((0, 0), |moved| (moved.in_place_bytes, moved.copied_bytes))
}

fn block(key: u32, len: usize) -> Vec<u8> {
    let mut state = u64::from(key) << 32 | 0x9e37_79b9;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_and_get_copy_no_payload_byte() {
    let cluster = TestCluster::start(ClusterOptions {
        chains: 3,
        node: NodeOptions {
            device_bytes: 256 << 20,
            chunk_bytes_max: 256 << 10,
            ..NodeOptions::default()
        },
        ..ClusterOptions::default()
    })
    .await;
    let mut storage_config = ClientConfig::new([cluster.mgmt_addr.clone()], ClientId(900));
    storage_config.op_deadline = Duration::from_secs(30);
    let storage = StorageClient::new(storage_config, Tcp, testing::client());
    let meta = MetaClient::new(
        Tcp,
        MetaClientConfig::new(cluster.meta_addrs.clone()),
        testing::client(),
    );
    let config = KvCacheConfig {
        classes: vec![(64 << 10, 64), (256 << 10, 64)],
        chain_table: ChainTableId(1),
        max_age_ms: 0,
        evict_when_full: true,
    };
    let cache = KvCache::open(meta, storage, &config).await.expect("open");

    // Both classes, a class boundary, more blocks than chains.
    let sizes: Vec<usize> = (0..24)
        .map(|i| [64 << 10, 200_000, 256 << 10, 1][i % 4])
        .collect();
    let keys: Vec<Vec<u8>> = (0..sizes.len())
        .map(|i| format!("zero-copy/{i}").into_bytes())
        .collect();
    let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let blocks: Vec<Bytes> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| Bytes::from(block(i as u32, len)))
        .collect();
    let total: u64 = sizes.iter().map(|&len| len as u64).sum();

    let put = cache
        .batch_put_bytes(&key_refs, &blocks)
        .await
        .expect("put");
    assert!(put.iter().all(|r| *r == PutResult::Stored), "{put:?}");
    assert_eq!(moved::<Write>().1, 0, "a put copied payload bytes");

    // A missing key and a buffer too small ride along.
    let mut get_keys = key_refs.clone();
    get_keys.push(b"zero-copy/never-put");
    let mut buffers: Vec<Vec<u8>> = sizes.iter().map(|_| vec![0u8; 256 << 10]).collect();
    buffers.push(vec![0u8; 16]);
    get_keys.push(key_refs[0]);
    buffers.push(vec![0u8; 100]);
    let (in_place_before, _) = moved::<BatchRead>();
    let (buffers, results) = cache.batch_get_landing(&get_keys, buffers).await;
    let results = results.expect("get");
    for (i, len) in sizes.iter().enumerate() {
        assert_eq!(results[i], GetResult::Found(*len), "key {i}");
        assert_eq!(buffers[i][..*len], blocks[i][..], "key {i}'s bytes");
    }
    assert_eq!(results[sizes.len()], GetResult::Missing);
    assert_eq!(
        results[sizes.len() + 1],
        GetResult::BufferTooSmall {
            block_bytes: sizes[0],
            buffer_bytes: 100
        }
    );
    let (in_place, copied) = moved::<BatchRead>();
    assert_eq!(copied, 0, "a get copied payload bytes");
    assert_eq!(in_place - in_place_before, total, "bytes that landed");

    // The counters see a copy where there is one: the slice API copies
    // each block once.
    let mut slices: Vec<Vec<u8>> = sizes.iter().map(|_| vec![0u8; 256 << 10]).collect();
    let mut refs: Vec<&mut [u8]> = slices.iter_mut().map(Vec::as_mut_slice).collect();
    let results = cache
        .batch_get_into(&key_refs, &mut refs)
        .await
        .expect("get into slices");
    assert!(
        results
            .iter()
            .zip(&sizes)
            .all(|(r, len)| *r == GetResult::Found(*len))
    );
    assert_eq!(moved::<BatchRead>().1, total, "the slice API's copies");
}
