//! Rate-limited logging of refusals: one line per cause per second.
//!
//! Every refusal (a connection or request turned away for its identity, its
//! role, a limit or a deadline) is answered with an error that names its
//! cause, and logged. A flood of refused peers must not become a flood of log
//! lines, so each cause logs at most once per [`INTERVAL`], and the next line
//! says how many refusals were held back since the last one. The rpc server
//! logs its own refusals here; services log theirs (an impostor node, a
//! batch over its limits, a caller its credential does not allow) through
//! [`global`].

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use tokio::time::Instant;

/// The shortest time between two lines of one cause.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Refusal log lines, rate-limited per cause.
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// Per cause: when its last line was written, and how many refusals
    /// were held back since.
    causes: parking_lot::Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RefusalLog {
    /// Logs that `peer` was refused for `cause` (a short fixed name, such as
    /// a limit's name) with `message` saying what exactly, unless a line of
    /// the same cause was written less than [`INTERVAL`] ago. Returns
    /// whether a line was written.
    pub fn log(
        &self,
        cause: &'static str,
        peer: &dyn fmt::Display,
        message: &dyn fmt::Display,
    ) -> bool {
        let now = Instant::now();
        let suppressed = {
            let mut causes = self.causes.lock();
            match causes.get_mut(cause) {
                Some((last, held_back)) if now.duration_since(*last) < INTERVAL => {
                    *held_back += 1;
                    return false;
                }
                Some((last, held_back)) => {
                    *last = now;
                    std::mem::take(held_back)
                }
                None => {
                    causes.insert(cause, (now, 0));
                    0
                }
            }
        };
        tracing::warn!(%peer, cause, suppressed, "refused: {message}");
        true
    }
}

/// The process's refusal log for services.
pub fn global() -> &'static RefusalLog {
    static LOG: LazyLock<RefusalLog> = LazyLock::new(RefusalLog::default);
    &LOG
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_cause_per_interval() {
        let log = RefusalLog::default();
        assert!(log.log("a", &"peer", &"first"));
        assert!(!log.log("a", &"peer", &"held back"));
        assert!(log.log("b", &"peer", &"another cause"));
        // Move the cause's last line back past the interval instead of
        // sleeping through it.
        let earlier = Instant::now()
            .checked_sub(INTERVAL * 2)
            .expect("the clock is past two seconds");
        log.causes.lock().get_mut("a").expect("logged").0 = earlier;
        assert!(log.log("a", &"peer", &"after the interval"));
        assert_eq!(log.causes.lock()["a"].1, 0, "the count restarts");
    }
}
