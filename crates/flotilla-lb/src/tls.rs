//! TLS termination: certificates chosen by SNI (exact name, then `*.` wildcard, then the
//! first certificate), ALPN `h2` and `http/1.1`, and reload without dropping
//! connections: the resolver behind the acceptor is swapped atomically, so handshakes
//! after a reload see the new certificates and established connections are untouched.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Certificates of one listener, by SNI name.
#[derive(Debug)]
struct Certificates {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

fn load_one(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("{}: cannot read certificates", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: bad PEM", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{}: no certificate in the file",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{}: no usable private key", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .context("unsupported private key type")?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

fn load(config: &TlsConfig) -> anyhow::Result<Certificates> {
    let mut by_name = HashMap::new();
    let mut default = None;
    for c in &config.certificates {
        let key = load_one(&c.cert, &c.key)?;
        default.get_or_insert_with(|| key.clone());
        for n in &c.names {
            by_name.insert(n.to_ascii_lowercase(), key.clone());
        }
    }
    Ok(Certificates {
        by_name,
        default: default.context("no certificate")?,
    })
}

/// SNI resolver whose certificate set can be replaced while serving.
#[derive(Debug)]
pub struct Resolver {
    certs: ArcSwap<Certificates>,
    config: TlsConfig,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        let Some(name) = hello.server_name() else {
            return Some(certs.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = certs.by_name.get(&name) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = certs.by_name.get(&format!("*.{parent}")) {
                return Some(k.clone());
            }
        }
        Some(certs.default.clone())
    }
}

impl Resolver {
    /// Re-reads the certificate files; on any error keeps serving the old ones.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = load(&self.config)?;
        self.certs.store(Arc::new(fresh));
        Ok(())
    }
}

/// Builds the acceptor of a listener, and its resolver for reloads.
pub fn acceptor(config: &TlsConfig) -> anyhow::Result<(tokio_rustls::TlsAcceptor, Arc<Resolver>)> {
    let resolver = Arc::new(Resolver {
        certs: ArcSwap::from_pointee(load(config)?),
        config: config.clone(),
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(server)), resolver))
}
