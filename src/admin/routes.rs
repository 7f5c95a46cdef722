//! The admin listener's routes: one table, matched here, documented in
//! `docs/admin-api.yaml` (a test fails when one is missing there).

/// Every route of the admin listener, `{name}` for a path segment.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/admin/models"),
    ("POST", "/admin/models"),
    ("GET", "/admin/models/{id}"),
    ("POST", "/admin/models/{id}/{action}"),
    ("POST", "/admin/subjects/{sub}/{action}"),
    ("POST", "/admin/tenants/{tenant}/{action}"),
    ("GET", "/admin/approvals"),
    ("GET", "/admin/approvals/{id}"),
    ("POST", "/admin/approvals/{id}/{action}"),
    ("POST", "/admin/simulate"),
    ("POST", "/admin/reload"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];

/// Match a path against [`ROUTES`]: the pattern and its parameters.
pub fn route(method: &str, path: &str) -> Result<(&'static str, Vec<String>), u16> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut path_known = false;
    for (m, pattern) in ROUTES {
        let pat: Vec<&str> = pattern.split('/').collect();
        if pat.len() != parts.len() {
            continue;
        }
        let mut params = Vec::new();
        let fits = pat.iter().zip(&parts).all(|(p, s)| {
            if p.starts_with('{') {
                params.push(s.to_string());
                !s.is_empty()
            } else {
                p == s
            }
        });
        if fits {
            path_known = true;
            if *m == method {
                return Ok((pattern, params));
            }
        }
    }
    Err(if path_known { 405 } else { 404 })
}

pub(super) fn action_name(pattern: &str, params: &[String]) -> String {
    match pattern {
        "/admin/models/{id}/{action}" => format!("model.{}", params[1]),
        "/admin/subjects/{sub}/{action}" => format!("subject.{}", params[1]),
        "/admin/tenants/{tenant}/{action}" => format!("tenant.{}", params[1]),
        "/admin/approvals/{id}/{action}" => format!("approval.{}", params[1]),
        "/admin/approvals" => "approval.list".into(),
        "/admin/approvals/{id}" => "approval.show".into(),
        "/admin/models" => "model.register_or_list".into(),
        "/admin/models/{id}" => "model.show".into(),
        "/admin/simulate" => "simulate".into(),
        "/admin/reload" => "reload".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn routes_match() {
        assert_eq!(route("GET", "/admin/models"), Ok(("/admin/models", vec![])));
        assert_eq!(
            route("POST", "/admin/models/gpt-4o/approve"),
            Ok((
                "/admin/models/{id}/{action}",
                vec!["gpt-4o".into(), "approve".into()]
            ))
        );
        assert_eq!(route("DELETE", "/admin/models"), Err(405));
        assert_eq!(route("GET", "/admin/nothing"), Err(404));
    }

    /// Every route is in the OpenAPI document, and every documented
    /// operation is a route.
    #[test]
    fn openapi_documents_every_route() {
        let doc: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../../docs/admin-api.yaml")).unwrap();
        let paths = doc["paths"].as_mapping().unwrap();
        let mut documented = BTreeSet::new();
        for (path, ops) in paths {
            for (method, _) in ops.as_mapping().unwrap() {
                let m = method.as_str().unwrap().to_ascii_uppercase();
                if ["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&m.as_str()) {
                    documented.insert((m, path.as_str().unwrap().to_string()));
                }
            }
        }
        let routes: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        let missing: Vec<_> = routes.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "routes missing from docs/admin-api.yaml: {missing:?}"
        );
        let extra: Vec<_> = documented.difference(&routes).collect();
        assert!(extra.is_empty(), "documented but not routed: {extra:?}");
    }
}
