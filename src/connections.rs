//! Client connections before any request is read: a cap on how many are
//! open at once, and a deadline for each request's headers.
//!
//! Pingora reads request headers with a timeout per read, so a client
//! that trickles one byte just inside it (slowloris) holds a connection
//! for as long as it likes. [`Guarded`] wraps the proxy application: each
//! new connection takes a place (over `limits.max_connections` it is
//! closed at once), and its stream is wrapped in [`HeaderDeadline`], which
//! fails a read once the headers of the request under way have taken
//! longer than `limits.header_timeout_secs` (counted from the connection's
//! start for its first request, from the first byte for later ones).

use crate::metrics;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The proxy application with a connection cap and header deadlines.
pub struct Guarded<A> {
    inner: Arc<A>,
    open: Arc<AtomicUsize>,
    max: usize,
    header_timeout: Duration,
}

impl<A> Guarded<A> {
    pub fn new(inner: A, max: usize, header_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(inner),
            open: Arc::new(AtomicUsize::new(0)),
            max,
            header_timeout,
        }
    }
}

/// A place among the open connections, given back when the stream drops.
#[derive(Debug)]
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::CONNECTIONS_OPEN.dec();
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream: Stream = if stream.as_any().is::<HeaderDeadline>() {
            // A kept-alive connection coming back for its next request.
            let Ok(mut ours) = stream.into_any().downcast::<HeaderDeadline>() else {
                return None;
            };
            ours.next_request();
            ours
        } else {
            if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
                self.open.fetch_sub(1, Ordering::AcqRel);
                metrics::CONNECTIONS_REFUSED.inc();
                log::warn!(
                    "connection refused: {} connections open (limits.max_connections)",
                    self.max
                );
                return None;
            }
            metrics::CONNECTIONS_OPEN.inc();
            Box::new(HeaderDeadline::new(
                stream,
                Place(self.open.clone()),
                self.header_timeout,
            ))
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Where a request's headers stand.
#[derive(Debug)]
enum Phase {
    /// Between requests on a kept-alive connection: Pingora's keep-alive
    /// timeout applies.
    Idle,
    /// Headers under way: this many bytes of `\r\n\r\n` matched.
    Headers(u8),
    /// Headers complete: the body and the response have their own
    /// timeouts.
    Done,
}

/// A client stream whose request headers must arrive within a deadline.
#[derive(Debug)]
pub struct HeaderDeadline {
    inner: Stream,
    _place: Place,
    phase: Phase,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl HeaderDeadline {
    fn new(inner: Stream, place: Place, timeout: Duration) -> Self {
        Self {
            inner,
            _place: place,
            phase: Phase::Headers(0),
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    fn next_request(&mut self) {
        self.phase = Phase::Idle;
    }

    /// Follow `\r\n\r\n` through newly read bytes.
    fn scan(&mut self, bytes: &[u8]) {
        let timeout = self.timeout;
        const END: &[u8; 4] = b"\r\n\r\n";
        for &b in bytes {
            let matched = match self.phase {
                Phase::Done => return,
                Phase::Idle => {
                    self.deadline.as_mut().reset(Instant::now() + timeout);
                    0
                }
                Phase::Headers(m) => m,
            };
            let matched = if b == END[matched as usize] {
                matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            self.phase = if matched == 4 {
                Phase::Done
            } else {
                Phase::Headers(matched)
            };
        }
    }
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if matches!(this.phase, Phase::Headers(_)) && this.deadline.as_mut().poll(cx).is_ready() {
            metrics::HEADER_TIMEOUTS.inc();
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request headers not received in time",
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            if !matches!(this.phase, Phase::Done) {
                this.scan(&buf.filled()[before..]);
            }
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
