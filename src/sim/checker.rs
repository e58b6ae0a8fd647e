//! History checkers: each 4 KiB block is a linearizable register.
//!
//! Every write (and trim, and write-zeroes) gives each block it covers a unique tag, so each
//! read maps to exactly one write and linearizability of a register can be decided in
//! O(n log n) with the zone test of Gibbons and Korach: build, per written value, the cluster of
//! the write and the reads that returned it; its zone spans from the earliest response to the
//! latest invocation in the cluster. The history is linearizable iff every read's write was
//! invoked before the read responded, no two forward zones overlap, and no backward zone lies
//! inside a forward zone.

use std::collections::BTreeMap;

use super::client::{HistoryOp, OpKind};
use crate::types::RequestId;

/// A read's or write's interval on one block.
#[derive(Clone, Copy, Debug)]
struct Interval {
    invoked: u64,
    responded: u64,
}

#[derive(Default)]
struct Cluster {
    write: Option<Interval>,
    reads: Vec<Interval>,
}

/// Checks every block; returns a description of each violation.
///
/// `final_state` is the converged contents after all operations completed: it is judged as one
/// more read that starts after everything else ended, which is how a lost acknowledged write
/// shows up.
pub fn check_linearizable(
    history: &[HistoryOp],
    final_state: &BTreeMap<u64, Option<RequestId>>,
    end_time: u64,
) -> Vec<String> {
    let mut per_block: BTreeMap<u64, BTreeMap<Option<RequestId>, Cluster>> = BTreeMap::new();
    for op in history {
        let responded = op.responded.unwrap_or(u64::MAX);
        let interval = Interval { invoked: op.invoked, responded };
        for k in 0..op.blocks {
            let block = op.first_block + k;
            let clusters = per_block.entry(block).or_default();
            match op.kind {
                OpKind::Read => {
                    if op.responded.is_some() {
                        clusters.entry(op.observed[k as usize]).or_default().reads.push(interval);
                    }
                }
                _ => clusters.entry(Some(op.id)).or_default().write = Some(interval),
            }
        }
    }
    for (block, tag) in final_state {
        let read = Interval { invoked: end_time, responded: end_time + 1 };
        per_block.entry(*block).or_default().entry(*tag).or_default().reads.push(read);
    }
    let mut violations = Vec::new();
    for (block, mut clusters) in per_block {
        // The initial value (never written) is a write that completed before time began.
        let initial = clusters.entry(None).or_default();
        initial.write = Some(Interval { invoked: 0, responded: 0 });
        let mut forward = Vec::new();
        let mut backward = Vec::new();
        for (tag, cluster) in &clusters {
            let Some(write) = cluster.write else {
                violations.push(format!("block {block}: read returned {tag:?}, which no write produced"));
                continue;
            };
            for r in &cluster.reads {
                if write.invoked >= r.responded {
                    violations.push(format!("block {block}: read of {tag:?} finished before that write started"));
                }
            }
            let first_response = cluster.reads.iter().map(|r| r.responded).chain([write.responded]).min().unwrap();
            let last_invocation = cluster.reads.iter().map(|r| r.invoked).chain([write.invoked]).max().unwrap();
            if first_response < last_invocation {
                forward.push((first_response, last_invocation, *tag));
            } else {
                backward.push((last_invocation, first_response, *tag));
            }
        }
        forward.sort();
        for pair in forward.windows(2) {
            if pair[1].0 < pair[0].1 {
                violations.push(format!(
                    "block {block}: values {:?} and {:?} overlap in real time (stale or lost write)",
                    pair[0].2, pair[1].2
                ));
            }
        }
        for (s, f, tag) in &backward {
            // Forward zones are disjoint and sorted: only the last one starting before `s` can
            // contain [s, f].
            let idx = forward.partition_point(|z| z.0 < *s);
            if idx > 0 {
                let z = forward[idx - 1];
                if z.1 > *f {
                    violations.push(format!("block {block}: write {tag:?} hidden inside the life of {:?}", z.2));
                }
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ClientId;

    fn id(seq: u64) -> RequestId {
        RequestId { client: ClientId(1), seq }
    }

    fn write(seq: u64, invoked: u64, responded: u64) -> HistoryOp {
        HistoryOp {
            id: id(seq),
            kind: OpKind::Write,
            first_block: 0,
            blocks: 1,
            invoked,
            responded: Some(responded),
            observed: vec![],
        }
    }

    fn read(seq: u64, invoked: u64, responded: u64, saw: Option<u64>) -> HistoryOp {
        HistoryOp {
            id: id(seq),
            kind: OpKind::Read,
            first_block: 0,
            blocks: 1,
            invoked,
            responded: Some(responded),
            observed: vec![saw.map(id)],
        }
    }

    #[test]
    fn sequential_history_passes() {
        let h = vec![write(1, 1, 2), read(2, 3, 4, Some(1)), write(3, 5, 6), read(4, 7, 8, Some(3))];
        let final_state = BTreeMap::from([(0, Some(id(3)))]);
        assert!(check_linearizable(&h, &final_state, 100).is_empty());
    }

    #[test]
    fn stale_read_fails() {
        let h = vec![write(1, 1, 2), write(3, 5, 6), read(4, 7, 8, Some(1))];
        let final_state = BTreeMap::from([(0, Some(id(3)))]);
        assert!(!check_linearizable(&h, &final_state, 100).is_empty());
    }

    #[test]
    fn lost_acknowledged_write_fails() {
        let h = vec![write(1, 1, 2), write(3, 5, 6)];
        let final_state = BTreeMap::from([(0, Some(id(1)))]);
        assert!(!check_linearizable(&h, &final_state, 100).is_empty());
    }

    #[test]
    fn concurrent_writes_may_land_in_either_order() {
        let h = vec![write(1, 1, 10), write(3, 2, 9), read(4, 11, 12, Some(1))];
        let final_state = BTreeMap::from([(0, Some(id(1)))]);
        assert!(check_linearizable(&h, &final_state, 100).is_empty());
    }

    #[test]
    fn read_of_initial_value_after_write_fails() {
        let h = vec![write(1, 1, 2), read(4, 3, 4, None)];
        let final_state = BTreeMap::from([(0, Some(id(1)))]);
        assert!(!check_linearizable(&h, &final_state, 100).is_empty());
    }
}
