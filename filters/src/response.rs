//! The response chain: stages that see whole JSON bodies, and per-stream
//! stages that see SSE events one at a time and may hold, rewrite or drop
//! them. As on the request side, `mode` and `on_error` are applied here.
//!
//! In `monitor` mode a stage is fed a copy and its output is discarded, so
//! the audit record shows what it would have changed while the client gets
//! the provider's bytes.

use crate::chain::{
    apply, Annotation, Decision, FilterError, FilterKind, FilterOutcome, FilterSettings, Mode,
};
use crate::error::Rejection;
use crate::request::Route;
use crate::sse::SseEvent;
use std::time::Instant;

/// The most one stage holds of one stream besides text runs that may be
/// secrets (tool-call arguments until the call is complete, audio until
/// its transcript is screened, events of a choice with tool calls). Over
/// it the stream is stopped with `unscreenable_output`: a stage never
/// releases what it could not check, and never grows without bound.
pub const MAX_STREAM_HOLD: usize = 8 << 20;

/// What a response stage knows about the exchange.
#[derive(Debug, Clone, Copy)]
pub struct ResponseContext<'a> {
    pub request_id: &'a str,
    pub route: Route,
    pub model: Option<&'a str>,
    /// The caller, when authenticated.
    pub principal: Option<&'a crate::request::Principal>,
    /// What happens to calls of `approval_required` tools.
    pub approvals: crate::approval::Approvals<'a>,
}

/// One response-side filter.
pub trait ResponseStage: Send + Sync {
    fn kind(&self) -> FilterKind;
    /// Inspect, and possibly rewrite, a whole JSON response body.
    fn on_json(
        &self,
        ctx: &ResponseContext<'_>,
        body: &mut serde_json::Value,
    ) -> Result<Decision, FilterError>;
    /// Per-stream state for an SSE response.
    fn stream(&self, ctx: &ResponseContext<'_>) -> Box<dyn StreamStage>;
}

/// The state one stage keeps for one SSE response.
pub trait StreamStage: Send {
    /// Consume one event; push whatever should go on (nothing to hold it).
    fn on_event(&mut self, event: SseEvent, out: &mut Vec<SseEvent>) -> Result<(), FilterError>;
    /// The upstream stream ended: release anything held.
    fn finish(&mut self, out: &mut Vec<SseEvent>) -> Result<(), FilterError>;
    /// Facts for the audit record (counts, never content).
    fn report(&self) -> Vec<Annotation>;
}

/// The ordered response stages.
#[derive(Default)]
pub struct ResponseChain {
    stages: Vec<(Box<dyn ResponseStage>, FilterSettings)>,
}

impl ResponseChain {
    pub fn new(mut stages: Vec<(Box<dyn ResponseStage>, FilterSettings)>) -> Self {
        stages.sort_by_key(|(s, _)| s.kind());
        Self { stages }
    }

    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Run every stage over a JSON body. Returns the outcomes and, if an
    /// enforcing stage refused the response, the rejection.
    pub fn on_json(
        &self,
        ctx: &ResponseContext<'_>,
        body: &mut serde_json::Value,
    ) -> (Vec<FilterOutcome>, Option<(FilterKind, Rejection)>) {
        let mut outcomes = Vec::with_capacity(self.stages.len());
        for (stage, settings) in &self.stages {
            let started = Instant::now();
            let result = match settings.mode {
                Mode::Enforce => stage.on_json(ctx, body),
                Mode::Monitor => stage.on_json(ctx, &mut body.clone()),
            };
            let (outcome, rejection) = apply(stage.kind(), *settings, result, elapsed_us(started));
            outcomes.push(outcome);
            if let Some(rejection) = rejection {
                return (outcomes, Some((stage.kind(), rejection)));
            }
        }
        (outcomes, None)
    }

    /// Start the per-stream state of every stage.
    pub fn stream(&self, ctx: &ResponseContext<'_>) -> ResponseStream {
        ResponseStream {
            stages: self
                .stages
                .iter()
                .map(|(stage, settings)| StageRun {
                    kind: stage.kind(),
                    settings: *settings,
                    state: stage.stream(ctx),
                    error: None,
                    busy_us: 0,
                })
                .collect(),
            stopped: None,
        }
    }
}

struct StageRun {
    kind: FilterKind,
    settings: FilterSettings,
    state: Box<dyn StreamStage>,
    error: Option<FilterError>,
    busy_us: u64,
}

/// One SSE response passing through the response stages.
pub struct ResponseStream {
    stages: Vec<StageRun>,
    stopped: Option<(FilterKind, Rejection)>,
}

impl ResponseStream {
    /// Feed one upstream event; returns the events to send to the client.
    pub fn push(&mut self, event: SseEvent) -> Vec<SseEvent> {
        self.pass(vec![event], false)
    }

    /// The upstream stream ended; returns whatever the stages still held.
    pub fn finish(&mut self) -> Vec<SseEvent> {
        self.pass(Vec::new(), true)
    }

    /// Set when an enforcing stage failed with `on_error: deny`: the gateway
    /// must end the stream with an error event and send nothing more.
    pub fn stopped(&self) -> Option<&(FilterKind, Rejection)> {
        self.stopped.as_ref()
    }

    /// Per-stage outcomes for the audit record.
    pub fn outcomes(&self) -> Vec<FilterOutcome> {
        self.stages
            .iter()
            .map(|run| {
                let result = match &run.error {
                    Some(e) => Err(e.clone()),
                    None => Ok(match run.state.report() {
                        a if a.is_empty() => Decision::Allow,
                        a => Decision::Annotate(a),
                    }),
                };
                apply(run.kind, run.settings, result, run.busy_us).0
            })
            .collect()
    }

    fn pass(&mut self, mut events: Vec<SseEvent>, finish: bool) -> Vec<SseEvent> {
        if self.stopped.is_some() {
            return Vec::new();
        }
        for run in &mut self.stages {
            if run.error.is_some() {
                // A failed stage that fails open is skipped from then on.
                continue;
            }
            let started = Instant::now();
            let mut out = Vec::with_capacity(events.len());
            let mut result = Ok(());
            let input = match run.settings.mode {
                Mode::Enforce => std::mem::take(&mut events),
                Mode::Monitor => events.clone(),
            };
            for event in input {
                result = run.state.on_event(event, &mut out);
                if result.is_err() {
                    break;
                }
            }
            if finish && result.is_ok() {
                result = run.state.finish(&mut out);
            }
            run.busy_us += elapsed_us(started);
            if run.settings.mode == Mode::Enforce {
                events = out;
            }
            if let Err(error) = result {
                let (_, rejection) = apply(run.kind, run.settings, Err(error.clone()), 0);
                run.error = Some(error);
                if let Some(rejection) = rejection {
                    self.stopped = Some((run.kind, rejection));
                    return Vec::new();
                }
            }
        }
        events
    }
}

fn elapsed_us(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{Action, OnError};
    use crate::error::ErrorCode;
    use serde_json::json;

    /// Upper-cases `choices[0].delta.content` / `message.content` and counts
    /// what it touched; fails on the event or body whose content is "boom".
    struct Upper;
    struct UpperStream(u64);

    fn upper(v: &mut serde_json::Value, pointer: &str) -> Result<bool, FilterError> {
        match v.pointer_mut(pointer) {
            Some(serde_json::Value::String(s)) if s == "boom" => {
                Err(FilterError::new(ErrorCode::FilterUnavailable, "boom"))
            }
            Some(serde_json::Value::String(s)) => {
                *s = s.to_uppercase();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    impl ResponseStage for Upper {
        fn kind(&self) -> FilterKind {
            FilterKind::Redact
        }
        fn on_json(
            &self,
            _: &ResponseContext<'_>,
            body: &mut serde_json::Value,
        ) -> Result<Decision, FilterError> {
            upper(body, "/choices/0/message/content")?;
            Ok(Decision::Annotate(vec![Annotation {
                key: "changed",
                value: json!(1),
            }]))
        }
        fn stream(&self, _: &ResponseContext<'_>) -> Box<dyn StreamStage> {
            Box::new(UpperStream(0))
        }
    }

    impl StreamStage for UpperStream {
        fn on_event(
            &mut self,
            mut event: SseEvent,
            out: &mut Vec<SseEvent>,
        ) -> Result<(), FilterError> {
            if let Some(v) = event.json_mut() {
                if upper(v, "/choices/0/delta/content")? {
                    self.0 += 1;
                }
            }
            out.push(event);
            Ok(())
        }
        fn finish(&mut self, _: &mut Vec<SseEvent>) -> Result<(), FilterError> {
            Ok(())
        }
        fn report(&self) -> Vec<Annotation> {
            vec![Annotation {
                key: "changed",
                value: json!(self.0),
            }]
        }
    }

    fn ctx() -> ResponseContext<'static> {
        ResponseContext {
            request_id: "r",
            route: Route::ChatCompletions,
            model: None,
            principal: None,
            approvals: Default::default(),
        }
    }
    fn chain(mode: Mode, on_error: OnError) -> ResponseChain {
        ResponseChain::new(vec![(Box::new(Upper), FilterSettings { mode, on_error })])
    }
    fn delta(text: &str) -> SseEvent {
        SseEvent::data(json!({"choices": [{"delta": {"content": text}}]}).to_string())
    }
    fn content(e: &SseEvent) -> String {
        e.json().unwrap()["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn json_enforce_rewrites_and_monitor_does_not() {
        let original = json!({"choices": [{"message": {"content": "hi"}}]});
        let mut body = original.clone();
        let (outcomes, rejection) = chain(Mode::Enforce, OnError::Deny).on_json(&ctx(), &mut body);
        assert!(rejection.is_none());
        assert_eq!(body["choices"][0]["message"]["content"], "HI");
        assert_eq!(outcomes[0].action, Action::Annotate);

        let mut body = original.clone();
        let (outcomes, _) = chain(Mode::Monitor, OnError::Deny).on_json(&ctx(), &mut body);
        assert_eq!(body, original);
        assert_eq!(outcomes[0].action, Action::Annotate);
    }

    #[test]
    fn json_error_fails_closed_or_open_as_configured() {
        let mut body = json!({"choices": [{"message": {"content": "boom"}}]});
        let (_, rejection) = chain(Mode::Enforce, OnError::Deny).on_json(&ctx(), &mut body);
        assert_eq!(rejection.unwrap().1.code, ErrorCode::FilterUnavailable);
        let (outcomes, rejection) = chain(Mode::Enforce, OnError::Allow).on_json(&ctx(), &mut body);
        assert!(rejection.is_none());
        assert_eq!(outcomes[0].action, Action::Error);
    }

    #[test]
    fn stream_enforce_rewrites_each_event_and_reports() {
        let mut s = chain(Mode::Enforce, OnError::Deny).stream(&ctx());
        let out: Vec<_> = ["a", "b"].iter().flat_map(|t| s.push(delta(t))).collect();
        assert_eq!(out.iter().map(content).collect::<Vec<_>>(), ["A", "B"]);
        assert!(s.finish().is_empty());
        assert_eq!(s.outcomes()[0].annotations[0].value, json!(2));
    }

    #[test]
    fn stream_monitor_passes_original_events() {
        let mut s = chain(Mode::Monitor, OnError::Deny).stream(&ctx());
        let out = s.push(delta("a"));
        assert_eq!(content(&out[0]), "a");
        assert_eq!(s.outcomes()[0].annotations[0].value, json!(1));
    }

    #[test]
    fn stream_error_stops_when_failing_closed() {
        let mut s = chain(Mode::Enforce, OnError::Deny).stream(&ctx());
        assert_eq!(s.push(delta("a")).len(), 1);
        assert!(s.push(delta("boom")).is_empty());
        assert!(s.stopped().is_some());
        assert!(s.push(delta("c")).is_empty(), "nothing after a stop");
        assert_eq!(s.outcomes()[0].action, Action::Error);
    }

    #[test]
    fn stream_error_fails_open_when_configured() {
        let mut s = chain(Mode::Enforce, OnError::Allow).stream(&ctx());
        s.push(delta("boom"));
        assert!(s.stopped().is_none());
        assert_eq!(
            content(&s.push(delta("c"))[0]),
            "c",
            "stage skipped after its error"
        );
    }
}
