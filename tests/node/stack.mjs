// Start the mock provider and the gateway (real binaries) for the Node.js
// SDK tests, as tests/sdk/conftest.py does for Python.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, readFileSync, existsSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const BIN = process.env.PORTCULLIS_BIN ?? join(ROOT, "target", "debug", "portcullis");

function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

async function waitFor(url, deadlineMs = 20_000) {
  const end = Date.now() + deadlineMs;
  while (Date.now() < end) {
    try {
      const r = await fetch(url);
      if (r.status === 200) return;
    } catch {
      // not listening yet
    }
    await sleep(50);
  }
  throw new Error(`${url} not ready after ${deadlineMs} ms`);
}

export class Stack {
  constructor() {
    this.tmp = mkdtempSync(join(tmpdir(), "portcullis-node-"));
    this.audit = join(this.tmp, "audit.jsonl");
    this.procs = [];
  }

  get baseURL() {
    return `http://127.0.0.1:${this.port}/v1`;
  }

  /** The Anthropic SDK's base URL (it adds `/v1` itself). */
  get anthropicBaseURL() {
    return `http://127.0.0.1:${this.port}`;
  }

  token(sub, roles, tenant = "node") {
    const key = join(this.tmp, "keys", "private", "dev.key");
    return execFileSync(BIN, ["token", "--key", key, "--sub", sub, "--tenant", tenant, "--roles", roles], {
      encoding: "utf8",
    }).trim();
  }

  async start() {
    [this.mockPort, this.port, this.adminPort] = [await freePort(), await freePort(), await freePort()];
    execFileSync(BIN, ["keys", "generate", "--dir", join(this.tmp, "keys")], { stdio: "ignore" });
    writeFileSync(
      join(this.tmp, "limits.yaml"),
      "tiers:\n" +
        "  - { id: trial, roles: [trial], requests_per_minute: 2, burst: 2 }\n" +
        "  - { id: standard, roles: [user], requests_per_minute: 6000, burst: 1000, tokens_per_minute: 1000000 }\n" +
        "default_tier: standard\n",
    );
    this.spawn([BIN, "mock-provider", "--listen", `127.0.0.1:${this.mockPort}`]);
    await waitFor(`http://127.0.0.1:${this.mockPort}/v1/models`);
    const config = join(this.tmp, "gateway.yaml");
    writeFileSync(
      config,
      `
server:
  listen: 127.0.0.1:${this.port}
  admin_listen: 127.0.0.1:${this.adminPort}
  shutdown_grace_secs: 0
providers:
  mock:
    base_url: http://127.0.0.1:${this.mockPort}/v1
    api_key: sk-provider
  claude:
    base_url: http://127.0.0.1:${this.mockPort}/v1
    kind: anthropic
    api_key: sk-ant-provider
models:
  mock-small: { provider: mock }
  text-embedding-mock: { provider: mock }
  claude-mock: { provider: claude }
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
  policy: ${join(ROOT, "policies", "redaction.yaml")}
tools:
  policy: ${join(ROOT, "policies", "tools.yaml")}
injection:
  policy: ${join(ROOT, "policies", "injection.yaml")}
guard:
  policy: ${join(ROOT, "policies", "guard.yaml")}
  provider: mock
  model: llama-guard-3-8b
  protocol: llama-guard
audit:
  file: ${this.audit}
`,
    );
    this.spawn([BIN, "serve", "--config", config], { RUST_LOG: "warn" });
    await waitFor(`http://127.0.0.1:${this.adminPort}/readyz`);
    return this;
  }

  spawn([cmd, ...args], env = {}) {
    const p = spawn(cmd, args, { stdio: ["ignore", "ignore", "inherit"], env: { ...process.env, ...env } });
    this.procs.push(p);
  }

  async admin(method, path, body) {
    const r = await fetch(`http://127.0.0.1:${this.adminPort}${path}`, {
      method,
      headers: { authorization: `Bearer ${this.token("node-admin", "portcullis:admin")}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${await r.text()}`);
    return r.json();
  }

  /** The audit record of one request, once the writer has it. */
  async recordFor(requestId, deadlineMs = 10_000) {
    const end = Date.now() + deadlineMs;
    while (Date.now() < end) {
      if (existsSync(this.audit)) {
        const text = readFileSync(this.audit, "utf8");
        // Only whole lines: the writer may be half-way through the last one.
        for (const line of text.slice(0, text.lastIndexOf("\n") + 1).split("\n")) {
          if (!line) continue;
          const r = JSON.parse(line);
          if (r.request_id === requestId) return r;
        }
      }
      await sleep(20);
    }
    throw new Error(`no audit record for ${requestId}`);
  }

  async stop() {
    const exits = this.procs.reverse().map(
      (p) =>
        new Promise((ok) => {
          if (p.exitCode !== null) return ok();
          const timer = setTimeout(() => p.kill("SIGKILL"), 20_000);
          p.once("exit", () => {
            clearTimeout(timer);
            ok();
          });
          p.kill("SIGTERM");
        }),
    );
    await Promise.all(exits);
    rmSync(this.tmp, { recursive: true, force: true });
  }
}
