//! Model-based property test: random operation sequences (writes, appends,
//! replaces, truncates, commits, aborts, removes, reads, clean reopens)
//! against a map of byte vectors; contents, versions, lengths and checksums
//! must agree after every step. proptest shrinks a failure to a minimal
//! sequence. Each case draws its journal mode, so the cases are split between
//! the journal thread and the inline journal.

use flyfs_chunk_engine::JournalMode;
use flyfs_chunk_engine::testing::{Harness, Op};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    let k = 0u8..8;
    let size = prop_oneof![
        0u16..64,
        (0u16..4).prop_map(|b| b * 4096),
        0u16..8192,
        any::<u16>()
    ];
    prop_oneof![
        5 => (k.clone(), size.clone(), size.clone(), any::<u8>(), any::<bool>(), any::<bool>())
            .prop_map(|(key, offset, len, seed, append, prepare)| Op::Write { key, offset, len, seed, append, prepare }),
        1 => (k.clone(), size.clone(), any::<u8>(), any::<bool>())
            .prop_map(|(key, len, seed, prepare)| Op::Replace { key, len, seed, prepare }),
        1 => (k.clone(), size.clone(), any::<bool>()).prop_map(|(key, len, prepare)| Op::Truncate { key, len, prepare }),
        4 => k.clone().prop_map(|key| Op::Commit { key }),
        1 => Just(Op::CommitAll),
        1 => k.clone().prop_map(|key| Op::Abort { key }),
        1 => k.clone().prop_map(|key| Op::Remove { key }),
        3 => (k, size.clone(), size, any::<bool>()).prop_map(|(key, offset, len, pending)| Op::Read { key, offset, len, pending }),
        1 => Just(Op::Reopen),
    ]
}

/// Operations that stress small updates: overwrites inside chunks made
/// large by replaces, and multi-extent updates, which the engine makes as
/// patches; plus everything that interacts with them (prepared versions,
/// aborts, appends and truncates over patched chunks, reads of both
/// versions, reopens, which redo the patches).
fn small_update_op() -> impl Strategy<Value = Op> {
    let k = 0u8..8;
    let offset = prop_oneof![(0u16..16).prop_map(|b| b * 4096), 0u16..65_535];
    let len = prop_oneof![1u16..64, Just(4096u16), 1u16..8192];
    prop_oneof![
        5 => (k.clone(), offset.clone(), len.clone(), any::<u8>(), any::<bool>())
            .prop_map(|(key, offset, len, seed, prepare)| Op::Write { key, offset, len, seed, append: false, prepare }),
        4 => (k.clone(), prop::collection::vec((offset.clone(), len.clone(), any::<u8>()), 1..5), any::<bool>())
            .prop_map(|(key, extents, prepare)| Op::WriteExtents { key, extents, prepare }),
        1 => (k.clone(), len.clone(), any::<u8>(), any::<bool>())
            .prop_map(|(key, len, seed, prepare)| Op::Write { key, offset: 0, len, seed, append: true, prepare }),
        1 => (k.clone(), 16_384u16..65_535, any::<u8>(), any::<bool>())
            .prop_map(|(key, len, seed, prepare)| Op::Replace { key, len, seed, prepare }),
        1 => (k.clone(), 0u16..65_535, any::<bool>()).prop_map(|(key, len, prepare)| Op::Truncate { key, len, prepare }),
        5 => k.clone().prop_map(|key| Op::Commit { key }),
        1 => Just(Op::CommitAll),
        1 => k.clone().prop_map(|key| Op::Abort { key }),
        1 => k.clone().prop_map(|key| Op::Remove { key }),
        3 => (k, offset, len, any::<bool>()).prop_map(|(key, offset, len, pending)| Op::Read { key, offset, len, pending }),
        1 => Just(Op::Reopen),
    ]
}

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
