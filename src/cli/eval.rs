//! `portcullis eval`: precision and recall of the redaction rules on
//! labelled corpora (gitleaks' rule examples for secrets; Presidio's
//! synthetic sentences for PII, span-exact on the types a regex can find),
//! and the injection screen's recall and false positives on labelled
//! attack and benign prompts.

use crate::cli::admin::table;
use filters::redact::{Kind, Redactor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

pub fn load_redactor(policy: &Path) -> anyhow::Result<Redactor> {
    crate::proxy::pipeline::load_redactor(policy).map_err(|e| anyhow::anyhow!(e.join("\n")))
}

#[derive(Deserialize)]
struct SecretRow {
    rule_id: String,
    kind: String,
    text: String,
}

#[derive(Default)]
struct Tally {
    positives: usize,
    caught: usize,
    negatives: usize,
    flagged: usize,
}

fn pct(n: usize, d: usize) -> String {
    if d == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * n as f64 / d as f64)
    }
}

/// Secrets: a true positive must be redacted (by any rule), a false
/// positive must survive untouched.
pub fn secrets(r: &Redactor, file: &Path, misses: bool) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)?;
    let mut by_source: BTreeMap<String, Tally> = BTreeMap::new();
    let mut by_rule: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut all = Tally::default();
    let mut listed = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let row: SecretRow = serde_json::from_str(line)?;
        let found = r.find(&row.text);
        let hit = !found.is_empty();
        if misses && hit != (row.kind == "true_positive") {
            let what = if hit {
                format!("false alarm ({})", rules_of(&found))
            } else {
                "missed".into()
            };
            listed += &format!("{}: {what}: {:?}\n", row.rule_id, row.text);
        }
        let t = by_source.entry(row.rule_id.clone()).or_default();
        if row.kind == "true_positive" {
            t.positives += 1;
            all.positives += 1;
            t.caught += usize::from(hit);
            all.caught += usize::from(hit);
        } else {
            t.negatives += 1;
            all.negatives += 1;
            t.flagged += usize::from(hit);
            all.flagged += usize::from(hit);
        }
        for f in found {
            let e = by_rule.entry(f.rule).or_default();
            if row.kind == "true_positive" {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
    }
    let rows: Vec<Vec<String>> = by_source
        .iter()
        .map(|(id, t)| {
            vec![
                id.clone(),
                format!("{}/{}", t.caught, t.positives),
                format!("{}/{}", t.flagged, t.negatives),
            ]
        })
        .collect();
    let mut out =
        String::from("Secrets, by corpus rule (caught true positives, flagged false positives):\n");
    out += &table(&["CORPUS RULE", "CAUGHT", "FALSE ALARMS"], &rows);
    let rule_rows: Vec<Vec<String>> = by_rule
        .iter()
        .map(|(id, (tp, fp))| {
            vec![
                id.clone(),
                tp.to_string(),
                fp.to_string(),
                pct(*tp, tp + fp),
            ]
        })
        .collect();
    out +=
        "\nSecrets, by Portcullis rule (findings in true-positive rows, in false-positive rows):\n";
    out += &table(
        &["RULE", "IN TP ROWS", "IN FP ROWS", "PRECISION"],
        &rule_rows,
    );
    out += &format!(
        "\nsecrets overall: recall {} ({}/{} true positives redacted), precision {} ({} of {} false positives flagged)\n",
        pct(all.caught, all.positives),
        all.caught,
        all.positives,
        pct(all.caught, all.caught + all.flagged),
        all.flagged,
        all.negatives
    );
    Ok(listed + &out)
}

fn rules_of(found: &[filters::redact::Finding]) -> String {
    let mut ids: Vec<&str> = found.iter().map(|f| f.rule.as_str()).collect();
    ids.dedup();
    ids.join(", ")
}

#[derive(Deserialize)]
struct PiiRow {
    full_text: String,
    spans: Vec<PiiSpan>,
}

#[derive(Deserialize)]
struct PiiSpan {
    entity_type: String,
    start_position: usize,
    end_position: usize,
}

/// The corpus entity type each PII rule finds.
fn entity(rule: &str) -> Option<&'static str> {
    Some(match rule {
        "email" => "EMAIL_ADDRESS",
        "phone" => "PHONE_NUMBER",
        "credit-card" => "CREDIT_CARD",
        "us-ssn" => "US_SSN",
        "iban" => "IBAN_CODE",
        "ipv4" | "ipv6" => "IP_ADDRESS",
        _ => return None,
    })
}

const PII_TYPES: [&str; 6] = [
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "US_SSN",
    "IBAN_CODE",
    "IP_ADDRESS",
];

/// PII: span-exact precision and recall per entity type.
pub fn pii(r: &Redactor, file: &Path, misses: bool) -> anyhow::Result<String> {
    let rows: Vec<PiiRow> = serde_json::from_str(&std::fs::read_to_string(file)?)?;
    // type -> (true positives, predicted, gold)
    let mut counts: BTreeMap<&str, (usize, usize, usize)> =
        PII_TYPES.iter().map(|t| (*t, (0, 0, 0))).collect();
    let mut listed = String::new();
    for row in rows {
        let gold: Vec<(usize, usize, &str)> = row
            .spans
            .iter()
            .filter_map(|s| {
                PII_TYPES
                    .iter()
                    .find(|t| **t == s.entity_type)
                    .map(|t| (s.start_position, s.end_position, *t))
            })
            .collect();
        // Findings are byte offsets; the corpus counts characters.
        let char_at = |byte: usize| row.full_text[..byte].chars().count();
        let predicted: Vec<(usize, usize, &str)> = r
            .find(&row.full_text)
            .into_iter()
            .filter(|f| f.kind == Kind::Pii)
            .filter_map(|f| {
                entity(r.entity(&f.rule)).map(|t| (char_at(f.start), char_at(f.end), t))
            })
            .collect();
        let span = |s: &(usize, usize, &str)| -> String {
            row.full_text.chars().skip(s.0).take(s.1 - s.0).collect()
        };
        for g in &gold {
            if let Some(c) = counts.get_mut(g.2) {
                c.2 += 1;
                c.0 += usize::from(predicted.contains(g));
            }
            if misses && !predicted.contains(g) {
                listed += &format!("{}: missed {:?} in {:?}\n", g.2, span(g), row.full_text);
            }
        }
        for p in &predicted {
            if let Some(c) = counts.get_mut(p.2) {
                c.1 += 1;
            }
            if misses && !gold.contains(p) {
                listed += &format!(
                    "{}: false alarm {:?} in {:?}\n",
                    p.2,
                    span(p),
                    row.full_text
                );
            }
        }
    }
    let rows: Vec<Vec<String>> = counts
        .iter()
        .map(|(t, (tp, pred, gold))| {
            vec![
                t.to_string(),
                pct(*tp, *pred),
                pct(*tp, *gold),
                format!("{tp}/{gold}"),
                pred.to_string(),
            ]
        })
        .collect();
    let (tp, pred, gold) = counts
        .values()
        .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
    let mut out = String::from("PII, span-exact, by entity type:\n");
    out += &table(
        &["TYPE", "PRECISION", "RECALL", "FOUND/GOLD", "PREDICTED"],
        &rows,
    );
    out += &format!(
        "\npii overall: precision {}, recall {} ({tp}/{gold}, {pred} predicted)\n",
        pct(tp, pred),
        pct(tp, gold)
    );
    Ok(listed + &out)
}

#[derive(Deserialize)]
struct InjectionRow {
    text: String,
    label: String,
    #[serde(default)]
    set: String,
}

/// Injection: each row is scanned as a caller's message. Per set and
/// overall: how many rows reach the block and the flag thresholds
/// (recall on attacks, false-positive rate on benign rows), and the time
/// the screen took per KiB.
pub fn injection(
    d: &filters::injection::Detector,
    file: &Path,
    misses: bool,
) -> anyhow::Result<String> {
    use filters::injection::Source;
    let text = std::fs::read_to_string(file)?;
    let limits = d.policy().thresholds;
    // (label, set) -> (rows, blocked, flagged)
    let mut by_set: BTreeMap<(String, String), (usize, usize, usize)> = BTreeMap::new();
    let mut by_label: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    let mut by_rule: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut listed = String::new();
    let (mut bytes, mut spent) = (0usize, std::time::Duration::ZERO);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let row: InjectionRow = serde_json::from_str(line)?;
        let attack = match row.label.as_str() {
            "attack" => true,
            "benign" => false,
            other => anyhow::bail!("label {other:?}: expected attack or benign"),
        };
        let started = std::time::Instant::now();
        let scan = d.scan(&row.text, Source::Direct);
        spent += started.elapsed();
        bytes += row.text.len();
        let blocked = scan.score >= limits.block;
        let flagged = scan.score >= limits.flag;
        for key in [
            by_set
                .entry((row.label.clone(), row.set.clone()))
                .or_default(),
            by_label.entry(row.label.clone()).or_default(),
        ] {
            key.0 += 1;
            key.1 += usize::from(blocked);
            key.2 += usize::from(flagged);
        }
        for f in &scan.findings {
            let e = by_rule.entry(f.clone()).or_default();
            if attack {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        if misses && blocked != attack {
            let what = if attack { "missed" } else { "false alarm" };
            let excerpt: String = row.text.chars().take(200).collect();
            listed += &format!(
                "{}: {what} (score {:.2}; {}): {excerpt:?}\n",
                row.set,
                scan.score,
                scan.findings.join(", ")
            );
        }
    }
    let rate = |label: &str, t: &(usize, usize, usize)| {
        let name = if label == "attack" {
            "recall"
        } else {
            "false positives"
        };
        format!(
            "{name} {} ({}/{}), flagged {}",
            pct(t.1, t.0),
            t.1,
            t.0,
            pct(t.2, t.0)
        )
    };
    let rows: Vec<Vec<String>> = by_set
        .iter()
        .map(|((label, set), t)| {
            vec![
                set.clone(),
                label.clone(),
                t.0.to_string(),
                format!("{} ({})", t.1, pct(t.1, t.0)),
                format!("{} ({})", t.2, pct(t.2, t.0)),
            ]
        })
        .collect();
    let mut out = format!(
        "Injection, by set (block at {}, flag at {}):\n",
        limits.block, limits.flag
    );
    out += &table(&["SET", "LABEL", "ROWS", "BLOCKED", "FLAGGED"], &rows);
    let rules: Vec<Vec<String>> = by_rule
        .iter()
        .map(|(r, (a, b))| vec![r.clone(), a.to_string(), b.to_string()])
        .collect();
    out += "\nFindings by rule (rows where it matched):\n";
    out += &table(&["RULE", "ATTACK", "BENIGN"], &rules);
    for (label, t) in &by_label {
        out += &format!("\ninjection {label}: {}", rate(label, t));
    }
    let kib = bytes as f64 / 1024.0;
    out += &format!(
        "\ninjection time: {:.2} µs per KiB ({kib:.0} KiB in {:.1} ms)\n",
        spent.as_secs_f64() * 1e6 / kib.max(1e-9),
        spent.as_secs_f64() * 1e3
    );
    Ok(listed + &out)
}

/// `portcullis eval`: the reports asked for, or an error naming what to
/// give.
pub fn run(
    secrets: Option<&Path>,
    pii: Option<&Path>,
    policy: &Path,
    injection: Option<&Path>,
    injection_policy: &Path,
    misses: bool,
) -> anyhow::Result<String> {
    let mut out = String::new();
    if secrets.is_some() || pii.is_some() {
        let r = load_redactor(policy)?;
        if let Some(f) = secrets {
            out += &self::secrets(&r, f, misses)?;
        }
        if let Some(f) = pii {
            out += &self::pii(&r, f, misses)?;
        }
    }
    if let Some(f) = injection {
        let d = crate::proxy::pipeline::load_injection(injection_policy)
            .map_err(|e| anyhow::anyhow!(e.join("\n")))?;
        out += &self::injection(&d, f, misses)?;
    }
    if out.is_empty() {
        anyhow::bail!("give --secrets FILE, --pii FILE and/or --injection FILE");
    }
    Ok(out)
}
