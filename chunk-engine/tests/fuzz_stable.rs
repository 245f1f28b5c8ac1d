//! The cargo-fuzz targets' entry points, run briefly on stable with random
//! inputs so they cannot rot between nightly fuzzing sessions.

use arbitrary::{Arbitrary, Unstructured};
use flyfs_chunk_engine::testing::{Op, fuzz_decode, fuzz_ops};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn decode_never_panics(data in prop::collection::vec(any::<u8>(), 0..9000)) {
        fuzz_decode(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_op_sequences_hold(data in prop::collection::vec(any::<u8>(), 0..2000)) {
        let mut input = Unstructured::new(&data);
        let ops: Vec<Op> = Vec::arbitrary(&mut input).unwrap_or_default();
        fuzz_ops(&ops);
    }
}
