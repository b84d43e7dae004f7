//! Upstream HTTP/1.1 connections, kept alive and reused per backend.
//!
//! Checking a connection out *before* touching the request body is what makes retrying
//! on another backend safe after a connect failure: nothing of the body has been read.

use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Most idle connections kept per backend.
const MAX_IDLE: usize = 256;

/// Read buffer of an upstream connection; grows for large bodies.
const READ_BUFFER: usize = 8 * 1024;

/// One HTTP/1.1 connection to a backend, driven by whichever client task holds it.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub(crate) io: crate::batch::BatchedStream,
    /// Bytes read from the backend that are not consumed yet.
    pub(crate) buf: BytesMut,
    /// Scratch space for encoding a request head; kept to avoid an allocation per request.
    pub(crate) head: Vec<u8>,
    /// Has carried a request before: a failure before the first response byte may be
    /// the backend closing an idle keep-alive connection, not a fault of the request.
    pub(crate) reused: bool,
}

impl Conn {
    fn new(io: TcpStream) -> Self {
        Conn {
            io: crate::batch::BatchedStream::new(io),
            buf: BytesMut::with_capacity(READ_BUFFER),
            head: Vec::with_capacity(512),
            reused: false,
        }
    }

    /// True if the backend has not closed this idle connection (costs one syscall).
    pub(crate) fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.stream().try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Idle connections per worker thread: a connection is registered with the reactor of
/// the thread that opened it, so handing it to another thread would turn every one of
/// its wake-ups into a cross-thread one. Shards are indexed by worker (modulo).
const SHARDS: usize = 16;

/// Idle connections of one backend, sharded by worker thread.
pub struct Pool {
    idle: [Mutex<Vec<Conn>>; SHARDS],
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            idle: std::array::from_fn(|_| Mutex::new(Vec::new())),
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} idle)", self.idle())
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
}

impl Pool {
    /// Number of idle connections.
    pub fn idle(&self) -> usize {
        self.idle
            .iter()
            .map(|s| s.lock().map(|v| v.len()).unwrap_or(0))
            .sum()
    }

    /// This worker thread's idle connections.
    fn shard(&self) -> &Mutex<Vec<Conn>> {
        &self.idle[crate::workers::current() % SHARDS]
    }

    /// A connection: an idle one, or a new one within `timeout`. With `verify`, idle
    /// connections are probed first, for requests that must not be sent twice.
    pub async fn checkout(
        &self,
        addr: std::net::SocketAddr,
        timeout: Duration,
        verify: bool,
    ) -> Result<Conn, ConnectError> {
        loop {
            let conn = self.shard().lock().unwrap_or_else(|p| p.into_inner()).pop();
            match conn {
                Some(c) if !verify || c.still_open() => return Ok(c),
                Some(_) => continue,
                None => break,
            }
        }
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??;
        let _ = stream.set_nodelay(true);
        Ok(Conn::new(stream))
    }

    /// Returns a connection whose last response ended cleanly.
    pub(crate) fn push(&self, mut conn: Conn) {
        conn.reused = true;
        let mut idle = self.shard().lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}
