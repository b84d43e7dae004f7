//! The network probes: an HTTP GET and a TCP connect against an instance's address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use flotilla_core::CheckKind;

/// The HTTP client probes are made with: no proxy (a check must reach the instance
/// itself), no redirects (a 3xx is not a passing check), a user agent that says who asks.
pub fn probe_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("flotilla-health/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("HTTP client")
}

/// Runs one HTTP or TCP check against `address:port` (or the check's own port) within
/// `timeout`; `None` for the kinds that are not probed over the network (TTL and exec
/// results are pushed). The output says what was tried and what came back, for `ps`.
pub async fn probe(
    http: &reqwest::Client,
    kind: &CheckKind,
    address: IpAddr,
    port: u16,
    timeout: Duration,
) -> Option<(bool, String)> {
    let target = |p: Option<u16>| SocketAddr::new(address, p.unwrap_or(port));
    Some(match kind {
        CheckKind::Http { path, port } => {
            let url = format!("http://{}{}", target(*port), path);
            match http.get(&url).timeout(timeout).send().await {
                Ok(resp) if resp.status().is_success() => {
                    (true, format!("HTTP {}", resp.status().as_u16()))
                }
                Ok(resp) => (false, format!("HTTP {} from {url}", resp.status().as_u16())),
                Err(e) => (
                    false,
                    format!("GET {url}: {}", flotilla_core::error::chain(&e)),
                ),
            }
        }
        CheckKind::Tcp { port } => {
            let addr = target(*port);
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => (true, format!("TCP connect {addr} ok")),
                Ok(Err(e)) => (false, format!("TCP connect {addr}: {e}")),
                Err(_) => (
                    false,
                    format!("TCP connect {addr}: timed out after {timeout:?}"),
                ),
            }
        }
        CheckKind::Ttl { .. } | CheckKind::Exec { .. } | CheckKind::Docker => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_probe_says_what_it_tried() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let http = probe_client();
        let local = IpAddr::from([127, 0, 0, 1]);
        let tcp = CheckKind::Tcp { port: None };
        let (ok, out) = probe(&http, &tcp, local, port, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(ok, "{out}");
        drop(listener);
        let (ok, out) = probe(&http, &tcp, local, port, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(!ok);
        assert!(out.contains(&format!("127.0.0.1:{port}")), "{out}");
        let ttl = CheckKind::Ttl {
            ttl: Duration::from_secs(1),
        };
        assert!(probe(&http, &ttl, local, port, Duration::from_secs(1))
            .await
            .is_none());
    }
}
