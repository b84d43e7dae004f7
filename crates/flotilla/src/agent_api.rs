//! How the CLI reaches a node's agent API directly (image pushes, backups, restores,
//! orphans, logs): the node's advertised API URL, the CLI's token, the cluster CA. The
//! calls themselves are [`flotilla_client::agent::AgentClient`]'s.

use std::time::Duration;

use anyhow::Context;
use flotilla_client::agent::AgentClient;
use flotilla_client::migrate::AgentConnector;
use flotilla_core::NodeView;

/// What the CLI shows agents: the token, and the cluster CA to check them by.
pub(crate) struct AgentCreds {
    pub(crate) token: String,
    pub(crate) tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl AgentCreds {
    /// The connector migrations reach agents with.
    pub(crate) fn connector(&self) -> anyhow::Result<AgentConnector> {
        Ok(AgentConnector {
            http: flotilla_client::http_builder(self.tls.clone())
                .connect_timeout(Duration::from_secs(3))
                .build()?,
            token: Some(self.token.clone()),
        })
    }
}

/// A client of `node`'s agent API (through the same connector a migration uses).
pub(crate) fn agent_of(node: &NodeView, creds: &AgentCreds) -> anyhow::Result<AgentClient> {
    Ok(creds.connector()?.to(node)?)
}

pub(crate) fn token_of(args: &crate::cli::ClientArgs) -> anyhow::Result<AgentCreds> {
    let file = crate::home::token_file(args);
    let token = crate::home::token_from(file.as_deref())?
        .context("no token: --token-file FILE, FLOTILLA_TOKEN_FILE or FLOTILLA_TOKEN")?;
    Ok(AgentCreds {
        token,
        tls: crate::home::tls_for(args, file.as_deref())?,
    })
}
