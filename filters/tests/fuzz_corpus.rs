//! The fuzz targets on the stable toolchain: every committed corpus entry
//! of `fuzz/corpus/TARGET/` is replayed, then a short run of mutations of
//! them (a fixed seed, so a failure reproduces). The long runs use
//! libFuzzer (`cargo +nightly fuzz run TARGET`, see the README).

#[path = "../../fuzz/src/lib.rs"]
mod targets;

use std::path::Path;

/// Mutations tried per target on top of the corpus.
const MUTATIONS: usize = 3_000;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    let inputs: Vec<Vec<u8>> = entries.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!inputs.is_empty(), "no corpus for {target}");
    inputs
}

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A corpus entry with a few bytes flipped, inserted, removed, or copied
/// from another entry.
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut v = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.remove(i);
            }
            3 => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = (a + rng.below(64)).min(other.len());
                    let at = rng.below(v.len() + 1);
                    v.splice(at..at, other[a..b].iter().copied());
                }
            }
            _ => {
                let i = rng.below(v.len() + 1);
                const PUNCTUATION: &[u8] = b"{}[]\":,\n\r-=ABCxyz09 \\";
                v.insert(i, PUNCTUATION[rng.below(PUNCTUATION.len())]);
            }
        }
    }
    v
}

fn run(target: &str, f: fn(&[u8])) {
    let corpus = corpus(target);
    for input in &corpus {
        f(input);
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ target.len() as u64);
    for _ in 0..MUTATIONS {
        f(&mutate(&mut rng, &corpus));
    }
}

#[test]
fn intake() {
    run("intake", targets::intake);
}

#[test]
fn sse_framer() {
    run("sse_framer", targets::sse_framer);
}

#[test]
fn stream_redactor() {
    run("stream_redactor", targets::stream_redactor);
}

#[test]
fn jwt() {
    run("jwt", targets::jwt);
}

#[test]
fn policy() {
    run("policy", targets::policy);
}

#[test]
fn injection() {
    run("injection", targets::injection);
}

/// The property of `stream_redactor` means something only if the shipped
/// rules find each planted secret on its own.
#[test]
fn planted_secrets_are_found_by_the_shipped_rules() {
    for secret in targets::PLANTED {
        let (out, counts) = targets::redactor().redact(&format!("x {secret} y"));
        assert!(
            !out.contains(secret) && !counts.is_empty(),
            "{secret}: {out}"
        );
    }
}
