//! The thread-per-core runtime: one pinned glommio executor per shard, the rings
//! between every ordered pair of shards, and the handle the outside world uses to
//! send messages, move actors, read statistics and shut down.
//!
//! Who touches what: a `ShardCore` (actor table, mailboxes, scheduler, directory
//! replica) is owned by its executor thread and never shared. Shards talk only
//! through `ring`s (lock-free SPSC, one per ordered pair, batched) and wake each
//! other through `Doorbell`s only when the consumer is parked. The outside world
//! reaches a shard through a small bounded mutex-guarded queue per shard: the
//! control path, not the data path (sources run as actors inside the shards).

pub mod directory;
mod executor;
pub mod sched;
pub mod shard;
pub mod sim;
mod small_map;
pub mod stats;
pub mod store;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::actor::{ActorFactory, Outgoing, SchedCtx};
use crate::doorbell::Doorbell;
use crate::ids::{ActorId, ShardId};
use crate::ring;

pub use directory::{Directory, Placement};
pub use sched::PolicyKind;
pub use shard::{External, Packet, ShardConfig, ShardCore};
pub use stats::{Counters, RuntimeStats, ShardReport};
pub use store::{MemoryStateStore, StateStore};

/// How to start a runtime.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Number of shards (one executor thread each).
    pub shards: usize,
    /// Pin shard i to the i-th online core (wrapping if there are more shards).
    pub pin: bool,
    /// Packets one ring holds.
    pub ring_packets: usize,
    /// Requests one shard's external queue holds before `send` waits.
    pub external_requests_max: usize,
    /// Bytes of io_uring registered memory per executor (kept small: the
    /// locked-memory limit is shared by every executor of the process).
    pub io_memory_bytes: usize,
    /// How often a shard looks for idle actors to deactivate.
    pub housekeeping_interval: Duration,
    /// How long a shard that ran out of work polls its inputs before it parks.
    pub spin_before_park: Duration,
    pub shard: ShardConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            shards: online_cores(),
            pin: true,
            ring_packets: 4096,
            external_requests_max: 4096,
            io_memory_bytes: 256 << 10,
            housekeeping_interval: Duration::from_millis(100),
            spin_before_park: Duration::from_micros(50),
            shard: ShardConfig::default(),
        }
    }
}

/// Cores this process may run on.
pub fn online_cores() -> usize {
    core_affinity::get_core_ids()
        .map(|ids| ids.len())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Why a runtime could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// Bounded queue of requests from outside to one shard.
struct ExternalQueue<M> {
    queue: Mutex<VecDeque<External<M>>>,
    len: AtomicUsize,
}

struct Shared<M> {
    external: Vec<ExternalQueue<M>>,
    external_max: usize,
    doorbells: Vec<Arc<Doorbell>>,
    stop: AtomicBool,
}

impl<M> Shared<M> {
    fn push_external(&self, shard: ShardId, request: External<M>) {
        let queue = &self.external[shard.index()];
        let mut request = Some(request);
        let mut backoff_us = 1;
        loop {
            {
                let mut q = queue.queue.lock().expect("external queue lock poisoned");
                if q.len() < self.external_max {
                    q.push_back(request.take().expect("pushed once"));
                    queue.len.store(q.len(), Ordering::Release);
                }
            }
            if request.is_none() {
                self.doorbells[shard.index()].ring();
                return;
            }
            // Back-pressure: the shard has not taken earlier requests yet.
            self.doorbells[shard.index()].ring();
            std::thread::sleep(Duration::from_micros(backoff_us));
            backoff_us = (backoff_us * 2).min(1_000);
        }
    }
}

/// A running runtime.
pub struct Runtime<M: Send + 'static> {
    shared: Arc<Shared<M>>,
    homes: Directory,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl<M: Send + 'static> Runtime<M> {
    pub fn start(
        config: RuntimeConfig,
        factory: Arc<dyn ActorFactory<M>>,
        store: Arc<dyn StateStore>,
    ) -> Result<Self, StartError> {
        if config.shards == 0 || config.shards > 1024 {
            return Err(StartError(format!(
                "a runtime needs 1 to 1024 shards, not {}",
                config.shards
            )));
        }
        let shards = config.shards;
        let shared = Arc::new(Shared {
            external: (0..shards)
                .map(|_| ExternalQueue {
                    queue: Mutex::new(VecDeque::new()),
                    len: AtomicUsize::new(0),
                })
                .collect(),
            external_max: config.external_requests_max.max(1),
            doorbells: (0..shards).map(|_| Arc::new(Doorbell::default())).collect(),
            stop: AtomicBool::new(false),
        });
        // producers[i][j] sends from i to j; consumers[j][i] receives it.
        let mut producers: Vec<Vec<Option<ring::Producer<Packet<M>>>>> = (0..shards)
            .map(|_| (0..shards).map(|_| None).collect())
            .collect();
        let mut consumers: Vec<Vec<Option<ring::Consumer<Packet<M>>>>> = (0..shards)
            .map(|_| (0..shards).map(|_| None).collect())
            .collect();
        for source in 0..shards {
            for target in 0..shards {
                if source != target {
                    let (p, c) = ring::ring(config.ring_packets);
                    producers[source][target] = Some(p);
                    consumers[target][source] = Some(c);
                }
            }
        }
        let cores: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        let mut threads = Vec::with_capacity(shards);
        for (i, (outputs, inputs)) in producers.into_iter().zip(consumers).enumerate() {
            let placement = if config.pin && !cores.is_empty() {
                glommio::Placement::Fixed(cores[i % cores.len()])
            } else {
                glommio::Placement::Unbound
            };
            let shard = executor::ShardThread {
                id: ShardId(i as u16),
                shards: shards as u16,
                config: config.clone(),
                outputs,
                inputs,
                factory: factory.clone(),
                store: store.clone(),
                shared: shared.clone(),
            };
            let handle = glommio::LocalExecutorBuilder::new(placement)
                .name(&format!("dirigo-shard{i}"))
                .io_memory(config.io_memory_bytes)
                .spawn(move || shard.run())
                .map_err(|e| StartError(format!("cannot start shard {i}: {e}")))?;
            threads.push(handle);
        }
        Ok(Runtime {
            shared,
            homes: Directory::new(shards as u16),
            threads,
        })
    }

    pub fn shards(&self) -> usize {
        self.threads.len()
    }

    /// Send from outside. Waits while the receiving shard's queue is full; every
    /// message sent by one thread to one actor arrives in order.
    pub fn send(&self, to: ActorId, message: M, sched: SchedCtx) {
        let out = Outgoing {
            to,
            sched,
            message,
            due_ns: 0,
        };
        self.shared
            .push_external(self.homes.home(to), External::Send(out));
    }

    /// Move an actor to another shard, live.
    pub fn migrate(&self, actor: ActorId, to: ShardId) {
        assert!(to.index() < self.shards(), "{to} out of range");
        self.shared
            .push_external(self.homes.home(actor), External::Migrate { actor, to });
    }

    /// Every shard's accounting.
    pub fn stats(&self) -> RuntimeStats {
        let (reply, replies) = mpsc::channel();
        for shard in 0..self.shards() {
            self.shared
                .push_external(ShardId(shard as u16), External::Report(reply.clone()));
        }
        drop(reply);
        let mut shards: Vec<ShardReport> = replies.iter().collect();
        shards.sort_by_key(|r| r.shard);
        RuntimeStats { shards }
    }

    /// Stop every shard and wait for its thread. Messages still queued are dropped
    /// with their actors: call it once the work is done.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for doorbell in &self.shared.doorbells {
            doorbell.wake_now();
        }
        for handle in self.threads.drain(..) {
            if let Err(e) = handle.join() {
                eprintln!("dirigo: a shard thread ended with an error: {e}");
            }
        }
    }
}

impl<M: Send + 'static> Drop for Runtime<M> {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_and_join();
        }
    }
}
