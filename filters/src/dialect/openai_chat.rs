//! OpenAI Chat Completions: `POST /v1/chat/completions`.

use super::openai::OpenAi;
use crate::Route;
use serde_json::json;

pub const CHAT: OpenAi = OpenAi {
    route: Route::ChatCompletions,
    path: "/chat/completions",
    stream_usage: true,
    generates: true,
    cut_chunk: ("chat.completion.chunk", "chatcmpl-filtered"),
    cut_choice: |index| json!({"index": index, "delta": {}, "finish_reason": "content_filter"}),
};
