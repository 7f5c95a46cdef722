//! Redaction as a response stage: whole JSON bodies, and streamed events.
//!
//! Every string a reply carries under a choice is screened; nothing is
//! passed because its field was not foreseen. Per field:
//! - text that streams in pieces (`content`, content-part `text`,
//!   `refusal`, `reasoning_content`, `reasoning`, `audio.transcript`, and
//!   completions' `text`): one [`StreamRedactor`] per choice and field, so
//!   a secret split across events, or across content parts, is caught;
//! - tool-call `function.arguments`, `custom.input` and legacy
//!   `function_call.arguments`: held until the choice finishes, then
//!   redacted as JSON (every string value and key; the result stays valid
//!   JSON) or, when they are not JSON, as text, as the tool policy's
//!   `redact_arguments` says for that tool (see
//!   [`crate::tool_authz::RedactArguments`]): by default personal data in
//!   an argument a `regex`/`enum` constraint vets is kept, so a call the
//!   policy allows is not broken;
//! - `logprobs` (`content`, `refusal`, and the legacy completions form):
//!   the tokens are redacted as the text they spell (see [`super::tokens`]);
//! - audio: `data` cannot be screened, so it is held until the choice
//!   finishes and withheld (sent empty) when its transcript had a finding;
//! - every other string (annotations, fields a provider adds) is redacted
//!   whole, except structural keys (`role`, `type`, `id`, `name`, `index`,
//!   `finish_reason`, ...).
//!
//! In a stream, what a choice still holds is released with its
//! `finish_reason` event, or in an event of its own before `[DONE]`.

use super::stream::{StreamRedactor, MAX_HELD};
use super::tokens::{legacy_arrays, legacy_entries, TokenRedactor};
use super::{Kind, Redactor};
use crate::chain::{Annotation, Decision, FilterError, FilterKind};
use crate::error::ErrorCode;
use crate::request::{Principal, Route};
use crate::response::{ResponseContext, ResponseStage, StreamStage, MAX_STREAM_HOLD};
use crate::shared::Shared;
use crate::sse::SseEvent;
use crate::tool_authz::{Access, RedactArguments, ToolPolicy};
use base64::Engine;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct RedactStage {
    redactor: Arc<Shared<Redactor>>,
    tools: Option<Arc<Shared<ToolPolicy>>>,
}

impl RedactStage {
    pub fn new(redactor: Arc<Shared<Redactor>>) -> Self {
        Self {
            redactor,
            tools: None,
        }
    }

    /// Tool-call arguments redacted as this tool policy says.
    pub fn with_tools(mut self, tools: Arc<Shared<ToolPolicy>>) -> Self {
        self.tools = Some(tools);
        self
    }

    /// One snapshot of the policies, with the caller's tenant's profile.
    fn pass(&self, ctx: &ResponseContext<'_>) -> Pass {
        let tenant = ctx.principal.map(|p| p.tenant.as_str());
        Pass::new(
            self.redactor.get().for_tenant(tenant),
            self.tools.as_ref().map(|t| t.get()),
            ctx.principal.cloned(),
        )
    }
}

/// Keys whose string values are structure the gateway and the SDKs rely
/// on, never generated text.
const STRUCTURAL: &[&str] = &[
    "role",
    "type",
    "id",
    "name",
    "index",
    "finish_reason",
    "object",
    "format",
    "tool_call_id",
];

type Counts = BTreeMap<String, usize>;

fn add(into: &mut Counts, from: &Counts) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}

fn report(counts: &Counts, audio_withheld: usize) -> Vec<Annotation> {
    let mut a = Vec::new();
    if !counts.is_empty() {
        a.push(Annotation {
            key: "redactions",
            value: json!(counts),
        });
    }
    if audio_withheld > 0 {
        a.push(Annotation {
            key: "audio_withheld",
            value: json!(audio_withheld),
        });
    }
    a
}

/// Redaction of whole values with one policy snapshot.
struct Pass {
    redactor: Arc<Redactor>,
    tools: Option<Arc<ToolPolicy>>,
    /// The caller: a tool's argument exemptions hold only for a caller
    /// the policy lets use that tool.
    principal: Option<Principal>,
    counts: Counts,
}

impl Pass {
    fn new(
        redactor: Arc<Redactor>,
        tools: Option<Arc<ToolPolicy>>,
        principal: Option<Principal>,
    ) -> Self {
        Self {
            redactor,
            tools,
            principal,
            counts: Counts::new(),
        }
    }

    fn found(&self) -> usize {
        self.counts.values().sum()
    }

    fn string(&mut self, s: &mut String) {
        let (out, c) = self.redactor.redact(s);
        if !c.is_empty() {
            *s = out;
            add(&mut self.counts, &c);
        }
    }

    /// Every string inside a value, but structural keys' strings.
    fn generic(&mut self, v: &mut Value) {
        match v {
            Value::String(s) => self.string(s),
            Value::Array(items) => items.iter_mut().for_each(|i| self.generic(i)),
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if !(v.is_string() && STRUCTURAL.contains(&k.as_str())) {
                        self.generic(v);
                    }
                }
            }
            _ => {}
        }
    }

    /// Only the secrets in a string.
    fn secrets(&mut self, s: &mut String) {
        let (out, c) = self.redactor.redact_kinds(s, false);
        if !c.is_empty() {
            *s = out;
            add(&mut self.counts, &c);
        }
    }

    /// A value the tool policy vets: personal data is kept only when it is
    /// the whole value (`"to": "bob@example.com"`); secrets, and personal
    /// data beside other text, are redacted.
    fn vetted(&mut self, s: &mut String) {
        let mut findings = self.redactor.find(s);
        findings.retain(|f| f.kind == Kind::Secret || !(f.start == 0 && f.end == s.len()));
        let (out, c) = self.redactor.redact_findings(s, &findings);
        if !c.is_empty() {
            *s = out;
            add(&mut self.counts, &c);
        }
    }

    /// Tool-call arguments: redacted as JSON when they are JSON (and
    /// always sent re-serialised, so a duplicate key's first value, which
    /// parsing drops, never passes unscreened), else as text, as the tool
    /// policy says for `tool`. Everything is redacted when there is no
    /// policy or no name, or when the caller may not use the tool (its
    /// exemptions are for the calls the policy allows).
    fn arguments(&mut self, tool: Option<&str>, args: &mut String) {
        let tools = self.tools.clone();
        let principal = self.principal.clone();
        let (mode, vets) = match (&tools, tool) {
            (Some(t), Some(name)) if t.access(name, principal.as_ref()) == Access::Allow => (
                t.argument_redaction(name),
                Some(move |path: &str, v: &Value| t.vets(name, path, v)),
            ),
            _ => (RedactArguments::All, None),
        };
        let vetted = |path: &str, v: &Value| vets.as_ref().is_some_and(|f| f(path, v));
        let pii = mode == RedactArguments::All;
        match (mode, serde_json::from_str::<Value>(args)) {
            (RedactArguments::None, _) => {}
            (_, Ok(mut parsed)) => {
                self.argument_value(&mut parsed, &mut String::new(), pii, &vetted);
                *args = parsed.to_string();
            }
            (_, Err(_)) if pii => self.string(args),
            (_, Err(_)) => self.secrets(args),
        }
    }

    /// Every string value and key of parsed arguments; `path` is the JSON
    /// pointer of `v`. Personal data is redacted when `pii`, except at a
    /// vetted pointer.
    fn argument_value(
        &mut self,
        v: &mut Value,
        path: &mut String,
        pii: bool,
        vetted: &dyn Fn(&str, &Value) -> bool,
    ) {
        if pii && v.is_string() && vetted(path, v) {
            if let Value::String(s) = v {
                self.vetted(s);
            }
            return;
        }
        match v {
            Value::String(s) if pii => self.string(s),
            Value::String(s) => self.secrets(s),
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("/{i}"));
                    self.argument_value(item, path, pii, vetted);
                    path.truncate(len);
                }
            }
            Value::Object(map) => {
                let entries = std::mem::take(map);
                for (mut k, mut v) in entries {
                    let len = path.len();
                    path.push('/');
                    path.push_str(&k.replace('~', "~0").replace('/', "~1"));
                    self.argument_value(&mut v, path, pii, vetted);
                    path.truncate(len);
                    if pii {
                        self.string(&mut k);
                    } else {
                        self.secrets(&mut k);
                    }
                    map.insert(k, v);
                }
            }
            _ => {}
        }
    }

    /// A whole token list. One that overflows the hold (a run of text
    /// that may still become a secret, longer than the cap) is dropped
    /// whole rather than released unscreened: the tokens are a copy of
    /// the reply's text, which is redacted on its own.
    fn tokens(&mut self, entries: Vec<Value>) -> Vec<Value> {
        let mut t = TokenRedactor::new(self.redactor.clone());
        let mut out = t.push(entries);
        out.extend(t.finish());
        if t.held().1.is_some() {
            return Vec::new();
        }
        out
    }

    fn logprobs(&mut self, logprobs: &mut Value) {
        let Some(lp) = logprobs.as_object_mut() else {
            return self.generic(logprobs);
        };
        if lp.get("tokens").is_some_and(Value::is_array) {
            let entries = self.tokens(legacy_entries(&Value::Object(lp.clone())));
            if let Value::Object(arrays) = legacy_arrays(&entries) {
                lp.extend(arrays);
            }
            return;
        }
        for (key, v) in lp.iter_mut() {
            match v {
                Value::Array(list) if matches!(key.as_str(), "content" | "refusal") => {
                    *list = self.tokens(std::mem::take(list));
                }
                other => self.generic(other),
            }
        }
    }

    fn tool_calls(&mut self, calls: &mut Value) {
        let Some(calls) = calls.as_array_mut() else {
            return self.generic(calls);
        };
        for call in calls {
            let Some(call) = call.as_object_mut() else {
                continue;
            };
            for (key, v) in call.iter_mut() {
                match (key.as_str(), v) {
                    ("function" | "custom", Value::Object(f)) => {
                        let name = f.get("name").and_then(Value::as_str).map(String::from);
                        for (k, v) in f.iter_mut() {
                            match (k.as_str(), v) {
                                ("arguments" | "input", Value::String(a)) => {
                                    self.arguments(name.as_deref(), a)
                                }
                                ("name", Value::String(_)) => {}
                                (_, other) => self.generic(other),
                            }
                        }
                    }
                    (k, v) if v.is_string() && STRUCTURAL.contains(&k) => {}
                    (_, other) => self.generic(other),
                }
            }
        }
    }

    /// `message.content` as an array of parts: their texts are one text,
    /// redacted as such, so a secret split across parts is caught.
    fn parts(&mut self, parts: &mut [Value]) {
        let mut r = StreamRedactor::whole(self.redactor.clone());
        let mut last_text: Option<&mut String> = None;
        for part in parts.iter_mut() {
            let text = match part {
                Value::String(s) => Some(s),
                Value::Object(o) => {
                    for (k, v) in o.iter_mut() {
                        if k != "text" && !(v.is_string() && STRUCTURAL.contains(&k.as_str())) {
                            self.generic(v);
                        }
                    }
                    match o.get_mut("text") {
                        Some(Value::String(s)) => Some(s),
                        _ => None,
                    }
                }
                _ => None,
            };
            if let Some(s) = text {
                *s = r.push(s);
                last_text = Some(s);
            }
        }
        let rest = r.finish();
        if let Some(s) = last_text {
            s.push_str(&rest);
        }
        add(&mut self.counts, r.counts());
    }

    /// A chat `message`; returns how many audio clips were withheld.
    fn message(&mut self, m: &mut Map<String, Value>) -> usize {
        let mut withheld = 0;
        for (key, v) in m.iter_mut() {
            match (key.as_str(), v) {
                ("content", Value::Array(parts)) => self.parts(parts),
                ("tool_calls", calls) => self.tool_calls(calls),
                ("function_call", Value::Object(f)) => {
                    let name = f.get("name").and_then(Value::as_str).map(String::from);
                    for (k, v) in f.iter_mut() {
                        match (k.as_str(), v) {
                            ("arguments", Value::String(a)) => self.arguments(name.as_deref(), a),
                            ("name", Value::String(_)) => {}
                            (_, other) => self.generic(other),
                        }
                    }
                }
                ("audio", Value::Object(audio)) => {
                    let before = self.found();
                    if let Some(t) = audio.get_mut("transcript") {
                        self.generic(t);
                    }
                    if self.found() != before && audio.contains_key("data") {
                        audio.insert("data".into(), Value::String(String::new()));
                        withheld += 1;
                    }
                }
                (k, v) if v.is_string() && STRUCTURAL.contains(&k) => {}
                (_, other) => self.generic(other),
            }
        }
        withheld
    }
}

impl ResponseStage for RedactStage {
    fn kind(&self) -> FilterKind {
        FilterKind::Redact
    }

    fn on_json(
        &self,
        ctx: &ResponseContext<'_>,
        body: &mut Value,
    ) -> Result<Decision, FilterError> {
        let mut pass = self.pass(ctx);
        let mut withheld = 0;
        for choice in crate::json::array_mut(body, "choices")
            .into_iter()
            .flatten()
        {
            let Some(c) = choice.as_object_mut() else {
                pass.generic(choice);
                continue;
            };
            for (key, v) in c.iter_mut() {
                match (key.as_str(), v) {
                    ("message", Value::Object(m)) => withheld += pass.message(m),
                    ("logprobs", lp) => pass.logprobs(lp),
                    ("index" | "finish_reason", _) => {}
                    (_, other) => pass.generic(other),
                }
            }
        }
        Ok(match report(&pass.counts, withheld) {
            a if a.is_empty() => Decision::Allow,
            a => Decision::Annotate(a),
        })
    }

    fn stream(&self, ctx: &ResponseContext<'_>) -> Box<dyn StreamStage> {
        Box::new(RedactStream {
            pass: self.pass(ctx),
            completions: ctx.route == Route::Completions,
            choices: BTreeMap::new(),
            meta: Map::new(),
            audio_withheld: 0,
            overflowed: None,
        })
    }
}

/// What one choice of a stream holds.
#[derive(Default)]
struct ChoiceState {
    /// Text fields that stream in pieces → their redactor.
    texts: BTreeMap<Field, StreamRedactor>,
    /// `content` came as an array of parts.
    content_parts: bool,
    /// Tool call index → (`function` or `custom`, arguments so far, the
    /// tool's name).
    tool_args: BTreeMap<u64, (&'static str, String, String)>,
    /// Legacy `function_call.arguments` so far, and its name.
    function_args: Option<(String, String)>,
    /// `logprobs.content` / `logprobs.refusal` / legacy (`tokens`).
    tokens: BTreeMap<&'static str, TokenRedactor>,
    /// Decoded audio held until the choice ends.
    audio: Option<Vec<u8>>,
}

struct RedactStream {
    pass: Pass,
    completions: bool,
    choices: BTreeMap<u64, ChoiceState>,
    /// Top-level fields of the first event, for events made here.
    meta: Map<String, Value>,
    audio_withheld: usize,
    /// Bytes a released choice's text held when it went over the cap.
    overflowed: Option<usize>,
}

/// A text that streams in pieces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    /// Completions' `text`.
    Text,
    /// `delta.audio.transcript`.
    Transcript,
    /// A string directly under `delta` (`content`, its parts' `text`,
    /// `refusal`, `reasoning_content`, `reasoning`, or any field a
    /// provider streams that way).
    Delta(String),
}

/// Run `f` on the object at `key` of `map`, made when missing or not an
/// object.
fn with_object(map: &mut Map<String, Value>, key: &str, f: impl FnOnce(&mut Map<String, Value>)) {
    let slot = map
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    if let Value::Object(o) = slot {
        f(o);
    }
}

/// Run `f` on the array at `key` of `map`, made when missing or not an
/// array.
fn with_array(map: &mut Map<String, Value>, key: &str, f: impl FnOnce(&mut Vec<Value>)) {
    let slot = map
        .entry(key.to_string())
        .or_insert_with(|| Value::Array(Vec::new()));
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    if let Value::Array(a) = slot {
        f(a);
    }
}

fn push_text(state: &mut ChoiceState, redactor: &Arc<Redactor>, field: Field, s: &mut String) {
    let r = state
        .texts
        .entry(field)
        .or_insert_with(|| StreamRedactor::new(redactor.clone()));
    *s = r.push(s);
}

fn content() -> Field {
    Field::Delta("content".into())
}

impl RedactStream {
    /// What the stream holds stays under the caps: a text run that may be
    /// a secret under [`MAX_HELD`] per field, everything held (tool-call
    /// arguments, audio, token lists) under [`MAX_STREAM_HOLD`]. Over
    /// either, the stream is stopped, never released unscreened.
    fn check_holds(&self) -> Result<(), FilterError> {
        let over = |what: &str, n: usize, cap: usize| {
            Err(FilterError::limit(
                ErrorCode::UnscreenableOutput,
                format!("{what}: {n} bytes held for screening, over the cap of {cap}"),
            ))
        };
        if let Some(n) = self.overflowed {
            return over("a text run that may hold a secret", n, MAX_HELD);
        }
        let mut total = 0;
        for state in self.choices.values() {
            for r in state.texts.values() {
                if let Some(n) = r.overflow() {
                    return over("a text run that may hold a secret", n, MAX_HELD);
                }
                total += r.held();
            }
            for t in state.tokens.values() {
                let (held, overflow) = t.held();
                if let Some(n) = overflow {
                    return over("logprobs tokens that may spell a secret", n, MAX_HELD);
                }
                total += held;
            }
            total += state
                .tool_args
                .values()
                .map(|(_, args, name)| args.len() + name.len())
                .sum::<usize>();
            total += state
                .function_args
                .as_ref()
                .map_or(0, |(args, name)| args.len() + name.len());
            total += state.audio.as_ref().map_or(0, Vec::len);
        }
        if total > MAX_STREAM_HOLD {
            return over("tool-call arguments and audio", total, MAX_STREAM_HOLD);
        }
        Ok(())
    }

    /// One streamed chat `delta`.
    fn delta(&mut self, state: &mut ChoiceState, delta: &mut Map<String, Value>) {
        let redactor = self.pass.redactor.clone();
        for (key, v) in delta.iter_mut() {
            match (key.as_str(), v) {
                ("content", Value::Array(parts)) => {
                    state.content_parts = true;
                    for part in parts.iter_mut() {
                        match part {
                            Value::String(s) => push_text(state, &redactor, content(), s),
                            Value::Object(o) => {
                                for (k, v) in o.iter_mut() {
                                    match (k.as_str(), v) {
                                        ("text", Value::String(s)) => {
                                            push_text(state, &redactor, content(), s)
                                        }
                                        (k, v) if v.is_string() && STRUCTURAL.contains(&k) => {}
                                        (_, other) => self.pass.generic(other),
                                    }
                                }
                            }
                            other => self.pass.generic(other),
                        }
                    }
                }
                (k, Value::String(s)) if !STRUCTURAL.contains(&k) => {
                    push_text(state, &redactor, Field::Delta(k.to_string()), s)
                }
                ("tool_calls", Value::Array(calls)) => {
                    for (position, call) in calls.iter_mut().enumerate() {
                        let Some(call) = call.as_object_mut() else {
                            self.pass.generic(call);
                            continue;
                        };
                        let index = call
                            .get("index")
                            .and_then(Value::as_u64)
                            .unwrap_or(position as u64);
                        for (k, v) in call.iter_mut() {
                            match (k.as_str(), v) {
                                (kind @ ("function" | "custom"), Value::Object(f)) => {
                                    let kind = if kind == "function" {
                                        "function"
                                    } else {
                                        "custom"
                                    };
                                    let field = if kind == "function" {
                                        "arguments"
                                    } else {
                                        "input"
                                    };
                                    for (fk, fv) in f.iter_mut() {
                                        match (fk.as_str(), fv) {
                                            (name, Value::String(piece)) if name == field => {
                                                let held = state.tool_args.entry(index).or_insert(
                                                    (kind, String::new(), String::new()),
                                                );
                                                held.1.push_str(piece);
                                                piece.clear();
                                            }
                                            ("name", Value::String(name)) => {
                                                state
                                                    .tool_args
                                                    .entry(index)
                                                    .or_insert((kind, String::new(), String::new()))
                                                    .2
                                                    .push_str(name);
                                            }
                                            (_, other) => self.pass.generic(other),
                                        }
                                    }
                                }
                                (k, v) if v.is_string() && STRUCTURAL.contains(&k) => {}
                                (_, other) => self.pass.generic(other),
                            }
                        }
                    }
                }
                ("function_call", Value::Object(f)) => {
                    for (k, v) in f.iter_mut() {
                        match (k.as_str(), v) {
                            ("arguments", Value::String(piece)) => {
                                state
                                    .function_args
                                    .get_or_insert_with(Default::default)
                                    .0
                                    .push_str(piece);
                                piece.clear();
                            }
                            ("name", Value::String(name)) => {
                                state
                                    .function_args
                                    .get_or_insert_with(Default::default)
                                    .1
                                    .push_str(name);
                            }
                            (_, other) => self.pass.generic(other),
                        }
                    }
                }
                ("audio", Value::Object(audio)) => {
                    for (k, v) in audio.iter_mut() {
                        match (k.as_str(), v) {
                            ("transcript", Value::String(s)) => {
                                push_text(state, &redactor, Field::Transcript, s)
                            }
                            ("data", Value::String(data)) => {
                                let held = state.audio.get_or_insert_with(Vec::new);
                                // Undecodable audio is never released.
                                if let Ok(bytes) =
                                    base64::engine::general_purpose::STANDARD.decode(&*data)
                                {
                                    held.extend(bytes);
                                }
                                data.clear();
                            }
                            (k, v) if v.is_string() && STRUCTURAL.contains(&k) => {}
                            ("expires_at", _) => {}
                            (_, other) => self.pass.generic(other),
                        }
                    }
                }
                (k, v) if v.is_string() && STRUCTURAL.contains(&k) => {}
                (_, other) => self.pass.generic(other),
            }
        }
    }

    fn logprobs(&mut self, state: &mut ChoiceState, logprobs: &mut Value) {
        let redactor = self.pass.redactor.clone();
        let Some(lp) = logprobs.as_object_mut() else {
            return self.pass.generic(logprobs);
        };
        if lp.get("tokens").is_some_and(Value::is_array) {
            let t = state
                .tokens
                .entry("legacy")
                .or_insert_with(|| TokenRedactor::new(redactor.clone()));
            let released = t.push(legacy_entries(&Value::Object(lp.clone())));
            if let Value::Object(arrays) = legacy_arrays(&released) {
                lp.extend(arrays);
            }
            return;
        }
        for (key, v) in lp.iter_mut() {
            match (key.as_str(), v) {
                (k @ ("content" | "refusal"), Value::Array(list)) => {
                    let field = if k == "content" { "content" } else { "refusal" };
                    let t = state
                        .tokens
                        .entry(field)
                        .or_insert_with(|| TokenRedactor::new(redactor.clone()));
                    *list = t.push(std::mem::take(list));
                }
                (_, other) => self.pass.generic(other),
            }
        }
    }

    /// Release everything `state` holds into `choice` (its finish event,
    /// or one made for it).
    fn release(&mut self, mut state: ChoiceState, choice: &mut Map<String, Value>) {
        let mut transcript_found = false;
        for (field, mut r) in std::mem::take(&mut state.texts) {
            if let Some(n) = r.overflow() {
                self.overflowed.get_or_insert(n);
            }
            let rest = r.finish();
            add(&mut self.pass.counts, r.counts());
            transcript_found |= field == Field::Transcript && !r.counts().is_empty();
            if rest.is_empty() {
                continue;
            }
            if field == Field::Text {
                match choice.get_mut("text") {
                    Some(Value::String(s)) => s.push_str(&rest),
                    _ => {
                        choice.insert("text".into(), Value::String(rest));
                    }
                }
                continue;
            }
            let parts = state.content_parts;
            with_object(choice, "delta", |delta| match field {
                Field::Transcript => with_object(delta, "audio", |a| {
                    a.insert("transcript".into(), Value::String(rest));
                }),
                Field::Delta(name) if name == "content" && parts => {
                    with_array(delta, "content", |a| {
                        a.push(json!({"type": "text", "text": rest}));
                    })
                }
                Field::Delta(name) => match delta.get_mut(&name) {
                    Some(Value::String(s)) => s.push_str(&rest),
                    _ => {
                        delta.insert(name, Value::String(rest));
                    }
                },
                Field::Text => {}
            });
        }
        for (index, (kind, mut args, name)) in std::mem::take(&mut state.tool_args) {
            self.pass.arguments(Some(&name), &mut args);
            let field = if kind == "function" {
                "arguments"
            } else {
                "input"
            };
            with_object(choice, "delta", |delta| {
                with_array(delta, "tool_calls", |calls| {
                    calls.push(json!({"index": index, kind: {field: args}}));
                })
            });
        }
        if let Some((mut args, name)) = state.function_args.take() {
            self.pass.arguments(Some(&name), &mut args);
            with_object(choice, "delta", |delta| {
                with_object(delta, "function_call", |f| {
                    f.insert("arguments".into(), Value::String(args));
                })
            });
        }
        for (field, mut t) in std::mem::take(&mut state.tokens) {
            let rest = t.finish();
            if rest.is_empty() {
                continue;
            }
            with_object(choice, "logprobs", |lp| {
                if field == "legacy" {
                    if let Value::Object(arrays) = legacy_arrays(&rest) {
                        lp.extend(arrays);
                    }
                } else {
                    with_array(lp, field, |list| list.extend(rest));
                }
            });
        }
        if let Some(audio) = state.audio.take() {
            if transcript_found {
                self.audio_withheld += 1;
            } else if !audio.is_empty() {
                let data = base64::engine::general_purpose::STANDARD.encode(audio);
                with_object(choice, "delta", |delta| {
                    with_object(delta, "audio", |a| {
                        a.insert("data".into(), Value::String(data));
                    })
                });
            }
        }
    }

    /// Release what every open choice holds, as one event each.
    fn flush_all(&mut self, out: &mut Vec<SseEvent>) {
        for (index, state) in std::mem::take(&mut self.choices) {
            let mut choice = Map::new();
            choice.insert("index".into(), json!(index));
            choice.insert("finish_reason".into(), Value::Null);
            let empty = choice.len();
            self.release(state, &mut choice);
            if choice.len() == empty {
                continue;
            }
            let mut event = self.meta.clone();
            event.insert("choices".into(), json!([choice]));
            out.push(SseEvent::from_json(Value::Object(event)));
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
            self.check_holds()?;
            out.push(event);
            return Ok(());
        }
        let Some(v) = event.json_mut() else {
            // The gateway refuses a stream whose data is not JSON before
            // any stage sees it; an event without data carries no text.
            out.push(event);
            return Ok(());
        };
        let Some(obj) = v.as_object_mut() else {
            self.pass.generic(v);
            out.push(event);
            return Ok(());
        };
        if self.meta.is_empty() {
            // `id`, `object`, `model` are the same in every event.
            self.meta = obj
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "choices" | "usage"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        for (key, v) in obj.iter_mut() {
            if key != "choices" {
                if !matches!(
                    key.as_str(),
                    "usage" | "created" | "object" | "model" | "id"
                ) {
                    self.pass.generic(v);
                }
                continue;
            }
            for (position, choice) in v.as_array_mut().into_iter().flatten().enumerate() {
                let Some(c) = choice.as_object_mut() else {
                    self.pass.generic(choice);
                    continue;
                };
                let index = c
                    .get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(position as u64);
                let mut state = self.choices.remove(&index).unwrap_or_default();
                let redactor = self.pass.redactor.clone();
                for (k, v) in c.iter_mut() {
                    match (k.as_str(), v) {
                        ("delta", Value::Object(d)) => self.delta(&mut state, d),
                        ("text", Value::String(s)) if self.completions => {
                            push_text(&mut state, &redactor, Field::Text, s)
                        }
                        ("logprobs", lp) => self.logprobs(&mut state, lp),
                        ("index" | "finish_reason", _) => {}
                        (_, other) => self.pass.generic(other),
                    }
                }
                if c.get("finish_reason").is_some_and(|f| !f.is_null()) {
                    self.release(state, c);
                } else {
                    self.choices.insert(index, state);
                }
            }
        }
        self.check_holds()?;
        out.push(event);
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<SseEvent>) -> Result<(), FilterError> {
        self.flush_all(out);
        self.check_holds()
    }

    fn report(&self) -> Vec<Annotation> {
        let mut counts = self.pass.counts.clone();
        for state in self.choices.values() {
            for r in state.texts.values() {
                add(&mut counts, r.counts());
            }
        }
        report(&counts, self.audio_withheld)
    }
}
