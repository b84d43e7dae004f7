//! The daily commands that reach into a container through the agent that runs it:
//! `flotilla logs` (following across restarts) and `flotilla exec`.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use flotilla_client::agent::LogsQuery;
use flotilla_client::Client;
use flotilla_core::InstanceView;
use futures::StreamExt;

use crate::agent_api::{agent_of, token_of, AgentCreds};
use crate::cli::{ExecArgs, LogsArgs};
use crate::containers::{container_of, node_of, resolve};

/// The instances `what` names; an unknown name is an error naming it (exit 1: it is
/// not bad usage, the cluster simply has no such thing).
async fn targets(c: &Client, what: &str) -> anyhow::Result<Vec<InstanceView>> {
    resolve(c, what)
        .await
        .map_err(|_| anyhow::anyhow!("no instance, container or service named {what:?}"))
}

/// How a line of `i` is prefixed when several instances are followed: the stack
/// replica (`web.2`) or the instance id.
fn label(i: &InstanceView) -> String {
    match i.meta.get("replica") {
        Some(r) => format!("{}.{r}", i.service),
        None => i.id.clone(),
    }
}

/// The same replica (or container) after a restart or a replacement.
fn same_replica(old: &InstanceView, new: &InstanceView) -> bool {
    match (old.meta.get("stack"), old.meta.get("replica")) {
        (Some(s), Some(r)) => {
            new.service == old.service
                && new.meta.get("stack") == Some(s)
                && new.meta.get("replica") == Some(r)
        }
        _ => new.meta.get("container_name") == old.meta.get("container_name"),
    }
}

/// `flotilla logs INSTANCE|SERVICE [-f] [--since 10m] [--tail N]`.
pub async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let c = crate::home::client(&args.client)?;
    let creds = token_of(&args.client)?;
    let list = targets(&c, &args.what).await?;
    let prefix = list.len() > 1;
    let now = flotilla_core::record::unix_ms() / 1000;
    let since = args
        .since
        .map(|d| now.saturating_sub(Duration::from(d).as_secs()));
    let followers = list.into_iter().map(|i| {
        let (c, creds) = (&c, &creds);
        let tail = args.tail;
        async move { follow_one(c, creds, i, prefix, args.follow, since, tail).await }
    });
    let results = futures::future::join_all(followers).await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(())
}

async fn follow_one(
    c: &Client,
    creds: &AgentCreds,
    mut inst: InstanceView,
    prefix: bool,
    follow: bool,
    mut since: Option<u64>,
    mut tail: Option<u64>,
) -> anyhow::Result<()> {
    let tag = if prefix {
        format!("[{}] ", label(&inst))
    } else {
        String::new()
    };
    loop {
        let node = node_of(c, inst.node.as_deref().unwrap_or_default()).await?;
        let agent = agent_of(&node, creds)?;
        let query = LogsQuery {
            container: container_of(&inst)?,
            follow,
            since: since.map(|s| s as i64),
            tail,
        };
        let resp = agent
            .logs(&query)
            .await
            .with_context(|| format!("logs of {} from node {}", inst.id, node.name))?;
        let mut body = resp.bytes_stream();
        let mut partial = Vec::new();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            partial.extend_from_slice(&chunk);
            while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = partial.drain(..=end).collect();
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(tag.as_bytes());
                let _ = out.write_all(&line);
            }
        }
        if !partial.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(tag.as_bytes());
            let _ = out.write_all(&partial);
            let _ = out.write_all(b"\n");
        }
        if !follow {
            return Ok(());
        }
        // The container stopped: wait for the replica to run again (restarted, or
        // replaced by a rolling update) and go on from where this left off.
        since = Some(flotilla_core::record::unix_ms() / 1000);
        tail = None;
        inst = loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let again = c.instances().await.unwrap_or_default();
            let next = again.into_iter().find(|i| same_replica(&inst, i));
            if let Some(next) = next.filter(|n| n.meta.contains_key("container_id")) {
                break next;
            }
        };
    }
}

/// `flotilla exec INSTANCE -- CMD…`: runs a command in one container through its agent
/// (admin token) and exits with the command's exit code.
pub async fn exec(args: ExecArgs) -> anyhow::Result<()> {
    let c = crate::home::client(&args.client)?;
    let creds = token_of(&args.client)?;
    let list = targets(&c, &args.instance).await?;
    let [inst] = list.as_slice() else {
        let ids: Vec<&str> = list.iter().map(|i| i.id.as_str()).collect();
        bail!(
            "{:?} names {} instances; pick one: {}",
            args.instance,
            ids.len(),
            ids.join(", ")
        );
    };
    let node = node_of(&c, inst.node.as_deref().unwrap_or_default()).await?;
    let agent = agent_of(&node, &creds)?;
    let reply = agent.exec(&container_of(inst)?, args.cmd.clone()).await?;
    let code = reply.exit_code;
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        print!("{}", reply.output);
        if reply.truncated {
            eprintln!("(output cut at 1 MiB)");
        }
    }
    std::io::stdout().flush()?;
    if code != 0 {
        std::process::exit(i32::try_from(code).ok().filter(|c| *c > 0).unwrap_or(1));
    }
    Ok(())
}
