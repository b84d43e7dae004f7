//! Real peers for flotilla's tests.
//!
//! Tests run against the real things: an etcd cluster started from Debian's
//! `etcd-server`, the Docker Engine with images built locally from Debian's
//! `busybox-static` (no registry can be reached), and Docker networks inside
//! 198.18.0.0/15. Everything started here is torn down on drop.
#![warn(missing_docs)]

pub mod hosts;
pub mod netns;
pub mod tap;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Name of the local busybox image tests run as service nodes.
pub const BUSYBOX_IMAGE: &str = "flotilla-test/busybox:latest";

/// The value of the unlabelled sample `name` in Prometheus text, if present.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k == name {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// A loopback port free for both TCP and UDP (bound and released; good enough for
/// tests). Both, because a server binds its DNS on the API's port number: a port free
/// for TCP alone failed a CI run with "binding DNS on …: Address already in use".
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on {addr} after {within:?}")
}

/// A unique suffix for names of containers and networks a test creates.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One etcd member process.
pub struct EtcdMember {
    /// Member name.
    pub name: String,
    /// Client endpoint, `127.0.0.1:port`.
    pub client: String,
    child: Option<Child>,
}

impl EtcdMember {
    /// SIGKILLs the member.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Certificate files for an etcd that serves TLS (PEM): its certificate and key, and the
/// CA that signed it and that client certificates must chain to.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    /// Server certificate (for 127.0.0.1).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The CA.
    pub ca: PathBuf,
}

/// A real etcd v3 cluster on loopback, in a temporary directory.
pub struct EtcdCluster {
    /// The members, in start order.
    pub members: Vec<EtcdMember>,
    /// Whether clients speak TLS to it.
    tls: bool,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> Result<Self> {
        Self::start_in(n, None)
    }

    /// Like [`EtcdCluster::start`], with the members' data under `base` (e.g. a tmpfs,
    /// to separate etcd's fsync cost from flotilla's in a benchmark).
    pub fn start_in(n: usize, base: Option<&std::path::Path>) -> Result<Self> {
        Self::start_with(n, base, None)
    }

    /// Like [`EtcdCluster::start`], serving clients over TLS with `tls`'s certificate
    /// and requiring client certificates signed by its CA (`--client-cert-auth`).
    pub fn start_tls(n: usize, tls: &EtcdTlsFiles) -> Result<Self> {
        Self::start_with(n, None, Some(tls))
    }

    fn start_with(
        n: usize,
        base: Option<&std::path::Path>,
        tls: Option<&EtcdTlsFiles>,
    ) -> Result<Self> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let dir = match base {
            Some(b) => tempfile::tempdir_in(b)?,
            None => tempfile::tempdir()?,
        };
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let token = unique("flotilla-etcd");
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data: PathBuf = dir.path().join(format!("m{i}"));
            let log = std::fs::File::create(dir.path().join(format!("m{i}.log")))?;
            let mut etcd = Command::new("etcd");
            if let Some(t) = tls {
                etcd.arg("--cert-file")
                    .arg(&t.cert)
                    .arg("--key-file")
                    .arg(&t.key)
                    .arg("--trusted-ca-file")
                    .arg(&t.ca)
                    .arg("--client-cert-auth");
            }
            let child = etcd
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(&data)
                .args([
                    "--listen-client-urls",
                    &format!("{scheme}://127.0.0.1:{client}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("{scheme}://127.0.0.1:{client}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-token", &token])
                .args(["--initial-cluster-state", "new"])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting etcd (install Debian's etcd-server)")?;
            members.push(EtcdMember {
                name: format!("m{i}"),
                client: format!("127.0.0.1:{client}"),
                child: Some(child),
            });
        }
        for m in &members {
            wait_for_port(m.client.parse()?, Duration::from_secs(20))?;
        }
        // Wait for a leader: a write through etcdctl succeeds only then.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut etcdctl = Command::new("etcdctl");
            if let Some(t) = tls {
                etcdctl
                    .arg("--cacert")
                    .arg(&t.ca)
                    .arg("--cert")
                    .arg(&t.cert)
                    .arg("--key")
                    .arg(&t.key);
            }
            let ok = etcdctl
                .args([
                    "--endpoints",
                    &format!("{scheme}://{}", members[0].client),
                    "put",
                    "/flotilla-testkit/ready",
                    "1",
                ])
                .env("ETCDCTL_API", "3")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("etcd cluster elected no leader in 20s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(EtcdCluster {
            members,
            tls: tls.is_some(),
            _dir: dir,
        })
    }

    /// Client endpoints of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// `etcd://a,b,c` for `flotilla server --store`.
    pub fn store_url(&self) -> String {
        let scheme = if self.tls { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.endpoints().join(","))
    }
}

/// Runs `docker ARGS`, returning trimmed stdout or the error with stderr.
pub fn docker(args: &[&str]) -> Result<String> {
    docker_at(None, args)
}

/// Runs `docker [-H HOST] ARGS` against the default engine or another one.
pub fn docker_at(host: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("docker");
    if let Some(h) = host {
        cmd.args(["-H", h]);
    }
    let out = cmd.args(args).output().context("running docker")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Builds (once per machine) a `FROM scratch` image holding Debian's static busybox, so
/// tests have a shell, `httpd` and `nc` without pulling anything.
pub fn busybox_image() -> Result<&'static str> {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap();
    if *built || docker(&["image", "inspect", BUSYBOX_IMAGE]).is_ok() {
        *built = true;
        return Ok(BUSYBOX_IMAGE);
    }
    let dir = tempfile::tempdir()?;
    std::fs::copy("/bin/busybox", dir.path().join("busybox"))
        .context("copying /bin/busybox (install busybox-static)")?;
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         RUN mkdir -p /www /tmp && echo ok > /www/index.html && echo ok > /www/health\nENV PATH=/bin\n",
    )?;
    let out = Command::new("docker")
        .args(["build", "-q", "-t", BUSYBOX_IMAGE])
        .arg(dir.path())
        .output()?;
    if !out.status.success() {
        bail!("docker build: {}", String::from_utf8_lossy(&out.stderr));
    }
    *built = true;
    Ok(BUSYBOX_IMAGE)
}

/// A user-defined Docker bridge network in 198.18.0.0/15, removed on drop.
pub struct DockerNetwork {
    /// Network name.
    pub name: String,
    /// N of its subnet 198.18.N.0/24 (the host side, the bridge, is 198.18.N.1).
    pub subnet: u8,
    /// Docker's id of the network.
    pub id: String,
    /// Engine it lives on (`None`: the default one).
    pub host: Option<String>,
}

impl DockerNetwork {
    /// The Linux bridge Docker made for it, in the host's namespace.
    pub fn bridge(&self) -> String {
        format!("br-{}", &self.id[..12.min(self.id.len())])
    }

    /// Creates a network with subnet `198.18.N.0/24`, picking a free N.
    pub fn create(prefix: &str) -> Result<Self> {
        Self::create_on(None, &unique(prefix))
    }

    /// Creates network `name` on the engine at `host` (default engine if `None`).
    pub fn create_on(host: Option<&str>, name: &str) -> Result<Self> {
        Self::create_with(host, name, &[])
    }

    /// [`DockerNetwork::create_on`] with more `docker network create` flags (labels).
    pub fn create_with(host: Option<&str>, name: &str, flags: &[&str]) -> Result<Self> {
        let name = name.to_owned();
        let mut last = String::new();
        for _ in 0..40 {
            let n = 1 + (std::process::id() as u64 * 7 + now_nanos() % 250) % 250;
            // Another engine's network (engines do not see each other's) may already
            // route this subnet on the host: two bridges for one /24 break both.
            if subnet_routed(n) {
                last = format!("198.18.{n}.0/24 is routed already");
                continue;
            }
            let subnet = format!("198.18.{n}.0/24");
            let mut args = vec!["network", "create", "--subnet", &subnet];
            args.extend_from_slice(flags);
            args.push(&name);
            match docker_at(host, &args) {
                Ok(id) => {
                    return Ok(DockerNetwork {
                        name,
                        subnet: n as u8,
                        id: id.trim().to_owned(),
                        host: host.map(str::to_owned),
                    })
                }
                Err(e) => last = e.to_string(),
            }
        }
        bail!("could not create a docker network: {last}")
    }
}

/// Whether the host already routes 198.18.N.0/24 (some engine's bridge has it).
fn subnet_routed(n: u64) -> bool {
    Command::new("ip")
        .args(["-4", "route", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("198.18.{n}.0/24")))
        .unwrap_or(false)
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

impl Drop for DockerNetwork {
    fn drop(&mut self) {
        // Containers removed just before may still be leaving the network (the engine
        // refuses to remove it while they are): try for a few seconds, not once.
        for _ in 0..25 {
            match docker_at(self.host.as_deref(), &["network", "rm", &self.name]) {
                Ok(_) => return,
                // Only "still has active endpoints" is worth waiting for.
                Err(e) if !e.to_string().contains("active endpoints") => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        }
    }
}

/// An extra Docker Engine with its own data root, exec root, socket, containerd
/// namespace and default bridge: a second "host" that shares nothing with the default
/// engine. It makes no iptables rules; its bridges are reachable from this machine.
/// Stopped and deleted on drop.
///
/// Its default bridge is one this helper creates (198.18.N.1/24): `--bridge none`
/// would be simpler, but dockerd then deletes `docker0` from the host — the default
/// engine's bridge — on start.
pub struct Dockerd {
    /// `unix:///...` endpoint.
    pub host: String,
    dir: tempfile::TempDir,
    child: std::process::Child,
    bridge: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates a bridge with 198.18.N.1/24 for a free N; returns its name.
fn own_bridge() -> Result<String> {
    let mut last = String::new();
    for _ in 0..40 {
        let n = 1 + (std::process::id() as u64 * 13 + now_nanos() % 250) % 250;
        if subnet_routed(n) {
            continue;
        }
        let name = format!("fld{}", now_nanos() % 1_000_000);
        match ip(&["link", "add", &name, "type", "bridge"]) {
            Ok(()) => {}
            Err(e) => {
                last = e.to_string();
                continue;
            }
        }
        ip(&["addr", "add", &format!("198.18.{n}.1/24"), "dev", &name])?;
        ip(&["link", "set", &name, "up"])?;
        return Ok(name);
    }
    bail!("no bridge for an extra dockerd: {last}")
}

/// Starts `dockerd` through `command` (the program itself, or `nsenter … dockerd`) with
/// its config, state, socket and log under `dir`, its own containerd namespaces, and
/// `extra` flags; returns the child and its `unix://` endpoint once it answers (the child
/// is killed if it does not within 30 s).
pub(crate) fn spawn_dockerd(
    mut command: Command,
    dir: &std::path::Path,
    name: &str,
    daemon_json: &str,
    extra: &[&str],
) -> Result<(std::process::Child, String)> {
    std::fs::write(dir.join("daemon.json"), daemon_json)?;
    let sock = dir.join("docker.sock");
    let ns = unique(&format!("flotilla-{name}"));
    let log = std::fs::File::create(dir.join("dockerd.log"))?;
    let mut child = command
        .arg("--config-file")
        .arg(dir.join("daemon.json"))
        .arg("--data-root")
        .arg(dir.join("data"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("docker.pid"))
        .arg("-H")
        .arg(format!("unix://{}", sock.display()))
        .args(["--containerd-namespace", &ns])
        .args(["--containerd-plugins-namespace", &format!("{ns}-p")])
        .args(extra)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting dockerd {name}"))?;
    let endpoint = format!("unix://{}", sock.display());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if docker_at(
            Some(&endpoint),
            &["version", "--format", "{{.Server.Version}}"],
        )
        .is_ok()
        {
            return Ok((child, endpoint));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!(
        "dockerd {name} did not come up: {}",
        std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default()
    )
}

impl Dockerd {
    /// Starts a daemon and waits until it answers.
    pub fn start(name: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("flotilla-dockerd-{name}-"))
            .tempdir()?;
        let bridge = own_bridge()?;
        let started = spawn_dockerd(
            Command::new("dockerd"),
            dir.path(),
            name,
            "{}",
            &["--bridge", &bridge, "--iptables=false", "--ip-masq=false"],
        );
        let (child, host) = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = ip(&["link", "del", &bridge]);
                return Err(e);
            }
        };
        Ok(Dockerd {
            host,
            dir,
            child,
            bridge,
        })
    }

    /// Runs `docker ARGS` against this daemon.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        docker_at(Some(&self.host), args)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        stop_dockerd(&self.host, &mut self.child, self.dir.path());
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Stops a test's dockerd for good: removes its containers (with their anonymous
/// volumes) and networks (their bridges would outlive it), SIGTERM, up to 20 s to exit,
/// then SIGKILL, and unmounts what lingers under its directory `dir`.
pub(crate) fn stop_dockerd(endpoint: &str, child: &mut std::process::Child, dir: &std::path::Path) {
    let at = Some(endpoint);
    if let Ok(ids) = docker_at(at, &["ps", "-aq"]) {
        for id in ids.split_whitespace() {
            let _ = docker_at(at, &["rm", "-f", "-v", id]);
        }
    }
    let _ = docker_at(at, &["network", "prune", "-f"]);
    signal(child.id(), libc::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    unmount_under(dir);
}

/// The signals tests send with [`signal`].
pub use libc::{SIGKILL, SIGTERM};

/// Sends `sig` to process `pid` (a child of the test); errors (it is gone) are ignored.
/// The one way tests signal a process (no shelling out to `kill`, no `extern "C"`).
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid is only an error.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Sends `sig` to every process in process group `pgid` (a child started with
/// `process_group(0)` and whatever it started, such as chromedriver's browsers).
pub fn signal_group(pgid: u32, sig: libc::c_int) {
    // SAFETY: killpg(2) has no memory-safety preconditions; a stale group is an error.
    unsafe {
        libc::killpg(pgid as libc::pid_t, sig);
    }
}

/// Unmounts (lazily) everything mounted under `root`: an engine's overlay and shm
/// mounts may linger under its data root, and the directory cannot be deleted before.
pub fn unmount_under(root: &std::path::Path) {
    let root = root.to_string_lossy().into_owned();
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        for line in mounts.lines() {
            if let Some(m) = line
                .split_whitespace()
                .nth(1)
                .filter(|m| m.starts_with(&root))
            {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
    }
}

/// A container removed (forcibly) on drop.
pub struct Container {
    /// Container name.
    pub name: String,
}

impl Container {
    /// `docker run -d --name NAME ARGS...`
    pub fn run(name: &str, args: &[&str]) -> Result<Self> {
        let mut full = vec!["run", "-d", "--name", name];
        full.extend_from_slice(args);
        docker(&full)?;
        Ok(Container {
            name: name.to_owned(),
        })
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

/// Builds an image holding the `flotilla-testsvc` binary at `bin` (dynamically linked:
/// its shared libraries are copied in at their paths, so no static toolchain is needed)
/// plus busybox, and returns its name.
pub fn testsvc_image(bin: &std::path::Path) -> Result<String> {
    let name = "flotilla-test/testsvc:latest".to_owned();
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("rootfs");
    let copy = |from: &std::path::Path| -> Result<()> {
        let to = root.join(from.strip_prefix("/").unwrap_or(from));
        std::fs::create_dir_all(to.parent().unwrap())?;
        std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
        Ok(())
    };
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy(bin, root.join("bin/flotilla-testsvc"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copying /bin/busybox (install busybox-static)")?;
    let ldd = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("");
        if path.starts_with('/') {
            copy(std::path::Path::new(path))?;
        }
    }
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\nENTRYPOINT [\"/bin/flotilla-testsvc\"]\n",
    )?;
    let out = Command::new("docker")
        .args(["build", "-q", "-t", &name])
        .arg(dir.path())
        .output()?;
    if !out.status.success() {
        bail!(
            "docker build testsvc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(name)
}
