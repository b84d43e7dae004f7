//! How the CLI reaches a node's agent API directly (image pushes, backups, restores,
//! orphans): the node's advertised API URL, the CLI's token, the cluster CA.

use std::time::Duration;

use anyhow::{bail, Context};
use flotilla_core::NodeView;

/// A client for a node's agent API.
pub(crate) struct AgentApi {
    url: String,
    token: String,
    http: reqwest::Client,
}

/// What the CLI shows agents: the token, and the cluster CA to check them by.
pub(crate) struct AgentCreds {
    pub(crate) token: String,
    pub(crate) tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl AgentApi {
    pub(crate) fn of(node: &NodeView, creds: &AgentCreds) -> anyhow::Result<Self> {
        let url = node
            .api
            .clone()
            .with_context(|| format!("node {} serves no agent API", node.name))?;
        Ok(AgentApi {
            url,
            token: creds.token.clone(),
            http: flotilla_client::http_builder(creds.tls.clone())
                .connect_timeout(Duration::from_secs(3))
                .build()?,
        })
    }

    pub(crate) fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    pub(crate) async fn json(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<serde_json::Value> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("agent at {}", self.url))?;
        let status = resp.status();
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "agent at {}: {}",
                self.url,
                v.get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or(status.as_str())
            );
        }
        Ok(v)
    }

    /// Whether the agent's engine has image `tag`.
    pub(crate) async fn has_image(&self, tag: &str) -> anyhow::Result<bool> {
        let v = self
            .json(
                self.req(reqwest::Method::GET, "/v1/images")
                    .query(&[("tag", tag)]),
            )
            .await?;
        Ok(v["present"].as_bool() == Some(true))
    }
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
