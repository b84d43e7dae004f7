//! Harness for the end-to-end tests: real `flotilla` processes (so they can be
//! SIGKILLed), a real Docker engine, real etcd.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_client::Client;
use flotilla_testkit::{free_port, wait_for_port};

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// A `flotilla` child process, killed on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(args: &[&str], log: PathBuf) -> Proc {
        Self::spawn_command(Command::new(BIN), args, log)
    }

    /// Spawns `command ARGS` (a `flotilla` invocation, e.g. wrapped in `nsenter`).
    pub fn spawn_command(mut command: Command, args: &[&str], log: PathBuf) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = command
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("FLOTILLA_TOKEN")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn flotilla");
        Proc {
            child: Some(child),
            log,
        }
    }

    /// SIGKILL: no goodbye, as if the host died.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            flotilla_testkit::signal(c.id(), flotilla_testkit::SIGTERM);
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what its processes logged last (CI keeps only the
        // test's output): the cause of a rare failure is then in the CI log.
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- last {} lines of {} ---\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// A registry server process.
pub struct Server {
    pub proc: Proc,
    pub url: String,
    pub port: u16,
    pub dns_port: u16,
    pub token_file: PathBuf,
    pub data_dir: PathBuf,
    extra: Vec<String>,
}

impl Server {
    /// Starts a server in `dir` with extra flags, waiting until it answers /healthz.
    pub fn start(dir: &Path, name: &str, extra: &[&str]) -> Server {
        let port = free_port();
        let dns_port = free_port();
        let data_dir = dir.join(name);
        let token_file = dir.join("token");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let scheme = if extra.iter().any(|a| a == "--insecure-http") {
            "http"
        } else {
            "https"
        };
        let proc = Self::spawn(dir, name, port, dns_port, &data_dir, &token_file, &extra);
        let s = Server {
            proc,
            url: format!("{scheme}://127.0.0.1:{port}"),
            port,
            dns_port,
            token_file,
            data_dir,
            extra,
        };
        s.wait_ready();
        s
    }

    fn spawn(
        dir: &Path,
        name: &str,
        port: u16,
        dns_port: u16,
        data_dir: &Path,
        token_file: &Path,
        extra: &[String],
    ) -> Proc {
        let mut args = vec![
            "server".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--dns-listen".into(),
            format!("127.0.0.1:{dns_port}"),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--token-file".into(),
            token_file.display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::spawn(&argv, dir.join(format!("{name}.log")))
    }

    /// Starts the same server again (same port, data dir and flags).
    pub fn restart(&mut self, dir: &Path, name: &str) {
        self.proc.kill();
        self.proc = Self::spawn(
            dir,
            name,
            self.port,
            self.dns_port,
            &self.data_dir,
            &self.token_file,
            &self.extra,
        );
        self.wait_ready();
    }

    fn wait_ready(&self) {
        wait_for_port(
            format!("127.0.0.1:{}", self.port).parse().unwrap(),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.proc.log_text()));
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = format!("{}/healthz", self.url);
        // Its own thread and runtime: callers may be inside a runtime already.
        // The port opens before the CA is written: wait for it first.
        while self.url.starts_with("https://")
            && !self.ca_file().exists()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let http = self.http();
        let healthy = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                while Instant::now() < deadline {
                    if let Ok(r) = http.get(&url).send().await {
                        if r.status() == 200 {
                            return true;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            })
        })
        .join()
        .unwrap();
        assert!(healthy, "server not healthy\n{}", self.proc.log_text());
    }

    /// The cluster CA's certificate the server wrote beside the token file.
    pub fn ca_file(&self) -> PathBuf {
        self.token_file.with_file_name("ca.pem")
    }

    /// The TLS configuration of a client of this server (`None` for plain HTTP).
    pub fn tls(&self) -> Option<std::sync::Arc<rustls::ClientConfig>> {
        self.url
            .starts_with("https://")
            .then(|| flotilla_client::tls_config(&self.ca_file()).unwrap())
    }

    /// A plain HTTP client that trusts this server (for raw requests in tests).
    pub fn http(&self) -> reqwest::Client {
        flotilla_client::http_builder(self.tls()).build().unwrap()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(&self.token_file)
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn client(&self) -> Client {
        Client::with_tls(&self.url, Some(self.token()), self.tls())
    }

    /// The body of a GET of `url` (this server's, or an agent's) with the admin token.
    pub async fn get_text(&self, url: &str) -> String {
        self.http()
            .get(url)
            .bearer_auth(self.token())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Minimal blocking GET returning the status, for readiness polling without a runtime.
pub mod raw {
    pub fn blocking_get(url: &str) -> std::io::Result<u16> {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest
            .split_once('/')
            .map(|(h, p)| (h, format!("/{p}")))
            .unwrap_or((rest, "/".into()));
        let mut s = std::net::TcpStream::connect(host)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0))
    }
}

/// An agent process for `server`, as node `node`, on the default Docker engine.
pub fn agent(dir: &Path, server: &Server, node: &str, network: Option<&str>) -> Proc {
    agent_on(dir, server, node, network, None)
}

/// An agent process for `server`, as node `node`, on the engine at `docker` (default
/// engine if `None`), with its API on a free loopback port.
pub fn agent_on(
    dir: &Path,
    server: &Server,
    node: &str,
    network: Option<&str>,
    docker: Option<&str>,
) -> Proc {
    agent_with(
        dir,
        server,
        node,
        network,
        docker,
        &["--api-listen", "127.0.0.1:0"],
    )
}

/// Like [`agent_on`], with `extra` flags (the API's listen address among them).
pub fn agent_with(
    dir: &Path,
    server: &Server,
    node: &str,
    network: Option<&str>,
    docker: Option<&str>,
    extra: &[&str],
) -> Proc {
    let token = server.token_file.display().to_string();
    let data = dir.join(format!("agent-{node}")).display().to_string();
    let mut args = vec![
        "agent",
        "--server",
        &server.url,
        "--token-file",
        &token,
        "--node",
        node,
        "--data-dir",
        &data,
    ];
    args.extend_from_slice(extra);
    if let Some(n) = network {
        args.extend(["--default-network", n]);
    }
    if let Some(d) = docker {
        args.extend(["--docker", d]);
    }
    Proc::spawn(&args, dir.join(format!("agent-{node}.log")))
}

/// Polls `f` every 20 ms until it returns true or `within` passes; returns the elapsed time.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if f().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {within:?} waiting for: {what}");
}

/// Passing instances of `service`.
pub async fn passing(client: &Client, service: &str) -> Vec<flotilla_core::InstanceView> {
    client
        .service(service, 0, Duration::ZERO, true)
        .await
        .map(|s| s.instances)
        .unwrap_or_default()
}

/// The test service's image on the default engine (built once per machine). Cargo
/// builds only this package's binaries for its tests: the test service is built here
/// (same profile, same target dir) when a clean `cargo nextest run` has not.
pub fn testsvc_image() -> String {
    let testsvc = std::path::Path::new(BIN).with_file_name("flotilla-testsvc");
    if !testsvc.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let status = Command::new(cargo)
            .args(["build", "-p", "flotilla-testsvc"])
            .current_dir(&workspace)
            .status()
            .unwrap();
        assert!(status.success(), "building flotilla-testsvc");
    }
    assert!(
        testsvc.exists(),
        "{} missing after the build",
        testsvc.display()
    );
    flotilla_testkit::testsvc_image(&testsvc).unwrap()
}

/// A CGI appending its query string to `/data/notes` (synced before it answers `ok`):
/// the stateful service of the migration tests, which count acknowledged writes.
pub const NOTES_APPEND_CGI: &str = "#!/bin/sh\nprintf '%s\\n' \"$QUERY_STRING\" >> /data/notes && sync && printf 'Content-Type: text/plain\\r\\n\\r\\nok\\n' && exit 0\nprintf 'Status: 500 Internal Server Error\\r\\n\\r\\n'\n";

/// A CGI answering the whole of `/data/notes`.
pub const NOTES_READ_CGI: &str =
    "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\ncat /data/notes 2>/dev/null\n";

/// An HTTP client that goes straight to the address it is given (no proxy from the
/// environment: test traffic stays on loopback and the test's own networks).
pub fn direct_http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}
