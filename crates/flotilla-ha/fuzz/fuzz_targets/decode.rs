//! `cargo +nightly fuzz run decode`: any bytes from the wire must decode or be
//! refused with a reason, never panic; whatever decodes must encode back to a message
//! that decodes to the same advert. IPv4 packets (IP header included, as the raw
//! socket gives them) and IPv6 messages (source address taken from the input).
#![no_main]

use std::net::Ipv6Addr;

use flotilla_ha::codec::{decode_ipv4, decode_ipv6, Advert, MULTICAST_V6};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let vrid = data.get(1).copied().unwrap_or(51);
    let mut decoded = vec![decode_ipv4(data, vrid, None)];
    if let Some((src, msg)) = data.split_first_chunk::<16>() {
        decoded.push(decode_ipv6(msg, Ipv6Addr::from(*src), MULTICAST_V6, 255, vrid, None));
    }
    for rx in decoded.into_iter().flatten() {
        let again = rx.advert.encode(rx.src, rx.dst, rx.checksum);
        let (back, _) = Advert::decode(&again, rx.src, rx.dst, Some(rx.checksum)).unwrap();
        assert_eq!(back, rx.advert);
    }
});
