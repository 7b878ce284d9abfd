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
//!
//! # Supervision
//!
//! A panic in an actor (its `handle`, its factory on activation, the decoding of
//! its saved state, its `snapshot`) is caught on its shard: the actor is removed,
//! the messages queued for it are dropped and their credits returned, and later
//! messages to it are dropped and counted instead of re-activating it; the
//! `RuntimeConfig::on_failure` hook is told (`Failure` names the actor). A panic
//! of the shard itself (a runtime invariant) ends that shard: it is marked dead in
//! `Shared::dead`, the hook is told with `actor: None`, its queued requests are
//! dropped, and from then on `send`/`migrate` toward it return `SendError`, `stats`
//! reports it in `RuntimeStats::dead`, and the other shards drop (and count)
//! packets that no longer fit in their rings toward it. Nothing waits on a dead
//! shard. `retire_job` reclaims everything a failed or finished job holds.
//!
//! # Memory
//!
//! Rings are sized from `ring_bytes_per_shard` (the inbound rings of one shard
//! hold at most that many bytes, capped by `ring_packets` per ring and floored at
//! `RING_PACKETS_MIN`) and allocate their buffer on first use, so a runtime's ring
//! memory is at most `shards * ring_bytes_per_shard` (plus the floor), linear in
//! shards, and only pairs that talk pay for it.

pub mod directory;
mod executor;
pub mod remote;
pub mod sched;
pub mod shard;
pub mod sim;
mod small_map;
pub mod stats;
pub mod store;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::actor::{ActorFactory, Outgoing, SchedCtx};
use crate::doorbell::Doorbell;
use crate::ids::{ActorId, JobId, ShardId};
use crate::ring;

pub use directory::{Directory, Placement};
pub use remote::{RemoteConfig, RemoteNode, RemoteStats, Wire, WireRepr, WireValue};
pub use sched::PolicyKind;
pub use shard::{External, Packet, ShardConfig, ShardCore};
pub use stats::{Counters, RuntimeStats, ShardReport};
pub use store::{MemoryStateStore, StateStore};

thread_local! {
    /// This thread runs a shard's glommio executor.
    static ON_SHARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Tasks of `spawn_io` not finished on this shard.
    static IO_PENDING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether the calling thread is a shard's executor (so `spawn_io` may be
/// called): false under the simulator and on any other thread.
pub fn shard_io_available() -> bool {
    ON_SHARD.with(|on| on.get())
}

/// Run `task` on this shard's executor beside the actors: file I/O through
/// glommio's io_uring that an actor must not wait for (a checkpoint's chunk
/// write). The shard yields to such tasks between passes while any is
/// pending. Only on a shard (see `shard_io_available`).
pub fn spawn_io(task: impl std::future::Future<Output = ()> + 'static) {
    assert!(shard_io_available(), "spawn_io off a shard's executor");
    IO_PENDING.with(|n| n.set(n.get() + 1));
    glommio::spawn_local(async move {
        task.await;
        IO_PENDING.with(|n| n.set(n.get() - 1));
    })
    .detach();
}

/// `spawn_io` tasks not finished on this shard.
pub(crate) fn io_pending() -> u32 {
    IO_PENDING.with(|n| n.get())
}

/// What every shard runs between passes; see [`set_upkeep_hook`].
static UPKEEP_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// The least time between two runs of the upkeep hook on one shard.
pub const UPKEEP_EVERY: Duration = Duration::from_millis(1);

/// Set, once for the process, what every shard runs between two passes (at
/// most every [`UPKEEP_EVERY`], whether the passes ran turns or not; never
/// inside an actor's turn, and not while the shard is parked): upkeep of the process's own whose cost grows when it is put off.
/// (The binary sets none: mimalloc's collection of a heap, which it ran
/// here every millisecond, took up to 43 ms at a time; see `src/main.rs`.)
/// False if a hook was set already.
pub fn set_upkeep_hook(hook: fn()) -> bool {
    UPKEEP_HOOK.set(hook).is_ok()
}

pub(crate) fn upkeep_hook() -> Option<fn()> {
    UPKEEP_HOOK.get().copied()
}

pub(crate) fn enter_shard() {
    ON_SHARD.with(|on| on.set(true));
}

/// What the failure hook is told: an actor that panicked (`actor: Some`), or a
/// shard that died (`actor: None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub actor: Option<ActorId>,
    pub shard: ShardId,
    /// The panic payload as text (`&str` or `String` payloads; otherwise
    /// "non-string panic payload").
    pub message: String,
}

/// Called on the failing shard's thread for every failure; it must be cheap and
/// must not block (record the error and return).
pub type FailureHook = Arc<dyn Fn(Failure) + Send + Sync>;

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Packets a ring holds at least, whatever `ring_bytes_per_shard` says.
pub const RING_PACKETS_MIN: usize = 64;

/// How long `stats` waits for the shards' reports before it calls the missing
/// ones dead (a live shard answers between two turns, well within it).
const STATS_WAIT_MAX: Duration = Duration::from_secs(10);

/// How long `start` waits for every shard to come up.
const START_WAIT_MAX: Duration = Duration::from_secs(60);

/// How to start a runtime.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// Number of shards (one executor thread each).
    pub shards: usize,
    /// Allow more shards than online cores (they then share cores; for tests and
    /// experiments, not for throughput). `start` refuses it otherwise.
    pub oversubscribe: bool,
    /// Pin shard i to the i-th online core (wrapping if there are more shards).
    pub pin: bool,
    /// Packets one ring holds at most.
    pub ring_packets: usize,
    /// Bytes the inbound rings of one shard may hold together: a ring holds
    /// `min(ring_packets, ring_bytes_per_shard / (shards - 1) / packet size)`
    /// packets (a power of two, at least `RING_PACKETS_MIN`).
    pub ring_bytes_per_shard: usize,
    /// Requests one shard's external queue holds before `send` waits.
    pub external_requests_max: usize,
    /// Bytes of io_uring registered memory per executor (kept small: the
    /// locked-memory limit is shared by every executor of the process).
    pub io_memory_bytes: usize,
    /// How often a shard looks for idle actors to deactivate.
    pub housekeeping_interval: Duration,
    /// How long a shard that ran out of work polls its inputs before it
    /// parks, while the machine has a spare core (`executor::SpareCores`:
    /// no more threads runnable on the machine than its online cores);
    /// otherwise it parks at once,
    /// as a spin would only take the core from a thread with work.
    pub spin_before_park: Duration,
    pub shard: ShardConfig,
    /// Told about every actor panic and every shard death (see `Failure`).
    pub on_failure: Option<FailureHook>,
    /// Tests only: this shard gives up before its loop starts, as one whose
    /// executor could not be set up would.
    #[doc(hidden)]
    pub fail_start_of_shard_for_test: Option<usize>,
}

impl std::fmt::Debug for RuntimeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeConfig")
            .field("shards", &self.shards)
            .field("oversubscribe", &self.oversubscribe)
            .field("pin", &self.pin)
            .field("ring_packets", &self.ring_packets)
            .field("ring_bytes_per_shard", &self.ring_bytes_per_shard)
            .field("external_requests_max", &self.external_requests_max)
            .field("io_memory_bytes", &self.io_memory_bytes)
            .field("housekeeping_interval", &self.housekeeping_interval)
            .field("spin_before_park", &self.spin_before_park)
            .field("shard", &self.shard)
            .field(
                "on_failure",
                &self.on_failure.as_ref().map(|_| "Fn(Failure)"),
            )
            .finish()
    }
}

impl RuntimeConfig {
    /// Packets one ring holds for this many shards and this packet size.
    pub fn ring_capacity(&self, packet_bytes: usize) -> usize {
        let peers = self.shards.saturating_sub(1).max(1);
        let budget = self.ring_bytes_per_shard / peers / packet_bytes.max(1);
        let floor_pow2 = match budget {
            0 => 0,
            n => 1usize << n.ilog2(),
        };
        floor_pow2
            .min(self.ring_packets.min(ring::CAPACITY_ITEMS_MAX))
            .max(RING_PACKETS_MIN)
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            shards: online_cores(),
            oversubscribe: false,
            pin: true,
            ring_packets: 4096,
            ring_bytes_per_shard: 4 << 20,
            external_requests_max: 4096,
            io_memory_bytes: 256 << 10,
            housekeeping_interval: Duration::from_millis(100),
            spin_before_park: Duration::from_micros(50),
            shard: ShardConfig::default(),
            on_failure: None,
            fail_start_of_shard_for_test: None,
        }
    }
}

/// Cores the calling thread may run on (on a pinned shard's thread, its
/// one core).
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

/// Why a request from outside could not be queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// The shard that should take it has died (see `Failure`).
    ShardDead(ShardId),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::ShardDead(shard) => write!(f, "{shard} has died"),
        }
    }
}

impl std::error::Error for SendError {}

/// Bounded queue of requests from outside to one shard.
struct ExternalQueue<M> {
    queue: Mutex<VecDeque<External<M>>>,
    len: AtomicUsize,
}

impl<M> ExternalQueue<M> {
    /// The queue, even if a shard panicked while holding it (a dead shard's
    /// queue is only ever cleared after that).
    fn lock(&self) -> MutexGuard<'_, VecDeque<External<M>>> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Shared<M> {
    /// Which shards of the run are this process's (all of them without a
    /// remote config).
    layout: remote::Layout,
    /// Per local shard (indexed by `layout.local_index`).
    external: Vec<ExternalQueue<M>>,
    external_max: usize,
    /// Per shard of the run: a local shard's own, the gateway's for every
    /// shard of another node (what a flush toward it wakes).
    doorbells: Vec<Arc<Doorbell>>,
    stop: AtomicBool,
    /// Per local shard: set once by a shard whose thread panicked outside
    /// actor code; read on the control path and when a ring toward that
    /// shard is full, never per message.
    dead: Vec<AtomicBool>,
}

impl<M> Shared<M> {
    /// Whether a local shard has died; a shard of another node is never
    /// called dead here (the gateway holds what is sent to it).
    fn is_dead(&self, shard: ShardId) -> bool {
        self.layout
            .local_index(shard)
            .is_some_and(|i| self.dead[i].load(Ordering::Acquire))
    }

    /// Mark `shard` dead and drop its queued requests (their reply channels close,
    /// so no one waits for them). The flag is set before the queue is locked and
    /// `push_external` reads it under the lock: a request is either dropped here or
    /// refused there, never left behind.
    fn mark_dead(&self, shard: ShardId) {
        let Some(local) = self.layout.local_index(shard) else {
            return;
        };
        self.dead[local].store(true, Ordering::SeqCst);
        let queue = &self.external[local];
        let dropped = std::mem::take(&mut *queue.lock());
        queue.len.store(0, Ordering::Release);
        drop(dropped);
    }

    fn push_external(&self, shard: ShardId, request: External<M>) -> Result<(), SendError> {
        // Callers pick this node's shards (`Runtime::entry_shard`).
        let local = self
            .layout
            .local_index(shard)
            .expect("requests from outside go to this node's shards");
        let queue = &self.external[local];
        let mut request = Some(request);
        let mut backoff_us = 1;
        loop {
            {
                let mut q = queue.lock();
                if self.is_dead(shard) {
                    return Err(SendError::ShardDead(shard));
                }
                if q.len() < self.external_max {
                    q.push_back(request.take().expect("pushed once"));
                    queue.len.store(q.len(), Ordering::Release);
                }
            }
            if request.is_none() {
                self.doorbells[shard.index()].ring();
                return Ok(());
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
    remote: Option<Arc<RemoteStats>>,
}

/// What `Runtime::start_with` needs of a gateway: a way to make it on the
/// rings made for it (built where `M: Wire` is known).
type StartGateway<M> =
    Box<dyn FnOnce(remote::GatewayParts<M>) -> Result<remote::GatewayTask, String>>;

impl<M: Send + 'static> Runtime<M> {
    /// Start every shard and wait until each runs. If one cannot start, the ones
    /// already started are stopped and joined before the error returns.
    pub fn start(
        config: RuntimeConfig,
        factory: Arc<dyn ActorFactory<M>>,
        store: Arc<dyn StateStore>,
    ) -> Result<Self, StartError> {
        let layout = remote::Layout::single(config.shards);
        Self::start_with(config, layout, None, factory, store)
    }

    /// Start this node's part of a run that spans several nodes (see
    /// `remote`): `config.shards` must be what `remote.nodes` gives this
    /// node. Actors are named across the whole run: a send to an actor
    /// placed on another node's shard goes through this node's gateway.
    pub fn start_remote(
        config: RuntimeConfig,
        remote: RemoteConfig,
        factory: Arc<dyn ActorFactory<M>>,
        store: Arc<dyn StateStore>,
    ) -> Result<Self, StartError>
    where
        M: Wire,
    {
        let layout = remote::Layout::of(&remote.nodes, remote.me).map_err(StartError)?;
        if usize::from(layout.local) != config.shards {
            return Err(StartError(format!(
                "node {} of the run has {} shards, not {}",
                remote.me, layout.local, config.shards
            )));
        }
        let stats = Arc::new(RemoteStats::new(remote.nodes.len(), remote.me));
        let gateway_stats = stats.clone();
        let start_gateway: StartGateway<M> =
            Box::new(move |parts| remote::gateway_task(remote, parts, gateway_stats));
        let mut runtime = Self::start_with(config, layout, Some(start_gateway), factory, store)?;
        runtime.remote = Some(stats);
        Ok(runtime)
    }

    fn start_with(
        config: RuntimeConfig,
        layout: remote::Layout,
        start_gateway: Option<StartGateway<M>>,
        factory: Arc<dyn ActorFactory<M>>,
        store: Arc<dyn StateStore>,
    ) -> Result<Self, StartError> {
        if config.shards == 0 || config.shards > 1024 {
            return Err(StartError(format!(
                "a runtime needs 1 to 1024 shards, not {}",
                config.shards
            )));
        }
        let cores_online = online_cores();
        // Read here, before any shard thread is pinned to one of them.
        let machine_cores = executor::machine_cores().unwrap_or(cores_online);
        if config.shards > cores_online && !config.oversubscribe {
            return Err(StartError(format!(
                "{} shards but only {cores_online} cores online: one shard per core, or \
                 pass --oversubscribe (RuntimeConfig::oversubscribe) to share cores",
                config.shards
            )));
        }
        let shards = config.shards;
        let total = usize::from(layout.total());
        let first = usize::from(layout.first);
        let gateway_doorbell = Arc::new(Doorbell::default());
        let shared = Arc::new(Shared {
            layout: layout.clone(),
            external: (0..shards)
                .map(|_| ExternalQueue {
                    queue: Mutex::new(VecDeque::new()),
                    len: AtomicUsize::new(0),
                })
                .collect(),
            external_max: config.external_requests_max.max(1),
            doorbells: (0..total)
                .map(|s| match layout.local_index(ShardId(s as u16)) {
                    Some(_) => Arc::new(Doorbell::default()),
                    None => gateway_doorbell.clone(),
                })
                .collect(),
            stop: AtomicBool::new(false),
            dead: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        });
        // Rings are sized for every shard of the run that may send to one.
        let sizing = RuntimeConfig {
            shards: total,
            ..config.clone()
        };
        let capacity = sizing.ring_capacity(std::mem::size_of::<Packet<M>>());
        // For local shard i (global id first + i), outputs[i][t] sends to
        // global shard t and inputs[i][s] receives from global shard s; a
        // ring to or from another node's shard has the gateway at its other end.
        let mut outputs: Vec<Vec<Option<ring::Producer<Packet<M>>>>> = (0..shards)
            .map(|_| (0..total).map(|_| None).collect())
            .collect();
        let mut inputs: Vec<Vec<Option<ring::Consumer<Packet<M>>>>> = (0..shards)
            .map(|_| (0..total).map(|_| None).collect())
            .collect();
        let mut parts = remote::GatewayParts {
            layout: layout.clone(),
            outbound: Vec::new(),
            inbound: Vec::new(),
            shared_stop: shared.clone(),
            doorbell: gateway_doorbell,
            on_failure: config.on_failure.clone(),
            ready: None,
        };
        for source in 0..shards {
            for target in 0..total {
                let global_source = first + source;
                if global_source == target {
                    continue;
                }
                let (p, c) = ring::ring(capacity);
                match layout.local_index(ShardId(target as u16)) {
                    Some(local_target) => {
                        outputs[source][target] = Some(p);
                        inputs[local_target][global_source] = Some(c);
                    }
                    None => {
                        outputs[source][target] = Some(p);
                        parts.outbound.push((
                            ShardId(global_source as u16),
                            ShardId(target as u16),
                            c,
                        ));
                        // And the way back, from that shard to this one.
                        let (p, c) = ring::ring(capacity);
                        inputs[source][target] = Some(c);
                        parts.inbound.push((
                            ShardId(target as u16),
                            ShardId(global_source as u16),
                            p,
                        ));
                    }
                }
            }
        }
        let cores: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        let (ready, readies) = mpsc::channel();
        let mut expected = shards;
        let mut gateway = match start_gateway {
            Some(start_gateway) => {
                parts.ready = Some(executor::ReadyGuard::new(shards, ready.clone()));
                expected += 1;
                let task = start_gateway(parts)
                    .map_err(|e| StartError(format!("cannot start the gateway: {e}")))?;
                Some(task)
            }
            None => None,
        };
        // A node of one shard runs its gateway's tasks on that shard's
        // executor: one thread, where two would take turns on its core
        // (and wake each other through the kernel at every handoff).
        let gateway_on_shard = shards == 1 && gateway.is_some();
        let mut runtime = Runtime {
            shared: shared.clone(),
            homes: Directory::new(total as u16),
            threads: Vec::with_capacity(shards + 1),
            remote: None,
        };
        for (i, (outputs, inputs)) in outputs.into_iter().zip(inputs).enumerate() {
            let placement = if config.pin && !cores.is_empty() {
                glommio::Placement::Fixed(cores[i % cores.len()])
            } else {
                glommio::Placement::Unbound
            };
            let shard = executor::ShardThread {
                gateway: if gateway_on_shard {
                    gateway.take()
                } else {
                    None
                },
                id: ShardId((first + i) as u16),
                local: i,
                layout: layout.clone(),
                config: config.clone(),
                outputs,
                inputs,
                factory: factory.clone(),
                store: store.clone(),
                shared: shared.clone(),
                ready: executor::ReadyGuard::new(i, ready.clone()),
                machine_cores,
            };
            let spawned = glommio::LocalExecutorBuilder::new(placement)
                .name(&format!("dirigo-shard{}", first + i))
                .io_memory(config.io_memory_bytes)
                .spawn(move || shard.run_supervised());
            match spawned {
                Ok(handle) => runtime.threads.push(handle),
                Err(e) => {
                    let errors = runtime.stop_and_join();
                    return Err(StartError(format!("cannot start shard {i}: {e}{errors}")));
                }
            }
        }
        if let Some(task) = gateway {
            match remote::start_gateway(task) {
                Ok(handle) => runtime.threads.push(handle),
                Err(e) => {
                    let errors = runtime.stop_and_join();
                    return Err(StartError(format!("cannot start the gateway: {e}{errors}")));
                }
            }
        }
        drop(ready);
        // Every shard says whether it came up; one that failed inside its thread
        // (the executor could not be built) says no when its closure is dropped.
        let deadline = Instant::now() + START_WAIT_MAX;
        for _ in 0..expected {
            let wait = deadline.saturating_duration_since(Instant::now());
            let failed = match readies.recv_timeout(wait) {
                Ok((_, true)) => continue,
                Ok((shard, false)) if shard == shards => "the gateway failed to start".to_string(),
                Ok((shard, false)) => format!("shard {shard} of {shards} failed to start"),
                Err(_) => format!("a shard of {shards} did not start within {START_WAIT_MAX:?}"),
            };
            let errors = runtime.stop_and_join();
            return Err(StartError(format!("{failed}{errors}")));
        }
        Ok(runtime)
    }

    /// The shards of this process.
    pub fn shards(&self) -> usize {
        self.shared.external.len()
    }

    /// The global id of this process's first shard (0 unless the run spans
    /// nodes: its shards are `first_shard()..first_shard() + shards()`).
    pub fn first_shard(&self) -> ShardId {
        ShardId(self.shared.layout.first)
    }

    /// Every shard of the run, on every node.
    pub fn total_shards(&self) -> usize {
        usize::from(self.shared.layout.total())
    }

    /// This process's shards, by global id.
    fn local_shards(&self) -> impl Iterator<Item = ShardId> {
        let first = self.shared.layout.first;
        (0..self.shards() as u16).map(move |i| ShardId(first + i))
    }

    /// The gateway's counts, for a run that spans nodes.
    pub fn remote_stats(&self) -> Option<remote::RemoteSnapshot> {
        self.remote.as_ref().map(|stats| stats.snapshot())
    }

    /// Send from outside. Waits while the receiving shard's queue is full; every
    /// message sent by one thread to one actor arrives in order. Fails if the
    /// shard that takes it has died; a message for a retired job is dropped there.
    pub fn send(&self, to: ActorId, message: M, sched: SchedCtx) -> Result<(), SendError> {
        let out = Outgoing {
            to,
            sched,
            message,
            due_ns: 0,
            uncredited: false,
        };
        self.shared
            .push_external(self.entry_shard(to), External::Send(out))
    }

    /// The shard that takes a request from outside about `actor`: its home,
    /// or, for an actor homed on another node, one local shard chosen by
    /// the home (always the same one, so that one thread's messages to one
    /// actor keep their order), which routes it on.
    fn entry_shard(&self, actor: ActorId) -> ShardId {
        let home = self.homes.home(actor);
        let layout = &self.shared.layout;
        if layout.local_index(home).is_some() {
            home
        } else {
            ShardId(layout.first + home.0 % layout.local)
        }
    }

    /// Move an actor to another shard, live. Fails if either shard has died
    /// (as far as this node knows: a shard of another node is never called
    /// dead here). In a run that spans nodes, `to` may be any shard of the
    /// run: the request reaches the actor's owner, wherever it is, and an
    /// actor moving to another node goes by value (see `runtime::remote`;
    /// refused, and counted in `ShardReport::migrations_refused`, while the
    /// actor says it may not be deactivated).
    pub fn migrate(&self, actor: ActorId, to: ShardId) -> Result<(), SendError> {
        assert!(to.index() < self.total_shards(), "{to} out of range");
        if self.shared.is_dead(to) {
            return Err(SendError::ShardDead(to));
        }
        self.shared
            .push_external(self.entry_shard(actor), External::Migrate { actor, to })
    }

    /// Deactivate now every idle actor of `job` (empty mailbox, nothing in
    /// flight, willing: `Actor::may_deactivate`) on every live shard, its
    /// state saved to the store, as the idle timeout would: scale to zero.
    /// Does not wait; an actor that is busy stays.
    pub fn deactivate_job(&self, job: JobId) {
        for shard in self.local_shards() {
            if !self.is_dead(shard) {
                // A shard that died since is nothing to deactivate.
                let _ = self
                    .shared
                    .push_external(shard, External::DeactivateJob(job));
            }
        }
    }

    /// Drop every actor of `job` on every live shard (active or saved, with its
    /// mailbox, timers, blocked sends and channel tables), and every message for
    /// it that arrives later. For a failed job and for a finished one alike.
    ///
    /// Returns once every live shard has retired it (then no shard will activate
    /// any of its actors again, whatever is still in flight), or, `false`, when a
    /// shard did not confirm within `STATS_WAIT_MAX`.
    pub fn retire_job(&self, job: JobId) -> bool {
        let confirmed = self.ask_every_shard(|done| External::RetireJob(job, done));
        // A dead shard holds nothing any more.
        self.local_shards()
            .all(|shard| confirmed.contains(&shard) || self.is_dead(shard))
    }

    /// Make `shard` panic outside actor code, as a broken runtime invariant would.
    #[doc(hidden)]
    pub fn crash_shard_for_test(&self, shard: ShardId) -> Result<(), SendError> {
        self.shared.push_external(shard, External::Crash)
    }

    /// Every live shard's accounting. Returns within `STATS_WAIT_MAX` whatever
    /// happens: a shard that is dead or does not answer is listed in `dead`.
    pub fn stats(&self) -> RuntimeStats {
        let mut shards = self.ask_every_shard(External::Report);
        shards.sort_by_key(|r| r.shard);
        let dead = self
            .local_shards()
            .filter(|id| !shards.iter().any(|r| r.shard == *id))
            .collect();
        RuntimeStats { shards, dead }
    }

    /// Queue `request(reply)` to every shard and collect the replies of those that
    /// answer within `STATS_WAIT_MAX` (a dead shard drops its reply channel).
    fn ask_every_shard<T>(&self, request: impl Fn(mpsc::Sender<T>) -> External<M>) -> Vec<T> {
        let (reply, replies) = mpsc::channel();
        for shard in self.local_shards() {
            // A dead shard is found missing by the caller.
            let _ = self.shared.push_external(shard, request(reply.clone()));
        }
        drop(reply);
        let deadline = Instant::now() + STATS_WAIT_MAX;
        let mut answers = Vec::with_capacity(self.shards());
        while answers.len() < self.shards() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match replies.recv_timeout(wait) {
                Ok(answer) => answers.push(answer),
                // Every reply channel is gone (dead shards dropped theirs), or time is up.
                Err(_) => break,
            }
        }
        answers
    }

    /// Whether `shard` has died.
    pub fn is_dead(&self, shard: ShardId) -> bool {
        self.shared.is_dead(shard)
    }

    /// Stop every shard and wait for its thread. Messages still queued are dropped
    /// with their actors: call it once the work is done.
    pub fn shutdown(mut self) {
        let errors = self.stop_and_join();
        if !errors.is_empty() {
            eprintln!("dirigo: shard threads ended with errors{errors}");
        }
    }

    /// Stop and join every shard thread; the errors they ended with, as text.
    fn stop_and_join(&mut self) -> String {
        self.shared.stop.store(true, Ordering::SeqCst);
        for doorbell in &self.shared.doorbells {
            doorbell.wake_now();
        }
        let mut errors = String::new();
        for handle in self.threads.drain(..) {
            if let Err(e) = handle.join() {
                errors.push_str(&format!("; {e}"));
            }
        }
        errors
    }
}

impl<M: Send + 'static> Drop for Runtime<M> {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            let errors = self.stop_and_join();
            if !errors.is_empty() {
                eprintln!("dirigo: shard threads ended with errors{errors}");
            }
        }
    }
}
