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
    /// Characters per window (at least 16).
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

/// The highest mean cost, in bits per pair, of any qualifying window of
/// `text` (the lower of the two tables' means), or 0 when no window
/// qualifies. Linear: one table look-up per byte.
pub fn worst_window(text: &str, s: &SuffixSettings) -> f32 {
    let window = s.window.max(16);
    let bytes = text.as_bytes();
    if bytes.len() < window {
        return 0.0;
    }
    // Per transition: prose cost, code cost (eighths of a bit), or none
    // when either side is not ASCII; and whether the byte is a space.
    let skip = encoded_tokens(bytes);
    let mut ring = vec![(0u32, 0u32, false, false); window];
    let (mut prose, mut code, mut counted, mut spaces) = (0u32, 0u32, 0usize, 0usize);
    let mut worst = 0u32;
    let mut worst_counted = 1usize;
    let mut previous = 0;
    let need = window * 9 / 10;
    for (i, &b) in bytes.iter().enumerate() {
        let c = class(b);
        let slot = &mut ring[i % window];
        if i >= window {
            let (p, k, valid, space) = *slot;
            if valid {
                prose -= p;
                code -= k;
                counted -= 1;
            }
            spaces -= usize::from(space);
        }
        let valid = c != 95 && previous != 95 && !skip.get(i).copied().unwrap_or(false);
        let (p, k) = if valid {
            (
                u32::from(TABLES[previous * CLASSES + c]),
                u32::from(TABLES[CLASSES * CLASSES + previous * CLASSES + c]),
            )
        } else {
            (0, 0)
        };
        *slot = (p, k, valid, c == 0);
        if valid {
            prose += p;
            code += k;
            counted += 1;
        }
        spaces += usize::from(c == 0);
        previous = c;
        if i + 1 >= window && counted >= need && spaces >= s.min_spaces {
            let cost = prose.min(code);
            // cost / counted > worst / worst_counted, without division.
            if u64::from(cost) * worst_counted as u64 > u64::from(worst) * counted as u64 {
                worst = cost;
                worst_counted = counted;
            }
        }
    }
    worst as f32 / worst_counted as f32 / 8.0
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

/// Whether `text` holds a run that looks like an optimised suffix.
pub fn found(text: &str, s: &SuffixSettings) -> bool {
    worst_window(text, s) > s.min_bits
}
