//! Registry images on a real engine and a real registry (Debian's `docker-registry`,
//! with htpasswd authentication): a stack service whose `image` is a registry
//! reference is pulled by the agent with the credentials in its `--registry-auth` file,
//! pinned to one digest, and given the spec's command and environment; a registry
//! that is down, a digest that does not match and a wrong password each stop the deploy
//! naming the image and the registry's answer, with nothing stored. And a Compose file
//! of the usual shape (web + database + cache from registry images), converted and
//! deployed as it is, its services answering and reaching each other by name.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{agent_with, eventually, Proc, Server};
use flotilla_core::HealthStatus;
use flotilla_testkit::{docker, free_port, unique};

/// A `docker-registry` process with htpasswd authentication on a loopback port (the
/// engine talks plain HTTP to registries on 127.0.0.0/8).
struct Registry {
    _proc: Proc,
    host: String,
    /// A `DOCKER_CONFIG` directory logged in to it, for pushing from the test.
    docker_config: PathBuf,
}

impl Registry {
    fn start(dir: &Path, user: &str, password: &str) -> Registry {
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let htpasswd = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .expect("htpasswd (apache2-utils) is installed");
        assert!(htpasswd.status.success());
        std::fs::write(dir.join("htpasswd"), &htpasswd.stdout).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n  secret: {}\nauth:\n  htpasswd:\n    realm: flotilla-test\n    path: {}\n",
                dir.join("data").display(),
                unique("secret"),
                dir.join("htpasswd").display()
            ),
        )
        .unwrap();
        let proc = Proc::spawn_command(
            Command::new("docker-registry"),
            &["serve", config.to_str().unwrap()],
            dir.join("registry.log"),
        );
        let docker_config = dir.join("docker-config");
        std::fs::create_dir_all(&docker_config).unwrap();
        let reg = Registry {
            _proc: proc,
            host,
            docker_config,
        };
        let mut login = None;
        for _ in 0..50 {
            let o = reg.docker(&["login", "-u", user, "-p", password, &reg.host]);
            if o.status.success() {
                login = Some(o);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(login.is_some(), "could not log in to the test registry");
        reg
    }

    /// The docker CLI with this registry's login (never the user's own config).
    fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .args(args)
            .env("DOCKER_CONFIG", &self.docker_config)
            .output()
            .unwrap()
    }

    /// The login file `docker login` wrote: the agent reads the same format.
    fn auth_file(&self) -> PathBuf {
        self.docker_config.join("config.json")
    }
}

/// Imports a busybox root file system with `index` at /www/index.html as `reference`,
/// pushes it, and removes it from the engine (so a deploy must pull it).
fn push_image(reg: &Registry, dir: &Path, reference: &str, index: &str) {
    push_image_with(
        reg,
        dir,
        reference,
        &[("www/index.html", index, 0o644)],
        &[],
        false,
    );
}

/// Imports a busybox root file system (`sh` and `wget` linked) with `files` (path,
/// content, mode) as `reference`, with Dockerfile-style `changes` (`EXPOSE 6379`),
/// pushes it, and removes it from the engine unless `keep`.
fn push_image_with(
    reg: &Registry,
    dir: &Path,
    reference: &str,
    files: &[(&str, &str, u32)],
    changes: &[&str],
    keep: bool,
) {
    let root = dir.join(format!("rootfs-{}", unique("r")));
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "wget"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    for (path, content, mode) in files {
        let file = root.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, content).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    let tar = dir.join(format!("{}.tar", unique("rootfs")));
    let o = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()
        .unwrap();
    assert!(o.status.success());
    let mut import = vec!["import".to_owned()];
    for c in changes {
        import.push("--change".into());
        import.push(c.to_string());
    }
    import.push(tar.to_str().unwrap().into());
    import.push(reference.into());
    let import: Vec<&str> = import.iter().map(String::as_str).collect();
    let o = reg.docker(&import);
    assert!(o.status.success(), "{o:?}");
    let o = reg.docker(&["push", reference]);
    assert!(o.status.success(), "{o:?}");
    if !keep {
        let o = reg.docker(&["rmi", reference]);
        assert!(o.status.success(), "{o:?}");
    }
}

/// A server and one agent pulling with the credentials in `auth`, its node up.
async fn cluster(dir: &Path, auth: &Path) -> (Server, Proc) {
    let server = Server::start(dir, "s", &[]);
    let client = server.client();
    let node = unique("node").replace('_', "-");
    let agent = agent_with(
        dir,
        &server,
        &node,
        None,
        None,
        &[
            "--api-listen",
            "127.0.0.1:0",
            "--registry-auth",
            auth.to_str().unwrap(),
        ],
    );
    eventually(Duration::from_secs(15), "agent registered", || async {
        client
            .nodes()
            .await
            .is_ok_and(|n| n.len() == 1 && n[0].api.is_some())
    })
    .await;
    (server, agent)
}

fn write_spec(dir: &Path, stack: &str, image: &str) -> PathBuf {
    let path = dir.join(format!("{stack}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"name = "{stack}"

[service.web]
image = "{image}"
port = 8080
replicas = 2
command = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
env = {{ GREETING = "from-the-spec" }}
health = {{ type = "http", path = "/index.html", interval = "300ms", timeout = "1s" }}
"#
        ),
    )
    .unwrap();
    path
}

fn deploy(server: &Server, home: &Path, spec: &Path) -> Output {
    Command::new(common::BIN)
        .args(["deploy", spec.to_str().unwrap(), "--timeout", "60s"])
        .env("FLOTILLA_SERVER", &server.url)
        .env("FLOTILLA_TOKEN_FILE", &server.token_file)
        .env("FLOTILLA_HOME", home)
        .env_remove("FLOTILLA_TOKEN")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Removes the test's containers and the pulled images from the engine however the
/// test ends.
struct Cleanup {
    stacks: Vec<String>,
    repository: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for s in &self.stacks {
            let filter = format!("label=flotilla.stack={s}");
            if let Ok(ids) = docker(&["ps", "-aq", "--filter", &filter]) {
                for id in ids.split_whitespace() {
                    let _ = docker(&["rm", "-f", id]);
                }
            }
            let _ = docker(&["network", "rm", &format!("flotilla-{s}")]);
        }
        let filter = format!("reference={}", self.repository);
        if let Ok(ids) = docker(&["images", "-q", "--filter", &filter]) {
            for id in ids.split_whitespace() {
                let _ = docker(&["rmi", "-f", id]);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_image_is_pulled_with_the_agent_s_credentials_and_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let (user, password) = ("deployer", unique("pw"));
    let reg = Registry::start(dir.path(), user, &password);
    let repo_name = unique("webapp").replace('_', "-");
    let repository = format!("{}/{repo_name}", reg.host);
    let stack = unique("regimg").replace('_', "-");
    let _cleanup = Cleanup {
        stacks: vec![stack.clone()],
        repository: repository.clone(),
    };
    let tag = format!("{repository}:1");
    push_image(&reg, dir.path(), &tag, "hello from the registry\n");
    assert!(
        docker(&["image", "inspect", &tag]).is_err(),
        "still on the engine"
    );

    // The agent's credential file starts with a wrong password: the registry refuses
    // the pull and the deploy stops before anything is stored.
    let auth = dir.path().join("registry-auth.json");
    let write_auth = |pw: &str| {
        std::fs::write(
            &auth,
            serde_json::json!({"auths": {reg.host.clone(): {"username": user, "password": pw}}})
                .to_string(),
        )
        .unwrap();
        std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    write_auth("wrong");
    let (server, _agent) = cluster(dir.path(), &auth).await;
    let client = server.client();
    let home = dir.path();
    let spec = write_spec(dir.path(), &stack, &tag);
    let o = deploy(&server, home, &spec);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("service.web.image") && t.contains(&tag) && t.contains("unauthorized"),
        "{t}"
    );
    assert!(
        client.stack(&stack).await.is_err(),
        "stored after a failed pull"
    );

    // The file is replaced by the one `docker login` wrote; the running agent reads it
    // at the next pull.
    std::fs::copy(reg.auth_file(), &auth).unwrap();
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = deploy(&server, home, &spec);
    assert!(o.status.success(), "{}", text(&o));
    let record = client.stack(&stack).await.unwrap();
    let web = &record.services["web"];
    assert!(
        web.image.starts_with(&format!("{repository}@sha256:")),
        "not pinned to a digest: {}",
        web.image
    );
    let passing: Vec<_> = client
        .instances()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.service == "web" && i.health == HealthStatus::Passing)
        .filter(|i| i.meta.get("stack") == Some(&stack))
        .collect();
    assert_eq!(passing.len(), 2, "{passing:?}");
    for i in &passing {
        let body = reqwest::get(format!("http://{}:{}/index.html", i.address, i.port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, "hello from the registry\n");
        let c = &i.meta["container_id"];
        let env = docker(&["inspect", "-f", "{{json .Config.Env}}", c]).unwrap();
        assert!(env.contains("GREETING=from-the-spec"), "{env}");
        let image = docker(&["inspect", "-f", "{{.Config.Image}}", c]).unwrap();
        assert_eq!(image.trim(), web.image);
        let labels = docker(&["inspect", "-f", "{{json .Config.Labels}}", c]).unwrap();
        assert!(
            labels.contains("\"flotilla.check.http\":\"/index.html\""),
            "{labels}"
        );
    }
    // A replica created later, on an engine that no longer has the image, is pulled by
    // the agent itself (pinned: the digest, not whatever the tag points to now).
    push_image(&reg, dir.path(), &tag, "a newer build under the same tag\n");
    let _ = docker(&["rmi", "-f", &web.image]);
    assert!(docker(&["image", "inspect", &web.image]).is_err());
    let o = Command::new(common::BIN)
        .args(["scale", "web=3", "--stack", &stack, "--timeout", "60s"])
        .env("FLOTILLA_SERVER", &server.url)
        .env("FLOTILLA_TOKEN_FILE", &server.token_file)
        .env("FLOTILLA_HOME", home)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let third = client
        .instances()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.meta.get("stack") == Some(&stack) && i.health == HealthStatus::Passing)
        .find(|i| !passing.iter().any(|p| p.id == i.id))
        .expect("a third passing replica");
    let body = reqwest::get(format!(
        "http://{}:{}/index.html",
        third.address, third.port
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert_eq!(body, "hello from the registry\n", "not the pinned image");

    // The credential never reached the server.
    let served = serde_json::to_string(&record).unwrap();
    assert!(!served.contains(&password));

    // A digest pin that matches nothing in the registry: the registry's answer, named.
    let other = unique("regpin").replace('_', "-");
    let wrong_pin = format!("{repository}@sha256:{}", "0".repeat(64));
    let o = deploy(&server, home, &write_spec(dir.path(), &other, &wrong_pin));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains(&wrong_pin) && t.contains("manifest unknown"),
        "{t}"
    );
    assert!(client.stack(&other).await.is_err());

    // A registry that is down: named, with the engine's answer; nothing stored.
    let down = format!("127.0.0.1:{}/{repo_name}:1", free_port());
    let o = deploy(&server, home, &write_spec(dir.path(), &other, &down));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains(&down) && t.contains("connection refused"), "{t}");
    assert!(client.stack(&other).await.is_err());

    // A bad reference is the spec's fault: exit 2 naming the field, before any pull.
    let o = deploy(&server, home, &write_spec(dir.path(), &other, "Reg/App:1"));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("path component"), "{}", text(&o));

    // The agent's file is checked at start: readable by others is refused, exit 2.
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = Command::new(common::BIN)
        .args(["agent", "--server", &server.url, "--registry-auth"])
        .arg(&auth)
        .arg("--token-file")
        .arg(&server.token_file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("registry_auth") && text(&o).contains("chmod 600"),
        "{}",
        text(&o)
    );
}

/// The web tier's page: what it gets from the database and the cache, by their names.
const CHECK_CGI: &str = "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"db: $(wget -qO- http://db:5432/)\"\necho \"cache: $(wget -qO- http://cache:6379/)\"\necho \"env: $SHOP_MODE\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compose_file_of_web_db_and_cache_deploys_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (user, password) = ("deployer", unique("pw"));
    let reg = Registry::start(dir.path(), user, &password);
    let project = unique("shop").replace('_', "-");
    let repo = format!("{}/{project}", reg.host);
    let _cleanup = Cleanup {
        stacks: vec![project.clone()],
        repository: format!("{repo}/*"),
    };
    // Build-less images, as a project pulls them: the web tier, a "database" and a
    // "cache" (busybox httpd stand-ins that answer on their usual ports).
    let web_image = format!("{repo}/web:1.0");
    push_image_with(
        &reg,
        dir.path(),
        &web_image,
        &[
            ("www/index.html", "shop front\n", 0o644),
            ("www/cgi-bin/check", CHECK_CGI, 0o755),
        ],
        &[],
        false,
    );
    let db_image = format!("{repo}/db:16");
    push_image_with(
        &reg,
        dir.path(),
        &db_image,
        &[("www/index.html", "db ok\n", 0o644)],
        &[],
        false,
    );
    // The cache's image says its own port and command; the compose file does not.
    let cache_image = format!("{repo}/cache:7");
    push_image_with(
        &reg,
        dir.path(),
        &cache_image,
        &[("www/index.html", "cache ok\n", 0o644)],
        &[
            "EXPOSE 6379",
            "CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"6379\", \"-h\", \"/www\"]",
        ],
        true,
    );
    let compose_dir = dir.path().join(&project);
    std::fs::create_dir_all(&compose_dir).unwrap();
    let compose = compose_dir.join("docker-compose.yml");
    std::fs::write(
        &compose,
        format!(
            r#"x-restart: &restart
  restart: unless-stopped
services:
  web:
    <<: *restart
    image: {web_image}
    command: /bin/busybox httpd -f -p 80 -h /www
    ports: ["80"]
    environment:
      SHOP_MODE: compose
    depends_on: [db, cache]
    healthcheck:
      test: ["CMD", "/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1/"]
      interval: 500ms
      timeout: 1s
      retries: 3
    deploy:
      replicas: 2
      resources:
        limits: {{ cpus: "0.5", memory: 64M }}
  db:
    <<: *restart
    image: {db_image}
    command: ["/bin/busybox", "httpd", "-f", "-p", "5432", "-h", "/www"]
    expose: ["5432"]
    volumes:
      - db_data:/var/lib/data
      - ./init:/docker-entrypoint-initdb.d:ro
    healthcheck:
      test: ["CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1:5432/ && test -d /var/lib/data"]
      interval: 500ms
  cache:
    image: {cache_image}
    healthcheck:
      test: wget -q -O /dev/null http://127.0.0.1:6379/
      interval: 500ms
volumes:
  db_data: {{}}
"#
        ),
    )
    .unwrap();

    // Converted: a spec that parses, with the bind mount and depends_on listed.
    let o = Command::new(common::BIN)
        .arg("convert")
        .arg(&compose)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let spec = String::from_utf8_lossy(&o.stdout);
    let listed = String::from_utf8_lossy(&o.stderr);
    assert!(spec.contains(&format!("name = \"{project}\"")), "{spec}");
    assert!(spec.contains("port = 6379"), "the cache's EXPOSE: {spec}");
    assert!(listed.contains("services.web.depends_on"), "{listed}");
    assert!(
        listed.contains("services.db.volumes[1]") && listed.contains("bind mount"),
        "{listed}"
    );
    let converted = dir.path().join("converted.toml");
    std::fs::write(&converted, spec.as_bytes()).unwrap();
    flotilla_core::stack::StackSpec::load(&converted).unwrap();

    // Deployed as it is.
    let auth = dir.path().join("registry-auth.json");
    std::fs::copy(reg.auth_file(), &auth).unwrap();
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (server, _agent) = cluster(dir.path(), &auth).await;
    let client = server.client();
    let o = deploy(&server, dir.path(), &compose);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("not carried: services.web.depends_on"),
        "{}",
        text(&o)
    );
    let passing = |svc: &'static str| {
        let client = client.clone();
        let project = project.clone();
        async move {
            client
                .instances()
                .await
                .unwrap()
                .into_iter()
                .filter(|i| i.service == svc && i.health == HealthStatus::Passing)
                .filter(|i| i.meta.get("stack") == Some(&project))
                .count()
        }
    };
    assert_eq!(passing("web").await, 2);
    assert_eq!(passing("db").await, 1);
    assert_eq!(passing("cache").await, 1);
    // The web tier answers on the published port, and reaches db and cache by name.
    let web = client
        .instances()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.service == "web" && i.meta.get("stack") == Some(&project))
        .unwrap();
    let page = reqwest::get(format!("http://{}:{}/cgi-bin/check", web.address, web.port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page, "db: db ok\ncache: cache ok\nenv: compose\n", "{page}");
    // The database's named volume is its own, per replica, and the limits applied.
    let record = client.stack(&project).await.unwrap();
    assert_eq!(record.services["db"].spec.volumes[0].name, "db-data");
    let memory = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.Memory}}",
        &web.meta["container_id"],
    ])
    .unwrap();
    assert_eq!(memory.trim(), (64u64 << 20).to_string());

    // A compose file flotilla cannot take names the place, exit 2, nothing stored.
    std::fs::write(
        compose_dir.join("bad.yml"),
        "services:\n  api:\n    build: ./api\n",
    )
    .unwrap();
    let o = deploy(&server, dir.path(), &compose_dir.join("bad.yml"));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("bad.yml: services.api.build"),
        "{}",
        text(&o)
    );
}
