//! The disk threads of a chunk server, so the core thread keeps stepping messages (acks,
//! requests, applies) while data is made durable:
//! - the WAL threads run group commits, each for the groups `chunk % WAL_THREADS` assigns it,
//!   so the fdatasyncs of different groups overlap instead of queueing behind each other. A
//!   group has at most one append in flight (it holds the next batch until the completion
//!   arrives), so records reach the WAL in the order the core issued them. The completion
//!   comes back through the core's inbox as [`Inbound::WalDone`]; only then are the batch's
//!   tokens reported `Persisted`. With no job waiting, a WAL thread zeroes the next segment
//!   of the logs it serves, a step at a time (`Wal::prepare_spare`).
//! - the checkpoint thread syncs a block store and then writes the checkpoint that describes
//!   it (a checkpoint syncs every block written since the last one, which can take a while;
//!   on its own thread it delays no group commit). The core issues at most one checkpoint per
//!   group at a time and refuses snapshot installs meanwhile; `CheckpointDone` is stepped only
//!   after both syncs and the checkpoint file are durable.

use std::sync::mpsc::{channel, Sender, TryRecvError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use parallelraft::{CheckpointState, Index};
use tracing::warn;

use crate::storage::blocks::SyncWork;
use crate::storage::io::{open_engine, EngineKind};
use crate::storage::meta;
use crate::storage::wal::{Wal, WalRecord};

use super::transport::{Inbound, InboxTx};

pub struct WalJob {
    pub chunk: u32,
    pub wal: Arc<Mutex<Wal>>,
    pub records: Vec<WalRecord>,
    pub tokens: Vec<u64>,
}

/// The result of a job: `error` is set when the append failed (the group fail-stops).
pub struct WalDone {
    pub chunk: u32,
    pub tokens: Vec<u64>,
    pub error: Option<String>,
    pub took: Duration,
}

pub struct CheckpointJob {
    pub chunk: u32,
    pub work: SyncWork,
    /// Where the checkpoint file goes (beside the blocks it describes).
    pub dir: std::path::PathBuf,
    pub state: CheckpointState,
}

pub struct CheckpointDone {
    pub chunk: u32,
    pub index: Index,
    pub error: Option<String>,
    pub took: Duration,
}

/// The job queues of a server's disk threads. Unbounded in type, bounded in fact: one job
/// of each kind per group at most.
#[derive(Clone)]
pub struct Disk {
    wal: Vec<Sender<WalJob>>,
    pub checkpoint: Sender<CheckpointJob>,
}

/// WAL threads per server. With one, a leader's write waited for its group commit p50 4.3 ms
/// while the append and fdatasync took p50 0.7 ms: the queue was the other groups' syncs
/// (`chunkserver profile` after fio 4 KiB random writes at iodepth 32 on a default `local`
/// cluster). Four: 2,531 against 2,220 IOPS, medians of three interleaved 10 s fio runs of that
/// job; the disk serializes concurrent fdatasyncs, so more threads gain little.
pub const WAL_THREADS: usize = 4;

impl Disk {
    /// Hands a group commit to the WAL thread of its chunk; false when that thread is gone.
    pub fn append(&self, job: WalJob) -> bool {
        self.wal[job.chunk as usize % self.wal.len()].send(job).is_ok()
    }
}

/// Starts the disk threads; they end when every sender is dropped or the core's inbox closes.
pub fn spawn(inbox: InboxTx, engine: EngineKind) -> std::io::Result<Disk> {
    let (ctx, crx) = channel::<CheckpointJob>();
    let mut checkpoint_engine = open_engine(engine)?;
    let checkpoint_inbox = inbox.clone();
    std::thread::Builder::new().name("checkpoint".into()).spawn(move || {
        while let Ok(job) = crx.recv() {
            let start = Instant::now();
            let result = job
                .work
                .run(checkpoint_engine.as_mut())
                .and_then(|()| meta::save_checkpoint(checkpoint_engine.as_mut(), &job.dir, &job.state));
            let done = CheckpointDone {
                chunk: job.chunk,
                index: job.state.index,
                error: result.err().map(|e| e.to_string()),
                took: start.elapsed(),
            };
            if !checkpoint_inbox.send_blocking(Inbound::CheckpointDone(done)) {
                return;
            }
        }
    })?;
    let mut wal = Vec::new();
    for k in 0..WAL_THREADS {
        let (tx, rx) = channel::<WalJob>();
        let inbox = inbox.clone();
        std::thread::Builder::new().name(format!("wal-{k}")).spawn(move || {
            // The logs this thread has appended to: between jobs it prepares their next
            // segments (`Wal::prepare_spare`), one small step at a time.
            let mut logs: Vec<Weak<Mutex<Wal>>> = Vec::new();
            loop {
                let job = match rx.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Disconnected) => return,
                    Err(TryRecvError::Empty) => {
                        if prepare_spare_step(&mut logs) {
                            continue;
                        }
                        match rx.recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        }
                    }
                };
                if !logs.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&job.wal))) {
                    logs.push(Arc::downgrade(&job.wal));
                }
                let start = Instant::now();
                let result = job.wal.lock().unwrap_or_else(|e| e.into_inner()).append(&job.records);
                let done = WalDone {
                    chunk: job.chunk,
                    tokens: job.tokens,
                    error: result.err().map(|e| e.to_string()),
                    took: start.elapsed(),
                };
                if !inbox.send_blocking(Inbound::WalDone(done)) {
                    return;
                }
            }
        })?;
        wal.push(tx);
    }
    Ok(Disk { wal, checkpoint: ctx })
}

/// One step of spare-segment preparation for the first of `logs` that wants one; false when
/// none did (the thread may then block for its next job). Forgets logs whose group is gone.
fn prepare_spare_step(logs: &mut Vec<Weak<Mutex<Wal>>>) -> bool {
    logs.retain(|w| w.strong_count() > 0);
    for log in logs.iter() {
        let Some(log) = log.upgrade() else { continue };
        let mut wal = log.lock().unwrap_or_else(|e| e.into_inner());
        match wal.prepare_spare() {
            Ok(true) => return true,
            Ok(false) => {}
            // Not fatal: rotating zeroes the segment inline and reports any error there.
            Err(e) => warn!("preparing a WAL segment ahead failed: {e}"),
        }
    }
    false
}
