//! The VRRPv3 state machine (RFC 9568 §6.4), pure: inputs and the time in, actions
//! out. No clock, no socket, no address is touched here, so every transition is tested
//! with injected instants and a two-router simulation runs thousands of schedules.

use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Where the router stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not running (before start, after stop).
    Init,
    /// Listening to a master; takes over when it falls silent.
    Backup,
    /// Owns the virtual addresses and advertises.
    Master,
    /// The interface is down: holds nothing, sends nothing, until it comes back.
    Fault,
}

impl State {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            State::Init => "init",
            State::Backup => "backup",
            State::Master => "master",
            State::Fault => "fault",
        }
    }
}

/// Settings of one virtual router.
#[derive(Debug, Clone)]
pub struct Params {
    /// Configured priority, 1..=255 (255: address owner).
    pub priority: u8,
    /// Advert interval (centisecond resolution on the wire).
    pub interval: Duration,
    /// Take over from a lower-priority master.
    pub preempt: bool,
    /// After start, wait this long before preempting.
    pub preempt_delay: Duration,
    /// Our primary address: breaks ties between equal priorities.
    pub addr: IpAddr,
    /// Gratuitous ARP bursts after taking over (the first included).
    pub garp_repeat: u32,
    /// Time between those bursts.
    pub garp_interval: Duration,
}

/// What happened to make the machine act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Start the router.
    Startup,
    /// Stop it (graceful: a master hands over with a priority-0 advert).
    Shutdown,
    /// A valid advert for our virtual router arrived.
    Advert {
        /// Sender's primary address.
        src: IpAddr,
        /// Sender's priority.
        priority: u8,
        /// Sender's advert interval.
        interval: Duration,
    },
    /// Time passed; due timers fire.
    Tick,
    /// Tracked health changed our effective priority.
    SetPriority(u8),
    /// The interface lost its link: a router that cannot be heard must not claim the
    /// VIP (it would come back as a second master).
    LinkDown,
    /// The link is back: start over as backup.
    LinkUp,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send an advert with this priority.
    Send {
        /// Priority to advertise.
        priority: u8,
    },
    /// Add the virtual addresses.
    TakeVip,
    /// Remove the virtual addresses.
    ReleaseVip,
    /// Announce the virtual addresses (gratuitous ARP).
    Garp,
    /// The state changed.
    Transition {
        /// Old state.
        from: State,
        /// New state.
        to: State,
        /// Why, for logs and metrics.
        reason: &'static str,
    },
}

/// One virtual router.
#[derive(Debug, Clone)]
pub struct Machine {
    params: Params,
    state: State,
    priority: u8,
    master_interval: Duration,
    master_down_at: Option<Instant>,
    advert_at: Option<Instant>,
    garp_at: Option<Instant>,
    garps_left: u32,
    started_at: Option<Instant>,
    master: Option<IpAddr>,
}

impl Machine {
    /// A machine in `Init`.
    pub fn new(params: Params) -> Self {
        Machine {
            priority: params.priority,
            master_interval: params.interval,
            params,
            state: State::Init,
            master_down_at: None,
            advert_at: None,
            garp_at: None,
            garps_left: 0,
            started_at: None,
            master: None,
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Effective priority (configured, lowered by tracking).
    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// The master we last heard (or ourselves).
    pub fn master(&self) -> Option<IpAddr> {
        self.master
    }

    /// `(256 − priority) × master interval / 256`: lower priorities wait longer, so
    /// the best backup speaks first.
    pub fn skew(&self) -> Duration {
        self.master_interval * (256 - u32::from(self.priority)) / 256
    }

    /// `3 × master interval + skew`: silence after which a backup takes over.
    pub fn master_down_interval(&self) -> Duration {
        self.master_interval * 3 + self.skew()
    }

    /// The next instant at which `Tick` has work to do.
    pub fn deadline(&self) -> Option<Instant> {
        [self.master_down_at, self.advert_at, self.garp_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Feeds one input at `now`.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Startup if self.state == State::Init => {
                self.started_at = Some(now);
                self.master_interval = self.params.interval;
                if self.priority == 255 {
                    self.become_master(now, "address owner", &mut out);
                } else {
                    self.become_backup(now, "startup", &mut out);
                }
            }
            Input::Startup => {}
            Input::Shutdown => {
                if self.state == State::Master {
                    out.push(Action::Send { priority: 0 });
                    out.push(Action::ReleaseVip);
                }
                if self.state != State::Init {
                    out.push(Action::Transition {
                        from: self.state,
                        to: State::Init,
                        reason: "shutdown",
                    });
                }
                self.state = State::Init;
                self.master_down_at = None;
                self.advert_at = None;
                self.garp_at = None;
                self.master = None;
            }
            Input::Tick => self.tick(now, &mut out),
            Input::LinkDown if matches!(self.state, State::Backup | State::Master) => {
                if self.state == State::Master {
                    out.push(Action::ReleaseVip);
                }
                out.push(Action::Transition {
                    from: self.state,
                    to: State::Fault,
                    reason: "link down",
                });
                self.state = State::Fault;
                self.master_down_at = None;
                self.advert_at = None;
                self.garp_at = None;
                self.master = None;
            }
            Input::LinkDown => {}
            Input::LinkUp if self.state == State::Fault => {
                self.master_interval = self.params.interval;
                self.become_backup(now, "link up", &mut out);
            }
            Input::LinkUp => {}
            Input::SetPriority(p) => {
                let p = p.max(1);
                if p != self.priority {
                    self.priority = p;
                    if self.state == State::Master {
                        // Tell the peer now, so a better backup preempts without
                        // waiting for the next interval.
                        out.push(Action::Send { priority: p });
                        self.advert_at = Some(now + self.params.interval);
                    }
                }
            }
            Input::Advert {
                src,
                priority,
                interval,
            } => self.advert(src, priority, interval, now, &mut out),
        }
        out
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.garp_at.is_some_and(|t| t <= now) {
            out.push(Action::Garp);
            self.garps_left = self.garps_left.saturating_sub(1);
            self.garp_at = (self.garps_left > 0).then(|| now + self.params.garp_interval);
        }
        match self.state {
            State::Backup if self.master_down_at.is_some_and(|t| t <= now) => {
                self.become_master(now, "master down", out);
            }
            State::Master if self.advert_at.is_some_and(|t| t <= now) => {
                out.push(Action::Send {
                    priority: self.priority,
                });
                self.advert_at = Some(now + self.params.interval);
            }
            _ => {}
        }
    }

    fn advert(
        &mut self,
        src: IpAddr,
        priority: u8,
        interval: Duration,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        match self.state {
            State::Init | State::Fault => {}
            State::Backup => {
                if priority == 0 {
                    // The master is stepping down: take over after the skew only.
                    self.master_down_at = Some(now + self.skew());
                    return;
                }
                let in_delay = self
                    .started_at
                    .is_some_and(|t| now < t + self.params.preempt_delay);
                if !self.params.preempt || priority >= self.priority || in_delay {
                    self.master_interval = interval;
                    self.master_down_at = Some(now + self.master_down_interval());
                    self.master = Some(src);
                }
                // Else: a lower-priority master and we preempt; let the timer run out.
            }
            State::Master => {
                if priority == 0 {
                    // Another master is letting go (stopping, or stepping down after a
                    // split brain): answer at once, and announce the VIP again for
                    // the clients that followed it.
                    out.push(Action::Send {
                        priority: self.priority,
                    });
                    out.push(Action::Garp);
                    self.advert_at = Some(now + self.params.interval);
                    self.garps_left = self.params.garp_repeat.saturating_sub(1);
                    self.garp_at = (self.garps_left > 0).then(|| now + self.params.garp_interval);
                } else if priority > self.priority
                    || (priority == self.priority && src > self.params.addr)
                {
                    self.master_interval = interval;
                    out.push(Action::ReleaseVip);
                    // Say we let go: the winner may never have heard us (it spoke
                    // first) and must re-announce the VIP to our clients.
                    out.push(Action::Send { priority: 0 });
                    self.state = State::Backup;
                    self.advert_at = None;
                    self.garp_at = None;
                    self.master = Some(src);
                    self.master_down_at = Some(now + self.master_down_interval());
                    out.push(Action::Transition {
                        from: State::Master,
                        to: State::Backup,
                        reason: "higher priority master",
                    });
                }
                // Else: a lower master will hear us and step down.
            }
        }
    }

    fn become_master(&mut self, now: Instant, reason: &'static str, out: &mut Vec<Action>) {
        // The VIP is up and announced before the peer hears us: a master handing over
        // gracefully lets go when it hears us, and clients must already be coming.
        out.push(Action::TakeVip);
        out.push(Action::Garp);
        out.push(Action::Send {
            priority: self.priority,
        });
        out.push(Action::Transition {
            from: self.state,
            to: State::Master,
            reason,
        });
        self.state = State::Master;
        self.master = Some(self.params.addr);
        self.master_down_at = None;
        self.advert_at = Some(now + self.params.interval);
        self.garps_left = self.params.garp_repeat.saturating_sub(1);
        self.garp_at = (self.garps_left > 0).then(|| now + self.params.garp_interval);
    }

    fn become_backup(&mut self, now: Instant, reason: &'static str, out: &mut Vec<Action>) {
        out.push(Action::Transition {
            from: self.state,
            to: State::Backup,
            reason,
        });
        self.state = State::Backup;
        self.advert_at = None;
        self.master_down_at = Some(now + self.master_down_interval());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const MS: Duration = Duration::from_millis(1);

    fn params(priority: u8, last_octet: u8) -> Params {
        Params {
            priority,
            interval: 100 * MS,
            preempt: true,
            preempt_delay: Duration::ZERO,
            addr: Ipv4Addr::new(198, 18, 0, last_octet).into(),
            garp_repeat: 3,
            garp_interval: 100 * MS,
        }
    }

    fn advert(priority: u8) -> Input {
        Input::Advert {
            src: Ipv4Addr::new(198, 18, 0, 9).into(),
            priority,
            interval: 100 * MS,
        }
    }

    fn became(actions: &[Action], to: State) -> bool {
        actions
            .iter()
            .any(|a| matches!(a, Action::Transition { to: t, .. } if *t == to))
    }

    #[test]
    fn a_silent_network_makes_a_backup_master_after_the_master_down_interval() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, 1));
        let a = m.handle(Input::Startup, t0);
        assert!(became(&a, State::Backup));
        // 3 × 100 ms + (256 − 100) × 100 ms / 256 = 360.9 ms.
        assert_eq!(m.master_down_interval(), Duration::from_nanos(360_937_500));
        let due = m.deadline().unwrap();
        assert_eq!(due - t0, m.master_down_interval());
        assert!(m.handle(Input::Tick, due - MS).is_empty());
        let a = m.handle(Input::Tick, due);
        assert_eq!(
            &a[..3],
            &[
                Action::TakeVip,
                Action::Garp,
                Action::Send { priority: 100 },
            ]
        );
        assert_eq!(m.state(), State::Master);
    }

    #[test]
    fn the_address_owner_is_master_at_once() {
        let mut m = Machine::new(params(255, 1));
        assert!(became(
            &m.handle(Input::Startup, Instant::now()),
            State::Master
        ));
    }

    #[test]
    fn a_master_advertises_every_interval_and_repeats_garp() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(255, 1));
        m.handle(Input::Startup, t0);
        let mut sends = 0;
        let mut garps = 1;
        let mut t = t0;
        while let Some(d) = m.deadline() {
            if d > t0 + 1000 * MS {
                break;
            }
            t = d;
            for a in m.handle(Input::Tick, t) {
                match a {
                    Action::Send { .. } => sends += 1,
                    Action::Garp => garps += 1,
                    _ => {}
                }
            }
        }
        assert_eq!(sends, 10, "one advert per 100 ms over 1 s");
        assert_eq!(garps, 3);
        assert!(t <= t0 + 1000 * MS);
    }

    #[test]
    fn backups_follow_higher_or_equal_masters_and_preempt_lower_ones() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, 1));
        m.handle(Input::Startup, t0);
        // A higher master keeps pushing the takeover back.
        for i in 1..20 {
            m.handle(advert(200), t0 + i * 100 * MS);
            m.handle(Input::Tick, t0 + i * 100 * MS);
            assert_eq!(m.state(), State::Backup);
        }
        // A lower one is ignored: the timer runs out and we take over.
        let t1 = t0 + 2000 * MS;
        let mut t = t1;
        while m.state() == State::Backup {
            m.handle(advert(50), t);
            m.handle(Input::Tick, t);
            t += 10 * MS;
            assert!(
                t < t1 + 500 * MS,
                "preempted within the master-down interval"
            );
        }
        // Without preemption the lower master is followed.
        let mut p = params(100, 1);
        p.preempt = false;
        let mut m = Machine::new(p);
        m.handle(Input::Startup, t0);
        for i in 1..20 {
            m.handle(advert(50), t0 + i * 100 * MS);
            m.handle(Input::Tick, t0 + i * 100 * MS);
        }
        assert_eq!(m.state(), State::Backup);
    }

    #[test]
    fn preempt_delay_holds_off_preemption_after_start() {
        let t0 = Instant::now();
        let mut p = params(100, 1);
        p.preempt_delay = 1000 * MS;
        let mut m = Machine::new(p);
        m.handle(Input::Startup, t0);
        let mut t = t0;
        while m.state() == State::Backup && t < t0 + 3000 * MS {
            m.handle(advert(50), t);
            m.handle(Input::Tick, t);
            t += 100 * MS;
        }
        assert_eq!(m.state(), State::Master);
        assert!(t > t0 + 1000 * MS, "not before the delay: {:?}", t - t0);
        assert!(t < t0 + 1500 * MS, "soon after it: {:?}", t - t0);
    }

    #[test]
    fn a_master_yields_to_higher_priority_and_to_a_higher_address_on_a_tie() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(255, 1));
        m.handle(Input::Startup, t0);
        m.handle(Input::SetPriority(100), t0);
        assert!(m.handle(advert(99), t0).is_empty(), "lower: ignored");
        let a = m.handle(advert(100), t0); // tie, sender 198.18.0.9 > 198.18.0.1
        assert_eq!(a[0], Action::ReleaseVip);
        assert_eq!(a[1], Action::Send { priority: 0 }, "tells the winner");
        assert_eq!(m.state(), State::Backup);

        let mut m = Machine::new(params(255, 10));
        m.handle(Input::Startup, t0);
        m.handle(Input::SetPriority(100), t0);
        assert!(
            m.handle(advert(100), t0).is_empty(),
            "tie, our address is higher"
        );
        assert_eq!(m.state(), State::Master);
    }

    #[test]
    fn a_graceful_stop_hands_over_after_the_skew_only() {
        let t0 = Instant::now();
        let mut master = Machine::new(params(255, 1));
        master.handle(Input::Startup, t0);
        let a = master.handle(Input::Shutdown, t0 + 50 * MS);
        assert_eq!(a[0], Action::Send { priority: 0 });
        assert_eq!(a[1], Action::ReleaseVip);
        assert_eq!(master.state(), State::Init);
        assert_eq!(master.deadline(), None);

        let mut backup = Machine::new(params(100, 2));
        backup.handle(Input::Startup, t0);
        backup.handle(advert(200), t0 + 10 * MS);
        backup.handle(advert(0), t0 + 50 * MS);
        let due = backup.deadline().unwrap();
        assert_eq!(due - (t0 + 50 * MS), backup.skew());
        assert!(backup.skew() < 100 * MS);
        assert!(became(&backup.handle(Input::Tick, due), State::Master));
    }

    #[test]
    fn a_master_answers_a_priority_zero_advert_at_once() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(255, 1));
        m.handle(Input::Startup, t0);
        assert_eq!(
            m.handle(advert(0), t0 + 10 * MS),
            vec![Action::Send { priority: 255 }, Action::Garp]
        );
    }

    #[test]
    fn lowering_priority_is_advertised_immediately_and_never_reaches_zero() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(255, 1));
        m.handle(Input::Startup, t0);
        assert_eq!(
            m.handle(Input::SetPriority(0), t0),
            vec![Action::Send { priority: 1 }]
        );
        assert_eq!(m.priority(), 1);
        assert!(m.handle(Input::SetPriority(1), t0).is_empty());
    }

    #[test]
    fn a_lost_link_releases_the_vip_and_a_restored_one_starts_as_backup() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(255, 1));
        m.handle(Input::Startup, t0);
        let a = m.handle(Input::LinkDown, t0 + MS);
        assert_eq!(a[0], Action::ReleaseVip);
        assert_eq!(m.state(), State::Fault);
        assert_eq!(m.deadline(), None, "no adverts, no takeover while down");
        assert!(m.handle(advert(10), t0 + 2 * MS).is_empty());
        assert!(became(&m.handle(Input::LinkUp, t0 + 3 * MS), State::Backup));
        assert!(m.deadline().is_some());
    }

    /// Two routers on a link that can be cut; adverts arrive at once while it is up.
    fn simulate(
        p1: u8,
        p2: u8,
        preempt: bool,
        start2_ms: u64,
        cut: (u64, u64),
        horizon_ms: u64,
    ) -> (Vec<Machine>, Vec<(u64, usize)>) {
        let t0 = Instant::now();
        let mut routers = vec![Machine::new(params(p1, 1)), Machine::new(params(p2, 2))];
        for r in &mut routers {
            r.params.preempt = preempt;
        }
        let mut masters_over_time = Vec::new();
        let mut started = [false, false];
        let step = MS;
        let mut t = t0;
        while t <= t0 + Duration::from_millis(horizon_ms) {
            let ms = (t - t0).as_millis() as u64;
            let link_up = !(cut.0..cut.1).contains(&ms);
            for i in 0..2 {
                let start_at = if i == 0 { 0 } else { start2_ms };
                if !started[i] && ms >= start_at {
                    started[i] = true;
                    let acts = routers[i].handle(Input::Startup, t);
                    deliver(&mut routers, i, acts, t, link_up);
                }
                if routers[i].deadline().is_some_and(|d| d <= t) {
                    let acts = routers[i].handle(Input::Tick, t);
                    deliver(&mut routers, i, acts, t, link_up);
                }
            }
            let masters = routers
                .iter()
                .filter(|r| r.state() == State::Master)
                .count();
            masters_over_time.push((ms, masters));
            t += step;
        }
        (routers, masters_over_time)
    }

    fn deliver(routers: &mut [Machine], from: usize, acts: Vec<Action>, t: Instant, up: bool) {
        let src = routers[from].params.addr;
        let interval = routers[from].params.interval;
        for a in acts {
            if let (Action::Send { priority }, true) = (a, up) {
                let to = 1 - from;
                let back = routers[to].handle(
                    Input::Advert {
                        src,
                        priority,
                        interval,
                    },
                    t,
                );
                deliver(routers, to, back, t, up);
            }
        }
    }

    #[test]
    fn equal_priorities_started_together_end_with_one_master() {
        // Both time out at the same instant; the one that speaks first is followed.
        let (r, masters) = simulate(90, 90, true, 0, (0, 0), 2000);
        assert_eq!(masters.last().unwrap().1, 1);
        assert_eq!(r.iter().filter(|m| m.state() == State::Master).count(), 1);
    }

    #[test]
    fn two_routers_settle_on_the_higher_priority() {
        let (r, _) = simulate(100, 200, true, 50, (0, 0), 2000);
        assert_eq!(r[0].state(), State::Backup);
        assert_eq!(r[1].state(), State::Master);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// After any partition heals, within two master-down intervals there is exactly
        /// one master, and with preemption it is the higher priority (or higher address).
        #[test]
        fn exactly_one_master_after_heal(p1 in 1u8..255, p2 in 1u8..255, preempt: bool,
                                         start2 in 0u64..1000, cut_at in 0u64..1500,
                                         cut_len in 0u64..2000) {
            let heal = cut_at + cut_len;
            // Both routers must have started and had time to act: a router started late
            // takes over a master-down interval (≤ 400 ms here) after its start, which
            // may be after the heal (start2 = 866 with no cut once ended the run first).
            let horizon = heal.max(start2) + 1200;
            let (r, masters) = simulate(p1, p2, preempt, start2, (cut_at, heal), horizon);
            for (ms, n) in &masters {
                if *ms > heal + 800 {
                    prop_assert_eq!(*n, 1, "at {} ms", ms);
                }
            }
            // With preemption the higher priority wins. (On equal priorities a backup
            // follows whoever spoke first, as RFC 9568 says; the address breaks ties
            // between two masters only, so either may end up master.)
            if preempt && p1 != p2 {
                let winner = usize::from(p2 > p1);
                prop_assert_eq!(r[winner].state(), State::Master);
            }
        }
    }
}
