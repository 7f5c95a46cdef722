//! `portcullis keys generate` and `portcullis token`: the dev key pair
//! and tokens signed with it (or with any ES256 private key).

use super::finish;
use crate::testkit::dev_keys::{self, DevKeys, TokenRequest};
use std::path::Path;
use std::process::ExitCode;

pub fn generate(dir: &Path) -> ExitCode {
    let keys = DevKeys::in_dir(dir);
    match keys.generate() {
        Ok(()) => {
            println!("private key: {}", keys.private.display());
            println!("public key:  {} (kid \"dev\")", keys.public.display());
            ExitCode::SUCCESS
        }
        Err(e) => finish(Err(e)),
    }
}

/// Print a token; the dev key pair is made on first use.
pub fn token(key: &Path, request: &TokenRequest<'_>) -> ExitCode {
    if key == Path::new("keys/private/dev.key") {
        if let Err(e) = DevKeys::in_dir(Path::new("keys")).ensure() {
            return finish(Err(e));
        }
    }
    match dev_keys::mint(key, request) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => finish(Err(e)),
    }
}
