//! Durable storage of a server's chunk replicas: the [`wal::Wal`] (log entries of every chunk,
//! group commit), per replica the [`blocks::BlockStore`] (4 KiB blocks with per-block
//! checksums) and the [`meta`] files (hard state and checkpoint), all on an [`io::IoEngine`].
//! The data directory's [`format`] version keeps a build from opening what it would misread.
//!
//! Failure policy: an error from `fdatasync` (or any write) is fatal for the replica
//! ([`StorageError::Fatal`]): after a failed sync the kernel may have dropped the dirty pages,
//! so retrying could report durability that does not exist. The replica stops and recovers
//! from its WAL and its peers on restart.

pub mod blocks;
pub mod format;
pub mod io;
pub mod meta;
pub mod migrate;
pub mod wal;
pub mod writeback;

use std::fmt;
use std::io::Write;
use std::path::Path;

use parallelraft::Index;

/// A block whose data failed its checksum, or whose metadata slot was damaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadBlock {
    pub block: u64,
    /// The version the metadata records (the index of the entry that last wrote the block);
    /// `None` when the metadata itself was damaged and the version is unknown.
    pub version: Option<Index>,
}

/// Errors of the storage layer.
#[derive(Debug)]
pub enum StorageError {
    /// The disk failed (EIO, ENOSPC on a preallocated file, a failed sync). Fail-stop.
    Fatal(std::io::Error),
    /// Stored bytes failed their checksum. Never served.
    Corrupt { what: String },
    /// Blocks of the block store failed their checksum (every bad block of the request is
    /// listed). Never served; the server repairs them from a peer (see `server::repair`).
    BadBlocks(Vec<BadBlock>),
    /// A caller passed a request the store cannot execute (misaligned, out of range).
    Invalid(String),
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Fatal(e) => write!(f, "disk failure (replica must stop): {e}"),
            StorageError::Corrupt { what } => write!(f, "checksum mismatch: {what}"),
            StorageError::BadBlocks(blocks) => {
                write!(f, "checksum mismatch in block")?;
                for (k, b) in blocks.iter().enumerate() {
                    let sep = if k == 0 { " " } else { ", " };
                    match b.version {
                        Some(v) => write!(f, "{sep}{} (version {})", b.block, v.0)?,
                        None => write!(f, "{sep}{} (metadata lost)", b.block)?,
                    }
                }
                Ok(())
            }
            StorageError::Invalid(why) => write!(f, "invalid storage request: {why}"),
        }
    }
}

impl std::error::Error for StorageError {}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> StorageError {
        StorageError::Fatal(e)
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// Fsyncs a directory: the names created, renamed or removed in it so far are durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes a small file durably and whole: a temporary file, fsync, rename over `name`, fsync
/// of the directory. A crash leaves the old content or the new one, never a part.
pub fn write_durable(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    fsync_dir(dir)
}
