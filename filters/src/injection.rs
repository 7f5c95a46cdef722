//! The prompt-injection screen: in the request path, on the gateway's own
//! CPU, in microseconds.
//!
//! Each scanned message (user and tool messages by default; system
//! messages on request; assistant messages never) is normalised
//! ([`normalise`]), matched against the rules of `policies/injection.yaml`
//! ([`rules`]: phrases and the regexes' keywords through one Aho-Corasick
//! automaton, and only the regexes whose keywords occur), checked for built-in signals (tag characters,
//! invisible characters, an adversarial-suffix run: [`suffix`]), and its
//! encoded segments are decoded and scanned again ([`decode`]). Findings
//! become a score ([`score`]) that is compared with the `flag` and `block`
//! thresholds: the direct ones for what the caller wrote, stricter ones
//! for tool results, which carry text from elsewhere (indirect
//! injection).
//!
//! It is a screen, not a proof: it finds the techniques attacks are built
//! from (overriding instructions, jailbreak personas, extracting the
//! system prompt, fake chat-template turns, smuggling, exfiltration, tool
//! hijacking), in the languages its rules are written in. A paraphrase it
//! has no rule for passes.

pub mod decode;
pub mod normalise;
pub mod rules;
pub mod score;
pub mod suffix;

use crate::chain::{
    Annotation, Decision, Fact, FilterError, FilterKind, Mode, RequestFilter, Verdict,
};
use crate::error::{ErrorCode, Rejection};
use crate::prompt::{Message, Role};
use crate::request::{Principal, RequestView};
use crate::shared::Shared;
use async_trait::async_trait;
use rules::{RuleSpec, Rules, Scope, Target};
use score::{Finding, Findings, Thresholds};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::sync::Arc;
use suffix::SuffixSettings;

/// What a rule is about. The client is told the category of a refusal,
/// never what matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// "Ignore all previous instructions", "new instructions:".
    InstructionOverride,
    /// DAN, developer mode, "you are no longer bound", unrestricted role play.
    Jailbreak,
    /// "Repeat the words above", "print your initial instructions".
    PromptExtraction,
    /// `<|im_start|>system`, `[INST]`, `Human:` turns inside a message.
    RoleDelimiter,
    /// Encoded or hidden instructions: base64, hex, rot13, tag characters.
    Smuggling,
    /// Data sent out through links and images, "send the conversation to".
    Exfiltration,
    /// Text in a tool result that addresses the agent reading it.
    ToolHijack,
    /// An optimised token-soup suffix.
    AdversarialSuffix,
}

impl Category {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InstructionOverride => "instruction_override",
            Self::Jailbreak => "jailbreak",
            Self::PromptExtraction => "prompt_extraction",
            Self::RoleDelimiter => "role_delimiter",
            Self::Smuggling => "smuggling",
            Self::Exfiltration => "exfiltration",
            Self::ToolHijack => "tool_hijack",
            Self::AdversarialSuffix => "adversarial_suffix",
        }
    }

    /// For the client's error message.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::InstructionOverride => "an attempt to override instructions",
            Self::Jailbreak => "a jailbreak framing",
            Self::PromptExtraction => "an attempt to extract hidden instructions",
            Self::RoleDelimiter => "forged chat-role markers",
            Self::Smuggling => "hidden or encoded instructions",
            Self::Exfiltration => "an attempt to send data elsewhere",
            Self::ToolHijack => "instructions aimed at the agent inside a tool result",
            Self::AdversarialSuffix => "an adversarial suffix",
        }
    }
}

/// The roles whose messages can be scanned (assistant: never).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanRole {
    User,
    Tool,
    System,
}

/// A built-in signal's weight.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signal {
    pub weight: f32,
}

/// Built-in signals.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signals {
    /// Unicode tag characters outside emoji flags ("ASCII smuggling").
    pub tag_characters: Signal,
    /// Zero-width spaces or bidirectional overrides, at least `min` of them.
    pub invisible_characters: InvisibleSignal,
    /// Added when a rule matched inside decoded or hidden text.
    pub encoded_payload: Signal,
    /// Encoded text left when the decoding depth or budget ran out.
    #[serde(default = "decode_limit")]
    pub decode_limit: Signal,
    pub adversarial_suffix: SuffixSettings,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvisibleSignal {
    pub weight: f32,
    pub min: usize,
}

/// Work limits for one message.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Decoded bytes scanned again, in all.
    pub decode_bytes: usize,
    /// How deep encodings are unwrapped (base64 inside base64: 2).
    pub decode_depth: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            decode_bytes: 64 * 1024,
            decode_depth: 4,
        }
    }
}

/// Different thresholds or mode for some callers: a red-team tenant in
/// monitor mode, stricter thresholds for a role. The first entry whose
/// `tenant` and `role` (each optional) match the caller applies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    /// `monitor`: record, never refuse.
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub thresholds: Option<Thresholds>,
    #[serde(default)]
    pub tool_thresholds: Option<Thresholds>,
}

impl Override {
    fn matches(&self, p: Option<&Principal>) -> bool {
        Principal::fits(p, self.tenant.as_deref(), self.role.as_deref())
    }
}

/// `policies/injection.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectionPolicy {
    /// Roles whose messages are scanned; default user and tool.
    #[serde(default = "default_roles")]
    pub roles: Vec<ScanRole>,
    /// For what the caller wrote (user and system messages, prompts).
    pub thresholds: Thresholds,
    /// For tool results.
    pub tool_thresholds: Thresholds,
    #[serde(default)]
    pub limits: Limits,
    pub signals: Signals,
    #[serde(default)]
    pub overrides: Vec<Override>,
    pub rules: Vec<RuleSpec>,
}

fn decode_limit() -> Signal {
    Signal { weight: 0.5 }
}

fn default_roles() -> Vec<ScanRole> {
    vec![ScanRole::User, ScanRole::Tool]
}

/// Where a text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Written by the caller: user or system messages, prompts.
    Direct,
    /// A tool result: text from elsewhere.
    Tool,
}

/// One text's result.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub score: f32,
    /// Category and its combined weight, highest first.
    pub categories: Vec<(Category, f32)>,
    /// Rule ids and signal names.
    pub findings: Vec<String>,
    /// Bytes read, the text's and every text derived from it.
    pub scanned: usize,
}

/// What a request may cost the screen: a budget for derived texts, and
/// what was read.
#[derive(Debug, Clone)]
pub struct Work {
    pub budget: usize,
    pub scanned: usize,
    /// Something was left unread for want of budget.
    pub exhausted: bool,
}

impl Work {
    /// Take a derived text if the budget allows; a longer one is cut to
    /// what is left (and the shortfall noted).
    fn charge(&mut self, mut text: String) -> Option<String> {
        if text.len() > self.budget {
            self.exhausted = true;
            let mut end = self.budget;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        self.budget -= text.len();
        (!text.is_empty()).then_some(text)
    }
}

/// The compiled screen.
pub struct Detector {
    policy: InjectionPolicy,
    rules: Rules,
}

impl Detector {
    /// Compiles a policy; every problem is reported.
    pub fn build(mut policy: InjectionPolicy) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        policy.thresholds.check("thresholds", &mut errors);
        policy.tool_thresholds.check("tool_thresholds", &mut errors);
        for (i, o) in policy.overrides.iter().enumerate() {
            if let Some(t) = o.thresholds {
                t.check(&format!("overrides[{i}].thresholds"), &mut errors);
            }
            if let Some(t) = o.tool_thresholds {
                t.check(&format!("overrides[{i}].tool_thresholds"), &mut errors);
            }
        }
        let s = &policy.signals;
        for (name, w) in [
            ("tag_characters", s.tag_characters.weight),
            ("invisible_characters", s.invisible_characters.weight),
            ("encoded_payload", s.encoded_payload.weight),
            ("decode_limit", s.decode_limit.weight),
            ("adversarial_suffix", s.adversarial_suffix.weight),
        ] {
            if !(0.0..=1.0).contains(&w) {
                errors.push(format!("signals.{name}: weight {w} is not in [0, 1]"));
            }
        }
        let specs = std::mem::take(&mut policy.rules);
        let rules = Rules::build(specs, &mut errors);
        match rules {
            Some(rules) if errors.is_empty() => Ok(Self { policy, rules }),
            _ => Err(errors),
        }
    }

    pub fn policy(&self) -> &InjectionPolicy {
        &self.policy
    }

    pub fn rules(&self) -> &[RuleSpec] {
        &self.rules.specs
    }

    /// Scan one text.
    pub fn scan(&self, text: &str, source: Source) -> Scan {
        let mut work = self.work_for(text.len());
        self.scan_with(text, source, &mut work)
    }

    /// The work allowance for texts of `bytes` in all: every text derived
    /// from them (decoded, unescaped, read backwards or in rot13) is
    /// charged to one budget of four times their size (at least
    /// `limits.decode_bytes`), so the work per request stays linear in
    /// its size whatever it holds.
    pub fn work_for(&self, bytes: usize) -> Work {
        Work {
            budget: self.policy.limits.decode_bytes.max(bytes.saturating_mul(4)),
            scanned: 0,
            exhausted: false,
        }
    }

    /// Scan one text, charging derived texts to `work`.
    pub fn scan_with(&self, text: &str, source: Source, work: &mut Work) -> Scan {
        let mut findings = Findings::default();
        let scanned_before = work.scanned;
        self.scan_into(text, source, 0, work, &mut findings);
        if work.exhausted {
            findings.add(
                Finding::DecodeLimit,
                Category::Smuggling,
                self.policy.signals.decode_limit.weight,
            );
        }
        let mut names: Vec<String> = findings
            .iter()
            .map(|(f, _, _)| match f {
                Finding::Rule(i) => self.rules.specs[*i].id.clone(),
                Finding::TagCharacters => "signal.tag_characters".into(),
                Finding::InvisibleCharacters => "signal.invisible_characters".into(),
                Finding::EncodedPayload => "signal.encoded_payload".into(),
                Finding::DecodeLimit => "signal.decode_limit".into(),
                Finding::AdversarialSuffix => "signal.adversarial_suffix".into(),
            })
            .collect();
        names.sort();
        Scan {
            score: findings.score(),
            categories: findings.categories(),
            findings: names,
            scanned: work.scanned - scanned_before,
        }
    }

    fn scan_into(
        &self,
        text: &str,
        source: Source,
        depth: u8,
        work: &mut Work,
        found: &mut Findings,
    ) {
        work.scanned += text.len();
        let folded = normalise::fold(text);
        let rules = &self.rules;
        let rule = |i: usize, found: &mut Findings| {
            let spec = &rules.specs[i];
            if spec.scope == Scope::Any || source == Source::Tool {
                found.add(Finding::Rule(i), spec.category, spec.weight);
            }
        };
        // One automaton pass finds the phrases and where words-view regexes
        // can match; each is tried there.
        let mut at: Vec<(usize, usize)> = Vec::new();
        let mut raw_at: Vec<(usize, usize)> = Vec::new();
        let (mut reversed, mut rot13) = (0, false);
        for m in rules.words_automaton.find_overlapping_iter(&folded.words) {
            match rules.targets[m.pattern().as_usize()] {
                Target::Phrase(i) => rule(i, found),
                Target::Words(r) => at.push((r, m.start())),
                Target::Raw(r) => raw_at.push((r, 0)),
                Target::Reversed => reversed += 1,
                Target::Rot13 => rot13 = true,
            }
        }
        let applies = |i: usize| rules.specs[i].scope == Scope::Any || source == Source::Tool;
        for r in matching(&rules.words, &folded.words, &mut at, applies) {
            rule(r, found);
        }
        let clean = folded.clean.as_deref().unwrap_or(text);
        let mut at = raw_at;
        for m in rules.raw_automaton.find_overlapping_iter(clean) {
            at.push((rules.raw_targets[m.pattern().as_usize()], m.start()));
        }
        for r in matching(&rules.raw, clean, &mut at, applies) {
            rule(r, found);
        }
        let s = &self.policy.signals;
        if folded.tags > 0 {
            found.add(
                Finding::TagCharacters,
                Category::Smuggling,
                s.tag_characters.weight,
            );
        }
        if folded.invisible >= s.invisible_characters.min.max(1) {
            found.add(
                Finding::InvisibleCharacters,
                Category::Smuggling,
                s.invisible_characters.weight,
            );
        }
        // The suffix statistic is computed only where it can change the
        // verdict: when, with what is found so far, its weight can reach
        // the flag threshold.
        let flag = if source == Source::Tool {
            self.policy.tool_thresholds.flag
        } else {
            self.policy.thresholds.flag
        };
        let could_matter =
            1.0 - (1.0 - found.score()) * (1.0 - s.adversarial_suffix.weight) >= flag;
        if s.adversarial_suffix.weight > 0.0
            && could_matter
            && suffix::found(clean, &s.adversarial_suffix)
        {
            found.add(
                Finding::AdversarialSuffix,
                Category::AdversarialSuffix,
                s.adversarial_suffix.weight,
            );
        }
        if depth >= self.policy.limits.decode_depth || work.budget == 0 {
            // Out of depth or budget: if there is still something to
            // decode, that itself is a finding (layer upon layer of
            // encoding, or a decoy blob to exhaust the budget).
            let mut probe = 256;
            if !decode::segments(clean, folded.encoded.as_ref(), &mut probe).is_empty() {
                found.add(
                    Finding::DecodeLimit,
                    Category::Smuggling,
                    s.decode_limit.weight,
                );
            }
            return;
        }
        // Hidden and encoded text is scanned like the message; a rule
        // that matches only there adds the encoded-payload signal.
        // Small, targeted decoders first; whole-text readings (rot13,
        // backwards, invisible characters as spaces) only of the text
        // itself, never of what was derived from it.
        let mut inner: Vec<String> = Vec::new();
        let mut take = |t: String, work: &mut Work| {
            if let Some(t) = work.charge(t) {
                inner.push(t);
            }
        };
        if !folded.hidden.is_empty() {
            take(folded.hidden, work);
        }
        for t in decode::concatenated(clean, folded.encoded.as_ref()) {
            take(t, work);
        }
        if let Some(t) = decode::joined_assignments(clean, folded.encoded.as_ref()) {
            take(t, work);
        }
        if depth == 0 {
            if rot13 {
                take(decode::rot13(clean), work);
            }
            if reversed >= 2 {
                take(clean.chars().rev().collect(), work);
            }
            if folded.invisible > 0 {
                // `Ignore\u{200B}all\u{200B}previous`: read as spaces too.
                take(invisible_as_spaces(text), work);
            }
        }
        let before = work.budget;
        inner.extend(decode::segments(
            clean,
            folded.encoded.as_ref(),
            &mut work.budget,
        ));
        work.exhausted |= work.budget == 0 && before > 0;
        for text in inner {
            let before = found.len();
            self.scan_into(&text, source, depth + 1, work, found);
            if found.len() > before {
                found.add(
                    Finding::EncodedPayload,
                    Category::Smuggling,
                    s.encoded_payload.weight,
                );
            }
        }
    }

    /// The mode and thresholds for this caller.
    fn settings_for(&self, p: Option<&Principal>) -> (Option<Mode>, Thresholds, Thresholds) {
        let mut direct = self.policy.thresholds;
        let mut tool = self.policy.tool_thresholds;
        let mut mode = None;
        if let Some(o) = self.policy.overrides.iter().find(|o| o.matches(p)) {
            mode = o.mode;
            direct = o.thresholds.unwrap_or(direct);
            tool = o.tool_thresholds.unwrap_or(tool);
        }
        (mode, direct, tool)
    }
}

/// The text with zero-width spaces and bidirectional controls read as
/// spaces (the words view drops them, joining what they separate).
fn invisible_as_spaces(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{200B}'
            | '\u{2060}'
            | '\u{180E}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}' => ' ',
            c => c,
        })
        .collect()
}

/// The rules of the regexes in `gated` that match `text`, given where
/// their keywords occur (`(regex, start)`): a regex whose keywords are
/// its prefixes is tried anchored at each start, one with keywords of its
/// own searches the whole text once, one without keywords always runs.
fn matching<'a>(
    gated: &'a [rules::Gated],
    text: &'a str,
    at: &'a mut [(usize, usize)],
    applies: impl Fn(usize) -> bool + 'a,
) -> impl Iterator<Item = usize> + 'a {
    use regex_automata::{Anchored, Input};
    at.sort_unstable();
    gated.iter().enumerate().filter_map(move |(i, g)| {
        if !applies(g.rule) {
            return None;
        }
        let lo = at.partition_point(|&(r, _)| r < i);
        let hi = at.partition_point(|&(r, _)| r <= i);
        let starts = &at[lo..hi];
        // A match, unless its `unless` also matches it.
        // (every match is tried: a first one excused must not hide a
        // later one that is not).
        let counts = |input: Input<'_>| match &g.unless {
            None => g.regex.is_match(input),
            Some(unless) => g
                .regex
                .find_iter(input)
                .any(|m| !unless.is_match(&text[m.range()])),
        };
        let found = if g.always || (!g.anchored && !starts.is_empty()) {
            counts(Input::new(text))
        } else {
            let mut previous = usize::MAX;
            starts.iter().any(|&(_, s)| {
                let fresh = s != previous;
                previous = s;
                fresh && counts(Input::new(text).range(s..).anchored(Anchored::Yes))
            })
        };
        found.then_some(g.rule)
    })
}

/// Where a screened text is in the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// `message`, `prompt`, `suffix` or `tool_description`.
    pub field: &'static str,
    pub index: usize,
    pub source: Source,
}

/// One text of a request the screen reads.
#[derive(Debug)]
pub struct Text<'a> {
    pub place: Place,
    pub text: Cow<'a, str>,
}

/// What the screen cannot read: a prompt given as token ids.
#[derive(Debug, PartialEq, Eq)]
pub struct Unreadable(pub &'static str);

fn message_source(role: Role, roles: &[ScanRole]) -> Option<Source> {
    let on = |r| roles.contains(&r);
    match role {
        Role::Assistant => None,
        Role::System => on(ScanRole::System).then_some(Source::Direct),
        Role::Tool => on(ScanRole::Tool).then_some(Source::Tool),
        Role::User => on(ScanRole::User).then_some(Source::Direct),
    }
}

/// A message's text: its text parts joined (so an attack split across
/// parts is read whole) and its `name`.
fn message_text<'a>(m: &Message<'a>) -> Option<Cow<'a, str>> {
    let mut pieces = m.texts();
    if let Some(name) = m.name {
        pieces.push(name);
    }
    match pieces.as_slice() {
        [] => None,
        [one] => Some(Cow::Borrowed(one)),
        many => Some(Cow::Owned(many.join("\n"))),
    }
}

/// Every string and key in a tool declaration (names, descriptions,
/// titles, enums, defaults, examples, at any depth): tool poisoning hides
/// orders in any of them.
fn schema_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Object(o) => {
            for (k, v) in o {
                out.push(k.clone());
                schema_strings(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| schema_strings(i, out)),
        _ => {}
    }
}

/// The texts of a request the screen reads, or what it cannot read.
pub fn texts<'a>(view: &RequestView<'a>, roles: &[ScanRole]) -> Result<Vec<Text<'a>>, Unreadable> {
    let mut out = Vec::new();
    let prompt = view.prompt;
    let place = |field, index, source| Place {
        field,
        index,
        source,
    };
    for (i, m) in prompt.messages.iter().enumerate() {
        let (Some(source), Some(text)) = (message_source(m.role, roles), message_text(m)) else {
            continue;
        };
        out.push(Text {
            place: place("message", i, source),
            text,
        });
    }
    // A completions prompt and suffix are the caller's; embeddings inputs
    // generate nothing that follows instructions.
    if prompt.generates && roles.contains(&ScanRole::User) {
        for input in &prompt.inputs {
            let items: Vec<&Value> = match input.value {
                Value::Array(items) if items.iter().all(Value::is_string) => items.iter().collect(),
                Value::Array(_) => {
                    return Err(Unreadable(
                        "a prompt given as token ids cannot be screened for prompt injection; send text",
                    ))
                }
                v => vec![v],
            };
            for (i, p) in items.into_iter().enumerate() {
                if let Some(s) = p.as_str() {
                    out.push(Text {
                        place: place(input.field, i, Source::Direct),
                        text: Cow::Borrowed(s),
                    });
                }
            }
        }
    }
    if roles.contains(&ScanRole::Tool) {
        let declarations = prompt.tools.iter().map(|t| t.declaration);
        for (i, t) in declarations
            .chain(prompt.schemas.iter().copied())
            .enumerate()
        {
            let mut found = Vec::new();
            schema_strings(t, &mut found);
            if !found.is_empty() {
                out.push(Text {
                    place: place("tool_description", i, Source::Tool),
                    text: Cow::Owned(found.join("\n")),
                });
            }
        }
    }
    Ok(out)
}

/// The request filter.
pub struct InjectionFilter {
    detector: Arc<Shared<Detector>>,
}

impl InjectionFilter {
    pub fn new(detector: Arc<Shared<Detector>>) -> Self {
        Self { detector }
    }
}

#[async_trait]
impl RequestFilter for InjectionFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Injection
    }

    async fn check(&self, view: &RequestView<'_>) -> Result<Verdict, FilterError> {
        Ok(self.detector.get().decide(view))
    }
}

impl Detector {
    /// The screen's verdict on a request.
    pub fn decide(&self, view: &RequestView<'_>) -> Verdict {
        let (mode, direct, tool) = self.settings_for(view.principal);
        let texts = match texts(view, &self.policy.roles) {
            Ok(t) => t,
            Err(Unreadable(why)) if mode != Some(Mode::Monitor) => {
                return Decision::Deny(Rejection::about_input(ErrorCode::InvalidRequest, why))
                    .into();
            }
            Err(_) => Vec::new(),
        };
        // The worst text: the one furthest past its block threshold. One
        // work allowance for the whole request.
        let mut work = self.work_for(texts.iter().map(|t| t.text.len()).sum());
        let mut worst: Option<(f32, Place, Scan, Thresholds)> = None;
        for t in texts {
            let scan = self.scan_with(&t.text, t.place.source, &mut work);
            if scan.findings.is_empty() {
                continue;
            }
            let limits = if t.place.source == Source::Tool {
                tool
            } else {
                direct
            };
            let margin = scan.score - limits.block;
            if worst.as_ref().is_none_or(|w| margin > w.0) {
                worst = Some((margin, t.place, scan, limits));
            }
        }
        let Some((_, place, scan, limits)) = worst else {
            return Decision::Allow.into();
        };
        let (index, source) = (place.index, place.source);
        let verdict = if scan.score >= limits.block {
            "block"
        } else if scan.score >= limits.flag {
            "flag"
        } else {
            "pass"
        };
        let rounded = (scan.score * 1000.0).round() / 1000.0;
        let categories: Vec<&str> = scan.categories.iter().map(|(c, _)| c.as_str()).collect();
        let notes = vec![
            Annotation {
                key: "injection_score",
                value: json!(rounded),
            },
            Annotation {
                key: "injection_verdict",
                value: json!(verdict),
            },
            Annotation {
                key: "injection_categories",
                value: json!(categories),
            },
            Annotation {
                key: "injection_rules",
                value: json!(scan.findings),
            },
            Annotation {
                key: "injection_source",
                value: json!({
                    "field": place.field,
                    place.field: index,
                    "role": if source == Source::Tool { "tool" } else { "user" },
                }),
            },
        ];
        if verdict != "block" || mode == Some(Mode::Monitor) {
            let mut notes = notes;
            if verdict == "block" {
                notes.push(Annotation {
                    key: "injection_mode",
                    value: json!("monitor"),
                });
            }
            return Decision::Annotate(notes).into();
        }
        let top = scan.categories.first().map(|(c, _)| *c);
        let message = match top {
            Some(c) => format!(
                "The request was refused: it looks like a prompt-injection attempt ({}).",
                c.describe()
            ),
            None => ErrorCode::PromptInjection.public_message().to_string(),
        };
        let reason = format!(
            "prompt injection in {} {index} ({}): score {rounded} ≥ {}; {}",
            place.field,
            if source == Source::Tool {
                "tool result"
            } else {
                "caller"
            },
            limits.block,
            scan.findings.join(", ")
        );
        let mut verdict = Verdict::from(Decision::Deny(Rejection {
            code: ErrorCode::PromptInjection,
            message: Cow::Owned(message),
            reason,
        }));
        for n in notes {
            verdict = verdict.with(Fact::Note(n));
        }
        verdict
    }
}

#[cfg(test)]
mod tests;

impl Detector {
    /// Rule ids whose regex runs on every text (no keywords): each one
    /// costs a pass over every message.
    pub fn ungated(&self) -> Vec<&str> {
        let r = &self.rules;
        r.words
            .iter()
            .chain(&r.raw)
            .filter(|g| g.always)
            .map(|g| r.specs[g.rule].id.as_str())
            .collect()
    }
}
