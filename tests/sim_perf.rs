//! The simulator's perf model (`parallelraft::sim::perf`): the protocol alone, no CPU. These
//! check what ordering costs, in simulated time (deterministic, so never flaky): out-of-order
//! acknowledgement and commit must keep ParallelRaft's writes moving past a straggling message
//! where classic Raft waits for it, and with nothing to wait for the two modes are the same.

use parallelraft::sim::perf::{measure, PerfModel};
use parallelraft::Mode;

const OPS: u64 = 1500;

#[test]
fn with_stragglers_parallel_raft_keeps_writing_where_raft_waits() {
    let model = PerfModel::new(32).with_stragglers();
    let parallel = measure(Mode::Parallel, model, OPS, 3).unwrap();
    let raft = measure(Mode::Raft, model, OPS, 3).unwrap();
    assert!(parallel.iops >= 2.0 * raft.iops, "parallel {parallel:?} against raft {raft:?}");
    // In Raft a straggler holds back every write behind it, so its tail is a straggler's
    // delay (20 ms); most ParallelRaft writes never wait for one (a majority needs only one of
    // the two followers in time), so its median stays that of a run without delays.
    assert!(raft.p99_us >= 10_000, "raft {raft:?}");
    let calm = measure(Mode::Parallel, PerfModel::new(32), OPS, 3).unwrap();
    assert!(parallel.p50_us <= calm.p50_us + 100, "parallel {parallel:?} against no delays {calm:?}");
}

#[test]
fn at_depth_one_without_delays_the_modes_are_alike() {
    let model = PerfModel::new(1);
    let parallel = measure(Mode::Parallel, model, OPS, 4).unwrap();
    let raft = measure(Mode::Raft, model, OPS, 4).unwrap();
    let ratio = parallel.iops / raft.iops;
    assert!((0.95..=1.05).contains(&ratio), "parallel {parallel:?} against raft {raft:?}");
    // Latency: two hops to the leader and back, a WAL write on the leader and a follower in
    // parallel (plus a hop each way), the apply.
    assert!((200..=600).contains(&parallel.p50_us), "{parallel:?}");
}

#[test]
fn a_run_is_determined_by_its_seed() {
    let model = PerfModel::new(8).with_jitter();
    assert_eq!(measure(Mode::Parallel, model, 300, 9).unwrap(), measure(Mode::Parallel, model, 300, 9).unwrap());
}
