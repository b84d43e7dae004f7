//! The container lifecycle, timed: deploy of N replicas on a warm image cache, backup
//! and restore throughput of a large volume against `tar | sha256sum` on the same data
//! (the disk-bound anchor, run in the same session), and migration between two Docker
//! engines that share nothing — stateful (cold, downtime measured) and stateless
//! (blue/green under open-loop load, failed requests counted).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_core::HealthStatus;
use flotilla_testkit::{docker, DockerNetwork, Dockerd};

use crate::procs::{flotilla_binary, machine, testsvc_image, ServerProc};

/// Flags of `flotilla-bench containers`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Replicas for the deploy timing.
    #[arg(long, default_value_t = 10)]
    replicas: u32,
    /// Volume size for backup/restore, MiB.
    #[arg(long, default_value_t = 1024)]
    volume_mib: u64,
    /// Volume size for the stateful migration, MiB.
    #[arg(long, default_value_t = 100)]
    migrate_mib: u64,
    /// Request rate during the stateless migration.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run the registry, agents and CLI over TLS (the cluster default) instead of
    /// plain HTTP: backup, restore and migration streams then cross mutual TLS.
    #[arg(long)]
    tls: bool,
}

async fn cli(server: &ServerProc, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(flotilla_binary()?)
        .args(args)
        .env("FLOTILLA_SERVER", &server.url)
        .env("FLOTILLA_TOKEN_FILE", &server.token_file)
        .env("RUST_LOG", "warn")
        .output()
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("flotilla {}: {text}", args.join(" "));
    }
    Ok(text)
}

fn write_spec(
    dir: &Path,
    stack: &str,
    network: &str,
    web: u32,
    web_image: Option<&str>,
    notes: bool,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("index.html"), "bench\n")?;
    std::fs::write(dir.join("health"), "ok\n")?;
    std::fs::write(
        dir.join("append.cgi"),
        "#!/bin/sh\nprintf '%s\\n' \"$QUERY_STRING\" >> /data/notes && sync && printf 'Content-Type: text/plain\\r\\n\\r\\nok\\n'\n",
    )?;
    let web_section = match web_image {
        Some(img) => format!(
            "[service.web]\nport = 8080\nreplicas = {web}\nnetwork = \"{network}\"\ncommand = [\"--listen\", \"0.0.0.0:8080\", \"--name\", \"web\"]\nhealth = {{ type = \"http\", path = \"/health\", interval = \"300ms\" }}\nupdate = {{ drain = \"1s\" }}\nimage = {{ base = \"image:{img}\" }}\n"
        ),
        None => format!(
            "[service.web]\nport = 8080\nreplicas = {web}\nnetwork = \"{network}\"\ncommand = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\nhealth = {{ type = \"http\", path = \"/health\", interval = \"300ms\" }}\nimage = {{ base = \"busybox\", file = [{{ src = \"index.html\", dest = \"/www/index.html\" }}, {{ src = \"health\", dest = \"/www/health\" }}] }}\n"
        ),
    };
    let mut spec = format!("name = \"{stack}\"\n\n{web_section}");
    if notes {
        spec.push_str(&format!(
            "\n[service.notes]\nport = 8081\nnetwork = \"{network}\"\ncommand = [\"httpd\", \"-f\", \"-p\", \"8081\", \"-h\", \"/www\"]\nhealth = {{ type = \"http\", path = \"/health\", interval = \"300ms\" }}\nimage = {{ base = \"busybox\", file = [{{ src = \"append.cgi\", dest = \"/www/cgi-bin/append\", mode = \"0755\" }}, {{ src = \"health\", dest = \"/www/health\" }}] }}\n[[service.notes.volume]]\nname = \"data\"\npath = \"/data\"\n"
        ));
    }
    let path = dir.join("stack.toml");
    std::fs::write(&path, spec)?;
    Ok(path)
}

async fn wait_nodes(server: &ServerProc, n: usize) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if server
            .client
            .nodes()
            .await
            .map(|l| l.len() == n && l.iter().all(|x| x.api.is_some()))
            .unwrap_or(false)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{n} agents did not register")
}

fn timed(cmd: &str) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let st = Command::new("sh").args(["-c", cmd]).status()?;
    anyhow::ensure!(st.success(), "{cmd} failed");
    Ok(t0.elapsed().as_secs_f64())
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Removes what the benchmark's stacks left on the engine (containers with their
/// volumes, the stacks' named volumes) when it is dropped: a run that fails half-way
/// leaves nothing behind either.
struct Leftovers(&'static [&'static str]);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for stack in self.0 {
            let label = format!("label=flotilla.stack={stack}");
            if let Ok(ids) = docker(&["ps", "-aq", "--filter", &label]) {
                for id in ids.split_whitespace() {
                    let _ = docker(&["rm", "-f", "-v", id]);
                }
            }
            if let Ok(vols) = docker(&["volume", "ls", "-q"]) {
                for v in vols
                    .split_whitespace()
                    .filter(|v| v.starts_with(&format!("{stack}-")))
                {
                    let _ = docker(&["volume", "rm", v]);
                }
            }
        }
    }
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine().into());
    report.insert("tls".into(), args.tls.into());
    let work = tempfile::tempdir()?;

    // --- Deploy of N replicas on a warm image cache, one engine.
    let server = ServerProc::start_with("127.0.0.1", args.tls).await?;
    let _agent = server.agent("bench-main")?;
    wait_nodes(&server, 1).await?;
    let net = DockerNetwork::create("flotilla-bench-ct")?;
    // Declared after the network, so dropped before it: whatever way the run ends, the
    // stacks' containers and volumes go first, then the network can.
    let _leftovers = Leftovers(&["benchdeploy", "benchbackup"]);
    let stack = "benchdeploy";
    let spec = write_spec(
        &work.path().join("deploy"),
        stack,
        &net.name,
        args.replicas,
        None,
        false,
    )?;
    let spec_s = spec.to_str().context("path")?;
    cli(&server, &["deploy", spec_s, "--timeout", "120s"]).await?; // warms the image cache
    cli(&server, &["rm", stack]).await?;
    let t0 = Instant::now();
    let out = cli(&server, &["deploy", spec_s, "--timeout", "120s"]).await?;
    let deploy_s = t0.elapsed().as_secs_f64();
    println!(
        "deploy of {} replicas to all passing (warm cache): {deploy_s:.2} s\n{out}",
        args.replicas
    );
    cli(&server, &["rm", stack]).await?;
    report.insert("deploy_replicas".into(), args.replicas.into());
    report.insert("deploy_seconds".into(), deploy_s.into());

    // --- Backup and restore of a large volume vs tar | sha256sum.
    let stack = "benchbackup";
    let spec = write_spec(&work.path().join("backup"), stack, &net.name, 1, None, true)?;
    cli(
        &server,
        &[
            "deploy",
            spec.to_str().context("path")?,
            "--timeout",
            "120s",
        ],
    )
    .await?;
    let container = docker(&[
        "ps",
        "-q",
        "--filter",
        "label=flotilla.stack=benchbackup",
        "--filter",
        "label=flotilla.service=notes",
    ])?;
    let container = container
        .lines()
        .next()
        .context("notes container")?
        .to_owned();
    // Incompressible data in 64 MiB files.
    docker(&["exec", &container, "sh", "-c", &format!(
        "i=0; while [ $i -lt {} ]; do dd if=/dev/urandom of=/data/f$i bs=1M count=64 2>/dev/null; i=$((i+1)); done; sync",
        args.volume_mib.div_ceil(64)
    )])?;
    let mountpoint = docker(&[
        "volume",
        "inspect",
        "-f",
        "{{.Mountpoint}}",
        "benchbackup-notes-0-data",
    ])?;
    let bytes: u64 = docker(&["exec", &container, "sh", "-c", "du -sk /data | cut -f1"])?
        .trim()
        .parse::<u64>()?
        * 1024;
    let mib = bytes as f64 / 1048576.0;
    drop_caches();
    let tar_s = timed(&format!(
        "tar -C {mountpoint} -cf - . | sha256sum > /dev/null"
    ))?;
    let tar_rate = mib / tar_s;
    let name = docker(&["inspect", "-f", "{{.Name}}", &container])?
        .trim_start_matches('/')
        .to_owned();
    let bdir = work.path().join("archives");
    drop_caches();
    let t0 = Instant::now();
    cli(
        &server,
        &[
            "backup",
            &name,
            "--to",
            bdir.to_str().context("path")?,
            "--consistency",
            "pause",
        ],
    )
    .await?;
    let backup_s = t0.elapsed().as_secs_f64();
    let archive = std::fs::read_dir(&bdir)?.next().context("archive")??.path();
    let archive_s = archive.to_str().context("path")?.to_owned();
    // Restore's anchor: checking the archive and unpacking it (sha256sum, then tar -x).
    let unpack = work.path().join("unpack");
    std::fs::create_dir_all(&unpack)?;
    drop_caches();
    let untar_s = timed(&format!(
        "sha256sum {archive_s} > /dev/null && tar -C {} -xf {archive_s} && sync",
        unpack.display()
    ))?;
    std::fs::remove_dir_all(&unpack)?;
    drop_caches();
    let t0 = Instant::now();
    cli(
        &server,
        &["restore", &archive_s, "--name", "benchbackup-restored"],
    )
    .await?;
    let restore_s = t0.elapsed().as_secs_f64();
    let _ = docker(&["rm", "-f", "benchbackup-restored"]);
    let _ = docker(&["volume", "rm", "benchbackup-restored-0"]);
    cli(&server, &["rm", stack]).await?;
    let _ = docker(&["volume", "rm", "benchbackup-notes-0-data"]);
    println!(
        "volume {mib:.0} MiB: tar|sha256sum {:.0} MiB/s; flotilla backup {:.0} MiB/s ({:.2}x); sha256sum+tar -x {:.0} MiB/s; flotilla restore {:.0} MiB/s ({:.2}x)",
        tar_rate,
        mib / backup_s,
        (mib / backup_s) / tar_rate,
        mib / untar_s,
        mib / restore_s,
        (mib / restore_s) / tar_rate
    );
    for (k, v) in [
        ("volume_mib", mib),
        ("tar_sha256_mib_s", tar_rate),
        ("backup_mib_s", mib / backup_s),
        ("backup_ratio", (mib / backup_s) / tar_rate),
        ("sha256_untar_mib_s", mib / untar_s),
        ("restore_mib_s", mib / restore_s),
        ("restore_ratio", (mib / restore_s) / tar_rate),
    ] {
        report.insert(k.into(), v.into());
    }
    drop(_agent);
    drop(server);

    // --- Migration between two engines that share nothing.
    let image = testsvc_image().await?;
    let da = Dockerd::start("bench-a")?;
    let db = Dockerd::start("bench-b")?;
    let server = ServerProc::start_with("127.0.0.1", args.tls).await?;
    let net_name = "flotilla-bench-mig";
    let _na = DockerNetwork::create_on(Some(&da.host), net_name)?;
    let _nb = DockerNetwork::create_on(Some(&db.host), net_name)?;
    let _a = server.agent_on("bench-a", &da.host)?;
    let _b = server.agent_on("bench-b", &db.host)?;
    wait_nodes(&server, 2).await?;
    let stack = "benchmig";
    let spec = write_spec(
        &work.path().join("mig"),
        stack,
        net_name,
        2,
        Some(&image),
        true,
    )?;
    cli(
        &server,
        &[
            "deploy",
            spec.to_str().context("path")?,
            "--timeout",
            "120s",
        ],
    )
    .await?;
    let instances = server.client.instances().await?;
    let notes = instances
        .iter()
        .find(|i| i.service == "notes")
        .context("notes")?
        .clone();
    let (notes_host, other) = if notes.node.as_deref() == Some("bench-a") {
        (&da, "bench-b")
    } else {
        (&db, "bench-a")
    };
    let cname = notes.meta.get("container_name").context("name")?.clone();
    notes_host.docker(&[
        "exec",
        &cname,
        "sh",
        "-c",
        &format!(
            "/bin/busybox dd if=/dev/urandom of=/data/blob bs=1M count={} 2>/dev/null; sync",
            args.migrate_mib
        ),
    ])?;
    let out = cli(&server, &["migrate", &notes.id, "--to", other]).await?;
    let downtime: f64 = out
        .split("downtime ")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse().ok())
        .context("downtime in the output")?;
    println!(
        "stateful migration, {} MiB volume: downtime {downtime:.2} s\n{out}",
        args.migrate_mib
    );
    report.insert("stateful_mib".into(), args.migrate_mib.into());
    report.insert("stateful_downtime_s".into(), downtime.into());

    // Stateless: a web replica moves while an lb in front of both takes `rate` req/s.
    let lb_text = format!(
        "[admin]\nlisten = \"\"\n[registry]\nurl = \"{}\"\ntoken_file = \"{}\"\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nscheduler = \"round-robin\"\nservice = \"web\"\nslow_start = \"0s\"\n",
        server.url,
        server.token_file.display()
    );
    let lb_config: flotilla_lb::config::LbConfig =
        flotilla_core::config::parse_toml(Path::new("bench.toml"), &lb_text)?;
    let lb = flotilla_lb::start(lb_config).await?;
    let t0 = Instant::now();
    while lb.listeners[0].backends().len() < 2 {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(15),
            "lb never saw both web replicas"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("http://{}/", lb.addrs[0]);
    let (total, failed, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let load = {
        let (total, failed, stop) = (total.clone(), failed.clone(), stop.clone());
        let period = Duration::from_micros(1_000_000 / args.rate.max(1));
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client");
            let mut tick = tokio::time::interval(period);
            let mut set = tokio::task::JoinSet::new();
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                tick.tick().await;
                let (http, url, total, failed) =
                    (http.clone(), url.clone(), total.clone(), failed.clone());
                set.spawn(async move {
                    let ok =
                        matches!(http.get(&url).send().await, Ok(r) if r.status().is_success());
                    total.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            while set.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let web = server
        .client
        .instances()
        .await?
        .into_iter()
        .find(|i| i.service == "web" && i.health == HealthStatus::Passing)
        .context("web")?;
    let to = if web.node.as_deref() == Some("bench-a") {
        "bench-b"
    } else {
        "bench-a"
    };
    let out = cli(&server, &["migrate", &web.id, "--to", to]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    load.await?;
    let (total, failed) = (
        total.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!(
        "stateless migration at {} req/s: {total} requests, {failed} failed\n{out}",
        args.rate
    );
    report.insert("stateless_rate".into(), args.rate.into());
    report.insert("stateless_requests".into(), total.into());
    report.insert("stateless_failed".into(), failed.into());
    lb.shutdown().await;

    println!("\n| figure | value | target |\n|---|---|---|");
    println!(
        "| deploy {} replicas (warm cache) | {deploy_s:.2} s | ≤ 10 s |",
        args.replicas
    );
    println!("| backup {mib:.0} MiB | {:.0} MiB/s = {:.2}× tar\\|sha256sum ({tar_rate:.0} MiB/s) | ≥ 0.8× |", mib / backup_s, (mib / backup_s) / tar_rate);
    println!(
        "| restore {mib:.0} MiB | {:.0} MiB/s = {:.2}× tar\\|sha256sum | ≥ 0.8× |",
        mib / restore_s,
        (mib / restore_s) / tar_rate
    );
    println!(
        "| stateful migration {} MiB | downtime {downtime:.2} s | ≤ 2 s |",
        args.migrate_mib
    );
    println!(
        "| stateless migration at {} req/s | {failed} failed of {total} | 0 |",
        args.rate
    );
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
