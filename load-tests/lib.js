// Shared by the k6 scenarios: where requests go, as whom, what they carry,
// and the checks every reply gets. The scenarios run unchanged against the
// mock provider directly, through Portcullis, or through any other
// OpenAI-compatible gateway (`run.sh --target URL`).
//
// Environment:
//   BASE_URL       the API base, e.g. http://127.0.0.1:8080/v1 (required)
//   MODE           direct | gateway | target. `direct` is the bare mock:
//                  only the transport is checked (the mock leaks every
//                  secret it is asked to echo, and refuses nothing).
//                  `gateway` and `target`: every security expectation too.
//   TOKEN          the caller's API key (a Portcullis JWT)
//   LIMITED_TOKEN  a second caller on a small rate limit (mixed, smoke)
//   MODEL          the model to ask for (default mock-small)
//   SUMMARY        where the JSON summary goes (the runner reads it)
import http from 'k6/http';

export const BASE = __ENV.BASE_URL;
export const MODE = __ENV.MODE || 'gateway';
export const SCREENED = MODE !== 'direct';
export const MODEL = __ENV.MODEL || 'mock-small';
export const TREND_STATS = ['avg', 'min', 'med', 'p(90)', 'p(99)', 'max'];

if (!BASE) {
  throw new Error('BASE_URL is not set (for example http://127.0.0.1:8080/v1)');
}

/** Request parameters for a caller (`token`), tagged with the request kind. */
export function params(token, kind) {
  return {
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    tags: { kind },
  };
}

export const TOKEN = __ENV.TOKEN || 'no-token';
export const LIMITED_TOKEN = __ENV.LIMITED_TOKEN || TOKEN;

/** A chat request body; `extra` is merged in (stream, tools, …). */
export function chat(content, extra) {
  return JSON.stringify(Object.assign({ model: MODEL, messages: [{ role: 'user', content }] }, extra || {}));
}

export function post(body, token, kind) {
  return http.post(`${BASE}/chat/completions`, body, params(token, kind));
}

// Planted secrets: fake values in the shapes the redaction policy knows.
// The mock echoes the prompt, so a reply carries them unless the gateway
// redacts them. A PEM block's body line is checked on its own: it is what
// leaks when only the markers are caught.
const PEM_BODY = 'MIIEowIBAAKCAQEA7Vj9aQ3Rk4nTq2bXq8m1PzL0cW5sYt6uH2gF3dE4cB5aZ9yX';
export const PEM =
  `-----BEGIN RSA PRIVATE KEY-----\n${PEM_BODY}\nkq7Yb3PzQ8rW2tV5uX1yZ4aB6cD9eF0gH3iJ5kL7mN8oP1qR2sT4uV6wX8yZ0aB\n-----END RSA PRIVATE KEY-----`;
export const SECRETS = {
  'aws-access-key-id': 'AKIAZ3MHX2QWERTY7ABC',
  'github-token': 'ghp_8fK2mQ9xR4tV7wY1zA3bC5dE6gH0jL2nP4sU',
  'private-key': PEM_BODY,
};

// Each secret's halves too: a redaction that lets part of a secret through
// is a leak.
const FRAGMENTS = Object.entries(SECRETS).flatMap(([name, v]) => [
  [name, v], [name, v.slice(0, v.length >> 1)], [name, v.slice(v.length >> 1)],
]);

/** The name of the first planted secret `text` holds (whole or half), or null. */
export function leaked(text) {
  if (!text) return null;
  for (const [name, value] of FRAGMENTS) {
    if (text.indexOf(value) >= 0) return name;
  }
  return null;
}

/** The error code of an OpenAI-shaped error reply, or null. */
export function errorCode(res) {
  try {
    return res.json('error.code');
  } catch (_) {
    return null;
  }
}

/** The reply text of a JSON chat completion (every choice), or null. */
export function replyText(res) {
  try {
    const body = res.json();
    return body.choices.map((c) => (c.message && c.message.content) || '').join('\n');
  } catch (_) {
    return null;
  }
}

/**
 * An SSE body taken apart: the parsed events, whether it ended with
 * `[DONE]`, the reply text of choice 0 put back together, every tool call
 * name, and whether an error event came.
 */
export function sse(body) {
  const out = { events: 0, done: false, text: '', tools: [], error: null, usage: null };
  if (typeof body !== 'string') return out;
  for (const block of body.split('\n\n')) {
    const line = block.trim();
    if (!line.startsWith('data:')) continue;
    const data = line.slice(5).trim();
    if (data === '[DONE]') { out.done = true; continue; }
    let ev;
    try { ev = JSON.parse(data); } catch (_) { out.error = 'unparsable event'; continue; }
    out.events += 1;
    if (ev.error) { out.error = ev.error.code || 'error'; continue; }
    if (ev.usage) out.usage = ev.usage;
    for (const c of ev.choices || []) {
      const d = c.delta || {};
      if (c.index === 0 && typeof d.content === 'string') out.text += d.content;
      for (const t of d.tool_calls || []) {
        if (t.function && t.function.name) out.tools.push(t.function.name);
      }
    }
  }
  return out;
}

/** A JSON summary for the runner, and a few lines for a person running k6 by hand. */
export function summary(data) {
  const lines = [];
  for (const [name, m] of Object.entries(data.metrics)) {
    if (m.type === 'trend') {
      const stats = [['p50', 'med'], ['p90', 'p(90)'], ['p99', 'p(99)'], ['max', 'max']]
        .filter(([, k]) => typeof m.values[k] === 'number')
        .map(([label, k]) => `${label} ${m.values[k].toFixed(3)}`);
      lines.push(`${name}: ${stats.join(' ')}`);
    }
  }
  const checks = data.metrics.checks ? data.metrics.checks.values : null;
  if (checks) lines.push(`checks: ${checks.passes} passed, ${checks.fails} failed`);
  const out = { stdout: lines.join('\n') + '\n' };
  if (__ENV.SUMMARY) out[__ENV.SUMMARY] = JSON.stringify(data);
  return out;
}
