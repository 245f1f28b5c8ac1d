//! [`FuseFs`], the file system the kernel talks to, its [`FuseOptions`],
//! and the state every request task shares ([`Shared`]).
//!
//! The operations themselves are in `ops`, grouped by concern; this file
//! only says what they all work with: the file client, the options, the
//! open handles and the count of requests in flight.

use std::sync::Arc;
use std::time::Duration;

use flyfs_client::fs::FsClient;
use flyfs_rpc::Network;
use tokio::runtime::Handle;

use crate::dir_attrs::DirAttrs;
use crate::handles::OpenHandles;
use crate::request::InFlight;

/// How the file system is mounted and how long the kernel may cache.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// How long the kernel may cache attributes.
    pub attr_ttl: Duration,
    /// How long the kernel may cache a name's inode.
    pub entry_ttl: Duration,
    /// How long the kernel may remember that a name does not exist (a
    /// negative entry); zero: it asks every time.
    pub negative_ttl: Duration,
    /// The kernel checks permissions against the cached attributes (the
    /// metadata service checks again); off, `access(2)` comes here.
    pub default_permissions: bool,
    /// Users other than the one who mounted may use the mount.
    pub allow_other: bool,
    /// Threads reading requests from `/dev/fuse` (each with its own fd).
    pub threads: usize,
    /// The largest read-ahead request the kernel may send (it may offer
    /// less; the client reads further ahead on its own).
    pub max_readahead: u32,
}

impl Default for FuseOptions {
    fn default() -> FuseOptions {
        FuseOptions {
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            negative_ttl: Duration::from_secs(1),
            default_permissions: true,
            allow_other: true,
            threads: 4,
            max_readahead: 1 << 20,
        }
    }
}

/// The FUSE file system over one [`FsClient`].
#[derive(Debug)]
pub struct FuseFs<N: Network> {
    pub(crate) shared: Arc<Shared<N>>,
    pub(crate) runtime: Handle,
}

/// What every request task needs.
#[derive(Debug)]
pub(crate) struct Shared<N: Network> {
    pub(crate) client: Arc<FsClient<N>>,
    pub(crate) options: FuseOptions,
    pub(crate) handles: OpenHandles,
    pub(crate) in_flight: InFlight,
    /// The last create's directory attributes (`dir_attrs`).
    pub(crate) dir_attrs: Arc<DirAttrs>,
}

impl<N: Network> FuseFs<N> {
    pub fn new(client: Arc<FsClient<N>>, runtime: Handle, options: FuseOptions) -> FuseFs<N> {
        FuseFs {
            shared: Arc::new(Shared {
                client,
                options,
                handles: OpenHandles::default(),
                in_flight: InFlight::default(),
                dir_attrs: Arc::default(),
            }),
            runtime,
        }
    }
}
