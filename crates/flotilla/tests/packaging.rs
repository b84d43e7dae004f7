//! Packaging: the systemd units in packaging/systemd pass `systemd-analyze verify`
//! (pointed at this build's binary, since flotilla is not installed on the test
//! machine), and the Debian package `cargo deb` makes installs into a root of its own
//! with dpkg, and what it installed starts as its unit says and serves.

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
        // By name: systemd finds it in /usr/local/bin (cargo install) or /usr/bin (.deb).
        assert!(text.contains("ExecStart=flotilla "), "{}", path.display());
        let local = dir.path().join(path.file_name().unwrap());
        let exec = format!("ExecStart={} ", common::BIN);
        std::fs::write(&local, text.replace("ExecStart=flotilla ", &exec)).unwrap();
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

/// Runs a command that must succeed, returning its stdout.
fn run(cmd: &mut std::process::Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn the_debian_package_installs_and_its_server_unit_starts() {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deb");
    // The binary this test suite built (cargo-deb strips it); an operator builds with
    // `cargo deb -p flotilla --profile dist`.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(std::process::Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "deb",
            "-p",
            "flotilla",
            "--no-build",
            "--profile",
            "dev",
            "--fast",
            "-o",
        ])
        .arg(&out));
    let deb = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let info = run(std::process::Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb));
    assert!(
        info.contains("Package: flotilla") && info.contains("Depends: libc6"),
        "{info}"
    );
    let contents = run(std::process::Command::new("dpkg-deb")
        .arg("--contents")
        .arg(&deb));
    for path in [
        "./usr/bin/flotilla",
        "./lib/systemd/system/flotilla-server.service",
        "./lib/systemd/system/flotilla-agent.service",
        "./lib/systemd/system/flotilla-lb.service",
        "./usr/share/doc/flotilla/copyright",
        "./usr/share/doc/flotilla/cluster.md",
    ] {
        assert!(
            contents.contains(path),
            "{path} not in the package:\n{contents}"
        );
    }

    // Installed by dpkg into a root of its own (not this machine's /usr), as a host
    // would install it; libc is this machine's, so its dependency is not checked there.
    let root = dir.path().join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    run(std::process::Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--log=/dev/null",
            "--force-depends",
            "--force-script-chrootless",
            "-i",
        ])
        .arg(&deb));
    let status = run(std::process::Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-s", "flotilla"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    let installed = root.join("usr/bin/flotilla");
    let version = run(std::process::Command::new(&installed).arg("--version"));
    assert!(version.starts_with("flotilla "), "{version}");

    // Started as its unit starts it: the ExecStart line, with a config of this test's.
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/flotilla-server.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let port = flotilla_testkit::free_port();
    let data = dir.path().join("data");
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\ndns_listen = \"\"\n",
            data.display()
        ),
    )
    .unwrap();
    let args: Vec<String> = exec
        .split_whitespace()
        .skip(1)
        .map(|a| a.replace("/etc/flotilla/server.toml", config.to_str().unwrap()))
        .collect();
    assert_eq!(args[..2], ["server".to_owned(), "--config".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::Proc::spawn_command(
        std::process::Command::new(&installed),
        &args,
        dir.path().join("server.log"),
    );
    let url = format!("https://127.0.0.1:{port}/healthz");
    let mut answered = None;
    for _ in 0..100 {
        if let Ok(ca) = flotilla_client::tls_config(&data.join("ca.pem")) {
            let http = flotilla_client::http_builder(Some(ca)).build().unwrap();
            if let Ok(r) = http.get(&url).send().await {
                answered = Some(r.status().as_u16());
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(answered, Some(200), "{}", server.log_text());
    drop(server);

    // And it leaves as it came.
    run(std::process::Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--log=/dev/null",
            "--force-script-chrootless",
            "-r",
            "flotilla",
        ]));
    assert!(!installed.exists());
}
