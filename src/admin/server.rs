//! The admin listener: loopback unless configured otherwise, its own
//! limits on connections and bodies, `/healthz`, `/readyz`, `/metrics`,
//! and `/admin/*` handed to the handlers.

use super::handlers::bad;
use super::routes::route;
use super::AdminApi;
use crate::http_server::{self, full, ResponseBody};
use crate::metrics;
use async_trait::async_trait;
use filters::dialect::openai::error_body;
use filters::{ErrorCode, Rejection};
use http_body_util::BodyExt;
use hyper::{Request, Response};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub struct AdminService {
    pub listen: SocketAddr,
    /// The proxy listener; ready means it accepts connections.
    pub proxy: SocketAddr,
    pub api: Arc<AdminApi>,
}

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let listener = match tokio::net::TcpListener::bind(self.listen).await {
            Ok(l) => l,
            Err(e) => {
                log::error!("admin listener {}: {e}", self.listen);
                return;
            }
        };
        // SIGHUP re-reads the policies, like POST /admin/reload.
        let api = self.api.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                match api.reload() {
                    Ok(what) => log::info!("SIGHUP: reloaded {what}"),
                    Err(e) => log::error!("SIGHUP: reload failed: {e}"),
                }
            }
        });
        let proxy = loopback(self.proxy);
        let api = self.api.clone();
        let handler = move |req: Request<hyper::body::Incoming>| {
            let api = api.clone();
            async move { handle(req, proxy, &api).await }
        };
        let header_timeout = Duration::from_secs(self.api.roles.header_read_timeout_secs);
        http_server::serve(listener, handler, header_timeout, async move {
            let _ = shutdown.changed().await;
        })
        .await;
    }
}

/// A wildcard listen address is reached through loopback.
pub(super) fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

pub(super) fn text(status: u16, body: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    r
}

pub(super) async fn handle(
    req: Request<hyper::body::Incoming>,
    proxy: SocketAddr,
    api: &AdminApi,
) -> Response<ResponseBody> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    match route(&method, &path) {
        Ok(("/healthz", _)) => text(200, "ok\n"),
        Ok(("/readyz", _)) => {
            let probe = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(proxy),
            )
            .await;
            let registry = api.registry.snapshot().is_ok();
            match probe {
                _ if api.lifecycle.draining() => text(503, "shutting down\n"),
                Ok(Ok(_)) if !registry => text(503, "model registry not loaded\n"),
                // Not ready while requests would be refused for want of an
                // audit trail (`on_error: deny`); with `allow` the failure
                // shows in `portcullis_audit_sink_failing` only, so that a
                // shared sink's outage does not take every instance out.
                Ok(Ok(_)) => match api.audit.admit() {
                    Ok(()) => text(200, "ready\n"),
                    Err(why) => {
                        let mut r = Response::new(full(format!("audit sink failing: {why}\n")));
                        *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        r
                    }
                },
                _ => text(503, "proxy listener not accepting connections\n"),
            }
        }
        Ok(("/metrics", _)) => {
            if let Some(b) = &api.guard_breaker {
                use filters::guard::breaker::State;
                metrics::GUARD_BREAKER.set(match b.state() {
                    State::Closed => 0,
                    State::HalfOpen => 1,
                    State::Open => 2,
                });
            }
            if let Ok(state) = api.registry.snapshot() {
                metrics::registry_state(&state);
            }
            let mut r = Response::new(full(metrics::render()));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        Ok((pattern, raw)) => api.call(req, pattern, raw).await,
        Err(404) => error(&Rejection::about_input(
            ErrorCode::UnknownRoute,
            format!("No route {method} {path}."),
        )),
        Err(_) => error(&Rejection::about_input(
            ErrorCode::MethodNotAllowed,
            format!("{path} does not accept {method}."),
        )),
    }
}

pub(super) fn error(r: &Rejection) -> Response<ResponseBody> {
    let mut resp = Response::new(full(error_body(r)));
    *resp.status_mut() = hyper::StatusCode::from_u16(r.code.status()).unwrap_or_default();
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The largest admin request body.
pub const MAX_ADMIN_BODY: usize = 1 << 20;
/// How long an admin client may take to send its body.
pub(super) const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Read an admin request body: at most [`MAX_ADMIN_BODY`] bytes (a larger
/// declared length is refused unread), within [`BODY_TIMEOUT`].
pub(super) async fn read_body(
    body: hyper::body::Incoming,
    declared_len: Option<u64>,
) -> Result<bytes::Bytes, Rejection> {
    let too_large = || {
        Rejection::about_input(
            ErrorCode::RequestTooLarge,
            format!("The request body is larger than the limit of {MAX_ADMIN_BODY} bytes."),
        )
    };
    if declared_len.is_some_and(|n| n > MAX_ADMIN_BODY as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, MAX_ADMIN_BODY);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(Rejection::about_input(
            ErrorCode::RequestTimeout,
            "The request body was not received in time.",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(bad(format!("cannot read the body: {e}"))),
        Ok(Ok(b)) => Ok(b.to_bytes()),
    }
}
