//! The lb on real sockets against real backends (the test service, each on its own
//! runtime so killing it closes its sockets like a crashed process).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_lb::config::LbConfig;
use flotilla_testsvc::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn lb(listener: &str) -> (flotilla_lb::RunningLb, String) {
    lb_with("", listener).await
}

/// An lb with `admin` lines in its `[admin]` table.
async fn lb_with(admin: &str, listener: &str) -> (flotilla_lb::RunningLb, String) {
    let text = format!(
        "[admin]\nlisten = \"\"\n{admin}\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\n{listener}\n"
    );
    let config: LbConfig =
        flotilla_core::config::parse_toml(std::path::Path::new("test.toml"), &text).unwrap();
    config.validate().unwrap();
    let running = flotilla_lb::start(config).await.unwrap();
    let url = format!("http://{}", running.addrs[0]);
    (running, url)
}

fn backends_line(addrs: &[String]) -> String {
    format!(
        "backends = [{}]",
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

async fn get(c: &reqwest::Client, url: &str) -> (u16, String) {
    let r = c.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedulers_spread_real_traffic_as_configured() {
    let a = Running::start("a", |_| {}).unwrap();
    let b = Running::start("b", |_| {}).unwrap();
    let c = client();
    let (_lb, url) = lb(&format!(
        "scheduler = \"round-robin\"\n{}",
        backends_line(&[a.addr.to_string(), b.addr.to_string()])
    ))
    .await;
    let mut seq = Vec::new();
    for _ in 0..6 {
        seq.push(get(&c, &url).await.1.trim().to_owned());
    }
    assert!(
        seq.windows(2).all(|w| w[0] != w[1]),
        "round robin alternates: {seq:?}"
    );

    let (_lb2, url2) = lb(&format!(
        "scheduler = \"weighted\"\n{}",
        backends_line(&[format!("{} weight=300", a.addr), b.addr.to_string()])
    ))
    .await;
    let mut n_a = 0;
    for _ in 0..400 {
        if get(&c, &url2).await.1.trim() == "a" {
            n_a += 1;
        }
    }
    assert_eq!(n_a, 300, "weighted 3:1 over full cycles");

    let (_lb3, url3) = lb(&format!(
        "scheduler = \"hash\"\nhash_key = \"header:x-user\"\n{}",
        backends_line(&[a.addr.to_string(), b.addr.to_string()])
    ))
    .await;
    for user in ["alice", "bob", "carol", "dave"] {
        let first = c
            .get(&url3)
            .header("x-user", user)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for _ in 0..5 {
            let again = c
                .get(&url3)
                .header("x-user", user)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert_eq!(again, first, "user {user} is sticky");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_headers_and_strips_hop_by_hop() {
    let a = Running::start("a", |_| {}).unwrap();
    let (_lb, url) = lb(&backends_line(&[a.addr.to_string()])).await;
    let r = client()
        .get(format!("{url}/headers"))
        .header("x-forwarded-for", "198.18.9.9")
        .header("forwarded", "for=198.18.9.9")
        .header("x-real-ip", "198.18.9.9")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "hop")
        .header("keep-alive", "timeout=5")
        .send()
        .await
        .unwrap();
    assert!(r
        .headers()
        .get("via")
        .is_some_and(|v| v.to_str().unwrap().contains("flotilla")));
    let body = r.text().await.unwrap();
    // An untrusted client cannot pose as another address: its claims are replaced.
    assert!(body.contains("x-forwarded-for: 127.0.0.1"), "{body}");
    assert!(!body.contains("198.18.9.9"), "{body}");
    assert!(body.contains("x-forwarded-proto: http"), "{body}");
    assert!(body.contains("via: 1.1 flotilla"), "{body}");
    assert!(
        !body.contains("x-secret"),
        "header named in Connection must not pass: {body}"
    );
    assert!(!body.contains("keep-alive: timeout"), "{body}");
    assert!(body.contains("host: 127.0.0.1"), "{body}");

    // From a trusted proxy the chain is kept and extended.
    let (_lb2, url2) = lb(&format!(
        "trusted_proxies = [\"127.0.0.0/8\"]\n{}",
        backends_line(&[a.addr.to_string()])
    ))
    .await;
    let body = client()
        .get(format!("{url2}/headers"))
        .header("x-forwarded-for", "198.18.9.9")
        .header("x-real-ip", "198.18.9.9")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("x-forwarded-for: 198.18.9.9, 127.0.0.1"),
        "{body}"
    );
    assert!(body.contains("x-real-ip: 198.18.9.9"), "{body}");
}

/// A backend that answers every connection with `response` (raw bytes) and closes.
async fn raw_backend(response: &'static [u8]) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        // Bounded: a test makes a handful of connections.
        for _ in 0..64 {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misframed_backend_responses_become_502_never_a_body() {
    for raw in [
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        &b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello"[..],
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nhello"[..],
    ] {
        let backend = raw_backend(raw).await;
        let (_lb, url) = lb(&format!("retries = 0\n{}", backends_line(&[backend.to_string()]))).await;
        let (status, body) = get(&client(), &url).await;
        assert_eq!(status, 502, "{body}");
        assert!(!body.contains("hello"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_happened() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_lb, url) = lb(&format!(
        "retries = 1\n{}",
        backends_line(&[dead.to_string()])
    ))
    .await;
    let (status, body) = get(&client(), &url).await;
    assert_eq!(status, 502);
    // By default the page names no backend.
    assert!(!body.contains(&dead.to_string()), "{body}");
    assert!(body.contains("bad gateway"), "{body}");
    let (_lbv, urlv) = lb_with(
        "verbose_errors = true",
        &format!("retries = 1\n{}", backends_line(&[dead.to_string()])),
    )
    .await;
    let (status, body) = get(&client(), &urlv).await;
    assert_eq!(status, 502);
    assert!(
        body.contains(&dead.to_string()) && body.contains("connect"),
        "{body}"
    );

    let slow = Running::start("slow", |a| a.latency_ms = 2000).unwrap();
    let (_lb2, url2) = lb_with(
        "verbose_errors = true",
        &format!(
            "request_timeout = \"300ms\"\n{}",
            backends_line(&[slow.addr.to_string()])
        ),
    )
    .await;
    let (status, body) = get(&client(), &url2).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("300ms"), "{body}");

    // Malformed requests never reach a backend.
    let a = Running::start("a", |_| {}).unwrap();
    let (lb3, _) = lb(&backends_line(&[a.addr.to_string()])).await;
    let mut s = tokio::net::TcpStream::connect(lb3.addrs[0]).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let st = flotilla_lb::admin::status(&lb3.listeners);
    assert_eq!(
        st[0].backends[0].requests, 0,
        "the bad request reached no backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gib_streams_through_without_buffering() {
    let a = Running::start("a", |_| {}).unwrap();
    let (_lb, url) = lb(&backends_line(&[a.addr.to_string()])).await;
    const GIB: u64 = 1 << 30;
    let before = rss_kb();
    let chunk = bytes::Bytes::from(vec![7u8; 256 * 1024]);
    let stream = futures::stream::iter(
        (0..GIB / chunk.len() as u64).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let started = Instant::now();
    let r = client()
        .post(format!("{url}/upload"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert_eq!(
        text.trim(),
        GIB.to_string(),
        "the backend received every byte"
    );
    let up = started.elapsed();
    // And down: 1 GiB streamed from the backend.
    let mut resp = client()
        .get(format!("{url}/big?bytes={GIB}"))
        .send()
        .await
        .unwrap();
    let mut got = 0u64;
    while let Some(c) = resp.chunk().await.unwrap() {
        got += c.len() as u64;
    }
    assert_eq!(got, GIB);
    let growth_mb = (rss_kb().saturating_sub(before)) / 1024;
    eprintln!(
        "1 GiB up in {up:?}, down total {:?}; RSS growth {growth_mb} MB",
        started.elapsed()
    );
    assert!(
        growth_mb < 64,
        "memory grew {growth_mb} MB: bodies are being buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_style_upgrade_tunnels_both_ways() {
    let a = Running::start("a", |_| {}).unwrap();
    let (lb, _) = lb(&backends_line(&[a.addr.to_string()])).await;
    let mut s = tokio::net::TcpStream::connect(lb.addrs[0]).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut buf = vec![0; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"hello"[..], b"\x81\x05world", &[0u8; 5000][..]] {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_keeps_half_close_and_retries_connects() {
    let echo = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _svc = Running::start("tcp", |a| a.tcp = Some(echo)).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (lb, _) = lb(&format!(
        "protocol = \"tcp\"\nscheduler = \"round-robin\"\n{}",
        backends_line(&[dead.to_string(), echo.to_string()])
    ))
    .await;
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(lb.addrs[0]).await.unwrap();
        let payload = vec![42u8; 300_000];
        s.write_all(&payload).await.unwrap();
        s.shutdown().await.unwrap(); // half-close: we are done writing, still reading
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            back.len(),
            payload.len(),
            "every byte echoed after our half-close"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_sessions_with_no_bytes_either_way_are_closed_after_the_idle_timeout() {
    let echo = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _svc = Running::start("tcp-idle", |a| a.tcp = Some(echo)).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (lb, _) = lb(&format!(
        "protocol = \"tcp\"\nidle_timeout = \"1s\"\n{}",
        backends_line(&[echo.to_string()])
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(lb.addrs[0]).await.unwrap();
    // Traffic keeps it open past the timeout...
    for _ in 0..3 {
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // ...silence closes it.
    let t0 = Instant::now();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the lb closed the idle session")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
}

/// Drives `concurrency` request loops for `dur`; returns (ok, failed).
async fn load(url: String, concurrency: usize, dur: Duration) -> (u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + dur;
    let c = client();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (ok, failed, c, url) = (ok.clone(), failed.clone(), c.clone(), url.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    let good = match c.get(&url).send().await {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_costs_only_its_in_flight_requests() {
    let a = Running::start("a", |a| a.latency_ms = 5).unwrap();
    let mut b = Running::start("b", |a| a.latency_ms = 5).unwrap();
    let (lb, url) = lb(&format!(
        "scheduler = \"least-conn\"\n{}",
        backends_line(&[a.addr.to_string(), b.addr.to_string()])
    ))
    .await;
    let concurrency = 16;
    let loader = tokio::spawn(load(url, concurrency, Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.kill();
    let (ok, failed) = loader.await.unwrap();
    eprintln!("killed a backend under load: {ok} ok, {failed} failed");
    assert!(ok > 500, "{ok}");
    assert!(
        failed as usize <= concurrency,
        "only requests in flight on the dead backend may fail: {failed}"
    );
    let st = flotilla_lb::admin::status(&lb.listeners);
    assert!(
        st[0]
            .backends
            .iter()
            .any(|x| x.addr == b.addr.to_string() && x.ejections >= 1),
        "dead backend ejected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backend_is_ejected_and_503_explains_an_empty_set() {
    let good = Running::start("good", |_| {}).unwrap();
    let bad = Running::start("bad", |a| a.fail_rate = 1.0).unwrap();
    let (_lb, url) = lb(&format!(
        "outlier = {{ consecutive_failures = 3, base_ejection = \"10s\" }}\nscheduler = \"round-robin\"\nbackends = [\"{}\", \"{}\"]",
        good.addr, bad.addr
    ))
    .await;
    let c = client();
    let mut failures = 0;
    for _ in 0..60 {
        if get(&c, &url).await.0 != 200 {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 3,
        "exactly `consecutive_failures` 5xx reach clients before ejection"
    );

    let (_lb2, url2) = lb("service = \"nothing\"\n[registry]\nurl = \"http://127.0.0.1:1\"").await;
    let (status, body) = get(&c, &url2).await;
    assert_eq!(status, 503);
    assert!(
        body.contains("no passing instance of service \"nothing\""),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served_over_http1_backends() {
    use http_body_util::BodyExt;
    let a = Running::start("a", |_| {}).unwrap();
    let (lb, _) = lb(&backends_line(&[a.addr.to_string()])).await;
    let tcp = tokio::net::TcpStream::connect(lb.addrs[0]).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = hyper::Request::builder()
            .uri(format!("http://{}/headers", lb.addrs[0]))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let body = String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        assert!(body.contains("via: 2 flotilla"), "{body}");
        assert!(
            body.contains(&format!("host: {}", lb.addrs[0])),
            "h2 :authority becomes Host: {body}"
        );
    }
}

/// A raw HTTP/1.1 backend whose answers are scripted per request path; counts the
/// requests and connections it saw. With `close_idle`, it closes each connection that
/// long after answering, without saying so (the keep-alive race every proxy meets).
async fn scripted_backend(
    close_idle: Option<Duration>,
) -> (std::net::SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let conns = Arc::new(AtomicU64::new(0));
    let (r, c) = (requests.clone(), conns.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match close_idle {
                        Some(d) if buf.is_empty() => {
                            match tokio::time::timeout(d, s.read(&mut chunk)).await {
                                Ok(r) => r.unwrap_or(0),
                                Err(_) => return, // idle: close without a word
                            }
                        }
                        _ => s.read(&mut chunk).await.unwrap_or(0),
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    r.fetch_add(1, Ordering::SeqCst);
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let reply: &[u8] = match path.as_str() {
                        "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
                        "/close" => b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end",
                        "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n",
                        "/interim" => b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                    };
                    if s.write_all(reply).await.is_err() || path == "/close" {
                        return;
                    }
                }
            });
        }
    });
    (addr, requests, conns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_messages_are_framed_by_length_chunks_or_close() {
    let (addr, requests, conns) = scripted_backend(None).await;
    let (_lb, url) = lb(&backends_line(&[addr.to_string()])).await;
    let c = client();
    for _ in 0..2 {
        assert_eq!(
            get(&c, &format!("{url}/chunked")).await,
            (200, "hello world".into())
        );
    }
    assert_eq!(
        get(&c, &format!("{url}/interim")).await,
        (200, "final".into())
    );
    let r = c.get(format!("{url}/empty")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(get(&c, &format!("{url}/")).await, (200, "ok".into()));
    // Chunked, interim and empty responses all left the connection reusable.
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "one upstream connection carried all"
    );
    assert_eq!(
        get(&c, &format!("{url}/close")).await,
        (200, "until the end".into())
    );
    assert_eq!(get(&c, &format!("{url}/")).await, (200, "ok".into()));
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "a closed connection is not reused"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 7);
}

/// An lb (no retries) in front of `backend`, one request through it so it pools the
/// connection, and time for the backend (which closes idle connections after 100 ms) to
/// close it behind the lb's back.
async fn lb_with_a_stale_pooled_connection(
    backend: std::net::SocketAddr,
) -> (flotilla_lb::RunningLb, String, reqwest::Client) {
    let (lb, url) = lb(&format!(
        "retries = 0\n{}",
        backends_line(&[backend.to_string()])
    ))
    .await;
    let c = client();
    assert_eq!(get(&c, &url).await, (200, "ok".into()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    (lb, url, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pooled_connections_are_retried_without_sending_twice() {
    let (addr, requests, conns) = scripted_backend(Some(Duration::from_millis(100))).await;
    let (_lb, url, c) = lb_with_a_stale_pooled_connection(addr).await;
    assert_eq!(
        get(&c, &url).await,
        (200, "ok".into()),
        "GET after a silent close"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c.post(&url).body("").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "POST after a silent close");
    assert_eq!(
        requests.load(Ordering::SeqCst),
        3,
        "each request reached the backend once"
    );
    assert_eq!(conns.load(Ordering::SeqCst), 3);
}

/// A backend that answers `200 ok` keep-alive and closes a connection after 100 ms of
/// silence, recording each request as (connection number, method, body) — the body read
/// by its `content-length`.
async fn recording_backend() -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<(u64, String, String)>>>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        for n in 1u64.. {
            let (mut s, _) = l.accept().await.unwrap();
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let head_end = loop {
                        if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break e;
                        }
                        let mut chunk = [0u8; 4096];
                        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut chunk))
                            .await
                        {
                            Ok(Ok(k)) if k > 0 => buf.extend_from_slice(&chunk[..k]),
                            _ => return, // idle or closed: close without a word
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    buf.drain(..head_end + 4);
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while buf.len() < len {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(k) if k > 0 => buf.extend_from_slice(&chunk[..k]),
                            _ => return,
                        }
                    }
                    let body: Vec<u8> = buf.drain(..len).collect();
                    let method = head.split_whitespace().next().unwrap_or("").to_owned();
                    record.lock().unwrap().push((
                        n,
                        method,
                        String::from_utf8_lossy(&body).into_owned(),
                    ));
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// The review's finding: a request with a body retried after a stale pooled connection
/// went out again without its body. A request with a body now gets a connection known to
/// be open, so it arrives once, with its body, even when the pooled connection was
/// closed behind the lb's back (this fails with the old reuse-then-retry: the backend
/// records a POST with an empty body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_is_never_sent_again_without_it() {
    let (addr, seen) = recording_backend().await;
    let (_lb, url, c) = lb_with_a_stale_pooled_connection(addr).await;
    let r = c.post(&url).body("hello").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (1, "GET".to_string(), String::new()),
            (2, "POST".to_string(), "hello".to_string())
        ],
        "the POST went out once, on a new connection, with its body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_after_the_idle_timeout() {
    let (addr, _, _) = scripted_backend(None).await;
    let (lb, _url) = lb(&format!(
        "idle_timeout = \"300ms\"\n{}",
        backends_line(&[addr.to_string()])
    ))
    .await;
    // Silent from the start.
    let mut silent = tokio::net::TcpStream::connect(lb.addrs[0]).await.unwrap();
    let t = Instant::now();
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut b))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "not before the timeout"
    );
    // Half a request head, then silence.
    let mut slow = tokio::net::TcpStream::connect(lb.addrs[0]).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut got))
        .await
        .expect("closed within 5 s")
        .ok();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "not before the timeout"
    );
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"));
}

/// Thread per core: on a single-threaded runtime (as `flotilla lb` runs) the lb starts a
/// runtime per extra worker thread and deals connections out to them in turn.
#[tokio::test(flavor = "current_thread")]
async fn connections_are_served_on_every_worker_thread_and_stop_with_the_lb() {
    let a = Running::start("a", |_| {}).unwrap();
    let text = format!(
        "[runtime]\nworker_threads = 3\n[admin]\nlisten = \"\"\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
        a.addr
    );
    let config: LbConfig =
        flotilla_core::config::parse_toml(std::path::Path::new("test.toml"), &text).unwrap();
    config.validate().unwrap();
    let running = flotilla_lb::start(config).await.unwrap();
    assert_eq!(running.worker_threads(), 3);
    let addr = running.addrs[0];
    // Six keep-alive connections: two on each thread, each carrying ten requests.
    let mut conns = Vec::new();
    for _ in 0..6 {
        conns.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    for conn in conns.iter_mut() {
        for _ in 0..10 {
            conn.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
                .await
                .unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(conn.read(&mut byte).await.unwrap(), 1, "connection closed");
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .expect("content-length")
                .trim()
                .parse()
                .unwrap();
            let mut body = vec![0u8; len];
            conn.read_exact(&mut body).await.unwrap();
            assert_eq!(body, b"a\n");
        }
    }
    // Stopping the lb closes the connections held by every thread, the extra ones too.
    drop(running);
    for conn in conns.iter_mut() {
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut byte))
            .await
            .expect("a connection outlived the lb");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    }
}
