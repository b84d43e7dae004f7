//! The key layout of the catalog in the store. One place, so the layout can be
//! versioned and migrated as a whole.

/// `instances/{id}` → [`flotilla_core::InstanceRecord`]
pub const INSTANCES: &str = "instances/";
/// `health/{id}` → [`flotilla_core::HealthRecord`]
pub const HEALTH: &str = "health/";
/// `nodes/{name}` → [`flotilla_core::NodeRecord`]
pub const NODES: &str = "nodes/";
/// `checkins/{id}` → a `CheckinRecord` (catalog.rs) (TTL renewals, exec results)
pub const CHECKINS: &str = "checkins/";
/// `weights/{service}` → [`flotilla_core::WeightsRecord`] (published by the active lb)
pub const WEIGHTS: &str = "weights/";
/// `loads/{id}` → [`flotilla_core::LoadRecord`] (agent load reports; soft state)
pub const LOADS: &str = "loads/";
/// `stacks/{name}` → [`flotilla_core::stack::StackRecord`] (desired state)
pub const STACKS: &str = "stacks/";
/// `tokens/{id}` → [`flotilla_core::token::TokenRecord`] (scoped tokens, hashed)
pub const TOKENS: &str = "tokens/";
/// `secrets/{stack}/{service}` → [`flotilla_core::stack::SecretsRecord`]
pub const SECRETS: &str = "secrets/";
/// `subnets/{node}` → a `SubnetRecord` (subnets.rs): the node's /24 of the routed
/// cluster network, kept when the node leaves so a returning host finds it again.
pub const SUBNETS: &str = "subnets/";
/// `assignments/{stack}/{service}/{replica}` →
/// [`flotilla_core::recovery::AssignmentRecord`]: where a stateful replica lives
/// (written by the duty only).
pub const ASSIGNMENTS: &str = "assignments/";
/// `recoveries/{stack}/{service}/{replica}` →
/// [`flotilla_core::recovery::RecoverRequest`]: an operator's `flotilla recover`,
/// consumed by the duty.
pub const RECOVERIES: &str = "recoveries/";
/// `lbs/{name}` → [`flotilla_core::LbReport`] (each lb's own report; soft state)
pub const LBS: &str = "lbs/";
/// `backups/{node}` → [`flotilla_core::BackupInventory`] (the archives a node keeps)
pub const BACKUPS: &str = "backups/";
/// `revoked/{node}` → [`flotilla_core::CertRevocation`] (node certificates refused)
pub const REVOKED: &str = "revoked/";
/// Election that serialises subnet allocations between servers.
pub const SUBNET_ELECTION: &str = "election/subnets";
/// Election name for the checking duty.
pub const DUTY_ELECTION: &str = "election/duty";

/// Key of an instance.
pub fn instance(id: &str) -> String {
    format!("{INSTANCES}{id}")
}
/// Key of an instance's health verdict.
pub fn health(id: &str) -> String {
    format!("{HEALTH}{id}")
}
/// Key of a node.
pub fn node(name: &str) -> String {
    format!("{NODES}{name}")
}
/// Key of an instance's latest check-in.
pub fn checkin(id: &str) -> String {
    format!("{CHECKINS}{id}")
}
/// Key of a service's published feedback weights.
pub fn weights(service: &str) -> String {
    format!("{WEIGHTS}{service}")
}
/// Key of a stack's desired state.
pub fn stack(name: &str) -> String {
    format!("{STACKS}{name}")
}
/// Key of a stateful replica's assignment (`replica` is `STACK/SERVICE/REPLICA`).
pub fn assignment(replica: &str) -> String {
    format!("{ASSIGNMENTS}{replica}")
}
/// Key of an operator's recover request for a replica (`STACK/SERVICE/REPLICA`).
pub fn recovery(replica: &str) -> String {
    format!("{RECOVERIES}{replica}")
}
/// Key of a node's backup inventory.
pub fn backups(node: &str) -> String {
    format!("{BACKUPS}{node}")
}
/// Key of a node's certificate revocation.
pub fn revoked(node: &str) -> String {
    format!("{REVOKED}{node}")
}
/// Key of an lb's report.
pub fn lb(name: &str) -> String {
    format!("{LBS}{name}")
}
/// Key of an instance's latest load report.
pub fn load(id: &str) -> String {
    format!("{LOADS}{id}")
}

/// `tls/ca` → the cluster CA (certificate and key, JSON) when the store is shared by
/// several servers (etcd); the embedded store's server keeps it in its data directory.
pub const CA: &str = "tls/ca";
/// Election that serialises making the cluster CA, so two servers starting together on
/// an empty etcd make one CA, not two.
pub const CA_ELECTION: &str = "election/ca";

/// Key of a scoped token.
pub fn token(id: &str) -> String {
    format!("{TOKENS}{id}")
}

/// Key of a stack service's secret values.
pub fn secrets(stack: &str, service: &str) -> String {
    format!("{SECRETS}{stack}/{service}")
}
