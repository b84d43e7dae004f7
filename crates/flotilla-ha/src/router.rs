//! Drives one virtual router: the pure [`Machine`] fed by the socket, the clock and the
//! tracked health, its actions carried out on the host.
//!
//! The router runs on a thread of its own with its own single-threaded runtime, raised
//! to SCHED_FIFO when allowed: a proxy saturating every core must not delay an advert
//! into a false failover (Keepalived's "timer expired" flapping under load).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use crate::codec::{group_of, Advert};
use crate::config::{HaConfig, Vip};
use crate::machine::{Action, Input, Machine, Params, State};
use crate::net::{gratuitous_arp, unsolicited_na, Interface, VrrpSocket};
use crate::vip::VipControl;

/// What the router is doing, for `/status` and `/metrics`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Current state.
    pub state: State,
    /// Effective priority.
    pub priority: u8,
    /// Master we last heard (or ourselves).
    pub master: Option<IpAddr>,
    /// Our address on the interface.
    pub addr: Option<IpAddr>,
    /// State changes so far.
    pub transitions: u64,
    /// Adverts sent.
    pub adverts_sent: u64,
    /// Valid adverts received.
    pub adverts_received: u64,
    /// Packets dropped, by reason.
    pub dropped: BTreeMap<&'static str, u64>,
    /// Tracked health is good.
    pub healthy: bool,
    /// Last error carrying out an action.
    pub last_error: Option<String>,
    /// The latest state changes, oldest first (at most [`HISTORY`]): when, and to what.
    pub history: Vec<Transition>,
}

/// How many state changes [`Status::history`] keeps.
pub const HISTORY: usize = 10;

/// One state change, for operators (the dashboard's lb page).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Transition {
    /// Wall-clock time, ms since the Unix epoch.
    pub at_ms: u64,
    /// The state before.
    pub from: State,
    /// The state entered.
    pub to: State,
    /// Why (the machine's reason).
    pub reason: String,
}

/// A running virtual router; stopping it (or dropping it) hands over gracefully.
pub struct Router {
    status: Arc<Mutex<Status>>,
    health: watch::Sender<bool>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Router {
    /// Opens the interface and sockets and starts the router; errors (no such
    /// interface, no permission for raw sockets) come back before anything is sent.
    pub fn start(cfg: HaConfig) -> std::io::Result<Router> {
        let status = Arc::new(Mutex::new(Status {
            state: State::Init,
            priority: cfg.priority,
            master: None,
            addr: None,
            transitions: 0,
            adverts_sent: 0,
            adverts_received: 0,
            dropped: BTreeMap::new(),
            healthy: true,
            last_error: None,
            history: Vec::new(),
        }));
        let (health, health_rx) = watch::channel(true);
        let (stop, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let st = status.clone();
        let thread = std::thread::Builder::new()
            .name("flotilla-vrrp".into())
            .spawn(move || {
                if cfg.realtime {
                    raise_to_realtime();
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let setup = (|| {
                        let iface = Interface::lookup(&cfg.interface, cfg.is_ipv6())?;
                        let sock = VrrpSocket::open(&iface)?;
                        let vip = VipControl::open(iface.index)?;
                        Ok::<_, std::io::Error>((iface, sock, vip))
                    })();
                    match setup {
                        Ok((iface, sock, vip)) => {
                            let _ = ready_tx.send(Ok(()));
                            let mut driver = Driver {
                                cfg,
                                vips: Vec::new(),
                                iface,
                                sock,
                                vip,
                                status: st,
                            };
                            driver.vips = driver.cfg.vips();
                            driver.run(health_rx, stop_rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Router {
                status,
                health,
                stop: Mutex::new(Some(stop)),
                thread: Mutex::new(Some(thread)),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(std::io::Error::other("the VRRP thread died while starting")),
        }
    }

    /// A snapshot of the router's status.
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reports tracked health; unhealthy lowers the priority by `track.penalty`.
    pub fn set_healthy(&self, healthy: bool) {
        self.health
            .send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
    }

    /// Graceful stop: a master sends a priority-0 advert and removes the VIPs. Waits
    /// for that (milliseconds); later calls do nothing.
    pub fn shutdown(&self) {
        if let Some(s) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = s.send(());
        }
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// True if `iface` has carrier (reading fails for an interface that is down).
fn carrier(iface: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/carrier"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

fn raise_to_realtime() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: plain syscall on the calling thread with a valid parameter.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if r != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "VRRP thread stays at normal priority");
    }
}

struct Driver {
    cfg: HaConfig,
    vips: Vec<Vip>,
    iface: Interface,
    sock: VrrpSocket,
    vip: VipControl,
    status: Arc<Mutex<Status>>,
}

impl Driver {
    fn with_status(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    async fn run(&mut self, mut health: watch::Receiver<bool>, mut stop: oneshot::Receiver<()>) {
        let mut machine = Machine::new(Params {
            priority: self.cfg.priority,
            interval: self.cfg.advert_interval,
            preempt: self.cfg.preempt,
            preempt_delay: self.cfg.preempt_delay,
            addr: self.iface.addr,
            garp_repeat: self.cfg.garp_repeat,
            garp_interval: self.cfg.garp_interval,
        });
        let addr = self.iface.addr;
        self.with_status(|s| s.addr = Some(addr));
        tracing::info!(interface = %self.iface.name, %addr, vrid = self.cfg.virtual_router_id, priority = self.cfg.priority, "VRRP router starting");
        let accept = self.cfg.strict_checksum.then_some(self.cfg.checksum);
        // A crashed predecessor may have left the VIPs behind; a backup must not hold
        // them (its kernel would keep answering ARP for them).
        for v in &self.vips {
            if let Err(e) = self.vip.remove(*v).await {
                tracing::warn!(vip = %v.addr, error = %e, "removing a stale VIP");
            }
        }
        let acts = machine.handle(Input::Startup, Instant::now());
        self.carry_out(&machine, acts).await;
        let mut buf = vec![0u8; 2048];
        // The link is polled (a sysfs read) at twice the advert rate: cheap, and a
        // link loss is acted on well within the peer's master-down interval.
        let mut link_check = tokio::time::interval(self.cfg.advert_interval / 2);
        link_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut link_up = true;
        loop {
            let deadline = machine.deadline();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            let acts = tokio::select! {
                biased;
                _ = &mut stop => {
                    let was_master = machine.state() == State::Master;
                    let acts = machine.handle(Input::Shutdown, Instant::now());
                    // Keep the VIP (and so keep serving) until the backup has taken
                    // over: releasing first would leave clients nowhere to go for the
                    // backup's skew time.
                    let (release, rest): (Vec<Action>, Vec<Action>) =
                        acts.into_iter().partition(|a| *a == Action::ReleaseVip);
                    self.carry_out(&machine, rest).await;
                    if was_master {
                        self.await_new_master(&mut buf, accept).await;
                    }
                    self.carry_out(&machine, release).await;
                    tracing::info!("VRRP router stopped");
                    return;
                }
                r = self.sock.recv_advert(&mut buf, self.cfg.virtual_router_id, accept) => match r {
                    Ok(decoded) => match decoded {
                        Ok(rx) if rx.src == self.iface.addr => Vec::new(),
                        Ok(rx) if !self.cfg.accepts_source(rx.src) => {
                            tracing::debug!(src = %rx.src, "advert from a source not allowed dropped");
                            self.with_status(|s| *s.dropped.entry("source").or_default() += 1);
                            Vec::new()
                        }
                        Ok(rx) => {
                            self.with_status(|s| s.adverts_received += 1);
                            machine.handle(
                                Input::Advert {
                                    src: rx.src,
                                    priority: rx.advert.priority,
                                    interval: std::time::Duration::from_millis(
                                        u64::from(rx.advert.interval_cs) * 10,
                                    ),
                                },
                                Instant::now(),
                            )
                        }
                        Err(e) => {
                            tracing::debug!(reason = %e, "advert dropped");
                            self.with_status(|s| *s.dropped.entry(e.label()).or_default() += 1);
                            Vec::new()
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "receiving adverts");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        Vec::new()
                    }
                },
                Ok(()) = health.changed() => {
                    let healthy = *health.borrow_and_update();
                    let p = if healthy {
                        self.cfg.priority
                    } else {
                        self.cfg.priority.saturating_sub(self.cfg.track.penalty).max(1)
                    };
                    tracing::info!(healthy, priority = p, "tracked health changed");
                    self.with_status(|s| s.healthy = healthy);
                    machine.handle(Input::SetPriority(p), Instant::now())
                }
                _ = sleep => machine.handle(Input::Tick, Instant::now()),
                _ = link_check.tick() => {
                    let up = carrier(&self.iface.name);
                    if up == link_up {
                        Vec::new()
                    } else {
                        link_up = up;
                        tracing::warn!(interface = %self.iface.name, up, "link state changed");
                        let input = if up { Input::LinkUp } else { Input::LinkDown };
                        machine.handle(input, Instant::now())
                    }
                }
            };
            self.carry_out(&machine, acts).await;
        }
    }

    /// After our priority-0 advert: waits until another router advertises as master,
    /// at most four advert intervals (a peer that is gone will not answer).
    async fn await_new_master(
        &mut self,
        buf: &mut [u8],
        accept: Option<crate::codec::ChecksumMode>,
    ) {
        let until = tokio::time::Instant::now() + self.cfg.advert_interval * 4;
        loop {
            let r = tokio::time::timeout_at(
                until,
                self.sock
                    .recv_advert(buf, self.cfg.virtual_router_id, accept),
            )
            .await;
            let Ok(Ok(decoded)) = r else {
                tracing::info!("no new master heard; releasing the VIP anyway");
                return;
            };
            if let Ok(rx) = decoded {
                if rx.src != self.iface.addr && rx.advert.priority > 0 {
                    // One more interval with the VIP: clients whose ARP entry has not
                    // yet moved still reach us rather than nobody.
                    tokio::time::sleep(self.cfg.advert_interval).await;
                    tracing::info!(master = %rx.src, "handed over");
                    return;
                }
            }
        }
    }

    async fn carry_out(&mut self, machine: &Machine, acts: Vec<Action>) {
        for a in acts {
            let result: Result<(), String> = match a {
                Action::Send { priority } => self.send(priority).await,
                Action::TakeVip => {
                    let mut r = Ok(());
                    for v in &self.vips {
                        if let Err(e) = self.vip.add(*v).await {
                            r = Err(format!("adding {}/{}: {e}", v.addr, v.prefix));
                        }
                    }
                    r
                }
                Action::ReleaseVip => {
                    let mut r = Ok(());
                    for v in &self.vips {
                        if let Err(e) = self.vip.remove(*v).await {
                            r = Err(format!("removing {}/{}: {e}", v.addr, v.prefix));
                        }
                    }
                    r
                }
                Action::Garp => {
                    let mut r = Ok(());
                    for v in &self.vips {
                        let sent = match v.addr {
                            IpAddr::V4(a) => gratuitous_arp(&self.iface, a),
                            IpAddr::V6(a) => unsolicited_na(&self.iface, a),
                        };
                        if let Err(e) = sent {
                            r = Err(format!("announcing {}: {e}", v.addr));
                        }
                    }
                    r
                }
                Action::Transition { from, to, reason } => {
                    tracing::info!(
                        from = from.name(),
                        to = to.name(),
                        reason,
                        "VRRP state change"
                    );
                    let at_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    self.with_status(|s| {
                        s.state = to;
                        s.transitions += 1;
                        if s.history.len() == HISTORY {
                            s.history.remove(0);
                        }
                        s.history.push(Transition {
                            at_ms,
                            from,
                            to,
                            reason: reason.to_string(),
                        });
                    });
                    self.notify(to);
                    Ok(())
                }
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "VRRP action failed");
                self.with_status(|s| s.last_error = Some(e));
            }
        }
        let (prio, master) = (machine.priority(), machine.master());
        self.with_status(|s| {
            s.priority = prio;
            s.master = master;
        });
    }

    async fn send(&self, priority: u8) -> Result<(), String> {
        let advert = Advert {
            vrid: self.cfg.virtual_router_id,
            priority,
            interval_cs: self.cfg.interval_cs(),
            addrs: self.vips.iter().map(|v| v.addr).collect(),
        };
        let dsts = if self.cfg.unicast_peers.is_empty() {
            vec![group_of(self.iface.addr)]
        } else {
            self.cfg.unicast_peers.clone()
        };
        for dst in dsts {
            let msg = advert.encode(self.iface.addr, dst, self.cfg.checksum);
            self.sock
                .send(&msg, dst)
                .await
                .map_err(|e| format!("sending advert to {dst}: {e}"))?;
        }
        self.with_status(|s| s.adverts_sent += 1);
        Ok(())
    }

    fn notify(&self, state: State) {
        let Some(script) = self.cfg.notify.clone() else {
            return;
        };
        match tokio::process::Command::new(&script)
            .arg(state.name())
            .env("FLOTILLA_HA_STATE", state.name())
            .env("FLOTILLA_HA_VRID", self.cfg.virtual_router_id.to_string())
            .spawn()
        {
            // Reaped in the background; the router never waits for a script.
            Ok(mut child) => {
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
            }
            Err(e) => {
                tracing::warn!(script = %script.display(), error = %e, "notify script failed to start")
            }
        }
    }
}
