//! The `portcullis` command line: the arguments and the dispatch here,
//! one file per command ([`serve`] with `check-config`, `demo` in
//! `crate::testkit::demo`, [`mock_provider`], [`eval`], [`admin`] for
//! `models` and `freeze`, [`keys`] for `keys` and `token`, [`audit`]).

mod admin;
mod audit;
pub mod eval;
mod keys;
mod mock_provider;
mod serve;

use crate::config::Config;
use crate::testkit::dev_keys::TokenRequest;
use crate::testkit::mock::MockOptions;
use admin::AdminClient;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "An LLM security gateway: every request authenticated, limited, screened and audited."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Gateway config file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Proxy listener, overriding `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Admin listener, overriding `server.admin_listen`.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Run the gateway with the built-in mock provider on config/demo.yaml
    /// and print ready-to-paste examples.
    Demo {
        #[arg(long, default_value = "config/demo.yaml")]
        config: PathBuf,
    },
    /// Run the OpenAI-compatible mock provider on its own.
    MockProvider {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: SocketAddr,
        #[command(flatten)]
        options: MockArgs,
    },
    /// Check a config file; report every error, exit non-zero on any.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Audit file tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Dev signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Measure the detectors on labelled corpora: redaction precision and
    /// recall, injection-screen recall and false positives.
    Eval {
        /// JSON lines of {rule_id, kind: true_positive|false_positive, text}.
        #[arg(long)]
        secrets: Option<PathBuf>,
        /// JSON array of {full_text, spans: [{entity_type, start_position, end_position}]}.
        #[arg(long)]
        pii: Option<PathBuf>,
        #[arg(long, default_value = "policies/redaction.yaml")]
        policy: PathBuf,
        /// JSON lines of {text, label: attack|benign, set}.
        #[arg(long)]
        injection: Option<PathBuf>,
        #[arg(long, default_value = "policies/injection.yaml")]
        injection_policy: PathBuf,
        /// Also list every miss and false alarm.
        #[arg(long)]
        misses: bool,
    },
    /// Manage the model registry through the admin API.
    Models {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Approvals of held tool calls through the admin API.
    Approvals {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// Freeze a subject or a tenant: their new requests get 403 at once.
    Freeze {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        who: FreezeWho,
    },
    /// Lift a freeze.
    Unfreeze {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        who: FreezeWho,
    },
    /// Mint a JWT signed with a dev key (created on first use).
    Token {
        #[arg(long)]
        sub: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Comma-separated roles.
        #[arg(long, value_delimiter = ',', default_value = "user")]
        roles: Vec<String>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// ES256 private key (PKCS#8 PEM); its file name is the kid.
        #[arg(long, default_value = "keys/private/dev.key")]
        key: PathBuf,
        #[arg(long, default_value = DEV_ISSUER)]
        issuer: String,
        #[arg(long, default_value = DEV_AUDIENCE)]
        audience: String,
    },
}

#[derive(Args)]
pub(crate) struct AdminArgs {
    /// The gateway's admin listener.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8081")]
    admin_url: String,
    /// A token with the admin role (auditor for list/show).
    #[arg(
        long,
        global = true,
        env = "PORTCULLIS_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct FreezeWho {
    #[arg(long)]
    subject: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Every registered model.
    List,
    /// One model with its history.
    Show {
        id: String,
    },
    /// Register a model (it must then be approved).
    Register {
        id: String,
        #[arg(long)]
        provider: String,
        #[arg(long)]
        upstream_model: Option<String>,
        #[arg(long)]
        version: Option<String>,
        /// low, medium or high.
        #[arg(long, default_value = "medium")]
        risk_tier: String,
    },
    Approve {
        id: String,
    },
    Freeze {
        id: String,
    },
    Unfreeze {
        id: String,
    },
    /// Final: a retired model never serves again.
    Retire {
        id: String,
    },
}

#[derive(Subcommand)]
enum ApprovalsCommand {
    /// Approvals, newest first.
    List {
        /// pending, approved, denied, used or expired.
        #[arg(long)]
        state: Option<String>,
    },
    /// One approval with its held calls as the model wrote them.
    Show { id: String },
    /// Let the caller receive the held calls (once, before the expiry).
    Approve {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Refuse the held calls.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

pub(crate) fn admin_client(a: AdminArgs) -> Result<AdminClient, ExitCode> {
    match a.token {
        Some(token) => Ok(AdminClient {
            url: a.admin_url,
            token,
        }),
        None => {
            eprintln!("portcullis: give an admin token with --token or PORTCULLIS_ADMIN_TOKEN");
            Err(ExitCode::from(2))
        }
    }
}

pub(crate) fn print(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => finish(Err(e)),
    }
}

/// The audience of dev tokens, as `config/demo.yaml` expects (the issuer
/// is [`DEV_ISSUER`]).
pub const DEV_AUDIENCE: &str = "portcullis";
pub use crate::config::DEV_ISSUER;

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new dev key pair: DIR/private/dev.key (git-ignored) and
    /// DIR/dev.pem (the public key the gateway loads). Replaces old ones.
    Generate {
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
    },
}

#[derive(Args, Clone, Copy)]
struct MockArgs {
    /// Delay before each response's headers, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Characters of content per streamed event.
    #[arg(long, default_value_t = 4)]
    chunk_bytes: usize,
    /// Delay between streamed events, in milliseconds.
    #[arg(long, default_value_t = 0)]
    event_delay_ms: u64,
}

impl From<MockArgs> for MockOptions {
    fn from(a: MockArgs) -> Self {
        MockOptions {
            latency_ms: a.latency_ms,
            chunk_bytes: a.chunk_bytes.max(1),
            event_delay_ms: a.event_delay_ms,
        }
    }
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of an audit file, of a folder of rotated audit
    /// files (each chain in order, across files), or of a Redis Stream
    /// (`--redis URL STREAM`, each instance's chain): print the record
    /// counts, exit 1 on any edited, deleted, inserted or reordered record.
    Verify {
        /// An audit file, a folder of them, or with `--redis` a stream name.
        target: PathBuf,
        /// The audit key of a keyed (HMAC) chain.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Verify the stream TARGET in this Redis.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("info,pingora_core=warn,pingora_proxy=warn,pingora=warn"),
    )
    .init();
    match cli.command {
        Command::Serve {
            config,
            listen,
            admin_listen,
        } => serve::serve(&config, listen, admin_listen),
        Command::Demo { config } => crate::testkit::demo::run(&config),
        Command::MockProvider { listen, options } => mock_provider::run(listen, options.into()),
        Command::CheckConfig { config } => serve::check_config(&config),
        Command::Eval {
            secrets,
            pii,
            policy,
            injection,
            injection_policy,
            misses,
        } => print(eval::run(
            secrets.as_deref(),
            pii.as_deref(),
            &policy,
            injection.as_deref(),
            &injection_policy,
            misses,
        )),
        Command::Models { admin, command } => {
            let client = match admin_client(admin) {
                Ok(c) => c,
                Err(code) => return code,
            };
            print(match command {
                ModelsCommand::List => client.list(),
                ModelsCommand::Show { id } => client.show(&id),
                ModelsCommand::Register {
                    id,
                    provider,
                    upstream_model,
                    version,
                    risk_tier,
                } => client.register(serde_json::json!({
                    "id": id, "provider": provider, "upstream_model": upstream_model,
                    "version": version, "risk_tier": risk_tier,
                })),
                ModelsCommand::Approve { id } => client.lifecycle(&id, "approve"),
                ModelsCommand::Freeze { id } => client.lifecycle(&id, "freeze"),
                ModelsCommand::Unfreeze { id } => client.lifecycle(&id, "unfreeze"),
                ModelsCommand::Retire { id } => client.lifecycle(&id, "retire"),
            })
        }
        Command::Approvals { admin, command } => {
            let client = match admin_client(admin) {
                Ok(c) => c,
                Err(code) => return code,
            };
            print(match command {
                ApprovalsCommand::List { state } => client.approvals(state.as_deref()),
                ApprovalsCommand::Show { id } => client.approval(&id),
                ApprovalsCommand::Approve { id, reason } => client.decide(&id, "approve", reason),
                ApprovalsCommand::Deny { id, reason } => client.decide(&id, "deny", Some(reason)),
            })
        }
        Command::Freeze { admin, who } => admin::freeze(admin, who, true),
        Command::Unfreeze { admin, who } => admin::freeze(admin, who, false),
        Command::Keys {
            command: KeysCommand::Generate { dir },
        } => keys::generate(&dir),
        Command::Token {
            sub,
            tenant,
            roles,
            ttl,
            key,
            issuer,
            audience,
        } => keys::token(
            &key,
            &TokenRequest {
                sub: &sub,
                tenant: &tenant,
                roles: &roles,
                ttl,
                issuer: &issuer,
                audience: &audience,
            },
        ),
        Command::Audit {
            command: AuditCommand::Verify { target, key, redis },
        } => audit::verify(&target, key.as_deref(), redis.as_deref()),
    }
}

pub(crate) fn load(path: &Path) -> Option<Config> {
    match Config::load(path) {
        Ok(c) => Some(c),
        Err(errors) => {
            eprintln!("{errors}");
            None
        }
    }
}

pub(crate) fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}
