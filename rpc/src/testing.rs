//! Test credentials: one cluster CA per process and credentials issued from
//! it on demand, so that every test and simulation runs with authentication
//! on, exactly as a deployment does, without files.
//!
//! The CA is made on first use (ECDSA key generation takes about a
//! millisecond); credentials are cached per principal, because a storage
//! node restarted in a simulation must present the same identity again.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use flyfs_proto::auth::Principal;
use flyfs_proto::ids::NodeId;

use crate::tls::{ClusterCa, Credentials};

/// The test cluster's name, in every test identity.
pub const CLUSTER: &str = "test";

/// The process's test CA.
pub fn ca() -> &'static ClusterCa {
    static CA: OnceLock<ClusterCa> = OnceLock::new();
    CA.get_or_init(|| ClusterCa::generate(CLUSTER).expect("a test CA can be generated"))
}

/// Credentials of `principal` of the test cluster (cached per principal).
pub fn credentials(principal: Principal) -> Credentials {
    static CACHE: OnceLock<Mutex<HashMap<Principal, Credentials>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    cache
        .entry(principal.clone())
        .or_insert_with(|| {
            ca().credentials(principal)
                .expect("the test CA issues credentials for any valid principal")
        })
        .clone()
}

/// A storage daemon's credentials.
pub fn storage(node: NodeId) -> Credentials {
    credentials(Principal::Storage(node))
}

/// A metadata service's credentials.
pub fn meta() -> Credentials {
    credentials(Principal::Meta(String::from("meta")))
}

/// A cluster manager's credentials.
pub fn mgmt() -> Credentials {
    credentials(Principal::Mgmt(String::from("mgmt")))
}

/// A mount's (or a client library user's) credentials.
pub fn client() -> Credentials {
    credentials(Principal::Client(String::from("client")))
}

/// An admin's credentials, acting as root.
pub fn admin() -> Credentials {
    credentials(Principal::Admin {
        name: String::from("admin"),
        uid: 0,
        gid: 0,
    })
}

/// The two ends of one RDMA connection on `transport`'s device, as the
/// frame machinery sees them (the byte streams the pumps serve), with an
/// in-memory stream as their lifeline where a real connection has its
/// authenticated TLS session: for tests of the transport's stream itself
/// (what arrives when one end closes) without a server and client around
/// it. The first end is the side that connects, the second the one that
/// accepts.
pub async fn rdma_stream_pair(
    transport: &crate::RdmaTransport,
) -> Result<(tokio::io::DuplexStream, tokio::io::DuplexStream), flyfs_rdma::RdmaError> {
    let (client_lifeline, server_lifeline) = tokio::io::duplex(4096);
    let (client, server) = tokio::join!(
        transport.upgrade(client_lifeline, crate::rdma::Side::Client),
        transport.upgrade(server_lifeline, crate::rdma::Side::Server),
    );
    Ok((client?.0, server?.0))
}
