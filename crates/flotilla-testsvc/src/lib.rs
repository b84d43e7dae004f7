//! The service node used by tests and benchmarks, as a library (tests run it in-process
//! on its own runtime, so killing it closes every socket) and as the `flotilla-testsvc`
//! binary (for containers and benchmarks).
//!
//!
//! - `GET /health` → 200 (or 503 after `POST /admin/health?ok=false`)
//! - any other path → 200 `NAME\n` with `x-backend: NAME`; query knobs
//!   `latency_ms=N`, `cpu_us=N` (busy-spin), `status=N`, `bytes=N` (streamed body)
//! - `POST /upload` → consumes the body as a stream, answers its length
//! - a request with `Upgrade:` → 101, then echoes raw bytes (WebSocket-style tunnel)
//! - `--tcp ADDR` also runs a TCP echo listener (half-close aware).
//!
//! Command-line knobs set defaults for every request (`--latency-ms`, `--cpu-us`,
//! `--fail-rate`). `--fork` burns each request's CPU in a child process of its own (a
//! real fork + exec of this binary, CGI-style: the cost of process churn is part of the
//! request); `--cpu-dist pareto` draws each request's CPU from a heavy-tailed
//! distribution with `--cpu-us` as its mean.
#![warn(missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Settings of one test service.
#[derive(Debug, Parser, Clone)]
#[command(name = "flotilla-testsvc", about)]
pub struct Args {
    /// HTTP address.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Name echoed in bodies and `x-backend`.
    #[arg(long, default_value = "testsvc")]
    pub name: String,
    /// Added latency per request, ms.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// CPU burned per request, µs.
    #[arg(long, default_value_t = 0)]
    pub cpu_us: u64,
    /// Share of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Also run a TCP echo listener here.
    #[arg(long)]
    pub tcp: Option<SocketAddr>,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Run each request's CPU work in a child process (fork + exec of this binary).
    #[arg(long)]
    pub fork: bool,
    /// How each request's CPU cost is drawn around `--cpu-us`.
    #[arg(long, value_enum, default_value_t = CpuDist::Fixed)]
    pub cpu_dist: CpuDist,
    /// Child mode (used by `--fork`): burn this many µs of CPU and exit.
    #[arg(long, hide = true)]
    pub burn_us: Option<u64>,
}

/// Distribution of the CPU a request costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuDist {
    /// Every request costs `--cpu-us`.
    Fixed,
    /// Pareto with shape 1.5 and mean `--cpu-us`, capped at 50× the mean: most
    /// requests are cheap, a few cost tens of times the mean (p99 ≈ 7× the mean).
    Pareto,
}

/// Pareto shape: 1.5 has a finite mean and an infinite variance, the classic heavy tail
/// of web service times.
const PARETO_SHAPE: f64 = 1.5;
/// Pareto draws are capped at this many times the mean (one request never costs seconds).
const PARETO_CAP: f64 = 50.0;

impl CpuDist {
    /// One request's CPU in µs, for mean `mean_us` and a uniform draw `u` in (0, 1].
    pub fn draw(self, mean_us: u64, u: f64) -> u64 {
        match self {
            CpuDist::Fixed => mean_us,
            CpuDist::Pareto => {
                // Inverse transform: x = xm / u^(1/α), mean α·xm/(α−1).
                let xm = mean_us as f64 * (PARETO_SHAPE - 1.0) / PARETO_SHAPE;
                let x = xm / u.max(f64::MIN_POSITIVE).powf(1.0 / PARETO_SHAPE);
                x.min(PARETO_CAP * mean_us as f64) as u64
            }
        }
    }
}

struct State {
    args: Args,
    healthy: AtomicBool,
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Burns `us` µs of CPU time on this thread (the child mode of `--fork` calls it too).
///
/// CPU time, not wall time: a request is a fixed amount of work, so a container
/// throttled by its CPU quota takes longer to finish it, as a real CPU-bound handler
/// does (a wall-clock spin would finish early whenever throttled, and a quota'd
/// container would serve more requests than its quota allows).
pub fn burn(us: u64) {
    let until = thread_cpu_time() + Duration::from_micros(us);
    while thread_cpu_time() < until {
        for _ in 0..64 {
            std::hint::spin_loop();
        }
    }
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID exists on
    // every Linux since 2.6.12, and the call writes only `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

async fn handle(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let name = state.args.name.clone();
    let respond = |status: StatusCode, body: Body| {
        Response::builder()
            .status(status)
            .header("x-backend", name.as_str())
            .body(body)
            .unwrap()
    };
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let proto = req.headers()[hyper::header::UPGRADE].clone();
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut resp = respond(StatusCode::SWITCHING_PROTOCOLS, full(Bytes::new()));
        resp.headers_mut().insert(hyper::header::UPGRADE, proto);
        resp.headers_mut()
            .insert(hyper::header::CONNECTION, "upgrade".parse().unwrap());
        return Ok(resp);
    }
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/headers") => {
            let mut out = String::new();
            for (k, v) in req.headers() {
                out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
            }
            return Ok(respond(StatusCode::OK, full(out)));
        }
        ("GET", "/health") => {
            let ok = state.healthy.load(Ordering::Relaxed);
            return Ok(respond(
                if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
                full(if ok { "ok\n" } else { "unhealthy\n" }),
            ));
        }
        ("POST", "/admin/health") => {
            let ok = req.uri().query().is_none_or(|q| !q.contains("ok=false"));
            state.healthy.store(ok, Ordering::Relaxed);
            return Ok(respond(StatusCode::OK, full("set\n")));
        }
        ("POST", "/upload") => {
            let mut body = req.into_body();
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => total += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                    Err(_) => return Ok(respond(StatusCode::BAD_REQUEST, full("body error\n"))),
                }
            }
            return Ok(respond(StatusCode::OK, full(format!("{total}\n"))));
        }
        _ => {}
    }
    let latency = query(&req, "latency_ms").unwrap_or(state.args.latency_ms);
    let mean = query(&req, "cpu_us").unwrap_or(state.args.cpu_us);
    let cpu = state
        .args
        .cpu_dist
        .draw(mean, 1.0 - rand::thread_rng().gen::<f64>());
    if state.args.fork {
        // CGI-style: a process per request does the work; the request waits for it.
        let exe = std::env::current_exe().unwrap_or_else(|_| "flotilla-testsvc".into());
        let status = tokio::process::Command::new(exe)
            .arg("--burn-us")
            .arg(cpu.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .await;
        if !status.is_ok_and(|s| s.success()) {
            return Ok(respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                full("child process failed\n"),
            ));
        }
    } else if cpu > 0 {
        burn(cpu);
    }
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if state.args.fail_rate > 0.0 && rand::thread_rng().gen_bool(state.args.fail_rate.min(1.0)) {
        return Ok(respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            full("injected failure\n"),
        ));
    }
    let status = query(&req, "status")
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::OK);
    if let Some(n) = query(&req, "bytes") {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures::stream::unfold(n, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let take = left.min(chunk.len() as u64);
                Some((
                    Ok::<_, std::io::Error>(Frame::data(chunk.slice(..take as usize))),
                    left - take,
                ))
            }
        });
        return Ok(respond(status, StreamBody::new(stream).boxed()));
    }
    Ok(respond(status, full(format!("{}\n", state.args.name))))
}

/// Runs a TCP echo listener (half-close aware) forever.
pub async fn tcp_echo(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (mut sock, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = sock.split();
            // Echo until the client half-closes, then close our side too.
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

/// Serves HTTP (and the TCP echo, if set) forever on the current runtime.
pub async fn serve(args: Args) -> anyhow::Result<()> {
    if let Some(t) = args.tcp {
        tokio::spawn(async move {
            if let Err(e) = tcp_echo(t).await {
                eprintln!("tcp echo: {e}");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    serve_on(listener, args).await
}

/// Serves HTTP on an already bound listener.
pub async fn serve_on(listener: tokio::net::TcpListener, args: Args) -> anyhow::Result<()> {
    let state = Arc::new(State {
        args,
        healthy: AtomicBool::new(true),
    });
    loop {
        let (sock, _) = listener.accept().await?;
        let _ = sock.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(sock), svc)
                .await;
        });
    }
}

/// A test service on its own runtime thread; dropping or `kill`ing it closes its
/// listener and every connection at once, like a crashed process.
pub struct Running {
    /// Bound HTTP address.
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Running {
    /// Starts a service named `name` on a free loopback port with `args` knobs.
    pub fn start(name: &str, configure: impl FnOnce(&mut Args)) -> anyhow::Result<Running> {
        let mut args = Args::parse_from([
            "flotilla-testsvc",
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
        ]);
        configure(&mut args);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads.max(1))
            .enable_all()
            .build()?;
        // Bound with std so this works from inside another runtime too.
        let listener = std::net::TcpListener::bind(args.listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        if let Some(t) = args.tcp {
            runtime.spawn(tcp_echo(t));
        }
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            serve_on(listener, args).await
        });
        Ok(Running {
            addr,
            runtime: Some(runtime),
        })
    }

    /// Stops at once: listener and connections closed, in-flight requests cut.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::{burn, thread_cpu_time, CpuDist};

    #[test]
    fn burn_spends_cpu_time_not_wall_time() {
        let (cpu0, wall0) = (thread_cpu_time(), std::time::Instant::now());
        burn(20_000);
        let (cpu, wall) = (thread_cpu_time() - cpu0, wall0.elapsed());
        assert!(cpu >= std::time::Duration::from_millis(20), "cpu {cpu:?}");
        assert!(
            wall >= cpu.saturating_sub(std::time::Duration::from_millis(1)),
            "wall {wall:?} cpu {cpu:?}"
        );
    }

    /// Draws at evenly spaced quantiles: the distribution's shape without sampling noise.
    fn quantiles(dist: CpuDist, mean: u64) -> Vec<u64> {
        let n = 100_000;
        let mut v: Vec<u64> = (0..n)
            .map(|k| dist.draw(mean, (k as f64 + 0.5) / n as f64))
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn pareto_has_the_asked_mean_and_a_heavy_tail() {
        let v = quantiles(CpuDist::Pareto, 2000);
        let mean = v.iter().sum::<u64>() as f64 / v.len() as f64;
        // The cap at 50× takes a little of the mean (the tail beyond it).
        assert!((1800.0..=2000.0).contains(&mean), "mean {mean}");
        let (p50, p99) = (v[v.len() / 2], v[v.len() * 99 / 100]);
        assert!(p50 < 1200, "median {p50} well under the mean");
        assert!(p99 > 10_000, "p99 {p99} several times the mean");
        assert!(*v.last().unwrap() <= 100_000, "capped at 50× the mean");
    }

    #[test]
    fn fixed_costs_the_mean() {
        assert!(quantiles(CpuDist::Fixed, 2000).iter().all(|&x| x == 2000));
    }
}
