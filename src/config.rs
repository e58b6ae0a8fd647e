//! Static configuration of one replica of one group.

use crate::types::ReplicaId;

/// Ack, commit and apply discipline, chosen at runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Out-of-order acknowledgement, commit and LBB-gated apply.
    Parallel,
    /// Classic Raft: followers acknowledge only their contiguous durable prefix, the leader
    /// commits in order, every replica applies in index order.
    Raft,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "parallel" => Ok(Mode::Parallel),
            "raft" => Ok(Mode::Raft),
            other => Err(format!("unknown mode {other:?}: expected parallel or raft")),
        }
    }
}

/// Deliberately broken protocol variants, for tests that prove the checkers can fail.
/// Never enable outside tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NaiveFlags {
    /// The paper's merge read literally: entries from every voter whatever their sync term,
    /// the highest *original term* wins, and holes no quorum member holds are skipped (a
    /// volatile no-op that is never written), which lets a later merge resurrect a ghost entry.
    pub paper_merge: bool,
    /// Raft-style leader-log-wins merge: the candidate keeps only its own log, fills its own
    /// holes with no-ops and truncates the followers after its last index, dropping entries
    /// that were committed out of order.
    pub raft_truncation: bool,
    /// Leader reads served at once, without the read-index round: a deposed leader that does
    /// not know it yet answers with stale data.
    pub unsafe_reads: bool,
    /// The read lease survives `Event::ClockJump`: a leader resuming from a pause still counts
    /// its lease in ticks that stood still, and answers from a state a newer leader overwrote.
    pub lease_ignores_pauses: bool,
}

/// How much shorter than the election timeout a read lease must be: one tick of granularity
/// at the leader (a round sent late in its tick), one at the voter (a heartbeat received late
/// in its tick), one for a tick the driver delivers late without reporting a clock jump, and
/// one to spare.
pub const LEASE_MARGIN_TICKS: u32 = 4;

#[derive(Clone, Debug)]
pub struct Config {
    pub id: ReplicaId,
    /// The group's bootstrap voters, including `id`: the membership at index 0. Empty for a
    /// replica created to join an existing group, which learns the membership from the leader.
    /// Once the log or a checkpoint holds a configuration, that one is in force instead.
    pub voters: Vec<ReplicaId>,
    pub mode: Mode,
    /// Look-behind span N: each entry describes the ranges of its N predecessors.
    pub lbb_span: usize,
    /// Leader in-flight window in entries past the committed watermark; `None`: N + 1, the
    /// paper's bound, with which no hole above the committed watermark exceeds the span. A
    /// wider window keeps writes committing past an entry that lacks a majority for longer (a
    /// message held up on both followers' paths): with N + 1 the pipeline stops N + 1 entries
    /// after it. The price is paid on followers only: a hole wider than the span has unknown
    /// ranges, which conflict with everything, so a follower applies nothing past it until it
    /// is filled (its acknowledgements do not wait; they mean durable only).
    pub in_flight_window: Option<u64>,
    /// Election timeouts are drawn from `[min, 2 * min)` ticks.
    pub election_timeout_min_ticks: u32,
    pub heartbeat_interval_ticks: u32,
    /// Read lease, in ticks; 0 turns it off. A leader serves reads without a read-index round
    /// until this many ticks after sending a heartbeat round that a quorum of voters echoed.
    /// Safe because a voter that echoed a round refuses to help elect anyone else for
    /// `election_timeout_min_ticks` after it received it (stickiness, also across restarts),
    /// provided the lease is shorter by a margin for tick granularity on both sides and a
    /// late tick, and the driver reports a stalled clock with `Event::ClockJump`.
    pub lease_ticks: u32,
    /// Take a checkpoint (and prune the log) once this many entries are applied past the last.
    pub checkpoint_interval: u64,
    /// ... or once this many payload bytes were applied since the last one started: the log
    /// above the checkpoint is held in memory, replayed at a restart, and (its part above a
    /// follower's committed watermark) re-sent by a new leader. Entries alone let 4,096 writes
    /// of 128 KiB (512 MiB) accumulate.
    pub checkpoint_bytes: u64,
    /// ... or once nothing more was applied for this many ticks while some entries are applied
    /// past the last checkpoint (0, the default: never). A chunk that stops being written then
    /// lets go of its log: its entries would otherwise keep every later segment of the
    /// server's shared WAL until it is written again (or rewrites its log at the WAL's head),
    /// and the segments freed all at once are deleted, not reused, so the next ones are zeroed
    /// anew.
    pub checkpoint_idle_ticks: u64,
    /// Entries per Append message.
    pub max_batch_entries: usize,
    /// Bytes of entries (encoded) in one Sync message: a new leader sends its decided log (or a new
    /// learner's) in chunks of this much (one entry at least). A follower that needs pruned
    /// entries is caught up from the block image instead, which streams in bounded frames.
    pub max_sync_bytes: u64,
    /// Bytes of entries (encoded) in one VoteResponse: what a voter holds that the candidate lacks (merge
    /// phase 1). A voter refuses a candidate that lacks more (and more than one entry) rather
    /// than send a message the transport would refuse; a fresher candidate wins instead. Keep
    /// it as large as one transport frame allows: a cluster in which every candidate lacks more
    /// than this of some voter's log cannot elect (phase 1 is a single round).
    pub max_vote_bytes: u64,
    /// Proposals queued at the leader while the in-flight window is full; beyond it: `Busy`.
    pub max_queued_proposals: usize,
    /// Seed of the replica's election-timeout randomness.
    pub seed: u64,
    pub naive: NaiveFlags,
}

impl Config {
    pub fn new(id: ReplicaId, voters: Vec<ReplicaId>, mode: Mode, seed: u64) -> Config {
        Config {
            id,
            voters,
            mode,
            lbb_span: lbb::DEFAULT_SPAN,
            in_flight_window: None,
            election_timeout_min_ticks: 10,
            heartbeat_interval_ticks: 2,
            lease_ticks: 10 - LEASE_MARGIN_TICKS,
            checkpoint_interval: 64,
            checkpoint_bytes: 16 << 20,
            checkpoint_idle_ticks: 0,
            max_batch_entries: 64,
            max_sync_bytes: 32 << 20,
            max_vote_bytes: 64 << 20,
            max_queued_proposals: 256,
            seed,
            naive: NaiveFlags::default(),
        }
    }

    /// Leader in-flight window: new entries stay within `committed watermark + window` (see
    /// `in_flight_window`).
    pub fn window(&self) -> u64 {
        self.in_flight_window.unwrap_or(self.lbb_span as u64 + 1)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.voters.is_empty() && !self.voters.contains(&self.id) {
            return Err(format!("replica {:?} is not among the voters {:?}", self.id, self.voters));
        }
        if self.lbb_span == 0 {
            return Err("lbb_span must be at least 1".into());
        }
        if self.in_flight_window == Some(0) {
            return Err("in_flight_window must be at least 1".into());
        }
        if self.election_timeout_min_ticks <= 2 * self.heartbeat_interval_ticks {
            return Err("election timeout must exceed two heartbeat intervals".into());
        }
        if self.lease_ticks > 0 && self.lease_ticks + LEASE_MARGIN_TICKS > self.election_timeout_min_ticks {
            return Err(format!(
                "lease_ticks must be at most election_timeout_min_ticks - {LEASE_MARGIN_TICKS} (or 0 for no lease)"
            ));
        }
        if self.checkpoint_interval == 0 || self.checkpoint_bytes == 0 || self.max_batch_entries == 0 {
            return Err("checkpoint_interval, checkpoint_bytes and max_batch_entries must be positive".into());
        }
        Ok(())
    }
}
