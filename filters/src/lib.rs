//! Every decision Portcullis makes, with no proxy and no I/O.
//!
//! The gateway (`src/` in the workspace root) reads requests, talks to the
//! network and writes audit records; this crate decides. Each filter is one
//! module, returns a typed [`Decision`], and is run by the [`chain`] in the
//! order declared once by [`FilterKind`].

#![forbid(unsafe_code)]

pub mod admin_access;
pub mod approval;
pub mod chain;
pub mod clock;
pub mod dialect;
pub mod error;
pub mod guard;
pub mod injection;
pub mod intake;
pub mod json;
pub mod jwt_auth;
pub mod model_registry;
pub mod prompt;
pub mod provider;
pub mod rate_limit;
pub mod redact;
pub mod request;
pub mod response;
pub mod sharded;
pub mod shared;
pub mod sse;
pub mod tool_authz;

pub use chain::{
    Action, Annotation, Chain, ChainReport, Decision, Fact, FilterError, FilterKind, FilterOutcome,
    FilterSettings, Mode, OnError, RequestFilter, Verdict,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{untrusted, ErrorCode, Rejection};
pub use request::{Principal, RequestView, Route};
pub use response::{ResponseChain, ResponseContext, ResponseStage, ResponseStream, StreamStage};
pub use sse::{SseEvent, SseFramer};
