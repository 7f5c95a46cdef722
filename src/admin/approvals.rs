//! The approvals of held tool calls (`filters::approval`): listing,
//! showing, and an approver's decision.

use super::handlers::{bad, Done};
use super::AdminApi;
use filters::approval::{self, ApprovalStore, State};
use filters::{ErrorCode, Principal, Rejection};
use serde::Deserialize;
use serde_json::{json, Value};

/// The most approvals a listing shows (newest first).
const LIST_MAX: usize = 1000;

/// The body of `POST /admin/approvals/{id}/approve|deny`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct DecisionBody {
    #[serde(default)]
    reason: Option<String>,
}

pub(super) fn no_approval(id: &str) -> Rejection {
    Rejection::about_input(ErrorCode::ApprovalNotFound, format!("No approval `{id}`."))
}

impl AdminApi {
    pub(super) fn approval_store(&self) -> Result<&dyn ApprovalStore, Rejection> {
        self.approvals.as_deref().ok_or_else(|| {
            bad("approvals are off: no `tools` policy enforcing, or `approvals.enabled: false`")
        })
    }

    /// `GET /admin/approvals[?state=pending|approved|denied|used|expired]`,
    /// newest first, each in its current state.
    pub(super) async fn list_approvals(&self, query: &str) -> Result<Value, Rejection> {
        let mut wanted = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("state", v)) => {
                    wanted = Some(State::parse(v).ok_or_else(|| {
                        bad(format!(
                            "unknown state `{v}`: pending, approved, denied, used or expired"
                        ))
                    })?)
                }
                _ => return Err(bad(format!("unknown query parameter in `{pair}`: state"))),
            }
        }
        let now = filters::Clock::now_ms(&filters::SystemClock);
        let found = self
            .approval_store()?
            .list(wanted, now, LIST_MAX)
            .await
            .map_err(|e| Rejection::new(ErrorCode::ApprovalUnavailable, e))?;
        // The list shows who asked for what; the calls' arguments are read
        // one approval at a time.
        let data: Vec<Value> = found.into_iter().map(|a| a.as_of(now).summary()).collect();
        Ok(json!({"object": "list", "data": data}))
    }

    /// `GET /admin/approvals/{id}`: with the calls' arguments for an
    /// admin (who decides on them), without for an auditor.
    pub(super) async fn show_approval(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<Value, Rejection> {
        if !approval::well_formed(id) {
            return Err(no_approval(id));
        }
        let now = filters::Clock::now_ms(&filters::SystemClock);
        let found = self
            .approval_store()?
            .get(id)
            .await
            .map_err(|e| Rejection::new(ErrorCode::ApprovalUnavailable, e))?;
        let a = found.ok_or_else(|| no_approval(id))?.as_of(now);
        if who.roles.contains(&self.roles.admin_role) {
            return Ok(json!(a));
        }
        Ok(a.summary())
    }

    /// `POST /admin/approvals/{id}/approve|deny` with `{"reason": ...}`
    /// (required to deny). Never by the caller whose call it is.
    pub(super) async fn decide(
        &self,
        who: &Principal,
        params: &[String],
        body: &[u8],
    ) -> Result<Done, Rejection> {
        if !approval::well_formed(&params[0]) {
            return Err(no_approval(&params[0]));
        }
        let approve = match params[1].as_str() {
            "approve" => true,
            "deny" => false,
            other => return Err(bad(format!("unknown action `{other}`: approve or deny"))),
        };
        let decision: DecisionBody = if body.iter().all(u8::is_ascii_whitespace) {
            DecisionBody::default()
        } else {
            serde_json::from_slice(body).map_err(|e| bad(format!("bad decision: {e}")))?
        };
        let reason = decision.reason.filter(|r| !r.trim().is_empty());
        if !approve && reason.is_none() {
            return Err(bad("a denial needs a reason: {\"reason\": \"...\"}"));
        }
        if reason.as_ref().is_some_and(|r| r.chars().count() > 1000) {
            return Err(bad("the reason is longer than 1000 characters"));
        }
        let store = self.approval_store()?;
        let now = filters::Clock::now_ms(&filters::SystemClock);
        let mut before = None;
        let after = approval::update(store, &params[0], |a| {
            before = Some(a.summary());
            a.decide(approve, who, reason.clone(), now)
        })
        .await
        .map_err(|r| match r.code {
            ErrorCode::ApprovalNotFound => no_approval(&params[0]),
            _ => r,
        })?;
        let event = if approve { "approved" } else { "denied" };
        crate::metrics::APPROVALS.with_label_values(&[event]).inc();
        Ok(Done {
            status: 200,
            body: json!(after),
            before,
            after: Some(after.summary()),
        })
    }
}
