//! Redaction as a response stage: whole JSON bodies, and streamed events
//! through one [`StreamRedactor`] per choice.
//!
//! JSON: `choices[].message.content`, `refusal`, completions' `text`, and
//! tool-call `arguments` (parsed, every string value redacted, serialized
//! again, so the result stays valid JSON). Streams: `delta.content` and
//! completions' `text` of every choice; held text is released with the
//! choice's `finish_reason` event, or before `[DONE]`. Streamed tool-call
//! argument fragments are not redacted here (tool-call gating holds them).

use super::stream::StreamRedactor;
use super::Redactor;
use crate::chain::{Annotation, Decision, FilterError, FilterKind};
use crate::response::{ResponseContext, ResponseStage, StreamStage};
use crate::shared::Shared;
use crate::sse::SseEvent;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct RedactStage {
    redactor: Arc<Shared<Redactor>>,
}

impl RedactStage {
    pub fn new(redactor: Arc<Shared<Redactor>>) -> Self {
        Self { redactor }
    }
}

fn report(counts: &BTreeMap<String, usize>) -> Vec<Annotation> {
    if counts.is_empty() {
        return Vec::new();
    }
    vec![Annotation {
        key: "redactions",
        value: json!(counts),
    }]
}

fn add(into: &mut BTreeMap<String, usize>, from: &BTreeMap<String, usize>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}

/// One body's redaction, with the policy snapshot it started with.
struct Pass(Arc<Redactor>);

impl Pass {
    fn redact_string(&self, s: &mut String, counts: &mut BTreeMap<String, usize>) {
        let (out, c) = self.0.redact(s);
        if !c.is_empty() {
            *s = out;
            add(counts, &c);
        }
    }

    /// Every string inside a JSON value.
    fn redact_value(&self, v: &mut Value, counts: &mut BTreeMap<String, usize>) {
        match v {
            Value::String(s) => self.redact_string(s, counts),
            Value::Array(items) => items.iter_mut().for_each(|i| self.redact_value(i, counts)),
            Value::Object(map) => map.values_mut().for_each(|i| self.redact_value(i, counts)),
            _ => {}
        }
    }
}

impl ResponseStage for RedactStage {
    fn kind(&self) -> FilterKind {
        FilterKind::Redact
    }

    fn on_json(&self, _: &ResponseContext<'_>, body: &mut Value) -> Result<Decision, FilterError> {
        let pass = Pass(self.redactor.get());
        let mut counts = BTreeMap::new();
        for choice in body["choices"].as_array_mut().into_iter().flatten() {
            for pointer in ["/message/content", "/message/refusal", "/text"] {
                if let Some(Value::String(s)) = choice.pointer_mut(pointer) {
                    pass.redact_string(s, &mut counts);
                }
            }
            for call in choice
                .pointer_mut("/message/tool_calls")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(Value::String(args)) = call.pointer_mut("/function/arguments") {
                    match serde_json::from_str::<Value>(args) {
                        Ok(mut parsed) => {
                            let before = counts.values().sum::<usize>();
                            pass.redact_value(&mut parsed, &mut counts);
                            if counts.values().sum::<usize>() != before {
                                *args = parsed.to_string();
                            }
                        }
                        Err(_) => pass.redact_string(args, &mut counts),
                    }
                }
            }
        }
        Ok(match report(&counts) {
            a if a.is_empty() => Decision::Allow,
            a => Decision::Annotate(a),
        })
    }

    fn stream(&self, _: &ResponseContext<'_>) -> Box<dyn StreamStage> {
        Box::new(RedactStream {
            redactor: self.redactor.get(),
            choices: BTreeMap::new(),
            counts: BTreeMap::new(),
        })
    }
}

struct RedactStream {
    redactor: Arc<Redactor>,
    /// Choice index → its redactor and which field carries its text.
    choices: BTreeMap<u64, (StreamRedactor, &'static str)>,
    counts: BTreeMap<String, usize>,
}

impl RedactStream {
    /// Release what every open choice still holds, as one event each.
    fn flush_all(&mut self, out: &mut Vec<SseEvent>) {
        for (index, (mut r, field)) in std::mem::take(&mut self.choices) {
            let rest = r.finish();
            add(&mut self.counts, r.counts());
            if !rest.is_empty() {
                let choice = if field == "text" {
                    json!({"index": index, "text": rest, "finish_reason": null})
                } else {
                    json!({"index": index, "delta": {"content": rest}, "finish_reason": null})
                };
                out.push(SseEvent::data(json!({"choices": [choice]}).to_string()));
            }
        }
    }
}

impl StreamStage for RedactStream {
    fn on_event(
        &mut self,
        mut event: SseEvent,
        out: &mut Vec<SseEvent>,
    ) -> Result<(), FilterError> {
        if event.is_done() {
            self.flush_all(out);
            out.push(event);
            return Ok(());
        }
        let Some(mut v) = event.json() else {
            out.push(event);
            return Ok(());
        };
        let mut changed = false;
        for choice in v["choices"].as_array_mut().into_iter().flatten() {
            let index = choice["index"].as_u64().unwrap_or(0);
            let field = if choice.get("text").is_some() {
                "text"
            } else {
                "content"
            };
            let piece = match field {
                "text" => choice.get("text").and_then(Value::as_str),
                _ => choice.pointer("/delta/content").and_then(Value::as_str),
            }
            .map(str::to_string);
            let finished = !choice["finish_reason"].is_null();
            if piece.is_none() && !finished {
                continue;
            }
            let redactor = &self.redactor;
            let (r, _) = self
                .choices
                .entry(index)
                .or_insert_with(|| (StreamRedactor::new(redactor.clone()), field));
            let mut text = piece.as_deref().map(|p| r.push(p)).unwrap_or_default();
            if finished {
                if let Some((mut r, _)) = self.choices.remove(&index) {
                    text.push_str(&r.finish());
                    add(&mut self.counts, r.counts());
                }
            }
            if piece.is_some() || !text.is_empty() {
                match field {
                    "text" => choice["text"] = Value::String(text),
                    _ => choice["delta"]["content"] = Value::String(text),
                }
                changed = true;
            }
        }
        if changed {
            event.data = Some(v.to_string());
        }
        out.push(event);
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<SseEvent>) -> Result<(), FilterError> {
        self.flush_all(out);
        Ok(())
    }

    fn report(&self) -> Vec<Annotation> {
        let mut counts = self.counts.clone();
        for (r, _) in self.choices.values() {
            add(&mut counts, r.counts());
        }
        report(&counts)
    }
}
