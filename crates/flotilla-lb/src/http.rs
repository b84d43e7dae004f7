//! The L7 proxy: HTTP/1.1 and HTTP/2 from clients, pooled HTTP/1.1 to backends,
//! streaming bodies both ways, Upgrade/WebSocket tunnels, retries, clear errors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::backend::{Backend, InFlight};
use crate::config::HashKey;
use crate::listener::Listener;
use crate::scheduler::hash_key;
use crate::upstream::{BoxError, ExchangeError, UpstreamBody};

/// Body type used both ways through the proxy.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A 502/503/504 page: the status line's words, plus `detail` (which names backends)
/// only when the operator asked for verbose errors. The detail is always logged.
fn error_page(listener: &Listener, status: StatusCode, detail: String) -> Response<ProxyBody> {
    let head = format!(
        "{} {}",
        status.as_u16(),
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    );
    if listener.verbose_errors {
        text(status, format!("{head}: {detail}"))
    } else {
        tracing::debug!(
            listener = listener.cfg.name,
            status = status.as_u16(),
            detail,
            "error page"
        );
        text(status, head)
    }
}

fn text(status: StatusCode, msg: String) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("x-flotilla-error", status.as_u16())
        .body(
            Full::new(Bytes::from(msg + "\n"))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("static response")
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including any named in `Connection`; keeps `Upgrade`
/// (and `Connection: upgrade`) when `upgrade` is set.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Fast path: one pass over the (few) headers finds whether there is anything to
    // remove at all; most requests and responses carry no hop-by-hop header, and eight
    // hash lookups per message showed up in the profile.
    let any = headers
        .keys()
        .any(|k| HOP_BY_HOP.contains(k) || k == header::UPGRADE);
    if !any {
        return;
    }
    let protocol = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
    if let Some(p) = protocol {
        headers.insert(header::UPGRADE, p);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Requests that may be sent again after a reset: idempotent and without a body.
/// How long an idempotent request still waits for a backend that left the set before
/// it is sent to another: long enough for a draining backend's usual answer, short
/// next to a client's deadline (a lost host leaves the set after its lease TTL).
const RETIRED_GRACE: Duration = Duration::from_millis(500);

fn replayable(req: &Request<Incoming>) -> bool {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    idempotent && req.body().is_end_stream()
}

/// Hash key of a client address.
pub fn ip_key(peer: SocketAddr) -> u64 {
    match peer.ip() {
        std::net::IpAddr::V4(v4) => hash_key(&v4.octets()),
        std::net::IpAddr::V6(v6) => hash_key(&v6.octets()),
    }
}

/// Serves one accepted client connection.
pub async fn serve_connection<IO>(listener: Arc<Listener>, stream: IO, peer: SocketAddr, tls: bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let idle = listener.cfg.idle_timeout;
    let _open = listener.stats.connection();
    let stream = crate::stats::Counted::new(stream, listener.stats.clone());
    // The client's address as a header value, made once per connection, not per request.
    let ip = HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a valid header");
    let svc = hyper::service::service_fn(move |req| {
        let listener = listener.clone();
        let client = Client {
            addr: peer,
            ip: ip.clone(),
            tls,
        };
        async move {
            let stats = listener.stats.clone();
            let resp = proxy(listener, client, req).await;
            stats.response(resp.status().as_u16());
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Flattened writes: small responses go out in one plain write, not a writev.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .keep_alive(true)
        .writev(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(idle / 2))
        .keep_alive_timeout(idle);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Who sent a request.
#[derive(Debug, Clone)]
pub struct Client {
    /// The client's address.
    pub addr: SocketAddr,
    /// Its IP, ready for `X-Forwarded-For`.
    pub ip: HeaderValue,
    /// Whether it came over TLS.
    pub tls: bool,
}

/// Proxies one request.
pub async fn proxy(
    listener: Arc<Listener>,
    client: Client,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let (peer, tls) = (client.addr, client.tls);
    let cfg = &listener.cfg;
    let upgrade = wants_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let replay = replayable(&req);
    // Only the hash scheduler needs a key; skip hashing for the others.
    let key = match &listener.hash {
        None => 0,
        Some(HashKey::Header(h)) => req
            .headers()
            .get(h.as_str())
            .map(|v| hash_key(v.as_bytes()))
            .unwrap_or_else(|| ip_key(peer)),
        Some(HashKey::SourceIp) => ip_key(peer),
    };

    let (mut parts, body) = req.into_parts();
    let host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some(h) = host {
        parts.headers.insert(header::HOST, h);
    }
    // What a client says about where requests came from is kept only from a proxy the
    // listener trusts; from anyone else it is replaced by what the lb saw.
    let trusted = listener
        .trusted_proxies
        .iter()
        .any(|n| n.contains(peer.ip()));
    if !trusted {
        parts.headers.remove(header::FORWARDED);
        parts.headers.remove("x-real-ip");
    }
    let prev = parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let xff = match prev {
        Some(prev) if trusted => HeaderValue::from_str(&format!("{prev}, {}", peer.ip()))
            .expect("a valid header value and an IP are a valid header value"),
        _ => client.ip,
    };
    parts.headers.insert("x-forwarded-for", xff);
    parts.headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    let via = if parts.version == Version::HTTP_2 {
        "2 flotilla"
    } else {
        "1.1 flotilla"
    };
    parts
        .headers
        .append(header::VIA, HeaderValue::from_static(via));
    // Origin-form for the upstream HTTP/1.1 request.
    let path = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");

    let mut body = Some(body);
    // Retries are capped at 10 by config validation: a fixed array, no allocation.
    let mut tried = [SocketAddr::from(([0, 0, 0, 0], 0)); 11];
    let mut last_error: Option<Response<ProxyBody>> = None;
    let mut attempt = 0;
    let mut resend = false;
    while attempt <= cfg.retries as usize {
        let Some(backend) = listener.pick(key, &tried[..attempt]) else {
            break;
        };
        tried[attempt] = backend.addr;
        attempt += 1;
        // A request that must not be sent twice gets a connection known to be open, and
        // so does one retried after a stale connection (its neighbours are likely stale).
        let mut conn = match backend
            .pool
            .checkout(backend.addr, cfg.connect_timeout, !replay || resend)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                // Nothing of the request was sent: always safe to try another backend.
                backend.record(
                    false,
                    Instant::now(),
                    listener.others_available(backend.addr),
                    &cfg.outlier,
                );
                tracing::debug!(backend = %backend.addr, error = %e, "connect failed; trying another backend");
                last_error = Some(error_page(
                    &listener,
                    StatusCode::BAD_GATEWAY,
                    format!("backend {}: {e}", backend.addr),
                ));
                continue;
            }
        };
        // The body can be sent once; a replayable request has none, and a stale
        // connection proves nothing was sent.
        let req_body = body.take();
        if req_body.is_none() && !replay && !resend {
            break;
        }
        resend = false;
        let guard = backend.start();
        let started = Instant::now();
        let exchange = tokio::time::timeout(
            cfg.request_timeout,
            crate::upstream::exchange(&mut conn, &parts.method, path, &parts.headers, req_body),
        );
        // A request that may be sent twice and is still waiting for its answer when its
        // backend leaves the set (its host lost: the lease lapsed, so nothing answers
        // on the pooled connection it went out on) goes to another backend a grace
        // after: a draining backend has that long to answer before the retry.
        let exchanged = tokio::select! {
            r = exchange => r,
            _ = backend.retired_for(RETIRED_GRACE), if replay => {
                tracing::debug!(backend = %backend.addr, "backend left the set with the request unanswered; trying another");
                last_error = Some(error_page(
                    &listener,
                    StatusCode::BAD_GATEWAY,
                    format!("backend {} left the set before answering", backend.addr),
                ));
                continue;
            }
        };
        let now = Instant::now();
        let failed = |backend: &Arc<Backend>| {
            backend.record(
                false,
                now,
                listener.others_available(backend.addr),
                &cfg.outlier,
            )
        };
        match exchanged {
            Ok(Ok(head)) => {
                backend.observe_latency(now - started, now);
                if head.status.is_server_error() {
                    failed(&backend);
                } else {
                    backend.record_success(now, &cfg.outlier);
                }
                return respond(head, conn, backend, guard, client_upgrade);
            }
            Err(_) => {
                failed(&backend);
                return error_page(
                    &listener,
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "backend {} sent no response within {:?}",
                        backend.addr, cfg.request_timeout
                    ),
                );
            }
            Ok(Err(ExchangeError::Stale(e))) => {
                // The backend closed an idle connection as we reused it: not the
                // backend's fault, and the request never reached it. Try again on a
                // fresh connection without counting an attempt.
                tracing::debug!(backend = %backend.addr, error = %e, "stale pooled connection");
                if !replay {
                    // The body went into the failed attempt: sending the request again
                    // would send it without one.
                    last_error = Some(error_page(
                        &listener,
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "backend {} closed the connection before the request body was sent",
                            backend.addr
                        ),
                    ));
                    break;
                }
                attempt -= 1;
                tried[attempt] = SocketAddr::from(([0, 0, 0, 0], 0));
                resend = true;
            }
            Ok(Err(ExchangeError::Failed(e))) => {
                failed(&backend);
                last_error = Some(error_page(
                    &listener,
                    StatusCode::BAD_GATEWAY,
                    format!("backend {}: {e}", backend.addr),
                ));
                if !replay {
                    break;
                }
            }
        }
    }
    last_error.unwrap_or_else(|| {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "503 service unavailable: listener {:?}: {}",
                cfg.name,
                listener.unavailable_reason()
            ),
        )
    })
}

/// Turns a backend's response head into the client's response; on 101 the two
/// connections are joined into a tunnel.
fn respond(
    head: crate::upstream::ResponseHead,
    conn: crate::pool::Conn,
    backend: Arc<Backend>,
    guard: InFlight,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ProxyBody> {
    let upgraded = head.status == StatusCode::SWITCHING_PROTOCOLS;
    let body = if upgraded {
        match client_upgrade {
            Some(client) => crate::upstream::tunnel(client, conn),
            None => drop(conn),
        }
        drop(guard);
        empty()
    } else {
        UpstreamBody::new(conn, &head, backend, guard).boxed_unsync()
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    strip_hop_by_hop(resp.headers_mut(), upgraded);
    resp.headers_mut()
        .append(header::VIA, HeaderValue::from_static("1.1 flotilla"));
    resp
}
