//! The benchmark jitter's delay line (see [`super::transport::Jitter`]): frames from peers the
//! jitter holds back wait here, on the core thread, until they are due.
//!
//! Why here and not in a timer task per frame: tokio's timer has a resolution of 1 ms and
//! rounds every sleep up to it, so a frame held for a random 0..2 ms waited ~1 ms more on
//! average, a constant that both modes paid and the reordering the option is for did not need
//! (4 KiB writes at iodepth 1, `--jitter-us 2000`: p50 0.40 ms without the jitter, 4.01 ms
//! with it through tokio's timer, 2.24 ms through this line; the two held hops of the faster
//! of two followers account for ~1.4 ms of it). The core looks at the line every round and,
//! while a frame is due within [`SPIN_WITHIN`], keeps going round instead of sleeping
//! (yielding the vCPU each time), so a frame is stepped within a round of its due time.
//!
//! Contract: [`DelayLine::release_due`] hands frames back in due order (frames due at the same
//! instant in the order they were held), never before their due time, and at most
//! [`MAX_HELD`] frames wait at once (a frame that finds the line full is handed back to be
//! stepped at once, as if it had drawn no delay).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::outbox::ConnId;
use super::transport::Inbound;
use crate::wire::Frame;

/// Frames held at once; beyond it frames are delivered at once.
pub const MAX_HELD: usize = 8192;

/// How close a due time must be for the core to spin for it rather than sleep: tokio's timer
/// wakes a sleeper up to ~1 ms late, so a sleep ends this long before the due time.
pub const SPIN_WITHIN: Duration = Duration::from_millis(2);

struct Held {
    due: Instant,
    /// Order of holding: ties on `due` keep it.
    seq: u64,
    conn: ConnId,
    frame: Frame,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    /// Reversed, so the max-heap's top is the frame due first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

#[derive(Default)]
pub struct DelayLine {
    heap: BinaryHeap<Held>,
    /// Frames held so far; also the next frame's `seq`.
    next_seq: u64,
}

/// What the core does while it has nothing to step (see [`DelayLine::idle`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Idle {
    /// A frame is due within [`SPIN_WITHIN`]: go round again without sleeping.
    Spin,
    /// Sleep at most this long (the earliest due time less [`SPIN_WITHIN`]), or as long as
    /// the core would anyway when nothing is held.
    Sleep(Option<Duration>),
}

impl DelayLine {
    /// Holds `frame` until `due`; hands it back when the line is full.
    pub fn hold(&mut self, due: Instant, conn: ConnId, frame: Frame) -> Option<(ConnId, Frame)> {
        if self.heap.len() >= MAX_HELD {
            return Some((conn, frame));
        }
        self.heap.push(Held { due, seq: self.next_seq, conn, frame });
        self.next_seq += 1;
        None
    }

    /// Moves every frame due at `now` into `batch`, in due order, as a frame that arrived at
    /// its due time.
    pub fn release_due(&mut self, now: Instant, batch: &mut Vec<Inbound>) {
        while self.heap.peek().is_some_and(|h| h.due <= now) {
            let h = self.heap.pop().expect("peeked");
            batch.push(Inbound::Frame { conn: h.conn, frame: h.frame, at: h.due });
        }
    }

    /// How the core may wait at `now` with nothing else to do.
    pub fn idle(&self, now: Instant) -> Idle {
        match self.heap.peek() {
            None => Idle::Sleep(None),
            Some(h) => match h.due.saturating_duration_since(now).checked_sub(SPIN_WITHIN) {
                Some(d) if !d.is_zero() => Idle::Sleep(Some(d)),
                _ => Idle::Spin,
            },
        }
    }

    /// Frames held since start (those handed back by a full line not counted).
    pub fn held_total(&self) -> u64 {
        self.next_seq
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Body;

    fn frame(tag: u32) -> Frame {
        Frame { cluster_id: 1, sender: 2, group: tag, body: Body::Hello { role: crate::wire::Role::Peer } }
    }

    fn released(line: &mut DelayLine, now: Instant) -> Vec<(u32, Instant)> {
        let mut batch = Vec::new();
        line.release_due(now, &mut batch);
        batch
            .into_iter()
            .map(|item| match item {
                Inbound::Frame { frame, at, .. } => (frame.group, at),
                _ => panic!("only frames are released"),
            })
            .collect()
    }

    #[test]
    fn frames_come_out_in_due_order_and_never_early() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut line = DelayLine::default();
        // Held out of due order; 3 and 4 share a due time and keep their holding order.
        for (tag, due) in [(1, 5), (2, 1), (3, 3), (4, 3), (5, 9)] {
            assert!(line.hold(ms(due), 0, frame(tag)).is_none());
        }
        assert_eq!(line.len(), 5);
        assert!(released(&mut line, t0).is_empty(), "nothing is due yet");
        assert_eq!(released(&mut line, ms(3)), vec![(2, ms(1)), (3, ms(3)), (4, ms(3))]);
        assert_eq!(released(&mut line, ms(4)), vec![]);
        assert_eq!(released(&mut line, ms(20)), vec![(1, ms(5)), (5, ms(9))]);
        assert!(line.is_empty());
    }

    #[test]
    fn the_core_spins_only_when_a_frame_is_due_soon() {
        let t0 = Instant::now();
        let mut line = DelayLine::default();
        assert_eq!(line.idle(t0), Idle::Sleep(None), "nothing held: sleep as usual");
        line.hold(t0 + Duration::from_millis(10), 0, frame(1));
        assert_eq!(line.idle(t0), Idle::Sleep(Some(Duration::from_millis(8))));
        assert_eq!(line.idle(t0 + Duration::from_millis(8)), Idle::Spin);
        assert_eq!(line.idle(t0 + Duration::from_millis(30)), Idle::Spin, "overdue");
        line.hold(t0 + Duration::from_millis(1), 0, frame(2));
        assert_eq!(line.idle(t0), Idle::Spin, "the earliest due time counts");
    }

    #[test]
    fn a_full_line_hands_the_frame_back() {
        let t0 = Instant::now();
        let mut line = DelayLine::default();
        for i in 0..MAX_HELD {
            assert!(line.hold(t0, 0, frame(i as u32)).is_none());
        }
        let back = line.hold(t0, 7, frame(99)).expect("full");
        assert_eq!((back.0, back.1.group), (7, 99));
        assert_eq!(line.held_total(), MAX_HELD as u64, "a frame handed back was not held");
        assert_eq!(released(&mut line, t0).len(), MAX_HELD);
        assert!(line.hold(t0, 0, frame(1)).is_none(), "room again");
    }
}
