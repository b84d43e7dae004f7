//! The flotilla registry: the cluster's source of truth about what runs where and
//! whether it is healthy.
//!
//! Agents register instances and hold node leases; the elected server probes health
//! with hysteresis and expires silent nodes; every server keeps an in-memory catalog fed
//! by the store's change stream and serves it over HTTP (with Consul-style blocking
//! queries and SSE), DNS (A and SRV) and Prometheus metrics.
#![warn(missing_docs)]

pub mod api;
pub mod catalog;
pub mod certs;
pub mod dns;
pub mod duty;
pub mod keys;
pub mod lbs;
pub mod lease;
pub mod metrics;
pub mod secrets;
pub mod server;
pub mod stacks;
pub mod state;
pub mod subnets;
pub mod tls;
pub mod tokens;
pub mod ui;

pub use server::{load_or_create_token, open_store, start, RunningServer};
pub use state::{ServiceEvent, Shared};
