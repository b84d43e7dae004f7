//! `flotilla logs` and `flotilla exec` against a real server, agent and container: the
//! output comes from the engine through the agent that runs the container.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{agent, eventually, Server};
use flotilla_testkit::{busybox_image, docker, unique, Container, DockerNetwork};

fn cli(server: &Server, args: &[&str]) -> Command {
    let mut c = Command::new(common::BIN);
    c.args(args)
        .env("FLOTILLA_SERVER", &server.url)
        .env("FLOTILLA_TOKEN_FILE", &server.token_file)
        .env("FLOTILLA_HOME", server.data_dir.join("cli-home"))
        .env_remove("FLOTILLA_TOKEN");
    c
}

fn run(server: &Server, args: &[&str]) -> Output {
    cli(server, args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_a_container_across_a_restart_and_exec_returns_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let net = DockerNetwork::create("flotilla-ops").unwrap();
    let _agent = agent(dir.path(), &server, "host-a", None);
    // httpd in the background (the service port), and a line every 200 ms.
    let c = Container::run(
        &unique("flotilla-ticker"),
        &[
            "--network",
            &net.name,
            "-l",
            "flotilla.service=ticker",
            "-l",
            "flotilla.port=80",
            busybox_image().unwrap(),
            "sh",
            "-c",
            "httpd -p 80 -h /www; echo started; i=0; while true; do echo tick $i; \
             i=$((i+1)); sleep 0.2; done",
        ],
    )
    .unwrap();
    eventually(Duration::from_secs(20), "ticker registered", || async {
        client
            .service("ticker", 0, Duration::ZERO, false)
            .await
            .is_ok_and(|s| s.instances.len() == 1)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The whole output by container name; the last lines by service name.
    let o = run(&server, &["logs", &c.name]);
    let all = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{all}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(all.lines().next(), Some("started"), "{all}");
    let o = run(&server, &["logs", "ticker", "--tail", "3"]);
    let last = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(last.lines().count(), 3, "{last}");
    assert!(last.lines().all(|l| l.starts_with("tick ")), "{last}");

    // An unknown name: exit 1, naming it.
    let o = run(&server, &["logs", "no-such-thing"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-thing"));

    // exec: the command's output, and its exit code as the CLI's.
    let o = run(
        &server,
        &[
            "exec",
            "ticker",
            "--",
            "sh",
            "-c",
            "echo hi from $HOSTNAME; exit 3",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("hi from "));

    // -f follows across a restart: "started" arrives a second time.
    let mut follower = cli(&server, &["logs", "-f", "ticker", "--tail", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    docker(&["restart", "-t", "1", &c.name]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let restarted = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let started = line == "started";
                seen.push(line);
                if started {
                    break true;
                }
            }
            Err(_) if Instant::now() > deadline => break false,
            Err(_) => {}
        }
    };
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(
        restarted,
        "the follower did not see the restart: {:?}",
        &seen[seen.len().saturating_sub(5)..]
    );
}

/// Runs `promtool check metrics` on `text`; its verdict and output.
fn promtool(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The server's, the agent's and the lb's `/metrics`, scraped as a plain client
/// (Prometheus text) and as Prometheus does (OpenMetrics), after some traffic:
/// `promtool check metrics` accepts each, every family has HELP text, requests are
/// labelled `code` and timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_endpoint_passes_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let _agent = agent(dir.path(), &server, "host-m", None);
    eventually(Duration::from_secs(15), "the agent's node", || async {
        client
            .nodes()
            .await
            .is_ok_and(|n| n.len() == 1 && n[0].api.is_some())
    })
    .await;
    let agent_api = client.nodes().await.unwrap()[0].api.clone().unwrap();
    let lb_text = "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:9\"]\n";
    let lb_config: flotilla_lb::config::LbConfig =
        flotilla_core::config::parse_toml(std::path::Path::new("lb.toml"), lb_text).unwrap();
    let lb = flotilla_lb::start(lb_config).await.unwrap();
    let http = server.http();
    // Traffic on each: reads and a refused write on the server, a read on the agent, a
    // request through the lb (to a closed port: a failure is a sample too).
    client.instances().await.unwrap();
    let _ = http
        .put(format!("{}/v1/instances/x", server.url))
        .send()
        .await
        .unwrap();
    let _ = http
        .get(format!("{agent_api}/v1/images?tag=none"))
        .bearer_auth(server.token())
        .send()
        .await
        .unwrap();
    let _ = common::direct_http()
        .get(format!("http://{}/", lb.addrs[0]))
        .send()
        .await;
    let admin = lb.admin_addr.unwrap();
    let endpoints = [
        (
            "server",
            format!("{}/metrics", server.url),
            "flotilla_registry_",
        ),
        ("agent", format!("{agent_api}/metrics"), "flotilla_agent_"),
        ("lb", format!("http://{admin}/metrics"), "flotilla_lb_"),
    ];
    for (what, url, prefix) in endpoints {
        for accept in [
            "*/*",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        ] {
            let resp = http
                .get(&url)
                .header("accept", accept)
                .bearer_auth(server.token())
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "{what}: {}", resp.status());
            let kind = resp.headers()["content-type"].to_str().unwrap().to_owned();
            let text = resp.text().await.unwrap();
            assert!(text.contains(prefix), "{what}: {text}");
            if kind.starts_with("application/openmetrics-text") {
                // promtool 2.42 reads only the Prometheus text format; the OpenMetrics
                // answer must end as OpenMetrics does and carry the same families.
                assert!(text.ends_with("# EOF\n"), "{what}");
                continue;
            }
            let (ok, out) = promtool(&text);
            assert!(
                ok,
                "{what} ({kind}): promtool check metrics:\n{out}\n{text}"
            );
            println!("{what}: {} lines, promtool: ok", text.lines().count());
            if what == "lb" {
                // The one request went to a closed port: the lb answered it with a 5xx.
                for line in [
                    "flotilla_lb_connections_total{listener=\"web\"} 1",
                    "flotilla_lb_responses_total{listener=\"web\",code=\"5xx\"} 1",
                    "flotilla_lb_responses_total{listener=\"web\",code=\"2xx\"} 0",
                ] {
                    assert!(text.contains(line), "lb: no {line:?} in\n{text}");
                }
                assert!(
                    !text.contains("flotilla_lb_received_bytes_total{listener=\"web\"} 0"),
                    "{text}"
                );
            } else {
                assert!(
                    text.contains(&format!(
                        "{prefix}http_requests_total{{method=\"GET\",code=\"200\"}}"
                    )),
                    "{what}: {text}"
                );
                assert!(
                    text.contains(&format!("{prefix}http_request_duration_seconds_bucket")),
                    "{what}: {text}"
                );
            }
        }
    }
}
