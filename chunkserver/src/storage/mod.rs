//! Durable storage of one chunk replica: the [`wal::Wal`] (log entries, group commit), the
//! [`blocks::BlockStore`] (4 KiB blocks with per-block checksums) and the [`meta`] files
//! (hard state and checkpoint), all on an [`io::IoEngine`].
//!
//! Failure policy: an error from `fdatasync` (or any write) is fatal for the replica
//! ([`StorageError::Fatal`]): after a failed sync the kernel may have dropped the dirty pages,
//! so retrying could report durability that does not exist. The replica stops and recovers
//! from its WAL and its peers on restart.

pub mod blocks;
pub mod io;
pub mod meta;
pub mod wal;

use std::fmt;

/// Errors of the storage layer.
#[derive(Debug)]
pub enum StorageError {
    /// The disk failed (EIO, ENOSPC on a preallocated file, a failed sync). Fail-stop.
    Fatal(std::io::Error),
    /// Stored bytes failed their checksum. Never served; the protocol repairs from a peer.
    Corrupt { what: String },
    /// A caller passed a request the store cannot execute (misaligned, out of range).
    Invalid(String),
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Fatal(e) => write!(f, "disk failure (replica must stop): {e}"),
            StorageError::Corrupt { what } => write!(f, "checksum mismatch: {what}"),
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
