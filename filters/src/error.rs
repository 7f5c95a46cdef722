//! Stable rejection codes: one machine code, one HTTP status, one OpenAI
//! error type and one public message per reason. The gateway turns a
//! [`Rejection`] into an HTTP response in exactly one function
//! (`portcullis::respond::error_response`).

use serde::Serialize;
use std::borrow::Cow;

/// Why a request was refused. The `snake_case` name is the `code` field of
/// the OpenAI-shaped error body and of the audit record; it never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    UnsupportedMediaType,
    UnknownRoute,
    MethodNotAllowed,
    ModelNotFound,
    RequestTooLarge,
    HeadersTooLarge,
    RequestTimeout,
    PromptInjection,
    ContentPolicy,
    ToolNotAllowed,
    ToolApprovalRequired,
    ApprovalPending,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalUsed,
    ApprovalMismatch,
    ApprovalNotFound,
    SelfApproval,
    ApprovalUnavailable,
    InvalidToken,
    TokenExpired,
    SubjectFrozen,
    TenantFrozen,
    ModelNotApproved,
    ModelFrozen,
    Forbidden,
    InvalidTransition,
    RateLimited,
    TokenBudgetExceeded,
    UpstreamError,
    UpstreamTimeout,
    GuardUnavailable,
    LimiterUnavailable,
    RegistryUnavailable,
    FilterUnavailable,
    AuditUnavailable,
    UnscreenableOutput,
    InternalError,
}

impl ErrorCode {
    /// Every code, for documentation and exhaustive tests.
    pub const ALL: [ErrorCode; 39] = [
        Self::InvalidRequest,
        Self::UnsupportedMediaType,
        Self::UnknownRoute,
        Self::MethodNotAllowed,
        Self::ModelNotFound,
        Self::RequestTooLarge,
        Self::HeadersTooLarge,
        Self::RequestTimeout,
        Self::PromptInjection,
        Self::ContentPolicy,
        Self::ToolNotAllowed,
        Self::ToolApprovalRequired,
        Self::ApprovalPending,
        Self::ApprovalDenied,
        Self::ApprovalExpired,
        Self::ApprovalUsed,
        Self::ApprovalMismatch,
        Self::ApprovalNotFound,
        Self::SelfApproval,
        Self::ApprovalUnavailable,
        Self::InvalidToken,
        Self::TokenExpired,
        Self::SubjectFrozen,
        Self::TenantFrozen,
        Self::ModelNotApproved,
        Self::ModelFrozen,
        Self::Forbidden,
        Self::InvalidTransition,
        Self::RateLimited,
        Self::TokenBudgetExceeded,
        Self::UpstreamError,
        Self::UpstreamTimeout,
        Self::GuardUnavailable,
        Self::LimiterUnavailable,
        Self::RegistryUnavailable,
        Self::FilterUnavailable,
        Self::AuditUnavailable,
        Self::UnscreenableOutput,
        Self::InternalError,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::UnknownRoute => "unknown_route",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::ModelNotFound => "model_not_found",
            Self::RequestTooLarge => "request_too_large",
            Self::HeadersTooLarge => "headers_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::PromptInjection => "prompt_injection",
            Self::ContentPolicy => "content_policy",
            Self::ToolNotAllowed => "tool_not_allowed",
            Self::ToolApprovalRequired => "tool_approval_required",
            Self::ApprovalPending => "approval_pending",
            Self::ApprovalDenied => "approval_denied",
            Self::ApprovalExpired => "approval_expired",
            Self::ApprovalUsed => "approval_used",
            Self::ApprovalMismatch => "approval_mismatch",
            Self::ApprovalNotFound => "approval_not_found",
            Self::SelfApproval => "self_approval",
            Self::ApprovalUnavailable => "approval_unavailable",
            Self::InvalidToken => "invalid_token",
            Self::TokenExpired => "token_expired",
            Self::SubjectFrozen => "subject_frozen",
            Self::TenantFrozen => "tenant_frozen",
            Self::ModelNotApproved => "model_not_approved",
            Self::ModelFrozen => "model_frozen",
            Self::Forbidden => "forbidden",
            Self::InvalidTransition => "invalid_transition",
            Self::RateLimited => "rate_limited",
            Self::TokenBudgetExceeded => "token_budget_exceeded",
            Self::UpstreamError => "upstream_error",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::GuardUnavailable => "guard_unavailable",
            Self::LimiterUnavailable => "limiter_unavailable",
            Self::RegistryUnavailable => "registry_unavailable",
            Self::FilterUnavailable => "filter_unavailable",
            Self::AuditUnavailable => "audit_unavailable",
            Self::UnscreenableOutput => "unscreenable_output",
            Self::InternalError => "internal_error",
        }
    }

    pub const fn status(self) -> u16 {
        match self {
            Self::InvalidRequest | Self::PromptInjection | Self::ContentPolicy => 400,
            Self::InvalidToken | Self::TokenExpired => 401,
            Self::ToolNotAllowed
            | Self::ToolApprovalRequired
            | Self::ApprovalPending
            | Self::ApprovalDenied
            | Self::ApprovalExpired
            | Self::ApprovalUsed
            | Self::ApprovalMismatch
            | Self::SelfApproval
            | Self::SubjectFrozen
            | Self::TenantFrozen
            | Self::ModelNotApproved
            | Self::ModelFrozen
            | Self::Forbidden => 403,
            Self::UnknownRoute | Self::ModelNotFound | Self::ApprovalNotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTimeout => 408,
            Self::InvalidTransition => 409,
            Self::RequestTooLarge => 413,
            Self::HeadersTooLarge => 431,
            Self::UnsupportedMediaType => 415,
            Self::RateLimited | Self::TokenBudgetExceeded => 429,
            Self::InternalError => 500,
            Self::UpstreamError | Self::UnscreenableOutput => 502,
            Self::GuardUnavailable
            | Self::LimiterUnavailable
            | Self::RegistryUnavailable
            | Self::FilterUnavailable
            | Self::ApprovalUnavailable
            | Self::AuditUnavailable => 503,
            Self::UpstreamTimeout => 504,
        }
    }

    /// The OpenAI `error.type` the SDKs expect next to this status.
    pub const fn error_type(self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            400 | 404 | 405 | 408 | 409 | 413 | 415 | 431 => "invalid_request_error",
            429 => "rate_limit_error",
            _ => "api_error",
        }
    }

    /// What the client is told when the rejection carries no message of its
    /// own. Never contains rule ids, scores or anything about other callers.
    pub const fn public_message(self) -> &'static str {
        match self {
            Self::InvalidRequest => "The request is not valid.",
            Self::UnsupportedMediaType => {
                "The request body must be JSON (Content-Type: application/json)."
            }
            Self::UnknownRoute => "No such route.",
            Self::MethodNotAllowed => "This route does not accept that method.",
            Self::ModelNotFound => "The requested model does not exist.",
            Self::RequestTooLarge => "The request body is too large.",
            Self::HeadersTooLarge => "The request line and headers are too large.",
            Self::RequestTimeout => "The request body was not received in time.",
            Self::PromptInjection => {
                "The request was refused: it looks like a prompt-injection attempt."
            }
            Self::ContentPolicy => "The request was refused by the content policy.",
            Self::ToolNotAllowed => "The request uses a tool you are not allowed to use.",
            Self::ToolApprovalRequired => "That tool needs an approval before you may use it.",
            Self::ApprovalPending => {
                "That tool call is still waiting for a person to approve it; retry once it is approved."
            }
            Self::ApprovalDenied => {
                "That tool call was denied by an approver."
            }
            Self::ApprovalExpired => {
                "That approval has expired; send the request again to ask anew."
            }
            Self::ApprovalUsed => {
                "That approval has already been used; an approved call is handed out once."
            }
            Self::ApprovalMismatch => {
                "That approval was given for a different request; repeat the request it was given for."
            }
            Self::ApprovalNotFound => {
                "No such approval."
            }
            Self::SelfApproval => {
                "You cannot decide on an approval for your own request; another approver must."
            }
            Self::ApprovalUnavailable => {
                "The approval store is unavailable; retry later."
            }
            Self::InvalidToken => "The access token is missing or invalid.",
            Self::TokenExpired => "The access token has expired.",
            Self::SubjectFrozen => "Your access has been suspended.",
            Self::TenantFrozen => "Your organisation's access has been suspended.",
            Self::ModelNotApproved => "The requested model is not approved for use.",
            Self::ModelFrozen => "The requested model is temporarily frozen.",
            Self::Forbidden => "You are not allowed to do this.",
            Self::InvalidTransition => "That change is not allowed in the current state.",
            Self::RateLimited => "Rate limit reached; retry later.",
            Self::TokenBudgetExceeded => "Token budget exhausted; retry later.",
            Self::UpstreamError => "The model provider returned an error.",
            Self::UpstreamTimeout => "The model provider did not answer in time.",
            Self::GuardUnavailable => "The content screening service is unavailable.",
            Self::LimiterUnavailable => "The rate limiter is unavailable; retry later.",
            Self::RegistryUnavailable => "The model registry is unavailable; retry later.",
            Self::FilterUnavailable => "A required security check could not be made.",
            Self::AuditUnavailable => "The audit trail cannot be written; retry later.",
            Self::UnscreenableOutput => {
                "The reply could not be screened for secrets, so it was stopped."
            }
            Self::InternalError => "Internal gateway error.",
        }
    }
}

/// A value the client chose, fit for an audit reason: quoted with
/// escapes (no control characters reach the log) and cut to 64
/// characters, with the full length said.
pub fn untrusted(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the code, what the client is told, and why (for the audit
/// record only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    /// Shown to the client.
    pub message: Cow<'static, str>,
    /// Recorded in the audit record, never sent to the client.
    pub reason: String,
}

impl Rejection {
    /// A rejection that shows the client only the code's public message.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            message: Cow::Borrowed(code.public_message()),
            reason: reason.into(),
        }
    }

    /// A rejection about the client's own input, where saying exactly what
    /// is wrong helps and reveals nothing: the message is also the reason.
    pub fn about_input(code: ErrorCode, message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            code,
            reason: message.clone(),
            message: Cow::Owned(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_serialize_as_their_names() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::String(code.as_str().into())
            );
            assert!(code.status() >= 400 && code.status() < 600);
            assert!(!code.public_message().is_empty());
        }
    }

    #[test]
    fn statuses_follow_the_design() {
        assert_eq!(ErrorCode::InvalidRequest.status(), 400);
        assert_eq!(ErrorCode::InvalidToken.status(), 401);
        assert_eq!(ErrorCode::ModelFrozen.status(), 403);
        assert_eq!(ErrorCode::RequestTooLarge.status(), 413);
        assert_eq!(ErrorCode::RateLimited.status(), 429);
        assert_eq!(ErrorCode::UpstreamError.status(), 502);
        assert_eq!(ErrorCode::GuardUnavailable.status(), 503);
        assert_eq!(ErrorCode::UpstreamTimeout.status(), 504);
        assert_eq!(ErrorCode::RateLimited.error_type(), "rate_limit_error");
        assert_eq!(ErrorCode::InvalidToken.error_type(), "authentication_error");
    }

    #[test]
    fn about_input_shows_the_detail_and_new_hides_it() {
        let r = Rejection::new(ErrorCode::PromptInjection, "rule inj-001 score 0.93");
        assert_eq!(r.message, ErrorCode::PromptInjection.public_message());
        assert!(r.reason.contains("inj-001"));
        let r = Rejection::about_input(ErrorCode::InvalidRequest, "`messages` must be an array");
        assert_eq!(r.message, "`messages` must be an array");
    }
}
