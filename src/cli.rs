//! The `portcullis` command line.

use crate::admin_cli::AdminClient;
use crate::audit;
use crate::config::{Config, ConfigError, ConfigErrors};
use crate::keys::{self, DevKeys, TokenRequest};
use crate::mock::{self, MockOptions, MockState};
use crate::proxy::pipeline;
use crate::server::{self, MockService};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

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
struct AdminArgs {
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
struct FreezeWho {
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

fn admin_client(a: AdminArgs) -> Result<AdminClient, ExitCode> {
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

fn print(result: anyhow::Result<String>) -> ExitCode {
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
        } => {
            let Some(mut cfg) = load(&config) else {
                return ExitCode::from(2);
            };
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(a) = admin_listen {
                cfg.admin_listen = a;
            }
            finish(server::run(cfg, None))
        }
        Command::Demo { config } => demo(&config),
        Command::MockProvider { listen, options } => mock_provider(listen, options.into()),
        Command::CheckConfig { config } => match Config::load(&config).and_then(|cfg| {
            let errors = pipeline::check(&cfg);
            if errors.is_empty() {
                Ok(cfg)
            } else {
                Err(ConfigErrors(
                    errors
                        .into_iter()
                        .map(|message| ConfigError {
                            file: config.clone(),
                            key: String::new(),
                            message,
                        })
                        .collect(),
                ))
            }
        }) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} providers, {} models)",
                    config.display(),
                    cfg.providers.len(),
                    cfg.models.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("{} error(s)", errors.0.len());
                ExitCode::FAILURE
            }
        },
        Command::Eval {
            secrets,
            pii,
            policy,
            injection,
            injection_policy,
            misses,
        } => {
            let run = || -> anyhow::Result<String> {
                let mut out = String::new();
                if secrets.is_some() || pii.is_some() {
                    let r = crate::eval::load_redactor(&policy)?;
                    if let Some(f) = &secrets {
                        out += &crate::eval::secrets(&r, f, misses)?;
                    }
                    if let Some(f) = &pii {
                        out += &crate::eval::pii(&r, f, misses)?;
                    }
                }
                if let Some(f) = &injection {
                    let d = crate::proxy::pipeline::load_injection(&injection_policy)
                        .map_err(|e| anyhow::anyhow!(e.join("\n")))?;
                    out += &crate::eval::injection(&d, f, misses)?;
                }
                if out.is_empty() {
                    anyhow::bail!("give --secrets FILE, --pii FILE and/or --injection FILE");
                }
                Ok(out)
            };
            print(run())
        }
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
        Command::Freeze { admin, who } => freeze(admin, who, true),
        Command::Unfreeze { admin, who } => freeze(admin, who, false),
        Command::Keys {
            command: KeysCommand::Generate { dir },
        } => {
            let keys = DevKeys::in_dir(&dir);
            match keys.generate() {
                Ok(()) => {
                    println!("private key: {}", keys.private.display());
                    println!("public key:  {} (kid \"dev\")", keys.public.display());
                    ExitCode::SUCCESS
                }
                Err(e) => finish(Err(e)),
            }
        }
        Command::Token {
            sub,
            tenant,
            roles,
            ttl,
            key,
            issuer,
            audience,
        } => {
            if key == Path::new("keys/private/dev.key") {
                if let Err(e) = DevKeys::in_dir(Path::new("keys")).ensure() {
                    return finish(Err(e));
                }
            }
            let request = TokenRequest {
                sub: &sub,
                tenant: &tenant,
                roles: &roles,
                ttl,
                issuer: &issuer,
                audience: &audience,
            };
            match keys::mint(&key, &request) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => finish(Err(e)),
            }
        }
        Command::Audit {
            command: AuditCommand::Verify { target, key, redis },
        } => verify_audit(&target, key.as_deref(), redis.as_deref()),
    }
}

/// `audit verify`: 0 intact, 1 broken, 2 could not be checked.
fn verify_audit(target: &Path, key: Option<&Path>, redis: Option<&str>) -> ExitCode {
    let key = match key.map(audit::AuditKey::load).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let resumes = |r: &Option<String>| match r {
        Some(h) => format!(" (resumes from {h}: earlier records are not here)"),
        None => String::new(),
    };
    if let Some(url) = redis {
        let stream = target.to_string_lossy();
        return match audit::redis::verify_stream(url, &stream, key.as_ref()) {
            Ok(Ok(chains)) => {
                for c in &chains {
                    println!(
                        "{stream}: instance {}: {} records, chain intact{}",
                        c.instance,
                        c.records,
                        resumes(&c.resumes_from)
                    );
                }
                if chains.is_empty() {
                    println!("{stream}: no records (is it the right stream?)");
                    return ExitCode::FAILURE;
                }
                ExitCode::SUCCESS
            }
            Ok(Err(why)) => {
                println!("{stream}: chain broken: {why}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("{stream}: {e}");
                ExitCode::from(2)
            }
        };
    }
    let checked = if target.is_dir() {
        audit::verify::verify_dir(target, key.as_ref())
    } else {
        audit::verify::verify_file(target, key.as_ref()).map(|r| r.map(|i| vec![i]))
    };
    match checked {
        Ok(Ok(chains)) => {
            for c in &chains {
                let files = if c.files > 1 {
                    format!(" in {} files", c.files)
                } else {
                    String::new()
                };
                println!(
                    "{}: {} records{files}, chain intact{}",
                    c.name,
                    c.records,
                    resumes(&c.resumes_from)
                );
            }
            if chains.is_empty() {
                println!("{}: no audit files", target.display());
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Ok(Err(b)) => {
            println!(
                "{}: chain broken at line {}: {} ({} records verified before it)",
                b.file.display(),
                b.line,
                b.why,
                b.records
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{}: {e}", target.display());
            ExitCode::from(2)
        }
    }
}

fn freeze(admin: AdminArgs, who: FreezeWho, frozen: bool) -> ExitCode {
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

fn load(path: &Path) -> Option<Config> {
    match Config::load(path) {
        Ok(c) => Some(c),
        Err(errors) => {
            eprintln!("{errors}");
            None
        }
    }
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo(config: &Path) -> ExitCode {
    if !config.exists() {
        eprintln!(
            "{} not found: run `portcullis demo` from the repository root, or pass --config",
            config.display()
        );
        return ExitCode::from(2);
    }
    let Some(cfg) = load(config) else {
        return ExitCode::from(2);
    };
    // The demo serves the provider named `mock` itself.
    let Some(mock) = cfg.providers.get("mock") else {
        eprintln!(
            "{}: the demo needs a provider named `mock`",
            config.display()
        );
        return ExitCode::from(2);
    };
    let Ok(ip) = mock.host.parse::<std::net::IpAddr>() else {
        eprintln!(
            "{}: providers.mock must use an IP address",
            config.display()
        );
        return ExitCode::from(2);
    };
    let mock_addr = SocketAddr::new(ip, mock.port);
    let model = cfg
        .models
        .keys()
        .next()
        .cloned()
        .unwrap_or_else(|| "mock-small".into());
    // The demo signs its own tokens: make the dev key pair on first use, in
    // the first key folder the config loads.
    let key_dir = cfg
        .auth
        .as_ref()
        .and_then(|a| a.keys.iter().find_map(|k| k.dir.clone()));
    let mut tokens = Vec::new();
    if let Some(dir) = &key_dir {
        let dev = DevKeys::in_dir(dir);
        match dev.ensure() {
            Ok(true) => println!("created a dev key pair: {}", dev.public.display()),
            Ok(false) => {}
            Err(e) => return finish(Err(e)),
        }
        for (who, roles) in [
            ("demo-user", "user"),
            ("demo-trial", "trial"),
            ("demo-admin", "portcullis:admin"),
        ] {
            let roles = vec![roles.to_string()];
            let request = TokenRequest {
                sub: who,
                tenant: "demo",
                roles: &roles,
                ttl: std::time::Duration::from_secs(12 * 3600),
                issuer: DEV_ISSUER,
                audience: DEV_AUDIENCE,
            };
            match keys::mint(&dev.private, &request) {
                Ok(t) => tokens.push(t),
                Err(e) => return finish(Err(e)),
            }
        }
    }
    let [user, trial, admin_token] = match <[String; 3]>::try_from(tokens) {
        Ok(t) => t,
        Err(_) => {
            eprintln!(
                "{}: the demo needs an `auth` key folder (keys: - dir: ...)",
                config.display()
            );
            return ExitCode::from(2);
        }
    };
    let base = format!("http://{}/v1", cfg.listen);
    let audit = cfg
        .audit_file()
        .as_ref()
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| "(none)".into());
    println!(
        r#"
Portcullis demo
  proxy     {base}
  admin     http://{admin}  (/healthz /readyz /metrics)
  provider  built-in mock on {mock_addr}: it echoes the last user message
  audit     {audit}
            check it any time: portcullis audit verify {audit}

Tokens (valid 12 hours; mint more with `portcullis token --sub NAME --roles user`):
  user   (role user, 600 requests/min):
    export PORTCULLIS_TOKEN={user}
  trial  (role trial, 5 requests/min, burst 5: the 6th in a minute gets 429):
    export PORTCULLIS_TRIAL_TOKEN={trial}
  admin  (role portcullis:admin):
    export PORTCULLIS_ADMIN_TOKEN={admin_token}

Try it with curl:
  curl -s {base}/chat/completions -H 'content-type: application/json' \
    -H "authorization: Bearer $PORTCULLIS_TOKEN" \
    -d '{{"model":"{model}","messages":[{{"role":"user","content":"Hello, Portcullis"}}]}}'

Or with the OpenAI Python SDK (pip install openai):
  import os
  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key=os.environ["PORTCULLIS_TOKEN"])
  r = client.chat.completions.create(model="{model}",
        messages=[{{"role": "user", "content": "Hello, Portcullis"}}])
  print(r.choices[0].message.content)

Admin (with PORTCULLIS_ADMIN_TOKEN set):
  portcullis models list                      # the registry
  portcullis models freeze mock-large         # now refused with 403 model_frozen
  portcullis freeze --subject demo-user       # that caller refused with 403 subject_frozen

Stop with Ctrl-C.
"#,
        admin = cfg.admin_listen,
    );
    finish(server::run(
        cfg,
        Some(MockService {
            listen: mock_addr,
            options: MockOptions::default(),
        }),
    ))
}

fn mock_provider(listen: SocketAddr, options: MockOptions) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portcullis: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    finish(runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        println!("mock provider listening on http://{listen}/v1");
        let stop = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        mock::serve(listener, options, Arc::new(MockState::default()), stop).await;
        Ok(())
    }))
}
