//! The cluster file (TOML): servers, the volume and how it is cut into chunks.
//!
//! ```toml
//! cluster_id = 7
//! [volume]
//! name = "vol0"
//! size = "1G"
//! chunk_size = "256M"
//! mode = "parallel"        # or "raft"
//! [[server]]
//! id = 1
//! addr = "127.0.0.1:20001"  # peers and frontends connect here (or unix:/path, unix:@name)
//! ```
//!
//! Chunk `c` starts on three servers: the non-spare servers sorted by id, starting at `c mod n`.
//! That bootstrap placement is used once, when a server creates a chunk replica for the first
//! time; afterwards each chunk group's membership lives in its own log and changes through the
//! admin commands. A server added to a running cluster is listed with `spare = true`: it starts
//! empty and receives replicas only by membership changes (a listed non-spare server that
//! started empty would create bootstrap replicas of groups that moved on).

use std::path::Path;

use parallelraft::{Mode, ReplicaId};
use serde::{Deserialize, Serialize};

use crate::net::ServerAddr;

pub const REPLICAS_PER_CHUNK: usize = 3;
const BLOCK_BYTES: u64 = 4096;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub cluster_id: u64,
    pub volume: VolumeFile,
    #[serde(rename = "server")]
    pub servers: Vec<ServerFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeFile {
    pub name: String,
    pub size: String,
    pub chunk_size: String,
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn default_mode() -> String {
    "parallel".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub id: u32,
    pub addr: String,
    /// Holds no chunk at creation (see the module docs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spare: bool,
}

/// A validated cluster description.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub cluster_id: u64,
    pub volume_name: String,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    pub mode: Mode,
    /// Sorted by id.
    pub servers: Vec<(ReplicaId, ServerAddr)>,
    /// The servers of the bootstrap placement (not spares), sorted by id.
    pub placed: Vec<ReplicaId>,
}

/// Parses sizes such as `4096`, `512K`, `256M`, `1G`, `2T` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&t[..i], t[i..].trim()),
        None => (t, ""),
    };
    let n: u64 = digits.parse().map_err(|_| format!("bad size {text:?}: expected a number with K, M, G or T"))?;
    let shift = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("bad size {text:?}: unknown unit {unit:?}")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size {text:?} too large"))
}

impl Cluster {
    pub fn load(path: &Path) -> Result<Cluster, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read cluster file {}: {e}", path.display()))?;
        let file: ClusterFile =
            toml::from_str(&text).map_err(|e| format!("bad cluster file {}: {}", path.display(), e.message()))?;
        Cluster::from_file(file).map_err(|e| format!("bad cluster file {}: {e}", path.display()))
    }

    pub fn from_file(file: ClusterFile) -> Result<Cluster, String> {
        let size_bytes = parse_size(&file.volume.size)?;
        let chunk_bytes = parse_size(&file.volume.chunk_size)?;
        if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(BLOCK_BYTES) {
            return Err(format!("chunk_size {chunk_bytes} must be a positive multiple of 4096"));
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK_BYTES) {
            return Err(format!("volume size {size_bytes} must be a positive multiple of 4096"));
        }
        if size_bytes.div_ceil(chunk_bytes) > u32::MAX as u64 {
            return Err("too many chunks".into());
        }
        if file.volume.name.is_empty() || file.volume.name.len() > 4096 {
            return Err("volume name must be 1 to 4096 bytes".into());
        }
        let mode: Mode = file.volume.mode.parse()?;
        let mut servers = Vec::new();
        let mut placed = Vec::new();
        for s in &file.servers {
            let addr: ServerAddr = s.addr.parse().map_err(|e| format!("server {}: {e}", s.id))?;
            if s.id == 0 || s.id == u32::MAX {
                return Err(format!("server id {} is reserved", s.id));
            }
            servers.push((ReplicaId(s.id), addr));
            if !s.spare {
                placed.push(ReplicaId(s.id));
            }
        }
        servers.sort();
        placed.sort();
        if servers.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err("duplicate server id".into());
        }
        if placed.len() < REPLICAS_PER_CHUNK {
            return Err(format!(
                "need at least {REPLICAS_PER_CHUNK} servers that are not spares, found {}",
                placed.len()
            ));
        }
        Ok(Cluster {
            cluster_id: file.cluster_id,
            volume_name: file.volume.name,
            size_bytes,
            chunk_bytes,
            mode,
            servers,
            placed,
        })
    }

    pub fn chunk_count(&self) -> u32 {
        self.size_bytes.div_ceil(self.chunk_bytes) as u32
    }

    /// Bytes of chunk `c` (the last one may be short).
    pub fn chunk_len(&self, c: u32) -> u64 {
        let start = c as u64 * self.chunk_bytes;
        self.chunk_bytes.min(self.size_bytes - start)
    }

    /// The bootstrap placement of chunk `c`: the servers its group starts on, sorted by id.
    /// (Where it lives now is its group's membership.)
    pub fn replicas_of(&self, c: u32) -> Vec<ReplicaId> {
        let n = self.placed.len();
        let mut r: Vec<ReplicaId> = (0..REPLICAS_PER_CHUNK).map(|k| self.placed[(c as usize + k) % n]).collect();
        r.sort();
        r
    }

    pub fn addr_of(&self, id: ReplicaId) -> Option<ServerAddr> {
        self.servers.iter().find(|(s, _)| *s == id).map(|(_, a)| a.clone())
    }

    /// The chunks server `id` holds in the bootstrap placement.
    pub fn chunks_on(&self, id: ReplicaId) -> Vec<u32> {
        (0..self.chunk_count()).filter(|c| self.replicas_of(*c).contains(&id)).collect()
    }
}

/// Follows a cluster file for servers added while the cluster runs (so a new server can take
/// replicas without restarting the others). Only additions of spare servers are taken; any
/// other change (volume, addresses, a server removed or added as non-spare, which would change
/// the bootstrap placement) is refused with a warning, and the running view stays as it was.
pub struct ClusterWatch {
    path: std::path::PathBuf,
    modified: Option<std::time::SystemTime>,
}

impl ClusterWatch {
    pub fn new(path: &Path) -> ClusterWatch {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        ClusterWatch { path: path.to_owned(), modified }
    }

    /// The servers added since `current` (with their addresses), if the file changed and its
    /// change is acceptable.
    pub fn poll(&mut self, current: &Cluster) -> Result<Vec<(ReplicaId, ServerAddr)>, String> {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if modified == self.modified {
            return Ok(Vec::new());
        }
        self.modified = modified;
        let next = Cluster::load(&self.path)?;
        current.additions(&next)
    }
}

impl Cluster {
    /// The servers `next` adds to `self`, if that is all it changes (see [`ClusterWatch`]).
    pub fn additions(&self, next: &Cluster) -> Result<Vec<(ReplicaId, ServerAddr)>, String> {
        let same_volume = next.cluster_id == self.cluster_id
            && next.volume_name == self.volume_name
            && next.size_bytes == self.size_bytes
            && next.chunk_bytes == self.chunk_bytes
            && next.mode == self.mode
            && next.placed == self.placed;
        if !same_volume {
            return Err("the cluster file changed more than by added spare servers; change ignored".into());
        }
        if let Some((id, _)) = self.servers.iter().find(|s| !next.servers.contains(s)) {
            return Err(format!("server {} was removed or moved in the cluster file; change ignored", id.0));
        }
        Ok(next.servers.iter().filter(|s| !self.servers.contains(s)).cloned().collect())
    }

    /// Adds servers (spares) found by a [`ClusterWatch`].
    pub fn add_servers(&mut self, added: &[(ReplicaId, ServerAddr)]) {
        self.servers.extend_from_slice(added);
        self.servers.sort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn placement() {
        let file: ClusterFile = toml::from_str(
            r#"
            cluster_id = 1
            [volume]
            name = "v"
            size = "10M"
            chunk_size = "4M"
            [[server]]
            id = 3
            addr = "127.0.0.1:1"
            [[server]]
            id = 1
            addr = "127.0.0.1:2"
            [[server]]
            id = 2
            addr = "127.0.0.1:3"
            [[server]]
            id = 4
            addr = "127.0.0.1:4"
            [[server]]
            id = 5
            addr = "127.0.0.1:5"
            spare = true
            "#,
        )
        .unwrap();
        let c = Cluster::from_file(file).unwrap();
        assert_eq!(c.chunk_count(), 3);
        assert_eq!(c.chunk_len(2), 2 << 20);
        assert_eq!(c.replicas_of(0), vec![ReplicaId(1), ReplicaId(2), ReplicaId(3)]);
        assert_eq!(c.replicas_of(1), vec![ReplicaId(2), ReplicaId(3), ReplicaId(4)]);
        assert_eq!(c.replicas_of(2), vec![ReplicaId(1), ReplicaId(3), ReplicaId(4)]);
        assert_eq!(c.chunks_on(ReplicaId(1)), vec![0, 2]);
        assert!(c.chunks_on(ReplicaId(5)).is_empty(), "a spare holds nothing at creation");
    }

    fn cluster(servers: &[(u32, &str, bool)]) -> Cluster {
        let mut text = String::from("cluster_id = 1\n[volume]\nname = \"v\"\nsize = \"8M\"\nchunk_size = \"4M\"\n");
        for (id, addr, spare) in servers {
            text.push_str(&format!("[[server]]\nid = {id}\naddr = \"{addr}\"\nspare = {spare}\n"));
        }
        Cluster::from_file(toml::from_str(&text).unwrap()).unwrap()
    }

    #[test]
    fn only_spares_may_be_added_to_a_running_cluster() {
        let base = [(1, "127.0.0.1:1", false), (2, "127.0.0.1:2", false), (3, "127.0.0.1:3", false)];
        let now = cluster(&base);
        let mut with_spare = base.to_vec();
        with_spare.push((7, "127.0.0.1:7", true));
        let added = now.additions(&cluster(&with_spare)).unwrap();
        assert_eq!(added, vec![(ReplicaId(7), "127.0.0.1:7".parse().unwrap())]);
        let mut placed = base.to_vec();
        placed.push((7, "127.0.0.1:7", false));
        assert!(now.additions(&cluster(&placed)).is_err(), "a non-spare addition changes the placement");
        let moved = [(1, "127.0.0.1:1", false), (2, "127.0.0.1:9", false), (3, "127.0.0.1:3", false)];
        assert!(now.additions(&cluster(&moved)).is_err(), "an address change is refused");
        assert!(now.additions(&now).unwrap().is_empty());
    }
}
