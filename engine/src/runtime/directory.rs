//! The directory: which shard owns each virtual actor.
//!
//! Placement is by partition: partition p of every operator starts on shard
//! p modulo the shard count. The partitions of one operator are spread evenly (a
//! hash of the whole id would pile two of three on one shard), and partition p of
//! consecutive stages share a shard, so a forward edge of a dataflow stays on its
//! core. An override table holds the actors that have been migrated. Every override carries the
//! actor's placement *epoch*, bumped by each migration; an update is applied only
//! if it is newer than what the shard knows, so updates that race through
//! different rings can never roll a placement back.
//!
//! Each shard holds its own replica (no sharing, no locks); the owner of a
//! migration broadcasts the new placement to every shard through the rings.
//!
//! Bound: one override per actor migrated at least once, removed when its job
//! retires (`forget_job`). An override is kept when the actor moves back home:
//! its epoch is what refuses an older update still in flight.

use crate::ids::{ActorId, IdMap, JobId, ShardId};

/// Where an actor lives and since which of its migrations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub shard: ShardId,
    pub epoch: u64,
}

pub struct Directory {
    shards: u16,
    overrides: IdMap<ActorId, Placement>,
    /// Bumped by every applied update: the version of this replica.
    version: u64,
}

impl Directory {
    pub fn new(shards: u16) -> Self {
        assert!(shards > 0, "a runtime has at least one shard");
        Directory {
            shards,
            overrides: IdMap::default(),
            version: 0,
        }
    }

    /// The shard an actor lives on when it has never been migrated.
    #[inline]
    pub fn home(&self, id: ActorId) -> ShardId {
        ShardId((id.partition as u64 % self.shards as u64) as u16)
    }

    #[inline]
    pub fn lookup(&self, id: ActorId) -> Placement {
        if self.overrides.is_empty() {
            return Placement {
                shard: self.home(id),
                epoch: 0,
            };
        }
        match self.overrides.get(&id) {
            Some(&placement) => placement,
            None => Placement {
                shard: self.home(id),
                epoch: 0,
            },
        }
    }

    /// Apply an update if it is newer than the current placement; says whether it was.
    pub fn apply(&mut self, id: ActorId, placement: Placement) -> bool {
        debug_assert!(placement.shard.0 < self.shards);
        if placement.epoch <= self.lookup(id).epoch {
            return false;
        }
        self.overrides.insert(id, placement);
        self.version += 1;
        true
    }

    /// Forget the overrides of a retired job's actors (none of its messages is
    /// routed any more, so no update can roll back).
    pub fn forget_job(&mut self, job: JobId) {
        self.overrides.retain(|id, _| id.job != job);
    }

    /// Actors with an override (migrated at least once).
    pub fn overrides(&self) -> usize {
        self.overrides.len()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_of_an_operator_spread_evenly() {
        let directory = Directory::new(4);
        let mut per_shard = [0; 4];
        for p in 0..128 {
            per_shard[directory.home(ActorId::new(JobId(7), 3, p)).index()] += 1;
        }
        assert_eq!(per_shard, [32; 4]);
    }

    #[test]
    fn older_updates_never_roll_back() {
        let mut directory = Directory::new(2);
        let id = ActorId::new(JobId(1), 1, 1);
        let newer = Placement {
            shard: ShardId(1),
            epoch: 2,
        };
        let older = Placement {
            shard: ShardId(0),
            epoch: 1,
        };
        assert!(directory.apply(id, newer));
        assert!(!directory.apply(id, older));
        assert_eq!(directory.lookup(id), newer);
        assert_eq!(directory.version(), 1);
    }
}
