//! Schedulers: which backend gets the next request.
//!
//! Every scheduler sees the same backend slice and skips backends that are ejected or
//! already tried for this request. Per-backend state (in-flight counts, latency EWMA,
//! smooth-WRR credit) lives in the `Backend`, so it survives backend-set updates.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::backend::Backend;
use crate::config::SchedulerKind;

/// What a scheduler may look at besides the backends.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// Now (slow start, ejections).
    pub now: Instant,
    /// Hash of the request's key (source IP or header) for `hash`.
    pub key: u64,
    /// Indexes already tried for this request (retries go elsewhere).
    pub skip: &'a [usize],
}

impl PickContext<'_> {
    fn eligible(&self, backends: &[Arc<Backend>], i: usize) -> bool {
        !self.skip.contains(&i) && backends[i].available(self.now)
    }
}

/// Picks a backend index, or `None` if no backend is eligible.
pub trait Scheduler: Send + Sync {
    /// The choice for one request.
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickContext) -> Option<usize>;
    /// Config name.
    fn name(&self) -> &'static str;
}

/// Builds the scheduler named in the config.
pub fn build(kind: SchedulerKind) -> Box<dyn Scheduler> {
    match kind {
        SchedulerKind::RoundRobin => Box::new(RoundRobin::default()),
        SchedulerKind::Weighted => Box::new(SmoothWeighted::default()),
        SchedulerKind::LeastConn => Box::new(LeastConn {
            weighted: false,
            next: AtomicUsize::new(0),
        }),
        SchedulerKind::WeightedLeastConn => Box::new(LeastConn {
            weighted: true,
            next: AtomicUsize::new(0),
        }),
        SchedulerKind::P2c => Box::new(P2c { ewma: false }),
        SchedulerKind::P2cEwma => Box::new(P2c { ewma: true }),
        SchedulerKind::Hash => Box::new(RendezvousHash),
        SchedulerKind::Feedback => Box::new(Feedback::default()),
    }
}

/// `feedback` passes over a backend whose recent latency is this many times the
/// fastest's …
const SLOW_FACTOR: f64 = 3.0;
/// … and at least this much more (ns), so fast backends' noise never trips it.
const SLOW_MARGIN_NS: f64 = 5e6;
/// How fast a slow response stops counting when no new one arrives.
const SLOW_FADE: Duration = Duration::from_millis(250);

/// `feedback`: smooth weighted round robin on the feedback controller's weights, that
/// passes over a backend already holding its weighted share of the requests in flight,
/// counting the one being placed.
///
/// Why this shape (BENCHMARKS.md, issue 4): the weights carry what the controller
/// learned per period; rotation spreads each backend's requests evenly in time, which
/// is what a CPU-quota'd container needs (a burst of requests inside one CFS period
/// gets throttled for the rest of it, the queue the P2C family built at low even
/// load); the in-flight guard reacts within one request to a backend that stalls
/// between two control periods. A passed-over backend keeps the credit it earned, up
/// to one round's worth, so it catches up on its share without a burst. Near saturation
/// the guard is what decides: in-flight counts stay in proportion to the weights, which
/// equalises each backend's expected wait when the weights follow capacity — weighted
/// least-request, where plain least-connections equalises the counts and queues the
/// smallest backend's requests longest (issue 17, docs/feedback.md).
#[derive(Default)]
pub struct Feedback {
    lock: Mutex<()>,
}

impl Feedback {
    /// Weight in force: the controller's (static until it has set one) × slow start,
    /// scaled so integer credit keeps resolution.
    fn weight(b: &Backend, now: Instant) -> i64 {
        let w = match b.dynamic_weight() {
            Some(d) => d * b.ramp(now),
            None => b.effective_weight(now),
        };
        ((w * 100.0) as i64).max(1)
    }
}

/// What `Feedback::pick` learned about one eligible backend.
struct Seen {
    index: usize,
    weight: i64,
    credit: i64,
    over_share: bool,
    slow: bool,
}

impl Scheduler for Feedback {
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickContext) -> Option<usize> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // (index, weight, in flight, recent latency) of every eligible backend.
        let eligible: Vec<(usize, i64, u64, f64)> = (0..backends.len())
            .filter(|&i| ctx.eligible(backends, i))
            .map(|i| {
                let b = &backends[i];
                // Answers make the estimate; a backend stuck on a long request
                // answers nothing, so how long it has been stuck counts as well.
                let recent = b
                    .recent_latency_ns(ctx.now, SLOW_FADE)
                    .max(b.stalled_ns(ctx.now));
                (i, Self::weight(b, ctx.now), b.in_flight(), recent)
            })
            .collect();
        let total_weight: i64 = eligible.iter().map(|e| e.1).sum();
        let total_in_flight: u64 = eligible.iter().map(|e| e.2).sum();
        let fastest = eligible.iter().map(|e| e.3).fold(f64::INFINITY, f64::min);
        let seen: Vec<Seen> = eligible
            .iter()
            .map(|&(index, weight, in_flight, recent)| {
                // Every eligible backend earns its weight; credit is capped at one round
                // so a backend passed over for long does not come back with a burst.
                let earn = |c: i64| (c + weight).min(total_weight);
                let credit = backends[index]
                    .swrr_credit
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(earn(c)))
                    .map(earn)
                    .unwrap_or(0);
                Seen {
                    index,
                    weight,
                    credit,
                    // Already holding its share of everything in flight once this
                    // request is counted: in_flight ≥ weight / total_weight ×
                    // (total_in_flight + 1). Counting the new request is what lets a
                    // large backend take a second request while a small one is idle
                    // (weighted least-request: (n + 1) / w); without it, at the one or
                    // two requests in flight of a cluster below saturation, whichever
                    // backend held the one request was "over its share", and the
                    // largest backend's picks went to the smallest, which then ran out
                    // of its CPU quota (issue 17: b0 sent 15 % against a 12.5 % weight).
                    // Some backend is always under its share: the shares of
                    // total_in_flight + 1 sum to more than total_in_flight.
                    over_share: in_flight as i128 * total_weight as i128
                        >= (total_in_flight as i128 + 1) * weight as i128,
                    // Recently much slower than the fastest (a CFS throttle, a neighbour
                    // burning the CPU): the reaction within requests that per-period
                    // weights cannot have; it fades when no slow answer follows.
                    slow: recent > fastest * SLOW_FACTOR && recent > fastest + SLOW_MARGIN_NS,
                }
            })
            .collect();
        // Candidates: neither over their share nor slow; else not over their share
        // (never empty, see above); else anyone eligible.
        let candidate = |s: &Seen, tier: u8| match tier {
            0 => !s.over_share && !s.slow,
            1 => !s.over_share,
            _ => true,
        };
        let tier = (0..3).find(|&t| seen.iter().any(|s| candidate(s, t)))?;
        let candidates = || seen.iter().filter(move |s| candidate(s, tier));
        // What the candidates earned this pick is charged to the one chosen: credit
        // among candidates sums to zero as in plain smooth WRR, so none drifts away.
        let earned: i64 = candidates().map(|s| s.weight).sum();
        let chosen = candidates().max_by_key(|s| (s.credit, std::cmp::Reverse(s.index)))?;
        backends[chosen.index]
            .swrr_credit
            .fetch_sub(earned.max(1), Ordering::Relaxed);
        Some(chosen.index)
    }
    fn name(&self) -> &'static str {
        "feedback"
    }
}

/// Smooth weighted round robin (Nginx's): each pick adds every eligible backend's
/// weight to its credit, takes the highest, and charges it the total. Spreads a 5:1:1
/// split as a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
#[derive(Default)]
pub struct SmoothWeighted {
    lock: Mutex<()>,
}

impl SmoothWeighted {
    fn pick_with(
        &self,
        backends: &[Arc<Backend>],
        ctx: &PickContext,
        weight: impl Fn(&Backend) -> i64,
    ) -> Option<usize> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (i, b) in backends.iter().enumerate() {
            if !ctx.eligible(backends, i) {
                continue;
            }
            let w = weight(b).max(1);
            total += w;
            let credit = b.swrr_credit.fetch_add(w, Ordering::Relaxed) + w;
            if best.is_none_or(|(_, c)| credit > c) {
                best = Some((i, credit));
            }
        }
        let (i, _) = best?;
        backends[i].swrr_credit.fetch_sub(total, Ordering::Relaxed);
        Some(i)
    }
}

impl Scheduler for SmoothWeighted {
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickContext) -> Option<usize> {
        // Weights are scaled by 100 so a slow-start ramp keeps its resolution.
        self.pick_with(backends, ctx, |b| {
            (b.effective_weight(ctx.now) * 100.0) as i64
        })
    }
    fn name(&self) -> &'static str {
        "weighted"
    }
}

/// Plain rotation, ignoring weights; while a backend ramps up (slow start) it rotates
/// by the ramp instead, so a new backend is not hit with a full share at once.
#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
    ramping: SmoothWeighted,
}

impl Scheduler for RoundRobin {
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickContext) -> Option<usize> {
        if backends.iter().any(|b| b.ramping(ctx.now)) {
            return self
                .ramping
                .pick_with(backends, ctx, |b| (b.ramp(ctx.now) * 10_000.0) as i64);
        }
        let n = backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| ctx.eligible(backends, i))
    }
    fn name(&self) -> &'static str {
        "round-robin"
    }
}

/// Fewest in-flight requests (per unit of weight when `weighted`). The scan starts at a
/// rotating offset so ties do not all land on the first backend.
pub struct LeastConn {
    weighted: bool,
    next: AtomicUsize,
}

impl Scheduler for LeastConn {
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickContext) -> Option<usize> {
        let n = backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, f64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if !ctx.eligible(backends, i) {
                continue;
            }
            let b = &backends[i];
            let load = if self.weighted {
                (b.in_flight() + 1) as f64 / b.effective_weight(ctx.now)
            } else {
                // Unweighted, but a ramping backend counts as proportionally busier.
                (b.in_flight() + 1) as f64 / b.ramp(ctx.now)
            };
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
    }
    fn name(&self) -> &'static str {
        if self.weighted {
            "weighted-least-conn"
        } else {
            "least-conn"
        }
    }
}

/// Power of two choices: two random eligible backends, the less loaded wins. Load is
/// in-flight / weight, or with `ewma` peak-EWMA latency × (in-flight + 1) / weight.
/// Randomness avoids the herding that a global minimum causes when many balancers (or
/// stale counts) all pick the same "best" backend.
pub struct P2c {
    ewma: bool,
}

impl P2c {
    fn cost(&self, b: &Backend, now: Instant) -> f64 {
        let w = b.effective_weight(now);
        if self.ewma {
            b.ewma_ns() * (b.in_flight() + 1) as f64 / w
        } else {
            (b.in_flight() + 1) as f64 / w
        }
    }
}

impl Scheduler for P2c {
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickContext) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let mut rng = rand::thread_rng();
        let mut sample = || -> Option<usize> {
            // A few random draws, then a scan: cheap when most backends are eligible,
            // still correct when few are.
            for _ in 0..4 {
                let i = rng.gen_range(0..n);
                if ctx.eligible(backends, i) {
                    return Some(i);
                }
            }
            let start = rng.gen_range(0..n);
            (0..n)
                .map(|k| (start + k) % n)
                .find(|&i| ctx.eligible(backends, i))
        };
        let a = sample()?;
        let mut b = sample()?;
        if a == b {
            // Second draw collided: take any other eligible backend, if there is one.
            let start = rand::thread_rng().gen_range(0..n);
            if let Some(other) = (0..n)
                .map(|k| (start + k) % n)
                .find(|&i| i != a && ctx.eligible(backends, i))
            {
                b = other;
            }
        }
        let (ca, cb) = (
            self.cost(&backends[a], ctx.now),
            self.cost(&backends[b], ctx.now),
        );
        Some(if cb < ca { b } else { a })
    }
    fn name(&self) -> &'static str {
        if self.ewma {
            "p2c-ewma"
        } else {
            "p2c"
        }
    }
}

/// Weighted rendezvous (highest-random-weight) hashing: each backend scores
/// `weight / -ln(u)` with `u` a hash of (key, backend) in (0, 1); the top score wins.
/// Removing a backend moves only the keys it owned; adding one takes only its share.
pub struct RendezvousHash;

/// Hash of a key for [`PickContext::key`]: [`flotilla_core::hash::stable_hash`], so two
/// lbs, whatever Rust built them, send a key to the same backend.
pub fn hash_key(bytes: &[u8]) -> u64 {
    flotilla_core::hash::stable_hash(bytes)
}

/// The score input of (key, backend): the stable hash of the key's bytes, the backend's
/// address bytes and port, mapped to (0, 1), never 0 or 1.
fn mix(key: u64, addr: &std::net::SocketAddr) -> f64 {
    let mut bytes = Vec::with_capacity(8 + 16 + 2);
    bytes.extend_from_slice(&key.to_le_bytes());
    match addr.ip() {
        std::net::IpAddr::V4(ip) => bytes.extend_from_slice(&ip.octets()),
        std::net::IpAddr::V6(ip) => bytes.extend_from_slice(&ip.octets()),
    }
    bytes.extend_from_slice(&addr.port().to_be_bytes());
    let x = flotilla_core::hash::stable_hash(&bytes);
    ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

impl Scheduler for RendezvousHash {
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickContext) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, b) in backends.iter().enumerate() {
            if !ctx.eligible(backends, i) {
                continue;
            }
            // Hashing uses the static weight: slow start must not move keys around.
            let score = b.base_weight() as f64 / -mix(ctx.key, &b.addr).ln();
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }
    fn name(&self) -> &'static str {
        "hash"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_keys_use_the_named_pinned_hash() {
        // Not std's DefaultHasher: its output may change with the compiler.
        assert_eq!(hash_key(b"web/0/node-a"), 0xe699_e368_80a4_1d94);
        let a: std::net::SocketAddr = "198.18.0.1:80".parse().unwrap();
        let x = mix(hash_key(b"user-42"), &a);
        assert!(x > 0.0 && x < 1.0);
        assert_eq!(x, mix(hash_key(b"user-42"), &a));
    }
    use crate::config::OutlierConfig;
    use proptest::prelude::*;
    use std::time::Duration;

    fn backends(weights: &[u32], now: Instant) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Backend::new(
                    format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    *w,
                    Duration::ZERO,
                    now,
                )
            })
            .collect()
    }

    fn counts(s: &dyn Scheduler, bs: &[Arc<Backend>], n: usize, now: Instant) -> Vec<usize> {
        let mut c = vec![0; bs.len()];
        for k in 0..n {
            let ctx = PickContext {
                now,
                key: hash_key(&k.to_le_bytes()),
                skip: &[],
            };
            c[s.pick(bs, &ctx).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn smooth_weighted_interleaves() {
        let now = Instant::now();
        let bs = backends(&[5, 1, 1], now);
        let s = SmoothWeighted::default();
        let seq: Vec<usize> = (0..7)
            .map(|_| {
                s.pick(
                    &bs,
                    &PickContext {
                        now,
                        key: 0,
                        skip: &[],
                    },
                )
                .unwrap()
            })
            .collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn round_robin_rotates_and_skips() {
        let now = Instant::now();
        let bs = backends(&[1, 1, 1], now);
        let s = RoundRobin::default();
        assert_eq!(counts(&s, &bs, 300, now), [100, 100, 100]);
        let ctx = PickContext {
            now,
            key: 0,
            skip: &[0, 1],
        };
        for _ in 0..5 {
            assert_eq!(s.pick(&bs, &ctx), Some(2));
        }
        let none = PickContext {
            now,
            key: 0,
            skip: &[0, 1, 2],
        };
        assert_eq!(s.pick(&bs, &none), None);
    }

    #[test]
    fn least_conn_prefers_idle_and_spreads_ties() {
        let now = Instant::now();
        let bs = backends(&[1, 1, 1], now);
        let _busy = [bs[0].start(), bs[0].start(), bs[1].start()];
        let s = LeastConn {
            weighted: false,
            next: AtomicUsize::new(0),
        };
        assert_eq!(
            s.pick(
                &bs,
                &PickContext {
                    now,
                    key: 0,
                    skip: &[]
                }
            ),
            Some(2)
        );
        let idle = backends(&[1, 1, 1], now);
        assert_eq!(counts(&s, &idle, 300, now), [100, 100, 100], "ties rotate");
    }

    #[test]
    fn weighted_least_conn_divides_by_weight() {
        let now = Instant::now();
        let bs = backends(&[300, 100], now);
        let _g = [bs[0].start(), bs[0].start()]; // 3/300 vs 1/100 → tie-ish; add one more
        let _h = bs[1].start(); // (2+1)/300=0.01 vs (1+1)/100=0.02
        let s = LeastConn {
            weighted: true,
            next: AtomicUsize::new(0),
        };
        assert_eq!(
            s.pick(
                &bs,
                &PickContext {
                    now,
                    key: 0,
                    skip: &[]
                }
            ),
            Some(0)
        );
    }

    #[test]
    fn p2c_ewma_avoids_a_slow_backend() {
        let now = Instant::now();
        let bs = backends(&[1, 1, 1, 1], now);
        bs[3].observe_latency(Duration::from_millis(50), now);
        for b in &bs[..3] {
            b.observe_latency(Duration::from_millis(1), now);
        }
        let c = counts(&P2c { ewma: true }, &bs, 4000, now);
        assert!(c[3] < 100, "slow backend still got {c:?}");
    }

    /// Three backends of equal static weight to which the controller gave 10 / 20 / 40.
    fn one_two_four(now: Instant) -> Vec<Arc<Backend>> {
        let bs = backends(&[1, 1, 1], now);
        for (b, w) in bs.iter().zip([10.0, 20.0, 40.0]) {
            b.set_dynamic_weight(w);
        }
        bs
    }

    #[test]
    fn feedback_rotates_by_the_controller_weights() {
        let now = Instant::now();
        // Static weights are equal; the controller says 1:2:4.
        let bs = one_two_four(now);
        let s = Feedback::default();
        assert_eq!(counts(&s, &bs, 700, now), [100, 200, 400]);
        // Spread in time, not in runs: no backend gets more than its share in a row.
        let ctx = PickContext {
            now,
            key: 0,
            skip: &[],
        };
        let seq: Vec<usize> = (0..7).map(|_| s.pick(&bs, &ctx).unwrap()).collect();
        let longest_run = seq.chunk_by(|a, b| a == b).map(|r| r.len()).max().unwrap();
        assert!(longest_run <= 2, "{seq:?}");
    }

    #[test]
    fn feedback_passes_over_a_backend_holding_more_than_its_share() {
        let now = Instant::now();
        let bs = backends(&[1, 1, 1], now);
        let s = Feedback::default();
        let ctx = PickContext {
            now,
            key: 0,
            skip: &[],
        };
        // Backend 0 stalls with three requests in flight: it gets nothing more while
        // the others serve, whatever its credit.
        let stuck = [bs[0].start(), bs[0].start(), bs[0].start()];
        let mut c = [0usize; 3];
        for _ in 0..60 {
            c[s.pick(&bs, &ctx).unwrap()] += 1;
        }
        assert_eq!(c[0], 0, "{c:?}");
        assert_eq!(c[1], 30);
        // It recovers: its credit is capped at one round, so it catches up with at most
        // a couple of requests in a row, not the 20 it was passed over for.
        drop(stuck);
        let seq: Vec<usize> = (0..9).map(|_| s.pick(&bs, &ctx).unwrap()).collect();
        let zeros_first = seq.iter().take_while(|&&i| i == 0).count();
        assert!(zeros_first <= 2, "burst after recovery: {seq:?}");
        assert!(seq.iter().filter(|&&i| i == 0).count() >= 3, "{seq:?}");
    }

    #[test]
    fn feedback_lets_a_large_backend_take_a_second_request_a_small_one_may_not() {
        let now = Instant::now();
        let bs = one_two_four(now);
        let s = Feedback::default();
        // The largest backend holds the one request in flight: it still gets its share
        // of the picks (4 of 7), not the smallest backend's quota.
        let held = bs[2].start();
        assert_eq!(counts(&s, &bs, 700, now), [100, 200, 400]);
        drop(held);
        // The smallest holds it: one request is already more than its share of two.
        let _held = bs[0].start();
        assert_eq!(counts(&s, &bs, 60, now)[0], 0);
    }

    #[test]
    fn feedback_passes_over_a_recently_slow_backend_until_that_fades() {
        let t0 = Instant::now();
        let bs = backends(&[1, 1, 1], t0);
        for b in &bs[1..] {
            b.observe_latency(Duration::from_millis(3), t0);
        }
        // Backend 0 just answered in 80 ms (throttled by its CPU quota, say).
        bs[0].observe_latency(Duration::from_millis(80), t0);
        let s = Feedback::default();
        let soon = t0 + Duration::from_millis(50);
        assert_eq!(counts(&s, &bs, 60, soon)[0], 0, "slow backend still picked");
        // 80 ms fades below 3 × 3 ms after ~0.55 s with no new response.
        let later = t0 + Duration::from_millis(800);
        for b in &bs[1..] {
            b.observe_latency(Duration::from_millis(3), later);
        }
        let c = counts(&s, &bs, 60, later);
        assert!(c[0] >= 15, "recovered backend gets its share back: {c:?}");
    }

    #[test]
    fn feedback_passes_over_a_backend_stuck_on_a_long_request_within_its_share() {
        let t0 = Instant::now();
        let bs = one_two_four(t0);
        // In flight 1:2:4, exactly the weights: nobody is over its share. Backends 1
        // and 2 keep answering in 3 ms; backend 0 has answered nothing for 100 ms (a
        // single-threaded backend busy with one request from a heavy tail).
        let _held: Vec<_> = [(0, 1), (1, 2), (2, 4)]
            .iter()
            .flat_map(|&(i, n)| (0..n).map(move |_| i))
            .map(|i| bs[i].start())
            .collect();
        let later = t0 + Duration::from_millis(100);
        for b in &bs[1..] {
            b.observe_latency(Duration::from_millis(3), later);
        }
        let s = Feedback::default();
        let c = counts(&s, &bs, 60, later);
        assert_eq!(c[0], 0, "a stuck backend still picked: {c:?}");
        // Once it answers it is an ordinary backend again.
        bs[0].observe_latency(Duration::from_millis(3), later);
        let c = counts(&s, &bs, 70, later);
        assert!(c[0] >= 5, "{c:?}");
    }

    #[test]
    fn hash_is_stable_and_moves_only_the_removed_share() {
        let now = Instant::now();
        let bs = backends(&[100; 5], now);
        let s = RendezvousHash;
        let before: Vec<usize> = (0..2000u64)
            .map(|k| {
                s.pick(
                    &bs,
                    &PickContext {
                        now,
                        key: k,
                        skip: &[],
                    },
                )
                .unwrap()
            })
            .collect();
        let again: Vec<usize> = (0..2000u64)
            .map(|k| {
                s.pick(
                    &bs,
                    &PickContext {
                        now,
                        key: k,
                        skip: &[],
                    },
                )
                .unwrap()
            })
            .collect();
        assert_eq!(before, again);
        // Remove backend 2: only its keys move.
        let fewer: Vec<Arc<Backend>> = bs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, b)| b.clone())
            .collect();
        for (k, &owner) in before.iter().enumerate() {
            let now_owner = fewer[s
                .pick(
                    &fewer,
                    &PickContext {
                        now,
                        key: k as u64,
                        skip: &[],
                    },
                )
                .unwrap()]
            .addr;
            if owner != 2 {
                assert_eq!(now_owner, bs[owner].addr, "key {k} moved needlessly");
            }
        }
    }

    #[test]
    fn ejected_backends_get_nothing() {
        let now = Instant::now();
        let bs = backends(&[1, 1], now);
        let cfg = OutlierConfig {
            consecutive_failures: 1,
            ..Default::default()
        };
        bs[0].record(false, now, 1, &cfg);
        for kind in ALL {
            let s = build(kind);
            let c = counts(s.as_ref(), &bs, 50, now);
            assert_eq!(c[0], 0, "{} sent to an ejected backend", s.name());
        }
    }

    const ALL: [SchedulerKind; 8] = [
        SchedulerKind::Feedback,
        SchedulerKind::RoundRobin,
        SchedulerKind::Weighted,
        SchedulerKind::LeastConn,
        SchedulerKind::WeightedLeastConn,
        SchedulerKind::P2c,
        SchedulerKind::P2cEwma,
        SchedulerKind::Hash,
    ];

    proptest! {
        /// Every scheduler returns an eligible index whenever one exists, and None
        /// exactly when none does.
        #[test]
        fn picks_are_always_eligible(weights in proptest::collection::vec(1u32..1000, 0..12), skip_mask in any::<u16>(), key in any::<u64>()) {
            let now = Instant::now();
            let bs = backends(&weights, now);
            let skip: Vec<usize> = (0..bs.len()).filter(|i| skip_mask & (1 << i) != 0).collect();
            let ctx = PickContext { now, key, skip: &skip };
            for kind in ALL {
                let s = build(kind);
                match s.pick(&bs, &ctx) {
                    Some(i) => { prop_assert!(i < bs.len()); prop_assert!(!skip.contains(&i)); }
                    None => prop_assert_eq!(skip.len(), bs.len()),
                }
            }
        }

        /// `feedback` never sends to a backend already holding its share of the requests
        /// in flight counting the new one, and with nothing in flight follows the
        /// controller's weights exactly per cycle.
        #[test]
        fn feedback_respects_shares(
            weights in proptest::collection::vec(1u32..20, 1..8),
            in_flight in proptest::collection::vec(0usize..6, 8),
        ) {
            let now = Instant::now();
            let bs = backends(&weights, now);
            let s = Feedback::default();
            let total: u32 = weights.iter().sum();
            prop_assert_eq!(counts(&s, &bs, total as usize, now), weights.iter().map(|w| *w as usize).collect::<Vec<_>>());
            let _busy: Vec<_> = bs.iter().zip(&in_flight).flat_map(|(b, n)| (0..*n).map(|_| b.start()).collect::<Vec<_>>()).collect();
            let f: usize = bs.iter().map(|b| b.in_flight() as usize).sum();
            let ctx = PickContext { now, key: 0, skip: &[] };
            for _ in 0..20 {
                let i = s.pick(&bs, &ctx).unwrap();
                prop_assert!((bs[i].in_flight() as usize * total as usize) < (f + 1) * weights[i] as usize,
                    "picked {} with {} of {} in flight, weight {}/{}", i, bs[i].in_flight(), f, weights[i], total);
            }
        }

        /// Smooth WRR gives each backend exactly its share over one full cycle.
        #[test]
        fn smooth_weighted_is_exact_per_cycle(weights in proptest::collection::vec(1u32..20, 1..8)) {
            let now = Instant::now();
            let bs = backends(&weights, now);
            let total: u32 = weights.iter().sum();
            let c = counts(&SmoothWeighted::default(), &bs, total as usize, now);
            for (i, w) in weights.iter().enumerate() {
                prop_assert_eq!(c[i], *w as usize);
            }
        }

        /// Rendezvous hashing: adding a backend only moves keys to the new backend.
        #[test]
        fn hash_adding_moves_keys_only_to_the_newcomer(n in 1usize..8, keys in proptest::collection::vec(any::<u64>(), 1..200)) {
            let now = Instant::now();
            let bs = backends(&vec![100; n + 1], now);
            let old = &bs[..n];
            for k in keys {
                let ctx = PickContext { now, key: k, skip: &[] };
                let before = RendezvousHash.pick(old, &ctx).unwrap();
                let after = RendezvousHash.pick(&bs, &ctx).unwrap();
                prop_assert!(after == before || after == n);
            }
        }

        /// Weighted schedulers converge on the weight ratio.
        #[test]
        fn weighted_shares_follow_weights(w in proptest::collection::vec(1u32..10, 2..5)) {
            let now = Instant::now();
            let bs = backends(&w, now);
            let total: u32 = w.iter().sum();
            let n = 20_000usize;
            let c = counts(&RendezvousHash, &bs, n, now);
            for (i, wi) in w.iter().enumerate() {
                let expect = n as f64 * *wi as f64 / total as f64;
                prop_assert!((c[i] as f64 - expect).abs() < expect * 0.2 + 60.0, "hash share {} vs {}", c[i], expect);
            }
        }
    }
}
