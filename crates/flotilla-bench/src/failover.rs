//! `flotilla-bench failover`: an lb pair on a LAN of network namespaces, a client
//! sending open-loop requests to the VIP, and faults against the master — for
//! flotilla's pair at its defaults and for Keepalived + HAProxy at Keepalived's
//! defaults and at flotilla's advert interval, in one run.
//!
//! Per fault it reports the client-observed gap (longest time between two successful
//! requests), failed requests, the dual-master window (both lbs holding the VIP) and,
//! after a partition heals, the time back to one master.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flotilla_testkit::netns::Lan;
use serde::Serialize;

use crate::procs::{spawn, Proc};

/// Flags of the failover benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Client requests per second (open loop, one connection each).
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Runs per fault and pair.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Seconds of CPU starvation in the false-failover check.
    #[arg(long, default_value_t = 60)]
    starve_secs: u64,
    /// One run per fault and a 15 s starvation check.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Which pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// flotilla lb with `[ha]` at its defaults (100 ms adverts).
    Flotilla,
    /// Keepalived (advert_int 1 s, its default) + HAProxy.
    KeepalivedDefault,
    /// Keepalived at 100 ms adverts + HAProxy.
    KeepalivedFast,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Flotilla => "flotilla (100 ms adverts)",
            Kind::KeepalivedDefault => "keepalived+haproxy (1 s adverts)",
            Kind::KeepalivedFast => "keepalived+haproxy (100 ms adverts)",
        }
    }
}

/// A fault against the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// SIGTERM to the master's lb (Keepalived: to keepalived).
    Graceful,
    /// SIGKILL of everything on the master.
    Crash,
    /// The master's link goes down (and comes back later).
    NodeLoss,
    /// The two lbs stop hearing each other (VRRP dropped at both), clients still
    /// reach both; healed later.
    Partition,
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    kind: Kind,
    fault: Fault,
    gap_ms: f64,
    failed: usize,
    sent: usize,
    dual_master_ms: f64,
    back_to_one_master_ms: Option<f64>,
}

/// The LAN with one pair on it.
pub struct Lab {
    /// The namespaces.
    pub lan: Lan,
    dir: PathBuf,
    kind: Kind,
    lbs: [Vec<Proc>; 2],
    _backends: Vec<Proc>,
}

/// The VIP's last octet.
const VIP: u8 = 100;
pub(crate) const NODES: [&str; 2] = ["lb1", "lb2"];

impl Lab {
    /// Builds the LAN (lb1, lb2, client) with a busybox backend in each lb namespace.
    pub fn new(kind: Kind, subnet: u8, dir: &Path) -> Result<Lab> {
        let lan = Lan::create(&["lb1", "lb2", "client"], subnet)?;
        let mut backends = Vec::new();
        for n in NODES {
            let www = dir.join(format!("www-{n}"));
            std::fs::create_dir_all(&www)?;
            std::fs::write(www.join("index.html"), n)?;
            backends.push(spawn(
                "busybox httpd",
                lan.command(n, "busybox")
                    .args(["httpd", "-f", "-p", "127.0.0.1:9000", "-h"])
                    .arg(&www),
            )?);
            // HAProxy binds the VIP before it is there.
            let _ = lan
                .command(n, "sysctl")
                .args(["-qw", "net.ipv4.ip_nonlocal_bind=1"])
                .status();
        }
        Ok(Lab {
            lan,
            dir: dir.to_owned(),
            kind,
            lbs: [Vec::new(), Vec::new()],
            _backends: backends,
        })
    }

    /// The virtual IP.
    pub fn vip(&self) -> Ipv4Addr {
        self.lan.spare(VIP)
    }

    /// Starts the lb(s) of node `i` (0 = lb1, priority 150; 1 = lb2, priority 100).
    pub fn start(&mut self, i: usize) -> Result<()> {
        let node = NODES[i];
        let priority = if i == 0 { 150 } else { 100 };
        let vip = self.vip();
        let mut procs = Vec::new();
        match self.kind {
            Kind::Flotilla => {
                let cfg = format!(
                    "[runtime]\nworker_threads = 1\n[admin]\nlisten = \"\"\n[[listener]]\nname = \"web\"\nbind = \"{vip}:8080\"\nbackends = [\"127.0.0.1:9000\"]\n[ha]\ninterface = \"eth0\"\nvirtual_router_id = 51\npriority = {priority}\nvirtual_ips = [\"{vip}/24\"]\n"
                );
                let path = self.dir.join(format!("{node}.toml"));
                std::fs::write(&path, cfg)?;
                procs.push(spawn(
                    "flotilla lb",
                    self.lan
                        .command(node, &crate::procs::flotilla_binary()?.to_string_lossy())
                        .args(["lb", "--config"])
                        .arg(&path)
                        .env("RUST_LOG", "warn"),
                )?);
            }
            Kind::KeepalivedDefault | Kind::KeepalivedFast => {
                let advert = if self.kind == Kind::KeepalivedFast {
                    "0.1"
                } else {
                    "1"
                };
                let hap = format!(
                    "global\n  nbthread 1\n  maxconn 2000\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 10s\n  timeout server 10s\nfrontend f\n  bind {vip}:8080\n  default_backend b\nbackend b\n  server s1 127.0.0.1:9000\n"
                );
                let hpath = self.dir.join(format!("haproxy-{node}.cfg"));
                std::fs::write(&hpath, hap)?;
                procs.push(spawn(
                    "haproxy",
                    self.lan
                        .command(node, "haproxy")
                        .args(["-db", "-f"])
                        .arg(&hpath),
                )?);
                let ka = format!(
                    "global_defs {{\n  vrrp_version 3\n}}\nvrrp_instance VI {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  priority {priority}\n  advert_int {advert}\n  virtual_ipaddress {{\n    {vip}/24\n  }}\n}}\n"
                );
                let kpath = self.dir.join(format!("keepalived-{node}.conf"));
                std::fs::write(&kpath, ka)?;
                procs.push(spawn(
                    "keepalived",
                    self.lan
                        .command(node, "keepalived")
                        .args(["--dont-fork", "--vrrp", "-f"])
                        .arg(&kpath)
                        .arg("-p")
                        .arg(self.dir.join(format!("ka-{node}.pid")))
                        .arg("-r")
                        .arg(self.dir.join(format!("ka-vrrp-{node}.pid"))),
                )?);
            }
        }
        self.lbs[i] = procs;
        Ok(())
    }

    /// SIGTERM to node `i`'s failover daemon (flotilla lb / keepalived), then waits.
    pub fn terminate(&mut self, i: usize) {
        if let Some(p) = self.lbs[i].last_mut() {
            flotilla_testkit::signal(p.child.id(), libc::SIGTERM);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.lbs[i].clear();
    }

    /// SIGKILL of everything on node `i` (process groups: Keepalived's VRRP child too).
    pub fn crash(&mut self, i: usize) {
        self.lbs[i].clear();
    }

    /// True if node `i` holds the VIP.
    pub fn holds_vip(&self, i: usize) -> bool {
        self.lan.has_addr(NODES[i], self.vip()).unwrap_or(false)
    }

    /// Waits until lb1 alone holds the VIP and answers the client.
    pub fn settle(&self, within: Duration) -> Result<()> {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.holds_vip(0) && !self.holds_vip(1) && self.ask().as_deref() == Some("lb1") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{}: lb1 never became the only master", self.kind.label())
    }

    fn ask(&self) -> Option<String> {
        let vip = self.vip();
        self.lan
            .run_in("client", move || get(SocketAddr::from((vip, 8080))))
            .join()
            .ok()
            .flatten()
    }
}

/// One GET on a new connection; the body if it was a 200.
pub(crate) fn get(addr: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1000))).ok()?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    if !text.starts_with("HTTP/1.1 200") && !text.starts_with("HTTP/1.0 200") {
        return None;
    }
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
}

/// Open-loop client: a request every `1/rate` s for `dur`, each on its own thread of
/// a small pool so a slow one never delays the next; `(intended send time, ok)`.
pub(crate) fn client_load(
    lan: &Lan,
    vip: Ipv4Addr,
    rate: u32,
    dur: Duration,
) -> std::thread::JoinHandle<Vec<(f64, bool)>> {
    lan.run_in("client", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let every = Duration::from_secs_f64(1.0 / f64::from(rate));
            let start = tokio::time::Instant::now();
            let mut tasks = Vec::new();
            let mut n = 0u32;
            while start.elapsed() < dur {
                let at = start + every * n;
                tokio::time::sleep_until(at).await;
                let addr = SocketAddr::from((vip, 8080));
                let sent = (at - start).as_secs_f64();
                tasks.push(tokio::task::spawn_blocking(move || {
                    (sent, get(addr).is_some())
                }));
                n += 1;
            }
            let mut out = Vec::new();
            for t in tasks {
                if let Ok(r) = t.await {
                    out.push(r);
                }
            }
            out
        })
    })
}

/// Samples both nodes' VIP ownership every 10 ms until `stop`: `(secs, lb1, lb2)`.
pub(crate) fn sample_vip(
    lan: &Lan,
    vip: Ipv4Addr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(f64, bool, bool)>> {
    let lan_ns: Vec<String> = NODES.iter().map(|n| lan.ns(n).to_owned()).collect();
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let held: Vec<bool> = lan_ns
                .iter()
                .map(|ns| {
                    flotilla_testkit::netns::ip(&[
                        "-n", ns, "-o", "-4", "addr", "show", "dev", "eth0",
                    ])
                    .map(|o| o.contains(&format!(" {vip}/")))
                    .unwrap_or(false)
                })
                .collect();
            out.push((start.elapsed().as_secs_f64(), held[0], held[1]));
            std::thread::sleep(Duration::from_millis(10));
        }
        out
    })
}

fn measure(lab: &mut Lab, fault: Fault, rate: u32) -> Result<Run> {
    lab.settle(Duration::from_secs(15))?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_vip(&lab.lan, lab.vip(), stop.clone());
    // Long enough for the slowest pair to fail over and back.
    let (dur, restore_after) = if lab.kind == Kind::KeepalivedDefault {
        (Duration::from_secs(12), Duration::from_secs(6))
    } else {
        (Duration::from_secs(5), Duration::from_secs(2))
    };
    let fault_at = Duration::from_secs(1);
    let load = client_load(&lab.lan, lab.vip(), rate, dur);
    std::thread::sleep(fault_at);
    match fault {
        Fault::Graceful => lab.terminate(0),
        Fault::Crash => lab.crash(0),
        Fault::NodeLoss => lab.lan.cut("lb1")?,
        Fault::Partition => {
            for n in NODES {
                lab.lan.block(n, 112)?;
            }
        }
    }
    std::thread::sleep(restore_after);
    match fault {
        Fault::Graceful | Fault::Crash => lab.start(0)?,
        Fault::NodeLoss => lab.lan.heal("lb1")?,
        Fault::Partition => {
            for n in NODES {
                lab.lan.unblock(n, 112)?;
            }
        }
    }
    let restored = (fault_at + restore_after).as_secs_f64();
    let results = load.join().map_err(|_| anyhow::anyhow!("client thread"))?;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().map_err(|_| anyhow::anyhow!("sampler"))?;
    let failed = results.iter().filter(|(_, ok)| !ok).count();
    // The failover gap: longest time between two successes before the restore.
    let mut oks: Vec<f64> = results
        .iter()
        .filter(|(t, ok)| *ok && *t < restored)
        .map(|(t, _)| *t)
        .collect();
    oks.sort_by(f64::total_cmp);
    let gap = oks.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    // Split brain after the restore: both hold the VIP (before it, a crashed or
    // isolated node may keep a stale VIP that nobody can reach).
    let step = 0.010;
    let after: Vec<_> = samples.iter().filter(|(t, _, _)| *t >= restored).collect();
    let dual = after.iter().filter(|(_, a, b)| *a && *b).count() as f64 * step;
    let back = (fault == Fault::Partition).then(|| {
        after
            .iter()
            .find(|(_, a, b)| !(*a && *b))
            .map(|(t, _, _)| (t - restored) * 1000.0)
            .unwrap_or(f64::NAN)
    });
    Ok(Run {
        kind: lab.kind,
        fault,
        gap_ms: gap * 1000.0,
        failed,
        sent: results.len(),
        dual_master_ms: dual * 1000.0,
        back_to_one_master_ms: back,
    })
}

/// Both cores busy for `secs` (bounded spinners); counts VIP moves in the meantime.
/// What the starvation check saw.
#[derive(Debug, Clone, Serialize)]
struct Starved {
    kind: Kind,
    vip_moves: usize,
    dual_ms: f64,
    gap_ms: f64,
    failed: usize,
    sent: usize,
}

fn starvation(lab: &mut Lab, secs: u64, rate: u32) -> Result<Starved> {
    lab.settle(Duration::from_secs(15))?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_vip(&lab.lan, lab.vip(), stop.clone());
    // The client keeps sending through the starvation (it is starved too, so slow
    // answers count as failures only past its 1 s timeout).
    let load = client_load(&lab.lan, lab.vip(), rate, Duration::from_secs(secs));
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let until = Instant::now() + Duration::from_secs(secs);
    let spinners: Vec<_> = (0..cores * 2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut x = 0u64;
                while Instant::now() < until {
                    for _ in 0..10_000 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    }
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    for s in spinners {
        let _ = s.join();
    }
    let results = load.join().map_err(|_| anyhow::anyhow!("client thread"))?;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().map_err(|_| anyhow::anyhow!("sampler"))?;
    // A false failover shows as lb2 taking the VIP while lb1 is fine.
    let mut moves = 0;
    let mut prev = false;
    for (_, _, b) in &samples {
        if *b && !prev {
            moves += 1;
        }
        prev = *b;
    }
    let dual = samples.iter().filter(|(_, a, b)| *a && *b).count() as f64 * 10.0;
    let mut oks: Vec<f64> = results
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(t, _)| *t)
        .collect();
    oks.sort_by(f64::total_cmp);
    let gap = oks.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    Ok(Starved {
        kind: lab.kind,
        vip_moves: moves,
        dual_ms: dual,
        gap_ms: gap * 1000.0,
        failed: results.iter().filter(|(_, ok)| !ok).count(),
        sent: results.len(),
    })
}

/// Runs the benchmark.
pub async fn run(args: Args) -> Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(args))
        .await
        .context("failover benchmark thread")?
}

fn run_blocking(args: Args) -> Result<()> {
    let runs = if args.quick { 1 } else { args.runs };
    let starve = if args.quick { 15 } else { args.starve_secs };
    let dir = tempfile::tempdir()?;
    let mut all = Vec::new();
    let mut starving = Vec::new();
    for (k, kind) in [
        Kind::Flotilla,
        Kind::KeepalivedFast,
        Kind::KeepalivedDefault,
    ]
    .into_iter()
    .enumerate()
    {
        let sub = dir.path().join(format!("{kind:?}"));
        std::fs::create_dir_all(&sub)?;
        let mut lab = Lab::new(kind, 90 + k as u8, &sub)?;
        lab.start(0)?;
        std::thread::sleep(Duration::from_millis(200));
        lab.start(1)?;
        for fault in [
            Fault::Graceful,
            Fault::Crash,
            Fault::NodeLoss,
            Fault::Partition,
        ] {
            for _ in 0..runs {
                let r = measure(&mut lab, fault, args.rate)?;
                eprintln!(
                    "{} {:?}: gap {:.0} ms, {} failed of {}, dual master {:.0} ms{}",
                    kind.label(),
                    fault,
                    r.gap_ms,
                    r.failed,
                    r.sent,
                    r.dual_master_ms,
                    r.back_to_one_master_ms
                        .map(|b| format!(", one master {b:.0} ms after heal"))
                        .unwrap_or_default()
                );
                all.push(r);
            }
        }
        let st = starvation(&mut lab, starve, args.rate)?;
        eprintln!(
            "{} starvation {starve} s: {} VIP moves, gap {:.0} ms, {} failed of {}",
            kind.label(),
            st.vip_moves,
            st.gap_ms,
            st.failed,
            st.sent
        );
        starving.push(st);
    }
    println!(
        "\n### Failover, client at {} req/s to the VIP, median of {runs} run(s)\n",
        args.rate
    );
    println!("| pair | fault | failover gap ms | failed / sent | dual master after restore ms | one master after heal ms |\n|---|---|---|---|---|---|");
    for kind in [
        Kind::Flotilla,
        Kind::KeepalivedFast,
        Kind::KeepalivedDefault,
    ] {
        for fault in [
            Fault::Graceful,
            Fault::Crash,
            Fault::NodeLoss,
            Fault::Partition,
        ] {
            let mut rs: Vec<&Run> = all
                .iter()
                .filter(|r| r.kind == kind && r.fault == fault)
                .collect();
            rs.sort_by(|a, b| a.gap_ms.total_cmp(&b.gap_ms));
            let Some(m) = rs.get(rs.len() / 2) else {
                continue;
            };
            println!(
                "| {} | {:?} | {:.0} | {} / {} | {:.0} | {} |",
                kind.label(),
                fault,
                m.gap_ms,
                m.failed,
                m.sent,
                m.dual_master_ms,
                m.back_to_one_master_ms
                    .map(|b| format!("{b:.0}"))
                    .unwrap_or_else(|| "—".into())
            );
        }
    }
    println!("\n### Every core saturated for {starve} s (CPU starvation of the master)\n");
    println!("| pair | VIP moves to the backup (false failovers) | dual-master ms | longest gap ms | failed / sent |\n|---|---|---|---|---|");
    for st in &starving {
        println!(
            "| {} | {} | {:.0} | {:.0} | {} / {} |",
            st.kind.label(),
            st.vip_moves,
            st.dual_ms,
            st.gap_ms,
            st.failed,
            st.sent
        );
    }
    println!("\nmachine: {}", crate::procs::machine());
    if let Some(path) = args.json {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&serde_json::json!({
                "rate": args.rate,
                "runs": all,
                "starvation": starving,
            }))?,
        )?;
    }
    Ok(())
}
