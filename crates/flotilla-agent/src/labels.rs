//! Docker labels → instance spec. Pure: what the engine says about a container in, the
//! registration (or a precise complaint naming the label) out.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use flotilla_core::{CheckKind, CheckSpec, FieldError, InstanceSpec};

// Every `flotilla.*` label name the agent reads or writes is defined here. Labels a
// user puts on a container by hand (discovery) come first; then the ones the agent
// sets on the images it builds and the stack replicas it creates.

/// Label naming the service; a container without it is not ours.
pub const SERVICE: &str = "flotilla.service";
/// Label: port the service listens on inside the container's network.
pub const PORT: &str = "flotilla.port";
/// Label: which Docker network's address to register.
pub const NETWORK: &str = "flotilla.network";
/// Label: which address to register: `host` (this host's advertise address and the
/// port the engine published the service port on) or `container` (the container's
/// address on its network). Default: `host` when the port is published and the agent
/// knows its advertise address, else `container`.
pub const ADDRESS: &str = "flotilla.address";
/// Label: static weight.
pub const WEIGHT: &str = "flotilla.weight";
/// Label prefix of check settings (`flotilla.check.http`, `.tcp`, `.exec`, `.ttl`,
/// `.interval`, `.timeout`, `.rise`, `.fall`, `.deregister_after`).
pub const CHECK: &str = "flotilla.check.";
/// Label prefix copied into instance metadata (`flotilla.meta.version=1.2`).
pub const META: &str = "flotilla.meta.";
/// `flotilla.check.docker`: the container's own Docker `HEALTHCHECK`, as the engine
/// judges it (the default for a container that has one and no other check label).
pub const CHECK_DOCKER: &str = "flotilla.check.docker";
/// How often the engine's verdict on a `HEALTHCHECK` is read.
pub const ENGINE_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// `flotilla.check.tcp`: a TCP check (`true`: the service port, or a port number).
pub const CHECK_TCP: &str = "flotilla.check.tcp";
/// `flotilla.check.ttl`: a TTL check the service renews itself.
pub const CHECK_TTL: &str = "flotilla.check.ttl";
/// `flotilla.check.interval`: how often the check runs.
pub const CHECK_INTERVAL: &str = "flotilla.check.interval";
/// `flotilla.check.timeout`: how long one probe may take.
pub const CHECK_TIMEOUT: &str = "flotilla.check.timeout";
/// `flotilla.check.rise`: passes in a row that make an instance passing.
pub const CHECK_RISE: &str = "flotilla.check.rise";
/// `flotilla.check.fall`: failures in a row that make it critical.
pub const CHECK_FALL: &str = "flotilla.check.fall";
/// `flotilla.check.deregister_after`: critical this long, the instance is removed.
pub const CHECK_DEREGISTER_AFTER: &str = "flotilla.check.deregister_after";

/// Label: the stack a container or image belongs to.
pub const STACK: &str = "flotilla.stack";
/// Label naming a replica's secret environment variables (comma-separated): given at
/// create time, left out of backups unless asked for.
pub const SECRET_ENV: &str = "flotilla.secret_env";
/// Label: replica number within its service.
pub const REPLICA: &str = "flotilla.replica";
/// Label: hash of the spec the image was built from.
pub const SPEC_HASH: &str = "flotilla.spec-hash";
/// Label: service version from the spec.
pub const VERSION: &str = "flotilla.version";
/// Label: build time (RFC 3339).
pub const BUILD_TIME: &str = "flotilla.build-time";
/// Label: the node whose reconciler manages the container.
pub const OWNER: &str = "flotilla.node";
/// Label: the assignment generation a stateful replica's container was made under
/// ([`flotilla_core::recovery`]); a copy from an older generation is never started.
pub const GENERATION: &str = "flotilla.generation";
/// Metadata label: the replica's stack (`stack` in the registered instance).
pub const META_STACK: &str = "flotilla.meta.stack";
/// Metadata label: the replica's number (`replica` in the registered instance).
pub const META_REPLICA: &str = "flotilla.meta.replica";
/// Metadata label: the service version (`version` in the registered instance).
pub const META_VERSION: &str = "flotilla.meta.version";
/// Metadata label: the spec hash's first 12 characters (`spec`).
pub const META_SPEC: &str = "flotilla.meta.spec";
/// Label on the routed bridge network: the node's container subnet.
pub const ROUTED: &str = "flotilla.routed";

/// Labels that make a container a stack's replica (a restore relabels them).
pub const STACK_LABELS: [&str; 8] = [
    STACK,
    OWNER,
    REPLICA,
    SPEC_HASH,
    GENERATION,
    META_STACK,
    META_REPLICA,
    META_SPEC,
];

/// Metadata keys the agent sets from the engine's facts; labels may not set them.
pub const RESERVED_META: [&str; 5] = [
    "container_name",
    "container_id",
    "image",
    "network",
    "address_mode",
];

/// What the agent knows about a container, from `docker inspect`.
#[derive(Debug, Clone, Default)]
pub struct ContainerFacts {
    /// Full container id.
    pub id: String,
    /// Name without the leading '/'.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Networks and the container's address on each.
    pub networks: BTreeMap<String, Option<IpAddr>>,
    /// TCP ports published on the host: container port → host port (bindings on every
    /// address or on the agent's advertise address; one bound to another single
    /// address is left out, since other hosts may not reach it).
    pub published: BTreeMap<u16, u16>,
    /// The container has a Docker `HEALTHCHECK` (its image's or its own).
    pub healthcheck: bool,
}

/// How an instance's address was chosen (kept in its metadata as `address_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressMode {
    /// The host's advertise address and the published port: reachable from every
    /// host on the LAN.
    Host,
    /// The container's address on its Docker network: one host, or routed networks.
    Container,
}

impl AddressMode {
    fn name(self) -> &'static str {
        match self {
            AddressMode::Host => "host",
            AddressMode::Container => "container",
        }
    }
}

/// Registry id of a container's instance on `node`: stable for the container's life.
pub fn instance_id(node: &str, container_id: &str) -> String {
    format!("{node}-{}", &container_id[..container_id.len().min(12)])
}

fn label_err(label: &str, value: &str, why: impl std::fmt::Display) -> FieldError {
    FieldError::new(format!("label {label}"), format!("{value:?}: {why}"))
}

fn parse_duration(
    labels: &HashMap<String, String>,
    key: &str,
) -> Result<Option<Duration>, FieldError> {
    labels
        .get(key)
        .map(|v| humantime::parse_duration(v).map_err(|e| label_err(key, v, e)))
        .transpose()
}

fn parse_num<T: std::str::FromStr>(
    labels: &HashMap<String, String>,
    key: &str,
) -> Result<Option<T>, FieldError>
where
    T::Err: std::fmt::Display,
{
    labels
        .get(key)
        .map(|v| v.trim().parse::<T>().map_err(|e| label_err(key, v, e)))
        .transpose()
}

/// Builds the registration for a container, `Ok(None)` if it carries no
/// `flotilla.service` label. Errors name the label and its value.
///
/// `advertise` is the address other hosts reach this host at; with it, a container whose
/// service port is published is registered as `advertise:host_port` (Registrator's
/// model), so an lb or a watcher on another host can connect to it.
pub fn spec_from_container(
    node: &str,
    c: &ContainerFacts,
    default_network: Option<&str>,
    advertise: Option<IpAddr>,
) -> Result<Option<InstanceSpec>, FieldError> {
    let Some(service) = c.labels.get(SERVICE) else {
        return Ok(None);
    };
    let port: u16 = parse_num(&c.labels, PORT)?.ok_or_else(|| {
        FieldError::new(
            format!("label {PORT}"),
            "missing: the port the service listens on",
        )
    })?;
    let network = match c.labels.get(NETWORK).map(String::as_str) {
        Some(n) => n.to_owned(),
        None => match default_network.filter(|d| c.networks.contains_key(*d)) {
            Some(d) => d.to_owned(),
            None if c.networks.len() == 1 => c.networks.keys().next().cloned().unwrap_or_default(),
            None => {
                let names: Vec<_> = c.networks.keys().cloned().collect();
                return Err(FieldError::new(
                    format!("label {NETWORK}"),
                    format!("missing, and the container is on {} networks ({}): say which address to register", names.len(), names.join(", ")),
                ));
            }
        },
    };
    let address = match c.networks.get(&network) {
        Some(Some(ip)) => *ip,
        Some(None) => {
            return Err(label_err(
                NETWORK,
                &network,
                "the container has no address on this network",
            ))
        }
        None => {
            return Err(label_err(
                NETWORK,
                &network,
                "the container is not attached to this network",
            ))
        }
    };
    let published = c.published.get(&port).copied();
    let mode = match c.labels.get(ADDRESS).map(|v| v.trim()) {
        Some("host") => AddressMode::Host,
        Some("container") => AddressMode::Container,
        Some(other) => return Err(label_err(ADDRESS, other, "expected host or container")),
        None if published.is_some() && advertise.is_some() => AddressMode::Host,
        None => AddressMode::Container,
    };
    let (address, port) = match mode {
        AddressMode::Container => (address, port),
        AddressMode::Host => {
            let Some(host_port) = published else {
                return Err(label_err(
                    ADDRESS,
                    "host",
                    format!("container {} does not publish port {port} on all host addresses (docker run -p {port} ...)", c.name),
                ));
            };
            let Some(advertise) = advertise else {
                return Err(label_err(
                    ADDRESS,
                    "host",
                    "this agent has no advertise address (flotilla agent --advertise IP)",
                ));
            };
            (advertise, host_port)
        }
    };
    // A check on another port of the container is reached the same way as the service:
    // in host mode through that port's published host port.
    let check_port = |label: &str, p: u16| -> Result<u16, FieldError> {
        match mode {
            AddressMode::Container => Ok(p),
            AddressMode::Host => c.published.get(&p).copied().ok_or_else(|| {
                label_err(
                    label,
                    &p.to_string(),
                    "the instance is registered by host address, and this port is not published",
                )
            }),
        }
    };
    let weight = parse_num(&c.labels, WEIGHT)?.unwrap_or(100);

    let check = |k: &str| c.labels.get(&format!("{CHECK}{k}"));
    let mut kinds = Vec::new();
    if let Some(path) = check("http") {
        let path = if path.is_empty() {
            "/".to_owned()
        } else {
            path.clone()
        };
        kinds.push(CheckKind::Http { path, port: None });
    }
    if let Some(v) = check("tcp") {
        let port = match v.as_str() {
            "" | "true" | "yes" | "1" => None,
            p => Some(check_port(
                CHECK_TCP,
                p.parse::<u16>().map_err(|e| label_err(CHECK_TCP, p, e))?,
            )?),
        };
        kinds.push(CheckKind::Tcp { port });
    }
    if let Some(cmd) = check("exec") {
        kinds.push(CheckKind::Exec {
            command: vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
        });
    }
    if check("ttl").is_some() {
        let ttl = parse_duration(&c.labels, CHECK_TTL)?.unwrap_or_default();
        kinds.push(CheckKind::Ttl { ttl });
    }
    let docker_health = match check("docker").map(String::as_str) {
        None => false,
        Some("" | "true" | "yes" | "1") if c.healthcheck => true,
        Some(v) => {
            return Err(label_err(
                CHECK_DOCKER,
                v,
                if c.healthcheck {
                    "expected true"
                } else {
                    "the container has no HEALTHCHECK"
                },
            ))
        }
    };
    if docker_health {
        kinds.push(CheckKind::Docker);
    }
    if kinds.is_empty() && check("none").is_none() {
        // No stated check: the container's own HEALTHCHECK if it has one (the engine
        // judges it), else at least make sure something accepts connections.
        kinds.push(if c.healthcheck {
            CheckKind::Docker
        } else {
            CheckKind::Tcp { port: None }
        });
    }
    let interval = parse_duration(&c.labels, CHECK_INTERVAL)?;
    let timeout = parse_duration(&c.labels, CHECK_TIMEOUT)?;
    let rise = parse_num(&c.labels, CHECK_RISE)?;
    let fall = parse_num(&c.labels, CHECK_FALL)?;
    let deregister_after = parse_duration(&c.labels, CHECK_DEREGISTER_AFTER)?;
    let checks: Vec<CheckSpec> = kinds
        .into_iter()
        .map(|kind| {
            let engine = kind == CheckKind::Docker;
            let mut spec = CheckSpec::new(kind);
            if engine {
                // The engine already applied the HEALTHCHECK's retries and start
                // period: its verdict is taken as it is, read every second.
                spec.interval = ENGINE_HEALTH_INTERVAL;
                spec.rise = 1;
                spec.fall = 1;
            }
            if let Some(i) = interval {
                spec.interval = i;
            }
            spec.timeout = timeout;
            spec.rise = rise.unwrap_or(spec.rise);
            spec.fall = fall.unwrap_or(spec.fall);
            spec.deregister_after = deregister_after;
            spec
        })
        .collect();

    let mut meta = BTreeMap::new();
    for (k, v) in &c.labels {
        if let Some(key) = k.strip_prefix(META) {
            // The agent's own facts are what backups, migrations and exec checks act
            // on: a label must never stand in for them.
            if RESERVED_META.contains(&key) {
                return Err(label_err(
                    k,
                    v,
                    "reserved: the agent sets this metadata key itself",
                ));
            }
            meta.insert(key.to_owned(), v.clone());
        }
    }
    meta.insert("container_name".to_owned(), c.name.clone());
    meta.insert("container_id".to_owned(), c.id.clone());
    meta.insert("image".to_owned(), c.image.clone());
    meta.insert("network".to_owned(), network);
    meta.insert("address_mode".to_owned(), mode.name().to_owned());
    // This agent runs the checks on its own host (the server may not reach the address
    // at all); a TTL is a promise the service renews itself, judged by the server.
    let node_checks = !checks
        .iter()
        .any(|c| matches!(c.kind, CheckKind::Ttl { .. }));
    let spec = InstanceSpec {
        service: service.clone(),
        node: Some(node.to_owned()),
        address,
        port,
        weight,
        meta,
        checks,
        node_checks,
    };
    spec.validate().map_err(|e| {
        let label = match e.field.split(['.', '[']).next().unwrap_or_default() {
            "service" => SERVICE.to_owned(),
            "port" => PORT.to_owned(),
            "weight" => WEIGHT.to_owned(),
            "checks" => format!("{CHECK}*"),
            other => other.to_owned(),
        };
        FieldError::new(format!("label {label}"), e.message)
    })?;
    Ok(Some(spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(labels: &[(&str, &str)]) -> ContainerFacts {
        ContainerFacts {
            id: "0123456789abcdef0123".into(),
            name: "web-1".into(),
            image: "busybox".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            networks: [("front".to_string(), Some("198.18.5.2".parse().unwrap()))].into(),
            published: Default::default(),
            healthcheck: false,
        }
    }

    #[test]
    fn meta_labels_cannot_set_what_the_agent_acts_on() {
        for key in RESERVED_META {
            let label = format!("{META}{key}");
            let f = facts(&[
                ("flotilla.service", "web"),
                ("flotilla.port", "8080"),
                (label.as_str(), "ffffffffffff0000"),
            ]);
            let err = spec_from_container("n1", &f, None, None).unwrap_err();
            assert!(err.to_string().contains(&label), "{err}");
            assert!(err.to_string().contains("reserved"), "{err}");
        }
        let f = facts(&[("flotilla.service", "web"), ("flotilla.port", "8080")]);
        let s = spec_from_container("n1", &f, None, None).unwrap().unwrap();
        assert_eq!(s.meta["container_id"], "0123456789abcdef0123");
    }

    #[test]
    fn unlabelled_is_ignored() {
        assert_eq!(
            spec_from_container("n", &facts(&[]), None, None).unwrap(),
            None
        );
    }

    #[test]
    fn full_labels() {
        let f = facts(&[
            ("flotilla.service", "web"),
            ("flotilla.port", "8080"),
            ("flotilla.weight", "300"),
            ("flotilla.check.http", "/health"),
            ("flotilla.check.interval", "500ms"),
            ("flotilla.meta.version", "1.2"),
        ]);
        let s = spec_from_container("n1", &f, None, None).unwrap().unwrap();
        assert_eq!((s.service.as_str(), s.port, s.weight), ("web", 8080, 300));
        assert_eq!(s.address.to_string(), "198.18.5.2");
        assert_eq!(s.checks.len(), 1);
        assert_eq!(
            s.checks[0].kind,
            CheckKind::Http {
                path: "/health".into(),
                port: None
            }
        );
        assert_eq!(s.checks[0].interval, Duration::from_millis(500));
        assert_eq!(s.meta["version"], "1.2");
        assert_eq!(s.meta["container_name"], "web-1");
        assert_eq!(instance_id("n1", &f.id), "n1-0123456789ab");
    }

    #[test]
    fn default_check_is_tcp() {
        let s = spec_from_container(
            "n",
            &facts(&[("flotilla.service", "web"), ("flotilla.port", "80")]),
            None,
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.checks[0].kind, CheckKind::Tcp { port: None });
    }

    #[test]
    fn a_container_s_own_healthcheck_is_the_default_and_can_be_named() {
        let base = [("flotilla.service", "web"), ("flotilla.port", "80")];
        let mut f = facts(&base);
        f.healthcheck = true;
        let s = spec_from_container("n", &f, None, None).unwrap().unwrap();
        assert_eq!(s.checks.len(), 1);
        assert_eq!(s.checks[0].kind, CheckKind::Docker);
        assert_eq!(
            (s.checks[0].interval, s.checks[0].rise, s.checks[0].fall),
            (ENGINE_HEALTH_INTERVAL, 1, 1),
            "the engine's verdict is taken as it is"
        );
        assert!(s.node_checks, "the agent judges it");
        // Another stated check replaces it; naming it adds it.
        f.labels
            .insert("flotilla.check.http".into(), "/health".into());
        let s = spec_from_container("n", &f, None, None).unwrap().unwrap();
        assert_eq!(s.checks.len(), 1);
        f.labels
            .insert("flotilla.check.docker".into(), "true".into());
        let s = spec_from_container("n", &f, None, None).unwrap().unwrap();
        assert_eq!(s.checks.len(), 2);
        // Asked for on a container without one: refused, naming the label.
        f.healthcheck = false;
        let e = spec_from_container("n", &f, None, None).unwrap_err();
        assert_eq!(e.field, "label flotilla.check.docker");
        assert!(e.message.contains("no HEALTHCHECK"), "{}", e.message);
    }

    #[test]
    fn errors_name_the_label() {
        let e = spec_from_container("n", &facts(&[("flotilla.service", "web")]), None, None)
            .unwrap_err();
        assert_eq!(e.field, "label flotilla.port");
        let e = spec_from_container(
            "n",
            &facts(&[("flotilla.service", "web"), ("flotilla.port", "http")]),
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(e.field, "label flotilla.port");
        let e = spec_from_container(
            "n",
            &facts(&[("flotilla.service", "Web!"), ("flotilla.port", "80")]),
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(e.field, "label flotilla.service");
        let e = spec_from_container(
            "n",
            &facts(&[
                ("flotilla.service", "web"),
                ("flotilla.port", "80"),
                ("flotilla.network", "back"),
            ]),
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(e.field, "label flotilla.network");
        let e = spec_from_container(
            "n",
            &facts(&[
                ("flotilla.service", "web"),
                ("flotilla.port", "80"),
                ("flotilla.check.interval", "soon"),
            ]),
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(e.field, "label flotilla.check.interval");
    }

    #[test]
    fn several_networks_need_a_choice() {
        let mut f = facts(&[("flotilla.service", "web"), ("flotilla.port", "80")]);
        f.networks
            .insert("back".into(), Some("198.18.6.2".parse().unwrap()));
        assert_eq!(
            spec_from_container("n", &f, None, None).unwrap_err().field,
            "label flotilla.network"
        );
        let s = spec_from_container("n", &f, Some("back"), None)
            .unwrap()
            .unwrap();
        assert_eq!(s.address.to_string(), "198.18.6.2");
    }

    #[test]
    fn a_published_port_is_registered_at_the_advertise_address() {
        let advertise: IpAddr = "198.18.100.2".parse().unwrap();
        let mut f = facts(&[
            ("flotilla.service", "web"),
            ("flotilla.port", "80"),
            ("flotilla.check.tcp", "81"),
        ]);
        f.published = [(80, 32768), (81, 32769)].into();
        let s = spec_from_container("n", &f, None, Some(advertise))
            .unwrap()
            .unwrap();
        assert_eq!((s.address, s.port), (advertise, 32768));
        assert_eq!(s.meta["address_mode"], "host");
        assert_eq!(s.checks[0].kind, CheckKind::Tcp { port: Some(32769) });
        // Without an advertise address (or forced), the container's own address.
        let s = spec_from_container("n", &f, None, None).unwrap().unwrap();
        assert_eq!((s.address.to_string(), s.port), ("198.18.5.2".into(), 80));
        f.labels.insert(ADDRESS.into(), "container".into());
        let s = spec_from_container("n", &f, None, Some(advertise))
            .unwrap()
            .unwrap();
        assert_eq!((s.address.to_string(), s.port), ("198.18.5.2".into(), 80));
        assert_eq!(s.meta["address_mode"], "container");
        assert_eq!(s.checks[0].kind, CheckKind::Tcp { port: Some(81) });
    }

    #[test]
    fn host_mode_without_a_published_port_is_refused_naming_container_and_label() {
        let mut f = facts(&[
            ("flotilla.service", "web"),
            ("flotilla.port", "80"),
            ("flotilla.address", "host"),
        ]);
        let advertise = Some("198.18.100.2".parse().unwrap());
        let e = spec_from_container("n", &f, None, advertise).unwrap_err();
        assert_eq!(e.field, "label flotilla.address");
        assert!(
            e.message.contains("web-1") && e.message.contains("80"),
            "{e}"
        );
        f.published = [(80, 32768)].into();
        let e = spec_from_container("n", &f, None, None).unwrap_err();
        assert!(e.message.contains("--advertise"), "{e}");
        f.labels.insert(ADDRESS.into(), "nat".into());
        let e = spec_from_container("n", &f, None, advertise).unwrap_err();
        assert_eq!(e.field, "label flotilla.address");
        // A check port that is not published cannot be reached in host mode.
        f.labels.insert(ADDRESS.into(), "host".into());
        f.labels.insert("flotilla.check.tcp".into(), "9000".into());
        let e = spec_from_container("n", &f, None, advertise).unwrap_err();
        assert_eq!(e.field, "label flotilla.check.tcp");
    }
}
