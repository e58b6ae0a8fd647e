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

pub mod config;
pub mod local;
pub mod nbd;
pub mod server;
pub mod storage;
pub mod volume;
pub mod wire;
