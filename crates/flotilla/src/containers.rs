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
use flotilla_client::Client;
use flotilla_core::stack::{DeployedService, StackSpec};
use flotilla_core::{HealthStatus, InstanceView, NodeView};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::agent_api::{token_of, AgentApi, AgentCreds};
use crate::cli::{BackupArgs, BuildArgs, DeployArgs, MigrateArgs, RestoreArgs, RmArgs, ScaleArgs};
use crate::home::client;

/// Build time: `SOURCE_DATE_EPOCH` (reproducible builds) or now.
fn build_time() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| flotilla_core::record::unix_ms() / 1000)
}

fn load_spec(path: &Path) -> anyhow::Result<(StackSpec, PathBuf)> {
    let spec = StackSpec::load(path).map_err(usage)?;
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
        .any(|s| s.image.base.starts_with("image:"));
    let engine = if needs_docker {
        Some(flotilla_agent::docker::connect(docker).await?)
    } else {
        None
    };
    let created = build_time();
    let mut out = BTreeMap::new();
    for (name, svc) in &spec.services {
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
    let (spec, dir) = load_spec(&args.spec)?;
    let built = build_all(&spec, &dir, &args.docker).await?;
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)?;
    }
    let engine = if args.out.is_none() {
        Some(flotilla_agent::docker::connect(&args.docker).await?)
    } else {
        None
    };
    for (name, b) in built {
        match (&args.out, &engine) {
            (Some(dir), _) => {
                let file = dir.join(format!("{}-{name}.tar", spec.name));
                std::fs::write(&file, &b.archive)?;
                println!("{name}: {} {} -> {}", b.tag, b.id, file.display());
            }
            (None, Some(d)) => {
                flotilla_agent::build::load(d, b.archive).await?;
                println!(
                    "{name}: {} {} ({} layers, spec {})",
                    b.tag,
                    b.id,
                    b.diff_ids.len(),
                    &b.spec_hash[..12]
                );
            }
            _ => unreachable!(),
        }
    }
    Ok(())
}

/// Sends each image to every live node that lacks it.
async fn push_images(
    nodes: &[NodeView],
    token: &AgentCreds,
    built: &BTreeMap<String, Built>,
) -> anyhow::Result<()> {
    for n in nodes {
        let Ok(api) = AgentApi::of(n, token) else {
            eprintln!(
                "warning: node {} serves no agent API; it cannot run deployed replicas",
                n.name
            );
            continue;
        };
        for b in built.values() {
            if api.has_image(&b.tag).await? {
                continue;
            }
            api.json(
                api.req(reqwest::Method::POST, "/v1/images")
                    .body(b.archive.clone()),
            )
            .await
            .with_context(|| format!("sending {} to node {}", b.tag, n.name))?;
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
/// (unless `detach`) waits until every replica of the new version passes.
pub async fn deploy_file(
    c: &Client,
    token: &AgentCreds,
    path: &Path,
    docker: &str,
    wait: Option<Duration>,
) -> anyhow::Result<()> {
    let (spec, dir) = load_spec(path)?;
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
    // Stored apart from the stack, before it: the agents find them when they create
    // the replicas.
    for (service, values) in &secrets {
        c.put_secrets(&spec.name, service, values)
            .await
            .with_context(|| format!("storing the secrets of service {service}"))?;
    }
    push_images(&nodes, token, &built).await?;
    let services: BTreeMap<String, DeployedService> = spec
        .services
        .iter()
        .map(|(name, s)| {
            let b = &built[name];
            (
                name.clone(),
                DeployedService {
                    spec: s.clone(),
                    image: b.tag.clone(),
                    image_id: b.id.clone(),
                    spec_hash: b.spec_hash.clone(),
                    pins: Default::default(),
                },
            )
        })
        .collect();
    let r = c.deploy(&spec.name, &services).await?;
    println!(
        "stack {} generation {} stored; {} services",
        spec.name,
        r["generation"],
        services.len()
    );
    if let Some(within) = wait {
        wait_converged(c, &spec.name, within).await?;
    }
    Ok(())
}

/// Passing instances of `stack`'s `service` running version `hash`.
fn passing_of<'a>(
    list: &'a [InstanceView],
    stack: &str,
    service: &str,
    hash: &str,
) -> Vec<&'a InstanceView> {
    list.iter()
        .filter(|i| {
            i.service == service
                && i.meta.get("stack").map(String::as_str) == Some(stack)
                && i.meta
                    .get("spec")
                    .is_some_and(|s| hash.starts_with(s.as_str()))
                && i.health == HealthStatus::Passing
        })
        .collect()
}

/// Waits until every service of the stack has `replicas` passing instances of its
/// desired version; fails if the server records a rollback.
pub async fn wait_converged(c: &Client, stack: &str, within: Duration) -> anyhow::Result<()> {
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
            println!("  {:>5.1}s  {line}", t0.elapsed().as_secs_f64());
            last = line;
        }
        if done {
            println!(
                "stack {stack} converged in {:.1}s",
                t0.elapsed().as_secs_f64()
            );
            return Ok(());
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
    deploy_file(&c, &token, &args.spec, &args.docker, wait).await
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
    for (stack, svc, n) in &plan {
        c.scale(stack, svc, *n).await?;
        println!("{stack}/{svc}: replicas = {n}");
    }
    if !args.detach {
        for stack in plan
            .iter()
            .map(|p| &p.0)
            .collect::<std::collections::BTreeSet<_>>()
        {
            wait_converged(&c, stack, args.timeout.into()).await?;
        }
    }
    Ok(())
}

/// `flotilla rm STACK`.
pub async fn rm(args: RmArgs) -> anyhow::Result<()> {
    let c = client(&args.client)?;
    let stack = args.stack.clone().context("a stack name")?;
    c.remove_stack(&stack).await?;
    println!(
        "stack {} removed from the desired state; waiting for its replicas to stop",
        stack
    );
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
            println!(
                "stack {} is gone ({:.1}s): its containers and networks removed, its volumes kept",
                stack,
                t0.elapsed().as_secs_f64()
            );
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
        let Ok(agent) = AgentApi::of(&node, token) else {
            continue;
        };
        let reply = agent
            .json(agent.req(
                reqwest::Method::GET,
                &format!("/v1/stacks/{stack}/containers"),
            ))
            .await?;
        for name in reply["containers"].as_array().into_iter().flatten() {
            left.push(format!("{}/{}", node.name, name.as_str().unwrap_or("?")));
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
    i.meta
        .get("container_id")
        .or_else(|| i.meta.get("container_name"))
        .cloned()
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
    for inst in resolve(&c, &args.instance).await? {
        let node = node_of(&c, inst.node.as_deref().unwrap_or_default()).await?;
        let api = AgentApi::of(&node, &token)?;
        let container = container_of(&inst)?;
        let name = inst
            .meta
            .get("container_name")
            .cloned()
            .unwrap_or(container.clone());
        let stamp = flotilla_core::record::unix_ms();
        let file = dir.join(format!("{name}-{stamp}.flotilla-backup"));
        let t0 = Instant::now();
        let manifest = fetch_backup(
            &api,
            &container,
            &args.consistency,
            !args.no_image,
            args.with_secrets,
            &file,
            args.verify,
        )
        .await?;
        let secs = t0.elapsed().as_secs_f64();
        let size = std::fs::metadata(&file)?.len();
        println!(
            "{}: {} ({} parts, {:.1} MiB, {} , {:.1}s, {:.0} MiB/s)",
            inst.id,
            file.display(),
            manifest.parts.len(),
            size as f64 / 1048576.0,
            manifest.consistency,
            secs,
            size as f64 / 1048576.0 / secs.max(1e-9)
        );
    }
    Ok(())
}

/// Streams a backup from an agent into `file`, checking it on the way; on any failure
/// the partial file is removed.
async fn fetch_backup(
    api: &AgentApi,
    container: &str,
    consistency: &str,
    image: bool,
    with_secrets: bool,
    file: &Path,
    full_check: bool,
) -> anyhow::Result<flotilla_archive::Manifest> {
    let part = file.with_extension("partial");
    let result = async {
        let resp = api
            .req(reqwest::Method::GET, "/v1/backup")
            .query(&[
                ("container", container),
                ("consistency", consistency),
                ("image", if image { "true" } else { "false" }),
                ("secrets", if with_secrets { "true" } else { "false" }),
            ])
            .send()
            .await?;
        if !resp.status().is_success() {
            let v: serde_json::Value = resp.json().await.unwrap_or_default();
            bail!(
                "backup of {container}: {}",
                v["error"].as_str().unwrap_or("failed")
            );
        }
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
    let api = AgentApi::of(&node, &token)?;
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
    let mut q: Vec<(&str, String)> = vec![("start", (!args.no_start).to_string())];
    if let Some(n) = &args.name {
        q.push(("name", n.clone()));
    }
    let t0 = Instant::now();
    let v = api
        .json(
            api.req(reqwest::Method::POST, "/v1/restore")
                .query(&q)
                .timeout(Duration::from_secs(3600))
                .body(reqwest::Body::wrap_stream(stream)),
        )
        .await?;
    pb.finish_and_clear();
    println!(
        "restored {} on {} as {} ({} parts checked, {:.1}s{})",
        args.archive.display(),
        node.name,
        v["name"].as_str().unwrap_or("?"),
        manifest.parts.len(),
        t0.elapsed().as_secs_f64(),
        match v["passing_after_ms"].as_u64() {
            Some(ms) => format!(", passing {ms} ms after start"),
            None => String::new(),
        }
    );
    Ok(())
}

/// `flotilla migrate INSTANCE --to NODE`.
/// A migration's pre-copy: the source's snapshot id and the stopped copy on the target.
struct PreCopy {
    snapshot: String,
    copy: String,
    name: String,
    bytes: f64,
}

impl PreCopy {
    /// Removes the target's copy (the migration will not use it).
    async fn discard(&self, dst: &AgentApi) -> anyhow::Result<()> {
        dst.json(
            dst.req(reqwest::Method::POST, "/v1/retire")
                .query(&[("container", self.copy.as_str()), ("drain", "0s")]),
        )
        .await
        .map(|_| ())
    }
}

/// Copies `container` from `src` to `dst` while it runs (a live backup, its volumes'
/// state recorded by the source under a fresh snapshot id), restored but not started.
async fn pre_copy(
    src: &AgentApi,
    dst: &AgentApi,
    container: &str,
    image: &str,
) -> anyhow::Result<PreCopy> {
    let snapshot = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let resp = src
        .req(reqwest::Method::GET, "/v1/backup")
        .query(&[
            ("container", container),
            ("consistency", "live"),
            ("image", image),
            ("snapshot", snapshot.as_str()),
            // A move within the cluster keeps the replica's secrets.
            ("secrets", "true"),
        ])
        .send()
        .await?
        .error_for_status()?;
    let v = dst
        .json(
            dst.req(reqwest::Method::POST, "/v1/restore")
                .query(&[("start", "false"), ("keep_stack", "true"), ("hold", "true")])
                .timeout(Duration::from_secs(3600))
                .body(reqwest::Body::wrap_stream(resp.bytes_stream())),
        )
        .await?;
    Ok(PreCopy {
        snapshot,
        copy: v["id"]
            .as_str()
            .context("restore answered no id")?
            .to_owned(),
        name: v["name"].as_str().unwrap_or("?").to_owned(),
        bytes: v["bytes"].as_f64().unwrap_or(0.0),
    })
}

/// Makes sure the target engine has image `tag`, copying it from the source's engine
/// if not. Returns whether the target has it now.
async fn stage_image(src: &AgentApi, dst: &AgentApi, tag: &str) -> anyhow::Result<bool> {
    if dst.has_image(tag).await? {
        return Ok(true);
    }
    if !src.has_image(tag).await? {
        return Ok(false);
    }
    let saved = src
        .req(reqwest::Method::GET, "/v1/images/save")
        .query(&[("tag", tag)])
        .send()
        .await?
        .error_for_status()?;
    dst.json(
        dst.req(reqwest::Method::POST, "/v1/images")
            .timeout(Duration::from_secs(3600))
            .body(reqwest::Body::wrap_stream(saved.bytes_stream())),
    )
    .await?;
    dst.has_image(tag).await
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let c = client(&args.client)?;
    let token = token_of(&args.client)?;
    let inst = match resolve(&c, &args.instance).await?.as_slice() {
        [one] => one.clone(),
        many => bail!(
            "{:?} names {} instances: migrate one at a time (by id or container name)",
            args.instance,
            many.len()
        ),
    };
    let from = inst.node.clone().context("the instance has no node")?;
    if from == args.to {
        return Err(usage(format!("{} already runs on {from}", inst.id)));
    }
    let source = node_of(&c, &from).await?;
    let target = node_of(&c, &args.to).await?;
    let src = AgentApi::of(&source, &token)?;
    let dst = AgentApi::of(&target, &token)?;
    let container = container_of(&inst)?;
    let stack = inst.meta.get("stack").cloned();
    let replica: Option<u32> = inst.meta.get("replica").and_then(|r| r.parse().ok());
    let deployed = match &stack {
        Some(s) => c.stack(s).await?.services.get(&inst.service).cloned(),
        None => None,
    };
    // Unknown (not a stack replica): its volumes, if any, are state.
    let stateful = deployed.as_ref().is_none_or(|d| !d.spec.volumes.is_empty());
    let drain = humantime::format_duration(args.drain.into()).to_string();
    let t0 = Instant::now();
    match (&stack, replica, stateful) {
        (Some(s), Some(r), false) => {
            // Stateless replica: pin it to the target; the target's agent starts it, and
            // the source's agent drains and removes the old one once the new one passes.
            c.pin(s, &inst.service, r, Some(&args.to)).await?;
            let rec = c.stack(s).await?;
            let hash = rec.services[&inst.service].spec_hash.clone();
            loop {
                let list = c.instances().await?;
                let here = passing_of(&list, s, &inst.service, &hash).iter().any(|i| {
                    i.node.as_deref() == Some(&args.to)
                        && i.meta.get("replica") == Some(&r.to_string())
                });
                let old_gone = !list.iter().any(|i| i.id == inst.id);
                if here && old_gone {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(120) {
                    bail!("the replica did not move within 120s");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            println!(
                "migrated {} ({s}/{}/{r}, stateless) {from} -> {}: blue/green, no downtime, {:.1}s",
                inst.id,
                inst.service,
                args.to,
                t0.elapsed().as_secs_f64()
            );
        }
        _ => {
            // Stateful (or not a stack replica): the image goes first, while the source
            // still serves, so the stopped window carries only the state; then stop,
            // stream the final state straight into a restore on the target, retire the
            // source.
            let image_staged = match &deployed {
                Some(d) => stage_image(&src, &dst, &d.image)
                    .await
                    .with_context(|| format!("sending image {} to {}", d.image, args.to))?,
                None => false,
            };
            let consistency = if stateful { "stop" } else { "live" };
            let image = if image_staged { "false" } else { "true" };
            // Pre-copy while the source still serves: a live backup restored on the
            // target, not started. The stopped window then carries only what changed
            // since (the final delta). Any trouble here falls back to a whole copy.
            let precopy = if stateful {
                match pre_copy(&src, &dst, &container, image).await {
                    Ok(p) => Some(p),
                    Err(e) => {
                        eprintln!(
                            "warning: pre-copy failed, moving everything while stopped: {e:#}"
                        );
                        None
                    }
                }
            } else {
                None
            };
            let mut backup_query = vec![
                ("container", container.clone()),
                ("consistency", consistency.to_owned()),
                ("image", image.to_owned()),
                (
                    "leave_stopped",
                    if stateful { "true" } else { "false" }.to_owned(),
                ),
                ("secrets", "true".to_owned()),
            ];
            if let Some(p) = &precopy {
                backup_query.push(("since", p.snapshot.clone()));
            }
            let resp = src
                .req(reqwest::Method::GET, "/v1/backup")
                .query(&backup_query)
                .send()
                .await?;
            if !resp.status().is_success() {
                if let Some(p) = &precopy {
                    let _ = p.discard(&dst).await;
                }
                let v: serde_json::Value = resp.json().await.unwrap_or_default();
                bail!(
                    "backup on {from}: {}",
                    v["error"].as_str().unwrap_or("failed")
                );
            }
            let stopped_at = Instant::now();
            let upload = match &precopy {
                Some(p) => dst
                    .req(reqwest::Method::POST, "/v1/restore/apply")
                    .query(&[("container", p.copy.as_str())]),
                None => dst
                    .req(reqwest::Method::POST, "/v1/restore")
                    .query(&[("start", "true"), ("keep_stack", "true")]),
            };
            let restored = dst
                .json(
                    upload
                        .timeout(Duration::from_secs(3600))
                        .body(reqwest::Body::wrap_stream(resp.bytes_stream())),
                )
                .await;
            let restored = match restored {
                Ok(v) => v,
                Err(e) => {
                    // Put the source back into service.
                    let _ = src
                        .json(
                            src.req(reqwest::Method::POST, "/v1/release")
                                .query(&[("container", &container)]),
                        )
                        .await;
                    return Err(
                        e.context("restore on the target failed; the source was started again")
                    );
                }
            };
            let (copy_name, pre_bytes) = match &precopy {
                Some(p) => (p.name.clone(), p.bytes),
                None => (restored["name"].as_str().unwrap_or("?").to_owned(), 0.0),
            };
            let final_bytes = restored["bytes"].as_f64().unwrap_or(0.0);
            let downtime = stopped_at.elapsed();
            if let (Some(s), Some(r)) = (&stack, replica) {
                c.pin(s, &inst.service, r, Some(&args.to)).await?;
            }
            src.json(src.req(reqwest::Method::POST, "/v1/retire").query(&[
                ("container", container.as_str()),
                ("drain", if stateful { "0s" } else { drain.as_str() }),
            ]))
            .await?;
            println!(
                "migrated {} ({}) {from} -> {} as {copy_name}: {:.1} MiB pre-copied while serving, {:.1} MiB moved while stopped, downtime {:.2}s ({}), total {:.1}s",
                inst.id,
                if stateful { "stateful, cold" } else { "stateless" },
                args.to,
                pre_bytes / 1048576.0,
                final_bytes / 1048576.0,
                if stateful { downtime.as_secs_f64() } else { 0.0 },
                if stateful { "stopped → passing on the target" } else { "the source served until the target passed" },
                t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
