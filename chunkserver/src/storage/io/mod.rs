//! The disk engine: a small batched interface with two production implementations chosen at
//! start-up (`uring`: io_uring with O_DIRECT; `sync`: pread/pwrite/fdatasync on the calling thread)
//! and a crash-simulating in-memory one for tests.

mod aligned;
pub mod crash;
mod sync;
mod uring;

use std::io;
use std::path::Path;

pub use aligned::{AlignedBuf, ALIGN};
pub use crash::{CrashEngine, CrashPolicy, WriteBackCall};
pub use sync::SyncEngine;
pub use uring::UringEngine;

/// A file opened through an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// One operation of a batch. Within a batch, every `Sync` runs after all operations before it
/// have completed (a write → fdatasync chain); other operations may run concurrently.
pub enum IoOp<'a> {
    Write {
        file: FileId,
        offset: u64,
        buf: &'a [u8],
    },
    Read {
        file: FileId,
        offset: u64,
        buf: &'a mut [u8],
    },
    /// fdatasync.
    Sync {
        file: FileId,
    },
    /// Writes the file's dirty page-cache pages in `offset..offset + len` to the device and
    /// waits for them (`sync_file_range` with both waits). Not a durability point: no metadata
    /// and no device cache flush, so only a later `Sync` makes them durable. It bounds how
    /// much one later `Sync` submits at once (see `blocks::SyncWork`). Nothing to do for
    /// O_DIRECT writes.
    WriteBack {
        file: FileId,
        offset: u64,
        len: u64,
    },
}

/// `sync_file_range` flags of [`IoOp::WriteBack`]: wait for writeback already running in the
/// range, start it for every dirty page, wait for all of it.
const WRITE_BACK_FLAGS: u32 =
    libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;

/// Opening a file: `direct` asks for O_DIRECT (every buffer, offset and length of a `direct`
/// file must then be [`ALIGN`]-aligned).
#[derive(Clone, Copy, Debug)]
pub struct OpenMode {
    pub create: bool,
    pub direct: bool,
}

pub trait IoEngine: Send {
    fn name(&self) -> &'static str;
    fn open(&mut self, path: &Path, mode: OpenMode) -> io::Result<FileId>;
    fn close(&mut self, file: FileId);
    /// Size of the file in bytes.
    fn len(&mut self, file: FileId) -> io::Result<u64>;
    /// Reserves space up to `len` bytes (reads back as zeroes).
    fn allocate(&mut self, file: FileId, len: u64) -> io::Result<()>;
    /// Executes the batch; returns one result per operation (bytes moved; 0 for a sync).
    /// A short read or write is reported as is; callers treat it as an error.
    fn submit(&mut self, ops: &mut [IoOp<'_>]) -> Vec<io::Result<usize>>;
    /// Atomically replaces `to` by `from`, then makes the directory entry durable.
    fn rename_durable(&mut self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&mut self, path: &Path) -> io::Result<()>;
    /// Paths of the files directly inside `dir`.
    fn list_dir(&mut self, dir: &Path) -> io::Result<Vec<std::path::PathBuf>>;
}

/// Which engine to run (`--io-engine auto|uring|sync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Auto,
    Uring,
    Sync,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<EngineKind, String> {
        match s {
            "auto" => Ok(EngineKind::Auto),
            "uring" => Ok(EngineKind::Uring),
            "sync" => Ok(EngineKind::Sync),
            other => Err(format!("unknown io engine {other:?}: expected auto, uring or sync")),
        }
    }
}

/// Builds an engine. `Auto` takes io_uring and falls back to `sync` when the kernel refuses it
/// (EPERM under seccomp, ENOSYS on old kernels); `Uring` fails instead of falling back.
pub fn open_engine(kind: EngineKind) -> io::Result<Box<dyn IoEngine>> {
    match kind {
        EngineKind::Sync => Ok(Box::new(SyncEngine::new())),
        EngineKind::Uring => Ok(Box::new(UringEngine::new(256)?)),
        EngineKind::Auto => match UringEngine::new(256) {
            Ok(engine) => Ok(Box::new(engine)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOSYS) | Some(libc::EACCES)) => {
                Ok(Box::new(SyncEngine::new()))
            }
            Err(e) => Err(e),
        },
    }
}

/// Turns a batch result into an error unless every operation moved its full length.
pub fn check_batch(results: &[io::Result<usize>], expected: &[usize]) -> io::Result<()> {
    for (r, want) in results.iter().zip(expected) {
        match r {
            Ok(n) if n == want => {}
            Ok(n) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("short I/O: {n} of {want} bytes")))
            }
            Err(e) => {
                return Err(match e.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(e.kind(), e.to_string()),
                })
            }
        }
    }
    Ok(())
}
