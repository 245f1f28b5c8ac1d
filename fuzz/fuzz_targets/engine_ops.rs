//! Operation sequences with power cuts and crashes against the chunk engine
//! and its model (see chunk-engine/src/testing.rs).
#![no_main]

use flyfs_chunk_engine::testing::{Op, fuzz_ops};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|ops: Vec<Op>| fuzz_ops(&ops));
