use super::*;
use crate::clock::ManualClock;
use crate::request::Principal;
use crate::Route;
use serde_json::json;

const T0: u64 = 1_800_000_000_000;

fn policy() -> LimitsPolicy {
    LimitsPolicy {
        tiers: vec![
            Tier {
                id: "trial".into(),
                roles: vec!["trial".into()],
                requests_per_minute: 5,
                burst: Some(5),
                tokens_per_minute: Some(1000),
                per_model: false,
            },
            Tier {
                id: "standard".into(),
                roles: vec![],
                requests_per_minute: 600,
                burst: Some(100),
                tokens_per_minute: None,
                per_model: true,
            },
        ],
        default_tier: "standard".into(),
        tenant: Some(TenantLimit {
            requests_per_minute: 8,
            burst: Some(8),
            tokens_per_minute: None,
        }),
        estimate: Estimate::default(),
    }
}

struct Fixture {
    limiter: RateLimiter,
    clock: Arc<ManualClock>,
}

fn fixture() -> Fixture {
    let clock = Arc::new(ManualClock::at_ms(T0));
    Fixture {
        limiter: RateLimiter::new(policy(), Arc::new(MemoryStore::default()), clock.clone()),
        clock,
    }
}

fn who(sub: &str, roles: &[&str]) -> Principal {
    Principal {
        subject: sub.into(),
        tenant: "acme".into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
    }
}

async fn ask(f: &Fixture, p: &Principal, body: &Value) -> Verdict {
    let view = RequestView {
        request_id: "r",
        authorization: None,
        principal: Some(p),
        dry_run: false,
        route: Route::ChatCompletions,
        body,
        prompt: crate::prompt::of(Route::ChatCompletions, body),
        model: Some("m"),
        stream: false,
        client_ip: None,
    };
    f.limiter.check(&view).await.unwrap()
}

fn small() -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10})
}

fn header<'a>(v: &'a Verdict, name: &str) -> Option<&'a str> {
    v.facts.iter().find_map(|f| match f {
        Fact::Header(n, value) if *n == name => Some(value.as_str()),
        _ => None,
    })
}

fn reservation_of(v: &Verdict) -> Reservation {
    v.facts
        .iter()
        .find_map(|x| match x {
            Fact::Reservation(r) => Some(r.clone()),
            _ => None,
        })
        .expect("a reservation")
}

fn code(v: &Verdict) -> Option<ErrorCode> {
    match &v.decision {
        Decision::Deny(r) => Some(r.code),
        _ => None,
    }
}

#[test]
fn gcra_admits_the_burst_then_the_rate() {
    let c = Charge {
        key: "k".into(),
        cost: 1.0,
        emission_ms: 12_000.0,
        burst: 5.0,
        force: false,
    };
    let mut tat = None;
    for expected_remaining in (0..5).rev() {
        let (t, s) = gcra(tat, 0.0, &c);
        assert!(s.allowed);
        assert_eq!(s.remaining, expected_remaining);
        tat = Some(t);
    }
    let (t, s) = gcra(tat, 0.0, &c);
    assert!(!s.allowed);
    assert_eq!(s.retry_after_ms, 12_000.0);
    assert_eq!(t, tat.unwrap(), "a refusal stores nothing new");
    let (_, s) = gcra(tat, 12_000.0, &c);
    assert!(s.allowed, "one emission interval later, one more");
}

#[tokio::test]
async fn trial_burst_then_429_with_headers_then_recovery() {
    let f = fixture();
    let alice = who("alice", &["trial"]);
    for i in 0..5 {
        let v = ask(&f, &alice, &small()).await;
        assert_eq!(code(&v), None, "request {i}");
        assert_eq!(header(&v, "x-ratelimit-limit-requests"), Some("5"));
        assert_eq!(
            header(&v, "x-ratelimit-remaining-requests"),
            Some(&*(4 - i).to_string())
        );
    }
    let v = ask(&f, &alice, &small()).await;
    assert_eq!(code(&v), Some(ErrorCode::RateLimited));
    assert_eq!(header(&v, "retry-after"), Some("12"));
    assert_eq!(header(&v, "x-ratelimit-remaining-requests"), Some("0"));
    f.clock.advance_ms(12_000);
    assert_eq!(code(&ask(&f, &alice, &small()).await), None);
}

#[tokio::test]
async fn tenant_limit_is_shared_and_a_refusal_charges_nothing() {
    let f = fixture();
    // The tenant allows 8 at once; subjects of the standard tier allow 100.
    for i in 0..8 {
        let v = ask(&f, &who(&format!("u{i}"), &[]), &small()).await;
        assert_eq!(code(&v), None);
    }
    let v = ask(&f, &who("u0", &[]), &small()).await;
    assert_eq!(code(&v), Some(ErrorCode::RateLimited));
    if let Decision::Deny(r) = &v.decision {
        assert!(r.reason.contains("req:tenant:acme"), "{}", r.reason);
    }
    // u0's own key was not charged by the refused request: after the
    // tenant refills one slot, u0 has 99 left, not 98.
    f.clock.advance_ms(7_500);
    let v = ask(&f, &who("u0", &[]), &small()).await;
    assert_eq!(code(&v), None);
}

#[tokio::test]
async fn token_budget_reserves_and_settles() {
    let f = fixture();
    let alice = who("alice", &["trial"]);
    // Estimate: 1 prompt token + max_tokens 600 = 601 of 1000.
    let big = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600});
    let v = ask(&f, &alice, &big).await;
    assert_eq!(code(&v), None);
    let reservation = reservation_of(&v);
    assert_eq!(reservation.estimate, 601);
    let v = ask(&f, &alice, &big).await;
    assert_eq!(code(&v), Some(ErrorCode::TokenBudgetExceeded));
    assert_eq!(header(&v, "x-ratelimit-remaining-tokens"), Some("399"));
    // The first used only 51 tokens: 550 come back.
    f.limiter.settle(&reservation, Some(51)).await.unwrap();
    let v = ask(&f, &alice, &big).await;
    assert_eq!(code(&v), None, "{:?}", v.decision);
    // A response bigger than its estimate is charged in full.
    let r2 = reservation_of(&v);
    // Spent: 51 + 990 = 1041 of 1000.
    f.limiter.settle(&r2, Some(990)).await.unwrap();
    let v = ask(&f, &alice, &small()).await;
    assert_eq!(code(&v), Some(ErrorCode::TokenBudgetExceeded));
}

#[test]
fn concurrent_requests_cannot_overspend() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    runtime.block_on(async {
        let f = Arc::new(fixture());
        let big =
            Arc::new(json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 99}));
        // 40 trial requests at once: the request burst allows 5, the token
        // budget (1000, 100 per request) allows 10; 5 must win.
        let tasks: Vec<_> = (0..40)
            .map(|_| {
                let (f, big) = (f.clone(), big.clone());
                tokio::spawn(async move {
                    code(&ask(&f, &who("alice", &["trial"]), &big).await).is_none()
                })
            })
            .collect();
        let mut admitted = 0;
        for t in tasks {
            admitted += usize::from(t.await.unwrap());
        }
        assert_eq!(admitted, 5);
    });
}

#[test]
fn estimates() {
    let f = fixture();
    let body = json!({"messages": [{"role": "system", "content": "12345678"},
        {"role": "user", "content": [{"type": "text", "text": "abcd"}]}], "max_tokens": 7});
    assert_eq!(
        f.limiter
            .estimate(crate::prompt::of(Route::ChatCompletions, &body)),
        3 + 7
    );
    assert_eq!(
        f.limiter.estimate(crate::prompt::of(
            Route::ChatCompletions,
            &json!({"messages": []})
        )),
        1024
    );
    assert_eq!(
        f.limiter.estimate(crate::prompt::of(
            Route::Embeddings,
            &json!({"input": ["abcd", "efgh"]})
        )),
        2
    );
    // n choices cost n completions; best_of as many as it generates.
    let body = json!({"messages": [{"role": "user", "content": "abcd"}], "max_tokens": 10, "n": 3});
    assert_eq!(
        f.limiter
            .estimate(crate::prompt::of(Route::ChatCompletions, &body)),
        1 + 30
    );
    let body = json!({"prompt": "abcd", "max_tokens": 10, "n": 2, "best_of": 5});
    assert_eq!(
        f.limiter
            .estimate(crate::prompt::of(Route::Completions, &body)),
        1 + 50
    );
    // Tool schemas and tool-call arguments count; an image is a fixed cost,
    // whatever the size of its data URL.
    let tools =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let body = json!({"messages": [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "12345678"}}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(100_000))}}]}],
        "tools": tools, "max_tokens": 0});
    // Each declaration as the provider reads it.
    let schema = tools[0].to_string().len() as u64;
    assert_eq!(
        f.limiter
            .estimate(crate::prompt::of(Route::ChatCompletions, &body)),
        (8 + 1 + schema).div_ceil(4) + 765
    );
    // Every field of a replayed message counts, not only its content.
    let body = json!({"messages": [{"role": "assistant", "content": "ok",
        "reasoning_content": "x".repeat(4000)}], "max_tokens": 0});
    assert_eq!(
        f.limiter
            .estimate(crate::prompt::of(Route::ChatCompletions, &body)),
        (2 + 4000u64).div_ceil(4)
    );
    // Saturates instead of overflowing.
    let body = json!({"messages": [], "max_tokens": u64::MAX, "n": 128});
    assert_eq!(
        f.limiter
            .estimate(crate::prompt::of(Route::ChatCompletions, &body)),
        MAX_ESTIMATE
    );
}

#[tokio::test]
async fn a_stream_without_usage_is_settled_with_what_was_generated() {
    let f = fixture();
    let body = json!({"messages": [{"role": "user", "content": "12345678"}], "max_tokens": 50});
    let v = ask(&f, &who("t", &["trial"]), &body).await;
    let r = reservation_of(&v);
    assert_eq!((r.estimate, r.prompt), (52, 2));
    assert_eq!(r.used_without_usage(0), 2);
    assert_eq!(r.used_without_usage(41), 2 + 11);
    // What is settled: reported usage first; nothing when the provider
    // failed; the estimate when a stream ended without usage; else unknown.
    assert_eq!(
        tokens_to_settle(Some(30), true, Some(41), Some(&r)),
        Some(30)
    );
    assert_eq!(tokens_to_settle(None, false, Some(41), Some(&r)), Some(0));
    assert_eq!(tokens_to_settle(None, true, Some(41), Some(&r)), Some(13));
    assert_eq!(tokens_to_settle(None, true, None, Some(&r)), None);
    assert_eq!(tokens_to_settle(None, true, Some(41), None), None);
}

#[test]
fn policy_validation_reports_every_problem() {
    let mut p = policy();
    p.tiers[1].id = "trial".into();
    p.tiers[0].requests_per_minute = 0;
    p.default_tier = "gold".into();
    let errors = p.validate();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(policy().validate().is_empty());
}
