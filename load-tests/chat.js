// Small non-streaming chats at a constant arrival rate: the scenario of the
// performance budget (README "Performance"). Every reply is checked: 200
// and the exact echo of the prompt.
//
//   RATE=1000 DURATION=20s BASE_URL=… TOKEN=… k6 run chat.js
//   RATE=0: sequential, one request at a time (REQUESTS of them)
import { check } from 'k6';
import { BASE, TOKEN, TREND_STATS, chat, post, replyText, summary } from './lib.js';

const RATE = parseInt(__ENV.RATE || '1000');
const DURATION = __ENV.DURATION || '20s';
// Latency thresholds are for people comparing runs, not for CI: loose by
// default, tighten with P99_MS.
const P99_MS = parseFloat(__ENV.P99_MS || '50');

export const options = {
  scenarios: {
    chat: RATE > 0
      ? {
          executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s', duration: DURATION,
          preAllocatedVUs: Math.min(Math.max(RATE / 20, 10), 200), maxVUs: 1000,
        }
      : { executor: 'shared-iterations', vus: 1, iterations: parseInt(__ENV.REQUESTS || '1000'), maxDuration: '10m' },
  },
  thresholds: {
    checks: ['rate==1'],
    http_req_failed: ['rate==0'],
    http_req_duration: [`p(99)<${P99_MS}`],
  },
  summaryTrendStats: TREND_STATS,
  discardResponseBodies: false,
};

// A handful of prompts, so a guard model's verdict cache is warm as in
// production traffic; VARY=1 makes every prompt new.
const PROMPTS = [
  'Hello, how are you today? A short prompt.',
  'Summarise the plot of Hamlet in two sentences.',
  'What is the capital of Australia?',
  'Write a haiku about the sea.',
];
const VARY = __ENV.VARY === '1';

export default function () {
  let prompt = PROMPTS[__ITER % PROMPTS.length];
  if (VARY) prompt += ` #${__VU}-${__ITER}`;
  const res = post(chat(prompt), TOKEN, 'chat');
  check(res, {
    'status 200': (r) => r.status === 200,
    'reply is the echo': (r) => replyText(r) === prompt,
  });
}

export function handleSummary(data) {
  return summary(data);
}
