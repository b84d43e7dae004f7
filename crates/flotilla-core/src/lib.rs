//! The shared vocabulary of flotilla.
//!
//! Every other crate speaks in these terms: validated names and ids, the instance and
//! health-check specs that agents register, the versioned records the registry persists,
//! and TOML config loading that rejects unknown keys naming file, line and key. Nothing
//! here does I/O beyond reading a config file, so all of it is unit-tested directly.
#![warn(missing_docs)]

pub mod auth;
pub mod config;
pub mod error;
pub mod hash;
pub mod id;
pub mod record;
pub mod recovery;
pub mod registry_auth;
pub mod spec;
pub mod stack;
pub mod subnet;
pub mod token;

pub use error::{ConfigError, FieldError};
pub use id::{validate_instance_id, validate_node_name, validate_service_name};
pub use record::{
    BackupInventory, CertRevocation, HealthRecord, HealthStatus, HeldArchive, InstanceLoad,
    InstanceRecord, InstanceView, LbHa, LbListenerReport, LbReport, LbTransition, LoadRecord,
    NodeRecord, NodeView, ServiceInstances, ServiceSummary, WeightsRecord, RECORD_VERSION,
};
pub use spec::{CheckKind, CheckSpec, InstanceSpec};
