//! JWT verification keys: loaded from disk at start-up, and followed at a
//! JWKS URL by a background task. (The dev key pair behind `keys
//! generate`, `token` and `demo` is in `crate::testkit::dev_keys`.)

use crate::config::{AuthSection, KeyEntry};
use crate::upstream;
use async_trait::async_trait;
use filters::jwt_auth::{KeyScope, KeySet, KeySource, VerifyKey};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A token naming an unknown kid triggers a JWKS refresh at most this often.
pub const MIN_REFRESH_GAP: Duration = Duration::from_secs(10);

/// Keys from disk plus the latest JWKS URL documents.
pub struct GatewayKeys {
    fixed: KeySet,
    remote: RwLock<KeySet>,
    refresh: Notify,
}

impl GatewayKeys {
    /// Replace the keys that came from JWKS URLs: a key removed there is
    /// refused from now on.
    pub fn set_remote(&self, keys: KeySet) {
        if let Ok(mut r) = self.remote.write() {
            *r = keys;
        }
    }
}

impl KeySource for GatewayKeys {
    fn key(&self, kid: Option<&str>) -> Option<Arc<VerifyKey>> {
        // One read guard for the whole lookup: taking a second one while a
        // refresh waits to write could deadlock.
        let remote = self.remote.read().ok()?;
        match kid {
            Some(kid) => self.fixed.get(kid).or_else(|| remote.get(kid)),
            None if self.fixed.len() + remote.len() == 1 => {
                self.fixed.single().or_else(|| remote.single())
            }
            None => None,
        }
    }

    fn unknown_kid(&self, _kid: &str) {
        self.refresh.notify_one();
    }
}

/// JWKS URLs to follow, each with its refresh interval and the scope of
/// its keys.
pub type JwksUrls = Vec<(String, Duration, KeyScope)>;

/// Load every fixed key source; JWKS URLs are returned to be followed.
/// Reports every problem at once.
pub fn load(auth: &AuthSection) -> Result<(Arc<GatewayKeys>, JwksUrls), Vec<String>> {
    let mut keys = Vec::new();
    let mut urls = Vec::new();
    let mut errors = Vec::new();
    for (i, entry) in auth.keys.iter().enumerate() {
        let alg = entry.alg.as_deref().and_then(|a| a.parse().ok());
        let scope = entry.scope();
        let mut push = |r: Result<VerifyKey, String>, what: &Path| match r {
            Ok(k) => keys.push(k.scoped(scope.clone())),
            Err(e) => errors.push(format!("auth.keys[{i}]: {}: {e}", what.display())),
        };
        match entry {
            KeyEntry { dir: Some(dir), .. } => match pem_files(dir) {
                Ok(files) if files.is_empty() => errors.push(format!(
                    "auth.keys[{i}]: {}: no *.pem public keys (run `portcullis keys generate`)",
                    dir.display()
                )),
                Ok(files) => {
                    for (kid, path) in files {
                        push(
                            read(&path).and_then(|b| VerifyKey::from_pem(&kid, &b, alg)),
                            &path,
                        );
                    }
                }
                Err(e) => errors.push(format!("auth.keys[{i}]: {}: {e}", dir.display())),
            },
            KeyEntry {
                file: Some(path), ..
            } => {
                let kid = entry.kid.clone().unwrap_or_else(|| stem(path));
                push(
                    read(path).and_then(|b| VerifyKey::from_pem(&kid, &b, alg)),
                    path,
                );
            }
            KeyEntry {
                jwks_file: Some(path),
                ..
            } => match read(path).and_then(|b| VerifyKey::from_jwks(&b)) {
                Ok((list, skipped)) => {
                    for why in skipped {
                        log::warn!("auth.keys[{i}]: {}: skipped {why}", path.display());
                    }
                    keys.extend(list.into_iter().map(|k| k.scoped(entry.scope())));
                }
                Err(e) => errors.push(format!("auth.keys[{i}]: {}: {e}", path.display())),
            },
            KeyEntry {
                jwks_url: Some(url),
                ..
            } => {
                urls.push((
                    url.clone(),
                    Duration::from_secs(entry.refresh_secs.unwrap_or(300).max(1)),
                    entry.scope(),
                ));
            }
            KeyEntry {
                hmac_secret: Some(secret),
                kid: Some(kid),
                ..
            } => match alg {
                Some(alg) => match VerifyKey::hmac(kid, secret.as_bytes(), alg) {
                    Ok(k) => keys.push(k.scoped(entry.scope())),
                    Err(e) => errors.push(format!("auth.keys[{i}]: {e}")),
                },
                None => errors.push(format!("auth.keys[{i}]: an hmac_secret needs an alg")),
            },
            _ => errors.push(format!("auth.keys[{i}]: no key source")),
        }
    }
    if !auth.allow_dev_issuer && keys.iter().any(|k| k.kid == crate::config::DEV_KID) {
        errors.push(format!(
            "auth.keys: a key with kid '{}' is loaded: that is the dev key `portcullis keys \
             generate` writes, and whoever holds its private half can mint any token. Remove \
             it, or set `auth.allow_dev_issuer: true` for a demo",
            crate::config::DEV_KID
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok((
        Arc::new(GatewayKeys {
            fixed: KeySet::new(keys),
            remote: RwLock::new(KeySet::default()),
            refresh: Notify::new(),
        }),
        urls,
    ))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| e.to_string())
}

pub(crate) fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn pem_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pem"))
        .map(|p| (stem(&p), p))
        .collect();
    files.sort();
    Ok(files)
}

/// Follows the JWKS URLs: at start, every `refresh` interval, and soon
/// after a token names an unknown kid (at most every [`MIN_REFRESH_GAP`]).
pub struct JwksRefresher {
    pub keys: Arc<GatewayKeys>,
    pub urls: JwksUrls,
    pub connector: Arc<pingora::connectors::http::Connector>,
}

impl JwksRefresher {
    async fn refresh(&self) {
        let mut all = Vec::new();
        for (url, _, scope) in &self.urls {
            match upstream::get(&self.connector, url, Duration::from_secs(5)).await {
                Ok(body) => match VerifyKey::from_jwks(&body) {
                    Ok((keys, skipped)) => {
                        for why in skipped {
                            log::warn!("JWKS {url}: skipped {why}");
                        }
                        all.extend(keys.into_iter().map(|k| k.scoped(scope.clone())));
                    }
                    Err(e) => {
                        log::warn!("JWKS {url}: {e}; keeping the previous keys");
                        return;
                    }
                },
                Err(e) => {
                    log::warn!("JWKS {url}: {e}; keeping the previous keys");
                    return;
                }
            }
        }
        log::info!("JWKS refreshed: {} keys", all.len());
        self.keys.set_remote(KeySet::new(all));
    }
}

#[async_trait]
impl BackgroundService for JwksRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let interval = self
            .urls
            .iter()
            .map(|(_, d, _)| *d)
            .min()
            .unwrap_or(Duration::from_secs(300));
        let last = Mutex::new(Instant::now() - MIN_REFRESH_GAP);
        loop {
            if let Ok(mut l) = last.lock() {
                *l = Instant::now();
            }
            self.refresh().await;
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(interval) => {}
                _ = self.keys.refresh.notified() => {
                    let since = last.lock().map(|l| l.elapsed()).unwrap_or(MIN_REFRESH_GAP);
                    if since < MIN_REFRESH_GAP {
                        tokio::select! {
                            _ = shutdown.changed() => return,
                            _ = tokio::time::sleep(MIN_REFRESH_GAP - since) => {}
                        }
                    }
                }
            }
        }
    }
}
