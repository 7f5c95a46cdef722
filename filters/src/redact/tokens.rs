//! Redaction of `logprobs` token lists, so that joining the tokens never
//! gives back what was redacted from the text.
//!
//! A secret spans many tokens (`gh`, `p_`, `Zq8`, ...): no token on its own
//! matches a rule. The tokens are therefore redacted as the text they spell:
//! their bytes are fed, in order, to a [`StreamRedactor`] of their own (so
//! the result does not depend on the tokens agreeing with the content
//! field), and each token is released once the text it covers is. A token
//! that overlaps a finding is rewritten: the part of it inside the finding
//! is dropped, the first token of the finding carries the replacement, and
//! its `bytes` follow; its `top_logprobs` alternatives are emptied. Tokens
//! that touch no finding go out as they came.
//!
//! Entries are chat-style objects (`token`, `bytes`, `logprob`,
//! `top_logprobs`); the legacy completions form (parallel arrays) is turned
//! into such objects and back by [`legacy_entries`] and [`legacy_arrays`].

use super::stream::{Released, StreamRedactor};
use super::Redactor;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::Arc;

pub struct TokenRedactor {
    text: StreamRedactor,
    /// Token bytes not yet fed (an incomplete UTF-8 character).
    pending: Vec<u8>,
    /// Bytes of all tokens queued so far.
    fed: usize,
    /// Queued tokens with their byte range in the token text.
    queue: VecDeque<(usize, usize, Value)>,
    /// Serialized size of each queued entry (`top_logprobs` included), in
    /// queue order, and their sum: what the queue holds.
    sizes: VecDeque<usize>,
    queued: usize,
    /// Released findings that queued tokens may still overlap.
    findings: Vec<Released>,
}

impl TokenRedactor {
    pub fn new(redactor: Arc<Redactor>) -> Self {
        Self {
            text: StreamRedactor::tracking(redactor),
            pending: Vec::new(),
            fed: 0,
            queue: VecDeque::new(),
            sizes: VecDeque::new(),
            queued: 0,
            findings: Vec::new(),
        }
    }

    /// Bytes held (the token text and the queued entries with their
    /// alternatives), and whether the text hold went over the cap.
    pub fn held(&self) -> (usize, Option<usize>) {
        (self.text.held() + self.queued, self.text.overflow())
    }

    /// Queue token entries; returns those that can be released now.
    pub fn push(&mut self, entries: impl IntoIterator<Item = Value>) -> Vec<Value> {
        for entry in entries {
            let bytes = entry_bytes(&entry);
            let start = self.fed;
            self.fed += bytes.len();
            let size = entry.to_string().len();
            self.sizes.push_back(size);
            self.queued += size;
            self.queue.push_back((start, self.fed, entry));
            self.pending.extend_from_slice(&bytes);
        }
        let text = take_text(&mut self.pending, false);
        self.text.push(&text);
        self.release(false)
    }

    /// The token list is complete: release every queued token.
    pub fn finish(&mut self) -> Vec<Value> {
        let text = take_text(&mut self.pending, true);
        self.text.push(&text);
        self.text.finish();
        self.release(true)
    }

    fn release(&mut self, all: bool) -> Vec<Value> {
        self.findings.extend(self.text.take_released());
        let cut = self.text.released_to();
        let mut out = Vec::new();
        while let Some((start, end, _)) = self.queue.front() {
            if !all && *end > cut {
                break;
            }
            let (start, end) = (*start, *end);
            if let Some((_, _, entry)) = self.queue.pop_front() {
                self.queued -= self.sizes.pop_front().unwrap_or(0);
                out.push(rewrite(entry, start, end, &self.findings));
            }
        }
        let next = self.queue.front().map_or(usize::MAX, |(s, _, _)| *s);
        self.findings.retain(|f| f.end > next);
        out
    }
}

/// The bytes a token stands for: its `bytes` when given (they are exact
/// even for a token that is half a UTF-8 character), else its text.
fn entry_bytes(entry: &Value) -> Vec<u8> {
    if let Some(list) = entry.get("bytes").and_then(Value::as_array) {
        let bytes: Option<Vec<u8>> = list
            .iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect();
        if let Some(bytes) = bytes {
            return bytes;
        }
    }
    entry
        .get("token")
        .and_then(Value::as_str)
        .unwrap_or("")
        .as_bytes()
        .to_vec()
}

/// Take the longest prefix of `pending` that is whole UTF-8 text. An
/// invalid byte becomes `?`, so byte offsets stay those of the tokens; with
/// `all`, an incomplete character at the end is taken the same way.
fn take_text(pending: &mut Vec<u8>, all: bool) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = pending;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push_str(&"?".repeat(n));
                        rest = &bad[n..];
                    }
                    None if all => {
                        out.push_str(&"?".repeat(bad.len()));
                        rest = &[];
                        break;
                    }
                    None => {
                        rest = bad;
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.to_vec();
    *pending = keep;
    out
}

/// A token with whatever part of it lies inside a finding replaced.
fn rewrite(mut entry: Value, start: usize, end: usize, findings: &[Released]) -> Value {
    let mut hits: Vec<&Released> = findings
        .iter()
        .filter(|f| f.start < end && f.end > start)
        .collect();
    if hits.is_empty() {
        return entry;
    }
    hits.sort_by_key(|f| f.start);
    let original = entry_bytes(&entry);
    let mut out = Vec::with_capacity(original.len());
    let mut pos = start;
    for f in hits {
        if f.start > pos {
            out.extend_from_slice(&original[pos - start..f.start - start]);
        }
        if f.start >= start {
            out.extend_from_slice(f.replacement.as_bytes());
        }
        pos = pos.max(f.end.min(end));
    }
    if pos < end {
        out.extend_from_slice(&original[pos - start..]);
    }
    if let Some(obj) = entry.as_object_mut() {
        obj.insert(
            "token".into(),
            Value::String(String::from_utf8_lossy(&out).into_owned()),
        );
        if obj.contains_key("bytes") {
            obj.insert("bytes".into(), json!(out));
        }
        if let Some(top) = obj.get_mut("top_logprobs") {
            *top = match top {
                Value::Array(_) => Value::Array(Vec::new()),
                _ => Value::Null,
            };
        }
    }
    entry
}

/// The legacy completions form, `{tokens, token_logprobs, top_logprobs,
/// text_offset}`, as one object per token.
pub fn legacy_entries(logprobs: &Value) -> Vec<Value> {
    let column = |name: &str| logprobs.get(name).and_then(Value::as_array);
    let Some(tokens) = column("tokens") else {
        return Vec::new();
    };
    tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let mut e = Map::new();
            e.insert("token".into(), token.clone());
            for (name, key) in [
                ("token_logprobs", "logprob"),
                ("top_logprobs", "top_logprobs"),
                ("text_offset", "text_offset"),
            ] {
                if let Some(v) = column(name).and_then(|c| c.get(i)) {
                    e.insert(key.into(), v.clone());
                }
            }
            Value::Object(e)
        })
        .collect()
}

/// Objects from [`legacy_entries`] back into the parallel arrays.
pub fn legacy_arrays(entries: &[Value]) -> Value {
    let column = |key: &str| -> Value {
        Value::Array(
            entries
                .iter()
                .map(|e| e.get(key).cloned().unwrap_or(Value::Null))
                .collect(),
        )
    };
    json!({
        "tokens": column("token"),
        "token_logprobs": column("logprob"),
        "top_logprobs": column("top_logprobs"),
        "text_offset": column("text_offset"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::{RedactionPolicy, Redactor};

    fn redactor() -> Arc<Redactor> {
        let policy: RedactionPolicy =
            serde_json::from_value(json!({"rules": [{"id": "github-token", "kind": "secret",
                "keywords": ["ghp_"], "pattern": "\\bghp_[A-Za-z0-9]{36}\\b"}]}))
            .unwrap();
        Arc::new(Redactor::build(&policy).unwrap())
    }

    fn entry(token: &str) -> Value {
        json!({"token": token, "logprob": -0.1, "bytes": token.as_bytes(),
            "top_logprobs": [{"token": token, "logprob": -0.1, "bytes": token.as_bytes()}]})
    }

    fn tokens(text: &str, n: usize) -> Vec<Value> {
        let chars: Vec<char> = text.chars().collect();
        chars
            .chunks(n)
            .map(|c| entry(&c.iter().collect::<String>()))
            .collect()
    }

    fn joined(entries: &[Value]) -> String {
        entries
            .iter()
            .map(|e| e["token"].as_str().unwrap())
            .collect()
    }

    const SECRET: &str = "ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i";

    #[test]
    fn joined_tokens_never_spell_the_secret() {
        let text = format!("my token is {SECRET}, keep it é safe");
        for n in 1..=8 {
            let mut t = TokenRedactor::new(redactor());
            let mut out = Vec::new();
            for e in tokens(&text, n) {
                out.extend(t.push([e]));
            }
            out.extend(t.finish());
            let j = joined(&out);
            assert_eq!(
                j, "my token is [REDACTED:github-token], keep it é safe",
                "n={n}"
            );
            assert!(!serde_json::to_string(&out).unwrap().contains("Zq8X"));
            for e in &out {
                let bytes: Vec<u8> = serde_json::from_value(e["bytes"].clone()).unwrap();
                assert_eq!(bytes, e["token"].as_str().unwrap().as_bytes());
            }
            let touched = out
                .iter()
                .filter(|e| e["top_logprobs"].as_array().unwrap().is_empty())
                .count();
            assert!(touched >= 1 && touched <= SECRET.len().div_ceil(n) + 1);
        }
    }

    #[test]
    fn a_character_split_across_tokens_keeps_its_bytes() {
        let mut t = TokenRedactor::new(redactor());
        let e = "é".as_bytes();
        let mut out = t.push([
            json!({"token": "\\xc3", "bytes": [e[0]]}),
            json!({"token": "\\xa9", "bytes": [e[1]]}),
        ]);
        out.extend(t.finish());
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["token"], "\\xc3", "untouched tokens go as they came");
    }

    #[test]
    fn legacy_round_trip() {
        let lp = json!({"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0],
            "top_logprobs": [{"a": -1.0}, {"b": -2.0}], "text_offset": [0, 1]});
        assert_eq!(legacy_arrays(&legacy_entries(&lp)), lp);
    }
}
