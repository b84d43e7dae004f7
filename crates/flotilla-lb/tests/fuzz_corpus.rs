//! Replays the response-head fuzz corpus (`fuzz/corpus/response_head`: seeds plus
//! anything `cargo fuzz` found and was kept) as an ordinary test: every input parses or
//! is refused without a panic, and the seeds get the verdict they were written for.

use std::path::Path;

use flotilla_lb::upstream::parse_response_head;

#[test]
fn every_corpus_input_is_parsed_or_refused_without_panicking() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/response_head");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let Some((m, rest)) = data.split_first() else {
            continue;
        };
        let method = if m % 2 == 0 {
            hyper::Method::GET
        } else {
            hyper::Method::HEAD
        };
        let mut buf = bytes::BytesMut::from(rest);
        let verdict = parse_response_head(&mut buf, &method);
        if let Ok(Some(head)) = &verdict {
            let te = head.headers.contains_key(hyper::header::TRANSFER_ENCODING);
            let cl = head.headers.contains_key(hyper::header::CONTENT_LENGTH);
            assert!(!(te && cl), "{name}: both framings accepted");
        }
        match name.as_str() {
            "valid-length" | "valid-chunked" | "interim-then-204" | "head-request" => {
                assert!(
                    matches!(verdict, Ok(Some(_))),
                    "{name}: {:?}",
                    verdict.err()
                )
            }
            "partial" => assert!(matches!(verdict, Ok(None)), "{name}"),
            "plus-length" | "both-framings" | "not-chunked" | "conflicting-lengths" => {
                assert!(verdict.is_err(), "{name} was accepted")
            }
            _ => {}
        }
        n += 1;
    }
    assert!(n >= 9, "only {n} corpus inputs");
}
