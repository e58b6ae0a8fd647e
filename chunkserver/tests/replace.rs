//! Membership change with real processes (`local --servers 4`): a SIGKILLed server's replicas
//! are moved to the others while a verifying fio job runs; a rebuild interrupted by a kill of
//! the new replica resumes where it was; a removed replica is deleted and its server can be
//! added back later. Every run ends with a scrub: three voters per chunk, blocks identical.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

const MIB: u64 = 1 << 20;

/// `fio` sequential 128 KiB writes over `[offset, offset + size)` MiB of the volume.
fn prefill(uri: &str, offset_mib: u64, size_mib: u64) {
    run_ok(
        std::process::Command::new("fio")
            .args(["--name=fill", "--ioengine=nbd", "--rw=write", "--bs=128k", "--iodepth=8"])
            .arg(format!("--offset={offset_mib}m"))
            .arg(format!("--size={size_mib}m"))
            .arg(format!("--uri={uri}")),
    );
}

/// Runs `admin scrub` and checks it found every chunk identical on three voters.
fn scrub_ok(c: &LocalCluster) -> String {
    let out = run_ok(&mut c.admin(&["scrub"]));
    let identical = out.lines().filter(|l| l.contains("blocks identical on voters")).count();
    assert_eq!(identical as u32, c.chunk_count(), "scrub:\n{out}");
    out
}

/// The "moved N replica(s) ... rebuilt at R MiB/s" line of a move command.
fn summary_line(stdout: &str) -> String {
    stdout.lines().find(|l| l.starts_with("moved ")).unwrap_or_else(|| panic!("no summary in {stdout:?}")).to_string()
}

#[test]
fn killed_server_is_replaced_online_under_a_verifying_fio_job() {
    let _g = serial();
    require_tool("fio");
    let mut c =
        LocalCluster::start_with("parallel", "256M", 4, &["--checkpoint-interval", "256", "--rebuild-rate", "32M"]);
    // Real data to rebuild, and logs pruned well past it: the new replicas need the image.
    prefill(&c.uri(), 0, 256);
    // Four connections, one region per chunk, every written block read back and checked.
    let fio = fio_verify(&c.uri(), 8, 4, 24, 64).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // Server 2 holds replicas of chunks 0, 1 and 3 (and leads chunk 1).
    let held: Vec<u32> = c.chunk_status(2).iter().filter(|s| s.voters.contains(&2)).map(|s| s.chunk).collect();
    assert_eq!(held, vec![0, 1, 3], "bootstrap placement of server 2");
    c.kill(2);
    let started = Instant::now();
    let out = run_ok(&mut c.admin(&["decommission", "--server", "2"]));
    let took = started.elapsed();
    let job = fio_finished(fio);
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(4 * 24 * MIB), "every written block verified");
    println!(
        "replace: {} in {:.1} s; fio during it: {:.0} write IOPS",
        summary_line(&out),
        took.as_secs_f64(),
        job["write"]["iops"].as_f64().unwrap_or(0.0)
    );
    assert!(out.contains("3 replica(s)"), "{out}");
    // Every chunk is back to three voters without server 2, on every live server's view
    // (followers apply the last change a moment after the leader).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let views: Vec<_> = [1, 3, 4].iter().flat_map(|s| c.chunk_status(*s)).collect();
        let settled = views.len() == 3 * c.chunk_count() as usize
            && views.iter().all(|s| s.voters.len() == 3 && !s.voters.contains(&2) && s.learners.is_empty());
        if settled {
            break;
        }
        assert!(Instant::now() < deadline, "groups did not settle on three voters without server 2: {views:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    scrub_ok(&c);
    // A new server joins the running cluster (listed as a spare; servers and the frontend read
    // the file again) and takes over every replica of server 1, which is alive: its old
    // replicas are deleted. It listens on TCP while the others use `local`'s unix sockets: one
    // cluster, both kinds of link.
    let config = std::fs::read_to_string(c.data().join("cluster.toml")).unwrap();
    assert_eq!(config.matches("addr = \"unix:@").count(), 4, "{config}");
    let spare_port = free_ports(1);
    let mut file = std::fs::OpenOptions::new().append(true).open(c.data().join("cluster.toml")).unwrap();
    use std::io::Write;
    writeln!(file, "\n[[server]]\nid = 5\naddr = \"127.0.0.1:{spare_port}\"\nspare = true").unwrap();
    drop(file);
    c.start_server(5, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<u32> = c.chunk_status(1).iter().map(|s| s.chunk).collect();
    let out = run_ok(&mut c.admin(&["replace", "--server", "1", "--with", "5"]));
    assert!(out.contains(&format!("moved {} replica(s)", before.len())), "{out}");
    for chunk in before {
        let dir = c.data().join("server-1").join(format!("chunk-{chunk:08}"));
        assert!(dir.join("retired").exists() && !dir.join("blocks").exists(), "chunk {chunk} left on server 1");
    }
    scrub_ok(&c);
    run_ok(&mut fio_read_verify(&c.uri()));
    c.stop();
}

/// Reads back and checks every block the verifying jobs of `fio_verify(uri, _, 4, 24, 64)`
/// wrote (fio's verify-only mode regenerates the same pattern).
fn fio_read_verify(uri: &str) -> std::process::Command {
    let mut cmd = fio_verify(uri, 8, 4, 24, 64);
    cmd.arg("--verify_only");
    cmd
}

#[test]
fn interrupted_rebuild_resumes_and_the_removed_replica_is_deleted_then_readded() {
    let _g = serial();
    require_tool("fio");
    let tuning = ["--checkpoint-interval", "256", "--rebuild-rate", "8M"];
    let mut c = LocalCluster::start_with("raft", "256M", 4, &tuning);
    // Chunk 0 (servers 1, 2, 3) full of data.
    prefill(&c.uri(), 0, 64);
    // Incremental: server 3 misses 8 MiB of writes, far more than the log keeps, so it is
    // caught up from the image, but only with the blocks written since its applied index.
    // (After a restart that index is its last checkpoint: wait for the one covering the fill,
    // 512 entries of 128 KiB, or the image would rightly carry the fill's second half too.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_figure(&c, 0, 3, "checkpoint") < 512 {
        assert!(Instant::now() < deadline, "server 3 did not checkpoint the fill:\n{}", c.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
    c.kill(3);
    run_ok(
        std::process::Command::new("fio")
            .args(["--name=miss", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=16"])
            .args(["--size=64m", "--io_size=8m", "--norandommap"])
            .arg(format!("--uri={}", c.uri())),
    );
    c.start_server(3, &tuning);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // A status poll can miss the leader for a moment (one server's reply is late while it
        // restarts or steps): that is "not caught up yet", not a failure, until the deadline.
        let leader = c.leader_of(0);
        let committed = leader.and_then(|l| c.chunk_status(l).iter().find(|s| s.chunk == 0).map(|s| s.committed));
        let caught_up = c.chunk_status(3).iter().find(|s| s.chunk == 0).map(|s| s.applied);
        if caught_up.is_some() && caught_up == committed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server 3 did not catch up (leader {leader:?} committed {committed:?}, server 3 applied {caught_up:?}):\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let incremental = status_figure(&c, 0, 3, "rebuilt");
    println!("incremental catch-up: {:.1} MiB of image for 8 MiB of missed writes", incremental as f64 / MIB as f64);
    assert!(incremental > 0 && incremental <= 12 * MIB, "not incremental: {incremental} bytes");
    let mover = c
        .admin(&["move", "--chunk", "0", "--from", "3", "--to", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // At 8 MiB/s the 64 MiB image takes 8 s: kill the new replica half-way (after at least one
    // saved progress record, every 16 MiB).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.chunk_status(4).iter().any(|s| s.chunk == 0) {
        assert!(Instant::now() < deadline, "server 4 never joined chunk 0:\n{}", c.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(4));
    c.kill(4);
    std::thread::sleep(Duration::from_millis(500));
    c.start_server(4, &tuning);
    let out = mover.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "move failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // Since its restart, server 4 received only what the first attempt had not saved.
    let after_restart = status_figure(&c, 0, 4, "rebuilt");
    println!(
        "resumed rebuild: {:.1} MiB received after the restart (image: 64 MiB)",
        after_restart as f64 / MIB as f64
    );
    assert!(after_restart > 0 && after_restart <= 56 * MIB, "the rebuild started over: {after_restart} bytes");
    // Server 3 (alive) was told to delete its replica: only the tombstone is left.
    let old = c.data().join("server-3").join("chunk-00000000");
    assert!(old.join("retired").exists() && old.join("hardstate").exists(), "tombstone of server 3");
    assert!(!old.join("blocks").exists(), "server 3's old blocks deleted");
    scrub_ok(&c);
    // Server 3 comes back into the group on top of its tombstone.
    let out = run_ok(&mut c.admin(&["move", "--chunk", "0", "--from", "4", "--to", "3"]));
    assert!(out.contains("moved 1 replica(s)"), "{out}");
    assert!(!old.join("retired").exists() && old.join("blocks").exists(), "server 3 holds chunk 0 again");
    // Server 3's write-ahead log may still hold records of its first replica of chunk 0 (a
    // segment goes once every chunk in it is covered or gone); the new replica wrote a reset
    // first, so a whole-cluster restart replays only the new one's, and the replicas agree.
    c.restart_all();
    scrub_ok(&c);
    // An impossible replacement is refused before anything changes.
    let refused = run(&mut c.admin(&["replace", "--server", "1", "--with", "2"]));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already holds chunk(s)"), "{refused:?}");
    scrub_ok(&c);
    c.stop();
}
