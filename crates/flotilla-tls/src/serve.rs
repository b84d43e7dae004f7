//! The accept loop of the registry and agent APIs: TLS (or plain HTTP when the operator
//! chose it), the peer's certificate identity handed to every request, and the limits a
//! socket open to a LAN needs — a deadline for the TLS handshake and for request
//! headers (a client that opens connections and sends nothing holds nothing for long),
//! a cap on open connections, and an accept loop that pauses instead of spinning when
//! `accept` fails (out of file descriptors).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::ca::{peer_facts, PeerIdentity};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (EMFILE and the like) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How to serve.
#[derive(Clone)]
pub struct ServeOptions {
    /// TLS configuration; `None` serves plain HTTP (loopback or `--insecure-http`).
    pub tls: Option<Arc<ServerConfig>>,
    /// Longest wait for a request's headers (also the idle limit between requests).
    pub header_read_timeout: Duration,
    /// Most connections open at once; past it, new connections wait in the backlog.
    pub max_connections: usize,
}

impl ServeOptions {
    /// Plain HTTP with the default limits.
    pub fn plain() -> Self {
        ServeOptions {
            tls: None,
            header_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
        }
    }

    /// TLS with `config` and the default limits.
    pub fn tls(config: Arc<ServerConfig>) -> Self {
        ServeOptions {
            tls: Some(config),
            ..Self::plain()
        }
    }
}

/// The other end of a request, in every request's extensions.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its address.
    pub addr: SocketAddr,
    /// Who its client certificate says it is (verified against the cluster CA in the
    /// handshake); `None` without TLS or without a certificate.
    pub identity: Option<PeerIdentity>,
    /// When that certificate was issued (for revocations by time).
    pub issued: Option<std::time::SystemTime>,
}

/// Serves `app` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, app: Router, options: ServeOptions) {
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let acceptor = options.tls.clone().map(TlsAcceptor::from);
    loop {
        let permit = match slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let acceptor = acceptor.clone();
        let header_timeout = options.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(peer = %addr, "TLS handshake timed out");
                            return;
                        }
                    };
                    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                    let (identity, issued) = leaf.map_or((None, None), |c| peer_facts(c.as_ref()));
                    connection(
                        TokioIo::new(tls),
                        app,
                        Peer {
                            addr,
                            identity,
                            issued,
                        },
                        header_timeout,
                    )
                    .await
                }
                None => {
                    let peer = Peer {
                        addr,
                        identity: None,
                        issued: None,
                    };
                    connection(TokioIo::new(stream), app, peer, header_timeout).await
                }
            }
        });
    }
}

async fn connection<I>(io: TokioIo<I>, app: Router, peer: Peer, header_timeout: Duration)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer.addr));
            app.clone().oneshot(req)
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    if let Err(e) = builder.serve_connection(io, service).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Reads until the peer closes (or 5 s pass); the bytes read.
    async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        out
    }

    #[tokio::test]
    async fn slow_headers_are_cut_off_and_connections_past_the_cap_wait() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let options = ServeOptions {
            tls: None,
            header_read_timeout: Duration::from_millis(500),
            max_connections: 2,
        };
        let server = tokio::spawn(serve(listener, app, options));

        // Two clients that start a request and never finish its headers hold both slots.
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
            slow.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A third, complete request is answered only once a slot frees: after the
        // header deadline cut one of the slow ones off.
        let t0 = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut s).await;
        let waited = t0.elapsed();
        assert!(
            String::from_utf8_lossy(&answer).contains("200 OK"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        assert!(
            waited >= Duration::from_millis(350),
            "answered after {waited:?}"
        );
        assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
        // The slow ones were closed (with a 408 or nothing), never served.
        for mut s in slow {
            let got = read_to_close(&mut s).await;
            assert!(!String::from_utf8_lossy(&got).contains("200 OK"));
        }
        server.abort();
    }
}
