#!/usr/bin/env bash
# Build Portcullis (release) and run the demo: the gateway on 127.0.0.1:8080
# in front of the built-in mock provider. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked --bin portcullis
exec target/release/portcullis demo "$@"
