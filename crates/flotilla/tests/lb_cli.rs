//! `flotilla lb` on the command line: config errors exit 2 naming what is wrong,
//! before any port is bound; a good config serves.

mod common;

use std::process::Command;
use std::time::Duration;

fn lb(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(common::BIN)
        .args(["lb", "--check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn bad_lb_configs_exit_2_naming_the_problem() {
    let port = flotilla_testkit::free_port();
    let (code, err) = lb(&format!("[[listener]]\nname = \"w\"\nbind = \"127.0.0.1:{port}\"\nbackends = [\"127.0.0.1:1\"]\nschedular = \"p2c\"\n"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("lb.toml") && err.contains("line 5") && err.contains("schedular"),
        "{err}"
    );
    let (code, err) = lb(&format!("[[listener]]\nname = \"w\"\nbind = \"127.0.0.1:{port}\"\nbackends = [\"127.0.0.1:1 weight=-3\"]\n"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("listener[0].backends[0]"), "{err}");
    let (code, err) = lb(&format!("[[listener]]\nname = \"w\"\nbind = \"127.0.0.1:{port}\"\nscheduler = \"fastest\"\nbackends = [\"127.0.0.1:1\"]\n"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("fastest"), "{err}");
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "nothing was bound"
    );
    let (code, out) = lb(&format!(
        "[[listener]]\nname = \"w\"\nbind = \"127.0.0.1:{port}\"\nbackends = [\"127.0.0.1:1\"]\n"
    ));
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn lb_process_serves_and_reports_status() {
    let dir = tempfile::tempdir().unwrap();
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    // A tiny HTTP backend on a thread.
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for s in backend.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0
                        || s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                            .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    let (port, admin) = (flotilla_testkit::free_port(), flotilla_testkit::free_port());
    let path = dir.path().join("lb.toml");
    std::fs::write(
        &path,
        format!("[runtime]\nworker_threads = 1\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[listener]]\nname = \"w\"\nbind = \"127.0.0.1:{port}\"\nbackends = [\"{backend_addr}\"]\n"),
    )
    .unwrap();
    let _lb = common::Proc::spawn(
        &["lb", "--config", path.to_str().unwrap()],
        dir.path().join("lb.log"),
    );
    flotilla_testkit::wait_for_port(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        common::raw::blocking_get(&format!("http://127.0.0.1:{port}/")).unwrap(),
        200
    );
    flotilla_testkit::wait_for_port(
        format!("127.0.0.1:{admin}").parse().unwrap(),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        common::raw::blocking_get(&format!("http://127.0.0.1:{admin}/status")).unwrap(),
        200
    );
    assert_eq!(
        common::raw::blocking_get(&format!("http://127.0.0.1:{admin}/metrics")).unwrap(),
        200
    );
}
