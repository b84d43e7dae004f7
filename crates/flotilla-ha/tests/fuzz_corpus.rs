//! Replays the fuzz corpus (`fuzz/corpus/decode`, seeds plus anything `cargo fuzz`
//! found and was kept) as an ordinary test: every input decodes or is refused with a
//! reason, and the known seeds get the verdict they were written for.

use std::path::Path;

use flotilla_ha::codec::{decode_ipv4, Advert, ChecksumMode, DropReason};

#[test]
fn every_corpus_input_is_decoded_or_refused_without_panicking() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let verdict = decode_ipv4(&data, 51, None);
        if let Ok(rx) = &verdict {
            let again = rx.advert.encode(rx.src, rx.dst, rx.checksum);
            let (back, _) = Advert::decode(&again, rx.src, rx.dst, Some(rx.checksum)).unwrap();
            assert_eq!(&back, &rx.advert, "{name}");
        }
        match name.as_str() {
            "valid-pseudo" | "valid-three-vips" | "priority-zero" => {
                assert_eq!(
                    verdict.unwrap().checksum,
                    ChecksumMode::PseudoHeader,
                    "{name}"
                )
            }
            "valid-message-only" => {
                assert_eq!(
                    verdict.unwrap().checksum,
                    ChecksumMode::MessageOnly,
                    "{name}"
                )
            }
            "ttl-64" => assert_eq!(verdict, Err(DropReason::Ttl(64)), "{name}"),
            "version-2" => assert_eq!(verdict, Err(DropReason::Version(2)), "{name}"),
            "interval-zero" => assert_eq!(verdict, Err(DropReason::Interval), "{name}"),
            "truncated-header" | "count-lies" | "empty" | "ihl-too-large" => {
                assert!(
                    matches!(verdict, Err(DropReason::Truncated(_))),
                    "{name}: {verdict:?}"
                )
            }
            _ => {}
        }
        n += 1;
    }
    assert!(n >= 11, "the corpus is there ({n} inputs)");
}
