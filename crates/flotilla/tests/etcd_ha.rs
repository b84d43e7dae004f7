//! Two registry servers on a real three-member etcd cluster: one catalog, one checker,
//! and the checking duty moves when its holder is killed; an etcd member may die.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, passing, Server};
use flotilla_testkit::EtcdCluster;
use serde_json::json;

async fn is_leader(server: &Server) -> bool {
    let resp = server
        .http()
        .get(format!("{}/v1/status", server.url))
        .bearer_auth(server.token())
        .send()
        .await;
    match resp {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .map(|v| v["leader"] == true)
            .unwrap_or(false),
        Err(_) => false,
    }
}

#[tokio::test]
async fn two_servers_share_one_catalog_and_the_duty_moves_on_a_crash() {
    let mut etcd = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = etcd.store_url();
    let flags = ["--store", store.as_str()];
    let mut a = Server::start(dir.path(), "a", &flags);
    let mut b = Server::start(dir.path(), "b", &flags);
    let (ca, cb) = (a.client(), b.client());

    // One catalog: written through a, read through b (and blocking on b wakes).
    let idx = cb
        .service("shared", 0, Duration::ZERO, false)
        .await
        .unwrap()
        .index;
    let waiter = {
        let cb = cb.clone();
        tokio::spawn(async move {
            cb.service("shared", idx, Duration::from_secs(10), false)
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    ca.register(
        "s1",
        &serde_json::from_value(json!({"service":"shared","address":"127.0.0.1","port":1}))
            .unwrap(),
    )
    .await
    .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.instances.len(), 1, "b sees a's write");

    // Read-your-writes across servers: an agent may register through one server and check
    // in through another at once (its server died in between); that is never a 404.
    let burst = (0..40).map(|i| {
        let (ca, cb) = (ca.clone(), cb.clone());
        tokio::spawn(async move {
            let id = format!("x{i}");
            let spec = json!({"service":"burst","address":"127.0.0.1","port":10+i});
            ca.register(&id, &serde_json::from_value(spec).unwrap())
                .await
                .unwrap();
            cb.check_in(&id, true, "").await.unwrap_or_else(|e| {
                panic!("check-in of {id} through b right after a wrote it: {e}")
            });
        })
    });
    for task in futures::future::join_all(burst).await {
        task.unwrap();
    }

    // Exactly one server holds the duty.
    eventually(Duration::from_secs(10), "a leader", || async {
        is_leader(&a).await ^ is_leader(&b).await
    })
    .await;
    let a_leads = is_leader(&a).await;

    // A TTL-checked instance: whoever leads must judge it.
    let ttl = json!({"service":"ttl","address":"127.0.0.1","port":2,"checks":[{"type":"ttl","ttl":"2s","interval":"200ms"}]});
    ca.register("t1", &serde_json::from_value(ttl).unwrap())
        .await
        .unwrap();
    cb.check_in("t1", true, "").await.unwrap();
    eventually(Duration::from_secs(5), "ttl instance passing", || async {
        passing(&ca, "ttl").await.len() == 1
    })
    .await;

    // Kill the leader without a goodbye: the survivor takes the duty within the TTL.
    let (dead, survivor) = if a_leads { (&mut a, &b) } else { (&mut b, &a) };
    let killed = Instant::now();
    dead.proc.kill();
    eventually(Duration::from_secs(8), "duty moved", || async {
        is_leader(survivor).await
    })
    .await;
    let moved = killed.elapsed();
    eprintln!("FIGURE duty failover: leader SIGKILL -> survivor leads: {moved:?}");
    assert!(
        moved <= Duration::from_millis(4500),
        "duty moved after {moved:?} (leader TTL 3 s)"
    );

    // The new leader checks: stop renewing and the instance goes critical.
    let cs = survivor.client();
    eventually(
        Duration::from_secs(8),
        "new leader expires the TTL check",
        || async { passing(&cs, "ttl").await.is_empty() },
    )
    .await;

    // An etcd member dies: the survivor keeps serving reads and writes.
    etcd.members[0].kill();
    eventually(
        Duration::from_secs(15),
        "write after member loss",
        || async {
            cs.register(
                "s2",
                &serde_json::from_value(json!({"service":"shared","address":"127.0.0.1","port":3}))
                    .unwrap(),
            )
            .await
            .is_ok()
        },
    )
    .await;
    let all = cs
        .service("shared", 0, Duration::ZERO, false)
        .await
        .unwrap();
    assert_eq!(all.instances.len(), 2);
    cs.check_in("t1", true, "").await.unwrap();
    eventually(
        Duration::from_secs(5),
        "checking continues after member loss",
        || async { passing(&cs, "ttl").await.len() == 1 },
    )
    .await;
}

/// An agent and an lb pointed at two servers: SIGKILL the server they use, and nothing on
/// the healthy host goes critical or leaves, and the lb keeps answering.
#[tokio::test]
async fn agents_and_lbs_move_to_the_next_server_when_theirs_dies() {
    let etcd = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = etcd.store_url();
    let flags = ["--store", store.as_str()];
    let mut a = Server::start(dir.path(), "a", &flags);
    let b = Server::start(dir.path(), "b", &flags);
    let both = format!("{},{}", a.url, b.url);
    let token = a.token_file.display().to_string();
    let node = flotilla_testkit::unique("fo");
    let _agent = common::Proc::spawn(
        &[
            "agent",
            "--server",
            &both,
            "--token-file",
            &token,
            "--node",
            &node,
            "--api-listen",
            "127.0.0.1:0",
            "--lease-ttl",
            "2s",
        ],
        dir.path().join("agent.log"),
    );
    let net = flotilla_testkit::DockerNetwork::create("flotilla-fo").unwrap();
    let image = flotilla_testkit::busybox_image().unwrap();
    let service = flotilla_testkit::unique("fo")
        .replace('_', "-")
        .to_lowercase();
    let service_label = format!("flotilla.service={service}");
    let _web = flotilla_testkit::Container::run(
        &flotilla_testkit::unique("flotilla-fo"),
        &[
            "--network",
            &net.name,
            "-l",
            &service_label,
            "-l",
            "flotilla.port=80",
            "-l",
            "flotilla.check.http=/health",
            "-l",
            "flotilla.check.interval=200ms",
            image,
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ],
    )
    .unwrap();
    let cb = b.client();
    eventually(Duration::from_secs(20), "instance passing", || async {
        passing(&cb, &service).await.len() == 1
    })
    .await;

    let lb_port = flotilla_testkit::free_port();
    let lb_conf = dir.path().join("lb.toml");
    std::fs::write(
        &lb_conf,
        format!(
            "[admin]\nlisten = \"\"\n[registry]\nurls = [\"{}\", \"{}\"]\ntoken_file = \"{token}\"\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:{lb_port}\"\nscheduler = \"round-robin\"\n\
             service = \"{service}\"\nslow_start = \"0s\"\n",
            a.url, b.url
        ),
    )
    .unwrap();
    let _lb = common::Proc::spawn(
        &["lb", "--config", &lb_conf.display().to_string()],
        dir.path().join("lb.log"),
    );
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let lb_url = format!("http://127.0.0.1:{lb_port}/health");
    eventually(Duration::from_secs(20), "lb answers", || async {
        http.get(&lb_url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;

    // Kill the first server of every list, then watch through the other for three lease
    // TTLs plus the leader TTL: the node, its instance and the lb's backend all stay.
    a.proc.kill();
    let killed = Instant::now();
    let (mut samples, mut lb_ok) = (0, 0);
    while killed.elapsed() < Duration::from_secs(10) {
        let nodes = cb.nodes().await.unwrap();
        assert!(
            nodes.iter().any(|n| n.name == node),
            "node left after {:?}",
            killed.elapsed()
        );
        let up = passing(&cb, &service).await;
        assert_eq!(
            up.len(),
            1,
            "instance not passing {:?} after the kill",
            killed.elapsed()
        );
        samples += 1;
        if http
            .get(&lb_url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            lb_ok += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        lb_ok,
        samples,
        "the lb failed {} of {samples} requests",
        samples - lb_ok
    );
    // The lease is still being renewed (through b): its renewal time keeps moving.
    let renewed_ms = || async {
        let nodes = cb.nodes().await.unwrap();
        nodes
            .into_iter()
            .find(|n| n.name == node)
            .unwrap()
            .renewed_ms
    };
    let renewed = renewed_ms().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = renewed_ms().await;
    assert!(later > renewed, "lease not renewed after the server died");
}

/// `--store etcds://`: the server talks TLS to an etcd that requires client
/// certificates, with its own CA, certificate and key (issue 14); without the CA the
/// config is refused before anything starts.
#[tokio::test]
async fn the_catalog_lives_in_an_etcd_reached_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now();
    let hour = Duration::from_secs(3600);
    let etcd_ca = flotilla_tls::ClusterCa::generate(now).unwrap();
    let served = etcd_ca
        .issue_server(&["127.0.0.1".into()], now, hour)
        .unwrap();
    let csr = flotilla_tls::node_csr("flotilla-server").unwrap();
    let client_cert = etcd_ca
        .sign_node_csr(&csr.cert_pem, "flotilla-server", now, hour)
        .unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let files = flotilla_testkit::EtcdTlsFiles {
        cert: file("etcd.pem", &served.cert_pem),
        key: file("etcd.key", &served.key_pem),
        ca: file("etcd-ca.pem", etcd_ca.cert_pem()),
    };
    let (cert, key) = (
        file("client.pem", &client_cert),
        file("client.key", &csr.key_pem),
    );
    let etcd = flotilla_testkit::EtcdCluster::start_tls(1, &files).unwrap();
    let url = etcd.store_url();
    assert!(url.starts_with("etcds://"), "{url}");

    // No CA: exit 2 naming the field, nothing bound.
    let out = std::process::Command::new(common::BIN)
        .args(["server", "--store", &url, "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("etcd_ca"), "{err}");

    let (ca, cert, key) = (
        files.ca.display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    );
    let server = Server::start(
        dir.path(),
        "s",
        &[
            "--store",
            &url,
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
        ],
    );
    let client = server.client();
    client
        .register_node("n1", Duration::from_secs(60), None, None)
        .await
        .unwrap();
    let spec: flotilla_core::InstanceSpec = serde_json::from_value(
        json!({"service": "web", "address": "127.0.0.1", "port": 9, "node": "n1"}),
    )
    .unwrap();
    client.register("n1-000000000001", &spec).await.unwrap();
    assert!(client
        .instances()
        .await
        .unwrap()
        .iter()
        .any(|i| i.id == "n1-000000000001"));
    // The cluster CA the server made lives in that etcd too (one CA for all servers).
    let out = std::process::Command::new("etcdctl")
        .args(["--cacert", &ca, "--cert", &cert, "--key", &key])
        .args(["--endpoints", &format!("https://{}", etcd.endpoints()[0])])
        .args(["get", "--keys-only", "--prefix", "/flotilla/tls/"])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/flotilla/tls/ca"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
