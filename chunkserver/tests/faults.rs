//! Fault tests with real processes: SIGKILL the leader during a verifying fio run (servers
//! linked by TCP), kill a follower for good, kill two servers (writes stall, then resume when
//! one returns).

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Over TCP links (`--transport tcp`); the other real-process tests run on `local`'s default
/// unix sockets.
#[test]
fn leader_kill_during_verifying_fio_run() {
    let _g = serial();
    require_tool("fio");
    let mut c = LocalCluster::start_with("parallel", "128M", 3, &["--transport", "tcp"]);
    let config = std::fs::read_to_string(c.data().join("cluster.toml")).unwrap();
    assert!(config.contains(&format!("addr = \"127.0.0.1:{}\"", c.peer_base)), "TCP addresses:\n{config}");
    let leader = c.leader_of(0).expect("chunk 0 has a leader");
    let fio = fio_verify(&c.uri(), 16, 2, 24, 32).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = Instant::now();
    c.kill(leader);
    // A new leader takes over chunk 0.
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_leader = loop {
        if let Some(l) = c.leader_of(0).filter(|l| *l != leader) {
            break l;
        }
        assert!(Instant::now() < deadline, "no new leader for chunk 0:\n{}", c.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    };
    let election = killed_at.elapsed();
    let job = fio_finished(fio);
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(2 * (24 << 20)));
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(2 * (24 << 20)), "every block verified");
    let stall_ms = job["write"]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6;
    println!(
        "leader kill: server {leader} killed, server {new_leader} leads chunk 0 after {:.0} ms; \
         longest write during the run: {stall_ms:.0} ms",
        election.as_secs_f64() * 1e3
    );
    // The killed server comes back and rejoins.
    c.restart(leader);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.is_alive(leader) || c.leader_of(0).is_none() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x42 0 64k", "-c", "read -P 0x42 0 64k"])
            .arg(c.uri()),
    );
}

#[test]
fn one_follower_down_io_continues_two_down_writes_stall_then_resume() {
    let _g = serial();
    require_tool("qemu-io");
    let mut c = LocalCluster::start("parallel", "128M");
    let leader = c.leader_of(0).expect("leader");
    let followers: Vec<u32> = (1..=3).filter(|s| *s != leader).collect();
    c.kill(followers[0]);
    // One follower down for good: writes and reads go on.
    run_ok(&mut qemu_io(&c.uri(), &["write -P 0x11 0 1M", "read -P 0x11 0 1M", "write -P 0x12 70M 256k"]));
    run_ok(&mut qemu_io(&c.uri(), &["read -P 0x12 70M 256k"]));
    // Two down: a single copy must not acknowledge anything.
    c.kill(followers[1]);
    let mut writer = qemu_io(&c.uri(), &["write -P 0x13 4096 8k"]).stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(writer.try_wait().unwrap().is_none(), "a write completed with only one replica up");
    // One returns: the stalled write completes.
    c.restart(followers[1]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = writer.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "write did not resume:\n{}", c.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    let out =
        run_ok(&mut qemu_io(&c.uri(), &["read -P 0x13 4096 8k", "read -P 0x11 0 4096", "read -P 0x11 12288 4096"]));
    assert!(!out.contains("verification failed"), "{out}");
}
