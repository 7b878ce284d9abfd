//! Identifiers of the runtime: shards, jobs, actors and placement epochs.
//!
//! Newtypes so that a shard index can never be passed where an actor partition
//! is expected. `ActorId` names a virtual actor, never a location: where an
//! actor lives is the directory's business (see `runtime::directory`).

use std::fmt;
use std::hash::{BuildHasher, Hasher};

/// One pinned core with its own executor, actor table, mailboxes and scheduler.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ShardId(pub u16);

impl ShardId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard{}", self.0)
    }
}

/// A job: a dataflow graph with its own latency SLO. Scheduling and accounting are per job.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Debug,
    Default,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[rkyv(derive(Hash, PartialEq, Eq))]
pub struct JobId(pub u32);

/// The name of a virtual actor: `(job, operator, partition)`. The partition is a key
/// group (or range of them) for keyed operators and a logical instance otherwise.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Debug,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct ActorId {
    pub job: JobId,
    pub operator: u32,
    pub partition: u32,
}

/// Operator number reserved for the per-shard injectors that carry messages sent
/// from outside the runtime (`Runtime::send`).
pub const INJECTOR_OPERATOR: u32 = u32::MAX;

impl ActorId {
    pub const fn new(job: JobId, operator: u32, partition: u32) -> Self {
        ActorId {
            job,
            operator,
            partition,
        }
    }

    /// The sender identity of messages injected from outside through `shard`.
    pub const fn injector(shard: ShardId) -> Self {
        ActorId::new(JobId(u32::MAX), INJECTOR_OPERATOR, shard.0 as u32)
    }

    pub fn is_injector(self) -> bool {
        self.operator == INJECTOR_OPERATOR
    }

    /// A well-mixed 64-bit hash of the id; used by the fast hasher and by placement.
    #[inline]
    pub fn mix(self) -> u64 {
        let a = ((self.job.0 as u64) << 32) | self.operator as u64;
        mix64(a ^ (self.partition as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "actor(job {}, op {}, part {})",
            self.job.0, self.operator, self.partition
        )
    }
}

/// splitmix64's finalizer: a cheap bijective mix of 64 bits.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hasher for maps keyed by ids on the data path: one multiply-xorshift per word,
/// no SipHash. Keys are produced by the runtime, not by an adversary.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    #[inline]
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }
    #[inline]
    fn write_u16(&mut self, n: u16) {
        self.write_u64(n as u64);
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

#[derive(Default, Clone, Copy)]
pub struct IdBuildHasher;

impl BuildHasher for IdBuildHasher {
    type Hasher = IdHasher;
    #[inline]
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

/// A `HashMap` with the id hasher.
pub type IdMap<K, V> = std::collections::HashMap<K, V, IdBuildHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injector_ids_are_distinct_per_shard_and_flagged() {
        let a = ActorId::injector(ShardId(0));
        let b = ActorId::injector(ShardId(1));
        assert_ne!(a, b);
        assert!(a.is_injector());
        assert!(!ActorId::new(JobId(1), 2, 3).is_injector());
    }

    #[test]
    fn mix_spreads_consecutive_partitions() {
        let mut low_bits = std::collections::HashSet::new();
        for p in 0..64 {
            low_bits.insert(ActorId::new(JobId(1), 1, p).mix() & 63);
        }
        assert!(low_bits.len() > 32, "poor spread: {}", low_bits.len());
    }
}
