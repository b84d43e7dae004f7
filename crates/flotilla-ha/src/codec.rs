//! VRRPv3 advertisements on the wire (RFC 9568 §5), IPv4 and IPv6.
//!
//! ```text
//! | Version | Type | VRID | Priority | Count IPvX | rsvd | Max Adver Int | Checksum | addresses…
//! |   4b    |  4b  |  8b  |    8b    |     8b     |  4b  |      12b      |   16b    | 4 B each
//! ```
//!
//! The checksum covers the VRRP message and, per the RFC, an IPv4 pseudo-header
//! (source, destination, zero, protocol 112, length). Two other conventions are met in
//! the field: Keepalived before 1.3.6 (and `old_unicast_checksum` since) puts the
//! multicast group in the pseudo-header even for unicast adverts, and VRRPv2-style
//! senders (Keepalived's `v3_checksum_as_v2`) leave the pseudo-header out. The
//! receiver here accepts any of them when told to, and says which one matched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of VRRP.
pub const PROTO_VRRP: u8 = 112;
/// The IPv4 multicast group of VRRP.
pub const MULTICAST_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// The IPv6 multicast group of VRRP.
pub const MULTICAST_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);

/// The VRRP group of `addr`'s family.
pub fn group_of(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => IpAddr::V4(MULTICAST_V4),
        IpAddr::V6(_) => IpAddr::V6(MULTICAST_V6),
    }
}
/// Adverts must arrive with this TTL (RFC 9568 §7.1): proof they were not routed.
pub const REQUIRED_TTL: u8 = 255;

const HEADER: usize = 8;

/// One advertisement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// Virtual router id, 1..=255.
    pub vrid: u8,
    /// Sender's priority; 0 means "I am stopping, take over now".
    pub priority: u8,
    /// Sender's advert interval in centiseconds (12 bits).
    pub interval_cs: u16,
    /// The virtual addresses (all of the packet's family).
    pub addrs: Vec<IpAddr>,
}

/// Which checksum convention to write, and to accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumMode {
    /// RFC 9568: with the IPv4 pseudo-header.
    PseudoHeader,
    /// The pseudo-header with the VRRP group as destination whatever the real one
    /// (Keepalived's `old_unicast_checksum`).
    PseudoHeaderGroup,
    /// The VRRP message alone (VRRPv2 style).
    MessageOnly,
}

impl ChecksumMode {
    /// Every convention, the RFC's first.
    pub const ALL: [ChecksumMode; 3] = [
        ChecksumMode::PseudoHeader,
        ChecksumMode::PseudoHeaderGroup,
        ChecksumMode::MessageOnly,
    ];
}

/// Why a packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    /// Shorter than its headers or its address count says.
    #[error("truncated packet ({0} bytes)")]
    Truncated(usize),
    /// Not IP protocol 112.
    #[error("not VRRP (IP protocol {0})")]
    NotVrrp(u8),
    /// TTL (hop limit) other than 255: the packet crossed a router.
    #[error("TTL {0}, not 255")]
    Ttl(u8),
    /// VRRP version other than 3.
    #[error("VRRP version {0}, not 3")]
    Version(u8),
    /// Type other than 1 (advertisement).
    #[error("VRRP type {0}, not advertisement")]
    Type(u8),
    /// Neither checksum convention matched (or not the accepted one).
    #[error("bad checksum")]
    Checksum,
    /// For another virtual router.
    #[error("virtual router id {0} is not ours")]
    Vrid(u8),
    /// Advert interval of 0.
    #[error("advert interval 0")]
    Interval,
}

impl DropReason {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::Truncated(_) => "truncated",
            DropReason::NotVrrp(_) => "not_vrrp",
            DropReason::Ttl(_) => "ttl",
            DropReason::Version(_) => "version",
            DropReason::Type(_) => "type",
            DropReason::Checksum => "checksum",
            DropReason::Vrid(_) => "vrid",
            DropReason::Interval => "interval",
        }
    }
}

/// A received advert with what the IP header said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Source: the sender's primary (IPv4) or link-local (IPv6) address.
    pub src: IpAddr,
    /// Destination (the group or our unicast address).
    pub dst: IpAddr,
    /// The advert.
    pub advert: Advert,
    /// The checksum convention the sender used.
    pub checksum: ChecksumMode,
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The checksum of `msg` (its checksum field zeroed or not: callers decide).
pub fn checksum(msg: &[u8], src: IpAddr, dst: IpAddr, mode: ChecksumMode) -> u16 {
    let acc = match mode {
        ChecksumMode::MessageOnly => 0,
        ChecksumMode::PseudoHeader | ChecksumMode::PseudoHeaderGroup => {
            let dst = if mode == ChecksumMode::PseudoHeaderGroup {
                group_of(dst)
            } else {
                dst
            };
            match (src, dst) {
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    // RFC 8200 §8.1: source, destination, upper-layer length (32 bits),
                    // three zero bytes, next header.
                    let mut pseudo = [0u8; 40];
                    pseudo[..16].copy_from_slice(&s.octets());
                    pseudo[16..32].copy_from_slice(&d.octets());
                    pseudo[32..36].copy_from_slice(&(msg.len() as u32).to_be_bytes());
                    pseudo[39] = PROTO_VRRP;
                    sum16(&pseudo, 0)
                }
                (s, d) => {
                    let (s, d) = (v4_of(s), v4_of(d));
                    let mut pseudo = [0u8; 12];
                    pseudo[..4].copy_from_slice(&s.octets());
                    pseudo[4..8].copy_from_slice(&d.octets());
                    pseudo[9] = PROTO_VRRP;
                    pseudo[10..12].copy_from_slice(&(msg.len() as u16).to_be_bytes());
                    sum16(&pseudo, 0)
                }
            }
        }
    };
    fold(sum16(msg, acc))
}

fn v4_of(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(v) => v,
        IpAddr::V6(v) => v.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
    }
}

impl Advert {
    /// The VRRP message (no IP header), checksummed for `src` → `dst`. Addresses of
    /// the other family than `src` are left out.
    pub fn encode(&self, src: IpAddr, dst: IpAddr, mode: ChecksumMode) -> Vec<u8> {
        let addrs: Vec<&IpAddr> = self
            .addrs
            .iter()
            .filter(|a| a.is_ipv4() == src.is_ipv4())
            .take(255)
            .collect();
        let count = addrs.len();
        let mut m = Vec::with_capacity(HEADER + 16 * count);
        m.push(0x31); // version 3, type 1
        m.push(self.vrid);
        m.push(self.priority);
        m.push(count as u8);
        m.extend_from_slice(&(self.interval_cs & 0x0fff).to_be_bytes());
        m.extend_from_slice(&[0, 0]);
        for a in addrs {
            match a {
                IpAddr::V4(v) => m.extend_from_slice(&v.octets()),
                IpAddr::V6(v) => m.extend_from_slice(&v.octets()),
            }
        }
        let c = checksum(&m, src, dst, mode);
        m[6..8].copy_from_slice(&c.to_be_bytes());
        m
    }

    /// Decodes a VRRP message (no IP header) sent `src` → `dst` (whose family says
    /// the address size). `accept` is the checksum convention to accept, or `None` for
    /// any (auto-detect).
    pub fn decode(
        msg: &[u8],
        src: IpAddr,
        dst: IpAddr,
        accept: Option<ChecksumMode>,
    ) -> Result<(Advert, ChecksumMode), DropReason> {
        if msg.len() < HEADER {
            return Err(DropReason::Truncated(msg.len()));
        }
        let version = msg[0] >> 4;
        if version != 3 {
            return Err(DropReason::Version(version));
        }
        let kind = msg[0] & 0x0f;
        if kind != 1 {
            return Err(DropReason::Type(kind));
        }
        let count = usize::from(msg[3]);
        let size = if src.is_ipv4() { 4 } else { 16 };
        let len = HEADER + size * count;
        if msg.len() < len {
            return Err(DropReason::Truncated(msg.len()));
        }
        // Anything past the addresses is padding some senders add; the checksum is
        // over the message as its count defines it.
        let msg = &msg[..len];
        let only;
        let modes: &[ChecksumMode] = match accept {
            Some(m) => {
                only = [m];
                &only
            }
            None => &ChecksumMode::ALL,
        };
        // A correct checksum makes the sum over the whole message (field included) 0.
        let mode = modes
            .iter()
            .copied()
            .find(|&m| checksum(msg, src, dst, m) == 0)
            .ok_or(DropReason::Checksum)?;
        let interval_cs = u16::from_be_bytes([msg[4], msg[5]]) & 0x0fff;
        if interval_cs == 0 {
            return Err(DropReason::Interval);
        }
        let addrs = msg[HEADER..]
            .chunks_exact(size)
            .map(|c| match <[u8; 16]>::try_from(c) {
                Ok(v6) => IpAddr::V6(Ipv6Addr::from(v6)),
                Err(_) => IpAddr::V4(Ipv4Addr::new(c[0], c[1], c[2], c[3])),
            })
            .collect();
        Ok((
            Advert {
                vrid: msg[1],
                priority: msg[2],
                interval_cs,
                addrs,
            },
            mode,
        ))
    }
}

/// Decodes a whole IPv4 packet as a raw socket returns it (IP header included),
/// checking protocol, TTL, the VRRP message and the virtual router id.
pub fn decode_ipv4(
    packet: &[u8],
    vrid: u8,
    accept: Option<ChecksumMode>,
) -> Result<Received, DropReason> {
    if packet.len() < 20 {
        return Err(DropReason::Truncated(packet.len()));
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if ihl < 20 || packet.len() < ihl {
        return Err(DropReason::Truncated(packet.len()));
    }
    if packet[9] != PROTO_VRRP {
        return Err(DropReason::NotVrrp(packet[9]));
    }
    if packet[8] != REQUIRED_TTL {
        return Err(DropReason::Ttl(packet[8]));
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let end = total.clamp(ihl, packet.len());
    let src = IpAddr::V4(Ipv4Addr::new(
        packet[12], packet[13], packet[14], packet[15],
    ));
    let dst = IpAddr::V4(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ));
    received(&packet[ihl..end], src, dst, vrid, accept)
}

/// Decodes the VRRP message and checks it is for virtual router `vrid`.
fn received(
    msg: &[u8],
    src: IpAddr,
    dst: IpAddr,
    vrid: u8,
    accept: Option<ChecksumMode>,
) -> Result<Received, DropReason> {
    let (advert, checksum) = Advert::decode(msg, src, dst, accept)?;
    if advert.vrid != vrid {
        return Err(DropReason::Vrid(advert.vrid));
    }
    Ok(Received {
        src,
        dst,
        advert,
        checksum,
    })
}

/// Decodes a VRRP message that an IPv6 raw socket returned (no IP header there: the
/// kernel reports source, destination and hop limit beside it).
pub fn decode_ipv6(
    msg: &[u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    vrid: u8,
    accept: Option<ChecksumMode>,
) -> Result<Received, DropReason> {
    if hop_limit != REQUIRED_TTL {
        return Err(DropReason::Ttl(hop_limit));
    }
    received(msg, IpAddr::V6(src), IpAddr::V6(dst), vrid, accept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const SRC: IpAddr = IpAddr::V4(SRC4);
    const GROUP: IpAddr = IpAddr::V4(MULTICAST_V4);

    fn advert() -> Advert {
        Advert {
            vrid: 51,
            priority: 150,
            interval_cs: 10,
            addrs: vec![Ipv4Addr::new(198, 18, 0, 100).into()],
        }
    }

    fn ip_packet(ttl: u8, msg: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, ttl, PROTO_VRRP, 0, 0];
        p[2..4].copy_from_slice(&((20 + msg.len()) as u16).to_be_bytes());
        p.extend_from_slice(&SRC4.octets());
        p.extend_from_slice(&MULTICAST_V4.octets());
        p.extend_from_slice(msg);
        p
    }

    #[test]
    fn known_bytes() {
        // Written out by hand from RFC 9568 §5.2: version 3, type 1, VRID 51 (0x33),
        // priority 150 (0x96), one address, interval 10 cs.
        let m = advert().encode(SRC, GROUP, ChecksumMode::PseudoHeader);
        assert_eq!(&m[..6], &[0x31, 0x33, 0x96, 0x01, 0x00, 0x0a]);
        assert_eq!(&m[8..], &[198, 18, 0, 100]);
        // Pseudo-header sum + message sum (checksum included) folds to zero.
        assert_eq!(checksum(&m, SRC, GROUP, ChecksumMode::PseudoHeader), 0);
    }

    #[test]
    fn every_checksum_convention_round_trips_and_is_told_apart() {
        // Unicast, so the group convention differs from the RFC's.
        let peer = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
        for mode in ChecksumMode::ALL {
            let m = advert().encode(SRC, peer, mode);
            let (a, got) = Advert::decode(&m, SRC, peer, None).unwrap();
            assert_eq!(a, advert());
            assert_eq!(got, mode);
            assert!(Advert::decode(&m, SRC, peer, Some(mode)).is_ok());
        }
        let m = advert().encode(SRC, GROUP, ChecksumMode::MessageOnly);
        assert_eq!(
            Advert::decode(&m, SRC, GROUP, Some(ChecksumMode::PseudoHeader)),
            Err(DropReason::Checksum)
        );
    }

    #[test]
    fn ipv6_adverts_round_trip_with_the_ipv6_pseudo_header() {
        let src: Ipv6Addr = "fe80::1".parse().unwrap();
        let a = Advert {
            vrid: 7,
            priority: 100,
            interval_cs: 10,
            addrs: vec![
                "fd00:198:18::100".parse().unwrap(),
                "fd00:198:18::101".parse().unwrap(),
            ],
        };
        // Unicast, so that the group convention differs from the RFC's.
        let peer: Ipv6Addr = "fe80::2".parse().unwrap();
        for mode in ChecksumMode::ALL {
            let m = a.encode(src.into(), peer.into(), mode);
            assert_eq!(m.len(), 8 + 32);
            let rx = decode_ipv6(&m, src, peer, 255, 7, None).unwrap();
            assert_eq!(rx.advert, a);
            assert_eq!(rx.checksum, mode);
        }
        let m = a.encode(src.into(), MULTICAST_V6.into(), ChecksumMode::PseudoHeader);
        assert_eq!(
            decode_ipv6(&m, src, MULTICAST_V6, 64, 7, None),
            Err(DropReason::Ttl(64))
        );
        assert_eq!(
            decode_ipv6(&m, src, MULTICAST_V6, 255, 8, None),
            Err(DropReason::Vrid(7))
        );
        // The IPv4 pseudo-header does not verify an IPv6 message.
        let v4 = a.encode(SRC, GROUP, ChecksumMode::PseudoHeader);
        assert_eq!(v4.len(), 8, "IPv6 addresses are left out of an IPv4 advert");
    }

    #[test]
    fn bad_packets_are_dropped_with_their_reason() {
        let m = advert().encode(SRC, GROUP, ChecksumMode::PseudoHeader);
        assert!(decode_ipv4(&ip_packet(255, &m), 51, None).is_ok());
        assert_eq!(
            decode_ipv4(&ip_packet(64, &m), 51, None),
            Err(DropReason::Ttl(64))
        );
        assert_eq!(
            decode_ipv4(&ip_packet(255, &m), 52, None),
            Err(DropReason::Vrid(51))
        );
        assert_eq!(
            decode_ipv4(&ip_packet(255, &m[..10]), 51, None),
            Err(DropReason::Truncated(10))
        );
        let mut bad = m.clone();
        bad[2] ^= 1;
        assert_eq!(
            decode_ipv4(&ip_packet(255, &bad), 51, None),
            Err(DropReason::Checksum)
        );
        let mut v2 = m.clone();
        v2[0] = 0x21;
        assert_eq!(
            decode_ipv4(&ip_packet(255, &v2), 51, None),
            Err(DropReason::Version(2))
        );
        let mut p = ip_packet(255, &m);
        p[9] = 6;
        assert_eq!(decode_ipv4(&p, 51, None), Err(DropReason::NotVrrp(6)));
        assert_eq!(
            decode_ipv4(&p[..12], 51, None),
            Err(DropReason::Truncated(12))
        );
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(vrid in 1u8.., priority: u8, interval_cs in 1u16..4096,
                                     addrs in proptest::collection::vec(any::<u32>(), 0..20),
                                     pseudo: bool) {
            let a = Advert { vrid, priority, interval_cs,
                addrs: addrs.into_iter().map(|a| IpAddr::V4(Ipv4Addr::from(a))).collect() };
            let mode = if pseudo { ChecksumMode::PseudoHeader } else { ChecksumMode::MessageOnly };
            let m = a.encode(SRC, GROUP, mode);
            let (b, _) = Advert::decode(&m, SRC, GROUP, Some(mode)).unwrap();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), vrid: u8) {
            let _ = decode_ipv4(&bytes, vrid, None);
            let _ = Advert::decode(&bytes, SRC, GROUP, None);
        }

        #[test]
        fn any_single_bit_flip_is_caught(bit in 0usize..96) {
            let m = advert().encode(SRC, GROUP, ChecksumMode::PseudoHeader);
            let mut bad = m.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Advert::decode(&bad, SRC, GROUP, Some(ChecksumMode::PseudoHeader)).is_err());
        }
    }
}
