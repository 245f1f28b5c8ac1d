//! Mutual TLS: the credentials every flyfs process holds, the cluster CA
//! that issues them, and the rustls configurations built from them.
//!
//! Every connection is TLS 1.3 (rustls, ring provider) with a certificate
//! on both sides, chained to the cluster's CA; the peer's identity is the
//! `flyfs://` URI in its certificate's subject alternative names
//! ([`flyfs_proto::auth`]). The design, the threat model and the file layout
//! are in docs/security.md. This module owns:
//! * [`Credentials`]: the CA certificate (the only trust anchor), our own
//!   chain and key, our identity, and the rustls server and client
//!   configurations made from them once;
//! * [`ClusterCa`]: generating a CA and issuing leaf credentials for a
//!   principal, in memory or to files (keys written 0600);
//! * [`peer_identity`]: the identity of a verified peer certificate.
//!
//! Every certificate names the DNS name [`SERVER_NAME`] besides its URI, so
//! that rustls' host-name check passes with one fixed name whatever address
//! a daemon is reached at; which peer it is comes from the URI, checked by
//! the caller (a client accepts only daemons of its own cluster).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flyfs_proto::auth::{Identity, IdentityError, Principal};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The DNS name on every flyfs certificate and the name every client asks
/// for: addresses are not names the cluster can certify (a daemon is reached
/// at whatever address routing says), so the host-name check is a constant
/// and identity comes from the URI.
pub const SERVER_NAME: &str = "flyfs";

/// File names under a credentials directory (`flyfs up --data D` writes
/// `D/tls/`): the CA certificate and key, and `<stem>.pem`/`<stem>.key` per
/// principal.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

/// Credentials could not be loaded, made or used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the {what} file {path} is not valid PEM ({reason})")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the {what} file {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error(
        "the key file {path} is readable by group or others (mode {mode:03o}); \
         a private key must be private: chmod 600 {path}"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("certificate {what}: {reason}")]
    Certificate { what: String, reason: String },
    #[error("certificate of {what} has no valid flyfs identity: {reason}")]
    NoIdentity { what: String, reason: String },
    #[error("certificate of {what}: {source}")]
    Identity {
        what: String,
        #[source]
        source: IdentityError,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// The ring provider, TLS 1.3 only: one handshake shape, no legacy cipher
/// suites to configure away.
///
/// AES-128-GCM is preferred over ring's default AES-256-GCM: every byte of a
/// replicated write is sealed and opened once per hop, and 128-bit AES does
/// 10 rounds to 256-bit's 14 (both are far beyond any brute force).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// What a process proves itself with and whom it trusts. Cheap to clone.
#[derive(Clone)]
pub struct Credentials {
    inner: Arc<CredentialsInner>,
}

struct CredentialsInner {
    identity: Identity,
    ca: CertificateDer<'static>,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for Credentials {
    // Never the key: only who we are.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.inner.identity.to_uri())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Credentials from a CA certificate, our chain (leaf first) and our key.
    /// `what` names them in errors (a file name, "test credentials").
    pub fn new(
        what: &str,
        ca: CertificateDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Credentials, CredentialsError> {
        let leaf = chain.first().ok_or_else(|| CredentialsError::Certificate {
            what: what.to_owned(),
            reason: String::from("the chain is empty"),
        })?;
        let identity = peer_identity(leaf).map_err(|error| match error {
            PeerIdentityError::Identity(source) => CredentialsError::Identity {
                what: what.to_owned(),
                source,
            },
            other => CredentialsError::NoIdentity {
                what: what.to_owned(),
                reason: other.to_string(),
            },
        })?;
        let config_error =
            |error: &dyn fmt::Display| CredentialsError::Config(format!("{what}: {error}"));
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|error| CredentialsError::Certificate {
                what: format!("{what} (CA)"),
                reason: error.to_string(),
            })?;
        let roots = Arc::new(roots);
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| config_error(&e))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_error(&e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| config_error(&e))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_error(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| config_error(&e))?;
        Ok(Credentials {
            inner: Arc::new(CredentialsInner {
                identity,
                ca,
                server: Arc::new(server),
                client: Arc::new(client),
            }),
        })
    }

    /// Loads credentials from PEM files: the CA certificate, our certificate
    /// chain and our private key (refused if group or others may read it).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Credentials, CredentialsError> {
        let ca_bytes = read_file("CA certificate", ca)?;
        let ca_der = CertificateDer::pem_slice_iter(&ca_bytes)
            .next()
            .ok_or_else(|| CredentialsError::Empty {
                what: "CA certificate",
                path: ca.to_owned(),
                expected: "CERTIFICATE block",
            })?
            .map_err(|error| pem_error("CA certificate", ca, error))?;
        let chain = read_chain(cert)?;
        check_key_permissions(key)?;
        let key_bytes = read_file("key", key)?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|error| match error {
            rustls::pki_types::pem::Error::NoItemsFound => CredentialsError::Empty {
                what: "key",
                path: key.to_owned(),
                expected: "PRIVATE KEY block",
            },
            error => pem_error("key", key, error),
        })?;
        Credentials::new(&cert.display().to_string(), ca_der, chain, key_der)
    }

    /// Loads `<dir>/ca.pem`, `<dir>/<stem>.pem` and `<dir>/<stem>.key`.
    pub fn load_dir(dir: &Path, stem: &str) -> Result<Credentials, CredentialsError> {
        let paths = CredentialPaths::in_dir(dir, stem);
        Credentials::load(&paths.ca, &paths.cert, &paths.key)
    }

    /// Who these credentials say we are.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The CA certificate every peer must chain to.
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.inner.ca
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.inner.server.clone()
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.inner.client.clone()
    }

    /// The fixed name a client asks every server for.
    pub fn server_name() -> ServerName<'static> {
        ServerName::DnsName(
            rustls::pki_types::DnsName::try_from(SERVER_NAME)
                .expect("\"flyfs\" is a valid DNS name")
                .to_owned(),
        )
    }

    /// Checks a server's identity as a client sees it: a daemon of our own
    /// cluster (a client's or an admin's certificate cannot serve).
    pub fn check_server(&self, server: &Identity) -> Result<(), String> {
        if server.cluster != self.inner.identity.cluster {
            return Err(format!(
                "its certificate is for cluster {:?}, not ours ({:?})",
                server.cluster, self.inner.identity.cluster
            ));
        }
        if !server.role().is_daemon() {
            return Err(format!(
                "its certificate names a {} ({}), not a storage, meta or mgmt daemon",
                server.role(),
                server.to_uri()
            ));
        }
        Ok(())
    }

    /// Checks a client's identity as a server sees it: of our own cluster.
    /// (What it may call is the method's roles, checked per request.)
    pub fn check_client(&self, client: &Identity) -> Result<(), String> {
        if client.cluster != self.inner.identity.cluster {
            return Err(format!(
                "its certificate is for cluster {:?}, not ours ({:?})",
                client.cluster, self.inner.identity.cluster
            ));
        }
        Ok(())
    }
}

/// Where one principal's credentials are on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CredentialPaths {
    /// `<dir>/ca.pem`, `<dir>/<stem>.pem`, `<dir>/<stem>.key`.
    pub fn in_dir(dir: &Path, stem: &str) -> CredentialPaths {
        CredentialPaths {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }

    pub fn exist(&self) -> bool {
        self.ca.is_file() && self.cert.is_file() && self.key.is_file()
    }

    pub fn load(&self) -> Result<Credentials, CredentialsError> {
        Credentials::load(&self.ca, &self.cert, &self.key)
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, CredentialsError> {
    fs::read(path).map_err(|source| CredentialsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn pem_error(
    what: &'static str,
    path: &Path,
    error: rustls::pki_types::pem::Error,
) -> CredentialsError {
    CredentialsError::Pem {
        what,
        path: path.to_owned(),
        reason: error.to_string(),
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CredentialsError> {
    let bytes = read_file("certificate", path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error("certificate", path, error))?;
    if chain.is_empty() {
        return Err(CredentialsError::Empty {
            what: "certificate",
            path: path.to_owned(),
            expected: "CERTIFICATE block",
        });
    }
    Ok(chain)
}

/// Refuses a key file that group or others may read or write, as ssh does:
/// such a key may already be someone else's.
fn check_key_permissions(path: &Path) -> Result<(), CredentialsError> {
    let metadata = fs::metadata(path).map_err(|source| CredentialsError::Read {
        what: "key",
        path: path.to_owned(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialsError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Why a certificate does not name a flyfs identity.
#[derive(Debug, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("the certificate does not parse: {0}")]
    Parse(String),
    #[error("the certificate has no flyfs:// URI in its subject alternative names")]
    Missing,
    #[error("the certificate has {0} flyfs:// URIs; exactly one is allowed")]
    Several(usize),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// The identity in a certificate: its one `flyfs://` URI SAN, parsed
/// strictly. The certificate must already be verified against the CA.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<Identity, PeerIdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|error| PeerIdentityError::Parse(error.to_string()))?;
    let names = parsed
        .subject_alternative_name()
        .map_err(|error| PeerIdentityError::Parse(error.to_string()))?;
    let uris: Vec<&str> = names
        .iter()
        .flat_map(|extension| extension.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .filter(|uri| uri.starts_with(flyfs_proto::auth::SCHEME))
        .collect();
    match uris.as_slice() {
        [] => Err(PeerIdentityError::Missing),
        [uri] => Ok(Identity::parse_uri(uri)?),
        several => Err(PeerIdentityError::Several(several.len())),
    }
}

/// A cluster's certificate authority: the key that signs every principal's
/// certificate. Kept on the machine that issues credentials (`flyfs up`'s
/// data directory, or an operator's), never needed by a running daemon.
pub struct ClusterCa {
    cluster: String,
    cert: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

fn rcgen_error(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CredentialsError {
    let what = what.into();
    move |error| CredentialsError::Certificate {
        what,
        reason: error.to_string(),
    }
}

impl ClusterCa {
    /// A new CA (ECDSA P-256, self-signed) for the cluster named `cluster`.
    ///
    /// Validity is rcgen's default span (1975 to 4096): flyfs reads no wall
    /// clock to issue, and certificates are not rotated yet; revoking one
    /// means a new CA (docs/security.md, "not protected yet").
    pub fn generate(cluster: &str) -> Result<ClusterCa, CredentialsError> {
        // The cluster name obeys the identity rules, since it is the first
        // segment of every identity this CA issues.
        Identity::new(cluster, Principal::Client(String::from("ca"))).map_err(|source| {
            CredentialsError::Identity {
                what: format!("cluster {cluster:?}"),
                source,
            }
        })?;
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rcgen_error("CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "flyfs");
        params.distinguished_name.push(DnType::CommonName, cluster);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_error("CA certificate"))?;
        Ok(ClusterCa {
            cluster: cluster.to_owned(),
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            key,
        })
    }

    /// Loads `<dir>/ca.pem` and `<dir>/ca.key`.
    pub fn load(dir: &Path) -> Result<ClusterCa, CredentialsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_bytes = read_file("CA certificate", &cert_path)?;
        let cert = CertificateDer::pem_slice_iter(&cert_bytes)
            .next()
            .ok_or_else(|| CredentialsError::Empty {
                what: "CA certificate",
                path: cert_path.clone(),
                expected: "CERTIFICATE block",
            })?
            .map_err(|error| pem_error("CA certificate", &cert_path, error))?;
        check_key_permissions(&key_path)?;
        let key_bytes = read_file("CA key", &key_path)?;
        let key_text = String::from_utf8_lossy(&key_bytes);
        let key = KeyPair::from_pem(&key_text).map_err(|error| CredentialsError::Pem {
            what: "CA key",
            path: key_path.clone(),
            reason: error.to_string(),
        })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).map_err(|error| {
            CredentialsError::Certificate {
                what: cert_path.display().to_string(),
                reason: error.to_string(),
            }
        })?;
        let cluster = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|name| name.as_str().ok())
            .ok_or_else(|| CredentialsError::Certificate {
                what: cert_path.display().to_string(),
                reason: String::from("no common name (the cluster's name) in the CA's subject"),
            })?
            .to_owned();
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CredentialsError::Certificate {
                what: key_path.display().to_string(),
                reason: format!("the key is not the key of {}", cert_path.display()),
            });
        }
        Ok(ClusterCa {
            cluster,
            cert_pem: String::from_utf8_lossy(&cert_bytes).into_owned(),
            cert: cert.into_owned(),
            key,
        })
    }

    /// Loads the CA in `dir`, or makes one for `cluster` and writes it there
    /// if `dir` has none: what `flyfs up` does on every start.
    pub fn load_or_init(dir: &Path, cluster: &str) -> Result<ClusterCa, CredentialsError> {
        if dir.join(CA_CERT_FILE).exists() || dir.join(CA_KEY_FILE).exists() {
            return ClusterCa::load(dir);
        }
        let ca = ClusterCa::generate(cluster)?;
        ca.save(dir)?;
        Ok(ca)
    }

    /// Writes `<dir>/ca.pem` and `<dir>/ca.key` (0600).
    pub fn save(&self, dir: &Path) -> Result<(), CredentialsError> {
        create_dir(dir)?;
        write_file(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_file(
            &dir.join(CA_KEY_FILE),
            self.key.serialize_pem().as_bytes(),
            0o600,
        )
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A new key pair and a certificate naming `principal` of this cluster:
    /// the PEM texts of certificate and key.
    pub fn issue_pem(&self, principal: Principal) -> Result<(String, String), CredentialsError> {
        let identity = Identity::new(&self.cluster, principal).map_err(|source| {
            CredentialsError::Identity {
                what: String::from("the principal to issue"),
                source,
            }
        })?;
        self.issue_for(&identity, true)
    }

    fn issue_for(
        &self,
        identity: &Identity,
        with_uri: bool,
    ) -> Result<(String, String), CredentialsError> {
        let uri = identity.to_uri();
        let what = || format!("for {uri}");
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rcgen_error(what()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "flyfs");
        params
            .distinguished_name
            .push(DnType::CommonName, uri.as_str());
        let dns = SanType::DnsName(
            SERVER_NAME
                .try_into()
                .map_err(rcgen_error(format!("DNS name {SERVER_NAME}")))?,
        );
        params.subject_alt_names = vec![dns];
        if with_uri {
            params.subject_alt_names.push(SanType::URI(
                uri.as_str().try_into().map_err(rcgen_error(what()))?,
            ));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Daemons serve and call each other; clients and admins only call,
        // so their certificates cannot be presented by a server at all.
        params.extended_key_usages = if identity.role().is_daemon() {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)
            .map_err(rcgen_error("the CA certificate"))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(rcgen_error(what()))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// In-memory credentials for `principal` (tests, the simulation).
    pub fn credentials(&self, principal: Principal) -> Result<Credentials, CredentialsError> {
        let (cert, key) = self.issue_pem(principal)?;
        self.credentials_from_pem(&cert, &key)
    }

    /// Test support: credentials chained to this CA whose certificate has no
    /// flyfs URI, which every peer must refuse. They cannot be loaded as our
    /// own credentials, so the parts come back raw.
    pub fn issue_without_identity(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CredentialsError> {
        let identity = Identity::new(&self.cluster, Principal::Client(String::from("anonymous")))
            .map_err(|source| CredentialsError::Identity {
            what: String::from("a placeholder"),
            source,
        })?;
        let (cert, key) = self.issue_for(&identity, false)?;
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| CredentialsError::Config(error.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|error| CredentialsError::Config(error.to_string()))?;
        Ok((chain, key))
    }

    fn credentials_from_pem(&self, cert: &str, key: &str) -> Result<Credentials, CredentialsError> {
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| CredentialsError::Config(error.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|error| CredentialsError::Config(error.to_string()))?;
        Credentials::new("issued credentials", self.cert.clone(), chain, key)
    }

    /// Issues credentials for `principal` and writes them to
    /// `<dir>/<stem>.pem` and `<dir>/<stem>.key` (0600), with the CA's
    /// certificate as `<dir>/ca.pem` (the CA's key is never copied).
    pub fn write_credentials(
        &self,
        principal: Principal,
        dir: &Path,
        stem: &str,
    ) -> Result<CredentialPaths, CredentialsError> {
        let (cert, key) = self.issue_pem(principal)?;
        let paths = CredentialPaths::in_dir(dir, stem);
        create_dir(dir)?;
        if !paths.ca.exists() {
            write_file(&paths.ca, self.cert_pem.as_bytes(), 0o644)?;
        }
        write_file(&paths.key, key.as_bytes(), 0o600)?;
        write_file(&paths.cert, cert.as_bytes(), 0o644)?;
        Ok(paths)
    }

    /// The credentials `<dir>/<stem>.*` if they exist and load (and name
    /// `principal`), else new ones written there: `flyfs up` reuses what an
    /// earlier start made.
    pub fn ensure_credentials(
        &self,
        principal: Principal,
        dir: &Path,
        stem: &str,
    ) -> Result<CredentialPaths, CredentialsError> {
        let paths = CredentialPaths::in_dir(dir, stem);
        if paths.exist() {
            let existing = paths.load()?;
            if existing.identity().principal == principal
                && existing.identity().cluster == self.cluster
            {
                return Ok(paths);
            }
            tracing::info!(
                cert = %paths.cert.display(),
                had = %existing.identity(),
                "credentials name another principal; issuing new ones"
            );
        }
        self.write_credentials(principal, dir, stem)
    }
}

fn create_dir(dir: &Path) -> Result<(), CredentialsError> {
    fs::create_dir_all(dir).map_err(|source| CredentialsError::Write {
        path: dir.to_owned(),
        source,
    })
}

/// Writes a file through a temporary name and a rename, created with `mode`
/// from the start (a key is never readable by others, even for a moment).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CredentialsError> {
    let error = |source| CredentialsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let _ = fs::remove_file(&temporary);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(error)?;
    file.write_all(bytes).map_err(error)?;
    file.sync_all().map_err(error)?;
    drop(file);
    fs::rename(&temporary, path).map_err(error)
}
