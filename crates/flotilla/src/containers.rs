//! The container lifecycle commands: `build`, `deploy`, `scale`, `rm`, `backup`,
//! `restore`, `migrate`.
//!
//! The CLI builds images itself (no registry: the archives go straight to the agents
//! that run them), writes desired state to the server, and moves backup data directly
//! between agents (and this machine), never through the server.

use crate::home::usage;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flotilla_agent::build::{build_service, Built};
use flotilla_client::agent::{AgentClient, BackupQuery, RestoreQuery};
use flotilla_client::migrate::{self, passing_of, MigrateOptions};
use flotilla_client::Client;
use flotilla_core::stack::{Consistency, DeployedService, StackSpec};
use flotilla_core::{InstanceView, NodeView};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::agent_api::{agent_of, token_of, AgentCreds};
use crate::cli::{BackupArgs, BuildArgs, DeployArgs, MigrateArgs, RestoreArgs, RmArgs, ScaleArgs};
use crate::home::client;

/// Build time: `SOURCE_DATE_EPOCH` (reproducible builds) or now.
fn build_time() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| flotilla_core::record::unix_ms() / 1000)
}

/// A stack spec, or a Compose file converted to one (what it could not carry is
/// printed as warnings), with the directory its relative paths start from.
async fn load_spec(path: &Path, docker: &str) -> anyhow::Result<(StackSpec, PathBuf)> {
    let spec = if flotilla_compose::is_compose_file(path) {
        let c = crate::compose::convert_file(path, None, docker).await?;
        crate::compose::warn_not_carried(path, &c.not_carried);
        c.spec
    } else {
        StackSpec::load(path).map_err(usage)?
    };
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((spec, dir))
}

async fn build_all(
    spec: &StackSpec,
    dir: &Path,
    docker: &str,
) -> anyhow::Result<BTreeMap<String, Built>> {
    let needs_docker = spec
        .services
        .values()
        .filter_map(|s| s.image.built())
        .any(|b| b.base.starts_with("image:"));
    let engine = if needs_docker {
        Some(flotilla_agent::docker::connect(docker).await?)
    } else {
        None
    };
    let created = build_time();
    let mut out = BTreeMap::new();
    for (name, svc) in spec
        .services
        .iter()
        .filter(|(_, s)| s.image.built().is_some())
    {
        let built = build_service(engine.as_ref(), &spec.name, name, svc, dir, created)
            .await
            .map_err(|e| {
                // A missing file is the spec's fault: exit 2.
                if e.to_string().contains("cannot read") {
                    usage(format!("{e:#}"))
                } else {
                    e
                }
            })?;
        out.insert(name.clone(), built);
    }
    Ok(out)
}

/// The demo stack shipped in the binary (examples/demo), so `flotilla up` works from
/// any directory.
const DEMO: &[(&str, &str)] = &[
    (
        "stack.toml",
        include_str!("../../../examples/demo/stack.toml"),
    ),
    (
        "www/index.html",
        include_str!("../../../examples/demo/www/index.html"),
    ),
    (
        "www/health",
        include_str!("../../../examples/demo/www/health"),
    ),
    (
        "notes/append.cgi",
        include_str!("../../../examples/demo/notes/append.cgi"),
    ),
    (
        "notes/read.cgi",
        include_str!("../../../examples/demo/notes/read.cgi"),
    ),
];

/// Writes the demo stack's files under `dir`.
pub fn write_demo(dir: &Path) -> anyhow::Result<()> {
    for (name, text) in DEMO {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
    }
    Ok(())
}

/// `flotilla build SPEC`.
pub async fn build(args: BuildArgs) -> anyhow::Result<()> {
    let (spec, dir) = load_spec(&args.spec, &args.docker).await?;
    let built = build_all(&spec, &dir, &args.docker).await?;
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)?;
    }
    let engine = if args.out.is_none() {
        Some(flotilla_agent::docker::connect(&args.docker).await?)
    } else {
        None
    };
    let mut rows = Vec::new();
    for (name, b) in built {
        let file = match (&args.out, &engine) {
            (Some(dir), _) => {
                let file = dir.join(format!("{}-{name}.tar", spec.name));
                let mut out = std::io::BufWriter::new(
                    std::fs::File::create(&file)
                        .with_context(|| format!("creating {}", file.display()))?,
                );
                std::io::copy(&mut b.archive.reader(), &mut out)
                    .and_then(|_| std::io::Write::flush(&mut out))
                    .with_context(|| format!("writing {}", file.display()))?;
                if !args.json {
                    println!("{name}: {} {} -> {}", b.tag, b.id, file.display());
                }
                Some(file)
            }
            (None, Some(d)) => {
                flotilla_agent::build::load(d, &b.archive).await?;
                if !args.json {
                    println!(
                        "{name}: {} {} ({} layers, spec {})",
                        b.tag,
                        b.id,
                        b.diff_ids.len(),
                        &b.spec_hash[..12]
                    );
                }
                None
            }
            _ => unreachable!(),
        };
        rows.push(serde_json::json!({
            "service": name,
            "tag": b.tag,
            "id": b.id,
            "layers": b.diff_ids.len(),
            "spec_hash": b.spec_hash,
            "file": file,
        }));
    }
    for (name, s) in &spec.services {
        let Some(r) = s.image.registry() else {
            continue;
        };
        if !args.json {
            println!("{name}: {r} (a registry image: each agent pulls it at deploy)");
        }
        rows.push(serde_json::json!({ "service": name, "registry_image": r.as_str() }));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

/// A registry image as every node pulled it.
struct PulledImage {
    /// Pinned to the digest the first node got (`REPO@sha256:…`).
    pinned: String,
    id: String,
}

/// Has every live node's agent pull each registry image of the stack, the first by the
/// reference as written and the rest by the digest it resolved to, so all nodes run
/// the same bytes. Any failure stops the deploy before anything is stored, naming the
/// image, the node and the registry's answer.
async fn pull_images(
    spec: &StackSpec,
    nodes: &[NodeView],
    token: &AgentCreds,
    quiet: bool,
) -> anyhow::Result<BTreeMap<String, PulledImage>> {
    let mut out = BTreeMap::new();
    for (name, s) in &spec.services {
        let Some(image) = s.image.registry() else {
            continue;
        };
        let mut first: Option<PulledImage> = None;
        for n in nodes {
            let Ok(api) = agent_of(n, token) else {
                continue;
            };
            let asked = first.as_ref().map_or(image.as_str(), |p| p.pinned.as_str());
            let t0 = Instant::now();
            let got = api.pull_image(asked).await.map_err(|e| {
                anyhow::anyhow!(
                    "service.{name}.image: pulling {asked} on node {}: {e}",
                    n.name
                )
            })?;
            if !quiet {
                println!(
                    "{name}: node {} has {} ({:.1} s)",
                    n.name,
                    got.pinned,
                    t0.elapsed().as_secs_f64()
                );
            }
            first.get_or_insert(PulledImage {
                pinned: got.pinned,
                id: got.id,
            });
        }
        let pulled = first.with_context(|| {
            format!("service.{name}.image: no live node serves an agent API to pull {image}")
        })?;
        out.insert(name.clone(), pulled);
    }
    Ok(out)
}

/// Sends each image to every live node that lacks it, one node at a time, showing the
/// transfer (a progress bar on a terminal; a line per node unless `quiet`). Each
/// archive is read from its layer files as it is sent: never whole in memory.
async fn push_images(
    nodes: &[NodeView],
    token: &AgentCreds,
    built: &BTreeMap<String, Built>,
    quiet: bool,
) -> anyhow::Result<()> {
    for n in nodes {
        let Ok(api) = agent_of(n, token) else {
            eprintln!(
                "warning: node {} serves no agent API; it cannot run deployed replicas",
                n.name
            );
            continue;
        };
        for (name, b) in built.iter() {
            if api.has_image(&b.tag).await? {
                continue;
            }
            let total = b.archive.len();
            let pb = if quiet {
                indicatif::ProgressBar::hidden()
            } else {
                progress(&format!("{name}: sending {} to node {}", b.tag, n.name))
            };
            pb.set_length(total);
            // Drawn now: a small image is sent before the first steady tick.
            pb.tick();
            let t0 = Instant::now();
            let pb_sent = pb.clone();
            let body = flotilla_agent::build::archive_stream(&b.archive).inspect(move |c| {
                if let Ok(c) = c {
                    pb_sent.inc(c.len() as u64);
                }
            });
            api.load_image(reqwest::Body::wrap_stream(body))
                .await
                .with_context(|| format!("sending {} to node {}", b.tag, n.name))?;
            pb.finish_and_clear();
            if !quiet {
                let secs = t0.elapsed().as_secs_f64();
                println!(
                    "{name}: node {} loaded {} ({:.1} MB in {secs:.1} s, {:.0} MB/s)",
                    n.name,
                    b.tag,
                    total as f64 / 1e6,
                    total as f64 / 1e6 / secs.max(1e-3)
                );
            }
        }
    }
    Ok(())
}

/// The secret values of every service that has some, read from their files (relative
/// to the spec's directory; one trailing newline dropped). The error names the service,
/// the variable and the file.
fn read_secrets(
    spec: &flotilla_core::stack::StackSpec,
    dir: &Path,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, String>>> {
    let mut out = BTreeMap::new();
    for (service, s) in &spec.services {
        if s.secret_env.is_empty() {
            continue;
        }
        let mut values = BTreeMap::new();
        for (name, src) in &s.secret_env {
            let file = dir.join(&src.file);
            let mut v = std::fs::read_to_string(&file).map_err(|e| {
                usage(format!(
                    "service.{service}.secret_env.{name}: {}: {e}",
                    file.display()
                ))
            })?;
            if v.ends_with('\n') {
                v.pop();
            }
            values.insert(name.clone(), v);
        }
        out.insert(service.clone(), values);
    }
    Ok(out)
}

/// Deploys a stack file: builds, distributes images, stores the desired state, and
/// (with `wait`) waits until every replica of the new version passes; prints progress
/// unless `quiet`.
pub async fn deploy_file(
    c: &Client,
    token: &AgentCreds,
    path: &Path,
    docker: &str,
    wait: Option<Duration>,
    quiet: bool,
) -> anyhow::Result<Deployed> {
    let (spec, dir) = load_spec(path, docker).await?;
    // Secret values are read before anything is built or sent: a missing file stops the
    // deploy with nothing changed.
    let secrets = read_secrets(&spec, &dir)?;
    let built = build_all(&spec, &dir, docker).await?;
    let nodes = c.nodes().await?;
    if nodes.is_empty() {
        bail!("no live nodes: start an agent first");
    }
    for (name, s) in &spec.services {
        let field = format!("service.{name}");
        for w in flotilla_core::recovery::warnings(&field, s) {
            eprintln!("warning: {w}");
        }
        let others = nodes.len().saturating_sub(1);
        if let Some(b) = s.backup.as_ref().filter(|b| b.copies as usize > others) {
            eprintln!(
                "warning: {field}.backup.copies = {} but only {others} other nodes are live: \
                 each backup is copied to {others} (more as nodes join)",
                b.copies
            );
        }
    }
    let pulled = pull_images(&spec, &nodes, token, quiet).await?;
    // Stored apart from the stack, before it: the agents find them when they create
    // the replicas.
    for (service, values) in &secrets {
        c.put_secrets(&spec.name, service, values)
            .await
            .with_context(|| format!("storing the secrets of service {service}"))?;
    }
    push_images(&nodes, token, &built, quiet).await?;
    let services: BTreeMap<String, DeployedService> = spec
        .services
        .iter()
        .map(|(name, s)| {
            let (image, image_id, spec_hash) = match (built.get(name), pulled.get(name)) {
                (Some(b), _) => (b.tag.clone(), b.id.clone(), b.spec_hash.clone()),
                // The same spec on a moved tag is a new version: its replicas roll.
                (None, Some(p)) => (
                    p.pinned.clone(),
                    p.id.clone(),
                    flotilla_core::stack::registry_spec_hash(s, &p.id),
                ),
                (None, None) => unreachable!("every service is built or pulled"),
            };
            (
                name.clone(),
                DeployedService {
                    spec: s.clone(),
                    image,
                    image_id,
                    spec_hash,
                    pins: Default::default(),
                },
            )
        })
        .collect();
    let r = c.deploy(&spec.name, &services).await?;
    let mut done = Deployed {
        stack: spec.name.clone(),
        generation: r["generation"].as_u64().unwrap_or(0),
        services: services.keys().cloned().collect(),
        converged_s: None,
    };
    if !quiet {
        println!(
            "stack {} generation {} stored; {} services",
            done.stack,
            done.generation,
            done.services.len()
        );
    }
    if let Some(within) = wait {
        done.converged_s = Some(wait_converged(c, &spec.name, within, quiet).await?);
    }
    Ok(done)
}

/// What `deploy` did (`--json`).
#[derive(Debug, serde::Serialize)]
pub struct Deployed {
    /// The stack.
    pub stack: String,
    /// Its generation now.
    pub generation: u64,
    /// Its services.
    pub services: Vec<String>,
    /// Seconds until every replica passed (not waited for with `--detach`).
    pub converged_s: Option<f64>,
}

/// Waits until every service of the stack has `replicas` passing instances of its
/// desired version (printing progress unless `quiet`); fails if the server records a
/// rollback. Returns how long it took, in seconds.
pub async fn wait_converged(
    c: &Client,
    stack: &str,
    within: Duration,
    quiet: bool,
) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let mut last = String::new();
    loop {
        let rec = c.stack(stack).await?;
        if let Some(why) = &rec.rolled_back {
            bail!("update rolled back: {why}");
        }
        let list = c.instances().await?;
        let mut done = true;
        let mut status = Vec::new();
        for (name, svc) in &rec.services {
            let n = passing_of(&list, stack, name, &svc.spec_hash).len() as u32;
            done &= n >= svc.spec.replicas;
            status.push(format!("{name} {n}/{}", svc.spec.replicas));
        }
        let line = status.join(", ");
        if line != last {
            if !quiet {
                println!("  {:>5.1}s  {line}", t0.elapsed().as_secs_f64());
            }
            last = line;
        }
        if done {
            let secs = t0.elapsed().as_secs_f64();
            if !quiet {
                println!("stack {stack} converged in {secs:.1}s");
            }
            return Ok(secs);
        }
        if t0.elapsed() > within {
            bail!(
                "stack {stack} did not converge within {}",
                humantime::format_duration(within)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `flotilla deploy SPEC`.
pub async fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    let c = client(&args.client)?;
    let token = token_of(&args.client)?;
    let wait = (!args.detach).then_some(args.timeout.into());
    let json = args.client.json;
    let done = deploy_file(&c, &token, &args.spec, &args.docker, wait, json).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    }
    Ok(())
}

/// Finds the stack that has `service` (or `stack` if given).
async fn stack_of(c: &Client, stack: Option<&str>, service: &str) -> anyhow::Result<String> {
    let (_, stacks) = c.stacks(0, Duration::ZERO).await?;
    let found: Vec<&str> = stacks
        .iter()
        .filter(|s| stack.is_none_or(|n| n == s.name) && s.services.contains_key(service))
        .map(|s| s.name.as_str())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(usage(format!(
            "no deployed stack has a service {service:?}"
        ))),
        many => Err(usage(format!(
            "service {service:?} is in stacks {}: say which with --stack",
            many.join(", ")
        ))),
    }
}

/// `flotilla scale SVC=N ...`.
pub async fn scale(args: ScaleArgs) -> anyhow::Result<()> {
    let c = client(&args.client)?;
    let mut plan = Vec::new();
    for a in &args.assignments {
        let (svc, n) = a
            .split_once('=')
            .ok_or_else(|| usage(format!("{a:?}: expected SERVICE=REPLICAS")))?;
        let n: u32 = n
            .parse()
            .map_err(|_| usage(format!("{a:?}: {n:?} is not a replica count")))?;
        let stack = stack_of(&c, args.stack.as_deref(), svc).await?;
        plan.push((stack, svc.to_owned(), n));
    }
    let json = args.client.json;
    let mut scaled = Vec::new();
    for (stack, svc, n) in &plan {
        c.scale(stack, svc, *n).await?;
        if !json {
            println!("{stack}/{svc}: replicas = {n}");
        }
        scaled.push(serde_json::json!({ "stack": stack, "service": svc, "replicas": n }));
    }
    let mut converged = BTreeMap::new();
    if !args.detach {
        for stack in plan
            .iter()
            .map(|p| &p.0)
            .collect::<std::collections::BTreeSet<_>>()
        {
            let secs = wait_converged(&c, stack, args.timeout.into(), json).await?;
            converged.insert(stack.clone(), secs);
        }
    }
    if json {
        let out = serde_json::json!({ "scaled": scaled, "converged_s": converged });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// `flotilla rm STACK`.
pub async fn rm(args: RmArgs) -> anyhow::Result<()> {
    let c = client(&args.client)?;
    let stack = args.stack.clone().context("a stack name")?;
    c.remove_stack(&stack).await?;
    let json = args.client.json;
    if !json {
        println!(
            "stack {} removed from the desired state; waiting for its replicas to stop",
            stack
        );
    }
    let t0 = Instant::now();
    let token = token_of(&args.client)?;
    loop {
        let left = c
            .instances()
            .await?
            .into_iter()
            .filter(|i| i.meta.get("stack") == Some(&stack))
            .count();
        // Deregistered is not gone: a replica drains (deregistered, still running)
        // before its container is removed. Done when every node's agent has none left.
        let containers = if left == 0 {
            stack_containers_left(&c, &token, &stack).await?
        } else {
            Vec::new()
        };
        if left == 0 && containers.is_empty() {
            let secs = t0.elapsed().as_secs_f64();
            if json {
                let out = serde_json::json!({ "stack": stack, "gone_s": secs });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "stack {stack} is gone ({secs:.1}s): its containers and networks removed, its volumes kept"
                );
            }
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            if left > 0 {
                bail!(
                    "{left} instances of stack {} are still registered after 60s",
                    stack
                );
            }
            bail!(
                "stack {}: containers still on their engines after 60s: {}",
                stack,
                containers.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Containers of `stack` that still exist, on every live node's engine, as
/// `node/container` (a node that serves no agent API cannot be asked and is skipped).
async fn stack_containers_left(
    c: &Client,
    token: &AgentCreds,
    stack: &str,
) -> anyhow::Result<Vec<String>> {
    let mut left = Vec::new();
    for node in c.nodes().await? {
        let Ok(agent) = agent_of(&node, token) else {
            continue;
        };
        for name in agent.stack_containers(stack).await?.containers {
            left.push(format!("{}/{name}", node.name));
        }
    }
    Ok(left)
}

/// Resolves an instance by registry id or container name; a service name gives all of
/// its instances.
pub(crate) async fn resolve(c: &Client, what: &str) -> anyhow::Result<Vec<InstanceView>> {
    let list = c.instances().await?;
    let exact: Vec<InstanceView> = list
        .iter()
        .filter(|i| i.id == what || i.meta.get("container_name").map(String::as_str) == Some(what))
        .cloned()
        .collect();
    if !exact.is_empty() {
        return Ok(exact);
    }
    let of_service: Vec<InstanceView> = list.into_iter().filter(|i| i.service == what).collect();
    if of_service.is_empty() {
        return Err(usage(format!(
            "no instance, container or service named {what:?}"
        )));
    }
    Ok(of_service)
}

pub(crate) async fn node_of(c: &Client, name: &str) -> anyhow::Result<NodeView> {
    c.nodes()
        .await?
        .into_iter()
        .find(|n| n.name == name)
        .ok_or_else(|| usage(format!("no live node {name:?}")))
}

pub(crate) fn container_of(i: &InstanceView) -> anyhow::Result<String> {
    flotilla_client::migrate::container_of(i)
        .with_context(|| format!("instance {} is not a container", i.id))
}

fn progress(label: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} {bytes} ({bytes_per_sec}) {elapsed}",
        )
        .expect("template"),
    );
    pb.set_message(label.to_owned());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// `flotilla backup INSTANCE|SERVICE`.
pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let c = client(&args.client)?;
    let token = token_of(&args.client)?;
    let dir = args.to.clone().unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rows = Vec::new();
    for inst in resolve(&c, &args.instance).await? {
        let node = node_of(&c, inst.node.as_deref().unwrap_or_default()).await?;
        let api = agent_of(&node, &token)?;
        let container = container_of(&inst)?;
        let name = inst
            .meta
            .get("container_name")
            .cloned()
            .unwrap_or(container.clone());
        let stamp = flotilla_core::record::file_stamp(flotilla_core::record::unix_ms());
        let file = dir.join(format!("{name}-{stamp}.flotilla-backup"));
        let t0 = Instant::now();
        let manifest = fetch_backup(
            &api,
            &container,
            args.consistency,
            !args.no_image,
            args.with_secrets,
            &file,
            args.verify,
        )
        .await?;
        let secs = t0.elapsed().as_secs_f64();
        let size = std::fs::metadata(&file)?.len();
        let mib = size as f64 / 1048576.0;
        if args.client.json {
            rows.push(serde_json::json!({
                "instance": inst.id,
                "archive": file,
                "parts": manifest.parts.len(),
                "bytes": size,
                "consistency": manifest.consistency,
                "seconds": secs,
            }));
            continue;
        }
        println!(
            "{}: {} ({} parts, {mib:.1} MiB, {} , {secs:.1}s, {:.0} MiB/s)",
            inst.id,
            file.display(),
            manifest.parts.len(),
            manifest.consistency,
            mib / secs.max(1e-9)
        );
    }
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

/// Streams a backup from an agent into `file`, checking it on the way; on any failure
/// the partial file is removed.
async fn fetch_backup(
    api: &AgentClient,
    container: &str,
    consistency: Consistency,
    image: bool,
    with_secrets: bool,
    file: &Path,
    full_check: bool,
) -> anyhow::Result<flotilla_archive::Manifest> {
    let part = file.with_extension("partial");
    let result = async {
        let resp = api
            .backup(&BackupQuery {
                consistency: Some(consistency),
                image,
                secrets: with_secrets,
                ..BackupQuery::of(container)
            })
            .await
            .with_context(|| format!("backup of {container}"))?;
        let (tx, r) = flotilla_archive::backup::ChannelReader::<bytes::Bytes>::new(16);
        let checker = std::thread::spawn(move || {
            if full_check {
                flotilla_archive::backup::verify(r)
            } else {
                flotilla_archive::backup::check_structure(r)
            }
        });
        let mut out = tokio::fs::File::from_std(flotilla_archive::create_archive_file(&part)?);
        let pb = progress(&format!("backup {container}"));
        let mut s = resp.bytes_stream();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.context("the backup stream broke off")?;
            pb.inc(chunk.len() as u64);
            out.write_all(&chunk).await?;
            if tx.send(chunk).is_err() {
                break; // the checker already failed; its error is reported below
            }
        }
        drop(tx);
        out.sync_all().await?;
        pb.finish_and_clear();
        let manifest = checker
            .join()
            .map_err(|_| anyhow::anyhow!("archive checker panicked"))?
            .context("the received archive failed its check")?;
        tokio::fs::rename(&part, file).await?;
        Ok(manifest)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&part).await;
    }
    result
}

/// `flotilla restore ARCHIVE`.
pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let c = client(&args.client)?;
    let token = token_of(&args.client)?;
    // Check locally first: a bad archive is not even sent.
    let path = args.archive.clone();
    let manifest = tokio::task::spawn_blocking(move || flotilla_agent::backup::verify_file(&path))
        .await?
        .map_err(|e| usage(format!("{e:#}")))?;
    let nodes = c.nodes().await?;
    let node = match &args.node {
        Some(n) => node_of(&c, n).await?,
        None if nodes.len() == 1 => nodes[0].clone(),
        None => bail!("several nodes are up: say which with --node"),
    };
    let api = agent_of(&node, &token)?;
    let f = tokio::fs::File::open(&args.archive).await?;
    let len = f.metadata().await?.len();
    let pb = progress("restore");
    pb.set_length(len);
    let pb2 = pb.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).inspect(move |c| {
        if let Ok(b) = c {
            pb2.inc(b.len() as u64);
        }
    });
    let q = RestoreQuery {
        start: !args.no_start,
        name: args.name.clone(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let v = api.restore(&q, reqwest::Body::wrap_stream(stream)).await?;
    pb.finish_and_clear();
    if args.client.json {
        let out = serde_json::json!({
            "archive": args.archive,
            "node": node.name,
            "name": v.name,
            "id": v.id,
            "parts_checked": manifest.parts.len(),
            "bytes": v.bytes,
            "seconds": t0.elapsed().as_secs_f64(),
            "passing_after_ms": v.passing_after_ms,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "restored {} on {} as {} ({} parts checked, {:.1}s{})",
        args.archive.display(),
        node.name,
        v.name,
        manifest.parts.len(),
        t0.elapsed().as_secs_f64(),
        match v.passing_after_ms {
            Some(ms) => format!(", passing {ms} ms after start"),
            None => String::new(),
        }
    );
    Ok(())
}

/// `flotilla migrate INSTANCE --to NODE`: finds the instance, then
/// [`flotilla_client::migrate::migrate`] does the work.
pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let c = client(&args.client)?;
    let creds = token_of(&args.client)?;
    let inst = match resolve(&c, &args.instance).await?.as_slice() {
        [one] => one.clone(),
        many => bail!(
            "{:?} names {} instances: migrate one at a time (by id or container name)",
            args.instance,
            many.len()
        ),
    };
    let opts = MigrateOptions {
        drain: Some(args.drain.into()),
        ..Default::default()
    };
    let r = match migrate::migrate(&c, &creds.connector()?, &inst, &args.to, &opts).await {
        Ok(r) => r,
        Err(migrate::MigrateError::Invalid(m)) => return Err(usage(m)),
        Err(e) => return Err(e.into()),
    };
    if let Some(why) = &r.pre_copy_failed {
        eprintln!("warning: pre-copy failed, moved everything while stopped: {why}");
    }
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    match r.kind {
        migrate::MigrationKind::BlueGreen => println!(
            "migrated {} ({}, stateless) {} -> {}: blue/green, no downtime, {:.1}s",
            r.instance,
            r.replica.as_deref().unwrap_or(&r.service),
            r.from,
            r.to,
            r.total_s
        ),
        migrate::MigrationKind::Cold => println!(
            "migrated {} ({}) {} -> {} as {}: {:.1} MiB pre-copied while serving, {:.1} MiB moved while stopped, downtime {:.2}s ({}), total {:.1}s",
            r.instance,
            if r.stateful { "stateful, cold" } else { "stateless" },
            r.from,
            r.to,
            r.container.as_deref().unwrap_or("?"),
            mib(r.pre_copied_bytes),
            mib(r.final_bytes),
            r.downtime_s.unwrap_or(0.0),
            if r.stateful { "stopped → passing on the target" } else { "the source served until the target passed" },
            r.total_s
        ),
    }
    Ok(())
}
