use super::*;

fn compile() -> Redactor {
    let policy: RedactionPolicy =
        serde_yaml::from_str(include_str!("../../../policies/redaction.yaml"))
            .expect("shipped policy parses");
    Redactor::build(&policy).expect("shipped policy compiles")
}

static SHIPPED: std::sync::LazyLock<std::sync::Arc<Redactor>> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(compile()));

/// The shipped policy, compiled once for all tests.
fn redactor() -> std::sync::Arc<Redactor> {
    SHIPPED.clone()
}

/// Deterministic pseudo-random characters from `alphabet` (no real secrets
/// in the repository, and no dictionary words that placeholders match).
fn chars(seed: u64, n: usize, alphabet: &str) -> String {
    let a: Vec<char> = alphabet.chars().collect();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            a[(x % a.len() as u64) as usize]
        })
        .collect()
}

const ALNUM: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const BASE64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const UPPER32: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const LETTERS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// One example per rule, embedded in ordinary text.
fn examples() -> Vec<(&'static str, String)> {
    vec![
        (
            "aws-access-key-id",
            format!("key id AKIA{} here", chars(1, 16, UPPER32)),
        ),
        (
            "aws-secret-access-key",
            format!("aws_secret_access_key = {}", chars(2, 40, ALNUM)),
        ),
        ("gcp-api-key", format!("AIza{}", chars(3, 35, ALNUM))),
        (
            "private-key",
            format!(
                "-----BEGIN RSA PRIVATE KEY-----\n{}\n{}\n-----END RSA PRIVATE KEY-----",
                chars(4, 64, ALNUM),
                chars(5, 64, ALNUM)
            ),
        ),
        (
            "azure-storage-key",
            format!(
                "DefaultEndpointsProtocol=https;AccountKey={}==;",
                chars(6, 86, ALNUM)
            ),
        ),
        (
            "azure-ad-client-secret",
            format!("secret {}8Q~{}", chars(7, 3, ALNUM), chars(8, 34, ALNUM)),
        ),
        ("github-token", format!("ghp_{}", chars(9, 36, ALNUM))),
        (
            "github-fine-grained-pat",
            format!("github_pat_{}", chars(10, 82, ALNUM)),
        ),
        ("gitlab-token", format!("glpat-{}", chars(11, 20, ALNUM))),
        (
            "slack-token",
            format!(
                "xoxb-{}-{}",
                chars(12, 12, "0123456789"),
                chars(13, 24, ALNUM)
            ),
        ),
        (
            "slack-webhook-url",
            format!("https://hooks.slack.com/services/{}", chars(14, 44, ALNUM)),
        ),
        ("stripe-key", format!("sk_live_{}", chars(15, 24, ALNUM))),
        (
            "openai-api-key",
            format!(
                "sk-proj-{}T3BlbkFJ{}",
                chars(16, 40, ALNUM),
                chars(17, 40, ALNUM)
            ),
        ),
        (
            "anthropic-api-key",
            format!("sk-ant-api03-{}AA", chars(18, 93, ALNUM)),
        ),
        (
            "huggingface-token",
            format!("hf_{}", chars(19, 34, LETTERS)),
        ),
        ("npm-token", format!("npm_{}", chars(20, 36, ALNUM))),
        (
            "jwt",
            format!(
                "eyJ{}.eyJ{}.{}",
                chars(21, 20, ALNUM),
                chars(22, 30, ALNUM),
                chars(23, 30, ALNUM)
            ),
        ),
        (
            "connection-string",
            format!(
                "postgres://app:{}@db.internal:5432/app",
                chars(24, 16, ALNUM)
            ),
        ),
        (
            "password-assignment",
            format!("DB_PASSWORD={}", chars(25, 18, ALNUM)),
        ),
        (
            "bearer-token",
            format!("Authorization: Bearer {}", chars(26, 32, ALNUM)),
        ),
        ("email", "write to jane.doe@corp.example.org please".into()),
        ("credit-card", "card 4111 1111 1111 1111 on file".into()),
        ("us-ssn", "SSN 123-45-6789".into()),
        ("iban", "IBAN GB82 WEST 1234 5698 7654 32".into()),
        ("ipv4", "from 203.0.113.77 at noon".into()),
        ("ipv6", "host 2001:db8:85a3::8a2e:370:7334 up".into()),
        ("phone", "call +44 20 7946 0958 today".into()),
    ]
}

/// A PEM block of `lines` full lines of 64 base64 characters (with `+`
/// and `/`) and a short last line, as real keys are written.
fn pem(label: &str, seed: u64, lines: usize) -> String {
    let mut body: Vec<String> = (0..lines)
        .map(|i| chars(seed + i as u64, 64, BASE64))
        .collect();
    body.push(format!("{}==", chars(seed + 999, 22, BASE64)));
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----",
        body.join("\n")
    )
}

/// Each rule's longest realistic value (longer than the stream redactor's
/// hold-back wherever the format allows it).
fn long_examples() -> Vec<(&'static str, String)> {
    vec![
        ("private-key", pem("RSA PRIVATE KEY", 100, 6)),
        ("private-key", pem("PRIVATE KEY", 200, 50)),
        ("private-key", pem("EC PRIVATE KEY", 300, 2)),
        ("github-token", format!("gho_{}", chars(101, 255, ALNUM))),
        ("gitlab-token", format!("glpat-{}", chars(102, 64, ALNUM))),
        (
            "slack-token",
            format!("xoxe.xoxp-1-{}", chars(103, 200, ALNUM)),
        ),
        ("stripe-key", format!("sk_live_{}", chars(104, 99, ALNUM))),
        (
            "openai-api-key",
            format!(
                "sk-proj-{}T3BlbkFJ{}",
                chars(105, 200, URL64),
                chars(106, 200, URL64)
            ),
        ),
        (
            "jwt",
            format!(
                "eyJ{}.eyJ{}.{}",
                chars(107, 400, ALNUM),
                chars(108, 1500, ALNUM),
                chars(109, 342, URL64)
            ),
        ),
        (
            "connection-string",
            format!(
                "mongodb+srv://svc:{}@cluster0.internal.example.net/db",
                chars(110, 256, ALNUM)
            ),
        ),
        (
            "password-assignment",
            format!("DB_PASSWORD={}", chars(111, 200, ALNUM)),
        ),
        (
            "bearer-token",
            format!("Authorization: Bearer {}", chars(112, 900, URL64)),
        ),
        (
            "slack-webhook-url",
            format!("https://hooks.slack.com/services/{}", chars(113, 56, ALNUM)),
        ),
    ]
}

#[test]
fn every_rule_has_an_example_and_catches_it() {
    let r = redactor();
    let covered: BTreeMap<&str, ()> = examples().iter().map(|(id, _)| (*id, ())).collect();
    for id in r.rule_ids() {
        assert!(covered.contains_key(id), "no example for rule {id}");
    }
    for (id, text) in examples() {
        let (out, counts) = r.redact(&text);
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id}: {text:?} -> {out:?} ({counts:?})"
        );
        assert!(out.contains(&format!("[REDACTED:{id}]")), "{out}");
    }
}

#[test]
fn the_secret_never_survives_only_the_span_is_replaced() {
    let r = redactor();
    let key = format!("ghp_{}", chars(40, 36, ALNUM));
    let (out, _) = r.redact(&format!("before {key} after"));
    assert_eq!(out, "before [REDACTED:github-token] after");
    let pw = chars(41, 20, ALNUM);
    let (out, _) = r.redact(&format!("password: {pw}"));
    assert_eq!(out, "password: [REDACTED:password-assignment]");
}

#[test]
fn gcp_service_account_json_key_is_redacted() {
    let r = redactor();
    let key_body = format!("{}\\n{}", chars(60, 64, ALNUM), chars(61, 64, ALNUM));
    let json = format!(
        r#"{{"type": "service_account", "project_id": "p", "private_key_id": "k",
"private_key": "-----BEGIN PRIVATE KEY-----\\n{key_body}\\n-----END PRIVATE KEY-----\\n", "client_email": "svc@p.iam.gserviceaccount.com"}}"#
    );
    let (out, counts) = r.redact(&json);
    assert_eq!(counts.get("private-key"), Some(&1), "{out}");
    assert!(!out.contains(&key_body[..20]));
}

#[test]
fn placeholders_and_look_alikes_survive() {
    let r = redactor();
    for text in [
        "AKIAIOSFODNN7EXAMPLE is the documented example key",
        "request 123e4567-e89b-12d3-a456-426614174000 done",
        "commit 9fceb02d0ae598e95dc970b74767f19372d61af8",
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "upgrade to version 10.4.2 or v2.31.0-rc.1",
        "password = xxxxxxxxxxxxxxxx",
        "api_key: <your-api-key>",
        "token = 1234567890abcdef1234567890abcdef",
        "it costs 1200 dollars for 12 people on 2026-11-22",
        "the answer is 42 and pi is 3.14159",
        "card 4111 1111 1111 1112 fails Luhn",
        "SSN 666-12-3456 and 000-12-3456 are invalid",
        "IBAN GB82WEST12345698765431 fails mod-97",
        "999.10.10.10 is not an address",
        "a::b is Rust, not IPv6; neither is 10:30",
        "AIzaSyabcdefghijklmnopqrstuvwxyz1234567 is made up",
        "ghp_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ] {
        let (out, counts) = r.redact(text);
        assert!(counts.is_empty(), "{text:?} -> {out:?} {counts:?}");
    }
}

#[test]
fn replacement_styles() {
    let text = "card 4111 1111 1111 1111 and ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i";
    let with = |style: &str| {
        let mut policy: RedactionPolicy =
            serde_yaml::from_str(include_str!("../../../policies/redaction.yaml")).unwrap();
        policy.style = serde_yaml::from_str(style).unwrap();
        policy.salt = Some("pepper".into());
        Redactor::build(&policy).unwrap().redact(text).0
    };
    assert_eq!(with("kind"), "card [REDACTED:pii] and [REDACTED:secret]");
    assert_eq!(
        with("mask"),
        "card ***************1111 and ************************************Uo5i"
    );
    let hashed = with("hash");
    assert!(
        hashed.starts_with("card [REDACTED:credit-card:")
            && hashed.contains("[REDACTED:github-token:"),
        "{hashed}"
    );
    assert_eq!(hashed, with("hash"), "the same value gives the same tag");
    assert!(!hashed.contains("4111") && !hashed.contains("ghp_"));
}

#[test]
fn validators() {
    assert!(luhn("4111111111111111"));
    assert!(!luhn("4111111111111112"));
    assert!(mod97("GB82WEST12345698765432"));
    assert!(!mod97("GB82WEST12345698765431"));
    assert!(ssn("123-45-6789"));
    assert!(!ssn("900-45-6789"));
    assert!(entropy("aaaaaaaa") < 0.1);
    assert!(entropy(&chars(50, 40, ALNUM)) > 4.5);
}

#[test]
fn bad_rules_are_all_reported() {
    let policy = RedactionPolicy {
        style: Style::Rule,
        salt: None,
        placeholders: vec![],
        rules: vec![
            RuleSpec {
                id: "a".into(),
                kind: Kind::Secret,
                keywords: vec![],
                pattern: "(".into(),
                group: 0,
                validator: None,
                min_entropy: None,
                generic: false,
                replacement: None,
            },
            RuleSpec {
                id: "b".into(),
                kind: Kind::Pii,
                keywords: vec![],
                pattern: "x".into(),
                group: 2,
                validator: None,
                min_entropy: None,
                generic: false,
                replacement: None,
            },
        ],
    };
    let errors = Redactor::build(&policy).err().unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
}

mod streaming {
    use super::*;
    use crate::redact::stream::{StreamRedactor, HOLD};
    use proptest::prelude::*;
    use std::sync::Arc;

    fn stream(r: &Arc<Redactor>, pieces: &[&str]) -> String {
        let mut s = StreamRedactor::new(r.clone());
        let mut out: String = pieces.iter().map(|p| s.push(p)).collect();
        out.push_str(&s.finish());
        out
    }

    /// Split `text` at the given fractions (on character boundaries).
    fn split<'a>(text: &'a str, cuts: &[usize]) -> Vec<&'a str> {
        let mut points: Vec<usize> = cuts
            .iter()
            .map(|c| {
                let mut p = c % (text.len() + 1);
                while !text.is_char_boundary(p) {
                    p -= 1;
                }
                p
            })
            .collect();
        points.push(0);
        points.push(text.len());
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| &text[w[0]..w[1]]).collect()
    }

    const WORDS: &[&str] = &[
        "the",
        "key",
        "is",
        "café",
        "日本語",
        "🦀",
        "token:",
        "password",
        "call",
        "at",
        "\n",
        "=",
        "12",
        "ok.",
    ];

    /// Split `text` into pieces of `n` characters, as a provider streams
    /// it one event per few characters.
    fn chunks(text: &str, n: usize) -> Vec<&str> {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, (at, _)) in text.char_indices().enumerate() {
            if i > 0 && i % n == 0 {
                out.push(&text[start..at]);
                start = at;
            }
        }
        out.push(&text[start..]);
        out
    }

    /// How a planted text is split: at random points, or into pieces of a
    /// fixed size from 1 to 64 characters.
    #[derive(Debug, Clone)]
    enum Split {
        Cuts(Vec<usize>),
        Every(usize),
    }

    fn splits() -> impl Strategy<Value = Split> {
        prop_oneof![
            proptest::collection::vec(any::<usize>(), 0..40).prop_map(Split::Cuts),
            (1..=64usize).prop_map(Split::Every),
        ]
    }

    fn pieces<'a>(text: &'a str, how: &Split) -> Vec<&'a str> {
        match how {
            Split::Cuts(cuts) => split(text, cuts),
            Split::Every(n) => chunks(text, *n),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// However the text is split (multi-byte characters included), the
        /// stream gives exactly the whole-text redaction, and no planted
        /// secret survives: short examples of every rule, and each rule's
        /// longest realistic value (longer than the hold-back).
        #[test]
        fn streamed_equals_whole_and_secrets_never_survive(
            words in proptest::collection::vec(0..WORDS.len(), 0..60),
            planted in proptest::collection::vec((any::<prop::sample::Index>(), any::<bool>(), 0..60usize), 1..4),
            how in splits(),
        ) {
            let r = redactor();
            let short = examples();
            let long = long_examples();
            let mut parts: Vec<String> = words.iter().map(|w| WORDS[*w].to_string()).collect();
            let mut secrets = Vec::new();
            for (which, is_long, pos) in planted {
                let list = if is_long { &long } else { &short };
                let (_, text) = which.get(list);
                let at = pos.min(parts.len());
                parts.insert(at, text.clone());
                secrets.push(text.clone());
            }
            let text = parts.join(" ");
            let (whole, _) = r.redact(&text);
            let streamed = stream(&r, &pieces(&text, &how));
            prop_assert_eq!(&streamed, &whole);
            for s in &secrets {
                prop_assert!(!streamed.contains(s.as_str()), "planted {:?} survived in {:?}", s, streamed);
            }
        }
    }

    /// Every long value, every piece size from 1 to 64: the stream equals
    /// the whole-text redaction and the value never survives.
    #[test]
    fn long_values_at_every_chunk_size() {
        let r = redactor();
        for (id, value) in long_examples() {
            let text = format!("Here it is:\n{value}\nKeep it safe.");
            let (whole, counts) = r.redact(&text);
            assert_eq!(counts.get(id), Some(&1), "{id}: {whole}");
            for n in 1..=64 {
                let streamed = stream(&r, &chunks(&text, n));
                assert_eq!(streamed, whole, "{id} in pieces of {n}");
            }
        }
    }

    /// Regression: the end of a first block must not hide a second block
    /// that follows on the same line.
    #[test]
    fn a_closed_block_then_an_open_one() {
        let r = redactor();
        let long = long_examples();
        let text = format!("a {} b {} c", long[2].1, long[0].1);
        let (whole, counts) = r.redact(&text);
        assert_eq!(counts.get("private-key"), Some(&2));
        assert_eq!(stream(&r, &chunks(&text, 37)), whole);
    }

    #[test]
    fn one_character_at_a_time() {
        let r = redactor();
        for (id, text) in examples() {
            let pieces: Vec<String> = text.chars().map(String::from).collect();
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let out = stream(&r, &refs);
            assert!(out.contains(&format!("[REDACTED:{id}]")), "{id}: {out}");
            assert_eq!(out, r.redact(&text).0);
        }
    }

    #[test]
    fn hold_back_is_bounded_for_plain_text() {
        let r = redactor();
        let mut s = StreamRedactor::new(r);
        let mut released = 0;
        for _ in 0..200 {
            released += s
                .push("plain words without anything sensitive in them ")
                .len();
            assert!(s.held() <= HOLD + 64, "held {}", s.held());
        }
        assert!(released > 8000);
    }

    #[test]
    fn an_open_pem_block_is_held_until_it_ends() {
        let r = redactor();
        let mut s = StreamRedactor::new(r);
        let mut out = s.push("here: -----BEGIN PRIVATE KEY-----\n");
        for _ in 0..100 {
            out += &s.push("MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n");
        }
        assert!(
            !out.contains("MIIEvQ"),
            "key material released before the block ended"
        );
        out += &s.push("-----END PRIVATE KEY-----\n done");
        out += &s.finish();
        assert!(
            out.contains("[REDACTED:private-key]") && out.ends_with("done"),
            "{out}"
        );
        assert!(!out.contains("MIIEvQ"));
    }
}

/// The response stage over every field of the chat and completions reply
/// schemas that can carry generated text, JSON and streamed.
mod stage {
    use super::*;
    use crate::chain::Decision;
    use crate::redact::stage::RedactStage;
    use crate::request::Route;
    use crate::response::{ResponseContext, ResponseStage};
    use crate::shared::Shared;
    use crate::sse::SseEvent;
    use serde_json::{json, Value};

    const SECRET: &str = "ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i";

    fn stage() -> RedactStage {
        RedactStage::new(Shared::new(compile()))
    }

    fn ctx(route: Route) -> ResponseContext<'static> {
        ResponseContext {
            request_id: "t",
            route,
            model: None,
            principal: None,
        }
    }

    fn pieces(text: &str, n: usize) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        chars.chunks(n).map(|c| c.iter().collect()).collect()
    }

    fn logprob(token: &str) -> Value {
        json!({"token": token, "logprob": -0.5, "bytes": token.as_bytes(),
            "top_logprobs": [{"token": token, "logprob": -0.5, "bytes": token.as_bytes()}]})
    }

    /// Every token string of a JSON value, joined.
    fn tokens_of(v: &Value) -> String {
        let mut out = String::new();
        if let Some(list) = v.pointer("/logprobs/content").and_then(Value::as_array) {
            for e in list {
                out.push_str(e["token"].as_str().unwrap_or(""));
            }
        }
        out
    }

    #[test]
    fn json_every_text_field_is_redacted() {
        let half = SECRET.len() / 2;
        let toks: Vec<Value> = pieces(&format!("key {SECRET} ok"), 3)
            .iter()
            .map(|t| logprob(t))
            .collect();
        let mut body = json!({"choices": [
            {"index": 0, "finish_reason": "stop", "logprobs": {"content": toks, "refusal": null},
             "message": {
                "role": "assistant",
                "content": [{"type": "text", "text": format!("part one {}", &SECRET[..half])},
                            {"type": "text", "text": format!("{} part two", &SECRET[half..])}],
                "refusal": format!("no: {SECRET}"),
                "reasoning_content": format!("thinking {SECRET}"),
                "reasoning": format!("also {SECRET}"),
                "function_call": {"name": "f", "arguments": json!({"k": SECRET}).to_string()},
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "g", "arguments": json!({"a": [SECRET]}).to_string()}},
                    {"id": "c2", "type": "custom", "custom": {"name": "h", "input": format!("raw {SECRET}")}}],
                "audio": {"id": "a1", "data": "UklGRg==", "transcript": format!("say {SECRET}"), "expires_at": 1},
                "annotations": [{"type": "url_citation", "url_citation": {"url": format!("https://x/{SECRET}"), "title": "t"}}],
                "vendor_extra": {"note": SECRET}
             }},
            {"index": 1, "finish_reason": "stop", "message": {"role": "assistant", "content": SECRET}},
            "not an object", 5
        ]});
        let outcome = stage()
            .on_json(&ctx(Route::ChatCompletions), &mut body)
            .unwrap();
        let text = body.to_string();
        assert!(!text.contains(SECRET), "{text}");
        assert!(
            !text.contains(&SECRET[..half]),
            "split across parts: {text}"
        );
        assert!(!tokens_of(&body["choices"][0]).contains(SECRET));
        assert!(tokens_of(&body["choices"][0]).contains("[REDACTED:github-token]"));
        let args: Value = serde_json::from_str(
            body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap(),
        )
        .expect("arguments stay JSON");
        assert_eq!(args["a"][0], "[REDACTED:github-token]");
        assert_eq!(body["choices"][0]["message"]["audio"]["data"], "");
        assert_eq!(
            body["choices"][0]["message"]["tool_calls"][1]["custom"]["name"],
            "h"
        );
        let Decision::Annotate(a) = outcome else {
            panic!("expected annotations")
        };
        assert_eq!(a[0].value["github-token"], 11, "{:?}", a);
        assert_eq!(a[1].key, "audio_withheld");
    }

    #[test]
    fn json_completions_text_and_legacy_logprobs() {
        let toks = pieces(&format!("a {SECRET} b"), 2);
        let mut body = json!({"choices": [{"index": 0, "text": format!("a {SECRET} b"),
            "logprobs": {"tokens": toks, "token_logprobs": vec![-1.0; toks.len()],
                "top_logprobs": toks.iter().map(|t| json!({t.as_str(): -1.0})).collect::<Vec<_>>(),
                "text_offset": (0..toks.len()).collect::<Vec<_>>()}}]});
        stage()
            .on_json(&ctx(Route::Completions), &mut body)
            .unwrap();
        assert!(!body.to_string().contains("Zq8X"), "{body}");
        let joined: String = body["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(joined, "a [REDACTED:github-token] b");
    }

    fn event(choices: Value) -> SseEvent {
        SseEvent::data(
            json!({"id": "c", "object": "chat.completion.chunk", "choices": choices}).to_string(),
        )
    }

    /// Run events through a stream stage; return every output event's JSON.
    fn run(route: Route, events: Vec<SseEvent>) -> Vec<Value> {
        let mut s = stage().stream(&ctx(route));
        let mut out = Vec::new();
        for e in events {
            s.on_event(e, &mut out).unwrap();
        }
        s.on_event(SseEvent::data("[DONE]"), &mut out).unwrap();
        s.finish(&mut out).unwrap();
        out.iter().filter_map(SseEvent::json).collect()
    }

    /// A field of every choice `index` across events, joined.
    fn joined(events: &[Value], index: u64, pointer: &str) -> String {
        let mut out = String::new();
        for e in events {
            for c in e["choices"].as_array().into_iter().flatten() {
                if c["index"].as_u64() == Some(index) {
                    if let Some(s) = c.pointer(pointer).and_then(Value::as_str) {
                        out.push_str(s);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn stream_several_choices_per_event_and_every_field() {
        let text = format!("the key {SECRET} is here");
        let args = json!({"city": SECRET}).to_string();
        let p = pieces(&text, 3);
        let a = pieces(&args, 3);
        let mut events = vec![event(json!([
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null},
            {"index": 1, "delta": {"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
             "finish_reason": null},
            {"index": 2, "delta": {"role": "assistant"}, "finish_reason": null}
        ]))];
        for i in 0..p.len().max(a.len()) {
            let mut choices = Vec::new();
            if let Some(piece) = p.get(i) {
                choices.push(json!({"index": 0, "delta": {"content": piece}, "logprobs": {"content": [logprob(piece)]}, "finish_reason": null}));
                choices.push(
                    json!({"index": 2, "delta": {"reasoning_content": piece, "refusal": piece,
                    "audio": {"transcript": piece}}, "finish_reason": null}),
                );
            }
            if let Some(piece) = a.get(i) {
                choices.push(json!({"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, "finish_reason": null}));
            }
            events.push(event(Value::Array(choices)));
        }
        events.push(event(json!([
            {"index": 0, "delta": {}, "finish_reason": "stop"},
            {"index": 1, "delta": {}, "finish_reason": "tool_calls"}
        ])));
        // Choice 2 never finishes: released before [DONE].
        let out = run(Route::ChatCompletions, events);
        let all = serde_json::to_string(&out).unwrap();
        assert!(!all.contains(SECRET), "{all}");
        let redacted = "the key [REDACTED:github-token] is here";
        assert_eq!(joined(&out, 0, "/delta/content"), redacted);
        assert_eq!(joined(&out, 2, "/delta/reasoning_content"), redacted);
        assert_eq!(joined(&out, 2, "/delta/refusal"), redacted);
        assert_eq!(joined(&out, 2, "/delta/audio/transcript"), redacted);
        let mut toks = String::new();
        for e in &out {
            for c in e["choices"].as_array().into_iter().flatten() {
                if c["index"] == 0 {
                    toks.push_str(&tokens_of(c));
                }
            }
        }
        assert_eq!(toks, redacted);
        let mut args_out = String::new();
        for e in &out {
            for c in e["choices"].as_array().into_iter().flatten() {
                for t in c
                    .pointer("/delta/tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    args_out.push_str(
                        t.pointer("/function/arguments")
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                    );
                }
            }
        }
        let parsed: Value = serde_json::from_str(&args_out).expect("streamed arguments are JSON");
        assert_eq!(parsed["city"], "[REDACTED:github-token]");
    }

    #[test]
    fn stream_content_parts_and_legacy_function_call() {
        let p = pieces(SECRET, 5);
        let mut events: Vec<SseEvent> = p
            .iter()
            .map(|piece| {
                event(
                    json!([{"index": 0, "delta": {"content": [{"type": "text", "text": piece}],
                "function_call": {"arguments": piece}}, "finish_reason": null}]),
                )
            })
            .collect();
        events.push(event(
            json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        ));
        let out = run(Route::ChatCompletions, events);
        let all = serde_json::to_string(&out).unwrap();
        assert!(!all.contains("Zq8XvT2"), "{all}");
        assert!(all.contains("[REDACTED:github-token]"));
    }

    /// A text field no schema here names, streamed in pieces by some
    /// provider, is reassembled like `content`.
    #[test]
    fn stream_unknown_text_fields_are_reassembled() {
        let mut events: Vec<SseEvent> = pieces(&format!("hmm {SECRET} ok"), 3)
            .iter()
            .map(|piece| {
                event(json!([{"index": 0, "delta": {"thinking": piece}, "finish_reason": null}]))
            })
            .collect();
        events.push(event(
            json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        ));
        let out = run(Route::ChatCompletions, events);
        assert_eq!(
            joined(&out, 0, "/delta/thinking"),
            "hmm [REDACTED:github-token] ok"
        );
    }

    #[test]
    fn stream_completions_text() {
        let events: Vec<SseEvent> = pieces(&format!("x {SECRET} y"), 2)
            .iter()
            .map(|piece| {
                SseEvent::data(
                    json!({"choices": [{"index": 0, "text": piece, "finish_reason": null}]})
                        .to_string(),
                )
            })
            .collect();
        let out = run(Route::Completions, events);
        assert_eq!(joined(&out, 0, "/text"), "x [REDACTED:github-token] y");
    }

    #[test]
    fn stream_audio_is_withheld_when_its_transcript_had_a_secret() {
        let clip = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"pcm bytes");
        let run_with = |transcript: &str| {
            let events = vec![
                event(
                    json!([{"index": 0, "delta": {"audio": {"id": "a", "data": clip, "transcript": transcript}}, "finish_reason": null}]),
                ),
                event(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])),
            ];
            run(Route::ChatCompletions, events)
        };
        let clean = run_with("hello there");
        assert_eq!(joined(&clean, 0, "/delta/audio/data"), clip);
        let leaky = run_with(&format!("the key is {SECRET}"));
        assert_eq!(joined(&leaky, 0, "/delta/audio/data"), "");
    }

    #[test]
    fn odd_shapes_never_panic() {
        for data in [
            json!(5),
            json!({"choices": 5}),
            json!({"choices": [5, "x", null, {"delta": 5}, {"delta": {"content": 5}}]}),
            json!({"choices": [{"delta": {"tool_calls": "x", "function_call": 1, "audio": [1]}}]}),
            json!({"choices": [{"logprobs": {"content": "x", "tokens": 5}}]}),
            json!({"choices": [{"index": "x", "finish_reason": "stop", "delta": {"content": SECRET}}]}),
            json!({"choices": [{"message": {"tool_calls": {"a": SECRET}, "function_call": SECRET}}]}),
            json!({"choices": [{"delta": {"tool_calls": {"a": SECRET}, "function_call": SECRET}}]}),
        ] {
            let out = run(
                Route::ChatCompletions,
                vec![SseEvent::data(data.to_string())],
            );
            assert!(!serde_json::to_string(&out).unwrap().contains(SECRET));
            let mut body = data.clone();
            stage()
                .on_json(&ctx(Route::ChatCompletions), &mut body)
                .unwrap();
            assert!(!body.to_string().contains(SECRET), "{body}");
        }
    }
}
