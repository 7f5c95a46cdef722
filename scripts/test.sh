#!/usr/bin/env bash
# Run every test: the Rust unit and integration tests (real gateway binary
# against the mock provider), the end-to-end tests with the official
# OpenAI Python SDK and the official OpenAI Node.js SDK, then the k6 smoke
# load test. Ends with one summary line.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
mkdir -p target
log=target/test-output.log
: > "$log"

cargo test --workspace --locked 2>&1 | tee -a "$log"
rust_status=${PIPESTATUS[0]}

python_status=0
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || python_status=1
fi
if [ "$python_status" -eq 0 ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt || python_status=1
fi
if [ "$python_status" -eq 0 ]; then
  # The SDK tests drive the debug binary `cargo test` just built.
  PORTCULLIS_BIN="$PWD/target/debug/portcullis" .venv/bin/python -m pytest -q tests/sdk 2>&1 | tee -a "$log"
  python_status=${PIPESTATUS[0]}
fi

# The official OpenAI Node.js SDK, from npm (versions pinned in
# tests/node/package-lock.json), against the same debug binary.
node_status=0
if (cd tests/node && npm ci --no-audit --no-fund --loglevel=error >/dev/null); then
  (cd tests/node && PORTCULLIS_BIN="$PWD/../../target/debug/portcullis" npm test --silent) > target/node-output.log 2>&1
  node_status=$?
  cat target/node-output.log
  node_pass=$(grep -oE '^# pass [0-9]+' target/node-output.log | grep -oE '[0-9]+' || echo 0)
  node_fail=$(grep -oE '^# fail [0-9]+' target/node-output.log | grep -oE '[0-9]+' || echo 1)
  echo "node sdk tests: ${node_pass} passed, ${node_fail} failed" | tee -a "$log"
else
  node_status=1
  echo "node sdk tests: npm ci failed; 1 failed" | tee -a "$log"
fi

# The k6 smoke test through the gateway (the debug binary again): every
# kind of request checked, thresholds on correctness only.
smoke_status=0
if [ "$rust_status" -ne 0 ] || [ "$python_status" -ne 0 ] || [ "$node_status" -ne 0 ]; then
  echo "load-tests smoke (k6): not run, the tests before it failed" | tee -a "$log"
else
  if load-tests/run.sh smoke --bin "$PWD/target/debug/portcullis" 2>&1 | tee target/smoke-output.log; then
    echo "load-tests smoke (k6): 1 passed" >> "$log"
  else
    smoke_status=1
    echo "load-tests smoke (k6): 1 failed" >> "$log"
  fi
fi

passed=$(grep -hoE '(test result: [a-zA-Z]+\. )?[0-9]+ passed' "$log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -hoE '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
if [ "$rust_status" -ne 0 ] || [ "$python_status" -ne 0 ] || [ "$node_status" -ne 0 ] || [ "$smoke_status" -ne 0 ]; then
  [ "$failed" -gt 0 ] || failed=1
fi
echo
echo "portcullis tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
