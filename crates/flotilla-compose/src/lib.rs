//! Docker Compose files as flotilla stacks.
//!
//! Operators arrive with a `docker-compose.yml`. This crate turns the common subset of
//! one — image, command, entrypoint, environment, ports, expose, named volumes,
//! healthcheck, restart, labels, user, working_dir, `deploy.replicas`,
//! `deploy.resources.limits`, `deploy.restart_policy` — into a stack spec, and lists
//! every key it cannot carry by its path (with why), never dropping one silently. It is
//! pure: the file's text goes in, the spec's TOML and the list come out; the one fact it
//! may need from outside (the port an image `EXPOSE`s, for a service that names none) is
//! asked of a function the caller passes.
//!
//! The result is checked by parsing it as a stack spec, so what `convert` returns is a
//! spec `flotilla deploy` accepts.
#![warn(missing_docs)]

use std::collections::BTreeMap;

use flotilla_core::stack::{ImageRef, StackSpec};
use serde_json::{Map, Value};
use toml::Value as Toml;
use yaml_rust2::{Yaml, YamlLoader};

/// A converted compose file.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// The stack's name (the file's `name:`, else the name the caller gave).
    pub name: String,
    /// The stack spec (TOML), with what was not carried listed at its top as comments.
    pub toml: String,
    /// The parsed spec.
    pub spec: StackSpec,
    /// Everything in the file the spec does not carry.
    pub not_carried: Vec<NotCarried>,
}

/// One thing in the compose file the stack does not carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotCarried {
    /// Where it is in the compose file, e.g. `services.web.depends_on`.
    pub path: String,
    /// Why, and what flotilla does instead.
    pub why: String,
}

/// A compose file that cannot be converted: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeError {
    /// Where in the file (`services.db`), or `yaml` for a syntax error.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ComposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for ComposeError {}

fn fail<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, ComposeError> {
    Err(ComposeError {
        path: path.into(),
        message: message.into(),
    })
}

/// Whether `path` looks like a compose file (rather than a stack spec).
pub fn is_compose_file(path: &std::path::Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yml" | "yaml")
    )
}

/// Converts the compose file's `text`. `default_name` names the stack when the file
/// has no `name:` (Compose uses the project directory's name); `image_port` answers
/// the port an image exposes, for a service with neither `ports` nor `expose`.
pub fn convert(
    text: &str,
    default_name: &str,
    image_port: &dyn Fn(&str) -> Option<u16>,
) -> Result<Conversion, ComposeError> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| ComposeError {
        path: "yaml".into(),
        message: e.to_string(),
    })?;
    let [doc] = docs.as_slice() else {
        return fail(
            "yaml",
            format!("{} documents; a compose file is one", docs.len()),
        );
    };
    let Value::Object(top) = to_json(doc, "")? else {
        return fail("(top)", "a compose file is a mapping with services:");
    };
    let mut c = Converter::default();
    let mut name = default_name.to_owned();
    let mut named_in_file = false;
    let mut services = None;
    let mut declared_volumes = Map::new();
    for (key, v) in &top {
        match key.as_str() {
            "services" => services = Some(v),
            "name" => {
                name = v.as_str().unwrap_or(default_name).to_owned();
                named_in_file = true;
            }
            // Obsolete in the Compose specification; Compose itself ignores it.
            "version" => {}
            "volumes" => {
                if let Value::Object(m) = v {
                    declared_volumes = m.clone();
                }
            }
            "networks" => c.drop(key, "every service of a stack is on the stack's own network and reaches the others by service name"),
            "secrets" | "configs" => c.drop(key, "give secrets to a service with secret_env (read from files at deploy, kept apart from the stack)"),
            k if k.starts_with("x-") => {}
            _ => c.drop(key, "not a Compose key flotilla knows"),
        }
    }
    for (vol, def) in &declared_volumes {
        if let Value::Object(m) = def {
            for k in m.keys() {
                c.drop(
                    format!("volumes.{vol}.{k}"),
                    "flotilla's volumes are local named volumes it backs up and moves with their replica",
                );
            }
        }
    }
    let stack_name = sanitise(&name);
    if stack_name.is_empty() {
        return fail("name", format!("{name:?} leaves no usable stack name"));
    }
    if stack_name != name {
        let path = if named_in_file {
            "name"
        } else {
            "(project name)"
        };
        c.drop(
            path,
            format!("{name:?} is not a DNS label: the stack is named {stack_name:?}"),
        );
    }
    let Some(Value::Object(services)) = services else {
        return fail("services", "missing: a compose file needs services:");
    };
    let mut out = toml::Table::new();
    out.insert("name".into(), Toml::String(stack_name.clone()));
    let mut out_services = toml::Table::new();
    let mut volume_users: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (sname, def) in services {
        let path = format!("services.{sname}");
        let Value::Object(def) = def else {
            return fail(path, "a service is a mapping");
        };
        let svc = c.service(&path, def, image_port, &mut volume_users, sname)?;
        let flotilla_name = sanitise(sname);
        if flotilla_name.is_empty() {
            return fail(path, "leaves no usable service name");
        }
        if &flotilla_name != sname {
            c.drop(
                &path,
                format!("{sname:?} is not a DNS label: the service is named {flotilla_name:?} (and reached by that name)"),
            );
        }
        out_services.insert(flotilla_name, Toml::Table(svc));
    }
    for (vol, users) in &volume_users {
        if users.len() > 1 {
            c.drop(
                format!("volumes.{vol}"),
                format!(
                    "shared by services {}: flotilla gives each replica its own copy",
                    users.join(", ")
                ),
            );
        }
    }
    out.insert("service".into(), Toml::Table(out_services));
    let body = toml::to_string(&out).map_err(|e| ComposeError {
        path: "(output)".into(),
        message: e.to_string(),
    })?;
    let mut text = String::from("# Converted from a Compose file by `flotilla convert`.\n");
    if !c.not_carried.is_empty() {
        text.push_str("# Not carried:\n");
        for n in &c.not_carried {
            text.push_str(&format!("#   {}: {}\n", n.path, n.why));
        }
    }
    text.push('\n');
    text.push_str(&body);
    let spec: StackSpec = toml::from_str(&text).map_err(|e| ComposeError {
        path: "(converted spec)".into(),
        message: e.to_string(),
    })?;
    spec.validate().map_err(|e| ComposeError {
        path: e.field.replacen("service.", "services.", 1),
        message: e.message,
    })?;
    Ok(Conversion {
        name: stack_name,
        toml: text,
        spec,
        not_carried: c.not_carried,
    })
}

/// A DNS label from a compose name: lowercase, `_` and other characters to `-`.
fn sanitise(name: &str) -> String {
    let s: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '-' })
        .collect();
    let s = s.trim_matches('-');
    s[..s.len().min(63)].trim_end_matches('-').to_owned()
}

/// YAML as JSON values, with `<<` merge keys applied (Compose files use them with
/// `x-` anchors) and keys as strings.
fn to_json(y: &Yaml, path: &str) -> Result<Value, ComposeError> {
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => r
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(r.clone()), Value::Number),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, v)| to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            let mut merged = Vec::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    _ => return fail(path_or_top(path), "a mapping key must be a scalar"),
                };
                let child = join(path, &key);
                if key == "<<" {
                    merged.push(to_json(v, &child)?);
                } else {
                    m.insert(key, to_json(v, &child)?);
                }
            }
            // Keys written here win over merged ones; earlier merges over later.
            for source in merged {
                let maps = match source {
                    Value::Array(a) => a,
                    other => vec![other],
                };
                for map in maps {
                    let Value::Object(map) = map else {
                        return fail(join(path, "<<"), "merges a mapping (or a list of them)");
                    };
                    for (k, v) in map {
                        m.entry(k).or_insert(v);
                    }
                }
            }
            Value::Object(m)
        }
        Yaml::Alias(_) | Yaml::BadValue => return fail(path_or_top(path), "unresolved alias"),
    })
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn path_or_top(path: &str) -> String {
    if path.is_empty() {
        "(top)".into()
    } else {
        path.to_owned()
    }
}

/// A scalar as a string (Compose accepts numbers where strings go: ports, user ids).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Whether Compose would have substituted something in `s` (`$VAR`, `${VAR}`; `$$` is
/// a literal `$`).
fn interpolates(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            match b.get(i + 1) {
                Some(b'$') => i += 1,
                Some(c) if *c == b'{' || c.is_ascii_alphabetic() || *c == b'_' => return true,
                _ => {}
            }
        }
        i += 1;
    }
    false
}

#[derive(Default)]
struct Converter {
    not_carried: Vec<NotCarried>,
}

/// A port as Compose writes it, reduced to what a flotilla service has.
struct PortSpec {
    container: u16,
    host: Option<u16>,
}

impl Converter {
    fn drop(&mut self, path: impl Into<String>, why: impl Into<String>) {
        self.not_carried.push(NotCarried {
            path: path.into(),
            why: why.into(),
        });
    }

    /// A string value, noting interpolation Compose would have done.
    fn text(&mut self, path: &str, v: &Value) -> Result<String, ComposeError> {
        let Some(s) = scalar(v) else {
            return fail(path, "expected a string");
        };
        if interpolates(&s) {
            self.drop(
                path,
                "variables are not substituted: the value is kept as written",
            );
        }
        Ok(s.replace("$$", "$"))
    }

    /// `command`/`entrypoint`: a list, or a string split as a shell would.
    fn argv(&mut self, path: &str, v: &Value) -> Result<Option<Vec<String>>, ComposeError> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => {
                if interpolates(s) {
                    self.drop(
                        path,
                        "variables are not substituted: the value is kept as written",
                    );
                }
                shlex::split(s).map(Some).ok_or_else(|| ComposeError {
                    path: path.into(),
                    message: format!("{s:?}: unbalanced quotes"),
                })
            }
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, x)| self.text(&format!("{path}[{i}]"), x))
                .collect::<Result<_, _>>()
                .map(Some),
            _ => fail(path, "expected a string or a list"),
        }
    }

    fn service(
        &mut self,
        path: &str,
        def: &Map<String, Value>,
        image_port: &dyn Fn(&str) -> Option<u16>,
        volume_users: &mut BTreeMap<String, Vec<String>>,
        sname: &str,
    ) -> Result<toml::Table, ComposeError> {
        let mut out = toml::Table::new();
        let f = |k: &str| format!("{path}.{k}");
        let image = match (def.get("image"), def.get("build")) {
            (Some(img), build) => {
                if build.is_some() {
                    self.drop(f("build"), "flotilla does not build Dockerfiles: the image is pulled");
                }
                let s = self.text(&f("image"), img)?;
                s.parse::<ImageRef>().map_err(|e| ComposeError {
                    path: f("image"),
                    message: e,
                })?;
                s
            }
            (None, Some(_)) => {
                return fail(
                    f("build"),
                    "flotilla does not build Dockerfiles: build and push the image, and name it in image:",
                )
            }
            (None, None) => return fail(path, "no image"),
        };
        out.insert("image".into(), Toml::String(image.clone()));
        let mut ports = Vec::new();
        let mut exposed = Vec::new();
        let mut restart = None;
        // Swarm's restart_policy wins over restart: (keys come in any order).
        let mut deploy_restart = None;
        for (key, v) in def {
            let p = f(key);
            match key.as_str() {
                "image" | "build" => {}
                "command" | "entrypoint" => {
                    if let Some(argv) = self.argv(&p, v)? {
                        out.insert(key.clone(), strings(argv));
                    }
                }
                "environment" => {
                    let env = self.environment(&p, v)?;
                    if !env.is_empty() {
                        out.insert(
                            "env".into(),
                            Toml::Table(env.into_iter().map(|(k, v)| (k, Toml::String(v))).collect()),
                        );
                    }
                }
                "ports" => ports = self.ports(&p, v)?,
                "expose" => {
                    let Value::Array(a) = v else { return fail(p, "expected a list") };
                    for (i, x) in a.iter().enumerate() {
                        let s = scalar(x).unwrap_or_default();
                        let port = s.trim_end_matches("/tcp");
                        match port.parse::<u16>() {
                            Ok(n) if n > 0 => exposed.push(n),
                            _ => self.drop(format!("{p}[{i}]"), format!("{s:?}: only single TCP ports are carried")),
                        }
                    }
                }
                "volumes" => {
                    let vols = self.volumes(&p, v, volume_users, sname)?;
                    if !vols.is_empty() {
                        out.insert("volume".into(), Toml::Array(vols));
                    }
                }
                "healthcheck" => {
                    if let Some(h) = self.healthcheck(&p, v)? {
                        out.insert("health".into(), Toml::Table(h));
                    }
                }
                "restart" => {
                    let s = scalar(v).unwrap_or_default();
                    restart = Some(match s.split(':').next().unwrap_or("") {
                        "no" => "never",
                        "always" | "unless-stopped" => "always",
                        "on-failure" => "on-failure",
                        _ => return fail(p, format!("{s:?}: expected no, always, unless-stopped or on-failure")),
                    });
                    if s.contains(':') {
                        self.drop(p, "a retry limit is not carried: flotilla restarts with backoff");
                    }
                }
                "deploy" => self.deploy(&p, v, &mut out, &mut deploy_restart)?,
                "labels" => {
                    let labels = self.labels(&p, v)?;
                    if !labels.is_empty() {
                        out.insert(
                            "labels".into(),
                            Toml::Table(labels.into_iter().map(|(k, v)| (k, Toml::String(v))).collect()),
                        );
                    }
                }
                "user" => {
                    out.insert("user".into(), Toml::String(self.text(&p, v)?));
                }
                "working_dir" => {
                    out.insert("workdir".into(), Toml::String(self.text(&p, v)?));
                }
                "depends_on" => self.drop(p, "services start independently; each is held out of traffic until its health check passes"),
                "networks" | "links" | "network_mode" => self.drop(p, "every service of a stack is on the stack's own network and reaches the others by service name"),
                "container_name" | "hostname" => self.drop(p, "flotilla names replica containers (STACK-SERVICE-N-…); others reach the service by its name"),
                "env_file" => self.drop(p, "put the variables in environment (and secrets in secret_env)"),
                k if k.starts_with("x-") => {}
                _ => self.drop(p, "not carried"),
            }
        }
        if let Some(r) = deploy_restart.or(restart) {
            out.insert("restart".into(), Toml::String(r.into()));
        }
        let (port, publish) = match (ports.first(), exposed.first()) {
            (Some(p), _) => (p.container, p.host.map_or(Toml::String("auto".into()), |h| Toml::Integer(h.into()))),
            (None, Some(e)) => (*e, Toml::String("none".into())),
            (None, None) => match image_port(&image) {
                Some(p) => (p, Toml::String("none".into())),
                None => {
                    return fail(
                        path,
                        "no port: give ports: or expose: (flotilla registers and checks one port per service)",
                    )
                }
            },
        };
        for (i, _) in ports.iter().enumerate().skip(1) {
            self.drop(
                format!("{}[{i}]", f("ports")),
                "flotilla registers one port per service: the first is carried",
            );
        }
        out.insert("port".into(), Toml::Integer(port.into()));
        out.insert("publish".into(), publish);
        let replicas = out.get("replicas").and_then(Toml::as_integer).unwrap_or(1);
        if let (Some(Toml::Integer(host)), true) = (out.get("publish"), replicas > 1) {
            self.drop(
                f("ports[0]"),
                format!(
                    "{replicas} replicas on host port {host}: one replica per node can have it \
                     (no routing mesh: put flotilla lb in front, or publish auto)"
                ),
            );
        }
        if replicas > 1 && out.contains_key("volume") {
            self.drop(
                f("volumes"),
                format!("{replicas} replicas: each gets its own volumes (Compose would share one)"),
            );
        }
        Ok(out)
    }

    fn environment(
        &mut self,
        p: &str,
        v: &Value,
    ) -> Result<BTreeMap<String, String>, ComposeError> {
        let mut env = BTreeMap::new();
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let path = format!("{p}.{k}");
                    if x.is_null() {
                        self.drop(
                            path,
                            "takes its value from the shell running Compose: give it a value",
                        );
                    } else {
                        env.insert(k.clone(), self.text(&path, x)?);
                    }
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    let path = format!("{p}[{i}]");
                    let s = self.text(&path, x)?;
                    match s.split_once('=') {
                        Some((k, val)) => {
                            env.insert(k.to_owned(), val.to_owned());
                        }
                        None => self.drop(
                            path,
                            "takes its value from the shell running Compose: give it a value",
                        ),
                    }
                }
            }
            Value::Null => {}
            _ => return fail(p, "expected a mapping or a list"),
        }
        Ok(env)
    }

    fn labels(&mut self, p: &str, v: &Value) -> Result<BTreeMap<String, String>, ComposeError> {
        let mut labels = self.environment(p, v)?;
        let reserved: Vec<String> = labels
            .keys()
            .filter(|k| k.starts_with("flotilla."))
            .cloned()
            .collect();
        for k in reserved {
            labels.remove(&k);
            self.drop(
                format!("{p}.{k}"),
                "flotilla.* labels are flotilla's own (they say what the container is)",
            );
        }
        Ok(labels)
    }

    fn ports(&mut self, p: &str, v: &Value) -> Result<Vec<PortSpec>, ComposeError> {
        let Value::Array(a) = v else {
            return fail(p, "expected a list");
        };
        let mut out = Vec::new();
        for (i, x) in a.iter().enumerate() {
            let path = format!("{p}[{i}]");
            let (container, host, ip, proto) = match x {
                Value::Object(m) => {
                    for k in m.keys().filter(|k| {
                        !matches!(
                            k.as_str(),
                            "target" | "published" | "host_ip" | "protocol" | "mode"
                        )
                    }) {
                        self.drop(format!("{path}.{k}"), "not carried");
                    }
                    (
                        m.get("target").and_then(scalar).unwrap_or_default(),
                        m.get("published").and_then(scalar),
                        m.get("host_ip").and_then(scalar),
                        m.get("protocol")
                            .and_then(scalar)
                            .unwrap_or_else(|| "tcp".into()),
                    )
                }
                other => {
                    let s = scalar(other).unwrap_or_default();
                    let (spec, proto) = s
                        .split_once('/')
                        .map_or((s.as_str(), "tcp"), |(a, b)| (a, b));
                    let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
                    match parts.as_slice() {
                        [c] => (c.to_string(), None, None, proto.to_owned()),
                        [c, h] => (c.to_string(), Some(h.to_string()), None, proto.to_owned()),
                        [c, h, ip] => (
                            c.to_string(),
                            (!h.is_empty()).then(|| h.to_string()),
                            Some(ip.to_string()),
                            proto.to_owned(),
                        ),
                        _ => (String::new(), None, None, proto.to_owned()),
                    }
                }
            };
            if proto != "tcp" {
                self.drop(path, format!("{proto}: flotilla balances and checks TCP"));
                continue;
            }
            let Ok(container) = container.parse::<u16>() else {
                self.drop(
                    path,
                    format!("{container:?}: only single ports are carried (no ranges)"),
                );
                continue;
            };
            let host = match host.map(|h| h.parse::<u16>()) {
                None => None,
                Some(Ok(h)) => Some(h),
                Some(Err(_)) => {
                    self.drop(
                        path.clone(),
                        "a host port range is not carried: the port is published on one host port",
                    );
                    None
                }
            };
            if let Some(ip) = ip.filter(|ip| !ip.is_empty()) {
                self.drop(
                    path,
                    format!("host IP {ip}: flotilla publishes on the agent's advertise address"),
                );
            }
            out.push(PortSpec { container, host });
        }
        Ok(out)
    }

    fn volumes(
        &mut self,
        p: &str,
        v: &Value,
        users: &mut BTreeMap<String, Vec<String>>,
        sname: &str,
    ) -> Result<Vec<Toml>, ComposeError> {
        let Value::Array(a) = v else {
            return fail(p, "expected a list");
        };
        let mut out = Vec::new();
        let bind = "a bind mount names a host path: flotilla's volumes are named volumes it backs up and moves with their replica";
        for (i, x) in a.iter().enumerate() {
            let path = format!("{p}[{i}]");
            let (source, target, read_only) = match x {
                Value::Object(m) => {
                    let kind = m
                        .get("type")
                        .and_then(scalar)
                        .unwrap_or_else(|| "volume".into());
                    if kind != "volume" {
                        self.drop(path, format!("type {kind}: {bind}"));
                        continue;
                    }
                    (
                        m.get("source").and_then(scalar),
                        m.get("target").and_then(scalar).unwrap_or_default(),
                        m.get("read_only").and_then(Value::as_bool).unwrap_or(false),
                    )
                }
                other => {
                    let s = scalar(other).unwrap_or_default();
                    let parts: Vec<&str> = s.split(':').collect();
                    match parts.as_slice() {
                        [t] => (None, t.to_string(), false),
                        [s, t] => (Some(s.to_string()), t.to_string(), false),
                        [s, t, mode] => (
                            Some(s.to_string()),
                            t.to_string(),
                            mode.split(',').any(|m| m == "ro"),
                        ),
                        _ => return fail(path, format!("{s:?} is not SOURCE:TARGET[:MODE]")),
                    }
                }
            };
            if source
                .as_deref()
                .is_some_and(|s| s.starts_with(['/', '.', '~']))
            {
                self.drop(path, bind);
                continue;
            }
            let name = match &source {
                Some(s) => {
                    users.entry(s.clone()).or_default().push(sname.to_owned());
                    let n = sanitise(s);
                    if &n != s {
                        self.drop(path.clone(), format!("volume {s:?} is named {n:?}"));
                    }
                    n
                }
                // Anonymous: Compose makes a fresh one per container; flotilla's persists.
                None => {
                    self.drop(
                        path.clone(),
                        "an anonymous volume becomes a named one that outlives the container",
                    );
                    format!("anon-{i}")
                }
            };
            if read_only {
                self.drop(
                    path,
                    "read-only is not carried: the volume is mounted read-write",
                );
            }
            let mut t = toml::Table::new();
            t.insert("name".into(), Toml::String(name));
            t.insert("path".into(), Toml::String(target));
            out.push(Toml::Table(t));
        }
        Ok(out)
    }

    fn healthcheck(&mut self, p: &str, v: &Value) -> Result<Option<toml::Table>, ComposeError> {
        let Value::Object(m) = v else {
            return fail(p, "expected a mapping");
        };
        if m.get("disable").and_then(Value::as_bool) == Some(true) {
            self.drop(
                p,
                "disabled: flotilla checks the service's port over TCP instead",
            );
            return Ok(None);
        }
        let mut h = toml::Table::new();
        let command = match m.get("test") {
            None => return fail(format!("{p}.test"), "missing"),
            Some(Value::String(s)) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
            Some(Value::Array(a)) => {
                let words: Vec<String> = a.iter().filter_map(scalar).collect();
                match words.split_first() {
                    Some((first, rest)) if first == "CMD" && !rest.is_empty() => rest.to_vec(),
                    Some((first, rest)) if first == "CMD-SHELL" && !rest.is_empty() => {
                        vec!["/bin/sh".into(), "-c".into(), rest.join(" ")]
                    }
                    Some((first, _)) if first == "NONE" => {
                        self.drop(
                            format!("{p}.test"),
                            "NONE: flotilla checks the service's port over TCP instead",
                        );
                        return Ok(None);
                    }
                    _ => {
                        return fail(
                            format!("{p}.test"),
                            "expected [\"CMD\", …], [\"CMD-SHELL\", …] or a string",
                        )
                    }
                }
            }
            Some(_) => return fail(format!("{p}.test"), "expected a string or a list"),
        };
        h.insert("type".into(), Toml::String("exec".into()));
        h.insert("command".into(), strings(command));
        for (key, v) in m {
            let path = format!("{p}.{key}");
            match key.as_str() {
                "test" | "disable" => {}
                "interval" | "timeout" => {
                    let s = scalar(v).unwrap_or_default();
                    let d = parse_duration(&s).ok_or_else(|| ComposeError {
                        path: path.clone(),
                        message: format!("{s:?} is not a duration"),
                    })?;
                    h.insert(key.clone(), Toml::String(d));
                }
                "retries" => {
                    let n = v.as_u64().filter(|n| (1..=100).contains(n)).ok_or_else(|| ComposeError {
                        path: path.clone(),
                        message: "expected 1..100".into(),
                    })?;
                    h.insert("fall".into(), Toml::Integer(n as i64));
                }
                _ => self.drop(path, "not carried: a replica is checked from its start (the rollout's health_timeout bounds the wait)"),
            }
        }
        Ok(Some(h))
    }

    fn deploy(
        &mut self,
        p: &str,
        v: &Value,
        out: &mut toml::Table,
        restart: &mut Option<&'static str>,
    ) -> Result<(), ComposeError> {
        let Value::Object(m) = v else {
            return fail(p, "expected a mapping");
        };
        for (key, v) in m {
            let path = format!("{p}.{key}");
            match key.as_str() {
                "replicas" => {
                    let n = v.as_u64().ok_or_else(|| ComposeError {
                        path: path.clone(),
                        message: "expected a number".into(),
                    })?;
                    out.insert("replicas".into(), Toml::Integer(n as i64));
                }
                "mode" if v.as_str() == Some("replicated") => {}
                "resources" => {
                    let Value::Object(r) = v else {
                        return fail(path, "expected a mapping");
                    };
                    for (rk, rv) in r {
                        let rpath = format!("{path}.{rk}");
                        if rk != "limits" {
                            self.drop(rpath, "only limits are carried");
                            continue;
                        }
                        let Value::Object(l) = rv else {
                            return fail(rpath, "expected a mapping");
                        };
                        let mut res = toml::Table::new();
                        for (lk, lv) in l {
                            let lpath = format!("{rpath}.{lk}");
                            match lk.as_str() {
                                "cpus" => {
                                    let c = scalar(lv)
                                        .and_then(|s| s.parse::<f64>().ok())
                                        .ok_or_else(|| ComposeError {
                                            path: lpath.clone(),
                                            message: "expected a number of CPUs".into(),
                                        })?;
                                    res.insert("cpus".into(), Toml::Float(c));
                                }
                                "memory" => {
                                    let s = scalar(lv).unwrap_or_default();
                                    let bytes = compose_bytes(&s).ok_or_else(|| ComposeError {
                                        path: lpath.clone(),
                                        message: format!("{s:?} is not a size like 512M"),
                                    })?;
                                    res.insert("memory".into(), Toml::String(size(bytes)));
                                }
                                _ => self.drop(lpath, "not carried"),
                            }
                        }
                        if !res.is_empty() {
                            out.insert("resources".into(), Toml::Table(res));
                        }
                    }
                }
                "restart_policy" => {
                    let Value::Object(r) = v else {
                        return fail(path, "expected a mapping");
                    };
                    for (rk, rv) in r {
                        let rpath = format!("{path}.{rk}");
                        if rk == "condition" {
                            *restart = Some(match rv.as_str() {
                                Some("none") => "never",
                                Some("on-failure") => "on-failure",
                                Some("any") => "always",
                                _ => return fail(rpath, "expected none, on-failure or any"),
                            });
                        } else {
                            self.drop(rpath, "not carried: flotilla restarts with its own backoff");
                        }
                    }
                }
                "mode" => self.drop(
                    path,
                    "global: set replicas to the node count with placement.max_per_node = 1",
                ),
                _ => self.drop(path, "not carried"),
            }
        }
        Ok(())
    }
}

fn strings(v: Vec<String>) -> Toml {
    Toml::Array(v.into_iter().map(Toml::String).collect())
}

/// A Compose duration (`1m30s`, `500ms`, `10s`) as flotilla writes one.
fn parse_duration(s: &str) -> Option<String> {
    let ms = humantime_like(s)?;
    Some(if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    })
}

/// Milliseconds in a Compose duration: numbers each followed by h, m, s, ms or us.
fn humantime_like(s: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let ms = match &rest[..unit] {
            "h" => n * 3_600_000.0,
            "m" => n * 60_000.0,
            "s" => n * 1_000.0,
            "ms" => n,
            "us" => n / 1_000.0,
            _ => return None,
        };
        total += ms.round() as u64;
        rest = &rest[unit..];
    }
    Some(total)
}

/// Compose's byte values: a number with b, k, kb, m, mb, g, gb (any case, powers of
/// 1024, as the engine reads them).
fn compose_bytes(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split].parse().ok()?;
    let mul = match &t[split..] {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Bytes as flotilla writes a size.
fn size(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests;
