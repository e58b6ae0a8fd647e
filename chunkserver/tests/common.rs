//! Helpers shared by the storage tests.
#![allow(dead_code)]

use bytes::Bytes;
use chunkserver::storage::io::{open_engine, CrashEngine, EngineKind, IoEngine};
use chunkserver::storage::wal::WalRecord;
use lbb::LookBehind;
use parallelraft::{ClientId, Entry, Index, Op, RequestId, Term};

/// Every engine the production code can run on, plus the crash simulator.
pub fn engines() -> Vec<(&'static str, Box<dyn IoEngine>)> {
    vec![
        ("sync", open_engine(EngineKind::Sync).unwrap()),
        ("uring", open_engine(EngineKind::Uring).expect("io_uring available on this machine")),
        ("crash-sim", Box::new(CrashEngine::new())),
    ]
}

/// A 4 KiB write entry whose payload names its index and term.
pub fn entry(index: u64, term: u64) -> Entry {
    let mut data = vec![0u8; 4096];
    for (k, chunk) in data.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&index.to_le_bytes());
        chunk[8..16].copy_from_slice(&(term ^ k as u64).to_le_bytes());
    }
    Entry {
        index: Index(index),
        term: Term(term),
        ballot: Term(term),
        op: Op::Write { offset: (index % 64) * 4096, data: Bytes::from(data) },
        request: Some(RequestId { client: ClientId(1), seq: index }),
        floor: 0,
        look_behind: LookBehind::unknown(2),
    }
}

/// Replays one WAL record into a chunk's log, as recovery does.
pub fn replay_record(log: &mut std::collections::BTreeMap<Index, Entry>, record: &WalRecord) {
    match record {
        WalRecord::Entry(e) => {
            log.insert(e.index, e.clone());
        }
        WalRecord::Truncate { after } => {
            log.split_off(&after.next());
        }
        WalRecord::Reset => log.clear(),
    }
}
