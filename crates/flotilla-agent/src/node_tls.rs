//! The agent's identity in a cluster that speaks TLS: its node certificate
//! ([`flotilla_client::identity`]: the CA, a join with the token, reuse across restarts,
//! renewal at half the lifetime) and the server side of its own API, which serves the
//! node certificate and verifies its peers' ones.
//!
//! With the certificate the agent speaks for its own node and nothing else: the
//! server scopes every request it makes to that node, so the agent sends no token.

use std::sync::Arc;

use flotilla_client::identity::{CaSource, ClusterIdentity, Holder};
use flotilla_core::config::AgentConfig;

/// The agent's TLS material, shared by its registry client, its peer client and its API.
pub struct NodeTls {
    /// The CA and the node certificate (client side: trusts the CA, presents it).
    pub identity: Arc<ClusterIdentity>,
    /// Server side (the agent API): serves the node certificate, verifies peers' ones.
    pub server: Arc<rustls::ServerConfig>,
}

impl NodeTls {
    /// TLS for an agent of `https://` servers (`None` for `http://` ones): the CA and a
    /// good node certificate, joining with `token` if there is none.
    pub async fn obtain(
        config: &AgentConfig,
        node: &str,
        token: Option<&str>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        let ca = CaSource {
            file: config.ca_file.clone(),
            hash: config.ca_hash.clone(),
        };
        let Some(identity) = ClusterIdentity::obtain(
            &config.data_dir,
            &config.server,
            Holder::Node(node.to_owned()),
            &ca,
            token,
        )
        .await?
        else {
            return Ok(None);
        };
        let server = flotilla_tls::server_config(&identity.ca_pem, identity.slot.clone())?;
        Ok(Some(Arc::new(NodeTls { identity, server })))
    }

    /// Client side: trusts the CA, presents the node certificate.
    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        self.identity.client.clone()
    }
}
