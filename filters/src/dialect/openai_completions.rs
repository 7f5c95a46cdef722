//! OpenAI's legacy Completions: `POST /v1/completions`. Its replies carry
//! `choices[].text`; otherwise it is Chat Completions' format.

use super::openai::OpenAi;
use crate::Route;
use serde_json::json;

pub const COMPLETIONS: OpenAi = OpenAi {
    route: Route::Completions,
    path: "/completions",
    stream_usage: true,
    generates: true,
    cut_chunk: ("text_completion", "cmpl-filtered"),
    cut_choice: |index| json!({"index": index, "text": "", "finish_reason": "content_filter", "logprobs": null}),
    replay: None,
};
