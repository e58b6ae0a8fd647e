//! Paced write-back of a block file before a checkpoint's fdatasync.
//!
//! Why: a checkpoint makes a chunk's block file durable, and between two checkpoints random
//! writes leave thousands of dirty 4 KiB pages scattered over it. One fdatasync submits all of
//! them at once, and this machine's disk (one queue, 128 tags) then holds 40-110 requests
//! (`iostat`'s `aqu-sz` under 4 KiB random writes at iodepth 32), so every group commit of the
//! server's WAL, the write clients wait for, queued behind them: `wal_sync` p99 ~8-12 ms.
//! So a checkpoint first writes the pages it knows to be dirty back in small windows, one
//! window in flight at a time ([`crate::storage::io::IoOp::WriteBack`]), and only then
//! fdatasyncs, which finds little left to write. The device's work is the same; only the
//! depth of the queue a WAL write meets changes.
//!
//! Contract: [`DirtyBlocks`] remembers every block marked since the last take;
//! [`windows`] covers every such block with windows of at most [`WINDOW_RUNS`] runs of
//! consecutive blocks and [`WINDOW_BLOCKS`] blocks each, spanning less than
//! [`WINDOW_SPAN_BLOCKS`] + [`WINDOW_BLOCKS`], ascending and disjoint. Windows only
//! pace the writing: durability still comes from the fdatasync after them alone.

/// Runs of consecutive dirty blocks in one window at most: each run is at least one request,
/// so a window adds at most about this many to the disk's queue.
pub const WINDOW_RUNS: usize = 8;
/// Dirty blocks in one window at most (1 MiB): a long sequential run is cut into windows of
/// this size, which the kernel still writes as large requests.
pub const WINDOW_BLOCKS: u64 = 256;
/// A window takes no more runs once this many blocks (64 MiB) past its first, so its span stays
/// under `WINDOW_SPAN_BLOCKS + WINDOW_BLOCKS` whatever the chunk size (io_uring's
/// `sync_file_range` takes a 32-bit length).
pub const WINDOW_SPAN_BLOCKS: u64 = 16384;

/// One bit per block of a chunk: written since the last [`DirtyBlocks::take_runs`].
pub struct DirtyBlocks {
    words: Vec<u64>,
    blocks: u64,
}

impl DirtyBlocks {
    pub fn new(blocks: u64) -> DirtyBlocks {
        DirtyBlocks { words: vec![0; blocks.div_ceil(64) as usize], blocks }
    }

    /// Marks `block` dirty. A block beyond the store is a caller bug.
    pub fn mark(&mut self, block: u64) {
        assert!(block < self.blocks, "block {block} beyond {}", self.blocks);
        self.words[(block / 64) as usize] |= 1 << (block % 64);
    }

    /// The marked blocks as ascending runs `(first block, count)` of consecutive blocks;
    /// clears them all.
    pub fn take_runs(&mut self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (w, word) in self.words.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let block = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == block => *count += 1,
                    _ => runs.push((block, 1)),
                }
            }
        }
        runs
    }

    /// Whether no block is marked.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }
}

/// Windows `(first block, blocks spanned)` covering `runs` (ascending, disjoint, as
/// [`DirtyBlocks::take_runs`] returns them): each holds at most [`WINDOW_RUNS`] runs (or
/// pieces of runs) and [`WINDOW_BLOCKS`] dirty blocks, takes no run starting
/// [`WINDOW_SPAN_BLOCKS`] or more past its first block, and reaches from its first dirty block
/// to its last; the kernel passes the clean pages between runs by a lookup of dirty ones.
pub fn windows(runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    // The window being built: (first block, end block, runs, dirty blocks).
    let mut open: Option<(u64, u64, usize, u64)> = None;
    for &(first, count) in runs {
        let (mut at, end) = (first, first + count);
        while at < end {
            let (start, runs_in, dirty) = match open {
                Some((start, _, n, d)) if n < WINDOW_RUNS && d < WINDOW_BLOCKS && at - start < WINDOW_SPAN_BLOCKS => {
                    (start, n, d)
                }
                Some((start, stop, _, _)) => {
                    out.push((start, stop - start));
                    (at, 0, 0)
                }
                None => (at, 0, 0),
            };
            let take = (end - at).min(WINDOW_BLOCKS - dirty);
            at += take;
            open = Some((start, at, runs_in + 1, dirty + take));
        }
    }
    if let Some((start, stop, _, _)) = open {
        out.push((start, stop - start));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the contract of [`windows`] for `runs`: every dirty block in exactly one
    /// window, windows ascending and disjoint, each starting and ending on a dirty block, with
    /// at most `WINDOW_RUNS` runs and `WINDOW_BLOCKS` dirty blocks.
    fn check(runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let ws = windows(runs);
        let dirty: Vec<u64> = runs.iter().flat_map(|&(f, n)| f..f + n).collect();
        let mut covered = Vec::new();
        let mut last_end = 0;
        for (i, &(first, span)) in ws.iter().enumerate() {
            assert!(span > 0, "empty window {i}: {ws:?}");
            assert!(i == 0 || first >= last_end, "windows overlap or go back: {ws:?}");
            last_end = first + span;
            let inside: Vec<u64> = dirty.iter().copied().filter(|b| (first..first + span).contains(b)).collect();
            assert_eq!(inside.first(), Some(&first), "window {i} does not start on a dirty block");
            assert_eq!(inside.last(), Some(&(first + span - 1)), "window {i} does not end on one");
            assert!(inside.len() as u64 <= WINDOW_BLOCKS, "window {i} holds {} blocks", inside.len());
            assert!(span < WINDOW_SPAN_BLOCKS + WINDOW_BLOCKS, "window {i} spans {span} blocks");
            let pieces = inside.windows(2).filter(|p| p[1] != p[0] + 1).count() + 1;
            assert!(pieces <= WINDOW_RUNS, "window {i} holds {pieces} runs");
            covered.extend(inside);
        }
        assert_eq!(covered, dirty, "every dirty block in exactly one window");
        ws
    }

    #[test]
    fn windows_cover_every_dirty_block_within_their_bounds() {
        assert!(check(&[]).is_empty());
        assert_eq!(check(&[(5, 1)]), vec![(5, 1)]);
        // Scattered single blocks: eight runs per window.
        let scattered: Vec<(u64, u64)> = (0..20).map(|k| (k * 32, 1)).collect();
        assert_eq!(check(&scattered), vec![(0, 7 * 32 + 1), (8 * 32, 7 * 32 + 1), (16 * 32, 3 * 32 + 1)]);
        // One long run: cut into windows of WINDOW_BLOCKS.
        assert_eq!(check(&[(10, 600)]), vec![(10, 256), (266, 256), (522, 88)]);
        // A long run after short ones finishes the open window first, then continues.
        check(&[(0, 1), (3, 2), (100, 1000), (2000, 1), (2002, 255)]);
        // Runs far apart (a large chunk): a window stops taking runs past its span.
        let far = WINDOW_SPAN_BLOCKS;
        assert_eq!(
            check(&[(0, 1), (far - 1, 1), (far, 1), (3 * far, 300)]),
            vec![(0, far), (far, 1), (3 * far, 256), (3 * far + 256, 44)]
        );
        // A pseudo-random mix of run lengths and gaps.
        let mut runs = Vec::new();
        let (mut at, mut x) = (0u64, 12345u64);
        for _ in 0..500 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let gap = 1 + (x >> 33) % 40;
            let len = 1 + (x >> 13) % if x % 7 == 0 { 700 } else { 3 };
            runs.push((at + gap, len));
            at += gap + len;
        }
        check(&runs);
    }

    #[test]
    fn dirty_blocks_come_back_as_runs_once() {
        let mut d = DirtyBlocks::new(200);
        assert!(d.is_empty());
        for b in [3, 4, 5, 63, 64, 65, 130, 199, 4] {
            d.mark(b);
        }
        assert!(!d.is_empty());
        assert_eq!(d.take_runs(), vec![(3, 3), (63, 3), (130, 1), (199, 1)]);
        assert!(d.is_empty(), "a take clears every mark");
        assert!(d.take_runs().is_empty());
        d.mark(0);
        assert_eq!(d.take_runs(), vec![(0, 1)]);
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn a_block_beyond_the_store_is_refused() {
        DirtyBlocks::new(64).mark(64);
    }
}
