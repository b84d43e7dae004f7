//! Node leases: a node stays alive while its agent renews more often than its TTL.
//!
//! The leader measures silence on its own monotonic clock from the moment it *saw*
//! each renewal, so clock skew between servers and hosts cannot expire a live node.
//! Pure: renewals and `now` in, expired nodes out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Lease {
    ttl: Duration,
    renewals: u64,
    seen: Instant,
}

/// Lease bookkeeping for every known node.
#[derive(Debug, Default)]
pub struct LeaseTable {
    leases: HashMap<String, Lease>,
}

impl LeaseTable {
    /// Records the node's current renewal counter at `now`. A new node, or a counter
    /// that moved, restarts its TTL; an unchanged counter does not.
    pub fn observe(&mut self, node: &str, ttl: Duration, renewals: u64, now: Instant) {
        match self.leases.get_mut(node) {
            Some(l) if l.renewals == renewals => l.ttl = ttl,
            Some(l) => {
                *l = Lease {
                    ttl,
                    renewals,
                    seen: now,
                }
            }
            None => {
                self.leases.insert(
                    node.to_owned(),
                    Lease {
                        ttl,
                        renewals,
                        seen: now,
                    },
                );
            }
        }
    }

    /// Forgets nodes not in `present` (they left or were removed).
    pub fn retain(&mut self, present: &dyn Fn(&str) -> bool) {
        self.leases.retain(|name, _| present(name));
    }

    /// Forgets one node.
    pub fn remove(&mut self, node: &str) {
        self.leases.remove(node);
    }

    /// Nodes silent for longer than their TTL at `now`, sorted.
    pub fn expired(&self, now: Instant) -> Vec<String> {
        let mut out: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| now.saturating_duration_since(l.seen) > l.ttl)
            .map(|(n, _)| n.clone())
            .collect();
        out.sort();
        out
    }

    /// Number of tracked leases.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether no lease is tracked.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TTL: Duration = Duration::from_secs(3);

    #[test]
    fn renewal_extends_silence_expires() {
        let t0 = Instant::now();
        let mut l = LeaseTable::default();
        l.observe("a", TTL, 1, t0);
        l.observe("b", TTL, 1, t0);
        assert!(l.expired(t0 + TTL).is_empty(), "exactly TTL is still alive");
        l.observe("a", TTL, 2, t0 + Duration::from_secs(2));
        // Re-observing an unchanged counter must not extend the lease.
        l.observe("b", TTL, 1, t0 + Duration::from_secs(2));
        assert_eq!(l.expired(t0 + Duration::from_millis(3001)), ["b"]);
        assert_eq!(l.expired(t0 + Duration::from_secs(5)), ["b"]);
        assert_eq!(l.expired(t0 + Duration::from_millis(5001)), ["a", "b"]);
    }

    #[test]
    fn retain_forgets_departed_nodes() {
        let t0 = Instant::now();
        let mut l = LeaseTable::default();
        l.observe("a", TTL, 1, t0);
        l.observe("b", TTL, 1, t0);
        l.retain(&|n| n == "a");
        assert_eq!(l.len(), 1);
        assert_eq!(l.expired(t0 + Duration::from_secs(10)), ["a"]);
    }

    proptest! {
        /// A node renewed at least once per TTL never expires; one silent for longer does.
        #[test]
        fn expiry_iff_silence_exceeds_ttl(gaps in proptest::collection::vec(1u64..5000, 1..50)) {
            let t0 = Instant::now();
            let mut l = LeaseTable::default();
            let mut now = t0;
            l.observe("n", TTL, 0, now);
            for (i, gap) in gaps.iter().enumerate() {
                let before = now + Duration::from_millis(*gap);
                let expired = !l.expired(before).is_empty();
                prop_assert_eq!(expired, *gap > TTL.as_millis() as u64);
                if expired { break; }
                now = before;
                l.observe("n", TTL, i as u64 + 1, now);
            }
        }
    }
}
