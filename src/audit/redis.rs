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
    /// The chain head; read from Redis on the first connection (so that an
    /// unreachable Redis does not stop the gateway from starting: the sink
    /// starts as failing, and `audit.on_error` decides).
    prev: Option<String>,
    script: redis::Script,
    /// Records at the front of the next batch already appended (a batch
    /// that failed part-way).
    committed: usize,
    /// The last append got no answer: the head it would have set and how
    /// many records it carried. If Redis holds that head, it ran.
    unsure: Option<(String, usize)>,
}

/// Records appended by one script call at most (a long script blocks
/// Redis for everyone else), and bytes (records with `record_content`
/// can be large; Redis refuses a command over its query buffer limit).
const MAX_APPEND: usize = 500;
const MAX_APPEND_BYTES: usize = 8 << 20;

/// `records` in runs of at most [`MAX_APPEND`] records and about
/// [`MAX_APPEND_BYTES`] (a single larger record goes alone).
fn chunks(records: &[Value]) -> Vec<&[Value]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, r) in records.iter().enumerate() {
        let size = r.to_string().len();
        if i > start && (i - start >= MAX_APPEND || bytes + size > MAX_APPEND_BYTES) {
            out.push(&records[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < records.len() {
        out.push(&records[start..]);
    }
    out
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
    /// Check the URL; the connection is made on the first write.
    pub fn open(opts: RedisOptions, sealer: Sealer) -> anyhow::Result<Self> {
        let instance = sealer.instance.clone().unwrap_or_else(|| "default".into());
        let client = redis::Client::open(opts.url.as_str())
            .map_err(|e| anyhow::anyhow!("audit.redis.url: {e}"))?;
        Ok(Self {
            prev: None,
            con: None,
            client,
            instance,
            sealer,
            opts,
            script: redis::Script::new(APPEND),
            committed: 0,
            unsure: None,
        })
    }

    fn head(&mut self) -> redis::RedisResult<Option<String>> {
        let key = head_key(&self.opts.stream, &self.instance);
        let con = self.connection()?;
        redis::cmd("GET").arg(key).query(con)
    }

    fn connection(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        match self.con {
            Some(ref mut c) => Ok(c),
            None => Ok(self.con.insert(connect(&self.client, self.opts.timeout)?)),
        }
    }

    /// Append one batch after `expected` (the head Redis should hold).
    fn append(&mut self, lines: &[String], expected: &str, last: &str) -> Result<String, String> {
        if self.con.is_none() {
            self.con = Some(connect(&self.client, self.opts.timeout).map_err(|e| e.to_string())?);
        }
        let Some(con) = self.con.as_mut() else {
            return Err("no connection".into());
        };
        let mut call = self.script.prepare_invoke();
        call.key(&self.opts.stream)
            .key(head_key(&self.opts.stream, &self.instance))
            .arg(self.opts.max_len)
            .arg(&self.instance)
            .arg(expected)
            .arg(last);
        for l in lines {
            call.arg(l);
        }
        call.invoke::<String>(con).map_err(|e| e.to_string())
    }

    fn try_write(&mut self, records: &[Value]) -> Result<(), String> {
        if self.prev.is_none() {
            let head = self.head().map_err(|e| e.to_string())?;
            self.prev = Some(head.unwrap_or_else(|| GENESIS.into()));
        }
        let mut records = &records[self.committed.min(records.len())..];
        if let Some((hash, n)) = self.unsure.clone() {
            // Cleared only once Redis has answered: until then the
            // question stays open.
            let head = self.head().map_err(|e| e.to_string())?;
            self.unsure = None;
            if head.as_deref() == Some(hash.as_str()) {
                // The unanswered append ran: those records are in.
                let n = n.min(records.len());
                records = &records[n..];
                self.committed += n;
                self.prev = Some(hash);
            }
        }
        for chunk in chunks(records) {
            let prev = self.prev.clone().unwrap_or_else(|| GENESIS.into());
            let mut lines = Vec::with_capacity(chunk.len());
            let mut last = prev.clone();
            for r in chunk {
                let (line, hash) = self.sealer.seal(r, &last);
                lines.push(line);
                last = hash;
            }
            let reply = match self.append(&lines, &prev, &last) {
                Ok(r) => r,
                Err(e) => {
                    // The reply may be lost after the script ran: the next
                    // attempt asks Redis.
                    self.con = None;
                    self.unsure = Some((last, chunk.len()));
                    return Err(e);
                }
            };
            match reply.as_str() {
                "ok" | "done" => {}
                "resumed" => log::warn!(
                    "{}: the head of instance {} was missing (Redis lost its data?); the chain resumes, \
                     and `audit verify --redis` shows where",
                    self.name(),
                    self.instance
                ),
                other => {
                    // The head moved elsewhere: Redis went back in time (a
                    // failover to a replica behind), or another process
                    // uses this instance id. Going on from this instance's
                    // own chain leaves a visible break rather than a gap
                    // nobody sees, and the sink does not stay stuck.
                    let seen = other.strip_prefix("conflict:").unwrap_or(other).to_string();
                    log::error!(
                        "{}: the chain head of instance {} is {seen}, not {prev}: records were lost \
                         from Redis or another writer uses this instance id; appending after it (verify \
                         will show the break)",
                        self.name(),
                        self.instance
                    );
                    match self.append(&lines, &seen, &last) {
                        Ok(r) if r == "ok" || r == "done" => {}
                        Ok(r) => return Err(format!("chain head keeps moving ({r})")),
                        Err(e) => {
                            self.con = None;
                            self.unsure = Some((last, chunk.len()));
                            return Err(e);
                        }
                    }
                }
            }
            self.committed += chunk.len();
            self.prev = Some(last);
        }
        self.committed = 0;
        Ok(())
    }
}

impl Sink for RedisSink {
    fn name(&self) -> String {
        format!("audit Redis stream {}", self.opts.stream)
    }

    fn write(&mut self, records: &[Value]) -> Result<(), String> {
        self.try_write(records)
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
    // Every instance that ever wrote has a head: one without records lost
    // them all.
    let prefix = head_key(stream, "");
    let heads: Vec<String> = {
        use redis::Commands;
        con.scan_match::<_, String>(format!("{}*", redis_glob_escape(&prefix)))?
            .collect::<Result<_, _>>()?
    };
    for key in &heads {
        let instance = key.strip_prefix(&prefix).unwrap_or(key);
        if !chains.contains_key(instance) {
            return Ok(Err(format!(
                "instance {instance}: it has a chain head but no records in the stream (they were deleted)"
            )));
        }
    }
    let mut out = Vec::new();
    for (instance, (records, resumes_from, last)) in chains {
        let head: Option<String> = redis::cmd("GET")
            .arg(head_key(stream, &instance))
            .query(&mut con)?;
        match head {
            None => {
                return Ok(Err(format!(
                "instance {instance}: its chain head key is missing, so records cut from the end \
                     cannot be ruled out"
            )))
            }
            Some(head) if head != last => {
                return Ok(Err(format!(
                    "instance {instance}: the stream ends at {last} but the chain head is {head} \
                     (records after it were deleted)"
                )))
            }
            Some(_) => {}
        }
        out.push(StreamChain {
            instance,
            records,
            resumes_from,
        });
    }
    Ok(Ok(out))
}

/// `s` with Redis glob characters escaped.
fn redis_glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
