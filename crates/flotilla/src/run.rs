//! The long-running commands: `server`, `agent`, `up`.

use std::path::Path;

use anyhow::Context;
use flotilla_core::config::{self, AgentConfig, ServerConfig};
use flotilla_core::ConfigError;

use crate::cli::{AgentArgs, Cli, Command, LbArgs, ServerArgs, UpArgs};
use crate::home::{flotilla_home, token_from, usage};

/// Runs the chosen subcommand.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(args) => server(args).await,
        Command::Agent(args) => agent(args).await,
        Command::Up(args) => up(args).await,
        Command::Lb(args) => lb(args).await,
        Command::Ps(args) => crate::ops::ps(args).await,
        Command::Services(args) => crate::ops::services(args).await,
        Command::Nodes(args) => crate::ops::nodes(args).await,
        Command::Deregister(args) => crate::ops::deregister(args).await,
        Command::Watch(args) => crate::ops::watch(args).await,
        Command::Build(args) => crate::containers::build(args).await,
        Command::Convert(args) => crate::compose::convert(args).await,
        Command::Deploy(args) => crate::containers::deploy(args).await,
        Command::Scale(args) => crate::containers::scale(args).await,
        Command::Rm(args) if args.orphans => crate::keynodes::rm_orphans(args.client).await,
        Command::Rm(args) => crate::containers::rm(args).await,
        Command::Backups(args) => crate::keynodes::backups(args).await,
        Command::Recover(args) => crate::keynodes::recover(args).await,
        Command::Logs(args) => crate::daily::logs(args).await,
        Command::Exec(args) => crate::daily::exec(args).await,
        Command::Backup(args) => crate::containers::backup(args).await,
        Command::Restore(args) => crate::containers::restore(args).await,
        Command::Migrate(args) => crate::containers::migrate(args).await,
        Command::Token(cmd) => crate::ops::token(cmd).await,
        Command::Cert(cmd) => crate::ops::cert(cmd).await,
        Command::Completions(args) => {
            crate::manuals::completions(args.shell, &mut std::io::stdout())?;
            Ok(())
        }
        Command::Man(args) => crate::manuals::man(args.dir.as_deref()),
        Command::HaGuard => tokio::task::spawn_blocking(flotilla_ha::guard::run)
            .await?
            .map_err(anyhow::Error::msg),
    }
}

fn load<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    match path {
        Some(p) => config::load_toml(p).map_err(usage),
        None => Ok(T::default()),
    }
}

fn checked<T>(
    path: Option<&Path>,
    result: Result<T, flotilla_core::FieldError>,
) -> anyhow::Result<T> {
    result.map_err(|e| match path {
        Some(p) => usage(ConfigError::Invalid {
            path: p.to_owned(),
            error: e,
        }),
        None => usage(e),
    })
}

/// Server config: defaults, then file, then flags, then validation.
pub fn server_config(args: &ServerArgs) -> anyhow::Result<ServerConfig> {
    let mut c: ServerConfig = load(args.config.as_deref())?;
    if let Some(v) = args.listen {
        c.listen = v;
    }
    if let Some(v) = &args.data_dir {
        c.data_dir = v.clone();
    }
    if let Some(v) = &args.token_file {
        c.token_file = Some(v.clone());
    }
    if let Some(v) = &args.store {
        c.store = v.clone();
    }
    if let Some(v) = args.dns_listen {
        c.dns_listen = v.0;
    }
    c.open_reads |= args.open_reads;
    c.insecure_http |= args.insecure_http;
    c.tls_names.extend(args.tls_names.iter().cloned());
    if let Some(v) = args.node_cert_lifetime {
        c.node_cert_lifetime = v.into();
    }
    for (flag, field) in [
        (&args.etcd_ca, &mut c.etcd_ca),
        (&args.etcd_cert, &mut c.etcd_cert),
        (&args.etcd_key, &mut c.etcd_key),
    ] {
        if let Some(v) = flag {
            *field = Some(v.clone());
        }
    }
    checked(args.config.as_deref(), c.validate())?;
    Ok(c)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

async fn server(args: ServerArgs) -> anyhow::Result<()> {
    let config = server_config(&args)?;
    let store = flotilla_registry::open_store(&config).await?;
    let mut running = flotilla_registry::start(config, store).await?;
    tokio::select! {
        r = running.wait() => r,
        _ = shutdown_signal() => Ok(()),
    }
}

/// Agent config: defaults, then file, then flags, then validation.
pub fn agent_config(args: &AgentArgs) -> anyhow::Result<AgentConfig> {
    let mut c: AgentConfig = load(args.config.as_deref())?;
    if let Some(v) = &args.server {
        c.server = v.clone();
    }
    if let Some(v) = &args.token_file {
        c.token_file = Some(v.clone());
    }
    if let Some(v) = args.advertise {
        c.advertise = Some(v);
    }
    if let Some(v) = args.cluster_cidr {
        c.cluster_cidr = Some(v);
    }
    if let Some(v) = &args.backup_root {
        c.backup_root = v.clone();
    }
    if let Some(v) = &args.registry_auth {
        c.registry_auth = Some(v.clone());
    }
    if let Some(v) = &args.node {
        c.node = Some(v.clone());
    }
    if let Some(v) = &args.docker {
        c.docker = v.clone();
    }
    if let Some(v) = args.lease_ttl {
        c.lease_ttl = v.into();
    }
    if let Some(v) = &args.default_network {
        c.default_network = Some(v.clone());
    }
    if let Some(v) = &args.metrics_listen {
        c.metrics_listen = v.clone();
    }
    if let Some(v) = &args.api_listen {
        c.api_listen = v.clone();
    }
    if let Some(v) = &args.api_url {
        c.api_url = Some(v.clone());
    }
    if let Some(v) = &args.ca {
        c.ca_file = Some(v.clone());
    }
    if let Some(v) = &args.ca_hash {
        c.ca_hash = Some(v.clone());
    }
    if let Some(v) = &args.data_dir {
        c.data_dir = v.clone();
    }
    // Like the CLI: the CA the server wrote beside the token file, when the operator
    // copied both and pinned nothing.
    if c.ca_file.is_none() && c.ca_hash.is_none() {
        c.ca_file = c
            .token_file
            .as_ref()
            .map(|t| flotilla_core::config::ca_beside(t))
            .filter(|f| f.exists());
    }
    if c.node.is_none() {
        c.node = Some(hostname());
    }
    checked(args.config.as_deref(), c.validate())?;
    Ok(c)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let config = agent_config(&args)?;
    let token = match &args.token {
        Some(t) => Some(t.trim().to_owned()),
        None => token_from(config.token_file.as_deref())?,
    }
    .ok_or_else(|| {
        usage("the agent needs a token: --token, --token-file FILE, FLOTILLA_TOKEN_FILE or FLOTILLA_TOKEN")
    })?;
    let metrics_listen = config.metrics_listen.clone();
    let agent = flotilla_agent::Agent::connect(config, token).await?;
    // A cluster setting the registry refuses (a cluster_cidr other agents do not share)
    // is the operator's to fix: exit 2 like any other bad setting.
    let handle = agent.start().await.map_err(|e| {
        match e.downcast_ref::<flotilla_agent::routed::RefusedSetting>() {
            Some(refused) => usage(refused.to_string()),
            None => e,
        }
    })?;
    let handle = std::sync::Arc::new(tokio::sync::Mutex::new(Some(handle)));
    if !metrics_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&metrics_listen)
            .await
            .with_context(|| format!("binding {metrics_listen}"))?;
        let h = handle.clone();
        let app = axum_metrics_router(h);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
    shutdown_signal().await;
    if let Some(h) = handle.lock().await.take() {
        h.shutdown().await;
    }
    Ok(())
}

fn axum_metrics_router(
    handle: std::sync::Arc<tokio::sync::Mutex<Option<flotilla_agent::AgentHandle>>>,
) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                handle
                    .lock()
                    .await
                    .as_ref()
                    .map(|h| h.metrics())
                    .unwrap_or_default()
            }
        }),
    )
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let home = args.data_dir.clone().unwrap_or_else(flotilla_home);
    let config = ServerConfig {
        listen: args.listen,
        data_dir: home.clone(),
        token_file: Some(home.join("token")),
        dns_listen: args.dns_listen.0,
        // Plain HTTP only while no other host can reach the API (docs/security.md).
        insecure_http: args.listen.ip().is_loopback(),
        ..ServerConfig::default()
    };
    checked(None, config.validate())?;
    let store = flotilla_registry::open_store(&config).await?;
    let mut running = flotilla_registry::start(config.clone(), store).await?;
    let scheme = if config.insecure_http {
        "http"
    } else {
        "https"
    };
    let url = format!("{scheme}://{}", running.http_addr);
    let tls = if config.insecure_http {
        None
    } else {
        Some(flotilla_client::tls_config(&config.ca_path())?)
    };
    std::fs::write(home.join("server"), format!("{url}\n"))
        .context("writing the server URL file")?;
    let agent = if args.no_agent {
        None
    } else {
        let agent_config = AgentConfig {
            server: url.clone(),
            token_file: Some(home.join("token")),
            node: Some(hostname()),
            docker: args.docker.clone(),
            api_listen: args.api_listen.clone(),
            default_network: args.default_network.clone(),
            data_dir: home.join("agent"),
            ca_file: tls.is_some().then(|| config.ca_path()),
            ..AgentConfig::default()
        };
        let agent = flotilla_agent::Agent::connect(agent_config, running.shared.token.clone())
            .await
            .context("starting the agent (use --no-agent to run without Docker)")?;
        Some(agent.start().await?)
    };
    let lb = if args.lb_listen.is_empty() {
        None
    } else {
        let text = format!(
            "[admin]\nlisten = {:?}\n[registry]\nurl = {:?}\ntoken_file = {:?}\n[[listener]]\nname = {:?}\nbind = {:?}\nprotocol = \"http\"\nscheduler = \"p2c-ewma\"\nservice = {:?}\n",
            args.lb_admin.0.map(|a| a.to_string()).unwrap_or_default(),
            url,
            home.join("token").display().to_string(),
            args.lb_service,
            args.lb_listen,
            args.lb_service
        );
        let lb_config: flotilla_lb::config::LbConfig =
            config::parse_toml(Path::new("flotilla up"), &text).map_err(usage)?;
        checked(None, lb_config.validate())?;
        Some(flotilla_lb::start(lb_config).await?)
    };
    println!("flotilla is up");
    println!(
        "  registry API   {url}   (token in {})",
        home.join("token").display()
    );
    if let Some(dns) = running.dns_addr {
        println!(
            "  DNS            {dns}   (dig @{} -p {} web.service.flotilla SRV)",
            dns.ip(),
            dns.port()
        );
    }
    println!("  metrics        {url}/metrics");
    println!("  dashboard      {url}/ui   (sign in with the token)");
    if let Some(lb) = &lb {
        println!(
            "  lb             http://{}   -> service {:?} (p2c-ewma)",
            lb.addrs[0], args.lb_service
        );
        if let Some(a) = lb.admin_addr {
            println!("  lb admin       http://{a}/status  http://{a}/metrics");
        }
    }
    println!(
        "  agent          {}",
        if agent.is_some() {
            "watching Docker for containers labelled flotilla.service=NAME"
        } else {
            "off"
        }
    );
    if agent.is_some() && !args.no_demo {
        let dir = home.join("examples/demo");
        crate::containers::write_demo(&dir).context("writing the demo stack")?;
        println!(
            "  demo stack     {} (deploying: web x3 behind the lb, notes with a volume)",
            dir.join("stack.toml").display()
        );
        let client = flotilla_client::Client::with_tls(
            &url,
            Some(running.shared.token.clone()),
            tls.clone(),
        );
        let token = crate::agent_api::AgentCreds {
            token: running.shared.token.clone(),
            tls: tls.clone(),
        };
        let docker = args.docker.clone();
        let lb_url = lb.as_ref().map(|l| format!("http://{}/", l.addrs[0]));
        tokio::spawn(async move {
            let spec = dir.join("stack.toml");
            let r = crate::containers::deploy_file(
                &client,
                &token,
                &spec,
                &docker,
                Some(std::time::Duration::from_secs(120)),
                false,
            )
            .await;
            match r {
                Ok(_) => match lb_url {
                    Some(u) => println!("demo stack is up: curl {u}"),
                    None => println!("demo stack is up"),
                },
                Err(e) => eprintln!("demo stack: {e:#}"),
            }
        });
    }
    println!("  try            flotilla ps");
    let result = tokio::select! {
        r = running.wait() => r,
        _ = shutdown_signal() => Ok(()),
    };
    drop(lb);
    if let Some(a) = agent {
        a.shutdown().await;
    }
    result
}

async fn lb(args: LbArgs) -> anyhow::Result<()> {
    let config = flotilla_lb::config::LbConfig::load(&args.config).map_err(usage)?;
    // Unreadable certificates are a config error too: exit 2 before binding anything.
    flotilla_lb::run::load_tls(&config)
        .map_err(|e| usage(format!("{}: {e:#}", args.config.display())))?;
    if args.check {
        println!(
            "{}: ok ({} listeners)",
            args.config.display(),
            config.listeners.len()
        );
        return Ok(());
    }
    // The guard first, so a crash during start-up is covered too.
    let guard = match &config.ha {
        Some(h) if h.guard => Some(
            flotilla_ha::guard::spawn(h, &std::env::current_exe()?)
                .context("starting the HA crash guard")?,
        ),
        _ => None,
    };
    let running = match flotilla_lb::start(config).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(g) = guard {
                g.disarm();
            }
            return Err(e);
        }
    };
    if let Some(a) = running.admin_addr {
        tracing::info!(admin = %a, "admin listener: /metrics /status");
    }
    shutdown_signal().await;
    running.shutdown().await;
    if let Some(g) = guard {
        g.disarm();
    }
    Ok(())
}
