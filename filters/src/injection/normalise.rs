//! What the rules see. One pass over the text builds two views:
//!
//! - **words**: lower case, compatibility forms folded (NFKD: fullwidth,
//!   mathematical and circled letters become plain ones), Latin, Greek and
//!   Cyrillic accents dropped, invisible characters removed (so a
//!   zero-width space inside a word joins it again), look-alike letters
//!   folded to Latin inside words that mix scripts (`іgnore` with a
//!   Cyrillic `і`), leetspeak digits and `@`/`$` read as letters inside
//!   words where a letter follows one (`1gn0re`, `p@$$word`; `base64`,
//!   `rot13` and `gpt4` stay), every run of
//!   punctuation and white space turned into one space (but a hyphen or
//!   middle dot between letters joins them: `ig-nore`), capitals and
//!   styled letters that look Latin read as Latin (`ΙΝSΤRUCΤΙΟΝS`,
//!   small capitals, squared and circled letters), and runs of three or
//!   more one-letter words joined (`i.g.n.o.r.e`, `i g n 0 r e`). The
//!   view starts and ends with a space, so ` word ` matches a whole word.
//! - **clean**: the same characters in their own case, with punctuation
//!   and line breaks kept, for rules about structure (chat-template delimiters, markdown images,
//!   string concatenation). Built only when the text is not plain ASCII;
//!   plain ASCII text is its own clean view.
//!
//! Tag characters (U+E0020–E007E, "ASCII smuggling") are removed from both
//! views and collected, read as the ASCII they shadow, into
//! [`Folded::hidden`], which is scanned as text of its own.
//!
//! Work is linear: each input character is looked at once and yields at
//! most four output characters (longer compatibility expansions, such as
//! the one-character Arabic phrases, are kept as they are).

use unicode_normalization::char::{decompose_compatible, is_combining_mark};

/// The views of one text, and what was removed from it.
#[derive(Debug, Default)]
pub struct Folded {
    pub words: String,
    /// `None` when the input is plain ASCII (its own clean view).
    pub clean: Option<String>,
    /// The ASCII that tag characters shadow.
    pub hidden: String,
    /// Tag characters that are not part of an emoji flag sequence.
    pub tags: usize,
    /// Zero-width and bidirectional-control characters.
    pub invisible: usize,
    /// Where encoded data may be, found while folding plain ASCII text
    /// (`None` for other text: the decoder looks for itself).
    pub encoded: Option<Encoded>,
}

/// What the ASCII pass saw that the decoder needs.
#[derive(Debug, Default, Clone)]
pub struct Encoded {
    /// Byte ranges of base64-alphabet runs of 20 bytes or more.
    pub runs: Vec<(usize, usize)>,
    /// A `%` or a `\` occurs.
    pub escapes: bool,
    /// Six or more two-digit hex words in a row (`69 67 6e …`).
    pub spaced_hex: bool,
    /// How often `=` is followed by a quote (`a = "…"`).
    pub assignments: usize,
    /// A quote, `+` or `.` followed by a quote (`"Ign" + "ore"`).
    pub joined_literals: bool,
}

/// Characters removed without leaving a word break: zero-width spaces and
/// joiners, bidirectional controls, variation selectors, the soft hyphen,
/// invisible operators and fillers.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0100}'..='\u{E01EF}')
}

/// Invisible characters that say something when they appear: zero-width
/// spaces inside text and bidirectional overrides ("Trojan Source").
/// Joiners (emoji sequences, Indic and Persian scripts) and variation
/// selectors (emoji presentation) are ordinary.
fn is_suspicious_invisible(c: char) -> bool {
    matches!(c, '\u{200B}' | '\u{2060}' | '\u{180E}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

const TAGS: std::ops::RangeInclusive<char> = '\u{E0000}'..='\u{E007F}';
const BLACK_FLAG: char = '\u{1F3F4}';
const CANCEL_TAG: char = '\u{E007F}';

/// Latin, Greek and Cyrillic accents (Combining Diacritical Marks) and
/// Arabic vowel and hamza marks, which writers often leave out; marks of
/// other scripts are parts of their letters and stay.
fn is_accent(c: char) -> bool {
    matches!(c,
        '\u{0300}'..='\u{036F}' | '\u{0483}'..='\u{0489}' | '\u{064B}'..='\u{065F}' | '\u{0670}'
        | '\u{1AB0}'..='\u{1AFF}' | '\u{1DC0}'..='\u{1DFF}' | '\u{20D0}'..='\u{20FF}'
        | '\u{FE20}'..='\u{FE2F}')
}

/// Latin letters in disguise that compatibility decomposition leaves
/// alone: small capitals, letters in squares and circles, regional
/// indicators.
fn styled(c: char) -> Option<char> {
    let offset = |base: u32| char::from_u32(u32::from(b'a') + (c as u32 - base));
    match c {
        '\u{1F130}'..='\u{1F149}' => offset(0x1F130),
        '\u{1F150}'..='\u{1F169}' => offset(0x1F150),
        '\u{1F170}'..='\u{1F189}' => offset(0x1F170),
        '\u{1F1E6}'..='\u{1F1FF}' => offset(0x1F1E6),
        'ᴀ' => Some('a'),
        'ʙ' => Some('b'),
        'ᴄ' => Some('c'),
        'ᴅ' => Some('d'),
        'ᴇ' => Some('e'),
        'ꜰ' => Some('f'),
        'ɢ' => Some('g'),
        'ʜ' => Some('h'),
        'ɪ' => Some('i'),
        'ᴊ' => Some('j'),
        'ᴋ' => Some('k'),
        'ʟ' => Some('l'),
        'ᴍ' => Some('m'),
        'ɴ' => Some('n'),
        'ᴏ' => Some('o'),
        'ᴘ' => Some('p'),
        'ǫ' => Some('q'),
        'ʀ' => Some('r'),
        'ꜱ' => Some('s'),
        'ᴛ' => Some('t'),
        'ᴜ' => Some('u'),
        'ᴠ' => Some('v'),
        'ᴡ' => Some('w'),
        'ʏ' => Some('y'),
        'ᴢ' => Some('z'),
        _ => None,
    }
}

/// A Greek or Cyrillic capital that looks like a Latin one: read as that
/// Latin letter in lower case (lower-casing would lose the likeness: `Т`
/// is `т`, `Ν` is `ν`).
fn confusable_capital(c: char) -> Option<u8> {
    Some(match c {
        'А' | 'Α' => b'a',
        'В' | 'Β' => b'b',
        'С' | 'Ϲ' => b'c',
        'Е' | 'Ε' => b'e',
        'Н' | 'Η' => b'h',
        'І' | 'Ι' | 'Ӏ' => b'i',
        'Ј' => b'j',
        'К' | 'Κ' => b'k',
        'М' | 'Μ' => b'm',
        'Ν' => b'n',
        'О' | 'Ο' => b'o',
        'Р' | 'Ρ' => b'p',
        'Ѕ' => b's',
        'Т' | 'Τ' => b't',
        'Х' | 'Χ' => b'x',
        'У' | 'Υ' => b'y',
        'Ζ' => b'z',
        'Ꭵ' => b'i',
        'Ꭺ' => b'a',
        'Ꭼ' => b'e',
        'Ꮇ' => b'm',
        'Ꮢ' => b'r',
        'Ꮪ' => b's',
        'Ꭲ' => b't',
        _ => return None,
    })
}

/// A rule's regex with its non-ASCII letters decomposed, without accents
/// and in lower case, as the words view has them; ASCII (the regex
/// syntax) is left alone.
pub fn regex_source(re: &str) -> String {
    let mut out = String::with_capacity(re.len());
    for c in re.chars() {
        if c.is_ascii() {
            out.push(c);
            continue;
        }
        decompose_compatible(c, |d| {
            for l in d.to_lowercase() {
                if !is_accent(l) {
                    out.push(l);
                }
            }
        });
    }
    out
}

/// A Greek or Cyrillic letter (lower case) that looks like a Latin one in
/// lower case. Letters that only look alike in capitals (`в`, `м`, `т`)
/// are left out: folding them would turn ordinary Russian words into
/// Latin ones.
fn confusable(c: char) -> Option<u8> {
    Some(match c {
        'а' | 'α' => b'a',
        'с' | 'ϲ' => b'c',
        'ԁ' => b'd',
        'е' => b'e',
        'ɡ' => b'g',
        'һ' => b'h',
        'і' | 'ι' | 'ı' | 'ӏ' => b'i',
        'ј' | 'ϳ' => b'j',
        'κ' => b'k',
        'о' | 'ο' | 'օ' => b'o',
        'ս' => b'u',
        'ո' => b'n',
        'հ' => b'h',
        'р' | 'ρ' => b'p',
        'ԛ' => b'q',
        'ѕ' => b's',
        'υ' => b'u',
        'ν' | 'ѵ' => b'v',
        'ԝ' => b'w',
        'х' | 'χ' => b'x',
        'у' => b'y',
        _ => return None,
    })
}

/// A digit or symbol read as a letter inside a word that has letters.
fn leet(b: u8) -> u8 {
    match b {
        b'0' => b'o',
        b'1' => b'i',
        b'3' => b'e',
        b'4' | b'@' => b'a',
        b'5' | b'$' => b's',
        b'7' => b't',
        other => other,
    }
}

/// The word being built: where it starts in `words` and what it holds.
#[derive(Default, Clone, Copy)]
struct Word {
    active: bool,
    start: usize,
    chars: usize,
    letters: usize,
    latin: usize,
    confusables: usize,
    /// Digits, `@` or `$`.
    leet: usize,
    /// A letter came after one of those: `1gn0re`, not `base64`.
    leet_then_letter: bool,
}

struct Folder {
    /// The words view, built as bytes (always valid UTF-8).
    words: Vec<u8>,
    clean: Option<String>,
    hidden: String,
    tags: usize,
    invisible: usize,
    word: Word,
    /// Two-digit hex words in a row.
    hex_words: usize,
    spaced_hex: bool,
    /// Where a run of one-letter words starts in `words` (at its space),
    /// and how many there are.
    singles: (usize, usize),
    /// The current word with look-alikes read as Latin letters (text
    /// that is not plain ASCII only).
    shadow: String,
    /// A `-` or `·` inside a word: it joins the word if a letter follows
    /// (`ig-nore`).
    joiner: bool,
}

/// How the ASCII fast path sees a byte.
const SEP: u8 = 0;
const LETTER: u8 = 1;
const LEET: u8 = 2;

const fn ascii_classes() -> [u8; 128] {
    let mut t = [SEP; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = if c.is_ascii_alphabetic() {
            LETTER
        } else if c.is_ascii_digit() || c == b'@' || c == b'$' {
            LEET
        } else {
            SEP
        };
        b += 1;
    }
    t
}
static ASCII: [u8; 128] = ascii_classes();

impl Folder {
    #[inline]
    fn begin_word(&mut self) {
        if !self.word.active {
            self.words.push(b' ');
            self.word = Word {
                active: true,
                start: self.words.len(),
                ..Word::default()
            };
            self.shadow.clear();
        }
        self.joiner = false;
    }

    /// A letter or digit (`latin`: the Latin letter it looks like).
    fn letter_or_digit(&mut self, c: char, latin: Option<u8>) {
        self.begin_word();
        let w = &mut self.word;
        w.chars += 1;
        if c.is_ascii_digit() || c == '@' || c == '$' {
            w.leet += 1;
        } else if c.is_alphabetic() {
            w.leet_then_letter |= w.leet > 0;
            w.letters += 1;
            if c.is_ascii() {
                w.latin += 1;
            } else if latin.is_some() {
                w.confusables += 1;
            }
        }
        let mut buf = [0u8; 4];
        self.words
            .extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        match latin {
            Some(b) => self.shadow.push(char::from(b)),
            None => self.shadow.push(c),
        }
    }

    #[inline]
    fn end_word(&mut self) {
        if !self.word.active {
            return;
        }
        let w = self.word;
        self.word.active = false;
        let words = &mut self.words;
        if w.chars == 2 && words[w.start..].iter().all(u8::is_ascii_hexdigit) {
            self.hex_words += 1;
            self.spaced_hex |= self.hex_words >= 6;
        } else {
            self.hex_words = 0;
        }
        if w.letters == 0 && w.leet > 0 && w.leet == w.chars {
            // Only digits and `@`/`$`: a number stays, a lone symbol goes.
            if words[w.start..].iter().all(|&b| b == b'@' || b == b'$') {
                words.truncate(w.start - 1);
                return;
            }
        } else if w.letters > 0 && w.confusables > 0 && (w.latin > 0 || w.confusables == w.letters)
        {
            // Look-alikes in a word that mixes scripts, or that is made of
            // nothing else: the Latin reading.
            words.truncate(w.start);
            words.extend_from_slice(self.shadow.as_bytes());
            if w.leet_then_letter {
                words[w.start..].iter_mut().for_each(|b| *b = leet(*b));
            }
        } else if w.letters > 0 && w.leet_then_letter {
            words[w.start..].iter_mut().for_each(|b| *b = leet(*b));
        }
        let one_letter = w.chars == 1 && (w.letters == 1 || w.leet == 1);
        if one_letter {
            if self.singles.1 == 0 {
                self.singles.0 = w.start - 1;
            }
            self.singles.1 += 1;
        } else {
            if self.singles.1 != 0 {
                self.end_singles(w.start - 1);
            }
        }
    }

    /// Join a run of three or more one-letter words ending at `end`.
    fn end_singles(&mut self, end: usize) {
        let (start, n) = std::mem::take(&mut self.singles);
        if n < 3 {
            return;
        }
        // `start` is the run's first space; keep it, drop the others.
        let mut to = start + 1;
        for from in start + 1..end {
            if self.words[from] != b' ' {
                self.words[to] = self.words[from];
                to += 1;
            }
        }
        self.words.drain(to..end);
        // `i g n 0 r e`: digits among the letters are leetspeak.
        let joined = &mut self.words[start + 1..to];
        if joined.iter().any(u8::is_ascii_alphabetic) {
            joined.iter_mut().for_each(|b| *b = leet(*b));
        }
    }

    /// One character after decomposition and lower-casing.
    fn push(&mut self, c: char) {
        if c.is_ascii() {
            let b = c as u8;
            if b.is_ascii_alphanumeric() || b == b'@' || b == b'$' {
                self.letter_or_digit(c, None);
            } else {
                self.separator(c);
            }
        } else if c.is_alphanumeric() || is_combining_mark(c) {
            // Marks are parts of letters: Indic vowel signs, kana voicing.
            self.letter_or_digit(c, confusable(c));
        } else {
            self.separator(c);
        }
    }

    /// Punctuation or white space: the end of a word, unless it is a
    /// hyphen or middle dot inside one (decided by what follows).
    fn separator(&mut self, c: char) {
        if self.word.active
            && !self.joiner
            && matches!(c, '-' | '·' | '\u{2010}'..='\u{2015}' | '\u{2212}')
        {
            self.joiner = true;
            return;
        }
        self.joiner = false;
        self.end_word();
    }

    /// A character of a text that is not plain ASCII, after compatibility
    /// decomposition: to the clean view as it is (look-alikes folded), to
    /// the words view in lower case.
    fn push_decomposed(&mut self, c: char) {
        if is_accent(c) {
            return;
        }
        if let Some(clean) = &mut self.clean {
            let folded = if c.is_ascii() {
                None
            } else {
                let mut lower = c.to_lowercase();
                confusable_capital(c).or(match (lower.next(), lower.next()) {
                    (Some(l), None) => confusable(l),
                    _ => None,
                })
            };
            clean.push(folded.map_or(c, char::from));
        }
        if c.is_ascii() {
            self.push(c.to_ascii_lowercase());
            return;
        }
        if let Some(b) = confusable_capital(c) {
            let lower = c.to_lowercase().next().unwrap_or(c);
            self.letter_or_digit(lower, Some(b));
            return;
        }
        for l in c.to_lowercase() {
            if !is_accent(l) {
                self.push(l);
            }
        }
    }

    /// A finished run of tag characters: a subdivision flag (the black
    /// flag, two to six tags of `a-z0-9`, a cancel tag: England, Scotland,
    /// Wales) is an emoji; anything else is smuggling, counted, and what
    /// it spells is kept to be scanned.
    fn tag_run(&mut self, tags: &mut Vec<char>, after_flag: bool) {
        if tags.is_empty() {
            return;
        }
        let spelled: String = tags
            .iter()
            .filter(|t| ('\u{E0020}'..='\u{E007E}').contains(*t))
            .map(|&t| char::from((t as u32 - 0xE0000) as u8))
            .collect();
        // The only subdivision flags emoji have: England, Scotland, Wales.
        let flag = after_flag
            && tags.last() == Some(&CANCEL_TAG)
            && matches!(spelled.as_str(), "gbeng" | "gbsct" | "gbwls");
        if !flag {
            self.tags += tags.len();
        }
        // What tags spell is read in every case.
        self.hidden.push_str(&spelled);
        self.hidden.push(' ');
        tags.clear();
    }

    /// Plain ASCII: a word at a time (one table look-up per byte, the word
    /// copied in lower case at once). Also notes base64 runs and escapes
    /// for the decoder.
    fn ascii(&mut self, text: &[u8]) -> Encoded {
        let mut encoded = Encoded::default();
        let mut run_start = 0;
        let mut i = 0;
        while i < text.len() {
            let b = text[i];
            if ASCII[usize::from(b & 0x7f)] == SEP {
                // Base64 wrapped at 76 columns: a line break inside a long
                // run does not end it.
                if b == b'\n'
                    && i - run_start >= 40
                    && text
                        .get(i + 1)
                        .is_some_and(|&n| ASCII[usize::from(n & 0x7f)] != SEP)
                {
                    self.end_word();
                    i += 1;
                    continue;
                }
                // `ig-nore`: a hyphen between two letters joins them.
                if b == b'-'
                    && self.word.active
                    && text
                        .get(i + 1)
                        .is_some_and(|&n| ASCII[usize::from(n & 0x7f)] != SEP)
                {
                    i += 1;
                    continue;
                }
                if matches!(b, b'=' | b'"' | b'\'' | b'+' | b'.') {
                    let mut j = i + 1;
                    while j < text.len() && matches!(text[j], b' ' | b'\t') {
                        j += 1;
                    }
                    if j < text.len() && matches!(text[j], b'"' | b'\'') {
                        if b == b'=' {
                            encoded.assignments += 1;
                        } else if !(matches!(b, b'"' | b'\'') && j == i + 1) {
                            encoded.joined_literals = true;
                        }
                    }
                }
                if !matches!(b, b'+' | b'/' | b'-' | b'_') {
                    if i - run_start >= 20 {
                        encoded.runs.push((run_start, i));
                    }
                    run_start = i + 1;
                    encoded.escapes |= matches!(b, b'%' | b'\\' | b'&');
                }
                self.end_word();
                i += 1;
                continue;
            }
            let start = i;
            let mut leet = 0;
            let mut leet_then_letter = false;
            while i < text.len() {
                match ASCII[usize::from(text[i] & 0x7f)] {
                    LETTER => leet_then_letter |= leet > 0,
                    LEET => leet += 1,
                    _ => break,
                }
                i += 1;
            }
            self.begin_word();
            let n = i - start;
            let w = &mut self.word;
            w.chars += n;
            w.letters += n - leet;
            w.latin += n - leet;
            w.leet += leet;
            w.leet_then_letter |= leet_then_letter;
            self.words
                .extend(text[start..i].iter().map(u8::to_ascii_lowercase));
        }
        if text.len() - run_start >= 20 {
            encoded.runs.push((run_start, text.len()));
        }
        encoded
    }
}

/// Fold `text` into its views.
pub fn fold(text: &str) -> Folded {
    let ascii = text.is_ascii();
    let mut f = Folder {
        words: Vec::with_capacity(text.len() + 2),
        clean: (!ascii).then(|| String::with_capacity(text.len())),
        hidden: String::new(),
        tags: 0,
        invisible: 0,
        word: Word::default(),
        hex_words: 0,
        spaced_hex: false,
        singles: (0, 0),
        shadow: String::new(),
        joiner: false,
    };
    let mut encoded = None;
    if ascii {
        encoded = Some(f.ascii(text.as_bytes()));
    } else {
        let mut previous = ' ';
        // A run of tag characters, and whether a black flag came before it.
        let mut tags: Vec<char> = Vec::new();
        let mut after_flag = false;
        for c in text.chars() {
            if TAGS.contains(&c) {
                if tags.is_empty() {
                    after_flag = previous == BLACK_FLAG;
                }
                tags.push(c);
                previous = c;
                continue;
            }
            f.tag_run(&mut tags, after_flag);
            previous = c;
            if is_invisible(c) {
                f.invisible += usize::from(is_suspicious_invisible(c));
                continue;
            }
            if c.is_ascii() {
                f.push_decomposed(c);
                continue;
            }
            if let Some(latin) = styled(c) {
                f.push_decomposed(latin);
                continue;
            }
            let mut parts = ['\0'; 4];
            let mut n = 0;
            decompose_compatible(c, |d| {
                if n < parts.len() {
                    parts[n] = d;
                }
                n += 1;
            });
            if n > parts.len() {
                f.push_decomposed(c);
            } else {
                for &d in &parts[..n] {
                    if !is_invisible(d) {
                        f.push_decomposed(d);
                    }
                }
            }
        }
        f.tag_run(&mut tags, after_flag);
    }
    f.end_word();
    let end = f.words.len();
    f.end_singles(end);
    f.words.push(b' ');
    if f.words.len() == 1 {
        f.words.push(b' ');
    }
    Folded {
        words: String::from_utf8(f.words).unwrap_or_else(|e| {
            // Unreachable: only whole characters are written.
            String::from_utf8_lossy(e.as_bytes()).into_owned()
        }),
        clean: f.clean,
        hidden: f.hidden,
        tags: f.tags,
        invisible: f.invisible,
        encoded: encoded.map(|e| Encoded {
            spaced_hex: f.spaced_hex,
            ..e
        }),
    }
}

/// A phrase as the automaton looks for it: folded like text, with a
/// leading space (a word start) unless it starts with a character of a
/// script written without spaces, and a trailing one unless it ends with
/// `*` (a word prefix) or with such a character.
pub fn phrase_pattern(phrase: &str) -> Option<String> {
    let (body, prefix) = match phrase.trim().strip_suffix('*') {
        Some(p) => (p, true),
        None => (phrase.trim(), false),
    };
    let folded = fold(body).words;
    let core = folded.trim();
    if core.is_empty() {
        return None;
    }
    let unspaced = |c: Option<char>| c.is_some_and(is_unspaced_script);
    let mut p = String::with_capacity(core.len() + 2);
    if !unspaced(core.chars().next()) {
        p.push(' ');
    }
    p.push_str(core);
    if !prefix && !unspaced(core.chars().last()) {
        p.push(' ');
    }
    Some(p)
}

/// Scripts written without spaces between words (Chinese, Japanese,
/// Thai, Lao, Khmer, Myanmar) and Korean, whose words take particles.
fn is_unspaced_script(c: char) -> bool {
    matches!(c,
        '\u{0E00}'..='\u{0EFF}' | '\u{1000}'..='\u{109F}' | '\u{1100}'..='\u{11FF}'
        | '\u{1780}'..='\u{17FF}' | '\u{3040}'..='\u{30FF}' | '\u{3130}'..='\u{318F}'
        | '\u{3400}'..='\u{4DBF}' | '\u{4E00}'..='\u{9FFF}' | '\u{AC00}'..='\u{D7AF}'
        | '\u{F900}'..='\u{FAFF}' | '\u{FF66}'..='\u{FF9F}')
}
