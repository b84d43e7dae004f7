//! What a listener carries: connections (open and in all), bytes from and to clients,
//! and responses by status class. Relaxed atomic counters, touched once per read or
//! write system call and once per response: the proxy benchmark (BENCHMARKS.md) is the
//! measure that they cost nothing visible.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A listener's traffic counters.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Client connections open now.
    pub open: AtomicI64,
    /// Client connections accepted.
    pub connections: AtomicU64,
    /// Bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// HTTP responses sent, by class: `[1xx, 2xx, 3xx, 4xx, 5xx]` (the lb's own error
    /// answers included).
    pub responses: [AtomicU64; 5],
}

/// The status classes of [`ListenerStats::responses`], as labelled.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl ListenerStats {
    /// Counts a connection until the returned guard drops.
    pub fn connection(self: &Arc<Self>) -> OpenConnection {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }

    /// Counts one response with `status`.
    pub fn response(&self, status: u16) {
        if let Some(c) = (status as usize / 100)
            .checked_sub(1)
            .and_then(|i| self.responses.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An open client connection (see [`ListenerStats::connection`]).
#[derive(Debug)]
pub struct OpenConnection(Arc<ListenerStats>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client stream whose bytes are counted into its listener's stats.
#[derive(Debug)]
pub struct Counted<IO> {
    inner: IO,
    stats: Arc<ListenerStats>,
}

impl<IO> Counted<IO> {
    /// Counts what passes through `inner`.
    pub fn new(inner: IO, stats: Arc<ListenerStats>) -> Self {
        Counted { inner, stats }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_connections_and_classes_are_counted() {
        let stats = Arc::new(ListenerStats::default());
        let (a, mut b) = tokio::io::duplex(64);
        {
            let _open = stats.connection();
            assert_eq!(stats.open.load(Ordering::Relaxed), 1);
            let mut c = Counted::new(a, stats.clone());
            c.write_all(b"hello").await.unwrap();
            b.write_all(b"hi there").await.unwrap();
            let mut got = [0u8; 8];
            c.read_exact(&mut got).await.unwrap();
            let mut echo = [0u8; 5];
            b.read_exact(&mut echo).await.unwrap();
        }
        assert_eq!(stats.open.load(Ordering::Relaxed), 0);
        assert_eq!(stats.connections.load(Ordering::Relaxed), 1);
        assert_eq!(stats.bytes_out.load(Ordering::Relaxed), 5);
        assert_eq!(stats.bytes_in.load(Ordering::Relaxed), 8);
        for s in [101, 200, 204, 302, 404, 502, 503, 99, 600] {
            stats.response(s);
        }
        let by: Vec<u64> = stats
            .responses
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        assert_eq!(by, [1, 2, 1, 1, 2]);
    }
}
