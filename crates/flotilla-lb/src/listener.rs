//! A listener's shared state: its config, scheduler and the current backend set.
//!
//! The set is an immutable `Vec<Arc<Backend>>` swapped atomically; a request holds the
//! `Arc` of the backend it uses, so a backend removed from the set drains: it gets no
//! new requests and its in-flight ones finish undisturbed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::backend::Backend;
use crate::config::{ListenerConfig, StaticBackend};
use crate::scheduler::{self, PickContext, Scheduler};

/// One listener.
pub struct Listener {
    /// Its config.
    pub cfg: ListenerConfig,
    /// Its scheduler.
    pub scheduler: Box<dyn Scheduler>,
    /// The hash key, when the scheduler hashes (parsed once, not per request).
    pub hash: Option<crate::config::HashKey>,
    /// Peers whose `X-Forwarded-For`, `Forwarded` and `X-Real-IP` are kept (parsed once).
    pub trusted_proxies: Vec<crate::config::IpNet>,
    /// Error pages name backends (`[admin] verbose_errors`); otherwise they say only what
    /// went wrong, so clients learn nothing of the addresses behind the lb.
    pub verbose_errors: bool,
    /// Traffic counters (`/metrics`).
    pub stats: Arc<crate::stats::ListenerStats>,
    backends: ArcSwap<Vec<Arc<Backend>>>,
    /// Backends removed from the set that still had requests in flight, for status.
    draining: std::sync::Mutex<Vec<Arc<Backend>>>,
}

impl Listener {
    /// A listener with its static backends (none for a registry-fed one); `cfg` must be
    /// validated.
    pub fn new(cfg: ListenerConfig, verbose_errors: bool) -> Arc<Self> {
        let now = Instant::now();
        let initial: Vec<Arc<Backend>> = cfg
            .static_backends()
            .into_iter()
            // Static backends are there from the start: no slow start.
            .map(|b| Backend::new(b.addr, b.weight, std::time::Duration::ZERO, now))
            .collect();
        Arc::new(Listener {
            scheduler: scheduler::build(cfg.scheduler),
            hash: (cfg.scheduler == crate::config::SchedulerKind::Hash).then(|| cfg.hash_key()),
            trusted_proxies: cfg
                .trusted_proxies
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            verbose_errors,
            cfg,
            stats: Default::default(),
            backends: ArcSwap::from_pointee(initial),
            draining: Default::default(),
        })
    }

    /// The current backend set.
    pub fn backends(&self) -> arc_swap::Guard<Arc<Vec<Arc<Backend>>>> {
        self.backends.load()
    }

    /// Backends draining after removal (in-flight > 0).
    pub fn draining(&self) -> Vec<Arc<Backend>> {
        let mut d = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        d.retain(|b| b.in_flight() > 0);
        d.clone()
    }

    /// Replaces the backend set. Backends already known keep their state (in-flight
    /// counts, latency estimate, ejection); new ones start their slow-start ramp unless
    /// `initial` (the first set after start-up takes full traffic at once).
    pub fn update(&self, wanted: &[StaticBackend], initial: bool) -> (usize, usize) {
        let now = Instant::now();
        let current = self.backends.load();
        let mut added = 0;
        let next: Vec<Arc<Backend>> = wanted
            .iter()
            .map(|w| match current.iter().find(|b| b.addr == w.addr) {
                Some(b) => {
                    b.set_base_weight(w.weight);
                    b.clone()
                }
                None => {
                    added += 1;
                    let ramp = if initial {
                        std::time::Duration::ZERO
                    } else {
                        self.cfg.slow_start
                    };
                    Backend::new(w.addr, w.weight, ramp, now)
                }
            })
            .collect();
        let removed: Vec<Arc<Backend>> = current
            .iter()
            .filter(|b| !wanted.iter().any(|w| w.addr == b.addr))
            .cloned()
            .collect();
        let n_removed = removed.len();
        for b in &removed {
            tracing::info!(listener = self.cfg.name, backend = %b.addr, in_flight = b.in_flight(), "backend removed: draining");
            b.retire();
        }
        for b in &next {
            if !current.iter().any(|c| Arc::ptr_eq(c, b)) {
                tracing::info!(listener = self.cfg.name, backend = %b.addr, weight = b.base_weight(), "backend added");
            }
        }
        self.draining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(removed);
        self.backends.store(Arc::new(next));
        (added, n_removed)
    }

    /// Picks a backend for a request, skipping those already tried.
    pub fn pick(&self, key: u64, skip: &[SocketAddr]) -> Option<Arc<Backend>> {
        let set = self.backends.load();
        let now = Instant::now();
        if skip.is_empty() {
            let ctx = PickContext {
                now,
                key,
                skip: &[],
            };
            return self.scheduler.pick(&set, &ctx).map(|i| set[i].clone());
        }
        let skip_idx: Vec<usize> = set
            .iter()
            .enumerate()
            .filter(|(_, b)| skip.contains(&b.addr))
            .map(|(i, _)| i)
            .collect();
        let ctx = PickContext {
            now,
            key,
            skip: &skip_idx,
        };
        self.scheduler.pick(&set, &ctx).map(|i| set[i].clone())
    }

    /// Why nothing could be picked, for the 503 body.
    pub fn unavailable_reason(&self) -> String {
        let set = self.backends.load();
        let now = Instant::now();
        if set.is_empty() {
            return match &self.cfg.service {
                Some(s) => format!("no passing instance of service {s:?} in the registry"),
                None => "no backends configured".into(),
            };
        }
        let ejected = set.iter().filter(|b| b.ejected(now)).count();
        if ejected == set.len() {
            format!(
                "all {} backends are ejected by outlier detection",
                set.len()
            )
        } else {
            format!("all {} backends were tried and failed", set.len())
        }
    }

    /// The number of available (not ejected) backends.
    pub fn available(&self) -> usize {
        let now = Instant::now();
        self.backends
            .load()
            .iter()
            .filter(|b| b.available(now))
            .count()
    }

    /// The number of available (not ejected) backends other than `except`.
    pub fn others_available(&self, except: SocketAddr) -> usize {
        let now = Instant::now();
        self.backends
            .load()
            .iter()
            .filter(|b| b.addr != except && b.available(now))
            .count()
    }
}
