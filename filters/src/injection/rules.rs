//! Rules as written in `policies/injection.yaml`, and their compiled form.
//!
//! Every phrase, and every regex's keywords, go into one Aho-Corasick
//! automaton over the words view; the clean-view regexes' keywords into a
//! second (ASCII case-insensitive) one over the clean view. A regex runs
//! only where one of its keywords occurs, so ordinary text is read once
//! by each automaton and by no regex, and the cost per byte does not grow
//! with the number of rules. A regex's keywords are the literals every
//! match starts with, taken from the regex itself: it is then tried only
//! anchored at each place one occurs (a few bytes each). A rule may list
//! `keywords` of its own instead (needed when a regex starts with a class
//! or an anchor): the regex then searches the whole text when one occurs.

use super::normalise::{fold, phrase_pattern, regex_source};
use super::Category;
use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use regex_automata::meta::Regex;
use regex_automata::util::syntax;
use regex_syntax::hir::literal::{ExtractKind, Extractor};
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
    /// Literals one of which must occur for the regex to run (words view:
    /// folded like phrases; clean view: ASCII, any case). Default: the
    /// literals every match of the regex starts with.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// A regex over what the rule's regex matched (in its view): when it
    /// matches too, the match does not count (`my previous instructions`
    /// are the caller's own).
    #[serde(default)]
    pub unless: Option<String>,
    #[serde(default)]
    pub scope: Scope,
    /// Texts the rule must find: checked by the test suite.
    #[serde(default)]
    pub examples: Vec<String>,
}

/// What a hit of the words automaton means.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// A phrase of this rule.
    Phrase(usize),
    /// A keyword of this words-view regex.
    Words(usize),
    /// A keyword, made of letters, of this clean-view regex: seen in the
    /// words view, so the clean-view automaton keeps only keywords that
    /// start with punctuation (rare bytes it skips to).
    Raw(usize),
    /// A common English word spelled backwards (` eht `): two or more say
    /// the text may be written backwards.
    Reversed,
    /// A word that says the text is in rot13 or a Caesar cipher.
    Rot13,
}

/// Common words backwards; none is an English word itself.
const REVERSED: [&str; 8] = [
    " eht ", " dna ", " uoy ", " lla ", " ruoy ", " fo ", " si ", " erongi ",
];

/// A compiled regex and its rule.
pub struct Gated {
    pub regex: Regex,
    pub rule: usize,
    /// No keywords: runs on every text.
    pub always: bool,
    /// Its keywords are the prefixes of its matches: tried anchored at
    /// each, not over the whole text.
    pub anchored: bool,
    /// Matches this also matches do not count.
    pub unless: Option<Regex>,
}

fn compile(source: &str, case_insensitive: bool) -> Result<Regex, String> {
    Regex::builder()
        .syntax(syntax::Config::new().case_insensitive(case_insensitive))
        .configure(
            Regex::config()
                .nfa_size_limit(Some(REGEX_SIZE_LIMIT))
                .hybrid_cache_capacity(4 << 20),
        )
        .build(source)
        .map_err(|e| {
            e.syntax_error()
                .map_or_else(|| e.to_string(), |s| s.to_string())
        })
}

/// The compiled rules.
pub struct Rules {
    pub specs: Vec<RuleSpec>,
    /// Phrases and words-view keywords.
    pub words_automaton: AhoCorasick,
    pub targets: Vec<Target>,
    pub words: Vec<Gated>,
    /// Clean-view keywords → index into `raw`.
    pub raw_automaton: AhoCorasick,
    pub raw_targets: Vec<usize>,
    pub raw: Vec<Gated>,
}

/// Large enough for the shipped rules; small enough that a policy cannot
/// make the gateway build a huge automaton.
const REGEX_SIZE_LIMIT: usize = 32 << 20;

/// The literals every match of `re` starts with, if there are few enough
/// and none is shorter than two bytes.
fn prefixes(re: &str) -> Option<Vec<Vec<u8>>> {
    let hir = regex_syntax::ParserBuilder::new().build().parse(re).ok()?;
    let seq = Extractor::new()
        .kind(ExtractKind::Prefix)
        .limit_total(2000)
        .limit_class(4)
        .extract(&hir);
    let literals = seq.literals()?;
    // Cut each to its first word (` ignore all previous` to ` ignore`):
    // still a prefix of every match, and a far smaller automaton.
    let mut cut: Vec<Vec<u8>> = literals
        .iter()
        .map(|l| {
            let b = l.as_bytes();
            let end = b
                .iter()
                .skip(1)
                .position(|&c| c == b' ')
                .map_or(b.len(), |p| p + 2);
            b[..end].to_vec()
        })
        .collect();
    cut.sort();
    cut.dedup();
    (!cut.is_empty() && cut.iter().all(|l| l.len() >= 2)).then_some(cut)
}

impl Rules {
    pub fn build(specs: Vec<RuleSpec>, errors: &mut Vec<String>) -> Option<Self> {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut targets = Vec::new();
        let mut raw_patterns: Vec<Vec<u8>> = Vec::new();
        let mut raw_targets = Vec::new();
        let (mut words, mut raw) = (Vec::new(), Vec::new());
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
            let unless = match r
                .unless
                .as_deref()
                .map(|u| compile(&regex_source(u), false))
            {
                Some(Ok(u)) => Some(u),
                Some(Err(e)) => {
                    errors.push(format!("{at}: unless: {e}"));
                    None
                }
                None => None,
            };
            if r.regex.is_some() && r.raw_regex.is_some() && !r.keywords.is_empty() {
                errors.push(format!(
                    "{at}: keywords apply to one regex; split regex and raw_regex into two rules"
                ));
            }
            for p in &r.phrases {
                match phrase_pattern(p) {
                    Some(pattern) => {
                        patterns.push(pattern.into_bytes());
                        targets.push(Target::Phrase(i));
                    }
                    None => errors.push(format!("{at}: phrase {p:?} has no words")),
                }
            }
            if let Some(re) = &r.regex {
                let source = regex_source(re);
                match compile(&source, false) {
                    Ok(regex) => {
                        let keywords: Option<Vec<Vec<u8>>> = if r.keywords.is_empty() {
                            prefixes(&source)
                        } else {
                            Some(
                                r.keywords
                                    .iter()
                                    // At a word start.
                                    .map(|k| format!(" {}", fold(k).words.trim()).into_bytes())
                                    .filter(|k| k.len() > 1)
                                    .collect(),
                            )
                        };
                        let n = words.len();
                        for k in keywords.iter().flatten() {
                            patterns.push(k.clone());
                            targets.push(Target::Words(n));
                        }
                        words.push(Gated {
                            regex,
                            rule: i,
                            always: keywords.is_none(),
                            anchored: r.keywords.is_empty(),
                            unless: unless.clone(),
                        });
                    }
                    Err(e) => errors.push(format!("{at}: {e}")),
                }
            }
            if let Some(re) = &r.raw_regex {
                match compile(re, true) {
                    Ok(regex) => {
                        let keywords: Option<Vec<Vec<u8>>> = if r.keywords.is_empty() {
                            prefixes(re)
                        } else {
                            Some(r.keywords.iter().map(|k| k.as_bytes().to_vec()).collect())
                        };
                        let n = raw.len();
                        let mut by_letter = false;
                        for k in keywords.iter().flatten() {
                            if k.first().is_some_and(u8::is_ascii_alphanumeric) {
                                // Its words-view form: `console.log` is
                                // `console log` there.
                                // At a word start: ` ai` for `ai:`.
                                let folded = fold(&String::from_utf8_lossy(k)).words;
                                patterns.push(format!(" {}", folded.trim()).into_bytes());
                                targets.push(Target::Raw(n));
                                by_letter = true;
                            } else {
                                raw_patterns.push(k.to_ascii_lowercase());
                                raw_targets.push(n);
                            }
                        }
                        raw.push(Gated {
                            regex,
                            rule: i,
                            always: keywords.is_none(),
                            // Positions in the words view are not
                            // positions in the clean view.
                            anchored: r.keywords.is_empty() && !by_letter,
                            unless: unless.clone(),
                        });
                    }
                    Err(e) => errors.push(format!("{at}: {e}")),
                }
            }
        }
        for w in REVERSED {
            patterns.push(w.as_bytes().to_vec());
            targets.push(Target::Reversed);
        }
        for w in ["rot13", "rot 13", "caesar", "rot-13"] {
            if let Some(p) = phrase_pattern(w) {
                patterns.push(p.into_bytes());
                targets.push(Target::Rot13);
            }
        }
        let words_automaton = AhoCorasick::builder()
            .kind(Some(AhoCorasickKind::ContiguousNFA))
            .match_kind(MatchKind::Standard)
            .build(&patterns)
            .map_err(|e| errors.push(format!("phrases: {e}")))
            .ok();
        let raw_automaton = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .ascii_case_insensitive(true)
            .build(&raw_patterns)
            .map_err(|e| errors.push(format!("keywords: {e}")))
            .ok();
        if !errors.is_empty() {
            return None;
        }
        Some(Self {
            specs,
            words_automaton: words_automaton?,
            targets,
            words,
            raw_automaton: raw_automaton?,
            raw_targets,
            raw,
        })
    }
}
