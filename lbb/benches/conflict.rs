//! Criterion benches of the apply gate's conflict check.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use lbb::{ApplyGate, LookBehind, Range, RangeSet};

/// A gate holding `depth` committed entries above the watermark, every fourth overlapping its
/// predecessor, so the scan does real conflict work.
fn gate_with(depth: u64, span: usize) -> ApplyGate {
    let mut g = ApplyGate::new(span, false, 0);
    let ranges = |i: u64| {
        let block = if i.is_multiple_of(4) { i - 1 } else { i };
        RangeSet::single(Range::new(block * 4096, 4096))
    };
    for i in 1..=depth {
        let lbb = LookBehind::new((1..=span as u64).map(|d| (d < i).then(|| ranges(i - d))).collect());
        g.insert(i, ranges(i), &lbb).unwrap();
        if i != 1 {
            g.commit(i); // entry 1 stays uncommitted: a hole everything must be checked against
        }
    }
    g
}

fn bench_ready(c: &mut Criterion) {
    let mut group = c.benchmark_group("gate_ready");
    for depth in [4u64, 32, 128] {
        let g = gate_with(depth, 2);
        let none = RangeSet::new();
        group.bench_with_input(BenchmarkId::from_parameter(depth), &depth, |b, _| {
            b.iter(|| black_box(g.ready(black_box(&none))))
        });
    }
    group.finish();
}

fn bench_overlap(c: &mut Criterion) {
    let set: RangeSet = (0..64).map(|i| Range::new(i * 8192, 4096)).collect();
    let probe = RangeSet::single(Range::new(300 * 4096, 4096));
    c.bench_function("range_set_overlaps_64", |b| b.iter(|| black_box(set.overlaps(black_box(&probe)))));
}

criterion_group!(benches, bench_ready, bench_overlap);
criterion_main!(benches);
