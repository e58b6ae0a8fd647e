//! A batch of frames built as pieces for one vectored write (`writev`): the frames' own bytes
//! are copied into one buffer, their data (write payloads, read results, snapshot blocks) is
//! shared, and the pieces interleave them in stream order.
//!
//! Why: a leader copied every write's data into the batch of each follower, and the link's
//! task copied batches again to coalesce them (growing its buffer by reallocation): at 128 KiB
//! sequential writes these were half of the leader's `memmove`, ~12% of its samples.
//! The kernel copies the bytes into the socket anyway; a `writev` of the pieces costs the same
//! syscall.
//!
//! Invariant: `shared` is ordered by offset, and every offset is within `head` (a piece is
//! inserted at the end of the head bytes written so far).

use bytes::{Bytes, BytesMut};
use parallelraft::codec::Sink;

/// Data shorter than this is copied: a piece costs an `iovec`, a reference count and a slot
/// in a write's bounded list of pieces, more than copying a few hundred bytes.
pub const SHARE_MIN_BYTES: usize = 1024;

#[derive(Default)]
pub struct Pieces {
    head: BytesMut,
    /// Each shared piece and the offset in `head` it goes before.
    shared: Vec<(usize, Bytes)>,
    shared_bytes: usize,
}

/// A position in a [`Pieces`] (see [`Pieces::mark`]).
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    head: usize,
    shared: usize,
}

impl Sink for Pieces {
    fn put_slice(&mut self, bytes: &[u8]) {
        self.head.extend_from_slice(bytes);
    }

    fn put_data(&mut self, data: &Bytes) {
        if data.len() < SHARE_MIN_BYTES {
            self.head.extend_from_slice(data);
        } else {
            self.shared.push((self.head.len(), data.clone()));
            self.shared_bytes += data.len();
        }
    }
}

impl Pieces {
    /// Bytes in the stream so far.
    pub fn len(&self) -> usize {
        self.head.len() + self.shared_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes copied into the head buffer (what the next batch may reserve up front).
    pub fn head_len(&self) -> usize {
        self.head.len()
    }

    /// Reserves room for `bytes` more head bytes.
    pub fn reserve(&mut self, bytes: usize) {
        self.head.reserve(bytes);
    }

    /// The current end: what is written after it can be read back with
    /// [`Pieces::for_each_since`] and its head bytes patched with [`Pieces::head_at`] (a frame's
    /// length and checksum).
    pub fn mark(&self) -> Mark {
        Mark { head: self.head.len(), shared: self.shared.len() }
    }

    /// Calls `f` with the stream's bytes from `mark` on, `skip` head bytes after it left out,
    /// in order (no allocation: every frame is sealed this way). `skip` must not pass the
    /// first shared piece after `mark`.
    pub fn for_each_since(&self, mark: Mark, skip: usize, mut f: impl FnMut(&[u8])) {
        let mut at = mark.head + skip;
        for (offset, data) in &self.shared[mark.shared..] {
            debug_assert!(*offset >= at, "skip passes a shared piece");
            f(&self.head[at..*offset]);
            f(data);
            at = *offset;
        }
        f(&self.head[at..]);
    }

    /// The head bytes written since `mark`.
    pub fn head_at(&mut self, mark: Mark) -> &mut [u8] {
        &mut self.head[mark.head..]
    }

    /// Everything so far as pieces in stream order (none empty); leaves this empty.
    pub fn take(&mut self) -> Vec<Bytes> {
        let head = self.head.split().freeze();
        let mut pieces = Vec::with_capacity(2 * self.shared.len() + 1);
        let mut at = 0;
        for (offset, data) in self.shared.drain(..) {
            if offset > at {
                pieces.push(head.slice(at..offset));
            }
            pieces.push(data);
            at = offset;
        }
        if head.len() > at {
            pieces.push(head.slice(at..));
        }
        self.shared_bytes = 0;
        pieces
    }

    pub fn check_invariants(&self) {
        let mut at = 0;
        for (offset, data) in &self.shared {
            assert!(*offset >= at && *offset <= self.head.len(), "shared piece out of order");
            assert!(data.len() >= SHARE_MIN_BYTES, "a short piece was shared");
            at = *offset;
        }
        assert_eq!(self.shared_bytes, self.shared.iter().map(|(_, d)| d.len()).sum::<usize>());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pieces, joined, are the bytes written, whatever was shared; short data is copied.
    #[test]
    fn pieces_join_to_the_stream_in_order() {
        let mut p = Pieces::default();
        let mut expected = Vec::new();
        let big = Bytes::from(vec![7u8; 4096]);
        let small = Bytes::from(vec![9u8; 100]);
        for round in 0..3u8 {
            p.put_u8(round);
            expected.push(round);
            p.put_data(&big);
            expected.extend_from_slice(&big);
            p.put_data(&big);
            expected.extend_from_slice(&big);
            p.put_data(&small);
            expected.extend_from_slice(&small);
        }
        p.check_invariants();
        assert_eq!(p.len(), expected.len());
        let mark = Mark { head: 0, shared: 0 };
        let mut read_back = Vec::new();
        p.for_each_since(mark, 1, |part| read_back.extend_from_slice(part));
        assert_eq!(read_back, expected[1..]);
        let pieces = p.take();
        // The first head byte; per round two shared pieces, then the copied small data (with
        // the next round's head byte) in one piece.
        assert_eq!(pieces.len(), 1 + 3 * 3);
        assert!(pieces.iter().all(|x| !x.is_empty()));
        assert!(pieces.iter().any(|x| x.as_ptr() == big.as_ptr()), "the large data was copied");
        assert_eq!(pieces.concat(), expected);
        assert!(p.is_empty());
        p.check_invariants();
    }
}
