//! ParallelRaft: the protocol core of a replicated block device, as a pure state machine.
//!
//! - [`replica::Replica`]: one replica of one group. Events in, commands out; no IO.
//! - [`sim`]: the deterministic simulator that drives several replicas and clients through
//!   network, disk and crash faults from one seed, and checks safety and liveness.
//!
//! Consistency promised: each 4 KiB block is a linearizable register; a write is acknowledged
//! once durable on a majority and applied at the leader; conflicting writes apply in log order
//! on every replica (the look-behind buffer), non-conflicting ones in any order.

pub mod codec;
pub mod config;
pub mod entry;
pub mod io;
pub mod log;
pub mod membership;
pub mod message;
pub mod replica;
pub mod rng;
pub mod sim;
pub mod table;
pub mod types;

pub use config::{Config, Mode, NaiveFlags, LEASE_MARGIN_TICKS};
pub use entry::{Entry, Op};
pub use io::{CheckpointState, ClientError, ClientRequest, Command, Event, HardState};
pub use membership::{ConfigState, Membership, MembershipChange, MembershipError};
pub use message::{Candidacy, CommitNotice, Message};
pub use replica::{Replica, RoleKind};
pub use types::{ClientId, Index, ReplicaId, RequestId, Term};
