//! Files that hold a secret (a table file holds the cluster's hash key): the check that they are not readable by every user.

use std::path::Path;

/// The one-line problem when `path`, holding `what`, is readable by every
/// user; `None` when it is not (or cannot be read at all: the caller's
/// own load names that).
pub fn readable_by_all(path: &Path, what: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o004 != 0).then(|| {
        format!(
            "{}: readable by every user (mode {mode:o}) and it holds {what}: chmod o-r",
            path.display()
        )
    })
}

#[cfg(test)]
mod test {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_a_file_others_may_read_is_a_problem() {
        let p = std::env::temp_dir().join(format!("secret-mode-{}", std::process::id()));
        std::fs::write(&p, "k").expect("write");
        for (mode, problem) in [(0o600, false), (0o640, false), (0o644, true), (0o604, true)] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let said = readable_by_all(&p, "the hash key");
            assert_eq!(said.is_some(), problem, "{mode:o}");
            if let Some(s) = said {
                assert!(
                    s.contains(&format!("mode {mode:o}")) && s.contains("the hash key"),
                    "{s}"
                );
            }
        }
        let _ = std::fs::remove_file(&p);
        assert!(
            readable_by_all(&p, "x").is_none(),
            "a missing file is the loader's to name"
        );
    }
}
