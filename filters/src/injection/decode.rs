//! Payload smuggling: encoded segments are decoded, within a byte budget,
//! and the detector scans what they say. Found here: base64 (standard and
//! URL-safe), hex (runs, `\x69\x67` escapes, spaced byte pairs),
//! percent-encoding, `\u` escapes and HTML numeric entities, and
//! instructions split into strings assigned to variables (`a = "ign"`,
//! `b = "ore all…"`, joined in the variables' order) or joined with `+`. rot13 has no shape to find; the detector reads the
//! whole text through it when the text speaks of rot13 or a Caesar cipher.
//!
//! A decoded segment counts only when it reads as text: valid UTF-8,
//! no control characters but line breaks and tabs, mostly letters and
//! spaces. Random keys, hashes and binary data decode to noise and are
//! dropped.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine};

/// The shortest base64 or hex run worth decoding, in characters.
const MIN_RUN: usize = 20;
/// The fewest escapes (`%69`, `\x69`, spaced pairs) worth decoding.
const MIN_ESCAPES: usize = 6;

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_decode_allow_trailing_bits(true)
    .with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

const fn base64_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'-' | b'_');
        b += 1;
    }
    t
}
static BASE64: [bool; 256] = base64_table();

fn is_base64(b: u8) -> bool {
    BASE64[usize::from(b)]
}

/// Decoded bytes as text: invalid bytes and control characters read as
/// spaces; kept when they are at most a tenth of it and it has three
/// letters. Random keys and binary data are mostly invalid UTF-8; a
/// payload with a stray byte or a NUL is still read.
fn readable(bytes: &[u8]) -> Option<String> {
    let (mut letters, mut noise, mut total) = (0usize, 0usize, 0usize);
    let text: String = String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| {
            total += 1;
            letters += usize::from(c.is_alphabetic());
            if (c.is_control() && !matches!(c, '\n' | '\t')) || c == '\u{FFFD}' {
                noise += 1;
                ' '
            } else {
                c
            }
        })
        .collect();
    (letters >= 3 && noise * 10 <= total).then_some(text)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn hex_pair(pair: &[u8]) -> Option<u8> {
    Some(hex_value(*pair.first()?)? << 4 | hex_value(*pair.get(1)?)?)
}

/// Decodes what it finds in `text` while `budget` (bytes of decoded text)
/// lasts, and returns the segments that read as text. `seen` is what the
/// folding pass already found in plain ASCII text (then only those places
/// are looked at).
pub fn segments(
    text: &str,
    seen: Option<&super::normalise::Encoded>,
    budget: &mut usize,
) -> Vec<String> {
    let mut found = Vec::new();
    let bytes = text.as_bytes();
    // A segment larger than what is left of the budget is read up to the
    // budget: a decoy blob cannot make the decoder skip what follows it
    // unread without the budget running out (which the detector reports).
    let mut keep = |decoded: Option<Vec<u8>>, budget: &mut usize| {
        let Some(decoded) = decoded else { return };
        let take = decoded.len().min(*budget);
        *budget -= take;
        if let Some(t) = readable(&decoded[..take]) {
            found.push(t);
        }
    };
    // Base64 and hex runs.
    let runs: Vec<(usize, usize)> = match seen {
        Some(e) => e.runs.clone(),
        None => {
            let mut runs = Vec::new();
            let mut start = 0;
            for i in 0..=bytes.len() {
                if i < bytes.len() && is_base64(bytes[i]) {
                    continue;
                }
                if i - start >= MIN_RUN {
                    runs.push((start, i));
                }
                start = i + 1;
            }
            runs
        }
    };
    for (start, end) in runs {
        // Runs wrapped at 76 columns hold line breaks.
        let unwrapped: Vec<u8>;
        let run = if bytes[start..end].contains(&b'\n') {
            unwrapped = bytes[start..end]
                .iter()
                .copied()
                .filter(|b| !matches!(b, b'\n' | b'\r'))
                .collect();
            &unwrapped[..]
        } else {
            &bytes[start..end]
        };
        if *budget == 0 {
            break;
        }
        let decoded = if run.len() % 2 == 0 && run.iter().all(u8::is_ascii_hexdigit) {
            run.chunks(2).map(hex_pair).collect::<Option<Vec<u8>>>()
        } else if run.iter().any(|&b| b == b'-' || b == b'_') {
            URL_SAFE.decode(run).ok()
        } else {
            STANDARD.decode(run).ok()
        };
        keep(decoded, budget);
    }
    // Escapes: within one white-space-free stretch, `%xx` and `\xhh`;
    // across stretches, runs of two-digit hex words (`69 67 6e`). Most
    // text has none of these: a quick look first.
    let (escapes, spaced_hex) = match seen {
        Some(e) => (e.escapes, e.spaced_hex),
        None => (
            bytes.iter().any(|&b| matches!(b, b'%' | b'\\' | b'&')),
            bytes.windows(4).any(|w| {
                w[0].is_ascii_hexdigit()
                    && w[1].is_ascii_hexdigit()
                    && w[2] == b' '
                    && w[3].is_ascii_hexdigit()
            }),
        ),
    };
    if !escapes && !spaced_hex {
        return found;
    }
    // The whole text with its escaped words unescaped, so an escaped
    // word is read with its neighbours (`&#105;&#103;… all previous`).
    let mut unescaped: Vec<u8> = Vec::new();
    let mut changed = false;
    let mut pairs: Vec<u8> = Vec::new();
    for word in text.split_ascii_whitespace() {
        let w = word.as_bytes();
        if w.len() == 2 {
            if let Some(b) = hex_pair(w) {
                pairs.push(b);
            }
        } else {
            if pairs.len() >= MIN_ESCAPES {
                keep(Some(std::mem::take(&mut pairs)), budget);
            }
            pairs.clear();
        }
        // One `%xx` is enough (`ignore%20all%20…`); `\x`, `\u` and
        // `&#` escapes from two on.
        let percent = w
            .windows(3)
            .filter(|p| p[0] == b'%' && hex_pair(&p[1..]).is_some())
            .count();
        let others = w
            .windows(2)
            .filter(|p| p == b"\\x" || p == b"\\u" || p == b"&#")
            .count();
        if percent >= 1 || others >= 2 {
            unescaped.extend_from_slice(&unescape(w));
            changed = true;
        } else {
            unescaped.extend_from_slice(w);
        }
        unescaped.push(b' ');
    }
    if pairs.len() >= MIN_ESCAPES {
        keep(Some(pairs), budget);
    }
    if changed {
        keep(Some(unescaped), budget);
    }
    found
}

/// A character from `&#105;`, `&#x69;` or `\u0069` at the start of `w`,
/// and how many bytes it took.
fn numeric_escape(w: &[u8]) -> Option<(char, usize)> {
    let (digits, radix, skip) = if w.starts_with(b"&#x") || w.starts_with(b"&#X") {
        (&w[3..], 16, 3)
    } else if w.starts_with(b"&#") {
        (&w[2..], 10, 2)
    } else if w.starts_with(b"\\u") {
        let hex = w.get(2..6)?;
        let text = std::str::from_utf8(hex).ok()?;
        return char::from_u32(u32::from_str_radix(text, 16).ok()?).map(|c| (c, 6));
    } else {
        return None;
    };
    let n = digits.iter().take(8).position(|&b| b == b';')?;
    let text = std::str::from_utf8(&digits[..n]).ok()?;
    char::from_u32(u32::from_str_radix(text, radix).ok()?).map(|c| (c, skip + n + 1))
}

/// `%xx`, `\xhh`, `\uhhhh` and HTML numeric entities replaced by what
/// they stand for, `+` by a space.
fn unescape(w: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(w.len());
    let mut i = 0;
    while i < w.len() {
        let escaped = match w[i] {
            b'%' => w.get(i + 1..i + 3).and_then(hex_pair).map(|b| (b, 3)),
            b'\\' if w.get(i + 1) == Some(&b'x') => {
                w.get(i + 2..i + 4).and_then(hex_pair).map(|b| (b, 4))
            }
            _ => None,
        };
        if let Some((b, n)) = escaped {
            out.push(b);
            i += n;
            continue;
        }
        if let Some((c, n)) = numeric_escape(&w[i..]) {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            i += n;
            continue;
        }
        out.push(if w[i] == b'+' { b' ' } else { w[i] });
        i += 1;
    }
    out
}

/// rot13 over ASCII letters.
pub fn rot13(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            'a'..='m' | 'A'..='M' => char::from(c as u8 + 13),
            'n'..='z' | 'N'..='Z' => char::from(c as u8 - 13),
            _ => c,
        })
        .collect()
}

/// How often a byte `first` accepts is followed, after blanks, by a quote
/// (a cheap look before a regex runs over the whole text).
fn followed_by_quote(b: &[u8], first: impl Fn(u8) -> bool) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < b.len() {
        if first(b[i]) {
            let mut j = i + 1;
            while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
                j += 1;
            }
            if j < b.len()
                && (b[j] == b'"' || b[j] == b'\'')
                && j > i + usize::from(matches!(b[i], b'"' | b'\''))
            {
                n += 1;
            }
        }
        i += 1;
    }
    n
}

/// String literals joined with `+` or `.`, or just side by side (`"Ign" +
/// "ore all"`, `'Ign' . 'ore'`, `"Ign" "ore"`), as one text.
pub fn concatenated(text: &str, seen: Option<&super::normalise::Encoded>) -> Vec<String> {
    static CHAIN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    static LITERAL: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    // A quote, then `+`, `.` or nothing, then another quote.
    let possible = match seen {
        Some(e) => e.joined_literals,
        None => followed_by_quote(text.as_bytes(), |b| matches!(b, b'"' | b'\'' | b'+' | b'.')) > 0,
    };
    if !possible {
        return Vec::new();
    }
    let chain = CHAIN.get_or_init(|| {
        regex::Regex::new(
            r#"(?:"[^"\n]{0,300}"|'[^'\n]{0,300}')(?:(?:\s*[+.]\s*|[ \t]*)(?:"[^"\n]{0,300}"|'[^'\n]{0,300}'))+"#,
        )
        .expect("a fixed pattern")
    });
    let literal = LITERAL
        .get_or_init(|| regex::Regex::new(r#""([^"\n]*)"|'([^'\n]*)'"#).expect("a fixed pattern"));
    let mut out = Vec::new();
    for m in chain.find_iter(text).take(64) {
        let joined: String = literal
            .captures_iter(m.as_str())
            .filter_map(|c| c.get(1).or(c.get(2)))
            .map(|g| g.as_str())
            .collect();
        out.push(joined);
    }
    out
}

/// Strings assigned to variables, joined in the order of the variables'
/// names (`a`, `b`, `c`), when there are at least two.
pub fn joined_assignments(text: &str, seen: Option<&super::normalise::Encoded>) -> Option<String> {
    static ASSIGNMENT: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    // Two `= "` (or `= '`) at least, else nothing to join.
    let assignments = match seen {
        Some(e) => e.assignments,
        None => followed_by_quote(text.as_bytes(), |b| b == b'='),
    };
    if assignments < 2 {
        return None;
    }
    let re = ASSIGNMENT.get_or_init(|| {
        regex::Regex::new(
            r#"\b([A-Za-z_][A-Za-z0-9_]{0,15})\s*=\s*(?:"([^"\n]{1,300})"|'([^'\n]{1,300})'|“([^”\n]{1,300})”)"#,
        )
        .expect("a fixed pattern")
    });
    let mut parts: Vec<(&str, &str)> = re
        .captures_iter(text)
        .filter_map(|c| {
            let value = c.get(2).or(c.get(3)).or(c.get(4))?;
            Some((c.get(1)?.as_str(), value.as_str()))
        })
        .take(64)
        .collect();
    if parts.len() < 2 {
        return None;
    }
    // `v2` before `v10`: a name's trailing number counts as a number.
    parts.sort_by_key(|(name, _)| {
        let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (stem, number) = name.split_at(name.len() - digits);
        (stem, number.parse::<u64>().unwrap_or(0))
    });
    Some(parts.iter().map(|(_, v)| *v).collect())
}
