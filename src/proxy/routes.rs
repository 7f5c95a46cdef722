//! The gateway's routes: method and path to the wire format that serves
//! them (`filters::dialect`), or the model list.

use filters::dialect::{
    anthropic_messages, openai_chat, openai_completions, openai_embeddings, Dialect,
};
use filters::{ErrorCode, Rejection};

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

/// Every call route: method `POST`, path, dialect.
const CALLS: [(&str, &dyn Dialect); 5] = [
    ("/v1/chat/completions", &openai_chat::CHAT),
    ("/v1/completions", &openai_completions::COMPLETIONS),
    ("/v1/embeddings", &openai_embeddings::EMBEDDINGS),
    ("/v1/messages", &anthropic_messages::MESSAGES),
    (
        "/v1/messages/count_tokens",
        &anthropic_messages::COUNT_TOKENS,
    ),
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
    use filters::Route;

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
