use super::*;
use crate::chain::Action;
use crate::request::Route;
use serde_json::json;
use std::sync::Mutex;

const AT: &str = "2026-11-22T00:00:00Z";

fn entry(status: ModelStatus) -> ModelEntry {
    let mut e = ModelEntry::register("m", "p", None, Some("1"), RiskTier::Low, "seed", AT).unwrap();
    e.status = status;
    e
}

#[test]
fn every_transition_legal_and_illegal() {
    use Lifecycle::*;
    use ModelStatus::*;
    let cases = [
        (Registered, Approve, Some(Approved)),
        (Registered, Freeze, None),
        (Registered, Unfreeze, None),
        (Registered, Retire, Some(Retired)),
        (Approved, Approve, None),
        (Approved, Freeze, Some(Frozen)),
        (Approved, Unfreeze, None),
        (Approved, Retire, Some(Retired)),
        (Frozen, Approve, None),
        (Frozen, Freeze, None),
        (Frozen, Unfreeze, Some(Approved)),
        (Frozen, Retire, Some(Retired)),
        (Retired, Approve, None),
        (Retired, Freeze, None),
        (Retired, Unfreeze, None),
        (Retired, Retire, None),
    ];
    for (from, action, to) in cases {
        let mut e = entry(from);
        let result = e.apply(action, "alice", AT);
        match to {
            Some(to) => {
                assert!(result.is_ok(), "{from:?} {action:?}");
                assert_eq!(e.status, to);
                let last = e.history.last().unwrap();
                assert_eq!(
                    (last.from, last.to, last.actor.as_str()),
                    (Some(from), to, "alice")
                );
            }
            None => {
                assert_eq!(
                    result,
                    Err(RegistryError::IllegalTransition {
                        id: "m".into(),
                        from,
                        action
                    })
                );
                assert_eq!(e.status, from, "an illegal step changes nothing");
            }
        }
    }
}

#[test]
fn approval_records_who_and_when() {
    let mut state = RegistryState::default();
    state.register(entry(ModelStatus::Registered)).unwrap();
    assert_eq!(
        state.register(entry(ModelStatus::Registered)),
        Err(RegistryError::Exists("m".into()))
    );
    let (before, after) = state
        .transition("m", Lifecycle::Approve, "bob", "T1")
        .unwrap();
    assert_eq!(before.status, ModelStatus::Registered);
    assert_eq!(
        (after.approved_by.as_deref(), after.approved_at.as_deref()),
        (Some("bob"), Some("T1"))
    );
    assert_eq!(state.revision, 2);
    assert!(matches!(
        state.transition("x", Lifecycle::Approve, "b", "T"),
        Err(RegistryError::NotFound(_))
    ));
    assert!(state.set_frozen(FreezeTarget::Subject, "eve", true, "bob", "T2"));
    assert!(
        !state.set_frozen(FreezeTarget::Subject, "eve", true, "bob", "T2"),
        "already frozen"
    );
    assert!(state.set_frozen(FreezeTarget::Subject, "eve", false, "bob", "T3"));
}

#[test]
fn entries_serialize_with_the_admin_api_field_names() {
    let v = serde_json::to_value(entry(ModelStatus::Approved)).unwrap();
    for field in [
        "id",
        "provider",
        "upstream_model",
        "version",
        "risk_tier",
        "status",
        "approved_by",
        "approved_at",
        "history",
    ] {
        assert!(v.get(field).is_some(), "{field}");
    }
    assert_eq!(v["status"], "approved");
    assert_eq!(v["risk_tier"], "low");
}

/// A registry view tests can change or break.
struct Fake(Mutex<Result<Arc<RegistryState>, String>>);

impl RegistryView for Fake {
    fn snapshot(&self) -> Result<Arc<RegistryState>, String> {
        self.0.lock().unwrap().clone()
    }
}

fn registry() -> Arc<Fake> {
    let mut s = RegistryState::default();
    for (id, status, risk) in [
        ("ok", ModelStatus::Approved, RiskTier::Low),
        ("new", ModelStatus::Registered, RiskTier::Low),
        ("old", ModelStatus::Retired, RiskTier::Low),
        ("cold", ModelStatus::Frozen, RiskTier::Low),
        ("risky", ModelStatus::Approved, RiskTier::High),
    ] {
        let mut e =
            ModelEntry::register(id, "p", Some(&format!("{id}-v2")), None, risk, "seed", AT)
                .unwrap();
        e.status = status;
        s.register(e).unwrap();
    }
    s.set_frozen(FreezeTarget::Subject, "eve", true, "admin", AT);
    s.set_frozen(FreezeTarget::Tenant, "shady", true, "admin", AT);
    Arc::new(Fake(Mutex::new(Ok(Arc::new(s)))))
}

fn policy() -> RiskPolicy {
    RiskPolicy {
        default_max: RiskTier::Medium,
        by_role: [("ops".to_string(), RiskTier::High)].into(),
    }
}

fn who(sub: &str, tenant: &str, roles: &[&str]) -> Principal {
    Principal {
        subject: sub.into(),
        tenant: tenant.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
    }
}

async fn run(
    filter: &dyn RequestFilter,
    model: Option<&str>,
    p: &Principal,
) -> Result<Verdict, FilterError> {
    let body = json!({});
    let view = RequestView {
        request_id: "r",
        authorization: None,
        principal: Some(p),
        dry_run: false,
        route: Route::ChatCompletions,
        body: &body,
        prompt: crate::prompt::of(Route::ChatCompletions, &body),
        model,
        stream: false,
        client_ip: None,
    };
    filter.check(&view).await
}

fn code(v: &Verdict) -> Option<ErrorCode> {
    match &v.decision {
        Decision::Deny(r) => Some(r.code),
        _ => None,
    }
}

#[tokio::test]
async fn gate_outcomes() {
    let gate = ModelGate::new(registry(), policy());
    let user = who("u", "t", &["user"]);
    let v = run(&gate, Some("ok"), &user).await.unwrap();
    assert_eq!(code(&v), None);
    assert!(v.facts.contains(&Fact::Upstream {
        provider: "p".into(),
        upstream_model: "ok-v2".into()
    }));
    for (model, expected) in [
        ("nope", ErrorCode::ModelNotFound),
        ("new", ErrorCode::ModelNotApproved),
        ("old", ErrorCode::ModelNotApproved),
        ("cold", ErrorCode::ModelFrozen),
        ("risky", ErrorCode::Forbidden),
    ] {
        assert_eq!(
            code(&run(&gate, Some(model), &user).await.unwrap()),
            Some(expected),
            "{model}"
        );
    }
    let ops = who("o", "t", &["user", "ops"]);
    assert_eq!(code(&run(&gate, Some("risky"), &ops).await.unwrap()), None);
    let names: Vec<String> = gate
        .usable(Some(&user))
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(names, ["ok"]);
    assert_eq!(gate.usable(Some(&ops)).unwrap().len(), 2);
}

#[tokio::test]
async fn freezes() {
    let f = FreezeFilter::new(registry());
    assert_eq!(
        code(&run(&f, None, &who("eve", "t", &[])).await.unwrap()),
        Some(ErrorCode::SubjectFrozen)
    );
    assert_eq!(
        code(&run(&f, None, &who("bob", "shady", &[])).await.unwrap()),
        Some(ErrorCode::TenantFrozen)
    );
    assert_eq!(
        code(&run(&f, None, &who("bob", "t", &[])).await.unwrap()),
        None
    );
}

#[tokio::test]
async fn an_unreadable_registry_fails_closed() {
    let r = registry();
    *r.0.lock().unwrap() = Err("redis down".into());
    let gate = ModelGate::new(r.clone(), policy());
    let err = run(&gate, Some("ok"), &who("u", "t", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::RegistryUnavailable);
    let chain = crate::chain::Chain::new(vec![(
        Box::new(gate) as Box<dyn RequestFilter>,
        Default::default(),
    )]);
    let body = json!({});
    let p = who("u", "t", &[]);
    let view = RequestView {
        request_id: "r",
        authorization: None,
        principal: Some(&p),
        dry_run: false,
        route: Route::ChatCompletions,
        body: &body,
        prompt: crate::prompt::of(Route::ChatCompletions, &body),
        model: Some("ok"),
        stream: false,
        client_ip: None,
    };
    let report = chain.run(&view).await;
    assert_eq!(
        report.rejection.unwrap().1.code,
        ErrorCode::RegistryUnavailable
    );
    assert_eq!(report.outcomes[0].action, Action::Error);
    assert!(FreezeFilter::new(r).check(&view).await.is_err());
}
