//! Authentication and authorisation of the rpc layer over real TCP: every
//! method of every service called by every principal kind (allowed roles
//! reach the service, the others get `Forbidden`), and the connections that
//! must never reach a method: plaintext, a certificate of another CA, a
//! certificate without a flyfs identity, a handshake that never finishes,
//! and a server presenting a client's certificate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flyfs_proto::auth::{Identity, Principal, Role};
use flyfs_proto::frame::{self, FrameLimits, Kind, OutFrame};
use flyfs_proto::ids::NodeId;
use flyfs_proto::wire::{METHODS, roles_of};
use flyfs_proto::{Method, Ping, PingReq, Status, codec};
use flyfs_rpc::frame_io::{read_frame, write_frame};
use flyfs_rpc::{
    CallOptions, Client, ClientConfig, ClusterCa, Credentials, Network, Reply, Request, RpcError,
    Server, ServerConfig, ServerHandle, Service, Tcp, testing,
};
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers every request `Ok` with an empty body and remembers who called
/// what: reaching it at all is what the table test checks.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(u16, Identity)>>,
}

impl Service for Recorder {
    async fn call(&self, request: Request) -> Reply {
        self.calls
            .lock()
            .push((request.method, (*request.peer.identity).clone()));
        Reply {
            status: Status::Ok,
            body: Bytes::new(),
            payload: Bytes::new(),
            parts: Vec::new(),
        }
    }
}

async fn start(config: ServerConfig, credentials: Credentials) -> (ServerHandle, Arc<Recorder>) {
    let listener = Tcp.bind("127.0.0.1:0").await.expect("bind");
    let service = Arc::new(Recorder::default());
    let handle = Server::new(service.clone(), config, credentials)
        .spawn(listener)
        .expect("spawn");
    (handle, service)
}

fn principals() -> Vec<Credentials> {
    vec![
        testing::storage(NodeId(2)),
        testing::meta(),
        testing::mgmt(),
        testing::client(),
        testing::admin(),
    ]
}

const TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn every_method_admits_exactly_its_roles() {
    let (server, recorder) = start(ServerConfig::default(), testing::mgmt()).await;
    let addr = server.local_addr().to_owned();
    for credentials in principals() {
        let identity = credentials.identity().clone();
        let role = identity.role();
        let client = Client::new(Tcp, ClientConfig::default(), credentials);
        let (mut allowed, mut refused) = (0, 0);
        for (id, name) in METHODS {
            let roles = roles_of(*id).expect("every method has roles");
            let before = recorder.calls.lock().len();
            let result = client
                .call_raw(&addr, *id, Bytes::new(), Bytes::new(), TIMEOUT)
                .await;
            if *id == Ping::ID {
                // Answered by the rpc layer itself; the empty body is not a
                // PingReq map, but the call got past authorisation.
                assert_ne!(
                    result.as_ref().err().and_then(RpcError::status),
                    Some(Status::Forbidden)
                );
                continue;
            }
            if roles.contains(role) {
                result.unwrap_or_else(|error| panic!("{role} calling {name}: {error}"));
                let calls = recorder.calls.lock();
                assert_eq!(calls.len(), before + 1, "{role} calling {name}");
                assert_eq!(calls[before], (*id, identity.clone()));
                allowed += 1;
            } else {
                let error = result.expect_err("a role not allowed");
                assert_eq!(
                    error.status(),
                    Some(Status::Forbidden),
                    "{role} {name}: {error}"
                );
                let expected = format!("role {role} may not call {name} (method {id})");
                assert!(error.to_string().contains(&expected), "{error}");
                assert!(!error.is_retryable());
                assert_eq!(recorder.calls.lock().len(), before, "{role} reached {name}");
                refused += 1;
            }
        }
        // Every role may call something (GetRouting) and none may call all.
        assert!(
            allowed > 0 && refused > 0,
            "{role}: {allowed} allowed, {refused} refused"
        );
        let error = client
            .call_raw(&addr, 999, Bytes::new(), Bytes::new(), TIMEOUT)
            .await
            .expect_err("unknown method");
        assert_eq!(error.status(), Some(Status::UnknownMethod), "{error}");
        let (pong, _) = client
            .call::<Ping>(
                &addr,
                &PingReq { nonce: 3 },
                Bytes::new(),
                &CallOptions::default(),
            )
            .await
            .expect("ping is for every authenticated peer");
        assert_eq!(pong.nonce, 3);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn the_roles_of_the_daemon_methods_are_the_expected_ones() {
    use flyfs_proto::wire::{meta, mgmt, storage};
    let may = |role: Role, id: u16| roles_of(id).expect("known").contains(role);
    for role in [Role::Client, Role::Admin, Role::Meta, Role::Mgmt] {
        for id in [
            storage::Forward::ID,
            storage::SyncDone::ID,
            storage::FetchChunk::ID,
            mgmt::RegisterNode::ID,
            mgmt::Heartbeat::ID,
        ] {
            assert!(!may(role, id), "{role} may call {id}");
        }
        // Resync's chunk listing is read-only and open to operators.
        assert_eq!(may(role, storage::DumpMeta::ID), role == Role::Admin);
    }
    for role in [Role::Client, Role::Storage, Role::Meta, Role::Mgmt] {
        for id in [
            mgmt::CreateChain::ID,
            mgmt::SetTargetOffline::ID,
            mgmt::RemoveNode::ID,
            mgmt::AddChainMember::ID,
            mgmt::RemoveChainMember::ID,
            mgmt::RemoveTarget::ID,
            meta::GcStatus::ID,
        ] {
            assert!(!may(role, id), "{role} may call {id}");
        }
    }
    for role in Role::ALL {
        assert!(may(role, mgmt::GetRouting::ID));
    }
    assert!(may(Role::Client, storage::Write::ID) && may(Role::Client, meta::Create::ID));
    assert!(!may(Role::Storage, meta::Create::ID));
}

/// Reads one frame with a deadline: `None` at end of stream.
async fn read_one<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<frame::Frame>, flyfs_rpc::frame_io::ReadError> {
    tokio::time::timeout(TIMEOUT, read_frame(stream, &FrameLimits::default()))
        .await
        .expect("the server answers or closes in time")
}

fn ping_frame(request_id: u64) -> OutFrame {
    OutFrame::new(
        Kind::Request,
        Ping::ID,
        Status::Ok,
        request_id,
        codec::encode(&PingReq { nonce: 1 }),
        Bytes::new(),
    )
    .expect("small frame")
}

#[tokio::test]
async fn a_plaintext_client_is_told_to_use_tls() {
    let (server, recorder) = start(ServerConfig::default(), testing::meta()).await;
    let mut raw = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    write_frame(&mut raw, ping_frame(7)).await.expect("write");
    let reply = read_one(&mut raw)
        .await
        .expect("a readable frame")
        .expect("an error frame");
    assert_eq!(reply.header.kind, Kind::Response);
    assert_eq!(reply.header.request_id, 0);
    assert_eq!(reply.header.status, Status::Unauthenticated);
    let message = String::from_utf8_lossy(&reply.body).into_owned();
    assert!(
        message.contains(
            "accepts only TLS connections authenticated by a certificate of the cluster CA"
        ),
        "{message}"
    );
    assert!(read_one(&mut raw).await.expect("clean close").is_none());
    assert!(recorder.calls.lock().is_empty());
    server.shutdown().await;
}

/// Parses PEM certificate and key texts.
fn parse(cert: &str, key: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key PEM");
    (chain, key)
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused() {
    let (server, recorder) = start(ServerConfig::default(), testing::storage(NodeId(1))).await;
    let addr = server.local_addr().to_owned();
    // Same cluster name, same principal, another CA: a forgery.
    let other = ClusterCa::generate(testing::CLUSTER).expect("another CA");
    let (cert, key) = other
        .issue_pem(Principal::Storage(NodeId(2)))
        .expect("issue");
    let (chain, key) = parse(&cert, &key);
    // It trusts our CA, so its side of the handshake succeeds; the server
    // then refuses its certificate.
    let forged =
        Credentials::new("forged", testing::ca().cert().clone(), chain, key).expect("credentials");
    let client = Client::new(Tcp, ClientConfig::default(), forged);
    let error = client
        .call_raw(
            &addr,
            flyfs_proto::wire::storage::Forward::ID,
            Bytes::new(),
            Bytes::new(),
            TIMEOUT,
        )
        .await
        .expect_err("refused");
    assert!(
        matches!(error, RpcError::Refused { .. } | RpcError::Handshake { .. }),
        "{error}"
    );
    assert!(!error.is_retryable(), "{error}");
    assert!(error.to_string().contains(&addr), "{error}");
    // And a client of the other CA does not trust our server either.
    let outsider = Client::new(
        Tcp,
        ClientConfig::default(),
        other
            .credentials(Principal::Client(String::from("c")))
            .expect("credentials"),
    );
    let error = outsider
        .call_raw(&addr, Ping::ID, Bytes::new(), Bytes::new(), TIMEOUT)
        .await
        .expect_err("server not trusted");
    assert!(matches!(error, RpcError::Handshake { .. }), "{error}");
    assert!(!error.is_retryable(), "{error}");
    assert!(recorder.calls.lock().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn a_certificate_without_a_flyfs_identity_is_refused() {
    let (server, recorder) = start(ServerConfig::default(), testing::storage(NodeId(1))).await;
    let (chain, key) = testing::ca()
        .issue_without_identity()
        .expect("a certificate without URI");
    // Our own credentials refuse to load it.
    let error = Credentials::new(
        "anonymous",
        testing::ca().cert().clone(),
        chain.clone(),
        key.clone_key(),
    )
    .expect_err("no identity");
    assert!(error.to_string().contains("no flyfs:// URI"), "{error}");
    // A raw TLS client presenting it gets past rustls' chain check and is
    // closed by the server's identity check before any frame is answered.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(testing::ca().cert().clone()).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client config");
    let tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(Credentials::server_name(), tcp)
        .await
        .expect("client side of the handshake");
    // The write may or may not fail (the server may be gone already).
    let _ = write_frame(&mut tls, ping_frame(1)).await;
    match read_one(&mut tls).await {
        Ok(None) | Err(_) => {}
        Ok(Some(frame)) => panic!("an anonymous peer got a {:?} frame", frame.header.status),
    }
    assert!(recorder.calls.lock().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn a_handshake_that_never_finishes_hits_the_deadline() {
    let handshake_timeout = Duration::from_millis(300);
    let (server, _) = start(
        ServerConfig {
            handshake_timeout,
            ..ServerConfig::default()
        },
        testing::meta(),
    )
    .await;
    // One peer sends nothing; the other the first bytes of a TLS record.
    for first in [&[][..], &[0x16, 0x03, 0x01][..]] {
        let started = Instant::now();
        let mut raw = tokio::net::TcpStream::connect(server.local_addr())
            .await
            .expect("connect");
        raw.write_all(first).await.expect("write");
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(TIMEOUT, raw.read(&mut buffer))
            .await
            .expect("the server closes well before the test's deadline");
        // Closed without a word (or reset).
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(
            started.elapsed() >= handshake_timeout,
            "{:?}",
            started.elapsed()
        );
    }
    // The server still serves.
    let client = Client::new(Tcp, ClientConfig::default(), testing::client());
    client
        .call::<Ping>(
            server.local_addr(),
            &PingReq { nonce: 1 },
            Bytes::new(),
            &CallOptions::default(),
        )
        .await
        .expect("ping after the slow peers");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_refuses_a_server_that_presents_a_clients_certificate() {
    let (server, recorder) = start(ServerConfig::default(), testing::client()).await;
    let client = Client::new(Tcp, ClientConfig::default(), testing::admin());
    let error = client
        .call::<Ping>(
            server.local_addr(),
            &PingReq { nonce: 1 },
            Bytes::new(),
            &CallOptions::default(),
        )
        .await
        .expect_err("a client's certificate cannot serve");
    assert!(
        matches!(
            error,
            RpcError::Handshake { .. } | RpcError::PeerIdentity { .. }
        ),
        "{error}"
    );
    assert!(!error.is_retryable(), "{error}");
    assert!(recorder.calls.lock().is_empty());
    server.shutdown().await;
}

#[test]
fn a_client_accepts_only_daemons_of_its_cluster() {
    let client = testing::client();
    let identity = |uri: &str| Identity::parse_uri(uri).expect("valid");
    for daemon in ["storage/3", "meta/m", "mgmt/m"] {
        let uri = format!("flyfs://{}/{daemon}", testing::CLUSTER);
        client.check_server(&identity(&uri)).expect(&uri);
    }
    let error = client
        .check_server(&identity("flyfs://test/client/c"))
        .expect_err("a client cannot serve");
    assert!(
        error.contains("not a storage, meta or mgmt daemon"),
        "{error}"
    );
    let error = client
        .check_server(&identity("flyfs://other/meta/m"))
        .expect_err("another cluster");
    assert!(error.contains("cluster \"other\""), "{error}");
}

#[test]
fn credentials_load_from_files_and_refuse_an_open_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::load_or_init(&dir.path().join("tls"), "c1").expect("init");
    let again = ClusterCa::load_or_init(&dir.path().join("tls"), "ignored").expect("load");
    assert_eq!(again.cluster(), "c1");
    assert_eq!(again.cert(), ca.cert());
    let key_mode = std::fs::metadata(dir.path().join("tls/ca.key"))
        .expect("ca.key")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let principal = Principal::Admin {
        name: String::from("alice"),
        uid: 1000,
        gid: 100,
    };
    let paths = ca
        .ensure_credentials(principal.clone(), &dir.path().join("tls"), "admin")
        .expect("issue");
    let credentials = paths.load().expect("load");
    assert_eq!(credentials.identity().principal, principal);
    assert_eq!(credentials.identity().cluster, "c1");
    // Issued once: a second ensure reuses the files.
    let cert = std::fs::read(&paths.cert).expect("cert");
    ca.ensure_credentials(principal, &dir.path().join("tls"), "admin")
        .expect("reuse");
    assert_eq!(std::fs::read(&paths.cert).expect("cert"), cert);

    std::fs::set_permissions(&paths.key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let error = paths.load().expect_err("an open key");
    let message = error.to_string();
    assert!(message.contains("readable by group or others"), "{message}");
    assert!(message.contains("admin.key"), "{message}");
    std::fs::set_permissions(&paths.key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    std::fs::write(&paths.cert, b"not a certificate").expect("write");
    let message = paths.load().expect_err("garbage").to_string();
    assert!(
        message.contains("admin.pem") && message.contains("no CERTIFICATE"),
        "{message}"
    );
    let missing = flyfs_rpc::CredentialPaths::in_dir(dir.path(), "nobody");
    let message = missing.load().expect_err("missing").to_string();
    assert!(
        message.contains("nobody.pem") || message.contains("ca.pem"),
        "{message}"
    );
}

#[test]
fn methods_declare_roles_for_the_server_to_check() {
    // The trait constant the server's table is built from.
    assert_eq!(
        roles_of(flyfs_proto::wire::storage::Forward::ID),
        Some(flyfs_proto::wire::storage::Forward::ROLES)
    );
}
