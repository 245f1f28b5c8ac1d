//! Time for flyfs: the clocks every crate reads and the one retry helper
//! every retry loop uses, so that a simulation controls all of it.
//!
//! The crate sits at the bottom of the workspace beside flyfs-proto and
//! depends on nothing of flyfs; only on tokio's timer.
//!
//! # The rule
//! * **Wall time** (a file's times, a GC due time, a manager's lease expiry:
//!   anything stored, or compared between machines) is read only through a
//!   [`Clock`], which the composition root picks: [`WallClock`] in the
//!   daemons, [`ManualClock`] in tests that move time by hand, [`TokioClock`]
//!   in the simulation, each host's skewed by a [`SkewedClock`].
//! * **Durations that decide safety between machines** (a storage node's
//!   lease with the manager, the manager's failure timeout) are measured on
//!   a [`Clock`] too (a [`TokioClock`] in the daemons), so the simulation
//!   can make them drift apart.
//! * **Deadlines, timeouts and elapsed time in async code** are measured on
//!   [`tokio::time::Instant`] and waited out with [`tokio::time::sleep`],
//!   never on [`std::time::Instant`]. Tokio's clock is simulated under
//!   turmoil and paused in `#[tokio::test(start_paused = true)]`; a deadline
//!   measured on std's clock escapes both, so a run would depend on how fast
//!   the machine happens to be and a seed would no longer replay it.
//! * **Randomness in waits** comes from a seed ([`Backoff::wait`]), never
//!   from a thread RNG, for the same reason.
//! * **Retrying** is [`Retry`]: the call site says what one attempt is and
//!   which failures are worth another; the helper owns the count, the
//!   deadline, the waits and the give-up error.
//!
//! Synchronous code that runs outside any runtime (bypass's reactor thread,
//! the benchmark tools, the process supervisor of `flyfs up`) measures real
//! time with std's clock: nothing simulates it.
#![deny(unsafe_code)]

pub mod clock;
pub mod retry;

pub use clock::{Clock, ManualClock, SkewedClock, TokioClock, WallClock};
pub use retry::{Attempt, Backoff, GaveUp, Retry};
