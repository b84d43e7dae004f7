//! Where the CLI finds things (its home directory, the token) and how it reports bad
//! usage: shared by the commands, so `run.rs` only dispatches to them.

use std::path::{Path, PathBuf};

use flotilla_client::Client;

use crate::cli::ClientArgs;
use crate::UsageError;

/// An error that exits 2 (bad usage or config), with its message.
pub(crate) fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    UsageError(e.to_string()).into()
}

/// The token for a client: `FLOTILLA_TOKEN`, else the token file.
pub fn token_from(file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if let Ok(t) = std::env::var("FLOTILLA_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(Some(t.trim().to_owned()));
        }
    }
    match file {
        Some(f) => Ok(Some(flotilla_client::read_token(f).map_err(usage)?)),
        None => Ok(None),
    }
}

/// `~/.flotilla` (or `$FLOTILLA_HOME`): where `up` keeps its data and the CLI looks.
pub fn flotilla_home() -> PathBuf {
    if let Some(h) = std::env::var_os("FLOTILLA_HOME") {
        return PathBuf::from(h);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join(".flotilla")
}

/// The token file a client command uses: `--token-file`, else `flotilla up`'s.
pub fn token_file(args: &crate::cli::ClientArgs) -> Option<PathBuf> {
    let default_token = flotilla_home().join("token");
    args.token_file
        .clone()
        .or_else(|| default_token.exists().then_some(default_token))
}

/// The TLS configuration a client command trusts the cluster with: `--ca FILE`, else
/// the `ca.pem` the server wrote beside the token file; `None` when neither exists
/// (then only `http://` servers can be used).
pub fn tls_for(
    args: &crate::cli::ClientArgs,
    token_file: Option<&Path>,
) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
    let beside = token_file.map(flotilla_core::config::ca_beside);
    let ca = match (&args.ca, beside) {
        (Some(f), _) => f.clone(),
        (None, Some(f)) if f.exists() => f,
        _ => return Ok(None),
    };
    flotilla_client::tls_config(&ca)
        .map(Some)
        .map_err(|e| usage(format!("--ca: {e}")))
}

/// Builds a client from flags, environment and what `flotilla up` wrote.
pub fn client(args: &ClientArgs) -> anyhow::Result<Client> {
    let home = flotilla_home();
    let server = args
        .server
        .clone()
        .or_else(|| {
            std::fs::read_to_string(home.join("server"))
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| flotilla_client::DEFAULT_SERVER.to_owned());
    let file = token_file(args);
    flotilla_client::parse_servers(&server).map_err(|e| usage(format!("--server: {e}")))?;
    let tls = if server.contains("https://") {
        tls_for(args, file.as_deref())?
    } else {
        None
    };
    Ok(Client::with_tls(&server, token_from(file.as_deref())?, tls))
}
