//! The operator's commands for stateful replicas and their recovery: `flotilla backups`
//! (what archives exist where), the orphans `flotilla ps` lists, and
//! `flotilla rm --orphans`. Each asks every live node's agent directly.

use anyhow::Context;
use flotilla_client::agent::{ArchiveEntry, BackupsQuery, Orphan};
use flotilla_client::Client;
use serde::Serialize;
use serde_json::Value;

use crate::agent_api::{agent_of, token_of, AgentCreds};

/// An orphan and the node it is on.
#[derive(Debug, Serialize)]
pub struct NodeOrphan {
    /// The node.
    pub node: String,
    /// The orphan.
    #[serde(flatten)]
    pub orphan: Orphan,
}

/// An archive, the node keeping it and the service it is of (`STACK/SERVICE`).
#[derive(Debug, Serialize)]
struct BackupRow {
    service: String,
    node: String,
    #[serde(flatten)]
    archive: ArchiveEntry,
}
use crate::cli::{BackupsArgs, ClientArgs, RecoverArgs};

/// Every live node's orphans (stale copies of recovered replicas); a node whose
/// agent cannot be asked is reported on stderr and left out.
pub async fn orphans(c: &Client, creds: &AgentCreds) -> anyhow::Result<Vec<NodeOrphan>> {
    let mut out = Vec::new();
    for node in c.nodes().await? {
        let Ok(agent) = agent_of(&node, creds) else {
            continue;
        };
        match agent.orphans().await {
            Ok(v) => out.extend(v.orphans.into_iter().map(|orphan| NodeOrphan {
                node: node.name.clone(),
                orphan,
            })),
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
        let Ok(agent) = agent_of(&node, &creds) else {
            continue;
        };
        let v = agent
            .remove_orphans()
            .await
            .with_context(|| format!("removing the orphans of node {}", node.name))?;
        removed.extend(v.orphans.into_iter().map(|orphan| NodeOrphan {
            node: node.name.clone(),
            orphan,
        }));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&removed)?);
        return Ok(());
    }
    for NodeOrphan { node, orphan: o } in &removed {
        println!(
            "removed {} on {node} (replica {}, generation {} < {}) with its volumes",
            o.container, o.replica, o.generation, o.current
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
                let Ok(agent) = agent_of(node, &creds) else {
                    continue;
                };
                let q = BackupsQuery {
                    replica: None,
                    verify: args.verify,
                };
                match agent.backups(&st.name, name, &q).await {
                    Ok(list) => rows.extend(list.into_iter().map(|archive| BackupRow {
                        service: full.clone(),
                        node: node.name.clone(),
                        archive,
                    })),
                    Err(e) => eprintln!("warning: backups on node {}: {e:#}", node.name),
                }
            }
        }
    }
    rows.sort_by(|a, b| {
        (
            &a.service,
            a.archive.replica,
            std::cmp::Reverse(a.archive.taken_ms),
            &a.node,
        )
            .cmp(&(
                &b.service,
                b.archive.replica,
                std::cmp::Reverse(b.archive.taken_ms),
                &b.node,
            ))
    });
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<20} {:>3}  {:<10} {:<20} {:<5} {:>12}  {:<8} ARCHIVE",
        "SERVICE", "R", "NODE", "TAKEN", "KIND", "BYTES", "VERIFIED"
    );
    for BackupRow {
        service,
        node,
        archive: a,
    } in &rows
    {
        let at = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(a.taken_ms),
        );
        let verified = match a.verified {
            Some(true) => "yes",
            Some(false) => "FAILED",
            None => "-",
        };
        let kind = if a.delta { "delta" } else { "full" };
        println!(
            "{:<20} {:>3}  {:<10} {:<20} {:<5} {:>12}  {:<8} {}",
            service, a.replica, node, at, kind, a.bytes, verified, a.name
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
            let replica = k.parse::<flotilla_core::recovery::ReplicaKey>().ok();
            let passing = instances.iter().find(|i| {
                flotilla_core::recovery::ReplicaKey::of_instance(&i.service, &i.meta) == replica
                    && replica.is_some()
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
