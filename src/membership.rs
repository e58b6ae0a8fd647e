//! Group membership: voters and non-voting learners, changed one server at a time through
//! configuration entries in the replicated log.
//!
//! # The rules, and why they are safe with out-of-order commit and the merge stage
//!
//! 1. **A replica uses the latest configuration in the hole-free prefix of its log** (held,
//!    committed or not), as Raft uses the latest in its log; a truncation or a merge that
//!    replaces the entry reverts to the one before. A configuration above a hole is not in
//!    force yet: only up to its first hole does a replica's log match its leader's (a serving
//!    leader has no holes, so its own new configuration is in force at once).
//! 2. **One server per change** (add a learner, promote a learner, remove a member). Any
//!    majority of a configuration intersects any majority of the next one.
//! 3. **Barrier.** The leader appends a configuration entry only when every entry before it is
//!    committed, and appends nothing after it until it is committed. So every entry above a
//!    committed configuration entry was committed under that configuration, and at most one
//!    configuration entry is ever uncommitted.
//! 4. **A new leader changes nothing before its merge committed** (it does not serve until
//!    then): the merge plays the role of Raft's "commit an entry of your own term first".
//! 5. **Vote rule.** Besides the sync-term rule, a voter refuses a candidate of its own sync
//!    epoch whose latest configuration entry is older than the voter's, and a replica that does
//!    not know its membership (a joiner) grants nothing.
//! 6. **Whole prefix.** A configuration entry commits only on a majority of its configuration
//!    whose contiguous durable prefix reaches it. ParallelRaft logs have holes, so without this
//!    an entry committed under `C_old` could, two changes later, be held by a minority of
//!    `C_new` only; with it, every committed configuration's majority holds everything before
//!    it (Raft's log matching, restored at configuration points), and so has it in force by
//!    rule 1. (Rule 1 alone already keeps such a majority on the older configuration, which
//!    turns the loss into a stall; rule 6 makes "committed" mean "in force at a majority".
//!    The simulator found no seed that needs rule 6 in 6,000 runs without it: the window is a
//!    learner promoted while up to one in-flight window behind.)
//! 7. **Identities.** A server is never re-added under its old identity with a disk that lost
//!    its hard state: a removed replica keeps its term and vote (a tombstone) when its data is
//!    deleted, and a server whose disk died rejoins under a new id. (A wiped replica that forgot
//!    its term would take a deposed leader of an old configuration for current and let it
//!    commit.)
//!
//! Argument: let `C_k` be the latest committed configuration. Its entry is durable on a
//! majority of `C_k`, all of whose members refuse a candidate with an older configuration
//! (same sync epoch: rule 5; newer sync epoch: the candidate adopted a merged log, which holds
//! every committed entry, `C_k`'s included), and by rule 6 it holds every entry committed
//! before `C_k` too. A candidate with configuration `C_j`, `j < k`,
//! needs a majority of `C_j`; by rules 2 and 3 (inductively over `C_j..C_k`) that majority
//! meets a refusing member. So every leader uses `C_k` or the one uncommitted `C_{k+1}`, whose
//! majorities intersect: two leaders of one term are impossible, and the vote quorum (the
//! merge's phase 1) meets every commit quorum, so the merge finds every committed entry.
//! Phase 2 (syncing the decided log) uses the configuration of the decided log.

use std::collections::BTreeSet;
use std::fmt;

use crate::types::{Index, ReplicaId};

/// The members of one group.
///
/// Invariant: voters and learners are disjoint. An empty membership means "not known yet": a
/// replica created to join a group waits for its leader to send it the configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Membership {
    pub voters: BTreeSet<ReplicaId>,
    pub learners: BTreeSet<ReplicaId>,
}

/// One single-server change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MembershipChange {
    /// A new non-voting member: it receives the log (and a snapshot) but counts in no quorum.
    AddLearner(ReplicaId),
    /// A caught-up learner becomes a voter.
    Promote(ReplicaId),
    /// A voter or learner leaves. Removing the leader makes it step down once committed.
    Remove(ReplicaId),
}

/// Why a membership change was refused. Every variant but `LearnerBehind` is final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MembershipError {
    AlreadyMember,
    NotAMember,
    NotALearner,
    /// The learner has not caught up with the log yet: try again later.
    LearnerBehind,
    /// The change would leave the group without a voter.
    LastVoter,
}

impl fmt::Display for MembershipError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MembershipError::AlreadyMember => "the server is already a member of the group",
            MembershipError::NotAMember => "the server is not a member of the group",
            MembershipError::NotALearner => "the server is not a learner of the group",
            MembershipError::LearnerBehind => "the learner has not caught up yet",
            MembershipError::LastVoter => "the change would leave the group without a voter",
        })
    }
}

/// The membership decided by the configuration entry at `index` (0: the bootstrap voters).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConfigState {
    pub index: Index,
    pub membership: Membership,
}

impl Membership {
    pub fn with_voters(voters: impl IntoIterator<Item = ReplicaId>) -> Membership {
        Membership { voters: voters.into_iter().collect(), learners: BTreeSet::new() }
    }

    pub fn is_known(&self) -> bool {
        !self.voters.is_empty()
    }

    pub fn is_voter(&self, id: ReplicaId) -> bool {
        self.voters.contains(&id)
    }

    pub fn is_learner(&self, id: ReplicaId) -> bool {
        self.learners.contains(&id)
    }

    pub fn contains(&self, id: ReplicaId) -> bool {
        self.is_voter(id) || self.is_learner(id)
    }

    /// Votes (or durable copies) that make a majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Voters and learners.
    pub fn members(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        self.voters.iter().chain(self.learners.iter()).copied()
    }

    /// The membership after `change`, if the change is valid here. (Whether a learner is
    /// caught up is the leader's judgement, not checked here.)
    pub fn apply(&self, change: MembershipChange) -> Result<Membership, MembershipError> {
        let mut next = self.clone();
        match change {
            MembershipChange::AddLearner(id) => {
                if self.contains(id) {
                    return Err(MembershipError::AlreadyMember);
                }
                next.learners.insert(id);
            }
            MembershipChange::Promote(id) => {
                if !self.is_learner(id) {
                    return Err(if self.is_voter(id) {
                        MembershipError::AlreadyMember
                    } else {
                        MembershipError::NotALearner
                    });
                }
                next.learners.remove(&id);
                next.voters.insert(id);
            }
            MembershipChange::Remove(id) => {
                if !self.contains(id) {
                    return Err(MembershipError::NotAMember);
                }
                if self.voters.len() == 1 && self.is_voter(id) {
                    return Err(MembershipError::LastVoter);
                }
                next.voters.remove(&id);
                next.learners.remove(&id);
            }
        }
        Ok(next)
    }

    /// Voters and learners are disjoint, and there are no learners without voters (the
    /// decoder refuses anything else; `check_invariants` asserts it).
    pub fn is_well_formed(&self) -> bool {
        self.voters.is_disjoint(&self.learners) && (self.is_known() || self.learners.is_empty())
    }

    pub fn check_invariants(&self) {
        assert!(
            self.is_well_formed(),
            "malformed membership (a member both voter and learner, or learners without voters): {self:?}"
        );
    }
}

impl fmt::Display for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |set: &BTreeSet<ReplicaId>| set.iter().map(|r| r.0.to_string()).collect::<Vec<_>>().join(",");
        write!(f, "voters [{}]", list(&self.voters))?;
        if !self.learners.is_empty() {
            write!(f, " learners [{}]", list(&self.learners))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u32]) -> BTreeSet<ReplicaId> {
        v.iter().map(|i| ReplicaId(*i)).collect()
    }

    #[test]
    fn single_server_changes_validate() {
        let m = Membership::with_voters([1, 2, 3].map(ReplicaId));
        let added = m.apply(MembershipChange::AddLearner(ReplicaId(4))).unwrap();
        assert_eq!(added.learners, ids(&[4]));
        assert_eq!(added.quorum(), 2, "a learner does not count in the quorum");
        assert_eq!(m.apply(MembershipChange::AddLearner(ReplicaId(2))), Err(MembershipError::AlreadyMember));
        assert_eq!(m.apply(MembershipChange::Promote(ReplicaId(4))), Err(MembershipError::NotALearner));
        let promoted = added.apply(MembershipChange::Promote(ReplicaId(4))).unwrap();
        assert_eq!(promoted.voters, ids(&[1, 2, 3, 4]));
        assert_eq!(promoted.quorum(), 3);
        let removed = promoted.apply(MembershipChange::Remove(ReplicaId(1))).unwrap();
        assert_eq!(removed.voters, ids(&[2, 3, 4]));
        assert_eq!(removed.apply(MembershipChange::Remove(ReplicaId(9))), Err(MembershipError::NotAMember));
        let one = Membership::with_voters([ReplicaId(7)]);
        assert_eq!(one.apply(MembershipChange::Remove(ReplicaId(7))), Err(MembershipError::LastVoter));
        for m in [m, added, promoted, removed] {
            m.check_invariants();
        }
    }
}
