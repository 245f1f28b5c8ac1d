//! The target state machine of the cluster manager: how a target's public
//! state follows from its local state, and how a whole chain is re-ordered
//! and re-stated when local states change.
//!
//! Pure functions, so the table can be tested row by row and the chain update
//! property-tested; `cluster.rs` decides when to call them.

use flyfs_proto::ids::{ChainVersion, TargetId};
use flyfs_proto::wire::mgmt::{ChainInfo, ChainTarget, LocalState, PublicState};

/// The predecessor of a target, as the transition table distinguishes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Predecessor {
    /// The target has no predecessor (see [`update_chain`] for the exact
    /// meaning).
    None,
    /// The predecessor's (new) public state is serving.
    Serving,
    /// There is a predecessor, and it is not serving.
    NotServing,
}

/// The next public state of a target: exactly 3FS's transition table.
pub fn next_state(
    local: LocalState,
    current: PublicState,
    predecessor: Predecessor,
) -> PublicState {
    use LocalState as L;
    use PublicState as P;
    match (local, current) {
        (L::UpToDate, P::Serving) => P::Serving,
        (L::UpToDate, P::Syncing) => P::Serving,
        (L::UpToDate, P::Waiting) => P::Waiting,
        (L::UpToDate, P::LastSrv) => P::Serving,
        (L::UpToDate, P::Offline) => P::Waiting,

        (L::Online, P::Serving) => P::Serving,
        (L::Online, P::Syncing | P::Waiting) => match predecessor {
            Predecessor::Serving => P::Syncing,
            Predecessor::None | Predecessor::NotServing => P::Waiting,
        },
        (L::Online, P::LastSrv) => P::Serving,
        (L::Online, P::Offline) => P::Waiting,

        (L::Offline, P::Serving) => match predecessor {
            Predecessor::None => P::LastSrv,
            Predecessor::Serving | Predecessor::NotServing => P::Offline,
        },
        (L::Offline, P::Syncing | P::Waiting) => P::Offline,
        (L::Offline, P::LastSrv) => P::LastSrv,
        (L::Offline, P::Offline) => P::Offline,
    }
}

/// Re-evaluates a chain given every member's local state; `None` when nothing
/// changes. This is our exact reading of the table:
///
/// 1. Stable-partition the members: those whose local state is not offline
///    first, then the offline ones, each group keeping its order ("offline
///    targets move to the end of the chain").
/// 2. Walk that order from head to tail and apply [`next_state`]. The
///    predecessor of a member is the member just before it, and its public
///    state is its *new* state (already computed). One refinement: for the
///    `None` case, a member "has a predecessor" only if some member before it
///    holds the chain's data, i.e. ended up serving or lastsrv. Without it, a
///    last serving replica that fails while a syncing replica stands before
///    it in the new order would become offline instead of lastsrv, leaving a
///    chain of waiting and offline members that no state can ever leave (no
///    serving member to sync from, no lastsrv to come back). With it the
///    documented cases are unchanged: a failed head behind serving members
///    becomes offline; when all fail together the first becomes lastsrv and
///    the rest offline (their predecessor is that lastsrv).
/// 3. Stable-sort by rank (serving < syncing < waiting < lastsrv < offline).
/// 4. If the order or any state changed, the chain version goes up by one
///    (the caller bumps the routing version).
///
/// A returning target syncs only from a serving predecessor, so at most one
/// member of a chain syncs at a time.
pub fn update_chain(
    chain: &ChainInfo,
    local: impl Fn(TargetId) -> LocalState,
) -> Option<ChainInfo> {
    update_chain_holding(chain, local, |_| false)
}

/// [`update_chain`], where a member for which `leaving` holds is never made
/// serving: the table's serving becomes syncing (it stays in the write path
/// and answers no reads). Such a member is on its way out of the chain, or
/// offline, and its node has not yet seen that it stopped serving
/// (`cluster.rs`).
pub fn update_chain_holding(
    chain: &ChainInfo,
    local: impl Fn(TargetId) -> LocalState,
    leaving: impl Fn(TargetId) -> bool,
) -> Option<ChainInfo> {
    // Step 1.
    let (mut order, offline): (Vec<_>, Vec<_>) = chain
        .targets
        .iter()
        .map(|member| (*member, local(member.target)))
        .partition(|(_, local)| *local != LocalState::Offline);
    order.extend(offline);

    // Step 2.
    let mut next: Vec<ChainTarget> = Vec::with_capacity(order.len());
    let mut data_holder_before = false;
    for (member, local) in order {
        let predecessor = match next.last() {
            None => Predecessor::None,
            Some(p) if p.state == PublicState::Serving => Predecessor::Serving,
            Some(_) if data_holder_before => Predecessor::NotServing,
            // Only members without the chain's data stand before it: for the
            // table that is no predecessor (it matters only for
            // offline+serving; elsewhere None and NotServing agree).
            Some(_) => Predecessor::None,
        };
        let mut state = next_state(local, member.state, predecessor);
        if state == PublicState::Serving && leaving(member.target) {
            state = PublicState::Syncing;
        }
        if matches!(state, PublicState::Serving | PublicState::LastSrv) {
            data_holder_before = true;
        }
        next.push(ChainTarget {
            target: member.target,
            state,
        });
    }

    // Step 3: `sort_by_key` is stable.
    next.sort_by_key(|member| member.state.rank());

    // Step 4.
    if next == chain.targets {
        return None;
    }
    Some(ChainInfo {
        id: chain.id,
        version: ChainVersion(chain.version.0.wrapping_add(1)),
        targets: next,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use flyfs_proto::ids::ChainId;
    use proptest::prelude::*;

    use super::*;
    use LocalState as L;
    use Predecessor as Pred;
    use PublicState as P;

    // One test per row of the table, each named and asserted as the row reads.
    // "any" predecessor rows are checked for all three predecessor kinds.

    const ANY: [Predecessor; 3] = [Pred::None, Pred::Serving, Pred::NotServing];

    fn row_any(local: LocalState, current: PublicState, expected: PublicState, row: &str) {
        for pred in ANY {
            assert_eq!(
                next_state(local, current, pred),
                expected,
                "row `{row}` with {pred:?}"
            );
        }
    }

    #[test]
    fn row_01_up_to_date_serving_any_serving() {
        row_any(
            L::UpToDate,
            P::Serving,
            P::Serving,
            "up-to-date | serving | any | serving",
        );
    }
    #[test]
    fn row_02_up_to_date_syncing_any_serving() {
        row_any(
            L::UpToDate,
            P::Syncing,
            P::Serving,
            "up-to-date | syncing | any | serving",
        );
    }
    #[test]
    fn row_03_up_to_date_waiting_any_waiting() {
        row_any(
            L::UpToDate,
            P::Waiting,
            P::Waiting,
            "up-to-date | waiting | any | waiting",
        );
    }
    #[test]
    fn row_04_up_to_date_lastsrv_any_serving() {
        row_any(
            L::UpToDate,
            P::LastSrv,
            P::Serving,
            "up-to-date | lastsrv | any | serving",
        );
    }
    #[test]
    fn row_05_up_to_date_offline_any_waiting() {
        row_any(
            L::UpToDate,
            P::Offline,
            P::Waiting,
            "up-to-date | offline | any | waiting",
        );
    }
    #[test]
    fn row_06_online_serving_any_serving() {
        row_any(
            L::Online,
            P::Serving,
            P::Serving,
            "online | serving | any | serving",
        );
    }
    #[test]
    fn row_07_online_syncing_serving_syncing() {
        assert_eq!(
            next_state(L::Online, P::Syncing, Pred::Serving),
            P::Syncing,
            "row `online | syncing | serving | syncing`"
        );
    }
    #[test]
    fn row_08_online_syncing_not_serving_waiting() {
        for pred in [Pred::NotServing, Pred::None] {
            assert_eq!(
                next_state(L::Online, P::Syncing, pred),
                P::Waiting,
                "row `online | syncing | not serving (or none) | waiting` with {pred:?}"
            );
        }
    }
    #[test]
    fn row_09_online_waiting_serving_syncing() {
        assert_eq!(
            next_state(L::Online, P::Waiting, Pred::Serving),
            P::Syncing,
            "row `online | waiting | serving | syncing`"
        );
    }
    #[test]
    fn row_10_online_waiting_not_serving_waiting() {
        for pred in [Pred::NotServing, Pred::None] {
            assert_eq!(
                next_state(L::Online, P::Waiting, pred),
                P::Waiting,
                "row `online | waiting | not serving (or none) | waiting` with {pred:?}"
            );
        }
    }
    #[test]
    fn row_11_online_lastsrv_any_serving() {
        row_any(
            L::Online,
            P::LastSrv,
            P::Serving,
            "online | lastsrv | any | serving",
        );
    }
    #[test]
    fn row_12_online_offline_any_waiting() {
        row_any(
            L::Online,
            P::Offline,
            P::Waiting,
            "online | offline | any | waiting",
        );
    }
    #[test]
    fn row_13_offline_serving_no_predecessor_lastsrv() {
        assert_eq!(
            next_state(L::Offline, P::Serving, Pred::None),
            P::LastSrv,
            "row `offline | serving | has no predecessor | lastsrv`"
        );
    }
    #[test]
    fn row_14_offline_serving_has_predecessor_offline() {
        for pred in [Pred::Serving, Pred::NotServing] {
            assert_eq!(
                next_state(L::Offline, P::Serving, pred),
                P::Offline,
                "row `offline | serving | has predecessor | offline` with {pred:?}"
            );
        }
    }
    #[test]
    fn row_15_offline_syncing_any_offline() {
        row_any(
            L::Offline,
            P::Syncing,
            P::Offline,
            "offline | syncing | any | offline",
        );
    }
    #[test]
    fn row_16_offline_waiting_any_offline() {
        row_any(
            L::Offline,
            P::Waiting,
            P::Offline,
            "offline | waiting | any | offline",
        );
    }
    #[test]
    fn row_17_offline_lastsrv_any_lastsrv() {
        row_any(
            L::Offline,
            P::LastSrv,
            P::LastSrv,
            "offline | lastsrv | any | lastsrv",
        );
    }
    #[test]
    fn row_18_offline_offline_any_offline() {
        row_any(
            L::Offline,
            P::Offline,
            P::Offline,
            "offline | offline | any | offline",
        );
    }

    // Chain updates. Targets are numbered 1.. and written as (id, state).

    fn chain(version: u32, members: &[(u64, PublicState)]) -> ChainInfo {
        ChainInfo {
            id: ChainId(1),
            version: ChainVersion(version),
            targets: members
                .iter()
                .map(|&(t, state)| ChainTarget {
                    target: TargetId(t),
                    state,
                })
                .collect(),
        }
    }

    fn locals(states: &[(u64, LocalState)]) -> impl Fn(TargetId) -> LocalState {
        let map: BTreeMap<TargetId, LocalState> =
            states.iter().map(|&(t, l)| (TargetId(t), l)).collect();
        move |t| map.get(&t).copied().unwrap_or(LocalState::Offline)
    }

    fn serving3() -> ChainInfo {
        chain(1, &[(1, P::Serving), (2, P::Serving), (3, P::Serving)])
    }

    #[test]
    fn head_fails_and_moves_to_the_tail_offline() {
        let next = update_chain(&serving3(), locals(&[(2, L::UpToDate), (3, L::UpToDate)]))
            .expect("a change");
        assert_eq!(
            next,
            chain(2, &[(2, P::Serving), (3, P::Serving), (1, P::Offline)])
        );
    }

    #[test]
    fn tail_fails() {
        let next = update_chain(&serving3(), locals(&[(1, L::UpToDate), (2, L::UpToDate)]))
            .expect("a change");
        assert_eq!(
            next,
            chain(2, &[(1, P::Serving), (2, P::Serving), (3, P::Offline)])
        );
    }

    #[test]
    fn middle_fails() {
        let next = update_chain(&serving3(), locals(&[(1, L::UpToDate), (3, L::Online)]))
            .expect("a change");
        assert_eq!(
            next,
            chain(2, &[(1, P::Serving), (3, P::Serving), (2, P::Offline)])
        );
    }

    #[test]
    fn all_fail_first_becomes_lastsrv() {
        let next = update_chain(&serving3(), locals(&[])).expect("a change");
        assert_eq!(
            next,
            chain(2, &[(1, P::LastSrv), (2, P::Offline), (3, P::Offline)])
        );
        // Nothing moves while they stay down.
        assert_eq!(update_chain(&next, locals(&[])), None);
    }

    #[test]
    fn lastsrv_returns_and_serves_then_the_others_sync() {
        let down = chain(2, &[(1, P::LastSrv), (2, P::Offline), (3, P::Offline)]);
        // A non-lastsrv target coming back alone has to wait.
        let only_2 = update_chain(&down, locals(&[(2, L::Online)])).expect("a change");
        assert_eq!(
            only_2,
            chain(3, &[(2, P::Waiting), (1, P::LastSrv), (3, P::Offline)])
        );
        assert_eq!(update_chain(&only_2, locals(&[(2, L::Online)])), None);

        // The lastsrv comes back: it serves, and the waiting one starts syncing.
        let all = locals(&[(1, L::UpToDate), (2, L::Online), (3, L::Online)]);
        let next = update_chain(&only_2, &all).expect("a change");
        assert_eq!(
            next,
            chain(4, &[(1, P::Serving), (2, P::Waiting), (3, P::Waiting)])
        );
        let next = update_chain(&next, &all).expect("a change");
        assert_eq!(
            next,
            chain(5, &[(1, P::Serving), (2, P::Syncing), (3, P::Waiting)])
        );
    }

    #[test]
    fn offline_returns_waits_syncs_then_serves() {
        let c = chain(5, &[(1, P::Serving), (2, P::Serving), (3, P::Offline)]);
        let up = [(1, L::UpToDate), (2, L::UpToDate)];

        let waiting = update_chain(&c, locals(&[up[0], up[1], (3, L::Online)])).expect("a change");
        assert_eq!(
            waiting,
            chain(6, &[(1, P::Serving), (2, P::Serving), (3, P::Waiting)])
        );

        let syncing =
            update_chain(&waiting, locals(&[up[0], up[1], (3, L::Online)])).expect("a change");
        assert_eq!(
            syncing,
            chain(7, &[(1, P::Serving), (2, P::Serving), (3, P::Syncing)])
        );

        // Still syncing: stable.
        assert_eq!(
            update_chain(&syncing, locals(&[up[0], up[1], (3, L::Online)])),
            None
        );

        // The sync finished; the node reports up-to-date.
        let serving =
            update_chain(&syncing, locals(&[up[0], up[1], (3, L::UpToDate)])).expect("a change");
        assert_eq!(
            serving,
            chain(8, &[(1, P::Serving), (2, P::Serving), (3, P::Serving)])
        );
    }

    #[test]
    fn two_return_at_once_only_one_syncs() {
        let c = chain(1, &[(1, P::Serving), (2, P::Offline), (3, P::Offline)]);
        let l = locals(&[(1, L::UpToDate), (2, L::Online), (3, L::Online)]);
        let waiting = update_chain(&c, &l).expect("a change");
        assert_eq!(
            waiting,
            chain(2, &[(1, P::Serving), (2, P::Waiting), (3, P::Waiting)])
        );
        let one = update_chain(&waiting, &l).expect("a change");
        assert_eq!(
            one,
            chain(3, &[(1, P::Serving), (2, P::Syncing), (3, P::Waiting)])
        );
        assert_eq!(
            update_chain(&one, &l),
            None,
            "the second waits for the first"
        );

        let l = locals(&[(1, L::UpToDate), (2, L::UpToDate), (3, L::Online)]);
        let two = update_chain(&one, &l).expect("a change");
        // 2 serves now; 3 is behind 2 and 2 serves, so 3 syncs in the same step.
        assert_eq!(
            two,
            chain(4, &[(1, P::Serving), (2, P::Serving), (3, P::Syncing)])
        );
    }

    #[test]
    fn version_bumps_exactly_once_per_change() {
        let c = serving3();
        let all_up = locals(&[(1, L::UpToDate), (2, L::UpToDate), (3, L::UpToDate)]);
        assert_eq!(update_chain(&c, &all_up), None, "no change, no bump");
        // Two targets fail in one evaluation: one change, one bump.
        let next = update_chain(&c, locals(&[(3, L::UpToDate)])).expect("a change");
        assert_eq!(next.version, ChainVersion(2));
        assert_eq!(
            next,
            chain(2, &[(3, P::Serving), (1, P::Offline), (2, P::Offline)])
        );
    }

    #[test]
    fn last_server_failing_behind_a_demoted_syncer_becomes_lastsrv() {
        // The case our refinement of "has predecessor" exists for: the only
        // serving member fails while a syncing member stays up. The syncer
        // is first in the new order but holds no complete data.
        let c = chain(3, &[(1, P::Serving), (2, P::Syncing)]);
        let next = update_chain(&c, locals(&[(2, L::Online)])).expect("a change");
        assert_eq!(next, chain(4, &[(2, P::Waiting), (1, P::LastSrv)]));
        // 1 comes back: it serves, and 2 syncs from it.
        let back = locals(&[(1, L::UpToDate), (2, L::Online)]);
        let next = update_chain(&next, &back).expect("a change");
        assert_eq!(next, chain(5, &[(1, P::Serving), (2, P::Waiting)]));
        let next = update_chain(&next, &back).expect("a change");
        assert_eq!(next, chain(6, &[(1, P::Serving), (2, P::Syncing)]));
    }

    // Property test: random chains in states the manager can produce, random
    // local states, repeated updates.

    fn rank_sorted(c: &ChainInfo) -> bool {
        c.targets
            .windows(2)
            .all(|w| w[0].state.rank() <= w[1].state.rank())
    }

    fn holds_data(c: &ChainInfo) -> bool {
        c.targets
            .iter()
            .any(|t| matches!(t.state, P::Serving | P::LastSrv))
    }

    fn local_strategy() -> impl Strategy<Value = LocalState> {
        prop_oneof![Just(L::UpToDate), Just(L::Online), Just(L::Offline)]
    }

    proptest! {
        #[test]
        fn chain_updates_keep_their_invariants(
            size in 1usize..6,
            rounds in proptest::collection::vec(proptest::collection::vec(local_strategy(), 6), 1..12),
        ) {
            // A new chain starts all serving, as CreateChain makes it.
            let mut c = chain(
                1,
                &(1..=size as u64).map(|t| (t, P::Serving)).collect::<Vec<_>>(),
            );
            for round in rounds {
                let l = |t: TargetId| round[(t.0 - 1) as usize];
                let before = c.clone();
                match update_chain(&before, l) {
                    None => {}
                    Some(next) => {
                        prop_assert_ne!(&next.targets, &before.targets, "a change was reported");
                        prop_assert_eq!(next.version.0, before.version.0 + 1);
                        c = next;
                    }
                }
                prop_assert!(rank_sorted(&c), "not rank-sorted: {:?}", c);
                let syncing: Vec<usize> = c
                    .targets
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.state == P::Syncing)
                    .map(|(i, _)| i)
                    .collect();
                prop_assert!(syncing.len() <= 1, "two syncing: {:?}", c);
                for i in syncing {
                    prop_assert!(i > 0 && c.targets[i - 1].state == P::Serving,
                        "syncing without a serving predecessor: {:?}", c);
                }
                let mut ids: Vec<u64> = c.targets.iter().map(|t| t.target.0).collect();
                ids.sort_unstable();
                prop_assert_eq!(ids, (1..=size as u64).collect::<Vec<_>>());
                // The chain never forgets who holds its data.
                prop_assert!(holds_data(&c), "no serving or lastsrv member: {:?}", c);
                prop_assert!(
                    c.targets.iter().filter(|t| t.state == P::LastSrv).count() <= 1
                        && !(c.targets.iter().any(|t| t.state == P::LastSrv)
                            && c.targets.iter().any(|t| t.state == P::Serving)),
                    "lastsrv beside another data holder: {:?}", c
                );
                // Only targets that are up can serve or sync.
                for t in &c.targets {
                    if t.state.writable() {
                        prop_assert_ne!(l(t.target), L::Offline, "down target {:?} writable", t);
                    }
                }
            }
        }
    }
}
