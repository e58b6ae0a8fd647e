//! Where each write's time goes, stage by stage (see `crate::metrics::Stage`).
//!
//! On the leader, per request: arrival → `leader_durable` (its own WAL copy durable) and
//! `replicate_send` (the Append carrying it handed to the peer transport) → `ack_received`
//! (the first follower acknowledgement covering it, timed from that send) → `commit_wait`
//! (from its own durability to the start of its apply) → `apply` → `leader_write` (the whole
//! request). On a follower, per WAL token: `follower_durable` (the entries of an Append handed
//! to the WAL → durable there).
//!
//! Bounded: traces live while their request waits for an answer; per-index send records and
//! follower tokens are dropped once answered, and cut back if they ever outgrow the requests.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use parallelraft::{Entry, Index, RequestId};

use crate::metrics::{Stage, Stages};

/// Timestamps of a request this replica serves as leader.
pub struct Trace {
    pub arrived: Instant,
    pub durable: Option<Instant>,
    /// The first Append carrying its entry left (retransmissions are not timed again).
    pub sent: bool,
    pub write: bool,
    pub len_bytes: u64,
}

#[derive(Default)]
pub struct Traces {
    requests: HashMap<RequestId, Trace>,
    /// WAL token → the traced requests whose entries it carries.
    token_requests: HashMap<u64, Vec<RequestId>>,
    /// Index → first send time of a traced entry, until a follower acknowledges it.
    sent: BTreeMap<Index, Instant>,
    /// WAL tokens of entries received from a leader → when they were handed to the WAL.
    follower_tokens: HashMap<u64, Instant>,
}

/// Most records kept per map beyond the requests in progress (stale ones are dropped).
const SLACK: usize = 4096;

impl Traces {
    pub fn arrived(&mut self, id: RequestId, write: bool, len_bytes: u64) {
        self.requests.insert(id, Trace { arrived: Instant::now(), durable: None, sent: false, write, len_bytes });
    }

    pub fn get(&self, id: &RequestId) -> Option<&Trace> {
        self.requests.get(id)
    }

    /// The request was answered: its trace, for the whole-request stage.
    pub fn finish(&mut self, id: &RequestId) -> Option<Trace> {
        self.requests.remove(id)
    }

    /// Keeps only the requests `keep` says are still waiting.
    pub fn retain(&mut self, keep: impl Fn(&RequestId) -> bool) {
        self.requests.retain(|id, _| keep(id));
    }

    /// The group handed `entries` to the WAL under `token`; `leader` tells which side we are.
    pub fn persist(&mut self, token: u64, entries: &[Entry], leader: bool) {
        if leader {
            let traced: Vec<RequestId> =
                entries.iter().filter_map(|e| e.request).filter(|id| self.requests.contains_key(id)).collect();
            if !traced.is_empty() {
                self.token_requests.insert(token, traced);
            }
        } else if entries.iter().any(|e| e.request.is_some()) {
            self.follower_tokens.insert(token, Instant::now());
        }
    }

    /// The WAL made `tokens` durable.
    pub fn durable(&mut self, tokens: &[u64], stages: &mut Stages) {
        let now = Instant::now();
        for token in tokens {
            for id in self.token_requests.remove(token).unwrap_or_default() {
                if let Some(t) = self.requests.get_mut(&id) {
                    t.durable = Some(now);
                    stages.record(Stage::LeaderDurable, now - t.arrived);
                }
            }
            if let Some(handed) = self.follower_tokens.remove(token) {
                stages.record(Stage::FollowerDurable, now - handed);
            }
        }
    }

    /// The leader sends `entries` to a follower: the first send of each traced entry.
    pub fn sent(&mut self, entries: &[Entry], stages: &mut Stages) {
        let now = Instant::now();
        for e in entries {
            let Some(t) = e.request.and_then(|id| self.requests.get_mut(&id)) else { continue };
            if !t.sent {
                t.sent = true;
                self.sent.insert(e.index, now);
                stages.record(Stage::ReplicateSend, now - t.arrived);
            }
        }
    }

    /// A follower acknowledged `acked` and everything up to `durable`: the first
    /// acknowledgement of each entry still waiting for one.
    pub fn acked(&mut self, acked: &[Index], durable: Index, stages: &mut Stages) {
        if self.sent.is_empty() {
            return;
        }
        let now = Instant::now();
        let upto = self.sent.split_off(&durable.next());
        for sent in std::mem::replace(&mut self.sent, upto).into_values() {
            stages.record(Stage::AckReceived, now - sent);
        }
        for i in acked {
            if let Some(sent) = self.sent.remove(i) {
                stages.record(Stage::AckReceived, now - sent);
            }
        }
    }

    /// Drops records that can no longer complete (requests answered another way, a lost
    /// leadership), so the maps stay bounded.
    pub fn trim(&mut self) {
        let limit = self.requests.len() + SLACK;
        if self.token_requests.len() > limit {
            let requests = &self.requests;
            self.token_requests.retain(|_, ids| ids.iter().any(|id| requests.contains_key(id)));
        }
        while self.sent.len() > limit {
            self.sent.pop_first();
        }
        if self.follower_tokens.len() > SLACK {
            self.follower_tokens.clear();
        }
    }
}
