//! `flotilla-bench registry`: N instances, W blocking watchers, R changes/s for D.
//!
//! Each change re-registers one instance with its send time (µs since the run began)
//! in its metadata; each watcher follows one service with blocking queries and, for
//! every instance whose stamp moved, records now − stamp. The send time is the
//! *scheduled* time of the change (open loop), so a slow server cannot hide its delay.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_client::Client;
use flotilla_core::InstanceSpec;
use serde::Serialize;

/// Flags of the registry benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Registered instances.
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// Services they are spread over (one blocking watcher per service, up to --watchers).
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Changes per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Length of the measured phase.
    #[arg(long, default_value = "30s")]
    duration: humantime::Duration,
    /// Stores to run: embedded, etcd, or both.
    #[arg(long, default_value = "both")]
    store: String,
    /// Shorter run (5 s, 2,000 instances) for a quick look.
    #[arg(long)]
    quick: bool,
    /// Directory for etcd's data (default: a temp dir on the system disk). Pointing it at
    /// a tmpfs such as /dev/shm shows how much of etcd's latency is its fsync.
    #[arg(long)]
    etcd_dir: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Outcome {
    store: String,
    instances: usize,
    watchers: usize,
    rate: u64,
    seconds: f64,
    changes_sent: u64,
    changes_failed: u64,
    observed: usize,
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    latency_ms_p999: f64,
    latency_ms_max: f64,
    write_ms_p99: f64,
    server_peak_rss_mb: f64,
    setup_seconds: f64,
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_owned())
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

use crate::stats::percentile;

fn spec(service: usize, n: usize, stamp_us: u64) -> InstanceSpec {
    InstanceSpec {
        service: format!("svc-{service}"),
        node: None,
        address: std::net::IpAddr::from([198, 18, (n / 250) as u8, (n % 250 + 1) as u8]),
        port: 8000 + (n % 1000) as u16,
        weight: 100,
        meta: [("t".to_string(), stamp_us.to_string())].into(),
        checks: vec![],
    }
}

async fn one_run(args: &Args, store_name: &str, store_url: &str) -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let port = flotilla_testkit::free_port();
    let token_file = dir.path().join("token");
    let child = Command::new(crate::procs::flotilla_binary()?)
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dns-listen",
            "",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--token-file")
        .arg(&token_file)
        .args(["--store", store_url])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let server = crate::procs::Proc {
        child,
        name: "flotilla server".into(),
    };
    flotilla_testkit::wait_for_port(
        format!("127.0.0.1:{port}").parse()?,
        Duration::from_secs(20),
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let token = flotilla_client::read_token(&token_file)?;
    let client = Client::new(&format!("http://127.0.0.1:{port}"), Some(token));

    let (instances, services) = (args.instances, args.watchers.max(1));
    let setup = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for n in 0..instances {
        let (client, sem) = (client.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await;
            client
                .register(&format!("i{n}"), &spec(n % services, n, 0))
                .await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let setup_seconds = setup.elapsed().as_secs_f64();
    eprintln!("[{store_name}] registered {instances} instances in {setup_seconds:.1}s");

    let start = Instant::now();
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut watchers = Vec::new();
    for s in 0..services {
        let (client, latencies, stop) = (client.clone(), latencies.clone(), stop.clone());
        watchers.push(tokio::spawn(async move {
            let name = format!("svc-{s}");
            let first = client
                .service(&name, 0, Duration::ZERO, false)
                .await
                .expect("initial read");
            let mut seen: std::collections::HashMap<String, u64> = first
                .instances
                .iter()
                .map(|i| (i.id.clone(), i.meta["t"].parse().unwrap_or(0)))
                .collect();
            let mut index = first.index;
            while !stop.load(Ordering::Relaxed) {
                let Ok(r) = client
                    .service(&name, index, Duration::from_secs(2), false)
                    .await
                else {
                    continue;
                };
                let now_us = start.elapsed().as_micros() as u64;
                index = r.index;
                let mut got = Vec::new();
                for i in &r.instances {
                    let t: u64 = i.meta["t"].parse().unwrap_or(0);
                    if seen.get(&i.id) != Some(&t) {
                        seen.insert(i.id.clone(), t);
                        got.push((now_us.saturating_sub(t)) as f64 / 1000.0);
                    }
                }
                latencies.lock().unwrap().extend(got);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Open-loop change generator.
    let duration: Duration = args.duration.into();
    let total = args.rate * duration.as_secs();
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(Mutex::new(Vec::<f64>::new()));
    let gen_start = Instant::now();
    let inflight = Arc::new(tokio::sync::Semaphore::new(512));
    let mut jobs = Vec::with_capacity(total as usize);
    for k in 0..total {
        let due = gen_start + Duration::from_nanos(k * 1_000_000_000 / args.rate);
        tokio::time::sleep_until(due.into()).await;
        let stamp = due.duration_since(start).as_micros() as u64;
        let n = (k as usize * 7919) % instances;
        let (client, sent, failed, writes, inflight) = (
            client.clone(),
            sent.clone(),
            failed.clone(),
            writes.clone(),
            inflight.clone(),
        );
        jobs.push(tokio::spawn(async move {
            let _p = inflight.acquire().await;
            let t = Instant::now();
            match client
                .register(&format!("i{n}"), &spec(n % services, n, stamp))
                .await
            {
                Ok(_) => {
                    sent.fetch_add(1, Ordering::Relaxed);
                    writes
                        .lock()
                        .unwrap()
                        .push(t.elapsed().as_secs_f64() * 1000.0);
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for j in jobs {
        let _ = j.await;
    }
    let seconds = gen_start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in watchers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }
    let rss = peak_rss_mb(server.child.id());
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut w = writes.lock().unwrap().clone();
    w.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(Outcome {
        store: store_name.to_owned(),
        instances,
        watchers: services,
        rate: args.rate,
        seconds,
        changes_sent: sent.load(Ordering::Relaxed),
        changes_failed: failed.load(Ordering::Relaxed),
        observed: lat.len(),
        latency_ms_p50: percentile(&lat, 0.5),
        latency_ms_p99: percentile(&lat, 0.99),
        latency_ms_p999: percentile(&lat, 0.999),
        latency_ms_max: lat.last().copied().unwrap_or(f64::NAN),
        write_ms_p99: percentile(&w, 0.99),
        server_peak_rss_mb: rss,
        setup_seconds,
    })
}

/// Runs the benchmark on the chosen stores and prints a Markdown table.
pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.quick {
        args.instances = args.instances.min(2_000);
        args.duration = Duration::from_secs(5).into();
    }
    let mut outcomes = Vec::new();
    if matches!(args.store.as_str(), "embedded" | "both") {
        outcomes.push(one_run(&args, "embedded (redb)", "embedded").await?);
    }
    if matches!(args.store.as_str(), "etcd" | "both") {
        let dir = args.etcd_dir.clone();
        let etcd = tokio::task::spawn_blocking(move || {
            flotilla_testkit::EtcdCluster::start_in(3, dir.as_deref())
        })
        .await??;
        let label = match &args.etcd_dir {
            Some(d) => format!("etcd (3 members, data in {})", d.display()),
            None => "etcd (3 members)".to_owned(),
        };
        outcomes.push(one_run(&args, &label, &etcd.store_url()).await?);
    }
    println!(
        "\n| store | instances | watchers | rate/s | sent | failed | observed | p50 ms | p99 ms | p99.9 ms | max ms | write p99 ms | server peak RSS MB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for o in &outcomes {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} |",
            o.store,
            o.instances,
            o.watchers,
            o.rate,
            o.changes_sent,
            o.changes_failed,
            o.observed,
            o.latency_ms_p50,
            o.latency_ms_p99,
            o.latency_ms_p999,
            o.latency_ms_max,
            o.write_ms_p99,
            o.server_peak_rss_mb
        );
    }
    println!(
        "\nmachine: {} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel()
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&outcomes)?)?;
    }
    Ok(())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/version")
        .map(|v| v.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
