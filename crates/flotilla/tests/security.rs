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

/// Node n1's agent joined `server` by the printed pin, with a 1 s lease.
async fn join_n1(dir: &Path, server: &Server) -> Proc {
    let pin = printed_pin(server);
    let agent = join(
        dir,
        &server.url,
        &server.token_file,
        &pin,
        "n1",
        &["--lease-ttl", "1s"],
    );
    eventually(Duration::from_secs(20), "n1 joined", || {
        node_is_up(server, "n1")
    })
    .await;
    agent
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

/// The agent API URL node `node` registered.
async fn api_of(admin: &flotilla_client::Client, node: &str) -> String {
    admin
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.name == node)
        .and_then(|n| n.api)
        .unwrap()
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
    // Another node's backup inventory (what the dashboard says n2 keeps).
    let r = put(&node, "/v1/nodes/n2/backups", json!({"archives": []}))
        .await
        .unwrap();
    assert_eq!(status(r), 403);
    assert!(!admin
        .backup_inventories()
        .await
        .unwrap()
        .iter()
        .any(|i| i.node == "n2"));
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

    // Allowed: an instance on its own node; its own backup inventory; a renewal, which
    // names n1 whatever the CSR asked for.
    let r = put(&node, "/v1/instances/n1-bbbbbbbbbbbb", spec("n1"))
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let r = put(&node, "/v1/nodes/n1/backups", json!({"archives": []}))
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
    let api = api_of(&admin, "n1").await;
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
    // `GET /v1/nodes` presenting `cert` (with the one key).
    let nodes_with = |cert: &str| {
        client_with(&ca, cert, &key.key_pem)
            .get(format!("{}/v1/nodes", server.url))
            .send()
    };
    assert!(nodes_with(&foreign_cert).await.is_err());
    let real_ca = flotilla_tls::ClusterCa::load_or_create(&server.data_dir, now).unwrap();
    let expired_cert = real_ca
        .sign_node_csr(
            &key.cert_pem,
            "n1",
            now - Duration::from_secs(7200),
            Duration::from_secs(3600),
        )
        .unwrap();
    assert!(nodes_with(&expired_cert).await.is_err());
    // The same key with a good certificate from that CA is let in: the refusals above
    // are the certificates', not the client's.
    let good = real_ca
        .sign_node_csr(&key.cert_pem, "n1", now, Duration::from_secs(600))
        .unwrap();
    assert!(nodes_with(&good).await.unwrap().status().is_success());
}

#[tokio::test]
async fn node_certificates_renew_without_the_lease_lapsing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &["--node-cert-lifetime", "10s"]);
    let _agent = join_n1(dir.path(), &server).await;
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
    let metrics = server.get_text(&format!("{}/metrics", server.url)).await;
    assert!(metrics.contains("node_certs_issued_total"), "{metrics}");
}

/// `flotilla token create` through the CLI, as an operator would; the token printed.
fn create_token(server: &Server, args: &[&str]) -> String {
    let args: Vec<&str> = ["token", "create"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    cli(server, &args).trim().to_owned()
}

/// `flotilla ARGS --server … --token-file …` as an operator would; must succeed; its stdout.
fn cli(server: &Server, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .args(["--server", &server.url, "--token-file"])
        .arg(&server.token_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flotilla {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn code(r: Result<serde_json::Value, flotilla_client::ClientError>) -> Option<u16> {
    r.err().and_then(|e| e.status())
}

#[tokio::test]
async fn scoped_tokens_do_their_job_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let admin = server.client();
    let as_token =
        |t: &str| flotilla_client::Client::with_tls(&server.url, Some(t.to_owned()), server.tls());
    let lb_token = create_token(&server, &["--role", "lb", "--service", "web"]);
    let read_token = create_token(&server, &["--role", "read"]);
    let join_token = create_token(&server, &["--role", "agent", "--node", "n1"]);
    assert!(lb_token.starts_with("flt_") && read_token != lb_token);

    // The lb's token: reads, publishes weights for its service; nothing else.
    let lb = as_token(&lb_token);
    lb.services().await.unwrap();
    let none = std::collections::BTreeMap::new();
    let web = lb.publish_weights("web", "lb-1", &none).await;
    assert_ne!(code(web), Some(403));
    assert_eq!(
        code(lb.publish_weights("api", "lb-1", &none).await),
        Some(403)
    );
    let services = std::collections::BTreeMap::new();
    assert_eq!(code(lb.deploy("s", &services).await), Some(403));
    assert!(admin.stacks(0, Duration::ZERO).await.unwrap().1.is_empty());
    let spec: flotilla_core::InstanceSpec =
        serde_json::from_value(json!({"service": "web", "address": "127.0.0.1", "port": 9}))
            .unwrap();
    assert_eq!(code(lb.register("i1", &spec).await), Some(403));
    assert!(!has_instance(&admin, "i1").await);

    // The read token: reads only, and not the token list.
    let read = as_token(&read_token);
    read.instances().await.unwrap();
    assert_eq!(code(read.register("i1", &spec).await), Some(403));
    assert_eq!(
        read.tokens().await.err().and_then(|e| e.status()),
        Some(403)
    );

    // The join token: joins n1 (a real agent) and nothing else; not as another node.
    let _agent = Proc::spawn(
        &[
            "agent",
            "--join",
            &server.url,
            "--token",
            &join_token,
            "--ca",
            &server.ca_file().display().to_string(),
            "--data-dir",
            &dir.path().join("agent-n1").display().to_string(),
            "--node",
            "n1",
            "--api-listen",
            "127.0.0.1:0",
        ],
        dir.path().join("agent-n1.log"),
    );
    eventually(
        Duration::from_secs(20),
        "n1 joined with a join token",
        || node_is_up(&server, "n1"),
    )
    .await;
    assert_eq!(
        as_token(&join_token)
            .instances()
            .await
            .err()
            .and_then(|e| e.status()),
        Some(403)
    );
    let out = Command::new(BIN)
        .args([
            "agent",
            "--join",
            &server.url,
            "--token",
            &join_token,
            "--ca",
        ])
        .arg(server.ca_file())
        .args(["--node", "n2", "--api-listen", ""])
        .arg("--data-dir")
        .arg(dir.path().join("agent-n2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("refused the join"),
        "{err}"
    );

    // That agent holds no admin token, yet its API takes the admin's (the registry says
    // what a token is) and refuses the lb's.
    let api = api_of(&admin, "n1").await;
    let ask = |t: String| {
        let http = server.http();
        let url = format!("{api}/v1/stacks/none/containers");
        async move {
            http.get(url)
                .bearer_auth(t)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(ask(server.token()).await, 200);
    assert_eq!(ask(lb_token.clone()).await, 403);
    let admin2 = create_token(&server, &["--role", "admin"]);
    assert_eq!(ask(admin2.clone()).await, 200);
    // Revoked, it stops at the agent's API too — at once, not after the agent's 10 s
    // keep of the role it just learned (the agent follows the registry's token index).
    let admin2_id = flotilla_core::token::token_id(&admin2).unwrap().to_owned();
    admin.revoke_token(&admin2_id).await.unwrap();
    let stopped = eventually(
        Duration::from_secs(3),
        "admin2 refused at the agent",
        || {
            let (ask, t) = (&ask, admin2.clone());
            async move { ask(t).await == 401 }
        },
    )
    .await;
    eprintln!(
        "a revoked admin token was refused at the agent's API {stopped:?} after the revocation"
    );

    // Listing shows ids and roles, never the tokens; a revoked token stops at once.
    let listed = cli(&server, &["token", "list", "--json"]);
    assert!(
        listed.contains("\"lb\"") && listed.contains("\"web\""),
        "{listed}"
    );
    assert!(!listed.contains(&lb_token[20..]), "a secret was listed");
    let id = flotilla_core::token::token_id(&lb_token)
        .unwrap()
        .to_owned();
    cli(&server, &["token", "revoke", &id]);
    assert_eq!(
        lb.services().await.err().and_then(|e| e.status()),
        Some(401)
    );
}

/// An lb with `[registry] cert_dir` joins with its lb token (scoped to `web`) and then
/// talks mutual TLS with its own certificate: it follows `web` and reports itself, the
/// certificate may do what the token may and nothing else (another service's weights,
/// another lb's report, a stack: 403), renews itself, and stops working the moment the
/// token is revoked. Only an lb token can make an lb certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_lb_joins_with_its_token_and_its_certificate_does_that_token_s_job_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let admin = server.client();
    let lb_token = admin
        .create_token(flotilla_core::token::Role::Lb, Some("web"), None)
        .await
        .unwrap();
    let token_file = dir.path().join("lb-token");
    std::fs::write(&token_file, &lb_token.token).unwrap();
    admin
        .register(
            "w1",
            &serde_json::from_value(json!({"service": "web", "address": "127.0.0.1", "port": 9}))
                .unwrap(),
        )
        .await
        .unwrap();
    // Without a certificate directory the lb sends its token, so it must find the CA
    // first: a pin that no server's CA matches stops it before any token is sent.
    let wrong_pin = format!("sha256:{}", "0".repeat(64));
    let text = format!(
        "[admin]\nlisten = \"\"\n[registry]\nurl = \"{}\"\ntoken_file = \"{}\"\nca_hash = \"{wrong_pin}\"\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nservice = \"web\"\n",
        server.url,
        token_file.display(),
    );
    let config: flotilla_lb::config::LbConfig =
        flotilla_core::config::parse_toml(Path::new("lb.toml"), &text).unwrap();
    let err = format!("{:#}", flotilla_lb::start(config).await.err().unwrap());
    assert!(
        err.contains("registry.ca") && err.contains("pinned"),
        "{err}"
    );

    let cert_dir = dir.path().join("lb-cert");
    let text = format!(
        "[admin]\nlisten = \"\"\n[registry]\nurl = \"{}\"\ntoken_file = \"{}\"\nca_hash = \"{}\"\n\
         cert_dir = \"{}\"\nname = \"edge-1\"\nreport = \"200ms\"\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nservice = \"web\"\n",
        server.url,
        token_file.display(),
        printed_pin(&server),
        cert_dir.display()
    );
    let config: flotilla_lb::config::LbConfig =
        flotilla_core::config::parse_toml(Path::new("lb.toml"), &text).unwrap();
    let lb = flotilla_lb::start(config).await.unwrap();
    eventually(Duration::from_secs(10), "the lb follows web", || async {
        lb.listeners[0].backends().len() == 1
    })
    .await;
    eventually(Duration::from_secs(10), "the lb's report", || async {
        admin
            .lbs()
            .await
            .is_ok_and(|l| l.iter().any(|e| e.name == "edge-1"))
    })
    .await;
    let (cert, key) = (
        read(&cert_dir.join("lb.pem")),
        read(&cert_dir.join("lb.key")),
    );
    let mode = std::fs::metadata(cert_dir.join("lb.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert.as_bytes())
        .map(|d: rustls_pki_types::CertificateDer<'static>| d.as_ref().to_vec())
        .unwrap();
    assert_eq!(
        flotilla_tls::identity_of(&der),
        Some(flotilla_tls::PeerIdentity::Lb {
            name: "edge-1".into(),
            token: lb_token.id.clone()
        })
    );

    // The certificate alone, no token: the lb token's job and nothing more.
    let ca = read(&server.ca_file());
    let http = client_with(&ca, &cert, &key);
    let status = |r: reqwest::Response| r.status().as_u16();
    let url = |p: &str| format!("{}{p}", server.url);
    let weights = json!({"weights": {"127.0.0.1:9": 2.0}});
    let put = |p: &str, body: &serde_json::Value| http.put(url(p)).json(body).send();
    assert_eq!(
        status(http.get(url("/v1/services/web")).send().await.unwrap()),
        200
    );
    assert_eq!(
        status(put("/v1/services/web/weights", &weights).await.unwrap()),
        200
    );
    assert_eq!(
        status(put("/v1/services/api/weights", &weights).await.unwrap()),
        403
    );
    let report = json!({"v": 1, "at_ms": 0});
    assert_eq!(status(put("/v1/lbs/other", &report).await.unwrap()), 403);
    assert_eq!(status(put("/v1/stacks/x", &json!({})).await.unwrap()), 403);
    assert_eq!(
        status(http.get(url("/v1/tokens")).send().await.unwrap()),
        403
    );

    // It renews itself with itself.
    let csr = flotilla_tls::node_csr("edge-1").unwrap();
    let renewed = http
        .post(url("/v1/certs/renew"))
        .json(&json!({ "csr": csr.cert_pem }))
        .send()
        .await
        .unwrap();
    assert_eq!(renewed.status().as_u16(), 200);
    let renewed: serde_json::Value = renewed.json().await.unwrap();
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(
        renewed["cert"].as_str().unwrap().as_bytes(),
    )
    .map(|d: rustls_pki_types::CertificateDer<'static>| d.as_ref().to_vec())
    .unwrap();
    assert!(matches!(
        flotilla_tls::identity_of(&der),
        Some(flotilla_tls::PeerIdentity::Lb { name, .. }) if name == "edge-1"
    ));

    // Only an lb token makes an lb certificate.
    let join_as_lb = |token: String| {
        let c = flotilla_client::Client::with_tls(&server.url, Some(token), server.tls());
        let pem = csr.cert_pem.clone();
        async move {
            c.join_lb("edge-2", &pem)
                .await
                .err()
                .and_then(|e| e.status())
        }
    };
    let agent_token = admin
        .create_token(flotilla_core::token::Role::Agent, None, Some("n1"))
        .await
        .unwrap();
    assert_eq!(join_as_lb(server.token()).await, Some(403));
    assert_eq!(join_as_lb(agent_token.token).await, Some(403));
    // ... and an lb token makes no node certificate.
    let as_lb =
        flotilla_client::Client::with_tls(&server.url, Some(lb_token.token.clone()), server.tls());
    let refused = as_lb
        .join_node("n9", &csr.cert_pem)
        .await
        .err()
        .and_then(|e| e.status());
    assert_eq!(refused, Some(403));

    // Revoking the token cuts the certificate off at once.
    admin.revoke_token(&lb_token.id).await.unwrap();
    let r = http.get(url("/v1/services/web")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await.unwrap().contains("revoked"));
    drop(lb);
}

/// `flotilla cert revoke NODE`: the node's certificates issued until then are refused
/// by the server at once (so its lease lapses), only an admin may revoke, and the node
/// is back once it joins again with its token (here when its short-lived certificate
/// expires) — with a new certificate, the old one still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_certificate_is_refused_until_the_node_joins_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &["--node-cert-lifetime", "10s"]);
    let _agent = join_n1(dir.path(), &server).await;
    let data = dir.path().join("agent-n1");
    let (cert, key) = (read(&data.join("node.pem")), read(&data.join("node.key")));
    let ca = read(&server.ca_file());
    let stolen = client_with(&ca, &cert, &key);
    let get = |c: &reqwest::Client| c.get(format!("{}/v1/services", server.url)).send();
    assert_eq!(get(&stolen).await.unwrap().status().as_u16(), 200);
    // Certificates carry their time to the second: revoke in a later one.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let reader = create_token(&server, &["--role", "read"]);
    let as_reader = flotilla_client::Client::with_tls(&server.url, Some(reader), server.tls());
    assert_eq!(code(as_reader.revoke_node_certs("n1").await), Some(403));
    let cli = |args: &[&str]| cli(&server, args);
    let said = cli(&["cert", "revoke", "n1"]);
    assert!(said.contains("revoked"), "{said}");
    let r = get(&stolen).await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await.unwrap().contains("revoked"));
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&["cert", "list", "--json"])).unwrap();
    assert_eq!(listed[0]["node"], "n1", "{listed}");
    // The agent's own requests are refused too: its lease lapses.
    eventually(Duration::from_secs(10), "n1's lease lapsed", || async {
        !node_is_up(&server, "n1").await
    })
    .await;
    // Its certificate expires, it joins again with its token: back, with a new one.
    eventually(Duration::from_secs(30), "n1 joined again", || {
        node_is_up(&server, "n1")
    })
    .await;
    let renewed = read(&data.join("node.pem"));
    assert_ne!(renewed, cert);
    let fresh = client_with(&ca, &renewed, &read(&data.join("node.key")));
    assert_eq!(get(&fresh).await.unwrap().status().as_u16(), 200);
    // The old one is refused still (401, or by now expired in the handshake).
    let stolen = client_with(&ca, &cert, &key);
    let old = get(&stolen).await.map(|r| r.status().as_u16());
    assert!(!matches!(old, Ok(200)), "{old:?}");
}

/// `flotilla up --listen` on an address other hosts can reach serves TLS only (plain
/// HTTP is for loopback): on a LAN of two network namespaces, a peer's plain request
/// gets no answer, a TLS one trusting the CA `up` wrote gets `/healthz`, and the URL
/// `up` prints and writes is `https://`.
#[test]
fn up_on_a_lan_address_serves_tls_only() {
    let lan = flotilla_testkit::netns::Lan::create(&["up", "peer"], 77).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let listen = format!("{}:7700", lan.addr("up"));
    let _up = Proc::spawn_command(
        lan.command("up", BIN),
        &[
            "up",
            "--listen",
            &listen,
            "--no-agent",
            "--no-demo",
            "--data-dir",
            &home.display().to_string(),
            "--dns-listen",
            "",
            "--lb-listen",
            "",
            "--lb-admin",
            "",
        ],
        dir.path().join("up.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !home.join("server").exists() {
        assert!(Instant::now() < deadline, "flotilla up wrote no server URL");
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = read(&home.join("server")).trim().to_owned();
    assert_eq!(url, format!("https://{listen}"));
    let ca = read(&home.join("ca.pem"));
    let (plain, tls) = lan
        .run_in("peer", move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let plain = reqwest::Client::builder()
                        .no_proxy()
                        .timeout(Duration::from_secs(3))
                        .build()
                        .unwrap()
                        .get(format!("http://{listen}/healthz"))
                        .send()
                        .await
                        .map(|r| r.status().as_u16());
                    let config = flotilla_tls::client_config(&ca, None).unwrap();
                    let tls = flotilla_client::http_builder(Some(config))
                        .timeout(Duration::from_secs(3))
                        .build()
                        .unwrap()
                        .get(format!("https://{listen}/healthz"))
                        .send()
                        .await
                        .unwrap();
                    (plain, (tls.status().as_u16(), tls.text().await.unwrap()))
                })
        })
        .join()
        .unwrap();
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    assert_eq!(tls.0, 200, "{}", tls.1);
}
