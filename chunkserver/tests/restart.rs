//! Real processes: a whole-cluster restart after many large writes elects leaders and serves
//! what was written.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// fio writing (or, with `verify_only`, checking) 64 MiB of 128 KiB blocks with checksums.
fn fio_128k(uri: &str, verify_only: bool) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args(["--name=large", "--ioengine=nbd", "--rw=write", "--bs=128k", "--iodepth=16", "--size=64m"])
        .args(["--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"])
        .arg(if verify_only { "--verify_only=1" } else { "--do_verify=0" })
        .arg(format!("--uri={uri}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs fio `cmd` to success within `limit` (checked by `fio_finished`); kills it and fails
/// the test otherwise.
fn finish_within(mut cmd: Command, limit: Duration, what: &str, c: &LocalCluster) {
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish in {limit:?}; cluster log:\n{}", c.log_tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    fio_finished(child);
}

/// Two passes of 128 KiB writes over one 64 MiB chunk leave 1,024 entries (128 MiB) above its
/// checkpoint unless checkpoints also follow bytes. After a restart every replica's committed
/// watermark is its checkpoint; before voters reported only what the candidate lacks, each vote
/// response carried that whole log: a frame over the transport's limit, refused, and the
/// cluster never finished an election (while each new leader rewrote its log into the WAL until
/// the disk filled).
#[test]
fn a_restart_after_large_writes_elects_and_serves_them() {
    restart_after_large_writes(&[]);
}

/// The same with Sync messages of 256 KiB: each new leader sends its decided log (what lies
/// above a follower's committed watermark, after the restart the whole log above its
/// checkpoint) in many chunks, through the real transport and WAL. Checkpoints every 100
/// entries leave at least the last 24 writes (3 MiB) above every checkpoint.
#[test]
fn a_restart_with_small_sync_chunks_elects_and_serves() {
    let c = restart_after_large_writes(&["--max-sync-bytes", "256K", "--checkpoint-interval", "100"]);
    // The followers of the new leader took its decided log in parts (each process renders its
    // `/metrics` every 500 ms).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let partial: f64 = (1..=3)
            .filter_map(|s| chunkserver::profile::fetch(&format!("127.0.0.1:{}", c.metrics_port() as u32 + s)).ok())
            .filter_map(|text| counter(&text, "parallelraft_partial_syncs_received_total"))
            .sum();
        if partial > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no follower received a partial Sync; cluster log:\n{}", c.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn restart_after_large_writes(extra: &[&str]) -> LocalCluster {
    let _g = serial();
    require_tool("fio");
    let mut c = LocalCluster::start_with("parallel", "64M", 3, extra);
    // `local`'s default links: abstract unix sockets, found again under the same names after
    // the restart below.
    let config = std::fs::read_to_string(c.data().join("cluster.toml")).unwrap();
    assert_eq!(config.matches("addr = \"unix:@parallelraft-").count(), 3, "unix socket addresses:\n{config}");
    for pass in 1..=2 {
        finish_within(fio_128k(&c.uri(), false), Duration::from_secs(120), &format!("write pass {pass}"), &c);
    }
    c.restart_all();
    finish_within(fio_128k(&c.uri(), true), Duration::from_secs(60), "verify after restart", &c);
    c
}
