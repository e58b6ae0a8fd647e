//! Scripted histories of replication against the real core with a hand-driven network (see
//! `harness`): what commits an index and when, acknowledgements and durability, checkpoints,
//! and followers that lag or miss entries.

mod harness;

use harness::*;
use parallelraft::sim::write_op;
use parallelraft::{
    ClientId, ClientRequest, Command, Event, Index, MembershipChange, Message, Mode, NaiveFlags, ReplicaId, RequestId,
    RoleKind,
};

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

/// A write through leader C that only A receives while C's own disk completion is parked:
/// durable on A alone, one copy of three. Returns it and its index.
fn one_copy_short() -> (Harness, RequestId, Index) {
    let mut h = Harness::new(NaiveFlags::default());
    h.elect(C);
    h.slow_disk.insert(C);
    h.cut.insert((C, B));
    let id = h.propose(C, 1, X);
    h.run();
    let index = h.replicas[C].last_index();
    assert!(!h.replicas[C].is_committed(index), "committed on one durable copy (A's)");
    assert!(!h.parked.is_empty(), "C's own write was not parked");
    (h, id, index)
}

/// The commit notice of the next tick lets C acknowledge `id`.
fn assert_acknowledged_after_a_tick(h: &mut Harness, id: RequestId) {
    h.step(C, Event::Tick);
    h.run();
    assert!(h.acknowledged.contains(&id), "{id:?} not acknowledged");
}

/// An acknowledgement commits what it completes a quorum for, even when nothing else happens
/// after it: here the leader's own disk is parked, so no completion of its own follows, and
/// only the acknowledgements' own look (their indices) can commit.
#[test]
fn an_acknowledgement_alone_commits_the_index_it_completes() {
    let (mut h, id, index) = one_copy_short();
    h.cut.remove(&(C, B));
    // B lost the append: it is resent once B's stall clock (started by that append) runs out.
    for _ in 0..h.replicas[C].config().election_timeout_min_ticks {
        h.step(C, Event::Tick);
        h.run();
        if h.replicas[C].is_committed(index) {
            break;
        }
    }
    assert!(h.replicas[C].is_committed(index), "A's and B's acknowledgements did not commit it");
    assert!(h.parked.iter().all(|(r, _)| *r == C) && !h.parked.is_empty(), "C's own write completed");
    assert_acknowledged_after_a_tick(&mut h, id);
}

/// The leader's own durable write commits what it completes a quorum for: here only A
/// receives the write, so A's acknowledgement leaves it one copy short until the leader's
/// parked disk completes. (That completion looks only at the copies it made durable and the
/// uncommitted configuration entry, not at the whole in-flight window.)
#[test]
fn the_leaders_own_durable_write_commits_the_index_it_completes() {
    let (mut h, id, index) = one_copy_short();
    for (r, event) in std::mem::take(&mut h.parked) {
        h.step(r, event);
    }
    h.run();
    assert!(h.replicas[C].is_committed(index), "C's own durable write did not commit it");
    assert_acknowledged_after_a_tick(&mut h, id);
}

/// A configuration entry counts the leader's copy only once its whole log prefix is durable
/// (membership rule 6), so the leader's durable write of an *earlier* entry can be what commits
/// it. Here a write commits on A and B while the leader's copy is parked; the configuration
/// entry after it (removing A, so B and C must both hold it) is durable on B and at the
/// leader, but the leader's prefix has a hole until the write's completion, released last.
#[test]
fn the_leaders_durable_prefix_reaching_a_configuration_entry_commits_it() {
    let mut h = Harness::new(NaiveFlags::default());
    h.elect(C);
    h.slow_disk.insert(C);
    h.propose(C, 1, X);
    h.run();
    let write = h.replicas[C].last_index();
    assert!(h.replicas[C].is_committed(write), "the write did not commit on A and B");
    let change = RequestId { client: ClientId(99), seq: 1 };
    h.step(C, Event::ChangeMembership { id: change, change: MembershipChange::Remove(ReplicaId(A as u32)) });
    h.run();
    let config = h.replicas[C].last_index();
    assert_eq!(config, write.next(), "the configuration entry is not the next index");
    assert!(h.replicas[B].entry(config).is_some(), "B lacks the configuration entry");
    assert!(!h.replicas[C].is_committed(config), "committed without the leader's whole prefix");
    // The configuration entry's own completion first: the leader's prefix still has the hole.
    let parked = std::mem::take(&mut h.parked);
    assert!(parked.len() >= 2, "expected the write's and the configuration's completions parked");
    for (r, event) in parked.into_iter().rev() {
        h.step(r, event);
        h.run();
    }
    assert!(h.replicas[C].is_committed(config), "the leader's durable prefix did not commit the configuration");
    assert_eq!(h.replicas[C].membership().voters, [B, C].iter().map(|r| ReplicaId(*r as u32)).collect());
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

/// Followers learn what committed above the leader's watermark from the commit notice's runs:
/// each index the runs name that the follower holds, and none it lacks. Here index 1 reaches
/// only the leader, so the watermark stays below it while the indices after it commit; A
/// misses one of them. (The window is widened so that all of them are in flight past the
/// stuck index.)
#[test]
fn followers_learn_commits_above_the_watermark_from_the_notice() {
    let mut h = Harness::configured(|cfg| cfg.in_flight_window = Some(16));
    h.elect(C);
    h.cut.insert((C, A));
    h.cut.insert((C, B));
    h.propose(C, 1, X);
    h.run();
    let stuck = h.replicas[C].last_index();
    h.heal();
    h.propose(C, 2, Y);
    h.propose(C, 3, 20);
    h.run();
    h.cut.insert((C, A));
    h.propose(C, 4, 21);
    h.run();
    let missed = h.replicas[C].last_index();
    h.heal();
    h.propose(C, 5, 22);
    h.run();
    let last = h.replicas[C].last_index();
    // The next append carries the notice of these commits. (Not ticks: a tick lets the leader
    // resend what a follower lacks.)
    h.propose(C, 6, 23);
    h.run();
    assert!(!h.replicas[C].is_committed(stuck), "the entry on the leader alone committed");
    let above: Vec<Index> = (stuck.0 + 1..=last.0).map(Index).collect();
    assert!(above.iter().all(|i| h.replicas[C].is_committed(*i)), "the leader did not commit past the hole");
    assert!(h.replicas[A].entry(missed).is_none(), "A holds the entry it was cut off from");
    for &i in &above {
        assert!(h.replicas[B].is_committed(i), "B did not learn that {i:?} committed");
        assert_eq!(h.replicas[A].is_committed(i), i != missed, "A at {i:?}");
    }
    assert!(!h.replicas[A].is_committed(stuck) && !h.replicas[B].is_committed(stuck));
}

/// A driver may step several events before it drains the commands (the servers do, per
/// round): the entries a leader appended meanwhile go to each follower in one append, once,
/// even when a heartbeat round (which sends what a follower has not been sent) falls between.
#[test]
fn writes_stepped_before_a_drain_go_to_each_follower_in_one_append() {
    let mut h = Harness::new(NaiveFlags::default());
    h.elect(C);
    // A write first: the followers' durable prefixes just moved (not stalled, so the heartbeat
    // round below resends nothing in flight).
    h.write_acknowledged(C, 1..=1, |_| Y);
    let first = h.replicas[C].last_index();
    for seq in 2..=4 {
        let id = RequestId { client: ClientId(1), seq };
        let request = ClientRequest { id, floor: 0, op: write_op(id, seq, 1) };
        h.replicas[C].step(Event::Propose(request));
        h.replicas[C].check_invariants();
    }
    // Enough ticks for a heartbeat round.
    for _ in 0..h.replicas[C].config().heartbeat_interval_ticks {
        h.replicas[C].step(Event::Tick);
        h.replicas[C].check_invariants();
    }
    let commands = h.replicas[C].take_commands();
    let heartbeats = commands.iter().filter(|c| matches!(c, Command::Send { message: Message::Heartbeat { .. }, .. }));
    assert_eq!(heartbeats.count(), 2, "no heartbeat round fell between the writes and the drain");
    for follower in [A, B] {
        let sent: Vec<Vec<Index>> = commands
            .iter()
            .filter_map(|c| match c {
                Command::Send { to, message: Message::Append { entries, .. } } if to.0 as usize == follower => {
                    Some(entries.iter().map(|e| e.index).collect())
                }
                _ => None,
            })
            .collect();
        let expected: Vec<Index> = (first.0 + 1..=first.0 + 3).map(Index).collect();
        assert_eq!(sent, vec![expected], "appends to replica {follower}");
    }
}

/// A follower that was idle and caught up is not "stalled": the first heartbeat round after a
/// new write sends it only a heartbeat, not the write a second time. The stall clock (which
/// decides when entries in flight are resent) used to start only when the follower's durable
/// prefix last moved, so after any idle spell longer than the stall threshold the round right
/// after a write resent it to every follower, in both modes.
#[test]
fn a_write_after_an_idle_spell_is_not_resent_by_the_next_heartbeat_round() {
    for mode in [Mode::Parallel, Mode::Raft] {
        let mut h = Harness::configured(|cfg| cfg.mode = mode);
        h.elect(C);
        h.write_acknowledged(C, 1..=1, |_| Y);
        // Idle (heartbeats delivered and answered) for longer than the stall threshold.
        let cfg = h.replicas[C].config().clone();
        for _ in 0..cfg.election_timeout_min_ticks * 2 {
            h.step(C, Event::Tick);
            h.run();
        }
        assert_eq!(h.replicas[C].role(), RoleKind::Leader, "{mode:?}: C lost its leadership while idle");
        let id = RequestId { client: ClientId(1), seq: 2 };
        h.replicas[C].step(Event::Propose(ClientRequest { id, floor: 0, op: write_op(id, 2, 1) }));
        let written = h.replicas[C].last_index();
        let mut commands = h.replicas[C].take_commands();
        // One heartbeat round before the followers' acknowledgements come back.
        for _ in 0..cfg.heartbeat_interval_ticks {
            h.replicas[C].step(Event::Tick);
            h.replicas[C].check_invariants();
            commands.extend(h.replicas[C].take_commands());
        }
        let heartbeats =
            commands.iter().filter(|c| matches!(c, Command::Send { message: Message::Heartbeat { .. }, .. }));
        assert_eq!(heartbeats.count(), 2, "{mode:?}: no heartbeat round fell before the acknowledgements");
        for follower in [A, B] {
            let sends = commands
                .iter()
                .filter(|c| match c {
                    Command::Send { to, message: Message::Append { entries, .. } } => {
                        to.0 as usize == follower && entries.iter().any(|e| e.index == written)
                    }
                    _ => false,
                })
                .count();
            assert_eq!(sends, 1, "{mode:?}: appends carrying the write to replica {follower}");
        }
    }
}
