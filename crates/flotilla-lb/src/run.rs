//! Starting an lb: bind every listener first (so a bad bind fails before anything
//! serves), then accept loops, registry watches and the admin listener.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::config::{LbConfig, Protocol};
use crate::listener::Listener;

/// A running lb.
pub struct RunningLb {
    /// The listeners, in config order.
    pub listeners: Arc<Vec<Arc<Listener>>>,
    /// Bound addresses, in config order (useful with port 0).
    pub addrs: Vec<SocketAddr>,
    /// Admin address, if enabled.
    pub admin_addr: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RunningLb {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the lb on the current runtime. `config` must be validated.
pub async fn start(config: LbConfig) -> anyhow::Result<RunningLb> {
    let client = match &config.registry {
        Some(r) => {
            let token = match &r.token_file {
                Some(f) => Some(flotilla_client::read_token(f)?),
                None => std::env::var("FLOTILLA_TOKEN").ok(),
            };
            Some(flotilla_client::Client::new(&r.url, token))
        }
        None => None,
    };
    let mut sockets = Vec::new();
    for l in &config.listeners {
        let socket = tokio::net::TcpListener::bind(l.bind)
            .await
            .with_context(|| format!("listener {:?}: binding {}", l.name, l.bind))?;
        sockets.push(socket);
    }
    let listeners: Arc<Vec<Arc<Listener>>> = Arc::new(
        config
            .listeners
            .iter()
            .cloned()
            .map(Listener::new)
            .collect(),
    );
    let mut tasks = Vec::new();
    let mut addrs = Vec::new();
    for (socket, listener) in sockets.into_iter().zip(listeners.iter().cloned()) {
        addrs.push(socket.local_addr()?);
        if let (Some(service), Some(client)) = (listener.cfg.service.clone(), client.clone()) {
            tasks.push(tokio::spawn(crate::discovery::follow(
                client,
                service,
                listener.clone(),
            )));
        }
        tracing::info!(listener = listener.cfg.name, bind = %listener.cfg.bind, protocol = ?listener.cfg.protocol, scheduler = listener.scheduler.name(), "listening");
        tasks.push(tokio::spawn(accept_loop(socket, listener)));
    }
    let mut admin_addr = None;
    if !config.admin.listen.is_empty() {
        let tcp = tokio::net::TcpListener::bind(&config.admin.listen)
            .await
            .with_context(|| format!("binding admin {}", config.admin.listen))?;
        admin_addr = Some(tcp.local_addr()?);
        tasks.push(tokio::spawn(crate::admin::serve(tcp, listeners.clone())));
    }
    Ok(RunningLb {
        listeners,
        addrs,
        admin_addr,
        tasks,
    })
}

async fn accept_loop(socket: tokio::net::TcpListener, listener: Arc<Listener>) {
    loop {
        match socket.accept().await {
            Ok((stream, peer)) => {
                let listener = listener.clone();
                match listener.cfg.protocol {
                    Protocol::Http => {
                        tokio::spawn(crate::http::serve_connection(listener, stream, peer))
                    }
                    Protocol::Tcp => {
                        tokio::spawn(crate::tcp::serve_connection(listener, stream, peer))
                    }
                };
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
