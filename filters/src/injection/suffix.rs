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

/// Whether some window of `text`, taken at 8-byte block boundaries, has
/// enough spaces and a mean pair cost, under both tables, above
/// `min_bits`. Linear: per byte, two table look-ups and adds into the
/// current block; per block, one window check.
pub fn found(text: &str, s: &SuffixSettings) -> bool {
    const BLOCK: usize = 8;
    let blocks = (s.window.clamp(16, 255) / BLOCK).max(2);
    let bytes = text.as_bytes();
    if bytes.len() < blocks * BLOCK || !enough_rare_pairs(bytes) {
        return false;
    }
    let skip = encoded_tokens(bytes);
    // Costs are in eighths of a bit: a window exceeds the limit when
    // 10 * cost > (80 * min_bits) * counted.
    let limit = (s.min_bits * 80.0).max(0.0) as u64;
    let need = (blocks * BLOCK * 9 / 10) as u64;
    // Per block: prose cost | code cost << 16 | counted << 32 | spaces << 40.
    let mut ring = vec![0u64; blocks];
    let (mut sums, mut block, mut at) = (0u64, 0u64, 0usize);
    let mut previous = 0;
    for (chunk_at, chunk) in bytes.chunks(BLOCK).enumerate() {
        for (j, &b) in chunk.iter().enumerate() {
            let c = class(b);
            block += u64::from(c == 0) << 40;
            if c != 95 && previous != 95 && !skip[chunk_at * BLOCK + j] {
                block += u64::from(TABLES[previous * CLASSES + c])
                    + (u64::from(TABLES[CLASSES * CLASSES + previous * CLASSES + c]) << 16)
                    + (1 << 32);
            }
            previous = c;
        }
        sums = sums - ring[at] + block;
        ring[at] = block;
        block = 0;
        at = if at + 1 == blocks { 0 } else { at + 1 };
        if chunk_at + 1 < blocks {
            continue;
        }
        let counted = (sums >> 32) & 0xff;
        let spaces = (sums >> 40) & 0xff;
        if counted < need || (spaces as usize) < s.min_spaces {
            continue;
        }
        let cost = (sums & 0xffff).min((sums >> 16) & 0xffff);
        if cost * 10 > limit * counted {
            return true;
        }
    }
    false
}

/// Pairs that cost 9 bits or more under both tables: an optimised suffix
/// has several in every window; most text has a handful in all.
fn rare_pairs() -> &'static [bool; CLASSES * CLASSES] {
    static RARE: std::sync::OnceLock<[bool; CLASSES * CLASSES]> = std::sync::OnceLock::new();
    RARE.get_or_init(|| {
        let mut rare = [false; CLASSES * CLASSES];
        for (i, r) in rare.iter_mut().enumerate() {
            *r = TABLES[i].min(TABLES[CLASSES * CLASSES + i]) >= 72;
        }
        rare
    })
}

/// A cheap first look: at least seven rare pairs in the whole text, or
/// no window can qualify worth the full computation.
fn enough_rare_pairs(bytes: &[u8]) -> bool {
    let rare = rare_pairs();
    let mut previous = 0;
    let mut n = 0;
    for &b in bytes {
        let c = class(b);
        n += usize::from(rare[previous * CLASSES + c] && c != 95 && previous != 95);
        if n >= 7 {
            return true;
        }
        previous = c;
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
