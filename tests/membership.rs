//! Scripted membership changes against the real core with a hand-driven network: replacing a
//! voter through a learner, refusing a learner that is behind, a leader removing itself, a
//! removed server that cannot disrupt, and the vote rules that keep old configurations out.
//! (The simulator's `--membership` sweep covers the same under every fault.)

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use parallelraft::sim::write_op;
use parallelraft::{
    Candidacy, ClientError, ClientId, ClientRequest, Command, Config, Event, Index, Membership, MembershipChange,
    MembershipError, Message, Mode, Replica, ReplicaId, RequestId, RoleKind, Term,
};

const ADMIN: ClientId = ClientId(99);

/// Replicas `0..voters` bootstrap the group; the others are created to join it.
struct Cluster {
    replicas: Vec<Replica>,
    network: VecDeque<(usize, usize, Message)>,
    local: VecDeque<(usize, Event)>,
    cut: BTreeSet<(usize, usize)>,
    replies: BTreeMap<RequestId, Result<(), ClientError>>,
    /// Index → request applied there, per replica.
    applied: Vec<BTreeMap<Index, Option<RequestId>>>,
    next_write: u64,
    next_change: u64,
}

impl Cluster {
    fn new(voters: u32, joiners: u32, mode: Mode) -> Cluster {
        let bootstrap: Vec<ReplicaId> = (0..voters).map(ReplicaId).collect();
        let replicas: Vec<Replica> = (0..voters + joiners)
            .map(|i| {
                let voters = if i < voters { bootstrap.clone() } else { Vec::new() };
                let mut cfg = Config::new(ReplicaId(i), voters, mode, 11 + i as u64);
                cfg.checkpoint_interval = 8;
                Replica::new(cfg)
            })
            .collect();
        let n = replicas.len();
        Cluster {
            replicas,
            network: VecDeque::new(),
            local: VecDeque::new(),
            cut: BTreeSet::new(),
            replies: BTreeMap::new(),
            applied: vec![BTreeMap::new(); n],
            next_write: 0,
            next_change: 0,
        }
    }

    fn isolate(&mut self, r: usize) {
        for o in 0..self.replicas.len() {
            if o != r {
                self.cut.insert((r, o));
                self.cut.insert((o, r));
            }
        }
    }

    fn step(&mut self, r: usize, event: Event) {
        self.replicas[r].step(event);
        self.replicas[r].check_invariants();
        for command in self.replicas[r].take_commands() {
            match command {
                Command::PersistEntries { token, .. } | Command::TruncateLog { token, .. } => {
                    self.local.push_back((r, Event::Persisted { token }))
                }
                Command::Send { to, message } | Command::SendSnapshot { to, message } => {
                    let to = to.0 as usize;
                    if !self.cut.contains(&(r, to)) {
                        self.network.push_back((r, to, message));
                    }
                }
                Command::Apply { entry } => {
                    self.applied[r].insert(entry.index, entry.request);
                    self.local.push_back((r, Event::Applied { index: entry.index }));
                }
                Command::Read { id, .. } => self.local.push_back((r, Event::ReadDone { id })),
                Command::Reply { id, result } => {
                    self.replies.insert(id, result);
                }
                Command::Checkpoint { state } => {
                    self.local.push_back((r, Event::CheckpointDone { index: state.index }))
                }
                Command::PersistHardState(_) | Command::PruneLog { .. } | Command::InstallSnapshot { .. } => {}
            }
        }
    }

    /// Delivers everything in flight (and what it causes) until quiet.
    fn run(&mut self) {
        for _ in 0..200_000 {
            if let Some((r, event)) = self.local.pop_front() {
                self.step(r, event);
            } else if let Some((from, to, message)) = self.network.pop_front() {
                if !self.cut.contains(&(from, to)) {
                    self.step(to, Event::Receive { from: ReplicaId(from as u32), message });
                }
            } else {
                return;
            }
        }
        panic!("network never went quiet");
    }

    /// Ticks every replica `n` times, delivering after each round.
    fn tick_all(&mut self, n: usize) {
        for _ in 0..n {
            for r in 0..self.replicas.len() {
                self.step(r, Event::Tick);
            }
            self.run();
        }
    }

    fn leader(&self) -> Option<usize> {
        let leaders: Vec<usize> =
            (0..self.replicas.len()).filter(|r| self.replicas[*r].role() == RoleKind::Leader).collect();
        leaders.into_iter().max_by_key(|r| self.replicas[*r].term())
    }

    fn wait_for_leader(&mut self) -> usize {
        for _ in 0..200 {
            if let Some(l) = self.leader() {
                return l;
            }
            self.tick_all(1);
        }
        panic!("no leader elected");
    }

    /// A one-block write at the leader; returns its id once acknowledged.
    fn write(&mut self, block: u64) -> RequestId {
        let leader = self.wait_for_leader();
        let id = RequestId { client: ClientId(1), seq: self.next_write };
        self.next_write += 1;
        let request = ClientRequest { id, floor: id.seq, op: write_op(id, block, 1) };
        self.step(leader, Event::Propose(request));
        self.run();
        assert_eq!(self.replies.get(&id), Some(&Ok(())), "write {id:?} not acknowledged");
        id
    }

    /// Sends a membership change to the leader and waits (ticking) for its answer.
    fn change(&mut self, change: MembershipChange) -> Result<(), ClientError> {
        let id = RequestId { client: ADMIN, seq: self.next_change };
        self.next_change += 1;
        let leader = self.wait_for_leader();
        self.step(leader, Event::ChangeMembership { id, change });
        self.run();
        for _ in 0..100 {
            if let Some(result) = self.replies.get(&id) {
                return result.clone();
            }
            self.tick_all(1);
        }
        panic!("{change:?} never answered");
    }

    fn membership(&self, r: usize) -> Membership {
        self.replicas[r].membership().clone()
    }
}

fn ids(v: &[u32]) -> BTreeSet<ReplicaId> {
    v.iter().map(|i| ReplicaId(*i)).collect()
}

fn replace_a_voter(mode: Mode) {
    let mut c = Cluster::new(3, 1, mode);
    for b in 0..20 {
        c.write(b % 5);
    }
    assert!(!c.membership(3).is_known(), "a joiner knows no membership before it is added");
    c.change(MembershipChange::AddLearner(ReplicaId(3))).unwrap();
    // The learner receives the log (from a snapshot: the leader pruned it) and the membership.
    c.tick_all(10);
    assert_eq!(c.membership(3).learners, ids(&[3]));
    assert_eq!(c.membership(3).voters, ids(&[0, 1, 2]));
    c.change(MembershipChange::Promote(ReplicaId(3))).unwrap();
    let victim = (0..3).find(|r| Some(*r) != c.leader()).unwrap() as u32;
    c.change(MembershipChange::Remove(ReplicaId(victim))).unwrap();
    for b in 0..10 {
        c.write(b);
    }
    c.tick_all(5);
    let members: Vec<usize> = (0..4).filter(|r| *r as u32 != victim).collect();
    let expected: BTreeSet<ReplicaId> = members.iter().map(|r| ReplicaId(*r as u32)).collect();
    let last = c.replicas[c.leader().unwrap()].last_index();
    for &m in &members {
        assert_eq!(c.membership(m).voters, expected, "replica {m}");
        assert!(c.membership(m).learners.is_empty());
        assert_eq!(c.replicas[m].applied_watermark(), last, "replica {m} did not apply everything");
    }
    // Every index the new member applied itself (above its snapshot) matches the others'.
    for (index, request) in &c.applied[3] {
        for &m in &members {
            if let Some(other) = c.applied[m].get(index) {
                assert_eq!(other, request, "index {index:?} differs between 3 and {m}");
            }
        }
    }
    // The removed server gets nothing more: it stays behind.
    assert!(c.replicas[victim as usize].applied_watermark() < last);
}

#[test]
fn a_voter_is_replaced_through_a_learner_parallel() {
    replace_a_voter(Mode::Parallel);
}

#[test]
fn a_voter_is_replaced_through_a_learner_raft() {
    replace_a_voter(Mode::Raft);
}

#[test]
fn invalid_changes_are_refused_and_a_learner_behind_is_not_promoted() {
    let mut c = Cluster::new(3, 1, Mode::Parallel);
    c.write(0);
    let refused = |e| Err(ClientError::Membership(e));
    assert_eq!(c.change(MembershipChange::AddLearner(ReplicaId(1))), refused(MembershipError::AlreadyMember));
    assert_eq!(c.change(MembershipChange::Promote(ReplicaId(3))), refused(MembershipError::NotALearner));
    assert_eq!(c.change(MembershipChange::Remove(ReplicaId(7))), refused(MembershipError::NotAMember));
    // The learner is added while cut off: it cannot catch up, so it is not promoted.
    c.isolate(3);
    c.change(MembershipChange::AddLearner(ReplicaId(3))).unwrap();
    for b in 0..12 {
        c.write(b);
    }
    assert_eq!(c.change(MembershipChange::Promote(ReplicaId(3))), refused(MembershipError::LearnerBehind));
    c.cut.clear();
    c.tick_all(10);
    c.change(MembershipChange::Promote(ReplicaId(3))).unwrap();
    assert_eq!(c.membership(c.leader().unwrap()).voters, ids(&[0, 1, 2, 3]));
}

#[test]
fn a_removed_leader_steps_down_and_the_others_elect() {
    let mut c = Cluster::new(3, 0, Mode::Parallel);
    c.write(1);
    let old = c.wait_for_leader();
    let old_term = c.replicas[old].term();
    c.change(MembershipChange::Remove(ReplicaId(old as u32))).unwrap();
    assert_ne!(c.replicas[old].role(), RoleKind::Leader, "the removed leader still leads");
    let new = c.wait_for_leader();
    assert_ne!(new, old);
    assert!(c.replicas[new].term() > old_term);
    let others: Vec<u32> = (0..3).filter(|r| *r != old as u32).collect();
    assert_eq!(c.membership(new).voters, ids(&others));
    c.write(2);
    // The removed server never campaigns again: its term stays where it is.
    let term = c.replicas[old].term();
    c.cut.extend((0..3).filter(|r| *r != old).flat_map(|r| [(old, r), (r, old)]));
    c.tick_all(100);
    assert_eq!(c.replicas[old].term(), term);
    assert_ne!(c.replicas[old].role(), RoleKind::PreCandidate);
}

#[test]
fn a_removed_server_that_missed_its_removal_cannot_disrupt() {
    let mut c = Cluster::new(3, 0, Mode::Parallel);
    c.write(0);
    let leader = c.wait_for_leader();
    let gone = (0..3).find(|r| *r != leader).unwrap();
    // Cut off before the removal: it never learns of it and keeps campaigning.
    c.isolate(gone);
    c.change(MembershipChange::Remove(ReplicaId(gone as u32))).unwrap();
    c.tick_all(60);
    assert!(c.replicas[gone].membership().is_voter(ReplicaId(gone as u32)));
    let term = c.replicas[leader].term();
    c.cut.clear();
    c.tick_all(100);
    c.write(1);
    assert_eq!(c.leader(), Some(leader), "the removed server deposed the leader");
    assert_eq!(c.replicas[leader].term(), term, "the removed server raised the group's term");
}

#[test]
fn voters_refuse_a_candidate_with_an_older_configuration_and_joiners_never_vote() {
    let mut c = Cluster::new(3, 1, Mode::Parallel);
    c.write(0);
    c.change(MembershipChange::AddLearner(ReplicaId(3))).unwrap();
    c.tick_all(5);
    let leader = c.wait_for_leader();
    let voter = (0..3).find(|r| *r != leader).unwrap();
    let hard = c.replicas[voter].hard_state().clone();
    let config = c.replicas[voter].config_state().index;
    assert!(config > Index(0));
    // Let the voter's leader contact age, so only the vote rules decide.
    c.isolate(voter);
    c.tick_all(40);
    c.cut.clear();
    let (committed, durable) = (c.replicas[voter].committed_watermark(), c.replicas[voter].last_index());
    let vote = |term: Term, config: Index| Message::Vote {
        term,
        candidate: Candidacy { sync: hard.sync, sync_end: hard.sync_end, committed, durable, config },
    };
    let term = Term(c.replicas[voter].term().0 + 5);
    let stale = vote(term, Index(0));
    let candidate = (0..3).find(|r| *r != leader && *r != voter).unwrap();
    c.isolate(candidate); // only the answer matters: keep the real candidate out of it
    c.cut.remove(&(voter, candidate));
    c.cut.remove(&(candidate, voter));
    c.replicas[voter].step(Event::Receive { from: ReplicaId(candidate as u32), message: stale });
    let granted = |replica: &mut Replica| {
        replica.take_commands().into_iter().find_map(|cmd| match cmd {
            Command::Send { message: Message::VoteResponse { granted, .. }, .. } => Some(granted),
            _ => None,
        })
    };
    assert_eq!(granted(&mut c.replicas[voter]), Some(false), "a candidate with an older configuration won a vote");
    // The same candidate with the current configuration is granted.
    let current = vote(Term(term.0 + 1), config);
    c.replicas[voter].step(Event::Receive { from: ReplicaId(candidate as u32), message: current });
    assert_eq!(granted(&mut c.replicas[voter]), Some(true));
    // A fresh replica that does not know its group grants nothing.
    let mut fresh = Replica::new(Config::new(ReplicaId(9), Vec::new(), Mode::Parallel, 1));
    fresh.step(Event::Receive { from: ReplicaId(0), message: vote(Term(50), config) });
    assert_eq!(granted(&mut fresh), Some(false), "a replica without a membership voted");
}
