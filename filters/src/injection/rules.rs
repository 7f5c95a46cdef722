//! Rules as written in `policies/injection.yaml`, and their compiled form:
//! one Aho-Corasick automaton over every phrase and one regex set per view
//! (the words view and the clean view, see [`super::normalise`]).

use super::normalise::{phrase_pattern, regex_source};
use super::Category;
use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use regex::{RegexSet, RegexSetBuilder};
use serde::Deserialize;

/// Where a rule applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every scanned message.
    #[default]
    Any,
    /// Only tool results (indirect injection): phrases that are ordinary
    /// from a person and suspicious in fetched content.
    Tool,
}

/// One rule as written in the policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub id: String,
    pub category: Category,
    /// In (0, 1]: how sure a match alone makes us.
    pub weight: f32,
    /// Phrases, matched on the words view at word boundaries (a trailing
    /// `*` matches a word prefix); written as a person would write them,
    /// since they are folded like the text.
    #[serde(default)]
    pub phrases: Vec<String>,
    /// A regex over the words view: lower case, one space between words,
    /// a space at both ends, no punctuation (so ` word ` is a whole word),
    /// accents dropped (its own letters are folded the same way, so it
    /// may be written with them).
    #[serde(default)]
    pub regex: Option<String>,
    /// A case-insensitive regex over the clean view: punctuation and line
    /// breaks kept (chat-template delimiters, markdown, code).
    #[serde(default)]
    pub raw_regex: Option<String>,
    #[serde(default)]
    pub scope: Scope,
    /// Texts the rule must find: checked by the test suite.
    #[serde(default)]
    pub examples: Vec<String>,
}

/// The compiled rules.
pub struct Rules {
    pub specs: Vec<RuleSpec>,
    pub phrases: AhoCorasick,
    /// Automaton pattern → rule index.
    pub phrase_rule: Vec<usize>,
    pub words: RegexSet,
    pub words_rule: Vec<usize>,
    pub raw: RegexSet,
    pub raw_rule: Vec<usize>,
}

/// Large enough for the shipped rules; small enough that a policy cannot
/// make the gateway build a huge automaton.
const REGEX_SIZE_LIMIT: usize = 32 << 20;

impl Rules {
    pub fn build(specs: Vec<RuleSpec>, errors: &mut Vec<String>) -> Option<Self> {
        let mut patterns = Vec::new();
        let mut phrase_rule = Vec::new();
        let (mut words, mut words_rule, mut raw, mut raw_rule) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut seen = std::collections::HashSet::new();
        for (i, r) in specs.iter().enumerate() {
            let at = format!("rule '{}'", r.id);
            if r.id.is_empty() || !seen.insert(r.id.as_str()) {
                errors.push(format!("{at}: ids must be present and unique"));
            }
            if !(r.weight > 0.0 && r.weight <= 1.0) {
                errors.push(format!("{at}: weight {} is not in (0, 1]", r.weight));
            }
            if r.phrases.is_empty() && r.regex.is_none() && r.raw_regex.is_none() {
                errors.push(format!("{at}: needs phrases, regex or raw_regex"));
            }
            for p in &r.phrases {
                match phrase_pattern(p) {
                    Some(pattern) => {
                        patterns.push(pattern);
                        phrase_rule.push(i);
                    }
                    None => errors.push(format!("{at}: phrase {p:?} has no words")),
                }
            }
            let words_source = r.regex.as_deref().map(regex_source);
            for (source, list, owners) in [
                (words_source.as_ref(), &mut words, &mut words_rule),
                (r.raw_regex.as_ref(), &mut raw, &mut raw_rule),
            ] {
                if let Some(re) = source {
                    match regex::Regex::new(re) {
                        Ok(_) => {
                            list.push(re.clone());
                            owners.push(i);
                        }
                        Err(e) => errors.push(format!("{at}: {e}")),
                    }
                }
            }
        }
        let phrases = AhoCorasick::builder()
            .kind(Some(AhoCorasickKind::DFA))
            .match_kind(MatchKind::Standard)
            .build(&patterns)
            .map_err(|e| errors.push(format!("phrases: {e}")))
            .ok();
        let mut set = |list: &[String], case_insensitive: bool| {
            RegexSetBuilder::new(list)
                .case_insensitive(case_insensitive)
                .size_limit(REGEX_SIZE_LIMIT)
                .dfa_size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| errors.push(format!("regex set: {e}")))
                .ok()
        };
        let words = set(&words, false);
        let raw = set(&raw, true);
        if !errors.is_empty() {
            return None;
        }
        Some(Self {
            specs,
            phrases: phrases?,
            phrase_rule,
            words: words?,
            words_rule,
            raw: raw?,
            raw_rule,
        })
    }
}
