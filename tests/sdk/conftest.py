"""Start the mock provider and the gateway (real binaries) for SDK tests."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("PORTCULLIS_BIN", str(ROOT / "target" / "debug" / "portcullis"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {deadline}s")


def records(audit: Path) -> list:
    """The audit file's records: whole lines only (the writer may be
    half-way through the last one)."""
    text = audit.read_text()
    whole = text[: text.rfind("\n") + 1]
    return [json.loads(l) for l in whole.splitlines() if l]


def record_for(audit: Path, request_id: str, deadline: float = 10.0) -> dict:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if audit.exists():
            for r in records(audit):
                if r["request_id"] == request_id:
                    return r
        time.sleep(0.02)
    raise AssertionError(f"no audit record for {request_id} in {audit}")


def stop(procs: list) -> None:
    """SIGTERM every process, newest first; kill what has not left in 20 s."""
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


class Stack:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.mock_port = free_port()
        self.port = free_port()
        self.admin_port = free_port()
        self.audit = tmp / "audit.jsonl"
        self.procs = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def token(self, sub: str, roles: str, tenant: str = "sdk") -> str:
        out = subprocess.run(
            [BIN, "token", "--key", str(self.tmp / "keys" / "private" / "dev.key"),
             "--sub", sub, "--tenant", tenant, "--roles", roles],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def start(self) -> "Stack":
        subprocess.run([BIN, "keys", "generate", "--dir", str(self.tmp / "keys")], check=True,
                       stdout=subprocess.DEVNULL)
        (self.tmp / "limits.yaml").write_text(
            "tiers:\n"
            "  - { id: trial, roles: [trial], requests_per_minute: 2, burst: 2 }\n"
            "  - { id: standard, roles: [user], requests_per_minute: 6000, burst: 1000, tokens_per_minute: 1000000 }\n"
            "default_tier: standard\n"
        )
        self.procs.append(
            subprocess.Popen(
                [BIN, "mock-provider", "--listen", f"127.0.0.1:{self.mock_port}"],
                stdout=subprocess.DEVNULL,
            )
        )
        wait_for(f"http://127.0.0.1:{self.mock_port}/v1/models")
        config = self.tmp / "gateway.yaml"
        config.write_text(
            f"""
server:
  listen: 127.0.0.1:{self.port}
  admin_listen: 127.0.0.1:{self.admin_port}
  shutdown_grace_secs: 0
providers:
  mock:
    base_url: http://127.0.0.1:{self.mock_port}/v1
    api_key: sk-provider
  claude:
    base_url: http://127.0.0.1:{self.mock_port}/v1
    kind: anthropic
    api_key: sk-ant-provider
models:
  mock-small: {{ provider: mock }}
  text-embedding-mock: {{ provider: mock }}
  claude-mock: {{ provider: claude }}
registry:
  approve_seed: true
auth:
  keys:
    - dir: keys
  issuer: portcullis-dev
  audience: [portcullis]
  allow_dev_issuer: true
rate_limit:
  policy: limits.yaml
redaction:
  policy: {ROOT / "policies" / "redaction.yaml"}
tools:
  policy: {ROOT / "policies" / "tools.yaml"}
injection:
  policy: {ROOT / "policies" / "injection.yaml"}
guard:
  policy: {ROOT / "policies" / "guard.yaml"}
  provider: mock
  model: llama-guard-3-8b
  protocol: llama-guard
audit:
  file: {self.audit}
"""
        )
        self.procs.append(
            subprocess.Popen(
                [BIN, "serve", "--config", str(config)],
                env={**os.environ, "RUST_LOG": "warn"},
            )
        )
        wait_for(f"http://127.0.0.1:{self.admin_port}/readyz")
        return self

    def admin(self, method: str, path: str, body=None) -> dict:
        token = self.token("sdk-admin", "portcullis:admin")
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def records(self):
        return records(self.audit)

    def record_for(self, request_id: str, deadline: float = 10.0):
        return record_for(self.audit, request_id, deadline)

    def stop(self) -> None:
        stop(self.procs)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("portcullis")).start()
    yield s
    s.stop()


@pytest.fixture()
def client(stack):
    from openai import OpenAI

    return OpenAI(
        base_url=stack.base_url, api_key=stack.token("sdk-user", "user"), max_retries=0, timeout=20
    )
