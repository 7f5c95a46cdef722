//! The command line: config checking and every shipped config file.

use crate::support::bin;
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

#[test]
fn every_shipped_config_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (ok, out) = check(&path, &[("OPENAI_API_KEY", "sk-test")]);
            assert!(ok, "{}: {out}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 2);
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
