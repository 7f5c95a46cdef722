//! Hostile clients before any request is read: slow headers, idle
//! connections, too many connections.

use crate::support::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Read until the gateway closes the connection; false if it is still
/// open at the deadline.
async fn closed_by_gateway(conn: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn connect(gw: &Gateway) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(gw.base.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Wait until the gateway's count of open client connections is `ok`.
async fn open_connections_until(gw: &Gateway, ok: impl Fn(f64) -> bool, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !ok(metric(gw, "portcullis_connections_open").await) {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` connections that sent half a request line, once the gateway counts
/// them all (after any readiness probe has let go of its place).
async fn hold(gw: &Gateway, n: usize) -> Vec<tokio::net::TcpStream> {
    open_connections_until(gw, |open| open == 0.0, "a probe kept its place").await;
    let mut held = Vec::new();
    for _ in 0..n {
        let mut c = connect(gw).await;
        c.write_all(b"GET /v1/mo").await.unwrap();
        held.push(c);
    }
    open_connections_until(gw, |open| open >= n as f64, "held connections not counted").await;
    held
}

/// Slowloris: headers trickled a byte at a time, each read well inside
/// any per-read timeout, are cut off once they take longer than
/// `header_timeout_secs`; so is a connection that sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_silent_connections_are_cut_off() {
    let mock = Mock::start(options()).await;
    let mut setup = Setup::new(mock.addr);
    setup.limits_extra = "  header_timeout_secs: 1\n".into();
    let mut gw = Gateway::start(setup).await;

    // Trickled from the start, after a blank line (which the HTTP parser
    // skips), and as the second request of a kept-alive connection.
    let body = serde_json::to_string(&chat("first")).unwrap();
    let first = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    for prefix in ["", "\r\n\r\n", first.as_str()] {
        let mut slow = connect(&gw).await;
        slow.write_all(prefix.as_bytes()).await.unwrap();
        if !prefix.is_empty() && prefix != "\r\n\r\n" {
            // Read the first response whole before trickling the next.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("\"finish_reason\"") {
                let n = slow.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early");
                got.extend_from_slice(&buf[..n]);
            }
        }
        slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let mut cut = false;
        for b in b"x-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
            if slow.write_all(&[*b]).await.is_err() {
                cut = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            cut || closed_by_gateway(&mut slow, PATIENCE).await,
            "prefix {prefix:?}: a client trickling its headers for 12 s was not cut off"
        );
    }

    let mut silent = connect(&gw).await;
    assert!(
        closed_by_gateway(&mut silent, PATIENCE).await,
        "a silent connection stayed open"
    );
    assert!(metric(&gw, "portcullis_header_timeouts_total").await >= 4.0);
    // Ordinary requests are untouched, also several on one connection.
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let r = client
            .post(gw.url("/v1/chat/completions"))
            .json(&chat("fine"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // A kept-alive connection idle for longer than the header timeout
        // between requests is not cut for that.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    gw.stop();
    verified(&gw);
}

/// More connections than `max_connections` are closed as they come, and
/// a place frees up when one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once() {
    let mock = Mock::start(options()).await;
    let mut setup = Setup::new(mock.addr);
    setup.limits_extra = "  max_connections: 3\n  header_timeout_secs: 60\n".into();
    let mut gw = Gateway::start(setup).await;
    let mut held = hold(&gw, 3).await;
    let mut extra = connect(&gw).await;
    assert!(
        closed_by_gateway(&mut extra, PATIENCE).await,
        "the fourth connection was kept"
    );
    assert!(metric(&gw, "portcullis_connections_refused_total").await >= 1.0);
    drop(held.pop());
    open_connections_until(
        &gw,
        |open| open <= 2.0,
        "the closed connection kept its place",
    )
    .await;
    let r = gw.post("/v1/chat/completions", &chat("room again")).await;
    assert_eq!(r.status(), 200);
    drop(held);
    gw.stop();
    verified(&gw);
}

/// Too many headers, or too many bytes of request line and headers: 431
/// `headers_too_large`, audited; within the limits, fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_431() {
    let mock = Mock::start(options()).await;
    let mut setup = Setup::new(mock.addr);
    setup.limits_extra = "  max_header_count: 20\n  max_header_bytes: 2048\n".into();
    let mut gw = Gateway::start(setup).await;
    let client = reqwest::Client::new();
    let many = (0..25).fold(client.post(gw.url("/v1/chat/completions")), |r, i| {
        r.header(format!("x-h{i}"), "v")
    });
    let big = client
        .post(gw.url("/v1/chat/completions"))
        .header("x-big", "b".repeat(3000));
    let long_path = client.post(gw.url(&format!("/v1/chat/completions?{}", "q".repeat(3000))));
    for req in [many, big, long_path] {
        let r = req.json(&chat("x")).send().await.unwrap();
        let id = expect_error(r, 431, "headers_too_large").await;
        let rec = gw.record_for(&id).await;
        assert_eq!(rec["reason_code"], "headers_too_large");
    }
    assert!(mock.state.requests().is_empty());
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .header("x-fine", "v")
        .json(&chat("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gw.stop();
    verified(&gw);
}

/// One address may hold `max_connections_per_ip` connections; others are
/// not affected by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    let mock = Mock::start(options()).await;
    let mut setup = Setup::new(mock.addr);
    setup.limits_extra = "  max_connections_per_ip: 2\n  header_timeout_secs: 60\n".into();
    let mut gw = Gateway::start(setup).await;
    let held = hold(&gw, 2).await;
    let mut third = connect(&gw).await;
    assert!(
        closed_by_gateway(&mut third, PATIENCE).await,
        "a third connection from 127.0.0.1 was kept"
    );
    // 127.0.0.2 is another address (loopback /8).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let addr = gw.base.trim_start_matches("http://").parse().unwrap();
    let mut other = socket.connect(addr).await.unwrap();
    let body = serde_json::to_string(&chat("other address")).unwrap();
    other
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut reply = Vec::new();
    other.read_to_end(&mut reply).await.unwrap();
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"));
    drop(held);
    gw.stop();
    verified(&gw);
}
