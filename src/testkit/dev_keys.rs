//! The dev key pair (`keys/private/dev.key`, `keys/dev.pem`) and tokens
//! signed with a private key file: behind `keys generate`, `token`, the
//! demo, the tests and the load tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The dev signing key pair: `keys/private/dev.key` (never committed) and
/// `keys/dev.pem`, the public key the demo config loads. ES256.
pub struct DevKeys {
    pub private: PathBuf,
    pub public: PathBuf,
}

impl DevKeys {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            private: dir.join("private").join("dev.key"),
            public: dir.join("dev.pem"),
        }
    }

    /// Write a new pair (replacing any old one).
    pub fn generate(&self) -> anyhow::Result<()> {
        let pair = rcgen::KeyPair::generate()?;
        if let Some(d) = self.private.parent() {
            std::fs::create_dir_all(d)?;
        }
        if let Some(d) = self.public.parent() {
            std::fs::create_dir_all(d)?;
        }
        write_private(&self.private, pair.serialize_pem().as_bytes())?;
        std::fs::write(&self.public, pair.public_key_pem())?;
        Ok(())
    }

    /// Generate the pair unless both halves exist.
    pub fn ensure(&self) -> anyhow::Result<bool> {
        if self.private.exists() && self.public.exists() {
            return Ok(false);
        }
        self.generate()?;
        Ok(true)
    }
}

#[cfg(unix)]
fn write_private(path: &Path, pem: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(pem)
}

#[cfg(not(unix))]
fn write_private(path: &Path, pem: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, pem)
}

/// Claims for a dev token.
pub struct TokenRequest<'a> {
    pub sub: &'a str,
    pub tenant: &'a str,
    pub roles: &'a [String],
    pub ttl: Duration,
    pub issuer: &'a str,
    pub audience: &'a str,
}

/// Sign a token with a private key file (ES256 PKCS#8, kid = file stem).
pub fn mint(key_file: &Path, req: &TokenRequest<'_>) -> anyhow::Result<String> {
    let pem =
        std::fs::read(key_file).map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?;
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: not an ES256 private key: {e}", key_file.display()))?;
    let now = crate::clock::unix_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(crate::stores::keys::stem(key_file));
    let claims = serde_json::json!({
        "sub": req.sub, "tenant": req.tenant, "roles": req.roles,
        "iss": req.issuer, "aud": req.audience,
        "iat": now, "nbf": now, "exp": now + req.ttl.as_secs(),
    });
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}
