//! Backends that come and go through a real registry (in-process server on the embedded
//! store): swaps under load lose nothing, removed backends drain, new ones ramp up, and
//! a registry outage keeps the last known set serving.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_client::Client;
use flotilla_core::config::ServerConfig;
use flotilla_core::InstanceSpec;
use flotilla_lb::config::LbConfig;
use flotilla_testsvc::Running;

struct Registry {
    _dir: tempfile::TempDir,
    server: Option<flotilla_registry::RunningServer>,
    url: String,
    token_file: std::path::PathBuf,
    client: Client,
}

async fn registry() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        token_file: Some(dir.path().join("token")),
        dns_listen: None,
        ..Default::default()
    };
    let store = flotilla_registry::open_store(&config).await.unwrap();
    let server = flotilla_registry::start(config, store).await.unwrap();
    // TLS, as a real registry serves: the lb finds the CA beside the token file.
    let url = format!("https://{}", server.http_addr);
    let token_file = dir.path().join("token");
    let client = Client::with_tls(
        &url,
        Some(flotilla_client::read_token(&token_file).unwrap()),
        Some(flotilla_client::tls_config(&token_file.with_file_name("ca.pem")).unwrap()),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    Registry {
        _dir: dir,
        server: Some(server),
        url,
        token_file,
        client,
    }
}

fn spec(addr: std::net::SocketAddr) -> InstanceSpec {
    InstanceSpec {
        service: "web".into(),
        node: None,
        address: addr.ip(),
        port: addr.port(),
        weight: 100,
        meta: Default::default(),
        checks: vec![],
        node_checks: false,
    }
}

async fn lb(reg: &Registry, extra: &str) -> flotilla_lb::RunningLb {
    let text = format!(
        "[admin]\nlisten = \"\"\n[registry]\nurl = \"{}\"\ntoken_file = \"{}\"\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nservice = \"web\"\n{extra}\n",
        reg.url,
        reg.token_file.display()
    );
    let config: LbConfig =
        flotilla_core::config::parse_toml(std::path::Path::new("t.toml"), &text).unwrap();
    config.validate().unwrap();
    flotilla_lb::start(config).await.unwrap()
}

async fn wait_backends(lb: &flotilla_lb::RunningLb, n: usize) {
    let start = Instant::now();
    while lb.listeners[0].backends().len() != n {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "lb never saw {n} backends"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn requests_of(lb: &flotilla_lb::RunningLb, addr: std::net::SocketAddr) -> u64 {
    flotilla_lb::admin::status(&lb.listeners)[0]
        .backends
        .iter()
        .filter(|b| b.addr == addr.to_string())
        .map(|b| b.requests)
        .sum()
}

/// Request loops until `stop`; counts successes and failures.
fn load(
    url: String,
    concurrency: usize,
    stop: Arc<AtomicBool>,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let tasks = (0..concurrency)
        .map(|_| {
            let (ok, failed, c, url, stop) = (
                ok.clone(),
                failed.clone(),
                c.clone(),
                url.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let good = match c.get(&url).send().await {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed)
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed)
                    };
                }
            })
        })
        .collect();
    (ok, failed, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_changes_under_load_fail_no_request() {
    let reg = registry().await;
    let a = Running::start("a", |x| x.latency_ms = 2).unwrap();
    let b = Running::start("b", |x| x.latency_ms = 2).unwrap();
    let c = Running::start("c", |x| x.latency_ms = 2).unwrap();
    reg.client.register("a", &spec(a.addr)).await.unwrap();
    reg.client.register("b", &spec(b.addr)).await.unwrap();
    let lb = lb(&reg, "scheduler = \"round-robin\"\nslow_start = \"0s\"").await;
    wait_backends(&lb, 2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, tasks) = load(format!("http://{}/", lb.addrs[0]), 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Add c, then remove a (a keeps running: removal must drain, not cut).
    reg.client.register("c", &spec(c.addr)).await.unwrap();
    wait_backends(&lb, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    reg.client.deregister("a").await.unwrap();
    wait_backends(&lb, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("add + remove under load: {ok} ok, {failed} failed");
    assert!(ok > 300, "{ok}");
    assert_eq!(failed, 0, "a registry change must not fail requests");
    assert!(
        requests_of(&lb, c.addr) > 50,
        "the new backend takes traffic"
    );
    assert_eq!(
        requests_of(&lb, a.addr),
        0,
        "a removed backend leaves the set (and, drained, the status)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_backends_ramp_up_over_slow_start() {
    let reg = registry().await;
    let a = Running::start("a", |_| {}).unwrap();
    let b = Running::start("b", |_| {}).unwrap();
    let n = Running::start("new", |_| {}).unwrap();
    reg.client.register("a", &spec(a.addr)).await.unwrap();
    reg.client.register("b", &spec(b.addr)).await.unwrap();
    let lb = lb(&reg, "scheduler = \"weighted\"\nslow_start = \"3s\"").await;
    wait_backends(&lb, 2).await;
    let url = format!("http://{}/", lb.addrs[0]);
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    reg.client.register("new", &spec(n.addr)).await.unwrap();
    wait_backends(&lb, 3).await;
    let share = |lb: &flotilla_lb::RunningLb| {
        let st = &flotilla_lb::admin::status(&lb.listeners)[0];
        let total: u64 = st.backends.iter().map(|b| b.requests).sum();
        let new: u64 = st
            .backends
            .iter()
            .filter(|b| b.addr == n.addr.to_string())
            .map(|b| b.requests)
            .sum();
        (new, total)
    };
    for _ in 0..300 {
        c.get(&url).send().await.unwrap().bytes().await.unwrap();
    }
    let (early_new, early_total) = share(&lb);
    let early = early_new as f64 / early_total as f64;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    for _ in 0..300 {
        c.get(&url).send().await.unwrap().bytes().await.unwrap();
    }
    let (new, total) = share(&lb);
    let late = (new - early_new) as f64 / (total - early_total) as f64;
    eprintln!("slow start: new backend share {early:.3} at first, {late:.3} after the ramp");
    assert!(early < 0.15, "ramping backend got {early}");
    assert!(
        (late - 1.0 / 3.0).abs() < 0.02,
        "full share after the ramp: {late}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outage_keeps_the_last_known_backends() {
    let mut reg = registry().await;
    let a = Running::start("a", |_| {}).unwrap();
    reg.client.register("a", &spec(a.addr)).await.unwrap();
    let lb = lb(&reg, "").await;
    wait_backends(&lb, 1).await;
    reg.server.take(); // the registry dies
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    for _ in 0..20 {
        let r = c
            .get(format!("http://{}/", lb.addrs[0]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_weights_are_published_and_warm_a_standby() {
    let reg = registry().await;
    let fast = Running::start("fast", |_| {}).unwrap();
    let slow = Running::start("slow", |x| x.latency_ms = 15).unwrap();
    reg.client.register("fast", &spec(fast.addr)).await.unwrap();
    reg.client.register("slow", &spec(slow.addr)).await.unwrap();
    let active = lb(
        &reg,
        "scheduler = \"feedback\"\nfeedback = { period = \"200ms\" }",
    )
    .await;
    wait_backends(&active, 2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (_, failed, tasks) = load(format!("http://{}/", active.addrs[0]), 8, stop.clone());
    // Wait on the condition, not a fixed time: on a busy machine the fast backend is
    // slower too and the controller needs more periods to separate them.
    let published = |view: &flotilla_client::ServiceInstances, id: &str| {
        view.instances
            .iter()
            .find(|i| i.id == id)
            .and_then(|i| i.feedback_weight)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (wf, ws) = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let view = reg
            .client
            .service("web", 0, Duration::ZERO, false)
            .await
            .unwrap();
        let got = (published(&view, "fast"), published(&view, "slow"));
        if let (Some(wf), Some(ws)) = got {
            if wf > ws * 1.5 || std::time::Instant::now() > deadline {
                break (wf, ws);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no published weights: {got:?}"
        );
    };
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(
        wf > ws * 1.5,
        "registry shows the controller's weights: fast {wf}, slow {ws}"
    );

    // A standby lb starts warm: its backends take the published weights before it has
    // seen a single request.
    let standby = lb(
        &reg,
        "scheduler = \"feedback\"\nfeedback = { period = \"200ms\" }",
    )
    .await;
    wait_backends(&standby, 2).await;
    let st = &flotilla_lb::admin::status(&standby.listeners)[0];
    let seeded = |addr: std::net::SocketAddr| {
        st.backends
            .iter()
            .find(|b| b.addr == addr.to_string())
            .and_then(|b| b.feedback_weight)
            .expect("seeded")
    };
    assert!(
        seeded(fast.addr) > seeded(slow.addr) * 1.5,
        "standby starts with the active lb's weights"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_load_reports_steer_the_feedback_weights() {
    let reg = registry().await;
    let hot = Running::start("hot", |_| {}).unwrap();
    let cool = Running::start("cool", |_| {}).unwrap();
    reg.client.register("hot", &spec(hot.addr)).await.unwrap();
    reg.client.register("cool", &spec(cool.addr)).await.unwrap();
    let lb = lb(
        &reg,
        "scheduler = \"feedback\"\nfeedback = { period = \"200ms\" }",
    )
    .await;
    wait_backends(&lb, 2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (_, failed, tasks) = load(format!("http://{}/", lb.addrs[0]), 4, stop.clone());
    // What two agents would report: one container at its CPU quota, one mostly idle.
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        reg.client.report_load("hot", 1.0, 0.1).await.unwrap();
        reg.client.report_load("cool", 0.2, 0.1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    let st = &flotilla_lb::admin::status(&lb.listeners)[0];
    let w = |addr: std::net::SocketAddr| {
        st.backends
            .iter()
            .find(|b| b.addr == addr.to_string())
            .and_then(|b| b.feedback_weight)
            .unwrap_or(100.0)
    };
    let (wh, wc) = (w(hot.addr), w(cool.addr));
    eprintln!("feedback weights from load reports: hot {wh:.1}, cool {wc:.1}");
    assert!(
        wc > wh * 1.2,
        "the idle backend should outweigh the saturated one: hot {wh}, cool {wc}"
    );
}

/// A backend whose host is gone: connections were open, nothing ever answers again
/// (the listener accepts and reads, and never writes).
async fn silent_backend() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_waiting_on_a_backend_that_leaves_the_set_go_to_another() {
    let reg = registry().await;
    let a = Running::start("a", |_| {}).unwrap();
    let (silent, _task) = silent_backend().await;
    reg.client.register("a", &spec(a.addr)).await.unwrap();
    reg.client.register("lost", &spec(silent)).await.unwrap();
    let lb = lb(
        &reg,
        "scheduler = \"round-robin\"\nslow_start = \"0s\"\nrequest_timeout = \"30s\"",
    )
    .await;
    wait_backends(&lb, 2).await;
    let url = format!("http://{}/", lb.addrs[0]);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // Half of these go to the silent backend and wait there.
    let gets: Vec<_> = (0..8)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let r = http
                    .get(&url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                let status = r.status().as_u16();
                Ok::<_, String>((status, r.text().await.map_err(|e| e.to_string())?))
            })
        })
        .collect();
    // A POST may not be sent twice: it keeps waiting on the backend it went to.
    let post = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            for _ in 0..2 {
                // Round robin: one of two consecutive POSTs lands on the silent backend.
                let r = http
                    .post(&url)
                    .body("x")
                    .timeout(Duration::from_secs(3))
                    .send()
                    .await;
                if r.is_err() {
                    return true;
                }
            }
            false
        })
    };
    // Wait until half of the GETs sit on the silent backend (polled: on a loaded
    // machine the spawned requests may take longer than any fixed sleep to arrive).
    let deadline = Instant::now() + Duration::from_secs(5);
    while requests_of(&lb, silent) < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        requests_of(&lb, silent) >= 4,
        "requests went to the silent backend"
    );
    let removed = Instant::now();
    reg.client.deregister("lost").await.unwrap();
    for g in gets {
        let (status, body) = g.await.unwrap().expect("every GET is answered");
        assert_eq!((status, body.trim()), (200, "a"));
    }
    let waited = removed.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "GETs answered {waited:?} after the backend left (grace 0.5 s)"
    );
    assert!(
        post.await.unwrap(),
        "a POST on the lost backend is not sent again elsewhere"
    );
}
