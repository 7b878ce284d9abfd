//! Deterministic tests of the shard state machine, driven by the seeded simulator:
//! scheduling order, channel order under random interleavings and migrations,
//! deactivation, and credits.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use common::*;
use dirigo_engine::runtime::shard::SELF_SENDS_PENDING_MAX;
use dirigo_engine::runtime::sim::Sim;
use dirigo_engine::runtime::{MemoryStateStore, PolicyKind, ShardConfig, StateStore};
use dirigo_engine::{
    decode_state, encode_state, Actor, ActorId, BoxActor, Context, JobId, SchedCtx, ShardId,
    StateBytes,
};

fn config(policy: PolicyKind) -> ShardConfig {
    ShardConfig {
        mailbox_credit_messages: 8,
        turn_messages_max: 4,
        idle_timeout_ns: None,
        policy,
        ..ShardConfig::default()
    }
}

/// Records the order in which actors run.
struct Recorder {
    id: ActorId,
    log: Arc<Mutex<Vec<u32>>>,
}

impl Actor for Recorder {
    type Message = ();
    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }
    fn handle(&mut self, _: (), _ctx: &mut Context<'_, ()>) {
        self.log.lock().unwrap().push(self.id.partition);
    }
}

fn run_order(policy: PolicyKind) -> Vec<u32> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let factory = move |id: ActorId, _: Option<&[u8]>| -> BoxActor<()> {
        Box::new(Recorder { id, log: l.clone() })
    };
    let mut sim = Sim::new(
        1,
        config(policy),
        16,
        Arc::new(factory),
        Arc::new(MemoryStateStore::default()),
        1,
    );
    // Three actors, queued in the order 0, 1, 2 with deadlines 300, 100, 200 µs.
    for (partition, deadline_ns) in [(0u32, 300_000u64), (1, 100_000), (2, 200_000)] {
        let to = ActorId::new(JobId(1), 1, partition);
        let sched = SchedCtx {
            job: JobId(1),
            deadline_ns,
            origin_ns: 0,
        };
        sim.send(ShardId(0), to, (), sched);
    }
    sim.run_until_quiet(1_000);
    let order = log.lock().unwrap().clone();
    order
}

#[test]
fn edf_runs_the_most_urgent_actor_first_and_fifo_does_not() {
    assert_eq!(run_order(PolicyKind::Edf), vec![1, 2, 0]);
    assert_eq!(run_order(PolicyKind::Fifo), vec![0, 1, 2]);
}

/// Runs the source/target workload on `shards` simulated shards, migrating a random
/// actor every `migrate_every` steps (0: never).
fn simulate(seed: u64, shards: u16, migrate_every: u64) -> u64 {
    simulate_with(seed, shards, migrate_every, 4).0
}

/// As `simulate`, with `targets` targets: with one target, every send of a source
/// continues the channel of the one before, so remote sends travel as runs.
/// Returns the migrations asked and the sends that travelled in runs.
fn simulate_with(seed: u64, shards: u16, migrate_every: u64, targets: u32) -> (u64, u64) {
    let workload = Workload {
        sources: 3,
        targets,
        per_channel: 300,
        batch: 7,
        target_spin_ns: 0,
    };
    let built = build(&workload);
    let mut sim = Sim::new(
        shards,
        config(PolicyKind::Edf),
        8,
        built.factory,
        Arc::new(MemoryStateStore::default()),
        seed,
    );
    for s in 0..workload.sources {
        sim.send(
            ShardId((s % shards as u32) as u16),
            source(s),
            Msg::Tick,
            sched(),
        );
    }
    let mut steps = 0u64;
    let mut migrations = 0u64;
    loop {
        let progressed = sim.step();
        steps += 1;
        if migrate_every > 0 && steps.is_multiple_of(migrate_every) {
            let actors = workload.sources + workload.targets;
            let pick = sim.rng().below(actors as u64) as u32;
            let actor = if pick < workload.sources {
                source(pick)
            } else {
                target(pick - workload.sources)
            };
            let via = ShardId(sim.rng().below(shards as u64) as u16);
            let to = ShardId(sim.rng().below(shards as u64) as u16);
            sim.migrate(via, actor, to);
            migrations += 1;
            continue;
        }
        if !progressed {
            break;
        }
        assert!(steps < 5_000_000, "seed {seed}: no quiescence");
    }
    if built.ledger.received.load(Ordering::Acquire)
        != workload.per_channel * (workload.sources * workload.targets) as u64
    {
        for shard in 0..shards {
            for actor in sim.core(ShardId(shard)).report().actors {
                eprintln!(
                    "seed {seed} shard {shard}: {} mailbox {} early {} blocked {}",
                    actor.id, actor.mailbox, actor.early, actor.blocked
                );
            }
        }
    }
    built.ledger.assert_complete(workload.per_channel);
    let run_messages = (0..shards)
        .map(|s| sim.core(ShardId(s)).report().run_messages)
        .sum();
    (migrations, run_messages)
}

#[test]
fn channels_stay_in_order_under_random_interleavings() {
    for seed in 0..20 {
        simulate(seed, 3, 0);
    }
}

#[test]
fn channels_stay_exact_while_actors_move() {
    for seed in 0..30 {
        for shards in [2u16, 3, 4] {
            let migrations = simulate(seed * 7 + shards as u64, shards, 13);
            assert!(migrations > 50, "seed {seed}: only {migrations} migrations");
        }
    }
}

#[test]
fn runs_of_one_channel_stay_exact_while_actors_move() {
    for seed in 0..30 {
        let (migrations, run_messages) = simulate_with(seed * 11 + 1, 3, 13, 1);
        assert!(migrations > 20, "seed {seed}: only {migrations} migrations");
        assert!(
            run_messages > 100,
            "seed {seed}: only {run_messages} sends in runs"
        );
    }
}

/// A counter whose state must survive deactivation.
struct Counter {
    count: u64,
    seen: Arc<Mutex<Vec<u64>>>,
}

impl Actor for Counter {
    type Message = ();
    fn handle(&mut self, _: (), _ctx: &mut Context<'_, ()>) {
        self.count += 1;
        self.seen.lock().unwrap().push(self.count);
    }
    fn snapshot(&mut self) -> Option<StateBytes> {
        Some(encode_state(&self.count))
    }
}

#[test]
fn deactivation_and_reactivation_keep_state() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let factory = move |_id: ActorId, state: Option<&[u8]>| -> BoxActor<()> {
        let count = state
            .map(|bytes| decode_state::<u64>(bytes).expect("valid state"))
            .unwrap_or(0);
        Box::new(Counter {
            count,
            seen: s.clone(),
        })
    };
    let store = Arc::new(MemoryStateStore::default());
    let config = ShardConfig {
        idle_timeout_ns: Some(1_000_000),
        ..config(PolicyKind::Edf)
    };
    let mut sim = Sim::new(2, config, 8, Arc::new(factory), store.clone(), 5);
    let counter = ActorId::new(JobId(1), 9, 0);
    let owner = sim.core(ShardId(0)).directory().lookup(counter).shard;
    for round in 0..3 {
        for _ in 0..5 {
            sim.send(ShardId(round % 2), counter, (), sched());
        }
        sim.run_until_quiet(10_000);
        assert!(sim.core(owner).is_active(counter));
        sim.advance_ns(2_000_000);
        assert_eq!(sim.core(owner).deactivate_idle(), 1, "round {round}");
        assert!(!sim.core(owner).is_active(counter));
        assert_eq!(store.len(), 1);
    }
    assert_eq!(*seen.lock().unwrap(), (1..=15).collect::<Vec<u64>>());
}

#[test]
fn a_slow_target_makes_its_senders_wait_with_bounded_mailboxes() {
    let workload = Workload {
        sources: 2,
        targets: 1,
        per_channel: 2_000,
        batch: 16,
        target_spin_ns: 0,
    };
    let built = build(&workload);
    let credit = 8u32;
    let mut sim = Sim::new(
        2,
        config(PolicyKind::Edf),
        64,
        built.factory,
        Arc::new(MemoryStateStore::default()),
        3,
    );
    for s in 0..workload.sources {
        sim.send(ShardId(0), source(s), Msg::Tick, sched());
    }
    let mut max_backlog = 0u64;
    let owner = sim.core(ShardId(0)).directory().lookup(target(0)).shard;
    // The target's shard runs turns twenty times less often than the sources' shard.
    sim.slow_down(owner, 20);
    loop {
        let progressed = sim.step();
        let backlog = built.sent_total.load(Ordering::Acquire)
            - built.ledger.received.load(Ordering::Acquire);
        max_backlog = max_backlog.max(backlog);
        let mailbox = sim
            .core(owner)
            .report()
            .actors
            .iter()
            .map(|a| a.mailbox + a.early)
            .max()
            .unwrap_or(0);
        // Remote senders hold `credit` each; local sends stop at the mailbox bound.
        assert!(
            mailbox <= (credit as usize) * 3,
            "mailbox grew to {mailbox}"
        );
        if !progressed {
            break;
        }
    }
    built.ledger.assert_complete(workload.per_channel);
    // Sent-but-not-handled never exceeds the credits plus one turn of sends per source.
    let bound = (credit as u64 * 3) + workload.sources as u64 * workload.batch as u64 * 4;
    assert!(max_backlog <= bound, "backlog {max_backlog} > {bound}");
}

/// Panics on its first message; counts otherwise.
struct Fragile {
    id: ActorId,
    log: Arc<Mutex<Vec<(u32, u64)>>>,
    handled: u64,
}

impl Actor for Fragile {
    type Message = ();
    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }
    fn handle(&mut self, _: (), _ctx: &mut Context<'_, ()>) {
        if self.id.operator == 1 {
            panic!("fragile {} broke", self.id.partition);
        }
        self.handled += 1;
        self.log
            .lock()
            .unwrap()
            .push((self.id.partition, self.handled));
    }
}

#[test]
fn a_failed_actor_is_removed_and_its_neighbours_run_exactly_then_retire_reclaims_all() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let factory = move |id: ActorId, _: Option<&[u8]>| -> BoxActor<()> {
        Box::new(Fragile {
            id,
            log: l.clone(),
            handled: 0,
        })
    };
    let mut sim = Sim::new(
        2,
        config(PolicyKind::Edf),
        8,
        Arc::new(factory),
        Arc::new(MemoryStateStore::default()),
        11,
    );
    let f = failures.clone();
    for shard in 0..2 {
        let f = f.clone();
        sim.core(ShardId(shard))
            .set_failure_hook(Some(Arc::new(move |failure| {
                f.lock().unwrap().push(failure)
            })));
    }
    let job = JobId(1);
    let fragile = ActorId::new(job, 1, 0);
    let steady = ActorId::new(job, 2, 0);
    for _ in 0..50 {
        sim.send(ShardId(1), fragile, (), sched());
        sim.send(ShardId(1), steady, (), sched());
    }
    sim.run_until_quiet(100_000);
    let failures = failures.lock().unwrap().clone();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].actor, Some(fragile));
    assert_eq!(failures[0].message, "fragile 0 broke");
    let handled: Vec<u64> = log.lock().unwrap().iter().map(|&(_, n)| n).collect();
    assert_eq!(handled, (1..=50).collect::<Vec<_>>());
    let owner = sim.core(ShardId(0)).directory().lookup(steady).shard;
    let report = sim.core(owner).report();
    assert_eq!(report.failures, 1);
    assert_eq!(report.dropped, 49);
    assert_eq!(sim.core(owner).active_actors(), 1);
    for shard in 0..2 {
        sim.core(ShardId(shard)).retire_job(job);
    }
    assert_eq!(sim.core(owner).active_actors(), 0);
    sim.send(ShardId(1), steady, (), sched());
    sim.run_until_quiet(10_000);
    assert_eq!(sim.core(owner).active_actors(), 0);
    // Dropped by shard 1's injector, as the message came in.
    let dropped: u64 = (0..2).map(|s| sim.core(ShardId(s)).report().dropped).sum();
    assert_eq!(dropped, 50);
    assert_eq!(log.lock().unwrap().len(), 50);
}

/// A shard keeps the counters of only the last `RETIRED_JOB_STATS_MAX` (64)
/// retired jobs: a long-lived node's statistics do not grow with every job.
#[test]
fn retired_jobs_keep_their_counters_only_for_a_while() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let factory = move |id: ActorId, _: Option<&[u8]>| -> BoxActor<()> {
        Box::new(Recorder { id, log: l.clone() })
    };
    let mut sim = Sim::new(
        1,
        config(PolicyKind::Edf),
        16,
        Arc::new(factory),
        Arc::new(MemoryStateStore::default()),
        7,
    );
    for job in 1..=200u32 {
        let to = ActorId::new(JobId(job), 1, 0);
        let sched = SchedCtx {
            job: JobId(job),
            deadline_ns: 0,
            origin_ns: 0,
        };
        sim.send(ShardId(0), to, (), sched);
        sim.run_until_quiet(1_000);
        sim.core(ShardId(0)).retire_job(JobId(job));
    }
    assert_eq!(log.lock().unwrap().len(), 200, "every job's message ran");
    let jobs: Vec<JobId> = sim
        .core(ShardId(0))
        .report()
        .jobs
        .iter()
        .map(|(j, _)| *j)
        .collect();
    assert_eq!(jobs.len(), 64, "{jobs:?}");
    assert_eq!(jobs.first(), Some(&JobId(137)));
    assert_eq!(jobs.last(), Some(&JobId(200)));
}

/// Sends itself two messages for every one it handles.
struct Doubler {
    handled: Arc<Mutex<u64>>,
}

impl Actor for Doubler {
    type Message = ();
    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }
    fn handle(&mut self, _: (), ctx: &mut Context<'_, ()>) {
        *self.handled.lock().unwrap() += 1;
        let me = ctx.me();
        ctx.send(me, ());
        ctx.send(me, ());
    }
}

/// Self-sends take no credit, so a handler that sends itself more than it
/// handles would grow its mailbox without end: past `SELF_SENDS_PENDING_MAX` it
/// fails, with a message that says so, and its neighbour runs on exactly.
#[test]
fn an_actor_flooding_itself_fails_instead_of_growing_without_bound() {
    let doubled = Arc::new(Mutex::new(0u64));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (d, l) = (doubled.clone(), log.clone());
    let factory = move |id: ActorId, _: Option<&[u8]>| -> BoxActor<()> {
        if id.operator == 1 {
            Box::new(Doubler { handled: d.clone() })
        } else {
            Box::new(Recorder { id, log: l.clone() })
        }
    };
    let mut sim = Sim::new(
        1,
        config(PolicyKind::Fifo),
        16,
        Arc::new(factory),
        Arc::new(MemoryStateStore::default()),
        3,
    );
    let failures = Arc::new(Mutex::new(Vec::new()));
    let f = failures.clone();
    sim.core(ShardId(0))
        .set_failure_hook(Some(Arc::new(move |failure| {
            f.lock().unwrap().push(failure)
        })));
    let doubler = ActorId::new(JobId(1), 1, 0);
    let neighbour = ActorId::new(JobId(1), 2, 7);
    sim.send(ShardId(0), doubler, (), sched());
    for _ in 0..100 {
        sim.send(ShardId(0), neighbour, (), sched());
    }
    sim.run_until_quiet(1_000_000);
    let failures = failures.lock().unwrap().clone();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].actor, Some(doubler));
    assert!(
        failures[0].message.contains("sent itself more than"),
        "{:?}",
        failures[0]
    );
    let handled = *doubled.lock().unwrap();
    assert!(
        (SELF_SENDS_PENDING_MAX as u64 / 2..=SELF_SENDS_PENDING_MAX as u64 * 2).contains(&handled),
        "the doubler handled {handled} before it failed"
    );
    assert_eq!(
        log.lock().unwrap().len(),
        100,
        "the neighbour got every message"
    );
}

/// Sets `TIMERS` timers in one call.
struct TimerHog;

const TIMERS: u64 = 1_500;

impl Actor for TimerHog {
    type Message = ();
    fn snapshot(&mut self) -> Option<dirigo_engine::StateBytes> {
        None
    }
    fn handle(&mut self, _: (), ctx: &mut Context<'_, ()>) {
        for i in 0..TIMERS {
            let due_ns = ctx.now_ns() + 1_000_000 + i;
            ctx.send_self_at(due_ns, (), ctx.sched());
        }
    }
}

/// An actor may have at most `timers_per_actor_max` timers pending on a shard;
/// the rest are refused and counted, never held without bound.
#[test]
fn timers_past_the_per_actor_bound_are_refused_and_counted() {
    let factory = |_: ActorId, _: Option<&[u8]>| -> BoxActor<()> { Box::new(TimerHog) };
    let config = ShardConfig {
        timers_per_actor_max: 1_000,
        ..config(PolicyKind::Edf)
    };
    let mut sim = Sim::new(
        1,
        config,
        16,
        Arc::new(factory),
        Arc::new(MemoryStateStore::default()),
        5,
    );
    sim.send(ShardId(0), ActorId::new(JobId(1), 1, 0), (), sched());
    // Step until the first call has run: it set 1,500 timers, 1,000 are kept.
    let mut steps = 0;
    while sim.core(ShardId(0)).report().timers_refused == 0 {
        assert!(sim.step() && steps < 10_000, "the first call never ran");
        steps += 1;
    }
    let refused = sim.core(ShardId(0)).report().timers_refused;
    assert_eq!(refused, TIMERS - 1_000);
}
