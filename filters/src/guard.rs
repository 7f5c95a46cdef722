//! Guard-model screening: the decisions. A guard is a safety model (Llama
//! Guard behind an OpenAI-compatible server, an OpenAI-style moderation
//! endpoint, or a single-verdict classifier such as Granite Guardian or
//! ShieldGemma) that judges what is sent to it. This module decides what
//! is sent ([`turns`]), how each protocol is spoken and read
//! ([`protocol`]), what a verdict means under `policies/guard.yaml`
//! ([`GuardPolicy::action`]), and keeps the circuit breaker ([`breaker`])
//! and the verdict cache ([`cache`]). The HTTP calls are the gateway's.

pub mod breaker;
pub mod cache;
pub mod filter;
pub mod protocol;

use crate::prompt::{self, Prompt};
use crate::request::Principal;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// Who spoke a turn sent to a guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
    Tool,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// One turn of what a guard judges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub text: String,
}

/// What a verdict's category leads to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Flag,
    #[default]
    Block,
}

/// Which parts of a chat request are sent to the guard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Messages {
    /// The last user message (the cheapest, and what most guards judge).
    #[default]
    LastUser,
    /// Every user and assistant message.
    Conversation,
    /// The conversation and the tool results.
    ConversationAndTools,
}

/// A category as the policy names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Category {
    /// `S1`…`S14` for Llama Guard, a moderation category name, a risk.
    pub code: String,
    pub name: String,
    #[serde(default)]
    pub action: Action,
}

/// Different actions for some callers: the first entry whose `tenant`
/// and `role` (each optional) match applies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    /// Category code → action.
    pub actions: BTreeMap<String, Action>,
}

/// `policies/guard.yaml`: categories and what they lead to, overrides,
/// what is sent and how much.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardPolicy {
    pub categories: Vec<Category>,
    /// A category a guard names that the policy does not list.
    #[serde(default)]
    pub unknown_category: Action,
    #[serde(default)]
    pub overrides: Vec<Override>,
    #[serde(default)]
    pub send: Messages,
    /// Characters sent at most: the end of the text is kept (the last
    /// turns matter most) and the cut is recorded.
    #[serde(default = "default_max_chars")]
    pub max_chars: usize,
}

fn default_max_chars() -> usize {
    16_000
}

impl GuardPolicy {
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in &self.categories {
            if c.code.is_empty() || !seen.insert(c.code.as_str()) {
                errors.push(format!(
                    "category '{}': codes must be present and unique",
                    c.code
                ));
            }
        }
        for (i, o) in self.overrides.iter().enumerate() {
            for code in o.actions.keys() {
                if !seen.contains(code.as_str()) {
                    errors.push(format!("overrides[{i}]: no category '{code}'"));
                }
            }
        }
        if self.max_chars == 0 {
            errors.push("max_chars must be above 0".into());
        }
        errors
    }

    /// `(code, name)` of every category, for a prompt built here.
    pub fn category_list(&self) -> Vec<(&str, &str)> {
        self.categories
            .iter()
            .map(|c| (c.code.as_str(), c.name.as_str()))
            .collect()
    }

    /// A category's name for messages (`S9: Indiscriminate Weapons`).
    pub fn describe(&self, code: &str) -> String {
        match self.categories.iter().find(|c| c.code == code) {
            Some(c) => format!("{}: {}", c.code, c.name),
            None => code.to_string(),
        }
    }

    /// What the categories a guard named lead to for this caller: the
    /// strictest of their actions, and the category that decided it.
    pub fn action(
        &self,
        named: &[String],
        principal: Option<&Principal>,
    ) -> (Action, Option<String>) {
        let o = self.overrides.iter().find(|o| {
            crate::request::Principal::fits(principal, o.tenant.as_deref(), o.role.as_deref())
        });
        let mut worst = (Action::Allow, None);
        for code in named {
            let action = o
                .and_then(|o| o.actions.get(code).copied())
                .or_else(|| {
                    self.categories
                        .iter()
                        .find(|c| c.code.eq_ignore_ascii_case(code))
                        .map(|c| c.action)
                })
                .unwrap_or(self.unknown_category);
            if action > worst.0 || worst.1.is_none() {
                worst = (action.max(worst.0), Some(code.clone()));
            }
        }
        worst
    }
}

/// The text of one message: a string, or its text parts joined.
fn message_text(m: &prompt::Message<'_>) -> Option<String> {
    let texts = m.texts();
    (!texts.is_empty()).then(|| texts.join("\n"))
}

/// Why a request cannot be judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unjudgeable(pub &'static str);

/// The turns of a chat request (or a completions prompt) to send, and
/// whether anything was cut to fit `max_chars`.
///
/// System and developer messages are the caller's too (the caller writes
/// the whole request) and are sent as user turns. With `last_user`, the
/// last user turn that has text is sent, with the system messages; an
/// assistant turn after it (a prefill the provider will continue) is
/// joined to it, since guards judge only the last turn. Text longer than
/// `max_chars` keeps its beginning and its end.
pub fn turns(
    prompt: &Prompt<'_>,
    send: Messages,
    max_chars: usize,
) -> Result<(Vec<Turn>, bool), Unjudgeable> {
    let mut all: Vec<Turn> = Vec::new();
    for m in &prompt.messages {
        let role = match m.role {
            prompt::Role::Assistant => Role::Assistant,
            prompt::Role::Tool => Role::Tool,
            prompt::Role::System | prompt::Role::User => Role::User,
        };
        if let Some(text) = message_text(m).filter(|t| !t.trim().is_empty()) {
            all.push(Turn { role, text });
        }
    }
    if prompt.messages.is_empty() && !prompt.inputs.is_empty() {
        // A completions prompt (and its suffix): one user turn.
        let mut parts: Vec<&str> = Vec::new();
        for input in &prompt.inputs {
            match input.value {
                Value::String(s) => parts.push(s),
                Value::Array(items) if items.iter().all(Value::is_string) => {
                    parts.extend(items.iter().filter_map(Value::as_str))
                }
                _ => return Err(Unjudgeable(
                    "a prompt given as token ids cannot be judged by the guard model; send text",
                )),
            }
        }
        all.push(Turn {
            role: Role::User,
            text: parts.join("\n"),
        });
    }
    // Guards judge the last turn: a trailing assistant turn (a prefill)
    // is read with the user turn before it.
    let last_user = all.iter().rposition(|t| t.role == Role::User);
    if let Some(u) = last_user {
        let tail: Vec<String> = all
            .drain(u + 1..)
            .filter(|t| t.role == Role::Assistant)
            .map(|t| t.text)
            .collect();
        if !tail.is_empty() {
            all[u].text = format!("{}\n{}", all[u].text, tail.join("\n"));
        }
    }
    let mut out: Vec<Turn> = match send {
        Messages::LastUser => {
            let mut out: Vec<Turn> = Vec::new();
            if let Some(u) = all.iter().rposition(|t| t.role == Role::User) {
                // The system messages (users too here) before it, joined.
                let mut text: Vec<&str> = all[..u]
                    .iter()
                    .filter(|t| t.role == Role::User && is_system_like(prompt, &t.text))
                    .map(|t| t.text.as_str())
                    .collect();
                text.push(&all[u].text);
                out.push(Turn {
                    role: Role::User,
                    text: text.join("\n"),
                });
            }
            out
        }
        Messages::Conversation => all.into_iter().filter(|t| t.role != Role::Tool).collect(),
        Messages::ConversationAndTools => all,
    };
    // Keep the beginning and the end: the first turn and as many of the
    // last as fit, then cut the middle of each kept turn to its share.
    let lens: Vec<usize> = out.iter().map(|t| t.text.chars().count()).collect();
    if lens.iter().sum::<usize>() <= max_chars {
        return Ok((out, false));
    }
    if out.len() > 2 {
        // Keep out[from..]: the last turn, and those before it that fit.
        let mut from = out.len() - 1;
        let mut room = max_chars.saturating_sub(lens[0]).saturating_sub(lens[from]);
        while from > 1 && lens[from - 1] <= room {
            room -= lens[from - 1];
            from -= 1;
        }
        let tail: Vec<Turn> = out.drain(from..).collect();
        out.truncate(1);
        out.extend(tail);
    }
    let mut left = max_chars;
    let n = out.len();
    for (i, t) in out.iter_mut().enumerate() {
        let share = left / (n - i);
        let len = t.text.chars().count();
        if len > share {
            let head = share / 2;
            let tail = share - head;
            let chars: Vec<char> = t.text.chars().collect();
            t.text = chars[..head]
                .iter()
                .chain(std::iter::once(&'\n'))
                .chain(chars[len - tail..].iter())
                .collect();
            left -= share;
        } else {
            left -= len;
        }
    }
    Ok((out, true))
}

/// Whether `text` is the text of one of the request's system (or
/// developer) messages.
fn is_system_like(prompt: &Prompt<'_>, text: &str) -> bool {
    prompt
        .messages
        .iter()
        .any(|m| m.role == prompt::Role::System && message_text(m).as_deref() == Some(text))
}

#[cfg(test)]
mod tests;
