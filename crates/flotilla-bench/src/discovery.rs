//! `flotilla-bench discovery`: how fast the cluster notices joins, deaths and lost hosts,
//! with default settings, on the real Docker engine.
//!
//! - join: `docker run` of a labelled container (HTTP check) → passing at a watcher
//!   blocked on the service;
//! - leave: `docker kill` → out of the passing set at that watcher;
//! - host loss: the agent SIGKILLed → its instances out of the passing set.

use std::time::{Duration, Instant};

use flotilla_client::Client;
use flotilla_testkit::{busybox_image, docker, unique, Container, DockerNetwork};
use serde::Serialize;

use crate::procs::ServerProc;

/// Flags of the discovery benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Join/leave rounds.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Host-loss rounds (each restarts the agent).
    #[arg(long, default_value_t = 3)]
    host_runs: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct Summary {
    what: String,
    runs: usize,
    median_ms: f64,
    p90_ms: f64,
    max_ms: f64,
}

fn summary(what: &str, mut xs: Vec<f64>) -> Summary {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| xs[((xs.len() as f64 - 1.0) * p).round() as usize];
    Summary {
        what: what.to_owned(),
        runs: xs.len(),
        median_ms: at(0.5),
        p90_ms: at(0.9),
        max_ms: *xs.last().unwrap(),
    }
}

/// Blocks on the service until `pred(passing count)` holds; returns when it did.
async fn wait_until(
    client: &Client,
    service: &str,
    pred: impl Fn(usize) -> bool,
) -> anyhow::Result<Instant> {
    let mut index = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let s = client
            .service(service, index, Duration::from_secs(5), true)
            .await?;
        if pred(s.instances.len()) {
            return Ok(Instant::now());
        }
        index = s.index;
    }
    anyhow::bail!("{service}: condition not reached in 20 s")
}

/// Runs the benchmark and prints a Markdown table.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let server = ServerProc::start().await?;
    let client = server.client.clone();
    let mut agent = Some(server.agent("bench-host")?);
    let image = busybox_image()?;
    let net = DockerNetwork::create("flotilla-bench")?;

    let (mut joins, mut leaves, mut hosts) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.runs {
        let service = format!("bench-{i}");
        let name = unique("flotilla-bench");
        let watcher = {
            let (client, service) = (client.clone(), service.clone());
            tokio::spawn(async move { wait_until(&client, &service, |n| n == 1).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let service_label = format!("flotilla.service={service}");
        let c = Container::run(
            &name,
            &[
                "--network",
                &net.name,
                "-l",
                &service_label,
                "-l",
                "flotilla.port=80",
                "-l",
                "flotilla.check.http=/health",
                image,
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                "/www",
            ],
        )?;
        let seen = watcher.await??;
        joins.push((seen - t).as_secs_f64() * 1000.0);
        let watcher = {
            let (client, service) = (client.clone(), service.clone());
            tokio::spawn(async move { wait_until(&client, &service, |n| n == 0).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        docker(&["kill", &c.name])?;
        let seen = watcher.await??;
        leaves.push((seen - t).as_secs_f64() * 1000.0);
        drop(c);
    }
    for i in 0..args.host_runs {
        let service = format!("bench-host-{i}");
        let service_label = format!("flotilla.service={service}");
        let c = Container::run(
            &unique("flotilla-bench"),
            &[
                "--network",
                &net.name,
                "-l",
                &service_label,
                "-l",
                "flotilla.port=80",
                image,
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                "/www",
            ],
        )?;
        wait_until(&client, &service, |n| n == 1).await?;
        // Kill at a random point of the renewal cycle.
        tokio::time::sleep(Duration::from_millis(137 * (i as u64 + 1) % 1000)).await;
        let watcher = {
            let (client, service) = (client.clone(), service.clone());
            tokio::spawn(async move { wait_until(&client, &service, |n| n == 0).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        drop(agent.take());
        let seen = watcher.await??;
        hosts.push((seen - t).as_secs_f64() * 1000.0);
        drop(c);
        agent = Some(server.agent("bench-host")?);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rows = vec![
        summary("join: docker run → passing at a blocking watcher", joins),
        summary("leave: docker kill → out of the passing set", leaves),
        summary(
            "host loss: agent SIGKILL → instances out (lease TTL 3 s)",
            hosts,
        ),
    ];
    println!("\n| event | runs | median ms | p90 ms | max ms |\n|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} |",
            r.what, r.runs, r.median_ms, r.p90_ms, r.max_ms
        );
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}
