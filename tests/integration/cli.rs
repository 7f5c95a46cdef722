//! The command line: config checking and every shipped config file.

use crate::support::{bin, shipped_tree};
use std::process::Command;

fn check(path: &std::path::Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(path)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The operator's keys for `config/portcullis.yaml`: a folder with one
/// public key that is not the dev key.
fn operator_keys(tree: &tempfile::TempDir) -> String {
    let dir = tree.path().join("operator-keys");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tree.path().join("keys/dev.pem"), dir.join("idp-2026.pem")).unwrap();
    dir.display().to_string()
}

#[test]
fn every_shipped_config_and_policy_loads() {
    let tree = shipped_tree();
    let keys = operator_keys(&tree);
    let env = [
        ("OPENAI_API_KEY", "sk-test"),
        (
            "PORTCULLIS_JWT_ISSUER",
            "https://idp.example.com/realms/acme",
        ),
        ("PORTCULLIS_KEYS_DIR", keys.as_str()),
    ];
    let mut seen = 0;
    for entry in std::fs::read_dir(tree.path().join("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (ok, out) = check(&path, &env);
            assert!(ok, "{}: {out}", path.display());
            seen += 1;
        }
    }
    assert_eq!(seen, 3, "portcullis.yaml, demo.yaml, cluster.yaml");
}

/// Issue 8, item 10: the production config trusts neither the dev issuer
/// nor the dev key pair unless the config says it is a demo.
#[test]
fn the_production_config_refuses_the_dev_issuer_and_the_dev_key() {
    let tree = shipped_tree();
    let config = tree.path().join("config/portcullis.yaml");
    let keys = operator_keys(&tree);
    let (ok, out) = check(
        &config,
        &[
            ("OPENAI_API_KEY", "sk-test"),
            ("PORTCULLIS_KEYS_DIR", &keys),
        ],
    );
    assert!(!ok);
    assert!(out.contains("PORTCULLIS_JWT_ISSUER is not set"), "{out}");
    let (ok, out) = check(
        &config,
        &[
            ("OPENAI_API_KEY", "sk-test"),
            ("PORTCULLIS_KEYS_DIR", &keys),
            ("PORTCULLIS_JWT_ISSUER", "portcullis-dev"),
        ],
    );
    assert!(!ok);
    assert!(
        out.contains("auth.issuer: 'portcullis-dev' is the dev issuer"),
        "{out}"
    );
    // The default keys folder holds the dev key pair: refused too.
    let (ok, out) = check(
        &config,
        &[
            ("OPENAI_API_KEY", "sk-test"),
            (
                "PORTCULLIS_JWT_ISSUER",
                "https://idp.example.com/realms/acme",
            ),
        ],
    );
    assert!(!ok);
    assert!(out.contains("kid 'dev' is loaded"), "{out}");
    // `serve` refuses to start the same way.
    let serve = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("OPENAI_API_KEY", "sk-test")
        .env("PORTCULLIS_JWT_ISSUER", "portcullis-dev")
        .env("PORTCULLIS_KEYS_DIR", &keys)
        .output()
        .unwrap();
    assert!(!serve.status.success());
    assert!(String::from_utf8_lossy(&serve.stderr).contains("dev issuer"));
    // The demo config says it is a demo.
    let (ok, out) = check(&tree.path().join("config/demo.yaml"), &[]);
    assert!(ok, "{out}");
}

#[test]
fn check_config_loads_keys_and_policies() {
    let tree = shipped_tree();
    std::fs::remove_file(tree.path().join("keys/dev.pem")).unwrap();
    std::fs::write(
        tree.path().join("policies/rate-limits.yaml"),
        "tiers: []\ndefault_tier: none\n",
    )
    .unwrap();
    let (ok, out) = check(&tree.path().join("config/demo.yaml"), &[]);
    assert!(!ok);
    assert!(out.contains("no *.pem public keys"), "{out}");
    assert!(out.contains("default_tier: no tier 'none'"), "{out}");
}

#[test]
fn token_minted_by_the_cli_has_the_requested_claims() {
    let tree = shipped_tree();
    let out = Command::new(bin())
        .args([
            "token", "--sub", "carol", "--tenant", "acme", "--roles", "user,ops", "--ttl", "10m",
            "--key",
        ])
        .arg(tree.path().join("keys/private/dev.key"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let payload = token.trim().split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "carol");
    assert_eq!(claims["tenant"], "acme");
    assert_eq!(claims["roles"], serde_json::json!(["user", "ops"]));
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        600
    );
    assert_eq!(claims["iss"], "portcullis-dev");
}

#[test]
fn check_config_reports_every_error_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "server: { listen: nowhere }\nproviders:\n  p: { base_url: 'ftp://x', api_key: '${UNSET_FOR_TEST}' }\nmodels:\n  m: { provider: q }\nextra: 1\n",
    )
    .unwrap();
    let (ok, out) = check(&path, &[]);
    assert!(!ok);
    for needle in [
        "server.listen",
        "providers.p.api_key: environment variable UNSET_FOR_TEST is not set",
        "providers.p.base_url",
        "models.m.provider",
        "extra: unknown section",
        "5 error(s)",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    assert!(out.contains("bad.yaml"));
}

#[test]
fn serve_refuses_a_bad_config_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "providers: {}\nmodels:\n  m: { provider: none }\n").unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("models.m.provider"));
}

#[test]
fn eval_reports_precision_and_recall_per_rule() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.jsonl");
    std::fs::write(
        &secrets,
        [
            r#"{"rule_id": "github-pat", "kind": "true_positive", "text": "token ghp_Zq8XvT2mKp4LwR9sBn6YdF3jHc7GtA1eUo5i"}"#,
            r#"{"rule_id": "github-pat", "kind": "true_positive", "text": "nothing recognisable here"}"#,
            r#"{"rule_id": "github-pat", "kind": "false_positive", "text": "ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let pii = dir.path().join("pii.json");
    std::fs::write(
        &pii,
        r#"[{"full_text": "mail jo@corp.net or call 905-674-3793", "spans": [
            {"entity_type": "EMAIL_ADDRESS", "entity_value": "jo@corp.net", "start_position": 5, "end_position": 16},
            {"entity_type": "PHONE_NUMBER", "entity_value": "905-674-3793", "start_position": 25, "end_position": 37}]}]"#,
    )
    .unwrap();
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/redaction.yaml");
    let out = Command::new(bin())
        .args(["eval", "--secrets"])
        .arg(&secrets)
        .arg("--pii")
        .arg(&pii)
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("secrets overall: recall 50.0% (1/2 true positives redacted), precision 100.0% (0 of 1 false positives flagged)"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("github-pat") && l.contains("1/2") && l.contains("0/1")),
        "{text}"
    );
    assert!(
        text.contains("pii overall: precision 100.0%, recall 100.0% (2/2, 2 predicted)"),
        "{text}"
    );
}
