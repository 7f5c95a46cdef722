//! Human approval of tool calls the policy marks `approval_required`.
//!
//! The flow, decided here and carried out by the gateway:
//!
//! 1. The model calls such a tool. The response tool stage takes the call
//!    out of the reply (JSON or stream) and puts it in the request's
//!    [`Holding`]; the reply says, in the choice's text, that the call is
//!    held and under which approval id (a JSON reply also has the
//!    [`ID_HEADER`] header). The gateway stores an [`Approval`] (pending)
//!    with the caller, the calls as the model wrote them, the model, the
//!    request id and the request's digest, and an expiry.
//! 2. Someone with the admin role approves or denies it
//!    ([`Approval::decide`]); never the caller itself.
//! 3. The caller repeats the same request with the [`HEADER`] header. Once
//!    approved, and before the expiry, the gateway answers it from the
//!    stored calls without calling the provider ([`Approval::redeem`]),
//!    once; the response stages still run (redaction, and tool policy: a
//!    tool denied since is still removed). Pending, denied, expired, used
//!    or for another request: a 403 with its own code; another caller's or
//!    unknown: 404.
//! 4. The caller runs the tool and sends its result back. A replayed call
//!    or a result of an `approval_required` tool is accepted only when the
//!    call's id is one of the caller's redeemed approvals
//!    ([`ApprovalStore::redeemed_call`]).
//!
//! One approval per request: every held call of a reply (all its choices)
//! shares it. The id is the request id with a prefix, so the audit record
//! of the request that asked and the approval name each other.

use crate::error::{ErrorCode, Rejection};
use crate::request::Principal;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::{Arc, Mutex};

/// The header a client repeats its request with to obtain an approved call.
pub const HEADER: &str = "x-portcullis-approval";
/// The header of a JSON reply whose calls were held: the approval id.
pub const ID_HEADER: &str = "x-portcullis-approval-id";
/// Approval ids start with this.
pub const PREFIX: &str = "apr_";

/// The approval id of a request.
pub fn id_for(request_id: &str) -> String {
    let mut id = String::with_capacity(PREFIX.len() + 32);
    id.push_str(PREFIX);
    id.extend(request_id.chars().filter(char::is_ascii_alphanumeric));
    id
}

/// Whether `id` is shaped like an approval id (checked before any store is
/// asked, so a client's header never reaches a key unvetted).
pub fn well_formed(id: &str) -> bool {
    id.strip_prefix(PREFIX).is_some_and(|rest| {
        (1..=64).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// Where an approval stands. `expired` is never stored: a pending or
/// approved approval past its expiry reads as expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Approved,
    Denied,
    /// Approved and handed out.
    Used,
    Expired,
}

impl State {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "approved" => Self::Approved,
            "denied" => Self::Denied,
            "used" => Self::Used,
            "expired" => Self::Expired,
            _ => return None,
        })
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Used => "used",
            Self::Expired => "expired",
        }
    }
}

/// One call taken out of a reply, as the model wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldCall {
    /// The choice it came in.
    pub choice: u64,
    /// A `tool_calls` entry (`{id, type, function: {name, arguments}}` or
    /// `custom`), or, when `legacy`, a `function_call` object.
    pub call: Value,
    #[serde(default)]
    pub legacy: bool,
}

impl HeldCall {
    pub fn name(&self) -> String {
        crate::tool_authz::call_parts(&self.call).0
    }

    /// The call's id (legacy calls have none, and are never held).
    pub fn id(&self) -> Option<&str> {
        self.call.get("id").and_then(Value::as_str)
    }

    /// The call's [`fingerprint`] for `caller` (none without an id).
    pub fn fingerprint(&self, caller: &Principal) -> Option<String> {
        let (name, args) = crate::tool_authz::call_parts(&self.call);
        Some(fingerprint(caller, self.id()?, &name, &args))
    }
}

/// What identifies a call handed out to a caller: the caller, the call's
/// id, its tool and its arguments, hashed. A replayed call or a tool result
/// is accepted for an `approval_required` tool only when its call has the
/// fingerprint of one handed out: another tool, other arguments or another
/// caller under the same id do not match.
pub fn fingerprint(caller: &Principal, id: &str, name: &str, arguments: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        caller.tenant.as_str(),
        caller.subject.as_str(),
        id,
        name,
        arguments,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// The most argument bytes one reply may hold for approval; a call past it
/// is refused instead (an approval is read by a person, and kept).
pub const MAX_HELD_BYTES: usize = 256 << 10;

/// The calls one reply holds for approval, filled by the response tool
/// stage and read by the gateway once the reply is out.
#[derive(Debug)]
pub struct Holding {
    id: String,
    calls: Mutex<Vec<HeldCall>>,
}

impl Holding {
    pub fn new(request_id: &str) -> Arc<Self> {
        Arc::new(Self {
            id: id_for(request_id),
            calls: Mutex::new(Vec::new()),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Hold a call; false (not held) when it has no id (a legacy
    /// `function_call`: its result could never be matched to it) or would
    /// take the reply past [`MAX_HELD_BYTES`].
    pub fn hold(&self, call: HeldCall) -> bool {
        if call.legacy || call.id().is_none_or(str::is_empty) {
            return false;
        }
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let size = |c: &HeldCall| crate::tool_authz::call_parts(&c.call).1.len();
        if calls.iter().map(size).sum::<usize>() + size(&call) > MAX_HELD_BYTES {
            return false;
        }
        calls.push(call);
        true
    }

    pub fn take(&self) -> Vec<HeldCall> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn is_empty(&self) -> bool {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

/// What the response stages do with calls to `approval_required` tools.
#[derive(Debug, Clone, Copy, Default)]
pub enum Approvals<'a> {
    /// No approval workflow here (none configured, tool authorization in
    /// monitor mode, or an API whose replies cannot be replayed): such a
    /// call is refused like a denied one.
    #[default]
    Off,
    /// Take them out of the reply into this holding.
    Hold(&'a Arc<Holding>),
    /// The reply is an approved call handed out: let them pass.
    Redeem,
}

/// The stored approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    pub id: String,
    pub state: State,
    pub created_at: String,
    pub expires_at: String,
    /// Unix milliseconds of `expires_at`.
    pub expires_ms: u64,
    /// The request whose reply held the calls.
    pub request_id: String,
    pub subject: String,
    pub tenant: String,
    /// e.g. `chat/completions`.
    pub route: String,
    pub model: String,
    pub stream: bool,
    /// SHA-256 of the request body: the repeated request must be the same.
    pub request_sha256: String,
    /// The held calls' tool names, in order.
    pub tools: Vec<String>,
    pub calls: Vec<HeldCall>,
    #[serde(default)]
    pub decided_by: Option<String>,
    #[serde(default)]
    pub decided_at: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub used_at: Option<String>,
    /// The request that obtained the calls.
    #[serde(default)]
    pub used_by_request: Option<String>,
}

/// What the gateway knows when it stores an approval.
pub struct NewApproval<'a> {
    pub holding: &'a Holding,
    pub calls: Vec<HeldCall>,
    pub request_id: &'a str,
    pub caller: &'a Principal,
    pub route: &'a str,
    pub model: &'a str,
    pub stream: bool,
    pub request_sha256: &'a str,
}

impl Approval {
    /// A pending approval, expiring `ttl_ms` after `now_ms`.
    pub fn pending(n: NewApproval<'_>, now_ms: u64, ttl_ms: u64) -> Self {
        let expires_ms = now_ms.saturating_add(ttl_ms);
        Self {
            id: n.holding.id().to_string(),
            state: State::Pending,
            created_at: crate::clock::rfc3339_ms(now_ms),
            expires_at: crate::clock::rfc3339_ms(expires_ms),
            expires_ms,
            request_id: n.request_id.to_string(),
            subject: n.caller.subject.clone(),
            tenant: n.caller.tenant.clone(),
            route: n.route.to_string(),
            model: n.model.to_string(),
            stream: n.stream,
            request_sha256: n.request_sha256.to_string(),
            tools: n.calls.iter().map(HeldCall::name).collect(),
            calls: n.calls,
            decided_by: None,
            decided_at: None,
            reason: None,
            used_at: None,
            used_by_request: None,
        }
    }

    /// The state as of `now_ms`: pending or approved past the expiry is
    /// expired.
    pub fn state_at(&self, now_ms: u64) -> State {
        match self.state {
            State::Pending | State::Approved if now_ms >= self.expires_ms => State::Expired,
            s => s,
        }
    }

    /// This approval as shown at `now_ms` (its state made current).
    pub fn as_of(mut self, now_ms: u64) -> Self {
        self.state = self.state_at(now_ms);
        self
    }

    fn is_caller(&self, p: &Principal) -> bool {
        self.subject == p.subject && self.tenant == p.tenant
    }

    /// An approver's decision. The approver may not be the caller (the
    /// same subject, in any tenant: a subject name is one person's), and
    /// only a pending approval is decided.
    pub fn decide(
        &mut self,
        approve: bool,
        approver: &Principal,
        reason: Option<String>,
        now_ms: u64,
    ) -> Result<(), Rejection> {
        // Subject names are compared as people would read them: `Alice`
        // and `alice ` are the same person.
        let same = |a: &str, b: &str| a.trim().eq_ignore_ascii_case(b.trim());
        if same(&self.subject, &approver.subject) {
            return Err(Rejection::new(
                ErrorCode::SelfApproval,
                format!(
                    "{} tried to decide on its own approval {}",
                    approver.subject, self.id
                ),
            ));
        }
        match self.state_at(now_ms) {
            State::Pending => {}
            other => {
                return Err(Rejection::about_input(
                    ErrorCode::InvalidTransition,
                    format!(
                        "Approval {} is {}: only a pending approval can be decided.",
                        self.id,
                        other.as_str()
                    ),
                ))
            }
        }
        self.state = if approve {
            State::Approved
        } else {
            State::Denied
        };
        self.decided_by = Some(approver.subject.clone());
        self.decided_at = Some(crate::clock::rfc3339_ms(now_ms));
        self.reason = reason;
        Ok(())
    }

    /// The caller obtains the approved calls with a repeat of the request
    /// that asked (`route` and `request_sha256` must match): once.
    pub fn redeem(
        &mut self,
        caller: &Principal,
        route: &str,
        request_sha256: &str,
        request_id: &str,
        now_ms: u64,
    ) -> Result<(), Rejection> {
        if !self.is_caller(caller) {
            // Another caller learns nothing, not even that it exists.
            return Err(Rejection::new(
                ErrorCode::ApprovalNotFound,
                format!(
                    "{} asked for approval {} of {}",
                    caller.subject, self.id, self.subject
                ),
            ));
        }
        let refused = |code: ErrorCode, why: &str| {
            Err(Rejection::new(code, format!("approval {}: {why}", self.id)))
        };
        match self.state_at(now_ms) {
            State::Approved => {}
            State::Pending => return refused(ErrorCode::ApprovalPending, "still pending"),
            State::Denied => {
                let why = format!(
                    "denied by {}: {}",
                    self.decided_by.as_deref().unwrap_or("?"),
                    self.reason.as_deref().unwrap_or("no reason given")
                );
                return refused(ErrorCode::ApprovalDenied, &why);
            }
            State::Expired => return refused(ErrorCode::ApprovalExpired, "expired"),
            State::Used => {
                let why = format!(
                    "already used by request {}",
                    self.used_by_request.as_deref().unwrap_or("?")
                );
                return refused(ErrorCode::ApprovalUsed, &why);
            }
        }
        if self.route != route || self.request_sha256 != request_sha256 {
            return refused(
                ErrorCode::ApprovalMismatch,
                "the request is not the one the approval was given for",
            );
        }
        self.state = State::Used;
        self.used_at = Some(crate::clock::rfc3339_ms(now_ms));
        self.used_by_request = Some(request_id.to_string());
        Ok(())
    }

    /// Everything but the calls (their arguments may hold what only the
    /// approver should read): for listings, auditors, the webhook and the
    /// admin audit record.
    pub fn summary(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "state": self.state,
            "subject": self.subject,
            "tenant": self.tenant,
            "tools": self.tools,
            "model": self.model,
            "route": self.route,
            "request_id": self.request_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at,
            "reason": self.reason,
            "used_at": self.used_at,
        })
    }
}

/// Where approvals are kept (a state folder, or Redis for several
/// instances). `replace` is a compare-and-set on the stored state, so two
/// approvers, or two redemptions, cannot both win.
#[async_trait]
pub trait ApprovalStore: Send + Sync {
    /// Store a new approval.
    async fn create(&self, approval: &Approval) -> Result<(), String>;
    async fn get(&self, id: &str) -> Result<Option<Approval>, String>;
    /// Approvals newest first, at most `limit`, only those in `state` (as
    /// of `now_ms`) when given.
    async fn list(
        &self,
        state: Option<State>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Approval>, String>;
    /// Replace the stored approval with `next` if its stored state is
    /// still `expected`; false when it changed meanwhile.
    async fn replace(&self, next: &Approval, expected: State) -> Result<bool, String>;
    /// Whether a call with this [`fingerprint`] was handed out.
    async fn handed_out(&self, fingerprint: &str) -> Result<bool, String>;
}

/// Read an approval, apply `change` to it and store the result, retrying
/// when another instance changed it meanwhile. Returns the approval as
/// stored, or the change's refusal.
pub async fn update(
    store: &dyn ApprovalStore,
    id: &str,
    mut change: impl FnMut(&mut Approval) -> Result<(), Rejection>,
) -> Result<Approval, Rejection> {
    let unavailable = |e: String| Rejection::new(ErrorCode::ApprovalUnavailable, e);
    for _ in 0..5 {
        let Some(mut a) = store.get(id).await.map_err(unavailable)? else {
            return Err(Rejection::new(
                ErrorCode::ApprovalNotFound,
                format!("no approval {id}"),
            ));
        };
        let expected = a.state;
        change(&mut a)?;
        if store.replace(&a, expected).await.map_err(unavailable)? {
            return Ok(a);
        }
    }
    Err(unavailable(format!(
        "approval {id} kept changing under five attempts to update it"
    )))
}

/// The notice that replaces held and removed calls in a reply.
pub fn notice(removed: &[String], held: &[String], approval: Option<&str>) -> String {
    let mut parts = Vec::new();
    match removed.len() {
        0 => {}
        1 => parts.push("[a tool call was blocked by policy]".to_string()),
        n => parts.push(format!("[{n} tool calls were blocked by policy]")),
    }
    if let (false, Some(id)) = (held.is_empty(), approval) {
        let names = held
            .iter()
            .map(|n| format!("'{n}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let calls = if held.len() == 1 { "call" } else { "calls" };
        parts.push(format!(
            "[tool {calls} {names} held for approval {id}: once it is approved, repeat this request with the header `{HEADER}: {id}` to receive it]"
        ));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(sub: &str) -> Principal {
        Principal {
            subject: sub.into(),
            tenant: "t".into(),
            roles: vec![],
        }
    }

    fn approval() -> Approval {
        let holding = Holding::new("0b9f-41aa");
        let calls = vec![HeldCall {
            choice: 0,
            call: serde_json::json!({"id": "call_1", "type": "function",
                "function": {"name": "run_shell", "arguments": "{\"cmd\":\"ls\"}"}}),
            legacy: false,
        }];
        Approval::pending(
            NewApproval {
                holding: &holding,
                calls,
                request_id: "0b9f-41aa",
                caller: &who("alice"),
                route: "chat/completions",
                model: "m",
                stream: false,
                request_sha256: "abc",
            },
            1_000,
            60_000,
        )
    }

    #[test]
    fn ids_are_the_request_ids_and_only_well_formed_ones_pass() {
        assert_eq!(id_for("0b9f-41aa"), "apr_0b9f41aa");
        assert!(well_formed("apr_0b9f41aa"));
        for bad in [
            "",
            "apr_",
            "0b9f41aa",
            "apr_../x",
            "apr_a b",
            &"apr_".repeat(30),
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn a_pending_approval_is_approved_once_and_redeemed_once() {
        let mut a = approval();
        assert_eq!(a.tools, vec!["run_shell"]);
        assert_eq!(a.expires_ms, 61_000);
        let redeem =
            |a: &mut Approval, now| a.redeem(&who("alice"), "chat/completions", "abc", "r2", now);
        assert_eq!(
            redeem(&mut a, 2_000).unwrap_err().code,
            ErrorCode::ApprovalPending
        );
        a.decide(true, &who("bob"), Some("ok".into()), 2_000)
            .unwrap();
        assert_eq!(a.decided_by.as_deref(), Some("bob"));
        let again = a.decide(false, &who("carol"), None, 2_001).unwrap_err();
        assert_eq!(again.code, ErrorCode::InvalidTransition);
        redeem(&mut a, 3_000).unwrap();
        assert_eq!(a.state, State::Used);
        assert_eq!(a.used_by_request.as_deref(), Some("r2"));
        assert_eq!(
            redeem(&mut a, 3_001).unwrap_err().code,
            ErrorCode::ApprovalUsed
        );
    }

    #[test]
    fn the_caller_cannot_approve_its_own_call_in_any_tenant() {
        let mut a = approval();
        let mut me_elsewhere = who("alice");
        me_elsewhere.tenant = "other".into();
        for p in [who("alice"), me_elsewhere, who("Alice "), who("ALICE")] {
            let r = a.decide(true, &p, None, 2_000).unwrap_err();
            assert_eq!(r.code, ErrorCode::SelfApproval);
            assert_eq!(a.state, State::Pending);
        }
    }

    #[test]
    fn denied_expired_foreign_and_other_requests_are_refused_with_their_codes() {
        let mut a = approval();
        a.decide(false, &who("bob"), Some("no shell".into()), 2_000)
            .unwrap();
        let r = a
            .redeem(&who("alice"), "chat/completions", "abc", "r", 3_000)
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::ApprovalDenied);
        assert!(r.reason.contains("no shell"), "{}", r.reason);

        let mut a = approval();
        assert_eq!(a.state_at(61_000), State::Expired);
        let r = a.decide(true, &who("bob"), None, 61_000).unwrap_err();
        assert_eq!(r.code, ErrorCode::InvalidTransition);
        a.decide(true, &who("bob"), None, 60_999).unwrap();
        let r = a
            .redeem(&who("alice"), "chat/completions", "abc", "r", 61_000)
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::ApprovalExpired);

        let mut a = approval();
        a.decide(true, &who("bob"), None, 2_000).unwrap();
        let r = a
            .redeem(&who("mallory"), "chat/completions", "abc", "r", 3_000)
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::ApprovalNotFound);
        let mut same_name = who("alice");
        same_name.tenant = "other".into();
        let r = a
            .redeem(&same_name, "chat/completions", "abc", "r", 3_000)
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::ApprovalNotFound);
        let r = a
            .redeem(&who("alice"), "chat/completions", "abd", "r", 3_000)
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::ApprovalMismatch);
        let r = a
            .redeem(&who("alice"), "messages", "abc", "r", 3_000)
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::ApprovalMismatch);
        assert_eq!(a.state, State::Approved, "refusals change nothing");
    }

    #[test]
    fn the_notice_names_the_held_calls_and_how_to_get_them() {
        let n = notice(&[], &["run_shell".into()], Some("apr_1"));
        assert!(n.contains("'run_shell' held for approval apr_1"), "{n}");
        assert!(n.contains("x-portcullis-approval: apr_1"), "{n}");
        let n = notice(&["a".into(), "b".into()], &[], None);
        assert_eq!(n, "[2 tool calls were blocked by policy]");
    }
}

#[cfg(test)]
mod holding_tests {
    use super::*;
    use serde_json::json;

    fn call(id: Option<&str>, args: &str) -> HeldCall {
        HeldCall {
            choice: 0,
            call: json!({"id": id, "type": "function", "function": {"name": "t", "arguments": args}}),
            legacy: false,
        }
    }

    #[test]
    fn calls_without_ids_legacy_calls_and_oversized_replies_are_not_held() {
        let h = Holding::new("r");
        assert!(!h.hold(call(None, "{}")));
        assert!(!h.hold(call(Some(""), "{}")));
        let mut legacy = call(Some("c"), "{}");
        legacy.legacy = true;
        assert!(!h.hold(legacy));
        let half = "x".repeat(MAX_HELD_BYTES / 2);
        assert!(h.hold(call(Some("a"), &half)));
        assert!(h.hold(call(Some("b"), &half)));
        assert!(!h.hold(call(Some("c"), "x")), "past the cap");
        assert_eq!(h.take().len(), 2);
    }

    #[test]
    fn fingerprints_differ_by_caller_id_tool_and_arguments() {
        let p = |s: &str, t: &str| Principal {
            subject: s.into(),
            tenant: t.into(),
            roles: vec![],
        };
        let base = fingerprint(&p("a", "t"), "c1", "run_shell", "{}");
        assert_eq!(base, fingerprint(&p("a", "t"), "c1", "run_shell", "{}"));
        for other in [
            fingerprint(&p("b", "t"), "c1", "run_shell", "{}"),
            fingerprint(&p("a", "u"), "c1", "run_shell", "{}"),
            fingerprint(&p("a", "t"), "c2", "run_shell", "{}"),
            fingerprint(&p("a", "t"), "c1", "delete", "{}"),
            fingerprint(&p("a", "t"), "c1", "run_shell", "{ }"),
            // Parts are length-prefixed: no shifting text between them.
            fingerprint(&p("a", "t"), "c1r", "un_shell", "{}"),
        ] {
            assert_ne!(base, other);
        }
        assert_eq!(base.len(), 64);
    }
}
