//! The flotilla agent: one per Docker host.
//!
//! It turns the engine's view into the registry's: labelled containers are registered
//! the moment they start and deregistered the moment they die, a node lease proves the
//! host is alive, and a full resync (anti-entropy) on start and periodically guarantees
//! that no registration survives that the engine does not back — whatever crashed, in
//! whatever order. Health checks of this host's instances run here (HTTP and TCP from the
//! host, exec inside the container), and only verdict changes reach the registry.
#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod backoff;
pub mod backup;
pub mod beneath;
pub mod build;
pub mod cgroup;
pub(crate) mod checks;
pub mod copies;
pub mod docker;
mod inventory;
pub mod labels;
pub mod load;
pub mod metrics;
pub mod node_tls;
mod plan;
pub mod reconcile;
pub(crate) mod recover;
pub mod routed;
pub mod schedule;
pub(crate) mod state;

pub use agent::{Agent, AgentHandle};
