//! Health hysteresis: `rise` consecutive successes to pass, `fall` consecutive failures
//! to fail. Pure: probe outcomes in, transitions out, so single lost probes never flap a
//! node in or out of rotation.

use std::time::{Duration, Instant};

use flotilla_core::HealthStatus;

/// Per-check hysteresis state.
#[derive(Debug, Clone)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    status: HealthStatus,
    streak: u32,
    critical_since: Option<Instant>,
}

impl Hysteresis {
    /// Starts in `initial` (critical for a new instance; the stored verdict after a
    /// leader change, so a new leader does not flap healthy instances).
    pub fn new(rise: u32, fall: u32, initial: HealthStatus, now: Instant) -> Self {
        Hysteresis {
            rise: rise.max(1),
            fall: fall.max(1),
            status: initial,
            streak: 0,
            critical_since: (initial == HealthStatus::Critical).then_some(now),
        }
    }

    /// Current status.
    pub fn status(&self) -> HealthStatus {
        self.status
    }

    /// Feeds one probe outcome at `now`; returns the new status on a transition.
    pub fn observe(&mut self, ok: bool, now: Instant) -> Option<HealthStatus> {
        let (wanted, needed) = match (self.status, ok) {
            (HealthStatus::Passing, true) | (HealthStatus::Critical, false) => {
                self.streak = 0;
                return None;
            }
            (HealthStatus::Critical, true) => (HealthStatus::Passing, self.rise),
            (HealthStatus::Passing, false) => (HealthStatus::Critical, self.fall),
        };
        self.streak += 1;
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.status = wanted;
        self.critical_since = (wanted == HealthStatus::Critical).then_some(now);
        Some(wanted)
    }

    /// Whether the check has been critical for at least `after`.
    pub fn critical_for(&self, after: Duration, now: Instant) -> bool {
        self.critical_since
            .is_some_and(|since| now.saturating_duration_since(since) >= after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_rise_1_fall_2() {
        let t = Instant::now();
        let mut h = Hysteresis::new(1, 2, HealthStatus::Critical, t);
        assert_eq!(h.observe(true, t), Some(HealthStatus::Passing));
        assert_eq!(h.observe(false, t), None, "one failure is not enough");
        assert_eq!(h.observe(true, t), None);
        assert_eq!(h.observe(false, t), None);
        assert_eq!(h.observe(false, t), Some(HealthStatus::Critical));
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let t = Instant::now();
        let mut h = Hysteresis::new(3, 3, HealthStatus::Passing, t);
        for _ in 0..10 {
            assert_eq!(h.observe(false, t), None);
            assert_eq!(h.observe(false, t), None);
            assert_eq!(h.observe(true, t), None);
        }
        assert_eq!(h.status(), HealthStatus::Passing);
    }

    #[test]
    fn deregister_after_counts_from_the_transition() {
        let t0 = Instant::now();
        let mut h = Hysteresis::new(1, 1, HealthStatus::Passing, t0);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(h.observe(false, t1), Some(HealthStatus::Critical));
        assert!(!h.critical_for(Duration::from_secs(10), t1 + Duration::from_secs(9)));
        assert!(h.critical_for(Duration::from_secs(10), t1 + Duration::from_secs(10)));
        h.observe(true, t1 + Duration::from_secs(11));
        assert!(!h.critical_for(Duration::from_secs(10), t1 + Duration::from_secs(60)));
    }

    proptest! {
        /// A transition happens exactly when the last `rise` (or `fall`) outcomes all
        /// disagree with the status held before them.
        #[test]
        fn transitions_need_full_streaks(rise in 1u32..5, fall in 1u32..5, probes in proptest::collection::vec(any::<bool>(), 0..200)) {
            let t = Instant::now();
            let mut h = Hysteresis::new(rise, fall, HealthStatus::Critical, t);
            let mut streak_ok = 0u32;
            let mut streak_fail = 0u32;
            for ok in probes {
                let before = h.status();
                if ok { streak_ok += 1; streak_fail = 0 } else { streak_fail += 1; streak_ok = 0 }
                let changed = h.observe(ok, t);
                match (before, changed) {
                    (HealthStatus::Critical, Some(HealthStatus::Passing)) => { prop_assert!(streak_ok >= rise); streak_ok = 0; }
                    (HealthStatus::Passing, Some(HealthStatus::Critical)) => { prop_assert!(streak_fail >= fall); streak_fail = 0; }
                    (_, None) => {
                        if before == HealthStatus::Critical { prop_assert!(streak_ok < rise) } else { prop_assert!(streak_fail < fall) }
                    }
                    other => prop_assert!(false, "impossible transition {:?}", other),
                }
            }
        }
    }
}
