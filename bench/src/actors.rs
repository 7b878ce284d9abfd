//! `dirigo bench actors`: how many messages a second the actor runtime moves
//! between two actors, and how that compares with the raw channel between the
//! same two cores doing the same work.
//!
//! Five measurements, each the median of `runs`:
//!
//! - **local**: sender and receiver on one shard (a one-shard runtime). The sender,
//!   on each `Tick`, sends `sends_per_tick` messages of one `u64` to the receiver,
//!   then a `Tick` to itself; the receiver counts. This is the cost of a send,
//!   a mailbox and a turn, with no other core involved.
//! - **cross-shard**: the same on a two-shard runtime, sender on shard 0 and
//!   receiver on shard 1 (partitions chosen so that `Directory::home` puts them
//!   there): every message crosses the ring, with credits and acknowledgements.
//! - **cross-shard batched**: the same, but each message carries a `Vec<u64>` of
//!   [`BATCH_PAYLOADS`] payloads, as the dataflow sends events; counted per
//!   payload.
//! - **raw mesh**: the baseline of the unbatched figures. glommio's channel mesh
//!   (`MeshBuilder::full`) between two executors pinned to the same two cores,
//!   one `u64` per `send_to(...).await` / `recv_from(...).await`: no actors, no
//!   credits, no scheduling.
//! - **raw mesh batched**: the baseline of the batched figure: the same mesh
//!   carrying the same messages as cross-shard batched (a freshly allocated
//!   `Vec<u64>` of [`BATCH_PAYLOADS`] payloads each), counted per payload. So
//!   `cross_shard_batched_ratio` compares equal batching: what the runtime costs
//!   per payload over the bare channel, not what batching saves.
//!
//! A measurement runs from the moment the first `Tick` is sent (the runtime is
//! already started) until the receiver has counted `messages`. The receiver sums
//! the payloads, and the sum is checked, so a figure is never produced from a run
//! that lost or duplicated payloads.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use dirigo_engine::runtime::{Directory, MemoryStateStore, RuntimeConfig, ShardConfig};
use dirigo_engine::{Actor, ActorId, BoxActor, Context, JobId, Runtime, SchedCtx, ShardId};

use crate::machine::Machine;
use crate::{median, progress, BenchError};

/// Payloads per message in the batched measurement.
pub const BATCH_PAYLOADS: usize = 64;

const JOB: JobId = JobId(1);
const SENDER_OPERATOR: u32 = 1;
const RECEIVER_OPERATOR: u32 = 2;

#[derive(Clone, Debug)]
pub struct Config {
    /// Payloads the receiver must count in each measurement (the batched one
    /// rounds up to a whole number of batches).
    pub messages: u64,
    /// Measurements per figure; the figure is their median.
    pub runs: usize,
    /// Messages the sender sends per `Tick`.
    pub sends_per_tick: u32,
    /// Capacity of each channel of the raw mesh, in messages.
    pub mesh_channel_messages: usize,
    /// A measurement that has not finished after this long is an error.
    pub measurement_time_max: Duration,
    /// Print progress to stderr.
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            messages: 20_000_000,
            runs: 3,
            sends_per_tick: 64,
            mesh_channel_messages: 4096,
            measurement_time_max: Duration::from_secs(300),
            progress: true,
        }
    }
}

/// Every measurement, in messages per second, in the order they ran.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Samples {
    pub local: Vec<f64>,
    pub cross_shard: Vec<f64>,
    pub cross_shard_batched: Vec<f64>,
    pub raw_mesh: Vec<f64>,
    pub raw_mesh_batched: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub cores: usize,
    pub messages: u64,
    pub runs: usize,
    pub sends_per_tick: u32,
    pub batch_payloads: usize,
    pub local_msgs_per_s: f64,
    pub cross_shard_msgs_per_s: f64,
    pub cross_shard_batched_msgs_per_s: f64,
    pub raw_mesh_msgs_per_s: f64,
    /// Payloads per second over the mesh in batches of `batch_payloads`.
    pub raw_mesh_batched_msgs_per_s: f64,
    /// cross-shard / raw mesh (one payload per message both).
    pub cross_shard_ratio: f64,
    /// cross-shard batched / raw mesh batched (`batch_payloads` per message both).
    pub cross_shard_batched_ratio: f64,
    pub samples: Samples,
}

/// Run every measurement `config.runs` times, interleaved (local, cross,
/// batched, mesh, mesh batched, local, ...) so that a slow spell of a shared
/// machine spreads over all five figures instead of sinking one.
pub fn run(config: &Config) -> Result<Report, BenchError> {
    if config.messages == 0 || config.runs == 0 || config.sends_per_tick == 0 {
        return Err(BenchError(
            "messages, runs and sends per tick must be at least 1".to_string(),
        ));
    }
    let machine = Machine::detect();
    let mut samples = Samples::default();
    for run in 1..=config.runs {
        let measurements: [(&str, Shape, &mut Vec<f64>); 5] = [
            ("local", Shape::Local, &mut samples.local),
            ("cross-shard", Shape::CrossShard, &mut samples.cross_shard),
            (
                "cross-shard batched",
                Shape::CrossShardBatched,
                &mut samples.cross_shard_batched,
            ),
            ("raw mesh", Shape::RawMesh, &mut samples.raw_mesh),
            (
                "raw mesh batched",
                Shape::RawMeshBatched,
                &mut samples.raw_mesh_batched,
            ),
        ];
        for (name, shape, into) in measurements {
            let rate = match shape {
                Shape::RawMesh => measure_mesh::<u64>(config)?,
                Shape::RawMeshBatched => measure_mesh::<Vec<u64>>(config)?,
                shape => measure_actors(config, shape)?,
            };
            progress(
                config.progress,
                format_args!(
                    "actors: run {run}/{}: {name}: {:.2} M msgs/s",
                    config.runs,
                    rate / 1e6
                ),
            );
            into.push(rate);
        }
    }
    let local = median(&samples.local);
    let cross = median(&samples.cross_shard);
    let batched = median(&samples.cross_shard_batched);
    let mesh = median(&samples.raw_mesh);
    let mesh_batched = median(&samples.raw_mesh_batched);
    Ok(Report {
        machine: machine.machine,
        cores: machine.cores,
        messages: config.messages,
        runs: config.runs,
        sends_per_tick: config.sends_per_tick,
        batch_payloads: BATCH_PAYLOADS,
        local_msgs_per_s: local,
        cross_shard_msgs_per_s: cross,
        cross_shard_batched_msgs_per_s: batched,
        raw_mesh_msgs_per_s: mesh,
        raw_mesh_batched_msgs_per_s: mesh_batched,
        cross_shard_ratio: cross / mesh,
        cross_shard_batched_ratio: batched / mesh_batched,
        samples,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Local,
    CrossShard,
    CrossShardBatched,
    RawMesh,
    RawMeshBatched,
}

// ---- the actor measurements -------------------------------------------------

/// The bench's message type.
#[derive(Debug)]
pub enum Msg {
    /// The sender: send the next `sends_per_tick` messages.
    Tick,
    One(u64),
    Batch(Vec<u64>),
}

struct Sender {
    to: ActorId,
    batched: bool,
    sends_per_tick: u32,
    /// Payloads sent so far and in all.
    sent: u64,
    total: u64,
}

impl Actor for Sender {
    type Message = Msg;
    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }

    fn handle(&mut self, message: Msg, ctx: &mut Context<'_, Msg>) {
        debug_assert!(matches!(message, Msg::Tick), "sender got {message:?}");
        for _ in 0..self.sends_per_tick {
            if self.sent >= self.total {
                return;
            }
            if self.batched {
                let first = self.sent;
                let batch: Vec<u64> = (first..first + BATCH_PAYLOADS as u64).collect();
                ctx.send(self.to, Msg::Batch(batch));
                self.sent += BATCH_PAYLOADS as u64;
            } else {
                ctx.send(self.to, Msg::One(self.sent));
                self.sent += 1;
            }
        }
        if self.sent < self.total {
            ctx.send(ctx.me(), Msg::Tick);
        }
    }
}

/// When the receiver counted its last payload, and the sum of all payloads.
type Finish = OnceLock<(Instant, u64)>;

struct Receiver {
    received: u64,
    expected: u64,
    sum: u64,
    finish: Arc<Finish>,
}

impl Actor for Receiver {
    type Message = Msg;
    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }

    fn handle(&mut self, message: Msg, _ctx: &mut Context<'_, Msg>) {
        match message {
            Msg::One(payload) => {
                self.received += 1;
                self.sum = self.sum.wrapping_add(payload);
            }
            Msg::Batch(payloads) => {
                self.received += payloads.len() as u64;
                self.sum = payloads
                    .iter()
                    .fold(self.sum, |sum, &payload| sum.wrapping_add(payload));
            }
            Msg::Tick => panic!("the receiver got a tick"),
        }
        if self.received == self.expected {
            // Set once: the expected count is reached exactly once.
            let _ = self.finish.set((Instant::now(), self.sum));
        }
    }
}

fn sched() -> SchedCtx {
    SchedCtx {
        job: JOB,
        deadline_ns: u64::MAX,
        origin_ns: 0,
    }
}

/// The first partition of `operator` whose home is `shard`.
pub(crate) fn partition_on(job: JobId, operator: u32, shard: ShardId, shards: usize) -> ActorId {
    let directory = Directory::new(shards as u16);
    (0..=u32::MAX)
        .map(|partition| ActorId::new(job, operator, partition))
        .find(|&id| directory.home(id) == shard)
        .expect("consecutive partitions cover every shard")
}

/// The runtime configuration of every bench: defaults, pinned, small io_uring
/// memory, and no deactivation while a measurement runs.
pub(crate) fn runtime_config(shards: usize) -> RuntimeConfig {
    RuntimeConfig {
        shards,
        pin: true,
        shard: ShardConfig {
            idle_timeout_ns: None,
            ..ShardConfig::default()
        },
        ..RuntimeConfig::default()
    }
}

fn measure_actors(config: &Config, shape: Shape) -> Result<f64, BenchError> {
    let (shards, batched) = match shape {
        Shape::Local => (1, false),
        Shape::CrossShard => (2, false),
        Shape::CrossShardBatched => (2, true),
        Shape::RawMesh | Shape::RawMeshBatched => unreachable!("the mesh has no actors"),
    };
    let total = if batched {
        whole_batches(config.messages)
    } else {
        config.messages
    };
    let sender = partition_on(JOB, SENDER_OPERATOR, ShardId(0), shards);
    let receiver = partition_on(JOB, RECEIVER_OPERATOR, ShardId(shards as u16 - 1), shards);
    let finish: Arc<Finish> = Arc::new(OnceLock::new());
    let sends_per_tick = config.sends_per_tick;
    let finish_for_factory = finish.clone();
    let factory = move |id: ActorId, _state: Option<&[u8]>| -> BoxActor<Msg> {
        match id.operator {
            SENDER_OPERATOR => Box::new(Sender {
                to: receiver,
                batched,
                sends_per_tick,
                sent: 0,
                total,
            }),
            RECEIVER_OPERATOR => Box::new(Receiver {
                received: 0,
                expected: total,
                sum: 0,
                finish: finish_for_factory.clone(),
            }),
            other => panic!("the actors bench has no operator {other}"),
        }
    };
    let runtime = Runtime::start(
        runtime_config(shards),
        Arc::new(factory),
        Arc::new(MemoryStateStore::default()),
    )
    .map_err(|e| BenchError(format!("cannot start a {shards}-shard runtime: {e}")))?;
    let start = Instant::now();
    runtime
        .send(sender, Msg::Tick, sched())
        .map_err(|e| BenchError(e.to_string()))?;
    let finished = wait_for(&finish, start, config.measurement_time_max);
    runtime.shutdown();
    let Some((end, sum)) = finished else {
        return Err(BenchError(format!(
            "the receiver did not count {total} messages within {:?}",
            config.measurement_time_max
        )));
    };
    check_sum(sum, total)?;
    Ok(total as f64 / end.duration_since(start).as_secs_f64())
}

/// `payloads` rounded up to a whole number of batches.
fn whole_batches(payloads: u64) -> u64 {
    payloads.div_ceil(BATCH_PAYLOADS as u64) * BATCH_PAYLOADS as u64
}

fn wait_for(finish: &Finish, start: Instant, limit: Duration) -> Option<(Instant, u64)> {
    loop {
        if let Some(&finished) = finish.get() {
            return Some(finished);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The payloads are 0..total, each once: their sum is known.
fn check_sum(sum: u64, total: u64) -> Result<(), BenchError> {
    let expected = ((total as u128 * (total as u128).saturating_sub(1)) / 2) as u64;
    if sum == expected {
        Ok(())
    } else {
        Err(BenchError(format!(
            "payloads lost or duplicated: their sum is {sum}, not {expected}"
        )))
    }
}

// ---- the baseline -----------------------------------------------------------

/// What one message of the mesh carries: one payload, or a batch of
/// [`BATCH_PAYLOADS`] built the way the batched sender actor builds its batches.
trait MeshMessage: Send + Sized + 'static {
    /// Payloads per message.
    const PAYLOADS: u64;
    /// The message whose payloads start at `first`.
    fn starting_at(first: u64) -> Self;
    /// `sum` plus the message's payloads, wrapping.
    fn add_to(&self, sum: u64) -> u64;
}

impl MeshMessage for u64 {
    const PAYLOADS: u64 = 1;
    fn starting_at(first: u64) -> Self {
        first
    }
    fn add_to(&self, sum: u64) -> u64 {
        sum.wrapping_add(*self)
    }
}

impl MeshMessage for Vec<u64> {
    const PAYLOADS: u64 = BATCH_PAYLOADS as u64;
    fn starting_at(first: u64) -> Self {
        (first..first + Self::PAYLOADS).collect()
    }
    fn add_to(&self, sum: u64) -> u64 {
        self.iter()
            .fold(sum, |sum, &payload| sum.wrapping_add(payload))
    }
}

/// glommio's channel mesh between two executors pinned like a two-shard
/// runtime's shards, one `T` per send; payloads per second.
fn measure_mesh<T: MeshMessage>(config: &Config) -> Result<f64, BenchError> {
    use glommio::channels::channel_mesh::MeshBuilder;

    let total = match T::PAYLOADS {
        1 => config.messages,
        _ => whole_batches(config.messages),
    };
    let mesh = MeshBuilder::<T, _>::full(2, config.mesh_channel_messages);
    let cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let io_memory_bytes = RuntimeConfig::default().io_memory_bytes;
    let start: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let mut handles = Vec::with_capacity(2);
    for peer in 0..2 {
        let placement = match cores.is_empty() {
            true => glommio::Placement::Unbound,
            false => glommio::Placement::Fixed(cores[peer % cores.len()]),
        };
        let mesh = mesh.clone();
        let start = start.clone();
        let handle = glommio::LocalExecutorBuilder::new(placement)
            .name(&format!("dirigo-mesh{peer}"))
            .io_memory(io_memory_bytes)
            .spawn(move || async move {
                let (senders, receivers) = mesh.join().await.expect("joining a fresh mesh");
                let me = senders.peer_id();
                let other = 1 - me;
                if me == 0 {
                    let _ = start.set(Instant::now());
                    for first in (0..total).step_by(T::PAYLOADS as usize) {
                        senders
                            .send_to(other, T::starting_at(first))
                            .await
                            .expect("the receiver outlives the sender");
                    }
                    None
                } else {
                    let mut sum = 0u64;
                    for _ in 0..total / T::PAYLOADS {
                        let message = receivers
                            .recv_from(other)
                            .await
                            .expect("a peer of the mesh")
                            .expect("the sender sends everything before closing");
                        sum = message.add_to(sum);
                    }
                    Some((Instant::now(), sum))
                }
            })
            .map_err(|e| BenchError(format!("cannot start mesh executor {peer}: {e}")))?;
        handles.push(handle);
    }
    let mut finished = None;
    for handle in handles {
        let result = handle
            .join()
            .map_err(|e| BenchError(format!("a mesh executor failed: {e}")))?;
        finished = finished.or(result);
    }
    let (end, sum) = finished.expect("one peer receives");
    check_sum(sum, total)?;
    let start = *start.get().expect("the sender started");
    Ok(total as f64 / end.duration_since(start).as_secs_f64())
}

// ---- output -----------------------------------------------------------------

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dirigo bench actors: {} messages per measurement, median of {} runs",
            self.messages, self.runs
        )?;
        writeln!(f, "machine: {} ({} cores)", self.machine, self.cores)?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<38} {:>12} {:>10}  baseline",
            "measurement", "M msgs/s", "ratio"
        )?;
        let mesh = self.raw_mesh_msgs_per_s;
        let mesh_batched = self.raw_mesh_batched_msgs_per_s;
        let batch = self.batch_payloads;
        let single = ("mesh, 1 u64/msg", mesh);
        let batched = ("mesh, batched", mesh_batched);
        let rows = [
            ("local (1 shard)".to_string(), self.local_msgs_per_s, single),
            (
                "cross-shard (1 u64/msg)".to_string(),
                self.cross_shard_msgs_per_s,
                single,
            ),
            ("raw glommio mesh (1 u64/msg)".to_string(), mesh, single),
            (
                format!("cross-shard batched ({batch} u64/msg)"),
                self.cross_shard_batched_msgs_per_s,
                batched,
            ),
            (
                format!("raw glommio mesh ({batch} u64/msg)"),
                mesh_batched,
                batched,
            ),
        ];
        for (name, rate, (against, baseline)) in rows {
            writeln!(
                f,
                "{name:<38} {:>12.2} {:>9.2}x  {against}",
                rate / 1e6,
                rate / baseline
            )?;
        }
        writeln!(f)?;
        write!(
            f,
            "msgs/s count payloads; each ratio is against the mesh sending the same messages.\n\
             targets: cross-shard >= 0.5x mesh, local >= 20 M msgs/s"
        )
    }
}
