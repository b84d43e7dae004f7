//! The routed cluster network on this host (flannel's host-gw idea, no overlay, no NAT
//! between containers): the registry gives this node a /24 of `cluster_cidr`; the
//! agent makes the Docker bridge network [`ROUTED_NETWORK`] in it (without Docker's
//! masquerade), opens the engine's forwarding filter to it, masquerades only traffic
//! that leaves the cluster network, and keeps a route to every other node's /24 via
//! that node's advertise address. Stack services then use it and register their
//! container addresses, which every host with an agent (or a route) reaches directly.
//!
//! Routes go through rtnetlink; the two firewall rules through `iptables`, because the
//! engine's own rules live there (its `DOCKER-USER` chain is the documented place for
//! an operator's, and an agent is an operator here) and there is no maintained crate
//! that edits them other than by running the same program.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bollard::models::{Ipam, IpamConfig};
use bollard::network::CreateNetworkOptions;
use flotilla_core::subnet::{gateway, Ipv4Net, NodeNetwork, SubnetView};

use crate::state::Inner;

/// The Docker network of the routed cluster network on every node.
pub const ROUTED_NETWORK: &str = "flotilla-routed";
/// Its Linux bridge (named, so the firewall rules can name it).
pub const ROUTED_BRIDGE: &str = "flt-routed";

/// A cluster-network setting the registry or this host refuses: the operator must
/// change a flag or a config key (the binary exits 2 on it).
#[derive(Debug)]
pub struct RefusedSetting(pub String);

impl std::fmt::Display for RefusedSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedSetting {}

/// Claims this node's /24, makes the network and the firewall rules.
pub(crate) async fn set_up(inner: &Inner, cluster_cidr: Ipv4Net) -> anyhow::Result<NodeNetwork> {
    let subnet = match inner.client.claim_subnet(&inner.node, cluster_cidr).await {
        Ok(s) => s,
        Err(e) if e.status() == Some(409) || e.status() == Some(400) => {
            return Err(RefusedSetting(format!("cluster_cidr {cluster_cidr}: {e}")).into())
        }
        Err(e) => return Err(e).context("claiming this node's routed subnet"),
    };
    ensure_network(inner, subnet).await?;
    ensure_firewall(cluster_cidr, subnet)?;
    tracing::info!(%cluster_cidr, %subnet, "routed cluster network ready");
    Ok(NodeNetwork {
        cluster_cidr,
        subnet,
    })
}

async fn ensure_network(inner: &Inner, subnet: Ipv4Net) -> anyhow::Result<()> {
    if let Ok(existing) = inner
        .docker
        .inspect_network::<String>(ROUTED_NETWORK, None)
        .await
    {
        let have: Vec<String> = existing
            .ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.subnet)
            .collect();
        if have.iter().any(|s| s == &subnet.to_string()) {
            return Ok(());
        }
        return Err(RefusedSetting(format!(
            "cluster_cidr: network {ROUTED_NETWORK} exists with subnet {} but this node holds {subnet}: \
             remove it (docker network rm {ROUTED_NETWORK}) or use the cluster CIDR it was made for",
            have.join(", ")
        ))
        .into());
    }
    inner
        .docker
        .create_network(CreateNetworkOptions {
            name: ROUTED_NETWORK.to_owned(),
            check_duplicate: true,
            driver: "bridge".to_owned(),
            ipam: Ipam {
                config: Some(vec![IpamConfig {
                    subnet: Some(subnet.to_string()),
                    gateway: Some(gateway(&subnet).to_string()),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            options: [
                (
                    "com.docker.network.bridge.enable_ip_masquerade".to_owned(),
                    "false".to_owned(),
                ),
                (
                    "com.docker.network.bridge.name".to_owned(),
                    ROUTED_BRIDGE.to_owned(),
                ),
            ]
            .into(),
            labels: [(crate::labels::ROUTED.to_owned(), subnet.to_string())].into(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating network {ROUTED_NETWORK} ({subnet})"))?;
    Ok(())
}

/// The two rules: anything may reach this node's containers through the bridge (the
/// engine's filter would drop what it did not publish), and containers are
/// masqueraded only when they talk to something outside the cluster network.
pub fn firewall_rules(cluster_cidr: Ipv4Net, subnet: Ipv4Net) -> [(&'static str, Vec<String>); 2] {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    [
        (
            "filter",
            s(&[
                "DOCKER-USER",
                "-d",
                &subnet.to_string(),
                "-o",
                ROUTED_BRIDGE,
                "-j",
                "ACCEPT",
            ]),
        ),
        (
            "nat",
            s(&[
                "POSTROUTING",
                "-s",
                &subnet.to_string(),
                "!",
                "-d",
                &cluster_cidr.to_string(),
                "!",
                "-o",
                ROUTED_BRIDGE,
                "-j",
                "MASQUERADE",
            ]),
        ),
    ]
}

fn ensure_firewall(cluster_cidr: Ipv4Net, subnet: Ipv4Net) -> anyhow::Result<()> {
    for (table, rule) in firewall_rules(cluster_cidr, subnet) {
        let run = |op: &str| {
            std::process::Command::new("iptables")
                .args(["-w", "-t", table, op])
                .args(&rule)
                .output()
        };
        let present = run("-C").context("running iptables (install iptables)")?;
        if present.status.success() {
            continue;
        }
        let added = run("-I")?;
        if !added.status.success() {
            bail!(
                "iptables -t {table} -I {}: {} (the routed network needs the engine's iptables rules: dockerd without --iptables=false)",
                rule.join(" "),
                String::from_utf8_lossy(&added.stderr).trim()
            );
        }
    }
    Ok(())
}

/// The routes this node wants: every other node's /24 via its advertise address.
/// Nodes without a lease right now keep the route they had (their subnet is theirs for
/// good, and the host may be back in a moment).
pub fn wanted_routes(
    own: &str,
    cluster_cidr: Ipv4Net,
    subnets: &[SubnetView],
    previous: &BTreeMap<Ipv4Net, Ipv4Addr>,
) -> BTreeMap<Ipv4Net, Ipv4Addr> {
    let mut wanted = BTreeMap::new();
    for s in subnets {
        if s.node == own || s.cluster_cidr != cluster_cidr {
            continue;
        }
        let via = s
            .address
            .as_deref()
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
            .or_else(|| previous.get(&s.subnet).copied());
        if let Some(via) = via {
            wanted.insert(s.subnet, via);
        }
    }
    wanted
}

/// Keeps the routes to the other nodes' subnets current, every two seconds.
pub(crate) async fn route_loop(inner: Arc<Inner>, routed: NodeNetwork) {
    let (conn, handle, _) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "netlink unavailable: no routes to other nodes' containers");
            return;
        }
    };
    tokio::spawn(conn);
    let mut installed: BTreeMap<Ipv4Net, Ipv4Addr> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let subnets = match inner.client.subnets().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "listing subnets failed");
                continue;
            }
        };
        let wanted = wanted_routes(&inner.node, routed.cluster_cidr, &subnets, &installed);
        for (subnet, via) in &wanted {
            if installed.get(subnet) == Some(via) {
                continue;
            }
            let msg = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(subnet.network(), subnet.prefix_len())
                .gateway(*via)
                .build();
            match handle.route().add(msg).replace().execute().await {
                Ok(()) => {
                    tracing::info!(%subnet, %via, "route to a node's containers");
                    installed.insert(*subnet, *via);
                }
                Err(e) => tracing::warn!(%subnet, %via, error = %e, "adding route failed"),
            }
        }
        let gone: Vec<_> = installed
            .iter()
            .filter(|(s, _)| !wanted.contains_key(s))
            .map(|(s, v)| (*s, *v))
            .collect();
        for (subnet, via) in gone {
            let msg = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(subnet.network(), subnet.prefix_len())
                .gateway(via)
                .build();
            if let Err(e) = handle.route().del(msg).execute().await {
                tracing::debug!(%subnet, error = %e, "removing route failed");
            }
            installed.remove(&subnet);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(node: &str, subnet: &str, address: Option<&str>) -> SubnetView {
        SubnetView {
            node: node.into(),
            subnet: subnet.parse().unwrap(),
            cluster_cidr: "198.18.224.0/20".parse().unwrap(),
            address: address.map(Into::into),
        }
    }

    #[test]
    fn routes_go_to_the_other_nodes_and_survive_a_lapsed_lease() {
        let cidr: Ipv4Net = "198.18.224.0/20".parse().unwrap();
        let subnets = [
            view("a", "198.18.224.0/24", Some("198.18.63.1")),
            view("b", "198.18.225.0/24", Some("198.18.63.2")),
            view("c", "198.18.226.0/24", None),
        ];
        let wanted = wanted_routes("a", cidr, &subnets, &BTreeMap::new());
        assert_eq!(
            wanted.into_iter().collect::<Vec<_>>(),
            [(
                "198.18.225.0/24".parse().unwrap(),
                Ipv4Addr::new(198, 18, 63, 2)
            )]
        );
        // c had a route before its lease lapsed: it keeps it.
        let before = [(
            "198.18.226.0/24".parse().unwrap(),
            Ipv4Addr::new(198, 18, 63, 3),
        )]
        .into();
        let wanted = wanted_routes("a", cidr, &subnets, &before);
        assert_eq!(wanted.len(), 2);
    }

    #[test]
    fn only_traffic_leaving_the_cluster_network_is_masqueraded() {
        let [(filter, accept), (nat, masq)] = firewall_rules(
            "198.18.224.0/20".parse().unwrap(),
            "198.18.225.0/24".parse().unwrap(),
        );
        assert_eq!((filter, nat), ("filter", "nat"));
        assert_eq!(
            accept.join(" "),
            "DOCKER-USER -d 198.18.225.0/24 -o flt-routed -j ACCEPT"
        );
        assert_eq!(
            masq.join(" "),
            "POSTROUTING -s 198.18.225.0/24 ! -d 198.18.224.0/20 ! -o flt-routed -j MASQUERADE"
        );
    }
}
