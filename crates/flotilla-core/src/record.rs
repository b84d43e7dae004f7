//! Versioned records the registry persists and serves.
//!
//! Every persisted record carries `v` so a later release can read (and migrate) what an
//! earlier one wrote.

use serde::{Deserialize, Serialize};

use crate::InstanceSpec;

/// Current version of persisted records.
pub const RECORD_VERSION: u32 = 1;

/// A registered instance as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Record format version.
    pub v: u32,
    /// Registry id.
    pub id: String,
    /// What was registered.
    pub spec: InstanceSpec,
    /// Wall-clock registration time, unix milliseconds.
    pub registered_ms: u64,
}

/// Health as the checker last decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Gets traffic.
    Passing,
    /// Gets no traffic.
    Critical,
}

/// The checker's verdict for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    /// Record format version.
    pub v: u32,
    /// Verdict.
    pub status: HealthStatus,
    /// Last probe output (error text or HTTP status).
    pub output: String,
    /// Wall-clock time of the last transition, unix milliseconds.
    pub since_ms: u64,
}

/// A node (one agent) and its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Record format version.
    pub v: u32,
    /// Node name.
    pub name: String,
    /// Lease TTL in milliseconds.
    pub ttl_ms: u64,
    /// Address the agent reported (informational).
    #[serde(default)]
    pub address: Option<String>,
    /// URL of the agent's own API (images, backup, restore), if it serves one.
    #[serde(default)]
    pub api: Option<String>,
    /// Bumped on every renewal so each renewal is a visible store change.
    pub renewals: u64,
    /// Wall-clock time of the last renewal, unix milliseconds.
    pub renewed_ms: u64,
    /// Up to when (server clock, unix ms) the agent vouches that its instances' load
    /// reports are current: it reports a load only when it moves past a dead band, so
    /// an unchanged load stays fresh through the lease renewal instead of costing a
    /// store write per instance per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loads_ms: Option<u64>,
}

/// An instance as the API serves it: spec, id and current health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    /// Registry id.
    pub id: String,
    /// Service name.
    pub service: String,
    /// Owning node, if any.
    pub node: Option<String>,
    /// Address.
    pub address: std::net::IpAddr,
    /// Port.
    pub port: u16,
    /// Static weight.
    pub weight: u32,
    /// Labels.
    pub meta: std::collections::BTreeMap<String, String>,
    /// Current health (critical until the first passing verdict).
    pub health: HealthStatus,
    /// Last probe output.
    pub output: String,
    /// Checks as registered.
    pub checks: Vec<crate::CheckSpec>,
    /// Weight the active load balancer's feedback controller published, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_weight: Option<f64>,
    /// The agent's latest load report, while fresh (soft state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<InstanceLoad>,
}

/// An instance's load as its agent last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InstanceLoad {
    /// CPU use as a share of the container's quota.
    pub cpu: f64,
    /// Memory use as a share of its limit.
    pub memory: f64,
    /// How old the report is, ms (as this server saw it arrive).
    pub age_ms: u64,
}

/// A load report as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadRecord {
    /// Record format version.
    pub v: u32,
    /// CPU share of the quota.
    pub cpu: f64,
    /// Memory share of the limit.
    pub memory: f64,
    /// Wall-clock time (unix ms), informational.
    pub at_ms: u64,
}

/// What an lb reports about itself every few seconds (`PUT /v1/lbs/{name}`): its
/// VRRP state and its traffic, for the dashboard's lb page and the request rate and
/// p99 on each service's page. Soft state: a report older than a few periods means
/// the lb is gone or cut off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbReport {
    /// Record format version.
    #[serde(default = "record_version")]
    pub v: u32,
    /// The longest time between the lb's reports, ms (it reports sooner when something
    /// changes); a report older than 3 of these is stale.
    pub period_ms: u64,
    /// The VRRP member, when the lb runs `[ha]`.
    #[serde(default)]
    pub ha: Option<LbHa>,
    /// One entry per listener.
    pub listeners: Vec<LbListenerReport>,
    /// When the server stored it (unix ms; set by the server, not the lb).
    #[serde(default)]
    pub at_ms: u64,
}

fn record_version() -> u32 {
    RECORD_VERSION
}

/// An lb's VRRP member as it reports itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbHa {
    /// `init`, `backup`, `master` or `fault`.
    pub state: String,
    /// Effective priority (after tracking).
    pub priority: u8,
    /// The master it hears (or itself).
    #[serde(default)]
    pub master: Option<String>,
    /// The virtual IPs of its router.
    pub vips: Vec<String>,
    /// State changes since it started.
    pub transitions: u64,
    /// The latest changes, oldest first.
    #[serde(default)]
    pub history: Vec<LbTransition>,
}

/// One VRRP state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbTransition {
    /// When (unix ms, the lb's clock).
    pub at_ms: u64,
    /// The state left.
    pub from: String,
    /// The state entered.
    pub to: String,
    /// Why.
    pub reason: String,
}

/// One listener's traffic over the last report period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbListenerReport {
    /// Listener name.
    pub name: String,
    /// The service it fronts, if it follows one.
    #[serde(default)]
    pub service: Option<String>,
    /// Requests sent to backends per second.
    pub requests_per_s: f64,
    /// Failed requests per second.
    pub failures_per_s: f64,
    /// 99th percentile of the backends' response times, ms (`None`: no requests), as
    /// the upper bound of the histogram bucket it falls in.
    #[serde(default)]
    pub p99_ms: Option<f64>,
    /// Backends in the set.
    pub backends: u32,
    /// Each backend's p99 over the period, ms (bucket bound), by `ip:port`; backends
    /// that answered nothing in the period are left out.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub backend_p99_ms: std::collections::BTreeMap<String, f64>,
}

const STATES: [&str; 4] = ["init", "backup", "master", "fault"];

impl LbReport {
    /// Checks the values an lb sent, naming the field.
    pub fn validate(&self) -> Result<(), crate::FieldError> {
        let err = |f: &str, m: String| Err(crate::FieldError::new(f, m));
        if !(100..=600_000).contains(&self.period_ms) {
            return err(
                "period_ms",
                format!("{} is not in 100..=600000", self.period_ms),
            );
        }
        if self.listeners.len() > 256 {
            return err("listeners", "more than 256".into());
        }
        let short = |s: &str| !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control);
        for (i, l) in self.listeners.iter().enumerate() {
            let f = format!("listeners[{i}]");
            if !short(&l.name) {
                return err(
                    &format!("{f}.name"),
                    format!("{:?}: 1-128 printable characters", l.name),
                );
            }
            if let Some(s) = &l.service {
                crate::id::validate_service_name(&format!("{f}.service"), s)?;
            }
            let numbers = [l.requests_per_s, l.failures_per_s, l.p99_ms.unwrap_or(0.0)];
            if numbers.iter().any(|n| !n.is_finite() || *n < 0.0) {
                return err(&f, "rates and p99 are finite and not negative".into());
            }
            if l.backend_p99_ms.len() > 4096 {
                return err(&format!("{f}.backend_p99_ms"), "more than 4096".into());
            }
            for (addr, p99) in &l.backend_p99_ms {
                if addr.parse::<std::net::SocketAddr>().is_err() || !p99.is_finite() || *p99 < 0.0 {
                    return err(
                        &format!("{f}.backend_p99_ms.{addr}"),
                        format!("{p99} for {addr:?}: keys are ip:port, values finite ms"),
                    );
                }
            }
        }
        if let Some(h) = &self.ha {
            let states = std::iter::once(h.state.as_str()).chain(
                h.history
                    .iter()
                    .flat_map(|t| [t.from.as_str(), t.to.as_str()]),
            );
            for s in states {
                if !STATES.contains(&s) {
                    return err(
                        "ha.state",
                        format!("{s:?}: expected init, backup, master or fault"),
                    );
                }
            }
            if h.vips.len() > 64 || h.vips.iter().any(|v| !short(v)) {
                return err("ha.vips", "at most 64 addresses".into());
            }
            if h.history.len() > 32 || h.history.iter().any(|t| t.reason.len() > 256) {
                return err("ha.history", "at most 32 entries of short reasons".into());
            }
        }
        Ok(())
    }
}

/// The backup archives one node keeps (its replicas' own and copies of others'), as
/// its agent reports them (`PUT /v1/nodes/{name}/backups`) for the dashboard's backups
/// page: per replica, the newest, its size, whether it verified, and where the copies
/// are. Sent when the set changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupInventory {
    /// Record format version.
    #[serde(default = "record_version")]
    pub v: u32,
    /// The archives.
    pub archives: Vec<HeldArchive>,
    /// When the server stored it (unix ms; set by the server).
    #[serde(default)]
    pub at_ms: u64,
}

/// One archive a node keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldArchive {
    /// Stack.
    pub stack: String,
    /// Service.
    pub service: String,
    /// Replica number.
    pub replica: u32,
    /// File name.
    pub name: String,
    /// When it was taken (unix ms).
    pub taken_ms: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// An incremental one (restored on top of the archive it follows).
    pub delta: bool,
    /// Whether the agent read it whole and every digest matched (`None`: not yet).
    #[serde(default)]
    pub verified: Option<bool>,
}

/// Most archives one inventory may list.
pub const MAX_HELD_ARCHIVES: usize = 10_000;

impl BackupInventory {
    /// Checks what an agent sent, naming the field.
    pub fn validate(&self) -> Result<(), crate::FieldError> {
        if self.archives.len() > MAX_HELD_ARCHIVES {
            return Err(crate::FieldError::new(
                "archives",
                format!("more than {MAX_HELD_ARCHIVES}"),
            ));
        }
        for (i, a) in self.archives.iter().enumerate() {
            let f = |k: &str| format!("archives[{i}].{k}");
            crate::id::validate_service_name(&f("stack"), &a.stack)?;
            crate::id::validate_service_name(&f("service"), &a.service)?;
            let name_ok = !a.name.is_empty()
                && a.name.len() <= 255
                && !a.name.contains('/')
                && !a.name.chars().any(char::is_control);
            if !name_ok {
                return Err(crate::FieldError::new(
                    f("name"),
                    format!("{:?} is not a file name", a.name),
                ));
            }
        }
        Ok(())
    }
}

/// Feedback weights of one service as the active lb published them, keyed by
/// `address:port`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsRecord {
    /// Record format version.
    pub v: u32,
    /// Weights by `ip:port`.
    pub weights: std::collections::BTreeMap<String, f64>,
    /// Which lb published them.
    #[serde(default)]
    pub from: String,
    /// Wall-clock time of publication (unix ms).
    pub at_ms: u64,
}

/// The node certificates of one node that are revoked: every one issued up to
/// `before_ms` (`flotilla cert revoke NODE`). A certificate issued later — the node
/// joined again with a token — is good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRevocation {
    /// Record format version.
    pub v: u32,
    /// The node.
    pub node: String,
    /// Certificates issued at or before this time (unix ms) are refused.
    pub before_ms: u64,
}

/// Summary of one service, as `GET /v1/services` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// Service name.
    pub name: String,
    /// Registered instances.
    pub instances: usize,
    /// Of which passing.
    pub passing: usize,
    /// Index of the last change to this service.
    pub index: u64,
}

/// One service's instances, as `GET /v1/services/{name}` serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInstances {
    /// Service name.
    pub service: String,
    /// Index of the service's last change.
    pub index: u64,
    /// Instances (only passing ones with `?passing=true`). In a delta answer only the
    /// instances that changed since the query's `index`, with their whole current view.
    pub instances: Vec<InstanceView>,
    /// Whether this is a delta answer (`?delta=true` and the server's change log reached
    /// back to the query's `index`); otherwise `instances` is the whole service.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delta: bool,
    /// In a delta answer: ids gone since the query's `index` (deregistered, moved to
    /// another service, or — with `?passing=true` — no longer passing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

/// A node as `GET /v1/nodes` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Agent-reported address.
    pub address: Option<String>,
    /// URL of the agent's API, if it serves one.
    #[serde(default)]
    pub api: Option<String>,
    /// Lease TTL in milliseconds.
    pub ttl_ms: u64,
    /// Wall-clock time of the last renewal (unix ms).
    pub renewed_ms: u64,
    /// Lease renewals since the node registered.
    #[serde(default)]
    pub renewals: u64,
    /// Instances the node owns.
    pub instances: usize,
}

/// Milliseconds since the unix epoch, for informational timestamps only (never timers).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A UTC time as archive names carry it: `20261129T224915.123Z` — readable at a glance,
/// fixed width, so name order is time order.
pub fn file_stamp(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t)
        .to_string()
        .replace(['-', ':'], "")
}

/// The unix ms a [`file_stamp`] stands for; also accepts the plain unix-ms stamps older
/// archive names carry. `None` for anything else.
pub fn parse_file_stamp(s: &str) -> Option<u64> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(s) && s.len() <= 20 {
        return s.parse().ok();
    }
    let b = s.as_bytes();
    let shaped = b.len() == 20
        && digits(&s[..8])
        && b[8] == b'T'
        && digits(&s[9..15])
        && b[15] == b'.'
        && digits(&s[16..19])
        && b[19] == b'Z';
    if !shaped {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..19]
    );
    let t = humantime::parse_rfc3339(&rfc3339).ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

#[cfg(test)]
mod stamp_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stamps_read_as_utc_and_old_unix_ms_stamps_still_parse() {
        assert_eq!(file_stamp(1_764_456_555_123), "20251129T224915.123Z");
        assert_eq!(
            parse_file_stamp("20251129T224915.123Z"),
            Some(1_764_456_555_123)
        );
        assert_eq!(parse_file_stamp("1764456555123"), Some(1_764_456_555_123));
        for bad in [
            "",
            "2025-11-29",
            "20251129T224915Z",
            "20251129T2249x5.123Z",
            "20251329T224915.123Z",
            "../1",
        ] {
            assert_eq!(parse_file_stamp(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn stamps_round_trip_and_sort_as_time(a in 0u64..4_000_000_000_000, b in 0u64..4_000_000_000_000) {
            prop_assert_eq!(parse_file_stamp(&file_stamp(a)), Some(a));
            prop_assert_eq!(file_stamp(a).len(), 20);
            prop_assert_eq!(file_stamp(a).cmp(&file_stamp(b)), a.cmp(&b));
        }
    }

    #[test]
    fn an_lb_report_is_checked_field_by_field() {
        let good = |f: &dyn Fn(&mut LbReport)| {
            let mut r: LbReport = serde_json::from_value(serde_json::json!({
                "period_ms": 2000,
                "ha": {"state": "master", "priority": 150, "vips": ["198.18.0.100/24"], "transitions": 2,
                       "history": [{"at_ms": 1, "from": "backup", "to": "master", "reason": "master down"}]},
                "listeners": [{"name": "web", "service": "web", "requests_per_s": 12.5,
                               "failures_per_s": 0.0, "p99_ms": 5.0, "backends": 3}]
            }))
            .unwrap();
            f(&mut r);
            r.validate().map_err(|e| e.field)
        };
        assert_eq!(good(&|_| {}), Ok(()));
        assert_eq!(good(&|r| r.period_ms = 5), Err("period_ms".into()));
        assert_eq!(
            good(&|r| r.listeners[0].requests_per_s = f64::NAN),
            Err("listeners[0]".into())
        );
        assert_eq!(
            good(&|r| r.listeners[0].service = Some("Web".into())),
            Err("listeners[0].service".into())
        );
        assert_eq!(
            good(&|r| r.ha.as_mut().unwrap().state = "boss".into()),
            Err("ha.state".into())
        );
        assert!(serde_json::from_str::<LbReport>(
            r#"{"period_ms": 1, "listeners": [], "extra": 1}"#
        )
        .is_err());
    }

    #[test]
    fn a_backup_inventory_names_its_bad_entry() {
        let inv = |name: &str, stack: &str| BackupInventory {
            v: 1,
            archives: vec![HeldArchive {
                stack: stack.into(),
                service: "db".into(),
                replica: 0,
                name: name.into(),
                taken_ms: 1,
                bytes: 10,
                delta: false,
                verified: Some(true),
            }],
            at_ms: 0,
        };
        assert_eq!(
            inv("shop-db-0-1.flotilla-backup", "shop").validate(),
            Ok(())
        );
        assert_eq!(
            inv("../x", "shop").validate().unwrap_err().field,
            "archives[0].name"
        );
        assert_eq!(
            inv("a", "Shop").validate().unwrap_err().field,
            "archives[0].stack"
        );
    }
}
