//! Request intake: which route a request is for. Whether its body is one
//! the gateway can screen and forward is decided in `filters::intake`.

use filters::{ErrorCode, Rejection, Route};

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An LLM call the gateway forwards.
    Call(Route),
    /// `GET /v1/models`.
    ListModels,
    /// `GET /v1/models/{id}`.
    GetModel(String),
}

/// Match method and path (query string ignored).
pub fn resolve(method: &str, path: &str) -> Result<Endpoint, Rejection> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let (endpoint, allowed) = match path {
        "/v1/chat/completions" => (Endpoint::Call(Route::ChatCompletions), "POST"),
        "/v1/completions" => (Endpoint::Call(Route::Completions), "POST"),
        "/v1/embeddings" => (Endpoint::Call(Route::Embeddings), "POST"),
        "/v1/models" => (Endpoint::ListModels, "GET"),
        _ => match path.strip_prefix("/v1/models/") {
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
                return Err(Rejection::about_input(
                    ErrorCode::UnknownRoute,
                    format!("No route {method} {path}. This gateway serves /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models."),
                ))
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

pub use filters::intake::{check_content_type, parse_body, CallBody, Shape};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve() {
        assert_eq!(
            resolve("POST", "/v1/chat/completions"),
            Ok(Endpoint::Call(Route::ChatCompletions))
        );
        assert_eq!(resolve("GET", "/v1/models/"), Ok(Endpoint::ListModels));
        assert_eq!(
            resolve("GET", "/v1/models/meta-llama%2Fx"),
            Ok(Endpoint::GetModel("meta-llama/x".into()))
        );
        assert_eq!(
            resolve("GET", "/v2/x").unwrap_err().code,
            ErrorCode::UnknownRoute
        );
        assert_eq!(
            resolve("GET", "/v1/chat/completions").unwrap_err().code,
            ErrorCode::MethodNotAllowed
        );
    }
}
