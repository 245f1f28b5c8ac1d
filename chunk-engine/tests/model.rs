//! Model-based property test: random operation sequences (writes, appends,
//! replaces, truncates, commits, aborts, removes, reads, clean reopens)
//! against a map of byte vectors; contents, versions, lengths and checksums
//! must agree after every step. proptest shrinks a failure to a minimal
//! sequence. Each case draws its journal mode, so the cases are split between
//! the journal thread and the inline journal.

use flyfs_chunk_engine::JournalMode;
use flyfs_chunk_engine::testing::Harness;
use flyfs_chunk_engine::testing::strategies::{op, small_update_op};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(
        inline in any::<bool>(),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let journal = if inline { JournalMode::Inline } else { JournalMode::Thread };
        let mut harness = Harness::new(0, journal);
        for op in &ops {
            harness.step(op).map_err(TestCaseError::fail)?;
        }
        harness.finish().map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model_under_small_updates(
        inline in any::<bool>(),
        ops in prop::collection::vec(small_update_op(), 1..120),
    ) {
        let journal = if inline { JournalMode::Inline } else { JournalMode::Thread };
        let mut harness = Harness::new(0, journal);
        for op in &ops {
            harness.step(op).map_err(TestCaseError::fail)?;
        }
        harness.finish().map_err(TestCaseError::fail)?;
    }
}
