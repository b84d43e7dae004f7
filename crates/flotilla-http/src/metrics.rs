//! `/metrics` in the format the scraper asks for.
//!
//! The registry and the agent encode their metrics with `prometheus-client`, which
//! writes OpenMetrics text. Prometheus asks for that (its `Accept` names
//! `application/openmetrics-text`) and gets it; anything else — `promtool check
//! metrics`, `curl`, older scrapers — gets the Prometheus text format 0.0.4, which
//! differs in the family names of counters (`x_total` there, `x` in OpenMetrics), has no
//! `# UNIT` or `# EOF` lines and no exemplars.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method (one of a fixed set, else `other`).
    pub method: String,
    /// Status code of the answer.
    pub code: u16,
}

/// Labels of the request-duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// HTTP method (one of a fixed set, else `other`).
    pub method: String,
}

fn duration_histogram() -> Histogram {
    // 0.25 ms .. ~4 s: a catalog read answers in well under a millisecond, a write
    // waits for its group commit, a restore's answer for the health gate.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

/// Requests an API served: a counter by method and code, and the time to the answer's
/// head by method. Blocking queries (`?index=`, long polls that wait for a change on
/// purpose) are counted, not timed: their duration is the client's `wait`.
#[derive(Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
        }
    }
}

impl RequestMetrics {
    /// Registers `http_requests` and `http_request_duration_seconds` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_requests",
            "HTTP requests served, by method and status code",
            self.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request to its answer's head (blocking queries are not timed)",
            self.duration.clone(),
        );
    }

    /// Records one request.
    pub fn observe(&self, method: &Method, code: u16, seconds: Option<f64>) {
        let method = method_label(method).to_owned();
        self.requests
            .get_or_create(&RequestLabels {
                method: method.clone(),
                code,
            })
            .inc();
        if let Some(s) = seconds {
            self.duration
                .get_or_create(&MethodLabels { method })
                .observe(s);
        }
    }
}

/// Middleware recording every request in `metrics`.
pub async fn record(State(metrics): State<RequestMetrics>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let blocking = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("index=")));
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let seconds = (!blocking).then(|| t0.elapsed().as_secs_f64());
    metrics.observe(&method, resp.status().as_u16(), seconds);
    resp
}

/// The method label: one of a fixed set, so a client sending made-up methods cannot
/// grow the metrics without bound.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// OpenMetrics' content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Answers `openmetrics` (OpenMetrics text) as the request's `Accept` asks.
pub fn exposition(request: &HeaderMap, openmetrics: String) -> Response {
    let wants_openmetrics = request
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (body, kind) = if wants_openmetrics {
        (openmetrics, OPENMETRICS)
    } else {
        (to_prometheus_text(&openmetrics), PROMETHEUS_TEXT)
    };
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(kind))],
        body,
    )
        .into_response()
}

/// The same metrics in the Prometheus text format 0.0.4.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP comes before TYPE in a family; the name it is written under depends on the type.
    let mut help: Option<(&str, &str)> = None;
    // The current family's name and type, to drop the samples 0.0.4 has no place for.
    let mut family: (&str, &str) = ("", "");
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            family = (name, kind);
            let (written, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "stateset" => (name.to_owned(), "gauge"),
                "gaugehistogram" => (name.to_owned(), "histogram"),
                "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some((_, text)) = help.take().filter(|(n, _)| *n == name) {
                out.push_str(&format!("# HELP {written} {text}\n"));
            }
            out.push_str(&format!("# TYPE {written} {kind}\n"));
            continue;
        }
        if line.starts_with('#') {
            // `# UNIT`, `# EOF`: not in 0.0.4.
            continue;
        }
        let sample = line.split_once(" # ").map_or(line, |(s, _)| s);
        let name = sample.split(['{', ' ']).next().unwrap_or_default();
        if family.1 == "counter" && name == format!("{}_created", family.0) {
            continue;
        }
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "# HELP http_requests HTTP requests served.\n# TYPE http_requests counter\nhttp_requests_total{method=\"GET\",code=\"200\"} 3 # {trace_id=\"a\"} 1.0\nhttp_requests_created{method=\"GET\",code=\"200\"} 1700000000.0\n# HELP nodes Nodes holding a lease.\n# TYPE nodes gauge\nnodes 2\n# HELP build Build information.\n# TYPE build info\nbuild_info{version=\"0.1.0\"} 1\n# HELP request_seconds Time to answer.\n# TYPE request_seconds histogram\n# UNIT request_seconds seconds\nrequest_seconds_sum 0.5\nrequest_seconds_count 2\nrequest_seconds_bucket{le=\"+Inf\"} 2\n# EOF\n";

    #[test]
    fn counters_are_named_with_total_and_what_0_0_4_lacks_goes() {
        let text = to_prometheus_text(OM);
        assert!(text.contains("# HELP http_requests_total HTTP requests served.\n# TYPE http_requests_total counter\nhttp_requests_total{method=\"GET\",code=\"200\"} 3\n"), "{text}");
        assert!(!text.contains("_created"), "{text}");
        assert!(
            text.contains("# TYPE build_info gauge\nbuild_info{version=\"0.1.0\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE request_seconds histogram\nrequest_seconds_sum 0.5\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF") && !text.contains("# UNIT") && !text.contains("trace_id"));
        assert!(text.contains("# HELP nodes Nodes holding a lease.\n# TYPE nodes gauge\nnodes 2\n"));
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        let mut h = HeaderMap::new();
        let r = exposition(&h, OM.into());
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROMETHEUS_TEXT);
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            ),
        );
        let r = exposition(&h, OM.into());
        assert_eq!(r.headers()[header::CONTENT_TYPE], OPENMETRICS);
    }
}
