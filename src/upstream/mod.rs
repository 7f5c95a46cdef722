//! Calls to providers, made by the gateway itself with Pingora's pooled
//! client: the request body is read whole by the gateway and re-sent, so
//! no size of prompt is ever lost (Pingora's own proxy path keeps only
//! the first 64 KiB it buffered for a request filter).
//!
//! Every timeout is set: connect, connect plus TLS, each read, each write,
//! pooled idle time, and a deadline for the whole exchange. Host names are
//! resolved asynchronously and cached for [`DNS_TTL`]; https providers get
//! SNI and certificate verification. A pooled connection found closed when
//! it is taken from the pool is not used (Pingora checks it); one that
//! fails while the request is still being written is retried once on a
//! fresh connection. Once the whole request is out, a failure is never
//! retried: the provider may have processed (and billed) it, and a second
//! completion must not be bought behind the client's back.

pub mod guard;

use crate::config::{Provider, ProviderKind, TimeoutsSection};

/// The Messages API version sent to an Anthropic provider when the
/// client named none.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::time::timeout_at;

/// How long a resolved provider address is used before it is looked up again.
pub const DNS_TTL: Duration = Duration::from_secs(60);

/// Why a provider call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    Timeout(String),
    Failed(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout(m) => write!(f, "timeout: {m}"),
            Self::Failed(m) => f.write_str(m),
        }
    }
}

impl From<Box<pingora::Error>> for UpstreamError {
    fn from(e: Box<pingora::Error>) -> Self {
        let text = e.to_string().trim().to_string();
        match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                Self::Timeout(text)
            }
            _ => Self::Failed(text),
        }
    }
}

struct ProviderPeer {
    provider: Provider,
    /// `Host` header value.
    host_header: String,
    /// The peer with its resolved address, and when it was resolved.
    peer: RwLock<Option<(Instant, HttpPeer)>>,
}

/// All providers, and the connection pool shared by them.
pub struct Upstream {
    connector: Connector,
    providers: HashMap<String, Arc<ProviderPeer>>,
}

impl Upstream {
    pub fn new<'a>(
        providers: impl IntoIterator<Item = &'a Provider>,
        connector: Connector,
    ) -> Self {
        let providers = providers
            .into_iter()
            .map(|p| {
                let default_port = if p.tls { 443 } else { 80 };
                let host = if p.host.contains(':') {
                    format!("[{}]", p.host)
                } else {
                    p.host.clone()
                };
                let host_header = if p.port == default_port {
                    host
                } else {
                    format!("{host}:{}", p.port)
                };
                let peer = ProviderPeer {
                    provider: p.clone(),
                    host_header,
                    peer: RwLock::new(None),
                };
                (p.name.clone(), Arc::new(peer))
            })
            .collect();
        Self {
            connector,
            providers,
        }
    }

    /// Send one POST to a provider and read its response header.
    pub async fn post(
        &self,
        provider: &str,
        route_path: &str,
        request_id: &str,
        body: Bytes,
        stream: bool,
        headers: &[(&'static str, String)],
    ) -> Result<Exchange<'_>, UpstreamError> {
        let p = self
            .providers
            .get(provider)
            .ok_or_else(|| UpstreamError::Failed(format!("no provider named {provider}")))?;
        let t = p.provider.timeouts;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(t.total_ms);
        let peer = p.peer().await?;
        let path = format!("{}{}", p.provider.base_path, route_path);
        let mut last_error = None;
        for _attempt in 0..2 {
            let header = p.request_header(&path, request_id, body.len(), stream, headers)?;
            let (mut session, reused) =
                timeout_at(deadline, self.connector.get_http_session(&peer))
                    .await
                    .map_err(|_| UpstreamError::Timeout("connecting".into()))??;
            session.set_read_timeout(Some(Duration::from_millis(t.read_ms)));
            session.set_write_timeout(Some(Duration::from_millis(t.write_ms)));
            let wrote = timeout_at(deadline, async {
                session.write_request_header(Box::new(header)).await?;
                session.write_request_body(body.clone(), true).await?;
                session.finish_request_body().await
            })
            .await;
            match wrote {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    session.shutdown().await;
                    let e = UpstreamError::from(e);
                    // A pooled connection the provider had closed, found
                    // before the whole request was sent: the provider
                    // cannot have acted on it, so a new connection may.
                    if reused && matches!(e, UpstreamError::Failed(_)) {
                        last_error = Some(e);
                        continue;
                    }
                    return Err(e);
                }
                Err(_) => {
                    session.shutdown().await;
                    return Err(UpstreamError::Timeout("sending the request".into()));
                }
            }
            // The whole request is out: whatever happens now, the provider
            // may have processed it (and billed it). Never sent twice.
            match timeout_at(deadline, session.read_response_header()).await {
                Ok(Ok(())) => {
                    return Ok(Exchange {
                        session: Some(session),
                        peer,
                        connector: &self.connector,
                        timeouts: t,
                        deadline,
                    })
                }
                Ok(Err(e)) => {
                    session.shutdown().await;
                    return Err(UpstreamError::from(e));
                }
                Err(_) => {
                    session.shutdown().await;
                    return Err(UpstreamError::Timeout("no response header in time".into()));
                }
            }
        }
        Err(last_error.unwrap_or_else(|| UpstreamError::Failed("no attempt made".into())))
    }
}

impl ProviderPeer {
    async fn peer(&self) -> Result<HttpPeer, UpstreamError> {
        if let Ok(guard) = self.peer.read() {
            if let Some((at, peer)) = guard.as_ref() {
                if at.elapsed() < DNS_TTL {
                    return Ok(peer.clone());
                }
            }
        }
        let addr = self.resolve().await?;
        let peer = build_peer(addr, &self.provider);
        if let Ok(mut guard) = self.peer.write() {
            *guard = Some((Instant::now(), peer.clone()));
        }
        Ok(peer)
    }

    async fn resolve(&self) -> Result<SocketAddr, UpstreamError> {
        let p = &self.provider;
        if let Ok(ip) = p.host.parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, p.port));
        }
        let lookup = tokio::time::timeout(
            Duration::from_millis(p.timeouts.connect_ms),
            tokio::net::lookup_host((p.host.as_str(), p.port)),
        )
        .await
        .map_err(|_| UpstreamError::Timeout(format!("resolving {}", p.host)))?
        .map_err(|e| UpstreamError::Failed(format!("resolving {}: {e}", p.host)))?;
        let mut addrs: Vec<SocketAddr> = lookup.collect();
        // Prefer IPv4: more often routable from a data-centre host.
        addrs.sort_by_key(|a| a.is_ipv6());
        addrs
            .first()
            .copied()
            .ok_or_else(|| UpstreamError::Failed(format!("{} has no address", p.host)))
    }

    fn request_header(
        &self,
        path: &str,
        request_id: &str,
        len: usize,
        stream: bool,
        headers: &[(&'static str, String)],
    ) -> Result<RequestHeader, UpstreamError> {
        let build = || -> pingora::Result<RequestHeader> {
            let mut req = RequestHeader::build("POST", path.as_bytes(), Some(8))?;
            req.insert_header("host", &self.host_header)?;
            req.insert_header("content-type", "application/json")?;
            req.insert_header("content-length", len.to_string())?;
            req.insert_header(
                "accept",
                if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            )?;
            req.insert_header(
                "user-agent",
                concat!("portcullis/", env!("CARGO_PKG_VERSION")),
            )?;
            req.insert_header("x-request-id", request_id)?;
            for (name, value) in headers {
                req.insert_header(*name, value)?;
            }
            match (self.provider.kind, &self.provider.api_key) {
                (ProviderKind::Openai, Some(key)) => {
                    req.insert_header("authorization", format!("Bearer {key}"))?;
                }
                (ProviderKind::Anthropic, key) => {
                    if let Some(key) = key {
                        req.insert_header("x-api-key", key)?;
                    }
                    if !headers.iter().any(|(n, _)| *n == "anthropic-version") {
                        req.insert_header("anthropic-version", ANTHROPIC_VERSION)?;
                    }
                }
                (ProviderKind::Openai, None) => {}
            }
            Ok(req)
        };
        build().map_err(|e| UpstreamError::Failed(format!("building the request: {e}")))
    }
}

fn build_peer(addr: SocketAddr, p: &Provider) -> HttpPeer {
    // SNI is the provider's host name: an empty SNI would turn certificate
    // verification off under rustls.
    let mut peer = HttpPeer::new(addr, p.tls, p.host.clone());
    let t = &p.timeouts;
    let o = &mut peer.options;
    o.connection_timeout = Some(Duration::from_millis(t.connect_ms));
    o.total_connection_timeout = Some(Duration::from_millis(t.total_connect_ms));
    o.read_timeout = Some(Duration::from_millis(t.read_ms));
    o.write_timeout = Some(Duration::from_millis(t.write_ms));
    o.idle_timeout = Some(Duration::from_millis(t.idle_ms));
    o.verify_cert = true;
    o.verify_hostname = true;
    o.alpn = if p.tls { ALPN::H2H1 } else { ALPN::H1 };
    peer
}

/// A provider response being read.
pub struct Exchange<'a> {
    session: Option<HttpSession>,
    peer: HttpPeer,
    connector: &'a Connector,
    timeouts: TimeoutsSection,
    deadline: tokio::time::Instant,
}

impl Exchange<'_> {
    pub fn header(&self) -> Option<&ResponseHeader> {
        self.session.as_ref()?.response_header()
    }

    pub fn status(&self) -> u16 {
        self.header().map(|h| h.status.as_u16()).unwrap_or(0)
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header()?.headers.get(name)?.to_str().ok()
    }

    /// The next body chunk, `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| UpstreamError::Failed("exchange already closed".into()))?;
        match timeout_at(self.deadline, session.read_response_body()).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(UpstreamError::Timeout(
                "whole exchange took too long".into(),
            )),
        }
    }

    /// The whole body, refusing one larger than `max` bytes.
    pub async fn body(&mut self, max: usize) -> Result<Bytes, UpstreamError> {
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = self.chunk().await? {
            if buf.len() + chunk.len() > max {
                return Err(UpstreamError::Failed(format!(
                    "response body larger than {max} bytes"
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// Return the connection to the pool when the response was read to its
    /// end; otherwise close it (the provider stops generating).
    pub async fn finish(mut self) {
        if let Some(mut session) = self.session.take() {
            if session.response_done() {
                let idle = Some(Duration::from_millis(self.timeouts.idle_ms));
                self.connector
                    .release_http_session(session, &self.peer, idle)
                    .await;
            } else {
                session.shutdown().await;
            }
        }
    }
}

/// `GET url` and return the body of a 200 (at most 1 MiB), for small
/// documents such as a JWKS. One attempt, bounded by `timeout`.
pub async fn get(connector: &Connector, url: &str, timeout: Duration) -> Result<Bytes, String> {
    let fetch = async {
        let u = url::Url::parse(url).map_err(|e| e.to_string())?;
        let tls = u.scheme() == "https";
        let host = u
            .host_str()
            .ok_or("no host")?
            .trim_matches(['[', ']'])
            .to_string();
        let port = u.port_or_known_default().ok_or("no port")?;
        let addr = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?
                .next()
                .ok_or_else(|| format!("{host} has no address"))?,
        };
        let mut peer = HttpPeer::new(addr, tls, host.clone());
        peer.options.connection_timeout = Some(timeout);
        peer.options.total_connection_timeout = Some(timeout);
        peer.options.read_timeout = Some(timeout);
        peer.options.write_timeout = Some(timeout);
        let path = match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        };
        let mut req =
            RequestHeader::build("GET", path.as_bytes(), Some(3)).map_err(|e| e.to_string())?;
        let host_header = match u.port() {
            Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
            None => u.host_str().unwrap_or_default().to_string(),
        };
        req.insert_header("host", host_header)
            .map_err(|e| e.to_string())?;
        req.insert_header("accept", "application/json")
            .map_err(|e| e.to_string())?;
        let (mut session, _) = connector
            .get_http_session(&peer)
            .await
            .map_err(|e| e.to_string())?;
        session
            .write_request_header(Box::new(req))
            .await
            .map_err(|e| e.to_string())?;
        session
            .finish_request_body()
            .await
            .map_err(|e| e.to_string())?;
        session
            .read_response_header()
            .await
            .map_err(|e| e.to_string())?;
        let status = session
            .response_header()
            .map(|h| h.status.as_u16())
            .unwrap_or(0);
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = session
            .read_response_body()
            .await
            .map_err(|e| e.to_string())?
        {
            if body.len() + chunk.len() > 1 << 20 {
                return Err("document larger than 1 MiB".to_string());
            }
            body.extend_from_slice(&chunk);
        }
        connector
            .release_http_session(session, &peer, Some(Duration::from_secs(30)))
            .await;
        if status != 200 {
            return Err(format!("answered {status}"));
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}
