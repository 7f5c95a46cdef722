//! The hash chain: canonical JSON, sealing a record to the one before it,
//! and checking one line.
//!
//! `hash = SHA-256(prev_hash + "\n" + canonical(record without hash))`, or,
//! with an audit key, `HMAC-SHA-256(key, …)` over the same bytes and
//! `"mac": "hmac-sha256"` in the record. Without the key anyone who can
//! write the file can rewrite it and recompute every hash; with it a
//! rewrite is found by `audit verify --key`.

use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// `prev_hash` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The `mac` value of keyed records.
pub const MAC: &str = "hmac-sha256";

/// Smallest accepted audit key.
pub const MIN_KEY_BYTES: usize = 16;

/// The secret of a keyed chain.
#[derive(Clone)]
pub struct AuditKey(Arc<[u8]>);

impl AuditKey {
    /// Read a key file: its bytes, one trailing newline dropped.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let mut bytes = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("audit key {}: {e}", path.display()))?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        anyhow::ensure!(
            bytes.len() >= MIN_KEY_BYTES,
            "audit key {}: {} bytes; at least {MIN_KEY_BYTES} are needed (e.g. `head -c 32 /dev/urandom > FILE`)",
            path.display(),
            bytes.len()
        );
        Ok(Self(bytes.into()))
    }

    #[cfg(test)]
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(bytes.into())
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

/// How records of one chain are sealed.
#[derive(Clone, Debug, Default)]
pub struct Sealer {
    pub key: Option<AuditKey>,
    /// Written into every record as `instance`.
    pub instance: Option<String>,
}

impl Sealer {
    /// Chain `record` to `prev`: the canonical line and its hash.
    pub fn seal(&self, record: &Value, prev: &str) -> (String, String) {
        let mut map = match record {
            Value::Object(m) => m.clone(),
            other => {
                let mut m = Map::new();
                m.insert("value".into(), other.clone());
                m
            }
        };
        map.remove("hash");
        map.remove("mac");
        if let Some(i) = &self.instance {
            map.insert("instance".into(), Value::String(i.clone()));
        }
        if self.key.is_some() {
            map.insert("mac".into(), Value::String(MAC.into()));
        }
        map.insert("prev_hash".into(), Value::String(prev.to_string()));
        let mut value = Value::Object(map);
        let hash = digest(self.key.as_ref(), prev, &canonical(&value));
        if let Value::Object(m) = &mut value {
            m.insert("hash".into(), Value::String(hash.clone()));
        }
        (canonical(&value), hash)
    }
}

impl Sealer {
    /// Chain `records` after `prev`: their lines, each ending in `\n`, and
    /// the last hash.
    pub fn seal_lines(&self, records: &[Value], prev: &str) -> (String, String) {
        let mut buf = String::new();
        let mut last = prev.to_string();
        for r in records {
            let (line, hash) = self.seal(r, &last);
            buf.push_str(&line);
            buf.push('\n');
            last = hash;
        }
        (buf, last)
    }
}

/// The hash of a record's canonical form (without `hash`) after `prev`.
pub fn digest(key: Option<&AuditKey>, prev: &str, canonical_without_hash: &str) -> String {
    match key {
        None => {
            let mut h = Sha256::new();
            h.update(prev.as_bytes());
            h.update(b"\n");
            h.update(canonical_without_hash.as_bytes());
            hex::encode(h.finalize())
        }
        Some(k) => {
            let mut h = Hmac::<Sha256>::new_from_slice(&k.0).expect("HMAC takes any key length");
            h.update(prev.as_bytes());
            h.update(b"\n");
            h.update(canonical_without_hash.as_bytes());
            hex::encode(h.finalize().into_bytes())
        }
    }
}

/// What one line holds once checked.
pub struct Checked {
    pub prev_hash: String,
    pub hash: String,
}

/// Check one line on its own: canonical form, keyed or not as expected,
/// and its hash over its content and its own `prev_hash`. Linking to the
/// line before is the caller's job.
pub fn check_line(line: &str, key: Option<&AuditKey>) -> Result<Checked, String> {
    let mut value: Value =
        serde_json::from_str(line).map_err(|_| "not a JSON record".to_string())?;
    if canonical(&value) != line {
        return Err("not in canonical form (the line was edited)".into());
    }
    let map = value
        .as_object_mut()
        .ok_or_else(|| "not a JSON object".to_string())?;
    let hash = map
        .remove("hash")
        .and_then(|h| h.as_str().map(str::to_string))
        .ok_or_else(|| "has no hash".to_string())?;
    let prev_hash = map
        .get("prev_hash")
        .and_then(Value::as_str)
        .ok_or_else(|| "has no prev_hash".to_string())?
        .to_string();
    let keyed = match map.get("mac") {
        None => false,
        Some(Value::String(m)) if m == MAC => true,
        Some(_) => return Err("unknown `mac`".into()),
    };
    match (keyed, key) {
        (true, None) => {
            return Err("the record is keyed (HMAC): pass the audit key with --key FILE".into())
        }
        (false, Some(_)) => {
            return Err(
                "the record is not keyed: it was written without the key, or rewritten".into(),
            )
        }
        _ => {}
    }
    if digest(key, &prev_hash, &canonical(&value)) != hash {
        return Err(if keyed {
            "the MAC does not match the content (the line was edited, or another key was used)"
                .into()
        } else {
            "hash does not match the content (the line was edited)".into()
        });
    }
    Ok(Checked { prev_hash, hash })
}

/// JSON with object keys sorted at every level and no whitespace.
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}
