//! JWT authentication, first in the chain.
//!
//! - Every key is pinned to one algorithm; the token's `alg` must equal it.
//!   `alg: none` is refused, and a public key is never used as an HMAC
//!   secret (an HMAC key exists only when configured as a shared secret).
//! - `exp` is required, `nbf` honoured, `iss` and `aud` checked when
//!   configured, with a leeway. Time comes from the injected [`Clock`].
//! - Subject, tenant and roles are read from configurable claim paths
//!   (`realm_access.roles` style).
//! - Verified tokens are cached, keyed by their SHA-256, until they expire,
//!   so a client reusing its token does not pay for a signature check.
//! - Every refusal is 401 with `WWW-Authenticate: Bearer
//!   error="invalid_token"`; the audit reason names the check that failed.

use crate::chain::{Decision, Fact, FilterError, FilterKind, RequestFilter, Verdict};
use crate::clock::Clock;
use crate::error::{untrusted, ErrorCode, Rejection};
use crate::request::{Principal, RequestView};
use crate::sharded::{Sharded, SHARDS};
use async_trait::async_trait;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

/// A verification key, pinned to one algorithm.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: String,
    pub alg: Algorithm,
    key: DecodingKey,
    /// What tokens verified with this key may claim, when its source says.
    pub scope: KeyScope,
}

/// Per key source (an `auth.keys` entry): overrides of the section-wide
/// `issuer` and `audience`, and a tenant every token of the source gets
/// whatever it claims. A service given an HMAC secret can then only mint
/// tokens for its own issuer, audience and tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyScope {
    pub issuer: Option<String>,
    pub audience: Option<Vec<String>>,
    pub tenant: Option<String>,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyKey({}, {:?})", self.kid, self.alg)
    }
}

// DER encodings of the algorithm identifiers in a SubjectPublicKeyInfo.
const OID_RSA: &[u8] = &[
    0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01,
];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2B, 0x65, 0x70];

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl VerifyKey {
    /// A public key in PEM (SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`).
    /// The algorithm is the configured one, or inferred from the key type
    /// (RSA → RS256, P-256 → ES256, P-384 → ES384, Ed25519 → EdDSA).
    pub fn from_pem(kid: &str, pem_text: &[u8], alg: Option<Algorithm>) -> Result<Self, String> {
        let block = pem::parse(pem_text).map_err(|e| format!("not a PEM file: {e}"))?;
        let der = block.contents();
        let (family, inferred) = match block.tag() {
            "RSA PUBLIC KEY" => ("RSA", Algorithm::RS256),
            "PUBLIC KEY" if contains(der, OID_RSA) => ("RSA", Algorithm::RS256),
            "PUBLIC KEY" if contains(der, OID_P256) => ("P-256", Algorithm::ES256),
            "PUBLIC KEY" if contains(der, OID_P384) => ("P-384", Algorithm::ES384),
            "PUBLIC KEY" if contains(der, OID_ED25519) => ("Ed25519", Algorithm::EdDSA),
            "PUBLIC KEY" => return Err("unsupported public key type".into()),
            other => {
                return Err(format!(
                    "expected a public key (BEGIN PUBLIC KEY), found BEGIN {other}"
                ))
            }
        };
        let alg = alg.unwrap_or(inferred);
        let fits = match family {
            "RSA" => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            _ => alg == inferred,
        };
        if !fits {
            return Err(format!("algorithm {alg:?} does not fit a {family} key"));
        }
        let key = match family {
            "RSA" => DecodingKey::from_rsa_pem(pem_text),
            "Ed25519" => DecodingKey::from_ed_pem(pem_text),
            _ => DecodingKey::from_ec_pem(pem_text),
        }
        .map_err(|e| format!("unreadable {family} key: {e}"))?;
        Ok(Self {
            kid: kid.to_string(),
            alg,
            key,
            scope: KeyScope::default(),
        })
    }

    /// The same key, scoped.
    pub fn scoped(mut self, scope: KeyScope) -> Self {
        self.scope = scope;
        self
    }

    /// A shared HMAC secret, only ever from explicit configuration.
    pub fn hmac(kid: &str, secret: &[u8], alg: Algorithm) -> Result<Self, String> {
        if !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(format!("{alg:?} is not an HMAC algorithm"));
        }
        if secret.len() < 32 {
            return Err("an HMAC secret must be at least 32 bytes".into());
        }
        Ok(Self {
            kid: kid.to_string(),
            alg,
            key: DecodingKey::from_secret(secret),
            scope: KeyScope::default(),
        })
    }

    /// Every usable signing key of a JWKS document, and why each other key
    /// was skipped: an encryption key (`use: enc`, or `key_ops` without
    /// `verify`), an algorithm the gateway does not verify with (such as
    /// `RSA-OAEP`), a symmetric (`oct`) key, a key without `kid`, an
    /// unsupported curve, or an entry that is not a JWK. Identity
    /// providers publish such keys beside their signing keys; one of them
    /// must not make the whole document unusable. A document without any
    /// usable key is an error.
    pub fn from_jwks(json: &[u8]) -> Result<(Vec<Self>, Vec<String>), String> {
        let doc: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let entries = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("not a JWKS document: no `keys` array")?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let kid = entry
                .get("kid")
                .and_then(Value::as_str)
                .map_or_else(|| format!("#{i}"), str::to_string);
            let usage = entry.get("use").and_then(Value::as_str);
            let verifies = entry
                .get("key_ops")
                .and_then(Value::as_array)
                .is_none_or(|ops| ops.iter().any(|o| o == "verify"));
            if usage.is_some_and(|u| u != "sig") || !verifies {
                skipped.push(format!("key {kid}: not a signing key"));
                continue;
            }
            match serde_json::from_value::<Jwk>(entry.clone())
                .map_err(|e| format!("key {kid}: {e}"))
                .and_then(|jwk| {
                    Self::from_jwk(&jwk).map_err(|e| match e.starts_with("key ") {
                        true => e,
                        false => format!("key {kid}: {e}"),
                    })
                }) {
                Ok(k) => keys.push(k),
                Err(e) => skipped.push(e),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "no usable signing key in the JWKS document ({})",
                if skipped.is_empty() {
                    "it has no keys".to_string()
                } else {
                    skipped.join("; ")
                }
            ));
        }
        Ok((keys, skipped))
    }

    fn from_jwk(jwk: &Jwk) -> Result<Self, String> {
        let kid = jwk.common.key_id.clone().ok_or("a JWKS key has no kid")?;
        let inferred = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                _ => return Err(format!("key {kid}: unsupported curve")),
            },
            AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
            AlgorithmParameters::OctetKey(_) => {
                return Err(format!(
                    "key {kid}: symmetric keys are not accepted from a JWKS"
                ))
            }
        };
        let alg = match jwk.common.key_algorithm {
            None => inferred,
            Some(KeyAlgorithm::RS256) => Algorithm::RS256,
            Some(KeyAlgorithm::RS384) => Algorithm::RS384,
            Some(KeyAlgorithm::RS512) => Algorithm::RS512,
            Some(KeyAlgorithm::PS256) => Algorithm::PS256,
            Some(KeyAlgorithm::PS384) => Algorithm::PS384,
            Some(KeyAlgorithm::PS512) => Algorithm::PS512,
            Some(KeyAlgorithm::ES256) => Algorithm::ES256,
            Some(KeyAlgorithm::ES384) => Algorithm::ES384,
            Some(KeyAlgorithm::EdDSA) => Algorithm::EdDSA,
            Some(other) => return Err(format!("key {kid}: algorithm {other:?} not accepted")),
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid}: {e}"))?;
        Ok(Self {
            kid,
            alg,
            key,
            scope: KeyScope::default(),
        })
    }
}

/// Where the filter finds keys. The gateway's implementation also follows
/// a JWKS URL.
pub trait KeySource: Send + Sync {
    /// The key for a token's `kid`; a token without `kid` is accepted only
    /// when exactly one key is configured.
    fn key(&self, kid: Option<&str>) -> Option<Arc<VerifyKey>>;
    /// A token named a `kid` this source does not know: a hint to refresh.
    fn unknown_kid(&self, _kid: &str) {}
}

/// A fixed set of keys.
#[derive(Debug, Default, Clone)]
pub struct KeySet {
    keys: HashMap<String, Arc<VerifyKey>>,
}

impl KeySet {
    pub fn new(keys: impl IntoIterator<Item = VerifyKey>) -> Self {
        Self {
            keys: keys
                .into_iter()
                .map(|k| (k.kid.clone(), Arc::new(k)))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn get(&self, kid: &str) -> Option<Arc<VerifyKey>> {
        self.keys.get(kid).cloned()
    }

    /// The only key, when there is exactly one.
    pub fn single(&self) -> Option<Arc<VerifyKey>> {
        (self.keys.len() == 1)
            .then(|| self.keys.values().next().cloned())
            .flatten()
    }
}

impl KeySource for KeySet {
    fn key(&self, kid: Option<&str>) -> Option<Arc<VerifyKey>> {
        match kid {
            Some(kid) => self.get(kid),
            None => self.single(),
        }
    }
}

/// Where subject, tenant and roles are in the claims: dotted paths.
#[derive(Debug, Clone)]
pub struct ClaimPaths {
    pub subject: String,
    pub tenant: String,
    pub roles: String,
}

impl Default for ClaimPaths {
    fn default() -> Self {
        Self {
            subject: "sub".into(),
            tenant: "tenant".into(),
            roles: "roles".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub issuer: Option<String>,
    /// Accepted audiences; the token's `aud` must contain one.
    pub audience: Vec<String>,
    pub leeway_secs: u64,
    pub claims: ClaimPaths,
    /// Tenant for tokens without a tenant claim.
    pub default_tenant: String,
    /// Verified tokens kept (bounded).
    pub cache_size: usize,
    /// Failed authentications allowed per client address and minute (with
    /// a burst of as many) before further unknown tokens from it are
    /// refused unchecked: a flood of forged tokens cannot make the gateway
    /// spend a signature check on each. 0: no limit. Tokens already
    /// verified (cached) are never refused by it.
    pub failures_per_minute_per_ip: u32,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: Vec::new(),
            leeway_secs: 30,
            claims: ClaimPaths::default(),
            default_tenant: "default".into(),
            cache_size: 10_000,
            failures_per_minute_per_ip: 60,
        }
    }
}

/// A verified token: who, until when, and with which key. A hit counts only
/// while the key source still holds that very key, so a key removed from a
/// JWKS stops its cached tokens too.
struct Cached {
    principal: Principal,
    exp: u64,
    kid: Option<String>,
    key: Arc<VerifyKey>,
}

pub struct JwtAuth {
    settings: JwtSettings,
    keys: Arc<dyn KeySource>,
    clock: Arc<dyn Clock>,
    cache: Sharded<[u8; 32], Cached>,
    verifications: std::sync::atomic::AtomicU64,
    /// Client address → GCRA time (ms) of its failed authentications.
    failures: Sharded<std::net::IpAddr, u64>,
}

/// Why a token was refused: the code and the check, for the audit record.
type Refusal = (ErrorCode, String);

fn refuse(reason: impl Into<String>) -> Refusal {
    (ErrorCode::InvalidToken, reason.into())
}

impl JwtAuth {
    pub fn new(settings: JwtSettings, keys: Arc<dyn KeySource>, clock: Arc<dyn Clock>) -> Self {
        Self {
            settings,
            keys,
            clock,
            cache: Sharded::default(),
            verifications: std::sync::atomic::AtomicU64::new(0),
            failures: Sharded::default(),
        }
    }

    /// Signature checks made so far (cache misses).
    pub fn verifications(&self) -> u64 {
        self.verifications
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Verify a bearer token without the cache: the caller, and when the
    /// token expires (seconds since the epoch).
    pub fn verify(
        &self,
        token: &str,
    ) -> Result<(Principal, u64, Option<String>, Arc<VerifyKey>), Refusal> {
        self.verifications
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = self.clock.now_secs();
        let leeway = self.settings.leeway_secs;
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refuse("malformed token: not three dot-separated parts"));
        };
        let header: Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header.trim_end_matches('='))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| refuse("malformed token: header is not base64url JSON"))?;
        let alg_name = header["alg"].as_str().unwrap_or("");
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(refuse("alg none is refused"));
        }
        let alg: Algorithm = alg_name
            .parse()
            .map_err(|_| refuse(format!("unsupported alg {}", untrusted(alg_name))))?;
        let kid = header["kid"].as_str();
        let Some(key) = self.keys.key(kid) else {
            return Err(match kid {
                Some(kid) => {
                    self.keys.unknown_kid(kid);
                    refuse(format!("unknown kid {}", untrusted(kid)))
                }
                None => refuse("token has no kid and the key cannot be chosen"),
            });
        };
        if key.alg != alg {
            return Err(refuse(format!(
                "alg {alg:?} not allowed for key '{}' (pinned to {:?})",
                key.kid, key.alg
            )));
        }
        let mut validation = Validation::new(key.alg);
        // Time and audience are checked below, with the injected clock and
        // precise reasons.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<Value>(token, &key.key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => refuse("bad signature"),
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                    refuse("alg does not match the key")
                }
                _ => refuse(format!("malformed token: {e}")),
            })?
            .claims;
        let Some(exp) = claims.get("exp").and_then(Value::as_u64) else {
            return Err(refuse("exp claim missing or not a number"));
        };
        if now >= exp.saturating_add(leeway) {
            return Err((
                ErrorCode::TokenExpired,
                format!("token expired (exp {exp}, now {now})"),
            ));
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf
                .as_u64()
                .ok_or_else(|| refuse("nbf claim is not a number"))?;
            if now.saturating_add(leeway) < nbf {
                return Err(refuse(format!(
                    "token not valid yet (nbf {nbf}, now {now})"
                )));
            }
        }
        let issuer = key.scope.issuer.as_ref().or(self.settings.issuer.as_ref());
        if let Some(issuer) = issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
                return Err(refuse(format!(
                    "wrong issuer {}",
                    claims.get("iss").unwrap_or(&Value::Null)
                )));
            }
        }
        let audience = key
            .scope
            .audience
            .as_ref()
            .unwrap_or(&self.settings.audience);
        if !audience.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => audience.contains(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| audience.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err(refuse(format!(
                    "wrong audience {}",
                    claims.get("aud").unwrap_or(&Value::Null)
                )));
            }
        }
        let paths = &self.settings.claims;
        let subject = match claim(&claims, &paths.subject) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(refuse(format!("subject claim '{}' missing", paths.subject))),
        };
        let tenant = match (&key.scope.tenant, claim(&claims, &paths.tenant)) {
            (Some(pinned), _) => pinned.clone(),
            (None, Some(Value::String(t))) if !t.is_empty() => t.clone(),
            _ => self.settings.default_tenant.clone(),
        };
        let roles = match claim(&claims, &paths.roles) {
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
            _ => Vec::new(),
        };
        Ok((
            Principal {
                subject,
                tenant,
                roles,
            },
            exp,
            kid.map(str::to_string),
            key,
        ))
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Principal> {
        let now = self.clock.now_secs();
        let hit = {
            let shard = self
                .cache
                .lock(Sharded::<[u8; 32], Cached>::shard_of_random(digest[0]));
            let c = shard.map.get(digest)?;
            if now >= c.exp.saturating_add(self.settings.leeway_secs) {
                return None;
            }
            (c.principal.clone(), c.kid.clone(), c.key.clone())
        };
        let (principal, kid, key) = hit;
        let current = self.keys.key(kid.as_deref())?;
        Arc::ptr_eq(&current, &key).then_some(principal)
    }

    /// Cache a verified token. Each shard holds its share of
    /// `cache_size`; a full shard first drops expired tokens, then, if it
    /// is still more than three-quarters full, everything (a cache miss
    /// only costs one verification).
    fn remember(&self, digest: [u8; 32], entry: Cached) {
        let per_shard = self.settings.cache_size.div_ceil(SHARDS);
        if per_shard == 0 {
            return;
        }
        let mut shard = self
            .cache
            .lock(Sharded::<[u8; 32], Cached>::shard_of_random(digest[0]));
        if shard.map.len() >= per_shard {
            let now = self.clock.now_secs();
            let leeway = self.settings.leeway_secs;
            shard.map.retain(|_, c| now < c.exp.saturating_add(leeway));
            if shard.map.len() > per_shard / 4 * 3 {
                shard.map.clear();
            }
        }
        shard.map.insert(digest, entry);
    }
}

/// Client addresses as one host holds them: IPv4 as it is, IPv6 by /64.
fn address_group(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V4(_) => ip,
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// The value at a dotted path (`realm_access.roles`).
fn claim<'v>(claims: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(claims, |v, part| v.get(part))
}

/// The token of an `Authorization: Bearer TOKEN` header.
fn bearer(header: Option<&str>) -> Result<&str, String> {
    let header = header.ok_or("no Authorization header")?;
    let (scheme, token) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(format!(
            "authorization scheme {} is not Bearer",
            untrusted(scheme)
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err("empty bearer token".into());
    }
    Ok(token)
}

fn denied(code: ErrorCode, reason: String) -> Verdict {
    Verdict::from(Decision::Deny(Rejection::new(code, reason))).with(Fact::Header(
        "www-authenticate",
        "Bearer error=\"invalid_token\"".into(),
    ))
}

impl JwtAuth {
    /// Authenticate an `Authorization` header value (cached), for the chain
    /// and the admin API alike. The error is the code and the failed check.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<Principal, (ErrorCode, String)> {
        self.authenticate_from(authorization, None)
    }

    /// [`JwtAuth::authenticate`] for a client at `ip`: failures count
    /// against the address, and an address over its failure budget gets
    /// 429 `rate_limited` for any token not verified before.
    pub fn authenticate_from(
        &self,
        authorization: Option<&str>,
        ip: Option<std::net::IpAddr>,
    ) -> Result<Principal, (ErrorCode, String)> {
        let ip = ip.map(address_group);
        let result = self.authenticate_checked(authorization, ip);
        // A request without a token cost nothing to refuse: not counted.
        if let (Err((ErrorCode::InvalidToken | ErrorCode::TokenExpired, _)), Some(ip), Some(_)) =
            (&result, ip, authorization)
        {
            self.count_failure(ip);
        }
        result
    }

    /// Milliseconds between two failures a client may make, over the burst
    /// (at least 1: the config allows at most 60,000 a minute).
    fn failure_interval_ms(&self) -> Option<u64> {
        match self.settings.failures_per_minute_per_ip {
            0 => None,
            n => Some((60_000 / u64::from(n)).max(1)),
        }
    }

    /// GCRA over failures: allowed while the address's time is at most a
    /// burst ahead of now.
    fn over_failure_budget(&self, ip: std::net::IpAddr) -> Option<u64> {
        let interval = self.failure_interval_ms()?;
        let burst = interval * u64::from(self.settings.failures_per_minute_per_ip);
        let now = self.clock.now_ms();
        let shard = self.failures.lock(self.failures.shard_of(&ip));
        let tat = *shard.map.get(&ip)?;
        (tat > now + burst - interval).then(|| tat - (now + burst - interval))
    }

    fn count_failure(&self, ip: std::net::IpAddr) {
        let Some(interval) = self.failure_interval_ms() else {
            return;
        };
        let now = self.clock.now_ms();
        let mut shard = self.failures.lock(self.failures.shard_of(&ip));
        let tat = shard.map.get(&ip).copied().unwrap_or(now).max(now) + interval;
        shard.map.insert(ip, tat);
        shard.sweep_if_grown(4096, |m| m.retain(|_, t| *t > now));
    }

    fn authenticate_checked(
        &self,
        authorization: Option<&str>,
        ip: Option<std::net::IpAddr>,
    ) -> Result<Principal, (ErrorCode, String)> {
        let token = bearer(authorization).map_err(|reason| (ErrorCode::InvalidToken, reason))?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(principal) = self.cached(&digest) {
            return Ok(principal);
        }
        if let Some(wait_ms) = ip.and_then(|ip| self.over_failure_budget(ip)) {
            return Err((
                ErrorCode::RateLimited,
                format!(
                    "too many failed authentications from this address; the token was not checked (retry in {} s)",
                    wait_ms.div_ceil(1000)
                ),
            ));
        }
        let (principal, exp, kid, key) = self.verify(token)?;
        self.remember(
            digest,
            Cached {
                principal: principal.clone(),
                exp,
                kid,
                key,
            },
        );
        Ok(principal)
    }
}

#[async_trait]
impl RequestFilter for JwtAuth {
    fn kind(&self) -> FilterKind {
        FilterKind::JwtAuth
    }

    async fn check(&self, request: &RequestView<'_>) -> Result<Verdict, FilterError> {
        if request.dry_run && request.principal.is_some() {
            // `/admin/simulate` names the caller itself.
            return Ok(Decision::Allow.into());
        }
        match self.authenticate_from(request.authorization, request.client_ip) {
            Ok(principal) => Ok(Verdict::from(Decision::Allow).with(Fact::Principal(principal))),
            Err((ErrorCode::RateLimited, reason)) => {
                let retry = request
                    .client_ip
                    .and_then(|ip| self.over_failure_budget(address_group(ip)))
                    .map_or(1, |ms| ms.div_ceil(1000).max(1))
                    .to_string();
                Ok(Verdict::from(Decision::Deny(Rejection::new(
                    ErrorCode::RateLimited,
                    reason,
                )))
                .with(Fact::Header("retry-after", retry)))
            }
            Err((code, reason)) => Ok(denied(code, reason)),
        }
    }
}

#[cfg(test)]
mod tests;
