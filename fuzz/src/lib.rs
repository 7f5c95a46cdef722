//! Fuzz targets. Each takes arbitrary bytes and must not panic or hang;
//! some also check a property. `cargo +nightly fuzz run TARGET` drives them
//! with libFuzzer (see the README); `filters/tests/fuzz_corpus.rs` replays
//! the committed corpora and a short run of mutations on the stable
//! toolchain, in CI.

use filters::injection::{Detector, InjectionPolicy, Source};
use filters::intake::{check_content_type, parse_body, Shape};
use filters::jwt_auth::{JwtAuth, JwtSettings, KeySet, VerifyKey};
use filters::redact::stream::StreamRedactor;
use filters::redact::{RedactionPolicy, Redactor};
use filters::sse::SseFramer;
use filters::{Route, SystemClock};
use std::sync::{Arc, OnceLock};

/// Request intake: every route, the default limits.
pub fn intake(data: &[u8]) {
    let shape = Shape::default();
    for route in [
        Route::ChatCompletions,
        Route::Completions,
        Route::Embeddings,
    ] {
        let _ = parse_body(route, data, &shape);
    }
    let _ = check_content_type(Some(data));
}

/// The SSE framer: the same bytes give the same events however they are
/// chunked (the first byte picks the chunk size).
pub fn sse_framer(data: &[u8]) {
    let Some((&size, bytes)) = data.split_first() else {
        return;
    };
    let whole = frame(bytes, bytes.len().max(1));
    let chunked = frame(bytes, usize::from(size % 17) + 1);
    assert_eq!(whole, chunked, "framing depends on chunking");
}

fn frame(bytes: &[u8], chunk: usize) -> Result<Vec<filters::SseEvent>, filters::sse::SseError> {
    let mut framer = SseFramer::new();
    let mut events = Vec::new();
    for piece in bytes.chunks(chunk) {
        events.extend(framer.push(piece)?);
    }
    events.extend(framer.finish()?);
    Ok(events)
}

pub fn redactor() -> &'static Arc<Redactor> {
    static R: OnceLock<Arc<Redactor>> = OnceLock::new();
    R.get_or_init(|| {
        let policy: RedactionPolicy =
            serde_yaml::from_str(include_str!("../../policies/redaction.yaml"))
                .expect("shipped redaction policy parses");
        Arc::new(Redactor::build(&policy).expect("shipped redaction policy compiles"))
    })
}

/// Secrets the shipped rules find, planted into fuzzed text.
pub const PLANTED: [&str; 3] = [
    "ghp_Zq8VnM2kT4rW9xY1cB6dF3gH5jK7lP0sA2uE",
    "sk_live_51HxQ2mK8vRt3yNp6wZa9LcDf4GhJk",
    "xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx",
];

/// The stream redactor: streamed in pieces (sizes from the input) equals
/// redacting the whole text, and a secret planted between spaces never
/// comes out.
pub fn stream_redactor(data: &[u8]) {
    let [pick, at, rest @ ..] = data else {
        return;
    };
    let (sizes, text) = rest.split_at(rest.len().min(8));
    let mut text = String::from_utf8_lossy(text).into_owned();
    let secret = PLANTED[usize::from(*pick) % PLANTED.len()];
    let mut cut = usize::from(*at).min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.insert_str(cut, &format!(" {secret} "));
    let r = redactor();
    let whole = r.redact(&text).0;
    let mut s = StreamRedactor::new(r.clone());
    let mut out = String::new();
    let mut from = 0;
    let mut i = 0;
    while from < text.len() {
        let size = usize::from(sizes.get(i % sizes.len().max(1)).copied().unwrap_or(7) % 13) + 1;
        i += 1;
        let mut end = (from + size).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push_str(&s.push(&text[from..end]));
        from = end;
    }
    out.push_str(&s.finish());
    if s.overflow().is_none() {
        assert_eq!(out, whole, "streamed differs from whole");
    }
    assert!(!out.contains(secret), "planted secret survived");
    assert!(
        !whole.contains(secret),
        "planted secret survived whole-text redaction"
    );
}

fn jwt_auth() -> &'static JwtAuth {
    static J: OnceLock<JwtAuth> = OnceLock::new();
    J.get_or_init(|| {
        let key = VerifyKey::from_pem(
            "rsa",
            include_bytes!("../../filters/src/jwt_auth/testdata/rsa-test.pub"),
            None,
        )
        .expect("test key");
        JwtAuth::new(
            JwtSettings::default(),
            Arc::new(KeySet::new([key])),
            Arc::new(SystemClock),
        )
    })
}

/// JWT header and claims parsing: nothing forged is accepted, nothing
/// panics. The first byte picks raw text, or three parts each base64url
/// encoded (so the header and claims parsers see the bytes).
pub fn jwt(data: &[u8]) {
    use base64::Engine;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let third = rest.len() / 3;
        let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        format!(
            "{}.{}.{}",
            enc(&rest[..third]),
            enc(&rest[third..2 * third]),
            enc(&rest[2 * third..])
        )
    };
    let auth = jwt_auth();
    assert!(
        auth.authenticate(Some(&format!("Bearer {token}"))).is_err(),
        "a token without the key's signature was accepted"
    );
    let _ = auth.authenticate(Some(&token));
}

/// Policy loading: any YAML as each kind of policy; parsing and building
/// report errors, never panic.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = serde_yaml::from_str::<RedactionPolicy>(text) {
        let _ = Redactor::build(&p);
    }
    if let Ok(p) = serde_yaml::from_str::<InjectionPolicy>(text) {
        let _ = Detector::build(p);
    }
    if let Ok(p) = serde_yaml::from_str::<filters::tool_authz::ToolPolicySpec>(text) {
        let _ = filters::tool_authz::ToolPolicy::build(p);
    }
    if let Ok(p) = serde_yaml::from_str::<filters::rate_limit::LimitsPolicy>(text) {
        let _ = p.validate();
    }
    if let Ok(p) = serde_yaml::from_str::<filters::guard::GuardPolicy>(text) {
        let _ = p.check();
    }
}

fn detector() -> &'static Detector {
    static D: OnceLock<Detector> = OnceLock::new();
    D.get_or_init(|| {
        let policy: InjectionPolicy =
            serde_yaml::from_str(include_str!("../../policies/injection.yaml"))
                .expect("shipped injection policy parses");
        Detector::build(policy).expect("shipped injection policy compiles")
    })
}

/// The injection screen's normaliser and decoders, on any text, as a
/// caller's message and as a tool result.
pub fn injection(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = filters::injection::normalise::fold(&text);
    let d = detector();
    let _ = d.scan(&text, Source::Direct);
    let _ = d.scan(&text, Source::Tool);
}
