//! Choosing a backend by name: [`open_device`] opens `vfio:<PCI address>`
//! with the userspace NVMe driver and anything else (a block device or a
//! regular file) with io_uring, and [`AnyDevice`] is the one type the
//! composition roots (`flyfs format`, the storage daemon, the engine
//! benchmark) hold, so a device path in a config or on a command line is all
//! that selects the backend.
//!
//! An enum rather than `dyn BlockDevice`: the trait's futures are concrete
//! types (no allocation per I/O), and the match per call is one branch.

use std::path::Path;
use std::sync::Arc;

use crate::nvme::{NAME_PREFIX, NvmeConfig, NvmeDevice};
use crate::uring::{UringConfig, UringDevice};
use crate::{BlockDevice, BufferPool, DeviceError, DmaBuf, Geometry, IoCompletion, Task};

/// A device of either backend.
#[derive(Clone, Debug)]
pub enum AnyDevice {
    Uring(UringDevice),
    Nvme(NvmeDevice),
}

/// How to open a device of either backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    pub uring: UringConfig,
    pub nvme: NvmeConfig,
}

/// The PCI address in a `vfio:` device name, or `None` for a path.
pub fn vfio_address(name: &str) -> Option<&str> {
    name.strip_prefix(NAME_PREFIX)
}

/// Opens `name`: `vfio:<PCI address>` with the NVMe driver, a path with
/// io_uring. `pool`'s arena is registered with either.
pub fn open_device(
    name: &Path,
    config: &DeviceConfig,
    pool: Option<&BufferPool>,
) -> Result<AnyDevice, DeviceError> {
    match name.to_str().and_then(vfio_address) {
        Some(address) => NvmeDevice::open(address, &config.nvme, pool).map(AnyDevice::Nvme),
        None => UringDevice::open(name, &config.uring, pool).map(AnyDevice::Uring),
    }
}

impl AnyDevice {
    /// The io_uring device, if that is the backend.
    pub fn as_uring(&self) -> Option<&UringDevice> {
        match self {
            AnyDevice::Uring(device) => Some(device),
            AnyDevice::Nvme(_) => None,
        }
    }

    /// Runs `future` on a reactor thread of the device, run to completion
    /// (see the backends' `spawn`).
    pub fn spawn<F>(&self, future: F) -> Task<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self {
            AnyDevice::Uring(device) => device.spawn(future),
            AnyDevice::Nvme(device) => device.spawn(future),
        }
    }

    /// Stops the device for every clone (see the backends' `shutdown`).
    pub fn shutdown(&self) {
        match self {
            AnyDevice::Uring(device) => device.shutdown(),
            AnyDevice::Nvme(device) => device.shutdown(),
        }
    }
}

impl BlockDevice for AnyDevice {
    fn geometry(&self) -> Geometry {
        match self {
            AnyDevice::Uring(device) => device.geometry(),
            AnyDevice::Nvme(device) => device.geometry(),
        }
    }

    fn name(&self) -> &str {
        match self {
            AnyDevice::Uring(device) => device.name(),
            AnyDevice::Nvme(device) => device.name(),
        }
    }

    async fn read(&self, offset: u64, buf: DmaBuf) -> IoCompletion {
        match self {
            AnyDevice::Uring(device) => device.read(offset, buf).await,
            AnyDevice::Nvme(device) => device.read(offset, buf).await,
        }
    }

    async fn write(&self, offset: u64, buf: DmaBuf) -> IoCompletion {
        match self {
            AnyDevice::Uring(device) => device.write(offset, buf).await,
            AnyDevice::Nvme(device) => device.write(offset, buf).await,
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        match self {
            AnyDevice::Uring(device) => device.flush().await,
            AnyDevice::Nvme(device) => device.flush().await,
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match self {
            AnyDevice::Uring(device) => device.discard(offset, len).await,
            AnyDevice::Nvme(device) => device.discard(offset, len).await,
        }
    }

    fn failure(&self) -> Option<Arc<str>> {
        match self {
            AnyDevice::Uring(device) => device.failure(),
            AnyDevice::Nvme(device) => device.failure(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_select_the_backend() {
        assert_eq!(vfio_address("vfio:0000:00:04.0"), Some("0000:00:04.0"));
        assert_eq!(vfio_address("/dev/nvme0n1"), None);
        let error = open_device(Path::new("vfio:nonsense"), &DeviceConfig::default(), None)
            .expect_err("not an address");
        assert!(error.to_string().contains("vfio:nonsense"), "{error}");
        assert!(
            error.to_string().contains("is not a PCI address"),
            "{error}"
        );
        let error = open_device(
            Path::new("/nonexistent/flyfs-device"),
            &DeviceConfig::default(),
            None,
        )
        .expect_err("no such file");
        assert!(
            error.to_string().contains("/nonexistent/flyfs-device"),
            "{error}"
        );
    }
}
