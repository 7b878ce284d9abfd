//! Whole dataflows under the deterministic simulator: a typed job (source ->
//! filter -> keyed relay that keeps no state -> keyed windowed count -> sink,
//! and a filter into a two-phase maximum from the same source, a step
//! that on more shards than the source's partitions is switched onto its
//! relay stage and back) runs on several simulated shards while its actors are migrated at
//! random and idle actors (window operators holding state included: their key
//! groups go to the store) are deactivated and brought back, over many seeds and
//! shard counts; every run's output is checked exactly against a plain reference.
//! All time is the simulator's clock (the sources are paced by it).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirigo_engine::autoscale::{
    Action, ActorSample, AutoscaleConfig, Autoscaler, JobSample, Sample, Scale,
};
use dirigo_engine::dataflow::ops::{Count, MaxWithTies, WindowSpec};
use dirigo_engine::dataflow::state::Stateful;
use dirigo_engine::dataflow::{DataMsg, Job, Operator, Registry, Sink, Source, SourceBatch};
use dirigo_engine::runtime::sim::{Sim, SimRng};
use dirigo_engine::runtime::{MemoryStateStore, ShardConfig, StateStore};
use dirigo_engine::{ActorId, JobId, ShardId};

const EVENTS: u64 = 6_000;
const WINDOW_MS: i64 = 100;

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Reading {
    sensor: u64,
    time_ms: i64,
    value: u64,
}

/// Reading `n`: deterministic in `n` and the seed; times never go back.
fn reading(seed: u64, n: u64) -> Reading {
    let mix = (n ^ seed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(29);
    Reading {
        sensor: mix % 7,
        time_ms: (n / 4) as i64,
        value: (mix >> 8) % 1_000,
    }
}

/// Partition `part` of `parts` takes readings `part, part + parts, ...`.
struct Readings {
    seed: u64,
    next: u64,
    step: u64,
}

impl Source<Reading> for Readings {
    fn next_batch(&mut self, max: usize, out: &mut Vec<Reading>) -> SourceBatch {
        for _ in 0..max {
            if self.next >= EVENTS {
                return SourceBatch::Done;
            }
            out.push(reading(self.seed, self.next));
            self.next += self.step;
        }
        SourceBatch::More {
            watermark_ms: reading(self.seed, self.next - self.step).time_ms,
        }
    }
}

struct Collect<T>(Arc<Mutex<Vec<T>>>);

impl<T: Clone + Send + 'static> Sink<T> for Collect<T> {
    fn write(&mut self, records: &[T]) {
        self.0.lock().unwrap().extend_from_slice(records);
    }
    /// Rows go straight to shared storage: a fresh partition does the same.
    fn stateless(&self) -> bool {
        true
    }
}

/// A keyed stage that keeps no state: passes each reading on (so it may run
/// in parallel mode).
struct Relay;

impl Operator<Reading, Reading> for Relay {
    fn on_records(&mut self, records: Vec<Reading>, out: &mut Vec<Reading>) {
        out.extend(records);
    }
    fn state(&mut self) -> Option<&mut dyn Stateful> {
        None
    }
}

/// `(sensor, window_start, count)`.
type CountRow = (u64, i64, u64);
/// `(window_start, value, sensor)`.
type MaxRow = (i64, u64, u64);
type Counts = Arc<Mutex<Vec<CountRow>>>;
type Maxima = Arc<Mutex<Vec<MaxRow>>>;

fn job(seed: u64, counts: Counts, maxima: Maxima) -> Job {
    let mut job = Job::new("sensors", Duration::from_millis(5));
    // Paced on the simulated clock: 2 events per simulated µs over both partitions.
    job.rate(Some(2_000_000)).source_batch_records(64);
    // The model is stepped by hand here: the job asks for its relays.
    job.relays(true);
    let readings = job.source(
        "readings",
        2,
        Arc::new(move |p, n| {
            Box::new(Readings {
                seed,
                next: p as u64,
                step: n as u64,
            })
        }),
    );
    let tumbling = WindowSpec::Tumbling { size_ms: WINDOW_MS };
    readings
        .filter(|r| r.sensor != 3)
        .key_by(|r| r.sensor)
        .process("relay", 3, Arc::new(|_| Box::new(Relay)))
        .key_by(|r| r.sensor)
        .window_aggregate(
            "count",
            3,
            tumbling,
            |r| r.time_ms,
            |r| r.sensor,
            Count::new(|sensor, (start, _), n| (sensor, start, n)),
        )
        .sink(
            "counts",
            2,
            Arc::new(move |_| Box::new(Collect(counts.clone()))),
        );
    // A step (it drops nothing): on more shards than the source's two
    // partitions, its edge to the maximum's first phase has a hidden relay
    // stage, and the step is switched onto it and back at random.
    readings
        .filter(|r| r.value < 1_000)
        .key_by(|r| r.sensor)
        .window_aggregate_two_phase(
            "max",
            2,
            tumbling,
            |r| r.time_ms,
            |_| 0,
            MaxWithTies::new(
                |r: &Reading| r.value,
                |r: &Reading| {
                    (
                        r.time_ms - r.time_ms.rem_euclid(WINDOW_MS),
                        r.value,
                        r.sensor,
                    )
                },
            ),
        )
        .sink(
            "maxima",
            1,
            Arc::new(move |_| Box::new(Collect(maxima.clone()))),
        );
    job
}

/// The plain reference: counts per (sensor, window) without sensor 3, and every
/// reading that ties its window's maximum value.
fn reference(seed: u64) -> (Vec<CountRow>, Vec<MaxRow>) {
    let mut counts = BTreeMap::new();
    let mut best: BTreeMap<i64, (u64, Vec<MaxRow>)> = BTreeMap::new();
    for n in 0..EVENTS {
        let r = reading(seed, n);
        let start = r.time_ms - r.time_ms.rem_euclid(WINDOW_MS);
        if r.sensor != 3 {
            *counts.entry((r.sensor, start)).or_insert(0u64) += 1;
        }
        let slot = best.entry(start).or_insert((0, Vec::new()));
        if r.value > slot.0 || slot.1.is_empty() {
            *slot = (r.value, Vec::new());
        }
        if r.value == slot.0 {
            slot.1.push((start, r.value, r.sensor));
        }
    }
    let counts = counts.into_iter().map(|((s, w), n)| (s, w, n)).collect();
    let mut maxima: Vec<_> = best.into_values().flat_map(|(_, rows)| rows).collect();
    maxima.sort();
    (counts, maxima)
}

/// The memory store, counting what keyed stages (with their window state)
/// put there while the job ran: deactivations of stateful operators mid-job.
#[derive(Default)]
struct Recording {
    inner: MemoryStateStore,
    stateful_puts: AtomicU64,
    running: AtomicBool,
}

/// Stages of `job` whose operators keep window state: count, max-partial,
/// max-merge.
const STATEFUL_STAGES: [u32; 3] = [2, 4, 5];
const RELAY_STAGE: u32 = 1;

impl StateStore for Recording {
    fn put(&self, id: ActorId, bytes: Vec<u8>) {
        if self.running.load(Ordering::Relaxed) && STATEFUL_STAGES.contains(&id.operator) {
            self.stateful_puts.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.put(id, bytes)
    }
    fn take(&self, id: ActorId) -> Option<Vec<u8>> {
        self.inner.take(id)
    }
    fn remove_job(&self, job: JobId) {
        self.inner.remove_job(job)
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
}

struct Outcome {
    /// Deactivations of keyed stages holding window state, while the job ran.
    stateful_deactivations: u64,
    migrations: u64,
    deactivations: u64,
    activations: u64,
    /// The job's actors (each activated once at least).
    actors: u64,
    /// Reroutes ordered, each after the one before it completed; of them,
    /// switches of the relay (stage 1, no state) to parallel mode.
    reroutes: u64,
    to_parallel: u64,
    /// Splits and merges the autoscaler ordered.
    splits: [u64; 2],
    /// The source's step split out onto its relay and fused back (at
    /// random, or by the autoscaler).
    unchains: [u64; 2],
}

/// What moves the job's actors while it runs.
enum Mover {
    /// Random migrations (one step in 150).
    Random,
    /// Random migrations, and every `REROUTE_STEPS` steps a random reroute
    /// of a keyed stage (a range split, two merged, or every group to a
    /// random partition) once its last one has completed.
    Rerouting,
    /// The autoscaler's model, stepped every `AUTOSCALE_STEPS` simulated steps
    /// on the cores' reports (each message costing the given ns), its moves
    /// carried out as migrations.
    Autoscaler(Box<Autoscaler>, u64),
}

/// Simulated steps between two reroute orders.
const REROUTE_STEPS: u64 = 150;

/// Simulated steps between two autoscaler steps.
const AUTOSCALE_STEPS: u64 = 200;

/// The simulator's cost model for the autoscaler: a message takes this long
/// (every shard busy), or this much less (every shard cold).
const SIMULATED_MESSAGE_NS: u64 = 40_000;
const SIMULATED_LIGHT_MESSAGE_NS: u64 = 500;

/// One interval of the sim's reports as the model's sample: per actor,
/// messages since its last report (its counters travel with it when it moves
/// and start again when it is made anew), costed at `SIMULATED_MESSAGE_NS`
/// each, over the time since that report.
fn sim_sample(
    sim: &mut Sim<DataMsg>,
    shards: u16,
    seen: &mut BTreeMap<ActorId, (u64, u64)>,
    last_ns: &mut u64,
    (slo_ns, message_ns, [splittable, parallelizable, unchainable, relays]): (u64, u64, [u64; 4]),
) -> Sample {
    let now = sim.now_ns();
    let shard_interval_ns = now.saturating_sub(*last_ns).max(1);
    *last_ns = now;
    let mut sample = Sample {
        shards: shards as usize,
        ..Sample::default()
    };
    sample.jobs.insert(
        JobId(1),
        JobSample {
            slo_ns,
            scalable: true,
            // No input counted, so never scaled to zero.
            records_in: 0,
            ended: false,
            splittable,
            parallelizable,
            unchainable,
            relays,
            crossable: 0,
        },
    );
    for shard in 0..shards {
        let report = sim.core(ShardId(shard)).report();
        for actor in &report.actors {
            if actor.id.job != JobId(1) {
                continue;
            }
            let messages = actor.counters.messages;
            let (interval_ns, delta) = match seen.get(&actor.id) {
                Some(&(at, before)) if before <= messages && at < now => {
                    (now - at, messages - before)
                }
                _ => (shard_interval_ns, messages),
            };
            seen.insert(actor.id, (now, messages));
            sample.actors.push(ActorSample {
                id: actor.id,
                shard: report.shard,
                interval_ns,
                cpu_ns: (delta * message_ns).min(interval_ns),
                messages: delta,
                queue_p99_us: actor.counters.queue_us.value_at_quantile(0.99),
            });
        }
    }
    sample
}

fn run(seed: u64, shards: u16) -> Outcome {
    run_moved(seed, shards, Mover::Random).0
}

/// Run the job under `mover`; the outcome and the autoscaler's moves.
fn run_moved(seed: u64, shards: u16, mut mover: Mover) -> (Outcome, [u64; 2]) {
    let registry = Registry::new(shards as usize);
    let config = ShardConfig {
        mailbox_credit_messages: 8,
        turn_messages_max: 4,
        // Short enough that sinks idle out between paced batches.
        idle_timeout_ns: Some(20_000),
        ..ShardConfig::default()
    };
    let store = Arc::new(Recording::default());
    store.running.store(true, Ordering::Relaxed);
    let mut sim = Sim::new(shards, config, 16, registry.factory(), store.clone(), seed);
    let counts: Counts = Arc::default();
    let maxima: Maxima = Arc::default();
    let handle = registry
        .register(
            job(seed, counts.clone(), maxima.clone()),
            JobId(1),
            sim.now_ns(),
        )
        .expect("the job is valid");
    for (actor, sched) in handle.first_messages(sim.now_ns()) {
        sim.send(ShardId(0), actor, DataMsg::Tick, sched);
    }
    let actors = registry.actors(JobId(1));
    let mut rng = SimRng::new(seed ^ 0xdead_beef);
    let mut steps = 0u64;
    let (mut seen, mut last_ns, mut moves) = (BTreeMap::new(), sim.now_ns(), [0u64; 2]);
    let keyed = registry.keyed_stages(JobId(1));
    let mut reroutes = 0u64;
    let mut to_parallel = 0u64;
    let (mut splits, mut before_splits) = ([0u64; 2], BTreeMap::new());
    let mut unchains = [0u64; 2];
    let mut before_parallel = BTreeMap::new();
    while !handle.is_done() {
        assert!(
            sim.step(),
            "seed {seed}: the simulation went quiet before the job ended"
        );
        steps += 1;
        assert!(
            steps < 5_000_000,
            "seed {seed}: still running after {steps} steps"
        );
        if let Mover::Autoscaler(scaler, message_ns) = &mut mover {
            if steps.is_multiple_of(AUTOSCALE_STEPS) {
                let view = registry.scaling_view()[&JobId(1)];
                let masks = [
                    view.splittable,
                    view.parallelizable,
                    view.unchainable,
                    view.relays,
                ];
                let figures = (5_000_000, *message_ns, masks);
                let sample = sim_sample(&mut sim, shards, &mut seen, &mut last_ns, figures);
                for decision in scaler.step(&sample) {
                    let orders = match decision.action {
                        Action::Move {
                            actor,
                            from,
                            to,
                            scale,
                        } => {
                            sim.migrate(from, actor, to);
                            moves[(scale == Scale::In) as usize] += 1;
                            continue;
                        }
                        Action::Split { actor, into } => {
                            match registry.split(actor, into.partition) {
                                Ok((before, orders)) => {
                                    before_splits.insert((actor, into.partition), before);
                                    splits[0] += 1;
                                    orders
                                }
                                // Another reroute of the job is under way.
                                Err(_) => continue,
                            }
                        }
                        Action::Parallel { job, stage } => {
                            let (before, _) = registry.routing(job, stage).expect("keyed");
                            match registry.reroute(job, stage, Vec::new()) {
                                Ok(orders) => {
                                    before_parallel.insert((job, stage), before);
                                    splits[0] += 1;
                                    orders
                                }
                                Err(_) => continue,
                            }
                        }
                        Action::Ordered { job, stage } => {
                            let Some(before) = before_parallel.remove(&(job, stage)) else {
                                continue;
                            };
                            match registry.reroute(job, stage, before) {
                                Ok(orders) => {
                                    splits[1] += 1;
                                    orders
                                }
                                Err(_) => continue,
                            }
                        }
                        Action::Unchain { job, stage } | Action::Rechain { job, stage } => {
                            let on = matches!(decision.action, Action::Unchain { .. });
                            registry
                                .unchain(job, stage, on)
                                .expect("a stage with a relay");
                            unchains[!on as usize] += 1;
                            continue;
                        }
                        Action::Merge { into, from } => {
                            let Some(before) = before_splits.remove(&(into, from.partition)) else {
                                continue;
                            };
                            match registry.merge(into, from.partition, &before) {
                                Ok(orders) => {
                                    splits[1] += 1;
                                    orders
                                }
                                Err(_) => continue,
                            }
                        }
                        _ => continue,
                    };
                    let sched = dirigo_engine::SchedCtx {
                        job: JobId(1),
                        deadline_ns: sim.now_ns(),
                        origin_ns: sim.now_ns(),
                    };
                    for (feeder, order) in orders {
                        sim.send(ShardId(0), feeder, order, sched);
                    }
                }
            }
        }
        if matches!(mover, Mover::Rerouting) && steps.is_multiple_of(REROUTE_STEPS) {
            let keyed_stage = keyed[rng.below(keyed.len() as u64) as usize];
            let stage = keyed_stage.stage;
            let (owners, settled) = registry.routing(JobId(1), stage).expect("a keyed stage");
            if settled {
                let groups = dirigo_engine::dataflow::KEY_GROUPS_DEFAULT;
                let change = dirigo_engine::dataflow::reroute::random_change(
                    &mut rng,
                    &owners,
                    keyed_stage,
                    groups,
                );
                if let Some(table) = change {
                    let parallel = table.is_empty() && stage == RELAY_STAGE;
                    let orders = registry.reroute(JobId(1), stage, table).expect("valid");
                    reroutes += (!orders.is_empty()) as u64;
                    to_parallel += (parallel && !orders.is_empty()) as u64;
                    for (actor, order) in orders {
                        let via = ShardId(rng.below(shards as u64) as u16);
                        let sched = dirigo_engine::SchedCtx {
                            job: JobId(1),
                            deadline_ns: sim.now_ns(),
                            origin_ns: sim.now_ns(),
                        };
                        sim.send(via, actor, order, sched);
                    }
                }
            }
        }
        match rng.below(150) {
            0 if !matches!(mover, Mover::Autoscaler(..)) => {
                let actor = actors[rng.below(actors.len() as u64) as usize];
                let to = ShardId(rng.below(shards as u64) as u16);
                let via = ShardId(rng.below(shards as u64) as u16);
                sim.migrate(via, actor, to);
            }
            1 => {
                let shard = ShardId(rng.below(shards as u64) as u16);
                sim.core(shard).deactivate_idle();
            }
            2 if !matches!(mover, Mover::Autoscaler(..)) => {
                let on = rng.below(2) == 0;
                // Refused on as many shards as source partitions, or fewer:
                // the relay has no partitions there.
                if registry.unchain(JobId(1), 0, on).is_ok() {
                    unchains[!on as usize] += 1;
                }
            }
            _ => {}
        }
    }
    store.running.store(false, Ordering::Relaxed);
    assert!(
        handle.metrics().error().is_none(),
        "seed {seed}: {:?}",
        handle.metrics().error()
    );
    let (expected_counts, expected_maxima) = reference(seed);
    let mut got_counts = counts.lock().unwrap().clone();
    got_counts.sort();
    assert_eq!(
        got_counts, expected_counts,
        "seed {seed} shards {shards}: counts"
    );
    let mut got_maxima = maxima.lock().unwrap().clone();
    got_maxima.sort();
    assert_eq!(
        got_maxima, expected_maxima,
        "seed {seed} shards {shards}: maxima"
    );
    assert_eq!(
        handle.metrics().late_records(),
        0,
        "seed {seed}: nothing is late"
    );
    // Deactivations while the job ran (not counting the sweep below).
    let deactivations_while_running: u64 = (0..shards)
        .map(|shard| sim.core(ShardId(shard)).report().deactivations)
        .sum();
    // No reroute is left hanging: what was under way at the end completed
    // (the ends of the channels stand for their markers).
    sim.run_until_quiet(1_000_000);
    for k in &keyed {
        let (_, settled) = registry.routing(JobId(1), k.stage).expect("a keyed stage");
        assert!(
            settled,
            "seed {seed}: stage {}'s reroute did not complete",
            k.stage
        );
    }
    // Everything that ended may go now: the ended stages and sources too.
    sim.advance_ns(1_000_000);
    for shard in 0..shards {
        sim.core(ShardId(shard)).deactivate_idle();
    }
    let mut outcome = Outcome {
        stateful_deactivations: store.stateful_puts.load(Ordering::Relaxed),
        migrations: 0,
        deactivations: deactivations_while_running,
        activations: 0,
        actors: actors.len() as u64,
        reroutes,
        to_parallel,
        splits,
        unchains,
    };
    for shard in 0..shards {
        let report = sim.core(ShardId(shard)).report();
        outcome.migrations += report.migrations_in;
        outcome.activations += report.activations;
        assert!(
            report.actors.is_empty(),
            "seed {seed}: shard {shard} still holds {} actors of the ended job",
            report.actors.len()
        );
    }
    (outcome, moves)
}

#[test]
fn a_dataflow_is_exact_while_its_actors_move_and_deactivate() {
    let mut total_migrations = 0;
    let mut deactivations = 0;
    let mut stateful = 0;
    let mut reactivations = 0;
    let mut switches = 0;
    for seed in 1..=30u64 {
        for shards in [1u16, 2, 3] {
            let outcome = run(seed, shards);
            if shards < 3 {
                assert_eq!(outcome.unchains, [0, 0], "no relay on {shards} shards");
            }
            switches += outcome.unchains[0] + outcome.unchains[1];
            total_migrations += outcome.migrations;
            // Activations beyond one per actor are actors brought back.
            reactivations += outcome.activations - outcome.actors;
            deactivations += outcome.deactivations;
            stateful += outcome.stateful_deactivations;
        }
    }
    eprintln!(
        "90 runs: {total_migrations} migrations, {deactivations} deactivations while jobs ran \
         ({stateful} of keyed stages holding window state), {reactivations} reactivations, \
         {switches} switches of the source's step to its relay or back (3 shards)"
    );
    assert!(
        switches > 100,
        "only {switches} switches to the relay or back"
    );
    // Window operators went to the store mid-job with their state and came
    // back with it: the outputs above are exact.
    assert!(
        stateful > 50,
        "only {stateful} deactivations of stateful stages while jobs ran"
    );
    assert!(
        deactivations > 100,
        "only {deactivations} deactivations while jobs ran"
    );
    assert!(total_migrations > 100, "only {total_migrations} migrations");
    assert!(reactivations > 50, "only {reactivations} reactivations");
}

/// Key groups change owner at random while the job runs (ranges split and
/// merged, groups scattered), with random migrations and deactivations, on
/// 1, 2 and 8 simulated shards: every output is exactly the reference's, and
/// nothing is late.
#[test]
fn a_dataflow_is_exact_while_its_key_groups_reroute() {
    let (mut reroutes, mut to_parallel, mut switches) = (0, 0, 0);
    for seed in 1..=20u64 {
        for shards in [1u16, 2, 8] {
            let (outcome, _) = run_moved(seed, shards, Mover::Rerouting);
            reroutes += outcome.reroutes;
            to_parallel += outcome.to_parallel;
            switches += outcome.unchains[0] + outcome.unchains[1];
        }
    }
    eprintln!(
        "60 runs: {reroutes} reroutes, {to_parallel} of the relay to parallel mode, {switches} \
         switches of the source's step to its relay or back (8 shards)"
    );
    assert!(
        switches > 100,
        "only {switches} switches to the relay or back"
    );
    assert!(reroutes > 300, "only {reroutes} reroutes");
    assert!(
        to_parallel > 10,
        "the relay went parallel {to_parallel} times"
    );
}

/// The autoscaler's model drives the placement of a job on 8 and 12
/// simulated shards (more shards than this machine has cores), from the
/// cores' own reports with a simulated cost per message: with a heavy cost
/// it moves actors off loaded shards, splits a partition too busy to move
/// (its reroute carried out in the simulator) and splits the source's step
/// out onto its relay, with a light one it drains
/// cold shards (after 3 cold steps here, so that it happens in a short run),
/// and every output is still exactly the reference's.
#[test]
fn the_autoscaler_in_the_simulator_moves_actors_and_outputs_stay_exact() {
    let [mut out, mut ins] = [0, 0];
    let [mut split, mut merged] = [0, 0];
    let [mut unchained, mut rechained] = [0, 0];
    for seed in 1..=6u64 {
        for shards in [8u16, 12] {
            for message_ns in [SIMULATED_MESSAGE_NS, SIMULATED_LIGHT_MESSAGE_NS] {
                let scaler = Autoscaler::new(AutoscaleConfig {
                    scale_in_steps: 3,
                    ..AutoscaleConfig::default()
                });
                let mover = Mover::Autoscaler(Box::new(scaler), message_ns);
                let (outcome, [o, i]) = run_moved(seed, shards, mover);
                out += o;
                ins += i;
                split += outcome.splits[0];
                merged += outcome.splits[1];
                unchained += outcome.unchains[0];
                rechained += outcome.unchains[1];
            }
        }
    }
    eprintln!(
        "24 runs: {out} moves out and {ins} in, {split} splits or switches to parallel mode and \
         {merged} merges or switches back, {unchained} steps split out onto relays and \
         {rechained} fused back by the autoscaler"
    );
    assert!(out >= 12, "only {out} moves out by the autoscaler");
    // A partition too busy for any shard to take is split (or its stage,
    // which keeps partials, switched to parallel mode), live.
    assert!(split >= 1, "no split by the autoscaler");
    assert!(ins >= 12, "only {ins} moves in by the autoscaler");
    // A source partition no move relieves (its cost here is its messages,
    // which a relay does not take over) has its step split out, once each.
    assert!(unchained >= 1, "no step split out by the autoscaler");
}
