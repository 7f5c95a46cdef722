//! Rate-limit state in Redis, shared by every gateway instance that uses
//! the same server: one atomic Lua script per decision, with the same GCRA
//! arithmetic as `filters::rate_limit::gcra`.
//!
//! The caller's clock is passed in (instances on one network agree to
//! within milliseconds, far below any rate window). If Redis cannot be
//! reached the store returns an error, and the rate-limit filter's
//! `on_error` decides (default: deny, 503 `limiter_unavailable`). The
//! connection is re-established by itself once Redis is back. All keys of
//! a decision live in one Redis, so Redis Cluster is not supported.

use super::redis_conn::LazyRedis;
use async_trait::async_trait;
use filters::rate_limit::{Charge, LimitState, LimitStore};
use std::time::Duration;

/// Key prefix in Redis.
pub const PREFIX: &str = "portcullis:rl:";

const GCRA_SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local commit = ARGV[2] == '1'
local n = #KEYS
local new_tats = {}
local out = {}
local all = true
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local cost = tonumber(ARGV[b + 1])
  local e = tonumber(ARGV[b + 2])
  local burst = tonumber(ARGV[b + 3])
  local force = ARGV[b + 4] == '1'
  local stored = tonumber(redis.call('GET', KEYS[i]))
  local tat = math.max(stored or now, now)
  local new_tat = math.max(tat + cost * e, now)
  local allow_at = new_tat - burst * e
  local allowed, remaining, reset, retry
  if allow_at > now and not force then
    all = false
    allowed, remaining, reset, retry = 0, math.max(math.floor((now - (tat - burst * e)) / e), 0), tat - now, allow_at - now
  else
    allowed, remaining, reset, retry = 1, math.max(math.floor((now - allow_at) / e), 0), new_tat - now, 0
    new_tats[i] = new_tat
  end
  out[#out + 1] = tostring(allowed)
  out[#out + 1] = string.format('%d', remaining)
  out[#out + 1] = string.format('%.17g', reset)
  out[#out + 1] = string.format('%.17g', retry)
end
if all and commit then
  for i = 1, n do
    local ttl = math.ceil(new_tats[i] - now) + 1000
    redis.call('SET', KEYS[i], string.format('%.17g', new_tats[i]), 'PX', ttl)
  end
end
return out
"#;

pub struct RedisLimits {
    redis: LazyRedis,
    script: redis::Script,
}

impl RedisLimits {
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            redis: LazyRedis::new(url, timeout)?,
            script: redis::Script::new(GCRA_SCRIPT),
        })
    }
}

#[async_trait]
impl LimitStore for RedisLimits {
    async fn apply(
        &self,
        charges: &[Charge],
        now_ms: f64,
        commit: bool,
    ) -> Result<Vec<LimitState>, String> {
        let mut conn = self.redis.get().await?;
        let mut call = self.script.prepare_invoke();
        call.arg(format!("{now_ms:.3}"))
            .arg(if commit { "1" } else { "0" });
        for c in charges {
            call.key(format!("{PREFIX}{}", c.key))
                .arg(c.cost)
                .arg(c.emission_ms)
                .arg(c.burst)
                .arg(if c.force { "1" } else { "0" });
        }
        let reply: Vec<String> = self.redis.run(call.invoke_async(&mut conn)).await?;
        if reply.len() != charges.len() * 4 {
            return Err(format!("redis script returned {} values", reply.len()));
        }
        reply
            .chunks(4)
            .map(|r| {
                let num = |s: &str| {
                    s.parse::<f64>()
                        .map_err(|e| format!("redis reply '{s}': {e}"))
                };
                Ok(LimitState {
                    allowed: r[0] == "1",
                    remaining: num(&r[1])? as u64,
                    reset_ms: num(&r[2])?,
                    retry_after_ms: num(&r[3])?,
                })
            })
            .collect()
    }
}
