//! Secret and PII detection and redaction over whole texts.
//!
//! Rules come from `policies/redaction.yaml`: each has an `id`, a kind
//! (`secret` | `pii`), keywords, a pattern, an optional validator and a
//! replacement. [`Redactor::build`] compiles them once into an immutable
//! set: one case-insensitive Aho-Corasick automaton over every keyword, and
//! one regex per rule. A rule with keywords runs its regex only when one of
//! them occurs in the text, so most text is scanned once by the automaton
//! and never by the secret regexes. Rules without keywords (numbers: cards,
//! phones, SSNs) run on every text. Validators cut false positives: Luhn,
//! IBAN mod-97, SSN ranges, IP parsing, Shannon entropy, and placeholders
//! (`AKIAIOSFODNN7EXAMPLE`, `xxxx` runs, UUIDs and hashes for generic
//! rules) survive.
//!
//! [`stage::RedactStage`] applies it to responses, JSON and streamed.

use aho_corasick::AhoCorasick;
use regex::Regex;
use regex_automata::{meta, Anchored, Input};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Secret,
    Pii,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Validator {
    /// Payment card: 13–19 digits passing the Luhn check.
    Luhn,
    /// IBAN: ISO 13616 mod-97 check.
    Mod97,
    /// US SSN: not area 000, 666 or 9xx; not group 00; not serial 0000.
    Ssn,
    /// A parseable IPv4 address, not loopback (127/8), 0.0.0.0 or the
    /// broadcast address: those name no one.
    Ipv4,
    /// A parseable IPv6 address.
    Ipv6,
    /// Payment card without a label: Luhn, 13–19 digits, an issuer's
    /// first digit (2–6), and the grouping cards are printed with (none,
    /// fours, or 4-6-5 / 4-6-4), one separator throughout.
    Card,
    /// 7–15 digits, not all the same, and not a date, an SSN or a dotted
    /// quad.
    Phone,
    /// North American number: area code and exchange start with 2–9.
    Nanp,
    /// Looks generated: a digit and a letter, and both letter cases
    /// unless it is 32 characters or longer.
    Random,
}

/// One rule as written in the policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub id: String,
    pub kind: Kind,
    /// Lower-case literals, one of which must occur for the rule to run.
    #[serde(default)]
    pub keywords: Vec<String>,
    pub pattern: String,
    /// The capture group that is redacted (0: the whole match).
    #[serde(default)]
    pub group: usize,
    #[serde(default)]
    pub validator: Option<Validator>,
    /// Shannon entropy (bits per character) the redacted span must reach.
    #[serde(default)]
    pub min_entropy: Option<f64>,
    /// Generic rules also let UUIDs, hex hashes and version strings
    /// through, and what `references` lets through.
    #[serde(default)]
    pub generic: bool,
    /// A value that names a secret instead of being one is not a finding:
    /// `${DB_PASSWORD}`, `$TOKEN`, `$(vault read …)`, `<token>`,
    /// `process.env.API_KEY`, `settings.SECRET`, a file name or a URL.
    #[serde(default)]
    pub references: bool,
    /// `{id}` and `{kind}` are filled in; default `[REDACTED:{entity}]`.
    #[serde(default)]
    pub replacement: Option<String>,
    /// Names a value is assigned to (`datadog_api_key = …`, `"token":
    /// "…"`, `export COHERE_API_KEY=…`, `password: …`): `pattern` is then
    /// the value's pattern, and the rule matches it only as the value of
    /// a name that contains one of these (case-insensitive literals).
    /// Keywords default to the names.
    #[serde(default)]
    pub assigned_to: Vec<String>,
    /// A regex over the whole match: when it matches, the match is not a
    /// finding (`public_key = …` for a rule about keys).
    #[serde(default)]
    pub exclude: Option<String>,
    /// What the rule finds (default: its id): the name in
    /// `[REDACTED:…]`, and what profiles turn on and off. Several rules
    /// can find one entity (`phone` in its international, North American,
    /// national and labelled forms).
    #[serde(default)]
    pub entity: Option<String>,
    /// `false`: off unless a profile enables it.
    #[serde(default = "on")]
    pub enabled: bool,
}

fn on() -> bool {
    true
}

impl RuleSpec {
    /// The entity this rule finds.
    pub fn entity(&self) -> &str {
        self.entity.as_deref().unwrap_or(&self.id)
    }

    /// The regex actually compiled: `pattern`, or for an assignment rule
    /// the name, an operator and `pattern` as capture group 1.
    fn full_pattern(&self) -> String {
        ascii_word_boundaries(&self.assignment_pattern())
    }

    fn assignment_pattern(&self) -> String {
        if self.assigned_to.is_empty() {
            return self.pattern.clone();
        }
        // A name contains one of `assigned_to` as a word of its own:
        // after separators (`DD_API_KEY`, `x-api-key`, `db.password`) or
        // as a camel-case word (`cohereApiKey`, `myOktaToken`), not inside
        // another word (`rookTable` has no Okta in it).
        let names: Vec<String> = self.assigned_to.iter().map(|n| regex::escape(n)).collect();
        let camel: Vec<String> = self
            .assigned_to
            .iter()
            .filter_map(|n| {
                let mut c = n.chars();
                let first = c.next().filter(char::is_ascii_alphabetic)?;
                Some(format!(
                    "{}(?i:{})",
                    first.to_ascii_uppercase(),
                    regex::escape(c.as_str())
                ))
            })
            .collect();
        // Or run together in capitals (`PGPASSWORD`, `DBTOKEN`).
        let upper: Vec<String> = self
            .assigned_to
            .iter()
            .map(|n| regex::escape(&n.to_ascii_uppercase()))
            .collect();
        // Then an operator (`=`, `:`, `:=`, `=>`, `?=`, or `>` closing an
        // XML tag) on the same line, an optional quote (escaped too, as in
        // JSON inside a shell string), the value, and no value character
        // after it, nor a colon unless a space follows (`token:
        // client_secret: "…"` is two names; `api_key=…: 401` is a value).
        format!(
            r#"\b_{{0,2}}(?:[A-Za-z0-9]{{1,40}}(?:[_.-]|__)){{0,8}}(?:(?i:{})|[A-Za-z0-9]{{0,40}}[a-z0-9](?:{})|[A-Z0-9]{{1,20}}(?:{}))[A-Za-z0-9_.-]{{0,40}}\\?["'`]?[ \t]{{0,8}}(?:=|:=|=>|\?=|:|>)[ \t]{{0,8}}\\?["'`]?({})(?:[^A-Za-z0-9_+/=:-]|:\s|$)"#,
            names.join("|"),
            camel.join("|"),
            upper.join("|"),
            self.pattern
        )
    }

    fn keywords(&self) -> Vec<String> {
        let from = if self.keywords.is_empty() {
            &self.assigned_to
        } else {
            &self.keywords
        };
        from.iter().map(|k| k.to_ascii_lowercase()).collect()
    }
}

/// A tenant's redaction: which rules apply, and how findings read.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Kinds that apply (default: both).
    #[serde(default)]
    pub kinds: Option<Vec<Kind>>,
    /// Rules or entities turned on beyond the defaults.
    #[serde(default)]
    pub enable: Vec<String>,
    /// Rules or entities turned off.
    #[serde(default)]
    pub disable: Vec<String>,
    /// The replacement style (default: the policy's).
    #[serde(default)]
    pub style: Option<Style>,
}

impl Profile {
    fn applies(&self, spec: &RuleSpec) -> bool {
        let named = |list: &[String]| list.iter().any(|n| n == &spec.id || n == spec.entity());
        let kind = self.kinds.as_ref().is_none_or(|k| k.contains(&spec.kind));
        kind && !named(&self.disable) && (spec.enabled || named(&self.enable))
    }
}

/// How a finding is replaced, unless its rule has its own `replacement`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Style {
    /// `[REDACTED:<rule-id>]`
    #[default]
    Rule,
    /// `[REDACTED:secret]` or `[REDACTED:pii]`: the type only.
    Kind,
    /// The last four characters kept: `****1111`.
    Mask,
    /// `[REDACTED:<rule-id>:<12 hex of SHA-256(salt + value)>]`: the same
    /// value always gives the same tag, so repeats can be correlated.
    Hash,
}

/// `policies/redaction.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionPolicy {
    #[serde(default)]
    pub style: Style,
    /// Salt for `style: hash` (use `${ENV}` in a config; here a literal).
    #[serde(default)]
    pub salt: Option<String>,
    /// Case-insensitive substrings that mark a secret as a placeholder.
    #[serde(default)]
    pub placeholders: Vec<String>,
    pub rules: Vec<RuleSpec>,
    /// Named profiles (`support` keeps phone numbers, `health` redacts
    /// more); the rules' own `enabled` flags make the default profile.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
    /// Tenant → profile name. Tenants not listed get the default.
    #[serde(default)]
    pub tenants: BTreeMap<String, String>,
}

struct Rule {
    spec: RuleSpec,
    regex: meta::Regex,
    /// The longest match in bytes, when the pattern bounds it: the rule
    /// then runs only in windows this wide around where it can match.
    max_len: Option<usize>,
    /// An assignment rule whose names are made of name characters: it is
    /// tried only where a name holding one of them is followed by an
    /// operator (see [`assignment_starts`]).
    by_assignment: bool,
    exclude: Option<Regex>,
    /// The rule's own template, if it has one.
    replacement: Option<String>,
}

/// A compiled, immutable rule set.
pub struct Redactor {
    rules: Vec<Rule>,
    style: Style,
    salt: String,
    keywords: AhoCorasick,
    /// Keyword index → rule index.
    keyword_rule: Vec<usize>,
    /// Rules without keywords, and one automaton over all of them that
    /// finds in a single pass where any of them can match.
    always: Vec<usize>,
    always_any: Option<meta::Regex>,
    /// Case-insensitive substrings that make a secret a placeholder.
    placeholders: AhoCorasick,
    /// Tenant → its profile's rule set (tenants without one use `self`).
    tenants: std::collections::HashMap<String, std::sync::Arc<Redactor>>,
    uuid: Regex,
    hex_hash: Regex,
    version: Regex,
    date: Regex,
    ssn_shape: Regex,
    dotted_quad: Regex,
    /// Generic rules: a value that names a secret instead of being one.
    reference: Regex,
}

/// Where one rule is searched: byte ranges, and positions where a match
/// may start.
#[derive(Debug, Default, Clone)]
struct Places {
    windows: Vec<(usize, usize)>,
    starts: Vec<usize>,
}

/// `\b` read as an ASCII word boundary, `(?-u:\b)`: the fast regex
/// engines handle only those in text that is not ASCII (a Unicode `\b`
/// sends every search in German or Japanese text to the slowest engine),
/// and every rule is about ASCII tokens.
fn ascii_word_boundaries(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut escaped = false;
    for c in pattern.chars() {
        if escaped && c == 'b' {
            out.pop();
            out.push_str("(?-u:\\b)");
        } else {
            out.push(c);
        }
        escaped = !escaped && c == '\\';
    }
    out
}

/// A byte of an assignment's name (`DD_API_KEY`, `db.password`, `x-api-key`).
fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// Where an assignment rule's match may start, given a hit of one of its
/// names at `s..e`: its match is a run of name bytes holding the hit, an
/// optional quote (or `\"`), up to 8 blanks and an operator (`=`, `:`, `?=`, `>`), then
/// the value; it starts at a word boundary of that run, that is the run's
/// start or just after a `.` or `-` in it, at or before the hit. Nothing
/// when no operator follows the run (`token` in prose).
fn assignment_starts(b: &[u8], s: usize, e: usize, from: usize, out: &mut Vec<usize>) {
    const REACH: usize = 256;
    let mut lo = s;
    while lo > from && s - lo < REACH && name_byte(b[lo - 1]) {
        lo -= 1;
    }
    let mut j = e;
    while j < b.len() && j - e < REACH && name_byte(b[j]) {
        j += 1;
    }
    if j + 1 < b.len() && b[j] == b'\\' && matches!(b[j + 1], b'"' | b'\'') {
        j += 1;
    }
    if j < b.len() && matches!(b[j], b'"' | b'\'' | b'`') {
        j += 1;
    }
    let blanks = j;
    while j < b.len() && j - blanks < 8 && matches!(b[j], b' ' | b'\t') {
        j += 1;
    }
    if j >= b.len() || !matches!(b[j], b'=' | b':' | b'?' | b'>') {
        return;
    }
    out.push(lo);
    out.extend((lo + 1..=s).filter(|&i| matches!(b[i - 1], b'.' | b'-')));
}

/// What [`Redactor::scan`] found.
#[derive(Debug, Default)]
pub struct Scan {
    pub findings: Vec<Finding>,
    /// Every raw pattern match, validated or not.
    pub raw: Vec<(usize, usize)>,
}

/// One span to redact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub start: usize,
    pub end: usize,
    pub rule: String,
    pub kind: Kind,
}

impl Redactor {
    /// Compile the policy: the default rule set, and one per profile a
    /// tenant uses. Reports every rule and profile that is wrong.
    pub fn build(policy: &RedactionPolicy) -> Result<Self, Vec<String>> {
        let mut errors = check_profiles(policy);
        let mut default = match Self::build_one(policy, &Profile::default()) {
            Ok(r) => r,
            Err(mut e) => {
                e.append(&mut errors);
                return Err(e);
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut compiled: BTreeMap<&str, std::sync::Arc<Redactor>> = BTreeMap::new();
        for (tenant, name) in &policy.tenants {
            let r = match compiled.get(name.as_str()) {
                Some(r) => r.clone(),
                None => {
                    let profile = &policy.profiles[name];
                    let r = std::sync::Arc::new(Self::build_one(policy, profile)?);
                    compiled.insert(name, r.clone());
                    r
                }
            };
            default.tenants.insert(tenant.clone(), r);
        }
        Ok(default)
    }

    /// The rule set for a tenant (its profile's, or the default).
    pub fn for_tenant(self: &std::sync::Arc<Self>, tenant: Option<&str>) -> std::sync::Arc<Self> {
        tenant
            .and_then(|t| self.tenants.get(t))
            .unwrap_or(self)
            .clone()
    }

    /// Compile the rules a profile applies.
    fn build_one(policy: &RedactionPolicy, profile: &Profile) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for spec in &policy.rules {
            if !seen.insert(spec.id.clone()) {
                errors.push(format!("rules: duplicate id '{}'", spec.id));
            }
            let exclude = match spec.exclude.as_deref().map(Regex::new).transpose() {
                Ok(x) => x,
                Err(e) => {
                    errors.push(format!("rule '{}': bad exclude: {e}", spec.id));
                    None
                }
            };
            let pattern = spec.full_pattern();
            match meta::Regex::new(&pattern) {
                Ok(_) if !profile.applies(spec) => {}
                Ok(_) if !spec.assigned_to.is_empty() && spec.group != 0 => errors.push(format!(
                    "rule '{}': an assignment rule redacts its value (no group)",
                    spec.id
                )),
                Ok(regex) if spec.group < regex.captures_len() => {
                    let kind = if spec.kind == Kind::Secret {
                        "secret"
                    } else {
                        "pii"
                    };
                    let replacement = spec.replacement.as_ref().map(|r| {
                        r.replace("{id}", &spec.id)
                            .replace("{entity}", spec.entity())
                            .replace("{kind}", kind)
                    });
                    let mut spec = spec.clone();
                    if !spec.assigned_to.is_empty() {
                        spec.group = 1;
                    }
                    let max_len = regex_syntax::parse(&pattern)
                        .ok()
                        .and_then(|h| h.properties().maximum_len());
                    let by_assignment = !spec.assigned_to.is_empty()
                        && spec
                            .assigned_to
                            .iter()
                            .all(|n| !n.is_empty() && n.bytes().all(name_byte));
                    rules.push(Rule {
                        spec,
                        regex,
                        max_len,
                        by_assignment,
                        exclude,
                        replacement,
                    });
                }
                Ok(_) => errors.push(format!(
                    "rule '{}': no capture group {}",
                    spec.id, spec.group
                )),
                Err(e) => errors.push(format!("rule '{}': bad pattern: {e}", spec.id)),
            }
        }
        let mut patterns = Vec::new();
        let mut keyword_rule = Vec::new();
        let mut always = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let keywords = r.spec.keywords();
            if keywords.is_empty() {
                always.push(i);
            }
            for k in keywords {
                patterns.push(k);
                keyword_rule.push(i);
            }
        }
        let keywords = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .kind(Some(aho_corasick::AhoCorasickKind::DFA))
            .build(&patterns)
            .map_err(|e| vec![format!("keywords: {e}")])?;
        if !errors.is_empty() {
            return Err(errors);
        }
        let fixed = |p: &str| Regex::new(p).map_err(|e| vec![e.to_string()]);
        let always_any = if always.is_empty() {
            None
        } else {
            let patterns: Vec<String> = always
                .iter()
                .map(|i| rules[*i].spec.full_pattern())
                .collect();
            Some(
                meta::Regex::new_many(&patterns)
                    .map_err(|e| vec![format!("rules without keywords: {e}")])?,
            )
        };
        Ok(Self {
            style: profile.style.unwrap_or(policy.style),
            salt: policy.salt.clone().unwrap_or_default(),
            always_any,
            rules,
            keywords,
            keyword_rule,
            always,
            placeholders: AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(&policy.placeholders)
                .map_err(|e| vec![format!("placeholders: {e}")])?,
            tenants: std::collections::HashMap::new(),
            uuid: fixed(r"^(?i)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")?,
            hex_hash: fixed(r"^(?i)(?:[0-9a-f]{32}|[0-9a-f]{40}|[0-9a-f]{64}|[0-9a-f]{128})$")?,
            version: fixed(r"^v?\d+(?:\.\d+){1,3}(?:[-+][0-9A-Za-z.]+)?$")?,
            dotted_quad: fixed(r"^\d{1,3}(?:\.\d{1,3}){3}$")?,
            ssn_shape: fixed(r"^\d{3}[- ]\d{2}[- ]\d{4}$")?,
            date: fixed(
                r"^(?:(?:19|20)\d{2}(?:-\d{1,2}-|\.\d{1,2}\.|/\d{1,2}/)\d{1,2}|\d{1,2}(?:-\d{1,2}-|\.\d{1,2}\.|/\d{1,2}/)(?:19|20)?\d{2})(?:$|[ T])",
            )?,
            reference: fixed(REFERENCE)?,
        })
    }

    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.spec.id.as_str())
    }

    /// The entity a rule finds (the rule id when it names none).
    pub fn entity<'a>(&'a self, rule: &'a str) -> &'a str {
        self.rules
            .iter()
            .find(|r| r.spec.id == rule)
            .map_or(rule, |r| r.spec.entity())
    }

    /// Every span to redact, in order, never overlapping.
    pub fn find(&self, text: &str) -> Vec<Finding> {
        self.scan(text, 0).findings
    }

    /// Findings that start at or after `from` (the text before it is only
    /// context for `\b` and the like), and every raw pattern match there,
    /// validated or not: the stream redactor never cuts inside one.
    pub fn scan(&self, text: &str, from: usize) -> Scan {
        self.scan_in(text, &self.places(text, from), true)
    }

    /// [`Self::find`], personal data left out unless `pii`.
    pub fn find_kinds(&self, text: &str, pii: bool) -> Vec<Finding> {
        self.scan_in(text, &self.places(text, 0), pii).findings
    }

    /// [`Self::scan`] with each rule searched only at its places.
    /// Personal data is left out when not `pii` (before overlaps are
    /// settled, so it never hides a secret).
    fn scan_in(&self, text: &str, places: &[Places], pii: bool) -> Scan {
        let mut raw = Vec::new();
        let mut candidates: Vec<(usize, usize, usize)> = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let p = &places[i];
            if p.windows.is_empty() && p.starts.is_empty() {
                continue;
            }
            let mut caps = rule.regex.create_captures();
            let mut found = |caps: &regex_automata::util::captures::Captures| -> Option<usize> {
                let whole = caps.get_match()?;
                let (start, end) = (whole.start(), whole.end());
                let excluded = rule
                    .exclude
                    .as_ref()
                    .is_some_and(|x| x.is_match(&text[start..end]));
                let group = caps.get_group(rule.spec.group);
                let kept = group.filter(|_| !excluded).and_then(|span| {
                    let (from, to) = self.valid_part(rule, &text[span.start..span.end])?;
                    candidates.push((span.start + from, span.start + to, i));
                    Some(span.start + to)
                });
                // After a rejected assignment, search again from its value:
                // in `?token=changeme&secret=…` the real secret starts
                // there. (Other rules reject a match by its context, as
                // `version 10.4.2.1` for an IP address: not again.) A
                // number whose check digits cut it short of the match (the
                // greedy IBAN pattern runs on through `the IBAN GB82…`):
                // search again right after it, and the match ends there
                // for the stream too.
                let resume = match (kept, group) {
                    (Some(e), _) if e < end && e > start && checks_digits(rule) => e,
                    (None, Some(g)) if g.start > start && !rule.spec.assigned_to.is_empty() => {
                        g.start
                    }
                    _ => end,
                };
                raw.push((start, if kept.is_some() { resume } else { end }));
                Some(if resume > start {
                    resume
                } else {
                    // An empty match: step over one character.
                    start + text[start..].chars().next().map_or(1, char::len_utf8)
                })
            };
            for &(lo, hi) in &p.windows {
                let mut at = lo;
                while at <= hi {
                    rule.regex
                        .search_captures(&Input::new(text).range(at..hi), &mut caps);
                    match found(&caps) {
                        Some(next) => at = next,
                        None => break,
                    }
                }
            }
            // Anchored at each place a match may start, left to right, as
            // an unanchored search would find them.
            let mut next = 0;
            for &at in &p.starts {
                if at < next {
                    continue;
                }
                let input = Input::new(text).range(at..).anchored(Anchored::Yes);
                rule.regex.search_captures(&input, &mut caps);
                if let Some(end) = found(&caps) {
                    next = end;
                }
            }
        }
        // Secrets first, then personal data: each earliest first, the
        // longest at one start, and nothing that overlaps a kept span. A
        // phone number that runs into a bot token must not hide the token.
        let is_secret = |i: usize| self.rules[i].spec.kind == Kind::Secret;
        candidates.retain(|c| pii || is_secret(c.2));
        candidates.sort_by(|a, b| {
            (!is_secret(a.2))
                .cmp(&!is_secret(b.2))
                .then(a.0.cmp(&b.0))
                .then(b.1.cmp(&a.1))
        });
        let mut kept: Vec<(usize, usize, usize)> = Vec::new();
        for c in candidates {
            let mut covered: Vec<(usize, usize)> = kept
                .iter()
                .filter(|k| c.0 < k.1 && k.0 < c.1)
                .map(|k| (k.0, k.1))
                .collect();
            if covered.is_empty() {
                kept.push(c);
                continue;
            }
            // A number checked by its digits that overlaps a kept finding
            // is not dropped whole: what of it no kept span covers is
            // redacted too, under its own rule. (`Phone: 612 34 56 78
            // 4b1d…`: the greedy phone match took the first digit of the
            // key after it; the key wins the overlap, and the number
            // before it must not be shown.) Other rules' leftovers are
            // dropped: the `@host` an email match took from a password in
            // a URL is not personal data.
            if !checks_digits(&self.rules[c.2]) {
                continue;
            }
            covered.sort_unstable();
            let mut at = c.0;
            for (lo, hi) in covered.into_iter().chain([(c.1, c.1)]) {
                if lo > at {
                    let piece = &text[at..lo];
                    let trimmed = piece.trim();
                    if trimmed.chars().any(char::is_alphanumeric) {
                        let start = at + (piece.len() - piece.trim_start().len());
                        kept.push((start, start + trimmed.len(), c.2));
                    }
                }
                at = at.max(hi);
            }
        }
        kept.sort_unstable();
        let findings = kept
            .into_iter()
            .map(|(start, end, i)| Finding {
                start,
                end,
                rule: self.rules[i].spec.id.clone(),
                kind: self.rules[i].spec.kind,
            })
            .collect();
        Scan { findings, raw }
    }

    /// Where each rule can match at all, as disjoint byte ranges of `text`
    /// from `from` on. Every match of a rule with keywords contains one of
    /// them, so it lies within its longest match's length of a keyword
    /// hit. Every match of a rule without keywords overlaps or starts at a
    /// match of the combined automaton over all of them (it finds the
    /// leftmost match of any), so it lies between that match's start and
    /// its end plus the rule's longest match. A rule whose matches have no
    /// bound runs over the whole text. Cost per byte then depends on how
    /// often keywords occur, not on how many rules there are.
    fn places(&self, text: &str, from: usize) -> Vec<Places> {
        let mut windows: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.rules.len()];
        let mut starts: Vec<Vec<usize>> = vec![Vec::new(); self.rules.len()];
        let n = text.len();
        let floor = |mut x: usize| {
            while !text.is_char_boundary(x) {
                x -= 1;
            }
            x
        };
        let ceil = |mut x: usize| {
            while !text.is_char_boundary(x) {
                x += 1;
            }
            x
        };
        let mut add = |i: usize, lo: usize, hi: usize| {
            let (lo, hi) = (floor(lo.max(from)), ceil(hi.min(n)));
            let w = &mut windows[i];
            match w.last_mut() {
                Some(last) if lo <= last.1 && lo >= last.0 => last.1 = last.1.max(hi),
                _ => w.push((lo, hi)),
            }
        };
        for m in self.keywords.find_overlapping_iter(&text[from..]) {
            let i = self.keyword_rule[m.pattern().as_usize()];
            let (s, e) = (from + m.start(), from + m.end());
            if self.rules[i].by_assignment {
                assignment_starts(text.as_bytes(), s, e, from, &mut starts[i]);
                continue;
            }
            match self.rules[i].max_len {
                Some(max) => add(i, e.saturating_sub(max), s.saturating_add(max)),
                None => add(i, from, n),
            }
        }
        if let Some(any) = &self.always_any {
            for m in any.find_iter(Input::new(text).range(from..)) {
                for &i in &self.always {
                    let hi = self.rules[i]
                        .max_len
                        .map_or(n, |max| m.end().saturating_add(max));
                    add(i, m.start(), hi);
                }
            }
        }
        for w in &mut windows {
            // Hits arrive in order, but a window can start before the
            // previous one's start (keywords of different lengths): merge.
            w.sort_unstable();
            let mut merged: Vec<(usize, usize)> = Vec::with_capacity(w.len());
            for &(lo, hi) in w.iter() {
                match merged.last_mut() {
                    Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                    _ => merged.push((lo, hi)),
                }
            }
            *w = merged;
        }
        windows
            .into_iter()
            .zip(starts)
            .map(|(windows, mut starts)| {
                starts.sort_unstable();
                starts.dedup();
                Places { windows, starts }
            })
            .collect()
    }

    /// What replaces `value`, found by `rule`.
    pub fn render(&self, rule: &str, value: &str) -> String {
        let Some(r) = self.rules.iter().find(|r| r.spec.id == rule) else {
            return "[REDACTED]".into();
        };
        if let Some(t) = &r.replacement {
            return t.clone();
        }
        match self.style {
            Style::Rule => format!("[REDACTED:{}]", r.spec.entity()),
            Style::Kind => match r.spec.kind {
                Kind::Secret => "[REDACTED:secret]".into(),
                Kind::Pii => "[REDACTED:pii]".into(),
            },
            Style::Mask => {
                let chars: Vec<char> = value.chars().collect();
                let keep = if chars.len() > 8 { 4 } else { 0 };
                let tail: String = chars[chars.len() - keep..].iter().collect();
                format!("{}{tail}", "*".repeat(chars.len() - keep))
            }
            Style::Hash => {
                use sha2::{Digest, Sha256};
                let digest = Sha256::digest(format!("{}{value}", self.salt).as_bytes());
                let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
                format!("[REDACTED:{}:{hex}]", r.spec.entity())
            }
        }
    }

    /// The text with every finding replaced, and counts per rule.
    pub fn redact(&self, text: &str) -> (String, BTreeMap<String, usize>) {
        self.redact_kinds(text, true)
    }

    /// [`Self::redact`], personal data left alone unless `pii`.
    pub fn redact_kinds(&self, text: &str, pii: bool) -> (String, BTreeMap<String, usize>) {
        self.redact_findings(text, &self.find_kinds(text, pii))
    }

    /// The text with these findings replaced, and counts per rule.
    pub fn redact_findings(
        &self,
        text: &str,
        findings: &[Finding],
    ) -> (String, BTreeMap<String, usize>) {
        let mut counts = BTreeMap::new();
        if findings.is_empty() {
            return (text.to_string(), counts);
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for f in findings {
            out.push_str(&text[at..f.start]);
            out.push_str(&self.render(&f.rule, &text[f.start..f.end]));
            *counts.entry(f.rule.clone()).or_insert(0) += 1;
            at = f.end;
        }
        out.push_str(&text[at..]);
        (out, counts)
    }

    /// The part of the span that passes validation: all of it, its longest
    /// prefix ending before a separator, or else its longest suffix
    /// starting after one. A greedy pattern can swallow a neighbouring
    /// number after the true one ("IBAN … 32 12") or before it ("order 12
    /// 4111 1111 1111 1111"): the check digits decide. At most two
    /// validations per separator in the match, and the search goes on
    /// after the match as before: linear in the text.
    fn valid_part(&self, rule: &Rule, span: &str) -> Option<(usize, usize)> {
        if let Some(len) = self.valid_prefix(rule, span) {
            return Some((0, len));
        }
        if !checks_digits(rule) {
            return None;
        }
        span.char_indices()
            .filter(|(_, c)| matches!(c, ' ' | '-' | '.'))
            .map(|(i, _)| i + 1)
            .filter(|&i| span[i..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '+'))
            .find(|&i| self.valid(rule, &span[i..]))
            .map(|i| (i, span.len()))
    }

    /// The length of the span, or of its longest prefix that ends before a
    /// separator, that passes validation.
    fn valid_prefix(&self, rule: &Rule, span: &str) -> Option<usize> {
        if self.valid(rule, span) {
            return Some(span.len());
        }
        // Only check digits can tell a true shorter match from a false one.
        if !checks_digits(rule) {
            return None;
        }
        span.char_indices()
            .rev()
            .filter(|(_, c)| matches!(c, ' ' | '-' | '.'))
            .map(|(i, _)| i)
            .find(|&i| self.valid(rule, &span[..i]))
    }

    fn valid(&self, rule: &Rule, span: &str) -> bool {
        // Placeholder words occur by chance in long random values (a key
        // file holds `here` or `xxxx` now and then): only short ones can
        // be placeholders.
        if rule.spec.kind == Kind::Secret
            && ((span.len() <= 100 && self.placeholders.is_match(span)) || looks_made_up(span))
        {
            return false;
        }
        if (rule.spec.generic || rule.spec.references)
            && (self.reference.is_match(span) || names_a_secret(span))
        {
            return false;
        }
        if rule.spec.generic
            && (self.uuid.is_match(span)
                || self.hex_hash.is_match(span)
                || self.version.is_match(span))
        {
            return false;
        }
        if let Some(min) = rule.spec.min_entropy {
            if entropy(span) < min {
                return false;
            }
        }
        match rule.spec.validator {
            None => true,
            Some(Validator::Luhn) => luhn(span),
            Some(Validator::Card) => card(span),
            Some(Validator::Random) => random(span),
            Some(Validator::Nanp) => nanp(span) && !self.date.is_match(span),
            Some(Validator::Mod97) => mod97(span),
            Some(Validator::Ssn) => ssn(span),
            Some(Validator::Ipv4) => span
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !(ip.is_loopback() || ip.is_unspecified() || ip.is_broadcast())),
            Some(Validator::Phone) => {
                let main = span.split(['x', 'X', 'e']).next().unwrap_or(span);
                let d = digits(main);
                let n = d.len();
                (7..=15).contains(&n)
                    && d.iter().any(|x| *x != d[0])
                    && !self.date.is_match(span)
                    && !self.ssn_shape.is_match(span)
                    && !self.dotted_quad.is_match(span)
            }
            Some(Validator::Ipv6) => {
                span.matches(':').count() >= 2
                    && span.chars().filter(char::is_ascii_hexdigit).count() >= 3
                    && span.parse::<std::net::Ipv6Addr>().is_ok()
            }
        }
    }
}

/// Rules whose validator checks the digits themselves: a shorter part of
/// a match can be told true or false.
fn checks_digits(rule: &Rule) -> bool {
    matches!(
        rule.spec.validator,
        Some(Validator::Luhn | Validator::Card | Validator::Mod97 | Validator::Phone)
    )
}

/// A value that names a secret instead of being one, as a whole: a
/// variable or template reference (`${DB_PASSWORD}`, `$TOKEN`,
/// `$(vault read …)`, `%KEY%`, `{{ … }}`, `<YOUR_KEY>`, `[PASSWORD]`), a
/// lookup (`process.env.API_KEY`, `os.environ["TOKEN"]`, `getenv(…)`,
/// `config.get('auth.token')`, `settings.SECRET_KEY`: identifiers without
/// digits), a URL, a host name under a common suffix, a path under a
/// common root, or a key or config file's name (`cert.p12`). Anything
/// else, however it starts (`#Summer2024!x`, `@dm1nP4ss`, `/k3JfA9…`), is
/// a value. Identifiers that name a secret (`DB_PASSWORD`,
/// `user_password`) are [`names_a_secret`].
const REFERENCE: &str = concat!(
    r"^(?:",
    r"\$\{\{.*\}\}|\$\{[^{}]+\}|\$[A-Za-z_][A-Za-z0-9_]*|\$\(.*\)|%[A-Za-z_][A-Za-z0-9_]*%",
    r"|<[A-Za-z][A-Za-z0-9_ .-]*>|\[[A-Za-z][A-Za-z0-9_ .-]*\]|\{\{.*\}\}|#\{[^}]+\}|\{[A-Za-z_][A-Za-z0-9_.]*\}",
    r"|(?:process\.env|import\.meta\.env|env)\.[A-Za-z_][A-Za-z0-9_]*",
    r#"|(?:process\.env|os\.environ|ENV|env|secrets|config|settings|params|vars)\[["'][^"']+["']\]"#,
    r#"|[A-Za-z_][A-Za-z0-9_.]*\((?:\s*(?:"[^"]*"|'[^']*'|[A-Za-z_][A-Za-z0-9_.]*|\d+)\s*,?)*\)"#,
    r"|[A-Za-z_]+(?:(?:\.|::|->)[A-Za-z_]+)+",
    // A call or index whose quoted argument the value stops at:
    // `os.environ[` of `os.environ["TOKEN"]`.
    r"|[A-Za-z_][A-Za-z0-9_.]*[(\[]",
    r"|vault:[A-Za-z0-9_/.-]+(?:#[A-Za-z0-9_]+)?",
    r"|[a-z][a-z0-9+.-]*://.*",
    r"|[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|net|org|io|dev|app|cloud|local|localdomain|internal|lan|svc|corp|co|ai|sh)(?::\d+)?",
    r"|(?:~/|\.{1,2}/|/(?:etc|home|var|run|opt|usr|tmp|srv|mnt|secrets|data|app|root|Users|config|certs|keys|vault)/)[A-Za-z0-9_./-]*",
    r"|[A-Za-z]:\\.*",
    r"|[A-Za-z0-9_.-]+\.(?i:pem|p12|pfx|key|crt|cer|der|jks|keystore|keytab|json|ya?ml|txt|env|properties|xml|conf|cfg|ini|toml)",
    r")$"
);

/// An identifier in one case, with underscores, that names a secret
/// (`DB_PASSWORD`, `user_password`, `api_key`): a variable, not a value.
/// `correct_horse_battery_staple` names nothing and is a value.
fn names_a_secret(s: &str) -> bool {
    const HINTS: [&str; 8] = [
        "pass", "pwd", "secret", "token", "key", "auth", "cred", "cert",
    ];
    let lower = s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    let upper = s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
    let l = s.to_ascii_lowercase();
    (lower || upper) && s.contains('_') && HINTS.iter().any(|h| l.contains(h))
}

/// A made-up value: eight identical characters in a row, or six
/// consecutive ascending ones (`abcdef`, `123456`), in a value of up to
/// 100 bytes; in a longer one (a key file, a long token) such runs occur
/// in real data (an OpenSSH key's zero bytes are `AAAAAAAA`), so only a
/// value that is half one repeated character is made up.
fn looks_made_up(s: &str) -> bool {
    let b = s.as_bytes();
    let short = b.len() <= 100;
    let mut same = 1;
    let mut longest = 1;
    let mut ascending = 1;
    for w in b.windows(2) {
        same = if w[1] == w[0] { same + 1 } else { 1 };
        longest = longest.max(same);
        ascending = if w[1] == w[0].wrapping_add(1) && w[1].is_ascii_alphanumeric() {
            ascending + 1
        } else {
            1
        };
        if short && (same >= 8 || ascending >= 6) {
            return true;
        }
    }
    !short && longest * 2 >= b.len()
}

/// Shannon entropy in bits per character.
pub fn entropy(s: &str) -> f64 {
    let b = s.as_bytes();
    if b.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &x in b {
        counts[x as usize] += 1;
    }
    let n = b.len() as f64;
    let mut h = 0.0;
    // Each distinct byte once: its count is cleared after use.
    for &x in b {
        let c = std::mem::take(&mut counts[x as usize]);
        if c > 0 {
            let p = f64::from(c) / n;
            h -= p * p.log2();
        }
    }
    h
}

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

/// See [`Validator::Random`].
fn random(s: &str) -> bool {
    let has = |f: fn(&char) -> bool| s.chars().any(|c| f(&c));
    has(char::is_ascii_digit)
        && has(char::is_ascii_alphabetic)
        && (s.len() >= 32 || (has(char::is_ascii_uppercase) && has(char::is_ascii_lowercase)))
}

/// A card number as printed: see [`Validator::Card`].
pub fn card(s: &str) -> bool {
    let d = digits(s);
    if !(13..=19).contains(&d.len()) || !matches!(d[0], 2..=6) || !luhn(s) {
        return false;
    }
    let mut seps = s.chars().filter(|c| !c.is_ascii_digit());
    let Some(sep) = seps.next() else {
        return true;
    };
    if seps.any(|c| c != sep) {
        return false;
    }
    let groups: Vec<usize> = s.split(sep).map(str::len).collect();
    let (last, fours) = groups.split_last().unwrap_or((&0, &[]));
    fours.iter().all(|g| *g == 4) && (1..=4).contains(last)
        || groups == [4, 6, 5]
        || groups == [4, 6, 4]
}

/// A North American number: 10 digits (11 with a leading 1), area code
/// and exchange starting with 2–9, the exchange not N11.
pub fn nanp(s: &str) -> bool {
    let main = s.split(['x', 'X', 'e']).next().unwrap_or(s);
    let mut d = digits(main);
    if d.len() == 11 && d[0] == 1 {
        d.remove(0);
    }
    d.len() == 10 && d[0] >= 2 && d[3] >= 2 && !(d[4] == 1 && d[5] == 1)
}

/// Payment card numbers: 12–19 digits, Luhn-valid.
pub fn luhn(s: &str) -> bool {
    let d = digits(s);
    if !(12..=19).contains(&d.len())
        || s.chars()
            .any(|c| !(c.is_ascii_digit() || c == ' ' || c == '-'))
    {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                if x * 2 > 9 {
                    x * 2 - 9
                } else {
                    x * 2
                }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// IBAN check digits (ISO 13616).
pub fn mod97(s: &str) -> bool {
    let compact: String = s
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    if !(15..=34).contains(&compact.len()) || !compact.chars().all(|c| c.is_ascii_alphanumeric()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        let digits = if v >= 10 { 100 } else { 10 };
        rem = (rem * digits + v) % 97;
    }
    rem == 1
}

/// US SSN ranges.
pub fn ssn(s: &str) -> bool {
    let d = digits(s);
    if d.len() != 9 {
        return false;
    }
    let area = d[0] * 100 + d[1] * 10 + d[2];
    let group = d[3] * 10 + d[4];
    let serial = d[5] * 1000 + d[6] * 100 + d[7] * 10 + d[8];
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// Profiles name rules and entities that exist; tenants name profiles that
/// exist.
fn check_profiles(policy: &RedactionPolicy) -> Vec<String> {
    let mut errors = Vec::new();
    let known = |n: &String| policy.rules.iter().any(|r| &r.id == n || r.entity() == n);
    for (name, p) in &policy.profiles {
        for n in p.enable.iter().chain(&p.disable).filter(|n| !known(n)) {
            errors.push(format!("profile '{name}': no rule or entity '{n}'"));
        }
    }
    for (tenant, name) in &policy.tenants {
        if !policy.profiles.contains_key(name) {
            errors.push(format!("tenant '{tenant}': no profile '{name}'"));
        }
    }
    errors
}

pub mod request;
pub mod stage;
pub mod stream;
pub mod tokens;

#[cfg(test)]
mod tests;
