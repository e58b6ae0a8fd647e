//! Repair of blocks that failed their checksum, from the peers of the group.
//!
//! A bad block is found when the replica reads it: serving a read (leader), a partial write's
//! read-modify-write during apply, or streaming a snapshot image. The block is never served;
//! the work that needed it is parked here and the peers are asked for their copies.
//!
//! Which copy may replace ours: the protocol applies the entries touching a block in index
//! order on every replica (`parallelraft::entry::CONFLICT_GRANULE_BYTES`), so a copy holds
//! everything we applied to the block if its version is at least ours, or if its sender
//! applied every entry up to our version. When our metadata slot itself was damaged our
//! version is unknown and the bound is the highest index we know committed: we cannot have
//! applied anything above it. A copy newer than ours is fine: entries between the two versions
//! are then skipped for that block when we apply them (`BlockStore::apply`).
//!
//! Liveness: asks are repeated every [`ASK_EVERY_TICKS`] until a copy arrives (a peer behind
//! us answers once it has applied far enough). A parked read gives up after
//! [`READ_GIVE_UP_TICKS`] with an error (the frontend tries again later); a parked apply
//! never gives up, because the entry must be applied; while it waits, the look-behind gate
//! holds back only the entries that touch the same blocks.

use std::collections::BTreeMap;

use parallelraft::{Entry, Index, RequestId};

use crate::storage::BadBlock;
use crate::wire::{BlockNeed, SnapBlock};

/// Ticks between two asks for the same blocks (200 ms at the default 20 ms tick).
pub const ASK_EVERY_TICKS: u64 = 10;
/// Ticks a parked read waits for its blocks before failing (5 s at the default tick).
pub const READ_GIVE_UP_TICKS: u64 = 250;
/// Blocks asked for per message (bounded like every other queue).
pub const MAX_ASK_BLOCKS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParkedRead {
    pub id: RequestId,
    pub offset: u64,
    pub len_bytes: u64,
    since: u64,
}

#[derive(Default)]
pub struct Repairs {
    /// Bad blocks and the least version a copy must hold.
    wanted: BTreeMap<u64, Index>,
    reads: Vec<ParkedRead>,
    applies: Vec<Entry>,
    ticks: u64,
    last_ask: u64,
    /// Blocks repaired since start (for the log and metrics).
    pub repaired: u64,
}

impl Repairs {
    pub fn is_idle(&self) -> bool {
        self.wanted.is_empty() && self.reads.is_empty() && self.applies.is_empty()
    }

    pub fn wanted(&self) -> usize {
        self.wanted.len()
    }

    /// Records bad blocks; `unknown_bound` is the need of a block whose version is unknown.
    /// Returns the asks to send now (the blocks not already being repaired).
    pub fn add(&mut self, bad: &[BadBlock], unknown_bound: Index) -> Vec<BlockNeed> {
        let mut fresh = Vec::new();
        for b in bad {
            let need = b.version.unwrap_or(unknown_bound);
            if let std::collections::btree_map::Entry::Vacant(v) = self.wanted.entry(b.block) {
                v.insert(need);
                fresh.push(BlockNeed { block: b.block, need });
            }
        }
        if !fresh.is_empty() {
            self.last_ask = self.ticks;
        }
        fresh.truncate(MAX_ASK_BLOCKS);
        fresh
    }

    pub fn park_read(&mut self, id: RequestId, offset: u64, len_bytes: u64) {
        self.reads.push(ParkedRead { id, offset, len_bytes, since: self.ticks });
    }

    pub fn park_apply(&mut self, entry: Entry) {
        self.applies.push(entry);
    }

    /// One tick: returns the asks to repeat and the parked reads that waited too long.
    pub fn tick(&mut self) -> (Vec<BlockNeed>, Vec<ParkedRead>) {
        self.ticks += 1;
        let mut asks = Vec::new();
        if !self.wanted.is_empty() && self.ticks - self.last_ask >= ASK_EVERY_TICKS {
            self.last_ask = self.ticks;
            asks = self.wanted.iter().take(MAX_ASK_BLOCKS).map(|(b, n)| BlockNeed { block: *b, need: *n }).collect();
        }
        let now = self.ticks;
        let (expired, kept): (Vec<ParkedRead>, Vec<ParkedRead>) =
            self.reads.drain(..).partition(|r| now - r.since >= READ_GIVE_UP_TICKS);
        self.reads = kept;
        (asks, expired)
    }

    /// Whether a peer's copy may replace our bad block (see the module comment).
    pub fn acceptable(&self, copy: &SnapBlock, sender_applied: Index) -> bool {
        match self.wanted.get(&copy.block) {
            Some(need) => copy.version >= *need || sender_applied >= *need,
            None => false,
        }
    }

    /// The block is good again (repaired, or rewritten whole).
    pub fn resolved(&mut self, block: u64, repaired: bool) {
        if self.wanted.remove(&block).is_some() && repaired {
            self.repaired += 1;
        }
    }

    /// The parked work, to try again after a repair.
    pub fn take_parked(&mut self) -> (Vec<ParkedRead>, Vec<Entry>) {
        let reads = std::mem::take(&mut self.reads);
        let applies = std::mem::take(&mut self.applies);
        (reads, applies)
    }

    /// Parked work exists only while some block is wanted.
    pub fn check_invariants(&self) {
        assert!(
            (self.reads.is_empty() && self.applies.is_empty()) || !self.wanted.is_empty(),
            "work parked with no block being repaired"
        );
    }
}

/// Whether a copy we hold at `version`, with our applied watermark `applied`, satisfies `need`.
pub fn can_serve(version: Index, applied: Index, need: Index) -> bool {
    version >= need || applied >= need
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(block: u64, version: Option<u64>) -> BadBlock {
        BadBlock { block, version: version.map(Index) }
    }

    #[test]
    fn asks_once_then_repeats_on_the_tick() {
        let mut r = Repairs::default();
        let asks = r.add(&[bad(3, Some(7)), bad(4, None)], Index(20));
        assert_eq!(asks, vec![BlockNeed { block: 3, need: Index(7) }, BlockNeed { block: 4, need: Index(20) }]);
        assert!(r.add(&[bad(3, Some(7))], Index(20)).is_empty(), "already being repaired");
        for _ in 1..ASK_EVERY_TICKS {
            assert!(r.tick().0.is_empty());
        }
        assert_eq!(r.tick().0.len(), 2);
    }

    #[test]
    fn a_copy_must_hold_everything_we_applied() {
        let mut r = Repairs::default();
        r.add(&[bad(3, Some(7))], Index(20));
        let copy = |v| SnapBlock { block: 3, version: Index(v), data: None };
        assert!(!r.acceptable(&copy(6), Index(6)), "older copy from a peer behind us");
        assert!(r.acceptable(&copy(6), Index(7)), "peer applied through our version: block untouched since 6");
        assert!(r.acceptable(&copy(9), Index(2)), "newer copy");
        assert!(!r.acceptable(&SnapBlock { block: 5, version: Index(9), data: None }, Index(9)), "not wanted");
        r.resolved(3, true);
        assert!(!r.acceptable(&copy(9), Index(9)));
        assert_eq!(r.repaired, 1);
    }

    #[test]
    fn parked_reads_give_up_but_applies_wait() {
        let mut r = Repairs::default();
        r.add(&[bad(1, Some(1))], Index(1));
        let id = RequestId { client: parallelraft::ClientId(1), seq: 1 };
        r.park_read(id, 0, 4096);
        r.check_invariants();
        let mut expired = Vec::new();
        for _ in 0..READ_GIVE_UP_TICKS {
            expired.extend(r.tick().1);
        }
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].id, id);
        assert!(r.take_parked().0.is_empty());
    }
}
