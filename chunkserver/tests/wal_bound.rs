//! Real processes: a chunk that goes quiet does not keep its server's write-ahead log growing.
//! Its few entries sit in the oldest segment while another chunk writes hundreds of MiB; the
//! server rewrites the quiet chunk's log at the head, the old segments go, and after a restart
//! the quiet chunk's writes read back.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// Segment files of server `server`'s log.
fn segments(c: &LocalCluster, server: u32) -> usize {
    std::fs::read_dir(c.data().join(format!("server-{server}")).join("wal"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".log"))
        .count()
}

/// A qemu-io script of eight 4 KiB `verb`s (write or read) 64 KiB apart in chunk 0, with the
/// patterns `base`, `base + 1`, ...
fn eight_blocks(verb: &str, base: u32) -> Vec<String> {
    (0..8).map(|k| format!("{verb} -P {} {} 4k", base + k, k * 65536)).collect()
}

fn qemu_io_ok(uri: &str, script: &[String]) -> String {
    run_ok(&mut qemu_io(uri, &script.iter().map(String::as_str).collect::<Vec<_>>()))
}

/// After a restart of every server, the blocks `eight_blocks("write", base)` wrote read back.
fn restart_and_read_back(c: &mut LocalCluster, base: u32) {
    c.restart_all();
    let out = qemu_io_ok(&c.uri(), &eight_blocks("read", base));
    assert!(!out.contains("verification failed"), "{out}");
}

#[test]
fn a_quiet_chunk_does_not_pin_the_servers_log() {
    let _g = serial();
    require_tool("fio");
    require_tool("qemu-io");
    // Two chunks of 64 MiB: a server's log may hold 2 x 2 + 2 segments of 32 MiB before it
    // names the replicas that pin its oldest one.
    let mut c = LocalCluster::start("parallel", "128M");
    let uri = c.uri();
    qemu_io_ok(&uri, &eight_blocks("write", 0x40));
    // A trickle into chunk 0 (away from the blocks above) keeps it from going idle, which would
    // checkpoint it (`an_idle_chunk_checkpoints_what_it_applied`): 20 writes a second stay far
    // below both checkpoint thresholds, so its entries pin the oldest segment.
    let mut trickle = Command::new("fio")
        .args(["--name=trickle", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--rate_iops=20"])
        .args(["--offset=1m", "--size=8m", "--time_based", "--runtime=600"])
        .arg(format!("--uri={uri}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("fio");
    // 384 MiB of 128 KiB writes into chunk 1: twelve segments' worth of log on every server.
    let mut fio = Command::new("fio");
    fio.args(["--name=busy", "--ioengine=nbd", "--rw=write", "--bs=128k", "--iodepth=16"])
        .args(["--offset=64m", "--size=64m", "--loops=6", "--output-format=json"])
        .arg(format!("--uri={uri}"));
    run_ok(&mut fio);
    let _ = trickle.kill();
    let _ = trickle.wait();
    for server in 1..=3 {
        let n = segments(&c, server);
        assert!(n <= 8, "server {server} keeps {n} segments of 32 MiB; cluster log:\n{}", c.log_tail());
    }
    assert!(
        c.log_text().contains("rewriting the replica's log"),
        "no replica rewrote its log; cluster log:\n{}",
        c.log_tail()
    );
    // `/metrics` says so too (each process renders it every 500 ms).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let texts: Vec<String> = (1..=3)
            .filter_map(|s| chunkserver::profile::fetch(&format!("127.0.0.1:{}", c.metrics_port() as u32 + s)).ok())
            .collect();
        let rewrites: f64 = texts.iter().filter_map(|t| counter(t, "parallelraft_wal_rewrites_total")).sum();
        let segments: Vec<f64> = texts.iter().filter_map(|t| counter(t, "parallelraft_wal_segments")).collect();
        if rewrites > 0.0 && segments.len() == 3 {
            assert!(segments.iter().all(|n| (1.0..=8.0).contains(n)), "segments per server: {segments:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no rewrite in /metrics ({rewrites}, {segments:?})");
        std::thread::sleep(Duration::from_millis(200));
    }
    restart_and_read_back(&mut c, 0x40);
}

/// A chunk whose writes stop checkpoints what it applied once it has been idle for half a second
/// of ticks, far below the entry and byte thresholds: its few entries keep no segment of the
/// server's log (and need no rewrite at its head).
#[test]
fn an_idle_chunk_checkpoints_what_it_applied() {
    let _g = serial();
    require_tool("qemu-io");
    let mut c = LocalCluster::start("parallel", "128M");
    qemu_io_ok(&c.uri(), &eight_blocks("write", 0x60));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let figures: Vec<(u64, u64)> =
            (1..=3).map(|s| (status_figure(&c, 0, s, "applied"), status_figure(&c, 0, s, "checkpoint"))).collect();
        // Each server's `status` file says so too (rewritten every 200 ms).
        let files: Vec<(u64, u64)> = (1..=3)
            .filter_map(|s| c.chunk_status(s).into_iter().find(|r| r.chunk == 0))
            .map(|r| (r.applied, r.checkpoint))
            .collect();
        let done = |v: &[(u64, u64)]| {
            v.len() == 3 && v.iter().all(|(applied, checkpoint)| *applied >= 8 && checkpoint == applied)
        };
        if done(&figures) && done(&files) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "chunk 0 (applied, checkpoint) per server: {figures:?}; in the status files: {files:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    restart_and_read_back(&mut c, 0x60);
}
