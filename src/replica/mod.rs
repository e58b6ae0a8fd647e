//! One replica of one ParallelRaft group: a pure state machine.
//!
//! The driver calls [`Replica::step`] with an [`Event`] and then drains [`Replica::take_commands`],
//! executing the commands in order. It may step several events before it drains: the entries a
//! leader appends in between go to each follower in one append message. Nothing here performs
//! IO, reads a clock or spawns threads; randomness comes from the seed in [`Config`].
//!
//! Roles: follower → pre-candidate (pre-vote, no state change) → candidate (vote = merge phase 1)
//! → leader, which first merges and syncs the decided log to a quorum (merge phase 2) and only
//! then serves.

mod apply;
mod election;
mod flow;
mod merge;
mod reconfig;
mod replicate;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use lbb::{ApplyGate, LookBehind, RangeSet};

use crate::config::{Config, Mode};
use crate::entry::Entry;
use crate::io::{CheckpointState, ClientError, ClientRequest, Command, Event, HardState};
use crate::log::Log;
use crate::membership::{ConfigState, Membership, MembershipChange};
use crate::message::Message;
use crate::rng::Rng;
use crate::table::ClientTable;
use crate::types::{ClientId, Index, ReplicaId, RequestId, Term};

/// What a candidate learned from one voter (phase 1 of the merge).
#[derive(Clone, Debug)]
struct VoteInfo {
    sync: Term,
    committed: Index,
    entries: Vec<Entry>,
}

/// The leader's view of one follower.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// The follower adopted this leader's merged log (its sync term equals our term).
    synced: bool,
    /// Every entry up to here is durable at the follower.
    durable: Index,
    /// Entries above `durable` the follower acknowledged individually.
    acked: BTreeSet<Index>,
    /// The follower's committed watermark, once known.
    committed: Option<Index>,
    read_seq: u64,
    last_heard_tick: Option<u64>,
    last_snapshot_tick: Option<u64>,
    last_sync_tick: Option<u64>,
    /// While not synced: the follower holds our decided log through here (its last ack), so
    /// the next Sync chunk starts here; 0 when it is not adopting it.
    sync_received: Index,
    /// Highest index sent to the follower in an Append since it was last synced: entries up to
    /// here are in flight (or lost) and are resent only when the follower stalls.
    sent_upto: Index,
    /// Tick at which `durable` last advanced, the in-flight entries were last resent, or new
    /// entries were sent with none in flight before them.
    stall_tick: u64,
    /// Tick at which `durable` last advanced or stood at our last index, or the follower
    /// became synced: whether it keeps up (see `flow`).
    moved_tick: u64,
}

/// Bound of `LeaderState::rounds`. Rounds start with every heartbeat (every two ticks) and
/// with every read while the lease has lapsed; when full, the oldest unconfirmed round is
/// forgotten, which can only delay the lease, never extend it.
const MAX_ROUNDS_TRACKED: usize = 64;

#[derive(Clone, Debug)]
struct PendingRead {
    id: RequestId,
    offset: u64,
    len_bytes: u64,
    ranges: RangeSet,
    /// The last log index when the read arrived: the read observes every entry up to it.
    fence: Index,
    /// Read-index round: confirmed once a quorum echoes a sequence at least this one.
    seq: u64,
}

/// A membership change waiting at the leader: first for a read-index round that confirms we
/// still lead (a deposed leader must not refuse a change from its stale membership), then for
/// the configuration barrier.
#[derive(Clone, Copy, Debug)]
struct PendingChange {
    id: RequestId,
    change: MembershipChange,
    read_seq: u64,
}

#[derive(Debug)]
struct LeaderState {
    /// End of the merged log: everything up to it is decided at our ballot.
    merge_end: Index,
    serving: bool,
    progress: BTreeMap<ReplicaId, Progress>,
    waiters: BTreeMap<Index, Vec<RequestId>>,
    /// Requests held in the log above the applied watermark.
    in_log: HashMap<RequestId, Index>,
    /// Highest floor per client among log entries above the applied watermark.
    floors: HashMap<ClientId, u64>,
    queue: VecDeque<ClientRequest>,
    reads: Vec<PendingRead>,
    /// Every heartbeat broadcast starts a read-index round with the next sequence.
    read_seq: u64,
    /// Rounds sent and not yet echoed by a quorum: (sequence, tick sent), oldest first, at
    /// most [`MAX_ROUNDS_TRACKED`] (forgetting the oldest only delays a lease).
    rounds: VecDeque<(u64, u64)>,
    /// Reads need no round of their own while `ticks < lease_until` (`Config::lease_ticks`).
    lease_until: u64,
    /// Entries appended during the current step, broadcast once at its end.
    unsent: Vec<Entry>,
    elected_tick: u64,
    /// The one membership change accepted but not yet appended (see `reconfig`).
    change: Option<PendingChange>,
    /// Payload bytes appended, as running totals: how far followers lag (see `flow`).
    payload: flow::PayloadTotals,
    /// Entries under the checkpoint that followers keeping up still lack (see `flow`).
    retained: flow::Retained,
}

#[derive(Debug)]
enum Role {
    Follower,
    PreCandidate { term: Term, grants: BTreeSet<ReplicaId> },
    Candidate { votes: BTreeMap<ReplicaId, VoteInfo> },
    Leader(Box<LeaderState>),
}

/// A merge or sync whose writes are on their way to disk; the sync term is adopted when the
/// last of `tokens` completes.
#[derive(Clone, Debug)]
struct SyncPending {
    term: Term,
    end: Index,
    /// The decided log is in place through here (the chunks received so far); the sync
    /// completes once it reaches `end`.
    received: Index,
    tokens: BTreeSet<u64>,
}

/// Role name for observers (the simulator, metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleKind {
    Follower,
    PreCandidate,
    Candidate,
    /// Elected, merging: not serving yet.
    LeaderMerging,
    Leader,
}

pub struct Replica {
    cfg: Config,
    rng: Rng,
    hard: HardState,
    log: Log,
    /// Contiguous committed watermark W: every index up to it is committed.
    committed: Index,
    /// Indices above W known committed (out-of-order commit).
    committed_above: BTreeSet<Index>,
    /// Every index in `(committed, notice_scanned]` this replica holds is committed, so a commit
    /// notice need not look at them again. Why: a follower lacking one entry keeps W below it
    /// while the leader commits past it, and each notice rescanned everything held up to the
    /// leader's watermark (3% of the machine's CPU samples with stragglers and a wide window).
    /// Only [`Replica::put_entry`] adds entries, and it lowers this below the one it adds.
    notice_scanned: Index,
    gate: ApplyGate,
    /// Client table folded over entries up to `folded` (== the applied watermark).
    table: ClientTable,
    folded: Index,
    /// Payload bytes of the entries folded since the last checkpoint started (or since this
    /// replica started): the byte trigger of `maybe_checkpoint`.
    folded_bytes_since_checkpoint: u64,
    /// The tick at which the applied watermark last moved: the idle trigger of
    /// `maybe_checkpoint`.
    last_fold_tick: u64,
    role: Role,
    leader_hint: Option<ReplicaId>,
    ticks: u64,
    last_leader_contact: Option<u64>,
    election_deadline: u64,
    next_token: u64,
    /// Disk writes in flight: token → copies (index, ballot, term) it makes durable.
    writes_in_flight: BTreeMap<u64, Vec<(Index, Term, Term)>>,
    sync_pending: Option<SyncPending>,
    applying: BTreeMap<Index, RangeSet>,
    executing_reads: BTreeMap<RequestId, RangeSet>,
    checkpoint_in_progress: Option<Index>,
    /// See [`Replica::proposals_held_by_lag`].
    proposals_held_by_lag: u64,
    out: Vec<Command>,
    /// Reads accepted as leader: served under the read lease (or alone in the group), and
    /// confirmed by a read-index round of their own. For metrics.
    reads_leased: u64,
    reads_with_round: u64,
    /// Votes refused because the merge report would exceed `max_vote_bytes` (since start).
    oversized_vote_refusals: u64,
}

impl Replica {
    /// A brand-new replica with an empty log.
    pub fn new(cfg: Config) -> Replica {
        Replica::recover(cfg, HardState::default(), CheckpointState::default(), Vec::new())
    }

    /// A replica restarted from what survived on disk: hard state, checkpoint and the log
    /// entries recovered from the write-ahead log (any order; a later copy of an index must
    /// already have replaced an earlier one).
    pub fn recover(cfg: Config, hard: HardState, checkpoint: CheckpointState, entries: Vec<Entry>) -> Replica {
        cfg.validate().expect("invalid replica config");
        let strict = cfg.mode == Mode::Raft;
        // An unknown membership at the checkpoint means the bootstrap voters (none for a
        // replica created to join a group).
        let base = if checkpoint.config.membership.is_known() {
            checkpoint.config
        } else {
            ConfigState { index: Index(0), membership: Membership::with_voters(cfg.voters.iter().copied()) }
        };
        let mut replica = Replica {
            rng: Rng::new(cfg.seed),
            gate: ApplyGate::new(cfg.lbb_span, strict, checkpoint.index.0),
            log: Log::new(checkpoint.index, base),
            committed: checkpoint.index,
            committed_above: BTreeSet::new(),
            notice_scanned: checkpoint.index,
            table: checkpoint.table,
            folded: checkpoint.index,
            folded_bytes_since_checkpoint: 0,
            last_fold_tick: 0,
            role: Role::Follower,
            leader_hint: None,
            ticks: 0,
            // A replica that ever took part (a term above 0 is durable before it echoes any
            // round) counts its restart as leader contact: it may have echoed a round of a
            // leader whose read lease still runs, and must not help elect another before the
            // lease ends. A crash loses `last_leader_contact`; this puts it back, conservatively.
            last_leader_contact: (hard.term > Term(0)).then_some(0),
            election_deadline: 0,
            next_token: 1,
            writes_in_flight: BTreeMap::new(),
            sync_pending: None,
            applying: BTreeMap::new(),
            executing_reads: BTreeMap::new(),
            checkpoint_in_progress: None,
            proposals_held_by_lag: 0,
            out: Vec::new(),
            reads_leased: 0,
            reads_with_round: 0,
            oversized_vote_refusals: 0,
            hard,
            cfg,
        };
        for entry in entries {
            if entry.index > checkpoint.index {
                replica.gate_insert(&entry);
                replica.put_entry(entry, true);
            }
        }
        replica.reset_election_deadline();
        replica
    }

    pub fn id(&self) -> ReplicaId {
        self.cfg.id
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard
    }

    pub fn term(&self) -> Term {
        self.hard.term
    }

    pub fn committed_watermark(&self) -> Index {
        self.committed
    }

    pub fn applied_watermark(&self) -> Index {
        Index(self.gate.applied_watermark())
    }

    /// The highest index this replica knows committed (committed out of order above the
    /// watermark included): nothing above it can have been applied here.
    pub fn highest_committed(&self) -> Index {
        self.committed_above.last().copied().unwrap_or(self.committed).max(self.committed)
    }

    pub fn last_index(&self) -> Index {
        self.log.last_index()
    }

    /// The membership in force (the latest configuration entry held).
    pub fn membership(&self) -> &Membership {
        self.log.membership()
    }

    /// The membership in force and the index of its configuration entry.
    pub fn config_state(&self) -> ConfigState {
        self.log.config()
    }

    pub fn checkpoint_index(&self) -> Index {
        self.log.checkpoint()
    }

    pub fn is_committed(&self, index: Index) -> bool {
        index <= self.committed || self.committed_above.contains(&index)
    }

    pub fn entry(&self, index: Index) -> Option<&Entry> {
        self.log.entry(index)
    }

    /// The entries held above the checkpoint, in index order: what a recovery from the log
    /// would need (a driver rewriting its log elsewhere writes these).
    pub fn entries(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.log.iter_from(self.log.checkpoint()).map(|slot| &slot.entry)
    }

    /// Indexes between the checkpoint and the last index that this replica does not hold.
    pub fn holes(&self) -> u64 {
        let span = self.log.last_index().0 - self.log.checkpoint().0;
        span.saturating_sub(self.log.len() as u64)
    }

    /// How far below the last index lies the lowest index above the committed watermark that
    /// this replica lacks (0: none). Beyond the look-behind span no held entry describes that
    /// hole, so nothing past it applies until it is filled.
    pub fn hole_depth(&self) -> u64 {
        if self.holes() == 0 {
            return 0;
        }
        let last = self.log.last_index();
        let mut lowest_missing = self.committed.next();
        for i in self.log.indices_in(lowest_missing, last) {
            if i != lowest_missing {
                break;
            }
            lowest_missing = i.next();
        }
        last.0.saturating_sub(lowest_missing.0)
    }

    pub fn pending_list_len(&self) -> usize {
        self.gate.pending(&RangeSet::new()).len()
    }

    pub fn role(&self) -> RoleKind {
        match &self.role {
            Role::Follower => RoleKind::Follower,
            Role::PreCandidate { .. } => RoleKind::PreCandidate,
            Role::Candidate { .. } => RoleKind::Candidate,
            Role::Leader(l) if l.serving => RoleKind::Leader,
            Role::Leader(_) => RoleKind::LeaderMerging,
        }
    }

    /// Reads accepted as leader since start: (without a round of their own, with one).
    pub fn read_counts(&self) -> (u64, u64) {
        (self.reads_leased, self.reads_with_round)
    }

    /// Votes refused since start because what the candidate lacked exceeded `max_vote_bytes`.
    pub fn oversized_vote_refusals(&self) -> u64 {
        self.oversized_vote_refusals
    }

    pub fn leader_hint(&self) -> Option<ReplicaId> {
        match self.role {
            Role::Leader(_) => Some(self.cfg.id),
            _ => self.leader_hint,
        }
    }

    /// Drains the commands produced so far; execute them in order. First sends the entries
    /// appended since the last drain to every synced follower, in one message each.
    pub fn take_commands(&mut self) -> Vec<Command> {
        self.flush_appends();
        std::mem::take(&mut self.out)
    }

    /// Feeds one event into the state machine.
    pub fn step(&mut self, event: Event) {
        match event {
            Event::Tick => self.on_tick(),
            Event::ClockJump => self.on_clock_jump(),
            Event::Receive { from, message } => self.on_message(from, message),
            Event::Propose(request) => self.on_propose(request),
            Event::ChangeMembership { id, change } => self.on_change_membership(id, change),
            Event::Read { id, offset, len_bytes } => self.on_read(id, offset, len_bytes),
            Event::Persisted { token } => self.on_persisted(token),
            Event::Applied { index } => self.on_applied(index),
            Event::ReadDone { id } => self.on_read_done(id),
            Event::CheckpointDone { index } => self.on_checkpoint_done(index),
        }
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        self.maybe_checkpoint();
        if matches!(self.role, Role::Leader(_)) {
            self.leader_tick();
            return;
        }
        if !self.leader_recently_heard() {
            // A stale hint would send clients in circles (a removed server never hears from
            // the group's leader again).
            self.leader_hint = None;
        }
        if self.ticks >= self.election_deadline {
            self.start_pre_vote();
        }
    }

    fn on_message(&mut self, from: ReplicaId, message: Message) {
        if from == self.cfg.id {
            return;
        }
        // Anyone may send: a replica joining a group does not know its members yet, and a
        // removed server is kept from disrupting us by the vote rules (`candidate_allowed`).
        match message {
            Message::PreVote { term, candidate } => self.on_pre_vote(from, term, candidate),
            Message::PreVoteResponse { term, granted } => self.on_pre_vote_response(from, term, granted),
            Message::Vote { term, candidate } => self.on_vote(from, term, candidate),
            Message::VoteResponse { term, granted, sync, committed, checkpoint: _, entries } => {
                self.on_vote_response(from, term, granted, VoteInfo { sync, committed, entries })
            }
            Message::Sync { term, base, upto, end, entries } => self.on_sync(from, term, base, upto, end, entries),
            Message::Append { term, entries, commit } => self.on_append(from, term, entries, commit),
            Message::Heartbeat { term, commit, read_seq } => self.on_heartbeat(from, term, commit, read_seq),
            Message::Ack { term, acked, durable, committed, synced, sync_received, read_seq } => {
                self.on_ack(from, term, acked, durable, committed, synced, sync_received, read_seq)
            }
            Message::Snapshot { term, checkpoint, table, config, upto, end, entries } => {
                let state = CheckpointState { index: checkpoint, table, config };
                self.on_snapshot(from, term, state, upto, end, entries)
            }
        }
    }

    // ---- helpers shared by the role modules ----

    fn send(&mut self, to: ReplicaId, message: Message) {
        debug_assert_ne!(to, self.cfg.id);
        self.out.push(Command::Send { to, message });
    }

    fn reply(&mut self, id: RequestId, result: Result<(), ClientError>) {
        self.out.push(Command::Reply { id, result });
    }

    /// True when we are the serving leader; otherwise answers `id` (not the leader, with a
    /// hint; or busy while the merge runs) and returns false.
    fn serving_or_refuse(&mut self, id: RequestId) -> bool {
        let result = match &self.role {
            Role::Leader(l) if l.serving => return true,
            Role::Leader(_) => ClientError::Busy,
            _ => ClientError::NotLeader { hint: self.leader_hint },
        };
        self.reply(id, Err(result));
        false
    }

    fn persist_hard_state(&mut self) {
        self.out.push(Command::PersistHardState(self.hard.clone()));
    }

    /// Every other member, voters and learners: whom a leader replicates to.
    fn peers(&self) -> Vec<ReplicaId> {
        self.log.membership().members().filter(|p| *p != self.cfg.id).collect()
    }

    /// Every other voter: whom a candidate asks.
    fn voter_peers(&self) -> Vec<ReplicaId> {
        self.log.membership().voters.iter().copied().filter(|p| *p != self.cfg.id).collect()
    }

    fn quorum(&self) -> usize {
        self.log.membership().quorum()
    }

    fn is_voter(&self, id: ReplicaId) -> bool {
        self.log.membership().is_voter(id)
    }

    fn reset_election_deadline(&mut self) {
        let min = self.cfg.election_timeout_min_ticks as u64;
        self.election_deadline = self.ticks + self.rng.range(min, 2 * min);
    }

    fn leader_recently_heard(&self) -> bool {
        self.last_leader_contact
            .is_some_and(|t| self.ticks.saturating_sub(t) < self.cfg.election_timeout_min_ticks as u64)
    }

    /// Issues a durable write of `entries`; marks them durable on completion.
    fn persist_entries(&mut self, entries: Vec<Entry>) -> Option<u64> {
        let entries: Vec<Entry> = if self.cfg.naive.paper_merge {
            // The naive variant's skipped holes are never written.
            entries.into_iter().filter(|e| !matches!(e.op, crate::entry::Op::Noop)).collect()
        } else {
            entries
        };
        if entries.is_empty() {
            return None;
        }
        let token = self.next_token;
        self.next_token += 1;
        self.writes_in_flight.insert(token, entries.iter().map(|e| (e.index, e.ballot, e.term)).collect());
        self.out.push(Command::PersistEntries { token, entries });
        Some(token)
    }

    fn truncate_log(&mut self, after: Index) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.writes_in_flight.insert(token, Vec::new());
        self.out.push(Command::TruncateLog { token, after });
        token
    }

    /// The look-behind buffer for a new entry at `index`, computed from this replica's log.
    fn look_behind_for(&self, index: Index, decided: &BTreeMap<Index, Entry>) -> LookBehind {
        let span = self.cfg.lbb_span as u64;
        LookBehind::new(
            (1..=span)
                .map(|d| {
                    let prev = Index(index.0.checked_sub(d)?);
                    if prev.0 == 0 {
                        return Some(RangeSet::new()); // before the first entry: nothing
                    }
                    decided.get(&prev).or_else(|| self.log.entry(prev)).map(|e| e.ranges())
                })
                .collect(),
        )
    }

    fn gate_insert(&mut self, entry: &Entry) {
        if entry.index.0 > self.gate.applied_watermark() && !self.gate.is_applied(entry.index.0) {
            self.gate.insert(entry.index.0, entry.ranges(), &entry.look_behind).expect("gate insert above watermark");
        }
    }

    /// Puts `entry` into the log (replacing any copy at its index), keeping `notice_scanned`.
    fn put_entry(&mut self, entry: Entry, durable: bool) {
        self.notice_scanned = self.notice_scanned.min(Index(entry.index.0 - 1));
        self.log.put(entry, durable);
    }

    /// Marks `index` committed and advances the contiguous watermark.
    fn mark_committed(&mut self, index: Index) {
        if self.is_committed(index) {
            return;
        }
        assert!(self.log.contains(index), "commit of an index not held at {:?}", self.cfg.id);
        self.committed_above.insert(index);
        self.gate.commit(index.0);
        while self.committed_above.remove(&self.committed.next()) {
            self.committed = self.committed.next();
        }
    }

    /// A one-line dump of the replication state, for liveness diagnostics.
    pub fn debug_state(&self) -> String {
        let held: Vec<String> = self
            .log
            .iter_from(self.committed)
            .map(|s| format!("{}{}b{}", s.entry.index.0, if s.durable { "" } else { "~" }, s.entry.ballot.0))
            .collect();
        let progress = match &self.role {
            Role::Leader(l) => {
                let p: Vec<_> = l
                    .progress
                    .iter()
                    .map(|(id, p)| {
                        format!("{}:synced={} durable={} acked={}", id.0, p.synced, p.durable.0, p.acked.len())
                    })
                    .collect();
                format!(" progress=[{}]", p.join(", "))
            }
            _ => String::new(),
        };
        format!(
            "above_w=[{}] committed_above={} sync_pending={} applying={} pending_list={}{}",
            held.join(" "),
            self.committed_above.len(),
            self.sync_pending.as_ref().map_or("none".to_string(), |p| format!(
                "t{} received{} end{} tokens{}",
                p.term.0,
                p.received.0,
                p.end.0,
                p.tokens.len()
            )),
            self.applying.len(),
            self.gate.pending(&RangeSet::new()).len(),
            progress
        )
    }

    /// Checks every structural invariant; panics with a description on violation.
    pub fn check_invariants(&self) {
        self.log.check_invariants();
        self.gate.check_invariants();
        self.table.check_invariants();
        assert!(self.hard.sync <= self.hard.term, "sync term above current term");
        assert!(self.log.checkpoint() <= self.applied_watermark(), "checkpoint above applied watermark");
        assert!(self.applied_watermark() <= self.committed, "applied beyond committed watermark");
        assert_eq!(self.folded, self.applied_watermark(), "client table not folded to the applied watermark");
        assert!(self.committed_above.iter().all(|i| *i > self.committed.next()), "committed set not above W+1");
        for i in self.committed_above.iter().chain(std::iter::once(&self.committed)) {
            assert!(*i <= self.log.checkpoint() || self.log.contains(*i), "committed index {i:?} not held");
        }
        for i in self.applying.keys() {
            assert!(self.is_committed(*i), "applying an uncommitted entry");
        }
        for i in self.log.indices_in(self.committed.next(), self.notice_scanned) {
            assert!(self.is_committed(i), "held index {i:?} below the scanned notice floor not committed");
        }
        if let Some(p) = self.sync_pending.as_ref().filter(|p| p.term == self.hard.term) {
            // The decided log is in place as far as the chunks reached: every index held, at
            // most at the new ballot (its committed prefix keeps the ballots it had).
            for i in self.committed.0 + 1..=p.received.min(p.end).0 {
                let ballot = self.log.entry(Index(i)).map(|e| e.ballot);
                assert!(ballot.is_some_and(|b| b <= p.term), "sync of {:?} not in place at {i}: {ballot:?}", p.term);
            }
        }
        if let Role::Leader(l) = &self.role {
            assert_eq!(self.hard.voted_for, Some(self.cfg.id), "leader did not vote for itself");
            let peers: BTreeSet<ReplicaId> = self.peers().into_iter().collect();
            assert!(l.progress.keys().copied().eq(peers.iter().copied()), "leader progress is not the membership");
            if l.serving && self.log.config_index() > self.committed {
                // Barrier: nothing is appended after an uncommitted configuration entry. (A
                // merging leader may hold entries after one that was committed elsewhere.)
                assert_eq!(self.log.config_index(), self.log.last_index(), "entry appended past a pending config");
            }
            assert!(l.rounds.len() <= MAX_ROUNDS_TRACKED, "read rounds unbounded");
            assert!(
                l.rounds.iter().zip(l.rounds.iter().skip(1)).all(|(a, b)| a.0 < b.0 && a.1 <= b.1),
                "read rounds out of order"
            );
            assert!(l.rounds.back().is_none_or(|r| r.0 == l.read_seq && r.1 <= self.ticks), "stale read rounds");
            assert!(l.lease_until <= self.ticks + self.cfg.lease_ticks as u64, "read lease beyond lease_ticks");
            self.check_flow_invariants();
            if l.serving {
                assert!(self.committed >= l.merge_end, "serving leader has not committed its merge");
                assert_eq!(self.hard.sync, self.hard.term, "serving leader not synced to its term");
                assert!(
                    self.log.last_index().0 <= self.committed.0 + self.cfg.window(),
                    "leader in-flight window exceeded"
                );
                // A serving leader holds every entry of its log: no holes.
                let held = self.log.len() as u64;
                assert_eq!(held, self.log.last_index().0 - self.log.checkpoint().0, "serving leader log has holes");
            }
        }
    }
}
