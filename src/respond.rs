//! The one place a rejection becomes an HTTP response body and status.

use filters::Rejection;
use serde_json::json;

/// The OpenAI-shaped error body for a rejection:
/// `{"error": {"message", "type", "code", "param"}}`.
pub fn error_body(rejection: &Rejection) -> Vec<u8> {
    json!({
        "error": {
            "message": rejection.message,
            "type": rejection.code.error_type(),
            "code": rejection.code.as_str(),
            "param": null,
        }
    })
    .to_string()
    .into_bytes()
}

/// The same error as one SSE event, for a stream that fails after its
/// headers were sent (the OpenAI SDKs raise on an event with `error`).
pub fn error_event(rejection: &Rejection) -> filters::SseEvent {
    filters::SseEvent::data(String::from_utf8_lossy(&error_body(rejection)).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use filters::ErrorCode;

    #[test]
    fn body_has_the_openai_shape() {
        let r = Rejection::new(ErrorCode::RateLimited, "tier trial 5/min");
        let v: serde_json::Value = serde_json::from_slice(&error_body(&r)).unwrap();
        assert_eq!(v["error"]["code"], "rate_limited");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(
            v["error"]["message"],
            ErrorCode::RateLimited.public_message()
        );
        assert!(v["error"]["param"].is_null());
        assert!(
            !v.to_string().contains("tier trial"),
            "reason is not public"
        );
    }
}
