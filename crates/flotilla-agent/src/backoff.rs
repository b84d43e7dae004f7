//! Restart back-off for containers that keep dying: pure, time passed in.

use std::time::{Duration, Instant};

/// Restart bookkeeping per container.
#[derive(Debug, Default, Clone)]
pub(crate) struct Backoff {
    attempts: u32,
    next: Option<Instant>,
    started: Option<Instant>,
}

impl Backoff {
    /// Delay before restart attempt `n` (0-based): 0.5 s doubling to 30 s.
    pub(crate) fn delay(attempts: u32) -> Duration {
        Duration::from_millis(500)
            .saturating_mul(1u32 << attempts.min(6))
            .min(Duration::from_secs(30))
    }

    /// Whether a restart may happen at `now`; records it if so. A container that ran
    /// for 30 s since its last start has its count reset.
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        if let Some(s) = self.started {
            if now.duration_since(s) > Duration::from_secs(30) {
                self.attempts = 0;
            }
        }
        if self.next.is_some_and(|n| now < n) {
            return false;
        }
        self.next = Some(now + Self::delay(self.attempts));
        self.attempts += 1;
        self.started = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets_after_a_good_run() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(b.allow(t0));
        assert!(!b.allow(t0 + Duration::from_millis(499)));
        assert!(b.allow(t0 + Duration::from_millis(500)));
        // Second delay is 1 s from the second start.
        assert!(!b.allow(t0 + Duration::from_millis(1400)));
        assert!(b.allow(t0 + Duration::from_millis(1500)));
        assert_eq!(Backoff::delay(10), Duration::from_secs(30));
        // Ran for more than 30 s: back to the first delay.
        let later = t0 + Duration::from_secs(40);
        assert!(b.allow(later));
        assert!(!b.allow(later + Duration::from_millis(499)));
        assert!(b.allow(later + Duration::from_millis(500)));
    }
}
