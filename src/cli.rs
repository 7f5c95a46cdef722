//! The `portcullis` command line.

use crate::audit::{self, Verification};
use crate::config::Config;
use crate::mock::{self, MockOptions, MockState};
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
    /// Check the hash chain of an audit file: print the record count, exit
    /// non-zero on any edited, deleted, inserted or reordered line.
    Verify { file: PathBuf },
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
        Command::CheckConfig { config } => match Config::load(&config) {
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
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => match audit::verify(&file) {
            Ok(Verification::Intact { records }) => {
                println!("{}: {records} records, chain intact", file.display());
                ExitCode::SUCCESS
            }
            Ok(Verification::Broken { records, line, why }) => {
                println!(
                    "{}: chain broken at line {line}: {why} ({records} records verified before it)",
                    file.display()
                );
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(2)
            }
        },
    }
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
    let base = format!("http://{}/v1", cfg.listen);
    let audit = cfg
        .audit
        .file
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

Try it with curl:
  curl -s {base}/chat/completions -H 'content-type: application/json' \
    -H 'authorization: Bearer demo-key' \
    -d '{{"model":"{model}","messages":[{{"role":"user","content":"Hello, Portcullis"}}]}}'

Or with the OpenAI Python SDK (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="demo-key")
  r = client.chat.completions.create(model="{model}",
        messages=[{{"role": "user", "content": "Hello, Portcullis"}}])
  print(r.choices[0].message.content)

API keys are not checked yet: any key is accepted. Stop with Ctrl-C.
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
