//! The request chain: filters run in one fixed order, and `mode` and
//! `on_error` are applied here, never by a filter.
//!
//! The order is the declaration order of [`FilterKind`]: cheap checks first,
//! the guard model (a network call) last. Whatever order filters are handed
//! to [`Chain::new`] in, they run in this one.

use crate::error::{ErrorCode, Rejection};
use crate::rate_limit::Reservation;
use crate::request::{Principal, RequestView};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Every filter the gateway knows, in the order the request chain runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterKind {
    JwtAuth,
    Freeze,
    RateLimit,
    ModelRegistry,
    ToolAuthz,
    Injection,
    GuardModel,
    RequestRedaction,
    // Response side.
    ResponseToolAuthz,
    Redact,
    OutputGuard,
}

impl FilterKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::JwtAuth => "jwt_auth",
            Self::Freeze => "freeze",
            Self::RateLimit => "rate_limit",
            Self::ModelRegistry => "model_registry",
            Self::ToolAuthz => "tool_authz",
            Self::Injection => "injection",
            Self::GuardModel => "guard_model",
            Self::RequestRedaction => "request_redaction",
            Self::ResponseToolAuthz => "response_tool_authz",
            Self::Redact => "redact",
            Self::OutputGuard => "output_guard",
        }
    }
}

/// `enforce` applies a filter's decision; `monitor` records what it would
/// have done and lets the request through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Monitor,
}

/// What to do when a filter cannot decide (its store or service is down):
/// `deny` (fail closed, the default) or `allow` (fail open).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Deny,
    Allow,
}

/// Per-filter settings from the config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSettings {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub on_error: OnError,
}

/// A fact a filter attaches to the audit record (a score, the rule ids that
/// matched, a count).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Annotation {
    pub key: &'static str,
    pub value: serde_json::Value,
}

/// What a filter decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow,
    /// Allow, and record these facts.
    Annotate(Vec<Annotation>),
    Deny(Rejection),
}

/// A fact a filter establishes for the rest of the exchange. The chain
/// applies facts whatever the filter's mode.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// The caller, for every later filter and the audit record.
    Principal(Principal),
    /// A header for the response to the client, allowed or refused
    /// (`x-ratelimit-*`, `Retry-After`, `WWW-Authenticate`).
    Header(&'static str, String),
    /// Tokens reserved from a budget, to settle once usage is known.
    Reservation(Reservation),
    /// Tools to remove from the request before it is forwarded.
    StripTools(Vec<String>),
    /// The request body to forward instead (request-side redaction).
    Body(serde_json::Value),
    /// Where the model is served: set by the model registry gate.
    Upstream {
        provider: String,
        upstream_model: String,
    },
    /// A fact for the audit record that stands whatever the decision (a
    /// refusal's score and rule ids).
    Note(Annotation),
}

/// A filter's decision and the facts it established.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub decision: Decision,
    pub facts: Vec<Fact>,
}

impl From<Decision> for Verdict {
    fn from(decision: Decision) -> Self {
        Self {
            decision,
            facts: Vec::new(),
        }
    }
}

impl Verdict {
    pub fn with(mut self, fact: Fact) -> Self {
        self.facts.push(fact);
        self
    }
}

/// A filter could not decide. The chain applies the filter's `on_error`,
/// except to a limit (see [`FilterError::limit`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct FilterError {
    /// The code used when `on_error: deny` turns this into a rejection
    /// (for example `guard_unavailable`).
    pub code: ErrorCode,
    pub reason: String,
    /// A safety limit was reached (not a dependency lost): an enforcing
    /// filter stops the request or stream whatever `on_error` says, since
    /// going on would pass something unchecked.
    pub limit: bool,
}

impl FilterError {
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            limit: false,
        }
    }

    /// A limit reached: enforced even with `on_error: allow`.
    pub fn limit(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            limit: true,
            ..Self::new(code, reason)
        }
    }
}

/// One request-side filter.
#[async_trait]
pub trait RequestFilter: Send + Sync {
    fn kind(&self) -> FilterKind;
    async fn check(&self, request: &RequestView<'_>) -> Result<Verdict, FilterError>;
}

/// A shared filter is still a filter (the gateway keeps a handle on the
/// rate limiter to settle token budgets).
#[async_trait]
impl<T: RequestFilter + ?Sized> RequestFilter for std::sync::Arc<T> {
    fn kind(&self) -> FilterKind {
        (**self).kind()
    }
    async fn check(&self, request: &RequestView<'_>) -> Result<Verdict, FilterError> {
        (**self).check(request).await
    }
}

/// What happened at one filter, for the audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Annotate,
    Deny,
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FilterOutcome {
    pub filter: FilterKind,
    pub mode: Mode,
    pub action: Action,
    /// True when this outcome stopped the request.
    pub enforced: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub annotations: Vec<Annotation>,
    pub latency_us: u64,
}

/// The result of running the chain.
#[derive(Debug, Clone, Default)]
pub struct ChainReport {
    pub outcomes: Vec<FilterOutcome>,
    /// Set when an enforcing filter refused the request; later filters did
    /// not run.
    pub rejection: Option<(FilterKind, Rejection)>,
    pub principal: Option<Principal>,
    /// Headers for the client's response, whatever it is.
    pub headers: Vec<(&'static str, String)>,
    pub reservations: Vec<Reservation>,
    /// `(provider, upstream model)` from the registry gate.
    pub upstream: Option<(String, String)>,
    /// Declared tools the caller may not use, to remove before forwarding.
    pub strip_tools: Vec<String>,
    /// A rewritten body to forward (request-side redaction).
    pub body: Option<serde_json::Value>,
}

/// The request chain.
#[derive(Default)]
pub struct Chain {
    filters: Vec<(Box<dyn RequestFilter>, FilterSettings)>,
}

impl Chain {
    /// Builds the chain; filters are put in [`FilterKind`] order.
    pub fn new(mut filters: Vec<(Box<dyn RequestFilter>, FilterSettings)>) -> Self {
        filters.sort_by_key(|(f, _)| f.kind());
        Self { filters }
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    pub async fn run(&self, request: &RequestView<'_>) -> ChainReport {
        self.run_filtered(request, |_| true).await
    }

    /// Run only the filters `keep` accepts, in the chain's order (the
    /// gateway runs the guard model beside the provider call this way).
    pub async fn run_filtered(
        &self,
        request: &RequestView<'_>,
        keep: impl Fn(FilterKind) -> bool,
    ) -> ChainReport {
        let mut report = ChainReport::default();
        for (filter, settings) in self.filters.iter().filter(|(f, _)| keep(f.kind())) {
            let view = RequestView {
                principal: report.principal.as_ref().or(request.principal),
                ..*request
            };
            let started = Instant::now();
            let result = filter.check(&view).await;
            let mut notes = Vec::new();
            let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let result = result.map(|verdict| {
                for fact in verdict.facts {
                    match fact {
                        Fact::Principal(p) => report.principal = Some(p),
                        Fact::Header(name, value) => report.headers.push((name, value)),
                        Fact::Reservation(r) => report.reservations.push(r),
                        Fact::StripTools(t) => report.strip_tools.extend(t),
                        Fact::Body(b) => report.body = Some(b),
                        Fact::Upstream {
                            provider,
                            upstream_model,
                        } => report.upstream = Some((provider, upstream_model)),
                        Fact::Note(a) => notes.push(a),
                    }
                }
                verdict.decision
            });
            let (mut outcome, rejection) = apply(filter.kind(), *settings, result, latency_us);
            outcome.annotations.extend(notes);
            report.outcomes.push(outcome);
            if let Some(rejection) = rejection {
                report.rejection = Some((filter.kind(), rejection));
                break;
            }
        }
        report
    }
}

/// Turns a filter's result into an audit outcome and, when it must stop the
/// request, a rejection. The only place `mode` and `on_error` are read.
pub(crate) fn apply(
    kind: FilterKind,
    settings: FilterSettings,
    result: Result<Decision, FilterError>,
    latency_us: u64,
) -> (FilterOutcome, Option<Rejection>) {
    let mut outcome = FilterOutcome {
        filter: kind,
        mode: settings.mode,
        action: Action::Allow,
        enforced: false,
        code: None,
        reason: None,
        annotations: Vec::new(),
        latency_us,
    };
    let enforcing = settings.mode == Mode::Enforce;
    let rejection = match result {
        Ok(Decision::Allow) => None,
        Ok(Decision::Annotate(annotations)) => {
            outcome.action = Action::Annotate;
            outcome.annotations = annotations;
            None
        }
        Ok(Decision::Deny(rejection)) => {
            outcome.action = Action::Deny;
            outcome.code = Some(rejection.code);
            outcome.reason = Some(rejection.reason.clone());
            enforcing.then_some(rejection)
        }
        Err(error) => {
            outcome.action = Action::Error;
            outcome.code = Some(error.code);
            outcome.reason = Some(error.reason.clone());
            (enforcing && (settings.on_error == OnError::Deny || error.limit))
                .then(|| Rejection::new(error.code, error.reason))
        }
    };
    outcome.enforced = rejection.is_some();
    (outcome, rejection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Route;
    use serde_json::json;

    /// A test filter that always returns the same result.
    struct Fixed(FilterKind, Result<Decision, FilterError>);

    #[async_trait]
    impl RequestFilter for Fixed {
        fn kind(&self) -> FilterKind {
            self.0
        }
        async fn check(&self, _: &RequestView<'_>) -> Result<Verdict, FilterError> {
            self.1.clone().map(Verdict::from)
        }
    }

    fn allow(kind: FilterKind) -> Fixed {
        Fixed(kind, Ok(Decision::Allow))
    }
    fn deny(kind: FilterKind) -> Fixed {
        Fixed(
            kind,
            Ok(Decision::Deny(Rejection::new(
                ErrorCode::PromptInjection,
                "rule x",
            ))),
        )
    }
    fn annotate(kind: FilterKind) -> Fixed {
        Fixed(
            kind,
            Ok(Decision::Annotate(vec![Annotation {
                key: "score",
                value: json!(0.5),
            }])),
        )
    }
    fn error(kind: FilterKind) -> Fixed {
        Fixed(
            kind,
            Err(FilterError::new(
                ErrorCode::GuardUnavailable,
                "connection refused",
            )),
        )
    }
    fn settings(mode: Mode, on_error: OnError) -> FilterSettings {
        FilterSettings { mode, on_error }
    }
    const ENFORCE: FilterSettings = FilterSettings {
        mode: Mode::Enforce,
        on_error: OnError::Deny,
    };
    const MONITOR: FilterSettings = FilterSettings {
        mode: Mode::Monitor,
        on_error: OnError::Deny,
    };

    async fn run(filters: Vec<(Fixed, FilterSettings)>) -> ChainReport {
        let chain = Chain::new(
            filters
                .into_iter()
                .map(|(f, s)| (Box::new(f) as Box<dyn RequestFilter>, s))
                .collect(),
        );
        let body = json!({"model": "m"});
        let view = RequestView {
            request_id: "r1",
            authorization: None,
            principal: None,
            dry_run: false,
            route: Route::ChatCompletions,
            body: &body,
            prompt: crate::prompt::of(Route::ChatCompletions, &body),
            model: Some("m"),
            stream: false,
            client_ip: None,
        };
        chain.run(&view).await
    }

    #[tokio::test]
    async fn runs_in_declared_order_whatever_the_input_order() {
        let report = run(vec![
            (allow(FilterKind::GuardModel), ENFORCE),
            (allow(FilterKind::JwtAuth), ENFORCE),
            (allow(FilterKind::Injection), ENFORCE),
            (allow(FilterKind::RateLimit), ENFORCE),
        ])
        .await;
        let order: Vec<_> = report.outcomes.iter().map(|o| o.filter).collect();
        assert_eq!(
            order,
            [
                FilterKind::JwtAuth,
                FilterKind::RateLimit,
                FilterKind::Injection,
                FilterKind::GuardModel
            ]
        );
        assert!(report.rejection.is_none());
    }

    #[tokio::test]
    async fn allow_in_both_modes_passes() {
        for s in [ENFORCE, MONITOR] {
            let report = run(vec![(allow(FilterKind::Injection), s)]).await;
            assert!(report.rejection.is_none());
            assert_eq!(report.outcomes[0].action, Action::Allow);
            assert_eq!(report.outcomes[0].mode, s.mode);
        }
    }

    #[tokio::test]
    async fn annotate_in_both_modes_passes_and_keeps_the_facts() {
        for s in [ENFORCE, MONITOR] {
            let report = run(vec![(annotate(FilterKind::Injection), s)]).await;
            assert!(report.rejection.is_none());
            assert_eq!(report.outcomes[0].action, Action::Annotate);
            assert_eq!(report.outcomes[0].annotations[0].key, "score");
        }
    }

    #[tokio::test]
    async fn deny_enforced_stops_the_chain() {
        let report = run(vec![
            (deny(FilterKind::Injection), ENFORCE),
            (allow(FilterKind::GuardModel), ENFORCE),
        ])
        .await;
        let (by, rejection) = report.rejection.expect("denied");
        assert_eq!(by, FilterKind::Injection);
        assert_eq!(rejection.code, ErrorCode::PromptInjection);
        assert_eq!(report.outcomes.len(), 1, "guard model must not run");
        assert!(report.outcomes[0].enforced);
    }

    #[tokio::test]
    async fn deny_in_monitor_mode_is_recorded_but_passes() {
        let report = run(vec![
            (deny(FilterKind::Injection), MONITOR),
            (allow(FilterKind::GuardModel), ENFORCE),
        ])
        .await;
        assert!(report.rejection.is_none());
        assert_eq!(report.outcomes.len(), 2);
        assert_eq!(report.outcomes[0].action, Action::Deny);
        assert_eq!(report.outcomes[0].code, Some(ErrorCode::PromptInjection));
        assert!(!report.outcomes[0].enforced);
    }

    #[tokio::test]
    async fn error_fails_closed_by_default() {
        let report = run(vec![(error(FilterKind::GuardModel), ENFORCE)]).await;
        let (by, rejection) = report.rejection.expect("fail closed");
        assert_eq!(by, FilterKind::GuardModel);
        assert_eq!(rejection.code, ErrorCode::GuardUnavailable);
        assert_eq!(report.outcomes[0].action, Action::Error);
    }

    #[tokio::test]
    async fn error_with_on_error_allow_fails_open() {
        let report = run(vec![(
            error(FilterKind::GuardModel),
            settings(Mode::Enforce, OnError::Allow),
        )])
        .await;
        assert!(report.rejection.is_none());
        assert_eq!(report.outcomes[0].action, Action::Error);
        assert_eq!(
            report.outcomes[0].reason.as_deref(),
            Some("connection refused")
        );
    }

    #[test]
    fn a_limit_is_enforced_even_with_on_error_allow() {
        let limit = FilterError::limit(ErrorCode::UnscreenableOutput, "held too much");
        for on_error in [OnError::Allow, OnError::Deny] {
            let (outcome, rejection) = apply(
                FilterKind::Redact,
                settings(Mode::Enforce, on_error),
                Err(limit.clone()),
                0,
            );
            assert_eq!(
                rejection.map(|r| r.code),
                Some(ErrorCode::UnscreenableOutput)
            );
            assert!(outcome.enforced);
        }
        let (_, rejection) = apply(
            FilterKind::Redact,
            settings(Mode::Monitor, OnError::Deny),
            Err(limit),
            0,
        );
        assert!(rejection.is_none(), "monitor mode never enforces");
    }

    #[tokio::test]
    async fn error_in_monitor_mode_passes_even_with_on_error_deny() {
        let report = run(vec![(error(FilterKind::GuardModel), MONITOR)]).await;
        assert!(report.rejection.is_none());
        assert_eq!(report.outcomes[0].action, Action::Error);
        assert!(!report.outcomes[0].enforced);
    }

    #[tokio::test]
    async fn empty_chain_allows() {
        let report = run(vec![]).await;
        assert!(report.rejection.is_none());
        assert!(report.outcomes.is_empty());
    }
}
