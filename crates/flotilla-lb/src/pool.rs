//! Upstream HTTP/1.1 connections, kept alive and reused per backend.
//!
//! Checking a connection out *before* touching the request body is what makes retrying
//! on another backend safe after a connect failure: nothing of the body has been read.

use std::sync::Mutex;
use std::time::Duration;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::http::ProxyBody;

/// Most idle connections kept per backend.
const MAX_IDLE: usize = 256;

/// Idle connections of one backend.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<http1::SendRequest<ProxyBody>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pool({} idle)",
            self.idle.lock().map(|v| v.len()).unwrap_or(0)
        )
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    /// TCP connect took too long.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// HTTP/1 handshake failed.
    #[error("handshake: {0}")]
    Handshake(#[from] hyper::Error),
}

impl Pool {
    /// Number of idle connections.
    pub fn idle(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    fn take_idle(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    /// A ready connection: an idle one, or a new one within `timeout`.
    pub async fn checkout(
        &self,
        addr: std::net::SocketAddr,
        timeout: Duration,
    ) -> Result<http1::SendRequest<ProxyBody>, ConnectError> {
        // A connection is returned the moment its response ends; its dispatcher may
        // need one more turn to be ready, so wait briefly instead of spawning a task
        // per request to watch for it.
        while let Some(mut s) = self.take_idle() {
            if s.is_ready() {
                return Ok(s);
            }
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(100), s.ready()).await {
                return Ok(s);
            }
        }
        let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    pub(crate) fn push(&self, sender: http1::SendRequest<ProxyBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }
}

/// Returns `sender` to `backend`'s pool once its response has ended.
pub fn release(
    backend: std::sync::Arc<crate::backend::Backend>,
    sender: http1::SendRequest<ProxyBody>,
) {
    if !sender.is_closed() {
        backend.pool.push(sender);
    }
}
