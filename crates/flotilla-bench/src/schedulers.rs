//! `flotilla-bench schedulers`: the dynamic-feedback experiment.
//!
//! Real containers of the test service (CPU per request, Docker CPU quotas) registered by
//! a real agent, behind flotilla lb with each scheduler and behind HAProxy
//! (`leastconn`, `roundrobin`), under open-loop constant-rate load: each request has an
//! intended send time and its latency is measured from it, so a stalled backend cannot
//! hide queueing (no coordinated omission). Reports throughput, success rate and
//! p50/p99/p99.9 per scenario and scheduler, as Markdown, JSON and SVG plots.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_testkit::{docker, free_port, unique, wait_for_port, Container, DockerNetwork};
use serde::{Deserialize, Serialize};

use crate::procs::{spawn, Proc, ServerProc};

/// Flags of the experiment.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of load per scheduler and scenario.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Short run (5 s each) for a quick look.
    #[arg(long)]
    quick: bool,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Directory for the SVG and PNG plots.
    #[arg(long, default_value = "bench-results")]
    plots: PathBuf,
    /// Run only this scenario (repeatable; default: all).
    #[arg(long = "scenario")]
    only_scenarios: Vec<String>,
    /// Run only this scheduler (repeatable; default: all).
    #[arg(long = "scheduler")]
    only_schedulers: Vec<String>,
    /// Runs of every scheduler per scenario (order rotated each time); tables and plots
    /// show the medians, and the table the spread of p99.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Run nothing: print the tables and draw the plots of an earlier `--json` file.
    #[arg(long, value_name = "JSON")]
    replot: Option<PathBuf>,
}

impl Args {
    /// The scenarios and schedulers asked for; an unknown name is an error.
    fn selection(&self) -> anyhow::Result<(Vec<Scenario>, Vec<&'static str>)> {
        let all = scenarios();
        for name in &self.only_scenarios {
            anyhow::ensure!(
                all.iter().any(|s| s.name == name),
                "--scenario {name}: unknown (one of {})",
                all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            );
        }
        for name in &self.only_schedulers {
            anyhow::ensure!(
                SCHEDULERS.contains(&name.as_str()),
                "--scheduler {name}: unknown (one of {})",
                SCHEDULERS.join(", ")
            );
        }
        let keep = |only: &[String], name: &str| only.is_empty() || only.iter().any(|o| o == name);
        Ok((
            all.into_iter()
                .filter(|s| keep(&self.only_scenarios, s.name))
                .collect(),
            SCHEDULERS
                .into_iter()
                .filter(|s| keep(&self.only_schedulers, s))
                .collect(),
        ))
    }
}

/// CPU each request burns in the test service (µs): capacity = quota / this.
const CPU_US: u64 = 2000;
/// Requests slower than this count as failed.
const TIMEOUT: Duration = Duration::from_secs(2);

struct Scenario {
    name: &'static str,
    /// (CPU quota in cores, extra latency ms) per backend.
    backends: Vec<(f64, u64)>,
    /// Share of total capacity offered, per third of the run.
    load: [f64; 3],
    /// Start a CPU burner in backend 0 at half time.
    antagonist: bool,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "heterogeneous",
            backends: vec![(0.1, 0), (0.2, 0), (0.4, 0)],
            load: [0.85; 3],
            antagonist: false,
        },
        Scenario {
            name: "antagonist",
            backends: vec![(0.2, 0), (0.2, 0), (0.2, 0)],
            load: [0.8; 3],
            antagonist: true,
        },
        Scenario {
            name: "slow-backend",
            backends: vec![(0.2, 5), (0.2, 0), (0.2, 0), (0.2, 0)],
            load: [0.6; 3],
            antagonist: false,
        },
        Scenario {
            name: "load-steps",
            backends: vec![(0.2, 0), (0.2, 0), (0.2, 0)],
            load: [0.3, 0.9, 0.3],
            antagonist: false,
        },
    ]
}

const SCHEDULERS: [&str; 8] = [
    "round-robin",
    "weighted",
    "least-conn",
    "p2c",
    "p2c-ewma",
    "feedback",
    "haproxy-leastconn",
    "haproxy-roundrobin",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunResult {
    scenario: String,
    scheduler: String,
    /// Which of the `--repeat` runs (0 in files from before repeats existed).
    #[serde(default)]
    repeat: usize,
    offered_rps: f64,
    throughput_rps: f64,
    success: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// (seconds since start, backend, weight) samples (flotilla only).
    weights: Vec<(f64, String, f64)>,
}

use crate::stats::{median, percentile};

/// Open-loop load: request k is due at its intended time whatever happened before.
async fn drive(
    url: &str,
    capacity: f64,
    load: [f64; 3],
    secs: u64,
    on_half: impl FnOnce(),
) -> (Vec<f64>, u64, u64, f64) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .timeout(TIMEOUT)
        .build()
        .unwrap();
    let results = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let third = secs as f64 / 3.0;
    let mut t = 0.0f64;
    let mut tasks = Vec::new();
    let mut on_half = Some(on_half);
    let mut sent = 0u64;
    while t < secs as f64 {
        let rate = capacity * load[((t / third) as usize).min(2)];
        let due = start + Duration::from_secs_f64(t);
        tokio::time::sleep_until(due.into()).await;
        if t >= secs as f64 / 2.0 {
            if let Some(f) = on_half.take() {
                f();
            }
        }
        let (client, url, results) = (client.clone(), url.to_owned(), results.clone());
        sent += 1;
        tasks.push(tokio::spawn(async move {
            let ok = match client.get(&url).send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            // Latency from the intended send time: queueing anywhere counts.
            let latency = due.elapsed().as_secs_f64() * 1000.0;
            results.lock().unwrap().push((ok, latency));
        }));
        t += 1.0 / rate;
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let results = results.lock().unwrap().clone();
    let ok = results.iter().filter(|r| r.0).count() as u64;
    let mut lat: Vec<f64> = results
        .iter()
        .map(|(ok, l)| {
            if *ok {
                *l
            } else {
                l.max(TIMEOUT.as_secs_f64() * 1000.0)
            }
        })
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (lat, ok, sent, elapsed)
}

fn haproxy(
    dir: &std::path::Path,
    port: u16,
    balance: &str,
    backends: &[SocketAddr],
) -> anyhow::Result<Proc> {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, a)| format!("    server s{i} {a}\n"))
        .collect();
    let cfg = format!(
        "global\n    nbthread 1\n    maxconn 9500\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    http-reuse always\n    option http-keep-alive\nfrontend f\n    bind 127.0.0.1:{port}\n    default_backend b\nbackend b\n    balance {balance}\n{servers}"
    );
    let path = dir.join(format!("haproxy-{port}.cfg"));
    std::fs::write(&path, cfg)?;
    let p = spawn(
        "haproxy",
        Command::new("haproxy").arg("-f").arg(&path).arg("-db"),
    )?;
    wait_for_port(
        format!("127.0.0.1:{port}").parse()?,
        Duration::from_secs(10),
    )?;
    Ok(p)
}

/// Runs the experiment.
pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.quick {
        args.seconds = 5;
    }
    let (selected, schedulers) = args.selection()?;
    // Before any load: text layout in both plot formats needs the font.
    plot_font()?;
    if let Some(path) = &args.replot {
        let all: Vec<RunResult> = serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("{}: not a --json file of this experiment", path.display()))?;
        std::fs::create_dir_all(&args.plots)?;
        return report(&args, &selected, &all);
    }
    let image = crate::procs::testsvc_image().await?;
    let dir = tempfile::tempdir()?;
    let server = ServerProc::start().await?;
    let (client, url, token) = (
        server.client.clone(),
        server.url.clone(),
        server.token_file.clone(),
    );
    let _agent = server.agent("bench")?;
    let net = DockerNetwork::create("flotilla-sched")?;
    std::fs::create_dir_all(&args.plots)?;

    let mut all = Vec::new();
    for sc in &selected {
        let service = format!("exp-{}", sc.name);
        let mut containers = Vec::new();
        for (i, (cpus, latency)) in sc.backends.iter().enumerate() {
            let name = unique(&format!("flotilla-exp-{}-{i}", sc.name));
            let label = format!("flotilla.service={service}");
            let backend_name = format!("b{i}");
            let (cpus, cpu_us, latency) =
                (cpus.to_string(), CPU_US.to_string(), latency.to_string());
            containers.push(Container::run(
                &name,
                &[
                    "--network",
                    &net.name,
                    "--cpus",
                    &cpus,
                    "-l",
                    &label,
                    "-l",
                    "flotilla.port=8080",
                    "-l",
                    "flotilla.check.http=/health",
                    &image,
                    "--listen",
                    "0.0.0.0:8080",
                    "--name",
                    &backend_name,
                    "--cpu-us",
                    &cpu_us,
                    "--latency-ms",
                    &latency,
                ],
            )?);
        }
        let n = containers.len();
        let start = Instant::now();
        let addrs: Vec<SocketAddr> = loop {
            let s = client.service(&service, 0, Duration::ZERO, true).await?;
            if s.instances.len() == n {
                break s
                    .instances
                    .iter()
                    .map(|i| SocketAddr::new(i.address, i.port))
                    .collect();
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "{service}: backends not passing"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let capacity: f64 = sc
            .backends
            .iter()
            .map(|(c, _)| c * 1e6 / CPU_US as f64)
            .sum();
        let order: Vec<(usize, &str)> = (0..args.repeat.max(1))
            .flat_map(|rep| {
                let n = schedulers.len();
                (0..n).map(move |i| (rep, i))
            })
            .map(|(rep, i)| (rep, schedulers[(i + rep) % schedulers.len()]))
            .collect();
        for (repeat, sched) in order {
            let weights_log = Arc::new(Mutex::new(Vec::new()));
            let (lb_url, _keep): (String, Box<dyn std::any::Any + Send>) = if let Some(balance) =
                sched.strip_prefix("haproxy-")
            {
                let p = free_port();
                (
                    format!("http://127.0.0.1:{p}/"),
                    Box::new(haproxy(dir.path(), p, balance, &addrs)?),
                )
            } else {
                let text = format!(
                    "[admin]\nlisten = \"\"\n[registry]\nurl = \"{url}\"\ntoken_file = \"{}\"\n[[listener]]\nname = \"exp\"\nbind = \"127.0.0.1:0\"\nscheduler = \"{sched}\"\nservice = \"{service}\"\nslow_start = \"0s\"\n",
                    token.display()
                );
                let config: flotilla_lb::config::LbConfig =
                    flotilla_core::config::parse_toml(std::path::Path::new("exp.toml"), &text)?;
                let lb = flotilla_lb::start(config).await?;
                while lb.listeners[0].backends().len() < n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Static weights for `weighted`: what an operator would configure (equal).
                let url = format!("http://{}/", lb.addrs[0]);
                let listeners = lb.listeners.clone();
                let log = weights_log.clone();
                let t0 = Instant::now();
                let sampler = tokio::spawn(async move {
                    loop {
                        for b in listeners[0].backends().iter() {
                            let w = b
                                .dynamic_weight()
                                .unwrap_or_else(|| b.effective_weight(Instant::now()));
                            log.lock().unwrap().push((
                                t0.elapsed().as_secs_f64(),
                                b.addr.to_string(),
                                w,
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                });
                (url, Box::new((lb, AbortOnDrop(sampler))))
            };
            let antagonist = sc.antagonist.then(|| containers[0].name.clone());
            let secs = args.seconds;
            let (lat, ok, sent, elapsed) = drive(&lb_url, capacity, sc.load, secs, move || {
                if let Some(c) = antagonist {
                    // A CPU-burning neighbour inside backend 0's quota, for the rest of the run.
                    let _ = docker(&[
                        "exec",
                        "-d",
                        &c,
                        "/bin/busybox",
                        "timeout",
                        &(secs / 2 + 1).to_string(),
                        "/bin/busybox",
                        "sh",
                        "-c",
                        "while :; do :; done",
                    ]);
                }
            })
            .await;
            drop(_keep);
            let weights = std::mem::take(&mut *weights_log.lock().unwrap());
            let offered = sent as f64 / elapsed;
            let r = RunResult {
                scenario: sc.name.into(),
                scheduler: sched.into(),
                repeat,
                offered_rps: offered,
                throughput_rps: ok as f64 / elapsed,
                success: ok as f64 / sent.max(1) as f64,
                p50_ms: percentile(&lat, 0.5),
                p99_ms: percentile(&lat, 0.99),
                p999_ms: percentile(&lat, 0.999),
                weights,
            };
            eprintln!(
                "{:>14} {:>19}: {:.0}/{:.0} req/s ok, success {:.1} %, p50 {:.1} ms, p99 {:.1} ms",
                r.scenario,
                r.scheduler,
                r.throughput_rps,
                r.offered_rps,
                r.success * 100.0,
                r.p50_ms,
                r.p99_ms
            );
            all.push(r);
            // Let queues drain before the next scheduler.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        drop(containers);
    }

    report(&args, &selected, &all)
}

/// The Markdown tables, the JSON file and the plots of a finished (or loaded) run.
fn report(args: &Args, selected: &[Scenario], all: &[RunResult]) -> anyhow::Result<()> {
    let summary = medians(all);
    let repeats = all.iter().map(|r| r.repeat + 1).max().unwrap_or(1);
    println!("\n### Scheduler experiment ({} s per run, capacity from Docker CPU quotas at {} µs CPU per request{})\n", args.seconds, CPU_US, if repeats > 1 { format!("; medians of {repeats} runs") } else { String::new() });
    for sc in selected {
        println!("\n#### {}\n\n| scheduler | offered req/s | throughput req/s | success % | p50 ms | p99 ms | p99 of each run | p99.9 ms |\n|---|---|---|---|---|---|---|---|", sc.name);
        for r in summary.iter().filter(|r| r.scenario == sc.name) {
            let runs: Vec<String> = all
                .iter()
                .filter(|a| a.scenario == r.scenario && a.scheduler == r.scheduler)
                .map(|a| format!("{:.1}", a.p99_ms))
                .collect();
            println!(
                "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {:.1} |",
                r.scheduler,
                r.offered_rps,
                r.throughput_rps,
                r.success * 100.0,
                r.p50_ms,
                r.p99_ms,
                runs.join(", "),
                r.p999_ms
            );
        }
        plot(&args.plots, sc.name, &summary)?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(all)?)?;
    }
    println!(
        "\nplots: {}/<scenario>-p99.{{svg,png}} and <scenario>-feedback-weights.{{svg,png}}",
        args.plots.display()
    );
    Ok(())
}

/// One row per scenario and scheduler, in first-run order: the median of every figure
/// over the repeats, with the first run's weights.
fn medians(all: &[RunResult]) -> Vec<RunResult> {
    let mut out: Vec<RunResult> = Vec::new();
    for r in all {
        if out
            .iter()
            .any(|o| o.scenario == r.scenario && o.scheduler == r.scheduler)
        {
            continue;
        }
        let same: Vec<&RunResult> = all
            .iter()
            .filter(|a| a.scenario == r.scenario && a.scheduler == r.scheduler)
            .collect();
        let of = |f: fn(&RunResult) -> f64| median(same.iter().map(|a| f(a)).collect());
        out.push(RunResult {
            scenario: r.scenario.clone(),
            scheduler: r.scheduler.clone(),
            repeat: 0,
            offered_rps: of(|a| a.offered_rps),
            throughput_rps: of(|a| a.throughput_rps),
            success: of(|a| a.success),
            p50_ms: of(|a| a.p50_ms),
            p99_ms: of(|a| a.p99_ms),
            p999_ms: of(|a| a.p999_ms),
            weights: r.weights.clone(),
        });
    }
    out
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Font file for the plots' text (Debian's `fonts-dejavu-core`): plotters lays text
/// out with it in both formats.
const PLOT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers [`PLOT_FONT`] as plotters' "sans-serif" once; says what to install if absent.
pub(crate) fn plot_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(PLOT_FONT)
            .map_err(|e| format!("{PLOT_FONT}: {e} (the plots need Debian's fonts-dejavu-core)"))?;
        plotters::style::register_font(
            "sans-serif",
            plotters::style::FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .map_err(|_| format!("{PLOT_FONT}: not a font plotters can read"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Two figures per scenario, each as SVG and PNG: p50/p99 per scheduler, and the
/// feedback weights over time.
fn plot(dir: &std::path::Path, scenario: &str, all: &[RunResult]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let runs: Vec<&RunResult> = all.iter().filter(|r| r.scenario == scenario).collect();
    let size = (900, 420);
    let latency = dir.join(format!("{scenario}-p99"));
    draw_latency(
        SVGBackend::new(&latency.with_extension("svg"), size).into_drawing_area(),
        scenario,
        &runs,
    )?;
    {
        draw_latency(
            BitMapBackend::new(&latency.with_extension("png"), size).into_drawing_area(),
            scenario,
            &runs,
        )?;
    }
    if let Some(fb) = runs.iter().find(|r| r.scheduler == "feedback") {
        let weights = dir.join(format!("{scenario}-feedback-weights"));
        draw_weights(
            SVGBackend::new(&weights.with_extension("svg"), size).into_drawing_area(),
            scenario,
            fb,
        )?;
        {
            draw_weights(
                BitMapBackend::new(&weights.with_extension("png"), size).into_drawing_area(),
                scenario,
                fb,
            )?;
        }
    }
    Ok(())
}

type Area<DB> = plotters::drawing::DrawingArea<DB, plotters::coord::Shift>;

/// p50 (light) and p99 (dark) bars per scheduler.
fn draw_latency<DB: plotters::prelude::DrawingBackend>(
    root: Area<DB>,
    scenario: &str,
    runs: &[&RunResult],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    {
        root.fill(&WHITE)?;
        // Log scale: 2-second timeouts and 4 ms medians on one chart.
        let max = runs.iter().map(|r| r.p99_ms).fold(10.0, f64::max) * 1.5;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{scenario}: latency per scheduler (p50 light, p99 dark), ms"),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(60)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..runs.len() as f64, (1f64..max).log_scale())?;
        let names: Vec<String> = runs.iter().map(|r| r.scheduler.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(runs.len() * 2)
            .x_label_formatter(&|x| {
                names
                    .get(*x as usize)
                    .filter(|_| x.fract() == 0.0)
                    .cloned()
                    .unwrap_or_default()
            })
            .y_desc("ms (log scale)")
            .draw()?;
        for (i, r) in runs.iter().enumerate() {
            let x = i as f64;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x + 0.1, 1.0), (x + 0.9, r.p99_ms)],
                BLUE.mix(0.8).filled(),
            )))?;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x + 0.3, 1.0), (x + 0.7, r.p50_ms)],
                BLUE.mix(0.3).filled(),
            )))?;
        }
        root.present()?;
    }
    Ok(())
}

/// The feedback controller's weight per backend over time.
fn draw_weights<DB: plotters::prelude::DrawingBackend>(
    root: Area<DB>,
    scenario: &str,
    fb: &RunResult,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    root.fill(&WHITE)?;
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (t, b, w) in &fb.weights {
        series.entry(b.clone()).or_default().push((*t, *w));
    }
    let tmax = fb.weights.iter().map(|w| w.0).fold(1.0, f64::max);
    let wmax = fb.weights.iter().map(|w| w.2).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{scenario}: feedback weights over time"),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..tmax, 0f64..wmax)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("weight")
        .draw()?;
    for (i, (backend, pts)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(backend)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
