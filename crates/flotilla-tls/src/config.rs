//! rustls configurations for both ends of every control-plane connection.
//!
//! Clients trust the cluster CA only (no system roots) and accept a server certificate
//! when it chains to the CA, is in date and names a cluster identity (a server or a
//! node) — see [`crate::ca`] for why the name kind, not a host name, is checked.
//! Servers ask for a client certificate but do not require one: the CLI and the lb
//! authenticate with a token over TLS, agents with their node certificate.

use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::ca::{identity_of, node_dns_name, PeerIdentity, SERVER_NAME};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The CA's certificate as the only trust root.
fn roots(ca_pem: &str) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("bad PEM in the CA file")?)
            .context("the CA certificate is not usable as a trust root")?;
        n += 1;
    }
    anyhow::ensure!(n > 0, "no certificate in the CA file");
    Ok(Arc::new(roots))
}

/// A certificate and key that can be replaced while in use: a renewed node certificate
/// takes effect for the next handshake, on both the agent's client and server sides.
#[derive(Debug, Default)]
pub struct CertSlot {
    current: ArcSwapOption<CertifiedKey>,
}

impl CertSlot {
    /// An empty slot (no certificate presented until [`CertSlot::set`]).
    pub fn new() -> Arc<Self> {
        Arc::new(CertSlot::default())
    }

    /// Replaces the certificate (PEM chain) and key.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .context("bad PEM certificate")?;
        anyhow::ensure!(!chain.is_empty(), "no certificate in the PEM");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("bad PEM key")?;
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .context("unsupported private key")?;
        self.current
            .store(Some(Arc::new(CertifiedKey::new(chain, signing))));
        Ok(())
    }

    /// Whether a certificate is loaded.
    pub fn is_set(&self) -> bool {
        self.current.load().is_some()
    }
}

impl ResolvesClientCert for CertSlot {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    fn has_certs(&self) -> bool {
        self.is_set()
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// Accepts a server certificate that chains to the cluster CA, is in date, and names a
/// server or a node (checked by the webpki verifier against that name).
#[derive(Debug)]
struct ClusterVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ClusterVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = match identity_of(end_entity.as_ref()) {
            Some(PeerIdentity::Server) => SERVER_NAME.to_owned(),
            Some(PeerIdentity::Node(n)) => node_dns_name(&n),
            // An lb's certificate is for client use: it serves nothing.
            Some(PeerIdentity::Lb { .. }) | None => {
                return Err(rustls::Error::General(
                    "the peer's certificate names no flotilla server or node".into(),
                ))
            }
        };
        let name = ServerName::try_from(expected)
            .map_err(|e| rustls::Error::General(format!("bad certificate name: {e}")))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The configuration of a client of the cluster's servers and agents: trusts `ca_pem`
/// only, and presents `identity`'s certificate when the server asks for one.
pub fn client_config(
    ca_pem: &str,
    identity: Option<Arc<CertSlot>>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .build()
        .context("building the certificate verifier")?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClusterVerifier { inner: verifier }));
    let mut config = match identity {
        Some(slot) => builder.with_client_cert_resolver(slot),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The configuration of a server of the cluster's API: serves `identity`'s certificate,
/// asks clients for a certificate chaining to `ca_pem` (optional: token clients have none;
/// one that is presented must verify).
pub fn server_config(ca_pem: &str, identity: Arc<CertSlot>) -> anyhow::Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .allow_unauthenticated()
        .build()
        .context("building the client verifier")?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No session resumption: a resumed session carries the client certificate of the
    // session it resumes, so a node that joined again after a revocation (or renewed)
    // would go on presenting its old certificate. Clients keep their connections alive,
    // so full handshakes are rare.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Accepts any server certificate. Only for fetching the CA certificate on a join,
/// which is then checked against the operator's pinned hash before anything is trusted
/// or any secret is sent; see [`unverified_fetch_config`].
#[derive(Debug)]
struct AcceptAnyForPinning;

impl ServerCertVerifier for AcceptAnyForPinning {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration that trusts any server: for one request only, `GET /v1/ca`
/// on a join, whose answer (the CA certificate) the caller checks against the pinned
/// hash before using it. Never send a token or read anything else over it.
pub fn unverified_fetch_config() -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyForPinning))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Checks that `cert_pem` chains to `ca_pem`, is valid at `now` and names a cluster
/// identity (used on a stored certificate before trusting it again): as a server
/// certificate for servers and nodes, as a client certificate for an lb's (which is
/// for client use only).
pub fn verify_chain(ca_pem: &str, cert_pem: &str, now: SystemTime) -> anyhow::Result<()> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("bad PEM certificate")?;
    let (leaf, rest) = chain.split_first().context("no certificate")?;
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("clock before 1970")?;
    let at = UnixTime::since_unix_epoch(since);
    let checked = if matches!(identity_of(leaf.as_ref()), Some(PeerIdentity::Lb { .. })) {
        WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
            .build()
            .context("building the certificate verifier")?
            .verify_client_cert(leaf, rest, at)
            .map(|_| ())
    } else {
        let verifier = ClusterVerifier {
            inner: WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider())
                .build()
                .context("building the certificate verifier")?,
        };
        verifier
            .verify_server_cert(
                leaf,
                rest,
                &ServerName::try_from(SERVER_NAME).expect("static name"),
                &[],
                at,
            )
            .map(|_| ())
    };
    checked.map_err(|e| anyhow::anyhow!("certificate not valid: {e}"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ca::{node_csr, ClusterCa};

    #[test]
    fn expired_and_foreign_certificates_do_not_verify() {
        let now = SystemTime::now();
        let ca = ClusterCa::generate(now).unwrap();
        let other = ClusterCa::generate(now).unwrap();
        let csr = node_csr("a").unwrap();
        let cert = ca
            .sign_node_csr(&csr.cert_pem, "a", now, Duration::from_secs(60))
            .unwrap();
        verify_chain(ca.cert_pem(), &cert, now).unwrap();
        let later = now + Duration::from_secs(120);
        assert!(verify_chain(ca.cert_pem(), &cert, later).is_err());
        assert!(verify_chain(other.cert_pem(), &cert, now).is_err());
    }

    #[test]
    fn a_reloaded_ca_signs_certificates_that_chain_to_the_stored_one() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let first = ClusterCa::load_or_create(dir.path(), now).unwrap();
        let again = ClusterCa::load_or_create(dir.path(), now).unwrap();
        let csr = node_csr("a").unwrap();
        let cert = again
            .sign_node_csr(&csr.cert_pem, "a", now, Duration::from_secs(60))
            .unwrap();
        verify_chain(first.cert_pem(), &cert, now).unwrap();
    }

    #[test]
    fn a_slot_takes_a_certificate_and_refuses_garbage() {
        let now = SystemTime::now();
        let ca = ClusterCa::generate(now).unwrap();
        let issued = ca.issue_server(&[], now, Duration::from_secs(60)).unwrap();
        let slot = CertSlot::new();
        assert!(!slot.is_set());
        assert!(slot.set("junk", &issued.key_pem).is_err());
        assert!(!slot.is_set());
        slot.set(&issued.cert_pem, &issued.key_pem).unwrap();
        assert!(slot.is_set());
        client_config(ca.cert_pem(), Some(slot.clone())).unwrap();
        server_config(ca.cert_pem(), slot).unwrap();
        assert!(client_config("not pem", None).is_err());
    }
}
