//! Error kinds shared at crate edges.

use std::path::PathBuf;

/// A request or spec field that failed validation: names the field and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct FieldError {
    /// Dotted path of the offending field, e.g. `checks[0].interval`.
    pub field: String,
    /// What is wrong with its value.
    pub message: String,
}

impl FieldError {
    /// Builds an error for `field` with a message.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A config file that could not be loaded. Its `Display` names file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax error or unknown/mistyped key; `message` carries line and column.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The file parsed but a value is not acceptable.
    #[error("{path}: {error}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field and what is wrong.
        error: FieldError,
    },
}

/// An error with all its sources, `outer: inner: innermost` — transport errors hide the
/// useful part (connection refused, timed out) in their sources.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The body of every error answer of flotilla's HTTP APIs (registry and agent): what
/// went wrong, and where known the request field or the stage that failed. Clients
/// decode this one shape whichever API they called.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// The message, naming the field first when one was wrong (`checks[0].interval: …`).
    pub error: String,
    /// The request field that was wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The stage of a multi-step operation that failed (`"check"`: an uploaded archive
    /// was refused as input, nothing was written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

impl ErrorBody {
    /// The message of an error answer's body: the decoded `error`, else the body as text.
    pub fn message_of(body: &[u8]) -> String {
        serde_json::from_slice::<ErrorBody>(body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned())
    }
}
