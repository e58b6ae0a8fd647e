//! pread/pwrite/fdatasync engine: the fallback where io_uring is unavailable.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::{FileId, IoEngine, IoOp, OpenMode};

/// Runs batches with positional syscalls, one operation after another on the calling thread.
/// It used to split a run of four or more operations across a scoped thread; the block store
/// submits a 128 KiB apply as eight 16 KiB writes, so every large write spawned and joined a
/// thread (~3,000 threads in 5 s of 128 KiB sequential writes at iodepth 16, 2.6 ms of cluster
/// CPU per write). Buffered writes are memory copies and the WAL submits one write per segment,
/// so a second thread had nothing to overlap on two cores.
pub struct SyncEngine {
    files: FileTable,
}

impl Default for SyncEngine {
    fn default() -> Self {
        SyncEngine::new()
    }
}

impl SyncEngine {
    pub fn new() -> SyncEngine {
        SyncEngine { files: FileTable::default() }
    }
}

/// The open files of an engine, by id: the part both production engines share.
#[derive(Default)]
pub(super) struct FileTable {
    files: HashMap<FileId, File>,
    next: u32,
}

impl FileTable {
    pub(super) fn open(&mut self, path: &Path, mode: OpenMode) -> io::Result<FileId> {
        let f = open_file(path, mode)?;
        self.next += 1;
        let id = FileId(self.next);
        self.files.insert(id, f);
        Ok(id)
    }

    pub(super) fn close(&mut self, id: FileId) {
        self.files.remove(&id);
    }

    pub(super) fn get(&self, id: FileId) -> io::Result<&File> {
        self.files.get(&id).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "unknown file id"))
    }

    pub(super) fn len(&self, id: FileId) -> io::Result<u64> {
        Ok(self.get(id)?.metadata()?.len())
    }

    pub(super) fn allocate(&self, id: FileId, len: u64) -> io::Result<()> {
        fallocate(self.get(id)?, len)
    }
}

/// Opens `path`, with O_DIRECT when asked and supported (tmpfs refuses it with EINVAL, and
/// then the page cache is used; fdatasync keeps durability either way).
pub(super) fn open_file(path: &Path, mode: OpenMode) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(mode.create);
    if mode.direct {
        let mut direct = options.clone();
        direct.custom_flags(libc::O_DIRECT);
        match direct.open(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    options.open(path)
}

pub(super) fn fallocate(file: &File, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // No fallocate (some tmpfs versions): extend instead; reads still return zeroes.
        if file.metadata()?.len() < len {
            file.set_len(len)?;
        }
        return Ok(());
    }
    Err(e)
}

pub(super) fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    let dir = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    crate::storage::fsync_dir(dir)
}

pub(super) fn list_dir(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        out.push(entry?.path());
    }
    Ok(out)
}

fn run_one(files: &FileTable, op: &mut IoOp<'_>) -> io::Result<usize> {
    match op {
        IoOp::Write { file, offset, buf } => files.get(*file)?.write_at(buf, *offset),
        IoOp::Read { file, offset, buf } => files.get(*file)?.read_at(buf, *offset),
        IoOp::Sync { file } => files.get(*file)?.sync_data().map(|_| 0),
        IoOp::WriteBack { file, offset, len } => {
            let fd = files.get(*file)?.as_raw_fd();
            // SAFETY: plain syscall on an open descriptor.
            let rc = unsafe {
                libc::sync_file_range(fd, *offset as libc::off64_t, *len as libc::off64_t, super::WRITE_BACK_FLAGS)
            };
            if rc == 0 {
                Ok(0)
            } else {
                Err(io::Error::last_os_error())
            }
        }
    }
}

impl IoEngine for SyncEngine {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn open(&mut self, path: &Path, mode: OpenMode) -> io::Result<FileId> {
        self.files.open(path, mode)
    }

    fn close(&mut self, file: FileId) {
        self.files.close(file);
    }

    fn len(&mut self, file: FileId) -> io::Result<u64> {
        self.files.len(file)
    }

    fn allocate(&mut self, file: FileId, len: u64) -> io::Result<()> {
        self.files.allocate(file, len)
    }

    fn submit(&mut self, ops: &mut [IoOp<'_>]) -> Vec<io::Result<usize>> {
        // In order: a sync runs after every operation before it has completed.
        let files = &self.files;
        ops.iter_mut().map(|op| run_one(files, op)).collect()
    }

    fn rename_durable(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        rename_durable(from, to)
    }

    fn remove(&mut self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn list_dir(&mut self, dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
        super::sync::list_dir(dir)
    }
}
