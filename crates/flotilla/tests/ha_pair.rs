//! The lb pair on a real LAN of network namespaces: two `flotilla lb` processes with
//! `[ha]`, each fronting its own backend (busybox httpd answering with the node's
//! name), and a client in a third namespace talking to the VIP. Failover is judged
//! from the client's side: who answers, the client's ARP entry, failed requests.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_testkit::netns::Lan;

const VIP_LAST: u8 = 100;

struct Pair {
    lan: Lan,
    vip: IpAddr,
    dir: tempfile::TempDir,
    backends: Vec<(String, Child)>,
}

/// A `flotilla lb` in a namespace; SIGKILLed on drop.
struct Lb {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Lb {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            flotilla_testkit::signal(c.id(), flotilla_testkit::SIGTERM);
            let _ = c.wait();
        }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Pair {
    fn new(subnet: u8) -> Pair {
        Self::with_family(subnet, false)
    }

    fn with_family(subnet: u8, v6: bool) -> Pair {
        let lan = Lan::create(&["lb1", "lb2", "client"], subnet).expect("network namespaces");
        let dir = tempfile::tempdir().unwrap();
        let vip = if v6 {
            IpAddr::V6(lan.spare6(VIP_LAST))
        } else {
            IpAddr::V4(lan.spare(VIP_LAST))
        };
        let mut p = Pair {
            lan,
            vip,
            dir,
            backends: Vec::new(),
        };
        for n in ["lb1", "lb2"] {
            p.start_backend(n);
        }
        p
    }

    /// lb1 (priority 150, `extra1`) and lb2 (priority 100): lb1 answers on the VIP
    /// and lb2 is backup.
    fn start_pair(&self, extra1: &str) -> (Lb, Lb) {
        let lb1 = self.start_lb("lb1", 150, extra1);
        let lb2 = self.start_lb("lb2", 100, "");
        self.wait_for_answer("lb1", Duration::from_secs(5));
        self.wait_state("lb2", "backup", Duration::from_secs(5));
        (lb1, lb2)
    }

    fn vip(&self) -> IpAddr {
        self.vip
    }

    fn start_backend(&mut self, node: &str) {
        let www = self.dir.path().join(format!("www-{node}"));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), node).unwrap();
        let child = self
            .lan
            .command(node, "busybox")
            .args(["httpd", "-f", "-p", "127.0.0.1:9000", "-h"])
            .arg(&www)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox httpd (busybox-static)");
        self.backends.push((node.to_owned(), child));
        std::thread::sleep(Duration::from_millis(100));
    }

    fn stop_backend(&mut self, node: &str) {
        // By pid: a pattern would reach other tests' backends.
        for (n, c) in &mut self.backends {
            if n == node {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn start_lb(&self, node: &str, priority: u8, extra: &str) -> Lb {
        let cfg = format!(
            r#"
[runtime]
worker_threads = 1
[admin]
listen = "127.0.0.1:9901"
[[listener]]
name = "web"
bind = "{bind}"
backends = ["127.0.0.1:9000"]
[ha]
interface = "eth0"
virtual_router_id = 51
priority = {priority}
advert_interval = "100ms"
virtual_ips = ["{vip}/{prefix}"]
{extra}
"#,
            vip = self.vip(),
            bind = SocketAddr::from((self.vip(), 8080)),
            prefix = if self.vip().is_ipv6() { 64 } else { 24 },
        );
        let path = self.dir.path().join(format!("{node}.toml"));
        std::fs::write(&path, cfg).unwrap();
        let log = self.dir.path().join(format!("{node}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = self
            .lan
            .command(node, common::BIN)
            .args(["lb", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Lb {
            child: Some(child),
            log,
        }
    }

    /// One request from the client to the VIP on a new connection: who answered.
    fn ask(&self) -> Option<String> {
        let vip = self.vip();
        self.lan
            .run_in("client", move || get(SocketAddr::from((vip, 8080)), "/"))
            .join()
            .unwrap()
            .ok()
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| b)
    }

    fn wait_for_answer(&self, from: &str, within: Duration) {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.ask().as_deref() == Some(from) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{from} never answered on the VIP within {within:?}");
    }

    /// The lb's `/status` (JSON) from inside its namespace.
    fn status(&self, node: &str) -> serde_json::Value {
        // Null while the lb is still starting (or gone).
        self.lan
            .run_in(node, || get("127.0.0.1:9901".parse().unwrap(), "/status"))
            .join()
            .unwrap()
            .ok()
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or_default()
    }

    fn metrics(&self, node: &str) -> String {
        self.lan
            .run_in(node, || get("127.0.0.1:9901".parse().unwrap(), "/metrics"))
            .join()
            .unwrap()
            .expect("admin /metrics")
            .1
    }

    fn state(&self, node: &str) -> String {
        self.status(node)["ha"]["state"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    fn wait_state(&self, node: &str, state: &str, within: Duration) {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.state(node) == state {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{node} is {:?}, not {state}, after {within:?}",
            self.state(node)
        );
    }

    fn holds_vip(&self, node: &str) -> bool {
        self.lan.has_addr(node, self.vip()).unwrap()
    }

    /// Requests every `every` for `dur` from the client, each on a new connection:
    /// `(sent at, answer)`; runs `during` at `fault_at`.
    fn load(
        &self,
        every: Duration,
        dur: Duration,
        fault_at: Duration,
        during: impl FnOnce(),
    ) -> Vec<(Duration, Option<String>)> {
        let vip = self.vip();
        let h = self.lan.run_in("client", move || {
            let start = Instant::now();
            let mut out = Vec::new();
            let mut next = start;
            while start.elapsed() < dur {
                let at = start.elapsed();
                let r = get(SocketAddr::from((vip, 8080)), "/")
                    .ok()
                    .filter(|(s, _)| *s == 200)
                    .map(|(_, b)| b);
                out.push((at, r));
                next += every;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            out
        });
        std::thread::sleep(fault_at);
        during();
        h.join().unwrap()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for (_, b) in &mut self.backends {
            let _ = b.kill();
            let _ = b.wait();
        }
    }
}

/// Blocking HTTP/1.1 GET with short timeouts: `(status, body)`.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
    s.set_read_timeout(Some(Duration::from_millis(1000)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The longest run of failed requests (in time) and how many failed.
fn gap(results: &[(Duration, Option<String>)]) -> (Duration, usize) {
    let failed = results.iter().filter(|(_, r)| r.is_none()).count();
    let mut worst = Duration::ZERO;
    let mut last_ok: Option<Duration> = None;
    for (at, r) in results {
        if r.is_some() {
            if let Some(prev) = last_ok {
                worst = worst.max(*at - prev);
            }
            last_ok = Some(*at);
        }
    }
    (worst, failed)
}

#[test]
fn the_pair_elects_by_priority_fails_over_on_a_crash_and_preempts_back() {
    let p = Pair::new(61);
    let _lb2 = p.start_lb("lb2", 100, "");
    p.wait_state("lb2", "master", Duration::from_secs(5));
    // The higher priority joins later and preempts. Without its crash guard, so the
    // backup must notice the silence (the master-down interval).
    let mut lb1 = p.start_lb("lb1", 150, "guard = false");
    p.wait_for_answer("lb1", Duration::from_secs(5));
    p.wait_state("lb2", "backup", Duration::from_secs(2));
    assert!(p.holds_vip("lb1") && !p.holds_vip("lb2"));
    assert_eq!(
        p.lan.neighbour("client", p.vip()).unwrap(),
        Some(p.lan.mac("lb1").unwrap())
    );

    // Crash the master under load.
    let results = p.load(
        Duration::from_millis(10),
        Duration::from_secs(3),
        Duration::from_millis(800),
        || lb1.kill(),
    );
    let (worst, failed) = gap(&results);
    let served_by_lb2 = results
        .iter()
        .filter(|(_, r)| r.as_deref() == Some("lb2"))
        .count();
    assert!(served_by_lb2 > 50, "the backup took over: {served_by_lb2}");
    assert!(
        worst < Duration::from_millis(1000),
        "client-observed gap {worst:?} ({failed} failed)"
    );
    assert_eq!(p.state("lb2"), "master");
    // Gratuitous ARP moved the client's entry to the new master.
    assert_eq!(
        p.lan.neighbour("client", p.vip()).unwrap(),
        Some(p.lan.mac("lb2").unwrap())
    );
    eprintln!("crash: gap {worst:?}, {failed} failed of {}", results.len());

    // Back again: the crashed lb's stale VIP is cleaned up and it preempts.
    let _lb1 = p.start_lb("lb1", 150, "");
    p.wait_for_answer("lb1", Duration::from_secs(5));
    p.wait_state("lb2", "backup", Duration::from_secs(2));
    assert!(!p.holds_vip("lb2"));
    // lb2's own account (what it reports to the registry for the dashboard): backup →
    // master when lb1 went silent, master → backup when lb1 preempted, in that order.
    let history = p.status("lb2")["ha"]["history"].clone();
    let moves: Vec<(String, String)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["from"].as_str().unwrap().into(),
                t["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    let tail: Vec<(&str, &str)> = moves[moves.len() - 2..]
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        tail,
        [("backup", "master"), ("master", "backup")],
        "{history}"
    );
    assert!(history[0]["at_ms"].as_u64().unwrap() > 0);
}

#[test]
fn the_crash_guard_hands_over_a_killed_master_at_once() {
    let p = Pair::new(70);
    let (mut lb1, _lb2) = p.start_pair("");
    // SIGKILL of the lb process alone: its guard survives and speaks for it.
    let results = p.load(
        Duration::from_millis(10),
        Duration::from_secs(2),
        Duration::from_millis(500),
        || lb1.kill(),
    );
    let (worst, failed) = gap(&results);
    eprintln!(
        "guarded crash: gap {worst:?}, {failed} failed of {}",
        results.len()
    );
    assert!(
        worst < Duration::from_millis(250),
        "the backup took over after its skew, not the master-down interval: {worst:?}"
    );
    assert!(
        !p.holds_vip("lb1"),
        "the guard released the dead master's VIP"
    );
    assert_eq!(p.state("lb2"), "master");
}

#[test]
fn an_ipv6_pair_fails_over_and_moves_the_neighbour_entry() {
    let p = Pair::with_family(71, true);
    let mut lb1 = p.start_lb("lb1", 150, "guard = false");
    let _lb2 = p.start_lb("lb2", 100, "");
    p.wait_for_answer("lb1", Duration::from_secs(5));
    p.wait_state("lb2", "backup", Duration::from_secs(5));
    assert!(p.holds_vip("lb1") && !p.holds_vip("lb2"));
    assert_eq!(
        p.lan.neighbour("client", p.vip()).unwrap(),
        Some(p.lan.mac("lb1").unwrap())
    );
    lb1.kill();
    p.wait_for_answer("lb2", Duration::from_secs(3));
    // The unsolicited neighbour advertisement moved the client's entry.
    assert_eq!(
        p.lan.neighbour("client", p.vip()).unwrap(),
        Some(p.lan.mac("lb2").unwrap())
    );
    let s = p.status("lb2");
    assert!(
        s["ha"]["addr"].as_str().unwrap().starts_with("fe80::"),
        "{s}"
    );
}

#[test]
fn a_graceful_stop_hands_over_without_a_failed_request() {
    let p = Pair::new(62);
    let (mut lb1, _lb2) = p.start_pair("");
    let results = p.load(
        Duration::from_millis(10),
        Duration::from_secs(2),
        Duration::from_millis(500),
        || lb1.terminate(),
    );
    let (worst, failed) = gap(&results);
    eprintln!(
        "graceful: gap {worst:?}, {failed} failed of {}",
        results.len()
    );
    if failed > 0 {
        let first = results.iter().position(|(_, r)| r.is_none()).unwrap();
        for (at, r) in &results[first.saturating_sub(3)..(first + 60).min(results.len())] {
            eprintln!("{at:?} {r:?}");
        }
        eprintln!("lb1 log:\n{}", lb1.log());
    }
    // The hand-over itself loses nothing (the benchmark sees 0 failed in every run), but
    // a connection whose packets straddle the moment the client's ARP entry moves is
    // reset by the new master, which never saw it; on a machine busy with the rest of
    // the test suite that can hit one request. So: no gap, at most that one.
    assert!(failed <= 1, "{failed} requests failed during the hand-over");
    assert!(worst < Duration::from_millis(200), "gap {worst:?}");
    assert!(results.iter().any(|(_, r)| r.as_deref() == Some("lb2")));
    assert!(!p.holds_vip("lb1"), "the stopped lb released the VIP");
    assert!(lb1.log().contains("handed over"), "{}", lb1.log());
}

#[test]
fn without_preemption_a_higher_priority_joiner_stays_backup() {
    let p = Pair::new(63);
    // lb2 also runs a notify script on every state change.
    let states = p.dir.path().join("lb2-states");
    let script = p.dir.path().join("notify.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$1\" >> {}\n", states.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let _lb2 = p.start_lb(
        "lb2",
        100,
        &format!("notify = {:?}", script.display().to_string()),
    );
    p.wait_state("lb2", "master", Duration::from_secs(5));
    let _lb1 = p.start_lb("lb1", 150, "preempt = false");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(p.state("lb1"), "backup");
    assert_eq!(p.state("lb2"), "master");
    assert_eq!(p.ask().as_deref(), Some("lb2"));
    assert_eq!(
        std::fs::read_to_string(&states).unwrap_or_default(),
        "backup\nmaster\n",
        "the notify script saw each transition"
    );
}

#[test]
fn a_partition_heals_to_exactly_one_master() {
    let p = Pair::new(64);
    let (_lb1, _lb2) = p.start_pair("");
    // The pair cannot hear each other, the client still reaches both: lb2 becomes a
    // second master (the split brain no protocol can avoid while it lasts).
    for n in ["lb1", "lb2"] {
        p.lan.block(n, 112).unwrap();
    }
    p.wait_state("lb2", "master", Duration::from_secs(2));
    assert!(p.holds_vip("lb1") && p.holds_vip("lb2"));
    // The client followed lb2's gratuitous ARP.
    p.wait_for_answer("lb2", Duration::from_secs(2));
    for n in ["lb1", "lb2"] {
        p.lan.unblock(n, 112).unwrap();
    }
    let healed = Instant::now();
    p.wait_state("lb2", "backup", Duration::from_secs(2));
    eprintln!("split brain ended {:?} after heal", healed.elapsed());
    assert_eq!(p.state("lb1"), "master");
    assert!(!p.holds_vip("lb2"));
    // lb1 announced the VIP again, so the client is back without waiting for its
    // ARP entry to expire.
    assert_eq!(p.ask().as_deref(), Some("lb1"));
    assert_eq!(
        p.lan.neighbour("client", p.vip()).unwrap(),
        Some(p.lan.mac("lb1").unwrap())
    );
}

#[test]
fn a_lost_link_is_a_fault_not_a_second_master() {
    let p = Pair::new(69);
    let (_lb1, _lb2) = p.start_pair("");
    // The master loses its link: it lets go, the backup takes over.
    p.lan.cut("lb1").unwrap();
    p.wait_for_answer("lb2", Duration::from_secs(3));
    p.wait_state("lb1", "fault", Duration::from_secs(1));
    assert!(!p.holds_vip("lb1"), "a node without a link holds no VIP");
    p.lan.heal("lb1").unwrap();
    // Back as backup, then preempts with its higher priority: never two masters.
    p.wait_for_answer("lb1", Duration::from_secs(5));
    p.wait_state("lb2", "backup", Duration::from_secs(2));
}

#[test]
fn a_failing_backend_lowers_priority_and_moves_the_vip() {
    let mut p = Pair::new(65);
    let _lb1 = p.start_lb("lb1", 150, "");
    let _lb2 = p.start_lb("lb2", 100, "");
    p.wait_for_answer("lb1", Duration::from_secs(5));
    p.stop_backend("lb1");
    p.wait_for_answer("lb2", Duration::from_secs(5));
    let s = p.status("lb1");
    assert_eq!(s["ha"]["healthy"], false);
    assert_eq!(s["ha"]["priority"], 50);
    // The backend returns: lb1 is healthy again and takes the VIP back.
    p.start_backend("lb1");
    p.wait_for_answer("lb1", Duration::from_secs(6));
    assert_eq!(p.status("lb1")["ha"]["priority"], 150);
}

#[test]
fn forged_and_malformed_adverts_are_dropped_and_counted() {
    use flotilla_ha::codec::{Advert, ChecksumMode, MULTICAST_V4};
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let p = Pair::new(66);
    let _lb1 = p.start_lb("lb1", 150, "");
    p.wait_state("lb1", "master", Duration::from_secs(5));
    let me = p.lan.addr("client");
    let vip = p.vip();
    p.lan
        .run_in("client", move || {
            let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(112))).unwrap();
            s.set_multicast_if_v4(&me).unwrap();
            let to = SockAddr::from(SocketAddr::from((MULTICAST_V4, 0)));
            // A would-be master with priority 254: each forgery is something the
            // receiver must refuse, so lb1 must stay master.
            let good = |vrid| Advert {
                vrid,
                priority: 254,
                interval_cs: 10,
                addrs: vec![vip],
            };
            let ok = good(51).encode(me.into(), MULTICAST_V4.into(), ChecksumMode::PseudoHeader);
            for _ in 0..20 {
                s.set_multicast_ttl_v4(64).unwrap(); // routed: wrong TTL
                s.send_to(&ok, &to).unwrap();
                s.set_multicast_ttl_v4(255).unwrap();
                let mut bad = ok.clone();
                bad[7] ^= 0x55; // bad checksum
                s.send_to(&bad, &to).unwrap();
                let other =
                    good(52).encode(me.into(), MULTICAST_V4.into(), ChecksumMode::PseudoHeader);
                s.send_to(&other, &to).unwrap(); // another router
                s.send_to(&ok[..6], &to).unwrap(); // truncated
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(p.state("lb1"), "master", "no forgery took over");
    let m = p.metrics("lb1");
    for reason in ["ttl", "checksum", "vrid", "truncated"] {
        let line = format!("flotilla_ha_dropped_total{{reason=\"{reason}\"}} 20");
        assert!(m.contains(&line), "{line} in\n{m}");
    }
    assert!(m.contains("flotilla_ha_state{state=\"master\"} 1"));
}

#[test]
fn with_unicast_peers_a_valid_advert_from_anyone_else_is_dropped_and_counted() {
    use flotilla_ha::codec::{Advert, ChecksumMode};
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let p = Pair::new(71);
    let peer = p.lan.addr("lb2");
    let _lb1 = p.start_lb("lb1", 150, &format!("unicast_peers = [\"{peer}\"]"));
    p.wait_state("lb1", "master", Duration::from_secs(5));
    let me = p.lan.addr("client");
    let lb1 = p.lan.addr("lb1");
    let vip = p.vip();
    p.lan
        .run_in("client", move || {
            let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(112))).unwrap();
            s.set_ttl_v4(255).unwrap();
            let to = SockAddr::from(SocketAddr::from((lb1, 0)));
            // Well formed, right router, higher priority, sent straight to lb1: only its
            // source is wrong.
            let advert = Advert {
                vrid: 51,
                priority: 254,
                interval_cs: 10,
                addrs: vec![vip],
            }
            .encode(me.into(), lb1.into(), ChecksumMode::PseudoHeader);
            for _ in 0..20 {
                s.send_to(&advert, &to).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(p.state("lb1"), "master", "an outsider took over");
    let m = p.metrics("lb1");
    let line = "flotilla_ha_dropped_total{reason=\"source\"} 20";
    assert!(m.contains(line), "{line} in\n{m}");
}

fn keepalived(p: &Pair, node: &str, priority: u8, extra: &str) -> Child {
    let conf = format!(
        r#"
global_defs {{
    vrrp_version 3
    script_user root
    enable_script_security
}}
vrrp_instance VI {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int 0.1
    {extra}
    virtual_ipaddress {{
        {vip}/24
    }}
}}
"#,
        vip = p.vip()
    );
    let path = p.dir.path().join(format!("keepalived-{node}.conf"));
    std::fs::write(&path, conf).unwrap();
    let pid = p.dir.path().join(format!("keepalived-{node}.pid"));
    let vpid = p.dir.path().join(format!("keepalived-vrrp-{node}.pid"));
    p.lan
        .command(node, "keepalived")
        .args(["--dont-fork", "--log-console", "--vrrp", "-f"])
        .arg(&path)
        .arg("-p")
        .arg(&pid)
        .arg("-r")
        .arg(&vpid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("keepalived (Debian package)")
}

fn kill_keepalived(p: &Pair, node: &str, mut k: Child) {
    // Keepalived runs its VRRP work in a child process: kill that one too, by its
    // pid file (a pkill would reach other tests' daemons).
    let vpid = p.dir.path().join(format!("keepalived-vrrp-{node}.pid"));
    if let Ok(pid) = std::fs::read_to_string(&vpid) {
        if let Ok(pid) = pid.trim().parse::<u32>() {
            flotilla_testkit::signal(pid, flotilla_testkit::SIGKILL);
        }
    }
    flotilla_testkit::signal(k.id(), flotilla_testkit::SIGKILL);
    let _ = k.wait();
    let _ = std::fs::remove_file(vpid);
}

fn interop(checksum_extra_flotilla: &str, checksum_extra_keepalived: &str, subnet: u8) {
    let p = Pair::new(subnet);
    if Command::new("keepalived")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("keepalived is not installed (apt-get install keepalived)");
    }
    // flotilla higher: keepalived backs off.
    let mut lb1 = p.start_lb("lb1", 150, checksum_extra_flotilla);
    p.wait_state("lb1", "master", Duration::from_secs(5));
    let k = keepalived(&p, "lb2", 100, checksum_extra_keepalived);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(p.state("lb1"), "master");
    assert!(!p.holds_vip("lb2"), "keepalived stayed backup");
    let dropped = p.metrics("lb1");
    assert!(
        !dropped.contains("flotilla_ha_dropped_total{reason=\"checksum\"}"),
        "keepalived's adverts were accepted:\n{dropped}"
    );
    // flotilla dies: keepalived takes over.
    lb1.kill();
    let t = Instant::now();
    while !p.holds_vip("lb2") {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "keepalived never took over"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // flotilla comes back with the higher priority and preempts keepalived.
    let _lb1 = p.start_lb("lb1", 150, checksum_extra_flotilla);
    p.wait_for_answer("lb1", Duration::from_secs(5));
    let t = Instant::now();
    while p.holds_vip("lb2") {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "keepalived kept the VIP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_keepalived(&p, "lb2", k);

    // Keepalived higher: flotilla backs off, and takes over when it dies.
    let k = keepalived(&p, "lb2", 200, checksum_extra_keepalived);
    p.wait_state("lb1", "backup", Duration::from_secs(3));
    let t = Instant::now();
    while !p.holds_vip("lb2") {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "keepalived never took the VIP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!p.holds_vip("lb1"), "flotilla released the VIP");
    kill_keepalived(&p, "lb2", k);
    p.wait_state("lb1", "master", Duration::from_secs(3));
}

#[test]
fn keepalived_and_flotilla_share_a_virtual_router_by_multicast() {
    interop("", "", 67);
}

#[test]
fn keepalived_and_flotilla_share_a_virtual_router_by_unicast_with_old_checksums() {
    // Keepalived's `old_unicast_checksum`: the pseudo-header names the group even for
    // unicast; flotilla sends the same and detects it on receive.
    interop(
        "unicast_peers = [\"198.18.68.2\"]\nchecksum = \"pseudo-header-group\"",
        "unicast_peer {\n        198.18.68.1\n    }\n    old_unicast_checksum",
        68,
    );
}
