//! Load sampling: each registered container's CPU use as a share of its quota and its
//! memory use as a share of its limit, reported to the registry every period for the
//! load balancers' feedback controllers. The arithmetic is pure and takes the sample
//! times as input.

use std::collections::HashMap;
use std::time::Instant;

/// A raw sample from the engine.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Cumulative CPU time of the container, ns.
    pub cpu_total_ns: u64,
    /// Memory in use, bytes.
    pub memory_usage: u64,
    /// Memory limit (the host's memory when unlimited), bytes.
    pub memory_limit: u64,
    /// CPUs the container may use: its quota, else the host's online CPUs.
    pub cpu_limit: f64,
    /// When it was taken.
    pub at: Instant,
}

/// A computed load report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// CPU share of the quota (1.0 = using all of it).
    pub cpu: f64,
    /// Memory share of the limit.
    pub memory: f64,
}

/// How far a load may move (as a share of quota or limit) before it is reported again.
/// The feedback controller smooths loads over several periods; a move of less than
/// five points does not change a weight it would act on, and not resending it keeps an
/// idle or steady cluster's store writes at its lease renewals.
pub const LOAD_DEAD_BAND: f64 = 0.05;

impl Load {
    /// Whether `now` is close enough to this (last reported) load not to be resent.
    pub fn within_dead_band(&self, now: &Load) -> bool {
        (self.cpu - now.cpu).abs() < LOAD_DEAD_BAND
            && (self.memory - now.memory).abs() < LOAD_DEAD_BAND
    }
}

/// Turns successive samples into loads, per container.
#[derive(Debug, Default)]
pub struct LoadTracker {
    previous: HashMap<String, Sample>,
}

impl LoadTracker {
    /// Folds in a sample; the CPU share needs two samples, so the first gives `None`.
    pub fn observe(&mut self, container: &str, s: Sample) -> Option<Load> {
        let prev = self.previous.insert(container.to_owned(), s)?;
        let wall = s.at.saturating_duration_since(prev.at).as_nanos() as f64;
        if wall <= 0.0 || s.cpu_total_ns < prev.cpu_total_ns || s.cpu_limit <= 0.0 {
            return None;
        }
        let cores = (s.cpu_total_ns - prev.cpu_total_ns) as f64 / wall;
        let memory = if s.memory_limit > 0 {
            s.memory_usage as f64 / s.memory_limit as f64
        } else {
            0.0
        };
        Some(Load {
            cpu: cores / s.cpu_limit,
            memory,
        })
    }

    /// Forgets containers no longer registered.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.previous.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_a_move_past_the_dead_band_is_resent() {
        let last = Load {
            cpu: 0.40,
            memory: 0.20,
        };
        let near = Load {
            cpu: 0.44,
            memory: 0.16,
        };
        assert!(last.within_dead_band(&near));
        assert!(!last.within_dead_band(&Load { cpu: 0.46, ..near }));
        assert!(!last.within_dead_band(&Load {
            memory: 0.26,
            ..near
        }));
    }

    #[test]
    fn cpu_share_is_relative_to_the_quota() {
        let t0 = Instant::now();
        let mut t = LoadTracker::default();
        let s = |ns: u64, at: Instant| Sample {
            cpu_total_ns: ns,
            memory_usage: 50,
            memory_limit: 200,
            cpu_limit: 0.5,
            at,
        };
        assert_eq!(t.observe("c", s(0, t0)), None, "first sample has no rate");
        // 0.25 s of CPU in 1 s, quota 0.5 CPU → 50 % of the quota.
        let l = t
            .observe("c", s(250_000_000, t0 + Duration::from_secs(1)))
            .unwrap();
        assert!(
            (l.cpu - 0.5).abs() < 1e-9 && (l.memory - 0.25).abs() < 1e-9,
            "{l:?}"
        );
        // A counter reset (container restarted) gives no nonsense.
        assert_eq!(t.observe("c", s(10, t0 + Duration::from_secs(2))), None);
    }
}
