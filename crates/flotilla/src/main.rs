//! `flotilla`: one binary for the whole cluster — the registry server, the per-host
//! agent, the one-command `up`, and the operator CLI (a thin client of the server's API).

mod agent_api;
mod cli;
mod compose;
mod containers;
mod daily;
mod home;
mod keynodes;
mod manuals;
mod ops;
mod run;

use std::process::ExitCode;

use clap::Parser;

/// Exit code for bad usage or bad config (before any port is bound).
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a runtime failure.
pub const EXIT_FAILURE: u8 = 1;

/// An error that should exit with code 2: the input was wrong, nothing was started.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    // One process-wide rustls provider (ring), chosen here rather than left to the
    // crate features that happen to be enabled: with two providers compiled in (a test
    // build unifies the dev-dependencies' features), rustls cannot pick one itself and
    // every TLS client built from defaults (etcd's) would panic.
    flotilla_client::install_crypto_provider();
    let cli = cli::Cli::parse();
    init_tracing(cli.log_level.as_deref());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let cli::Command::Lb(args) = &cli.command {
        // The lb's config decides the runtime's size, so it is read (and checked) first.
        match flotilla_lb::config::LbConfig::load(&args.config) {
            // Thread per core: this thread's single-threaded runtime is the first
            // worker and the lb starts the others (`flotilla_lb::workers`).
            Ok(_) => builder = tokio::runtime::Builder::new_current_thread(),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(run::dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(u) = e.downcast_ref::<UsageError>() {
                eprintln!("error: {u}");
                ExitCode::from(EXIT_USAGE)
            } else {
                eprintln!("error: {e:#}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    }
}

fn init_tracing(level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.unwrap_or("info")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: a journal or a log file gets plain
        // `key=value` fields that grep and log shippers read.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
