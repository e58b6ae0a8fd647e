//! The simulator's seed sweep as part of `cargo test`: every seed must pass, in both modes,
//! with 3 and 5 replicas, and with an operator changing the membership. (`.ci/run` also runs the
//! `sim` command over 2,000 seeds per mode.)

use std::thread;

use parallelraft::sim::{self, SimConfig};
use parallelraft::Mode;

/// Runs `seeds` seeds on two threads (the machine has two cores) and returns the failures.
fn sweep(start: u64, seeds: u64, replicas: usize, mode: Mode) -> Vec<String> {
    sweep_with(start, seeds, replicas, mode, false)
}

fn sweep_with(start: u64, seeds: u64, replicas: usize, mode: Mode, membership: bool) -> Vec<String> {
    sweep_tuned(start, seeds, replicas, mode, move |cfg| cfg.membership = membership).0
}

/// Counts summed over a sweep's runs.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    /// Sync messages that carried part of a decided log.
    partial_syncs: u64,
    /// Replica steps that left a hole wider than the look-behind span.
    wide_holes: u64,
    /// Drains that ran the commands of two or more steps together (`batch_rounds`).
    batched_drains: u64,
}

impl Totals {
    fn add(&mut self, other: Totals) {
        self.partial_syncs += other.partial_syncs;
        self.wide_holes += other.wide_holes;
        self.batched_drains += other.batched_drains;
    }
}

/// Runs `seeds` seeds, each configuration adjusted by `tune`: the failures, and counts summed
/// over the runs.
fn sweep_tuned(
    start: u64,
    seeds: u64,
    replicas: usize,
    mode: Mode,
    tune: impl Fn(&mut SimConfig) + Copy + Send + 'static,
) -> (Vec<String>, Totals) {
    let half = seeds / 2;
    let ranges = [(start, start + half), (start + half, start + seeds)];
    let handles: Vec<_> = ranges
        .into_iter()
        .map(|(a, b)| {
            thread::spawn(move || {
                let (mut failures, mut totals) = (Vec::new(), Totals::default());
                for seed in a..b {
                    let mut cfg = SimConfig::new(seed, replicas, mode);
                    tune(&mut cfg);
                    let report = sim::run(&cfg);
                    let stats = &report.stats;
                    totals.add(Totals {
                        partial_syncs: stats.partial_syncs,
                        wide_holes: stats.wide_holes,
                        batched_drains: stats.batched_drains,
                    });
                    if !report.passed() {
                        failures.push(format!("seed {seed}: {:?}", report.violations));
                    }
                }
                (failures, totals)
            })
        })
        .collect();
    let (mut failures, mut totals) = (Vec::new(), Totals::default());
    for h in handles {
        let (f, t) = h.join().expect("sweep thread panicked");
        failures.extend(f);
        totals.add(t);
    }
    (failures, totals)
}

/// Every seed passes with `tune`: `seeds` of them from `starts[0]` in Parallel mode and from
/// `starts[1]` in Raft mode, and `membership_seeds` from `starts[2]` in Parallel mode with an
/// operator changing the membership.
fn assert_tuned_sweeps_pass(
    tune: impl Fn(&mut SimConfig) + Copy + Send + 'static,
    starts: [u64; 3],
    seeds: u64,
    membership_seeds: u64,
) {
    for (start, mode) in [(starts[0], Mode::Parallel), (starts[1], Mode::Raft)] {
        let (failures, _) = sweep_tuned(start, seeds, 3, mode, tune);
        assert!(failures.is_empty(), "{mode:?}: {failures:#?}");
    }
    let (failures, _) = sweep_tuned(starts[2], membership_seeds, 3, Mode::Parallel, move |cfg| {
        tune(cfg);
        cfg.membership = true;
    });
    assert!(failures.is_empty(), "membership: {failures:#?}");
}

#[test]
fn parallel_mode_three_replicas() {
    let failures = sweep(1_000_000, 600, 3, Mode::Parallel);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn raft_mode_three_replicas() {
    let failures = sweep(2_000_000, 600, 3, Mode::Raft);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn parallel_mode_five_replicas() {
    let failures = sweep(3_000_000, 200, 5, Mode::Parallel);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn raft_mode_five_replicas() {
    let failures = sweep(4_000_000, 200, 5, Mode::Raft);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn parallel_mode_membership_changes() {
    let failures = sweep_with(5_000_000, 300, 3, Mode::Parallel, true);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn raft_mode_membership_changes() {
    let failures = sweep_with(6_000_000, 300, 3, Mode::Raft, true);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// New leaders send their decided logs in chunks of at most `max_sync_bytes`; with the limit
/// at one entry of the simulator's largest write, most syncs take several chunks (checked), and
/// every seed must still pass, also with membership changes.
#[test]
fn decided_logs_sent_in_small_chunks() {
    let tight = |cfg: &mut SimConfig| cfg.max_sync_bytes = 9_000;
    for (start, mode) in [(7_000_000, Mode::Parallel), (8_000_000, Mode::Raft)] {
        let (failures, totals) = sweep_tuned(start, 300, 3, mode, tight);
        assert!(failures.is_empty(), "{failures:#?}");
        let partial_syncs = totals.partial_syncs;
        assert!(partial_syncs > 1_000, "{mode:?}: only {partial_syncs} partial syncs in 300 seeds");
    }
    let (failures, _) = sweep_tuned(9_000_000, 200, 3, Mode::Parallel, move |cfg| {
        tight(cfg);
        cfg.membership = true;
    });
    assert!(failures.is_empty(), "{failures:#?}");
}

/// An in-flight window wider than the look-behind span (the chunk servers run one): a
/// follower may then lack uncommitted entries more than the span below its last, whose ranges
/// nothing describes, and must apply nothing past them until they arrive. Every seed must still
/// pass, with membership changes too. Such holes must really be more frequent: a follower that
/// learns of commits late has some with any window (it lacks entries the others committed), the
/// wider window adds those above the leader's watermark.
#[test]
fn windows_wider_than_the_span_keep_every_invariant() {
    let wide = |cfg: &mut SimConfig| cfg.in_flight_window = Some(16);
    let fault_free = |cfg: &mut SimConfig| cfg.faults = false;
    let (failures, narrow) = sweep_tuned(13_000_000, 100, 3, Mode::Parallel, fault_free);
    assert!(failures.is_empty(), "{failures:#?}");
    let (failures, widened) = sweep_tuned(13_000_000, 100, 3, Mode::Parallel, move |cfg| {
        fault_free(cfg);
        wide(cfg);
    });
    assert!(failures.is_empty(), "{failures:#?}");
    let (with, without) = (widened.wide_holes, narrow.wide_holes);
    assert!(
        with >= 2 * without.max(100),
        "steps with a hole wider than the span: {with} with window 16, {without} without"
    );
    assert_tuned_sweeps_pass(wide, [13_000_000, 14_000_000, 15_000_000], 600, 300);
}

/// Writes and acknowledgements stepped as the servers step them, their commands left for the
/// end of a round (a leader's writes of one round then go out in one append, and a tick, a
/// vote or a crash may fall inside a round): every seed must pass in both modes and with
/// membership changes, and rounds must really combine steps (counted without faults, so that
/// no seed of the sweeps below runs twice).
#[test]
fn rounds_that_batch_writes_and_acknowledgements_keep_every_invariant() {
    let batch = |cfg: &mut SimConfig| cfg.batch_rounds = true;
    let (failures, totals) = sweep_tuned(16_000_000, 100, 3, Mode::Parallel, move |cfg| {
        batch(cfg);
        cfg.faults = false;
    });
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(totals.batched_drains >= 5_000, "only {} drains combined steps in 100 runs", totals.batched_drains);
    assert_tuned_sweeps_pass(batch, [16_000_000, 17_000_000, 18_000_000], 600, 300);
}

/// Replicas that checkpoint whenever applying pauses for a few ticks (the chunk servers' idle
/// trigger, here far more eager than theirs): every seed must still pass, with membership changes
/// too, and the trigger must really add checkpoints.
#[test]
fn idle_checkpoints_keep_every_invariant() {
    let checkpoints = |start: u64, idle: u64| {
        let mut total = 0;
        for seed in start..start + 20 {
            let mut cfg = SimConfig::new(seed, 3, Mode::Parallel);
            cfg.checkpoint_idle_ticks = idle;
            total += sim::run(&cfg).stats.checkpoints;
        }
        total
    };
    let (without, with) = (checkpoints(10_000_000, 0), checkpoints(10_000_000, 3));
    assert!(with > without, "the idle trigger added no checkpoints ({with} against {without})");
    let idle = |cfg: &mut SimConfig| cfg.checkpoint_idle_ticks = 3;
    assert_tuned_sweeps_pass(idle, [10_000_000, 11_000_000, 12_000_000], 1_000, 500);
}

#[test]
fn membership_runs_really_change_the_membership() {
    // Without faults every run must pass, and the operator must complete changes (otherwise
    // the membership sweeps would test nothing).
    let mut changes = 0;
    for seed in 0..30 {
        let mut cfg = SimConfig::new(seed, 3, Mode::Parallel);
        cfg.faults = false;
        cfg.membership = true;
        let report = sim::run(&cfg);
        assert!(report.passed(), "seed {seed}: {:?}", report.violations);
        changes += report.stats.membership_changes;
    }
    assert!(changes >= 30, "only {changes} membership changes in 30 runs");
}

#[test]
fn fault_free_runs_apply_out_of_order() {
    // Without faults every run must pass, and ParallelRaft mode must really apply some entries
    // past unapplied predecessors (otherwise the feature would be dead code).
    let mut out_of_order = 0;
    for seed in 0..50 {
        let mut cfg = SimConfig::new(seed, 3, Mode::Parallel);
        cfg.faults = false;
        let report = sim::run(&cfg);
        assert!(report.passed(), "seed {seed}: {:?}", report.violations);
        out_of_order += report.stats.out_of_order_applies;
    }
    assert!(out_of_order > 0, "no out-of-order apply observed in 50 fault-free runs");
}

/// Seeds that once failed, kept as regression tests (see the issue notes for each bug).
#[test]
fn regression_seeds() {
    let cases: &[(u64, Mode, bool, &str)] = &[
        // Vote refused by every voter whose checkpoint was above the candidate's watermark, while
        // a snapshot had raised a follower's watermark without its sync term: no leader ever.
        (717, Mode::Parallel, false, "checkpoint vote deadlock"),
        (1270, Mode::Parallel, false, "checkpoint vote deadlock"),
        // Pre-candidates lagging in term proposed terms the voters had passed, forever.
        (144, Mode::Parallel, true, "pre-vote term lag"),
    ];
    for &(seed, mode, soak, bug) in cases {
        let mut cfg = SimConfig::new(seed, 3, mode);
        if soak {
            cfg = cfg.soak();
        }
        let report = sim::run(&cfg);
        assert!(report.passed(), "regression seed {seed} ({bug}): {:?}", report.violations);
    }
}

/// Seeds of the membership sweep that once failed (`sim --membership`).
#[test]
fn membership_regression_seeds() {
    let cases: &[(u64, Mode, &str)] = &[
        // A wiped server rejoining under its old identity granted votes again: two leaders.
        (60, Mode::Parallel, "wiped server voted"),
        (70, Mode::Parallel, "wiped server voted"),
        (94, Mode::Parallel, "wiped server voted"),
        // A voter lagging behind a change refused the rightful candidate as a non-voter.
        (44, Mode::Parallel, "candidate membership check deadlock"),
        // A non-member's stale leader hint sent the operator in a cycle.
        (167, Mode::Parallel, "stale hint"),
        // A deposed leader refused a change from its stale membership.
        (623, Mode::Raft, "stale leader refusal"),
        (787, Mode::Raft, "stale leader refusal"),
        // The holder of a newer uncommitted configuration held the entries a voter had
        // pruned, but the vote rule credited only its committed watermark: no leader.
        (827, Mode::Parallel, "pruned entries vs configuration deadlock"),
        (10998, Mode::Parallel, "pruned entries vs configuration deadlock"),
        (11152, Mode::Parallel, "pruned entries vs configuration deadlock"),
        (15422, Mode::Parallel, "pruned entries vs configuration deadlock"),
        (12402, Mode::Raft, "pruned entries vs configuration deadlock"),
        (15701, Mode::Raft, "pruned entries vs configuration deadlock"),
        // A wiped removed server forgot its term, took a deposed leader of an old configuration
        // for current, and its acknowledgements let that leader commit: two entries at index 71.
        (108692, Mode::Raft, "wiped server forgot its term"),
        // A configuration adopted above a hole: the only candidate of the new configuration
        // lacked the entries a voter had pruned, and nobody could win.
        (109502, Mode::Raft, "configuration above a hole"),
    ];
    for &(seed, mode, bug) in cases {
        let mut cfg = SimConfig::new(seed, 3, mode);
        cfg.membership = true;
        let report = sim::run(&cfg);
        assert!(report.passed(), "membership regression seed {seed} ({bug}): {:?}", report.violations);
    }
}
