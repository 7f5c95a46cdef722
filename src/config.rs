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

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

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
// The file as users write it.

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

/// `providers.NAME:` — an OpenAI-compatible upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSection {
    /// Base URL including the API prefix, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer KEY`. Use `${ENV_VAR}`.
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default)]
    pub timeouts: TimeoutsSection,
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

fn parse_size(text: &str) -> Option<u64> {
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

/// `state:` — where shared state lives.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StateSection {
    /// With a Redis URL, rate limits are shared by every gateway using it.
    pub redis_url: Option<String>,
    /// Longest wait for one Redis operation (default 500 ms).
    pub redis_timeout_ms: Option<u64>,
}

const SECTIONS: &[&str] = &[
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
    "injection",
    "guard",
    "admin",
    "audit",
];

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
            injection,
            guard,
        })
    }
}

struct Errors {
    file: PathBuf,
    list: Vec<ConfigError>,
}

impl Errors {
    fn push(&mut self, key: &str, message: impl Into<String>) {
        self.list.push(ConfigError {
            file: self.file.clone(),
            key: key.to_string(),
            message: message.into(),
        });
    }
}

/// Deserialize one top-level section, recording the error with its full
/// key path.
/// A path with `.` and `..` resolved by their names (no file system look-up).
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// An instance id is used in file names and Redis keys.
pub fn valid_instance_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn section<T: DeserializeOwned>(
    map: &serde_yaml::Mapping,
    name: &str,
    errors: &mut Errors,
) -> Option<T> {
    let value = map.get(name)?.clone();
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let key = if inner == "." || inner.is_empty() {
                name.to_string()
            } else {
                format!("{name}.{inner}")
            };
            errors.push(&key, e.into_inner().to_string());
            None
        }
    }
}

fn check_auth(a: &AuthSection, errors: &mut Errors) {
    if a.keys.is_empty() {
        errors.push("auth.keys", "at least one key source is required");
    }
    if a.issuer.as_deref() == Some(DEV_ISSUER) && !a.allow_dev_issuer {
        errors.push(
            "auth.issuer",
            format!(
                "'{DEV_ISSUER}' is the dev issuer: tokens minted with the dev key would be \
                 trusted. Set your identity provider's issuer, or `auth.allow_dev_issuer: true` \
                 for a demo"
            ),
        );
    }
    for (i, k) in a.keys.iter().enumerate() {
        let key = format!("auth.keys[{i}]");
        let sources = [
            k.dir.is_some(),
            k.file.is_some(),
            k.jwks_file.is_some(),
            k.jwks_url.is_some(),
            k.hmac_secret.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if sources != 1 {
            errors.push(
                &key,
                "give exactly one of dir, file, jwks_file, jwks_url, hmac_secret",
            );
        }
        if let Some(alg) = &k.alg {
            if alg.parse::<jsonwebtoken::Algorithm>().is_err() {
                errors.push(&format!("{key}.alg"), format!("unknown algorithm '{alg}'"));
            }
        }
        if k.hmac_secret.is_some() && (k.kid.is_none() || k.alg.is_none()) {
            errors.push(
                &key,
                "an hmac_secret needs a kid and an HS256/HS384/HS512 alg",
            );
        }
        if let Some(url) = &k.jwks_url {
            match url::Url::parse(url).map(|u| u.scheme().to_string()) {
                Ok(s) if s == "https" => {}
                Ok(s) if s == "http" && k.allow_http => {}
                Ok(s) if s == "http" => errors.push(
                    &format!("{key}.jwks_url"),
                    format!(
                        "'{url}' is plain http: anyone on the path could replace the keys. \
                         Use https, or set `allow_http: true` on this entry"
                    ),
                ),
                _ => errors.push(
                    &format!("{key}.jwks_url"),
                    format!("'{url}' is not an https URL"),
                ),
            }
        }
        if k.issuer.as_deref() == Some(DEV_ISSUER) && !a.allow_dev_issuer {
            errors.push(
                &format!("{key}.issuer"),
                format!("'{DEV_ISSUER}' is the dev issuer (see auth.allow_dev_issuer)"),
            );
        }
    }
}

fn parse_addr(text: &str, key: &str, errors: &mut Errors) -> Option<SocketAddr> {
    match text.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(
                key,
                format!("'{text}' is not an address like 127.0.0.1:8080"),
            );
            None
        }
    }
}

fn build_provider(name: &str, p: ProviderSection, errors: &mut Errors) -> Option<Provider> {
    let key = format!("providers.{name}.base_url");
    let url = match url::Url::parse(&p.base_url) {
        Ok(u) => u,
        Err(e) => {
            errors.push(&key, format!("'{}' is not a URL: {e}", p.base_url));
            return None;
        }
    };
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        other => {
            errors.push(&key, format!("scheme must be http or https, not '{other}'"));
            return None;
        }
    };
    let Some(host) = url.host_str() else {
        errors.push(&key, "has no host");
        return None;
    };
    if url.query().is_some() || url.fragment().is_some() {
        errors.push(&key, "must not have a query or fragment");
    }
    let t = p.timeouts;
    for (field, v) in [
        ("connect_ms", t.connect_ms),
        ("total_connect_ms", t.total_connect_ms),
        ("read_ms", t.read_ms),
        ("write_ms", t.write_ms),
        ("idle_ms", t.idle_ms),
        ("total_ms", t.total_ms),
    ] {
        if v == 0 {
            errors.push(
                &format!("providers.{name}.timeouts.{field}"),
                "must be greater than 0",
            );
        }
    }
    if p.api_key.as_deref() == Some("") {
        errors.push(
            &format!("providers.{name}.api_key"),
            "is empty (is its environment variable set?)",
        );
    }
    Some(Provider {
        name: name.to_string(),
        tls,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port: url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 }),
        base_path: url.path().trim_end_matches('/').to_string(),
        api_key: p.api_key,
        timeouts: t,
    })
}

/// Replace `${VAR}` / `${VAR:-default}` in every string of the tree.
fn interpolate(
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

#[cfg(test)]
mod tests {
    use super::*;

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
