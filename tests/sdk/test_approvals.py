"""Held tool calls in a cluster: two gateway instances sharing a real Redis,
the official OpenAI SDK as the agent, and `portcullis approvals` (the CLI)
as the approver.

The agent's model calls `run_shell`, which the tool policy gives users only
with approval. The call is held by one instance; an admin decides through
the other one's admin API; the agent repeats its request on either instance
with `x-portcullis-approval` and gets the call, once."""

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from conftest import BIN, ROOT, free_port, record_for, stop, wait_for

ARGS = {"cmd": "ls /srv"}
TRIGGER = json.dumps({"mock_tool_call": {"name": "run_shell", "arguments": ARGS}})
MESSAGES = [{"role": "user", "content": TRIGGER}]
TOOLS = [{"type": "function", "function": {"name": "run_shell", "parameters": {"type": "object"}}}]


class Cluster:
    """A mock provider, a Redis server and two gateways, `a` and `b`. `b`
    holds calls for 2 seconds only (the expiry is set by the instance that
    holds a call), so expiry is shown without a long wait."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs = []
        self.instances = {}

    def start(self) -> "Cluster":
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server must be installed (scripts/setup.sh installs it)")
        subprocess.run([BIN, "keys", "generate", "--dir", str(self.tmp / "keys")], check=True,
                       stdout=subprocess.DEVNULL)
        redis_port = free_port()
        self.procs.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL,
        ))
        mock_port = free_port()
        self.procs.append(subprocess.Popen(
            [BIN, "mock-provider", "--listen", f"127.0.0.1:{mock_port}"], stdout=subprocess.DEVNULL,
        ))
        wait_for(f"http://127.0.0.1:{mock_port}/v1/models")
        for name, ttl in [("a", 60), ("b", 2)]:
            port, admin_port = free_port(), free_port()
            folder = self.tmp / name
            folder.mkdir()
            config = folder / "gateway.yaml"
            config.write_text(f"""
server:
  listen: 127.0.0.1:{port}
  admin_listen: 127.0.0.1:{admin_port}
  shutdown_grace_secs: 0
state:
  redis_url: redis://127.0.0.1:{redis_port}
providers:
  mock:
    base_url: http://127.0.0.1:{mock_port}/v1
    api_key: sk-provider
models:
  mock-small: {{ provider: mock }}
registry:
  approve_seed: true
auth:
  keys:
    - dir: {self.tmp / "keys"}
  issuer: portcullis-dev
  audience: [portcullis]
  allow_dev_issuer: true
tools:
  policy: {ROOT / "policies" / "tools.yaml"}
approvals:
  ttl_secs: {ttl}
audit:
  file: {folder / "audit.jsonl"}
""")
            self.procs.append(subprocess.Popen(
                [BIN, "serve", "--config", str(config)], env={**os.environ, "RUST_LOG": "warn"},
            ))
            self.instances[name] = {"port": port, "admin": f"http://127.0.0.1:{admin_port}",
                                    "audit": folder / "audit.jsonl"}
        for i in self.instances.values():
            wait_for(f"{i['admin']}/readyz")
        return self

    def token(self, sub: str, roles: str) -> str:
        out = subprocess.run(
            [BIN, "token", "--key", str(self.tmp / "keys" / "private" / "dev.key"),
             "--sub", sub, "--tenant", "acme", "--roles", roles],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def client(self, instance: str, sub: str = "alice", roles: str = "user") -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.instances[instance]['port']}/v1",
            api_key=self.token(sub, roles), max_retries=0, timeout=20,
        )

    def cli(self, instance: str, *args: str, sub: str = "bob", roles: str = "portcullis:admin"):
        """`portcullis approvals ARGS` against an instance's admin API."""
        return subprocess.run(
            [BIN, "approvals", *args, "--admin-url", self.instances[instance]["admin"]],
            env={**os.environ, "PORTCULLIS_ADMIN_TOKEN": self.token(sub, roles)},
            capture_output=True, text=True, timeout=30,
        )

    def record(self, instance: str, request_id: str) -> dict:
        return record_for(self.instances[instance]["audit"], request_id)

    def stop(self) -> None:
        stop(self.procs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("approvals")).start()
    yield c
    c.stop()


def hold(client: openai.OpenAI) -> tuple[str, str]:
    """Ask; the model calls run_shell; return the approval id and the text."""
    raw = client.chat.completions.with_raw_response.create(
        model="mock-small", messages=MESSAGES, tools=TOOLS
    )
    reply = raw.parse()
    choice = reply.choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    approval = raw.headers["x-portcullis-approval-id"]
    assert f"held for approval {approval}" in choice.message.content
    assert "ls /srv" not in raw.http_response.text
    return approval, raw.headers["x-request-id"]


def retrieve(client: openai.OpenAI, approval: str, **kw):
    return client.chat.completions.with_raw_response.create(
        model="mock-small", messages=MESSAGES, tools=TOOLS,
        extra_headers={"x-portcullis-approval": approval}, **kw,
    )


def test_held_on_one_instance_approved_through_the_cli_retrieved_on_the_other(cluster):
    agent_a, agent_b = cluster.client("a"), cluster.client("b")
    approval, asked = hold(agent_a)
    assert cluster.record("a", asked)["approval"] == {
        "id": approval, "event": "held", "tools": ["run_shell"]}

    # Not yet: the SDK raises the 403 with its code.
    with pytest.raises(openai.PermissionDeniedError) as e:
        retrieve(agent_b, approval)
    assert e.value.code == "approval_pending"

    # The approver sees it pending from the other instance, with the call.
    listed = cluster.cli("b", "list", "--state", "pending")
    assert listed.returncode == 0, listed.stderr
    assert approval in listed.stdout and "alice" in listed.stdout
    shown = cluster.cli("b", "show", approval)
    assert shown.returncode == 0, shown.stderr
    assert '"arguments":"{\\"cmd\\":\\"ls /srv\\"}"' in shown.stdout, shown.stdout

    approved = cluster.cli("b", "approve", approval, "--reason", "read-only")
    assert approved.returncode == 0, approved.stderr
    assert f"{approval} is now approved" in approved.stdout

    raw = retrieve(agent_b, approval)
    call = raw.parse().choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "call_mock_0", "run_shell", ARGS)
    assert raw.parse().choices[0].finish_reason == "tool_calls"
    record = cluster.record("b", raw.headers["x-request-id"])
    assert record["approval"]["event"] == "handed_out"
    assert record["upstream"] is None

    # Replay refused, on either instance.
    for agent in (agent_a, agent_b):
        with pytest.raises(openai.PermissionDeniedError) as e:
            retrieve(agent, approval)
        assert e.value.code == "approval_used"
        refused = cluster.record("a" if agent is agent_a else "b",
                                 e.value.response.headers["x-request-id"])
        assert (refused["blocked_by"], refused["reason_code"]) == ("approval", "approval_used")

    # The agent runs the tool and sends the result back: accepted on both.
    follow = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "backups\nwww"},
    ]
    for agent in (agent_a, agent_b):
        r = agent.chat.completions.create(model="mock-small", messages=follow)
        assert r.choices[0].finish_reason == "stop"


def test_a_denied_call_is_refused_with_its_code_and_reason(cluster):
    approval, _ = hold(cluster.client("a"))
    no_reason = cluster.cli("a", "deny", approval, "--reason", "")
    assert no_reason.returncode != 0 and "invalid_request" in no_reason.stderr
    denied = cluster.cli("a", "deny", approval, "--reason", "no shells on prod")
    assert denied.returncode == 0, denied.stderr
    with pytest.raises(openai.PermissionDeniedError) as e:
        retrieve(cluster.client("b"), approval)
    assert e.value.code == "approval_denied"
    record = cluster.record("b", e.value.response.headers["x-request-id"])
    assert "no shells on prod" in record["reason"]


def test_nobody_approves_their_own_call(cluster):
    approval, _ = hold(cluster.client("a"))
    mine = cluster.cli("b", "approve", approval, sub="alice", roles="user,portcullis:admin")
    assert mine.returncode != 0
    assert "403 self_approval" in mine.stderr
    # A user without the admin role may not decide at all.
    user = cluster.cli("b", "approve", approval, sub="mallory", roles="user")
    assert user.returncode != 0 and "403 forbidden" in user.stderr
    shown = cluster.cli("a", "show", approval)
    assert re.search(r"^state\s+pending$", shown.stdout, re.M), shown.stdout


def test_an_expired_approval_is_refused_and_cannot_be_decided(cluster):
    approval, _ = hold(cluster.client("b"))  # b holds for 2 s
    time.sleep(2.3)
    late = cluster.cli("a", "approve", approval)
    assert late.returncode != 0 and "409 invalid_transition" in late.stderr
    with pytest.raises(openai.PermissionDeniedError) as e:
        retrieve(cluster.client("a"), approval)
    assert e.value.code == "approval_expired"
    listed = cluster.cli("a", "list", "--state", "expired")
    assert approval in listed.stdout


def test_a_streamed_call_is_held_and_handed_out_as_a_stream_once_across_a_race(cluster):
    agent = cluster.client("a")
    text, leaked = "", False
    for chunk in agent.chat.completions.create(
        model="mock-small", messages=MESSAGES, tools=TOOLS, stream=True
    ):
        for c in chunk.choices:
            text += c.delta.content or ""
            leaked |= bool(c.delta.tool_calls)
    assert not leaked
    approval = re.search(r"held for approval (apr_[0-9a-z]+)", text).group(1)
    assert cluster.cli("b", "approve", approval).returncode == 0

    # Both instances asked at once: one hands the call out, the other
    # refuses it as used.
    results = {}

    def ask(name):
        try:
            results[name] = retrieve(cluster.client(name), approval, stream=True).parse()
        except openai.PermissionDeniedError as e:
            results[name] = e

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [s for s in results.values() if not isinstance(s, Exception)]
    lost = [e for e in results.values() if isinstance(e, Exception)]
    assert len(won) == 1 and len(lost) == 1, results
    assert lost[0].code == "approval_used"
    name, arguments = "", ""
    for chunk in won[0]:
        for c in chunk.choices:
            for t in c.delta.tool_calls or []:
                name += t.function.name or ""
                arguments += t.function.arguments or ""
    assert (name, json.loads(arguments)) == ("run_shell", ARGS)


def test_the_approvals_metric_counts_what_happened(cluster):
    text = urllib.request.urlopen(f"{cluster.instances['a']['admin']}/metrics").read().decode()
    held = re.search(r'portcullis_approvals_total\{event="held"\} (\d+)', text)
    assert held and int(held.group(1)) >= 3
