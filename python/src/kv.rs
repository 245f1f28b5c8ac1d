//! `flyfs._native.KvCache`: flyfs-kvcache's blocking KV cache as a Python
//! class. `flyfs/kv.py` wraps it (reads the mount config, casts every
//! buffer to a flat byte view); this file lends Python buffers to the
//! cache as owned views of their memory ([`BlockView`]: a put sends each
//! block from it, a get receives each block into it, no copy either way),
//! releases the GIL for each batch, and turns per-key outcomes into
//! `(status, length, message)` tuples.
//!
//! On the RDMA transport (the mount config's `transport = "rdma"` and
//! `[rdma]`), `register_buffer` registers a large buffer with the device
//! for as long as its [`PyRegistration`] is open: blocks put from views
//! inside it are pulled by the chains' heads (RDMA READ), blocks got into
//! views inside it are written there by the replicas (RDMA WRITE), and no
//! byte of them passes through this process's CPU.
//!
//! It holds the package's only `unsafe`: the buffer protocol hands out a
//! pointer and a length, and a slice over another object's memory cannot be
//! made without it (pyo3's safe views are `Cell`s, which flyfs-kvcache's
//! byte APIs cannot take), nor can such memory be named to the RDMA device
//! (flyfs-rdma's `Arena` is an unsafe trait). Each use says why it is
//! sound.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flyfs_kvcache::blocking::{BlockingKvCache, Connect};
use flyfs_kvcache::{Bytes, GetResult, KvCacheConfig, KvError, PutResult};
use flyfs_proto::ids::{ChainTableId, ClientId};
use flyfs_rpc::rdma::{Arena, ArenaRegistration, ConnectionConfig};
use flyfs_rpc::{Credentials, RdmaTransport};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

/// One key's outcome: a status word, the block's bytes (found, stored),
/// and why (the failures).
type Outcome = (&'static str, usize, String);

fn kv_error(e: KvError) -> PyErr {
    match e {
        KvError::LengthMismatch { .. } | KvError::BadKey { .. } => {
            PyValueError::new_err(e.to_string())
        }
        KvError::Meta(ref meta) => PyOSError::new_err((meta.errno, e.to_string())),
        KvError::BadRecord(_) | KvError::Runtime(_) => PyOSError::new_err((5, e.to_string())),
    }
}

/// The buffers of a batch, held exported (so Python cannot resize or free
/// them) until the batch returns.
struct Buffers {
    views: Vec<PyBuffer<u8>>,
}

impl Buffers {
    /// Exports each object's buffer: flat bytes (`flyfs.kv` casts every
    /// view to format `B`), writable when `writable`, and for writes no two
    /// overlapping (each becomes a `&mut [u8]` of its own).
    fn export(objects: &[Bound<'_, PyAny>], writable: bool) -> PyResult<Buffers> {
        let mut views = Vec::with_capacity(objects.len());
        for (index, object) in objects.iter().enumerate() {
            let view = PyBuffer::<u8>::get(object).map_err(|e| {
                PyValueError::new_err(format!("buffer {index} is not a byte buffer: {e}"))
            })?;
            if !view.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "buffer {index} is not contiguous: the cache moves whole blocks"
                )));
            }
            if writable && view.readonly() {
                return Err(PyValueError::new_err(format!(
                    "buffer {index} is read-only: a get needs writable buffers"
                )));
            }
            views.push(view);
        }
        if writable {
            let mut spans: Vec<(usize, usize, usize)> = views
                .iter()
                .enumerate()
                .filter(|(_, v)| v.len_bytes() > 0)
                .map(|(i, v)| (v.buf_ptr() as usize, v.len_bytes(), i))
                .collect();
            spans.sort_unstable();
            for pair in spans.windows(2) {
                let ((start, len, first), (next, _, second)) = (pair[0], pair[1]);
                if start + len > next {
                    return Err(PyValueError::new_err(format!(
                        "buffers {first} and {second} overlap: each key needs memory of its own"
                    )));
                }
            }
        }
        Ok(Buffers { views })
    }

    /// One owned view per buffer, for the cache to send from or receive
    /// into. The views share the exports: whichever is dropped last (here
    /// when the batch returns, or later in the cache's runtime when a send
    /// of a write that gave up was still queued) releases them.
    fn views(self) -> Vec<BlockView> {
        let len = self.views.len();
        let buffers = Arc::new(self);
        (0..len)
            .map(|index| BlockView {
                buffers: buffers.clone(),
                index,
            })
            .collect()
    }
}

/// One exported buffer of a batch as memory the cache may hold beyond a
/// borrow (a `Bytes` a send holds, a buffer a reply lands in): the export,
/// shared with the batch's other views, keeps the memory pinned and its
/// object alive for as long as any view lives.
struct BlockView {
    buffers: Arc<Buffers>,
    index: usize,
}

impl BlockView {
    fn len(&self) -> usize {
        self.buffers.views[self.index].len_bytes()
    }
}

impl AsRef<[u8]> for BlockView {
    #[allow(unsafe_code)]
    fn as_ref(&self) -> &[u8] {
        let view = &self.buffers.views[self.index];
        if view.len_bytes() == 0 {
            return &[];
        }
        // SAFETY: the view is exported (its memory pinned, its object
        // alive) for as long as `self.buffers` lives, which outlives the
        // slice; it is C-contiguous with one-byte items, so `len_bytes`
        // bytes from `buf_ptr` are the buffer. Another Python thread
        // writing the same memory during the batch is the caller's race, as
        // with any buffer handed to native code (the package documents that
        // a batch's buffers are flyfs's until it returns); a block changed
        // under its send fails its CRC at the storage node.
        unsafe { std::slice::from_raw_parts(view.buf_ptr() as *const u8, view.len_bytes()) }
    }
}

impl AsMut<[u8]> for BlockView {
    #[allow(unsafe_code)]
    fn as_mut(&mut self) -> &mut [u8] {
        let view = &self.buffers.views[self.index];
        if view.len_bytes() == 0 {
            return &mut [];
        }
        assert!(!view.readonly(), "a get's buffers were exported writable");
        // SAFETY: as in `as_ref`, and besides: `export` checked the views of
        // a get are writable and that no two of them overlap, and each
        // index has exactly one `BlockView` (`views` makes one each), so
        // through `&mut self` this is the only Rust reference to its bytes.
        unsafe { std::slice::from_raw_parts_mut(view.buf_ptr() as *mut u8, view.len_bytes()) }
    }
}

/// A buffer registered with the RDMA device: its export keeps the memory
/// pinned and its object alive for as long as the device's regions over it
/// (each region holds this) are registered.
#[derive(Debug)]
struct RegisteredBuffer {
    view: PyBuffer<u8>,
}

// SAFETY: the one range is the exported buffer's memory (C-contiguous,
// writable, not empty: `register_buffer` checked), which stays allocated at
// that address while the export lives, that is while this value does; a
// peer writes into it only through a get's buffer lent for that get's
// reply, and `Buffers::export` refuses a get whose buffers overlap. Two
// batches running at once over the same bytes are the caller's race, as
// with any buffer handed to native code.
#[allow(unsafe_code)]
unsafe impl Arena for RegisteredBuffer {
    fn arenas(&self) -> Vec<(std::ptr::NonNull<u8>, usize)> {
        std::ptr::NonNull::new(self.view.buf_ptr() as *mut u8)
            .map(|start| vec![(start, self.view.len_bytes())])
            .unwrap_or_default()
    }
}

/// `KvCache.register_buffer`'s result: the buffer stays exported (Python
/// cannot resize or free it) and, on RDMA, registered until `close`.
#[pyclass(name = "Registration", module = "flyfs._native", frozen)]
pub struct PyRegistration {
    /// The export and, on RDMA, the device's registration; `None` once closed.
    held: Mutex<Option<(Arc<RegisteredBuffer>, Option<ArenaRegistration>)>>,
    one_sided: bool,
    len: usize,
}

#[pymethods]
impl PyRegistration {
    /// Whether batches over views inside the buffer move one-sided (the
    /// cache is on RDMA); on TCP the registration only pins the buffer.
    #[getter]
    fn one_sided(&self) -> bool {
        self.one_sided
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.len
    }

    #[getter]
    fn closed(&self) -> bool {
        self.held.lock().expect("not poisoned").is_none()
    }

    /// Deregisters the buffer and releases its export (a storage node's
    /// transfer still naming it fails from then on; a batch's own views
    /// keep their memory exported). Closing twice is a no-op.
    fn close(&self, py: Python<'_>) {
        let held = self.held.lock().expect("not poisoned").take();
        // A region a work request still holds is deregistered later, on the
        // cache's runtime, which then takes the GIL to release the export.
        py.detach(move || drop(held));
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _kind: Bound<'_, PyAny>,
        _value: Bound<'_, PyAny>,
        _traceback: Bound<'_, PyAny>,
    ) {
        self.close(py);
    }
}

impl Drop for PyRegistration {
    fn drop(&mut self) {
        if let Some(held) = self.held.get_mut().expect("not poisoned").take() {
            Python::attach(|py| py.detach(move || drop(held)));
        }
    }
}

/// Reads one `[rdma]` field as `T`, naming it and what it must be.
fn rdma_field<'a, 'py, T: FromPyObject<'a, 'py>>(
    value: &'a Bound<'py, PyAny>,
    key: &str,
    what: &str,
) -> PyResult<T> {
    value
        .extract()
        .map_err(|_| PyValueError::new_err(format!("rdma.{key} must be {what}")))
}

/// The storage client's RDMA device from the mount config's `[rdma]` table
/// (`flyfs/kv.py` passes it as parsed), with the mount's defaults and
/// checks: an unknown key or a value out of range is an error naming it.
fn open_rdma(table: &Bound<'_, PyDict>) -> PyResult<RdmaTransport> {
    let mut device = String::new();
    let mut gid_index = 0u8;
    let mut config = ConnectionConfig::default();
    for (key, value) in table.iter() {
        let key: String = key.extract()?;
        match key.as_str() {
            "device" => device = rdma_field(&value, &key, "a device name")?,
            "gid_index" => gid_index = rdma_field(&value, &key, "an integer 0 to 255")?,
            "credits" => config.credits = rdma_field(&value, &key, "a 32-bit count")?,
            "message_bytes_max" => {
                config.message_bytes_max = rdma_field(&value, &key, "a 32-bit size")?
            }
            "one_sided_max" => config.one_sided_max = rdma_field(&value, &key, "a 32-bit count")?,
            "completion_timeout_ms" => {
                let ms: u64 = rdma_field(&value, &key, "a number of milliseconds")?;
                config.completion_timeout = Duration::from_millis(ms);
            }
            _ => {
                return Err(PyValueError::new_err(format!(
                    "rdma.{key} is not a key of [rdma] (device, gid_index, credits, \
                     message_bytes_max, one_sided_max, completion_timeout_ms)"
                )));
            }
        }
    }
    if device.is_empty() {
        return Err(PyValueError::new_err(
            "rdma.device is empty; transport = \"rdma\" needs the RDMA device to use (ibv_devices lists them)",
        ));
    }
    config
        .check()
        .map_err(|(field, why)| PyValueError::new_err(format!("rdma.{field} {why}")))?;
    RdmaTransport::open(&device, gid_index, config).map_err(|e| {
        PyOSError::new_err((
            19,
            format!("transport = \"rdma\": opening the RDMA device {device}: {e}"),
        ))
    })
}

fn key_slices<'a>(keys: &'a [Bound<'_, PyBytes>]) -> Vec<&'a [u8]> {
    keys.iter().map(|k| k.as_bytes()).collect()
}

fn check_lengths(keys: usize, buffers: usize) -> PyResult<()> {
    if keys == buffers {
        Ok(())
    } else {
        Err(kv_error(KvError::LengthMismatch { keys, buffers }))
    }
}

/// A put's outcome; `length` is the bytes it stored (none when the key's
/// block was there already: that one may differ).
fn put_outcome(result: PutResult, length: usize) -> Outcome {
    match result {
        PutResult::Stored => ("stored", length, String::new()),
        PutResult::Exists => ("exists", 0, String::new()),
        PutResult::Full => (
            "full",
            0,
            "its size class is full and the cache does not evict when full".into(),
        ),
        PutResult::TooLarge {
            block_bytes,
            slot_bytes_max,
        } => (
            "too_large",
            0,
            format!("the block has {block_bytes} bytes, the largest slot {slot_bytes_max}"),
        ),
        PutResult::Failed(why) => ("failed", 0, why),
    }
}

fn get_outcome(result: GetResult) -> Outcome {
    match result {
        GetResult::Found(n) => ("found", n, String::new()),
        GetResult::Missing => ("missing", 0, String::new()),
        ref too_small @ GetResult::BufferTooSmall { .. } => ("too_small", 0, too_small.to_string()),
        GetResult::Failed(why) => ("failed", 0, why),
    }
}

/// The cluster's KV cache, reached over TCP with a client's credentials.
#[pyclass(name = "KvCache", module = "flyfs._native", frozen)]
pub struct PyKvCache {
    /// Always set; taken only by `drop`.
    cache: Option<BlockingKvCache>,
}

impl PyKvCache {
    fn cache(&self) -> &BlockingKvCache {
        self.cache
            .as_ref()
            .expect("set until the object is dropped")
    }
}

impl Drop for PyKvCache {
    /// Drops the cache (and its runtime, which waits for its threads) with
    /// the GIL released: a thread of it may be releasing a batch's buffers
    /// (a send queued past a write that gave up), which takes the GIL.
    fn drop(&mut self) {
        if let Some(cache) = self.cache.take() {
            Python::attach(|py| py.detach(move || drop(cache)));
        }
    }
}

#[pymethods]
impl PyKvCache {
    /// Connects (to the managers `mgmt` and metadata services `meta`, with
    /// the PEM files `ca`, `cert`, `key`) and opens the cache, creating it
    /// with `classes` (`(slot_bytes, slots)` pairs) if the cluster has none.
    #[new]
    #[pyo3(signature = (mgmt, meta, ca, cert, key, client_id, op_deadline_s, classes, chain_table, max_age_ms, evict_when_full, rdma=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        mgmt: Vec<String>,
        meta: Vec<String>,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        client_id: u64,
        op_deadline_s: f64,
        classes: Vec<(u32, u32)>,
        chain_table: u32,
        max_age_ms: u64,
        evict_when_full: bool,
        rdma: Option<Bound<'_, PyDict>>,
    ) -> PyResult<PyKvCache> {
        if !(op_deadline_s.is_finite() && op_deadline_s > 0.0) {
            return Err(PyValueError::new_err(format!(
                "op_deadline {op_deadline_s} is not a positive number of seconds"
            )));
        }
        // The device first: a bad `[rdma]` table is named before anything
        // else is read or reached.
        let rdma = rdma.as_ref().map(open_rdma).transpose()?;
        let credentials = Credentials::load(&ca, &cert, &key)
            .map_err(|e| PyOSError::new_err((2, format!("the client's credentials: {e}"))))?;
        let connect = Connect {
            mgmt,
            meta,
            credentials,
            client: ClientId(client_id),
            op_deadline: Duration::from_secs_f64(op_deadline_s),
            rdma,
        };
        let config = KvCacheConfig {
            classes,
            chain_table: ChainTableId(chain_table),
            max_age_ms,
            evict_when_full,
        };
        let cache = py
            .detach(|| BlockingKvCache::open(connect, &config))
            .map_err(kv_error)?;
        Ok(PyKvCache { cache: Some(cache) })
    }

    /// The largest block the cache takes, in bytes.
    #[getter]
    fn block_bytes_max(&self) -> u32 {
        self.cache().block_bytes_max()
    }

    /// The cache's size classes as stored: `(slot_bytes, slots)` pairs.
    #[getter]
    fn classes(&self) -> Vec<(u32, u32)> {
        self.cache()
            .layout()
            .classes
            .iter()
            .map(|c| (c.slot_bytes, c.slots))
            .collect()
    }

    /// Whether the cache reaches the storage nodes over RDMA.
    #[getter]
    fn rdma(&self) -> bool {
        self.cache().rdma()
    }

    /// Pins `buffer` (exported until the registration closes) and, on RDMA,
    /// registers it with the device: batches whose views lie inside it then
    /// move one-sided. It must be writable, contiguous and not empty.
    fn register_buffer(
        &self,
        py: Python<'_>,
        buffer: Bound<'_, PyAny>,
    ) -> PyResult<PyRegistration> {
        let view = PyBuffer::<u8>::get(&buffer)
            .map_err(|e| PyValueError::new_err(format!("the buffer is not a byte buffer: {e}")))?;
        if !view.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "the buffer is not contiguous: a registration covers one range of memory",
            ));
        }
        if view.readonly() {
            return Err(PyValueError::new_err(
                "the buffer is read-only: replicas write gets into a registered buffer, so it must be writable",
            ));
        }
        let len = view.len_bytes();
        if len == 0 {
            return Err(PyValueError::new_err(
                "the buffer is empty: there is nothing to register",
            ));
        }
        let owner = Arc::new(RegisteredBuffer { view });
        let cache = self.cache();
        let lent: Arc<dyn Arena> = owner.clone();
        let registration = match py.detach(|| cache.register_arena(lent)) {
            None => None,
            Some(Ok(registration)) => Some(registration),
            Some(Err(e)) => {
                py.detach(move || drop(owner));
                return Err(PyOSError::new_err((
                    12,
                    format!("registering {len} bytes with the RDMA device: {e}"),
                )));
            }
        };
        Ok(PyRegistration {
            one_sided: registration.is_some(),
            held: Mutex::new(Some((owner, registration))),
            len,
        })
    }

    /// The cache's age limit in milliseconds (0: none).
    #[getter]
    fn max_age_ms(&self) -> u64 {
        self.cache().layout().max_age_ms
    }

    fn batch_put_from(
        &self,
        py: Python<'_>,
        keys: Vec<Bound<'_, PyBytes>>,
        buffers: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Vec<Outcome>> {
        check_lengths(keys.len(), buffers.len())?;
        let views = Buffers::export(&buffers, false)?.views();
        let lengths: Vec<usize> = views.iter().map(BlockView::len).collect();
        let blocks: Vec<Bytes> = views.into_iter().map(Bytes::from_owner).collect();
        let keys = key_slices(&keys);
        let cache = self.cache();
        let results = py
            .detach(|| cache.batch_put_bytes(&keys, &blocks))
            .map_err(kv_error)?;
        Ok(results
            .into_iter()
            .zip(lengths)
            .map(|(r, len)| put_outcome(r, len))
            .collect())
    }

    fn batch_get_into(
        &self,
        py: Python<'_>,
        keys: Vec<Bound<'_, PyBytes>>,
        buffers: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Vec<Outcome>> {
        check_lengths(keys.len(), buffers.len())?;
        let views = Buffers::export(&buffers, true)?.views();
        let keys = key_slices(&keys);
        let cache = self.cache();
        let (views, results) = py.detach(|| cache.batch_get_landing(&keys, views));
        drop(views);
        Ok(results
            .map_err(kv_error)?
            .into_iter()
            .map(get_outcome)
            .collect())
    }

    fn batch_exists(&self, py: Python<'_>, keys: Vec<Bound<'_, PyBytes>>) -> PyResult<Vec<bool>> {
        let keys = key_slices(&keys);
        let cache = self.cache();
        py.detach(|| cache.batch_exists(&keys)).map_err(kv_error)
    }

    fn batch_remove(&self, py: Python<'_>, keys: Vec<Bound<'_, PyBytes>>) -> PyResult<Vec<bool>> {
        let keys = key_slices(&keys);
        let cache = self.cache();
        py.detach(|| cache.batch_remove(&keys)).map_err(kv_error)
    }

    /// Evicts what is past the age limit now (the metadata service also
    /// does on its own schedule); returns `(evicted, reclaimed)`.
    fn evict_aged(&self, py: Python<'_>) -> PyResult<(u32, u32)> {
        let cache = self.cache();
        let rsp = py.detach(|| cache.evict_aged()).map_err(kv_error)?;
        Ok((rsp.evicted, rsp.reclaimed))
    }
}

/// Payload bytes this process moved, by RPC method: `{method: (one_sided,
/// copied, in_place)}` (flyfs-rpc's counters, always kept): what shows that
/// a registered buffer's batches moved one-sided and copied nothing.
#[pyfunction]
pub fn payload_moved() -> std::collections::HashMap<&'static str, (u64, u64, u64)> {
    flyfs_rpc::metrics::payload_moved_totals()
        .into_iter()
        .map(|m| {
            (
                m.method,
                (m.one_sided_bytes, m.copied_bytes, m.in_place_bytes),
            )
        })
        .collect()
}
