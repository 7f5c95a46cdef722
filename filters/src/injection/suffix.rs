//! The adversarial-suffix signal. Optimised suffixes (`describing.\ +
//! similarlyNow write oppositeley.](`) are runs of tokens glued together
//! by punctuation: neither prose nor code. Two character-bigram tables,
//! one from English prose and one from source code (built by
//! `scripts/bigrams.py`, compiled in), give each pair of adjacent
//! characters a cost in bits; a window of text whose mean cost is high
//! under *both* tables, and which has the spaces of several words (URLs,
//! base64 and hashes have none, and their tokens are not counted), is a
//! suffix.
//!
//! This is a weak signal on its own: dense technical text (regular
//! expressions, LaTeX, shell one-liners) can look the same. Its default
//! weight makes it count only next to another signal, or in tool results.

use serde::Deserialize;

/// `signals.adversarial_suffix` in the policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuffixSettings {
    pub weight: f32,
    /// Characters per window (16 to 255).
    #[serde(default = "default_window")]
    pub window: usize,
    /// Mean bits per character pair, under both tables, that a window must
    /// exceed.
    #[serde(default = "default_bits")]
    pub min_bits: f32,
    /// White-space characters a window must hold.
    #[serde(default = "default_spaces")]
    pub min_spaces: usize,
}

fn default_window() -> usize {
    40
}
fn default_bits() -> f32 {
    5.6
}
fn default_spaces() -> usize {
    5
}

const CLASSES: usize = 96;
static TABLES: &[u8; 2 * CLASSES * CLASSES] = include_bytes!("bigrams.bin");

/// White space 0, printable ASCII 1–94, anything else 95.
fn class(b: u8) -> usize {
    match b {
        b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c => 0,
        0x21..=0x7e => usize::from(b - 0x20),
        _ => 95,
    }
}

/// Whether some window of `text` (every fourth position) has enough
/// spaces and a mean pair cost, under both tables, above `min_bits`.
/// Linear: running sums over a ring of the window's pairs.
pub fn found(text: &str, s: &SuffixSettings) -> bool {
    let window = s.window.clamp(16, 255);
    let bytes = text.as_bytes();
    if bytes.len() < window {
        return false;
    }
    let skip = encoded_tokens(bytes);
    // Costs are in eighths of a bit: a window exceeds the limit when
    // 10 * cost > (80 * min_bits) * counted.
    let limit = (s.min_bits * 80.0).max(0.0) as u64;
    let need = window * 9 / 10;
    // Per pair in the window: prose cost | code cost << 16 | counted << 32
    // | space << 40, so one add and one subtract keep all four sums.
    let mut ring = vec![0u64; window];
    let mut sums = 0u64;
    let mut at = 0;
    let mut previous = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let c = class(b);
        let mut pair = u64::from(c == 0) << 40;
        if c != 95 && previous != 95 && !skip[i] {
            pair |= u64::from(TABLES[previous * CLASSES + c])
                | u64::from(TABLES[CLASSES * CLASSES + previous * CLASSES + c]) << 16
                | 1 << 32;
        }
        previous = c;
        sums = sums - ring[at] + pair;
        ring[at] = pair;
        at = if at + 1 == window { 0 } else { at + 1 };
        if i + 1 < window || i % 4 != 0 {
            continue;
        }
        let counted = (sums >> 32) & 0xff;
        let spaces = (sums >> 40) & 0xff;
        if (counted as usize) < need || (spaces as usize) < s.min_spaces {
            continue;
        }
        let cost = (sums & 0xffff).min((sums >> 16) & 0xffff);
        if cost * 10 > limit * counted {
            return true;
        }
    }
    false
}

/// Bytes of white-space-separated tokens that are encoded data or
/// addresses (20 or more base64 characters, or holding `://`): their
/// pairs are not counted, so a base64 blob or a URL next to prose is not
/// a suffix.
fn encoded_tokens(bytes: &[u8]) -> Vec<bool> {
    let mut skip = vec![false; bytes.len()];
    let mut start = 0;
    for i in 0..=bytes.len() {
        let end = i == bytes.len() || bytes[i].is_ascii_whitespace();
        if !end {
            continue;
        }
        let token = &bytes[start..i];
        let encoded = token.len() >= 20
            && token.iter().all(|&b| {
                b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'_' | b'-')
            });
        if encoded || token.windows(3).any(|w| w == b"://") {
            skip[start..i].iter_mut().for_each(|s| *s = true);
        }
        start = i + 1;
    }
    skip
}

