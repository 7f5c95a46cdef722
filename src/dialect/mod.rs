//! Wire formats. Each API the gateway speaks is one module that knows its
//! paths, the fields of its requests and replies, its stream events and
//! its error shape; the proxy service (`crate::proxy`) asks the dialect
//! of a request and reads no field of a particular API itself.
//!
//! - [`openai_chat`]: `POST /v1/chat/completions`
//! - [`openai_completions`]: `POST /v1/completions` (legacy)
//! - [`openai_embeddings`]: `POST /v1/embeddings`
//! - [`openai`]: what the three share (errors, usage, replies, streams),
//!   and `GET /v1/models`
//!
//! A new format (another provider's API) is one more module implementing
//! [`Dialect`] and one more row in [`resolve`].

pub mod openai;
pub mod openai_chat;
pub mod openai_completions;
pub mod openai_embeddings;

use filters::intake::{CallBody, Shape};
use filters::{ErrorCode, Rejection, Route, SseEvent};
use serde_json::Value;

/// How to rewrite a screened request for the provider.
#[derive(Debug, Default)]
pub struct Forward<'a> {
    /// The provider's name for the model.
    pub model: &'a str,
    /// Ask the provider to report usage at the end of a stream (the
    /// gateway settles a token budget from it; the client did not ask).
    pub ask_usage: bool,
    /// Declared tools to remove (tool policy).
    pub strip_tools: &'a [String],
}

/// What the gateway learns from a streamed reply, event by event.
#[derive(Debug, Default)]
pub struct StreamFacts {
    /// The usage the provider reported, in the dialect's shape.
    pub usage: Option<Value>,
    /// The stream ended properly (OpenAI: `data: [DONE]`).
    pub done: bool,
    /// Characters generated so far, to settle a budget with when no
    /// usage comes.
    pub generated_chars: u64,
}

/// One API's wire format.
pub trait Dialect: Send + Sync {
    /// The route, as records, metrics and filters name it.
    fn route(&self) -> Route;

    /// The path below the provider's base URL (`/v1`).
    fn upstream_path(&self) -> &'static str;

    /// Check and parse a request body.
    fn parse(&self, body: &[u8], shape: &Shape) -> Result<CallBody, Rejection>;

    /// Whether a streamed request should ask the provider for usage
    /// because the client did not.
    fn needs_usage_request(&self, request: &Value) -> bool;

    /// Whether forwarding needs the body rewritten (else its bytes go as
    /// they came).
    fn needs_rewrite(&self, request: &CallBody, forward: &Forward<'_>) -> bool {
        forward.model != request.model || forward.ask_usage || !forward.strip_tools.is_empty()
    }

    /// Rewrite a request body for the provider.
    fn forward(&self, request: &mut Value, forward: &Forward<'_>);

    /// How many replies (choices) the request asked for.
    fn choices(&self, request: &Value) -> u64;

    /// The usage a whole reply reports.
    fn reply_usage(&self, reply: &Value) -> Option<Value>;

    /// Tokens used in all, from usage in this dialect's shape.
    fn total_tokens(&self, usage: &Value) -> Option<u64>;

    /// Note one upstream stream event. An event the gateway cannot screen
    /// (data that is neither the end marker nor a JSON object) is an
    /// error: the stream is ended, not relayed.
    fn note_event(&self, event: &SseEvent, facts: &mut StreamFacts) -> Result<(), String>;

    /// An event carrying only the usage the gateway asked for (kept from
    /// a client that did not ask).
    fn is_usage_only(&self, event: &SseEvent) -> bool;

    /// An event that closes a reply (its end marker, a finish, the usage
    /// after it): held back by the output guard until the last judgement.
    fn is_closing(&self, event: &SseEvent) -> bool;

    /// Every text a reply (or one stream event) generated, per choice:
    /// what the output guard judges.
    fn reply_texts(&self, reply: &Value) -> Vec<(u64, String)>;

    /// Withhold a whole reply the output guard judged unsafe, the way the
    /// API's own providers do.
    fn withhold(&self, reply: &mut Value);

    /// The events that end a stream the output guard cut.
    fn withheld_end(&self, model: Option<&str>, choices: u64) -> Vec<SseEvent>;

    /// A rejection as this API's error body.
    fn error_body(&self, rejection: &Rejection) -> Vec<u8>;

    /// A rejection as one stream event, for a stream already under way.
    fn error_event(&self, rejection: &Rejection) -> SseEvent;
}

/// What a request asks for.
#[derive(Clone)]
pub enum Endpoint {
    /// An LLM call the gateway forwards.
    Call(&'static dyn Dialect),
    /// `GET /v1/models`.
    ListModels,
    /// `GET /v1/models/{id}`.
    GetModel(String),
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Call(d) => write!(f, "Call({})", d.route().as_str()),
            Self::ListModels => f.write_str("ListModels"),
            Self::GetModel(id) => write!(f, "GetModel({id})"),
        }
    }
}

/// The dialect errors are written in before a request's own is known.
pub const DEFAULT: &dyn Dialect = &openai_chat::CHAT;

/// Every call route: method `POST`, path, dialect.
const CALLS: [(&str, &dyn Dialect); 3] = [
    ("/v1/chat/completions", &openai_chat::CHAT),
    ("/v1/completions", &openai_completions::COMPLETIONS),
    ("/v1/embeddings", &openai_embeddings::EMBEDDINGS),
];

/// Match method and path (query string ignored). For `GetModel`, the id
/// is the path after `/v1/models/`.
pub fn resolve(method: &str, path: &str) -> Result<Endpoint, Rejection> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let (endpoint, allowed) = match CALLS.iter().find(|(p, _)| *p == path) {
        Some((_, dialect)) => (Endpoint::Call(*dialect), "POST"),
        None if path == "/v1/models" => (Endpoint::ListModels, "GET"),
        None => match path.strip_prefix("/v1/models/") {
            Some(id) if !id.is_empty() => match crate::http_server::percent_decode(id) {
                Some(id) => (Endpoint::GetModel(id), "GET"),
                None => {
                    return Err(Rejection::about_input(
                        ErrorCode::InvalidRequest,
                        "The model id in the path is not valid percent-encoded UTF-8.",
                    ))
                }
            },
            _ => {
                let served: Vec<&str> = CALLS.iter().map(|(p, _)| *p).collect();
                return Err(Rejection::about_input(
                    ErrorCode::UnknownRoute,
                    format!(
                        "No route {method} {path}. This gateway serves {} and /v1/models.",
                        served.join(", ")
                    ),
                ));
            }
        },
    };
    if method != allowed {
        return Err(Rejection::about_input(
            ErrorCode::MethodNotAllowed,
            format!("{path} accepts {allowed}, not {method}."),
        ));
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_of(method: &str, path: &str) -> Option<Route> {
        match resolve(method, path) {
            Ok(Endpoint::Call(d)) => Some(d.route()),
            _ => None,
        }
    }

    #[test]
    fn routes_resolve() {
        assert_eq!(
            route_of("POST", "/v1/chat/completions"),
            Some(Route::ChatCompletions)
        );
        assert_eq!(
            route_of("POST", "/v1/completions/"),
            Some(Route::Completions)
        );
        assert_eq!(route_of("POST", "/v1/embeddings"), Some(Route::Embeddings));
        assert!(matches!(
            resolve("GET", "/v1/models/"),
            Ok(Endpoint::ListModels)
        ));
        assert!(matches!(
            resolve("GET", "/v1/models/meta-llama%2Fx"),
            Ok(Endpoint::GetModel(id)) if id == "meta-llama/x"
        ));
        let unknown = resolve("GET", "/v2/x").unwrap_err();
        assert_eq!(unknown.code, ErrorCode::UnknownRoute);
        assert!(
            unknown.message.contains("/v1/embeddings"),
            "{}",
            unknown.message
        );
        assert_eq!(
            resolve("GET", "/v1/chat/completions").unwrap_err().code,
            ErrorCode::MethodNotAllowed
        );
        // Every dialect's upstream path is its own route's.
        for (path, d) in CALLS {
            assert_eq!(format!("/v1{}", d.upstream_path()), path);
        }
    }
}
