//! Arbitrary bytes fed to an rpc receiver: frame header decode, body CRC
//! check, message decode. Never a panic, never an unbounded allocation. The
//! same function runs on random inputs in rpc/tests/fuzz_stable.rs.
#![no_main]

use flyfs_proto::frame::fuzz_decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fuzz_decode(data));
