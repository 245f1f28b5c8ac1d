//! The one retry helper: [`Retry::run`] repeats an attempt with
//! exponential, deterministically jittered backoff until it is done, the
//! attempts run out or the deadline passes.
//!
//! Every retry loop in flyfs is this one (the RPC client's call retries,
//! the metadata client's failover, the storage client's routing refresh,
//! a replica's forward to its successor, KV transactions). What differs
//! between them is said at the call site: what one attempt is, which
//! failures are worth another attempt ([`Attempt::Retry`]) and which end the
//! operation ([`Attempt::Done`] with the caller's error), and what to do
//! before the next attempt (the attempt closure gets the attempt number and
//! does it first). The helper owns the count, the deadline, the waits and
//! the give-up error ([`GaveUp`], with attempts and elapsed time).
//!
//! Determinism: waits are tokio timers and the deadline is measured on
//! tokio's clock, so under turmoil (and in paused-time tests) they are
//! simulated; the jitter is a hash of a seed the caller passes (a request
//! id, a per-client counter, a transaction's serial number), never a thread
//! RNG. A simulation seeded the same way replays every wait.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How long to wait between attempts: `initial` before the first retry,
/// doubling for each further one up to `max`, each wait jittered into the
/// upper half of its value so that callers that failed together do not
/// retry together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max }
    }

    /// The wait before retry number `retry` (1 for the first retry):
    /// `initial * 2^(retry-1)`, capped at `max`, then jittered into
    /// `[half, whole]` of that. The jitter is a hash of `seed` and `retry`,
    /// so the same seed always waits the same.
    pub fn wait(&self, retry: u32, seed: u64) -> Duration {
        let doublings = retry.saturating_sub(1).min(32);
        let base = self
            .initial
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max);
        let base_nanos = base.as_nanos().min(u128::from(u64::MAX)) as u64;
        let half = base_nanos / 2;
        let jitter = splitmix64(seed ^ u64::from(retry).rotate_left(32)) % (base_nanos - half + 1);
        Duration::from_nanos(half + jitter)
    }
}

/// SplitMix64: a fast, well-mixed hash of one u64.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt<T, E> {
    /// The operation is over and this is its answer: a success, or (when
    /// `T` is a `Result`) a failure another attempt could not fix.
    Done(T),
    /// This attempt failed in a way the next may not: try again after the
    /// backoff, if attempts and time remain. The error is what the caller
    /// hears if none do.
    Retry(E),
}

/// Attempts or time ran out: the operation failed `attempts` times in
/// `elapsed` (on tokio's clock), the last time with `last`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GaveUp<E> {
    pub attempts: u32,
    pub elapsed: Duration,
    pub last: E,
}

impl<E: fmt::Display> fmt::Display for GaveUp<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gave up after {} attempts in {:?}: {}",
            self.attempts, self.elapsed, self.last
        )
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for GaveUp<E> {}

/// When a retried operation gives up, and how it waits meanwhile. Made with
/// [`Retry::attempts`] or [`Retry::deadline`], so every retry has a limit;
/// run with [`Retry::run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    backoff: Backoff,
    attempts_max: u32,
    deadline: Option<Duration>,
    immediate_retries: u32,
}

impl Retry {
    /// At most `attempts_max` attempts in all, the first included; 0 and 1
    /// both mean a single attempt.
    pub fn attempts(attempts_max: u32, backoff: Backoff) -> Retry {
        Retry {
            backoff,
            attempts_max: attempts_max.max(1),
            deadline: None,
            immediate_retries: 0,
        }
    }

    /// Attempts until `deadline` has passed since the first one began: an
    /// attempt that fails after it ends the operation. The helper does not
    /// cut an attempt short (each attempt bounds itself, with an RPC timeout
    /// say) nor a wait (the last attempt may start up to one backoff after
    /// the deadline).
    pub fn deadline(deadline: Duration, backoff: Backoff) -> Retry {
        Retry {
            backoff,
            attempts_max: u32::MAX,
            deadline: Some(deadline),
            immediate_retries: 0,
        }
    }

    /// The first `count` retries run at once and the backoff starts after
    /// them: for failing over to another replica before waiting.
    pub fn immediate_retries(mut self, count: u32) -> Retry {
        self.immediate_retries = count;
        self
    }

    /// The wait before retry number `retry` (1 for the first retry).
    pub fn wait(&self, retry: u32, seed: u64) -> Duration {
        match retry.checked_sub(self.immediate_retries) {
            Some(backed_off @ 1..) => self.backoff.wait(backed_off, seed),
            _ => Duration::ZERO,
        }
    }

    /// Runs `attempt(1)`, `attempt(2)`, ... until one is
    /// [`Done`](Attempt::Done), waiting [`wait`](Retry::wait)`(n, seed)`
    /// after failed attempt `n`. When a failed attempt is the last one
    /// allowed, or ends after the deadline, the answer is [`GaveUp`] with
    /// that attempt's error.
    ///
    /// `attempt` gets the attempt's number: whatever must happen between
    /// attempts (refresh routing, move to the next address) it does at the
    /// start of every attempt after the first.
    ///
    /// `attempt` is a closure returning a future rather than an async
    /// closure: the future of an `AsyncFnMut` cannot yet be required to be
    /// `Send` for every borrow of the closure, and tasks that retry must be
    /// spawnable. State that lives across attempts is therefore kept outside
    /// the closure's future (moved in, or in an atomic).
    pub async fn run<T, E, F, Fut>(self, seed: u64, mut attempt: F) -> Result<T, GaveUp<E>>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Attempt<T, E>>,
    {
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let last = match attempt(attempts).await {
                Attempt::Done(answer) => return Ok(answer),
                Attempt::Retry(error) => error,
            };
            let elapsed = started.elapsed();
            let out_of_time = self.deadline.is_some_and(|deadline| elapsed >= deadline);
            if attempts >= self.attempts_max || out_of_time {
                return Err(GaveUp {
                    attempts,
                    elapsed,
                    last,
                });
            }
            let wait = self.wait(attempts, seed);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::future::ready;

    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters_deterministically() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(700));
        for retry in 1..=6u32 {
            let base = Duration::from_millis(100 * (1 << (retry - 1))).min(backoff.max);
            for seed in 0..50 {
                let wait = backoff.wait(retry, seed);
                assert!(
                    wait >= base / 2 && wait <= base,
                    "retry {retry}: {wait:?} vs {base:?}"
                );
                assert_eq!(wait, backoff.wait(retry, seed), "same seed, same wait");
            }
        }
        let distinct: BTreeSet<Duration> = (0..50).map(|seed| backoff.wait(1, seed)).collect();
        assert!(distinct.len() > 40, "jitter spreads: {}", distinct.len());
        // Huge retry counts neither overflow nor exceed the cap.
        assert!(backoff.wait(u32::MAX, 7) <= backoff.max);
    }

    #[test]
    fn immediate_retries_do_not_wait_and_the_backoff_starts_after_them() {
        let backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        let retry = Retry::deadline(Duration::from_secs(60), backoff).immediate_retries(1);
        assert_eq!(retry.wait(1, 9), Duration::ZERO);
        assert_eq!(retry.wait(2, 9), backoff.wait(1, 9));
        assert_eq!(retry.wait(3, 9), backoff.wait(2, 9));
        let plain = Retry::attempts(5, backoff);
        assert_eq!(plain.wait(1, 9), backoff.wait(1, 9));
    }

    const BACKOFF: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));

    #[tokio::test(start_paused = true)]
    async fn a_done_attempt_answers_at_once() {
        let started = Instant::now();
        let answer: Result<Result<u32, &str>, GaveUp<&str>> = Retry::attempts(3, BACKOFF)
            .run(1, |attempt| {
                assert_eq!(attempt, 1, "attempts count from 1");
                ready(Attempt::Done(Err("refused")))
            })
            .await;
        assert_eq!(
            answer,
            Ok(Err("refused")),
            "a failure that is done is not retried"
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// Tokio's timer has millisecond ticks: a sleep ends on the first tick
    /// at or after its deadline.
    const TICK: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn attempts_run_out_after_the_seeded_waits() {
        let seed = 42;
        let started = Instant::now();
        let mut began = Vec::new();
        let answer: Result<(), _> = Retry::attempts(4, BACKOFF)
            .run(seed, |attempt| {
                began.push((attempt, started.elapsed()));
                ready(Attempt::Retry(format!("attempt {attempt} failed")))
            })
            .await;
        let numbers: Vec<u32> = began.iter().map(|(attempt, _)| *attempt).collect();
        assert_eq!(numbers, [1, 2, 3, 4]);
        assert_eq!(began[0].1, Duration::ZERO);
        for (retry, pair) in (1..).zip(began.windows(2)) {
            let (gap, wait) = (pair[1].1 - pair[0].1, BACKOFF.wait(retry, seed));
            assert!(
                gap >= wait && gap <= wait + TICK,
                "retry {retry} waited {gap:?}, not {wait:?}"
            );
        }
        let last_began = began[3].1;
        assert_eq!(
            answer,
            Err(GaveUp {
                attempts: 4,
                elapsed: last_began,
                last: "attempt 4 failed".to_string(),
            })
        );
        let gave_up = answer.expect_err("gave up");
        assert_eq!(
            gave_up.to_string(),
            format!("gave up after 4 attempts in {last_began:?}: attempt 4 failed")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_attempt_can_succeed() {
        let answer: Result<u32, GaveUp<()>> = Retry::attempts(10, BACKOFF)
            .run(7, |attempt| async move {
                // A real attempt awaits something: the helper must poll it.
                tokio::task::yield_now().await;
                if attempt < 3 {
                    Attempt::Retry(())
                } else {
                    Attempt::Done(attempt)
                }
            })
            .await;
        assert_eq!(answer, Ok(3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_measured_on_tokios_clock() {
        // Each attempt burns 40 ms of real time, which paused tokio time
        // does not see. Measured on std's clock, a 30 ms deadline would end
        // the run at the first failure; on tokio's clock only the waits
        // count, and the run ends at the first failure at or past 30 ms of
        // them.
        let seed = 3;
        let deadline = Duration::from_millis(30);
        let started = Instant::now();
        let real_started = std::time::Instant::now();
        let mut began = Vec::new();
        let answer: Result<(), GaveUp<u32>> = Retry::deadline(deadline, BACKOFF)
            .run(seed, |attempt| {
                began.push(started.elapsed());
                std::thread::sleep(Duration::from_millis(40));
                ready(Attempt::Retry(attempt))
            })
            .await;
        let gave_up = answer.expect_err("never done");
        assert!(
            gave_up.attempts > 1,
            "a real-time deadline would stop at once"
        );
        assert_eq!(gave_up.attempts as usize, began.len());
        assert_eq!(gave_up.last, gave_up.attempts);
        let (last, before_last) = (began[began.len() - 1], began[began.len() - 2]);
        assert!(
            before_last < deadline,
            "the run went on past the deadline: {began:?}"
        );
        assert!(last >= deadline, "the run stopped early: {began:?}");
        assert_eq!(gave_up.elapsed, last, "only tokio's time counts");
        assert!(real_started.elapsed() >= Duration::from_millis(40) * gave_up.attempts);
    }

    #[tokio::test(start_paused = true)]
    async fn time_spent_inside_an_attempt_counts_toward_the_deadline() {
        let answer: Result<(), GaveUp<()>> = Retry::deadline(
            Duration::from_secs(1),
            Backoff::new(Duration::ZERO, Duration::ZERO),
        )
        .run(0, |_attempt| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Attempt::Retry(())
        })
        .await;
        let gave_up = answer.expect_err("never done");
        assert_eq!(gave_up.attempts, 4, "300, 600, 900, 1200 ms");
        assert_eq!(gave_up.elapsed, Duration::from_millis(1200));
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_seed_replays_the_same_waits() {
        async fn waits(seed: u64) -> Vec<Duration> {
            let started = Instant::now();
            let mut began = Vec::new();
            let _: Result<(), GaveUp<()>> = Retry::attempts(6, BACKOFF)
                .run(seed, |_attempt| {
                    began.push(started.elapsed());
                    ready(Attempt::Retry(()))
                })
                .await;
            began
        }
        assert_eq!(waits(11).await, waits(11).await);
        assert_ne!(waits(11).await, waits(12).await);
    }
}
