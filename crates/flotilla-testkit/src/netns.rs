//! A test LAN of network namespaces: one namespace per node, each with an `eth0` on a
//! shared bridge (in a hub namespace of its own) in 198.18.N.0/24. Links can be cut
//! and healed (node loss, partition). Everything is deleted on drop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The LAN.
pub struct Lan {
    /// Namespace holding the bridge; `None`: an existing bridge in the host namespace.
    hub: Option<String>,
    nodes: Vec<(String, String)>,
    /// Bridge-side port of each node.
    ports: Vec<String>,
    subnet: u8,
    first_host: u8,
}

impl Lan {
    /// Creates namespaces for `nodes` on subnet 198.18.`subnet`.0/24; node `i` gets
    /// address `.i+1`.
    pub fn create(nodes: &[&str], subnet: u8) -> Result<Lan> {
        let tag = crate::unique("fl");
        let hub = format!("{tag}-hub");
        ip(&["netns", "add", &hub])?;
        let mut lan = Lan {
            hub: Some(hub),
            nodes: Vec::new(),
            ports: Vec::new(),
            subnet,
            first_host: 1,
        };
        lan.hub_ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.hub_ip(&["link", "set", "br0", "up"])?;
        lan.add_nodes(&tag, nodes, "br0")?;
        Ok(lan)
    }

    /// Namespaces for `nodes` plugged into `bridge`, an existing bridge in the host
    /// namespace (a Docker network's), on its subnet 198.18.`subnet`.0/24 from host
    /// number `first_host` on — so they share a LAN with that network's containers.
    pub fn attach(bridge: &str, nodes: &[&str], subnet: u8, first_host: u8) -> Result<Lan> {
        let tag = crate::unique("fl");
        let mut lan = Lan {
            hub: None,
            nodes: Vec::new(),
            ports: Vec::new(),
            subnet,
            first_host,
        };
        lan.add_nodes(&tag, nodes, bridge)?;
        Ok(lan)
    }

    fn add_nodes(&mut self, tag: &str, nodes: &[&str], bridge: &str) -> Result<()> {
        static PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        for n in nodes {
            let ns = format!("{tag}-{n}");
            ip(&["netns", "add", &ns])?;
            // No duplicate address detection: addresses (and moved VIPs) are usable at
            // once, as on a LAN whose addresses a test hands out itself.
            let _ = Command::new("ip")
                .args(["netns", "exec", &ns, "sysctl", "-qw"])
                .args([
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ])
                .status();
            self.nodes.push((n.to_string(), ns.clone()));
            // Host-namespace names must be unique across processes; ≤ 15 characters.
            let port = match &self.hub {
                Some(_) => format!("p{}", self.ports.len()),
                None => format!(
                    "flv{}x{}",
                    std::process::id() % 100_000,
                    PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ),
            };
            let mut add = vec![
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
            ];
            if let Some(h) = &self.hub {
                add.extend_from_slice(&["netns", h]);
            }
            ip(&add)?;
            self.hub_ip(&["link", "set", &port, "master", bridge])?;
            self.hub_ip(&["link", "set", &port, "up"])?;
            self.ports.push(port);
            let addr = format!("{}/24", self.addr(n));
            self.in_ns(&ns, &["addr", "add", &addr, "dev", "eth0"])?;
            let addr6 = format!("{}/64", self.addr6(n));
            self.in_ns(&ns, &["-6", "addr", "add", &addr6, "dev", "eth0", "nodad"])?;
            self.in_ns(&ns, &["link", "set", "eth0", "up"])?;
            self.in_ns(&ns, &["link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn in_ns(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn hub_ip(&self, args: &[&str]) -> Result<String> {
        match &self.hub {
            Some(h) => self.in_ns(h, args),
            None => ip(args),
        }
    }

    /// Namespace name of `node`.
    pub fn ns(&self, node: &str) -> &str {
        &self
            .nodes
            .iter()
            .find(|(n, _)| n == node)
            .unwrap_or_else(|| panic!("no node {node}"))
            .1
    }

    fn index(&self, node: &str) -> usize {
        self.nodes
            .iter()
            .position(|(n, _)| n == node)
            .unwrap_or_else(|| panic!("no node {node}"))
    }

    /// `node`'s address.
    pub fn addr(&self, node: &str) -> Ipv4Addr {
        let i = self.nodes.iter().position(|(n, _)| n == node);
        // During create the node is the last one pushed.
        let i = i.unwrap_or(self.nodes.len().saturating_sub(1));
        Ipv4Addr::new(198, 18, self.subnet, i as u8 + self.first_host)
    }

    /// An address in the subnet that no node has (for a VIP).
    pub fn spare(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, last)
    }

    /// `node`'s IPv6 address: `fd00:198:18:N::H` (a ULA prefix of the test's own).
    pub fn addr6(&self, node: &str) -> Ipv6Addr {
        let v4 = self.addr(node).octets();
        Self::ula(self.subnet, v4[3])
    }

    /// An IPv6 address in the LAN's prefix that no node has (for a VIP).
    pub fn spare6(&self, last: u8) -> Ipv6Addr {
        Self::ula(self.subnet, last)
    }

    fn ula(subnet: u8, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x198,
            0x18,
            u16::from(subnet),
            0,
            0,
            0,
            u16::from(host),
        )
    }

    /// Runs `ip ARGS` inside `node`'s namespace.
    pub fn ip(&self, node: &str, args: &[&str]) -> Result<String> {
        self.in_ns(self.ns(node), args)
    }

    /// A command that runs inside `node`'s namespace.
    pub fn command(&self, node: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(node), program]);
        c
    }

    /// `node`'s MAC address on eth0.
    pub fn mac(&self, node: &str) -> Result<String> {
        let out = self.ip(node, &["-o", "link", "show", "eth0"])?;
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(str::to_owned)
            .context("no MAC on eth0")
    }

    /// True if `addr` is configured on `node`'s eth0.
    pub fn has_addr(&self, node: &str, addr: impl Into<IpAddr>) -> Result<bool> {
        let addr = addr.into();
        let family = if addr.is_ipv4() { "-4" } else { "-6" };
        let out = self.ip(node, &["-o", family, "addr", "show", "dev", "eth0"])?;
        Ok(out.contains(&format!(" {addr}/")))
    }

    /// The MAC `node`'s neighbour table holds for `addr`, if any.
    pub fn neighbour(&self, node: &str, addr: impl Into<IpAddr>) -> Result<Option<String>> {
        let addr = addr.into();
        let out = self.ip(node, &["neigh", "show", &addr.to_string()])?;
        Ok(out
            .split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .map(str::to_owned))
    }

    /// Takes `node`'s link down on the bridge side: it keeps running, alone.
    pub fn cut(&self, node: &str) -> Result<()> {
        let port = self.ports[self.index(node)].clone();
        self.hub_ip(&["link", "set", &port, "down"]).map(|_| ())
    }

    /// Brings `node`'s link back.
    pub fn heal(&self, node: &str) -> Result<()> {
        let port = self.ports[self.index(node)].clone();
        self.hub_ip(&["link", "set", &port, "up"]).map(|_| ())
    }

    /// Drops every incoming packet of IP protocol `proto` at `node` (iptables in its
    /// namespace): with VRRP (112) on both lbs, a partition of the pair alone while
    /// clients still reach both.
    pub fn block(&self, node: &str, proto: u8) -> Result<()> {
        self.iptables(node, "-A", proto)
    }

    /// Undoes [`Lan::block`].
    pub fn unblock(&self, node: &str, proto: u8) -> Result<()> {
        self.iptables(node, "-D", proto)
    }

    fn iptables(&self, node: &str, op: &str, proto: u8) -> Result<()> {
        let out = self
            .command(node, "iptables")
            .args([op, "INPUT", "-p", &proto.to_string(), "-j", "DROP"])
            .output()
            .context("running iptables")?;
        if !out.status.success() {
            bail!("iptables: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Runs `f` on a thread that lives in `node`'s namespace (sockets it opens are
    /// that node's).
    pub fn run_in<T: Send + 'static>(
        &self,
        node: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns(node));
        std::thread::spawn(move || {
            enter(&path).expect("entering the namespace");
            f()
        })
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and with it the bridge-side one.
        for (_, ns) in &self.nodes {
            let _ = ip(&["netns", "del", ns]);
        }
        if let Some(h) = &self.hub {
            let _ = ip(&["netns", "del", h]);
        }
    }
}
