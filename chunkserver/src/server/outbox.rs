//! What the core thread sends during one iteration, coalesced per destination: every message
//! of every group for one peer (heartbeats of idle groups included) leaves as one batch, one
//! write on the shared connection.
//!
//! Queues are bounded. When a peer's queue is full the batch is dropped and counted: the
//! protocol tolerates message loss (it is what the simulator injects), and a stalled peer must
//! never stall the core thread. Frontend replies are dropped the same way; the frontend
//! retries the request under the same identity and the group answers it at most once.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use parallelraft::ReplicaId;
use tokio::sync::mpsc;

use crate::wire::{encode, Body, Frame};

pub type ConnId = u64;

/// Batches queued per peer link before frames are dropped.
pub const PEER_QUEUE_BATCHES: usize = 256;
/// Batches queued per frontend connection.
pub const FRONTEND_QUEUE_BATCHES: usize = 1024;
/// Bytes of snapshot data buffered per peer per iteration.
const SNAPSHOT_ROOM_BYTES: usize = 4 << 20;

struct Link {
    tx: mpsc::Sender<Bytes>,
    pending: BytesMut,
}

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

    pub fn add_peer(&mut self, peer: ReplicaId, tx: mpsc::Sender<Bytes>) {
        self.peers.insert(peer, Link { tx, pending: BytesMut::new() });
    }

    pub fn add_frontend(&mut self, conn: ConnId, tx: mpsc::Sender<Bytes>) {
        self.frontends.insert(conn, Link { tx, pending: BytesMut::new() });
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
            encode(&frame, &mut link.pending);
        }
    }

    pub fn frontend(&mut self, conn: ConnId, group: u32, body: Body) {
        let frame = self.frame(group, body);
        if let Some(link) = self.frontends.get_mut(&conn) {
            encode(&frame, &mut link.pending);
        }
    }

    /// Whether more snapshot data may be queued for `peer` now.
    pub fn peer_has_room(&self, peer: ReplicaId) -> bool {
        self.peers.get(&peer).is_some_and(|l| l.pending.len() < SNAPSHOT_ROOM_BYTES && l.tx.capacity() > 1)
    }

    /// Hands every pending batch to its connection task.
    pub fn flush(&mut self) {
        for link in self.peers.values_mut().chain(self.frontends.values_mut()) {
            if link.pending.is_empty() {
                continue;
            }
            let batch = link.pending.split().freeze();
            if link.tx.try_send(batch).is_err() {
                self.dropped_batches += 1;
            }
        }
    }
}
