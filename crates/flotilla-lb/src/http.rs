//! The L7 proxy: HTTP/1.1 and HTTP/2 from clients, pooled HTTP/1.1 to backends,
//! streaming bodies both ways, Upgrade/WebSocket tunnels, retries, clear errors.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::backend::{Backend, InFlight};
use crate::config::HashKey;
use crate::listener::Listener;
use crate::scheduler::hash_key;

/// Body type used both ways through the proxy.
pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

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
    let svc = hyper::service::service_fn(move |req| {
        let listener = listener.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy(listener, peer, tls, req).await) }
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

/// Proxies one request.
pub async fn proxy(
    listener: Arc<Listener>,
    peer: SocketAddr,
    tls: bool,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
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
    let xff = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    parts.headers.insert(
        "x-forwarded-for",
        HeaderValue::from_str(&xff).expect("ip is a valid header"),
    );
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
    // Origin-form for the upstream HTTP/1.1 request; PathAndQuery clones are cheap.
    let path: hyper::Uri = match parts.uri.path_and_query() {
        Some(pq) => hyper::Uri::from(pq.clone()),
        None => hyper::Uri::from_static("/"),
    };

    let mut body = Some(body.boxed_unsync());
    // Retries are capped at 10 by config validation: a fixed array, no allocation.
    let mut tried = [SocketAddr::from(([0, 0, 0, 0], 0)); 11];
    let mut last_error: Option<Response<ProxyBody>> = None;
    for n_tried in 0..=cfg.retries as usize {
        let Some(backend) = listener.pick(key, &tried[..n_tried]) else {
            break;
        };
        tried[n_tried] = backend.addr;
        let sender = match backend
            .pool
            .checkout(backend.addr, cfg.connect_timeout)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                // Nothing of the request was sent: always safe to try another backend.
                backend.record(
                    false,
                    Instant::now(),
                    listener.others_available(backend.addr),
                    &cfg.outlier,
                );
                tracing::debug!(backend = %backend.addr, error = %e, "connect failed; trying another backend");
                last_error = Some(text(
                    StatusCode::BAD_GATEWAY,
                    format!("502 bad gateway: backend {}: {e}", backend.addr),
                ));
                continue;
            }
        };
        let req_body = match body.take() {
            Some(b) => b,
            None if replay => empty(),
            None => break,
        };
        // Headers are moved, not copied, unless a replay may need them again.
        let headers = if replay && n_tried < cfg.retries as usize {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let mut upstream = Request::new(req_body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = path.clone();
        *upstream.version_mut() = Version::HTTP_11;
        *upstream.headers_mut() = headers;
        let guard = backend.start();
        match send(&listener, &backend, sender, upstream, guard).await {
            Ok(mut resp) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client_up) = client_upgrade {
                        tunnel(client_up, hyper::upgrade::on(&mut resp));
                    }
                    return resp;
                }
                return resp;
            }
            Err(SendError::Timeout) => {
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "504 gateway timeout: backend {} sent no response within {:?}",
                        backend.addr, cfg.request_timeout
                    ),
                );
            }
            Err(SendError::Failed(e)) => {
                last_error = Some(text(
                    StatusCode::BAD_GATEWAY,
                    format!("502 bad gateway: backend {}: {e}", backend.addr),
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

enum SendError {
    Timeout,
    Failed(String),
}

async fn send(
    listener: &Listener,
    backend: &Arc<Backend>,
    mut sender: hyper::client::conn::http1::SendRequest<ProxyBody>,
    req: Request<ProxyBody>,
    guard: InFlight,
) -> Result<Response<ProxyBody>, SendError> {
    let cfg = &listener.cfg;
    let started = Instant::now();
    let result = tokio::time::timeout(cfg.request_timeout, sender.send_request(req)).await;
    let now = Instant::now();
    match result {
        Err(_) => {
            backend.record(
                false,
                now,
                listener.others_available(backend.addr),
                &cfg.outlier,
            );
            Err(SendError::Timeout)
        }
        Ok(Err(e)) => {
            backend.record(
                false,
                now,
                listener.others_available(backend.addr),
                &cfg.outlier,
            );
            Err(SendError::Failed(flotilla_core::error::chain(&e)))
        }
        Ok(Ok(resp)) => {
            backend.observe_latency(now - started, now);
            if resp.status().is_server_error() {
                backend.record(
                    false,
                    now,
                    listener.others_available(backend.addr),
                    &cfg.outlier,
                );
            } else {
                backend.record_success(now, &cfg.outlier);
            }
            let (mut parts, body) = resp.into_parts();
            let upgraded = parts.status == StatusCode::SWITCHING_PROTOCOLS;
            strip_hop_by_hop(&mut parts.headers, upgraded);
            parts
                .headers
                .append(header::VIA, HeaderValue::from_static("1.1 flotilla"));
            let body = Tracked {
                inner: body,
                sender: (!upgraded).then_some(sender),
                backend: backend.clone(),
                guard: Some(guard),
            };
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
    }
}

/// A response body that, when it ends, returns the upstream connection to the pool and
/// ends the backend's in-flight count (also when the client goes away early).
struct Tracked {
    inner: Incoming,
    sender: Option<hyper::client::conn::http1::SendRequest<ProxyBody>>,
    backend: Arc<Backend>,
    guard: Option<InFlight>,
}

impl Tracked {
    /// The response is complete: the connection can serve the next request.
    fn finish(&mut self) {
        if let Some(s) = self.sender.take() {
            crate::pool::release(self.backend.clone(), s);
        }
        self.guard.take();
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            // With a known length the server stops polling after the last byte, so the
            // end is detected from `is_end_stream` as well as from `None`.
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                this.sender.take();
                this.guard.take();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304) may never be polled; a complete one is reusable.
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}

/// Joins the client's and the backend's upgraded connections.
fn tunnel(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match (client.await, backend.await) {
            (Ok(c), Ok(b)) => {
                let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut b).await {
                    tracing::debug!(error = %e, "upgraded tunnel ended");
                }
            }
            (c, b) => tracing::debug!(
                client_ok = c.is_ok(),
                backend_ok = b.is_ok(),
                "upgrade failed"
            ),
        }
    });
}
