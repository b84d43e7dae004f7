//! The agent's identity in a cluster that speaks TLS: the cluster CA (copied by the
//! operator, kept from an earlier join, or fetched and checked against the pinned
//! hash), and a node certificate — obtained with the token on the first join, reused
//! across restarts while it is good, renewed over mutual TLS at half its lifetime.
//!
//! With the certificate the agent speaks for its own node and nothing else: the
//! server scopes every request it makes to that node, so the agent sends no token.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use flotilla_client::Client;
use flotilla_core::config::{parse_server_list, AgentConfig};
use flotilla_tls::{CertSlot, PeerIdentity};

const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "node.pem";
const KEY_FILE: &str = "node.key";

/// The agent's TLS material, shared by its registry client, its peer client and its API.
pub struct NodeTls {
    /// The cluster CA, PEM.
    pub ca_pem: String,
    /// The node certificate in use.
    pub slot: Arc<CertSlot>,
    /// Client side: trusts the CA, presents the node certificate.
    pub client: Arc<rustls::ClientConfig>,
    /// Server side (the agent API): serves the node certificate, verifies peers' ones.
    pub server: Arc<rustls::ServerConfig>,
    dir: PathBuf,
    node: String,
    /// Validity of the certificate in the slot.
    valid: std::sync::Mutex<(SystemTime, SystemTime)>,
}

impl NodeTls {
    /// TLS for an agent of `https://` servers (`None` for `http://` ones): the CA and a
    /// good node certificate, joining with `token` if there is none.
    pub async fn obtain(
        config: &AgentConfig,
        node: &str,
        token: Option<&str>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        let servers = parse_server_list(&config.server).map_err(anyhow::Error::msg)?;
        if !servers.iter().all(|s| s.starts_with("https://")) {
            return Ok(None);
        }
        let dir = config.data_dir.clone();
        create_private_dir(&dir)?;
        let ca_pem = cluster_ca(config, &dir, &servers).await?;
        let slot = CertSlot::new();
        let tls = Arc::new(NodeTls {
            client: flotilla_tls::client_config(&ca_pem, Some(slot.clone()))?,
            server: flotilla_tls::server_config(&ca_pem, slot.clone())?,
            ca_pem,
            slot,
            dir,
            node: node.to_owned(),
            valid: std::sync::Mutex::new((SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH)),
        });
        if tls.reuse_stored(SystemTime::now()) {
            tracing::info!(node, "using the stored node certificate");
            return Ok(Some(tls));
        }
        let token = token.context(
            "no usable node certificate and no token to join with (--token or --token-file)",
        )?;
        tls.join(&config.server, token).await?;
        Ok(Some(tls))
    }

    /// Loads the stored certificate if it is for this node, chains to the CA, and has
    /// more than half its lifetime left.
    fn reuse_stored(&self, now: SystemTime) -> bool {
        let (Ok(cert), Ok(key)) = (
            std::fs::read_to_string(self.dir.join(CERT_FILE)),
            std::fs::read_to_string(self.dir.join(KEY_FILE)),
        ) else {
            return false;
        };
        match self.check(&cert, now) {
            Ok((from, until)) if now < half_life(from, until) => {
                self.install(&cert, &key, (from, until)).is_ok()
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "the stored node certificate is not usable; joining again");
                false
            }
        }
    }

    /// Checks a certificate the server sent: chains to the CA, names this node.
    fn check(&self, cert: &str, now: SystemTime) -> anyhow::Result<(SystemTime, SystemTime)> {
        flotilla_tls::verify_chain(&self.ca_pem, cert, now)?;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert.as_bytes())
            .map(|d: rustls_pki_types::CertificateDer<'static>| d.as_ref().to_vec())
            .context("bad PEM certificate")?;
        anyhow::ensure!(
            flotilla_tls::identity_of(&der) == Some(PeerIdentity::Node(self.node.clone())),
            "the certificate does not name node {:?}",
            self.node
        );
        flotilla_tls::ca::validity(cert)
    }

    fn install(
        &self,
        cert: &str,
        key: &str,
        valid: (SystemTime, SystemTime),
    ) -> anyhow::Result<()> {
        self.slot.set(cert, key)?;
        *self.valid.lock().unwrap_or_else(|p| p.into_inner()) = valid;
        Ok(())
    }

    /// Stores a new key and certificate (key first, 0600) and puts them in use.
    fn store(&self, cert: &str, key: &str) -> anyhow::Result<()> {
        let valid = self.check(cert, SystemTime::now())?;
        flotilla_tls::ca::write_secret(&self.dir.join(KEY_FILE), key)?;
        flotilla_tls::ca::write_public(&self.dir.join(CERT_FILE), cert)?;
        self.install(cert, key, valid)
    }

    /// Joins with the token: a CSR for a new key, signed by the server. Retries while
    /// no server answers; a refusal (wrong token) is final.
    async fn join(&self, servers: &str, token: &str) -> anyhow::Result<()> {
        let client = Client::with_tls(
            servers,
            Some(token.to_owned()),
            Some(flotilla_tls::client_config(&self.ca_pem, None)?),
        );
        let csr = flotilla_tls::node_csr(&self.node)?;
        let mut pause = Duration::from_millis(100);
        let reply = loop {
            match client.join_node(&self.node, &csr.cert_pem).await {
                Ok(r) => break r,
                Err(e) if e.status().is_some() => {
                    return Err(e).context("the server refused the join");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no server answered the join yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        };
        self.store(&reply.cert, &csr.key_pem)?;
        tracing::info!(node = self.node, "joined: node certificate issued");
        Ok(())
    }

    /// When the certificate in use should be renewed.
    fn renew_at(&self) -> SystemTime {
        let (from, until) = *self.valid.lock().unwrap_or_else(|p| p.into_inner());
        half_life(from, until)
    }

    /// Renews the certificate at half its lifetime through `client` (which presents the
    /// current one), forever. The lease is untouched: connections made with the old
    /// certificate stay up, new handshakes use the new one. Past expiry with no renewal,
    /// joins again with `token` if there is one.
    pub async fn renew_loop(self: Arc<Self>, client: Client, token: Option<String>) {
        loop {
            let wait = self
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
            match self.renew_once(&client).await {
                Ok(()) => tracing::info!(node = self.node, "node certificate renewed"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "renewing the node certificate failed");
                    let expired =
                        self.valid.lock().unwrap_or_else(|p| p.into_inner()).1 <= SystemTime::now();
                    if expired {
                        if let Some(t) = &token {
                            if let Err(e) = self.join(client.servers().join(",").as_str(), t).await
                            {
                                tracing::error!(error = %format!("{e:#}"), "joining again failed");
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }

    async fn renew_once(&self, client: &Client) -> anyhow::Result<()> {
        let csr = flotilla_tls::node_csr(&self.node)?;
        let reply = client.renew_cert(&csr.cert_pem).await?;
        self.store(&reply.cert, &csr.key_pem)
    }
}

/// Half-way through a certificate's lifetime as issued: its `not_before` is set
/// [`flotilla_tls::ca::BACKDATE`] before the moment it was issued.
fn half_life(from: SystemTime, until: SystemTime) -> SystemTime {
    let issued = (from + flotilla_tls::ca::BACKDATE).min(until);
    issued + until.duration_since(issued).unwrap_or_default() / 2
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))
}

/// The cluster CA: `ca_file`, else the one pinned on an earlier join, else fetched
/// from the servers and checked against `ca_hash`. A configured hash is checked
/// whichever way the CA came.
async fn cluster_ca(
    config: &AgentConfig,
    dir: &Path,
    servers: &[String],
) -> anyhow::Result<String> {
    let stored = dir.join(CA_FILE);
    let pem = if let Some(f) = &config.ca_file {
        flotilla_tls::ca::read(f)?
    } else if let Ok(pem) = std::fs::read_to_string(&stored) {
        pem
    } else {
        let pinned = config.ca_hash.as_deref().context(
            "an https:// server needs the cluster CA: --ca FILE, or --ca-hash sha256:… as printed by `flotilla server`",
        )?;
        let pem = flotilla_client::fetch_pinned_ca(servers, pinned)
            .await
            .map_err(|e| anyhow::anyhow!("fetching the CA: {e}"))?;
        flotilla_tls::ca::write_public(&stored, &pem)?;
        pem
    };
    if let Some(h) = &config.ca_hash {
        flotilla_tls::check_ca_hash(&pem, h)?;
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_half_way_through_the_lifetime_as_issued() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let from = issued - flotilla_tls::ca::BACKDATE;
        let until = issued + Duration::from_secs(10);
        assert_eq!(half_life(from, until), issued + Duration::from_secs(5));
        // A certificate made elsewhere without the backdate: never later than expiry.
        let odd_from = until - Duration::from_secs(1);
        assert!(half_life(odd_from, until) <= until);
    }
}
