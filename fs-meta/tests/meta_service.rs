//! The metadata service over real TCP, in one process: a cluster manager,
//! three storage nodes on memory devices with two three-replica chains in
//! one chain table, and two metadata service instances sharing one
//! embedded store (fjall) with their GC workers. Covers the operations that
//! reach storage (length on close and fsync, truncate, GC of removed files
//! and trees, statfs), errno over the wire, and that either instance serves
//! what the other wrote.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_client::storage::StorageClient;
use flyfs_fs_meta::gc::GcStats;
use flyfs_fs_meta::ns::Namespace;
use flyfs_fs_meta::service::{CallerPolicy, MetaService};
use flyfs_fs_meta::testing::{ClusterOptions, TestCluster, bind};
use flyfs_kv::fjall::FjallKv;
use flyfs_proto::ids::{ChainId, ChunkId, ClientId, InodeId};
use flyfs_proto::wire::meta::{self as wire, User};
use flyfs_rpc::{Server, ServerConfig, ServerHandle, Tcp};

/// Chunk size of the root's layout.
const CHUNK: u32 = 64 << 10;
const ROOT: InodeId = InodeId(1);

/// The shared in-process cluster, with two metadata instances.
struct Cluster {
    _inner: TestCluster,
    storage: Arc<StorageClient<Tcp>>,
    meta: Vec<Arc<MetaClient<Tcp>>>,
    ns: Namespace<FjallKv>,
}

impl Cluster {
    async fn start() -> Cluster {
        let inner = TestCluster::start(ClusterOptions {
            meta_instances: 2,
            chunk_size: CHUNK,
            ..ClusterOptions::default()
        })
        .await;
        Cluster {
            storage: inner.storage.clone(),
            meta: inner.meta.clone(),
            ns: inner.ns.clone(),
            _inner: inner,
        }
    }

    async fn write(&self, attr: &wire::Attr, offset: u64, data: &[u8]) {
        let layout = attr.layout.as_ref().expect("a file has a layout");
        let mut at = offset;
        for piece in data.chunks(CHUNK as usize) {
            let index = (at / u64::from(CHUNK)) as u32;
            let within = (at % u64::from(CHUNK)) as u32;
            let chain = layout.chain_of(index).expect("chains");
            self.storage
                .write(
                    chain,
                    ChunkId {
                        inode: attr.ino,
                        index,
                    },
                    within,
                    Bytes::copy_from_slice(piece),
                    CHUNK,
                )
                .await
                .expect("write");
            at += piece.len() as u64;
        }
    }

    /// Chunks of `ino` storage still holds, on every chain.
    async fn chunks_of(&self, ino: InodeId) -> usize {
        let mut found = 0;
        for chain in [ChainId(1), ChainId(2)] {
            if self
                .storage
                .last_chunk(chain, ino)
                .await
                .expect("last chunk")
                .is_some()
            {
                found += 1;
            }
        }
        found
    }
}

fn user(uid: u32) -> User {
    User {
        uid,
        gid: uid,
        groups: vec![],
    }
}

fn create(parent: InodeId, name: &str, who: User) -> wire::CreateReq {
    wire::CreateReq {
        user: who,
        parent,
        name: name.as_bytes().to_vec(),
        mode: 0o644,
        exclusive: true,
        write: true,
        read: true,
        client: ClientId(5),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_directories_lengths_and_gc_through_two_instances() {
    let cluster = Cluster::start().await;
    let (a, b) = (&cluster.meta[0], &cluster.meta[1]);
    let root = User::root();

    // A directory for an unprivileged user, made on instance A, seen on B.
    let dir = a
        .call::<wire::Mkdir, _>(&wire::MkdirReq {
            user: root.clone(),
            parent: ROOT,
            name: b"home".to_vec(),
            mode: 0o777,
        })
        .await
        .expect("mkdir");
    let seen = b
        .call::<wire::Lookup, _>(&wire::LookupReq {
            user: user(1000),
            parent: ROOT,
            name: b"home".to_vec(),
        })
        .await
        .expect("lookup on the other instance");
    assert_eq!(seen.ino, dir.ino);
    assert_eq!(seen.kind, wire::FileType::Directory);

    // Create on B, write through storage, close on A: the exact length
    // comes from storage (2.5 chunks, so both chains hold data).
    let opened = b
        .call::<wire::Create, _>(&create(dir.ino, "data", user(1000)))
        .await
        .expect("create");
    assert!(opened.created);
    let session = opened.session.expect("write session");
    let layout = opened.attr.layout.clone().expect("layout");
    assert_eq!(layout.chains.len(), 2);
    let data: Vec<u8> = (0..CHUNK * 5 / 2).map(|i| (i % 251) as u8).collect();
    cluster.write(&opened.attr, 0, &data).await;
    let closed = a
        .call::<wire::Close, _>(&wire::SessionReq {
            user: user(1000),
            ino: opened.attr.ino,
            session,
            ..Default::default()
        })
        .await
        .expect("close");
    assert_eq!(closed.length, data.len() as u64);

    // A close that says the length is known does not ask storage (the
    // client syncs before it says so); a sync asks.
    let known = b
        .call::<wire::Create, _>(&create(dir.ino, "known", user(1000)))
        .await
        .expect("create");
    cluster.write(&known.attr, 0, &data).await;
    let closed = a
        .call::<wire::Close, _>(&wire::SessionReq {
            user: user(1000),
            ino: known.attr.ino,
            session: known.session.expect("write session"),
            length_known: true,
            ..Default::default()
        })
        .await
        .expect("close");
    assert_eq!(closed.length, 0, "the close did not ask storage");
    let synced = a
        .call::<wire::Sync, _>(&wire::SessionReq {
            user: user(1000),
            ino: known.attr.ino,
            ..Default::default()
        })
        .await
        .expect("sync");
    assert_eq!(synced.length, data.len() as u64);

    // Errno over the wire: EEXIST for O_EXCL, EACCES for another user's
    // file opened for writing, ENOTEMPTY for a non-empty directory.
    let again = a
        .call::<wire::Create, _>(&create(dir.ino, "data", user(1000)))
        .await
        .expect_err("exclusive create of an existing name");
    assert_eq!(again.errno, libc::EEXIST, "{again}");
    let denied = a
        .call::<wire::Open, _>(&wire::OpenReq {
            user: user(2000),
            ino: opened.attr.ino,
            write: true,
            client: ClientId(6),
            ..Default::default()
        })
        .await
        .expect_err("write open by another user");
    assert_eq!(denied.errno, libc::EACCES, "{denied}");
    let not_empty = b
        .call::<wire::Rmdir, _>(&wire::EntryReq {
            user: root.clone(),
            parent: ROOT,
            name: b"home".to_vec(),
        })
        .await
        .expect_err("rmdir of a non-empty directory");
    assert_eq!(not_empty.errno, libc::ENOTEMPTY, "{not_empty}");

    // Truncate to 1.5 chunks: chunk 2 goes, chunk 1 is cut; fsync agrees.
    let cut = CHUNK as u64 * 3 / 2;
    let truncated = a
        .call::<wire::SetAttr, _>(&wire::SetAttrReq {
            user: user(1000),
            ino: opened.attr.ino,
            size: Some(cut),
            ..Default::default()
        })
        .await
        .expect("truncate");
    assert_eq!(truncated.length, cut);
    let synced = b
        .call::<wire::Sync, _>(&wire::SessionReq {
            user: user(1000),
            ino: opened.attr.ino,
            session: 0,
            ..Default::default()
        })
        .await
        .expect("fsync");
    assert_eq!(synced.length, cut, "storage holds nothing past the cut");

    // Unlink: the GC worker removes every chunk, then the inode.
    b.call::<wire::Unlink, _>(&wire::EntryReq {
        user: user(1000),
        parent: dir.ino,
        name: b"data".to_vec(),
    })
    .await
    .expect("unlink");
    // A tree removed in one call: its files' chunks go too.
    let sub = a
        .call::<wire::MkdirAll, _>(&wire::MkdirAllReq {
            user: root.clone(),
            path: b"/tree/a/b".to_vec(),
            mode: 0o755,
        })
        .await
        .expect("mkdir -p");
    let mut tree_files = Vec::new();
    for name in ["x", "y", "z"] {
        let file = a
            .call::<wire::Create, _>(&create(sub.ino, name, root.clone()))
            .await
            .expect("create in tree");
        cluster
            .write(&file.attr, 0, &data[..CHUNK as usize + 10])
            .await;
        a.call::<wire::Close, _>(&wire::SessionReq {
            user: root.clone(),
            ino: file.attr.ino,
            session: file.session.expect("session"),
            ..Default::default()
        })
        .await
        .expect("close");
        assert_eq!(cluster.chunks_of(file.attr.ino).await, 2);
        tree_files.push(file.attr.ino);
    }
    b.call::<wire::RemoveAll, _>(&wire::EntryReq {
        user: root.clone(),
        parent: ROOT,
        name: b"tree".to_vec(),
    })
    .await
    .expect("remove tree");
    let gone = a
        .call::<wire::Resolve, _>(&wire::ResolveReq {
            user: root.clone(),
            path: b"/tree/a".to_vec(),
            follow: true,
        })
        .await
        .expect_err("the tree is gone at once");
    assert_eq!(gone.errno, libc::ENOENT);

    // The GC's status is an operator's question (admin role), asked of the
    // same instance as `a`.
    let admin = MetaClient::new(
        Tcp,
        MetaClientConfig::new(vec![cluster._inner.meta_addrs[0].clone()]),
        flyfs_rpc::testing::admin(),
    );
    let mut left = usize::MAX;
    for _ in 0..200 {
        left = cluster.chunks_of(opened.attr.ino).await;
        for ino in &tree_files {
            left += cluster.chunks_of(*ino).await;
        }
        let status = admin
            .call::<wire::GcStatus, _>(&wire::GcStatusReq {})
            .await
            .expect("gc status");
        if left == 0 && status.queued == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "GC left chunks of removed files on storage");
    let report = cluster.ns.check().await.expect("check");
    assert!(report.is_clean(), "{report:?}");

    let space = a
        .call::<wire::Statfs, _>(&wire::StatfsReq { user: root })
        .await
        .expect("statfs");
    assert!(
        space.bytes_total > 0 && space.bytes_free <= space.bytes_total,
        "{space:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_get_errno_and_failover_reaches_a_live_instance() {
    let cluster = Cluster::start().await;
    let root = User::root();
    for (name, errno) in [
        (&b"a/b"[..], libc::EINVAL),
        (b"nul\0", libc::EINVAL),
        (&[b'n'; 256][..], libc::ENAMETOOLONG),
        (b"", libc::EINVAL),
    ] {
        let e = cluster.meta[0]
            .call::<wire::Mkdir, _>(&wire::MkdirReq {
                user: root.clone(),
                parent: ROOT,
                name: name.to_vec(),
                mode: 0o755,
            })
            .await
            .expect_err("bad name");
        assert_eq!(e.errno, errno, "{e}");
    }
    // A client that knows a dead address first fails over to the live one.
    let (dead, dead_addr) = bind("127.0.0.1:0").await;
    drop(dead);
    let (_live, live_addr) = serve_another(&cluster).await;
    let mut config = MetaClientConfig::new(vec![dead_addr, live_addr]);
    config.op_deadline = Duration::from_secs(10);
    let client = MetaClient::new(Tcp, config, flyfs_rpc::testing::client());
    let attr = client
        .call::<wire::Stat, _>(&wire::StatReq {
            user: root,
            ino: ROOT,
        })
        .await
        .expect("stat through failover");
    assert_eq!(attr.kind, wire::FileType::Directory);
}

/// One more instance on the cluster's store, and its address.
async fn serve_another(cluster: &Cluster) -> (ServerHandle, String) {
    let (listener, addr) = bind("127.0.0.1:0").await;
    let handle = Server::new(
        MetaService::new(
            cluster.ns.clone(),
            cluster._inner.meta_storage.clone(),
            Arc::new(GcStats::default()),
            CallerPolicy::default(),
        ),
        ServerConfig::default(),
        flyfs_rpc::testing::meta(),
    )
    .spawn(listener)
    .expect("serve");
    (handle, addr)
}

/// A page of long names (or of attributes) is cut by its encoded bytes, not
/// only by the count asked for, so it always fits a frame; the listing
/// continues where the cut was and lists every entry once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readdir_pages_are_cut_by_bytes() {
    let cluster = Cluster::start().await;
    let root = User::root();
    let dir = cluster
        .ns
        .mkdir(&root, ROOT, b"long-names", 0o755)
        .await
        .expect("mkdir")
        .ino;
    // 2200 names of 255 bytes: about 570 KiB of names alone, over the
    // 512 KiB a reply's entries may take.
    let names: Vec<Vec<u8>> = (0..2200)
        .map(|i| {
            let mut name = format!("{i:05}-").into_bytes();
            name.resize(255, b'x');
            name
        })
        .collect();
    for batch in names.chunks(100) {
        let made = batch
            .iter()
            .map(|name| cluster.ns.mkdir(&root, dir, name, 0o755));
        for made in futures::future::join_all(made).await {
            made.expect("mkdir");
        }
    }
    for plus in [false, true] {
        let mut listed: Vec<Vec<u8>> = Vec::new();
        let mut pages = 0;
        loop {
            let page = cluster.meta[0]
                .call::<wire::Readdir, _>(&wire::ReaddirReq {
                    user: root.clone(),
                    dir,
                    after: listed.last().cloned().unwrap_or_default(),
                    limit: 4096,
                    plus,
                })
                .await
                .expect("readdir");
            pages += 1;
            let bytes: usize = page
                .entries
                .iter()
                .map(|entry| flyfs_proto::codec::encode(entry).len())
                .sum();
            assert!(
                bytes <= flyfs_fs_meta::service::READDIR_REPLY_BYTES_MAX,
                "page {pages}: {bytes} bytes"
            );
            assert_eq!(page.entries.iter().all(|e| e.attr.is_some()), plus);
            listed.extend(page.entries.into_iter().map(|entry| entry.name));
            if !page.more {
                break;
            }
        }
        assert!(pages >= 2, "plus = {plus}: {pages} pages");
        assert_eq!(listed, names, "plus = {plus}");
    }
}

/// A sync or close that says what the writer knows of the length: taken
/// without asking storage when the writer holds the file's only write
/// session; with a second writer's session present, every chain is asked
/// (and the second writer's chunks past the first's length count); after
/// someone else's truncate, only the chains of the chunks between the
/// recorded length and the writer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sole_writer_s_length_is_trusted_and_others_make_the_service_ask() {
    let cluster = Cluster::start().await;
    let a = &cluster.meta[0];
    let stats = &cluster._inner.service_stats[0];
    let owner = user(1000);
    let dir = a
        .call::<wire::Mkdir, _>(&wire::MkdirReq {
            user: User::root(),
            parent: ROOT,
            name: b"w".to_vec(),
            mode: 0o777,
        })
        .await
        .expect("mkdir");
    let close = |ino, session, length, truncate_version, sync: bool| {
        let req = wire::SessionReq {
            user: user(1000),
            ino,
            session,
            writer_length: Some(wire::WriterLength {
                length,
                truncate_version,
            }),
            ..Default::default()
        };
        async move {
            if sync {
                a.call::<wire::Sync, _>(&req).await.expect("sync")
            } else {
                a.call::<wire::Close, _>(&req).await.expect("close")
            }
        }
    };

    // The only writer: neither sync nor close asks storage.
    let sole = a
        .call::<wire::Create, _>(&create(dir.ino, "sole", owner.clone()))
        .await
        .expect("create");
    let session = sole.session.expect("session");
    let data: Vec<u8> = (0..CHUNK * 5 / 2).map(|i| (i % 251) as u8).collect();
    cluster.write(&sole.attr, 0, &data).await;
    let asked = stats.length_chains_asked();
    let synced = close(sole.attr.ino, session, data.len() as u64, 0, true).await;
    assert_eq!(synced.length, data.len() as u64);
    let closed = close(sole.attr.ino, session, data.len() as u64, 0, false).await;
    assert_eq!(closed.length, data.len() as u64);
    assert_eq!(stats.length_chains_asked(), asked, "storage was asked");
    assert_eq!(stats.lengths_trusted(), 2);
    assert!(
        cluster
            .ns
            .sessions(sole.attr.ino)
            .await
            .expect("sessions")
            .is_empty()
    );
    // A repeated close finds the session gone and asks storage.
    let again = close(sole.attr.ino, session, 1, 0, false).await;
    assert_eq!(again.length, data.len() as u64);
    assert_eq!(stats.length_chains_asked(), asked + 2);

    // A second writer (another client) wrote past what the first knows:
    // the first's close must not trust its own length.
    let shared = a
        .call::<wire::Create, _>(&create(dir.ino, "shared", owner.clone()))
        .await
        .expect("create");
    let second = a
        .call::<wire::Open, _>(&wire::OpenReq {
            user: owner.clone(),
            ino: shared.attr.ino,
            read: true,
            write: true,
            client: ClientId(6),
            ..Default::default()
        })
        .await
        .expect("open by a second writer");
    cluster.write(&shared.attr, 0, &data[..1000]).await;
    cluster.write(&second.attr, 0, &data).await;
    let asked = stats.length_chains_asked();
    let closed = close(
        shared.attr.ino,
        shared.session.expect("session"),
        1000,
        0,
        false,
    )
    .await;
    assert_eq!(closed.length, data.len() as u64, "the second writer's data");
    assert_eq!(stats.length_chains_asked(), asked + 2, "every chain asked");
    assert_eq!(
        cluster
            .ns
            .sessions(shared.attr.ino)
            .await
            .expect("sessions")
            .len(),
        1,
        "only the second writer's session is left"
    );

    // Someone else truncated the file after the writer learned its
    // version: what it knows may have been cut, so storage is asked, but
    // only for the chunks between the recorded length and the writer's.
    let cut = a
        .call::<wire::Create, _>(&create(dir.ino, "cut", owner.clone()))
        .await
        .expect("create");
    cluster.write(&cut.attr, 0, &data).await;
    let truncated = a
        .call::<wire::SetAttr, _>(&wire::SetAttrReq {
            user: owner.clone(),
            ino: cut.attr.ino,
            size: Some(u64::from(CHUNK) / 2),
            ..Default::default()
        })
        .await
        .expect("truncate");
    assert_eq!(truncated.truncate_version, 1);
    let asked = stats.length_chains_asked();
    let closed = close(
        cut.attr.ino,
        cut.session.expect("session"),
        u64::from(CHUNK) / 2 + 100,
        0,
        false,
    )
    .await;
    assert_eq!(closed.length, u64::from(CHUNK) / 2, "storage holds the cut");
    assert_eq!(stats.length_chains_asked(), asked + 1, "one chain asked");
}

/// `SyncSetAttrs`: the writer's sync, then the changes in order as the
/// request's caller (a set naming another user or inode does not change
/// who or what); refused whole, before anything changes, with more than
/// `SETS_MAX` changes or a size among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_setattrs_are_made_in_order_after_the_sync() {
    let cluster = Cluster::start().await;
    let a = &cluster.meta[0];
    const MTIME_NS: i64 = 1_153_704_088_000_000_000;
    let created = a
        .call::<wire::Create, _>(&wire::CreateReq {
            mode: 0o6755,
            ..create(ROOT, "deferred", User::root())
        })
        .await
        .expect("create");
    let ino = created.attr.ino;
    let session = created.session.expect("session");
    let data = vec![7u8; 3000];
    cluster.write(&created.attr, 0, &data).await;
    let set = |req: wire::SetAttrReq| wire::SetAttrReq {
        // Ignored: the request's caller and inode are used.
        user: user(1000),
        ino: InodeId(u64::MAX),
        ..req
    };
    let req = wire::SyncSetAttrsReq {
        relaxed: false,
        inline: None,
        user: User::root(),
        ino,
        session,
        writer_length: Some(wire::WriterLength {
            length: data.len() as u64,
            truncate_version: 0,
        }),
        sets: vec![
            set(wire::SetAttrReq {
                mtime: Some(wire::SetTime::At(MTIME_NS)),
                ..Default::default()
            }),
            set(wire::SetAttrReq {
                uid: Some(1000),
                gid: Some(1000),
                ..Default::default()
            }),
            set(wire::SetAttrReq {
                mode: Some(0o4750),
                ..Default::default()
            }),
        ],
    };

    // Refused whole, naming what is wrong, and nothing changed.
    let too_many = wire::SyncSetAttrsReq {
        sets: vec![req.sets[2].clone(); wire::SyncSetAttrsReq::SETS_MAX + 1],
        ..req.clone()
    };
    let refused = a
        .call::<wire::SyncSetAttrs, _>(&too_many)
        .await
        .expect_err("too many changes");
    assert!(refused.message.contains("at most 64"), "{refused}");
    let mut sized = req.clone();
    sized.sets[1].size = Some(10);
    let refused = a
        .call::<wire::SyncSetAttrs, _>(&sized)
        .await
        .expect_err("a size");
    assert!(refused.message.contains("changes the size"), "{refused}");
    let untouched = a
        .call::<wire::Stat, _>(&wire::StatReq {
            user: User::root(),
            ino,
        })
        .await
        .expect("stat");
    assert_eq!(
        (untouched.length, untouched.uid, untouched.mode),
        (0, 0, 0o6755)
    );

    let attr = a
        .call::<wire::SyncSetAttrs, _>(&req)
        .await
        .expect("sync setattrs");
    assert_eq!(attr.length, data.len() as u64, "the sync came first");
    assert_eq!(
        attr.mtime_ns, MTIME_NS,
        "the explicit mtime landed after the writes'"
    );
    assert_eq!((attr.uid, attr.gid), (1000, 1000));
    assert_eq!(
        attr.mode, 0o4750,
        "the chown dropped setuid and setgid, the mode after it won"
    );
}

/// `SyncSetAttrs` from the file's only writer makes its sync and its
/// changes in one transaction: a change that is refused undoes the sync
/// too (the writer's next request syncs again), and nothing is half made.
/// With another writer's session open the length is asked of storage
/// first, then the changes are made on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_setattrs_and_the_sole_writers_sync_are_one_transaction() {
    let cluster = Cluster::start().await;
    let a = &cluster.meta[0];
    let stats = &cluster._inner.service_stats[0];
    let owner = user(1000);
    let dir = a
        .call::<wire::Mkdir, _>(&wire::MkdirReq {
            user: User::root(),
            parent: ROOT,
            name: b"one-tx".to_vec(),
            mode: 0o777,
        })
        .await
        .expect("mkdir");
    let created = a
        .call::<wire::Create, _>(&create(dir.ino, "one-tx", owner.clone()))
        .await
        .expect("create");
    let ino = created.attr.ino;
    let data = vec![3u8; 5000];
    cluster.write(&created.attr, 0, &data).await;
    let req = wire::SyncSetAttrsReq {
        relaxed: false,
        inline: None,
        user: owner.clone(),
        ino,
        session: created.session.expect("session"),
        writer_length: Some(wire::WriterLength {
            length: data.len() as u64,
            truncate_version: 0,
        }),
        sets: vec![
            wire::SetAttrReq {
                mode: Some(0o600),
                ..Default::default()
            },
            // Not the owner's to give away: EPERM.
            wire::SetAttrReq {
                uid: Some(2000),
                ..Default::default()
            },
        ],
    };
    let trusted = stats.lengths_trusted();
    let refused = a
        .call::<wire::SyncSetAttrs, _>(&req)
        .await
        .expect_err("a chown by a non-root owner");
    assert!(
        refused.message.contains("EPERM") || refused.message.contains("not permitted"),
        "{refused}"
    );
    let stat = |ino| wire::StatReq {
        user: User::root(),
        ino,
    };
    let untouched = a.call::<wire::Stat, _>(&stat(ino)).await.expect("stat");
    assert_eq!(
        (untouched.length, untouched.mode & 0o7777),
        (0, created.attr.mode & 0o7777),
        "neither the sync nor the mode before the refused chown was kept"
    );
    assert_eq!(stats.lengths_trusted(), trusted);

    let mut allowed = req.clone();
    allowed.sets.truncate(1);
    let attr = a
        .call::<wire::SyncSetAttrs, _>(&allowed)
        .await
        .expect("sync setattrs");
    assert_eq!(
        (attr.length, attr.mode & 0o7777),
        (data.len() as u64, 0o600)
    );
    assert_eq!(
        stats.lengths_trusted(),
        trusted + 1,
        "one request, the length trusted"
    );

    // A second writer: the length comes from storage, then the change.
    let other = a
        .call::<wire::Open, _>(&wire::OpenReq {
            user: owner.clone(),
            ino,
            write: true,
            client: ClientId(6),
            ..Default::default()
        })
        .await
        .expect("second writer's open");
    assert!(other.session.is_some());
    let more = vec![4u8; 9000];
    cluster.write(&created.attr, 0, &more).await;
    let asked = stats.length_chains_asked();
    let mut shared = allowed.clone();
    shared.writer_length = Some(wire::WriterLength {
        length: 100,
        truncate_version: 0,
    });
    shared.sets[0].mode = Some(0o640);
    let attr = a
        .call::<wire::SyncSetAttrs, _>(&shared)
        .await
        .expect("sync setattrs beside another writer");
    assert_eq!(
        (attr.length, attr.mode & 0o7777),
        (more.len() as u64, 0o640),
        "storage's length, then the change"
    );
    assert!(stats.length_chains_asked() > asked, "storage was asked");
}

/// A create's reply carries its parent directory as the create left it:
/// what a stat of the directory right after returns (a mount answers the
/// kernel's next stat of it with them), also when the create opened an
/// existing file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_tells_the_parent_directory_as_it_left_it() {
    let cluster = Cluster::start().await;
    let a = &cluster.meta[0];
    let root = User::root();
    let dir = a
        .call::<wire::Mkdir, _>(&wire::MkdirReq {
            user: root.clone(),
            parent: ROOT,
            name: b"unpacked".to_vec(),
            mode: 0o755,
        })
        .await
        .expect("mkdir");
    let stat = || async {
        a.call::<wire::Stat, _>(&wire::StatReq {
            user: root.clone(),
            ino: dir.ino,
        })
        .await
        .expect("stat")
    };
    for name in ["a", "b"] {
        let created = a
            .call::<wire::Create, _>(&create(dir.ino, name, root.clone()))
            .await
            .expect("create");
        let parent = created.parent.expect("the parent's attributes");
        assert_eq!(parent, stat().await, "after creating {name}");
        assert!(
            parent.mtime_ns > dir.mtime_ns,
            "the entry changed the times"
        );
    }
    let opened = a
        .call::<wire::Create, _>(&wire::CreateReq {
            exclusive: false,
            ..create(dir.ino, "a", root.clone())
        })
        .await
        .expect("open of an existing file");
    assert!(!opened.created);
    assert_eq!(
        opened.parent.expect("the parent's attributes"),
        stat().await
    );
}
