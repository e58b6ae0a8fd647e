//! Storage micro-benchmarks, per IO engine:
//! - `wal_append/{engine}/group{1,8,32}`: durable appends of 4 KiB write entries, `group`
//!   entries per batch (one write per segment, one fdatasync). Throughput is in entries, so
//!   criterion's "elem/s" is durable 4 KiB appends per second.
//! - `block/write/{engine}-{buffered,direct}` and `block/read/...`: one 4 KiB block at a random
//!   offset of a 64 MiB chunk (write: data and meta, no sync; read: data verified against its
//!   checksum), through the page cache (as servers run) and with O_DIRECT.
//!
//! These are measurements, not tests: CI runs them with `--test` (one iteration each) so they
//! keep compiling and running.

use std::time::Duration;

use bytes::Bytes;
use chunkserver::storage::blocks::BlockStore;
use chunkserver::storage::io::{open_engine, EngineKind};
use chunkserver::storage::wal::{Wal, WalOptions, WalRecord};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lbb::LookBehind;
use parallelraft::{ClientId, Entry, Index, Op, RequestId, Term};

const BLOCK: u64 = 4096;
const CHUNK_BYTES: u64 = 64 << 20;

fn engines() -> Vec<(&'static str, EngineKind)> {
    let mut kinds = vec![("sync", EngineKind::Sync)];
    // Where io_uring is disabled the uring rows are skipped rather than failing the run.
    if open_engine(EngineKind::Uring).is_ok() {
        kinds.push(("uring", EngineKind::Uring));
    }
    kinds
}

fn write_entry(index: u64) -> Entry {
    let data = vec![(index % 251) as u8; BLOCK as usize];
    Entry {
        index: Index(index),
        term: Term(1),
        ballot: Term(1),
        op: Op::Write { offset: (index * 7919 % (CHUNK_BYTES / BLOCK)) * BLOCK, data: Bytes::from(data) },
        request: Some(RequestId { client: ClientId(1), seq: index }),
        floor: 0,
        look_behind: LookBehind::unknown(2),
    }
}

/// A tiny xorshift so block offsets are random but the benchmark is repeatable.
struct Offsets(u64);

impl Offsets {
    fn next_block(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % (CHUNK_BYTES / BLOCK)) * BLOCK
    }
}

fn wal_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_append");
    group.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    for (name, kind) in engines() {
        for batch in [1usize, 8, 32] {
            let dir = tempfile::tempdir().expect("temporary directory");
            let engine = open_engine(kind).expect("engine");
            let (mut wal, _) = Wal::open(engine, dir.path(), 1, WalOptions::default()).expect("open wal");
            let mut next = 1u64;
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(BenchmarkId::new(name, format!("group{batch}")), &batch, |b, &batch| {
                b.iter(|| {
                    let records: Vec<WalRecord> = (0..batch)
                        .map(|_| {
                            next += 1;
                            WalRecord::Entry(write_entry(next))
                        })
                        .collect();
                    wal.append(&records).expect("durable append");
                    // Keep the benchmark's disk footprint bounded: everything appended so far
                    // counts as checkpointed.
                    wal.prune(Index(next)).expect("prune");
                });
            });
        }
    }
    group.finish();
}

fn block_io(c: &mut Criterion) {
    let mut group = c.benchmark_group("block");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Bytes(BLOCK));
    for ((name, kind), direct) in engines().into_iter().flat_map(|e| [(e, false), (e, true)]) {
        let name = format!("{name}-{}", if direct { "direct" } else { "buffered" });
        let dir = tempfile::tempdir().expect("temporary directory");
        let engine = open_engine(kind).expect("engine");
        let mut store = BlockStore::open(engine, dir.path(), CHUNK_BYTES, direct).expect("open block store");
        // Fill every block once so reads never see unwritten blocks.
        let fill = vec![0x5au8; 1 << 20];
        for offset in (0..CHUNK_BYTES).step_by(fill.len()) {
            store.write(offset, &fill, Index(1)).expect("fill");
        }
        store.sync().expect("sync");
        let mut offsets = Offsets(0x9e37_79b9_7f4a_7c15);
        let mut version = 2u64;
        let data = vec![0xa5u8; BLOCK as usize];
        group.bench_function(BenchmarkId::new("write", &name), |b| {
            b.iter(|| {
                version += 1;
                store.write(offsets.next_block(), &data, Index(version)).expect("write");
            });
        });
        group.bench_function(BenchmarkId::new("read", &name), |b| {
            b.iter(|| store.read(offsets.next_block(), BLOCK).expect("read"));
        });
    }
    group.finish();
}

criterion_group!(benches, wal_append, block_io);
criterion_main!(benches);
