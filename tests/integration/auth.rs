//! JWT authentication through the gateway: every forged or broken token is
//! a 401 whose audit record names the failed check.

use crate::support::*;
use base64::Engine;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

const RSA_PUBLIC: &[u8] = include_bytes!("../../filters/src/jwt_auth/testdata/rsa-test.pub");

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

async fn refused(gw: &Gateway, authorization: Option<&str>, code: &str, reason: &str) {
    let mut req = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("x"));
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer error=\"invalid_token\""),
        "{authorization:?}"
    );
    let id = expect_error(resp, 401, code).await;
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["decision"], "blocked");
    assert_eq!(rec["blocked_by"], "jwt_auth");
    assert_eq!(rec["reason_code"], code);
    let why = rec["reason"].as_str().unwrap();
    assert!(
        why.contains(reason),
        "{authorization:?}: audit reason {why:?} lacks {reason:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forged_or_broken_token_is_401_and_audited() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    setup
        .files
        .push(("keys/rsa.pem".into(), RSA_PUBLIC.to_vec()));
    let gw = Gateway::start(setup).await;
    let good = keys.token("alice", &["user"]);
    let parts: Vec<&str> = good.split('.').collect();

    // alg: none
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "test"})),
        parts[1]
    );
    refused(
        &gw,
        Some(&format!("Bearer {none}")),
        "invalid_token",
        "alg none",
    )
    .await;
    // HS256 signed with the RSA public key as the secret.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("rsa".into());
    let confused = jsonwebtoken::encode(
        &header,
        &claims("alice", &["user"]),
        &jsonwebtoken::EncodingKey::from_secret(RSA_PUBLIC),
    )
    .unwrap();
    refused(
        &gw,
        Some(&format!("Bearer {confused}")),
        "invalid_token",
        "pinned to RS256",
    )
    .await;
    // Unknown kid.
    let unknown = keys.sign("nobody", &claims("alice", &["user"]));
    refused(
        &gw,
        Some(&format!("Bearer {unknown}")),
        "invalid_token",
        "unknown kid",
    )
    .await;
    // Wrong signature: signed by another key under our kid.
    let stranger = TestKeys::new().token("alice", &["user"]);
    refused(
        &gw,
        Some(&format!("Bearer {stranger}")),
        "invalid_token",
        "bad signature",
    )
    .await;
    // Tampered payload.
    let mut evil = claims("alice", &["user"]);
    evil["roles"] = json!(["portcullis:admin"]);
    let tampered = format!("{}.{}.{}", parts[0], b64(&evil), parts[2]);
    refused(
        &gw,
        Some(&format!("Bearer {tampered}")),
        "invalid_token",
        "bad signature",
    )
    .await;
    // Expired (beyond the 30 s leeway).
    let mut c = claims("alice", &["user"]);
    c["exp"] = json!(now_secs() - 120);
    refused(
        &gw,
        Some(&format!("Bearer {}", keys.sign("test", &c))),
        "token_expired",
        "expired",
    )
    .await;
    // nbf in the future.
    let mut c = claims("alice", &["user"]);
    c["nbf"] = json!(now_secs() + 300);
    refused(
        &gw,
        Some(&format!("Bearer {}", keys.sign("test", &c))),
        "invalid_token",
        "nbf",
    )
    .await;
    // Wrong audience, wrong issuer.
    let mut c = claims("alice", &["user"]);
    c["aud"] = json!("someone-else");
    refused(
        &gw,
        Some(&format!("Bearer {}", keys.sign("test", &c))),
        "invalid_token",
        "wrong audience",
    )
    .await;
    let mut c = claims("alice", &["user"]);
    c["iss"] = json!("https://evil.example");
    refused(
        &gw,
        Some(&format!("Bearer {}", keys.sign("test", &c))),
        "invalid_token",
        "wrong issuer",
    )
    .await;
    // Truncated, empty, other scheme, none at all.
    refused(
        &gw,
        Some(&format!("Bearer {}", &good[..good.len() - 20])),
        "invalid_token",
        "",
    )
    .await;
    refused(&gw, Some("Bearer "), "invalid_token", "empty bearer").await;
    refused(
        &gw,
        Some(&format!("Basic {good}")),
        "invalid_token",
        "not Bearer",
    )
    .await;
    refused(&gw, None, "invalid_token", "no Authorization").await;

    assert!(
        mock.state.requests().is_empty(),
        "no refused request reached the provider"
    );

    // The genuine token passes, and the audit record knows who called.
    let r = post_as(&gw, &good, &chat("hello")).await;
    assert_eq!(r.status(), 200);
    let rec = gw.record_for(&request_id(&r)).await;
    assert_eq!(rec["sub"], "alice");
    assert_eq!(rec["tenant"], "acme");
    assert_eq!(rec["roles"], json!(["user"]));
    let seen = mock.state.last_request().unwrap();
    assert!(
        !seen.headers.iter().any(|(_, v)| v.contains(&good)),
        "client token forwarded"
    );
}

/// A tiny JWKS server whose document the test changes.
async fn jwks_server(doc: Arc<Mutex<Value>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = move |_req: hyper::Request<hyper::body::Incoming>| {
        let body = doc.lock().unwrap().clone();
        async move { portcullis::http_server::json(200, &body) }
    };
    tokio::spawn(portcullis::http_server::serve(
        listener,
        handler,
        portcullis::http_server::HEADER_READ_TIMEOUT,
        std::future::pending(),
    ));
    addr
}

fn jwk(kid: &str, keys: &TestKeys) -> Value {
    let der = pem::parse(&keys.public_pem).unwrap().into_contents();
    // The SPKI of a P-256 key ends with the 65-byte point 0x04 || x || y.
    let point = &der[der.len() - 65..];
    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": enc(&point[1..33]), "y": enc(&point[33..65])})
}

async fn status_with(gw: &Gateway, token: &str) -> u16 {
    post_as(gw, token, &chat("x")).await.status().as_u16()
}

async fn eventually(gw: &Gateway, token: &str, status: u16) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while status_with(gw, token).await != status {
        assert!(std::time::Instant::now() < deadline, "never got {status}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_keys_are_followed_added_and_removed() {
    let mock = Mock::start(options()).await;
    let (k1, k2) = (TestKeys::new(), TestKeys::new());
    let doc = Arc::new(Mutex::new(json!({"keys": [jwk("k1", &k1)]})));
    let addr = jwks_server(doc.clone()).await;
    let mut setup = Setup::new(mock.addr);
    setup.extra_yaml = format!(
        "auth:\n  keys:\n    - jwks_url: http://{addr}/jwks.json\n      allow_http: true\n      refresh_secs: 1\n  issuer: test-issuer\n  audience: [portcullis]\n"
    );
    let gw = Gateway::start(setup).await;
    let t1 = k1.sign("k1", &claims("alice", &["user"]));
    let t2 = k2.sign("k2", &claims("bob", &["user"]));
    eventually(&gw, &t1, 200).await;
    assert_eq!(status_with(&gw, &t2).await, 401, "k2 is not published yet");

    doc.lock().unwrap()["keys"] = json!([jwk("k1", &k1), jwk("k2", &k2)]);
    eventually(&gw, &t2, 200).await;

    doc.lock().unwrap()["keys"] = json!([jwk("k2", &k2)]);
    // A fresh token: a verified one may be served from the cache until it expires.
    let t1_fresh = k1.sign("k1", &claims("alice2", &["user"]));
    eventually(&gw, &t1_fresh, 401).await;
    let r = post_as(&gw, &t1_fresh, &chat("x")).await;
    let id = expect_error(r, 401, "invalid_token").await;
    assert!(gw.record_for(&id).await["reason"]
        .as_str()
        .unwrap()
        .contains("unknown kid \"k1\""));
}

/// Issue 8, item 12: a JWKS document with an encryption key beside the
/// signing key (as Keycloak publishes) still gives the signing key; a plain
/// http JWKS URL is refused unless allowed; an HMAC source scoped to its
/// own issuer and tenant cannot mint tokens for anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_with_an_encryption_key_http_urls_and_scoped_sources() {
    let mock = Mock::start(options()).await;
    let k1 = TestKeys::new();
    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let doc = Arc::new(Mutex::new(json!({"keys": [
        {"kty": "RSA", "kid": "enc-1", "use": "enc", "alg": "RSA-OAEP", "n": enc(&[0xc3; 256]), "e": "AQAB"},
        jwk("k1", &k1)]})));
    let addr = jwks_server(doc).await;
    let secret = "0123456789abcdef0123456789abcdef-billing";
    let auth = format!(
        "auth:\n  keys:\n    - jwks_url: http://{addr}/jwks.json\n      allow_http: true\n      refresh_secs: 1\n    - hmac_secret: {secret}\n      kid: billing\n      alg: HS256\n      issuer: svc-billing\n      tenant: billing\n  issuer: test-issuer\n  audience: [portcullis]\n"
    );
    let mut setup = Setup::new(mock.addr);
    setup.extra_yaml = auth.clone();
    let gw = Gateway::start(setup).await;
    eventually(&gw, &k1.sign("k1", &claims("alice", &["user"])), 200).await;

    let hmac = |claims: Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("billing".into());
        jsonwebtoken::encode(
            &h,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    // The section-wide issuer is not this source's: refused, and why.
    let forged = hmac(claims("svc", &["user"]));
    let id = expect_error(
        post_as(&gw, &forged, &chat("x")).await,
        401,
        "invalid_token",
    )
    .await;
    assert!(gw.record_for(&id).await["reason"]
        .as_str()
        .unwrap()
        .contains("wrong issuer"));
    // Its own issuer: accepted, in its own tenant whatever it claims.
    let mut own = claims("svc", &["user"]);
    own["iss"] = json!("svc-billing");
    own["tenant"] = json!("acme");
    let r = post_as(&gw, &hmac(own), &chat("x")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(gw.record_for(&request_id(&r)).await["tenant"], "billing");

    // Without allow_http, a plain http JWKS URL stops start-up.
    let mut setup = Setup::new(mock.addr);
    setup.extra_yaml = auth.replace("      allow_http: true\n", "");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.yaml");
    std::fs::write(
        &config,
        format!(
            "providers:\n  mock:\n    base_url: http://{}/v1\n{}",
            mock.addr, setup.extra_yaml
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("auth.keys[0].jwks_url") && text.contains("plain http"),
        "{text}"
    );
}

/// The token is checked from the headers alone: a client without a valid
/// one gets 401 at once, with no `100 Continue` and no byte of its body
/// read, and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_client_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut gw = Gateway::start(secured(mock.addr, &keys, TEST_LIMITS)).await;
    for token in ["Bearer forged.token.here", ""] {
        let mut conn = tokio::net::TcpStream::connect(gw.base.trim_start_matches("http://"))
            .await
            .unwrap();
        let auth = if token.is_empty() {
            String::new()
        } else {
            format!("authorization: {token}\r\n")
        };
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{auth}content-length: 3000000\r\nexpect: 100-continue\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        // Not a byte of the body is sent: the answer must come anyway.
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(PATIENCE, conn.read(&mut buf))
                .await
                .expect("an answer without the body")
                .unwrap();
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
        assert!(!text.contains("100 Continue"), "{text}");
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap()
            .trim()
            .to_string();
        let rec = gw.record_for(&id).await;
        assert_eq!(rec["reason_code"], "invalid_token");
        assert_eq!(rec["request_bytes"], 0);
    }
    assert!(mock.state.requests().is_empty());
    gw.stop();
    verified(&gw);
}

/// A flood of forged tokens from one address: after the burst, further
/// unknown tokens get 429 with `Retry-After` and no signature check, the
/// record says why, and a token verified before still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_tokens_is_cut_off_per_address() {
    let mock = Mock::start(options()).await;
    let keys = TestKeys::new();
    let mut setup = secured(mock.addr, &keys, TEST_LIMITS);
    setup.extra_yaml = setup
        .extra_yaml
        .replace("auth:\n", "auth:\n  failures_per_minute_per_ip: 5\n");
    let mut gw = Gateway::start(setup).await;
    let good = keys.token("ann", &["user"]);
    assert_eq!(post_as(&gw, &good, &chat("hi")).await.status(), 200);
    let forged = format!("{}x", &good[..good.len() - 1]);
    for _ in 0..5 {
        expect_error(
            post_as(&gw, &forged, &chat("x")).await,
            401,
            "invalid_token",
        )
        .await;
    }
    let r = post_as(&gw, &forged, &chat("x")).await;
    assert!(
        r.headers().get("retry-after").is_some(),
        "{:?}",
        r.headers()
    );
    let id = expect_error(r, 429, "rate_limited").await;
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["reason_code"], "rate_limited");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("too many failed authentications"),
        "{rec}"
    );
    assert_eq!(post_as(&gw, &good, &chat("still me")).await.status(), 200);
    assert_eq!(mock.state.requests().len(), 2);
    gw.stop();
    verified(&gw);
}
