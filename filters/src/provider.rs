//! What reaches the client of a provider's refusal: which statuses pass
//! through as the provider sent them, and which of its headers are kept.

/// Provider errors about the request itself are passed to the client as
/// they are; errors about the gateway's own credentials (401, 403, 407) and
/// server errors become 502 `upstream_error`.
pub fn passes_through(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 401 | 403 | 407)
}

/// Headers of a provider's refusal that tell the client when to retry.
pub const RETRY_HEADERS: [&str; 8] = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
];

/// Add to `headers` (the gateway's own, for the client) the provider's
/// `Retry-After`, and its `x-ratelimit-*` when the gateway sends none of
/// its own (its own limits are what the caller hits first); `provider`
/// reads one of the provider's headers.
pub fn keep_retry_headers<'a>(
    headers: &mut Vec<(&'static str, String)>,
    provider: impl Fn(&str) -> Option<&'a str>,
) {
    let own_limits = headers.iter().any(|(n, _)| n.starts_with("x-ratelimit-"));
    for name in RETRY_HEADERS {
        if name.starts_with("x-ratelimit-") && own_limits {
            continue;
        }
        if let Some(v) = provider(name) {
            headers.retain(|(n, _)| *n != name);
            headers.push((name, v.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_through_rule() {
        assert!(passes_through(400));
        assert!(passes_through(429));
        assert!(!passes_through(401));
        assert!(!passes_through(403));
        assert!(!passes_through(407));
        assert!(!passes_through(500));
        assert!(!passes_through(200));
    }

    #[test]
    fn retry_headers_kept_and_own_limits_win() {
        let provider = |n: &str| match n {
            "retry-after" => Some("7"),
            "x-ratelimit-remaining-requests" => Some("0"),
            _ => None,
        };
        let mut none_of_ours = Vec::new();
        keep_retry_headers(&mut none_of_ours, provider);
        assert_eq!(
            none_of_ours,
            [
                ("retry-after", "7".to_string()),
                ("x-ratelimit-remaining-requests", "0".to_string())
            ]
        );
        let mut ours = vec![("x-ratelimit-remaining-requests", "4".to_string())];
        keep_retry_headers(&mut ours, provider);
        assert_eq!(
            ours,
            [
                ("x-ratelimit-remaining-requests", "4".to_string()),
                ("retry-after", "7".to_string())
            ]
        );
    }
}
