//! `cargo +nightly fuzz run decode`: any bytes from the wire must decode or be
//! refused with a reason, never panic; whatever decodes must encode back to a message
//! that decodes to the same advert.
#![no_main]

use std::net::Ipv4Addr;

use flotilla_ha::codec::{decode_ipv4, Advert, ChecksumMode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let vrid = data.get(1).copied().unwrap_or(51);
    if let Ok(rx) = decode_ipv4(data, vrid, None) {
        let again = rx.advert.encode(rx.src, rx.dst, rx.checksum);
        let (back, _) = Advert::decode(&again, rx.src, rx.dst, Some(rx.checksum)).unwrap();
        assert_eq!(back, rx.advert);
    }
    let _ = Advert::decode(
        data,
        Ipv4Addr::new(198, 18, 0, 1),
        Ipv4Addr::new(224, 0, 0, 18),
        Some(ChecksumMode::PseudoHeader),
    );
});
