//! The transition marker beside the table file (`TABLE.transition`): the table a distributor is switched to, so one restarted mid-transition knows which flows it can no longer place.
//!
//! A switch writes the marker before the new plan steers anything; a
//! commit (after the table file is saved), an abort or a table installed
//! outright removes it. At start, a marker naming another table than the
//! table file means stdd stopped while switched: it steers by the table
//! file, but drops every flow the two tables steer to different TMs
//! (`recovering`, counted) until the coordinator switches and opens it
//! again with the TMs' pins, commits or aborts (docs/operations.md).

use std::path::{Path, PathBuf};

use allocation::{file, AllocationTable};
use control::api::TableId;

/// The marker of the table file `table`.
pub fn path(table: &Path) -> PathBuf {
    let name = table
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "table".into());
    table.with_file_name(format!("{name}.transition"))
}

/// Records that the distributor whose table file is `table` is switched
/// to `switched`; the error as text.
pub fn write(table: &Path, switched: &AllocationTable) -> Result<(), String> {
    let p = path(table);
    file::save(&p, switched).map_err(|e| format!("{}: {e}", p.display()))
}

/// Removes the marker (no marker: nothing to do); the error as text.
pub fn clear(table: &Path) -> Result<(), String> {
    let p = path(table);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

/// Removes the marker, logging a failure (`what` did it).
pub fn clear_logged(table: &Path, what: &str) {
    if let Err(e) = clear(table) {
        log::error!(
            "{what}: the transition marker could not be removed ({e}): a restart would drop the flows of the finished transition's moved buckets until the next push"
        );
    }
}

/// At start: the table the distributor was switched to when it stopped,
/// if it stopped mid-transition (`committed` is its table file's table).
/// A marker for the committed table itself (stopped between saving the
/// table file and removing the marker) is removed. A marker that cannot
/// be read is an error: without it the moved buckets cannot be told.
pub fn at_start(
    table: &Path,
    committed: &AllocationTable,
) -> Result<Option<AllocationTable>, String> {
    let p = path(table);
    let switched = match file::load(&p) {
        Ok(t) => t,
        Err(allocation::FileError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => {
            return Err(format!(
                "the transition marker {} cannot be read ({e}): stdd stopped mid-transition and cannot tell which buckets were moving; remove the file to start on {} alone (flows that started on a new owner during that transition may break)",
                p.display(),
                table.display()
            ))
        }
    };
    if TableId::of(&switched) == TableId::of(committed) {
        clear(table)?;
        return Ok(None);
    }
    Ok(Some(switched))
}
