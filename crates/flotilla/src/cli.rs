//! Command-line surface. Every flag is documented here; `--help` prints it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// flotilla — a lightweight-virtualization high-availability cluster.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level when RUST_LOG is not set (error, warn, info, debug, trace).
    #[arg(long, global = true, env = "FLOTILLA_LOG")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the registry server: catalog, health checks, leases, HTTP API, DNS, metrics.
    Server(ServerArgs),
    /// Run the per-host agent: registers labelled containers, holds the node lease.
    Agent(AgentArgs),
    /// Run server and agent on this machine with the embedded store (single-host
    /// deployment and demo), and write the server URL and token where the CLI finds them.
    Up(UpArgs),
    /// Run the load balancer (HTTP and TCP proxy) from a TOML config.
    Lb(LbArgs),
    /// List instances with their health, address and weight.
    Ps(PsArgs),
    /// List services with instance and passing counts.
    Services(ClientArgs),
    /// List nodes and their leases.
    Nodes(ClientArgs),
    /// Remove an instance (by registry id or container name).
    Deregister(DeregisterArgs),
    /// Follow a service: print its passing instances every time they change.
    Watch(WatchArgs),
    /// Build a stack's images from its spec (no Dockerfile, no registry) and load them.
    Build(BuildArgs),
    /// Build, distribute and deploy a stack (or a Compose file); wait until every
    /// replica passes.
    Deploy(DeployArgs),
    /// Convert a Compose file into a stack spec (TOML on stdout; what it cannot carry
    /// listed on stderr and at the spec's top).
    Convert(ConvertArgs),
    /// Change the replica count of services: `flotilla scale web=5`.
    Scale(ScaleArgs),
    /// Remove a deployed stack (its containers stop; volumes are kept).
    Rm(RmArgs),
    /// Print a container's output (every instance of a service, prefixed), through the
    /// agent that runs it; -f follows across restarts.
    Logs(LogsArgs),
    /// Run a command in an instance's container, through its agent (admin token).
    Exec(ExecArgs),
    /// Restore a stateful replica now from its newest verified backup (or --from), on
    /// --to or where placement puts it; its old copy, if any, is kept as an orphan.
    Recover(RecoverArgs),
    /// List the backups of stateful services on every node (scheduled ones and copies).
    Backups(BackupsArgs),
    /// Back up an instance (or every instance of a service) to a verified archive.
    Backup(BackupArgs),
    /// Restore a backup archive to a new container on a node.
    Restore(RestoreArgs),
    /// Move an instance to another node (blue/green if stateless, cold if stateful).
    Migrate(MigrateArgs),
    /// Print a shell completion script: `flotilla completions bash >
    /// /etc/bash_completion.d/flotilla` (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Write the man pages (flotilla.1 and one per command, flotilla-deploy.1 …) into a
    /// directory, or flotilla.1 to stdout.
    Man(ManArgs),
    /// Scoped API tokens: create (shown once), list, revoke (docs/security.md).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Node certificates: revoke a node's, list the revocations.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Internal: the lb's crash guard (started by `flotilla lb` when `[ha]` is set).
    #[command(hide = true)]
    HaGuard,
}

/// Flags of `flotilla completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Flags of `flotilla man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory for the pages (made if missing); without it flotilla.1 goes to stdout.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Flags of `flotilla server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// TOML config file (see docs/config.md); flags below override it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// HTTP API address [default: 127.0.0.1:7700].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Data directory (embedded store, default token file) [default: /var/lib/flotilla].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Bearer token file; created with a random token (mode 0600) if missing
    /// [default: DATA_DIR/token].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Store: "embedded", "etcd://host:port,host:port,..." or "etcds://…" (TLS)
    /// [default: embedded].
    #[arg(long)]
    pub store: Option<flotilla_core::config::StoreUrl>,
    /// DNS listener for NAME.service.flotilla; "" disables [default: 127.0.0.1:8600].
    #[arg(long)]
    pub dns_listen: Option<OffOrAddr>,
    /// Serve reads (GET) without a token.
    #[arg(long)]
    pub open_reads: bool,
    /// Serve plain HTTP instead of TLS (only where no one else can reach the listener).
    #[arg(long)]
    pub insecure_http: bool,
    /// Extra name (host name or IP) in the server certificate; repeat for several.
    #[arg(long = "tls-name")]
    pub tls_names: Vec<String>,
    /// Lifetime of node certificates issued to agents [default: 24h].
    #[arg(long)]
    pub node_cert_lifetime: Option<humantime::Duration>,
    /// With `--store etcds://…`: the CA of etcd's certificates (PEM).
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// With `etcds://`: the client certificate etcd asks for (PEM).
    #[arg(long)]
    pub etcd_cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long)]
    pub etcd_key: Option<PathBuf>,
}

/// Flags of `flotilla agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML config file (see docs/config.md); flags below override it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Registry URL, or several separated by commas (moves to the next when one fails)
    /// [default: http://127.0.0.1:7700].
    #[arg(long, visible_alias = "join", env = "FLOTILLA_SERVER")]
    pub server: Option<String>,
    /// File holding the registry's bearer token.
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The token itself (to join; prefer --token-file or FLOTILLA_TOKEN, which do not
    /// show in the process list).
    #[arg(long)]
    pub token: Option<String>,
    /// The cluster CA's certificate, for `https://` servers.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// `sha256:HEX` of the cluster CA, as `flotilla server` printed it: the CA is
    /// fetched on the first join and checked against it.
    #[arg(long)]
    pub ca_hash: Option<String>,
    /// Where the agent keeps its node key and certificate [default: /var/lib/flotilla/agent].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The address other hosts reach this host at: published ports are registered on
    /// it [default: the source address of the route to the first server].
    #[arg(long)]
    pub advertise: Option<std::net::IpAddr>,
    /// The routed cluster network (e.g. 10.244.0.0/16): this node gets a /24 of it,
    /// routes the others', and container addresses cross hosts without NAT.
    #[arg(long, value_name = "CIDR")]
    pub cluster_cidr: Option<flotilla_core::subnet::Ipv4Net>,
    /// The directory services' backup `dir`s are taken relative to [default: /].
    #[arg(long, value_name = "DIR")]
    pub backup_root: Option<PathBuf>,
    /// Credentials for pulling registry images: `docker login`'s config.json format,
    /// mode 0600 (e.g. ~/.docker/config.json).
    #[arg(long, value_name = "FILE")]
    pub registry_auth: Option<PathBuf>,
    /// This host's node name [default: the hostname].
    #[arg(long)]
    pub node: Option<String>,
    /// Docker Engine endpoint [default: unix:///var/run/docker.sock].
    #[arg(long)]
    pub docker: Option<String>,
    /// Node lease TTL, e.g. "3s" [default: 3s].
    #[arg(long)]
    pub lease_ttl: Option<humantime::Duration>,
    /// Network whose address to register for containers on several networks.
    #[arg(long)]
    pub default_network: Option<String>,
    /// Address for the agent's /metrics; "" disables [default: disabled].
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Address of the agent's API (images, backup, restore); "" disables it, and with
    /// it deploys and migrations to this node [default: 127.0.0.1:7701].
    #[arg(long)]
    pub api_listen: Option<String>,
    /// URL other hosts reach the agent's API at [default: http://API_LISTEN].
    #[arg(long)]
    pub api_url: Option<String>,
}

/// Flags of `flotilla up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory [default: $FLOTILLA_HOME or ~/.flotilla].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// HTTP API address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// DNS address; "" disables.
    #[arg(long, default_value = "127.0.0.1:8600")]
    pub dns_listen: OffOrAddr,
    /// Docker Engine endpoint.
    #[arg(long, default_value = "unix:///var/run/docker.sock")]
    pub docker: String,
    /// Run the server only (no Docker needed).
    #[arg(long)]
    pub no_agent: bool,
    /// Where the lb serves service `--lb-service` (HTTP); "" disables the lb.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub lb_listen: String,
    /// Service the lb fronts.
    #[arg(long, default_value = "web")]
    pub lb_service: String,
    /// lb admin listener (/metrics, /status).
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub lb_admin: OffOrAddr,
    /// Do not deploy the demo stack (examples/demo: `web` behind the lb, and `notes`).
    #[arg(long)]
    pub no_demo: bool,
    /// The agent's API (images, backups, migrations) [default: 127.0.0.1:7701].
    #[arg(long, default_value = "127.0.0.1:7701")]
    pub api_listen: String,
    /// Network whose address to register for containers on several networks.
    #[arg(long)]
    pub default_network: Option<String>,
}

/// How the CLI finds the server.
#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// Server URL, or several separated by commas (the next is tried when one fails)
    /// [env: FLOTILLA_SERVER; default: the one `flotilla up` wrote, else
    /// http://127.0.0.1:7700].
    #[arg(long, env = "FLOTILLA_SERVER")]
    pub server: Option<String>,
    /// Token file [env: FLOTILLA_TOKEN_FILE; default: ~/.flotilla/token]. The token
    /// itself may be given in FLOTILLA_TOKEN instead.
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The cluster CA's certificate, for `https://` servers [env: FLOTILLA_CA; default:
    /// ca.pem beside the token file, where `flotilla server` writes it].
    #[arg(long, env = "FLOTILLA_CA")]
    pub ca: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `flotilla ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Only this service.
    #[arg(long, short)]
    pub service: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla deregister`.
#[derive(Debug, Args)]
pub struct DeregisterArgs {
    /// Registry id or container name.
    pub instance: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Service to follow.
    pub service: String,
    /// Stop after this many changes (0 = forever).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla lb`.
#[derive(Debug, Args)]
pub struct LbArgs {
    /// TOML config (see docs/lb.md).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Check the config and exit (0 if valid, 2 if not).
    #[arg(long)]
    pub check: bool,
}

/// Flags of `flotilla convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The Compose file (docker-compose.yml, compose.yaml).
    pub file: PathBuf,
    /// Stack name when the file has no `name:` [default: its directory's name].
    #[arg(long)]
    pub name: Option<String>,
    /// Docker Engine asked for the port an image EXPOSEs (a service with neither
    /// ports nor expose).
    #[arg(long, default_value = "unix:///var/run/docker.sock")]
    pub docker: String,
    /// Print {name, toml, not_carried} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `flotilla build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Stack spec (TOML, see docs/spec.md).
    pub spec: PathBuf,
    /// Write the image archives (`docker load` format) here instead of loading them.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Docker Engine to load into (and to read `image:` bases from).
    #[arg(long, default_value = "unix:///var/run/docker.sock")]
    pub docker: String,
    /// Print the images built as JSON (for scripts).
    #[arg(long)]
    pub json: bool,
}

/// Flags of `flotilla deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Stack spec (TOML, see docs/spec.md), or a Compose file (.yml/.yaml), converted
    /// as `flotilla convert` does.
    pub spec: PathBuf,
    /// Return once the desired state is stored, without waiting for the replicas.
    #[arg(long)]
    pub detach: bool,
    /// Longest wait for every replica to pass.
    #[arg(long, default_value = "120s")]
    pub timeout: humantime::Duration,
    /// Docker Engine to read `image:` bases from.
    #[arg(long, default_value = "unix:///var/run/docker.sock")]
    pub docker: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla scale`.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// SERVICE=REPLICAS, one or more.
    #[arg(required = true)]
    pub assignments: Vec<String>,
    /// The stack, if several have a service of that name.
    #[arg(long)]
    pub stack: Option<String>,
    /// Do not wait for the new count to pass.
    #[arg(long)]
    pub detach: bool,
    /// Longest wait.
    #[arg(long, default_value = "120s")]
    pub timeout: humantime::Duration,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Stack name.
    #[arg(required_unless_present = "orphans", conflicts_with = "orphans")]
    pub stack: Option<String>,
    /// Instead of a stack: remove every node's orphans (stale copies of stateful
    /// replicas recovered elsewhere), with their volumes.
    #[arg(long)]
    pub orphans: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Instance id, container name, or service name (all its instances).
    pub what: String,
    /// Keep following (across restarts and replacements of the replica).
    #[arg(long, short)]
    pub follow: bool,
    /// Only output since this long ago, e.g. "10m".
    #[arg(long)]
    pub since: Option<humantime::Duration>,
    /// Only the last N lines (of each instance).
    #[arg(long)]
    pub tail: Option<u64>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Instance id or container name (a service with one instance will do).
    pub instance: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// `STACK/SERVICE/REPLICA`, a service name (every replica), or an instance id or
    /// container name.
    pub what: String,
    /// Node to restore on [default: where placement puts it among the live nodes].
    #[arg(long)]
    pub to: Option<String>,
    /// Archive file name to restore [default: the newest that verifies].
    #[arg(long = "from", value_name = "ARCHIVE")]
    pub archive: Option<String>,
    /// How long to wait for the restored replicas to pass.
    #[arg(long, default_value = "120s")]
    pub timeout: humantime::Duration,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla backups`.
#[derive(Debug, Args)]
pub struct BackupsArgs {
    /// Only this service (`SERVICE` or `STACK/SERVICE`).
    pub service: Option<String>,
    /// Read every archive whole and say whether it verifies.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Instance id, container name, or service name (all its instances).
    pub instance: String,
    /// Directory for the archives.
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// pause (default: out of rotation while volumes are read), stop, or live.
    #[arg(long, default_value = "pause", value_parser = parse_consistency)]
    pub consistency: flotilla_core::stack::Consistency,
    /// Leave the image out (restore only where the image exists).
    #[arg(long)]
    pub no_image: bool,
    /// Recompute every digest of the received archive too (the agent computed them
    /// from the data it read; by default the CLI checks structure, sizes and volume
    /// contents as it writes, and a restore checks every digest again).
    #[arg(long)]
    pub verify: bool,
    /// Keep the replica's secret environment values in the archive (left out by
    /// default; the archive is 0600 either way).
    #[arg(long)]
    pub with_secrets: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Archive written by `flotilla backup`.
    pub archive: PathBuf,
    /// Node to restore on (required when several are up).
    #[arg(long)]
    pub node: Option<String>,
    /// Container name (default: the original's).
    #[arg(long)]
    pub name: Option<String>,
    /// Create but do not start (no health gate).
    #[arg(long)]
    pub no_start: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Instance id or container name.
    pub instance: String,
    /// Target node.
    #[arg(long)]
    pub to: String,
    /// Drain time before a stateless source is stopped.
    #[arg(long, default_value = "2s")]
    pub drain: humantime::Duration,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `flotilla token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it (this once; the server keeps only its hash).
    Create(TokenCreateArgs),
    /// List tokens: id, role, scope, age (never the tokens themselves).
    List(ClientArgs),
    /// Revoke a token by id: it stops working at once.
    Revoke(TokenRevokeArgs),
}

/// `flotilla cert …`.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Revoke every certificate of a node issued until now: every server refuses them at
    /// once; the node is back only when it joins again with a token (revoke its join
    /// token too if that may be stolen).
    Revoke(CertRevokeArgs),
    /// List the revocations in force.
    List(ClientArgs),
}

/// Flags of `flotilla cert revoke`.
#[derive(Debug, Args)]
pub struct CertRevokeArgs {
    /// The node.
    pub node: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla token create`.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// admin (everything), agent (join a node), lb (read services, publish weights),
    /// read (catalog, metrics, events).
    #[arg(long)]
    pub role: flotilla_core::token::Role,
    /// For an lb token: the one service it may publish weights for.
    #[arg(long)]
    pub service: Option<String>,
    /// For an agent token: the one node it may join as.
    #[arg(long)]
    pub node: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `flotilla token revoke`.
#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    /// The token's id (`flotilla token list`).
    pub id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `--consistency`: pause, stop or live.
fn parse_consistency(s: &str) -> Result<flotilla_core::stack::Consistency, String> {
    use flotilla_core::stack::Consistency;
    match s {
        "pause" => Ok(Consistency::Pause),
        "stop" => Ok(Consistency::Stop),
        "live" => Ok(Consistency::Live),
        other => Err(format!("{other:?}: expected pause, stop or live")),
    }
}

/// A listener address flag that `""` turns off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffOrAddr(pub Option<SocketAddr>);

impl std::str::FromStr for OffOrAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        flotilla_core::config::off_or_addr::parse(s).map(OffOrAddr)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks a command's definition (unique names, valid defaults) only when that
    /// command is parsed; this checks every command at once.
    #[test]
    fn every_command_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
