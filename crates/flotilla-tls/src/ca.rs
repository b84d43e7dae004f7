//! The cluster CA: made once, kept in the server's data directory (or the shared store),
//! and the only issuer every component trusts. It signs two kinds of certificate:
//!
//! - a *server* certificate (DNS name [`SERVER_NAME`]) for the registry servers;
//! - a *node* certificate (DNS name `NODE.node.flotilla`, [`node_dns_name`]) for each
//!   agent, from the agent's CSR, after the server checked the join token;
//! - an *lb* certificate (DNS name `NAME.TOKEN.lb.flotilla`, [`lb_dns_name`]) for a load
//!   balancer, from its CSR, after the server checked its lb token — bound to that
//!   token's id, so the certificate can do what the token may (its service scope) and
//!   stops working the moment the token is revoked. Client use only.
//!
//! Peers check the name kind, not a host name: operators reach servers by whatever
//! address their LAN gives them (the same idea as Consul's `server.<dc>.consul`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

/// The DNS name in every registry server's certificate.
pub const SERVER_NAME: &str = "server.flotilla";
/// The suffix of the DNS name in every node certificate.
pub const NODE_SUFFIX: &str = ".node.flotilla";
/// The suffix of the DNS name in every lb certificate.
pub const LB_SUFFIX: &str = ".lb.flotilla";
/// File of the CA certificate in a directory holding it.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File of the CA key (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// How long the CA is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past so a peer whose clock is slightly behind
/// does not refuse a certificate issued a moment ago.
pub const BACKDATE: Duration = Duration::from_secs(300);

/// The DNS name in node `node`'s certificate.
pub fn node_dns_name(node: &str) -> String {
    format!("{node}{NODE_SUFFIX}")
}

/// The DNS name in the certificate of lb `name` that joined with token `token_id`.
pub fn lb_dns_name(name: &str, token_id: &str) -> String {
    format!("{name}.{token_id}{LB_SUFFIX}")
}

/// Whether `id` can be a token id in an lb certificate's name (a scoped token's id:
/// hex digits, at most 32).
pub fn valid_token_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What a certificate the cluster CA issued says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A registry server.
    Server,
    /// The agent of this node.
    Node(String),
    /// A load balancer, by the name it joined under and the id of the lb token it
    /// joined with (the token's role and scope are what it may do).
    Lb {
        /// The lb's name (its reports go under it).
        name: String,
        /// The id of the lb token the certificate was issued for.
        token: String,
    },
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (keep it 0600).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// The cluster's certificate authority.
pub struct ClusterCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl ClusterCa {
    /// A new CA, made at `now`.
    pub fn generate(now: SystemTime) -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "flotilla cluster CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_LIFETIME).into();
        let cert = params.self_signed(&key).context("signing the CA")?;
        let cert_pem = cert.pem();
        Ok(ClusterCa {
            cert,
            key,
            cert_pem,
        })
    }

    /// The CA from its PEM certificate and key (as stored).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("the CA key is not a usable PEM key")?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)
            .context("the CA certificate is not a usable PEM certificate")?;
        // Re-signing gives rcgen an issuer with the same name, key and key identifier;
        // what peers trust stays the stored certificate.
        let cert = params
            .self_signed(&key)
            .context("the CA key does not match the CA certificate")?;
        Ok(ClusterCa {
            cert,
            key,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// Loads the CA from `dir` (`ca.pem`, `ca.key`), or makes one there if neither file
    /// exists. The key is written 0600; half a CA (one file) is an error, never replaced.
    pub fn load_or_create(dir: &Path, now: SystemTime) -> anyhow::Result<Self> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert = read(&cert_path)?;
                let key = read(&key_path)?;
                Self::from_pem(&cert, &key).with_context(|| format!("the CA in {}", dir.display()))
            }
            (false, false) => {
                let ca = Self::generate(now)?;
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                write_secret(&key_path, &ca.key.serialize_pem())?;
                write_public(&cert_path, &ca.cert_pem)?;
                tracing::info!(dir = %dir.display(), hash = ca.hash(), "made the cluster CA");
                Ok(ca)
            }
            (c, _) => anyhow::bail!(
                "{}: {} exists but {} does not; restore the missing file or remove both",
                dir.display(),
                if c { CA_CERT_FILE } else { CA_KEY_FILE },
                if c { CA_KEY_FILE } else { CA_CERT_FILE },
            ),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM (for storing it where a second server finds it).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// `sha256:HEX` of the CA certificate: what a joining agent pins.
    pub fn hash(&self) -> String {
        ca_hash(&self.cert_pem).unwrap_or_default()
    }

    /// A server certificate (name [`SERVER_NAME`] plus `extra_names`, host names or IP
    /// addresses) valid from `now` for `lifetime`, with a fresh key.
    pub fn issue_server(
        &self,
        extra_names: &[String],
        now: SystemTime,
        lifetime: Duration,
    ) -> anyhow::Result<Issued> {
        let key = KeyPair::generate().context("generating a server key")?;
        let mut sans = vec![dns(SERVER_NAME)?];
        for n in extra_names {
            sans.push(match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => dns(n)?,
            });
        }
        let params = leaf_params("flotilla server", sans, now, lifetime, true);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .context("signing a server certificate")?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node's CSR: whatever names the CSR asks for, the certificate names only
    /// `node` (its DNS name and common name), valid from `now` for `lifetime`, for both
    /// client and server use (the agent's API serves with it too).
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> anyhow::Result<String> {
        anyhow::ensure!(
            valid_node_name(node),
            "node name {node:?} cannot be put in a certificate (letters, digits, `-` and `_` only)"
        );
        self.sign_csr(csr_pem, node, &node_dns_name(node), now, lifetime, true)
    }

    /// Signs an lb's CSR: the certificate names only `name` and the lb token it joined
    /// with (`token_id`), for client use, valid from `now` for `lifetime`.
    pub fn sign_lb_csr(
        &self,
        csr_pem: &str,
        name: &str,
        token_id: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> anyhow::Result<String> {
        anyhow::ensure!(
            valid_node_name(name),
            "lb name {name:?} cannot be put in a certificate (letters, digits, `-` and `_` only)"
        );
        anyhow::ensure!(valid_token_id(token_id), "bad token id {token_id:?}");
        self.sign_csr(
            csr_pem,
            name,
            &lb_dns_name(name, token_id),
            now,
            lifetime,
            false,
        )
    }

    fn sign_csr(
        &self,
        csr_pem: &str,
        common_name: &str,
        dns_name: &str,
        now: SystemTime,
        lifetime: Duration,
        server_auth: bool,
    ) -> anyhow::Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .context("the certificate request is not a valid PEM CSR")?;
        // Nothing the requester asked for is kept: names, usages and lifetime are ours.
        csr.params = leaf_params(
            common_name,
            vec![dns(dns_name)?],
            now,
            lifetime,
            server_auth,
        );
        let cert = csr
            .signed_by(&self.cert, &self.key)
            .context("signing a certificate")?;
        Ok(cert.pem())
    }
}

/// Whether `node` can be a node certificate's name (one DNS label's characters, so that
/// `NODE.node.flotilla` names exactly one node).
pub fn valid_node_name(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 63
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn leaf_params(
    common_name: &str,
    sans: Vec<SanType>,
    now: SystemTime,
    lifetime: Duration,
    server_auth: bool,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if server_auth {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    params.use_authority_key_identifier_extension = true;
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
    params
}

fn dns(name: &str) -> anyhow::Result<SanType> {
    Ok(SanType::DnsName(
        name.to_owned()
            .try_into()
            .with_context(|| format!("{name:?} is not a DNS name"))?,
    ))
}

/// A new key for a node and a CSR for it (the server decides what the certificate says).
pub fn node_csr(node: &str) -> anyhow::Result<Issued> {
    let key = KeyPair::generate().context("generating the node key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, node);
    params.subject_alt_names = vec![dns(&node_dns_name(node))?];
    let csr = params
        .serialize_request(&key)
        .context("making the certificate request")?;
    Ok(Issued {
        cert_pem: csr.pem().context("encoding the certificate request")?,
        key_pem: key.serialize_pem(),
    })
}

/// `sha256:HEX` of the first certificate in `pem` (its DER bytes).
pub fn ca_hash(pem: &str) -> anyhow::Result<String> {
    let der =
        CertificateDer::from_pem_slice(pem.as_bytes()).context("no PEM certificate to hash")?;
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(der.as_ref()))
    ))
}

/// Checks `pem` (a CA certificate fetched from an unverified peer) against the pinned
/// `sha256:HEX`; the error names both.
pub fn check_ca_hash(pem: &str, pinned: &str) -> anyhow::Result<()> {
    let got = ca_hash(pem)?;
    let want = pinned.trim().to_ascii_lowercase();
    anyhow::ensure!(
        want.starts_with("sha256:") && want.len() == "sha256:".len() + 64,
        "--ca-hash {pinned:?} is not `sha256:` and 64 hex digits"
    );
    anyhow::ensure!(
        got == want,
        "the server's CA has hash {got}, not the pinned {want}: refusing to join"
    );
    Ok(())
}

/// Who a certificate (DER) names, if it is one the cluster CA issues. Its signature
/// and validity must have been checked already (the TLS handshake does that).
pub fn identity_of(cert: &[u8]) -> Option<PeerIdentity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    identity_in(&parsed)
}

/// Who a peer's certificate (DER) names and when it was issued (its `not_before` plus
/// the [`BACKDATE`] every certificate is made with), from one parse: the server reads
/// both on every connection (the issue time for revocations).
pub fn peer_facts(cert: &[u8]) -> (Option<PeerIdentity>, Option<SystemTime>) {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return (None, None);
    };
    let issued = u64::try_from(parsed.validity().not_before.timestamp())
        .ok()
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + BACKDATE);
    (identity_in(&parsed), issued)
}

fn identity_in(parsed: &x509_parser::certificate::X509Certificate<'_>) -> Option<PeerIdentity> {
    let san = parsed.subject_alternative_name().ok().flatten()?;
    let mut found = None;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::DNSName(n) = name {
            if *n == SERVER_NAME {
                found = Some(PeerIdentity::Server);
            } else if let Some(node) = n.strip_suffix(NODE_SUFFIX) {
                if valid_node_name(node) {
                    found = Some(PeerIdentity::Node(node.to_owned()));
                }
            } else if let Some((name, token)) =
                n.strip_suffix(LB_SUFFIX).and_then(|r| r.split_once('.'))
            {
                if valid_node_name(name) && valid_token_id(token) {
                    found = Some(PeerIdentity::Lb {
                        name: name.to_owned(),
                        token: token.to_owned(),
                    });
                }
            }
        }
    }
    found
}

/// When the first certificate in `pem` starts and stops being valid.
pub fn validity(pem: &str) -> anyhow::Result<(SystemTime, SystemTime)> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).context("no PEM certificate")?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(der.as_ref()).context("unparsable certificate")?;
    let at = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    Ok((
        at(parsed.validity().not_before.timestamp()),
        at(parsed.validity().not_after.timestamp()),
    ))
}

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes a secret (a private key) readable by its owner only: created 0600 before any
/// byte is written, and replaced atomically.
pub fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    write_mode(path, contents, 0o600)
}

/// Writes a public file (a certificate) atomically, 0644.
pub fn write_public(path: &Path, contents: &str) -> anyhow::Result<()> {
    write_mode(path, contents, 0o644)
}

fn write_mode(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp: PathBuf = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    #[test]
    fn a_node_certificate_names_only_the_node_the_server_chose() {
        let now = SystemTime::now();
        let ca = ClusterCa::generate(now).unwrap();
        // The requester asks for another node's name; the certificate says `a`.
        let csr = node_csr("b").unwrap();
        let cert = ca
            .sign_node_csr(&csr.cert_pem, "a", now, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            identity_of(&parse(&cert)),
            Some(PeerIdentity::Node("a".into()))
        );
        let server = ca.issue_server(&["10.0.0.1".into()], now, Duration::from_secs(60));
        assert_eq!(
            identity_of(&parse(&server.unwrap().cert_pem)),
            Some(PeerIdentity::Server)
        );
        let left = validity(&cert).unwrap().1.duration_since(now).unwrap();
        assert!(left <= Duration::from_secs(60) && left >= Duration::from_secs(58));
    }

    #[test]
    fn an_lb_certificate_names_the_lb_and_its_token_and_serves_nothing() {
        let now = SystemTime::now();
        let ca = ClusterCa::generate(now).unwrap();
        let csr = node_csr("whatever").unwrap();
        let cert = ca
            .sign_lb_csr(
                &csr.cert_pem,
                "edge-1",
                "0a1b2c",
                now,
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(
            identity_of(&parse(&cert)),
            Some(PeerIdentity::Lb {
                name: "edge-1".into(),
                token: "0a1b2c".into()
            })
        );
        let der = parse(&cert);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        for (name, token) in [("a.b", "00"), ("edge", "not-hex"), ("edge", "")] {
            assert!(ca
                .sign_lb_csr(&csr.cert_pem, name, token, now, Duration::from_secs(60))
                .is_err());
        }
    }

    #[test]
    fn node_names_that_could_name_two_nodes_are_refused() {
        let now = SystemTime::now();
        let ca = ClusterCa::generate(now).unwrap();
        let csr = node_csr("x").unwrap();
        for bad in ["a.b", "", "a b", &"n".repeat(64)] {
            assert!(ca
                .sign_node_csr(&csr.cert_pem, bad, now, Duration::from_secs(60))
                .is_err());
        }
        assert!(ca
            .sign_node_csr("not a csr", "a", now, Duration::from_secs(60))
            .is_err());
    }

    #[test]
    fn the_ca_is_made_once_and_reloaded_with_its_key_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let first = ClusterCa::load_or_create(dir.path(), now).unwrap();
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = ClusterCa::load_or_create(dir.path(), now).unwrap();
        assert_eq!(first.hash(), again.hash());
        // Half a CA is an error, not a new CA.
        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = ClusterCa::load_or_create(dir.path(), now)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("ca.key"), "{err}");
    }

    #[test]
    fn the_pinned_hash_must_match() {
        let ca = ClusterCa::generate(SystemTime::now()).unwrap();
        let other = ClusterCa::generate(SystemTime::now()).unwrap();
        check_ca_hash(ca.cert_pem(), &ca.hash()).unwrap();
        check_ca_hash(
            ca.cert_pem(),
            &ca.hash().to_uppercase().replace("SHA256", "sha256"),
        )
        .unwrap();
        let err = check_ca_hash(ca.cert_pem(), &other.hash()).unwrap_err();
        assert!(err.to_string().contains("refusing"), "{err}");
        assert!(check_ca_hash(ca.cert_pem(), "sha256:abc").is_err());
    }
}
