//! The control plane's security on real processes: agents join by the pinned CA hash
//! and talk mutual TLS, nothing secret crosses the wire in clear (a socket tap looks),
//! a node certificate speaks for its own node only, foreign and expired certificates
//! are refused, and certificates renew without the lease lapsing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{eventually, Proc, Server, BIN};
use flotilla_testkit::tap::Tap;
use serde_json::json;

/// The `--ca-hash` of the join line the server printed.
fn printed_pin(server: &Server) -> String {
    let log = server.proc.log_text();
    log.split_whitespace()
        .skip_while(|w| *w != "--ca-hash")
        .nth(1)
        .unwrap_or_else(|| panic!("no join line in the server's output:\n{log}"))
        .to_owned()
}

/// An agent joining `url` as `node` with the pin, its key material in `data`.
fn join(dir: &Path, url: &str, token_file: &Path, pin: &str, node: &str, extra: &[&str]) -> Proc {
    let data = dir.join(format!("agent-{node}")).display().to_string();
    let token = token_file.display().to_string();
    let mut args = vec![
        "agent",
        "--join",
        url,
        "--token-file",
        &token,
        "--ca-hash",
        pin,
        "--data-dir",
        &data,
        "--node",
        node,
        "--api-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args, dir.join(format!("agent-{node}.log")))
}

async fn node_is_up(server: &Server, node: &str) -> bool {
    server
        .client()
        .nodes()
        .await
        .is_ok_and(|n| n.iter().any(|n| n.name == node))
}

/// An HTTP client presenting `cert`/`key` and trusting `ca`.
fn client_with(ca: &str, cert: &str, key: &str) -> reqwest::Client {
    let slot = flotilla_tls::CertSlot::new();
    slot.set(cert, key).unwrap();
    let config = flotilla_tls::client_config(ca, Some(slot)).unwrap();
    flotilla_client::http_builder(Some(config))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn has_instance(client: &flotilla_client::Client, id: &str) -> bool {
    client.instances().await.unwrap().iter().any(|i| i.id == id)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
async fn an_agent_joins_by_the_pinned_hash_and_no_token_crosses_in_clear() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let pin = printed_pin(&server);
    let token = server.token();
    let tap = Tap::start(format!("127.0.0.1:{}", server.port).parse().unwrap()).unwrap();
    let via_tap = format!("https://{}", tap.addr);

    // A wrong pin: refused before anything is sent, nothing stored.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = Command::new(BIN)
        .args(["agent", "--join", &via_tap, "--token-file"])
        .arg(&server.token_file)
        .args(["--ca-hash", &wrong, "--node", "n0", "--api-listen", ""])
        .arg("--data-dir")
        .arg(dir.path().join("agent-n0"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("refusing to join"), "{err}");
    assert!(!dir.path().join("agent-n0/node.pem").exists());

    // The right pin: the agent joins through the tap and registers its node.
    let mut agent = join(dir.path(), &via_tap, &server.token_file, &pin, "n1", &[]);
    eventually(Duration::from_secs(20), "n1 joined", || {
        node_is_up(&server, "n1")
    })
    .await;
    // It keeps renewing its lease over mutual TLS for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let data = dir.path().join("agent-n1");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("node.key")), 0o600);
    let seen = tap.seen();
    assert!(seen.len() > 4000, "the tap relayed {} bytes", seen.len());
    assert!(!tap.saw(token.as_bytes()), "the token crossed in clear");
    assert!(!tap.saw(b"PUT /v1/"), "HTTP crossed in clear");
    agent.terminate();

    // The same tap on a plain-HTTP server does see the token: the check above can fail.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = Server::start(plain_dir.path(), "p", &["--insecure-http"]);
    let plain_tap = Tap::start(format!("127.0.0.1:{}", plain.port).parse().unwrap()).unwrap();
    let _plain_agent = common::Proc::spawn(
        &[
            "agent",
            "--server",
            &format!("http://{}", plain_tap.addr),
            "--token-file",
            &plain.token_file.display().to_string(),
            "--node",
            "p1",
            "--api-listen",
            "",
        ],
        plain_dir.path().join("agent-p1.log"),
    );
    eventually(Duration::from_secs(20), "p1 joined", || {
        node_is_up(&plain, "p1")
    })
    .await;
    assert!(plain_tap.saw(plain.token().as_bytes()));
}

#[tokio::test]
async fn a_node_certificate_speaks_for_its_node_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let pin = printed_pin(&server);
    let _agent = join(dir.path(), &server.url, &server.token_file, &pin, "n1", &[]);
    eventually(Duration::from_secs(20), "n1 joined", || {
        node_is_up(&server, "n1")
    })
    .await;
    let data = dir.path().join("agent-n1");
    let ca = read(&server.ca_file());
    let node = client_with(
        &ca,
        &read(&data.join("node.pem")),
        &read(&data.join("node.key")),
    );
    let admin = server.client();

    // Another node with an instance, registered by the admin.
    admin
        .register_node("n2", Duration::from_secs(60), None, None)
        .await
        .unwrap();
    let spec =
        |node: &str| json!({"service": "web", "address": "127.0.0.1", "port": 9, "node": node});
    let put = |c: &reqwest::Client, path: &str, body: serde_json::Value| {
        c.put(format!("{}{path}", server.url)).json(&body).send()
    };
    let r = server
        .http()
        .put(format!("{}/v1/instances/n2-aaaaaaaaaaaa", server.url))
        .bearer_auth(server.token())
        .json(&spec("n2"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());

    // Refused (403) and nothing written: an instance on another node, another node's
    // instance, another node's lease, a stack, a certificate for another node.
    let status = |r: reqwest::Response| r.status().as_u16();
    let r = put(&node, "/v1/instances/n1-bbbbbbbbbbbb", spec("n2"))
        .await
        .unwrap();
    assert_eq!(status(r), 403);
    assert!(!has_instance(&admin, "n1-bbbbbbbbbbbb").await);
    let r = node
        .delete(format!("{}/v1/instances/n2-aaaaaaaaaaaa", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 403);
    assert!(has_instance(&admin, "n2-aaaaaaaaaaaa").await);
    let r = put(&node, "/v1/nodes/n2/renew", json!({})).await.unwrap();
    assert_eq!(status(r), 403);
    let r = put(&node, "/v1/stacks/s", json!({"services": {}}))
        .await
        .unwrap();
    assert_eq!(status(r), 403);
    assert!(admin.stacks(0, Duration::ZERO).await.unwrap().1.is_empty());
    let csr = flotilla_tls::node_csr("n2").unwrap();
    let r = node
        .post(format!("{}/v1/certs", server.url))
        .json(&json!({"node": "n2", "csr": csr.cert_pem}))
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 403);

    // Allowed: an instance on its own node; a renewal, which names n1 whatever the CSR
    // asked for.
    let r = put(&node, "/v1/instances/n1-bbbbbbbbbbbb", spec("n1"))
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let r = node
        .post(format!("{}/v1/certs/renew", server.url))
        .json(&json!({"csr": csr.cert_pem}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let renewed: serde_json::Value = r.json().await.unwrap();
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(
        renewed["cert"].as_str().unwrap().as_bytes(),
    )
    .map(|d: rustls_pki_types::CertificateDer<'static>| d.as_ref().to_vec())
    .unwrap();
    assert_eq!(
        flotilla_tls::identity_of(&der),
        Some(flotilla_tls::PeerIdentity::Node("n1".into()))
    );

    // The agent's API: a peer's certificate may fetch images, nothing else.
    let api = admin
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.name == "n1")
        .and_then(|n| n.api)
        .unwrap();
    assert!(api.starts_with("https://"), "{api}");
    let r = node
        .post(format!("{api}/v1/retire"))
        .query(&[("container", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 403);
    let r = node
        .get(format!("{api}/v1/images/save"))
        .query(&[("tag", "flotilla-no-such-image:0")])
        .send()
        .await
        .unwrap();
    let code = status(r);
    assert!(
        code != 403 && code != 401,
        "a peer's image fetch answered {code}"
    );

    // A certificate from another CA, and an expired one from the right CA: the
    // handshake fails, nothing is answered.
    let now = SystemTime::now();
    let foreign = flotilla_tls::ClusterCa::generate(now).unwrap();
    let key = flotilla_tls::node_csr("n1").unwrap();
    let foreign_cert = foreign
        .sign_node_csr(&key.cert_pem, "n1", now, Duration::from_secs(600))
        .unwrap();
    let stranger = client_with(&ca, &foreign_cert, &key.key_pem);
    assert!(stranger
        .get(format!("{}/v1/nodes", server.url))
        .send()
        .await
        .is_err());
    let real_ca = flotilla_tls::ClusterCa::load_or_create(&server.data_dir, now).unwrap();
    let expired_cert = real_ca
        .sign_node_csr(
            &key.cert_pem,
            "n1",
            now - Duration::from_secs(7200),
            Duration::from_secs(3600),
        )
        .unwrap();
    let expired = client_with(&ca, &expired_cert, &key.key_pem);
    assert!(expired
        .get(format!("{}/v1/nodes", server.url))
        .send()
        .await
        .is_err());
    // The same key with a good certificate from that CA is let in: the refusals above
    // are the certificates', not the client's.
    let good = real_ca
        .sign_node_csr(&key.cert_pem, "n1", now, Duration::from_secs(600))
        .unwrap();
    let r = client_with(&ca, &good, &key.key_pem)
        .get(format!("{}/v1/nodes", server.url))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

#[tokio::test]
async fn node_certificates_renew_without_the_lease_lapsing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &["--node-cert-lifetime", "10s"]);
    let pin = printed_pin(&server);
    let _agent = join(
        dir.path(),
        &server.url,
        &server.token_file,
        &pin,
        "n1",
        &["--lease-ttl", "1s"],
    );
    eventually(Duration::from_secs(20), "n1 joined", || {
        node_is_up(&server, "n1")
    })
    .await;
    let cert_file = dir.path().join("agent-n1/node.pem");
    let first = read(&cert_file);
    let client = server.client();
    let mut certs = vec![first];
    // 13 s: past one lifetime; the lease (1 s) must hold throughout.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(13) {
        let up = client.nodes().await.unwrap().iter().any(|n| n.name == "n1");
        assert!(up, "n1's lease lapsed at {:?}", start.elapsed());
        let now = read(&cert_file);
        if certs.last() != Some(&now) {
            certs.push(now);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        certs.len() >= 3,
        "{} certificates in 13 s with a 10 s lifetime",
        certs.len()
    );
    let metrics = server
        .http()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("node_certs_issued_total"), "{metrics}");
}
