//! The Docker Engine side: connecting, inspecting containers, running exec checks.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;
use bollard::container::{InspectContainerOptions, ListContainersOptions};
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::Docker;
use futures::StreamExt;

use crate::labels::{ContainerFacts, SERVICE};

/// Connects to `unix:///path`, `tcp://host:port` or `http://host:port` and negotiates
/// the API version, so older engines work too.
pub async fn connect(endpoint: &str) -> anyhow::Result<Docker> {
    let docker = if let Some(path) = endpoint.strip_prefix("unix://") {
        Docker::connect_with_unix(path, 30, bollard::API_DEFAULT_VERSION)
    } else {
        let url = endpoint.replacen("tcp://", "http://", 1);
        Docker::connect_with_http(&url, 30, bollard::API_DEFAULT_VERSION)
    }
    .with_context(|| format!("connecting to the Docker Engine at {endpoint}"))?;
    docker
        .negotiate_version()
        .await
        .with_context(|| format!("talking to the Docker Engine at {endpoint}"))
}

/// Facts about a running container, `None` if it is gone or not running. `advertise`
/// is this host's advertise address: a port published on it counts as published.
pub async fn inspect(
    docker: &Docker,
    id: &str,
    advertise: Option<std::net::IpAddr>,
) -> anyhow::Result<Option<ContainerFacts>> {
    let info = match docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
    {
        Ok(i) => i,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let state = info.state.unwrap_or_default();
    if !state.running.unwrap_or(false) || state.paused.unwrap_or(false) {
        return Ok(None);
    }
    let config = info.config.unwrap_or_default();
    let settings = info.network_settings.unwrap_or_default();
    let published = published_ports(settings.ports.unwrap_or_default(), advertise);
    let networks: BTreeMap<_, _> = settings
        .networks
        .unwrap_or_default()
        .into_iter()
        .map(|(name, ep)| {
            let ip = ep
                .ip_address
                .filter(|s| !s.is_empty())
                .and_then(|s| s.parse().ok());
            (name, ip)
        })
        .collect();
    // `["NONE"]` is how a container turns its image's HEALTHCHECK off.
    let healthcheck = config
        .healthcheck
        .as_ref()
        .and_then(|h| h.test.as_ref())
        .is_some_and(|t| !t.is_empty() && t[0] != "NONE");
    Ok(Some(ContainerFacts {
        id: info.id.unwrap_or_else(|| id.to_owned()),
        name: info
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        image: config.image.unwrap_or_default(),
        labels: config.labels.unwrap_or_default(),
        networks,
        published,
        healthcheck,
    }))
}

/// The engine's verdict on a container's own `HEALTHCHECK`: passing while `healthy`;
/// the output is the status and the last probe's output (what `docker inspect` shows).
pub async fn engine_health(docker: &Docker, container: &str) -> (bool, String) {
    let info = match docker
        .inspect_container(container, None::<InspectContainerOptions>)
        .await
    {
        Ok(i) => i,
        Err(e) => return (false, format!("inspect failed: {e}")),
    };
    let Some(health) = info.state.and_then(|s| s.health) else {
        return (false, "the container has no HEALTHCHECK".into());
    };
    let status = health
        .status
        .map(|s| s.to_string())
        .unwrap_or_else(|| "unknown".into());
    let last = health
        .log
        .and_then(|l| l.into_iter().last())
        .and_then(|l| l.output)
        .unwrap_or_default();
    let passing = status == "healthy";
    (passing, format!("docker health: {status}; {}", last.trim()))
}

/// TCP ports the engine published on all host addresses or on the advertise address:
/// container port → host port. A binding to another single address (`-p
/// 127.0.0.1:8080:80` on a host advertising its LAN address) is left out: other hosts
/// cannot reach it there.
fn published_ports(
    ports: bollard::models::PortMap,
    advertise: Option<std::net::IpAddr>,
) -> BTreeMap<u16, u16> {
    let mut out = BTreeMap::new();
    for (key, bindings) in ports {
        let Some(port) = key.strip_suffix("/tcp").and_then(|p| p.parse::<u16>().ok()) else {
            continue;
        };
        let host_port = bindings.unwrap_or_default().into_iter().find_map(|b| {
            let ip = b.host_ip.as_deref().unwrap_or("");
            let reachable = matches!(ip, "" | "0.0.0.0" | "::")
                || advertise.is_some_and(|a| ip.parse() == Ok(a));
            reachable
                .then(|| b.host_port?.parse::<u16>().ok())
                .flatten()
        });
        if let Some(h) = host_port {
            out.insert(port, h);
        }
    }
    out
}

/// Ids of the running containers that carry the service label.
pub async fn labelled_running(docker: &Docker) -> anyhow::Result<Vec<String>> {
    let mut filters = HashMap::new();
    filters.insert("label".to_owned(), vec![SERVICE.to_owned()]);
    filters.insert("status".to_owned(), vec!["running".to_owned()]);
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: false,
            filters,
            ..Default::default()
        }))
        .await?;
    Ok(list.into_iter().filter_map(|c| c.id).collect())
}

/// What [`exec`] saw: the exit code (-1 when the container is not running), the
/// output (stdout and stderr as they came), and whether the output was cut at `limit`.
#[derive(Debug, Clone)]
pub struct ExecResult {
    /// Exit code.
    pub code: i64,
    /// The first `limit` bytes of output (lossy UTF-8).
    pub output: String,
    /// Whether there was more.
    pub truncated: bool,
}

/// Runs `command` inside a running container and collects up to `limit` bytes of its
/// output (the rest is read and dropped, so the command never blocks on a full pipe).
pub async fn exec(
    docker: &Docker,
    container: &str,
    command: &[String],
    limit: usize,
) -> Result<ExecResult, bollard::errors::Error> {
    // Never exec into a paused container: runc would block in the frozen cgroup.
    let state = docker
        .inspect_container(container, None::<InspectContainerOptions>)
        .await?
        .state
        .unwrap_or_default();
    if state.paused.unwrap_or(false) || !state.running.unwrap_or(false) {
        return Ok(ExecResult {
            code: -1,
            output: "container is not running".to_owned(),
            truncated: false,
        });
    }
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions {
                cmd: Some(command.to_vec()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await?;
    let mut output = Vec::new();
    let mut truncated = false;
    if let StartExecResults::Attached {
        output: mut stream, ..
    } = docker.start_exec(&exec.id, None).await?
    {
        while let Some(chunk) = stream.next().await {
            let bytes = chunk?.into_bytes();
            let room = limit.saturating_sub(output.len());
            truncated |= bytes.len() > room;
            output.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
    }
    let code = docker.inspect_exec(&exec.id).await?.exit_code.unwrap_or(-1);
    Ok(ExecResult {
        code,
        output: String::from_utf8_lossy(&output).into_owned(),
        truncated,
    })
}

/// Runs `command` inside the container; passing iff it exits 0 within `timeout`.
pub async fn exec_check(
    docker: &Docker,
    container: &str,
    command: &[String],
    timeout: Duration,
) -> (bool, String) {
    let run = async {
        let r = exec(docker, container, command, 1024).await?;
        Ok::<_, bollard::errors::Error>((r.code, r.output))
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok((0, out))) => (true, out.trim().chars().take(512).collect()),
        Ok(Ok((code, out))) => (
            false,
            format!(
                "exit {code}: {}",
                out.trim().chars().take(512).collect::<String>()
            ),
        ),
        Ok(Err(e)) => (false, format!("exec failed: {e}")),
        Err(_) => (false, format!("exec timed out after {timeout:?}")),
    }
}

/// What the load loop reads of a container once (until the engine says it changed).
#[derive(Debug, Clone, Copy)]
pub struct LoadFacts {
    /// The CPU quota in cores, `None` when it has none.
    pub quota: Option<f64>,
    /// The container's first process, whose cgroup holds its counters.
    pub pid: Option<u32>,
}

/// The container's CPU quota and first process. Read once per container by the load
/// loop (a quota changes only with `docker update`, the process with a restart — both
/// are engine events that make the loop read it again).
pub async fn load_facts(docker: &Docker, container: &str) -> anyhow::Result<LoadFacts> {
    let info = docker
        .inspect_container(container, None::<InspectContainerOptions>)
        .await?;
    let pid = info
        .state
        .as_ref()
        .and_then(|s| s.pid)
        .filter(|p| *p > 0)
        .and_then(|p| u32::try_from(p).ok());
    let host = info.host_config.unwrap_or_default();
    let quota = match (host.nano_cpus, host.cpu_quota, host.cpu_period) {
        (Some(n), _, _) if n > 0 => Some(n as f64 / 1e9),
        (_, Some(q), Some(p)) if q > 0 && p > 0 => Some(q as f64 / p as f64),
        (_, Some(q), _) if q > 0 => Some(q as f64 / 100_000.0),
        _ => None,
    };
    Ok(LoadFacts { quota, pid })
}

/// One load sample of a container through the engine's stats API, given its quota (else
/// the host's CPUs count); the fall-back of [`crate::cgroup::CgroupReader::sample`].
pub async fn sample(
    docker: &Docker,
    container: &str,
    quota: Option<f64>,
) -> anyhow::Result<crate::load::Sample> {
    use bollard::container::StatsOptions;
    let mut stream = docker.stats(
        container,
        Some(StatsOptions {
            stream: false,
            one_shot: true,
        }),
    );
    let stats = stream.next().await.context("no stats")??;
    let online = stats
        .cpu_stats
        .online_cpus
        .filter(|n| *n > 0)
        .map(|n| n as f64)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as f64)
                .unwrap_or(1.0)
        });
    Ok(crate::load::Sample {
        cpu_total_ns: stats.cpu_stats.cpu_usage.total_usage,
        memory_usage: stats.memory_stats.usage.unwrap_or(0),
        memory_limit: stats.memory_stats.limit.unwrap_or(0),
        cpu_limit: quota.unwrap_or(online),
        at: std::time::Instant::now(),
    })
}

/// The engine's `ExposedPorts`: port → empty object.
pub(crate) type ExposedPorts = HashMap<String, HashMap<(), ()>>;

/// The engine settings that publish `port` as `publish` says: the exposed port and its
/// binding on `host_ip` — the agent's advertise address, so the service is reachable
/// where the agent registers it and on no other address of the host (on loopback only
/// for `flotilla up`); every address when it is `None` — or nothing for
/// `publish = "none"`.
pub(crate) fn published_port(
    port: u16,
    publish: flotilla_core::stack::Publish,
    host_ip: Option<std::net::IpAddr>,
) -> (Option<ExposedPorts>, Option<bollard::models::PortMap>) {
    let Some(host_port) = publish.host_port() else {
        return (None, None);
    };
    let key = format!("{port}/tcp");
    (
        Some([(key.clone(), HashMap::new())].into()),
        Some(
            [(
                key,
                Some(vec![bollard::models::PortBinding {
                    host_ip: host_ip.map(|ip| ip.to_string()),
                    host_port: Some(host_port),
                }]),
            )]
            .into(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::PortBinding;

    fn binding(ip: &str, port: &str) -> PortBinding {
        PortBinding {
            host_ip: Some(ip.into()),
            host_port: Some(port.into()),
        }
    }

    #[test]
    fn ports_published_everywhere_or_on_the_advertise_address_count() {
        let ports = [
            (
                "80/tcp".to_string(),
                Some(vec![binding("0.0.0.0", "32768")]),
            ),
            (
                "81/tcp".to_string(),
                Some(vec![binding("198.18.7.1", "32769")]),
            ),
            (
                "82/tcp".to_string(),
                Some(vec![binding("127.0.0.1", "32770")]),
            ),
            (
                "83/udp".to_string(),
                Some(vec![binding("0.0.0.0", "32771")]),
            ),
            ("84/tcp".to_string(), None),
        ]
        .into_iter()
        .collect();
        let got = published_ports(ports, Some("198.18.7.1".parse().unwrap()));
        assert_eq!(got, [(80, 32768), (81, 32769)].into());
    }
}

/// A registry image on this engine, as a pull left it.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// The reference pinned to what was pulled (`REPO@sha256:…`): every node that
    /// pulls it gets these very bytes, whatever the tag points to by then.
    pub pinned: String,
    /// The image id (`sha256:…` of its config).
    pub id: String,
}

/// Pulls `image` with the credential `auth` has for its registry (none if it has
/// none). The error carries the registry's answer ("manifest unknown", "unauthorized",
/// "connection refused") and names the image.
pub async fn pull(
    docker: &Docker,
    image: &flotilla_core::stack::ImageRef,
    auth: Option<&flotilla_core::registry_auth::RegistryAuth>,
) -> anyhow::Result<PulledImage> {
    let credentials = auth
        .and_then(|a| a.for_registry(image.registry()))
        .map(|c| bollard::auth::DockerCredentials {
            username: Some(c.username.clone()),
            password: Some(c.password.clone()),
            serveraddress: Some(image.registry().to_owned()),
            ..Default::default()
        });
    // Without a tag or digest the engine would pull every tag of the repository.
    let from = if image.digest().is_none() && image.repository() == image.as_str() {
        format!("{image}:latest")
    } else {
        image.to_string()
    };
    // A large image takes longer than the engine client's 30 s request timeout.
    let engine = docker.clone().with_timeout(Duration::from_secs(900));
    let mut s = engine.create_image(
        Some(bollard::image::CreateImageOptions {
            from_image: from.clone(),
            ..Default::default()
        }),
        None,
        credentials,
    );
    while let Some(item) = s.next().await {
        let info = item.map_err(|e| anyhow::anyhow!("pulling {from}: {}", engine_message(e)))?;
        if let Some(e) = info.error {
            anyhow::bail!("pulling {from}: {e}");
        }
    }
    let info = docker
        .inspect_image(&from)
        .await
        .with_context(|| format!("{from} is not on the engine after its pull"))?;
    let id = info.id.context("the engine reports no image id")?;
    let repo = image.repository();
    let digests = info.repo_digests.unwrap_or_default();
    let pinned = digests
        .iter()
        .find(|d| d.split_once('@').is_some_and(|(r, _)| r == repo))
        .or(digests.first())
        .cloned()
        .with_context(|| format!("the engine reports no registry digest for {from}"))?;
    Ok(PulledImage { pinned, id })
}

/// The engine's own words from a bollard error (its message, not the HTTP framing).
fn engine_message(e: bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message,
        other => other.to_string(),
    }
}

/// The names other containers on `network` reach a stack service's replicas by, as
/// Compose users expect: `SERVICE.STACK` always, and the bare `SERVICE` on the stack's
/// own network (`flotilla-STACK`; on a shared network it would mix stacks' services).
pub(crate) fn service_aliases(stack: &str, service: &str, network: &str) -> Vec<String> {
    let mut aliases = vec![format!("{service}.{stack}")];
    if network == format!("flotilla-{stack}") {
        aliases.push(service.to_owned());
    }
    aliases
}

/// The lowest TCP port an image on this engine EXPOSEs (`None` if it is not here or
/// exposes none).
pub async fn exposed_port(docker: &Docker, image: &str) -> Option<u16> {
    let info = docker.inspect_image(image).await.ok()?;
    info.config?
        .exposed_ports?
        .keys()
        .filter_map(|k| k.strip_suffix("/tcp")?.parse::<u16>().ok())
        .min()
}
