//! io_uring engine: one ring per engine (one engine per disk thread), batched submission,
//! fdatasync ordered after the writes of its batch with IOSQE_IO_DRAIN. A write immediately
//! followed by the fdatasync of the same file (the WAL's group commit: one write per segment,
//! one sync) is also linked to it with IOSQE_IO_LINK, so a failed or short write cancels the
//! sync instead of syncing a batch with a hole in it.

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use io_uring::{opcode, squeue, types, IoUring};

use super::sync::{rename_durable, FileTable};
use super::{FileId, IoEngine, IoOp, OpenMode};

pub struct UringEngine {
    ring: IoUring,
    files: FileTable,
}

impl UringEngine {
    /// A ring with `entries` submission slots. Fails with EPERM/ENOSYS where io_uring is
    /// disabled; `open_engine(Auto)` then falls back to the sync engine.
    pub fn new(entries: u32) -> io::Result<UringEngine> {
        Ok(UringEngine { ring: IoUring::new(entries)?, files: FileTable::default() })
    }

    fn fd(&self, id: FileId) -> io::Result<types::Fd> {
        Ok(types::Fd(self.files.get(id)?.as_raw_fd()))
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "uring"
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
        let mut results: Vec<Option<io::Result<usize>>> = (0..ops.len()).map(|_| None).collect();
        let capacity = self.ring.params().sq_entries() as usize;
        // For each operation: the file the next operation syncs, if it is a sync.
        let ops_next_is_sync: Vec<Option<FileId>> = (0..ops.len())
            .map(|i| match ops.get(i + 1) {
                Some(IoOp::Sync { file }) => Some(*file),
                _ => None,
            })
            .collect();
        let mut next = 0;
        while next < ops.len() {
            // Fill the submission queue with as many operations as fit, then wait for all of
            // them: a later chunk never overtakes an earlier one, so syncs stay ordered.
            let chunk_end = (next + capacity).min(ops.len());
            let mut pushed = 0;
            for (i, op) in ops[next..chunk_end].iter_mut().enumerate() {
                let user_data = (next + i) as u64;
                let link_to_sync = match (&*op, ops_next_is_sync.get(next + i)) {
                    (IoOp::Write { file, .. }, Some(Some(sync_file))) => next + i + 1 < chunk_end && file == sync_file,
                    _ => false,
                };
                let entry = match op {
                    IoOp::Write { file, offset, buf } => match self.fd(*file) {
                        Ok(fd) => {
                            let e = opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(*offset).build();
                            if link_to_sync {
                                e.flags(squeue::Flags::IO_LINK)
                            } else {
                                e
                            }
                        }
                        Err(e) => {
                            results[next + i] = Some(Err(e));
                            continue;
                        }
                    },
                    IoOp::Read { file, offset, buf } => match self.fd(*file) {
                        Ok(fd) => opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32).offset(*offset).build(),
                        Err(e) => {
                            results[next + i] = Some(Err(e));
                            continue;
                        }
                    },
                    IoOp::WriteBack { file, offset, len } => match self.fd(*file) {
                        // A range longer than u32 would need several entries; no caller asks
                        // for one (a checkpoint's windows span less than 65 MiB).
                        Ok(fd) if *len <= u32::MAX as u64 => opcode::SyncFileRange::new(fd, *len as u32)
                            .offset(*offset)
                            .flags(super::WRITE_BACK_FLAGS)
                            .build(),
                        Ok(_) => {
                            results[next + i] = Some(Err(io::Error::from_raw_os_error(libc::EINVAL)));
                            continue;
                        }
                        Err(e) => {
                            results[next + i] = Some(Err(e));
                            continue;
                        }
                    },
                    IoOp::Sync { file } => match self.fd(*file) {
                        Ok(fd) => opcode::Fsync::new(fd)
                            .flags(types::FsyncFlags::DATASYNC)
                            .build()
                            .flags(squeue::Flags::IO_DRAIN),
                        Err(e) => {
                            results[next + i] = Some(Err(e));
                            continue;
                        }
                    },
                };
                // SAFETY: the buffers referenced by the entry live in `ops`, which outlives this
                // call, and we wait for every submitted entry before returning.
                unsafe {
                    self.ring
                        .submission()
                        .push(&entry.user_data(user_data))
                        .expect("submission queue sized to capacity");
                }
                pushed += 1;
            }
            let mut completed = 0;
            while completed < pushed {
                if let Err(e) = self.ring.submit_and_wait(pushed - completed) {
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    // The ring itself failed: every operation still in flight fails with it.
                    for r in results.iter_mut().filter(|r| r.is_none()) {
                        *r = Some(Err(io::Error::new(e.kind(), e.to_string())));
                    }
                    return results.into_iter().map(|r| r.unwrap()).collect();
                }
                for cqe in self.ring.completion() {
                    let i = cqe.user_data() as usize;
                    let res = cqe.result();
                    results[i] = Some(if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) });
                    completed += 1;
                }
            }
            next = chunk_end;
        }
        results.into_iter().map(|r| r.expect("every operation completed")).collect()
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
