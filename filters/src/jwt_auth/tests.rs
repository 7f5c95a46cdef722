use super::*;
use crate::chain::Action;
use crate::clock::ManualClock;
use crate::request::Route;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

const RSA_PRIVATE: &[u8] = include_bytes!("testdata/rsa-test.key");
const RSA_PUBLIC: &[u8] = include_bytes!("testdata/rsa-test.pub");
const NOW: u64 = 1_800_000_000;

struct Fixture {
    auth: JwtAuth,
    clock: Arc<ManualClock>,
    lookups: Arc<CountingKeys>,
    es_private: EncodingKey,
}

/// Counts key lookups, to see the cache at work.
struct CountingKeys(KeySet, AtomicUsize);

impl KeySource for CountingKeys {
    fn key(&self, kid: Option<&str>) -> Option<Arc<VerifyKey>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.key(kid)
    }
}

fn fixture() -> Fixture {
    let es = rcgen::KeyPair::generate().unwrap();
    let keys = KeySet::new([
        VerifyKey::from_pem("rsa", RSA_PUBLIC, None).unwrap(),
        VerifyKey::from_pem("ec", es.public_key_pem().as_bytes(), None).unwrap(),
    ]);
    let lookups = Arc::new(CountingKeys(keys, AtomicUsize::new(0)));
    let clock = Arc::new(ManualClock::at_ms(NOW * 1000));
    let settings = JwtSettings {
        issuer: Some("https://idp.example".into()),
        audience: vec!["portcullis".into()],
        claims: ClaimPaths {
            roles: "realm_access.roles".into(),
            ..ClaimPaths::default()
        },
        ..JwtSettings::default()
    };
    Fixture {
        auth: JwtAuth::new(settings, lookups.clone(), clock.clone()),
        clock,
        lookups,
        es_private: EncodingKey::from_ec_pem(es.serialize_pem().as_bytes()).unwrap(),
    }
}

fn claims() -> Value {
    json!({"sub": "alice", "tenant": "acme", "realm_access": {"roles": ["user", "trial"]},
           "iss": "https://idp.example", "aud": "portcullis", "exp": NOW + 600, "iat": NOW})
}

fn rs256(kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
    )
    .unwrap()
}

async fn check(f: &Fixture, authorization: Option<&str>) -> Verdict {
    check_from(f, authorization, None).await
}

async fn check_from(
    f: &Fixture,
    authorization: Option<&str>,
    client_ip: Option<std::net::IpAddr>,
) -> Verdict {
    let body = json!({});
    let view = RequestView {
        request_id: "r",
        authorization,
        principal: None,
        dry_run: false,
        route: Route::ChatCompletions,
        body: &body,
        prompt: crate::prompt::of(Route::ChatCompletions, &body),
        model: None,
        stream: false,
        client_ip,
    };
    f.auth.check(&view).await.unwrap()
}

fn principal(v: &Verdict) -> Option<&Principal> {
    v.facts.iter().find_map(|f| match f {
        Fact::Principal(p) => Some(p),
        _ => None,
    })
}

/// Assert a 401 with the header and the reason mentioning `needle`.
async fn refused(f: &Fixture, authorization: Option<&str>, code: ErrorCode, needle: &str) {
    let v = check(f, authorization).await;
    match &v.decision {
        Decision::Deny(r) => {
            assert_eq!(r.code, code, "{}", r.reason);
            assert!(
                r.reason.contains(needle),
                "reason {:?} lacks {needle:?}",
                r.reason
            );
            assert_eq!(r.code.status(), 401);
        }
        other => panic!("{authorization:?} was not refused: {other:?}"),
    }
    assert!(v.facts.contains(&Fact::Header(
        "www-authenticate",
        "Bearer error=\"invalid_token\"".into()
    )));
    assert!(principal(&v).is_none());
}

/// `refused` for a token sent as `Authorization: Bearer TOKEN`.
async fn refused_token(f: &Fixture, token: &str, code: ErrorCode, needle: &str) {
    refused(f, Some(&format!("Bearer {token}")), code, needle).await
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn valid_rs256_and_es256_tokens_identify_the_caller() {
    let f = fixture();
    let v = check(&f, Some(&format!("Bearer {}", rs256("rsa", &claims())))).await;
    assert_eq!(v.decision, Decision::Allow);
    let p = principal(&v).unwrap();
    assert_eq!((p.subject.as_str(), p.tenant.as_str()), ("alice", "acme"));
    assert_eq!(p.roles, ["user", "trial"]);

    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("ec".into());
    let mut c = claims();
    c.as_object_mut().unwrap().remove("tenant");
    let token = encode(&header, &c, &f.es_private).unwrap();
    let v = check(&f, Some(&format!("bearer {token}"))).await;
    assert_eq!(principal(&v).unwrap().tenant, "default", "default tenant");
}

#[tokio::test]
async fn alg_none_is_refused() {
    let f = fixture();
    let token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "rsa"})),
        b64(&claims())
    );
    refused_token(&f, &token, ErrorCode::InvalidToken, "alg none").await;
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let f = fixture();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa".into());
    let token = encode(&header, &claims(), &EncodingKey::from_secret(RSA_PUBLIC)).unwrap();
    refused_token(&f, &token, ErrorCode::InvalidToken, "pinned to RS256").await;
}

#[tokio::test]
async fn unknown_kid_wrong_signature_and_tampered_payload() {
    let f = fixture();
    refused_token(
        &f,
        &rs256("nope", &claims()),
        ErrorCode::InvalidToken,
        "unknown kid",
    )
    .await;

    // A real signature by the right key, but over other content.
    let good = rs256("rsa", &claims());
    let other = rs256("rsa", &json!({"sub": "mallory", "exp": NOW + 600}));
    let (head, _) = good.rsplit_once('.').unwrap();
    let (_, foreign_sig) = other.rsplit_once('.').unwrap();
    refused(
        &f,
        Some(&format!("Bearer {head}.{foreign_sig}")),
        ErrorCode::InvalidToken,
        "bad signature",
    )
    .await;

    let parts: Vec<&str> = good.split('.').collect();
    let mut evil = claims();
    evil["sub"] = json!("admin");
    let tampered = format!("{}.{}.{}", parts[0], b64(&evil), parts[2]);
    refused_token(&f, &tampered, ErrorCode::InvalidToken, "bad signature").await;
}

#[tokio::test]
async fn time_claims_are_checked_with_leeway() {
    let f = fixture();
    let mut c = claims();
    c["exp"] = json!(NOW - 31);
    refused_token(&f, &rs256("rsa", &c), ErrorCode::TokenExpired, "expired").await;
    c["exp"] = json!(NOW - 29);
    assert_eq!(
        check(&f, Some(&format!("Bearer {}", rs256("rsa", &c))))
            .await
            .decision,
        Decision::Allow
    );

    let mut c = claims();
    c["nbf"] = json!(NOW + 120);
    refused_token(&f, &rs256("rsa", &c), ErrorCode::InvalidToken, "nbf").await;

    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    refused_token(
        &f,
        &rs256("rsa", &c),
        ErrorCode::InvalidToken,
        "exp claim missing",
    )
    .await;
}

#[tokio::test]
async fn issuer_and_audience() {
    let f = fixture();
    let mut c = claims();
    c["aud"] = json!(["other-service"]);
    refused_token(
        &f,
        &rs256("rsa", &c),
        ErrorCode::InvalidToken,
        "wrong audience",
    )
    .await;
    c["aud"] = json!(["other-service", "portcullis"]);
    assert_eq!(
        check(&f, Some(&format!("Bearer {}", rs256("rsa", &c))))
            .await
            .decision,
        Decision::Allow
    );
    let mut c = claims();
    c["iss"] = json!("https://evil.example");
    refused_token(
        &f,
        &rs256("rsa", &c),
        ErrorCode::InvalidToken,
        "wrong issuer",
    )
    .await;
}

#[tokio::test]
async fn broken_headers_and_tokens() {
    let f = fixture();
    let good = rs256("rsa", &claims());
    refused_token(
        &f,
        &good[..good.len() / 2],
        ErrorCode::InvalidToken,
        "malformed",
    )
    .await;
    refused_token(
        &f,
        good.rsplit_once('.').unwrap().0,
        ErrorCode::InvalidToken,
        "three",
    )
    .await;
    refused(&f, Some("Bearer "), ErrorCode::InvalidToken, "empty bearer").await;
    refused(
        &f,
        Some(&format!("Basic {good}")),
        ErrorCode::InvalidToken,
        "not Bearer",
    )
    .await;
    refused(&f, None, ErrorCode::InvalidToken, "no Authorization").await;
    refused(
        &f,
        Some("Bearer not-a-jwt"),
        ErrorCode::InvalidToken,
        "malformed",
    )
    .await;
}

#[tokio::test]
async fn verified_tokens_are_cached_until_they_expire() {
    let f = fixture();
    let mut c = claims();
    c["exp"] = json!(NOW + 60);
    let header = format!("Bearer {}", rs256("rsa", &c));
    for _ in 0..5 {
        assert_eq!(check(&f, Some(&header)).await.decision, Decision::Allow);
    }
    assert_eq!(
        f.auth.verifications(),
        1,
        "one signature check for five requests"
    );
    assert_eq!(
        f.lookups.1.load(Ordering::SeqCst),
        5,
        "each hit confirms the key is still there"
    );
    f.clock.advance_ms(100_000);
    refused(&f, Some(&header), ErrorCode::TokenExpired, "expired").await;
}

/// A key source whose keys can be withdrawn.
struct Revocable(Mutex<KeySet>);

impl KeySource for Revocable {
    fn key(&self, kid: Option<&str>) -> Option<Arc<VerifyKey>> {
        self.0.lock().unwrap().key(kid)
    }
}

#[tokio::test]
async fn a_withdrawn_key_stops_its_cached_tokens() {
    let f = fixture();
    let source = Arc::new(Revocable(Mutex::new(KeySet::new([VerifyKey::from_pem(
        "rsa", RSA_PUBLIC, None,
    )
    .unwrap()]))));
    let auth = JwtAuth::new(f.auth.settings.clone(), source.clone(), f.clock.clone());
    let f = Fixture { auth, ..f };
    let header = format!("Bearer {}", rs256("rsa", &claims()));
    assert_eq!(check(&f, Some(&header)).await.decision, Decision::Allow);
    *source.0.lock().unwrap() = KeySet::default();
    refused(&f, Some(&header), ErrorCode::InvalidToken, "unknown kid").await;
}

#[tokio::test]
async fn monitor_mode_records_the_refusal_but_passes() {
    use crate::chain::{Chain, FilterSettings, Mode, OnError};
    let f = fixture();
    let chain = Chain::new(vec![(
        Box::new(f.auth) as Box<dyn RequestFilter>,
        FilterSettings {
            mode: Mode::Monitor,
            on_error: OnError::Deny,
        },
    )]);
    let body = json!({});
    let view = RequestView {
        request_id: "r",
        authorization: Some("Bearer nope"),
        principal: None,
        dry_run: false,
        route: Route::ChatCompletions,
        body: &body,
        prompt: crate::prompt::of(Route::ChatCompletions, &body),
        model: None,
        stream: false,
        client_ip: None,
    };
    let report = chain.run(&view).await;
    assert!(report.rejection.is_none());
    assert_eq!(report.outcomes[0].action, Action::Deny);
    assert!(report.principal.is_none());
}

#[test]
fn pem_keys_infer_and_pin_their_algorithm() {
    assert_eq!(
        VerifyKey::from_pem("a", RSA_PUBLIC, None).unwrap().alg,
        Algorithm::RS256
    );
    assert_eq!(
        VerifyKey::from_pem("a", RSA_PUBLIC, Some(Algorithm::PS256))
            .unwrap()
            .alg,
        Algorithm::PS256
    );
    let err = VerifyKey::from_pem("a", RSA_PUBLIC, Some(Algorithm::HS256)).unwrap_err();
    assert!(err.contains("does not fit"), "{err}");
    let err = VerifyKey::from_pem("a", RSA_PRIVATE, None).unwrap_err();
    assert!(err.contains("PRIVATE KEY"), "{err}");
    assert!(VerifyKey::hmac("h", b"short", Algorithm::HS256).is_err());
    assert!(VerifyKey::hmac("h", &[7; 32], Algorithm::RS256).is_err());
}

#[test]
fn jwks_documents() {
    let es = rcgen::KeyPair::generate().unwrap();
    let raw = es.public_key_raw(); // 0x04 || x || y
    let (x, y) = (&raw[1..33], &raw[33..65]);
    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let doc = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "x": enc(x), "y": enc(y)}]});
    let (keys, skipped) = VerifyKey::from_jwks(doc.to_string().as_bytes()).unwrap();
    assert_eq!(
        (keys[0].kid.as_str(), keys[0].alg),
        ("k1", Algorithm::ES256)
    );
    assert!(skipped.is_empty());
    let oct = json!({"keys": [{"kty": "oct", "kid": "s", "k": enc(&[1; 32])}]});
    assert!(VerifyKey::from_jwks(oct.to_string().as_bytes())
        .unwrap_err()
        .contains("symmetric"));
    let nokid = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": enc(x), "y": enc(y)}]});
    assert!(VerifyKey::from_jwks(nokid.to_string().as_bytes())
        .unwrap_err()
        .contains("kid"));
}

/// Issue 8, item 12: keys the gateway cannot verify with (Keycloak
/// publishes an `RSA-OAEP` encryption key beside its signing keys) are
/// skipped, each with its reason; the usable ones stay.
#[test]
fn unusable_jwks_keys_are_skipped_not_fatal() {
    let es = rcgen::KeyPair::generate().unwrap();
    let raw = es.public_key_raw();
    let (x, y) = (&raw[1..33], &raw[33..65]);
    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let sig = json!({"kty": "EC", "crv": "P-256", "kid": "sig1", "use": "sig", "alg": "ES256", "x": enc(x), "y": enc(y)});
    let doc = json!({"keys": [
        {"kty": "RSA", "kid": "enc1", "use": "enc", "alg": "RSA-OAEP", "n": enc(&[0xc3; 256]), "e": "AQAB"},
        {"kty": "RSA", "kid": "enc2", "alg": "RSA-OAEP-256", "n": enc(&[0xc3; 256]), "e": "AQAB"},
        {"kty": "EC", "crv": "P-256", "kid": "ops", "key_ops": ["encrypt"], "x": enc(x), "y": enc(y)},
        {"kty": "EC", "crv": "P-256", "kid": "ecdh", "alg": "ECDH-ES", "x": enc(x), "y": enc(y)},
        {"kty": "oct", "kid": "s", "k": enc(&[1; 32])},
        {"kty": "EC", "crv": "P-256", "x": enc(x), "y": enc(y)},
        "not a key",
        sig,
    ]});
    let (keys, skipped) = VerifyKey::from_jwks(doc.to_string().as_bytes()).unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].kid, "sig1");
    assert_eq!(skipped.len(), 7, "{skipped:?}");
    for kid in ["enc1", "enc2", "ops", "ecdh", "key s", "#5", "#6"] {
        assert!(
            skipped.iter().any(|s| s.contains(kid)),
            "{kid}: {skipped:?}"
        );
    }
    // Nothing usable at all is an error.
    let none = json!({"keys": [doc["keys"][0].clone()]});
    assert!(VerifyKey::from_jwks(none.to_string().as_bytes())
        .unwrap_err()
        .contains("no usable signing key"));
}

/// A key source's own issuer, audience and tenant win over the section's.
#[test]
fn a_key_source_scopes_its_tokens() {
    let scope = KeyScope {
        issuer: Some("svc-billing".into()),
        audience: Some(vec!["billing-gw".into()]),
        tenant: Some("billing".into()),
    };
    let key = VerifyKey::hmac("svc", &[9; 32], Algorithm::HS256)
        .unwrap()
        .scoped(scope);
    let settings = JwtSettings {
        issuer: Some("corp-idp".into()),
        audience: vec!["portcullis".into()],
        ..JwtSettings::default()
    };
    let auth = JwtAuth::new(
        settings,
        Arc::new(KeySet::new([key])),
        Arc::new(ManualClock::at_ms(1_000_000)),
    );
    let sign = |claims: Value| {
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = Some("svc".into());
        jsonwebtoken::encode(
            &h,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&[9; 32]),
        )
        .unwrap()
    };
    // The section's issuer is not enough for this source.
    let corp = sign(
        json!({"sub": "x", "iss": "corp-idp", "aud": "portcullis", "exp": 2000, "tenant": "acme"}),
    );
    assert!(auth.verify(&corp).unwrap_err().1.contains("wrong issuer"));
    let wrong_aud =
        sign(json!({"sub": "x", "iss": "svc-billing", "aud": "portcullis", "exp": 2000}));
    assert!(auth
        .verify(&wrong_aud)
        .unwrap_err()
        .1
        .contains("wrong audience"));
    // Its own: accepted, and the tenant claim cannot escape the pinned one.
    let own = sign(
        json!({"sub": "x", "iss": "svc-billing", "aud": "billing-gw", "exp": 2000, "tenant": "acme"}),
    );
    let (p, ..) = auth.verify(&own).unwrap();
    assert_eq!(p.tenant, "billing");
}

#[tokio::test]
async fn unverified_header_values_reach_the_reason_cut_and_escaped() {
    let f = fixture();
    let long = format!("k\u{1b}[31m\n{}", "x".repeat(10_000));
    for header in [
        json!({"alg": "RS256", "kid": long}),
        json!({"alg": long, "kid": "rsa"}),
    ] {
        let token = format!("{}.{}.c2ln", b64(&header), b64(&claims()));
        let v = check(&f, Some(&format!("Bearer {token}"))).await;
        let Decision::Deny(r) = &v.decision else {
            panic!("allowed: {v:?}")
        };
        assert!(r.reason.len() < 200, "{}", r.reason);
        assert!(r.reason.contains("10007 bytes"), "{}", r.reason);
        assert!(
            !r.reason.contains('\u{1b}') && !r.reason.contains('\n'),
            "{}",
            r.reason
        );
    }
    let scheme = "X".repeat(5_000);
    let v = check(&f, Some(&format!("{scheme} token"))).await;
    let Decision::Deny(r) = &v.decision else {
        panic!("allowed")
    };
    assert!(r.reason.len() < 200, "{}", r.reason);
}

#[tokio::test]
async fn a_flood_of_bad_tokens_from_one_address_is_cut_off_before_the_signature_check() {
    let f = fixture();
    let a: std::net::IpAddr = "198.51.100.7".parse().unwrap();
    let b: std::net::IpAddr = "198.51.100.8".parse().unwrap();
    let good = format!("Bearer {}", rs256("rsa", &claims()));
    // A valid token verified before the flood stays usable.
    assert_eq!(
        check_from(&f, Some(&good), Some(a)).await.decision,
        Decision::Allow
    );
    let mut c = claims();
    c["sub"] = json!("forger");
    let forged = rs256("rsa", &c);
    let forged = format!("Bearer {}x", &forged[..forged.len() - 1]);
    let burst = JwtSettings::default().failures_per_minute_per_ip;
    for i in 0..burst {
        let v = check_from(&f, Some(&forged), Some(a)).await;
        match &v.decision {
            Decision::Deny(r) => assert_eq!(r.code, ErrorCode::InvalidToken, "failure {i}"),
            other => panic!("{other:?}"),
        }
    }
    let before = f.auth.verifications();
    let v = check_from(&f, Some(&forged), Some(a)).await;
    let Decision::Deny(r) = &v.decision else {
        panic!("allowed")
    };
    assert_eq!(r.code, ErrorCode::RateLimited);
    assert!(
        v.facts.contains(&Fact::Header("retry-after", "1".into())),
        "{v:?}"
    );
    assert_eq!(
        f.auth.verifications(),
        before,
        "no signature check was made"
    );
    // The cached token still passes; another address is not affected.
    assert_eq!(
        check_from(&f, Some(&good), Some(a)).await.decision,
        Decision::Allow
    );
    let v = check_from(&f, Some(&forged), Some(b)).await;
    assert!(matches!(&v.decision, Decision::Deny(r) if r.code == ErrorCode::InvalidToken));
    // Requests without a token cost nothing and are not counted; an
    // address in the same IPv6 /64 shares the budget.
    let c: std::net::IpAddr = "198.51.100.9".parse().unwrap();
    for _ in 0..3 * burst {
        check_from(&f, None, Some(c)).await;
    }
    let v = check_from(&f, Some(&forged), Some(c)).await;
    assert!(matches!(&v.decision, Decision::Deny(r) if r.code == ErrorCode::InvalidToken));
    let v6a: std::net::IpAddr = "2001:db8:1:2::1".parse().unwrap();
    let v6b: std::net::IpAddr = "2001:db8:1:2:ffff::7".parse().unwrap();
    for _ in 0..burst {
        check_from(&f, Some(&forged), Some(v6a)).await;
    }
    let v = check_from(&f, Some(&forged), Some(v6b)).await;
    assert!(matches!(&v.decision, Decision::Deny(r) if r.code == ErrorCode::RateLimited));
    // A second later one more failure may be checked.
    f.clock.advance_ms(1_000);
    let v = check_from(&f, Some(&forged), Some(a)).await;
    assert!(matches!(&v.decision, Decision::Deny(r) if r.code == ErrorCode::InvalidToken));
    let v = check_from(&f, Some(&forged), Some(a)).await;
    assert!(matches!(&v.decision, Decision::Deny(r) if r.code == ErrorCode::RateLimited));
}
