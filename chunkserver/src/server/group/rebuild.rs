//! Streaming catch-up (rebuild): the block image a leader sends to a replica that is behind its
//! pruned log, typically a new learner. Resumable, incremental and throttled.
//!
//! ```text
//! leader                                   receiver
//!   SnapOffer { id, checkpoint K }   ──▶
//!                                    ◀──   SnapWant { id, covered, low, high }
//!   SnapData { id, seq, upto, blocks } ──▶  (in order; blocks installed in place, newer only)
//!   ...
//!   SnapEnd { id, frames, Snapshot }  ──▶   all frames arrived: step the Snapshot message,
//!                                           which installs checkpoint K
//! ```
//!
//! The receiver writes image blocks straight into its block store, and a block only ever moves
//! to a newer version ([`BlockStore::put_newer`]). Its store therefore always reflects, per
//! block, every write up to some index, and it states what it still needs as two regions:
//! blocks below `covered` reflect every write up to `low` (what an earlier, interrupted stream
//! delivered), the others every write up to `high` (its applied watermark: 0 for a new replica,
//! so a full copy; more for a replica that still holds data, so only what changed). The leader
//! sends exactly the blocks whose version is above the region's bound. Why that suffices: the
//! leader's image is read after its applied watermark reached `K`, so a block it skips has a
//! latest version `v` at most the bound, which the receiver already reflects, and `v` covers
//! every write up to `K` to that block.
//!
//! As frames arrive, blocks below `upto` come to reflect every write up to `K`; the receiver
//! records that (`covered = upto`, `low = K`) once `upto` passes its old `covered`, and saves
//! it to disk (after syncing the blocks) every [`SAVE_EVERY_BYTES`], so a stream cut by a
//! reconnect, a leader change or a restart resumes where it was instead of starting over.
//!
//! The sender is throttled by the server's [`RateLimiter`] and sends only when the peer's queue
//! has room, in frames of at most [`FRAME_BLOCKS`] blocks: a foreground message to the same
//! peer waits behind at most one rebuild frame, and the rebuild uses at most the configured
//! rate of disk and network.

use std::time::{Duration, Instant};

use bytes::Bytes;
use parallelraft::{Event, Index, Message, ReplicaId};
use tracing::{info, warn};

use crate::storage::blocks::ImageBlock;
use crate::storage::meta::{self, RebuildProgress};
use crate::storage::StorageError;
use crate::wire::{Body, SnapBlock};

use super::{blocks_dir, Group, Outbox};

/// Blocks per data frame (256 KiB of data at most).
pub const FRAME_BLOCKS: u64 = 64;

/// The receiver saves its progress after this many bytes of image.
pub const SAVE_EVERY_BYTES: u64 = 16 << 20;

/// A receiver that does not answer an offer within this is given up on (the leader offers
/// again at its next catch-up decision).
const OFFER_TIMEOUT: Duration = Duration::from_secs(5);

/// A snapshot image being streamed to a peer.
pub(super) struct OutSnapshot {
    to: ReplicaId,
    id: u64,
    /// The `Message::Snapshot` ending the stream (its checkpoint is the image's `K`).
    message: Message,
    offered: Instant,
    want: Option<Want>,
    next_block: u64,
    /// Data frames sent so far.
    seq: u64,
}

#[derive(Clone, Copy, Debug)]
struct Want {
    covered: u64,
    low: Index,
    high: Index,
}

/// The stream being received.
pub(super) struct Receiving {
    from: ReplicaId,
    id: u64,
    checkpoint: Index,
    next_seq: u64,
    /// A frame was missing: the rest of this stream is ignored.
    broken: bool,
}

/// Caps the bytes per second all rebuild streams of a server send (token bucket with a burst
/// of one tenth of a second).
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: u64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// `bytes_per_sec == 0`: unlimited.
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        RateLimiter { bytes_per_sec, tokens: 0.0, last: Instant::now() }
    }

    /// Whether a frame may be sent now.
    pub fn ready(&mut self) -> bool {
        if self.bytes_per_sec == 0 {
            return true;
        }
        let now = Instant::now();
        let rate = self.bytes_per_sec as f64;
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate / 10.0);
        self.last = now;
        self.tokens > 0.0
    }

    /// Charges a frame sent (the balance may go negative: the next frames wait for it).
    pub fn spend(&mut self, bytes: u64) {
        self.tokens -= bytes as f64;
    }
}

fn image_bytes(image: &[ImageBlock]) -> u64 {
    image.iter().map(|b| b.data.as_ref().map_or(0, |d| d.len() as u64)).sum()
}

impl Group {
    /// `Command::SendSnapshot`: offer the image to `to`.
    pub(super) fn offer_snapshot(&mut self, to: ReplicaId, message: Message, out: &mut Outbox) {
        // The leader asks again while an image is still streaming (it cannot know the image is
        // large). Restarting would never finish; the stream stays valid for its own message, so
        // keep it unless leadership changed.
        if self.outgoing.iter().any(|s| s.to == to && s.message.term() == message.term()) {
            return;
        }
        let Message::Snapshot { checkpoint, .. } = &message else {
            panic!("SendSnapshot without a Snapshot message");
        };
        let checkpoint = *checkpoint;
        self.outgoing.retain(|s| s.to != to);
        let id = self.next_snapshot_id;
        self.next_snapshot_id += 1;
        info!(chunk = self.chunk, to = to.0, checkpoint = checkpoint.0, "rebuild: offering the block image");
        out.peer(to, self.chunk, Body::SnapOffer { snapshot: id, checkpoint });
        self.outgoing.push(OutSnapshot { to, id, message, offered: Instant::now(), want: None, next_block: 0, seq: 0 });
    }

    /// The receiver's answer to an offer: start streaming what it asks for.
    pub fn snapshot_want(&mut self, from: ReplicaId, id: u64, covered: u64, low: Index, high: Index) {
        if let Some(s) = self.outgoing.iter_mut().find(|s| s.to == from && s.id == id && s.want.is_none()) {
            info!(chunk = self.chunk, to = from.0, covered, low = low.0, high = high.0, "rebuild: streaming");
            s.want = Some(Want { covered: covered.min(self.blocks.block_count()), low, high });
        }
    }

    /// Streams the next frames of outgoing images, as far as the peers' queues and the rate
    /// allow.
    pub fn pump_snapshots(&mut self, out: &mut Outbox, limiter: &mut RateLimiter) {
        let block_count = self.blocks.block_count();
        let members: Vec<ReplicaId> = self.replica.membership().members().collect();
        let mut bad_blocks = Vec::new();
        let mut k = 0;
        while k < self.outgoing.len() {
            let s = &mut self.outgoing[k];
            let mut done = !members.contains(&s.to);
            if let (None, false) = (s.want, done) {
                done = s.offered.elapsed() > OFFER_TIMEOUT;
            }
            while let (Some(want), false) = (s.want, done) {
                if !out.peer_has_room(s.to) || !limiter.ready() {
                    break;
                }
                if s.next_block >= block_count {
                    let body = Body::SnapEnd { snapshot: s.id, frames: s.seq, message: s.message.clone() };
                    out.peer(s.to, self.chunk, body);
                    done = true;
                    break;
                }
                let (end, since) =
                    if s.next_block < want.covered { (want.covered, want.low) } else { (block_count, want.high) };
                let count = FRAME_BLOCKS.min(end - s.next_block);
                let image = match self.blocks.image_since(s.next_block, count, since) {
                    Ok(image) => image,
                    Err(StorageError::BadBlocks(bad)) => {
                        // Not sent with a hole: repair first; the leader offers again later.
                        warn!(chunk = self.chunk, "cannot send an image before repairing {} block(s)", bad.len());
                        bad_blocks.extend(bad);
                        done = true;
                        break;
                    }
                    Err(e) => {
                        warn!(chunk = self.chunk, "cannot send an image: {e}");
                        done = true;
                        break;
                    }
                };
                s.next_block += count;
                if image.is_empty() {
                    continue;
                }
                let bytes = image_bytes(&image);
                limiter.spend(bytes);
                self.counters.catchup_bytes_sent += bytes;
                let blocks = image
                    .into_iter()
                    .map(|b| SnapBlock { block: b.block, version: b.version, data: b.data.map(Bytes::from) })
                    .collect();
                out.peer(s.to, self.chunk, Body::SnapData { snapshot: s.id, seq: s.seq, upto: s.next_block, blocks });
                s.seq += 1;
            }
            if done {
                self.outgoing.remove(k);
            } else {
                k += 1;
            }
        }
        if !bad_blocks.is_empty() {
            self.want_repair(&bad_blocks, out);
        }
    }

    /// Streams waiting for room or for tokens (the core loop polls them).
    pub fn snapshots_streaming(&self) -> bool {
        self.outgoing.iter().any(|s| s.want.is_some())
    }

    /// An offer from a leader: say what we need.
    pub fn snapshot_offer(&mut self, from: ReplicaId, id: u64, checkpoint: Index, out: &mut Outbox) {
        if self.failed.is_some() {
            return;
        }
        self.receiving = Some(Receiving { from, id, checkpoint, next_seq: 0, broken: false });
        let (covered, low) = (self.progress.covered, self.progress.low);
        let high = self.replica.applied_watermark();
        out.peer(from, self.chunk, Body::SnapWant { snapshot: id, covered, low, high });
    }

    /// A frame of the image being received: install its newer blocks in place.
    pub fn snapshot_data(&mut self, from: ReplicaId, id: u64, seq: u64, upto: u64, blocks: Vec<SnapBlock>) {
        if self.failed.is_some() {
            return;
        }
        let Some(r) = self.receiving.as_mut().filter(|r| r.from == from && r.id == id && !r.broken) else {
            return;
        };
        if seq != r.next_seq {
            warn!(
                chunk = self.chunk,
                from = from.0,
                seq,
                expected = r.next_seq,
                "rebuild frame missing; stream dropped"
            );
            r.broken = true;
            return;
        }
        r.next_seq += 1;
        let checkpoint = r.checkpoint;
        let image: Vec<ImageBlock> = blocks
            .into_iter()
            .map(|b| ImageBlock { block: b.block, version: b.version, data: b.data.map(|d| d.to_vec()) })
            .collect();
        let received = image_bytes(&image);
        match self.blocks.put_newer(&image) {
            Ok(_) => {}
            Err(StorageError::Invalid(why)) => {
                warn!(chunk = self.chunk, from = from.0, "bad rebuild frame: {why}");
                if let Some(r) = self.receiving.as_mut() {
                    r.broken = true;
                }
                return;
            }
            Err(e) => return self.fail("installing rebuild blocks", e),
        }
        self.counters.catchup_bytes_received += received;
        if upto >= self.progress.covered {
            self.progress = RebuildProgress { covered: upto, low: checkpoint };
        }
        self.unsaved_rebuild_bytes += received;
        if self.unsaved_rebuild_bytes >= SAVE_EVERY_BYTES {
            if let Err(e) = self.save_progress() {
                self.fail("saving rebuild progress", e);
            }
        }
    }

    /// Makes the blocks received so far durable, then records how far they go.
    fn save_progress(&mut self) -> Result<(), StorageError> {
        self.unsaved_rebuild_bytes = 0;
        self.blocks.sync()?;
        meta::save_rebuild_progress(self.meta.as_mut(), &blocks_dir(&self.dir), self.progress)
    }

    /// The end of a stream: step the `Snapshot` message only if every frame arrived (a stream
    /// cut short keeps its progress; the leader offers again).
    pub fn snapshot_end(&mut self, from: ReplicaId, id: u64, frames: u64, message: Message, out: &mut Outbox) {
        if self.failed.is_some() {
            return;
        }
        match self.receiving.take() {
            Some(r) if r.from == from && r.id == id && !r.broken && r.next_seq == frames => {
                self.image_ready = true;
                self.step(Event::Receive { from, message }, out);
                self.image_ready = false;
            }
            _ => warn!(chunk = self.chunk, from = from.0, "incomplete rebuild stream ignored; its progress is kept"),
        }
    }

    /// `Command::InstallSnapshot`: the image is in place; make it durable, then record its
    /// checkpoint (which supersedes the rebuild progress).
    pub(super) fn install(
        &mut self,
        from: ReplicaId,
        state: parallelraft::CheckpointState,
    ) -> Result<(), StorageError> {
        assert!(self.image_ready, "InstallSnapshot without a complete image");
        self.blocks.sync()?;
        let dir = blocks_dir(&self.dir);
        meta::save_checkpoint(self.meta.as_mut(), &dir, &state)?;
        meta::clear_rebuild_progress(&dir)?;
        self.progress = RebuildProgress::default();
        self.unsaved_rebuild_bytes = 0;
        info!(chunk = self.chunk, from = from.0, checkpoint = state.index.0, "rebuild: image installed");
        Ok(())
    }

    /// Rebuild streams this replica is sending, and whether it is receiving one.
    pub fn rebuild_streams(&self) -> (usize, bool) {
        (self.outgoing.iter().filter(|s| s.want.is_some()).count(), self.receiving.as_ref().is_some_and(|r| !r.broken))
    }
}
