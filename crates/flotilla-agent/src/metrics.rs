//! Prometheus metrics of the agent.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Agent metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests the agent's API served, and how long they took to answer.
    pub http: flotilla_http::metrics::RequestMetrics,
    /// Instances registered (including re-registrations on resync).
    pub registrations: Counter,
    /// Instances deregistered.
    pub deregistrations: Counter,
    /// Full resyncs run.
    pub resyncs: Counter,
    /// Docker events handled.
    pub docker_events: Counter,
    /// Lease renewals that succeeded.
    pub renewals: Counter,
    /// Lease renewals that failed.
    pub renewal_failures: Counter,
    /// Containers with labels that could not be turned into a registration.
    pub label_errors: Counter,
    /// Instances this agent currently has registered.
    pub instances: Gauge,
    /// Stack replicas created and started.
    pub containers_started: Counter,
    /// Replicas restarted after they exited.
    pub restarts: Counter,
    /// Rolling updates rolled back.
    pub rollbacks: Counter,
    /// Replicas not created because their fixed host port was in use.
    pub port_conflicts: Counter,
    /// Backups streamed.
    pub backups: Counter,
    /// Restores completed.
    pub restores: Counter,
    /// Health probes this agent ran for its own instances.
    pub checks_run: Counter,
    /// Verdict changes this agent reported to the registry.
    pub verdicts_reported: Counter,
    /// Load reports sent (a load that stayed within the dead band is not sent).
    pub load_reports: Counter,
    /// Load samples read from the containers' cgroup files.
    pub load_samples_cgroup: Counter,
    /// Load samples taken through the engine's stats API (where no cgroup was readable).
    pub load_samples_engine: Counter,
    /// Stateful replicas restored from a backup after their node was lost.
    pub recoveries: Counter,
    /// Backups that failed verification when a recovery tried them.
    pub recovery_refused: Counter,
    /// Stateful replicas this node stopped because its own lease lapsed.
    pub fenced: Counter,
    /// Stale copies (older assignment generation) stopped and kept as orphans.
    pub orphans_kept: Counter,
    /// Backup copies sent to other nodes.
    pub copies_sent: Counter,
    /// Backup copies received from other nodes (checked whole).
    pub copies_received: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("flotilla_agent");
        let m = Metrics {
            registry: Registry::default(),
            http: Default::default(),
            registrations: Counter::default(),
            deregistrations: Counter::default(),
            resyncs: Counter::default(),
            docker_events: Counter::default(),
            renewals: Counter::default(),
            renewal_failures: Counter::default(),
            label_errors: Counter::default(),
            instances: Gauge::default(),
            containers_started: Counter::default(),
            restarts: Counter::default(),
            rollbacks: Counter::default(),
            port_conflicts: Counter::default(),
            backups: Counter::default(),
            restores: Counter::default(),
            checks_run: Counter::default(),
            verdicts_reported: Counter::default(),
            load_reports: Counter::default(),
            load_samples_cgroup: Counter::default(),
            load_samples_engine: Counter::default(),
            recoveries: Counter::default(),
            recovery_refused: Counter::default(),
            fenced: Counter::default(),
            orphans_kept: Counter::default(),
            copies_sent: Counter::default(),
            copies_received: Counter::default(),
        };
        for (name, help, c) in [
            (
                "replicas_started",
                "Stack replicas created and started",
                &m.containers_started,
            ),
            (
                "replica_restarts",
                "Replicas restarted after they exited",
                &m.restarts,
            ),
            ("rollbacks", "Rolling updates rolled back", &m.rollbacks),
            (
                "port_conflicts",
                "Replicas not created because their fixed host port was in use",
                &m.port_conflicts,
            ),
            ("backups", "Backups streamed", &m.backups),
            ("restores", "Restores completed", &m.restores),
            (
                "recoveries",
                "Stateful replicas restored from a backup after their node was lost",
                &m.recoveries,
            ),
            (
                "recovery_refused_backups",
                "Backups that failed verification when a recovery tried them",
                &m.recovery_refused,
            ),
            (
                "fenced_replicas",
                "Stateful replicas stopped because this node's lease lapsed",
                &m.fenced,
            ),
            (
                "orphans_kept",
                "Stale copies stopped and kept as orphans",
                &m.orphans_kept,
            ),
            (
                "backup_copies_sent",
                "Backup copies sent to other nodes",
                &m.copies_sent,
            ),
            (
                "backup_copies_received",
                "Backup copies received from other nodes",
                &m.copies_received,
            ),
            (
                "checks_run",
                "Health probes run on this host for this node's instances",
                &m.checks_run,
            ),
            (
                "verdicts_reported",
                "Health verdict changes reported to the registry",
                &m.verdicts_reported,
            ),
            (
                "load_reports",
                "Load reports sent (loads within the dead band are not resent)",
                &m.load_reports,
            ),
            (
                "load_samples_cgroup",
                "Container load samples read from cgroup files",
                &m.load_samples_cgroup,
            ),
            (
                "load_samples_engine",
                "Container load samples taken through the engine's stats API",
                &m.load_samples_engine,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        registry.register(
            "registrations",
            "Instances registered",
            m.registrations.clone(),
        );
        registry.register(
            "deregistrations",
            "Instances deregistered",
            m.deregistrations.clone(),
        );
        registry.register(
            "resyncs",
            "Full resyncs against the engine",
            m.resyncs.clone(),
        );
        m.http.register(&mut registry);
        registry.register(
            "docker_events",
            "Docker events handled",
            m.docker_events.clone(),
        );
        registry.register("lease_renewals", "Node lease renewals", m.renewals.clone());
        registry.register(
            "lease_renewal_failures",
            "Failed node lease renewals",
            m.renewal_failures.clone(),
        );
        registry.register(
            "label_errors",
            "Containers whose labels were rejected",
            m.label_errors.clone(),
        );
        registry.register(
            "instances",
            "Instances registered by this agent",
            m.instances.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
