//! `flotilla-bench registry`: N instances, W blocking watchers, R changes/s for D.
//!
//! Each change re-registers one instance with its send time (µs since the run began)
//! in its metadata; each watcher follows one service with blocking queries and, for
//! every instance whose stamp moved, records now − stamp. The send time is the
//! *scheduled* time of the change (open loop), so a slow server cannot hide its delay.
//!
//! `--sweep` runs each store at a series of rates on one server (registered once), finds
//! the knee (the highest rate with watcher p99 ≤ 50 ms and every change applied), then
//! runs at twice the knee to show back-pressure: writers get `503` + `Retry-After`, back
//! off and send again; nothing is lost. Writers here pace their own retries (the same
//! back-off as the client's) so that accepted and refused tries are counted apart.

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
    /// Run every rate of --rates on each store, report the knee, then run at 2× the knee.
    #[arg(long)]
    sweep: bool,
    /// Rates of the sweep (changes/s).
    #[arg(long, value_delimiter = ',', default_value = "250,500,1000,2000,5000")]
    rates: Vec<u64>,
    /// Directory for the sweep's plot of p99 against rate (SVG and PNG).
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Watcher p99 (ms) a rate must stay within to count below the knee.
    #[arg(long, default_value_t = 50.0)]
    knee_p99_ms: f64,
    /// Serve the registry over TLS (the default of `flotilla server`); without it the
    /// server runs `--insecure-http`, so one session can compare the two.
    #[arg(long)]
    tls: bool,
    /// How watchers read: `delta` (`?delta=true`: only the instances that changed since
    /// the watcher's index, as the lb reads) or `full` (the whole service every time).
    #[arg(long, default_value = "delta", value_parser = ["delta", "full"])]
    watch: String,
}

#[derive(Debug, Clone, Serialize)]
struct Outcome {
    store: String,
    /// "sweep", "2x knee", or "single".
    phase: String,
    instances: usize,
    watchers: usize,
    /// "delta" or "full" (see `--watch`).
    watch: String,
    rate: u64,
    seconds: f64,
    changes_sent: u64,
    changes_failed: u64,
    /// Busy answers (503 + Retry-After) writers got and retried after a back-off.
    busy_answers: u64,
    /// Server CPU time (user + system) per applied change, ms.
    server_cpu_ms_per_change: f64,
    /// Store commits in the measured phase and writes per commit (from /metrics).
    store_commits: f64,
    writes_per_commit: f64,
    observed: usize,
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    latency_ms_p999: f64,
    latency_ms_max: f64,
    /// p99 of accepted writes: from sending the try that was accepted to its answer.
    write_ms_p99: f64,
    /// p99 from a change's scheduled time to its acceptance, back-offs included.
    write_ms_p99_with_retries: f64,
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

use crate::procs::cpu_seconds;
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
        node_checks: false,
    }
}

/// A registry server under test, with its store and the instances registered.
struct Server {
    proc: crate::procs::Proc,
    client: Client,
    /// A plain client trusting the server's CA, for `/metrics`.
    http: reqwest::Client,
    base: String,
    store: String,
    setup_seconds: f64,
    _dir: tempfile::TempDir,
}

/// A counter or gauge from the server's /metrics (NaN when absent: an older server).
async fn metric(server: &Server, name: &str) -> f64 {
    let base = &server.base;
    let Ok(resp) = server.http.get(format!("{base}/metrics")).send().await else {
        return f64::NAN;
    };
    let text = resp.text().await.unwrap_or_default();
    flotilla_testkit::metric_value(&text, name).unwrap_or(f64::NAN)
}

async fn start_server(args: &Args, store_name: &str, store_url: &str) -> anyhow::Result<Server> {
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
        .args(if args.tls {
            None
        } else {
            Some("--insecure-http")
        })
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let proc = crate::procs::Proc {
        child,
        name: "flotilla server".into(),
    };
    flotilla_testkit::wait_for_port(
        format!("127.0.0.1:{port}").parse()?,
        Duration::from_secs(20),
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let token = flotilla_client::read_token(&token_file)?;
    let (base, tls) = if args.tls {
        let tls = flotilla_client::tls_config(&token_file.with_file_name("ca.pem"))?;
        (format!("https://127.0.0.1:{port}"), Some(tls))
    } else {
        (format!("http://127.0.0.1:{port}"), None)
    };
    let http = flotilla_client::http_builder(tls.clone()).build()?;
    let client = Client::with_tls(&base, Some(token), tls);

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
    Ok(Server {
        proc,
        client: client.without_busy_retries(),
        http,
        base,
        store: store_name.to_owned(),
        setup_seconds,
        _dir: dir,
    })
}

/// What one writer saw for one change.
enum WriteResult {
    /// Accepted: the accepted try's time and the time from the scheduled send, ms.
    Accepted { try_ms: f64, total_ms: f64 },
    /// Not accepted within the tries.
    Failed,
}

/// Sends one change, backing off on busy answers like the client does, up to 20 tries.
async fn write_change(
    client: &Client,
    id: &str,
    spec: &InstanceSpec,
    due: Instant,
    busy: &AtomicU64,
) -> WriteResult {
    for attempt in 1..=20 {
        let t = Instant::now();
        match client.register(id, spec).await {
            Ok(_) => {
                return WriteResult::Accepted {
                    try_ms: t.elapsed().as_secs_f64() * 1000.0,
                    total_ms: due.elapsed().as_secs_f64() * 1000.0,
                }
            }
            Err(e) if e.status() == Some(503) => {
                busy.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(flotilla_client::busy_backoff(
                    attempt,
                    Duration::from_secs(1),
                ))
                .await;
            }
            Err(_) => return WriteResult::Failed,
        }
    }
    WriteResult::Failed
}

async fn measure(args: &Args, server: &Server, rate: u64, phase: &str) -> anyhow::Result<Outcome> {
    let (client, instances, services) = (&server.client, args.instances, args.watchers.max(1));
    let start = Instant::now();
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut watchers = Vec::new();
    let delta = args.watch == "delta";
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
                let wait = Duration::from_secs(2);
                // A delta answer holds only changed instances; the stamp test below
                // picks the changed ones out of a whole answer, so it serves both.
                let read = if delta {
                    client.service_changes(&name, index, wait, false).await
                } else {
                    client.service(&name, index, wait, false).await
                };
                let Ok(r) = read else {
                    continue;
                };
                let now_us = start.elapsed().as_micros() as u64;
                index = r.index;
                let mut got = Vec::new();
                for i in &r.instances {
                    let t: u64 = i.meta["t"].parse().unwrap_or(0);
                    if t > 0 && seen.get(&i.id) != Some(&t) {
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
    let total = rate * duration.as_secs();
    let busy = Arc::new(AtomicU64::new(0));
    let results = Arc::new(Mutex::new(Vec::<WriteResult>::new()));
    let pid = server.proc.child.id();
    let cpu_before = cpu_seconds(pid);
    let commits_before = metric(server, "flotilla_registry_store_commits_total").await;
    let writes_before = metric(server, "flotilla_registry_store_writes_total").await;
    let gen_start = Instant::now();
    let inflight = Arc::new(tokio::sync::Semaphore::new(512));
    let mut jobs = Vec::with_capacity(total as usize);
    for k in 0..total {
        let due = gen_start + Duration::from_nanos(k * 1_000_000_000 / rate);
        tokio::time::sleep_until(due.into()).await;
        let stamp = due.duration_since(start).as_micros() as u64;
        let n = (k as usize * 7919) % instances;
        let (client, busy, results, inflight) = (
            client.clone(),
            busy.clone(),
            results.clone(),
            inflight.clone(),
        );
        jobs.push(tokio::spawn(async move {
            let _p = inflight.acquire().await;
            let spec = spec(n % services, n, stamp);
            let r = write_change(&client, &format!("i{n}"), &spec, due, &busy).await;
            results.lock().unwrap().push(r);
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
    let cpu = cpu_seconds(pid) - cpu_before;
    let commits = metric(server, "flotilla_registry_store_commits_total").await - commits_before;
    let writes = metric(server, "flotilla_registry_store_writes_total").await - writes_before;
    let rss = peak_rss_mb(pid);
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(|a, b| a.total_cmp(b));
    let (mut tries, mut totals, mut failed) = (Vec::new(), Vec::new(), 0u64);
    for r in results.lock().unwrap().iter() {
        match r {
            WriteResult::Accepted { try_ms, total_ms } => {
                tries.push(*try_ms);
                totals.push(*total_ms);
            }
            WriteResult::Failed => failed += 1,
        }
    }
    tries.sort_by(|a, b| a.total_cmp(b));
    totals.sort_by(|a, b| a.total_cmp(b));
    let sent = tries.len() as u64;
    Ok(Outcome {
        store: server.store.clone(),
        phase: phase.to_owned(),
        instances,
        watchers: services,
        watch: args.watch.clone(),
        rate,
        seconds,
        changes_sent: sent,
        changes_failed: failed,
        busy_answers: busy.load(Ordering::Relaxed),
        server_cpu_ms_per_change: cpu * 1000.0 / sent.max(1) as f64,
        store_commits: commits,
        writes_per_commit: writes / commits,
        observed: lat.len(),
        latency_ms_p50: percentile(&lat, 0.5),
        latency_ms_p99: percentile(&lat, 0.99),
        latency_ms_p999: percentile(&lat, 0.999),
        latency_ms_max: lat.last().copied().unwrap_or(f64::NAN),
        write_ms_p99: percentile(&tries, 0.99),
        write_ms_p99_with_retries: percentile(&totals, 0.99),
        server_peak_rss_mb: rss,
        setup_seconds: server.setup_seconds,
    })
}

/// Every rate of the sweep (or the one rate) on one server; with `--sweep`, then 2× the
/// knee.
async fn run_store(args: &Args, store_name: &str, store_url: &str) -> anyhow::Result<Vec<Outcome>> {
    let server = start_server(args, store_name, store_url).await?;
    if !args.sweep {
        return Ok(vec![measure(args, &server, args.rate, "single").await?]);
    }
    let mut outcomes = Vec::new();
    for &rate in &args.rates {
        let o = measure(args, &server, rate, "sweep").await?;
        eprintln!(
            "[{store_name}] {rate}/s: p99 {:.1} ms, write p99 {:.1} ms, {} busy, {:.3} ms CPU/change",
            o.latency_ms_p99, o.write_ms_p99, o.busy_answers, o.server_cpu_ms_per_change
        );
        outcomes.push(o);
    }
    if let Some(knee) = knee(&outcomes, args.knee_p99_ms) {
        let o = measure(args, &server, knee * 2, "2x knee").await?;
        eprintln!(
            "[{store_name}] 2x knee {}/s: p99 {:.1} ms, accepted-write p99 {:.1} ms, {} busy, {} failed",
            knee * 2,
            o.latency_ms_p99,
            o.write_ms_p99,
            o.busy_answers,
            o.changes_failed
        );
        outcomes.push(o);
    }
    Ok(outcomes)
}

/// The highest swept rate whose watcher p99 stayed within `p99_ms` with every change
/// applied.
fn knee(outcomes: &[Outcome], p99_ms: f64) -> Option<u64> {
    outcomes
        .iter()
        .filter(|o| o.phase == "sweep" && o.changes_failed == 0 && o.latency_ms_p99 <= p99_ms)
        .map(|o| o.rate)
        .max()
}

/// Runs the benchmark on the chosen stores and prints a Markdown table.
pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.quick {
        args.instances = args.instances.min(2_000);
        args.duration = Duration::from_secs(5).into();
    }
    let mut outcomes = Vec::new();
    if matches!(args.store.as_str(), "embedded" | "both") {
        outcomes.extend(run_store(&args, "embedded (redb)", "embedded").await?);
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
        outcomes.extend(run_store(&args, &label, &etcd.store_url()).await?);
    }
    println!(
        "\n| store | phase | rate/s | sent | failed | busy 503s | observed | p50 ms | p99 ms | p99.9 ms | max ms | write p99 ms | write p99 ms incl. back-off | CPU ms/change | writes/commit | server peak RSS MB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for o in &outcomes {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.1} | {:.1} |",
            o.store,
            o.phase,
            o.rate,
            o.changes_sent,
            o.changes_failed,
            o.busy_answers,
            o.observed,
            o.latency_ms_p50,
            o.latency_ms_p99,
            o.latency_ms_p999,
            o.latency_ms_max,
            o.write_ms_p99,
            o.write_ms_p99_with_retries,
            o.server_cpu_ms_per_change,
            o.writes_per_commit,
            o.server_peak_rss_mb
        );
    }
    if args.sweep {
        println!();
        let stores: Vec<String> = outcomes
            .iter()
            .map(|o| o.store.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for store in &stores {
            let of: Vec<Outcome> = outcomes
                .iter()
                .filter(|o| &o.store == store)
                .cloned()
                .collect();
            match knee(&of, args.knee_p99_ms) {
                Some(k) => println!(
                    "knee ({store}): {k} changes/s (highest swept rate with p99 <= {} ms)",
                    args.knee_p99_ms
                ),
                None => println!(
                    "knee ({store}): none of the swept rates kept p99 <= {} ms",
                    args.knee_p99_ms
                ),
            }
        }
        println!(
            "({} instances, {} {} watchers, {} s per rate)",
            args.instances,
            args.watchers,
            args.watch,
            Duration::from(args.duration).as_secs()
        );
        if let Some(dir) = &args.plots {
            std::fs::create_dir_all(dir)?;
            plot_sweep(dir, &outcomes)?;
        }
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

/// p99 against offered rate, one line per store, log-log; SVG and PNG.
fn plot_sweep(dir: &std::path::Path, outcomes: &[Outcome]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    crate::schedulers::plot_font()?;
    let path = dir.join("registry-sweep");
    let size = (900, 480);
    draw_sweep(
        SVGBackend::new(&path.with_extension("svg"), size).into_drawing_area(),
        outcomes,
    )?;
    draw_sweep(
        BitMapBackend::new(&path.with_extension("png"), size).into_drawing_area(),
        outcomes,
    )?;
    Ok(())
}

fn draw_sweep<DB: plotters::prelude::DrawingBackend>(
    root: plotters::drawing::DrawingArea<DB, plotters::coord::Shift>,
    outcomes: &[Outcome],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    root.fill(&WHITE)?;
    let sweep: Vec<&Outcome> = outcomes.iter().filter(|o| o.phase == "sweep").collect();
    let rmin = sweep
        .iter()
        .map(|o| o.rate as f64)
        .fold(f64::MAX, f64::min)
        .min(100.0);
    let rmax = sweep.iter().map(|o| o.rate as f64).fold(1.0, f64::max) * 1.3;
    let pmax = sweep
        .iter()
        .map(|o| o.latency_ms_p99)
        .filter(|p| p.is_finite())
        .fold(100.0, f64::max)
        * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "registry: change-to-watcher p99 against change rate",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((rmin..rmax).log_scale(), (1f64..pmax).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("changes/s (log)")
        .y_desc("p99 ms (log)")
        .draw()?;
    let mut stores: Vec<&str> = sweep.iter().map(|o| o.store.as_str()).collect();
    stores.dedup();
    for (i, store) in stores.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = sweep
            .iter()
            .filter(|o| o.store == store && o.latency_ms_p99.is_finite())
            .map(|o| (o.rate as f64, o.latency_ms_p99.max(1.0)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(store.to_owned())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .draw_series(LineSeries::new(
            vec![(rmin, 50.0), (rmax, 50.0)],
            BLACK.mix(0.4),
        ))?
        .label("50 ms")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
