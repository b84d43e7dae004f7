//! `flotilla-bench soak`: the whole cluster under steady load while a seeded random
//! schedule breaks it, for a bounded time.
//!
//! One Docker network is the LAN: service containers (the test service, labelled so
//! they register themselves) and three network namespaces plugged into its bridge —
//! two `flotilla lb` with `[ha]` following the registry, and a client sending open-loop
//! requests to the VIP. The registry server (embedded store) and the agent run on the
//! host, the server listening on the bridge's address. Faults, one at a time, each
//! undone before the next: SIGKILL or SIGTERM of the master lb, `docker kill` of a
//! service container, SIGKILL of the agent, a partition of the lb pair (VRRP dropped at
//! both). The report: availability, every gap with the fault before it, stale
//! registrations at the end, and split-brain time after each partition heals.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flotilla_testkit::netns::Lan;
use flotilla_testkit::{docker, unique, Container, DockerNetwork};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::failover::{client_load, sample_vip, NODES};
use crate::procs::{flotilla_binary, spawn, Proc, ServerProc};

/// Flags of the soak run.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to run (bounded: at most 1 h).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// A 60 s run.
    #[arg(long)]
    quick: bool,
    /// Seed of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Client requests per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Mean seconds between faults.
    #[arg(long, default_value_t = 15.0)]
    fault_every: f64,
    /// Service containers.
    #[arg(long, default_value_t = 3)]
    containers: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
enum FaultKind {
    KillMasterLb,
    StopMasterLb,
    KillContainer,
    KillAgent,
    PartitionPair,
}

#[derive(Debug, Clone, Serialize)]
struct FaultLog {
    at_s: f64,
    kind: FaultKind,
    detail: String,
}

#[derive(Debug, Clone, Serialize)]
struct Gap {
    from_s: f64,
    to_s: f64,
    failed: usize,
    cause: String,
}

/// Runs the soak.
pub async fn run(args: Args) -> Result<()> {
    let duration = if args.quick {
        Duration::from_secs(60)
    } else {
        args.duration.min(Duration::from_secs(3600))
    };
    let image = crate::procs::testsvc_image().await?;
    let net = DockerNetwork::create("flotilla-soak")?;
    let gateway = format!("198.18.{}.1", net.subnet);
    let server = ServerProc::start_on(&gateway).await?;
    let mut agent = Some(server.agent("soak")?);
    let service = "web";
    let mut containers = Vec::new();
    for i in 0..args.containers {
        containers.push(start_container(&net, &image, service, i)?);
    }
    let lan = Lan::attach(&net.bridge(), &["lb1", "lb2", "client"], net.subnet, 201)?;
    let vip = lan.spare(200);
    let dir = tempfile::tempdir()?;
    let mut lbs: [Option<Proc>; 2] = [
        Some(start_lb(&lan, 0, &server, service, vip, dir.path())?),
        Some(start_lb(&lan, 1, &server, service, vip, dir.path())?),
    ];
    // Everything registered and a master serving before the clock starts.
    wait_serving(&lan, vip, Duration::from_secs(30)).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_vip(&lan, vip, stop.clone());
    let load = client_load(&lan, vip, args.rate, duration);
    let start = Instant::now();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(args.seed);
    let mut faults: Vec<FaultLog> = Vec::new();
    let mut heals: Vec<f64> = Vec::new();
    loop {
        let wait = Duration::from_secs_f64(rng.gen_range(0.5..1.5) * args.fault_every);
        if start.elapsed() + wait + Duration::from_secs(8) > duration {
            break;
        }
        tokio::time::sleep(wait).await;
        let kind = match rng.gen_range(0..5) {
            0 => FaultKind::KillMasterLb,
            1 => FaultKind::StopMasterLb,
            2 => FaultKind::KillContainer,
            3 => FaultKind::KillAgent,
            _ => FaultKind::PartitionPair,
        };
        let at_s = start.elapsed().as_secs_f64();
        let master = (0..2).find(|&i| lan.has_addr(NODES[i], vip).unwrap_or(false));
        let detail = match kind {
            FaultKind::KillMasterLb | FaultKind::StopMasterLb => {
                let i = master.unwrap_or(0);
                if let Some(mut p) = lbs[i].take() {
                    if kind == FaultKind::StopMasterLb {
                        flotilla_testkit::signal(p.child.id(), libc::SIGTERM);
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_secs(5)
                            && !matches!(p.child.try_wait(), Ok(Some(_)))
                        {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    drop(p);
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                lbs[i] = Some(start_lb(&lan, i, &server, service, vip, dir.path())?);
                format!("{} restarted after 2 s", NODES[i])
            }
            FaultKind::KillContainer => {
                let i = rng.gen_range(0..containers.len());
                let name = containers[i].name.clone();
                docker(&["kill", &name])?;
                tokio::time::sleep(Duration::from_secs(3)).await;
                docker(&["start", &name])?;
                format!("{name} started again after 3 s")
            }
            FaultKind::KillAgent => {
                agent.take();
                tokio::time::sleep(Duration::from_secs(2)).await;
                agent = Some(server.agent("soak")?);
                "agent restarted after 2 s".into()
            }
            FaultKind::PartitionPair => {
                for n in NODES {
                    lan.block(n, 112)?;
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
                for n in NODES {
                    lan.unblock(n, 112)?;
                }
                heals.push(start.elapsed().as_secs_f64());
                "VRRP between the lbs dropped for 3 s".into()
            }
        };
        eprintln!("{at_s:7.1} s  {kind:?}: {detail}");
        faults.push(FaultLog { at_s, kind, detail });
    }
    let results = tokio::task::spawn_blocking(move || load.join())
        .await?
        .map_err(|_| anyhow::anyhow!("client thread"))?;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().map_err(|_| anyhow::anyhow!("sampler"))?;

    // Stale registrations: after the leases and checks have had time to settle, every
    // registered instance must be a running container, and every running one listed.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let registered = server.client.instances().await?;
    let running = docker(&[
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=flotilla.service={service}"),
    ])?;
    let running: Vec<&str> = running.lines().collect();
    let stale: Vec<String> = registered
        .iter()
        .filter(|i| {
            i.meta
                .get("container_id")
                .is_none_or(|c| !running.contains(&c.as_str()))
        })
        .map(|i| i.id.clone())
        .collect();
    let missing = running
        .iter()
        .filter(|c| {
            !registered
                .iter()
                .any(|i| i.meta.get("container_id").map(String::as_str) == Some(**c))
        })
        .count();

    // Gaps: runs of failed requests, blamed on the last fault before them.
    let mut sorted = results.clone();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut gaps: Vec<Gap> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        if sorted[i].1 {
            i += 1;
            continue;
        }
        let from = sorted[i].0;
        let mut j = i;
        while j < sorted.len() && !sorted[j].1 {
            j += 1;
        }
        let to = sorted[j.min(sorted.len() - 1)].0;
        let cause = faults
            .iter()
            .rev()
            .find(|f| f.at_s <= from + 0.05)
            .map(|f| format!("{:?} at {:.1} s", f.kind, f.at_s))
            .unwrap_or_else(|| "no fault before it".into());
        gaps.push(Gap {
            from_s: from,
            to_s: to,
            failed: j - i,
            cause,
        });
        i = j;
    }
    let sent = results.len();
    let ok = results.iter().filter(|(_, ok)| *ok).count();
    // Split brain after heal: both hold the VIP later than 1 s after a heal, up to
    // the next fault (which may be another partition) or 10 s.
    let split_after_heal: f64 = heals
        .iter()
        .map(|h| {
            let until = faults
                .iter()
                .map(|f| f.at_s)
                .find(|t| t > h)
                .unwrap_or(f64::INFINITY)
                .min(h + 10.0);
            samples
                .iter()
                .filter(|(t, a, b)| *t > h + 1.0 && *t < until && *a && *b)
                .count() as f64
                * 0.010
        })
        .sum();

    println!(
        "\n### Soak: {} s, seed {}, {} req/s, {} faults\n",
        duration.as_secs(),
        args.seed,
        args.rate,
        faults.len()
    );
    println!(
        "| availability | failed / sent | stale registrations | running but unlisted | split brain > 1 s after heal |\n|---|---|---|---|---|"
    );
    println!(
        "| {:.3} % | {} / {sent} | {} | {missing} | {:.2} s |",
        ok as f64 * 100.0 / sent.max(1) as f64,
        sent - ok,
        stale.len(),
        split_after_heal
    );
    println!("\n| fault at s | fault | detail |\n|---|---|---|");
    for f in &faults {
        println!("| {:.1} | {:?} | {} |", f.at_s, f.kind, f.detail);
    }
    println!("\n| gap from s | to s | failed | after |\n|---|---|---|---|");
    for g in &gaps {
        println!(
            "| {:.2} | {:.2} | {} | {} |",
            g.from_s, g.to_s, g.failed, g.cause
        );
    }
    println!("\nmachine: {}", crate::procs::machine());
    if let Some(path) = args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&serde_json::json!({
                "duration_s": duration.as_secs(), "seed": args.seed, "rate": args.rate,
                "sent": sent, "ok": ok, "stale": stale, "missing": missing,
                "split_brain_after_heal_s": split_after_heal,
                "faults": faults, "gaps": gaps,
            }))?,
        )?;
    }
    drop(lbs);
    drop(agent);
    drop(containers);
    drop(lan);
    drop(net);
    Ok(())
}

fn start_container(net: &DockerNetwork, image: &str, service: &str, i: usize) -> Result<Container> {
    let name = unique(&format!("flotilla-soak-{i}"));
    Container::run(
        &name,
        &[
            "--network",
            &net.name,
            "-l",
            &format!("flotilla.service={service}"),
            "-l",
            "flotilla.port=8080",
            "-l",
            "flotilla.check.http=/health",
            "-l",
            "flotilla.check.interval=500ms",
            image,
            "--listen",
            "0.0.0.0:8080",
            "--name",
            &format!("c{i}"),
        ],
    )
}

fn start_lb(
    lan: &Lan,
    i: usize,
    server: &ServerProc,
    service: &str,
    vip: Ipv4Addr,
    dir: &std::path::Path,
) -> Result<Proc> {
    let node = NODES[i];
    let priority = if i == 0 { 150 } else { 100 };
    let cfg = format!(
        "[runtime]\nworker_threads = 1\n[admin]\nlisten = \"\"\n[registry]\nurl = \"{url}\"\ntoken_file = \"{token}\"\n[[listener]]\nname = \"web\"\nbind = \"{vip}:8080\"\nservice = \"{service}\"\n[ha]\ninterface = \"eth0\"\nvirtual_router_id = 52\npriority = {priority}\nvirtual_ips = [\"{vip}/24\"]\n",
        url = server.url,
        token = server.token_file.display(),
    );
    let path = dir.join(format!("{node}.toml"));
    std::fs::write(&path, cfg)?;
    spawn(
        "flotilla lb",
        lan.command(node, &flotilla_binary()?.to_string_lossy())
            .args(["lb", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn"),
    )
}

async fn wait_serving(lan: &Lan, vip: Ipv4Addr, within: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let ok = {
            let h = lan.run_in("client", move || {
                crate::failover::get(std::net::SocketAddr::from((vip, 8080)))
            });
            tokio::task::spawn_blocking(move || h.join().ok().flatten()).await?
        };
        if ok.is_some() {
            return Ok(());
        }
        if t.elapsed() > within {
            return Err(anyhow::anyhow!("the VIP never served")).context("soak set-up");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
