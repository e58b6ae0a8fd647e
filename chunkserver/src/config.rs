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
//! addr = "127.0.0.1:20001"  # peers and frontends connect here
//! ```
//!
//! Chunk `c` is replicated on three servers: the list sorted by id, starting at `c mod n`.

use std::net::SocketAddr;
use std::path::Path;

use parallelraft::{Mode, ReplicaId};
use serde::{Deserialize, Serialize};

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
    pub servers: Vec<(ReplicaId, SocketAddr)>,
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
        for s in &file.servers {
            let addr: SocketAddr =
                s.addr.parse().map_err(|_| format!("server {}: bad address {:?} (want host:port)", s.id, s.addr))?;
            servers.push((ReplicaId(s.id), addr));
        }
        servers.sort();
        if servers.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err("duplicate server id".into());
        }
        if servers.len() < REPLICAS_PER_CHUNK {
            return Err(format!("need at least {REPLICAS_PER_CHUNK} servers, found {}", servers.len()));
        }
        Ok(Cluster {
            cluster_id: file.cluster_id,
            volume_name: file.volume.name,
            size_bytes,
            chunk_bytes,
            mode,
            servers,
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

    /// The servers holding chunk `c`, sorted by id.
    pub fn replicas_of(&self, c: u32) -> Vec<ReplicaId> {
        let n = self.servers.len();
        let mut r: Vec<ReplicaId> = (0..REPLICAS_PER_CHUNK).map(|k| self.servers[(c as usize + k) % n].0).collect();
        r.sort();
        r
    }

    pub fn addr_of(&self, id: ReplicaId) -> Option<SocketAddr> {
        self.servers.iter().find(|(s, _)| *s == id).map(|(_, a)| *a)
    }

    /// The chunks server `id` holds a replica of.
    pub fn chunks_on(&self, id: ReplicaId) -> Vec<u32> {
        (0..self.chunk_count()).filter(|c| self.replicas_of(*c).contains(&id)).collect()
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
    }
}
