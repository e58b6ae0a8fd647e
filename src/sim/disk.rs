//! A simulated replica disk: hard state, checkpoint, write-ahead log and block store, with the
//! failure model of a real drive: writes not yet reported complete may be lost, torn or
//! corrupted at a crash (a bad record is caught by its checksum), and block writes are durable
//! only after a checkpoint sync.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::entry::{Entry, Op};
use crate::io::{CheckpointState, HardState};
use crate::rng::Rng;
use crate::types::{Index, RequestId};

pub const BLOCK_SIZE: u64 = 4096;

/// One 4 KiB block: its bytes and the request that last wrote it (the simulator's checker
/// uses the tag; the data must always match it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub tag: Option<RequestId>,
    pub data: Bytes,
}

#[derive(Clone, Debug)]
enum RecordKind {
    Entry(Entry),
    Truncate(Index),
}

#[derive(Clone, Debug)]
struct Record {
    /// Issue order: recovery replays records in this order.
    seq: u64,
    kind: RecordKind,
    checksum: u32,
}

impl Record {
    fn compute_checksum(kind: &RecordKind) -> u32 {
        match kind {
            RecordKind::Entry(e) => e.checksum(),
            RecordKind::Truncate(i) => crc32fast::hash(&i.0.to_le_bytes()) ^ 0x5a5a,
        }
    }
}

/// What survived a crash, checked by recovery.
pub struct Recovered {
    pub hard: HardState,
    pub checkpoint: CheckpointState,
    pub entries: Vec<Entry>,
    pub torn_records: usize,
}

#[derive(Default)]
pub struct Disk {
    hard: HardState,
    checkpoint: CheckpointState,
    wal: Vec<Record>,
    pending: BTreeMap<u64, Record>,
    next_seq: u64,
    blocks: BTreeMap<u64, Block>,
    volatile: BTreeMap<u64, Block>,
}

impl Disk {
    pub fn persist_hard_state(&mut self, hard: HardState) {
        self.hard = hard;
    }

    pub fn issue_entries(&mut self, token: u64, entries: Vec<Entry>) -> Vec<u64> {
        // One record per entry, all completing together under one token.
        let mut seqs = Vec::new();
        for (k, e) in entries.into_iter().enumerate() {
            let kind = RecordKind::Entry(e);
            let checksum = Record::compute_checksum(&kind);
            self.next_seq += 1;
            seqs.push(self.next_seq);
            self.pending.insert(token * 1_000_000 + k as u64, Record { seq: self.next_seq, kind, checksum });
        }
        seqs
    }

    pub fn issue_truncate(&mut self, token: u64, after: Index) {
        let kind = RecordKind::Truncate(after);
        let checksum = Record::compute_checksum(&kind);
        self.next_seq += 1;
        self.pending.insert(token * 1_000_000, Record { seq: self.next_seq, kind, checksum });
    }

    /// The write(s) of `token` completed: durable from now on.
    pub fn complete(&mut self, token: u64) {
        let keys: Vec<u64> = self.pending.range(token * 1_000_000..(token + 1) * 1_000_000).map(|(k, _)| *k).collect();
        for k in keys {
            let r = self.pending.remove(&k).unwrap();
            self.wal.push(r);
        }
    }

    pub fn prune(&mut self, through: Index) {
        self.wal.retain(|r| match &r.kind {
            RecordKind::Entry(e) => e.index > through,
            RecordKind::Truncate(_) => true,
        });
    }

    /// Current contents (what a read sees): durable blocks overlaid with unsynced writes.
    pub fn read_block(&self, block: u64) -> Option<&Block> {
        self.volatile.get(&block).or_else(|| self.blocks.get(&block))
    }

    pub fn apply(&mut self, entry: &Entry) {
        let (offset, len, data) = match &entry.op {
            Op::Noop | Op::Config(_) => return,
            Op::Write { offset, data } => (*offset, data.len() as u64, Some(data)),
            Op::Trim { offset, len_bytes } | Op::WriteZeroes { offset, len_bytes } => (*offset, *len_bytes, None),
        };
        assert!(offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE), "sim writes whole blocks");
        for k in 0..len / BLOCK_SIZE {
            let bytes = match data {
                Some(d) => d.slice((k * BLOCK_SIZE) as usize..((k + 1) * BLOCK_SIZE) as usize),
                None => Bytes::from_static(&[0u8; BLOCK_SIZE as usize]),
            };
            self.volatile.insert(offset / BLOCK_SIZE + k, Block { tag: entry.request, data: bytes });
        }
    }

    /// Checkpoint: sync every block write, then record the checkpoint.
    pub fn checkpoint(&mut self, state: CheckpointState) {
        let volatile = std::mem::take(&mut self.volatile);
        self.blocks.extend(volatile);
        self.checkpoint = state;
    }

    /// A fuzzy image of the current block contents, for streaming catch-up.
    pub fn image(&self) -> BTreeMap<u64, Block> {
        let mut image = self.blocks.clone();
        image.extend(self.volatile.iter().map(|(k, v)| (*k, v.clone())));
        image
    }

    pub fn install(&mut self, image: BTreeMap<u64, Block>, state: CheckpointState) {
        self.blocks = image;
        self.volatile.clear();
        self.checkpoint = state;
    }

    /// Power loss: each pending WAL write is lost, lands whole, or lands torn (bad checksum);
    /// each unsynced block write is kept or lost.
    pub fn crash(&mut self, rng: &mut Rng, torn_probability: f64) {
        for (_, mut r) in std::mem::take(&mut self.pending) {
            if rng.chance(0.4) {
                if rng.chance(torn_probability) {
                    r.checksum ^= 0x1; // torn or corrupted: the stored checksum cannot match
                }
                self.wal.push(r);
            }
        }
        for (block, b) in std::mem::take(&mut self.volatile) {
            if rng.chance(0.5) {
                self.blocks.insert(block, b);
            }
        }
    }

    /// Recovery: replays intact WAL records in issue order; records failing their checksum are
    /// discarded (they were never reported durable, so nothing acknowledged depends on them).
    pub fn recover(&mut self) -> Recovered {
        self.wal.sort_by_key(|r| r.seq);
        let mut torn = 0;
        let mut intact = Vec::new();
        for r in std::mem::take(&mut self.wal) {
            if Record::compute_checksum(&r.kind) != r.checksum {
                torn += 1;
            } else {
                intact.push(r);
            }
        }
        let mut log: BTreeMap<Index, Entry> = BTreeMap::new();
        for r in &intact {
            match &r.kind {
                RecordKind::Entry(e) => {
                    log.insert(e.index, e.clone());
                }
                RecordKind::Truncate(after) => {
                    log.split_off(&after.next());
                }
            }
        }
        self.wal = intact;
        let ckpt = self.checkpoint.index;
        Recovered {
            hard: self.hard.clone(),
            checkpoint: self.checkpoint.clone(),
            entries: log.into_values().filter(|e| e.index > ckpt).collect(),
            torn_records: torn,
        }
    }

    /// The disk after its replica's data was deleted: only the hard state (term and vote)
    /// survives, as a tombstone.
    pub fn wiped(&self) -> Disk {
        Disk {
            hard: HardState { sync: Default::default(), sync_end: Default::default(), ..self.hard.clone() },
            ..Disk::default()
        }
    }

    pub fn all_blocks(&self) -> BTreeMap<u64, Block> {
        self.image()
    }
}
