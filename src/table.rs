//! The client table: which requests have been applied, for at-most-once execution.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{BufMut, BytesMut};

use crate::codec::DecodeError;
use crate::entry::Entry;
use crate::types::{ClientId, RequestId};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ClientRecord {
    /// Every sequence number below it was acknowledged to the client.
    floor: u64,
    /// Applied sequence numbers at or above `floor`.
    applied: BTreeSet<u64>,
}

/// The fold, in index order, of the requests of every entry up to the applied watermark.
/// It is part of a checkpoint, so it survives log pruning.
///
/// Bounded: a client's entries below its floor are forgotten, so each client costs at most its
/// number of outstanding requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTable {
    clients: BTreeMap<ClientId, ClientRecord>,
}

impl ClientTable {
    /// Folds the next entry in index order.
    pub fn fold(&mut self, entry: &Entry) {
        let Some(id) = entry.request else { return };
        let record = self.clients.entry(id.client).or_default();
        if entry.floor > record.floor {
            record.floor = entry.floor;
            record.applied = record.applied.split_off(&entry.floor);
        }
        if id.seq >= record.floor {
            record.applied.insert(id.seq);
        }
    }

    /// True when `id` was applied, or is below its client's floor (acknowledged long ago).
    pub fn covers(&self, id: RequestId) -> bool {
        self.clients.get(&id.client).is_some_and(|r| id.seq < r.floor || r.applied.contains(&id.seq))
    }

    pub fn floor(&self, client: ClientId) -> u64 {
        self.clients.get(&client).map_or(0, |r| r.floor)
    }

    pub fn len(&self) -> usize {
        self.clients.values().map(|r| r.applied.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encoding for checkpoints: client count, then per client id, floor, applied count and
    /// the applied sequence numbers (u64 little endian each).
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u64_le(self.clients.len() as u64);
        for (client, record) in &self.clients {
            out.put_u64_le(client.0);
            out.put_u64_le(record.floor);
            out.put_u64_le(record.applied.len() as u64);
            for seq in &record.applied {
                out.put_u64_le(*seq);
            }
        }
    }

    pub fn decode(buf: &[u8]) -> Result<ClientTable, DecodeError> {
        let mut words = buf.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()));
        if !buf.len().is_multiple_of(8) {
            return Err(DecodeError("client table length"));
        }
        let mut next = || words.next().ok_or(DecodeError("client table truncated"));
        let mut table = ClientTable::default();
        for _ in 0..next()? {
            let client = ClientId(next()?);
            let floor = next()?;
            let mut applied = BTreeSet::new();
            for _ in 0..next()? {
                let seq = next()?;
                if seq < floor {
                    return Err(DecodeError("client table seq below floor"));
                }
                applied.insert(seq);
            }
            table.clients.insert(client, ClientRecord { floor, applied });
        }
        if next().is_ok() {
            return Err(DecodeError("client table trailing bytes"));
        }
        Ok(table)
    }

    pub fn check_invariants(&self) {
        for record in self.clients.values() {
            assert!(record.applied.iter().all(|s| *s >= record.floor), "client table holds seq below floor");
        }
    }
}
