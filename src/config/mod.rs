//! Gateway configuration: a YAML file read into user-facing structs
//! (`deny_unknown_fields` everywhere), then checked and built into the
//! runtime [`Config`].
//!
//! - `${VAR}` and `${VAR:-default}` in any string value are replaced from the
//!   environment before parsing (`$${` writes a literal `${`). A variable that
//!   is unset and has no default is an error naming the key.
//! - Relative paths are relative to the directory of the config file.
//! - Loading reports every error it can find at once, each as
//!   `FILE: KEY: message`: each top-level section is parsed on its own, and
//!   the cross-checks (providers named by models, URLs, addresses) run over
//!   whatever parsed.
//!
//! The sections as written are in `schema`, `${VAR}` expansion in
//! `interpolate`, checks and the pieces the runtime config is built from
//! in `validate`; the build itself ([`Config::from_yaml`]) is here.

mod interpolate;
mod schema;
mod validate;

pub use interpolate::expand;
use interpolate::interpolate;
pub use schema::*;
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use validate::valid_instance_id;
use validate::*;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted key path, e.g. `providers.openai.base_url`; empty for the file.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------
// The built configuration.

#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub source: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub threads: usize,
    /// `server.instance_id`; [`Config::instance`] gives the default.
    pub instance_id: Option<String>,
    pub shutdown_grace: Duration,
    pub limits: LimitsSection,
    pub state_dir: PathBuf,
    pub providers: BTreeMap<String, Provider>,
    pub models: BTreeMap<String, ModelRoute>,
    pub audit: AuditSection,
    /// Key paths already made absolute.
    pub auth: Option<AuthSection>,
    /// Policy path already made absolute; the policy itself is loaded by
    /// `pipeline::load_limits`.
    pub rate_limit: Option<RateLimitSection>,
    pub state: StateSection,
    /// Seed file path already made absolute.
    pub registry: RegistrySection,
    pub admin: AdminSection,
    /// Policy path already made absolute.
    pub redaction: Option<RedactionSection>,
    /// Policy path already made absolute.
    pub tools: Option<ToolsSection>,
    pub approvals: ApprovalsSection,
    pub tracing: TracingSection,
    /// Policy path already made absolute.
    pub injection: Option<InjectionSection>,
    /// Policy path already made absolute.
    pub guard: Option<GuardSection>,
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix from the base URL without a trailing slash, e.g. `/v1`.
    pub base_path: String,
    pub api_key: Option<String>,
    pub kind: ProviderKind,
    pub timeouts: TimeoutsSection,
}

#[derive(Debug, Clone)]
pub struct ModelRoute {
    pub provider: String,
    pub upstream_model: String,
    pub version: Option<String>,
    pub risk_tier: filters::model_registry::RiskTier,
}

impl Config {
    /// This process's instance id: `server.instance_id`, or `HOST-PORT`.
    pub fn instance(&self) -> String {
        if let Some(id) = &self.instance_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| {
                h.trim()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect::<String>()
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".into());
        let mut id = format!("{host}-{}", self.listen.port());
        id.truncate(64);
        id
    }

    /// `audit.file` with `{instance}` replaced.
    pub fn audit_file(&self) -> Option<PathBuf> {
        let f = self.audit.file.as_ref()?;
        let s = f.to_string_lossy();
        if s.contains("{instance}") {
            Some(PathBuf::from(s.replace("{instance}", &self.instance())))
        } else {
            Some(f.clone())
        }
    }

    /// Read, interpolate, parse and check a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                key: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        Self::from_yaml(path, &text, &|name| std::env::var(name).ok())
    }

    /// Parse config text; `env` looks up `${VAR}`s. `path` names the file in
    /// errors and anchors relative paths.
    pub fn from_yaml(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigErrors> {
        let mut errors = Errors {
            file: path.to_path_buf(),
            list: Vec::new(),
        };
        let mut root: Value = match serde_yaml::from_str(text) {
            Ok(Value::Null) => Value::Mapping(Default::default()),
            Ok(v) => v,
            Err(e) => {
                errors.push("", format!("not valid YAML: {e}"));
                return Err(ConfigErrors(errors.list));
            }
        };
        interpolate(&mut root, "", env, &mut errors);
        let Value::Mapping(map) = root else {
            errors.push("", "the top level must be a mapping of sections");
            return Err(ConfigErrors(errors.list));
        };
        for key in map.keys() {
            let name = key.as_str().unwrap_or("?");
            if !SECTIONS.contains(&name) {
                errors.push(
                    name,
                    format!("unknown section; expected one of: {}", SECTIONS.join(", ")),
                );
            }
        }
        let server: ServerSection = section(&map, "server", &mut errors).unwrap_or_default();
        let limits: LimitsSection = section(&map, "limits", &mut errors).unwrap_or_default();
        let state_dir: PathBuf =
            section(&map, "state_dir", &mut errors).unwrap_or_else(|| PathBuf::from("var"));
        let providers: BTreeMap<String, ProviderSection> =
            section(&map, "providers", &mut errors).unwrap_or_default();
        let models: BTreeMap<String, ModelSection> =
            section(&map, "models", &mut errors).unwrap_or_default();
        let audit: AuditSection = section(&map, "audit", &mut errors).unwrap_or_default();
        let auth: Option<AuthSection> = section(&map, "auth", &mut errors);
        let rate_limit: Option<RateLimitSection> = section(&map, "rate_limit", &mut errors);
        let state: StateSection = section(&map, "state", &mut errors).unwrap_or_default();
        let mut registry: RegistrySection =
            section(&map, "registry", &mut errors).unwrap_or_default();
        let admin: AdminSection = section(&map, "admin", &mut errors).unwrap_or_default();
        let redaction: Option<RedactionSection> = section(&map, "redaction", &mut errors);
        let tools: Option<ToolsSection> = section(&map, "tools", &mut errors);
        let approvals: ApprovalsSection =
            section(&map, "approvals", &mut errors).unwrap_or_default();
        if approvals.ttl_secs == 0 || approvals.webhook_timeout_ms == 0 {
            errors.push(
                "approvals",
                "ttl_secs and webhook_timeout_ms must be above 0",
            );
        }
        if approvals.ttl_secs > 30 * 86_400 || approvals.retention_secs > 366 * 86_400 {
            errors.push(
                "approvals",
                "ttl_secs is at most 30 days and retention_secs at most 366 days",
            );
        }
        let tracing: TracingSection = section(&map, "tracing", &mut errors).unwrap_or_default();
        if let Some(url) = &tracing.otlp_endpoint {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                errors.push(
                    "tracing.otlp_endpoint",
                    format!("'{url}' is not an http:// or https:// URL"),
                );
            }
        }
        if !(0.0..=1.0).contains(&tracing.sample_ratio) {
            errors.push("tracing.sample_ratio", "must be between 0 and 1");
        }
        if tracing.timeout_ms == 0 || tracing.max_queue == 0 || tracing.batch == 0 {
            errors.push("tracing", "timeout_ms, max_queue and batch must be above 0");
        }
        if tracing.max_queue > 1_000_000 || tracing.batch > 10_000 {
            errors.push(
                "tracing",
                "max_queue is at most 1000000 and batch at most 10000",
            );
        }
        for (name, value) in &tracing.headers {
            let ok = hyper::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
                && hyper::header::HeaderValue::from_str(value).is_ok();
            if !ok {
                errors.push("tracing.headers", format!("`{name}` is not a valid header"));
            }
        }
        if let Some(url) = &approvals.webhook_url {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                errors.push(
                    "approvals.webhook_url",
                    format!("'{url}' is not an http:// or https:// URL"),
                );
            }
        }
        let injection: Option<InjectionSection> = section(&map, "injection", &mut errors);
        let guard: Option<GuardSection> = section(&map, "guard", &mut errors);
        if let Some(url) = &state.redis_url {
            if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                errors.push(
                    "state.redis_url",
                    format!("'{url}' is not a redis:// or rediss:// URL"),
                );
            }
        }
        if let Some(a) = &auth {
            check_auth(a, &mut errors);
        }

        let listen = parse_addr(&server.listen, "server.listen", &mut errors);
        let admin_listen = parse_addr(&server.admin_listen, "server.admin_listen", &mut errors);
        if server.threads == 0 {
            errors.push("server.threads", "must be at least 1");
        }
        if limits.max_body_bytes == 0 {
            errors.push("limits.max_body_bytes", "must be greater than 0");
        }
        if limits.max_response_bytes == 0 {
            errors.push("limits.max_response_bytes", "must be greater than 0");
        }
        if admin.header_read_timeout_secs == 0 {
            errors.push("admin.header_read_timeout_secs", "must be greater than 0");
        }
        if limits.client_body_timeout_secs == 0 {
            errors.push("limits.client_body_timeout_secs", "must be greater than 0");
        }

        let mut built_providers = BTreeMap::new();
        for (name, p) in providers {
            if let Some(provider) = build_provider(&name, p, &mut errors) {
                built_providers.insert(name, provider);
            }
        }
        if built_providers.is_empty() && !map.contains_key("providers") {
            errors.push("providers", "at least one provider is required");
        }
        let mut routes = BTreeMap::new();
        for (id, m) in models {
            if !built_providers.contains_key(&m.provider) {
                errors.push(
                    &format!("models.{id}.provider"),
                    format!("no provider named '{}' in `providers`", m.provider),
                );
            }
            let upstream_model = m.upstream_model.unwrap_or_else(|| id.clone());
            routes.insert(
                id,
                ModelRoute {
                    provider: m.provider,
                    upstream_model,
                    version: m.version,
                    risk_tier: m.risk_tier,
                },
            );
        }

        let base = path.parent().unwrap_or(Path::new("."));
        let mut audit = audit;
        audit.file = audit.file.map(|f| base.join(f));
        audit.key_file = audit.key_file.map(|f| base.join(f));
        if let (Some(key), Some(file)) = (&audit.key_file, &audit.file) {
            let folder = lexical(file.parent().unwrap_or(Path::new(".")));
            if lexical(key).starts_with(&folder) {
                errors.push(
                    "audit.key_file",
                    "keep the audit key outside the audit folder: whoever can rewrite the records must not be able to read it",
                );
            }
        }
        if let Some(a) = &auth {
            if a.failures_per_minute_per_ip > 60_000 {
                errors.push(
                    "auth.failures_per_minute_per_ip",
                    "at most 60000 (one a millisecond); 0 turns the limit off",
                );
            }
        }
        for (key, value) in [
            ("limits.max_json_depth", limits.max_json_depth),
            ("limits.max_messages", limits.max_messages),
            ("limits.max_tools", limits.max_tools),
            ("limits.max_text_chars", limits.max_text_chars),
            ("limits.max_json_values", limits.max_json_values),
            ("limits.max_connections", limits.max_connections),
            (
                "limits.max_connections_per_ip",
                limits.max_connections_per_ip,
            ),
            ("limits.max_header_count", limits.max_header_count),
            ("limits.max_header_bytes", limits.max_header_bytes),
        ] {
            if value == 0 {
                errors.push(key, "must be at least 1");
            }
        }
        if limits.max_json_depth > 128 {
            errors.push(
                "limits.max_json_depth",
                "at most 128 (the JSON parser stops there)",
            );
        }
        if audit.queue_capacity < 4 {
            errors.push("audit.queue_capacity", "must be at least 4");
        }
        if let Some(r) = &mut audit.redis {
            if r.max_len == 0 {
                errors.push("audit.redis.max_len", "must be at least 1");
            }
            r.url = r.url.take().or_else(|| state.redis_url.clone());
            if r.url.is_none() {
                errors.push(
                    "audit.redis.url",
                    "no Redis URL: set audit.redis.url or state.redis_url",
                );
            }
        }
        if let Some(id) = &server.instance_id {
            if !valid_instance_id(id) {
                errors.push(
                    "server.instance_id",
                    "1 to 64 characters from A-Z a-z 0-9 . _ -",
                );
            }
        }
        let auth = auth.map(|mut a| {
            for k in &mut a.keys {
                k.dir = k.dir.take().map(|p| base.join(p));
                k.file = k.file.take().map(|p| base.join(p));
                k.jwks_file = k.jwks_file.take().map(|p| base.join(p));
            }
            a
        });
        let rate_limit = rate_limit.map(|mut r| {
            r.policy = base.join(&r.policy);
            r
        });
        registry.seed_file = registry.seed_file.map(|p| base.join(p));
        let redaction = redaction.map(|mut r| {
            r.policy = base.join(&r.policy);
            r
        });
        let tools = tools.map(|mut t| {
            t.policy = base.join(&t.policy);
            t
        });
        let injection = injection.map(|mut i| {
            i.policy = base.join(&i.policy);
            i
        });
        if let Some(g) = &guard {
            if !built_providers.contains_key(&g.provider) {
                errors.push(
                    "guard.provider",
                    format!("no provider named '{}'", g.provider),
                );
            }
            if g.protocol == GuardProtocol::YesNo && g.risks.is_empty() {
                errors.push(
                    "guard.risks",
                    "a yes-no guard needs at least one risk".to_string(),
                );
            }
            for (category, t) in &g.thresholds {
                if !(0.0..=1.0).contains(t) {
                    errors.push(
                        &format!("guard.thresholds.{category}"),
                        format!("{t} is not a score in [0, 1]"),
                    );
                }
            }
            if g.timeout_ms == 0 || g.max_concurrency == 0 {
                errors.push(
                    "guard",
                    "timeout_ms and max_concurrency must be above 0".to_string(),
                );
            }
        }
        let guard = guard.map(|mut g| {
            g.policy = base.join(&g.policy);
            g
        });
        if !errors.list.is_empty() {
            return Err(ConfigErrors(errors.list));
        }
        let (Some(listen), Some(admin_listen)) = (listen, admin_listen) else {
            // parse_addr recorded the error; unreachable with an empty list.
            return Err(ConfigErrors(errors.list));
        };
        Ok(Self {
            source: path.to_path_buf(),
            listen,
            admin_listen,
            threads: server.threads,
            instance_id: server.instance_id,
            shutdown_grace: Duration::from_secs(server.shutdown_grace_secs),
            limits,
            state_dir: base.join(state_dir),
            providers: built_providers,
            models: routes,
            audit,
            auth,
            rate_limit,
            state,
            registry,
            admin,
            redaction,
            tools,
            approvals,
            tracing,
            injection,
            guard,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::parse_size;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("sk-test".into()),
            "PORT" => Some("9200".into()),
            _ => None,
        }
    }

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_yaml(Path::new("/etc/portcullis/gw.yaml"), text, &env)
    }

    const GOOD: &str = r#"
server:
  listen: 127.0.0.1:18080
providers:
  local:
    base_url: http://127.0.0.1:${PORT}/v1
    api_key: ${KEY}
  openai:
    base_url: https://api.openai.com/v1
    api_key: ${MISSING:-none}
models:
  gpt-4o-mini: { provider: openai }
  small: { provider: local, upstream_model: llama-3-8b }
audit:
  file: ../audit/audit.jsonl
"#;

    #[test]
    fn approvals_and_tracing_are_checked() {
        let c = load(GOOD).unwrap();
        assert!(c.approvals.enabled && c.approvals.ttl_secs == 3600);
        assert!(
            c.tracing.otlp_endpoint.is_none(),
            "tracing is off by default"
        );
        let ok = "approvals:\n  ttl_secs: 60\n  webhook_url: https://hooks.example.com/x\ntracing:\n  otlp_endpoint: https://otel.example.com/v1/traces\n  sample_ratio: 0.1\n  headers: { authorization: Bearer t }\n";
        let c = load(&format!("{GOOD}{ok}")).unwrap();
        assert_eq!(c.approvals.ttl_secs, 60);
        assert_eq!(c.tracing.sample_ratio, 0.1);
        for (bad, says) in [
            ("approvals:\n  ttl_secs: 0\n", "ttl_secs"),
            (
                "approvals:\n  retention_secs: 99999999999\n",
                "retention_secs",
            ),
            (
                "approvals:\n  webhook_url: ftp://x\n",
                "approvals.webhook_url",
            ),
            ("approvals:\n  approve_all: true\n", "approve_all"),
            (
                "tracing:\n  otlp_endpoint: collector:4318\n",
                "tracing.otlp_endpoint",
            ),
            ("tracing:\n  sample_ratio: 1.5\n", "tracing.sample_ratio"),
            ("tracing:\n  batch: 0\n", "batch"),
            ("tracing:\n  max_queue: 5000000\n", "max_queue"),
            (
                "tracing:\n  headers: { \"bad header\": x }\n",
                "tracing.headers",
            ),
        ] {
            let e = load(&format!("{GOOD}{bad}")).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_and_the_audit_section() {
        assert_eq!(parse_size("100 MiB"), Some(100 << 20));
        assert_eq!(parse_size("512KiB"), Some(512 << 10));
        assert_eq!(parse_size("1 gb"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        for bad in [
            "",
            "MiB",
            "1.5 MiB",
            "-1",
            "10 TiB",
            "99999999999999999999 GiB",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        let c = load(&format!("{GOOD}  rotate_size: 2 MiB\n  on_error: allow\n")).unwrap();
        assert_eq!(c.audit.rotate_size, ByteSize(2 << 20));
        assert_eq!(c.audit.on_error, filters::OnError::Allow);
        let e = load(&format!("{GOOD}  rotate_size: lots\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a size"), "{e}");
        // The key must live outside the audit folder.
        for inside in [
            "../audit/audit.key",
            "../audit/./k",
            "../audit/sub/k",
            "../x/../audit/k",
        ] {
            let e = load(&format!("{GOOD}  key_file: {inside}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("outside the audit folder"), "{inside}: {e}");
        }
        assert!(load(&format!("{GOOD}  key_file: keys/audit.key\n")).is_ok());
        let e = load(&format!("{GOOD}  redis: {{}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no Redis URL"), "{e}");
        let e = load(&format!("{GOOD}server:\n  instance_id: a/b\n"));
        assert!(e.is_err());
        let e = load(&format!(
            "{GOOD}limits:\n  max_messages: 0\n  max_json_depth: 500\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("limits.max_messages") && e.contains("at most 128"),
            "{e}"
        );
    }

    #[test]
    fn instances_on_one_host_get_their_own_audit_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let path = root.join("config/cluster.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut a = Config::from_yaml(&path, &text, &|_| None).unwrap();
        let mut b = a.clone();
        a.listen = "127.0.0.1:8080".parse().unwrap();
        b.listen = "127.0.0.1:8090".parse().unwrap();
        assert_ne!(a.instance(), b.instance());
        assert_ne!(a.audit_file(), b.audit_file());
        let file = a.audit_file().unwrap();
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("audit-") && name.ends_with("-8080.jsonl"),
            "{name}"
        );
        a.instance_id = Some("gw-a".into());
        assert!(a.audit_file().unwrap().ends_with("audit-gw-a.jsonl"));
    }

    #[test]
    fn a_good_file_builds() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.listen.port(), 18080);
        assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        let local = &c.providers["local"];
        assert_eq!(
            (local.tls, local.port, local.base_path.as_str()),
            (false, 9200, "/v1")
        );
        assert_eq!(local.api_key.as_deref(), Some("sk-test"));
        let openai = &c.providers["openai"];
        assert_eq!(
            (openai.tls, openai.port, openai.host.as_str()),
            (true, 443, "api.openai.com")
        );
        assert_eq!(openai.api_key.as_deref(), Some("none"));
        assert_eq!(c.models["small"].upstream_model, "llama-3-8b");
        assert_eq!(c.models["gpt-4o-mini"].upstream_model, "gpt-4o-mini");
        assert_eq!(
            c.audit.file.as_deref(),
            Some(Path::new("/etc/portcullis/../audit/audit.jsonl"))
        );
        assert_eq!(c.state_dir, Path::new("/etc/portcullis/var"));
        assert_eq!(c.limits.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    }

    #[test]
    fn every_error_is_reported_at_once_with_its_key() {
        let errors = load(
            r#"
server: { listen: nowhere, thread: 3 }
providers:
  a: { base_url: "ftp://x/v1", api_key: "${NOPE}" }
  b: { base_url: "http://h/v1", timeouts: { read_ms: 0 } }
models:
  m: { provider: zzz }
audti: {}
"#,
        )
        .unwrap_err();
        let text = errors.to_string();
        for needle in [
            "gw.yaml: server.thread: unknown field `thread`",
            "providers.a.api_key: environment variable NOPE is not set",
            "providers.a.base_url: scheme must be http or https",
            "providers.b.timeouts.read_ms: must be greater than 0",
            "models.m.provider: no provider named 'zzz'",
            "audti: unknown section",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(errors.0.len(), 6, "{text}");
    }

    #[test]
    fn bad_yaml_and_non_mapping_are_errors() {
        assert!(load("server: [")
            .unwrap_err()
            .to_string()
            .contains("not valid YAML"));
        assert!(load("- a\n- b")
            .unwrap_err()
            .to_string()
            .contains("mapping"));
    }

    #[test]
    fn expansion_forms() {
        assert_eq!(expand("a ${KEY} b", &env).unwrap(), "a sk-test b");
        assert_eq!(expand("${NOPE:-x:y}", &env).unwrap(), "x:y");
        assert_eq!(expand("$${KEY} $5", &env).unwrap(), "${KEY} $5");
        assert!(expand("${KEY", &env).is_err());
        assert!(expand("${NOPE}", &env).is_err());
        assert!(expand("${a b}", &env).is_err());
    }
}
