//! The flotilla data plane.
//!
//! `flotilla lb` proxies HTTP (L7) and TCP (L4) to the healthy instances of a service:
//! schedulers behind one trait, backend sets swapped atomically as the registry changes
//! (removed backends drain, new ones ramp up), passive outlier ejection, retries on
//! another backend, and metrics on an admin listener.
#![warn(missing_docs)]

pub mod admin;
pub mod backend;
pub mod batch;
pub mod config;
pub mod discovery;
pub mod drain;
pub mod feedback;
pub mod http;
pub mod listener;
pub mod pool;
pub mod report;
pub mod run;
pub mod scheduler;
pub mod splice;
pub mod stats;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod workers;

pub use run::{start, RunningLb};
