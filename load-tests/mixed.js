// A mix of what a gateway sees in production, at a constant arrival rate:
// benign chats (JSON and streamed), replies that carry secrets (JSON and
// streamed, a PEM block split over many events), prompt-injection attempts,
// prompts a guard model refuses, requests declaring a tool the caller may
// not use, a model calling such a tool, and a caller over its rate limit
// (kinds.js has each kind's share and expectations).
//
// Through a gateway (MODE=gateway or target) each response must carry the
// right status and error code, and no reply may hold a planted secret.
// Against the bare mock (MODE=direct) only the transport is checked.
import { KINDS, THRESHOLDS, TOTAL, send } from './kinds.js';
import { TREND_STATS, summary } from './lib.js';

const RATE = parseInt(__ENV.RATE || '500');
const DURATION = __ENV.DURATION || '20s';
const P99_MS = parseFloat(__ENV.P99_MS || '100');

export const options = {
  scenarios: {
    mixed: {
      executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s', duration: DURATION,
      preAllocatedVUs: Math.min(Math.max(RATE / 10, 10), 400), maxVUs: 2000,
    },
  },
  thresholds: Object.assign({ 'http_req_duration{kind:benign}': [`p(99)<${P99_MS}`] }, THRESHOLDS),
  summaryTrendStats: TREND_STATS,
};

export default function () {
  let n = Math.random() * TOTAL;
  for (const [kind, [weight]] of Object.entries(KINDS)) {
    if (n < weight) {
      send(kind);
      return;
    }
    n -= weight;
  }
}

export function handleSummary(data) {
  return summary(data);
}
