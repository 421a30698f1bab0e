//! The one error type HTTP handlers return, and the status each kind maps to. Bodies are short
//! and generic: never SQL, key material or DingTalk's text. What a refusal says in the log (with
//! the hint an operator needs, never a received owner key or decrypted bytes) is
//! [`AppError::log_reason`], carried to `callback::track` on the reply ([`Refused`]).

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{
    crypto::{self, Fingerprint},
    event::Malformed,
};

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
    /// The event names an organisation this database does not serve (`store::corps`). Carries
    /// the corp id's fingerprint for the log, never the id.
    #[error("the event's corpId is not an organisation served here")]
    CorpNotServed(Fingerprint),
    /// `/dingtalk/callback/{app}` names no app served here, or `/dingtalk/callback` is used
    /// while several are (then the path must say which).
    #[error("no such app")]
    UnknownApp,
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

/// Why a push was not answered with `success`, marked on the error reply for the callback's
/// metrics and log (`callback::track`).
#[derive(Clone, Debug)]
pub struct Refused {
    /// The outcome label it is counted under.
    pub outcome: &'static str,
    /// What the log says about it ([`AppError::log_reason`]).
    pub reason: String,
}

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
            AppError::CorpNotServed(_) => "refused_corp",
            AppError::UnknownApp => "refused_app",
            AppError::Unavailable => "unavailable",
            AppError::Internal => "failed",
        }
    }

    /// What the log says: the reason with what to check. Fingerprints stand for owner keys and
    /// corp ids (an operator compares them with `printf %s KEY | sha256sum | cut -c1-8`).
    pub fn log_reason(&self) -> String {
        match self {
            AppError::BadSignature => "signature does not match (callback.token?)".into(),
            AppError::Undecryptable(crypto::Error::ReceiverIdMismatch { received }) => format!(
                "owner key {received} is not one we accept; if it is your CorpId or AppKey, add it to callback.owner_key"
            ),
            AppError::Undecryptable(other) => {
                format!("cannot decrypt: {other} (callback.aes_key?)")
            }
            AppError::CorpNotServed(corp) => format!(
                "the event names organisation {corp}, not the organisation of the app it arrived for (dingtalk.corp_id, apps[i].corp_id) nor in dingsync.corps; nothing stored"
            ),
            AppError::UnknownApp => "the callback path names no configured app (with [[apps]], POST /dingtalk/callback/{apps[i].name})".into(),
            other => other.to_string(),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let refused = Refused {
            outcome: self.outcome(),
            reason: self.log_reason(),
        };
        let status = match &self {
            AppError::BadRequest(_) | AppError::Undecryptable(_) | AppError::Malformed(_) => {
                StatusCode::BAD_REQUEST
            }
            AppError::BadSignature | AppError::CorpNotServed(_) => StatusCode::FORBIDDEN,
            AppError::UnknownApp => StatusCode::NOT_FOUND,
            AppError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // The owner key received is fingerprinted in the log, not echoed: the body stays generic.
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
