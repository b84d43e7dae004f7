//! flotilla on hosts that share only a LAN (flotilla-testkit's `Hosts`: a network
//! namespace and a Docker Engine per host, one bridge between them, no route from one
//! host into another's container subnet). The server runs on host c, agents on a and b,
//! the checks and requests come from a client namespace on the same LAN.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{eventually, Proc, BIN};
use flotilla_client::Client;
use flotilla_testkit::hosts::Hosts;

/// Spawns `flotilla ARGS` inside `node`'s namespace, logging to `log`.
fn flotilla_on(hosts: &Hosts, node: &str, args: &[&str], log: &Path) -> Proc {
    Proc::spawn_command(hosts.command(node, BIN), args, log.to_owned())
}

/// One HTTP GET with a short timeout: the body, or why not.
async fn get(url: &str) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    match client.get(url).send().await {
        Ok(r) if r.status().is_success() => r.text().await.map_err(|e| e.to_string()),
        Ok(r) => Err(format!("status {}", r.status())),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs `body` on a thread inside `node`'s namespace (its sockets are that node's),
/// on a runtime of its own.
fn in_namespace<T: Send>(
    hosts: &Hosts,
    node: &str,
    body: impl std::future::Future<Output = T> + Send,
) -> T {
    let path = format!("/run/netns/{}", hosts.lan.ns(node));
    std::thread::scope(|s| {
        s.spawn(|| {
            flotilla_testkit::netns::enter(&path).unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(body)
        })
        .join()
        .unwrap()
    })
}

/// A busybox httpd answering `text` on port 8080, published on a port the engine picks.
fn web_container(hosts: &Hosts, host: &str, image: &str, text: &str) -> String {
    let script =
        format!("mkdir -p /www && echo {text} > /www/index.html && exec httpd -f -p 8080 -h /www");
    hosts
        .docker(
            host,
            &[
                "run",
                "-d",
                "-p",
                "8080",
                "-l",
                "flotilla.service=web",
                "-l",
                "flotilla.port=8080",
                "-l",
                "flotilla.check.http=/",
                "-l",
                "flotilla.check.interval=200ms",
                image,
                "sh",
                "-c",
                &script,
            ],
        )
        .unwrap()
        .trim()
        .to_owned()
}

/// Hosts a and b (an agent each), c (the server) and a client namespace, on subnet
/// 198.18.`subnet`.0/24; the busybox image loaded on a and b.
struct Cluster {
    hosts: Hosts,
    dir: tempfile::TempDir,
    token: std::path::PathBuf,
    server_url: String,
    _server: Proc,
    /// The CA hash the server printed (set by `join`).
    pin: std::sync::OnceLock<String>,
    /// Flags every agent gets besides the usual ones.
    agent_flags: Vec<String>,
}

impl Cluster {
    fn start(subnet: u8) -> Cluster {
        Self::start_with(subnet, &[])
    }

    fn start_with(subnet: u8, agent_flags: &[&str]) -> Cluster {
        let hosts = Hosts::create(&["a", "b", "c"], &["client"], subnet).expect("hosts");
        let image = flotilla_testkit::busybox_image().unwrap();
        for h in ["a", "b"] {
            hosts.load_image(h, image).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let server_addr = format!("{}:7700", hosts.addr("c"));
        let server = flotilla_on(
            &hosts,
            "c",
            &[
                "server",
                "--listen",
                &server_addr,
                "--dns-listen",
                "",
                "--data-dir",
                &dir.path().join("c").display().to_string(),
                "--token-file",
                &token.display().to_string(),
            ],
            &dir.path().join("server.log"),
        );
        Cluster {
            hosts,
            dir,
            token,
            server_url: format!("https://{server_addr}"),
            _server: server,
            pin: std::sync::OnceLock::new(),
            agent_flags: agent_flags.iter().map(|f| f.to_string()).collect(),
        }
    }

    /// In the client namespace: once the server made its token, starts the agents on a
    /// and b (no --advertise: the default is the source address of the route to the
    /// server) and returns them with a client once both joined (their logs if not).
    async fn join(&self) -> (Vec<Proc>, Client) {
        eventually(Duration::from_secs(20), "server token", || async {
            self.token.exists()
        })
        .await;
        // Join as the server's printed line says: its URL, the token, the CA's pin.
        let server_log = self.dir.path().join("server.log");
        let mut pin = String::new();
        eventually(Duration::from_secs(20), "the server's join line", || {
            let text = std::fs::read_to_string(&server_log).unwrap_or_default();
            pin = text
                .split_whitespace()
                .skip_while(|w| *w != "--ca-hash")
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            std::future::ready(pin.starts_with("sha256:"))
        })
        .await;
        let _ = self.pin.set(pin.clone());
        let agents: Vec<Proc> = ["a", "b"].iter().map(|h| self.agent(h)).collect();
        let client = Client::with_tls(
            &self.server_url,
            Some(
                std::fs::read_to_string(&self.token)
                    .unwrap()
                    .trim()
                    .to_owned(),
            ),
            Some(flotilla_client::tls_config(&self.token.with_file_name("ca.pem")).unwrap()),
        );
        // The lb's own credential: an lb token for service web, in a directory with no
        // CA beside it (the lb pins the CA by hash, as the agents do).
        let lb_token = eventually(Duration::from_secs(10), "an lb token", || async {
            client
                .create_token(flotilla_core::token::Role::Lb, Some("web"), None)
                .await
                .is_ok_and(|t| {
                    let d = self.dir.path().join("lb");
                    std::fs::create_dir_all(&d).unwrap();
                    std::fs::write(d.join("lb.token"), t.token).is_ok()
                })
        });
        lb_token.await;
        let joined = async {
            eventually(Duration::from_secs(30), "both agents joined", || async {
                client.nodes().await.is_ok_and(|n| n.len() == 2)
            })
            .await
        };
        if futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(joined))
            .await
            .is_err()
        {
            for log in ["server.log", "agent-a.log", "agent-b.log"] {
                let text = std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!(
                    "--- {log}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            panic!("the agents did not join");
        }
        (agents, client)
    }

    /// Starts the agent of host `h` (joined with the pinned CA hash; lease TTL 1 s; the
    /// API on every address; the cluster's extra flags, where "{host}" stands for the
    /// host and "{dir}" for the cluster's directory), logging to `agent-h.log`
    /// (appended to by a restart).
    fn agent(&self, h: &str) -> Proc {
        let token = self.token.display().to_string();
        let pin = self.pin.get().expect("the CA pin is known").clone();
        let data = self
            .dir
            .path()
            .join(format!("agent-{h}"))
            .display()
            .to_string();
        let mut args = vec![
            "agent",
            "--join",
            &self.server_url,
            "--token-file",
            &token,
            "--ca-hash",
            &pin,
            "--data-dir",
            &data,
            "--node",
            h,
            "--docker",
            self.hosts.engine(h),
            "--api-listen",
            "0.0.0.0:7701",
            "--lease-ttl",
            "1s",
        ];
        let root = self.dir.path().display().to_string();
        let flags: Vec<String> = self
            .agent_flags
            .iter()
            .map(|f| f.replace("{host}", h).replace("{dir}", &root))
            .collect();
        args.extend(flags.iter().map(String::as_str));
        flotilla_on(
            &self.hosts,
            h,
            &args,
            &self.dir.path().join(format!("agent-{h}.log")),
        )
    }

    /// `flotilla ARGS` from the client namespace against this cluster; its stdout.
    fn cli_output(&self, args: &[&str]) -> String {
        let token = self.token.display().to_string();
        let out = self
            .hosts
            .command("client", BIN)
            .args(args)
            .args(["--server", &self.server_url, "--token-file", &token])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "flotilla {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `flotilla ARGS` from the client namespace against this cluster; must succeed.
    fn cli(&self, args: &[&str]) {
        let token = self.token.display().to_string();
        let out = self
            .hosts
            .command("client", BIN)
            .args(args)
            .args(["--server", &self.server_url, "--token-file", &token])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "flotilla {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Deploys a stack of busybox httpd services serving `index` at /: `services` is
    /// the TOML of its `[service.*]` tables (image and command are added to each).
    fn deploy(&self, name: &str, services: &str, index: &str) {
        let stack = self.dir.path().join(name);
        std::fs::create_dir_all(stack.join("www")).unwrap();
        std::fs::write(stack.join("www/index.html"), index).unwrap();
        let common_keys = "command = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n\
             health = { type = \"http\", path = \"/index.html\", interval = \"300ms\" }\n\
             image = { base = \"busybox\", file = [{ src = \"www/index.html\", dest = \"/www/index.html\" }] }\n";
        let text = format!(
            "name = \"{name}\"\n{}",
            services.replace("port = 8080\n", &format!("port = 8080\n{common_keys}"))
        );
        std::fs::write(stack.join("stack.toml"), text).unwrap();
        let spec = stack.join("stack.toml").display().to_string();
        self.cli(&["deploy", &spec, "--timeout", "90s"]);
    }

    /// An lb on host c, port 8080, in front of service `web`.
    fn lb(&self, extra: &str) -> Proc {
        let conf = self.dir.path().join("lb.toml");
        std::fs::write(
            &conf,
            format!(
                "[admin]\nlisten = \"\"\n[registry]\nurl = \"{}\"\ntoken_file = \"{}\"\nca_hash = \"{}\"\n\
                 [[listener]]\nname = \"web\"\nbind = \"{}:8080\"\nscheduler = \"round-robin\"\n\
                 service = \"web\"\nslow_start = \"0s\"\n{extra}",
                self.server_url,
                self.dir.path().join("lb/lb.token").display(),
                self.pin.get().expect("joined first"),
                self.hosts.addr("c")
            ),
        )
        .unwrap();
        flotilla_on(
            &self.hosts,
            "c",
            &["lb", "--config", &conf.display().to_string()],
            &self.dir.path().join("lb.log"),
        )
    }
}

#[test]
fn published_ports_cross_hosts_and_a_lost_host_leaves() {
    let cluster = Cluster::start(61);
    let hosts = &cluster.hosts;
    let image = flotilla_testkit::busybox_image().unwrap();
    let (addr_a, addr_b, addr_c) = (hosts.addr("a"), hosts.addr("b"), hosts.addr("c"));

    in_namespace(hosts, "client", async {
        let (agents, client) = cluster.join().await;
        // Each node's address is its LAN address, and its API is reachable there.
        for n in client.nodes().await.unwrap() {
            let want = if n.name == "a" { addr_a } else { addr_b };
            assert_eq!(
                n.address.as_deref(),
                Some(want.to_string().as_str()),
                "{n:?}"
            );
            assert_eq!(
                n.api.as_deref(),
                Some(format!("https://{want}:7701").as_str())
            );
        }

        // A container on host a, joining: registered at a's LAN address and the
        // published port, passing by the server's probe from host c.
        let started = Instant::now();
        let id_a = web_container(hosts, "a", image, "host-a");
        eventually(Duration::from_secs(30), "web on a passing", || async {
            common::passing(&client, "web").await.len() == 1
        })
        .await;
        eprintln!(
            "FIGURE docker run on a -> passing at a watcher on the client (server on c): {:.2}s",
            started.elapsed().as_secs_f64()
        );
        let inst = common::passing(&client, "web").await.remove(0);
        assert_eq!(inst.address, std::net::IpAddr::V4(addr_a));
        assert_eq!(inst.meta["address_mode"], "host");
        let host_port: u16 = hosts
            .docker("a", &["port", &id_a, "8080/tcp"])
            .unwrap()
            .lines()
            .next()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.trim().parse().ok())
            .expect("published port");
        assert_eq!(inst.port, host_port);

        // From the client: the registered address answers; the container's own address
        // does not (no host routes into another host's container subnet).
        let body = get(&format!("http://{addr_a}:{host_port}/")).await.unwrap();
        assert_eq!(body.trim(), "host-a");
        let bridge_ip = hosts
            .docker(
                "a",
                &["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &id_a],
            )
            .unwrap();
        let direct = get(&format!("http://{}:8080/", bridge_ip.trim())).await;
        assert!(
            direct.is_err(),
            "container address reached across hosts: {direct:?}"
        );

        // A second replica on host b, and an lb on host c in front of both.
        let id_b = web_container(hosts, "b", image, "host-b");
        eventually(
            Duration::from_secs(30),
            "web on a and b passing",
            || async { common::passing(&client, "web").await.len() == 2 },
        )
        .await;
        let _lb = cluster.lb("");
        let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
        eventually(
            Duration::from_secs(20),
            "the lb reaches both hosts",
            || async {
                if let Ok(body) = get(&format!("http://{addr_c}:8080/")).await {
                    seen.lock().unwrap().insert(body.trim().to_owned());
                }
                seen.lock().unwrap().len() == 2
            },
        )
        .await;

        // A stack deployed from the client: publish = "auto" (the default), one replica
        // per host; each is registered at its host's address and a published port, and
        // answers there from the client.
        cluster.deploy(
            "mh",
            "[service.api]\nport = 8080\nreplicas = 2\nplacement = { max_per_node = 1 }\n",
            "stacked\n",
        );
        let api = common::passing(&client, "api").await;
        assert_eq!(api.len(), 2, "{api:?}");
        let mut hosts_used: Vec<_> = api.iter().map(|i| i.address).collect();
        hosts_used.sort();
        assert_eq!(
            hosts_used,
            [std::net::IpAddr::V4(addr_a), std::net::IpAddr::V4(addr_b)]
        );
        for i in &api {
            assert_eq!(i.meta["address_mode"], "host", "{i:?}");
            assert_ne!(i.port, 8080, "registered on the published host port");
            let body = get(&format!("http://{}:{}/", i.address, i.port)).await;
            assert_eq!(body.as_deref().map(str::trim), Ok("stacked"), "{i:?}");
        }
        cluster.cli(&["rm", "mh"]);

        // docker kill on b: its instance leaves.
        let killed = Instant::now();
        hosts.docker("b", &["kill", &id_b]).unwrap();
        eventually(Duration::from_secs(10), "killed replica out", || async {
            common::passing(&client, "web").await.len() == 1
        })
        .await;
        eprintln!(
            "FIGURE docker kill on b -> out: {:.2}s",
            killed.elapsed().as_secs_f64()
        );

        // Checks where the containers are: a container on a registered by its container
        // address, which the server on c cannot reach (shown above), passes because a's
        // agent checks it on its own host; its failure and recovery reach the catalog.
        let local = hosts
            .docker(
                "a",
                &[
                    "run",
                    "-d",
                    "-l",
                    "flotilla.service=local",
                    "-l",
                    "flotilla.port=8080",
                    "-l",
                    "flotilla.address=container",
                    "-l",
                    "flotilla.check.http=/",
                    "-l",
                    "flotilla.check.interval=200ms",
                    image,
                    "sh",
                    "-c",
                    "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www",
                ],
            )
            .unwrap();
        let local = local.trim();
        eventually(
            Duration::from_secs(20),
            "container-address instance passing",
            || async { common::passing(&client, "local").await.len() == 1 },
        )
        .await;
        let inst = common::passing(&client, "local").await.remove(0);
        assert_eq!(inst.meta["address_mode"], "container");
        assert_ne!(inst.address, std::net::IpAddr::V4(addr_a));
        assert!(
            get(&format!("http://{}:8080/", inst.address))
                .await
                .is_err(),
            "the container address must not be reachable from off host a"
        );
        hosts
            .docker("a", &["exec", local, "rm", "/www/index.html"])
            .unwrap();
        let failed = eventually(
            Duration::from_secs(10),
            "its agent's verdict: critical",
            || async {
                client.instances().await.is_ok_and(|all| {
                    all.iter().any(|i| {
                        i.service == "local"
                            && i.health == flotilla_core::HealthStatus::Critical
                            && i.output.contains("HTTP 404")
                    })
                })
            },
        )
        .await;
        eprintln!(
            "FIGURE check fails on host a -> critical in the catalog (interval 200 ms, fall 2): {:.2}s",
            failed.as_secs_f64()
        );
        hosts
            .docker(
                "a",
                &["exec", local, "sh", "-c", "echo ok > /www/index.html"],
            )
            .unwrap();
        eventually(Duration::from_secs(10), "passing again", || async {
            common::passing(&client, "local").await.len() == 1
        })
        .await;

        // Steady state: with every instance healthy and idle, the store takes the lease
        // renewals and nothing else (no probe results, no unchanged load reports).
        let scrape = || async {
            let http = flotilla_client::http_builder(Some(
                flotilla_client::tls_config(&cluster.token.with_file_name("ca.pem")).unwrap(),
            ))
            .build()
            .unwrap();
            let text = http
                .get(format!("{}/metrics", cluster.server_url))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let writes =
                flotilla_testkit::metric_value(&text, "flotilla_registry_store_writes_total")
                    .expect("store writes metric");
            let renewals: u64 = client
                .nodes()
                .await
                .unwrap()
                .iter()
                .map(|n| n.renewals)
                .sum();
            (writes, renewals)
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (w0, r0) = scrape().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (w1, r1) = scrape().await;
        let (writes, renewals) = (w1 - w0, (r1 - r0) as f64);
        eprintln!(
            "FIGURE steady state, 2 nodes, 3 healthy checked instances, 5 s: {writes} store writes, {renewals} of them lease renewals"
        );
        assert!(
            writes <= renewals + 2.0,
            "{writes} store writes in 5 s with {renewals} lease renewals"
        );
        // ... and yet the loads stay current: the renewals vouch for the unchanged
        // reports, so each instance's load is younger than the lb's staleness window.
        for i in client.instances().await.unwrap() {
            let load = i.load.unwrap_or_else(|| panic!("no load for {}", i.id));
            assert!(load.age_ms <= 3000, "{}: load {} ms old", i.id, load.age_ms);
        }
        hosts.docker("a", &["rm", "-f", local]).unwrap();

        // Host a cut off from the LAN: its node and instance leave within the lease.
        hosts.cut("a").unwrap();
        let lost = eventually(
            Duration::from_secs(10),
            "cut-off host's node and instances out",
            || async {
                let instances_gone = client
                    .instances()
                    .await
                    .is_ok_and(|all| all.iter().all(|i| i.node.as_deref() != Some("a")));
                let node_gone = client
                    .nodes()
                    .await
                    .is_ok_and(|n| n.iter().all(|n| n.name != "a"));
                instances_gone && node_gone
            },
        )
        .await;
        eprintln!(
            "FIGURE host a cut off (lease TTL 1 s) -> its node and instances out: {:.2}s",
            lost.as_secs_f64()
        );
        assert!(lost <= Duration::from_secs(3), "host loss took {lost:?}");
        hosts.heal("a").unwrap();
        // Healed, its agent registers again and resyncs its container.
        eventually(
            Duration::from_secs(30),
            "host a back with its replica",
            || async {
                common::passing(&client, "web")
                    .await
                    .iter()
                    .any(|i| i.address == std::net::IpAddr::V4(addr_a))
            },
        )
        .await;
        drop(agents);
    });
}

/// The issue's host-loss figure: an lb on host c in front of three replicas of a stack on
/// hosts a and b, 200 requests/s open loop from the client; host b is cut off. Counts the
/// failed requests over the whole event and how long until the stack is back to three
/// passing replicas on the hosts that are left.
#[test]
fn host_loss_under_load_fails_few_requests_and_replicas_come_back() {
    let cluster = Cluster::start(62);
    let hosts = &cluster.hosts;
    let addr_c = hosts.addr("c");
    in_namespace(hosts, "client", async {
        let (agents, client) = cluster.join().await;
        cluster.deploy("loss", "[service.web]\nport = 8080\nreplicas = 3\n", "ok\n");
        let on_b = common::passing(&client, "web")
            .await
            .iter()
            .filter(|i| i.node.as_deref() == Some("b"))
            .count();
        assert!(on_b >= 1, "a replica on b to lose");
        let _lb = cluster.lb("connect_timeout = \"500ms\"\n");
        let url = format!("http://{addr_c}:8080/");
        eventually(Duration::from_secs(20), "lb answers", || async {
            get(&url).await.is_ok()
        })
        .await;

        // 200 requests/s for 20 s, open loop, each with a 5 s deadline; b is cut at 5 s.
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let start = Instant::now();
        let mut requests = Vec::new();
        let mut recovery = None;
        for k in 0..4000u32 {
            let due = start + Duration::from_millis(u64::from(k) * 5);
            tokio::time::sleep_until(due.into()).await;
            if recovery.is_none() && start.elapsed() >= Duration::from_secs(5) {
                hosts.cut("b").unwrap();
                let (cut_at, client) = (Instant::now(), client.clone());
                // Back to three passing replicas, all on a: timed from the cut.
                recovery = Some(tokio::spawn(async move {
                    loop {
                        let up = common::passing(&client, "web").await;
                        if up.len() == 3 && up.iter().all(|i| i.node.as_deref() == Some("a")) {
                            return cut_at.elapsed();
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }));
            }
            let (http, url) = (http.clone(), url.clone());
            requests.push(tokio::spawn(async move {
                http.get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }));
        }
        let mut failed = 0;
        let total = requests.len();
        for r in requests {
            if !r.await.unwrap() {
                failed += 1;
            }
        }
        let recovered = tokio::time::timeout(Duration::from_secs(30), recovery.unwrap())
            .await
            .expect("three replicas on a within 30 s of the cut")
            .unwrap();
        let share = failed as f64 * 100.0 / total as f64;
        eprintln!(
            "FIGURE host b cut off under 200 req/s: {failed} of {total} requests failed \
             ({share:.2} %); three passing replicas on a {:.1}s after the cut",
            recovered.as_secs_f64()
        );
        // The issue's goal. Requests already sent on pooled connections to b never get
        // an answer; the lb sends those (GETs) to another backend 0.5 s after b's
        // instances leave the set (lease TTL 1 s), well inside the client's 5 s deadline.
        // Before that, 108 of 4,000 failed in one CI run under the full suite's load.
        assert!(share <= 0.5, "{failed} of {total} requests failed");
        assert!(
            recovered <= Duration::from_secs(10),
            "replicas back after {recovered:?}"
        );
        hosts.heal("b").unwrap();
        drop(agents);
    });
}

/// The routed cluster network: agents on a and b with `--cluster-cidr` get a /24 each,
/// a stack's replicas register their container addresses in them, and those addresses
/// cross hosts without NAT (a container on b sees a container on a by its own address);
/// an agent naming another CIDR is refused with exit 2 naming `cluster_cidr`.
#[test]
fn routed_cluster_network_crosses_hosts_without_nat() {
    const CIDR: &str = "198.18.224.0/20";
    let cluster = Cluster::start_with(64, &["--cluster-cidr", CIDR]);
    let hosts = &cluster.hosts;
    let cidr: flotilla_core::subnet::Ipv4Net = CIDR.parse().unwrap();
    in_namespace(hosts, "client", async {
        let (agents, client) = cluster.join().await;
        let subnets = eventually(Duration::from_secs(10), "both subnets", || async {
            client.subnets().await.is_ok_and(|s| s.len() == 2)
        });
        subnets.await;
        let subnets = client.subnets().await.unwrap();
        assert_ne!(subnets[0].subnet, subnets[1].subnet, "{subnets:?}");
        assert!(subnets.iter().all(|s| cidr.contains(&s.subnet)));

        cluster.deploy(
            "routed",
            "[service.api]\nport = 8080\nreplicas = 2\nplacement = { max_per_node = 1 }\n",
            "routed\n",
        );
        let api = common::passing(&client, "api").await;
        assert_eq!(api.len(), 2, "{api:?}");
        for i in &api {
            let node = i.node.as_deref().unwrap();
            let own = subnets.iter().find(|s| s.node == node).unwrap();
            let std::net::IpAddr::V4(ip) = i.address else {
                panic!("{i:?}")
            };
            assert!(own.subnet.contains(&ip), "{i:?} not in {own:?}");
            assert_eq!(i.port, 8080, "the container port, nothing published");
        }
        let on = |node: &str| {
            api.iter()
                .find(|i| i.node.as_deref() == Some(node))
                .unwrap()
                .clone()
        };
        let (api_a, api_b) = (on("a"), on("b"));
        // Host a's namespace reaches b's container address through a's route.
        let url_b = format!("http://{}:8080/index.html", api_b.address);
        let got = in_namespace(hosts, "a", async { get(&url_b).await });
        assert_eq!(got.as_deref().map(str::trim), Ok("routed"));
        // The client, with no agent and no route, does not.
        assert!(get(&url_b).await.is_err());

        // Container to container, without NAT: on b, a container on the routed network
        // answers with the peer address it sees (a CGI's REMOTE_ADDR); a's replica asks
        // it by its container address and must hear its own container address back (a
        // masquerade would show host a's LAN address).
        let ca = hosts
            .docker(
                "a",
                &["ps", "-q", "--filter", "label=flotilla.stack=routed"],
            )
            .unwrap()
            .trim()
            .to_owned();
        let image = flotilla_testkit::busybox_image().unwrap();
        let peer_echo = hosts
            .docker(
                "b",
                &[
                    "run", "-d", "--network", "flotilla-routed", image, "sh", "-c",
                    r##"mkdir -p /www/cgi-bin && echo '#!/bin/sh' > /www/cgi-bin/peer && echo 'printf "Content-Type: text/plain\r\n\r\n%s\n" "$REMOTE_ADDR"' >> /www/cgi-bin/peer && chmod 755 /www/cgi-bin/peer && exec httpd -f -p 8080 -h /www"##,
                ],
            )
            .unwrap();
        let peer_ip = hosts
            .docker(
                "b",
                &[
                    "inspect",
                    "-f",
                    "{{(index .NetworkSettings.Networks \"flotilla-routed\").IPAddress}}",
                    peer_echo.trim(),
                ],
            )
            .unwrap();
        let ask = format!("http://{}:8080/cgi-bin/peer", peer_ip.trim());
        let mut heard = String::new();
        eventually(
            Duration::from_secs(10),
            "b's peer echo answers a's container",
            || {
                heard = hosts
                    .docker("a", &["exec", &ca, "wget", "-q", "-O", "-", &ask])
                    .unwrap_or_default();
                std::future::ready(!heard.trim().is_empty())
            },
        )
        .await;
        assert_eq!(
            heard
                .trim()
                .trim_matches(|c| c == '[' || c == ']')
                .trim_start_matches("::ffff:"),
            api_a.address.to_string(),
            "b saw the request come from {heard:?}, not from a's container address"
        );
        let _ = hosts.docker("b", &["rm", "-f", peer_echo.trim()]);

        // An agent naming another cluster CIDR: refused, exit 2, naming the setting.
        let out = hosts
            .command("c", BIN)
            .args([
                "agent",
                "--join",
                &cluster.server_url,
                "--token-file",
                &cluster.token.display().to_string(),
                "--ca-hash",
                cluster.pin.get().unwrap(),
                "--data-dir",
                &cluster.dir.path().join("agent-x").display().to_string(),
                "--node",
                "x",
                "--docker",
                hosts.engine("a"),
                "--api-listen",
                "",
                "--cluster-cidr",
                "198.18.240.0/20",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("cluster_cidr"), "{stderr}");
        cluster.cli(&["rm", "routed"]);
        drop(agents);
    });
}

/// A stateful replica migrates from one host to the other across the LAN (no shared
/// network, no route between their container subnets): written to through an lb on
/// host c all along, every acknowledged write is on the target afterwards, and it
/// serves there by its published port.
#[test]
fn a_stateful_replica_migrates_between_hosts_with_every_acknowledged_write() {
    let cluster = Cluster::start(65);
    let hosts = &cluster.hosts;
    let addr_c = hosts.addr("c");
    in_namespace(hosts, "client", async {
        let (agents, client) = cluster.join().await;
        let spec = notes_stack(&cluster.dir.path().join("notes"), "");
        cluster.cli(&["deploy", &spec, "--timeout", "90s"]);
        let source = common::passing(&client, "web").await.remove(0);
        let from = source.node.clone().unwrap();
        let to = if from == "a" { "b" } else { "a" };
        let _lb = cluster.lb("connect_timeout = \"500ms\"\n");
        let base = format!("http://{addr_c}:8080");
        eventually(Duration::from_secs(20), "lb answers", || async {
            get(&format!("{base}/health")).await.is_ok()
        })
        .await;

        // A writer acknowledging sequence numbers every 20 ms, through the lb.
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (acked, stop, base) = (acked.clone(), stop.clone(), base.clone());
            tokio::spawn(async move {
                for n in 0..100_000u64 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    if get(&format!("{base}/cgi-bin/append?w{n}"))
                        .await
                        .is_ok_and(|b| b.trim() == "ok")
                    {
                        acked.lock().unwrap().push(n);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.cli(&["migrate", &source.id, "--to", to]);
        eventually(
            Duration::from_secs(30),
            "web passing on the target",
            || async {
                common::passing(&client, "web")
                    .await
                    .iter()
                    .any(|i| i.node.as_deref() == Some(to))
            },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.await.unwrap();
        let moved = common::passing(&client, "web").await;
        assert!(
            moved.iter().all(|i| i.node.as_deref() == Some(to)),
            "{moved:?}"
        );
        // Read on the target itself, by its registered (published) address.
        let target = &moved[0];
        let written = get(&format!(
            "http://{}:{}/cgi-bin/read",
            target.address, target.port
        ))
        .await
        .unwrap();
        let lines: std::collections::HashSet<&str> = written.lines().collect();
        let acked = acked.lock().unwrap().clone();
        assert!(acked.len() > 50, "only {} writes acknowledged", acked.len());
        for n in &acked {
            assert!(
                lines.contains(format!("w{n}").as_str()),
                "acknowledged write w{n} lost in the move from {from} to {to}"
            );
        }
        eprintln!(
            "FIGURE stateful migration {from} -> {to} across the LAN: {} acknowledged writes, all on the target",
            acked.len()
        );
        cluster.cli(&["rm", "notes"]);
        drop(agents);
    });
}

/// The notes service (a volume, writes through CGI) with `extra` TOML appended to its
/// table (backup, recovery), written as a stack under `dir`; returns the spec's path.
fn notes_stack(dir: &Path, extra: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("health"), "ok\n").unwrap();
    std::fs::write(dir.join("append.cgi"), common::NOTES_APPEND_CGI).unwrap();
    std::fs::write(dir.join("read.cgi"), common::NOTES_READ_CGI).unwrap();
    std::fs::write(
        dir.join("stack.toml"),
        format!(
            r#"name = "notes"

[service.web]
port = 8080
command = ["httpd", "-f", "-p", "8080", "-h", "/www"]
health = {{ type = "http", path = "/health", interval = "300ms" }}

[service.web.image]
base = "busybox"
file = [
    {{ src = "append.cgi", dest = "/www/cgi-bin/append", mode = "0755" }},
    {{ src = "read.cgi", dest = "/www/cgi-bin/read", mode = "0755" }},
    {{ src = "health", dest = "/www/health" }},
]

[[service.web.volume]]
name = "data"
path = "/data"
{extra}"#
        ),
    )
    .unwrap();
    dir.join("stack.toml").display().to_string()
}

/// The archive file names in `dir` (a host's backup directory), oldest first (the
/// names end in the time they were taken).
fn archive_names(dir: &Path) -> Vec<String> {
    names_ending(dir, &[".flotilla-backup"])
}

/// The backups in `dir`, full archives and deltas, by name.
fn backup_names(dir: &Path) -> Vec<String> {
    names_ending(dir, &[".flotilla-backup", ".flotilla-delta"])
}

/// The file names in `dir` ending in one of `suffixes`, sorted (backup names sort by
/// the time they were taken).
fn names_ending(dir: &Path, suffixes: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| suffixes.iter().any(|s| n.ends_with(s)))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What `flotilla ps` says of the cluster's one stateful replica.
fn replica_state(cluster: &Cluster) -> String {
    let ps: serde_json::Value =
        serde_json::from_str(&cluster.cli_output(&["ps", "--json"])).unwrap();
    ps["replicas"][0]["state"].as_str().unwrap().to_owned()
}

/// Appends `w0`..`w{count-1}` through the notes service at `base`, each acknowledged.
async fn append_notes(base: &str, count: u32) {
    for n in 0..count {
        assert_eq!(
            get(&format!("{base}/cgi-bin/append?w{n}"))
                .await
                .unwrap()
                .trim(),
            "ok"
        );
    }
}

/// Checks that the notes `instance` serves hold `w0`..`w{count-1}`.
async fn assert_notes(instance: &flotilla_core::InstanceView, count: u32) {
    let written = get(&format!(
        "http://{}:{}/cgi-bin/read",
        instance.address, instance.port
    ))
    .await
    .unwrap();
    for n in 0..count {
        assert!(
            written.lines().any(|l| l == format!("w{n}")),
            "w{n} in {written:?}"
        );
    }
}

/// Waits (up to `within`) until `service` passes on `node`; returns that instance.
async fn passing_on(
    client: &Client,
    service: &str,
    node: &str,
    within: Duration,
) -> flotilla_core::InstanceView {
    let what = format!("{service} passing on {node}");
    eventually(within, &what, || async {
        common::passing(client, service)
            .await
            .iter()
            .any(|i| i.node.as_deref() == Some(node))
    })
    .await;
    common::passing(client, service)
        .await
        .into_iter()
        .find(|i| i.node.as_deref() == Some(node))
        .expect("passing")
}

/// The notes replicas running (or paused) on an engine, by container name.
async fn running_notes(docker: &bollard::Docker) -> Vec<String> {
    let mut filters = std::collections::HashMap::new();
    filters.insert("label".to_owned(), vec!["flotilla.stack=notes".to_owned()]);
    // A paused copy (a backup reading its volume) is alive too.
    filters.insert(
        "status".to_owned(),
        vec!["running".to_owned(), "paused".to_owned()],
    );
    docker
        .list_containers(Some(bollard::container::ListContainersOptions::<String> {
            all: false,
            filters,
            ..Default::default()
        }))
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| c.names.and_then(|n| n.first().cloned()))
        .collect()
}

/// The host of a stateful replica is cut off the LAN (its engine, agent and container
/// keep running: a partition, the harder case of a loss). Its agent stops the replica
/// itself once its lease lapses; after the grace the replica is restored on the other
/// host from the newest backup copy there, with every write acknowledged before that
/// backup; `ps` shows the loss window; never are two copies running at once (sampled
/// every 50 ms on both engines). The host comes back: its old copy stays stopped, an
/// orphan of an older generation.
#[test]
fn a_cut_off_host_s_stateful_replica_is_restored_elsewhere_and_its_old_copy_stays_stopped() {
    cut_off_and_recover(66, 0, "3s", "2s", false, None);
}

/// As above, but the cut-off host's agent is restarted just as the host is cut off: it
/// cannot reach the registry, and fences from the desired state it kept on disk.
#[test]
fn a_cut_off_host_fences_its_replica_even_when_its_agent_restarts_while_cut_off() {
    cut_off_and_recover(70, 0, "3s", "2s", true, None);
}

/// The recovery figures of BENCHMARKS.md: as above with a 100 MiB volume, the default
/// 10 s grace and a backup every 5 s. Slow (a 100 MiB archive every 5 s, copied over
/// the LAN): run by hand,
/// `cargo nextest run -p flotilla --test multihost --run-ignored only recovery_figures --no-capture`.
#[test]
#[ignore]
fn recovery_figures_with_a_100_mib_volume() {
    cut_off_and_recover(68, 100, "10s", "5s", false, None);
}

/// The same with incremental backups (`full_every = "1h"`: one full archive, then a
/// delta every 5 s), for the cost figures against the run above: run by hand,
/// `cargo nextest run --release -p flotilla --test multihost --run-ignored only recovery_figures --no-capture`.
#[test]
#[ignore]
fn recovery_figures_with_a_100_mib_volume_and_incremental_backups() {
    cut_off_and_recover(72, 100, "10s", "5s", false, Some("1h"));
}

/// Cuts off the host of a notes replica with `mib` MiB in its volume (grace and backup
/// interval as given) and checks the recovery (see the test above); with
/// `restart_agent`, that host's agent is killed just before the cut and started again
/// just after.
fn cut_off_and_recover(
    subnet: u8,
    mib: u32,
    grace: &str,
    interval: &str,
    restart_agent: bool,
    full_every: Option<&str>,
) {
    let cluster = Cluster::start_with(subnet, &["--backup-root", "{dir}/backups-{host}"]);
    let hosts = &cluster.hosts;
    let engines: std::collections::BTreeMap<&str, String> = ["a", "b"]
        .into_iter()
        .map(|h| (h, hosts.engine(h).trim_start_matches("unix://").to_owned()))
        .collect();
    in_namespace(hosts, "client", async {
        let (mut agents, client) = cluster.join().await;
        let spec = notes_stack(
            &cluster.dir.path().join("notes"),
            &format!(
                "\n[service.web.backup]\ninterval = \"{interval}\"\ndir = \"/backups\"\n\
                 copies = 1\nconsistency = \"pause\"\n{}\n[service.web.recovery]\ngrace = \"{grace}\"\n",
                full_every.map_or(String::new(), |f| format!("full_every = \"{f}\"\n"))
            ),
        );
        cluster.cli(&["deploy", &spec, "--timeout", "90s"]);
        let first = common::passing(&client, "web").await.remove(0);
        let from = first.node.clone().unwrap();
        let to = if from == "a" { "b" } else { "a" };
        let base = format!("http://{}:{}", first.address, first.port);
        if mib > 0 {
            let container = first.meta["container_name"].clone();
            hosts
                .docker(
                    &from,
                    &[
                        "exec",
                        &container,
                        "dd",
                        "if=/dev/urandom",
                        "of=/data/blob",
                        "bs=1M",
                        &format!("count={mib}"),
                    ],
                )
                .unwrap();
        }

        // A writer acknowledging a sequence number every 100 ms, with the time of each
        // acknowledgement (unix ms, the clock the backups are named by).
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u64, u64)>::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (acked, stop, base) = (acked.clone(), stop.clone(), base.clone());
            tokio::spawn(async move {
                for n in 0..100_000u64 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    if get(&format!("{base}/cgi-bin/append?w{n}"))
                        .await
                        .is_ok_and(|b| b.trim() == "ok")
                    {
                        acked
                            .lock()
                            .unwrap()
                            .push((n, flotilla_core::record::unix_ms()));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        // Wait for a copy of a backup on the other host, then a little more writing.
        let copies_dir = cluster.dir.path().join(format!("backups-{to}/backups"));
        eventually(
            Duration::from_secs(90),
            "a backup copy on the other host",
            || std::future::ready(backup_names(&copies_dir).len() >= 2),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // With a big volume, what a backup costs: 1 MiB of new data a minute (85 KiB
        // every 5 s) for a while, the source agent's CPU and the archive bytes it wrote.
        let from_agent = if from == "a" { 0 } else { 1 };
        if mib > 0 {
            let agent_log = cluster.dir.path().join(format!("agent-{from}.log"));
            let written = || {
                std::fs::read_to_string(&agent_log)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("scheduled backup written"))
                    .filter_map(|l| {
                        l.split_whitespace()
                            .find_map(|w| w.strip_prefix("bytes="))
                            .and_then(|b| b.parse::<u64>().ok())
                    })
                    .fold((0u64, 0u64), |(n, sum), b| (n + 1, sum + b))
            };
            let pid = agents[from_agent].child.as_ref().unwrap().id();
            let cpu = || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
                let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
                // utime and stime, in clock ticks (100 per second on Linux).
                (fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()) as f64
                    / 100.0
            };
            let container = first.meta["container_name"].clone();
            let (before, cpu_before, t0) = (written(), cpu(), Instant::now());
            for n in 0..12 {
                hosts
                    .docker(
                        &from,
                        &[
                            "exec",
                            &container,
                            "dd",
                            "if=/dev/urandom",
                            &format!("of=/data/churn-{n}"),
                            "bs=85k",
                            "count=1",
                        ],
                    )
                    .unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            let (after, cpu_after, secs) = (written(), cpu(), t0.elapsed().as_secs_f64());
            let per_hour = 3600.0 / secs;
            eprintln!(
                "FIGURE backup cost ({mib} MiB volume, 1 MiB/min of new data, every {interval}, \
                 full_every {full_every:?}): {} backups in {secs:.0} s, {:.1} MiB written per \
                 hour (as much again shipped to its 1 copy), source agent CPU {:.0} s per hour",
                after.0 - before.0,
                (after.1 - before.1) as f64 * per_hour / (1024.0 * 1024.0),
                (cpu_after - cpu_before) * per_hour,
            );
        }

        // Sample both engines every 50 ms from now until the end of the test.
        let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let samples =
            std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Duration, usize, usize)>::new()));
        let cut_at = Instant::now();
        let sampler = {
            let (sampling, samples) = (sampling.clone(), samples.clone());
            let (ea, eb) = (engines["a"].clone(), engines["b"].clone());
            let from = from.clone();
            tokio::spawn(async move {
                let a = bollard::Docker::connect_with_unix(&ea, 5, bollard::API_DEFAULT_VERSION)
                    .unwrap();
                let b = bollard::Docker::connect_with_unix(&eb, 5, bollard::API_DEFAULT_VERSION)
                    .unwrap();
                while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                    let (ra, rb) = tokio::join!(running_notes(&a), running_notes(&b));
                    let (on_from, on_to) = if from == "a" {
                        (ra.len(), rb.len())
                    } else {
                        (rb.len(), ra.len())
                    };
                    samples
                        .lock()
                        .unwrap()
                        .push((cut_at.elapsed(), on_from, on_to));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        if restart_agent {
            agents[from_agent].kill();
        }
        hosts.cut(&from).unwrap();
        if restart_agent {
            agents[from_agent] = cluster.agent(&from);
        }
        let last_ack_ms = flotilla_core::record::unix_ms();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.await.unwrap();

        // Restored on the other host, passing at the client's watch.
        let restored = passing_on(&client, "web", to, Duration::from_secs(90)).await;
        let rto = cut_at.elapsed();
        let taken_ms: u64 = restored.meta["restored-taken-ms"].parse().unwrap();
        let written = get(&format!(
            "http://{}:{}/cgi-bin/read",
            restored.address, restored.port
        ))
        .await
        .unwrap();
        let lines: std::collections::HashSet<&str> = written.lines().collect();
        let acked = acked.lock().unwrap().clone();
        let before: Vec<u64> = acked
            .iter()
            .filter(|(_, at)| *at < taken_ms)
            .map(|(n, _)| *n)
            .collect();
        assert!(
            before.len() > 10,
            "only {} writes before the backup",
            before.len()
        );
        for n in &before {
            assert!(
                lines.contains(format!("w{n}").as_str()),
                "w{n}, acknowledged before the backup used, is missing after the restore"
            );
        }
        let lost = acked
            .iter()
            .filter(|(n, _)| !lines.contains(format!("w{n}").as_str()))
            .count();

        // ps says where it came from and what it may have lost.
        let ps: serde_json::Value =
            serde_json::from_str(&cluster.cli_output(&["ps", "--json"])).unwrap();
        let row = ps["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["replica"] == "notes/web/0")
            .cloned()
            .unwrap();
        assert_eq!(row["node"], to, "{row}");
        assert_eq!(row["generation"], 2, "{row}");
        let state = row["state"].as_str().unwrap();
        assert!(state.starts_with("restored from notes-web-0-"), "{state}");
        assert!(state.contains("s of writes lost at most"), "{state}");

        // The old host comes back: its copy stays stopped (an orphan), nothing serves
        // from it, and the replica stays where it was restored.
        hosts.heal(&from).unwrap();
        eventually(Duration::from_secs(20), "the old host rejoined", || async {
            client
                .nodes()
                .await
                .is_ok_and(|n| n.iter().any(|n| n.name == from))
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        sampler.await.unwrap();
        // (Polled: a scheduled backup pauses the replica, out of rotation meanwhile.)
        eventually(
            Duration::from_secs(10),
            "only the restored copy serves",
            || async {
                let web = common::passing(&client, "web").await;
                web.len() == 1 && web[0].node.as_deref() == Some(to)
            },
        )
        .await;
        let samples = samples.lock().unwrap().clone();
        let both = samples.iter().filter(|(_, f, t)| *f > 0 && *t > 0).count();
        assert_eq!(
            both,
            0,
            "two copies running at once in {both} of {} samples",
            samples.len()
        );
        let stopped_at = samples.iter().find(|(_, f, _)| *f == 0).map(|s| s.0);
        let started_at = samples.iter().find(|(_, _, t)| *t > 0).map(|s| s.0);
        let (stopped_at, started_at) = (stopped_at.unwrap(), started_at.unwrap());
        assert!(stopped_at < started_at);
        let old_running_after_heal = samples
            .iter()
            .filter(|(at, f, _)| *at > rto && *f > 0)
            .count();
        assert_eq!(old_running_after_heal, 0, "the stale copy ran again");
        let stale = hosts
            .docker(
                &from,
                &[
                    "ps",
                    "-a",
                    "--filter",
                    "label=flotilla.stack=notes",
                    "--format",
                    "{{.Names}} {{.State}}",
                ],
            )
            .unwrap();
        assert!(
            stale.lines().any(|l| l.ends_with("exited")),
            "the old copy is kept, stopped: {stale}"
        );
        // ps lists it as an orphan; rm --orphans removes it with its volume.
        let ps: serde_json::Value =
            serde_json::from_str(&cluster.cli_output(&["ps", "--json"])).unwrap();
        let orphans = ps["orphans"].as_array().unwrap();
        assert!(
            orphans.len() == 1
                && orphans[0]["node"] == from.as_str()
                && orphans[0]["replica"] == "notes/web/0"
                && orphans[0]["generation"] == 1
                && orphans[0]["current"] == 2,
            "{orphans:?}"
        );
        cluster.cli(&["rm", "--orphans"]);
        let left = hosts
            .docker(
                &from,
                &["ps", "-aq", "--filter", "label=flotilla.stack=notes"],
            )
            .unwrap();
        assert!(left.trim().is_empty(), "orphan removed: {left}");
        let volumes = hosts.docker(&from, &["volume", "ls", "-q"]).unwrap();
        assert!(!volumes.contains("notes-web-0-data"), "{volumes}");
        let web = common::passing(&client, "web").await;
        assert!(web.iter().any(|i| i.node.as_deref() == Some(to)), "{web:?}");
        eprintln!(
            "FIGURE key-node recovery ({mib} MiB volume, grace {grace}, lease TTL 1 s, backups \
             every {interval}, 1 copy): cut -> old copy stopped {:.2} s, restored copy running \
             {:.2} s, passing at the client {:.2} s (RTO); {} of {} acknowledged writes lost \
             (last ack {} ms after the backup used); {} samples, never two copies running",
            stopped_at.as_secs_f64(),
            started_at.as_secs_f64(),
            rto.as_secs_f64(),
            lost,
            acked.len(),
            last_ack_ms.saturating_sub(taken_ms),
            samples.len()
        );
        drop(agents);
    });
}

/// Policy `wait`: a cut-off host's stateful replica stays assigned to it, nothing moves
/// after the grace, and `ps` says what it waits for. `flotilla recover` restores it on
/// the other host — from the previous archive, since the newest copy there fails
/// verification (corrupted here), and `ps` says so.
#[test]
fn policy_wait_holds_a_replica_and_recover_falls_back_past_a_corrupt_newest_backup() {
    let cluster = Cluster::start_with(67, &["--backup-root", "{dir}/backups-{host}"]);
    let hosts = &cluster.hosts;
    in_namespace(hosts, "client", async {
        let (agents, client) = cluster.join().await;
        let stack_dir = cluster.dir.path().join("notes");
        let backup = "\n[service.web.backup]\ninterval = \"2s\"\ndir = \"/backups\"\ncopies = 1\n";
        let spec = notes_stack(
            &stack_dir,
            &format!("{backup}\n[service.web.recovery]\non_node_loss = \"wait\"\ngrace = \"2s\"\n"),
        );
        cluster.cli(&["deploy", &spec, "--timeout", "90s"]);
        let first = common::passing(&client, "web").await.remove(0);
        let from = first.node.clone().unwrap();
        let to = if from == "a" { "b" } else { "a" };
        let base = format!("http://{}:{}", first.address, first.port);
        append_notes(&base, 5).await;
        let copies_dir = cluster.dir.path().join(format!("backups-{to}/backups"));
        let archives = || archive_names(&copies_dir);
        eventually(
            Duration::from_secs(30),
            "two backup copies on the other host",
            || std::future::ready(archives().len() >= 2),
        )
        .await;
        hosts.cut(&from).unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        let (_, assigned) = client.assignments(0, Duration::ZERO).await.unwrap();
        let a = &assigned["notes/web/0"];
        assert_eq!((a.node.as_str(), a.generation), (from.as_str(), 1), "{a:?}");
        assert!(a.lost_at_ms.is_some(), "{a:?}");
        let state = replica_state(&cluster);
        assert!(
            state.starts_with(&format!("waiting for node {from} (lost ")),
            "{state}"
        );
        let on_to = hosts
            .docker(to, &["ps", "-q", "--filter", "label=flotilla.stack=notes"])
            .unwrap();
        assert!(on_to.trim().is_empty(), "nothing moves under wait: {on_to}");

        // Corrupt the newest copy (one byte in the middle), then switch to restore.
        let list = archives();
        let newest = copies_dir.join(list.last().unwrap());
        let previous = list[list.len() - 2].clone();
        let mut bytes = std::fs::read(&newest).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&newest, bytes).unwrap();
        // `flotilla backups --verify` lists the copies on the live host and finds it.
        let listed: serde_json::Value =
            serde_json::from_str(&cluster.cli_output(&["backups", "web", "--verify", "--json"]))
                .unwrap();
        let listed = listed.as_array().unwrap();
        let newest_name = list.last().unwrap().as_str();
        assert!(listed.len() >= 2, "{listed:?}");
        for a in listed {
            assert_eq!(a["node"], to, "{a}");
            assert_eq!(a["verified"], a["name"] != newest_name, "{a}");
        }
        // The operator recovers it by hand (the newest verified backup, where
        // placement puts it); the command waits until it passes and says what it used.
        let out: serde_json::Value =
            serde_json::from_str(&cluster.cli_output(&["recover", "web", "--json"])).unwrap();
        assert_eq!(out[0]["node"], to, "{out}");
        assert_eq!(out[0]["generation"], 2, "{out}");
        let restored = passing_on(&client, "web", to, Duration::from_secs(10)).await;
        assert_eq!(
            restored.meta["restored-from"],
            format!("{previous}@{to}"),
            "the previous archive is used"
        );
        assert_notes(&restored, 5).await;
        let state = replica_state(&cluster);
        assert!(
            state.contains("newer archives failed verification")
                && state.contains(list.last().unwrap()),
            "{state}"
        );
        drop(agents);
    });
}

/// `flotilla recover --to NODE --from ARCHIVE` by hand: three agents (the server's host
/// runs one too); the replica's host is cut off (policy `wait`, so nothing moves by
/// itself) and the operator restores an older archive than the newest on the node that
/// holds no copy of it — the agent there fetches it from the copy holder.
#[test]
fn recover_to_a_node_from_an_archive_restores_that_point_there() {
    let cluster = Cluster::start_with(74, &["--backup-root", "{dir}/backups-{host}"]);
    let hosts = &cluster.hosts;
    hosts
        .load_image("c", flotilla_testkit::busybox_image().unwrap())
        .unwrap();
    in_namespace(hosts, "client", async {
        let (mut agents, client) = cluster.join().await;
        agents.push(cluster.agent("c"));
        eventually(Duration::from_secs(30), "three agents joined", || async {
            client.nodes().await.is_ok_and(|n| n.len() == 3)
        })
        .await;
        let spec = notes_stack(
            &cluster.dir.path().join("notes"),
            "\n[service.web.backup]\ninterval = \"1s\"\ndir = \"/backups\"\ncopies = 1\n\
             \n[service.web.recovery]\non_node_loss = \"wait\"\ngrace = \"2s\"\n",
        );
        cluster.cli(&["deploy", &spec, "--timeout", "90s"]);
        let first = common::passing(&client, "web").await.remove(0);
        let from = first.node.clone().unwrap();
        let base = format!("http://{}:{}", first.address, first.port);
        append_notes(&base, 3).await;
        let written_at = flotilla_core::record::unix_ms();
        // The copy holder is whichever other host receives the copies.
        let copies =
            |h: &str| archive_names(&cluster.dir.path().join(format!("backups-{h}/backups")));
        let others: Vec<&str> = ["a", "b", "c"].into_iter().filter(|h| *h != from).collect();
        let stamp_of = |name: &str| {
            flotilla_core::record::parse_file_stamp(
                name.trim_start_matches("notes-web-0-")
                    .trim_end_matches(".flotilla-backup"),
            )
            .unwrap_or(0)
        };
        let mut holder = "";
        eventually(
            Duration::from_secs(30),
            "a copy taken after the writes",
            || {
                holder = others
                    .iter()
                    .copied()
                    .find(|h| copies(h).iter().any(|n| stamp_of(n) > written_at))
                    .unwrap_or("");
                std::future::ready(!holder.is_empty())
            },
        )
        .await;
        let chosen = copies(holder)
            .into_iter()
            .find(|n| stamp_of(n) > written_at)
            .unwrap();
        // A later write, then a newer copy: restoring the chosen archive must not have it.
        assert_eq!(
            get(&format!("{base}/cgi-bin/append?late"))
                .await
                .unwrap()
                .trim(),
            "ok"
        );
        let late_at = flotilla_core::record::unix_ms();
        eventually(
            Duration::from_secs(30),
            "a copy with the late write",
            || std::future::ready(copies(holder).iter().any(|n| stamp_of(n) > late_at)),
        )
        .await;
        let target = others.iter().copied().find(|h| *h != holder).unwrap();
        assert!(copies(target).is_empty(), "the target holds no copy");

        hosts.cut(&from).unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let out: serde_json::Value = serde_json::from_str(&cluster.cli_output(&[
            "recover", "web", "--to", target, "--from", &chosen, "--json",
        ]))
        .unwrap();
        assert_eq!(out[0]["node"], target, "{out}");
        let restored = passing_on(&client, "web", target, Duration::from_secs(20)).await;
        assert_eq!(
            restored.meta["restored-from"],
            format!("{chosen}@{holder}"),
            "the named archive, fetched from the copy holder"
        );
        assert_notes(&restored, 3).await;
        let read = get(&format!(
            "http://{}:{}/cgi-bin/read",
            restored.address, restored.port
        ))
        .await
        .unwrap();
        assert!(
            !read.lines().any(|l| l == "late"),
            "not the newest archive: {read:?}"
        );
        drop(agents);
    });
}

/// Policy `empty` (the data is declared expendable): a cut-off host's stateful replica
/// starts on the other host after the grace with empty volumes of a new generation, and
/// `ps` says so.
#[test]
fn policy_empty_starts_a_lost_replica_empty_on_another_host() {
    let cluster = Cluster::start_with(73, &[]);
    let hosts = &cluster.hosts;
    in_namespace(hosts, "client", async {
        let (agents, client) = cluster.join().await;
        let spec = notes_stack(
            &cluster.dir.path().join("notes"),
            "\n[service.web.recovery]\non_node_loss = \"empty\"\ngrace = \"2s\"\n",
        );
        cluster.cli(&["deploy", &spec, "--timeout", "90s"]);
        let first = common::passing(&client, "web").await.remove(0);
        let from = first.node.clone().unwrap();
        let to = if from == "a" { "b" } else { "a" };
        let base = format!("http://{}:{}", first.address, first.port);
        append_notes(&base, 3).await;
        hosts.cut(&from).unwrap();
        let moved = passing_on(&client, "web", to, Duration::from_secs(30)).await;
        let read = get(&format!(
            "http://{}:{}/cgi-bin/read",
            moved.address, moved.port
        ))
        .await
        .unwrap();
        assert!(
            !read.lines().any(|l| l.starts_with('w')),
            "started empty: {read:?}"
        );
        let (_, assigned) = client.assignments(0, Duration::ZERO).await.unwrap();
        let a = &assigned["notes/web/0"];
        assert_eq!((a.node.as_str(), a.generation), (to, 2), "{a:?}");
        assert_eq!(
            a.recovered.as_ref().map(|r| r.how),
            Some(flotilla_core::recovery::OnNodeLoss::Empty)
        );
        let state = replica_state(&cluster);
        assert_eq!(
            state,
            format!("started empty on {to} after node {from} was lost"),
            "{state}"
        );
        drop(agents);
    });
}

/// Incremental backups: after one full archive, each interval writes and ships only a
/// delta (a small `.flotilla-delta` naming the archive it follows). The replica's host
/// is cut off and an operator recovers it on the other host: the full archive and the
/// chain of deltas are applied in order (every write made after the full is back), and
/// a corrupt newest delta ends the chain at the link before it, which `ps` says.
#[test]
fn incremental_backups_ship_deltas_and_a_restore_applies_the_chain() {
    let cluster = Cluster::start_with(71, &["--backup-root", "{dir}/backups-{host}"]);
    let hosts = &cluster.hosts;
    in_namespace(hosts, "client", async {
        let (agents, client) = cluster.join().await;
        let stack_dir = cluster.dir.path().join("notes");
        let spec = notes_stack(
            &stack_dir,
            "\n[service.web.backup]\ninterval = \"1s\"\nfull_every = \"1h\"\ndir = \"/backups\"\ncopies = 1\n\
             \n[service.web.recovery]\non_node_loss = \"wait\"\ngrace = \"2s\"\n",
        );
        cluster.cli(&["deploy", &spec, "--timeout", "90s"]);
        let first = common::passing(&client, "web").await.remove(0);
        let from = first.node.clone().unwrap();
        let to = if from == "a" { "b" } else { "a" };
        let base = format!("http://{}:{}", first.address, first.port);
        let copies_dir = cluster.dir.path().join(format!("backups-{to}/backups"));
        let named = |suffix: &str| names_ending(&copies_dir, &[suffix]);
        // Every write below comes after the full archive: only deltas carry them.
        eventually(
            Duration::from_secs(30),
            "a full archive copied to the other host",
            || std::future::ready(!named(".flotilla-backup").is_empty()),
        )
        .await;
        let deltas_before = named(".flotilla-delta").len();
        append_notes(&base, 10).await;
        // A writer keeps changing the volume, so deltas keep coming: w0..w9 end up in
        // one that is not the newest.
        let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let writer = {
            let (writing, base) = (writing.clone(), base.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while writing.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = get(&format!("{base}/cgi-bin/append?bg{n}")).await;
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            })
        };
        eventually(
            Duration::from_secs(30),
            "deltas after the writes copied",
            || std::future::ready(named(".flotilla-delta").len() >= deltas_before + 3),
        )
        .await;
        writing.store(false, std::sync::atomic::Ordering::Relaxed);
        writer.await.unwrap();
        // Nothing changes any more: no delta is written for nothing.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let settled = named(".flotilla-delta").len();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            named(".flotilla-delta").len(),
            settled,
            "no delta while the volume does not change"
        );
        let fulls = named(".flotilla-backup");
        assert_eq!(
            fulls.len(),
            1,
            "no second full within full_every: {fulls:?}"
        );
        let full_bytes = std::fs::metadata(copies_dir.join(&fulls[0])).unwrap().len();
        let deltas = named(".flotilla-delta");
        for d in &deltas {
            let bytes = std::fs::metadata(copies_dir.join(d)).unwrap().len();
            assert!(
                bytes * 10 < full_bytes,
                "a delta ({d}: {bytes} B) is a small part of the full ({full_bytes} B)"
            );
        }
        let listed: serde_json::Value =
            serde_json::from_str(&cluster.cli_output(&["backups", "web", "--json"])).unwrap();
        let kinds: Vec<bool> = listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["node"] == to)
            .map(|a| a["delta"].as_bool().unwrap())
            .collect();
        assert!(
            kinds.iter().filter(|d| **d).count() >= 3 && kinds.iter().any(|d| !d),
            "backups lists fulls and deltas: {listed}"
        );

        hosts.cut(&from).unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        // The newest delta copy is corrupted: the chain ends at the one before it.
        let deltas = named(".flotilla-delta");
        let newest = deltas.last().unwrap().clone();
        let intact = deltas[deltas.len() - 2].clone();
        let path = copies_dir.join(&newest);
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let out: serde_json::Value =
            serde_json::from_str(&cluster.cli_output(&["recover", "web", "--json"])).unwrap();
        assert_eq!(out[0]["node"], to, "{out}");
        let restored = passing_on(&client, "web", to, Duration::from_secs(10)).await;
        let from_meta = &restored.meta["restored-from"];
        assert!(
            from_meta.starts_with(&format!("{}@{to} + ", fulls[0]))
                && from_meta.ends_with(&format!(" deltas to {intact}")),
            "restored from the full and its chain up to the intact delta: {from_meta}"
        );
        assert_notes(&restored, 10).await;
        // `ps` joins the assignment with the restored instance's meta, which can trail
        // the instance's passing by a moment (CI once read "restoring on b …" here).
        let t0 = std::time::Instant::now();
        let mut state = replica_state(&cluster);
        while !state.contains("backup chain broken") && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            state = replica_state(&cluster);
        }
        assert!(
            state.contains(&format!("backup chain broken at {newest}")),
            "{state}"
        );
        drop(agents);
    });
}

/// A flotilla server as a stack service: its catalog and token on a volume.
const REGISTRY_SERVICE: &str = r#"[service.registry]
port = 7700
command = ["server", "--listen", "0.0.0.0:7700", "--data-dir", "/var/lib/flotilla", "--dns-listen", "", "--insecure-http"]
image = { base = "flotilla" }
health = { type = "http", path = "/healthz", interval = "300ms" }

[[service.registry.volume]]
name = "data"
path = "/var/lib/flotilla"
"#;

/// The token the inner registry `reg` (running on `host`) made on its volume.
fn inner_token(hosts: &Hosts, host: &str, reg: &flotilla_core::InstanceView) -> String {
    hosts
        .docker(
            host,
            &[
                "exec",
                &reg.meta["container_name"],
                "cat",
                "/var/lib/flotilla/token",
            ],
        )
        .unwrap()
        .trim()
        .to_owned()
}

/// A client of the inner registry instance `i`, by its registered address.
fn inner_client(i: &flotilla_core::InstanceView, token: &str) -> Client {
    Client::new(
        &format!("http://{}:{}", i.address, i.port),
        Some(token.to_owned()),
    )
}

/// flotilla's own key node: a registry server run as a stateful stack service (the
/// `flotilla` base image, its catalog and token on a volume, backed up every 2 s with a
/// copy on the other host). Its host is cut off; it is restored on the other host from
/// that copy and answers with the same token and the catalog of its last backup.
#[test]
fn a_registry_run_as_a_stack_service_is_restored_with_its_token_and_catalog() {
    let cluster = Cluster::start_with(69, &["--backup-root", "{dir}/backups-{host}"]);
    let hosts = &cluster.hosts;
    in_namespace(hosts, "client", async {
        let (agents, client) = cluster.join().await;
        let stack_dir = cluster.dir.path().join("ctl");
        std::fs::create_dir_all(&stack_dir).unwrap();
        std::fs::write(
            stack_dir.join("stack.toml"),
            format!(
                r#"name = "ctl"

{REGISTRY_SERVICE}
[service.registry.backup]
interval = "2s"
dir = "/backups"
copies = 1

[service.registry.recovery]
grace = "3s"
"#
            ),
        )
        .unwrap();
        cluster.cli(&[
            "deploy",
            &stack_dir.join("stack.toml").display().to_string(),
            "--timeout",
            "120s",
        ]);
        let reg = common::passing(&client, "registry").await.remove(0);
        let from = reg.node.clone().unwrap();
        let to = if from == "a" { "b" } else { "a" };
        let token = inner_token(hosts, &from, &reg);
        let inner = |i: &flotilla_core::InstanceView| inner_client(i, &token);
        // A record in the inner registry's catalog: this stack itself, kept as "kept".
        let services = client.stack("ctl").await.unwrap().services;
        inner(&reg).deploy("kept", &services).await.unwrap();
        let written_ms = flotilla_core::record::unix_ms();
        // Wait for a copy on the other host taken after the write.
        let copies_dir = cluster.dir.path().join(format!("backups-{to}/backups"));
        eventually(
            Duration::from_secs(60),
            "a copy taken after the write",
            || {
                let newer = archive_names(&copies_dir).iter().any(|name| {
                    name.strip_prefix("ctl-registry-0-")
                        .and_then(|r| r.strip_suffix(".flotilla-backup"))
                        .and_then(flotilla_core::record::parse_file_stamp)
                        .is_some_and(|ms| ms > written_ms)
                });
                std::future::ready(newer)
            },
        )
        .await;
        hosts.cut(&from).unwrap();
        let restored = passing_on(&client, "registry", to, Duration::from_secs(60)).await;
        let record = inner(&restored)
            .stack("kept")
            .await
            .expect("the same token and the catalog of the last backup");
        assert_eq!(record.services, services);
        assert!(
            restored.meta["restored-from"].starts_with("ctl-registry-0-"),
            "{:?}",
            restored.meta
        );
        drop(agents);
    });
}

/// The key nodes move between hosts that share only the LAN: a flotilla server run as a
/// stack service migrates with its volume (its token and catalog arrive with it, and
/// the downtime is the final delta alone: the image was staged first), and an lb run as
/// a stack service moves blue/green and serves on the target by its published port.
#[test]
fn the_flotilla_server_and_lb_migrate_between_hosts() {
    let cluster = Cluster::start(75);
    let hosts = &cluster.hosts;
    in_namespace(hosts, "client", async {
        let (agents, client) = cluster.join().await;
        let stack_dir = cluster.dir.path().join("keys");
        std::fs::create_dir_all(&stack_dir).unwrap();
        // The lb proxies its own admin endpoint, so its health check goes through the
        // data plane.
        std::fs::write(
            stack_dir.join("lb.toml"),
            "[admin]\nlisten = \"127.0.0.1:9901\"\n\n[[listener]]\nname = \"self\"\nbind = \"0.0.0.0:8080\"\nbackends = [\"127.0.0.1:9901\"]\n",
        )
        .unwrap();
        std::fs::write(
            stack_dir.join("stack.toml"),
            format!(
                r#"name = "keys"

{REGISTRY_SERVICE}
[service.edge]
port = 8080
command = ["lb", "--config", "/etc/flotilla/lb.toml"]
image = {{ base = "flotilla", file = [{{ src = "lb.toml", dest = "/etc/flotilla/lb.toml" }}] }}
health = {{ type = "http", path = "/healthz", interval = "300ms" }}
update = {{ health_timeout = "20s", drain = "1s" }}
"#
            ),
        )
        .unwrap();
        cluster.cli(&[
            "deploy",
            &stack_dir.join("stack.toml").display().to_string(),
            "--timeout",
            "120s",
        ]);
        let other = |node: &str| if node == "a" { "b" } else { "a" };

        // The registry, with a record in its catalog written with the token it made on
        // its volume.
        let reg = common::passing(&client, "registry").await.remove(0);
        let from = reg.node.clone().unwrap();
        let to = other(&from);
        let token = inner_token(hosts, &from, &reg);
        let inner = |i: &flotilla_core::InstanceView| inner_client(i, &token);
        let services = client.stack("keys").await.unwrap().services;
        inner(&reg).deploy("kept", &services).await.unwrap();
        let out = cluster.cli_output(&["migrate", &reg.id, "--to", to]);
        let downtime: f64 = out
            .split("downtime ")
            .nth(1)
            .and_then(|s| s.split('s').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no downtime in {out:?}"));
        assert!(downtime < 5.0, "{out}");
        let moved = passing_on(&client, "registry", to, Duration::from_secs(30)).await;
        assert_ne!(
            moved.address, reg.address,
            "reached on the target host's address"
        );
        let record = inner(&moved)
            .stack("kept")
            .await
            .expect("the catalog and the token moved with the volume");
        assert_eq!(record.services, services);

        // The lb: blue/green onto the other host, serving through its listener there.
        let edge = common::passing(&client, "edge").await.remove(0);
        let edge_to = other(edge.node.as_deref().unwrap());
        cluster.cli(&["migrate", &edge.id, "--to", edge_to]);
        let moved = passing_on(&client, "edge", edge_to, Duration::from_secs(30)).await;
        eventually(
            Duration::from_secs(30),
            "the lb on the target alone",
            || async { common::passing(&client, "edge").await.len() == 1 },
        )
        .await;
        assert_eq!(
            get(&format!("http://{}:{}/healthz", moved.address, moved.port))
                .await
                .unwrap(),
            "ok\n"
        );
        eprintln!(
            "FIGURE key-node migration across the LAN: registry {from} -> {to}, downtime {downtime:.2} s"
        );
        cluster.cli(&["rm", "keys"]);
        drop(agents);
    });
}
