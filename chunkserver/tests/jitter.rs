//! The benchmark jitter on real chunk server processes: frames between servers held back at
//! random (and so reordered) in both modes, with every write verified afterwards.

mod support;

use std::time::Duration;

use support::*;

/// Writes with fio at depth while the servers delay each other's frames (uniform 0..3 ms, and
/// one frame in 20 by 20 ms more), then reads every block back; each server must have held
/// frames, so the delay path ran rather than being skipped.
fn verified_under_jitter(mode: &str) {
    let _g = serial();
    require_tool("fio");
    let jitter = ["--jitter-us", "3000", "--straggler-us", "20000", "--straggler-per-mille", "50"];
    let c = LocalCluster::start_with(mode, "128M", 3, &jitter);
    let out = run_ok(&mut fio_verify(&c.uri(), 16, 2, 8, 64));
    let job = fio_job(&out);
    assert_eq!(job["error"], 0, "{out}");
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(2 * (8 << 20)), "{job}");
    for server in 1..=3u32 {
        let addr = format!("127.0.0.1:{}", c.metrics_port() as u32 + server);
        wait_for_counter(&addr, "parallelraft_jitter_held_frames_total", 100.0, Duration::from_secs(10));
    }
}

#[test]
fn parallel_mode_writes_verify_under_jitter() {
    verified_under_jitter("parallel");
}

#[test]
fn raft_mode_writes_verify_under_jitter() {
    verified_under_jitter("raft");
}
