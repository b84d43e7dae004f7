//! Stack specs: how a set of services is built, run, placed, updated and backed up.
//!
//! One TOML file per stack (docs/spec.md). The CLI parses and validates it, builds the
//! images, and sends the server a [`StackRecord`]: the desired state that agents
//! reconcile. Placement is a pure function of the record and the live nodes
//! ([`place`]), so every agent computes the same answer without a central scheduler.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{id, CheckSpec, ConfigError, FieldError};

/// Most services in one stack.
pub const MAX_SERVICES: usize = 64;
/// Most replicas of one service.
pub const MAX_REPLICAS: u32 = 256;

/// A stack file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackSpec {
    /// Stack name (a DNS label); prefixes container, image and volume names.
    pub name: String,
    /// Services by name (`[service.NAME]`).
    #[serde(rename = "service", default)]
    pub services: BTreeMap<String, ServiceSpec>,
}

/// `[service.X] publish`: how a service's port is reached from other hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Publish {
    /// On a host port the engine picks.
    #[default]
    Auto,
    /// Not published: the container's own address.
    None,
    /// On this host port.
    Port(u16),
}

impl Publish {
    /// Whether this is the default, `"auto"`.
    pub fn is_auto(&self) -> bool {
        *self == Publish::Auto
    }

    /// The host port to ask the engine for: `Some("")` lets it pick, `None` publishes
    /// nothing.
    pub fn host_port(&self) -> Option<String> {
        match self {
            Publish::Auto => Some(String::new()),
            Publish::None => None,
            Publish::Port(p) => Some(p.to_string()),
        }
    }
}

impl Serialize for Publish {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Publish::Auto => s.serialize_str("auto"),
            Publish::None => s.serialize_str("none"),
            Publish::Port(p) => s.serialize_u16(*p),
        }
    }
}

impl<'de> Deserialize<'de> for Publish {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Publish;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\", \"none\" or a host port 1..=65535")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Publish, E> {
                match v {
                    "auto" => Ok(Publish::Auto),
                    "none" => Ok(Publish::None),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Publish, E> {
                let v = u64::try_from(v)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))?;
                self.visit_u64(v)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Publish, E> {
                u16::try_from(v)
                    .ok()
                    .filter(|p| *p > 0)
                    .map(Publish::Port)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a secret environment value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// A file holding the value (trailing newline dropped), relative to the spec.
    pub file: PathBuf,
}

/// A service's secret values as the server keeps them (`secrets/STACK/SERVICE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretsRecord {
    /// Record version.
    pub v: u32,
    /// Name → value.
    pub values: BTreeMap<String, String>,
}

/// One service of a stack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Version label; change it to roll out the same spec again.
    #[serde(default = "default_version")]
    pub version: String,
    /// The image: a table says how flotilla builds it; a string names an image in a
    /// registry (`"registry.example:5000/app:1.2"`, or pinned `…@sha256:…`) that each
    /// agent pulls.
    pub image: ImageSource,
    /// ENTRYPOINT (default: the base image's).
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// CMD (default: the base image's).
    #[serde(default)]
    pub command: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment values that are secrets (`DB_PASSWORD = { file = "db.pass" }`, the
    /// path relative to the spec): read by the CLI at deploy, kept by the server apart
    /// from the stack, given to the container when it is created — never in an image,
    /// never served with the stack, left out of backups unless asked for.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, SecretSource>,
    /// Labels given to every container of the service (not `flotilla.*`: those are
    /// flotilla's own and say what the container is).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// User to run as (name or uid[:gid]).
    #[serde(default)]
    pub user: Option<String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// The port the service listens on (registered and balanced).
    pub port: u16,
    /// How other hosts reach it: `"auto"` (default) publishes the port on a host port
    /// the engine picks and the agent registers `ADVERTISE:HOSTPORT`; a number publishes
    /// it on that host port (one replica per host can have it); `"none"` publishes
    /// nothing and registers the container's address (one host, or routed networks).
    #[serde(default, skip_serializing_if = "Publish::is_auto")]
    pub publish: Publish,
    /// Docker network to attach to (default `flotilla-STACK`, created if missing).
    #[serde(default)]
    pub network: Option<String>,
    /// Static weight for the lb (1..=10000, default 100).
    #[serde(default)]
    pub weight: Option<u32>,
    /// The health check the registry runs (and that gates updates and restores).
    #[serde(default)]
    pub health: Option<CheckSpec>,
    /// CPU and memory limits.
    #[serde(default)]
    pub resources: Resources,
    /// Named volumes (`[[service.NAME.volume]]`).
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeSpec>,
    /// How many replicas (default 1).
    #[serde(default = "one")]
    pub replicas: u32,
    /// Where replicas may run.
    #[serde(default)]
    pub placement: Placement,
    /// What the agent does when a replica exits.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How a changed spec is rolled out.
    #[serde(default)]
    pub update: UpdatePolicy,
    /// Scheduled backups.
    #[serde(default)]
    pub backup: Option<BackupPolicy>,
    /// What happens to a replica (with volumes) whose node is lost
    /// (`[service.NAME.recovery]`, see the `recovery` module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryPolicy>,
}

fn default_version() -> String {
    "1".into()
}
fn one() -> u32 {
    1
}

/// Where a service's image comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ImageSource {
    /// Pulled from a registry by each agent that runs a replica.
    Registry(ImageRef),
    /// Built by flotilla from the spec (no Dockerfile, no registry).
    Built(ImageSpec),
}

impl ImageSource {
    /// The build table, unless the image comes from a registry.
    pub fn built(&self) -> Option<&ImageSpec> {
        match self {
            ImageSource::Built(b) => Some(b),
            ImageSource::Registry(_) => None,
        }
    }
    /// The registry reference, if the image comes from one.
    pub fn registry(&self) -> Option<&ImageRef> {
        match self {
            ImageSource::Registry(r) => Some(r),
            ImageSource::Built(_) => None,
        }
    }
}

// By hand rather than `untagged`: an untagged enum answers every mistake inside the
// table with "did not match any variant", losing the key the operator got wrong.
impl<'de> Deserialize<'de> for ImageSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ImageSource;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a registry reference (\"host:5000/app:1.2\") or an image table")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ImageSource, E> {
                v.parse().map(ImageSource::Registry).map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<ImageSource, A::Error> {
                ImageSpec::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(ImageSource::Built)
            }
        }
        d.deserialize_any(V)
    }
}

/// A registry image reference: `[HOST[:PORT]/]PATH[:TAG][@sha256:HEX]`, checked when
/// the spec is read (so a typo fails at `deploy`, not on every node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ImageRef(String);

impl ImageRef {
    /// The reference as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The registry it names (`docker.io` when the first component is not a host:
    /// no `.` or `:` in it and not `localhost`), as credentials are keyed.
    pub fn registry(&self) -> &str {
        match self.0.split_once('/') {
            Some((first, _))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                first
            }
            _ => "docker.io",
        }
    }
    /// The reference without tag or digest (`host:5000/app`).
    pub fn repository(&self) -> &str {
        let no_digest = self.0.split_once('@').map_or(self.0.as_str(), |(r, _)| r);
        match no_digest.rfind(':') {
            // A colon after the last slash is the tag's; before it, a port's.
            Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
            _ => no_digest,
        }
    }
    /// The pinned digest (`sha256:…`), if any.
    pub fn digest(&self) -> Option<&str> {
        self.0.split_once('@').map(|(_, d)| d)
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ImageRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("{s:?} is not an image reference: {why}"));
        if s.is_empty() {
            return bad("empty");
        }
        if s.len() > 512 {
            return bad("longer than 512 bytes");
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        if let Some(d) = digest {
            let hex = d.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return bad("a digest is sha256: and 64 lowercase hex digits");
            }
        }
        let r = ImageRef(s.to_owned());
        let repo = r.repository().to_owned();
        let tag = name
            .strip_prefix(repo.as_str())
            .and_then(|t| t.strip_prefix(':'));
        if let Some(t) = tag {
            let ok = t.len() <= 128
                && t.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !ok {
                return bad(&format!("tag {t:?}"));
            }
        }
        let mut parts = repo.split('/').peekable();
        if r.registry() != "docker.io" || repo.starts_with("docker.io/") {
            let host = parts.next().unwrap_or("");
            let ok = !host.is_empty()
                && host.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                });
            if !ok {
                return bad(&format!("registry host {host:?}"));
            }
        }
        if parts.peek().is_none() {
            return bad("no repository path");
        }
        for c in parts {
            let ok = !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && c.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
            if !ok {
                return bad(&format!(
                    "path component {c:?} (lowercase letters, digits, . _ -)"
                ));
            }
        }
        Ok(r)
    }
}

/// How an image is put together (no Dockerfile, no registry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// `"scratch"`, `"busybox"` (the host's static busybox with its applets),
    /// `"flotilla"` (busybox plus this flotilla binary as the entrypoint, with the
    /// shared libraries it runs with: flotilla's own server or lb as a service),
    /// `"image:NAME"` (a local image), or `"rootfs:PATH"` (a tar, relative to the spec).
    pub base: String,
    /// Files added on top (`[[service.NAME.image.file]]`).
    #[serde(default, rename = "file")]
    pub files: Vec<FileSpec>,
}

/// A file added to an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Source file, relative to the spec file.
    pub src: String,
    /// Absolute destination path in the image.
    pub dest: String,
    /// Octal permission bits (default "0644").
    #[serde(default)]
    pub mode: Option<String>,
}

impl FileSpec {
    /// The permission bits.
    pub fn mode_bits(&self) -> u32 {
        self.mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or(0o644)
    }
}

/// Resource limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU limit in cores (e.g. 0.5).
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory limit, e.g. "64MiB", "1GiB", or bytes.
    #[serde(default)]
    pub memory: Option<String>,
}

impl Resources {
    /// The memory limit in bytes.
    pub fn memory_bytes(&self) -> Result<Option<u64>, FieldError> {
        self.memory
            .as_deref()
            .map(|m| {
                parse_bytes(m).ok_or_else(|| {
                    FieldError::new("memory", format!("{m:?} is not a size like 64MiB"))
                })
            })
            .transpose()
    }
}

/// Parses `123`, `64KiB`, `64MiB`, `1GiB` (also KB/MB/GB as powers of 1000).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "k" => 1 << 10,
        "MiB" | "m" => 1 << 20,
        "GiB" | "g" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// A named volume mounted into each replica (one volume per replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Volume name within the service (the Docker volume is `STACK-SERVICE-REPLICA-NAME`).
    pub name: String,
    /// Absolute mount point in the container.
    pub path: String,
}

/// Where replicas may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Only these nodes (pinned); empty = any live node.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Most replicas on one node (default: spread evenly, ⌈replicas / nodes⌉).
    #[serde(default)]
    pub max_per_node: Option<u32>,
}

/// What happens when a replica's container exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Always start it again, with backoff.
    #[default]
    Always,
    /// Start it again only if it exited non-zero.
    OnFailure,
    /// Leave it stopped.
    Never,
}

/// How changes roll out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpdatePolicy {
    /// Replicas replaced at once on one node.
    pub parallelism: u32,
    /// How long a new replica has to pass its health check.
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
    /// Roll the whole service back to the previous spec when a new replica fails.
    pub rollback: bool,
    /// Time between deregistering an old replica and stopping it (in-flight requests finish).
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            parallelism: 1,
            health_timeout: Duration::from_secs(30),
            rollback: true,
            drain: Duration::from_secs(2),
        }
    }
}

/// How a backup keeps the data consistent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Pause the container while its volumes are read (out of rotation meanwhile).
    #[default]
    Pause,
    /// Stop it while its volumes are read, then start it again.
    Stop,
    /// Read while it runs (only for data that tolerates it).
    Live,
}

/// Scheduled backups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupPolicy {
    /// Time between backups.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Archives kept per replica.
    #[serde(default = "default_retention")]
    pub retention: u32,
    /// Consistency mode.
    #[serde(default)]
    pub consistency: Consistency,
    /// Directory on the replica's node where archives go.
    pub dir: String,
    /// How many other nodes also keep each archive (in the same directory there), so
    /// a replica's backups outlive its host.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub copies: u32,
    /// Incremental backups: a full archive this often, and between two fulls each
    /// `interval` writes (and ships) only what changed since the last backup — a
    /// `.flotilla-delta` that names the archive it follows. A restore applies the full
    /// archive and then its deltas in order. Unset: every backup is a full one.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub full_every: Option<Duration>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What happens to a stateful replica whose node is gone for longer than `grace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNodeLoss {
    /// Stay assigned to the lost node until it returns (or an operator recovers it).
    Wait,
    /// Restore the newest verified backup of the replica on a live node.
    Restore,
    /// Start the replica with empty volumes on a live node (the data is expendable).
    Empty,
}

impl OnNodeLoss {
    /// The policy's name as the spec spells it.
    pub fn name(self) -> &'static str {
        match self {
            OnNodeLoss::Wait => "wait",
            OnNodeLoss::Restore => "restore",
            OnNodeLoss::Empty => "empty",
        }
    }
}

/// `[service.NAME.recovery]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryPolicy {
    /// What to do when the replica's node is lost (default: `restore` when the service
    /// has a backup schedule, else `wait`).
    #[serde(default)]
    pub on_node_loss: Option<OnNodeLoss>,
    /// How long the node must be gone before acting.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for RecoveryPolicy {
    fn default() -> Self {
        RecoveryPolicy {
            on_node_loss: None,
            grace: default_grace(),
        }
    }
}

pub(crate) fn default_grace() -> Duration {
    Duration::from_secs(10)
}

/// Shortest `grace` a spec may ask for: a node that lost its lease stops its stateful
/// replicas itself, and a stop takes up to this long (docker stop's timeout plus the
/// engine round trips), so the restore elsewhere must wait at least this much longer.
pub const MIN_GRACE: Duration = Duration::from_secs(2);

/// Most copies of a backup a spec may ask for.
pub const MAX_BACKUP_COPIES: u32 = 16;

fn default_retention() -> u32 {
    7
}

impl StackSpec {
    /// Reads and validates a stack file; errors name the file and the line or field.
    pub fn load(path: &Path) -> Result<StackSpec, ConfigError> {
        let spec: StackSpec = crate::config::load_toml(path)?;
        spec.validate().map_err(|error| ConfigError::Invalid {
            path: path.to_owned(),
            error,
        })?;
        Ok(spec)
    }

    /// Checks every value; the error names the field, e.g. `service.web.replicas`.
    pub fn validate(&self) -> Result<(), FieldError> {
        id::validate_service_name("name", &self.name)?;
        if self.services.is_empty() {
            return Err(FieldError::new(
                "service",
                "a stack needs at least one [service.NAME]",
            ));
        }
        if self.services.len() > MAX_SERVICES {
            return Err(FieldError::new(
                "service",
                format!("at most {MAX_SERVICES} services"),
            ));
        }
        for (name, s) in &self.services {
            let f = format!("service.{name}");
            id::validate_service_name(&f, name)?;
            s.validate(&f)?;
        }
        Ok(())
    }
}

/// Checks a Docker network a stack or an archive names: a user-defined network only.
/// `host` (the host's own stack), `none`, `bridge` and `container:ID` (another
/// container's namespace) would reach outside the replica's own network.
pub fn validate_network_name(field: &str, name: &str) -> Result<(), FieldError> {
    let reserved = matches!(name, "host" | "none" | "bridge" | "default");
    let well_formed = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if reserved || !well_formed {
        return Err(FieldError::new(
            field,
            format!(
                "{name:?}: a user-defined network name is needed (letters, digits, `_.-`); host, none, bridge and container:… are refused"
            ),
        ));
    }
    Ok(())
}

impl ServiceSpec {
    /// Checks the values, naming fields under `f`.
    pub fn validate(&self, f: &str) -> Result<(), FieldError> {
        let err = |field: &str, msg: String| Err(FieldError::new(format!("{f}.{field}"), msg));
        if let Some(n) = &self.network {
            validate_network_name(&format!("{f}.network"), n)?;
        }
        for (name, src) in &self.secret_env {
            let field = format!("secret_env.{name}");
            let ok = name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return err(
                    &field,
                    format!("{name:?} is not an environment variable name"),
                );
            }
            if self.env.contains_key(name) {
                return err(&field, format!("{name} is also in env: give it once"));
            }
            if src.file.as_os_str().is_empty() {
                return err(&format!("{field}.file"), "empty path".into());
            }
        }
        for key in self.labels.keys() {
            let ok = !key.is_empty() && key.len() <= 256 && !key.chars().any(char::is_control);
            if !ok || key.starts_with("flotilla.") {
                return err(
                    &format!("labels.{key:?}"),
                    "a label key is 1-256 printable characters, not under flotilla. (flotilla's own)"
                        .into(),
                );
            }
        }
        let no_build = ImageSpec::default();
        let image = self.image.built().unwrap_or(&no_build);
        let base = image.base.as_str();
        let base_ok = self.image.registry().is_some()
            || matches!(base, "scratch" | "busybox" | "flotilla")
            || base.strip_prefix("image:").is_some_and(|n| !n.is_empty())
            || base.strip_prefix("rootfs:").is_some_and(|n| !n.is_empty());
        if !base_ok {
            return err(
                "image.base",
                format!("{base:?}: expected \"scratch\", \"busybox\", \"flotilla\", \"image:NAME\" or \"rootfs:PATH\""),
            );
        }
        if base == "scratch" && image.files.is_empty() {
            return err(
                "image.file",
                "a scratch image needs at least one file".into(),
            );
        }
        for (i, file) in image.files.iter().enumerate() {
            if !file.dest.starts_with('/') || file.dest.split('/').any(|c| c == "..") {
                return err(
                    &format!("image.file[{i}].dest"),
                    format!("{:?} must be an absolute path without `..`", file.dest),
                );
            }
            if file.src.is_empty() {
                return err(&format!("image.file[{i}].src"), "is empty".into());
            }
            if let Some(m) = &file.mode {
                if u32::from_str_radix(m, 8).map_or(true, |b| b > 0o7777) {
                    return err(
                        &format!("image.file[{i}].mode"),
                        format!("{m:?} is not octal permission bits"),
                    );
                }
            }
        }
        if self.port == 0 {
            return err("port", "must be 1..65535".into());
        }
        if let Some(w) = self.weight {
            if !(1..=10_000).contains(&w) {
                return err("weight", format!("{w} is not in 1..=10000"));
            }
        }
        if self.replicas > MAX_REPLICAS {
            return err(
                "replicas",
                format!("{} is more than {MAX_REPLICAS}", self.replicas),
            );
        }
        if let Some(h) = &self.health {
            h.validate(&format!("{f}.health"))?;
            if h.kind == crate::CheckKind::Docker && self.image.registry().is_none() {
                // flotilla builds the image, and with it the container's HEALTHCHECK
                // from this very table: there is no other to defer to.
                return Err(FieldError::new(
                    format!("{f}.health.type"),
                    "\"docker\" defers to an image's own HEALTHCHECK: a registry image's, \
                     or a container's run outside stacks; flotilla builds this image, so \
                     state its check (http, tcp or exec)",
                ));
            }
        }
        if let Some(c) = self.resources.cpus {
            if !(c.is_finite() && c > 0.0 && c <= 1024.0) {
                return err(
                    "resources.cpus",
                    format!("{c} is not a CPU count in (0, 1024]"),
                );
            }
        }
        self.resources
            .memory_bytes()
            .map_err(|e| FieldError::new(format!("{f}.resources.{}", e.field), e.message))?;
        let mut names = BTreeSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            id::validate_service_name(&format!("{f}.volume[{i}].name"), &v.name)?;
            if !names.insert(&v.name) {
                return err(
                    &format!("volume[{i}].name"),
                    format!("{:?} appears twice", v.name),
                );
            }
            if !v.path.starts_with('/') || v.path == "/" || v.path.split('/').any(|c| c == "..") {
                return err(
                    &format!("volume[{i}].path"),
                    format!("{:?} must be an absolute path below /", v.path),
                );
            }
        }
        for (i, n) in self.placement.nodes.iter().enumerate() {
            id::validate_node_name(&format!("{f}.placement.nodes[{i}]"), n)?;
        }
        if self.placement.max_per_node == Some(0) {
            return err("placement.max_per_node", "must be at least 1".into());
        }
        if matches!(self.publish, Publish::Port(_)) && self.placement.max_per_node > Some(1) {
            return err(
                "placement.max_per_node",
                "a fixed publish port holds one replica per host: at most 1".into(),
            );
        }
        if self.update.parallelism == 0 {
            return err("update.parallelism", "must be at least 1".into());
        }
        if let Some(b) = &self.backup {
            if b.interval < Duration::from_secs(1) {
                return err("backup.interval", "must be at least 1s".into());
            }
            if b.retention == 0 {
                return err("backup.retention", "must be at least 1".into());
            }
            if !b.dir.starts_with('/') {
                return err("backup.dir", format!("{:?} must be absolute", b.dir));
            }
            if b.copies > MAX_BACKUP_COPIES {
                return err(
                    "backup.copies",
                    format!("{} is more than {MAX_BACKUP_COPIES}", b.copies),
                );
            }
            if b.full_every.is_some_and(|f| f < b.interval) {
                return err(
                    "backup.full_every",
                    "must be at least the backup interval".into(),
                );
            }
        }
        validate_recovery(f, self)?;
        Ok(())
    }
}

/// The spec hash of a service whose image comes from a registry: its spec and the
/// image id the deploy resolved (so the same spec on a moved tag is a new version).
pub fn registry_spec_hash(spec: &ServiceSpec, image_id: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(serde_json::to_vec(spec).expect("a spec serialises"));
    h.update(image_id.as_bytes());
    hex::encode(h.finalize())
}

/// A service as deployed: the spec plus the image built from it (or pulled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployedService {
    /// The spec.
    pub spec: ServiceSpec,
    /// Image reference (`flotilla/STACK-SERVICE:HASH`).
    pub image: String,
    /// Image id (`sha256:...`).
    pub image_id: String,
    /// Hash of the spec and the image's inputs; replicas with another hash are replaced.
    pub spec_hash: String,
    /// Replica → node pins set by `flotilla migrate`.
    #[serde(default)]
    pub pins: BTreeMap<u32, String>,
}

/// The desired state of one stack, as the server stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StackRecord {
    /// Record version.
    pub v: u32,
    /// Stack name.
    pub name: String,
    /// Bumped on every change.
    pub generation: u64,
    /// Services by name.
    pub services: BTreeMap<String, DeployedService>,
    /// The services before the last deploy, for rollback.
    #[serde(default)]
    pub previous: Option<BTreeMap<String, DeployedService>>,
    /// Set when an update was rolled back: which service and why.
    #[serde(default)]
    pub rolled_back: Option<String>,
}

/// Checks a recovery table (field paths under `f`, e.g. `service.web`).
fn validate_recovery(f: &str, spec: &ServiceSpec) -> Result<(), FieldError> {
    let Some(r) = &spec.recovery else {
        return Ok(());
    };
    if r.grace < MIN_GRACE {
        return Err(FieldError::new(
            format!("{f}.recovery.grace"),
            format!(
                "{} is shorter than the {} a lost node needs to stop its own copy",
                humantime::format_duration(r.grace),
                humantime::format_duration(MIN_GRACE)
            ),
        ));
    }
    if r.on_node_loss == Some(OnNodeLoss::Restore) && spec.backup.is_none() {
        return Err(FieldError::new(
            format!("{f}.recovery.on_node_loss"),
            "\"restore\" needs backups: add a [backup] table to the service (with copies \
             on other nodes, or a dir on shared storage)",
        ));
    }
    Ok(())
}

/// Assigns replicas `0..replicas` of `service` to nodes.
///
/// Deterministic in its inputs (every agent computes the same), spreads replicas
/// evenly (at most ⌈replicas / nodes⌉ — or `max_per_node` — per node), honours pins to
/// live nodes, and moves few replicas when a node joins or leaves: each replica goes to
/// the highest-ranked node for it (rendezvous hashing) that still has room. A service
/// published on a fixed host port has room for one replica per node (a host port
/// holds one). Replicas that fit nowhere are left out.
pub fn place(service: &str, svc: &DeployedService, live: &[String]) -> BTreeMap<u32, String> {
    let mut nodes: Vec<&String> = live
        .iter()
        .filter(|n| svc.spec.placement.nodes.is_empty() || svc.spec.placement.nodes.contains(n))
        .collect();
    nodes.sort();
    nodes.dedup();
    let mut out = BTreeMap::new();
    if nodes.is_empty() {
        return out;
    }
    let even = svc.spec.replicas.div_ceil(nodes.len() as u32).max(1);
    let cap = match svc.spec.publish {
        Publish::Port(_) => 1,
        _ => svc.spec.placement.max_per_node.unwrap_or(even),
    };
    let mut load: BTreeMap<&String, u32> = nodes.iter().map(|n| (*n, 0)).collect();
    // Best (replica, node) pairs first: a replica keeps its favourite node unless a
    // replica that likes that node more took the last place, which keeps moves local.
    let mut pairs: Vec<(u64, u32, &String)> = (0..svc.spec.replicas)
        .flat_map(|r| {
            nodes
                .iter()
                .map(move |n| (fnv(&format!("{service}/{r}/{n}")), r, *n))
        })
        .collect();
    pairs.sort_by(|a, b| b.cmp(a));
    for (_, r, n) in pairs {
        if !out.contains_key(&r) && load[n] < cap {
            *load.get_mut(n).expect("known node") += 1;
            out.insert(r, n.clone());
        }
    }
    // A pin is an operator's explicit move, applied last: the other replicas stay
    // exactly where they would be without it, so moving one never displaces another.
    for (r, pin) in &svc.pins {
        if *r < svc.spec.replicas && nodes.contains(&pin) {
            out.insert(*r, pin.clone());
        }
    }
    out
}

fn fnv(s: &str) -> u64 {
    crate::hash::stable_hash(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_outside_the_replica_are_refused_naming_the_field() {
        for bad in ["host", "none", "bridge", "container:abc", "", "-x", "a/b"] {
            let err = validate_network_name("service.web.network", bad).unwrap_err();
            assert_eq!(err.field, "service.web.network", "{bad}");
        }
        for good in ["flotilla-demo", "front_1", "n.2"] {
            validate_network_name("service.web.network", good).unwrap();
        }
    }
    use proptest::prelude::*;

    const EXAMPLE: &str = r#"
name = "demo"

[service.web]
port = 8080
replicas = 3
command = ["httpd", "-f", "-p", "8080", "-h", "/www"]
image = { base = "busybox", file = [{ src = "www/index.html", dest = "/www/index.html" }] }
health = { type = "http", path = "/index.html", interval = "500ms" }
resources = { cpus = 0.5, memory = "64MiB" }

[[service.web.volume]]
name = "data"
path = "/data"

[service.web.backup]
interval = "1h"
dir = "/var/lib/flotilla/backups"
"#;

    fn parse(text: &str) -> Result<StackSpec, String> {
        let s: StackSpec =
            crate::config::parse_toml(Path::new("stack.toml"), text).map_err(|e| e.to_string())?;
        s.validate().map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn the_example_parses_with_defaults() {
        let s = parse(EXAMPLE).unwrap();
        let web = &s.services["web"];
        assert_eq!(web.replicas, 3);
        assert_eq!(web.restart, RestartPolicy::Always);
        assert_eq!(web.update, UpdatePolicy::default());
        assert_eq!(web.resources.memory_bytes().unwrap(), Some(64 << 20));
        assert_eq!(web.backup.as_ref().unwrap().retention, 7);
    }

    #[test]
    fn publish_is_auto_none_or_a_port() {
        let web = |text: &str| parse(text).map(|s| s.services["web"].publish);
        assert_eq!(web(EXAMPLE).unwrap(), Publish::Auto);
        let with =
            |v: &str| EXAMPLE.replace("port = 8080\n", &format!("port = 8080\npublish = {v}\n"));
        assert_eq!(web(&with("\"none\"")).unwrap(), Publish::None);
        assert_eq!(web(&with("\"auto\"")).unwrap(), Publish::Auto);
        assert_eq!(web(&with("18080")).unwrap(), Publish::Port(18080));
        for bad in ["\"nat\"", "0", "70000", "-1"] {
            let e = web(&with(bad)).unwrap_err();
            assert!(e.contains("line 6") && e.contains("auto"), "{bad}: {e}");
        }
        // The default is left out of the serialised spec (and so of the image hash).
        let spec = parse(EXAMPLE).unwrap();
        let json = serde_json::to_value(&spec.services["web"]).unwrap();
        assert!(json.get("publish").is_none());
        assert_eq!(
            serde_json::to_value(Publish::Port(9)).unwrap(),
            serde_json::json!(9)
        );
    }

    #[test]
    fn errors_name_the_line_or_the_field() {
        let e = parse(&EXAMPLE.replace("replicas = 3", "replicas = 3\nreplica = 2")).unwrap_err();
        assert!(
            e.contains("stack.toml") && e.contains("line 7") && e.contains("replica"),
            "{e}"
        );
        let e = parse(&EXAMPLE.replace("replicas = 3", "replicas = 999")).unwrap_err();
        assert!(e.contains("service.web.replicas"), "{e}");
        let e = parse(&EXAMPLE.replace("\"busybox\"", "\"alpine\"")).unwrap_err();
        assert!(
            e.contains("service.web.image.base") && e.contains("alpine"),
            "{e}"
        );
        let e = parse(&EXAMPLE.replace("path = \"/data\"", "path = \"data\"")).unwrap_err();
        assert!(e.contains("service.web.volume[0].path"), "{e}");
        let e = parse(&EXAMPLE.replace("64MiB", "lots")).unwrap_err();
        assert!(e.contains("service.web.resources.memory"), "{e}");
        let e = parse(&EXAMPLE.replace(
            "health = { type = \"http\", path = \"/index.html\", interval = \"500ms\" }",
            "health = { type = \"docker\" }",
        ))
        .unwrap_err();
        assert!(e.contains("service.web.health.type"), "{e}");
        let e = parse(&EXAMPLE.replace(
            "replicas = 3",
            "replicas = 3\npublish = 18080\nplacement = { max_per_node = 2 }",
        ))
        .unwrap_err();
        assert!(e.contains("service.web.placement.max_per_node"), "{e}");
        let e = parse(&EXAMPLE.replace("service.web", "service.Web")).unwrap_err();
        assert!(e.contains("service.Web"), "{e}");
    }

    #[test]
    fn an_image_is_a_build_table_or_a_registry_reference() {
        const BUILD: &str = "image = { base = \"busybox\", file = [{ src = \"www/index.html\", dest = \"/www/index.html\" }] }";
        assert!(EXAMPLE.contains(BUILD));
        let with = |image: &str| parse(&EXAMPLE.replace(BUILD, image));
        let web = |image: &str| with(image).map(|s| s.services["web"].image.clone());
        let r = web("image = \"127.0.0.1:5000/team/app:1.2\"").unwrap();
        let r = r.registry().unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "127.0.0.1:5000/team/app");
        assert_eq!(r.digest(), None);
        let pinned = format!("reg.example/app@sha256:{}", "ab".repeat(32));
        let r = web(&format!("image = \"{pinned}\"")).unwrap();
        let r = r.registry().unwrap();
        assert_eq!(
            (r.registry(), r.repository()),
            ("reg.example", "reg.example/app")
        );
        assert_eq!(
            r.digest(),
            Some(format!("sha256:{}", "ab".repeat(32)).as_str())
        );
        let hub = "nginx:1.27".parse::<ImageRef>().unwrap();
        assert_eq!((hub.registry(), hub.repository()), ("docker.io", "nginx"));
        assert_eq!(
            "localhost/app".parse::<ImageRef>().unwrap().registry(),
            "localhost"
        );
        // It serialises back to the string (the stored record keeps the operator's shape).
        assert_eq!(
            serde_json::to_value(ImageSource::Registry(hub)).unwrap(),
            serde_json::json!("nginx:1.27")
        );
        for (bad, why) in [
            ("\"\"", "empty"),
            ("\"Reg/App\"", "path component"),
            ("\"reg:5000/app:\"", "tag"),
            ("\"reg:5000/app@sha256:12\"", "digest"),
            ("\"reg.example/\"", "path component"),
        ] {
            let e = with(&format!("image = {bad}")).unwrap_err();
            assert!(e.contains("line 8") && e.contains(why), "{bad}: {e}");
        }
        // A mistake inside the table still names its key.
        let e = with("image = { base = \"busybox\", files = [] }").unwrap_err();
        assert!(e.contains("files"), "{e}");
        // A registry image may defer to its own HEALTHCHECK; a built one may not.
        let docker_check = |image: &str| {
            with(image)
                .map(|s| s.services["web"].clone())
                .and_then(|mut w| {
                    w.health = Some(crate::CheckSpec {
                        kind: crate::CheckKind::Docker,
                        ..w.health.clone().unwrap()
                    });
                    w.validate("service.web").map_err(|e| e.to_string())
                })
        };
        assert!(docker_check("image = \"reg:5000/app:1\"").is_ok());
        assert!(docker_check(BUILD).unwrap_err().contains("health.type"));
    }

    #[test]
    fn labels_are_the_operator_s_but_not_flotilla_s() {
        let with = |l: &str| {
            parse(&EXAMPLE.replace("replicas = 3", &format!("replicas = 3\nlabels = {l}")))
        };
        let s = with("{ \"com.example.team\" = \"shop\" }").unwrap();
        assert_eq!(s.services["web"].labels["com.example.team"], "shop");
        let e = with("{ \"flotilla.service\" = \"other\" }").unwrap_err();
        assert!(
            e.contains("service.web.labels") && e.contains("flotilla."),
            "{e}"
        );
        // No labels: left out of the serialised spec (the image hash stays the same).
        let json = serde_json::to_value(&parse(EXAMPLE).unwrap().services["web"]).unwrap();
        assert!(json.get("labels").is_none());
    }

    fn deployed(replicas: u32, pinned: &[&str]) -> DeployedService {
        let mut spec = parse(EXAMPLE).unwrap().services["web"].clone();
        spec.replicas = replicas;
        spec.placement.nodes = pinned.iter().map(|s| s.to_string()).collect();
        DeployedService {
            spec,
            image: "i".into(),
            image_id: "x".into(),
            spec_hash: "h".into(),
            pins: Default::default(),
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    proptest! {
        /// Every replica is placed, no node holds more than its even share, and the
        /// answer does not depend on the order the nodes were listed in.
        #[test]
        fn placement_spreads_evenly(replicas in 0u32..40, n in 1usize..8, seed in any::<u64>()) {
            let svc = deployed(replicas, &[]);
            let mut nodes = names(n);
            let a = place("web", &svc, &nodes);
            nodes.rotate_left((seed % n as u64) as usize);
            prop_assert_eq!(&a, &place("web", &svc, &nodes));
            prop_assert_eq!(a.len() as u32, replicas);
            let cap = replicas.div_ceil(n as u32);
            for node in &nodes {
                prop_assert!(a.values().filter(|v| *v == node).count() as u32 <= cap);
            }
        }

        /// Losing a node moves its replicas (and few others); they all land on live nodes.
        #[test]
        fn losing_a_node_moves_its_replicas(replicas in 1u32..30, n in 2usize..8, lost in any::<usize>()) {
            let svc = deployed(replicas, &[]);
            let nodes = names(n);
            let before = place("web", &svc, &nodes);
            let gone = nodes[lost % n].clone();
            let rest: Vec<String> = nodes.iter().filter(|x| **x != gone).cloned().collect();
            let after = place("web", &svc, &rest);
            prop_assert_eq!(after.len() as u32, replicas);
            prop_assert!(after.values().all(|v| *v != gone));
            let had = before.values().filter(|v| **v == gone).count();
            let moved = before.iter().filter(|(r, v)| after[*r] != **v).count();
            // While the even share per node stays the same, the lost node's replicas and
            // those they displace move, but most others stay. (A smaller node set can
            // raise the share, which lets replicas reach nodes they rank higher.)
            if replicas.div_ceil(n as u32) == replicas.div_ceil(n as u32 - 1) {
                let others = replicas as usize - had;
                prop_assert!(moved - had <= others / 2, "moved {} had {}", moved, had);
            }
        }
    }

    #[test]
    fn a_fixed_publish_port_places_one_replica_per_node() {
        let mut svc = deployed(3, &[]);
        svc.spec.publish = Publish::Port(18080);
        let p = place("web", &svc, &["a".into(), "b".into()]);
        assert_eq!(p.len(), 2, "the third replica fits nowhere: {p:?}");
        assert_ne!(p.values().next(), p.values().nth(1));
        assert_eq!(place("web", &svc, &names(3)).len(), 3);
    }

    #[test]
    fn pins_and_pinned_nodes_are_honoured() {
        let svc = deployed(3, &["b"]);
        let p = place("web", &svc, &["a".into(), "b".into()]);
        assert!(p.values().all(|n| n == "b"));
        assert_eq!(p.len(), 3);
        let mut svc = deployed(2, &[]);
        let free = place("web", &svc, &["a".into(), "b".into()]);
        let other = if free[&0] == "a" { "b" } else { "a" };
        svc.pins.insert(0, other.to_owned());
        let pinned = place("web", &svc, &["a".into(), "b".into()]);
        assert_eq!(pinned[&0], other);
        // A pin to a node that is gone is ignored.
        let gone = place("web", &svc, &[free[&0].clone()]);
        assert_eq!(gone.len(), 2);
        assert_eq!(place("web", &svc, &[]).len(), 0);
    }
}
