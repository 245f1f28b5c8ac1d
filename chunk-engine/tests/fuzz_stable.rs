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

/// Every input a fuzzer ever crashed on, replayed forever. A new crash file
/// from `cargo fuzz` goes into tests/fuzz-regressions/<target>/ with its fix.
#[test]
fn fuzz_regressions_stay_fixed() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions/decode");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("regression directory") {
        let path = entry.expect("directory entry").path();
        fuzz_decode(&std::fs::read(&path).expect("regression input"));
        replayed += 1;
    }
    assert!(
        replayed > 0,
        "no regression inputs found in {}",
        dir.display()
    );
}
