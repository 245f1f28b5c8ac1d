//! Per-method RPC metrics on both sides of a connection, through the
//! `metrics` facade (a process exports them by installing a recorder, as the
//! `flyfs` binary does for `metrics_listen`):
//!
//! * `flyfs_rpc_{server,client}_requests_total{method}`: requests answered
//!   (server) or attempts made (client; each retry is one more);
//! * `flyfs_rpc_{server,client}_errors_total{method}`: of those, replies with
//!   a non-`Ok` status (server), or attempts that failed in any way: remote
//!   status, timeout, lost connection (client). A service's own error
//!   answer inside an `Ok` reply (a `Result` in the body) is not counted;
//! * `flyfs_rpc_{server,client}_request_seconds{method}`: latency histogram
//!   (server: from dispatch to the encoded reply; client: one attempt);
//! * `flyfs_rpc_{server,client}_payload_bytes_total{method,direction}`:
//!   message and payload bytes of requests (`direction="request"`) and
//!   replies (`direction="response"`);
//! * `flyfs_rpc_payload_moved_bytes_total{method,how}` (RDMA transport):
//!   payload bytes moved by one-sided RDMA operations (`how="one_sided"`,
//!   counted by the side that names its buffer and by the side that pulls
//!   it or writes into it: a request's payload pulled by RDMA READ, a
//!   reply's payload pushed by RDMA WRITE) versus copied through message
//!   slots (`how="copied"`: a buffer outside the registered arenas, a
//!   client that lent no buffer for a reply, a reply larger than the
//!   buffer lent), and, on any transport, payload bytes read from the
//!   connection straight into the caller's memory (`how="in_place"`, a
//!   [`crate::landing`] call) and bytes a client copied between its
//!   caller's memory and a payload (`how="copied"` too, counted by that
//!   client through [`payload_copied`]: a KV cache get whose reply did not
//!   land). These are also kept in plain atomics, always on, for
//!   [`payload_moved_totals`] (the storage bench's JSON, and the tests that
//!   check a zero-copy path copies nothing).
//!
//! A method's handles are registered on its first call after [`enable`]
//! (so only the methods a process uses show up); a call then costs a binary
//! search over the method table, a clock read and a few atomic adds, and no
//! allocation. Before [`enable`] (a process without metrics) a call costs
//! one atomic load.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram, Unit};
use tokio::time::Instant;

use flyfs_proto::wire::METHODS;

/// The handles of one method on one side.
#[derive(Debug)]
pub(crate) struct MethodMetrics {
    requests: Counter,
    errors: Counter,
    seconds: Histogram,
    request_bytes: Counter,
    response_bytes: Counter,
}

impl MethodMetrics {
    fn register(side: &str, method: &'static str) -> MethodMetrics {
        let name = |what: &str| format!("flyfs_rpc_{side}_{what}");
        MethodMetrics {
            requests: metrics::counter!(name("requests_total"), "method" => method),
            errors: metrics::counter!(name("errors_total"), "method" => method),
            seconds: metrics::histogram!(name("request_seconds"), "method" => method),
            request_bytes: metrics::counter!(
                name("payload_bytes_total"), "method" => method, "direction" => "request"
            ),
            response_bytes: metrics::counter!(
                name("payload_bytes_total"), "method" => method, "direction" => "response"
            ),
        }
    }

    /// One finished request (or attempt).
    pub(crate) fn record(
        &self,
        elapsed: Duration,
        request_bytes: usize,
        response_bytes: usize,
        failed: bool,
    ) {
        self.requests.increment(1);
        if failed {
            self.errors.increment(1);
        }
        self.seconds.record(elapsed.as_secs_f64());
        self.request_bytes.increment(request_bytes as u64);
        self.response_bytes.increment(response_bytes as u64);
    }
}

/// The handles of every method on one side, by method id, each registered
/// on its first use (so a scrape shows only the methods a process uses).
#[derive(Debug)]
struct Table {
    side: &'static str,
    /// Sorted method ids; `names[i]` and `methods[i]` belong to `ids[i]`.
    ids: Vec<u16>,
    names: Vec<&'static str>,
    methods: Vec<OnceLock<MethodMetrics>>,
    /// Any id the table does not know (a newer peer's method).
    unknown: OnceLock<MethodMetrics>,
}

impl Table {
    fn new(side: &'static str) -> Table {
        let mut known: Vec<(u16, &'static str)> = METHODS.to_vec();
        known.sort_unstable();
        Table {
            side,
            ids: known.iter().map(|(id, _)| *id).collect(),
            names: known.iter().map(|(_, name)| *name).collect(),
            methods: known.iter().map(|_| OnceLock::new()).collect(),
            unknown: OnceLock::new(),
        }
    }

    fn get(&self, method: u16) -> &MethodMetrics {
        match self.ids.binary_search(&method) {
            Ok(index) => self.methods[index]
                .get_or_init(|| MethodMetrics::register(self.side, self.names[index])),
            Err(_) => self
                .unknown
                .get_or_init(|| MethodMetrics::register(self.side, "unknown")),
        }
    }
}

static SERVER: OnceLock<Table> = OnceLock::new();
static CLIENT: OnceLock<Table> = OnceLock::new();

/// Registers the RPC metrics with the installed recorder and starts
/// recording. Call it once the process's recorder is installed (handles
/// registered before that would go nowhere); later calls do nothing.
pub fn enable() {
    let describe = |side: &'static str| {
        let name = |what: &str| format!("flyfs_rpc_{side}_{what}");
        metrics::describe_counter!(
            name("requests_total"),
            Unit::Count,
            format!("RPC requests, per method ({side} side)")
        );
        metrics::describe_counter!(
            name("errors_total"),
            Unit::Count,
            format!("RPC requests that failed, per method ({side} side)")
        );
        metrics::describe_histogram!(
            name("request_seconds"),
            Unit::Seconds,
            format!("RPC latency, per method ({side} side)")
        );
        metrics::describe_counter!(
            name("payload_bytes_total"),
            Unit::Bytes,
            format!("RPC message and payload bytes, per method and direction ({side} side)")
        );
    };
    SERVER.get_or_init(|| {
        describe("server");
        Table::new("server")
    });
    CLIENT.get_or_init(|| {
        describe("client");
        Table::new("client")
    });
}

/// The server-side handles of `method`, if metrics are enabled.
pub(crate) fn server(method: u16) -> Option<&'static MethodMetrics> {
    SERVER.get().map(|table| table.get(method))
}

/// The client-side handles of `method`, if metrics are enabled.
pub(crate) fn client(method: u16) -> Option<&'static MethodMetrics> {
    CLIENT.get().map(|table| table.get(method))
}

/// A clock started only when metrics are on. Tokio's, like every elapsed
/// time in async code: a simulation records simulated latencies.
pub(crate) fn start(metrics: Option<&MethodMetrics>) -> Option<Instant> {
    metrics.map(|_| Instant::now())
}

/// Payload bytes of one method moved one-sided versus copied (RDMA).
#[derive(Debug)]
pub(crate) struct MovedCounters {
    name: &'static str,
    one_sided: std::sync::atomic::AtomicU64,
    copied: std::sync::atomic::AtomicU64,
    in_place: std::sync::atomic::AtomicU64,
}

/// How payload bytes moved.
#[derive(Clone, Copy)]
enum How {
    OneSided,
    Copied,
    InPlace,
}

impl MovedCounters {
    pub(crate) fn one_sided(&self, bytes: usize) {
        self.add(bytes, How::OneSided);
    }

    pub(crate) fn copied(&self, bytes: usize) {
        self.add(bytes, How::Copied);
    }

    pub(crate) fn in_place(&self, bytes: usize) {
        self.add(bytes, How::InPlace);
    }

    fn add(&self, bytes: usize, how: How) {
        if bytes == 0 {
            return;
        }
        let (counter, how) = match how {
            How::OneSided => (&self.one_sided, "one_sided"),
            How::Copied => (&self.copied, "copied"),
            How::InPlace => (&self.in_place, "in_place"),
        };
        counter.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
        if SERVER.get().is_some() {
            metrics::counter!(
                "flyfs_rpc_payload_moved_bytes_total", "method" => self.name, "how" => how
            )
            .increment(bytes as u64);
        }
    }
}

/// Method ids and names, sorted by id, with one counter pair each (the last
/// pair counts unknown ids).
struct MovedTable {
    ids: Vec<u16>,
    counters: Vec<MovedCounters>,
}

fn moved_table() -> &'static MovedTable {
    static TABLE: OnceLock<MovedTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut known: Vec<(u16, &'static str)> = METHODS.to_vec();
        known.sort_unstable();
        known.push((u16::MAX, "unknown"));
        MovedTable {
            ids: known.iter().map(|(id, _)| *id).collect(),
            counters: known
                .iter()
                .map(|(_, name)| MovedCounters {
                    name,
                    one_sided: Default::default(),
                    copied: Default::default(),
                    in_place: Default::default(),
                })
                .collect(),
        }
    })
}

/// The counters of `method`'s payloads (always on: two atomic adds a call).
pub(crate) fn payload_moved(method: u16) -> &'static MovedCounters {
    let table = moved_table();
    let index = table
        .ids
        .binary_search(&method)
        .unwrap_or(table.ids.len() - 1);
    &table.counters[index]
}

/// Counts `bytes` of `M`'s payloads that a client copied between its
/// caller's memory and a payload (a reply that did not land in the
/// caller's buffer): what a zero-copy path must keep at zero.
pub fn payload_copied<M: flyfs_proto::Method>(bytes: usize) {
    payload_moved(M::ID).copied(bytes);
}

/// Payload bytes one method moved in this process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PayloadMoved {
    pub method: &'static str,
    pub one_sided_bytes: u64,
    pub copied_bytes: u64,
    /// Read from the connection straight into the caller's memory.
    pub in_place_bytes: u64,
}

/// Every method that moved payload bytes one-sided, copied or in place in
/// this process, by method name.
pub fn payload_moved_totals() -> Vec<PayloadMoved> {
    let table = moved_table();
    table
        .counters
        .iter()
        .filter_map(|counters| {
            let one_sided = counters
                .one_sided
                .load(std::sync::atomic::Ordering::Relaxed);
            let copied = counters.copied.load(std::sync::atomic::Ordering::Relaxed);
            let in_place = counters.in_place.load(std::sync::atomic::Ordering::Relaxed);
            (one_sided + copied + in_place > 0).then_some(PayloadMoved {
                method: counters.name,
                one_sided_bytes: one_sided,
                copied_bytes: copied,
                in_place_bytes: in_place,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_its_handles_and_unknown_ids_share_one() {
        let table = Table::new("test");
        for (id, _) in METHODS {
            let index = table.ids.binary_search(id).expect("known");
            let first: *const MethodMetrics = table.get(*id);
            assert!(std::ptr::eq(first, table.get(*id)));
            assert!(std::ptr::eq(
                first,
                table.methods[index].get().expect("set")
            ));
        }
        let unknown: *const MethodMetrics = table.get(65_535);
        assert!(std::ptr::eq(unknown, table.get(65_534)));
    }
}
