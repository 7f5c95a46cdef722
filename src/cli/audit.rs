//! `portcullis audit verify`: check the hash chains of audit files, a
//! folder of them, or a Redis stream.

use crate::audit;
use std::path::Path;
use std::process::ExitCode;

/// `audit verify`: 0 intact, 1 broken, 2 could not be checked.
pub fn verify(target: &Path, key: Option<&Path>, redis: Option<&str>) -> ExitCode {
    let key = match key.map(audit::AuditKey::load).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let resumes = |r: &Option<String>| match r {
        Some(h) => format!(" (resumes from {h}: earlier records are not here)"),
        None => String::new(),
    };
    if let Some(url) = redis {
        let stream = target.to_string_lossy();
        return match audit::redis::verify_stream(url, &stream, key.as_ref()) {
            Ok(Ok(chains)) => {
                for c in &chains {
                    println!(
                        "{stream}: instance {}: {} records, chain intact{}",
                        c.instance,
                        c.records,
                        resumes(&c.resumes_from)
                    );
                }
                if chains.is_empty() {
                    println!("{stream}: no records (is it the right stream?)");
                    return ExitCode::FAILURE;
                }
                ExitCode::SUCCESS
            }
            Ok(Err(why)) => {
                println!("{stream}: chain broken: {why}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("{stream}: {e}");
                ExitCode::from(2)
            }
        };
    }
    let checked = if target.is_dir() {
        audit::verify::verify_dir(target, key.as_ref())
    } else {
        audit::verify::verify_file(target, key.as_ref()).map(|r| r.map(|i| vec![i]))
    };
    match checked {
        Ok(Ok(chains)) => {
            for c in &chains {
                let files = if c.files > 1 {
                    format!(" in {} files", c.files)
                } else {
                    String::new()
                };
                println!(
                    "{}: {} records{files}, chain intact{}",
                    c.name,
                    c.records,
                    resumes(&c.resumes_from)
                );
            }
            if chains.is_empty() {
                println!("{}: no audit files", target.display());
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Ok(Err(b)) => {
            println!(
                "{}: chain broken at line {}: {} ({} records verified before it)",
                b.file.display(),
                b.line,
                b.why,
                b.records
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{}: {e}", target.display());
            ExitCode::from(2)
        }
    }
}
