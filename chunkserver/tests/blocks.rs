//! Block store and metadata files: checksums verified on every read, 512-byte writes by
//! read-modify-write, trim and zeroes, crash-safe hard state and checkpoint.

mod common;

use std::path::Path;

use chunkserver::storage::blocks::{BlockStore, ImageBlock};
use chunkserver::storage::io::{CrashEngine, CrashPolicy, WriteBackCall};
use chunkserver::storage::meta::{load_checkpoint, load_hard_state, save_checkpoint, save_hard_state};
use chunkserver::storage::{BadBlock, StorageError};
use parallelraft::rng::Rng;
use parallelraft::table::ClientTable;
use parallelraft::{
    CheckpointState, ClientId, ConfigState, Entry, HardState, Index, Membership, Op, ReplicaId, RequestId, Term,
};

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn reads_return_what_was_written_on_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    // Buffered (as servers run) and O_DIRECT: whole-block writes go out from the caller's
    // bytes only when buffered, so both paths are checked.
    for (direct, (name, engine)) in
        [true, false].into_iter().flat_map(|d| common::engines().into_iter().map(move |e| (d, e)))
    {
        let name = format!("{name}, direct {direct}");
        let sub = dir.path().join(&name);
        std::fs::create_dir_all(&sub).unwrap();
        let mut store = BlockStore::open(engine, &sub, 1 << 20, direct).unwrap();
        assert_eq!(store.read(0, 8192).unwrap(), vec![0; 8192], "{name}: never written reads zero");
        store.write(4096, &pattern(1, 3 * 4096), Index(1)).unwrap();
        // Unaligned to 4 KiB but 512-aligned: read-modify-write of two partial blocks.
        store.write(4096 + 512, &pattern(2, 4096), Index(2)).unwrap();
        let mut expected = vec![0u8; 4 * 4096];
        expected[4096..4 * 4096].copy_from_slice(&pattern(1, 3 * 4096));
        expected[4096 + 512..4096 + 512 + 4096].copy_from_slice(&pattern(2, 4096));
        assert_eq!(store.read(0, 4 * 4096).unwrap(), expected, "{name}");
        assert_eq!(store.read(4096 + 1024, 512).unwrap(), expected[4096 + 1024..4096 + 1536], "{name}: sub-block read");
        assert_eq!(store.read(4096, 1536).unwrap(), expected[4096..4096 + 1536], "{name}: the head of a block");
        assert_eq!(
            store.read(2 * 4096, 4096 + 512).unwrap(),
            expected[2 * 4096..3 * 4096 + 512],
            "{name}: a block and a head"
        );
        // Write-zeroes over a partial block and a whole block.
        store.write_zeroes(2 * 4096 + 2048, 4096 + 2048, Index(3)).unwrap();
        expected[2 * 4096 + 2048..4 * 4096].fill(0);
        assert_eq!(store.read(0, 4 * 4096).unwrap(), expected, "{name}: zeroes");
        store.sync().unwrap();
        // Bad requests are errors, not panics.
        assert!(matches!(store.write(100, &[1; 512], Index(4)), Err(StorageError::Invalid(_))));
        assert!(matches!(store.read(1 << 20, 512), Err(StorageError::Invalid(_))));
        assert!(matches!(store.read(u64::MAX - 511, 512), Err(StorageError::Invalid(_))));
    }
}

#[test]
fn a_flipped_bit_in_a_data_block_is_an_error_never_data() {
    let engine = CrashEngine::new();
    let dir = Path::new("/chunk");
    let mut store = BlockStore::open(Box::new(engine.clone()), dir, 64 * 4096, true).unwrap();
    store.write(5 * 4096, &pattern(9, 4096), Index(1)).unwrap();
    store.sync().unwrap();
    engine.flip_bit(&dir.join("blocks.dat"), 5 * 4096 + 77, 0);
    match store.read(4 * 4096, 3 * 4096) {
        Err(StorageError::BadBlocks(bad)) => {
            assert_eq!(bad, vec![BadBlock { block: 5, version: Some(Index(1)) }])
        }
        other => panic!("corrupt block served: {other:?}"),
    }
    assert!(store.is_bad(5).unwrap());
    assert!(!store.is_bad(4).unwrap());
    // A read-modify-write over the bad block fails rather than sealing bad bytes with a fresh
    // checksum; a whole-block rewrite (the repair from a peer) heals it.
    assert!(matches!(store.write(5 * 4096, &[1; 512], Index(2)), Err(StorageError::BadBlocks(_))));
    store.write(5 * 4096, &pattern(3, 4096), Index(3)).unwrap();
    assert_eq!(store.read(5 * 4096, 4096).unwrap(), pattern(3, 4096));
    // Neighbours were never affected.
    assert_eq!(store.read(4 * 4096, 4096).unwrap(), vec![0; 4096]);
}

#[test]
fn synced_blocks_survive_a_crash_and_unsynced_ones_never_read_as_garbage() {
    let mut rng = Rng::new(5);
    let engine = CrashEngine::new();
    let dir = Path::new("/chunk");
    let mut store = BlockStore::open(Box::new(engine.clone()), dir, 64 * 4096, true).unwrap();
    for b in 0..8u64 {
        store.write(b * 4096, &pattern(b as u8, 4096), Index(b + 1)).unwrap();
    }
    store.sync().unwrap();
    for b in 0..8u64 {
        store.write(b * 4096, &pattern(100 + b as u8, 4096), Index(b + 20)).unwrap();
    }
    for policy in [CrashPolicy::DropUnsynced, CrashPolicy::RandomSubsetReordered, CrashPolicy::TearLast { bytes: 512 }]
    {
        let crashed = engine.crash(policy, &mut rng);
        let mut store = BlockStore::open(Box::new(crashed), dir, 64 * 4096, true).unwrap();
        for b in 0..8u64 {
            match store.read(b * 4096, 4096) {
                // The synced version, or (if the new data and metadata both landed) the new one.
                Ok(data) => assert!(
                    data == pattern(b as u8, 4096) || data == pattern(100 + b as u8, 4096),
                    "{policy:?}: block {b} reads neither version"
                ),
                // Data and checksum from different versions: detected, repaired by log replay.
                Err(StorageError::BadBlocks(_)) => {}
                Err(e) => panic!("{policy:?}: {e}"),
            }
        }
    }
}

/// The blocks `calls` wrote back in `blocks.dat`, checked block by block against `written`
/// (ascending): every window starts and ends on a written block, and every written block is
/// in exactly one window.
fn blocks_written_back(calls: &[WriteBackCall], written: &[u64]) -> Vec<u64> {
    let mut covered = Vec::new();
    for c in calls {
        assert!(c.path.ends_with("blocks.dat"), "write-back of {:?}", c.path);
        assert!(c.offset % 4096 == 0 && c.len % 4096 == 0 && c.len > 0, "{c:?}");
        let (first, end) = (c.offset / 4096, (c.offset + c.len) / 4096);
        let inside: Vec<u64> = written.iter().copied().filter(|b| (first..end).contains(b)).collect();
        assert_eq!((inside.first(), inside.last()), (Some(&first), Some(&(end - 1))), "{c:?} ends off a written block");
        covered.extend(inside);
    }
    covered
}

#[test]
fn a_sync_writes_the_written_blocks_back_in_windows_before_it_syncs() {
    // Scattered single blocks, a run of 600 and a block written twice; zeroed blocks hold no
    // data and need no write-back.
    let engine = CrashEngine::new();
    let dir = Path::new("/chunk");
    let mut store = BlockStore::open(Box::new(engine.clone()), dir, 4096 * 4096, true).unwrap();
    let mut written: Vec<u64> = (0..40).map(|k| 7 + k * 61).collect();
    written.extend(3000..3600);
    written.push(7);
    for (k, b) in written.iter().enumerate() {
        store.write(b * 4096, &pattern(k as u8, 4096), Index(k as u64 + 1)).unwrap();
    }
    store.write_zeroes(3700 * 4096, 8 * 4096, Index(1000)).unwrap();
    written.sort_unstable();
    written.dedup();
    let syncs = engine.sync_count();
    store.sync().unwrap();
    let calls = engine.write_backs();
    assert!(calls.iter().all(|c| c.syncs_before == syncs), "every window before the sync: {calls:?}");
    assert_eq!(blocks_written_back(&calls, &written), written);
    // Small windows: 40 scattered blocks and a run of 600 take at least 40 / 8 + 600 / 256.
    assert!(calls.len() >= 5 + 3, "{} windows", calls.len());

    // Nothing written since: nothing to write back. Then the same through the checkpoint
    // thread's path (`SyncWork` run on another handle of the disk).
    store.sync().unwrap();
    assert_eq!(engine.write_backs().len(), calls.len(), "a second sync writes nothing back");
    let again = [5u64, 6, 4000];
    for b in again {
        store.write(b * 4096, &pattern(9, 4096), Index(2000 + b)).unwrap();
    }
    let work = store.take_sync_work();
    let syncs = engine.sync_count();
    work.run(&mut engine.clone()).unwrap();
    let calls = &engine.write_backs()[calls.len()..];
    assert!(calls.iter().all(|c| c.syncs_before == syncs), "{calls:?}");
    assert_eq!(blocks_written_back(calls, &again), again);
}

#[test]
fn metadata_pages_written_in_runs_all_survive_a_crash() {
    // 2,400 blocks: ten metadata pages, the last one partial. Dirty pages 0-2, 5 and 7-9 (three
    // runs, one ending on the partial page), sync, then lose everything unsynced: every block
    // written must read back, so each page of each run was written where it belongs.
    let mut rng = Rng::new(11);
    let engine = CrashEngine::new();
    let dir = Path::new("/chunk");
    let capacity = 2400 * 4096;
    let mut store = BlockStore::open(Box::new(engine.clone()), dir, capacity, true).unwrap();
    let blocks: Vec<u64> = [0u64, 1, 2, 5, 7, 8, 9].iter().flat_map(|page| [page * 256, page * 256 + 255]).collect();
    let blocks: Vec<u64> = blocks.into_iter().filter(|b| *b < 2400).chain([2399]).collect();
    for (k, b) in blocks.iter().enumerate() {
        store.write(b * 4096, &pattern(k as u8, 4096), Index(k as u64 + 1)).unwrap();
    }
    store.sync().unwrap();
    let crashed = engine.crash(CrashPolicy::DropUnsynced, &mut rng);
    let mut store = BlockStore::open(Box::new(crashed), dir, capacity, true).unwrap();
    for (k, b) in blocks.iter().enumerate() {
        assert_eq!(store.read(b * 4096, 4096).unwrap(), pattern(k as u8, 4096), "block {b}");
    }
    // Blocks never written still read as zeroes (their slots, written in the same runs, are
    // the all-zero never-written slot).
    for b in [3u64, 256 + 7, 3 * 256, 6 * 256 + 1, 2398] {
        assert_eq!(store.read(b * 4096, 4096).unwrap(), vec![0; 4096], "block {b}");
    }
}

#[test]
fn apply_executes_entries() {
    let mut store = BlockStore::open(Box::new(CrashEngine::new()), Path::new("/c"), 16 * 4096, true).unwrap();
    let write = Entry {
        index: Index(1),
        term: Term(1),
        ballot: Term(1),
        op: Op::Write { offset: 4096, data: bytes::Bytes::from(pattern(4, 8192)) },
        request: Some(RequestId { client: ClientId(1), seq: 0 }),
        floor: 0,
        look_behind: lbb::LookBehind::unknown(2),
    };
    store.apply(&write).unwrap();
    let trim = Entry { index: Index(2), op: Op::Trim { offset: 8192, len_bytes: 4096 }, ..write.clone() };
    store.apply(&trim).unwrap();
    let got = store.read(4096, 8192).unwrap();
    assert_eq!(&got[..4096], &pattern(4, 8192)[..4096]);
    assert_eq!(&got[4096..], &[0u8; 4096][..]);
}

#[test]
fn hard_state_and_checkpoint_are_replaced_atomically() {
    let engine = CrashEngine::new();
    let dir = Path::new("/meta");
    let mut e: Box<dyn chunkserver::storage::io::IoEngine> = Box::new(engine.clone());
    assert_eq!(load_hard_state(e.as_mut(), dir).unwrap(), HardState::default());
    let hs = HardState { term: Term(7), voted_for: Some(ReplicaId(2)), sync: Term(6), sync_end: Index(40) };
    save_hard_state(e.as_mut(), dir, &hs).unwrap();
    let mut table = ClientTable::default();
    table.fold(&Entry {
        index: Index(3),
        term: Term(1),
        ballot: Term(1),
        op: Op::Noop,
        request: Some(RequestId { client: ClientId(4), seq: 9 }),
        floor: 2,
        look_behind: lbb::LookBehind::unknown(2),
    });
    // The membership in force at the checkpoint survives with it (a learner included).
    let membership = Membership {
        voters: [1, 2, 4].map(ReplicaId).into_iter().collect(),
        learners: [5].map(ReplicaId).into_iter().collect(),
    };
    let config = ConfigState { index: Index(30), membership };
    let ckpt = CheckpointState { index: Index(33), table, config };
    save_checkpoint(e.as_mut(), dir, &ckpt).unwrap();
    // A crash at any point of a later save leaves the old or the new state, never neither.
    let hs2 = HardState { term: Term(8), voted_for: None, sync: Term(6), sync_end: Index(40) };
    let before = engine.trace_len();
    save_hard_state(e.as_mut(), dir, &hs2).unwrap();
    let mut rng = Rng::new(1);
    for point in before..=engine.trace_len() {
        for policy in
            [CrashPolicy::DropUnsynced, CrashPolicy::TearLast { bytes: 512 }, CrashPolicy::RandomSubsetReordered]
        {
            let mut crashed: Box<dyn chunkserver::storage::io::IoEngine> =
                Box::new(engine.crash_at(point, policy, &mut rng));
            let loaded = load_hard_state(crashed.as_mut(), dir).unwrap();
            assert!(loaded == hs || loaded == hs2, "point {point}: {loaded:?}");
            assert_eq!(load_checkpoint(crashed.as_mut(), dir).unwrap(), ckpt);
        }
    }
    // Bit rot is an error, not a default.
    engine.flip_bit(&dir.join("hardstate"), 14, 2);
    assert!(matches!(load_hard_state(e.as_mut(), dir), Err(StorageError::Corrupt { .. })));
}

#[test]
fn a_damaged_metadata_slot_makes_the_block_lost_not_trusted() {
    let engine = CrashEngine::new();
    let dir = Path::new("/chunk");
    let mut store = BlockStore::open(Box::new(engine.clone()), dir, 64 * 4096, true).unwrap();
    store.write(3 * 4096, &pattern(3, 4096), Index(7)).unwrap();
    store.write(4 * 4096, &pattern(4, 4096), Index(8)).unwrap();
    store.sync().unwrap();
    // Slot 3 is bytes 48..64 of the metadata file; flip a bit of its version field.
    engine.flip_bit(&dir.join("blocks.meta"), 3 * 16 + 9, 2);
    let mut store = BlockStore::open(Box::new(engine.clone()), dir, 64 * 4096, true).unwrap();
    match store.read(3 * 4096, 2 * 4096) {
        Err(StorageError::BadBlocks(bad)) => assert_eq!(bad, vec![BadBlock { block: 3, version: None }]),
        other => panic!("a block with a damaged version was served: {other:?}"),
    }
    assert_eq!(store.read(4 * 4096, 4096).unwrap(), pattern(4, 4096));
    // Lost survives a sync and a reopen until the block is repaired.
    store.sync().unwrap();
    let mut store = BlockStore::open(Box::new(engine.clone()), dir, 64 * 4096, true).unwrap();
    assert!(store.is_bad(3).unwrap());
    let copy = ImageBlock { block: 3, version: Index(7), data: Some(pattern(3, 4096)) };
    assert!(store.repair(&copy).unwrap());
    assert!(!store.repair(&copy).unwrap(), "a good block is not replaced");
    assert_eq!(store.read(3 * 4096, 4096).unwrap(), pattern(3, 4096));
}

fn write_entry(index: u64, offset: u64, data: Vec<u8>) -> Entry {
    Entry {
        index: Index(index),
        term: Term(1),
        ballot: Term(1),
        op: Op::Write { offset, data: bytes::Bytes::from(data) },
        request: None,
        floor: 0,
        look_behind: lbb::LookBehind::unknown(2),
    }
}

#[test]
fn apply_leaves_blocks_already_past_the_entry_alone() {
    let mut store = BlockStore::open(Box::new(CrashEngine::new()), Path::new("/c"), 16 * 4096, true).unwrap();
    // Blocks 1 and 2 come from a newer image (version 9), block 3 is older.
    store.put_block(1, Index(9), Some(&pattern(9, 4096))).unwrap();
    store.put_block(2, Index(9), Some(&pattern(19, 4096))).unwrap();
    store.put_block(3, Index(2), Some(&pattern(2, 4096))).unwrap();
    // Entry 5 spans blocks 1..=3 and ends mid-block 3: only block 3 takes it.
    store.apply(&write_entry(5, 4096, pattern(5, 2 * 4096 + 512))).unwrap();
    assert_eq!(store.read(4096, 4096).unwrap(), pattern(9, 4096));
    assert_eq!(store.read(2 * 4096, 4096).unwrap(), pattern(19, 4096));
    let mut block3 = pattern(2, 4096);
    block3[..512].copy_from_slice(&pattern(5, 2 * 4096 + 512)[2 * 4096..]);
    assert_eq!(store.read(3 * 4096, 4096).unwrap(), block3);
    // A direct write (repair, image) is not gated.
    store.write(4096, &pattern(1, 4096), Index(1)).unwrap();
    assert_eq!(store.read(4096, 4096).unwrap(), pattern(1, 4096));
}

#[test]
fn a_partial_apply_into_a_bad_block_fails_and_succeeds_after_the_repair() {
    let engine = CrashEngine::new();
    let dir = Path::new("/chunk");
    let mut store = BlockStore::open(Box::new(engine.clone()), dir, 16 * 4096, true).unwrap();
    store.write(2 * 4096, &pattern(2, 4096), Index(3)).unwrap();
    store.sync().unwrap();
    engine.flip_bit(&dir.join("blocks.dat"), 2 * 4096 + 5, 1);
    // Entry 6 writes the whole of block 1 and the first sector of block 2.
    let entry = write_entry(6, 4096, pattern(6, 4096 + 512));
    match store.apply(&entry) {
        Err(StorageError::BadBlocks(bad)) => assert_eq!(bad, vec![BadBlock { block: 2, version: Some(Index(3)) }]),
        other => panic!("{other:?}"),
    }
    // A peer's copy at version 4 (it applied entry 4 to the block as well).
    let peer = ImageBlock { block: 2, version: Index(4), data: Some(pattern(4, 4096)) };
    assert!(store.repair(&peer).unwrap());
    store.apply(&entry).unwrap();
    let mut block2 = pattern(4, 4096);
    block2[..512].copy_from_slice(&pattern(6, 4096 + 512)[4096..]);
    assert_eq!(store.read(4096, 2 * 4096).unwrap(), [pattern(6, 4096 + 512)[..4096].to_vec(), block2].concat());
}
