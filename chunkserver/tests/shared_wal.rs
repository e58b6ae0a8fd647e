//! The server's one write-ahead log for all its replicas: per-chunk recovery, resets, pruning
//! only what every chunk's checkpoint covers, rewriting a chunk that pins old segments, moving
//! a chunk's own log of an earlier version (crash at every point of the move), and crash
//! recovery of batches that mix chunks.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use chunkserver::storage::io::{CrashEngine, CrashPolicy};
use chunkserver::storage::migrate::migrate;
use chunkserver::storage::wal::{Recovery, Wal, WalOptions, WalRecord, SHARED_LOG_ID};
use common::{entry, replay_record};
use parallelraft::rng::Rng;
use parallelraft::{Entry, Index};

fn small() -> WalOptions {
    // Tiny segments (a 4 KiB entry's record takes 8 KiB alone): rotation happens constantly.
    WalOptions { segment_bytes: 64 * 1024, direct: true }
}

const DIR: &str = "/wal";

fn open(engine: &CrashEngine) -> (Wal, Recovery) {
    Wal::open(Box::new(engine.clone()), Path::new(DIR), SHARED_LOG_ID, small()).unwrap()
}

/// What recovery finds after a power loss now.
fn recover_after_crash(engine: &CrashEngine, seed: u64) -> Recovery {
    let crashed = engine.crash(CrashPolicy::DropUnsynced, &mut Rng::new(seed));
    Wal::open(Box::new(crashed), Path::new(DIR), SHARED_LOG_ID, small()).unwrap().1
}

fn indices(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.index.0).collect()
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<WalRecord> {
    range.map(|i| WalRecord::Entry(entry(i, term))).collect()
}

#[test]
fn each_chunk_recovers_its_own_log_and_a_reset_voids_its_past() {
    let engine = CrashEngine::new();
    let (mut wal, recovery) = open(&engine);
    assert!(recovery.chunks.is_empty());
    wal.append_chunks(&[(1, &entries(1..=2, 1)), (2, &entries(1..=1, 1))]).unwrap();
    let truncate_and_rewrite = [WalRecord::Entry(entry(2, 1)), WalRecord::Truncate { after: Index(1) }];
    let mut two = truncate_and_rewrite.to_vec();
    two.push(WalRecord::Entry(entry(2, 2)));
    wal.append_chunks(&[(2, &two), (1, &entries(3..=3, 1))]).unwrap();
    let mut one = vec![WalRecord::Reset];
    one.extend(entries(10..=10, 3));
    wal.append_chunks(&[(1, &one), (3, &[WalRecord::Reset])]).unwrap();
    let recovery = recover_after_crash(&engine, 1);
    assert!(recovery.corruptions.is_empty() && !recovery.torn_tail);
    assert_eq!(recovery.chunks[&1], vec![entry(10, 3)], "chunk 1: only what follows its reset");
    assert_eq!(recovery.chunks[&2], vec![entry(1, 1), entry(2, 2)], "chunk 2: truncated and rewritten");
    assert!(recovery.chunks[&3].is_empty(), "chunk 3: a reset alone");
    assert_eq!(recovery.chunks.len(), 3);
    assert!(recovery.entries.is_empty(), "the shared log is no chunk's own");
}

/// Chunks 1 and 2 each write entries 1..=`n`, alternating single-entry batches.
fn interleaved(wal: &mut Wal, n: u64) {
    for i in 1..=n {
        wal.append_chunks(&[(1, &entries(i..=i, 1))]).unwrap();
        wal.append_chunks(&[(2, &entries(i..=i, 1))]).unwrap();
    }
}

#[test]
fn a_segment_goes_only_when_every_chunk_in_it_is_covered() {
    let engine = CrashEngine::new();
    let (mut wal, _) = open(&engine);
    interleaved(&mut wal, 40);
    let segments = wal.segment_count();
    assert!(segments > 4, "tiny segments should rotate ({segments})");
    wal.cover(1, Index(40));
    assert_eq!(wal.prune_covered().unwrap(), 0, "chunk 2's entries keep every segment");
    assert_eq!(wal.pinning(segments), Vec::<u64>::new(), "not more segments than allowed");
    assert_eq!(wal.pinning(2), vec![2], "chunk 2 pins the oldest segment");
    wal.cover(2, Index(20));
    let removed = wal.prune_covered().unwrap();
    assert!(removed > 0 && removed < segments - 1, "removed {removed} of {segments}");
    let recovery = recover_after_crash(&engine, 2);
    assert!(recovery.corruptions.is_empty(), "{:?}", recovery.corruptions);
    let two = indices(&recovery.chunks[&2]);
    assert_eq!(*two.last().unwrap(), 40);
    assert!(two[0] <= 21 && two.windows(2).all(|w| w[1] == w[0] + 1), "chunk 2 above its checkpoint is whole: {two:?}");
    // Forgetting chunk 2 (its replica left the server) frees all but the segment in use.
    wal.forget(2);
    wal.prune_covered().unwrap();
    assert_eq!(wal.segment_count(), 1);
    assert_eq!(wal.pinning(0), Vec::<u64>::new(), "nothing uncovered is left");
}

#[test]
fn a_rewrite_at_the_head_lets_old_segments_go_also_after_a_restart() {
    let engine = CrashEngine::new();
    let (mut wal, _) = open(&engine);
    wal.append_chunks(&[(1, &entries(1..=3, 1))]).unwrap(); // then chunk 1 goes quiet
    for i in 1..=30 {
        wal.append_chunks(&[(2, &entries(i..=i, 1))]).unwrap();
    }
    wal.cover(2, Index(30));
    wal.prune_covered().unwrap();
    let pinned = wal.segment_count();
    assert!(pinned > 3, "chunk 1 keeps the oldest segment and so every later one ({pinned})");
    assert_eq!(wal.pinning(3), vec![1]);
    // What a replica does when named: a reset and its entries above its checkpoint.
    let mut rewrite = vec![WalRecord::Reset];
    rewrite.extend(entries(1..=3, 1));
    wal.append_chunks(&[(1, &rewrite)]).unwrap();
    wal.prune_covered().unwrap();
    assert!(wal.segment_count() <= 2, "{} segments left", wal.segment_count());
    assert_eq!(wal.pinning(1), Vec::<u64>::new());
    let recovery = recover_after_crash(&engine, 3);
    assert_eq!(indices(&recovery.chunks[&1]), vec![1, 2, 3]);

    // The same log rebuilt without pruning, then reopened: recovery too knows the old copy is
    // void, so only the covered chunk 2 and the live copy of chunk 1 remain to decide.
    let engine = CrashEngine::new();
    let (mut wal, _) = open(&engine);
    wal.append_chunks(&[(1, &entries(1..=3, 1))]).unwrap();
    for i in 1..=30 {
        wal.append_chunks(&[(2, &entries(i..=i, 1))]).unwrap();
    }
    wal.append_chunks(&[(1, &rewrite)]).unwrap();
    let before = wal.segment_count();
    drop(wal);
    let (mut wal, recovery) = open(&engine.crash(CrashPolicy::DropUnsynced, &mut Rng::new(4)));
    assert_eq!(wal.segment_count(), before);
    assert_eq!(indices(&recovery.chunks[&1]), vec![1, 2, 3]);
    wal.cover(2, Index(30));
    wal.prune_covered().unwrap();
    assert!(wal.segment_count() <= 2, "{} of {before} segments left after a restart", wal.segment_count());
}

#[test]
fn retain_chunks_frees_segments_of_chunks_without_a_replica() {
    let engine = CrashEngine::new();
    let (mut wal, _) = open(&engine);
    interleaved(&mut wal, 20);
    wal.cover(1, Index(20));
    assert_eq!(wal.prune_covered().unwrap(), 0);
    wal.retain_chunks(|c| c == 1);
    assert!(wal.prune_covered().unwrap() > 0);
    assert_eq!(wal.segment_count(), 1);
}

#[test]
fn a_failed_append_poisons_the_log_and_stops_pruning() {
    let engine = CrashEngine::new();
    let (mut wal, _) = open(&engine);
    interleaved(&mut wal, 10);
    engine.fail_next_sync();
    let mut rewrite = vec![WalRecord::Reset];
    rewrite.extend(entries(1..=10, 1));
    assert!(wal.append_chunks(&[(1, &rewrite)]).is_err());
    // The failed batch's reset may not be on disk: chunk 1's old records are needed again.
    wal.cover(2, Index(10));
    assert_eq!(wal.prune_covered().unwrap(), 0, "pruned after a failed append");
    assert!(wal.append_chunks(&[(2, &entries(11..=11, 1))]).is_err(), "appended after a failed append");
    let recovery = recover_after_crash(&engine, 5);
    assert_eq!(indices(&recovery.chunks[&1]), (1..=10).collect::<Vec<_>>());
}

/// Writes chunk 5's own log of an earlier version in `/chunk-00000005` (with a truncation),
/// durably; returns its entries.
fn write_old_chunk_log(engine: &CrashEngine) -> Vec<Entry> {
    let dir = Path::new("/chunk-00000005");
    let (mut old, _) = Wal::open(Box::new(engine.clone()), dir, 5, small()).unwrap();
    old.append(&entries(1..=12, 1)).unwrap();
    let mut rewrite = vec![WalRecord::Truncate { after: Index(9) }];
    rewrite.extend(entries(10..=11, 2));
    old.append(&rewrite).unwrap();
    let mut expected: Vec<Entry> = (1..=9).map(|i| entry(i, 1)).collect();
    expected.extend([entry(10, 2), entry(11, 2)]);
    expected
}

#[test]
fn a_chunk_log_of_an_earlier_version_moves_once_even_across_crashes() {
    let old_dir = Path::new("/chunk-00000005");
    let engine = CrashEngine::new();
    let expected = write_old_chunk_log(&engine);
    let (mut shared, _) = open(&engine);
    // Chunk 6 has records already; chunk 5 has a stale one the move must void.
    shared.append_chunks(&[(6, &entries(1..=2, 1)), (5, &entries(40..=40, 1))]).unwrap();
    let start = engine.trace_len();
    let moved = migrate(&mut shared, Box::new(engine.clone()), old_dir, 5, small()).unwrap();
    assert_eq!(moved.expect("an old log to move").entries, expected);
    let mut probe = engine.clone();
    assert!(!Wal::exists(&mut probe, old_dir, 5).unwrap(), "the old log is deleted");
    assert!(migrate(&mut shared, Box::new(engine.clone()), old_dir, 5, small()).unwrap().is_none());
    let end = engine.trace_len();
    drop(shared);
    // A crash at every point of the move, then a start that moves what is left: chunk 5's log
    // is always exactly the old one, chunk 6's untouched.
    let mut rng = Rng::new(6);
    for point in start..=end {
        for policy in [CrashPolicy::DropUnsynced, CrashPolicy::TearLast { bytes: 512 }] {
            let crashed = engine.crash_at(point, policy, &mut rng);
            let (mut shared, _) = open(&crashed);
            migrate(&mut shared, Box::new(crashed.clone()), old_dir, 5, small()).unwrap();
            drop(shared);
            let recovery = recover_after_crash(&crashed, point as u64);
            assert_eq!(recovery.chunks[&5], expected, "crash at {point} ({policy:?})");
            assert_eq!(indices(&recovery.chunks[&6]), vec![1, 2], "crash at {point} ({policy:?})");
            let mut probe = crashed.clone();
            assert!(!Wal::exists(&mut probe, old_dir, 5).unwrap());
        }
    }
}

/// Batches over chunks 1..=3: each names one to three chunks, each part appends entries,
/// sometimes after a truncation (a merge) or a reset (a new replica, or a rewrite).
fn workload(rng: &mut Rng) -> Vec<Vec<(u64, Vec<WalRecord>)>> {
    let mut next: BTreeMap<u64, u64> = (1..=3).map(|c| (c, 1)).collect();
    let mut term = 1;
    let mut batches = Vec::new();
    for _ in 0..24 {
        let mut batch = Vec::new();
        for chunk in 1..=3u64 {
            if batch.len() == 2 || !rng.chance(0.6) {
                continue;
            }
            let n = next.get_mut(&chunk).unwrap();
            let mut records = Vec::new();
            if *n > 4 && rng.chance(0.15) {
                term += 1;
                *n -= rng.range(1, 3);
                records.push(WalRecord::Truncate { after: Index(*n - 1) });
            } else if rng.chance(0.08) {
                records.push(WalRecord::Reset);
                *n = 1;
            }
            for _ in 0..rng.range(1, 4) {
                records.push(WalRecord::Entry(entry(*n, term)));
                *n += 1;
            }
            batch.push((chunk, records));
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
    }
    batches
}

/// Per chunk, the log after `batches` (chunks whose log is empty left out).
fn replay(batches: &[Vec<(u64, Vec<WalRecord>)>]) -> BTreeMap<u64, Vec<Entry>> {
    let mut logs: BTreeMap<u64, BTreeMap<Index, Entry>> = BTreeMap::new();
    for (chunk, records) in batches.iter().flatten() {
        let log = logs.entry(*chunk).or_default();
        for r in records {
            replay_record(log, r);
        }
    }
    logs.into_iter().filter(|(_, l)| !l.is_empty()).map(|(c, l)| (c, l.into_values().collect())).collect()
}

fn non_empty(chunks: &BTreeMap<u64, Vec<Entry>>) -> BTreeMap<u64, Vec<Entry>> {
    chunks.iter().filter(|(_, l)| !l.is_empty()).map(|(c, l)| (*c, l.clone())).collect()
}

#[test]
fn crash_at_every_point_keeps_every_acknowledged_batch_of_every_chunk() {
    let mut checked = 0;
    for seed in 0..3 {
        let mut rng = Rng::new(100 + seed);
        let batches = workload(&mut rng);
        let engine = CrashEngine::new();
        let (mut wal, _) = open(&engine);
        let mut acked_at = Vec::new();
        for b in &batches {
            let parts: Vec<(u64, &[WalRecord])> = b.iter().map(|(c, r)| (*c, &r[..])).collect();
            wal.append_chunks(&parts).unwrap();
            acked_at.push(engine.trace_len());
            if seed == 1 {
                wal.prepare_spare().unwrap();
            }
        }
        let total = engine.trace_len();
        for point in 0..=total {
            for policy in
                [CrashPolicy::DropUnsynced, CrashPolicy::RandomSubsetReordered, CrashPolicy::TearLast { bytes: 512 }]
            {
                let crashed = engine.crash_at(point, policy, &mut rng);
                let (_, recovery) = open(&crashed);
                let at = format!("seed {seed} point {point} {policy:?}");
                assert!(recovery.corruptions.is_empty(), "{at}: a crash was reported as corruption");
                let acked = acked_at.iter().filter(|a| **a <= point).count();
                let issued = (acked + usize::from(point < total)).min(batches.len());
                let got = non_empty(&recovery.chunks);
                assert!(
                    (acked..=issued).any(|j| replay(&batches[..j]) == got),
                    "{at}: not the state after any batch in {acked}..={issued}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 300, "checked {checked} crash states");
}
