//! The config file's sections as written: `deny_unknown_fields` on
//! each, defaults in one place.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// `server:` — process settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Proxy listener address.
    pub listen: String,
    /// Admin, health and metrics listener address.
    pub admin_listen: String,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Seconds in-flight requests get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Names this process in audit records (and in `{instance}` of
    /// `audit.file`). Default: the host name and the proxy port,
    /// `HOST-PORT`.
    pub instance_id: Option<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.into(),
            admin_listen: DEFAULT_ADMIN_LISTEN.into(),
            threads: 2,
            shutdown_grace_secs: 2,
            instance_id: None,
        }
    }
}

/// `limits:` — what a client may send.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest accepted request body; larger ones get 413 `request_too_large`.
    pub max_body_bytes: usize,
    /// Largest provider response body read for a non-streamed reply.
    pub max_response_bytes: usize,
    /// Seconds a client has to send its whole request body.
    pub client_body_timeout_secs: u64,
    /// Longest wait for one write to the client: a client that stops
    /// reading a stream is cut off (and the provider call with it).
    pub client_write_timeout_secs: u64,
    /// Deepest nesting of arrays and objects in a body (400 beyond).
    pub max_json_depth: usize,
    /// Most entries of `messages` (413 beyond).
    pub max_messages: usize,
    /// Most entries of `tools` or `functions` (413 beyond).
    pub max_tools: usize,
    /// Most characters of text in a body, all strings together (413
    /// beyond): bounds the screening work of one request.
    pub max_text_chars: usize,
    /// Most JSON values of any kind in a body, counted while it is parsed
    /// (413 beyond): a body of many tiny values costs far more memory
    /// parsed than its size.
    pub max_json_values: usize,
    /// Client connections open at once; more are closed as they come.
    pub max_connections: usize,
    /// Client connections open at once from one address (IPv6: one /64).
    pub max_connections_per_ip: usize,
    /// Seconds a request's headers may take to arrive (slow clients that
    /// trickle them are cut off).
    pub header_timeout_secs: u64,
    /// Most request headers (431 beyond; Pingora itself stops at 256).
    pub max_header_count: usize,
    /// Most bytes of request line and headers together (431 beyond;
    /// Pingora itself stops at 1 MiB).
    pub max_header_bytes: usize,
}

impl LimitsSection {
    pub fn shape(&self) -> filters::intake::Shape {
        filters::intake::Shape {
            max_depth: self.max_json_depth,
            max_messages: self.max_messages,
            max_tools: self.max_tools,
            max_chars: self.max_text_chars,
            max_values: self.max_json_values,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_response_bytes: 64 * 1024 * 1024,
            client_body_timeout_secs: 30,
            client_write_timeout_secs: 30,
            max_json_depth: 64,
            max_messages: 2048,
            max_tools: 128,
            max_text_chars: 4 << 20,
            max_json_values: 200_000,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            header_timeout_secs: 10,
            max_header_count: 100,
            max_header_bytes: 32 * 1024,
        }
    }
}

/// Timeouts toward one provider, in milliseconds. Every one is set: none is
/// left unbounded.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsSection {
    /// TCP connect.
    pub connect_ms: u64,
    /// TCP connect plus TLS handshake.
    pub total_connect_ms: u64,
    /// Longest wait for any read: the first response byte, or the gap
    /// between two streamed events.
    pub read_ms: u64,
    /// Longest wait for one write of the request.
    pub write_ms: u64,
    /// How long an idle pooled connection is kept.
    pub idle_ms: u64,
    /// Longest whole exchange, streamed responses included.
    pub total_ms: u64,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        Self {
            connect_ms: 2_000,
            total_connect_ms: 5_000,
            read_ms: 60_000,
            write_ms: 10_000,
            idle_ms: 60_000,
            total_ms: 600_000,
        }
    }
}

/// `providers.NAME:` — an upstream model provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSection {
    /// Base URL including the API prefix, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// How the provider takes its key: `openai` (default; `Authorization:
    /// Bearer KEY`) or `anthropic` (`x-api-key: KEY`, and
    /// `anthropic-version` when the client sent none).
    #[serde(default)]
    pub kind: ProviderKind,
    /// The provider's key. Use `${ENV_VAR}`.
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default)]
    pub timeouts: TimeoutsSection,
}

/// How a provider takes its key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    #[default]
    Openai,
    Anthropic,
}

/// `models.ID:` — a model the registry is seeded with on a fresh install.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub provider: String,
    /// The model name sent to the provider; defaults to the id.
    #[serde(default)]
    pub upstream_model: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub risk_tier: filters::model_registry::RiskTier,
}

/// `registry:` — the model registry.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    pub mode: filters::Mode,
    pub on_error: filters::OnError,
    /// More seed models (`models:` list of id, provider, upstream_model,
    /// version, risk_tier), e.g. `../policies/models.yaml`.
    pub seed_file: Option<PathBuf>,
    /// Seed models start approved (else registered, waiting for an admin).
    pub approve_seed: bool,
    /// Highest risk tier each role may use; others get `default_max_risk`.
    pub default_max_risk: filters::model_registry::RiskTier,
    pub max_risk_by_role: BTreeMap<String, filters::model_registry::RiskTier>,
}

/// `admin:` — who may use the admin API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// May change the registry and freezes.
    pub admin_role: String,
    /// May read only.
    pub auditor_role: String,
    /// Seconds a client of the admin listener has to send its request
    /// headers before it is disconnected.
    pub header_read_timeout_secs: u64,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            admin_role: "portcullis:admin".into(),
            auditor_role: "portcullis:auditor".into(),
            header_read_timeout_secs: 10,
        }
    }
}

/// `audit:` — where audit records go and what happens when they cannot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// JSON-lines file, hash-chained across restarts and rotations. A
    /// `{instance}` in the name is replaced by the instance id, so that
    /// instances on one host each write their own file (one file has one
    /// writer: a second process is refused at start).
    pub file: Option<PathBuf>,
    /// Also write each record to standard output.
    pub stdout: bool,
    /// Record raw prompts and completions (off: only their SHA-256).
    pub record_content: bool,
    /// Rotate the file at this size: bytes, or with a unit (`100 MiB`,
    /// `512 KiB`, `1 GiB`); 0: never.
    pub rotate_size: ByteSize,
    /// Rotate the file when the UTC day changes.
    pub rotate_daily: bool,
    /// Longest time a written record waits for its fsync (group commit);
    /// 0: fsync after every batch. Default 10: an fsync per record was
    /// the largest single CPU cost of a request (README "Performance").
    pub fsync_ms: u64,
    /// A key file (at least 16 bytes, kept outside the audit folder):
    /// records are chained with HMAC-SHA-256, so a rewrite of the file is
    /// found by `audit verify --key`.
    pub key_file: Option<PathBuf>,
    /// When a sink cannot be written: `deny` refuses new requests with 503
    /// `audit_unavailable` until it can; `allow` serves them and holds
    /// their records (up to `queue_capacity`) for a retry.
    pub on_error: filters::OnError,
    /// Records queued or held for the writer at most; beyond it they are
    /// dropped and an `audit_gap` record counts them.
    pub queue_capacity: usize,
    /// Records also go to a Redis Stream (one chain per instance).
    pub redis: Option<AuditRedisSection>,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            file: None,
            stdout: false,
            record_content: false,
            rotate_size: ByteSize(100 << 20),
            rotate_daily: true,
            fsync_ms: 10,
            key_file: None,
            on_error: filters::OnError::Deny,
            queue_capacity: 10_000,
            redis: None,
        }
    }
}

/// A size in bytes, written as a number of bytes or as a string with a
/// unit: `B`, `KB`/`KiB`, `MB`/`MiB`, `GB`/`GiB` (both spellings mean
/// powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(ByteSize(b)),
            Raw::Text(t) => parse_size(&t).map(ByteSize).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "'{t}' is not a size (e.g. 100 MiB, 512 KiB, 1048576)"
                ))
            }),
        }
    }
}

pub(super) fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// `audit.redis:` — the Redis Streams sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRedisSection {
    /// Defaults to `state.redis_url`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_audit_stream")]
    pub stream: String,
    /// The stream is trimmed to about this many entries.
    #[serde(default = "default_audit_max_len")]
    pub max_len: u64,
}

fn default_audit_stream() -> String {
    "portcullis:audit".into()
}

fn default_audit_max_len() -> u64 {
    1_000_000
}

/// `auth:` — JWT authentication. Without this section every request is
/// accepted unauthenticated (the gateway warns at start-up).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    #[serde(default)]
    pub mode: filters::Mode,
    #[serde(default)]
    pub on_error: filters::OnError,
    /// Where verification keys come from; at least one entry.
    pub keys: Vec<KeyEntry>,
    /// Required `iss`, when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted `aud` values; the token must name one. Empty: not checked.
    #[serde(default)]
    pub audience: Vec<String>,
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    #[serde(default)]
    pub claims: ClaimsSection,
    /// Tenant of tokens without a tenant claim.
    #[serde(default = "default_tenant")]
    pub default_tenant: String,
    /// Verified tokens kept in memory.
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
    /// Failed authentications per client address and minute (burst as
    /// many) before unknown tokens from it get 429 without a signature
    /// check; 0 turns it off.
    #[serde(default = "default_failures_per_ip")]
    pub failures_per_minute_per_ip: u32,
    /// Trust the dev issuer `portcullis-dev` and the dev key (`dev.pem`,
    /// kid `dev`, written by `portcullis keys generate`). Anyone who can run
    /// `portcullis token` with that key can mint any token, admin included,
    /// so the gateway refuses to start with either unless this says it is
    /// a demo. Default false; `config/demo.yaml` sets it.
    #[serde(default)]
    pub allow_dev_issuer: bool,
}

/// The issuer of tokens minted by `portcullis token` with the dev key.
pub const DEV_ISSUER: &str = "portcullis-dev";
/// The kid of the dev key pair (`keys/dev.pem`).
pub const DEV_KID: &str = "dev";

fn default_failures_per_ip() -> u32 {
    60
}

fn default_leeway() -> u64 {
    30
}
fn default_tenant() -> String {
    "default".into()
}
fn default_cache_size() -> usize {
    10_000
}

/// Dotted claim paths, e.g. `realm_access.roles` for Keycloak.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimsSection {
    pub subject: String,
    pub tenant: String,
    pub roles: String,
}

impl Default for ClaimsSection {
    fn default() -> Self {
        Self {
            subject: "sub".into(),
            tenant: "tenant".into(),
            roles: "roles".into(),
        }
    }
}

/// One source of keys: exactly one of `dir`, `file`, `jwks_file`,
/// `jwks_url`, `hmac_secret`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Every `*.pem` public key in a folder; the kid is the file name
    /// without `.pem`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// One PEM public key; kid from `kid` or the file name.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// A JWKS document on disk.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (an identity provider's), refreshed in the background
    /// and when a token names an unknown kid.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// A shared HMAC secret (at least 32 bytes); needs `kid` and an HS* `alg`.
    #[serde(default)]
    pub hmac_secret: Option<String>,
    #[serde(default)]
    pub kid: Option<String>,
    /// The algorithm the key is pinned to; inferred from PEM keys when left out.
    #[serde(default)]
    pub alg: Option<String>,
    /// Seconds between JWKS refreshes (default 300).
    #[serde(default)]
    pub refresh_secs: Option<u64>,
    /// Accept a `jwks_url` over plain `http://` (a key document anyone on
    /// the path could replace). Default false: `https://` only.
    #[serde(default)]
    pub allow_http: bool,
    /// Required `iss` for tokens verified with keys from this source,
    /// instead of `auth.issuer`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted `aud` values for tokens verified with keys from this
    /// source, instead of `auth.audience`.
    #[serde(default)]
    pub audience: Option<Vec<String>>,
    /// Every token verified with keys from this source belongs to this
    /// tenant, whatever its tenant claim says (a service holding a shared
    /// HMAC secret cannot mint tokens for another tenant).
    #[serde(default)]
    pub tenant: Option<String>,
}

impl KeyEntry {
    /// What tokens verified with this source's keys may claim.
    pub fn scope(&self) -> filters::jwt_auth::KeyScope {
        filters::jwt_auth::KeyScope {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            tenant: self.tenant.clone(),
        }
    }
}

/// `rate_limit:` — request limits and token budgets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    #[serde(default)]
    pub mode: filters::Mode,
    #[serde(default)]
    pub on_error: filters::OnError,
    /// Tiers file, e.g. `../policies/rate-limits.yaml`.
    pub policy: PathBuf,
}

/// `redaction:` — secrets and personal data removed from model output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionSection {
    #[serde(default)]
    pub mode: filters::Mode,
    #[serde(default)]
    pub on_error: filters::OnError,
    /// Rules file, e.g. `../policies/redaction.yaml`.
    pub policy: PathBuf,
    /// Tenants whose `user` and `tool` messages are also redacted before
    /// they reach the provider (`"*"`: every tenant). Default: none.
    #[serde(default)]
    pub request_tenants: Vec<String>,
}

/// `injection:` — the prompt-injection screen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectionSection {
    /// `enforce` refuses what reaches the policy's block threshold with
    /// 400 `prompt_injection`; `monitor` only records.
    #[serde(default)]
    pub mode: filters::Mode,
    #[serde(default)]
    pub on_error: filters::OnError,
    /// Rules and thresholds, e.g. `../policies/injection.yaml`.
    pub policy: PathBuf,
}

/// `guard:` — a guard model that judges each request before the provider
/// sees it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSection {
    #[serde(default)]
    pub mode: filters::Mode,
    /// What a guard that cannot answer leads to: `deny` (503
    /// `guard_unavailable`, the default) or `allow`.
    #[serde(default)]
    pub on_error: filters::OnError,
    /// Categories and actions, e.g. `../policies/guard.yaml`.
    pub policy: PathBuf,
    /// The provider (from `providers:`) that serves the guard.
    pub provider: String,
    pub model: String,
    /// `llama-guard` | `openai-moderation` | `yes-no`.
    pub protocol: GuardProtocol,
    /// llama-guard: `server` (chat messages; the server's template adds
    /// the categories) or `gateway` (the whole prompt built here).
    #[serde(default)]
    pub prompt: filters::guard::protocol::LlamaGuardPrompt,
    /// llama-guard: `string` (Llama Guard 3 8B) or `parts` (3 1B, 4).
    #[serde(default)]
    pub content: filters::guard::protocol::ContentShape,
    /// openai-moderation: category → score that counts.
    #[serde(default)]
    pub thresholds: BTreeMap<String, f64>,
    /// yes-no: the risks asked about, one call each.
    #[serde(default)]
    pub risks: Vec<String>,
    /// The longest wait for one guard answer.
    #[serde(default = "guard_timeout_ms")]
    pub timeout_ms: u64,
    /// Guard calls in flight at most; more are errors (`on_error`).
    #[serde(default = "guard_concurrency")]
    pub max_concurrency: usize,
    #[serde(default)]
    pub breaker: filters::guard::breaker::BreakerSettings,
    #[serde(default)]
    pub cache: GuardCacheSection,
    /// `sequential`: the provider is called after a safe verdict;
    /// `parallel`: at once, beside the guard, and nothing of its reply
    /// reaches the client before a safe verdict.
    #[serde(default)]
    pub timing: GuardTiming,
    /// Judge requests (default true); `false` with an `output` mode
    /// judges only what models write.
    #[serde(default = "yes")]
    pub input: bool,
    /// Judge what models write: `off` (default), `held` (a stream's text
    /// is released only once the window holding it was judged safe) or
    /// `sampled` (text flows; what has been written is judged every
    /// `output_window` characters and at the end). JSON replies are
    /// judged before release in both modes.
    #[serde(default)]
    pub output: GuardOutput,
    /// Characters per judged window of a streamed reply.
    #[serde(default = "guard_window")]
    pub output_window: usize,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GuardOutput {
    #[default]
    Off,
    Held,
    Sampled,
}

fn yes() -> bool {
    true
}
fn guard_window() -> usize {
    400
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GuardTiming {
    #[default]
    Sequential,
    Parallel,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GuardProtocol {
    LlamaGuard,
    OpenaiModeration,
    YesNo,
}

/// Verdicts remembered by the hash of what was sent.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardCacheSection {
    pub capacity: usize,
    pub ttl_secs: u64,
}

impl Default for GuardCacheSection {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            ttl_secs: 300,
        }
    }
}

fn guard_timeout_ms() -> u64 {
    2_000
}
fn guard_concurrency() -> usize {
    64
}

impl GuardSection {
    /// The guard as the filter knows it.
    pub fn spec(&self) -> filters::guard::filter::GuardSpec {
        use filters::guard::filter::Protocol;
        filters::guard::filter::GuardSpec {
            model: self.model.clone(),
            protocol: match self.protocol {
                GuardProtocol::LlamaGuard => Protocol::LlamaGuard {
                    prompt: self.prompt,
                    content: self.content,
                },
                GuardProtocol::OpenaiModeration => Protocol::OpenaiModeration {
                    thresholds: self.thresholds.clone(),
                },
                GuardProtocol::YesNo => Protocol::YesNo {
                    risks: self.risks.clone(),
                },
            },
        }
    }
}

/// `tools:` — which caller may use which tool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolsSection {
    #[serde(default)]
    pub mode: filters::Mode,
    #[serde(default)]
    pub on_error: filters::OnError,
    /// Policy file, e.g. `../policies/tools.yaml`.
    pub policy: PathBuf,
}

/// `approvals:` — calls to `approval_required` tools held for a person
/// (see `filters::approval`). Kept under `state_dir/approvals/`, or in
/// Redis with `state.redis_url`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsSection {
    /// Off: such calls are refused as before approvals existed.
    pub enabled: bool,
    /// A held call not approved and handed out within this expires.
    pub ttl_secs: u64,
    /// How long an approval stays listed after it expired.
    pub retention_secs: u64,
    /// Told of each new pending approval (Slack-compatible JSON, `text`).
    pub webhook_url: Option<String>,
    pub webhook_timeout_ms: u64,
}

impl Default for ApprovalsSection {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_secs: 3600,
            retention_secs: 7 * 24 * 3600,
            webhook_url: None,
            webhook_timeout_ms: 5000,
        }
    }
}

/// `tracing:` — OpenTelemetry traces over OTLP/HTTP (JSON), on when
/// `otlp_endpoint` is set (see `crate::trace`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSection {
    /// The collector's traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Share of requests traced when the client sent no sampled parent (a
    /// client's `traceparent` decides for its own requests).
    pub sample_ratio: f64,
    /// Sent with every export (e.g. an `authorization` for the collector).
    pub headers: std::collections::BTreeMap<String, String>,
    pub timeout_ms: u64,
    /// Requests whose spans wait to be sent; past it a request's spans
    /// are dropped (whole) and counted.
    pub max_queue: usize,
    /// Spans per export.
    pub batch: usize,
}

impl Default for TracingSection {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "portcullis".into(),
            sample_ratio: 1.0,
            headers: Default::default(),
            timeout_ms: 5000,
            max_queue: 8192,
            batch: 512,
        }
    }
}

/// `state:` — where shared state lives.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StateSection {
    /// With a Redis URL, rate limits are shared by every gateway using it.
    pub redis_url: Option<String>,
    /// Longest wait for one Redis operation (default 500 ms).
    pub redis_timeout_ms: Option<u64>,
}

pub(super) const SECTIONS: &[&str] = &[
    "server",
    "limits",
    "state_dir",
    "state",
    "providers",
    "models",
    "auth",
    "rate_limit",
    "registry",
    "redaction",
    "tools",
    "approvals",
    "tracing",
    "injection",
    "guard",
    "admin",
    "audit",
];
