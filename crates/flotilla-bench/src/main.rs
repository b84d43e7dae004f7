//! flotilla's benchmark and experiment harnesses.
//!
//! Each subcommand drives real processes (the release `flotilla` binary, etcd) and
//! reports figures with the machine they ran on, as Markdown and optionally JSON.

mod containers;
mod discovery;
mod failover;
mod nat;
mod procs;
mod proxy;
mod registry;
mod schedulers;
mod soak;
mod stats;
mod steady;

use clap::{Parser, Subcommand};

/// Benchmarks for flotilla.
#[derive(Debug, Parser)]
#[command(name = "flotilla-bench", about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Registry under load: many instances, many blocking watchers, a steady change rate;
    /// change-to-watcher latency and server memory, on the embedded store and on etcd.
    Registry(registry::Args),
    /// Join / leave / host-loss detection times on the real Docker engine.
    Discovery(discovery::Args),
    /// flotilla lb vs HAProxy vs Nginx: HTTP keep-alive, TCP bulk, idle-connection memory.
    Proxy(proxy::Args),
    /// The dynamic-feedback experiment: schedulers on CPU-quota'd containers.
    Schedulers(schedulers::Args),
    /// lb pair failover vs Keepalived + HAProxy, on network namespaces.
    Failover(failover::Args),
    /// The long-run HA simulation: the whole cluster under load and seeded faults.
    Soak(soak::Args),
    /// Container lifecycle: deploy time, backup/restore vs tar|sha256sum, migration
    /// between two engines (stateful downtime, stateless failed requests).
    Containers(containers::Args),
    /// What a healthy, idle cluster costs the store: writes/s and CPU at N checked
    /// instances over several engines (checks and load reports write only on change).
    Steady(steady::Args),
    /// What the NAT costs: lb throughput to a container on another host by published
    /// port vs routed container address vs a same-host container address.
    Nat(nat::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Registry(args) => rt.block_on(registry::run(args)),
        Cmd::Discovery(args) => rt.block_on(discovery::run(args)),
        Cmd::Proxy(args) => rt.block_on(proxy::run(args)),
        Cmd::Schedulers(args) => rt.block_on(schedulers::run(args)),
        Cmd::Failover(args) => rt.block_on(failover::run(args)),
        Cmd::Soak(args) => rt.block_on(soak::run(args)),
        Cmd::Containers(args) => rt.block_on(containers::run(args)),
        Cmd::Steady(args) => rt.block_on(steady::run(args)),
        Cmd::Nat(args) => rt.block_on(nat::run(args)),
    }
}
