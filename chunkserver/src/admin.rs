//! Operator commands: inspect the groups, change their membership, move replicas off a server
//! (decommission, or replace a dead one), check that replicas agree (scrub), and delete the
//! data of replicas that were removed (gc).
//!
//! Every change goes through the group's leader as one single-server membership change. A
//! replica moves in three of them: the target joins as a learner and is rebuilt by the leader's
//! throttled stream, is promoted once caught up (the leader refuses with `LearnerBehind` until
//! then, and the move waits), and then the source is removed. The group never has fewer voters
//! than it had, so a move off a dead server needs only the live majority. Finally the removed
//! replica, if its server answers, is told to delete its data (keeping a tombstone).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use parallelraft::{MembershipChange, MembershipError, ReplicaId};

use crate::config::{Cluster, REPLICAS_PER_CHUNK};
use crate::volume::Volume;
use crate::wire::{GroupStatus, Outcome, RequestOp, MAX_SCRUB_BLOCKS};

const BLOCK_BYTES: u64 = 4096;

/// How long a command waits for a group to have a leader.
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// A scrub range whose replicas differ is read again this many times (writes in flight make
/// replicas differ for a moment) before it counts as a mismatch.
const SCRUB_RETRIES: u32 = 30;

pub struct Admin {
    volume: Volume,
    cluster: Cluster,
    /// Print progress lines while waiting.
    pub verbose: bool,
}

/// What one replica move measured.
#[derive(Clone, Debug, Default)]
pub struct MoveReport {
    /// Image bytes the new replica received.
    pub rebuild_bytes: u64,
    /// From adding the learner to its promotion.
    pub rebuild_time: Duration,
}

/// One problem a scrub found.
pub type ScrubProblem = String;

fn ids(list: &[ReplicaId]) -> String {
    list.iter().map(|r| r.0.to_string()).collect::<Vec<_>>().join(",")
}

impl Admin {
    /// Connects to every server of the cluster (waiting up to two seconds for those that
    /// answer). Call inside a tokio runtime.
    pub async fn connect(cluster: Cluster) -> Admin {
        let volume = Volume::new(cluster.clone());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !cluster.servers.iter().all(|(id, _)| volume.connected(*id)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Admin { volume, cluster, verbose: true }
    }

    /// Every live server's view of `chunk`'s group (servers that are down or hold no replica
    /// are left out).
    pub async fn views(&self, chunk: u32) -> Vec<(ReplicaId, GroupStatus)> {
        let mut out = Vec::new();
        for (server, _) in &self.cluster.servers {
            if let Outcome::Status(st) = self.volume.ask(*server, chunk, RequestOp::Status).await {
                out.push((*server, st));
            }
        }
        out
    }

    /// The view of `chunk`'s serving leader (the leader of the highest term), waiting for one.
    pub async fn leader_view(&self, chunk: u32) -> Result<(ReplicaId, GroupStatus), String> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let leader =
                self.views(chunk).await.into_iter().filter(|(_, st)| st.role == "Leader").max_by_key(|(_, st)| st.term);
            if let Some(found) = leader {
                return Ok(found);
            }
            if Instant::now() > deadline {
                return Err(format!("chunk {chunk}: no leader within {LEADER_WAIT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A table of every group: leader, term, configuration, and each replica's progress.
    pub async fn status(&self) -> String {
        let mut text = String::new();
        for chunk in 0..self.cluster.chunk_count() {
            let views = self.views(chunk).await;
            let leader = views.iter().filter(|(_, st)| st.role == "Leader").max_by_key(|(_, st)| st.term);
            match leader {
                Some((id, st)) => {
                    text.push_str(&format!(
                        "chunk {chunk}: leader {} term {} voters [{}] learners [{}] config entry {} committed {}\n",
                        id.0,
                        st.term.0,
                        ids(&st.voters),
                        ids(&st.learners),
                        st.config_index.0,
                        st.committed.0
                    ));
                }
                None => text.push_str(&format!("chunk {chunk}: no leader\n")),
            }
            for (id, st) in &views {
                text.push_str(&format!(
                    "  server {}: {} term {} committed {} applied {} checkpoint {} rebuilt {} bytes\n",
                    id.0, st.role, st.term.0, st.committed.0, st.applied.0, st.checkpoint.0, st.rebuild_received_bytes
                ));
            }
        }
        text
    }

    /// One membership change through the group's leader.
    pub async fn change(&self, chunk: u32, change: MembershipChange) -> Result<(), String> {
        self.volume
            .change(chunk, change)
            .await
            .map_err(|e| format!("chunk {chunk}: {e}"))?
            .map_err(|e| format!("chunk {chunk}: {change:?} refused: {e}"))
    }

    /// Moves `chunk`'s replica from server `from` to server `to` (see the module docs).
    pub async fn move_replica(&self, chunk: u32, from: ReplicaId, to: ReplicaId) -> Result<MoveReport, String> {
        if from == to {
            return Err("source and target are the same server".into());
        }
        if self.cluster.addr_of(to).is_none() {
            return Err(format!("server {} is not in the cluster file", to.0));
        }
        let start = Instant::now();
        let (_, before) = self.leader_view(chunk).await?;
        // A target that is already a voter is fine only when finishing an interrupted move
        // (the group then has a voter too many); otherwise the move would lose a replica.
        if before.voters.contains(&to) && before.voters.len() <= REPLICAS_PER_CHUNK {
            return Err(format!("chunk {chunk}: server {} already holds a replica of it", to.0));
        }
        if !before.voters.contains(&to) {
            match self.volume.change(chunk, MembershipChange::AddLearner(to)).await.map_err(|e| e.to_string())? {
                Ok(()) | Err(MembershipError::AlreadyMember) => {}
                Err(e) => return Err(format!("chunk {chunk}: adding server {} as a learner refused: {e}", to.0)),
            }
            self.say(&format!("chunk {chunk}: server {} joined as a learner; rebuilding it", to.0));
            let mut last_report = Instant::now();
            loop {
                match self.volume.change(chunk, MembershipChange::Promote(to)).await.map_err(|e| e.to_string())? {
                    Ok(()) | Err(MembershipError::AlreadyMember) => break,
                    Err(MembershipError::LearnerBehind) => {}
                    Err(e) => return Err(format!("chunk {chunk}: promoting server {} refused: {e}", to.0)),
                }
                if last_report.elapsed() > Duration::from_secs(2) {
                    last_report = Instant::now();
                    let got = self.rebuilt_bytes(to, chunk).await;
                    let secs = start.elapsed().as_secs_f64();
                    self.say(&format!(
                        "chunk {chunk}: server {} received {:.1} MiB so far ({:.1} MiB/s)",
                        to.0,
                        got as f64 / (1 << 20) as f64,
                        got as f64 / (1 << 20) as f64 / secs
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let report = MoveReport { rebuild_bytes: self.rebuilt_bytes(to, chunk).await, rebuild_time: start.elapsed() };
        self.say(&format!("chunk {chunk}: server {} promoted to voter", to.0));
        match self.volume.change(chunk, MembershipChange::Remove(from)).await.map_err(|e| e.to_string())? {
            Ok(()) | Err(MembershipError::NotAMember) => {}
            Err(e) => return Err(format!("chunk {chunk}: removing server {} refused: {e}", from.0)),
        }
        self.say(&format!("chunk {chunk}: server {} removed", from.0));
        self.retire(chunk, from).await;
        Ok(report)
    }

    /// Image bytes server `server` received for `chunk` since it started (0 if unknown).
    async fn rebuilt_bytes(&self, server: ReplicaId, chunk: u32) -> u64 {
        match self.volume.ask(server, chunk, RequestOp::Status).await {
            Outcome::Status(st) => st.rebuild_received_bytes,
            _ => 0,
        }
    }

    /// Tells `server` that the leader's configuration no longer includes it for `chunk`, so it
    /// deletes its replica's data. Returns whether that happened (a server that is down keeps
    /// its replica until `gc` runs while it is up).
    pub async fn retire(&self, chunk: u32, server: ReplicaId) -> bool {
        let Ok((_, leader)) = self.leader_view(chunk).await else { return false };
        if leader.voters.contains(&server)
            || leader.learners.contains(&server)
            || leader.config_index > leader.committed
        {
            return false;
        }
        for _ in 0..50 {
            match self.volume.ask(server, chunk, RequestOp::Retire { config: leader.config_index }).await {
                Outcome::Done => {
                    self.say(&format!("chunk {chunk}: server {}'s old replica deleted", server.0));
                    return true;
                }
                Outcome::Busy => tokio::time::sleep(Duration::from_millis(50)).await,
                Outcome::Failed(why) if why.contains("not connected") || why.contains("connection") => {
                    self.say(&format!("chunk {chunk}: server {} is down; its old replica stays until `gc`", server.0));
                    return false;
                }
                other => {
                    self.say(&format!("chunk {chunk}: server {} kept its old replica: {other:?}", server.0));
                    return false;
                }
            }
        }
        false
    }

    /// Moves every replica on `server` elsewhere: onto `to` if given, else onto the live
    /// server holding the fewest replicas among those not in the group. Works whether `server`
    /// is up (decommission) or dead (replace). Returns the moves made.
    pub async fn drain(&self, server: ReplicaId, to: Option<ReplicaId>) -> Result<Vec<(u32, MoveReport)>, String> {
        let mut members: BTreeMap<u32, Vec<ReplicaId>> = BTreeMap::new();
        for chunk in 0..self.cluster.chunk_count() {
            let (_, st) = self.leader_view(chunk).await?;
            members.insert(chunk, st.voters.iter().chain(st.learners.iter()).copied().collect());
        }
        if let Some(t) = to {
            let taken: Vec<String> = members
                .iter()
                .filter(|(_, m)| m.contains(&server) && m.contains(&t))
                .map(|(c, _)| c.to_string())
                .collect();
            if !taken.is_empty() {
                return Err(format!(
                    "server {} already holds chunk(s) {} of server {}; use `decommission` to pick targets",
                    t.0,
                    taken.join(", "),
                    server.0
                ));
            }
        }
        let mut moves = Vec::new();
        for chunk in 0..self.cluster.chunk_count() {
            if !members[&chunk].contains(&server) {
                continue;
            }
            let target = match to {
                Some(t) => t,
                None => self.pick_target(chunk, server, &members).await?,
            };
            self.say(&format!("chunk {chunk}: moving the replica on server {} to server {}", server.0, target.0));
            let report = self.move_replica(chunk, server, target).await?;
            let m = members.get_mut(&chunk).unwrap();
            m.retain(|r| *r != server);
            m.push(target);
            moves.push((chunk, report));
        }
        Ok(moves)
    }

    async fn pick_target(
        &self,
        chunk: u32,
        leaving: ReplicaId,
        members: &BTreeMap<u32, Vec<ReplicaId>>,
    ) -> Result<ReplicaId, String> {
        let load = |s: ReplicaId| members.values().filter(|m| m.contains(&s)).count();
        self.cluster
            .servers
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| *s != leaving && !members[&chunk].contains(s) && self.volume.connected(*s))
            .min_by_key(|s| (load(*s), *s))
            .ok_or_else(|| {
                format!(
                    "chunk {chunk}: no live server outside its group [{}] to move to; add a spare server",
                    ids(&members[&chunk])
                )
            })
    }

    /// Checks every group: a leader, exactly three voters and no learners, every member
    /// reachable and agreeing on the configuration, and every block identical (version and
    /// checksum) on every member. Returns the problems found (none: all good) and a summary.
    pub async fn scrub(&self) -> (Vec<ScrubProblem>, String) {
        let mut problems = Vec::new();
        let mut summary = String::new();
        for chunk in 0..self.cluster.chunk_count() {
            let found = self.scrub_chunk(chunk).await;
            match found {
                Ok(line) => summary.push_str(&format!("{line}\n")),
                Err(p) => {
                    summary.push_str(&format!("chunk {chunk}: {p}\n"));
                    problems.push(format!("chunk {chunk}: {p}"));
                }
            }
        }
        (problems, summary)
    }

    async fn scrub_chunk(&self, chunk: u32) -> Result<String, String> {
        // Followers apply a configuration a moment after the leader: give them that moment.
        let mut attempt = 0;
        let (_, st) = loop {
            match self.scrub_config(chunk).await {
                Ok(found) => break found,
                Err(e) if attempt >= SCRUB_RETRIES => return Err(e),
                Err(_) => attempt += 1,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let blocks = self.cluster.chunk_len(chunk) / BLOCK_BYTES;
        let mut first = 0;
        while first < blocks {
            let count = MAX_SCRUB_BLOCKS.min(blocks - first);
            let mut attempt = 0;
            loop {
                let mut sums = Vec::new();
                for server in &st.voters {
                    match self.volume.ask(*server, chunk, RequestOp::Scrub { first_block: first, count }).await {
                        Outcome::Scrub(s) if s.len() as u64 == count => sums.push(s),
                        other => {
                            return Err(format!("server {}: scrub of blocks {first}+{count}: {other:?}", server.0))
                        }
                    }
                }
                let differing: Vec<u64> = (0..count as usize)
                    .filter(|k| sums.iter().any(|s| s[*k] != sums[0][*k]))
                    .map(|k| first + k as u64)
                    .collect();
                if differing.is_empty() {
                    break;
                }
                attempt += 1;
                if attempt > SCRUB_RETRIES {
                    let shown: Vec<String> = differing.iter().take(8).map(|b| b.to_string()).collect();
                    return Err(format!(
                        "{} block(s) differ between replicas [{}] (first: {})",
                        differing.len(),
                        ids(&st.voters),
                        shown.join(", ")
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            first += count;
        }
        Ok(format!("chunk {chunk}: {blocks} blocks identical on voters [{}]", ids(&st.voters)))
    }

    /// The leader's configuration of `chunk`, if it is final (three voters, no learners) and
    /// every live server holding a replica agrees with it.
    async fn scrub_config(&self, chunk: u32) -> Result<(ReplicaId, GroupStatus), String> {
        let (leader, st) = self.leader_view(chunk).await?;
        if !st.learners.is_empty() {
            return Err(format!("learners [{}] still being rebuilt", ids(&st.learners)));
        }
        if st.voters.len() != REPLICAS_PER_CHUNK {
            return Err(format!("{} voters [{}], want {REPLICAS_PER_CHUNK}", st.voters.len(), ids(&st.voters)));
        }
        for (server, view) in self.views(chunk).await {
            let member = st.voters.contains(&server);
            if member && (view.config_index != st.config_index || view.voters != st.voters) {
                return Err(format!(
                    "server {} has configuration entry {} [{}], leader {} has {} [{}]",
                    server.0,
                    view.config_index.0,
                    ids(&view.voters),
                    leader.0,
                    st.config_index.0,
                    ids(&st.voters)
                ));
            }
            if !member {
                return Err(format!("server {} still holds a replica outside the group (run `gc`)", server.0));
            }
        }
        Ok((leader, st))
    }

    /// Deletes the data of every replica whose group's leader no longer lists its server.
    /// Returns how many were deleted.
    pub async fn gc(&self) -> usize {
        let mut retired = 0;
        for chunk in 0..self.cluster.chunk_count() {
            let Ok((_, st)) = self.leader_view(chunk).await else { continue };
            for (server, _) in self.views(chunk).await {
                if !st.voters.contains(&server) && !st.learners.contains(&server) && self.retire(chunk, server).await {
                    retired += 1;
                }
            }
        }
        retired
    }

    fn say(&self, line: &str) {
        if self.verbose {
            eprintln!("{line}");
        }
    }
}
