//! The KV cache against a real cluster in this process (fs-meta's
//! `TestCluster`: a manager, three storage nodes with three-replica chains,
//! the metadata service on fjall, all over loopback TCP with mutual TLS):
//! round trips with per-key results, bad input, concurrent writers of one
//! key, eviction under capacity, burst removal, and a new metadata instance
//! and new clients finding every block.

use std::sync::Arc;
use std::time::Duration;

use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_fs_meta::gc::GcStats;
use flyfs_fs_meta::ns::{LayoutSpec, Namespace, NsConfig};
use flyfs_fs_meta::service::{CallerPolicy, MetaService, RoutingChainTables};
use flyfs_fs_meta::testing::{ClusterOptions, NodeOptions, TestCluster, bind};
use flyfs_kvcache::{GetResult, KvCache, KvCacheConfig, KvError, PutResult};
use flyfs_proto::ids::{ChainTableId, ClientId};
use flyfs_rpc::{Server, ServerConfig, Tcp, testing};

/// Slots of 64 KiB and 256 KiB (the test devices hold chunks up to 256 KiB).
fn config(slots: u32) -> KvCacheConfig {
    KvCacheConfig {
        classes: vec![(64 << 10, slots), (256 << 10, slots)],
        chain_table: ChainTableId(1),
        max_age_ms: 0,
        evict_when_full: true,
    }
}

async fn cluster() -> TestCluster {
    TestCluster::start(ClusterOptions {
        chains: 3,
        node: NodeOptions {
            device_bytes: 256 << 20,
            chunk_bytes_max: 256 << 10,
            ..NodeOptions::default()
        },
        ..ClusterOptions::default()
    })
    .await
}

/// A client of its own (its own connections and exactly-once channels), as
/// another inference process would be.
async fn client(cluster: &TestCluster, id: u64, config: &KvCacheConfig) -> KvCache<Tcp> {
    let mut storage_config = ClientConfig::new([cluster.mgmt_addr.clone()], ClientId(id));
    storage_config.op_deadline = Duration::from_secs(30);
    let storage = StorageClient::new(storage_config, Tcp, testing::client());
    let meta = MetaClient::new(
        Tcp,
        MetaClientConfig::new(cluster.meta_addrs.clone()),
        testing::client(),
    );
    KvCache::open(meta, storage, config).await.expect("open")
}

/// Distinct bytes for (key, writer).
fn block(key: u32, writer: u32, len: usize) -> Vec<u8> {
    let mut state = u64::from(key) << 32 | u64::from(writer) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn key(i: u32) -> Vec<u8> {
    format!("model-7b/rank0/prefix-{i:08x}").into_bytes()
}

async fn get(cache: &KvCache<Tcp>, keys: &[Vec<u8>], len: usize) -> Vec<(GetResult, Vec<u8>)> {
    let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let mut buffers: Vec<Vec<u8>> = keys.iter().map(|_| vec![0u8; len]).collect();
    let mut slices: Vec<&mut [u8]> = buffers.iter_mut().map(Vec::as_mut_slice).collect();
    let results = cache
        .batch_get_into(&key_refs, &mut slices)
        .await
        .expect("get");
    results
        .into_iter()
        .zip(buffers)
        .map(|(r, mut b)| {
            if let GetResult::Found(n) = r {
                b.truncate(n);
            }
            (r, b)
        })
        .collect()
}

async fn put(cache: &KvCache<Tcp>, keys: &[Vec<u8>], blocks: &[Vec<u8>]) -> Vec<PutResult> {
    let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let buffers: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    cache
        .batch_put_from(&key_refs, &buffers)
        .await
        .expect("put")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocks_round_trip_with_a_result_per_key() {
    let cluster = cluster().await;
    let cache = client(&cluster, 100, &config(64)).await;
    // Sizes in both classes, one on a class boundary, one empty.
    let sizes = [1usize, 64 << 10, (64 << 10) + 1, 200_000, 256 << 10, 0];
    let keys: Vec<Vec<u8>> = (0..sizes.len() as u32).map(key).collect();
    let blocks: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| block(i as u32, 0, len))
        .collect();
    let stored = put(&cache, &keys, &blocks).await;
    assert!(stored.iter().all(|r| *r == PutResult::Stored), "{stored:?}");
    // Written once: a second put sends nothing and keeps the first block.
    let again = put(&cache, &keys, &blocks).await;
    assert!(again.iter().all(|r| *r == PutResult::Exists), "{again:?}");

    let mut asked = keys.clone();
    asked.push(key(999));
    let got = get(&cache, &asked, 256 << 10).await;
    for (i, (result, bytes)) in got.iter().enumerate().take(sizes.len()) {
        assert_eq!(*result, GetResult::Found(sizes[i]), "key {i}");
        assert!(bytes == &blocks[i], "key {i}: wrong bytes");
    }
    assert_eq!(got[sizes.len()].0, GetResult::Missing);
    let key_refs: Vec<&[u8]> = asked.iter().map(Vec::as_slice).collect();
    let mut exists = vec![true; sizes.len()];
    exists.push(false);
    assert_eq!(cache.batch_exists(&key_refs).await.expect("exists"), exists);

    // A buffer too small is that key's error, naming both sizes; the other
    // keys of the batch are served.
    let mut small = vec![0u8; 1000];
    let mut big = vec![0u8; 1 << 20];
    let mut buffers: Vec<&mut [u8]> = vec![&mut small, &mut big];
    let results = cache
        .batch_get_into(&[&keys[3], &keys[0]], &mut buffers)
        .await
        .expect("get");
    assert_eq!(
        results[0],
        GetResult::BufferTooSmall {
            block_bytes: 200_000,
            buffer_bytes: 1000
        }
    );
    assert!(results[0].to_string().contains("200000"));
    assert!(results[0].to_string().contains("1000"));
    assert_eq!(results[1], GetResult::Found(1));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_with_what_was_wrong() {
    let cluster = cluster().await;
    let cache = client(&cluster, 101, &config(8)).await;
    let too_long = vec![b'k'; 513];
    let error = cache
        .batch_exists(&[b"fine", &too_long])
        .await
        .expect_err("long key");
    assert!(
        matches!(error, KvError::BadKey { index: 1, len: 513 }),
        "{error}"
    );
    assert!(error.to_string().contains("513"), "{error}");
    let error = cache.batch_remove(&[b""]).await.expect_err("empty key");
    assert!(
        matches!(error, KvError::BadKey { index: 0, len: 0 }),
        "{error}"
    );
    let error = cache
        .batch_put_from(&[b"a", b"b"], &[b"only one"])
        .await
        .expect_err("mismatch");
    assert!(
        error.to_string().contains("2 keys but 1 buffers"),
        "{error}"
    );
    // A block larger than every slot is that key's result.
    let huge = vec![0u8; (256 << 10) + 1];
    let results = cache
        .batch_put_from(&[b"huge", b"small"], &[&huge, b"x"])
        .await
        .expect("put");
    assert_eq!(
        results,
        vec![
            PutResult::TooLarge {
                block_bytes: (256 << 10) + 1,
                slot_bytes_max: 256 << 10
            },
            PutResult::Stored
        ]
    );
    // A cache spec the service refuses is an error naming the bad value
    // (only for a cluster without a cache: here the first spec stands).
    let mut other = config(8);
    other.classes = vec![(100_000, 1)];
    let reopened = client(&cluster, 102, &other).await;
    assert_eq!(reopened.layout().classes.len(), 2, "the first spec wins");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_one_key_never_tear_a_block() {
    let cluster = cluster().await;
    let writers = 4u32;
    let keys: Vec<Vec<u8>> = (0..16).map(key).collect();
    let len = 100_000;
    let mut caches = Vec::new();
    for w in 0..writers {
        caches.push(Arc::new(
            client(&cluster, 200 + u64::from(w), &config(256)).await,
        ));
    }
    let reader = client(&cluster, 299, &config(256)).await;
    let mut tasks = Vec::new();
    for (w, cache) in caches.iter().enumerate() {
        let cache = cache.clone();
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let blocks: Vec<Vec<u8>> = (0..keys.len() as u32)
                .map(|k| block(k, w as u32, len))
                .collect();
            put(&cache, &keys, &blocks).await
        }));
    }
    // Read while they write: every block found is one writer's, whole.
    let mut reads = 0;
    while tasks.iter().any(|t| !t.is_finished()) || reads == 0 {
        for (k, (result, bytes)) in get(&reader, &keys, len).await.into_iter().enumerate() {
            match result {
                GetResult::Found(n) => {
                    assert_eq!(n, len);
                    assert!(
                        (0..writers).any(|w| bytes == block(k as u32, w, len)),
                        "key {k}: a block no writer wrote"
                    );
                }
                GetResult::Missing => {}
                other => panic!("key {k}: {other:?}"),
            }
        }
        reads += 1;
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("writer"));
    }
    for k in 0..keys.len() {
        let stored: Vec<u32> = (0..writers)
            .filter(|&w| outcomes[w as usize][k] == PutResult::Stored)
            .collect();
        assert_eq!(stored.len(), 1, "key {k}: stored by {stored:?}");
        for (w, outcome) in outcomes.iter().enumerate() {
            assert!(
                matches!(outcome[k], PutResult::Stored | PutResult::Exists),
                "key {k} writer {w}: {:?}",
                outcome[k]
            );
        }
        // The winner's block is what everyone reads.
        let (result, bytes) = get(&reader, &keys[k..=k], len).await.remove(0);
        assert_eq!(result, GetResult::Found(len));
        assert!(bytes == block(k as u32, stored[0], len), "key {k}");
    }
    let report = cluster.ns.check().await.expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_cache_evicts_the_oldest_blocks_or_refuses_when_asked_to() {
    let cluster = cluster().await;
    let slots = 16u32;
    let cache = client(&cluster, 300, &config(slots)).await;
    let keys: Vec<Vec<u8>> = (0..48).map(key).collect();
    let blocks: Vec<Vec<u8>> = (0..48).map(|k| block(k, 0, 5000)).collect();
    for batch in 0..6 {
        let range = batch * 8..batch * 8 + 8;
        let stored = put(&cache, &keys[range.clone()], &blocks[range]).await;
        assert!(stored.iter().all(|r| *r == PutResult::Stored), "{stored:?}");
    }
    let got = get(&cache, &keys, 5000).await;
    let present: Vec<usize> = (0..48)
        .filter(|&k| matches!(got[k].0, GetResult::Found(_)))
        .collect();
    assert!(present.len() <= slots as usize, "{present:?}");
    // The newest batch is all there; the oldest is all gone.
    for k in 40..48 {
        assert_eq!(got[k].0, GetResult::Found(5000), "key {k}");
        assert!(got[k].1 == blocks[k]);
    }
    assert!((0..8).all(|k| got[k].0 == GetResult::Missing));

    // Without eviction a full class answers Full per block.
    let mut strict = config(slots);
    strict.evict_when_full = false;
    let strict = client(&cluster, 301, &strict).await;
    let free = slots as usize - present.len();
    let more: Vec<Vec<u8>> = (100..100 + free as u32 + 2).map(key).collect();
    let more_blocks: Vec<Vec<u8>> = (0..more.len() as u32).map(|k| block(k, 1, 10)).collect();
    let results = put(&strict, &more, &more_blocks).await;
    let full = results.iter().filter(|r| **r == PutResult::Full).count();
    assert_eq!(full, 2, "{results:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_removals_frees_every_slot_for_reuse() {
    let cluster = cluster().await;
    let slots = 256u32;
    let mut strict = config(slots);
    strict.evict_when_full = false;
    let cache = client(&cluster, 400, &strict).await;
    let keys: Vec<Vec<u8>> = (0..slots).map(key).collect();
    let blocks: Vec<Vec<u8>> = (0..slots).map(|k| block(k, 0, 3000)).collect();
    let stored = put(&cache, &keys, &blocks).await;
    assert!(stored.iter().all(|r| *r == PutResult::Stored));
    let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    assert_eq!(
        cache.batch_remove(&key_refs).await.expect("remove"),
        vec![true; slots as usize]
    );
    assert_eq!(
        cache.batch_exists(&key_refs).await.expect("exists"),
        vec![false; slots as usize]
    );
    // Every slot is free again: a full class's worth fits without eviction.
    let other: Vec<Vec<u8>> = (1000..1000 + slots).map(key).collect();
    let other_blocks: Vec<Vec<u8>> = (0..slots).map(|k| block(k, 9, 3000)).collect();
    let stored = put(&cache, &other, &other_blocks).await;
    assert!(stored.iter().all(|r| *r == PutResult::Stored), "{stored:?}");
    let got = get(&cache, &other, 3000).await;
    for (k, (result, bytes)) in got.iter().enumerate() {
        assert_eq!(*result, GetResult::Found(3000));
        assert!(*bytes == other_blocks[k]);
    }
    let report = cluster.ns.check().await.expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_metadata_instance_and_new_clients_find_every_block() {
    let mut cluster = cluster().await;
    let keys: Vec<Vec<u8>> = (0..40).map(key).collect();
    let blocks: Vec<Vec<u8>> = (0..40).map(|k| block(k, 0, 70_000)).collect();
    {
        let writer = client(&cluster, 500, &config(64)).await;
        let stored = put(&writer, &keys, &blocks).await;
        assert!(stored.iter().all(|r| *r == PutResult::Stored));
    }
    // A metadata instance started now, on the same store, knows nothing but
    // what the store holds.
    let ns_config = NsConfig::new(
        LayoutSpec {
            chain_table: ChainTableId(1),
            chunk_size: 64 << 10,
            stripe: 1,
        },
        Arc::new(RoutingChainTables(cluster.meta_storage.clone())),
    );
    let ns = Namespace::open(cluster.ns.kv().clone(), ns_config)
        .await
        .expect("namespace");
    let (listener, addr) = bind("127.0.0.1:0").await;
    let server = Server::new(
        MetaService::new(
            ns,
            cluster.meta_storage.clone(),
            Arc::new(GcStats::default()),
            CallerPolicy::default(),
        ),
        ServerConfig::default(),
        testing::meta(),
    )
    .spawn(listener)
    .expect("serve");
    cluster.meta_addrs = vec![addr];
    // And a storage node restarts under the readers: chains fail over.
    cluster.nodes[0].stop().await;
    cluster.nodes[0].start().await;
    let reader = client(&cluster, 501, &config(1)).await;
    assert_eq!(reader.layout().classes[0].slots, 64, "the stored layout");
    let got = get(&reader, &keys, 70_000).await;
    for (k, (result, bytes)) in got.iter().enumerate() {
        assert_eq!(*result, GetResult::Found(70_000), "key {k}");
        assert!(*bytes == blocks[k], "key {k}");
    }
    server.shutdown().await;
    cluster.shutdown().await;
}
