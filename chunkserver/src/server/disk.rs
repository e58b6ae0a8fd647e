//! The WAL thread of a chunk server: group commits run here, off the core thread, so the core
//! keeps stepping messages (acks, requests, applies) while a batch is being made durable.
//!
//! Contract: a group has at most one append in flight (the group holds the next batch until
//! the completion arrives), so records reach the WAL in the order the core issued them. The
//! completion goes back through the core's inbox as [`Inbound::WalDone`]; only then are the
//! batch's tokens reported `Persisted` (never before the fdatasync returned).

use std::sync::mpsc::{channel, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::storage::wal::{Wal, WalRecord};

use super::transport::Inbound;

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

/// Starts the WAL thread; it ends when every sender is dropped or the core's inbox closes.
/// The queue is unbounded in type but bounded in fact: one job per group at most.
pub fn spawn(inbox: SyncSender<Inbound>) -> std::io::Result<Sender<WalJob>> {
    let (tx, rx) = channel::<WalJob>();
    std::thread::Builder::new().name("wal".into()).spawn(move || {
        while let Ok(job) = rx.recv() {
            let start = Instant::now();
            let result = job.wal.lock().unwrap_or_else(|e| e.into_inner()).append(&job.records);
            let done = WalDone {
                chunk: job.chunk,
                tokens: job.tokens,
                error: result.err().map(|e| e.to_string()),
                took: start.elapsed(),
            };
            if inbox.send(Inbound::WalDone(done)).is_err() {
                return;
            }
        }
    })?;
    Ok(tx)
}
