//! `cargo +nightly fuzz run response_head`: any bytes a backend sends as a response
//! head are parsed or refused with a reason, never a panic; a head that parses never
//! carries both `Transfer-Encoding` and `Content-Length`, and consumed no more bytes
//! than were given. The first byte picks the request method (HEAD changes framing).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((m, rest)) = data.split_first() else {
        return;
    };
    let method = if m % 2 == 0 { http::Method::GET } else { http::Method::HEAD };
    let mut buf = bytes::BytesMut::from(rest);
    if let Ok(Some(head)) = flotilla_lb::upstream::parse_response_head(&mut buf, &method) {
        assert!(buf.len() <= rest.len());
        let te = head.headers.contains_key(http::header::TRANSFER_ENCODING);
        let cl = head.headers.contains_key(http::header::CONTENT_LENGTH);
        assert!(!(te && cl), "both framings accepted");
    }
});
