//! The routed cluster network's address plan: each node gets its own /24 of the
//! cluster CIDR, never the same as another node's, and keeps it (a returning host finds
//! its containers' addresses still its own).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

pub use ipnet::Ipv4Net;

use crate::error::FieldError;

/// One node's share as `GET /v1/subnets` serves it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubnetView {
    /// The node.
    pub node: String,
    /// Its /24.
    pub subnet: Ipv4Net,
    /// The cluster CIDR it was cut from.
    pub cluster_cidr: Ipv4Net,
    /// The node's advertise address while it holds a lease.
    pub address: Option<String>,
}

/// A node's place in the routed cluster network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeNetwork {
    /// The whole cluster network.
    pub cluster_cidr: Ipv4Net,
    /// This node's /24 of it.
    pub subnet: Ipv4Net,
}

/// Prefix length of each node's share of the cluster CIDR.
pub const NODE_PREFIX: u8 = 24;

/// Checks a cluster CIDR: IPv4, room for at least two nodes, not so wide it swallows
/// private address space wholesale.
pub fn validate_cluster_cidr(field: &str, cidr: &Ipv4Net) -> Result<(), FieldError> {
    if cidr.prefix_len() < 8 || cidr.prefix_len() > NODE_PREFIX - 1 {
        return Err(FieldError::new(
            field,
            format!(
                "{cidr}: the prefix must be /8../{} (a /{NODE_PREFIX} per node, at least two nodes)",
                NODE_PREFIX - 1
            ),
        ));
    }
    if cidr.network() != cidr.addr() {
        return Err(FieldError::new(
            field,
            format!("{cidr}: host bits set; the network is {}", cidr.trunc()),
        ));
    }
    Ok(())
}

/// The subnet `node` holds in `taken` (node → subnet), or the lowest /24 of `cluster`
/// that no node holds; `None` when every one is taken. The node's own earlier subnet
/// is kept only if it still lies in `cluster`.
pub fn allocate(
    cluster: &Ipv4Net,
    taken: &BTreeMap<String, Ipv4Net>,
    node: &str,
) -> Option<Ipv4Net> {
    if let Some(own) = taken.get(node).filter(|s| cluster.contains(*s)) {
        return Some(*own);
    }
    cluster.subnets(NODE_PREFIX).ok()?.find(|candidate| {
        !taken
            .values()
            .any(|t| t.contains(candidate) || candidate.contains(t))
    })
}

/// The gateway of a node's subnet (its `.1`), which the node's bridge holds.
pub fn gateway(subnet: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn nodes_get_the_lowest_free_24_and_keep_it() {
        let cluster = net("198.18.224.0/20");
        let mut taken = BTreeMap::new();
        let a = allocate(&cluster, &taken, "a").unwrap();
        assert_eq!(a, net("198.18.224.0/24"));
        taken.insert("a".to_owned(), a);
        assert_eq!(allocate(&cluster, &taken, "a"), Some(a));
        let b = allocate(&cluster, &taken, "b").unwrap();
        assert_eq!(b, net("198.18.225.0/24"));
        assert_eq!(gateway(&b), Ipv4Addr::new(198, 18, 225, 1));
    }

    #[test]
    fn a_full_cluster_allocates_nothing() {
        let cluster = net("198.18.224.0/23");
        let taken: BTreeMap<_, _> = [
            ("a".to_owned(), net("198.18.224.0/24")),
            ("b".to_owned(), net("198.18.225.0/24")),
        ]
        .into();
        assert_eq!(allocate(&cluster, &taken, "c"), None);
    }

    #[test]
    fn bad_cluster_cidrs_are_named() {
        for bad in ["198.18.0.0/24", "10.0.0.0/7", "198.18.1.0/16"] {
            let e = validate_cluster_cidr("cluster_cidr", &net(bad)).unwrap_err();
            assert_eq!(e.field, "cluster_cidr");
            assert!(e.message.contains(bad), "{}", e.message);
        }
        validate_cluster_cidr("cluster_cidr", &net("198.18.224.0/20")).unwrap();
    }

    proptest! {
        /// However nodes arrive, no two hold overlapping subnets, and each lies in the
        /// cluster.
        #[test]
        fn never_two_nodes_the_same_subnet(order in proptest::collection::vec(0u8..40, 1..80)) {
            let cluster = net("198.18.224.0/19");
            let mut taken = BTreeMap::new();
            for n in order {
                let node = format!("n{n}");
                if let Some(s) = allocate(&cluster, &taken, &node) {
                    prop_assert!(cluster.contains(&s));
                    for (other, t) in &taken {
                        if other != &node {
                            prop_assert!(!t.contains(&s) && !s.contains(t), "{node} {s} vs {other} {t}");
                        }
                    }
                    taken.insert(node, s);
                } else {
                    prop_assert_eq!(taken.len(), 32);
                }
            }
        }
    }
}
