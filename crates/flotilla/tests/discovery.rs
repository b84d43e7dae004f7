//! Self-registration on a real Docker engine: labelled containers join, leave on death,
//! and nothing stale survives an agent crash; a dead agent's node expires within its TTL.

mod common;

use std::time::{Duration, Instant};

use common::{agent, eventually, passing, Server};
use flotilla_testkit::{busybox_image, docker, unique, Container, DockerNetwork};

fn web_container(net: &DockerNetwork, service: &str, extra: &[&str]) -> Container {
    let image = busybox_image().unwrap();
    let name = unique("flotilla-web");
    let mut args = vec!["--network", &net.name, "-l"];
    let service_label = format!("flotilla.service={service}");
    args.push(&service_label);
    args.extend([
        "-l",
        "flotilla.port=80",
        "-l",
        "flotilla.check.http=/health",
    ]);
    args.extend_from_slice(extra);
    args.extend([image, "httpd", "-f", "-p", "80", "-h", "/www"]);
    Container::run(&name, &args).unwrap()
}

#[tokio::test]
async fn labelled_container_joins_passes_and_leaves_on_kill() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let net = DockerNetwork::create("flotilla-disc").unwrap();
    let _agent = agent(dir.path(), &server, "host-a", None);
    eventually(Duration::from_secs(10), "node registered", || async {
        client.nodes().await.map(|n| n.len() == 1).unwrap_or(false)
    })
    .await;

    let service = "join";
    let index = client
        .service(service, 0, Duration::ZERO, false)
        .await
        .unwrap()
        .index;
    let watcher = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut index = index;
            loop {
                let s = client
                    .service(service, index, Duration::from_secs(30), true)
                    .await
                    .unwrap();
                if !s.instances.is_empty() {
                    return (Instant::now(), s);
                }
                index = s.index;
            }
        })
    };
    let started = Instant::now();
    let c = web_container(
        &net,
        service,
        &[
            "-l",
            "flotilla.weight=250",
            "-l",
            "flotilla.meta.version=1.0",
        ],
    );
    let (seen_at, s) = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("watcher woke")
        .unwrap();
    let join = seen_at - started;
    eprintln!("FIGURE join: docker run -> passing at a blocking watcher: {join:?}");
    let inst = &s.instances[0];
    assert_eq!(inst.meta["container_name"], c.name);
    assert_eq!(inst.meta["version"], "1.0");
    assert_eq!(inst.weight, 250);
    assert_eq!(inst.node.as_deref(), Some("host-a"));
    assert!(
        inst.address.to_string().starts_with("198.18."),
        "{}",
        inst.address
    );
    assert!(join < Duration::from_secs(5), "join took {join:?}");

    // Addressable by container name.
    let by_name = client
        .service(service, 0, Duration::ZERO, false)
        .await
        .unwrap();
    assert_eq!(by_name.instances.len(), 1);

    let killed = Instant::now();
    docker(&["kill", &c.name]).unwrap();
    let gone = eventually(Duration::from_secs(5), "out of the passing set", || async {
        passing(&client, service).await.is_empty()
    })
    .await;
    eprintln!(
        "FIGURE leave: docker kill -> out of the passing set: {:?}",
        killed.elapsed()
    );
    assert!(
        gone < Duration::from_secs(2),
        "kill took {gone:?} to notice"
    );
    assert!(
        client
            .service(service, 0, Duration::ZERO, false)
            .await
            .unwrap()
            .instances
            .is_empty(),
        "deregistered, not just critical"
    );
}

/// A labelled container with its own Docker `HEALTHCHECK` and no check label is judged
/// by the engine's verdict: not passing while unhealthy, passing once healthy, critical
/// again (with the engine's output) when its check fails.
#[tokio::test]
async fn a_container_s_own_healthcheck_decides_its_health() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let net = DockerNetwork::create("flotilla-hc").unwrap();
    let _agent = agent(dir.path(), &server, "host-hc", None);
    let service = "hc";
    let label = format!("flotilla.service={service}");
    let c = Container::run(
        &unique("flotilla-hc"),
        &[
            "--network",
            &net.name,
            "-l",
            &label,
            "-l",
            "flotilla.port=80",
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "300ms",
            "--health-retries",
            "1",
            busybox_image().unwrap(),
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ],
    )
    .unwrap();
    let instance = || async {
        client
            .service(service, 0, Duration::ZERO, false)
            .await
            .ok()
            .and_then(|s| s.instances.into_iter().next())
    };
    eventually(
        Duration::from_secs(10),
        "registered with the engine's check, not passing",
        || async {
            instance().await.is_some_and(|i| {
                i.checks.len() == 1
                    && i.checks[0].kind == flotilla_core::CheckKind::Docker
                    && i.health != flotilla_core::HealthStatus::Passing
            })
        },
    )
    .await;
    // httpd accepts connections all along: a TCP check would have passed by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let i = instance().await.unwrap();
    assert_ne!(i.health, flotilla_core::HealthStatus::Passing, "{i:?}");
    docker(&["exec", &c.name, "touch", "/tmp/ok"]).unwrap();
    let took = eventually(
        Duration::from_secs(5),
        "passing once the engine says healthy",
        || async {
            instance()
                .await
                .is_some_and(|i| i.health == flotilla_core::HealthStatus::Passing)
        },
    )
    .await;
    eprintln!("FIGURE HEALTHCHECK healthy -> passing in the registry: {took:?}");
    docker(&["exec", &c.name, "rm", "/tmp/ok"]).unwrap();
    eventually(
        Duration::from_secs(5),
        "critical again, with the engine's output",
        || async {
            instance().await.is_some_and(|i| {
                i.health == flotilla_core::HealthStatus::Critical
                    && i.output.contains("docker health: unhealthy")
            })
        },
    )
    .await;
}

#[tokio::test]
async fn exec_checks_stop_and_pause_follow_the_container() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let net = DockerNetwork::create("flotilla-disc").unwrap();
    let _agent = agent(dir.path(), &server, "host-b", None);
    let service = "exec";
    let c = web_container(
        &net,
        service,
        &[
            "-l",
            "flotilla.check.exec=test -f /www/health",
            "-l",
            "flotilla.check.interval=300ms",
        ],
    );
    eventually(Duration::from_secs(10), "passing (http + exec)", || async {
        passing(&client, service).await.len() == 1
    })
    .await;

    // The exec check fails inside the container: critical, still registered.
    docker(&["exec", &c.name, "rm", "/www/health"]).unwrap();
    eventually(Duration::from_secs(6), "critical via exec+http", || async {
        passing(&client, service).await.is_empty()
    })
    .await;
    docker(&["exec", &c.name, "sh", "-c", "echo ok > /www/health"]).unwrap();
    eventually(Duration::from_secs(6), "passing again", || async {
        passing(&client, service).await.len() == 1
    })
    .await;

    docker(&["stop", "-t", "1", &c.name]).unwrap();
    eventually(Duration::from_secs(3), "stopped: deregistered", || async {
        client
            .service(service, 0, Duration::ZERO, false)
            .await
            .unwrap()
            .instances
            .is_empty()
    })
    .await;

    // Pause takes a container out of rotation; unpause brings it back. (Not combined
    // with exec checks: an exec racing a pause can wedge the engine's freezer.)
    let service = "pause";
    let p = web_container(&net, service, &[]);
    eventually(Duration::from_secs(10), "passing", || async {
        passing(&client, service).await.len() == 1
    })
    .await;
    docker(&["pause", &p.name]).unwrap();
    eventually(Duration::from_secs(3), "paused: deregistered", || async {
        client
            .service(service, 0, Duration::ZERO, false)
            .await
            .unwrap()
            .instances
            .is_empty()
    })
    .await;
    docker(&["unpause", &p.name]).unwrap();
    eventually(Duration::from_secs(5), "unpaused: back", || async {
        passing(&client, service).await.len() == 1
    })
    .await;
}

#[tokio::test]
async fn agent_crash_while_containers_change_leaves_nothing_stale() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let net = DockerNetwork::create("flotilla-disc").unwrap();
    let mut a = agent(dir.path(), &server, "host-c", None);
    let service = "resync";
    let doomed = web_container(&net, service, &[]);
    let _kept = web_container(&net, service, &[]);
    eventually(Duration::from_secs(10), "both passing", || async {
        passing(&client, service).await.len() == 2
    })
    .await;

    // The agent dies; while it is down one container dies and a new one starts.
    a.kill();
    docker(&["kill", &doomed.name]).unwrap();
    let newcomer = web_container(&net, service, &[]);
    // Restart well within the lease TTL, so only anti-entropy can fix the catalog.
    let _a2 = agent(dir.path(), &server, "host-c", None);
    eventually(
        Duration::from_secs(10),
        "resynced to the engine's truth",
        || async {
            let s = client
                .service(service, 0, Duration::ZERO, true)
                .await
                .unwrap();
            let mut names: Vec<String> = s
                .instances
                .iter()
                .map(|i| i.meta["container_name"].clone())
                .collect();
            names.sort();
            let mut want = vec![_kept.name.clone(), newcomer.name.clone()];
            want.sort();
            names == want
        },
    )
    .await;
    let all = client
        .service(service, 0, Duration::ZERO, false)
        .await
        .unwrap();
    assert!(
        all.instances
            .iter()
            .all(|i| i.meta["container_name"] != doomed.name),
        "stale entry survived"
    );
}

#[tokio::test]
async fn dead_agent_node_expires_within_its_lease_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let net = DockerNetwork::create("flotilla-disc").unwrap();
    let mut a = agent(dir.path(), &server, "host-d", None);
    let service = "lease";
    let _c = web_container(&net, service, &[]);
    eventually(Duration::from_secs(10), "passing", || async {
        passing(&client, service).await.len() == 1
    })
    .await;
    let killed = Instant::now();
    a.kill();
    eventually(Duration::from_secs(6), "node expired", || async {
        passing(&client, service).await.is_empty()
    })
    .await;
    let took = killed.elapsed();
    eprintln!("FIGURE host death: agent SIGKILL -> instances gone: {took:?}");
    // Lease TTL 3 s, renewed every 1 s: expiry 3-4 s after the last renewal at most.
    assert!(took <= Duration::from_millis(3300), "took {took:?}");
    eventually(Duration::from_secs(2), "node record removed", || async {
        client.nodes().await.unwrap().is_empty()
    })
    .await;
}

#[tokio::test]
async fn bad_labels_are_refused_and_named_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let net = DockerNetwork::create("flotilla-disc").unwrap();
    let a = agent(dir.path(), &server, "host-e", None);
    let image = busybox_image().unwrap();
    let name = unique("flotilla-bad");
    let _c = Container::run(
        &name,
        &[
            "--network",
            &net.name,
            "-l",
            "flotilla.service=bad",
            "-l",
            "flotilla.port=http",
            image,
            "sleep",
            "60",
        ],
    )
    .unwrap();
    eventually(Duration::from_secs(10), "label error logged", || async {
        a.log_text().contains("label flotilla.port")
    })
    .await;
    // Only this test's service: other tests' agents share the engine.
    assert!(client
        .instances()
        .await
        .unwrap()
        .iter()
        .all(|i| i.service != "bad"));
}

#[tokio::test]
async fn agent_reports_cpu_share_of_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let net = DockerNetwork::create("flotilla-disc").unwrap();
    let _agent = agent(dir.path(), &server, "host-load", None);
    let image = busybox_image().unwrap();
    let labels = [
        "-l",
        "flotilla.service=load",
        "-l",
        "flotilla.port=80",
        "-l",
        "flotilla.check.none=1",
    ];
    let mut burn_args = vec!["--network", net.name.as_str(), "--cpus", "0.5"];
    burn_args.extend(labels);
    burn_args.extend([image, "sh", "-c", "while :; do :; done"]);
    let burner = Container::run(&unique("flotilla-burn"), &burn_args).unwrap();
    let mut idle_args = vec!["--network", net.name.as_str(), "--cpus", "0.5", "-m", "64m"];
    idle_args.extend(labels);
    idle_args.extend([image, "sleep", "600"]);
    let idle = Container::run(&unique("flotilla-idle"), &idle_args).unwrap();
    let load_of = |list: &[flotilla_core::InstanceView], name: &str| {
        list.iter()
            .find(|i| i.meta["container_name"] == name)
            .and_then(|i| i.load)
    };
    eventually(Duration::from_secs(15), "load reports for both", || async {
        let s = client
            .service("load", 0, Duration::ZERO, false)
            .await
            .unwrap();
        load_of(&s.instances, &burner.name).is_some() && load_of(&s.instances, &idle.name).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = client
        .service("load", 0, Duration::ZERO, false)
        .await
        .unwrap();
    let (b, i) = (
        load_of(&s.instances, &burner.name).unwrap(),
        load_of(&s.instances, &idle.name).unwrap(),
    );
    eprintln!("burner {b:?}, idle {i:?}");
    assert!(
        b.cpu > 0.7 && b.cpu < 1.3,
        "a busy loop under a 0.5-CPU quota uses ~100 % of it: {b:?}"
    );
    assert!(i.cpu < 0.2, "{i:?}");
    // The idle shell's memory against its 64 MiB limit; the burner has none, so the
    // host's memory counts and its share is tiny.
    assert!(i.memory > 0.0 && i.memory < 0.5, "{i:?}");
    assert!(b.memory < 0.01, "{b:?}");
    assert!(b.age_ms < 5_000);
    // Read from the containers' cgroup files, not through the engine's stats API.
    let api = client.nodes().await.unwrap()[0].api.clone().unwrap();
    let text = server.get_text(&format!("{api}/metrics")).await;
    let cgroup = flotilla_testkit::metric_value(&text, "flotilla_agent_load_samples_cgroup_total");
    let engine = flotilla_testkit::metric_value(&text, "flotilla_agent_load_samples_engine_total");
    assert!(cgroup.is_some_and(|n| n >= 4.0), "{cgroup:?}");
    assert_eq!(engine, Some(0.0));
}
