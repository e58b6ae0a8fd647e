//! Messages between replicas of one group.

use crate::entry::Entry;
use crate::membership::ConfigState;
use crate::table::ClientTable;
use crate::types::{Index, Term};

/// What the leader tells followers is committed: everything up to `watermark`, plus the
/// indices in `above` (committed out of order; bounded by the in-flight window).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitNotice {
    pub watermark: Index,
    /// Inclusive runs `(first, last)`: ascending, each above `watermark + 1` (which is not
    /// committed, or it would be the watermark), and apart by at least one index (the decoder
    /// refuses anything else). Runs, not indices: behind a write that waits for stragglers
    /// nearly every index of the in-flight window is committed above the watermark, hundreds
    /// of indices in one or a few runs, sent with every append.
    pub above: Vec<(Index, Index)>,
}

impl CommitNotice {
    /// The notice for `watermark` and the ascending indices committed above it.
    pub fn new(watermark: Index, above: impl IntoIterator<Item = Index>) -> CommitNotice {
        let mut runs: Vec<(Index, Index)> = Vec::new();
        for i in above {
            match runs.last_mut() {
                Some((_, last)) if last.next() == i => *last = i,
                _ => runs.push((i, i)),
            }
        }
        CommitNotice { watermark, above: runs }
    }

    /// Whether the notice keeps the contract of [`CommitNotice::above`].
    pub fn is_well_formed(&self) -> bool {
        // The least index the next run may start at; `None` past the end of the index space.
        let mut least = self.watermark.0.checked_add(2);
        self.above.iter().all(|&(first, last)| {
            let ok = least.is_some_and(|l| first.0 >= l) && first <= last;
            least = last.0.checked_add(2);
            ok
        })
    }
}

/// What a candidate says about its log when it asks for a (pre-)vote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidacy {
    /// The term whose merged log the candidate durably adopted.
    pub sync: Term,
    /// End of that merged log.
    pub sync_end: Index,
    /// The candidate's contiguous committed watermark; voters send their entries above it.
    pub committed: Index,
    /// Every entry up to here is held and durable at the candidate.
    pub durable: Index,
    /// Index of the candidate's configuration entry in force.
    pub config: Index,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Would you vote for me in `term`? Changes no state at the receiver.
    PreVote {
        term: Term,
        candidate: Candidacy,
    },
    PreVoteResponse {
        term: Term,
        granted: bool,
    },
    /// Phase 1 of the merge: a vote request.
    Vote {
        term: Term,
        candidate: Candidacy,
    },
    VoteResponse {
        term: Term,
        granted: bool,
        sync: Term,
        committed: Index,
        checkpoint: Index,
        /// The voter's entries above the candidate's watermark, sent only when the voter's
        /// sync term equals the candidate's.
        entries: Vec<Entry>,
    },
    /// Phase 2 of the merge: the decided log `(base, end]` at ballot `term`, in chunks of at
    /// most `Config::max_sync_bytes`: this one carries `(base, upto]`. The receiver replaces its
    /// entries in that span (truncating after `end` at the first chunk) and adopts `term` as its
    /// sync term once it holds the whole span durably.
    Sync {
        term: Term,
        base: Index,
        upto: Index,
        end: Index,
        entries: Vec<Entry>,
    },
    Append {
        term: Term,
        entries: Vec<Entry>,
        commit: CommitNotice,
    },
    Heartbeat {
        term: Term,
        commit: CommitNotice,
        read_seq: u64,
    },
    /// Every follower answer to a leader: acknowledgements, progress and read-index echo.
    Ack {
        term: Term,
        /// Entries of this term newly durable here (out-of-order acknowledgement).
        acked: Vec<Index>,
        /// Every entry up to here is durable here.
        durable: Index,
        /// Contiguous committed watermark here.
        committed: Index,
        /// The follower's sync term equals `term`: it accepts appends.
        synced: bool,
        /// Not synced, but adopting this term's decided log: it holds it through here (the
        /// next chunk starts here); 0 when not adopting it.
        sync_received: Index,
        read_seq: u64,
    },
    /// Streaming catch-up: the sender's block image (carried beside the message by the
    /// driver) as of at least `checkpoint`, with the client table and membership at `checkpoint`.
    /// A receiver not yet synced to `term` also adopts the decided log `(checkpoint, end]`,
    /// exactly as from a `Sync` based at the checkpoint: `entries` carry `(checkpoint, upto]`
    /// and chunks of `Sync` the rest.
    Snapshot {
        term: Term,
        checkpoint: Index,
        table: ClientTable,
        config: ConfigState,
        upto: Index,
        end: Index,
        entries: Vec<Entry>,
    },
}

impl Message {
    pub fn term(&self) -> Term {
        match self {
            Message::PreVote { term, .. }
            | Message::PreVoteResponse { term, .. }
            | Message::Vote { term, .. }
            | Message::VoteResponse { term, .. }
            | Message::Sync { term, .. }
            | Message::Append { term, .. }
            | Message::Heartbeat { term, .. }
            | Message::Ack { term, .. }
            | Message::Snapshot { term, .. } => *term,
        }
    }
}
