//! Whom the metadata service runs a request as, over real TCP with real
//! credentials: a request that names no caller is refused by every method
//! that takes one; an admin credential acts only as the uid and gid it
//! names; a mount passes its callers' uids, squashed when root squash is on;
//! a client lease is renewed only by the identity that holds it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_fs_meta::service::CallerPolicy;
use flyfs_fs_meta::testing::{ClusterOptions, MetaOptions, TestCluster};
use flyfs_proto::auth::Principal;
use flyfs_proto::frame::Status;
use flyfs_proto::ids::{ClientId, InodeId};
use flyfs_proto::wire::meta::{self as wire, User};
use flyfs_proto::wire::{METHODS, roles_of};
use flyfs_proto::{Method, codec};
use flyfs_rpc::{Client, ClientConfig, Credentials, RpcError, Tcp, testing};

const ROOT: InodeId = InodeId(1);

async fn cluster(callers: CallerPolicy) -> TestCluster {
    TestCluster::start_with(
        ClusterOptions {
            meta_instances: 1,
            ..ClusterOptions::default()
        },
        MetaOptions {
            callers,
            ..MetaOptions::default()
        },
    )
    .await
}

fn meta_client(cluster: &TestCluster, credentials: Credentials) -> Arc<MetaClient<Tcp>> {
    let mut config = MetaClientConfig::new(cluster.meta_addrs.clone());
    config.op_deadline = Duration::from_secs(20);
    MetaClient::new(Tcp, config, credentials)
}

fn admin(uid: u32, gid: u32) -> Credentials {
    testing::credentials(Principal::Admin {
        name: format!("ops-{uid}"),
        uid,
        gid,
    })
}

async fn mkdir(
    client: &MetaClient<Tcp>,
    user: User,
    parent: InodeId,
    name: &str,
) -> Result<wire::Attr, wire::MetaError> {
    client
        .call::<wire::Mkdir, _>(&wire::MkdirReq {
            user,
            parent,
            name: name.as_bytes().to_vec(),
            mode: 0o777,
        })
        .await
}

/// Every namespace method that names a caller refuses a request without
/// one (an empty message: every field left out), for a client and for an
/// admin, with `BadRequest` saying so; none of them runs it as root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_caller_is_refused_by_every_method() {
    let cluster = cluster(CallerPolicy::default()).await;
    let addr = &cluster.meta_addrs[0];
    let empty = codec::encode(&std::collections::BTreeMap::<String, u32>::new());
    let methods: Vec<u16> = METHODS
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| (500..600).contains(id))
        .collect();
    assert!(methods.len() >= 28, "{methods:?}");
    for credentials in [testing::client(), testing::admin()] {
        let rpc = Client::new(Tcp, ClientConfig::default(), credentials.clone());
        for &method in &methods {
            let roles = roles_of(method).expect("known method");
            if !roles.contains(credentials.identity().role()) {
                continue;
            }
            let answer = rpc
                .call_raw(
                    addr,
                    method,
                    empty.clone(),
                    Bytes::new(),
                    Duration::from_secs(20),
                )
                .await;
            // The KV cache's methods name no file system user: the cache
            // has no owners or modes, only the client and admin roles
            // (docs/kv-cache.md), which the role check above already holds.
            // Nor does a wait for durability.
            let takes_caller = ![
                wire::RenewLease::ID,
                wire::GcStatus::ID,
                wire::SyncNamespace::ID,
                wire::KvOpen::ID,
                wire::KvLookup::ID,
                wire::KvReserve::ID,
                wire::KvCommit::ID,
                wire::KvRelease::ID,
                wire::KvRemove::ID,
                wire::KvEvict::ID,
            ]
            .contains(&method);
            match answer {
                Err(RpcError::Remote {
                    status, message, ..
                }) if takes_caller => {
                    assert_eq!(status, Status::BadRequest, "method {method}: {message}");
                    assert!(
                        message.contains("names no caller"),
                        "method {method}: {message}"
                    );
                }
                Ok(_) if !takes_caller => {}
                other => panic!("method {method} by {}: {other:?}", credentials.identity()),
            }
        }
    }
    // Nothing was made by any of them.
    let root = meta_client(&cluster, testing::client());
    let listed = root
        .call::<wire::Readdir, _>(&wire::ReaddirReq {
            user: User::root(),
            dir: ROOT,
            after: Vec::new(),
            limit: 100,
            plus: false,
        })
        .await
        .expect("readdir");
    assert!(listed.entries.is_empty(), "{:?}", listed.entries);
}

/// An admin credential acts as its uid and gid: it may not name root or
/// anyone else, nor add groups; what it makes is owned by its uid, and the
/// namespace checks permissions against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_acts_only_as_its_credentials_uid() {
    let cluster = cluster(CallerPolicy::default()).await;
    let client = meta_client(&cluster, testing::client());
    let private = client
        .call::<wire::Mkdir, _>(&wire::MkdirReq {
            user: User::root(),
            parent: ROOT,
            name: b"private".to_vec(),
            mode: 0o700,
        })
        .await
        .expect("mkdir");
    let shared = mkdir(&client, User::root(), ROOT, "shared")
        .await
        .expect("mkdir");
    let ops = meta_client(&cluster, admin(1000, 100));
    for impostor in [
        User::root(),
        User::new(1001, 100, vec![]),
        User::new(1000, 0, vec![]),
        User::new(1000, 100, vec![0]),
    ] {
        let e = mkdir(&ops, impostor.clone(), shared.ino, "as-someone-else")
            .await
            .expect_err("not its uid");
        assert!(
            e.message.contains("acts as uid 1000 gid 100"),
            "{impostor:?}: {e}"
        );
        assert!(e.message.to_lowercase().contains("forbidden"), "{e}");
    }
    let own = mkdir(&ops, User::new(1000, 100, vec![]), shared.ino, "ops-dir")
        .await
        .expect("as itself");
    assert_eq!((own.uid, own.gid), (1000, 100));
    let e = ops
        .call::<wire::Lookup, _>(&wire::LookupReq {
            user: User::new(1000, 100, vec![]),
            parent: private.ino,
            name: b"x".to_vec(),
        })
        .await
        .expect_err("root's 0700 directory");
    assert_eq!(e.errno, libc::EACCES, "{e}");
    // Root's admin credential is root.
    let root_ops = meta_client(&cluster, testing::admin());
    let e = root_ops
        .call::<wire::Lookup, _>(&wire::LookupReq {
            user: User::root(),
            parent: private.ino,
            name: b"x".to_vec(),
        })
        .await
        .expect_err("no such entry");
    assert_eq!(e.errno, libc::ENOENT, "{e}");
}

/// A mount passes its callers' uids; with root squash, uid 0 runs as
/// nobody (what it makes is nobody's, and root's private directory is
/// closed to it), while an admin credential for root stays root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_squash_maps_a_clients_root_to_nobody() {
    let cluster = cluster(CallerPolicy {
        root_squash: true,
        ..CallerPolicy::default()
    })
    .await;
    let root_ops = meta_client(&cluster, testing::admin());
    let private = root_ops
        .call::<wire::Mkdir, _>(&wire::MkdirReq {
            user: User::root(),
            parent: ROOT,
            name: b"private".to_vec(),
            mode: 0o700,
        })
        .await
        .expect("an admin's root is not squashed");
    assert_eq!(private.uid, 0);
    // The root directory is root's 0755: a squashed root cannot write it.
    let client = meta_client(&cluster, testing::client());
    let e = mkdir(&client, User::root(), ROOT, "squashed")
        .await
        .expect_err("nobody");
    assert_eq!(e.errno, libc::EACCES, "{e}");
    let shared = root_ops
        .call::<wire::Mkdir, _>(&wire::MkdirReq {
            user: User::root(),
            parent: ROOT,
            name: b"shared".to_vec(),
            mode: 0o777,
        })
        .await
        .expect("mkdir");
    let made = client
        .call::<wire::Mkdir, _>(&wire::MkdirReq {
            user: User::root(),
            parent: shared.ino,
            name: b"by-root".to_vec(),
            mode: 0o755,
        })
        .await
        .expect("nobody may write a 0777 directory");
    assert_eq!((made.uid, made.gid), (65534, 65534));
    // Other uids pass as they are.
    let made = client
        .call::<wire::Mkdir, _>(&wire::MkdirReq {
            user: User::new(1000, 1000, vec![]),
            parent: shared.ino,
            name: b"by-1000".to_vec(),
            mode: 0o755,
        })
        .await
        .expect("mkdir");
    assert_eq!((made.uid, made.gid), (1000, 1000));
}

/// A client's lease is renewed only by the identity that holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_renewed_only_by_its_holder() {
    let cluster = cluster(CallerPolicy::default()).await;
    let holder = meta_client(&cluster, testing::client());
    let other = meta_client(
        &cluster,
        testing::credentials(Principal::Client(String::from("other-host"))),
    );
    let renew = wire::RenewLeaseReq {
        client: ClientId(0x5eed),
    };
    holder
        .call::<wire::RenewLease, _>(&renew)
        .await
        .expect("first renewal takes the lease");
    let e = other
        .call::<wire::RenewLease, _>(&renew)
        .await
        .expect_err("another identity's lease");
    assert_eq!(e.errno, libc::EPERM, "{e}");
    assert!(e.message.contains("held by"), "{e}");
    holder
        .call::<wire::RenewLease, _>(&renew)
        .await
        .expect("the holder renews again");
}
