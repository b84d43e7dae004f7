//! Socket reads that take a short read as proof the socket is drained.
//!
//! Why: tokio learns that an edge-triggered socket has nothing more to read only from a
//! read that fails with `WouldBlock`. Under keep-alive load that costs a `recv` returning
//! `EAGAIN` per request on each side of the proxy (0.8 per request measured; HAProxy
//! makes none: BENCHMARKS.md). A stream socket whose `recv` returned fewer bytes than
//! asked had an empty receive queue at that instant, and every byte that arrives later
//! raises a new epoll edge, so its readiness can be cleared at once — tokio's `try_io`
//! clears it only if no newer edge was seen, so nothing can be missed.

use std::io;
use std::mem::MaybeUninit;
use std::task::{ready, Context, Poll};

use tokio::io::{Interest, ReadBuf};
use tokio::net::TcpStream;

/// One `recv` into `buf` once `stream` is readable. A read shorter than `buf` clears the
/// socket's readiness, so the next read waits for epoll instead of trying the socket.
pub fn poll_recv(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut [MaybeUninit<u8>],
) -> Poll<io::Result<usize>> {
    let want = buf.len();
    loop {
        ready!(stream.poll_read_ready(cx))?;
        let mut short = None;
        let read = stream.try_io(Interest::READABLE, || {
            let n = socket2::SockRef::from(stream).recv(&mut *buf)?;
            if n > 0 && n < want {
                // Reported as `WouldBlock` so that tokio clears the readiness.
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        if let Some(n) = short {
            return Poll::Ready(Ok(n));
        }
        match read {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    }
}

/// [`poll_recv`] into the unfilled part of a tokio read buffer.
pub fn poll_read_buf(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    // SAFETY: `recv` only writes into the unfilled part, never de-initialises it.
    let unfilled = unsafe { buf.unfilled_mut() };
    let n = ready!(poll_recv(stream, cx, unfilled))?;
    // SAFETY: the kernel initialised the first `n` bytes.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Poll::Ready(Ok(()))
}
