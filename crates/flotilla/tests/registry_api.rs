//! The registry's API on a real server process: auth, validation, blocking queries,
//! DNS, TTL checks, persistence across restarts.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{eventually, passing, Server};
use serde_json::{json, Value};

async fn raw(
    server: &Server,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    let mut req = server.http().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// `raw` PUT of a JSON body with `token`.
async fn put(server: &Server, url: &str, token: &str, body: &Value) -> (u16, Value) {
    let body = Some(body.to_string().into_bytes());
    raw(server, reqwest::Method::PUT, url, Some(token), body).await
}

fn spec(port: u16) -> Value {
    json!({ "service": "api", "address": "127.0.0.1", "port": port })
}

#[tokio::test]
async fn writes_need_the_token_and_bad_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    // Made-up methods are counted as "other": they cannot add metric labels.
    for m in ["BREW", "WHEN", "FOO"] {
        let _ = server
            .http()
            .request(
                reqwest::Method::from_bytes(m.as_bytes()).unwrap(),
                format!("{}/v1/instances", server.url),
            )
            .send()
            .await
            .unwrap();
    }
    let metrics = server
        .http()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("BREW") && !metrics.contains("FOO"),
        "{metrics}"
    );
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    let token = server.token();
    let meta = std::fs::metadata(&server.token_file).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600,
        "token file is private"
    );
    let url = format!("{}/v1/instances/a1", server.url);
    let body = serde_json::to_vec(&spec(1)).unwrap();

    let (s, _) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        None,
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, 401);
    let (s, _) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some("not-the-token"),
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, 401);
    let (s, _) = raw(
        &server,
        reqwest::Method::GET,
        &format!("{}/v1/services", server.url),
        None,
        None,
    )
    .await;
    assert_eq!(s, 401, "reads need the token unless open_reads");

    let (s, v) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(b"{\"service\": ".to_vec()),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (400, Some("body")), "{v}");
    let (s, v) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(br#"{"service":"api","address":"127.0.0.1","port":70000}"#.to_vec()),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (400, Some("port")), "{v}");
    let (s, v) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(br#"{"service":"API!","address":"127.0.0.1","port":7}"#.to_vec()),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (400, Some("service")), "{v}");
    let bad_check = json!({"service":"api","address":"127.0.0.1","port":7,"checks":[{"type":"http","path":"/","fall":0}]});
    let (s, v) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(serde_json::to_vec(&bad_check).unwrap()),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (400, Some("checks[0].fall")),
        "{v}"
    );
    let (s, v) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(br#"{"service":"api","address":"127.0.0.1","port":7,"colour":"red"}"#.to_vec()),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (400, Some("colour")), "{v}");
    let big =
        json!({"service":"api","address":"127.0.0.1","port":7,"meta":{"x":"y".repeat(100_000)}});
    let (s, v) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(serde_json::to_vec(&big).unwrap()),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (413, Some("body")), "{v}");
    let (s, v) = raw(
        &server,
        reqwest::Method::PUT,
        &format!("{}/v1/instances/..%2Fetc", server.url),
        Some(&token),
        Some(body.clone()),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (400, Some("id")), "{v}");
    let with_node = json!({"service":"api","address":"127.0.0.1","port":7,"node":"ghost"});
    let (s, v) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(serde_json::to_vec(&with_node).unwrap()),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (409, Some("node")), "{v}");

    // Nothing above changed the catalog.
    let (s, v) = raw(
        &server,
        reqwest::Method::GET,
        &format!("{}/v1/instances", server.url),
        Some(&token),
        None,
    )
    .await;
    assert_eq!((s, v), (200, json!([])));
    let (_, status) = raw(
        &server,
        reqwest::Method::GET,
        &format!("{}/v1/status", server.url),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status["index"], 0, "no write reached the store: {status}");

    // And the valid request works.
    let (s, v) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(body),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = raw(
        &server,
        reqwest::Method::GET,
        &format!("{}/metrics", server.url),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn blocking_query_wakes_on_change_and_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    client
        .register("a1", &serde_json::from_value(spec(1)).unwrap())
        .await
        .unwrap();
    let index = client
        .service("api", 0, Duration::ZERO, false)
        .await
        .unwrap()
        .index;
    assert!(index > 0);

    // Nothing changes: the query returns after the wait with the same index.
    let t = Instant::now();
    let same = client
        .service("api", index, Duration::from_millis(700), false)
        .await
        .unwrap();
    let waited = t.elapsed();
    assert_eq!(same.index, index);
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );

    // A change to another service does not wake it; a change to this one does, at once.
    let c2 = client.clone();
    let watcher = tokio::spawn(async move {
        let t = Instant::now();
        let r = c2
            .service("api", index, Duration::from_secs(20), false)
            .await
            .unwrap();
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other = serde_json::json!({"service":"other","address":"127.0.0.1","port":2});
    client
        .register("o1", &serde_json::from_value(other).unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !watcher.is_finished(),
        "a change to another service must not wake the watcher"
    );
    let changed = Instant::now();
    client
        .register("a2", &serde_json::from_value(spec(2)).unwrap())
        .await
        .unwrap();
    let (r, _) = watcher.await.unwrap();
    let latency = changed.elapsed();
    assert!(r.index > index);
    assert_eq!(r.instances.len(), 2);
    assert!(latency < Duration::from_secs(1), "woke after {latency:?}");
    eprintln!("blocking watcher woke {latency:?} after the change was sent");
}

/// A watch on a part nothing has written yet (no stacks, no token changes, a service
/// never registered) must block like any other: once the store holds any write, the
/// index such a part hands out is the store's revision, never 0 (index 0 asks for no
/// wait). Before this held, an idle agent fed back 0 and spun: ~560 requests a second to
/// its engine and the registry.
#[tokio::test]
async fn a_watch_on_a_part_nothing_has_written_yet_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let token = std::fs::read_to_string(&server.token_file).unwrap();
    let token = token.trim();
    let client = server.client();
    // A cluster's first write is an agent's registration; stacks and tokens stay unwritten.
    client
        .register("a1", &serde_json::from_value(spec(1)).unwrap())
        .await
        .unwrap();
    let get = |url: String| {
        let req = server.http().get(url).bearer_auth(token);
        async move { req.send().await.unwrap() }
    };
    let mut handed = std::collections::HashMap::new();
    for path in ["/v1/stacks", "/v1/tokens/index", "/v1/services/never-seen"] {
        let resp = get(format!("{}{path}?index=0", server.url)).await;
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        let header: u64 = resp.headers()["x-flotilla-index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        // 0 would mean "do not wait" when fed back: a watcher would spin.
        assert!(header >= 1, "{path} handed out index {header}");
        let body: Value = resp.json().await.unwrap();
        if let Some(i) = body.get("index").and_then(Value::as_u64) {
            assert_eq!(i, header, "{path}: body and header disagree");
        }
        // Fed back, the index blocks for the wait instead of answering at once.
        let t = Instant::now();
        let resp = get(format!("{}{path}?index={header}&wait=700ms", server.url)).await;
        let waited = t.elapsed();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        assert!(
            waited >= Duration::from_millis(650),
            "{path} with index {header} answered after {waited:?}: a watcher would spin"
        );
        handed.insert(path, header);
    }

    // The token watch waits on tokens alone: another service's write does not wake it,
    // and the first token made does (the handed-out index is below that write's).
    let since = handed["/v1/tokens/index"];
    let watcher = {
        let c = client.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let i = c
                .tokens_index(since, Duration::from_secs(20))
                .await
                .unwrap();
            (i, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .register("a2", &serde_json::from_value(spec(2)).unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !watcher.is_finished(),
        "an instance write woke the token watch"
    );
    client
        .create_token(flotilla_core::token::Role::Read, None, None)
        .await
        .unwrap();
    let (index, waited) = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("the first token made did not wake the token watch")
        .unwrap();
    assert!(index > since, "token index {index} after {since}");
    assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
}

#[tokio::test]
async fn a_delta_watch_sends_only_what_changed_and_the_follower_keeps_the_whole_set() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    for (id, port) in [("a1", 1), ("a2", 2)] {
        client
            .register(id, &serde_json::from_value(spec(port)).unwrap())
            .await
            .unwrap();
    }
    let mut follower = flotilla_client::follow::ServiceFollower::new(client.clone(), "api", false);
    let first = follower.next(Duration::ZERO).await.unwrap();
    assert!(
        !first.delta,
        "a follower that saw nothing gets the whole service"
    );
    assert_eq!(follower.len(), 2);

    // A third instance: the answer carries it alone.
    let mut f = follower.clone();
    let watcher = tokio::spawn(async move {
        let r = f.next(Duration::from_secs(20)).await.unwrap();
        (r, f)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .register("a3", &serde_json::from_value(spec(3)).unwrap())
        .await
        .unwrap();
    let (r, mut follower) = watcher.await.unwrap();
    assert!(r.delta, "{r:?}");
    let ids: Vec<_> = r.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a3"]);
    assert!(r.removed.is_empty());
    assert_eq!(follower.len(), 3);

    // A deregistration: the id under `removed`, nothing else.
    client.deregister("a1").await.unwrap();
    let r = follower.next(Duration::from_secs(20)).await.unwrap();
    assert!(r.delta && r.instances.is_empty(), "{r:?}");
    assert_eq!(r.removed, ["a1"]);
    let whole = client
        .service("api", 0, Duration::ZERO, false)
        .await
        .unwrap();
    assert_eq!(
        follower.instances().cloned().collect::<Vec<_>>(),
        whole.instances,
        "the follower holds what a whole read gives"
    );

    // Unchanged after the wait: an empty delta at the same index.
    let r = follower.next(Duration::from_millis(300)).await.unwrap();
    assert!(r.delta && r.instances.is_empty() && r.removed.is_empty());
    assert_eq!(r.index, whole.index);

    // An index from another catalog (ahead of this one): the whole service.
    let r = client
        .service_changes("api", whole.index + 1000, Duration::ZERO, false)
        .await
        .unwrap();
    assert!(!r.delta);
    assert_eq!(r.instances.len(), 2);

    let (status, body) = raw(
        &server,
        reqwest::Method::GET,
        &format!("{}/v1/services/api?index=1&delta=maybe", server.url),
        Some(&server.token()),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("delta"), "{body}");
    let (_, metrics) = raw(
        &server,
        reqwest::Method::GET,
        &format!("{}/metrics", server.url),
        Some(&server.token()),
        None,
    )
    .await;
    let answered = metrics
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("flotilla_registry_service_delta_answers_total "))
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(answered, Some(3.0), "three delta answers so far");
}

fn dig(port: u16, name: &str, qtype: &str) -> String {
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            name,
            qtype,
            "+short",
            "+tries=3",
            "+time=2",
        ])
        .output()
        .expect("dig (install dnsutils)");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn dns_answers_a_and_srv_for_passing_instances() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let a = json!({"service":"web","address":"198.18.1.10","port":8080,"weight":300});
    let b = json!({"service":"web","address":"198.18.1.11","port":8081});
    // A TTL-checked instance that never checks in stays critical and out of DNS.
    let c = json!({"service":"web","address":"198.18.1.12","port":8082,"checks":[{"type":"ttl","ttl":"5s"}]});
    client
        .register("a", &serde_json::from_value(a).unwrap())
        .await
        .unwrap();
    client
        .register("b", &serde_json::from_value(b).unwrap())
        .await
        .unwrap();
    client
        .register("c", &serde_json::from_value(c).unwrap())
        .await
        .unwrap();

    let a_records = dig(server.dns_port, "web.service.flotilla", "A");
    let mut lines: Vec<&str> = a_records.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        ["198.18.1.10", "198.18.1.11"],
        "dig output: {a_records}"
    );

    let srv = dig(server.dns_port, "web.service.flotilla", "SRV");
    assert!(srv.contains("1 300 8080 c612010a.addr.flotilla."), "{srv}");
    assert!(srv.contains("1 100 8081 c612010b.addr.flotilla."), "{srv}");
    assert!(
        !srv.contains("8082"),
        "critical instance must not be served: {srv}"
    );
    assert_eq!(
        dig(server.dns_port, "c612010a.addr.flotilla", "A").trim(),
        "198.18.1.10"
    );

    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &server.dns_port.to_string(),
            "nothing.service.flotilla",
            "A",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("NXDOMAIN"));

    // Renewing the TTL check brings c in.
    client.check_in("c", true, "alive").await.unwrap();
    eventually(Duration::from_secs(5), "c passing", || async {
        passing(&client, "web").await.len() == 3
    })
    .await;
    assert!(dig(server.dns_port, "web.service.flotilla", "SRV").contains("8082"));
}

#[tokio::test]
async fn ttl_check_goes_critical_when_renewals_stop() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let c = json!({"service":"job","address":"127.0.0.1","port":1,
                   "checks":[{"type":"ttl","ttl":"1s","interval":"200ms","fall":1}]});
    client
        .register("t1", &serde_json::from_value(c).unwrap())
        .await
        .unwrap();
    assert!(
        passing(&client, "job").await.is_empty(),
        "new instance starts critical"
    );
    client.check_in("t1", true, "").await.unwrap();
    eventually(Duration::from_secs(3), "passing after check-in", || async {
        passing(&client, "job").await.len() == 1
    })
    .await;
    let stopped = Instant::now();
    eventually(Duration::from_secs(4), "critical after silence", || async {
        passing(&client, "job").await.is_empty()
    })
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_millis(800),
        "went critical before the TTL ran out"
    );
    // A critical check-in is critical at once.
    client.check_in("t1", true, "").await.unwrap();
    eventually(Duration::from_secs(3), "passing again", || async {
        passing(&client, "job").await.len() == 1
    })
    .await;
    client.check_in("t1", false, "disk full").await.unwrap();
    eventually(
        Duration::from_secs(3),
        "critical on a failing report",
        || async { passing(&client, "job").await.is_empty() },
    )
    .await;
    let view = client
        .service("job", 0, Duration::ZERO, false)
        .await
        .unwrap();
    assert_eq!(view.instances[0].output, "disk full");
}

#[tokio::test]
async fn http_check_hysteresis_and_deregister_after_on_a_real_socket() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    // A real HTTP endpoint whose answer the test flips.
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = healthy.clone();
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                if h.load(std::sync::atomic::Ordering::Relaxed) {
                    (axum::http::StatusCode::OK, "ok")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no")
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let s = json!({"service":"web","address":"127.0.0.1","port":port,
                   "checks":[{"type":"http","path":"/health","interval":"200ms","rise":2,"fall":2,"deregister_after":"1500ms"}]});
    client
        .register("h1", &serde_json::from_value(s).unwrap())
        .await
        .unwrap();
    let up = eventually(Duration::from_secs(3), "passing", || async {
        passing(&client, "web").await.len() == 1
    })
    .await;
    assert!(
        up >= Duration::from_millis(150),
        "rise 2 needs two probes, got passing after {up:?}"
    );
    healthy.store(false, std::sync::atomic::Ordering::Relaxed);
    eventually(Duration::from_secs(3), "critical", || async {
        passing(&client, "web").await.is_empty()
    })
    .await;
    let view = client
        .service("web", 0, Duration::ZERO, false)
        .await
        .unwrap();
    assert!(
        view.instances[0].output.contains("503"),
        "{:?}",
        view.instances[0].output
    );
    eventually(
        Duration::from_secs(5),
        "deregistered after 1.5s critical",
        || async {
            client
                .service("web", 0, Duration::ZERO, false)
                .await
                .unwrap()
                .instances
                .is_empty()
        },
    )
    .await;
}

#[tokio::test]
async fn embedded_catalog_survives_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    client
        .register("keep", &serde_json::from_value(spec(9)).unwrap())
        .await
        .unwrap();
    let before = client
        .service("api", 0, Duration::ZERO, false)
        .await
        .unwrap();
    server.restart(dir.path(), "s");
    let client = server.client();
    let after = client
        .service("api", 0, Duration::ZERO, false)
        .await
        .unwrap();
    assert_eq!(after.instances.len(), 1);
    assert_eq!(after.instances[0].id, "keep");
    assert_eq!(after.index, before.index, "the index survives too");
    client
        .register("more", &serde_json::from_value(spec(10)).unwrap())
        .await
        .unwrap();
    assert!(
        client
            .service("api", 0, Duration::ZERO, false)
            .await
            .unwrap()
            .index
            > before.index
    );
}

#[tokio::test]
async fn bad_config_exits_2_naming_file_line_and_key_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let port = flotilla_testkit::free_port();
    let cfg = dir.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!("listen = \"127.0.0.1:{port}\"\nstore = \"embedded\"\nlisen = 1\n"),
    )
    .unwrap();
    let out = Command::new(common::BIN)
        .args(["server", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("server.toml") && err.contains("line 3") && err.contains("lisen"),
        "{err}"
    );
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "port must not have been bound"
    );

    std::fs::write(&cfg, "store = \"redis://x:1\"\n").unwrap();
    let out = Command::new(common::BIN)
        .args(["server", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("store") && err.contains("redis://x:1"),
        "{err}"
    );

    let out = Command::new(common::BIN)
        .args(["server", "--listen", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(common::BIN)
        .args([
            "agent",
            "--server",
            "ftp://x",
            "--token-file",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn sse_stream_reports_each_service_change_with_its_instances() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let resp = server
        .http()
        .get(format!("{}/v1/events?service=api", server.url))
        .bearer_auth(server.token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    client
        .register(
            "skip",
            &serde_json::from_value(json!({"service":"other","address":"127.0.0.1","port":1}))
                .unwrap(),
        )
        .await
        .unwrap();
    client
        .register("e1", &serde_json::from_value(spec(5)).unwrap())
        .await
        .unwrap();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !text.contains("\n\n") && Instant::now() < deadline {
        if let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(1), body.next()).await
        {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(text.contains("event: service"), "{text}");
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let ev: Value = serde_json::from_str(data).unwrap();
    assert_eq!(ev["service"], "api", "filtered to the service asked for");
    assert_eq!(ev["instances"][0]["id"], "e1");
    assert_eq!(ev["instances"][0]["health"], "passing");
}

#[tokio::test]
async fn published_weights_are_validated_and_served_per_instance() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    client
        .register("a1", &serde_json::from_value(spec(81)).unwrap())
        .await
        .unwrap();
    let url = format!("{}/v1/services/api/weights", server.url);
    let token = server.token();
    let (s, v) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(br#"{"weights":{"nonsense":5}}"#.to_vec()),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (400, Some("weights.nonsense")),
        "{v}"
    );
    let (s, v) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(br#"{"weights":{"127.0.0.1:81":-1}}"#.to_vec()),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (400, Some("weights.127.0.0.1:81")),
        "{v}"
    );
    let (s, _) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        None,
        Some(br#"{"weights":{"127.0.0.1:81":5}}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 401);
    assert_eq!(
        client
            .service("api", 0, Duration::ZERO, false)
            .await
            .unwrap()
            .instances[0]
            .feedback_weight,
        None
    );
    let w = [("127.0.0.1:81".to_string(), 137.5)].into_iter().collect();
    client.publish_weights("api", "lb-1", &w).await.unwrap();
    let view = client
        .service("api", 0, Duration::ZERO, false)
        .await
        .unwrap();
    assert_eq!(view.instances[0].feedback_weight, Some(137.5));
}

/// An lb's report: an lb token may put it (whatever its service scope), a read token
/// may not; a bad field is a 400 naming it with nothing stored; readers see it with
/// its age, and a blocking list wakes on the next report.
#[tokio::test]
async fn lb_reports_are_checked_stored_and_listed_with_their_age() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let admin = server.client();
    let lb_token = admin
        .create_token(flotilla_core::token::Role::Lb, Some("web"), None)
        .await
        .unwrap()
        .token;
    let read_token = admin
        .create_token(flotilla_core::token::Role::Read, None, None)
        .await
        .unwrap()
        .token;
    let url = format!("{}/v1/lbs/lb-a", server.url);

    let good = serde_json::json!({
        "period_ms": 1000,
        "ha": {"state": "backup", "priority": 100, "vips": ["198.18.0.100/24"], "transitions": 1,
               "history": [{"at_ms": 1, "from": "init", "to": "backup", "reason": "start"}]},
        "listeners": [{"name": "front", "service": "web", "requests_per_s": 10.0,
                       "failures_per_s": 0.0, "p99_ms": 2.0, "backends": 2}]
    });
    let mut bad = good.clone();
    bad["listeners"][0]["p99_ms"] = serde_json::json!(-1.0);
    let (s, v) = put(&server, &url, &lb_token, &bad).await;
    assert_eq!((s, v["field"].as_str()), (400, Some("listeners[0]")), "{v}");
    let mut bad = good.clone();
    bad["ha"]["state"] = serde_json::json!("boss");
    let (s, v) = put(&server, &url, &lb_token, &bad).await;
    assert_eq!((s, v["field"].as_str()), (400, Some("ha.state")), "{v}");
    let (s, _) = put(&server, &url, &read_token, &good).await;
    assert_eq!(s, 403);
    let bad_name = format!("{}/v1/lbs/.hidden", server.url);
    let (s, _) = put(&server, &bad_name, &lb_token, &good).await;
    assert_eq!(s, 400);
    assert!(
        admin.lbs().await.unwrap().is_empty(),
        "a refused report was stored"
    );

    let (s, v) = put(&server, &url, &lb_token, &good).await;
    assert_eq!(s, 200, "{v}");
    let reader = flotilla_client::Client::with_tls(&server.url, Some(read_token), server.tls());
    let listed = reader.lbs().await.unwrap();
    assert_eq!(listed.len(), 1);
    let lb = &listed[0];
    assert_eq!(lb.name, "lb-a");
    assert!(!lb.stale && lb.age_ms < 5_000, "{lb:?}");
    assert!(lb.report.at_ms > 0, "stamped by the server");
    assert_eq!(lb.report.ha.as_ref().unwrap().state, "backup");
    assert_eq!(lb.report.listeners[0].service.as_deref(), Some("web"));
    // A blocking list waits for the next report.
    let index = raw(
        &server,
        reqwest::Method::GET,
        &format!("{}/v1/lbs", server.url),
        Some(&server.token()),
        None,
    )
    .await;
    assert_eq!(index.0, 200);
    let resp = server
        .http()
        .get(format!("{}/v1/lbs", server.url))
        .bearer_auth(server.token())
        .send()
        .await
        .unwrap();
    let at = resp.headers()["x-flotilla-index"]
        .to_str()
        .unwrap()
        .to_owned();
    let waiting = {
        let http = server.http();
        let u = format!("{}/v1/lbs?index={at}&wait=10s", server.url);
        let t = server.token();
        tokio::spawn(async move {
            http.get(u)
                .bearer_auth(t)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut master = good.clone();
    master["ha"]["state"] = serde_json::json!("master");
    let (s, _) = put(&server, &url, &lb_token, &master).await;
    assert_eq!(s, 200);
    let woke = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(woke[0]["ha"]["state"], "master", "{woke}");
}

/// A deploy refuses a recovery grace shorter than a live node's lease TTL (naming the
/// field, storing nothing); the elected server assigns each stateful replica to a node;
/// `recover` refuses a node that is not live, an archive that is not the replica's, and
/// a service without backups — each naming what was wrong.
#[tokio::test]
async fn stateful_replicas_are_assigned_and_bad_recovery_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let token = server.token();
    client
        .register_node("n1", Duration::from_secs(5), Some("127.0.0.1"), None)
        .await
        .unwrap();
    let deploy_body = |grace: &str, with_backup: bool| {
        let policy = if with_backup { "restore" } else { "wait" };
        let backup = if with_backup {
            "[service.web.backup]\ninterval = \"1h\"\ndir = \"/tmp/bk\"\n"
        } else {
            ""
        };
        let text = format!(
            "name = \"x\"\n[service.web]\nport = 80\nimage = {{ base = \"busybox\" }}\n\
             [[service.web.volume]]\nname = \"data\"\npath = \"/data\"\n{backup}\
             [service.web.recovery]\non_node_loss = \"{policy}\"\ngrace = \"{grace}\"\n"
        );
        let file = dir.path().join("stack.toml");
        std::fs::write(&file, text).unwrap();
        let spec = flotilla_core::stack::StackSpec::load(&file).unwrap();
        let web = spec.services["web"].clone();
        serde_json::to_vec(&json!({ "services": { "web": {
            "spec": web, "image": "flotilla/x-web:1", "image_id": "sha256:1",
            "spec_hash": "0123456789abcdef" } } }))
        .unwrap()
    };
    let url = format!("{}/v1/stacks/x", server.url);
    let (status, body) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(deploy_body("3s", true)),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "services.web.spec.recovery.grace", "{body}");
    assert!(client.stack("x").await.is_err(), "nothing stored");
    let (status, body) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(deploy_body("6s", true)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(10), "the replica assigned", || async {
        client
            .assignments(0, Duration::ZERO)
            .await
            .is_ok_and(|(_, a)| {
                a.get("x/web/0")
                    .is_some_and(|r| r.node == "n1" && r.generation == 1)
            })
    })
    .await;
    let recover = format!("{}/v1/assignments/x/web/0/recover", server.url);
    for (body, field) in [
        (json!({ "to": "nope" }), "to"),
        (
            json!({ "archive": "../x-web-0-1.flotilla-backup" }),
            "archive",
        ),
        (json!({ "archive": "x-web-1-1.flotilla-backup" }), "archive"),
    ] {
        let (status, reply) = raw(
            &server,
            reqwest::Method::POST,
            &recover,
            Some(&token),
            Some(serde_json::to_vec(&body).unwrap()),
        )
        .await;
        assert_eq!(
            (status, reply["field"].as_str()),
            (400, Some(field)),
            "{reply}"
        );
    }
    let (status, _) = raw(
        &server,
        reqwest::Method::POST,
        &format!("{}/v1/assignments/x/web/9/recover", server.url),
        Some(&token),
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(status, 404);
    // Without backups there is nothing to restore from.
    let (status, body) = raw(
        &server,
        reqwest::Method::PUT,
        &url,
        Some(&token),
        Some(deploy_body("6s", false)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, reply) = raw(
        &server,
        reqwest::Method::POST,
        &recover,
        Some(&token),
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(
        (status, reply["field"].as_str()),
        (422, Some("service")),
        "{reply}"
    );
    let (_, a) = client.assignments(0, Duration::ZERO).await.unwrap();
    assert_eq!(
        a["x/web/0"].generation, 1,
        "no refused request moved anything"
    );
}
