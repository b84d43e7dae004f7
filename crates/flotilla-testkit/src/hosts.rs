//! Separate hosts on one machine: a network namespace per host with its own Docker
//! Engine, all joined by one LAN bridge, and client namespaces on the same LAN.
//!
//! This behaves like machines that share only a LAN: each host has one LAN address; its
//! engine's container subnet (from 198.19.0.0/16) is routed nowhere else, so a container
//! address on host A is unreachable from host B, while a port the engine published on A
//! answers at A's LAN address. Engines are started with `nsenter --net=…` (not `ip netns
//! exec`, which remounts /sys and hides the cgroup mounts dockerd needs). Cutting a
//! host's link, partitions and healing come from [`Lan`]. Everything — engines,
//! containers, mounts, namespaces, veths — is removed on drop.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command};

use anyhow::{bail, Context, Result};

use crate::netns::Lan;
use crate::{docker, docker_at};

/// A Docker Engine running inside one host's namespace.
struct HostEngine {
    /// `unix:///…` endpoint.
    endpoint: String,
    dir: tempfile::TempDir,
    child: Child,
}

/// Hosts with engines and clients without, on one LAN.
pub struct Hosts {
    engines: Vec<(String, HostEngine)>,
    /// The LAN (dropped after the engines).
    pub lan: Lan,
}

/// The main engine's storage driver, for the hosts' engines (another driver may not
/// work on this machine's filesystem).
fn storage_driver() -> Result<String> {
    Ok(docker(&["info", "--format", "{{.Driver}}"])?
        .trim()
        .to_owned())
}

impl Hosts {
    /// Creates `hosts` (each with an engine) and `clients` (namespaces only) on one LAN
    /// of 198.18.`subnet`.0/24, in that order (host `i` is `.i+1`).
    pub fn create(hosts: &[&str], clients: &[&str], subnet: u8) -> Result<Hosts> {
        let all: Vec<&str> = hosts.iter().chain(clients).copied().collect();
        let lan = Lan::create(&all, subnet)?;
        let driver = storage_driver()?;
        let mut made = Hosts {
            engines: Vec::new(),
            lan,
        };
        for (i, h) in hosts.iter().enumerate() {
            // Each host's containers get their own /24: the same on no two hosts, and
            // routed from none of the others.
            let bip = format!(
                "198.19.{}.1/24",
                (u32::from(subnet) * 7 + i as u32) % 250 + 1
            );
            let engine = made.start_engine(h, &driver, &bip)?;
            made.engines.push((h.to_string(), engine));
        }
        Ok(made)
    }

    fn start_engine(&self, host: &str, driver: &str, bip: &str) -> Result<HostEngine> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("flotilla-host-{host}-"))
            .tempdir()?;
        let (child, endpoint) = crate::spawn_dockerd(
            self.command(host, "dockerd"),
            dir.path(),
            host,
            &format!("{{\"storage-driver\": {driver:?}}}"),
            &["--bip", bip],
        )?;
        Ok(HostEngine {
            endpoint,
            dir,
            child,
        })
    }

    /// A command that runs in `node`'s network namespace (host or client), through
    /// `nsenter` so it sees the machine's /sys and cgroups as they are.
    pub fn command(&self, node: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.lan.ns(node)))
            .arg("--")
            .arg(program);
        c
    }

    /// `node`'s LAN address.
    pub fn addr(&self, node: &str) -> Ipv4Addr {
        self.lan.addr(node)
    }

    /// The Docker endpoint of `host`'s engine (`unix:///…`).
    pub fn engine(&self, host: &str) -> &str {
        &self.host_engine(host).endpoint
    }

    fn host_engine(&self, host: &str) -> &HostEngine {
        &self
            .engines
            .iter()
            .find(|(n, _)| n == host)
            .unwrap_or_else(|| panic!("no host {host} with an engine"))
            .1
    }

    /// Runs `docker ARGS` against `host`'s engine.
    pub fn docker(&self, host: &str, args: &[&str]) -> Result<String> {
        docker_at(Some(self.engine(host)), args)
    }

    /// Copies `image` from the machine's main engine into `host`'s (`docker save |
    /// docker load`): the hosts pull nothing from outside.
    pub fn load_image(&self, host: &str, image: &str) -> Result<()> {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker save {image} | docker -H {} load -q",
                self.engine(host)
            ))
            .status()
            .context("docker save | docker load")?;
        if !status.success() {
            bail!("loading {image} into host {host} failed");
        }
        Ok(())
    }

    /// Takes `node`'s LAN link down: it keeps running, cut off from every other.
    pub fn cut(&self, node: &str) -> Result<()> {
        self.lan.cut(node)
    }

    /// Brings `node`'s LAN link back.
    pub fn heal(&self, node: &str) -> Result<()> {
        self.lan.heal(node)
    }

    /// The directory of `host`'s engine (its log is `dockerd.log` there).
    pub fn engine_dir(&self, host: &str) -> PathBuf {
        self.host_engine(host).dir.path().to_path_buf()
    }
}

impl Drop for HostEngine {
    fn drop(&mut self) {
        crate::stop_dockerd(&self.endpoint, &mut self.child, self.dir.path());
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Engines first (they live in the namespaces the LAN deletes after).
        self.engines.clear();
    }
}
