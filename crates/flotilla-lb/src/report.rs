//! The lb's report to the registry (`PUT /v1/lbs/NAME`): its VRRP state, priority,
//! virtual IPs and latest state changes, and each listener's request and failure rates
//! and p99 over the last sampling period (`[registry] report`) — what the dashboard's
//! lb page and each service's page show. Every report is a store write, so one goes
//! only when something moved past a dead band ([`worth_sending`]) or [`HEARTBEAT`]
//! passed: a steady lb costs the store one write per heartbeat, not one per sample.
//! The arithmetic over counter snapshots is pure ([`window`]); the loop only samples,
//! decides and sends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_core::{LbHa, LbListenerReport, LbReport, LbTransition};

use crate::backend::{Backend, LATENCY_BUCKETS};
use crate::listener::Listener;

/// A backend's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Requests sent.
    pub requests: u64,
    /// Requests failed.
    pub failures: u64,
    /// Cumulative latency bucket counts (as [`crate::backend::Histogram::snapshot`]).
    pub buckets: Vec<u64>,
}

impl Counters {
    fn of(b: &Backend) -> Counters {
        Counters {
            requests: b.requests.load(std::sync::atomic::Ordering::Relaxed),
            failures: b.failures.load(std::sync::atomic::Ordering::Relaxed),
            buckets: b.latency.snapshot().0,
        }
    }
}

/// What a listener did between two snapshots of its backends.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Window {
    /// Requests sent to backends per second.
    pub requests_per_s: f64,
    /// Failed requests per second.
    pub failures_per_s: f64,
    /// The listener's p99, ms (bucket bound); `None` without responses.
    pub p99_ms: Option<f64>,
    /// Each backend's p99, ms, for the backends that answered in the window.
    pub backend_p99_ms: std::collections::BTreeMap<String, f64>,
}

/// Rates and p99 between two snapshots of a listener's backends (by address) taken
/// `seconds` apart: requests/s, failures/s, and the upper bound (ms) of the latency
/// bucket holding the 99th percentile of the responses in between (`None` if none; the
/// last bound if it lies beyond the last bucket), for the listener and per backend. A
/// backend absent from `before` counts from zero (it joined); one absent from `after`
/// is left out (it left).
pub fn window(
    before: &HashMap<String, Counters>,
    after: &HashMap<String, Counters>,
    seconds: f64,
) -> Window {
    let zero = Counters::default();
    let (mut requests, mut failures) = (0u64, 0u64);
    let mut per_bucket = vec![0u64; LATENCY_BUCKETS.len()];
    let mut backend_p99_ms = std::collections::BTreeMap::new();
    for (addr, now) in after {
        let then = before.get(addr).unwrap_or(&zero);
        requests += now.requests.saturating_sub(then.requests);
        failures += now.failures.saturating_sub(then.failures);
        // Cumulative counts to per-bucket deltas.
        let mut own = vec![0u64; LATENCY_BUCKETS.len()];
        let mut prev_now = 0;
        let mut prev_then = 0;
        for (i, slot) in own.iter_mut().enumerate() {
            let c_now = now.buckets.get(i).copied().unwrap_or(prev_now);
            let c_then = then.buckets.get(i).copied().unwrap_or(prev_then);
            *slot = c_now
                .saturating_sub(prev_now)
                .saturating_sub(c_then.saturating_sub(prev_then));
            prev_now = c_now;
            prev_then = c_then;
        }
        for (sum, n) in per_bucket.iter_mut().zip(&own) {
            *sum += n;
        }
        if let Some(p99) = p99_of(&own) {
            backend_p99_ms.insert(addr.clone(), p99);
        }
    }
    let seconds = seconds.max(1e-3);
    Window {
        requests_per_s: requests as f64 / seconds,
        failures_per_s: failures as f64 / seconds,
        p99_ms: p99_of(&per_bucket),
        backend_p99_ms,
    }
}

/// The upper bound (ms) of the bucket holding the 99th percentile of per-bucket counts.
fn p99_of(per_bucket: &[u64]) -> Option<f64> {
    let total: u64 = per_bucket.iter().sum();
    (total > 0).then(|| {
        let want = (total as f64 * 0.99).ceil() as u64;
        let mut acc = 0;
        for (i, n) in per_bucket.iter().enumerate() {
            acc += n;
            if acc >= want {
                return LATENCY_BUCKETS[i] * 1e3;
            }
        }
        LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1] * 1e3
    })
}

/// The longest time between two reports (readers call a report older than three of
/// these stale).
pub const HEARTBEAT: Duration = Duration::from_secs(30);

/// Whether `next` differs from the last report sent enough to be worth a store write:
/// any VRRP change, a listener's backend count or p99 bucket, or a rate that moved by
/// more than 20 % (and more than 1 per second); else only once `since` reaches
/// `heartbeat`.
pub fn worth_sending(
    last: Option<&LbReport>,
    next: &LbReport,
    since: Duration,
    heartbeat: Duration,
) -> bool {
    let Some(last) = last else { return true };
    if since >= heartbeat || last.ha != next.ha || last.listeners.len() != next.listeners.len() {
        return true;
    }
    let moved = |a: f64, b: f64| (a - b).abs() > 1.0 && (a - b).abs() > 0.2 * a.max(b);
    last.listeners.iter().zip(&next.listeners).any(|(a, b)| {
        a.backends != b.backends
            || a.p99_ms != b.p99_ms
            || moved(a.requests_per_s, b.requests_per_s)
            || moved(a.failures_per_s, b.failures_per_s)
    })
}

fn snapshot(l: &Listener) -> HashMap<String, Counters> {
    l.backends()
        .iter()
        .cloned()
        .chain(l.draining())
        .map(|b| (b.addr.to_string(), Counters::of(&b)))
        .collect()
}

/// The VRRP part of the report.
fn ha_of(router: &flotilla_ha::router::Router, vips: &[String]) -> LbHa {
    let s = router.status();
    LbHa {
        state: s.state.name().to_owned(),
        priority: s.priority,
        master: s.master.map(|m| m.to_string()),
        vips: vips.to_vec(),
        transitions: s.transitions,
        history: s
            .history
            .iter()
            .map(|t| LbTransition {
                at_ms: t.at_ms,
                from: t.from.name().to_owned(),
                to: t.to.name().to_owned(),
                reason: t.reason.chars().take(256).collect(),
            })
            .collect(),
    }
}

/// Reports every `period` until the task is aborted. A failed report is logged and the
/// next one tried: the registry being away must not touch the traffic.
pub async fn report_loop(
    client: flotilla_client::Client,
    name: String,
    period: Duration,
    listeners: Arc<Vec<Arc<Listener>>>,
    ha: Option<(Arc<flotilla_ha::router::Router>, Vec<String>)>,
) {
    let mut before: Vec<HashMap<String, Counters>> =
        listeners.iter().map(|l| snapshot(l)).collect();
    let mut at = Instant::now();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut failing = false;
    let heartbeat = HEARTBEAT.max(period);
    let mut last: Option<(LbReport, Instant)> = None;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let seconds = now.duration_since(at).as_secs_f64();
        let after: Vec<HashMap<String, Counters>> = listeners.iter().map(|l| snapshot(l)).collect();
        let reports = listeners
            .iter()
            .zip(before.iter().zip(&after))
            .map(|(l, (b, a))| {
                let w = window(b, a, seconds);
                LbListenerReport {
                    name: l.cfg.name.clone(),
                    service: l.cfg.service.clone(),
                    requests_per_s: w.requests_per_s,
                    failures_per_s: w.failures_per_s,
                    p99_ms: w.p99_ms,
                    backends: l.backends().len() as u32,
                    backend_p99_ms: w.backend_p99_ms,
                }
            })
            .collect();
        (before, at) = (after, now);
        let report = LbReport {
            v: flotilla_core::RECORD_VERSION,
            period_ms: heartbeat.as_millis() as u64,
            ha: ha.as_ref().map(|(r, vips)| ha_of(r, vips)),
            listeners: reports,
            at_ms: 0,
        };
        let since = last.as_ref().map_or(heartbeat, |(_, at)| at.elapsed());
        if !worth_sending(last.as_ref().map(|(r, _)| r), &report, since, heartbeat) {
            continue;
        }
        match client.report_lb(&name, &report).await {
            Ok(_) => {
                if failing {
                    tracing::info!(lb = name, "reporting to the registry again");
                }
                failing = false;
                last = Some((report, Instant::now()));
            }
            Err(e) if !failing => {
                tracing::warn!(lb = name, error = %e, "lb report failed; retrying each period");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(requests: u64, failures: u64, per_bucket: &[u64]) -> Counters {
        let mut acc = 0;
        let mut buckets: Vec<u64> = per_bucket
            .iter()
            .map(|n| {
                acc += n;
                acc
            })
            .collect();
        buckets.resize(LATENCY_BUCKETS.len(), acc);
        Counters {
            requests,
            failures,
            buckets,
        }
    }

    #[test]
    fn a_report_goes_on_a_real_change_or_the_heartbeat_only() {
        let hb = Duration::from_secs(30);
        let report = |rps: f64, p99: Option<f64>| LbReport {
            v: 1,
            period_ms: 30_000,
            ha: None,
            listeners: vec![LbListenerReport {
                name: "web".into(),
                service: Some("web".into()),
                requests_per_s: rps,
                failures_per_s: 0.0,
                p99_ms: p99,
                backends: 2,
                backend_p99_ms: Default::default(),
            }],
            at_ms: 0,
        };
        let s = Duration::from_secs(2);
        let base = report(100.0, Some(5.0));
        assert!(worth_sending(None, &base, s, hb));
        assert!(
            !worth_sending(Some(&base), &report(110.0, Some(5.0)), s, hb),
            "10 %: noise"
        );
        assert!(
            worth_sending(Some(&base), &report(130.0, Some(5.0)), s, hb),
            "30 %"
        );
        assert!(
            worth_sending(Some(&base), &report(100.0, Some(10.0)), s, hb),
            "p99 bucket"
        );
        assert!(
            !worth_sending(Some(&report(0.5, None)), &report(1.2, None), s, hb),
            "< 1/s"
        );
        assert!(worth_sending(Some(&base), &base, hb, hb), "heartbeat");
        let mut more = base.clone();
        more.listeners[0].backends = 3;
        assert!(worth_sending(Some(&base), &more, s, hb));
    }

    #[test]
    fn rates_and_p99_come_from_the_window_only() {
        let before = HashMap::from([("a".to_owned(), c(100, 1, &[50, 50]))]);
        // 200 more requests on a: 198 fast (bucket 0: 0.5 ms), 2 slow (bucket 7: 100 ms);
        // b joined with 100, all at 1 ms.
        let mut slow = vec![248, 50, 0, 0, 0, 0, 0, 2];
        let after = HashMap::from([
            ("a".to_owned(), c(300, 3, &slow)),
            ("b".to_owned(), c(100, 0, &[0, 100])),
        ]);
        let w = window(&before, &after, 2.0);
        assert_eq!((w.requests_per_s, w.failures_per_s), (150.0, 1.0));
        // 300 responses: 198 at ≤0.5 ms, 100 at ≤1 ms, 2 at ≤100 ms; the 297th is ≤1 ms.
        assert_eq!(w.p99_ms, Some(1.0));
        // Per backend: a's 200 include 2 at ≤100 ms (its 198th is ≤0.5 ms); b's are ≤1 ms.
        assert_eq!(
            w.backend_p99_ms,
            [("a".to_owned(), 0.5), ("b".to_owned(), 1.0)].into()
        );
        // With 4 slow ones the 99th percentile falls in the slow bucket.
        slow[7] = 4;
        let after = HashMap::from([("a".to_owned(), c(300, 3, &slow))]);
        let w = window(&before, &after, 2.0);
        assert_eq!(w.p99_ms, Some(100.0));
        assert_eq!(w.backend_p99_ms["a"], 100.0);
        // No traffic: no p99, zero rates; a backend that left is not negative.
        assert_eq!(window(&before, &HashMap::new(), 2.0), Window::default());
    }
}
