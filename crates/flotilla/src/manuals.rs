//! Shell completions and man pages, made from the clap definitions: what the CLI
//! accepts and what its help says are written once, in `cli.rs`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::Cli;

/// `flotilla completions SHELL`: the completion script on `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "flotilla", out);
    Ok(())
}

/// `flotilla man [--dir D]`: flotilla.1 and a page per command (`flotilla-deploy.1`)
/// into `dir`, or flotilla.1 to stdout.
pub fn man(dir: Option<&Path>) -> anyhow::Result<()> {
    let cmd = Cli::command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut page = |name: String, cmd: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.display_name(name.clone())).render(&mut buf)?;
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page(format!("flotilla-{}", sub.get_name()), sub.clone())?;
    }
    page("flotilla".into(), cmd)?;
    println!("{} man pages in {}", written.len(), dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_know_every_command() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            completions(shell, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            for sub in ["deploy", "migrate", "recover", "logs", "completions"] {
                assert!(text.contains(sub), "{shell:?} lacks {sub}");
            }
        }
    }

    #[test]
    fn a_man_page_per_command() {
        let dir = tempfile::tempdir().unwrap();
        man(Some(dir.path())).unwrap();
        let page = std::fs::read_to_string(dir.path().join("flotilla-migrate.1")).unwrap();
        assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
        assert!(page.contains("blue/green"), "{page}");
        let main = std::fs::read_to_string(dir.path().join("flotilla.1")).unwrap();
        assert!(main.contains("flotilla\\-deploy") || main.contains("deploy"));
        // The internal crash guard has no page.
        assert!(!dir.path().join("flotilla-ha-guard.1").exists());
    }
}
