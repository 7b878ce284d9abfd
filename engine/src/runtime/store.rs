//! Where a deactivated actor's state waits for its next activation.
//!
//! `StateStore` is the narrow interface the runtime needs; `MemoryStateStore` keeps
//! states in memory (striped locks: it is touched on activation and deactivation,
//! never per message). A durable store on `dirigo-storage` plugs in behind the
//! same trait.

use std::sync::Mutex;

use crate::ids::{ActorId, IdMap, JobId};

/// A saved actor as the store keeps it: opaque bytes (see `shard::Saved`).
pub trait StateStore: Send + Sync + 'static {
    fn put(&self, id: ActorId, bytes: Vec<u8>);
    fn take(&self, id: ActorId) -> Option<Vec<u8>>;
    /// Drop the saved state of every actor of `job` (it has retired).
    fn remove_job(&self, job: JobId);
    /// Number of actors saved; for tests and `status`.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const STRIPES: usize = 16;

pub struct MemoryStateStore {
    stripes: Vec<Mutex<IdMap<ActorId, Vec<u8>>>>,
}

impl Default for MemoryStateStore {
    fn default() -> Self {
        MemoryStateStore {
            stripes: (0..STRIPES).map(|_| Mutex::new(IdMap::default())).collect(),
        }
    }
}

impl MemoryStateStore {
    fn stripe(&self, id: ActorId) -> &Mutex<IdMap<ActorId, Vec<u8>>> {
        &self.stripes[(id.mix() % STRIPES as u64) as usize]
    }
}

impl StateStore for MemoryStateStore {
    fn put(&self, id: ActorId, bytes: Vec<u8>) {
        self.stripe(id)
            .lock()
            .expect("state store lock poisoned")
            .insert(id, bytes);
    }

    fn take(&self, id: ActorId) -> Option<Vec<u8>> {
        self.stripe(id)
            .lock()
            .expect("state store lock poisoned")
            .remove(&id)
    }

    fn remove_job(&self, job: JobId) {
        for stripe in &self.stripes {
            stripe
                .lock()
                .expect("state store lock poisoned")
                .retain(|id, _| id.job != job);
        }
    }

    fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().expect("state store lock poisoned").len())
            .sum()
    }
}
