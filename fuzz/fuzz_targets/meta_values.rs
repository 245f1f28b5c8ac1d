//! Arbitrary bytes decoded as every stored metadata key and value (inodes,
//! directory entries, sessions, GC entries, layouts, the format record):
//! never a panic, only errors naming the key. The same function runs on
//! random inputs in a stable proptest in fs-meta.
#![no_main]

use flyfs_fs_meta::schema::fuzz_decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fuzz_decode(data));
