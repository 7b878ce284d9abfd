//! The autoscaler in a running engine: a thread that, every
//! [`AutoscaleOptions::interval`], reads the runtime's accounting, turns the
//! cumulative per-actor counters into one interval's [`Sample`], steps the
//! model ([`crate::autoscale`]) and carries out its moves as migrations.
//!
//! Each decision that scales a job (a move, a scale to zero) is counted for
//! it ([`super::JobReport::scale_actions`])
//! and kept in a bounded log ([`Dataflow::decisions`](super::Dataflow)); with
//! [`AutoscaleOptions::log_decisions`] it is also printed to stderr as it is
//! made.
//!
//! Over nodes each node runs one over its own shards: the model's shards
//! are the run's up to this node's last, those of the nodes before it
//! given as dead (no actor of theirs is in this node's reports), so its
//! moves are between two of this node's shards but for a spill: every
//! [`TELL_LOADS_EVERY`] each node tells the others its shards' loads as
//! its model measured them (`Registry::tell_loads`, through the monitors
//! of a job that took records here; zeros while no record comes in, every
//! half of [`REMOTE_LOADS_FRESH`]), and a shard that
//! nothing on its node relieves sends one keyed actor a step to the least
//! loaded shard of another node that had room (`Sample::remote`, loads
//! told within [`REMOTE_LOADS_FRESH`]). Across nodes, the cluster's leader
//! places a job's parts by the CPU their nodes use (`dirigo node`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::autoscale::{Action, ActorSample, AutoscaleConfig, Autoscaler, Decision, Sample};
use crate::ids::{ActorId, ShardId, INJECTOR_OPERATOR};
use crate::runtime::stats::Counters;
use crate::runtime::Runtime;

/// Over nodes, how often a node tells the others its shards' loads
/// (`Registry::tell_loads`)...
const TELL_LOADS_EVERY: Duration = Duration::from_millis(250);
/// ...and how long a told load counts.
const REMOTE_LOADS_FRESH: Duration = Duration::from_secs(1);
/// The load a node tells of its dead shards: over any target.
const DEAD_LOAD: f64 = 60.0;

use super::{DataMsg, Registry};

/// Steps an actor's last counters are kept while no shard reports it.
const SEEN_STEPS_KEPT: u64 = 20;

/// Decisions kept for [`super::Dataflow::decisions`]; older ones are dropped.
pub const DECISIONS_KEPT_MAX: usize = 4096;

/// How the engine runs its autoscaler.
#[derive(Clone, Debug)]
pub struct AutoscaleOptions {
    /// Time between two steps.
    pub interval: Duration,
    pub model: AutoscaleConfig,
    /// Print each decision to stderr as it is made.
    pub log_decisions: bool,
}

impl Default for AutoscaleOptions {
    fn default() -> Self {
        AutoscaleOptions {
            interval: Duration::from_millis(50),
            model: AutoscaleConfig::default(),
            log_decisions: false,
        }
    }
}

/// The running autoscaler thread.
pub(crate) struct Driver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub(crate) decisions: Arc<Mutex<VecDeque<Decision>>>,
    starts: Arc<Mutex<Starts>>,
}

/// Where new jobs start: each shard's load at the last step, and the jobs
/// started on it so far.
#[derive(Default)]
struct Starts {
    loads: Vec<f64>,
    started: Vec<u32>,
}

/// An actor's cumulative counters when last reported. They travel with the
/// actor when it moves (its slot is handed over whole) and start again at zero
/// when it is made anew after a deactivation. An actor in flight between two
/// shards is in no report: its last counters are kept for `SEEN_STEPS_KEPT`
/// steps, so that the next report's difference covers the time since.
struct Seen {
    /// The step it was last reported at.
    step: u64,
    /// The reporting shard's clock then (shards share the process's
    /// monotonic clock).
    at_ns: u64,
    cpu_ns: u64,
    messages: u64,
    queue_us: Histogram<u32>,
}

impl Driver {
    pub(crate) fn start(
        options: AutoscaleOptions,
        runtime: Arc<Runtime<DataMsg>>,
        registry: Registry,
    ) -> Driver {
        let stop = Arc::new(AtomicBool::new(false));
        let decisions = Arc::new(Mutex::new(VecDeque::new()));
        let starts = Arc::new(Mutex::new(Starts::default()));
        let thread = {
            let (stop, decisions, starts) = (stop.clone(), decisions.clone(), starts.clone());
            std::thread::Builder::new()
                .name("dirigo-autoscaler".into())
                .spawn(move || run(options, &runtime, &registry, &stop, &decisions, &starts))
                .expect("the autoscaler thread starts")
        };
        Driver {
            stop,
            thread: Some(thread),
            decisions,
            starts,
        }
    }

    /// The shard a new scalable job starts on, all of it: the least loaded
    /// at the last step of the live ones, and of equals (idle shards) the one
    /// that took the fewest jobs so far (jobs submitted together start
    /// apart); from there the autoscaler spreads it as far as its load needs.
    pub(crate) fn start_shard(&self, live: &[ShardId]) -> Option<ShardId> {
        let mut starts = self.starts.lock().expect("starts poisoned");
        let shards = live.iter().map(|s| s.index() + 1).max()?;
        if starts.started.len() < shards {
            starts.started.resize(shards, 0);
        }
        let load = |s: &ShardId| starts.loads.get(s.index()).copied().unwrap_or(0.0);
        let shard = *live.iter().min_by(|a, b| {
            load(a)
                .total_cmp(&load(b))
                .then(starts.started[a.index()].cmp(&starts.started[b.index()]))
                .then(a.cmp(b))
        })?;
        starts.started[shard.index()] += 1;
        Some(shard)
    }

    /// Stop the thread and wait for it.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    options: AutoscaleOptions,
    runtime: &Runtime<DataMsg>,
    registry: &Registry,
    stop: &AtomicBool,
    decisions: &Mutex<VecDeque<Decision>>,
    starts: &Mutex<Starts>,
) {
    let mut config = options.model.clone();
    // A spill counts on its shard until a figure told since has come: a
    // telling, and a step on each side.
    let interval_ns = options.interval.as_nanos().max(1);
    let hold = (TELL_LOADS_EVERY.as_nanos() + 2 * interval_ns).div_ceil(interval_ns);
    config.spill_hold_steps = config.spill_hold_steps.max(hold as u64);
    let mut model = Autoscaler::new(config);
    let mut seen: BTreeMap<ActorId, Seen> = BTreeMap::new();
    let mut step = 0u64;
    // Per shard, its last report's clock and idle time.
    let mut reported_at: BTreeMap<ShardId, (u64, Option<u64>)> = BTreeMap::new();
    let mut last = Instant::now();
    let mut records_before = u64::MAX;
    let mut splits = Splits::default();
    let mut told_at: Option<Instant> = None;
    // This node's dead shards, as the last report said: told as full, never
    // a destination elsewhere.
    let mut dead_own: Vec<ShardId> = Vec::new();
    // On one node there is nobody to tell.
    let over_nodes = runtime.total_shards() > runtime.shards();
    // This node's shards' loads as measured, or (None) as idle.
    let mut tell = |loads: Option<&[f64]>, dead: &[ShardId], every: Duration| {
        if over_nodes && told_at.is_none_or(|at| at.elapsed() >= every) {
            let first = runtime.first_shard();
            let loads: Vec<f64> = (0..runtime.shards())
                .map(|i| {
                    let shard = ShardId(first.0 + i as u16);
                    if dead.contains(&shard) {
                        DEAD_LOAD
                    } else {
                        loads.and_then(|l| l.get(i)).copied().unwrap_or(0.0)
                    }
                })
                .collect();
            if registry.tell_loads(first.0, &loads) {
                told_at = Some(Instant::now());
            }
        }
    };
    let engine = (runtime, registry);
    loop {
        let next = last + options.interval;
        while !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= next {
                break;
            }
            std::thread::park_timeout(next - now);
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        // No record entered any job since the last step: nothing to measure,
        // and asking every shard for its report would wake the parked ones
        // (an idle engine costs no CPU).
        let jobs = registry.scaling_view();
        let records = jobs
            .values()
            .map(|job| job.records_in)
            .fold(0u64, u64::wrapping_add);
        retry_undos(engine, &mut splits, &jobs, &options);
        // Over nodes, this node's shards are `first..first + shards()` of
        // the run's: those before are other nodes', never a destination
        // but of a spill.
        let first = runtime.first_shard().index();
        let own = first..first + runtime.shards();
        if records == records_before {
            last = Instant::now();
            for decision in model.idle_step(&jobs) {
                carry_out(decision, engine, &mut splits, &options, decisions);
            }
            // No record in: this node's shards are told as idle, half as
            // often as they last (a message wakes a shard).
            tell(None, &dead_own, REMOTE_LOADS_FRESH / 2);
            continue;
        }
        records_before = records;
        let stats = runtime.stats();
        let now = Instant::now();
        let elapsed_ns = now.duration_since(last).as_nanos() as u64;
        last = now;
        let mut sample = Sample {
            shards: own.end,
            dead: (0..first)
                .map(|s| ShardId(s as u16))
                .chain(stats.dead.iter().copied())
                .collect(),
            actors: Vec::new(),
            jobs,
            // What a peer says of this node's shards, or of a shard the run
            // does not have, is not taken.
            remote: registry
                .remote_loads(REMOTE_LOADS_FRESH)
                .into_iter()
                .filter(|(shard, _)| {
                    !own.contains(&shard.index()) && shard.index() < runtime.total_shards()
                })
                .collect(),
        };
        dead_own.clone_from(&stats.dead);
        step += 1;
        for report in &stats.shards {
            // The time between this shard's two reports, on its clock (a
            // shard busy in a long turn answers late).
            let last = reported_at.insert(report.shard, (report.at_ns, report.idle_ns));
            let interval_ns = match last {
                Some((before, _)) if report.at_ns > before => report.at_ns - before,
                _ => elapsed_ns,
            };
            // The shard's busy time over the interval, where its loop
            // measures it and the last report is of the same interval.
            let busy_ns = match (last, report.idle_ns) {
                (Some((before, Some(idle_before))), Some(idle))
                    if report.at_ns > before && idle >= idle_before =>
                {
                    Some(interval_ns.saturating_sub(idle - idle_before))
                }
                _ => None,
            };
            let reported_from = sample.actors.len();
            for actor in &report.actors {
                // The injector is the shard's; a job's monitor over nodes
                // stays on its node's first shard (`Plan::monitors`).
                if actor.id.operator == INJECTOR_OPERATOR
                    || actor.id.operator == super::graph::MONITOR_STAGE
                {
                    continue;
                }
                let counters = &actor.counters;
                sample.actors.push(interval(
                    interval_ns,
                    (actor.id, report.shard, report.at_ns),
                    counters,
                    seen.get(&actor.id),
                ));
                let now_seen = Seen {
                    step,
                    at_ns: report.at_ns,
                    cpu_ns: counters.cpu_ns,
                    messages: counters.messages,
                    queue_us: counters.queue_us.clone(),
                };
                seen.insert(actor.id, now_seen);
            }
            if let Some(busy_ns) = busy_ns {
                charge_runtime_time(&mut sample.actors[reported_from..], busy_ns);
            }
        }
        // An actor not reported for a while is gone (deactivated, or its
        // job ended); one back sooner goes on from its counters.
        seen.retain(|_, s| s.step + SEEN_STEPS_KEPT > step);
        let step_decisions = model.step(&sample);
        starts.lock().expect("starts poisoned").loads = model.loads().to_vec();
        if let Some(loads) = model.loads().get(own.clone()) {
            tell(Some(loads), &stats.dead, TELL_LOADS_EVERY);
        }
        splits
            .split
            .retain(|(actor, _), _| sample.jobs.contains_key(&actor.job));
        splits
            .parallel
            .retain(|(job, _), _| sample.jobs.contains_key(job));
        for decision in step_decisions {
            carry_out(decision, engine, &mut splits, &options, decisions);
        }
    }
}

/// The tables before the splits and switches to parallel mode in force:
/// what a merge or a switch back goes back to.
#[derive(Default)]
struct Splits {
    /// By `(split actor, partition that took half)`.
    split: BTreeMap<(ActorId, u32), Vec<u32>>,
    /// By `(job, stage)`.
    parallel: BTreeMap<(crate::ids::JobId, u32), Vec<u32>>,
    /// Merges and switches back the engine refused (a checkpoint or another
    /// reroute of the job under way): the model has let go of them, so the
    /// driver tries them again every step until they are carried out or
    /// their job is gone. At most one per split or switch.
    undo: Vec<Undo>,
}

enum Undo {
    Merge {
        into: ActorId,
        from: u32,
        before: Vec<u32>,
    },
    Ordered {
        job: crate::ids::JobId,
        stage: u32,
        before: Vec<u32>,
    },
}

impl Undo {
    fn job(&self) -> crate::ids::JobId {
        match self {
            Undo::Merge { into, .. } => into.job,
            Undo::Ordered { job, .. } => *job,
        }
    }
}

/// Try the refused merges and switches back again; keep those still refused.
fn retry_undos(
    (runtime, registry): (&Runtime<DataMsg>, &Registry),
    splits: &mut Splits,
    jobs: &BTreeMap<crate::ids::JobId, crate::autoscale::JobSample>,
    options: &AutoscaleOptions,
) {
    // Those of a job that is gone go with it.
    let pending = std::mem::take(&mut splits.undo);
    for undo in pending.into_iter().filter(|u| jobs.contains_key(&u.job())) {
        let job = undo.job();
        let done = match &undo {
            Undo::Merge { into, from, before } => registry.merge(*into, *from, before),
            Undo::Ordered { job, stage, before } => registry.reroute(*job, *stage, before.clone()),
        };
        match done {
            Ok(orders) => {
                super::deliver_orders(runtime, job, orders);
                if options.log_decisions {
                    let what = match &undo {
                        Undo::Merge { into, from, .. } => {
                            format!("merge of {into} with partition {from}")
                        }
                        Undo::Ordered { job, stage, .. } => {
                            format!("switch back to ordered mode of job {} stage {stage}", job.0)
                        }
                    };
                    eprintln!("autoscaler: carried out now: {what}");
                }
            }
            Err(_) => splits.undo.push(undo),
        }
    }
}

/// Act on one decision, count it for its job (an action that scales it and
/// was carried out) and keep it in the log (one that could not be carried
/// out says why).
fn carry_out(
    mut decision: Decision,
    (runtime, registry): (&Runtime<DataMsg>, &Registry),
    splits: &mut Splits,
    options: &AutoscaleOptions,
    decisions: &Mutex<VecDeque<Decision>>,
) {
    if let (Some(job), true) = (decision.job(), decision.action.reroutes()) {
        // A reroute waits for a checkpoint under way (they take turns), for
        // half a step at most; after that it is refused and logged so.
        let waited = Instant::now();
        while registry.checkpoint_under_way(job) && waited.elapsed() < options.interval / 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let done = match decision.action {
        Action::Move { actor, to, .. } => {
            // A shard that died since the sample: the move is moot.
            let _ = runtime.migrate(actor, to);
            Ok(())
        }
        Action::ScaleToZero { job } => {
            runtime.deactivate_job(job);
            Ok(())
        }
        Action::Split { actor, into } => {
            registry
                .split(actor, into.partition)
                .map(|(before, orders)| {
                    splits.split.insert((actor, into.partition), before);
                    super::deliver_orders(runtime, actor.job, orders);
                })
        }
        Action::Parallel { job, stage } => match registry.routing(job, stage) {
            Some((before, true)) => registry.reroute(job, stage, Vec::new()).map(|orders| {
                splits.parallel.insert((job, stage), before);
                super::deliver_orders(runtime, job, orders);
            }),
            Some((_, false)) => Err("another reroute of the job is under way".to_string()),
            None => Err("no such job or stage".to_string()),
        },
        Action::Ordered { job, stage } => match splits.parallel.remove(&(job, stage)) {
            Some(before) => match registry.reroute(job, stage, before.clone()) {
                Ok(orders) => {
                    super::deliver_orders(runtime, job, orders);
                    Ok(())
                }
                Err(e) => {
                    splits.undo.push(Undo::Ordered { job, stage, before });
                    Err(format!("{e}; tried again each step"))
                }
            },
            None => Err("its switch to parallel mode was not carried out".to_string()),
        },
        Action::Merge { into, from } => match splits.split.remove(&(into, from.partition)) {
            Some(before) => match registry.merge(into, from.partition, &before) {
                Ok(orders) => {
                    super::deliver_orders(runtime, into.job, orders);
                    Ok(())
                }
                Err(e) => {
                    splits.undo.push(Undo::Merge {
                        into,
                        from: from.partition,
                        before,
                    });
                    Err(format!("{e}; tried again each step"))
                }
            },
            None => Err("its split was not carried out".to_string()),
        },
        Action::Unchain { job, stage } => registry.unchain(job, stage, true),
        Action::Rechain { job, stage } => registry.unchain(job, stage, false),
        Action::NeedsParallelism { .. } | Action::Wake { .. } => Ok(()),
    };
    match done {
        Ok(()) => {
            if let (Some(job), Some(_)) = (decision.job(), decision.action.scale()) {
                registry.count_scale_action(job);
            }
        }
        Err(why) => decision.reason = format!("{} (not carried out: {why})", decision.reason),
    }
    if options.log_decisions {
        eprintln!("autoscaler: {decision}");
    }
    let mut kept = decisions.lock().expect("decision log poisoned");
    if kept.len() == DECISIONS_KEPT_MAX {
        kept.pop_front();
    }
    kept.push_back(decision);
}

/// Charge a shard's own time (what it was busy with besides its actors'
/// turns: draining rings, delivering, flushing, timers, the injector) to
/// its actors in proportion to their CPU time, so that their loads add up
/// to the shard's busy fraction (`busy_ns` of the interval), and an actor
/// moved takes its share of that time with it from the next interval on.
/// Some of it does not move with an actor (the injector's, timers'
/// firing, forwarding after a move): so that it cannot make a shard of
/// light actors look like a heavy one, an actor's time is at most
/// doubled (`RUNTIME_CHARGE_MAX`). Each stays within its interval.
/// Nothing changes where the actors' time is already the busy time or
/// more (the two clocks read apart), or where they used none.
fn charge_runtime_time(actors: &mut [ActorSample], busy_ns: u64) {
    let turns_ns: u64 = actors.iter().map(|a| a.cpu_ns).sum();
    if turns_ns == 0 || busy_ns <= turns_ns {
        return;
    }
    let scale = (busy_ns as f64 / turns_ns as f64).min(RUNTIME_CHARGE_MAX);
    for actor in actors {
        actor.cpu_ns = ((actor.cpu_ns as f64 * scale) as u64).min(actor.interval_ns);
    }
}

/// The most `charge_runtime_time` multiplies an actor's time by.
const RUNTIME_CHARGE_MAX: f64 = 2.0;

/// One actor's figures since `before` (its counters when last reported, on
/// whichever shard), over the time since then; a counter below its last value
/// (the actor was made anew after a deactivation) is taken whole, over its
/// shard's last interval. An actor runs on one core at a time, so its CPU time
/// is at most the interval.
fn interval(
    shard_interval_ns: u64,
    (id, shard, at_ns): (ActorId, ShardId, u64),
    counters: &Counters,
    before: Option<&Seen>,
) -> ActorSample {
    let before = before.filter(|b| {
        counters.cpu_ns >= b.cpu_ns && counters.messages >= b.messages && at_ns > b.at_ns
    });
    let queue_us = &counters.queue_us;
    let Some(b) = before else {
        return ActorSample {
            id,
            shard,
            interval_ns: shard_interval_ns,
            cpu_ns: counters.cpu_ns.min(shard_interval_ns),
            messages: counters.messages,
            queue_p99_us: queue_us.value_at_quantile(0.99),
        };
    };
    let mut delta = queue_us.clone();
    let queue_p99_us = match delta.subtract(&b.queue_us) {
        Ok(()) if delta.is_empty() => 0,
        Ok(()) => delta.value_at_quantile(0.99),
        Err(_) => queue_us.value_at_quantile(0.99),
    };
    let interval_ns = at_ns - b.at_ns;
    ActorSample {
        id,
        shard,
        interval_ns,
        cpu_ns: (counters.cpu_ns - b.cpu_ns).min(interval_ns),
        messages: counters.messages - b.messages,
        queue_p99_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::JobId;

    fn actor(partition: u32, cpu_ns: u64) -> ActorSample {
        ActorSample {
            id: ActorId::new(JobId(1), 1, partition),
            shard: ShardId(0),
            interval_ns: 50_000_000,
            cpu_ns,
            messages: 100,
            queue_p99_us: 0,
        }
    }

    #[test]
    fn a_shards_own_time_is_charged_to_its_actors_by_their_cpu_time() {
        // Turns took 10 and 30 ms of a 50 ms interval the shard was busy
        // for 48: the 8 ms of its own go a quarter and three quarters.
        let mut actors = vec![actor(0, 10_000_000), actor(1, 30_000_000)];
        charge_runtime_time(&mut actors, 48_000_000);
        assert_eq!(actors[0].cpu_ns, 12_000_000);
        assert_eq!(actors[1].cpu_ns, 36_000_000);
        let sum: u64 = actors.iter().map(|a| a.cpu_ns).sum();
        assert_eq!(sum, 48_000_000);
        // Never past an actor's interval.
        let mut actors = vec![actor(0, 40_000_000), actor(1, 1_000_000)];
        charge_runtime_time(&mut actors, 50_000_000 * 2);
        assert_eq!(actors[0].cpu_ns, 50_000_000);
        // At most doubled: 5 ms of turns on a shard busy 45 ms read as 10.
        let mut actors = vec![actor(0, 2_000_000), actor(1, 3_000_000)];
        charge_runtime_time(&mut actors, 45_000_000);
        assert_eq!((actors[0].cpu_ns, actors[1].cpu_ns), (4_000_000, 6_000_000));
        // Busy time at or under the turns' (clocks read apart), or no
        // turns at all: unchanged.
        let mut actors = vec![actor(0, 10_000_000)];
        charge_runtime_time(&mut actors, 9_000_000);
        assert_eq!(actors[0].cpu_ns, 10_000_000);
        let mut actors = vec![actor(0, 0), actor(1, 0)];
        charge_runtime_time(&mut actors, 40_000_000);
        assert!(actors.iter().all(|a| a.cpu_ns == 0));
    }
}
