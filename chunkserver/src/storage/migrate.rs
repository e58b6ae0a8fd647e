//! Moving a chunk's own WAL of an earlier version (segments in the chunk's directory) into the
//! server's log, once, at start-up.

use std::path::Path;

use super::io::IoEngine;
use super::wal::{Recovery, Wal, WalOptions, WalRecord};
use super::Result;

/// Moves `chunk`'s own log in `dir`, if there is one, into `shared`: its recovered entries
/// follow a reset in one batch, then its segments are deleted. Returns what its recovery found
/// (the entries are now `chunk`'s log in `shared`), or `None` when `dir` holds no such log.
///
/// Crash safety: until the batch is durable the old log is untouched; a crash after it and
/// before the deletion moves the old log again at the next start, and the second move's reset
/// voids the first copy. Anything `shared` held for `chunk` before is voided the same way, so
/// the chunk's log after the move is exactly the old log's.
pub fn migrate(
    shared: &mut Wal,
    mut engine: Box<dyn IoEngine>,
    dir: &Path,
    chunk: u32,
    options: WalOptions,
) -> Result<Option<Recovery>> {
    if !Wal::exists(engine.as_mut(), dir, chunk as u64)? {
        return Ok(None);
    }
    let (old, recovery) = Wal::open(engine, dir, chunk as u64, options)?;
    let records = WalRecord::log_anew(recovery.entries.iter().cloned());
    shared.append_chunks(&[(chunk as u64, &records)])?;
    old.destroy()?;
    Ok(Some(recovery))
}
