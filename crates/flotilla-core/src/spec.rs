//! What an agent (or any client) registers: an instance and its health checks.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{id, FieldError};

/// Most metadata entries one instance may carry; keeps records and watch payloads small.
pub const MAX_META_ENTRIES: usize = 64;
/// Longest metadata key or value.
pub const MAX_META_LEN: usize = 512;
/// Most checks per instance.
pub const MAX_CHECKS: usize = 8;

/// A service instance as registered: where it listens and how to check it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Service this instance belongs to (a DNS label).
    pub service: String,
    /// Node (agent) that owns this instance; its lease bounds the instance's life.
    #[serde(default)]
    pub node: Option<String>,
    /// Address clients connect to.
    pub address: IpAddr,
    /// Port clients connect to.
    pub port: u16,
    /// Static weight, 1..=10000; the feedback controller scales from it.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Free-form labels (container name, image, version...).
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Health checks run by the registry (http, tcp) or reported to it (ttl, exec).
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
    /// The owning node's agent runs this instance's checks on its own host and reports
    /// each verdict change (`PUT /v1/instances/{id}/health`); the elected server then
    /// does not probe it. Needs `node` and no TTL check (a TTL is judged by the server).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node_checks: bool,
}

fn default_weight() -> u32 {
    100
}

/// How an instance is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum CheckKind {
    /// GET `http://address:port{path}`; any 2xx passes.
    Http {
        /// Request path, starting with '/'.
        path: String,
        /// Port to check if not the service port.
        #[serde(default)]
        port: Option<u16>,
    },
    /// TCP connect to `address:port`.
    Tcp {
        /// Port to check if not the service port.
        #[serde(default)]
        port: Option<u16>,
    },
    /// Passing while renewed (`PUT /v1/instances/{id}/renew`) at least every `ttl`.
    Ttl {
        /// Longest silence that still counts as passing.
        #[serde(with = "humantime_serde")]
        ttl: Duration,
    },
    /// A command run inside the container by the agent, which reports the outcome.
    Exec {
        /// argv of the command; exit 0 passes.
        command: Vec<String>,
    },
    /// The container's own Docker `HEALTHCHECK` (from its image or its `docker run`):
    /// passing while the engine says `healthy`. Read by the agent from the engine, so
    /// its start period and retries are the engine's; what a labelled container with a
    /// `HEALTHCHECK` and no `flotilla.check.*` label gets.
    Docker,
}

/// One health check with its timing and hysteresis. (Unknown keys are rejected by the
/// flattened `CheckKind`, which sees every key this struct does not take.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    /// What to check.
    #[serde(flatten)]
    pub kind: CheckKind,
    /// Time between probes (default 1 s).
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Probe timeout (default: half the interval, at most 1 s).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Consecutive successes before critical → passing (default 1).
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures before passing → critical (default 2).
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Remove the instance after it has been critical this long (default: never).
    #[serde(default, with = "humantime_serde")]
    pub deregister_after: Option<Duration>,
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_rise() -> u32 {
    1
}
fn default_fall() -> u32 {
    2
}

impl CheckSpec {
    /// A check of `kind` with the default timing (1 s interval, rise 1, fall 2).
    pub fn new(kind: CheckKind) -> Self {
        CheckSpec {
            kind,
            interval: default_interval(),
            timeout: None,
            rise: default_rise(),
            fall: default_fall(),
            deregister_after: None,
        }
    }

    /// The probe timeout in force.
    pub fn effective_timeout(&self) -> Duration {
        self.timeout
            .unwrap_or_else(|| (self.interval / 2).min(Duration::from_secs(1)))
    }

    /// Checks the values, naming `field` (e.g. `checks[0]`) in errors.
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        let ms = self.interval.as_millis();
        if !(100..=3_600_000).contains(&ms) {
            return Err(FieldError::new(
                format!("{field}.interval"),
                "must be between 100ms and 1h",
            ));
        }
        if let Some(t) = self.timeout {
            if t.is_zero() || t > self.interval.max(Duration::from_secs(1)) * 10 {
                return Err(FieldError::new(
                    format!("{field}.timeout"),
                    "must be positive and at most 10 intervals",
                ));
            }
        }
        if !(1..=100).contains(&self.rise) {
            return Err(FieldError::new(format!("{field}.rise"), "must be 1..=100"));
        }
        if !(1..=100).contains(&self.fall) {
            return Err(FieldError::new(format!("{field}.fall"), "must be 1..=100"));
        }
        match &self.kind {
            CheckKind::Http { path, .. } => {
                if !path.starts_with('/')
                    || path.len() > 1024
                    || path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(FieldError::new(
                        format!("{field}.path"),
                        format!("{path:?} is not an absolute URL path"),
                    ));
                }
            }
            CheckKind::Ttl { ttl } => {
                if ttl.as_millis() < 100 {
                    return Err(FieldError::new(
                        format!("{field}.ttl"),
                        "must be at least 100ms",
                    ));
                }
            }
            CheckKind::Exec { command } => {
                if command.is_empty()
                    || command.len() > 64
                    || command.iter().any(|a| a.len() > 4096)
                {
                    return Err(FieldError::new(
                        format!("{field}.command"),
                        "must have 1-64 arguments of at most 4096 bytes",
                    ));
                }
            }
            CheckKind::Tcp { .. } | CheckKind::Docker => {}
        }
        Ok(())
    }
}

impl InstanceSpec {
    /// Checks every field, returning the first that is wrong.
    pub fn validate(&self) -> Result<(), FieldError> {
        id::validate_service_name("service", &self.service)?;
        if let Some(node) = &self.node {
            id::validate_node_name("node", node)?;
        }
        if self.port == 0 {
            return Err(FieldError::new("port", "must be 1..=65535"));
        }
        if self.address.is_unspecified() {
            return Err(FieldError::new(
                "address",
                format!("{} is not a routable address", self.address),
            ));
        }
        if !(1..=10_000).contains(&self.weight) {
            return Err(FieldError::new(
                "weight",
                format!("{} is outside 1..=10000", self.weight),
            ));
        }
        if self.meta.len() > MAX_META_ENTRIES {
            return Err(FieldError::new(
                "meta",
                format!("at most {MAX_META_ENTRIES} entries"),
            ));
        }
        for (k, v) in &self.meta {
            if k.is_empty() || k.len() > MAX_META_LEN || v.len() > MAX_META_LEN {
                return Err(FieldError::new(
                    format!("meta.{k}"),
                    format!("keys 1-{MAX_META_LEN} bytes, values at most {MAX_META_LEN}"),
                ));
            }
        }
        if self.checks.len() > MAX_CHECKS {
            return Err(FieldError::new(
                "checks",
                format!("at most {MAX_CHECKS} checks"),
            ));
        }
        for (i, c) in self.checks.iter().enumerate() {
            c.validate(&format!("checks[{i}]"))?;
        }
        if self.node_checks {
            if self.node.is_none() {
                return Err(FieldError::new(
                    "node_checks",
                    "needs `node`: only an instance's own agent can run its checks",
                ));
            }
            if let Some(i) = self
                .checks
                .iter()
                .position(|c| matches!(c.kind, CheckKind::Ttl { .. }))
            {
                return Err(FieldError::new(
                    format!("checks[{i}]"),
                    "a TTL check is judged by the server: it cannot be combined with node_checks",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        serde_json::from_str(
            r#"{"service":"web","address":"198.18.0.2","port":80,
                "checks":[{"type":"http","path":"/health","interval":"500ms"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn node_checks_need_a_node_and_no_ttl() {
        let mut s = spec();
        s.node_checks = true;
        assert_eq!(s.validate().unwrap_err().field, "node_checks");
        s.node = Some("a".into());
        s.validate().unwrap();
        s.checks.push(CheckSpec::new(CheckKind::Ttl {
            ttl: Duration::from_secs(5),
        }));
        assert_eq!(s.validate().unwrap_err().field, "checks[1]");
        // Absent from the JSON when off, so records written before it read the same.
        let plain = serde_json::to_value(spec()).unwrap();
        assert!(plain.get("node_checks").is_none());
    }

    #[test]
    fn defaults_are_fast() {
        let s = spec();
        assert_eq!(s.weight, 100);
        let c = &s.checks[0];
        assert_eq!((c.rise, c.fall), (1, 2));
        assert_eq!(c.interval, Duration::from_millis(500));
        assert_eq!(c.effective_timeout(), Duration::from_millis(250));
        s.validate().unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = spec();
        s.checks[0].fall = 0;
        assert_eq!(s.validate().unwrap_err().field, "checks[0].fall");
        let mut s = spec();
        s.port = 0;
        assert_eq!(s.validate().unwrap_err().field, "port");
        let mut s = spec();
        s.service = "Bad Name".into();
        assert_eq!(s.validate().unwrap_err().field, "service");
    }

    #[test]
    fn unknown_fields_rejected() {
        let err = serde_json::from_str::<InstanceSpec>(
            r#"{"service":"web","address":"198.18.0.2","port":80,"colour":"red"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err =
            serde_json::from_str::<CheckSpec>(r#"{"type":"tcp","intervl":"1s"}"#).unwrap_err();
        assert!(err.to_string().contains("intervl"), "{err}");
    }
}
