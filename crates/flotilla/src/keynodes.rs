//! The operator's commands for stateful replicas and their recovery: `flotilla backups`
//! (what archives exist where), the orphans `flotilla ps` lists, and
//! `flotilla rm --orphans`. Each asks every live node's agent directly.

use anyhow::Context;
use flotilla_client::Client;
use serde_json::Value;

use crate::agent_api::{token_of, AgentApi, AgentCreds};
use crate::cli::{BackupsArgs, ClientArgs, RecoverArgs};

/// Every live node's orphans (stale copies of recovered replicas), as
/// `{"node", "replica", "container", "generation", "current", "running"}`; a node whose
/// agent cannot be asked is reported on stderr and left out.
pub async fn orphans(c: &Client, creds: &AgentCreds) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for node in c.nodes().await? {
        let Ok(agent) = AgentApi::of(&node, creds) else {
            continue;
        };
        match agent
            .json(agent.req(reqwest::Method::GET, "/v1/orphans"))
            .await
        {
            Ok(v) => {
                for mut o in v["orphans"].as_array().cloned().unwrap_or_default() {
                    o["node"] = node.name.clone().into();
                    out.push(o);
                }
            }
            Err(e) => eprintln!("warning: orphans of node {}: {e:#}", node.name),
        }
    }
    Ok(out)
}

/// The client and the agents' credentials of `args`.
fn connect(args: &ClientArgs) -> anyhow::Result<(Client, AgentCreds)> {
    Ok((crate::home::client(args)?, token_of(args)?))
}

/// `flotilla rm --orphans`: removes every node's orphans with their volumes.
pub async fn rm_orphans(args: ClientArgs) -> anyhow::Result<()> {
    let (c, creds) = connect(&args)?;
    let mut removed = Vec::new();
    for node in c.nodes().await? {
        let Ok(agent) = AgentApi::of(&node, &creds) else {
            continue;
        };
        let v = agent
            .json(agent.req(reqwest::Method::DELETE, "/v1/orphans"))
            .await
            .with_context(|| format!("removing the orphans of node {}", node.name))?;
        for mut o in v["removed"].as_array().cloned().unwrap_or_default() {
            o["node"] = node.name.clone().into();
            removed.push(o);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&removed)?);
        return Ok(());
    }
    for o in &removed {
        println!(
            "removed {} on {} (replica {}, generation {} < {}) with its volumes",
            o["container"].as_str().unwrap_or("?"),
            o["node"].as_str().unwrap_or("?"),
            o["replica"].as_str().unwrap_or("?"),
            o["generation"],
            o["current"]
        );
    }
    println!("{} orphans removed", removed.len());
    Ok(())
}

/// `flotilla backups [SERVICE] [--verify]`: per node, the archives of each stateful
/// service with a backup schedule (its replicas' own and the copies kept for others).
pub async fn backups(args: BackupsArgs) -> anyhow::Result<()> {
    let (c, creds) = connect(&args.client)?;
    let (_, stacks) = c.stacks(0, std::time::Duration::ZERO).await?;
    let nodes = c.nodes().await?;
    let mut rows = Vec::new();
    for st in &stacks {
        for (name, svc) in &st.services {
            if svc.spec.backup.is_none() {
                continue;
            }
            let full = format!("{}/{name}", st.name);
            if args
                .service
                .as_ref()
                .is_some_and(|s| s != name && *s != full)
            {
                continue;
            }
            for node in &nodes {
                let Ok(agent) = AgentApi::of(node, &creds) else {
                    continue;
                };
                let req = agent
                    .req(
                        reqwest::Method::GET,
                        &format!("/v1/backups/{}/{name}", st.name),
                    )
                    .query(&[("verify", args.verify)]);
                match agent.json(req).await {
                    Ok(list) => {
                        for mut a in list.as_array().cloned().unwrap_or_default() {
                            a["node"] = node.name.clone().into();
                            a["service"] = full.clone().into();
                            rows.push(a);
                        }
                    }
                    Err(e) => eprintln!("warning: backups on node {}: {e:#}", node.name),
                }
            }
        }
    }
    rows.sort_by_key(|a| {
        (
            a["service"].as_str().unwrap_or("").to_owned(),
            a["replica"].as_u64(),
            std::cmp::Reverse(a["taken_ms"].as_u64()),
            a["node"].as_str().unwrap_or("").to_owned(),
        )
    });
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<20} {:>3}  {:<10} {:<20} {:>12}  {:<8} ARCHIVE",
        "SERVICE", "R", "NODE", "TAKEN", "BYTES", "VERIFIED"
    );
    for a in &rows {
        let taken = a["taken_ms"].as_u64().unwrap_or(0);
        let at = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(taken),
        );
        let verified = match a["verified"].as_bool() {
            Some(true) => "yes",
            Some(false) => "FAILED",
            None => "-",
        };
        println!(
            "{:<20} {:>3}  {:<10} {:<20} {:>12}  {:<8} {}",
            a["service"].as_str().unwrap_or(""),
            a["replica"],
            a["node"].as_str().unwrap_or(""),
            at,
            a["bytes"],
            verified,
            a["name"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `flotilla recover WHAT [--to NODE] [--from ARCHIVE]`: asks the server to restore the
/// replicas now, then waits for each to pass on its new node and says what it came from.
pub async fn recover(args: RecoverArgs) -> anyhow::Result<()> {
    let c = crate::home::client(&args.client)?;
    let (_, assignments) = c.assignments(0, std::time::Duration::ZERO).await?;
    let instances = c.instances().await?;
    let keys: Vec<String> = if assignments.contains_key(&args.what) {
        vec![args.what.clone()]
    } else if let Some(i) = instances
        .iter()
        .find(|i| i.id == args.what || i.meta.get("container_name") == Some(&args.what))
    {
        let (Some(stack), Some(r)) = (i.meta.get("stack"), i.meta.get("replica")) else {
            anyhow::bail!("{} is not a stack replica", args.what);
        };
        vec![format!("{stack}/{}/{r}", i.service)]
    } else {
        assignments
            .keys()
            .filter(|k| k.split('/').nth(1) == Some(args.what.as_str()))
            .cloned()
            .collect()
    };
    if keys.is_empty() {
        return Err(crate::home::usage(format!(
            "{:?} names no stateful replica (STACK/SERVICE/REPLICA, a service, or an instance)",
            args.what
        )));
    }
    let before: std::collections::BTreeMap<String, u64> = keys
        .iter()
        .map(|k| (k.clone(), assignments[k].generation))
        .collect();
    for k in &keys {
        c.recover(k, args.to.as_deref(), args.archive.as_deref())
            .await
            .with_context(|| format!("recover {k}"))?;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from(args.timeout);
    let mut done = std::collections::BTreeMap::new();
    while done.len() < keys.len() {
        if std::time::Instant::now() > deadline {
            let waiting: Vec<&String> = keys.iter().filter(|k| !done.contains_key(*k)).collect();
            anyhow::bail!(
                "not restored and passing within {}: {waiting:?}",
                args.timeout
            );
        }
        let (_, now) = c.assignments(0, std::time::Duration::ZERO).await?;
        let instances = c.instances().await?;
        for k in &keys {
            let Some(a) = now.get(k).filter(|a| a.generation > before[k]) else {
                continue;
            };
            let mut parts = k.splitn(3, '/');
            let (stack, service, r) = (parts.next(), parts.next(), parts.next());
            let passing = instances.iter().find(|i| {
                Some(i.service.as_str()) == service
                    && i.meta.get("stack").map(String::as_str) == stack
                    && i.meta.get("replica").map(String::as_str) == r
                    && i.node.as_deref() == Some(a.node.as_str())
                    && i.health == flotilla_core::HealthStatus::Passing
            });
            if let Some(i) = passing {
                done.insert(k.clone(), (a.clone(), i.meta.clone()));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let now_ms = flotilla_core::record::unix_ms();
    if args.client.json {
        let rows: Vec<Value> = done
            .iter()
            .map(|(k, (a, meta))| {
                serde_json::json!({
                    "replica": k,
                    "node": a.node,
                    "generation": a.generation,
                    "state": flotilla_core::recovery::describe(a, Some(meta), None, now_ms),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    for (k, (a, meta)) in &done {
        println!(
            "{k}: on {} (generation {}): {}",
            a.node,
            a.generation,
            flotilla_core::recovery::describe(a, Some(meta), None, now_ms)
        );
    }
    Ok(())
}
