//! The chunk server: disk engine, WAL and block store, peer transport, NBD frontend.
//!
//! Not built yet: this crate is filled by issues 3 (storage) and 4 (server and NBD). It exists
//! now only so the workspace has its fixed layout; it exports nothing.
