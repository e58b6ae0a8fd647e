//! Domain types with units in their names, so an index can never be passed as a term.

use std::fmt;

macro_rules! newtype_u64 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", stringify!($name).chars().next().unwrap().to_ascii_lowercase(), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

newtype_u64!(
    /// An election term. Also used as a *ballot*: the term of the leader that last wrote an
    /// entry copy (entries keep their original term too).
    Term
);
newtype_u64!(
    /// A log position. Index 0 is the empty prefix: the first entry is index 1.
    Index
);
newtype_u64!(
    /// A client (frontend connection) identity for at-most-once application of writes.
    ClientId
);

impl Index {
    pub fn next(self) -> Index {
        Index(self.0 + 1)
    }
    pub fn prev(self) -> Index {
        Index(self.0.checked_sub(1).expect("Index underflow"))
    }
}

impl Term {
    pub fn next(self) -> Term {
        Term(self.0 + 1)
    }
}

/// A replica of one group, numbered within the group.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId(pub u32);

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The identity of one client request: a retry carries the same identity, and the group
/// applies each identity at most once.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId {
    pub client: ClientId,
    pub seq: u64,
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.client.0, self.seq)
    }
}
