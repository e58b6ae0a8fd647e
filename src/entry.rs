//! Log entries and the block operations they carry.

use bytes::Bytes;
use lbb::{LookBehind, Range, RangeSet};

use crate::membership::Membership;
use crate::types::{Index, RequestId, Term};

/// A block operation. Offsets and lengths are in bytes within the group's address space.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Decided by a merge for an index no quorum member held; writes nothing.
    Noop,
    Write {
        offset: u64,
        data: Bytes,
    },
    /// Deallocate; reads back as zeroes.
    Trim {
        offset: u64,
        len_bytes: u64,
    },
    WriteZeroes {
        offset: u64,
        len_bytes: u64,
    },
    /// The group's new membership (see `membership`): touches no block.
    Config(Membership),
}

/// Conflicts are detected in whole granules of this many bytes: the block size of the chunk
/// servers' store, which rewrites a whole 4 KiB block (read-modify-write) for a 512-byte write.
///
/// Why not bytes: two writes to different sectors of one block would then not conflict and
/// could be applied in either order, so a block's version (the index of the entry that last
/// wrote it) would not identify its content across replicas. With whole-block granules every
/// replica applies the entries touching a block in index order, so equal versions mean equal
/// content and a replica can repair a damaged block from any peer at that version or later.
pub const CONFLICT_GRANULE_BYTES: u64 = 4096;

/// The range `offset..offset + len_bytes` widened to whole conflict granules.
pub fn granule_range(offset: u64, len_bytes: u64) -> Range {
    if len_bytes == 0 {
        return Range::new(offset, 0);
    }
    let g = CONFLICT_GRANULE_BYTES;
    let start = offset / g * g;
    let end = offset.saturating_add(len_bytes).div_ceil(g).saturating_mul(g);
    Range::new(start, end - start)
}

impl Op {
    /// The ranges the operation modifies, widened to conflict granules (empty for a no-op).
    pub fn ranges(&self) -> RangeSet {
        match self {
            Op::Noop | Op::Config(_) => RangeSet::new(),
            Op::Write { offset, data } => RangeSet::single(granule_range(*offset, data.len() as u64)),
            Op::Trim { offset, len_bytes } | Op::WriteZeroes { offset, len_bytes } => {
                RangeSet::single(granule_range(*offset, *len_bytes))
            }
        }
    }
}

/// One log entry.
///
/// Identity: two copies with the same `(index, ballot)` are the same entry, because only the
/// leader of term `ballot` writes copies at that ballot, and it writes one entry per index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub index: Index,
    /// The term in which the entry was first proposed; kept across merges.
    pub term: Term,
    /// The term of the leader that last wrote this copy (a merge rewrites it).
    pub ballot: Term,
    pub op: Op,
    /// The client request this entry executes; `None` for merge no-ops.
    pub request: Option<RequestId>,
    /// The client's lowest unacknowledged sequence number when it sent the request: every
    /// earlier sequence of that client has been acknowledged and will not be retried usefully.
    pub floor: u64,
    pub look_behind: LookBehind,
}

impl Entry {
    pub fn noop(index: Index, term: Term, look_behind: LookBehind) -> Entry {
        Entry { index, term, ballot: term, op: Op::Noop, request: None, floor: 0, look_behind }
    }

    pub fn ranges(&self) -> RangeSet {
        self.op.ranges()
    }

    /// CRC32 over every field: what a write-ahead-log record stores to detect torn and corrupt
    /// records at recovery.
    pub fn checksum(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.index.0.to_le_bytes());
        h.update(&self.term.0.to_le_bytes());
        h.update(&self.ballot.0.to_le_bytes());
        match &self.op {
            Op::Noop => h.update(&[0]),
            Op::Write { offset, data } => {
                h.update(&[1]);
                h.update(&offset.to_le_bytes());
                h.update(&(data.len() as u64).to_le_bytes());
                h.update(data);
            }
            Op::Trim { offset, len_bytes } => {
                h.update(&[2]);
                h.update(&offset.to_le_bytes());
                h.update(&len_bytes.to_le_bytes());
            }
            Op::WriteZeroes { offset, len_bytes } => {
                h.update(&[3]);
                h.update(&offset.to_le_bytes());
                h.update(&len_bytes.to_le_bytes());
            }
            Op::Config(m) => {
                h.update(&[4]);
                for id in &m.voters {
                    h.update(&id.0.to_le_bytes());
                }
                h.update(&[0xfd]);
                for id in &m.learners {
                    h.update(&id.0.to_le_bytes());
                }
            }
        }
        if let Some(r) = self.request {
            h.update(&r.client.0.to_le_bytes());
            h.update(&r.seq.to_le_bytes());
        }
        h.update(&self.floor.to_le_bytes());
        for prev in self.look_behind.previous() {
            match prev {
                None => h.update(&[0xff]),
                Some(set) => {
                    for r in set.ranges() {
                        h.update(&r.offset.to_le_bytes());
                        h.update(&r.len_bytes.to_le_bytes());
                    }
                    h.update(&[0xfe]);
                }
            }
        }
        h.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_widen_to_whole_granules() {
        assert_eq!(granule_range(512, 512), Range::new(0, 4096));
        assert_eq!(granule_range(4096, 4096), Range::new(4096, 4096));
        assert_eq!(granule_range(3584, 1024), Range::new(0, 8192));
        assert!(granule_range(100, 0).is_empty());
        // Two 512-byte writes into different sectors of one block conflict.
        let a = Op::Write { offset: 0, data: Bytes::from(vec![1; 512]) };
        let b = Op::Write { offset: 1024, data: Bytes::from(vec![2; 512]) };
        assert!(a.ranges().overlaps(&b.ranges()));
        let c = Op::Write { offset: 4096, data: Bytes::from(vec![3; 512]) };
        assert!(!a.ranges().overlaps(&c.ranges()));
    }
}
