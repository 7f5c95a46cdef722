//! Assemble and run the Pingora server: the proxy service, the admin
//! listener, optionally the built-in mock provider, and the audit writer.

use crate::admin::{AdminApi, AdminService};
use crate::audit::file::FileOptions;
use crate::audit::redis::RedisOptions;
use crate::audit::{AuditKey, AuditLog, AuditOptions, AuditWriter, Sealer};
use crate::config::Config;
use crate::metrics;
use crate::proxy::connections::Guarded;
use crate::proxy::pipeline;
use crate::proxy::{Gateway, Lifecycle};
use crate::testkit::mock::{self, MockOptions, MockState};
use crate::upstream::Upstream;
use async_trait::async_trait;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::net::SocketAddr;
use std::sync::Arc;

/// Runs the built-in mock provider inside the gateway process (`demo`).
pub struct MockService {
    pub listen: SocketAddr,
    pub options: MockOptions,
}

#[async_trait]
impl BackgroundService for MockService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        match tokio::net::TcpListener::bind(self.listen).await {
            Ok(listener) => {
                let stop = async move {
                    let _ = shutdown.changed().await;
                };
                mock::serve(listener, self.options, Arc::new(MockState::default()), stop).await
            }
            Err(e) => log::error!("mock provider {}: {e}", self.listen),
        }
    }
}

/// Sends trace spans to the collector.
struct TraceExporter(std::sync::Mutex<Option<crate::trace::Exporter>>);

#[async_trait]
impl BackgroundService for TraceExporter {
    async fn start(&self, shutdown: ShutdownWatch) {
        let exporter = self.0.lock().ok().and_then(|mut e| e.take());
        if let Some(e) = exporter {
            e.run(shutdown).await
        }
    }
}

/// Keeps a Redis-backed registry snapshot current.
struct RegistryFollower(Arc<crate::stores::registry::RedisStore>);

#[async_trait]
impl BackgroundService for RegistryFollower {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.clone().follow(shutdown).await
    }
}

/// How the process stops. SIGTERM (or SIGQUIT): `/readyz` turns 503 so
/// that load balancers stop sending, requests in flight get up to
/// `server.shutdown_grace_secs` to finish (the wait ends as soon as none
/// is left; new requests meanwhile are still served), then the listeners
/// close and whatever is still running is cut off (and audited as cut
/// off). SIGINT: stop at once.
struct Drain {
    lifecycle: Arc<Lifecycle>,
    grace: std::time::Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Drain {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut quit), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::quit()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = quit.recv() => {}
            _ = int.recv() => return ShutdownSignal::FastShutdown,
        }
        self.lifecycle.start_draining();
        let deadline = tokio::time::Instant::now() + self.grace;
        log::info!(
            "SIGTERM: draining {} requests in flight (at most {:?})",
            self.lifecycle.in_flight(),
            self.grace
        );
        while self.lifecycle.in_flight() > 0 {
            if tokio::time::Instant::now() >= deadline {
                log::warn!(
                    "shutdown grace over: {} requests in flight are cut off",
                    self.lifecycle.in_flight()
                );
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                _ = int.recv() => return ShutdownSignal::FastShutdown,
            }
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// Fail early, with the address in the message, when a listener cannot bind.
fn check_bindable(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({what}): {e}"))
}

fn build(
    cfg: Arc<Config>,
    audit: AuditLog,
    lifecycle: Arc<Lifecycle>,
    mock: Option<MockService>,
) -> anyhow::Result<Server> {
    let conf = ServerConf {
        threads: cfg.threads,
        // The grace period is spent in `Drain` (ended early once nothing
        // is in flight); after it, the runtimes stop at once.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let options = ConnectorOptions::from_server_conf(&server.configuration);
    let upstream = Upstream::new(
        cfg.providers.values(),
        Connector::new(Some(options.clone())),
    );
    let guard_upstream = Arc::new(Upstream::new(
        cfg.providers.values(),
        Connector::new(Some(options.clone())),
    ));
    let pipeline = pipeline::build(
        &cfg,
        Arc::new(Connector::new(Some(options))),
        guard_upstream,
    )
    .map_err(|e| anyhow::anyhow!("{}", e.join("\n")))?;
    if let Some(jwks) = pipeline.jwks {
        server.add_service(background_service("jwks", jwks));
    }
    if let Some(store) = pipeline.registry_follower {
        server.add_service(background_service("registry", RegistryFollower(store)));
    }
    let f = &pipeline.filters;
    let api = Arc::new(AdminApi {
        jwt: f.jwt.clone(),
        registry: f.registry.clone(),
        chain: f.chain.clone(),
        limiter: f.limiter.clone(),
        rate_limit_policy: cfg.rate_limit.as_ref().map(|r| r.policy.clone()),
        redactor: f
            .redactor
            .clone()
            .zip(cfg.redaction.as_ref().map(|r| r.policy.clone())),
        tools: f
            .tools
            .clone()
            .zip(cfg.tools.as_ref().map(|t| t.policy.clone())),
        injection: f
            .injection
            .clone()
            .zip(cfg.injection.as_ref().map(|i| i.policy.clone())),
        guard_breaker: f.guard_breaker.clone(),
        approvals: f.approvals.clone(),
        guard: f
            .guard_policy
            .clone()
            .zip(cfg.guard.as_ref().map(|g| g.policy.clone())),
        providers: cfg.providers.keys().cloned().collect(),
        roles: cfg.admin.clone(),
        audit: audit.clone(),
        lifecycle: lifecycle.clone(),
    });
    let tracer = match cfg.tracing.otlp_endpoint {
        Some(_) => {
            let t = Arc::new(
                crate::trace::Tracer::new(&cfg.tracing, cfg.instance())
                    .map_err(|e| anyhow::anyhow!(e))?,
            );
            server.add_service(background_service(
                "tracing",
                TraceExporter(std::sync::Mutex::new(t.take_exporter())),
            ));
            Some(t)
        }
        None => None,
    };
    let gateway = Gateway::new(
        cfg.clone(),
        pipeline.filters,
        upstream,
        audit,
        lifecycle.clone(),
        tracer,
    )?;
    let proxy = Guarded::new(
        pingora::proxy::http_proxy(&server.configuration, gateway),
        cfg.limits.max_connections.max(1),
        cfg.limits.max_connections_per_ip.max(1),
        std::time::Duration::from_secs(cfg.limits.header_timeout_secs.max(1)),
    );
    let mut proxy = Service::new("Pingora HTTP Proxy Service".into(), proxy);
    proxy.add_tcp(&cfg.listen.to_string());
    server.add_service(proxy);
    server.add_service(background_service(
        "admin",
        AdminService {
            listen: cfg.admin_listen,
            proxy: cfg.listen,
            api,
        },
    ));
    if let Some(mock) = mock {
        server.add_service(background_service("mock provider", mock));
    }
    Ok(server)
}

/// Run until SIGTERM (graceful) or SIGINT (fast); then write every queued
/// audit record before returning.
pub fn run(cfg: Config, mock: Option<MockService>) -> anyhow::Result<()> {
    metrics::init();
    check_bindable(cfg.listen, "proxy")?;
    check_bindable(cfg.admin_listen, "admin")?;
    if let Some(m) = &mock {
        check_bindable(m.listen, "mock provider")?;
    }
    let (writer, audit) = AuditWriter::start(audit_options(&cfg)?)?;
    let cfg = Arc::new(cfg);
    let lifecycle = Arc::new(Lifecycle::default());
    let server = match build(cfg.clone(), audit, lifecycle.clone(), mock) {
        Ok(s) => s,
        Err(e) => {
            writer.close();
            return Err(e);
        }
    };
    // Everything is checked and loaded: only now is the gateway ready.
    log::info!(
        "portcullis listening on {} (admin {}), config {}, instance {}",
        cfg.listen,
        cfg.admin_listen,
        cfg.source.display(),
        cfg.instance()
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Drain {
            lifecycle,
            grace: cfg.shutdown_grace,
        }),
    });
    writer.close();
    log::info!("portcullis stopped; audit records flushed");
    Ok(())
}

/// The audit writer's options from the config.
fn audit_options(cfg: &Config) -> anyhow::Result<AuditOptions> {
    let a = &cfg.audit;
    let key = a.key_file.as_deref().map(AuditKey::load).transpose()?;
    Ok(AuditOptions {
        file: cfg.audit_file().map(|path| FileOptions {
            path,
            rotate_bytes: a.rotate_size.0,
            rotate_daily: a.rotate_daily,
            fsync_every: std::time::Duration::from_millis(a.fsync_ms),
        }),
        stdout: a.stdout,
        redis: a.redis.as_ref().map(|r| RedisOptions {
            url: r.url.clone().unwrap_or_default(),
            stream: r.stream.clone(),
            max_len: r.max_len,
            timeout: std::time::Duration::from_millis(cfg.state.redis_timeout_ms.unwrap_or(500)),
        }),
        sealer: Sealer {
            key,
            instance: Some(cfg.instance()),
        },
        capacity: a.queue_capacity,
        on_error: a.on_error,
    })
}
