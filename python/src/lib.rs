//! `flyfs._native`: flyfs-usrbio's application library and flyfs-kvcache's
//! KV cache (`kv.rs`) as Python classes. The Python package (`flyfs/`)
//! wraps them: it maps each iov's memfd itself (Python's `mmap`), so
//! `memoryview`s and numpy arrays over the buffer share the daemon's memory
//! without a copy and without any `unsafe` here.
//!
//! Every error is an `OSError` with the errno and flyfs's message. Waits
//! release the GIL.
#![deny(unsafe_code)]

mod kv;

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use flyfs_usrbio::{Client, Ior, Iov, NativeError, RegisteredFile};
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

fn os_error(e: NativeError) -> PyErr {
    let errno = e.errno().unwrap_or(libc_eio());
    PyOSError::new_err((errno, e.to_string()))
}

fn libc_eio() -> i32 {
    5
}

/// A connection to the mount daemon's native I/O socket.
#[pyclass(name = "Client", module = "flyfs._native", frozen)]
struct PyClient {
    client: Client,
}

#[pymethods]
impl PyClient {
    #[new]
    fn new(socket_path: std::path::PathBuf) -> PyResult<PyClient> {
        Ok(PyClient {
            client: Client::connect(socket_path).map_err(os_error)?,
        })
    }

    /// A registered shared buffer of `size` bytes (a sealed memfd).
    fn iov(&self, size: u64) -> PyResult<PyIov> {
        Ok(PyIov {
            iov: self.client.register_iov(size).map_err(os_error)?,
        })
    }

    /// A ring of `entries` entries (a power of two, at most 4096).
    fn ior(&self, entries: u32) -> PyResult<PyIor> {
        Ok(PyIor {
            ior: self.client.create_ior(entries).map_err(os_error)?,
        })
    }

    /// Registers a file opened through the mount, by descriptor number
    /// (a Python file object's `fileno()`); the daemon gets a duplicate.
    fn register(&self, py: Python<'_>, fd: RawFd) -> PyResult<PyFile> {
        let file = flyfs_usrbio::os::duplicate(fd).map_err(|e| {
            PyOSError::new_err((
                e.raw_os_error().unwrap_or(9),
                format!("file descriptor {fd}: {e}"),
            ))
        })?;
        let client = &self.client;
        let registered = py
            .detach(|| client.register_file(file.as_fd()))
            .map_err(os_error)?;
        Ok(PyFile {
            file: std::sync::Mutex::new(Some(registered)),
        })
    }
}

/// A registered shared buffer.
#[pyclass(name = "Iov", module = "flyfs._native", frozen)]
struct PyIov {
    iov: Iov,
}

#[pymethods]
impl PyIov {
    #[getter]
    fn id(&self) -> u32 {
        self.iov.id()
    }

    #[getter]
    fn size(&self) -> u64 {
        self.iov.len()
    }

    /// The memfd, for `mmap.mmap(iov.fileno(), iov.size)`.
    fn fileno(&self) -> RawFd {
        self.iov.fd().as_raw_fd()
    }
}

/// A file registered by descriptor.
#[pyclass(name = "File", module = "flyfs._native", frozen)]
struct PyFile {
    file: std::sync::Mutex<Option<RegisteredFile>>,
}

impl PyFile {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Option<RegisteredFile>>> {
        self.file.lock().map_err(|_| {
            PyOSError::new_err((
                libc_eio(),
                "the file's lock was poisoned by a panic in another thread",
            ))
        })
    }

    fn with<T>(&self, f: impl FnOnce(&RegisteredFile) -> T) -> PyResult<T> {
        match self.lock()?.as_ref() {
            Some(file) => Ok(f(file)),
            None => Err(PyOSError::new_err((9, "the file was closed"))),
        }
    }

    /// A request on the open file through `ior`: the preamble every
    /// `prepare_*` shares (the file still open, the ring's error as an
    /// `OSError`).
    fn prepare(
        &self,
        ior: &mut Ior,
        f: impl FnOnce(&mut Ior, &RegisteredFile) -> Result<(), NativeError>,
    ) -> PyResult<()> {
        self.with(|file| f(ior, file))?.map_err(os_error)
    }
}

#[pymethods]
impl PyFile {
    #[getter]
    fn id(&self) -> PyResult<u32> {
        self.with(|f| f.id())
    }

    /// The file's length when it was registered.
    #[getter]
    fn length(&self) -> PyResult<u64> {
        self.with(|f| f.length_at_open())
    }

    /// Deregisters: flushed to every replica, length fixed, session ended.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let file = self.lock()?.take();
        match file {
            Some(file) => py.detach(|| file.close()).map_err(os_error),
            None => Ok(()),
        }
    }
}

/// A submission/completion ring.
#[pyclass(name = "Ior", module = "flyfs._native")]
struct PyIor {
    ior: Ior,
}

#[pymethods]
impl PyIor {
    #[getter]
    fn entries(&self) -> u32 {
        self.ior.entries()
    }

    fn prepare_read(
        &mut self,
        file: &PyFile,
        iov: &PyIov,
        iov_offset: u64,
        length: u32,
        file_offset: u64,
        user_data: u64,
    ) -> PyResult<()> {
        file.prepare(&mut self.ior, |ior, f| {
            ior.prepare_read(f, &iov.iov, iov_offset, length, file_offset, user_data)
        })
    }

    fn prepare_write(
        &mut self,
        file: &PyFile,
        iov: &PyIov,
        iov_offset: u64,
        length: u32,
        file_offset: u64,
        user_data: u64,
    ) -> PyResult<()> {
        file.prepare(&mut self.ior, |ior, f| {
            ior.prepare_write(f, &iov.iov, iov_offset, length, file_offset, user_data)
        })
    }

    fn prepare_flush(&mut self, file: &PyFile, user_data: u64) -> PyResult<()> {
        file.prepare(&mut self.ior, |ior, f| ior.prepare_flush(f, user_data))
    }

    /// Hands the prepared entries to the daemon; returns how many.
    fn submit(&mut self) -> PyResult<u32> {
        self.ior.submit().map_err(os_error)
    }

    /// Waits for at least `min` completions (or `timeout` seconds) and
    /// returns every one available as `(user_data, result)` pairs, result
    /// being bytes moved or `-errno`.
    #[pyo3(signature = (min = 1, timeout = None))]
    fn wait(
        &mut self,
        py: Python<'_>,
        min: usize,
        timeout: Option<f64>,
    ) -> PyResult<Vec<(u64, i64)>> {
        let timeout = match timeout {
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                return Err(PyOSError::new_err((
                    22,
                    format!("timeout {t} is not a number of seconds"),
                )));
            }
            t => t.map(Duration::from_secs_f64),
        };
        let ior = &mut self.ior;
        let mut out = Vec::new();
        py.detach(|| ior.wait(&mut out, min, timeout))
            .map_err(os_error)?;
        Ok(out.into_iter().map(|c| (c.user_data, c.result)).collect())
    }

    /// Why the daemon failed the last failed request (or the ring).
    fn last_error(&self) -> String {
        self.ior.last_error()
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyClient>()?;
    m.add_class::<PyIov>()?;
    m.add_class::<PyIor>()?;
    m.add_class::<PyFile>()?;
    m.add_class::<kv::PyKvCache>()?;
    m.add_class::<kv::PyRegistration>()?;
    m.add_function(wrap_pyfunction!(kv::payload_moved, m)?)?;
    Ok(())
}
