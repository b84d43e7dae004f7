//! What a healthy, idle cluster costs the store: `N` labelled containers with HTTP
//! checks spread over several engines, each with its agent, all passing; then store
//! writes per second (from the server's `/metrics`), how many of them were lease
//! renewals, and the server's and agents' CPU over a quiet window. With checks and
//! load reports that write only on change, the writes are the lease renewals whatever
//! `N` is; `FLOTILLA_BIN` runs the same against another build for a before/after.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use flotilla_testkit::Dockerd;

use crate::procs::{cpu_seconds, machine, Proc, ServerProc};

/// The network every container of the bench is on (one per engine).
const STEADY_NET: &str = "flotilla-steady";

/// Arguments of `flotilla-bench steady`.
#[derive(Debug, Parser)]
pub struct Args {
    /// Engines (hosts), each with its own agent.
    #[arg(long, default_value_t = 3)]
    engines: usize,
    /// Checked containers in all, spread evenly over the engines.
    #[arg(long, default_value_t = 1000)]
    instances: usize,
    /// Check interval of every container.
    #[arg(long, default_value = "1s")]
    interval: String,
    /// The quiet window writes are counted over.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Containers started at once.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// The kernel's ARP table thresholds, raised for the bench and put back when dropped.
///
/// Here every engine shares the machine's one network namespace, so the agents' probes
/// reach all N containers from it: with the default `gc_thresh2` of 512 the table
/// overflowed ("neighbor table overflow!") and exactly 512 containers could be probed,
/// the rest timing out. On real hosts each host's table holds its own containers only.
struct NeighbourRoom {
    saved: Vec<(String, String)>,
}

impl NeighbourRoom {
    const KEYS: [&'static str; 3] = ["gc_thresh1", "gc_thresh2", "gc_thresh3"];

    fn ensure(entries: usize) -> anyhow::Result<Self> {
        let path = |k: &str| format!("/proc/sys/net/ipv4/neigh/default/{k}");
        let mut saved = Vec::new();
        let want = [entries * 2, entries * 4, entries * 8];
        for (k, w) in Self::KEYS.iter().zip(want) {
            let now = std::fs::read_to_string(path(k))?.trim().to_owned();
            if now.parse::<usize>().unwrap_or(0) < w {
                std::fs::write(path(k), w.to_string())
                    .with_context(|| format!("raising net.ipv4.neigh.default.{k}"))?;
                eprintln!("net.ipv4.neigh.default.{k}: {now} -> {w} for this run");
                saved.push((path(k), now));
            }
        }
        Ok(NeighbourRoom { saved })
    }
}

impl Drop for NeighbourRoom {
    fn drop(&mut self) {
        for (path, value) in &self.saved {
            let _ = std::fs::write(path, value);
        }
    }
}

/// Runs the bench.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let _room = NeighbourRoom::ensure(args.instances)?;
    let image = flotilla_testkit::busybox_image()?;
    let server = ServerProc::start().await?;
    let mut engines = Vec::new();
    let mut agents: Vec<Proc> = Vec::new();
    for e in 0..args.engines {
        let name = format!("steady-{e}");
        let engine = Dockerd::start(&name)?;
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker save {image} | docker -H {} load -q",
                engine.host
            ))
            .status()?;
        anyhow::ensure!(status.success(), "loading {image} into {name}");
        // A /22 per engine: the default bridge's /24 holds 253 containers at most.
        engine.docker(&[
            "network",
            "create",
            "--subnet",
            &format!("198.19.{}.0/22", 4 * e),
            STEADY_NET,
        ])?;
        agents.push(server.agent_on(&name, &engine.host)?);
        engines.push(engine);
    }
    let started = Instant::now();
    start_containers(&engines, &args, image)?;
    eprintln!(
        "{} containers started on {} engines in {:.0} s",
        args.instances,
        args.engines,
        started.elapsed().as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let passing = server
            .client
            .service("steady", 0, Duration::ZERO, true)
            .await
            .map(|s| s.instances.len())
            .unwrap_or(0);
        if passing == args.instances {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {passing} of {} instances passing after 10 min",
                args.instances
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "all passing {:.0} s after the first start",
        started.elapsed().as_secs_f64()
    );
    // Let first load reports and verdicts settle.
    tokio::time::sleep(Duration::from_secs(10)).await;

    let agent_pids: Vec<u32> = agents.iter().map(|a| a.child.id()).collect();
    let before = sample(&server, &agent_pids).await?;
    tokio::time::sleep(args.window).await;
    let after = sample(&server, &agent_pids).await?;
    let secs = args.window.as_secs_f64();
    let writes = (after.writes - before.writes) / secs;
    let commits = (after.commits - before.commits) / secs;
    let renewals = (after.renewals - before.renewals) as f64 / secs;
    let server_cpu = (after.server_cpu - before.server_cpu) / secs * 100.0;
    let agents_cpu = (after.agents_cpu - before.agents_cpu) / secs * 100.0;
    println!(
        "## Steady state: {} healthy checked instances on {} agents ({})",
        args.instances,
        args.engines,
        machine()
    );
    println!();
    println!("| instances | check interval | store writes/s | of which lease renewals/s | commits/s | server CPU % | agents' CPU % (sum) |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {writes:.2} | {renewals:.2} | {commits:.2} | {server_cpu:.1} | {agents_cpu:.1} |",
        args.instances, args.interval
    );
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "machine": machine(),
            "instances": args.instances,
            "engines": args.engines,
            "interval": args.interval,
            "window_s": secs,
            "store_writes_per_s": writes,
            "lease_renewals_per_s": renewals,
            "commits_per_s": commits,
            "server_cpu_pct": server_cpu,
            "agents_cpu_pct": agents_cpu,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    drop(agents);
    Ok(())
}

/// Starts the labelled containers, `parallel` `docker run`s at a time.
fn start_containers(engines: &[Dockerd], args: &Args, image: &str) -> anyhow::Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let check_interval = format!("flotilla.check.interval={}", args.interval);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..args.parallel.max(1))
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= args.instances {
                            return Ok(());
                        }
                        engines[i % engines.len()]
                            .docker(&[
                                "run",
                                "-d",
                                "--network",
                                STEADY_NET,
                                "-l",
                                "flotilla.service=steady",
                                "-l",
                                "flotilla.port=8080",
                                "-l",
                                "flotilla.address=container",
                                "-l",
                                "flotilla.check.http=/",
                                "-l",
                                &check_interval,
                                image,
                                "httpd",
                                "-f",
                                "-p",
                                "8080",
                                "-h",
                                "/www",
                            ])
                            .with_context(|| format!("container {i}"))?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("starter thread"))
    })
}

struct Sample {
    writes: f64,
    commits: f64,
    renewals: u64,
    server_cpu: f64,
    agents_cpu: f64,
}

async fn sample(server: &ServerProc, agents: &[u32]) -> anyhow::Result<Sample> {
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", server.url))
        .send()
        .await?
        .text()
        .await?;
    let value = |name: &str| flotilla_testkit::metric_value(&text, name).unwrap_or(f64::NAN);
    let renewals = server
        .client
        .nodes()
        .await?
        .iter()
        .map(|n| n.renewals)
        .sum();
    Ok(Sample {
        writes: value("flotilla_registry_store_writes_total"),
        commits: value("flotilla_registry_store_commits_total"),
        renewals,
        server_cpu: cpu_seconds(server.pid()),
        agents_cpu: agents.iter().map(|p| cpu_seconds(*p)).sum(),
    })
}
