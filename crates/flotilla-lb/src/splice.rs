//! Zero-copy TCP relay with `splice(2)`: bytes move socket → pipe → socket inside the
//! kernel, never copied to user space. Each direction runs independently and forwards
//! EOF as a write shutdown, so half-closed connections keep working.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call (the pipe is sized to match).
const CHUNK: usize = 1 << 20;

/// Both ends of a pipe, closed when dropped.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid two-element array for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // A larger pipe means fewer splice round trips; failure just keeps the default.
        // SAFETY: fcntl on a pipe fd we own.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        // SAFETY: pipe2 just opened both fds and nothing else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain fds, null offsets (sockets and pipes are not seekable).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves bytes from `src` to `dst` until EOF, then shuts `dst` down for writing; each
/// move stamps `last` (milliseconds since `t0`).
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    t0: Instant,
    last: &AtomicU64,
) -> io::Result<u64> {
    let pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        // socket → pipe, waiting for readability through tokio's reactor.
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // EOF from src: forward the half-close.
            // SAFETY: shutdown on a socket fd owned by `dst`.
            unsafe { libc::shutdown(dst.as_raw_fd(), libc::SHUT_WR) };
            return Ok(total);
        }
        // pipe → socket until the pipe is drained.
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        last.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Relays both directions until both have seen EOF, or until no byte has moved either
/// way for `idle` (then `TimedOut`: a silent peer holds no connection forever); returns
/// bytes (client→backend, backend→client).
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    idle: Duration,
) -> io::Result<(u64, u64)> {
    let t0 = Instant::now();
    let last = AtomicU64::new(0);
    let both = async {
        tokio::join!(
            one_way(client, backend, t0, &last),
            one_way(backend, client, t0, &last)
        )
    };
    let watchdog = async {
        loop {
            let quiet = t0
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        (up, down) = both => Ok((up?, down?)),
        () = watchdog => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no bytes either way for {idle:?}"),
        )),
    }
}
