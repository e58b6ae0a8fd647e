//! Write-ahead log: round trips on every engine, crash-state recovery over a recorded trace,
//! corruption detection, and fail-stop on a failed sync.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use chunkserver::storage::io::{CrashEngine, CrashPolicy, IoEngine};
use chunkserver::storage::wal::{Wal, WalOptions, WalRecord};
use chunkserver::storage::StorageError;
use common::{entry, replay_record};
use parallelraft::rng::Rng;
use parallelraft::{Entry, Index};

fn small() -> WalOptions {
    // Tiny segments, so rotation and multi-segment batches happen constantly.
    WalOptions { segment_bytes: 64 * 1024, direct: true }
}

#[test]
fn append_and_recover_on_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    for (name, engine) in common::engines() {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let (mut wal, recovery) = Wal::open(engine, &sub, 7, small()).unwrap();
        assert!(recovery.entries.is_empty());
        for batch in 0..20u64 {
            let records: Vec<WalRecord> = (0..5).map(|k| WalRecord::Entry(entry(batch * 5 + k + 1, 1))).collect();
            wal.append(&records).unwrap();
        }
        wal.append(&[WalRecord::Truncate { after: Index(90) }, WalRecord::Entry(entry(91, 2))]).unwrap();
        assert!(wal.segment_count() > 1, "{name}: tiny segments should rotate");
        let engine = match name {
            // The crash engine keeps its disk in memory: reopen through a clone of its handle.
            "crash-sim" => continue,
            _ => chunkserver::storage::io::open_engine(name.parse().unwrap()).unwrap(),
        };
        drop(wal);
        let (_wal, recovery) = Wal::open(engine, &sub, 7, small()).unwrap();
        assert!(!recovery.torn_tail && recovery.corruptions.is_empty(), "{name}: clean log");
        assert_eq!(recovery.entries.len(), 91, "{name}");
        assert_eq!(recovery.entries[89], entry(90, 1));
        assert_eq!(recovery.entries[90], entry(91, 2), "{name}: truncation then rewrite");
    }
}

#[test]
fn prune_drops_segments_under_the_checkpoint() {
    let engine = CrashEngine::new();
    let dir = Path::new("/wal");
    let (mut wal, _) = Wal::open(Box::new(engine.clone()), dir, 1, small()).unwrap();
    for i in 1..=60 {
        wal.append(&[WalRecord::Entry(entry(i, 1))]).unwrap();
    }
    let before = wal.segment_count();
    let removed = wal.prune(Index(40)).unwrap();
    assert!(removed > 0 && wal.segment_count() == before - removed);
    drop(wal);
    let (_, recovery) =
        Wal::open(Box::new(engine.crash(CrashPolicy::DropUnsynced, &mut Rng::new(1))), dir, 1, small()).unwrap();
    assert!(recovery.entries.iter().all(|e| e.index.0 <= 60));
    assert!(recovery.entries.iter().any(|e| e.index.0 == 60), "entries above the checkpoint survive pruning");
    let first = recovery.entries.first().unwrap().index.0;
    assert!(first <= 41, "no entry above the checkpoint may be pruned (first kept {first})");
}

#[test]
fn a_batch_whose_head_segment_was_pruned_is_not_corruption() {
    // Found running the server: batches of 5 records straddle segment boundaries; after the
    // older segment is pruned, the surviving tail of such a batch was reported as corruption.
    let engine = CrashEngine::new();
    let dir = Path::new("/wal");
    let (mut wal, _) = Wal::open(Box::new(engine.clone()), dir, 1, small()).unwrap();
    for batch in 0..30u64 {
        let records: Vec<WalRecord> = (0..5).map(|k| WalRecord::Entry(entry(batch * 5 + k + 1, 1))).collect();
        wal.append(&records).unwrap();
    }
    let mut straddles = false;
    for through in (5..150).step_by(5) {
        wal.prune(Index(through)).unwrap();
        let reopened = Box::new(engine.crash(CrashPolicy::DropUnsynced, &mut Rng::new(through)));
        let (_, recovery) = Wal::open(reopened, dir, 1, small()).unwrap();
        assert!(recovery.corruptions.is_empty(), "pruned through {through}: {:?}", recovery.corruptions);
        assert!(!recovery.torn_tail);
        assert_eq!(recovery.entries.last().unwrap().index, Index(150));
        // Some prune points leave a batch cut at the start of the first segment.
        let first = recovery.entries.first().unwrap().index.0;
        straddles |= (first - 1) % 5 != 0;
    }
    assert!(straddles, "the workload must produce a batch cut by pruning");
}

/// Appends single entries from `next` until `prepare_spare` starts (the segment is half full);
/// returns the next index.
fn fill_until_spare_starts(wal: &mut Wal, mut next: u64) -> u64 {
    loop {
        wal.append(&[WalRecord::Entry(entry(next, 1))]).unwrap();
        next += 1;
        if wal.prepare_spare().unwrap() {
            return next;
        }
        assert!(next < 1000, "the spare never started");
    }
}

/// A crash-simulated log of chunk 1 in `/wal`, and where its spare segment is prepared.
fn spare_test_log() -> (CrashEngine, &'static Path, std::path::PathBuf, Wal) {
    let engine = CrashEngine::new();
    let dir = Path::new("/wal");
    let spare = dir.join(format!("wal-{:016x}-spare.tmp", 1));
    let (wal, _) = Wal::open(Box::new(engine.clone()), dir, 1, small()).unwrap();
    (engine, dir, spare, wal)
}

/// Where segment `number` of log `log_id` waits once pruned and kept as a spare.
fn recycled(dir: &Path, log_id: u64, number: u64) -> std::path::PathBuf {
    dir.join(format!("wal-{log_id:016x}-spare-{number:010}.tmp"))
}

/// Appends single entries of term 1 from `*next` until the log holds `segments` segments.
fn append_until_segments(wal: &mut Wal, segments: usize, next: &mut u64) {
    while wal.segment_count() < segments {
        wal.append(&[WalRecord::Entry(entry(*next, 1))]).unwrap();
        *next += 1;
    }
}

/// Appends single entries from `*next` until the log rotates to a new segment; returns the
/// syncs the rotating append issued.
fn append_until_rotation(wal: &mut Wal, engine: &CrashEngine, next: &mut u64) -> u64 {
    let segments = wal.segment_count();
    loop {
        let syncs = engine.sync_count();
        wal.append(&[WalRecord::Entry(entry(*next, 1))]).unwrap();
        *next += 1;
        if wal.segment_count() > segments {
            return engine.sync_count() - syncs;
        }
    }
}

#[test]
fn the_next_segment_is_zeroed_ahead_and_rotation_uses_it() {
    let (engine, dir, spare, mut wal) = spare_test_log();
    // A fresh segment wants no spare yet: idle logs keep none.
    wal.append(&[WalRecord::Entry(entry(1, 1))]).unwrap();
    assert!(!wal.prepare_spare().unwrap() && !engine.exists(&spare));
    let mut next = fill_until_spare_starts(&mut wal, 2);
    assert!(engine.exists(&spare));
    while wal.prepare_spare().unwrap() {}
    assert!(wal.spare_ready());
    // Rotating onto the ready spare syncs once (the batch), not twice (zero fill + batch), and
    // renames it into the log.
    assert_eq!(append_until_rotation(&mut wal, &engine, &mut next), 1, "rotation onto a ready spare zeroed again");
    assert!(!engine.exists(&spare) && !wal.spare_ready());
    // Without a spare, rotation zeroes inline: one more sync.
    assert_eq!(append_until_rotation(&mut wal, &engine, &mut next), 2);
    drop(wal);
    let (_, recovery) =
        Wal::open(Box::new(engine.crash(CrashPolicy::DropUnsynced, &mut Rng::new(1))), dir, 1, small()).unwrap();
    assert!(recovery.corruptions.is_empty() && !recovery.torn_tail);
    assert_eq!(recovery.entries.iter().map(|e| e.index.0).collect::<Vec<_>>(), (1..next).collect::<Vec<_>>());
}

#[test]
fn a_half_prepared_spare_is_finished_at_rotation_or_removed_at_open() {
    let (engine, dir, spare, mut wal) = spare_test_log();
    let mut next = fill_until_spare_starts(&mut wal, 1);
    // One more step zeroes the whole (64 KiB) spare; its sync is still to do.
    assert!(wal.prepare_spare().unwrap());
    assert!(engine.exists(&spare) && !wal.spare_ready());
    // Rotation finishes the spare inline: its sync, then the batch's.
    assert_eq!(append_until_rotation(&mut wal, &engine, &mut next), 2);
    assert!(!engine.exists(&spare));
    // A spare left behind by a crash is no part of the log and is removed at open.
    next = fill_until_spare_starts(&mut wal, next);
    assert!(engine.exists(&spare));
    drop(wal);
    let crashed = engine.crash(CrashPolicy::DropUnsynced, &mut Rng::new(2));
    let (mut wal, recovery) = Wal::open(Box::new(crashed.clone()), dir, 1, small()).unwrap();
    assert!(!crashed.exists(&spare), "open left the stale spare");
    assert!(recovery.corruptions.is_empty() && !recovery.torn_tail);
    assert_eq!(recovery.entries.len() as u64, next - 1);
    // A failed step removes the spare and is not retried before the next rotation.
    while !wal.prepare_spare().unwrap() {
        wal.append(&[WalRecord::Entry(entry(next, 1))]).unwrap();
        next += 1;
    }
    while !wal.spare_ready() {
        crashed.fail_next_sync();
        match wal.prepare_spare() {
            Err(StorageError::Fatal(_)) => break,
            Ok(true) => {
                // A write step: the sync failure is still armed for the sync step.
                continue;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(!wal.spare_ready() && !crashed.exists(&spare));
    assert!(!wal.prepare_spare().unwrap(), "a failed spare was retried before rotation");
}

/// The log state after each batch of a workload: appends with rising indices, and sometimes a
/// truncation followed by rewrites at a higher term (what a merge does).
fn workload(rng: &mut Rng) -> Vec<Vec<WalRecord>> {
    let mut batches = Vec::new();
    let mut next = 1u64;
    let mut term = 1u64;
    for _ in 0..30 {
        let mut batch = Vec::new();
        if next > 5 && rng.chance(0.15) {
            term += 1;
            next -= rng.range(1, 4);
            batch.push(WalRecord::Truncate { after: Index(next - 1) });
        }
        for _ in 0..rng.range(1, 6) {
            batch.push(WalRecord::Entry(entry(next, term)));
            next += 1;
        }
        batches.push(batch);
    }
    batches
}

fn replay(batches: &[Vec<WalRecord>]) -> Vec<Entry> {
    let mut log: BTreeMap<Index, Entry> = BTreeMap::new();
    for b in batches {
        for r in b {
            replay_record(&mut log, r);
        }
    }
    log.into_values().collect()
}

#[test]
fn crash_at_every_point_keeps_every_acknowledged_batch() {
    let dir = Path::new("/wal");
    let mut checked = 0;
    for seed in 0..4 {
        let mut rng = Rng::new(seed);
        let batches = workload(&mut rng);
        let engine = CrashEngine::new();
        let (mut wal, _) = Wal::open(Box::new(engine.clone()), dir, 3, small()).unwrap();
        // The trace position at which each batch was acknowledged (append returned).
        let mut acked_at = Vec::new();
        for b in &batches {
            wal.append(b).unwrap();
            acked_at.push(engine.trace_len());
            // Half the seeds also prepare spare segments between batches (as the WAL thread
            // does when idle), so crashes land in the middle of that too.
            if seed % 2 == 1 {
                for _ in 0..rng.range(0, 3) {
                    wal.prepare_spare().unwrap();
                }
            }
        }
        let total = engine.trace_len();
        let policies = [
            CrashPolicy::DropUnsynced,
            CrashPolicy::RandomSubsetReordered,
            CrashPolicy::TearLast { bytes: 512 },
            CrashPolicy::TearLast { bytes: 4096 },
        ];
        for point in 0..=total {
            for policy in policies {
                let crashed = engine.crash_at(point, policy, &mut rng);
                let recovered = Wal::open(Box::new(crashed.clone()), dir, 3, small());
                let (mut wal2, recovery) =
                    recovered.unwrap_or_else(|e| panic!("seed {seed} point {point} {policy:?}: recovery failed: {e}"));
                assert!(
                    recovery.corruptions.is_empty(),
                    "seed {seed} point {point} {policy:?}: a crash was reported as corruption: {:?}",
                    recovery.corruptions
                );
                // Recovered state = state after some batch j, with every batch acknowledged
                // before the crash included (j >= acked) and nothing not yet issued.
                let acked = acked_at.iter().filter(|a| **a <= point).count();
                let issued = acked_at.iter().filter(|a| **a <= point).count() + usize::from(point < total);
                let ok = (acked..=issued.min(batches.len())).any(|j| replay(&batches[..j]) == recovery.entries);
                assert!(
                    ok,
                    "seed {seed} point {point} {policy:?}: recovered {} entries, not the state after any batch in {acked}..={issued}",
                    recovery.entries.len()
                );
                // The recovered log accepts new batches and they survive another recovery.
                wal2.append(&[WalRecord::Entry(entry(10_000, 99))]).unwrap();
                drop(wal2);
                let (_, again) =
                    Wal::open(Box::new(crashed.crash(CrashPolicy::DropUnsynced, &mut rng)), dir, 3, small()).unwrap();
                // Exactly the recovered log plus the new entry: records of a torn batch that
                // lie beyond the new write must not come back.
                let mut expected = recovery.entries.clone();
                expected.push(entry(10_000, 99));
                assert_eq!(
                    again.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
                    expected.iter().map(|e| e.index).collect::<Vec<_>>(),
                    "seed {seed} point {point} {policy:?}: append after recovery"
                );
                assert_eq!(again.entries, expected, "seed {seed} point {point} {policy:?}");
                checked += 1;
            }
        }
    }
    assert!(checked > 500, "only {checked} crash states checked");
}

#[test]
fn corruption_in_the_middle_is_reported_and_the_entry_marked_missing() {
    let engine = CrashEngine::new();
    let dir = Path::new("/wal");
    let (mut wal, _) =
        Wal::open(Box::new(engine.clone()), dir, 5, WalOptions { segment_bytes: 1 << 20, direct: true }).unwrap();
    for i in 1..=10 {
        wal.append(&[WalRecord::Entry(entry(i, 1))]).unwrap();
    }
    drop(wal);
    // Each record is 8 KiB here (4 KiB payload + header); flip a payload bit of record 4.
    let segment = Path::new("/wal/wal-0000000000000005-0000000001.log");
    engine.flip_bit(segment, 3 * 8192 + 200, 3);
    let (_, recovery) =
        Wal::open(Box::new(engine.clone()), dir, 5, WalOptions { segment_bytes: 1 << 20, direct: true }).unwrap();
    assert_eq!(recovery.corruptions.len(), 1, "{:?}", recovery.corruptions);
    assert_eq!(recovery.corruptions[0].index_hint, Some(Index(4)));
    assert!(!recovery.torn_tail);
    let held: Vec<u64> = recovery.entries.iter().map(|e| e.index.0).collect();
    assert_eq!(held, vec![1, 2, 3, 5, 6, 7, 8, 9, 10], "entry 4 missing, everything else kept");
}

#[test]
fn torn_last_record_is_discarded_not_reported() {
    let engine = CrashEngine::new();
    let dir = Path::new("/wal");
    let opts = WalOptions { segment_bytes: 1 << 20, direct: true };
    let (mut wal, _) = Wal::open(Box::new(engine.clone()), dir, 5, opts).unwrap();
    for i in 1..=3 {
        wal.append(&[WalRecord::Entry(entry(i, 1))]).unwrap();
    }
    drop(wal);
    let segment = Path::new("/wal/wal-0000000000000005-0000000001.log");
    engine.flip_bit(segment, 2 * 8192 + 3000, 1);
    let (_, recovery) = Wal::open(Box::new(engine), dir, 5, opts).unwrap();
    assert!(
        recovery.torn_tail && recovery.corruptions.is_empty(),
        "{:?} {:?}",
        recovery.torn_tail,
        recovery.corruptions
    );
    assert_eq!(recovery.entries.len(), 2);
}

#[test]
fn failed_sync_is_fatal() {
    let engine = CrashEngine::new();
    let (mut wal, _) = Wal::open(Box::new(engine.clone()), Path::new("/wal"), 1, small()).unwrap();
    wal.append(&[WalRecord::Entry(entry(1, 1))]).unwrap();
    engine.fail_next_sync();
    match wal.append(&[WalRecord::Entry(entry(2, 1))]) {
        Err(StorageError::Fatal(e)) => assert_eq!(e.raw_os_error(), Some(libc_eio())),
        other => panic!("expected a fatal error, got {other:?}"),
    }
    // The log's state on disk is unknown now: a later batch would make recovery take the
    // failed one for lost synced data, so every later append fails too.
    let syncs = engine.sync_count();
    assert!(matches!(wal.append(&[WalRecord::Entry(entry(2, 1))]), Err(StorageError::Fatal(_))));
    assert_eq!(engine.sync_count(), syncs, "nothing was written after the failure");
}

fn libc_eio() -> i32 {
    5
}

#[allow(dead_code)]
fn assert_engine_is_send(_: &dyn IoEngine) {}

/// Bytes of one packed record holding `e` (header, encoded entry, 8-byte alignment).
fn packed_len(e: &Entry) -> usize {
    (88 + parallelraft::codec::encoded_len(e)).div_ceil(8) * 8
}

#[test]
fn records_of_a_batch_are_packed_and_a_damaged_one_hides_the_rest_of_its_write() {
    let engine = CrashEngine::new();
    let dir = Path::new("/wal");
    let opts = WalOptions { segment_bytes: 1 << 20, direct: true };
    let (mut wal, _) = Wal::open(Box::new(engine.clone()), dir, 5, opts).unwrap();
    let first: Vec<WalRecord> = (1..=5).map(|i| WalRecord::Entry(entry(i, 1))).collect();
    wal.append(&first).unwrap();
    wal.append(&(6..=10).map(|i| WalRecord::Entry(entry(i, 1))).collect::<Vec<_>>()).unwrap();
    drop(wal);
    let len = packed_len(&entry(1, 1));
    assert!(len < 4096 + 512, "a 4 KiB write packs into {len} bytes");
    // The second batch starts on the 4 KiB boundary after the first batch's five records:
    // its first record is found there.
    let second_at = (5 * len).div_ceil(4096) * 4096;
    let segment = Path::new("/wal/wal-0000000000000005-0000000001.log");
    let (_, clean) = Wal::open(Box::new(engine.clone()), dir, 5, opts).unwrap();
    assert_eq!(clean.entries.len(), 10);
    assert!(clean.corruptions.is_empty() && !clean.torn_tail);
    // Damage record 2 of the first batch: it and the records packed after it in that write
    // are lost (reported as corruption, since a later batch follows); record 1 and the whole
    // second batch are kept.
    engine.flip_bit(segment, (len + 200) as u64, 2);
    let (_, recovery) = Wal::open(Box::new(engine.clone()), dir, 5, opts).unwrap();
    assert_eq!(recovery.corruptions.len(), 1, "{:?}", recovery.corruptions);
    assert_eq!(recovery.corruptions[0].index_hint, Some(Index(2)));
    let held: Vec<u64> = recovery.entries.iter().map(|e| e.index.0).collect();
    assert_eq!(held, vec![1, 6, 7, 8, 9, 10], "second batch at offset {second_at}");
}

/// Bytes `from..to` of `path`, read through `engine`.
fn read_bytes(engine: &CrashEngine, path: &Path, from: usize, to: usize) -> Vec<u8> {
    use chunkserver::storage::io::{AlignedBuf, IoOp, OpenMode};
    let mut raw: Box<dyn IoEngine> = Box::new(engine.clone());
    let file = raw.open(path, OpenMode { create: false, direct: true }).unwrap();
    let (start, end) = (from / 4096 * 4096, to.div_ceil(4096) * 4096);
    let mut buf = AlignedBuf::zeroed(end - start);
    let results = raw.submit(&mut [IoOp::Read { file, offset: start as u64, buf: &mut buf }]);
    assert!(results.iter().all(|r| r.is_ok()));
    buf[from - start..to - start].to_vec()
}

#[test]
fn a_batch_writes_zeroes_between_and_after_its_records_whatever_the_batch_before_it_held() {
    // The log reuses one write buffer from batch to batch: a small batch after one of large
    // entries must not carry the earlier bytes in its padding.
    let engine = CrashEngine::new();
    let dir = Path::new("/wal");
    let opts = WalOptions { segment_bytes: 1 << 20, direct: true };
    let (mut wal, _) = Wal::open(Box::new(engine.clone()), dir, 5, opts).unwrap();
    let large = |index: u64| {
        let mut e = entry(index, 1);
        e.op = parallelraft::Op::Write { offset: 0, data: bytes::Bytes::from(vec![0xa5; 64 << 10]) };
        WalRecord::Entry(e)
    };
    wal.append(&(1..=4).map(large).collect::<Vec<_>>()).unwrap();
    let second: Vec<Entry> = (5..=7).map(|i| entry(i, 1)).collect();
    let encoded = parallelraft::codec::encoded_len(&second[0]);
    assert_ne!((88 + encoded) % 8, 0, "the test needs records with alignment padding");
    wal.append(&second.iter().cloned().map(WalRecord::Entry).collect::<Vec<_>>()).unwrap();
    drop(wal);
    let first_len: usize = (1..=4)
        .map(|i| match large(i) {
            WalRecord::Entry(e) => packed_len(&e),
            _ => unreachable!(),
        })
        .sum();
    let at = first_len.div_ceil(4096) * 4096;
    let segment = Path::new("/wal/wal-0000000000000005-0000000001.log");
    let len = packed_len(&second[0]);
    let end = at + 3 * len;
    let written = read_bytes(&engine, segment, at, end.div_ceil(4096) * 4096);
    for k in 0..3 {
        let padding = &written[k * len + 88 + encoded..(k + 1) * len];
        assert!(padding.iter().all(|b| *b == 0), "record {k}'s alignment padding: {padding:?}");
    }
    assert!(written[3 * len..].iter().all(|b| *b == 0), "the padding after the batch holds old bytes");
    let (_, recovery) = Wal::open(Box::new(engine.clone()), dir, 5, opts).unwrap();
    assert_eq!(recovery.entries.len(), 7);
    assert_eq!(recovery.entries[4..], second[..]);
}

/// A record as logs wrote them before packing: no flags, alone in whole 4 KiB units.
fn legacy_record(e: &Entry, chunk: u64, seq: u64, batch: u64, position: u32, batch_len: u32) -> Vec<u8> {
    unpacked_record(e, chunk, seq, batch, position, batch_len, 0)
}

/// An unpacked record (alone in whole 4 KiB units) carrying segment tag `tag` (0: untagged,
/// as before recycling).
fn unpacked_record(e: &Entry, chunk: u64, seq: u64, batch: u64, position: u32, batch_len: u32, tag: u16) -> Vec<u8> {
    let mut payload = bytes::BytesMut::new();
    parallelraft::codec::encode_entry(e, &mut payload);
    let mut out = vec![0u8; (88 + payload.len()).div_ceil(4096) * 4096];
    out[0..4].copy_from_slice(b"PRWL");
    out[8] = 1; // an entry
    out[10..12].copy_from_slice(&tag.to_le_bytes());
    out[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out[16..24].copy_from_slice(&seq.to_le_bytes());
    out[24..32].copy_from_slice(&batch.to_le_bytes());
    out[32..36].copy_from_slice(&position.to_le_bytes());
    out[36..40].copy_from_slice(&batch_len.to_le_bytes());
    out[40..48].copy_from_slice(&chunk.to_le_bytes());
    out[48..56].copy_from_slice(&e.index.0.to_le_bytes());
    out[56..64].copy_from_slice(&e.term.0.to_le_bytes());
    out[64..72].copy_from_slice(&e.ballot.0.to_le_bytes());
    out[88..88 + payload.len()].copy_from_slice(&payload);
    let crc = crc32fast::hash(&out[8..88 + payload.len()]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Writes `image` (whole 4 KiB units) as the first segment of chunk 5's log in `/wal`, durably.
fn write_first_segment(engine: &CrashEngine, opts: WalOptions, image: &[u8]) {
    write_segment(engine, opts, 5, 1, image);
}

/// Writes `image` (whole 4 KiB units) as segment `number` of log `log_id` in `/wal`, durably.
fn write_segment(engine: &CrashEngine, opts: WalOptions, log_id: u64, number: u64, image: &[u8]) {
    use chunkserver::storage::io::{AlignedBuf, IoOp, OpenMode};
    let mut raw: Box<dyn IoEngine> = Box::new(engine.clone());
    let path = Path::new("/wal").join(format!("wal-{log_id:016x}-{number:010}.log"));
    let file = raw.open(&path, OpenMode { create: true, direct: true }).unwrap();
    raw.allocate(file, opts.segment_bytes).unwrap();
    let mut buf = AlignedBuf::zeroed(image.len());
    buf.copy_from_slice(image);
    let results = raw.submit(&mut [IoOp::Write { file, offset: 0, buf: &buf }, IoOp::Sync { file }]);
    assert!(results.iter().all(|r| r.is_ok()));
}

#[test]
fn a_log_written_before_packing_recovers_and_takes_packed_batches() {
    let engine = CrashEngine::new();
    let opts = WalOptions { segment_bytes: 1 << 20, direct: true };
    // Batch 1: entries 1 and 2; batch 2: entry 3.
    let mut image = Vec::new();
    image.extend(legacy_record(&entry(1, 1), 5, 1, 1, 0, 2));
    image.extend(legacy_record(&entry(2, 1), 5, 2, 1, 1, 2));
    image.extend(legacy_record(&entry(3, 1), 5, 3, 2, 0, 1));
    write_first_segment(&engine, opts, &image);
    let (mut wal, recovery) = Wal::open(Box::new(engine.clone()), Path::new("/wal"), 5, opts).unwrap();
    assert!(recovery.corruptions.is_empty() && !recovery.torn_tail);
    assert_eq!(recovery.entries, vec![entry(1, 1), entry(2, 1), entry(3, 1)]);
    wal.append(&[WalRecord::Entry(entry(4, 1)), WalRecord::Entry(entry(5, 1))]).unwrap();
    drop(wal);
    let (_, again) = Wal::open(Box::new(engine), Path::new("/wal"), 5, opts).unwrap();
    assert!(again.corruptions.is_empty() && !again.torn_tail);
    assert_eq!(again.entries.iter().map(|e| e.index.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
}

#[test]
fn records_of_a_torn_batch_past_the_new_write_do_not_come_back() {
    let engine = CrashEngine::new();
    let opts = WalOptions { segment_bytes: 1 << 20, direct: true };
    // Batch 1 whole (entry 1); batch 2 torn: three of its four records reached the disk.
    // Unpacked records start on 4 KiB boundaries, so the recovery finds each of them.
    let mut image = legacy_record(&entry(1, 1), 5, 1, 1, 0, 1);
    for (k, i) in (2..=4).enumerate() {
        image.extend(legacy_record(&entry(i, 1), 5, 2 + k as u64, 2, k as u32, 4));
    }
    write_first_segment(&engine, opts, &image);
    let (mut wal, recovery) = Wal::open(Box::new(engine.clone()), Path::new("/wal"), 5, opts).unwrap();
    assert!(recovery.torn_tail && recovery.corruptions.is_empty());
    assert_eq!(recovery.entries, vec![entry(1, 1)], "the torn batch is dropped");
    // The new batch takes the torn batch's number and is shorter than it.
    wal.append(&[WalRecord::Entry(entry(20, 2))]).unwrap();
    drop(wal);
    let (_, again) = Wal::open(Box::new(engine), Path::new("/wal"), 5, opts).unwrap();
    assert!(again.corruptions.is_empty() && !again.torn_tail, "{:?}", again.corruptions);
    let held: Vec<u64> = again.entries.iter().map(|e| e.index.0).collect();
    assert_eq!(held, vec![1, 20], "no record of the torn batch came back");
    assert_eq!(again.entries, vec![entry(1, 1), entry(20, 2)]);
}

/// Appends batches of two entries of `term` from `*next` until the log rotates; returns the
/// syncs of the rotating append.
fn append_pairs_until_rotation(wal: &mut Wal, engine: &CrashEngine, next: &mut u64, term: u64) -> u64 {
    let segments = wal.segment_count();
    loop {
        let syncs = engine.sync_count();
        wal.append(&[WalRecord::Entry(entry(*next, term)), WalRecord::Entry(entry(*next + 1, term))]).unwrap();
        *next += 2;
        if wal.segment_count() > segments {
            return engine.sync_count() - syncs;
        }
    }
}

#[test]
fn pruned_segments_are_recycled_and_their_old_records_never_replay() {
    let (engine, dir, _spare, mut wal) = spare_test_log();
    // Single entries (8 KiB each with padding) at term 1, until four 64 KiB segments exist.
    let mut next = 1;
    append_until_segments(&mut wal, 4, &mut next);
    let before = wal.segment_count();
    // The first two segments hold entries 1..=16: both become spares, as they are, in order.
    assert_eq!(wal.prune(Index(16)).unwrap(), 2);
    assert_eq!(wal.segment_count(), before - 2);
    let (first, second) = (recycled(dir, 1, 1), recycled(dir, 1, 2));
    assert!(engine.exists(&first) && engine.exists(&second), "the pruned segments were not kept as spares");
    assert!(wal.spare_ready() && wal.spare_count() == 2);
    wal.check_invariants();
    // Rotating onto the first writes no zeroes: one sync, the batch's.
    assert_eq!(append_until_rotation(&mut wal, &engine, &mut next), 1, "a recycled spare was zeroed");
    assert!(!engine.exists(&first) && engine.exists(&second) && wal.spare_ready());
    let singles_end = next;
    // Then pairs at term 2: 12 KiB writes, the last ending at 44 KiB, inside an old 8 KiB
    // record: without the zeroed block after each write the scan would run into it.
    for _ in 0..3 {
        wal.append(&[WalRecord::Entry(entry(next, 2)), WalRecord::Entry(entry(next + 1, 2))]).unwrap();
        next += 2;
    }
    let expected = |end: u64| -> Vec<Entry> {
        (17..end).map(|i| if i < singles_end { entry(i, 1) } else { entry(i, 2) }).collect()
    };
    drop(wal);
    let crashed = engine.crash(CrashPolicy::DropUnsynced, &mut Rng::new(3));
    let (mut wal, recovery) = Wal::open(Box::new(crashed.clone()), dir, 1, small()).unwrap();
    assert!(recovery.corruptions.is_empty(), "{:?}", recovery.corruptions);
    assert!(!recovery.torn_tail, "a clean log in a recycled segment read as torn");
    assert_eq!(recovery.entries, expected(next), "old records of the recycled segment came back");
    // The recycled segment, no longer the last: its end still reads as its end.
    append_pairs_until_rotation(&mut wal, &crashed, &mut next, 2);
    drop(wal);
    let (_, recovery) =
        Wal::open(Box::new(crashed.crash(CrashPolicy::DropUnsynced, &mut Rng::new(4))), dir, 1, small()).unwrap();
    assert!(recovery.corruptions.is_empty() && !recovery.torn_tail, "{:?}", recovery.corruptions);
    assert_eq!(recovery.entries, expected(next));
}

#[test]
fn crash_at_every_point_with_recycled_segments_keeps_every_acknowledged_batch() {
    let dir = Path::new("/wal");
    let mut checked = 0;
    for seed in 0..3 {
        let mut rng = Rng::new(100 + seed);
        let engine = CrashEngine::new();
        let (mut wal, _) = Wal::open(Box::new(engine.clone()), dir, 3, small()).unwrap();
        // Batches of 1-3 entries, each batch its own term; pruning keeps the last ~12 entries.
        let mut written: BTreeMap<u64, Entry> = BTreeMap::new();
        let mut acked_at: Vec<(usize, u64)> = Vec::new(); // (trace length, last index) per batch
        let mut next = 1;
        for batch in 0..60u64 {
            let records: Vec<WalRecord> = (0..rng.range(1, 4))
                .map(|k| {
                    let e = entry(next + k, batch + 1);
                    written.insert(next + k, e.clone());
                    WalRecord::Entry(e)
                })
                .collect();
            next += records.len() as u64;
            wal.append(&records).unwrap();
            acked_at.push((engine.trace_len(), next - 1));
            if batch % 4 == 3 && next > 13 {
                wal.prune(Index(next - 13)).unwrap();
            }
            wal.check_invariants();
        }
        assert!(engine.trace_len() > 0);
        let total = engine.trace_len();
        let policies =
            [CrashPolicy::DropUnsynced, CrashPolicy::RandomSubsetReordered, CrashPolicy::TearLast { bytes: 512 }];
        for point in 0..=total {
            for policy in policies {
                let crashed = engine.crash_at(point, policy, &mut rng);
                let (mut wal2, recovery) = Wal::open(Box::new(crashed.clone()), dir, 3, small())
                    .unwrap_or_else(|e| panic!("seed {seed} point {point} {policy:?}: recovery failed: {e}"));
                let at = format!("seed {seed} point {point} {policy:?}");
                assert!(recovery.corruptions.is_empty(), "{at}: {:?}", recovery.corruptions);
                let held: Vec<u64> = recovery.entries.iter().map(|e| e.index.0).collect();
                // One contiguous run (an old record of a recycled segment would sit apart,
                // below it), every entry as written, through every acknowledged batch.
                assert!(held.windows(2).all(|w| w[1] == w[0] + 1), "{at}: not contiguous: {held:?}");
                assert!(recovery.entries.iter().all(|e| written.get(&e.index.0) == Some(e)), "{at}");
                let acked = acked_at.iter().filter(|(t, _)| *t <= point).map(|(_, last)| *last).max();
                if let Some(acked) = acked {
                    assert!(held.last().is_some_and(|l| *l >= acked), "{at}: lost acknowledged {acked}: {held:?}");
                }
                // The recovered log takes a new batch, which survives another recovery.
                let tail = held.last().map_or(1, |l| l + 1);
                wal2.append(&[WalRecord::Entry(entry(tail, 999))]).unwrap();
                drop(wal2);
                let (_, again) =
                    Wal::open(Box::new(crashed.crash(CrashPolicy::DropUnsynced, &mut rng)), dir, 3, small()).unwrap();
                assert!(again.corruptions.is_empty(), "{at}: after append {:?}", again.corruptions);
                assert_eq!(again.entries.last(), Some(&entry(tail, 999)), "{at}");
                assert_eq!(again.entries.len(), recovery.entries.len() + 1, "{at}");
                checked += 1;
            }
        }
    }
    assert!(checked > 500, "only {checked} crash states checked");
}

#[test]
fn a_segment_with_untagged_records_is_deleted_not_recycled() {
    // Records written before recycling carry no tag: recycled, they would read as the new
    // segment's and be replayed.
    let engine = CrashEngine::new();
    let dir = Path::new("/wal");
    let mut image = Vec::new();
    for i in 1..=3 {
        image.extend(legacy_record(&entry(i, 1), 5, i, i, 0, 1));
    }
    write_first_segment(&engine, small(), &image);
    let (mut wal, recovery) = Wal::open(Box::new(engine.clone()), dir, 5, small()).unwrap();
    assert_eq!(recovery.entries.len(), 3);
    let mut next = 4;
    append_until_segments(&mut wal, 3, &mut next);
    // Segment 1 (untagged records, then tagged ones) goes; segment 2 (tagged only) is kept.
    let first_of_third = next - 1;
    wal.prune(Index(first_of_third - 9)).unwrap();
    assert_eq!(wal.segment_count(), 2);
    assert!(!engine.exists(&recycled(dir, 5, 1)), "a segment holding untagged records was recycled");
    assert_eq!(wal.spare_count(), 0);
    assert!(!engine.exists(Path::new("/wal/wal-0000000000000005-0000000001.log")));
    // The next one, written by this version, is.
    wal.prune(Index(first_of_third - 1)).unwrap();
    assert!(engine.exists(&recycled(dir, 5, 2)) && wal.spare_ready());
}

#[test]
fn a_fresh_spare_waits_while_an_older_segment_may_be_recycled() {
    let (engine, _dir, spare, mut wal) = spare_test_log();
    let mut next = 1;
    append_until_rotation(&mut wal, &engine, &mut next);
    // Two segments; the second holds one 8 KiB record of its 64 KiB. Past half full, still no
    // fresh spare: the first segment may become the spare when a checkpoint covers it.
    for _ in 0..5 {
        wal.append(&[WalRecord::Entry(entry(next, 1))]).unwrap();
        next += 1;
    }
    assert!(!wal.prepare_spare().unwrap() && !engine.exists(&spare), "zeroed a spare at 48 KiB of 64");
    // At 7/8 it starts one all the same, so the rotation does not zero inline.
    wal.append(&[WalRecord::Entry(entry(next, 1))]).unwrap();
    assert!(wal.prepare_spare().unwrap() && engine.exists(&spare));
}

/// Bytes one append of a single entry (`*next`) writes; advances `*next`.
fn bytes_of_one_append(wal: &mut Wal, engine: &CrashEngine, next: &mut u64) -> u64 {
    let before = engine.written_bytes();
    wal.append(&[WalRecord::Entry(entry(*next, 1))]).unwrap();
    *next += 1;
    engine.written_bytes() - before
}

#[test]
fn after_a_restart_writes_end_with_a_zeroed_block_only_over_old_records() {
    // A segment zeroed when made: a restart finds zeroes past its records and writes on as
    // before (a 4 KiB trailer per group commit would be pure overhead).
    let (engine, dir, _spare, mut wal) = spare_test_log();
    let mut next = 1;
    let plain = bytes_of_one_append(&mut wal, &engine, &mut next);
    assert_eq!(plain, 8192, "one packed entry, padded to 4 KiB");
    bytes_of_one_append(&mut wal, &engine, &mut next);
    drop(wal);
    let (mut wal, recovery) = Wal::open(Box::new(engine.clone()), dir, 1, small()).unwrap();
    assert_eq!(recovery.entries.len(), 2);
    assert_eq!(bytes_of_one_append(&mut wal, &engine, &mut next), plain, "a trailer into a zeroed segment");

    // A recycled segment: past its records lie the old ones, so after a restart each write
    // still ends with a zeroed block.
    append_until_segments(&mut wal, 4, &mut next);
    let covered = next - 12;
    wal.prune(Index(covered)).unwrap();
    assert!(wal.spare_ready(), "no recycled spare");
    append_until_rotation(&mut wal, &engine, &mut next);
    drop(wal);
    let (mut wal, recovery) = Wal::open(Box::new(engine.clone()), dir, 1, small()).unwrap();
    assert!(recovery.corruptions.is_empty() && !recovery.torn_tail, "{:?}", recovery.corruptions);
    assert_eq!(bytes_of_one_append(&mut wal, &engine, &mut next), plain + 4096, "no trailer over old records");
    // Two entries (a 12 KiB write, at 16 KiB) end inside an old 8 KiB record (24..32 KiB):
    // the zeroed block after them is what ends the next scan there, not the old record's
    // remains (which would read as a torn tail now and as corruption once later batches
    // follow).
    wal.append(&[WalRecord::Entry(entry(next, 1)), WalRecord::Entry(entry(next + 1, 1))]).unwrap();
    next += 2;
    let check = |recovery: &chunkserver::storage::wal::Recovery, last: u64| {
        assert!(recovery.corruptions.is_empty() && !recovery.torn_tail, "{:?}", recovery.corruptions);
        let held: Vec<u64> = recovery.entries.iter().map(|e| e.index.0).collect();
        assert!(held.windows(2).all(|w| w[1] == w[0] + 1), "not contiguous: {held:?}");
        assert_eq!(held.last(), Some(&last));
    };
    drop(wal);
    let crashed = engine.crash(CrashPolicy::DropUnsynced, &mut Rng::new(5));
    let (mut wal, recovery) = Wal::open(Box::new(crashed.clone()), dir, 1, small()).unwrap();
    check(&recovery, next - 1);
    // Then on into the next segment: still no corruption, and the old records never replay.
    append_pairs_until_rotation(&mut wal, &crashed, &mut next, 1);
    drop(wal);
    let (_, recovery) =
        Wal::open(Box::new(crashed.crash(CrashPolicy::DropUnsynced, &mut Rng::new(6))), dir, 1, small()).unwrap();
    check(&recovery, next - 1);
}

#[test]
fn a_spare_whose_old_tag_is_the_new_segments_is_not_recycled() {
    // Tags repeat 65,535 segment numbers apart (tag = number % 65,535 + 1). A log of segments
    // 1 (tag 2) and 65,535 (tag 1), as a long-lived log could hold, must not recycle segment
    // 1 as 65,536 (tag 2 again): its old records would read as that segment's own, bringing
    // pruned entries back whenever the new segment's first write is lost.
    let engine = CrashEngine::new();
    let dir = Path::new("/wal");
    let log = |entries: std::ops::RangeInclusive<u64>, tag: u16| -> Vec<u8> {
        entries.flat_map(|i| unpacked_record(&entry(i, 1), 1, i, i, 0, 1, tag)).collect()
    };
    write_segment(&engine, small(), 1, 1, &log(1..=3, 2));
    write_segment(&engine, small(), 1, 65_535, &log(4..=5, 1));
    let (mut wal, recovery) = Wal::open(Box::new(engine.clone()), dir, 1, small()).unwrap();
    assert_eq!(recovery.entries, (1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>());
    let spare = recycled(dir, 1, 1);
    // Segment 1 is pruned and kept as the spare (its records are tagged: recyclable).
    wal.prune(Index(3)).unwrap();
    assert!(engine.exists(&spare) && wal.spare_ready());
    let start = engine.trace_len();
    let mut next = 6;
    let syncs = append_until_rotation(&mut wal, &engine, &mut next);
    assert!(engine.exists(&dir.join(format!("wal-{:016x}-{:010}.log", 1, 65_536))));
    assert!(!engine.exists(&spare));
    assert!(syncs > 1, "the rotation wrote no zeroes: the colliding spare was recycled");
    // Crashed anywhere in the rotation, the log never holds a pruned entry again.
    let mut rng = Rng::new(7);
    for point in start..=engine.trace_len() {
        for policy in [CrashPolicy::DropUnsynced, CrashPolicy::RandomSubsetReordered] {
            let (_, recovery) = Wal::open(Box::new(engine.crash_at(point, policy, &mut rng)), dir, 1, small()).unwrap();
            let held: Vec<u64> = recovery.entries.iter().map(|e| e.index.0).collect();
            assert!(held.first().is_some_and(|f| *f >= 4), "point {point} {policy:?}: {held:?}");
            assert!(recovery.corruptions.is_empty(), "point {point} {policy:?}: {:?}", recovery.corruptions);
        }
    }
}

#[test]
fn a_checkpoint_that_frees_several_segments_keeps_a_line_of_spares() {
    // With one spare, a checkpoint that freed several segments deleted all but one (a discard
    // each on a `discard` mount), and the rotations after the first zeroed fresh segments.
    let (engine, dir, spare, mut wal) = spare_test_log();
    let mut next = 1;
    append_until_segments(&mut wal, 7, &mut next);
    // Segments 1..=5 hold entries 1..=40 (eight 8 KiB records each): all five are freed.
    assert_eq!(wal.prune(Index(40)).unwrap(), 5);
    wal.check_invariants();
    // 64 KiB segments: the line's bound is its count, four; the fifth is deleted.
    assert_eq!(wal.spare_count(), 4);
    for number in 1..=4 {
        assert!(engine.exists(&recycled(dir, 1, number)), "segment {number} not kept");
    }
    assert!(!engine.exists(&recycled(dir, 1, 5)) && !engine.exists(&dir.join(format!("wal-{:016x}-{:010}.log", 1, 5))));
    // Four rotations, in the order the segments were freed, none zeroing; then a fresh one.
    for number in 1..=4 {
        assert_eq!(append_until_rotation(&mut wal, &engine, &mut next), 1, "spare {number} was zeroed");
        assert!(!engine.exists(&recycled(dir, 1, number)), "spare {number} not used in turn");
        wal.check_invariants();
    }
    assert_eq!(wal.spare_count(), 0);
    assert_eq!(append_until_rotation(&mut wal, &engine, &mut next), 2, "a rotation with no spare wrote no zeroes");
    // Spares a crash leaves behind are removed at open, and nothing pruned comes back.
    append_until_segments(&mut wal, 11, &mut next);
    let covered = next - 20;
    wal.prune(Index(covered)).unwrap();
    assert!(wal.spare_count() >= 2);
    drop(wal);
    let crashed = engine.crash(CrashPolicy::DropUnsynced, &mut Rng::new(8));
    let (wal, recovery) = Wal::open(Box::new(crashed.clone()), dir, 1, small()).unwrap();
    assert_eq!(wal.spare_count(), 0);
    let left: Vec<_> =
        crashed.clone().list_dir(dir).unwrap().into_iter().filter(|p| p.to_string_lossy().contains("-spare")).collect();
    assert!(left.is_empty() && !crashed.exists(&spare), "open left spares: {left:?}");
    assert!(recovery.corruptions.is_empty() && !recovery.torn_tail, "{:?}", recovery.corruptions);
    let held: Vec<u64> = recovery.entries.iter().map(|e| e.index.0).collect();
    assert!(held.windows(2).all(|w| w[1] == w[0] + 1), "not contiguous: {held:?}");
    assert!(held.first().is_some_and(|f| *f > 40) && held.last() == Some(&(next - 1)), "{held:?}");
}

#[test]
fn a_pruned_segment_goes_ahead_of_a_fresh_spare_being_zeroed() {
    // A checkpoint that frees a segment while a fresh spare is half zeroed: the freed one
    // (ready as it is) is used first, not deleted, and the fresh one is finished for later.
    let (engine, dir, spare, mut wal) = spare_test_log();
    let mut next = 1;
    append_until_rotation(&mut wal, &engine, &mut next);
    // Segment 2 at 7/8 with segment 1 still live: a fresh spare starts (one step: the file).
    while !wal.prepare_spare().unwrap() {
        wal.append(&[WalRecord::Entry(entry(next, 1))]).unwrap();
        next += 1;
    }
    assert!(engine.exists(&spare) && !wal.spare_ready());
    wal.prune(Index(8)).unwrap();
    wal.check_invariants();
    assert_eq!(wal.spare_count(), 2);
    assert!(wal.spare_ready() && engine.exists(&recycled(dir, 1, 1)) && engine.exists(&spare));
    assert_eq!(append_until_rotation(&mut wal, &engine, &mut next), 1, "the freed segment was not used first");
    assert!(!engine.exists(&recycled(dir, 1, 1)) && engine.exists(&spare));
    // The fresh one is finished between group commits (once the new segment is half full)
    // and used next, with no inline zeroing.
    next = fill_until_spare_starts(&mut wal, next);
    while wal.prepare_spare().unwrap() {}
    assert!(wal.spare_ready());
    wal.check_invariants();
    assert_eq!(append_until_rotation(&mut wal, &engine, &mut next), 1, "the fresh spare was zeroed again");
    assert!(!engine.exists(&spare) && wal.spare_count() == 0);
    drop(wal);
    let (_, recovery) =
        Wal::open(Box::new(engine.crash(CrashPolicy::DropUnsynced, &mut Rng::new(9))), dir, 1, small()).unwrap();
    assert!(recovery.corruptions.is_empty() && !recovery.torn_tail, "{:?}", recovery.corruptions);
    assert_eq!(recovery.entries.iter().map(|e| e.index.0).collect::<Vec<_>>(), (9..next).collect::<Vec<_>>());
}
