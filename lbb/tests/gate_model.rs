//! Property tests: the apply gate against a brute-force model of the ParallelRaft apply rule.

use lbb::{ApplyGate, LookBehind, Range, RangeSet};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct ModelEntry {
    ranges: RangeSet,
    held: bool,
    committed: bool,
    /// Which look-behind slots the proposer knew (false: `None` in the buffer).
    known_mask: Vec<bool>,
}

fn entry_strategy(span: usize) -> impl Strategy<Value = ModelEntry> {
    (
        prop::collection::vec((0u64..64, 0u64..12), 0..3),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(prop::bool::weighted(0.85), span),
    )
        .prop_map(|(ranges, held, committed, known_mask)| ModelEntry {
            ranges: ranges.into_iter().map(|(o, l)| Range::new(o, l)).collect(),
            held,
            committed,
            known_mask,
        })
}

/// Ranges of index `j` (1-based) as the replica knows them: its own copy if held, else the
/// look-behind buffer of a held successor within the span.
fn known_ranges(log: &[ModelEntry], span: usize, j: usize) -> Option<RangeSet> {
    if log[j - 1].held {
        return Some(log[j - 1].ranges.clone());
    }
    for k in j + 1..=(j + span).min(log.len()) {
        let e = &log[k - 1];
        if e.held && e.known_mask[k - j - 1] {
            return Some(log[j - 1].ranges.clone());
        }
    }
    None
}

fn brute_ready(log: &[ModelEntry], span: usize, applied: &[bool], strict: bool) -> Vec<u64> {
    let mut out = Vec::new();
    for i in 1..=log.len() {
        let e = &log[i - 1];
        if applied[i - 1] || !e.held || !e.committed {
            continue;
        }
        let mut ok = true;
        for j in 1..i {
            if applied[j - 1] {
                continue;
            }
            if strict {
                ok = false;
                break;
            }
            match known_ranges(log, span, j) {
                Some(r) if !r.overlaps(&e.ranges) => {}
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            out.push(i as u64);
        }
    }
    out
}

fn look_behind(log: &[ModelEntry], span: usize, i: usize) -> LookBehind {
    let e = &log[i - 1];
    LookBehind::new(
        (1..=span)
            .map(|d| if d < i && e.known_mask[d - 1] { Some(log[i - 1 - d].ranges.clone()) } else { None })
            .collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn gate_matches_brute_force(
        span in 1usize..4,
        strict in prop::bool::weighted(0.2),
        seed_log in prop::collection::vec(entry_strategy(3), 1..14),
        apply_choices in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let log: Vec<ModelEntry> = seed_log
            .into_iter()
            .map(|mut e| { e.known_mask.truncate(span); e })
            .collect();
        let mut gate = ApplyGate::new(span, strict, 0);
        for (k, e) in log.iter().enumerate() {
            let i = k + 1;
            if e.held {
                gate.insert(i as u64, e.ranges.clone(), &look_behind(&log, span, i)).unwrap();
            }
            if e.committed {
                gate.commit(i as u64);
            }
        }
        gate.check_invariants();
        let mut applied = vec![false; log.len()];
        let none = RangeSet::new();
        for choice in apply_choices {
            let expected = brute_ready(&log, span, &applied, strict);
            prop_assert_eq!(gate.ready(&none), expected.clone());
            // Reads: must wait iff an unapplied predecessor overlaps or is unknown.
            let probe = RangeSet::single(Range::new(8, 8));
            let upto = log.len() as u64;
            let brute_wait = (1..=log.len()).any(|j| !applied[j - 1] && match known_ranges(&log, span, j) {
                Some(r) => r.overlaps(&probe),
                None => true,
            });
            prop_assert_eq!(gate.read_must_wait(&probe, upto), brute_wait);
            if expected.is_empty() {
                break;
            }
            let i = expected[choice.index(expected.len())];
            gate.start_apply(i);
            gate.finish_apply(i);
            applied[i as usize - 1] = true;
            gate.check_invariants();
            let aw = applied.iter().take_while(|a| **a).count() as u64;
            prop_assert_eq!(gate.applied_watermark(), aw);
        }
    }

    #[test]
    fn range_set_overlap_matches_bytes(
        a in prop::collection::vec((0u64..100, 0u64..20), 0..6),
        b in prop::collection::vec((0u64..100, 0u64..20), 0..6),
    ) {
        let sa: RangeSet = a.iter().map(|&(o, l)| Range::new(o, l)).collect();
        let sb: RangeSet = b.iter().map(|&(o, l)| Range::new(o, l)).collect();
        sa.check_invariants();
        let bytes = |v: &Vec<(u64, u64)>| {
            let mut set = std::collections::BTreeSet::new();
            for &(o, l) in v { for x in o..o + l { set.insert(x); } }
            set
        };
        let (ba, bb) = (bytes(&a), bytes(&b));
        prop_assert_eq!(sa.overlaps(&sb), ba.intersection(&bb).next().is_some());
        prop_assert_eq!(sa.len_bytes(), ba.len() as u64);
    }
}
