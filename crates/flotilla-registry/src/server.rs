//! Starting a registry server: token, store, catalog sync, duty, HTTP and DNS.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use flotilla_core::config::{ServerConfig, StoreUrl};
use flotilla_store::{EmbeddedStore, EtcdStore, Store};
use rand::RngCore;
use tokio::task::JoinHandle;

use crate::state::Shared;

/// A running registry.
pub struct RunningServer {
    /// Shared state (for embedding and tests).
    pub shared: Arc<Shared>,
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// Bound DNS address, if DNS is on.
    pub dns_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Resolves when any part of the server stops (which only happens on a fatal error).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        let (res, _, _) = futures::future::select_all(self.tasks.iter_mut()).await;
        res.context("server task panicked")?;
        anyhow::bail!("a server task ended unexpectedly")
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Reads the token file, or creates it (mode 0600) with 32 random bytes in hex.
pub fn load_or_create_token(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => {
            let t = t.trim().to_owned();
            anyhow::ensure!(
                t.len() >= 16,
                "{}: token is shorter than 16 characters",
                path.display()
            );
            Ok(t)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut bytes = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut bytes);
            let token = hex::encode(bytes);
            write_private(path, &token).with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(path = %path.display(), "created a new API token");
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")
}

/// Tells the operator how an agent joins: the server's URL, the token file, the pin.
fn print_join_line(config: &ServerConfig, bound: SocketAddr, hash: &str) {
    let host = if bound.ip().is_unspecified() {
        config
            .tls_names
            .first()
            .cloned()
            .unwrap_or_else(|| "THIS_HOST".into())
    } else {
        bound.ip().to_string()
    };
    let line = format!(
        "flotilla agent --join https://{host}:{} --token JOIN_TOKEN --ca-hash {hash}",
        bound.port(),
    );
    tracing::info!(ca_hash = hash, "agents pin this CA hash to join");
    println!(
        "join an agent with (JOIN_TOKEN: `flotilla token create --role agent [--node NAME]`, or the cluster token in {}):\n  {line}",
        config.token_path().display()
    );
}

/// Opens the configured store. With etcd every key lives under `/flotilla/`.
pub async fn open_store(config: &ServerConfig) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &config.store {
        StoreUrl::Embedded => {
            Arc::new(EmbeddedStore::open(&config.data_dir).with_context(|| {
                format!(
                    "opening the embedded store in {} (is another server using it?)",
                    config.data_dir.display()
                )
            })?)
        }
        StoreUrl::Etcd { endpoints, tls } => {
            let tls = if *tls {
                let read = |p: &std::path::PathBuf| {
                    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
                };
                Some(flotilla_store::EtcdTls {
                    ca_pem: read(config.etcd_ca.as_ref().context("etcds:// needs etcd_ca")?)?,
                    identity: match (&config.etcd_cert, &config.etcd_key) {
                        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                        _ => None,
                    },
                })
            } else {
                None
            };
            Arc::new(
                EtcdStore::connect_with(endpoints, "/flotilla/", tls)
                    .await
                    .context("connecting to etcd")?,
            )
        }
    })
}

/// Starts a server on an already-open store. `config` must be validated.
pub async fn start(config: ServerConfig, store: Arc<dyn Store>) -> anyhow::Result<RunningServer> {
    let token = load_or_create_token(&config.token_path())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let http_addr = listener.local_addr()?;
    let shared = Shared::new(store, config.clone(), token);
    let mut tasks = vec![tokio::spawn(shared.clone().run_catalog_sync())];
    let candidate = format!("{}@{}", http_addr, hostname());
    tasks.push(tokio::spawn(crate::duty::run(shared.clone(), candidate)));
    let mut options = flotilla_tls::ServeOptions::plain();
    options.header_read_timeout = config.header_read_timeout;
    options.max_connections = config.max_connections;
    if !config.insecure_http {
        let tls = crate::tls::ServerTls::load(&config, &shared.store).await?;
        options.tls = Some(tls.config.clone());
        tasks.push(tokio::spawn(tls.clone().renew_loop()));
        print_join_line(&config, http_addr, &tls.ca.hash());
        let _ = shared.tls.set(tls);
    }
    let app = crate::api::router(
        shared.clone(),
        crate::stacks::routes()
            .merge(crate::lbs::routes())
            .merge(crate::certs::routes())
            .merge(crate::tokens::routes())
            .merge(crate::secrets::routes())
            .merge(crate::subnets::routes()),
    )
    .merge(crate::ui::routes());
    tasks.push(tokio::spawn(flotilla_tls::serve(listener, app, options)));
    let mut dns_addr = None;
    if let Some(addr) = config.dns_listen {
        let mut dns = crate::dns::serve(shared.clone(), addr, &config.dns_domain)
            .await
            .with_context(|| format!("binding DNS on {addr}"))?;
        dns_addr = Some(addr);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = dns.block_until_done().await {
                tracing::error!(error = %e, "DNS server failed");
            }
        }));
    }
    tracing::info!(%http_addr, ?dns_addr, store = shared.store.kind(), "registry serving");
    Ok(RunningServer {
        shared,
        http_addr,
        dns_addr,
        tasks,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
