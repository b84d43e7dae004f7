//! A component's identity in a cluster that speaks TLS — an agent's node certificate or
//! an lb's certificate: the cluster CA (copied by the operator, kept from an earlier
//! join, or fetched and checked against the pinned hash), and a certificate obtained
//! with a token on the first join, reused across restarts while it is good, renewed
//! over mutual TLS at half its lifetime.
//!
//! With the certificate the holder sends no token: the server knows it by the name in
//! the certificate (an lb's also names the lb token it joined with, so revoking that
//! token ends the certificate's rights at once).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use flotilla_tls::{CertSlot, PeerIdentity};

use crate::Client;

/// CA file name in the identity's directory.
const CA_FILE: &str = "ca.pem";

/// Who holds the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// The agent of this node.
    Node(String),
    /// The load balancer of this name.
    Lb(String),
}

impl Holder {
    fn name(&self) -> &str {
        match self {
            Holder::Node(n) | Holder::Lb(n) => n,
        }
    }

    /// The certificate's and key's file names in the identity's directory.
    fn files(&self) -> (&'static str, &'static str) {
        match self {
            Holder::Node(_) => ("node.pem", "node.key"),
            Holder::Lb(_) => ("lb.pem", "lb.key"),
        }
    }

    /// Whether a certificate naming `identity` is this holder's.
    fn is(&self, identity: Option<PeerIdentity>) -> bool {
        match (self, identity) {
            (Holder::Node(n), Some(PeerIdentity::Node(m))) => *n == m,
            (Holder::Lb(n), Some(PeerIdentity::Lb { name, .. })) => *n == name,
            _ => false,
        }
    }
}

/// Where the CA comes from when the identity has none stored yet.
#[derive(Debug, Clone, Default)]
pub struct CaSource {
    /// A copy of the CA's certificate the operator gave.
    pub file: Option<PathBuf>,
    /// `sha256:HEX` the CA fetched from the servers must match (checked against a
    /// file or a stored copy too).
    pub hash: Option<String>,
}

/// The CA and a good certificate, kept current.
pub struct ClusterIdentity {
    /// The cluster CA, PEM.
    pub ca_pem: String,
    /// The certificate in use.
    pub slot: Arc<CertSlot>,
    /// Client side: trusts the CA, presents the certificate.
    pub client: Arc<rustls::ClientConfig>,
    dir: PathBuf,
    holder: Holder,
    /// Validity of the certificate in the slot.
    valid: std::sync::Mutex<(SystemTime, SystemTime)>,
}

impl ClusterIdentity {
    /// The identity of `holder` for `servers` (comma-separated) when they are all
    /// `https://` (`None` for `http://` ones): the CA and a good certificate kept in
    /// `dir` (made 0700), joining with `token` if there is none.
    pub async fn obtain(
        dir: &Path,
        servers: &str,
        holder: Holder,
        ca: &CaSource,
        token: Option<&str>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        let list = flotilla_core::config::parse_server_list(servers).map_err(anyhow::Error::msg)?;
        if !list.iter().all(|s| s.starts_with("https://")) {
            return Ok(None);
        }
        create_private_dir(dir)?;
        let ca_pem = ca.resolve(Some(dir), &list).await?;
        let slot = CertSlot::new();
        let identity = Arc::new(ClusterIdentity {
            client: flotilla_tls::client_config(&ca_pem, Some(slot.clone()))?,
            ca_pem,
            slot,
            dir: dir.to_owned(),
            holder,
            valid: std::sync::Mutex::new((SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH)),
        });
        if identity.reuse_stored(SystemTime::now()) {
            tracing::info!(holder = ?identity.holder, "using the stored certificate");
            return Ok(Some(identity));
        }
        let token = token
            .context("no usable certificate and no token to join with (--token or --token-file)")?;
        identity.join(servers, token).await?;
        Ok(Some(identity))
    }

    /// Who holds this identity.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// Loads the stored certificate if it is this holder's, chains to the CA, and has
    /// more than half its lifetime left.
    fn reuse_stored(&self, now: SystemTime) -> bool {
        let (cert_file, key_file) = self.holder.files();
        let (Ok(cert), Ok(key)) = (
            std::fs::read_to_string(self.dir.join(cert_file)),
            std::fs::read_to_string(self.dir.join(key_file)),
        ) else {
            return false;
        };
        match self.check(&cert, now) {
            Ok((from, until)) if now < half_life(from, until) => {
                self.install(&cert, &key, (from, until)).is_ok()
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "the stored certificate is not usable; joining again");
                false
            }
        }
    }

    /// Checks a certificate the server sent: chains to the CA, names this holder.
    fn check(&self, cert: &str, now: SystemTime) -> anyhow::Result<(SystemTime, SystemTime)> {
        flotilla_tls::verify_chain(&self.ca_pem, cert, now)?;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert.as_bytes())
            .map(|d: rustls_pki_types::CertificateDer<'static>| d.as_ref().to_vec())
            .context("bad PEM certificate")?;
        anyhow::ensure!(
            self.holder.is(flotilla_tls::identity_of(&der)),
            "the certificate does not name {:?}",
            self.holder
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
        let (cert_file, key_file) = self.holder.files();
        flotilla_tls::ca::write_secret(&self.dir.join(key_file), key)?;
        flotilla_tls::ca::write_public(&self.dir.join(cert_file), cert)?;
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
        let csr = flotilla_tls::node_csr(self.holder.name())?;
        let mut pause = Duration::from_millis(100);
        let reply = loop {
            let asked = match &self.holder {
                Holder::Node(n) => client.join_node(n, &csr.cert_pem).await,
                Holder::Lb(n) => client.join_lb(n, &csr.cert_pem).await,
            };
            match asked {
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
        tracing::info!(holder = ?self.holder, "joined: certificate issued");
        Ok(())
    }

    /// When the certificate in use should be renewed.
    fn renew_at(&self) -> SystemTime {
        let (from, until) = *self.valid.lock().unwrap_or_else(|p| p.into_inner());
        half_life(from, until)
    }

    /// Renews the certificate at half its lifetime through `client` (which presents the
    /// current one), forever. Connections made with the old certificate stay up, new
    /// handshakes use the new one. Past expiry with no renewal, joins again with
    /// `token` if there is one.
    pub async fn renew_loop(self: Arc<Self>, client: Client, token: Option<String>) {
        loop {
            let wait = self
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
            match self.renew_once(&client).await {
                Ok(()) => tracing::info!(holder = ?self.holder, "certificate renewed"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "renewing the certificate failed");
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
        let csr = flotilla_tls::node_csr(self.holder.name())?;
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

/// Makes `dir` (and its parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))
}

impl CaSource {
    /// The cluster CA, PEM: the operator's file, else the copy kept in `dir` from an
    /// earlier fetch, else fetched from the servers (`https://host:port`, no token
    /// sent) and kept only if it matches the pinned hash — stored in `dir` when there
    /// is one. A configured hash is checked whichever way the CA came.
    pub async fn resolve(&self, dir: Option<&Path>, servers: &[String]) -> anyhow::Result<String> {
        let stored = dir.map(|d| d.join(CA_FILE));
        let pem = if let Some(f) = &self.file {
            flotilla_tls::ca::read(f)?
        } else if let Some(pem) = stored
            .as_ref()
            .and_then(|s| std::fs::read_to_string(s).ok())
        {
            pem
        } else {
            let pinned = self.hash.as_deref().context(
                "an https:// server needs the cluster CA: --ca FILE, or --ca-hash sha256:… as printed by `flotilla server`",
            )?;
            let pem = crate::fetch_pinned_ca(servers, pinned)
                .await
                .map_err(|e| anyhow::anyhow!("fetching the CA: {e}"))?;
            if let Some(stored) = &stored {
                flotilla_tls::ca::write_public(stored, &pem)?;
            }
            pem
        };
        if let Some(h) = &self.hash {
            flotilla_tls::check_ca_hash(&pem, h)?;
        }
        Ok(pem)
    }
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

    #[test]
    fn a_holder_accepts_only_its_own_certificate() {
        let lb = Holder::Lb("edge".into());
        assert!(lb.is(Some(PeerIdentity::Lb {
            name: "edge".into(),
            token: "ab".into()
        })));
        assert!(!lb.is(Some(PeerIdentity::Node("edge".into()))));
        assert!(!Holder::Node("a".into()).is(Some(PeerIdentity::Node("b".into()))));
        assert_eq!(lb.files(), ("lb.pem", "lb.key"));
    }
}
