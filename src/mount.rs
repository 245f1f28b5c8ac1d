//! `flyfs mount --config F`: the FUSE daemon and its config.
//!
//! Here the FUSE file system (flyfs-fuse) is wired to real TCP
//! clients of the metadata service and the storage chains, and given what a
//! process needs around it: a stale mount left by a crashed daemon is
//! cleared first, SIGTERM and SIGINT write out every buffered byte and
//! unmount (lazily, and saying so, when files are still open), and an
//! external `umount` ends the daemon cleanly.
//!
//! The config (`flyfs_deploy::config::MountConfig`, deploy/mount.toml) is
//! read and checked before anything starts. With `native_socket` set, the
//! daemon also serves native I/O there (flyfs-fuse's `native`,
//! docs/native-io.md).

use std::cell::Cell;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use flyfs_client::FsClient;
use flyfs_client::meta::{MetaClient, MetaClientConfig};
use flyfs_client::storage::{ClientConfig, StorageClient};
use flyfs_deploy::config::{ConfigFile, MountConfig};
use flyfs_fuse::mountpoint::lazy_unmount;
use flyfs_proto::ids::ClientId;
use flyfs_proto::wire::meta::User;
use flyfs_rpc::Tcp;
use flyfs_time::{Attempt, Backoff, Retry};
use tokio::time::Instant;

/// How long startup waits for the manager's routing and the metadata
/// service before giving up with an error naming them.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);
/// How often the manager is polled meanwhile.
const STARTUP_POLL: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_millis(500));
/// How long a shutdown waits for requests being served to finish.
const SHUTDOWN_PATIENCE: Duration = Duration::from_secs(30);

/// `flyfs mount --config F`: mounts until SIGTERM or SIGINT (or an external
/// `umount`), then writes out what is buffered and unmounts.
pub(crate) fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = MountConfig::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("flyfs-fuse-worker")
        .build()
        .context("starting the tokio runtime")?;
    // Handlers first: a signal during startup then ends the daemon through
    // the same orderly path.
    let stop = {
        let _guard = runtime.enter();
        crate::daemon::Stop::install()?
    };
    if let Some(listen) = &config.metrics_listen {
        let _guard = runtime.enter();
        crate::metrics::serve(listen)
            .with_context(|| format!("key `metrics_listen`: cannot serve metrics on {listen}"))?;
    }
    let client = runtime.block_on(connect(&config))?;
    prepare_mount_point(&config.mount_point)?;
    let mut mount = flyfs_fuse::mount(
        client.clone(),
        runtime.handle().clone(),
        &config.mount_point,
        &config.fuse_options(),
    )
    .with_context(|| format!("cannot mount at {}", config.mount_point.display()))?;
    let shown = config.mount_point.display();
    tracing::info!(
        meta = %config.meta.join(","),
        mgmt = %config.mgmt.0.join(","),
        "mounted at {shown}"
    );
    if config.kernel_readahead_bytes > 0 {
        set_kernel_readahead(&config.mount_point, config.kernel_readahead_bytes);
    }
    let mut native = match &config.native_socket {
        Some(socket) => Some(
            flyfs_fuse::native::serve_native(
                client.clone(),
                runtime.handle(),
                socket,
                &config.mount_point,
                mount.invalidator(),
            )
            .with_context(|| {
                format!(
                    "key `native_socket`: cannot serve native I/O on {}",
                    socket.display()
                )
            })?,
        ),
        None => None,
    };
    runtime.block_on(async {
        let why = tokio::select! {
            why = stop.wait() => why,
            ended = mount.ended() => {
                // Unmounted under us (`umount`, `fusermount -u`): nothing
                // can reach the buffers any more but this flush.
                if let Err(e) = ended {
                    tracing::warn!("the FUSE session at {shown} failed: {e}");
                }
                tracing::info!("{shown} was unmounted, stopping");
                if let Some(native) = native.take() {
                    native.shutdown().await;
                }
                flush_all(&client).await;
                return Ok(());
            }
        };
        tracing::info!("mount at {shown}: {why}, unmounting");
        // Native I/O connections end first: their files are flushed and
        // closed like those of FUSE opens.
        if let Some(native) = native.take() {
            native.shutdown().await;
        }
        flush_all(&client).await;
        let lazy = match mount.unmount() {
            Ok(()) => false,
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
                tracing::warn!(
                    "{shown} is busy (files or directories open there): detaching it lazily; \
                     processes using it will get errors"
                );
                lazy_unmount(&config.mount_point)?;
                true
            }
            Err(e) => {
                return Err(anyhow::Error::from(e))
                    .with_context(|| format!("cannot unmount {shown}"));
            }
        };
        // Requests already taken from the kernel finish, then whatever
        // they buffered is written out.
        if tokio::time::timeout(SHUTDOWN_PATIENCE, mount.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("requests still running after {SHUTDOWN_PATIENCE:?}; stopping anyway");
        }
        flush_all(&client).await;
        if !lazy
            && tokio::time::timeout(Duration::from_secs(5), mount.ended())
                .await
                .is_err()
        {
            tracing::warn!("the FUSE session did not end after the unmount");
        }
        tracing::info!("unmounted {shown}");
        Ok(())
    })
}

async fn flush_all(client: &FsClient<Tcp>) {
    if let Err(e) = client.flush_all().await {
        tracing::error!("writing out buffered data failed: {e}");
    }
}

/// Builds the clients and checks that the manager and the metadata
/// service answer, so that a mount never appears that cannot serve.
async fn connect(config: &MountConfig) -> anyhow::Result<Arc<FsClient<Tcp>>> {
    let client_id = match config.client_id {
        0 => rand::random::<u64>() | 1,
        id => id,
    };
    let storage_config = ClientConfig::new(config.mgmt.0.clone(), ClientId(client_id));
    let credentials = crate::certs::from_config(config.tls.as_ref(), "the mount")?;
    let rdma = config
        .rdma
        .open(config.transport)
        .context("transport = \"rdma\": opening the [rdma] device")?;
    let storage = StorageClient::with_transport(storage_config, Tcp, credentials.clone(), rdma);
    // The manager may still be starting: poll it (a constant backoff,
    // jittered per client) for the startup patience, warning every few
    // seconds that we wait.
    let last_warning = Cell::new(Instant::now());
    let managers = config.mgmt.0.join(", ");
    let (storage_ref, last_warning, managers_ref) = (&storage, &last_warning, &managers);
    Retry::deadline(STARTUP_PATIENCE, STARTUP_POLL)
        .run(client_id, |_attempt| async move {
            match storage_ref.refresh_routing().await {
                Ok(_) => Attempt::Done(()),
                Err(e) => {
                    if last_warning.get().elapsed() >= Duration::from_secs(5) {
                        tracing::warn!("waiting for the manager at {managers_ref}: {e}");
                        last_warning.set(Instant::now());
                    }
                    Attempt::Retry(e)
                }
            }
        })
        .await
        .map_err(|gave_up| {
            anyhow::anyhow!(
                "key `mgmt`: no routing from the manager at {managers} after {STARTUP_PATIENCE:?}: {}",
                gave_up.last
            )
        })?;
    let mut meta_config = MetaClientConfig::new(config.meta.clone());
    meta_config.op_deadline = STARTUP_PATIENCE;
    let probe = MetaClient::new(Tcp, meta_config, credentials.clone());
    probe
        .call::<flyfs_proto::wire::meta::Statfs, _>(&flyfs_proto::wire::meta::StatfsReq {
            user: User::root(),
        })
        .await
        .with_context(|| {
            format!(
                "key `meta`: the metadata service at {} does not answer",
                config.meta.join(", ")
            )
        })?;
    let meta = MetaClient::new(Tcp, MetaClientConfig::new(config.meta.clone()), credentials);
    let client = FsClient::new(
        meta,
        storage.clone(),
        ClientId(client_id),
        config.fs_config(),
    );
    // Chain tables change (new tables, failed-over chains): keep routing
    // fresh as the metadata daemon does.
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if let Err(e) = storage.refresh_routing().await {
                tracing::debug!("routing refresh failed: {e}");
            }
        }
    });
    Ok(client)
}

/// The mount point must be a directory; a FUSE mount left there by a
/// daemon that died (every access fails with ENOTCONN) is detached first.
fn prepare_mount_point(mount_point: &Path) -> anyhow::Result<()> {
    let shown = mount_point.display();
    let meta = match std::fs::metadata(mount_point) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => {
            tracing::warn!(
                "{shown} is a stale FUSE mount (its daemon is gone): detaching it lazily"
            );
            lazy_unmount(mount_point)?;
            std::fs::metadata(mount_point)
                .with_context(|| format!("key `mount_point`: {shown} after the unmount"))?
        }
        Err(e) => {
            return Err(e).with_context(|| format!("key `mount_point`: cannot use {shown}"));
        }
        Ok(meta) => meta,
    };
    if !meta.is_dir() {
        bail!("key `mount_point`: {shown} is not a directory");
    }
    Ok(())
}

/// Raises the kernel's read-ahead for the mount (its backing device info
/// starts at 128 KiB), so sequential reads reach the daemon as large
/// requests. Best effort: a kernel without the knob keeps its default.
fn set_kernel_readahead(mount_point: &Path, bytes: u64) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mount_point) {
        Ok(meta) => meta.dev(),
        Err(e) => {
            tracing::debug!("cannot stat {}: {e}", mount_point.display());
            return;
        }
    };
    // Linux's dev_t encoding (major 12 bits + 32, minor 8 bits + 24).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&knob, format!("{}", bytes / 1024)) {
        Ok(()) => tracing::debug!("kernel read-ahead {} KiB ({knob})", bytes / 1024),
        Err(e) => tracing::debug!("cannot set the kernel read-ahead through {knob}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_point_must_be_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, "").expect("write");
        let e = prepare_mount_point(&file).expect_err("a file");
        assert!(format!("{e:#}").contains("not a directory"), "{e:#}");
        let e = prepare_mount_point(&dir.path().join("none")).expect_err("missing");
        assert!(format!("{e:#}").contains("mount_point"), "{e:#}");
        prepare_mount_point(dir.path()).expect("a directory");
    }
}
