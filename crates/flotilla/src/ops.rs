//! The operator commands: thin clients of the server's API.

use std::time::Duration;

use anyhow::Context;
use flotilla_core::recovery::ReplicaKey;

use crate::cli::{CertCommand, ClientArgs, DeregisterArgs, PsArgs, TokenCommand, WatchArgs};
use crate::home::client;

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// One deployed service in `flotilla ps`: desired against passing.
#[derive(serde::Serialize)]
struct StackRow {
    stack: String,
    service: String,
    version: String,
    desired: u32,
    passing: usize,
    spec: String,
    pins: std::collections::BTreeMap<u32, String>,
    note: String,
}

/// `flotilla ps`: instances, then deployed stacks. `--json` prints both as
/// `{"instances": [...], "stacks": [...]}`.
pub async fn ps(args: PsArgs) -> anyhow::Result<()> {
    let c = client(&args.client)?;
    let all = c.instances().await?;
    let mut list = all.clone();
    if let Some(s) = &args.service {
        list.retain(|i| &i.service == s);
    }
    let (_, stacks) = c.stacks(0, Duration::ZERO).await?;
    let mut rows = Vec::new();
    for st in &stacks {
        for (name, svc) in &st.services {
            if args.service.as_ref().is_some_and(|s| s != name) {
                continue;
            }
            let short = &svc.spec_hash[..12.min(svc.spec_hash.len())];
            let passing = all
                .iter()
                .filter(|i| {
                    &i.service == name
                        && i.meta.get("stack") == Some(&st.name)
                        && i.meta.get("spec").map(String::as_str) == Some(short)
                        && i.health == flotilla_core::HealthStatus::Passing
                })
                .count();
            let note = match (&st.rolled_back, svc.pins.is_empty()) {
                (Some(r), _) if r.starts_with(name.as_str()) => format!("rolled back: {r}"),
                (_, false) => format!("pinned {:?}", svc.pins),
                _ => String::new(),
            };
            rows.push(StackRow {
                stack: st.name.clone(),
                service: name.clone(),
                version: svc.spec.version.clone(),
                desired: svc.spec.replicas,
                passing,
                spec: short.to_owned(),
                pins: svc.pins.clone(),
                note,
            });
        }
    }
    let (_, assignments) = c.assignments(0, Duration::ZERO).await?;
    let now_ms = flotilla_core::record::unix_ms();
    let replicas: Vec<ReplicaRow> = assignments
        .iter()
        .filter_map(|(key, a)| Some((key, key.parse::<ReplicaKey>().ok()?, a)))
        .filter(|(_, replica, _)| args.service.as_ref().is_none_or(|s| replica.service == *s))
        .map(|(key, replica, a)| {
            let svc = stacks
                .iter()
                .find(|s| s.name == replica.stack)
                .and_then(|s| s.services.get(&replica.service));
            // During a rolling update the old and the new version's containers of one
            // replica both run on its node: describe the current version's.
            let current = svc.map(|s| &s.spec_hash[..12.min(s.spec_hash.len())]);
            let meta = all
                .iter()
                .filter(|i| {
                    ReplicaKey::of_instance(&i.service, &i.meta).as_ref() == Some(&replica)
                        && i.node.as_deref() == Some(a.node.as_str())
                })
                .max_by_key(|i| i.meta.get("spec").map(String::as_str) == current)
                .map(|i| &i.meta);
            ReplicaRow {
                replica: key.clone(),
                node: a.node.clone(),
                generation: a.generation,
                state: flotilla_core::recovery::describe(a, meta, svc.map(|s| &s.spec), now_ms),
            }
        })
        .collect();
    // Orphans only exist where replicas were recovered: ask the agents only then.
    let orphans = if assignments.values().any(|a| a.generation > 1) {
        let creds = crate::agent_api::token_of(&args.client)?;
        crate::keynodes::orphans(&c, &creds).await?
    } else {
        Vec::new()
    };
    if args.client.json {
        return print_json(&serde_json::json!({
            "instances": list,
            "stacks": rows,
            "replicas": replicas,
            "orphans": orphans,
        }));
    }
    println!(
        "{:<24} {:<14} {:<22} {:<10} {:>9}  {:<16} OUTPUT",
        "ID", "SERVICE", "ADDRESS", "HEALTH", "WEIGHT", "CONTAINER"
    );
    for i in list {
        let addr = std::net::SocketAddr::new(i.address, i.port).to_string();
        let health = format!("{:?}", i.health).to_lowercase();
        let container = i.meta.get("container_name").cloned().unwrap_or_default();
        // The feedback weight the active lb published, next to the static one.
        let weight = match i.feedback_weight {
            Some(w) => format!("{}→{w:.0}", i.weight),
            None => i.weight.to_string(),
        };
        println!(
            "{:<24} {:<14} {:<22} {:<10} {:>9}  {:<16} {}",
            i.id, i.service, addr, health, weight, container, i.output
        );
    }
    if !rows.is_empty() {
        println!();
        println!(
            "{:<16} {:<14} {:<8} {:>7} {:>7}  {:<14} NOTE",
            "STACK", "SERVICE", "VERSION", "DESIRED", "PASSING", "SPEC"
        );
        for r in &rows {
            println!(
                "{:<16} {:<14} {:<8} {:>7} {:>7}  {:<14} {}",
                r.stack, r.service, r.version, r.desired, r.passing, r.spec, r.note
            );
        }
    }
    if !replicas.is_empty() {
        println!();
        println!("{:<28} {:<12} {:>4}  STATE", "REPLICA", "NODE", "GEN");
        for r in &replicas {
            println!(
                "{:<28} {:<12} {:>4}  {}",
                r.replica, r.node, r.generation, r.state
            );
        }
    }
    if !orphans.is_empty() {
        println!();
        println!(
            "{:<28} {:<12} {:<28} STALE (flotilla rm --orphans removes them)",
            "ORPHAN OF", "NODE", "CONTAINER"
        );
        for crate::keynodes::NodeOrphan { node, orphan: o } in &orphans {
            println!(
                "{:<28} {:<12} {:<28} generation {} < {}{}",
                o.replica,
                node,
                o.container,
                o.generation,
                o.current,
                if o.running { " (still running)" } else { "" }
            );
        }
    }
    Ok(())
}

/// A stateful replica's line in `flotilla ps`.
#[derive(Debug, serde::Serialize)]
struct ReplicaRow {
    replica: String,
    node: String,
    generation: u64,
    state: String,
}

/// `flotilla services`.
pub async fn services(args: ClientArgs) -> anyhow::Result<()> {
    let list = client(&args)?.services().await?;
    if args.json {
        return print_json(&list);
    }
    println!(
        "{:<24} {:>9} {:>8} {:>10}",
        "SERVICE", "INSTANCES", "PASSING", "INDEX"
    );
    for s in list {
        println!(
            "{:<24} {:>9} {:>8} {:>10}",
            s.name, s.instances, s.passing, s.index
        );
    }
    Ok(())
}

/// `flotilla nodes`.
pub async fn nodes(args: ClientArgs) -> anyhow::Result<()> {
    let list = client(&args)?.nodes().await?;
    if args.json {
        return print_json(&list);
    }
    println!(
        "{:<24} {:<20} {:>8} {:>9}",
        "NODE", "ADDRESS", "TTL", "INSTANCES"
    );
    for n in list {
        println!(
            "{:<24} {:<20} {:>7}ms {:>9}",
            n.name,
            n.address.unwrap_or_default(),
            n.ttl_ms,
            n.instances
        );
    }
    Ok(())
}

/// `flotilla deregister`.
pub async fn deregister(args: DeregisterArgs) -> anyhow::Result<()> {
    let v = client(&args.client)?.deregister(&args.instance).await?;
    if args.client.json {
        return print_json(&v);
    }
    println!(
        "deregistered {}",
        v.get("id")
            .and_then(|i| i.as_str())
            .unwrap_or(&args.instance)
    );
    Ok(())
}

/// `flotilla watch`: a blocking-query loop.
pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let c = client(&args.client)?;
    let mut index = 0;
    let mut seen = 0;
    loop {
        let s = c
            .service(&args.service, index, Duration::from_secs(60), true)
            .await
            .context("watching")?;
        if s.index != index {
            index = s.index;
            if args.client.json {
                // One JSON object a line (a stream a script can read line by line).
                println!("{}", serde_json::to_string(&s)?);
                seen += 1;
                if args.count > 0 && seen >= args.count {
                    return Ok(());
                }
                continue;
            }
            let addrs: Vec<String> = s
                .instances
                .iter()
                .map(|i| std::net::SocketAddr::new(i.address, i.port).to_string())
                .collect();
            println!(
                "{} index={} passing={} [{}]",
                args.service,
                s.index,
                s.instances.len(),
                addrs.join(", ")
            );
            seen += 1;
            if args.count > 0 && seen >= args.count {
                return Ok(());
            }
        }
    }
}

/// `flotilla token create|list|revoke`.
pub async fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create(args) => {
            let made = client(&args.client)?
                .create_token(args.role, args.service.as_deref(), args.node.as_deref())
                .await?;
            if args.client.json {
                return print_json(&made);
            }
            let scope = made
                .service
                .as_deref()
                .map(|s| format!(" for service {s}"))
                .or_else(|| made.node.as_deref().map(|n| format!(" for node {n}")))
                .unwrap_or_default();
            eprintln!(
                "{} token {}{scope} (shown once; revoke with `flotilla token revoke {}`):",
                made.role.name(),
                made.id,
                made.id
            );
            println!("{}", made.token);
        }
        TokenCommand::List(args) => {
            let list = client(&args)?.tokens().await?;
            if args.json {
                return print_json(&list);
            }
            println!("{:<18} {:<6} {:<24} CREATED", "ID", "ROLE", "SCOPE");
            let now = flotilla_core::record::unix_ms();
            for t in list {
                let scope = t
                    .service
                    .map(|s| format!("service {s}"))
                    .or_else(|| t.node.map(|n| format!("node {n}")))
                    .unwrap_or_else(|| "-".into());
                let age = Duration::from_millis(now.saturating_sub(t.created_ms) / 1000 * 1000);
                println!(
                    "{:<18} {:<6} {:<24} {} ago",
                    t.id,
                    t.role.name(),
                    scope,
                    humantime::format_duration(age)
                );
            }
        }
        TokenCommand::Revoke(args) => {
            client(&args.client)?.revoke_token(&args.id).await?;
            if args.client.json {
                return print_json(&serde_json::json!({ "revoked": args.id }));
            }
            println!("revoked {}", args.id);
        }
    }
    Ok(())
}

/// `flotilla cert revoke|list`.
pub async fn cert(cmd: CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Revoke(args) => {
            let r = client(&args.client)?.revoke_node_certs(&args.node).await?;
            if args.client.json {
                return print_json(&r);
            }
            println!(
                "node {}'s certificates issued until now are revoked; it is back when it joins again with a token",
                args.node
            );
        }
        CertCommand::List(args) => {
            let list = client(&args)?.cert_revocations().await?;
            if args.json {
                return print_json(&list);
            }
            println!("{:<24} REVOKED", "NODE");
            let now = flotilla_core::record::unix_ms();
            for r in list {
                let age = Duration::from_secs(now.saturating_sub(r.before_ms) / 1000);
                println!("{:<24} {} ago", r.node, humantime::format_duration(age));
            }
        }
    }
    Ok(())
}
