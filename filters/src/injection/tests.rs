use super::*;

fn detector() -> Detector {
    let policy: InjectionPolicy =
        serde_yaml::from_str(include_str!("../../../policies/injection.yaml")).unwrap();
    Detector::build(policy).unwrap()
}

#[test]
fn the_shipped_policy_compiles_and_every_example_is_found_by_its_rule() {
    let d = detector();
    let mut wrong = Vec::new();
    for rule in d.rules() {
        if rule.examples.is_empty() {
            wrong.push(format!("{}: no example", rule.id));
        }
        let source = if rule.scope == Scope::Tool {
            Source::Tool
        } else {
            Source::Direct
        };
        for e in &rule.examples {
            let scan = d.scan(e, source);
            if !scan.findings.contains(&rule.id) {
                wrong.push(format!("{}: {e:?} -> {:?}", rule.id, scan.findings));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
