//! Arbitrary bytes decoded as superblock, journal batch, checkpoint and chunk
//! record: never a panic, and what decodes re-encodes identically.
#![no_main]

use flyfs_chunk_engine::testing::fuzz_decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fuzz_decode(data));
