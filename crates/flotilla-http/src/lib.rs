//! The error shape and JSON body extractor flotilla's HTTP APIs share.
//!
//! The registry and the agent used to answer errors in two shapes (one named the
//! field, the other the stage) from two types; clients then decoded each its own way.
//! Both servers now answer with [`ApiError`], whose body is
//! [`flotilla_core::error::ErrorBody`], and parse JSON bodies with [`JsonBody`], which
//! names the offending field (and [`Query`] for query strings).
#![warn(missing_docs)]

pub mod metrics;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flotilla_core::error::{ErrorBody, FieldError};
use serde::de::DeserializeOwned;

/// An error answer: status, message, and where known the offending field or the stage
/// that failed, with an optional `Retry-After`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
    stage: Option<&'static str>,
    /// Seconds for a `Retry-After` header (the request may be sent again then).
    retry_after: Option<u32>,
}

impl ApiError {
    /// An error with a status and a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
            stage: None,
            retry_after: None,
        }
    }

    /// An error about one request field (its dotted path).
    pub fn field(status: StatusCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.into()),
            ..Self::new(status, message)
        }
    }

    /// 404 for `what`.
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }

    /// 400: the request was malformed.
    pub fn bad_request(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message.to_string())
    }

    /// 422: the request was well formed but its content was refused.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    /// 500: the server failed (the message carries the error's chain of causes).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// Names the stage of a multi-step operation that failed.
    pub fn at(mut self, stage: &'static str) -> Self {
        self.stage = Some(stage);
        self
    }

    /// Asks the client to send the request again after `secs` (a busy answer).
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The same error with its message rewritten (`"…; removed the copy"`).
    pub fn with_message(mut self, f: impl FnOnce(&str) -> String) -> Self {
        self.message = f(&self.message);
        self
    }

    /// The answer's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The request field that was wrong, if one was.
    pub fn field_name(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::field(StatusCode::BAD_REQUEST, e.field, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: match &self.field {
                Some(f) => format!("{f}: {}", self.message),
                None => self.message,
            },
            field: self.field,
            stage: self.stage.map(str::to_owned),
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// A JSON body parsed with the path of the offending field in errors.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::field(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body",
                    "request body exceeds the size limit",
                )
            } else {
                ApiError::field(StatusCode::BAD_REQUEST, "body", e.body_text())
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Query parameters, deserialized into `T`; a wrong one answers 400 in the one error
/// shape (axum's own extractor answers plain text).
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "query", e.body_text()))
    }
}

/// Parses JSON, naming the field that is wrong (`checks[0].interval`, `colour`...).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let inner = e.inner().to_string();
        if e.inner().is_syntax() || e.inner().is_eof() {
            return ApiError::field(
                StatusCode::BAD_REQUEST,
                "body",
                format!("malformed JSON: {inner}"),
            );
        }
        let mut field = e.path().to_string();
        // serde_path_to_error already puts an unknown field in the path, not a missing one.
        if let Some(rest) = inner.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or_default();
            field = if field == "." {
                name.to_owned()
            } else {
                format!("{field}.{name}")
            };
        } else if field == "." || field == "?" {
            field = "body".into();
        }
        ApiError::field(StatusCode::BAD_REQUEST, field, inner)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Check {
        interval: u32,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Spec {
        checks: Vec<Check>,
    }

    #[test]
    fn a_wrong_field_is_named_by_its_path() {
        let e = parse_json::<Spec>(br#"{"checks":[{"interval":"x"}]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("checks[0].interval"));
        let e = parse_json::<Spec>(br#"{"checks":[{}]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("checks[0].interval"));
        let e = parse_json::<Spec>(b"{").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("body"));
    }

    #[tokio::test]
    async fn every_error_answers_the_one_body_shape() {
        let resp = ApiError::unprocessable("digest mismatch")
            .at("check")
            .into_response();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let b: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(b.error, "digest mismatch");
        assert_eq!(b.stage.as_deref(), Some("check"));
        let resp = ApiError::field(StatusCode::BAD_REQUEST, "spec.replicas", "must be > 0")
            .retry_after(1)
            .into_response();
        assert_eq!(resp.headers()["retry-after"], "1");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let b: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(b.error, "spec.replicas: must be > 0");
        assert_eq!(b.field.as_deref(), Some("spec.replicas"));
        assert_eq!(ErrorBody::message_of(b"plain text\n"), "plain text");
    }
}
