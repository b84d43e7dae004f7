//! Reproducible Docker image archives (the `docker save` / `docker load` format).
//!
//! flotilla builds images without a Dockerfile and without a registry: it writes the
//! layer tars itself — entries sorted, owner root, mtime zero — and the image config
//! JSON, so the same inputs give the same layer digests and, with the same build time,
//! the same image id on every host. A host that lacks an image can then be handed the
//! archive and `docker load` it.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// One filesystem entry of a layer, at an absolute path in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory with a mode.
    Dir {
        /// Absolute path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Absolute path.
        path: String,
        /// Contents.
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Absolute path.
        path: String,
        /// Link target as written.
        target: String,
    },
}

impl Node {
    fn path(&self) -> &str {
        match self {
            Node::Dir { path, .. } | Node::File { path, .. } | Node::Symlink { path, .. } => path,
        }
    }
}

/// Writes a layer tar: parents created as needed (mode 0755), entries in path order,
/// owner 0:0, mtime 0. Later nodes for the same path replace earlier ones.
pub fn layer(nodes: &[Node]) -> Vec<u8> {
    let mut by_path: BTreeMap<String, &Node> = BTreeMap::new();
    let mut dirs: BTreeMap<String, u32> = BTreeMap::new();
    for n in nodes {
        let rel = n
            .path()
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_owned();
        let mut acc = String::new();
        let comps: Vec<&str> = rel.split('/').collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(c);
            dirs.entry(acc.clone()).or_insert(0o755);
        }
        if let Node::Dir { mode, .. } = n {
            dirs.insert(rel.clone(), *mode);
        }
        by_path.insert(rel, n);
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut all: BTreeMap<String, Option<&Node>> = BTreeMap::new();
    for d in dirs.keys() {
        all.insert(d.clone(), None);
    }
    for (p, n) in &by_path {
        all.insert(p.clone(), Some(n));
    }
    for (path, node) in all {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match node {
            None | Some(Node::Dir { .. }) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(dirs[&path]);
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())
                    .expect("in-memory tar");
            }
            Some(Node::File { data, mode, .. }) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, &path, &data[..])
                    .expect("in-memory tar");
            }
            Some(Node::Symlink { target, .. }) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, &path, target).expect("in-memory tar");
            }
        }
    }
    b.into_inner().expect("in-memory tar")
}

/// What a built image runs, and its metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageConfig {
    /// ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// CMD.
    pub cmd: Vec<String>,
    /// Environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// User (name or uid[:gid]).
    pub user: String,
    /// Working directory.
    pub workdir: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Exposed TCP ports.
    pub ports: Vec<u16>,
    /// Docker health check: test (`["CMD", ...]` or `["CMD-SHELL", cmd]`), interval,
    /// timeout (nanoseconds), retries.
    pub healthcheck: Option<(Vec<String>, u64, u64, u32)>,
    /// Build time, unix seconds (the image's `created`).
    pub created: u64,
}

/// A base image's layers and config, from `docker save` output.
#[derive(Debug, Clone, Default)]
pub struct Base {
    /// Layer tars, bottom first.
    pub layers: Vec<Vec<u8>>,
    /// The base's `config` object (Env, Cmd, ...), inherited where the spec is silent.
    pub config: Value,
}

/// Reads the first image of a `docker save` archive.
pub fn base_from_saved(saved: &[u8]) -> Result<Base, String> {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut a = tar::Archive::new(saved);
    for e in a.entries().map_err(|e| e.to_string())? {
        let mut e = e.map_err(|e| e.to_string())?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let p = e
            .path()
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned();
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut v).map_err(|e| e.to_string())?;
        files.insert(p, v);
    }
    let manifest: Value =
        serde_json::from_slice(files.get("manifest.json").ok_or("no manifest.json")?)
            .map_err(|e| format!("manifest.json: {e}"))?;
    let first = &manifest[0];
    let config_name = first["Config"].as_str().ok_or("manifest without Config")?;
    let config: Value = serde_json::from_slice(files.get(config_name).ok_or("config missing")?)
        .map_err(|e| format!("{config_name}: {e}"))?;
    let mut layers = Vec::new();
    for l in first["Layers"]
        .as_array()
        .ok_or("manifest without Layers")?
    {
        let name = l.as_str().ok_or("bad layer name")?;
        layers.push(
            files
                .remove(name)
                .ok_or_else(|| format!("layer {name} missing"))?,
        );
    }
    Ok(Base {
        layers,
        config: config["config"].clone(),
    })
}

/// A `docker load` archive and the id Docker will give the image.
pub struct Archive {
    /// `sha256:<hex>` of the config: the image id.
    pub id: String,
    /// `sha256:<hex>` of each layer tar, bottom first.
    pub diff_ids: Vec<String>,
    /// The archive bytes.
    pub bytes: Vec<u8>,
}

/// Assembles a loadable image archive tagged `tag` from `base` plus `layers`.
pub fn docker_archive(base: &Base, layers: &[Vec<u8>], config: &ImageConfig, tag: &str) -> Archive {
    let all: Vec<&Vec<u8>> = base.layers.iter().chain(layers).collect();
    let digests: Vec<String> = all.iter().map(|l| hex::encode(Sha256::digest(l))).collect();
    let inherit = |key: &str| base.config.get(key).cloned().unwrap_or(Value::Null);
    let or_inherit = |v: &Vec<String>, key: &str| {
        if v.is_empty() {
            inherit(key)
        } else {
            json!(v)
        }
    };
    let mut env: Vec<String> = inherit("Env")
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for e in &config.env {
        let key = e.split('=').next().unwrap_or_default();
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let mut c = json!({
        "Entrypoint": or_inherit(&config.entrypoint, "Entrypoint"),
        "Cmd": or_inherit(&config.cmd, "Cmd"),
        "Env": env,
        "User": config.user,
        "WorkingDir": if config.workdir.is_empty() { inherit("WorkingDir") } else { json!(config.workdir) },
        "Labels": config.labels,
    });
    if !config.ports.is_empty() {
        let ports: BTreeMap<String, Value> = config
            .ports
            .iter()
            .map(|p| (format!("{p}/tcp"), json!({})))
            .collect();
        c["ExposedPorts"] = json!(ports);
    }
    if let Some((test, interval, timeout, retries)) = &config.healthcheck {
        c["Healthcheck"] = json!({"Test": test, "Interval": interval, "Timeout": timeout, "Retries": retries, "StartPeriod": 0});
    }
    let image = json!({
        "architecture": match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a },
        "os": "linux",
        "created": rfc3339(config.created),
        "config": c,
        "rootfs": {"type": "layers", "diff_ids": digests.iter().map(|d| format!("sha256:{d}")).collect::<Vec<_>>()},
        "history": all.iter().map(|_| json!({"created": rfc3339(config.created), "created_by": "flotilla build"})).collect::<Vec<_>>(),
    });
    let config_bytes = serde_json::to_vec(&image).expect("serialisable");
    let id = hex::encode(Sha256::digest(&config_bytes));
    let manifest = json!([{
        "Config": format!("{id}.json"),
        "RepoTags": [tag],
        "Layers": digests.iter().map(|d| format!("{d}/layer.tar")).collect::<Vec<_>>(),
    }]);
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).expect("in-memory tar");
    };
    for (d, l) in digests.iter().zip(&all) {
        add(&format!("{d}/layer.tar"), l);
    }
    add(&format!("{id}.json"), &config_bytes);
    add(
        "manifest.json",
        &serde_json::to_vec(&manifest).expect("serialisable"),
    );
    Archive {
        id: format!("sha256:{id}"),
        diff_ids: digests.into_iter().map(|d| format!("sha256:{d}")).collect(),
        bytes: b.into_inner().expect("in-memory tar"),
    }
}

/// Unix seconds as an RFC 3339 UTC timestamp.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm, public domain arithmetic).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<Node> {
        vec![
            Node::File {
                path: "/www/index.html".into(),
                data: b"hi".to_vec(),
                mode: 0o644,
            },
            Node::Symlink {
                path: "/bin/sh".into(),
                target: "busybox".into(),
            },
            Node::Dir {
                path: "/tmp".into(),
                mode: 0o1777,
            },
        ]
    }

    #[test]
    fn layers_are_reproducible_whatever_the_input_order() {
        let mut rev = nodes();
        rev.reverse();
        assert_eq!(layer(&nodes()), layer(&rev));
        let a = docker_archive(
            &Base::default(),
            &[layer(&nodes())],
            &ImageConfig::default(),
            "t:1",
        );
        let b = docker_archive(
            &Base::default(),
            &[layer(&rev)],
            &ImageConfig::default(),
            "t:1",
        );
        assert_eq!(a.id, b.id);
        assert_eq!(a.bytes, b.bytes);
        let later = ImageConfig {
            created: 1,
            ..Default::default()
        };
        let c = docker_archive(&Base::default(), &[layer(&nodes())], &later, "t:1");
        assert_ne!(a.id, c.id);
        assert_eq!(a.diff_ids, c.diff_ids);
    }

    #[test]
    fn a_saved_image_reads_back_as_a_base() {
        let a = docker_archive(
            &Base::default(),
            &[layer(&nodes())],
            &ImageConfig {
                env: vec!["A=1".into()],
                ..Default::default()
            },
            "t:1",
        );
        let base = base_from_saved(&a.bytes).unwrap();
        assert_eq!(base.layers.len(), 1);
        assert_eq!(base.config["Env"][0], "A=1");
        let child = docker_archive(
            &base,
            &[layer(&[])],
            &ImageConfig {
                env: vec!["A=2".into(), "B=3".into()],
                ..Default::default()
            },
            "t:2",
        );
        let back = base_from_saved(&child.bytes).unwrap();
        assert_eq!(back.layers.len(), 2);
        assert_eq!(back.config["Env"], json!(["A=2", "B=3"]));
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
