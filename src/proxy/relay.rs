//! Relaying the provider's answer through the response stages: a whole
//! JSON reply, or an SSE stream event by event, with the output guard's
//! judgements on the way.

use super::output_guard::{route_event, Unjudged};
use super::{response_header, stage_context, total_tokens, upstream_rejection, Ctx, Gateway};
use crate::audit::Verdict;
use crate::config::GuardOutput;
use crate::upstream::{Exchange, UpstreamError};
use bytes::Bytes;
use filters::approval::Approvals;
use filters::dialect::StreamFacts;
use filters::dialect::{Bridged, StreamBridge};
use filters::provider::{keep_retry_headers, passes_through};
use filters::{ErrorCode, Rejection, ResponseStream, SseEvent, SseFramer};
use pingora::proxy::Session;
use serde_json::Value;

impl Gateway {
    pub(super) async fn relay_json(&self, s: &mut Session, ctx: &mut Ctx, mut ex: Exchange<'_>) {
        let d = ctx.dialect;
        let status = ex.status();
        if passes_through(status) {
            keep_retry_headers(&mut ctx.headers, |name| ex.header_str(name));
        }
        let body = ex.body(self.cfg.limits.max_response_bytes).await;
        ex.finish().await;
        ctx.upstream_done = Some(std::time::Instant::now());
        let body = match body {
            Ok(b) => b,
            Err(e) => return self.upstream_failed(s, ctx, &e).await,
        };
        if !(200..300).contains(&status) {
            if passes_through(status) {
                // The provider refused the request itself (a bad parameter,
                // its own rate limit): the client gets the provider's answer,
                // with when to retry.
                return self.reply_json(s, ctx, status, body).await;
            }
            let e = UpstreamError::Failed(format!("provider answered {status}"));
            return self.upstream_failed(s, ctx, &e).await;
        }
        let Ok(mut json @ Value::Object(_)) = serde_json::from_slice::<Value>(&body) else {
            let e = UpstreamError::Failed(
                "provider answered with a body that is not a JSON object".into(),
            );
            return self.upstream_failed(s, ctx, &e).await;
        };
        ctx.rec.usage = d.reply_usage(&json);
        let body = if self.responses.is_empty() {
            body
        } else {
            let holding = ctx.holding.clone();
            let approvals = holding.as_ref().map_or(Approvals::Off, Approvals::Hold);
            let rctx = stage_context(ctx, approvals);
            // The stages read one shape; a dialect with other replies is
            // carried there and back.
            let mut staged = match d.bridge() {
                Some(b) => b.reply_in(&json),
                None => std::mem::take(&mut json),
            };
            let (outcomes, rejection) = self.responses.on_json(&rctx, &mut staged);
            ctx.rec.filters.extend(outcomes);
            if let Some((kind, r)) = rejection {
                return self.refuse(s, ctx, kind.as_str(), r).await;
            }
            json = match d.bridge() {
                Some(b) => b.reply_out(&json, &staged),
                None => staged,
            };
            Bytes::from(json.to_string())
        };
        let body = if self.output_mode() != GuardOutput::Off {
            let mut unjudged = Unjudged::default();
            unjudged.push(d, &json);
            let (rejection, last) = self.judge_unjudged(ctx, &mut unjudged).await;
            ctx.rec.filters.extend(last);
            match rejection {
                Some(r) if r.code == ErrorCode::ContentPolicy => {
                    // As hosted providers end a filtered reply: 200, the
                    // content withheld, `finish_reason: content_filter`.
                    d.withhold(&mut json);
                    ctx.stage = Some("output_guard".into());
                    ctx.rec.reason_code = Some(ErrorCode::ContentPolicy);
                    ctx.rec.reason = Some(r.reason);
                    Bytes::from(json.to_string())
                }
                Some(r) => return self.refuse(s, ctx, "output_guard", r).await,
                None => body,
            }
        } else {
            body
        };
        // The reply goes out whole: what it held is stored now (a reply
        // whose notice names an approval that was never stored is not
        // sent).
        let held = ctx.holding.as_ref().is_some_and(|h| !h.is_empty())
            && ctx.rec.reason_code != Some(ErrorCode::ContentPolicy);
        if held {
            let id = ctx.holding.as_ref().map(|h| h.id().to_string());
            if let Err(r) = self.keep_held(ctx).await {
                return self.refuse(s, ctx, "approval", r).await;
            }
            if let Some(id) = id {
                ctx.headers.push((filters::approval::ID_HEADER, id));
            }
        }
        if self.cfg.audit.record_content {
            if let Some(Value::Object(c)) = ctx.rec.content.as_mut() {
                c.insert(
                    "response".into(),
                    serde_json::from_slice(&body).unwrap_or(Value::Null),
                );
            }
        }
        self.reply_json(s, ctx, status, body).await
    }

    /// Relay an SSE response event by event through the response stages.
    pub(super) async fn relay_stream(&self, s: &mut Session, ctx: &mut Ctx, mut ex: Exchange<'_>) {
        let d = ctx.dialect;
        let mut header = match response_header(200, ctx) {
            Ok(h) => h,
            Err(_) => return self.internal_error(s, ctx).await,
        };
        let _ = header.insert_header("content-type", "text/event-stream");
        let _ = header.insert_header("cache-control", "no-cache");
        if !s.is_http2() {
            let _ = header.insert_header("transfer-encoding", "chunked");
        }
        ctx.rec.status = 200;
        if s.write_response_header(Box::new(header), false)
            .await
            .is_err()
        {
            ctx.rec.client_gone = true;
            return ex.finish().await;
        }
        let holding = ctx.holding.clone();
        let approvals = holding.as_ref().map_or(Approvals::Off, Approvals::Hold);
        let rctx = stage_context(ctx, approvals);
        let mut stages = self.responses.stream(&rctx);
        let mut passage = Passage {
            bridge: d.bridge().map(|b| b.stream()),
        };
        // The output guard: what the model wrote and is not judged yet
        // (after the overlap kept from the last window), how much of it, the events held back (all of them in `held`
        // mode; the closing ones in `sampled`), the last verdict, and
        // whether the reply was cut.
        let output = self.output_mode();
        let window = self.output_piece();
        let mut unjudged = Unjudged::default();
        let mut held: Vec<SseEvent> = Vec::new();
        let mut last_outcome: Option<filters::FilterOutcome> = None;
        let mut filtered = false;
        let mut framer = SseFramer::new();
        let mut wire = Vec::with_capacity(4096);
        let mut seen = StreamFacts::default();
        let mut failure: Option<Rejection> = None;
        let broken = |why: String| Rejection::new(ErrorCode::UpstreamError, why);
        'read: loop {
            let chunk = match ex.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    failure = Some(upstream_rejection(&e));
                    break;
                }
            };
            let events = match framer.push(&chunk) {
                Ok(ev) => ev,
                Err(e) => {
                    failure = Some(broken(format!("broken SSE from provider: {e}")));
                    break;
                }
            };
            wire.clear();
            for event in events {
                if let Err(why) = d.note_event(&event, &mut seen) {
                    // Fail closed: nothing unscreened reaches the client.
                    failure = Some(broken(why));
                    break 'read;
                }
                if ctx.strip_usage && d.is_usage_only(&event) {
                    continue;
                }
                for out in passage.push(&mut stages, event) {
                    route_event(d, output, out, &mut unjudged, &mut held, &mut wire);
                }
            }
            if let Some((_, r)) = stages.stopped() {
                failure = Some(r.clone());
                break;
            }
            if output != GuardOutput::Off && unjudged.chars >= window {
                let (r, outcome) = self.judge_unjudged(ctx, &mut unjudged).await;
                last_outcome = outcome.or(last_outcome);
                match r {
                    Some(r) if r.code == ErrorCode::ContentPolicy => {
                        filtered = true;
                        break;
                    }
                    Some(r) => {
                        failure = Some(r);
                        break;
                    }
                    None => {}
                }
                if output == GuardOutput::Held {
                    for e in held.drain(..) {
                        e.write_to(&mut wire);
                    }
                }
            }
            if !wire.is_empty()
                && s.write_response_body(Some(Bytes::copy_from_slice(&wire)), false)
                    .await
                    .is_err()
            {
                // The client left: stop reading, close the provider connection.
                ctx.rec.client_gone = true;
                break;
            }
            ctx.rec.response_bytes += wire.len();
        }
        wire.clear();
        if !ctx.rec.client_gone && failure.is_none() && !filtered {
            match framer.finish() {
                Ok(Some(event)) => match d.note_event(&event, &mut seen) {
                    Ok(()) => {
                        for out in passage.push(&mut stages, event) {
                            route_event(d, output, out, &mut unjudged, &mut held, &mut wire);
                        }
                    }
                    Err(why) => failure = Some(broken(why)),
                },
                Ok(None) => {}
                Err(e) => failure = Some(broken(format!("broken SSE from provider: {e}"))),
            }
            if failure.is_none() {
                for out in passage.finish(&mut stages) {
                    route_event(d, output, out, &mut unjudged, &mut held, &mut wire);
                }
            }
            // The last judgement, before anything held is released.
            if output != GuardOutput::Off && failure.is_none() {
                if unjudged.chars > 0 {
                    let (r, outcome) = self.judge_unjudged(ctx, &mut unjudged).await;
                    last_outcome = outcome.or(last_outcome);
                    match r {
                        Some(r) if r.code == ErrorCode::ContentPolicy => filtered = true,
                        Some(r) => failure = Some(r),
                        None => {}
                    }
                }
                if !filtered && failure.is_none() {
                    for e in held.drain(..) {
                        e.write_to(&mut wire);
                    }
                }
            }
            if let Some((_, r)) = stages.stopped() {
                failure = Some(r.clone());
            } else if failure.is_none() && !seen.done {
                failure = Some(broken("provider stream ended before its end marker".into()));
            }
        }
        if filtered || (output != GuardOutput::Off && failure.is_some()) {
            // Nothing judged unsafe, or not judged, goes out: what the
            // end of the stream brought is dropped with what was held.
            wire.clear();
            held.clear();
        }
        if filtered {
            // Cut the way the API's own providers end a filtered stream
            // (the dialect's closing events). In `sampled` mode what came
            // before has been sent.
            let n = ctx.request_json.as_ref().map_or(1, |j| d.choices(j));
            for e in d.withheld_end(ctx.rec.model.as_deref(), n) {
                e.write_to(&mut wire);
            }
            ctx.rec.reason_code = Some(ErrorCode::ContentPolicy);
            ctx.rec.reason = Some("the output guard judged the reply unsafe".into());
            ctx.stage = Some("output_guard".into());
        }
        ex.finish().await;
        ctx.upstream_done = Some(std::time::Instant::now());
        ctx.rec.usage = seen.usage;
        ctx.generated_chars = Some(seen.generated_chars);
        ctx.rec.filters.extend(stages.outcomes());
        ctx.rec.filters.extend(last_outcome);
        if ctx.rec.client_gone {
            ctx.rec.decision = Verdict::Error;
            ctx.rec.reason = Some("client disconnected mid-stream".into());
            return;
        }
        if failure.is_none() && !filtered {
            // The stream reached its end: what it held is stored.
            if let Err(r) = self.keep_held(ctx).await {
                failure = Some(r);
            }
        }
        if let Some(r) = failure {
            // Headers are gone: end the stream with an error event the SDKs
            // raise on, and record why.
            d.error_event(&r).write_to(&mut wire);
            let stage = match (stages.stopped(), r.code) {
                (Some((kind, _)), _) => kind.as_str(),
                (_, ErrorCode::UpstreamError | ErrorCode::UpstreamTimeout) => "upstream",
                (_, ErrorCode::ApprovalUnavailable) => "approval",
                _ => "output_guard",
            };
            ctx.stage = Some(stage.into());
            ctx.rec.decision = Verdict::Error;
            ctx.rec.reason_code = Some(r.code);
            ctx.rec.reason = Some(r.reason);
            // Only the provider's own failure is an upstream error.
            if stage == "upstream" {
                if let Some(u) = ctx.rec.upstream.as_mut() {
                    u.error = ctx.rec.reason.clone();
                }
            }
        }
        ctx.rec.response_bytes += wire.len();
        let used = total_tokens(ctx);
        self.settle(ctx, used).await;
        let last = (!wire.is_empty()).then(|| Bytes::from(wire));
        if s.write_response_body(last, true).await.is_err() {
            ctx.rec.client_gone = true;
        }
    }
}

/// A stream's events through the response stages, by way of the
/// dialect's bridge when its events are not in the stages' shape
/// (`filters::dialect::Bridge`).
struct Passage {
    bridge: Option<Box<dyn StreamBridge>>,
}

impl Passage {
    /// One upstream event; the events for the client, in order.
    fn push(&mut self, stages: &mut ResponseStream, event: SseEvent) -> Vec<SseEvent> {
        let Some(b) = self.bridge.as_mut() else {
            return stages.push(event);
        };
        let mut out = Vec::new();
        for item in b.inbound(event) {
            // Once a stage stopped the stream, nothing more goes out.
            if stages.stopped().is_some() {
                return Vec::new();
            }
            match item {
                Bridged::Stages(e) => {
                    for staged in stages.push(e) {
                        out.extend(b.outbound(staged));
                    }
                }
                Bridged::Around(e) => out.push(b.around(e)),
            }
        }
        if stages.stopped().is_some() {
            return Vec::new();
        }
        out
    }

    /// The upstream stream ended: what the stages still held.
    fn finish(&mut self, stages: &mut ResponseStream) -> Vec<SseEvent> {
        let staged = stages.finish();
        match self.bridge.as_mut() {
            None => staged,
            Some(b) => staged.into_iter().flat_map(|e| b.outbound(e)).collect(),
        }
    }
}
