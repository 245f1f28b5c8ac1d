//! The benchmarks of flyfs itself, which `flyfs bench engine|storage|meta|kv|native`
//! runs (their flags and JSON output are what benches/*-vs-fio and users
//! call), and what the peer-benchmark tools share.
//!
//! * [`engine`]: the chunk engine on io_uring against a file or device.
//! * [`storage`]: a cluster of real daemons (a manager and three storage
//!   nodes, started through flyfs-deploy's supervisor) driven over
//!   loopback TCP by a storage client.
//! * [`meta`]: the metadata service over loopback TCP on the embedded
//!   store.
//! * [`kv`]: the KV cache (flyfs-kvcache) on the same cluster plus a
//!   metadata daemon, driven by four client processes.
//! * [`native`]: reads of a file on a mount through native I/O (the
//!   mount daemon's shared-memory rings), against which
//!   `benches/native-vs-fuse` sets FUSE and fio.
//! * [`chaos`]: a soak of a cluster of real daemons (in network namespaces
//!   where possible) under a verifying workload while it kills, restarts,
//!   partitions and replaces them.
//! * [`size`]: byte sizes on command lines (`4KiB`, `2GiB`).
//! * `launch`: what `storage`, `kv` and `chaos` share to start and stop
//!   their clusters of daemons (run directory, configs, credentials,
//!   waiting for the routing).
//!
//! The binaries `fsbench` (workloads through any mount) and `fsreport`
//! (tables and charts of the peer comparison) live beside this library.
//! Benchmarks are tools run from a command line, so they report errors
//! with `anyhow`, as binaries do.
#![deny(unsafe_code)]

pub mod chaos;
pub mod engine;
pub mod kv;
mod launch;
pub mod meta;
pub mod native;
pub mod size;
pub mod storage;
