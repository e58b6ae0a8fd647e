//! Real processes: a writer SIGKILLed at random moments, restarted many times. No batch
//! acknowledged before the kill may be lost, and blocks synced before it read back intact.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chunkserver::storage::blocks::BlockStore;
use chunkserver::storage::io::open_engine;
use chunkserver::storage::meta::load_checkpoint;
use chunkserver::storage::wal::{Wal, WalOptions};
use parallelraft::rng::Rng;
use parallelraft::{Index, Op};

fn run_and_kill(dir: &Path, engine: &str, start: u64, run_for: Duration) -> (u64, u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wal-torture"))
        .args([dir.to_str().unwrap(), engine, &start.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn wal-torture");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + run_for;
    let (mut acked, mut synced) = (start - 1, 0);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(1)) {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next().map(|n| n.parse::<u64>().unwrap())) {
                (Some("acked"), Some(n)) => acked = n,
                (Some("synced"), Some(n)) => synced = n,
                _ => panic!("unexpected output {line:?}"),
            }
        }
    }
    // SIGKILL: no chance to flush anything.
    child.kill().unwrap();
    child.wait().unwrap();
    (acked, synced)
}

#[test]
fn sigkill_loses_no_acknowledged_write() {
    for engine in ["sync", "uring"] {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(42);
        let mut next = 1;
        let mut last_synced = 0;
        for round in 0..8 {
            let run_for = Duration::from_millis(rng.range(20, 150));
            let (acked, _) = run_and_kill(dir.path(), engine, next, run_for);
            let mut meta = open_engine(engine.parse().unwrap()).unwrap();
            let checkpoint = load_checkpoint(meta.as_mut(), dir.path()).unwrap().index.0;
            assert!(checkpoint >= last_synced, "{engine}: the checkpoint went backwards");
            last_synced = checkpoint;
            let (_, recovery) = Wal::open(
                open_engine(engine.parse().unwrap()).unwrap(),
                dir.path(),
                1,
                WalOptions { segment_bytes: 1 << 20, direct: true },
            )
            .unwrap();
            assert!(recovery.corruptions.is_empty(), "{engine} round {round}: {:?}", recovery.corruptions);
            let held: Vec<u64> = recovery.entries.iter().map(|e| e.index.0).collect();
            let max = held.last().copied().unwrap_or(0);
            assert!(max >= acked, "{engine} round {round}: acknowledged {acked} but recovered only up to {max}");
            assert_eq!(held, (1..=max).collect::<Vec<_>>(), "{engine} round {round}: holes in the recovered log");
            // Every block whose last writer is covered by the durable checkpoint reads back intact.
            let mut store =
                BlockStore::open(open_engine(engine.parse().unwrap()).unwrap(), dir.path(), 256 * 4096, true).unwrap();
            for slot in 0..256u64 {
                let writer = recovery
                    .entries
                    .iter()
                    .rev()
                    .find(|e| matches!(&e.op, Op::Write { offset, .. } if *offset == slot * 4096));
                if let Some(e) = writer.filter(|e| e.index <= Index(last_synced)) {
                    // Later (unsynced) writers of this slot may have landed too; check only
                    // slots whose last writer is covered by the sync.
                    let Op::Write { data, .. } = &e.op else { unreachable!() };
                    assert_eq!(&store.read(slot * 4096, 4096).unwrap()[..], &data[..], "{engine}: block {slot}");
                }
            }
            next = max + 1;
        }
        assert!(next > 20, "{engine}: the writer made too little progress ({next})");
    }
}
