use super::*;

fn redactor() -> Redactor {
    let policy: RedactionPolicy =
        serde_yaml::from_str(include_str!("../../../policies/redaction.yaml"))
            .expect("shipped policy parses");
    Redactor::build(&policy).expect("shipped policy compiles")
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
