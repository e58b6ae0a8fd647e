//! Blocks that fail their checksum in a running cluster are repaired from a peer: a bit is
//! flipped in the data file of each of the three replicas of chunk 0 (a different block on
//! each), then the leader reads its bad block and the followers apply 512-byte writes into
//! theirs. Every read returns the written data, no replica stops, and afterwards the three
//! data files agree byte for byte.

mod support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::*;

fn blocks_file(c: &LocalCluster, server: u32) -> PathBuf {
    c.data().join(format!("server-{server}")).join("chunk-00000000").join("blocks").join("blocks.dat")
}

/// Flips one bit of the byte at `offset` of a replica's data file, behind the server's back.
fn flip_bit(path: &PathBuf, offset: u64) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut byte).unwrap();
    byte[0] ^= 0x08;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&byte).unwrap();
    f.sync_all().unwrap();
}

fn read_range(path: &PathBuf, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// Waits until every replica of chunk 0 has applied the same index, none awaits a repair,
/// each repaired at least `min_repaired` blocks, and none stopped. (`status` is rewritten
/// every 200 ms, so a condition that was true before may still show for a moment.)
fn wait_settled(c: &LocalCluster, min_repaired: u64) -> Vec<ChunkStatus> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows: Vec<ChunkStatus> =
            (1..=3).filter_map(|s| c.chunk_status(s).into_iter().find(|r| r.chunk == 0)).collect();
        for r in &rows {
            assert_ne!(r.role, "Failed", "a replica stopped:\n{}", c.log_tail());
        }
        let settled = rows.len() == 3
            && rows.iter().all(|r| {
                r.applied == rows[0].applied && r.applied > 0 && r.bad_blocks == 0 && r.repaired >= min_repaired
            });
        if settled {
            return rows;
        }
        assert!(Instant::now() < deadline, "chunk 0 did not settle: {rows:?}\n{}", c.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_blocks_are_repaired_from_peers_and_never_served() {
    let _g = serial();
    require_tool("qemu-io");
    let mut c = LocalCluster::start("parallel", "128M");
    let uri = c.uri();
    run_ok(&mut qemu_io(&uri, &["write -P 0xa1 0 1M"]));
    wait_settled(&c, 0);
    let leader = c.leader_of(0).expect("leader");
    let followers: Vec<u32> = (1..=3).filter(|s| *s != leader).collect();
    const B: u64 = 4096;
    // A different bad block on each replica.
    flip_bit(&blocks_file(&c, leader), 10 * B + 100);
    flip_bit(&blocks_file(&c, followers[0]), 20 * B + 7);
    flip_bit(&blocks_file(&c, followers[1]), 30 * B + 4000);

    // The leader serves the read only after repairing block 10 from a follower.
    let out = run_ok(&mut qemu_io(&uri, &["read -P 0xa1 0 1M"]));
    assert!(!out.contains("verification failed"), "{out}");
    // 512-byte writes into the followers' bad blocks: their read-modify-write waits for a
    // repair from a peer instead of stopping the replica or sealing bad bytes.
    run_ok(&mut qemu_io(&uri, &["write -P 0xc3 81920 512", "write -P 0xc4 123392 512"]));
    // Each replica repaired its own bad block.
    wait_settled(&c, 1);
    // The replicas agree byte for byte over the written range.
    let images: Vec<Vec<u8>> = (1..=3).map(|s| read_range(&blocks_file(&c, s), 0, 1 << 20)).collect();
    assert!(images[0] == images[1] && images[1] == images[2], "replicas differ after repair");

    // Any replica now serves the right data: make a former follower the leader.
    c.kill(leader);
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.leader_of(0).is_none_or(|l| l == leader) {
        assert!(Instant::now() < deadline, "no new leader:\n{}", c.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run_ok(&mut qemu_io(
        &uri,
        &[
            "read -P 0xa1 0 81920",
            "read -P 0xc3 81920 512",
            "read -P 0xa1 82432 40960",
            "read -P 0xc4 123392 512",
            "read -P 0xa1 123904 924672",
        ],
    ));
    assert!(!out.contains("verification failed"), "{out}");
}

/// The offset in a server's WAL segments of the record of chunk 0's `index`.
fn wal_record(c: &LocalCluster, server: u32, index: u64) -> Option<(PathBuf, u64)> {
    let dir = c.data().join(format!("server-{server}")).join("wal");
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if !path.file_name().unwrap().to_string_lossy().starts_with("wal-") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for at in (0..bytes.len().saturating_sub(88)).step_by(4096) {
            let magic = &bytes[at..at + 4] == b"PRWL";
            let field = |o: usize| u64::from_le_bytes(bytes[at + o..at + o + 8].try_into().unwrap());
            if magic && field(40) == 0 && field(48) == index {
                return Some((path, at as u64));
            }
        }
    }
    None
}

#[test]
fn a_wal_record_damaged_mid_log_is_fetched_again_from_peers() {
    let _g = serial();
    require_tool("qemu-io");
    let mut c = LocalCluster::start("parallel", "128M");
    let uri = c.uri();
    // 48 small writes: 48 WAL records past the leader's first no-op.
    let script: Vec<String> = (0..48).map(|k| format!("write -P {} {} 4k", 0x20 + k, k * 8192)).collect();
    let script: Vec<&str> = script.iter().map(String::as_str).collect();
    run_ok(&mut qemu_io(&uri, &script));
    let before = wait_settled(&c, 0)[0].applied;
    let victim = c.leader_of(0).expect("leader");
    c.stop();
    // Damage the payload of a record in the middle of the victim's log.
    let (path, at) = wal_record(&c, victim, 20).expect("record of index 20 in the WAL");
    flip_bit(&path, at + 88 + 64);
    c.restart_all();
    // The victim recovers with a hole at 20 that the protocol fills from its peers: its
    // applied watermark can only pass 20 once it holds the entry again.
    let rows = wait_settled(&c, 0);
    assert!(rows[0].applied >= before, "applied {} after restart, {before} before", rows[0].applied);
    let log = std::fs::read_dir(c.data())
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .collect::<String>();
    assert!(log.contains("WAL record failed its checksum"), "the damage was not reported");
    let script: Vec<String> = (0..48).map(|k| format!("read -P {} {} 4k", 0x20 + k, k * 8192)).collect();
    let script: Vec<&str> = script.iter().map(String::as_str).collect();
    let out = run_ok(&mut qemu_io(&uri, &script));
    assert!(!out.contains("verification failed"), "{out}");
    let images: Vec<Vec<u8>> = (1..=3).map(|s| read_range(&blocks_file(&c, s), 0, 48 * 8192)).collect();
    assert!(images[0] == images[1] && images[1] == images[2], "replicas differ");
}
