//! Credentials an agent pulls registry images with: a file on each host, in the
//! format `docker login` writes (`~/.docker/config.json`: `{"auths": {"HOST": {"auth":
//! "BASE64(USER:PASSWORD)"}}}`, or `username` and `password` in place of `auth`), so an
//! operator can point the agent at the file they already have. The file never leaves
//! the host: a stack names only the image, and the server never sees a password.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

/// One registry's user and password (or token).
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

// Never printed: logs and errors show which registry, not what was sent to it.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, ***)", self.username)
    }
}

/// Credentials by registry host (`reg.example:5000`; `docker.io` for Docker Hub).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryAuth {
    by_host: BTreeMap<String, Credential>,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize)]
struct Entry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl RegistryAuth {
    /// Reads and checks the file: it must be readable by its owner only (it holds
    /// passwords), parse, and give every registry a user and a password. Errors name
    /// the file and the entry.
    pub fn load(path: &Path) -> Result<RegistryAuth, String> {
        let shown = path.display();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(format!(
                    "{shown}: mode {mode:o} lets other users read registry passwords; chmod 600 it"
                ));
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
        Self::parse(&text).map_err(|e| format!("{shown}: {e}"))
    }

    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<RegistryAuth, String> {
        let f: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut by_host = BTreeMap::new();
        for (host, e) in f.auths {
            let field = format!("auths.{host:?}");
            let cred = match (e.auth, e.username, e.password) {
                (Some(a), None, None) => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(a.trim())
                        .map_err(|_| format!("{field}.auth: not base64"))?;
                    let raw = String::from_utf8(raw)
                        .map_err(|_| format!("{field}.auth: not UTF-8 once decoded"))?;
                    let (u, p) = raw
                        .split_once(':')
                        .ok_or_else(|| format!("{field}.auth: decodes to no USER:PASSWORD"))?;
                    Credential {
                        username: u.to_owned(),
                        password: p.to_owned(),
                    }
                }
                (None, Some(u), Some(p)) => Credential {
                    username: u,
                    password: p,
                },
                _ => {
                    return Err(format!(
                        "{field}: give either auth, or username and password"
                    ))
                }
            };
            by_host.insert(normalise(&host).to_owned(), cred);
        }
        if by_host.is_empty() {
            return Err(match f.creds_store {
                // Docker Desktop and `pass` keep the passwords in a helper, not here.
                Some(s) => format!(
                    "the passwords are in the credential helper {s:?}, not in this file; \
                     write a file with auths for the agent"
                ),
                None => "no auths: no registry has credentials here".into(),
            });
        }
        Ok(RegistryAuth { by_host })
    }

    /// The credential for `registry` (as an image reference names it: `host:port`, or
    /// `docker.io`).
    pub fn for_registry(&self, registry: &str) -> Option<&Credential> {
        self.by_host.get(normalise(registry))
    }

    /// The registries that have credentials.
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.by_host.keys().map(String::as_str)
    }
}

/// `docker login` keys Docker Hub as a URL; an image names it `docker.io`.
fn normalise(host: &str) -> &str {
    let h = host
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    match h {
        "index.docker.io/v1" | "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_login_s_file_is_read() {
        let a = RegistryAuth::parse(
            r#"{"auths": {
                "127.0.0.1:5000": {"auth": "dXNlcjpzM2NyZXQ6d2l0aC1jb2xvbg=="},
                "https://index.docker.io/v1/": {"username": "me", "password": "tok"}
            }}"#,
        )
        .unwrap();
        let c = a.for_registry("127.0.0.1:5000").unwrap();
        // Only the first colon splits: a password may hold more.
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "s3cret:with-colon")
        );
        assert_eq!(a.for_registry("docker.io").unwrap().username, "me");
        assert!(a.for_registry("other:5000").is_none());
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn bad_files_name_the_entry() {
        let e = RegistryAuth::parse(r#"{"auths": {"r:1": {"auth": "%%%"}}}"#).unwrap_err();
        assert!(e.contains("\"r:1\"") && e.contains("base64"), "{e}");
        let e = RegistryAuth::parse(r#"{"auths": {"r:1": {"username": "u"}}}"#).unwrap_err();
        assert!(
            e.contains("\"r:1\"") && e.contains("username and password"),
            "{e}"
        );
        let e = RegistryAuth::parse(r#"{"credsStore": "desktop"}"#).unwrap_err();
        assert!(e.contains("credential helper"), "{e}");
        assert!(RegistryAuth::parse("{").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("auth.json");
        std::fs::write(
            &p,
            r#"{"auths": {"r:1": {"username": "u", "password": "p"}}}"#,
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = RegistryAuth::load(&p).unwrap_err();
        assert!(
            e.contains("auth.json") && e.contains("644") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(RegistryAuth::load(&p)
            .unwrap()
            .for_registry("r:1")
            .is_some());
    }
}
