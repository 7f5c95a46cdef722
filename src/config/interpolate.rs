//! `${VAR}` and `${VAR:-default}` in string values, from the environment.

use super::validate::Errors;
use serde_yaml::Value;

/// Replace `${VAR}` / `${VAR:-default}` in every string of the tree.
pub(super) fn interpolate(
    value: &mut Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Errors,
) {
    match value {
        Value::String(s) => match expand(s, env) {
            Ok(expanded) => *s = expanded,
            Err(message) => errors.push(key, message),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate(item, &format!("{key}[{i}]"), env, errors);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let name = k.as_str().unwrap_or("?");
                let path = if key.is_empty() {
                    name.to_string()
                } else {
                    format!("{key}.{name}")
                };
                interpolate(v, &path, env, errors);
            }
        }
        _ => {}
    }
}

/// Expand the `${...}` references in one string.
pub fn expand(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let Some(end) = tail.find('}') else {
                return Err(format!("unterminated '${{' in '{text}'"));
            };
            let inner = &tail[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("'${{{inner}}}' is not a variable name"));
            }
            match (env(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!("environment variable {name} is not set"));
                }
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}
