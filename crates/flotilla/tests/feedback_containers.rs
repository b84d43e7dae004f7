//! The feedback scheduler against real containers: two copies of the test service, one
//! CPU-throttled by its Docker quota, registered by a real agent; the throttled one gets
//! measurably less traffic under `feedback` than under `round-robin`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{agent, eventually, passing, Server};
use flotilla_testkit::{unique, Container, DockerNetwork};

async fn share_of(lb: &flotilla_lb::RunningLb, dur: Duration) -> f64 {
    let url = format!("http://{}/", lb.addrs[0]);
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut hit, mut total) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(r) = c.get(&url).send().await {
                        let from_throttled = r
                            .headers()
                            .get("x-backend")
                            .is_some_and(|v| v == "throttled");
                        if r.bytes().await.is_ok() {
                            total += 1;
                            hit += from_throttled as u64;
                        }
                    }
                }
                (hit, total)
            })
        })
        .collect();
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let (mut hit, mut total) = (0, 0);
    for t in tasks {
        let (h, n) = t.await.unwrap();
        hit += h;
        total += n;
    }
    hit as f64 / total.max(1) as f64
}

async fn lb(server: &Server, scheduler: &str) -> flotilla_lb::RunningLb {
    let text = format!(
        "[admin]\nlisten = \"\"\n[registry]\nurl = \"{}\"\ntoken_file = \"{}\"\n[[listener]]\nname = \"cpu\"\nbind = \"127.0.0.1:0\"\nscheduler = \"{scheduler}\"\nservice = \"cpu\"\nslow_start = \"0s\"\nfeedback = {{ period = \"300ms\" }}\n",
        server.url,
        server.token_file.display()
    );
    let config: flotilla_lb::config::LbConfig =
        flotilla_core::config::parse_toml(std::path::Path::new("t.toml"), &text).unwrap();
    config.validate().unwrap();
    let lb = flotilla_lb::start(config).await.unwrap();
    let start = Instant::now();
    while lb.listeners[0].backends().len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "lb never saw both backends"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lb
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_throttled_container_gets_less_traffic_under_feedback() {
    let image = common::testsvc_image();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "s", &[]);
    let client = server.client();
    let net = DockerNetwork::create("flotilla-fb").unwrap();
    let _agent = agent(dir.path(), &server, "host-fb", None);
    let run = |name: &str, cpus: &str| {
        Container::run(
            &unique(&format!("flotilla-{name}")),
            &[
                "--network",
                &net.name,
                "--cpus",
                cpus,
                "-l",
                "flotilla.service=cpu",
                "-l",
                "flotilla.port=8080",
                "-l",
                "flotilla.check.http=/health",
                &image,
                "--listen",
                "0.0.0.0:8080",
                "--name",
                name,
                "--cpu-us",
                "3000",
            ],
        )
        .unwrap()
    };
    let _full = run("full", "1.0");
    let _throttled = run("throttled", "0.15");
    eventually(Duration::from_secs(15), "both passing", || async {
        passing(&client, "cpu").await.len() == 2
    })
    .await;

    let rr = lb(&server, "round-robin").await;
    let rr_share = share_of(&rr, Duration::from_secs(3)).await;
    drop(rr);
    let fb = lb(&server, "feedback").await;
    let _warmup = share_of(&fb, Duration::from_secs(2)).await;
    let fb_share = share_of(&fb, Duration::from_secs(3)).await;
    eprintln!("throttled container's share: round-robin {rr_share:.3}, feedback {fb_share:.3}");
    assert!((rr_share - 0.5).abs() < 0.05, "round-robin: {rr_share}");
    assert!(
        fb_share < 0.3,
        "feedback must move traffic off the throttled container: {fb_share}"
    );
}
