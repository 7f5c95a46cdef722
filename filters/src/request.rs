//! What a request filter may look at.

use serde::Serialize;
use std::net::IpAddr;

/// The LLM routes the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Route {
    #[serde(rename = "chat/completions")]
    ChatCompletions,
    #[serde(rename = "completions")]
    Completions,
    #[serde(rename = "embeddings")]
    Embeddings,
    /// Anthropic's Messages API.
    #[serde(rename = "messages")]
    Messages,
    /// Anthropic's token counting for a Messages request.
    #[serde(rename = "messages/count_tokens")]
    CountTokens,
    #[serde(rename = "models")]
    Models,
}

impl Route {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat/completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Messages => "messages",
            Self::CountTokens => "messages/count_tokens",
            Self::Models => "models",
        }
    }
}

/// Who is calling: established by `jwt_auth`, read by every later filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Principal {
    pub subject: String,
    pub tenant: String,
    pub roles: Vec<String>,
}

impl Principal {
    /// Whether a policy override naming `tenant` and `role` (each
    /// optional) applies to the caller `p`; an unauthenticated caller
    /// fits only an override that names neither.
    pub fn fits(p: Option<&Principal>, tenant: Option<&str>, role: Option<&str>) -> bool {
        tenant.is_none_or(|t| p.is_some_and(|p| p.tenant == t))
            && role.is_none_or(|r| p.is_some_and(|p| p.roles.iter().any(|x| x == r)))
    }
}

/// A parsed request as the request chain sees it. Read-only: filters
/// return facts and decisions, the chain applies them.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub request_id: &'a str,
    /// The `Authorization` header as sent, if any.
    pub authorization: Option<&'a str>,
    /// Set by the chain once `jwt_auth` has identified the caller, or
    /// given by `/admin/simulate` with `dry_run`.
    pub principal: Option<&'a Principal>,
    /// A simulation: decide, but spend nothing (no limit is charged).
    pub dry_run: bool,
    pub route: Route,
    /// The parsed JSON body (`Value::Null` for bodiless routes), as
    /// written: filters read [`RequestView::prompt`], and only write back
    /// into the body at the pointers it gives.
    pub body: &'a serde_json::Value,
    /// What the request's dialect made of the body.
    pub prompt: &'a crate::prompt::Prompt<'a>,
    /// The `model` field, when the body has one.
    pub model: Option<&'a str>,
    /// Whether the client asked for a streamed (SSE) response.
    pub stream: bool,
    pub client_ip: Option<IpAddr>,
}
