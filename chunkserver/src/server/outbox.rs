//! What the core thread sends during one iteration, coalesced per destination: every message
//! of every group for one peer (heartbeats of idle groups included) leaves as one batch, one
//! write on the shared connection, made by the core thread itself (see [`super::link`]).
//!
//! Backlogs are bounded. When a peer's backlog is full the batch is dropped and counted: the
//! protocol tolerates message loss (it is what the simulator injects), and a stalled peer must
//! never stall the core thread. Frontend replies are dropped the same way; the frontend
//! retries the request under the same identity and the group answers it at most once.

use std::collections::HashMap;

use std::sync::Arc;

use parallelraft::ReplicaId;

use super::link::{Dropped, LinkWriter};
use crate::pieces::Pieces;
use crate::wire::{encode_pieces, Body, Frame};

pub type ConnId = u64;

/// Bytes waiting for a peer's socket before batches are dropped.
pub const PEER_BACKLOG_BYTES: usize = 64 << 20;
/// Bytes waiting for a frontend's socket before replies are dropped (the frontend bounds its
/// own requests in flight, so this is seldom reached).
pub const FRONTEND_BACKLOG_BYTES: usize = 256 << 20;
/// Bytes of snapshot data buffered per peer per iteration.
const SNAPSHOT_ROOM_BYTES: usize = 4 << 20;

struct Link {
    writer: Arc<LinkWriter>,
    /// The batch being built: frames' bytes copied, their data shared (see [`Pieces`]).
    pending: Pieces,
    /// Head bytes of the last batch: the next one reserves that much up front instead of
    /// growing (and copying) from nothing frame by frame.
    last_batch_bytes: usize,
}

impl Link {
    fn new(writer: Arc<LinkWriter>) -> Link {
        Link { writer, pending: Pieces::default(), last_batch_bytes: 0 }
    }

    fn encode(&mut self, frame: &Frame) {
        if self.pending.is_empty() {
            self.pending.reserve(self.last_batch_bytes.clamp(MIN_RESERVE_BYTES, MAX_RESERVE_BYTES));
        }
        encode_pieces(frame, &mut self.pending);
    }
}

/// Bounds of what a link reserves for its next batch.
const MIN_RESERVE_BYTES: usize = 4 << 10;
const MAX_RESERVE_BYTES: usize = 4 << 20;

pub struct Outbox {
    cluster_id: u64,
    me: u32,
    peers: HashMap<ReplicaId, Link>,
    frontends: HashMap<ConnId, Link>,
    pub dropped_batches: u64,
}

impl Outbox {
    pub fn new(cluster_id: u64, me: ReplicaId) -> Outbox {
        Outbox { cluster_id, me: me.0, peers: HashMap::new(), frontends: HashMap::new(), dropped_batches: 0 }
    }

    pub fn add_peer(&mut self, peer: ReplicaId, writer: Arc<LinkWriter>) {
        self.peers.insert(peer, Link::new(writer));
    }

    pub fn add_frontend(&mut self, conn: ConnId, writer: Arc<LinkWriter>) {
        self.frontends.insert(conn, Link::new(writer));
    }

    pub fn remove_frontend(&mut self, conn: ConnId) {
        self.frontends.remove(&conn);
    }

    fn frame(&self, group: u32, body: Body) -> Frame {
        Frame { cluster_id: self.cluster_id, sender: self.me, group, body }
    }

    pub fn peer(&mut self, to: ReplicaId, group: u32, body: Body) {
        let frame = self.frame(group, body);
        if let Some(link) = self.peers.get_mut(&to) {
            link.encode(&frame);
        }
    }

    pub fn frontend(&mut self, conn: ConnId, group: u32, body: Body) {
        let frame = self.frame(group, body);
        if let Some(link) = self.frontends.get_mut(&conn) {
            link.encode(&frame);
        }
    }

    /// Whether more snapshot data may be queued for `peer` now.
    pub fn peer_has_room(&self, peer: ReplicaId) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|l| l.pending.len() < SNAPSHOT_ROOM_BYTES && l.writer.backlog_bytes() < SNAPSHOT_ROOM_BYTES)
    }

    /// Sends every pending batch (see [`LinkWriter::send`]: written at once unless the socket
    /// is full).
    pub fn flush(&mut self) {
        for link in self.peers.values_mut().chain(self.frontends.values_mut()) {
            if link.pending.is_empty() {
                continue;
            }
            link.last_batch_bytes = link.pending.head_len();
            let batch = link.pending.take();
            // Without a connection the batch is simply lost, as on a broken link (not counted:
            // a dead peer would count every heartbeat).
            if link.writer.send(batch) == Err(Dropped::Full) {
                self.dropped_batches += 1;
            }
        }
    }
}
