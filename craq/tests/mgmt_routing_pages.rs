//! Routing tables too large for one message, over real TCP: the manager
//! answers `GetRouting` with the table's first page, the client library's
//! `fetch_routing` asks for the rest with `GetRoutingPage` and assembles
//! them; a table that changes between two pages makes the manager answer
//! with the new table's first page, and the caller ends with one consistent
//! table. A small table still comes whole in one answer.
//!
//! The manager is told to page at a few KiB (`page_routing_at`) so that a
//! few hundred chains span many pages; the sizes in production are the
//! wire constants (512 KiB pages, tables over 960 KiB paged), whose
//! assembly of a table several times the body limit is tested in
//! flyfs-proto.

use bytes::Bytes;
use flyfs_client::mgmt::{Managers, fetch_routing};
use flyfs_craq::mgmt::{MemStore, MgmtConfig, MgmtService};
use flyfs_proto::ids::{ChainId, NodeId, RoutingVersion, TargetId};
use flyfs_proto::wire::mgmt::{
    Assembled, CreateChainReq, CreateTargetReq, GetRouting, GetRoutingPage, GetRoutingPageReq,
    GetRoutingReq, RegisterNodeReq, RoutingAssembly,
};
use flyfs_rpc::{CallOptions, Client, ClientConfig, Server, ServerConfig, Tcp, testing};

const NODES: u32 = 3;

/// A manager on an ephemeral port with `chains` chains of three targets.
async fn manager(chains: u32) -> (std::sync::Arc<MgmtService>, flyfs_rpc::ServerHandle) {
    let service = MgmtService::open(Box::new(MemStore::new()), MgmtConfig::default())
        .await
        .expect("open the manager");
    for node in 1..=NODES {
        service
            .register_node(RegisterNodeReq {
                node: NodeId(node),
                addr: format!("127.0.0.1:{}", 9000 + node),
            })
            .await
            .expect("register");
    }
    for chain in 1..=chains {
        add_chain(&service, chain).await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let server = Server::new(
        service.clone(),
        ServerConfig::without_payload(),
        testing::mgmt(),
    )
    .spawn(listener)
    .expect("serve");
    (service, server)
}

async fn add_chain(service: &MgmtService, chain: u32) {
    let mut targets = Vec::new();
    for node in 1..=NODES {
        let target = TargetId(u64::from(chain) * 10 + u64::from(node));
        service
            .create_target(CreateTargetReq {
                target,
                node: NodeId(node),
                disk: 0,
            })
            .await
            .expect("create target");
        targets.push(target);
    }
    service
        .create_chain(CreateChainReq {
            chain: ChainId(chain),
            targets,
        })
        .await
        .expect("create chain");
}

fn client() -> Client<Tcp> {
    Client::new(Tcp, ClientConfig::default(), testing::client())
}

#[tokio::test]
async fn a_large_table_comes_in_pages_and_a_small_one_whole() {
    let (service, server) = manager(200).await;
    let addr = server.local_addr().to_string();
    let rpc = client();
    let managers = Managers::new([addr.clone()]);
    let options = CallOptions::default();
    let ask = GetRoutingReq {
        known_version: RoutingVersion(0),
    };

    // At the production sizes 200 chains fit one answer.
    let (whole, _) = rpc
        .call::<GetRouting>(&addr, &ask, Bytes::new(), &options)
        .await
        .expect("GetRouting");
    assert_eq!(whole.routing.as_ref(), Some(&service.routing()));
    assert!(whole.first_page.is_none());

    // Paged at 1 KiB: the answer is the first page only, and the client
    // library assembles the same table from all of them.
    service.page_routing_at(4 << 10, 1 << 10);
    let (paged, _) = rpc
        .call::<GetRouting>(&addr, &ask, Bytes::new(), &options)
        .await
        .expect("GetRouting");
    assert!(paged.routing.is_none());
    let first = paged.first_page.expect("a first page");
    assert_eq!((first.offset, first.bytes.len()), (0, 1 << 10));
    assert!(
        first.total_bytes > 16 << 10,
        "{} bytes is not many pages",
        first.total_bytes
    );
    let fetched = fetch_routing(&rpc, &managers, RoutingVersion(0), &options)
        .await
        .expect("fetch_routing")
        .expect("a table");
    assert_eq!(fetched, service.routing());
    // A caller with the current version still gets nothing at all.
    let current = fetch_routing(&rpc, &managers, fetched.version, &options)
        .await
        .expect("fetch_routing");
    assert_eq!(current, None);

    // A page past the end is refused, naming the offset.
    let past = GetRoutingPageReq {
        version: fetched.version,
        offset: first.total_bytes + 1,
    };
    let error = rpc
        .call::<GetRoutingPage>(&addr, &past, Bytes::new(), &options)
        .await
        .expect_err("past the end");
    assert!(error.to_string().contains("past the end"), "{error}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_table_changing_between_pages_is_fetched_whole_at_one_version() {
    let (service, server) = manager(200).await;
    let addr = server.local_addr().to_string();
    let rpc = client();
    let options = CallOptions::default();
    service.page_routing_at(4 << 10, 1 << 10);
    let ask = GetRoutingReq {
        known_version: RoutingVersion(0),
    };
    let (paged, _) = rpc
        .call::<GetRouting>(&addr, &ask, Bytes::new(), &options)
        .await
        .expect("GetRouting");
    let first = paged.first_page.expect("a first page");
    let old_version = first.version;

    // The table changes before the second page is asked for: the answer
    // is the new table's first page, not the old table's second.
    add_chain(&service, 201).await;
    let next = GetRoutingPageReq {
        version: old_version,
        offset: first.bytes.len() as u64,
    };
    let (rsp, _) = rpc
        .call::<GetRoutingPage>(&addr, &next, Bytes::new(), &options)
        .await
        .expect("GetRoutingPage");
    assert_ne!(rsp.page.version, old_version);
    assert_eq!(rsp.page.offset, 0);

    // An assembly that began on the old table's first page follows the
    // manager to the new table and ends with it, whole.
    add_chain(&service, 202).await;
    let (mut assembly, mut next) = RoutingAssembly::start(first).expect("first page");
    let mut restarted = false;
    let fetched = loop {
        match next {
            Assembled::Done(routing) => break *routing,
            Assembled::More(req) => {
                let (rsp, _) = rpc
                    .call::<GetRoutingPage>(&addr, &req, Bytes::new(), &options)
                    .await
                    .expect("GetRoutingPage");
                restarted |= rsp.page.version != old_version;
                next = assembly.add(rsp.page).expect("a page in order");
            }
        }
    };
    assert!(restarted, "the assembly never saw the new table");
    assert_eq!(fetched, service.routing());
    assert_eq!(fetched.chains.len(), 202);
    // And through the client library.
    let managers = Managers::new([addr.clone()]);
    let again = fetch_routing(&rpc, &managers, RoutingVersion(0), &options)
        .await
        .expect("fetch_routing")
        .expect("a table");
    assert_eq!(again, fetched);
    server.shutdown().await;
}
