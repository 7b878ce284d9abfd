//! `dirigo bench migrate`: the pause of a live migration, and proof that no
//! message is lost, duplicated or reordered by it.
//!
//! One *state* actor holds `state_bytes` (1 MiB) of state (its `snapshot`
//! encodes them) and starts on shard 0. Two *sender* actors, one homed on each
//! shard, each send it a steady stream of numbered messages (`sends_per_tick` per
//! `Tick`, re-arming themselves with a self-sent `Tick`). The bench thread moves
//! the state actor to the other shard `migrations` times, each time waiting until
//! the actor has handled a message on its new shard (it writes `ctx.shard()` into
//! a shared atomic on every message) before asking for the next move.
//!
//! At the end the senders are told to stop; once both have stopped, the bench
//! waits until everything they sent has been handled, then reads:
//!
//! - the pause of each migration, from `RuntimeStats::migration_pause_us` (last
//!   message handled at the old owner to first message handled at the new one);
//! - the actor's own per-sender check: every message `n` from a sender must come
//!   right after `n - 1`. `n` at or below the last seen is a duplicate, above
//!   `last + 1` out of order; what was sent and never handled is lost.
//!
//! Within a node the actor's slot (actor object, mailbox, sequence tables) is
//! handed to the new shard as one pointer: the 1 MiB state is neither copied nor
//! serialised, so the pause does not grow with the state's size.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use dirigo_engine::runtime::stats::{new_histogram, record_us};
use dirigo_engine::runtime::MemoryStateStore;
use dirigo_engine::{
    encode_state, Actor, ActorId, BoxActor, Context, JobId, Runtime, SchedCtx, ShardId, StateBytes,
};

use crate::actors::{partition_on, runtime_config};
use crate::machine::Machine;
use crate::{progress, BenchError};

const JOB: JobId = JobId(2);
const STATE_OPERATOR: u32 = 1;
const SENDER_OPERATOR: u32 = 2;
/// One sender homed on each of the two shards.
const SENDERS: usize = 2;

pub const NOTE: &str = "within a node the actor's state moves by ownership (its slot is handed \
over as one pointer; nothing is serialised), so the pause does not grow with the state's size";

#[derive(Clone, Debug)]
pub struct Config {
    /// Moves of the state actor, alternating between shard 0 and shard 1.
    pub migrations: u64,
    /// Bytes of state the actor holds.
    pub state_bytes: usize,
    /// Messages each sender sends per `Tick`.
    pub sends_per_tick: u32,
    /// A migration that has not completed after this long is an error.
    pub migration_time_max: Duration,
    /// Time allowed to handle what was sent once the senders stopped.
    pub drain_time_max: Duration,
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            migrations: 1000,
            state_bytes: 1 << 20,
            sends_per_tick: 4,
            migration_time_max: Duration::from_secs(10),
            drain_time_max: Duration::from_secs(30),
            progress: true,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub cores: usize,
    pub migrations: u64,
    /// Migrations the shards counted (`migrations_in`, summed).
    pub migrations_completed: u64,
    pub state_bytes: usize,
    pub pause_us_p50: u64,
    pub pause_us_p99: u64,
    pub pause_us_max: u64,
    /// The pause split: the actor idle at its old owner from the end of its last
    /// turn to the handoff, and the handoff in flight between the shards (the
    /// rest is waiting for its first turn at the new owner).
    pub idle_before_us_p99: u64,
    pub transfer_us_p99: u64,
    /// Pauses recorded in the histogram.
    pub pauses: u64,
    /// Seen from the bench thread: `Runtime::migrate` called to the first
    /// message handled on the new shard (includes the external queue and the
    /// bench thread's 20 µs polling).
    pub request_us_p50: u64,
    pub request_us_p99: u64,
    pub request_us_max: u64,
    pub elapsed_s: f64,
    /// Turns that took over 10 ms (`RuntimeStats::stalls`). The bench's turns
    /// take microseconds, so a stall means the OS took the core from a shard
    /// (another process on a shared machine): pauses then include that time.
    pub stalls: u64,
    pub sent: u64,
    /// Messages the state actor handled.
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub note: &'static str,
}

impl Report {
    /// Every message handled exactly once and in order.
    pub fn exactly_once(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0
    }
}

/// What the actors tell the bench thread, outside the actors so that it can be
/// read while they run.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    stopped: [AtomicBool; SENDERS],
    sent: [AtomicU64; SENDERS],
    handled: AtomicU64,
    duplicated: AtomicU64,
    out_of_order: AtomicU64,
    /// The shard the state actor last handled a message on.
    shard: AtomicU32,
}

#[derive(Debug)]
enum Msg {
    Tick,
    Data { sender: usize, n: u64 },
}

struct StateActor {
    state: Vec<u8>,
    /// Last message number seen from each sender (from 1; 0 = none yet).
    last: [u64; SENDERS],
    shared: Arc<Shared>,
}

impl Actor for StateActor {
    type Message = Msg;

    fn handle(&mut self, message: Msg, ctx: &mut Context<'_, Msg>) {
        let Msg::Data { sender, n } = message else {
            panic!("the state actor got {message:?}");
        };
        self.shared
            .shard
            .store(ctx.shard().0 as u32, Ordering::Release);
        let last = &mut self.last[sender];
        if n <= *last {
            self.shared.duplicated.fetch_add(1, Ordering::Relaxed);
        } else {
            if n > *last + 1 {
                self.shared.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            *last = n;
        }
        // Touch the state, so it is live data, not a dead allocation.
        let index = (n as usize).wrapping_mul(4099) % self.state.len();
        self.state[index] = self.state[index].wrapping_add(1);
        self.shared.handled.fetch_add(1, Ordering::Release);
    }

    fn snapshot(&mut self) -> Option<StateBytes> {
        Some(encode_state(&self.state))
    }
}

struct SenderActor {
    index: usize,
    to: ActorId,
    sends_per_tick: u32,
    sent: u64,
    shared: Arc<Shared>,
}

impl Actor for SenderActor {
    type Message = Msg;
    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }

    fn handle(&mut self, message: Msg, ctx: &mut Context<'_, Msg>) {
        debug_assert!(matches!(message, Msg::Tick), "sender got {message:?}");
        if self.shared.stop.load(Ordering::Acquire) {
            self.shared.stopped[self.index].store(true, Ordering::Release);
            return;
        }
        for _ in 0..self.sends_per_tick {
            self.sent += 1;
            let data = Msg::Data {
                sender: self.index,
                n: self.sent,
            };
            ctx.send(self.to, data);
        }
        self.shared.sent[self.index].store(self.sent, Ordering::Release);
        ctx.send(ctx.me(), Msg::Tick);
    }
}

fn sched() -> SchedCtx {
    SchedCtx {
        job: JOB,
        deadline_ns: u64::MAX,
        origin_ns: 0,
    }
}

pub fn run(config: &Config) -> Result<Report, BenchError> {
    if config.state_bytes == 0 || config.sends_per_tick == 0 {
        return Err(BenchError(
            "state bytes and sends per tick must be at least 1".to_string(),
        ));
    }
    let machine = Machine::detect();
    let shared = Arc::new(Shared::default());
    let state_actor = partition_on(JOB, STATE_OPERATOR, ShardId(0), SENDERS);
    let senders: Vec<ActorId> = (0..SENDERS)
        .map(|shard| partition_on(JOB, SENDER_OPERATOR, ShardId(shard as u16), SENDERS))
        .collect();
    let factory = {
        let (shared, senders, config) = (shared.clone(), senders.clone(), config.clone());
        move |id: ActorId, _state: Option<&[u8]>| -> BoxActor<Msg> {
            match id.operator {
                STATE_OPERATOR => Box::new(StateActor {
                    state: vec![0xA5; config.state_bytes],
                    last: [0; SENDERS],
                    shared: shared.clone(),
                }),
                SENDER_OPERATOR => Box::new(SenderActor {
                    index: senders
                        .iter()
                        .position(|&s| s == id)
                        .expect("a known sender"),
                    to: state_actor,
                    sends_per_tick: config.sends_per_tick,
                    sent: 0,
                    shared: shared.clone(),
                }),
                other => panic!("the migrate bench has no operator {other}"),
            }
        }
    };
    let runtime = Runtime::start(
        runtime_config(SENDERS),
        Arc::new(factory),
        Arc::new(MemoryStateStore::default()),
    )
    .map_err(|e| BenchError(format!("cannot start a two-shard runtime: {e}")))?;
    let result = drive(config, &runtime, &shared, state_actor, &senders);
    let stats = runtime.stats();
    runtime.shutdown();
    let (elapsed_s, requests) = result?;
    let pauses = stats.migration_pause_us();
    let sent: u64 = shared.sent.iter().map(|s| s.load(Ordering::Acquire)).sum();
    let messages = shared.handled.load(Ordering::Acquire);
    Ok(Report {
        machine: machine.machine,
        cores: machine.cores,
        migrations: config.migrations,
        migrations_completed: stats.shards.iter().map(|s| s.migrations_in).sum(),
        state_bytes: config.state_bytes,
        pause_us_p50: pauses.value_at_quantile(0.5),
        pause_us_p99: pauses.value_at_quantile(0.99),
        pause_us_max: pauses.max(),
        idle_before_us_p99: stats
            .merged(|s| &s.migration_idle_before_us)
            .value_at_quantile(0.99),
        transfer_us_p99: stats
            .merged(|s| &s.migration_transfer_us)
            .value_at_quantile(0.99),
        pauses: pauses.len(),
        request_us_p50: requests.value_at_quantile(0.5),
        request_us_p99: requests.value_at_quantile(0.99),
        request_us_max: requests.max(),
        elapsed_s,
        stalls: stats.stalls(),
        sent,
        messages,
        lost: sent.saturating_sub(messages),
        duplicated: shared.duplicated.load(Ordering::Acquire),
        out_of_order: shared.out_of_order.load(Ordering::Acquire),
        note: NOTE,
    })
}

/// Start the senders, migrate, stop and drain; returns the seconds the
/// migrations took and how long each took as seen from this thread.
fn drive(
    config: &Config,
    runtime: &Runtime<Msg>,
    shared: &Shared,
    state_actor: ActorId,
    senders: &[ActorId],
) -> Result<(f64, Histogram<u32>), BenchError> {
    let mut requests = new_histogram();
    for &sender in senders {
        runtime
            .send(sender, Msg::Tick, sched())
            .map_err(|e| BenchError(e.to_string()))?;
    }
    // The actor activates on shard 0 with the first message it gets.
    wait_until(config.migration_time_max, "the first message", || {
        shared.handled.load(Ordering::Acquire) > 0
    })?;
    let start = Instant::now();
    let mut shard = 0u32;
    for migration in 1..=config.migrations {
        let to = 1 - shard;
        let asked = Instant::now();
        runtime
            .migrate(state_actor, ShardId(to as u16))
            .map_err(|e| BenchError(e.to_string()))?;
        wait_until(
            config.migration_time_max,
            &format!("migration {migration} to shard {to}"),
            || shared.shard.load(Ordering::Acquire) == to,
        )?;
        record_us(&mut requests, asked.elapsed().as_nanos() as u64, 1);
        shard = to;
        if migration % 100 == 0 {
            progress(
                config.progress,
                format_args!("migrate: {migration}/{} migrations", config.migrations),
            );
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Release);
    wait_until(config.drain_time_max, "the senders to stop", || {
        shared.stopped.iter().all(|s| s.load(Ordering::Acquire))
    })?;
    let sent: u64 = shared.sent.iter().map(|s| s.load(Ordering::Acquire)).sum();
    // A timeout here is not an error: what was not handled is reported as lost.
    let _ = wait_until(config.drain_time_max, "draining", || {
        shared.handled.load(Ordering::Acquire) >= sent
    });
    Ok((elapsed_s, requests))
}

/// Poll `done` every 20 µs (the bench thread shares the cores with the shards,
/// so it must not spin) until it holds or `limit` passes.
fn wait_until(limit: Duration, what: &str, done: impl Fn() -> bool) -> Result<(), BenchError> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return Err(BenchError(format!("waited {limit:?} for {what}")));
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dirigo bench migrate: {} migrations of an actor with {} KiB of state",
            self.migrations,
            self.state_bytes / 1024
        )?;
        writeln!(f, "machine: {} ({} cores)", self.machine, self.cores)?;
        writeln!(f)?;
        writeln!(
            f,
            "pause per migration (us): p50 {}  p99 {}  max {}  ({} pauses, target p99 < 1000); \
             of it idle before the handoff: p99 {}, in transfer between the shards: p99 {}",
            self.pause_us_p50,
            self.pause_us_p99,
            self.pause_us_max,
            self.pauses,
            self.idle_before_us_p99,
            self.transfer_us_p99
        )?;
        writeln!(
            f,
            "migrate request to first message on the new shard (us): p50 {}  p99 {}  max {}",
            self.request_us_p50, self.request_us_p99, self.request_us_max
        )?;
        writeln!(
            f,
            "migrations: {} asked, {} completed in {:.2} s; {} turns stalled over 10 ms \
             (a shard lost its core to another process)",
            self.migrations, self.migrations_completed, self.elapsed_s, self.stalls
        )?;
        writeln!(
            f,
            "messages: {} sent, {} handled; lost {}, duplicated {}, out of order {} ({})",
            self.sent,
            self.messages,
            self.lost,
            self.duplicated,
            self.out_of_order,
            if self.exactly_once() {
                "exactly once, in order"
            } else {
                "VIOLATION"
            }
        )?;
        write!(f, "note: {}", self.note)
    }
}
