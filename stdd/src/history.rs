//! The last committed tables, kept beside the table file (`TABLE.history/vVERSION.toml`): what `stdctl rollback` puts back.
//!
//! Every table stdd installs as its running table (a commit, `PUT /table`)
//! is written here with the one it replaced; the [`KEPT`] newest versions
//! stay, older files are removed. Failover tables are derived, never
//! written. A table that cannot be written is logged; it never stops the
//! install.

use std::path::{Path, PathBuf};

use allocation::{file, AllocationTable};
use control::api::TableId;

/// How many committed tables a distributor keeps.
pub const KEPT: usize = 8;

/// The history directory of the table file `table`.
pub fn dir(table: &Path) -> PathBuf {
    let name = table
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "table".into());
    table.with_file_name(format!("{name}.history"))
}

fn path_of(table: &Path, version: u64) -> PathBuf {
    dir(table).join(format!("v{version}.toml"))
}

/// Writes `tables` into the history of `table` and prunes it to [`KEPT`];
/// the first error, as text.
pub fn record(table: &Path, tables: &[&AllocationTable]) -> Result<(), String> {
    let d = dir(table);
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    for t in tables {
        let p = path_of(table, t.version());
        file::save(&p, t).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let mut versions = versions(table);
    versions.sort_unstable_by(|a, b| b.cmp(a));
    for v in versions.into_iter().skip(KEPT) {
        let p = path_of(table, v);
        std::fs::remove_file(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// The versions in the history (any order).
fn versions(table: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir(table)) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix('v')?.strip_suffix(".toml")?.parse().ok()
        })
        .collect()
}

/// The tables in the history, newest first (a file that does not parse
/// is left out, with a warning).
pub fn list(table: &Path) -> Vec<TableId> {
    let mut v = versions(table);
    v.sort_unstable_by(|a, b| b.cmp(a));
    v.into_iter()
        .filter_map(|n| load(table, n).map(|t| TableId::of(&t)))
        .collect()
}

/// The table of `version` in the history, if kept and readable.
pub fn load(table: &Path, version: u64) -> Option<AllocationTable> {
    let p = path_of(table, version);
    if !p.exists() {
        return None;
    }
    match file::load(&p) {
        Ok(t) if t.version() == version => Some(t),
        Ok(t) => {
            log::warn!(
                "{}: holds version {}, not {version}: ignored",
                p.display(),
                t.version()
            );
            None
        }
        Err(e) => {
            log::warn!("{}: {e}: ignored", p.display());
            None
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use allocation::{HashKey, Profile};

    #[test]
    fn keeps_the_newest_tables_and_reads_them_back() {
        let d = std::env::temp_dir().join(format!("stdd-history-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        let file = d.join("table.toml");
        let t = testkit::table(1, HashKey::from_bytes([7; 16]), 3, Profile::Uniform);
        for v in 1..=10u64 {
            let prev = t.clone().with_version(v);
            let next = t.clone().with_version(v + 1);
            record(&file, &[&prev, &next]).expect("record");
        }
        let kept = list(&file);
        assert_eq!(
            kept.iter().map(|i| i.version).collect::<Vec<_>>(),
            (4..=11).rev().collect::<Vec<_>>()
        );
        assert_eq!(load(&file, 7), Some(t.clone().with_version(7)));
        assert_eq!(load(&file, 2), None, "pruned");
        // A file that is not the version its name says is not believed.
        std::fs::write(path_of(&file, 9), file::render(&t.clone().with_version(5))).expect("write");
        assert_eq!(load(&file, 9), None);
        assert!(list(&file).iter().all(|i| i.version != 9));
        let _ = std::fs::remove_dir_all(&d);
    }
}
