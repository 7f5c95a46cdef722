//! Redaction of a text that arrives in pieces (one choice of a streamed
//! completion), with the same result as redacting the whole text at once,
//! however it is split.
//!
//! Text is released once it can no longer be part of a match: everything
//! but the last [`HOLD`] bytes, moved back to the start of any pattern match
//! (validated or not) that crosses that point or reaches the end of what
//! has arrived, and to the start of a PEM block (`-----BEGIN`) whose
//! `-----END` has not arrived yet. Worst-case hold-back: [`HOLD`] bytes
//! (256) for every rule whose shortest match is shorter than that, a token
//! still growing at the end of the text for as long as it grows, and a PEM
//! private key block until its end marker. A short [`CONTEXT`] of released
//! text is kept so that `\b` and similar assertions see what precedes.

use super::Redactor;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Bytes always held back from the end of the text.
pub const HOLD: usize = 256;
/// Bytes of released text kept as left context.
pub const CONTEXT: usize = 16;
const BLOCK_OPEN: &str = "-----BEGIN";
const BLOCK_CLOSE: &str = "-----END";

pub struct StreamRedactor {
    redactor: Arc<Redactor>,
    buf: String,
    /// `buf[..from]` was released already (context only).
    from: usize,
    counts: BTreeMap<String, usize>,
}

impl StreamRedactor {
    pub fn new(redactor: Arc<Redactor>) -> Self {
        Self {
            redactor,
            buf: String::new(),
            from: 0,
            counts: BTreeMap::new(),
        }
    }

    /// Add a piece; returns the redacted text that can be released now.
    pub fn push(&mut self, piece: &str) -> String {
        self.buf.push_str(piece);
        self.release(false)
    }

    /// The text is complete: release the rest.
    pub fn finish(&mut self) -> String {
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
        let scan = self.redactor.scan(&self.buf, self.from);
        let mut cut = if done {
            end
        } else {
            end.saturating_sub(HOLD).max(self.from)
        };
        if !done {
            if let Some(open) = open_block(&self.buf[self.from..]) {
                cut = cut.min(self.from + open);
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
        let mut out = String::new();
        let mut at = self.from;
        for f in scan.findings.iter().filter(|f| f.end <= cut) {
            out.push_str(&self.buf[at..f.start]);
            out.push_str(&self.redactor.render(&f.rule, &self.buf[f.start..f.end]));
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
        self.from = cut - keep;
        out
    }
}

/// Where an unterminated PEM block starts, if one does.
fn open_block(text: &str) -> Option<usize> {
    let open = text.rfind(BLOCK_OPEN)?;
    (!text[open..].contains(BLOCK_CLOSE)).then_some(open)
}
