//! Client connections before any request is read: a cap on how many are
//! open at once, and a deadline for each request's headers.
//!
//! Pingora reads request headers with a timeout per read, so a client
//! that trickles one byte just inside it (slowloris) holds a connection
//! for as long as it likes. [`Guarded`] wraps the proxy application: each
//! new connection takes a place (over `limits.max_connections` in all, or
//! `limits.max_connections_per_ip` from one address, it is closed at
//! once), and its stream is wrapped in [`HeaderDeadline`], which fails a
//! read once the request under way has been waiting for its headers for
//! longer than `limits.header_timeout_secs`. The gateway says when the
//! headers are in ([`headers_done`], first thing in the request phase) and
//! when the request is over ([`request_over`], in logging): the deadline
//! then starts again with the next request's first byte. Nothing is
//! inferred from the bytes (a blank line or a bare-LF request cannot end
//! the header phase early).

use crate::metrics;
use async_trait::async_trait;
use filters::sharded::Sharded;
use pingora::apps::ServerApp;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The proxy application with a connection cap and header deadlines.
pub struct Guarded<A> {
    inner: Arc<A>,
    open: Arc<AtomicUsize>,
    /// Open connections per client address (IPv6 by /64).
    per_ip: Arc<Sharded<IpAddr, usize>>,
    max: usize,
    max_per_ip: usize,
    header_timeout: Duration,
}

impl<A> Guarded<A> {
    pub fn new(inner: A, max: usize, max_per_ip: usize, header_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(inner),
            open: Arc::new(AtomicUsize::new(0)),
            per_ip: Arc::new(Sharded::default()),
            max,
            max_per_ip,
            header_timeout,
        }
    }

    /// A place for a new connection from `ip`, or `None` when the process
    /// or that address is at its cap.
    fn take_place(&self, ip: Option<IpAddr>) -> Option<Place> {
        let ip = ip.map(address_group);
        if let Some(ip) = ip {
            let mut shard = self.per_ip.lock(self.per_ip.shard_of(&ip));
            let n = shard.map.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                metrics::CONNECTIONS_REFUSED.inc();
                return None;
            }
            *n += 1;
        }
        let place = Place {
            open: self.open.clone(),
            per_ip: ip.map(|ip| (self.per_ip.clone(), ip)),
        };
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            metrics::CONNECTIONS_REFUSED.inc();
            // Dropping the place gives both counts back.
            metrics::CONNECTIONS_OPEN.inc();
            return None;
        }
        metrics::CONNECTIONS_OPEN.inc();
        Some(place)
    }
}

/// IPv4 addresses as they are; IPv6 by their /64 (one host usually holds
/// a whole /64).
fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// A place among the open connections, given back when the stream drops.
struct Place {
    open: Arc<AtomicUsize>,
    per_ip: Option<(Arc<Sharded<IpAddr, usize>>, IpAddr)>,
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Place")
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        metrics::CONNECTIONS_OPEN.dec();
        if let Some((map, ip)) = &self.per_ip {
            let mut shard = map.lock(map.shard_of(ip));
            if let Some(n) = shard.map.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    shard.map.remove(ip);
                }
            }
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let place = self.take_place(ip)?;
        let stream: Stream = Box::new(HeaderDeadline::new(stream, place, self.header_timeout));
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

const IDLE: u8 = 0;
const HEADERS: u8 = 1;
const DONE: u8 = 2;

/// A client stream whose request headers must arrive within a deadline.
#[derive(Debug)]
pub struct HeaderDeadline {
    inner: Stream,
    _place: Place,
    /// `IDLE` between requests (Pingora's keep-alive timeout applies),
    /// `HEADERS` while a request's headers are awaited, `DONE` after.
    phase: AtomicU8,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl HeaderDeadline {
    fn new(inner: Stream, place: Place, timeout: Duration) -> Self {
        Self {
            inner,
            _place: place,
            // A new connection's first request is awaited from the start.
            phase: AtomicU8::new(HEADERS),
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

/// The deadline of the request on this stream no longer applies: its
/// headers are in.
pub fn headers_done(stream: Option<&Stream>) {
    if let Some(d) = stream.and_then(|s| s.as_any().downcast_ref::<HeaderDeadline>()) {
        d.phase.store(DONE, Ordering::Release);
    }
}

/// The request on this stream is over: the next one's deadline starts
/// with its first byte.
pub fn request_over(stream: Option<&Stream>) {
    if let Some(d) = stream.and_then(|s| s.as_any().downcast_ref::<HeaderDeadline>()) {
        d.phase.store(IDLE, Ordering::Release);
    }
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.phase.load(Ordering::Acquire) == HEADERS
            && this.deadline.as_mut().poll(cx).is_ready()
        {
            metrics::HEADER_TIMEOUTS.inc();
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request headers not received in time",
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && this.phase.load(Ordering::Acquire) == IDLE
        {
            // The next request's first byte: its headers are awaited now.
            this.phase.store(HEADERS, Ordering::Release);
            let at = Instant::now() + this.timeout;
            this.deadline.as_mut().reset(at);
        }
        polled
    }
}

impl AsyncWrite for HeaderDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeaderDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeaderDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadline {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeaderDeadline {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeaderDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
