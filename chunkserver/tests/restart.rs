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
/// watermark is its checkpoint, so each vote response carries that whole log: before the byte
/// trigger it was a frame over the transport's limit, refused, and the cluster never finished
/// an election (while each new leader rewrote its log into the WAL until the disk filled).
#[test]
fn a_restart_after_large_writes_elects_and_serves_them() {
    let _g = serial();
    require_tool("fio");
    let mut c = LocalCluster::start("parallel", "64M");
    for pass in 1..=2 {
        finish_within(fio_128k(&c.uri(), false), Duration::from_secs(120), &format!("write pass {pass}"), &c);
    }
    c.restart_all();
    finish_within(fio_128k(&c.uri(), true), Duration::from_secs(60), "verify after restart", &c);
}
