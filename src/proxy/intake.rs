//! Reading a request off the client's connection: its headers' size, its
//! declared length, `Expect: 100-continue`, and its body within the cap
//! (what is acceptable is decided in `filters::intake`).

use bytes::Bytes;
use filters::Rejection;
use pingora::proxy::Session;

pub(super) enum BodyError {
    TooLarge,
    Client(Box<pingora::Error>),
}

/// The whole body, or `TooLarge` as soon as it passes `max` bytes.
pub(super) async fn read_body(s: &mut Session, max: usize) -> Result<Bytes, BodyError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = s.read_request_body().await.map_err(BodyError::Client)? {
        if buf.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

pub(super) fn content_length(s: &Session) -> Option<usize> {
    s.req_header()
        .headers
        .get("content-length")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(super) fn expects_continue(s: &Session) -> bool {
    s.req_header()
        .headers
        .get("expect")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The request line and headers within `limits.max_header_count` and
/// `limits.max_header_bytes`.
pub(super) fn headers_fit(
    s: &Session,
    limits: &crate::config::LimitsSection,
) -> Result<(), Rejection> {
    let h = s.req_header();
    let bytes: usize = h.method.as_str().len()
        + h.uri.path_and_query().map_or(0, |p| p.as_str().len())
        + h.headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    filters::intake::headers_fit(
        h.headers.len(),
        bytes,
        limits.max_header_count,
        limits.max_header_bytes,
    )
}
