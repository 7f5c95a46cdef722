//! From findings to a score. Each rule and signal has a weight in (0, 1].
//! Within a category, weights combine with diminishing returns (noisy-or:
//! `1 - Π(1 - w)`), so three weak phrases about one thing are not three
//! times as damning as one; category scores combine the same way into the
//! text's score. A finding counts once per text however often it occurs.

use super::Category;
use serde::Deserialize;

/// `flag` and `block` thresholds on the score, in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub flag: f32,
    pub block: f32,
}

impl Thresholds {
    pub fn check(&self, what: &str, errors: &mut Vec<String>) {
        let ok = |v: f32| (0.0..=1.0).contains(&v);
        if !ok(self.flag) || !ok(self.block) || self.flag > self.block {
            errors.push(format!(
                "{what}: flag {} and block {} must be in [0, 1], flag ≤ block",
                self.flag, self.block
            ));
        }
    }
}

/// Which finding: a rule (its index) or a built-in signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Finding {
    Rule(usize),
    TagCharacters,
    InvisibleCharacters,
    EncodedPayload,
    DecodeLimit,
    AdversarialSuffix,
}

/// What one text scan found, deduplicated.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    found: Vec<(Finding, Category, f32)>,
}

impl Findings {
    pub fn add(&mut self, finding: Finding, category: Category, weight: f32) {
        if !self.found.iter().any(|(f, _, _)| *f == finding) {
            self.found.push((finding, category, weight));
        }
    }

    pub fn len(&self) -> usize {
        self.found.len()
    }

    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(Finding, Category, f32)> {
        self.found.iter()
    }

    /// Per category, its combined weight, highest first.
    pub fn categories(&self) -> Vec<(Category, f32)> {
        let mut by: Vec<(Category, f32)> = Vec::new();
        for &(_, category, weight) in &self.found {
            match by.iter_mut().find(|(c, _)| *c == category) {
                Some((_, miss)) => *miss *= 1.0 - weight,
                None => by.push((category, 1.0 - weight)),
            }
        }
        for (_, s) in &mut by {
            *s = 1.0 - *s;
        }
        by.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        by
    }

    /// The text's score.
    pub fn score(&self) -> f32 {
        1.0 - self
            .categories()
            .iter()
            .map(|(_, s)| 1.0 - s)
            .product::<f32>()
    }
}
