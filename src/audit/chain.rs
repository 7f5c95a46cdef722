//! The hash chain: canonical JSON, sealing a record to the one before it,
//! and checking one line.
//!
//! `hash = SHA-256(prev_hash + "\n" + canonical(record without hash))`, or,
//! with an audit key, `HMAC-SHA-256(key, …)` over the same bytes and
//! `"mac": "hmac-sha256"` in the record. Without the key anyone who can
//! write the file can rewrite it and recompute every hash; with it a
//! rewrite is found by `audit verify --key`.

use hmac::{Hmac, Mac};
use serde::ser::{Serialize, SerializeMap, Serializer};
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
    /// Chain `record` to `prev`: the canonical line and its hash. The
    /// record is written as it is, its own `hash` and `mac` left out and
    /// the chain's fields (`instance`, `mac`, `prev_hash`, then `hash`)
    /// merged in key order: no copy of the record is made.
    pub fn seal(&self, record: &Value, prev: &str) -> (String, String) {
        let wrapped;
        let fields = match record {
            Value::Object(m) => m,
            other => {
                wrapped = Map::from_iter([("value".to_string(), other.clone())]);
                &wrapped
            }
        };
        // In key order: instance < mac < prev_hash.
        let mut chain: Vec<(&str, &str)> = Vec::with_capacity(4);
        if let Some(i) = &self.instance {
            chain.push(("instance", i));
        }
        if self.key.is_some() {
            chain.push(("mac", MAC));
        }
        chain.push(("prev_hash", prev));
        let hash = digest(self.key.as_ref(), prev, &sealed(fields, &chain));
        chain.push(("hash", &hash));
        chain.sort_unstable_by_key(|(k, _)| *k);
        let line = sealed(fields, &chain);
        (line, hash)
    }
}

/// A record's fields (but `hash` and `mac`) with the chain's fields
/// merged in, keys in order: canonical JSON without building a new map.
/// `fields` iterates in key order because `serde_json::Map` is a
/// `BTreeMap` (no `preserve_order`; `canonical_sorts_keys_at_every_level`
/// in `audit/mod.rs` holds the build to that).
struct Sealed<'a> {
    fields: &'a Map<String, Value>,
    /// Sorted by key.
    chain: &'a [(&'a str, &'a str)],
}

impl Serialize for Sealed<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        let mut chain = self.chain.iter().peekable();
        for (k, v) in self.fields {
            let k = k.as_str();
            if k == "hash" || k == "mac" || self.chain.iter().any(|(c, _)| *c == k) {
                continue;
            }
            while let Some((ck, cv)) = chain.next_if(|(ck, _)| *ck < k) {
                map.serialize_entry(ck, cv)?;
            }
            map.serialize_entry(k, v)?;
        }
        for (ck, cv) in chain {
            map.serialize_entry(ck, cv)?;
        }
        map.end()
    }
}

/// The canonical line of `fields` with `chain` merged in.
fn sealed(fields: &Map<String, Value>, chain: &[(&str, &str)]) -> String {
    serde_json::to_string(&Sealed { fields, chain })
        .expect("string keys and JSON values always serialize")
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

/// JSON with object keys sorted at every level and no whitespace: what
/// serde_json writes for a `Value`, whose maps keep their keys sorted.
pub fn canonical(value: &Value) -> String {
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Canonical JSON written the slow, obvious way: keys sorted by hand
    /// at every level, each piece serialized on its own.
    fn reference(value: &Value) -> String {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                let parts: Vec<String> = keys
                    .into_iter()
                    .map(|k| format!("{}:{}", Value::String(k.clone()), reference(&map[k])))
                    .collect();
                format!("{{{}}}", parts.join(","))
            }
            Value::Array(items) => {
                let parts: Vec<String> = items.iter().map(reference).collect();
                format!("[{}]", parts.join(","))
            }
            scalar => scalar.to_string(),
        }
    }

    /// The line `seal` writes is the canonical form of the record with
    /// the chain's fields set (the record's own `hash`, `mac` and, when
    /// the chain sets them, `prev_hash` and `instance` replaced), and it
    /// checks.
    #[test]
    fn a_sealed_line_is_the_canonical_record_with_the_chain_fields() {
        let record = json!({
            "zeta": 1, "hash": "forged", "mac": "x", "prev_hash": "forged", "instance_id": 7,
            "instance": "other", "a": {"y": [1, "é\n\u{1}"], "b": null}, "m": 2.5, "i": "",
        });
        let keyed = Sealer {
            key: Some(AuditKey::from_bytes(b"0123456789abcdef")),
            instance: Some("host-1".into()),
        };
        for sealer in [Sealer::default(), keyed] {
            let prev = "ab".repeat(32);
            let (line, hash) = sealer.seal(&record, &prev);
            let mut expected = record.as_object().cloned().unwrap_or_default();
            expected.remove("hash");
            expected.remove("mac");
            if let Some(i) = &sealer.instance {
                expected.insert("instance".into(), json!(i));
            }
            if sealer.key.is_some() {
                expected.insert("mac".into(), json!(MAC));
            }
            expected.insert("prev_hash".into(), json!(prev));
            let body = reference(&Value::Object(expected.clone()));
            assert_eq!(hash, digest(sealer.key.as_ref(), &prev, &body));
            expected.insert("hash".into(), json!(hash));
            assert_eq!(line, reference(&Value::Object(expected)));
            let checked = check_line(&line, sealer.key.as_ref()).map_err(|e| e.to_string());
            assert_eq!(checked.map(|c| c.hash), Ok(hash));
        }
    }

    /// A record that is not an object is sealed as `{"value": …}`.
    #[test]
    fn a_record_that_is_not_an_object_is_wrapped() {
        let (line, hash) = Sealer::default().seal(&json!([1, "two"]), GENESIS);
        let body = reference(&json!({"value": [1, "two"], "prev_hash": GENESIS}));
        assert_eq!(hash, digest(None, GENESIS, &body));
        let expected = json!({"value": [1, "two"], "prev_hash": GENESIS, "hash": hash});
        assert_eq!(line, reference(&expected));
    }
}
