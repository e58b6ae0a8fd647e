//! Simulated clients: each keeps up to `iodepth` requests outstanding, retries with the same
//! request identity until answered, and records the history the checkers judge.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::disk::BLOCK_SIZE;
use super::{redirect, Ev, Net, Node, Sim};
use crate::entry::Op;
use crate::io::{ClientError, ClientRequest};
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
    /// Simulated time of the first send.
    pub invoked_at: u64,
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

    /// Draws the next operation over a small address space, so writes conflict often; with
    /// `writes_only` (the perf model), a write of one block anywhere in the volume.
    pub fn next_op(&mut self, volume_blocks: u64, writes_only: bool) -> (RequestId, Option<Op>, OpKind, u64, u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let id = RequestId { client: self.id, seq };
        if writes_only {
            let first = self.rng.range(0, volume_blocks);
            return (
                id,
                Some(Op::Write { offset: first * BLOCK_SIZE, data: payload(id, first) }),
                OpKind::Write,
                first,
                1,
            );
        }
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

impl Sim {
    pub(super) fn client_wake(&mut self, c: usize) {
        let now = self.now;
        let retry = self.client_retry();
        // Retries of unanswered requests.
        let due: Vec<u64> =
            self.clients[c].outstanding.iter().filter(|(_, o)| o.retry_at <= now).map(|(s, _)| *s).collect();
        for seq in due {
            let n = self.replicas.len() as u32;
            let client = &mut self.clients[c];
            let o = client.outstanding.get_mut(&seq).unwrap();
            if o.retry_is_timeout {
                // No answer at all: try the next replica.
                o.target = ReplicaId((o.target.0 + 1) % n);
            }
            o.retry_at = now + retry;
            o.retry_is_timeout = true;
            let target = o.target;
            self.send_request(c, seq, target);
        }
        // New operations up to the client's depth.
        while self.clients[c].remaining > 0 && self.clients[c].outstanding.len() < self.clients[c].iodepth {
            let (volume, writes_only) = (self.cfg.volume_blocks, self.cfg.perf.is_some());
            let client = &mut self.clients[c];
            client.remaining -= 1;
            let (id, op, kind, first, blocks) = client.next_op(volume, writes_only);
            let target = client.leader_guess;
            client.outstanding.insert(
                id.seq,
                Outstanding {
                    op,
                    first_block: first,
                    blocks,
                    target,
                    retry_at: now + retry,
                    retry_is_timeout: true,
                    invoked_at: now,
                },
            );
            let invoked = self.tick_clock();
            self.history_index.insert(id, self.history.len());
            self.history.push(HistoryOp {
                id,
                kind,
                first_block: first,
                blocks,
                invoked,
                responded: None,
                observed: Vec::new(),
            });
            self.send_request(c, id.seq, target);
        }
        if !(self.clients[c].remaining == 0 && self.clients[c].outstanding.is_empty()) {
            let next = self.clients[c].outstanding.values().map(|o| o.retry_at).min().unwrap_or(now + 1);
            self.schedule_wake(c, next.max(now + 1) - now);
        }
    }

    pub(super) fn send_request(&mut self, c: usize, seq: u64, target: ReplicaId) {
        let client = &self.clients[c];
        let id = RequestId { client: client.id, seq };
        let floor = client.floor();
        let o = &client.outstanding[&seq];
        let net = match &o.op {
            Some(op) => Net::Request(ClientRequest { id, floor, op: op.clone() }),
            None => Net::ReadRequest { id, offset: o.first_block * BLOCK_SIZE, len_bytes: o.blocks * BLOCK_SIZE },
        };
        self.net_send(Node::Client(c), Node::Replica(target.0 as usize), net);
    }

    pub(super) fn client_reply(
        &mut self,
        c: usize,
        from: Node,
        id: RequestId,
        result: Result<(), ClientError>,
        blocks: Option<Vec<(Option<RequestId>, Bytes)>>,
    ) {
        let Node::Replica(from) = from else { return };
        let now = self.now;
        let n = self.replicas.len() as u32;
        let client = &mut self.clients[c];
        let Some(o) = client.outstanding.get_mut(&id.seq) else { return }; // late duplicate
        match result {
            Ok(()) => {
                client.leader_guess = ReplicaId(from as u32);
                let o = client.outstanding.remove(&id.seq).unwrap();
                let responded = self.tick_clock();
                let h = self.history_index[&id];
                if let Some(blocks) = blocks {
                    for (k, (tag, data)) in blocks.iter().enumerate() {
                        self.verify_block(o.first_block + k as u64, *tag, data, "read");
                    }
                    self.history[h].observed = blocks.iter().map(|(t, _)| *t).collect();
                }
                self.history[h].responded = Some(responded);
                self.stats.ops_completed += 1;
                if self.cfg.perf.is_some() {
                    self.stats.writes.push((o.invoked_at, now));
                }
                self.client_wake_soon(c);
            }
            Err(ClientError::NotLeader { hint }) => {
                let next = redirect(hint, from, n);
                client.leader_guess = next;
                o.target = next;
                o.retry_at = now + 5;
                o.retry_is_timeout = false;
                self.schedule_wake(c, 5);
            }
            Err(ClientError::Busy) => {
                o.retry_at = now + 30;
                o.retry_is_timeout = false;
                self.schedule_wake(c, 30);
            }
            Err(ClientError::Membership(e)) => {
                self.violations.push(format!("client request {id:?} answered with a membership error: {e}"));
            }
        }
    }

    pub(super) fn client_wake_soon(&mut self, c: usize) {
        self.schedule_wake(c, 1);
    }

    /// Keeps at most one useful wake-up per client: the earliest one.
    pub(super) fn schedule_wake(&mut self, c: usize, delay: u64) {
        let at = self.now + delay;
        match self.clients[c].next_wake {
            Some(t) if t > self.now && t <= at => {}
            _ => {
                self.clients[c].next_wake = Some(at);
                self.schedule(delay, Ev::ClientWake(c));
            }
        }
    }
}
