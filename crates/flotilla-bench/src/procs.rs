//! Child processes of a benchmark: the release `flotilla` binary and the anchors
//! (HAProxy, Nginx), killed when dropped so no run leaves anything behind.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// A child process, killed and reaped on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The whole process group: Nginx's workers outlive a killed master otherwise.
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: killpg(2) has no memory-safety preconditions; a gone group is an error.
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` with its standard streams detached.
pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Proc> {
    use std::os::unix::process::CommandExt;
    let child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc {
        child,
        name: name.to_owned(),
    })
}

/// The `flotilla` binary built next to this benchmark binary, or `FLOTILLA_BIN` (to
/// run this harness against another build, e.g. before and after a change).
pub fn flotilla_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("FLOTILLA_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("flotilla");
    anyhow::ensure!(
        bin.exists(),
        "{} not found: run `cargo build --release -p flotilla` first",
        bin.display()
    );
    Ok(bin)
}

/// Starts `flotilla ARGS` with warnings-only logging.
pub fn flotilla(args: &[&str]) -> anyhow::Result<Proc> {
    spawn(
        "flotilla",
        Command::new(flotilla_binary()?)
            .args(args)
            .env("RUST_LOG", "warn"),
    )
}

/// A registry server process on a free loopback port, in a temporary directory.
pub struct ServerProc {
    /// The process (killed when this is dropped).
    _proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its token file.
    pub token_file: PathBuf,
    /// A client holding the token.
    pub client: flotilla_client::Client,
    _dir: tempfile::TempDir,
}

impl ServerProc {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self._proc.child.id()
    }

    /// Starts `flotilla server` (embedded store, no DNS) and waits until it answers.
    pub async fn start() -> anyhow::Result<ServerProc> {
        Self::start_on("127.0.0.1").await
    }

    /// Like [`ServerProc::start`], listening on `ip` (e.g. a Docker bridge's address,
    /// for clients in other namespaces).
    pub async fn start_on(ip: &str) -> anyhow::Result<ServerProc> {
        // The scheduler and discovery benches measure the data plane and detection;
        // the registry is a local peer, reached in plain HTTP as before TLS existed.
        Self::start_with(ip, false).await
    }

    /// Like [`ServerProc::start_on`]; with `tls` the server, its agents and the CLI
    /// speak TLS with the cluster CA (the default of a real cluster).
    pub async fn start_with(ip: &str, tls: bool) -> anyhow::Result<ServerProc> {
        let dir = tempfile::tempdir()?;
        let port = flotilla_testkit::free_port();
        let token_file = dir.path().join("token");
        let data = dir.path().join("data");
        let listen = format!("{ip}:{port}");
        let mut args = vec![
            "server",
            "--listen",
            &listen,
            "--dns-listen",
            "",
            "--data-dir",
            path_str(&data)?,
            "--token-file",
            path_str(&token_file)?,
        ];
        if !tls {
            args.push("--insecure-http");
        }
        let proc = flotilla(&args)?;
        flotilla_testkit::wait_for_port(listen.parse()?, std::time::Duration::from_secs(20))?;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (url, client_tls) = if tls {
            let ca = token_file.with_file_name("ca.pem");
            (
                format!("https://{listen}"),
                Some(flotilla_client::tls_config(&ca)?),
            )
        } else {
            (format!("http://{listen}"), None)
        };
        let client = flotilla_client::Client::with_tls(
            &url,
            Some(flotilla_client::read_token(&token_file)?),
            client_tls,
        );
        Ok(ServerProc {
            _proc: proc,
            url,
            token_file,
            client,
            _dir: dir,
        })
    }

    /// Starts `flotilla agent --node NODE --docker ENGINE` against this server.
    pub fn agent_on(&self, node: &str, engine: &str) -> anyhow::Result<Proc> {
        self.agent_with(node, &["--docker", engine])
    }

    /// Starts `flotilla agent --node NODE` against this server.
    pub fn agent(&self, node: &str) -> anyhow::Result<Proc> {
        self.agent_with(node, &[])
    }

    fn agent_with(&self, node: &str, extra: &[&str]) -> anyhow::Result<Proc> {
        let data = self._dir.path().join(format!("agent-{node}"));
        let mut args = vec![
            "agent",
            "--server",
            &self.url,
            "--token-file",
            path_str(&self.token_file)?,
            "--node",
            node,
            "--api-listen",
            "127.0.0.1:0",
            "--data-dir",
            path_str(&data)?,
        ];
        args.extend_from_slice(extra);
        flotilla(&args)
    }
}

fn path_str(p: &std::path::Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 temporary path")
}

/// User + system CPU seconds so far of a process and all its descendants.
pub fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf(3) reads a constant; no memory is involved.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            if f.len() > 13 {
                total += (f[11].parse::<f64>().unwrap_or(0.0)
                    + f[12].parse::<f64>().unwrap_or(0.0))
                    / tick;
            }
        }
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            stack.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    total
}

/// "N cores; Linux version X" for the report.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!(
        "{cores} cores; {}",
        std::fs::read_to_string("/proc/version")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The test-service image, built locally from the release `flotilla-testsvc` binary
/// that sits next to this benchmark.
pub async fn testsvc_image() -> anyhow::Result<String> {
    let testsvc = flotilla_binary()?.with_file_name("flotilla-testsvc");
    anyhow::ensure!(
        testsvc.exists(),
        "{} not found: `cargo build --release -p flotilla-testsvc` first",
        testsvc.display()
    );
    tokio::task::spawn_blocking(move || flotilla_testkit::testsvc_image(&testsvc)).await?
}
