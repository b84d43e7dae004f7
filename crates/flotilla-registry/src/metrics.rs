//! Prometheus metrics of the registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of probe counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    /// Check type.
    pub kind: String,
    /// "ok" or "fail".
    pub outcome: String,
}

/// All registry metrics.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by method and status.
    pub http: flotilla_http::metrics::RequestMetrics,
    /// Registered instances.
    pub instances: Gauge,
    /// Passing instances.
    pub passing: Gauge,
    /// Known nodes.
    pub nodes: Gauge,
    /// 1 while this server holds the checking duty.
    pub leader: Gauge,
    /// Catalog index (store revision) applied.
    pub catalog_index: Gauge,
    /// Health probes run.
    pub probes: Family<ProbeLabels, Counter>,
    /// Health transitions written.
    pub transitions: Counter,
    /// Nodes expired for lease silence.
    pub node_expirations: Counter,
    /// Instances removed by `deregister_after` or as orphans.
    pub reaped: Counter,
    /// Blocking queries currently waiting.
    pub waiting: Gauge,
    /// Service reads answered with only what changed (`?delta=true` within the log).
    pub delta_answers: Counter,
    /// Store errors seen.
    pub store_errors: Counter,
    /// Catalog resyncs from a fresh snapshot.
    pub resyncs: Counter,
    /// DNS queries answered.
    pub dns_queries: Counter,
    /// Store commits (group-committed batches).
    pub store_commits: Counter,
    /// Writes carried by those commits.
    pub store_writes: Counter,
    /// Batches whose commit failed.
    pub store_failed_commits: Counter,
    /// Writes refused because the store's queue was full (answered 503).
    pub store_rejected_writes: Counter,
    /// Writes waiting for a commit.
    pub store_queued_writes: Gauge,
    /// Queue length past which writes are refused (follows the commit rate).
    pub store_queue_limit: Gauge,
    /// Writes refused because `max_inflight_writes` were being worked on.
    pub busy_writes: Counter,
    /// Requests made with a node certificate for something that node may not do.
    pub refused_node_requests: Counter,
    /// Requests refused because a scoped token's role may not make them.
    pub refused_token_requests: Counter,
    /// Node certificates issued (joins and renewals).
    pub node_certs_issued: Counter,
    /// Compactions of the store's history this server made.
    pub compactions: Counter,
    /// The revision the store's history was last compacted to by this server.
    pub compacted_revision: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("flotilla_registry");
        let m = Metrics {
            http: Default::default(),
            instances: Gauge::default(),
            passing: Gauge::default(),
            nodes: Gauge::default(),
            leader: Gauge::default(),
            catalog_index: Gauge::default(),
            probes: Family::default(),
            transitions: Counter::default(),
            node_expirations: Counter::default(),
            reaped: Counter::default(),
            waiting: Gauge::default(),
            delta_answers: Counter::default(),
            store_errors: Counter::default(),
            resyncs: Counter::default(),
            dns_queries: Counter::default(),
            store_commits: Counter::default(),
            store_writes: Counter::default(),
            store_failed_commits: Counter::default(),
            store_rejected_writes: Counter::default(),
            store_queued_writes: Gauge::default(),
            store_queue_limit: Gauge::default(),
            busy_writes: Counter::default(),
            refused_node_requests: Counter::default(),
            node_certs_issued: Counter::default(),
            refused_token_requests: Counter::default(),
            compactions: Counter::default(),
            compacted_revision: Gauge::default(),
            registry: Registry::default(),
        };
        m.http.register(&mut registry);
        registry.register("instances", "Registered instances", m.instances.clone());
        registry.register(
            "passing_instances",
            "Instances passing their checks",
            m.passing.clone(),
        );
        registry.register("nodes", "Nodes holding a lease", m.nodes.clone());
        registry.register(
            "leader",
            "1 while this server runs the checking duty",
            m.leader.clone(),
        );
        registry.register(
            "catalog_index",
            "Store revision applied to the catalog",
            m.catalog_index.clone(),
        );
        registry.register("probes", "Health probes run", m.probes.clone());
        registry.register(
            "health_transitions",
            "Health verdict changes written",
            m.transitions.clone(),
        );
        registry.register(
            "node_expirations",
            "Nodes expired for lease silence",
            m.node_expirations.clone(),
        );
        registry.register(
            "reaped_instances",
            "Instances removed by deregister_after or as orphans",
            m.reaped.clone(),
        );
        registry.register(
            "blocking_waiters",
            "Blocking queries waiting",
            m.waiting.clone(),
        );
        registry.register(
            "service_delta_answers",
            "Service reads answered with only the instances that changed",
            m.delta_answers.clone(),
        );
        registry.register(
            "store_errors",
            "Store operations that failed",
            m.store_errors.clone(),
        );
        registry.register(
            "catalog_resyncs",
            "Catalog rebuilds from a fresh snapshot",
            m.resyncs.clone(),
        );
        registry.register("dns_queries", "DNS queries answered", m.dns_queries.clone());
        registry.register(
            "store_commits",
            "Durable store commits (each a batch of writes)",
            m.store_commits.clone(),
        );
        registry.register(
            "store_writes",
            "Writes carried by store commits",
            m.store_writes.clone(),
        );
        registry.register(
            "store_failed_commits",
            "Store commits that failed (every write in them was answered with the error)",
            m.store_failed_commits.clone(),
        );
        registry.register(
            "store_rejected_writes",
            "Writes refused with 503 because the store's queue was full",
            m.store_rejected_writes.clone(),
        );
        registry.register(
            "store_queued_writes",
            "Writes waiting for a store commit",
            m.store_queued_writes.clone(),
        );
        registry.register(
            "store_queue_limit",
            "Queued writes past which new writes are refused",
            m.store_queue_limit.clone(),
        );
        registry.register(
            "busy_writes",
            "Writes refused with 503 because max_inflight_writes were in flight",
            m.busy_writes.clone(),
        );
        registry.register(
            "refused_node_requests",
            "Requests refused (403) because a node certificate may not make them",
            m.refused_node_requests.clone(),
        );
        registry.register(
            "refused_token_requests",
            "Requests refused (403) because a scoped token's role may not make them",
            m.refused_token_requests.clone(),
        );
        registry.register(
            "node_certs_issued",
            "Node certificates issued to joining and renewing agents",
            m.node_certs_issued.clone(),
        );
        registry.register(
            "store_compactions",
            "Compactions of the store's history (etcd) made by this server",
            m.compactions.clone(),
        );
        registry.register(
            "store_compacted_revision",
            "Revision the store's history was last compacted to by this server",
            m.compacted_revision.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Brings the store counters up to the store's own (which count from its start).
    pub fn observe_store(&self, c: &flotilla_store::WriteCounts) {
        let catch_up = |counter: &Counter, total: u64| {
            counter.inc_by(total.saturating_sub(counter.get()));
        };
        catch_up(&self.store_commits, c.commits);
        catch_up(&self.store_writes, c.writes);
        catch_up(&self.store_failed_commits, c.failed_commits);
        catch_up(&self.store_rejected_writes, c.rejected);
        self.store_queued_writes.set(c.queued as i64);
        self.store_queue_limit.set(c.limit as i64);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
