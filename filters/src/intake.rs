//! Request intake: whether a request body is one the gateway can screen
//! and forward. Every check here is a pure function of the bytes (the
//! fuzz target `intake` drives it).

use crate::{ErrorCode, Rejection, Route};
use serde_json::Value;

/// `Content-Type` must be JSON when given. A missing one is accepted: the
/// body is parsed as JSON either way.
pub fn check_content_type(content_type: Option<&[u8]>) -> Result<(), Rejection> {
    let Some(raw) = content_type else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(raw);
    let mime = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else {
        Err(Rejection::about_input(
            ErrorCode::UnsupportedMediaType,
            format!("Content-Type must be application/json, not {mime}."),
        ))
    }
}

/// The request line and headers within `max_count` headers and
/// `max_bytes` bytes (`limits.max_header_count`, `max_header_bytes`).
pub fn headers_fit(
    count: usize,
    bytes: usize,
    max_count: usize,
    max_bytes: usize,
) -> Result<(), Rejection> {
    if count > max_count || bytes > max_bytes {
        return Err(Rejection::about_input(
            ErrorCode::HeadersTooLarge,
            format!(
                "The request has {count} headers and {bytes} bytes of request line and headers; at most {max_count} and {max_bytes} are accepted."
            ),
        ));
    }
    Ok(())
}

/// A body over `max` bytes (declared or as read).
pub fn too_large(max: usize) -> Rejection {
    Rejection::about_input(
        ErrorCode::RequestTooLarge,
        format!("The request body is larger than the limit of {max} bytes."),
    )
}

/// A well-formed incoming `x-request-id`, kept in the record's
/// `client_request_id` (the record's own `request_id` is always new:
/// clients may send any id, the same one twice included).
pub fn client_request_id(incoming: Option<&[u8]>) -> Option<String> {
    match incoming {
        Some(id)
            if (1..=128).contains(&id.len())
                && id.iter().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')
                }) =>
        {
            Some(String::from_utf8_lossy(id).into_owned())
        }
        _ => None,
    }
}

/// A request body that passed intake.
#[derive(Debug)]
pub struct CallBody {
    pub json: Value,
    pub model: String,
    pub stream: bool,
}

/// What a body may hold at most, beyond its size in bytes: bounds on the
/// work every filter does on it.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Nesting of arrays and objects (the parser itself stops at 128).
    pub max_depth: usize,
    /// Entries of `messages`.
    pub max_messages: usize,
    /// Entries of `tools` and of `functions`.
    pub max_tools: usize,
    /// Characters of all strings together, keys included.
    pub max_chars: usize,
    /// Values of every kind (counted while parsing, before they are built).
    pub max_values: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            max_depth: 64,
            max_messages: 2048,
            max_tools: 128,
            max_chars: 4 << 20,
            max_values: 200_000,
        }
    }
}

/// Depth and characters of a JSON value, without recursion; stops early
/// once either is over its bound.
fn measure(value: &Value, shape: &Shape) -> Result<(), Rejection> {
    let mut chars = 0usize;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 1)];
    while let Some((v, depth)) = stack.pop() {
        match v {
            Value::String(s) => chars += s.chars().count(),
            Value::Array(items) => {
                if depth > shape.max_depth {
                    return Err(too_deep(shape));
                }
                stack.extend(items.iter().map(|i| (i, depth + 1)));
            }
            Value::Object(map) => {
                if depth > shape.max_depth {
                    return Err(too_deep(shape));
                }
                for (k, item) in map {
                    chars += k.chars().count();
                    stack.push((item, depth + 1));
                }
            }
            _ => {}
        }
        if chars > shape.max_chars {
            return Err(Rejection::about_input(
                ErrorCode::RequestTooLarge,
                format!(
                    "The request holds more than {} characters of text.",
                    shape.max_chars
                ),
            ));
        }
    }
    Ok(())
}

fn too_deep(shape: &Shape) -> Rejection {
    Rejection::about_input(
        ErrorCode::InvalidRequest,
        format!(
            "The body nests arrays and objects deeper than {} levels.",
            shape.max_depth
        ),
    )
}

/// Parse and check the fields every route needs.
pub fn parse_body(route: Route, bytes: &[u8], shape: &Shape) -> Result<CallBody, Rejection> {
    let bad = |m: &str| Rejection::about_input(ErrorCode::InvalidRequest, m.to_string());
    let json: Value =
        crate::json::parse_strict_bounded(bytes, shape.max_values).map_err(|e| match e {
            crate::json::Bounded::TooMany(n) => Rejection::about_input(
                ErrorCode::RequestTooLarge,
                format!("The body holds more than {n} JSON values."),
            ),
            crate::json::Bounded::Json(e) => Rejection::about_input(
                ErrorCode::InvalidRequest,
                format!("The body is not valid JSON: {e}."),
            ),
        })?;
    let Some(obj) = json.as_object() else {
        return Err(bad("The body must be a JSON object."));
    };
    measure(&json, shape)?;
    let too_many = |what: &str, n: usize, max: usize| {
        Rejection::about_input(
            ErrorCode::RequestTooLarge,
            format!("`{what}` has {n} entries; at most {max} are accepted."),
        )
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(bad("`model` is required and must be a non-empty string.")),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("`stream` must be true or false.")),
    };
    match obj.get("stream_options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            if !matches!(
                o.get("include_usage"),
                None | Some(Value::Null | Value::Bool(_))
            ) {
                return Err(bad("`stream_options.include_usage` must be true or false."));
            }
        }
        Some(_) => return Err(bad("`stream_options` must be an object.")),
    }
    // Fields the gateway reads to charge budgets and judge tools: a wrong
    // type is refused here rather than misread later.
    for (field, min, max) in [
        ("n", 1, 128),
        ("best_of", 1, 20),
        ("max_tokens", 0, u64::MAX),
        ("max_completion_tokens", 0, u64::MAX),
    ] {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(v) if v.as_u64().is_some_and(|n| (min..=max).contains(&n)) => {}
            Some(_) if max == u64::MAX => {
                return Err(bad(&format!("`{field}` must be a non-negative integer.")))
            }
            Some(_) => return Err(bad(&format!("`{field}` must be between {min} and {max}."))),
        }
    }
    for field in ["tools", "functions"] {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) if list.len() > shape.max_tools => {
                return Err(too_many(field, list.len(), shape.max_tools))
            }
            Some(Value::Array(list)) if list.iter().all(Value::is_object) => {}
            Some(_) => return Err(bad(&format!("`{field}` must be an array of objects."))),
        }
    }
    match route {
        Route::ChatCompletions | Route::Messages | Route::CountTokens => {
            match obj.get("messages") {
                Some(Value::Array(m)) if m.len() > shape.max_messages => {
                    return Err(too_many("messages", m.len(), shape.max_messages))
                }
                Some(Value::Array(m)) if !m.is_empty() => {
                    if m.iter().any(|msg| !msg.is_object()) {
                        return Err(bad("Every entry of `messages` must be an object."));
                    }
                }
                _ => return Err(bad("`messages` is required and must be a non-empty array.")),
            }
        }
        Route::Completions => {
            if !matches!(obj.get("prompt"), Some(Value::String(_) | Value::Array(_))) {
                return Err(bad(
                    "`prompt` is required and must be a string or an array.",
                ));
            }
        }
        Route::Embeddings => {
            if stream {
                return Err(bad("Embeddings cannot be streamed."));
            }
            if !matches!(obj.get("input"), Some(Value::String(_) | Value::Array(_))) {
                return Err(bad("`input` is required and must be a string or an array."));
            }
        }
        Route::Models => {}
    }
    if route == Route::CountTokens && stream {
        return Err(bad("Token counting cannot be streamed."));
    }
    if matches!(route, Route::Messages | Route::CountTokens) {
        if route == Route::Messages && !obj.get("max_tokens").is_some_and(Value::is_u64) {
            return Err(bad(
                "`max_tokens` is required and must be a non-negative integer.",
            ));
        }
        match obj.get("system") {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(Value::Array(blocks)) if blocks.iter().all(Value::is_object) => {}
            Some(_) => return Err(bad("`system` must be a string or an array of text blocks.")),
        }
    }
    Ok(CallBody {
        json,
        model,
        stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_request_ids() {
        assert_eq!(
            client_request_id(Some(b"abc-123_x.y:z")).as_deref(),
            Some("abc-123_x.y:z")
        );
        for bad in [&b""[..], b"has space", b"\xff", &[b'a'; 129]] {
            assert_eq!(
                client_request_id(Some(bad)),
                None,
                "{bad:?} must be dropped"
            );
        }
    }

    #[test]
    fn headers_fit_their_limits() {
        assert!(headers_fit(10, 1000, 10, 1000).is_ok());
        for (count, bytes) in [(11, 10), (1, 1001)] {
            let e = headers_fit(count, bytes, 10, 1000).unwrap_err();
            assert_eq!(e.code, ErrorCode::HeadersTooLarge);
        }
    }

    #[test]
    fn content_types() {
        assert!(check_content_type(None).is_ok());
        assert!(check_content_type(Some(b"application/json; charset=utf-8")).is_ok());
        assert!(check_content_type(Some(b"Application/JSON")).is_ok());
        let e = check_content_type(Some(b"application/x-www-form-urlencoded")).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnsupportedMediaType);
    }

    #[test]
    fn bodies() {
        let ok = parse_body(
            Route::ChatCompletions,
            br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            &Shape::default(),
        )
        .unwrap();
        assert_eq!((ok.model.as_str(), ok.stream), ("m", true));
        for (route, body, needle) in [
            (Route::ChatCompletions, &b"{not json"[..], "not valid JSON"),
            (Route::ChatCompletions, b"[1]", "JSON object"),
            (Route::ChatCompletions, br#"{"messages":[]}"#, "`model`"),
            (
                Route::ChatCompletions,
                br#"{"model":"m","messages":[]}"#,
                "`messages`",
            ),
            (
                Route::ChatCompletions,
                br#"{"model":"m","messages":[1]}"#,
                "object",
            ),
            (
                Route::ChatCompletions,
                br#"{"model":"m","stream":"yes","messages":[{}]}"#,
                "`stream`",
            ),
            (Route::Completions, br#"{"model":"m"}"#, "`prompt`"),
            (
                Route::ChatCompletions,
                br#"{"model":"m","model":"n","messages":[{}]}"#,
                "duplicate key `model`",
            ),
            (
                Route::ChatCompletions,
                br#"{"model":"m","stream":true,"stream_options":"x","messages":[{}]}"#,
                "`stream_options`",
            ),
            (
                Route::ChatCompletions,
                br#"{"model":"m","n":0,"messages":[{}]}"#,
                "`n`",
            ),
            (
                Route::ChatCompletions,
                br#"{"model":"m","max_tokens":-1,"messages":[{}]}"#,
                "`max_tokens`",
            ),
            (
                Route::ChatCompletions,
                br#"{"model":"m","max_tokens":"9","messages":[{}]}"#,
                "`max_tokens`",
            ),
            (
                Route::ChatCompletions,
                br#"{"model":"m","functions":"x","messages":[{}]}"#,
                "`functions`",
            ),
            (Route::Embeddings, br#"{"model":"m","input":5}"#, "`input`"),
        ] {
            let e = parse_body(route, body, &Shape::default()).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
    }

    #[test]
    fn shape_limits() {
        let shape = Shape {
            max_depth: 8,
            max_messages: 3,
            max_tools: 2,
            max_chars: 100,
            max_values: 40,
        };
        let msg = r#"{"role":"user","content":"hi"}"#;
        let body = |messages: usize, extra: &str| {
            format!(
                r#"{{"model":"m",{extra}"messages":[{}]}}"#,
                vec![msg; messages].join(",")
            )
        };
        assert!(parse_body(Route::ChatCompletions, body(3, "").as_bytes(), &shape).is_ok());
        let deep = format!(r#""x":{}1{},"#, "[".repeat(8), "]".repeat(8));
        let tools = r#""tools":[{},{},{}],"#;
        let long = format!(r#""user":"{}","#, "é".repeat(90));
        for (b, code, needle) in [
            (
                body(4, ""),
                ErrorCode::RequestTooLarge,
                "`messages` has 4 entries",
            ),
            (body(1, &deep), ErrorCode::InvalidRequest, "deeper than 8"),
            (body(1, tools), ErrorCode::RequestTooLarge, "`tools` has 3"),
            (body(1, &long), ErrorCode::RequestTooLarge, "100 characters"),
            (
                body(1, &format!(r#""x":[{}],"#, vec!["0"; 40].join(","))),
                ErrorCode::RequestTooLarge,
                "more than 40 JSON values",
            ),
        ] {
            let e = parse_body(Route::ChatCompletions, b.as_bytes(), &shape).unwrap_err();
            assert_eq!(e.code, code, "{b}");
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
        // Depth is counted without recursion: far past serde's own limit
        // the parser refuses first, and nothing overflows.
        let very = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = parse_body(Route::ChatCompletions, very.as_bytes(), &Shape::default()).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
    }
}
