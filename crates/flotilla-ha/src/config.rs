//! `[ha]` in the lb config: one VRRPv3 virtual router.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_core::FieldError;
use serde::{Deserialize, Serialize};

use crate::codec::ChecksumMode;

/// `[ha]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// Interface the adverts go out of and the VIPs are added to.
    pub interface: String,
    /// Virtual router id, 1..=255; both peers use the same.
    pub virtual_router_id: u8,
    /// 1..=254, or 255 for the address owner. Higher wins.
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// Advert interval; centisecond resolution, 10 ms to 40.95 s.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub advert_interval: Duration,
    /// Virtual addresses with their prefix, e.g. `198.18.0.100/24`; all IPv4 or all
    /// IPv6 (one virtual router per address family, as RFC 9568 has it).
    pub virtual_ips: Vec<String>,
    /// Take over from a lower-priority master.
    #[serde(default = "yes")]
    pub preempt: bool,
    /// After start, wait this long before preempting.
    #[serde(default, with = "humantime_serde")]
    pub preempt_delay: Duration,
    /// Peers to send adverts to by unicast; empty: multicast to 224.0.0.18 (ff02::12).
    /// When set, adverts from any other source are dropped (and counted as `source`).
    #[serde(default)]
    pub unicast_peers: Vec<IpAddr>,
    /// With multicast: the only sources whose adverts count; empty: any on the link.
    #[serde(default)]
    pub allowed_sources: Vec<IpAddr>,
    /// Checksum convention of the adverts we send. Received adverts are accepted in
    /// either convention unless `strict_checksum`.
    #[serde(default = "default_checksum")]
    pub checksum: ChecksumMode,
    /// Accept only adverts in our own checksum convention.
    #[serde(default)]
    pub strict_checksum: bool,
    /// Health tracking that lowers our priority.
    #[serde(default)]
    pub track: TrackConfig,
    /// Script run on every state change with the new state as its argument.
    #[serde(default)]
    pub notify: Option<PathBuf>,
    /// Gratuitous ARP bursts after taking over.
    #[serde(default = "default_garp_repeat")]
    pub garp_repeat: u32,
    /// Time between those bursts.
    #[serde(default = "default_garp_interval", with = "humantime_serde")]
    pub garp_interval: Duration,
    /// Run the router on a real-time (SCHED_FIFO) thread so a busy host cannot delay
    /// adverts into a false failover. Falls back to a normal thread if not allowed.
    #[serde(default = "yes")]
    pub realtime: bool,
    /// Start a crash guard (`flotilla ha-guard`) that hands the VIP over at once if the
    /// lb process dies while master.
    #[serde(default = "yes")]
    pub guard: bool,
}

/// `track = { ... }`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackConfig {
    /// Lower the priority when a listener is not serving.
    pub listeners: bool,
    /// Lower the priority when any listener has fewer available backends than this.
    pub min_healthy_backends: usize,
    /// How much lower (the effective priority never drops below 1).
    pub penalty: u8,
}

impl Default for TrackConfig {
    fn default() -> Self {
        TrackConfig {
            listeners: true,
            min_healthy_backends: 1,
            penalty: 100,
        }
    }
}

fn default_priority() -> u8 {
    100
}
fn default_interval() -> Duration {
    Duration::from_millis(100)
}
fn yes() -> bool {
    true
}
fn default_checksum() -> ChecksumMode {
    ChecksumMode::PseudoHeader
}
fn default_garp_repeat() -> u32 {
    3
}
fn default_garp_interval() -> Duration {
    Duration::from_millis(100)
}

/// A virtual address and its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vip {
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
}

impl HaConfig {
    /// Whether an advert from `src` may count: from a unicast peer when peers are set,
    /// else from an allowed source when those are set, else from anyone on the link.
    pub fn accepts_source(&self, src: IpAddr) -> bool {
        if !self.unicast_peers.is_empty() {
            self.unicast_peers.contains(&src)
        } else if !self.allowed_sources.is_empty() {
            self.allowed_sources.contains(&src)
        } else {
            true
        }
    }

    /// Checks every field; errors name it as `ha.FIELD`.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.interface.is_empty() || self.interface.len() > 15 {
            return Err(FieldError::new(
                "ha.interface",
                format!("{:?} is not an interface name", self.interface),
            ));
        }
        if self.virtual_router_id == 0 {
            return Err(FieldError::new("ha.virtual_router_id", "must be 1..=255"));
        }
        if self.priority == 0 {
            return Err(FieldError::new(
                "ha.priority",
                "must be 1..=255 (0 is reserved for a master that stops)",
            ));
        }
        let cs = self.advert_interval.as_millis() / 10;
        if !(1..=4095).contains(&cs) || !self.advert_interval.as_millis().is_multiple_of(10) {
            return Err(FieldError::new(
                "ha.advert_interval",
                format!(
                    "{:?} must be a multiple of 10ms between 10ms and 40.95s",
                    self.advert_interval
                ),
            ));
        }
        if self.virtual_ips.is_empty() {
            return Err(FieldError::new("ha.virtual_ips", "at least one is needed"));
        }
        let mut v6 = None;
        for (i, v) in self.virtual_ips.iter().enumerate() {
            let field = format!("ha.virtual_ips[{i}]");
            let vip = parse_vip(v).map_err(|m| FieldError::new(&field, m))?;
            if *v6.get_or_insert(vip.addr.is_ipv6()) != vip.addr.is_ipv6() {
                return Err(FieldError::new(
                    field,
                    format!("{v:?}: IPv4 and IPv6 VIPs need two virtual routers (two lbs' [ha] on different ids are not supported in one config yet)"),
                ));
            }
        }
        for (i, p) in self.unicast_peers.iter().enumerate() {
            if Some(p.is_ipv6()) != v6 {
                return Err(FieldError::new(
                    format!("ha.unicast_peers[{i}]"),
                    format!("{p} is not of the VIPs' address family"),
                ));
            }
        }
        if self.garp_repeat == 0 || self.garp_repeat > 100 {
            return Err(FieldError::new("ha.garp_repeat", "must be 1..=100"));
        }
        Ok(())
    }

    /// The parsed virtual addresses (after `validate`).
    pub fn vips(&self) -> Vec<Vip> {
        self.virtual_ips
            .iter()
            .filter_map(|v| parse_vip(v).ok())
            .collect()
    }

    /// True if the VIPs are IPv6.
    pub fn is_ipv6(&self) -> bool {
        self.vips().first().is_some_and(|v| v.addr.is_ipv6())
    }

    /// The advert interval in centiseconds.
    pub fn interval_cs(&self) -> u16 {
        (self.advert_interval.as_millis() / 10) as u16
    }
}

/// Parses `ADDRESS/len` (a bare address means /32 or /128).
pub fn parse_vip(s: &str) -> Result<Vip, String> {
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = match p {
        None => max,
        Some(p) => p
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: prefix {p:?} is not 0..={max}"))?,
    };
    Ok(Vip { addr, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::Ipv4Addr;

    fn base() -> HaConfig {
        serde_json::from_value(serde_json::json!({
            "interface": "eth0", "virtual_router_id": 51, "virtual_ips": ["198.18.0.100/24"],
            "advert_interval": "100ms"
        }))
        .unwrap()
    }

    #[test]
    fn advert_sources_follow_unicast_peers_then_allowed_sources() {
        let mut c = base();
        let (a, b): (IpAddr, IpAddr) =
            ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap());
        assert!(c.accepts_source(a));
        c.allowed_sources = vec![a];
        assert!(c.accepts_source(a) && !c.accepts_source(b));
        c.unicast_peers = vec![b];
        assert!(!c.accepts_source(a) && c.accepts_source(b));
    }

    #[test]
    fn defaults_and_errors_name_the_field() {
        let c = base();
        c.validate().unwrap();
        assert_eq!(c.priority, 100);
        assert!(c.preempt);
        assert_eq!(c.interval_cs(), 10);
        assert_eq!(
            c.vips(),
            vec![Vip {
                addr: Ipv4Addr::new(198, 18, 0, 100).into(),
                prefix: 24
            }]
        );
        let mut c = base();
        c.advert_interval = Duration::from_millis(105);
        assert_eq!(c.validate().unwrap_err().field, "ha.advert_interval");
        let mut c = base();
        c.virtual_ips = vec!["198.18.0.1/24".into(), "nope/24".into()];
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "ha.virtual_ips[1]");
        assert!(e.message.contains("nope"));
        let mut c = base();
        c.virtual_ips = vec!["198.18.0.1/24".into(), "fd00::1/64".into()];
        assert_eq!(c.validate().unwrap_err().field, "ha.virtual_ips[1]");
        let mut c = base();
        c.virtual_ips = vec!["fd00::1/129".into()];
        assert!(c.validate().unwrap_err().message.contains("0..=128"));
        let mut c = base();
        c.virtual_ips = vec!["fd00::1".into()];
        c.validate().unwrap();
        assert!(c.is_ipv6());
        assert_eq!(c.vips()[0].prefix, 128);
        let mut c = base();
        c.priority = 0;
        assert_eq!(c.validate().unwrap_err().field, "ha.priority");
        let mut c = base();
        c.virtual_router_id = 0;
        assert_eq!(c.validate().unwrap_err().field, "ha.virtual_router_id");
    }
}
