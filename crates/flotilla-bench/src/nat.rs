//! What the NAT costs: requests/s through a flotilla lb on host a (64 connections, wrk
//! from a client namespace) to one test-service container on host b reached three ways
//! — its published port (the engine's DNAT on b), its container address on the routed
//! cluster network (a route via b, no NAT) — and, as the floor, a container on host a
//! itself by its container address (no NAT, no second host). Hosts are network
//! namespaces with their own engines on one LAN (flotilla-testkit's `Hosts`); the
//! routed network is set up by real agents with `--cluster-cidr`.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use flotilla_testkit::hosts::Hosts;

use crate::procs::{flotilla_binary, machine, Proc};
use crate::stats::median;

/// Arguments of `flotilla-bench nat`.
#[derive(Debug, Parser)]
pub struct Args {
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Length of each wrk run.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Runs per mode (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const CIDR: &str = "198.18.224.0/20";

/// Runs the bench.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let image = crate::procs::testsvc_image().await?;
    let hosts = Hosts::create(&["a", "b", "c"], &["client"], 70)?;
    for h in ["a", "b"] {
        hosts.load_image(h, &image)?;
    }
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    let server_addr = format!("{}:7700", hosts.addr("c"));
    let bin = flotilla_binary()?;
    let spawn = |node: &str, args: &[&str]| -> anyhow::Result<Proc> {
        let mut cmd = hosts.command(node, &bin);
        cmd.args(args).env("RUST_LOG", "warn");
        crate::procs::spawn(&format!("flotilla on {node}"), &mut cmd)
    };
    let data = dir.path().join("server");
    let _server = spawn(
        "c",
        &[
            "server",
            "--listen",
            &server_addr,
            "--insecure-http",
            "--dns-listen",
            "",
            "--data-dir",
            path(&data)?,
            "--token-file",
            path(&token)?,
        ],
    )?;
    wait_file(&token).await?;
    let url = format!("http://{server_addr}");
    let mut agents = Vec::new();
    for h in ["a", "b"] {
        let data = dir.path().join(format!("agent-{h}"));
        agents.push(spawn(
            h,
            &[
                "agent",
                "--server",
                &url,
                "--token-file",
                path(&token)?,
                "--node",
                h,
                "--docker",
                hosts.engine(h),
                "--api-listen",
                "",
                "--data-dir",
                path(&data)?,
                "--cluster-cidr",
                CIDR,
            ],
        )?);
    }
    // The routed bridge exists on both hosts once their agents set it up.
    for h in ["a", "b"] {
        let mut tries = 0;
        while hosts
            .docker(h, &["network", "inspect", "flotilla-routed"])
            .is_err()
        {
            tries += 1;
            anyhow::ensure!(tries < 300, "agent on {h} made no routed network");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let backend = |h: &str| -> anyhow::Result<(String, String)> {
        let id = hosts.docker(
            h,
            &[
                "run",
                "-d",
                "--network",
                "flotilla-routed",
                "-p",
                "8080",
                &image,
                "--listen",
                "0.0.0.0:8080",
                "--name",
                h,
            ],
        )?;
        let id = id.trim().to_owned();
        let ip = hosts.docker(
            h,
            &[
                "inspect",
                "-f",
                "{{(index .NetworkSettings.Networks \"flotilla-routed\").IPAddress}}",
                &id,
            ],
        )?;
        let port = hosts.docker(h, &["port", &id, "8080/tcp"])?;
        let port = port
            .lines()
            .next()
            .and_then(|l| l.rsplit(':').next())
            .context("published port")?
            .trim()
            .to_owned();
        Ok((ip.trim().to_owned(), port))
    };
    let (ip_b, port_b) = backend("b")?;
    let (ip_a, _) = backend("a")?;
    let modes = [
        (
            "published port on b (DNAT)",
            format!("{}:{port_b}", hosts.addr("b")),
        ),
        (
            "routed container address on b (no NAT)",
            format!("{ip_b}:8080"),
        ),
        ("container address on a (same host)", format!("{ip_a}:8080")),
    ];
    let lb_addr = format!("{}:8080", hosts.addr("a"));
    let mut rows = Vec::new();
    for (mode, target) in &modes {
        let conf = dir.path().join("lb.toml");
        std::fs::write(
            &conf,
            format!(
                "[admin]\nlisten = \"\"\n[[listener]]\nname = \"nat\"\nbind = \"{lb_addr}\"\n\
                 scheduler = \"round-robin\"\nbackends = [\"{target}\"]\n"
            ),
        )?;
        let _lb = spawn("a", &["lb", "--config", path(&conf)?])?;
        wait_answer(&hosts, &lb_addr).await?;
        let mut rates = Vec::new();
        for _ in 0..args.runs {
            rates.push(wrk(&hosts, &lb_addr, &args)?);
        }
        let rate = median(rates.clone());
        eprintln!("{mode}: {rates:?} -> median {rate:.0} req/s");
        rows.push((mode.to_string(), rate, rates));
    }
    let floor = rows[2].1;
    println!(
        "## What the NAT costs: lb on host a, 64 connections ({})",
        machine()
    );
    println!();
    println!(
        "| backend reached by | req/s (median of {}) | vs same-host container |",
        args.runs
    );
    println!("|---|---|---|");
    for (mode, rate, _) in &rows {
        println!("| {mode} | {rate:.0} | {:.2} |", rate / floor);
    }
    if let Some(p) = &args.json {
        let json: Vec<_> = rows
            .iter()
            .map(|(m, r, all)| serde_json::json!({ "mode": m, "median_rps": r, "runs": all }))
            .collect();
        std::fs::write(
            p,
            serde_json::to_string_pretty(
                &serde_json::json!({ "machine": machine(), "rows": json }),
            )?,
        )?;
    }
    drop(agents);
    Ok(())
}

fn path(p: &std::path::Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

async fn wait_file(p: &std::path::Path) -> anyhow::Result<()> {
    for _ in 0..200 {
        if p.exists() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{} never appeared", p.display())
}

/// Waits until `addr` answers an HTTP GET from the client namespace.
async fn wait_answer(hosts: &Hosts, addr: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        let ok = hosts
            .command("client", "wget")
            .args(["-q", "-O", "/dev/null", &format!("http://{addr}/")])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the lb at {addr} never answered")
}

/// One wrk run from the client namespace; requests per second.
fn wrk(hosts: &Hosts, addr: &str, args: &Args) -> anyhow::Result<f64> {
    let out = hosts
        .command("client", "wrk")
        .args([
            "-t2",
            &format!("-c{}", args.connections),
            &format!("-d{}", args.duration),
            &format!("http://{addr}/"),
        ])
        .output()
        .context("running wrk (install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no rate in wrk's output: {text}"))
}
