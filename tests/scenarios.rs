//! Scripted histories of the two known ParallelRaft anomalies, run against the real core with a
//! hand-driven network. Each is run twice: the correct protocol must keep the acknowledged
//! write, and a naive variant (test-only flag) must lose it, proving the check can fail.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use parallelraft::sim::write_op;
use parallelraft::{
    Candidacy, CheckpointState, ClientId, ClientRequest, Command, Config, Event, HardState, Index, Message, Mode,
    NaiveFlags, Op, Replica, ReplicaId, RequestId, RoleKind, Term,
};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Three replicas with instant disks and a network the test controls link by link.
struct Harness {
    replicas: Vec<Replica>,
    /// Block → tag of the request that last wrote it, per replica.
    blocks: Vec<BTreeMap<u64, RequestId>>,
    network: VecDeque<(usize, usize, Message)>,
    local: VecDeque<(usize, Event)>,
    cut: BTreeSet<(usize, usize)>,
    /// Messages from these replicas vanish (used while aging their leader contact).
    muted: BTreeSet<usize>,
    /// Disk completions of these replicas are parked (a slow disk) until released.
    slow_disk: BTreeSet<usize>,
    parked: Vec<(usize, Event)>,
    acknowledged: Vec<RequestId>,
    /// Index → request applied there (`None`: a no-op), per replica.
    applied: Vec<BTreeMap<Index, Option<RequestId>>>,
    /// Reads handed to the block store, in order.
    reads_executed: Vec<RequestId>,
    /// Every vote answer sent: (voter, candidate, granted, indices reported).
    vote_reports: Vec<(usize, usize, bool, Vec<Index>)>,
    /// Every Sync sent: (leader, follower, upto, end).
    syncs: Vec<(usize, usize, Index, Index)>,
    /// Every snapshot (catch-up from the block image) a leader started: (leader, follower).
    snapshots: Vec<(usize, usize)>,
}

impl Harness {
    fn new(naive: NaiveFlags) -> Harness {
        Harness::configured(|cfg| cfg.naive = naive)
    }

    /// Three replicas whose configuration `tune` adjusts.
    fn configured(tune: impl Fn(&mut Config)) -> Harness {
        let voters: Vec<ReplicaId> = (0..3).map(ReplicaId).collect();
        let replicas = (0..3)
            .map(|i| {
                let mut cfg = Config::new(ReplicaId(i), voters.clone(), Mode::Parallel, 7 + i as u64);
                cfg.checkpoint_interval = 1_000;
                tune(&mut cfg);
                Replica::new(cfg)
            })
            .collect();
        Harness {
            replicas,
            blocks: vec![BTreeMap::new(); 3],
            network: VecDeque::new(),
            local: VecDeque::new(),
            cut: BTreeSet::new(),
            muted: BTreeSet::new(),
            slow_disk: BTreeSet::new(),
            parked: Vec::new(),
            acknowledged: Vec::new(),
            applied: vec![BTreeMap::new(); 3],
            reads_executed: Vec::new(),
            vote_reports: Vec::new(),
            syncs: Vec::new(),
            snapshots: Vec::new(),
        }
    }

    fn isolate(&mut self, r: usize) {
        for o in 0..3 {
            if o != r {
                self.cut.insert((r, o));
                self.cut.insert((o, r));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    fn step(&mut self, r: usize, event: Event) {
        self.replicas[r].step(event);
        self.replicas[r].check_invariants();
        for command in self.replicas[r].take_commands() {
            match command {
                Command::PersistEntries { token, .. } | Command::TruncateLog { token, .. } => {
                    if self.slow_disk.contains(&r) {
                        self.parked.push((r, Event::Persisted { token }));
                    } else {
                        self.local.push_back((r, Event::Persisted { token }));
                    }
                }
                Command::Send { to, message } => {
                    let to = to.0 as usize;
                    if let Message::VoteResponse { granted, entries, .. } = &message {
                        self.vote_reports.push((r, to, *granted, entries.iter().map(|e| e.index).collect()));
                    }
                    if let Message::Sync { upto, end, .. } = &message {
                        self.syncs.push((r, to, *upto, *end));
                    }
                    if !self.cut.contains(&(r, to)) && !self.muted.contains(&r) {
                        self.network.push_back((r, to, message));
                    }
                }
                Command::Apply { entry } => {
                    self.applied[r].insert(entry.index, entry.request);
                    if let Op::Write { offset, data } = &entry.op {
                        for k in 0..data.len() as u64 / 4096 {
                            self.blocks[r].insert(offset / 4096 + k, entry.request.unwrap());
                        }
                    }
                    self.local.push_back((r, Event::Applied { index: entry.index }));
                }
                Command::Reply { id, result: Ok(()) } => self.acknowledged.push(id),
                Command::Read { id, .. } => {
                    self.reads_executed.push(id);
                    self.local.push_back((r, Event::ReadDone { id }));
                }
                Command::Checkpoint { state } => {
                    self.local.push_back((r, Event::CheckpointDone { index: state.index }))
                }
                Command::SendSnapshot { to, .. } => self.snapshots.push((r, to.0 as usize)),
                _ => {}
            }
        }
    }

    /// Delivers everything in flight (and what it causes) until quiet.
    fn run(&mut self) {
        for _ in 0..100_000 {
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

    /// Makes `r` the serving leader: first ages every other reachable replica's leader contact
    /// (their own campaigns muted), then ticks `r` alone.
    fn elect(&mut self, r: usize) {
        assert!(self.try_elect(r), "replica {r} did not become leader");
    }

    fn try_elect(&mut self, r: usize) -> bool {
        let max_term = self.replicas.iter().map(|x| x.term()).max().unwrap();
        let others: Vec<usize> = (0..3).filter(|o| *o != r && !self.cut.contains(&(r, *o))).collect();
        for &o in &others {
            self.muted.insert(o);
            for _ in 0..40 {
                self.step(o, Event::Tick);
            }
            self.muted.remove(&o);
        }
        self.network.clear();
        for _ in 0..200 {
            self.step(r, Event::Tick);
            self.run();
            if self.replicas[r].role() == RoleKind::Leader && self.replicas[r].term() > max_term {
                return true;
            }
        }
        false
    }

    /// Restarts every replica from what it holds (no checkpoint has been taken): the log, all
    /// durable here, and the hard state; the committed watermark is forgotten.
    fn restart_all(&mut self) {
        for r in 0..3 {
            let old = &self.replicas[r];
            assert_eq!(old.checkpoint_index(), Index(0), "restart_all keeps no checkpoint");
            let entries = (1..=old.last_index().0).filter_map(|i| old.entry(Index(i)).cloned()).collect();
            self.replicas[r] =
                Replica::recover(old.config().clone(), old.hard_state().clone(), CheckpointState::default(), entries);
        }
        self.network.clear();
        self.local.clear();
    }

    /// Writes `seqs` (sequence k to block `block(k)`) through leader `r` and returns them once
    /// all are acknowledged (a tick sends the commit notice the replies wait for).
    fn write_acknowledged(
        &mut self,
        r: usize,
        seqs: std::ops::RangeInclusive<u64>,
        block: impl Fn(u64) -> u64,
    ) -> Vec<RequestId> {
        let ids: Vec<RequestId> = seqs.map(|seq| self.propose(r, seq, block(seq))).collect();
        self.run();
        self.step(r, Event::Tick);
        self.run();
        assert!(ids.iter().all(|id| self.acknowledged.contains(id)), "writes through {r} not acknowledged");
        ids
    }

    fn propose(&mut self, r: usize, seq: u64, block: u64) -> RequestId {
        let id = RequestId { client: ClientId(1), seq };
        let request = ClientRequest { id, floor: 0, op: write_op(id, block, 1) };
        self.step(r, Event::Propose(request));
        id
    }

    fn block(&self, r: usize, block: u64) -> Option<RequestId> {
        self.blocks[r].get(&block).copied()
    }
}

/// A one-block write of the harness: its payload bytes and its bytes in a message's entry list
/// (what `max_sync_bytes` and `max_vote_bytes` count).
fn one_block_write_bytes() -> (u64, u64) {
    let id = RequestId { client: ClientId(1), seq: 1 };
    let op = write_op(id, 0, 1);
    let payload = parallelraft::io::write_data(&op).expect("a write").len() as u64;
    let entry = parallelraft::Entry {
        index: Index(1),
        term: Term(1),
        ballot: Term(1),
        op,
        request: Some(id),
        floor: 0,
        look_behind: Default::default(),
    };
    (payload, parallelraft::codec::listed_len(&entry))
}

const X: u64 = 3;
const Y: u64 = 9;

/// The ghost entry (parallelraft.md, pitfall 1): `old` writes X but reaches only C; a later
/// entry reaches A and B. A's merge leaves the hole; A writes `new` to X, acknowledged. Then
/// C campaigns with B's vote: with the hole skipped, C's `old` comes back and lands after `new`.
/// The correct protocol refuses C (its sync term is older than B's), and B leads instead.
fn ghost_entry(naive: NaiveFlags) -> (Harness, RequestId) {
    let mut h = Harness::new(naive);
    h.elect(C);
    // `old` (X) reaches no one but C; `other` (Y) reaches everyone and commits past the hole.
    h.cut.insert((C, A));
    h.cut.insert((C, B));
    h.propose(C, 1, X);
    h.run();
    h.heal();
    h.propose(C, 2, Y);
    h.run();
    assert_eq!(h.replicas[A].last_index(), Index(2), "A should hold the entry after the hole");
    assert!(h.replicas[A].entry(Index(1)).is_none(), "A must not hold `old`");
    // C falls silent; A leads term 2 with B and writes `new` to X.
    h.isolate(C);
    h.elect(A);
    let new = h.propose(A, 3, X);
    h.run();
    h.step(A, Event::Tick);
    h.run();
    assert!(h.acknowledged.contains(&new), "`new` must be acknowledged");
    assert_eq!(h.block(A, X), Some(new));
    // A falls silent; C campaigns with B.
    h.heal();
    h.isolate(A);
    let leader = if h.try_elect(C) { C } else { B };
    if leader == B {
        h.elect(B);
    }
    for _ in 0..10 {
        h.step(leader, Event::Tick);
        h.run();
    }
    (h, new)
}

#[test]
fn ghost_entry_is_prevented_by_the_merge() {
    let (h, new) = ghost_entry(NaiveFlags::default());
    assert_eq!(h.replicas[B].role(), RoleKind::Leader, "C (stale sync term) must not win B's vote");
    assert_eq!(h.block(B, X), Some(new), "the acknowledged newer write to X was overwritten");
    assert_eq!(h.block(C, X), Some(new), "C diverged on X");
    assert!(h.replicas[B].entry(Index(1)).is_some_and(|e| e.op == Op::Noop), "the hole must be a durable no-op");
    assert!(h.applied.iter().all(|a| a.get(&Index(1)).is_none()), "`old` must never be applied");
}

#[test]
fn naive_paper_merge_resurrects_the_ghost() {
    let naive = NaiveFlags { paper_merge: true, ..NaiveFlags::default() };
    let (h, _new) = ghost_entry(naive);
    let ghost = RequestId { client: ClientId(1), seq: 1 };
    assert_eq!(h.replicas[C].role(), RoleKind::Leader, "the naive vote rule lets C win");
    // C re-commits and applies `old` at index 1, which A and B had already passed as a skipped
    // hole (and `new` was applied at index 3 on their word): the replicas now disagree on what
    // index 1 is, the divergence the simulator's apply-agreement checker reports.
    assert_eq!(h.applied[C].get(&Index(1)), Some(&Some(ghost)), "C should apply the resurrected `old`");
    assert!(h.replicas[B].entry(Index(1)).is_some_and(|e| e.op == Op::Noop), "B passed index 1 as a skipped no-op");
    assert_eq!(h.replicas[B].applied_watermark(), Index(3));
}

/// Truncation after out-of-order commit (parallelraft.md, the 12-step history): `late` (Y) is
/// committed out of order by C and A while index 1 is still a hole; B, which holds neither,
/// becomes leader. A Raft-style merge keeps only B's log and truncates A after it, so the
/// acknowledged `late` is lost.
fn truncation_after_ooo_commit(naive: NaiveFlags) -> (Harness, RequestId) {
    let mut h = Harness::new(naive);
    h.elect(C);
    h.cut.insert((C, A));
    h.cut.insert((C, B));
    h.propose(C, 1, X); // index 1: only on C
    h.run();
    h.cut.remove(&(C, A));
    let late = h.propose(C, 2, Y); // index 2: C and A, committed out of order
                                   // Deliver the append to A and A's ack back, then cut C before any commit notice reaches A.
    h.run();
    assert!(h.acknowledged.contains(&late), "`late` must be acknowledged by C");
    assert!(!h.replicas[A].is_committed(Index(2)), "A must not know `late` is committed");
    h.isolate(C);
    h.elect(B);
    for _ in 0..10 {
        h.step(B, Event::Tick);
        h.run();
    }
    (h, late)
}

#[test]
fn out_of_order_commit_survives_a_leader_without_it() {
    let (h, late) = truncation_after_ooo_commit(NaiveFlags::default());
    assert_eq!(h.block(B, Y), Some(late), "the new leader lost an acknowledged write");
    assert_eq!(h.block(A, Y), Some(late));
    assert!(h.replicas[B].entry(Index(1)).is_some_and(|e| e.op == Op::Noop), "the hole must become a no-op");
}

#[test]
fn naive_raft_truncation_loses_the_committed_entry() {
    let naive = NaiveFlags { raft_truncation: true, ..NaiveFlags::default() };
    let (h, _late) = truncation_after_ooo_commit(naive);
    assert_eq!(h.block(B, Y), None, "expected the acknowledged write to be lost by the naive merge");
    assert_eq!(h.block(A, Y), None);
}

/// Found by the simulator (seed 1031500 of an earlier fault schedule): a follower that learned
/// an entry was committed acknowledged a duplicate append of it before its own copy was
/// durable. After a crash lost that copy, the leader never resent it and the follower stalled.
#[test]
fn acknowledgement_waits_for_the_followers_own_disk() {
    let mut h = Harness::new(NaiveFlags::default());
    h.elect(C);
    h.slow_disk.insert(A);
    h.propose(C, 1, X);
    h.run();
    // B made it durable: committed on C and B. A holds it, not yet durable.
    assert!(h.replicas[C].is_committed(Index(1)));
    // The heartbeat tells A it is committed; the leader then retransmits what A has not acked.
    let mut acks_from_a = Vec::new();
    for _ in 0..4 {
        h.step(C, Event::Tick);
        while let Some((from, to, message)) = h.network.pop_front() {
            if let (A, Message::Ack { acked, .. }) = (from, &message) {
                acks_from_a.extend(acked.iter().copied());
            }
            if !h.cut.contains(&(from, to)) {
                h.step(to, Event::Receive { from: ReplicaId(from as u32), message });
            }
        }
    }
    assert!(h.replicas[A].is_committed(Index(1)), "A should have learned the commit");
    assert!(acks_from_a.is_empty(), "A acknowledged index 1 before its disk made it durable: {acks_from_a:?}");
    // Once A's disk completes, the acknowledgement follows.
    for (r, event) in std::mem::take(&mut h.parked) {
        h.step(r, event);
    }
    let acked_now = h
        .network
        .iter()
        .any(|(from, _, m)| *from == A && matches!(m, Message::Ack { acked, .. } if acked.contains(&Index(1))));
    assert!(acked_now, "A must acknowledge once durable");
}

fn read(h: &mut Harness, r: usize, seq: u64) -> RequestId {
    let id = RequestId { client: ClientId(2), seq };
    h.step(r, Event::Read { id, offset: X * 4096, len_bytes: 4096 });
    id
}

fn heartbeats_from(h: &Harness, r: usize) -> usize {
    h.network.iter().filter(|(from, _, m)| *from == r && matches!(m, Message::Heartbeat { .. })).count()
}

/// A leader whose last heartbeat round a quorum echoed serves reads at once; once the lease
/// lapses (no echo for `lease_ticks`) or the driver reports a clock jump, a read waits for a
/// read-index round of its own.
#[test]
fn read_lease_skips_the_round_until_it_lapses_or_the_clock_jumps() {
    let mut h = Harness::new(NaiveFlags::default());
    h.elect(A);
    h.step(A, Event::Tick);
    h.step(A, Event::Tick);
    h.run(); // a heartbeat round, echoed by B and C

    let leased = read(&mut h, A, 1);
    assert_eq!(h.reads_executed, vec![leased], "a leased read must execute at once");
    assert_eq!(heartbeats_from(&h, A), 0, "a leased read must not start a round");
    h.run();

    // The driver reports a stall: the next read needs a round.
    h.step(A, Event::ClockJump);
    let after_jump = read(&mut h, A, 2);
    assert!(!h.reads_executed.contains(&after_jump), "a read after a clock jump ran without a round");
    assert_eq!(heartbeats_from(&h, A), 2, "the read must start a round to both followers");
    h.run();
    assert!(h.reads_executed.contains(&after_jump), "the echoed round must release the read");

    // That round renewed the lease; silence from the followers lets it lapse.
    let renewed = read(&mut h, A, 3);
    assert!(h.reads_executed.contains(&renewed), "the echoed round must renew the lease");
    h.run();
    h.isolate(A);
    let lease = Config::new(ReplicaId(0), Vec::new(), Mode::Parallel, 0).lease_ticks;
    for _ in 0..lease {
        h.step(A, Event::Tick);
    }
    h.run();
    let lapsed = read(&mut h, A, 4);
    h.run();
    assert!(!h.reads_executed.contains(&lapsed), "a read ran on a lease nobody renewed for {lease} ticks");
    h.heal();
    h.step(A, Event::Tick);
    h.step(A, Event::Tick);
    h.run();
    assert!(h.reads_executed.contains(&lapsed), "the read must run once a quorum echoes again");
}

/// A replica that may have echoed a leased round before it crashed refuses to help elect anyone
/// for an election timeout after it restarts, as if it had just heard from that leader; a
/// brand-new replica (term 0) echoed nothing and votes at once.
#[test]
fn a_restarted_voter_keeps_its_promise_to_the_leaseholder() {
    let candidacy =
        Candidacy { sync: Term(1), sync_end: Index(0), committed: Index(0), durable: Index(0), config: Index(0) };
    let voters: Vec<ReplicaId> = (0..3).map(ReplicaId).collect();
    let pre_vote_granted = |replica: &mut Replica| {
        replica.step(Event::Receive {
            from: ReplicaId(2),
            message: Message::PreVote { term: Term(2), candidate: candidacy },
        });
        replica
            .take_commands()
            .iter()
            .any(|c| matches!(c, Command::Send { message: Message::PreVoteResponse { granted: true, .. }, .. }))
    };
    let cfg = Config::new(ReplicaId(1), voters.clone(), Mode::Parallel, 3);
    let timeout = cfg.election_timeout_min_ticks;
    let hard = HardState { term: Term(1), voted_for: None, sync: Term(1), sync_end: Index(0) };
    let mut restarted = Replica::recover(cfg.clone(), hard, CheckpointState::default(), Vec::new());
    assert!(!pre_vote_granted(&mut restarted), "a restarted voter helped depose a leader at once");
    for _ in 0..timeout {
        restarted.step(Event::Tick);
        restarted.take_commands();
    }
    assert!(pre_vote_granted(&mut restarted), "the restarted voter must grant once the timeout passed");
    let mut brand_new = Replica::new(cfg);
    assert!(pre_vote_granted(&mut brand_new), "a brand-new replica must grant at once");
}

/// Large writes are checkpointed by bytes long before `checkpoint_interval` entries. The log
/// above a replica's checkpoint is what it reports to a candidate in one VoteResponse; before
/// the byte trigger, 4,096 entries of 128 KiB made a 257 MiB message that the transport refused,
/// and a restarted cluster never finished an election.
#[test]
fn large_writes_are_checkpointed_by_bytes() {
    let (write_bytes, _) = one_block_write_bytes();
    let run = |checkpoint_bytes: u64| {
        let mut h = Harness::configured(|cfg| cfg.checkpoint_bytes = checkpoint_bytes);
        h.elect(0);
        for seq in 1..=20 {
            h.propose(0, seq, seq);
            h.run();
        }
        assert_eq!(h.acknowledged.len(), 20);
        (0..3).map(|r| h.replicas[r].checkpoint_index()).collect::<Vec<_>>()
    };
    // Every fourth write's bytes start a checkpoint: 20 writes (and the leader's no-op) leave
    // each replica's checkpoint at the 16th entry or later, with 1,000 entries as the interval.
    for (r, checkpoint) in run(4 * write_bytes).iter().enumerate() {
        assert!(*checkpoint >= Index(16), "replica {r} checkpointed only through {checkpoint:?}");
    }
    // With a byte threshold out of reach, the entry interval alone decides: no checkpoint.
    assert!(run(u64::MAX).iter().all(|c| *c == Index(0)));
}

/// A replica that stops applying checkpoints after `checkpoint_idle_ticks` (a chunk that is no
/// longer written lets go of its log, and of the server WAL's segments that log keeps), not a
/// tick before; with the trigger off, entries below both other thresholds stay above it.
#[test]
fn a_replica_that_stops_applying_checkpoints_once_idle() {
    let ticks_until_checkpoint = |idle: u64| {
        let mut h = Harness::configured(|cfg| cfg.checkpoint_idle_ticks = idle);
        h.elect(0);
        for seq in 1..=3 {
            h.propose(0, seq, seq);
            h.run();
        }
        let applied = h.replicas[0].applied_watermark();
        assert!(applied >= Index(3), "three writes applied: {applied:?}");
        assert_eq!(h.replicas[0].checkpoint_index(), Index(0), "no entry or byte trigger is due");
        for tick in 1..=40 {
            for r in 0..3 {
                h.step(r, Event::Tick);
            }
            h.run();
            if h.replicas[0].checkpoint_index() > Index(0) {
                assert_eq!(h.replicas[0].checkpoint_index(), applied, "the checkpoint covers what was applied");
                for r in 1..3 {
                    assert!(h.replicas[r].checkpoint_index() <= h.replicas[r].applied_watermark());
                }
                return Some(tick);
            }
        }
        None
    };
    assert_eq!(ticks_until_checkpoint(5), Some(5));
    assert_eq!(ticks_until_checkpoint(12), Some(12));
    assert_eq!(ticks_until_checkpoint(0), None, "0 turns the idle trigger off");
}

/// After a whole-cluster restart every replica's committed watermark is back at its checkpoint.
/// A voter reports only the copies the candidate lacks (above its durable prefix), not its whole
/// log above that watermark: 4,096 entries of 128 KiB once made a response too large to send.
#[test]
fn restarted_voters_report_only_what_the_candidate_lacks() {
    let mut h = Harness::configured(|_| {});
    h.elect(A);
    h.write_acknowledged(A, 1..=20, |seq| seq % 12);
    // C misses the last three writes.
    h.isolate(C);
    let missed = h.write_acknowledged(A, 21..=23, |seq| 100 + seq);
    let lacked: Vec<Index> =
        (1..=h.replicas[A].last_index().0).map(Index).filter(|i| h.replicas[C].entry(*i).is_none()).collect();
    assert_eq!(lacked.len(), 3);
    h.heal();
    h.restart_all();
    h.isolate(A);
    h.vote_reports.clear();
    h.elect(C);
    let to_c: Vec<_> =
        h.vote_reports.iter().filter(|(from, to, granted, _)| *from == B && *to == C && *granted).collect();
    assert!(!to_c.is_empty(), "B never granted C its vote");
    for (_, _, _, reported) in to_c {
        assert_eq!(reported, &lacked, "B's report must be exactly what C lacks");
    }
    // The merge took those entries from B: C serves them.
    for (k, id) in missed.iter().enumerate() {
        assert_eq!(h.block(C, 100 + 21 + k as u64), Some(*id));
    }
    h.write_acknowledged(C, 24..=24, |_| 5);
}

/// A voter refuses a candidate that lacks more of its log than one vote answer may carry
/// (`max_vote_bytes`) instead of sending a report too large for the transport; a fresher
/// replica wins instead and nothing acknowledged is lost. Control: with no cap, the lagging
/// candidate wins with the voter's report.
#[test]
fn a_voter_refuses_a_candidate_that_lacks_too_much() {
    let (_, write_bytes) = one_block_write_bytes();
    let run = |max_vote_bytes: u64| {
        let mut h = Harness::configured(|cfg| cfg.max_vote_bytes = max_vote_bytes);
        h.elect(A);
        h.write_acknowledged(A, 1..=1, |seq| seq);
        h.isolate(C);
        let written = h.write_acknowledged(A, 2..=11, |seq| seq);
        h.heal();
        h.isolate(A);
        h.vote_reports.clear();
        let c_won = h.try_elect(C);
        let b_refused = h.vote_reports.iter().any(|(from, to, granted, _)| *from == B && *to == C && !*granted);
        let leader = if c_won { C } else { B };
        if !c_won {
            // C would also need more than one Sync: B serves once A adopted its merged log.
            h.heal();
            h.elect(B);
        }
        h.write_acknowledged(leader, 12..=12, |_| 20);
        for (k, id) in written.iter().enumerate() {
            assert_eq!(h.block(leader, 2 + k as u64), Some(*id), "write {k} lost under leader {leader}");
        }
        (c_won, b_refused)
    };
    assert_eq!(run(4 * write_bytes), (false, true), "C lacks ten writes; B may report only four");
    assert_eq!(run(u64::MAX), (true, false), "without a cap C wins with B's report");
}

/// A new leader whose decided log exceeds one Sync (`max_sync_bytes`) sends it in chunks, each
/// continuing where the follower's ack says it stands, and serves once a follower holds all of
/// it. After a whole-cluster restart every follower's committed watermark is back at zero, so
/// the decided log of 20 writes is what each needs; before chunks, the leader offered a
/// snapshot at its applied watermark (also zero), which the followers ignored, and it never
/// served.
#[test]
fn a_decided_log_larger_than_one_sync_goes_in_chunks() {
    let (_, one) = one_block_write_bytes();
    let mut h = Harness::configured(|cfg| cfg.max_sync_bytes = 3 * one);
    h.elect(A);
    let written = h.write_acknowledged(A, 1..=20, |seq| seq);
    h.restart_all();
    h.syncs.clear();
    h.elect(B);
    let end = h.syncs.first().expect("no Sync sent").3;
    assert!(end >= Index(20), "decided log ends at {end:?}");
    for follower in [A, C] {
        let chunks = h.syncs.iter().filter(|(from, to, upto, _)| *from == B && *to == follower && *upto < end).count();
        assert!(chunks >= 5, "follower {follower} got {chunks} partial chunks");
    }
    h.write_acknowledged(B, 21..=21, |_| 50);
    for (k, id) in written.iter().enumerate() {
        assert_eq!(h.block(B, 1 + k as u64), Some(*id));
    }
}

/// An acknowledgement commits what it completes a quorum for, even when nothing else happens
/// after it: here the leader's own disk is parked, so no completion of its own (which looks at
/// every index) follows, and only the acknowledgements' own look (their indices) can commit.
#[test]
fn an_acknowledgement_alone_commits_the_index_it_completes() {
    let mut h = Harness::new(NaiveFlags::default());
    h.elect(C);
    h.slow_disk.insert(C);
    h.cut.insert((C, B));
    let id = h.propose(C, 1, X);
    h.run();
    let index = h.replicas[C].last_index();
    // Durable on A only (C's copy is parked): one copy of three.
    assert!(!h.replicas[C].is_committed(index), "committed on one durable copy");
    h.cut.remove(&(C, B));
    for _ in 0..4 {
        h.step(C, Event::Tick);
        h.run();
        if h.replicas[C].is_committed(index) {
            break;
        }
    }
    assert!(h.replicas[C].is_committed(index), "A's and B's acknowledgements did not commit it");
    assert!(h.parked.iter().all(|(r, _)| *r == C) && !h.parked.is_empty(), "C's own write completed");
    h.step(C, Event::Tick);
    h.run();
    assert!(h.acknowledged.contains(&id));
}

/// A follower that missed entries the leader's checkpoint then pruned is caught up from the
/// entries the leader retained for it, not from the block image, as long as it lacks at most a
/// checkpoint's worth; lacking more, it gets the image as before. Before the retention a fresh,
/// healthy cluster filled with 1 MiB writes sent rebuilds: a checkpoint of 32 entries left the
/// slower follower a few entries short.
#[test]
fn a_follower_behind_the_checkpoint_is_caught_up_from_retained_entries() {
    let run = |writes: u64| {
        let mut h = Harness::configured(|cfg| {
            cfg.checkpoint_interval = 8;
            cfg.lbb_span = 32; // the lag limit, max(8 / 2, 33) entries, is out of reach
        });
        h.elect(A);
        h.cut.insert((A, C)); // C hears nothing (it still answers): it misses these writes
        for seq in 1..=writes {
            h.propose(A, seq, seq);
            h.run();
        }
        let checkpoint = h.replicas[A].checkpoint_index();
        assert!(checkpoint >= Index(8), "the leader checkpointed only through {checkpoint:?}");
        assert!(h.replicas[C].last_index() < checkpoint, "C holds what the checkpoint pruned");
        let retained = h.replicas[A].retained_entries();
        h.heal();
        for _ in 0..20 {
            h.step(A, Event::Tick);
            h.run();
        }
        (h, retained)
    };
    let (h, retained) = run(10);
    assert!(retained > 0, "nothing retained for C");
    assert!(h.snapshots.is_empty(), "C was sent the block image: {:?}", h.snapshots);
    assert_eq!(h.replicas[C].last_index(), h.replicas[A].last_index(), "C did not catch up");
    for seq in 1..=10 {
        assert_eq!(h.block(C, seq), h.block(A, seq), "block {seq} differs on C");
        assert!(h.block(C, seq).is_some(), "block {seq} not written on C");
    }
    // Twenty writes: C lacks more than a checkpoint's worth, and only the image catches it up.
    let (h, _) = run(20);
    assert!(h.snapshots.contains(&(A, C)), "no snapshot for a follower lacking more than a checkpoint");
}

/// A follower whose disk lags holds new writes at the leader once it is half a checkpoint (or
/// the in-flight window) behind, and lets them through as it catches up; a follower whose disk
/// stops for an election timeout no longer holds anything.
#[test]
fn a_lagging_follower_holds_new_writes_until_it_catches_up_or_stops() {
    let mut h = Harness::configured(|cfg| {
        cfg.checkpoint_interval = 8;
        cfg.lbb_span = 4; // window 5, so the lag limit is max(8 / 2, 5) = 5 entries
    });
    h.elect(A);
    h.slow_disk.insert(C);
    // One at a time: each commits on A and B, so the in-flight window never fills; only C's lag
    // can hold a write.
    let ids: Vec<RequestId> = (1..=12)
        .map(|seq| {
            let id = h.propose(A, seq, seq);
            h.run();
            id
        })
        .collect();
    h.step(A, Event::Tick);
    h.run();
    let held = h.replicas[A].proposals_held_by_lag();
    assert!(held > 0, "no write was held for C");
    assert_eq!(h.replicas[A].follower_lag(), 5, "C lags by the limit");
    let acked = ids.iter().filter(|id| h.acknowledged.contains(id)).count();
    assert!(acked < ids.len(), "every write went through while C lagged");
    // C's disk completes what it has, again and again: the held writes go through.
    for _ in 0..10 {
        for (r, event) in std::mem::take(&mut h.parked) {
            h.step(r, event);
        }
        h.run();
        h.step(A, Event::Tick);
        h.run();
    }
    assert!(ids.iter().all(|id| h.acknowledged.contains(id)), "held writes never went through");
    // C's disk stops (its completions stay parked): the writes wait at most an election timeout.
    let more: Vec<RequestId> = (13..=24).map(|seq| h.propose(A, seq, seq)).collect();
    h.run();
    assert!(!more.iter().all(|id| h.acknowledged.contains(id)), "C's lag held nothing");
    for _ in 0..15 {
        h.step(A, Event::Tick);
        h.run();
    }
    assert!(more.iter().all(|id| h.acknowledged.contains(id)), "a stopped follower holds the group");
    assert_eq!(h.replicas[A].follower_lag(), 0, "C still counted as keeping up");
}
