//! Pre-vote, vote (merge phase 1), stepping down, and the leader's tick.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::{LeaderState, Progress, Replica, Role, VoteInfo};
use crate::entry::{Entry, Op};
use crate::io::ClientError;
use crate::message::{Candidacy, Message};
use crate::types::{Index, ReplicaId, Term};

impl Replica {
    /// Would this replica vote for `from`, a candidate with this log?
    ///
    /// The candidate must have adopted a merged log at least as new as ours (its sync term),
    /// and must not need entries we already pruned into a checkpoint: our pruned entries (up to
    /// our checkpoint) were committed in epochs no newer than our sync term, so a candidate
    /// with a newer-or-equal sync term holds them if they lie within its committed watermark,
    /// its own merged log (`sync_end`) or its durable prefix. (Every copy a replica holds has a
    /// ballot at or above its sync term, since adopting a merged log truncates everything after
    /// it, so a held copy of a committed index is the decided one.)
    ///
    /// Membership (see `membership`): within one sync epoch the candidate's configuration must
    /// be at least as new as ours, so a server that missed a committed change can never win
    /// with the old configuration's quorum. A replica that does not know its membership
    /// (created to join, perhaps on a wiped disk that once voted under this identity) has no
    /// record to vote by and grants nothing.
    ///
    /// Whether the candidate is a voter of *our* configuration is deliberately not checked
    /// (as in Raft): a voter that lags behind a change would refuse the rightful candidate and
    /// could block every election. Removed servers are kept out by pre-vote and stickiness
    /// (nobody helps depose a leader heard within the election timeout) and by the rule above.
    fn candidate_allowed(&self, c: &Candidacy) -> bool {
        let sync_ok = self.cfg.naive.paper_merge || c.sync >= self.hard.sync;
        let known = self.log.membership().is_known();
        let config_ok = c.sync != self.hard.sync || c.config >= self.log.config_index();
        let holds = c.committed.max(c.sync_end).max(c.durable);
        sync_ok && known && config_ok && holds >= self.log.checkpoint()
    }

    fn candidacy(&self) -> Candidacy {
        Candidacy {
            sync: self.hard.sync,
            sync_end: self.hard.sync_end,
            committed: self.committed,
            durable: self.log.durable_prefix(),
            config: self.log.config_index(),
        }
    }

    pub(super) fn start_pre_vote(&mut self) {
        self.reset_election_deadline();
        if !self.is_voter(self.cfg.id) {
            // A learner, a removed server or a replica still joining never campaigns.
            self.role = Role::Follower;
            return;
        }
        let term = self.hard.term.next();
        let mut grants = BTreeSet::new();
        grants.insert(self.cfg.id);
        self.role = Role::PreCandidate { term, grants };
        if self.quorum() == 1 {
            self.start_election();
            return;
        }
        let candidate = self.candidacy();
        for peer in self.voter_peers() {
            self.send(peer, Message::PreVote { term, candidate });
        }
    }

    pub(super) fn on_pre_vote(&mut self, from: ReplicaId, term: Term, candidate: Candidacy) {
        // A replica that hears from a live leader does not help anyone depose it.
        let leader_alive = matches!(self.role, Role::Leader(_)) || self.leader_recently_heard();
        let granted = term > self.hard.term && !leader_alive && self.candidate_allowed(&candidate);
        // A refusal carries our own term, so a pre-candidate lagging in terms catches up
        // instead of proposing a term nobody will accept.
        let term = if granted { term } else { self.hard.term };
        self.send(from, Message::PreVoteResponse { term, granted });
    }

    pub(super) fn on_pre_vote_response(&mut self, from: ReplicaId, term: Term, granted: bool) {
        if !granted && term > self.hard.term && !matches!(self.role, Role::Leader(_)) {
            self.become_follower(term, None);
            return;
        }
        let quorum = self.quorum();
        let voter = self.is_voter(from);
        let Role::PreCandidate { term: my_term, grants } = &mut self.role else {
            return;
        };
        if term != *my_term || !granted || !voter {
            return;
        }
        grants.insert(from);
        if grants.len() >= quorum {
            self.start_election();
        }
    }

    fn start_election(&mut self) {
        self.hard.term = self.hard.term.next();
        self.hard.voted_for = Some(self.cfg.id);
        // The vote for ourselves counts only once durable: persist before any Vote is sent.
        self.persist_hard_state();
        self.leader_hint = None;
        self.reset_election_deadline();
        let mut votes = BTreeMap::new();
        votes.insert(self.cfg.id, VoteInfo { sync: self.hard.sync, committed: self.committed, entries: Vec::new() });
        self.role = Role::Candidate { votes };
        let (term, candidate) = (self.hard.term, self.candidacy());
        for peer in self.voter_peers() {
            self.send(peer, Message::Vote { term, candidate });
        }
        self.maybe_win();
    }

    pub(super) fn on_vote(&mut self, from: ReplicaId, term: Term, candidate: Candidacy) {
        if term > self.hard.term {
            if !matches!(self.role, Role::Leader(_)) && self.leader_recently_heard() {
                return; // Sticky leader: ignore disruptive candidates (they pre-voted wrongly).
            }
            self.become_follower(term, None);
        }
        let allowed = term == self.hard.term
            && self.hard.voted_for.is_none_or(|v| v == from)
            && !matches!(self.role, Role::Leader(_))
            && self.candidate_allowed(&candidate);
        // The report is gathered before granting: one too large to send refuses the vote.
        let report = if allowed { self.vote_report(&candidate) } else { None };
        let granted = report.is_some();
        if allowed && !granted {
            self.oversized_vote_refusals += 1;
        }
        if granted {
            if self.hard.voted_for.is_none() {
                self.hard.voted_for = Some(from);
                self.persist_hard_state();
            }
            self.reset_election_deadline();
        }
        let entries = report.unwrap_or_default();
        let message = Message::VoteResponse {
            term: self.hard.term,
            granted,
            sync: self.hard.sync,
            committed: self.committed,
            checkpoint: self.log.checkpoint(),
            entries,
        };
        self.send(from, message);
    }

    /// Merge phase 1 at a voter: the copies the candidate's merge needs from us, or `None` when
    /// they exceed `max_vote_bytes` and are more than one entry (the vote is then refused).
    ///
    /// Only copies of the candidate's own sync epoch count (older epochs are superseded), and
    /// only above its committed watermark. Copies at or below its durable prefix are skipped
    /// too, unless their ballot is above our sync term: the candidate holds a copy of each such
    /// index, and with equal sync terms a copy with a ballot at or below it is either the one
    /// copy the leader of that term wrote there (equal to the candidate's, or beaten by a newer
    /// ballot of its own) or the decided copy of a committed index (the same proposal as the
    /// candidate's), so it cannot change what the merge decides. (A copy above our sync term
    /// comes from a newer merge we had not finished adopting; it is still sent.) Without the
    /// skip, every voter of a restarted cluster reported its whole log above its checkpoint,
    /// since a restart forgets the committed watermark.
    ///
    /// The cap keeps the response within one transport frame (see `Config::max_vote_bytes`).
    fn vote_report(&self, c: &Candidacy) -> Option<Vec<Entry>> {
        let paper = self.cfg.naive.paper_merge;
        if !paper && self.hard.sync != c.sync {
            return Some(Vec::new());
        }
        let sync = self.hard.sync;
        let from = c.committed.max(self.log.checkpoint());
        let needed = self.log.iter_from(from).map(|s| &s.entry).filter(|e| {
            if paper {
                // Naive variant: the paper's literal merge, which also drops the no-ops.
                !matches!(e.op, Op::Noop)
            } else {
                e.index > c.durable || e.ballot > sync
            }
        });
        let (entries, all) = super::merge::within_bytes(needed, self.cfg.max_vote_bytes);
        all.then_some(entries)
    }

    pub(super) fn on_vote_response(&mut self, from: ReplicaId, term: Term, granted: bool, info: VoteInfo) {
        if term > self.hard.term {
            self.become_follower(term, None);
            return;
        }
        if term != self.hard.term || !granted || !self.is_voter(from) {
            return;
        }
        let Role::Candidate { votes } = &mut self.role else {
            return;
        };
        votes.insert(from, info);
        self.maybe_win();
    }

    fn maybe_win(&mut self) {
        let Role::Candidate { votes } = &self.role else {
            return;
        };
        let membership = self.log.membership();
        if votes.keys().filter(|v| membership.is_voter(**v)).count() >= membership.quorum() {
            let Role::Candidate { votes } = std::mem::replace(&mut self.role, Role::Follower) else { unreachable!() };
            self.begin_merge(votes);
        }
    }

    /// Installs an (unserving) leader state after the merge decided `merge_end`.
    pub(super) fn install_leader(&mut self, merge_end: Index, voter_committed: BTreeMap<ReplicaId, Index>) {
        let mut progress = BTreeMap::new();
        for peer in self.peers() {
            let p = Progress { committed: voter_committed.get(&peer).copied(), ..Progress::default() };
            progress.insert(peer, p);
        }
        self.role = Role::Leader(Box::new(LeaderState {
            merge_end,
            serving: false,
            progress,
            waiters: BTreeMap::new(),
            in_log: HashMap::new(),
            floors: HashMap::new(),
            queue: VecDeque::new(),
            reads: Vec::new(),
            read_seq: 0,
            rounds: VecDeque::new(),
            lease_until: 0,
            unsent: Vec::new(),
            elected_tick: self.ticks,
            change: None,
            payload: Default::default(),
            retained: Default::default(),
        }));
        self.leader_hint = Some(self.cfg.id);
    }

    /// Steps down to follower of `term` (persisting a newer term), failing every client request
    /// still waiting on us as leader: the client retries elsewhere, and the at-most-once table
    /// makes the retry safe.
    pub(super) fn become_follower(&mut self, term: Term, leader: Option<ReplicaId>) {
        assert!(term >= self.hard.term);
        if term > self.hard.term {
            self.hard.term = term;
            self.hard.voted_for = None;
            self.persist_hard_state();
        }
        let old = std::mem::replace(&mut self.role, Role::Follower);
        if let Role::Leader(leader_state) = old {
            let hint = leader;
            for (_, ids) in leader_state.waiters {
                for id in ids {
                    self.reply(id, Err(ClientError::NotLeader { hint }));
                }
            }
            for request in leader_state.queue {
                self.reply(request.id, Err(ClientError::NotLeader { hint }));
            }
            for read in leader_state.reads {
                self.reply(read.id, Err(ClientError::NotLeader { hint }));
            }
            if let Some(pending) = leader_state.change {
                self.reply(pending.id, Err(ClientError::NotLeader { hint }));
            }
        }
        self.leader_hint = leader;
        self.reset_election_deadline();
    }

    /// Called for every message from a leader of `term`: returns false when the message is
    /// stale and must be ignored (after telling the sender our term).
    pub(super) fn accept_leader(&mut self, from: ReplicaId, term: Term) -> bool {
        if term < self.hard.term {
            let message = Message::Ack {
                term: self.hard.term,
                acked: Vec::new(),
                durable: Index(0),
                committed: self.committed,
                synced: false,
                sync_received: Index(0),
                read_seq: 0,
            };
            self.send(from, message);
            return false;
        }
        if term > self.hard.term || !matches!(self.role, Role::Follower) || self.leader_hint != Some(from) {
            assert!(
                !(term == self.hard.term && matches!(self.role, Role::Leader(_))),
                "two leaders in term {term:?}: {:?} and {from:?}",
                self.cfg.id
            );
            self.become_follower(term, Some(from));
        }
        self.last_leader_contact = Some(self.ticks);
        self.reset_election_deadline();
        true
    }

    pub(super) fn leader_tick(&mut self) {
        let hb = self.cfg.heartbeat_interval_ticks as u64;
        let timeout = self.cfg.election_timeout_min_ticks as u64;
        let Role::Leader(l) = &self.role else { return };
        let elected = l.elected_tick;
        // Check quorum: a leader that cannot hear a quorum steps down, so clients move on.
        if self.ticks > elected + timeout && self.ticks.is_multiple_of(timeout) {
            let membership = self.log.membership();
            let heard = l
                .progress
                .iter()
                .filter(|(id, p)| {
                    membership.is_voter(**id) && p.last_heard_tick.is_some_and(|t| self.ticks - t <= timeout)
                })
                .count();
            let me = usize::from(membership.is_voter(self.cfg.id));
            if heard + me < membership.quorum() {
                let term = self.hard.term;
                self.become_follower(term, None);
                return;
            }
        }
        if self.ticks.is_multiple_of(hb) {
            self.broadcast_heartbeat();
        }
        // A follower may have stopped keeping up (see `flow`): what it held back goes.
        self.trim_retained();
        self.drain_queue();
    }
}
