//! Profiling aid: scan one 4 KiB prompt many times.
use filters::injection::*;
fn main() {
    let policy: InjectionPolicy =
        serde_yaml::from_str(include_str!("../../policies/injection.yaml")).unwrap();
    let d = Detector::build(policy).unwrap();
    let prompt = "Please review the following function and suggest improvements. It reads a configuration file, validates the fields and returns a settings object; errors should be reported with the line number. Keep the public interface the same.\n\n```python\ndef load(path):\n    with open(path) as f:\n        data = yaml.safe_load(f)\n    if 'port' not in data:\n        raise ValueError('port is required')\n    return Settings(**data)\n```\n\nAlso: 1) should we cache the result? 2) how do I test the error path? 3) is there a simpler way to merge defaults with the user's values? Thanks, and ignore the typos in the docstring. ";
    let text: String = prompt.repeat(4096 / prompt.len() + 1)[..4096].to_string();
    let n = 20000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(d.scan(&text, Source::Direct));
    }
    println!("scan {:?}", t.elapsed() / n);
}
