//! Approvals on the request path (`filters::approval` decides): storing
//! the calls a reply held, telling a webhook, and answering a request
//! repeated with `x-portcullis-approval` from the approved calls, without
//! a provider call.

use super::{response_header, Ctx, Gateway};
use crate::audit::ApprovalNote;
use crate::metrics;
use bytes::Bytes;
use filters::approval::{self, Approval, Approvals, HeldCall, Holding, NewApproval};
use filters::dialect::{Dialect, Replayed};
use filters::{Clock, ErrorCode, Rejection, SystemClock};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Posts a message for each new pending approval.
pub struct Webhook {
    url: String,
    client: reqwest::Client,
}

impl Webhook {
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("approvals.webhook_url: {e}"))?;
        Ok(Self {
            url: url.to_string(),
            client,
        })
    }

    /// Tell the webhook, in the background: Slack-compatible JSON (`text`)
    /// with the approval's summary beside it. No call arguments: they may
    /// hold what the approver alone should read (in the admin API).
    fn pending(self: &Arc<Self>, a: &Approval) {
        let text = format!(
            "Approval {id} pending: {sub} (tenant {tenant}) asks to run {tools} (model {model}). \
             Decide before {expires}: `portcullis approvals approve {id}` or `portcullis approvals deny {id} --reason ...`.",
            id = a.id,
            sub = slack_text(&a.subject),
            tenant = slack_text(&a.tenant),
            tools = slack_text(&a.tools.join(", ")),
            model = slack_text(&a.model),
            expires = a.expires_at,
        );
        let body = json!({"text": text, "approval": a.summary()});
        let hook = self.clone();
        tokio::spawn(async move {
            let sent = hook.client.post(&hook.url).json(&body).send().await;
            let event = match sent.map(|r| r.status()) {
                Ok(st) if st.is_success() => "webhook_sent",
                Ok(st) => {
                    log::warn!("approval webhook answered {st}");
                    "webhook_failed"
                }
                Err(e) => {
                    log::warn!("approval webhook: {e}");
                    "webhook_failed"
                }
            };
            metrics::APPROVALS.with_label_values(&[event]).inc();
        });
    }
}

/// A value in a Slack message: its control characters (`&`, `<`, `>`)
/// escaped, so a model-chosen tool name cannot become a link, and cut to
/// 200 characters.
fn slack_text(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 200 {
            out.push('…');
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

impl Gateway {
    /// Where this reply's calls to `approval_required` tools go: a holding
    /// when approvals are kept, the route's replies can be replayed, and
    /// the caller is known (an approval belongs to someone).
    pub(super) fn holding_for(&self, ctx: &Ctx, d: &dyn Dialect) -> Option<Arc<Holding>> {
        (self.approvals.is_some() && d.holds_calls() && ctx.principal.is_some())
            .then(|| Holding::new(&ctx.rec.request_id))
    }

    /// Store the approval for the calls the reply held, if it held any.
    /// Called once the reply is known to reach the client whole.
    pub(super) async fn keep_held(&self, ctx: &mut Ctx) -> Result<(), Rejection> {
        let Some(holding) = ctx.holding.take() else {
            return Ok(());
        };
        let calls = holding.take();
        let (Some(store), Some(caller), false) =
            (&self.approvals, &ctx.principal, calls.is_empty())
        else {
            return Ok(());
        };
        let route = ctx.rec.route.map(|r| r.as_str()).unwrap_or("other");
        let mut a = Approval::pending(
            NewApproval {
                holding: &holding,
                calls,
                request_id: &ctx.rec.request_id,
                caller,
                route,
                model: ctx.rec.model.as_deref().unwrap_or(""),
                stream: ctx.rec.stream,
                request_sha256: ctx.rec.prompt_sha256.as_deref().unwrap_or(""),
            },
            SystemClock.now_ms(),
            self.cfg.approvals.ttl_secs.saturating_mul(1000),
        );
        // Kept, shown to the approver and handed out as the response stages
        // leave them (redacted): a secret the model wrote into a call is
        // not stored, and the approver sees what the caller will get.
        a.calls = self.screened_calls(ctx, &a)?;
        a.tools = a.calls.iter().map(HeldCall::name).collect();
        if a.calls.is_empty() {
            return Ok(());
        }
        store
            .create(&a)
            .await
            .map_err(|e| Rejection::new(ErrorCode::ApprovalUnavailable, e))?;
        metrics::APPROVALS.with_label_values(&["held"]).inc();
        ctx.rec.approval = Some(ApprovalNote {
            id: a.id.clone(),
            event: "held",
            tools: a.tools.clone(),
        });
        if let Some(hook) = &self.webhook {
            hook.pending(&a);
        }
        Ok(())
    }

    /// The held calls as the response stages leave them in a reply that
    /// hands them out (redaction applied; a call a stage removes is not
    /// kept). Matched back by id and choice.
    fn screened_calls(&self, ctx: &Ctx, a: &Approval) -> Result<Vec<HeldCall>, Rejection> {
        let d = ctx.dialect;
        let Some(Replayed::Json(mut reply)) = d.replay(a, &Value::Null) else {
            return Ok(a.calls.clone());
        };
        let rctx = super::stage_context(ctx, Approvals::Redeem);
        if let (_, Some((_, r))) = self.responses.on_json(&rctx, &mut reply) {
            return Err(r);
        }
        let staged = |choice: u64, id: &str| -> Option<Value> {
            let choices = reply.get("choices")?.as_array()?;
            let c = choices
                .iter()
                .find(|c| c.get("index").and_then(Value::as_u64) == Some(choice))?;
            let calls = c.pointer("/message/tool_calls")?.as_array()?;
            calls
                .iter()
                .find(|t| t.get("id").and_then(Value::as_str) == Some(id))
                .cloned()
        };
        Ok(a.calls
            .iter()
            .filter_map(|h| {
                let call = staged(h.choice, h.id()?)?;
                Some(HeldCall { call, ..h.clone() })
            })
            .collect())
    }

    /// A request repeated with `x-portcullis-approval: ID`: answered from
    /// the approved calls, once, through the response stages (redaction;
    /// tool policy still removes a tool denied since), never the provider.
    pub(super) async fn hand_out(
        &self,
        s: &mut pingora::proxy::Session,
        ctx: &mut Ctx,
        id: &str,
        request: &Value,
    ) {
        let d = ctx.dialect;
        let refused = |code: ErrorCode, why: String| Rejection::about_input(code, why);
        let Some(store) = self.approvals.clone() else {
            let r = refused(
                ErrorCode::InvalidRequest,
                format!(
                    "`{}` was sent, but this gateway keeps no approvals.",
                    approval::HEADER
                ),
            );
            return self.refuse(s, ctx, "approval", r).await;
        };
        if !approval::well_formed(id) {
            let r = refused(
                ErrorCode::InvalidRequest,
                format!("`{}` is not an approval id.", approval::HEADER),
            );
            return self.refuse(s, ctx, "approval", r).await;
        }
        let Some(caller) = ctx.principal.clone() else {
            let r = Rejection::new(ErrorCode::ApprovalNotFound, "no caller to match");
            return self.refuse(s, ctx, "approval", r).await;
        };
        let route = ctx.rec.route.map(|r| r.as_str()).unwrap_or("other");
        let sha = ctx.rec.prompt_sha256.clone().unwrap_or_default();
        let request_id = ctx.rec.request_id.clone();
        let now = SystemClock.now_ms();
        let redeem = |a: &mut Approval| a.redeem(&caller, route, &sha, &request_id, now);
        // Checked first, without a change: the reply is built and screened
        // before the approval is spent.
        let approved = match store.get(id).await {
            Err(e) => Err(Rejection::new(ErrorCode::ApprovalUnavailable, e)),
            Ok(None) => Err(Rejection::new(
                ErrorCode::ApprovalNotFound,
                format!("no approval {id}"),
            )),
            Ok(Some(mut a)) => redeem(&mut a).map(|()| a),
        };
        let a = match approved {
            Ok(a) => a,
            Err(r) => return self.refused_hand_out(s, ctx, id, "approval", r).await,
        };
        // The output guard judges the calls (their arguments are generated
        // text) before they are handed out, as it would have in the reply.
        if self.output_mode() != crate::config::GuardOutput::Off {
            if let Some(Replayed::Json(whole)) = d.replay(&a, &Value::Null) {
                let mut unjudged = super::output_guard::Unjudged::default();
                unjudged.push(d, &whole);
                let (rejection, outcome) = self.judge_unjudged(ctx, &mut unjudged).await;
                ctx.rec.filters.extend(outcome);
                if let Some(r) = rejection {
                    return self.refused_hand_out(s, ctx, id, "output_guard", r).await;
                }
            }
        }
        let Some(replayed) = d.replay(&a, request) else {
            let r = Rejection::new(ErrorCode::ApprovalMismatch, "this API replays no calls");
            return self.refused_hand_out(s, ctx, id, "approval", r).await;
        };
        let rctx = super::stage_context(ctx, Approvals::Redeem);
        let (body, content_type, outcomes, stopped) = match replayed {
            Replayed::Json(mut json) => {
                let (outcomes, rejection) = self.responses.on_json(&rctx, &mut json);
                let body = json.to_string().into_bytes();
                (body, "application/json", outcomes, rejection)
            }
            Replayed::Events(events) => {
                let mut stages = self.responses.stream(&rctx);
                let mut wire = Vec::new();
                for e in events {
                    for out in stages.push(e) {
                        out.write_to(&mut wire);
                    }
                }
                for out in stages.finish() {
                    out.write_to(&mut wire);
                }
                let stopped = stages.stopped().cloned();
                (wire, "text/event-stream", stages.outcomes(), stopped)
            }
        };
        ctx.rec.filters.extend(outcomes);
        if let Some((kind, r)) = stopped {
            return self.refuse(s, ctx, kind.as_str(), r).await;
        }
        // Spent now: of two repeats racing, on one instance or two, one
        // wins; the other is refused as used.
        if let Err(r) = approval::update(store.as_ref(), id, redeem).await {
            return self.refused_hand_out(s, ctx, id, "approval", r).await;
        }
        metrics::APPROVALS.with_label_values(&["handed_out"]).inc();
        ctx.rec.approval = Some(ApprovalNote {
            id: a.id.clone(),
            event: "handed_out",
            tools: a.tools.clone(),
        });
        if content_type == "application/json" {
            return self.reply_json(s, ctx, 200, Bytes::from(body)).await;
        }
        let Ok(mut header) = response_header(200, ctx) else {
            return self.internal_error(s, ctx).await;
        };
        let _ = header.insert_header("content-type", content_type);
        let _ = header.insert_header("cache-control", "no-cache");
        let _ = header.insert_header("content-length", body.len().to_string());
        ctx.rec.status = 200;
        ctx.rec.response_bytes = body.len();
        let written = async {
            s.write_response_header(Box::new(header), false).await?;
            s.write_response_body(Some(Bytes::from(body)), true).await
        };
        if written.await.is_err() {
            ctx.rec.client_gone = true;
        }
    }

    async fn refused_hand_out(
        &self,
        s: &mut pingora::proxy::Session,
        ctx: &mut Ctx,
        id: &str,
        by: &str,
        r: Rejection,
    ) {
        metrics::APPROVALS.with_label_values(&["refused"]).inc();
        ctx.rec.approval = Some(ApprovalNote {
            id: id.to_string(),
            event: "refused",
            tools: Vec::new(),
        });
        self.refuse(s, ctx, by, r).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn slack_text_cannot_make_links_or_mentions() {
        assert_eq!(
            super::slack_text("<https://evil|click> & <!channel>\n"),
            "&lt;https://evil|click&gt; &amp; &lt;!channel&gt; "
        );
        assert_eq!(super::slack_text(&"x".repeat(300)).chars().count(), 201);
    }
}
