//! The admin listener: Prometheus `/metrics` and a JSON `/status` for the dashboard.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, LATENCY_BUCKETS};
use crate::listener::Listener;

/// Status of one backend.
#[derive(Debug, Serialize)]
pub struct BackendStatus {
    /// Address.
    pub addr: String,
    /// Static weight.
    pub weight: u32,
    /// Weight in force (slow start applied).
    pub effective_weight: f64,
    /// Weight set by the feedback controller, if any.
    pub feedback_weight: Option<f64>,
    /// Requests in flight.
    pub in_flight: u64,
    /// Requests sent.
    pub requests: u64,
    /// Failed requests.
    pub failures: u64,
    /// Times ejected.
    pub ejections: u64,
    /// Ejected right now.
    pub ejected: bool,
    /// Removed from the set, finishing its requests.
    pub draining: bool,
    /// Latency estimate (peak EWMA), ms.
    pub ewma_ms: f64,
}

/// Status of one listener.
#[derive(Debug, Serialize)]
pub struct ListenerStatus {
    /// Name.
    pub name: String,
    /// Bind address.
    pub bind: String,
    /// http or tcp.
    pub protocol: String,
    /// Scheduler name.
    pub scheduler: String,
    /// Followed service.
    pub service: Option<String>,
    /// Backends (current and draining).
    pub backends: Vec<BackendStatus>,
}

fn backend_status(b: &Backend, now: Instant, draining: bool) -> BackendStatus {
    BackendStatus {
        addr: b.addr.to_string(),
        weight: b.base_weight(),
        effective_weight: b.effective_weight(now),
        feedback_weight: b.dynamic_weight(),
        in_flight: b.in_flight(),
        requests: b.requests.load(std::sync::atomic::Ordering::Relaxed),
        failures: b.failures.load(std::sync::atomic::Ordering::Relaxed),
        ejections: b.ejections.load(std::sync::atomic::Ordering::Relaxed),
        ejected: b.ejected(now),
        draining,
        ewma_ms: b.ewma_ns() / 1e6,
    }
}

/// Status of every listener.
pub fn status(listeners: &[Arc<Listener>]) -> Vec<ListenerStatus> {
    let now = Instant::now();
    listeners
        .iter()
        .map(|l| {
            let mut backends: Vec<BackendStatus> = l
                .backends()
                .iter()
                .map(|b| backend_status(b, now, false))
                .collect();
            backends.extend(l.draining().iter().map(|b| backend_status(b, now, true)));
            ListenerStatus {
                name: l.cfg.name.clone(),
                bind: l.cfg.bind.to_string(),
                protocol: format!("{:?}", l.cfg.protocol).to_lowercase(),
                scheduler: l.scheduler.name().to_owned(),
                service: l.cfg.service.clone(),
                backends,
            }
        })
        .collect()
}

/// Prometheus text exposition of every listener's backends.
pub fn metrics(listeners: &[Arc<Listener>]) -> String {
    let now = Instant::now();
    let mut out = String::new();
    let families: [(&str, &str, &str); 7] = [
        (
            "flotilla_lb_requests_total",
            "counter",
            "Requests sent to the backend",
        ),
        (
            "flotilla_lb_failures_total",
            "counter",
            "Requests that failed (connect error, 5xx, timeout)",
        ),
        (
            "flotilla_lb_ejections_total",
            "counter",
            "Outlier ejections of the backend",
        ),
        ("flotilla_lb_in_flight", "gauge", "Requests in flight"),
        (
            "flotilla_lb_weight",
            "gauge",
            "Weight in force (slow start applied)",
        ),
        (
            "flotilla_lb_ejected",
            "gauge",
            "1 while the backend is ejected",
        ),
        (
            "flotilla_lb_latency_ewma_seconds",
            "gauge",
            "Peak-EWMA latency estimate",
        ),
    ];
    for (name, kind, help) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for l in listeners {
            for b in l.backends().iter() {
                let v = match name {
                    "flotilla_lb_requests_total" => {
                        b.requests.load(std::sync::atomic::Ordering::Relaxed) as f64
                    }
                    "flotilla_lb_failures_total" => {
                        b.failures.load(std::sync::atomic::Ordering::Relaxed) as f64
                    }
                    "flotilla_lb_ejections_total" => {
                        b.ejections.load(std::sync::atomic::Ordering::Relaxed) as f64
                    }
                    "flotilla_lb_in_flight" => b.in_flight() as f64,
                    "flotilla_lb_weight" => b.effective_weight(now),
                    "flotilla_lb_ejected" => b.ejected(now) as u8 as f64,
                    _ => b.ewma_ns() / 1e9,
                };
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\",backend=\"{}\"}} {v}",
                    l.cfg.name, b.addr
                );
            }
        }
    }
    listener_metrics(&mut out, listeners);
    let name = "flotilla_lb_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time to response headers\n# TYPE {name} histogram"
    );
    for l in listeners {
        for b in l.backends().iter() {
            let (cumulative, count, sum) = b.latency.snapshot();
            let labels = format!("listener=\"{}\",backend=\"{}\"", l.cfg.name, b.addr);
            for (le, c) in LATENCY_BUCKETS.iter().zip(cumulative) {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {c}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}\n{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {count}");
        }
    }
    out
}

/// Each listener's traffic: connections, bytes from and to clients, responses by class.
fn listener_metrics(out: &mut String, listeners: &[Arc<Listener>]) {
    use std::sync::atomic::Ordering::Relaxed;
    let families: [(&str, &str, &str); 4] = [
        (
            "flotilla_lb_connections_total",
            "counter",
            "Client connections accepted",
        ),
        (
            "flotilla_lb_open_connections",
            "gauge",
            "Client connections open now",
        ),
        (
            "flotilla_lb_received_bytes_total",
            "counter",
            "Bytes received from clients (TCP listeners: counted when a session ends)",
        ),
        (
            "flotilla_lb_sent_bytes_total",
            "counter",
            "Bytes sent to clients (TCP listeners: counted when a session ends)",
        ),
    ];
    for (name, kind, help) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for l in listeners {
            let st = &l.stats;
            let v = match name {
                "flotilla_lb_connections_total" => st.connections.load(Relaxed) as i64,
                "flotilla_lb_open_connections" => st.open.load(Relaxed),
                "flotilla_lb_received_bytes_total" => st.bytes_in.load(Relaxed) as i64,
                _ => st.bytes_out.load(Relaxed) as i64,
            };
            let _ = writeln!(out, "{name}{{listener=\"{}\"}} {v}", l.cfg.name);
        }
    }
    let name = "flotilla_lb_responses_total";
    let _ = writeln!(
        out,
        "# HELP {name} HTTP responses sent to clients, by status class (the lb's own errors included)\n# TYPE {name} counter"
    );
    for l in listeners {
        for (class, n) in crate::stats::CLASSES.iter().zip(&l.stats.responses) {
            let _ = writeln!(
                out,
                "{name}{{listener=\"{}\",code=\"{class}\"}} {}",
                l.cfg.name,
                n.load(Relaxed)
            );
        }
    }
}

/// The VRRP router's part of `/metrics`.
pub fn ha_metrics(ha: Option<&flotilla_ha::router::Status>) -> String {
    let Some(s) = ha else {
        return String::new();
    };
    let mut out = String::new();
    out.push_str("# HELP flotilla_ha_state VRRP state (1 for the current one).\n# TYPE flotilla_ha_state gauge\n");
    for st in ["init", "backup", "master", "fault"] {
        let v = u8::from(s.state.name() == st);
        let _ = writeln!(out, "flotilla_ha_state{{state=\"{st}\"}} {v}");
    }
    let _ = writeln!(out, "# HELP flotilla_ha_priority Effective VRRP priority.\n# TYPE flotilla_ha_priority gauge\nflotilla_ha_priority {}", s.priority);
    let _ = writeln!(out, "# HELP flotilla_ha_transitions_total VRRP state changes.\n# TYPE flotilla_ha_transitions_total counter\nflotilla_ha_transitions_total {}", s.transitions);
    let _ = writeln!(out, "# HELP flotilla_ha_adverts_sent_total Adverts sent.\n# TYPE flotilla_ha_adverts_sent_total counter\nflotilla_ha_adverts_sent_total {}", s.adverts_sent);
    let _ = writeln!(out, "# HELP flotilla_ha_adverts_received_total Valid adverts received.\n# TYPE flotilla_ha_adverts_received_total counter\nflotilla_ha_adverts_received_total {}", s.adverts_received);
    out.push_str("# HELP flotilla_ha_dropped_total Packets dropped, by reason.\n# TYPE flotilla_ha_dropped_total counter\n");
    for (reason, n) in &s.dropped {
        let _ = writeln!(out, "flotilla_ha_dropped_total{{reason=\"{reason}\"}} {n}");
    }
    out
}

/// Serves `/metrics` and `/status` on `listener`.
pub async fn serve(
    tcp: tokio::net::TcpListener,
    listeners: Arc<Vec<Arc<Listener>>>,
    ha: Option<Arc<flotilla_ha::router::Router>>,
) {
    use http_body_util::Full;
    use hyper::{Response, StatusCode};
    loop {
        let stream = match tcp.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: pause instead of spinning on the error.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let listeners = listeners.clone();
        let ha = ha.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let listeners = listeners.clone();
                    let ha = ha.as_ref().map(|r| r.status());
                    async move {
                        let (status, ctype, body) = match req.uri().path() {
                            "/metrics" => (
                                StatusCode::OK,
                                "text/plain; version=0.0.4",
                                metrics(&listeners) + &ha_metrics(ha.as_ref()),
                            ),
                            "/status" => (
                                StatusCode::OK,
                                "application/json",
                                serde_json::to_string_pretty(&serde_json::json!({
                                    "listeners": status(&listeners),
                                    "ha": ha,
                                }))
                                .unwrap_or_default(),
                            ),
                            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
                            _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                        };
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", ctype)
                                .body(Full::new(bytes::Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
