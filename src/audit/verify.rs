//! `portcullis audit verify`: one file, or a folder of rotated files with
//! the chain checked across them.

use super::chain::{check_line, AuditKey, GENESIS};
use super::file::chain_of;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// Where a chain breaks.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    pub file: PathBuf,
    /// 1-based line of `file`.
    pub line: usize,
    pub why: String,
    /// Records verified before the break, in this chain.
    pub records: usize,
}

/// A file or a chain of files that verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Intact {
    /// The active file's name (for a folder), or the file.
    pub name: String,
    pub files: usize,
    pub records: usize,
    /// The first record continues from this hash rather than the genesis
    /// hash: an earlier file is not part of what was checked.
    pub resumes_from: Option<String>,
    pub last_hash: Option<String>,
}

/// Check one file. Its first record may continue a chain from an earlier
/// file (`resumes_from` says so); every later one must follow the one
/// before it.
pub fn verify_file(path: &Path, key: Option<&AuditKey>) -> std::io::Result<Result<Intact, Broken>> {
    let mut intact = Intact {
        name: path.display().to_string(),
        files: 1,
        records: 0,
        resumes_from: None,
        last_hash: None,
    };
    Ok(check_file(path, key, &mut intact).map(|()| intact))
}

fn check_file(path: &Path, key: Option<&AuditKey>, into: &mut Intact) -> Result<(), Broken> {
    let broken = |line: usize, why: String, records: usize| Broken {
        file: path.to_path_buf(),
        line,
        why,
        records,
    };
    let file =
        File::open(path).map_err(|e| broken(0, format!("cannot open: {e}"), into.records))?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| broken(line_no, format!("unreadable: {e}"), into.records))?;
        let checked = check_line(&line, key).map_err(|why| broken(line_no, why, into.records))?;
        match &into.last_hash {
            None => {
                if checked.prev_hash != GENESIS {
                    into.resumes_from = Some(checked.prev_hash.clone());
                }
            }
            Some(last) if *last != checked.prev_hash => {
                let why = if line_no == 1 {
                    "prev_hash does not match the last record of the file before (a file or records were removed, or the order is wrong)"
                } else {
                    "prev_hash does not match the line before (a line was deleted, inserted or moved)"
                };
                return Err(broken(line_no, why.into(), into.records));
            }
            Some(_) => {}
        }
        into.last_hash = Some(checked.hash);
        into.records += 1;
    }
    Ok(())
}

/// Check every chain in a folder: the rotated files of each active file in
/// order of their names, then the active file, linked across files.
pub fn verify_dir(
    dir: &Path,
    key: Option<&AuditKey>,
) -> std::io::Result<Result<Vec<Intact>, Broken>> {
    let mut chains: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if let Some(chain) = chain_of(&name) {
            chains.entry(chain).or_default().push(entry.path());
        }
    }
    let mut out = Vec::new();
    for (name, mut files) in chains {
        // Rotated files sort by their time stamps; the active file last.
        files.sort_by_key(|f| {
            (
                f.file_name().and_then(|n| n.to_str()) == Some(name.as_str()),
                f.clone(),
            )
        });
        let mut intact = Intact {
            name,
            files: files.len(),
            records: 0,
            resumes_from: None,
            last_hash: None,
        };
        for f in &files {
            if let Err(b) = check_file(f, key, &mut intact) {
                return Ok(Err(b));
            }
        }
        out.push(intact);
    }
    Ok(Ok(out))
}
