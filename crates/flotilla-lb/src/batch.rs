//! Client writes deferred to the end of the runtime's batch of ready tasks.
//!
//! Why: on one thread tokio runs each woken connection to its next wait, so a proxy
//! interleaves "read a response from the backend, send it to the client" connection by
//! connection, and every send lands on a client that has gone back to sleep: a wake-up
//! (an IPI on a VM) per response. HAProxy receives everything an epoll batch brought,
//! then sends, so its clients wake once per burst; waking was the largest difference
//! between the two in the profile (BENCHMARKS.md). Here a small write is copied into the
//! connection's pending buffer and the connection queued; one flusher task per runtime
//! thread, queued behind the tasks already woken, sends every pending buffer in one go.
//!
//! Order is kept (a large write first sends what is pending, directly), a full socket
//! hands the remainder to a task that waits for it, errors surface on the next write,
//! and bytes written before the connection is dropped are still sent.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Writes up to this size (in all, pending) are deferred; larger ones go out at once.
const DEFER_MAX: usize = 16 * 1024;

/// A pending buffer that grew beyond this is given back after its flush.
const KEEP_CAPACITY: usize = 16 * 1024;

/// A client connection whose small writes are sent by the runtime thread's flusher.
#[derive(Debug)]
pub struct BatchedStream {
    shared: Arc<Shared>,
    flusher: Arc<Flusher>,
}

#[derive(Debug)]
struct Shared {
    stream: TcpStream,
    out: Mutex<Out>,
}

#[derive(Debug, Default)]
struct Out {
    /// Bytes written by the connection and not yet sent.
    buf: Vec<u8>,
    /// In the flusher's queue.
    queued: bool,
    /// The socket was full at a flush: a task is sending the rest; writes wait.
    stalled: bool,
    /// A send failed; reported to the next write.
    error: Option<io::ErrorKind>,
    /// The connection, waiting for `stalled` to clear.
    waker: Option<Waker>,
}

impl Out {
    /// Whether the connection may write now: the error if a send failed, pending while
    /// a stalled send is under way (the connection is woken when it ends).
    fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = self.error {
            return Poll::Ready(Err(kind.into()));
        }
        if self.stalled {
            self.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    /// Records a failed send: nothing more will go out on this connection.
    fn fail(&mut self, e: &io::Error) {
        self.error = Some(e.kind());
        self.buf = Vec::new();
    }
}

impl Shared {
    fn out(&self) -> MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends what is pending without waiting; a full socket hands the rest to a task.
    fn flush_now(self: &Arc<Self>) {
        let mut out = self.out();
        out.queued = false;
        if out.buf.is_empty() || out.stalled {
            return;
        }
        match self.send_once(&mut out) {
            Ok(true) if out.buf.capacity() > KEEP_CAPACITY => out.buf = Vec::new(),
            Ok(true) | Err(_) => {}
            Ok(false) => self.stall(out),
        }
    }

    /// One send of what is pending, without waiting: `true` if nothing is left.
    fn send_once(&self, out: &mut Out) -> io::Result<bool> {
        match self.stream.try_write(&out.buf) {
            Ok(n) => {
                out.buf.drain(..n);
                Ok(out.buf.is_empty())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => {
                out.fail(&e);
                Err(e)
            }
        }
    }

    fn stall(self: &Arc<Self>, mut out: MutexGuard<'_, Out>) {
        out.stalled = true;
        drop(out);
        let shared = self.clone();
        tokio::spawn(std::future::poll_fn(move |cx| {
            let mut out = shared.out();
            let sent = shared.poll_send_pending(&mut out, cx);
            if sent.is_pending() {
                return Poll::Pending;
            }
            if let Poll::Ready(Err(e)) = sent {
                out.fail(&e);
            }
            out.stalled = false;
            if let Some(w) = out.waker.take() {
                w.wake();
            }
            Poll::Ready(())
        }));
    }

    /// Ready once nothing is pending, before a direct write: sends what it can without
    /// waiting, and leaves any rest to the stalled-send task. Only that task or a direct
    /// write, never both, waits on the socket: tokio keeps one writer waker per socket,
    /// and a second waiter's registration would silently replace the first's.
    fn poll_pending_sent(
        self: &Arc<Self>,
        mut out: MutexGuard<'_, Out>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(out.poll_writable(cx))?;
        if out.buf.is_empty() || self.send_once(&mut out)? {
            return Poll::Ready(Ok(()));
        }
        out.waker = Some(cx.waker().clone());
        self.stall(out);
        Poll::Pending
    }

    /// Sends everything pending, waiting for the socket as needed (the stalled-send task).
    fn poll_send_pending(&self, out: &mut Out, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !out.buf.is_empty() {
            let n = ready!(self.poll_send(cx, &out.buf))?;
            out.buf.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_send(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }
}

/// The queue of connections with pending bytes, and the task that sends them.
#[derive(Debug, Default)]
struct Flusher {
    queue: Mutex<Vec<Arc<Shared>>>,
    wake: Notify,
    /// The flusher task has ended (its runtime shut down): make a new one.
    gone: AtomicBool,
}

impl Flusher {
    fn enqueue(&self, shared: Arc<Shared>) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let first = queue.is_empty();
        queue.push(shared);
        drop(queue);
        if first {
            self.wake.notify_one();
        }
    }

    async fn run(self: Arc<Self>) {
        struct Gone(Arc<Flusher>);
        impl Drop for Gone {
            fn drop(&mut self) {
                self.0.gone.store(true, Ordering::Release);
                // Nothing will send these now; better sent late than never.
                let queue =
                    std::mem::take(&mut *self.0.queue.lock().unwrap_or_else(|p| p.into_inner()));
                for s in queue {
                    let mut out = s.out();
                    let _ = s.stream.try_write(&out.buf);
                    out.buf.clear();
                }
            }
        }
        let _gone = Gone(self.clone());
        let mut batch = Vec::new();
        loop {
            self.wake.notified().await;
            std::mem::swap(
                &mut batch,
                &mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()),
            );
            for shared in batch.drain(..) {
                shared.flush_now();
            }
        }
    }

    /// This thread's flusher, started on the current runtime if there is none alive.
    fn current() -> Arc<Flusher> {
        thread_local! {
            static FLUSHER: RefCell<Option<Arc<Flusher>>> = const { RefCell::new(None) };
        }
        FLUSHER.with(|f| {
            let mut f = f.borrow_mut();
            match &*f {
                Some(flusher) if !flusher.gone.load(Ordering::Acquire) => flusher.clone(),
                _ => {
                    let flusher = Arc::new(Flusher::default());
                    tokio::spawn(flusher.clone().run());
                    *f = Some(flusher.clone());
                    flusher
                }
            }
        })
    }
}

impl BatchedStream {
    /// Wraps an accepted connection; must be called on the runtime that will serve it.
    pub fn new(stream: TcpStream) -> Self {
        BatchedStream {
            shared: Arc::new(Shared {
                stream,
                out: Mutex::new(Out::default()),
            }),
            flusher: Flusher::current(),
        }
    }
}

impl BatchedStream {
    /// The socket, for reads and probes that bypass the write batching.
    pub fn stream(&self) -> &TcpStream {
        &self.shared.stream
    }
}

impl AsyncRead for BatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        crate::drain::poll_read_buf(&self.shared.stream, cx, buf)
    }
}

impl AsyncWrite for BatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        let mut out = shared.out();
        ready!(out.poll_writable(cx))?;
        if out.buf.len() + buf.len() <= DEFER_MAX {
            out.buf.extend_from_slice(buf);
            if !out.queued {
                out.queued = true;
                drop(out);
                self.flusher.enqueue(shared.clone());
            }
            return Poll::Ready(Ok(buf.len()));
        }
        // Too large to defer: what is pending goes first, then this, directly.
        ready!(shared.poll_pending_sent(out, cx))?;
        shared.poll_send(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Pending bytes leave with this batch; only a stalled socket makes a writer wait.
        self.shared.out().poll_writable(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &self.shared;
        ready!(shared.poll_pending_sent(shared.out(), cx))?;
        Poll::Ready(socket2::SockRef::from(&shared.stream).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: the batched side and the plain peer.
    async fn pair() -> (BatchedStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (BatchedStream::new(client.unwrap()), accepted.unwrap().0)
    }

    /// Deterministic test bytes: position-dependent so reordering shows.
    fn pattern(from: usize, len: usize) -> Vec<u8> {
        (from..from + len).map(|i| (i * 7 % 251) as u8).collect()
    }

    async fn order_is_kept_across_deferred_and_direct_writes() {
        let (mut w, mut peer) = pair().await;
        let sizes = [10, 300, 64 * 1024, 5, DEFER_MAX, 1, 200_000, 17];
        let total: usize = sizes.iter().sum();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut at = 0;
        for n in sizes {
            w.write_all(&pattern(at, n)).await.unwrap();
            w.flush().await.unwrap();
            at += n;
        }
        w.shutdown().await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got.len(), total);
        assert!(got == pattern(0, total), "bytes arrived out of order");
    }

    #[tokio::test]
    async fn order_is_kept_on_one_thread() {
        order_is_kept_across_deferred_and_direct_writes().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn order_is_kept_on_several_threads() {
        order_is_kept_across_deferred_and_direct_writes().await;
    }

    #[tokio::test]
    async fn a_full_socket_stalls_writers_and_loses_nothing_on_one_thread() {
        a_full_socket_stalls_writers_and_loses_nothing().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_socket_stalls_writers_and_loses_nothing_on_several_threads() {
        a_full_socket_stalls_writers_and_loses_nothing().await;
    }

    async fn a_full_socket_stalls_writers_and_loses_nothing() {
        let (mut w, mut peer) = pair().await;
        // Far more than the socket buffers hold, in pieces small enough to be deferred,
        // so flushes find the socket full and the rest goes to a stalled-send task.
        // Every 100th piece is large: a direct write behind deferred ones, the case where
        // two waiters on one socket lost a wake-up.
        let piece = 1000;
        let pieces = 16_000;
        let writer = tokio::spawn(async move {
            let mut at = 0;
            for i in 0..pieces {
                let n = if i % 100 == 99 { 40 * piece } else { piece };
                w.write_all(&pattern(at, n)).await.unwrap();
                at += n;
            }
            w.shutdown().await.unwrap();
            w
        });
        let mut got = Vec::with_capacity(piece * pieces);
        let mut buf = [0u8; 4096];
        loop {
            // A slow reader: small reads, yielding between them.
            let n = peer.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            tokio::task::yield_now().await;
        }
        let w = writer.await.unwrap();
        let total = piece * (pieces / 100) * (99 + 40);
        assert_eq!(got.len(), total);
        assert!(got == pattern(0, total), "bytes lost or reordered");
        let out = w.shared.out();
        assert!(out.buf.is_empty() && !out.stalled && out.error.is_none());
    }

    #[tokio::test]
    async fn bytes_written_before_a_drop_are_still_sent() {
        let (mut w, mut peer) = pair().await;
        w.write_all(b"last words").await.unwrap();
        drop(w);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }

    #[tokio::test]
    async fn a_failed_send_is_reported_to_the_next_write() {
        let (mut w, peer) = pair().await;
        // The peer resets the connection: close with a zero linger time.
        socket2::SockRef::from(&peer)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(peer);
        let mut failed = None;
        for _ in 0..1000 {
            match w.write_all(b"x").await {
                Ok(()) => tokio::task::yield_now().await,
                Err(e) => {
                    failed = Some(e.kind());
                    break;
                }
            }
        }
        let kind = failed.expect("writes to a reset connection never failed");
        assert!(
            matches!(
                kind,
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{kind:?}"
        );
    }
}
