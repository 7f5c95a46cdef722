//! Wire formats. Each API the gateway speaks is one module that knows the
//! fields of its requests and replies, its stream events and its error
//! shape; the proxy service asks the dialect of a request and reads no
//! field of a particular API itself, and the filters see what the dialect
//! makes of a request, never its wire form.
//!
//! - [`openai_chat`]: `POST /v1/chat/completions`
//! - [`openai_completions`]: `POST /v1/completions` (legacy)
//! - [`openai_embeddings`]: `POST /v1/embeddings`
//! - [`openai`]: what the three share (errors, usage, replies, streams),
//!   and `GET /v1/models`
//! - [`anthropic_messages`]: Anthropic's `POST /v1/messages` and
//!   `POST /v1/messages/count_tokens`
//!
//! A new format (another provider's API) is one more module implementing
//! [`Dialect`] and one more row in the gateway's route table.

pub mod anthropic_messages;
pub mod openai;
pub mod openai_chat;
pub mod openai_completions;
pub mod openai_embeddings;

use crate::approval::Approval;
use crate::intake::{CallBody, Shape};
use crate::prompt::Prompt;
use crate::{Rejection, Route, SseEvent};
use serde_json::Value;

/// How to rewrite a screened request for the provider.
#[derive(Debug, Default)]
pub struct Forward<'a> {
    /// The provider's name for the model.
    pub model: &'a str,
    /// Ask the provider to report usage at the end of a stream (the
    /// gateway settles a token budget from it; the client did not ask).
    pub ask_usage: bool,
    /// Declared tools to remove (tool policy).
    pub strip_tools: &'a [String],
}

/// What the gateway learns from a streamed reply, event by event.
#[derive(Debug, Default)]
pub struct StreamFacts {
    /// The usage the provider reported, in the dialect's shape.
    pub usage: Option<Value>,
    /// The stream ended properly (OpenAI: `data: [DONE]`).
    pub done: bool,
    /// Characters generated so far, to settle a budget with when no
    /// usage comes.
    pub generated_chars: u64,
}

/// The API a provider speaks, as a dialect needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderApi {
    OpenAi,
    Anthropic,
}

/// One API's wire format.
pub trait Dialect: Send + Sync {
    /// The route, as records, metrics and filters name it.
    fn route(&self) -> Route;

    /// The API the provider must speak for this format to be forwarded.
    fn provider_api(&self) -> ProviderApi {
        ProviderApi::OpenAi
    }

    /// The path below the provider's base URL (`/v1`).
    fn upstream_path(&self) -> &'static str;

    /// Check and parse a request body.
    fn parse(&self, body: &[u8], shape: &Shape) -> Result<CallBody, Rejection>;

    /// What the filters read of a parsed request.
    fn prompt<'a>(&self, request: &'a Value) -> Prompt<'a>;

    /// Whether a streamed request should ask the provider for usage
    /// because the client did not.
    fn needs_usage_request(&self, request: &Value) -> bool;

    /// Whether forwarding needs the body rewritten (else its bytes go as
    /// they came).
    fn needs_rewrite(&self, request: &CallBody, forward: &Forward<'_>) -> bool {
        forward.model != request.model || forward.ask_usage || !forward.strip_tools.is_empty()
    }

    /// Rewrite a request body for the provider.
    fn forward(&self, request: &mut Value, forward: &Forward<'_>);

    /// How many replies (choices) the request asked for.
    fn choices(&self, request: &Value) -> u64;

    /// The usage a whole reply reports.
    fn reply_usage(&self, reply: &Value) -> Option<Value>;

    /// Tokens used in all, from usage in this dialect's shape.
    fn total_tokens(&self, usage: &Value) -> Option<u64>;

    /// Input and output tokens, from usage in this dialect's shape (for
    /// the spend metrics; input includes cached input).
    fn token_counts(&self, usage: &Value) -> Option<(u64, u64)>;

    /// Note one upstream stream event. An event the gateway cannot screen
    /// (data that is neither the end marker nor a JSON object) is an
    /// error: the stream is ended, not relayed.
    fn note_event(&self, event: &SseEvent, facts: &mut StreamFacts) -> Result<(), String>;

    /// An event carrying only the usage the gateway asked for (kept from
    /// a client that did not ask).
    fn is_usage_only(&self, event: &SseEvent) -> bool;

    /// An event that closes a reply (its end marker, a finish, the usage
    /// after it): held back by the output guard until the last judgement.
    fn is_closing(&self, event: &SseEvent) -> bool;

    /// An event that opens a reply and carries no generated text: never
    /// held by the output guard (a cut reply still needs it first).
    fn is_opening(&self, _event: &SseEvent) -> bool {
        false
    }

    /// Every text a reply (or one stream event) generated, per choice:
    /// what the output guard judges.
    fn reply_texts(&self, reply: &Value) -> Vec<(u64, String)>;

    /// Withhold a whole reply the output guard judged unsafe, the way the
    /// API's own providers do.
    fn withhold(&self, reply: &mut Value);

    /// The events that end a stream the output guard cut.
    fn withheld_end(&self, model: Option<&str>, choices: u64) -> Vec<SseEvent>;

    /// A rejection as this API's error body.
    fn error_body(&self, rejection: &Rejection) -> Vec<u8>;

    /// A rejection as one stream event, for a stream already under way.
    fn error_event(&self, rejection: &Rejection) -> SseEvent;

    /// Client headers passed on to the provider (an API version, beta
    /// flags).
    fn passed_headers(&self) -> &'static [&'static str] {
        &[]
    }

    /// For a dialect whose replies are not in the response stages' shape:
    /// how they are carried there and back.
    fn bridge(&self) -> Option<&dyn Bridge> {
        None
    }

    /// An approved call handed out (`crate::approval`): the reply the
    /// provider would have given with only the held calls, whole or as
    /// stream events as `request` asks, in the response stages' shape.
    /// `None`: this API's replies are not replayed, so its calls to
    /// `approval_required` tools are refused rather than held.
    fn replay(&self, _approval: &Approval, _request: &Value) -> Option<Replayed> {
        None
    }

    /// Whether calls to `approval_required` tools are held on this route
    /// (the dialect can [`replay`](Dialect::replay) them).
    fn holds_calls(&self) -> bool {
        false
    }
}

/// An approved call as a reply.
#[derive(Debug)]
pub enum Replayed {
    Json(Value),
    Events(Vec<SseEvent>),
}

/// The response stages (redaction, tool authorization) read replies in
/// one shape, Chat Completions': `choices` with `message` (or a stream's
/// `delta`) `content`, `reasoning_content` and `tool_calls`, and a
/// `finish_reason` that closes a choice. A dialect with other replies
/// carries them there and back through a bridge; its own events that
/// carry no generated text go around the stages, in order.
pub trait Bridge: Send + Sync {
    /// A whole reply in the stages' shape.
    fn reply_in(&self, reply: &Value) -> Value;
    /// The reply rebuilt from what the stages left of it (`staged`), the
    /// provider's `original` giving everything they do not see.
    fn reply_out(&self, original: &Value, staged: &Value) -> Value;
    /// The translator of one stream.
    fn stream(&self) -> Box<dyn StreamBridge>;
}

/// Where an upstream event goes.
#[derive(Debug)]
pub enum Bridged {
    /// Through the response stages (in their shape).
    Stages(SseEvent),
    /// Around them, to the client as it is (after what the stages
    /// released before it).
    Around(SseEvent),
}

/// One stream's translation to the stages' shape and back.
pub trait StreamBridge: Send {
    /// An upstream event.
    fn inbound(&mut self, event: SseEvent) -> Vec<Bridged>;
    /// An event the stages let through, in the dialect's events.
    fn outbound(&mut self, event: SseEvent) -> Vec<SseEvent>;
    /// An event that went around the stages, as it goes to the client
    /// (a stop reason corrected when the stages removed a tool call).
    fn around(&mut self, event: SseEvent) -> SseEvent {
        event
    }
}

/// The dialect errors are written in before a request's own is known.
pub const DEFAULT: &dyn Dialect = &openai_chat::CHAT;

/// The dialect of a route (the admin API's simulation names routes;
/// tests build views with it).
pub fn for_route(route: Route) -> Option<&'static dyn Dialect> {
    match route {
        Route::ChatCompletions => Some(&openai_chat::CHAT),
        Route::Completions => Some(&openai_completions::COMPLETIONS),
        Route::Embeddings => Some(&openai_embeddings::EMBEDDINGS),
        Route::Messages => Some(&anthropic_messages::MESSAGES),
        Route::CountTokens => Some(&anthropic_messages::COUNT_TOKENS),
        Route::Models => None,
    }
}
