//! The L4 proxy: bidirectional copy with half-close, connect retry on another backend.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::listener::Listener;

/// Proxies one accepted TCP connection.
pub async fn serve_connection(listener: Arc<Listener>, client: TcpStream, peer: SocketAddr) {
    let cfg = &listener.cfg;
    let _open = listener.stats.connection();
    let _ = client.set_nodelay(true);
    let key = if listener.hash.is_some() {
        crate::http::ip_key(peer)
    } else {
        0
    };
    let mut tried = Vec::new();
    for _ in 0..=cfg.retries {
        let Some(backend) = listener.pick(key, &tried) else {
            break;
        };
        tried.push(backend.addr);
        let connect =
            tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(backend.addr)).await;
        let upstream = match connect {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                backend.record(
                    false,
                    Instant::now(),
                    listener.others_available(backend.addr),
                    &cfg.outlier,
                );
                tracing::debug!(backend = %backend.addr, error = %e, "connect failed; trying another backend");
                continue;
            }
            Err(_) => {
                backend.record(
                    false,
                    Instant::now(),
                    listener.others_available(backend.addr),
                    &cfg.outlier,
                );
                continue;
            }
        };
        let _ = upstream.set_nodelay(true);
        backend.record_success(Instant::now(), &cfg.outlier);
        let _guard = backend.start();
        let started = Instant::now();
        // splice(2) moves the bytes inside the kernel; each direction forwards EOF as a
        // write shutdown on its own, so a half-closed client still reads the answer.
        match crate::splice::relay(&client, &upstream, cfg.idle_timeout).await {
            Ok((up, down)) => {
                use std::sync::atomic::Ordering::Relaxed;
                listener.stats.bytes_in.fetch_add(up, Relaxed);
                listener.stats.bytes_out.fetch_add(down, Relaxed);
                tracing::debug!(backend = %backend.addr, up, down, secs = started.elapsed().as_secs_f64(), "tcp session done")
            }
            Err(e) => {
                tracing::debug!(backend = %backend.addr, error = %e, "tcp session ended with an error")
            }
        }
        return;
    }
    tracing::warn!(listener = cfg.name, %peer, reason = listener.unavailable_reason(), "no backend for tcp connection");
}
