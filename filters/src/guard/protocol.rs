//! The guard protocols: what is sent to a guard and how its answer is
//! read. No I/O here: the gateway posts the bodies these build and hands
//! back what came back. Anything a parser does not understand is an
//! error, never "safe".

use super::Turn;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// What a guard said about what it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement {
    Safe,
    /// The categories it names (`S1`, `violence`, a risk name); may be
    /// empty when the guard gives none.
    Unsafe(Vec<String>),
}

/// A guard answered, but not in its protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the guard's answer could not be read: {0}")]
pub struct Unreadable(pub String);

fn unreadable(what: impl Into<String>) -> Unreadable {
    Unreadable(what.into())
}

/// How a Llama Guard is asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlamaGuardPrompt {
    /// The conversation as chat messages; the server's chat template adds
    /// the category list (vLLM, TGI, Groq, Together). Judges the last
    /// turn (Ollama's packaged template: only the last user message).
    #[default]
    Server,
    /// The whole Llama Guard prompt built here, with the policy's
    /// categories, sent to `/v1/completions`: custom categories, and the
    /// assistant's turn judged whatever the server's template does.
    Gateway,
}

/// How message content is written: Llama Guard 3 8B takes strings; 3 1B
/// and 4 take lists of text parts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentShape {
    #[default]
    String,
    Parts,
}

/// A request body for a Llama Guard behind an OpenAI-compatible server:
/// `(path, body)`.
pub fn llama_guard_request(
    model: &str,
    prompt: LlamaGuardPrompt,
    shape: ContentShape,
    turns: &[Turn],
    categories: &[(&str, &str)],
) -> (&'static str, Value) {
    match prompt {
        LlamaGuardPrompt::Server => {
            let messages: Vec<Value> = turns
                .iter()
                .map(|t| {
                    // Servers that parse special tokens inside message text
                    // (`<|eot_id|>…`) would let a turn close itself early.
                    let text = no_special_tokens(&t.text);
                    let content = match shape {
                        ContentShape::String => json!(text),
                        ContentShape::Parts => json!([{"type": "text", "text": text}]),
                    };
                    json!({"role": t.role.as_str(), "content": content})
                })
                .collect();
            (
                "/chat/completions",
                json!({"model": model, "messages": messages, "temperature": 0, "max_tokens": 32}),
            )
        }
        LlamaGuardPrompt::Gateway => (
            "/completions",
            json!({"model": model, "prompt": llama_guard_prompt(turns, categories),
                "temperature": 0, "max_tokens": 32}),
        ),
    }
}

/// The Llama Guard 3 prompt (Meta's model card format): the categories,
/// the conversation, and the question about its last turn's role.
pub fn llama_guard_prompt(turns: &[Turn], categories: &[(&str, &str)]) -> String {
    let role = match turns.last().map(|t| t.role) {
        Some(super::Role::Assistant) => "Agent",
        _ => "User",
    };
    let mut p = String::from("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n");
    p += &format!(
        "Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    );
    for (code, name) in categories {
        p += &format!("{code}: {name}.\n");
    }
    p += "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n";
    for t in turns {
        let who = match t.role {
            super::Role::Assistant => "Agent",
            _ => "User",
        };
        p += &format!("{who}: {}\n\n", neutral(&t.text));
    }
    p += &format!(
        "<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a comma-separated list of violated categories.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    p
}

/// A turn's text made unable to pose as the prompt's own structure: no
/// special tokens (`<|…|>`), no section markers, no line that starts a
/// turn (`User:`, `Agent:`) of its own.
fn neutral(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let lower = line.trim_start().to_ascii_lowercase();
        if lower.starts_with("user") || lower.starts_with("agent") || lower.starts_with('<') {
            out.push_str("| ");
        }
        out.push_str(line);
    }
    no_special_tokens(&out).replace(['<', '>'], " ")
}

/// Special-token spellings (`<|eot_id|>`, `<|start_header_id|>`) broken
/// up, so no server reads them as the template's own tokens.
fn no_special_tokens(text: &str) -> String {
    text.replace("<|", "< |").replace("|>", "| >")
}

/// The generated text of a chat or completions reply.
pub fn completion_text(reply: &Value) -> Result<&str, Unreadable> {
    let choice = reply
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| unreadable("no choices"))?;
    choice
        .pointer("/message/content")
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
        .ok_or_else(|| unreadable("no text in the first choice"))
}

/// `safe`, or `unsafe` and a line of categories (`S1,S10`), read
/// leniently: case, white space, a trailing period. Anything else is
/// unreadable.
pub fn parse_llama_guard(text: &str) -> Result<Judgement, Unreadable> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .ok_or_else(|| unreadable("empty answer"))?
        .trim_end_matches('.')
        .to_ascii_lowercase();
    match first.as_str() {
        "safe" => Ok(Judgement::Safe),
        "unsafe" => {
            // Unsafe is unsafe whatever follows: codes the policy does not
            // know (Llama Guard 1/2's `O1`, a name, a list cut short) are
            // passed on for its `unknown_category`.
            let categories = lines
                .next()
                .map(|line| {
                    line.split([',', ' '])
                        .map(|c| c.trim().trim_end_matches('.').to_ascii_uppercase())
                        .filter(|c| !c.is_empty())
                        .take(32)
                        .map(|c| c.chars().take(40).collect())
                        .collect()
                })
                .unwrap_or_default();
            Ok(Judgement::Unsafe(categories))
        }
        other => Err(unreadable(format!("first line {other:?}"))),
    }
}

/// An OpenAI moderation request (`omni-moderation-latest` shape).
pub fn moderation_request(model: &str, text: &str) -> (&'static str, Value) {
    ("/moderations", json!({"model": model, "input": text}))
}

/// A moderation reply: unsafe when a category's score reaches its
/// threshold (a category without a threshold: when the service flags it).
pub fn parse_moderation(
    reply: &Value,
    thresholds: &BTreeMap<String, f64>,
) -> Result<Judgement, Unreadable> {
    let results = reply
        .get("results")
        .and_then(Value::as_array)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| unreadable("no results"))?;
    let mut hit = Vec::new();
    for r in results {
        let categories = r
            .get("categories")
            .and_then(Value::as_object)
            .ok_or_else(|| unreadable("no categories"))?;
        let scores = r
            .get("category_scores")
            .and_then(Value::as_object)
            .ok_or_else(|| unreadable("no category_scores"))?;
        let flagged_result = r.get("flagged").and_then(Value::as_bool) == Some(true);
        let before = hit.len();
        for (name, flagged) in categories {
            let flagged = flagged
                .as_bool()
                .ok_or_else(|| unreadable(format!("category {name} is not a boolean")))?;
            let over = match (
                thresholds.get(name),
                scores.get(name).and_then(Value::as_f64),
            ) {
                (Some(t), Some(score)) => score >= *t,
                (Some(_), None) => return Err(unreadable(format!("no score for {name}"))),
                (None, _) => flagged,
            };
            if over && !hit.contains(name) {
                hit.push(name.clone());
            }
        }
        // Flagged with no category that counts: unsafe all the same.
        if flagged_result && hit.len() == before && thresholds.is_empty() {
            hit.push("unspecified".into());
        }
    }
    Ok(if hit.is_empty() {
        Judgement::Safe
    } else {
        Judgement::Unsafe(hit)
    })
}

/// A single-verdict classifier's answer for one risk: Granite Guardian
/// (`Yes` / `No`, or `<score> yes </score>` after an optional `<think>`
/// block in 3.3 and later) and ShieldGemma (an answer that starts with
/// `Yes` / `No`). `Yes` means the risk is present.
pub fn parse_yes_no(text: &str, risk: &str) -> Result<Judgement, Unreadable> {
    let mut t = text.trim();
    if let Some(after) = t
        .find("</think>")
        .map(|i| &t[i + "</think>".len()..])
        .filter(|_| t.trim_start().starts_with("<think>"))
    {
        t = after.trim();
    }
    if let Some(inner) = t
        .strip_prefix("<score>")
        .and_then(|rest| rest.split("</score>").next())
    {
        t = inner.trim();
    }
    let word: String = t
        .chars()
        .take_while(|c| c.is_alphabetic())
        .collect::<String>()
        .to_ascii_lowercase();
    match word.as_str() {
        "yes" => Ok(Judgement::Unsafe(vec![risk.to_string()])),
        "no" => Ok(Judgement::Safe),
        _ => Err(unreadable(format!(
            "expected Yes or No, got {:?}",
            first_chars(t)
        ))),
    }
}

fn first_chars(t: &str) -> String {
    t.chars().take(40).collect()
}

/// A single-verdict request: the conversation as chat messages, with the
/// risk named in a system message (Granite Guardian reads its risk from
/// the chat template's `guardian_config`; ShieldGemma from the prompt).
pub fn yes_no_request(model: &str, risk: &str, turns: &[Turn]) -> (&'static str, Value) {
    let mut messages = vec![json!({"role": "system", "content": risk})];
    messages.extend(
        turns
            .iter()
            .map(|t| json!({"role": t.role.as_str(), "content": t.text})),
    );
    (
        "/chat/completions",
        // Room for a `<think>` block before the verdict (Granite 3.3).
        json!({"model": model, "messages": messages, "temperature": 0, "max_tokens": 512,
            "chat_template_kwargs": {"guardian_config": {"risk_name": risk}}}),
    )
}
