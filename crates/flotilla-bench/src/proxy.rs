//! `flotilla-bench proxy`: flotilla lb side by side with HAProxy and Nginx, same
//! backends, same thread counts, driven alternately by wrk in one run.
//!
//! - HTTP keep-alive: wrk -c64 against each proxy in front of two Nginx backends;
//!   requests/s, p50/p99 latency, proxy CPU seconds per request. Each cell is the median
//!   of `--rounds` runs (order rotated every round), with the spread. Configurations:
//!   1 thread and the core count sharing every core with wrk and the backends, and
//!   1 thread pinned — the proxy alone on the last core, wrk and the backends on the
//!   others — which takes the scheduler's placement out of the figure.
//! - Every proxy does the same header work by default: `X-Forwarded-For`,
//!   `X-Forwarded-Proto` and `Via` both ways (flotilla always does; `--bare-anchors`
//!   runs HAProxy and Nginx without it).
//! - TCP bulk: one client streams bytes through each proxy (flotilla `tcp`, HAProxy
//!   `mode tcp`) to a sink; MB/s.
//! - Idle connections: RSS of flotilla lb holding N idle client connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_testkit::{free_port, wait_for_port};

use crate::procs::{cpu_seconds, flotilla_binary, spawn, Proc};
use crate::stats::median;
use serde::Serialize;

/// Flags of the proxy benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Rounds (each round runs every proxy once per configuration; medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// MiB streamed per TCP bulk run.
    #[arg(long, default_value_t = 2048)]
    bulk_mib: u64,
    /// Idle client connections for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Shorter run.
    #[arg(long)]
    quick: bool,
    /// HAProxy and Nginx without the forwarding headers flotilla adds.
    #[arg(long)]
    bare_anchors: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

#[derive(Debug, Clone, Serialize)]
struct HttpResult {
    proxy: String,
    threads: usize,
    /// Proxy alone on one core, wrk and the backends on the others.
    pinned: bool,
    /// Medians over the rounds.
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_req: f64,
    /// Errors over all rounds.
    errors: u64,
    /// Every round's requests/s.
    rps_runs: Vec<f64>,
}

/// One wrk run against one proxy.
struct HttpRun {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_req: f64,
    errors: u64,
}

/// Sets the CPU affinity of every thread of every process in process group `pgid`.
fn pin_group(pgid: u32, cpus: &[usize]) {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: `set` is a live cpu_set_t; CPU_SET ignores CPUs beyond its size.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // Field 5 of /proc/PID/stat is the process group; the name before it may hold spaces.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let group = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<u32>().ok());
        if group != Some(pgid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() {
                // SAFETY: `set` is a live cpu_set_t of the size given; a gone thread is
                // only an error.
                unsafe {
                    libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
                };
            }
        }
    }
}

fn parse_ms(s: &str) -> f64 {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * mult
}

fn wrk(
    url: &str,
    seconds: u64,
    connections: u32,
    cpus: Option<&[usize]>,
) -> anyhow::Result<(f64, f64, f64, u64)> {
    let mut cmd = match cpus {
        Some(cpus) => {
            let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
            let mut c = Command::new("taskset");
            c.args(["-c", &list.join(","), "wrk"]);
            c
        }
        None => Command::new("wrk"),
    };
    let out = cmd
        .args([
            "-t",
            "1",
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            url,
        ])
        .output()
        .context("running wrk (install Debian's wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rps = f64::NAN;
    let (mut p50, mut p99) = (f64::NAN, f64::NAN);
    let mut errors = 0;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = parse_ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = parse_ms(v);
        } else if t.starts_with("Non-2xx") || t.starts_with("Socket errors") {
            errors += t
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if rps.is_nan() {
        bail!("wrk printed no rate:\n{text}");
    }
    Ok((rps, p50, p99, errors))
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p)
}

fn start_proxy(
    kind: &str,
    dir: &Path,
    threads: usize,
    port: u16,
    backends: &[u16],
    tcp: bool,
    same_headers: bool,
) -> anyhow::Result<Proc> {
    let proc = match kind {
        "flotilla" => {
            let list: Vec<String> = backends
                .iter()
                .map(|p| format!("\"127.0.0.1:{p}\""))
                .collect();
            let cfg = format!(
                "[runtime]\nworker_threads = {threads}\n[admin]\nlisten = \"\"\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:{port}\"\nprotocol = \"{}\"\nscheduler = \"round-robin\"\nbackends = [{}]\n",
                if tcp { "tcp" } else { "http" },
                list.join(", ")
            );
            let path = write(dir, &format!("flotilla-{port}.toml"), &cfg)?;
            spawn(
                "flotilla",
                Command::new(flotilla_binary()?)
                    .args(["lb", "--config"])
                    .arg(&path)
                    .env("RUST_LOG", "error"),
            )?
        }
        "haproxy" => {
            let servers: String = backends
                .iter()
                .enumerate()
                .map(|(i, p)| format!("    server s{i} 127.0.0.1:{p}\n"))
                .collect();
            let mode = if tcp { "tcp" } else { "http" };
            let reuse = if tcp {
                ""
            } else {
                "    http-reuse always\n    option http-keep-alive\n"
            };
            // The forwarding headers flotilla adds to every request and response.
            let headers = if same_headers && !tcp {
                "    option forwardfor\n    http-request set-header X-Forwarded-Proto http\n    http-request add-header Via \"1.1 haproxy\"\n    http-response add-header Via \"1.1 haproxy\"\n"
            } else {
                ""
            };
            let cfg = format!(
                "global\n    nbthread {threads}\n    maxconn 9500\ndefaults\n    mode {mode}\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n{reuse}\nfrontend f\n    bind 127.0.0.1:{port}\n{headers}    default_backend b\nbackend b\n    balance roundrobin\n{servers}"
            );
            let path = write(dir, &format!("haproxy-{port}.cfg"), &cfg)?;
            spawn(
                "haproxy",
                Command::new("haproxy").arg("-f").arg(&path).arg("-db"),
            )?
        }
        "nginx" => {
            let servers: String = backends
                .iter()
                .map(|p| format!("    server 127.0.0.1:{p};\n"))
                .collect();
            let headers = if same_headers {
                "      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      proxy_set_header X-Forwarded-Proto $scheme;\n      proxy_set_header Via \"1.1 nginx\";\n      add_header Via \"1.1 nginx\";\n"
            } else {
                ""
            };
            let cfg = format!(
                "worker_processes {threads};\ndaemon off;\npid {dir}/nginx-{port}.pid;\nerror_log /dev/null crit;\nevents {{ worker_connections 20000; }}\nhttp {{\n  access_log off;\n  upstream b {{\n{servers}    keepalive 128;\n  }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://b;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n{headers}    }}\n  }}\n}}\n",
                dir = dir.display()
            );
            let path = write(dir, &format!("nginx-{port}.conf"), &cfg)?;
            spawn(
                "nginx",
                Command::new("nginx")
                    .arg("-c")
                    .arg(&path)
                    .arg("-p")
                    .arg(dir),
            )?
        }
        other => bail!("unknown proxy {other}"),
    };
    wait_for_port(
        format!("127.0.0.1:{port}").parse()?,
        Duration::from_secs(10),
    )
    .with_context(|| format!("{} did not listen", proc.name))?;
    Ok(proc)
}

fn nginx_backends(dir: &Path, ports: &[u16]) -> anyhow::Result<Proc> {
    let servers: String = ports
        .iter()
        .map(|p| {
            format!("  server {{ listen 127.0.0.1:{p}; location / {{ return 200 \"ok\\n\"; }} }}\n")
        })
        .collect();
    let cfg = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/backends.pid;\nerror_log /dev/null crit;\nevents {{ worker_connections 20000; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n{servers}}}\n",
        d = dir.display()
    );
    let path = write(dir, "backends.conf", &cfg)?;
    let p = spawn(
        "nginx backends",
        Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir),
    )?;
    for port in ports {
        wait_for_port(
            format!("127.0.0.1:{port}").parse()?,
            Duration::from_secs(10),
        )?;
    }
    Ok(p)
}

/// A TCP sink: reads and discards; one thread per connection.
fn sink() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.write_all(b"done");
            });
        }
    });
    Ok(port)
}

fn bulk(port: u16, mib: u64) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))?;
    let buf = vec![1u8; 1024 * 1024];
    let start = Instant::now();
    for _ in 0..mib {
        s.write_all(&buf)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut ack = Vec::new();
    s.read_to_end(&mut ack)?;
    anyhow::ensure!(ack == b"done", "sink did not acknowledge");
    Ok(mib as f64 / start.elapsed().as_secs_f64())
}

fn raise_fd_limit() {
    let lim = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: `lim` is a live rlimit; setrlimit(2) only reads it.
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// Runs the benchmark and prints Markdown tables with ratios.
pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.quick {
        args.seconds = 3;
        args.rounds = 1;
        args.bulk_mib = 512;
        args.idle = args.idle.min(2000);
    }
    raise_fd_limit();
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

fn run_blocking(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let backend_ports = [free_port(), free_port()];
    let _backends = nginx_backends(dir.path(), &backend_ports)?;
    // (threads, pinned): sharing the cores with wrk and the backends, then 1 thread alone
    // on the last core with everything else on the others.
    let mut configs = vec![(1, false)];
    if cores > 1 {
        configs.push((cores, false));
        configs.push((1, true));
    }
    let proxy_cpu = [cores - 1];
    let other_cpus: Vec<usize> = (0..cores.saturating_sub(1)).collect();
    let all_cpus: Vec<usize> = (0..cores).collect();
    let backends_group = _backends.child.id();
    let proxies = ["flotilla", "haproxy", "nginx"];
    let mut runs: Vec<((&str, usize, bool), HttpRun)> = Vec::new();
    for round in 0..args.rounds as usize {
        for &(threads, pinned) in &configs {
            pin_group(backends_group, if pinned { &other_cpus } else { &all_cpus });
            let wrk_cpus = pinned.then_some(other_cpus.as_slice());
            // Rotated each round, so no proxy always runs first or last.
            for i in 0..proxies.len() {
                let kind = proxies[(i + round) % proxies.len()];
                let port = free_port();
                let p = start_proxy(
                    kind,
                    dir.path(),
                    threads,
                    port,
                    &backend_ports,
                    false,
                    !args.bare_anchors,
                )?;
                if pinned {
                    pin_group(p.child.id(), &proxy_cpu);
                }
                let url = format!("http://127.0.0.1:{port}/");
                wrk(&url, 1, args.connections, wrk_cpus)?; // warm-up: connections, pools
                let cpu0 = cpu_seconds(p.child.id());
                let (rps, p50, p99, errors) = wrk(&url, args.seconds, args.connections, wrk_cpus)?;
                let cpu = cpu_seconds(p.child.id()) - cpu0;
                let r = HttpRun {
                    rps,
                    p50_ms: p50,
                    p99_ms: p99,
                    cpu_us_per_req: cpu * 1e6 / (rps * args.seconds as f64),
                    errors,
                };
                eprintln!("round {round} {kind} threads={threads}{}: {rps:.0} req/s p50 {p50:.2} ms p99 {p99:.2} ms cpu {:.1} µs/req", if pinned { " pinned" } else { "" }, r.cpu_us_per_req);
                runs.push(((kind, threads, pinned), r));
            }
        }
    }
    pin_group(backends_group, &all_cpus);
    let mut best: Vec<HttpResult> = Vec::new();
    for &(threads, pinned) in &configs {
        for kind in proxies {
            let mine: Vec<&HttpRun> = runs
                .iter()
                .filter(|(k, _)| *k == (kind, threads, pinned))
                .map(|(_, r)| r)
                .collect();
            let of = |f: fn(&HttpRun) -> f64| median(mine.iter().map(|r| f(r)).collect());
            best.push(HttpResult {
                proxy: kind.to_owned(),
                threads,
                pinned,
                rps: of(|r| r.rps),
                p50_ms: of(|r| r.p50_ms),
                p99_ms: of(|r| r.p99_ms),
                cpu_us_per_req: of(|r| r.cpu_us_per_req),
                errors: mine.iter().map(|r| r.errors).sum(),
                rps_runs: mine.iter().map(|r| r.rps).collect(),
            });
        }
    }
    println!(
        "\n### HTTP keep-alive, wrk -t1 -c{} -d{}s, two Nginx backends (median of {} rounds; anchors {})\n",
        args.connections,
        args.seconds,
        args.rounds,
        if args.bare_anchors {
            "without forwarding headers"
        } else {
            "adding X-Forwarded-For/-Proto and Via as flotilla does"
        }
    );
    println!("| proxy | threads | req/s (median) | req/s min–max | p50 ms | p99 ms | CPU µs/req | errors | req/s vs HAProxy | req/s vs Nginx |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &best {
        let of = |k: &str| {
            best.iter()
                .find(|b| b.proxy == k && b.threads == r.threads && b.pinned == r.pinned)
                .map(|b| r.rps / b.rps)
                .unwrap_or(f64::NAN)
        };
        let lo = r.rps_runs.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = r.rps_runs.iter().cloned().fold(0.0, f64::max);
        println!(
            "| {} | {}{} | {:.0} | {:.0}–{:.0} | {:.2} | {:.2} | {:.1} | {} | {:.2}× | {:.2}× |",
            r.proxy,
            r.threads,
            if r.pinned { " pinned" } else { "" },
            r.rps,
            lo,
            hi,
            r.p50_ms,
            r.p99_ms,
            r.cpu_us_per_req,
            r.errors,
            of("haproxy"),
            of("nginx")
        );
    }

    // TCP bulk.
    let sink_port = sink()?;
    let mut bulk_rows = Vec::new();
    for kind in ["flotilla", "haproxy"] {
        let port = free_port();
        let p = start_proxy(kind, dir.path(), 1, port, &[sink_port], true, false)?;
        let cpu0 = cpu_seconds(p.child.id());
        let mut rates = Vec::new();
        for _ in 0..args.rounds.max(1) {
            rates.push(bulk(port, args.bulk_mib)?);
        }
        let cpu = cpu_seconds(p.child.id()) - cpu0;
        let rate = rates.iter().cloned().fold(0.0, f64::max);
        bulk_rows.push((
            kind,
            rate,
            cpu / (args.bulk_mib as f64 * args.rounds.max(1) as f64 / 1024.0),
        ));
    }
    let hap = bulk_rows
        .iter()
        .find(|r| r.0 == "haproxy")
        .map(|r| r.1)
        .unwrap_or(f64::NAN);
    println!(
        "\n### TCP bulk, one stream of {} MiB through each proxy (1 thread)\n",
        args.bulk_mib
    );
    println!("| proxy | MiB/s | proxy CPU s per GiB | vs HAProxy |\n|---|---|---|---|");
    for (k, rate, cpu) in &bulk_rows {
        println!("| {k} | {rate:.0} | {cpu:.2} | {:.2}× |", rate / hap);
    }

    // Idle connections.
    let port = free_port();
    let p = start_proxy(
        "flotilla",
        dir.path(),
        1,
        port,
        &backend_ports,
        false,
        false,
    )?;
    let base = rss_mb(p.child.id());
    let mut conns = Vec::with_capacity(args.idle);
    for _ in 0..args.idle {
        conns.push(TcpStream::connect(SocketAddr::from((
            [127, 0, 0, 1],
            port,
        )))?);
    }
    std::thread::sleep(Duration::from_secs(2));
    let held = rss_mb(p.child.id());
    let hp_port = free_port();
    let hp = start_proxy(
        "haproxy",
        dir.path(),
        1,
        hp_port,
        &backend_ports,
        false,
        false,
    )?;
    let hp_base = rss_mb(hp.child.id());
    // HAProxy needs 2 fds per connection for maxconn and the hard fd limit here is
    // 20,000, so its row holds at most 9,000.
    let hp_idle = args.idle.min(9_000);
    let mut hp_conns = Vec::with_capacity(hp_idle);
    for _ in 0..hp_idle {
        hp_conns.push(TcpStream::connect(SocketAddr::from((
            [127, 0, 0, 1],
            hp_port,
        )))?);
    }
    std::thread::sleep(Duration::from_secs(2));
    let hp_held = rss_mb(hp.child.id());
    println!(
        "\n### Memory with {} idle client connections (RSS)\n",
        args.idle
    );
    println!("| proxy | RSS idle MB | RSS with connections MB |\n|---|---|---|");
    println!("| flotilla | {base:.1} | {held:.1} |");
    println!("| haproxy ({hp_idle} connections) | {hp_base:.1} | {hp_held:.1} |");
    drop(conns);
    drop(hp_conns);
    println!("\nmachine: {}", crate::procs::machine());
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "http": best,
            "tcp_bulk": bulk_rows.iter().map(|(k, r, c)| serde_json::json!({"proxy": k, "mib_s": r, "cpu_s_per_gib": c})).collect::<Vec<_>>(),
            "idle": {"connections": args.idle, "flotilla_rss_mb": held, "haproxy_rss_mb": hp_held},
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
