//! Shared helpers: free ports, an in-process mock provider, and the real
//! gateway binary started on a temporary config.

use futures_util::StreamExt;
use portcullis::testkit::mock::{self, MockOptions, MockState};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen at once before it
/// fails (a deadline against hangs, not a timing assertion).
pub const PATIENCE: Duration = Duration::from_secs(20);

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port nothing listens on now and that this process has not handed out.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
        let mut guard = HANDED_OUT.lock().unwrap();
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_portcullis")
}

/// The mock provider, running on the test's runtime.
pub struct Mock {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Mock {
    pub async fn start(options: MockOptions) -> Mock {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(MockState::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(mock::serve(listener, options, state.clone(), async {
            let _ = rx.await;
        }));
        Mock {
            addr,
            state,
            stop: Some(tx),
        }
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The gateway binary on a temporary config.
pub struct Gateway {
    pub base: String,
    pub admin: String,
    pub audit_path: PathBuf,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub config: PathBuf,
    env: Vec<(String, String)>,
}

/// Knobs for the generated config.
pub struct Setup {
    pub provider: SocketAddr,
    /// Provider base URL; default `http://{provider}/v1`.
    pub provider_url: Option<String>,
    /// Extra environment for the gateway process.
    pub env: Vec<(String, String)>,
    pub max_body_bytes: usize,
    pub client_body_timeout_secs: u64,
    pub client_write_timeout_secs: u64,
    pub read_ms: u64,
    pub record_content: bool,
    /// Appended to the generated config (auth, rate_limit, state sections).
    pub extra_yaml: String,
    /// The `registry:` section; default: seed models approved.
    pub registry_yaml: String,
    /// Files to write into the gateway's folder before it starts.
    pub files: Vec<(String, Vec<u8>)>,
    /// `audit.file`; default `audit.jsonl` in the gateway's folder.
    pub audit_file: Option<PathBuf>,
    /// More lines of the `audit:` section (indented by two spaces).
    pub audit_extra: String,
    pub shutdown_grace_secs: u64,
    /// More lines of the `limits:` section (indented by two spaces).
    pub limits_extra: String,
    /// More providers beside `mock` (indented by two spaces).
    pub extra_providers: String,
}

impl Setup {
    pub fn new(provider: SocketAddr) -> Self {
        Self {
            provider,
            provider_url: None,
            env: Vec::new(),
            max_body_bytes: 4 * 1024 * 1024,
            client_body_timeout_secs: 30,
            client_write_timeout_secs: 30,
            read_ms: 10_000,
            record_content: false,
            extra_yaml: String::new(),
            registry_yaml: "registry:\n  approve_seed: true\n".into(),
            files: Vec::new(),
            audit_file: None,
            audit_extra: String::new(),
            shutdown_grace_secs: 0,
            limits_extra: String::new(),
            extra_providers: String::new(),
        }
    }
}

pub const PROVIDER_KEY: &str = "sk-provider-secret";

impl Gateway {
    pub async fn start(setup: Setup) -> Gateway {
        let mut gw = Gateway::prepare(setup);
        gw.child = Some(gw.spawn(&gw.env));
        gw.wait_ready().await;
        gw
    }

    /// Write the config and files, without starting the gateway.
    pub fn prepare(setup: Setup) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let admin_port = free_port();
        let audit_path = setup
            .audit_file
            .clone()
            .unwrap_or_else(|| dir.path().join("audit.jsonl"));
        let yaml = format!(
            r#"
server:
  listen: 127.0.0.1:{port}
  admin_listen: 127.0.0.1:{admin_port}
  threads: 2
  shutdown_grace_secs: {grace}
limits:
  max_body_bytes: {max}
  client_body_timeout_secs: {body_timeout}
  client_write_timeout_secs: {write_timeout}
{limits_extra}providers:
  mock:
    base_url: {provider_url}
    api_key: {PROVIDER_KEY}
    timeouts: {{ connect_ms: 1000, read_ms: {read_ms}, total_ms: 30000 }}
{extra_providers}models:
  mock-small: {{ provider: mock }}
  mock-large: {{ provider: mock, upstream_model: mock-large-2026-01 }}
{registry}
audit:
  file: {audit_file}
  record_content: {record_content}
{audit_extra}
{extra}
"#,
            audit_file = audit_path.display(),
            grace = setup.shutdown_grace_secs,
            audit_extra = setup.audit_extra,
            extra = setup.extra_yaml,
            registry = setup.registry_yaml,
            max = setup.max_body_bytes,
            body_timeout = setup.client_body_timeout_secs,
            write_timeout = setup.client_write_timeout_secs,
            limits_extra = setup.limits_extra,
            extra_providers = setup.extra_providers,
            provider_url = setup
                .provider_url
                .clone()
                .unwrap_or_else(|| format!("http://{}/v1", setup.provider)),
            read_ms = setup.read_ms,
            record_content = setup.record_content,
        );
        for (name, bytes) in &setup.files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        let config = dir.path().join("gateway.yaml");
        std::fs::write(&config, yaml).unwrap();
        Gateway {
            base: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            audit_path,
            dir,
            child: None,
            config,
            env: setup.env,
        }
    }

    fn spawn(&self, env: &[(String, String)]) -> Child {
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start gateway")
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the gateway again on the same folder and config.
    pub async fn restart(&mut self) {
        self.child = Some(self.spawn(&self.env));
        self.wait_ready().await;
    }

    /// `serve` on this gateway's config, expected to fail: its stderr.
    pub fn start_fails(&self) -> String {
        let out = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        assert!(!out.status.success(), "gateway started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("gateway exited before it was ready: {status}");
            }
            if let Ok(r) = client.get(format!("{}/readyz", self.admin)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway not ready after {PATIENCE:?}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POST JSON to a gateway path.
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("gateway answers")
    }

    /// GET a path on the proxy (`/v1/...`) or, for other paths, the admin
    /// listener.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        let url = if path.starts_with("/v1/") {
            self.url(path)
        } else {
            format!("{}{path}", self.admin)
        };
        reqwest::Client::new()
            .get(url)
            .send()
            .await
            .expect("gateway answers")
    }

    /// Wait until the audit file holds at least `n` records; return them all.
    pub async fn records(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let records = read_records(&self.audit_path);
            if records.len() >= n {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} audit records, found {}",
                records.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The audit record of one request.
    pub async fn record_for(&self, request_id: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(r) = read_records(&self.audit_path)
                .into_iter()
                .find(|r| r["request_id"] == request_id)
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no audit record for {request_id}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("gateway did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("gateway did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn read_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn chat(content: &str) -> Value {
    serde_json::json!({"model": "mock-small", "messages": [{"role": "user", "content": content}]})
}

/// Assert an OpenAI-shaped error with this status and code; return the
/// request id.
pub async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(resp.status().as_u16(), status);
    let id = resp
        .headers()
        .get("x-request-id")
        .expect("x-request-id on an error")
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(body["error"]["type"].is_string());
    id
}

pub fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()["x-request-id"].to_str().unwrap().to_string()
}

pub fn options() -> MockOptions {
    MockOptions::default()
}

/// An ES256 signing key whose public half the gateway loads as `keys/test.pem`.
pub struct TestKeys {
    pub public_pem: String,
    private: jsonwebtoken::EncodingKey,
}

impl TestKeys {
    pub fn new() -> Self {
        let pair = rcgen::KeyPair::generate().unwrap();
        Self {
            public_pem: pair.public_key_pem(),
            private: jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())
                .unwrap(),
        }
    }

    /// A token with these claims, signed with this key under `kid`.
    pub fn sign(&self, kid: &str, claims: &Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, &self.private).unwrap()
    }

    /// A valid token for `sub` with `roles`, for the `auth_yaml` settings.
    pub fn token(&self, sub: &str, roles: &[&str]) -> String {
        self.sign("test", &claims(sub, roles))
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn claims(sub: &str, roles: &[&str]) -> Value {
    serde_json::json!({"sub": sub, "tenant": "acme", "roles": roles, "iss": "test-issuer",
        "aud": "portcullis", "exp": now_secs() + 600, "iat": now_secs()})
}

/// Auth on, loading `keys/*.pem` from the gateway's folder.
pub const AUTH_YAML: &str =
    "auth:\n  keys:\n    - dir: keys\n  issuer: test-issuer\n  audience: [portcullis]\n";

/// Rate limits from `limits.yaml` in the gateway's folder.
pub const LIMITS_YAML: &str = "rate_limit:\n  policy: limits.yaml\n";

/// A setup with auth (key `test`) and the given rate-limit policy.
pub fn secured(provider: SocketAddr, keys: &TestKeys, limits_policy: &str) -> Setup {
    let mut setup = Setup::new(provider);
    setup.extra_yaml = format!("{AUTH_YAML}{LIMITS_YAML}");
    setup.files = vec![
        ("keys/test.pem".into(), keys.public_pem.clone().into_bytes()),
        ("limits.yaml".into(), limits_policy.as_bytes().to_vec()),
    ];
    setup
}

/// A trial tier of 3 requests (burst 3) and 100 tokens per minute; a
/// generous default tier.
pub const TEST_LIMITS: &str = r#"
tiers:
  - { id: trial, roles: [trial], requests_per_minute: 3, burst: 3, tokens_per_minute: 100 }
  - { id: standard, roles: [], requests_per_minute: 6000, burst: 1000 }
default_tier: standard
estimate: { default_max_tokens: 50, chars_per_token: 4 }
"#;

/// POST with a bearer token.
pub async fn post_as(gw: &Gateway, token: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("gateway answers")
}

/// Call the admin API as `token` (None: no Authorization header).
pub async fn admin(
    gw: &Gateway,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let client = reqwest::Client::new();
    let url = format!("{}{path}", gw.admin);
    let mut req = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    req.send().await.expect("admin API answers")
}

/// Copies of the shipped `config/` and `policies/` with a fresh dev key pair
/// beside them (the configs load `../keys` and `../policies`).
pub fn shipped_tree() -> tempfile::TempDir {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    for sub in ["config", "policies"] {
        std::fs::create_dir_all(tmp.path().join(sub)).unwrap();
        for entry in std::fs::read_dir(root.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, tmp.path().join(sub).join(path.file_name().unwrap())).unwrap();
            }
        }
    }
    let out = Command::new(bin())
        .args(["keys", "generate", "--dir"])
        .arg(tmp.path().join("keys"))
        .output()
        .unwrap();
    assert!(out.status.success());
    tmp
}

/// Reads SSE `data:` payloads from a response body.
pub struct Events {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Events {
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            body: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event's data, `None` at the end of the body.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..pos + 2).collect();
                let data = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Some(data);
            }
            let chunk = tokio::time::timeout(PATIENCE, self.body.next())
                .await
                .expect("no event within the deadline")?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk.ok()?));
        }
    }

    pub async fn rest(&mut self) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(e) = self.next().await {
            all.push(e);
        }
        all
    }
}

pub fn stream_chat(content: &str) -> Value {
    json!({"model": "mock-small", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": content}]})
}

/// `portcullis audit verify` on the gateway's audit file must pass; its
/// output.
pub fn verified(gw: &Gateway) -> String {
    let out = Command::new(bin())
        .args(["audit", "verify"])
        .arg(&gw.audit_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "audit verify: {text}");
    text
}

/// A metric's value from the admin listener's `/metrics`.
pub async fn metric(gw: &Gateway, name: &str) -> f64 {
    let text = gw.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

/// An in-process HTTP receiver (a webhook's target, an OTLP collector):
/// every request's path and JSON body, in order, over keep-alive
/// connections; each answered 200.
pub struct Receiver {
    pub url: String,
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 16384];
                    loop {
                        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
                        if let Some(end) = head_end {
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            let len: usize = head
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse().ok())?
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                                let body = serde_json::from_slice(&buf[end + 4..end + 4 + len])
                                    .unwrap_or(Value::Null);
                                buf.drain(..end + 4 + len);
                                if sock
                                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                                let _ = tx.send((path, body));
                                continue;
                            }
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        Receiver { url, rx }
    }

    /// The next request received (its path and body).
    pub async fn next(&mut self) -> (String, Value) {
        tokio::time::timeout(PATIENCE, self.rx.recv())
            .await
            .expect("nothing received within the deadline")
            .expect("receiver gone")
    }
}

/// The arguments of the first call of choice 0 in a stream's events (their
/// data), put back together.
pub fn streamed_arguments<'a>(data: impl IntoIterator<Item = &'a str>) -> String {
    data.into_iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}
