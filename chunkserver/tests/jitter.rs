//! The benchmark jitter on real chunk server processes: frames between servers held back at
//! random (and so reordered) in both modes, with every write verified afterwards.

mod support;

use chunkserver::profile::fetch;
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
        // Rendered every 500 ms: wait for a rendering after the writes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = fetch(&addr).unwrap();
            let held = counter(&text, "parallelraft_jitter_held_frames_total").unwrap_or(0.0);
            if held >= 100.0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "server {server} held {held} frames:\n{text}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
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
