//! Server-sent events: a framer that turns arbitrary byte chunks into whole
//! events, and the event type the response stages work on.
//!
//! Providers' TCP chunks can end anywhere, mid-line or mid-UTF-8 character.
//! The framer buffers bytes until a blank line ends an event (`\n\n`,
//! `\r\n\r\n` or `\r\r`), so a stage never sees half an event. A line break
//! is never inside a multi-byte UTF-8 sequence, so splitting there is safe.

use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

/// The largest event accepted, whole or unfinished: a larger one ends the
/// stream as broken (a provider that never sends a blank line must not
/// exhaust memory), however its bytes were chunked.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// One SSE event. Its data is parsed as JSON once, when the event is
/// made; stages read and change that value ([`SseEvent::json`],
/// [`SseEvent::json_mut`]), and the wire form is written from it only if
/// it changed, so an event is parsed once and serialised at most once
/// however many stages see it.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    /// The `event:` field.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`, as received (stale once the
    /// JSON was changed); `None` when the event had none.
    data: Option<String>,
    /// The data parsed, when it is JSON.
    json: Option<Value>,
    /// `json` was changed: the wire form is written from it.
    changed: bool,
    /// Every other line (`id:`, `retry:`, `: comments`), kept verbatim.
    pub other: Vec<String>,
}

/// Events are equal when their wire forms are.
impl PartialEq for SseEvent {
    fn eq(&self, other: &Self) -> bool {
        self.event == other.event
            && self.other == other.other
            && self.data_text() == other.data_text()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an SSE event exceeded {MAX_EVENT_BYTES} bytes without ending")]
    EventTooLarge,
    #[error("an SSE event is not valid UTF-8")]
    NotUtf8,
}

impl SseEvent {
    /// A plain `data:` event.
    pub fn data(data: impl Into<String>) -> Self {
        Self::with_data(None, Some(data.into()), Vec::new())
    }

    /// A `data:` event carrying `json`.
    pub fn from_json(json: Value) -> Self {
        Self {
            json: Some(json),
            changed: true,
            ..Self::default()
        }
    }

    /// An event from its fields; the data is parsed here, once.
    pub fn with_data(event: Option<String>, data: Option<String>, other: Vec<String>) -> Self {
        let json = data.as_deref().and_then(parse_json);
        Self {
            event,
            data,
            json,
            changed: false,
            other,
        }
    }

    /// The OpenAI end-of-stream marker `data: [DONE]`.
    pub fn is_done(&self) -> bool {
        !self.changed && self.data.as_deref() == Some("[DONE]")
    }

    /// Whether the event has a `data:` field.
    pub fn has_data(&self) -> bool {
        self.changed || self.data.is_some()
    }

    /// The data as it goes on the wire.
    pub fn data_text(&self) -> Option<Cow<'_, str>> {
        match (&self.json, self.changed) {
            (Some(v), true) => Some(Cow::Owned(v.to_string())),
            _ => self.data.as_deref().map(Cow::Borrowed),
        }
    }

    /// The data's length in bytes as received (as it goes on the wire,
    /// once changed).
    pub fn data_len(&self) -> usize {
        match (&self.json, self.changed) {
            (Some(_), true) => self.data_text().map_or(0, |d| d.len()),
            _ => self.data.as_ref().map_or(0, String::len),
        }
    }

    /// The data parsed as JSON, when it is JSON.
    pub fn json(&self) -> Option<&Value> {
        self.json.as_ref()
    }

    /// The parsed data, to change: the event is written from it.
    pub fn json_mut(&mut self) -> Option<&mut Value> {
        let v = self.json.as_mut()?;
        self.changed = true;
        Some(v)
    }

    /// Parse one event block (without its terminating blank line).
    pub fn parse(block: &str) -> Self {
        let mut name = None;
        let mut other = Vec::new();
        let mut data: Option<String> = None;
        for line in block.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                },
                "event" => name = Some(value.to_string()),
                "" if line.is_empty() => {}
                _ => other.push(line.to_string()),
            }
        }
        Self::with_data(name, data, other)
    }

    /// Append the wire form, blank line included.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for line in &self.other {
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        if let Some(name) = &self.event {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(name.as_bytes());
            out.push(b'\n');
        }
        match (&self.json, self.changed) {
            (Some(v), true) => {
                // Serialised JSON has no line breaks: one data line.
                out.extend_from_slice(b"data: ");
                // Writing a `Value` into a `Vec` cannot fail.
                let _ = serde_json::to_writer(&mut *out, v);
                out.push(b'\n');
            }
            _ => {
                if let Some(data) = &self.data {
                    for line in data.split('\n') {
                        out.extend_from_slice(b"data: ");
                        out.extend_from_slice(line.as_bytes());
                        out.push(b'\n');
                    }
                }
            }
        }
        out.push(b'\n');
    }
}

/// JSON data: only text that starts like a JSON object or array is tried
/// (`[DONE]` and plain text are not parsed).
fn parse_json(data: &str) -> Option<Value> {
    let t = data.trim_start();
    if !(t.starts_with('{') || (t.starts_with('[') && !t.starts_with("[DONE]"))) {
        return None;
    }
    serde_json::from_str(data).ok()
}

impl fmt::Display for SseEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::new();
        self.write_to(&mut out);
        f.write_str(&String::from_utf8_lossy(&out))
    }
}

/// Turns byte chunks into whole events.
#[derive(Debug, Default)]
pub struct SseFramer {
    buf: Vec<u8>,
    /// How far `buf` has already been searched for a boundary.
    scanned: usize,
}

impl SseFramer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed a chunk; returns every event it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        let mut i = self.scanned.max(start);
        while i < self.buf.len() {
            if let Some(len) = boundary_at(&self.buf[start..], i - start) {
                let block = &self.buf[start..i];
                // However the bytes were chunked: one rule for every event.
                if block.len() > MAX_EVENT_BYTES {
                    return Err(SseError::EventTooLarge);
                }
                if !block.iter().all(|b| *b == b'\r' || *b == b'\n') {
                    let text = std::str::from_utf8(block).map_err(|_| SseError::NotUtf8)?;
                    events.push(SseEvent::parse(text));
                }
                start = i + len;
                i = start;
            } else {
                i += 1;
            }
        }
        self.buf.drain(..start);
        // Re-scan the last few bytes next time: a boundary may straddle chunks.
        self.scanned = self.buf.len().saturating_sub(3);
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(SseError::EventTooLarge);
        }
        Ok(events)
    }

    /// The stream ended: an unterminated last event is still returned, so
    /// that it passes the response stages like any other.
    pub fn finish(&mut self) -> Result<Option<SseEvent>, SseError> {
        let rest = std::mem::take(&mut self.buf);
        self.scanned = 0;
        if rest.len() > MAX_EVENT_BYTES {
            return Err(SseError::EventTooLarge);
        }
        if rest.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(None);
        }
        let text = std::str::from_utf8(&rest).map_err(|_| SseError::NotUtf8)?;
        Ok(Some(SseEvent::parse(text.trim_end_matches(['\r', '\n']))))
    }
}

/// If an event boundary (a blank line) starts at `i` in `buf`, its length.
/// `\r` alone at the very end of the buffer is not decided yet: it may be
/// the first half of `\r\n`.
fn boundary_at(buf: &[u8], i: usize) -> Option<usize> {
    let rest = &buf[i..];
    if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\n\r\n") {
        return Some(if rest[0] == b'\n' { 2 } else { 4 });
    }
    if rest.starts_with(b"\n\r\n") || rest.starts_with(b"\r\n\n") || rest.starts_with(b"\r\r\n") {
        return Some(3);
    }
    if rest.starts_with(b"\r\r") && rest.len() >= 3 && rest[2] != b'\n' {
        return Some(2);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"a\":1}\n\ndata: {\"b\":\"é 🦀\"}\n\n: keep-alive\n\nevent: done\ndata: [DONE]\n\n";

    fn frame_in_pieces(input: &[u8], sizes: &[usize]) -> Vec<SseEvent> {
        let mut framer = SseFramer::new();
        let mut events = Vec::new();
        let mut pos = 0;
        let mut k = 0;
        while pos < input.len() {
            let n = sizes[k % sizes.len()].max(1).min(input.len() - pos);
            events.extend(framer.push(&input[pos..pos + n]).unwrap());
            pos += n;
            k += 1;
        }
        events.extend(framer.finish().unwrap());
        events
    }

    #[test]
    fn frames_whole_events() {
        let events = frame_in_pieces(STREAM.as_bytes(), &[STREAM.len()]);
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].data_text().as_deref(), Some("{\"a\":1}"));
        assert_eq!(events[1].json().unwrap()["b"], "é 🦀");
        assert_eq!(events[2].other, [": keep-alive"]);
        assert!(!events[2].has_data());
        assert_eq!(events[3].event.as_deref(), Some("done"));
        assert!(events[3].is_done());
    }

    #[test]
    fn every_split_gives_the_same_events() {
        let whole = frame_in_pieces(STREAM.as_bytes(), &[STREAM.len()]);
        for sizes in [&[1][..], &[2], &[3], &[5, 1, 7], &[13, 2]] {
            assert_eq!(
                frame_in_pieces(STREAM.as_bytes(), sizes),
                whole,
                "sizes {sizes:?}"
            );
        }
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        let crlf = STREAM.replace('\n', "\r\n");
        let a = frame_in_pieces(crlf.as_bytes(), &[1]);
        let b = frame_in_pieces(STREAM.as_bytes(), &[STREAM.len()]);
        assert_eq!(a, b);
        let events = frame_in_pieces(b"data: x\r\rdata: y\r\r", &[1]);
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn multi_line_data_round_trips() {
        let e = SseEvent::parse("data: line one\ndata: line two");
        assert_eq!(e.data_text().as_deref(), Some("line one\nline two"));
        let mut out = Vec::new();
        e.write_to(&mut out);
        assert_eq!(out, b"data: line one\ndata: line two\n\n");
        assert_eq!(frame_in_pieces(&out, &[1]), vec![e]);
    }

    #[test]
    fn data_is_parsed_once_and_written_from_the_json_only_when_changed() {
        let mut e = SseEvent::parse("id: 7\ndata: {\"a\": 1,  \"b\": [2]}");
        assert_eq!(e.json().unwrap()["b"][0], 2);
        // Unchanged: the bytes as received, spacing and all.
        assert_eq!(e.to_string(), "id: 7\ndata: {\"a\": 1,  \"b\": [2]}\n\n");
        e.json_mut().unwrap()["a"] = serde_json::json!("x");
        assert_eq!(e.to_string(), "id: 7\ndata: {\"a\":\"x\",\"b\":[2]}\n\n");
        assert_eq!(e.data_len(), e.data_text().unwrap().len());
        // Not JSON: no value, written as it came.
        for text in ["[DONE]", "hello", "5", "{broken"] {
            let mut e = SseEvent::data(text);
            assert!(e.json().is_none() && e.json_mut().is_none(), "{text}");
            assert_eq!(e.to_string(), format!("data: {text}\n\n"));
        }
        assert!(SseEvent::data("[DONE]").is_done());
        assert!(!SseEvent::from_json(serde_json::json!("[DONE]")).is_done());
    }

    #[test]
    fn unterminated_last_event_is_returned() {
        let events = frame_in_pieces(b"data: a\n\ndata: b", &[4]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].data_text().as_deref(), Some("b"));
    }

    #[test]
    fn endless_event_is_an_error() {
        let mut framer = SseFramer::new();
        let chunk = vec![b'x'; 64 * 1024];
        let mut result = Ok(Vec::new());
        for _ in 0..20 {
            result = framer.push(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(SseError::EventTooLarge));
    }

    #[test]
    fn an_event_over_the_cap_is_an_error_however_it_is_chunked() {
        let event = format!("data: {}\n\ndata: [DONE]\n\n", "x".repeat(MAX_EVENT_BYTES));
        for chunk in [event.len(), 64 * 1024, 7] {
            let mut framer = SseFramer::new();
            let mut result = Ok(Vec::new());
            for piece in event.as_bytes().chunks(chunk) {
                result = framer.push(piece);
                if result.is_err() {
                    break;
                }
            }
            assert_eq!(result, Err(SseError::EventTooLarge), "chunks of {chunk}");
        }
        // Just under the cap passes.
        let mut framer = SseFramer::new();
        let fits = format!("data: {}\n\n", "x".repeat(MAX_EVENT_BYTES - 6));
        assert_eq!(framer.push(fits.as_bytes()).unwrap().len(), 1);
        let mut framer = SseFramer::new();
        let unterminated = format!("data: {}", "x".repeat(MAX_EVENT_BYTES));
        for piece in unterminated.as_bytes().chunks(1 << 19) {
            let _ = framer.push(piece);
        }
        assert!(framer.finish().is_err());
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut framer = SseFramer::new();
        assert_eq!(framer.push(b"data: \xff\xfe\n\n"), Err(SseError::NotUtf8));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn event() -> impl Strategy<Value = SseEvent> {
        (
            proptest::option::of("[a-z]{1,8}"),
            // Data lines: any text without line breaks, multi-byte included.
            proptest::option::of(proptest::collection::vec("[^\r\n]{0,24}", 1..4)),
            proptest::collection::vec("(id|retry|: ?[a-z]{0,6})[^\r\n]{0,8}", 0..2),
        )
            .prop_map(|(event, data, other)| {
                SseEvent::with_data(
                    event,
                    data.map(|lines| lines.join("\n")),
                    other
                        .into_iter()
                        .filter(|l| !l.starts_with("data") && !l.starts_with("event"))
                        .collect(),
                )
            })
            .prop_filter("an event must carry something", |e| {
                e.event.is_some() || e.has_data() || !e.other.is_empty()
            })
    }

    proptest! {
        /// However the wire bytes are split, the framer returns exactly the
        /// events that were written, in order.
        #[test]
        fn any_split_round_trips(events in proptest::collection::vec(event(), 1..8),
                                 cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12)) {
            let mut wire = Vec::new();
            for e in &events {
                e.write_to(&mut wire);
            }
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.sort_unstable();
            let mut framer = SseFramer::new();
            let mut got = Vec::new();
            let mut start = 0;
            for p in points.into_iter().chain(std::iter::once(wire.len())) {
                got.extend(framer.push(&wire[start..p]).unwrap());
                start = p;
            }
            got.extend(framer.finish().unwrap());
            prop_assert_eq!(got, events);
        }
    }
}
