use super::*;

fn no_image_port(_: &str) -> Option<u16> {
    None
}

/// The shape many projects have: a web app, a database and a cache; an `x-` anchor
/// merged into two services; healthchecks in each form; a deploy block; the keys
/// flotilla cannot carry.
const SHOP: &str = r#"
version: "3.9"
name: shop
x-common: &common
  restart: unless-stopped
  labels:
    com.example.team: shop
services:
  web:
    <<: *common
    image: registry.example:5000/shop/web:2.1
    build: ./web
    command: ["httpd", "-f", "-p", "80"]
    environment:
      DATABASE_URL: "postgres://db:5432/shop"
      CACHE: cache:6379
      FROM_SHELL:
      PRICE: "$$5"
    ports:
      - "8080:80"
      - "127.0.0.1:8443:443"
    depends_on: [db, cache]
    networks: [front, back]
    volumes:
      - ./static:/srv/static:ro
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1/health"]
      interval: 1m30s
      timeout: 2s
      retries: 5
      start_period: 20s
    deploy:
      replicas: 3
      resources:
        limits: { cpus: "0.5", memory: 256M }
        reservations: { memory: 64M }
  db:
    <<: *common
    image: postgres:16
    environment:
      - POSTGRES_PASSWORD=${DB_PASSWORD}
      - POSTGRES_DB=shop
    expose: ["5432"]
    volumes:
      - db_data:/var/lib/postgresql/data
    healthcheck:
      test: pg_isready -U postgres
  cache:
    image: redis:7
    command: redis-server --save "" --appendonly no
    restart: on-failure:3
    healthcheck:
      test: ["CMD-SHELL", "redis-cli ping | grep PONG"]
    deploy:
      restart_policy: { condition: any, delay: 5s }
volumes:
  db_data:
    driver: local
networks:
  front:
  back:
"#;

#[test]
fn the_shop_converts_and_lists_what_it_leaves() {
    // redis's image EXPOSEs 6379, as the engine would tell.
    let c = convert(SHOP, "dir", &|i| (i == "redis:7").then_some(6379)).unwrap();
    assert_eq!(c.name, "shop");
    let web = &c.spec.services["web"];
    assert_eq!(
        web.image.registry().unwrap().as_str(),
        "registry.example:5000/shop/web:2.1"
    );
    assert_eq!(web.command, ["httpd", "-f", "-p", "80"]);
    assert_eq!((web.port, web.replicas), (80, 3));
    assert_eq!(web.publish, flotilla_core::stack::Publish::Port(8080));
    assert_eq!(web.env["DATABASE_URL"], "postgres://db:5432/shop");
    assert_eq!(web.env["PRICE"], "$5");
    assert!(!web.env.contains_key("FROM_SHELL"));
    assert_eq!(web.labels["com.example.team"], "shop");
    assert_eq!(web.restart, flotilla_core::stack::RestartPolicy::Always);
    assert_eq!(web.resources.cpus, Some(0.5));
    assert_eq!(web.resources.memory_bytes().unwrap(), Some(256 << 20));
    assert!(web.volumes.is_empty());
    let h = web.health.as_ref().unwrap();
    assert_eq!(h.interval, std::time::Duration::from_secs(90));
    assert_eq!(h.fall, 5);
    assert_eq!(
        h.kind,
        flotilla_core::CheckKind::Exec {
            command: ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1/health"]
                .map(String::from)
                .to_vec()
        }
    );

    let db = &c.spec.services["db"];
    assert_eq!(db.port, 5432);
    assert_eq!(db.publish, flotilla_core::stack::Publish::None);
    assert_eq!(db.volumes[0].name, "db-data");
    assert_eq!(db.volumes[0].path, "/var/lib/postgresql/data");
    assert_eq!(
        db.health.as_ref().unwrap().kind,
        flotilla_core::CheckKind::Exec {
            command: ["/bin/sh", "-c", "pg_isready -U postgres"]
                .map(String::from)
                .to_vec()
        }
    );
    let cache = &c.spec.services["cache"];
    assert_eq!(
        cache.command,
        ["redis-server", "--save", "", "--appendonly", "no"]
    );
    assert_eq!(cache.port, 6379);
    // deploy.restart_policy wins over restart:
    assert_eq!(cache.restart, flotilla_core::stack::RestartPolicy::Always);

    let listed: Vec<&str> = c.not_carried.iter().map(|n| n.path.as_str()).collect();
    for path in [
        "networks",
        "volumes.db_data.driver",
        "services.web.build",
        "services.web.environment.FROM_SHELL",
        "services.web.ports[0]",
        "services.web.ports[1]",
        "services.web.depends_on",
        "services.web.networks",
        "services.web.volumes[0]",
        "services.web.healthcheck.start_period",
        "services.web.deploy.resources.reservations",
        "services.db.environment[0]",
        "services.db.volumes[0]",
        "services.cache.restart",
        "services.cache.deploy.restart_policy.delay",
    ] {
        assert!(listed.contains(&path), "{path} not listed: {listed:?}");
    }
    // Nothing carried is listed, and x- keys and version are not noise.
    assert!(!listed
        .iter()
        .any(|p| p.contains("x-common") || *p == "version"));
    assert!(!listed.contains(&"services.web.image"));
    // The output is a spec with the list at its top.
    assert!(c.toml.starts_with("# Converted from a Compose file"));
    assert!(c.toml.contains("#   services.web.depends_on: "));
    let again: StackSpec = toml::from_str(&c.toml).unwrap();
    assert_eq!(again, c.spec);
}

#[test]
fn a_service_without_a_port_asks_the_image_then_fails_naming_it() {
    let text = "services:\n  worker:\n    image: reg:5000/worker:1\n";
    let c = convert(text, "My_Project", &|img| {
        (img == "reg:5000/worker:1").then_some(9000)
    })
    .unwrap();
    assert_eq!(c.name, "my-project");
    assert_eq!(c.spec.services["worker"].port, 9000);
    let e = convert(text, "p", &no_image_port).unwrap_err();
    assert_eq!(e.path, "services.worker");
    assert!(e.message.contains("no port"), "{e}");
}

#[test]
fn bad_files_name_the_place() {
    let e = convert("services: [unclosed", "p", &no_image_port).unwrap_err();
    assert_eq!(e.path, "yaml");
    assert!(e.message.contains("line"), "{e}");
    let e = convert("services:\n  web:\n    build: .\n", "p", &no_image_port).unwrap_err();
    assert_eq!(e.path, "services.web.build");
    let e = convert(
        "services:\n  web:\n    image: Bad/Name\n    ports: [80]\n",
        "p",
        &no_image_port,
    )
    .unwrap_err();
    assert_eq!(e.path, "services.web.image");
    let e = convert(
        "services:\n  web:\n    image: a/b\n    ports: [80]\n    healthcheck: { test: [\"CMD\"] }\n",
        "p",
        &no_image_port,
    )
    .unwrap_err();
    assert_eq!(e.path, "services.web.healthcheck.test");
    let e = convert(
        "services:\n  web:\n    image: a/b\n    ports: [80]\n    deploy: { resources: { limits: { memory: lots } } }\n",
        "p",
        &no_image_port,
    )
    .unwrap_err();
    assert_eq!(e.path, "services.web.deploy.resources.limits.memory");
    let e = convert("name: x\n", "p", &no_image_port).unwrap_err();
    assert_eq!(e.path, "services");
    // A value flotilla refuses after conversion is named as the compose path.
    let e = convert(
        "services:\n  web:\n    image: a/b\n    ports: [80]\n    deploy: { replicas: 100000 }\n",
        "p",
        &no_image_port,
    )
    .unwrap_err();
    assert_eq!(e.path, "services.web.replicas");
}

#[test]
fn ports_in_every_short_and_long_form() {
    let one = |ports: &str| {
        let text = format!("services:\n  web:\n    image: a/b\n    ports: {ports}\n");
        convert(&text, "p", &no_image_port).map(|c| {
            let w = &c.spec.services["web"];
            (w.port, w.publish, c.not_carried)
        })
    };
    use flotilla_core::stack::Publish;
    assert_eq!(one("[80]").unwrap().0, 80);
    assert_eq!(one("[\"80\"]").unwrap().1, Publish::Auto);
    assert_eq!(one("[\"9000:80\"]").unwrap().1, Publish::Port(9000));
    let (port, publish, dropped) = one("[\"0.0.0.0:9000:80/tcp\"]").unwrap();
    assert_eq!((port, publish), (80, Publish::Port(9000)));
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    let (port, publish, _) = one("[{ target: 80, published: 9001 }]").unwrap();
    assert_eq!((port, publish), (80, Publish::Port(9001)));
    // UDP and ranges are listed; with no TCP port left the service has none.
    let e = one("[\"53:53/udp\"]").unwrap_err();
    assert!(e.message.contains("no port"));
    let (port, _, dropped) = one("[\"8000-8010:8000-8010\", \"81\"]").unwrap();
    assert_eq!(port, 81);
    assert_eq!(dropped[0].path, "services.web.ports[0]");
}

#[test]
fn durations_and_sizes_read_as_compose_writes_them() {
    assert_eq!(parse_duration("1m30s").as_deref(), Some("90s"));
    assert_eq!(parse_duration("500ms").as_deref(), Some("500ms"));
    assert_eq!(parse_duration("1.5s").as_deref(), Some("1500ms"));
    assert_eq!(parse_duration("2x"), None);
    assert_eq!(compose_bytes("256M"), Some(256 << 20));
    assert_eq!(compose_bytes("1gb"), Some(1 << 30));
    assert_eq!(compose_bytes("100"), Some(100));
    assert_eq!(compose_bytes("1.5g"), None);
    assert_eq!(size(256 << 20), "256MiB");
    assert_eq!(size(1536), "1536");
    assert!(
        interpolates("${A}") && interpolates("$A") && !interpolates("$$A") && !interpolates("5$")
    );
}
