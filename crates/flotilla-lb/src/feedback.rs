//! The dynamic-feedback controller: turns what is known about each backend's load into
//! weights, once per period. Pure and deterministic: observations and `now` in, weights
//! out — tested with an injected clock (see docs/feedback.md for the algorithm, its
//! parameters and the stability argument).
//!
//! Per backend *i* and period:
//! 1. **Capacity (feed-forward)**: requests it *finished* ÷ the CPU share of its quota
//!    the agent reported — what it would serve at 100 % — smoothed across periods. It
//!    does not depend on how traffic was split, so following it closes no loop, and a
//!    saturated backend (share 1) shows exactly its capacity. The capacity factor is
//!    `(tᵢ / mean t)^cpu` times the mean static weight, where `tᵢ` is the capacity less
//!    square-root headroom for the load offered ([`headroom_targets`]: a small quota
//!    runs out within its CFS period at a lower utilisation than a large one); until
//!    measured, the weight in force when the backend was first seen (a warm start) or
//!    its static weight.
//! 2. **Trim (feedback)**: what capacity does not explain — latency relative to the
//!    traffic-weighted mean (at its 4th root), memory pressure, CPU busy with none of
//!    our traffic, errors — through the LVS rule moved to the log domain,
//!    `trim ← trim · exp(clamp(A · −ln L̄, ±max_step))` with a dead band; the trim leaks
//!    back towards 1 where capacity is measured, so a transient fades.
//! 3. Weight = capacity factor × trim, clamped to `[max(1, min_fraction · base),
//!    scale · base]` (never zero or negative); published only when some weight moved by
//!    more than `threshold`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `[listener.feedback]` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackConfig {
    /// Control period.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// Gain `A` of the LVS rule.
    pub gain: f64,
    /// Largest relative weight change per period (damping).
    pub max_step: f64,
    /// No change while |T − L| is below this (dead band against dithering).
    pub dead_band: f64,
    /// Upper clamp, as a multiple of the static weight.
    pub scale: f64,
    /// Lower clamp, as a fraction of the static weight (> 0: a backend is never starved
    /// of the traffic that would show it recovered).
    pub min_fraction: f64,
    /// Smoothing of the inputs (0 = no memory, 1 = never changes).
    pub smoothing: f64,
    /// Reports older than this many periods are ignored.
    pub stale_periods: u32,
    /// Coefficients of the aggregate load.
    pub coefficients: Coefficients,
    /// Publish only when a weight changed by more than this fraction.
    pub threshold: f64,
    /// The backends' CPU-quota period (Docker's `--cpu-period`, 100 ms unless changed):
    /// the window in which a backend can run out of its quota, which sizes the
    /// square-root headroom (see [`headroom_targets`]).
    #[serde(with = "humantime_serde")]
    pub quota_period: Duration,
    /// The headroom is sized for at least this share of the measured capacity being
    /// offered: below it no backend is near its quota, and shares sized for a lower load
    /// would leave the large backends too little room for a sudden step up.
    pub headroom_min_load: f64,
}

/// Coefficients of the aggregate load `L = Σ cᵢ·loadᵢ` (normalised to sum 1 over the
/// inputs present).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Coefficients {
    /// Exponent of the capacity share estimated from the CPU reports (1 = weights in
    /// proportion to capacity, 0 = ignore it); also the weight of CPU pressure on a
    /// backend serving none of our traffic.
    pub cpu: f64,
    /// Memory share of the limit (agent report).
    pub memory: f64,
    /// Latency relative to the cluster mean (lb observation).
    pub latency: f64,
    /// Error rate (lb observation), counted as extra load.
    pub errors: f64,
}

impl Default for Coefficients {
    fn default() -> Self {
        Coefficients {
            cpu: 1.0,
            memory: 0.2,
            latency: 1.0,
            errors: 2.0,
        }
    }
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        FeedbackConfig {
            period: Duration::from_secs(1),
            gain: 0.4,
            max_step: 0.35,
            dead_band: 0.05,
            scale: 10.0,
            min_fraction: 0.05,
            smoothing: 0.3,
            stale_periods: 3,
            coefficients: Coefficients::default(),
            threshold: 0.02,
            quota_period: Duration::from_millis(100),
            headroom_min_load: 0.7,
        }
    }
}

/// An agent's load report for one instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadReport {
    /// CPU use as a share of the quota, 0..=1 (may exceed 1 briefly).
    pub cpu: f64,
    /// Memory use as a share of the limit, 0..=1.
    pub memory: f64,
    /// When it was taken (the controller's clock).
    pub at: Instant,
}

/// What the controller knows about one backend this period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Static weight (config or registry).
    pub base_weight: u32,
    /// The lb's latency estimate, ns (0 = none yet).
    pub latency_ns: f64,
    /// Requests completed in the period (finished, not sent: at saturation what a
    /// backend finishes is its capacity, what it is sent is only the split).
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// The agent's latest report, if any.
    pub report: Option<LoadReport>,
    /// Weight already in force for a backend new to this controller (published by
    /// another lb): the controller starts from it instead of the static weight.
    pub current_weight: Option<f64>,
}

#[derive(Debug, Clone)]
struct State {
    weight: f64,
    /// The weight to hold until capacity is measured: the one already in force when
    /// this controller first saw the backend (a warm start), else the static weight.
    prior: f64,
    /// Multiplier from the feedback rule on top of the capacity share.
    trim: f64,
    /// Smoothed capacity estimate, requests/s at 100 % of the quota.
    capacity: Option<f64>,
    load: Option<f64>,
    published: f64,
}

/// Reports below this CPU share say too little to estimate a capacity from.
const MIN_UTILISATION: f64 = 0.02;
/// Memory (and CPU with no traffic of ours) counts as load only above this share of
/// the limit: pressure. Neither follows our traffic, so neither can say what share
/// of it a backend should get.
const PRESSURE: f64 = 0.8;
/// How much more latency moves than the weight that causes it near saturation
/// (`ρ/(1−ρ)` ≈ 4–6 at 80–85 % for an M/M/1 server): the latency ratio enters the load
/// as its 4th root, which keeps the loop gain of the trim below 1 there.
const LATENCY_SENSITIVITY: f64 = 4.0;

/// Share of the trim's logarithm forgotten each period once capacity is measured.
const TRIM_LEAK: f64 = 0.25;

/// The controller of one listener.
#[derive(Debug, Clone)]
pub struct Controller {
    cfg: FeedbackConfig,
    state: HashMap<SocketAddr, State>,
    /// Smoothed requests/s finished by the backends whose capacity is measured.
    offered: Option<f64>,
}

impl Controller {
    /// A controller with parameters `cfg`.
    pub fn new(cfg: FeedbackConfig) -> Self {
        Controller {
            cfg,
            state: HashMap::new(),
            offered: None,
        }
    }

    /// One control step at `now`. Returns the new weights when they changed by more than
    /// the threshold (otherwise `None`: keep the published ones). Backends not in
    /// `observations` are forgotten; new ones start at their static weight.
    pub fn step(
        &mut self,
        now: Instant,
        observations: &HashMap<SocketAddr, Observation>,
    ) -> Option<HashMap<SocketAddr, f64>> {
        let cfg = &self.cfg;
        self.state.retain(|addr, _| observations.contains_key(addr));
        for (addr, o) in observations {
            self.state.entry(*addr).or_insert_with(|| {
                // A weight already in force (published by the lb before a restart or by
                // the other lb of a pair) is where this controller starts: resetting it
                // to the static weight would undo what was learned and overload a small
                // backend for the periods it takes to learn it again.
                let start = o
                    .current_weight
                    .filter(|w| w.is_finite() && *w > 0.0)
                    .unwrap_or(o.base_weight as f64);
                State {
                    weight: start,
                    prior: start,
                    trim: 1.0,
                    capacity: None,
                    load: None,
                    published: start,
                }
            });
        }
        let stale = cfg.period * cfg.stale_periods;
        let fresh = |o: &Observation| {
            o.report
                .filter(|r| now.saturating_duration_since(r.at) <= stale)
        };

        // The lb's reference latency: traffic-weighted mean over backends that served.
        let (sum, n) = observations
            .values()
            .filter(|o| o.requests > 0 && o.latency_ns > 0.0)
            .fold((0.0, 0u64), |(s, n), o| {
                (s + o.latency_ns * o.requests as f64, n + o.requests)
            });
        let mean_latency = if n > 0 { sum / n as f64 } else { 0.0 };
        // 1. Feed-forward: each backend's capacity, estimated as served / utilisation
        //    (requests per second it would serve at 100 % of its quota). It does not
        //    depend on how traffic was split, so following it closes no loop: no
        //    oscillation from report delay, and a saturated backend (utilisation 1)
        //    still shows its true capacity (what it serves).
        for (addr, o) in observations {
            let Some(r) = fresh(o) else { continue };
            if o.requests == 0 || r.cpu < MIN_UTILISATION {
                continue;
            }
            let estimate = o.requests as f64 / cfg.period.as_secs_f64() / r.cpu;
            let st = self.state.get_mut(addr).expect("inserted above");
            st.capacity = Some(match st.capacity {
                Some(prev) => cfg.smoothing * prev + (1.0 - cfg.smoothing) * estimate,
                None => estimate,
            });
        }
        // Backends whose capacity is measured, with their static weight and what they
        // finished this period.
        let known: Vec<(SocketAddr, f64, f64, u64)> = observations
            .iter()
            .filter_map(|(a, o)| {
                Some((
                    *a,
                    self.state[a].capacity?,
                    o.base_weight.max(1) as f64,
                    o.requests,
                ))
            })
            .collect();
        let mean_base = mean(known.iter().map(|&(_, _, base, _)| base));
        // The capacity share each measured backend is aimed at: its capacity less
        // square-root headroom for the load offered (never sized for less than
        // `headroom_min_load` of the total).
        let finished =
            known.iter().map(|&(.., done)| done).sum::<u64>() as f64 / cfg.period.as_secs_f64();
        let offered = match self.offered {
            Some(prev) if !known.is_empty() => {
                cfg.smoothing * prev + (1.0 - cfg.smoothing) * finished
            }
            _ => finished,
        };
        self.offered = (!known.is_empty()).then_some(offered);
        let capacities: Vec<f64> = known.iter().map(|&(_, cap, ..)| cap).collect();
        let total_capacity: f64 = capacities.iter().sum();
        let sized_for = offered.max(cfg.headroom_min_load * total_capacity);
        let mut targets = headroom_targets(&capacities, sized_for, cfg.quota_period);
        if targets.iter().sum::<f64>() <= 0.0 {
            targets = capacities;
        }
        let mean_target = mean(targets.iter().copied());
        let target: HashMap<SocketAddr, f64> =
            known.iter().map(|&(addr, ..)| addr).zip(targets).collect();

        // 2. Feedback trim: what capacity does not explain (latency, errors, memory
        //    pressure, someone else's CPU load) through the log-domain LVS rule.

        for (addr, o) in observations {
            let st = self.state.get_mut(addr).expect("inserted above");
            let c = &cfg.coefficients;
            let mut parts = Vec::with_capacity(3);
            if let Some(r) = fresh(o) {
                if o.requests == 0 && r.cpu > PRESSURE {
                    // Busy with no traffic of ours: someone else's load.
                    parts.push((c.cpu, r.cpu / PRESSURE));
                }
                if r.memory > PRESSURE {
                    parts.push((c.memory, r.memory / PRESSURE));
                }
            }
            if mean_latency > 0.0 && o.requests > 0 && o.latency_ns > 0.0 {
                parts.push((
                    c.latency,
                    (o.latency_ns / mean_latency).powf(1.0 / LATENCY_SENSITIVITY),
                ));
            }
            let total: f64 = parts.iter().map(|(k, _)| k).sum();
            let mut load = if total > 0.0 {
                parts.iter().map(|(k, v)| k * v).sum::<f64>() / total
            } else {
                1.0
            };
            if o.requests > 0 {
                load += c.errors * (o.errors as f64 / o.requests as f64);
            }
            let smoothed = match st.load {
                Some(prev) => cfg.smoothing * prev + (1.0 - cfg.smoothing) * load,
                None => load,
            };
            st.load = Some(smoothed);
            // Log-domain error: L = 2 and L = 0.5 are equally far from the target, and the
            // step is proportional near the target (∛ has unbounded slope at zero, which
            // made the classic rule dither around its set point in the tests).
            let error = -(smoothed.max(1e-3)).ln();
            let base = o.base_weight.max(1) as f64;
            let (lo, hi) = ((base * cfg.min_fraction).max(1.0), base * cfg.scale);
            if error.abs() > cfg.dead_band {
                let step = (cfg.gain * error).clamp(-cfg.max_step, cfg.max_step);
                // The trim cannot wind up past what the clamp would allow anyway.
                st.trim = (st.trim * step.exp()).clamp(lo / hi, hi / lo);
            }
            if st.capacity.is_some() {
                // Where capacity is measured the trim leaks back towards 1, so what a
                // transient taught it (a backend queueing before its capacity was known)
                // fades instead of pushing the weight past its capacity share.
                st.trim = st.trim.powf(1.0 - TRIM_LEAK);
            }
            // 3. Weight = capacity share (until measured, the weight in force when first
            //    seen, else the operator's static weight) × trim, clamped: never zero or
            //    negative.
            let prior = match target.get(addr) {
                Some(t) if mean_target > 0.0 => mean_base * (t / mean_target).powf(c.cpu),
                _ => st.prior,
            };
            st.weight = (prior * st.trim).clamp(lo, hi);
        }
        let moved = self
            .state
            .values()
            .any(|s| (s.weight - s.published).abs() > cfg.threshold * s.published.max(1.0));
        if !moved {
            return None;
        }
        for s in self.state.values_mut() {
            s.published = s.weight;
        }
        Some(self.state.iter().map(|(a, s)| (*a, s.weight)).collect())
    }

    /// Current (unpublished) weights, for status.
    pub fn weights(&self) -> HashMap<SocketAddr, f64> {
        self.state.iter().map(|(a, s)| (*a, s.weight)).collect()
    }
}

/// Arithmetic mean; 0 for none.
fn mean(xs: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = xs.len();
    if n == 0 {
        0.0
    } else {
        xs.sum::<f64>() / n as f64
    }
}

/// Requests per second to aim at each backend so that every quota period keeps the
/// same *number of standard deviations* of room: capacity less square-root headroom.
///
/// A backend of capacity `c` (requests/s at 100 % of its CPU quota) serves `k = c·P`
/// requests in one quota period `P`; a period that is sent more than that throttles the
/// container until the next one, and the requests left wait up to a whole period (the
/// tail of a quota'd backend). How many a period is sent varies by about `√k` around
/// its mean, so equal *utilisation* (weights ∝ capacity) leaves a small backend fewer
/// standard deviations of room than a large one: with 5 requests a period at 85 %, one
/// more than the mean throttles it. Square-root headroom — the rule that sizes call
/// centres, Halfin–Whitt — gives each backend `k − β·√k`, with one `β` for all chosen
/// so the targets add up to what is offered: the smaller backend runs cooler, the
/// larger hotter, and the risk of running out within a period is the same on each.
///
/// `β` is never negative: offered at or over the total capacity, the targets are the
/// capacities (the weights of a saturated cluster stay at the true capacities). A
/// backend whose `√k` is below `β` gets 0 (its share goes to the others; the caller's
/// lower clamp still sends it a trickle). Pure: capacities and offered rate in, targets
/// out, in the capacities' order.
pub fn headroom_targets(capacities: &[f64], offered: f64, quota_period: Duration) -> Vec<f64> {
    let p = quota_period.as_secs_f64();
    let per_period: Vec<f64> = capacities.iter().map(|c| c.max(0.0) * p).collect();
    let wanted = offered.max(0.0) * p;
    let mut active: Vec<bool> = per_period.iter().map(|k| *k > 0.0).collect();
    let mut beta = 0.0;
    // Water-filling: a backend whose target would be negative leaves the set, and β is
    // solved again over the rest (at most one pass per backend).
    for _ in 0..=capacities.len() {
        let (sum_k, sum_root) = per_period
            .iter()
            .zip(&active)
            .filter(|(_, a)| **a)
            .fold((0.0, 0.0), |(s, r), (k, _)| (s + k, r + k.sqrt()));
        if sum_root <= 0.0 {
            break;
        }
        beta = ((sum_k - wanted) / sum_root).max(0.0);
        let mut changed = false;
        for (k, a) in per_period.iter().zip(active.iter_mut()) {
            if *a && k.sqrt() < beta {
                *a = false;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    per_period
        .iter()
        .zip(&active)
        .map(|(k, a)| if *a { (k - beta * k.sqrt()) / p } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(i: usize) -> SocketAddr {
        format!("127.0.0.1:{}", 1000 + i).parse().unwrap()
    }

    /// A cluster of M/M/1-like backends: latency = 1 / (capacity − arrival rate), with
    /// traffic split by weight. Returns observations for one period.
    fn observe(
        capacities: &[f64],
        weights: &HashMap<SocketAddr, f64>,
        rate: f64,
    ) -> HashMap<SocketAddr, Observation> {
        let total: f64 = (0..capacities.len())
            .map(|i| weights.get(&addr(i)).copied().unwrap_or(100.0))
            .sum();
        capacities
            .iter()
            .enumerate()
            .map(|(i, cap)| {
                let share = weights.get(&addr(i)).copied().unwrap_or(100.0) / total;
                let lambda = rate * share;
                let latency_s = if lambda < cap * 0.99 {
                    1.0 / (cap - lambda)
                } else {
                    100.0 / cap
                };
                (
                    addr(i),
                    Observation {
                        base_weight: 100,
                        latency_ns: latency_s * 1e9,
                        requests: lambda.max(1.0) as u64,
                        errors: 0,
                        report: None,
                        current_weight: None,
                    },
                )
            })
            .collect()
    }

    fn run(
        c: &mut Controller,
        caps: &[f64],
        rate: f64,
        periods: usize,
        t: &mut Instant,
    ) -> Vec<HashMap<SocketAddr, f64>> {
        run_observed(c, caps, rate, periods, t, |_, _| {})
    }

    /// [`run`] with `adjust` applied to each period's observations before the step.
    fn run_observed(
        c: &mut Controller,
        caps: &[f64],
        rate: f64,
        periods: usize,
        t: &mut Instant,
        adjust: impl Fn(&mut HashMap<SocketAddr, Observation>, Instant),
    ) -> Vec<HashMap<SocketAddr, f64>> {
        let mut history = Vec::new();
        let mut weights = c.weights();
        for _ in 0..periods {
            *t += Duration::from_secs(1);
            let mut obs = observe(caps, &weights, rate);
            adjust(&mut obs, *t);
            if let Some(w) = c.step(*t, &obs) {
                weights = w;
            }
            history.push(weights.clone());
        }
        history
    }

    fn ratio(w: &HashMap<SocketAddr, f64>, a: usize, b: usize) -> f64 {
        w[&addr(a)] / w[&addr(b)]
    }

    /// Every period after the first `skip` has weights within `tolerance` of 1:2:4.
    fn assert_one_two_four(h: &[HashMap<SocketAddr, f64>], skip: usize, tolerance: f64, load: f64) {
        for (k, w) in h.iter().enumerate().skip(skip) {
            let (r20, r10) = (ratio(w, 2, 0), ratio(w, 1, 0));
            assert!(
                (r20 / 4.0 - 1.0).abs() < tolerance && (r10 / 2.0 - 1.0).abs() < tolerance,
                "load {load}, period {}: ratios {r20:.2} (want 4) and {r10:.2} (want 2)",
                k + 1
            );
        }
    }

    #[test]
    fn converges_on_heterogeneous_capacity() {
        let mut c = Controller::new(FeedbackConfig::default());
        let mut t = Instant::now();
        // Capacities 250 / 500 / 1000 req/s at 85 % of the total (1,487 req/s).
        let h = run(&mut c, &[250.0, 500.0, 1000.0], 1487.0, 40, &mut t);
        let w = h.last().unwrap();
        let r = ratio(w, 2, 0);
        assert!(
            r > 2.5,
            "fast backend should get far more weight than the slow one: {r} ({w:?})"
        );
        // Latencies end up close: the point of the controller.
        let obs = observe(&[250.0, 500.0, 1000.0], w, 1487.0);
        let lat: Vec<f64> = (0..3).map(|i| obs[&addr(i)].latency_ns).collect();
        let spread = lat.iter().cloned().fold(f64::MIN, f64::max)
            / lat.iter().cloned().fold(f64::MAX, f64::min);
        assert!(
            spread < 1.6,
            "latencies should be near each other, got {lat:?}"
        );
    }

    /// Like [`run`], for CPU-quota'd containers of one service (the scheduler
    /// experiment's): every request takes the same 2 ms of CPU, a smaller quota serves
    /// fewer per second, latency = 2 ms / (1 − utilisation), and the agent reports
    /// CPU = arrival rate / capacity.
    fn run_with_cpu(
        c: &mut Controller,
        caps: &[f64],
        rate: f64,
        periods: usize,
        t: &mut Instant,
    ) -> Vec<HashMap<SocketAddr, f64>> {
        run_observed(c, caps, rate, periods, t, |obs, now| {
            for (i, cap) in caps.iter().enumerate() {
                let o = obs.get_mut(&addr(i)).unwrap();
                let utilisation = (o.requests as f64 / cap).min(1.0);
                o.latency_ns = 2e6 / (1.0 - utilisation).max(0.01);
                o.report = Some(LoadReport {
                    cpu: utilisation,
                    memory: 0.1,
                    at: now,
                });
            }
        })
    }

    #[test]
    fn cpu_reports_bring_weights_to_the_headroom_targets_within_five_periods_at_any_load() {
        // The scheduler experiment's heterogeneous cluster: 50 / 100 / 200 req/s.
        let caps = [50.0, 100.0, 200.0];
        for load in [0.3f64, 0.6, 0.85] {
            let cfg = FeedbackConfig::default();
            let sized_for = 350.0 * load.max(cfg.headroom_min_load);
            let want = headroom_targets(&caps, sized_for, cfg.quota_period);
            let mut c = Controller::new(cfg);
            let mut t = Instant::now();
            let h = run_with_cpu(&mut c, &caps, 350.0 * load, 24, &mut t);
            for (k, w) in h.iter().enumerate().skip(4) {
                for i in [1, 2] {
                    let (got, wanted) = (ratio(w, i, 0), want[i] / want[0]);
                    assert!(
                        (got / wanted - 1.0).abs() < 0.15,
                        "load {load}, period {}: backend {i} ÷ backend 0 = {got:.2}, want {wanted:.2}",
                        k + 1
                    );
                }
            }
            // Settled: no weight moves more than 5 % over the last 8 periods. (The
            // latency trim pulls a cooler backend's weight up a little — this model's
            // latency is M/M/1, with no quota periods to overrun — and the leak pulls it
            // back: they meet within 16 periods, moving 1–3 % a period on the way.)
            for i in 0..3 {
                let tail: Vec<f64> = h[16..].iter().map(|w| w[&addr(i)]).collect();
                let (lo, hi) = tail
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
                assert!(
                    (hi - lo) / hi < 0.05,
                    "load {load}: backend {i} moves: {tail:?}"
                );
            }
        }
    }

    /// A saturated heterogeneous cluster as the lb and agents see it: each backend
    /// finishes at most its capacity per period whatever it is sent (the rest queues,
    /// so its latency is high), the agents report ~100 % of the quota (with ±3 % noise
    /// and half a period old), and the lb counts what finished.
    fn run_saturated(
        c: &mut Controller,
        caps: &[f64],
        rate: f64,
        periods: usize,
        t: &mut Instant,
    ) -> Vec<HashMap<SocketAddr, f64>> {
        let period = std::cell::Cell::new(0usize);
        run_observed(c, caps, rate, periods, t, |obs, now| {
            let k = period.get();
            period.set(k + 1);
            for (i, cap) in caps.iter().enumerate() {
                let o = obs.get_mut(&addr(i)).unwrap();
                let sent = o.requests as f64;
                let utilisation = (sent / cap).min(1.0);
                let noise = [1.0, 1.03, 0.97, 1.01, 0.99][(k + i) % 5];
                o.requests = sent.min(*cap) as u64;
                o.latency_ns = 2e6 / (1.0 - utilisation).max(0.01);
                o.report = Some(LoadReport {
                    cpu: utilisation * noise,
                    memory: 0.1,
                    at: now - Duration::from_millis(500),
                });
            }
        })
    }

    #[test]
    fn a_warm_start_keeps_the_weights_in_force_until_it_measures_better() {
        // Weights 40 / 80 / 180 in force (published by an earlier lb), equal latencies,
        // no load reports yet: the first steps keep them instead of resetting to 100.
        let mut c = Controller::new(FeedbackConfig::default());
        let t = Instant::now();
        let obs: HashMap<SocketAddr, Observation> = [40.0, 80.0, 180.0]
            .iter()
            .enumerate()
            .map(|(i, w)| {
                (
                    addr(i),
                    Observation {
                        base_weight: 100,
                        latency_ns: 3e6,
                        requests: 50,
                        errors: 0,
                        report: None,
                        current_weight: Some(*w),
                    },
                )
            })
            .collect();
        for k in 1..=3 {
            c.step(t + Duration::from_secs(k), &obs);
            let w = c.weights();
            for (i, want) in [40.0, 80.0, 180.0].iter().enumerate() {
                assert!(
                    (w[&addr(i)] / want - 1.0).abs() < 0.05,
                    "step {k}: backend {i} at {} (started at {want})",
                    w[&addr(i)]
                );
            }
        }
    }

    #[test]
    fn headroom_shrinks_with_capacity_and_the_targets_add_up_to_the_load() {
        // 50 / 100 / 200 req/s with 2 ms requests: 5, 10 and 20 requests per 100 ms.
        let caps = [50.0, 100.0, 200.0];
        let period = Duration::from_millis(100);
        let t = headroom_targets(&caps, 286.0, period);
        assert!((t.iter().sum::<f64>() - 286.0).abs() < 1e-6, "{t:?}");
        let utilisation: Vec<f64> = t.iter().zip(&caps).map(|(t, c)| t / c).collect();
        // β = (35 − 28.6) / (√5 + √10 + √20) ≈ 0.65: 71 %, 79 %, 85 %.
        for (u, want) in utilisation.iter().zip([0.71, 0.79, 0.85]) {
            assert!((u - want).abs() < 0.01, "{utilisation:?}");
        }
        // At or over the total capacity: the capacities themselves.
        assert_eq!(headroom_targets(&caps, 350.0, period), caps.to_vec());
        assert_eq!(headroom_targets(&caps, 500.0, period), caps.to_vec());
        // Equal backends: equal targets.
        let eq = headroom_targets(&[100.0; 3], 120.0, period);
        assert!(eq.iter().all(|t| (t - 40.0).abs() < 1e-9), "{eq:?}");
        // Nearly idle: the small backend leaves the set, the rest still add up.
        let idle = headroom_targets(&caps, 20.0, period);
        assert_eq!(idle[0], 0.0, "{idle:?}");
        assert!((idle.iter().sum::<f64>() - 20.0).abs() < 1e-6, "{idle:?}");
    }

    proptest! {
        /// For any capacities and offered load: targets are never negative nor above the
        /// capacity, add up to the load when it fits (else are the capacities), and a
        /// larger backend never runs at a lower utilisation than a smaller one.
        #[test]
        fn headroom_targets_are_feasible_and_ordered(
            caps in proptest::collection::vec(1.0f64..2000.0, 1..8),
            load in 0.0f64..1.5,
            period_ms in 10u64..1000,
        ) {
            let total: f64 = caps.iter().sum();
            let offered = total * load;
            let t = headroom_targets(&caps, offered, Duration::from_millis(period_ms));
            prop_assert_eq!(t.len(), caps.len());
            for (t, c) in t.iter().zip(&caps) {
                prop_assert!(*t >= 0.0 && *t <= c + 1e-9, "target {} of capacity {}", t, c);
            }
            let sum: f64 = t.iter().sum();
            prop_assert!((sum - offered.min(total)).abs() <= 1e-6 * total, "sum {} offered {} total {}", sum, offered, total);
            for i in 0..caps.len() {
                for j in 0..caps.len() {
                    if caps[i] < caps[j] {
                        prop_assert!(t[i] / caps[i] <= t[j] / caps[j] + 1e-9,
                            "capacity {} at {} but {} at {}", caps[i], t[i] / caps[i], caps[j], t[j] / caps[j]);
                    }
                }
            }
        }
    }

    #[test]
    fn weights_stay_near_the_true_capacities_when_every_backend_is_saturated() {
        // 50 / 100 / 200 req/s, offered 95 % and 120 % of the total (every backend at
        // 100 % of its quota once overloaded), starting from equal weights.
        let caps = [50.0, 100.0, 200.0];
        for load in [0.95, 1.2] {
            let mut c = Controller::new(FeedbackConfig::default());
            let mut t = Instant::now();
            let h = run_saturated(&mut c, &caps, 350.0 * load, 30, &mut t);
            assert_one_two_four(&h, 5, 0.2, load);
        }
    }

    #[test]
    fn a_cpu_hog_inside_a_quota_does_not_starve_the_backend_into_overloading_the_rest() {
        // Three quota'd backends of 100 req/s at 80 % load; from period 5 a busy loop
        // inside backend 0 keeps its CPU at 100 % of the quota whatever we send, and
        // leaves our requests half the capacity. Served / utilisation then reads "what
        // it serves now"; were that followed all the way down, backend 0 would go to the
        // floor and the two others (200 req/s) would get all 240 req/s. The latency
        // trim stops it where the others start to queue.
        let caps = [100.0, 100.0, 100.0];
        let rate = 240.0;
        let mut c = Controller::new(FeedbackConfig::default());
        let mut t = Instant::now();
        let mut weights = c.weights();
        let mut shares = Vec::new();
        for period in 0..30 {
            t += Duration::from_secs(1);
            let hog = period >= 5;
            let total: f64 = (0..3)
                .map(|i| weights.get(&addr(i)).copied().unwrap_or(100.0))
                .sum();
            let obs: HashMap<_, _> = (0..3)
                .map(|i| {
                    let share = weights.get(&addr(i)).copied().unwrap_or(100.0) / total;
                    let lambda = rate * share;
                    let cap = if hog && i == 0 {
                        caps[i] / 2.0
                    } else {
                        caps[i]
                    };
                    let u = (lambda / cap).min(0.99);
                    // Under the hog every request of ours waits out CFS throttling
                    // (~40 ms) at any load; an overloaded backend queues without bound.
                    let latency_ns = if hog && i == 0 {
                        40e6 + 2e6 / (1.0 - u)
                    } else if lambda >= cap {
                        1e9
                    } else {
                        2e6 / (1.0 - u)
                    };
                    (
                        addr(i),
                        Observation {
                            base_weight: 100,
                            latency_ns,
                            requests: lambda as u64,
                            errors: 0,
                            report: Some(LoadReport {
                                cpu: if hog && i == 0 { 1.0 } else { lambda / caps[i] },
                                memory: 0.1,
                                at: t,
                            }),
                            current_weight: None,
                        },
                    )
                })
                .collect();
            if let Some(w) = c.step(t, &obs) {
                weights = w;
            }
            let now = c.weights();
            let total: f64 = now.values().sum();
            shares.push(now[&addr(0)] / total);
        }
        // Before the hog: even. After: well under a third, but enough that the other
        // two stay under their capacity (each gets < 100 req/s ⇔ backend 0 > 1/6).
        assert!((shares[4] - 1.0 / 3.0).abs() < 0.02, "{shares:?}");
        for (k, s) in shares.iter().enumerate().skip(12) {
            assert!(
                *s < 0.3 && *s > 1.0 / 6.0,
                "period {k}: backend 0 has {s:.3} of the traffic: {shares:?}"
            );
        }
    }

    #[test]
    fn does_not_oscillate_under_constant_load() {
        let mut c = Controller::new(FeedbackConfig::default());
        let mut t = Instant::now();
        let h = run(&mut c, &[250.0, 500.0, 1000.0], 1400.0, 60, &mut t);
        // After settling, each weight moves by < 5 % peak to peak over 20 periods.
        for i in 0..3 {
            let tail: Vec<f64> = h[40..].iter().map(|w| w[&addr(i)]).collect();
            let (lo, hi) = tail
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
            assert!((hi - lo) / hi < 0.05, "backend {i} oscillates: {tail:?}");
        }
    }

    #[test]
    fn equal_backends_keep_equal_weights() {
        let mut c = Controller::new(FeedbackConfig::default());
        let mut t = Instant::now();
        run(&mut c, &[500.0, 500.0, 500.0], 1200.0, 20, &mut t);
        let w = c.weights();
        for i in 0..3 {
            assert!((w[&addr(i)] - 100.0).abs() < 1e-9, "{w:?}");
        }
    }

    #[test]
    fn reacts_to_a_step_within_five_periods() {
        let mut c = Controller::new(FeedbackConfig::default());
        let mut t = Instant::now();
        let caps = [500.0, 500.0, 500.0];
        run(&mut c, &caps, 1200.0, 20, &mut t);
        // Backend 0 loses 60 % of its capacity (an antagonist arrives).
        let h = run(&mut c, &[200.0, 500.0, 500.0], 1200.0, 5, &mut t);
        let r = ratio(h.last().unwrap(), 1, 0);
        assert!(
            r > 1.8,
            "after 5 periods the hurt backend should have well under half the weight: {r}"
        );
    }

    #[test]
    fn stale_reports_are_ignored_and_fresh_ones_used() {
        let cfg = FeedbackConfig {
            coefficients: Coefficients {
                cpu: 1.0,
                memory: 0.0,
                latency: 0.0,
                errors: 0.0,
            },
            ..Default::default()
        };
        let t0 = Instant::now();
        let hot = |at| Observation {
            base_weight: 100,
            latency_ns: 0.0,
            requests: 0,
            errors: 0,
            report: Some(LoadReport {
                cpu: 1.0,
                memory: 0.0,
                at,
            }),
            current_weight: None,
        };
        let mut c = Controller::new(cfg.clone());
        let now = t0 + Duration::from_secs(10);
        let obs: HashMap<_, _> = [(addr(0), hot(t0))].into();
        assert_eq!(
            c.step(now, &obs),
            None,
            "a 10 s old report (3 periods allowed) must not move the weight"
        );
        let obs: HashMap<_, _> = [(addr(0), hot(now))].into();
        let w = c
            .step(now, &obs)
            .expect("a fresh report at 100 % CPU lowers the weight");
        assert!(w[&addr(0)] < 100.0);
    }

    #[test]
    fn errors_count_as_load() {
        let mut c = Controller::new(FeedbackConfig::default());
        let t = Instant::now() + Duration::from_secs(1);
        let ok = Observation {
            base_weight: 100,
            latency_ns: 1e6,
            requests: 100,
            errors: 0,
            report: None,
            current_weight: None,
        };
        let failing = Observation { errors: 30, ..ok };
        let obs: HashMap<_, _> = [(addr(0), ok), (addr(1), failing)].into();
        let w = c.step(t, &obs).unwrap();
        assert!(w[&addr(1)] < w[&addr(0)], "{w:?}");
    }

    #[test]
    fn backends_join_and_leave() {
        let mut c = Controller::new(FeedbackConfig::default());
        let mut t = Instant::now();
        run(&mut c, &[250.0, 1000.0], 1000.0, 20, &mut t);
        // A third joins: starts at its static weight; one leaves: forgotten.
        let h = run(&mut c, &[250.0, 1000.0, 500.0], 1200.0, 1, &mut t);
        assert!(h[0].contains_key(&addr(2)));
        let obs: HashMap<_, _> = [(
            addr(1),
            Observation {
                base_weight: 100,
                latency_ns: 1e6,
                requests: 10,
                errors: 0,
                report: None,
                current_weight: None,
            },
        )]
        .into();
        t += Duration::from_secs(1);
        c.step(t, &obs);
        assert_eq!(c.weights().len(), 1);
    }

    proptest! {
        /// Whatever the inputs, weights stay within [max(1, min_fraction·base), scale·base].
        #[test]
        fn weights_stay_positive_and_clamped(
            steps in proptest::collection::vec(proptest::collection::vec((0.0f64..1e9, 0u64..1000, 0u64..1000, 1u32..1000), 1..6), 1..30)
        ) {
            let cfg = FeedbackConfig::default();
            let mut c = Controller::new(cfg.clone());
            let mut t = Instant::now();
            for step in steps {
                t += Duration::from_secs(1);
                let obs: HashMap<_, _> = step.iter().enumerate().map(|(i, (lat, req, err, base))| {
                    (addr(i), Observation { base_weight: *base, latency_ns: *lat, requests: *req, errors: (*err).min(*req), report: None, current_weight: None })
                }).collect();
                c.step(t, &obs);
                for (a, w) in c.weights() {
                    let base = obs[&a].base_weight as f64;
                    prop_assert!(w >= (base * cfg.min_fraction).max(1.0) - 1e-9, "{} below floor", w);
                    prop_assert!(w <= base * cfg.scale + 1e-9, "{} above ceiling", w);
                    prop_assert!(w.is_finite());
                }
            }
        }
    }
}
