//! The chunk server: disk engine, write-ahead log and block store.
//!
//! Built so far (issue 3): [`storage`], which executes the protocol core's persist and apply
//! commands durably. The replication transport, the NBD frontend and the server binary arrive
//! with issue 4.

pub mod storage;
