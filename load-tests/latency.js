// Sequential small chat requests, each sent once straight to the mock
// provider and once through the gateway, so both are measured in the same
// run under the same conditions. Run by ./run.sh.
import http from 'k6/http';
import { check } from 'k6';
import { Trend, Counter } from 'k6/metrics';

const DIRECT = __ENV.DIRECT_URL;   // e.g. http://127.0.0.1:19100/v1
const GATEWAY = __ENV.GATEWAY_URL; // e.g. http://127.0.0.1:18080/v1
const N = parseInt(__ENV.REQUESTS || '1000');
const RATE = parseInt(__ENV.RATE || '0'); // iterations/s; 0: sequential, one VU

const direct = new Trend('direct_ms', true);
const gateway = new Trend('gateway_ms', true);
const errors = new Counter('errors');

export const options = RATE > 0
  ? {
      scenarios: {
        rate: {
          executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s',
          duration: `${Math.ceil(N / RATE)}s`, preAllocatedVUs: 50, maxVUs: 400,
        },
      },
      summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(99)', 'max'],
    }
  : {
      scenarios: { sequential: { executor: 'shared-iterations', vus: 1, iterations: N } },
      summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(99)', 'max'],
    };

// VARY=1: every prompt differs (a guard's verdict cache never answers).
const VARY = __ENV.VARY === '1';
const bodyFor = (i) => JSON.stringify({
  model: 'mock-small',
  messages: [{ role: 'user', content: `Hello, how are you today? A short prompt.${VARY ? ` #${i}` : ''}` }],
});
const params = {
  headers: { 'content-type': 'application/json', authorization: `Bearer ${__ENV.TOKEN || 'load-test'}` },
};

function call(base, trend, body) {
  const res = http.post(`${base}/chat/completions`, body, params);
  const ok = check(res, { 'status 200': (r) => r.status === 200 });
  if (ok) { trend.add(res.timings.duration); } else { errors.add(1); }
}

// Each iteration calls both, so both are measured under the same load
// (with RATE, the mock therefore sees twice the rate).
export default function () {
  const body = bodyFor(`${__VU}-${__ITER}`);
  call(DIRECT, direct, body);
  call(GATEWAY, gateway, body);
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY || 'summary.json']: JSON.stringify(data) };
}
