//! TLS for flotilla's control plane.
//!
//! Every socket of the registry and agent APIs that is not loopback speaks TLS, and
//! every component trusts one thing: the cluster CA that `flotilla server` makes on its
//! first start. Agents join by pinning that CA's hash, sending a CSR with the join
//! token, and talking mutual TLS with the node certificate they get back; the server
//! then knows which node a request comes from without trusting anything the request
//! says. This crate holds the pieces both ends share: the CA ([`ca`]), the rustls
//! configurations ([`config`]) and the HTTPS accept loop with its limits ([`serve`]).
#![warn(missing_docs)]

pub mod ca;
pub mod config;
pub mod serve;

pub use ca::{ca_hash, check_ca_hash, identity_of, node_csr, ClusterCa, Issued, PeerIdentity};
pub use config::{client_config, server_config, unverified_fetch_config, verify_chain, CertSlot};
pub use serve::{serve, Peer, ServeOptions};
