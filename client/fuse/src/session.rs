//! The mount's life: mounting with flyfs's options, the threads that read
//! requests from `/dev/fuse`, what is agreed with the kernel at `init`, and
//! the end (an unmount here or by `umount`, then waiting for the requests
//! still running).

use std::io;
use std::path::Path;
use std::sync::Arc;

use flyfs_client::fs::FsClient;
use flyfs_rpc::Network;
use fuser::{Config, InitFlags, KernelConfig, MountOption, Session, SessionACL, SessionUnmounter};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::fs::{FuseFs, FuseOptions, Shared};

/// What the kernel may send in one write (and one read-ahead): big
/// requests keep the per-request overhead small against the data.
pub(crate) const MAX_WRITE: u32 = 1 << 20;

/// The name flyfs mounts under: the source in the mount table, and the
/// subtype of its type (`fuse.flyfs`).
pub(crate) const FS_NAME: &str = "flyfs";

/// Session handles of a mounted file system.
pub struct FuseMount {
    unmounter: SessionUnmounter,
    notifier: fuser::Notifier,
    ended: Option<oneshot::Receiver<io::Result<()>>>,
    in_flight: Arc<dyn IdleWait>,
}

/// The part of [`Shared`] a [`FuseMount`] needs, without its network type.
trait IdleWait: Send + Sync {
    fn wait_idle(&self) -> futures::future::BoxFuture<'_, ()>;
}

impl<N: Network> IdleWait for Shared<N> {
    fn wait_idle(&self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(self.in_flight.wait_idle())
    }
}

/// Mounts `client` at `mount_point` and serves it on `options.threads`
/// threads. Blocks until the kernel has answered the mount (call it off
/// the runtime's threads).
pub fn mount<N: Network>(
    client: Arc<FsClient<N>>,
    runtime: Handle,
    mount_point: &Path,
    options: &FuseOptions,
) -> io::Result<FuseMount> {
    let mut mount_options = vec![
        MountOption::FSName(FS_NAME.into()),
        MountOption::Subtype(FS_NAME.into()),
        // The kernel never updates atime on FUSE files and the metadata
        // service does not on reads: say so.
        MountOption::NoAtime,
        // Device nodes cannot be created here.
        MountOption::NoDev,
    ];
    if options.default_permissions {
        mount_options.push(MountOption::DefaultPermissions);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let threads = options.threads.max(1);
    config.n_threads = Some(threads);
    config.clone_fd = threads > 1;
    let fs = FuseFs::new(client, runtime, options.clone());
    let shared: Arc<dyn IdleWait> = fs.shared.clone();
    let mut session = Session::new(fs, mount_point, &config)?;
    let unmounter = session.unmount_callable();
    let notifier = session.notifier();
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("flyfs-fuse".into())
        .spawn(move || {
            // Nobody listening means the daemon is exiting anyway.
            let _ = tx.send(session.run());
        })?;
    Ok(FuseMount {
        unmounter,
        notifier,
        ended: Some(rx),
        in_flight: shared,
    })
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("ended", &self.ended.is_none())
            .finish_non_exhaustive()
    }
}

/// Tells the kernel that a file changed behind its back (native I/O wrote
/// it), so its cached attributes and pages are dropped: the next open
/// through the mount sees the new length and bytes (close-to-open).
#[derive(Clone, Debug)]
pub struct Invalidator(fuser::Notifier);

impl Invalidator {
    /// Drops the kernel's attributes and pages of `ino`. An inode the kernel
    /// does not know (never looked up, or forgotten) is no error.
    pub fn invalidate(&self, ino: u64) -> io::Result<()> {
        match self.0.inval_inode(fuser::INodeNo(ino), 0, 0) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }
}

impl FuseMount {
    /// What native I/O uses to keep the kernel's caches of this mount true.
    pub fn invalidator(&self) -> Invalidator {
        Invalidator(self.notifier.clone())
    }

    /// Unmounts (plain `umount(2)`: EBUSY while files are open).
    pub fn unmount(&mut self) -> io::Result<()> {
        self.unmounter.unmount()
    }

    /// Resolves when the session ends (unmounted, here or by `umount`),
    /// with its error if it failed.
    pub async fn ended(&mut self) -> io::Result<()> {
        match self.ended.as_mut() {
            Some(rx) => {
                let result = rx
                    .await
                    .unwrap_or_else(|_| Err(io::Error::other("the FUSE session thread died")));
                self.ended = None;
                result
            }
            None => std::future::pending().await,
        }
    }

    /// Waits until no request is being served.
    pub async fn wait_idle(&self) {
        self.in_flight.wait_idle().await;
    }
}

/// What the daemon asks of the kernel when the session starts (FUSE
/// `init`): request sizes, read-ahead, background requests, and the
/// capabilities below where the kernel has them.
pub(crate) fn negotiate(config: &mut KernelConfig, options: &FuseOptions) {
    if let Err(max) = config.set_max_write(MAX_WRITE) {
        let _ = config.set_max_write(max);
    }
    if let Err(max) = config.set_max_readahead(options.max_readahead) {
        // The kernel offers less than asked: take what it offers.
        let _ = config.set_max_readahead(max);
    }
    // Read-ahead and async reads of many files in flight at once.
    let _ = config.set_max_background(64);
    let _ = config.set_congestion_threshold(48);
    // O_TRUNC in open (one call instead of setattr + open); parallel
    // lookups in one directory (the service is stateless); listings
    // with attributes when the kernel sees they would be looked up;
    // symlink targets cached (they never change); pages dropped when
    // another client changed a file; async direct I/O; setuid and setgid
    // dropped by us on write, truncate and chown (`HANDLE_KILLPRIV_V2`:
    // the metadata service does it on truncate and chown, and writes
    // flagged by the kernel ask for it), so that the kernel need not fetch
    // the attributes first (`tar x` chowns every file it wrote).
    let wanted = InitFlags::FUSE_ATOMIC_O_TRUNC
        | InitFlags::FUSE_HANDLE_KILLPRIV_V2
        | InitFlags::FUSE_PARALLEL_DIROPS
        | InitFlags::FUSE_DO_READDIRPLUS
        | InitFlags::FUSE_READDIRPLUS_AUTO
        | InitFlags::FUSE_CACHE_SYMLINKS
        | InitFlags::FUSE_AUTO_INVAL_DATA
        | InitFlags::FUSE_ASYNC_DIO
        | InitFlags::FUSE_BIG_WRITES
        | InitFlags::FUSE_MAX_PAGES;
    let granted = wanted & config.capabilities();
    if let Err(missing) = config.add_capabilities(granted) {
        tracing::debug!("kernel refused FUSE capabilities {missing:?}");
    }
    tracing::debug!(
        "FUSE init: kernel ABI {:?}, capabilities {:?}",
        config.kernel_abi(),
        granted
    );
}
