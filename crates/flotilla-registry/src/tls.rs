//! The server's side of the cluster's TLS: the CA (made on first start), the server's
//! own certificate (re-issued before it expires), and where the CLI finds the CA.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use flotilla_core::config::{ServerConfig, StoreUrl};
use flotilla_store::Store;
use flotilla_tls::{CertSlot, ClusterCa};
use serde::{Deserialize, Serialize};

use crate::keys;

/// How long a server certificate is valid; it is re-issued at half that.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the server needs to speak TLS and sign node certificates.
pub struct ServerTls {
    /// The cluster CA.
    pub ca: ClusterCa,
    /// The server's current certificate.
    pub slot: Arc<CertSlot>,
    /// The rustls configuration serving from `slot`.
    pub config: Arc<rustls::ServerConfig>,
    names: Vec<String>,
}

/// The CA as stored in a shared store.
#[derive(Serialize, Deserialize)]
struct StoredCa {
    cert: String,
    key: String,
}

impl ServerTls {
    /// Loads (or makes) the CA for this server's store, issues the server certificate,
    /// and writes the CA certificate next to the token file for the CLI.
    pub async fn load(config: &ServerConfig, store: &Arc<dyn Store>) -> anyhow::Result<Arc<Self>> {
        let now = SystemTime::now();
        let ca = match &config.store {
            StoreUrl::Embedded => ClusterCa::load_or_create(&config.data_dir, now)?,
            StoreUrl::Etcd { .. } => shared_ca(store.as_ref(), now).await?,
        };
        let mut names = config.tls_names.clone();
        if !config.listen.ip().is_unspecified() {
            names.push(config.listen.ip().to_string());
        }
        let slot = CertSlot::new();
        let tls = ServerTls {
            config: flotilla_tls::server_config(ca.cert_pem(), slot.clone())?,
            ca,
            slot,
            names,
        };
        tls.reissue(now)?;
        let ca_file = config.ca_path();
        let same = std::fs::read_to_string(&ca_file).is_ok_and(|c| c == tls.ca.cert_pem());
        if !same {
            flotilla_tls::ca::write_public(&ca_file, tls.ca.cert_pem())?;
        }
        Ok(Arc::new(tls))
    }

    /// Issues a fresh server certificate into the slot.
    fn reissue(&self, now: SystemTime) -> anyhow::Result<()> {
        let issued = self
            .ca
            .issue_server(&self.names, now, SERVER_CERT_LIFETIME)?;
        self.slot.set(&issued.cert_pem, &issued.key_pem)
    }

    /// Re-issues the server certificate at half its lifetime, forever.
    pub async fn renew_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SERVER_CERT_LIFETIME / 2).await;
            if let Err(e) = self.reissue(SystemTime::now()) {
                tracing::error!(error = %e, "could not re-issue the server certificate");
            }
        }
    }
}

/// The CA kept in the shared store: read it, or (one server at a time, by election)
/// make and store it.
async fn shared_ca(store: &dyn Store, now: SystemTime) -> anyhow::Result<ClusterCa> {
    if let Some(ca) = read_stored(store).await? {
        return Ok(ca);
    }
    let leadership = store
        .campaign(keys::CA_ELECTION, &hostname_pid(), Duration::from_secs(10))
        .await
        .context("waiting to make the cluster CA")?;
    let ca = match read_stored(store).await? {
        Some(ca) => ca,
        None => {
            let ca = ClusterCa::generate(now)?;
            let stored = StoredCa {
                cert: ca.cert_pem().to_owned(),
                key: ca.key_pem(),
            };
            store
                .put(keys::CA, serde_json::to_vec(&stored)?)
                .await
                .context("storing the cluster CA")?;
            tracing::info!(hash = ca.hash(), "made the cluster CA (in the store)");
            ca
        }
    };
    leadership.resign();
    Ok(ca)
}

async fn read_stored(store: &dyn Store) -> anyhow::Result<Option<ClusterCa>> {
    let Some(entry) = store
        .get(keys::CA)
        .await
        .context("reading the cluster CA")?
    else {
        return Ok(None);
    };
    let stored: StoredCa = serde_json::from_slice(&entry.value)
        .with_context(|| format!("the store's `{}` is not a CA record", keys::CA))?;
    Ok(Some(ClusterCa::from_pem(&stored.cert, &stored.key)?))
}

fn hostname_pid() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
}
