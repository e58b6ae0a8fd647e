//! The disk threads of a chunk server, so the core thread keeps stepping messages (acks,
//! requests, applies) while data is made durable:
//! - the WAL thread runs the group commits of the server's one log (see
//!   `crate::storage::wal`): each round the core hands it the records of every group that has
//!   some and no append in flight, as one job; jobs that queued meanwhile are merged into one
//!   batch (one write, one fdatasync). A group has at most one append in flight (it holds the
//!   next records until the completion arrives), and jobs run in the order they were sent, so
//!   a group's records reach the log in the order the core issued them. The completion comes
//!   back through the core's inbox as [`Inbound::WalDone`]; only then are the tokens reported
//!   `Persisted`. Between jobs the thread zeroes the log's next segment a step at a time
//!   (`Wal::prepare_spare`).
//! - the checkpoint thread syncs a block store and then writes the checkpoint that describes
//!   it (a checkpoint syncs every block written since the last one, which can take a while;
//!   on its own thread it delays no group commit). The core issues at most one checkpoint per
//!   group at a time and refuses snapshot installs meanwhile; `CheckpointDone` is stepped only
//!   after both syncs and the checkpoint file are durable.

use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parallelraft::{CheckpointState, Index};
use tracing::warn;

use crate::poll::Activity;
use crate::storage::blocks::SyncWork;
use crate::storage::io::{open_engine, EngineKind};
use crate::storage::meta;
use crate::storage::wal::{Wal, WalRecord};

use super::transport::{Inbound, InboxTx};

/// One group's part of a group commit.
pub struct GroupAppend {
    pub chunk: u32,
    pub records: Vec<WalRecord>,
    pub tokens: Vec<u64>,
}

/// What the core sends the WAL thread, in order.
pub enum WalJob {
    /// Group commits: appended (with any others queued) as one batch.
    Append {
        appends: Vec<GroupAppend>,
        /// Report the chunks pinning the log's oldest segment once it has more segments.
        max_segments: usize,
    },
    /// A chunk's durable checkpoint covers its entries up to `through`.
    Cover { chunk: u32, through: Index },
    /// A chunk's replica is gone from this server.
    Forget { chunk: u32 },
}

/// The result of an append: `error` is set when it failed (every group in it fail-stops, and
/// so will every later one: the log is poisoned).
pub struct WalDone {
    /// Per group, the tokens now durable.
    pub appends: Vec<(u32, Vec<u64>)>,
    pub error: Option<String>,
    pub took: Duration,
    /// Chunks whose uncovered entries keep the oldest of too many segments (`Wal::pinning`).
    pub pinning: Vec<u32>,
    /// Segments the log holds after the append (and any pruning).
    pub segments: usize,
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

/// The job queues of a server's disk threads, and the server's log. Unbounded in type, bounded
/// in fact: one append per group and round, one checkpoint per group at most.
#[derive(Clone)]
pub struct Disk {
    wal: Sender<WalJob>,
    /// The WAL thread holds it during an append; the core locks it only for the rare
    /// synchronous append (a new replica's reset, a migrated log) and at start-up.
    pub log: Arc<Mutex<Wal>>,
    pub checkpoint: Sender<CheckpointJob>,
}

impl Disk {
    /// Hands a job to the WAL thread; false when that thread is gone.
    pub fn send(&self, job: WalJob) -> bool {
        self.wal.send(job).is_ok()
    }

    /// Locks the log (for synchronous use on the core thread, see [`Disk::log`]).
    pub fn lock_log(&self) -> std::sync::MutexGuard<'_, Wal> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts the disk threads over the server's log; they end when every sender is dropped or the
/// core's inbox closes. The WAL thread polls for its next job within `poll` after the
/// server's last work (see [`crate::poll`]).
pub fn spawn(
    inbox: InboxTx,
    engine: EngineKind,
    log: Wal,
    activity: Arc<Activity>,
    poll: Duration,
) -> std::io::Result<Disk> {
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
    let log = Arc::new(Mutex::new(log));
    let (tx, rx) = channel::<WalJob>();
    let thread_log = log.clone();
    std::thread::Builder::new()
        .name("wal".into())
        .spawn(move || wal_thread(&rx, &thread_log, &inbox, &activity, poll))?;
    Ok(Disk { wal: tx, log, checkpoint: ctx })
}

/// The next job: polled for while the server had work within `poll`, then waited for.
/// `None` when every sender is gone.
fn next_job(rx: &Receiver<WalJob>, activity: &Activity, poll: Duration) -> Option<WalJob> {
    while activity.recent(poll) {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => activity.spin_once(),
        }
    }
    rx.recv().ok()
}

fn wal_thread(rx: &Receiver<WalJob>, log: &Mutex<Wal>, inbox: &InboxTx, activity: &Activity, poll: Duration) {
    let lock = || log.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let first = match rx.try_recv() {
            Ok(job) => job,
            Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => {
                match lock().prepare_spare() {
                    Ok(true) => continue,
                    Ok(false) => {}
                    // Not fatal: rotating zeroes the segment inline and reports any error there.
                    Err(e) => warn!("preparing a WAL segment ahead failed: {e}"),
                }
                match next_job(rx, activity, poll) {
                    Some(job) => job,
                    None => return,
                }
            }
        };
        // Everything queued joins this batch. Covers and forgets commute with the appends
        // merged here (a group is forgotten only with no append in flight, and a new replica's
        // first records come after its reset), so they are applied first.
        let mut appends: Vec<GroupAppend> = Vec::new();
        let mut max_segments = usize::MAX;
        let mut wal = lock();
        let mut take = |job: WalJob, wal: &mut Wal| match job {
            WalJob::Append { appends: more, max_segments: m } => {
                appends.extend(more);
                max_segments = m;
            }
            WalJob::Cover { chunk, through } => wal.cover(chunk as u64, through),
            WalJob::Forget { chunk } => wal.forget(chunk as u64),
        };
        take(first, &mut wal);
        while let Ok(job) = rx.try_recv() {
            take(job, &mut wal);
        }
        let start = Instant::now();
        let parts: Vec<(u64, &[WalRecord])> = appends.iter().map(|a| (a.chunk as u64, &a.records[..])).collect();
        let mut result = wal.append_chunks(&parts);
        if result.is_ok() {
            result = wal.prune_covered().map(|_| ());
        }
        if appends.is_empty() {
            // Covers and forgets only: nobody waits for a completion.
            drop(wal);
            if let Err(e) = result {
                warn!("pruning the WAL failed: {e}");
            }
            continue;
        }
        let pinning = wal.pinning(max_segments).into_iter().map(|c| c as u32).collect();
        let segments = wal.segment_count();
        drop(wal);
        let done = WalDone {
            appends: appends.into_iter().map(|a| (a.chunk, a.tokens)).collect(),
            error: result.err().map(|e| e.to_string()),
            took: start.elapsed(),
            pinning,
            segments,
        };
        if !inbox.send_blocking(Inbound::WalDone(done)) {
            return;
        }
    }
}
