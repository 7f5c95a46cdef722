//! `portcullis models …`, `portcullis freeze|unfreeze …`: the admin API
//! from the command line, printed as tables.

use super::{admin_client, print, AdminArgs, FreezeWho};
use std::process::ExitCode;

use crate::http_server::percent_encode;
use serde_json::Value;

/// Model fields shown by `models list` (field, column header); `show`
/// adds `approved_at`.
const MODEL_COLUMNS: [(&str, &str); 7] = [
    ("id", "ID"),
    ("status", "STATUS"),
    ("risk_tier", "RISK"),
    ("provider", "PROVIDER"),
    ("upstream_model", "UPSTREAM MODEL"),
    ("version", "VERSION"),
    ("approved_by", "APPROVED BY"),
];

/// Where the admin API is and who calls it.
pub struct AdminClient {
    pub url: String,
    pub token: String,
}

impl AdminClient {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()?;
            let url = format!("{}{path}", self.url.trim_end_matches('/'));
            let mut req = if method == "GET" {
                client.get(&url)
            } else {
                client.post(&url)
            };
            req = req.bearer_auth(&self.token);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{url}: {e} (is the gateway running? --admin-url)"))?;
            let status = resp.status();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                anyhow::bail!(
                    "{} {}: {}",
                    status.as_u16(),
                    v["error"]["code"].as_str().unwrap_or("error"),
                    v["error"]["message"].as_str().unwrap_or("")
                );
            }
            Ok(v)
        })
    }

    pub fn list(&self) -> anyhow::Result<String> {
        let v = self.call("GET", "/admin/models", None)?;
        let rows: Vec<Vec<String>> = v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| MODEL_COLUMNS.iter().map(|(f, _)| cell(&m[*f])).collect())
            .collect();
        let header: Vec<&str> = MODEL_COLUMNS.iter().map(|(_, h)| *h).collect();
        Ok(table(&header, &rows))
    }

    pub fn show(&self, id: &str) -> anyhow::Result<String> {
        let m = self.call(
            "GET",
            &format!("/admin/models/{}", percent_encode(id)),
            None,
        )?;
        let mut out = String::new();
        let fields = MODEL_COLUMNS.iter().map(|(f, _)| *f).chain(["approved_at"]);
        for f in fields {
            out.push_str(&format!("{f:<15} {}\n", cell(&m[f])));
        }
        let rows: Vec<Vec<String>> = m["history"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                vec![
                    cell(&t["at"]),
                    cell(&t["from"]),
                    cell(&t["to"]),
                    cell(&t["actor"]),
                ]
            })
            .collect();
        out.push_str("\nhistory\n");
        out.push_str(&table(&["AT", "FROM", "TO", "ACTOR"], &rows));
        Ok(out)
    }

    pub fn register(&self, body: Value) -> anyhow::Result<String> {
        let m = self.call("POST", "/admin/models", Some(body))?;
        Ok(format!(
            "registered {} ({})\n",
            cell(&m["id"]),
            cell(&m["status"])
        ))
    }

    pub fn lifecycle(&self, id: &str, action: &str) -> anyhow::Result<String> {
        let m = self.call(
            "POST",
            &format!("/admin/models/{}/{action}", percent_encode(id)),
            None,
        )?;
        Ok(format!(
            "{} is now {}\n",
            cell(&m["id"]),
            cell(&m["status"])
        ))
    }

    pub fn freeze(&self, kind: &str, name: &str, frozen: bool) -> anyhow::Result<String> {
        let action = if frozen { "freeze" } else { "unfreeze" };
        let v = self.call(
            "POST",
            &format!("/admin/{kind}/{}/{action}", percent_encode(name)),
            None,
        )?;
        let state = if frozen { "frozen" } else { "not frozen" };
        let note = if v["changed"] == Value::Bool(false) {
            " (no change)"
        } else {
            ""
        };
        Ok(format!(
            "{} {name} is {state}{note}\n",
            kind.trim_end_matches('s')
        ))
    }
}

/// Approval fields shown by `approvals list` (field, column header).
const APPROVAL_COLUMNS: [(&str, &str); 7] = [
    ("id", "ID"),
    ("state", "STATE"),
    ("subject", "SUBJECT"),
    ("tenant", "TENANT"),
    ("tools", "TOOLS"),
    ("model", "MODEL"),
    ("expires_at", "EXPIRES"),
];

impl AdminClient {
    pub fn approvals(&self, state: Option<&str>) -> anyhow::Result<String> {
        let query = state
            .map(|s| format!("?state={}", percent_encode(s)))
            .unwrap_or_default();
        let v = self.call("GET", &format!("/admin/approvals{query}"), None)?;
        let rows: Vec<Vec<String>> = v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| APPROVAL_COLUMNS.iter().map(|(f, _)| cell(&a[*f])).collect())
            .collect();
        let header: Vec<&str> = APPROVAL_COLUMNS.iter().map(|(_, h)| *h).collect();
        Ok(table(&header, &rows))
    }

    /// One approval: its fields, then each held call as JSON (what the
    /// approver decides on).
    pub fn approval(&self, id: &str) -> anyhow::Result<String> {
        let a = self.call(
            "GET",
            &format!("/admin/approvals/{}", percent_encode(id)),
            None,
        )?;
        let mut out = String::new();
        let fields = APPROVAL_COLUMNS.iter().map(|(f, _)| *f).chain([
            "created_at",
            "request_id",
            "route",
            "decided_by",
            "decided_at",
            "reason",
            "used_at",
            "used_by_request",
        ]);
        for f in fields {
            out.push_str(&format!("{f:<16} {}\n", cell(&a[f])));
        }
        out.push_str("\ncalls\n");
        for c in a["calls"].as_array().into_iter().flatten() {
            out.push_str(&format!("choice {}: {}\n", cell(&c["choice"]), c["call"]));
        }
        Ok(out)
    }

    pub fn decide(&self, id: &str, action: &str, reason: Option<String>) -> anyhow::Result<String> {
        let a = self.call(
            "POST",
            &format!("/admin/approvals/{}/{action}", percent_encode(id)),
            Some(serde_json::json!({ "reason": reason })),
        )?;
        Ok(format!(
            "{} is now {} (expires {})\n",
            cell(&a["id"]),
            cell(&a["state"]),
            cell(&a["expires_at"])
        ))
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `portcullis freeze|unfreeze --subject S | --tenant T`.
pub(super) fn freeze(admin: AdminArgs, who: FreezeWho, frozen: bool) -> ExitCode {
    let client = match admin_client(admin) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (kind, name) = match (who.subject, who.tenant) {
        (Some(s), _) => ("subjects", s),
        (None, Some(t)) => ("tenants", t),
        (None, None) => return ExitCode::from(2),
    };
    print(client.freeze(kind, &name, frozen))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tables_align() {
        let t = super::table(
            &["ID", "STATUS"],
            &[
                vec!["gpt-4o-mini".into(), "approved".into()],
                vec!["m".into(), "-".into()],
            ],
        );
        assert_eq!(
            t,
            "ID           STATUS\ngpt-4o-mini  approved\nm            -\n"
        );
    }
}
