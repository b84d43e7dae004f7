//! TOML config for the long-running processes: every field documented, unknown keys
//! rejected with file, line and key, then `validate()`.
//!
//! The order of precedence is: defaults, then the file, then command-line overrides
//! (applied by the binary), then `validate()`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{ConfigError, FieldError};

/// Reads and parses a TOML file into `T`; errors name the file, and the line and key.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(path, &text)
}

/// Parses TOML text that came from `path` (used for errors only).
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// Where the registry keeps its catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// redb file under the data dir.
    Embedded,
    /// An etcd v3 cluster, by client endpoints; `tls` for `etcds://` (TLS with the
    /// server's `etcd_ca`, and a client certificate when `etcd_cert`/`etcd_key` are set).
    Etcd {
        /// `host:port` of each member.
        endpoints: Vec<String>,
        /// Speak TLS to them.
        tls: bool,
    },
}

impl std::str::FromStr for StoreUrl {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        if s == "embedded" {
            return Ok(StoreUrl::Embedded);
        }
        let (rest, tls) = match (s.strip_prefix("etcd://"), s.strip_prefix("etcds://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => {
                return Err(FieldError::new(
                    "store",
                    format!(
                        "{s:?}: expected \"embedded\", \"etcd://host:port,host:port\" or \"etcds://…\" (TLS)"
                    ),
                ))
            }
        };
        let endpoints: Vec<String> = rest.split(',').map(|e| e.trim().to_owned()).collect();
        for e in &endpoints {
            let ok = e
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(FieldError::new("store", format!("{e:?} is not host:port")));
            }
        }
        Ok(StoreUrl::Etcd { endpoints, tls })
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Embedded => f.write_str("embedded"),
            StoreUrl::Etcd { endpoints, tls } => write!(
                f,
                "{}://{}",
                if *tls { "etcds" } else { "etcd" },
                endpoints.join(",")
            ),
        }
    }
}

impl Serialize for StoreUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StoreUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: FieldError| serde::de::Error::custom(e.message))
    }
}

/// `Option<SocketAddr>` written as `"ip:port"`, or `""` for a listener that is off
/// (`#[serde(with = "off_or_addr")]`).
pub mod off_or_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses `""` (off) or `ip:port`.
    pub fn parse(s: &str) -> Result<Option<SocketAddr>, String> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|_| format!("{s:?} is not ip:port (or \"\" to turn it off)"))
    }

    /// Serializes `None` as `""`.
    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    /// Deserializes `""` as `None`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `flotilla server` settings (file `[server]`-less: the whole file is this table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// HTTP API address.
    pub listen: SocketAddr,
    /// Directory for the embedded store and, by default, the token file.
    pub data_dir: PathBuf,
    /// Bearer token file; created with a random token (mode 0600) if missing.
    /// Default: `DATA_DIR/token`.
    pub token_file: Option<PathBuf>,
    /// `"embedded"` or `"etcd://host:port,host:port,..."` (`"etcds://…"`: TLS).
    pub store: StoreUrl,
    /// DNS listener (UDP and TCP) for `NAME.service.DOMAIN`; `""` in the file: none.
    #[serde(with = "off_or_addr")]
    pub dns_listen: Option<SocketAddr>,
    /// DNS domain served.
    pub dns_domain: String,
    /// Serve GET requests without a token (writes always need one).
    pub open_reads: bool,
    /// Leadership lease TTL (etcd store): how fast the checking duty moves on a crash.
    #[serde(with = "humantime_serde")]
    pub leader_ttl: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Longest `wait` a blocking query may ask for.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Writes (other than lease and TTL renewals) this server works on at once; past
    /// it a write is refused at once with `503` + `Retry-After` and nothing written,
    /// so an overload degrades to slower writers instead of unbounded latency.
    pub max_inflight_writes: usize,
    /// How often the elected server compacts the store's history (etcd); `0s` never.
    #[serde(with = "humantime_serde")]
    pub compact_interval: Duration,
    /// Revisions of history kept at a compaction: how far back a watch may resume.
    pub compact_keep: u64,
    /// Serve plain HTTP instead of TLS. Only for a listener no one else can reach
    /// (loopback); everything else speaks TLS with the cluster CA.
    pub insecure_http: bool,
    /// Names (host names or IP addresses) put into the server certificate besides
    /// `server.flotilla` and the listen address, for tools that check host names.
    pub tls_names: Vec<String>,
    /// How long a node certificate issued to an agent is valid (agents renew at half).
    #[serde(with = "humantime_serde")]
    pub node_cert_lifetime: Duration,
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Longest wait for a request's headers, and for the next request on an idle
    /// connection.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// With `etcds://`: the CA that signed etcd's certificates (PEM).
    pub etcd_ca: Option<PathBuf>,
    /// With `etcds://`: this server's client certificate for etcd (PEM), when etcd asks
    /// for one (`--client-cert-auth`); with `etcd_key`.
    pub etcd_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub etcd_key: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7700".parse().unwrap(),
            data_dir: PathBuf::from("/var/lib/flotilla"),
            token_file: None,
            store: StoreUrl::Embedded,
            dns_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8600))),
            dns_domain: "flotilla".into(),
            open_reads: false,
            leader_ttl: Duration::from_secs(3),
            max_body_bytes: 64 * 1024,
            max_wait: Duration::from_secs(300),
            max_inflight_writes: 256,
            compact_interval: Duration::from_secs(300),
            compact_keep: 100_000,
            insecure_http: false,
            tls_names: Vec::new(),
            node_cert_lifetime: Duration::from_secs(24 * 3600),
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(30),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
        }
    }
}

impl ServerConfig {
    /// Checks values after file and overrides are applied.
    pub fn validate(&self) -> Result<(), FieldError> {
        let tls = matches!(self.store, StoreUrl::Etcd { tls: true, .. });
        if tls && self.etcd_ca.is_none() {
            return Err(FieldError::new(
                "etcd_ca",
                "etcds:// needs the CA of etcd's certificates (--etcd-ca FILE)",
            ));
        }
        if !tls && (self.etcd_ca.is_some() || self.etcd_cert.is_some() || self.etcd_key.is_some()) {
            return Err(FieldError::new(
                "store",
                format!("\"{}\": etcd TLS files are set; use etcds://", self.store),
            ));
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return Err(FieldError::new(
                if self.etcd_cert.is_some() {
                    "etcd_key"
                } else {
                    "etcd_cert"
                },
                "etcd_cert and etcd_key go together",
            ));
        }
        if self.dns_domain.is_empty()
            || self.dns_domain.contains("..")
            || self.dns_domain.starts_with('.')
        {
            return Err(FieldError::new(
                "dns_domain",
                format!("{:?} is not a domain", self.dns_domain),
            ));
        }
        let ttl = self.leader_ttl.as_secs();
        if !(1..=60).contains(&ttl) {
            return Err(FieldError::new(
                "leader_ttl",
                "must be 1s..=60s (etcd leases have second resolution)",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err(FieldError::new("max_body_bytes", "must be 1 KiB..=16 MiB"));
        }
        if self.compact_keep == 0 {
            return Err(FieldError::new("compact_keep", "must be at least 1"));
        }
        if !(8..=65_536).contains(&self.max_inflight_writes) {
            return Err(FieldError::new(
                "max_inflight_writes",
                format!("{} must be 8..=65536", self.max_inflight_writes),
            ));
        }
        if !(16..=1_000_000).contains(&self.max_connections) {
            return Err(FieldError::new(
                "max_connections",
                format!("{} must be 16..=1000000", self.max_connections),
            ));
        }
        if self.header_read_timeout < Duration::from_secs(1) {
            return Err(FieldError::new(
                "header_read_timeout",
                "must be at least 1s",
            ));
        }
        if self.node_cert_lifetime < Duration::from_secs(10) {
            return Err(FieldError::new(
                "node_cert_lifetime",
                "must be at least 10s (agents renew at half of it)",
            ));
        }
        for n in &self.tls_names {
            let ok = n.parse::<std::net::IpAddr>().is_ok()
                || (!n.is_empty()
                    && n.len() <= 253
                    && n.split('.').all(|l| {
                        !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    }));
            if !ok {
                return Err(FieldError::new(
                    "tls_names",
                    format!("{n:?} is neither an IP address nor a host name"),
                ));
            }
        }
        Ok(())
    }

    /// Token file in force.
    pub fn token_path(&self) -> PathBuf {
        self.token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("token"))
    }

    /// Where the CLI finds the cluster CA's certificate: `ca.pem` beside the token file.
    pub fn ca_path(&self) -> PathBuf {
        ca_beside(&self.token_path())
    }
}

/// The cluster CA's certificate beside a token file (`DIR/ca.pem`): where `flotilla
/// server` writes it and where the CLI, agents and lbs look when told nothing else.
pub fn ca_beside(token_file: &Path) -> PathBuf {
    token_file.with_file_name("ca.pem")
}

/// Checks a pinned CA hash: `sha256:` and 64 hex digits; the error names `field`.
pub fn validate_ca_hash(field: &str, hash: &str) -> Result<(), FieldError> {
    let hex = hash.strip_prefix("sha256:").unwrap_or_default();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FieldError::new(
            field,
            format!("{hash:?} is not `sha256:` and 64 hex digits"),
        ));
    }
    Ok(())
}

/// Splits a server list (`http://a:7700,http://b:7700`) and checks each entry is an
/// http(s) URL of a host (and port) with no path; the error names the entry that is not.
pub fn parse_server_list(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for raw in list.split(',') {
        let entry = raw.trim().trim_end_matches('/');
        let Some(authority) = entry
            .strip_prefix("http://")
            .or_else(|| entry.strip_prefix("https://"))
        else {
            return Err(format!("{entry:?} is not an http(s) URL"));
        };
        if authority.is_empty() {
            return Err(format!("{entry:?} has no host"));
        }
        if authority.contains(['/', '?', '#', ' ', '@']) {
            return Err(format!(
                "{entry:?}: a server URL is scheme://host[:port] only"
            ));
        }
        // The port is what follows the last ':' outside an IPv6 literal's brackets.
        let port = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => {
                if host.is_empty() {
                    return Err(format!("{entry:?} has no host"));
                }
                Some(port)
            }
            _ => None,
        };
        if let Some(p) = port {
            if p.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(format!("{entry:?}: port {p:?} is not 1..65535"));
            }
        }
        out.push(entry.to_owned());
    }
    Ok(out)
}

/// `flotilla agent` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Registry URL, or several separated by commas (the agent moves to the next when
    /// one cannot be reached, and keeps its lease through any of them).
    pub server: String,
    /// File holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// The address other hosts reach this host at: published ports are registered on
    /// it, and it is the node's address. Default: the source address of the route to
    /// the first server.
    pub advertise: Option<IpAddr>,
    /// This host's node name (default: the hostname).
    pub node: Option<String>,
    /// Docker Engine endpoint: `unix:///path` or `tcp://host:port`.
    pub docker: String,
    /// Node lease TTL; the agent renews it several times per TTL.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Full resync against the engine this often (anti-entropy), besides on start.
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
    /// Docker network whose address is registered when a container has no
    /// `flotilla.network` label and sits on several networks.
    pub default_network: Option<String>,
    /// `/metrics` listener; empty disables it.
    pub metrics_listen: String,
    /// Load reports (CPU share of quota, memory share of limit) for every registered
    /// container, this often.
    #[serde(with = "humantime_serde")]
    pub load_period: Duration,
    /// The agent's own API (image transfer, backup, restore, `/metrics`), token
    /// protected; empty disables it (and with it deploys and migrations to this node).
    pub api_listen: String,
    /// URL other hosts reach the API at (default `http://API_LISTEN`).
    pub api_url: Option<String>,
    /// Directory for restore uploads while they are checked.
    pub work_dir: PathBuf,
    /// Where the agent keeps its node key and certificate and the cluster CA it
    /// pinned (created 0700; the key 0600).
    pub data_dir: PathBuf,
    /// The cluster CA's certificate, when the operator copied it here; otherwise it is
    /// fetched on the first join and checked against `ca_hash`.
    pub ca_file: Option<PathBuf>,
    /// `sha256:HEX` of the cluster CA (printed by `flotilla server`): what a join pins.
    pub ca_hash: Option<String>,
    /// The routed cluster network: each node is given its own /24 of this (through the
    /// registry), puts its stack containers on a bridge in it, and routes the other
    /// nodes' /24s via their advertise addresses, so container addresses cross hosts
    /// without NAT. Every agent of a cluster names the same CIDR.
    pub cluster_cidr: Option<crate::subnet::Ipv4Net>,
    /// The directory a service's backup `dir` is taken relative to (default `/`: the
    /// path as written). Several agents on one machine (a test rig, or hosts sharing a
    /// file system) each need their own, or copies meant for other hosts land on the
    /// same files.
    pub backup_root: PathBuf,
    /// Credentials for pulling registry images (`docker login`'s `config.json` format,
    /// mode 0600), read again at every pull so a rotated password needs no restart.
    pub registry_auth: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            server: "http://127.0.0.1:7700".into(),
            token_file: None,
            advertise: None,
            node: None,
            docker: "unix:///var/run/docker.sock".into(),
            lease_ttl: Duration::from_secs(3),
            resync_interval: Duration::from_secs(30),
            default_network: None,
            metrics_listen: String::new(),
            load_period: Duration::from_secs(1),
            api_listen: "127.0.0.1:7701".into(),
            api_url: None,
            work_dir: std::env::temp_dir(),
            data_dir: PathBuf::from("/var/lib/flotilla/agent"),
            ca_file: None,
            ca_hash: None,
            cluster_cidr: None,
            backup_root: PathBuf::from("/"),
            registry_auth: None,
        }
    }
}

impl AgentConfig {
    /// Where this agent keeps the archives of a service whose backup `dir` is `dir`.
    pub fn backup_dir(&self, dir: &str) -> PathBuf {
        self.backup_root.join(dir.trim_start_matches('/'))
    }

    /// Checks values after file and overrides are applied.
    pub fn validate(&self) -> Result<(), FieldError> {
        let servers = parse_server_list(&self.server).map_err(|e| FieldError::new("server", e))?;
        let https = servers.iter().filter(|s| s.starts_with("https://")).count();
        if https != 0 && https != servers.len() {
            return Err(FieldError::new(
                "server",
                "mixes http:// and https:// servers; a cluster speaks one or the other",
            ));
        }
        if let Some(h) = &self.ca_hash {
            validate_ca_hash("ca_hash", h)?;
        }
        if let Some(cidr) = &self.cluster_cidr {
            crate::subnet::validate_cluster_cidr("cluster_cidr", cidr)?;
            if let Some(IpAddr::V4(ip)) = self.advertise {
                if cidr.contains(&ip) {
                    return Err(FieldError::new(
                        "cluster_cidr",
                        format!("{cidr} contains this host's advertise address {ip}"),
                    ));
                }
            }
        }
        if let Some(ip) = self.advertise {
            // Binding a socket to it succeeds only for an address of this host.
            if ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_err() {
                return Err(FieldError::new(
                    "advertise",
                    format!("{ip} is not an address of this host"),
                ));
            }
        }
        if let Some(n) = &self.node {
            crate::validate_node_name("node", n)?;
        }
        if let Some(p) = &self.registry_auth {
            crate::registry_auth::RegistryAuth::load(p)
                .map_err(|e| FieldError::new("registry_auth", e))?;
        }
        if !(self.docker.starts_with("unix://")
            || self.docker.starts_with("tcp://")
            || self.docker.starts_with("http://"))
        {
            return Err(FieldError::new(
                "docker",
                format!(
                    "{:?}: expected unix:///path or tcp://host:port",
                    self.docker
                ),
            ));
        }
        if self.lease_ttl < Duration::from_millis(500) || self.lease_ttl > Duration::from_secs(600)
        {
            return Err(FieldError::new("lease_ttl", "must be 500ms..=10m"));
        }
        if self.load_period < Duration::from_millis(200)
            || self.load_period > Duration::from_secs(60)
        {
            return Err(FieldError::new("load_period", "must be 200ms..=60s"));
        }
        if self.resync_interval < Duration::from_secs(1) {
            return Err(FieldError::new("resync_interval", "must be at least 1s"));
        }
        if !self.api_listen.is_empty() {
            self.api_listen.parse::<SocketAddr>().map_err(|_| {
                FieldError::new(
                    "api_listen",
                    format!("{:?} is not ip:port", self.api_listen),
                )
            })?;
        }
        if let Some(u) = &self.api_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(FieldError::new(
                    "api_url",
                    format!("{u:?} is not an http(s) URL"),
                ));
            }
        }
        if !self.metrics_listen.is_empty() {
            self.metrics_listen.parse::<SocketAddr>().map_err(|_| {
                FieldError::new(
                    "metrics_listen",
                    format!("{:?} is not ip:port", self.metrics_listen),
                )
            })?;
        }
        Ok(())
    }
}

/// Turns a validation error into a config error naming the file.
pub fn invalid(path: &Path, error: FieldError) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse_toml::<ServerConfig>(
            Path::new("/etc/flotilla.toml"),
            "listen = \"127.0.0.1:1\"\n\nlisen = 3\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/etc/flotilla.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn store_urls() {
        assert_eq!("embedded".parse::<StoreUrl>().unwrap(), StoreUrl::Embedded);
        assert_eq!(
            "etcd://127.0.0.1:2379,127.0.0.1:22379"
                .parse::<StoreUrl>()
                .unwrap(),
            StoreUrl::Etcd {
                endpoints: vec!["127.0.0.1:2379".into(), "127.0.0.1:22379".into()],
                tls: false
            }
        );
        assert!("etcd://nohost".parse::<StoreUrl>().is_err());
        assert!("redis://x:1".parse::<StoreUrl>().is_err());
    }

    #[test]
    fn typed_fields_parse_once_from_the_file() {
        let c: ServerConfig = parse_toml(
            Path::new("s.toml"),
            "store = \"etcds://a:2379,b:2379\"\ndns_listen = \"\"\netcd_ca = \"/ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(
            c.store,
            StoreUrl::Etcd {
                endpoints: vec!["a:2379".into(), "b:2379".into()],
                tls: true
            }
        );
        assert_eq!(c.store.to_string(), "etcds://a:2379,b:2379");
        assert_eq!(c.dns_listen, None);
        c.validate().unwrap();
        let e = parse_toml::<ServerConfig>(Path::new("s.toml"), "\nstore = \"redis://x:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s.toml") && e.contains("line 2") && e.contains("redis://x:1"),
            "{e}"
        );
        let e = parse_toml::<ServerConfig>(Path::new("s.toml"), "dns_listen = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1") && e.contains("\"nowhere\" is not ip:port"),
            "{e}"
        );
        let back: ServerConfig =
            toml::from_str(&toml::to_string(&ServerConfig::default()).unwrap()).unwrap();
        assert_eq!(back.dns_listen, ServerConfig::default().dns_listen);
    }

    #[test]
    fn defaults_validate() {
        ServerConfig::default().validate().unwrap();
        AgentConfig::default().validate().unwrap();
        let c = ServerConfig {
            leader_ttl: Duration::from_millis(10),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "leader_ttl");
    }

    #[test]
    fn server_lists_name_the_bad_entry() {
        assert_eq!(
            parse_server_list("http://a:7700, https://198.18.0.2:7700/,http://[::1]:7700").unwrap(),
            [
                "http://a:7700",
                "https://198.18.0.2:7700",
                "http://[::1]:7700"
            ]
        );
        for (bad, named) in [
            ("http://a:7700,ftp://b", "ftp://b"),
            ("http://a:7700,", "\"\""),
            ("http://a:7700/v1", "/v1"),
            ("http://a:99999", "99999"),
            ("http://:7700", "no host"),
        ] {
            let e = parse_server_list(bad).unwrap_err();
            assert!(e.contains(named), "{bad}: {e}");
        }
        let c = AgentConfig {
            server: "http://a:1,nope".into(),
            ..Default::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "server");
        assert!(e.message.contains("nope"), "{e}");
    }

    #[test]
    fn advertise_must_be_an_address_of_this_host() {
        let ok = AgentConfig {
            advertise: Some("127.0.0.1".parse().unwrap()),
            ..Default::default()
        };
        ok.validate().unwrap();
        // TEST-NET-2: assigned to no interface here.
        let bad = AgentConfig {
            advertise: Some("198.51.100.7".parse().unwrap()),
            ..Default::default()
        };
        let e = bad.validate().unwrap_err();
        assert_eq!(e.field, "advertise");
        assert!(e.message.contains("198.51.100.7"), "{e}");
    }
}
