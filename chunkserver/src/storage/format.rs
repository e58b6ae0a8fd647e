//! The on-disk format version of a server's data directory, in its `format` file.
//!
//! Why: a data directory must never be opened by a chunk server that misreads it. Since
//! version 2 the WAL recycles pruned segments, whose old records stay on disk behind the new
//! ones; a server that does not know the segment tags of version 2 would replay those old
//! records as if they were new (wrong data, silently). Such a server cannot be stopped after
//! the fact (it predates this file), but every server from now on refuses a directory whose
//! format is newer than it knows, with a clear error, instead of guessing.
//!
//! Contract: [`check_and_stamp`] runs before anything else touches the directory at start-up.
//! A directory with no `format` file is either new or written before the file existed
//! (version 1: untagged WAL records, which version 2 reads as they are); both are opened and
//! stamped with [`FORMAT_VERSION`]. The stamp is durable (written to a temporary file,
//! synced, renamed, the directory synced) before the caller writes anything in the new
//! format.

use std::path::Path;

/// The format this build writes, and the newest it reads. Bump it whenever a server of the
/// previous version would misread what this one writes, and say here what changed:
/// - 1: (no `format` file) records of the WAL carry no segment tag.
/// - 2: WAL records carry their segment's tag; pruned segments are recycled.
pub const FORMAT_VERSION: u32 = 2;

/// The file in a server's data directory that holds its format version.
pub const FORMAT_FILE: &str = "format";

/// Checks that this build can read `dir` and records that it is now in this build's format.
/// Errors are phrased for the operator (the directory, the versions, what to do).
pub fn check_and_stamp(dir: &Path) -> Result<(), String> {
    if check(dir)? == Some(FORMAT_VERSION) {
        return Ok(());
    }
    stamp(dir).map_err(|e| format!("cannot record the data format in {}: {e}", dir.join(FORMAT_FILE).display()))
}

/// Checks, without writing anything, that this build can read `dir` (a launcher does so
/// before starting servers on it): the version found, `None` for no `format` file.
pub fn check(dir: &Path) -> Result<Option<u32>, String> {
    let path = dir.join(FORMAT_FILE);
    let found = match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text).ok_or_else(|| {
            format!("{} does not hold a format version (found {:?}); it is not a chunk server's", path.display(), text)
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    if found > FORMAT_VERSION {
        return Err(format!(
            "{} is in data format {found}, newer than this chunkserver reads (up to {FORMAT_VERSION}); \
             run the chunkserver that wrote it, or a newer one",
            dir.display()
        ));
    }
    Ok(Some(found))
}

/// The version a `format` file holds: one decimal number, one line.
fn parse(text: &str) -> Option<u32> {
    let line = text.strip_suffix('\n').unwrap_or(text);
    if line.is_empty() || !line.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    line.parse().ok().filter(|v| *v >= 1)
}

fn stamp(dir: &Path) -> std::io::Result<()> {
    super::write_durable(dir, FORMAT_FILE, &format!("{FORMAT_VERSION}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &Path) -> String {
        std::fs::read_to_string(dir.join(FORMAT_FILE)).unwrap()
    }

    #[test]
    fn a_new_or_older_directory_is_stamped_with_this_version() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check(dir.path()), Ok(None));
        assert!(!dir.path().join(FORMAT_FILE).exists(), "check writes nothing");
        check_and_stamp(dir.path()).unwrap();
        assert_eq!(read(dir.path()), format!("{FORMAT_VERSION}\n"));
        assert_eq!(check(dir.path()), Ok(Some(FORMAT_VERSION)));
        // Opening it again changes nothing.
        check_and_stamp(dir.path()).unwrap();
        assert_eq!(read(dir.path()), format!("{FORMAT_VERSION}\n"));
        assert!(!dir.path().join("format.tmp").exists());
        // Written by an older version that already had the file: upgraded.
        std::fs::write(dir.path().join(FORMAT_FILE), "1\n").unwrap();
        check_and_stamp(dir.path()).unwrap();
        assert_eq!(read(dir.path()), format!("{FORMAT_VERSION}\n"));
    }

    #[test]
    fn a_newer_format_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let newer = FORMAT_VERSION + 1;
        std::fs::write(dir.path().join(FORMAT_FILE), format!("{newer}\n")).unwrap();
        let e = check_and_stamp(dir.path()).unwrap_err();
        assert!(e.contains(&format!("data format {newer}")) && e.contains(&format!("up to {FORMAT_VERSION}")), "{e}");
        assert_eq!(check(dir.path()).unwrap_err(), e);
        assert_eq!(read(dir.path()), format!("{newer}\n"));
    }

    #[test]
    fn a_file_without_a_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "\n", "two\n", "2 \n", "-1\n", "0\n", "2\n3\n", "99999999999\n"] {
            std::fs::write(dir.path().join(FORMAT_FILE), bad).unwrap();
            let e = check_and_stamp(dir.path()).unwrap_err();
            assert!(e.contains("does not hold a format version"), "{bad:?}: {e}");
            assert_eq!(read(dir.path()), bad, "a refused file is left as it is");
        }
        assert_eq!(parse("2\n"), Some(2));
        assert_eq!(parse("2"), Some(2));
    }
}
