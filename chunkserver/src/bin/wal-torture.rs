//! Test helper: appends batches to a WAL and a block store forever, printing `acked N` after
//! each batch is durable, so a test can SIGKILL it at random moments and check recovery.
//!
//! usage: wal-torture DIR ENGINE(sync|uring) START_INDEX

use std::io::Write;
use std::path::PathBuf;

use bytes::Bytes;
use chunkserver::storage::blocks::BlockStore;
use chunkserver::storage::io::open_engine;
use chunkserver::storage::meta::{load_checkpoint, save_checkpoint};
use chunkserver::storage::wal::{Wal, WalOptions, WalRecord};
use lbb::LookBehind;
use parallelraft::{CheckpointState, ClientId, Entry, Index, Op, RequestId, Term};

/// The entry the torture workload writes at `index` (the verifier rebuilds it the same way).
pub fn torture_entry(index: u64) -> Entry {
    let mut data = vec![0u8; 4096];
    for (k, chunk) in data.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(index * 1000 + k as u64).to_le_bytes());
    }
    Entry {
        index: Index(index),
        term: Term(1),
        ballot: Term(1),
        op: Op::Write { offset: (index % 256) * 4096, data: Bytes::from(data) },
        request: Some(RequestId { client: ClientId(1), seq: index }),
        floor: 0,
        look_behind: LookBehind::unknown(2),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: wal-torture DIR ENGINE START_INDEX");
        std::process::exit(2);
    }
    let dir = PathBuf::from(&args[1]);
    let kind = args[2].parse().unwrap_or_else(|e| panic!("{e}"));
    let mut next: u64 = args[3].parse().expect("start index");
    let options = WalOptions { segment_bytes: 1 << 20, direct: true };
    let (mut wal, recovery) = Wal::open(open_engine(kind).unwrap(), &dir, 1, options).expect("open wal");
    let mut store = BlockStore::open(open_engine(kind).unwrap(), &dir, 256 * 4096, true).expect("open blocks");
    let mut meta_engine = open_engine(kind).unwrap();
    // As a replica does after a restart: blocks are durable up to the checkpoint; re-apply
    // every logged entry above it (idempotent whole-block writes, in index order).
    let checkpoint = load_checkpoint(meta_engine.as_mut(), &dir).expect("load checkpoint");
    for e in recovery.entries.iter().filter(|e| e.index > checkpoint.index) {
        store.apply(e).expect("replay");
    }
    let stdout = std::io::stdout();
    let mut batch = 1;
    loop {
        let records: Vec<WalRecord> = (next..next + batch).map(|i| WalRecord::Entry(torture_entry(i))).collect();
        wal.append(&records).expect("append");
        for i in next..next + batch {
            store.apply(&torture_entry(i)).expect("apply");
        }
        next += batch;
        writeln!(stdout.lock(), "acked {}", next - 1).unwrap();
        if next.is_multiple_of(64) {
            store.sync().expect("sync blocks");
            let state = CheckpointState { index: Index(next - 1), ..Default::default() };
            save_checkpoint(meta_engine.as_mut(), &dir, &state).expect("checkpoint");
            writeln!(stdout.lock(), "synced {}", next - 1).unwrap();
        }
        batch = batch % 7 + 1;
    }
}
