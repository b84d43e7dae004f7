//! A backend and the state that must survive backend-set updates: in-flight count,
//! latency estimate, outlier state, slow-start clock, smooth-WRR credit.
//!
//! The estimators here are pure and take `now` as an argument, so they are tested with
//! an injected clock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::OutlierConfig;

/// Peak-sensitive EWMA of response latency (as in Finagle and linkerd): a slower sample
/// is taken at once, faster ones are averaged in with time constant `tau`, so a backend
/// that turns slow loses traffic immediately and earns it back gradually.
#[derive(Debug, Clone)]
pub struct PeakEwma {
    value_ns: f64,
    stamp: Instant,
    tau_ns: f64,
}

impl PeakEwma {
    /// Starts at `initial` at time `now`.
    pub fn new(initial: Duration, tau: Duration, now: Instant) -> Self {
        PeakEwma {
            value_ns: initial.as_nanos() as f64,
            stamp: now,
            tau_ns: tau.as_nanos().max(1) as f64,
        }
    }

    /// Folds in one observed latency.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.value_ns {
            self.value_ns = rtt;
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
            let w = (-elapsed / self.tau_ns).exp();
            self.value_ns = self.value_ns * w + rtt * (1.0 - w);
        }
        self.stamp = self.stamp.max(now);
    }

    /// Current estimate in nanoseconds.
    pub fn get(&self) -> f64 {
        self.value_ns
    }

    /// The estimate faded by the time since the last observation (`e^(−age/tau)`): how
    /// slow the backend was *recently*. A backend passed over gets no observations, so
    /// without fading one slow response would keep it out for good.
    pub fn recent(&self, now: Instant, tau: Duration) -> f64 {
        let age = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.value_ns * (-age / tau.as_secs_f64().max(1e-9)).exp()
    }
}

/// Passive-health state of one backend. Pure: results and `now` in, decisions out.
#[derive(Debug, Clone, Default)]
pub struct Outlier {
    consecutive: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    probation: bool,
}

/// What a result did to the outlier state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutlierEvent {
    /// Ejected until the given time.
    Ejected(Instant),
    /// Would have been ejected, but it is the last available backend.
    KeptAsLast,
    /// Came back after a successful trial.
    Restored,
}

impl Outlier {
    /// Whether new requests may go to this backend at `now`. After an ejection ends,
    /// the backend is on probation: it gets traffic, and one failure re-ejects it.
    pub fn available(&self, now: Instant) -> bool {
        self.ejected_until.is_none_or(|until| now >= until)
    }

    /// Whether currently ejected.
    pub fn ejected(&self, now: Instant) -> bool {
        !self.available(now)
    }

    /// Records a request outcome. `others_available`: how many *other* backends could
    /// take traffic now — the last one is never ejected into an empty set.
    pub fn record(
        &mut self,
        ok: bool,
        now: Instant,
        others_available: usize,
        cfg: &OutlierConfig,
    ) -> Option<OutlierEvent> {
        if cfg.consecutive_failures == 0 {
            return None;
        }
        if ok {
            self.consecutive = 0;
            if self.probation && self.available(now) {
                self.probation = false;
                self.ejections = 0;
                self.ejected_until = None;
                return Some(OutlierEvent::Restored);
            }
            return None;
        }
        if !self.available(now) {
            return None; // a late result from before the ejection
        }
        self.consecutive += 1;
        let threshold = if self.probation {
            1
        } else {
            cfg.consecutive_failures
        };
        if self.consecutive < threshold {
            return None;
        }
        if others_available == 0 {
            return Some(OutlierEvent::KeptAsLast);
        }
        let factor = 2u32.saturating_pow(self.ejections.min(20));
        let length = cfg
            .base_ejection
            .saturating_mul(factor)
            .min(cfg.max_ejection);
        let until = now + length;
        self.ejections += 1;
        self.consecutive = 0;
        self.probation = true;
        self.ejected_until = Some(until);
        Some(OutlierEvent::Ejected(until))
    }
}

/// One backend of a listener.
#[derive(Debug)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    base_weight: AtomicU32,
    added_at: Instant,
    slow_start: Duration,
    in_flight: AtomicU64,
    ewma: Mutex<PeakEwma>,
    outlier: Mutex<Outlier>,
    /// Mirror of the outlier state for the hot path: ejected-until as nanoseconds since
    /// `added_at` (0 = not ejected), and whether any failure is pending (streak or
    /// probation), so successes and picks take no lock in the common case.
    ejected_until_ns: AtomicU64,
    outlier_dirty: std::sync::atomic::AtomicBool,
    /// Weight set by the feedback controller, as f64 bits (0 = none yet).
    dynamic_weight: AtomicU64,
    /// Smooth weighted round-robin credit (scheduler-owned).
    pub(crate) swrr_credit: AtomicI64,
    /// Requests sent.
    pub requests: AtomicU64,
    /// Requests finished (answered, failed or abandoned): what the backend got through,
    /// which at saturation is its capacity, where `requests` is what it was given.
    pub completed: AtomicU64,
    /// Requests that failed (connect error, 5xx, timeout).
    pub failures: AtomicU64,
    /// Times ejected.
    pub ejections: AtomicU64,
    /// Response-time histogram (time to response headers).
    pub latency: Histogram,
    /// Idle upstream HTTP connections.
    pub(crate) pool: crate::pool::Pool,
    /// Set once the backend has left the listener's set (see [`Backend::retire`]).
    retired: std::sync::atomic::AtomicBool,
    retired_signal: tokio::sync::Notify,
    /// When the backend last made progress while busy (ns since `added_at`): a request
    /// started on an idle backend, or a response arrived. With requests in flight, the
    /// time since is how long it has been stuck on one (see [`Backend::stalled_ns`]).
    progress_ns: AtomicU64,
}

/// Upper bounds of the latency histogram buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A lock-free fixed-bucket histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one sample.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative bucket counts, total count and sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        (
            cumulative,
            self.count.load(Ordering::Relaxed),
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

/// Latency estimate of a backend before its first response.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Time constant of the latency EWMA.
pub const EWMA_TAU: Duration = Duration::from_secs(2);

impl Backend {
    /// A backend first seen at `now`; it ramps up over `slow_start`.
    pub fn new(addr: SocketAddr, weight: u32, slow_start: Duration, now: Instant) -> Arc<Self> {
        Arc::new(Backend {
            addr,
            base_weight: AtomicU32::new(weight.max(1)),
            added_at: now,
            slow_start,
            in_flight: AtomicU64::new(0),
            ewma: Mutex::new(PeakEwma::new(DEFAULT_RTT, EWMA_TAU, now)),
            outlier: Mutex::new(Outlier::default()),
            ejected_until_ns: AtomicU64::new(0),
            outlier_dirty: std::sync::atomic::AtomicBool::new(false),
            swrr_credit: AtomicI64::new(0),
            dynamic_weight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            latency: Histogram::default(),
            pool: crate::pool::Pool::default(),
            retired: std::sync::atomic::AtomicBool::new(false),
            retired_signal: tokio::sync::Notify::new(),
            progress_ns: AtomicU64::new(0),
        })
    }

    /// Static weight (from config or registry; later from the feedback controller).
    pub fn base_weight(&self) -> u32 {
        self.base_weight.load(Ordering::Relaxed)
    }

    /// Changes the static weight (registry update).
    pub fn set_base_weight(&self, w: u32) {
        self.base_weight.store(w.max(1), Ordering::Relaxed);
    }

    /// The feedback controller's weight, if it has set one.
    pub fn dynamic_weight(&self) -> Option<f64> {
        let bits = self.dynamic_weight.load(Ordering::Relaxed);
        (bits != 0).then(|| f64::from_bits(bits))
    }

    /// Sets the feedback weight (positive).
    pub fn set_dynamic_weight(&self, w: f64) {
        if w.is_finite() && w > 0.0 {
            self.dynamic_weight.store(w.to_bits(), Ordering::Relaxed);
        }
    }

    /// Slow-start factor in (0, 1]: linear ramp from 5 % over `slow_start`.
    pub fn ramp(&self, now: Instant) -> f64 {
        if self.slow_start.is_zero() {
            return 1.0;
        }
        let f = now.saturating_duration_since(self.added_at).as_secs_f64()
            / self.slow_start.as_secs_f64();
        f.clamp(0.05, 1.0)
    }

    /// Whether the backend is still ramping at `now`.
    pub fn ramping(&self, now: Instant) -> bool {
        !self.slow_start.is_zero() && now.saturating_duration_since(self.added_at) < self.slow_start
    }

    /// Weight in force: static weight × slow-start ramp.
    pub fn effective_weight(&self, now: Instant) -> f64 {
        self.base_weight() as f64 * self.ramp(now)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Current latency estimate, nanoseconds.
    pub fn ewma_ns(&self) -> f64 {
        self.ewma.lock().unwrap_or_else(|p| p.into_inner()).get()
    }

    /// Latency estimate faded by the time since the last response (see
    /// [`PeakEwma::recent`]), nanoseconds.
    pub fn recent_latency_ns(&self, now: Instant, tau: Duration) -> f64 {
        self.ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recent(now, tau)
    }

    /// Whether new requests may go here at `now`.
    pub fn available(&self, now: Instant) -> bool {
        // Lock-free mirror of the outlier state: picks happen on every request.
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        until == 0 || now.saturating_duration_since(self.added_at).as_nanos() as u64 >= until
    }

    /// Marks a request started; the guard ends it.
    pub fn start(self: &Arc<Self>) -> InFlight {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) == 0 {
            // Idle until now: the silence before this request says nothing.
            self.mark_progress(Instant::now());
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            backend: self.clone(),
        }
    }

    fn mark_progress(&self, now: Instant) {
        let at = now.saturating_duration_since(self.added_at).as_nanos() as u64;
        self.progress_ns.fetch_max(at, Ordering::Relaxed);
    }

    /// How long the backend has had requests in flight without answering any (0 when
    /// idle): a lower bound on the wait of a request sent to it now. A first-in-first-out
    /// backend busy with one long request answers nothing for that long, and its latency
    /// estimate, fed only by answers, cannot show it.
    pub fn stalled_ns(&self, now: Instant) -> f64 {
        if self.in_flight() == 0 {
            return 0.0;
        }
        let at = now.saturating_duration_since(self.added_at).as_nanos() as u64;
        at.saturating_sub(self.progress_ns.load(Ordering::Relaxed)) as f64
    }

    /// Records the latency of a response (time to headers).
    pub fn observe_latency(&self, rtt: Duration, now: Instant) {
        self.mark_progress(now);
        self.latency.observe(rtt);
        self.ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(rtt, now);
    }

    /// Records a success; free unless a failure streak or probation is pending.
    pub fn record_success(&self, now: Instant, cfg: &OutlierConfig) {
        if self.outlier_dirty.load(Ordering::Relaxed) {
            self.record(true, now, 0, cfg);
        }
    }

    /// Records an outcome for outlier detection.
    pub fn record(
        &self,
        ok: bool,
        now: Instant,
        others_available: usize,
        cfg: &OutlierConfig,
    ) -> Option<OutlierEvent> {
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let ev = {
            let mut o = self.outlier.lock().unwrap_or_else(|p| p.into_inner());
            let ev = o.record(ok, now, others_available, cfg);
            let until = o
                .ejected_until
                .map(|u| u.saturating_duration_since(self.added_at).as_nanos().max(1) as u64)
                .unwrap_or(0);
            self.ejected_until_ns.store(until, Ordering::Relaxed);
            self.outlier_dirty
                .store(o.consecutive > 0 || o.probation, Ordering::Relaxed);
            ev
        };
        match ev {
            Some(OutlierEvent::Ejected(until)) => {
                self.ejections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(backend = %self.addr, for_ms = until.saturating_duration_since(now).as_millis() as u64, "backend ejected");
            }
            Some(OutlierEvent::Restored) => {
                tracing::info!(backend = %self.addr, "backend restored after a successful trial")
            }
            Some(OutlierEvent::KeptAsLast) => {
                tracing::warn!(backend = %self.addr, "failing, but kept: it is the last available backend")
            }
            None => {}
        }
        ev
    }

    /// Whether ejected at `now`.
    pub fn ejected(&self, now: Instant) -> bool {
        !self.available(now)
    }

    /// Marks the backend as gone from the listener's set (deregistered, failed its
    /// checks, or its host's lease lapsed); wakes every [`Backend::retired_for`].
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        self.retired_signal.notify_waiters();
    }

    /// Completes `grace` after the backend left the set (never while it is in it).
    pub async fn retired_for(&self, grace: Duration) {
        loop {
            let signal = self.retired_signal.notified();
            tokio::pin!(signal);
            // Registered before the flag is read, so a retire in between still wakes us.
            signal.as_mut().enable();
            if self.retired.load(Ordering::SeqCst) {
                break;
            }
            signal.await;
        }
        tokio::time::sleep(grace).await;
    }
}

/// Decrements the in-flight count when dropped (request finished, failed or abandoned).
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<Backend>,
}

impl InFlight {
    /// The backend.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.backend.completed.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(5),
        }
    }

    #[test]
    fn peak_ewma_takes_peaks_and_decays_slowly() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(Duration::from_millis(1), Duration::from_secs(1), t0);
        e.observe(Duration::from_millis(50), t0);
        assert_eq!(e.get(), 50e6, "a peak is taken at once");
        e.observe(Duration::from_millis(10), t0 + Duration::from_millis(100));
        assert!(
            e.get() > 40e6,
            "one fast sample barely moves it: {}",
            e.get()
        );
        e.observe(Duration::from_millis(10), t0 + Duration::from_secs(10));
        assert!(
            (e.get() - 10e6).abs() < 1e5,
            "after many taus it converges: {}",
            e.get()
        );
    }

    #[test]
    fn ejection_grows_and_trial_restores() {
        let c = cfg();
        let t0 = Instant::now();
        let mut o = Outlier::default();
        assert_eq!(o.record(false, t0, 2, &c), None);
        assert_eq!(o.record(false, t0, 2, &c), None);
        assert_eq!(
            o.record(true, t0, 2, &c),
            None,
            "a success resets the streak"
        );
        for _ in 0..2 {
            o.record(false, t0, 2, &c);
        }
        assert_eq!(
            o.record(false, t0, 2, &c),
            Some(OutlierEvent::Ejected(t0 + Duration::from_secs(1)))
        );
        assert!(!o.available(t0 + Duration::from_millis(999)));
        // Probation: one failure re-ejects, twice as long.
        let t1 = t0 + Duration::from_secs(1);
        assert!(o.available(t1));
        assert_eq!(
            o.record(false, t1, 2, &c),
            Some(OutlierEvent::Ejected(t1 + Duration::from_secs(2)))
        );
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(o.record(true, t2, 2, &c), Some(OutlierEvent::Restored));
        // Fully restored: back to needing 3 failures and the base length.
        assert_eq!(o.record(false, t2, 2, &c), None);
    }

    #[test]
    fn ejection_is_capped_and_last_backend_is_kept() {
        let c = cfg();
        let mut now = Instant::now();
        let mut o = Outlier::default();
        for _ in 0..3 {
            o.record(false, now, 1, &c);
        }
        for _ in 0..10 {
            now += Duration::from_secs(60);
            match o.record(false, now, 1, &c) {
                Some(OutlierEvent::Ejected(until)) => {
                    assert!(until - now <= Duration::from_secs(5))
                }
                other => panic!("{other:?}"),
            }
        }
        let mut last = Outlier::default();
        for _ in 0..2 {
            last.record(false, now, 0, &c);
        }
        assert_eq!(
            last.record(false, now, 0, &c),
            Some(OutlierEvent::KeptAsLast)
        );
        assert!(last.available(now));
    }

    #[test]
    fn slow_start_ramps_linearly_from_five_percent() {
        let t0 = Instant::now();
        let b = Backend::new(
            "127.0.0.1:1".parse().unwrap(),
            200,
            Duration::from_secs(10),
            t0,
        );
        assert_eq!(b.effective_weight(t0), 10.0);
        assert_eq!(b.effective_weight(t0 + Duration::from_secs(5)), 100.0);
        assert_eq!(b.effective_weight(t0 + Duration::from_secs(20)), 200.0);
        assert!(b.ramping(t0 + Duration::from_secs(9)) && !b.ramping(t0 + Duration::from_secs(10)));
    }
}
