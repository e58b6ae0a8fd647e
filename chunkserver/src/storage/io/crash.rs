//! An in-memory engine that models what a power loss leaves on disk, for crash-state tests.
//!
//! Every write lands in the file's current contents at once (what reads see) and is remembered
//! as *unsynced* until a `Sync` of its file. [`CrashEngine::crash`] builds the disk a power loss
//! could leave: synced data intact, and each unsynced write dropped, applied whole, applied in
//! another order, or torn at a 512-byte or 4 KiB boundary, as the [`CrashPolicy`] says.
//! Metadata operations (allocate, rename, remove) are modelled as durable at once.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use parallelraft::rng::Rng;

use super::{FileId, IoEngine, IoOp, OpenMode};

#[derive(Clone, Default)]
struct MemFile {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Unsynced writes in issue order.
    unsynced: Vec<(u64, Vec<u8>)>,
}

fn write_into(data: &mut Vec<u8>, offset: u64, buf: &[u8]) {
    let end = offset as usize + buf.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset as usize..end].copy_from_slice(buf);
}

/// One recorded operation, replayable to rebuild the disk at any point of a run.
#[derive(Clone, Debug)]
enum TraceOp {
    Create(PathBuf),
    Allocate(PathBuf, u64),
    Write(PathBuf, u64, Vec<u8>),
    Sync(PathBuf),
    Rename(PathBuf, PathBuf),
    Remove(PathBuf),
}

#[derive(Default)]
struct Disk {
    files: BTreeMap<PathBuf, MemFile>,
    trace: Vec<TraceOp>,
    /// Injected failure: the next `Sync` fails with EIO (and its writes are lost at a crash).
    fail_next_sync: bool,
    syncs: u64,
    written_bytes: u64,
    /// Every `WriteBack` asked for: (file, offset, len, syncs done before it). Not part of the
    /// trace: writing back changes nothing a crash keeps.
    write_backs: Vec<WriteBackCall>,
}

/// One `WriteBack` a crash engine was asked for (see [`CrashEngine::write_backs`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteBackCall {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
    /// `Sync`s of any file done before it.
    pub syncs_before: u64,
}

/// What a crash does to unsynced writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPolicy {
    /// Every unsynced write is lost.
    DropUnsynced,
    /// Each unsynced write independently lost or kept, kept ones applied in a random order.
    RandomSubsetReordered,
    /// Earlier unsynced writes kept, the last one torn after this many bytes.
    TearLast { bytes: usize },
}

/// Cloning shares the disk (the engine handle a test keeps sees what the store wrote).
#[derive(Clone, Default)]
pub struct CrashEngine {
    disk: Arc<Mutex<Disk>>,
    open: HashMap<FileId, PathBuf>,
    next: u32,
}

impl CrashEngine {
    pub fn new() -> CrashEngine {
        CrashEngine::default()
    }

    /// Number of operations recorded so far: the crash points are `0..=trace_len()`.
    pub fn trace_len(&self) -> usize {
        self.disk.lock().unwrap().trace.len()
    }

    /// The disk a power loss right after the first `ops` recorded operations could leave.
    pub fn crash_at(&self, ops: usize, policy: CrashPolicy, rng: &mut Rng) -> CrashEngine {
        let trace: Vec<TraceOp> = self.disk.lock().unwrap().trace[..ops].to_vec();
        let mut disk = Disk::default();
        for op in trace {
            match op {
                TraceOp::Create(p) => {
                    disk.files.entry(p).or_default();
                }
                TraceOp::Allocate(p, len) => {
                    let f = disk.files.entry(p).or_default();
                    for data in [&mut f.durable, &mut f.current] {
                        if (data.len() as u64) < len {
                            data.resize(len as usize, 0);
                        }
                    }
                }
                TraceOp::Write(p, offset, data) => {
                    let f = disk.files.entry(p).or_default();
                    write_into(&mut f.current, offset, &data);
                    f.unsynced.push((offset, data));
                }
                TraceOp::Sync(p) => {
                    let f = disk.files.entry(p).or_default();
                    f.durable = f.current.clone();
                    f.unsynced.clear();
                }
                TraceOp::Rename(from, to) => {
                    if let Some(f) = disk.files.remove(&from) {
                        disk.files.insert(to, f);
                    }
                }
                TraceOp::Remove(p) => {
                    disk.files.remove(&p);
                }
            }
        }
        let replayed = CrashEngine { disk: Arc::new(Mutex::new(disk)), open: HashMap::new(), next: 1 };
        replayed.crash(policy, rng)
    }

    /// The disk a power loss at this moment could leave, as a fresh engine.
    pub fn crash(&self, policy: CrashPolicy, rng: &mut Rng) -> CrashEngine {
        let disk = self.disk.lock().unwrap();
        let mut files = BTreeMap::new();
        for (path, f) in &disk.files {
            let mut data = f.durable.clone();
            match policy {
                CrashPolicy::DropUnsynced => {}
                CrashPolicy::RandomSubsetReordered => {
                    let mut kept: Vec<&(u64, Vec<u8>)> = f.unsynced.iter().filter(|_| rng.chance(0.5)).collect();
                    for i in (1..kept.len()).rev() {
                        let j = rng.range(0, i as u64 + 1) as usize;
                        kept.swap(i, j);
                    }
                    for (offset, buf) in kept {
                        write_into(&mut data, *offset, buf);
                    }
                }
                CrashPolicy::TearLast { bytes } => {
                    if let Some(((last_off, last_buf), rest)) = f.unsynced.split_last() {
                        for (offset, buf) in rest {
                            write_into(&mut data, *offset, buf);
                        }
                        write_into(&mut data, *last_off, &last_buf[..bytes.min(last_buf.len())]);
                    }
                }
            }
            // Space reserved by `allocate` stays reserved.
            if data.len() < f.current.len() {
                data.resize(f.current.len(), 0);
            }
            files.insert(path.clone(), MemFile { durable: data.clone(), current: data, unsynced: Vec::new() });
        }
        CrashEngine { disk: Arc::new(Mutex::new(Disk { files, ..Disk::default() })), open: HashMap::new(), next: 1 }
    }

    /// Makes the next sync fail with EIO, as a dying disk would.
    pub fn fail_next_sync(&self) {
        self.disk.lock().unwrap().fail_next_sync = true;
    }

    /// Every `WriteBack` so far, in order.
    pub fn write_backs(&self) -> Vec<WriteBackCall> {
        self.disk.lock().unwrap().write_backs.clone()
    }

    pub fn sync_count(&self) -> u64 {
        self.disk.lock().unwrap().syncs
    }

    /// Bytes written so far (every `Write`, synced or not).
    pub fn written_bytes(&self) -> u64 {
        self.disk.lock().unwrap().written_bytes
    }

    /// Flips one bit of a file's durable and current contents (bit rot).
    pub fn flip_bit(&self, path: &Path, offset: u64, bit: u8) {
        let mut disk = self.disk.lock().unwrap();
        let f = disk.files.get_mut(path).expect("flip_bit on a missing file");
        f.durable[offset as usize] ^= 1 << bit;
        f.current[offset as usize] ^= 1 << bit;
    }

    pub fn exists(&self, path: &Path) -> bool {
        self.disk.lock().unwrap().files.contains_key(path)
    }

    fn path(&self, id: FileId) -> io::Result<PathBuf> {
        self.open.get(&id).cloned().ok_or_else(|| io::Error::other("unknown file id"))
    }
}

impl IoEngine for CrashEngine {
    fn name(&self) -> &'static str {
        "crash-sim"
    }

    fn open(&mut self, path: &Path, mode: OpenMode) -> io::Result<FileId> {
        let mut disk = self.disk.lock().unwrap();
        if !disk.files.contains_key(path) {
            if !mode.create {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
            disk.files.insert(path.to_path_buf(), MemFile::default());
            disk.trace.push(TraceOp::Create(path.to_path_buf()));
        }
        self.next += 1;
        let id = FileId(self.next);
        self.open.insert(id, path.to_path_buf());
        Ok(id)
    }

    fn close(&mut self, file: FileId) {
        self.open.remove(&file);
    }

    fn len(&mut self, file: FileId) -> io::Result<u64> {
        let path = self.path(file)?;
        Ok(self.disk.lock().unwrap().files[&path].current.len() as u64)
    }

    fn allocate(&mut self, file: FileId, len: u64) -> io::Result<()> {
        let path = self.path(file)?;
        let mut disk = self.disk.lock().unwrap();
        let f = disk.files.get_mut(&path).unwrap();
        for data in [&mut f.durable, &mut f.current] {
            if (data.len() as u64) < len {
                data.resize(len as usize, 0);
            }
        }
        disk.trace.push(TraceOp::Allocate(path, len));
        Ok(())
    }

    fn submit(&mut self, ops: &mut [IoOp<'_>]) -> Vec<io::Result<usize>> {
        let mut results = Vec::with_capacity(ops.len());
        for op in ops.iter_mut() {
            let r = (|| -> io::Result<usize> {
                match op {
                    IoOp::Write { file, offset, buf } => {
                        let path = self.path(*file)?;
                        let mut disk = self.disk.lock().unwrap();
                        let f = disk.files.get_mut(&path).unwrap();
                        write_into(&mut f.current, *offset, buf);
                        f.unsynced.push((*offset, buf.to_vec()));
                        disk.written_bytes += buf.len() as u64;
                        disk.trace.push(TraceOp::Write(path, *offset, buf.to_vec()));
                        Ok(buf.len())
                    }
                    IoOp::Read { file, offset, buf } => {
                        let path = self.path(*file)?;
                        let disk = self.disk.lock().unwrap();
                        let data = &disk.files[&path].current;
                        let start = (*offset as usize).min(data.len());
                        let n = buf.len().min(data.len() - start);
                        buf[..n].copy_from_slice(&data[start..start + n]);
                        Ok(n)
                    }
                    // On the device but not durable: a crash may still lose it, as here.
                    IoOp::WriteBack { file, offset, len } => {
                        let path = self.path(*file)?;
                        let mut disk = self.disk.lock().unwrap();
                        let syncs_before = disk.syncs;
                        disk.write_backs.push(WriteBackCall { path, offset: *offset, len: *len, syncs_before });
                        Ok(0)
                    }
                    IoOp::Sync { file } => {
                        let path = self.path(*file)?;
                        let mut disk = self.disk.lock().unwrap();
                        if disk.fail_next_sync {
                            disk.fail_next_sync = false;
                            return Err(io::Error::from_raw_os_error(libc::EIO));
                        }
                        disk.syncs += 1;
                        let f = disk.files.get_mut(&path).unwrap();
                        f.durable = f.current.clone();
                        f.unsynced.clear();
                        disk.trace.push(TraceOp::Sync(path));
                        Ok(0)
                    }
                }
            })();
            results.push(r);
        }
        results
    }

    fn rename_durable(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = self.disk.lock().unwrap();
        let f = disk.files.remove(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        disk.files.insert(to.to_path_buf(), f);
        disk.trace.push(TraceOp::Rename(from.to_path_buf(), to.to_path_buf()));
        for p in self.open.values_mut() {
            if p == from {
                *p = to.to_path_buf();
            }
        }
        Ok(())
    }

    fn list_dir(&mut self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        Ok(self.disk.lock().unwrap().files.keys().filter(|p| p.parent() == Some(dir)).cloned().collect())
    }

    fn remove(&mut self, path: &Path) -> io::Result<()> {
        let mut disk = self.disk.lock().unwrap();
        disk.trace.push(TraceOp::Remove(path.to_path_buf()));
        disk.files.remove(path).map(|_| ()).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}
