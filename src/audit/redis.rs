//! The Redis Streams sink: every instance appends its own chain to one
//! stream (`XADD … MAXLEN ~ N`, fields `instance` and `record`), and keeps
//! the hash of its last record in `STREAM:head:INSTANCE`.
//!
//! A batch is appended by one script that first compares the head with
//! the hash the batch continues from, so a write whose reply was lost is
//! never appended twice (the retry finds the head already moved to the
//! batch's last hash), and a second process using the same instance id is
//! found (the head moved somewhere else). A head that has vanished (Redis
//! restarted without persistence) is taken as lost history: the chain goes
//! on, and `audit verify --redis` reports where it resumes.
//!
//! Verify with `portcullis audit verify --redis URL STREAM`: each
//! instance's chain in stream order, its last record against its head.

use super::chain::{check_line, AuditKey, Sealer, GENESIS};
use super::writer::Sink;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    pub stream: String,
    /// Approximate length the stream is trimmed to.
    pub max_len: u64,
    pub timeout: Duration,
}

const APPEND: &str = r#"
local head = redis.call('GET', KEYS[2])
if head == false then head = '' end
if head == ARGV[4] then return 'done' end
if head ~= '' and head ~= ARGV[3] then return 'conflict:' .. head end
for i = 5, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'instance', ARGV[2], 'record', ARGV[i])
end
redis.call('SET', KEYS[2], ARGV[4])
if head == '' and ARGV[3] ~= string.rep('0', 64) then return 'resumed' end
return 'ok'
"#;

pub struct RedisSink {
    opts: RedisOptions,
    sealer: Sealer,
    instance: String,
    client: redis::Client,
    con: Option<redis::Connection>,
    prev: String,
    script: redis::Script,
}

/// The key holding an instance's chain head.
pub fn head_key(stream: &str, instance: &str) -> String {
    format!("{stream}:head:{instance}")
}

fn connect(client: &redis::Client, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}

impl RedisSink {
    pub fn open(opts: RedisOptions, sealer: Sealer) -> anyhow::Result<Self> {
        let instance = sealer.instance.clone().unwrap_or_else(|| "default".into());
        let client = redis::Client::open(opts.url.as_str())
            .map_err(|e| anyhow::anyhow!("audit.redis.url: {e}"))?;
        let mut con = connect(&client, opts.timeout)
            .map_err(|e| anyhow::anyhow!("audit Redis stream {}: {e}", opts.stream))?;
        let head: Option<String> = redis::cmd("GET")
            .arg(head_key(&opts.stream, &instance))
            .query(&mut con)
            .map_err(|e| anyhow::anyhow!("audit Redis stream {}: {e}", opts.stream))?;
        Ok(Self {
            prev: head.unwrap_or_else(|| GENESIS.into()),
            con: Some(con),
            client,
            instance,
            sealer,
            opts,
            script: redis::Script::new(APPEND),
        })
    }
}

impl Sink for RedisSink {
    fn name(&self) -> String {
        format!("audit Redis stream {}", self.opts.stream)
    }

    fn write(&mut self, records: &[Value]) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::with_capacity(records.len());
        let mut prev = self.prev.clone();
        for r in records {
            let (line, hash) = self.sealer.seal(r, &prev);
            lines.push(line);
            prev = hash;
        }
        let con = match self.con.as_mut() {
            Some(c) => c,
            None => self
                .con
                .insert(connect(&self.client, self.opts.timeout).map_err(|e| e.to_string())?),
        };
        let mut call = self.script.prepare_invoke();
        call.key(&self.opts.stream)
            .key(head_key(&self.opts.stream, &self.instance))
            .arg(self.opts.max_len)
            .arg(&self.instance)
            .arg(&self.prev)
            .arg(&prev);
        for l in &lines {
            call.arg(l);
        }
        let reply: String = match call.invoke(con) {
            Ok(r) => r,
            Err(e) => {
                // The reply may be lost after the script ran: the next
                // attempt's head check tells.
                self.con = None;
                return Err(e.to_string());
            }
        };
        match reply.as_str() {
            "ok" | "done" => {}
            "resumed" => log::warn!(
                "{}: the head of instance {} was missing (Redis lost its data?); the chain resumes",
                self.name(),
                self.instance
            ),
            other => {
                return Err(format!(
                    "the chain head of instance {} was moved by another writer ({other}); \
                     every instance needs its own `server.instance_id`",
                    self.instance
                ))
            }
        }
        self.prev = prev;
        Ok(())
    }
}

/// One instance's chain in a stream, once checked.
#[derive(Debug, PartialEq, Eq)]
pub struct StreamChain {
    pub instance: String,
    pub records: usize,
    /// The first record continues from this hash, not the genesis hash:
    /// older entries were trimmed (`MAXLEN`) or lost.
    pub resumes_from: Option<String>,
}

/// Check every instance's chain in `stream`. `Err` names the first break.
pub fn verify_stream(
    url: &str,
    stream: &str,
    key: Option<&AuditKey>,
) -> anyhow::Result<Result<Vec<StreamChain>, String>> {
    let client = redis::Client::open(url)?;
    let mut con = connect(&client, Duration::from_secs(5))?;
    // instance → (records, resumes_from, last hash)
    let mut chains: BTreeMap<String, (usize, Option<String>, String)> = BTreeMap::new();
    let mut start = "-".to_string();
    loop {
        let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query(&mut con)?;
        let Some((last_id, _)) = page.last() else {
            break;
        };
        let last_id = last_id.clone();
        for (id, fields) in page {
            let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
            let (Some(instance), Some(line)) = (field("instance"), field("record")) else {
                return Ok(Err(format!("entry {id}: no `instance` or `record` field")));
            };
            let checked = match check_line(line, key) {
                Ok(c) => c,
                Err(why) => return Ok(Err(format!("entry {id} (instance {instance}): {why}"))),
            };
            match chains.get_mut(instance) {
                None => {
                    let resumes = (checked.prev_hash != GENESIS).then(|| checked.prev_hash.clone());
                    chains.insert(instance.clone(), (1, resumes, checked.hash));
                }
                Some((n, _, last)) => {
                    if checked.prev_hash != *last {
                        return Ok(Err(format!(
                            "entry {id} (instance {instance}): prev_hash does not match the instance's record before it \
                             (a record was deleted, inserted or moved)"
                        )));
                    }
                    *n += 1;
                    *last = checked.hash;
                }
            }
        }
        start = format!("({last_id}");
    }
    let mut out = Vec::new();
    for (instance, (records, resumes_from, last)) in chains {
        let head: Option<String> = redis::cmd("GET")
            .arg(head_key(stream, &instance))
            .query(&mut con)?;
        if let Some(head) = head.filter(|h| *h != last) {
            return Ok(Err(format!(
                "instance {instance}: the stream ends at {last} but the chain head is {head} \
                 (records after it were deleted)"
            )));
        }
        out.push(StreamChain {
            instance,
            records,
            resumes_from,
        });
    }
    Ok(Ok(out))
}
