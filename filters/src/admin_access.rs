//! Who may use the admin API: an admin role to change things, an admin
//! or auditor role to read. (Frozen callers are refused by
//! `model_registry::frozen`, admins included.)

use crate::{ErrorCode, Rejection};

/// Whether `roles` may make a call that `writes` (or only reads).
pub fn check(
    roles: &[String],
    admin_role: &str,
    auditor_role: &str,
    writes: bool,
) -> Result<(), Rejection> {
    let has = |r: &str| roles.iter().any(|x| x == r);
    if has(admin_role) || (!writes && has(auditor_role)) {
        return Ok(());
    }
    let need = if writes { "admin" } else { "admin or auditor" };
    Err(Rejection::new(
        ErrorCode::Forbidden,
        format!("{need} role required; caller has {roles:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admins_write_auditors_read_others_neither() {
        let roles = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let check = |r: &[&str], writes| check(&roles(r), "adm", "aud", writes);
        assert!(check(&["adm"], true).is_ok());
        assert!(check(&["adm"], false).is_ok());
        assert!(check(&["user", "aud"], false).is_ok());
        let e = check(&["aud"], true).unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(e.reason.contains("admin role required"), "{}", e.reason);
        assert!(check(&["user"], false).is_err());
        assert!(check(&[], false).is_err());
        // A role named like another is not it.
        assert!(check(&["admin", "ad"], true).is_err());
    }
}
