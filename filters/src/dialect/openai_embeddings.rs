//! OpenAI Embeddings: `POST /v1/embeddings`. Never streamed (intake
//! refuses `stream`); its reply is vectors, no generated text.

use super::openai::OpenAi;
use crate::Route;
use serde_json::Value;

pub const EMBEDDINGS: OpenAi = OpenAi {
    route: Route::Embeddings,
    path: "/embeddings",
    stream_usage: false,
    generates: false,
    cut_chunk: ("list", "embeddings-filtered"),
    cut_choice: |_| Value::Null,
    replay: None,
};
