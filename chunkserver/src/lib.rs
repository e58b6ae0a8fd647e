//! The chunk server and the volume frontend.
//!
//! - [`storage`]: disk engine, write-ahead log and block store, executing the protocol core's
//!   persist and apply commands durably.
//! - [`server`]: a chunk server process: many chunk replicas driven by one core thread,
//!   peer transport on tokio.
//! - [`volume`]: the frontend's client of the chunk servers: splits at chunk boundaries,
//!   finds each chunk's leader and retries across leader changes.
//! - [`nbd`]: the NBD server in front of a volume.
//! - [`local`]: the one-command local cluster.
//! - [`admin`]: operator commands (membership changes, moving replicas, scrub).
//! - [`net`]: server addresses and connections (TCP or unix sockets).

pub mod admin;
pub mod config;
pub mod local;
pub mod metrics;
pub mod nbd;
pub mod net;
pub mod outgoing;
pub mod pieces;
pub mod poll;
pub mod profile;
pub mod recv;
pub mod server;
pub mod storage;
pub mod volume;
pub mod wire;

/// 64 bits that differ between processes and between starts of the same process (pid, clock
/// and std's per-process hash keys), mixed with `salt`. For election-timeout seeds and
/// frontend client identities; never for anything the protocol's safety depends on.
pub fn process_entropy(salt: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}
