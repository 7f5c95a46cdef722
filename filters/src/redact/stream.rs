//! Redaction of a text that arrives in pieces (one choice of a streamed
//! completion), with the same result as redacting the whole text at once,
//! however it is split.
//!
//! Text is released once it can no longer be part of a match. The cut (the
//! end of what is released) is the smallest of:
//! - everything but the last [`HOLD`] bytes (every rule whose longest
//!   prefix that cannot match yet is shorter than that);
//! - the start of any pattern match (validated or not) that crosses the cut
//!   or reaches the end of what has arrived (a match still growing);
//! - the start of the last run of non-space characters when it reaches the
//!   end (a token still growing: a long JWT or bearer token whose pattern
//!   cannot match until its second part arrives);
//! - the start of a PEM block (`-----BEGIN`) whose end line
//!   (`-----END ...-----`) has not arrived whole.
//!
//! **Linear work.** When a scan releases nothing, the next one waits for
//! what could change that: the end marker of a held PEM block (looked for
//! in the new bytes only), a space after a held token, or, for anything
//! else, the held text doubling. Releasing later is always safe, so the
//! result is the same, and each byte is scanned a bounded number of times
//! however long a held run grows.
//!
//! **A cap.** Held text never grows past [`MAX_HELD`]: a longer run that
//! might still be (part of) a secret is not released unscreened, the
//! redactor reports an overflow instead, and the stream stage ends the
//! stream with an error. A short [`CONTEXT`] of released text is kept so
//! that `\b` and similar assertions see what precedes.

use super::Redactor;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Bytes always held back from the end of the text.
pub const HOLD: usize = 256;
/// Bytes of released text kept as left context.
pub const CONTEXT: usize = 16;
/// The most text held at once (an RSA 16384-bit private key in PEM is
/// about 12 KiB; a JWT a few KiB). Beyond it: [`StreamRedactor::overflow`].
pub const MAX_HELD: usize = 64 * 1024;
const BLOCK_OPEN: &str = "-----BEGIN";
const BLOCK_CLOSE: &str = "-----END";

/// Why the last scan released nothing, and so when the next is worth it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Scan on the next piece.
    No,
    /// A PEM block is open and no end marker has arrived: scan once one
    /// does (looked for from this byte on).
    BlockEnd { from: usize },
    /// A token is growing at the start of what is held: scan once a space
    /// arrives.
    Space,
    /// Scan once the text reaches this length (the held part doubled).
    Length(usize),
}

pub struct StreamRedactor {
    redactor: Arc<Redactor>,
    buf: String,
    /// `buf[..from]` was released already (context only).
    from: usize,
    /// Bytes of the text dropped from the front of `buf`.
    drained: usize,
    counts: BTreeMap<String, usize>,
    /// Released findings in whole-text byte offsets, kept when tracking.
    track: Option<Vec<Released>>,
    wait: Wait,
    /// Held bytes, once they went over [`MAX_HELD`].
    overflow: Option<usize>,
    /// Whether [`MAX_HELD`] applies (a stream) or not (pieces of a text
    /// that is already whole, such as a JSON message's content parts).
    capped: bool,
    /// Bytes handed to the rules so far (the work done).
    scanned: usize,
}

/// A finding that was released, in byte offsets of the whole text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub start: usize,
    pub end: usize,
    pub replacement: String,
}

impl StreamRedactor {
    pub fn new(redactor: Arc<Redactor>) -> Self {
        Self {
            redactor,
            buf: String::new(),
            from: 0,
            drained: 0,
            counts: BTreeMap::new(),
            track: None,
            wait: Wait::No,
            overflow: None,
            capped: true,
            scanned: 0,
        }
    }

    /// For a text that is already whole but comes in parts: no cap.
    pub fn whole(redactor: Arc<Redactor>) -> Self {
        Self {
            capped: false,
            ..Self::new(redactor)
        }
    }

    /// A redactor that also remembers where its findings were (see
    /// [`StreamRedactor::take_released`]).
    pub fn tracking(redactor: Arc<Redactor>) -> Self {
        Self {
            track: Some(Vec::new()),
            ..Self::new(redactor)
        }
    }

    /// Bytes of the whole text released so far.
    pub fn released_to(&self) -> usize {
        self.drained + self.from
    }

    /// Findings released since the last call (tracking redactors only).
    pub fn take_released(&mut self) -> Vec<Released> {
        self.track.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Add a piece; returns the redacted text that can be released now.
    /// Once more than [`MAX_HELD`] bytes would stay held, nothing more is
    /// released and [`StreamRedactor::overflow`] says so.
    pub fn push(&mut self, piece: &str) -> String {
        if self.overflow.is_some() {
            return String::new();
        }
        let start = self.buf.len();
        self.buf.push_str(piece);
        let due = match self.wait {
            Wait::No => true,
            Wait::BlockEnd { from } => {
                // Byte offsets, searched as bytes: `from` may fall inside a
                // multi-byte character.
                let from = from.min(start.saturating_sub(BLOCK_CLOSE.len()));
                let found = self.buf.as_bytes()[from..]
                    .windows(BLOCK_CLOSE.len())
                    .any(|w| w == BLOCK_CLOSE.as_bytes());
                self.wait = Wait::BlockEnd {
                    from: self.buf.len().saturating_sub(BLOCK_CLOSE.len()),
                };
                found
            }
            Wait::Space => piece.contains(char::is_whitespace),
            Wait::Length(at) => self.buf.len() >= at,
        };
        let over = self.capped && self.held() > MAX_HELD;
        let out = if due || over {
            self.release(false)
        } else {
            String::new()
        };
        if self.capped && self.held() > MAX_HELD {
            self.overflow = Some(self.held());
        }
        out
    }

    /// Bytes handed to the rules so far: the work done.
    pub fn scanned(&self) -> usize {
        self.scanned
    }

    /// Set when more than [`MAX_HELD`] bytes had to stay held: the text
    /// was not released and the stream must end.
    pub fn overflow(&self) -> Option<usize> {
        self.overflow
    }

    /// The text is complete: release the rest (nothing, once the hold
    /// went over the cap: pieces were dropped, so what is held is not the
    /// text and must not be released as if it were).
    pub fn finish(&mut self) -> String {
        if self.overflow.is_some() {
            return String::new();
        }
        self.release(true)
    }

    /// Findings so far, by rule.
    pub fn counts(&self) -> &BTreeMap<String, usize> {
        &self.counts
    }

    /// Bytes received but not released yet.
    pub fn held(&self) -> usize {
        self.buf.len() - self.from
    }

    fn release(&mut self, done: bool) -> String {
        let end = self.buf.len();
        self.scanned += end;
        let scan = self.redactor.scan(&self.buf, self.from);
        let mut cut = if done {
            end
        } else {
            end.saturating_sub(HOLD).max(self.from)
        };
        let mut open = None;
        let mut token = None;
        if !done {
            let pending = &self.buf[self.from..];
            open = open_block(pending);
            token = growing_token(pending);
            if let Some(open) = open {
                cut = cut.min(self.from + open);
            }
            if let Some(token) = token {
                cut = cut.min(self.from + token);
            }
            // Never inside a match, nor before the end of one still growing.
            let spans: Vec<(usize, usize)> = scan
                .raw
                .iter()
                .copied()
                .chain(scan.findings.iter().map(|f| (f.start, f.end)))
                .collect();
            loop {
                let before = cut;
                for &(s, e) in &spans {
                    if s < cut && (e > cut || e == end) {
                        cut = s.max(self.from);
                    }
                }
                if cut == before {
                    break;
                }
            }
            while !self.buf.is_char_boundary(cut) {
                cut -= 1;
            }
        }
        self.wait = if done || cut > self.from {
            Wait::No
        } else if open == Some(0) && !self.buf[self.from..].contains(BLOCK_CLOSE) {
            Wait::BlockEnd {
                from: end.saturating_sub(BLOCK_CLOSE.len()),
            }
        } else if token == Some(0) {
            Wait::Space
        } else {
            Wait::Length(end + (end - self.from).max(HOLD))
        };
        let mut out = String::new();
        let mut at = self.from;
        for f in scan.findings.iter().filter(|f| f.end <= cut) {
            out.push_str(&self.buf[at..f.start]);
            let replacement = self.redactor.render(&f.rule, &self.buf[f.start..f.end]);
            out.push_str(&replacement);
            if let Some(track) = self.track.as_mut() {
                track.push(Released {
                    start: self.drained + f.start,
                    end: self.drained + f.end,
                    replacement,
                });
            }
            *self.counts.entry(f.rule.clone()).or_insert(0) += 1;
            at = f.end;
        }
        out.push_str(&self.buf[at..cut]);
        // Keep a little released text as context for the next scan.
        let mut keep = cut.saturating_sub(CONTEXT);
        while !self.buf.is_char_boundary(keep) {
            keep -= 1;
        }
        self.buf.drain(..keep);
        self.drained += keep;
        self.from = cut - keep;
        out
    }
}

/// Where the first PEM block that has not ended yet starts, if one does. A
/// block has ended when its end line has arrived whole: `-----END`, a
/// label, and the closing dashes (or a line break, for a malformed end
/// line).
fn open_block(text: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = text[from..].find(BLOCK_OPEN) {
        let open = from + found;
        let body = &text[open + BLOCK_OPEN.len()..];
        match body.find(BLOCK_CLOSE) {
            None => return Some(reach_back(text, open)),
            Some(close) => {
                let tail = &body[close + BLOCK_CLOSE.len()..];
                let dashes = tail.find("-----").map(|d| d + 5);
                let line_break = tail.find(['\n', '\r']);
                let end = match (dashes, line_break) {
                    (Some(d), Some(b)) => Some(d.min(b)),
                    (d, b) => d.or(b),
                };
                match end {
                    // Look for the next block right after `-----END`: its
                    // `-----BEGIN` may share the dashes taken as this end
                    // line's closing ones.
                    Some(_) => from = open + BLOCK_OPEN.len() + close + BLOCK_CLOSE.len(),
                    None => return Some(reach_back(text, open)),
                }
            }
        }
    }
    None
}

/// A PEM label may hold spaces, dashes and capitals (up to 100 of them),
/// so a `-----BEGIN` shortly before an open block can start the same match
/// (`-----BEGIN -----END -----BEGIN RSA PRIVATE KEY-----…` is one match
/// for the whole text): hold from the earliest such one.
fn reach_back(text: &str, mut open: usize) -> usize {
    const LABEL: usize = 110;
    loop {
        let mut lo = open.saturating_sub(BLOCK_OPEN.len() + LABEL);
        while !text.is_char_boundary(lo) {
            lo -= 1;
        }
        match text[lo..open].find(BLOCK_OPEN) {
            Some(i) => open = lo + i,
            None => return open,
        }
    }
}

/// Where the last run of non-space characters starts, when it reaches the
/// end of the text.
fn growing_token(text: &str) -> Option<usize> {
    if text.ends_with(char::is_whitespace) {
        return None;
    }
    let start = text
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map_or(0, |(i, c)| i + c.len_utf8());
    Some(start)
}
