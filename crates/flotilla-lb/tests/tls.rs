//! TLS termination on real sockets: SNI picks the certificate (exact, wildcard,
//! default), ALPN offers h2, `X-Forwarded-Proto: https`, and a reload swaps
//! certificates for new handshakes without touching established connections.

use std::sync::{Arc, Mutex};

use flotilla_lb::config::LbConfig;
use flotilla_testsvc::Running;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Accepts any certificate but remembers which one the server presented.
#[derive(Debug, Default)]
struct Capture(Mutex<Option<Vec<u8>>>);

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn write_cert(dir: &std::path::Path, name: &str, sans: &[&str]) -> Vec<u8> {
    let c =
        rcgen::generate_simple_self_signed(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), c.cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), c.key_pair.serialize_pem()).unwrap();
    c.cert.der().to_vec()
}

async fn connect(
    addr: std::net::SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    let capture = Arc::new(Capture::default());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(capture.clone())
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
        .unwrap();
    let cert = capture.0.lock().unwrap().clone().unwrap();
    (stream, cert)
}

async fn get(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    path: &str,
) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0; 8192];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_alpn_forwarded_proto_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let a_der = write_cert(dir.path(), "a", &["a.test"]);
    let b_der = write_cert(dir.path(), "b", &["*.b.test"]);
    let backend = Running::start("tls-backend", |_| {}).unwrap();
    let d = dir.path().display();
    let text = format!(
        "[admin]\nlisten = \"\"\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n\
         [[listener.tls.certificate]]\ncert = \"{d}/a.crt\"\nkey = \"{d}/a.key\"\nnames = [\"a.test\"]\n\
         [[listener.tls.certificate]]\ncert = \"{d}/b.crt\"\nkey = \"{d}/b.key\"\nnames = [\"*.b.test\"]\n",
        backend.addr
    );
    let config: LbConfig =
        flotilla_core::config::parse_toml(std::path::Path::new("tls.toml"), &text).unwrap();
    config.validate().unwrap();
    let lb = flotilla_lb::start(config).await.unwrap();
    let addr = lb.addrs[0];

    let (_, cert) = connect(addr, "a.test", &[b"http/1.1"]).await;
    assert_eq!(cert, a_der, "exact SNI name");
    let (_, cert) = connect(addr, "x.b.test", &[b"http/1.1"]).await;
    assert_eq!(cert, b_der, "wildcard SNI name");
    let (_, cert) = connect(addr, "other.test", &[b"http/1.1"]).await;
    assert_eq!(cert, a_der, "unknown name gets the first certificate");
    let (h2, _) = connect(addr, "a.test", &[b"h2", b"http/1.1"]).await;
    assert_eq!(
        h2.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN offers h2"
    );

    let (mut kept, _) = connect(addr, "a.test", &[b"http/1.1"]).await;
    let answer = get(&mut kept, "/headers").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-forwarded-proto: https"), "{answer}");

    // New certificate for a.test on disk; reload; new handshakes see it, the open
    // connection keeps working.
    let new_der = write_cert(dir.path(), "a", &["a.test"]);
    assert_eq!(lb.reload_tls(), 1);
    let (_, cert) = connect(addr, "a.test", &[b"http/1.1"]).await;
    assert_eq!(cert, new_der, "reloaded certificate served");
    assert!(
        get(&mut kept, "/").await.starts_with("HTTP/1.1 200"),
        "established connection survives the reload"
    );

    // A broken file on reload keeps the old certificates.
    std::fs::write(dir.path().join("a.crt"), "not a certificate").unwrap();
    assert_eq!(lb.reload_tls(), 0);
    let (_, cert) = connect(addr, "a.test", &[b"http/1.1"]).await;
    assert_eq!(cert, new_der);
}
