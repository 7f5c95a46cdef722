// Streamed chats (SSE). Two modes:
//
//   RATE=100 DURATION=20s   new streams at a constant arrival rate
//   OPEN=1000               that many streams open at once, each held for
//                           the whole reply (the runner paces the mock so a
//                           reply takes about STREAM_SECS), to measure what
//                           an open stream costs the gateway
//
// Measured per stream: time to first byte (stream_ttfb_ms), the whole
// reply (stream_duration_ms) and the mean gap between events
// (stream_gap_ms: k6 reads a response whole, so the gap is the time from
// the first byte to the last over the number of events less one).
// Checked: 200, the reply put back together from its events is the echo of
// the prompt, `[DONE]` ends it, usage is reported.
import { check } from 'k6';
import { Trend } from 'k6/metrics';
import { TOKEN, TREND_STATS, chat, post, sse, summary } from './lib.js';

const RATE = parseInt(__ENV.RATE || '100');
const OPEN = parseInt(__ENV.OPEN || '0');
const DURATION = __ENV.DURATION || '20s';
// Characters in the reply; the mock sends CHUNK of them per event.
const CHARS = parseInt(__ENV.CHARS || '200');
// Every VU of OPEN starts at the same instant: the first bytes of a
// thousand streams queue behind a thousand connection set-ups.
const P99_TTFB_MS = parseFloat(__ENV.P99_TTFB_MS || (OPEN > 0 ? '2000' : '100'));

const ttfb = new Trend('stream_ttfb_ms', true);
const gap = new Trend('stream_gap_ms', true);
const duration = new Trend('stream_duration_ms', true);

export const options = {
  scenarios: {
    stream: OPEN > 0
      ? { executor: 'per-vu-iterations', vus: OPEN, iterations: 1, maxDuration: '10m' }
      : {
          executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s', duration: DURATION,
          preAllocatedVUs: Math.min(Math.max(RATE / 10, 10), 400), maxVUs: 2000,
        },
  },
  thresholds: {
    checks: ['rate==1'],
    http_req_failed: ['rate==0'],
    stream_ttfb_ms: [`p(99)<${P99_TTFB_MS}`],
  },
  summaryTrendStats: TREND_STATS,
};

const WORDS = 'the quick brown fox jumps over the lazy dog while streams flow ';

export default function () {
  const prompt = WORDS.repeat(Math.ceil(CHARS / WORDS.length)).slice(0, CHARS);
  const res = post(chat(prompt, { stream: true, stream_options: { include_usage: true } }), TOKEN, 'stream');
  const s = sse(res.body);
  const ok = check(res, {
    'status 200': (r) => r.status === 200,
    'reply is the echo': () => s.text === prompt,
    'ends with [DONE]': () => s.done && !s.error,
    'usage reported': () => s.usage !== null,
  });
  if (ok) {
    ttfb.add(res.timings.waiting);
    duration.add(res.timings.duration);
    gap.add(s.events > 1 ? res.timings.receiving / (s.events - 1) : 0);
  }
}

export function handleSummary(data) {
  return summary(data);
}
