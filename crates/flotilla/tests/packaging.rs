//! The systemd units in packaging/systemd pass `systemd-analyze verify` (pointed at this
//! build's binary, since /usr/local/bin/flotilla is not installed on the test machine).

mod common;

#[test]
fn systemd_units_verify() {
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&units).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("ExecStart=/usr/local/bin/flotilla "),
            "{}",
            path.display()
        );
        let local = dir.path().join(path.file_name().unwrap());
        std::fs::write(&local, text.replace("/usr/local/bin/flotilla", common::BIN)).unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&local)
            .output()
            .expect("systemd-analyze (Debian's systemd package)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{}: {stderr}",
            path.display()
        );
        seen += 1;
    }
    assert_eq!(seen, 3, "server, agent and lb units");
}
