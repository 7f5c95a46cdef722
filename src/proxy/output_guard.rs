//! The output guard: a reply's text judged by the guard model in
//! overlapping pieces, whole (JSON) or window by window (streams), with
//! what it has not judged yet held back as `guard.output` says.

use super::{Ctx, Gateway};
use crate::config::GuardOutput;
use filters::dialect::Dialect;
use filters::{ErrorCode, FilterKind, Rejection, SseEvent};
use serde_json::{json, Value};
use std::time::Instant;

/// Most characters of a reply sent to the output guard in one call.
pub(super) const OUTPUT_PIECE: usize = 8_000;
/// Characters of already judged text sent again with the next piece, so
/// harm cut across a piece or window boundary is still seen whole.
pub(super) const OUTPUT_OVERLAP: usize = 200;

impl Gateway {
    pub(super) fn output_mode(&self) -> GuardOutput {
        match (&self.guard, &self.cfg.guard) {
            (Some(_), Some(g)) => g.output,
            _ => GuardOutput::Off,
        }
    }

    /// The guard's verdict on what a model wrote, as the `output_guard`
    /// outcome, and `Some(rejection)` when the reply must not be released:
    /// `content_policy` (unsafe) or `guard_unavailable`.
    pub(super) async fn judge_output(
        &self,
        ctx: &Ctx,
        text: &str,
    ) -> Option<(Option<Rejection>, filters::FilterOutcome)> {
        let (Some(guard), Some(g)) = (&self.guard, &self.cfg.guard) else {
            return None;
        };
        if text.trim().is_empty() {
            return None;
        }
        let started = Instant::now();
        let body = ctx.request_json.as_ref().unwrap_or(&Value::Null);
        let prompt = ctx.dialect.prompt(body);
        let result = guard
            .judge_reply(&prompt, text, ctx.principal.as_ref())
            .await;
        let mut outcome = filters::FilterOutcome {
            filter: FilterKind::OutputGuard,
            mode: g.mode,
            action: filters::Action::Allow,
            enforced: false,
            code: None,
            reason: None,
            annotations: Vec::new(),
            latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        };
        let enforce = g.mode == filters::Mode::Enforce;
        let rejection = match result {
            Ok(v) => {
                outcome.annotations.push(filters::Annotation {
                    key: "guard_categories",
                    value: json!(v.named),
                });
                match (v.action, v.category) {
                    (filters::guard::Action::Block, Some(category)) => {
                        outcome.action = filters::Action::Deny;
                        outcome.code = Some(ErrorCode::ContentPolicy);
                        outcome.reason = Some(format!("reply judged unsafe: {category}"));
                        enforce.then(|| {
                            Rejection::new(ErrorCode::ContentPolicy, format!("reply: {category}"))
                        })
                    }
                    (filters::guard::Action::Flag, _) => {
                        outcome.action = filters::Action::Annotate;
                        None
                    }
                    _ => None,
                }
            }
            Err(e) => {
                outcome.action = filters::Action::Error;
                outcome.code = Some(e.code);
                outcome.reason = Some(e.reason.clone());
                (enforce && g.on_error == filters::OnError::Deny)
                    .then(|| Rejection::new(e.code, e.reason))
            }
        };
        outcome.enforced = rejection.is_some();
        Some((rejection, outcome))
    }

    /// Judge a reply's text in overlapping pieces of at most
    /// [`OUTPUT_PIECE`] characters (so the policy's `max_chars` never cuts
    /// it), the first unsafe or failed piece deciding. Returns the deciding
    /// rejection and the last verdict.
    pub(super) async fn judge_output_pieces(
        &self,
        ctx: &Ctx,
        text: &str,
    ) -> (Option<Rejection>, Option<filters::FilterOutcome>) {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let byte_at = |i: usize| chars.get(i).map_or(text.len(), |c| c.0);
        let mut last = None;
        let mut start = 0;
        loop {
            let end = (start + OUTPUT_PIECE).min(chars.len());
            if let Some((r, outcome)) = self
                .judge_output(ctx, &text[byte_at(start)..byte_at(end)])
                .await
            {
                last = Some(outcome);
                if r.is_some() {
                    return (r, last);
                }
            }
            if end >= chars.len() {
                return (None, last);
            }
            start = end.saturating_sub(OUTPUT_OVERLAP);
        }
    }

    /// Judge each choice's new text (with the overlap before it), the
    /// first unsafe or failed one deciding; what was judged safe is
    /// dropped but for the overlap.
    pub(super) async fn judge_unjudged(
        &self,
        ctx: &Ctx,
        unjudged: &mut Unjudged,
    ) -> (Option<Rejection>, Option<filters::FilterOutcome>) {
        unjudged.chars = 0;
        let mut last = None;
        for (text, fresh) in unjudged.choices.values_mut() {
            if !std::mem::take(fresh) {
                continue;
            }
            let (r, outcome) = self.judge_output_pieces(ctx, text).await;
            last = outcome.or(last);
            if r.is_some() {
                return (r, last);
            }
            keep_tail(text, OUTPUT_OVERLAP);
        }
        (None, last)
    }

    /// Characters of a reply judged in one guard call: well inside the
    /// policy's `max_chars`, which would otherwise cut the reply.
    pub(super) fn output_piece(&self) -> usize {
        let window = self.cfg.guard.as_ref().map_or(400, |g| g.output_window);
        window.clamp(1, OUTPUT_PIECE)
    }

    pub(super) fn parallel_guard(&self) -> bool {
        self.cfg
            .guard
            .as_ref()
            .is_some_and(|g| g.timing == crate::config::GuardTiming::Parallel)
    }
}

/// The text of a reply the output guard has not judged yet, per choice,
/// each after the overlap kept from its last window (so a stream's
/// judged text is dropped and memory does not grow with the reply).
#[derive(Default)]
pub(super) struct Unjudged {
    /// Per choice index: the text, and whether any of it is new.
    choices: std::collections::BTreeMap<u64, (String, bool)>,
    /// New characters since the last judgement, all choices together.
    pub(super) chars: usize,
}

impl Unjudged {
    pub(super) fn push(&mut self, d: &dyn Dialect, json: &Value) {
        for (index, t) in d.reply_texts(json) {
            if t.is_empty() {
                continue;
            }
            self.chars += t.chars().count();
            let (text, fresh) = self.choices.entry(index).or_default();
            text.push_str(&t);
            *fresh = true;
        }
    }
}

/// Keep only the last `n` characters of `text`: a stream's judged text
/// is dropped once judged, but for an overlap sent again with the next
/// window, so the output guard's memory does not grow with the reply.
pub(super) fn keep_tail(text: &mut String, n: usize) {
    let len = text.chars().count();
    if len > n {
        let cut = text.char_indices().nth(len - n).map_or(text.len(), |c| c.0);
        text.drain(..cut);
    }
}

/// Where an event goes under the output guard: held (all of them in
/// `held` mode; closing events in `sampled` mode, so a stream can still be
/// cut after its last judgement) or written; its text is counted.
pub(super) fn route_event(
    d: &dyn Dialect,
    output: GuardOutput,
    event: SseEvent,
    unjudged: &mut Unjudged,
    held: &mut Vec<SseEvent>,
    wire: &mut Vec<u8>,
) {
    if output == GuardOutput::Off {
        event.write_to(wire);
        return;
    }
    if let Some(j) = event.json() {
        unjudged.push(d, j);
    }
    if (output == GuardOutput::Held && !d.is_opening(&event)) || d.is_closing(&event) {
        held.push(event);
    } else {
        event.write_to(wire);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judged_stream_text_keeps_only_the_overlap() {
        let mut t = "ab€dé".to_string();
        keep_tail(&mut t, 3);
        assert_eq!(t, "€dé");
        keep_tail(&mut t, 10);
        assert_eq!(t, "€dé");
        keep_tail(&mut t, 0);
        assert_eq!(t, "");
    }
}
