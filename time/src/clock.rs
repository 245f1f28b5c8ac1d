//! The [`Clock`] trait and its three clocks: one for production, one for
//! tests that move time by hand, one for the simulation.
//!
//! A component that stores or compares times takes an `Arc<dyn Clock>` and
//! never reads the system's clock itself, so that tests and the
//! deterministic simulation decide what time it is. Which clock a process
//! runs on is chosen once, at its composition root.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// A source of the current time, as a count since the clock's epoch.
///
/// Only [`WallClock`]'s epoch is the Unix epoch, and only its readings can
/// be compared between machines (up to their skew, which every user of a
/// shared time must bound and say so). The other clocks count from where a
/// test put them ([`ManualClock`]) or from their creation ([`TokioClock`]).
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Nanoseconds since the clock's epoch.
    fn now_ns(&self) -> i64;

    /// Milliseconds since the clock's epoch; 0 for a reading before it (a
    /// machine whose clock says 1969 is broken, and reading 0 makes every
    /// time it compares against look far away rather than wrap around).
    fn now_ms(&self) -> u64 {
        (self.now_ns() / 1_000_000).max(0) as u64
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now_ns(&self) -> i64 {
        (**self).now_ns()
    }
}

/// The machine's real-time clock, counted from the Unix epoch: what the
/// daemons run on, and the only clock whose readings other machines can
/// compare with their own.
#[derive(Clone, Copy, Debug, Default)]
pub struct WallClock;

impl Clock for WallClock {
    fn now_ns(&self) -> i64 {
        // Before 1970 the machine's clock is broken; 0 is as good an answer
        // as any, and never a panic.
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(since_epoch.as_nanos()).unwrap_or(i64::MAX)
    }
}

/// A clock that moves only when told to: for tests of anything that waits
/// on wall time (a GC delay of five minutes is tested without waiting).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock reading `now_ns` until it is advanced.
    pub fn new(now_ns: i64) -> ManualClock {
        ManualClock(AtomicI64::new(now_ns))
    }

    pub fn advance_ms(&self, ms: i64) {
        self.0
            .fetch_add(ms.saturating_mul(1_000_000), Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Time on tokio's clock since this clock was made: simulated time under
/// turmoil and paused time in tokio tests, so a simulated run never reads
/// the wall clock and a seed replays it. Components that must agree on the
/// time (managers contending for one lease) share one `TokioClock`; copies
/// share its start.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    start: Instant,
}

impl TokioClock {
    /// A clock reading 0 now. Inside a runtime with simulated or paused time
    /// it follows that runtime's clock.
    pub fn new() -> TokioClock {
        TokioClock {
            start: Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now_ns(&self) -> i64 {
        // 292 years of uptime overflow an i64 of nanoseconds; saturate.
        i64::try_from(self.start.elapsed().as_nanos()).unwrap_or(i64::MAX)
    }
}

/// A clock that runs off another by a fixed offset and a rate error:
/// `base + offset + drift * base`, for the simulation to give every host a
/// clock of its own, as machines have. The skew the simulation draws, and
/// the bound it stays within, are stated where it draws them (craq's
/// `tests/sim_support`); this only does the arithmetic.
#[derive(Clone, Debug)]
pub struct SkewedClock<C> {
    base: C,
    offset_ns: i64,
    drift_ppm: i64,
}

impl<C: Clock> SkewedClock<C> {
    /// `base`, ahead of it by `offset_ns` (behind if negative), and running
    /// `drift_ppm` parts per million fast (slow if negative).
    pub fn new(base: C, offset_ns: i64, drift_ppm: i64) -> SkewedClock<C> {
        SkewedClock {
            base,
            offset_ns,
            drift_ppm,
        }
    }
}

impl<C: Clock> Clock for SkewedClock<C> {
    fn now_ns(&self) -> i64 {
        let base = self.base.now_ns();
        // i128: a day of nanoseconds times a million overflows an i64.
        let drift = i128::from(base) * i128::from(self.drift_ppm) / 1_000_000;
        let skewed = i128::from(base) + drift + i128::from(self.offset_ns);
        i64::try_from(skewed).unwrap_or(if skewed < 0 { i64::MIN } else { i64::MAX })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(5_000_000);
        assert_eq!(clock.now_ns(), 5_000_000);
        assert_eq!(clock.now_ms(), 5);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(clock.now_ns(), 5_000_000, "real time does not move it");
        clock.advance_ms(1001);
        assert_eq!(clock.now_ms(), 1006);
    }

    #[test]
    fn a_reading_before_the_epoch_is_zero_milliseconds() {
        let clock = ManualClock::new(-3_000_000);
        assert_eq!(clock.now_ms(), 0);
    }

    #[test]
    fn wall_clock_counts_from_the_unix_epoch() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("this machine's clock is after 1970")
            .as_millis() as u64;
        let read = WallClock.now_ms();
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("this machine's clock is after 1970")
            .as_millis() as u64;
        assert!(
            before <= read && read <= after,
            "{before} <= {read} <= {after}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_tokio_time_not_real_time() {
        let clock = TokioClock::new();
        assert_eq!(clock.now_ns(), 0);
        // Real time passes; paused tokio time does not.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(clock.now_ms(), 0);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now_ms(), 1500);
        // Copies share the start.
        let copy = clock;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(copy.now_ms(), 4500);
        assert_eq!(clock.now_ns(), copy.now_ns());
    }

    #[test]
    fn a_skewed_clock_is_offset_and_drifts() {
        let base = std::sync::Arc::new(ManualClock::new(0));
        let fast = SkewedClock::new(base.clone(), 250_000_000, 20_000);
        let slow = SkewedClock::new(base.clone(), -250_000_000, -20_000);
        assert_eq!(fast.now_ms(), 250);
        assert_eq!(slow.now_ns(), -250_000_000);
        base.advance_ms(1000);
        // 1 s of base time: 1.02 s on the fast clock, 0.98 s on the slow.
        assert_eq!(fast.now_ms(), 1270);
        assert_eq!(slow.now_ms(), 730);
        let still = SkewedClock::new(base.clone(), 0, 0);
        assert_eq!(still.now_ns(), base.now_ns());
    }
}
