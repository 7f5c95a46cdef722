use filters::injection::*;
use std::time::Instant;
fn main() {
    let policy: InjectionPolicy =
        serde_yaml::from_str(include_str!("../../policies/injection.yaml")).unwrap();
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(include_str!("../../policies/injection.yaml")).unwrap();
    let d = Detector::build(policy.clone()).unwrap();
    let prompt = "Please review the following function and suggest improvements. It reads a configuration file, validates the fields and returns a settings object; errors should be reported with the line number. Keep the public interface the same.\n\n```python\ndef load(path):\n    with open(path) as f:\n        data = yaml.safe_load(f)\n    if 'port' not in data:\n        raise ValueError('port is required')\n    return Settings(**data)\n```\n\nAlso: 1) should we cache the result? 2) how do I test the error path? 3) is there a simpler way to merge defaults with the user's values? Thanks, and ignore the typos in the docstring. ";
    let text: String = prompt.repeat(4096 / prompt.len() + 1)[..4096].to_string();
    let n = 3000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(normalise::fold(&text));
    }
    println!("fold {:?}", t.elapsed() / n);
    let f = normalise::fold(&text);
    // per-rule regex cost on words view
    let rules = yaml["rules"].as_sequence().unwrap();
    let mut costs = vec![];
    for r in rules {
        if let Some(re) = r["regex"].as_str() {
            let re = regex::Regex::new(&normalise::regex_source(re)).unwrap();
            let t = Instant::now();
            for _ in 0..200 {
                std::hint::black_box(re.is_match(&f.words));
            }
            costs.push((t.elapsed() / 200, r["id"].as_str().unwrap().to_string()));
        }
        if let Some(re) = r["raw_regex"].as_str() {
            let re = regex::RegexBuilder::new(re)
                .case_insensitive(true)
                .build()
                .unwrap();
            let t = Instant::now();
            for _ in 0..200 {
                std::hint::black_box(re.is_match(&text));
            }
            costs.push((
                t.elapsed() / 200,
                format!("raw {}", r["id"].as_str().unwrap()),
            ));
        }
    }
    costs.sort();
    costs.reverse();
    for c in costs.iter().take(12) {
        println!("{:?} {}", c.0, c.1);
    }
    let total: std::time::Duration = costs.iter().map(|c| c.0).sum();
    println!("sum of single regexes {:?}", total);
    let t = Instant::now();
    let mut b = 65536;
    for _ in 0..n {
        std::hint::black_box(decode::segments(&text, None, &mut b));
        b = 65536;
    }
    println!("segments {:?}", t.elapsed() / n);
    let s = policy.signals.adversarial_suffix.clone();
    let t = Instant::now();
    let mut acc = 0usize;
    for _ in 0..n {
        let b = std::hint::black_box(text.as_bytes());
        let mut v = vec![false; b.len()];
        for (i, &x) in b.iter().enumerate() {
            if x.is_ascii_whitespace() {
                v[i] = true;
                acc += 1;
            }
        }
        std::hint::black_box(&v);
    }
    println!("byte loop with vec {:?} {}", t.elapsed() / n, acc % 2);
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(suffix::found(&text, &s));
    }
    println!("suffix {:?}", t.elapsed() / n);
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(decode::joined_assignments(&text, &mut b));
    }
    println!("joined {:?}", t.elapsed() / n);
    let mut errors = vec![];
    let r = rules::Rules::build(policy.rules.clone(), &mut errors).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(r.words_automaton.find_overlapping_iter(&f.words).count());
    }
    println!(
        "ac {:?} ({} patterns)",
        t.elapsed() / n,
        r.words_automaton.patterns_len()
    );
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(r.words_automaton.find_iter(&f.words).count());
    }
    println!("ac non-overlapping {:?}", t.elapsed() / n);
    let ph: Vec<String> = policy
        .rules
        .iter()
        .flat_map(|r| {
            r.phrases
                .iter()
                .filter_map(|p| normalise::phrase_pattern(p))
        })
        .collect();
    let small = aho_corasick::AhoCorasick::builder()
        .kind(Some(aho_corasick::AhoCorasickKind::DFA))
        .build(&ph)
        .unwrap();
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(small.find_overlapping_iter(&f.words).count());
    }
    println!("ac phrases only ({}) {:?}", ph.len(), t.elapsed() / n);
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(r.raw_automaton.find_overlapping_iter(&text).count());
    }
    println!(
        "raw ac {:?} ({} patterns, {:?})",
        t.elapsed() / n,
        r.raw_automaton.patterns_len(),
        r.raw_automaton.kind()
    );
    println!("ungated {:?}", d.ungated());
    let t = Instant::now();
    let mut c = 0;
    for _ in 0..n {
        c += memchr_like(text.as_bytes());
    }
    println!("memchr-like scan for < [ ! {:?} {}", t.elapsed() / n, c % 2);
    let mut hits = std::collections::BTreeMap::new();
    for m in r.words_automaton.find_overlapping_iter(&f.words) {
        if let rules::Target::Words(i) = r.targets[m.pattern().as_usize()] {
            *hits.entry(r.specs[r.words[i].rule].id.clone()).or_insert(0) += 1;
        }
    }
    println!("gated words regexes that run: {:?}", hits);
    let mut lits = std::collections::BTreeMap::new();
    for m in r.words_automaton.find_overlapping_iter(&f.words) {
        if let rules::Target::Words(i) = r.targets[m.pattern().as_usize()] {
            lits.entry(r.specs[r.words[i].rule].id.clone())
                .or_insert_with(std::collections::BTreeSet::new)
                .insert(f.words[m.start()..m.end()].to_string());
        }
    }
    println!("literals: {:?}", lits);
    let mut per = std::collections::BTreeMap::new();
    let mut total = 0;
    for m in r.words_automaton.find_overlapping_iter(&f.words) {
        total += 1;
        *per.entry(f.words[m.start()..m.end()].to_string())
            .or_insert(0) += 1;
    }
    let mut v: Vec<_> = per.into_iter().collect();
    v.sort_by_key(|x| std::cmp::Reverse(x.1));
    println!("automaton matches {total}: {:?}", &v[..v.len().min(15)]);
    let mut who = std::collections::BTreeMap::new();
    for m in r.words_automaton.find_overlapping_iter(&f.words) {
        let lit = f.words[m.start()..m.end()].to_string();
        let id = match r.targets[m.pattern().as_usize()] {
            rules::Target::Words(i) => r.specs[r.words[i].rule].id.clone(),
            rules::Target::Raw(i) => format!("raw {}", r.specs[r.raw[i].rule].id),
            rules::Target::Phrase(i) => format!("phrase {}", r.specs[i].id),
        };
        who.entry(lit)
            .or_insert_with(std::collections::BTreeSet::new)
            .insert(id);
    }
    for (lit, ids) in &who {
        println!("  {lit:?}: {ids:?}");
    }
    let mut hits = std::collections::BTreeMap::new();
    for m in r.raw_automaton.find_overlapping_iter(&text) {
        *hits
            .entry(
                r.specs[r.raw[r.raw_targets[m.pattern().as_usize()]].rule]
                    .id
                    .clone(),
            )
            .or_insert(0) += 1;
    }
    println!("gated raw regexes that run: {:?}", hits);
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(d.scan(&text, Source::Direct));
    }
    println!("scan {:?}", t.elapsed() / n);
}
#[allow(dead_code)]
fn more() {}

fn memchr_like(b: &[u8]) -> usize {
    b.iter()
        .filter(|&&x| x == b'<' || x == b'[' || x == b'!')
        .count()
}
