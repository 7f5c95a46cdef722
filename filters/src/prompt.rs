//! A request as the filters read it, whatever API it came in: the
//! request's dialect ([`crate::dialect`]) builds it from the parsed body,
//! and every filter reads the conversation, the tools and the limits here
//! instead of the body's fields.
//!
//! Texts are not copied: a message's `content` is the body's own value, a
//! string or a list of parts in which every part with a `text` string is
//! text (other parts are media, tool calls or results, read through their
//! own fields). A filter that rewrites a text (request redaction) writes
//! it back at the message's `at`, a JSON pointer into the body.

use serde_json::Value;
use std::borrow::Cow;

/// Who wrote a message, as the filters tell roles apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The caller's standing instructions (`system`, `developer`).
    System,
    /// The caller.
    User,
    /// The model, in an earlier turn the caller replays (or prefills).
    Assistant,
    /// A tool's result, text from elsewhere.
    Tool,
}

/// One message of the conversation.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub role: Role,
    /// A string, or parts of which those with a `text` string are text.
    pub content: Option<&'a Value>,
    /// Where `content` is in the body, as a JSON pointer.
    pub at: String,
    /// A name the message carries (a participant's or a tool's).
    pub name: Option<&'a str>,
    /// The tool calls an assistant message replays.
    pub calls: Vec<Call<'a>>,
    /// For a tool result: the id of the call it answers.
    pub answers: Option<&'a str>,
    /// The message as written, when it is one object of the body (every
    /// string in it is counted by the token estimate).
    pub raw: Option<&'a Value>,
}

impl<'a> Message<'a> {
    /// A message of `role` whose content is at `at`.
    pub fn new(role: Role, content: Option<&'a Value>, at: String) -> Self {
        Self {
            role,
            content,
            at,
            name: None,
            calls: Vec::new(),
            answers: None,
            raw: None,
        }
    }

    /// The text pieces of the content, in order.
    pub fn texts(&self) -> Vec<&'a str> {
        texts_of(self.content)
    }
}

/// The text pieces of a content value: a string, or the strings and the
/// `text` strings of a list of parts.
pub fn texts_of(content: Option<&Value>) -> Vec<&str> {
    match content {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| match p {
                Value::String(s) => Some(s.as_str()),
                Value::Object(o) => o.get("text").and_then(Value::as_str),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A tool call replayed in the conversation.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub id: Option<&'a str>,
    pub name: Cow<'a, str>,
    /// The arguments as the model wrote them (a JSON text, or a value).
    pub arguments: Option<&'a Value>,
}

/// A declared tool: its name (`None` when the declaration names none) and
/// the declaration as written (every string in it is read by the
/// injection screen).
#[derive(Debug, Clone)]
pub struct Tool<'a> {
    pub name: Option<Cow<'a, str>>,
    pub declaration: &'a Value,
}

/// Text the caller sends outside a conversation: a completions prompt or
/// suffix, an embeddings input.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// `prompt`, `suffix` or `input`.
    pub field: &'static str,
    /// A string, or a list of strings (or token ids, which no filter can
    /// read).
    pub value: &'a Value,
    /// Where it is in the body.
    pub at: String,
}

/// The request, as every filter reads it.
#[derive(Debug, Clone, Default)]
pub struct Prompt<'a> {
    /// The conversation in order, a system prompt kept apart by the API
    /// first.
    pub messages: Vec<Message<'a>>,
    /// Completions prompts and suffix, embeddings inputs.
    pub inputs: Vec<Input<'a>>,
    /// Declared tools.
    pub tools: Vec<Tool<'a>>,
    /// Other schemas the model is given (a response format): read by the
    /// injection screen like tool declarations.
    pub schemas: Vec<&'a Value>,
    /// Tools the request forces the model to call.
    pub forced: Vec<Cow<'a, str>>,
    /// The most tokens one reply may generate, when the request says.
    pub max_tokens: Option<u64>,
    /// Replies asked for (at least 1).
    pub choices: u64,
    /// Whether the API generates text (embeddings: vectors).
    pub generates: bool,
}

impl Prompt<'_> {
    /// A request with nothing to read (a bodiless route, the headers-only
    /// authentication pass).
    pub const EMPTY: Prompt<'static> = Prompt {
        messages: Vec::new(),
        inputs: Vec::new(),
        tools: Vec::new(),
        schemas: Vec::new(),
        forced: Vec::new(),
        max_tokens: None,
        choices: 1,
        generates: false,
    };
}

/// The empty prompt, to borrow.
pub static EMPTY: Prompt<'static> = Prompt::EMPTY;

/// The prompt of an OpenAI route's body, leaked to live as long as the
/// body: for tests that build request views by hand.
#[cfg(test)]
pub(crate) fn of(route: crate::Route, body: &Value) -> &Prompt<'_> {
    match crate::dialect::for_route(route) {
        Some(d) => Box::leak(Box::new(d.prompt(body))),
        None => &EMPTY,
    }
}
