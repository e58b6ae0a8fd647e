//! The sans-IO boundary: events the driver feeds in, commands the core emits.

use bytes::Bytes;

use crate::entry::{Entry, Op};
use crate::membership::{ConfigState, MembershipChange, MembershipError};
use crate::message::Message;
use crate::table::ClientTable;
use crate::types::{Index, ReplicaId, RequestId, Term};

/// Durable election state. The driver must make a `PersistHardState` durable before it
/// executes any later command (in particular before sending any later message): a vote or
/// term counts only once it is on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: Term,
    pub voted_for: Option<ReplicaId>,
    /// The term whose merged log this replica durably adopted (CE's `sync`). Voters grant only
    /// candidates whose sync term is at least theirs.
    pub sync: Term,
    /// End of the merged log of term `sync`: this replica holds every entry up to it (or has
    /// it applied under its checkpoint).
    pub sync_end: Index,
}

/// Durable checkpoint: every entry up to `index` is applied to durable blocks; `table` is the
/// client table at `index` and `config` the membership in force there (an unknown membership
/// at index 0 means "the bootstrap voters of the replica's `Config`").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointState {
    pub index: Index,
    pub table: ClientTable,
    pub config: ConfigState,
}

/// A client write-like request, proposed at the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRequest {
    pub id: RequestId,
    /// The client's lowest unacknowledged sequence number.
    pub floor: u64,
    pub op: Op,
}

/// Why the group did not execute a request. All but a refused membership change are retryable
/// by the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// Not the serving leader (maybe a hint of who is).
    NotLeader { hint: Option<ReplicaId> },
    /// The leader's proposal queue is full, or a membership change is already under way.
    Busy,
    /// A membership change was refused (only `LearnerBehind` is worth retrying).
    Membership(MembershipError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// One unit of logical time passed.
    Tick,
    /// The driver found its clock far ahead of the ticks it delivered (the process was paused,
    /// or a round ran long): an unknown stretch of time passed, so a read lease counted in
    /// ticks may have expired. The driver sends it before any other event after the stall.
    ClockJump,
    Receive {
        from: ReplicaId,
        message: Message,
    },
    Propose(ClientRequest),
    /// An operator's single-server membership change, answered once it is applied.
    ChangeMembership {
        id: RequestId,
        change: MembershipChange,
    },
    Read {
        id: RequestId,
        offset: u64,
        len_bytes: u64,
    },
    /// The disk write or truncation issued with `token` is durable.
    Persisted {
        token: u64,
    },
    /// The `Apply` of `index` reached the block store.
    Applied {
        index: Index,
    },
    ReadDone {
        id: RequestId,
    },
    /// The `Checkpoint` at `index` is durable.
    CheckpointDone {
        index: Index,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Synchronous: durable before the next command runs.
    PersistHardState(HardState),
    /// Asynchronous; completion is `Event::Persisted { token }`. Recovery replays surviving
    /// writes and truncations in the order they were issued; a later copy of an index replaces
    /// an earlier one.
    PersistEntries {
        token: u64,
        entries: Vec<Entry>,
    },
    /// Asynchronous, ordered with `PersistEntries`: drop every entry above `after`.
    TruncateLog {
        token: u64,
        after: Index,
    },
    /// Entries up to `through` are covered by a durable checkpoint and may be discarded.
    PruneLog {
        through: Index,
    },
    Send {
        to: ReplicaId,
        message: Message,
    },
    /// Write the entry's operation to the block store; completion is `Event::Applied`.
    Apply {
        entry: Entry,
    },
    /// Read the range from the block store and answer the client; completion `Event::ReadDone`.
    Read {
        id: RequestId,
        offset: u64,
        len_bytes: u64,
    },
    Reply {
        id: RequestId,
        result: Result<(), ClientError>,
    },
    /// Make every block write so far durable, then durably record `state`; completion is
    /// `Event::CheckpointDone { index: state.index }`.
    Checkpoint {
        state: CheckpointState,
    },
    /// Send `message` (a `Message::Snapshot`) together with the block image as of now.
    SendSnapshot {
        to: ReplicaId,
        message: Message,
    },
    /// Synchronous: install the block image that came with the `Snapshot` from `from` being
    /// processed, make it durable, and durably record `state`.
    InstallSnapshot {
        from: ReplicaId,
        state: CheckpointState,
    },
}

/// Payload helper for drivers: the bytes a `Write` carries.
pub fn write_data(op: &Op) -> Option<&Bytes> {
    match op {
        Op::Write { data, .. } => Some(data),
        _ => None,
    }
}
