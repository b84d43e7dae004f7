//! Starting an lb: load certificates and bind every listener first (so a bad file or
//! a bad bind fails before anything serves), then accept loops, registry watches, the
//! admin listener and the SIGHUP certificate reload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::{LbConfig, Protocol};
use crate::listener::Listener;
use crate::tls::Resolver;

/// A running lb.
pub struct RunningLb {
    /// The listeners, in config order.
    pub listeners: Arc<Vec<Arc<Listener>>>,
    /// Bound addresses, in config order (useful with port 0).
    pub addrs: Vec<SocketAddr>,
    /// Admin address, if enabled.
    pub admin_addr: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    resolvers: Arc<Vec<Arc<Resolver>>>,
    /// The VRRP router, if `[ha]` is configured; dropping the lb hands over gracefully.
    pub ha: Option<Arc<flotilla_ha::router::Router>>,
    workers: Arc<crate::workers::Workers>,
}

impl Drop for RunningLb {
    fn drop(&mut self) {
        if let Some(ha) = &self.ha {
            ha.shutdown();
        }
        for t in &self.tasks {
            t.abort();
        }
        self.workers.stop();
    }
}

impl RunningLb {
    /// Stops gracefully: with `[ha]`, hands the VIP to the peer first, serving until
    /// the peer has taken over; then stops every task.
    pub async fn shutdown(self) {
        if let Some(ha) = self.ha.clone() {
            let _ = tokio::task::spawn_blocking(move || ha.shutdown()).await;
        }
        drop(self);
    }

    /// Number of threads serving client connections.
    pub fn worker_threads(&self) -> usize {
        self.workers.threads()
    }

    /// Re-reads every TLS listener's certificates (what SIGHUP does). A listener whose
    /// files are bad keeps its old certificates; returns how many reloaded.
    pub fn reload_tls(&self) -> usize {
        reload(&self.resolvers)
    }
}

fn reload(resolvers: &[Arc<Resolver>]) -> usize {
    let mut ok = 0;
    for r in resolvers {
        match r.reload() {
            Ok(()) => ok += 1,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "TLS reload failed; keeping the old certificates")
            }
        }
    }
    tracing::info!(
        reloaded = ok,
        of = resolvers.len(),
        "TLS certificates reloaded"
    );
    ok
}

/// A TLS listener's acceptor and the resolver that reloads its certificates.
pub type ListenerTls = (tokio_rustls::TlsAcceptor, Arc<Resolver>);

/// Loads every listener's TLS certificates (done by `start` before binding; exposed so
/// the CLI can treat a bad certificate as a config error).
pub fn load_tls(config: &LbConfig) -> anyhow::Result<Vec<Option<ListenerTls>>> {
    config
        .listeners
        .iter()
        .map(|l| {
            l.tls
                .as_ref()
                .map(|t| {
                    crate::tls::acceptor(t).with_context(|| format!("listener {:?}: TLS", l.name))
                })
                .transpose()
        })
        .collect()
}

/// Starts the lb on the current runtime. `config` must be validated.
pub async fn start(config: LbConfig) -> anyhow::Result<RunningLb> {
    let mut renewal = None;
    // Its report's name and its certificate's (the hostname read once).
    let lb_name = config.registry.as_ref().and_then(|r| r.lb_name());
    let client = match &config.registry {
        Some(r) => {
            let token = match &r.token_file {
                Some(f) => Some(flotilla_client::read_token(f)?),
                None => std::env::var("FLOTILLA_TOKEN").ok(),
            };
            let ca = r.ca_file.clone().or_else(|| {
                r.token_file
                    .as_ref()
                    .map(|t| flotilla_core::config::ca_beside(t))
                    .filter(|f| f.exists())
            });
            let https = r.server_list().contains("https://");
            let source = flotilla_client::identity::CaSource {
                file: ca,
                hash: r.ca_hash.clone(),
            };
            if let (Some(dir), true) = (&r.cert_dir, https) {
                // Its own certificate, bound to its lb token: mutual TLS, no token sent.
                let name = lb_name
                    .clone()
                    .context("registry.name: no usable name for the lb's certificate")?;
                let identity = flotilla_client::identity::ClusterIdentity::obtain(
                    dir,
                    &r.server_list(),
                    flotilla_client::identity::Holder::Lb(name),
                    &source,
                    token.as_deref(),
                )
                .await
                .context("registry.cert_dir: joining with the lb token")?
                .context("registry.cert_dir needs https:// registry URLs")?;
                let client = flotilla_client::Client::with_tls(
                    &r.server_list(),
                    None,
                    Some(identity.client.clone()),
                );
                renewal = Some((identity, client.clone(), token));
                Some(client)
            } else {
                // The CA found the way an agent finds it (a file, or fetched from a server
                // and kept only if it matches the pinned hash) before the token is sent.
                let tls = match (&source.file, &source.hash) {
                    (None, None) => None,
                    _ if https => {
                        let servers = flotilla_core::config::parse_server_list(&r.server_list())
                            .map_err(anyhow::Error::msg)?;
                        let pem = source
                            .resolve(None, &servers)
                            .await
                            .context("registry.ca / registry.ca_hash")?;
                        Some(flotilla_tls::client_config(&pem, None)?)
                    }
                    _ => None,
                };
                Some(flotilla_client::Client::with_tls(
                    &r.server_list(),
                    token,
                    tls,
                ))
            }
        }
        None => None,
    };
    let tls = load_tls(&config)?;
    let resolvers: Arc<Vec<Arc<Resolver>>> =
        Arc::new(tls.iter().flatten().map(|(_, r)| r.clone()).collect());
    let mut sockets = Vec::new();
    for l in &config.listeners {
        let socket = bind_listener(l.bind)
            .with_context(|| format!("listener {:?}: binding {}", l.name, l.bind))?;
        sockets.push(socket);
    }
    let listeners: Arc<Vec<Arc<Listener>>> = Arc::new(
        config
            .listeners
            .iter()
            .cloned()
            .map(|l| Listener::new(l, config.admin.verbose_errors))
            .collect(),
    );
    let workers = Arc::new(crate::workers::Workers::start(
        config.runtime.worker_threads,
    )?);
    let mut tasks = Vec::new();
    if let Some((identity, client, token)) = renewal {
        tasks.push(tokio::spawn(identity.renew_loop(client, token)));
    }
    let mut addrs = Vec::new();
    for ((socket, listener), tls) in sockets.into_iter().zip(listeners.iter().cloned()).zip(tls) {
        addrs.push(socket.local_addr()?);
        if listener.cfg.scheduler == crate::config::SchedulerKind::Feedback {
            tasks.push(tokio::spawn(feedback_loop(
                listener.clone(),
                client.clone(),
            )));
        }
        if let (Some(service), Some(client)) = (listener.cfg.service.clone(), client.clone()) {
            tasks.push(tokio::spawn(crate::discovery::follow(
                client,
                service,
                listener.clone(),
            )));
        }
        tracing::info!(listener = listener.cfg.name, bind = %listener.cfg.bind, protocol = ?listener.cfg.protocol, tls = tls.is_some(), scheduler = listener.scheduler.name(), "listening");
        tasks.push(tokio::spawn(accept_loop(
            socket,
            listener,
            tls.map(|(a, _)| a),
            workers.clone(),
        )));
    }
    let ha = match &config.ha {
        Some(h) => {
            let router = Arc::new(
                flotilla_ha::router::Router::start(h.clone())
                    .with_context(|| format!("ha: starting VRRP on interface {:?}", h.interface))?,
            );
            tasks.push(tokio::spawn(track_health(
                Arc::downgrade(&router),
                listeners.clone(),
                h.track.clone(),
                h.advert_interval,
            )));
            Some(router)
        }
        None => None,
    };
    if let (Some(client), Some(r)) = (client.clone(), &config.registry) {
        match lb_name {
            _ if r.report.is_zero() => {}
            Some(name) => {
                let ha = ha
                    .clone()
                    .zip(config.ha.as_ref().map(|h| h.virtual_ips.clone()));
                tasks.push(tokio::spawn(crate::report::report_loop(
                    client,
                    name,
                    r.report,
                    listeners.clone(),
                    ha,
                )));
            }
            None => tracing::warn!(
                "the hostname is not a node name: set [registry] name to report this lb"
            ),
        }
    }
    let mut admin_addr = None;
    if let Some(listen) = config.admin.listen {
        let tcp = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding admin {listen}"))?;
        admin_addr = Some(tcp.local_addr()?);
        tasks.push(tokio::spawn(crate::admin::serve(
            tcp,
            listeners.clone(),
            ha.clone(),
        )));
    }
    if !resolvers.is_empty() {
        let r = resolvers.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                reload(&r);
            }
        }));
    }
    Ok(RunningLb {
        listeners,
        addrs,
        admin_addr,
        tasks,
        resolvers,
        ha,
        workers,
    })
}

/// Binds a listening socket with IP_FREEBIND, so a listener on the virtual IP is
/// ready before the VIP arrives and serves the moment it does.
fn bind_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv4() {
        socket.set_freebind_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Tells the VRRP router whether this lb is fit to be master: every listener has at
/// least `min_healthy_backends` available backends.
async fn track_health(
    router: std::sync::Weak<flotilla_ha::router::Router>,
    listeners: Arc<Vec<Arc<Listener>>>,
    track: flotilla_ha::config::TrackConfig,
    every: Duration,
) {
    // Passive health alone cannot say a backend is back (no traffic reaches a
    // backup's backends), so each backend also gets a TCP connect probe.
    let probe_every = every.max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(probe_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if router.strong_count() == 0 {
            return;
        }
        let mut healthy = true;
        if track.listeners {
            for l in listeners.iter() {
                let now = Instant::now();
                let set = l.backends();
                let probes = set.iter().filter(|b| b.available(now)).map(|b| {
                    tokio::time::timeout(probe_every, tokio::net::TcpStream::connect(b.addr))
                });
                let up = futures::future::join_all(probes)
                    .await
                    .into_iter()
                    .filter(|r| matches!(r, Ok(Ok(_))))
                    .count();
                if up < track.min_healthy_backends {
                    healthy = false;
                }
            }
        }
        let Some(router) = router.upgrade() else {
            return;
        };
        router.set_healthy(healthy);
    }
}

async fn accept_loop(
    socket: tokio::net::TcpListener,
    listener: Arc<Listener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    workers: Arc<crate::workers::Workers>,
) {
    // Past `max_connections` open, new connections wait in the kernel's backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(listener.cfg.max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match socket.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let listener = listener.clone();
                let tls = tls.clone();
                workers.serve(stream, move |stream| async move {
                    let _permit = permit;
                    serve_accepted(listener, stream, peer, tls).await
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one accepted connection on whichever worker thread it was given to.
async fn serve_accepted(
    listener: Arc<Listener>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    match (listener.cfg.protocol, tls) {
        (Protocol::Http, None) => {
            // Until its first byte an idle connection holds only this small future; the
            // HTTP server's state (~2 KB) is boxed when needed. Ten thousand idle
            // clients cost ~20 MB less this way.
            let idle = listener.cfg.idle_timeout;
            // `peek`, not `readable`: a fresh socket reads as ready at once.
            let mut first = [0u8; 1];
            match tokio::time::timeout(idle, stream.peek(&mut first)).await {
                Ok(Ok(1..)) => {
                    Box::pin(crate::http::serve_connection(
                        listener,
                        crate::batch::BatchedStream::new(stream),
                        peer,
                        false,
                    ))
                    .await
                }
                Ok(Ok(0)) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "client connection failed"),
                Err(_) => tracing::debug!(%peer, "client sent nothing within the idle timeout"),
            }
        }
        // Boxed: the future of this function is as large as its largest branch, and an
        // idle HTTP connection should not carry a TLS handshake's or a relay's state.
        (Protocol::Http, Some(acceptor)) => {
            Box::pin(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        crate::http::serve_connection(listener, tls_stream, peer, true).await
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            })
            .await
        }
        (Protocol::Tcp, _) => Box::pin(crate::tcp::serve_connection(listener, stream, peer)).await,
    }
}

/// Runs the listener's feedback controller every period on what the lb observes of each
/// backend (latency estimate, requests and failures in the period) and, for registry-fed
/// listeners, the agents' load reports; publishes the weights back to the registry.
async fn feedback_loop(listener: Arc<Listener>, registry: Option<flotilla_client::Client>) {
    let cfg = listener.cfg.feedback.clone();
    let mut controller = crate::feedback::Controller::new(cfg.clone());
    let mut last: std::collections::HashMap<SocketAddr, (u64, u64)> = Default::default();
    let mut tick = tokio::time::interval(cfg.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The agents' load reports, by backend address (a plain read, not a blocking one).
        let now = std::time::Instant::now();
        let mut reports = std::collections::HashMap::new();
        if let (Some(client), Some(service)) = (&registry, &listener.cfg.service) {
            if let Ok(s) = client.service(service, 0, Duration::ZERO, false).await {
                for i in s.instances {
                    if let Some(l) = i.load {
                        let at = now
                            .checked_sub(Duration::from_millis(l.age_ms))
                            .unwrap_or(now);
                        reports.insert(
                            SocketAddr::new(i.address, i.port),
                            crate::feedback::LoadReport {
                                cpu: l.cpu,
                                memory: l.memory,
                                at,
                            },
                        );
                    }
                }
            }
        }
        let set = listener.backends();
        let mut observations = std::collections::HashMap::new();
        for b in set.iter() {
            // Completed, not sent: an overloaded backend is given more than it serves,
            // and a capacity estimated from what it was given would confirm any split.
            let requests = b.completed.load(std::sync::atomic::Ordering::Relaxed);
            let failures = b.failures.load(std::sync::atomic::Ordering::Relaxed);
            let (r0, f0) = last
                .insert(b.addr, (requests, failures))
                .unwrap_or((requests, failures));
            observations.insert(
                b.addr,
                crate::feedback::Observation {
                    base_weight: b.base_weight(),
                    latency_ns: b.ewma_ns(),
                    requests: requests.saturating_sub(r0),
                    errors: failures.saturating_sub(f0),
                    report: reports.get(&b.addr).copied(),
                    current_weight: b.dynamic_weight(),
                },
            );
        }
        last.retain(|a, _| observations.contains_key(a));
        if let Some(weights) = controller.step(std::time::Instant::now(), &observations) {
            for b in set.iter() {
                if let Some(w) = weights.get(&b.addr) {
                    b.set_dynamic_weight(*w);
                }
            }
            tracing::debug!(
                listener = listener.cfg.name,
                ?weights,
                "feedback weights published"
            );
            // Publish to the registry: a standby lb starts warm, `flotilla ps` shows them.
            if let (Some(client), Some(service)) = (&registry, &listener.cfg.service) {
                let by_addr: std::collections::BTreeMap<String, f64> =
                    weights.iter().map(|(a, w)| (a.to_string(), *w)).collect();
                if let Err(e) = client
                    .publish_weights(service, &listener.cfg.name, &by_addr)
                    .await
                {
                    tracing::warn!(error = %e, "could not publish feedback weights");
                }
            }
        }
    }
}
