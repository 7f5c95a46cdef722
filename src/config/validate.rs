//! Checks across sections, and the pieces the built config is made of:
//! addresses, providers, the auth section, instance ids.

use super::*;
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub(super) struct Errors {
    pub(super) file: PathBuf,
    pub(super) list: Vec<ConfigError>,
}

impl Errors {
    pub(super) fn push(&mut self, key: &str, message: impl Into<String>) {
        self.list.push(ConfigError {
            file: self.file.clone(),
            key: key.to_string(),
            message: message.into(),
        });
    }
}

/// Deserialize one top-level section, recording the error with its full
/// key path.
/// A path with `.` and `..` resolved by their names (no file system look-up).
pub(super) fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// An instance id is used in file names and Redis keys.
pub fn valid_instance_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub(super) fn section<T: DeserializeOwned>(
    map: &serde_yaml::Mapping,
    name: &str,
    errors: &mut Errors,
) -> Option<T> {
    let value = map.get(name)?.clone();
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let key = if inner == "." || inner.is_empty() {
                name.to_string()
            } else {
                format!("{name}.{inner}")
            };
            errors.push(&key, e.into_inner().to_string());
            None
        }
    }
}

pub(super) fn check_auth(a: &AuthSection, errors: &mut Errors) {
    if a.keys.is_empty() {
        errors.push("auth.keys", "at least one key source is required");
    }
    if a.issuer.as_deref() == Some(DEV_ISSUER) && !a.allow_dev_issuer {
        errors.push(
            "auth.issuer",
            format!(
                "'{DEV_ISSUER}' is the dev issuer: tokens minted with the dev key would be \
                 trusted. Set your identity provider's issuer, or `auth.allow_dev_issuer: true` \
                 for a demo"
            ),
        );
    }
    for (i, k) in a.keys.iter().enumerate() {
        let key = format!("auth.keys[{i}]");
        let sources = [
            k.dir.is_some(),
            k.file.is_some(),
            k.jwks_file.is_some(),
            k.jwks_url.is_some(),
            k.hmac_secret.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if sources != 1 {
            errors.push(
                &key,
                "give exactly one of dir, file, jwks_file, jwks_url, hmac_secret",
            );
        }
        if let Some(alg) = &k.alg {
            if alg.parse::<jsonwebtoken::Algorithm>().is_err() {
                errors.push(&format!("{key}.alg"), format!("unknown algorithm '{alg}'"));
            }
        }
        if k.hmac_secret.is_some() && (k.kid.is_none() || k.alg.is_none()) {
            errors.push(
                &key,
                "an hmac_secret needs a kid and an HS256/HS384/HS512 alg",
            );
        }
        if let Some(url) = &k.jwks_url {
            match url::Url::parse(url).map(|u| u.scheme().to_string()) {
                Ok(s) if s == "https" => {}
                Ok(s) if s == "http" && k.allow_http => {}
                Ok(s) if s == "http" => errors.push(
                    &format!("{key}.jwks_url"),
                    format!(
                        "'{url}' is plain http: anyone on the path could replace the keys. \
                         Use https, or set `allow_http: true` on this entry"
                    ),
                ),
                _ => errors.push(
                    &format!("{key}.jwks_url"),
                    format!("'{url}' is not an https URL"),
                ),
            }
        }
        if k.issuer.as_deref() == Some(DEV_ISSUER) && !a.allow_dev_issuer {
            errors.push(
                &format!("{key}.issuer"),
                format!("'{DEV_ISSUER}' is the dev issuer (see auth.allow_dev_issuer)"),
            );
        }
    }
}

pub(super) fn parse_addr(text: &str, key: &str, errors: &mut Errors) -> Option<SocketAddr> {
    match text.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(
                key,
                format!("'{text}' is not an address like 127.0.0.1:8080"),
            );
            None
        }
    }
}

pub(super) fn build_provider(
    name: &str,
    p: ProviderSection,
    errors: &mut Errors,
) -> Option<Provider> {
    let key = format!("providers.{name}.base_url");
    let url = match url::Url::parse(&p.base_url) {
        Ok(u) => u,
        Err(e) => {
            errors.push(&key, format!("'{}' is not a URL: {e}", p.base_url));
            return None;
        }
    };
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        other => {
            errors.push(&key, format!("scheme must be http or https, not '{other}'"));
            return None;
        }
    };
    let Some(host) = url.host_str() else {
        errors.push(&key, "has no host");
        return None;
    };
    if url.query().is_some() || url.fragment().is_some() {
        errors.push(&key, "must not have a query or fragment");
    }
    let t = p.timeouts;
    for (field, v) in [
        ("connect_ms", t.connect_ms),
        ("total_connect_ms", t.total_connect_ms),
        ("read_ms", t.read_ms),
        ("write_ms", t.write_ms),
        ("idle_ms", t.idle_ms),
        ("total_ms", t.total_ms),
    ] {
        if v == 0 {
            errors.push(
                &format!("providers.{name}.timeouts.{field}"),
                "must be greater than 0",
            );
        }
    }
    if p.api_key.as_deref() == Some("") {
        errors.push(
            &format!("providers.{name}.api_key"),
            "is empty (is its environment variable set?)",
        );
    }
    Some(Provider {
        name: name.to_string(),
        tls,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port: url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 }),
        base_path: url.path().trim_end_matches('/').to_string(),
        api_key: p.api_key,
        kind: p.kind,
        timeouts: t,
    })
}
