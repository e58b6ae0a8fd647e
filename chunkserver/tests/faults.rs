//! Fault tests with real processes: SIGKILL the leader during a verifying fio run (servers
//! linked by TCP), kill a follower for good, kill two servers (writes stall, then resume when
//! one returns), freeze the leader with SIGSTOP (a hung server, which no connection error
//! reveals) during a verifying fio run, and freeze a follower the same way.

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
    let new_leader = new_leader_of(&c, 0, leader, Duration::from_secs(20));
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

/// Waits (up to `limit`) for a server other than `old` to lead `chunk`, and names it.
fn new_leader_of(c: &LocalCluster, chunk: u32, old: u32, limit: Duration) -> u32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(l) = c.leader_of(chunk).filter(|l| *l != old) {
            return l;
        }
        assert!(Instant::now() < deadline, "no new leader for chunk {chunk}:\n{}", c.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to 90 s) for `fio_verify`'s two 32 MiB jobs to finish while the server `pid`
/// (`who`) is still stopped, every block written and verified.
fn verified_while_frozen(c: &LocalCluster, fio: std::process::Child, pid: i32, who: &str) {
    let Some(job) = fio_finished_within(fio, Duration::from_secs(90)) else {
        panic!("fio did not finish while {who} was frozen:\n{}", c.log_tail());
    };
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(2 * (32 << 20)));
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(2 * (32 << 20)), "every block verified");
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(state.split(") ").nth(1).is_some_and(|s| s.starts_with('T')), "the run waited for a thaw: {state}");
}

/// A leader that hangs instead of dying (SIGSTOP: its connections stay open, nothing is
/// answered, no connection error tells anyone). The frontend's attempts to it time out and go
/// to the other servers, the followers elect a new leader, and a verifying fio run finishes
/// while the old leader is still frozen. Thawed, the old leader steps down and the volume
/// keeps serving the data.
#[test]
fn leader_frozen_during_verifying_fio_run() {
    let _g = serial();
    require_tool("fio");
    require_tool("qemu-io");
    let c = LocalCluster::start("parallel", "128M");
    let leader = c.leader_of(0).expect("chunk 0 has a leader");
    let pid = c.pid_of(leader).expect("leader pid");
    // Two jobs of 32 MiB fill chunk 0 (64 MiB here); the freeze comes while they write.
    let fio = fio_verify(&c.uri(), 16, 2, 32, 32).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    signal(pid, libc::SIGSTOP);
    let thaw = Thaw(pid);
    // A frozen process still counts as alive; the new leader's higher term wins `leader_of`.
    let new_leader = new_leader_of(&c, 0, leader, Duration::from_secs(30));
    // Bounded, so a frontend that waits on the frozen server forever fails the test rather
    // than hanging it.
    verified_while_frozen(&c, fio, pid, "the old leader");
    // The frontend went around the frozen server: answers it never got were tried again.
    let front = chunkserver::profile::fetch(&format!("127.0.0.1:{}", c.metrics_port())).unwrap();
    assert!(counter(&front, "parallelraft_frontend_retries_total").unwrap_or(0.0) > 0.0, "{front}");
    // Writes were still coming when it froze: the new leader served some (fio writes only
    // chunk 0, which it leads only since the freeze).
    let new_addr = format!("127.0.0.1:{}", c.metrics_port() as u32 + new_leader);
    wait_for_counter(&new_addr, "parallelraft_writes_total", 1.0, Duration::from_secs(5));
    drop(thaw);
    // Thawed, it hears of the newer term and follows.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.chunk_status(leader).iter().any(|s| s.chunk == 0 && s.role == "Leader") {
        assert!(Instant::now() < deadline, "server {leader} still leads chunk 0:\n{}", c.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.leader_of(0), Some(new_leader), "{}", c.log_tail());
    let out = run_ok(&mut qemu_io(&c.uri(), &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]));
    assert!(!out.contains("verification failed"), "{out}");
}

/// A follower that hangs during a verifying fio run: the leader's flow control waits for a
/// follower only while it keeps up (heard from, its durable prefix moving), so the run finishes
/// on the two others while it is still frozen; a flow control that waited for it regardless
/// would hold every write once it lagged half a checkpoint. Thawed, it catches up.
#[test]
fn follower_frozen_during_verifying_fio_run() {
    let _g = serial();
    require_tool("fio");
    let c = LocalCluster::start("parallel", "128M");
    let leader = c.leader_of(0).expect("chunk 0 has a leader");
    let follower = (1..=3).find(|s| *s != leader).unwrap();
    let pid = c.pid_of(follower).expect("follower pid");
    // 2 x 32 MiB, far more than the 16 MiB a follower that keeps up may lag by.
    let fio = fio_verify(&c.uri(), 16, 2, 32, 32).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    signal(pid, libc::SIGSTOP);
    let thaw = Thaw(pid);
    verified_while_frozen(&c, fio, pid, "a follower");
    drop(thaw);
    // Thawed, it catches up (from the log or the block image) to what the leader committed.
    let target = c.chunk_status(leader).iter().find(|s| s.chunk == 0).map(|s| s.committed).unwrap();
    c.wait_applied(follower, 0, target, Instant::now() + Duration::from_secs(60));
}
