//! `flotilla lb --config FILE`: listeners, schedulers, registry, admin. Every field is
//! documented in docs/lb.md; unknown keys are rejected naming file, line and key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_core::{ConfigError, FieldError};
use serde::{Deserialize, Serialize};

/// The whole lb config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbConfig {
    /// Runtime settings.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Where live backends come from (needed by listeners with `service`).
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    /// Admin listener: `/metrics` and `/status`.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The listeners.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Optional VRRPv3 pairing with a peer lb (or Keepalived) over a virtual IP.
    #[serde(default)]
    pub ha: Option<flotilla_ha::config::HaConfig>,
}

/// `[runtime]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads (default: number of cores).
    pub worker_threads: Option<usize>,
}

/// `[registry]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registry URL.
    #[serde(default)]
    pub url: Option<String>,
    /// Several registry URLs: the lb uses one and moves to the next when it cannot be
    /// reached or answers 5xx. Given with `url`, `url` comes first.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Token file.
    pub token_file: Option<PathBuf>,
    /// The cluster CA's certificate, for `https://` registry URLs [default: `ca.pem`
    /// beside the token file, where `flotilla server` writes it].
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `sha256:HEX` of the cluster CA (as `flotilla server` printed it): with no CA file,
    /// the CA is fetched at start and used only if it matches.
    #[serde(default)]
    pub ca_hash: Option<String>,
    /// A directory (made 0700) for the lb's own certificate: with it and `https://`
    /// registry URLs the lb joins with its lb token (as an agent does), keeps the
    /// certificate here, renews it at half its lifetime, and from then on talks mutual
    /// TLS sending no token. The certificate is bound to that token: revoking the token
    /// cuts the lb off at once. Without it the lb sends its token on every request.
    #[serde(default)]
    pub cert_dir: Option<PathBuf>,
    /// The name this lb reports itself under (`PUT /v1/lbs/NAME`: VRRP state and
    /// traffic for the dashboard), and its certificate's name with `cert_dir`
    /// [default: the hostname].
    #[serde(default)]
    pub name: Option<String>,
    /// How often it samples its counters for the report (sent when something moved,
    /// and at least every 30 s); `"0s"`: never.
    #[serde(default = "default_report", with = "humantime_serde")]
    pub report: std::time::Duration,
}

fn default_report() -> std::time::Duration {
    std::time::Duration::from_secs(2)
}

impl RegistryConfig {
    /// The name this lb reports under and its certificate names: `name`, else this
    /// host's name; `None` if that is no valid node name.
    pub fn lb_name(&self) -> Option<String> {
        let name = match &self.name {
            Some(n) => n.to_owned(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()?
                .trim()
                .to_owned(),
        };
        flotilla_core::validate_node_name("registry.name", &name)
            .ok()
            .map(|_| name)
    }

    /// Every server URL, `url` first, as the client's comma-separated list.
    pub fn server_list(&self) -> String {
        self.url
            .iter()
            .chain(&self.urls)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener; `""` in the file: none.
    #[serde(with = "flotilla_core::config::off_or_addr")]
    pub listen: Option<SocketAddr>,
    /// 502/503/504 pages name the backend and the error (for debugging); off, they say
    /// only what went wrong.
    pub verbose_errors: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
            verbose_errors: false,
        }
    }
}

/// An address or a network (`198.18.0.1`, `198.18.0.0/15`, `::1/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or ADDRESS/PREFIX"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl IpNet {
    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
                (u32::from(a) as u128, u32::from(b) as u128, 32)
            }
            (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => {
                (u128::from(a), u128::from(b), 128)
            }
            _ => return false,
        };
        let shift = bits - self.prefix as u32;
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

/// L7 or L4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 from clients, HTTP/1.1 to backends.
    Http,
    /// TCP stream proxy.
    Tcp,
}

/// Scheduler names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerKind {
    /// Rotation, ignoring weights (but honouring slow start).
    RoundRobin,
    /// Smooth weighted round robin.
    Weighted,
    /// Fewest in-flight requests.
    LeastConn,
    /// Fewest in-flight requests per unit of weight.
    WeightedLeastConn,
    /// Power of two choices on in-flight / weight.
    P2c,
    /// Power of two choices on peak-EWMA latency × (in-flight + 1) / weight.
    P2cEwma,
    /// Consistent (weighted rendezvous) hashing on source IP or a header.
    Hash,
    /// Power of two choices on in-flight / weight, with weights set every period by the
    /// dynamic-feedback controller (docs/feedback.md).
    Feedback,
}

/// `[listener.outlier]`: passive health.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive connect errors or 5xx that eject a backend (0 disables).
    pub consecutive_failures: u32,
    /// First ejection length; doubles with each ejection in a row.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Longest ejection.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(60),
        }
    }
}

/// `[[listener]]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name (metrics label).
    pub name: String,
    /// Address to listen on.
    pub bind: SocketAddr,
    /// `http` or `tcp`.
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// Scheduler (default round-robin).
    #[serde(default = "default_scheduler")]
    pub scheduler: SchedulerKind,
    /// Registry service to follow (live backends).
    pub service: Option<String>,
    /// Static backends: `"ip:port"` or `"ip:port weight=N"`.
    #[serde(default)]
    pub backends: Vec<String>,
    /// Hash key for `scheduler = "hash"`: `"source-ip"` or `"header:NAME"`.
    #[serde(default = "default_hash_key")]
    pub hash_key: String,
    /// Backend connect timeout.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for a backend to send response headers.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Idle client keep-alive connections are closed after this; a TCP session with no
    /// bytes either way for this long is closed too.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Client connections open at once on this listener; past it, new ones wait in the
    /// kernel's backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// New backends ramp their weight from ~0 to full over this (0 = off).
    #[serde(default = "default_slow_start", with = "humantime_serde")]
    pub slow_start: Duration,
    /// Extra attempts on another backend after a connect failure (and, for idempotent
    /// requests without a body, after a reset before the response).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Passive health.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// TLS termination (HTTP listeners only).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Dynamic-feedback controller parameters (`scheduler = "feedback"`).
    #[serde(default)]
    pub feedback: crate::feedback::FeedbackConfig,
    /// Peers (addresses or networks) whose `X-Forwarded-For`, `Forwarded` and
    /// `X-Real-IP` are passed on; from anyone else they are replaced (XFF) or dropped,
    /// so a client cannot pose as another address to the backends.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// `[listener.tls]`: certificates served by SNI; the first is the default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificates (PEM chain + PEM key), reloaded on SIGHUP.
    #[serde(rename = "certificate")]
    pub certificates: Vec<CertificateConfig>,
}

/// One certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// SNI names this certificate answers (exact, or `*.example.com`).
    #[serde(default)]
    pub names: Vec<String>,
}

fn default_protocol() -> Protocol {
    Protocol::Http
}
fn default_scheduler() -> SchedulerKind {
    SchedulerKind::RoundRobin
}
fn default_hash_key() -> String {
    "source-ip".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    65_536
}
fn default_slow_start() -> Duration {
    Duration::from_secs(5)
}
fn default_retries() -> u32 {
    2
}

/// A parsed static backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticBackend {
    /// Address.
    pub addr: SocketAddr,
    /// Weight.
    pub weight: u32,
}

/// Parses `"ip:port"` or `"ip:port weight=N"`.
pub fn parse_backend(s: &str) -> Result<StaticBackend, String> {
    let mut parts = s.split_whitespace();
    let addr = parts.next().ok_or("empty backend")?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not ip:port"))?;
    let mut weight = 100;
    for p in parts {
        match p.split_once('=') {
            Some(("weight", w)) => {
                weight = w
                    .parse()
                    .ok()
                    .filter(|w| (1..=10_000).contains(w))
                    .ok_or(format!("weight {w:?} is not 1..=10000"))?
            }
            _ => return Err(format!("unknown backend option {p:?} (expected weight=N)")),
        }
    }
    Ok(StaticBackend { addr, weight })
}

/// The hash key in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// Client IP.
    SourceIp,
    /// A request header (HTTP only); falls back to the source IP when absent.
    Header(String),
}

impl ListenerConfig {
    /// Parsed static backends.
    pub fn static_backends(&self) -> Vec<StaticBackend> {
        self.backends
            .iter()
            .filter_map(|b| parse_backend(b).ok())
            .collect()
    }

    /// Parsed hash key.
    pub fn hash_key(&self) -> HashKey {
        match self.hash_key.strip_prefix("header:") {
            Some(h) => HashKey::Header(h.to_ascii_lowercase()),
            None => HashKey::SourceIp,
        }
    }

    fn validate(&self, i: usize) -> Result<(), FieldError> {
        let f = |k: &str| format!("listener[{i}].{k}");
        if self.name.is_empty() || self.name.len() > 64 {
            return Err(FieldError::new(f("name"), "1-64 characters"));
        }
        if self.service.is_some() && !self.backends.is_empty() {
            return Err(FieldError::new(
                f("backends"),
                "give either `service` or `backends`, not both",
            ));
        }
        if self.service.is_none() && self.backends.is_empty() {
            return Err(FieldError::new(
                f("service"),
                "give `service` (live from the registry) or `backends`",
            ));
        }
        if let Some(s) = &self.service {
            flotilla_core::validate_service_name(&f("service"), s)?;
        }
        for (j, b) in self.backends.iter().enumerate() {
            parse_backend(b)
                .map_err(|e| FieldError::new(format!("listener[{i}].backends[{j}]"), e))?;
        }
        if !(1..=10_000_000).contains(&self.max_connections) {
            return Err(FieldError::new(
                f("max_connections"),
                format!("{} must be 1..=10000000", self.max_connections),
            ));
        }
        for (j, n) in self.trusted_proxies.iter().enumerate() {
            n.parse::<IpNet>()
                .map_err(|e| FieldError::new(format!("listener[{i}].trusted_proxies[{j}]"), e))?;
        }
        if !(self.hash_key == "source-ip"
            || self
                .hash_key
                .strip_prefix("header:")
                .is_some_and(|h| !h.is_empty()))
        {
            return Err(FieldError::new(
                f("hash_key"),
                format!(
                    "{:?}: expected \"source-ip\" or \"header:NAME\"",
                    self.hash_key
                ),
            ));
        }
        if self.protocol == Protocol::Tcp && matches!(self.hash_key(), HashKey::Header(_)) {
            return Err(FieldError::new(
                f("hash_key"),
                "a tcp listener can only hash on source-ip",
            ));
        }
        for (k, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(FieldError::new(f(k), "must be positive"));
            }
        }
        if let Some(tls) = &self.tls {
            if self.protocol != Protocol::Http {
                return Err(FieldError::new(
                    f("tls"),
                    "TLS termination is for http listeners",
                ));
            }
            if tls.certificates.is_empty() {
                return Err(FieldError::new(
                    f("tls.certificate"),
                    "at least one certificate",
                ));
            }
        }
        let fb = &self.feedback;
        if fb.period < Duration::from_millis(100) || fb.period > Duration::from_secs(60) {
            return Err(FieldError::new(f("feedback.period"), "100ms..=60s"));
        }
        let gain_ok = fb.gain > 0.0 && fb.gain <= 2.0;
        let step_ok = fb.max_step > 0.0 && fb.max_step <= 1.0;
        if !(gain_ok && step_ok) {
            return Err(FieldError::new(
                f("feedback.gain"),
                "gain in (0, 2] and max_step in (0, 1]",
            ));
        }
        if !(fb.min_fraction > 0.0 && fb.min_fraction <= 1.0)
            || fb.scale < 1.0
            || !(0.0..1.0).contains(&fb.smoothing)
        {
            return Err(FieldError::new(
                f("feedback.scale"),
                "min_fraction in (0, 1], scale ≥ 1, smoothing in [0, 1)",
            ));
        }
        if fb.quota_period < Duration::from_millis(1) || fb.quota_period > Duration::from_secs(1) {
            // Docker's --cpu-period allows 1 ms to 1 s.
            return Err(FieldError::new(f("feedback.quota_period"), "1ms..=1s"));
        }
        if !(0.0..=1.0).contains(&fb.headroom_min_load) {
            return Err(FieldError::new(
                f("feedback.headroom_min_load"),
                "a share of the capacity in [0, 1]",
            ));
        }
        if self.retries > 10 {
            return Err(FieldError::new(f("retries"), "at most 10"));
        }
        if self.outlier.base_ejection.is_zero()
            || self.outlier.max_ejection < self.outlier.base_ejection
        {
            return Err(FieldError::new(
                f("outlier.max_ejection"),
                "base_ejection must be positive and ≤ max_ejection",
            ));
        }
        Ok(())
    }
}

impl LbConfig {
    /// Loads and validates a config file; errors name file, line/field and value.
    pub fn load(path: &Path) -> Result<LbConfig, ConfigError> {
        let c: LbConfig = flotilla_core::config::load_toml(path)?;
        c.validate()
            .map_err(|e| flotilla_core::config::invalid(path, e))?;
        Ok(c)
    }

    /// Checks the whole config.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.listeners.is_empty() {
            return Err(FieldError::new(
                "listener",
                "at least one [[listener]] is needed",
            ));
        }
        if let Some(ha) = &self.ha {
            ha.validate()?;
        }
        if self.runtime.worker_threads == Some(0)
            || self.runtime.worker_threads.is_some_and(|n| n > 1024)
        {
            return Err(FieldError::new("runtime.worker_threads", "1..=1024"));
        }
        let mut names = std::collections::HashSet::new();
        let mut binds = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            l.validate(i)?;
            if !names.insert(&l.name) {
                return Err(FieldError::new(
                    format!("listener[{i}].name"),
                    format!("{:?} is used twice", l.name),
                ));
            }
            if !binds.insert(l.bind) {
                return Err(FieldError::new(
                    format!("listener[{i}].bind"),
                    format!("{} is used twice", l.bind),
                ));
            }
            if l.service.is_some() && self.registry.is_none() {
                return Err(FieldError::new(
                    format!("listener[{i}].service"),
                    "needs a [registry] section",
                ));
            }
        }
        if let Some(r) = &self.registry {
            if let Some(h) = &r.ca_hash {
                flotilla_core::config::validate_ca_hash("registry.ca_hash", h)?;
            }
            if let Some(url) = &r.url {
                flotilla_core::config::parse_server_list(url)
                    .map_err(|e| FieldError::new("registry.url", e))?;
            }
            for (i, url) in r.urls.iter().enumerate() {
                flotilla_core::config::parse_server_list(url)
                    .map_err(|e| FieldError::new(format!("registry.urls[{i}]"), e))?;
            }
            if let Some(n) = &r.name {
                flotilla_core::validate_node_name("registry.name", n)?;
            }
            if r.cert_dir.is_some() {
                if !r.server_list().contains("https://") {
                    return Err(FieldError::new(
                        "registry.cert_dir",
                        "a certificate is for https:// registry URLs",
                    ));
                }
                if r.token_file.is_none() {
                    return Err(FieldError::new(
                        "registry.cert_dir",
                        "joining needs the lb token: set registry.token_file",
                    ));
                }
                let name = r.lb_name().unwrap_or_default();
                if !flotilla_tls::ca::valid_node_name(&name) {
                    return Err(FieldError::new(
                        "registry.name",
                        format!("{name:?} cannot name a certificate (letters, digits, `-`, `_`): set it"),
                    ));
                }
            }
            if !r.report.is_zero() && !(100..=600_000).contains(&r.report.as_millis()) {
                return Err(FieldError::new(
                    "registry.report",
                    "0s (never), or 100ms..10m",
                ));
            }
            if r.url.is_none() && r.urls.is_empty() {
                return Err(FieldError::new(
                    "registry.url",
                    "missing: give url = \"http://HOST:7700\" or urls = [...]",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxy_networks() {
        let n: IpNet = "198.18.0.0/15".parse().unwrap();
        assert!(n.contains("198.19.255.1".parse().unwrap()));
        assert!(!n.contains("198.20.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:198.18.0.9".parse().unwrap()));
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.7".parse().unwrap()));
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "::/129"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    fn parse(text: &str) -> Result<LbConfig, String> {
        let c: LbConfig = flotilla_core::config::parse_toml(Path::new("lb.toml"), text)
            .map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn example_parses() {
        let c = parse(
            r#"
[runtime]
worker_threads = 1
[registry]
url = "http://127.0.0.1:7700"
token_file = "/var/lib/flotilla/token"
[[listener]]
name = "web"
bind = "127.0.0.1:8080"
protocol = "http"
scheduler = "round-robin"
service = "web"
[[listener]]
name = "db"
bind = "127.0.0.1:5432"
protocol = "tcp"
scheduler = "least-conn"
backends = ["127.0.0.1:9001", "127.0.0.1:9002 weight=3"]
"#,
        )
        .unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[1].static_backends()[1].weight, 3);
        assert_eq!(c.listeners[0].slow_start, Duration::from_secs(5));
    }

    #[test]
    fn errors_name_line_or_field() {
        let e = parse("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nschedular = \"p2c\"\nbackends=[\"127.0.0.1:2\"]\n").unwrap_err();
        assert!(e.contains("line 4") && e.contains("schedular"), "{e}");
        let e = parse("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nscheduler = \"random\"\nbackends=[\"127.0.0.1:2\"]\n").unwrap_err();
        assert!(e.contains("line 4") && e.contains("random"), "{e}");
        let e = parse("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nbackends=[\"127.0.0.1:2 weight=0\"]\n").unwrap_err();
        assert!(e.contains("listener[0].backends[0]"), "{e}");
        let e = parse("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nservice = \"web\"\n")
            .unwrap_err();
        assert!(e.contains("registry"), "{e}");
    }

    #[test]
    fn the_headroom_keys_parse_and_bad_values_name_the_field() {
        let listener = |fb: &str| {
            format!("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nscheduler = \"feedback\"\nbackends = [\"127.0.0.1:2\"]\nfeedback = {{ {fb} }}\n")
        };
        let c = parse(&listener(
            "quota_period = \"50ms\", headroom_min_load = 0.5",
        ))
        .unwrap();
        assert_eq!(
            c.listeners[0].feedback.quota_period,
            Duration::from_millis(50)
        );
        assert_eq!(c.listeners[0].feedback.headroom_min_load, 0.5);
        let d = parse(&listener("")).unwrap();
        assert_eq!(
            d.listeners[0].feedback.quota_period,
            Duration::from_millis(100)
        );
        let e = parse(&listener("quota_period = \"2s\"")).unwrap_err();
        assert!(
            e.contains("feedback.quota_period") && e.contains("1ms..=1s"),
            "{e}"
        );
        let e = parse(&listener("headroom_min_load = 1.5")).unwrap_err();
        assert!(e.contains("feedback.headroom_min_load"), "{e}");
    }

    #[test]
    fn a_cert_dir_needs_https_a_token_and_a_certificate_name() {
        let listener = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nservice = \"web\"\n";
        let with = |registry: &str| parse(&format!("[registry]\n{registry}\n{listener}"));
        let good = "url = \"https://198.18.0.1:7700\"\ntoken_file = \"/t\"\ncert_dir = \"/c\"\nname = \"edge-1\"";
        with(good).unwrap();
        let e = with(&good.replace("https", "http")).unwrap_err();
        assert!(
            e.contains("registry.cert_dir") && e.contains("https"),
            "{e}"
        );
        let e = with(&good.replace("token_file = \"/t\"\n", "")).unwrap_err();
        assert!(
            e.contains("registry.cert_dir") && e.contains("token_file"),
            "{e}"
        );
        let e = with(&good.replace("edge-1", "edge.example")).unwrap_err();
        assert!(e.contains("registry.name"), "{e}");
    }

    #[test]
    fn several_registry_urls() {
        let listener = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nservice = \"web\"\n";
        let c = parse(&format!(
            "[registry]\nurl = \"http://198.18.0.1:7700\"\nurls = [\"http://198.18.0.2:7700\"]\n{listener}"
        ))
        .unwrap();
        assert_eq!(
            c.registry.unwrap().server_list(),
            "http://198.18.0.1:7700,http://198.18.0.2:7700"
        );
        let e = parse(&format!(
            "[registry]\nurls = [\"http://198.18.0.1:7700\", \"198.18.0.2:7700\"]\n{listener}"
        ))
        .unwrap_err();
        assert!(
            e.contains("registry.urls[1]") && e.contains("198.18.0.2:7700"),
            "{e}"
        );
        let e = parse(&format!("[registry]\n{listener}")).unwrap_err();
        assert!(e.contains("registry.url"), "{e}");
    }
}
