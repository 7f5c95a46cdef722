//! `portcullis serve` and `portcullis check-config`.

use super::{finish, load};
use crate::config::{Config, ConfigError, ConfigErrors};
use crate::proxy::pipeline;
use crate::server;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

/// Run the gateway with `config`, the listeners overridden if given.
pub fn serve(
    config: &Path,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
) -> ExitCode {
    let Some(mut cfg) = load(config) else {
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

/// Load and check a config, every policy it names included.
pub fn check_config(config: &Path) -> ExitCode {
    match Config::load(config).and_then(|cfg| {
        let errors = pipeline::check(&cfg);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(
                errors
                    .into_iter()
                    .map(|message| ConfigError {
                        file: config.to_path_buf(),
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
    }
}
