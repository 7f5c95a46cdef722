//! State kept outside a request: the model registry and freeze lists (a
//! file, or Redis for several instances: [`registry`]), rate-limit state
//! in Redis ([`redis_limits`]; in-process state is in `filters`), approvals
//! of held tool calls (a state folder, or Redis: [`approvals`]), and the
//! JWT verification keys with their JWKS refresh ([`keys`]).

pub mod approvals;
pub mod keys;
pub mod redis_conn;
pub mod redis_limits;
pub mod registry;

use std::path::Path;

/// Replace a file's contents so that a crash leaves the old or the new
/// file, never a part: a temporary file beside it, fsync, rename, fsync of
/// the folder. Errors name the file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    let mut f = std::fs::File::create(&tmp).map_err(fail)?;
    f.write_all(bytes).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(fail)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)
}
