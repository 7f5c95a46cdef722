//! The Docker image never holds a signing key (issue 8, item 10): the
//! build context (the repository after `.dockerignore`) and what the final
//! stage's `COPY` lines take are computed here, over the working tree plus
//! planted key files, without a Docker engine.

use std::path::{Path, PathBuf};

/// One `.dockerignore` line: a path pattern, or an exception (`!`).
struct Rule {
    segments: Vec<String>,
    exception: bool,
}

fn rules(text: &str) -> Vec<Rule> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (exception, pattern) = match l.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, l),
            };
            Rule {
                segments: pattern
                    .trim_start_matches('/')
                    .trim_end_matches('/')
                    .split('/')
                    .filter(|s| !s.is_empty() && *s != ".")
                    .map(str::to_string)
                    .collect(),
                exception,
            }
        })
        .collect()
}

/// Go's `filepath.Match` for one segment: `*`, `?` and literals.
fn segment_matches(pattern: &[char], name: &[char]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some('*'), _) => {
            segment_matches(&pattern[1..], name)
                || (!name.is_empty() && segment_matches(pattern, &name[1..]))
        }
        (Some('?'), Some(_)) => segment_matches(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => segment_matches(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// A pattern against whole paths; `**` stands for any number of segments.
fn path_matches(pattern: &[String], path: &[&str]) -> bool {
    match pattern.first() {
        None => path.is_empty(),
        Some(p) if p == "**" => (0..=path.len()).any(|i| path_matches(&pattern[1..], &path[i..])),
        Some(p) => {
            !path.is_empty()
                && segment_matches(
                    &p.chars().collect::<Vec<_>>(),
                    &path[0].chars().collect::<Vec<_>>(),
                )
                && path_matches(&pattern[1..], &path[1..])
        }
    }
}

/// Docker's rule: the last matching line decides, and a line that matches
/// a parent folder matches everything below it.
fn ignored(rules: &[Rule], path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let mut out = false;
    for r in rules {
        let hit = (1..=parts.len()).any(|n| path_matches(&r.segments, &parts[..n]));
        if hit {
            out = !r.exception;
        }
    }
    out
}

/// Every file below `root`, as relative paths with `/`.
fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in entries.flatten() {
            let rel = rel.join(e.file_name());
            let name = rel.to_string_lossy().replace('\\', "/");
            // Large folders the build context never holds: not walked.
            if matches!(name.as_str(), "target" | ".git" | ".venv" | "var") {
                continue;
            }
            if e.path().is_dir() {
                dirs.push(rel);
            } else {
                out.push(name);
            }
        }
    }
    out
}

/// `(stage index, sources)` of every `COPY` without `--from`.
fn context_copies(dockerfile: &str) -> Vec<(usize, Vec<String>)> {
    let mut stage = 0;
    let mut out = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("FROM ") {
            stage += 1;
        }
        if !upper.starts_with("COPY ") && !upper.starts_with("ADD ") {
            continue;
        }
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        if args.iter().any(|a| a.starts_with("--from")) {
            continue;
        }
        let paths: Vec<&str> = args
            .iter()
            .copied()
            .filter(|a| !a.starts_with("--"))
            .collect();
        if let Some((_, sources)) = paths.split_last() {
            out.push((stage, sources.iter().map(|s| s.to_string()).collect()));
        }
    }
    out
}

fn is_secret(path: &str) -> bool {
    path.starts_with("keys/private/")
        || path.contains("/private/")
        || path.ends_with(".key")
        || path == "keys/dev.pem"
}

#[test]
fn no_signing_key_reaches_the_build_context_or_the_image() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = rules(&std::fs::read_to_string(root.join(".dockerignore")).unwrap());
    let mut all = files(root);
    // What `portcullis keys generate` and `demo` write, and other key files
    // an operator might leave in the tree.
    for planted in [
        "keys/private/dev.key",
        "keys/dev.pem",
        "keys/dev.key",
        "keys/private/other.pem",
        "keys/idp.pem",
        "config/private/tls.pem",
        "config/server.key",
    ] {
        all.push(planted.to_string());
    }
    let context: Vec<&String> = all.iter().filter(|p| !ignored(&rules, p)).collect();
    assert!(
        context.iter().any(|p| p.as_str() == "Cargo.toml"),
        "the context holds the sources"
    );
    let leaked: Vec<&&String> = context
        .iter()
        .filter(|p| is_secret(p) || p.starts_with("keys/") && p.as_str() != "keys/README.md")
        .collect();
    assert!(leaked.is_empty(), "in the build context: {leaked:?}");

    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let copies = context_copies(&dockerfile);
    let last = copies.iter().map(|(s, _)| *s).max().unwrap_or(0);
    for (stage, sources) in &copies {
        let taken: Vec<&&String> = context
            .iter()
            .filter(|p| {
                sources.iter().any(|s| {
                    let s = s.trim_start_matches("./").trim_end_matches('/');
                    s == "." || p.as_str() == s || p.starts_with(&format!("{s}/"))
                })
            })
            .collect();
        assert!(!taken.is_empty(), "COPY {sources:?} takes nothing");
        if *stage == last {
            let keys: Vec<&&&String> = taken.iter().filter(|p| p.starts_with("keys/")).collect();
            assert!(keys.is_empty(), "the runtime image copies {keys:?}");
        }
        let secrets: Vec<&&&String> = taken.iter().filter(|p| is_secret(p)).collect();
        assert!(secrets.is_empty(), "stage {stage} copies {secrets:?}");
    }
}

#[test]
fn dockerignore_matching_follows_docker() {
    let r = rules("target\nkeys/*\n!keys/README.md\n**/*.key\n**/private\n");
    for (path, expect) in [
        ("target/debug/x", true),
        ("keys/dev.pem", true),
        ("keys/README.md", false),
        ("src/a.key", true),
        ("a/b/c/private/x.pem", true),
        ("private/x", true),
        ("src/main.rs", false),
        ("keysx/a", false),
    ] {
        assert_eq!(ignored(&r, path), expect, "{path}");
    }
    // Without the key lines, the planted files would be in the context:
    // the check above can fail.
    let weak = rules("target\n");
    assert!(!ignored(&weak, "keys/private/dev.key"));
}
