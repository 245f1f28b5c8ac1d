//! The deployment surface of flyfs: what an operator writes and what runs
//! on a machine.
//!
//! * [`config`]: each daemon's TOML config file (`flyfs mgmtd`, `storage`,
//!   `meta`, `mount`): its keys, their defaults, the checks that run before
//!   a daemon starts, and serialisation, so that every tool that writes a
//!   config (`flyfs up`, `flyfs bench storage`, the multi-process tests)
//!   writes it from the same struct the daemon reads. The examples in this
//!   folder (`deploy/*.toml`) list every key with its default, and a test
//!   checks that they parse to the defaults.
//! * [`supervisor`]: daemons started detached, found again by pid file and
//!   process start time, and stopped: the one process supervisor of
//!   `flyfs up`/`down`, the storage benchmark and the multi-process tests.
//!
//! It sits above every library crate (configs map onto their settings) and
//! below the `flyfs` binary and the benchmarks. It starts nothing by itself
//! and chooses no implementation: that is the binary's job.
#![deny(unsafe_code)]

pub mod config;
pub mod supervisor;
