//! The load balancer's failover: two lbs form one VRRPv3 virtual router (RFC 9568) and
//! the master holds the virtual IP.
//!
//! Why its own crate: the protocol logic is pure ([`machine`]: inputs and time in,
//! actions out) and the wire format is a codec ([`codec`]), both tested without a
//! network; only [`net`] (raw sockets, gratuitous ARP) and [`vip`] (netlink) touch the
//! host, and [`router`] drives them. Speaking the standard protocol lets a flotilla lb
//! pair with Keepalived or a router.
#![warn(missing_docs)]

pub mod codec;
pub mod config;
pub mod guard;
pub mod machine;
pub mod net;
pub mod router;
pub mod vip;
