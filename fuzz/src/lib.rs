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
        Route::Messages,
        Route::CountTokens,
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
/// comes out between them.
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
    // The planted copy stands between spaces; the fuzzer may write the
    // secret elsewhere, glued to other text, where no rule should see it.
    let planted = format!(" {secret} ");
    assert!(!out.contains(&planted), "planted secret survived");
    assert!(
        !whole.contains(&planted),
        "planted secret survived whole-text redaction"
    );
}

/// The secret of the fuzz target's HS256 key `hs`.
const HS_SECRET: &[u8] = b"fuzz-target-hmac-secret-0123456789";

fn jwt_auth() -> &'static JwtAuth {
    static J: OnceLock<JwtAuth> = OnceLock::new();
    J.get_or_init(|| {
        let rsa = VerifyKey::from_pem(
            "rsa",
            include_bytes!("../../filters/src/jwt_auth/testdata/rsa-test.pub"),
            None,
        )
        .expect("test key");
        let hs =
            VerifyKey::hmac("hs", HS_SECRET, jsonwebtoken::Algorithm::HS256).expect("hmac key");
        JwtAuth::new(
            JwtSettings {
                cache_size: 0,
                failures_per_minute_per_ip: 0,
                ..JwtSettings::default()
            },
            Arc::new(KeySet::new([rsa, hs])),
            Arc::new(SystemClock),
        )
    })
}

/// JWT header and claims parsing. The first byte picks how the rest is
/// used: raw token text; three parts base64url-encoded with a made-up
/// signature (nothing may be accepted); or a header and claims signed
/// with the target's HS256 key, so that the claim checks run: whatever is
/// accepted must be an HS256 token for kid `hs` with a subject and an
/// unexpired `exp`.
pub fn jwt(data: &[u8]) {
    use base64::Engine;
    use hmac::Mac;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let half = rest.len() / 2;
    let (header, claims) = rest.split_at(half);
    let auth = jwt_auth();
    match mode % 3 {
        0 => {
            let token = String::from_utf8_lossy(rest);
            let _ = auth.authenticate(Some(&format!("Bearer {token}")));
            let _ = auth.authenticate(Some(&token));
        }
        1 => {
            let token = format!(
                "{}.{}.{}",
                enc(header),
                enc(claims),
                enc(b"not a signature")
            );
            assert!(
                auth.authenticate(Some(&format!("Bearer {token}"))).is_err(),
                "a token without a valid signature was accepted"
            );
        }
        _ => {
            let input = format!("{}.{}", enc(header), enc(claims));
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(HS_SECRET).expect("key");
            mac.update(input.as_bytes());
            let token = format!("{input}.{}", enc(&mac.finalize().into_bytes()));
            if let Ok(p) = auth.authenticate(Some(&format!("Bearer {token}"))) {
                let h: serde_json::Value =
                    serde_json::from_slice(header).expect("accepted header is JSON");
                let c: serde_json::Value =
                    serde_json::from_slice(claims).expect("accepted claims are JSON");
                assert_eq!(h["alg"], "HS256", "accepted with another alg: {h}");
                assert!(h["kid"] == "hs" || h.get("kid").is_none(), "{h}");
                assert!(!p.subject.is_empty());
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let exp = c["exp"].as_u64().expect("accepted without a numeric exp");
                assert!(
                    exp + JwtSettings::default().leeway_secs > now,
                    "accepted expired: {c}"
                );
            }
        }
    }
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
