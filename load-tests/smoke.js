// The CI-sized check (seconds): every kind of request once per round, one
// at a time, through the gateway. Correctness thresholds only: every check
// passes, no planted secret leaks, the over-limit caller is refused.
import { KINDS, THRESHOLDS, send } from './kinds.js';
import { TREND_STATS, summary } from './lib.js';

const ROUNDS = parseInt(__ENV.ROUNDS || '8');
const ORDER = Object.keys(KINDS);

export const options = {
  scenarios: {
    smoke: { executor: 'shared-iterations', vus: 1, iterations: ROUNDS * ORDER.length, maxDuration: '2m' },
  },
  // Every round ran to the end (a cut-short run is a failure, not a pass).
  thresholds: Object.assign({ iterations: [`count==${ROUNDS * ORDER.length}`] }, THRESHOLDS),
  summaryTrendStats: TREND_STATS,
};

export default function () {
  send(ORDER[__ITER % ORDER.length]);
}

export function handleSummary(data) {
  return summary(data);
}
