//! `/metrics` of a running local cluster and `chunkserver profile`: after real NBD writes and
//! reads, the frontend and the leader report every stage of the path, with counts that match
//! the I/O done.

mod support;

use std::process::Command;

use chunkserver::metrics::parse_stages;
use chunkserver::profile::fetch;
use support::*;

#[test]
fn metrics_report_each_stage_and_profile_draws_them() {
    let _g = serial();
    require_tool("qemu-io");
    let c = LocalCluster::start("parallel", "128M");
    // 16 writes of 4 KiB and 8 reads, all in chunk 0.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for k in 0..16 {
        cmd.arg("-c").arg(format!("write -P 7 {} 4k", k * 4096));
    }
    for k in 0..8 {
        cmd.arg("-c").arg(format!("read -P 7 {} 4k", k * 4096));
    }
    run_ok(cmd.arg(c.uri()));
    let leader = c.leader_of(0).expect("leader");
    let frontend_addr = format!("127.0.0.1:{}", c.metrics_port());
    let leader_addr = format!("127.0.0.1:{}", c.metrics_port() as u32 + leader);
    // A follower times its own WAL writes of the leader's entries.
    let follower = (1..=3).find(|s| *s != leader).unwrap();
    let follower_addr = format!("127.0.0.1:{}", c.metrics_port() as u32 + follower);
    // Rendered every 500 ms: wait for the text to include the I/O.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (front, lead) = loop {
        let front = fetch(&frontend_addr).unwrap();
        let lead = fetch(&leader_addr).unwrap();
        let follower_text = fetch(&follower_addr).unwrap();
        // Each process renders on its own clock: wait until all three texts include the I/O
        // (the follower's, at least one WAL write of the leader's entries).
        let done = counter(&lead, "parallelraft_writes_total").unwrap_or(0.0) >= 16.0
            && counter(&lead, "parallelraft_reads_total").unwrap_or(0.0) >= 8.0
            && parse_stages(&front).get("nbd_read").is_some_and(|s| s.3 >= 8)
            && parse_stages(&follower_text).get("follower_durable").is_some_and(|s| s.3 > 0);
        if done {
            break (front, lead);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never showed the I/O:\n{front}\n{lead}\nfollower {follower}:\n{follower_text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let f = parse_stages(&front);
    assert_eq!(f["nbd_write"].3, 16, "{front}");
    assert!(f["route"].3 >= 24, "{front}");
    assert!(f["nbd_write"].0 > 0.0 && f["nbd_write"].1 >= f["nbd_write"].0);
    let l = parse_stages(&lead);
    for stage in [
        "queue",
        "leader_durable",
        "replicate_send",
        "ack_received",
        "commit_wait",
        "apply",
        "leader_write",
        "leader_read",
        "wal_sync",
    ] {
        assert!(l.get(stage).is_some_and(|s| s.3 > 0), "leader lacks stage {stage}:\n{lead}");
    }
    assert_eq!(l["leader_write"].3, 16);
    // Each of the 16 entries is sent once and acknowledged once first.
    assert_eq!(l["replicate_send"].3, 16, "{lead}");
    assert_eq!(l["ack_received"].3, 16, "{lead}");
    assert_eq!(counter(&lead, "parallelraft_written_bytes_total"), Some(16.0 * 4096.0));
    // A healthy leader serves reads under its lease; a stalled clock may send a few through a
    // read-index round instead, but every read is one or the other.
    let leased = counter(&lead, "parallelraft_reads_leased_total").expect("reads_leased counter");
    let with_round = counter(&lead, "parallelraft_reads_with_round_total").expect("reads_with_round counter");
    assert!(leased >= 1.0, "no read was served under the lease:\n{lead}");
    assert!(leased + with_round >= 8.0, "{lead}");
    assert!(lead.contains("parallelraft_is_leader{chunk=\"0\"} 1"), "{lead}");
    // The profile command reads the same endpoints and draws them.
    let svg = tempfile::NamedTempFile::new().unwrap();
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_chunkserver"))
            .args(["profile", "--metrics", &format!("{frontend_addr},{leader_addr}"), "--svg"])
            .arg(svg.path()),
    );
    assert!(out.contains("nbd_write") && out.contains("leader_durable"), "{out}");
    let picture = std::fs::read_to_string(svg.path()).unwrap();
    assert!(picture.starts_with("<svg") && picture.contains("wal_sync"));
    // Anything but GET /metrics is refused.
    let mut s = std::net::TcpStream::connect(&frontend_addr).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /other HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}
