//! Compose files at the CLI: `flotilla convert`, and reading one where a stack spec
//! is expected (`deploy`, `build`). The conversion itself is `flotilla-compose`'s; this
//! asks the engine what the pure converter cannot know (an image's exposed port) and
//! tells the operator what was not carried.

use std::collections::BTreeMap;
use std::path::Path;

use flotilla_compose::{Conversion, NotCarried};

use crate::cli::ConvertArgs;
use crate::home::usage;

/// Converts `path`, asking the engine at `docker` (if it answers) for the ports of
/// images whose services give none. A file that cannot be converted is a usage error
/// (exit 2) naming the file and the place in it.
pub async fn convert_file(
    path: &Path,
    name: Option<&str>,
    docker: &str,
) -> anyhow::Result<Conversion> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("{}: cannot read: {e}", path.display())))?;
    // Compose names a project after its directory.
    let default_name = name.map(str::to_owned).unwrap_or_else(|| {
        std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.parent()?.file_name()?.to_str().map(str::to_owned))
            .unwrap_or_else(|| "stack".into())
    });
    // The converter is pure: a first pass learns which images it would ask about.
    let asked = std::sync::Mutex::new(Vec::new());
    let _ = flotilla_compose::convert(&text, &default_name, &|image| {
        asked.lock().unwrap().push(image.to_owned());
        None
    });
    let mut ports = BTreeMap::new();
    let asked = asked.into_inner().unwrap();
    if !asked.is_empty() {
        if let Ok(engine) = flotilla_agent::docker::connect(docker).await {
            for image in asked {
                if let Some(p) = flotilla_agent::docker::exposed_port(&engine, &image).await {
                    ports.insert(image, p);
                }
            }
        }
    }
    flotilla_compose::convert(&text, &default_name, &|image| ports.get(image).copied())
        .map_err(|e| usage(format!("{}: {e}", path.display())))
}

/// Prints what was not carried to stderr, one line each.
pub fn warn_not_carried(file: &Path, list: &[NotCarried]) {
    for n in list {
        eprintln!("{}: not carried: {}: {}", file.display(), n.path, n.why);
    }
}

/// `flotilla convert FILE`.
pub async fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    let c = convert_file(&args.file, args.name.as_deref(), &args.docker).await?;
    if args.json {
        let listed: Vec<_> = c
            .not_carried
            .iter()
            .map(|n| serde_json::json!({"path": n.path, "why": n.why}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "name": c.name,
                "toml": c.toml,
                "not_carried": listed,
            }))?
        );
    } else {
        print!("{}", c.toml);
        warn_not_carried(&args.file, &c.not_carried);
    }
    Ok(())
}
