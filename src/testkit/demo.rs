//! `portcullis demo`: the gateway with the mock provider built in, dev
//! tokens minted, and what to try printed.

use super::dev_keys::{self, DevKeys, TokenRequest};
use super::mock::MockOptions;
use crate::cli::{finish, load, DEV_AUDIENCE, DEV_ISSUER};
use crate::server::{self, MockService};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

pub fn run(config: &Path) -> ExitCode {
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
            match dev_keys::mint(&dev.private, &request) {
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
