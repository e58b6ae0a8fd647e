//! Simulated clients: each keeps up to `iodepth` requests outstanding, retries with the same
//! request identity until answered, and records the history the checkers judge.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::disk::BLOCK_SIZE;
use crate::entry::Op;
use crate::rng::Rng;
use crate::types::{ClientId, ReplicaId, RequestId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    Write,
    Trim,
    WriteZeroes,
    Read,
}

/// One operation of the history.
#[derive(Clone, Debug)]
pub struct HistoryOp {
    pub id: RequestId,
    pub kind: OpKind,
    pub first_block: u64,
    pub blocks: u64,
    /// Logical timestamps from the simulator's global event counter.
    pub invoked: u64,
    pub responded: Option<u64>,
    /// For reads: the tag observed in each block.
    pub observed: Vec<Option<RequestId>>,
}

/// The bytes a write of `id` puts in `block`: unique per (request, block), so a read proves
/// which write it saw.
pub fn payload(id: RequestId, block: u64) -> Bytes {
    let mut v = Vec::with_capacity(BLOCK_SIZE as usize);
    let words = [id.client.0, id.seq, block, 0xdead_beef_u64 ^ id.seq.rotate_left(17)];
    while v.len() < BLOCK_SIZE as usize {
        for w in words {
            v.extend_from_slice(&w.to_le_bytes());
        }
    }
    v.truncate(BLOCK_SIZE as usize);
    Bytes::from(v)
}

pub struct Outstanding {
    /// `None` for a read.
    pub op: Option<Op>,
    pub first_block: u64,
    pub blocks: u64,
    pub target: ReplicaId,
    /// Retry when the simulated clock reaches this time without an answer.
    pub retry_at: u64,
    /// The pending retry is a timeout (try another replica), not a redirect or back-off.
    pub retry_is_timeout: bool,
}

pub struct Client {
    pub id: ClientId,
    pub next_seq: u64,
    pub remaining: u64,
    pub iodepth: usize,
    pub leader_guess: ReplicaId,
    pub outstanding: BTreeMap<u64, Outstanding>,
    pub rng: Rng,
    /// Time of the one scheduled wake-up (stale wake-ups are ignored).
    pub next_wake: Option<u64>,
}

impl Client {
    /// Lowest unacknowledged sequence number: everything below was answered.
    pub fn floor(&self) -> u64 {
        self.outstanding.keys().next().copied().unwrap_or(self.next_seq)
    }

    /// Draws the next operation over a small address space, so writes conflict often.
    pub fn next_op(&mut self, volume_blocks: u64) -> (RequestId, Option<Op>, OpKind, u64, u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let id = RequestId { client: self.id, seq };
        let blocks = self.rng.range(1, 3);
        let first = self.rng.range(0, volume_blocks - blocks + 1);
        let offset = first * BLOCK_SIZE;
        let len_bytes = blocks * BLOCK_SIZE;
        let roll = self.rng.range(0, 100);
        let (op, kind) = if roll < 55 {
            let mut data = Vec::with_capacity(len_bytes as usize);
            for b in first..first + blocks {
                data.extend_from_slice(&payload(id, b));
            }
            (Some(Op::Write { offset, data: Bytes::from(data) }), OpKind::Write)
        } else if roll < 62 {
            (Some(Op::Trim { offset, len_bytes }), OpKind::Trim)
        } else if roll < 68 {
            (Some(Op::WriteZeroes { offset, len_bytes }), OpKind::WriteZeroes)
        } else {
            (None, OpKind::Read)
        };
        (id, op, kind, first, blocks)
    }
}
