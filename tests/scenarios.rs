//! Scripted histories against the real core with a hand-driven network (see `harness`): the
//! two known ParallelRaft anomalies, each run twice (the correct protocol must keep the
//! acknowledged write, and a naive variant, a test-only flag, must lose it, proving the check
//! can fail), the read lease, and what voters report to a candidate.

mod harness;

use harness::*;
use parallelraft::{
    Candidacy, CheckpointState, ClientId, Command, Config, Event, HardState, Index, Message, Mode, NaiveFlags, Op,
    Replica, ReplicaId, RequestId, RoleKind, Term,
};

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
