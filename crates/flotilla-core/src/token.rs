//! Scoped API tokens: what each role may do, decided from the request alone.
//!
//! The token in the server's token file is the bootstrap admin token. Others are made
//! with `flotilla token create --role ROLE`, shown once, and stored only as a hash
//! (`tokens/ID` in the store). A token reads `flt_ID_SECRET`: the id finds the record,
//! the whole token is compared with its hash.

use serde::{Deserialize, Serialize};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything (the CLI).
    Admin,
    /// Join a node: get a node certificate (for one node when bound), nothing else.
    Agent,
    /// Read services and instances, follow events, publish feedback weights (for one
    /// service when bound).
    Lb,
    /// Read the catalog, metrics and events (dashboards).
    Read,
}

impl Role {
    /// The role's name as the CLI and API spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Agent => "agent",
            Role::Lb => "lb",
            Role::Read => "read",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "agent" => Ok(Role::Agent),
            "lb" => Ok(Role::Lb),
            "read" => Ok(Role::Read),
            other => Err(format!("{other:?}: expected admin, agent, lb or read")),
        }
    }
}

/// A stored token: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Record version.
    pub v: u32,
    /// The public part of the token (`flt_ID_…`).
    pub id: String,
    /// Its role.
    pub role: Role,
    /// For `lb`: the one service it may publish weights for.
    #[serde(default)]
    pub service: Option<String>,
    /// For `agent`: the one node it may join as.
    #[serde(default)]
    pub node: Option<String>,
    /// `sha256:HEX` of the whole token.
    pub hash: String,
    /// When it was made (Unix ms).
    pub created_ms: u64,
}

/// A token as listed: the record without its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    /// Its id.
    pub id: String,
    /// Its role.
    pub role: Role,
    /// Service scope (lb).
    #[serde(default)]
    pub service: Option<String>,
    /// Node scope (agent).
    #[serde(default)]
    pub node: Option<String>,
    /// When it was made (Unix ms); 0 for the bootstrap token.
    #[serde(default)]
    pub created_ms: u64,
}

impl From<&TokenRecord> for TokenView {
    fn from(r: &TokenRecord) -> Self {
        TokenView {
            id: r.id.clone(),
            role: r.role,
            service: r.service.clone(),
            node: r.node.clone(),
            created_ms: r.created_ms,
        }
    }
}

/// `sha256:HEX` of a whole token: what the store keeps of it.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    )
}

/// The id of a token in the `flt_ID_SECRET` form (none for the bootstrap token).
pub fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("flt_")?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty()
        && id.len() <= 32
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && secret.len() >= 32)
        .then_some(id)
}

/// Whether a token of `role` (scoped to `service` for an lb) may make this request.
/// Paths are the raw request paths (`/v1/...`); anything not listed is refused.
pub fn allows(role: Role, service: Option<&str>, method: &str, path: &str) -> bool {
    let read = matches!(method, "GET" | "HEAD");
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // The token list and stack secrets are never for read or lb tokens.
    let tokens_api = segments.get(1) == Some(&"tokens")
        || (segments.get(1) == Some(&"stacks") && segments.get(3) == Some(&"secrets"));
    let whoami = segments.as_slice() == ["v1", "tokens", "self"];
    match role {
        Role::Admin => true,
        Role::Read => read && (!tokens_api || whoami),
        Role::Lb => {
            (read && (!tokens_api || whoami))
                || (method == "PUT"
                    && matches!(segments.as_slice(), ["v1", "services", s, "weights"]
                        if service.is_none_or(|only| only == *s)))
                // Its own report (VRRP state, traffic) for the dashboard.
                || (method == "PUT" && matches!(segments.as_slice(), ["v1", "lbs", _]))
                // Its own certificate, bound to this token (`[registry] cert_dir`).
                || (method == "POST" && segments.as_slice() == ["v1", "certs"])
        }
        Role::Agent => {
            (method == "POST" && segments.as_slice() == ["v1", "certs"])
                || (read && (whoami || segments.as_slice() == ["v1", "ca"]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_may_do_its_job_only() {
        use Role::*;
        let cases: &[(Role, Option<&str>, &str, &str, bool)] = &[
            (Admin, None, "PUT", "/v1/stacks/s", true),
            (Admin, None, "POST", "/v1/tokens", true),
            (Read, None, "GET", "/v1/services/web", true),
            (Read, None, "GET", "/v1/events", true),
            (Read, None, "GET", "/v1/tokens", false),
            (Read, None, "GET", "/v1/stacks/s/secrets/db", false),
            (Lb, None, "GET", "/v1/stacks/s/secrets/db", false),
            (Read, None, "GET", "/v1/tokens/self", true),
            (Read, None, "PUT", "/v1/instances/x", false),
            (Read, None, "DELETE", "/v1/stacks/s", false),
            (Lb, None, "GET", "/v1/services/web", true),
            (Lb, None, "PUT", "/v1/services/web/weights", true),
            (Lb, Some("web"), "PUT", "/v1/services/web/weights", true),
            (Lb, Some("web"), "PUT", "/v1/services/api/weights", false),
            (Lb, None, "PUT", "/v1/stacks/s", false),
            (Lb, Some("web"), "PUT", "/v1/lbs/lb-a", true),
            (Lb, Some("web"), "POST", "/v1/certs", true),
            (Lb, Some("web"), "POST", "/v1/certs/renew", false),
            (Read, None, "POST", "/v1/certs", false),
            (Read, None, "PUT", "/v1/lbs/lb-a", false),
            (Read, None, "GET", "/v1/lbs", true),
            (Agent, None, "PUT", "/v1/lbs/lb-a", false),
            (Lb, None, "POST", "/v1/stacks/s/rollback", false),
            (Lb, None, "PUT", "/v1/instances/x", false),
            // An lb certificate only: the join handler refuses a node join with it.
            (Lb, None, "POST", "/v1/certs", true),
            (Agent, None, "POST", "/v1/certs", true),
            (Agent, None, "GET", "/v1/ca", true),
            (Agent, None, "GET", "/v1/instances", false),
            (Agent, None, "PUT", "/v1/nodes/n1", false),
            (Agent, None, "POST", "/v1/certs/renew", false),
        ];
        for (role, service, method, path, want) in cases {
            assert_eq!(
                allows(*role, *service, method, path),
                *want,
                "{role:?} {service:?} {method} {path}"
            );
        }
    }

    #[test]
    fn token_ids_come_from_the_token_form_only() {
        let secret = "a".repeat(64);
        assert_eq!(
            token_id(&format!("flt_0a1b2c3d_{secret}")),
            Some("0a1b2c3d")
        );
        assert_eq!(token_id(&secret), None, "the bootstrap token has no id");
        assert_eq!(token_id("flt__x"), None);
        assert_eq!(
            token_id("flt_zz_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            None
        );
        assert_eq!(token_id("flt_0a_short"), None);
        assert_eq!("lb".parse::<Role>(), Ok(Role::Lb));
        assert!("root".parse::<Role>().is_err());
    }
}
