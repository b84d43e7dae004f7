//! Health checks of this node's instances, run where the containers are.
//!
//! For a `node_checks` instance (every labelled container without a TTL check) the agent
//! probes HTTP and TCP checks from this host and runs exec checks inside the container,
//! applies the same rise/fall hysteresis the server would, and writes the verdict to
//! the registry only when it changes: the steady-state cost is no store write at all,
//! and an address the server cannot reach (a container address behind another host's
//! NAT) is still checked. An instance whose checks the server runs, but with an exec
//! check, still gets that exec result pushed as a check-in every interval.

use std::sync::Arc;
use std::time::Duration;

use flotilla_check::Hysteresis;
use flotilla_core::{CheckKind, CheckSpec, HealthStatus, InstanceSpec};
use tokio::task::JoinHandle;

use crate::docker;
use crate::state::Inner;

/// Starts the check loop an instance needs (none without checks). `stored` is the
/// verdict the registry holds, so a restarted agent resumes from it instead of taking
/// its healthy instances through critical.
pub(crate) fn spawn(
    inner: &Arc<Inner>,
    id: &str,
    spec: &InstanceSpec,
    stored: Option<HealthStatus>,
) -> Option<JoinHandle<()>> {
    let container = spec.meta.get("container_id").cloned().unwrap_or_default();
    if spec.node_checks && !spec.checks.is_empty() {
        return Some(tokio::spawn(judge(
            inner.clone(),
            id.to_owned(),
            spec.clone(),
            container,
            stored,
        )));
    }
    let check = spec
        .checks
        .iter()
        .find(|c| matches!(c.kind, CheckKind::Exec { .. }))?
        .clone();
    Some(tokio::spawn(push_exec(
        inner.clone(),
        id.to_owned(),
        check,
        container,
    )))
}

/// One check's probe state.
struct Run {
    spec: CheckSpec,
    hysteresis: Hysteresis,
    next: tokio::time::Instant,
    output: String,
}

/// Runs every check of a `node_checks` instance on its interval; reports each verdict
/// change (and the first verdict when the registry holds none or a different one).
async fn judge(
    inner: Arc<Inner>,
    id: String,
    spec: InstanceSpec,
    container: String,
    stored: Option<HealthStatus>,
) {
    let start = tokio::time::Instant::now();
    let initial = stored.unwrap_or(HealthStatus::Critical);
    let mut runs: Vec<Run> = spec
        .checks
        .iter()
        .map(|c| Run {
            spec: c.clone(),
            hysteresis: Hysteresis::new(c.rise, c.fall, initial, start.into_std()),
            next: start,
            output: String::new(),
        })
        .collect();
    let mut reported = stored;
    loop {
        let Some(due) = runs.iter().map(|r| r.next).min() else {
            return;
        };
        tokio::time::sleep_until(due).await;
        let now = tokio::time::Instant::now();
        for run in runs.iter_mut().filter(|r| r.next <= now) {
            run.next = now + run.spec.interval;
            let (ok, output) = probe(&inner, &spec, &container, &run.spec).await;
            inner.metrics.checks_run.inc();
            run.hysteresis
                .observe(ok, tokio::time::Instant::now().into_std());
            run.output = output;
        }
        let (status, output) = flotilla_check::verdict(
            runs.iter()
                .map(|r| (r.hysteresis.status(), r.output.as_str())),
        );
        if reported == Some(status) {
            continue;
        }
        match inner.client.report_health(&id, status, &output).await {
            Ok(_) => {
                tracing::info!(id, ?status, output, "health changed");
                inner.metrics.verdicts_reported.inc();
                reported = Some(status);
            }
            // Retried on the next round: the verdict is still not what the registry holds.
            Err(e) => tracing::warn!(id, error = %e, "health report failed"),
        }
    }
}

async fn probe(
    inner: &Inner,
    spec: &InstanceSpec,
    container: &str,
    check: &CheckSpec,
) -> (bool, String) {
    let timeout = check.effective_timeout();
    match &check.kind {
        CheckKind::Exec { command } => {
            docker::exec_check(&inner.docker, container, command, timeout).await
        }
        CheckKind::Docker => docker::engine_health(&inner.docker, container).await,
        kind => flotilla_check::probe(&inner.probe_http, kind, spec.address, spec.port, timeout)
            .await
            .unwrap_or_else(|| (false, "a TTL check is judged by the server".into())),
    }
}

/// The exec check of an instance the server judges: its result is pushed as a
/// check-in every interval (the server expires it when it stops coming).
async fn push_exec(inner: Arc<Inner>, id: String, check: CheckSpec, container: String) {
    let CheckKind::Exec { command } = &check.kind else {
        return;
    };
    let mut tick = tokio::time::interval(check.interval.max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        let (ok, output) = docker::exec_check(
            &inner.docker,
            &container,
            command,
            check.effective_timeout(),
        )
        .await;
        if let Err(e) = inner.client.check_in(&id, ok, &output).await {
            tracing::debug!(id, error = %e, "exec check report failed");
        }
    }
}
