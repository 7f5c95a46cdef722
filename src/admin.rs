//! The admin listener: `/healthz`, `/readyz` and `/metrics`.

use crate::http_server::{self, full, ResponseBody};
use crate::metrics;
use async_trait::async_trait;
use hyper::{Request, Response};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::time::Duration;

pub struct AdminService {
    pub listen: SocketAddr,
    /// The proxy listener; ready means it accepts connections.
    pub proxy: SocketAddr,
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
        let proxy = loopback(self.proxy);
        let handler =
            move |req: Request<hyper::body::Incoming>| async move { handle(req, proxy).await };
        http_server::serve(listener, handler, async move {
            let _ = shutdown.changed().await;
        })
        .await;
    }
}

/// A wildcard listen address is reached through loopback.
fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

async fn handle(req: Request<hyper::body::Incoming>, proxy: SocketAddr) -> Response<ResponseBody> {
    let text = |status: u16, body: &'static str| {
        let mut r = Response::new(full(body));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
        r
    };
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz") => text(200, "ok\n"),
        ("GET", "/readyz") => {
            let probe = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(proxy),
            )
            .await;
            match probe {
                Ok(Ok(_)) => text(200, "ready\n"),
                _ => text(503, "proxy listener not accepting connections\n"),
            }
        }
        ("GET", "/metrics") => {
            let mut r = Response::new(full(metrics::render()));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        _ => text(404, "not found\n"),
    }
}
