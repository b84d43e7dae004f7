//! Child processes of a benchmark: the release `flotilla` binary and the anchors
//! (HAProxy, Nginx), killed when dropped so no run leaves anything behind.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// A child process, killed and reaped on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` with its standard streams detached.
pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Proc> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc {
        child,
        name: name.to_owned(),
    })
}

/// The `flotilla` binary built next to this benchmark binary.
pub fn flotilla_binary() -> anyhow::Result<PathBuf> {
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("flotilla");
    anyhow::ensure!(
        bin.exists(),
        "{} not found: run `cargo build --release -p flotilla` first",
        bin.display()
    );
    Ok(bin)
}

/// Starts `flotilla ARGS` with warnings-only logging.
pub fn flotilla(args: &[&str]) -> anyhow::Result<Proc> {
    spawn(
        "flotilla",
        Command::new(flotilla_binary()?)
            .args(args)
            .env("RUST_LOG", "warn"),
    )
}
