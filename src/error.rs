//! The one error type HTTP handlers return, and the status each kind maps to. Bodies are short
//! and generic: never SQL, key material or DingTalk's text.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{crypto, event::Malformed};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("signature does not match")]
    BadSignature,
    #[error("cannot decrypt: {0}")]
    Undecryptable(crypto::Error),
    #[error("malformed event: {0}")]
    Malformed(Malformed),
    #[error("database unavailable, retry later")]
    Unavailable,
    #[error("internal error")]
    Internal,
}

impl From<crypto::Error> for AppError {
    fn from(e: crypto::Error) -> Self {
        match e {
            crypto::Error::BadSignature => AppError::BadSignature,
            other => AppError::Undecryptable(other),
        }
    }
}

/// Why a push was refused, marked on the error reply for the callback's metrics.
#[derive(Clone, Copy, Debug)]
pub struct Refused(pub &'static str);

impl AppError {
    /// The outcome label a refusal is counted under.
    pub fn outcome(&self) -> &'static str {
        match self {
            AppError::BadRequest(_) | AppError::Malformed(_) => "refused_malformed",
            AppError::BadSignature => "refused_signature",
            AppError::Undecryptable(crypto::Error::ReceiverIdMismatch { .. }) => {
                "refused_owner_key"
            }
            AppError::Undecryptable(_) => "refused_decrypt",
            AppError::Unavailable => "unavailable",
            AppError::Internal => "failed",
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let refused = Refused(self.outcome());
        let status = match &self {
            AppError::BadRequest(_) | AppError::Undecryptable(_) | AppError::Malformed(_) => {
                StatusCode::BAD_REQUEST
            }
            AppError::BadSignature => StatusCode::FORBIDDEN,
            AppError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // The owner key received is logged, not echoed: the body stays generic.
        let message = match &self {
            AppError::Undecryptable(crypto::Error::ReceiverIdMismatch { .. }) => {
                "owner key not accepted".to_string()
            }
            other => other.to_string(),
        };
        (
            status,
            axum::Extension(refused),
            Json(json!({ "error": message })),
        )
            .into_response()
    }
}
